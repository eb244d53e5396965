"""The AVX2 kernels (``kernels/cpu_int8_gemm``) and the CPU dispatch of ``cpu_int8_linear``.

Every GEMM result must equal ``reference.int8_matmul`` exactly: it is integer arithmetic.
The fused linear is bit-exact with the reference where no outlier part is involved.
The first test in a fresh cache compiles the kernel (a few seconds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys

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
    # K around the 32-byte vector step; M and N around the 2 x 6 and 1 x 8 tiles. At
    # K = 2081, N = 129 spans two L2 blocks of B rows, so two threads share the work.
    for M in (0, 1, 3, 17, 64):
        for N in (1, 5, 64, 129):
            CA, CB = random_int8(M, K, seed=M * K + N, low=-128), random_int8(N, K, seed=N)
            assert torch.equal(cpu_int8_gemm.int8_gemm(CA, CB), reference.int8_matmul(CA, CB)), (M, K, N)


@needs_kernel
@pytest.mark.parametrize("M", [1, 5, 130])
def test_many_blocks(M):
    # M < 16: the weight split evenly between the threads (blocks of at least 16 rows,
    # 64 KiB / K, not a multiple of the tiles); M = 130: tasks of 64 rows of A (64, 64, 2)
    # times 5 L2 blocks of B rows, shared unevenly by 1-3 threads.
    CA, CB = random_int8(M, 4096, seed=0), random_int8(300, 4096, seed=1)
    for threads in (1, 2, 3):
        with thread_count(threads):
            assert torch.equal(cpu_int8_gemm.int8_gemm(CA, CB), reference.int8_matmul(CA, CB))


@contextlib.contextmanager
def thread_count(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


@needs_kernel
def test_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="do not chain"):
        cpu_int8_gemm.int8_gemm(random_int8(2, 8, seed=0), random_int8(3, 9, seed=1))


# ---------------------------------------------------------------- dispatch and fallback

def test_dispatch_uses_kernel_when_available(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_int8_gemm, "is_available", lambda: True)
    monkeypatch.setattr(cpu_int8_gemm, "int8_linear", lambda x, CB, *args: calls.append(1) or torch.zeros(x.shape[0], CB.shape[0]))
    CB, SCB = reference.quantize_weight(torch.randn(3, 8))
    cpu_int8_linear.int8_linear(torch.randn(2, 8), CB, SCB, None, 6.0, None)
    assert calls == [1]


@needs_kernel
def test_op_calls_the_registered_cpp_kernel(monkeypatch):
    # Once registered, the op's CPU calls never reach the Python fallback.
    assert cpu_int8_gemm.is_available()
    monkeypatch.setattr(cpu_int8_linear, "int8_linear", lambda *args: pytest.fail("the Python CPU path ran"))
    x, weight, bias, CB, SCB = fused_case(3, 40, 8, (5,))
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, weight)
    assert torch.equal(y, cpu_int8_gemm.int8_linear(x, CB, SCB, bias, 6.0, weight))


def test_fallback_to_int_mm(monkeypatch):
    monkeypatch.setattr(cpu_int8_gemm, "is_available", lambda: False)
    monkeypatch.setattr(cpu_int8_gemm, "int8_linear", lambda *args: pytest.fail("the kernel must not run"))
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or int_mm(a, b))
    x = torch.randn(17, 33)
    CB, SCB = reference.quantize_weight(torch.randn(5, 33))
    assert torch.equal(cpu_int8_linear.int8_linear(x, CB, SCB, None, 0.0, None), reference.int8_linear(x, CB, SCB, None, 0.0))
    assert calls == [1]


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


@needs_kernel
def test_a_lock_left_by_a_killed_build_does_not_hang(tmp_path):
    # torch waits forever on a lock file a killed build left behind; int8fx removes it.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    script = "from int8fx.kernels import cpu_int8_gemm as k; d = k._build_directory('int8fx_cpu_int8_gemm'); open(d + '/lock', 'w').close()"
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    (stale,) = tmp_path.glob("*/int8fx_cpu_int8_gemm/lock")
    build = "from int8fx.kernels import cpu_int8_gemm as k; assert k._build() is not None"
    subprocess.run([sys.executable, "-c", build], env=env, check=True, timeout=300)  # hangs without the fix
    assert not stale.exists()


def test_a_build_running_elsewhere_is_waited_for_then_given_up(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    (tmp_path / "lock").touch()
    with open(tmp_path / "int8fx.lock", "w") as other_builder:
        fcntl.flock(other_builder, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="another process"):
            with cpu_int8_gemm._exclusive_build(str(tmp_path), wait_s=0.2):
                pass
        assert (tmp_path / "lock").exists()  # torch's lock belongs to the live build: kept
    with cpu_int8_gemm._exclusive_build(str(tmp_path), wait_s=0.2):
        assert not (tmp_path / "lock").exists()  # no builder alive: it was stale


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


# ---------------------------------------------------------------- fused linear

def fused_case(M, K, N, outlier_columns=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=generator) * 2
    for column in outlier_columns:
        x[:, column] = 20.0 * torch.sign(torch.randn(M, generator=generator))
    weight = torch.randn(N, K, generator=generator) / K**0.5
    bias = torch.randn(N, generator=generator)
    CB, SCB = reference.quantize_weight(weight)
    return x, weight, bias, CB, SCB


@needs_kernel
@pytest.mark.parametrize("M, K, N", [(0, 16, 8), (1, 576, 1536), (5, 37, 33), (16, 100, 576), (33, 64, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linear_without_outliers_is_bit_exact(M, K, N, with_bias):
    # Dequantization and bias in the GEMM's tiles follow the reference's fp32 rounding steps.
    x, weight, bias, CB, SCB = fused_case(M, K, N)
    bias = bias if with_bias else None
    for threshold in (0.0, 1e6):
        expected = reference.int8_linear(x, CB, SCB, bias, threshold, weight)
        assert torch.equal(cpu_int8_gemm.int8_linear(x, CB, SCB, bias, threshold, weight), expected)


def outlier_bound(x, source, columns, y_ref):
    """fp32 summation order of the outlier part (<= count * eps * sum |x_o w_o|) plus the final sum's rounding."""
    eps = torch.finfo(torch.float32).eps
    magnitude = x[:, columns].abs() @ source[:, columns].abs().t()
    return len(columns) * eps * magnitude + eps * y_ref.abs()


