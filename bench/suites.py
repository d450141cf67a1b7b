"""The ``ops``, ``layer`` and ``scaling`` suites: candidates per workload and mode.

* ``ops``: one grouped projection, LoRA-only (``lora``) and fused base + LoRA
  (``fused``), forward (``fwd``, under ``no_grad``) and forward + backward
  (``fwd+bwd``: ``dx``, ``dA``, ``dB``; the base weight is frozen).
* ``layer``: a SwiGLU MoE expert block (routing, gather, gate_up, SiLU*up,
  down, weighted scatter) with LoRA on both projections. The input requires
  grad, as inside a model; the base weights are frozen.
* ``scaling``: the fused gate_up op, forward + backward, over mean rank and
  over tokens (ours should grow linearly with the active ranks, masked
  r_max stay flat at its r_max cost, PEFT be dominated by rebuilding ``W + BA``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from drlora_kernels.ops import gather_tokens, route_tokens, scatter_tokens

from .problems import (
    LayerProblem,
    OpsProblem,
    make_layer_problem,
    make_ops_problem,
    ops_base_reference,
    ops_reference,
)
from .providers import backend_of, make_projection, ours, provider_list
from .runner import Candidate, Context, measure
from .workloads import Workload, layer_workloads, ops_workloads, scaling_workloads

OPS_MODES = ("lora/fwd", "lora/fwd+bwd", "fused/fwd", "fused/fwd+bwd")
LAYER_MODES = ("block/fwd", "block/fwd+bwd")


def workload_columns(w: Workload) -> dict:
    return dict(
        workload=w.name, E=w.E, K=w.K, N=w.N, R=w.R, top_k=w.top_k, tokens=w.tokens,
        rows=w.rows, rank_profile=w.rank_profile, rank_skew=w.rank_skew, mean_rank=w.mean_rank,
        group_profile=w.group_profile, dtype=w.dtype,
    )  # fmt: skip


# ---------------------------------------------------------------- ops


def _ops_candidate(p: OpsProblem, provider: str, fused: bool, backward: bool) -> Candidate:
    x = p.x.detach().clone().requires_grad_(backward)
    a = p.lora_a.detach().clone().requires_grad_(backward)
    b = p.lora_b.detach().clone().requires_grad_(backward)
    proj = make_projection(provider, p.w if fused else None, a, b, p.ranks, p.scale)
    leaves = (x, a, b)

    if backward:

        def step():
            for t in leaves:
                t.grad = None
            y = proj(x, p.offsets, p.expert_index)
            y.backward(p.grad_out)
            return y

        def outputs():
            y = step()
            out = {"y": y, "dx": x.grad}
            if provider != "base":
                out.update(da=a.grad, db=b.grad)
            return out

    else:

        def step():
            with torch.no_grad():
                return proj(x, p.offsets, p.expert_index)

        def outputs():
            return {"y": step()}

    return Candidate(provider, step, outputs, "base" if provider == "base" else "lora")


def families(workloads: list[Workload]) -> list[list[Workload]]:
    """Group workloads that differ only in rank skew (their ratios are taken within a group)."""
    groups: dict[tuple, list[Workload]] = {}
    for w in workloads:
        groups.setdefault(w.shape_key(), []).append(w)
    return list(groups.values())


def skew_free(provider: str, w: Workload) -> bool:
    """Providers whose cost does not follow the rank skew run once per family (at ``uniform``).

    ``base`` ignores the ranks; PEFT has one rank for every expert, so the same budget is
    its uniform mean rank (``peft-wba`` at a skewed profile would be PEFT padded to the max).
    """
    return provider in ("base", "peft-wba") and w.rank_skew != "uniform"


def _ops_cases(
    ctx: Context, w: Workload, mode: str, providers: list[str], suite: str = "ops"
) -> tuple[list[Candidate], dict[str, Callable[[], dict]]]:
    """Candidates of one workload; references keyed ``lora@<profile>`` / ``base@<profile>``."""
    kind, phase = mode.split("/")
    fused, backward = kind == "fused", phase == "fwd+bwd"
    p = make_ops_problem(w, ctx.device)
    columns = dict(suite=suite, mode=mode, **workload_columns(w))
    cands = []
    for prov in providers:
        cand = _ops_candidate(p, prov, fused, backward)
        cand.reference = f"{cand.reference}@{w.name}"
        cand.columns = columns
        cands.append(cand)
    refs = {f"lora@{w.name}": lambda: ops_reference(p, fused, backward)}
    if fused:
        refs[f"base@{w.name}"] = lambda: ops_base_reference(p, backward)
    return cands, refs


def _run_families(
    ctx, suite, workloads, modes, providers_for, cases, timing_group=None
) -> list[dict]:
    """Verify and time families; ``timing_group(family)`` merges families into one
    interleaved timing group (default: one group per family)."""
    groups: dict[object, list[list[Workload]]] = {}
    for i, fam in enumerate(families(workloads)):
        groups.setdefault(i if timing_group is None else timing_group(fam), []).append(fam)
    rows = []
    for fams in groups.values():
        for mode in modes:
            cands, refs = [], {}
            for fam in fams:
                has_uniform = any(w.rank_skew == "uniform" for w in fam)
                for w in fam:
                    provs = [p for p in providers_for(mode)
                             if not (has_uniform and skew_free(p, w))]  # fmt: skip
                    c, r = cases(ctx, w, mode, provs, suite)
                    cands += c
                    refs.update(r)
            head = fams[0][0]
            what = f"mean {head.mean_rank}" if len(fams) == 1 else f"{len(fams)} shapes"
            ctx.log(f"[{suite}] {head.name.rsplit('@', 1)[0]} {what} {mode}: "
                    f"{len(cands)} candidates")  # fmt: skip
            rows += measure(ctx, cands, refs, head.torch_dtype)
    return rows


def run_ops(ctx: Context, workloads: list[Workload] | None = None) -> list[dict]:
    return _run_families(
        ctx, "ops", workloads or ops_workloads(ctx.device.type, ctx.smoke), OPS_MODES,
        lambda mode: provider_list(ctx.backends, mode.startswith("fused")), _ops_cases,
    )  # fmt: skip


# ---------------------------------------------------------------- layer


def swiglu_block(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    gate_up: Callable,
    down: Callable,
) -> torch.Tensor:
    """transformers' grouped experts forward with pluggable projections ``proj(x, offsets, idx)``."""
    routing = route_tokens(top_k_index, top_k_weights, num_experts)
    x = gather_tokens(hidden, routing)
    gate, up = gate_up(x, routing.offsets, routing.expert_index).chunk(2, dim=-1)
    y = down(F.silu(gate) * up, routing.offsets, routing.expert_index)
    return scatter_tokens(y, routing)


