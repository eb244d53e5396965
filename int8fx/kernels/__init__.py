"""Compute kernels behind the ``int8fx`` ops: one file per kernel.

``cpu_int8_linear`` is the CPU path (its int8 GEMM: ``cpu_int8_gemm``, an AVX2 C++
kernel built on first use, or ``torch._int_mm``); the Triton kernels for CUDA live
beside it.
"""
