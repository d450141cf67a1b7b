"""No host syncs in a training step: the ops never read device tensors on the host.

On an accelerator every ``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)`` or
``nonzero()`` of a device tensor waits for the device. The ops route their one
"may I read this" decision through :func:`~drlora_kernels.ops._sync.host_checks_enabled`;
:func:`~drlora_kernels.ops._sync.simulate_accelerator` makes CPU tensors take the
accelerator path, so on a CPU-only machine a training step of a MoE layer must run
with those Tensor methods made to raise. The guarantee covers the ``native`` and
``triton`` backends: the ``reference`` backend loops over experts in Python and reads
``ranks``/``offsets`` by design. (Triton on a CPU is its interpreter, which converts
tensors on the host itself, so it is checked on GPUs only: ``test_no_sync_on_cuda``.)
"""

from __future__ import annotations

import pytest
import torch

from drlora_kernels import _native
from drlora_kernels.layers import DRLoRAExperts
from drlora_kernels.ops._sync import host_checks_enabled, simulate_accelerator

SYNC_POINTS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero")


def _experts(backend: str, device="cpu") -> DRLoRAExperts:
    gen = torch.Generator().manual_seed(0)
    E, H, inter = 4, 16, 12
    experts = DRLoRAExperts(
        torch.randn(E, 2 * inter, H, generator=gen) * 0.2,
        torch.randn(E, H, inter, generator=gen) * 0.2,
        r_max=8,
        r_init=3,
        backend=backend,
        generator=gen,
    )
    with torch.no_grad():
        experts.lora_gate_up.lora_B.normal_(generator=gen)
        experts.lora_down.lora_B.normal_(generator=gen)
    experts.lora_down.grow([1, 2], [5, 2])
    return experts.to(device)


def _inputs(device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 16, generator=gen)
    idx = torch.randint(0, 4, (10, 2), generator=gen)
    wts = torch.rand(10, 2, generator=gen)
    return hidden.to(device), idx.to(device), wts.to(device)


def _step(experts: DRLoRAExperts, inputs) -> torch.Tensor:
    hidden, idx, wts = inputs
    hidden = hidden.detach().requires_grad_()
    experts(hidden, idx, wts).square().sum().backward()
    return hidden.grad


def _forbid_host_reads(monkeypatch):
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called in a training step")

        return method

    for name in SYNC_POINTS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.skipif(not _native.HAS_NATIVE, reason=f"native: {_native.NOT_LOADED_REASON}")
def test_moe_training_step_reads_nothing_on_the_host(monkeypatch):
    experts, inputs = _experts("native"), _inputs()
    expected = _step(experts, inputs)
    grads = [p.grad.clone() for p in experts.parameters() if p.requires_grad]
    experts.zero_grad()
    with simulate_accelerator():
        _forbid_host_reads(monkeypatch)
        got = _step(experts, inputs)
        monkeypatch.undo()
    torch.testing.assert_close(got, expected)
    for g, p in zip(grads, [p for p in experts.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g)


def test_the_guard_catches_a_host_read(monkeypatch):
    """The monkeypatch above really refuses: the reference backend reads ranks on the host."""
    experts, inputs = _experts("reference"), _inputs()
    with simulate_accelerator():
        _forbid_host_reads(monkeypatch)
        with pytest.raises(AssertionError, match="host sync: Tensor.tolist"):
            _step(experts, inputs)
        monkeypatch.undo()


def test_host_checks_switch():
    t = torch.zeros(3)
    assert host_checks_enabled(t)
    with simulate_accelerator():
        assert not host_checks_enabled(t)
    assert host_checks_enabled(t)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_no_sync_on_cuda(backend):
    """On a GPU: a forward + backward of the expert block under sync-debug mode ``error``."""
    from drlora_kernels.ops import describe_backend

    ok, why = describe_backend(backend).supports(torch.device("cuda"))
    if not ok:
        pytest.skip(f"{backend} on cuda: {why}")
    experts, inputs = _experts(backend, "cuda"), _inputs("cuda")
    _step(experts, inputs)  # warm-up: autotuning and lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(experts, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
