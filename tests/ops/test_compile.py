"""``torch.compile(fullgraph=True)`` matches eager and does not recompile when group sizes change.

On CPU this runs against the reference and native backends; the Triton path
under compile is exercised on a GPU machine (the interpreter is too slow).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import drlora_kernels as dk
from drlora_kernels.layers import DRLoRAExperts
from tests.helpers import make_problem


def _compile_backends(backend):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("Triton under torch.compile is tested on GPU machines")
    return backend


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fn(backend):
    def f(x, w, a, b, ranks, offsets, scale):
        return (
            dk.grouped_lora_base(x, w, a, b, ranks, offsets, scale, backend=backend).square().mean()
        )

    return f


def test_compile_fullgraph_matches_eager(backend):
    backend = _compile_backends(backend)
    p = make_problem(E=4, K=16, N=12, R=8, T=30, popularity="zipf:1.5", ranks=[2, 8, 0, 4])
    leaves = [t.clone().requires_grad_() for t in (p.x, p.w, p.lora_a, p.lora_b)]
    eager = _fn(backend)(*leaves, p.ranks, p.offsets, p.scale)
    eager.backward()
    eager_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = torch.compile(_fn(backend), fullgraph=True)
    out = compiled(*leaves, p.ranks, p.offsets, p.scale)
    out.backward()
    torch.testing.assert_close(out, eager)
    for name, g, ref in zip(("x", "w", "a", "b"), (t.grad for t in leaves), eager_grads):
        torch.testing.assert_close(g, ref, msg=f"grad of {name}")


def test_no_recompile_when_group_sizes_change(backend):
    backend = _compile_backends(backend)
    compiled = torch.compile(_fn(backend), fullgraph=True)
    p = make_problem(E=4, K=16, N=12, R=8, group_sizes=[10, 0, 12, 8], ranks=[2, 8, 0, 4])
    compiled(p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    q = make_problem(E=4, K=16, N=12, R=8, group_sizes=[1, 20, 0, 9], ranks=[5, 1, 8, 0], seed=1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(q.x, q.w, q.lora_a, q.lora_b, q.ranks, q.offsets, q.scale)
    ref = _fn("reference")(q.x, q.w, q.lora_a, q.lora_b, q.ranks, q.offsets, q.scale)
    torch.testing.assert_close(out, ref)


def test_no_recompile_when_token_count_changes(backend):
    """With dynamic shapes, a new number of token rows reuses the graph (no value is specialised)."""
    backend = _compile_backends(backend)
    compiled = torch.compile(_fn(backend), fullgraph=True, dynamic=True)
    p = make_problem(E=4, K=16, N=12, R=8, group_sizes=[10, 0, 12, 8], ranks=[2, 8, 0, 4])
    compiled(p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    q = make_problem(E=4, K=16, N=12, R=8, group_sizes=[1, 20, 0, 19], ranks=[5, 1, 8, 0], seed=1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(q.x, q.w, q.lora_a, q.lora_b, q.ranks, q.offsets, q.scale)
    ref = _fn("reference")(q.x, q.w, q.lora_a, q.lora_b, q.ranks, q.offsets, q.scale)
    torch.testing.assert_close(out, ref)


def test_compiled_expert_block_matches_eager(backend):
    backend = _compile_backends(backend)
    E, H, I = 4, 16, 12
    experts = DRLoRAExperts(
        torch.randn(E, 2 * I, H) * 0.2,
        torch.randn(E, H, I) * 0.2,
        r_max=8,
        r_init=3,
        backend=backend,
    )
    with torch.no_grad():
        experts.lora_gate_up.lora_B.normal_()
        experts.lora_down.lora_B.normal_()
    experts.lora_down.grow([1, 2], [5, 2])
    hidden = torch.randn(10, H)
    idx = torch.randint(0, E, (10, 2))
    wts = torch.rand(10, 2)
    eager = experts(hidden, idx, wts)
    compiled = torch.compile(experts, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, idx, wts), eager)


BAD_VALUES = {
    "rank-above-r-max": (dict(ranks=[2, 9, 0, 4]), "ranks out of range"),
    "rank-negative": (dict(ranks=[2, -1, 0, 4]), "ranks out of range"),
    "offsets-non-monotone": (dict(offsets=[0, 12, 10, 22, 30]), "offsets"),
    "offsets-end": (dict(offsets=[0, 10, 10, 22, 29]), "offsets"),
    "offsets-start": (dict(offsets=[1, 10, 10, 22, 30]), "offsets"),
}


@pytest.mark.parametrize("bad", list(BAD_VALUES), ids=list(BAD_VALUES))
def test_compiled_graph_refuses_bad_ranks_and_offsets(backend, bad):
    """Value checks hold inside a compiled graph (device-side asserts), never a silent result."""
    backend = _compile_backends(backend)
    compiled = torch.compile(_fn(backend), fullgraph=True)
    p = make_problem(E=4, K=16, N=12, R=8, group_sizes=[10, 0, 12, 8], ranks=[2, 8, 0, 4])
    args = [p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale]
    compiled(*args)
    over, match = BAD_VALUES[bad]
    if "ranks" in over:
        args[4] = torch.tensor(over["ranks"], dtype=torch.int32)
    else:
        args[5] = torch.tensor(over["offsets"], dtype=torch.int32)
    with torch._dynamo.config.patch(error_on_recompile=True):
        with pytest.raises((RuntimeError, ValueError), match=match):
            compiled(*args)


def test_compiled_route_tokens_refuses_bad_expert_ids():
    compiled = torch.compile(lambda i, w: dk.route_tokens(i, w, 4).offsets, fullgraph=True)
    idx, wts = torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2)
    torch.testing.assert_close(compiled(idx, wts), torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="expert id outside"):
        compiled(torch.tensor([[0, 1], [2, 4]]), wts)
