#!/usr/bin/env bash
# torchao, the int8 dynamic-quantization peer of benchmarks/bench_linear.py and
# benchmarks/bench_model.py (skipped there when it is not installed). Optional and not part
# of scripts/setup.sh: once installed, transformers imports it on every model load, and on
# a CPU-only torch it logs that its CUDA-only extensions cannot load (harmless, but noise in
# the demo's output). torchao 0.18 runs Int8DynamicActivationInt8WeightConfig, eager and
# compiled, on torch 2.13 CPU. --no-deps: pip must never swap the installed torch build.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --no-deps "torchao>=0.18,<0.19"
