"""Per-family adapters for MoE experts that are fused 3-D parameters but not on transformers' experts interface.

Most transformers MoE families decorate their experts with ``@use_experts_implementation``;
:func:`~drlora_kernels.integrations.transformers.attach_drlora` routes those through the
interface and needs no family code. A few store the experts the same way (fused 3-D
``gate_up_proj``/``down_proj`` parameters) but call them differently; each gets a small
:class:`ExpertsFamily` here that says how its weights are laid out and which ``forward`` to
replace so that the tokens go through the pools and the grouped ops:

* :class:`Llama4Family` — ``Llama4TextExperts`` (``[E, in, out]`` weights) is called by
  ``Llama4TextMoe`` with **every** token for **every** expert, pre-scaled by its sigmoid router
  score (zero for the experts not in its top-k). The adapter replaces the MoE block's forward:
  the same router, the same shared expert, but only the ``k`` chosen experts of each token are
  computed (the others multiply a zero input), with the scores applied to the inputs as
  Llama4 does. This is PEFT's reference model for ``target_parameters``.
* :class:`TopKExpertsFamily` — any experts module called like the interface's,
  ``forward(hidden_states, top_k_index, top_k_weights)``, with 3-D ``gate_up_proj`` (or
  ``up_proj``) and ``down_proj`` but without the decorator (e.g. Step-3.7's ``Step3p7Experts``):
  its forward is replaced on the instance. Its own ``_apply_gate`` (clamps) is kept.

Disabling or merging the adapter runs the family's original forward; :func:`uninstall` puts
it back. Families whose experts are not fused 3-D parameters (DBRX's flattened ``w1/v1/w2``,
JetMoE, Switch/NLLB's per-expert modules) are not adapted: ``attach_drlora`` says so.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from .transformers import (
    ADAPTER_NAME,
    DRLoRAAdapter,
    ExpertsLayout,
    run_drlora_experts,
)

__all__ = ["FAMILIES", "ExpertsFamily", "Llama4Family", "TopKExpertsFamily", "find_family"]

_TOPK_SIGNATURE = ["hidden_states", "top_k_index", "top_k_weights"]


def _adapter(module: nn.Module) -> DRLoRAAdapter | None:
    adapter = getattr(module, ADAPTER_NAME, None)
    return adapter if isinstance(adapter, DRLoRAAdapter) else None


def _active(adapter: DRLoRAAdapter | None) -> bool:
    return adapter is not None and adapter.enabled and not adapter.merged


class ExpertsFamily:
    """How DR-LoRA adapts one kind of experts module that is not on the experts interface.

    Subclasses set :attr:`name` and implement :meth:`matches`, :meth:`layout`, :meth:`install`
    and :meth:`uninstall`. ``parent`` is the module holding the experts (the MoE block).
    """

    name: str = ""

    def matches(self, module: nn.Module, parent: nn.Module | None) -> bool:
        raise NotImplementedError

    def layout(self, module: nn.Module) -> ExpertsLayout:
        raise NotImplementedError

    def install(self, module: nn.Module, parent: nn.Module | None) -> None:
        """Route the experts' tokens through ``module.drlora`` (called once the adapter exists)."""
        raise NotImplementedError

    def uninstall(self, module: nn.Module, parent: nn.Module | None) -> None:
        """Undo :meth:`install`."""
        raise NotImplementedError


def _replace_forward(owner: nn.Module, forward) -> None:
    owner.forward = types.MethodType(forward, owner)


def _restore_forward(owner: nn.Module) -> None:
    owner.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------- Llama4


