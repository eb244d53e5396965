"""CPU kernels of the int8fx ops: one C++ library, the int8 GEMM chosen per CPU.

The library (this folder's ``.cpp`` files, built by ``build.py`` on first use) holds
the fused LLM.int8() linear: activation quantization with outlier columns, the fp outlier
part, and an exact int8 GEMM whose tiles dequantize, add the outlier part and the bias as
they finish. Loading it registers that linear as ``int8fx::int8_linear``'s CPU kernel,
so a compiled graph's call goes from the dispatcher straight to C++.

The GEMM kernel is chosen once per process from CPUID (``isa.cpp``), per call by the shape
(``linear_op.cpp``'s ``choose_gemm``, with the measurements behind it):

======================  ==========================================  ===============================
kernel                  needs                                       used for
======================  ==========================================  ===============================
``amx``                 AMX-INT8 (Sapphire Rapids and later)        M >= 4, if its self-check passed
``avx512_vnni_panels``  AVX-512 F/BW/VL + VNNI (Zen 4, Ice Lake+)   M >= 12, or >= 32 if K >= 1024
``avx512_vnni``         the same                                    fewer rows (decode)
``avx2``                AVX2 (Zen 3, Haswell+)                      every M where there is no VNNI
``onednn``              ``torch._int_mm``                           never chosen; for comparisons
======================  ==========================================  ===============================

Every kernel is exact int32 arithmetic, bit-identical with ``reference.int8_matmul``.
The activation quantizer (``quantize.cpp``) runs in AVX-512 (``quantize_avx512.cpp``) where
the VNNI kernels run, in AVX2 elsewhere (``chosen_quantizer()``); both give the same bits.

The weight columns the outlier part reads (the fp weight's, or ``CB``'s) are kept contiguous
from call to call (``outlier_cache.cpp``: real activations put their outliers in the same few
columns token after token); ``outlier_cache_stats()`` says what is kept, ``clear_outlier_cache()``
drops it.

Where the library cannot be built or loaded (no compiler, no AVX2), ``load()`` logs why
and returns False, and the op runs ``torch_path`` (the reference's steps around
``torch._int_mm``).

The environment variable ``INT8FX_MAX_CPU_ISA`` (``none``, ``avx2``, ``avx512_vnni`` or
``amx``, read once per process) caps what the library uses, like oneDNN's
``ONEDNN_MAX_CPU_ISA``: ``avx2`` runs a newer CPU as an AVX2-only one (the test suite of
that machine kind), ``none`` leaves the library unloaded (the torch path).

The functions below are for tests and benchmarks: they call a named kernel directly.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from typing import Optional

import torch
from torch import Tensor

from int8fx.kernels.cpu import build, torch_path  # noqa: F401  (torch_path: the fallback ops.py runs)

log = logging.getLogger("int8fx")

KERNELS = ("amx", "avx512_vnni_panels", "avx512_vnni", "avx2")  # best first

MAX_ISA_VARIABLE = "INT8FX_MAX_CPU_ISA"
ISA_LEVELS = ("none", "avx2", "avx512_vnni", "amx")  # each allows what the ones before it do


def isa_cap() -> Optional[str]:
    """The level ``INT8FX_MAX_CPU_ISA`` caps the library at (one of ``ISA_LEVELS``), or None.

    An unknown value caps nothing; ``load()`` logs a warning about it (``isa.cpp`` ignores it too).
    """
    cap = os.environ.get(MAX_ISA_VARIABLE)
    return cap if cap in ISA_LEVELS else None


def isa_allowed(level: str) -> bool:
    """Whether the cap (if any) lets the library use ``level``'s instructions."""
    cap = isa_cap()
    return cap is None or ISA_LEVELS.index(level) <= ISA_LEVELS.index(cap)


# The CPU features that matter to int8 kernels and to their fp peers, as /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows (not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def isa_flags() -> list[str]:
    """The ``ISA_FLAGS`` this CPU has, in that order (what benchmark headers and reports show)."""
    flags = _cpu_flags()
    return [flag for flag in ISA_FLAGS if flag in flags]


