"""The AVX2 int8 GEMM (``kernels/cpu_int8_gemm``) and the CPU dispatch ``int8_matmul``.

Every result must equal ``reference.int8_matmul`` exactly: the GEMM is integer arithmetic.
The first test in a fresh cache compiles the kernel (a few seconds).
"""

from __future__ import annotations

import logging

import pytest
import torch

from int8fx import reference
from int8fx.kernels import cpu_int8_gemm, cpu_int8_linear

needs_kernel = pytest.mark.skipif(cpu_int8_gemm._build() is None, reason="needs AVX2 and a C++ compiler")


def random_int8(*shape: int, seed: int, low: int = -127) -> torch.Tensor:
    return torch.randint(low, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.fixture
def fresh_caches():
    """Re-run the availability checks under the test's patches; restore them afterwards."""
    cpu_int8_gemm._build.cache_clear()
    cpu_int8_gemm.is_available.cache_clear()
    yield
    cpu_int8_gemm._build.cache_clear()
    cpu_int8_gemm.is_available.cache_clear()


# ---------------------------------------------------------------- exactness

@needs_kernel
@pytest.mark.parametrize("K", [1, 7, 31, 33, 100, 300, 2081])
def test_matches_reference_on_odd_shapes(K):
    # K around the 32-byte vector step; M and N around the 2 x 4 and 1 x 8 tiles. At
    # K = 2081, N = 129 spans two L2 blocks of B rows, so two threads share the work.
    for M in (0, 1, 3, 17, 64):
        for N in (1, 5, 64, 129):
            CA, CB = random_int8(M, K, seed=M * K + N, low=-128), random_int8(N, K, seed=N)
            assert torch.equal(cpu_int8_gemm.int8_gemm(CA, CB), reference.int8_matmul(CA, CB)), (M, K, N)


@needs_kernel
def test_many_blocks():
    CA, CB = random_int8(5, 4096, seed=0), random_int8(300, 4096, seed=1)  # 64-row blocks of B
    assert torch.equal(cpu_int8_gemm.int8_gemm(CA, CB), reference.int8_matmul(CA, CB))


@needs_kernel
@pytest.mark.parametrize("a, b", [(127, 127), (-127, 127), (-128, 127), (-128, -127), (127, -127)])
def test_extreme_values(a, b):
    # 2081 * 128 * 127 > 2**24: an fp32 accumulation would round; int16 pair sums are at
    # their largest (2 * 128 * 127), just below saturation.
    M, K, N = 3, 2081, 9
    CA, CB = torch.full((M, K), a, dtype=torch.int8), torch.full((N, K), b, dtype=torch.int8)
    expected = torch.full((M, N), a * b * K, dtype=torch.int32)
    assert abs(a * b * K) > 2**24
    assert torch.equal(cpu_int8_gemm.int8_gemm(CA, CB), expected)


@needs_kernel
def test_alternating_signs():
    # Signs that flip within each pair of products exercise the sign trick.
    K = 300
    pattern = torch.tensor([127, -127, -128, 1, 0, -1], dtype=torch.int8).repeat(K // 6)
    CA = torch.stack([pattern, pattern.roll(1), -pattern.clamp(min=-127)])
    CB = torch.stack([pattern.clamp(min=-127), pattern.roll(3).clamp(min=-127)])
    assert torch.equal(cpu_int8_gemm.int8_gemm(CA, CB), reference.int8_matmul(CA, CB))


@needs_kernel
def test_non_contiguous_inputs():
    CA = random_int8(100, 17, seed=0).t()  # [17, 100], column-major
    CB = random_int8(64, 200, seed=1)[:, ::2]  # [64, 100], row stride 200
    assert not CA.is_contiguous() and not CB.is_contiguous()
    expected = reference.int8_matmul(CA, CB)
    assert torch.equal(cpu_int8_gemm.int8_gemm(CA, CB), expected)
    assert torch.equal(cpu_int8_linear.int8_matmul(CA, CB), expected)


@needs_kernel
def test_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="do not chain"):
        cpu_int8_gemm.int8_gemm(random_int8(2, 8, seed=0), random_int8(3, 9, seed=1))


# ---------------------------------------------------------------- dispatch and fallback

def test_dispatch_uses_kernel_when_available(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_int8_gemm, "is_available", lambda: True)
    monkeypatch.setattr(cpu_int8_gemm, "int8_gemm", lambda CA, CB: calls.append(1) or reference.int8_matmul(CA, CB))
    cpu_int8_linear.int8_matmul(random_int8(2, 8, seed=0), random_int8(3, 8, seed=1))
    assert calls == [1]


def test_fallback_to_int_mm(monkeypatch):
    monkeypatch.setattr(cpu_int8_gemm, "is_available", lambda: False)
    monkeypatch.setattr(cpu_int8_gemm, "int8_gemm", lambda CA, CB: pytest.fail("the kernel must not run"))
    CA, CB = random_int8(17, 33, seed=0), random_int8(5, 33, seed=1)
    assert torch.equal(cpu_int8_linear.int8_matmul(CA, CB), reference.int8_matmul(CA, CB))


def test_vnni_cpu_keeps_int_mm(monkeypatch, fresh_caches, caplog):
    monkeypatch.setattr(cpu_int8_gemm, "_cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    with caplog.at_level(logging.INFO, logger="int8fx"):
        assert not cpu_int8_gemm.is_available()
        assert not cpu_int8_gemm.is_available()  # logged once
    assert len([r for r in caplog.records if "VNNI" in r.getMessage()]) == 1


def test_no_avx2_falls_back(monkeypatch, fresh_caches, caplog):
    monkeypatch.setattr(cpu_int8_gemm, "_cpu_flags", lambda: frozenset())
    with caplog.at_level(logging.INFO, logger="int8fx"):
        assert not cpu_int8_gemm.is_available()
    assert "no AVX2" in caplog.text


def test_failed_build_falls_back(monkeypatch, fresh_caches, caplog):
    from torch.utils import cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_int8_gemm, "_cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    with caplog.at_level(logging.WARNING, logger="int8fx"):
        assert not cpu_int8_gemm.is_available()
        x = torch.randn(3, 16)
        CB, SCB = reference.quantize_weight(torch.randn(4, 16))
        out = cpu_int8_linear.int8_linear(x, CB, SCB, None, 6.0, None)
    assert "could not build" in caplog.text
    assert torch.equal(out, reference.int8_linear(x, CB, SCB, None, 6.0))
