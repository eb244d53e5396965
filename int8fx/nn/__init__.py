"""bitsandbytes-compatible LLM.int8() modules: ``from int8fx.nn import Linear8bitLt, Int8Params``."""

from int8fx.nn.modules import Int8Params, Linear8bitLt

__all__ = ["Int8Params", "Linear8bitLt"]
