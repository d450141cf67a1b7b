"""A plain user training loop under DDP and FSDP2 (2 CPU processes, gloo) against one process.

Each engine runs the same workload (``workload.py``: a tiny OLMoE, DR-LoRA with three growth
events in eight optimizer steps, fixed global batches split across the processes) in one
spawn of two processes; the tests below share those runs. Checked for every engine: the
processes agree bit for bit, the run equals the single-process run over the same global
batches (same decisions and ranks, weights within float tolerance), importance is non-zero,
a save -> resume mid-growth gives the uninterrupted result, gradient accumulation counts an
optimizer step once.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import workload
from tests.distributed.spawn import run_on_processes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

SAVE_AT = 3  # after the first event (step 2), before the others (4, 6)


# ------------------------------------------------------- the runs (one spawn for all of them)
def _expect_error(fn, *args, **kwargs) -> str:
    """The message of the exception ``fn`` raises (``"no error"`` if none)."""
    try:
        fn(*args, **kwargs)
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _rank_aware() -> dict | str:
    try:
        return workload.run("fsdp2", optimizer="rank_aware")
    except Exception as exc:  # reported by the test, keeps this spawn alive
        return f"{type(exc).__name__}: {exc}"


def _all_runs(tmp: str) -> dict:
    return {
        "ddp": workload.run("ddp", save_dir=f"{tmp}/ddp", save_at=SAVE_AT),
        "ddp-accum": workload.run("ddp", accumulation=2),
        "ddp-ckpt-reentrant": workload.run("ddp", checkpointing="reentrant"),
        "ddp-ckpt-non-reentrant": workload.run("ddp", checkpointing="non-reentrant"),
        "fsdp2": workload.run("fsdp2", save_dir=f"{tmp}/fsdp2", save_at=SAVE_AT),
        "fsdp2-accum": workload.run("fsdp2", accumulation=2),
        "fsdp2-experts3": workload.run("fsdp2", num_experts=3),  # E % world != 0
        "fsdp2-rank-aware": _rank_aware(),
        "errors": {
            "attach-after-fully-shard": _expect_error(workload.attach_after_sharding),
            "partly-sharded": _expect_error(workload.run_partly_sharded),
            "local-engine-bound-before-sharding": _expect_error(workload.run_bound_too_early),
            "unsynchronised-processes": _expect_error(workload.run, "unsynchronised"),
        },
    }


def _fsdp2_placement_runs() -> dict:
    return {p: workload.run("fsdp2", placement=p) for p in ("dim1", "dim2", "hsdp")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs of the same workload (in this process)."""
    tmp = tmp_path_factory.mktemp("single")
    return {
        "main": workload.run("none", save_dir=tmp, save_at=SAVE_AT),
        "experts3": workload.run("none", num_experts=3),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return run_on_processes(_all_runs, tmp, str(tmp))


# ----------------------------------------------------------------------- DDP and FSDP2
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_matches_one_process(runs, reference, engine):
    r0, r1 = runs
    assert r0[engine]["engine"] == engine
    workload.assert_identical(r0[engine], r1[engine])
    workload.assert_same_run(r0[engine], reference["main"])


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_resume_mid_growth_continues_identically(runs, engine):
    for result in runs:
        workload.assert_identical(result[engine]["resumed"], result[engine])


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_gradient_accumulation_counts_a_step_once(runs, reference, engine):
    r0, r1 = runs
    workload.assert_identical(r0[f"{engine}-accum"], r1[f"{engine}-accum"])
    workload.assert_same_run(r0[f"{engine}-accum"], reference["main"])


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_ddp_gradient_checkpointing_routers_sync_without_unused_parameter_search(
    runs, reference, mode
):
    """DDP(find_unused_parameters=False) + gradient checkpointing: the routers are in the reducer
    from the start (no 'Expected to have finished reduction'), held still during warmup, trained
    after, identical on both processes."""
    r0, r1 = runs
    run = r0[f"ddp-ckpt-{mode}"]
    workload.assert_identical(run, r1[f"ddp-ckpt-{mode}"])
    workload.assert_same_run(run, reference["main"])
    initial = workload.build_attached()
    from drlora_kernels.integrations import get_drlora

    start = [p.detach().clone() for p in get_drlora(initial).router_parameters]
    warmup = workload.CONFIG["warmup_steps"]
    for step, entry in enumerate(run["log"]):
        same = all(torch.equal(a, b) for a, b in zip(entry["routers"], start))
        assert same == (step < warmup), step


# ------------------------------------------------------------------------------ FSDP2
def test_fsdp2_uneven_expert_shards(runs, reference):
    r0, r1 = runs
    workload.assert_identical(r0["fsdp2-experts3"], r1["fsdp2-experts3"])
    workload.assert_same_run(r0["fsdp2-experts3"], reference["experts3"])


@pytest.mark.slow
def test_fsdp2_other_placements(tmp_path, reference):
    """A and B sharded on their slot / feature dims, and HSDP (replicate x shard mesh)."""
    r0, r1 = run_on_processes(_fsdp2_placement_runs, tmp_path)
    for placement in ("dim1", "dim2", "hsdp"):
        workload.assert_identical(r0[placement], r1[placement])
        workload.assert_same_run(r0[placement], reference["main"])


def test_fsdp2_rank_aware_adamw(runs):
    """RankAwareAdamW on FSDP2 shards (its slots on ``p.to_local()``, ranks sliced to the local
    experts) trains exactly as one process does."""
    r0, r1 = (r["fsdp2-rank-aware"] for r in runs)
    assert not isinstance(r0, str), r0  # the error RankAwareAdamW raised under FSDP2
    single = workload.run("none", optimizer="rank_aware")
    workload.assert_identical(r0, r1)
    workload.assert_same_run(r0, single)


# ----------------------------------------------------------------- no silent failure
def test_attach_after_fully_shard_is_an_error(runs):
    for r in runs:
        msg = r["errors"]["attach-after-fully-shard"]
        assert msg.startswith("ValueError") and "BEFORE fully_shard" in msg, msg


def test_pools_sharded_inconsistently_fail_at_the_first_controller_call(runs):
    for r in runs:
        msg = r["errors"]["partly-sharded"]
        assert msg.startswith("ValueError") and "never sharded consistently" in msg, msg


def test_local_engine_bound_before_sharding_is_an_error(runs):
    for r in runs:
        msg = r["errors"]["local-engine-bound-before-sharding"]
        assert msg.startswith("ValueError") and "sharded" in msg and "'ddp'" in msg, msg


def test_processes_training_different_weights_fail_at_the_first_event(runs):
    """Without gradient synchronisation the processes' LoRA weights and routers drift apart:
    the weight checksum compared at the growth event raises on every process."""
    for r in runs:
        msg = r["errors"]["unsynchronised-processes"]
        assert msg.startswith("RuntimeError") and "weights differ across processes" in msg, msg
        assert "'ddp' engine" in msg and "step 2" in msg, msg
