"""The Triton kernels of the CUDA path against ``int8fx.reference``.

On a machine without a GPU the kernels run on CPU tensors through the Triton interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), which is slow: shapes stay at
K, N <= 512 and the kernels use one large-tile config there. Shapes are chosen to cover
partial tiles in every dimension (M = 70 is two 64-row tiles, N = 200 four 64-column
tiles, K = 300 three 128-deep steps) plus M = 1 and K = 8.

What must be exact is tested exactly: ``CA``, ``SCA``, the outlier columns and the int32
accumulation. The fp epilogue is checked against a rounding bound derived below.

GPU tests (``-m gpu``) need a CUDA device and ``TRITON_INTERPRET=0`` in the environment
(conftest only sets it when it is unset).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from int8fx import reference
from int8fx.kernels.cuda import int8_gemm as cuda_gemm, int8_gemv as cuda_gemv, linear as cuda_linear, quantize_activation as cuda_quantize
from int8fx.kernels.cuda.int8_gemm import INTERPRETING

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
THRESHOLD = 6.0


# ---------------------------------------------------------------- inputs

def make_activation(M: int, K: int, dtype: torch.dtype, *, outliers: bool = True, all_outlier_row: bool = False, seed: int = 0) -> torch.Tensor:
    """Random activations below the threshold, plus the edge cases the kernels must handle.

    With ``outliers``: a column exactly at the threshold (an outlier, the test is ``>=``),
    a value one ulp below it in another column (not an outlier), a negative outlier in the
    last column (a partial tile), and a row whose only non-zero element is an outlier
    (its scale is 0). ``all_outlier_row`` makes every element of row 0 an outlier, hence
    every column an outlier column.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=generator).clamp_(-4, 4)
    if outliers:
        just_below = THRESHOLD - 4 * torch.finfo(dtype).eps  # the ulp of [4, 8) is 4 eps
        x[0, min(1, K - 1)] = THRESHOLD
        x[M // 2, min(2, K - 1)] = just_below
        x[M - 1, K - 1] = -25.0
        if M >= 4:
            x[2] = 0.0
            x[2, 3] = -8.0
    if all_outlier_row:
        x[0] = torch.where(torch.arange(K) % 2 == 0, 7.0, -THRESHOLD)
    return x.to(dtype)


def make_weight(N: int, K: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, CB, SCB)``; row 0 of ``W`` is zero (``SCB = 0``, ``CB = 0``)."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(N, K, generator=generator) * 0.05).to(dtype)
    weight[0] = 0
    CB, SCB = reference.quantize_weight(weight)
    return weight, CB, SCB


def make_bias(N: int, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- the epilogue's rounding bound

def epilogue_bound(x2d, CB, SCB, bias, threshold, weight) -> torch.Tensor:
    """Largest ``|kernel - reference.int8_linear|`` that rounding alone can explain, per element.

    Both compute ``Y8`` identically (exact int32, the same fp32 roundings). They differ in
    (a) the reference rounds the outlier product ``Y16`` to the input dtype before adding,
        at most ``u_d * P`` with ``P = sum_j |x[m, j]| |w[n, j]|`` over the outlier columns
        and ``u_d`` the dtype's unit roundoff (eps / 2);
    (b) summation order: each fp32 add is off by at most ``u32 * S`` where
        ``S = |Y8| + P + |bias|`` bounds every partial sum, and each side needs at most
        ``n_o + 2`` adds (the ``n_o`` outlier products, ``Y8``, the bias): ``(2 n_o + 4) u32 S``.
    So the values before the final cast differ by ``d <= u_d P + (2 n_o + 4) u32 S``, and
    both casts to the dtype add at most ``u_d`` of their magnitude (``<= |y| + d``), plus half
    a subnormal step each: ``|kernel - ref| <= d + 2 u_d (|y| + d) + subnormal step``.
    """
    dtype = x2d.dtype
    unit_dtype = torch.finfo(dtype).eps / 2
    unit_fp32 = torch.finfo(torch.float32).eps / 2
    (CA, SCA), columns = reference.quantize_activation(x2d, threshold)
    y8 = reference.dequantize_output(reference.int8_matmul(CA, CB), SCA, SCB).double()
    index = columns.nonzero().flatten()
    source = weight if weight is not None else reference.dequantize_rows(CB, SCB)
    products = x2d[:, index].double().abs() @ source[:, index].to(dtype).double().abs().T
    magnitude = y8.abs() + products + (0 if bias is None else bias.double().abs())
    before_cast = unit_dtype * products + (2 * index.numel() + 4) * unit_fp32 * magnitude
    y = reference.int8_linear(x2d, CB, SCB, bias, threshold, weight).double()
    subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    return before_cast + 2 * unit_dtype * (y.abs() + before_cast) + subnormal_step


def assert_within_bound(actual, x2d, CB, SCB, bias, threshold, weight) -> None:
    expected = reference.int8_linear(x2d, CB, SCB, bias, threshold, weight)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bound = epilogue_bound(x2d, CB, SCB, bias, threshold, weight)
    error = (actual.double() - expected.double()).abs()
    worst = (error / bound).max().item()
    assert (error <= bound).all(), f"error reaches {worst:.2f}x the rounding bound"


def test_bound_is_tight_enough_to_catch_mistakes():
    """The bound must not hide a dropped bias, a dropped outlier part or the wrong outlier weight."""
    x = make_activation(70, 300, torch.float16)
    weight, CB, SCB = make_weight(200, 300, torch.float16)
    bias = make_bias(200, torch.float16)
    bound = epilogue_bound(x, CB, SCB, bias, THRESHOLD, weight)
    right = reference.int8_linear(x, CB, SCB, bias, THRESHOLD, weight).double()
    (CA, SCA), _ = reference.quantize_activation(x, THRESHOLD)
    int8_part = reference.dequantize_output(reference.int8_matmul(CA, CB), SCA, SCB)
    wrong = {
        "no bias": reference.int8_linear(x, CB, SCB, None, THRESHOLD, weight),
        "no outlier part": (int8_part + bias.float()).half(),
        "int8 outlier weight": reference.int8_linear(x, CB, SCB, bias, THRESHOLD, None),
    }
    for mistake, y in wrong.items():
        assert ((y.double() - right).abs() > bound).any(), mistake


# ---------------------------------------------------------------- activation quantization

def assert_quantization_matches(x2d, threshold, CA, SCA, outliers) -> None:
    (CA_ref, SCA_ref), columns = reference.quantize_activation(x2d, threshold)
    assert torch.equal(SCA, SCA_ref)
    assert torch.equal(CA, CA_ref)
    if threshold <= 0:
        assert outliers is None
    else:
        count = int(outliers.count)
        assert torch.equal(outliers.index[:count].long(), columns.nonzero().flatten())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("M, K", [(1, 8), (70, 300)])
def test_quantize_activation_bit_exact(M, K, dtype, threshold):
    x = make_activation(M, K, dtype)
    assert_quantization_matches(x, threshold, *cuda_quantize.quantize_activation(x, threshold))


@pytest.mark.parametrize("case", ["no outliers", "all-outlier row"])
def test_quantize_activation_outlier_extremes(case):
    x = make_activation(37, 300, torch.bfloat16, outliers=False, all_outlier_row=case == "all-outlier row")
    result = cuda_quantize.quantize_activation(x, THRESHOLD)
    assert_quantization_matches(x, THRESHOLD, *result)
    assert int(result.outliers.count) == (300 if case == "all-outlier row" else 0)


def test_quantize_activation_strided_input():
    x = make_activation(40, 600, torch.float16)[:, ::2]
    assert_quantization_matches(x, THRESHOLD, *cuda_quantize.quantize_activation(x, THRESHOLD))


def tie_activation() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with absmax 127 (so the scale ``127 / 127`` is exactly 1) holding halfway values."""
    values = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, 126.5, 127.0, 3.4999998]
    expected = [0, 2, 2, 0, -2, -2, 126, 126, 127, 3]
    x = torch.tensor([values, [-v for v in values]], dtype=torch.float32)
    assert (x.abs().amax(1).reciprocal() * 127 == 1).all()
    return x, torch.tensor([expected, [-e for e in expected]], dtype=torch.int8)


def test_quantize_activation_rounds_half_to_even():
    x, expected = tie_activation()
    CA, _, _ = cuda_quantize.quantize_activation(x, 0.0)
    assert torch.equal(CA, expected)


def test_gemv_rounds_half_to_even():
    # With CB = identity the int32 result is CA itself.
    x, expected = tie_activation()
    identity = torch.eye(x.shape[1], dtype=torch.int8)
    C32 = cuda_gemv.int8_linear_small_m(x, identity, torch.ones(x.shape[1]), None, 0.0, None, epilogue=False)
    assert torch.equal(C32, expected.int())


# ---------------------------------------------------------------- int32 accumulation

def fp32_inexact_operands() -> tuple[torch.Tensor, torch.Tensor]:
    """Operands whose exact dot products are odd and above 2**24 (fp32 would round them).

    K = 2081 exceeds the suite's K <= 512 on purpose: a smaller K cannot reach 2**24. The
    other dimensions stay tiny, so the interpreter runs it quickly. Each sum is
    ``127 * CB[n, 0]`` (odd) plus 2080 products ``+-127 * 127`` (an even count of odd terms).
    """
    K = 2081
    CA = torch.full((3, K), 127, dtype=torch.int8)
    CB = torch.full((5, K), 127, dtype=torch.int8)
    CB[:, 0] = torch.tensor([-127, 1, 3, -5, 7], dtype=torch.int8)
    CA[1] = -127
    return CA, CB


@pytest.mark.parametrize("M, K, N", [(130, 300, 200), (1, 8, 9)])
def test_int8_matmul_exact(M, K, N):
    generator = torch.Generator().manual_seed(3)
    CA = torch.randint(-127, 128, (M, K), generator=generator, dtype=torch.int8)
    CB = torch.randint(-127, 128, (N, K), generator=generator, dtype=torch.int8)
    assert torch.equal(cuda_gemm.int8_matmul(CA, CB), reference.int8_matmul(CA, CB))


def test_int8_matmul_exact_beyond_fp32():
    CA, CB = fp32_inexact_operands()
    expected = reference.int8_matmul(CA, CB)
    assert (expected.abs() > 2**24).all() and (expected % 2 == 1).all()
    assert torch.equal(cuda_gemm.int8_matmul(CA, CB), expected)


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("M", [1, 16])
def test_gemv_int32_exact(M, threshold):
    x = make_activation(M, 300, torch.bfloat16)
    _, CB, SCB = make_weight(200, 300, torch.bfloat16)
    (CA, _), _ = reference.quantize_activation(x, threshold)
    C32 = cuda_gemv.int8_linear_small_m(x, CB, SCB, None, threshold, None, epilogue=False)
    assert torch.equal(C32, reference.int8_matmul(CA, CB))


def test_gemv_int32_exact_beyond_fp32():
    # Rows of CA with absmax 127 quantize to themselves (the scale is exactly 1).
    CA, CB = fp32_inexact_operands()
    C32 = cuda_gemv.int8_linear_small_m(CA.float(), CB, torch.ones(CB.shape[0]), None, 0.0, None, epilogue=False)
    assert torch.equal(C32, reference.int8_matmul(CA, CB))


# ---------------------------------------------------------------- fused epilogue

# (dtype, threshold, with bias, outlier weight: "fp" kept weight or "int8" dequantized CB)
EPILOGUE_CASES = [
    (torch.float16, THRESHOLD, True, "fp"),
    (torch.float16, THRESHOLD, False, "int8"),
    (torch.bfloat16, THRESHOLD, True, "int8"),
    (torch.bfloat16, THRESHOLD, False, "fp"),
    (torch.bfloat16, 0.0, True, "fp"),
    (torch.float32, THRESHOLD, True, "fp"),
    (torch.float32, THRESHOLD, False, "int8"),
    (torch.float32, 0.0, False, "int8"),
]


def linear_inputs(M, K, N, dtype, with_bias, outlier_weight, **activation_options):
    x = make_activation(M, K, dtype, **activation_options)
    weight, CB, SCB = make_weight(N, K, dtype)
    bias = make_bias(N, dtype) if with_bias else None
    return x, CB, SCB, bias, weight if outlier_weight == "fp" else None


@pytest.mark.parametrize("dtype, threshold, with_bias, outlier_weight", EPILOGUE_CASES)
def test_gemm_epilogue(dtype, threshold, with_bias, outlier_weight):
    x, CB, SCB, bias, weight = linear_inputs(70, 300, 200, dtype, with_bias, outlier_weight)
    CA, SCA, outliers = cuda_quantize.quantize_activation(x, threshold)
    y = cuda_gemm.int8_gemm(CA, SCA, CB, SCB, bias, x, outliers, weight)
    assert_within_bound(y, x, CB, SCB, bias, threshold, weight)


@pytest.mark.parametrize("dtype, threshold, with_bias, outlier_weight", EPILOGUE_CASES)
@pytest.mark.parametrize("M", [1, 13])
def test_gemv_epilogue(M, dtype, threshold, with_bias, outlier_weight):
    x, CB, SCB, bias, weight = linear_inputs(M, 300, 200, dtype, with_bias, outlier_weight)
    y = cuda_gemv.int8_linear_small_m(x, CB, SCB, bias, threshold, weight)
    assert_within_bound(y, x, CB, SCB, bias, threshold, weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_epilogue_exact_without_outliers(dtype):
    # Without outlier columns the kernels perform the reference's fp32 operations in the
    # reference's order (dequantize, add the bias, round once), so the output is bit-exact.
    x, CB, SCB, bias, _ = linear_inputs(70, 300, 200, dtype, True, "int8")
    expected = reference.int8_linear(x, CB, SCB, bias, 0.0)
    CA, SCA, _ = cuda_quantize.quantize_activation(x, 0.0)
    assert torch.equal(cuda_gemm.int8_gemm(CA, SCA, CB, SCB, bias, x, None, None), expected)
    assert torch.equal(cuda_gemv.int8_linear_small_m(x[:5], CB, SCB, bias, 0.0, None), expected[:5])


@pytest.mark.parametrize("M", [3, 40])
def test_all_outlier_row(M):
    # Every column is an outlier column: the int8 part is all zero, the fp part is everything.
    x, CB, SCB, bias, weight = linear_inputs(M, 200, 100, torch.float16, True, "fp", all_outlier_row=True)
    y = cuda_linear.linear(x, CB, SCB, bias, THRESHOLD, weight)
    assert_within_bound(y, x, CB, SCB, bias, THRESHOLD, weight)


def test_gemv_rejects_large_m():
    x = torch.zeros(cuda_gemv.MAX_M + 1, 8)
    with pytest.raises(ValueError, match="at most"):
        cuda_gemv.int8_linear_small_m(x, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None, 0.0, None)


# ---------------------------------------------------------------- host entry

@pytest.mark.parametrize("leading", [(1,), (2, 20)], ids=["decode", "prefill"])
def test_int8_linear_dispatch(leading):
    K, N = 96, 72
    x2d, CB, SCB, bias, weight = linear_inputs(int(torch.tensor(leading).prod()), K, N, torch.bfloat16, True, "fp")
    y = cuda_linear.linear(x2d.reshape(*leading, K), CB, SCB, bias, THRESHOLD, weight)
    assert y.shape == (*leading, N)
    assert_within_bound(y.reshape(-1, N), x2d, CB, SCB, bias, THRESHOLD, weight)


def test_int8_linear_empty_batch():
    _, CB, SCB = make_weight(8, 16, torch.float16)
    for threshold in (0.0, THRESHOLD):
        y = cuda_linear.linear(torch.zeros(0, 16, dtype=torch.float16), CB, SCB, None, threshold, None)
        assert y.shape == (0, 8) and y.dtype == torch.float16


# ---------------------------------------------------------------- GPU, real shapes

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs CUDA and TRITON_INTERPRET=0")


def llama_activation(M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """Normal activations with 0.1% outlier columns (magnitude 8 to 20), as in LLM.int8()."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(M, K, generator=generator).clamp_(-4, 4)
    columns = torch.randperm(K, generator=generator)[: max(1, K // 1000)]
    magnitude = torch.rand(M, columns.numel(), generator=generator) * 12 + 8
    x[:, columns] = magnitude * torch.sign(torch.randn(M, columns.numel(), generator=generator))
    return x.to(dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("M", [1, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_reference(M, dtype):
    # The reference runs on CPU (its int64 matmul has no CUDA kernel); keep M modest.
    K = N = 4096
    x = llama_activation(M, K, dtype)
    weight, CB, SCB = make_weight(N, K, dtype)
    bias = make_bias(N, dtype)
    x_cuda, CB_cuda, SCB_cuda, bias_cuda, weight_cuda = (t.cuda() for t in (x, CB, SCB, bias, weight))
    if M > cuda_gemv.MAX_M:
        CA, SCA, outliers = cuda_quantize.quantize_activation(x_cuda, THRESHOLD)
        outliers = cuda_quantize.OutlierColumns(outliers.index.cpu(), outliers.count.cpu())
        assert_quantization_matches(x, THRESHOLD, CA.cpu(), SCA.cpu(), outliers)
    else:  # the small-M kernel quantizes internally: its exact int32 result checks CA
        C32 = cuda_gemv.int8_linear_small_m(x_cuda, CB_cuda, SCB_cuda, None, THRESHOLD, None, epilogue=False)
        (CA, _), _ = reference.quantize_activation(x, THRESHOLD)
        assert torch.equal(C32.cpu(), reference.int8_matmul(CA, CB))
    for threshold, use_weight in ((0.0, False), (THRESHOLD, False), (THRESHOLD, True)):
        y = cuda_linear.linear(x_cuda, CB_cuda, SCB_cuda, bias_cuda, threshold, weight_cuda if use_weight else None)
        assert_within_bound(y.cpu(), x, CB, SCB, bias, threshold, weight if use_weight else None)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("M", [256, 1024])
def test_gpu_int8_matmul_exact(M):
    K, N = 4096, 14336
    CA = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    CB = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    assert torch.equal(cuda_gemm.int8_matmul(CA, CB), torch._int_mm(CA, CB.t()))


# ---------------------------------------------------------------- GPU compilation, without a GPU

def _compile_for_gpu(kernel, signature: dict, constexprs: dict, capability: int):
    """Compiles ``kernel`` to a cubin for an NVIDIA GPU of ``capability`` (e.g. 90), no device needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    kernel = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4, "num_stages": 3})


def _gpu_compile_cases() -> dict:
    """One fully-featured specialization per kernel (bf16 input, outliers, bias, fp weight)."""
    int32 = lambda *names: {name: "i32" for name in names}
    return {
        "row_stats": (
            cuda_quantize._row_stats_kernel,
            {"x_ptr": "*bf16", "absmax_ptr": "*fp32", "column_flag_ptr": "*i32", **int32("M", "K", "stride_xm", "stride_xk"), "threshold": "fp32"},
            {"HAS_THRESHOLD": True, "BLOCK_M": 8, "BLOCK_K": 256},
        ),
        "quantize": (
            cuda_quantize._quantize_kernel,
            {"x_ptr": "*bf16", "absmax_ptr": "*fp32", "column_flag_ptr": "*i32", "ca_ptr": "*i8", "outlier_index_ptr": "*i32",
             "outlier_count_ptr": "*i32", **int32("M", "K", "stride_xm", "stride_xk", "stride_cam")},
            {"HAS_THRESHOLD": True, "BLOCK_M": 8, "BLOCK_K": 256},
        ),
        "gemm": (
            cuda_gemm._int8_gemm_kernel,
            {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": "*bf16", "sca_ptr": "*fp32", "scb_ptr": "*fp32", "bias_ptr": "*bf16",
             "x_ptr": "*bf16", "w_ptr": "*bf16", "outlier_index_ptr": "*i32", "outlier_count_ptr": "*i32",
             **int32("M", "N", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_bn", "stride_bk", "stride_om", "stride_on",
                     "stride_xm", "stride_xk", "stride_wn", "stride_wk")},
            {"EPILOGUE": True, "HAS_BIAS": True, "HAS_OUTLIERS": True, "OUTLIER_W_FROM_CB": False, "BLOCK_O": 16,
             "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8},
        ),
        "gemv": (
            cuda_gemv._int8_gemv_kernel,
            {"x_ptr": "*bf16", "b_ptr": "*i8", "out_ptr": "*bf16", "scb_ptr": "*fp32", "bias_ptr": "*bf16", "w_ptr": "*bf16",
             **int32("M", "N", "K", "stride_xm", "stride_xk", "stride_bn", "stride_bk", "stride_om", "stride_on", "stride_wn", "stride_wk"),
             "threshold": "fp32"},
            {"EPILOGUE": True, "HAS_THRESHOLD": True, "HAS_BIAS": True, "OUTLIER_W_FROM_CB": False, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256},
        ),
    }


def _has_nvidia_compiler() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def hopper_ptx(tmp_path_factory) -> Path:
    """PTX of every kernel compiled for sm_90, from a subprocess: under TRITON_INTERPRET=1 (set
    for this process) ``@triton.jit`` makes interpreted functions that cannot be compiled."""
    out = tmp_path_factory.mktemp("ptx")
    script = (
        "import os, sys\n"
        "os.environ['TRITON_INTERPRET'] = '0'\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_kernels_triton import _compile_for_gpu, _gpu_compile_cases\n"
        "for name, case in _gpu_compile_cases().items():\n"
        f"    open(os.path.join({str(out)!r}, name + '.ptx'), 'w').write(_compile_for_gpu(*case, capability=90).asm['ptx'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_compiler(), reason="this Triton has no NVIDIA backend")
@pytest.mark.parametrize("kernel", ["row_stats", "quantize", "gemm", "gemv"])
def test_kernels_compile_for_hopper(kernel, hopper_ptx):
    # The interpreter never runs Triton's GPU compiler; this does (through ptxas, for sm_90),
    # catching type and lowering errors, and checks the instructions the numerics rely on.
    ptx = (hopper_ptx / f"{kernel}.ptx").read_text()
    if kernel in ("quantize", "gemv"):
        assert "div.rn.f32" in ptx  # the IEEE division the reference's scales need
    if kernel == "gemm":
        assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx  # Hopper int8 tensor cores
    if kernel == "gemv":
        assert "mma.sync.aligned.m16n8k32" in ptx and ".s32.s8.s8.s32" in ptx  # 16-row int8 MMA
