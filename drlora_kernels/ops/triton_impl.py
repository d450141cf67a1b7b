"""The ``triton`` backend: grouped variable-rank LoRA as Triton kernels (launchers only).

The backend contract is three primitives (DESIGN.md), each one or two kernel launches:

* :func:`shrink`       ``u = s x A^T`` per expert at its rank (forward ``u``; backward ``gb`` with
  ``A = B^T`` passed as a strided view);
* :func:`base_expand`  ``y = x W^T + s u B^T`` (W optional; backward ``dX`` with ``W^T``, ``A^T``);
* :func:`weight_grad`  ``dA = gb^T x``, ``dB = s dY^T u``, ``dW = dY^T x``, rows of large experts
  split into chunks and reduced in a fixed order (no atomics).

Kernels live in :mod:`drlora_kernels.kernels` and take every operand through its strides,
so transposed views cost nothing. Tile configs, autotuning and the deterministic mode live in
:mod:`drlora_kernels.ops.triton_configs`. Grids depend only on shapes (``cdiv(T, BLOCK_M) + E``
row tiles), never on ``offsets`` or ``ranks`` values, so launches do no host sync and can be
captured in CUDA graphs.

On CPU the kernels run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` before triton is first imported. Interpreter workarounds live in
one place, :func:`_dot_dtype` and ``triton_configs.INTERP_CONFIGS``: operands are converted to
fp32 before every dot (the interpreter gets bf16 arithmetic wrong), one config (no
autotune), every block dimension >= 16 (``tl.dot``'s minimum there).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import triton_configs as tc

try:
    import triton
    import triton.language as tl

    from ..kernels.expand import _grouped_lora_base_expand_kernel
    from ..kernels.shrink import _grouped_lora_shrink_kernel
    from ..kernels.weight_grad import _grouped_weight_grad_kernel, _weight_grad_reduce_kernel

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton missing: the backend reports itself unavailable
    triton = tl = None
    _IMPORT_ERROR = f"triton is not importable: {exc}"

NAME = "triton"
DEVICE_TYPES = ("cpu", "cuda")
#: fp64 inputs run with fp64 accumulation (u and gradients in fp64).
SUPPORTS_FP64 = True

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_interpreted() -> bool:
    # triton.jit decides at decoration (import) time whether a kernel is interpreted.
    return (
        _IMPORT_ERROR is None
        and type(_grouped_lora_shrink_kernel).__name__ == "InterpretedFunction"
    )


def is_available() -> tuple[bool, str]:
    """``(True, version)`` when triton imports, else ``(False, why)``."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if _kernels_interpreted():
        return True, f"triton {triton.__version__} (interpreter, TRITON_INTERPRET=1)"
    return True, f"triton {triton.__version__}"


def supports_device(device: torch.device) -> bool:
    """CUDA whenever triton imports; CPU only through the interpreter (``TRITON_INTERPRET=1``)."""
    if device.type == "cuda":
        return _IMPORT_ERROR is None
    return device.type == "cpu" and _interpreting() and _kernels_interpreted()


def device_reason(device: torch.device) -> str:
    """Why :func:`supports_device` is False for ``device`` ("" when it is supported)."""
    if supports_device(device):
        return ""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cpu":
        return _CPU_NEEDS_INTERPRETER
    return f"runs on {DEVICE_TYPES}"


_CPU_NEEDS_INTERPRETER = (
    "triton on CPU needs its interpreter: set TRITON_INTERPRET=1 before anything imports "
    "triton (or drlora_kernels)"
)


# ---------------------------------------------------------------- dtypes


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_dtype(dtype: torch.dtype):
    # Interpreter: fp32 operands always (bf16/fp16 arithmetic there is wrong or missing).
    # GPU: the storage dtype, so fp16/bf16 dots use tensor cores with fp32 accumulation; the
    # fp32 intermediates (u, s*dY*B) are rounded to it right before the dot, as in PEFT's bf16 path.
    if _interpreting():
        return tl.float64 if dtype == torch.float64 else tl.float32
    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]


def _dot_constexprs(dtype: torch.dtype) -> dict:
    return {
        "DOT_DTYPE": _dot_dtype(dtype),
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        # only fp32 has a choice; fp16/bf16 run tensor cores, fp64 plain fp64 FMAs
        "DOT_PRECISION": "tf32" if dtype == torch.float32 and tc.allow_tf32() else "ieee",
    }


def _block_e(E: int) -> int:
    return max(2, triton.next_power_of_2(E))


# ---------------------------------------------------------------- launches


