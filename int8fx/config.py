"""The one options dataclass of the ``int8lt`` backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# The defaults every entry point shares (the backend, replace_linear, the CLI, the demo).
DEFAULT_THRESHOLD = 6.0  # the LLM.int8() paper's outlier threshold
DEFAULT_SKIP = ("lm_head",)  # as transformers' load_in_8bit keeps the output head in fp

OutlierWeights = Literal["fp", "int8"]
TrainableWeights = Literal["keep_fp", "freeze"]
InnerCompiler = Literal["inductor", "eager"]
# torch.compile's modes, passed on to inductor for the rewritten graph.
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Int8LtConfig:
    """Options of ``torch.compile(model, backend=int8fx.int8lt(...))``.

    Attributes:
        threshold: an activation element with ``|x| >= threshold`` makes its column an
            outlier column, multiplied in floating point. ``0`` disables the decomposition
            (plain vector-wise int8).
        skip: module paths (or path components) whose linears stay in floating point.
            ``"lm_head"`` matches ``lm_head`` and ``model.lm_head``; matching uses the
            calling module's path, so a tied ``lm_head`` is skipped even though its weight
            is the embedding's parameter.
        outlier_weights: ``"fp"`` multiplies the outlier columns with the original fp weight
            columns (more accurate); ``"int8"`` uses the dequantized int8 columns, exactly as
            bitsandbytes does.
        trainable_weights: what to do with a linear whose weight requires grad while grad
            is enabled. ``"keep_fp"`` leaves it in floating point (with a warning) so
            training is never silently broken; ``"freeze"`` quantizes it anyway and the
            weight receives no gradient (bitsandbytes' behaviour).
        min_features: linears with ``in_features`` or ``out_features`` below this stay in
            floating point (int8 buys nothing on tiny matrices).
        quantize_routers: MoE routers (linears whose output picks experts through top-k) stay in
            floating point unless this is True: an int8 error that flips an expert choice
            changes that token's whole expert output, for a few FLOPs saved.
        quantize_experts: MoE experts stored as one 3-D parameter (transformers 5.x's
            ``experts.gate_up_proj`` / ``down_proj``, run through ``grouped_mm`` or ``batched_mm``)
            become int8 per expert and output row, each expert's rows quantized and decomposed
            on their own; False keeps them in floating point.
        quantize_tied_heads: a linear whose weight is also an input embedding's (a tied output
            head, whatever its name: ``lm_head``, Whisper's ``proj_out``) stays in floating point
            unless this is True: the embedding keeps the fp weight anyway, so int8 saves no memory
            there, and the head's error reaches the logits directly (transformers' 8-bit loading
            keeps tied weights in fp too).
        report_outliers: on the first call of each rewritten graph, run it once more uncompiled
            to record, per int8 layer, how many input columns were outliers and the largest
            ``|x|`` (``LayerReport.outliers``, the report's "outlier cols"). Costs one uncompiled
            forward per graph, once.
        release_weights: after quantization, free the floating-point storage of every weight
            whose uses were all replaced, so those layers hold only int8 weights plus one fp32
            scale per row. Outlier columns then use the dequantized int8 columns. The released
            parameters keep their shape; any eager use of them (calling the module, reading
            ``weight``, ``state_dict()``) raises an error naming this option.
        group_siblings: the int8 linears that read the same input (attention's q/k/v, a gated
            MLP's gate/up) become one ``int8fx::int8_linear_siblings`` call that quantizes the
            input once (on CPU and CUDA, where that call has kernels of its own). Outputs are
            bit-identical either way; False keeps one call per linear.
        inner: ``"inductor"`` compiles the rewritten graph with inductor; ``"eager"`` runs it
            as is (for debugging and fast tests).
        mode: inductor's mode for the rewritten graph, as ``torch.compile``'s ``mode``
            (``"reduce-overhead"``: CUDA graphs). ``torch.compile(model, backend="int8lt",
            mode=...)`` sets it.
        dump_dir: write each graph before and after the rewrite, and its layer table, there.
    """

    threshold: float = DEFAULT_THRESHOLD
    skip: tuple[str, ...] = DEFAULT_SKIP
    outlier_weights: OutlierWeights = "fp"
    trainable_weights: TrainableWeights = "keep_fp"
    min_features: int = 1
    quantize_routers: bool = False
    quantize_experts: bool = True
    quantize_tied_heads: bool = False
    report_outliers: bool = True
    release_weights: bool = False
    group_siblings: bool = True
    inner: InnerCompiler = "inductor"
    mode: str | None = None
    dump_dir: str | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"threshold must be a number, got {self.threshold!r}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0 (0 disables outlier handling), got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        if skip is None:
            skip = ()
        skip = tuple(skip)
        for entry in skip:
            if not isinstance(entry, str) or not entry or entry.strip(".") != entry:
                raise ValueError(f"skip entries must be non-empty module paths like 'lm_head', got {entry!r}")
        object.__setattr__(self, "skip", skip)
        _check_choice("outlier_weights", self.outlier_weights, ("fp", "int8"))
        _check_choice("trainable_weights", self.trainable_weights, ("keep_fp", "freeze"))
        _check_choice("inner", self.inner, ("inductor", "eager"))
        if self.mode is not None:
            _check_choice("mode", self.mode, INDUCTOR_MODES)
        for name in ("quantize_routers", "quantize_experts", "quantize_tied_heads", "report_outliers", "group_siblings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.release_weights, bool):
            raise TypeError(f"release_weights must be True or False, got {self.release_weights!r}")
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 1:
            raise ValueError(f"min_features must be an int >= 1, got {self.min_features!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
