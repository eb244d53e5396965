"""``Int8fxConfig``: the ``quantization_config`` that makes ``from_pretrained`` load into int8."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from transformers.utils.quantization_config import QuantizationConfigMixin

from int8fx.config import DEFAULT_THRESHOLD, Int8LtConfig

QUANT_METHOD = "int8fx"  # the name in config.json and in transformers' quantizer registry


class Int8fxConfig(QuantizationConfigMixin):
    """LLM.int8() loading options for ``AutoModel*.from_pretrained(..., quantization_config=...)``.

    Args:
        threshold: ``|x| >= threshold`` makes an activation column an outlier column,
            multiplied in floating point; ``0`` disables it. Means what
            ``BitsAndBytesConfig.llm_int8_threshold`` means (same default, 6).
        skip_modules: module names kept in floating point, matched as transformers matches
            ``llm_int8_skip_modules`` (a name, a prefix up to a ``.``, a regex, or a suffix).
            ``None`` keeps transformers' default: the output embedding (``lm_head``) and any
            tied weight. A list replaces that default, as in bitsandbytes.

    The threshold is a runtime option of each layer, not part of the int8 weights: a saved
    checkpoint can be loaded with another one (see :func:`int8fx.hf.load_config`).
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, skip_modules: Optional[list[str]] = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.threshold = Int8LtConfig(threshold=threshold).threshold  # the backend's validation
        if isinstance(skip_modules, str):
            skip_modules = [skip_modules]
        if skip_modules is not None and not all(isinstance(name, str) and name for name in skip_modules):
            raise TypeError(f"skip_modules must be a list of module names, got {skip_modules!r}")
        self.skip_modules = None if skip_modules is None else list(skip_modules)
        kwargs.pop("quant_method", None)
        if kwargs:  # a newer int8fx's checkpoint, or a typo: neither is silently meaningful
            warnings.warn(f"Int8fxConfig ignores unknown options {sorted(kwargs)}", stacklevel=2)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "threshold": self.threshold, "skip_modules": self.skip_modules}
