"""The ``drlora`` command line: ``demo`` (the main job)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    import drlora_kernels as dk
    from drlora_kernels.ops import reference

    torch.manual_seed(args.seed)
    E, H, I, T, k = 8, 64, 48, 256, 2
    experts = dk.DRLoRAExperts(torch.randn(E, 2 * I, H) * H**-0.5, torch.randn(E, H, I) * I**-0.5, r_max=16, r_init=4, r_target=8)
    with torch.no_grad():  # give B non-zero values so the LoRA path is visible
        for pool in (experts.lora_gate_up, experts.lora_down):
            pool.lora_B.normal_(std=0.02)
    experts.lora_gate_up.grow([0, 3], [6, 12])
    hidden = torch.randn(T, H)
    idx = torch.randint(0, E, (T, k))
    wts = torch.softmax(torch.randn(T, k), -1)
    y = experts(hidden, idx, wts)
    y.pow(2).mean().backward()
    routing = dk.route_tokens(idx, wts, E)
    x = hidden[routing.token_index]
    p = experts.lora_gate_up
    ref, _ = reference.forward(x, experts.gate_up_proj, p.lora_A.detach(), p.lora_B.detach(), p.ranks, routing.offsets,
                               torch.full((E,), p.scaling))
    out = dk.grouped_lora_base(x, experts.gate_up_proj, p.lora_A.detach(), p.lora_B.detach(), p.ranks, routing.offsets, p.scaling)
    print(f"backends: { {k: v[0] for k, v in dk.available_backends().items()} }")
    print(f"gate_up ranks: {p.ranks.tolist()}  down ranks: {experts.lora_down.ranks.tolist()}")
    print(f"max |ours - reference| on gate_up: {(out - ref).abs().max().item():.2e}")
    inactive = ~p.active_mask()
    print(f"grad in inactive A slots: {p.lora_A.grad[inactive].abs().max().item():.1f} (must be 0)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end example")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
