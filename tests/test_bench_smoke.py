"""The benchmark harness must not rot: its providers still agree with the reference.

Runs verification only (no timing) on the smallest workloads of ``bench``:
every provider of the fused op (forward + backward) and of the SwiGLU block,
on every available backend except the Triton interpreter (covered by its own tests).
"""

from __future__ import annotations

import pytest
import torch

bench = pytest.importorskip("bench", reason="the bench package lives in the repository checkout")

from bench import report, suites  # noqa: E402
from bench.providers import provider_list  # noqa: E402
from bench.runner import Context  # noqa: E402
from bench.verify import compare  # noqa: E402
from bench.workloads import Workload, layer_workloads, make_ranks, ops_workloads  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one thread is fastest and immune to a busy machine (as ``--smoke``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ctx() -> Context:
    c = Context.create("cpu", smoke=True, log=lambda s: None)
    c.backends = [b for b in c.backends if b != "triton"]
    return c


@pytest.mark.parametrize("profile", ["uniform:6", "rmaxfew:6"])
def test_ops_providers_match_reference(ctx, profile):
    w = ops_workloads("cpu", smoke=True)[0].with_ranks(profile)
    cands, refs = suites._ops_cases(ctx, w, "fused/fwd+bwd", provider_list(ctx.backends, True))
    refs = {k: fn() for k, fn in refs.items()}
    assert {c.provider for c in cands} >= {
        "ours[reference]",
        "masked-rmax",
        "peft-wba",
        "loop",
        "base",
    }
    for cand in cands:
        verdict = compare(cand.outputs(), refs[cand.reference], w.torch_dtype)
        assert verdict.match, f"{cand.provider}: {verdict.detail}"


def test_layer_providers_match_reference(ctx):
    w = layer_workloads("cpu", smoke=True)[0]
    lp = suites.make_layer_problem(w, ctx.device)
    ref = suites._layer_reference(lp, backward=True, zero_ranks=False)
    for prov in provider_list(ctx.backends, fused=True):
        if prov == "base":
            continue
        verdict = compare(suites._layer_candidate(lp, prov, True).outputs(), ref, w.torch_dtype)
        assert verdict.match, f"{prov}: {verdict.detail}"


def test_verification_catches_a_wrong_result():
    ref = {"y": torch.randn(8, 4)}
    assert compare({"y": ref["y"].clone()}, ref, torch.float32).match
    off = ref["y"].clone()
    off[3, 1] += 0.05 * max(1.0, float(ref["y"].abs().max()))
    verdict = compare({"y": off}, ref, torch.float32)
    assert not verdict.match and "y" in verdict.detail
    assert not compare({}, ref, torch.float32).match


def test_rank_profiles_keep_the_budget():
    for profile in ("uniform:48", "ragged:48", "zipf:48", "rmaxfew:48"):
        ranks = make_ranks(profile, 16, 96)
        assert sum(ranks) == 16 * 48 and min(ranks) >= 0 and max(ranks) <= 96, profile
    assert max(make_ranks("rmaxfew:48", 16, 96)) == 96
    with pytest.raises(ValueError, match="rank_profile"):
        Workload("w", 4, 8, 8, 4, 2, 16, rank_profile="uniform:5")


def test_ratio_table_pairs_comparable_rows():
    common = dict(suite="layer", mode="block/fwd+bwd", E=4, K=8, N=8, R=8, top_k=2, tokens=16,
                  mean_rank=4, group_profile="balanced", dtype="float32", match=True)  # fmt: skip
    rows = [
        dict(
            common,
            provider="ours[native]",
            rank_skew="uniform",
            rank_profile="uniform:4",
            workload="a",
            median_ms=2.0,
        ),  # fmt: skip
        dict(
            common,
            provider="ours[native]",
            rank_skew="zipf",
            rank_profile="zipf:4",
            workload="b",
            median_ms=2.2,
        ),  # fmt: skip
        dict(
            common,
            provider="base",
            rank_skew="uniform",
            rank_profile="uniform:4",
            workload="a",
            median_ms=1.6,
        ),  # fmt: skip
    ]
    got = {(r["kind"], r["workload"]): r["ratio"] for r in report.ratio_rows(rows)}
    assert got[("dynamic/uniform", "b")] == pytest.approx(1.1)
    assert got[("(base+lora)/base", "a")] == pytest.approx(1.25)
    assert got[("(base+lora)/base", "b")] == pytest.approx(2.2 / 1.6)


def test_min_rounds_sets_the_timing_policy():
    c = Context.create("cpu", smoke=False, log=lambda s: None, min_rounds=40)
    assert c.policy.min_repeats == 40 and c.policy.max_repeats >= 40
    assert Context.create("cpu", smoke=False, log=lambda s: None).policy.min_repeats == 5
