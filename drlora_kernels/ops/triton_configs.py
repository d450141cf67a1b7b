"""Tile configurations, autotuning, determinism and the row split of the ``triton`` backend.

One place decides which compiled variant of a Triton kernel runs:

* :data:`CONFIGS` -- per launch site and precision class, the tile configs the package may
  select; the FIRST is the default, used whenever autotuning is off (tests, the deterministic
  mode, ``DRLORA_TRITON_AUTOTUNE=0``). ``tools/gate_triton.py`` compiles every one of them for
  sm_80 and sm_90 and fails if a default spills or exceeds shared memory there, or if a config
  this module would keep (:func:`prune`) does.
* :func:`prune` -- drops configs whose estimated shared memory exceeds the device's per-block
  limit or whose accumulator would not fit in registers (the gate checks the estimate).
* :class:`Tuner` -- picks among the surviving configs by timing, once per key; the key holds
  the launch site, the precision, a power-of-two bucket of the row count ``T``, the shapes and
  the stride layout, so a new batch size class re-tunes instead of living with the first one.
* :func:`deterministic` -- ``DRLORA_DETERMINISTIC=1`` or
  ``torch.are_deterministic_algorithms_enabled()`` pins the default config: reruns and DDP
  ranks then run the same kernels with the same reduction order (bit-identical results).
* :func:`allow_tf32` -- fp32 dots follow ``torch.get_float32_matmul_precision()``.
* :func:`rows_per_chunk` -- the row split of the weight gradients (shapes only, no host sync).

Pure Python (no triton import), so the gate and the tests can read it anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: ``None``: fp32 dots follow ``torch.get_float32_matmul_precision()``; True/False forces TF32
#: on/off (the tests force IEEE so fp32 results match the fp32 oracle to ~1e-5).
ALLOW_TF32: bool | None = None

#: Row split of the weight gradients: a chunk has at least this many rows ...
ROW_SPLIT_MIN = 1024
#: ... a multiple of this (the largest BLOCK_M of the weight-gradient configs) ...
ROW_SPLIT_ALIGN = 128
#: ... and the fp32 partials of split experts take at most about this many bytes.
WORKSPACE_BUDGET = 128 << 20

#: Tile order: row tiles per group of the grouped program order (see ``kernels/tiles.py``).
GROUP_M = 8

#: Per-block shared memory opt-in limits (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the
#: targets the gate checks: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}
#: The smallest limit every site keeps a config for: 99 KiB, the sm_86/sm_89 GPUs (A10, L4,
#: RTX 3090/4090); the last config of each table is that fallback where the others exceed it.
SMALL_SMEM_LIMIT = 101376
#: A config whose fp32 accumulator needs more registers per thread than this is pruned
#: (255 is the hardware limit; operands, pipelined loads, addresses and masks need the rest:
#: the gate saw 128x256 tiles on 8 warps, 128 accumulator registers, spill on sm_80 and sm_90).
MAX_ACC_REGS = 64


@dataclass(frozen=True)
class TileConfig:
    """One compiled variant: block sizes (constexpr kernel arguments), warps, pipeline stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 3

    @property
    def kwargs(self) -> dict[str, int]:
        return dict(self.blocks)

    def __getitem__(self, name: str) -> int:
        return self.kwargs[name]

    def __str__(self) -> str:
        tiles = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in self.blocks)
        return f"{tiles} w{self.num_warps} s{self.num_stages}"


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> TileConfig:
    return TileConfig(tuple(blocks.items()), num_warps, num_stages)


# ---------------------------------------------------------------- precision classes

PRECISIONS = ("16bit", "tf32", "fp32", "fp64")


def allow_tf32() -> bool:
    """Whether fp32 dots use TF32 tensor cores: :data:`ALLOW_TF32`, else torch's global setting
    (``torch.set_float32_matmul_precision``: "high"/"medium" -> TF32, "highest" -> IEEE)."""
    if ALLOW_TF32 is not None:
        return bool(ALLOW_TF32)
    return torch.get_float32_matmul_precision() != "highest"