def _llama4_moe_forward(self: nn.Module, hidden_states: torch.Tensor):
    """``Llama4TextMoe.forward`` with the routed experts through DR-LoRA (same outputs, top-k rows only)."""
    adapter = _adapter(self.experts)
    if not _active(adapter):
        return type(self).forward(self, hidden_states)
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)  # [T, E]: sigmoid(top-k), 0 elsewhere
    top_k_index = torch.topk(router_logits, self.router.top_k, dim=1).indices
    top_k_weights = router_scores.gather(1, top_k_index)
    out = self.shared_expert(hidden_states)
    routed = run_drlora_experts(
        self.experts, adapter, hidden_states, top_k_index, top_k_weights, weight_inputs=True
    )
    return out + routed.to(out.dtype), router_logits


class Llama4Family(ExpertsFamily):
    """``Llama4TextExperts`` inside ``Llama4TextMoe`` (weights ``[E, H, 2I]`` / ``[E, I, H]``)."""

    name = "llama4"

    def matches(self, module, parent) -> bool:
        return type(module).__name__ == "Llama4TextExperts" and type(parent).__name__ == (
            "Llama4TextMoe"
        )

    def layout(self, module) -> ExpertsLayout:
        return ExpertsLayout(
            ("gate_up_proj", "down_proj"),
            transposed=True,
            has_bias=False,
            num_experts=int(module.num_experts),
        )

    def install(self, module, parent) -> None:
        _replace_forward(parent, _llama4_moe_forward)

    def uninstall(self, module, parent) -> None:
        _restore_forward(parent)


# --------------------------------------------------------------------- top-k experts, no decorator


def _topk_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    adapter = _adapter(self)
    if not _active(adapter):
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    return run_drlora_experts(self, adapter, hidden_states, top_k_index, top_k_weights)


def _param3d(module: nn.Module, name: str) -> torch.Tensor | None:
    w = getattr(module, name, None)
    return w if isinstance(w, torch.Tensor) and w.dim() == 3 else None


class TopKExpertsFamily(ExpertsFamily):
    """Experts with the interface's call signature and fused 3-D weights, but no decorator."""

    name = "topk_experts"

    def matches(self, module, parent) -> bool:
        try:
            params = list(inspect.signature(type(module).forward).parameters)[1:]
        except (TypeError, ValueError):
            return False
        up = _param3d(module, "gate_up_proj") is not None or _param3d(module, "up_proj") is not None
        return params == _TOPK_SIGNATURE and up and _param3d(module, "down_proj") is not None

    def layout(self, module) -> ExpertsLayout:
        up_name = "gate_up_proj" if _param3d(module, "gate_up_proj") is not None else "up_proj"
        up, down = _param3d(module, up_name), _param3d(module, "down_proj")
        E = up.shape[0]
        # [E, out, in]: the down projection's input is the (gated) up output and its output the
        # up projection's input; [E, in, out] the other way round.
        gate = 2 if up_name == "gate_up_proj" else 1
        plain = up.shape[2] == down.shape[1] and up.shape[1] == gate * down.shape[2]
        transposed = up.shape[1] == down.shape[2] and up.shape[2] == gate * down.shape[1]
        if plain == transposed:
            raise ValueError(
                f"{type(module).__name__}: cannot tell the layout of {up_name} {tuple(up.shape)} and "
                f"down_proj {tuple(down.shape)} ([E, out, in] or [E, in, out])"
            )
        has_bias = all(
            isinstance(getattr(module, f"{p}_bias", None), torch.Tensor)
            for p in (up_name, "down_proj")
        )
        return ExpertsLayout((up_name, "down_proj"), transposed, has_bias=has_bias, num_experts=E)

    def install(self, module, parent) -> None:
        _replace_forward(module, _topk_experts_forward)

    def uninstall(self, module, parent) -> None:
        _restore_forward(module)


FAMILIES: tuple[ExpertsFamily, ...] = (Llama4Family(), TopKExpertsFamily())


def find_family(module: nn.Module, parent: nn.Module | None) -> ExpertsFamily | None:
    """The :class:`ExpertsFamily` that adapts ``module`` (held by ``parent``), or ``None``."""
    for family in FAMILIES:
        if family.matches(module, parent):
            return family
    return None
