"""``scripts/gpu_check.sh``, the one command a session lent a GPU runs first: its dry run (every
stage's plumbing on CPU, tiny shapes, Triton interpreted) and the device tool's limits it must fit."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu_model  # noqa: E402  (benchmarks/ is not a package)
import gpu_check  # noqa: E402

from int8fx.kernels import cpu  # noqa: E402

# The device tool's limits (its README): a command of at most 2,000 characters, at most 10
# minutes per command, 64 MiB of working tree, 8 files of at most 16 MiB back from $OUT, at
# most 2 folders deep, named in letters, digits, '.', '_' and '-'.
COMMAND_CHARACTERS = 2000
COMMAND_SECONDS = 600
TREE_BYTES = 64 * 2**20
OUT_FILES = 8
OUT_FILE_BYTES = 16 * 2**20
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def test_run_command_fits_the_device_tool():
    assert len(gpu_check.RUN_COMMAND) < COMMAND_CHARACTERS
    assert gpu_check.RUN_CARRY == []
    # the stages' budgets fit the 8-minute plan, and the plan fits the call with a margin
    assert sum(stage.budget_s for stage in gpu_check.STAGES) <= gpu_check.TOTAL_BUDGET_S <= 8 * 60
    assert gpu_check.TOTAL_BUDGET_S + 30 <= gpu_check.RUN_TIMEOUT_S <= COMMAND_SECONDS
    printed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--print-run-command"], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(printed) == {"command": gpu_check.RUN_COMMAND, "timeout_s": gpu_check.RUN_TIMEOUT_S, "carry": []}


def test_the_command_is_written_where_sessions_look():
    call = f'run(command="{gpu_check.RUN_COMMAND}", timeout_s={gpu_check.RUN_TIMEOUT_S})'
    assert call in (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert call in (ROOT / "benchmarks" / "README.md").read_text()
    assert gpu_check.RUN_COMMAND in (ROOT / "README.md").read_text()
    # the shell script's last-resort limit ends the call before the tool's own
    limit = int(re.search(r"timeout --kill-after=(\d+) (\d+)", (ROOT / "scripts" / "gpu_check.sh").read_text()).group(2))
    assert gpu_check.TOTAL_BUDGET_S < limit < gpu_check.RUN_TIMEOUT_S


def test_working_tree_travels():
    # What the device tool sends: tracked files and untracked ones git does not ignore.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    sizes = {name: os.path.getsize(ROOT / name) for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file()}
    assert sum(sizes.values()) < TREE_BYTES // 2, "the working tree is near the device tool's 64 MiB"
    assert not [name for name, size in sizes.items() if size > 4 * 2**20], "large files would travel with every call"


def test_predictions_in_the_readme_are_the_model_s():
    # benchmarks/README.md's ahead-of-time table is this function's output, so the two cannot drift.
    assert gpu_check.predictions_markdown() in (ROOT / "benchmarks" / "README.md").read_text()


@pytest.mark.parametrize("provider, int8", [("torch bf16", False), ("_int_mm+dequant", True), ("int8fx t=0", True), ("int8fx t=6", True)])
def test_predictions_never_beat_the_roofline(provider, int8):
    for shape in gpu_check.GPU_SHAPES:
        K, N = (int(v) for v in shape.split("x"))
        for M in gpu_check.GPU_M:
            predicted = gpu_check.predicted_us(provider, M, K, N)
            assert predicted is None or predicted >= gpu_check.roofline_us(M, K, N, int8)


def test_outlier_work_is_predicted_to_cost_time():
    t0, t6 = (gpu_check.predicted_us(p, 1, 4096, 4096) for p in ("int8fx t=0", "int8fx t=6"))
    assert t6 > t0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the tests below: about 40 s here (2 cores), most of it interpreted Triton."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    return out, result


def test_dry_run_passes_every_stage(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert list(stages) == [stage.name for stage in gpu_check.STAGES]
    statuses = {name: entry["status"] for name, entry in stages.items()}
    assert statuses == {"env": "ok", "ceilings": "ok", "pytest": "ok", "bench": "ok", "model": "ok", "loading": "ok"}, result.stdout[-6000:]
    assert all(entry["seconds"] <= entry["budget_s"] for entry in stages.values())
    counts = stages["pytest"]["data"]["counts"]
    assert counts["tests"] > 40 and counts["failures"] == counts["errors"] == 0  # the GPU tests ran, on CPU
    # CUDA graphs, test_nn's CUDA move and test_hf's loads onto one and two GPUs need real devices.
    assert counts["skipped"] <= 5


def test_dry_run_tests_and_times_the_host_cpu_kernels(dry_run):
    out, result = dry_run
    host = json.loads((out / "results.json").read_text())["stages"]["pytest"]["data"]["host"]
    assert host["cpu"]["isa"] and host["returncode"] == 0 and host["counts"]["tests"] >= 2
    for row in host["bench"]:  # every kernel this CPU runs, oneDNN's, the op at both thresholds
        assert {"gemm onednn", "int8fx t=0", "int8fx t=6", "bf16 F.linear"} <= set(row)
        assert all(row[key] > 0 for key in row if key not in ("M", "chosen"))
    # The timings need the CPU library (not loaded without AVX2, or under INT8FX_MAX_CPU_ISA=none).
    assert bool(host["bench"]) == cpu.load() == ("### Host CPU (ms)" in result.stdout)


def test_dry_run_output_comes_back_from_the_device(dry_run):
    out, _ = dry_run
    files = [path for path in out.rglob("*") if path.is_file()]
    assert 0 < len(files) <= OUT_FILES
    for path in files:
        relative = path.relative_to(out)
        assert len(relative.parts) <= 3 and all(OUT_NAME.match(part) for part in relative.parts), relative
        assert path.stat().st_size <= OUT_FILE_BYTES
    assert {"gpu_check.log", "results.json", "summary.md", "gpu_linear.csv", "gpu_model.csv"} <= {p.name for p in files}


def test_dry_run_prints_the_stage_table_last(dry_run):
    out, result = dry_run
    tail = result.stdout.rstrip().splitlines()
    stage_table = tail[-len(gpu_check.STAGES) - 2 :]
    assert stage_table[0] == "| stage | status | seconds | budget s | result |"
    assert [line.split("|")[1].strip() for line in stage_table[2:]] == [stage.name for stage in gpu_check.STAGES]
    assert "### Targets (issue 14)" in result.stdout and "### One linear" in result.stdout
    assert (out / "summary.md").read_text().rstrip().endswith(tail[-1])


def test_dry_run_benchmarks_every_provider_and_column(dry_run):
    out, _ = dry_run
    with open(out / "gpu_linear.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["shape"], r["M"]) for r in rows} == {(s, str(m)) for s in gpu_check.DRY_SHAPES for m in gpu_check.DRY_M}
    providers = {r["provider"] for r in rows}
    assert {"torch bf16", "torch fp16", "_int_mm+dequant", "int8fx t=0", "int8fx t=6"} <= providers
    for row in rows:
        assert float(row["ms"]) > 0 and float(row["roofline_ms"]) > 0 and float(row["pct_copy_bw"]) > 0
        if row["provider"] in gpu_check.GRAPH_PROVIDERS:
            assert float(row["graph_ms"]) > 0 and float(row["predicted_graph_ms"]) > 0
    with open(out / "gpu_model.csv", newline="") as handle:
        model = {r["provider"]: r for r in csv.DictReader(handle)}
    assert set(model) == {name for name, _, _ in bench_gpu_model.PROVIDERS}
    for row in model.values():
        assert float(row["prefill_ms"]) > 0 and float(row["decode_tokens_per_s"]) > 0
        assert float(row["sqnr_vs_fp32_db"]) > 10
    for name in ("int8lt t=6", "int8lt t=6, CUDA graphs"):
        # int8lt rewrote every linear but lm_head, in the prefill and the decode graph, and the
        # compiled model follows the pure-torch reference on the same tokens
        layers = bench_gpu_model.DRY_SETUP.layers
        assert int(model[name]["int8_linears"]) == 2 * 7 * layers
        assert float(model[name]["sqnr_vs_reference_db"]) > 25
