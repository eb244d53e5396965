"""int8fx: LLM.int8() for any PyTorch model through ``torch.compile(model, backend="int8lt")``.

Importing int8fx registers its ops (``torch.ops.int8fx.*``) and changes no global setting.
"""

from int8fx import nn
from int8fx.backend import Int8LtBackend, int8lt
from int8fx.config import Int8LtConfig
from int8fx.functional import MatmulLtState, matmul
from int8fx.report import GraphReport, LayerReport
from int8fx.swap import replace_linear
from int8fx.weights import ReleasedWeightError

__all__ = [
    "GraphReport",
    "Int8LtBackend",
    "Int8LtConfig",
    "LayerReport",
    "MatmulLtState",
    "ReleasedWeightError",
    "int8lt",
    "matmul",
    "nn",
    "replace_linear",
]
__version__ = "0.1.0"
