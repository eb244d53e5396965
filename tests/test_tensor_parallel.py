"""``int8lt`` under PyTorch's tensor parallelism: two gloo ranks on CPU, ``parallelize_module``
with ``ColwiseParallel`` / ``RowwiseParallel``, each rank running ``int8fx::int8_linear`` on its
own shard (the collectives are DTensor's).

One spawn runs every scenario on both ranks (``_worker``); each rank saves what it measured
and the tests below check it. Where the bounds come from:

* Colwise shards split N. Row n of ``W`` is quantized with its own scale either way, the
  activation (replicated, full K) is quantized and its outlier columns found exactly as
  unsharded, and every int8 product is exact: each output column is computed by the same
  operations on the same numbers, so the gathered output is bit-identical to one process.
* Rowwise shards split K. Rank r quantizes ``X[:, K_r]`` and ``W[:, K_r]`` with scales taken
  over its slice only (``SCA_r <= SCA``, ``SCB_r <= SCB``: finer steps), finds the outlier
  columns in its slice (the global set restricted to it), and DTensor sums the partial outputs.
  So the result is exactly ``sum_r int8_linear(X[:, K_r], W[:, K_r])`` computed by the eager
  reference, up to fp32 rounding and the rare int8 rounding flip that rounding causes: above
  60 dB (derived in ``test_backend.py``'s docstring). Against fp32 the rounding noise has step
  sizes no larger than unsharded, so its expected energy is no larger: the sharded SQNR is the
  single-process one or better, less the spread of a noise-energy estimate over M * N output
  elements (standard deviation about sqrt(2 / (M N)), 0.3 dB at 16 x 64 per layer; we allow
  1 dB). Against the single-process result the two errors differ only in the rowwise layers:
  ``|e_tp - e_1|^2 <= 2 (|e_tp|^2 + |e_1|^2)`` at worst, so the SQNR between them is at least
  the single-process SQNR against fp32 minus 6 dB (3 dB when the errors are uncorrelated); we
  require minus 6 dB. A rank that dropped its outlier part, used the other rank's scale or a
  stale shard falls below that by far (the threshold-0 contrast shows how far).
"""

from __future__ import annotations

import copy
import os
import time
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

WORLD = 2
THRESHOLD = 6.0

# ---------------------------------------------------------------- what each rank runs


def _parallelize(module, mesh, plan):
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(module, mesh, plan)


