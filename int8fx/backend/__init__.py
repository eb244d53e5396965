"""The ``int8lt`` dynamo backend: trace to ATen, rewrite the linears to int8, hand over to inductor.

For every graph dynamo captures (``compiler.py`` chains the steps):

1. ``trace.py``: re-trace dynamo's torch-level graph to ATen with ``make_fx`` under
   dynamo's fake mode, keeping each node's calling module; a graph with tensor-subclass
   inputs (tensor parallelism's DTensor parameters) goes through AOTAutograd instead, and
   steps 2-5 run as its forward compiler on the local shards;
2. ``passes.find_linears`` and ``policy.py``: every matmul on a parameter weight is either
   planned for int8 or reported in floating point with its reason;
3. ``passes.rewrite_to_int8`` and ``weights.STORE``: replace the planned linears with
   ``int8fx::int8_linear``; each weight is quantized once, ``CB``/``SCB`` become graph inputs;
4. inductor compiles the rewritten graph, fusing everything else as usual;
5. ``runtime.py``: on each call, append the current quantized weights to the inputs.
"""

from int8fx.backend.compiler import Int8LtBackend, LinearPlan, RewrittenGraph, default_backend, int8lt, int8lt_backend

__all__ = ["Int8LtBackend", "LinearPlan", "RewrittenGraph", "default_backend", "int8lt", "int8lt_backend"]
