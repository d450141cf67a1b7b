"""FSDP2 (``torch.distributed.fsdp.fully_shard``): rank pools as DTensors, each process a shard.

``fully_shard`` replaces every parameter by a DTensor; between backward and the optimizer step
each process holds its shard of the weights and of the reduce-scattered (averaged) gradient.
The pools may be sharded on any dimension (the default ``Shard(0)`` puts whole experts on each
process; ``E % world != 0`` is fine), replicated on a second mesh dimension (HSDP), or both.

Everything here works on the local shard (``to_local()``) and the global index region it
covers (:func:`local_box`), never on a gathered full tensor, except :meth:`FSDP2Engine.gather_full`
for checkpoints:

* statistics: each process sums ``|A*dA|`` / ``|B*dB|`` over the part it holds, placed in the
  global ``[E, R]`` (zero elsewhere); the controller sums these partial sums across processes
  once per step, then multiplies (``sums_are_partial``);
* growth: each process writes its slice of the same seeded draw into its shard;
* optimizer state: DTensor moments (``torch.optim`` under FSDP2) and per-slot tensors laid out
  like the local shard are zeroed on their local part of the grown slots.

Attach DR-LoRA BEFORE ``fully_shard`` (the pools must exist when the model is sharded);
:func:`refuse_sharded_experts` makes the wrong order an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from ..ops import slot_importance
from . import Engine, _require_slot_state, distributed_world, fingerprint

__all__ = ["FSDP2Engine", "is_dtensor", "local_box", "refuse_sharded_experts"]

Box = tuple[slice, ...]


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (what ``fully_shard`` makes of a parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _check_placements(t) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for p in t.placements:
        if type(p) not in (Shard, Replicate):
            raise ValueError(
                f"DR-LoRA's fsdp2 engine supports Shard and Replicate placements of the rank pools, got "
                f"{p} (placements {t.placements})"
            )


def local_box(t: torch.Tensor) -> Box:
    """The global index region this process holds of ``t`` (all of it for a plain tensor)."""
    if not is_dtensor(t):
        return tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _check_placements(t)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _intersect(region: Box, box: Box) -> tuple[Box, Box] | None:
    """``(local index, index relative to region)`` of ``region ∩ box``; ``None`` if empty."""
    local, rel = [], []
    for r, b in zip(region, box):
        lo, hi = max(r.start, b.start), min(r.stop, b.stop)
        if lo >= hi:
            return None
        local.append(slice(lo - b.start, hi - b.start))
        rel.append(slice(lo - r.start, hi - r.start))
    return tuple(local), tuple(rel)


def _replication(t: torch.Tensor) -> int:
    """How many processes of the world hold each element of ``t``."""
    if not is_dtensor(t):
        return distributed_world()
    mesh = t.device_mesh
    rep = math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())
    return rep * distributed_world() // mesh.size()


def _slot_region(pool, expert: int, old: int, new: int, dim: int) -> Box:
    """Global region of slots ``old:new`` of ``expert`` in ``lora_A`` (``dim=1``) or ``lora_B`` (``dim=2``)."""
    shape = (pool.lora_A if dim == 1 else pool.lora_B).shape
    region = [slice(expert, expert + 1), slice(0, shape[1]), slice(0, shape[2])]
    region[dim] = slice(old, new)
    return tuple(region)


def refuse_sharded_experts(name: str, module: torch.nn.Module) -> None:
    """Raise ``ValueError`` if an experts module's weights are already DTensors (sharded).

    ``attach_drlora`` must run before ``fully_shard``: pools added to an already sharded
    module would be plain tensors that FSDP2 neither gathers nor reduces.
    """
    sharded = [n for n, p in module.named_parameters(recurse=False) if is_dtensor(p)]
    if sharded:
        raise ValueError(
            f"{name or type(module).__name__} is already sharded by FSDP2 (DTensor parameters "
            f"{sharded[:2]}): call attach_drlora(model, ...) BEFORE fully_shard(...) (or before "
            "accelerate's / Trainer's FSDP2 preparation), so the rank pools are sharded with the model"
        )


class FSDP2Engine(Engine):
    """The engine of ``torch.distributed.fsdp.fully_shard`` (FSDP2): DTensor pools, local shards."""

    name = "fsdp2"
    sums_are_partial = True

    def validate(self, pools: Sequence) -> None:
        """The pools' ``lora_A``/``lora_B`` must all be DTensors (sharded by the same ``fully_shard``
        calls) with Shard/Replicate placements on a mesh that tiles the process group."""
        plain = [
            i
            for i, pool in enumerate(pools)
            for p in (pool.lora_A, pool.lora_B)
            if not is_dtensor(p)
        ]
        if plain:
            raise ValueError(
                f"DR-LoRA rank pools were never sharded consistently under FSDP2: {len(set(plain))} of "
                f"{len(pools)} pools hold plain tensors while others are DTensors. Attach DR-LoRA first, "
                "then call fully_shard on every module holding a pool (each decoder layer, then the root "
                "model), so every pool is sharded"
            )
        world = distributed_world()
        for pool in pools:
            for p in (pool.lora_A, pool.lora_B):
                _check_placements(p)
                if world % p.device_mesh.size():
                    raise ValueError(
                        f"a rank pool is sharded over a mesh of {p.device_mesh.size()} processes, which "
                        f"does not tile the world of {world}"
                    )

    # ----------------------------------------------------------------------- statistics
    def slot_sums(self, pool):
        A, B = pool.lora_A, pool.lora_B
        gA, gB = A.grad, B.grad
        if gA is None or gB is None:
            return None
        E, R = pool.num_experts, pool.r_max
        device = pool.ranks.device
        imp_a = torch.zeros(E, R, dtype=torch.float32, device=device)
        imp_b = torch.zeros(E, R, dtype=torch.float32, device=device)
        box_a, box_b = local_box(A), local_box(B)
        for p, g in ((A, gA), (B, gB)):
            if is_dtensor(g) and tuple(g.placements) != tuple(p.placements):
                raise RuntimeError(
                    f"the gradient of a rank pool has placements {g.placements}, the parameter "
                    f"{p.placements}: DR-LoRA's fsdp2 engine reads the local shard of both"
                )
        a, ga, b, gb = (_local(t).detach() for t in (A, gA, B, gB))
        (ea, ja, _), (eb, _, jb) = box_a, box_b
        ranks_a = self._local_ranks(pool.ranks, ea, ja)
        ranks_b = self._local_ranks(pool.ranks, eb, jb)
        has_a, has_b = a.numel() > 0, b.numel() > 0
        if has_a and has_b and (ea, ja) == (eb, jb):
            ia, ib = slot_importance(a, ga, b, gb, ranks_a)
            imp_a[ea, ja], imp_b[eb, jb] = ia, ib
        else:  # A and B cover different (expert, slot) regions: one side at a time
            if has_a:
                zb = a.new_zeros(a.shape[0], 1, a.shape[1])
                imp_a[ea, ja] = slot_importance(a, ga, zb, zb, ranks_a)[0]
            if has_b:
                za = b.new_zeros(b.shape[0], b.shape[2], 1)
                imp_b[eb, jb] = slot_importance(za, za, b, gb, ranks_b)[1]
        # An element held by several processes (HSDP replicas) is counted once after the sum.
        rep_a, rep_b = _replication(A), _replication(B)
        if rep_a > 1:
            imp_a /= rep_a
        if rep_b > 1:
            imp_b /= rep_b
        return imp_a, imp_b

    @staticmethod
    def _local_ranks(ranks: torch.Tensor, experts: slice, slots: slice) -> torch.Tensor:
        """Active slots of the local slot range: ``clamp(ranks[e] - slots.start, 0, len(slots))``."""
        local = ranks[experts].to(torch.int32) - slots.start
        return local.clamp_(0, slots.stop - slots.start).contiguous()

    # --------------------------------------------------------------------------- growth
    @torch.no_grad()
    def write_growth(self, pool, expert, old, new, a_rows):
        A, B = pool.lora_A, pool.lora_B
        hit = _intersect(_slot_region(pool, expert, old, new, 1), local_box(A))
        if hit is not None:
            local, rel = hit
            a = _local(A)
            a[local] = a_rows[None].to(a.device, a.dtype)[rel]
        hit = _intersect(_slot_region(pool, expert, old, new, 2), local_box(B))
        if hit is not None:
            _local(B)[hit[0]] = 0

    def read_growth(self, pool, expert, old, new, a_rows):
        A, B = pool.lora_A, pool.lora_B
        hit_a = _intersect(_slot_region(pool, expert, old, new, 1), local_box(A))
        hit_b = _intersect(_slot_region(pool, expert, old, new, 2), local_box(B))
        if hit_a is None and hit_b is None:
            return None
        empty = a_rows.new_zeros(0)
        held_a, expected = empty, empty
        if hit_a is not None:
            held_a, expected = _local(A).detach()[hit_a[0]], a_rows[None][hit_a[1]]
        held_b = _local(B).detach()[hit_b[0]] if hit_b is not None else empty
        return held_a, expected, held_b

    @torch.no_grad()
    def reset_optimizer_slots(self, optimizer, pool, changes):
        """Zero the grown slots' part of every state tensor laid out like the parameter.

        DTensor state (``torch.optim`` optimizers under FSDP2: ``exp_avg``, ``exp_avg_sq``...)
        and plain state laid out like the local shard (or per slot, broadcastable: ``[E, R, 1]``)
        are zeroed on their local part; scalar state (a step count) is left alone.
        """
        if not changes:
            return
        _require_slot_state(optimizer, pool, self.name)
        for param, dim in ((pool.lora_A, 1), (pool.lora_B, 2)):
            state = optimizer.state.get(param)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() == param.dim():
                    self._zero_slots(value, param, pool, changes, dim)

    @staticmethod
    def _zero_slots(value, param, pool, changes, dim: int) -> None:
        if is_dtensor(value):
            target, box = value.to_local(), local_box(value)
            spread = ()
        else:
            box = local_box(param)
            ref = tuple(s.stop - s.start for s in box)
            if not _broadcasts(value.shape, ref):
                box = tuple(slice(0, n) for n in param.shape)
                ref = tuple(param.shape)
                if not _broadcasts(value.shape, ref):
                    return
            target = value
            # a size-1 dim of a per-slot tensor (e.g. [E, R, 1]) stands for the whole dim
            spread = tuple(d for d, (n, m) in enumerate(zip(value.shape, ref)) if n == 1 != m)
        box = tuple(slice(0, 1) if d in spread else b for d, b in enumerate(box))
        for expert, old, new in changes:
            region = _slot_region(pool, expert, old, new, dim)
            region = tuple(slice(0, 1) if d in spread else r for d, r in enumerate(region))
            hit = _intersect(region, box)
            if hit is not None:
                target[hit[0]] = 0

    # ------------------------------------------------------------ checkpoints and checks
    def gather_full(self, tensor):
        if is_dtensor(tensor):
            return tensor.detach().full_tensor().cpu()
        return tensor.detach().to("cpu", copy=True)

    @torch.no_grad()
    def load_full(self, param, value):
        local = _local(param)
        local.copy_(value[local_box(param)].to(local.device, local.dtype))

    def checksum(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """Fingerprint of the plain (replicated) tensors; DTensor shards differ by design."""
        return fingerprint(t for t in tensors if not is_dtensor(t))


def _broadcasts(shape: Sequence[int], like: Sequence[int]) -> bool:
    return len(shape) == len(like) and all(a == b or a == 1 for a, b in zip(shape, like))
