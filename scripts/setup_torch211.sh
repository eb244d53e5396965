#!/usr/bin/env bash
# Creates .venv-torch211 with torch 2.11 and triton 3.6, the stack of the lent GPU machines,
# to run the test suite on the oldest torch int8fx supports:
#     bash scripts/setup_torch211.sh && CI=true .venv-torch211/bin/python -m pytest -q
# torch 2.11 comes as a CUDA build here (about 4.6 GB in the venv); it runs on the CPU.
# numpy stays below 2.4: triton 3.6's interpreter converts 1-element arrays to Python ints,
# which numpy 2.4 refuses (TRITON_INTERPRET=1 tests fail with "only 0-dimensional arrays").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-torch211
export PYTHON=.venv-torch211/bin/python
$PYTHON -m pip install -q --upgrade pip
$PYTHON -m pip install -q "torch==2.11.0"
$PYTHON -m pip install -q -e ".[test]"
bash scripts/install_demo.sh
bash scripts/install_bnb.sh
$PYTHON -m pip install -q "numpy<2.4"
$PYTHON -c "import torch, triton, int8fx; print('int8fx', int8fx.__version__, 'on torch', torch.__version__, 'triton', triton.__version__)"
