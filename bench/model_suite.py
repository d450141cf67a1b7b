"""The ``model`` suite: one full training step of a tiny transformers OLMoE.

Every provider trains the same parameter set (the expert adapters; routers and
all base weights frozen) on the same 1,024-token batch. Ours steps with
:class:`~drlora_kernels.optim.RankAwareAdamW` (the optimizer the README
recommends: AdamW on the active slots only); masked r_max and PEFT with
``torch.optim.AdamW``. One timed step is:

* ``base``           the frozen model, experts through ``grouped_mm`` (transformers'
                     ``experts_implementation="grouped_mm"``): forward + backward to
                     the embeddings (as a LoRA step must), no optimizer. The floor.
* ``ours[b]`` uniform  :func:`~drlora_kernels.integrations.attach_drlora` on backend
                     ``b``, every module at the mean rank, no controller: plain LoRA
                     through our kernels. Forward, backward, AdamW.
* ``ours[b]`` skewed   the same with ragged ranks of the same mean and the
                     :class:`~drlora_kernels.dynamic.DRLoRAController`: forward,
                     backward, routing-frequency and rank-importance statistics, a
                     growth event **every step** (an upper bound: the paper has one per
                     200 steps), AdamW.
* ``masked-rmax``    the DR-LoRA model with every pool computing all ``r_max`` ranks and
                     masking (the paper's implementation), statistics and growth as above.
* ``peft``           PEFT 0.21 ``LoraConfig(target_parameters=[gate_up_proj, down_proj])``
                     at the uniform mean rank (rebuilds ``W + s B A`` every forward).

Verification (before timing, on the first forward + backward): the loss and
every adapter gradient against the same model on the ``reference`` backend.
PEFT gets our uniform adapters copied into its layout, so its loss and
gradients must equal ours. ``base`` is checked against the reference with all
ranks at zero (loss and the gradient at the embeddings).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import types
import warnings
from collections.abc import Callable

import torch

from .providers import make_projection, ours
from .runner import Candidate, Context, measure
from .workloads import ModelWorkload, make_ranks, model_workloads

PEFT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
GROWTH_HEADROOM = 16  # ranks per layer kept free so every timed step has something to grow


def unavailable_reason() -> str | None:
    """Why the model suite cannot run here, or ``None``."""
    for mod in ("transformers", "drlora_kernels.integrations", "drlora_kernels.dynamic"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not importable"
        except ModuleNotFoundError:
            return f"{mod} is not importable"
    return None


def _base_model(mw: ModelWorkload, device: torch.device, seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(
        num_hidden_layers=mw.layers, num_experts=mw.E, num_experts_per_tok=mw.top_k,
        hidden_size=mw.hidden, intermediate_size=mw.intermediate,
        num_attention_heads=mw.heads, num_key_value_heads=mw.heads, vocab_size=mw.vocab,
        max_position_embeddings=max(4096, mw.seq), bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = OlmoeForCausalLM(cfg).to(device=device, dtype=getattr(torch, mw.dtype))
    model.set_experts_implementation("grouped_mm")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def _batch(mw: ModelWorkload, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, mw.vocab, (mw.batch, mw.seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def _embed_grad_hook(model) -> Callable[[], torch.Tensor | None]:
    """Make the embeddings' output require grad (so backward runs through every layer)."""
    holder: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        out.requires_grad_(True)
        out.retain_grad()
        holder["emb"] = out

    model.get_input_embeddings().register_forward_hook(hook)
    return lambda: holder["emb"].grad


