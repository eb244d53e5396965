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


# ---------------------------------------------------------------- fused quantization and epilogue

def assert_matches_reference_quantization(x: torch.Tensor, threshold: float) -> None:
    CA, SCA, index = cpu_int8_gemm.quantize_rows(x, threshold)
    (ref_CA, ref_SCA), columns = reference.quantize_activation(x, threshold)
    assert torch.equal(CA, ref_CA)
    assert torch.equal(SCA, ref_SCA) or torch.allclose(SCA, ref_SCA, equal_nan=True, rtol=0, atol=0)
    if columns.any():
        assert torch.equal(index, columns.nonzero().flatten())
    else:
        assert index is None


@needs_kernel
@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.5])
@pytest.mark.parametrize("M, K", [(0, 16), (1, 576), (3, 0), (5, 37), (17, 1536), (64, 100)])
def test_quantize_rows_matches_reference(M, K, threshold):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M * 1000 + K)) * 3
    assert_matches_reference_quantization(x, threshold)


@needs_kernel
def test_quantize_rows_ties_round_half_to_even():
    # absmax 127 makes the inverse scale exactly 1: every x.5 is a tie, in the vector body
    # (first 32) and the scalar tail.
    halves = torch.arange(-126.5, 127.0, 1.0)
    x = torch.cat([halves, torch.tensor([127.0])]).repeat(2, 1)[:, :37].contiguous()
    x[:, 0] = 127.0
    assert_matches_reference_quantization(x, 0.0)
    CA, _, _ = cpu_int8_gemm.quantize_rows(x, 0.0)
    assert CA[0, 1:5].tolist() == [-126, -124, -124, -122]  # -125.5, -124.5, -123.5, -122.5


@needs_kernel
def test_quantize_rows_threshold_compared_in_fp32():
    # 6.1 in fp32 is below 6.1 in double: the element is an outlier in fp32, as in torch.
    x = torch.ones(2, 40)
    x[0, 3] = 6.1
    x[1, 35] = 6.0
    for threshold in (6.1, 6.0):
        assert_matches_reference_quantization(x, threshold)
    assert cpu_int8_gemm.quantize_rows(x, 6.1)[2].tolist() == [3]
    assert cpu_int8_gemm.quantize_rows(x, 6.0)[2].tolist() == [3, 35]


@needs_kernel
def test_quantize_rows_zero_rows_and_all_outlier_columns():
    x = torch.zeros(4, 40)
    x[1] = 7.0  # every column is an outlier column: every row scale is 0, all of CA is 0
    assert_matches_reference_quantization(x, 6.0)
    CA, SCA, index = cpu_int8_gemm.quantize_rows(x, 6.0)
    assert not CA.any() and not SCA.any() and index.tolist() == list(range(40))


@needs_kernel
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("column", [5, 36])  # vector body, scalar tail
def test_quantize_rows_nan_and_inf(threshold, column):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    x[1, column] = float("nan")
    x[2, column] = float("inf")
    assert_matches_reference_quantization(x, threshold)
    _, SCA, _ = cpu_int8_gemm.quantize_rows(x, threshold)
    assert torch.isnan(SCA[1]) and torch.isfinite(SCA[0])


@needs_kernel
def test_quantize_rows_subnormal_scale_and_other_dtypes():
    x = torch.zeros(2, 40)
    x[0, 7] = 1e-45  # 1 / absmax is inf: zeros become NaN products, quantized to 0 like torch
    assert_matches_reference_quantization(x, 6.0)
    y = torch.randn(5, 33, dtype=torch.bfloat16) * 4
    assert_matches_reference_quantization(y, 6.0)
    assert_matches_reference_quantization(y.t(), 6.0)  # non-contiguous


@needs_kernel
@pytest.mark.parametrize("M, N", [(0, 8), (1, 1536), (5, 37), (16, 576)])
def test_dequantize_matches_reference(M, N):
    generator = torch.Generator().manual_seed(N)
    C32 = torch.randint(-(2**24), 2**24, (M, N), generator=generator, dtype=torch.int32)
    SCA, SCB, bias = torch.rand(M, generator=generator) * 10, torch.rand(N, generator=generator), torch.randn(N, generator=generator)
    expected = reference.dequantize_output(C32, SCA, SCB)
    assert torch.equal(cpu_int8_gemm.dequantize(C32, SCA, SCB), expected)
    assert torch.equal(cpu_int8_gemm.dequantize(C32, SCA, SCB, bias), expected + bias)
