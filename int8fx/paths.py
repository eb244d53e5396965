"""The names the backend, its passes, the weight store and the module swap share.

* ``WeightLayout``: how a linear's weight parameter is stored;
* ``normalize_source_path``: dynamo's source names turned into ``named_modules()`` paths;
* ``matches_skip``: the one rule that decides whether a module path is skipped.

A leaf module: it imports nothing else from int8fx.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

# "out_in": stored [N, K] like nn.Linear's weight; "in_out": stored [K, N] like GPT-2's Conv1D.
WeightLayout = Literal["out_in", "in_out"]


def normalize_source_path(path: str) -> str:
    """``L['self'].model._modules['layers'][0]._parameters['weight']`` -> ``model.layers.0.weight``.

    The root is the compiled module, whatever dynamo calls it: ``L['self']``, or ``L['args'][0]``
    when a decorator's ``*args`` wrapper (as on transformers' ``*ForCausalLM.forward``) passes
    ``self`` on, so that paths equal ``named_modules()`` names either way.
    """
    path = re.sub(r"^L\['[^']*'\](?:\[\d+\])?\.?", "", path)
    path = re.sub(r"(?:^|\.)_(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"getattr\([^,]*,\s*'([^']*)'\)", r"\1", path)
    return path.strip(".")


def matches_skip(module_path: str, skip: tuple[str, ...]) -> Optional[str]:
    """The skip entry naming ``module_path`` or one of its ancestors' component runs, if any."""
    padded = f".{module_path}."
    for entry in skip:
        if f".{entry}." in padded:
            return entry
    return None
