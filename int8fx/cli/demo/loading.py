"""Memory and time of loading a causal LM from safetensors: fp32, straight into int8fx, bitsandbytes.

Each load runs in a fresh Python process (``python -m int8fx.cli.demo.loading``), so that one
load's peak cannot hide in another's and the caller's own memory does not count. That process
imports what its loader needs, then measures (from ``/proc/self/status``, in MiB):

* ``baseline``: RSS after the imports, before the load; the other numbers are above it, so that
  the interpreter and torch (hundreds of MiB) do not blur the ratios of a small model;
* ``after load``: RSS once ``from_pretrained`` returned;
* ``after forward``: RSS after one forward pass of a short input. transformers memory-maps the
  safetensors files, and an fp32 weight it keeps as loaded is resident only once something reads
  it: the forward reads every weight, so this is what the loaded model really occupies;
* ``peak``: the highest RSS over the load and the forward (``VmHWM``, reset after the imports
  through ``/proc/self/clear_refs`` where the kernel allows it, else since the process started).

RSS counts file pages mapped into the process as well as its own memory: an fp32 weight read
from a memory-mapped checkpoint is resident whether transformers copies it or not.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

LOADERS = ("fp32", "int8fx", "bitsandbytes")
DEMO_LOADERS = ("fp32", "int8fx")  # the demo's comparison: bitsandbytes is the benchmark's business
FORWARD_TOKENS = 32  # the forward pass after the load: short, it reads every weight all the same
# The child's last line of stdout: this prefix, then the measurement as JSON.
RESULT_PREFIX = "int8fx-load-measurement: "
MIB = 2**20


@dataclass
class LoadMeasurement:
    loader: str
    baseline_rss_mib: float = float("nan")  # after the imports, before the load
    load_rss_mib: float = float("nan")  # above the baseline, once from_pretrained returned
    forward_rss_mib: float = float("nan")  # above the baseline, after one forward pass
    peak_rss_mib: float = float("nan")  # above the baseline: highest RSS over the load and the forward
    load_peak_rss_mib: float = float("nan")  # above the baseline: highest RSS during the load alone
    # Diagnostics, above the baseline too: the part of ``forward_rss_mib`` that is file pages
    # (the checkpoint's memory map: clean pages the kernel may drop, still counted in RSS), and
    # RSS after the forward once glibc's malloc_trim handed free heap memory back to the system
    # (what the allocator kept of temporaries, not the model, is the difference).
    forward_file_rss_mib: float = float("nan")
    trimmed_rss_mib: float = float("nan")
    load_s: float = float("nan")
    model_mib: float = float("nan")  # the loaded model's parameters and buffers (int8 weights with their scales)
    peak_since: str = ""  # "imports" (VmHWM reset after them) or "process start" (the kernel refused the reset)
    error: str = ""  # why this loader did not run (not installed, failed): its numbers are NaN

    @property
    def ok(self) -> bool:
        return not self.error


# ---------------------------------------------------------------- the parent side


def measure_load(model_dir: str | Path, loader: str, input_ids: Sequence[int], timeout_s: float = 1800) -> LoadMeasurement:
    """Loads ``model_dir`` with ``loader`` in a fresh process and runs ``input_ids`` through it once.

    A loader that cannot run (bitsandbytes not installed, a failed load) comes back with
    ``error`` set instead of raising: the other loaders' numbers still stand.
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    command = [sys.executable, "-m", "int8fx.cli.demo.loading", str(model_dir), loader, ",".join(str(int(i)) for i in input_ids)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return LoadMeasurement(loader, error=f"timed out after {timeout_s:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return LoadMeasurement(**json.loads(line[len(RESULT_PREFIX) :]))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return LoadMeasurement(loader, error=f"exit status {done.returncode}: {tail}")


def smollm2_load_comparison(tokenizer: Any, cache_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """The demo's loading rows: SmolLM2's fp32 checkpoint loaded as it is and straight into int8.

    Flat keys ``load_<loader>_<field>`` (fields of :class:`LoadMeasurement`), plus
    ``load_forward_tokens``; the forward input is BBC News text, BOS first.
    """
    from int8fx.cli.demo import models
    from int8fx.cli.demo.data import bbc_token_chunks

    model_dir = models.smollm2_safetensors(cache_dir)
    input_ids = bbc_token_chunks(tokenizer, 1, FORWARD_TOKENS)[0][0].tolist()
    result: dict[str, Any] = {"load_forward_tokens": len(input_ids)}
    for loader in DEMO_LOADERS:
        fields = asdict(measure_load(model_dir, loader, input_ids))
        result.update({f"load_{loader}_{key}": value for key, value in fields.items() if key != "loader"})
    return result


# ---------------------------------------------------------------- the child process


def _status_mib(*keys: str) -> dict[str, float]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in keys:
                values[key] = int(value.split()[0]) * 1024 / MIB  # the kernel writes kB
    return values


def _rss_mib() -> float:
    return _status_mib("VmRSS")["VmRSS"]


def _file_rss_mib() -> float:
    return _status_mib("RssFile").get("RssFile", float("nan"))


def _peak_rss_mib() -> float:
    return _status_mib("VmHWM")["VmHWM"]


def _malloc_trim() -> None:
    """Returns the heap's free memory to the system (glibc only; elsewhere nothing happens)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Restarts ``VmHWM`` from the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _loader_options(loader: str) -> dict:
    """``from_pretrained`` keywords of each loader; imports what it needs (before the baseline)."""
    if loader == "fp32":
        return {}
    if loader == "int8fx":
        import int8fx.hf

        return {"quantization_config": int8fx.hf.Int8fxConfig()}  # threshold 6, lm_head and tied weights in fp
    import logging

    import bitsandbytes  # noqa: F401  (ImportError: reported as this loader's error)
    from transformers import BitsAndBytesConfig

    # bitsandbytes on CPU logs, on every call of every layer, that it casts fp32 inputs to fp16.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "cpu"}


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict (int8 weights with their ``SCB`` scales), a shared tensor once."""
    seen, total = set(), 0
    tensors = list(model.state_dict(keep_vars=True).values())
    tensors += [scale for tensor in tensors if isinstance(scale := getattr(tensor, "SCB", None), torch.Tensor)]
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _import_model_class(model_dir: str) -> None:
    # transformers imports a model's code on its first use: imported here, before the baseline,
    # it does not count as the load's memory (tens of MiB, as much as a small model's weights).
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]


def _measure_in_this_process(model_dir: str, loader: str, input_ids: list[int]) -> LoadMeasurement:
    from transformers import AutoModelForCausalLM

    try:
        options = _loader_options(loader)
    except ImportError as error:
        return LoadMeasurement(loader, error=f"not installed ({error})")
    _import_model_class(model_dir)
    baseline, baseline_file = _rss_mib(), _file_rss_mib()
    peak_since = "imports" if _reset_peak_rss() else "process start"
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **options).eval()
    load_s = time.perf_counter() - start
    after_load, load_peak = _rss_mib(), _peak_rss_mib()
    with torch.no_grad():
        model(input_ids=torch.tensor([input_ids]), use_cache=False)
    after_forward, after_forward_file, peak = _rss_mib(), _file_rss_mib(), _peak_rss_mib()
    _malloc_trim()
    trimmed = _rss_mib()
    return LoadMeasurement(
        loader,
        baseline_rss_mib=baseline,
        load_rss_mib=after_load - baseline,
        forward_rss_mib=after_forward - baseline,
        peak_rss_mib=peak - baseline,
        load_peak_rss_mib=load_peak - baseline,
        forward_file_rss_mib=after_forward_file - baseline_file,
        trimmed_rss_mib=trimmed - baseline,
        load_s=load_s,
        model_mib=model_bytes(model) / MIB,
        peak_since=peak_since,
    )


def _child_main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="one load, measured (run by measure_load in a fresh process)")
    parser.add_argument("model_dir")
    parser.add_argument("loader", choices=LOADERS)
    parser.add_argument("input_ids", help="comma-separated token ids for the forward pass")
    args = parser.parse_args(argv)
    measurement = _measure_in_this_process(args.model_dir, args.loader, [int(i) for i in args.input_ids.split(",")])
    print(RESULT_PREFIX + json.dumps(asdict(measurement)), flush=True)


if __name__ == "__main__":
    _child_main()
