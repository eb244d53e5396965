"""Full module paths of parameters, read from the live module tree, not from dynamo's frame.

After a graph break dynamo compiles an inner module's ``forward`` as a frame of its own: the
paths it records are relative to that module (``self_attn.q_proj``), and one compiled graph
may serve every layer. A skip entry such as ``"model.layers.0.self_attn"`` would then match
nothing and be silently ignored. The parameters themselves say where they are: the modules
that own them, and those modules' parents, up to the model. This module finds that path
(``model.layers.0.self_attn.q_proj``, as ``named_modules()`` names it from the top).

The tree is read from the garbage collector's list of live modules, once, and read again
only when a parameter it does not know shows up.
"""

from __future__ import annotations

import gc
from typing import Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

MAX_PATHS = 8  # a module reachable many ways (shared between parents): enough to decide a skip


class ParameterPaths:
    """``of(param)``: the full paths of the modules that own ``param`` (tied weights: several)."""

    def __init__(self) -> None:
        self._paths: Optional[WeakIdKeyDictionary] = None

    def of(self, param: torch.Tensor) -> tuple[str, ...]:
        if self._paths is None or param not in self._paths:
            self._paths = _scan()
            if param not in self._paths:
                self._paths[param] = ()  # in no module (a free tensor): do not scan again for it
        return self._paths[param]

    def call_site(self, param: torch.Tensor, call_path: str, param_name: str) -> str:
        """The full path of the module at ``call_path`` within a compiled frame, from a parameter
        that frame reads as ``param_name`` (both dynamo's, relative to the frame's module).

        The frame's own module is where ``param``'s owner sits minus the owner's path within
        the frame; the call site is ``call_path`` from there. ``call_path`` if nothing fits.
        """
        owner_in_frame = param_name.rpartition(".")[0]  # "self_attn.q_proj" of "self_attn.q_proj.weight"
        for owner in self.of(param):
            if not owner_in_frame:
                frame = owner
            elif owner == owner_in_frame:
                frame = ""
            elif owner.endswith("." + owner_in_frame):
                frame = owner[: -len(owner_in_frame) - 1]
            else:
                continue
            return f"{frame}.{call_path}" if frame and call_path else frame or call_path
        return call_path


def live_modules() -> list[nn.Module]:
    """Every module alive in the process (the garbage collector's list)."""
    # type(), not isinstance(): isinstance on a dead weakref.proxy raises ReferenceError.
    return [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]


def _scan() -> WeakIdKeyDictionary:
    modules = live_modules()
    # A model passed to torch.compile is the root its paths start from, as named_modules() of
    # it names them, even when a bigger model holds it.
    compiled_roots = {id(module._orig_mod) for module in modules if _is_compile_wrapper(module)}
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in modules:
        if _is_compile_wrapper(module):
            continue
        for name, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((module, name))
    memo: dict[int, list[str]] = {}

    def paths_of(module: nn.Module, visiting: frozenset = frozenset()) -> list[str]:
        if id(module) in memo:
            return memo[id(module)]
        if id(module) in compiled_roots:
            return [""]
        found = []
        for parent, name in parents.get(id(module), []):
            if id(parent) in visiting:
                continue  # a cycle in the module graph: not a path
            found += [f"{path}.{name}" if path else name for path in paths_of(parent, visiting | {id(module)})]
        memo[id(module)] = found[:MAX_PATHS] or [""]  # no parent: the root
        return memo[id(module)]

    owners = WeakIdKeyDictionary()
    for module in modules:
        for param in module._parameters.values():
            if param is not None:
                owners[param] = tuple(dict.fromkeys((*owners.get(param, ()), *paths_of(module))))[:MAX_PATHS]
    return owners


def _is_compile_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


PATHS = ParameterPaths()  # one tree for the process: every backend reads the same modules
