"""int8fx's CPU kernels (``int8fx/kernels/cpu``): every GEMM kernel this CPU can run, the
dispatch choice for this CPU, the fused linear, and the fallbacks.

Every GEMM result must equal ``reference.int8_matmul`` exactly: it is integer arithmetic.
The fused linear is bit-exact with the reference where no outlier part is involved.
Kernel tests run for each kernel whose instructions this CPU has, whichever the dispatch
picks; the others skip with the instruction set they need. The first test in a fresh
cache builds the library (about 30 s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from int8fx import reference
from int8fx.kernels import cpu
from int8fx.kernels.cpu import build, torch_path

# What each kernel needs, as /proc/cpuinfo names it (the library itself asks CPUID).
KERNEL_FLAGS = {
    "avx2": {"avx2"},
    "avx512_vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "avx512_vnni_panels": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "amx": {"amx_tile", "amx_int8"},
}
# The level of cpu.ISA_LEVELS (INT8FX_MAX_CPU_ISA) each kernel belongs to.
KERNEL_ISA = {"avx2": "avx2", "avx512_vnni": "avx512_vnni", "avx512_vnni_panels": "avx512_vnni", "amx": "amx"}


@pytest.fixture(scope="session")
def library():
    """Builds (first time, about 30 s) and loads the library; skips where it cannot be built."""
    if not cpu.load():
        pytest.skip("needs a C++ compiler and AVX2 (test_library_builds_wherever_it_can checks the build)")


needs_library = pytest.mark.usefixtures("library")


@pytest.fixture(params=["avx2", "avx512_vnni", "avx512_vnni_panels", "amx", "onednn"])
def kernel(request, library):
    """Each GEMM kernel in turn; one this CPU cannot run skips, saying what it needs."""
    name = request.param
    if name == "onednn" or name in cpu.kernels():
        return name
    if not cpu.isa_allowed(KERNEL_ISA[name]):
        pytest.skip(f"the {name} kernel is ruled out by {cpu.MAX_ISA_VARIABLE}={cpu.isa_cap()}")
    if name == "amx" and cpu.amx_self_check() == "failed":
        pytest.skip("this CPU has AMX, but int8fx's AMX kernel failed its self-check, so it is disabled: fix gemm_amx.cpp here")
    pytest.skip(f"the {name} kernel needs {'/'.join(sorted(KERNEL_FLAGS[name]))}; this CPU ({cpu.cpu_model()}) lacks it")


def random_int8(*shape: int, seed: int, low: int = -127) -> torch.Tensor:
    return torch.randint(low, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@contextlib.contextmanager
def thread_count(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- GEMM exactness, per kernel


@pytest.mark.parametrize("K", [1, 7, 33, 64, 65, 300, 2081])
def test_gemm_matches_reference_on_odd_shapes(kernel, K):
    # K around the 32- and 64-byte vector steps and the 4-byte groups of the VNNI panels;
    # M and N around every kernel's tiles (2 x 6 and 1 x 8 for AVX2, 4 x 4 and 1 x 8 for
    # VNNI, 6 x 64 for VNNI panels, whose packing moves 16 rows x 64 bytes at a time,
    # 32 x 32 for AMX): M = 8, 17, 33, 64 leave 2, 5, 3, 4 rows past the last 6-row tile.
    # At K = 2081, N = 129 spans two L2 blocks of B rows, so two threads share the work.
    for M in (0, 1, 3, 5, 8, 17, 33, 64):
        for N in (1, 5, 17, 64, 129):
            CA, CB = random_int8(M, K, seed=M * K + N, low=-128), random_int8(N, K, seed=N)
            assert torch.equal(cpu.int8_gemm(CA, CB, kernel), reference.int8_matmul(CA, CB)), (M, K, N)


@pytest.mark.parametrize("M, K", [(1, 4096), (5, 4096), (130, 4096), (300, 576)])
def test_gemm_many_blocks(kernel, M, K):
    # M < 16: the weight split evenly between the threads (blocks of at least 16 rows,
    # 64 KiB / K); M = 130: tasks of 64 rows of A (64, 64, 2; AMX: 128, 2) times 5 L2 blocks of
    # B rows, shared unevenly by 1-3 threads; M = 300, K = 576: AMX's tasks of 256 rows (256, 44).
    CA, CB = random_int8(M, K, seed=0), random_int8(300, K, seed=1)
    for threads in (1, 2, 3):
        with thread_count(threads):
            assert torch.equal(cpu.int8_gemm(CA, CB, kernel), reference.int8_matmul(CA, CB))


@pytest.mark.parametrize("a, b", [(127, 127), (-127, 127), (-128, 127), (-128, -127), (127, -127)])
def test_gemm_extreme_values(kernel, a, b):
    # 2081 * 128 * 127 > 2**24: an fp32 accumulation would round; AVX2's int16 pair sums
    # are at their largest (2 * 128 * 127), just below saturation; VNNI's offset weight
    # (b + 128) is at its largest too.
    M, K, N = 3, 2081, 9
    CA, CB = torch.full((M, K), a, dtype=torch.int8), torch.full((N, K), b, dtype=torch.int8)
    expected = torch.full((M, N), a * b * K, dtype=torch.int32)
    assert abs(a * b * K) > 2**24
    assert torch.equal(cpu.int8_gemm(CA, CB, kernel), expected)


def test_gemm_wraps_correctly_past_the_offset_range(kernel):
    # K = 70,000: the VNNI offset product sum((b + 128) * a) exceeds int32 before the
    # correction; modular arithmetic must still give the exact (in-range) result.
    K = 70_000
    CA = torch.full((1, K), -128, dtype=torch.int8)
    CB = torch.full((2, K), 127, dtype=torch.int8)
    assert 255 * 128 * K > 2**31 and 128 * 127 * K < 2**31
    assert torch.equal(cpu.int8_gemm(CA, CB, kernel), reference.int8_matmul(CA, CB))


def test_gemm_alternating_signs(kernel):
    # Signs that flip within each pair of products exercise AVX2's sign trick.
    K = 300
    pattern = torch.tensor([127, -127, -128, 1, 0, -1], dtype=torch.int8).repeat(K // 6)
    CA = torch.stack([pattern, pattern.roll(1), -pattern.clamp(min=-127)])
    CB = torch.stack([pattern.clamp(min=-127), pattern.roll(3).clamp(min=-127)])
    assert torch.equal(cpu.int8_gemm(CA, CB, kernel), reference.int8_matmul(CA, CB))


@needs_library
def test_gemm_non_contiguous_inputs():
    CA = random_int8(100, 17, seed=0).t()  # [17, 100], column-major
    CB = random_int8(64, 200, seed=1)[:, ::2]  # [64, 100], row stride 200
    assert not CA.is_contiguous() and not CB.is_contiguous()
    assert torch.equal(cpu.int8_gemm(CA, CB), reference.int8_matmul(CA, CB))


@needs_library
def test_gemm_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="do not chain"):
        cpu.int8_gemm(random_int8(2, 8, seed=0), random_int8(3, 9, seed=1))
    with pytest.raises(RuntimeError, match="unknown CPU int8 kernel"):
        cpu.int8_gemm(random_int8(2, 8, seed=0), random_int8(3, 8, seed=1), "sse2")


# ---------------------------------------------------------------- torch._int_mm's K = 1 bug


@pytest.mark.parametrize("K", range(1, 9))
def test_int_mm_guard_is_exact_for_small_k(K):
    # torch._int_mm on AVX-512 VNNI / AMX CPUs returns wrong values for K = 1, N > 1; the
    # guarded paths (torch_path.int8_mm, and the library's "onednn" choice) never do.
    for M in (1, 2, 5, 17):
        for N in (1, 2, 7, 33):
            CA, CB = random_int8(M, K, seed=M + N, low=-128), random_int8(N, K, seed=N)
            expected = reference.int8_matmul(CA, CB)
            assert torch.equal(torch_path.int8_mm(CA, CB), expected), (M, K, N)
            if cpu.load():  # where the library builds (test_library_builds_wherever_it_can)
                assert torch.equal(cpu.int8_gemm(CA, CB, "onednn"), expected), (M, K, N)


@pytest.mark.parametrize("rows_apart", [0, 1, 2 * 64])
def test_int_mm_guard_is_exact_for_rows_not_k_apart(rows_apart):
    # torch._int_mm returned garbage for a one-row activation with row stride 0 (inductor's
    # layout for M = 1) on an AMX machine; the guarded paths make the activation contiguous.
    K, N = 64, 48
    storage = random_int8(8 * K, seed=3, low=-128).flatten()
    CB = random_int8(N, K, seed=4)
    for M in (1, 3):
        CA = storage.as_strided((M, K), (rows_apart, 1))
        expected = reference.int8_matmul(CA.contiguous(), CB)
        assert torch.equal(torch_path.int8_mm(CA, CB), expected), (M, rows_apart)
        if cpu.load():
            assert torch.equal(cpu.int8_gemm(CA, CB, "onednn"), expected), (M, rows_apart)


# ---------------------------------------------------------------- dispatch on this machine


def has_compiler_and_avx2() -> bool:
    import shutil

    return "avx2" in cpu._cpu_flags() and shutil.which(os.environ.get("CXX", "c++")) is not None


def test_library_builds_wherever_it_can():
    # Every other test of the library skips where it is not loaded: a build broken by a
    # code change must not pass for a machine without a compiler.
    if not has_compiler_and_avx2():
        pytest.skip("needs a C++ compiler and AVX2")
    if not cpu.isa_allowed("avx2"):
        pytest.skip(f"{cpu.MAX_ISA_VARIABLE}=none rules the library out")
    assert cpu.load(), "the CPU library failed to build or load: see the int8fx log"


@needs_library
def test_cpuid_agrees_with_the_os_flags():
    flags = cpu._cpu_flags()
    kernels = cpu.kernels()
    assert "avx2" in kernels
    assert ("avx512_vnni" in kernels) == (KERNEL_FLAGS["avx512_vnni"].issubset(flags) and cpu.isa_allowed("avx512_vnni"))
    if KERNEL_FLAGS["amx"].issubset(flags) and cpu.isa_allowed("amx"):
        # Linux lists amx_tile only where it saves the tile state, so the permission request succeeds.
        assert cpu.amx_self_check() in ("passed", "failed", "bf16 failed")
    else:
        assert cpu.amx_self_check() == "no AMX" and "amx" not in kernels


@needs_library
def test_dispatch_choice_for_this_machine():
    kernels = cpu.kernels()
    decode, prefill_small_k, prefill_large_k = cpu.chosen_kernel(1, 4096), cpu.chosen_kernel(512, 576), cpu.chosen_kernel(32, 4096)
    if "amx" in kernels:  # Sapphire Rapids and later: tiles from 4 rows on
        assert (decode, cpu.chosen_kernel(3, 4096), cpu.chosen_kernel(4, 576)) == ("avx512_vnni", "avx512_vnni", "amx")
        assert (prefill_small_k, prefill_large_k) == ("amx", "amx")
    elif "avx512_vnni" in kernels:  # Zen 4, Ice Lake: dot-product tiles at small M, packed panels from 12 rows
        assert (decode, cpu.chosen_kernel(11, 576), cpu.chosen_kernel(12, 576)) == ("avx512_vnni", "avx512_vnni", "avx512_vnni_panels")
        assert (cpu.chosen_kernel(31, 4096), prefill_small_k, prefill_large_k) == (
            "avx512_vnni",
            "avx512_vnni_panels",
            "avx512_vnni_panels",
        )
    else:  # AVX2 only (Zen 3): oneDNN's int8 GEMM is a slow generic loop there
        assert {decode, prefill_small_k, prefill_large_k} == {"avx2"}
    # The activation quantizer: AVX-512 wherever the VNNI kernels run (twice the AVX2 one's speed on a Xeon).
    assert cpu.chosen_quantizer() == ("avx512" if "avx512_vnni" in kernels else "avx2")


@needs_library
def test_op_calls_the_registered_cpp_kernel(monkeypatch):
    # Once loaded, the op's CPU calls never reach the Python fallback.
    monkeypatch.setattr(torch_path, "int8_linear_torch", lambda *args: pytest.fail("the Python CPU path ran"))
    x, weight, bias, CB, SCB = fused_case(3, 40, 8, (5,))
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, weight)
    assert torch.equal(y, cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, weight))


@needs_library
@pytest.mark.parametrize("op", ["int8_linear", "int8_linear_siblings"])
def test_cpu_autograd_kernel_is_the_library_s(op):
    # The Python autograd kernel costs a decode call about a third of its time: CPU calls must
    # take the library's (gradients through it: test_ops' autograd tests).
    dump = torch._C._dispatch_dump(f"int8fx::{op}")
    assert any(line.startswith("AutogradCPU: registered at") and "linear_op.cpp" in line for line in dump.splitlines()), dump


@needs_library
def test_unavailable_kernel_is_a_clear_error():
    missing = [name for name in cpu.KERNELS if name not in cpu.kernels()]
    if not missing:
        pytest.skip("this CPU runs every kernel")
    with pytest.raises(RuntimeError, match=f"the {missing[0]} int8 kernel needs an instruction set"):
        cpu.int8_gemm(random_int8(2, 8, seed=0), random_int8(3, 8, seed=1), missing[0])


# ---------------------------------------------------------------- fallbacks and the build


@pytest.fixture
def fresh_load(monkeypatch):
    """Re-run ``load()`` under the test's patches, without a cap on the ISA unless the test sets
    one; restore its cached answer afterwards."""
    monkeypatch.delenv(cpu.MAX_ISA_VARIABLE, raising=False)
    cpu.load.cache_clear()
    yield
    cpu.load.cache_clear()


def test_no_avx2_falls_back(monkeypatch, fresh_load, caplog):
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: frozenset())
    with caplog.at_level(logging.INFO, logger="int8fx"):
        assert not cpu.load()
        assert not cpu.load()  # logged once
    assert caplog.text.count("no AVX2") == 1


def test_failed_build_falls_back_to_the_torch_path(monkeypatch, fresh_load, caplog):
    def broken_build():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(build, "compile_library", broken_build)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level(logging.WARNING, logger="int8fx"):
        assert not cpu.load()
    assert "could not build" in caplog.text


def test_isa_cap_none_leaves_the_library_unloaded(monkeypatch, fresh_load, caplog):
    monkeypatch.setenv(cpu.MAX_ISA_VARIABLE, "none")
    with caplog.at_level(logging.INFO, logger="int8fx"):
        assert not cpu.load()
    assert f"{cpu.MAX_ISA_VARIABLE}=none" in caplog.text


def test_unknown_isa_cap_is_ignored_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(cpu.MAX_ISA_VARIABLE, "avx1024")
    assert cpu.isa_cap() is None and cpu.isa_allowed("amx")
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: frozenset())  # stops load() right after the check
    cpu.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="int8fx"):
            cpu.load()
    finally:
        cpu.load.cache_clear()
    assert "'avx1024' is not one of none, avx2, avx512_vnni, amx; ignored" in caplog.text


CAPPED_PROCESS = """
import json
import torch
from int8fx import reference
from int8fx.kernels import cpu
assert cpu.load()
x = torch.randn(40, 64)
x[:, 5] = 9.0
CB, SCB = reference.quantize_weight(torch.randn(24, 64))
y = torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, None)
assert torch.equal(y, reference.int8_linear(x, CB, SCB, None, 6.0, None))
chosen = sorted({cpu.chosen_kernel(M, K) for M in (1, 16, 512) for K in (64, 4096)})
print(json.dumps({"kernels": cpu.kernels(), "chosen": chosen, "amx": cpu.amx_self_check()}))
"""


@pytest.mark.slow  # a subprocess: the cap is read once per process
@needs_library
@pytest.mark.parametrize("cap", ["avx2", "avx512_vnni"])
def test_isa_cap_rules_kernels_out(cap):
    # What INT8FX_MAX_CPU_ISA=avx2 must give on any machine: the AVX2-only machine kind's library.
    env = {**os.environ, cpu.MAX_ISA_VARIABLE: cap}
    result = subprocess.run([sys.executable, "-c", CAPPED_PROCESS], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    capped = json.loads(result.stdout.strip().splitlines()[-1])
    level = cpu.ISA_LEVELS.index(cap)
    flags = cpu._cpu_flags()  # not cpu.kernels(): this process may run under a cap of its own
    below_the_cap = [name for name in cpu.KERNELS if name != "amx" and cpu.ISA_LEVELS.index(KERNEL_ISA[name]) <= level]
    assert capped["kernels"] == [name for name in below_the_cap if KERNEL_FLAGS[name].issubset(flags)]
    assert capped["amx"] == "no AMX"
    assert set(capped["chosen"]) <= set(capped["kernels"])
    if cap == "avx2":
        assert capped["chosen"] == ["avx2"]


def test_torch_path_reads_only_the_outlier_columns(monkeypatch):
    # Without the fp weight, only CB's outlier columns are dequantized, never all of CB.
    x, _, bias, CB, SCB = fused_case(6, 48, 20, (3, 30))
    dequantized_shapes = []
    dequantize = reference.dequantize_rows
    monkeypatch.setattr(
        reference, "dequantize_rows", lambda data, absmax: dequantized_shapes.append(tuple(data.shape)) or dequantize(data, absmax)
    )
    y = torch_path.int8_linear_torch(x, CB, SCB, bias, 6.0, None)
    outliers = int(reference.outlier_columns(x, 6.0).sum())
    assert outliers < 10 and dequantized_shapes == [(20, outliers)]
    monkeypatch.undo()
    assert torch.equal(y, reference.int8_linear(x, CB, SCB, bias, 6.0, None))


@pytest.mark.slow  # a subprocess: seconds to minutes
@needs_library
def test_a_lock_left_by_a_killed_build_does_not_hang(tmp_path, monkeypatch):
    # torch waits forever on a lock file a killed build left behind; int8fx removes it. The
    # finished build is copied into a fresh extension directory (its timestamps kept, so
    # ninja has nothing to do): only the lock is under test, not a 30-60 s compile.
    built = build.build_directory()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    copy = build.build_directory()
    shutil.copytree(built, copy, dirs_exist_ok=True)
    stale = pathlib.Path(copy, "lock")
    stale.touch()
    load = "from int8fx.kernels import cpu; assert cpu.load()"
    subprocess.run([sys.executable, "-c", load], check=True, timeout=600)  # hangs without the fix
    assert not stale.exists()


def test_a_build_running_elsewhere_is_waited_for_then_given_up(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    (tmp_path / "lock").touch()
    with open(tmp_path / "int8fx.lock", "w") as other_builder:
        fcntl.flock(other_builder, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="another process"):
            with build.exclusive_build(str(tmp_path), wait_s=0.2):
                pass
        assert (tmp_path / "lock").exists()  # torch's lock belongs to the live build: kept
    with build.exclusive_build(str(tmp_path), wait_s=0.2):
        assert not (tmp_path / "lock").exists()  # no builder alive: it was stale


# ---------------------------------------------------------------- activation quantization


@pytest.fixture(params=["avx2", "avx512"])
def quantizer(request, library):
    """Each instruction set of the activation quantizer in turn (AVX-512 where the CPU has it)."""
    if request.param == "avx512" and "avx512_vnni" not in cpu.kernels():
        if not cpu.isa_allowed("avx512_vnni"):
            pytest.skip(f"the avx512 quantizer is ruled out by {cpu.MAX_ISA_VARIABLE}={cpu.isa_cap()}")
        pytest.skip(f"the avx512 quantizer runs where the avx512_vnni kernels do; this CPU ({cpu.cpu_model()}) lacks their instructions")
    return request.param


def assert_matches_reference_quantization(x: torch.Tensor, threshold: float, isa: str) -> None:
    CA, SCA, index = cpu.quantize_activation(x, threshold, isa)
    (ref_CA, ref_SCA), columns = reference.quantize_activation(x, threshold)
    assert torch.equal(CA, ref_CA)
    assert torch.equal(SCA, ref_SCA) or torch.allclose(SCA, ref_SCA, equal_nan=True, rtol=0, atol=0)
    if columns.any():
        assert torch.equal(index, columns.nonzero().flatten())
    else:
        assert index is None


@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.5])
@pytest.mark.parametrize("M, K", [(0, 16), (1, 576), (3, 0), (5, 37), (17, 1536), (64, 100)])
def test_quantize_matches_reference(M, K, threshold, quantizer):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M * 1000 + K)) * 3
    assert_matches_reference_quantization(x, threshold, quantizer)


def test_quantize_ties_round_half_to_even(quantizer):
    # absmax 127 makes the inverse scale exactly 1: every x.5 is a tie, in the vector body
    # (first 32) and the scalar tail.
    halves = torch.arange(-126.5, 127.0, 1.0)
    x = torch.cat([halves, torch.tensor([127.0])]).repeat(2, 1)[:, :37].contiguous()
    x[:, 0] = 127.0
    assert_matches_reference_quantization(x, 0.0, quantizer)
    CA, _, _ = cpu.quantize_activation(x, 0.0, quantizer)
    assert CA[0, 1:5].tolist() == [-126, -124, -124, -122]  # -125.5, -124.5, -123.5, -122.5


def test_quantize_threshold_compared_in_fp32(quantizer):
    # 6.1 in fp32 is below 6.1 in double: the element is an outlier in fp32, as in torch.
    x = torch.ones(2, 40)
    x[0, 3] = 6.1
    x[1, 35] = 6.0
    for threshold in (6.1, 6.0):
        assert_matches_reference_quantization(x, threshold, quantizer)
    assert cpu.quantize_activation(x, 6.1, quantizer)[2].tolist() == [3]
    assert cpu.quantize_activation(x, 6.0, quantizer)[2].tolist() == [3, 35]


def test_value_exactly_at_threshold_is_an_outlier(quantizer):
    x = torch.zeros(2, 4)
    x[0, 1] = 6.0
    assert cpu.quantize_activation(x, 6.0, quantizer)[2].tolist() == [1]
    x[0, 1] = torch.nextafter(torch.tensor(6.0), torch.tensor(0.0))  # the fp32 just below
    assert cpu.quantize_activation(x, 6.0, quantizer)[2] is None


def test_quantize_zero_rows_and_all_outlier_columns(quantizer):
    x = torch.zeros(4, 40)
    x[1] = 7.0  # every column is an outlier column: every row scale is 0, all of CA is 0
    assert_matches_reference_quantization(x, 6.0, quantizer)
    CA, SCA, index = cpu.quantize_activation(x, 6.0, quantizer)
    assert not CA.any() and not SCA.any() and index.tolist() == list(range(40))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("column", [5, 36, 100, 139])  # vector bodies (AVX-512: 1st, 3rd, 7th accumulator lane group), tail
def test_quantize_nan_and_inf(threshold, column, quantizer):
    x = torch.randn(3, 140, generator=torch.Generator().manual_seed(0))
    x[1, column] = float("nan")
    x[2, column] = float("inf")
    assert_matches_reference_quantization(x, threshold, quantizer)
    _, SCA, _ = cpu.quantize_activation(x, threshold, quantizer)
    assert torch.isnan(SCA[1]) and torch.isfinite(SCA[0])


def test_quantize_subnormal_scale_and_other_dtypes(quantizer):
    x = torch.zeros(2, 40)
    x[0, 7] = 1e-45  # 1 / absmax is inf: zeros become NaN products, quantized to 0 like torch
    assert_matches_reference_quantization(x, 6.0, quantizer)
    for dtype in (torch.bfloat16, torch.float16):  # read as they are: K = 33 and 70 end past a vector
        for y in (torch.randn(5, 33, dtype=dtype) * 4, torch.randn(3, 70, dtype=dtype) * 4):
            assert_matches_reference_quantization(y, 6.0, quantizer)
            assert_matches_reference_quantization(y.t(), 6.0, quantizer)  # non-contiguous


@needs_library
def test_unavailable_quantizer_is_a_clear_error():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="unknown activation quantizer 'avx1024'"):
        cpu.quantize_activation(x, 6.0, "avx1024")
    if cpu.chosen_quantizer() == "avx2":
        with pytest.raises(RuntimeError, match="the avx512 activation quantizer needs AVX-512"):
            cpu.quantize_activation(x, 6.0, "avx512")


@pytest.mark.parametrize("threshold", [0.0, 6.0, 1e-50])  # 1e-50: 0 in fp32, every element is an outlier
def test_quantize_extreme_scales(threshold, quantizer):
    # Rows at the ends of fp32's range: an absmax near its max (1 / absmax is subnormal), a
    # small normal one (1 / absmax overflows to inf), a subnormal one, an inf; all bit-exact.
    x = torch.randn(5, 100, generator=torch.Generator().manual_seed(1))
    x[0] *= 3e38 / x[0].abs().max()
    x[0, 17] = -torch.finfo(torch.float32).max
    x[1] *= 1e-38
    x[2] *= 1e-44
    x[3, 70] = float("-inf")
    assert_matches_reference_quantization(x, threshold, quantizer)


# ---------------------------------------------------------------- fused linear, per kernel


def fused_case(M, K, N, outlier_columns=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=generator) * 2
    for column in outlier_columns:
        x[:, column] = 20.0 * torch.sign(torch.randn(M, generator=generator))
    weight = torch.randn(N, K, generator=generator) / K**0.5
    bias = torch.randn(N, generator=generator)
    CB, SCB = reference.quantize_weight(weight)
    return x, weight, bias, CB, SCB


@pytest.mark.parametrize("M, K, N", [(0, 16, 8), (1, 576, 1536), (5, 37, 33), (16, 100, 576), (33, 64, 7), (40, 130, 50)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linear_without_outliers_is_bit_exact(kernel, M, K, N, with_bias):
    # Dequantization and bias in the GEMM's tiles follow the reference's fp32 rounding steps.
    x, weight, bias, CB, SCB = fused_case(M, K, N)
    bias = bias if with_bias else None
    for threshold in (0.0, 1e6):
        expected = reference.int8_linear(x, CB, SCB, bias, threshold, weight)
        assert torch.equal(cpu.int8_linear_cpu(x, CB, SCB, bias, threshold, weight, kernel), expected)


def test_dequantization_divides_as_the_reference(kernel):
    # The epilogues divide by 127^2, as the reference does: multiplying by its reciprocal, or
    # an FMA somewhere, would round differently for a good share of values. 2^20 consecutive
    # fp32 mantissas (dividing by a constant scales with the exponent): rows [a, a / 127]
    # quantize to [127, 1] with scale a; against CB rows [0, 1] with scale 1 every output is
    # 1 * (a * 1) / 127^2.
    N, count = 8, 1 << 20
    CB, SCB = torch.tensor([[0, 1]] * N, dtype=torch.int8), torch.ones(N)
    a = 1.0 + torch.arange(count, dtype=torch.float64) * 2.0**-23
    x = torch.stack([a, a / 127], dim=1).float()
    y = cpu.int8_linear_cpu(x, CB, SCB, None, 0.0, None, kernel)
    expected = (a.float() / reference.INT8_MAX**2).unsqueeze(1).expand(-1, N)
    mismatches = (y != expected).any(dim=1).nonzero().flatten()
    assert mismatches.numel() == 0, f"wrong quotient for a = {a[mismatches[:3]].tolist()}"


def test_dequantization_at_the_edges_of_fp32(kernel):
    # Scales at the ends of fp32's range (zeros with either sign, tiny and subnormal values,
    # inf, the largest finite ones) through the vector lanes of every kernel: bit for bit the
    # reference, signs of zero included.
    M, K = 24, 40
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3))
    x[1] = 0.0
    x[2] *= 2.0**-100 / x[2].abs().max()
    edges = [0.0, -0.0, 2.0**-100, 2.0**-101, 2.0**-126, 1e-40, 1e-45, 1.0, 3e38, torch.finfo(torch.float32).max, float("inf"), 2.5]
    N = 2 * len(edges)
    CB = torch.randint(-127, 128, (N, K), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    SCB = torch.tensor(edges * 2, dtype=torch.float32)
    expected = reference.int8_linear(x, CB, SCB, None, 0.0, None)
    y = cpu.int8_linear_cpu(x, CB, SCB, None, 0.0, None, kernel)
    same = (y == expected) | (y.isnan() & expected.isnan())
    assert same.all() and torch.equal(y.signbit(), expected.signbit())


def outlier_bound(x, source, y_ref, threshold=6.0):
    """fp32 summation order of the outlier part (<= count * eps * sum |x_o w_o| over the outlier
    columns, planted or there by chance) plus the final sum's rounding; ``source`` is W or dequant(CB)."""
    columns = reference.outlier_columns(x, threshold)
    eps = torch.finfo(torch.float32).eps
    magnitude = x[:, columns].abs() @ source[:, columns].abs().t()
    return int(columns.sum()) * eps * magnitude + eps * y_ref.abs()


