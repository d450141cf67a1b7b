"""Ahead-of-time compile gate of the Triton kernels for sm_80 (A100) and sm_90 (H100), no GPU needed.

Runs the backend's three primitives (forward and backward of a base+LoRA layer, and the
LoRA-only variants) on ``meta`` tensors at realistic MoE shapes while
``triton_impl.capture_launches`` records every kernel launch instead of running it, then compiles
each recorded launch at EVERY config the package can select (``triton_configs.CONFIGS``) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` -- the specialisation
(constexprs, stride-1 and 16-divisibility attributes) comes from Triton's own binder, so each
compile is the one a GPU would run. Triton's bundled ``ptxas -v`` reports registers and spills;
the kernel metadata gives shared memory; the PTX shows whether the dots use ``wgmma`` or ``mma``.

Fails (exit 1) on: a compile error; a DEFAULT config (used with autotuning off) that spills or
exceeds the target's shared memory; a config that ``triton_configs.prune`` keeps for the target
but that spills or exceeds shared memory (the pruning must agree with the compiler). Configs the
pruner drops are compiled and reported (``pruned``) but do not fail the gate.

    python tools/gate_triton.py                     # every config, every precision, sm_80 + sm_90
    python tools/gate_triton.py --configs default   # the defaults only (what CI runs always)
    python tools/gate_triton.py --markdown          # the table as Markdown
    python tools/gate_triton.py --configs default --pivot   # targets side by side (README)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1":
    # triton.jit decides at import whether kernels are interpreted; the gate needs real ones
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from drlora_kernels.ops import triton_configs as tc  # noqa: E402
from drlora_kernels.ops import triton_impl as ti  # noqa: E402

#: Layer shapes (E experts, hidden H, expert intermediate I, pool R, rows T): gate_up is
#: K=H -> N=2I, down is K=I -> N=H. OLMoE-1B-7B and Qwen3-30B-A3B (top-8 of 64 / 128 experts).
SHAPES = {
    "olmoe": dict(E=64, H=2048, I=1024, R=64, T=8192 * 8),
    "qwen3moe": dict(E=128, H=2048, I=768, R=64, T=8192 * 8),
}
#: (label, storage dtype, TF32 on) -- fp32 runs TF32 under "high"/"medium" and IEEE under "highest".
PRECISIONS = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
    "fp64": (torch.float64, False),
}
TARGETS = (80, 90)

_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Row:
    """One compiled (launch, config, target) with its resources and verdict."""

    kernel: str
    role: str
    target: int
    precision: str
    config: str
    default: bool
    kept: bool
    pruned_why: str = ""
    shape: str = ""
    regs: int = 0
    spill: int = 0
    smem: int = 0
    dot: str = ""
    error: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.problems:
            return "FAIL: " + "; ".join(self.problems)
        if not self.kept:
            return f"pruned ({self.pruned_why})" if self.pruned_why else "pruned"
        return "ok"


def _roles(shape: dict) -> list[tuple[str, callable]]:
    """The primitive calls of one layer (forward + backward, base+LoRA and LoRA only)."""
    E, H, I, R, T = (shape[k] for k in ("E", "H", "I", "R", "T"))
    K, N = H, 2 * I

    def t(*s, dtype):
        return torch.empty(*s, dtype=dtype, device="meta")

    def calls(dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x, dy = t(T, K, dtype=dtype), t(T, N, dtype=dtype)
        w, a, b = t(E, N, K, dtype=dtype), t(E, R, K, dtype=dtype), t(E, N, R, dtype=dtype)
        u, gb = t(T, R, dtype=acc), t(T, R, dtype=acc)
        ranks, offsets = t(E, dtype=torch.int32), t(E + 1, dtype=torch.int32)
        scale = t(E, dtype=torch.float32)
        return [
            ("u = shrink(x, A)", lambda: ti.shrink(x, a, ranks, offsets)),
            ("y = x W^T + s u B^T", lambda: ti.base_expand(x, w, u, b, ranks, offsets, scale)),
            ("y = s u B^T", lambda: ti.base_expand(None, None, u, b, ranks, offsets, scale)),
            ("gb = shrink(dY, B^T, s)",
             lambda: ti.shrink(dy, b.transpose(1, 2), ranks, offsets, scale)),
            ("dX = dY W + gb A", lambda: ti.base_expand(
                dy, w.transpose(1, 2), gb, a.transpose(1, 2), ranks, offsets)),
            ("dX = gb A", lambda: ti.base_expand(
                dy, None, gb, a.transpose(1, 2), ranks, offsets)),
            ("weight grads", lambda: ti.weight_grad(
                dy, x, u, gb, ranks, offsets, scale, True, True, True)),
        ]  # fmt: skip

    return calls


_WG_ROLES = {"weight_grad_a": "dA = gb^T x", "weight_grad_b": "dB = s dY^T u",
             "weight_grad_w": "dW = dY^T x"}  # fmt: skip


def _weight_grad_roles(launches, role: str) -> list[str]:
    # weight_grad launches (pass 1, reduce) per gradient: name each after its gradient
    out, last = [], role
    for launch in launches:
        last = _WG_ROLES.get(launch.site, last)
        out.append(last + (" (reduce)" if launch.site == "weight_grad_reduce" else ""))
    return out


def _signature(launch, cfg, backend):
    # Triton's own binder: the specialisation a GPU launch with these arguments would compile
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(**launch.constexprs, **cfg.kwargs, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)  # fmt: skip
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return options, sig, constexprs, attrs


def _compile(launch, cfg, target):
    backend = make_backend(target)
    options, sig, constexprs, attrs = _signature(launch, cfg, backend)
    key = (launch.kernel.fn.__name__, target.arch, str(sig), str(sorted(constexprs.items(),
           key=str)), str(attrs), cfg)  # fmt: skip
    if key in _CACHE:
        return _CACHE[key]
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(launch.kernel, sig, constexprs, attrs),
                target=target,
                options=options.__dict__,
            )
    except Exception as exc:  # noqa: BLE001 -- any compile failure is a gate failure
        result = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    else:
        text = log.getvalue()
        regs, spill = _PTXAS.search(text), _SPILL.search(text)
        ptx = compiled.asm["ptx"]
        dot = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"
        if launch.site == "weight_grad_reduce":
            dot = "-"  # an elementwise sum, no dot
        result = dict(
            regs=int(regs.group(1)) if regs else -1,
            spill=int(spill.group(1)) + int(spill.group(2)) if spill else -1,
            smem=int(compiled.metadata.shared),
            dot=dot,
        )
    _CACHE[key] = result
    return result


_CACHE: dict = {}


CONFIG_SETS = ("all", "default", "alternatives")


def collect(targets, precisions, shapes, configs: str = "all", log=print) -> list[Row]:
    """Compile every launch of the primitives at every selectable config; one Row each."""
    rows: list[Row] = []
    for cc in targets:
        target = GPUTarget("cuda", cc, 32)
        limit = tc.SMEM_LIMIT[cc]
        for label in precisions:
            dtype, tf32 = PRECISIONS[label]
            tc.ALLOW_TF32 = tf32
            prec = tc.precision(dtype)
            for shape_name in shapes:
                for role, call in _roles(SHAPES[shape_name])(dtype):
                    with ti.capture_launches(smem_limit=10**9) as launches:  # every config
                        call()
                    for launch, sub in zip(launches, _weight_grad_roles(launches, role)):
                        rows += _compile_launch(launch, sub, shape_name, cc, target, limit,
                                                label, prec, configs, log)  # fmt: skip
    tc.ALLOW_TF32 = None
    return rows


def _compile_launch(launch, role, shape, cc, target, limit, label, prec, configs, log):
    if launch.site in tc.CONFIGS:  # every config of the table, fitted to the pool as at run time
        every = [
            tc.fit_rank_block(launch.site, c, launch.pool) for c in tc.CONFIGS[launch.site][prec]
        ]
        every = list(dict.fromkeys(every))
        kept = set(tc.prune(launch.site, every, prec, limit))
    else:  # a fixed config (the weight-gradient reduction)
        every, kept = list(launch.configs), set(launch.configs)
    out = []
    chosen = {"all": every, "default": every[:1], "alternatives": every[1:]}[configs]
    for cfg in chosen:
        t0 = time.perf_counter()
        row = Row(launch.kernel.fn.__name__.strip("_"), role, cc, label, str(cfg),
                  cfg == every[0], cfg in kept, _pruned_why(launch.site, cfg, prec, limit),
                  shape, **_compile(launch, cfg, target))  # fmt: skip
        _judge(row, limit)
        out.append(row)
        log(f"  sm_{cc} {label:9s} {shape:8s} {row.kernel:28s} {role:24s} {row.config:30s} "
            f"{time.perf_counter() - t0:5.1f}s {row.status}")  # fmt: skip
    return out


def _pruned_why(site: str, cfg, prec: str, limit: int) -> str:
    # the pruner's reason, in its own estimates (the measured numbers are in the other columns)
    if site not in tc.CONFIGS:
        return ""
    smem, regs = tc.smem_estimate(site, cfg, prec), tc.acc_regs_estimate(site, cfg, prec)
    if smem > limit:
        return f"est. smem {smem} > {limit}"
    return f"est. acc regs {regs} > {tc.MAX_ACC_REGS}" if regs > tc.MAX_ACC_REGS else ""


def _judge(row: Row, limit: int) -> None:
    if row.error:
        row.problems.append(row.error)
        return
    bad = []
    if row.spill != 0:
        bad.append(f"spills {row.spill} B" if row.spill > 0 else "no ptxas report")
    if row.smem > limit:
        bad.append(f"smem {row.smem} > {limit}")
    if bad and (row.default or row.kept):
        row.problems += [("default " if row.default else "kept by prune: ") + b for b in bad]


def table(rows: list[Row], markdown: bool = False) -> str:
    """The resource table: one line per compiled (kernel, role, target, precision, config)."""
    head = ["kernel", "role", "shape", "target", "dtype", "config", "default", "regs",
            "spills (B)", "smem (B)", "dot", "status"]  # fmt: skip
    body = [
        [r.kernel, r.role, r.shape, f"sm_{r.target}", r.precision, r.config,
         "yes" if r.default else "",
         str(r.regs), str(r.spill), str(r.smem), r.dot, r.status]
        for r in rows
    ]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:{w}s}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [head, *body])


def pivot(rows: list[Row]) -> str:
    """Markdown, one line per (precision, kernel role, config) with the targets side by side:
    ``regs / spills / smem KiB / dot`` per target (the README's table)."""
    targets = sorted({r.target for r in rows})
    cells: dict[tuple, dict[int, Row]] = {}
    for r in rows:
        cells.setdefault((r.shape, r.precision, r.role, r.config, r.default), {})[r.target] = r
    head = ["shape", "dtype", "launch", "config", *(f"sm_{t}: regs / spills / smem / dot" for t in
                                                  targets), "status"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, prec, role, cfg, default), by_t in cells.items():
        res = [
            f"{x.regs} / {x.spill} / {x.smem / 1024:.0f} KiB / {x.dot}"
            if (x := by_t.get(t))
            else ""
            for t in targets
        ]
        status = "; ".join(dict.fromkeys(x.status for x in by_t.values()))
        name = role + (" (default)" if default else "")
        lines.append("| " + " | ".join([shape, prec, name, cfg, *res, status]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the gate; print the table; return 0 when every check passes, 1 otherwise."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)),
                   help="compute capabilities (default: 80,90)")  # fmt: skip
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help=f"comma list of {', '.join(PRECISIONS)}")  # fmt: skip
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--configs", choices=CONFIG_SETS, default="all",
                   help="all (default), default (the configs used with autotuning off), or "
                        "alternatives (the other autotune candidates)")  # fmt: skip
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--pivot", action="store_true",
                   help="print Markdown with the targets side by side (the README's table)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no per-compile progress lines")
    args = p.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    precisions, shapes = args.precisions.split(","), args.shapes.split(",")
    for name, have, allowed in (("--targets", targets, tc.SMEM_LIMIT),
                                ("--precisions", precisions, PRECISIONS),
                                ("--shapes", shapes, SHAPES)):  # fmt: skip
        unknown = [x for x in have if x not in allowed]
        if unknown:
            p.error(f"{name}: unknown {unknown}; choose from {list(allowed)}")
    knobs.compilation.always_compile = True  # ptxas must run (its log has registers/spills)
    knobs.nvidia.dump_ptxas_log = True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache
        rows = collect(targets, precisions, shapes, args.configs,
                       log=(lambda s: None) if args.quiet else print)  # fmt: skip
    print(pivot(rows) if args.pivot else table(rows, markdown=args.markdown))
    failed = [r for r in rows if r.problems]
    print(f"\ngate_triton: {len(rows)} compiles ({sum(r.default for r in rows)} defaults, "
          f"{sum(not r.kept for r in rows)} pruned), {len(failed)} failures, "
          f"{time.perf_counter() - start:.0f} s, triton {triton.__version__}")  # fmt: skip
    for r in failed:
        print(f"gate_triton: FAIL sm_{r.target} {r.precision} {r.kernel} [{r.role}] {r.config}: "
              f"{'; '.join(r.problems)}", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
