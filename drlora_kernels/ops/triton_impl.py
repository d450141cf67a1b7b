"""The ``triton`` backend: grouped variable-rank LoRA as Triton kernels (launchers only).

Kernels live in :mod:`drlora_kernels.kernels`; this module picks block sizes, builds
device-side grids and wires the kernels into the backend contract of
:mod:`drlora_kernels.ops.reference` (same functions, same signatures). Three kernels
cover every op through strides:

* shrink       ``u = x A^T`` (fp32) and, in the backward, ``gb = s dY B``;
* base+expand  ``y = x W^T + s u B^T`` (one write of ``y``), the LoRA-only expand, and
  ``dX = dY W + gb A``;
* weight grad  ``dA = gb^T x``, ``dB = s dY^T u``, ``dW = dY^T x``, one program per
  (expert, output tile), no atomics, with the importance sums ``|A*dA|``/``|B*dB|`` as an epilogue.

Grids depend only on shapes (``cdiv(T, BLOCK_M) + E`` row tiles), never on ``offsets`` or
``ranks`` values, so launches do no host sync and can be captured in CUDA graphs.

On CPU the kernels run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` before triton is first imported. Interpreter workarounds live in
one place, :func:`_dot_dtype` and the ``_INTERP_*`` block sizes: operands are converted to
fp32 before every dot (the interpreter gets bf16 arithmetic wrong), one config (no
autotune), every block dimension >= 16 (``tl.dot``'s minimum there).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl

    from ..kernels.expand import _grouped_lora_base_expand_kernel
    from ..kernels.shrink import _grouped_lora_shrink_kernel
    from ..kernels.weight_grad import _grouped_weight_grad_kernel

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton missing: the backend reports itself unavailable
    triton = tl = None
    _IMPORT_ERROR = f"triton is not importable: {exc}"

NAME = "triton"
DEVICE_TYPES = ("cpu", "cuda")
#: fp64 inputs run with fp64 accumulation (u and gradients in fp64; importance in fp32).
SUPPORTS_FP64 = True

#: ``tl.dot`` input precision for fp32 operands. ``None`` follows
#: ``torch.get_float32_matmul_precision()`` ("highest" -> IEEE fp32, else TF32). Tests set False.
ALLOW_TF32: bool | None = None

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
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if _kernels_interpreted():
        return True, f"triton {triton.__version__} (interpreter, TRITON_INTERPRET=1)"
    return True, f"triton {triton.__version__}"


def supports_device(device: torch.device) -> bool:
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


# ---------------------------------------------------------------- configuration


def _autotuning() -> bool:
    return not _interpreting() and os.environ.get("DRLORA_TRITON_AUTOTUNE", "1") != "0"


def _allow_tf32() -> bool:
    if ALLOW_TF32 is not None:
        return bool(ALLOW_TF32)
    return torch.get_float32_matmul_precision() != "highest"


_TL_DTYPES: dict[torch.dtype, object] = {}
if tl is not None:
    _TL_DTYPES = {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_dtype(dtype: torch.dtype):
    # Interpreter: fp32 operands always (bf16/fp16 arithmetic there is wrong or missing).
    # GPU: the storage dtype, so fp16/bf16 dots use tensor cores with fp32 accumulation; the
    # fp32 intermediates (u, s*dY*B) are rounded to it right before the dot, as in PEFT's bf16 path.
    if _interpreting():
        return tl.float64 if dtype == torch.float64 else tl.float32
    return _TL_DTYPES[dtype]


def _cfg(num_warps: int = 4, num_stages: int = 3, **blocks: int):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


class _Launcher:
    """One kernel with its GPU configs (first = default), autotuned unless disabled.

    Under the interpreter it runs ``interp`` (large blocks: few programs, each block dim >= 16);
    with ``DRLORA_TRITON_AUTOTUNE=0`` it runs the first GPU config; otherwise
    ``triton.autotune`` picks among the configs per ``key``.
    """

    def __init__(self, kernel, configs: list, key: list[str], interp: dict[str, int]):
        self.kernel, self.configs, self.key, self.interp = kernel, configs, key, interp
        self._tuned = None

    def __call__(self, grid: Callable[[dict], tuple], *args, **kwargs) -> None:
        if _interpreting():
            self.kernel[grid(self.interp)](*args, **kwargs, **self.interp)
        elif not _autotuning():
            cfg = self.configs[0]
            self.kernel[grid(cfg.kwargs)](
                *args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
            )
        else:
            if self._tuned is None:
                self._tuned = triton.autotune(configs=self.configs, key=self.key)(self.kernel)
            self._tuned[grid](*args, **kwargs)


if _IMPORT_ERROR is None:
    _SHRINK = _Launcher(
        _grouped_lora_shrink_kernel,
        [
            _cfg(BLOCK_M=64, BLOCK_R=16, BLOCK_K=128, num_warps=4, num_stages=4),
            _cfg(BLOCK_M=128, BLOCK_R=16, BLOCK_K=64, num_warps=4, num_stages=4),
            _cfg(BLOCK_M=64, BLOCK_R=32, BLOCK_K=64, num_warps=4, num_stages=4),
            _cfg(BLOCK_M=128, BLOCK_R=32, BLOCK_K=128, num_warps=8, num_stages=3),
        ],
        key=["K", "R"],
        interp={"BLOCK_M": 32, "BLOCK_R": 16, "BLOCK_K": 64},
    )
    _BASE_EXPAND = _Launcher(
        _grouped_lora_base_expand_kernel,
        [
            _cfg(BLOCK_M=128, BLOCK_J=128, BLOCK_I=64, BLOCK_R=16, num_warps=8, num_stages=3),
            _cfg(BLOCK_M=64, BLOCK_J=128, BLOCK_I=64, BLOCK_R=16, num_warps=4, num_stages=4),
            _cfg(BLOCK_M=128, BLOCK_J=64, BLOCK_I=64, BLOCK_R=32, num_warps=4, num_stages=4),
            _cfg(BLOCK_M=128, BLOCK_J=256, BLOCK_I=64, BLOCK_R=16, num_warps=8, num_stages=3),
        ],
        key=["I", "J", "HAS_BASE"],
        interp={"BLOCK_M": 32, "BLOCK_J": 64, "BLOCK_I": 64, "BLOCK_R": 16},
    )
    # The output tile (BLOCK_I x BLOCK_J) is fixed by the launcher per gradient, because the
    # importance partials are laid out per tile; only the row chunk and pipelining are tuned.
    _WEIGHT_GRAD = _Launcher(
        _grouped_weight_grad_kernel,
        [
            _cfg(BLOCK_M=64, num_warps=4, num_stages=4),
            _cfg(BLOCK_M=32, num_warps=4, num_stages=5),
            _cfg(BLOCK_M=128, num_warps=8, num_stages=3),
        ],
        key=["I", "J", "RANK_AXIS"],
        interp={"BLOCK_M": 32},
    )


def _tiles(rank_axis: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_J) of the weight-gradient output tile: narrow on the rank axis."""
    rank_block, wide = 16, (64 if _interpreting() else 128)
    return {0: (rank_block, wide), 1: (wide, rank_block)}.get(rank_axis, (wide, wide))