@needs_kernel
@pytest.mark.parametrize("fp_weight", [True, False])
@pytest.mark.parametrize("columns", [(3,), (0, 17, 39), tuple(range(0, 40, 2))])
@pytest.mark.parametrize("M", [9, 20])  # 20 rows and 20 columns: the outlier part goes to BLAS
def test_fused_linear_outlier_part(fp_weight, columns, M):
    x, weight, bias, CB, SCB = fused_case(M, 40, 24, columns)
    w = weight if fp_weight else None
    y = cpu_int8_gemm.int8_linear(x, CB, SCB, bias, 6.0, w)
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, w)
    source = weight if fp_weight else reference.dequantize_rows(CB, SCB)
    bound = outlier_bound(x, source, list(columns), y_ref)
    assert ((y - y_ref).abs() <= bound).all()
    # Dropping the outlier part, or taking the wrong weight columns, is far outside it.
    assert (reference.int8_linear(x, CB, SCB, bias, 6.0, None if fp_weight else weight) - y_ref).abs().max() > bound.max()


@needs_kernel
def test_fused_linear_strided_weight():
    # A Conv1D-style weight is a transposed view: the kernel reads its strides in place.
    x, weight, bias, CB, SCB = fused_case(6, 48, 20, (1, 5, 30))
    weight_view = weight.t().contiguous().t()
    assert not weight_view.is_contiguous()
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, weight)
    bound = outlier_bound(x, weight, [1, 5, 30], y_ref)
    assert ((cpu_int8_gemm.int8_linear(x, CB, SCB, bias, 6.0, weight_view) - y_ref).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("M, columns", [(6, (2, 40)), (16, tuple(range(1, 48, 5)))])  # loop, BLAS
def test_fused_linear_reads_other_weight_dtypes(dtype, M, columns):
    x, weight, bias, CB, SCB = fused_case(M, 48, 20, columns)
    weight = weight.to(dtype)
    y = cpu_int8_gemm.int8_linear(x, CB, SCB, bias, 6.0, weight)
    # The same columns as fp32 values: the kernel converts exactly, then works in fp32.
    y_fp32_weight = cpu_int8_gemm.int8_linear(x, CB, SCB, bias, 6.0, weight.float())
    assert torch.equal(y, y_fp32_weight)
    # ... and the weight's bits really are used (not the int8 columns).
    assert not torch.equal(y, cpu_int8_gemm.int8_linear(x, CB, SCB, bias, 6.0, None))


@needs_kernel
def test_fused_linear_every_column_an_outlier():
    x, weight, bias, CB, SCB = fused_case(4, 40, 9)
    x[0] = 7.0  # every column holds an outlier: the int8 part is all zero
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, weight)
    bound = outlier_bound(x, weight, list(range(40)), y_ref)
    assert ((cpu_int8_gemm.int8_linear(x, CB, SCB, bias, 6.0, weight) - y_ref).abs() <= bound).all()


@needs_kernel
def test_fused_linear_bf16_input():
    x, weight, bias, CB, SCB = fused_case(5, 40, 12, (7,))
    x = x.bfloat16()
    y = cpu_int8_gemm.int8_linear(x, CB, SCB, bias, 6.0, None)
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, None)
    assert y.dtype == torch.bfloat16
    # The kernel keeps the outlier part in fp32, the reference rounds it to bf16 first;
    # both round the sum to bf16 once.
    eps = torch.finfo(torch.bfloat16).eps
    source = reference.dequantize_rows(CB, SCB)
    bound = eps * (x.float()[:, [7]].abs() @ source[:, [7]].abs().t()) + eps * y_ref.float().abs()
    assert ((y.float() - y_ref.float()).abs() <= bound).all()
