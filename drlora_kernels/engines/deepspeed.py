"""DeepSpeed ZeRO-1/2/3: the DR-LoRA controller on partitioned gradients, weights and optimizer state.

Under ZeRO the rank pools do not look like ordinary parameters:

* gradients never reach ``.grad``: ZeRO reduces them into its own partitioned buffers
  (ZeRO-1/2: the ``averaged_gradients`` fragments mapped by ``param._hp_mapping``; ZeRO-3: the
  local fp32 partition ``safe_get_local_grad``), and frees them inside its optimizer step;
* ZeRO keeps an fp32 master copy partitioned across processes and copies it back into the
  model's parameters after every step, so a write into ``lora_A`` alone is reverted;
* the torch optimizer inside ZeRO sees one flat fp32 partition per parameter group;
* under ZeRO-3 every parameter is ``(0,)``-shaped outside its module's forward
  (``param.ds_shape`` is the real shape).

:class:`DeepSpeedEngine` implements the engine interface on the LOCAL fragments (SPEC,
"Determinism and distributed training": statistics are per-fragment ``[E, R]`` partial sums
all-reduced once by the controller, never a gathered gradient; growth writes each process's
slice of the same seeded draw into the fp32 master and the working copy). Every flat
fragment is a range ``[start, start + numel)`` of the parameter's row-major index space, so
slot ``j`` of expert ``e`` is found by index arithmetic (no full tensor is materialised).

:func:`install_deepspeed_hooks` wraps the ZeRO optimizer's ``step`` so the controller runs at
the gradient-accumulation boundary BEFORE ZeRO consumes the gradients, whatever calls the step
(``engine.step()`` in a plain loop, accelerate's wrapper inside ``accelerator.backward``, the
``Trainer``). Around that step it also holds the routers still during warmup (their gradient
fragments are zeroed and their values restored, undoing weight decay) and checks that the
growth writes survived ZeRO's master-to-model copy.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import Engine

__all__ = [
    "DeepSpeedEngine",
    "detect",
    "deepspeed_hooks_installed",
    "full_shape",
    "install_deepspeed_hooks",
    "is_deepspeed_parameter",
    "maybe_install_deepspeed_hooks",
    "register_zero3_leaf_modules",
    "zero_optimizer_of",
]

logger = logging.getLogger(__name__)

_HOOK_ATTR = "_drlora_deepspeed_engine"


# ---------------------------------------------------------------------------------------------
# Small helpers (no DeepSpeed import needed)
# ---------------------------------------------------------------------------------------------


def is_deepspeed_parameter(param: torch.Tensor) -> bool:
    """True for a parameter managed by a ZeRO optimizer (ZeRO-3 ``ds_id`` or ZeRO-1/2 ``_hp_mapping``)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The real shape of a parameter: ``ds_shape`` for a ZeRO-3 partitioned one, else ``shape``."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def _slot_of(idx: torch.Tensor, shape, dim: int) -> torch.Tensor:
    """Slot id ``e * R + j`` of flat indices of ``lora_A [E, R, K]`` (dim 1) or ``lora_B [E, N, R]`` (dim 2)."""
    _, d1, d2 = shape
    if dim == 1:
        return idx // d2
    return (idx // (d1 * d2)) * d2 + idx % d2


def _slot_indices(shape, dim: int, expert: int, old: int, new: int) -> torch.Tensor:
    """Flat indices of slots ``old:new`` of ``expert``, in the row-major order of ``A[e, old:new]``
    (``[new-old, K]``) or ``B[e, :, old:new]`` (``[N, new-old]``)."""
    _, d1, d2 = shape
    if dim == 1:
        start = (expert * d1 + old) * d2
        return torch.arange(start, start + (new - old) * d2)
    rows = torch.arange(d1)[:, None] * d2 + torch.arange(old, new)[None, :]
    return (expert * d1 * d2 + rows).reshape(-1)


def _fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A float64 scalar that changes when any element changes (position-weighted sum)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        total += (flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum()
    return total


def _world() -> tuple[int, bool]:
    ready = dist.is_available() and dist.is_initialized()
    return (dist.get_world_size() if ready else 1), ready


# ---------------------------------------------------------------------------------------------
# One parameter's local fragment
# ---------------------------------------------------------------------------------------------


@dataclass
class _Fragment:
    """This process's part ``[start, start + numel)`` of a parameter's flat index space."""

    start: int
    numel: int

    def locate(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(which, local)``: the entries of ``idx`` inside the fragment and their local offsets."""
        which = (idx >= self.start) & (idx < self.start + self.numel)
        return which, idx[which] - self.start


class _NoGradient(Exception):
    pass


class DeepSpeedEngine(Engine):
    """The engine interface (see ``engines/__init__.py``) for DeepSpeed ZeRO stages 1, 2 and 3.

    Args:
        optimizer: the ZeRO optimizer (``engine.optimizer`` of ``deepspeed.initialize``), or
            anything :func:`zero_optimizer_of` unwraps to one (the DeepSpeed engine, accelerate's
            optimizer wrapper).

    Raises:
        TypeError: ``optimizer`` is not (and does not wrap) a ZeRO stage 1-3 optimizer.
    """

    sums_are_partial = True

    def __init__(self, optimizer) -> None:
        self.optimizer = zero_optimizer_of(optimizer)
        self.stage = _zero_stage(self.optimizer)
        self.name = f"deepspeed-zero{self.stage}"
        self.offload = bool(
            getattr(self.optimizer, "cpu_offload", False)
            or getattr(self.optimizer, "offload_optimizer", False)
        )
        self._pending_growth: list = []  # (pool, expert, old, new, rows) written this step
        self.events: list = []  # growth events of the hooked steps (for loggers)

    # ----------------------------------------------------------------------------- fragments
    def _fragment(self, p: torch.Tensor) -> _Fragment | None:
        if self.stage == 3:
            part = p.ds_tensor.numel()
            start = dist.get_rank(group=p.ds_process_group) * part
            numel = max(0, min(part, p.ds_numel - start))
            return _Fragment(start, numel) if numel > 0 else None
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        address = mapping.lp_fragment_address
        return _Fragment(int(address.start), int(address.numel))

    def _grad(self, p: torch.Tensor, frag: _Fragment) -> torch.Tensor:
        """The step's reduced gradient on the fragment, flat fp32 (loss scale divided out)."""
        try:
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_grad

                g = safe_get_local_grad(p)
            else:
                g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
        except (ValueError, KeyError) as exc:  # DeepSpeed: "only available ... before engine step"
            raise _NoGradient(str(exc)) from None
        if g is None:
            raise _NoGradient("no gradient partition")
        g = g.reshape(-1)
        if g.numel() == p.numel() and g.numel() != frag.numel:  # a full accumulation buffer
            g = g.narrow(0, frag.start, frag.numel)
        g = g[: frag.numel].float()
        scale = float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0)
        return g / scale if scale != 1.0 else g

    def _lp(self, p: torch.Tensor, frag: _Fragment) -> torch.Tensor:
        """The model's (working-precision) values on the fragment, flat."""
        if self.stage == 3:
            return p.ds_tensor.reshape(-1)[: frag.numel]
        return p.detach().reshape(-1).narrow(0, frag.start, frag.numel)

    def _master(self, p: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """The fp32 master (``key=None``) or an optimizer state on the fragment, flat."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            if key is None:
                return safe_get_local_fp32_param(p).reshape(-1)
            return safe_get_local_optimizer_state(p, key).reshape(-1)
        return p._hp_mapping.get_hp_fragment(key).reshape(-1)

    @torch.no_grad()
    def _set_master(self, p: torch.Tensor, value: torch.Tensor, key: str | None = None) -> None:
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

            full = torch.zeros(p.ds_tensor.numel(), dtype=value.dtype, device=value.device)
            full[: value.numel()] = value
            if key is None:
                safe_set_local_fp32_param(p, full)
            else:
                safe_set_local_optimizer_state(p, full, key)
            return
        p._hp_mapping.get_hp_fragment(key).reshape(-1).copy_(value)

    def _state_keys(self, p: torch.Tensor) -> list[str]:
        """Names of the per-element optimizer states (``exp_avg``...) that exist for ``p`` yet."""
        if self.stage == 3:
            keys: set[str] = set()
            for state in self.optimizer.optimizer.state.values():
                keys.update(
                    k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 1
                )
            return sorted(keys)
        mapping = p._hp_mapping
        if mapping is None or mapping.optim_fragment is None:
            return []
        return mapping.get_optim_state_keys()

    # ---------------------------------------------------------------------------- statistics
    def grads_ready(self) -> bool:
        """True between the boundary backward and ZeRO's optimizer step (gradients complete)."""
        if self.offload:
            return True  # the offload buffers cannot tell; the step hook guarantees the timing
        groups = self.optimizer.fp16_groups if self.stage == 3 else self.optimizer.bit16_groups
        avg = self.optimizer.averaged_gradients
        return all(avg.get(i) is not None for i in range(len(groups)))

    @torch.no_grad()
    def slot_sums(self, pool):
        """This process's ``(sum_k |A*dA|, sum_n |B*dB|)`` ``[E, R]`` from its gradient fragments.

        Returns ``None`` when ZeRO holds no gradient (called after the optimizer step, or before
        the last backward of the step): the controller then raises instead of scoring zeros.
        """
        if not self.grads_ready():
            return None
        E, R = pool.num_experts, pool.r_max
        active = pool.active_mask().reshape(-1).to(torch.float32)
        out = []
        for param, dim in ((pool.lora_A, 1), (pool.lora_B, 2)):
            sums = torch.zeros(E * R, dtype=torch.float32, device=pool.ranks.device)
            frag = self._fragment(param)
            if frag is not None:
                try:
                    grad = self._grad(param, frag)
                except _NoGradient:
                    return None
                values = (self._lp(param, frag).float() * grad).abs()
                idx = torch.arange(frag.start, frag.start + frag.numel, device=values.device)
                sums.index_add_(0, _slot_of(idx, full_shape(param), dim).to(sums.device), values)
            out.append((sums * active.to(sums.device)).view(E, R))
        return out[0], out[1]

    # -------------------------------------------------------------------------------- growth
    @torch.no_grad()
    def write_growth(self, pool, expert: int, old: int, new: int, a_rows: torch.Tensor) -> None:
        """Write ``A[e, old:new] = a_rows`` and ``B[e, :, old:new] = 0`` into the fp32 master and the model.

        Each process writes its fragment of the master (ZeRO's optimizer step would otherwise copy
        the old master values back) and its copy of the working parameter. The step hook checks
        after ZeRO's step, when the master has been copied into the model, that the model holds
        the written rows (:meth:`check_growth_after_step`: a reverted write raises).
        """
        N = pool.out_features
        zeros = torch.zeros(N, new - old, dtype=torch.float32)
        for param, dim, value in ((pool.lora_A, 1, a_rows), (pool.lora_B, 2, zeros)):
            idx = _slot_indices(full_shape(param), dim, expert, old, new)
            flat = value.reshape(-1).float().cpu()
            self._write_model(param, idx, flat)
            frag = self._fragment(param)
            if frag is None:
                continue
            which, local = frag.locate(idx)
            self._write_master(param, local, flat[which])
        self._pending_growth.append((pool, expert, old, new, a_rows.detach().float().cpu()))

    def _write_master(self, param, local: torch.Tensor, values: torch.Tensor) -> None:
        master = self._master(param).clone()
        master[local.to(master.device)] = values.to(master.device, master.dtype)
        self._set_master(param, master)

    def _write_model(self, param, idx: torch.Tensor, values: torch.Tensor) -> None:
        """The working (low-precision) copy: whole on every process for ZeRO-1/2, the local
        partition (plus the gathered tensor, if resident) for ZeRO-3."""
        data = param.data.reshape(-1)
        if self.stage < 3 or data.numel() == param.ds_numel:  # the whole tensor is resident
            data[idx.to(data.device)] = values.to(data.device, data.dtype)
        if self.stage == 3:
            frag = self._fragment(param)
            if frag is not None:
                which, local = frag.locate(idx)
                lp = param.ds_tensor.data.reshape(-1)
                lp[local.to(lp.device)] = values[which].to(lp.device, lp.dtype)

    @torch.no_grad()
    def check_growth_after_step(self) -> None:
        """After ZeRO's step: the model's new ``A`` rows must still be (a multiple of) the drawn rows.

        Zero gradients and freshly reset moments leave the new slots unchanged by the step except
        for weight decay (a factor ``1 - lr * wd``); a reverted write holds the pool's earlier
        values instead. Collective (one all-reduce), so every process raises together.
        """
        bad = torch.zeros(1, dtype=torch.float64)
        for pool, expert, old, new, rows in self._pending_growth:
            A = pool.lora_A
            idx = _slot_indices(full_shape(A), 1, expert, old, new)
            if self.stage < 3:
                got, want = A.detach().reshape(-1)[idx].float().cpu(), rows.reshape(-1)
            else:
                frag = self._fragment(A)
                if frag is None:
                    continue
                which, local = frag.locate(idx)
                got = A.ds_tensor.reshape(-1)[local].float().cpu()
                want = rows.reshape(-1)[which]
            if want.numel() == 0:
                continue
            c = float((got * want).sum() / want.square().sum().clamp_min(1e-30))
            residual = float((got - c * want).norm() / want.norm().clamp_min(1e-30))
            if not (0.5 < c < 1.0 + 1e-3) or residual > 1e-2:
                bad += 1
        self._pending_growth.clear()
        _, ready = _world()
        if ready:
            dist.all_reduce(bad)
        if float(bad) > 0:
            raise RuntimeError(
                f"DR-LoRA growth writes were reverted by {self.name}'s optimizer step (the new A "
                "rows no longer hold the drawn values): the growth bypassed ZeRO's fp32 master. "
                "Grow through the DeepSpeed engine (install_deepspeed_hooks(engine) or "
                "DRLoRACallback), not RankPool.grow"
            )

    @torch.no_grad()
    def read_growth(self, pool, expert: int, old: int, new: int, a_rows: torch.Tensor):
        """This process's part of ``A[e, old:new]`` and ``B[e, :, old:new]`` in the fp32 master
        (the copy ZeRO's optimizer updates) and the matching part of ``a_rows``; ``None`` when it
        holds none of them."""
        parts = []
        for param, dim in ((pool.lora_A, 1), (pool.lora_B, 2)):
            frag = self._fragment(param)
            idx = _slot_indices(full_shape(param), dim, expert, old, new)
            if frag is None:
                parts.append((torch.zeros(0), torch.zeros(0, dtype=torch.bool)))
                continue
            which, local = frag.locate(idx)
            master = self._master(param)
            parts.append((master[local.to(master.device)].float().cpu(), which))
        (held_a, which_a), (held_b, _) = parts
        if held_a.numel() == 0 and held_b.numel() == 0:
            return None
        expected = a_rows.detach().reshape(-1).float().cpu()
        return held_a, expected[which_a] if which_a.numel() else expected[:0], held_b

    def validate(self, pools) -> None:
        """Raise ``ValueError`` when a pool's parameters are not managed by this ZeRO optimizer."""
        for pool in pools:
            for param in (pool.lora_A, pool.lora_B):
                managed = (
                    hasattr(param, "ds_id") if self.stage == 3 else hasattr(param, "_hp_mapping")
                )
                if not managed:
                    raise ValueError(
                        f"a rank pool parameter {tuple(full_shape(param))} is not managed by the "
                        f"{self.name} optimizer: attach DR-LoRA before deepspeed.initialize and give "
                        "the LoRA pools to its optimizer"
                    )

    @torch.no_grad()
    def reset_optimizer_slots(self, optimizer, pool, changes) -> None:
        """Zero every per-element ZeRO optimizer state (``exp_avg``, ``exp_avg_sq``...) of the new slots
        on this process's fragment. ``optimizer`` is ignored: ZeRO's own state is the one stepped."""
        for param, dim in ((pool.lora_A, 1), (pool.lora_B, 2)):
            frag = self._fragment(param)
            if frag is None:
                continue
            keys = self._state_keys(param)
            if not keys:
                continue
            idx = torch.cat([_slot_indices(full_shape(param), dim, e, o, n) for e, o, n in changes])
            which, local = frag.locate(idx)
            if not bool(which.any()):
                continue
            for key in keys:
                state = self._master(param, key).clone()
                state[local.to(state.device)] = 0
                self._set_master(param, state, key)

    # ----------------------------------------------------------------------- checkpoints/checks
    @torch.no_grad()
    def gather_full(self, tensor: torch.Tensor) -> torch.Tensor:
        """The full value in the parameter's dtype, on CPU, on every process (collective under ZeRO-3).

        Raises:
            RuntimeError: the gathered tensor does not have the parameter's real shape.
        """
        if self.stage == 3 and hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                value = tensor.detach().cpu().clone()
        else:
            value = tensor.detach().cpu().clone()
        if tuple(value.shape) != tuple(full_shape(tensor)) or value.numel() == 0:
            raise RuntimeError(
                f"{self.name}: gathered a tensor of shape {tuple(value.shape)} for a parameter of "
                f"shape {tuple(full_shape(tensor))}; refusing to use a partition as the full value"
            )
        return value

    @torch.no_grad()
    def load_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Write a full value into the working copy and the fp32 master of ``param``.

        The master is only written where it does not already round to ``value`` (so loading a
        bf16 adapter after DeepSpeed restored its fp32 master keeps the master's precision).
        """
        if tuple(value.shape) != tuple(full_shape(param)):
            raise ValueError(
                f"value has shape {tuple(value.shape)}, the parameter {tuple(full_shape(param))}"
            )
        flat = value.reshape(-1).cpu()
        idx = torch.arange(flat.numel())
        self._write_model(param, idx, flat.float() if flat.is_floating_point() else flat)
        frag = self._fragment(param)
        if frag is None or not param.requires_grad:
            return
        master = self._master(param).clone()
        mine = flat[frag.start : frag.start + frag.numel].to(master.device)
        stale = master.to(value.dtype) != mine
        master[stale] = mine[stale].to(master.dtype)
        self._set_master(param, master)

    def checksum(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Fingerprint of the replicated working copies (ZeRO-1/2: every process holds them whole).

        Under ZeRO-3 each element of a partitioned parameter lives on one process only: only the
        parameters ZeRO-3 keeps whole on every process (persistent ones) enter the fingerprint.
        """
        if self.stage == 3:  # only parameters ZeRO-3 keeps resident (persistent) are replicated
            tensors = [t for t in tensors if t.numel() == getattr(t, "ds_numel", t.numel()) > 0]
        return _fingerprint(list(tensors))

    # --------------------------------------------------------------------------------- routers
    @torch.no_grad()
    def hold_routers(self, params: list[torch.Tensor]) -> list:
        """Zero the routers' gradient fragments (no moment update) and snapshot their values.

        Returns the snapshot for :meth:`restore_routers` (after the step: undoes weight decay).
        """
        snapshot = []
        for p in params:
            frag = self._fragment(p)
            if frag is not None:
                try:
                    if self.stage == 3:
                        from deepspeed.utils import safe_set_local_grad

                        safe_set_local_grad(p, torch.zeros(p.ds_tensor.numel()))
                    else:
                        p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).zero_()
                except (ValueError, KeyError):
                    pass  # no gradient this step: nothing to hold
            master = self._master(p).clone() if frag is not None else None
            model = p.data.clone() if p.numel() > 0 else None
            lp = p.ds_tensor.data.clone() if self.stage == 3 else None
            snapshot.append((p, master, model, lp))
        return snapshot

    @torch.no_grad()
    def restore_routers(self, snapshot: list) -> None:
        for p, master, model, lp in snapshot:
            if master is not None:
                self._set_master(p, master)
            if lp is not None:
                p.ds_tensor.data.copy_(lp)
            if model is not None and p.numel() == model.numel():
                p.data.copy_(model)


# ---------------------------------------------------------------------------------------------
# Discovery and the step hook
# ---------------------------------------------------------------------------------------------


def _zero_stage(optimizer) -> int:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return 3
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return 2 if optimizer.partition_gradients else 1
    raise TypeError(
        f"{type(optimizer).__name__} is not a DeepSpeed ZeRO stage 1-3 optimizer; DR-LoRA under "
        "DeepSpeed needs zero_optimization.stage 1, 2 or 3 (stage 0 / BF16_Optimizer are not supported)"
    )


def zero_optimizer_of(obj):
    """The ZeRO optimizer behind a DeepSpeed engine, accelerate's optimizer wrapper, or itself.

    Raises:
        TypeError: nothing in ``obj`` is a ZeRO stage 1-3 optimizer.
    """
    seen = 0
    candidate = obj
    while candidate is not None and seen < 4:
        try:
            _zero_stage(candidate)
            return candidate
        except TypeError:
            pass
        candidate = getattr(candidate, "optimizer", None)
        seen += 1
    _zero_stage(obj)  # raises the TypeError naming the type
    return obj


def _handle_of(model_or_engine):
    from ..integrations.transformers import get_drlora

    module = getattr(model_or_engine, "module", model_or_engine)
    return get_drlora(module)


def _check_base_optimizer(optimizer) -> None:
    from ..optim import RankAwareAdamW

    base = getattr(optimizer, "optimizer", None)
    if isinstance(base, RankAwareAdamW):
        raise TypeError(
            "RankAwareAdamW cannot run inside DeepSpeed ZeRO: ZeRO hands it one flat fp32 partition "
            "per parameter group, so its per-slot step counts never match a slot. Use torch.optim.AdamW "
            "or DeepSpeed's optimizer (the DeepSpeed engine still zeroes the moments of new slots; "
            "their bias correction then uses the group's step count, see the README)"
        )


def _bind(controller, engine: DeepSpeedEngine) -> None:
    if hasattr(controller, "bind_engine"):
        controller.bind_engine(engine)
    else:
        controller.engine = engine


def detect(model=None, optimizer=None) -> DeepSpeedEngine | None:
    """The :class:`DeepSpeedEngine` for a DeepSpeed model/optimizer, ``None`` when DeepSpeed is not in use.

    Looks at the optimizer (a ZeRO optimizer or a wrapper of it), the model (the DeepSpeed engine
    returned by ``deepspeed.initialize``) and the parameters (ZeRO links them to their optimizer).

    Raises:
        RuntimeError: parameters are partitioned by ZeRO-3 (``deepspeed.zero.Init``) but no ZeRO
            optimizer manages them yet (DR-LoRA cannot read or grow them before
            ``deepspeed.initialize``).
    """
    for candidate in (optimizer, model):
        if candidate is None:
            continue
        try:
            return DeepSpeedEngine(candidate)
        except TypeError:
            pass
    params = (
        list(model.parameters())
        if isinstance(model, torch.nn.Module)
        else [p for p in (model or []) if isinstance(p, torch.Tensor)]
    )
    for p in params:
        owner = getattr(p, "_z3_optimizer", None) or getattr(p, "_zero_optimizer", None)
        if owner is not None:
            return DeepSpeedEngine(owner)
    if any(hasattr(p, "ds_id") for p in params):
        raise RuntimeError(
            "the model's parameters are partitioned by DeepSpeed ZeRO-3 but no ZeRO optimizer manages "
            "them yet: call deepspeed.initialize (or accelerator.prepare / the Trainer) before DR-LoRA "
            "reads, grows or saves them"
        )
    return None


def install_deepspeed_hooks(model_or_engine, optimizer=None, *, handle=None) -> DeepSpeedEngine:
    """Drive the DR-LoRA controller from DeepSpeed's optimizer step (ZeRO stage 1, 2 or 3).

    Wraps the ZeRO optimizer's ``step`` so that at every gradient-accumulation boundary, before
    ZeRO consumes its gradient partitions, the controller runs ``update_statistics()`` and
    ``step(optimizer)`` (growth through the fp32 master, moment reset of the new slots), the
    routers are held still during warmup, and after the step the growth writes are checked.
    Idempotent.

    Args:
        model_or_engine: the ``deepspeed.initialize`` engine (or accelerate's prepared model,
            which is that engine), or the attached model when ``optimizer`` is given.
        optimizer: the ZeRO optimizer or a wrapper of it (default: ``model_or_engine.optimizer``).
        handle: the :class:`DRLoRAModel` (default: found on the engine's module).

    Returns:
        The :class:`DeepSpeedEngine`, also set as ``controller.engine``.

    Raises:
        ValueError: the model has no DR-LoRA controller yet.
        TypeError: no ZeRO stage 1-3 optimizer, or a :class:`RankAwareAdamW` inside ZeRO.
    """
    handle = handle if handle is not None else _handle_of(model_or_engine)
    zero = zero_optimizer_of(optimizer if optimizer is not None else model_or_engine)
    _check_base_optimizer(zero)
    controller = handle.controller
    if controller is None:
        raise ValueError(
            "the model has no DR-LoRA controller: attach_drlora(model, config, total_steps=...) "
            "(or DRLoRACallback) before installing the DeepSpeed hooks"
        )
    existing = getattr(zero, _HOOK_ATTR, None)
    if existing is not None:
        _bind(controller, existing)
        object.__setattr__(handle, _HOOK_ATTR, existing)
        return existing
    engine = DeepSpeedEngine(zero)
    _bind(controller, engine)
    original_step = zero.step

    def step(*args, **kwargs):
        ctrl = handle.controller
        frozen = ctrl.router_frozen
        snapshot = engine.hold_routers(ctrl.router_parameters) if frozen else None
        ctrl.update_statistics()
        events = ctrl.step(zero)
        engine.events.extend(events)
        out = original_step(*args, **kwargs)
        if snapshot is not None:
            engine.restore_routers(snapshot)
        if events:
            engine.check_growth_after_step()
        return out

    zero.step = step
    object.__setattr__(zero, _HOOK_ATTR, engine)
    object.__setattr__(handle, _HOOK_ATTR, engine)
    logger.info("DR-LoRA: controller hooked into %s's optimizer step", engine.name)
    return engine


def deepspeed_hooks_installed(model_or_handle) -> bool:
    """True once :func:`install_deepspeed_hooks` drives this model's controller."""
    from ..integrations.transformers import get_drlora

    return getattr(get_drlora(model_or_handle), _HOOK_ATTR, None) is not None


def maybe_install_deepspeed_hooks(model_or_handle, optimizer) -> bool:
    """For ``DRLoRACallback``: install the hooks when ``optimizer`` is (or wraps) a ZeRO optimizer.

    Returns:
        True when DeepSpeed now drives the controller (the callback must then not run the
        statistics and growth itself), False for any other optimizer.
    """
    if optimizer is None or "deepspeed" not in sys.modules:  # no ZeRO optimizer can exist
        return False
    try:
        zero = zero_optimizer_of(optimizer)
    except TypeError:
        return False
    from ..integrations.transformers import get_drlora

    install_deepspeed_hooks(None, zero, handle=get_drlora(model_or_handle))
    return True


def register_zero3_leaf_modules(modules) -> int:
    """Mark modules as ZeRO-3 leaf modules (all their parameters gathered at their forward).

    ``attach_drlora`` marks every adapted experts module under ZeRO-3, so the fused base experts
    and the rank pools (its submodules) are fetched as one unit instead of ZeRO-3 partitioning
    the experts' internals (DeepSpeed's ``set_z3_leaf_modules``; LlamaFactory does the same for
    MoE blocks). Returns the number of modules marked (0 when DeepSpeed is not installed).
    """
    try:
        from deepspeed.utils import set_z3_leaf_module
    except ImportError:
        return 0
    count = 0
    for module in modules:
        set_z3_leaf_module(module, True)
        count += 1
    return count
