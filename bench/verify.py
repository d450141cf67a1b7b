"""Verify a provider's outputs against the reference before it is timed.

Each output is compared in fp64 with a tolerance relative to the reference's
own magnitude: ``max|out - ref| <= rtol[dtype] * max(1, max|ref|)``. The
per-dtype ``rtol`` is loose enough for a different summation order (a grouped
GEMM versus a per-expert loop; a low-precision ``W + s*B@A`` rebuild) and tight
enough that a wrong rank, a missing scale or a dropped expert fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RTOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class Verdict:
    """``match`` and the worst relative error over all compared outputs (``worst`` names it)."""

    match: bool
    max_rel_err: float
    worst: str
    detail: str = ""


def compare(
    outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], dtype: torch.dtype
) -> Verdict:
    """Compare every output the reference has; a missing or non-finite output fails."""
    rtol = RTOL[dtype]
    worst_err, worst_name, problems = 0.0, "", []
    for name, ref in reference.items():
        out = outputs.get(name)
        if out is None:
            problems.append(f"{name}: missing")
            continue
        if tuple(out.shape) != tuple(ref.shape):
            problems.append(f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
            continue
        out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
        if not torch.isfinite(out64).all():
            problems.append(f"{name}: non-finite values")
            continue
        if ref64.numel() == 0:
            continue
        scale = max(1.0, float(ref64.abs().max()))
        rel = float((out64 - ref64).abs().max()) / scale
        if rel > worst_err:
            worst_err, worst_name = rel, name
        if rel > rtol:
            problems.append(f"{name}: max error {rel:.2e} x max|ref| > rtol {rtol:.0e}")
    return Verdict(not problems, worst_err, worst_name, "; ".join(problems))