def _block_e(E: int) -> int:
    return max(2, triton.next_power_of_2(E))


# ---------------------------------------------------------------- launch helpers


def _check_launch(x: torch.Tensor) -> None:
    if x.dtype not in _SUPPORTED:
        raise TypeError(
            f"triton backend: x has dtype {x.dtype}, expected one of float16, bfloat16, float32, float64"
        )
    if x.device.type == "cpu" and not _kernels_interpreted():
        raise RuntimeError(_CPU_NEEDS_INTERPRETER)
    if x.device.type not in DEVICE_TYPES:
        raise RuntimeError(f"triton backend does not run on {x.device.type}")


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _common(dtype: torch.dtype) -> dict:
    return {
        "DOT_DTYPE": _dot_dtype(dtype),
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        "ALLOW_TF32": _allow_tf32()
        and dtype == torch.float32,  # TF32 only means something for fp32
    }


# Row tiles sit on grid axis 1 (CUDA limit 65535), so T <= ~4.2M rows at the smallest GPU BLOCK_M.
_MAX_ROW_TILES = 65535
_MIN_BLOCK_M = 64


def _check_rows(T: int, E: int, name: str) -> None:
    if not _interpreting() and triton.cdiv(T, _MIN_BLOCK_M) + E > _MAX_ROW_TILES:
        raise ValueError(
            f"{name} has {T} rows: the triton backend schedules at most "
            f"{(_MAX_ROW_TILES - E) * _MIN_BLOCK_M} rows per call; split the batch"
        )


