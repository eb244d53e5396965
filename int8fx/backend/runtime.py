"""Step 5 of the backend: what runs on every call of a rewritten graph."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from torch.utils.weak import WeakIdKeyDictionary

from int8fx.backend.module_paths import PATHS, live_modules
from int8fx.passes import QuantizedInput, appended_inputs
from int8fx.paths import matches_skip
from int8fx.weights import STORE, QuantizedWeight, guard_modules_holding, release_fp_weight

log = logging.getLogger("int8fx")


class Int8Runtime:
    """Calls the compiled graph with the current quantized weights appended to its inputs,
    requantizing any weight that was changed in place since the last call."""

    def __init__(
        self,
        compiled: Callable,
        quantized_inputs: list[QuantizedInput],
        weights: list[QuantizedWeight],
        release_positions: list[int],
        probe: Optional[Callable[..., None]] = None,
        shared: Optional["SharedGraphSkips"] = None,
        compile_fp: Optional[Callable[[list], Callable]] = None,
    ) -> None:
        self.compiled = compiled
        self.probe = probe  # run once, on the first call (backend/probe.py)
        # Before quantizing a parameter other than the compiled ones (another module this graph
        # serves), ask ``shared``; the calls of a skipped module run ``compile_fp``'s graph.
        self.shared = shared
        self.compile_fp = compile_fp
        self.fp_graph: Optional[Callable] = None
        # Released on the first call, not at compile time: dynamo re-checks its guards
        # (shapes and strides of every input) right after compiling.
        self.release_positions = release_positions
        self.quantized_inputs = quantized_inputs
        self.weights = weights

    def __call__(self, *args: Any) -> Any:
        if self.release_positions:
            self._release(args)
        for slot, (wanted, weight) in enumerate(zip(self.quantized_inputs, self.weights)):
            param = args[wanted.weight_input_index]
            current = weight.is_current_for(param)
            other_module = not current and weight.param_ref() is not param
            if self.shared is not None and (other_module or self.shared.has_fp) and self.shared.stays_fp(param, wanted.weight_input_index):
                return self._run_in_fp(args)
            if not current:
                self.weights[slot] = STORE.get(param, wanted.layout)
        inputs = (*args, *appended_inputs((w.CB, w.SCB) for w in self.weights))
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe(*inputs)
        return self.compiled(*inputs)

    def _release(self, args: tuple) -> None:
        freed = sum(release_fp_weight(args[i]) for i in self.release_positions)
        log.info("int8lt: released %.1f MiB of floating-point weights", freed / 2**20)
        # The DTensor parameters whose local shards these were (tensor parallelism).
        refs = [w.owner_ref for q, w in zip(self.quantized_inputs, self.weights) if q.weight_input_index in self.release_positions]
        owners = [owner for owner in (ref() for ref in refs if ref is not None) if owner is not None]
        if owners:
            guard_modules_holding(owners, live_modules())
        self.release_positions = []

    def _run_in_fp(self, args: tuple) -> Any:
        if self.fp_graph is None:
            self.fp_graph = self.compile_fp(list(args))  # the graph as dynamo gave it, compiled once
        return self.fp_graph(*args)


class SharedGraphSkips:
    """Skip decisions for the modules a graph serves besides those it was compiled for.

    After a graph break, dynamo compiles an inner module's ``forward`` once and calls the
    result for every module of that class (each layer), with that module's parameters as
    inputs. The skip list is per module path: a layer it names must not be quantized because
    the graph was compiled for another one.
    """

    def __init__(
        self, frame_paths: dict[int, tuple[str, str]], skip: tuple[str, ...], on_new_module: Callable[[str, Optional[str], tuple], None]
    ) -> None:
        self.frame_paths = frame_paths  # weight input position -> (call-site path, weight name) within the frame
        self.skip = skip
        self.on_new_module = on_new_module  # (full path, matching skip entry or None, weight shape): for the report
        self.decided = WeakIdKeyDictionary()  # parameter -> stays in fp
        self.has_fp = False  # some module this graph serves runs in fp: check every call

    def keep_in_fp(self, params: Any) -> None:
        """Modules the plan already reported in fp (the ones the graph was compiled for)."""
        for param in params:
            self.decided[param] = True
            self.has_fp = True

    def stays_fp(self, param: Any, input_index: int) -> bool:
        decision = self.decided.get(param)
        if decision is None:
            path = PATHS.call_site(param, *self.frame_paths.get(input_index, ("", "")))
            entry = matches_skip(path, self.skip)
            decision = self.decided[param] = entry is not None
            self.has_fp = self.has_fp or decision
            if entry is not None:
                log.info("int8lt: %s runs in floating point: its path matches skip entry %r", path, entry)
            self.on_new_module(path, entry, tuple(param.shape))
        return decision
