"""Private GEMM core shared by ``linear`` and ``qkv_projection``.

One Triton kernel computes ``out = act(x @ weight.T + bias)`` for x (M, K) and weight (N, K)
(nn.Linear's layout) with an fp32 accumulator.  Its epilogue either stores a plain row-major
(M, N) result or, with ``HEAD_SPLIT``, scatters each output element straight into the
(3, B, H, S, D) head-split layout of a fused QKV projection.

This module is also the single place that decides the block sizes and the kernel: ``gemm_configs``
holds the finite list of block configurations per (architecture, dtype, precision) and
``pick_config`` is the one deterministic per-shape rule that chooses the default (a table tile;
for plain fp16 / bf16 GEMMs also split-K at small M and the persistent TMA kernel at large M on
sm_90: its docstring has the table for every bert-base GEMM); ``gemm_candidates`` is what the
tuner (``bertfast.kernels.tuning``) may time instead: every table entry, and for plain GEMMs
split-K, the persistent TMA kernel (``gemm_tma_kernel``, sm_90) and cuBLAS.  ``plan_gemm`` asks
the tuner, which answers with a stored choice (it wins) or the default unless tuning is switched
on.  ``gemm_specs`` / ``plain_default_specs`` turn the same lists into the ``KernelSpec`` entries
the compile check needs, so the check covers exactly what can run.

Two launcher guarantees keep every configuration spill-free and let the compile check see the
code that really runs:
* operands are 16-byte aligned with K in whole 16-byte units (``_align_operands`` copies / pads
  the rare operand that is not), so the kernel can *state* that with ``tl.multiple_of`` instead
  of depending on Triton's runtime specialization: loads are always 16-byte vectors / cp.async;
* stores use one 64-bit base per tile plus 32-bit offsets inside the tile (``launch_gemm``
  refuses, with ValueError, a problem whose tile span would not fit), which keeps the epilogue
  (bias + GELU + optional pre-activation store) inside the register budget on sm_80.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from bertfast.kernels._common import HAS_TRITON, launch_device
from bertfast.kernels._launch import launched

if HAS_TRITON:
    import triton
    import triton.language as tl

# Activation codes (constexpr ACTIVATION of the kernel).
ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
ACTIVATIONS = {None: ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}

# Streaming multiprocessors of the reference chip of each architecture (H100 SXM, A100); only
# used to estimate wave quantization, so a different SKU of the same family is fine.
_SM_COUNT = {9: 132, 10: 148, 8: 108}


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    # Relative throughput of one SM running this tile (bigger tiles reuse operands more);
    # only used by ``pick_config`` to trade tile efficiency against wave quantization.
    efficiency: float = 1.0
    # Plain GEMMs only (no bias, activation, pre-activation store or head split):
    # split_k > 1: the K loop is split over that many programs per output tile, each storing fp32
    # partial sums into a (split_k, M, N) workspace that ``splitk_reduce_kernel`` adds in a fixed
    # order (the default at small M, ``pick_config``).  library "tma": ``gemm_tma_kernel`` (the
    # default at large M on sm_90).  library "cublas": no Triton kernel, ``torch.mm`` (row-major
    # output only, so no fusion is lost; a tuning candidate only).
    split_k: int = 1
    library: str = "triton"

    @property
    def label(self) -> str:
        if self.library == "cublas":
            return "cublas"
        tile = f"{self.block_m}x{self.block_n}x{self.block_k}"
        if self.library == "tma":
            tile = "tma " + tile
        return tile + (f" splitk{self.split_k}" if self.split_k > 1 else "")

    @property
    def name(self) -> str:
        """Unique, stable spelling of the configuration (the tuning cache stores it)."""
        if self.library == "cublas":
            return "cublas"
        return f"{self.label} w{self.num_warps} s{self.num_stages}"

    def shared_bytes(self, elsize: int) -> int:
        """Estimate of the operand ring buffer in shared memory."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * elsize


