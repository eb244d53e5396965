"""bitsandbytes-compatible LLM.int8() modules: ``Linear8bitLt`` and its ``Int8Params`` weight.

Same constructor, same quantize-on-``.to(device)`` contract and the same state dict as
``bitsandbytes.nn.Linear8bitLt`` (keys ``weight`` int8 ``[out, in]``, ``bias``, ``SCB`` fp32
``[out]``, ``weight_format`` uint8 0 = row-major), so switching is one changed import.

Differences that are on purpose:

* the forward is one ``torch.ops.int8fx.int8_linear`` call on plain tensors, so a model
  of these modules compiles with ``fullgraph=True`` (no graph break, threshold 6 included);
* quantization also happens on a CPU -> CPU move, from the weight in its own dtype
  (bitsandbytes casts it to fp16 first);
* a quantized checkpoint loads into a module that was never moved to a device;
* with ``has_fp16_weights=True`` the outlier columns use the fp weight (more accurate),
  and the fp weight gets its gradient.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

import int8fx.ops  # noqa: F401  (registers torch.ops.int8fx.*)
from int8fx.config import Int8LtConfig
from int8fx.functional import MatmulLtState, int8_linear_trainable, outlier_column_indices

__all__ = ["Int8Params", "Linear8bitLt"]

# bitsandbytes' code for a row-major int8 weight in ``weight_format``: the only layout it
# saves since 0.45 (1-3 were GPU tile layouts), and the only one int8fx reads or writes.
WEIGHT_FORMAT_ROW = 0


# ---------------------------------------------------------------- Int8Params


def _rebuild_int8_params(data: Tensor, requires_grad: bool, has_fp16_weights: bool, SCB: Optional[Tensor]) -> "Int8Params":
    """Unpickling entry point of :class:`Int8Params`."""
    return Int8Params(data, requires_grad=requires_grad, has_fp16_weights=has_fp16_weights, SCB=SCB)


class Int8Params(nn.Parameter):
    """A linear weight that turns into int8 rows plus fp32 row scales when moved to a device.

    Before quantization its data is the floating-point weight. ``.to(device)``, ``.cuda()``
    and ``.cpu()`` (CPU -> CPU included) quantize it in place unless ``has_fp16_weights``;
    afterwards the data *is* the int8 weight ``CB [out, in]`` and ``SCB [out]`` holds the
    fp32 absmax of each row (not divided by 127). Later moves carry ``SCB`` along.
    """

    def __new__(
        cls,
        data: Optional[Tensor] = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: Optional[Tensor] = None,
        SCB: Optional[Tensor] = None,
        **kwargs,
    ) -> "Int8Params":
        # bitsandbytes accepts and ignores other keywords (callers pass a parameter's __dict__).
        if data is None:
            data = CB if CB is not None else torch.empty(0)
        # Only floating-point tensors can require grad: an int8 weight is frozen.
        obj = torch.Tensor._make_subclass(cls, data, requires_grad and data.is_floating_point())
        obj.has_fp16_weights = has_fp16_weights
        obj.SCB = SCB
        return obj

    @property
    def CB(self) -> Optional[Tensor]:
        """The int8 weight (this parameter's own data) once quantized, else None."""
        return self.data if self.dtype == torch.int8 else None

    @CB.setter
    def CB(self, value: Optional[Tensor]) -> None:
        if value is not None:
            self.data = value

    def _quantize_(self, device: torch.device) -> "Int8Params":
        """Replace the fp data by its int8 rows on ``device``; keep only ``CB`` and ``SCB``."""
        with torch.no_grad():
            CB, SCB = torch.ops.int8fx.quantize_weight(self.data.to(device))
        self.requires_grad_(False)
        self.data = CB  # drops this parameter's reference to the fp weight
        self.SCB = SCB
        return self

    def to(self, *args, **kwargs) -> "Int8Params":
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and self.is_floating_point() and not self.has_fp16_weights:
            # bitsandbytes' contract: moving an fp weight to a device quantizes it, in place.
            return self._quantize_(device)
        if not self.is_floating_point():
            dtype = None  # int8 data keeps its dtype, as nn.Module.to does for integer tensors
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        if moved is self:
            return self
        SCB = None if self.SCB is None else self.SCB.to(device=moved.device, non_blocking=non_blocking)
        return Int8Params(moved, requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights, SCB=SCB)

    def cpu(self, memory_format=torch.preserve_format) -> "Int8Params":
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False, memory_format=torch.preserve_format) -> "Int8Params":
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def __deepcopy__(self, memo: dict) -> "Int8Params":
        if id(self) in memo:
            return memo[id(self)]
        SCB = None if self.SCB is None else copy.deepcopy(self.SCB, memo)
        data = self.data.clone(memory_format=torch.preserve_format)
        result = Int8Params(data, requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights, SCB=SCB)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        # nn.Parameter's own reduce rebuilds a plain Parameter: the type and SCB would be lost.
        return (_rebuild_int8_params, (self.data, self.requires_grad, self.has_fp16_weights, self.SCB))


