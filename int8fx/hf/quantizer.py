"""``Int8fxHfQuantizer``: how ``from_pretrained`` builds an int8 model without its fp weights.

transformers calls it at four points of a load:

1. ``_process_model_before_weight_loading``: the model skeleton exists on the meta device
   (no memory); every ``nn.Linear`` not kept in fp becomes an :class:`~int8fx.nn.Linear8bitLt`.
2. For an fp checkpoint, transformers reads one tensor at a time and hands each linear
   weight to :class:`QuantizeWeight` before it is stored: only ``CB``/``SCB`` are kept.
3. For an 8-bit checkpoint (int8fx's or bitsandbytes' format: ``weight`` int8, ``SCB``,
   ``weight_format``), :class:`LoadInt8Weight` assembles the three tensors into the
   parameter, bit for bit, with no requantization.
4. ``_process_model_after_weight_loading`` checks that every int8 layer got a complete int8
   weight and raises, naming the tensors, if not: a half-loaded model never runs.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from int8fx import reference
from int8fx.hf import memory
from int8fx.hf.config import Int8fxConfig
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
        self.fp_modules: dict[str, str] = {}  # module path -> why it stays in floating point
        self.load_errors: dict[str, str] = {}  # tensor name -> what is wrong with it

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
        config = self.quantization_config
        kept = self.get_modules_to_not_convert(model, config.skip_modules, getattr(model, "_keep_in_fp32_modules", None))
        _warn_unmatched_skips(config.skip_modules, model)
        self.int8_modules, self.fp_modules = [], {}
        for path, module in list(model.named_modules()):
            reason = _fp_reason(path, module, kept, config)
            if reason is not None:
                if reason:
                    self.fp_modules[path] = reason
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
        return isinstance(module, Linear8bitLt) and name == "weight" and not module.weight.has_fp16_weights

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeWeight(self)

    def get_weight_conversions(self) -> list:
        # Defined here (not through get_load_operations) so that transformers 5.17 to 5.23 all use it.
        if not self.pre_quantized:
            return []
        return [WeightConverter(source_patterns=SERIALIZED_WEIGHT, target_patterns="weight", operations=[LoadInt8Weight(self)])]

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
        model.is_loaded_in_int8fx = True
        log.info(
            "int8fx: %d linear layers loaded in int8 (threshold %s); kept in floating point: %s",
            len(self.int8_modules),
            self.quantization_config.threshold,
            ", ".join(f"{path} ({reason})" for path, reason in self.fp_modules.items()) or "none",
        )
        return model

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
        for path in self.int8_modules:
            parent, name = get_module_from_name(model, path)
            setattr(parent, name, _dequantized_linear(getattr(parent, name), dtype))
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
            CB, SCB = memory.quantize_in_row_blocks(value)
            if value.device.type == "cpu":
                memory.release_file_pages(value)  # the fp weight is never read again
                del value
                memory.return_freed_memory()  # the fp32 temporaries, before the next weight's
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
    """Saving: the module's state dict already has the checkpoint's three tensors."""

    def convert(self, input_dict: dict, **kwargs: Any) -> dict:
        return input_dict


# ---------------------------------------------------------------- helpers


def _fp_reason(path: str, module: nn.Module, kept: list[str], config: Int8fxConfig) -> Optional[str]:
    """None: convert ``module``. ``""``: not a layer int8fx converts. Else why it stays in fp."""
    if any(param.dim() >= 3 for param in module.parameters(recurse=False)):
        return "MoE experts as 3-D parameters: not quantized yet"
    if type(module) is not nn.Linear:
        if type(module).__name__ == "Conv1D":
            return "Conv1D (a transposed linear): not supported yet"
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            # A linear by another name (an MoE router, say): its owner's forward is not ours to replace.
            return f"{type(module).__name__} is not an nn.Linear"
        return ""
    if not should_convert_module(path, kept):
        if config.skip_modules is not None and not should_convert_module(path, config.skip_modules):
            return "skip_modules"
        return "transformers' default: output embedding, tied or fp32 weight"
    return None


def _checkpoint_problem(module: nn.Module, weight: Optional[Tensor], SCB: Optional[Tensor], weight_format: Any) -> Optional[str]:
    if not isinstance(module, Linear8bitLt):
        return "the checkpoint holds an int8 weight for a layer that int8fx keeps in floating point (skip_modules)"
    if weight is None:
        return "the checkpoint has 'SCB' but no 'weight'"
    if tuple(weight.shape) != (module.out_features, module.in_features):
        return f"weight has shape {tuple(weight.shape)}, expected {(module.out_features, module.in_features)}"
    return checkpoint_error(module, weight, SCB, weight_format)


def _warn_unmatched_skips(skip_modules: Optional[list[str]], model: nn.Module) -> None:
    """A skip entry that keeps no linear in fp is a typo or a wrong prefix: say so."""
    if not skip_modules:
        return
    linears = [path for path, module in model.named_modules() if type(module) is nn.Linear]
    for pattern in skip_modules:
        if all(should_convert_module(path, [pattern]) for path in linears):
            log.warning("int8fx: skip_modules entry %r matches no linear layer of %s", pattern, type(model).__name__)


def _dequantized_linear(module: Linear8bitLt, dtype: Optional[torch.dtype]) -> nn.Linear:
    weight = module.weight
    dtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(reference.dequantize_rows(weight, weight.SCB).to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return linear