@pytest.mark.parametrize("fp_weight", [True, False])
# At 40 rows, 12 columns stay in the AMX epilogue (BLAS for the other kernels), 20 go to BLAS.
@pytest.mark.parametrize("columns", [(3,), (0, 17, 39), tuple(range(0, 36, 3)), tuple(range(0, 40, 2))])
@pytest.mark.parametrize("M", [9, 40])
def test_fused_linear_outlier_part(kernel, fp_weight, columns, M):
    x, weight, bias, CB, SCB = fused_case(M, 40, 24, columns)
    w = weight if fp_weight else None
    y = cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, w, kernel)
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, w)
    source = weight if fp_weight else reference.dequantize_rows(CB, SCB)
    bound = outlier_bound(x, source, y_ref)
    assert ((y - y_ref).abs() <= bound).all()
    # Dropping the outlier part, or taking the wrong weight columns, is far outside it.
    assert (reference.int8_linear(x, CB, SCB, bias, 6.0, None if fp_weight else weight) - y_ref).abs().max() > bound.max()


# Row counts through every outlier path (in the GEMM, gathered into the panels, the loop,
# BLAS) and both ways of splitting the GEMM (the weights streamed once, blocks per product).
@pytest.mark.parametrize("M, columns", [(1, (3,)), (7, (0, 17, 39)), (20, (5,)), (40, tuple(range(0, 40, 2))), (70, ())])
def test_siblings_equal_their_linears_bit_for_bit(kernel, M, columns):
    # q/k/v-like siblings of one input: uneven widths (not multiples of any tile or panel),
    # a bias on some, the fp weight on some. The input is quantized once for all of them:
    # each output must be exactly its own linear's, whatever the kernel.
    x, *_ = fused_case(M, 40, 8, columns)
    siblings = [fused_case(M, 40, n, seed=n)[1:] for n in (70, 24, 9)]
    CB = [cb for _, _, cb, _ in siblings]
    SCB = [scb for _, _, _, scb in siblings]
    bias = [siblings[0][1], None, siblings[2][1]]
    weight = [siblings[0][0], siblings[1][0], None]
    got = cpu.int8_linear_siblings_cpu(x, CB, SCB, bias, 6.0, weight, kernel)
    for y, *linear in zip(got, CB, SCB, bias, weight):
        cb, scb, b, w = linear
        assert torch.equal(y, cpu.int8_linear_cpu(x, cb, scb, b, 6.0, w, kernel))