# ---------------------------------------------------------------- Linear8bitLt


class Linear8bitLt(nn.Linear):
    """LLM.int8() linear layer with bitsandbytes' API (``bitsandbytes.nn.Linear8bitLt``).

    Args:
        input_features, output_features, bias: as for ``nn.Linear``.
        has_fp16_weights: keep the floating-point weight and train it (it is quantized on
            every call). ``False`` (inference) keeps only the int8 ``CB`` and fp32 ``SCB``,
            quantized when the module is moved with ``.to(device)`` / ``.cuda()`` / ``.cpu()``,
            when an 8-bit checkpoint is loaded, or else on the first forward.
        threshold: ``|x| >= threshold`` makes an input column an outlier column, multiplied
            in floating point; ``0`` (the default, as in bitsandbytes) disables it. LLM.int8()
            uses 6.
        index: accepted for bitsandbytes compatibility; unused.
        device: where the (fp) parameters are created.

    The bias is used in the input's dtype and the output has the input's dtype. The input
    gets the gradient ``dY @ dequant(W)``; an int8 weight gets none. ``self.state`` holds
    the bitsandbytes-style bookkeeping (``CB``, ``SCB``, ``threshold``, and ``idx``, the
    outlier columns of the last eager call).
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        threshold: float = 0.0,
        index=None,
        device=None,
    ) -> None:
        threshold = Int8LtConfig(threshold=threshold).threshold  # the backend's validation
        super().__init__(input_features, output_features, bias=bias, device=device)
        self.state = MatmulLtState(threshold=threshold, has_fp16_weights=has_fp16_weights)
        self.index = index
        self.weight = Int8Params(self.weight.data, requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, threshold={self.state.threshold}, "
            f"has_fp16_weights={getattr(self.weight, 'has_fp16_weights', None)}, int8={self.weight.dtype == torch.int8}"
        )

    # ------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        threshold = self.state.threshold
        # bitsandbytes uses the bias in the input's dtype; cast per call instead of mutating it.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if weight.has_fp16_weights:
            out, _, _ = int8_linear_trainable(x, weight, bias, threshold)
        else:
            CB, SCB = self._int8_weight()
            # weight=None: outlier columns use the dequantized int8 columns, as bitsandbytes does.
            out = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, threshold, None)
        if not torch.compiler.is_compiling():
            self._record_call(x)
        return out

    def _int8_weight(self) -> tuple[Tensor, Tensor]:
        weight = self.weight
        if weight.dtype == torch.int8:
            if weight.SCB is None:
                raise RuntimeError(
                    "Linear8bitLt has an int8 weight but no row scales (weight.SCB is None): load a "
                    "state dict that has both 'weight' and 'SCB', or quantize an fp weight with .to(device)"
                )
            return weight, weight.SCB
        if torch.compiler.is_compiling():
            # A traced graph cannot swap the parameter for its int8 version: quantize per call.
            # Moving the module with .to(device) before compiling quantizes it once.
            return torch.ops.int8fx.quantize_weight(weight)
        # Never moved to a device: quantize now, once, in place (bitsandbytes is lazy too).
        weight._quantize_(weight.device)
        return weight, weight.SCB

    def _record_call(self, x: Tensor) -> None:
        """Eager-only bitsandbytes bookkeeping in ``self.state``."""
        self._sync_state()
        self.state.is_training = self.training
        if self.state.threshold > 0:
            self.state.idx = outlier_column_indices(x, self.state.threshold)

    def _sync_state(self) -> None:
        weight = self.weight
        quantized = weight.dtype == torch.int8
        # The state refers to the parameter itself, so moves and deepcopies keep them one tensor.
        self.state.CB = weight if quantized else None
        self.state.SCB = weight.SCB if quantized else None
        self.state.has_fp16_weights = weight.has_fp16_weights

    # ------------------------------------------------------------ device moves

    def _apply(self, fn, recurse: bool = True):
        before = self.weight

        def apply_with_plain_weight(t):
            # nn.Module wraps a moved parameter it cannot assign in place (e.g. to "meta") in a
            # plain Parameter, which rejects an Int8Params: hand it the data alone, and let
            # _restore_weight put the type and the scales back.
            applied = fn(t)
            if t is before and applied is not before and isinstance(applied, Int8Params):
                return applied.data
            return applied

        super()._apply(apply_with_plain_weight, recurse)
        self._restore_weight(getattr(before, "has_fp16_weights", self.state.has_fp16_weights), getattr(before, "SCB", None))
        return self

    def _restore_weight(self, has_fp16_weights: bool, SCB: Optional[Tensor]) -> None:
        """Keep ``weight`` an Int8Params whose ``SCB`` lives on its device.

        ``nn.Module._apply`` usually moves a parameter by ``param.data = moved``, which keeps the
        old object and so its old ``SCB``; ``load_state_dict(assign=True)`` and the
        ``torch.__future__`` conversion flags replace it with a plain Parameter.
        """
        weight = self.weight
        if not isinstance(weight, Int8Params):
            weight = Int8Params(weight.data, requires_grad=weight.requires_grad, has_fp16_weights=has_fp16_weights)
            self._parameters["weight"] = weight
        if weight.dtype == torch.int8:
            SCB = weight.SCB if weight.SCB is not None else SCB
            if SCB is not None and SCB.is_meta and not weight.is_meta:
                # Materialized from the meta device (to_empty): scales as uninitialized as the weight.
                weight.SCB = torch.empty(SCB.shape, dtype=torch.float32, device=weight.device)
            elif SCB is not None:
                weight.SCB = SCB.to(device=weight.device, dtype=torch.float32)
        self._sync_state()

    # ------------------------------------------------------------ state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight
        if weight.dtype == torch.int8 and weight.SCB is not None:
            destination[prefix + "SCB"] = weight.SCB if keep_vars else weight.SCB.detach()
            destination[prefix + "weight_format"] = torch.tensor(WEIGHT_FORMAT_ROW, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        incoming = state_dict.get(prefix + "weight")
        SCB = state_dict.get(prefix + "SCB")
        int8_checkpoint = incoming is not None and incoming.dtype == torch.int8
        error = checkpoint_error(self, incoming, SCB, state_dict.get(prefix + "weight_format"))
        if error is not None:
            error_msgs.append(f"While loading {prefix}weight into Linear8bitLt: {error}")
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        has_fp16_weights = self.weight.has_fp16_weights
        # Shape the parameter like the checkpoint's weight so the standard loader copies into
        # it: int8 for an 8-bit checkpoint (no need to move the module first), or back to
        # floating point for an fp checkpoint loaded into a quantized module.
        requantize = False
        if int8_checkpoint and self.weight.dtype != torch.int8:
            self.weight.data = torch.empty(self.weight.shape, dtype=torch.int8, device=self.weight.device)
        elif incoming is not None and not int8_checkpoint and self.weight.dtype == torch.int8:
            self.weight.data = torch.empty(self.weight.shape, dtype=incoming.dtype, device=self.weight.device)
            self.weight.SCB = None
            requantize = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._restore_weight(has_fp16_weights, None)
        weight = self.weight
        if int8_checkpoint:
            weight.SCB = SCB.to(device=weight.device, dtype=torch.float32, copy=not assign)
        if requantize:
            weight._quantize_(weight.device)
        for key in (prefix + "SCB", prefix + "weight_format"):
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        self._sync_state()


def checkpoint_error(module: Linear8bitLt, incoming: Optional[Tensor], SCB: Optional[Tensor], weight_format) -> Optional[str]:
    """Why this module cannot take the checkpoint's weight, or None."""
    if weight_format is not None:
        code = weight_format.item() if isinstance(weight_format, Tensor) else weight_format
        if code not in (WEIGHT_FORMAT_ROW, "row"):
            return f"weight_format {code!r} is not supported; only row-major int8 weights ('row', 0) are"
    if incoming is None:
        return None
    if incoming.dtype != torch.int8:
        if SCB is not None:
            return f"the checkpoint has SCB but its weight is {incoming.dtype}, not int8"
        return None
    if SCB is None:
        return "the checkpoint's weight is int8 but it has no 'SCB' (the fp32 row scales saved beside it)"
    if module.weight.has_fp16_weights:
        return (
            "the checkpoint holds an 8-bit weight but this module was built with has_fp16_weights=True; "
            "build it with has_fp16_weights=False to load 8-bit checkpoints"
        )
    if tuple(SCB.shape) != (module.out_features,):
        return f"SCB has shape {tuple(SCB.shape)}, expected ({module.out_features},)"
    return None