def precision(dtype: torch.dtype, tf32: bool | None = None) -> str:
    """The precision class of a storage dtype: its configs differ (bytes per element, dot kind)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    if dtype == torch.float32:
        return "tf32" if (allow_tf32() if tf32 is None else tf32) else "fp32"
    if dtype == torch.float64:
        return "fp64"
    raise TypeError(f"no Triton configs for dtype {dtype}")


_ELEM = {"16bit": 2, "tf32": 4, "fp32": 4, "fp64": 8}
_ACC = {"16bit": 4, "tf32": 4, "fp32": 4, "fp64": 8}

# ---------------------------------------------------------------- the configs

#: Launch sites: the kernel and the role that fixes its tile shape.
SITES = ("shrink", "base_expand", "weight_grad_a", "weight_grad_b", "weight_grad_w")

# BLOCK_R of shrink/expand and the rank-axis block of dA/dB are clamped to the pool size
# (:func:`fit_rank_block`); the tables give the maximum.
CONFIGS: dict[str, dict[str, list[TileConfig]]] = {
    "shrink": {  # u = x A^T: M rows x R ranks, contraction K
        "16bit": [
            _cfg(4, 4, BLOCK_M=64, BLOCK_R=64, BLOCK_K=64),
            _cfg(8, 3, BLOCK_M=128, BLOCK_R=64, BLOCK_K=64),
            _cfg(4, 4, BLOCK_M=64, BLOCK_R=32, BLOCK_K=128),
            _cfg(8, 4, BLOCK_M=128, BLOCK_R=64, BLOCK_K=128),
        ],
        "tf32": [
            _cfg(8, 4, BLOCK_M=64, BLOCK_R=64, BLOCK_K=32),
            _cfg(8, 3, BLOCK_M=128, BLOCK_R=64, BLOCK_K=32),
            _cfg(8, 3, BLOCK_M=64, BLOCK_R=64, BLOCK_K=64),
        ],
        "fp32": [
            _cfg(8, 3, BLOCK_M=64, BLOCK_R=32, BLOCK_K=32),
            _cfg(4, 3, BLOCK_M=32, BLOCK_R=32, BLOCK_K=32),
            _cfg(4, 3, BLOCK_M=64, BLOCK_R=32, BLOCK_K=16),
        ],
        "fp64": [_cfg(4, 2, BLOCK_M=32, BLOCK_R=32, BLOCK_K=16)],
    },
    "base_expand": {  # y = x W^T + s u B^T: M rows x J columns, contraction I (+ rank R)
        "16bit": [
            _cfg(8, 3, BLOCK_M=128, BLOCK_J=128, BLOCK_I=64, BLOCK_R=32),
            _cfg(4, 4, BLOCK_M=64, BLOCK_J=128, BLOCK_I=64, BLOCK_R=32),
            _cfg(4, 4, BLOCK_M=128, BLOCK_J=64, BLOCK_I=64, BLOCK_R=32),
            _cfg(8, 4, BLOCK_M=128, BLOCK_J=128, BLOCK_I=64, BLOCK_R=64),
            _cfg(4, 3, BLOCK_M=64, BLOCK_J=64, BLOCK_I=64, BLOCK_R=32),
        ],
        "tf32": [
            _cfg(8, 3, BLOCK_M=128, BLOCK_J=128, BLOCK_I=32, BLOCK_R=32),
            _cfg(4, 4, BLOCK_M=64, BLOCK_J=128, BLOCK_I=32, BLOCK_R=32),
            _cfg(4, 4, BLOCK_M=128, BLOCK_J=64, BLOCK_I=32, BLOCK_R=32),
            _cfg(4, 3, BLOCK_M=64, BLOCK_J=64, BLOCK_I=32, BLOCK_R=32),
        ],
        "fp32": [
            _cfg(8, 3, BLOCK_M=64, BLOCK_J=128, BLOCK_I=16, BLOCK_R=16),
            _cfg(4, 3, BLOCK_M=64, BLOCK_J=64, BLOCK_I=16, BLOCK_R=16),
        ],
        "fp64": [_cfg(4, 2, BLOCK_M=32, BLOCK_J=64, BLOCK_I=16, BLOCK_R=16)],
    },
    "weight_grad_a": {  # dA = gb^T x: I = rank rows (>= 64 for wgmma), J = K columns
        "16bit": [
            _cfg(8, 3, BLOCK_I=64, BLOCK_J=128, BLOCK_M=64),
            _cfg(4, 3, BLOCK_I=64, BLOCK_J=128, BLOCK_M=32),
            _cfg(4, 4, BLOCK_I=64, BLOCK_J=64, BLOCK_M=64),
        ],
        "tf32": [
            _cfg(4, 3, BLOCK_I=64, BLOCK_J=128, BLOCK_M=32),
            _cfg(4, 4, BLOCK_I=64, BLOCK_J=64, BLOCK_M=32),
        ],
        "fp32": [_cfg(4, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_M=32)],
        "fp64": [_cfg(4, 2, BLOCK_I=32, BLOCK_J=64, BLOCK_M=16)],
    },
    "weight_grad_b": {  # dB = s dY^T u: I = N rows, J = rank columns
        "16bit": [
            _cfg(4, 3, BLOCK_I=128, BLOCK_J=64, BLOCK_M=64),
            _cfg(4, 4, BLOCK_I=64, BLOCK_J=64, BLOCK_M=64),
            _cfg(8, 3, BLOCK_I=256, BLOCK_J=64, BLOCK_M=32),
            _cfg(4, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_M=32),
        ],
        "tf32": [
            _cfg(4, 3, BLOCK_I=128, BLOCK_J=64, BLOCK_M=32),
            _cfg(4, 4, BLOCK_I=64, BLOCK_J=64, BLOCK_M=32),
        ],
        "fp32": [_cfg(4, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_M=32)],
        "fp64": [_cfg(4, 2, BLOCK_I=64, BLOCK_J=32, BLOCK_M=16)],
    },
    "weight_grad_w": {  # dW = dY^T x: I = N rows, J = K columns
        "16bit": [
            _cfg(8, 3, BLOCK_I=128, BLOCK_J=128, BLOCK_M=64),
            _cfg(8, 4, BLOCK_I=128, BLOCK_J=128, BLOCK_M=32),
            _cfg(4, 4, BLOCK_I=64, BLOCK_J=128, BLOCK_M=64),
            _cfg(4, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_M=32),
        ],
        "tf32": [
            _cfg(8, 3, BLOCK_I=128, BLOCK_J=128, BLOCK_M=32),
            _cfg(4, 4, BLOCK_I=64, BLOCK_J=128, BLOCK_M=32),
            _cfg(4, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_M=32),
        ],
        "fp32": [_cfg(4, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_M=32)],
        "fp64": [_cfg(4, 2, BLOCK_I=32, BLOCK_J=64, BLOCK_M=16)],
    },
}

#: The fixed order-of-chunks reduction of split weight gradients: elementwise, no tuning.
REDUCE_CONFIG = _cfg(4, 1, BLOCK_I=32, BLOCK_J=128)

#: Under TRITON_INTERPRET=1 (CPU tests): few large programs are fast there, every block dim
#: must be >= 16 (tl.dot's minimum), and small rank blocks exercise multi-block ranks.
INTERP_CONFIGS: dict[str, TileConfig] = {
    "shrink": _cfg(4, 1, BLOCK_M=32, BLOCK_R=16, BLOCK_K=64),
    "base_expand": _cfg(4, 1, BLOCK_M=32, BLOCK_J=64, BLOCK_I=64, BLOCK_R=16),
    "weight_grad_a": _cfg(4, 1, BLOCK_I=16, BLOCK_J=128, BLOCK_M=32),
    "weight_grad_b": _cfg(4, 1, BLOCK_I=128, BLOCK_J=16, BLOCK_M=32),
    "weight_grad_w": _cfg(4, 1, BLOCK_I=64, BLOCK_J=128, BLOCK_M=32),
}
INTERP_REDUCE_CONFIG = _cfg(4, 1, BLOCK_I=64, BLOCK_J=128)

#: For each site: the name of its rank block (None: no rank axis), its pipelined loops as the
#: two dot-operand tiles each ((rows, cols) block names, True for an fp32/fp64 intermediate such
#: as u or gb that is loaded in the accumulator dtype), and its output tile with True when it is
#: stored in the accumulator dtype (u, gb; the fp32 partials of the split weight gradients).
_SHAPES = {
    "shrink": ("BLOCK_R", [[("BLOCK_M", "BLOCK_K", False), ("BLOCK_K", "BLOCK_R", False)]],
               ("BLOCK_M", "BLOCK_R", True)),
    "base_expand": ("BLOCK_R", [[("BLOCK_M", "BLOCK_I", False), ("BLOCK_I", "BLOCK_J", False)],
                                [("BLOCK_M", "BLOCK_R", True), ("BLOCK_R", "BLOCK_J", False)]],
                    ("BLOCK_M", "BLOCK_J", False)),
    "weight_grad_a": ("BLOCK_I", [[("BLOCK_I", "BLOCK_M", True), ("BLOCK_M", "BLOCK_J", False)]],
                      ("BLOCK_I", "BLOCK_J", True)),
    "weight_grad_b": ("BLOCK_J", [[("BLOCK_I", "BLOCK_M", False), ("BLOCK_M", "BLOCK_J", True)]],
                      ("BLOCK_I", "BLOCK_J", True)),
    "weight_grad_w": (None, [[("BLOCK_I", "BLOCK_M", False), ("BLOCK_M", "BLOCK_J", False)]],
                      ("BLOCK_I", "BLOCK_J", True)),
}  # fmt: skip


def fit_rank_block(site: str, cfg: TileConfig, R: int) -> TileConfig:
    """``cfg`` with its rank block clamped to the pool (``max(16, next_pow2(R))``): a pool of 16
    slots should not run a 64-wide rank tile of mostly masked lanes."""
    name = _SHAPES[site][0]
    if name is None:
        return cfg
    cap = max(16, 1 << max(0, (R - 1).bit_length()))
    blocks = tuple((k, min(v, cap) if k == name else v) for k, v in cfg.blocks)
    return TileConfig(blocks, cfg.num_warps, cfg.num_stages)


def smem_estimate(site: str, cfg: TileConfig, prec: str) -> int:
    """Bytes of shared memory: ``num_stages`` buffers of the operand tiles of the largest
    pipelined loop (loops do not overlap, their buffers are reused) plus the output tile, which
    the store may stage through shared memory. An upper bound of what Triton allocates (it uses
    ``num_stages - 1`` buffers on sm_80); the gate checks it against the compiler."""
    b = cfg.kwargs

    def tile(rows: str, cols: str, wide: bool) -> int:
        return b[rows] * b[cols] * (_ACC if wide else _ELEM)[prec]

    loops = _SHAPES[site][1]
    return cfg.num_stages * max(sum(tile(*t) for t in loop) for loop in loops) + tile(
        *_SHAPES[site][2]
    )


def acc_regs_estimate(site: str, cfg: TileConfig, prec: str) -> int:
    """32-bit registers per thread for the accumulator tile (plus, for the non-tensor-core
    fp32/fp64 dots, the operand tiles that are held in registers)."""
    b = cfg.kwargs
    rows, cols, _ = _SHAPES[site][2]
    words = b[rows] * b[cols] * _ACC[prec] // 4
    if prec in ("fp32", "fp64"):  # FMA dots keep both operand slices in registers
        words += max(
            sum(b[r] * b[c] * _ELEM[prec] // 4 for r, c, _ in loop) for loop in _SHAPES[site][1]
        )
    return words // (32 * cfg.num_warps)


def prune(site: str, configs: Sequence[TileConfig], prec: str, smem_limit: int) -> list[TileConfig]:
    """The configs that fit: estimated shared memory within ``smem_limit`` and an accumulator
    within :data:`MAX_ACC_REGS` registers per thread. Order (and so the default) is kept."""
    return [
        c
        for c in configs
        if smem_estimate(site, c, prec) <= smem_limit
        and acc_regs_estimate(site, c, prec) <= MAX_ACC_REGS
    ]


def candidates(site: str, prec: str, R: int, smem_limit: int) -> list[TileConfig]:
    """Every config the package can select for ``site`` at this precision, pool size and
    shared-memory limit, default first. Raises if none fits (a device this small is not
    supported: the message names the limit)."""
    kept = prune(site, [fit_rank_block(site, c, R) for c in CONFIGS[site][prec]], prec, smem_limit)
    if not kept:
        raise RuntimeError(
            f"triton backend: no {site} config for {prec} fits in {smem_limit} bytes of shared "
            f"memory per block; use backend='reference' on this device"
        )
    return list(dict.fromkeys(kept))  # clamping may make two configs equal


# ---------------------------------------------------------------- determinism and autotuning


def deterministic() -> bool:
    """True when results must be bit-reproducible across runs and DDP ranks:
    ``DRLORA_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``."""
    return os.environ.get("DRLORA_DETERMINISTIC", "0") == "1" or (
        torch.are_deterministic_algorithms_enabled()
    )


def autotune_enabled() -> bool:
    """Autotuning runs unless ``DRLORA_TRITON_AUTOTUNE=0`` or the deterministic mode is on."""
    return os.environ.get("DRLORA_TRITON_AUTOTUNE", "1") != "0" and not deterministic()


def t_bucket(T: int) -> int:
    """The row-count class of the autotune key: the next power of two (at least 16)."""
    return max(16, 1 << max(0, (T - 1).bit_length()))


class Tuner:
    """Picks a config per key: the default when autotuning is off, else the fastest, once.

    ``bench(cfg)`` returns a time in ms (``triton.testing.do_bench`` on the real launch).
    A config that fails to launch (e.g. ``OutOfResources``) is skipped. Ties keep table order.
    """

    def __init__(self) -> None:
        self.cache: dict[tuple, TileConfig] = {}

    def choose(
        self, key: tuple, configs: Sequence[TileConfig], bench: Callable[[TileConfig], float]
    ) -> TileConfig:
        if not autotune_enabled() or len(configs) == 1:
            return configs[0]
        if key not in self.cache:
            timings = []
            for cfg in configs:
                try:
                    timings.append((bench(cfg), len(timings), cfg))
                except Exception as exc:  # noqa: BLE001 -- triton raises several resource errors
                    if "OutOfResources" not in type(exc).__name__ and "resources" not in str(exc):
                        raise
            if not timings:
                raise RuntimeError(f"triton backend: no config of {key[0]} could be launched")
            self.cache[key] = min(timings)[2]
        return self.cache[key]


# ---------------------------------------------------------------- the weight-gradient row split


def rows_per_chunk(T: int, E: int, out_elems_per_expert: int, acc_bytes: int) -> int:
    """Rows per chunk of the weight-gradient split (from shapes only: no host sync).

    Experts with more rows than this are cut into chunks whose fp32 partial tiles are summed
    in a fixed order. At least twice the mean group (so at most ``E`` partials), at least
    :data:`ROW_SPLIT_MIN` rows, and large enough that the partials fit
    :data:`WORKSPACE_BUDGET`; a multiple of :data:`ROW_SPLIT_ALIGN`.
    """
    budget_rows = -(-2 * T * out_elems_per_expert * acc_bytes // WORKSPACE_BUDGET)
    rows = max(ROW_SPLIT_MIN, -(-2 * T // max(E, 1)), budget_rows)
    return -(-rows // ROW_SPLIT_ALIGN) * ROW_SPLIT_ALIGN


def workspace_slots(T: int, chunk: int) -> int:
    """Upper bound on the partial tiles of split experts: an expert with ``n > chunk`` rows has
    ``ceil(n / chunk) < 2 n / chunk`` chunks, so all of them together fewer than ``2 T / chunk``."""
    return max(1, 2 * T // chunk)