@pytest.mark.parametrize("M", [0, 1, 20])
def test_siblings_with_empty_and_one_row_weights(kernel, M):
    # Products of 0 and 1 rows between others: no block may be lost or shifted.
    x, *_ = fused_case(M, 40, 8, (2,))
    CB = [random_int8(n, 40, seed=n) for n in (0, 5, 1, 130)]
    SCB = [torch.rand(n, generator=torch.Generator().manual_seed(n)) + 0.5 for n in (0, 5, 1, 130)]
    got = cpu.int8_linear_siblings_cpu(x, CB, SCB, [None] * 4, 6.0, [None] * 4, kernel)
    for y, cb, scb in zip(got, CB, SCB):
        assert torch.equal(y, cpu.int8_linear_cpu(x, cb, scb, None, 6.0, None, kernel))


@needs_library
def test_siblings_op_on_the_auto_kernel_and_its_errors():
    x, weight, bias, CB, SCB = fused_case(5, 48, 20, (2,))
    got = torch.ops.int8fx.int8_linear_siblings(x, [CB, CB[:7]], [SCB, SCB[:7]], [bias, None], 6.0, [weight, None])
    assert torch.equal(got[0], torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, weight))
    assert torch.equal(got[1], torch.ops.int8fx.int8_linear(x, CB[:7], SCB[:7], None, 6.0, None))
    with pytest.raises(RuntimeError, match="as many CB, SCB, bias and weight entries"):
        torch.ops.int8fx.int8_linear_siblings(x, [CB, CB], [SCB], [None, None], 6.0, [None, None])
    with pytest.raises(RuntimeError, match="SCB must be fp32"):
        torch.ops.int8fx.int8_linear_siblings(x, [CB, CB], [SCB, SCB[:3]], [None, None], 6.0, [None, None])


