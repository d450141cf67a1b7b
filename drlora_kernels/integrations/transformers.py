"""Attach DR-LoRA to a Hugging Face ``transformers`` MoE model.

transformers 5.x stores the experts of an MoE layer as fused 3-D parameters
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; transposed ``[E, in, out]``
for GPT-OSS and Aria) in classes decorated with ``@use_experts_implementation``,
whose ``forward`` dispatches on ``config._experts_implementation`` through
:class:`transformers.integrations.moe.ExpertsInterface`. :func:`attach_drlora`
uses that mechanism rather than patching classes:

1. every adapted projection of every experts module gets a
   :class:`~drlora_kernels.pool.RankPool`, registered as a submodule
   (``<experts>.drlora.<projection>``), so it is in ``model.parameters()`` and
   ``model.state_dict()``;
2. the base model is frozen (the routers stay trainable unless ``train_router=False``;
   the controller holds them still during warmup by dropping their gradients);
3. ``"drlora"`` is registered in the experts interface and selected with
   ``model.set_experts_implementation("drlora")``. :func:`drlora_experts_forward`
   then runs each experts module through the grouped ops: base GEMM and LoRA fused
   in one op (:func:`~drlora_kernels.ops.grouped_lora_base`) for the ``[E, out, in]``
   layout, base GEMM plus :func:`~drlora_kernels.ops.grouped_lora` for the
   transposed layout. ``W + BA`` is never materialised. The base GEMM is computed the
   way the implementation selected before attaching computes it (``grouped_mm``,
   ``batched_mm`` or the eager per-expert matmuls), and falls back to the per-expert
   matmuls, which take any stride, where ``grouped_mm`` cannot take the operands
   (16-byte stride rule; e.g. GPT-OSS-layout weights at odd sizes on the CPU);
4. the pools' keys are added to ``model._keys_to_ignore_on_save``: ``save_pretrained``
   writes the base model only (the adapter goes through ``save_drlora``/``export_peft``).

The experts forward follows the interface's own flags (``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``, the class's ``_apply_gate``), so every
family built on the interface works without family-specific code, including
interleaved gate/up (GPT-OSS: LoRA adapts the whole fused projection, the layout of
its output columns does not matter) and gate-less experts (NemotronH: ``up_proj``).
Experts that are fused 3-D parameters off the interface (Llama4) are adapted through
their own forward by a small per-family adapter (:mod:`.families`). :func:`detach_drlora`
undoes everything.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ..config import DRLoRAConfig
from ..engines.fsdp import refuse_sharded_experts
from ..layers import GroupedLoRALinear
from ..ops import gather_tokens, route_tokens, scatter_tokens
from ..pool import RankPool

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "DRLoRAAdapter",
    "DRLoRAModel",
    "ExpertsLayout",
    "attach_drlora",
    "detach_drlora",
    "drlora_experts_forward",
    "find_experts_modules",
    "get_drlora",
    "run_drlora_experts",
]

EXPERTS_IMPLEMENTATION = "drlora"
ADAPTER_NAME = "drlora"  # submodule name on each experts module
_HANDLE_ATTR = "_drlora_handle"
# ``gate_up_proj`` in ``target_modules`` also names the input projection of gate-less experts.
_UP_ALIASES = {"gate_up_proj": "up_proj", "up_proj": "gate_up_proj"}


# ---------------------------------------------------------------------------------------------
# Layout of one experts module
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its projections (read from the interface's flags).

    Attributes:
        projections: parameter names in forward order (``("gate_up_proj", "down_proj")`` or
            ``("up_proj", "down_proj")``).
        transposed: weights are ``[E, in, out]`` instead of ``[E, out, in]``.
        has_bias: each projection has a ``<name>_bias [E, out]``.
        num_experts: ``E``.
    """

    projections: tuple[str, ...]
    transposed: bool
    has_bias: bool
    num_experts: int

    @property
    def has_gate(self) -> bool:
        """The up projection is the fused ``gate_up_proj`` (else a gate-less ``up_proj``)."""
        return self.projections[0] == "gate_up_proj"

    def in_out(self, weight: torch.Tensor) -> tuple[int, int]:
        """``(in_features, out_features)`` of one expert of ``weight``."""
        _, d1, d2 = _shape(weight)
        return (d1, d2) if self.transposed else (d2, d1)


