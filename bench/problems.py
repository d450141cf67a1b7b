"""Random problems for a workload, and the reference answers providers must match.

Data are random and non-zero everywhere (``B`` is *not* zero-initialised as in
PEFT's init), so a provider that drops the LoRA term, a rank or a scale fails
verification. Slots beyond each expert's active rank hold random values too:
every provider must ignore them (ours never reads them, masked-r_max multiplies
them by zero, PEFT-style zeroes the rows of ``A``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drlora_kernels import DRLoRAExperts
from drlora_kernels.ops import route_tokens
from drlora_kernels.ops.registry import lora_backward, lora_forward, plain_ops

from .workloads import Workload, make_ranks, make_routing

LORA_SCALE = 2.0  # alpha / r_target with the package default alpha = 2 * r_target


@dataclass
class OpsProblem:
    """One grouped projection: expert-sorted rows and an expert stack."""

    x: torch.Tensor  # [rows, K]
    w: torch.Tensor  # [E, N, K]
    lora_a: torch.Tensor  # [E, R, K]
    lora_b: torch.Tensor  # [E, N, R]
    ranks: torch.Tensor  # [E] int32
    offsets: torch.Tensor  # [E+1] int32
    expert_index: torch.Tensor  # [rows] int64
    scale: torch.Tensor  # [E] fp32
    grad_out: torch.Tensor  # [rows, N]


def _randn(gen: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def make_ops_problem(w: Workload, device: torch.device, seed: int = 0) -> OpsProblem:
    """Rows routed like a softmax router (``w.group_profile``), ranks from ``w.rank_profile``."""
    gen = torch.Generator().manual_seed(seed)
    index, weights = make_routing(w, seed)
    routing = route_tokens(index, weights, w.E)
    dt = w.torch_dtype

    def put(t: torch.Tensor, dtype: torch.dtype = dt) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    return OpsProblem(
        x=put(_randn(gen, w.rows, w.K)),
        w=put(_randn(gen, w.E, w.N, w.K, std=w.K**-0.5)),
        lora_a=put(_randn(gen, w.E, w.R, w.K, std=w.K**-0.5)),
        lora_b=put(_randn(gen, w.E, w.N, w.R, std=w.R**-0.5)),
        ranks=torch.tensor(
            make_ranks(w.rank_profile, w.E, w.R, seed), dtype=torch.int32, device=device
        ),  # fmt: skip
        offsets=routing.offsets.to(device),
        expert_index=routing.expert_index.to(device),
        scale=torch.full((w.E,), LORA_SCALE, dtype=torch.float32, device=device),
        grad_out=put(_randn(gen, w.rows, w.N)),
    )


def _oracle(p: OpsProblem, w: torch.Tensor | None, ranks: torch.Tensor, backward: bool, **need):
    ops = plain_ops("reference")
    common = dict(w=w, lora_a=p.lora_a, lora_b=p.lora_b, ranks=ranks, offsets=p.offsets,
                  scale=p.scale)  # fmt: skip
    y, u = lora_forward(ops, x=p.x, **common)
    out = {"y": y}
    if backward:
        g = lora_backward(ops, grad_y=p.grad_out, x=p.x, u=u, need_x=True, need_w=False, **need,
                          **common)  # fmt: skip
        out.update((k, v) for k, v in g._asdict().items() if v is not None)
    return out


def ops_reference(p: OpsProblem, fused: bool, backward: bool) -> dict[str, torch.Tensor]:
    """The oracle (``drlora_kernels.ops.reference``'s primitives, composed, fp32 accumulation)."""
    return _oracle(p, p.w if fused else None, p.ranks, backward, need_a=True, need_b=True)


def ops_base_reference(p: OpsProblem, backward: bool) -> dict[str, torch.Tensor]:
    """Oracle of the frozen base GEMM alone: the reference with every rank at 0."""
    zero = torch.zeros_like(p.ranks)
    return _oracle(p, p.w, zero, backward, need_a=False, need_b=False)


@dataclass
class LayerProblem:
    """One SwiGLU expert block with DR-LoRA pools, its input, routing and upstream gradient."""

    block: DRLoRAExperts
    hidden: torch.Tensor  # [T, H], requires grad (the block sits inside a model)
    top_k_index: torch.Tensor  # [T, k]
    top_k_weights: torch.Tensor  # [T, k]
    grad_out: torch.Tensor  # [T, H]


def make_layer_problem(w: Workload, device: torch.device, seed: int = 0) -> LayerProblem:
    """``gate_up [E, 2I, H]``, ``down [E, H, I]`` with ``K = H``, ``N = I``; random non-zero LoRA."""
    gen = torch.Generator().manual_seed(seed)
    E, H, inter, R, dt = w.E, w.K, w.N, w.R, w.torch_dtype
    block = DRLoRAExperts(
        _randn(gen, E, 2 * inter, H, std=H**-0.5).to(dt),
        _randn(gen, E, H, inter, std=inter**-0.5).to(dt),
        r_max=R,
        r_init=0,
        r_target=max(1, w.mean_rank),
        alpha=LORA_SCALE * max(1, w.mean_rank),
        generator=gen,
    ).to(device)
    with torch.no_grad():
        for i, pool in enumerate((block.lora_gate_up, block.lora_down)):
            pool.lora_B.copy_(_randn(gen, *pool.lora_B.shape, std=R**-0.5))
            ranks = make_ranks(w.rank_profile, E, R, seed + i)
            pool.ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
    index, weights = make_routing(w, seed)
    hidden = _randn(gen, w.tokens, H).to(device=device, dtype=dt).requires_grad_()
    return LayerProblem(
        block=block,
        hidden=hidden,
        top_k_index=index.to(device),
        top_k_weights=weights.to(device=device, dtype=dt),
        grad_out=_randn(gen, w.tokens, H).to(device=device, dtype=dt),
    )
