"""transformers integration: ``from_pretrained`` straight into int8, 8-bit checkpoints, PEFT.

::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=int8fx.Int8fxConfig())

builds the model on the meta device, swaps its linears for :class:`int8fx.nn.Linear8bitLt`
and quantizes each weight as it is read: the fp model is never in memory.

Importing this module (which ``int8fx.Int8fxConfig`` and ``int8fx.hf`` do on first use)
registers the ``"int8fx"`` quantization method in transformers' quantizer registry, and
changes nothing else; a plain ``import int8fx`` does not import transformers. Loading a
saved int8fx checkpoint needs that registration: ``import int8fx.hf`` (or
:func:`register`) before ``from_pretrained``.
"""

from __future__ import annotations

try:
    import transformers
except ImportError as error:  # int8fx itself works without transformers
    raise ImportError(
        "int8fx.hf (Int8fxConfig, from_pretrained into int8) needs transformers >= 5.17; install it with "
        "`pip install --no-deps transformers` so that your torch build stays as it is"
    ) from error

_major = int(transformers.__version__.split(".")[0])
if _major < 5:
    raise ImportError(f"int8fx.hf needs transformers >= 5.17 (its quantizer API), found {transformers.__version__}")

from transformers.quantizers.auto import (  # noqa: E402
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from int8fx.hf.checkpoints import convert_checkpoint_config, from_bitsandbytes, load_config, to_bitsandbytes  # noqa: E402
from int8fx.hf.config import QUANT_METHOD, Int8fxConfig  # noqa: E402
from int8fx.hf.quantizer import Int8fxHfQuantizer  # noqa: E402

__all__ = [
    "Int8fxConfig",
    "Int8fxHfQuantizer",
    "convert_checkpoint_config",
    "from_bitsandbytes",
    "load_config",
    "register",
    "to_bitsandbytes",
]


def register() -> None:
    """Make ``quant_method: "int8fx"`` known to transformers (idempotent; done on import)."""
    # The registry refuses a second registration: check first, so that calling again is harmless.
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(Int8fxConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(Int8fxHfQuantizer)


register()