@needs_library
@pytest.mark.parametrize("M, columns", [(40, tuple(range(0, 70, 3))), (70, tuple(range(1, 70, 2)))])
def test_bf16_model_outlier_part_in_bf16_tiles(M, columns):
    # A bf16 activation with a bf16 weight and too many outlier columns for the AMX epilogue:
    # the outlier part runs in AMX-BF16 tiles. Within the outlier part's fp32 bound of the
    # reference, plus the rounding of the result to bf16: half a bf16 ulp, at most 2^-8 (8
    # significant bits) of a value that is itself within the fp32 bound of the reference's.
    if "amx" not in cpu.kernels():
        pytest.skip(f"needs AMX-INT8 and AMX-BF16; this CPU ({cpu.cpu_model()}) lacks them, or they are capped")
    assert cpu.amx_self_check() == "passed", "the AMX-BF16 outlier kernel failed its self-check: fix gemm_amx.cpp here"
    x, weight, bias, CB, SCB = fused_case(M, 70, 56, columns)
    x, weight = x.bfloat16(), weight.bfloat16()
    y = cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, weight, "amx")
    y_ref = reference.int8_linear(x.float(), CB, SCB, bias, 6.0, weight.float())
    fp32_bound = outlier_bound(x.float(), weight.float(), y_ref)
    bound = fp32_bound + (y_ref.abs() + fp32_bound) * 2.0**-8
    assert y.dtype == torch.bfloat16 and ((y.float() - y_ref).abs() <= bound).all()
    # Dropping the outlier part is far outside it.
    assert (reference.int8_linear(x.float(), CB, SCB, bias, 1e6, None) - y_ref).abs().max() > bound.max()