@dataclass
class Launch:
    """One kernel launch before its tile config is chosen (what the compile gate records).

    ``site`` names the config table (``triton_configs.CONFIGS``; ``"weight_grad_reduce"`` has a
    single fixed config), ``configs`` the candidates (default first), ``grid`` maps a config to
    the launch grid, ``key`` is the autotune key, ``pool`` the rank-pool size R the candidates'
    rank blocks were fitted to.
    """

    site: str
    kernel: object
    grid: Callable[[tc.TileConfig], tuple[int, ...]]
    args: tuple
    constexprs: dict
    configs: list[tc.TileConfig]
    key: tuple
    pool: int = 0

    def run(self, cfg: tc.TileConfig) -> None:
        self.kernel[self.grid(cfg)](
            *self.args,
            **self.constexprs,
            **cfg.kwargs,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


_TUNER = tc.Tuner()
_capture: list[Launch] | None = None
_capture_smem: int | None = None


@contextlib.contextmanager
def capture_launches(smem_limit: int) -> Iterator[list[Launch]]:
    """Record the launches of the primitives instead of running them (``tools/gate_triton.py``).

    Inside, the primitives accept ``meta`` tensors and choose candidates for a device with
    ``smem_limit`` bytes of shared memory per block; the yielded list fills with :class:`Launch`
    records (kernel, constexprs, argument values, every selectable config)."""
    global _capture, _capture_smem
    if _capture is not None:
        raise RuntimeError("capture_launches() does not nest")
    _capture, _capture_smem = [], smem_limit
    try:
        yield _capture
    finally:
        _capture, _capture_smem = None, None


@functools.cache
def _device_smem(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _candidates(site: str, dtype: torch.dtype, R: int, device: torch.device) -> list:
    if _capture is None and _interpreting():
        return [tc.INTERP_CONFIGS[site]]
    limit = _capture_smem if _capture is not None else _device_smem(device.index or 0)
    return tc.candidates(site, tc.precision(dtype), R, limit)


def _reduce_config() -> tc.TileConfig:
    return tc.INTERP_REDUCE_CONFIG if (_capture is None and _interpreting()) else tc.REDUCE_CONFIG


def _launch(launch: Launch) -> None:
    if _capture is not None:
        _capture.append(launch)
        return

    def bench(cfg: tc.TileConfig) -> float:
        return triton.testing.do_bench(lambda: launch.run(cfg), warmup=5, rep=25)

    launch.run(_TUNER.choose(launch.key, launch.configs, bench))


def _layout(*tensors: torch.Tensor) -> tuple:
    # part of the autotune key: which strides are 1 (the forward and backward uses differ)
    return tuple(s == 1 for t in tensors for s in t.stride())


def _launch_shrink(inp, l_ern, out, ranks, offsets, scale) -> None:
    # out[m, :r_e] = c_e * inp[m] @ L[e, :r_e].T, L given as an [E, R, K] view (any strides)
    T, K = inp.shape
    E, R = ranks.shape[0], out.shape[1]

    def grid(cfg):
        return ((triton.cdiv(T, cfg["BLOCK_M"]) + E) * triton.cdiv(R, cfg["BLOCK_R"]),)

    has_scale = scale is not None
    _launch(Launch(
        "shrink", _grouped_lora_shrink_kernel, grid,
        (inp, inp.stride(0), inp.stride(1),
         l_ern, *l_ern.stride(),
         out, out.stride(0), out.stride(1),
         ranks, offsets, scale if has_scale else ranks,
         T, E, K, R),
        dict(HAS_SCALE=has_scale, BLOCK_E=_block_e(E), GROUP_M=tc.GROUP_M,
             **_dot_constexprs(inp.dtype)),
        _candidates("shrink", inp.dtype, R, inp.device),
        ("shrink", tc.precision(inp.dtype), tc.t_bucket(T), E, K, R, has_scale,
         _layout(inp, l_ern)),
        R,
    ))  # fmt: skip


def _launch_base_expand(inp, w_eji, v, l_ejr, out, ranks, offsets, scale) -> None:
    # out[m, j] = inp[m] @ W[e, j, :] (if w) + c_e * v[m, :r_e] @ L[e, j, :r_e]
    T, J = out.shape
    E, R = ranks.shape[0], v.shape[1]
    has_base, has_scale = w_eji is not None, scale is not None
    I = inp.shape[1] if has_base else 0  # noqa: E741  (the contraction dim of the base GEMM)
    dtype = inp.dtype if has_base else l_ejr.dtype

    def grid(cfg):
        return ((triton.cdiv(T, cfg["BLOCK_M"]) + E) * triton.cdiv(J, cfg["BLOCK_J"]),)

    inp = inp if has_base else v  # dummies, never read without HAS_BASE
    w = w_eji if has_base else l_ejr
    _launch(Launch(
        "base_expand", _grouped_lora_base_expand_kernel, grid,
        (inp, inp.stride(0), inp.stride(1),
         w, *(w.stride() if has_base else (0, 0, 0)),
         v, v.stride(0), v.stride(1),
         l_ejr, *l_ejr.stride(),
         out, out.stride(0), out.stride(1),
         ranks, offsets, scale if has_scale else ranks,
         T, E, I, J, R),
        dict(HAS_BASE=has_base, HAS_SCALE=has_scale, BLOCK_E=_block_e(E), GROUP_M=tc.GROUP_M,
             **_dot_constexprs(dtype)),
        _candidates("base_expand", dtype, R, out.device),
        ("base_expand", tc.precision(dtype), tc.t_bucket(T), E, I, J, R, has_base, has_scale,
         _layout(inp, w, l_ejr) if has_base else _layout(l_ejr)),
        R,
    ))  # fmt: skip


_RANK_AXIS = {"weight_grad_a": 0, "weight_grad_b": 1, "weight_grad_w": -1}


def _launch_weight_grad(site, left, right, out, ranks, offsets, scale, dtype) -> None:
    # out[e] = c_e * left[rows_e].T @ right[rows_e]; pass 1 per (tile, row chunk), pass 2 reduces
    T = left.shape[0]
    E, I, J = out.shape
    rank_axis, has_scale = _RANK_AXIS[site], scale is not None
    acc = _acc_dtype(dtype)
    chunk = tc.rows_per_chunk(T, E, I * J, acc.itemsize)
    # No expert has more than `chunk` rows when T <= chunk: no partials. The empty workspace
    # keeps the dtype and strides (so the compiled specialisation) of a real one.
    slots = tc.workspace_slots(T, chunk) if T > chunk else 0
    ws = torch.empty(slots, I, J, dtype=acc, device=out.device)
    R = I if rank_axis == 0 else J

    def grid(cfg):
        tiles = triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"])
        return (tiles, triton.cdiv(T, chunk) + E)

    shared = (ranks, offsets, scale if has_scale else ranks, E, I, J, chunk)
    flags = dict(RANK_AXIS=rank_axis, HAS_SCALE=has_scale, BLOCK_E=_block_e(E))
    _launch(Launch(
        site, _grouped_weight_grad_kernel, grid,
        (left, left.stride(0), left.stride(1),
         right, right.stride(0), right.stride(1),
         out, *out.stride(),
         ws, *ws.stride(),
         *shared),
        dict(**flags, GROUP_M=tc.GROUP_M, **_dot_constexprs(dtype)),
        _candidates(site, dtype, R, out.device),
        (site, tc.precision(dtype), tc.t_bucket(T), E, I, J, _layout(left, right)),
        R,
    ))  # fmt: skip

    def reduce_grid(cfg):
        return (triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"]), E)

    _launch(Launch(
        "weight_grad_reduce", _weight_grad_reduce_kernel, reduce_grid,
        (ws, *ws.stride(), out, *out.stride(), *shared),
        dict(**flags, ACC_DTYPE=_dot_constexprs(dtype)["ACC_DTYPE"]),
        [_reduce_config()],
        ("weight_grad_reduce",),
    ))  # fmt: skip


# ---------------------------------------------------------------- the backend contract


def _check_launch(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in _SUPPORTED:
        raise TypeError(
            f"triton backend: {name} has dtype {x.dtype}, expected one of float16, bfloat16, "
            f"float32, float64"
        )
    if _capture is not None and x.device.type == "meta":
        return
    if x.device.type == "cpu" and not _kernels_interpreted():
        raise RuntimeError(_CPU_NEEDS_INTERPRETER)
    if x.device.type not in DEVICE_TYPES:
        raise RuntimeError(f"triton backend does not run on {x.device.type}")


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``u[rows_e, :r_e] = scale[e] * x[rows_e] @ lora_a[e, :r_e].T``; columns ``>= r_e`` are 0.

    Args:
        x: ``[T, K]`` expert-sorted rows (fp16/bf16/fp32/fp64).
        lora_a: ``[E, R, K]``, any strides (the backward passes ``lora_b.transpose(1, 2)``).
        ranks: ``[E]`` active ranks; offsets: ``[E+1]`` group boundaries (int32/int64, on device).
        scale: ``[E]`` fp32, or None for 1.

    Returns:
        ``u [T, R]`` in fp32 (fp64 for fp64 ``x``).

    Raises:
        TypeError: unsupported dtype. RuntimeError: CPU tensors without the interpreter.
    """
    _check_launch(x)
    T, K = x.shape
    R = lora_a.shape[1]
    if min(T, R, K) == 0:
        return torch.zeros(T, R, dtype=_acc_dtype(x.dtype), device=x.device)
    u = torch.empty(T, R, dtype=_acc_dtype(x.dtype), device=x.device)
    with _device_guard(x):
        _launch_shrink(x, lora_a, u, ranks, offsets, scale)
    return u


def base_expand(
    x: torch.Tensor | None,
    w: torch.Tensor | None,
    u: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[rows_e] = x[rows_e] @ w[e].T (if w) + scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e].T``.

    Args:
        x: ``[T, K]``, or None when ``w`` is None (LoRA only).
        w: ``[E, N, K]`` any strides, or None (the backward passes ``w.transpose(1, 2)``).
        u: ``[T, R]`` fp32 (fp64) shrink result; only ``u[rows_e, :r_e]`` is read.
        lora_b: ``[E, N, R]`` any strides (the backward passes ``lora_a.transpose(1, 2)``).
        ranks, offsets: as in :func:`shrink`. scale: ``[E]`` fp32, or None for 1.

    Returns:
        ``y [T, N]`` in ``lora_b``'s dtype (one write, no read-modify-write).

    Raises:
        ValueError: ``w`` given without ``x``. TypeError / RuntimeError: as :func:`shrink`.
    """
    if w is not None and x is None:
        raise ValueError("base_expand: x is None but w is given; the base GEMM needs x")
    _check_launch(lora_b, "lora_b")
    T, N = u.shape[0], lora_b.shape[1]
    R = lora_b.shape[2]
    has_base = w is not None and x.shape[1] > 0
    if T == 0 or N == 0 or (R == 0 and not has_base):
        return torch.zeros(T, N, dtype=lora_b.dtype, device=u.device)
    y = torch.empty(T, N, dtype=lora_b.dtype, device=u.device)
    with _device_guard(u):
        _launch_base_expand(
            x if has_base else None, w if has_base else None, u, lora_b, y, ranks, offsets, scale
        )
    return y


def weight_grad(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor | None,
    gb: torch.Tensor | None,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    need_a: bool,
    need_b: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert weight gradients (row-split for large groups, deterministic, no atomics).

    ``da[e, :r_e] = gb[rows_e, :r_e].T @ x[rows_e]``;
    ``db[e, :, :r_e] = scale[e] * grad_y[rows_e].T @ u[rows_e, :r_e]``;
    ``dw[e] = grad_y[rows_e].T @ x[rows_e]``. Inactive slots are exactly 0.

    Args:
        grad_y: ``[T, N]``; x: ``[T, K]``; u: ``[T, R]`` (needed for ``db``);
        gb: ``[T, R]`` = ``shrink(grad_y, lora_b^T, scale)`` (needed for ``da``).
        ranks, offsets, scale: as in :func:`shrink` (``scale`` applies to ``db`` only).
        need_a, need_b, need_w: which gradients to compute.

    Returns:
        ``(da [E, R, K], db [E, N, R], dw [E, N, K])`` in ``x``'s dtype; a gradient not asked
        for is a fresh empty ``[0]`` tensor.

    Raises:
        ValueError: ``gb`` missing for ``need_a`` or ``u`` missing for ``need_b``.
    """
    _check_launch(x)
    if need_a and gb is None:
        raise ValueError("weight_grad: need_a=True needs gb (= shrink(grad_y, lora_b^T, scale))")
    if need_b and u is None:
        raise ValueError("weight_grad: need_b=True needs u (the forward's shrink result)")
    T, K = x.shape
    N = grad_y.shape[1]
    E = ranks.shape[0]
    R = (gb if gb is not None else u).shape[1] if (need_a or need_b) else 0
    wanted = (
        ("weight_grad_a", need_a, (E, R, K), gb, x, None),
        ("weight_grad_b", need_b, (E, N, R), grad_y, u, scale),
        ("weight_grad_w", need_w, (E, N, K), grad_y, x, None),
    )
    outs = []
    for site, need, shape, left, right, s in wanted:
        if not need:
            outs.append(x.new_empty(0))  # fresh per output: custom-op outputs must not alias
            continue
        out = (torch.zeros if T == 0 else torch.empty)(shape, dtype=x.dtype, device=x.device)
        if T > 0 and out.numel() > 0:
            with _device_guard(x):
                _launch_weight_grad(site, left, right, out, ranks, offsets, s, x.dtype)
        outs.append(out)
    return outs[0], outs[1], outs[2]