def _launch_shrink(inp, l, l_strides, out, ranks, offsets, scale, has_scale, dtype) -> None:
    # out[m, :r_e] = c_e * inp[m] @ L[e, :r_e].T, where L[e, r, k] = l.flat[e*s0 + r*s1 + k*s2]
    T, K = inp.shape
    E, R = ranks.shape[0], out.shape[1]
    _check_rows(T, E, "x")

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(T, meta["BLOCK_M"]) + E)

    _SHRINK(
        grid,
        inp, inp.stride(0), inp.stride(1),
        l, *l_strides,
        out, out.stride(0), out.stride(1),
        ranks, offsets, scale,
        E, K, R,
        HAS_SCALE=has_scale, BLOCK_E=_block_e(E), **_common(dtype),
    )  # fmt: skip


def _launch_base_expand(
    inp, w, w_strides, v, l, l_strides, out, ranks, offsets, scale, has_scale, dtype
):
    # out[m, j] = inp[m] @ W[e, j, :] (if w) + c_e * v[m, :r_e] @ L[e, j, :r_e]
    T, J = out.shape
    E = ranks.shape[0]
    _check_rows(T, E, "x")
    has_base = w is not None
    I = inp.shape[1] if has_base else 0  # noqa: E741  (the contraction dim of the base GEMM)

    def grid(meta):
        return (triton.cdiv(J, meta["BLOCK_J"]), triton.cdiv(T, meta["BLOCK_M"]) + E)

    inp = inp if has_base else v  # never read without HAS_BASE
    w = w if has_base else l
    _BASE_EXPAND(
        grid,
        inp, inp.stride(0), inp.stride(1),
        w, *(w_strides if has_base else (0, 0, 0)),
        v, v.stride(0), v.stride(1),
        l, *l_strides,
        out, out.stride(0), out.stride(1),
        ranks, offsets, scale,
        E, I, J,
        HAS_BASE=has_base, HAS_SCALE=has_scale, BLOCK_E=_block_e(E), **_common(dtype),
    )  # fmt: skip


def _launch_weight_grad(left, right, out, shape, ranks, offsets, scale, *, rank_axis, has_scale, dtype,
                        param=None):  # fmt: skip
    # out[e] = c_e * left[rows_e].T @ right[rows_e] (not stored if out is None: importance only);
    # returns the importance [E, R] when param is given.
    E, I, J = shape
    BLOCK_I, BLOCK_J = _tiles(rank_axis)
    imp_part = None
    if param is not None:
        n_part = triton.cdiv(J, BLOCK_J) if rank_axis == 0 else triton.cdiv(I, BLOCK_I)
        R = I if rank_axis == 0 else J
        # every (expert, slot, tile) entry is written by the kernel: no zero-fill needed
        imp_part = torch.empty(E, R, n_part, dtype=_acc_dtype(dtype), device=left.device)

    def grid(meta):
        n_i, n_j = triton.cdiv(I, BLOCK_I), triton.cdiv(J, BLOCK_J)
        return (n_j, n_i, E) if rank_axis == 1 else (n_i, n_j, E)

    o = out if out is not None else left  # dummies are never dereferenced (constexpr flags)
    p = param if param is not None else o
    ip = imp_part if imp_part is not None else o
    _WEIGHT_GRAD(
        grid,
        left, left.stride(0), left.stride(1),
        right, right.stride(0), right.stride(1),
        o, *(o.stride() if out is not None else (0, 0, 0)),
        p, p.stride(0), p.stride(1), p.stride(2),
        ip, ip.stride(0), ip.stride(1), ip.stride(2),
        ranks, offsets, scale,
        I, J,
        RANK_AXIS=rank_axis, HAS_SCALE=has_scale, WITH_IMP=param is not None, STORE_OUT=out is not None,
        BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, **_common(dtype),
    )  # fmt: skip
    # deterministic: a fixed-order sum over a handful of per-tile partials
    return None if imp_part is None else imp_part.sum(dim=2).to(torch.float32)


# ---------------------------------------------------------------- the backend contract


