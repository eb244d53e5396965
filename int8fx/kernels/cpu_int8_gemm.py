"""Exact int8 GEMM for AVX2 CPUs without VNNI (``cpu_int8_gemm.cpp``), built on first use,
and the fused activation quantization that feeds it (``quantize_rows``).

Without AVX512-VNNI, AVX-VNNI or AMX, ``torch._int_mm`` on CPU falls back to a naive
loop: on a 2-core AVX2 EPYC (Zen 3) it is slower than an fp32 matmul at every M, and
this kernel is 14-46x faster than it, 1.2-5x faster than fp32 on the Llama shapes
(see ``benchmarks/README.md``). CPUs with VNNI or AMX keep
``torch._int_mm``: oneDNN's VNNI kernels are reported 3-5x faster than fp32 there, and
this kernel has not been measured on such a CPU.

The kernel is compiled once, on the first call, with ``torch.utils.cpp_extension``
(``-O3 -mavx2 -mfma -fopenmp``; cached in torch's extension directory, so later processes
only load it) and called through ``ctypes``: the source includes only ``ATen/Parallel.h``
(for torch's thread pool), which keeps the compile to about 3 s. No compiler, no
AVX2, or a failed build: one log line on the ``int8fx`` logger and ``is_available()`` is
False, so callers use ``torch._int_mm``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger("int8fx")

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_int8_gemm.cpp")
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo names


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
def _build() -> Optional[ctypes.CDLL]:
    """Builds (or loads the cached build of) the kernels; None without AVX2 or when the build fails."""
    if "avx2" not in _cpu_flags():
        log.info("int8fx: no AVX2 on this CPU; the CPU int8 GEMM is torch._int_mm")
        return None
    try:
        from torch.utils import cpp_extension

        path = cpp_extension.load(
            name="int8fx_cpu_int8_gemm",
            sources=[_SOURCE],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
        library = ctypes.CDLL(path)
        gemm, quantize, dequantize = library.int8fx_int8_gemm, library.int8fx_quantize_rows, library.int8fx_dequantize
    except Exception as error:  # no compiler, failed build: fall back, never fail
        log.warning("int8fx: could not build the AVX2 int8 GEMM (%s: %s); using torch._int_mm", type(error).__name__, error)
        return None
    gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    gemm.restype = None
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_float] + [ctypes.c_void_p] * 3
    quantize.restype = ctypes.c_int64
    dequantize.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
    dequantize.restype = None
    return library


@functools.cache
def is_available() -> bool:
    """True when this kernel should replace ``torch._int_mm``: AVX2, no VNNI/AMX, and it builds."""
    if _cpu_flags() & _VNNI_FLAGS:
        log.info("int8fx: CPU has VNNI/AMX; the CPU int8 GEMM is torch._int_mm (oneDNN)")
        return False
    return _build() is not None


def int8_gemm(CA: Tensor, CB: Tensor) -> Tensor:
    """Exact ``CA [M, K] @ CB [N, K].T`` as int32 ``[M, N]``; needs AVX2 and a compiler.

    ``CB`` must not hold -128 (the exactness argument in the .cpp needs ``|b| <= 127``);
    ``quantize_weight`` and bitsandbytes' ``Int8Params`` clamp to [-127, 127]. ``CA`` may
    be any int8. Inputs need not be contiguous.
    """
    torch._check(CA.dtype == torch.int8 and CB.dtype == torch.int8, lambda: f"int8 inputs expected, got {CA.dtype} and {CB.dtype}")
    torch._check(CA.dim() == 2 and CB.dim() == 2 and CA.shape[1] == CB.shape[1], lambda: f"shapes {tuple(CA.shape)} and {tuple(CB.shape)} do not chain")
    torch._check(CA.device.type == "cpu" and CB.device.type == "cpu", lambda: "CPU tensors expected")
    library = _build()
    torch._check(library is not None, lambda: "the AVX2 int8 GEMM is not available on this machine")
    CA, CB = CA.contiguous(), CB.contiguous()
    (M, K), N = CA.shape, CB.shape[0]
    out = torch.empty((M, N), dtype=torch.int32)
    library.int8fx_int8_gemm(CA.data_ptr(), CB.data_ptr(), out.data_ptr(), M, N, K)
    return out


def quantize_rows(x2d: Tensor, threshold: float) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``reference.quantize_activation`` in one fused pass pair, bit-exact; needs AVX2 and a compiler.

    Returns ``CA`` int8 ``[M, K]``, ``SCA`` fp32 ``[M]`` and the outlier column indices
    (int64, ascending), or None when there is no outlier column. ``x2d`` is converted to
    contiguous fp32 first (exact for fp16/bf16), as the reference does with ``.float()``.
    """
    torch._check(x2d.dim() == 2 and x2d.device.type == "cpu", lambda: f"a 2-D CPU tensor expected, got {tuple(x2d.shape)} on {x2d.device}")
    library = _build()
    torch._check(library is not None, lambda: "the AVX2 int8 kernels are not available on this machine")
    x32 = x2d.float().contiguous()
    M, K = x32.shape
    CA = torch.empty((M, K), dtype=torch.int8)
    SCA = torch.empty(M, dtype=torch.float32)
    is_outlier = torch.zeros(K, dtype=torch.bool)
    count = library.int8fx_quantize_rows(x32.data_ptr(), M, K, threshold > 0, threshold, CA.data_ptr(), SCA.data_ptr(), is_outlier.data_ptr())
    return CA, SCA, is_outlier.nonzero().flatten() if count else None


def dequantize(C32: Tensor, SCA: Tensor, SCB: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``C32.float() * (SCA[:, None] * SCB[None, :]) / 127**2 (+ bias.float())`` in fp32, bit-exact; needs AVX2.

    Takes contiguous int32 ``C32 [M, N]`` and fp32 ``SCA [M]``, ``SCB [N]``; ``bias`` is
    converted to contiguous fp32.
    """
    library = _build()
    torch._check(library is not None, lambda: "the AVX2 int8 kernels are not available on this machine")
    torch._check(C32.dtype == torch.int32 and C32.is_contiguous() and SCA.dtype == torch.float32 and SCB.dtype == torch.float32, lambda: "contiguous int32 C32 and fp32 scales expected")
    M, N = C32.shape
    SCA, SCB = SCA.contiguous(), SCB.contiguous()
    bias = None if bias is None else bias.float().contiguous()
    out = torch.empty((M, N), dtype=torch.float32)
    library.int8fx_dequantize(C32.data_ptr(), SCA.data_ptr(), SCB.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), M, N)
    return out
