#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU build), int8fx (editable) and the test tools.
# Safe to re-run. Set INT8FX_EXTRAS="demo" to also install the real-model demo packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip
# The torch build is installed first and on its own, so nothing later can swap it:
# int8fx accepts any installed torch 2.11-2.13.
$pip install -q "torch==2.13.0"
$pip install -q -e ".[test]"
for extra in ${INT8FX_EXTRAS:-}; do
  if [ -f "scripts/install_${extra}.sh" ]; then
    PYTHON=.venv/bin/python bash "scripts/install_${extra}.sh"
  fi
done
.venv/bin/python -c "import torch, int8fx; print('int8fx', int8fx.__version__, 'on torch', torch.__version__)"
