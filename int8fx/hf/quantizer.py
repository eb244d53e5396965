"""``Int8fxHfQuantizer``: how ``from_pretrained`` builds an int8 model without its fp weights.

transformers calls it at four points of a load:

1. ``_process_model_before_weight_loading``: the model skeleton exists on the meta device
   (no memory); every ``nn.Linear`` not kept in fp becomes an :class:`~int8fx.nn.Linear8bitLt`,
   and every transformers experts module (MoE, 3-D weights) becomes int8 experts
   (:func:`~int8fx.nn.convert_experts_`).
2. For an fp checkpoint, transformers reads one tensor at a time and hands each linear
   weight to :class:`QuantizeWeight` before it is stored: only ``CB``/``SCB`` are kept. Experts
   arrive one layer's 3-D weight at a time (transformers stacks a per-expert checkpoint first).
3. For an 8-bit checkpoint (int8fx's or bitsandbytes' format: ``weight`` int8, ``SCB``,
   ``weight_format``), :class:`LoadInt8Weight` assembles the three tensors into the
   parameter, bit for bit, with no requantization. Experts load as two plain tensors each
   (see "Checkpoint keys of int8 experts" below).
4. ``_process_model_after_weight_loading`` checks that every int8 layer got a complete int8
   weight and raises, naming the tensors, if not: a half-loaded model never runs.

Checkpoint keys of int8 experts. In memory an experts weight ``gate_up_proj`` is int8 ``[E, N, K]``
with its fp32 row scales in the buffer ``gate_up_proj_SCB`` ``[E, N]``. ``save_pretrained`` writes
a model in its checkpoint's layout: where transformers converts per-expert checkpoints (Mixtral's
``experts.{e}.w1.weight``, Qwen3-MoE's ``experts.{e}.gate_proj.weight``), each expert is saved as
the 2-D int8 linear it is, in bitsandbytes' names minus ``weight_format``: ``experts.{e}.w1.weight``
int8 ``[N, K]`` and ``experts.{e}.w1.SCB`` fp32 ``[N]`` (the scales follow the weights through
transformers' own conversion, split and merged alike); a model without such a conversion saves
``experts.gate_up_proj`` and ``experts.gate_up_proj_SCB`` as they are. Both load back bit for bit.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from int8fx import reference
from int8fx.hf import memory
from int8fx.hf.config import Int8fxConfig
from int8fx.nn.experts import SCALE_SUFFIX, Int8Experts, convert_experts_, expert_weight_names, experts_problem
from int8fx.nn.modules import Int8Params, Linear8bitLt, checkpoint_error

log = logging.getLogger(__name__)

# Names of one int8 linear's tensors in a checkpoint: bitsandbytes' keys, which int8fx shares.
SERIALIZED_WEIGHT = ["weight", "SCB", "weight_format"]


class Int8fxHfQuantizer(HfQuantizer):
    """transformers' hooks for loading (and saving) models in int8fx's LLM.int8() format."""

    requires_calibration = False
    quantization_config: Int8fxConfig
    serialized_names = {"weight": SERIALIZED_WEIGHT}

    def __init__(self, quantization_config: Int8fxConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.int8_modules: list[str] = []
        self.int8_experts: list[str] = []  # experts modules converted to int8fx.nn.Int8Experts
        self.fp_modules: dict[str, str] = {}  # module path -> why it stays in floating point
        self.load_errors: dict[str, str] = {}  # tensor name -> what is wrong with it
        # (a model converter merging per-expert weights, its copy for their SCB): see update_weight_conversions
        self.expert_scale_converters: list[tuple[WeightConverter, WeightConverter]] = []

    # ------------------------------------------------------------ environment and placement

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "int8fx cannot offload int8 layers to disk: pass a device_map (or max_memory) whose "
                "devices hold the int8 model; it needs about a quarter of the fp32 model's memory"
            )

    @property
    def quantized_element_size(self) -> float:
        return 1  # accelerate's device_map="auto" plans int8 layers at one byte per weight

    def param_element_size(self, model: Any, param_name: str, param: Tensor) -> float:
        # transformers < 5.23 has no quantized_element_size: same answer through the older hook.
        return 1 if self.param_needs_quantization(model, param_name) else param.element_size()

    def adjust_max_memory(self, max_memory: dict) -> dict:
        # Room for the one fp weight being quantized at a time, as bitsandbytes leaves.
        return {device: budget * 0.90 for device, budget in max_memory.items()}

    # ------------------------------------------------------------ before the weights

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        _refuse_tensor_parallel(model)
        config = self.quantization_config
        kept = self.get_modules_to_not_convert(model, config.skip_modules, getattr(model, "_keep_in_fp32_modules", None))
        _warn_unmatched_skips(config.skip_modules, model)
        self.int8_modules, self.int8_experts, self.fp_modules = [], [], {}
        for path, module in list(model.named_modules()):
            reason = _fp_reason(path, module, kept, config)
            if reason is not None:
                if reason:
                    self.fp_modules[path] = reason
                continue
            if _has_3d_parameters(module):
                convert_experts_(module, config.threshold)  # on the meta device: int8 tensors to fill
                self.int8_experts.append(path)
                continue
            parent, name = get_module_from_name(model, path)
            with torch.device("meta"):
                int8_module = Linear8bitLt(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    has_fp16_weights=False,
                    threshold=config.threshold,
                )
            int8_module.requires_grad_(False)  # frozen int8; the bias too, as with bitsandbytes
            setattr(parent, name, int8_module)
            self.int8_modules.append(path)

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module, name = get_module_from_name(model, param_name)
        if isinstance(module, Int8Experts):
            return name in expert_weight_names(module)
        return isinstance(module, Linear8bitLt) and name == "weight" and not module.weight.has_fp16_weights

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeWeight(self)

    def get_weight_conversions(self) -> list:
        # Defined here (not through get_load_operations) so that transformers 5.17 to 5.23 all use it.
        if not self.pre_quantized:
            return []
        return [
            # Experts scales saved as they are (``experts.gate_up_proj_SCB``): loaded as they are. First,
            # because the linears' converter below would take the key for a linear's ``SCB``.
            WeightConverter(source_patterns=SCALE_SUFFIX, target_patterns=SCALE_SUFFIX, operations=[_SaveAsIs()]),
            WeightConverter(source_patterns=SERIALIZED_WEIGHT, target_patterns="weight", operations=[LoadInt8Weight(self)]),
        ]

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
        """transformers (>= 5.23) asks which converters load this model: the model's own, plus a copy
        of each that merges per-expert weights into an int8 experts weight, for their ``SCB``.

        Mixtral's ``experts.*.w1.weight`` + ``experts.*.w3.weight`` -> ``experts.gate_up_proj`` gets
        ``experts.*.w1.SCB`` + ``experts.*.w3.SCB`` -> ``experts.gate_up_proj_SCB``, with the same
        operations (stack the experts, concatenate gate and up): the scales are ``[N]`` per expert
        as the weights are ``[N, K]``, so the same steps give ``[E, N]``, and reversed on saving
        they split the scales as they split the weights."""
        weight_names = "\n".join(f"{path}.{name}" for path in self.int8_experts for name in expert_weight_names(model.get_submodule(path)))
        converters, self.expert_scale_converters = [], []
        for converter in weight_conversions:
            converters.append(converter)
            scales = _expert_scale_converter(converter, weight_names)
            if scales is not None:
                converters.append(scales)  # next to its weights' converter, ahead of the general ones
                self.expert_scale_converters.append((converter, scales))
        return super().update_weight_conversions(converters, model)

    # ------------------------------------------------------------ after the weights

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        problems = dict(self.load_errors)
        for path in self.int8_modules:
            module = model.get_submodule(path)
            if not isinstance(module.weight, Int8Params):
                # A weight the checkpoint lacked, which transformers made a plain Parameter and initialized.
                module._restore_weight(has_fp16_weights=False, SCB=None)
            weight = module.weight
            if weight.is_meta:
                problems[f"{path}.weight"] = "was never loaded (still on the meta device)"
            elif weight.dtype != torch.int8 and self.pre_quantized:
                problems.setdefault(f"{path}.weight", f"is {weight.dtype} in an 8-bit checkpoint: expected int8 with its 'SCB'")
            elif weight.dtype != torch.int8:
                weight._quantize_(weight.device)  # missing from the checkpoint: transformers warned
        for path in self.int8_experts:
            problems.update(_experts_problems(path, model.get_submodule(path), self.pre_quantized))
        for path in self.fp_modules:
            weight = getattr(model.get_submodule(path), "weight", None)
            if isinstance(weight, Tensor) and weight.dtype == torch.int8:
                problems[f"{path}.weight"] = "is int8 in the checkpoint but this module stays in floating point (skip_modules)"
        if problems:
            details = "\n".join(f"  {name}: {problem}" for name, problem in sorted(problems.items()))
            raise ValueError(f"int8fx could not load this checkpoint into int8 layers:\n{details}")
        if not self.pre_quantized:
            # What is left of the fp checkpoint: views of its files that keep them mapped, and
            # freed fp weights the allocator holds on to.
            memory.detach_from_checkpoint_files(model)
            memory.return_freed_memory()
        self._save_expert_scales_as_loaded(model)
        model.is_loaded_in_int8fx = True
        log.info(
            "int8fx: %d linear layers and %d experts modules loaded in int8 (threshold %s); kept in floating point: %s",
            len(self.int8_modules),
            len(self.int8_experts),
            self.quantization_config.threshold,
            ", ".join(f"{path} ({reason})" for path, reason in self.fp_modules.items()) or "none",
        )
        return model

    def _save_expert_scales_as_loaded(self, model: nn.Module) -> None:
        """``save_pretrained`` reverses the converters that loaded the model (``model._weight_conversions``:
        those that matched a checkpoint key). An fp checkpoint has no ``SCB`` keys, so the scales'
        converter never matched: add it beside its weights', so that a save splits the scales as it
        splits the weights, and every expert is saved as one 2-D int8 linear."""
        used = getattr(model, "_weight_conversions", None)
        if used is None:
            return
        for weights, scales in self.expert_scale_converters:
            if any(c is weights for c in used) and not any(c is scales for c in used):
                used.append(scales)

    # ------------------------------------------------------------ what transformers asks

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (PEFT) train on top of the frozen int8 layers

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)  # model.config.dtype, the default, is a string once the config was saved
        for path in self.int8_modules:
            parent, name = get_module_from_name(model, path)
            setattr(parent, name, _dequantized_linear(getattr(parent, name), dtype))
        for path in self.int8_experts:
            _dequantize_experts_(model.get_submodule(path), dtype)
        return model


# ---------------------------------------------------------------- conversion ops


class QuantizeWeight(ConversionOps):
    """fp weight of a :class:`Linear8bitLt`, just read from the checkpoint -> its int8 parameter."""

    def __init__(self, hf_quantizer: Int8fxHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, **kwargs: Any) -> dict:
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            shape = value.shape
            # Experts [E, N, K]: every expert's rows are rows of one [E * N, K] weight.
            CB, SCB = memory.quantize_in_row_blocks(value.reshape(-1, shape[-1]))
            if value.device.type == "cpu":
                memory.release_file_pages(value)  # the fp weight is never read again
                del value
                memory.return_freed_memory()  # the fp32 temporaries, before the next weight's
            if len(shape) == 3:
                # The int8 experts weight and its scales, two tensors of the experts module.
                result[name] = nn.Parameter(CB.view(shape), requires_grad=False)
                result[name + SCALE_SUFFIX] = SCB.view(shape[:2])
            else:
                result[name] = Int8Params(CB, requires_grad=False, has_fp16_weights=False, SCB=SCB)
        return result


class LoadInt8Weight(ConversionOps):
    """``weight`` int8 + ``SCB`` (+ ``weight_format``) of one layer -> its int8 parameter, as saved."""

    def __init__(self, hf_quantizer: Int8fxHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model: Optional[nn.Module] = None, full_layer_name: Optional[str] = None, **kwargs: Any) -> dict:
        tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        weight, SCB = tensors.get("weight"), tensors.get("SCB")
        module, _ = get_module_from_name(model, full_layer_name)
        if weight is not None and weight.dtype != torch.int8 and SCB is None:
            return {"weight": weight}  # an fp weight (a norm, a layer kept in fp): loaded as it is
        problem = _checkpoint_problem(module, weight, SCB, tensors.get("weight_format"))
        if problem is not None:
            # transformers logs errors raised here and goes on; the model-wide check raises them.
            self.hf_quantizer.load_errors[full_layer_name] = problem
            raise ValueError(f"{full_layer_name}: {problem}")
        SCB = SCB.to(device=weight.device, dtype=torch.float32)
        return {"weight": Int8Params(weight, requires_grad=False, has_fp16_weights=False, SCB=SCB)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _SaveAsIs()


class _SaveAsIs(ConversionOps):
    """A tensor the module holds as the checkpoint does: saving an int8 linear's three tensors,
    loading (and saving) an experts weight's scales."""

    def convert(self, input_dict: dict, **kwargs: Any) -> dict:
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return _SaveAsIs()


