"""Step 5 of the backend: what runs on every call of a rewritten graph."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from int8fx.passes import QuantizedInput, appended_inputs
from int8fx.weights import STORE, QuantizedWeight, release_fp_weight

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
    ) -> None:
        self.compiled = compiled
        self.probe = probe  # run once, on the first call (backend/probe.py)
        # Released on the first call, not at compile time: dynamo re-checks its guards
        # (shapes and strides of every input) right after compiling.
        self.release_positions = release_positions
        self.quantized_inputs = quantized_inputs
        self.weights = weights

    def __call__(self, *args: Any) -> Any:
        if self.release_positions:
            freed = sum(release_fp_weight(args[i]) for i in self.release_positions)
            log.info("int8lt: released %.1f MiB of floating-point weights", freed / 2**20)
            self.release_positions = []
        for slot, (wanted, weight) in enumerate(zip(self.quantized_inputs, self.weights)):
            param = args[wanted.weight_input_index]
            if not weight.is_current_for(param):
                self.weights[slot] = STORE.get(param, wanted.layout)
        inputs = (*args, *appended_inputs((w.CB, w.SCB) for w in self.weights))
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe(*inputs)
        return self.compiled(*inputs)
