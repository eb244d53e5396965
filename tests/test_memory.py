"""``release_weights``: the replaced layers keep only int8 weights plus fp32 row scales, safely.

The > 60 dB floor against ``reference_int8`` is derived in ``test_backend.py``'s docstring:
fp32 rounding plus at most about one int8 rounding flip.
"""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import int8fx
from int8fx import reference
from int8fx.weights import STORE, ReleasedWeightError
from tests.models import TiedLM, reference_int8

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def stack(dims=(256, 512, 256, 128)):
    torch.manual_seed(0)
    layers = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).requires_grad_(False)


def linear_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def test_released_layers_hold_a_quarter_of_fp32_and_half_of_fp16_bytes():
    model = stack()
    weights = linear_weights(model)
    fp32_bytes = sum(w.numel() * 4 for w in weights)
    run = torch.compile(model, backend=int8fx.int8lt(inner="eager", release_weights=True))
    run(torch.randn(2, 256))
    quantized = [STORE.get(w, "out_in") for w in weights]
    int8_bytes = sum(q.CB.untyped_storage().nbytes() + q.SCB.untyped_storage().nbytes() for q in quantized)
    with torch._C.DisableTorchFunctionSubclass():
        left_fp_bytes = sum(w.untyped_storage().nbytes() for w in weights)
    assert left_fp_bytes == 4 * len(weights)  # one NaN element each
    # int8 + one fp32 scale per row = 1/4 + 1/K of fp32, 1/2 + 2/K of fp16.
    assert (int8_bytes + left_fp_bytes) / fp32_bytes <= 0.27
    assert (int8_bytes + left_fp_bytes) / (fp32_bytes / 2) <= 0.52
    assert counters["int8fx"]["weights_released"] == 3


def test_recompiles_keep_working_and_match_the_int8_outlier_reference():
    model = stack()
    expected_model = reference_int8(model, 6.0)
    for layer in expected_model.modules():
        if hasattr(layer, "CB"):
            layer.weight = None  # released weights: outlier columns from the int8 weight
    run = torch.compile(model, backend=int8fx.int8lt(inner="eager", release_weights=True))
    for batch in (2, 5, 3):
        x = torch.randn(batch, 256)
        x[:, 7] = 30.0
        out = run(x)
        assert reference.sqnr_db(expected_model(x), out) > 60
    assert counters["int8fx"]["weights_quantized"] == 3  # never requantized from the freed data


def test_eager_use_of_released_weights_raises_a_clear_error():
    model = stack()
    torch.compile(model, backend=int8fx.int8lt(inner="eager", release_weights=True))(torch.randn(2, 256))
    weight = model[0].weight
    for touch in (lambda: model(torch.randn(2, 256)), lambda: weight.sum(), lambda: model.state_dict(), lambda: weight + 1):
        with pytest.raises(ReleasedWeightError, match="release_weights"):
            touch()
    assert "released by int8fx" in repr(weight)
    # Metadata never reads the data (and torch 2.11's dynamo reads it while building guards).
    assert weight.shape == (512, 256) and weight.dtype == torch.float32 and weight.numel() == 512 * 256
    with pytest.raises(ReleasedWeightError, match="T on a released weight"):
        _ = weight.T  # a view of the data is not metadata


def test_weights_read_elsewhere_are_kept():
    model = TiedLM(vocab=64, dim=32).requires_grad_(False)
    # The tied head quantized on purpose: its weight is the one the embedding still reads.
    backend = int8fx.int8lt(inner="eager", release_weights=True, skip=(), quantize_tied_heads=True)
    torch.compile(model, backend=backend)(torch.randint(0, 64, (2, 5)))
    assert len(backend.reports[0].replaced) == 2
    assert counters["int8fx"]["weights_released"] == 1  # proj only: the embedding still reads its weight
    model.embed_tokens(torch.tensor([1]))  # still usable eagerly


@pytest.mark.slow  # a subprocess: seconds to minutes
def test_process_memory_drops_by_the_released_bytes():
    # Two 64 MiB fp32 weights; RSS is read from /proc in a fresh process.
    script = """
import torch, int8fx
from torch import nn
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
model = nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 4096)).requires_grad_(False)
x = torch.randn(1, 4096)
run = torch.compile(model, backend=int8fx.int8lt(inner='eager', release_weights=True))
run(x)
after_first = rss()
del run
model2 = nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 4096)).requires_grad_(False)
before = rss()
torch.compile(model2, backend=int8fx.int8lt(inner='eager', release_weights=True))(x)
print(before, rss())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = map(int, result.stdout.split())
    fp32_bytes = 2 * 4096 * 4096 * 4
    # Released: 128 MiB of fp32; added: 32 MiB of int8. Allow 16 MiB of allocator slack.
    assert after - before <= -(fp32_bytes - fp32_bytes / 4) + 16 * 2**20, (before / 2**20, after / 2**20)


@pytest.mark.slow  # a subprocess: seconds to minutes
def test_bench_memory_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_memory.py", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header = (tmp_path / "bench_memory.csv").read_text().splitlines()[0]
    assert header.split(",") == ["layers", "dim", "fp32_weights_MiB", "int8lt_released_MiB", "ratio_vs_fp32", "ratio_vs_fp16", "sqnr_dB"]