def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags from ``/proc/cpuinfo``; empty where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def load() -> bool:
    """Builds (first time) and loads the library once per process; False, logged, where it cannot.

    Loading registers the C++ kernel at ``int8fx::int8_linear``'s CPU key.
    """
    requested = os.environ.get(MAX_ISA_VARIABLE)
    if requested and isa_cap() is None:  # empty: unset
        log.warning("int8fx: %s=%r is not one of %s; ignored", MAX_ISA_VARIABLE, requested, ", ".join(ISA_LEVELS))
    if not isa_allowed("avx2"):
        log.info("int8fx: %s=none: the CPU int8 GEMM is torch._int_mm", MAX_ISA_VARIABLE)
        return False
    # The library's baseline is AVX2: on a CPU without it, even loading could fault.
    if "avx2" not in _cpu_flags():
        log.info("int8fx: no AVX2 on this CPU; the CPU int8 GEMM is torch._int_mm")
        return False
    try:
        path = build.compile_library()
        torch.ops.load_library(path)
    except Exception as error:  # no compiler, failed build, a build that never ends: fall back, never fail
        log.warning("int8fx: could not build the CPU int8 kernels (%s: %s); using torch._int_mm", type(error).__name__, error)
        return False
    names = _loaded_kernels()
    log.info("int8fx: CPU int8 kernels loaded: %s", ", ".join(names))
    self_check = torch.ops.int8fx._cpu_amx_self_check()
    if self_check == "failed":
        log.warning(
            "int8fx: int8fx's AMX kernel failed its self-check on this CPU: it is not used (AVX-512 VNNI and oneDNN are); please report it"
        )
    elif self_check == "bf16 failed":
        log.warning(
            "int8fx: int8fx's AMX-BF16 outlier kernel failed its self-check on this CPU: it is not used (fp32 BLAS is); please report it"
        )
    return True


def kernels() -> tuple[str, ...]:
    """The GEMM kernels this CPU runs, best first; empty where the library is not loaded."""
    return _loaded_kernels() if load() else ()


def _loaded_kernels() -> tuple[str, ...]:
    return tuple(name for name in torch.ops.int8fx._cpu_kernels().split(",") if name)


def chosen_kernel(M: int, K: int) -> str:
    """The GEMM the op picks on this CPU for ``M`` rows of activations and ``K`` in_features."""
    _require_library()
    return torch.ops.int8fx._cpu_chosen_kernel(M, K)


def chosen_quantizer() -> str:
    """The activation quantizer the op uses on this CPU: ``"avx512"`` or ``"avx2"``."""
    _require_library()
    return torch.ops.int8fx._cpu_chosen_quantizer()


def amx_self_check() -> str:
    """``"no AMX"`` (CPU or OS), ``"passed"``, ``"failed"`` (the AMX kernel is not used) or
    ``"bf16 failed"`` (the AMX kernel is used, but not its AMX-BF16 outlier part)."""
    _require_library()
    return torch.ops.int8fx._cpu_amx_self_check()


def int8_gemm(CA: Tensor, CB: Tensor, kernel: str = "auto") -> Tensor:
    """Exact ``CA [M, K] @ CB [N, K].T`` as int32 ``[M, N]`` by ``kernel`` (a name of
    ``KERNELS``, ``"onednn"`` or ``"auto"``). ``CB`` must not hold -128; inputs need not be
    contiguous."""
    _require_library()
    return torch.ops.int8fx._cpu_int8_gemm(CA, CB, kernel)


def quantize_activation(x2d: Tensor, threshold: float, isa: str = "auto") -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``reference.quantize_activation`` by the library, bit-exact: ``CA`` int8 ``[M, K]``,
    ``SCA`` fp32 ``[M]`` and the outlier column indices (int64, ascending), or None.
    ``isa`` picks the quantizer's instruction set: ``"auto"`` (AVX-512 where the CPU has
    it), ``"avx2"`` or ``"avx512"``; all give the same bits."""
    _require_library()
    CA, SCA, columns = torch.ops.int8fx._cpu_quantize_activation(x2d, threshold, isa)
    return CA, SCA, columns if columns.numel() else None


def outlier_cache_stats() -> tuple[int, int, int]:
    """What the op keeps of the weight columns its outlier part reads (``outlier_cache.cpp``):
    ``(weights, columns, bytes)``, freed weights' entries dropped first."""
    _require_library()
    return tuple(torch.ops.int8fx._cpu_outlier_cache())


def clear_outlier_cache() -> None:
    """Forget every kept outlier column (they are read from the weights again as needed)."""
    _require_library()
    torch.ops.int8fx._cpu_clear_outlier_cache()


def int8_linear_cpu(
    x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float, weight: Optional[Tensor], kernel: str = "auto"
) -> Tensor:
    """The op's CPU kernel with its GEMM chosen by name (``"auto"``: as the op chooses)."""
    _require_library()
    return torch.ops.int8fx._cpu_int8_linear(x, CB, SCB, bias, threshold, weight, kernel)


def int8_linear_siblings_cpu(
    x: Tensor,
    CB: list[Tensor],
    SCB: list[Tensor],
    bias: list[Optional[Tensor]],
    threshold: float,
    weight: list[Optional[Tensor]],
    kernel: str = "auto",
) -> list[Tensor]:
    """``int8fx::int8_linear_siblings``' CPU kernel with its GEMM chosen by name."""
    _require_library()
    return torch.ops.int8fx._cpu_int8_linear_siblings(x, CB, SCB, bias, threshold, weight, kernel)


def _require_library() -> None:
    torch._check(load(), lambda: "the int8fx CPU kernels are not available on this machine (see the int8fx log)")