@needs_library
@pytest.mark.parametrize("M, columns", [(6, (2, 40)), (20, tuple(range(1, 48, 5)))])  # loop, BLAS
def test_fused_linear_reads_only_the_outlier_columns_of_the_weight(M, columns):
    # Every other column of the fp weight is NaN: reading one would poison the output.
    x, weight, bias, CB, SCB = fused_case(M, 48, 20, columns)
    outliers = reference.outlier_columns(x, 6.0)
    assert outliers.sum() < 48
    poisoned = weight.masked_fill(~outliers, float("nan"))
    y = cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, poisoned)
    assert torch.equal(y, cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, weight))
    assert torch.isfinite(torch_path.int8_linear_torch(x, CB, SCB, bias, 6.0, poisoned)).all()


@needs_library
def test_fused_linear_strided_weight():
    # A Conv1D-style weight is a transposed view: the kernel reads its strides in place.
    x, weight, bias, CB, SCB = fused_case(6, 48, 20, (1, 5, 30))
    weight_view = weight.t().contiguous().t()
    assert not weight_view.is_contiguous()
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, weight)
    bound = outlier_bound(x, weight, y_ref)
    assert ((cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, weight_view) - y_ref).abs() <= bound).all()


@needs_library
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("M, columns", [(6, (2, 40)), (16, tuple(range(1, 48, 5)))])  # loop, BLAS
def test_fused_linear_reads_other_weight_dtypes(dtype, M, columns):
    x, weight, bias, CB, SCB = fused_case(M, 48, 20, columns)
    weight = weight.to(dtype)
    y = cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, weight)
    # The same columns as fp32 values: the kernel converts exactly, then works in fp32.
    assert torch.equal(y, cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, weight.float()))
    # ... and the weight's bits really are used (not the int8 columns).
    assert not torch.equal(y, cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, None))