def _llama_plan(model):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(len(model.layers)):
        # Local q/k/v shards: the model views them with -1 heads, so each rank attends over its own heads.
        plan.update({f"layers.{i}.self_attn.{name}": ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")})
        plan[f"layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        plan.update({f"layers.{i}.mlp.{name}": ColwiseParallel() for name in ("gate_proj", "up_proj")})
        plan[f"layers.{i}.mlp.down_proj"] = RowwiseParallel()
    return plan


def _reset():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def _report(backend):
    return [(layer.module_path, tuple(layer.shape), layer.action, layer.reason) for report in backend.reports for layer in report.layers]


def _compile(model, **options):
    import int8fx

    backend = int8fx.int8lt(**{"inner": "eager", **options})
    return torch.compile(model, backend=backend), backend


def _local(param):
    """A DTensor's local shard (``to_local()`` would read a released shard)."""
    return getattr(param, "_local_tensor", param)


def _storage_bytes(param):
    with torch._C.DisableTorchFunctionSubclass():  # allowed on a released shard
        return _local(param).untyped_storage().nbytes()


def _rowwise_reference(x, weight, bias, threshold, rank_slices, fp_weight=True):
    """``sum_r int8_linear(x[:, K_r], W[:, K_r])`` in eager reference code: what rowwise shards compute."""
    from int8fx import reference

    out = 0
    for k in rank_slices:
        w = weight[:, k]
        CB, SCB = reference.quantize_weight(w)
        out = out + reference.int8_linear(x[..., k], CB, SCB, None, threshold, w if fp_weight else None)
    return out + (bias if bias is not None else 0)


def _slices(size):
    """The K (or N) slices of the ranks, as DTensor's Shard splits a dim: ceil-sized chunks."""
    step = -(-size // WORLD)
    return [slice(r * step, min(size, (r + 1) * step)) for r in range(WORLD)]


def _mlp_input(seed=1, batch=16, dim=64):
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))
    x[:, [5, 40]] = 60.0  # outlier columns, one in each rank's K slice of a rowwise layer
    return x


def _mlp_reference(model, x, threshold, fp_weight=True):
    from int8fx import reference

    up = model.up
    CB, SCB = reference.quantize_weight(up.weight)
    h = F.gelu(reference.int8_linear(x, CB, SCB, up.bias, threshold, up.weight if fp_weight else None))
    return _rowwise_reference(h, model.down.weight, None, threshold, _slices(h.shape[-1]), fp_weight)


def _mlp(seed=0):
    from examples.toy_models import MLP

    torch.manual_seed(seed)
    return MLP(64, 128, 64).eval()


def _tp_mlp(mesh, model):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return _parallelize(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})


def scenario_colwise(mesh):
    """One colwise layer, its shards gathered: bit-identical to one process (eager and inductor)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel

    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = _mlp_input()
    results = {}
    for inner in ("eager", "inductor"):
        _reset()
        single = _compile(copy.deepcopy(linear), inner=inner)[0](x)
        _reset()
        tp_linear = _parallelize(copy.deepcopy(linear), mesh, ColwiseParallel(output_layouts=Replicate()))
        run, backend = _compile(tp_linear, inner=inner)
        out = run(x)
        results[inner] = {"equal": torch.equal(single, out), "max_diff": float((single - out).abs().max()), "report": _report(backend)}
    return results


def scenario_mlp(mesh):
    """up colwise, down rowwise: SQNR against fp32, one process and the sharded reference."""
    from int8fx import reference

    x = _mlp_input()
    results = {}
    for threshold in (THRESHOLD, 0.0):
        model = _mlp()
        fp32 = model(x)
        _reset()
        single = _compile(copy.deepcopy(model), threshold=threshold)[0](x)
        expected = _mlp_reference(model, x, threshold)
        _reset()
        run, backend = _compile(_tp_mlp(mesh, model), threshold=threshold)
        out = run(x)
        results[threshold] = {
            "fp32_single": reference.sqnr_db(fp32, single),
            "fp32_tp": reference.sqnr_db(fp32, out),
            "single_tp": reference.sqnr_db(single, out),
            "reference_tp": reference.sqnr_db(expected, out),
            "report": _report(backend),
        }
    return results


def scenario_llama(mesh):
    """The tests' small Llama with the usual plan, through inductor: every sharded linear in int8."""
    from torch._dynamo.utils import counters

    from examples.toy_models import LlamaConfig, TinyLlama
    from int8fx import reference

    torch.manual_seed(0)
    model = TinyLlama(LlamaConfig(outlier_dims=(3, 17, 40))).eval()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    fp32 = model(tokens)
    _reset()
    single = _compile(copy.deepcopy(model))[0](tokens)
    _reset()
    run, backend = _compile(_parallelize(model, mesh, _llama_plan(model)), inner="inductor")
    out = run(tokens)
    graph = "\n".join(report.after for report in backend.reports)
    return {
        "report": _report(backend),
        "replaced": counters["int8fx"]["linears_replaced"],
        "quantized": counters["int8fx"]["weights_quantized"],
        "fp32_single": reference.sqnr_db(fp32, single),
        "fp32_tp": reference.sqnr_db(fp32, out),
        "single_tp": reference.sqnr_db(single, out),
        "collectives": graph.count("_c10d_functional.all_reduce"),
    }


def scenario_quantize_once(mesh):
    """Quantized once per shard across calls and recompiles; an in-place update of a shard is requantized."""
    from torch._dynamo.utils import counters

    from int8fx import reference

    model = _mlp()
    full = copy.deepcopy(model)
    _reset()
    run, backend = _compile(_tp_mlp(mesh, model))
    for batch in (3, 5, 3):
        run(_mlp_input(batch=batch))
    results = {"graphs": len(backend.reports), "quantized": counters["int8fx"]["weights_quantized"]}
    x = _mlp_input()
    before = run(x)
    model.up.weight.mul_(2)  # in place on the DTensor: each rank's shard changes
    full.up.weight.mul_(2)
    after = run(x)
    results["requantized"] = counters["int8fx"]["weights_requantized"]
    results["after_reference"] = reference.sqnr_db(_mlp_reference(full, x, THRESHOLD), after)
    results["after_before"] = reference.sqnr_db(before, after)
    return results


def scenario_release(mesh):
    """release_weights frees each rank's fp shards; the compiled model keeps working; eager use raises."""
    from torch._dynamo.utils import counters

    from int8fx import reference

    model = _mlp()
    full = copy.deepcopy(model)
    _reset()
    run, _ = _compile(_tp_mlp(mesh, model), release_weights=True)
    x = _mlp_input()
    outs = [run(x), run(_mlp_input(batch=5)), run(x)]
    freed = [_storage_bytes(p) for p in (model.up.weight, model.down.weight)]
    try:
        eager = f"no error, output finite: {bool(model(x).isfinite().all())}"
    except Exception as error:  # noqa: BLE001  (the test checks which)
        eager = f"{type(error).__name__}: {error}"
    try:
        saved = f"no error, {len(model.state_dict())} entries"
    except Exception as error:  # noqa: BLE001  (the test checks which)
        saved = f"{type(error).__name__}: {error}"
    # Reloaded weights (fresh DTensor parameters) make the modules usable eagerly again.
    fresh = _tp_mlp(mesh, copy.deepcopy(full))
    model.up.weight, model.down.weight = fresh.up.weight, fresh.down.weight
    reloaded = torch.equal(model(x), fresh(x)) and list(model.state_dict()) == list(fresh.state_dict())
    return {
        "released": counters["int8fx"]["weights_released"],
        "quantized": counters["int8fx"]["weights_quantized"],
        "left_bytes": freed,
        "reference": reference.sqnr_db(_mlp_reference(full, x, THRESHOLD, fp_weight=False), outs[2]),
        "eager": eager,
        "saved": saved,
        "reloaded": reloaded,
    }


def scenario_replicated_release(mesh):
    """A plan that replicates the weight (every rank holds all of it) with release_weights: each rank
    quantizes and frees its own replica, and the result is the single-process one."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = _mlp_input()
    _reset()
    single = _compile(copy.deepcopy(linear), release_weights=True)[0](x)
    _reset()
    distribute_module(
        linear,
        mesh,
        input_fn=lambda module, inputs, mesh: tuple(DTensor.from_local(t, mesh, [Replicate()]) for t in inputs),
        output_fn=lambda module, output, mesh: output.to_local(),
    )
    run, backend = _compile(linear, release_weights=True)
    out = run(x)
    return {"equal": torch.equal(single, out), "left_bytes": _storage_bytes(linear.weight), "report": _report(backend)}


def scenario_uneven(mesh):
    """N and K that the mesh size does not divide (DTensor's uneven shards: 17 and 16)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from int8fx import reference

    torch.manual_seed(0)
    up, down = nn.Linear(64, 33), nn.Linear(33, 64)
    x = _mlp_input()
    results = {}
    for name, linear, style, inputs in (
        ("colwise", up, ColwiseParallel(output_layouts=Replicate()), x),
        ("rowwise", down, RowwiseParallel(input_layouts=Replicate()), x[:, :33].clone()),
    ):
        _reset()
        single = _compile(copy.deepcopy(linear))[0](inputs)
        full = copy.deepcopy(linear)
        _reset()
        try:
            run, backend = _compile(_parallelize(linear, mesh, style))
            out = run(inputs)
        except Exception as error:  # noqa: BLE001  (DTensor's own error is an allowed outcome)
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        expected = _rowwise_reference(inputs, full.weight, full.bias, THRESHOLD, _slices(33)) if name == "rowwise" else single
        results[name] = {
            "report": _report(backend),
            "equal_single": torch.equal(single, out),
            "reference": reference.sqnr_db(expected, out),
            "local_shape": tuple(_local(linear.weight).shape),
        }
    return results


def scenario_meta(mesh):
    """A sharded parameter on the meta device: kept in fp with its reason, the compile does not fail."""
    with torch.device("meta"):
        model = _mlp()
    _reset()
    run, backend = _compile(_tp_mlp(mesh, model))
    try:
        out = run(torch.empty(4, 64, device="meta"))
        outcome = f"ran: {tuple(out.shape)} on {out.device}"
    except Exception as error:  # noqa: BLE001
        outcome = f"{type(error).__name__}: {str(error)[:300]}"
    return {"outcome": outcome, "report": _report(backend), "errors": [r.error for r in backend.reports]}


def scenario_transformers_tp_plan(mesh):
    """transformers' own tensor parallelism (``distributed_config`` with the model's ``tp_plan``):
    an ``Int8fxConfig`` load refuses it clearly; the fp load with the plan, compiled with int8lt,
    quantizes each rank's shard."""
    import tempfile

    import torch.distributed as dist
    import transformers

    import int8fx
    from int8fx import reference

    rank = dist.get_rank()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))  # what torchrun would set
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as own_folder:
        # One checkpoint for both ranks: under torch.distributed, save_pretrained writes on rank 0 only.
        folder = [own_folder]
        dist.broadcast_object_list(folder, src=0)
        folder = folder[0]
        if rank == 0:
            torch.manual_seed(0)
            transformers.LlamaForCausalLM(config).save_pretrained(folder)
        dist.barrier()
        plan = transformers.DistributedConfig(tp_plan="auto")
        try:
            transformers.AutoModelForCausalLM.from_pretrained(folder, distributed_config=plan, quantization_config=int8fx.Int8fxConfig())
            refused = "loaded"
        except Exception as error:  # noqa: BLE001  (the test checks which)
            refused = f"{type(error).__name__}: {error}"
        sharded = transformers.AutoModelForCausalLM.from_pretrained(folder, distributed_config=plan).requires_grad_(False)
        single = transformers.AutoModelForCausalLM.from_pretrained(folder).requires_grad_(False)
        dist.barrier()  # rank 0's folder outlives every load
    fp32 = single(ids).logits
    _reset()
    run, backend = _compile(sharded)
    out = run(ids).logits
    _reset()
    one_process = _compile(single)[0](ids).logits
    return {
        "refused": refused,
        "report": _report(backend),
        "tp_vs_fp32": reference.sqnr_db(fp32, out),
        "single_vs_fp32": reference.sqnr_db(fp32, one_process),
        "tp_vs_single": reference.sqnr_db(one_process, out),
    }