def _shape(weight: torch.Tensor) -> torch.Size:
    """The real shape of a weight: DeepSpeed ZeRO-3 partitions parameters built under
    ``deepspeed.zero.Init`` to ``(0,)`` and keeps their shape in ``ds_shape`` (no gather needed)."""
    return getattr(weight, "ds_shape", None) or weight.shape


def _zero3_leaf_experts(experts: list[tuple[str, nn.Module]], model: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, mark each experts module a ZeRO-3 leaf module, so its fused base
    weights and its rank pools (submodules) are gathered together at its forward and backward.

    (Marking the whole MoE block, router included, as LlamaFactory does for its models, left a
    ``(0,)`` base weight in the experts' backward with transformers 5.25 / DeepSpeed 0.19.8.)
    """
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    if not zero3:
        try:
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            zero3 = is_deepspeed_zero3_enabled()
        except ImportError:
            return
    if zero3:
        from ..engines.deepspeed import register_zero3_leaf_modules

        register_zero3_leaf_modules(module for _, module in experts)


def _is_interface_experts(module: nn.Module) -> bool:
    # ``@use_experts_implementation`` sets these in ``__init__``.
    return all(
        hasattr(module, a) for a in ("has_gate", "is_transposed", "has_bias", "_is_expert_parallel")
    )


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """Read the :class:`ExpertsLayout` of an experts module, or raise ``ValueError`` saying why not."""
    name = type(module).__name__
    if not _is_interface_experts(module):
        raise ValueError(
            f"{name} is not an experts module built on transformers' experts interface "
            "(@use_experts_implementation); DR-LoRA adapts fused 3-D experts only"
        )
    if module._is_expert_parallel:
        raise ValueError(
            f"{name} is expert-parallel; DR-LoRA does not support expert parallelism yet"
        )
    up = "gate_up_proj" if module.has_gate else "up_proj"
    projections = (up, "down_proj")
    E = getattr(module, "num_experts", None)
    for p in projections:
        w = getattr(module, p, None)
        if not isinstance(w, torch.Tensor) or len(_shape(w)) != 3:
            raise ValueError(
                f"{name}.{p} must be a 3-D [E, out, in] or [E, in, out] parameter, got {type(w).__name__}"
            )
        if module.has_bias and not isinstance(getattr(module, f"{p}_bias", None), torch.Tensor):
            raise ValueError(f"{name} declares has_bias but has no {p}_bias")
        E = _shape(w)[0] if E is None else E
        if _shape(w)[0] != E:
            raise ValueError(f"{name}.{p} has {_shape(w)[0]} experts, expected num_experts={E}")
    return ExpertsLayout(projections, bool(module.is_transposed), bool(module.has_bias), int(E))


def _experts_with_family(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """``[(name, module, family)]``: ``family`` is ``None`` on the experts interface, else the
    :class:`~drlora_kernels.integrations.families.ExpertsFamily` that adapts the module."""
    from .families import find_family

    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if isinstance(module, (DRLoRAAdapter, RankPool)):
            continue
        if _is_interface_experts(module):
            found.append((name, module, None))
            continue
        family = find_family(module, modules.get(name.rpartition(".")[0], model) if name else None)
        if family is not None:
            found.append((name, module, family))
    return found


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(qualified_name, module)]`` of every experts module DR-LoRA can adapt, in order.

    Those on transformers' experts interface, and those of the families in
    :mod:`~drlora_kernels.integrations.families` (Llama4, undecorated top-k experts).
    """
    return [(n, m) for n, m, _ in _experts_with_family(model)]


def _resolve_targets(
    layout: ExpertsLayout, target_modules: tuple[str, ...], where: str
) -> tuple[str, ...]:
    chosen = []
    for p in layout.projections:
        if p in target_modules or _UP_ALIASES.get(p) in target_modules:
            chosen.append(p)
    if not chosen:
        raise ValueError(
            f"target_modules={list(target_modules)} matches no projection of {where} "
            f"(it has {list(layout.projections)})"
        )
    return tuple(chosen)


# ---------------------------------------------------------------------------------------------
# The adapter submodule and the experts forward
# ---------------------------------------------------------------------------------------------


class DRLoRAAdapter(nn.Module):
    """The rank pools of one experts module (submodule ``drlora`` of it).

    Each adapted projection ``p`` is a :class:`RankPool` attribute named ``p``
    (state-dict keys ``<experts>.drlora.<p>.lora_A`` / ``.lora_B`` / ``.ranks``).

    Attributes:
        layer: index of this experts module among the adapted ones (the controller's layer).
        layout: the module's :class:`ExpertsLayout`.
        base_implementation: the experts implementation the model used before attaching;
            run when the adapter is disabled or merged (``"eager"`` for the families).
        family: the :class:`~drlora_kernels.integrations.families.ExpertsFamily` of a module
            that is not on the experts interface (its forward is replaced), else ``None``.
        merged: the active ranks are folded into the base weights (see ``merge.py``).
        enabled: apply the LoRA update (``False`` gives the base model).
    """

    def __init__(
        self,
        layer: int,
        layout: ExpertsLayout,
        pools: dict[str, RankPool],
        base_implementation: str,
        family=None,
    ):
        super().__init__()
        self.layer = layer
        self.family = family
        self.layout = layout
        self.base_implementation = base_implementation
        self.merged = False
        self.enabled = True
        self.projections = tuple(pools)
        for name, pool in pools.items():
            self.add_module(name, pool)
        self._handle: weakref.ReferenceType[DRLoRAModel] | None = None

    def pools(self) -> list[RankPool]:
        return [getattr(self, p) for p in self.projections]

    def pool(self, projection: str) -> RankPool | None:
        return getattr(self, projection) if projection in self.projections else None

    def record(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Hand the routing of this forward to the controller (training mode only)."""
        handle = self._handle() if self._handle is not None else None
        if handle is not None and handle.controller is not None and self.training:
            handle.controller.record_routing(self.layer, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, projections={list(self.projections)}, merged={self.merged}"


def _grouped_mm_accepts(*tensors: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` takes these operands: 16-byte aligned data and non-unit strides.

    ``torch.nn.functional.grouped_mm`` on the CPU raises "strides should be multiple of 16 bytes"
    otherwise (e.g. GPT-OSS-layout weights at odd sizes).
    """
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _per_expert_linear(x: torch.Tensor, w_in_out: torch.Tensor, offsets: torch.Tensor):
    """``x_e @ W_e`` group by group (``W`` as ``[E, in, out]``, any strides): the eager experts' matmuls."""
    bounds = offsets.tolist()
    parts = [x[bounds[e] : bounds[e + 1]] @ w_in_out[e] for e in range(w_in_out.shape[0])]
    return torch.cat(parts) if parts else x.new_zeros((0, w_in_out.shape[-1]))


def _base_grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    routing,
    transposed: bool,
    implementation: str | None = "grouped_mm",
) -> torch.Tensor:
    """``x_e @ W_e^T`` per expert group, no LoRA, computed the way ``implementation`` computes it.

    * ``"grouped_mm"`` (and the GPU-only implementations): transformers' grouped GEMM dispatcher
      (``_grouped_mm``, private to ``transformers.integrations.moe`` but what the ``grouped_mm``
      implementation runs; it takes ``[E, in, out]`` weights and cumulative offsets without the
      leading 0), unless its operands break ``grouped_mm``'s 16-byte stride rule: then the
      per-expert matmuls below, which take any stride;
    * ``"batched_mm"``: transformers' batched linear (one weight gathered per row);
    * ``"eager"`` (the class's own forward): one matmul per expert group.
    """
    w = weight if transposed else weight.transpose(-2, -1)  # [E, in, out]
    if implementation == "batched_mm":
        from transformers.integrations.moe import _batched_linear

        return _batched_linear(x, weight[routing.expert_index], is_transposed=transposed)
    if implementation in (None, "eager") or not _grouped_mm_accepts(x.to(w.dtype), w):
        return _per_expert_linear(x.to(w.dtype), w, routing.offsets)
    from transformers.integrations.moe import _grouped_mm

    return _grouped_mm(x, w, routing.offsets[1:])


def _project(
    module: nn.Module, adapter: DRLoRAAdapter, name: str, x: torch.Tensor, routing
) -> torch.Tensor:
    weight = getattr(module, name)
    pool = adapter.pool(name)
    layout = adapter.layout
    base = adapter.base_implementation
    if pool is None:
        out = _base_grouped_linear(x, weight, routing, layout.transposed, base)
    elif layout.transposed:
        # [E, in, out]: the fused op takes [E, out, in] and a transposed copy per call would cost a
        # full weight copy, so run the base GEMM and the LoRA-only op side by side.
        out = _base_grouped_linear(x, weight, routing, True, base) + pool(x, routing.offsets)
    else:
        out = pool(x, routing.offsets, weight)  # base GEMM + LoRA in one grouped op
    if layout.has_bias:
        out = out + getattr(module, f"{name}_bias")[routing.expert_index]
    return out


def _base_forward(module: nn.Module, implementation: str):
    """The experts forward of ``implementation`` (``"eager"``: the class's own) for ``module``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    # the class's own forward, kept by @use_experts_implementation's functools.wraps
    eager = type(module).forward.__wrapped__
    if implementation in (None, "eager", EXPERTS_IMPLEMENTATION):
        return eager
    return ALL_EXPERTS_FUNCTIONS.get_interface(implementation, eager)


def _apply_gate(module: nn.Module, layout: ExpertsLayout, h: torch.Tensor) -> torch.Tensor:
    if not layout.has_gate:
        return module.act_fn(h)
    if hasattr(module, "_apply_gate"):  # the interface's default or the family's own (clamps...)
        return module._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def run_drlora_experts(
    module: nn.Module,
    adapter: DRLoRAAdapter,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    weight_inputs: bool = False,
) -> torch.Tensor:
    """The experts of ``module`` with the DR-LoRA update on the expert-sorted rows of ``hidden_states``.

    ``hidden_states [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]`` -> ``[T, H]``: up
    projection, gate (or activation), down projection, each through the pools and the grouped
    ops; the routing weights scale each expert's output, or its input with ``weight_inputs``
    (Llama4 scales the tokens before its experts). The routing goes to the controller.
    """
    adapter.record(top_k_index, top_k_weights)
    routing = route_tokens(top_k_index, top_k_weights, adapter.layout.num_experts)
    x = gather_tokens(hidden_states, routing)
    if weight_inputs:
        x = x * routing.weights.to(x.dtype)[:, None]
    up, down = adapter.layout.projections
    h = _project(module, adapter, up, x, routing)
    h = _apply_gate(module, adapter.layout, h)
    y = _project(module, adapter, down, h, routing)
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return scatter_tokens(y, routing, weighted=not weight_inputs).to(hidden_states.dtype)


def drlora_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward with the DR-LoRA update (registered as ``experts_implementation="drlora"``).

    Same contract as transformers' experts forwards: ``hidden_states [T, H]``, ``top_k_index [T, k]``,
    ``top_k_weights [T, k]`` (the weights the model applies) -> ``[T, H]``. Experts modules without
    an adapter, or with a disabled or merged one, run the implementation active before attaching.
    """
    adapter = getattr(self, ADAPTER_NAME, None)
    if not isinstance(adapter, DRLoRAAdapter):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if adapter.merged or not adapter.enabled:
        return _base_forward(self, adapter.base_implementation)(
            self, hidden_states, top_k_index, top_k_weights
        )
    return run_drlora_experts(self, adapter, hidden_states, top_k_index, top_k_weights)


def _register_interface() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION) is not drlora_experts_forward:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, drlora_experts_forward)


