"""Keep a streamed load's memory at the int8 model's size, not the fp checkpoint's.

transformers reads safetensors through a memory map: a weight is a view of the file, and its
pages count in the process's resident memory once read, for as long as the map lives. Quantizing
reads every weight, so without care the whole fp checkpoint ends up resident beside the int8
model (measured: 2.3x the fp32 model's memory after loading SmolLM2-135M). Three things keep it
near the int8 model's size:

* quantize in row blocks, so the fp32 temporaries stay a few MiB whatever the weight's size;
* hand the file pages of each weight back to the kernel once it is quantized;
* after the load, copy the fp tensors that remain views of the files (embeddings, norms, a
  skipped head) so that the maps close, and give the allocator's freed memory back (glibc).

Everything here is best effort: where the system offers no such call, memory stays as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import sys
from typing import Iterator

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

BLOCK_BYTES = 16 * 2**20  # fp32 bytes of one block of rows quantized at a time
_MADV_DONTNEED = 4  # Linux


def quantize_in_row_blocks(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``int8fx::quantize_weight`` of ``weight [N, K]``, a block of rows at a time.

    The quantization is per row, so the result is the same bytes as one call; the fp32
    temporaries are at most ``BLOCK_BYTES`` instead of several copies of the whole weight.
    """
    rows, columns = weight.shape
    block = max(1, BLOCK_BYTES // (4 * max(columns, 1)))
    if rows <= block:
        return torch.ops.int8fx.quantize_weight(weight)
    CB = torch.empty((rows, columns), dtype=torch.int8, device=weight.device)
    SCB = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, block):
        CB[start : start + block], SCB[start : start + block] = torch.ops.int8fx.quantize_weight(weight[start : start + block])
    return CB, SCB


def release_file_pages(tensor: Tensor) -> None:
    """Tell the kernel this process is done with the file pages under ``tensor``.

    Only for a CPU tensor that lies in a memory-mapped ``.safetensors`` file: there the pages
    are re-read from the file if touched again, so nothing can be lost. Anything else is left
    alone (on anonymous memory the same call would zero the data).
    """
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last <= first or not _in_safetensors_mapping(start, end):
        return
    libc = _libc()
    if libc is not None:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def detach_from_checkpoint_files(model: nn.Module) -> int:
    """Copy every parameter and buffer that is a view of a memory-mapped checkpoint file into
    memory of its own, so that the maps (and the file pages they keep resident) can go.
    Returns how many tensors were copied."""
    copied = 0
    mappings = _safetensors_mappings()
    for tensor in _parameters_and_buffers(model):
        if tensor.device.type == "cpu" and tensor.numel() and _inside(tensor.data_ptr(), tensor.data_ptr() + 1, mappings):
            view = tensor.data
            tensor.data = view.clone()
            release_file_pages(view)  # one tensor's file pages resident at a time, not the file's
            copied += 1
    return copied


def return_freed_memory() -> None:
    """glibc keeps large freed blocks for reuse; a load frees one fp weight after another."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(ctypes.c_size_t(0))


# ---------------------------------------------------------------- helpers


def _parameters_and_buffers(model: nn.Module) -> Iterator[Tensor]:
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def _in_safetensors_mapping(start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies inside one mapping of a ``.safetensors`` file (from /proc/self/maps)."""
    return _inside(start, end, _safetensors_mappings())


def _inside(start: int, end: int, mappings: list[tuple[int, int]]) -> bool:
    return any(low <= start and end <= high for low, high in mappings)


def _safetensors_mappings() -> list[tuple[int, int]]:
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            low, high = (int(address, 16) for address in fields[0].split("-"))
            mappings.append((low, high))
    return mappings


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        log.debug("int8fx: libc not found; the load keeps the memory the system gives it")
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
