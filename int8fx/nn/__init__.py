"""bitsandbytes-compatible LLM.int8() modules: ``from int8fx.nn import Linear8bitLt, Int8Params``,
and int8 MoE experts for transformers 5.x experts modules (``convert_experts_``)."""

from int8fx.nn.experts import Int8Experts, convert_experts_
from int8fx.nn.modules import Int8Params, Linear8bitLt

__all__ = ["Int8Experts", "Int8Params", "Linear8bitLt", "convert_experts_"]