@needs_library
def test_fused_linear_every_column_an_outlier():
    x, weight, bias, CB, SCB = fused_case(4, 40, 9)
    x[0] = 7.0  # every column holds an outlier: the int8 part is all zero
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, weight)
    bound = outlier_bound(x, weight, y_ref)
    assert ((cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, weight) - y_ref).abs() <= bound).all()


@needs_library
def test_fused_linear_bf16_input():
    x, weight, bias, CB, SCB = fused_case(5, 40, 12, (7,))
    x = x.bfloat16()
    y = cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, None)
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, None)
    assert y.dtype == torch.bfloat16
    # The kernel keeps the outlier part in fp32, the reference rounds it to bf16 first;
    # both round the sum to bf16 once.
    eps = torch.finfo(torch.bfloat16).eps
    source = reference.dequantize_rows(CB, SCB)
    bound = eps * (x.float()[:, [7]].abs() @ source[:, [7]].abs().t()) + eps * y_ref.float().abs()
    assert ((y.float() - y_ref.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, columns", [(1, (3,)), (7, (0, 17, 39)), (40, (5, 30)), (40, tuple(range(0, 70, 3)))])
def test_16_bit_inputs_are_read_as_their_fp32_values(kernel, dtype, M, columns):
    # bf16 and fp16 activations are quantized as they are, and their outlier columns gathered,
    # without an fp32 copy: the same bits as the op on the fp32 copy, on every outlier path
    # (in the GEMM, the epilogue, the loop, BLAS), with K's tail past the vector width.
    x, weight, bias, CB, SCB = fused_case(M, 70, 24, columns)
    x = x.to(dtype)
    for w in (weight, None):
        y = cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, w, kernel)
        assert y.dtype == dtype and torch.equal(y, cpu.int8_linear_cpu(x.float(), CB, SCB, bias, 6.0, w, kernel).to(dtype))
    CA, SCA, outliers = torch.ops.int8fx._cpu_quantize_activation(x.t().contiguous().t(), 6.0)  # a transposed view
    expected = torch.ops.int8fx._cpu_quantize_activation(x.float(), 6.0)
    assert torch.equal(CA, expected[0]) and torch.equal(SCA, expected[1]) and torch.equal(outliers, expected[2])


@pytest.mark.parametrize("M", [1, 5, 40])
def test_bf16_results_round_as_torch_does(kernel, M):
    # A bf16 input's result is rounded to bf16 by the GEMM's epilogue: to nearest, ties to even,
    # as torch's conversion. With x = 0 every output is its bias exactly, so the bias picks the
    # fp32 values to round: ties with an even and an odd last bf16 bit, one bit either side of a
    # tie, the largest fp32 (rounds to inf), subnormals, both signs. 45 outputs: 16-, 8- and 4-wide
    # steps and a scalar tail.
    low_bits = [0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF, 0x7FF0, 0x8010]
    patterns = [0x3F800000, 0x3F810000, 0x7F7F0000, 0x00010000, 0x40490000, 0xC2F70000, 0x80000000]
    bits = [(p | low) for p in patterns for low in low_bits][:45]
    bias = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    N, K = bias.numel(), 24
    CB = random_int8(N, K, seed=1)
    SCB = torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    y = cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, None, kernel)
    assert torch.equal(y.view(torch.int16), bias.to(torch.bfloat16).expand(M, N).view(torch.int16))


