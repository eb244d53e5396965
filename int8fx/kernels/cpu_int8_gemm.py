"""AVX2 int8 kernels for CPUs without VNNI (``cpu_int8_gemm.cpp``), built on first use.

Without AVX512-VNNI, AVX-VNNI or AMX, ``torch._int_mm`` on CPU falls back to a naive
loop: on a 2-core AVX2 EPYC (Zen 3) it is slower than an fp32 matmul at every M, and
the exact GEMM here is 5-40x faster than it (see ``benchmarks/README.md``). CPUs with
VNNI or AMX keep ``torch._int_mm``: oneDNN's VNNI kernels are reported 3-5x faster than
fp32 there, and these kernels have not been measured on such a CPU.

Two libraries, compiled once with ``torch.utils.cpp_extension`` (cached in torch's
extension directory, one folder per torch version, so later processes only load them):

* the kernels alone, for ``ctypes`` (``int8_gemm``, ``quantize_rows``: tests and
  benchmarks); the source includes only ``ATen/Parallel.h``, a ~3 s compile;
* the same kernels plus ``cpu_int8_linear_op.cpp``, which registers the fused linear as
  the CPU kernel of ``int8fx::int8_linear`` (~15 s: torch's headers). It is loaded only
  by ``is_available()``, i.e. only where it should replace the ``torch._int_mm`` path.

A build killed midway (Ctrl-C, a machine restart) leaves torch's lock file behind, and
torch would wait on it forever; ``_exclusive_build`` removes it (see there).

No compiler, no AVX2, or a failed build: one log line on the ``int8fx`` logger and
``is_available()`` is False, so ``int8_linear`` stays on ``torch._int_mm``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import time
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger("int8fx")

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = os.path.join(_HERE, "cpu_int8_gemm.cpp")
_OP = os.path.join(_HERE, "cpu_int8_linear_op.cpp")
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo names
_BUILD_WAIT_S = 600.0  # how long to wait for another process's build before giving up on it


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


def _build_directory(name: str) -> str:
    """Where ``name`` is built: torch's extension root, one folder per torch version.

    The op library links against libtorch, so a build for another torch must not be reused.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    directory = os.path.join(root, "int8fx-torch-" + torch.__version__.replace("+", "-"), name)
    os.makedirs(directory, exist_ok=True)
    return directory


@contextlib.contextmanager
def _exclusive_build(directory: str, wait_s: float = _BUILD_WAIT_S):
    """Holds an OS file lock over a build in ``directory``; raises TimeoutError after ``wait_s``.

    torch's own lock is a file that exists while a build runs (``FileBaton``): a process
    killed mid-build leaves it, and every later ``load`` waits on it forever. An ``flock``
    is released by the kernel when its holder dies, so under ours a torch lock file left
    in the directory is stale: it is removed. Without ``fcntl`` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(directory, "int8fx.lock"), "w") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building in {directory} for over {wait_s:.0f} s") from None
                time.sleep(0.5)
        stale = os.path.join(directory, "lock")  # the name torch's FileBaton uses
        if os.path.exists(stale):
            log.info("int8fx: removing a lock file left by an interrupted build: %s", stale)
            os.remove(stale)
        yield  # closing the file releases the lock


def _compile(name: str, sources: list[str]) -> Optional[str]:
    """Path of the built shared library; None (logged) without AVX2 or when the build fails."""
    if "avx2" not in _cpu_flags():
        log.info("int8fx: no AVX2 on this CPU; the CPU int8 GEMM is torch._int_mm")
        return None
    try:
        from torch.utils import cpp_extension

        directory = _build_directory(name)
        with _exclusive_build(directory):
            return cpp_extension.load(
                name=name, sources=sources, extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                build_directory=directory, is_python_module=False,
            )
    except Exception as error:  # no compiler, failed build, a build that never ends: fall back, never fail
        log.warning("int8fx: could not build the AVX2 int8 kernels (%s: %s); using torch._int_mm", type(error).__name__, error)
        return None


@functools.cache
def _build() -> Optional[ctypes.CDLL]:
    """The kernels for ``ctypes`` (no op registration); None where they cannot be built."""
    path = _compile("int8fx_cpu_int8_gemm", [_KERNELS])
    if path is None:
        return None
    library = ctypes.CDLL(path)
    library.int8fx_int8_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    library.int8fx_int8_gemm.restype = None
    quantize = library.int8fx_quantize_rows
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_float] + [ctypes.c_void_p] * 3
    quantize.restype = ctypes.c_int64
    return library


@functools.cache
def is_available() -> bool:
    """True when the AVX2 kernels replace ``torch._int_mm``: AVX2, no VNNI/AMX, and they build.

    The first True also registers the fused kernel as ``int8fx::int8_linear``'s CPU kernel.
    """
    if _cpu_flags() & _VNNI_FLAGS:
        log.info("int8fx: CPU has VNNI/AMX; the CPU int8 GEMM is torch._int_mm (oneDNN)")
        return False
    path = _compile("int8fx_cpu_int8_linear_op", [_KERNELS, _OP])
    if path is None:
        return False
    torch.ops.load_library(path)
    return True


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
    torch._check(library is not None, lambda: "the AVX2 int8 kernels are not available on this machine")
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


def int8_linear(x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float, weight: Optional[Tensor]) -> Tensor:
    """``reference.int8_linear`` by the C++ CPU kernel (``cpu_int8_linear_op.cpp``); needs ``is_available()``.

    ``CA``, ``SCA``, ``C32`` and the dequantization are bit-exact with the reference; the
    outlier part is accumulated in fp32 (the reference uses the input's dtype).
    """
    torch._check(is_available(), lambda: "the AVX2 int8 kernels are not available on this machine")
    # Straight to the CPU kernel: the Python kernel that calls this one sits at the
    # CompositeExplicitAutograd key, which also fills the CPU slot until the C++ kernel
    # is registered.
    return torch.ops.int8fx.int8_linear.default.redispatch(_CPU_KEYSET, x, CB, SCB, bias, threshold, weight)


_CPU_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