# ---------------------------------------------------------------- helpers


def _has_3d_parameters(module: nn.Module) -> bool:
    return any(param.dim() >= 3 for param in module.parameters(recurse=False))


def _fp_reason(path: str, module: nn.Module, kept: list[str], config: Int8fxConfig) -> Optional[str]:
    """None: convert ``module``. ``""``: not a layer int8fx converts. Else why it stays in fp."""
    if _has_3d_parameters(module):
        if not should_convert_module(path, kept):
            return _skip_reason(path, config)
        return experts_problem(module)
    if type(module) is not nn.Linear:
        if type(module).__name__ == "Conv1D":
            return "Conv1D (a transposed linear): not supported yet"
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            # A linear by another name (an MoE router, say): its owner's forward is not ours to replace.
            return f"{type(module).__name__} is not an nn.Linear"
        return ""
    if not should_convert_module(path, kept):
        return _skip_reason(path, config)
    return None


def _skip_reason(path: str, config: Int8fxConfig) -> str:
    if config.skip_modules is not None and not should_convert_module(path, config.skip_modules):
        return "skip_modules"
    return "transformers' default: output embedding, tied or fp32 weight"


def _expert_scale_converter(converter: Any, int8_weight_names: str) -> Optional[WeightConverter]:
    """For a converter that merges per-expert ``.weight``s into an int8 experts weight, the same
    conversion for their ``.SCB``; None for any other transform."""
    if not isinstance(converter, WeightConverter):
        return None
    sources, targets = converter._original_source_patterns, converter._original_target_patterns
    if len(targets) != 1 or not all(source.endswith(".weight") for source in sources):
        return None
    if not re.search(f"{targets[0]}$", int8_weight_names, re.MULTILINE):
        return None
    scale_sources = [source.removesuffix(".weight") + ".SCB" for source in sources]
    return converter.copy(scale_sources, [targets[0] + SCALE_SUFFIX], operations=list(converter.operations))


