#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU build), int8fx (editable), the test tools, the
# real-model demo packages and bitsandbytes (the peer of the interop tests). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
export PYTHON=.venv/bin/python
$PYTHON -m pip install -q --upgrade pip
# The torch build is installed first and on its own, so nothing later can swap it:
# int8fx accepts any installed torch 2.11-2.13.
$PYTHON -m pip install -q "torch==2.13.0"
$PYTHON -m pip install -q -e ".[test]"
bash scripts/install_demo.sh
bash scripts/install_bnb.sh
# The CPU kernels' C++ library is built on first use (about 30 s): build it now, so that
# neither the first demo nor the first test waits for it (where it cannot be built, int8fx
# falls back to torch's kernels and says so here).
$PYTHON -c "from int8fx.kernels import cpu; print('int8fx CPU kernels:', ', '.join(cpu.kernels()) if cpu.load() else 'not built (torch fallback)')"
$PYTHON -c "import torch, int8fx; print('int8fx', int8fx.__version__, 'on torch', torch.__version__)"