def shrink(
    x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    _check_launch(x)
    T, K = x.shape
    R = lora_a.shape[1]
    if T == 0 or R == 0 or K == 0:
        return torch.zeros(T, R, dtype=_acc_dtype(x.dtype), device=x.device)
    u = torch.empty(T, R, dtype=_acc_dtype(x.dtype), device=x.device)
    with _device_guard(x):
        _launch_shrink(x, lora_a, lora_a.stride(), u, ranks, offsets, ranks, False, x.dtype)
    return u


def expand(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    _check_launch(lora_b)
    T, (N, R) = u.shape[0], lora_b.shape[1:]
    if T == 0 or N == 0 or R == 0:
        return torch.zeros(T, N, dtype=lora_b.dtype, device=u.device)
    y = torch.empty(T, N, dtype=lora_b.dtype, device=u.device)
    with _device_guard(u):
        _launch_base_expand(
            None,
            None,
            None,
            u,
            lora_b,
            lora_b.stride(),
            y,
            ranks,
            offsets,
            scale,
            True,
            lora_b.dtype,
        )
    return y


def forward(
    x: torch.Tensor,
    w: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_launch(x)
    T, N, R = x.shape[0], lora_b.shape[1], lora_a.shape[1]
    u = shrink(x, lora_a, ranks, offsets)
    if T == 0 or N == 0:
        return torch.zeros(T, N, dtype=x.dtype, device=x.device), u
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    v = u if R > 0 else torch.zeros(T, 1, dtype=u.dtype, device=x.device)  # never read when R == 0
    b = lora_b if R > 0 else torch.zeros(1, 1, 1, dtype=x.dtype, device=x.device)
    with _device_guard(x):
        _launch_base_expand(
            x,
            w,
            None if w is None else w.stride(),
            v,
            b,
            b.stride(),
            y,
            ranks,
            offsets,
            scale,
            True,
            x.dtype,
        )
    return y, u


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    need_x: bool,
    need_w: bool,
    need_a: bool,
    need_b: bool,
    with_importance: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_launch(x)
    T, K = x.shape
    E, R, _ = lora_a.shape
    N = lora_b.shape[1]
    dtype, dev = x.dtype, x.device
    want_w = need_w and w is not None
    want_a, want_b = need_a or with_importance, need_b or with_importance

    def empty() -> torch.Tensor:  # a fresh [0] tensor per unused output: outputs must not alias
        return x.new_empty(0)

    if min(T, K, N, R) == 0:  # nothing to contract: every gradient is zero
        return _zero_grads(x, w, lora_a, lora_b, need_x, want_w, need_a, need_b, with_importance)

    dx = torch.empty(T, K, dtype=dtype, device=dev) if need_x else empty()
    dw = torch.empty(w.shape, dtype=w.dtype, device=dev) if want_w else empty()
    da = torch.empty(lora_a.shape, dtype=dtype, device=dev) if need_a else empty()
    db = torch.empty(lora_b.shape, dtype=dtype, device=dev) if need_b else empty()
    imp_a, imp_b = empty(), empty()
    with _device_guard(x):
        if need_x or want_a:
            # gb[m, :r_e] = s_e * dY[m] @ B[e, :, :r_e]: B read as [E, R, N] through its strides
            gb = torch.empty(T, R, dtype=_acc_dtype(dtype), device=dev)
            b_ern = (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1))
            _launch_shrink(grad_y, lora_b, b_ern, gb, ranks, offsets, scale, True, dtype)
        if need_x:
            # dX = dY W_e + gb A_e: W read as [E, K, N], A as [E, K, R]
            w_ekn = None if w is None else (w.stride(0), w.stride(2), w.stride(1))
            a_ekr = (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1))
            _launch_base_expand(
                grad_y, w, w_ekn, gb, lora_a, a_ekr, dx, ranks, offsets, scale, False, dtype
            )
        if want_w:
            _launch_weight_grad(
                grad_y,
                x,
                dw,
                dw.shape,
                ranks,
                offsets,
                scale,
                rank_axis=-1,
                has_scale=False,
                dtype=dtype,
            )
        if want_a:
            imp = _launch_weight_grad(
                gb, x, da if need_a else None, (E, R, K), ranks, offsets, scale, rank_axis=0,
                has_scale=False, dtype=dtype, param=lora_a if with_importance else None,
            )  # fmt: skip
            if with_importance:
                imp_a = imp
        if want_b:
            imp = _launch_weight_grad(
                grad_y, u, db if need_b else None, (E, N, R), ranks, offsets, scale, rank_axis=1,
                has_scale=True, dtype=dtype, param=lora_b if with_importance else None,
            )  # fmt: skip
            if with_importance:
                imp_b = imp
    return dx, dw, da, db, imp_a, imp_b


def _zero_grads(x, w, lora_a, lora_b, need_x, want_w, need_a, need_b, with_importance):
    E, R = lora_a.shape[:2]

    def z(shape=(0,), dtype=x.dtype):
        return torch.zeros(shape, dtype=dtype, device=x.device)

    imp = (z((E, R), torch.float32), z((E, R), torch.float32)) if with_importance else (z(), z())
    return (
        z(x.shape) if need_x else z(),
        z(w.shape) if want_w else z(),
        z(lora_a.shape) if need_a else z(),
        z(lora_b.shape) if need_b else z(),
        *imp,
    )