def _experts_problems(path: str, module: nn.Module, pre_quantized: bool) -> dict[str, str]:
    """What is wrong with a loaded int8 experts module's tensors (tensor name -> problem)."""
    problems = {}
    for name in expert_weight_names(module):
        CB, SCB = getattr(module, name), getattr(module, name + SCALE_SUFFIX)
        if CB.is_meta or SCB.is_meta:
            missing = name if CB.is_meta else name + SCALE_SUFFIX
            problems[f"{path}.{missing}"] = "was never loaded (still on the meta device)"
        elif CB.dtype != torch.int8:
            expected = "expected int8 with its SCB" if pre_quantized else "expected int8"
            problems[f"{path}.{name}"] = f"is {CB.dtype}: {expected}"
        elif SCB.dtype != torch.float32 or SCB.shape != CB.shape[:2]:
            problems[f"{path}.{name}{SCALE_SUFFIX}"] = f"is {SCB.dtype} {list(SCB.shape)}, expected float32 {list(CB.shape[:2])}"
    return problems


def _checkpoint_problem(module: nn.Module, weight: Optional[Tensor], SCB: Optional[Tensor], weight_format: Any) -> Optional[str]:
    if not isinstance(module, Linear8bitLt):
        return "the checkpoint holds an int8 weight for a layer that int8fx keeps in floating point (skip_modules)"
    if weight is None:
        return "the checkpoint has 'SCB' but no 'weight'"
    if tuple(weight.shape) != (module.out_features, module.in_features):
        return f"weight has shape {tuple(weight.shape)}, expected {(module.out_features, module.in_features)}"
    return checkpoint_error(module, weight, SCB, weight_format)


