"""Compute kernels behind the ``int8fx`` ops, one folder per device.

* ``cpu/``: a C++ library (activation quantization, exact int8 GEMMs for AVX2, AVX-512
  VNNI and AMX, the fused epilogue) that registers itself as the ops' CPU kernel, and
  ``torch_path`` where it cannot be built;
* ``cuda/``: Triton kernels.
"""