# ---------------------------------------------------------------------------------------------
# The handle
# ---------------------------------------------------------------------------------------------


class DRLoRAModel:
    """The DR-LoRA state of an attached model: pools, config and (optionally) the controller.

    ``get_drlora(model)`` returns it. The model itself is unchanged in type (pass the model to a
    ``Trainer``); every function of ``drlora_kernels.integrations`` accepts the model or this handle.

    Attributes:
        model: the adapted model.
        config: the :class:`DRLoRAConfig`.
        adapters: ``[(experts_module_name, DRLoRAAdapter)]`` in layer order.
        pools: ``pools[layer][pool_index]``, the controller's layout (module ``m = pool_index * E + expert``).
        router_parameters: the routers' parameters (trainable; the controller keeps them from
            moving before ``warmup_steps``).
        controller: the :class:`~drlora_kernels.dynamic.DRLoRAController`, or ``None`` until
            :meth:`setup_controller` (or ``attach_drlora(..., total_steps=...)``).
    """

    def __init__(self, model: nn.Module, config: DRLoRAConfig, adapters: list[tuple[str, DRLoRAAdapter]],
                 router_parameters: list[nn.Parameter], previous_implementation) -> None:  # fmt: skip
        self.model = model
        self.config = config
        self.adapters = adapters
        self.pools: list[list[RankPool]] = [a.pools() for _, a in adapters]
        # (module, attribute) of each router parameter: engines such as FSDP2's fully_shard
        # replace the parameter objects, so they are looked up again at every use
        ids = {id(p) for p in router_parameters}
        self._router_refs = [
            (m, n) for m in model.modules() for n, p in m._parameters.items() if id(p) in ids
        ]
        self.previous_implementation = previous_implementation
        self.controller = None
        self.total_steps: int | None = None
        # what attach changed on the model, for detach_drlora to put back
        self.requires_grad_before: list[tuple[nn.Parameter, bool]] = []
        self.keys_ignored_on_save: set[str] = set()
        for _, a in adapters:
            a._handle = weakref.ref(self)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def router_parameters(self) -> list[nn.Parameter]:
        """The routers' current parameter objects (trainable; held still before ``warmup_steps``)."""
        return [getattr(m, n) for m, n in self._router_refs]

    def setup_controller(self, total_steps: int, *, process_group=None):
        """Create the growth controller for a run of ``total_steps`` optimizer steps."""
        from ..dynamic import DRLoRAController

        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        self.total_steps = total_steps
        self.controller = DRLoRAController(
            self.pools, self.config, total_steps,
            router_parameters=lambda: self.router_parameters, process_group=process_group,
        )  # fmt: skip
        return self.controller

    def named_pools(self) -> Iterator[tuple[str, RankPool]]:
        """``(qualified_parameter_name, pool)`` e.g. ``("model.layers.0.mlp.experts.gate_up_proj", pool)``."""
        for name, adapter in self.adapters:
            for p in adapter.projections:
                yield f"{name}.{p}" if name else p, adapter.pool(p)

    def named_router_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(qualified_name, parameter)`` of the trainable routers (saved with the adapter)."""
        ids = {id(p) for p in self.router_parameters}
        for name, p in self.model.named_parameters():
            if id(p) in ids:
                yield name, p

    def rank_summary(self) -> list[dict[str, float]]:
        """Per layer: mean/min/max active rank over all its modules, and the total."""
        out = []
        for layer in self.pools:
            r = torch.cat([p.ranks.float().cpu() for p in layer])
            out.append(
                {
                    "mean": r.mean().item(),
                    "min": r.min().item(),
                    "max": r.max().item(),
                    "total": r.sum().item(),
                }
            )
        return out

    def set_enabled(self, enabled: bool) -> None:
        """Turn the LoRA update on or off (off gives the base model's outputs)."""
        for _, a in self.adapters:
            a.enabled = bool(enabled)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter to give the optimizer: the LoRA pools and the routers (SPEC: the routers
        are in the optimizer from the start; the controller holds them still during warmup)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def __repr__(self) -> str:
        n = sum(len(p) for p in self.pools)
        return f"DRLoRAModel({type(self.model).__name__}, layers={len(self.pools)}, pools={n}, config={self.config})"


def get_drlora(model_or_handle) -> DRLoRAModel:
    """The :class:`DRLoRAModel` of an attached model (or the handle itself)."""
    if isinstance(model_or_handle, DRLoRAModel):
        return model_or_handle
    handle = getattr(model_or_handle, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError(
            f"{type(model_or_handle).__name__} has no DR-LoRA adapter; call attach_drlora(model, config) first"
        )
    return handle


# ---------------------------------------------------------------------------------------------
# attach
# ---------------------------------------------------------------------------------------------


def _router_parameters(model: nn.Module, experts_names: list[str]) -> list[nn.Parameter]:
    """The routers of the MoE blocks: the sibling modules of each experts module named like a router."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    modules = dict(model.named_modules())
    for name in experts_names:
        parent = modules.get(name.rpartition(".")[0], model)
        for child_name, child in parent.named_children():
            if child_name in ("gate", "router") or "Router" in type(child).__name__:
                for p in child.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
    return params


def _layer_seed(seed: int, layer: int, pool_index: int) -> int:
    return (seed * 1_000_003 + layer * 1_009 + pool_index) % (2**63)


def attach_drlora(
    model: nn.Module,
    config: DRLoRAConfig | None = None,
    total_steps: int | None = None,
    *,
    train_router: bool = True,
    process_group=None,
) -> nn.Module:
    """Add DR-LoRA rank pools to every fused experts module of ``model`` and route it through them.

    Like PEFT's ``get_peft_model``, the call adapts ``model`` in place and returns it, so
    ``model = attach_drlora(model, config)`` keeps working code working; the pools, the
    config and the growth controller live on the handle, :func:`get_drlora` ``(model)``.
    :func:`detach_drlora` undoes it.

    ``model.save_pretrained`` keeps writing the base model only (the pools' keys are added to
    the model's ``_keys_to_ignore_on_save``): the adapter is saved by
    :func:`~drlora_kernels.integrations.save_drlora` or exported by
    :func:`~drlora_kernels.integrations.export_peft`, as PEFT keeps its adapter out of the base.

    Args:
        model: a transformers MoE model whose experts use ``@use_experts_implementation``, or
            one of the families of :mod:`~drlora_kernels.integrations.families` (Llama4...).
        config: the :class:`DRLoRAConfig` (default ``DRLoRAConfig()``).
        total_steps: optimizer steps of the run; when given, the growth controller is created
            (``handle.controller``). Omit it for inference, merging or export.
        train_router: make the routers trainable parameters (SPEC: in the optimizer from the start;
            the controller keeps them from moving before ``warmup_steps``, then they train).
            ``False`` freezes them for the whole run, as plain LoRA does.
        process_group: data-parallel group the controller all-reduces statistics over.

    Returns:
        ``model`` itself (adapted in place); its :class:`DRLoRAModel` handle is ``get_drlora(model)``.

    Raises:
        ValueError: the model has no supported experts module, already has DR-LoRA attached,
            or ``config.target_modules`` (or ``config.layers_to_transform``) matches none of its
            projections.
    """
    config = DRLoRAConfig() if config is None else config
    if not isinstance(config, DRLoRAConfig):
        raise TypeError(f"config must be a DRLoRAConfig, got {type(config).__name__}")
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} already has DR-LoRA attached")
    found = _experts_with_family(model)
    for name, module, _ in found:
        refuse_sharded_experts(name, module)  # FSDP2: attach first, then fully_shard
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no fused experts module: DR-LoRA supports transformers MoE models whose "
            "experts are 3-D parameters on the experts interface (@use_experts_implementation), e.g. OLMoE, Mixtral, "
            "Qwen2/3-MoE, DeepSeek-V2/V3, GPT-OSS, PhiMoE, and Llama4 (drlora_kernels.integrations.families)"
        )
    found = _select_layers(found, config)
    on_interface = any(family is None for _, _, family in found)
    if on_interface and not hasattr(model, "set_experts_implementation"):
        raise ValueError(
            f"{type(model).__name__} is not a transformers PreTrainedModel (no set_experts_implementation)"
        )
    layouts = [experts_layout(m) if family is None else family.layout(m) for _, m, family in found]
    targets = [
        _resolve_targets(layout, config.target_modules, f"{type(module).__name__} ({name})")
        for (name, module, _), layout in zip(found, layouts)
    ]
    names = [
        [f"{name}.{proj}" if name else proj for proj in projections]
        for (name, _, _), projections in zip(found, targets)
    ]
    pool_targets = [[config.pool_r_target(n) for n in layer] for layer in names]
    previous = model.get_experts_implementation() if on_interface else None

    # Everything is validated: from here on the model changes.
    requires_grad_before = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    adapters: list[tuple[str, DRLoRAAdapter]] = []
    modules = dict(model.named_modules())
    for layer, ((name, module, family), layout) in enumerate(zip(found, layouts)):
        if family is None:
            base_impl = getattr(module.config, "_experts_implementation", None) or "grouped_mm"
            if base_impl == EXPERTS_IMPLEMENTATION:
                base_impl = "grouped_mm"
        else:
            base_impl = "eager"
        pools = {}
        for i, proj in enumerate(targets[layer]):
            weight = getattr(module, proj)
            k, n = layout.in_out(weight)
            gen = torch.Generator().manual_seed(_layer_seed(config.seed, layer, i))
            r_target = pool_targets[layer][i]
            pool = GroupedLoRALinear(
                layout.num_experts, k, n, config.r_max, min(config.r_init, r_target),
                r_target=r_target, alpha=config.alpha, scaling=config.scaling,
                dtype=weight.dtype, device=weight.device, generator=gen,
            )  # fmt: skip
            pool.backend = config.backend  # instance override of GroupedLoRALinear.backend
            pools[proj] = pool
        adapter = DRLoRAAdapter(layer, layout, pools, base_impl, family)
        module.add_module(ADAPTER_NAME, adapter)
        adapters.append((name, adapter))
        if family is not None:
            family.install(module, modules.get(name.rpartition(".")[0], model) if name else None)

    _zero3_leaf_experts([(name, module) for name, module, _ in found], model)
    router = _router_parameters(model, [n for n, _, _ in found]) if train_router else []
    for p in router:
        p.requires_grad_(True)

    if on_interface:
        _register_interface()
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        stuck = [
            n
            for n, m, family in found
            if family is None
            and getattr(m.config, "_experts_implementation", None) != EXPERTS_IMPLEMENTATION
        ]
        if stuck:
            raise ValueError(
                f"could not select experts_implementation='drlora' for {type(model).__name__} "
                f"(modules {stuck[:3]} still dispatch to another implementation)"
            )
    handle = DRLoRAModel(model, config, adapters, router, previous)
    handle.requires_grad_before = requires_grad_before
    handle.keys_ignored_on_save = _keep_adapter_out_of_save(model, adapters)
    object.__setattr__(model, _HANDLE_ATTR, handle)
    if total_steps is not None:
        handle.setup_controller(total_steps, process_group=process_group)
    return model


def _select_layers(found: list, config: DRLoRAConfig) -> list:
    """The experts modules of the decoder layers in ``config.layers_to_transform`` (all if unset)."""
    if config.layers_to_transform is None:
        return found
    chosen = []
    for entry in found:
        index = config.layer_index(entry[0])
        if index is None:
            raise ValueError(
                f"layers_to_transform={list(config.layers_to_transform)}: cannot read a layer index "
                f"from {entry[0]!r} (no '<{config.layers_pattern or 'layers'}>.<i>.' in its name)"
            )
        if index in config.layers_to_transform:
            chosen.append(entry)
    if not chosen:
        raise ValueError(
            f"layers_to_transform={list(config.layers_to_transform)} selects none of the MoE layers "
            f"{[config.layer_index(n) for n, _, _ in found]}"
        )
    return chosen


def _keep_adapter_out_of_save(model: nn.Module, adapters) -> set[str]:
    """Add the pools' state-dict keys to ``model._keys_to_ignore_on_save`` (transformers drops
    them in ``save_pretrained``); returns the keys added, for :func:`detach_drlora`."""
    keys = {
        f"{name}.{ADAPTER_NAME}.{k}" if name else f"{ADAPTER_NAME}.{k}"
        for name, adapter in adapters
        for k in adapter.state_dict()
    }
    existing = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    added = keys - existing
    model._keys_to_ignore_on_save = existing | keys
    return added


def detach_drlora(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_drlora`: remove the adapters and give the model back as it was before.

    The experts run their previous implementation again (the families' forwards are restored),
    the ``drlora`` submodules and the handle are removed, every parameter gets back the
    ``requires_grad`` it had before attaching, and ``save_pretrained``'s ignore list is restored.
    The routers keep their values (trained or not); the pools are dropped.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` has no DR-LoRA attached, or an adapter is merged into the base
            weights (call ``unmerge_drlora(model)`` first, or keep the merged model attached).
    """
    handle = get_drlora(model)
    model = handle.model
    if any(adapter.merged for _, adapter in handle.adapters):
        raise ValueError(
            "detach_drlora needs unmerged adapters: call unmerge_drlora(model) first "
            "(the merged weights would otherwise keep the update without the adapter)"
        )
    modules = dict(model.named_modules())
    for name, adapter in handle.adapters:
        module = modules[name] if name else model
        if adapter.family is not None:
            adapter.family.uninstall(module, modules.get(name.rpartition(".")[0], model))
        delattr(module, ADAPTER_NAME)
        adapter._handle = None
    if handle.previous_implementation is not None:
        model.set_experts_implementation(handle.previous_implementation)
    for p, requires_grad in handle.requires_grad_before:
        p.requires_grad_(requires_grad)
    ignored = getattr(model, "_keys_to_ignore_on_save", None)
    if ignored is not None:
        model._keys_to_ignore_on_save = set(ignored) - handle.keys_ignored_on_save
    object.__delattr__(model, _HANDLE_ATTR)
    handle.controller = None
    return model
