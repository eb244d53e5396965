"""int8fx: LLM.int8() for any PyTorch model through ``torch.compile(model, backend="int8lt")``.

Importing int8fx registers its ops (``torch.ops.int8fx.*``) and changes no global setting.
``int8fx.Int8fxConfig`` and ``int8fx.hf`` (the transformers integration) import transformers
on first use only.
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
    "Int8fxConfig",
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


def __getattr__(name: str):
    # Lazy: transformers takes seconds to import, and int8fx must import without it.
    if name in ("Int8fxConfig", "hf"):
        import int8fx.hf

        return int8fx.hf if name == "hf" else int8fx.hf.Int8fxConfig
    raise AttributeError(f"module 'int8fx' has no attribute {name!r}")