def _layer_forward(lp: LayerProblem, provider: str) -> Callable[[], torch.Tensor]:
    blk = lp.block
    backend = backend_of(provider)
    if backend is not None:  # the package's own module, as a user would call it

        def fwd():
            blk.lora_gate_up.backend = blk.lora_down.backend = backend
            return blk(lp.hidden, lp.top_k_index, lp.top_k_weights)

        return fwd
    projs = []
    for pool, w in ((blk.lora_gate_up, blk.gate_up_proj), (blk.lora_down, blk.down_proj)):
        scale = torch.full((blk.num_experts,), pool.scaling, device=w.device)
        projs.append(make_projection(provider, w, pool.lora_A, pool.lora_B, pool.ranks, scale))
    return lambda: swiglu_block(
        lp.hidden, lp.top_k_index, lp.top_k_weights, blk.num_experts, projs[0], projs[1]
    )


def _layer_candidate(lp: LayerProblem, provider: str, backward: bool) -> Candidate:
    fwd = _layer_forward(lp, provider)
    blk = lp.block
    leaves = [lp.hidden] + [t for p in (blk.lora_gate_up, blk.lora_down)
                            for t in (p.lora_A, p.lora_B)]  # fmt: skip

    if backward:

        def step():
            for t in leaves:
                t.grad = None
            y = fwd()
            y.backward(lp.grad_out)
            return y

        def outputs():
            y = step()
            out = {"y": y, "dhidden": lp.hidden.grad}
            if provider != "base":
                out.update(
                    da_gate_up=blk.lora_gate_up.lora_A.grad, db_gate_up=blk.lora_gate_up.lora_B.grad,
                    da_down=blk.lora_down.lora_A.grad, db_down=blk.lora_down.lora_B.grad,
                )  # fmt: skip
            return {k: v.detach().clone() for k, v in out.items()}

    else:

        def step():
            with torch.no_grad():
                return fwd()

        def outputs():
            return {"y": step()}

    return Candidate(provider, step, outputs, "base" if provider == "base" else "lora")


def _layer_reference(lp: LayerProblem, backward: bool, zero_ranks: bool) -> dict:
    """ours[reference] on the same block (ranks temporarily zeroed for the base oracle)."""
    pools = (lp.block.lora_gate_up, lp.block.lora_down)
    saved = [p.ranks.clone() for p in pools]
    try:
        if zero_ranks:
            for p in pools:
                p.ranks.zero_()
        out = _layer_candidate(lp, ours("reference"), backward).outputs()
    finally:
        for p, r in zip(pools, saved):
            p.ranks.copy_(r)
    if zero_ranks:
        out = {k: v for k, v in out.items() if k in ("y", "dhidden")}
    return out


def _layer_cases(ctx, w, mode, providers, suite="layer"):
    backward = mode.endswith("fwd+bwd")
    lp = make_layer_problem(w, ctx.device)
    columns = dict(suite=suite, mode=mode, **workload_columns(w))
    cands = []
    for prov in providers:
        cand = _layer_candidate(lp, prov, backward)
        cand.reference = f"{cand.reference}@{w.name}"
        cand.columns = columns
        cands.append(cand)
    refs = {
        f"lora@{w.name}": lambda: _layer_reference(lp, backward, zero_ranks=False),
        f"base@{w.name}": lambda: _layer_reference(lp, backward, zero_ranks=True),
    }
    return cands, refs


def run_layer(ctx: Context, workloads: list[Workload] | None = None) -> list[dict]:
    return _run_families(
        ctx, "layer", workloads or layer_workloads(ctx.device.type, ctx.smoke), LAYER_MODES,
        lambda mode: provider_list(ctx.backends, fused=True), _layer_cases,
    )  # fmt: skip


# ---------------------------------------------------------------- scaling


def run_scaling(ctx: Context, workloads: list[Workload] | None = None) -> list[dict]:
    """Fused op, fwd+bwd; each sweep (over rank, over tokens) is one interleaved timing group,
    so its curves are comparable point to point. The reference backend and the loop are
    left out (not what scales)."""
    timed = [b for b in ctx.backends if ours(b) not in ctx.verify_only]
    fast = [b for b in timed if b != "reference"] or ["reference"]
    return _run_families(
        ctx, "scaling", workloads or scaling_workloads(ctx.device.type, ctx.smoke),
        ("fused/fwd+bwd",), lambda mode: provider_list(fast, fused=True, loop=False), _ops_cases,
        timing_group=lambda fam: fam[0].name.rsplit("@", 1)[0].rstrip("0123456789"),
    )  # fmt: skip