def _attach(
    base, mw: ModelWorkload, profile: str, backend: str, dynamic: bool, *,
    controller: bool | None = None, seed: int = 0,
):  # fmt: skip
    """A DR-LoRA copy of ``base`` with ranks from ``profile`` and random non-zero ``B``.

    ``dynamic`` profiles leave ``GROWTH_HEADROOM`` ranks per layer free so every growth
    event grows; ``controller`` (default: ``dynamic``) creates the growth controller.
    """
    controller = dynamic if controller is None else controller
    from drlora_kernels.config import DRLoRAConfig
    from drlora_kernels.integrations import attach_drlora, get_drlora

    model = copy.deepcopy(base)
    m, R = mw.mean_rank, mw.r_max
    r_init = m // 2 if dynamic else m
    # p_grow such that the per-event cap is at least one rank (also at smoke sizes)
    p_grow = max(0.1, 1.0 / max(1, R - r_init))
    cfg = DRLoRAConfig(r_init=r_init, r_target=m, r_max=R, grow_every=1, p_grow=min(1.0, p_grow),
                       warmup_steps=0, buffer_steps=0, backend=backend, seed=seed)  # fmt: skip
    total = 100_000 if controller else None
    handle = get_drlora(attach_drlora(model, cfg, total_steps=total, train_router=False))
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for layer, pools in enumerate(handle.pools):
            for i, pool in enumerate(pools):
                ranks = make_ranks(profile, pool.num_experts, R, seed + 2 * layer + i)
                if dynamic:  # leave a little headroom so each step's growth event grows
                    for e in range(min(GROWTH_HEADROOM // len(pools), pool.num_experts)):
                        ranks[e] = max(0, ranks[e] - 1)
                pool.ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
                b = torch.randn(pool.lora_B.shape, generator=gen) * 0.1 * R**-0.5
                pool.lora_B.copy_(b.to(pool.lora_B))
    return model, handle


def _mask_pools(handle) -> None:
    """Swap every pool's forward for the masked-r_max computation (the paper's implementation)."""
    for pools in handle.pools:
        for pool in pools:

            def forward(self, x, offsets, base_weight=None):
                E = self.num_experts
                counts = (offsets[1:] - offsets[:-1]).to(torch.long)
                idx = torch.repeat_interleave(torch.arange(E, device=x.device), counts)
                scale = torch.full((E,), self.scaling, device=x.device)
                proj = make_projection("masked-rmax", base_weight, self.lora_A, self.lora_B,
                                       self.ranks, scale)  # fmt: skip
                return proj(x, offsets, idx)

            pool.forward = types.MethodType(forward, pool)


def _pool_grads(handle) -> dict[str, torch.Tensor]:
    out = {}
    for layer, pools in enumerate(handle.pools):
        for i, pool in enumerate(pools):
            out[f"l{layer}p{i}.dA"] = pool.lora_A.grad.detach().clone()
            out[f"l{layer}p{i}.dB"] = pool.lora_B.grad.detach().clone()
    return out


def _lora_candidate(provider, model, handle, batch, dynamic: bool) -> Candidate:
    params = handle.trainable_parameters()
    if provider == "masked-rmax":  # the paper's implementation: stock AdamW over all r_max slots
        opt = torch.optim.AdamW(params, lr=1e-5)
    else:  # ours, as the README tells users to train: AdamW on the active slots only
        from drlora_kernels.optim import RankAwareAdamW, pool_slot_specs

        opt = RankAwareAdamW(params, lr=1e-5, slots=pool_slot_specs(handle.pools))
    ctrl = handle.controller if dynamic else None

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss

    def step():
        loss = fwd_bwd()
        if ctrl is not None:
            ctrl.update_statistics()
            ctrl.step(opt)
        opt.step()
        return loss

    def outputs():
        loss = fwd_bwd()
        out = {"loss": loss.detach().reshape(1), **_pool_grads(handle)}
        opt.zero_grad(set_to_none=True)
        return out

    return Candidate(provider, step, outputs)


def _peft_candidate(base, ref_handle, mw: ModelWorkload, batch) -> Candidate:
    """Real PEFT at the uniform mean rank, initialised with the uniform reference's adapters."""
    from peft import LoraConfig, get_peft_model

    r = mw.mean_rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=[], target_parameters=PEFT_TARGETS))  # fmt: skip
    wrappers = _peft_wrappers(model, mw.layers)
    with torch.no_grad():
        for layer, pools in enumerate(ref_handle.pools):
            for proj, pool in zip(("gate_up_proj", "down_proj"), pools):
                wrap = wrappers[(layer, proj)]
                E, n = pool.num_experts, pool.out_features
                wrap.lora_A["default"].weight.copy_(pool.lora_A[:, :r].reshape(E * r, -1))
                wrap.lora_B["default"].weight.copy_(
                    pool.lora_B[:, :, :r].permute(1, 2, 0).reshape(n, r * E)
                )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss

    def step():
        fwd_bwd()
        opt.step()

    def outputs():
        loss = fwd_bwd()
        out = {"loss": loss.detach().reshape(1)}
        for layer, pools in enumerate(ref_handle.pools):
            for i, (proj, pool) in enumerate(zip(("gate_up_proj", "down_proj"), pools)):
                wrap = wrappers[(layer, proj)]
                E, n = pool.num_experts, pool.out_features
                da = torch.zeros_like(pool.lora_A)
                db = torch.zeros_like(pool.lora_B)
                da[:, :r] = wrap.lora_A["default"].weight.grad.reshape(E, r, -1)
                db[:, :, :r] = wrap.lora_B["default"].weight.grad.reshape(n, r, E).permute(2, 0, 1)
                out[f"l{layer}p{i}.dA"], out[f"l{layer}p{i}.dB"] = da, db
        opt.zero_grad(set_to_none=True)
        return out

    return Candidate("peft", step, outputs)