def _warn_unmatched_skips(skip_modules: Optional[list[str]], model: nn.Module) -> None:
    """A skip entry that keeps no linear (nor MoE experts) in fp is a typo or a wrong prefix: say so."""
    if not skip_modules:
        return
    layers = [path for path, module in model.named_modules() if type(module) is nn.Linear or _has_3d_parameters(module)]
    for pattern in skip_modules:
        if all(should_convert_module(path, [pattern]) for path in layers):
            log.warning("int8fx: skip_modules entry %r matches no linear layer (nor MoE experts) of %s", pattern, type(model).__name__)


def _dequantize_experts_(module: nn.Module, dtype: Optional[torch.dtype]) -> None:
    """Int8 experts back to the fp experts module of the model's own class, in place."""
    for name in expert_weight_names(module):
        CB, SCB = getattr(module, name), module._buffers.pop(name + SCALE_SUFFIX)
        weight = reference.dequantize_rows(CB.reshape(-1, CB.shape[-1]), SCB.reshape(-1)).view(CB.shape)
        module._parameters[name] = nn.Parameter(weight.to(dtype or torch.float32), requires_grad=False)
    module.__class__ = module.fp_class
    del module.threshold


def _dequantized_linear(module: Linear8bitLt, dtype: Optional[torch.dtype]) -> nn.Linear:
    weight = module.weight
    dtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(reference.dequantize_rows(weight, weight.SCB).to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return linear


def _refuse_tensor_parallel(model: nn.Module) -> None:
    """transformers' tensor parallelism (``tp_plan`` / ``distributed_config``) turns each weight into
    a DTensor shard as it loads, which ``Linear8bitLt`` cannot hold: a clear error, and the way that
    works (an fp load with the plan, then int8lt quantizing each rank's shard), instead of an
    AttributeError deep in the loader."""
    distributed = getattr(getattr(model, "config", None), "distributed_config", None)
    if distributed is None:
        return
    sizes = (getattr(distributed, name, None) or 1 for name in ("tp_size", "ep_size"))
    if getattr(distributed, "tp_plan", None) or any(size > 1 for size in sizes):
        raise NotImplementedError(
            "int8fx.Int8fxConfig does not load with transformers' tensor parallelism (tp_plan / "
            "distributed_config): its int8 modules cannot hold DTensor shards. Load the model with the "
            "plan and without quantization_config, then torch.compile(model, backend='int8lt'): int8lt "
            "quantizes each rank's shard (README, 'Several devices')."
        )
