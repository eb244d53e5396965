"""Compute kernels behind the ``int8fx`` ops: one file per kernel.

``cpu_int8_linear`` is the CPU path (``torch._int_mm``); the Triton kernels for CUDA
live beside it.
"""
