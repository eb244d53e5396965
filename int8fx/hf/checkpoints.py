"""8-bit checkpoints across int8fx and bitsandbytes: same tensors, a different config.json.

Both save an int8 linear as ``weight`` (int8 ``[out, in]``), ``SCB`` (fp32 ``[out]``, the row
absmax) and ``weight_format`` (0, row-major). Only ``quantization_config`` differs:
``{"quant_method": "int8fx", "threshold", "skip_modules"}`` against bitsandbytes'
``{"quant_method": "bitsandbytes", "load_in_8bit": true, "llm_int8_threshold",
"llm_int8_skip_modules", ...}``. Moving a checkpoint between the two is translating that dict.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Optional

from int8fx.hf.config import QUANT_METHOD, Int8fxConfig

Format = Literal["int8fx", "bitsandbytes"]
BNB_QUANT_METHOD = "bitsandbytes"


def is_bitsandbytes_8bit(quantization_config: Optional[dict]) -> bool:
    return bool(quantization_config) and quantization_config.get("load_in_8bit", False) and not quantization_config.get("load_in_4bit")


def from_bitsandbytes(quantization_config: dict) -> Int8fxConfig:
    """bitsandbytes' 8-bit ``quantization_config`` dict -> the Int8fxConfig that reads the same checkpoint."""
    if not is_bitsandbytes_8bit(quantization_config):
        raise ValueError(f"not a bitsandbytes 8-bit quantization_config: {quantization_config!r}")
    if quantization_config.get("llm_int8_has_fp16_weight"):
        raise ValueError("this bitsandbytes checkpoint keeps fp16 weights (llm_int8_has_fp16_weight=True): it holds no int8 weights")
    return Int8fxConfig(
        threshold=quantization_config.get("llm_int8_threshold", 6.0), skip_modules=quantization_config.get("llm_int8_skip_modules")
    )


def to_bitsandbytes(config: Int8fxConfig) -> dict:
    """Int8fxConfig -> the dict bitsandbytes' ``BitsAndBytesConfig(load_in_8bit=True)`` saves."""
    return {
        "quant_method": BNB_QUANT_METHOD,
        "load_in_8bit": True,
        "load_in_4bit": False,
        "llm_int8_threshold": config.threshold,
        "llm_int8_skip_modules": config.skip_modules,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }


def load_config(pretrained_model_name_or_path: str | os.PathLike, threshold: Optional[float] = None, **kwargs: Any):
    """The model config of an 8-bit checkpoint, set up to load into int8fx.

    ``AutoModelForCausalLM.from_pretrained(path, config=int8fx.hf.load_config(path))`` loads an
    int8fx or a bitsandbytes 8-bit checkpoint into int8fx layers, bit for bit, without
    touching its files. ``threshold`` overrides the saved one (it is a runtime option; the
    new value is what the model's config records). ``kwargs`` go to ``AutoConfig.from_pretrained``.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
    saved = getattr(config, "quantization_config", None)
    saved = saved.to_dict() if hasattr(saved, "to_dict") else saved
    if not saved:
        raise ValueError(f"{pretrained_model_name_or_path} is not an 8-bit checkpoint: its config has no quantization_config")
    int8fx_config = _read(saved)
    if threshold is not None:
        int8fx_config = Int8fxConfig(threshold=threshold, skip_modules=int8fx_config.skip_modules)
    config.quantization_config = int8fx_config.to_dict()
    return config


def convert_checkpoint_config(directory: str | os.PathLike, to: Format) -> dict:
    """Rewrite a saved 8-bit checkpoint's ``config.json`` for int8fx or for bitsandbytes, in place.

    The tensors stay untouched (they are the same in both formats). Returns the new
    ``quantization_config``. With ``to="bitsandbytes"``, ``from_pretrained`` then loads the
    directory with bitsandbytes' ``Linear8bitLt`` where bitsandbytes is installed.
    """
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as file:
        model_config = json.load(file)
    saved = model_config.get("quantization_config")
    if not saved:
        raise ValueError(f"{path} has no quantization_config: not an 8-bit checkpoint")
    config = _read(saved)
    if to == "bitsandbytes":
        model_config["quantization_config"] = to_bitsandbytes(config)
    elif to == "int8fx":
        model_config["quantization_config"] = config.to_dict()
    else:
        raise ValueError(f"to must be 'int8fx' or 'bitsandbytes', got {to!r}")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(model_config, file, indent=2, sort_keys=True)
        file.write("\n")
    return model_config["quantization_config"]


def _read(saved: dict) -> Int8fxConfig:
    """A checkpoint's ``quantization_config``, int8fx's or bitsandbytes' 8-bit one, as an Int8fxConfig."""
    return Int8fxConfig(**saved) if saved.get("quant_method") == QUANT_METHOD else from_bitsandbytes(saved)