# ---------------------------------------------------------------- the fp weight's outlier columns, kept


def kept_case(M, columns, seed=0):
    """fused_case with exactly ``columns`` as outlier columns (none by chance)."""
    x, weight, bias, CB, SCB = fused_case(M, 64, 40, seed=seed)
    x = x.clamp(-4, 4)
    x[:, list(columns)] = 20.0
    return x, weight, bias, CB, SCB


def assert_within_outlier_bound(y, x, weight, CB, SCB, bias):
    """y is reference.int8_linear's output up to the outlier part's fp32 summation order."""
    y_ref = reference.int8_linear(x, CB, SCB, bias, 6.0, weight)
    source = weight if weight is not None else reference.dequantize_rows(CB, SCB)
    assert ((y - y_ref).abs() <= outlier_bound(x, source, y_ref)).all()


# M = 1 and 20: the outlier part in the GEMM's tiles, in the panels, or in a pass of its own
# (onednn, and avx2 or the dot-product tiles at M >= 16)
@pytest.mark.parametrize("fp_weight", [True, False])
@pytest.mark.parametrize("M", [1, 20])
def test_kept_outlier_columns_give_what_reading_the_weight_gives(kernel, M, fp_weight):
    cpu.clear_outlier_cache()
    x, weight, bias, CB, SCB = kept_case(M, (3, 30))
    w = weight if fp_weight else None
    # Without the fp weight, the small-M dot-product tiles add CB's columns from the rows they
    # just read; the kernels that dequantize 16 outputs at a time read the gathered columns.
    keeps = fp_weight or M >= 16 or kernel in ("onednn", "avx512_vnni_panels", "amx")
    first = cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, w, kernel)  # read, then kept
    assert_within_outlier_bound(first, x, w, CB, SCB, bias)
    assert cpu.outlier_cache_stats() == ((1, 2, 2 * 40 * 4) if keeps else (0, 0, 0))
    assert torch.equal(cpu.int8_linear_cpu(x, CB, SCB, bias, 6.0, w, kernel), first)  # from the kept ones
    # Other outlier columns: 30 comes from what was kept, 50 is read (then kept too).
    x2 = kept_case(M, (30, 50), seed=1)[0]
    y2 = cpu.int8_linear_cpu(x2, CB, SCB, bias, 6.0, w, kernel)
    assert_within_outlier_bound(y2, x2, w, CB, SCB, bias)
    assert cpu.outlier_cache_stats()[:2] == ((1, 3) if keeps else (0, 0))
    # CB's columns are kept unscaled: another SCB with the same CB scales them its own way.
    y3 = cpu.int8_linear_cpu(x2, CB, SCB * 2, bias, 6.0, w, kernel)
    assert_within_outlier_bound(y3, x2, w, CB, SCB * 2, bias)
    cpu.clear_outlier_cache()
    assert torch.equal(cpu.int8_linear_cpu(x2, CB, SCB, bias, 6.0, w, kernel), y2)


@needs_library
@pytest.mark.parametrize("M", [1, 20])
def test_kept_outlier_columns_follow_in_place_updates_and_go_with_their_weight(M):
    cpu.clear_outlier_cache()
    x, weight, bias, CB, SCB = kept_case(M, (3, 30))
    before = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, weight)
    weight.mul_(2)  # bumps the version: the kept columns are stale (CB is the caller's to update)
    after = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, weight)
    assert_within_outlier_bound(after, x, weight, CB, SCB, bias)
    assert not torch.equal(after, before)
    assert cpu.outlier_cache_stats()[:2] == (1, 2)
    # A change below the weight's counter (a DTensor's shard, W.data) that the caller answers
    # by requantizing CB in place, as the backend does: the kept columns go with the old CB.
    weight.data.mul_(3)
    new_CB, new_SCB = reference.quantize_weight(weight)
    CB.copy_(new_CB)
    SCB.copy_(new_SCB)
    assert_within_outlier_bound(torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, weight), x, weight, CB, SCB, bias)
    del weight
    assert cpu.outlier_cache_stats() == (0, 0, 0)  # freed with its weight
    if M >= 16:  # CB's own columns (kept where the tiles do not read them from CB's rows)
        torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, None)
        new_CB, new_SCB = reference.quantize_weight(torch.randn(40, 64, generator=torch.Generator().manual_seed(9)))
        CB.copy_(new_CB)  # the backend's requantization: in place, into the same tensors
        SCB.copy_(new_SCB)
        assert_within_outlier_bound(torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, None), x, None, CB, SCB, bias)


@needs_library
@pytest.mark.parametrize("fp_weight", [True, False])
def test_kept_outlier_columns_feed_the_blas_outlier_part_bit_for_bit(fp_weight):
    # 8 outlier columns over 16 rows go to BLAS; at K = 2048 all 8 can be kept (K / 256).
    cpu.clear_outlier_cache()
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 2048, generator=generator) * 2).clamp(-4, 4)
    x[:, list(range(5, 2048, 256))] = 20.0
    weight = torch.randn(24, 2048, generator=generator) / 45
    CB, SCB = reference.quantize_weight(weight)
    w = weight if fp_weight else None
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, w)
    assert_within_outlier_bound(y, x, w, CB, SCB, None)
    assert cpu.outlier_cache_stats() == (1, 8, 8 * 24 * 4)
    assert torch.equal(torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, w), y)  # from the kept columns
    with torch.inference_mode():  # never kept: the columns come from index_select, as for wider sets
        w_frozen, CB_frozen = (None if w is None else w.clone()), CB.clone()
    assert torch.equal(torch.ops.int8fx.int8_linear(x, CB_frozen, SCB, None, 6.0, w_frozen), y)
    assert cpu.outlier_cache_stats()[:2] == (1, 8)


@needs_library
def test_kept_outlier_columns_are_bounded_per_weight():
    cpu.clear_outlier_cache()
    x, weight, bias, CB, SCB = kept_case(1, range(0, 60, 6))  # 10 outlier columns
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, weight)
    assert_within_outlier_bound(y, x, weight, CB, SCB, bias)
    assert cpu.outlier_cache_stats() == (1, 4, 4 * 40 * 4)  # max(4, K / 256) columns kept; the rest read each call
    assert torch.equal(torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, weight), y)


