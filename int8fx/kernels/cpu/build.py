"""Compiles the C++ CPU kernels of this folder into one library, once per torch version.

``torch.utils.cpp_extension`` builds it on first use (about 30 s on 2 cores, then cached in
torch's extension directory, in a folder per torch version: the library links against
libtorch, so a build for another torch must not be reused). Later processes only load it.

A build killed midway (Ctrl-C, a machine restart) leaves torch's lock file behind, and
torch would wait on it forever; ``_exclusive_build`` removes it (see there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

log = logging.getLogger("int8fx")

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [
    os.path.join(_HERE, name)
    for name in (
        "isa.cpp",
        "quantize.cpp",
        "quantize_avx512.cpp",
        "outliers.cpp",
        "outlier_cache.cpp",
        "gemm.cpp",
        "gemm_avx2.cpp",
        "gemm_avx512.cpp",
        "gemm_amx.cpp",
        "linear_op.cpp",
    )
]
LIBRARY_NAME = "int8fx_cpu_kernels"
# The baseline every file is compiled for; wider instruction sets are switched on per file
# (kernels.h) and only called where the CPU has them. No contraction of a multiply and an add
# into one FMA: every kernel's epilogue must round as reference.py's separate operations do
# (GCC contracts vector intrinsics by default wherever it can fuse them).
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
_BUILD_WAIT_S = 600.0  # how long to wait for another process's build before giving up on it


def build_directory(name: str = LIBRARY_NAME) -> str:
    """Where ``name`` is built: torch's extension root, one folder per torch version."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    directory = os.path.join(root, "int8fx-torch-" + torch.__version__.replace("+", "-"), name)
    os.makedirs(directory, exist_ok=True)
    return directory


@contextlib.contextmanager
def exclusive_build(directory: str, wait_s: float = _BUILD_WAIT_S):
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


def compile_library() -> str:
    """Path of the built shared library; raises whatever the build raises."""
    from torch.utils import cpp_extension

    directory = build_directory()
    with exclusive_build(directory):
        return cpp_extension.load(
            name=LIBRARY_NAME,
            sources=SOURCES,
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=directory,
            is_python_module=False,
        )