C = GemmConfig
# --- Hopper (sm_90): 8-warp (two warpgroup) 128-row tiles lower tl.dot to wgmma; BLOCK_K 64 in
# fp16/bf16 is one 128-byte swizzled row per stage.  128x128 with 4 stages (129 KiB ring) is the
# big tile; 64x128 with one warpgroup keeps the SMs busy for small M.  A 128x256 tile (128 fp32
# accumulators a thread) compiles without spills under triton 3.9 but spills 0.1 - 1.7 KB under
# triton 3.6, whose ptxas the GPU machines run, even with only a bias in the epilogue, so it is
# not offered.  Under triton 3.6 the 128x128 tile also spills ~150 B in the erf-GELU + pre-activation
# store (training) epilogue when N is not a multiple of 16: see ``_OLD_PTXAS_STORE_PRE``.
_SM90_HALF = (
    C(128, 128, 64, num_warps=8, num_stages=4, efficiency=1.00),
    C(64, 128, 64, num_warps=4, num_stages=4, efficiency=0.75),
)
# tf32: fp32 operands take twice the shared memory, so BLOCK_K halves (still 128 bytes a row).
_SM90_TF32 = tuple(replace(c, block_k=c.block_k // 2) for c in _SM90_HALF)
# IEEE fp32 has no tensor-core path: tl.dot becomes FMAs from registers, so tiles must be small
# enough that both operand slices and the accumulator stay in registers without spilling
# (128x128 tiles reach 255 registers and spill in the head-split epilogue on sm_80; with
# BLOCK_K 16 ptxas settles on 128 registers and spills a few bytes in the erf-GELU epilogue).
_SM90_FP32 = (
    C(128, 64, 32, num_warps=8, num_stages=3, efficiency=1.00),
    C(64, 64, 32, num_warps=4, num_stages=3, efficiency=0.85),
)
# --- Ampere (sm_80): mma.sync keeps the whole accumulator in registers, so the tile is capped
# at 128x128 with 8 warps (64 fp32 accumulators a thread): 128x256/8 warps and 128x128/4 warps
# (128 a thread) spill 1-2 KB once the epilogue adds GELU and the pre-activation store.
# BLOCK_K 32 with 4 stages is the usual cp.async depth on A100 (48 KiB ring).
_SM80_HALF = (
    C(128, 128, 32, num_warps=8, num_stages=4, efficiency=1.00),
    C(64, 128, 32, num_warps=4, num_stages=4, efficiency=0.75),
)
_SM80_TF32 = _SM80_HALF  # BLOCK_K 32 is already 128 bytes a row in fp32
_SM80_FP32 = _SM90_FP32
del C

_TABLES = {
    "sm90": {"half": _SM90_HALF, "tf32": _SM90_TF32, "ieee": _SM90_FP32},
    "sm80": {"half": _SM80_HALF, "tf32": _SM80_TF32, "ieee": _SM80_FP32},
}

# --- plain fp16 / bf16 GEMMs (``pick_config``'s defaults and the tuner's candidates).  Split-K
# for the bias-free output projections (N = hidden, K = hidden or intermediate) at small M, where
# even the small tile leaves most SMs idle (M = 128, N = 768: 12 tiles on 132 SMs): the
# one-warpgroup tile of the default table, K split over 2, 4 or 8 programs.
SPLIT_K_TILE = {
    "sm90": GemmConfig(64, 128, 64, num_warps=4, num_stages=4, efficiency=0.75),
    "sm80": GemmConfig(64, 128, 32, num_warps=4, num_stages=4, efficiency=0.75),
}
SPLIT_K_FACTORS = (2, 4, 8)
# ``splitk_reduce_kernel``: elements per program and warps (4 fp32 a thread: one 16-byte load a plane)
REDUCE_BLOCK, REDUCE_WARPS = 512, 4
CUBLAS = GemmConfig(0, 0, 0, num_warps=0, num_stages=0, library="cublas")
# Persistent TMA GEMM (``gemm_tma_kernel``) for plain fp16 / bf16 GEMMs on Hopper: both tiles
# compile for sm_90 under triton 3.6 and 3.9 without spills, with wgmma and cp.async.bulk.tensor
# (3.6 and 3.9: 94 registers and 161 KiB of shared memory for 128x128, 155 and 209 KiB for
# 128x256; the 128x256 tile, which spills in ``gemm_kernel``'s fused epilogue under 3.6, does not
# here: no epilogue besides the store).  The first is ``pick_config``'s large-M default (the table's
# big tile, loaded by TMA), so it needs no triton-version rule; the second is a tuning candidate.
TMA_TILES = (
    GemmConfig(128, 128, 64, num_warps=8, num_stages=4, library="tma"),
    GemmConfig(128, 256, 64, num_warps=8, num_stages=3, library="tma"),
)
TMA_DEFAULT = TMA_TILES[0]


def _family(capability: tuple[int, int]) -> str:
    # Hopper and datacenter Blackwell (>= 227 KiB shared memory) take the Hopper list; A100
    # takes the Ampere list; consumer parts (sm_86/89/120, ~99 KiB) take a trimmed Ampere list.
    if capability[0] in (9, 10):
        return "sm90"
    if capability == (8, 0):
        return "sm80"
    return "small"


def precision_of(dtype: torch.dtype, allow_tf32: bool) -> str:
    """'half' (fp16/bf16 tensor cores), 'tf32' or 'ieee' (fp32 FMA)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "tf32" if allow_tf32 else "ieee"


def gemm_configs(dtype: torch.dtype, capability: tuple[int, int], allow_tf32: bool, *,
                 store_pre: bool = False) -> tuple[GemmConfig, ...]:
    """Every configuration ``pick_config`` may return for this dtype, architecture and epilogue (``_table``)."""
    prec = precision_of(dtype, allow_tf32)
    fam = _family(capability)
    if fam != "small":
        return _table(fam, prec, store_pre)
    elsize = 2 if prec == "half" else 4
    out = []
    for c in _table("sm80", prec, store_pre):  # drop stages until the ring fits ~99 KiB
        while c.num_stages > 2 and c.shared_bytes(elsize) > 96 * 1024:
            c = replace(c, num_stages=c.num_stages - 1)
        out.append(c)
    return tuple(out)


def is_plain(activation: int, has_bias: bool, has_pre: bool, head_split) -> bool:
    """A GEMM with nothing to fuse (no bias, activation, pre-activation store or head split): BERT's
    output projections, whose bias and residual go into the add + LayerNorm kernel.  Only these
    may take split-K, the TMA kernel or cuBLAS."""
    return activation == ACT_NONE and not has_bias and not has_pre and head_split is None


def _tiles(cfg: GemmConfig, M: int, N: int) -> int:
    return -(-M // cfg.block_m) * -(-N // cfg.block_n)


def _split_factors(M: int, N: int, K: int, fam: str, sms: int, waves: int) -> list:
    """Split-K factors of the small tile that keep >= 2 K steps a split and fit in ``waves`` waves."""
    tile = SPLIT_K_TILE[fam]
    tiles, steps = _tiles(tile, M, N), -(-K // tile.block_k)
    return [s for s in SPLIT_K_FACTORS if steps >= 2 * s and tiles * s <= waves * sms]


def _tma_possible(N: int, K: int, capability: tuple[int, int]) -> bool:
    # descriptors need 16-byte row strides: K is aligned by the launcher (``_align_operands``), N here
    return capability[0] == 9 and N % 8 == 0 and K % 8 == 0


def gemm_candidates(M: int, N: int, K: int, dtype: torch.dtype, capability: tuple[int, int], allow_tf32: bool, *,
                    plain: bool, store_pre: bool = False) -> tuple[GemmConfig, ...]:
    """What the tuner may time for one GEMM, the default (``pick_config``) first: every entry of
    the table, and for a ``plain`` GEMM (``is_plain``: the output projections whose bias goes into
    the LayerNorm kernel) cuBLAS via ``torch.mm`` plus, for fp16 / bf16, split-K at small M (fewer
    tiles than SMs, at most two waves) and the persistent TMA kernel on sm_90.  ``store_pre``: see
    ``gemm_configs``."""
    default = pick_config(M, N, K, dtype, capability, allow_tf32, store_pre=store_pre, plain=plain)
    out = [default, *gemm_configs(dtype, capability, allow_tf32, store_pre=store_pre)]
    if plain:
        fam = _family(capability)
        sms = _SM_COUNT.get(capability[0], 108)
        if precision_of(dtype, allow_tf32) == "half":
            if fam in SPLIT_K_TILE and _tiles(SPLIT_K_TILE[fam], M, N) < sms:
                out += [replace(SPLIT_K_TILE[fam], split_k=s) for s in _split_factors(M, N, K, fam, sms, 2)]
            if _tma_possible(N, K, capability):
                out += TMA_TILES
        out.append(CUBLAS)
    return tuple(dict.fromkeys(out))  # the default once, first


def _table_tile(M: int, N: int, dtype: torch.dtype, capability: tuple[int, int], allow_tf32: bool,
                store_pre: bool) -> GemmConfig:
    """Wave-quantization choice among the table's tiles (see ``pick_config``)."""
    configs = gemm_configs(dtype, capability, allow_tf32, store_pre=store_pre)
    sms = _SM_COUNT.get(capability[0], 108)
    best, best_cost = configs[0], math.inf
    for c in configs:
        cost = -(-_tiles(c, M, N) // sms) * c.block_m * c.block_n / c.efficiency
        if cost < best_cost * 0.999:
            best, best_cost = c, cost
    return best


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, capability: tuple[int, int], allow_tf32: bool, *,
                store_pre: bool = False, plain: bool = False) -> GemmConfig:
    """The one deterministic per-shape rule: the default configuration of a GEMM (the tuner's
    stored choice, when there is one, overrides it per shape class).

    1. Table tile: estimated time = (waves of tiles over the SMs) x (tile area / tile efficiency);
       ties go to the earlier (bigger) tile.  Big GEMMs take the largest tile unless its last wave
       would leave most SMs idle; small M takes the small tile.
    2. ``plain`` (``is_plain``) fp16 / bf16 GEMMs whose small-tile count is below half the SMs
       (Hopper / Blackwell, A100) take split-K on the small tile: the largest factor of 2, 4, 8
       that keeps >= 2 K steps a split and fits in one wave.  Each program stores fp32 partial
       sums; ``splitk_reduce_kernel`` adds the planes in a fixed order (deterministic, one pass),
       or, in the model's output blocks (inference), their add + LayerNorm kernel adds them as it
       reads x (``bertfast.ops.dense_add_layernorm``: the same bits, no extra launch).
    3. Otherwise ``plain`` fp16 / bf16 GEMMs on sm_90 whose table tile is the big 128x128 one
       (large M) take the persistent TMA kernel with the same tile (N, K multiples of 8), which
       compiles clean (no spill, 161 KiB of shared memory, wgmma) under triton 3.6 and 3.9.
    Nothing else changes: fp32 and fused-epilogue GEMMs (QKV with its bias and head split, FFN1
    with bias + GELU) keep the table tile of ``gemm_kernel``.

    bert-base, fp16, 132 SMs (H100); M = tokens: 1x128, 32x128 mixed lengths packed (~2,700,
    uniform in [0.3, 1] x 128), 32x128 full.  programs = the grid (TMA: persistent, at most one
    per SM); waves = tiles x splits / 132.  Before this rule every row was the table tile of
    ``gemm_kernel`` (attention output and FFN2 at M = 128: 12 tiles, 0.09 waves)::

        GEMM            N     K     M  default                    tiles  programs  waves
        QKV          2304   768   128  64x128x64 w4 s4               36        36   0.27
        QKV          2304   768  2700  128x128x64 w8 s4             396       396   3.00
        QKV          2304   768  4096  128x128x64 w8 s4             576       576   4.36
        attn-out      768   768   128  64x128x64 splitk4 w4 s4       12        48   0.36
        attn-out      768   768  2700  tma 128x128x64 w8 s4         132       132   1.00
        attn-out      768   768  4096  tma 128x128x64 w8 s4         192       132   1.45
        FFN1         3072   768   128  64x128x64 w4 s4               48        48   0.36
        FFN1         3072   768  2700  128x128x64 w8 s4             528       528   4.00
        FFN1         3072   768  4096  128x128x64 w8 s4             768       768   5.82
        FFN2          768  3072   128  64x128x64 splitk8 w4 s4       12        96   0.73
        FFN2          768  3072  2700  tma 128x128x64 w8 s4         132       132   1.00
        FFN2          768  3072  4096  tma 128x128x64 w8 s4         192       132   1.45

    (QKV: bias + head-split store; FFN1: bias + GELU; attn-out and FFN2: plain.  ``launch_summary``
    computes a row; tests/test_linear.py checks this table against it.)  ``store_pre``: see
    ``gemm_configs``.
    """
    tile = _table_tile(M, N, dtype, capability, allow_tf32, store_pre)
    if not plain or precision_of(dtype, allow_tf32) != "half":
        return tile
    fam = _family(capability)
    sms = _SM_COUNT.get(capability[0], 108)
    if fam in SPLIT_K_TILE and 2 * _tiles(SPLIT_K_TILE[fam], M, N) < sms:
        splits = _split_factors(M, N, K, fam, sms, 1)
        if splits:
            return replace(SPLIT_K_TILE[fam], split_k=splits[-1])
    if _tma_possible(N, K, capability) and (tile.block_m, tile.block_n) == (TMA_DEFAULT.block_m, TMA_DEFAULT.block_n):
        return TMA_DEFAULT
    return tile


def launch_summary(cfg: GemmConfig, M: int, N: int, capability: tuple[int, int] = (9, 0)) -> tuple[int, int, float]:
    """(tiles, programs, waves) of launching ``cfg`` for an (M, N) output on the reference chip of
    ``capability`` (``pick_config``'s table)."""
    sms = _SM_COUNT.get(capability[0], 108)
    tiles = _tiles(cfg, M, N)
    programs = min(tiles, sms) if cfg.library == "tma" else tiles * cfg.split_k
    return tiles, programs, tiles * cfg.split_k / sms


# M (rows = tokens, arbitrary with padding-free packing) and SEQ (sequence length) are never specialised
# on divisibility by 16 (nor on == 1): the kernel the JIT builds does not depend on them, so the two variants
# gemm_specs lists (fully generic, and 16-divisible sizes and strides apart from M and SEQ) are the ones that run.
_NOT_SPECIALIZED = ("M", "SEQ")


if HAS_TRITON:

    @triton.jit
    def _gelu_erf(z):
        # exact GELU: z * Phi(z)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))

    @triton.jit
    def _gelu_tanh(z):
        # 0.5 * z * (1 + tanh(u)) == z * sigmoid(2u), u = sqrt(2/pi) * (z + 0.044715 z^3);
        # the sigmoid form needs only exp and is finite for every z.
        u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)
        return z / (1.0 + tl.exp(-u2))

    @launched(do_not_specialize=list(_NOT_SPECIALIZED))
    def gemm_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, pre_ptr,
        M, N, K,
        stride_xm, stride_wn, stride_om,
        SEQ, HEAD_DIM, HIDDEN,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
        HEAD_SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        """out = act(x @ w.T + bias).  x: (M, K), w: (N, K), both with unit stride along K.

        HEAD_SPLIT: N = 3*HIDDEN; rows are m = b*SEQ + s, columns n = which*HIDDEN + h*HEAD_DIM + d,
        and the element goes to out[which, b, h, s, d] of a contiguous (3, B, H, SEQ, HEAD_DIM).
        Column tiles never straddle q / k / v: each of the three parts has its own column tiles.
        Otherwise out is (M, N) with row stride stride_om.
        STORE_PRE: also store the pre-activation (x @ w.T + bias) to pre_ptr, laid out as out.
        DOT_UPCAST: interpreter only (never compiled for a GPU): the Triton interpreter's tl.dot
        multiplies bf16 operands as their raw uint16 bit patterns, so bf16 tiles are widened to
        fp32 first (exact; the products and fp32 sums are what the tensor cores compute).
        SPLIT_K: program (tile, s) of a (tiles, splits) grid sums only its share of the K steps
        and stores the fp32 partial sum to plane s of a (splits, M, N) fp32 workspace at out_ptr
        (``splitk_reduce_kernel`` adds the planes); only without bias, activation, pre-activation
        or head split."""
        if HEAD_SPLIT:
            n_part = HIDDEN
            parts = 3
        else:
            n_part = N
            parts = 1
        # ---- tile ordering: GROUP_M row-tiles share each column sweep, so the weight columns
        # and x rows a group touches stay in L2 while the group runs.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_per_part = tl.cdiv(n_part, BLOCK_N)
        per_group = GROUP_M * tiles_per_part * parts
        group = pid // per_group
        m_first = group * GROUP_M
        rows_in_group = tl.minimum(tiles_m - m_first, GROUP_M)
        local = pid - group * per_group
        pid_m = m_first + local % rows_in_group
        pid_n = local // rows_in_group
        which = pid_n // tiles_per_part  # q / k / v (always 0 without HEAD_SPLIT)
        m0 = pid_m * BLOCK_M
        n0 = (pid_n - which * tiles_per_part) * BLOCK_N  # first column within the part

        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = m0 + rm < M
        n_ok = n0 + rn < n_part
        # Rows / columns past the edge read row 0 instead (their results are never stored), so
        # only the K tail needs a load mask.
        rows = tl.where(m_ok, m0 + rm, 0)
        cols = tl.where(n_ok, which * n_part + n0 + rn, 0)
        k_lo = 0
        k_hi = K
        if SPLIT_K:  # this program's share of the K steps: [k_lo, k_hi), whole BLOCK_K steps but the last
            per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
            k_lo = tl.program_id(1) * per_split
            k_hi = tl.minimum(K, k_lo + per_split)
        x_ptrs = x_ptr + (rows.to(tl.int64) * stride_xm)[:, None] + (k_lo + offs_k)[None, :]
        w_ptrs = w_ptr + (cols.to(tl.int64) * stride_wn)[None, :] + (k_lo + offs_k)[:, None]  # (BK, BN) of w.T
        # The launcher guarantees (copying into a K-padded buffer otherwise) that x and w start
        # 16-byte aligned and that their row strides and K are whole 16-byte units: every row of
        # both tiles starts 16-byte aligned and the K tail ends on a 16-byte boundary, so loads
        # are 16-byte vectors / cp.async whatever the runtime specialization sees.
        VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
        x_ptrs = tl.multiple_of(x_ptrs, [16, 16])
        w_ptrs = tl.multiple_of(w_ptrs, [16, 16])

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_left = tl.multiple_of(k_hi - k0, VEC)
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if DOT_UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        # ---- epilogue: bias, (pre-activation), activation, store
        if HAS_BIAS:
            bias = tl.load(bias_ptr + which * n_part + n0 + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]

        # Addresses: one 64-bit base per tile plus 32-bit offsets within the tile (the launcher
        # checks that a tile's span fits in int32), which keeps the epilogue's registers low.
        if HEAD_SPLIT:
            b0 = m0 // SEQ
            s0 = m0 - b0 * SEQ
            base = (which.to(tl.int64) * M + b0.to(tl.int64) * SEQ) * HIDDEN + s0.to(tl.int64) * HEAD_DIM
            b_idx = (m0 + rm) // SEQ
            s_idx = (m0 + rm) - b_idx * SEQ
            row_off = (b_idx - b0) * (SEQ * HIDDEN) + (s_idx - s0) * HEAD_DIM
            h_idx = (n0 + rn) // HEAD_DIM
            col_off = h_idx * (SEQ * HEAD_DIM) + (n0 + rn - h_idx * HEAD_DIM)
        else:
            base = m0.to(tl.int64) * stride_om + n0
            if SPLIT_K:  # this program's plane of the (splits, M, N) workspace
                base += tl.program_id(1).to(tl.int64) * M * stride_om
            row_off = rm * stride_om
            col_off = rn
        offs = row_off[:, None] + col_off[None, :]
        mask = m_ok[:, None] & n_ok[None, :]

        if STORE_PRE:
            tl.store(pre_ptr + base + offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        if ACTIVATION == 1:
            acc = _gelu_erf(acc)
        elif ACTIVATION == 2:
            acc = _gelu_tanh(acc)
        tl.store(out_ptr + base + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


if HAS_TRITON:

    @launched(do_not_specialize=["M"])
    def gemm_tma_kernel(x_desc, w_desc, out_desc, M, N, K,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        DOT_UPCAST: tl.constexpr):
        """Persistent plain GEMM, out = x @ w.T, operands and result through TMA tensor
        descriptors (sm_90+; host ``TensorDescriptor`` s of blocks (BLOCK_M, BLOCK_K),
        (BLOCK_N, BLOCK_K), (BLOCK_M, BLOCK_N)).  A grid of at most one program per SM walks the
        output tiles in the grouped order of ``gemm_kernel``; TMA zero-fills loads past the edges
        and clips stores, so there are no masks.  Plain GEMMs only: ``pick_config``'s default at
        large M on sm_90, and a tuning candidate."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=True):
            group = tile // per_group
            m_first = group * GROUP_M
            rows_in_group = tl.minimum(tiles_m - m_first, GROUP_M)
            local = tile - group * per_group
            m0 = (m_first + local % rows_in_group) * BLOCK_M
            n0 = (local // rows_in_group) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                a = x_desc.load([m0, k0])
                b = w_desc.load([n0, k0])
                if DOT_UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b.T, acc)
            out_desc.store([m0, n0], acc.to(out_desc.dtype))

    @launched(do_not_specialize=["SPLITS"])
    def splitk_reduce_kernel(ws_ptr, out_ptr, MN, SPLITS, BLOCK: tl.constexpr):
        """out[i] = ws[0, i] + ws[1, i] + ... + ws[SPLITS - 1, i], added in that order in fp32
        (deterministic: the same bits every run) and rounded once to out's dtype.  ws: the
        (SPLITS, M, N) fp32 partial sums of a split-K ``gemm_kernel``; out: a contiguous (M, N),
        MN = M * N.  One pass over the workspace, one launch.

        Why a second kernel rather than the GEMM's last program of each tile adding the planes:
        that needs per-tile arrival counters (zeroed memory kept between calls, shared by every
        stream, or a memset a call) and acquire / release ordering that neither the interpreter
        nor the compile check can test; a separate launch is ordered by the stream."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        ptrs = ws_ptr + offs
        acc = tl.load(ptrs, mask=mask, other=0.0)
        for _ in range(1, SPLITS):
            ptrs += MN
            acc += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# The tables above are the triton 3.9 choice (its bundled ptxas: no spill anywhere).  Under an
# older triton (``_compile.OLD_PTXAS``: 3.6.0 is what the GPU machines run) its ptxas spills in
# a few of them, and the lists below replace those (``_table``).  Measured with
# ``python -m bertfast.kernels.compile_check --op linear qkv_projection`` under triton 3.6.0
# (registers / spill-store bytes, generic kernel / 16-divisible twin).
C = GemmConfig
# Pre-activation store (STORE_PRE: the GELU layers of training), fp16 / bf16 / tf32.  Under 3.6:
# sm_90 128x128x64 w8: 255 regs, 136 - 160 B spilled (generic) -> 16 warps (four warpgroups of
#   64x64, half the accumulators a thread): 128 / 79 regs, no spill, wgmma kept;
# sm_90 tf32 128x128x32 w8: 16 B (w16 still 12 B) -> only the one-warpgroup 64x128 tile (clean);
# sm_80 128x128x32 w8: 255 regs, 156 - 172 B (tf32 40 - 68 B) -> w16: 128 / 84 - 88 regs, no
#   spill (tf32 w16 still 16 - 32 B: tf32 takes only the 64x128 tile);
# sm_80 64x128x32 w4: 8 B (fp16 bias, 16-divisible), tf32 24 - 52 B -> w8: <= 177 regs, no spill.
# The tiles (hence the interpreter's results) are the default table's; only warps change.
_OLD_PTXAS_STORE_PRE = {
    "sm90": {
        "half": (
            C(128, 128, 64, num_warps=16, num_stages=4, efficiency=1.00),
            C(64, 128, 64, num_warps=4, num_stages=4, efficiency=0.75),
        ),
        "tf32": (C(64, 128, 32, num_warps=4, num_stages=4, efficiency=0.75),),
        "ieee": (C(64, 64, 32, num_warps=4, num_stages=2, efficiency=0.85),),
    },
    "sm80": {
        "half": (
            C(128, 128, 32, num_warps=16, num_stages=4, efficiency=1.00),
            C(64, 128, 32, num_warps=8, num_stages=4, efficiency=0.75),
        ),
        "tf32": (C(64, 128, 32, num_warps=8, num_stages=4, efficiency=0.75),),
        "ieee": (C(64, 64, 32, num_warps=4, num_stages=2, efficiency=0.85),),
    },
}
# IEEE fp32 (every epilogue), both architectures.  Under 3.6, with 3 stages ptxas settles on 128
# registers and spills 8 - 28 B (128x64 w8: plain, tanh, bias, erf + pre-activation; 64x64 w4:
# tanh on sm_80, the head-split store on sm_90) -> 2 stages: 128 regs, no spill.
_OLD_PTXAS_FP32 = tuple(replace(c, num_stages=2) for c in _SM90_FP32)
del C


def _table(fam: str, prec: str, store_pre: bool) -> tuple[GemmConfig, ...]:
    """The list of one (architecture family, precision, epilogue); the triton-version rule."""
    from bertfast.kernels._compile import OLD_PTXAS

    if OLD_PTXAS:
        if store_pre and prec in _OLD_PTXAS_STORE_PRE[fam]:
            return _OLD_PTXAS_STORE_PRE[fam][prec]
        if prec == "ieee":
            return _OLD_PTXAS_FP32
    return _TABLES[fam][prec]



_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _align_operands(x2: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Make the promise the kernel's load hints rely on true: both operands start 16-byte
    aligned, their row strides and K are whole 16-byte units.  Everything torch allocates for
    BERT-sized layers already is (no copy); otherwise the offending operand is copied, with K
    zero-padded to the next 16 bytes (zeros add nothing to the product).  Returns (x2, w, K)."""
    K = x2.shape[1]
    vec = 16 // x2.element_size()

    def ok(t):
        return t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) % vec == 0)

    if K % vec == 0:
        return (x2 if ok(x2) else x2.contiguous()), (w if ok(w) else w.contiguous()), K
    Kp = K + vec - K % vec

    def pad(t):
        buf = torch.zeros((t.shape[0], Kp), dtype=t.dtype, device=t.device)
        buf[:, :K] = t
        return buf

    return pad(x2), pad(w), Kp


class GemmPlan(NamedTuple):
    """Everything a GEMM launch needs besides the tensors: made once per shape (``plan_gemm``)."""

    grid: tuple
    ints: tuple  # M, N, K, stride_x, stride_w, N (output row stride), SEQ, HEAD_DIM, HIDDEN
    kwargs: dict
    split_k: int = 1  # > 1: fp32 partial sums in a (split_k, M, N) workspace, added by splitk_reduce_kernel
    cublas: bool = False  # torch.mm instead of the Triton kernel
    tma: bool = False  # gemm_tma_kernel (persistent, TMA descriptors)
    # the compiled gemm_kernel by tensor alignment (``Kernel.planned``): everything else of a launch is
    # fixed by the plan; None: launch through the full key
    memo: Optional[dict] = None


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the reference chip's count off CUDA)."""
    if device.type != "cuda":
        return _SM_COUNT[9]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def plan_gemm(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, stride_x: int, stride_w: int, *,
              activation: int = ACT_NONE, has_bias: bool, has_pre: bool,
              head_split: Optional[tuple[int, int, int]] = None, config: Optional[GemmConfig] = None) -> GemmPlan:
    """Block sizes, grid and scalar arguments of one GEMM launch (operands already aligned:
    ``_align_operands``).  A pure function of shapes, strides, dtype, device, the global TF32
    switch and the tuner's stored choices (``bertfast.kernels.tuning``), so launchers keep it per shape
    (``bertfast.kernels._common.PlanCache``).  ``config``: force a configuration (tests, the tuner)."""
    from bertfast.kernels import tuning
    from bertfast.kernels._common import INTERPRET, cuda_capability, tf32_allowed

    allow_tf32 = tf32_allowed(dtype)
    plain = is_plain(activation, has_bias, has_pre, head_split)
    if config is None:
        config = tuning.gemm_choice(M, N, K, dtype, device, cuda_capability(device), allow_tf32,
                                    activation=activation, has_bias=has_bias, has_pre=has_pre, head_split=head_split)
    cfg = config
    if (cfg.library != "triton" or cfg.split_k > 1) and not plain:
        raise ValueError(f"GEMM configuration {cfg.name} needs a GEMM without bias, activation, pre-activation "
                         f"store or head split")
    ints = (M, N, K, stride_x, stride_w, N, 1, 1, 1)
    if cfg.library == "cublas":
        return GemmPlan((), ints, {}, cublas=True)
    prec = precision_of(dtype, allow_tf32)
    upcast = INTERPRET and dtype == torch.bfloat16
    if cfg.library == "tma":
        if prec != "half":
            raise ValueError(f"GEMM configuration {cfg.name} is for fp16 / bf16 only")
        tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
        grid = (max(1, min(tiles, _sm_count(device))),)
        kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                      DOT_UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return GemmPlan(grid, ints, kwargs, tma=True)
    if head_split is not None:
        seq, head_dim, hidden = head_split
        n_part, parts = hidden, 3
        span = (2 * seq + cfg.block_m) * hidden  # largest in-tile offset of the head-split store
    else:
        seq, head_dim, hidden = 1, 1, 1
        n_part, parts = N, 1
        span = cfg.block_m * N
    if span >= 2**31:
        raise ValueError(
            f"GEMM of {M}x{N}x{K}: one output tile spans {span} elements, more than the kernel's 32-bit in-tile "
            f"offsets allow" + (f" (sequence length {seq} x hidden {hidden} is too large)" if head_split else "")
        )
    grid = (-(-M // cfg.block_m) * parts * -(-n_part // cfg.block_n),)
    if cfg.split_k > 1:
        grid = (grid[0], cfg.split_k)
    kwargs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=has_bias, ACTIVATION=activation, STORE_PRE=has_pre,
        HEAD_SPLIT=head_split is not None, INPUT_PRECISION="ieee" if prec == "ieee" or upcast else "tf32",
        DOT_UPCAST=upcast, SPLIT_K=cfg.split_k > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return GemmPlan(grid, (M, N, K, stride_x, stride_w, N, seq, head_dim, hidden), kwargs, split_k=cfg.split_k,
                    memo={})


def run_gemm(plan: GemmPlan, x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             out: torch.Tensor, pre: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch ``gemm_kernel`` (or cuBLAS) as planned."""
    if plan.cublas:  # plain GEMM only (plan_gemm): out (M, N) = x2 @ weight.T
        M, N = plan.ints[:2]
        torch.mm(x2, weight.t(), out=out.view(M, N))
        return out
    if plan.tma and not _tma_ready(x2, weight, out):
        # the shape class's stored choice, but these tensors break the descriptors' rules (an
        # ``out=`` at an odd offset, a one-row x with an odd row stride): the table's default
        M, N, K, stride_x, stride_w = plan.ints[:5]
        from bertfast.kernels._common import cuda_capability, tf32_allowed

        cfg = pick_config(M, N, K, x2.dtype, cuda_capability(x2.device), tf32_allowed(x2.dtype))
        plan = plan_gemm(M, N, K, x2.dtype, x2.device, stride_x, stride_w, has_bias=False, has_pre=False,
                         config=cfg)
    if plan.tma:  # plain GEMM only
        from triton.tools.tensor_descriptor import TensorDescriptor

        M, N = plan.ints[:2]
        bm, bn, bk = plan.kwargs["BLOCK_M"], plan.kwargs["BLOCK_N"], plan.kwargs["BLOCK_K"]
        descs = (TensorDescriptor.from_tensor(x2, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
                 TensorDescriptor.from_tensor(out.view(M, N), [bm, bn]))
        with launch_device(x2.device):
            gemm_tma_kernel[plan.grid](*descs, M, N, plan.ints[2], **plan.kwargs)
        return out
    if plan.split_k > 1:  # plain GEMM only: fp32 partial sums, added in a fixed order (deterministic)
        M, N = plan.ints[:2]
        ws = run_gemm_partials(plan, x2, weight)
        with launch_device(x2.device):
            splitk_reduce_kernel[(-(-(M * N) // REDUCE_BLOCK),)](ws, out, M * N, plan.split_k, BLOCK=REDUCE_BLOCK,
                                                                  num_warps=REDUCE_WARPS, num_stages=1)
        return out
    args = (x2, weight, bias if bias is not None else out, out, pre if pre is not None else out, *plan.ints)
    with launch_device(x2.device):
        gemm_kernel.planned(plan.memo, plan.grid, args, plan.kwargs)
    return out


def run_gemm_partials(plan: GemmPlan, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The split-K GEMM of a split-K plan without its reduction: returns the (split_k, M, N) fp32
    workspace of partial sums, plane s holding program s's share of the K steps.  The planes are
    added in the order 0, 1, ... in fp32 and rounded once to the output dtype by
    ``splitk_reduce_kernel`` or by the consumer that reads them (``add_layernorm``'s split-K input:
    the same bits, one launch less)."""
    M, N = plan.ints[:2]
    # one allocation from torch's caching allocator (inside a CUDA graph capture: from the graph's
    # pool, so the replays reuse it); no host read
    ws = torch.empty((plan.split_k, M, N), dtype=torch.float32, device=x2.device)
    with launch_device(x2.device):
        gemm_kernel.planned(plan.memo, plan.grid, (x2, weight, ws, ws, ws, *plan.ints), plan.kwargs)
    return ws


def _tma_ready(x2: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether TMA descriptors may be made for these tensors: 16-byte aligned starts and row
    strides of whole 16-byte units (``_align_operands`` lets a one-row operand keep any stride),
    unit stride along the rows, a contiguous output."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in (x2, w)) and out.is_contiguous() and out.data_ptr() % 16 == 0 and \
        (out.shape[-1] * out.element_size()) % 16 == 0


def operands_aligned(x2: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``_align_operands`` would leave both operands as they are (no copy)."""
    vec = 16 // x2.element_size()
    return (x2.shape[1] % vec == 0 and x2.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
            and (x2.shape[0] <= 1 or x2.stride(0) % vec == 0) and (w.shape[0] <= 1 or w.stride(0) % vec == 0))


def inplace_operand(x: torch.Tensor, M: int, K: int, w: torch.Tensor) -> Optional[torch.Tensor]:
    """x as the (M, K) operand a planned launch reads in place (no copy), with ``w``: the view,
    or None when the layout needs the general path (a copy, a non-unit inner stride, or a
    misaligned operand).  Plan-time check of ``bertfast.kernels.linear`` and ``bertfast.kernels.qkv_projection``."""
    try:
        x2 = x.view(M, K)
    except RuntimeError:
        return None
    if x2.stride(-1) == 1 and w.stride(-1) == 1 and operands_aligned(x2, w):
        return x2
    return None


def launch_gemm(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    *,
    activation: int = ACT_NONE,
    pre: Optional[torch.Tensor] = None,
    head_split: Optional[tuple[int, int, int]] = None,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """Launch ``gemm_kernel``.  Callers have already validated everything: x2 (M, K) and weight
    (N, K) with unit stride along K, same dtype and device, M, N > 0.  ``out`` (and ``pre``) are
    contiguous: (M, N) row-major, or (3, B, H, S, D) when ``head_split = (S, D, hidden)``."""
    M = x2.shape[0]
    N = weight.shape[0]
    x2, weight, K = _align_operands(x2, weight)
    plan = plan_gemm(M, N, K, x2.dtype, x2.device, x2.stride(0), weight.stride(0), activation=activation,
                     has_bias=bias is not None, has_pre=pre is not None, head_split=head_split, config=config)
    return run_gemm(plan, x2, weight, bias, out, pre)


def gemm_specs(op: str, arch: int, flag_sets: list[dict]) -> list:
    """KernelSpecs for every (dtype, precision, configuration) the launcher can pick on ``arch``
    times every flag combination in ``flag_sets`` (dicts of HAS_BIAS / ACTIVATION / STORE_PRE /
    HEAD_SPLIT), each twice: the generic kernel, and its "aligned" twin with every pointer and
    integer argument but M and SEQ (never specialised) 16-divisible, which is what Triton's JIT
    builds for BERT shapes (16-byte aligned allocations, hidden / intermediate sizes multiples of 16).

    Labels: dtype ("tf32" for fp32 with TF32 allowed), BLOCK_MxBLOCK_NxBLOCK_K, then "b" (bias),
    "erf" / "tanh" (exact / tanh GELU), "z" (pre-activation Z stored for the backward), joined
    by "+"; the compile check appends "aligned" to the 16-divisible twin."""
    cap = (arch // 10, arch % 10)
    specs = []
    for dtype, allow_tf32 in (
        (torch.float16, False), (torch.bfloat16, False), (torch.float32, True), (torch.float32, False),
    ):
        lists = [gemm_configs(dtype, cap, allow_tf32, store_pre=bool(f.get("STORE_PRE"))) for f in flag_sets]
        for cfg in dict.fromkeys(c for configs in lists for c in configs):  # every listed config, in order
            for flags, configs in zip(flag_sets, lists):
                if cfg in configs:
                    specs += _spec_pair(op, dtype, allow_tf32, cfg, flags)
    return specs


def plain_default_specs(op: str, arch: int) -> list:
    """KernelSpecs of what ``pick_config`` launches by default for plain GEMMs on ``arch`` besides
    the table tiles: split-K (fp16 / bf16, fp32 workspace output; one kernel per dtype serves
    every split factor, it reads the number of splits from the grid) with its reduction, and the
    persistent TMA kernel's default tile (sm_90)."""
    from bertfast.kernels._compile import KernelSpec

    fam = _family((arch // 10, arch % 10))
    if fam not in SPLIT_K_TILE:
        return []
    cfg = replace(SPLIT_K_TILE[fam], split_k=SPLIT_K_FACTORS[0])
    specs = []
    for dtype in (torch.float16, torch.bfloat16):
        specs += _spec_pair(op, dtype, False, cfg, {})
        t = _TL_NAME[dtype]
        spec = KernelSpec(op=op, fn=splitk_reduce_kernel, signature={
            "ws_ptr": "*fp32", "out_ptr": f"*{t}", "MN": "i32", "SPLITS": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": REDUCE_BLOCK}, num_warps=REDUCE_WARPS, num_stages=1, label=f"{t} splitk reduce")
        specs += [spec, replace(spec, divisible=("ws_ptr", "out_ptr", "MN"))]
    return specs + tma_specs(op, arch, (TMA_DEFAULT,))


def tma_specs(op: str, arch: int, tiles: tuple = TMA_TILES) -> list:
    """KernelSpecs of the persistent TMA kernel with ``tiles`` (sm_90 only; fp16 / bf16)."""
    from bertfast.kernels._compile import KernelSpec

    if arch // 10 != 9:
        return []
    specs = []
    for dtype in (torch.float16, torch.bfloat16):
        t = _TL_NAME[dtype]
        for cfg in tiles:
            bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
            sig = {"x_desc": f"tensordesc<{t}[{bm}, {bk}]>", "w_desc": f"tensordesc<{t}[{bn}, {bk}]>",
                   "out_desc": f"tensordesc<{t}[{bm}, {bn}]>", "M": "i32", "N": "i32", "K": "i32"}
            const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m, DOT_UPCAST=False)
            sig.update({k: "constexpr" for k in const})
            spec = KernelSpec(op=op, fn=gemm_tma_kernel, signature=sig, constexprs=const, num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages, expect_tensor_cores=True, label=f"{t} {cfg.label}")
            specs += [spec, replace(spec, divisible=("N", "K"))]
    return specs


def _spec_pair(op: str, dtype: torch.dtype, allow_tf32: bool, cfg: GemmConfig, flags: dict) -> list:
    """The generic and the "aligned" KernelSpec of one configuration (see ``gemm_specs``)."""
    from bertfast.kernels._compile import KernelSpec

    prec = precision_of(dtype, allow_tf32)
    t = _TL_NAME[dtype]
    split = cfg.split_k > 1
    sig = {
        "x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}",
        "out_ptr": "*fp32" if split else f"*{t}", "pre_ptr": "*fp32" if split else f"*{t}",
        "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32",
        "SEQ": "i32", "HEAD_DIM": "i32", "HIDDEN": "i32",
    }
    const = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=False, ACTIVATION=ACT_NONE, STORE_PRE=False, HEAD_SPLIT=False,
        INPUT_PRECISION="ieee" if prec == "ieee" else "tf32", DOT_UPCAST=False, SPLIT_K=split,
    )
    const.update(flags)
    s = dict(sig)
    s.update({k: "constexpr" for k in const})
    parts = [("b", const["HAS_BIAS"]), ({ACT_GELU: "erf", ACT_GELU_TANH: "tanh"}.get(const["ACTIVATION"], ""), True),
             ("z", const["STORE_PRE"])]
    tags = "+".join(name for name, on in parts if on and name)
    tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}" + (" splitk" if split else "")
    label = f"{'tf32' if prec == 'tf32' else t} {tile}" + (f" {tags}" if tags else "")
    spec = KernelSpec(
        op=op, fn=gemm_kernel, signature=s, constexprs=const, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, expect_tensor_cores=prec != "ieee", label=label,
    )
    return [spec, replace(spec, divisible=tuple(a for a in sig if a not in _NOT_SPECIALIZED))]