SCENARIOS = {
    name[len("scenario_") :]: fn
    for name, fn in list(globals().items())
    if name.startswith("scenario_")  # noqa: SIM118
}


def _worker(rank: int, directory: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # two ranks on a small machine
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    results[name] = scenario(mesh)
            except Exception:  # noqa: BLE001  (reported by the test that reads it)
                results[name] = {"exception": traceback.format_exc()}
            results[name + "_s"] = time.perf_counter() - start
            dist.barrier()
    finally:
        torch.save(results, os.path.join(directory, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results (one spawn for the whole file)."""
    import torch.multiprocessing as mp

    directory = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(str(directory),), nprocs=WORLD, join=True)
    results = [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    # Where the file's time goes (shown with a failure, or with -s); not a test: timings vary by machine and cache.
    print("rank 0, seconds per scenario:", {key: round(value, 1) for key, value in results[0].items() if key.endswith("_s")})
    return results


def _results(ranks, name):
    for rank, results in enumerate(ranks):
        assert "exception" not in results[name], f"rank {rank}:\n{results[name]['exception']}"
    return [results[name] for results in ranks]


pytestmark = pytest.mark.slow  # two spawned processes: seconds


def test_colwise_shards_are_bit_identical_to_one_process(ranks):
    for result in _results(ranks, "colwise"):
        for inner in ("eager", "inductor"):
            assert [row[2] for row in result[inner]["report"]] == ["int8"], result[inner]["report"]
            assert result[inner]["report"][0][1] == (48, 64)  # the local shard: N / 2
            assert result[inner]["equal"], (inner, result[inner]["max_diff"])


def test_rowwise_shards_quantize_their_own_k_slice(ranks):
    for result in _results(ranks, "mlp"):
        int8, naive = result[THRESHOLD], result[0.0]
        assert [(row[0], row[1], row[2]) for row in int8["report"]] == [("up", (64, 64), "int8"), ("down", (64, 64), "int8")]
        # What the ranks compute is the per-slice reference (derivation in the module docstring).
        assert int8["reference_tp"] > 60, int8
        # At least as accurate as one process (finer scales), and close to its result.
        assert int8["fp32_tp"] >= int8["fp32_single"] - 1.0, int8
        assert int8["single_tp"] >= int8["fp32_single"] - 6.0, int8
        # The contrast that shows these bounds can fail: without the outlier decomposition.
        assert naive["fp32_tp"] < int8["fp32_tp"] - 10, (naive, int8)


def test_llama_with_the_usual_plan_compiles_every_sharded_linear_to_int8(ranks):
    for result in _results(ranks, "llama"):
        report = result["report"]
        int8 = [row for row in report if row[2] == "int8"]
        assert len(int8) == result["replaced"] == 14 and result["quantized"] == 14  # 7 linears x 2 layers
        assert [row[0] for row in report if row[2] == "fp"] == ["lm_head"]  # the default skip list
        shapes = {row[0].rsplit(".", 1)[-1]: row[1] for row in int8}
        assert shapes["q_proj"] == (32, 64) and shapes["o_proj"] == (64, 32)  # local shards
        assert shapes["up_proj"] == (64, 64) and shapes["down_proj"] == (64, 64)
        assert result["collectives"] == 4  # o_proj and down_proj of 2 layers: DTensor's all-reduces
        assert result["fp32_tp"] >= result["fp32_single"] - 1.0, result
        assert result["single_tp"] >= result["fp32_single"] - 6.0, result


def test_quantized_once_per_shard_and_requantized_after_an_in_place_update(ranks):
    for result in _results(ranks, "quantize_once"):
        assert result["graphs"] >= 2 and result["quantized"] == 2, result  # recompiled, not requantized
        assert result["requantized"] == 1, result
        assert result["after_reference"] > 60 and result["after_before"] < 30, result


def test_release_weights_frees_each_ranks_shards(ranks):
    for result in _results(ranks, "release"):
        assert result["released"] == 2 and result["quantized"] == 2, result
        assert result["left_bytes"] == [4, 4], result  # one NaN element per shard
        assert result["reference"] > 60, result


def test_eager_use_of_a_released_shard_raises(ranks):
    for result in _results(ranks, "release"):
        assert "ReleasedWeightError" in result["eager"], result["eager"]


def test_state_dict_of_a_released_shard_raises(ranks):
    for result in _results(ranks, "release"):
        assert "ReleasedWeightError" in result["saved"] and "up.weight" in result["saved"], result["saved"]


def test_reloaded_shards_run_eagerly_again(ranks):
    for result in _results(ranks, "release"):
        assert result["reloaded"], result


def test_release_weights_with_replicated_weights(ranks):
    for result in _results(ranks, "replicated_release"):
        assert [row[2] for row in result["report"]] == ["int8"] and result["report"][0][1] == (96, 64)
        assert result["equal"] and result["left_bytes"] == 4, result


def test_uneven_shards(ranks):
    for rank, result in enumerate(_results(ranks, "uneven")):
        for name in ("colwise", "rowwise"):
            outcome = result[name]
            if "error" in outcome:  # DTensor's own error, unchanged
                continue
            assert (
                outcome["local_shape"] == ((17, 64) if rank == 0 else (16, 64))
                if name == "colwise"
                else ((64, 17) if rank == 0 else (64, 16))
            )
            assert [row[2] for row in outcome["report"]] == ["int8"], outcome
            assert outcome["reference"] > 60, outcome
        if "error" not in result["colwise"]:
            assert result["colwise"]["equal_single"]


def test_sharded_parameters_on_the_meta_device_stay_in_fp_with_a_reason(ranks):
    for result in _results(ranks, "meta"):
        assert result["report"] and all(row[2] == "fp" and "meta device" in row[3] for row in result["report"]), result


def test_transformers_tp_plan_loads_fp_and_compiles_each_shard_to_int8(ranks):
    for result in _results(ranks, "transformers_tp_plan"):
        assert result["refused"].startswith("NotImplementedError") and "int8lt" in result["refused"], result["refused"]
        report = {row[0]: row for row in result["report"]}
        assert report.pop("lm_head")[2] == "fp"
        assert len(report) == 14 and all(row[2] == "int8" for row in report.values()), report
        assert report["model.layers.0.self_attn.q_proj"][1] == (32, 64)  # each rank's shard: N / 2
        assert report["model.layers.0.mlp.down_proj"][1] == (64, 64)  # rowwise: K / 2
        # The bounds of the module docstring: rowwise layers quantize their own K slice.
        assert result["tp_vs_fp32"] >= result["single_vs_fp32"] - 1.0, result
        assert result["tp_vs_single"] >= result["single_vs_fp32"] - 6.0, result
