"""Shared LayerNorm pieces for ``add_layernorm`` and ``embeddings_layernorm``: the per-tile
forward / backward math as ``@triton.jit`` helpers, and the one function that picks block size,
rows per program and warps by hidden size.

Both ops normalise a tile of ``ROWS`` rows x ``BLOCK_N`` columns held in registers:

* forward: two-pass statistics in fp32 over the row in registers (mean, then the mean of the
  squared deviations; never E[z^2] - E[z]^2), ``y = (z - mean) * rstd * w + b``.
* backward: with ``xhat = (z - mean) * rstd`` and ``g = dy * w``,
  ``dz = rstd * (g - mean(g) - xhat * mean(g * xhat))``; ``dw = sum_rows dy * xhat`` and
  ``db = sum_rows dy`` are accumulated per program in fp32 registers, written as one partial
  row per program and reduced on the host with a deterministic ``sum(0)`` (no atomics).

The backward recomputes ``z`` from the op's inputs (x + x_bias + residual, or the three gathered
embedding rows) instead of saving it: the inputs are alive anyway (autograd keeps them), so
recomputing costs the same HBM traffic as writing ``z`` in the forward and reading it back, and
saves one (M, N) activation per LayerNorm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bertfast.kernels._common import HAS_TRITON, INTERPRET, launch_device

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - machines without triton only run the references

    class _Stub:
        """Lets the kernel definitions below be parsed (never launched) without triton."""

        constexpr = object()

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

# Largest supported hidden size: one row (fp32) lives in registers, 16 values per thread at
# 16 warps.  Above this a row would need a looped (non register-resident) kernel.
MAX_HIDDEN = 8192
MIN_BLOCK_N = 128
BLOCK_SIZES = tuple(1 << i for i in range(7, 14))  # 128 .. 8192

# Elements of one tile that a program normalises at once (ROWS * BLOCK_N) for small rows.
_TILE_ELEMS = 2048
# Largest BLOCK_N whose backward also keeps a d(x_bias) accumulator in registers.
_MAX_BLOCK_N_DXB = 4096


@dataclass(frozen=True)
class LNConfig:
    block_n: int  # power of two >= N, masked
    rows: int  # rows per program (per loop iteration in the backward)
    num_warps: int  # forward
    bwd_num_warps: int  # backward
    bwd_sums_dxb: bool  # backward accumulates d(x_bias) in registers (else: a host sum of dx)

    @property
    def label(self) -> str:
        return f"BN={self.block_n} R={self.rows}"


def ln_config(n: int, op: str = "layernorm") -> LNConfig:
    """The single, deterministic choice of tile shape and warps for hidden size ``n``.

    Chosen for H100 first; the same table is used on A100 (both are memory-bound here, with
    64K registers and 2048 threads per SM), and every entry compiles spill-free on both.

    * ``BLOCK_N`` = next power of two >= n (min 128), masked.
    * Rows per program so that a tile holds ~2048 elements: 16 rows at 128, 8 at 256, 4 at 512
      (hidden 384), 2 at 1024 (hidden 768 / 1024), 1 from 2048.  A 384-wide fp16 row is only 768
      bytes; four of them per program keep enough loads in flight per SM.
    * ``num_warps`` = 4 up to a 2048-element tile (16 fp32 values per thread and tensor: two
      16-byte fp16 loads), 8 for 2048 and 4096, 16 for 8192, so that a thread holds 8-16 values
      per tensor.  The backward holds ~3x more live values (x, dy, xhat plus the dW / dB
      accumulators); at 8192 it uses 32 warps (8 values per thread; 64 registers is then the
      cap) and leaves d(x_bias) to a host ``dx.sum(0)`` (its accumulator would spill on sm_80).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{op}: hidden size must be a positive int, got {n!r}")
    if n > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {n} is larger than the supported maximum {MAX_HIDDEN}")
    block_n = max(MIN_BLOCK_N, 1 << (n - 1).bit_length())
    rows = max(1, _TILE_ELEMS // block_n)
    num_warps = 4 if block_n <= 1024 else (8 if block_n <= 4096 else 16)
    bwd_num_warps = num_warps if block_n <= 4096 else 32
    return LNConfig(block_n, rows, num_warps, bwd_num_warps, block_n <= _MAX_BLOCK_N_DXB)


def all_ln_configs() -> list[LNConfig]:
    """Every configuration ``ln_config`` can return (one per BLOCK_N bucket)."""
    return [ln_config(b) for b in BLOCK_SIZES]


_SM_COUNT: dict[int, int] = {}


def bwd_num_programs(num_tiles: int, cfg: LNConfig, device: torch.device) -> int:
    """Programs of a backward launch: persistent, each loops over tiles ``pid, pid + G, ...`` and
    writes one partial dW/dB row.  ``G = SMs * max(1, 8 // bwd_num_warps)`` (capped by the tiles):
    that many programs are always co-resident whatever the register count (<= 255 registers x 256
    threads, or 64 x 1024, per SM fits the 64K register file), so the grid is one wave and every program
    gets the same share of tiles (no tail); the partial buffers stay small (<= 2 rows per SM).
    The interpreter pretends to have 2 SMs, so that programs loop over several tiles in tests."""
    if device.type == "cuda" and not INTERPRET:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        sms = _SM_COUNT[idx]
    else:
        sms = 2
    return max(1, min(num_tiles, sms * max(1, 8 // cfg.bwd_num_warps)))


def device_ctx(device: torch.device):
    """Launch on the tensors' device (not the current one): ``bertfast.kernels._common.launch_device``."""
    return launch_device(device)


def triton_ptr_type(dtype: torch.dtype) -> str:
    return {
        torch.float32: "*fp32",
        torch.float16: "*fp16",
        torch.bfloat16: "*bf16",
        torch.int32: "*i32",
        torch.int64: "*i64",
    }[dtype]


def with_aligned(specs: list, ints: tuple) -> list:
    """Each spec followed by its aligned twin: every pointer argument plus the int arguments
    ``ints`` (N and the row strides, multiples of 16 whenever N is) marked 16-divisible, which is
    what Triton's JIT specialises for BERT shapes (torch allocations are 16-byte aligned, hidden
    384 / 768 / 1024 are multiples of 16).  The generic spec covers every other hidden size."""
    from dataclasses import replace

    out = []
    for s in specs:
        ptrs = tuple(a for a, t in s.signature.items() if t.startswith("*"))
        out += [s, replace(s, divisible=ptrs + tuple(a for a in ints if a in s.signature))]
    return out


def short_dtype(dtype: torch.dtype) -> str:
    """Compact dtype names for the compile table's config column."""
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int32: "i32",
            torch.int64: "i64"}[dtype]


# --------------------------------------------------------------------------------------------
# Per-tile math shared by both ops.  Tiles are [ROWS, BLOCK_N] fp32; ``mask_n`` is the [BLOCK_N]
# column mask (columns >= N were loaded as 0); ``w`` / ``b`` are [BLOCK_N] fp32.
#
# Rows past M in the last tile are *not* masked on load: the kernels clamp the row index to
# M - 1 (re-reading a valid row) and mask only the stores, and the backward multiplies ``dy`` of
# those rows by 0 so that they add nothing to the dW / dB sums.  A per-element row & column mask
# costs one predicate register per element, which ptxas spills on sm_80 for unspecialised
# (not 16-divisible) strides.
# --------------------------------------------------------------------------------------------


@triton.jit
def ln_fwd_tile(z, w, b, mask_n, N, eps):
    """Returns (y fp32 tile, mean [ROWS], rstd [ROWS]); two-pass statistics."""
    mean = tl.sum(z, axis=1) / N
    d = tl.where(mask_n[None, :], z - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / N
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    return y, mean, rstd


@triton.jit
def ln_xhat(z, mean, rstd):
    """Normalised input of the backward.  Not zeroed in masked columns: it only ever meets
    ``dy`` and ``g = dy * w`` there, which are 0."""
    return (z - mean[:, None]) * rstd[:, None]


@triton.jit
def ln_bwd_dz(xhat, dy, w, rstd, N):
    """d(pre-LayerNorm input) from xhat and dy (dy and w 0 in masked columns, dy 0 in padded rows):
    ``rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * w``.  Masked columns come
    out non-zero and must not be stored or summed."""
    g = dy * w[None, :]
    c1 = tl.sum(g * xhat, axis=1) / N
    c2 = tl.sum(g, axis=1) / N
    return (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
