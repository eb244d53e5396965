"""``python -m int8fx env``: what int8fx runs on this machine, for bug reports and new hardware.

One table: versions, the CPU and the instruction sets that matter to int8 kernels, whether the
CPU library loaded (and why not), its kernels, the AMX self-check, the kernel the dispatch picks
for typical shapes, and the GPUs. Nothing is timed; loading the CPU library may build it first.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from typing import Optional

import torch

import int8fx

# (M, K) pairs whose dispatch is shown: decode and prefill on a small and a Llama-sized layer.
DISPATCH_SHAPES = ((1, 4096), (16, 4096), (128, 4096), (512, 576))
PEERS = ("triton", "transformers", "accelerate", "peft", "bitsandbytes", "torchao")


def installed_version(package: str) -> Optional[str]:
    """The installed distribution's version, without importing it (some import slowly)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_cpu_library() -> tuple[bool, list[str]]:
    """``kernels.cpu.load()`` with what it logged (why it did not load, or which kernels did)."""
    from int8fx.kernels import cpu

    logger, handler = logging.getLogger("int8fx"), _Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return cpu.load(), handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def cpu_rows() -> list[tuple[str, str]]:
    from int8fx.kernels import cpu

    rows = [
        ("CPU", f"{cpu.cpu_model()} ({platform.machine()}), {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads"),
        ("CPU instruction sets", " ".join(cpu.isa_flags()) or "none of " + ", ".join(cpu.ISA_FLAGS)),
        (cpu.MAX_ISA_VARIABLE, os.environ.get(cpu.MAX_ISA_VARIABLE) or "unset (no cap)"),
    ]
    loaded, messages = load_cpu_library()
    if not loaded:
        why = "; ".join(message.removeprefix("int8fx: ") for message in messages) or "see the int8fx log"
        return rows + [("CPU library", f"not loaded ({why})")]
    rows += [
        ("CPU library", "loaded"),
        ("CPU kernels", ", ".join(cpu.kernels())),
        ("AMX self-check", cpu.amx_self_check()),
    ]
    rows += [(f"CPU dispatch, M = {M}, K = {K}", cpu.chosen_kernel(M, K)) for M, K in DISPATCH_SHAPES]
    return rows


def gpu_rows() -> list[tuple[str, str]]:
    if not torch.cuda.is_available():
        build = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build of torch"
        return [("CUDA", f"not available ({build})")]
    rows = [("CUDA", f"{torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}")]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability, memory_gib = f"{props.major}.{props.minor}", props.total_memory / 2**30
        described = f"{props.name}, compute capability {capability}, {memory_gib:.0f} GiB, {props.multi_processor_count} SMs"
        rows.append((f"cuda:{index}", described))
    return rows


def environment_rows() -> list[tuple[str, str]]:
    """Every row of the ``env`` table, as (what, value)."""
    rows = [
        ("int8fx", int8fx.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]
    rows += [(package, installed_version(package) or "not installed") for package in PEERS]
    if os.environ.get("TRITON_INTERPRET") == "1":
        rows.append(("TRITON_INTERPRET", "1: Triton kernels run in the CPU interpreter"))
    return rows + cpu_rows() + gpu_rows()


def print_environment() -> int:
    rows = environment_rows()
    width = max(len(what) for what, _ in rows)
    for what, value in rows:
        print(f"{what:<{width}}  {value}")
    return 0
