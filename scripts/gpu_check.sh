#!/usr/bin/env bash
# The GPU check (issue 14): what every session lent a GPU runs first, as ONE device-tool call:
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)      # no carry
#
# (RUN_COMMAND, RUN_TIMEOUT_S and RUN_CARRY in benchmarks/gpu_check.py; a test keeps them equal
# to this line.) Six stages, each in its own process under its own time limit, 8 minutes in all:
#
#   env 10 s | ceilings 25 s | pytest -m gpu 100 s | bench_linear 140 s | model 150 s | loading 45 s
#
# (the plan behind each budget is in benchmarks/gpu_check.py's docstring). Everything lands in
# $OUT (gpu_check.log, results.json, summary.md, gpu_linear.csv/.png, gpu_model.csv); the summary
# table is printed last. Rerun some stages: bash scripts/gpu_check.sh --stages pytest bench
#
# Here, without a GPU: bash scripts/gpu_check.sh --dry-run   (every stage on CPU, tiny shapes,
# Triton interpreted; tests/test_gpu_check.py runs it).
set -u
cd "$(dirname "$0")/.."

dry_run=0
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && dry_run=1
done
# The GPU machine's python3 holds torch, triton and transformers; int8fx comes from this tree.
# A dry run here prefers the project's virtualenv. PYTHON overrides both.
if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
elif [ "$dry_run" = 1 ] && [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=python3
fi
out="${OUT:-benchmarks/results/gpu_check}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A last resort above the stages' own limits (480 s in all), so the call returns before its timeout_s.
exec timeout --kill-after=10 510 "$python" benchmarks/gpu_check.py --out "$out" "$@"
