#!/usr/bin/env bash
# bitsandbytes (the peer we stay compatible with) and safetensors, for the interop tests.
# --no-deps: bitsandbytes declares torch, and pip must never swap the installed build.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --no-deps "bitsandbytes>=0.50,<0.51" "safetensors>=0.4"
"$PYTHON" -m pip install -q numpy packaging