@needs_library
def test_kept_outlier_columns_are_per_view_and_never_of_inference_tensors():
    cpu.clear_outlier_cache()
    x = kept_case(1, (3, 30))[0]
    both = torch.randn(80, 64, generator=torch.Generator().manual_seed(5)) / 8
    for rows in (slice(0, 40), slice(40, 80)):  # two weights in one storage, at different offsets
        weight = both[rows]
        CB, SCB = reference.quantize_weight(weight)
        assert_within_outlier_bound(torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, weight), x, weight, CB, SCB, None)
    assert cpu.outlier_cache_stats()[:2] == (2, 4)
    with torch.inference_mode():
        frozen = both[:40].clone()  # no version counter: an in-place update could not be seen
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, frozen)
    assert_within_outlier_bound(y, x, frozen, CB, SCB, None)
    assert cpu.outlier_cache_stats()[:2] == (2, 4)


# ---------------------------------------------------------------- the AMX kernel, emulated


@pytest.fixture(scope="module")
def emulated_amx():
    """gemm_amx.cpp built with scalar stand-ins for the tile instructions (amx_emulation.h):
    its packing, blocking and edges, checked on CPUs without AMX."""
    import ctypes

    from torch.utils import cpp_extension

    if not has_compiler_and_avx2():
        pytest.skip("needs a C++ compiler and AVX2")
    # Its packing and epilogue are AVX-512, as on every AMX CPU.
    needs = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    if not needs.issubset(cpu._cpu_flags()):
        pytest.skip(f"the emulated AMX kernel needs {'/'.join(sorted(needs))}; this CPU ({cpu.cpu_model()}) lacks it")
    if not cpu.isa_allowed("avx512_vnni"):
        pytest.skip(f"the emulated AMX kernel needs AVX-512, ruled out by {cpu.MAX_ISA_VARIABLE}={cpu.isa_cap()}")
    source = os.path.join(os.path.dirname(build.__file__), "gemm_amx.cpp")
    directory = build.build_directory("int8fx_amx_emulation")
    with build.exclusive_build(directory):
        path = cpp_extension.load(
            name="int8fx_amx_emulation",
            sources=[source],
            extra_cflags=[*build.CFLAGS, "-DINT8FX_EMULATE_AMX"],
            build_directory=directory,
            is_python_module=False,
        )
    library = ctypes.CDLL(path)
    library.int8fx_emulated_amx_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
    library.int8fx_emulated_amx_linear.argtypes = (
        [ctypes.c_void_p] * 2
        + [ctypes.c_int64] * 3
        + [ctypes.c_void_p] * 3
        + [ctypes.c_int]
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64]
        + [ctypes.c_void_p] * 2
    )
    library.int8fx_emulated_amx_bf16_outliers.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return library


def test_emulated_amx_self_check_passes(emulated_amx):
    assert emulated_amx.int8fx_emulated_amx_self_check() == 1


@pytest.mark.parametrize("m_chunk, n_block", [(64, 48), (16, 16), (1024, 1024)])
def test_emulated_amx_matches_reference(emulated_amx, m_chunk, n_block):
    # Ragged edges in every dimension: M and N around the 16-row tiles and 32-row passes,
    # K around the 64-byte k-step (the last group of B rows is padded, the others read on).
    for M in (1, 16, 17, 33, 70):
        for K in (1, 63, 64, 65, 130):
            for N in (1, 16, 17, 32, 33, 50):
                CA, CB = random_int8(M, K, seed=M * K + N, low=-128), random_int8(N, K, seed=N)
                C = torch.empty(M, N, dtype=torch.int32)
                emulated_amx.int8fx_emulated_amx_gemm(CA.data_ptr(), CB.data_ptr(), C.data_ptr(), M, N, K, m_chunk, n_block)
                assert torch.equal(C, reference.int8_matmul(CA, CB)), (M, K, N)


def test_emulated_amx_bf16_outlier_part(emulated_amx):
    # The outlier part of a bf16 model in AMX-BF16 tiles, with Intel's pseudo-code for the tile
    # product: fp32 sums in column order (bf16 products are exact), so bit for bit a sequential
    # fp32 sum. Ragged rows, outputs and columns around the 16 x 16 tiles, the 32 columns of a
    # k-step and the three output groups a pass computes.
    for M, count, N in ((1, 1, 1), (17, 33, 50), (40, 64, 16), (33, 70, 49)):
        generator = torch.Generator().manual_seed(M + count)
        X = (torch.randn(M, count, generator=generator) * 8).bfloat16().float()
        W = torch.randn(count, N, generator=generator).bfloat16().float()
        out = torch.full((M, N), float("nan"))
        emulated_amx.int8fx_emulated_amx_bf16_outliers(X.data_ptr(), M, count, W.data_ptr(), N, out.data_ptr())
        expected = torch.zeros(M, N)
        for o in range(count):
            expected = expected + X[:, o : o + 1] * W[o]
        assert torch.equal(out, expected), (M, count, N)


@pytest.mark.parametrize("with_bias, outliers", [(False, "none"), (True, "in the output"), (True, "gathered"), (False, "gathered")])
def test_emulated_amx_dequantizes_as_the_reference(emulated_amx, with_bias, outliers):
    # The epilogue transposes each tile and dequantizes 16 outputs at a time: bit for bit
    # reference.dequantize_output, then the outlier part (already in the output, or summed
    # here from the gathered columns, in OutlierColumns::sum's order), then the bias.
    for M, K, N in ((33, 130, 50), (16, 64, 16), (70, 65, 17)):
        CA, CB = random_int8(M, K, seed=M + K, low=-128), random_int8(N, K, seed=N)
        generator = torch.Generator().manual_seed(M)
        SCA, SCB = torch.rand(M, generator=generator) * 8, torch.rand(N, generator=generator)
        bias = torch.randn(N, generator=generator) if with_bias else None
        X = torch.randn(M, K, generator=generator)
        columns = torch.tensor([1, 7, K - 1] if outliers == "gathered" else [], dtype=torch.long)
        gathered = torch.randn(len(columns), N, generator=generator)
        outlier_part = torch.randn(M, N, generator=generator) if outliers == "in the output" else torch.zeros(M, N)
        for o, column in enumerate(columns.tolist()):
            product = X[:, column : column + 1] * gathered[o]
            outlier_part = product if o == 0 else outlier_part + product
        out = torch.randn(M, N, generator=generator) if outliers == "gathered" else outlier_part.clone()
        emulated_amx.int8fx_emulated_amx_linear(
            CA.data_ptr(),
            CB.data_ptr(),
            M,
            N,
            K,
            SCA.data_ptr(),
            SCB.data_ptr(),
            bias.data_ptr() if with_bias else None,
            outliers == "in the output",
            X.data_ptr(),
            columns.data_ptr(),
            len(columns),
            gathered.data_ptr(),
            out.data_ptr(),
        )
        expected = reference.dequantize_output(reference.int8_matmul(CA, CB), SCA, SCB)
        if outliers != "none":
            expected = expected + outlier_part
        if with_bias:
            expected = expected + bias
        assert torch.equal(out, expected), (M, K, N)