def _peft_wrappers(model, layers: int) -> dict:
    out = {}
    for name, mod in model.named_modules():
        if type(mod).__name__ == "ParamWrapper":
            layer = int(name.split("layers.")[1].split(".")[0])
            out[(layer, mod.parameter_name)] = mod
    if len(out) != 2 * layers:
        raise RuntimeError(f"expected {2 * layers} PEFT ParamWrappers, found {sorted(out)}")
    return out


def _base_candidate(base, batch) -> Candidate:
    model = copy.deepcopy(base)
    emb_grad = _embed_grad_hook(model)

    def step():
        loss = model(**batch).loss
        loss.backward()
        return loss

    def outputs():
        loss = step()
        return {"loss": loss.detach().reshape(1), "demb": emb_grad().detach().clone()}

    return Candidate("base", step, outputs, reference="base")


def _reference(base, mw, profile, batch, dynamic: bool, zero_ranks: bool):
    model, handle = _attach(base, mw, profile, "reference", dynamic, controller=False)
    if zero_ranks:
        for pools in handle.pools:
            for pool in pools:
                pool.ranks.zero_()
        emb_grad = _embed_grad_hook(model)
        loss = model(**batch).loss
        loss.backward()
        return (lambda: {"loss": loss.detach().reshape(1), "demb": emb_grad().detach()}), handle
    return _lora_candidate("ref", model, handle, batch, False).outputs, handle


def run_model(ctx: Context, workloads: list[ModelWorkload] | None = None) -> list[dict]:
    why = unavailable_reason()
    if why is not None:
        ctx.log(f"[model] skipped: {why}")
        return []
    logging.getLogger("transformers").setLevel(logging.ERROR)
    timed_backends = [b for b in ctx.backends if ours(b) not in ctx.verify_only]
    fast = [b for b in timed_backends if b != "reference"] or ["reference"]
    rows = []
    for mw in workloads or model_workloads(ctx.device.type, ctx.smoke):
        base = _base_model(mw, ctx.device)
        batch = _batch(mw, ctx.device)
        m = mw.mean_rank
        cands, refs = [], {}  # every profile and provider in one interleaved group
        for skew in ("uniform", *mw.rank_skews):
            profile = f"{skew}:{m}"
            dynamic = skew != "uniform"
            columns = dict(
                suite="model", mode="train-step", workload=f"{mw.name}@{profile}", E=mw.E,
                K=mw.hidden, N=mw.intermediate, R=mw.r_max, top_k=mw.top_k, tokens=mw.tokens,
                rows=mw.tokens * mw.top_k, rank_profile=profile, rank_skew=skew, mean_rank=m,
                group_profile="model-router", dtype=mw.dtype,
            )  # fmt: skip
            ref_out, ref_handle = _reference(base, mw, profile, batch, dynamic, zero_ranks=False)
            refs[f"lora@{profile}"] = ref_out
            group = []
            for b in fast:
                model, handle = _attach(base, mw, profile, b, dynamic)
                group.append(_lora_candidate(ours(b), model, handle, batch, dynamic))
            if dynamic:
                model, handle = _attach(base, mw, profile, fast[0], dynamic)
                _mask_pools(handle)
                group.append(_lora_candidate("masked-rmax", model, handle, batch, dynamic))
            else:
                base_ref, _ = _reference(base, mw, profile, batch, dynamic, zero_ranks=True)
                refs[f"base@{profile}"] = base_ref
                group.append(_base_candidate(base, batch))
                group.append(_peft_candidate(base, ref_handle, mw, batch))
            for cand in group:
                cand.reference = f"{cand.reference}@{profile}"
                cand.columns = columns
            cands += group
        ctx.log(f"[model] {mw.name}: {len(cands)} candidates")
        rows += measure(ctx, cands, refs, getattr(torch, mw.dtype))
    return rows
