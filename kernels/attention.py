"""Fused multi-head attention (flash-attention style) in Triton, forward and backward.

Public API (re-exported lazily by ``kernels``):

* ``attention(q, k, v, attention_mask=None, *, causal=False, scale=None, out=None, fallback=False)``
  q, k, v: (B, H, S, D), any strides (the q/k/v views of ``qkv_projection``'s (3, B, H, S, D)
  tensor); returns (B, S, H, D) contiguous, i.e. the (B, S, H*D) input of the output projection.
* ``attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal=False, scale=None, out=None, fallback=False)``
  packed tokens (T, H, D) with int32 ``cu_seqlens`` (B + 1); returns (T, H, D) contiguous.
* ``attention_reference`` / ``attention_varlen_reference``: fp32 matmul-softmax-matmul with the
  same masking rules, cast back to q.dtype; the ground truth for the tests.
* ``prepare_attention_mask(mask, B, H, S, *, analyze=None) -> AttentionMask``: a mask analysed
  once (kind, key lengths / int8 key mask / fp32 additive mask), accepted by ``attention``, the
  reference and ``bertfast.kernels.ops.attention`` in place of the raw mask: an encoder prepares its mask
  once per forward and passes the result to every layer.  A raw mask is analysed at every
  call; nothing is cached on a tensor's identity (a mask refilled in place, through a numpy
  view, or by a CUDA graph replay is always read as it is now).
* ``supports_head_dim(d) -> bool``: whether the kernels run head dim ``d`` (``HEAD_DIMS``).
  (These three: ``from bertfast.kernels.attention import ...``.)

Masking rules (kernel and reference agree):

* 2-D ``attention_mask`` (B, S), Hugging Face style, bool / int / float with values 0 or 1:
  key j of batch b is visible iff mask[b, j] != 0.  It only masks *keys*; padded query rows
  are computed like the others (they see the valid keys).
* 4-D additive float mask broadcastable to (B, H, S, S) (bool 4-D: True = attend): added to the
  scaled scores.  A key whose mask value is ``-inf`` is masked; finite values (e.g.
  ``torch.finfo(dtype).min``) are just very negative scores.
* ``causal=True``: query i sees keys j <= i (positions within each sequence).
* A query row whose keys are all masked (every score ``-inf``) returns zeros, never NaN, and
  passes zero gradients.

Kernel design.  Forward: one program per (BLOCK_M query rows, head, batch).  The Q tile stays
in registers, K/V tiles stream past; online softmax in the log2 domain (``log2(e)`` folded into
the score scale, ``exp2``) with fp32 running max / sum and an fp32 accumulator.  The key loop
is split in two: tiles that need no bounds / causal masking (the bulk) and the few tiles at the
end that do.  Key tiles past the last valid key are never visited: for a right-padding 2-D mask
the host computes per-batch key lengths (one host read, in ``prepare_attention_mask``) and the
loop stops there; an arbitrary 0/1 mask is
loaded per key tile (and the loop still stops after its last valid key); causal stops at the
diagonal.  The forward saves the per-row softmax statistics (running max ``m`` in log2 units
and ``1 / l``; together they are the log-sum-exp ``m + log2(l)``, kept in two parts so that rows
whose scores are all huge negative finite numbers keep exact probabilities).

Backward (FlashAttention-2 recomputation, no atomics): a preprocess kernel computes
``delta = rowsum(dO * O)``; a dK/dV kernel keeps one key tile on chip and iterates over query
tiles; a dQ kernel keeps one query tile and iterates over key tiles.  P is recomputed from the
saved statistics.

Block sizes come from one function, ``attention_config``; ``compile_specs`` lists every
configuration the launchers can pick on an architecture.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional

import torch

from bertfast.kernels._common import (
    HAS_TRITON,
    INTERPRET,
    SUPPORTED_DTYPES,
    check_dtype,
    check_out,
    check_same_dtype,
    check_values,
    cuda_capability,
    dtype_name,
    host_read_possible,
    PlanCache,
    cdiv,
    launch_device,
    meta,
    mode_key,
    tf32_allowed,
    use_triton,
)
from bertfast.kernels import _launch
from bertfast.kernels._launch import launched

if HAS_TRITON:
    import triton
    import triton.language as tl

    # The Triton interpreter (3.6 - 3.9) multiplies bf16 dot operands as their raw uint16 bits.
    # Under the interpreter only, bf16 operands are widened to fp32 first (exact: a bf16 x bf16
    # product is exact in fp32, as on the tensor cores).  False for compiled kernels.
    _BF16_DOT_VIA_FP32 = tl.constexpr(INTERPRET)
else:  # pragma: no cover
    triton = None
    tl = None

# Launch contract, so that the kernel the runtime JIT builds is exactly the one compile_specs
# lists (no data-dependent specialisation): every pointer argument is 16-byte aligned and every
# batch / head / row stride of q, k, v, o, dO, the gradients and the row statistics is a multiple
# of 16 elements (the launchers copy an input that is not: see _aligned); the integers that can
# take any value (sizes, the unit stride of the statistics, mask strides) are not specialised.
_NO_SPECIALIZE = ["sts", "smb", "smh", "smq", "smk", "skv", "scu", "H", "S"]

OP = "attention"
OP_VARLEN = "attention_varlen"
HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634

# mask kinds (constexpr MASK_KIND).  No mask and a right-padding mask share one variant: the
# kernel reads a per-batch key length ``min(KVLEN[b * skv], S)``; without a mask KVLEN is a
# one-element INT32_MAX tensor with stride 0 (one scalar load per program, nothing per tile).
MASK_LENS = 0  # no mask, or a 2-D right-padding mask given as per-batch key lengths
MASK_KEYS = 1  # 2-D arbitrary 0/1 key mask, loaded per key tile (loop bound: last valid key)
MASK_ADD = 2  # 4-D additive float mask, loaded per (query, key) tile
MASK_NONE = MASK_LENS
_MASK_NAMES = {MASK_LENS: "lens/varlen", MASK_KEYS: "keymask", MASK_ADD: "addmask"}


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        # a @ b with fp32 accumulation; IEEE selects exact fp32 products for fp32 inputs
        if _BF16_DOT_VIA_FP32:
            if a.dtype == tl.bfloat16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _mma(a, b, acc, IEEE: tl.constexpr):
        # acc + a @ b
        if _BF16_DOT_VIA_FP32:
            if a.dtype == tl.bfloat16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _add_mask(s, mval):
        # s (log2 units) + additive mask (natural units).  -inf in the mask masks the key;
        # finite values stay finite: they are clamped at -2e38 first so that fp32 finfo.min *
        # log2(e) does not overflow to -inf (a row masked with finfo.min everywhere is uniform,
        # as in the reference, not zero).
        t = s + tl.maximum(mval, -2.0e38) * 1.4426950408889634
        return tl.where(mval == float("-inf"), float("-inf"), t)

    @triton.jit
    def _seq_bounds(CU, scu, KVLEN, skv, b, S, MASK_KIND: tl.constexpr):
        # (first row, query rows, valid keys) of sequence b.  Padded and packed (varlen) inputs
        # share one code path: padded launches pass CU = [0, INT32_MAX] with scu = 0 (rows
        # 0 .. S-1 of every batch), varlen launches pass cu_seqlens with scu = 1 and S =
        # max_seqlen.  Key lengths: KVLEN[b * skv], INT32_MAX with skv = 0 when there is none.
        row0 = tl.load(CU + b * scu)
        seqlen = tl.minimum(tl.load(CU + b * scu + 1) - row0, S)
        if MASK_KIND == 2:
            kv_len = seqlen
        else:
            kv_len = tl.minimum(tl.load(KVLEN + b * skv), seqlen)
        return row0.to(tl.int64), seqlen, kv_len

    @triton.jit
    def _key_bounds(start_m, seqlen, kv_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        # key loop bounds of the query tile starting at start_m: keys [0, full_end) need no
        # masking, [full_end, kv_end) do (bounds, causal diagonal); both 0 for a query tile past
        # the end of its sequence (varlen)
        kv_end = kv_len
        if CAUSAL:
            kv_end = tl.minimum(kv_end, start_m + BLOCK_M)
            full_end = tl.minimum(kv_len, start_m + 1)
        else:
            full_end = kv_len
        kv_end = tl.where(start_m < seqlen, kv_end, 0)
        full_end = tl.where(start_m < seqlen, (full_end // BLOCK_N) * BLOCK_N, 0)
        return full_end, kv_end

    @triton.jit
    def _mask_base(MASK, b64, h64, smb, smh, MASK_KIND: tl.constexpr):
        # the additive 4-D mask has a head stride; the 2-D key mask does not
        if MASK_KIND == 2:
            return MASK + b64 * smb + h64 * smh
        else:
            return MASK + b64 * smb

    @triton.jit
    def _kv_scores(q, k_base, v_base, msk_base, start_n, offs_m, offs_d, row_ok, kv_end, sks, svs, smq, smk,
                   qk_scale, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                   BOUNDS: tl.constexpr, IEEE: tl.constexpr):
        # the K and V tiles starting at key start_n, and the masked scores s = q k^T * qk_scale
        # (log2 units) of the query tile: -inf where a key is masked (padding, key mask,
        # additive -inf, past kv_end, causal).  BOUNDS: this tile needs bounds / causal masking.
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * sks + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * svs + offs_d[None, :]
        if BOUNDS:
            kv_ok = offs_n < kv_end
            k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = _mm(q, tl.trans(k), IEEE) * qk_scale
        if MASK_KIND == 2:
            mp = msk_base + offs_m[:, None] * smq + offs_n[None, :] * smk
            if BOUNDS:
                mval = tl.load(mp, mask=row_ok[:, None] & kv_ok[None, :], other=0.0)
            else:
                mval = tl.load(mp, mask=row_ok[:, None], other=0.0)
            s = _add_mask(s, mval)
        if MASK_KIND == 1:
            if BOUNDS:
                km = tl.load(msk_base + offs_n * smk, mask=kv_ok, other=0)
            else:
                km = tl.load(msk_base + offs_n * smk)
            s = tl.where((km != 0)[None, :], s, float("-inf"))
        if BOUNDS:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(ok, s, float("-inf"))
        return k, v, s

    @triton.jit
    def _fwd_step(acc, m_i, l_i, q, k_base, v_base, msk_base, start_n, offs_m, offs_d, row_ok, kv_end,
                  seqlen, sks, svs, smq, smk, qk_scale,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                  BOUNDS: tl.constexpr, IEEE: tl.constexpr):
        k, v, s = _kv_scores(q, k_base, v_base, msk_base, start_n, offs_m, offs_d, row_ok, kv_end, sks, svs,
                             smq, smk, qk_scale, BLOCK_N, CAUSAL, MASK_KIND, BOUNDS, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if BOUNDS or MASK_KIND >= 1:
            # a row with no visible key so far keeps m = -inf: shift by 0 instead (p = 0)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _mma(p.to(v.dtype), v, acc, IEEE)
        return acc, m_new, l_i

    @launched(do_not_specialize=_NO_SPECIALIZE)
    def _attn_fwd(Q, K, V, O, M_OUT, L_OUT, MASK, KVLEN, CU,
                  sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                  stb, sth, sts, smb, smh, smq, smk, skv, scu,
                  H, S, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        if CAUSAL:  # heaviest query tiles first
            pid_m = tl.num_programs(0) - 1 - pid_m
        h = tl.program_id(1)
        b = tl.program_id(2)
        row0, seqlen, kv_len = _seq_bounds(CU, scu, KVLEN, skv, b, S, MASK_KIND)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seqlen

        q_base = Q + b64 * sqb + h64 * sqh + row0 * sqs
        q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        k_base = K + b64 * skb + h64 * skh + row0 * sks
        v_base = V + b64 * svb + h64 * svh + row0 * svs
        msk_base = _mask_base(MASK, b64, h64, smb, smh, MASK_KIND)

        full_end, kv_end = _key_bounds(start_m, seqlen, kv_len, BLOCK_M, BLOCK_N, CAUSAL)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start_n in range(0, full_end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, msk_base, start_n, offs_m, offs_d,
                                      row_ok, kv_end, seqlen, sks, svs, smq, smk, qk_scale,
                                      BLOCK_N, CAUSAL, MASK_KIND, False, IEEE)
        for start_n in range(full_end, kv_end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, msk_base, start_n, offs_m, offs_d,
                                      row_ok, kv_end, seqlen, sks, svs, smq, smk, qk_scale,
                                      BLOCK_N, CAUSAL, MASK_KIND, True, IEEE)

        has = l_i > 0.0
        inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
        m_st = tl.where(m_i == float("-inf"), 0.0, m_i)
        out = acc * inv_l[:, None]
        o_base = O + b64 * sob + h64 * soh + row0 * sos
        tl.store(o_base + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
        st = b64 * stb + h64 * sth + (row0 + offs_m) * sts
        tl.store(M_OUT + st, m_st, mask=row_ok)
        tl.store(L_OUT + st, inv_l, mask=row_ok)

    @launched(do_not_specialize=["sts", "H", "S"])
    def _attn_bwd_pre(O, DO, DELTA, sob, soh, sos, sdb, sdh, sds, stb, sth, sts, H, S,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        # delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < S
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + b * stb + h * sth + offs_m * sts, delta, mask=row_ok)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, q_base, do_base, st_base, msk_base, start_m, offs_n, offs_d, seqlen,
                   sqs, sdos, sts, smq, smk, qk_scale,
                   BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDS: tl.constexpr, IEEE: tl.constexpr,
                   M_IN, L_IN, DELTA):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen
        q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # rows past the sequence load m = 0, 1/l = 0: their p is 0
        m = tl.load(M_IN + st_base + offs_m * sts, mask=row_ok, other=0.0)
        il = tl.load(L_IN + st_base + offs_m * sts, mask=row_ok, other=0.0)
        dl = tl.load(DELTA + st_base + offs_m * sts, mask=row_ok, other=0.0)
        sT = _mm(k, tl.trans(q), IEEE) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASK_KIND == 2:
            mp = msk_base + offs_m[None, :] * smq + offs_n[:, None] * smk
            mval = tl.load(mp, mask=row_ok[None, :] & (offs_n < seqlen)[:, None], other=float("-inf"))
            sT = _add_mask(sT, mval)
        if BOUNDS:  # causal diagonal tiles
            sT = tl.where(offs_m[None, :] >= offs_n[:, None], sT, float("-inf"))
        pT = tl.math.exp2(sT - m[None, :]) * il[None, :]
        dv = _mma(pT.to(do.dtype), do, dv, IEEE)
        dpT = _mm(v, tl.trans(do), IEEE)
        dsT = pT * (dpT - dl[None, :])
        dk = _mma(dsT.to(q.dtype), q, dk, IEEE)
        return dk, dv

    @launched(do_not_specialize=_NO_SPECIALIZE)
    def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, M_IN, L_IN, DELTA, MASK, KVLEN, CU,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, sgb, sgh, sgs,
                       stb, sth, sts, smb, smh, smq, smk, skv, scu,
                       H, S, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr):
        # one program per (BLOCK_N keys, head, batch); dK, dV share the strides sg*
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        row0, seqlen, kv_len = _seq_bounds(CU, scu, KVLEN, skv, b, S, MASK_KIND)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        key_in = offs_n < kv_len
        k = tl.load(K + b64 * skb + h64 * skh + row0 * sks + offs_n[:, None] * sks + offs_d[None, :],
                    mask=key_in[:, None], other=0.0)
        v = tl.load(V + b64 * svb + h64 * svh + row0 * svs + offs_n[:, None] * svs + offs_d[None, :],
                    mask=key_in[:, None], other=0.0)
        q_base = Q + b64 * sqb + h64 * sqh + row0 * sqs
        do_base = DO + b64 * sdob + h64 * sdoh + row0 * sdos
        st_base = b64 * stb + h64 * sth + row0 * sts
        msk_base = _mask_base(MASK, b64, h64, smb, smh, MASK_KIND)

        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        q_end = tl.where(start_n < kv_len, seqlen, 0)  # key tile entirely padding: skip
        if CAUSAL:
            # query tiles [q_lo, q_mid) straddle the diagonal; from q_mid on every query sees every key
            q_lo = (start_n // BLOCK_M) * BLOCK_M
            q_mid = ((start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
            for start_m in range(q_lo, tl.minimum(q_mid, q_end), BLOCK_M):
                start_m = tl.multiple_of(start_m, BLOCK_M)
                dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, st_base, msk_base, start_m, offs_n, offs_d,
                                    seqlen, sqs, sdos, sts, smq, smk, qk_scale,
                                    BLOCK_M, MASK_KIND, True, IEEE, M_IN, L_IN, DELTA)
        else:
            q_mid = 0
        for start_m in range(q_mid, q_end, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, st_base, msk_base, start_m, offs_n, offs_d,
                                seqlen, sqs, sdos, sts, smq, smk, qk_scale,
                                BLOCK_M, MASK_KIND, False, IEEE, M_IN, L_IN, DELTA)

        # key validity (padding, arbitrary key mask) only touches the rows of dK / dV of that key
        key_ok = key_in
        if MASK_KIND == 1:
            km = tl.load(MASK + b64 * smb + offs_n * smk, mask=key_in, other=0)
            key_ok = key_ok & (km != 0)
        dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
        g = b64 * sgb + h64 * sgh + row0 * sgs + offs_n[:, None] * sgs + offs_d[None, :]
        store_ok = (offs_n < seqlen)[:, None]
        tl.store(DK + g, dk.to(DK.dtype.element_ty), mask=store_ok)
        tl.store(DV + g, dv.to(DV.dtype.element_ty), mask=store_ok)

    @triton.jit
    def _dq_step(dq, q, do, m, il, dl, k_base, v_base, msk_base, start_n, offs_m, offs_d, row_ok, kv_end,
                 sks, svs, smq, smk, qk_scale,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                 BOUNDS: tl.constexpr, IEEE: tl.constexpr):
        k, v, s = _kv_scores(q, k_base, v_base, msk_base, start_n, offs_m, offs_d, row_ok, kv_end, sks, svs,
                             smq, smk, qk_scale, BLOCK_N, CAUSAL, MASK_KIND, BOUNDS, IEEE)
        p = tl.math.exp2(s - m[:, None]) * il[:, None]
        dp = _mm(do, tl.trans(v), IEEE)
        ds = p * (dp - dl[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, IEEE)
        return dq

    @launched(do_not_specialize=_NO_SPECIALIZE)
    def _attn_bwd_dq(Q, K, V, DO, DQ, M_IN, L_IN, DELTA, MASK, KVLEN, CU,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, sgb, sgh, sgs,
                     stb, sth, sts, smb, smh, smq, smk, skv, scu,
                     H, S, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr):
        # one program per (BLOCK_M queries, head, batch)
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        h = tl.program_id(1)
        b = tl.program_id(2)
        row0, seqlen, kv_len = _seq_bounds(CU, scu, KVLEN, skv, b, S, MASK_KIND)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seqlen
        q = tl.load(Q + b64 * sqb + h64 * sqh + row0 * sqs + offs_m[:, None] * sqs + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b64 * sdob + h64 * sdoh + row0 * sdos + offs_m[:, None] * sdos + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        st = b64 * stb + h64 * sth + (row0 + offs_m) * sts
        m = tl.load(M_IN + st, mask=row_ok, other=0.0)
        il = tl.load(L_IN + st, mask=row_ok, other=0.0)
        dl = tl.load(DELTA + st, mask=row_ok, other=0.0)
        k_base = K + b64 * skb + h64 * skh + row0 * sks
        v_base = V + b64 * svb + h64 * svh + row0 * svs
        msk_base = _mask_base(MASK, b64, h64, smb, smh, MASK_KIND)

        full_end, kv_end = _key_bounds(start_m, seqlen, kv_len, BLOCK_M, BLOCK_N, CAUSAL)

        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start_n in range(0, full_end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            dq = _dq_step(dq, q, do, m, il, dl, k_base, v_base, msk_base, start_n, offs_m, offs_d, row_ok, kv_end,
                          sks, svs, smq, smk, qk_scale, BLOCK_N, CAUSAL, MASK_KIND, False, IEEE)
        for start_n in range(full_end, kv_end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            dq = _dq_step(dq, q, do, m, il, dl, k_base, v_base, msk_base, start_n, offs_m, offs_d, row_ok, kv_end,
                          sks, svs, smq, smk, qk_scale, BLOCK_N, CAUSAL, MASK_KIND, True, IEEE)
        dq = dq * sm_scale
        tl.store(DQ + b64 * sgb + h64 * sgh + row0 * sgs + offs_m[:, None] * sgs + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------
class Config(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# (D, dtype group) -> {kernel: Config}; dtype group "16" = fp16/bf16 (tensor cores), "32" = fp32.
# Chosen for H100 (sm_90, wgmma: 8 warps = 2 warpgroups of 64 query rows) first, A100 (sm_80,
# mma.sync) second; every entry compiles for its arch without spills under triton 3.9 (python -m
# bertfast.kernels.compile_check --op attention).  Under triton 3.6 a few variants spill with these; where a
# measured spill-free choice exists, ``_OLD_PTXAS_CONFIGS`` (below) replaces the entry there.
_CONFIGS_SM90 = {
    (32, "16"): dict(fwd=Config(128, 128, 8, 3), dkdv=Config(64, 128, 8, 2), dq=Config(128, 64, 8, 2)),
    (64, "16"): dict(fwd=Config(128, 128, 8, 3), dkdv=Config(64, 128, 8, 2), dq=Config(128, 64, 8, 2)),
    (128, "16"): dict(fwd=Config(128, 64, 8, 3), dkdv=Config(64, 64, 8, 2), dq=Config(64, 64, 4, 2)),
    # fp32 (FMA for IEEE, tf32 mma otherwise): operand tiles live in registers.  With IEEE dots
    # none of these spills under triton 3.6 (the ptxas it bundles) or 3.9; the 4-warp 64x32 /
    # 32x64 tiles used before spilled 0.3 - 16 KB under 3.6.  With TF32 a few masked variants
    # spill 4 - 36 bytes under 3.6.
    (32, "32"): dict(fwd=Config(64, 32, 8, 2), dkdv=Config(32, 32, 8, 2), dq=Config(32, 32, 8, 2)),
    (64, "32"): dict(fwd=Config(64, 32, 8, 2), dkdv=Config(32, 32, 8, 2), dq=Config(64, 32, 8, 2)),
    (128, "32"): dict(fwd=Config(16, 32, 8, 2), dkdv=Config(16, 32, 8, 2), dq=Config(16, 32, 8, 2)),
}
_CONFIGS_SM80 = {
    (32, "16"): dict(fwd=Config(128, 64, 8, 2), dkdv=Config(32, 128, 8, 2), dq=Config(64, 64, 8, 2)),
    (64, "16"): dict(fwd=Config(128, 64, 8, 3), dkdv=Config(32, 128, 8, 2), dq=Config(64, 64, 8, 2)),
    (128, "16"): dict(fwd=Config(64, 64, 8, 2), dkdv=Config(32, 64, 8, 2), dq=Config(64, 64, 8, 2)),
    (32, "32"): dict(fwd=Config(64, 32, 8, 2), dkdv=Config(32, 32, 4, 2), dq=Config(32, 32, 4, 2)),
    (64, "32"): dict(fwd=Config(64, 32, 8, 2), dkdv=Config(32, 32, 4, 2), dq=Config(64, 32, 8, 2)),
    (128, "32"): dict(fwd=Config(16, 32, 8, 2), dkdv=Config(16, 32, 4, 2), dq=Config(16, 32, 4, 2)),
}
# Under triton < 3.9 (``bertfast.kernels._compile.OLD_PTXAS``: 3.6.0 is what the GPU machines run) its
# ptxas spills in a few entries above; these replace them there (triton 3.9 keeps the table: no spill).
# Key: (arch family, D, dtype group, kernel, additive mask: True = only with the 4-D additive mask,
# False = only without it, None = every mask kind).  Measured with triton 3.6.0 (``python -m
# bertfast.kernels.compile_check --op attention``; registers, spill-store bytes, every mask kind / causal
# the key covers):
# * sm_90 D=128 fp16/bf16 dK/dV, additive mask: 64x64 spills 36 B (255 regs, causal) -> 32 query
#   rows a step: 202 - 224 regs, no spill, wgmma kept;
# * sm_90 D=32 fp32 dK/dV, additive mask: 32x32 spills 36 B (TF32, causal; 4 warps still 4 - 8 B)
#   -> 16 query rows a step: 80 - 255 regs, no spill;
# * sm_90 D=32 fp32 dQ: 8 warps spill 4 - 8 B (TF32, key mask) -> 4 warps: 80 - 199 regs;
# * sm_90 D=128 fp32 forward without additive mask: 2 stages spill 4 B (TF32, causal, 80 regs)
#   -> 1 stage: 60 - 126 regs, no spill (with the additive mask 1 stage spills 24 B; 2 do not);
# * sm_80 D=64 fp16/bf16 dK/dV, additive mask: 32x128 spills 8 B (255 regs, causal; 32x64 too)
#   -> 16 query rows a step: 186 - 195 regs, no spill;
# * sm_80 D=64 fp32 dK/dV: 32x32 with 4 warps spills 1148 - 1452 B (IEEE, causal) -> 8 warps:
#   80 - 180 regs (IEEE and TF32), no spill;
# * sm_80 D=32 fp16/bf16 forward: 128x64 spills 20 B (128 regs, key mask) -> 128x32 (32 keys a step):
#   98 - 128 regs, no spill (every mask kind);
# * sm_80 D=32 / 64 fp32 forward, additive mask: 64x32 spills 8 B (IEEE, causal) / 28 B (TF32)
#   -> 32 query rows: 64 - 128 regs, no spill;
# * sm_80 D=32 fp32 dQ, additive mask: 4 warps spill 8 B (TF32, causal) -> 8 warps: 80 - 170 regs.
_OLD_PTXAS_CONFIGS = {
    (9, 128, "16", "dkdv", True): Config(32, 64, 8, 2),
    (9, 32, "32", "dkdv", True): Config(16, 32, 8, 2),
    (9, 32, "32", "dq", None): Config(32, 32, 4, 2),
    (9, 128, "32", "fwd", False): Config(16, 32, 8, 1),
    (8, 32, "16", "fwd", None): Config(128, 32, 8, 2),
    (8, 64, "16", "dkdv", True): Config(16, 128, 8, 2),
    (8, 32, "32", "fwd", True): Config(32, 32, 8, 2),
    (8, 64, "32", "fwd", True): Config(32, 32, 8, 2),
    (8, 32, "32", "dq", True): Config(32, 32, 8, 2),
    (8, 64, "32", "dkdv", None): Config(32, 32, 8, 2),
}
# Under the interpreter: small tiles (fast on CPU) that still leave partial tiles at S = 7, 77,
# 200, cover BLOCK_M != BLOCK_N (so causal diagonals span several tiles) and run the same code.
_INTERPRET_CONFIG = dict(fwd=Config(32, 16, 4, 1), dkdv=Config(16, 32, 4, 1), dq=Config(32, 16, 4, 1))
_PRE_ROWS = 4096  # delta preprocess: BLOCK_M * D elements per program (32 fp32 / thread / tensor)

# Tuning candidates for the forward of short sequences (max length <= SHORT_SEQ, padded or varlen),
# fp16 / bf16: at S = 128 the default 128-row tile gives one program per (batch, head), so
# B * H programs in all (96 at batch 8 with 12 heads, fewer than the SMs).  64-row tiles with one
# warpgroup (4 warps) double the programs; the tuner times them against the default
# (``attention_candidates``).  Every entry offered compiles without spills for its arch under
# triton 3.6 and 3.9 in every mask / causal / dtype variant
# (``python -m bertfast.kernels.compile_check --op tuning-full``).
SHORT_SEQ = 128
_SHORT_SM90 = {
    32: (Config(64, 64, 4, 2), Config(64, 128, 4, 2)),
    64: (Config(64, 64, 4, 2), Config(64, 128, 4, 2)),
    128: (Config(64, 64, 4, 2),),
}
_SHORT_SM80 = {
    32: (Config(64, 64, 4, 2), Config(32, 64, 4, 2)),
    64: (Config(64, 64, 4, 2), Config(32, 64, 4, 2)),
    128: (Config(64, 32, 4, 2),),  # 32x64 spills 8 - 16 B at D = 128 (triton 3.6 and 3.9)
}
# (arch family, D) where the short tiles spill with the 4-D additive mask: sm_80 D = 64 under
# triton 3.6 (4 B: 32x64, and 64x64 with causal).  No short tiles are offered there.
_SHORT_NO_ADDMASK = {(8, 64)}


class TuneContext(NamedTuple):
    """What the tuner needs, besides the arguments of ``attention_config``, to time forward
    tiles on first use of a shape class: the launch's device and the rest of its problem."""

    device: torch.device
    batch: int
    heads: int
    causal: bool
    mask_kind: int
    varlen: bool


def attention_candidates(head_dim: int, dtype: torch.dtype, seqlen: int, capability: tuple[int, int],
                         additive_mask: bool = False) -> tuple:
    """Forward configurations the tuner may time for this problem, the default table's first:
    plus the short-sequence tiles for fp16 / bf16 when ``seqlen <= SHORT_SEQ``."""
    default = _table_config(head_dim, dtype, capability, additive_mask)["fwd"]
    out = [default]
    family = 9 if capability[0] >= 9 else 8
    if dtype != torch.float32 and seqlen <= SHORT_SEQ and not (additive_mask and (family, head_dim) in _SHORT_NO_ADDMASK):
        table = _SHORT_SM90 if family == 9 else _SHORT_SM80
        for c in table.get(head_dim, ()):
            c = c._replace(num_stages=min(c.num_stages, 2)) if additive_mask else c
            if c not in out:
                out.append(c)
    return tuple(out)


def config_name(c: Config) -> str:
    """Stable spelling of a forward configuration (the tuning cache stores it)."""
    return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"


def attention_config(head_dim: int, dtype: torch.dtype, seqlen: int, capability: tuple[int, int],
                     interpret: bool = INTERPRET, additive_mask: bool = False,
                     tune: Optional[TuneContext] = None) -> dict[str, Config]:
    """Block sizes for every attention kernel: keys "fwd", "dkdv", "dq" (block_m = query rows,
    block_n = key rows) and "pre" (delta preprocess).  Without ``tune``, deterministic in
    (head_dim, dtype, capability); ``seqlen`` only matters to the tuner's candidates
    (``attention_candidates``: short-sequence tiles).  ``additive_mask``: the 4-D-mask variant also
    pipelines an fp32 (BLOCK_M, BLOCK_N) mask tile per key tile, so it keeps at most two
    stages (shared memory).  ``tune``: the launch's problem; the forward tile is then the
    tuner's stored (or, when enabled, measured) choice among ``attention_candidates``
    (``bertfast.kernels.tuning``), the table's otherwise."""
    if interpret:
        cfg = dict(_INTERPRET_CONFIG)
        cfg["pre"] = Config(_PRE_ROWS // head_dim, head_dim, 4, 1)
        return cfg
    cfg = _table_config(head_dim, dtype, capability, additive_mask)
    if tune is not None and tune.device.type == "cuda":
        from bertfast.kernels import tuning

        cfg["fwd"] = tuning.attention_choice(head_dim, dtype, seqlen, capability, additive_mask, tune)
    return cfg


def _table_config(head_dim: int, dtype: torch.dtype, capability: tuple[int, int], additive_mask: bool) -> dict:
    """The default tables' block sizes for a GPU (see ``attention_config``)."""
    from bertfast.kernels._compile import OLD_PTXAS

    group = "32" if dtype == torch.float32 else "16"
    family = 9 if capability[0] >= 9 else 8
    table = _CONFIGS_SM90 if family == 9 else _CONFIGS_SM80
    cfg = dict(table[(head_dim, group)])
    if additive_mask:
        cfg = {k: c._replace(num_stages=min(c.num_stages, 2)) for k, c in cfg.items()}
    if OLD_PTXAS:
        for kernel in cfg:
            for key in ((family, head_dim, group, kernel, None), (family, head_dim, group, kernel, additive_mask)):
                cfg[kernel] = _OLD_PTXAS_CONFIGS.get(key, cfg[kernel])
    cfg["pre"] = Config(_PRE_ROWS // head_dim, head_dim, 4, 1)
    return cfg


# --------------------------------------------------------------------------------------------
# Host side: argument checks, mask preparation, launches
# --------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """Everything the kernels need besides q, k, v (shared by forward and backward)."""

    varlen: bool
    batch: int
    heads: int
    seqlen: int  # padded: S; varlen: max_seqlen (grid size)
    head_dim: int
    mask_kind: int
    mask: Optional[torch.Tensor]  # int8 (B, S) for MASK_KEYS, fp32 expanded (B, H, S, S) for MASK_ADD
    mask_strides: tuple  # (smb, smh, smq, smk)
    kvlen: Optional[torch.Tensor]  # int32 (B,) for MASK_LENS / MASK_KEYS
    cu: Optional[torch.Tensor]  # int32 (B + 1,) for varlen
    total: int  # varlen: total tokens
    causal: bool
    scale: float
    ieee: bool
    cfg: dict
    # the compiled forward kernel by tensor alignment (``Kernel.planned``), where every other launch
    # argument is fixed by the plan: the template of a prepared-mask case, for a call whose q, k, v
    # and mask are used in place (no alignment copy); None: launch through the full key
    memo: Optional[dict] = None


def _dtype_name(dt) -> str:
    return dtype_name(dt)


def supports_head_dim(d) -> bool:
    """Whether the attention kernels (``attention``, ``attention_varlen``) run head dim ``d``
    (``HEAD_DIMS`` = (32, 64, 128)); model code asks this when it picks a backend instead of
    keeping its own list.  Other head dims raise ``ValueError`` from the launchers."""
    if isinstance(d, bool):
        return False
    try:
        d = operator.index(d)  # python / numpy ints; not floats or strings
    except TypeError:
        return False
    return d in HEAD_DIMS


def _check_head_dim(op: str, d: int) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"{op}: head dim D={d} is not supported; expected one of {HEAD_DIMS}")


def _check_scale(op: str, scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return scale


class AttentionMask(NamedTuple):
    """An attention mask analysed once, for any number of ``attention`` calls (e.g. every layer
    of one encoder forward).  Made by ``prepare_attention_mask``; pass it as ``attention_mask``
    to ``attention`` / ``bertfast.kernels.ops.attention`` in place of the raw mask.  It holds what the
    kernels read, computed from the mask's values when it was prepared (fresh tensors, except an
    fp32 4-D mask, which is used in place): after changing a mask's values, prepare it again.
    There is no hidden cache: what a call uses is what this object holds.

    * ``kind``: ``MASK_LENS`` (no mask when ``kvlen`` is None, else right padding given as
      per-batch key lengths), ``MASK_KEYS`` (arbitrary 0/1 key mask, read per key tile) or
      ``MASK_ADD`` (4-D additive float mask).
    * ``mask``: int8 (B, S) key mask (``MASK_KEYS``), fp32 4-D additive mask broadcastable to
      (B, H, S, S) (``MASK_ADD``, ``-inf`` = masked), else None.
    * ``kvlen``: int32 (B,): key lengths (``MASK_LENS``) or the key loop bound, last valid key
      + 1 (``MASK_KEYS``); None otherwise.
    * ``batch``, ``seqlen``: the (B, S) it was prepared for; ``heads``: H, or None (any H).
    """

    kind: int
    mask: Optional[torch.Tensor]
    kvlen: Optional[torch.Tensor]
    batch: int
    heads: Optional[int]
    seqlen: int

    @property
    def is_empty(self) -> bool:
        """True when nothing is masked (no mask, or a 2-D mask the analysis found all ones)."""
        return self.kind == MASK_LENS and self.kvlen is None

    def dense(self) -> Optional[torch.Tensor]:
        """An ordinary mask with the same meaning, for ``attention_reference``: None, a bool
        (B, S) key mask (True = attend) or the 4-D additive mask."""
        if self.kind == MASK_LENS:
            if self.kvlen is None:
                return None
            pos = torch.arange(self.seqlen, device=self.kvlen.device)
            return pos[None, :] < self.kvlen[:, None].to(torch.int64)
        if self.kind == MASK_KEYS:
            return self.mask != 0
        return self.mask


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _host_read_possible(device) -> bool:
    """``host_read_possible``, with this module's ``_capturing`` (the seam the capture tests use)."""
    return host_read_possible(device) and not _capturing(device)


def prepare_attention_mask(mask, batch: int, heads: Optional[int], seqlen: int, *,
                           analyze: Optional[bool] = None) -> AttentionMask:
    """Turn an ``attention`` mask (None, 2-D (B, S) 0/1 key mask, 4-D additive / bool mask
    broadcastable to (B, H, S, S)) into an ``AttentionMask``; see ``attention`` for the masking
    rules.  ``heads`` may be None (any H).  An ``AttentionMask`` is checked against (B, H, S) and
    returned as is.

    A 2-D mask is *analysed* (its values read on the host: one synchronisation) when ``analyze``
    is True, or when it is None (the default) and values are checked (outside
    ``bertfast.kernels._common.trusted_inputs()``): the values must be 0 / 1 (``ValueError`` otherwise),
    an all-ones mask becomes no mask and a right-padding (prefix) mask becomes per-batch key
    lengths (``MASK_LENS``, the fastest variant).  Without analysis (``analyze=False``, trusted
    mode with the default, and always while ``torch.compile`` traces or a CUDA graph is being
    captured, where a host read is impossible) nothing is read on the host: the mask becomes a
    per-key-tile mask (``MASK_KEYS``, correct for every mask) made by device ops only, so that a
    captured graph recomputes it from the mask buffer at every replay.  4-D masks are converted
    on the device (never read on the host)."""
    b, h, s = batch, heads, seqlen  # not int(): symbolic sizes while torch.compile traces
    if mask is None:
        return AttentionMask(MASK_NONE, None, None, b, h, s)
    if isinstance(mask, AttentionMask):
        dev = mask.mask.device if mask.mask is not None else (mask.kvlen.device if mask.kvlen is not None else None)
        return _check_prepared(mask, b, h, s, dev)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{OP}: attention_mask must be a tensor or an AttentionMask, got {type(mask).__name__}")
    if mask.dim() == 2:
        if analyze is None:
            analyze = check_values()
        read = bool(analyze) and _host_read_possible(mask.device)
        kind, m, kvlen = _prepare_mask_2d(mask, b, s, mask.device, read)
        return AttentionMask(kind, m, kvlen, b, h, s)
    add = _prepare_mask_4d(mask, b, h, s, mask.device)
    return AttentionMask(MASK_ADD, add, None, b, h, s)


def _check_prepared(pm: AttentionMask, b: int, h: Optional[int], s: int, device) -> AttentionMask:
    """A prepared mask used for a (B, H, S) call on ``device``: kind, shapes, dtypes, device
    (no values read)."""
    if (pm.batch, pm.seqlen) != (b, s):
        raise ValueError(f"{OP}: the AttentionMask was prepared for (B, S) = {(pm.batch, pm.seqlen)}; "
                         f"this call has (B, S) = {(b, s)}")
    if h is not None and pm.heads is not None and pm.heads != h:
        raise ValueError(f"{OP}: the AttentionMask was prepared for H = {pm.heads}; this call has H = {h}")
    # kind -> (mask dtype, mask shape, kvlen dtype); None: must be absent
    layout = {MASK_LENS: (None, None, torch.int32), MASK_KEYS: (torch.int8, (b, s), torch.int32),
              MASK_ADD: (torch.float32, None, None)}
    if pm.kind not in layout:
        raise ValueError(f"{OP}: AttentionMask.kind must be MASK_LENS, MASK_KEYS or MASK_ADD, got {pm.kind!r}")
    mdt, mshape, kdt = layout[pm.kind]
    name = _MASK_NAMES[pm.kind]
    for field, t, dt, optional in (("mask", pm.mask, mdt, False), ("kvlen", pm.kvlen, kdt, pm.kind == MASK_LENS)):
        if t is None:
            if dt is not None and not optional:
                raise ValueError(f"{OP}: an AttentionMask of kind {name} needs a {field} tensor")
            continue
        if dt is None:
            raise ValueError(f"{OP}: an AttentionMask of kind {name} has no {field} (got a tensor)")
        if not isinstance(t, torch.Tensor) or t.dtype != dt:
            raise ValueError(f"{OP}: AttentionMask.{field} must be a {_dtype_name(dt)} tensor")
        if device is not None and t.device != device:
            raise ValueError(f"{OP}: AttentionMask.{field} is on {t.device} but q is on {device}")
    if pm.kvlen is not None and tuple(pm.kvlen.shape) != (b,):
        raise ValueError(f"{OP}: AttentionMask.kvlen has shape {tuple(pm.kvlen.shape)}; expected (B,) = {(b,)}")
    if mshape is not None and tuple(pm.mask.shape) != mshape:
        raise ValueError(f"{OP}: AttentionMask.mask has shape {tuple(pm.mask.shape)}; expected (B, S) = {mshape}")
    if pm.kind == MASK_ADD:
        if pm.mask.dim() != 4:
            raise ValueError(f"{OP}: AttentionMask.mask of kind addmask must be 4-D, got {tuple(pm.mask.shape)}")
        _check_broadcast_4d(pm.mask, b, h, s)
    return pm


def _prepare_mask_2d(mask: torch.Tensor, b: int, s: int, device, read: bool) -> tuple:
    """2-D 0/1 key mask -> (kind, int8 key mask or None, kvlen or None).  ``read``: analyse the
    values on the host (one synchronisation): no mask (all valid), key lengths (right padding)
    or a per-key mask; otherwise always the per-key mask, from device ops only."""
    if tuple(mask.shape) != (b, s):
        raise ValueError(f"{OP}: 2-D attention_mask has shape {tuple(mask.shape)}; expected (B, S) = {(b, s)}")
    if mask.is_complex():
        raise ValueError(f"{OP}: attention_mask must be bool, integer or float, got {_dtype_name(mask.dtype)}")
    if b == 0 or s == 0:  # no query and no key: nothing to mask
        return MASK_NONE, None, None
    valid = mask != 0
    pos = torch.arange(s, device=device)
    if not read:
        # no host read, so no prefix analysis either; the per-key-tile mask is correct for every
        # mask, and the key loop still stops after the last valid key (computed on the device)
        return _key_mask(valid, pos)
    lens = valid.sum(1, dtype=torch.int32)
    prefix = (valid == (pos[None, :] < lens[:, None])).all()
    binary = ((mask == 0) | (mask == 1)).all() if mask.dtype != torch.bool else torch.ones((), dtype=torch.bool, device=device)
    full = (lens == s).all()
    is_prefix, is_binary, is_full = torch.stack([prefix, binary, full]).tolist()
    if not is_binary:
        raise ValueError(
            f"{OP}: 2-D attention_mask must hold only 0 and 1 (1 = attend); for an additive mask pass "
            f"a 4-D tensor broadcastable to (B, H, S, S), e.g. mask[:, None, None, :]"
        )
    if is_full:
        return MASK_NONE, None, None
    if is_prefix:
        return MASK_LENS, None, lens.contiguous()
    return _key_mask(valid, pos)


def _key_mask(valid: torch.Tensor, pos: torch.Tensor) -> tuple:
    last = torch.where(valid, pos[None, :] + 1, 0).amax(1).to(torch.int32).contiguous()  # loop bound
    km = valid.to(torch.int8).contiguous()
    return MASK_KEYS, km, last


def _check_broadcast_4d(mask: torch.Tensor, b: int, h: Optional[int], s: int) -> None:
    want = (b, "H" if h is None else h, s, s)
    for i, (got, w) in enumerate(zip(mask.shape, want)):
        if w != "H" and got != w and got != 1:
            raise ValueError(
                f"{OP}: 4-D attention_mask of shape {tuple(mask.shape)} is not broadcastable to "
                f"(B, H, S, S) = {want} (dim {i})"
            )


def _prepare_mask_4d(mask: torch.Tensor, b: int, h: Optional[int], s: int, device) -> torch.Tensor:
    """4-D mask -> fp32 additive mask, not expanded."""
    if mask.dim() == 4:
        _check_broadcast_4d(mask, b, h, s)
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))
        if mask.dtype.is_floating_point:
            return mask.to(torch.float32)
        raise ValueError(
            f"{OP}: 4-D attention_mask must be an additive float mask (or bool, True = attend), "
            f"got {_dtype_name(mask.dtype)}"
        )
    raise ValueError(
        f"{OP}: attention_mask must be 2-D (B, S) or 4-D broadcastable to (B, H, S, S), got shape {tuple(mask.shape)}"
    )


def _mask_args(pm: AttentionMask, b: int, h: int, s: int) -> tuple:
    """(kind, mask tensor, strides (smb, smh, smq, smk), kvlen): the kernel arguments of a
    prepared mask (a tensor that breaks the launch contract's alignment is copied)."""
    kvlen = pm.kvlen
    if kvlen is not None and (kvlen.data_ptr() % 16 or kvlen.stride(0) != 1):
        kvlen = kvlen.clone(memory_format=torch.contiguous_format)
    if pm.kind == MASK_ADD:
        add = pm.mask
        if add.data_ptr() % 16:
            add = add.clone()
        add = add.expand(b, h, s, s)
        return MASK_ADD, add, tuple(add.stride()), None
    if pm.kind == MASK_KEYS:
        km = pm.mask
        if km.data_ptr() % 16:
            km = km.clone()
        return MASK_KEYS, km, (km.stride(0), 0, 0, km.stride(1)), kvlen
    return MASK_LENS, None, (0, 0, 0, 0), kvlen


def _check_qkv(op: str, q, k, v, want_dim: int):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != want_dim:
            layout = "(B, H, S, D)" if want_dim == 4 else "(total_tokens, H, D)"
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected {layout}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"{op}: q, k, v must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    dtype = check_same_dtype(op, q=q, k=k, v=v)
    check_dtype(op, "q", q, SUPPORTED_DTYPES)
    _check_head_dim(op, q.shape[-1])
    return dtype


def _check_grid(op: str, b: int, h: int) -> None:
    # the launch grid is (query tiles, H, B): CUDA limits grid dims y and z to 65535
    if b > 65535 or h > 65535:
        raise ValueError(f"{op}: batch ({b}) and heads ({h}) must each be at most 65535")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it meets the launch contract (unit last stride, 16-byte aligned data,
    other strides of its non-trivial dims multiples of 16 elements), else a contiguous copy.
    The (3, B, H, S, D) views of qkv_projection and packed (T, [3,] H, D) tokens meet it."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        st % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _st(t: torch.Tensor, dim: int) -> int:
    # the stride of a size-1 dim is never used: pass 0 so that it is 16-divisible like the others
    return t.stride(dim) if t.shape[dim] > 1 else 0


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def _device_ctx(t: torch.Tensor):
    return launch_device(t.device)


def _strides3(t: torch.Tensor, varlen: bool) -> tuple:
    """(batch, head, seq) element strides; the last (D) stride is 1."""
    if varlen:  # (T, H, D)
        return 0, _st(t, 1), _st(t, 0)
    return _st(t, 0), _st(t, 1), _st(t, 2)  # (B, H, S, D)


def _o_strides(t: torch.Tensor, varlen: bool) -> tuple:
    """Strides of an output-layout tensor: (B, S, H, D) or (T, H, D)."""
    if varlen:
        return 0, _st(t, 1), _st(t, 0)
    return _st(t, 0), _st(t, 2), _st(t, 1)


def _stats_strides(t: torch.Tensor, varlen: bool) -> tuple:
    """Per-row statistics (B, H, S16) or (H, T16), rows padded to 16 (the unit stride is last)."""
    if varlen:
        return 0, _st(t, 0), 1
    return _st(t, 0), _st(t, 1), 1


_SENTINEL: dict = {}


def _aux(q: torch.Tensor, plan: _Plan) -> tuple:
    """(mask, kvlen, kvlen stride, cu, cu stride) kernel arguments.  Unused ones get stand-ins
    so that every launch has the signature of its compile spec: a padded launch reads
    CU = [0, INT32_MAX] with stride 0 (every batch: rows 0 .. S-1), no key lengths read INT32_MAX
    with stride 0 (clipped to the sequence length in the kernel)."""
    sentinel = _SENTINEL.get(q.device)
    if sentinel is None:
        # made once per device with device ops (no host copy, so this also works while a CUDA
        # graph is being captured; then they are not cached, since their values are only
        # written when the graph replays).  Two allocations: both pointers 16-byte aligned.
        # They are private and only ever read by the kernels, so no caller can change them; a
        # cached pair is complete before it is shared (the synchronisation below), so another
        # stream, or a graph captured later, only ever reads the finished constants.
        no_lens = torch.full((1,), 2**31 - 1, dtype=torch.int32, device=q.device)
        rows = torch.full((2,), 2**31 - 1, dtype=torch.int32, device=q.device)
        rows[0] = 0
        sentinel = (no_lens, rows)
        if not _capturing(q.device):
            if q.device.type == "cuda":
                torch.cuda.current_stream(q.device).synchronize()  # once per device
            _SENTINEL[q.device] = sentinel
            _launch.constant(*sentinel)  # layer programs (bertfast/program.py) may pass them as they are
    kvlen, skv = (plan.kvlen, 1) if plan.kvlen is not None else (sentinel[0], 0)
    cu, scu = (plan.cu, 1) if plan.cu is not None else (sentinel[1], 0)
    mask = plan.mask if plan.mask is not None else q
    return mask, kvlen, skv, cu, scu


def _forward(q, k, v, plan: _Plan, out: Optional[torch.Tensor]):
    B, H, S, D = plan.batch, plan.heads, plan.seqlen, plan.head_dim
    dev = q.device
    shape = (plan.total, H, D) if plan.varlen else (B, S, H, D)
    # a caller's buffer that breaks the alignment contract gets the result by a copy
    direct = out is not None and out.data_ptr() % 16 == 0
    o = out if direct else torch.empty(shape, dtype=q.dtype, device=dev)
    # row statistics: rows padded to a multiple of 16 so that their strides are 16-divisible
    stats_shape = (2, H, _round16(plan.total)) if plan.varlen else (2, B, H, _round16(S))
    stats = torch.empty(stats_shape, dtype=torch.float32, device=dev)
    m_out, l_out = stats[0], stats[1]
    if o.numel() == 0:
        return (out if out is not None else o), m_out, l_out
    cfg = plan.cfg["fwd"]
    mask, kvlen, skv, cu, scu = _aux(q, plan)
    grid = (cdiv(S, cfg.block_m), H, B)
    args = (q, k, v, o, m_out, l_out, mask, kvlen, cu,
            *_strides3(q, plan.varlen), *_strides3(k, plan.varlen), *_strides3(v, plan.varlen),
            *_o_strides(o, plan.varlen), *_stats_strides(m_out, plan.varlen), *plan.mask_strides, skv, scu,
            H, S, plan.scale * LOG2E)
    kw = dict(HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=plan.causal, MASK_KIND=plan.mask_kind,
              IEEE=plan.ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    with _device_ctx(q):
        if plan.memo is not None and not direct:
            _attn_fwd.planned(plan.memo, grid, args, kw)
        else:
            _attn_fwd[grid](*args, **kw)
    if out is not None and not direct:
        o = out.copy_(o)
    return o, m_out, l_out


def _backward(q, k, v, o, m_in, l_in, do, plan: _Plan):
    B, H, S, D = plan.batch, plan.heads, plan.seqlen, plan.head_dim
    dev = q.device
    do = _aligned(do)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dkv = torch.empty((2, *q.shape), dtype=q.dtype, device=dev)
    dk, dv = dkv[0], dkv[1]
    if q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(m_in)
    vl = plan.varlen
    pre = plan.cfg["pre"]
    with _device_ctx(q):
        # delta: varlen runs as one "batch" of T rows; padded as (B, S) rows
        pb, ps = (1, plan.total) if vl else (B, S)
        _attn_bwd_pre[(cdiv(ps, pre.block_m), H, pb)](
            o, do, delta, *_o_strides(o, vl), *_o_strides(do, vl), *_stats_strides(delta, vl), H, ps,
            HEAD_DIM=D, BLOCK_M=pre.block_m, num_warps=pre.num_warps, num_stages=pre.num_stages,
        )
        mask, kvlen, skv, cu, scu = _aux(q, plan)
        common = dict(HEAD_DIM=D, CAUSAL=plan.causal, MASK_KIND=plan.mask_kind, IEEE=plan.ieee)
        c = plan.cfg["dkdv"]
        _attn_bwd_dkdv[(cdiv(S, c.block_n), H, B)](
            q, k, v, do, dk, dv, m_in, l_in, delta, mask, kvlen, cu,
            *_strides3(q, vl), *_strides3(k, vl), *_strides3(v, vl), *_o_strides(do, vl), *_strides3(dk, vl),
            *_stats_strides(m_in, vl), *plan.mask_strides, skv, scu, H, S, plan.scale * LOG2E, plan.scale,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )
        c = plan.cfg["dq"]
        _attn_bwd_dq[(cdiv(S, c.block_m), H, B)](
            q, k, v, do, dq, m_in, l_in, delta, mask, kvlen, cu,
            *_strides3(q, vl), *_strides3(k, vl), *_strides3(v, vl), *_o_strides(do, vl), *_strides3(dq, vl),
            *_stats_strides(m_in, vl), *plan.mask_strides, skv, scu, H, S, plan.scale * LOG2E, plan.scale,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )
    return dq, dk, dv


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, out):
        o, m, l = _forward(q, k, v, plan, out)
        ctx.save_for_backward(q, k, v, o, m, l)
        ctx.plan = plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, m, l = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, m, l, do, ctx.plan)
        return dq, dk, dv, None, None


def _run(op, q, k, v, plan, out):
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad:
        if out is not None:
            raise ValueError(f"{op}: out= cannot be used when q, k or v requires grad (autograd needs a fresh output)")
        return _AttentionFn.apply(q, k, v, plan, None)
    return _forward(q, k, v, plan, out)[0]


# launch plans of both ops: a _Plan without its tensors (mask, key lengths, cu_seqlens: per call),
# or _REFERENCE (the call runs the PyTorch reference)
_PLANS = PlanCache()
_REFERENCE = object()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask=None, *,
              causal: bool = False, scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
              fallback: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q, k, v of shape (B, H, S, D); returns (B, S, H, D).

    ``attention_mask``: (B, S) 0/1 key padding mask, an additive float mask broadcastable to
    (B, H, S, S), or an ``AttentionMask`` from ``prepare_attention_mask`` (analysed once, reused
    by many calls).  A raw 2-D mask is analysed at every call (``prepare_attention_mask`` with
    its defaults: one host read outside ``trusted_inputs()``, none inside); nothing about a mask
    is cached between calls.  ``causal``: query i sees keys j <= i.  Differentiable in q, k, v.
    """
    prepared = isinstance(attention_mask, AttentionMask)
    key = None
    if prepared and out is None:  # checks and launch plan once per (shapes, strides, dtypes, mask layout) case
        pm = attention_mask
        try:
            key = (meta(q), meta(k), meta(v), pm.kind, meta(pm.mask), meta(pm.kvlen), pm.batch, pm.heads, pm.seqlen,
                   bool(causal), type(scale), scale, fallback, mode_key(q.dtype))
        except AttributeError:  # not tensors: the checks say what is wrong
            key = None
        template = _PLANS.get(key) if key is not None else None
        if template is not None:
            if template is _REFERENCE:
                return attention_reference(q, k, v, pm, causal=causal, scale=_check_scale(OP, scale, q.shape[-1]))
            B, H, S = template.batch, template.heads, template.seqlen
            kind, mask_t, mstrides, kvlen = _mask_args(pm, B, H, S)
            qa, ka, va = _aligned(q), _aligned(k), _aligned(v)
            # the template's memo only where nothing was copied (a copy has other strides)
            in_place = qa is q and ka is k and va is v and kvlen is pm.kvlen and (
                pm.mask is None or pm.mask.data_ptr() % 16 == 0)  # _mask_args copies a misaligned mask
            plan = template._replace(mask=mask_t, mask_strides=mstrides, kvlen=kvlen,
                                     memo=template.memo if in_place else None)
            return _run(OP, qa, ka, va, plan, None)
    dtype = _check_qkv(OP, q, k, v, 4)
    B, H, S, D = q.shape
    scale = _check_scale(OP, scale, D)
    check_out(OP, out, (B, S, H, D), dtype, q.device)
    _check_grid(OP, B, H)
    if prepared:
        mask_tensors = (attention_mask.mask, attention_mask.kvlen)
    elif attention_mask is None or isinstance(attention_mask, torch.Tensor):
        mask_tensors = (attention_mask,)
    else:
        raise ValueError(
            f"{OP}: attention_mask must be a tensor or an AttentionMask, got {type(attention_mask).__name__}")
    for t in mask_tensors:
        if t is not None and t.device != q.device:
            raise ValueError(f"{OP}: attention_mask is on {t.device} but q is on {q.device}")
    triton_path = use_triton(OP, q, k, v, *mask_tensors, out, fallback=fallback)
    if prepared:
        pm = _check_prepared(attention_mask, B, H, S, q.device)
    else:
        pm = prepare_attention_mask(attention_mask, B, H, S)  # validates the mask
    if not triton_path:
        if key is not None:
            _PLANS.put(key, _REFERENCE)
        res = attention_reference(q, k, v, pm if prepared else attention_mask, causal=causal, scale=scale)
        if out is not None:
            return out.copy_(res)
        return res
    kind, mask_t, mstrides, kvlen = _mask_args(pm, B, H, S)
    ieee = dtype == torch.float32 and not tf32_allowed()
    cfg = attention_config(D, dtype, S, cuda_capability(q.device), additive_mask=kind == MASK_ADD,
                           tune=TuneContext(q.device, B, H, bool(causal), kind, False))
    plan = _Plan(False, B, H, S, D, kind, mask_t, mstrides, kvlen, None, 0, bool(causal), scale, ieee, cfg)
    if key is not None:
        _PLANS.put(key, plan._replace(mask=None, kvlen=None, memo={}))
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    return _run(OP, q, k, v, plan, out)


def _check_cu(cu_seqlens, max_seqlen, total: int, device):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{OP_VARLEN}: cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{OP_VARLEN}: cu_seqlens has dtype {_dtype_name(cu_seqlens.dtype)}; expected int32")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{OP_VARLEN}: cu_seqlens must be 1-D with B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{OP_VARLEN}: cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if isinstance(max_seqlen, torch.Tensor) or isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise ValueError(f"{OP_VARLEN}: max_seqlen must be a python int, got {type(max_seqlen).__name__}")
    if not check_values():  # trusted_inputs(): the caller validated cu_seqlens / max_seqlen
        return
    cu64 = cu_seqlens.to(torch.int64)
    lens = cu64[1:] - cu64[:-1]
    first, last, min_len, max_len = torch.stack([cu64[0], cu64[-1], lens.min(), lens.max()]).tolist()
    if first != 0:
        raise ValueError(f"{OP_VARLEN}: cu_seqlens[0] must be 0, got {first}")
    if min_len < 0:
        raise ValueError(f"{OP_VARLEN}: cu_seqlens must be non-decreasing (monotone)")
    if last != total:
        raise ValueError(f"{OP_VARLEN}: cu_seqlens[-1] = {last} but q holds total_tokens = {total}")
    if max_seqlen < max_len:
        raise ValueError(f"{OP_VARLEN}: max_seqlen = {max_seqlen} is smaller than the longest sequence ({max_len})")


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
                     causal: bool = False, scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
                     fallback: bool = False) -> torch.Tensor:
    """Attention over packed sequences: q, k, v of shape (total_tokens, H, D), sequence b being
    rows ``cu_seqlens[b]:cu_seqlens[b + 1]``; returns (total_tokens, H, D) contiguous."""
    key = None
    if out is None and not check_values():  # trusted (the caller validated cu_seqlens): plan once per case
        try:
            key = (meta(q), meta(k), meta(v), meta(cu_seqlens), type(max_seqlen), max_seqlen, bool(causal),
                   type(scale), scale, fallback, mode_key(q.dtype))
        except AttributeError:
            key = None
        template = _PLANS.get(key) if key is not None else None
        if template is not None and template is not _REFERENCE and cu_seqlens.data_ptr() % 16 == 0:
            plan = template._replace(cu=cu_seqlens)
            return _run(OP_VARLEN, _aligned(q), _aligned(k), _aligned(v), plan, None)
    dtype = _check_qkv(OP_VARLEN, q, k, v, 3)
    T, H, D = q.shape
    scale = _check_scale(OP_VARLEN, scale, D)
    _check_cu(cu_seqlens, max_seqlen, T, q.device)
    check_out(OP_VARLEN, out, (T, H, D), dtype, q.device)
    _check_grid(OP_VARLEN, cu_seqlens.numel() - 1, H)
    if not use_triton(OP_VARLEN, q, k, v, cu_seqlens, out, fallback=fallback):
        res = attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
        if out is not None:
            return out.copy_(res)
        return res
    B = cu_seqlens.numel() - 1
    ieee = dtype == torch.float32 and not tf32_allowed()
    cfg = attention_config(D, dtype, max_seqlen, cuda_capability(q.device),
                           tune=TuneContext(q.device, B, H, bool(causal), MASK_NONE, True))
    plan = _Plan(True, B, H, max(int(max_seqlen), 0), D, MASK_NONE, None, (0, 0, 0, 0), None,
                 cu_seqlens.clone() if cu_seqlens.data_ptr() % 16 else cu_seqlens.contiguous(),
                 T, bool(causal), scale, ieee, cfg)
    if key is not None and cu_seqlens.is_contiguous():
        _PLANS.put(key, plan._replace(cu=None))
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    return _run(OP_VARLEN, q, k, v, plan, out)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------
def _softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim; rows whose scores are all -inf give zeros (not NaN)."""
    dead = torch.isneginf(scores.amax(-1, keepdim=True))
    p = torch.softmax(scores.masked_fill(dead, 0.0), -1)
    return p.masked_fill(dead, 0.0)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attention_mask=None, *, causal: bool = False,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Plain matmul-softmax-matmul in fp32 (fp64 for fp64 inputs) with the kernel's masking
    rules; returns (B, S, H, D) contiguous in q.dtype.  ``attention_mask``: as for ``attention``
    (an ``AttentionMask`` counts as its ``dense()`` mask).  Differentiable."""
    B, H, S, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    m = attention_mask.dense() if isinstance(attention_mask, AttentionMask) else attention_mask
    if m is not None:
        if m.dim() == 2:
            scores = scores.masked_fill((m == 0)[:, None, None, :], float("-inf"))
        elif m.dim() == 4:
            if m.dtype == torch.bool:
                scores = scores.masked_fill(~m, float("-inf"))
            else:
                scores = scores + m.to(ct)
        else:
            raise ValueError(f"attention_reference: attention_mask must be 2-D or 4-D, got {tuple(m.shape)}")
    if causal:
        i = torch.arange(S, device=q.device)
        scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
    p = _softmax_rows(scores)
    o = torch.matmul(p, vf)  # (B, H, S, D)
    return o.transpose(1, 2).contiguous().to(q.dtype)


def attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: Optional[int] = None, *, causal: bool = False,
                               scale: Optional[float] = None) -> torch.Tensor:
    """Reference for packed sequences: each sequence through ``attention_reference``;
    returns (total_tokens, H, D) in q.dtype."""
    del max_seqlen
    bounds = cu_seqlens.tolist()
    outs = []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        if s1 == s0:
            continue
        sl = slice(s0, s1)
        qs, ks, vs = (t[sl].permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))  # (1, H, L, D)
        outs.append(attention_reference(qs, ks, vs, causal=causal, scale=scale)[0])  # (L, H, D)
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0)


# --------------------------------------------------------------------------------------------
# Compile check
# --------------------------------------------------------------------------------------------
_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _kernel_variants():
    """mask kinds a launcher can pick (padded and varlen launches share the MASK_LENS variant)."""
    return [MASK_LENS, MASK_KEYS, MASK_ADD]


def _signature(kernel: str, tt: str, mtype: str) -> dict:
    """Triton signature of one attention kernel for element type ``tt``."""
    seq = ["stb", "sth", "sts", "smb", "smh", "smq", "smk", "skv", "scu", "H", "S"]
    qkv = ["sqb", "sqh", "sqs", "skb", "skh", "sks", "svb", "svh", "svs"]
    consts = {n: "constexpr" for n in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL", "MASK_KIND", "IEEE")}
    if kernel == "pre":
        return {"O": f"*{tt}", "DO": f"*{tt}", "DELTA": "*fp32",
                **{n: "i32" for n in ("sob", "soh", "sos", "sdb", "sdh", "sds", "stb", "sth", "sts", "H", "S")},
                "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr"}
    if kernel == "fwd":
        return {"Q": f"*{tt}", "K": f"*{tt}", "V": f"*{tt}", "O": f"*{tt}", "M_OUT": "*fp32", "L_OUT": "*fp32",
                "MASK": mtype, "KVLEN": "*i32", "CU": "*i32", **{n: "i32" for n in qkv + ["sob", "soh", "sos"] + seq},
                "qk_scale": "fp32", **consts}
    outs = ["DK", "DV"] if kernel == "dkdv" else ["DQ"]
    return {"Q": f"*{tt}", "K": f"*{tt}", "V": f"*{tt}", "DO": f"*{tt}", **{o: f"*{tt}" for o in outs},
            "M_IN": "*fp32", "L_IN": "*fp32", "DELTA": "*fp32", "MASK": mtype, "KVLEN": "*i32", "CU": "*i32",
            **{n: "i32" for n in qkv + ["sdob", "sdoh", "sdos", "sgb", "sgh", "sgs"] + seq},
            "qk_scale": "fp32", "sm_scale": "fp32", **consts}


def _aligned_args(sig: dict) -> tuple:
    """The arguments the runtime JIT sees as 16-divisible under the launch contract (every
    pointer; the strides of q, k, v, o, dO, gradients and statistics), i.e. all but the floats
    and the ``do_not_specialize`` integers."""
    return tuple(n for n, t in sig.items() if t not in ("constexpr", "fp32") and n not in _NO_SPECIALIZE)


def compile_specs(arch: int) -> list:
    """Every configuration the attention launchers can pick on ``arch`` (90 or 80): for each head
    dim and dtype (fp32 with IEEE or TF32 dots), the delta preprocess and, for each mask kind
    (no mask / key lengths / varlen, per-key 0/1 mask, additive 4-D) and causal on/off, the
    forward, dK/dV and dQ kernels, each with the argument alignment the launch contract
    guarantees (see ``_NO_SPECIALIZE``): the kernel the runtime builds is the one listed."""
    from bertfast.kernels._compile import KernelSpec

    cap = (arch // 10, arch % 10)
    specs = []
    dtypes = [(torch.float16, False), (torch.bfloat16, False), (torch.float32, True), (torch.float32, False)]
    for D in HEAD_DIMS:
        for dtype, ieee in dtypes:
            tt = _TT[dtype]
            low = dtype != torch.float32  # tensor cores; fp32 runs FMA (IEEE) or tf32 mma.sync on small tiles
            cfg = attention_config(D, dtype, 512, cap, interpret=False)
            cfg_add = attention_config(D, dtype, 512, cap, interpret=False, additive_mask=True)
            dname = tt + ("" if low else ("-ieee" if ieee else "-tf32"))
            if ieee or low:
                pre = cfg["pre"]
                sig = _signature("pre", tt, "")
                specs.append(KernelSpec(op=OP, fn=_attn_bwd_pre, signature=sig,
                                        constexprs={"HEAD_DIM": D, "BLOCK_M": pre.block_m},
                                        num_warps=pre.num_warps, num_stages=pre.num_stages,
                                        label=f"pre D{D} {tt}", divisible=_aligned_args(sig)))
            for kind in _kernel_variants():
                mtype = {MASK_KEYS: "*i8", MASK_ADD: "*fp32"}.get(kind, f"*{tt}")
                for causal in (False, True):
                    label = f"D{D} {dname} {_MASK_NAMES[kind]}{' causal' if causal else ''}"
                    flags = {"HEAD_DIM": D, "CAUSAL": causal, "MASK_KIND": kind, "IEEE": ieee}
                    for name, fn in (("fwd", _attn_fwd), ("dkdv", _attn_bwd_dkdv), ("dq", _attn_bwd_dq)):
                        c = (cfg_add if kind == MASK_ADD else cfg)[name]
                        sig = _signature(name, tt, mtype)
                        specs.append(KernelSpec(
                            op=OP, fn=fn, signature=sig,
                            constexprs={**flags, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                            num_warps=c.num_warps, num_stages=c.num_stages, expect_tensor_cores=low,
                            label=f"{name} {label}", divisible=_aligned_args(sig)))
    return specs


# --------------------------------------------------------------------------------------------
# Benchmark / smoke check
# --------------------------------------------------------------------------------------------
def _main() -> int:  # pragma: no cover - needs a GPU
    import sys

    if not torch.cuda.is_available() or INTERPRET:
        print("python -m bertfast.kernels.attention: the correctness check and benchmark need a CUDA GPU "
              "(and TRITON_INTERPRET unset); none found, nothing run.", file=sys.stderr)
        return 1
    from triton.testing import do_bench

    from bertfast.kernels.testing import assert_close

    torch.manual_seed(0)
    dev = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        for (B, H, S, D) in ((32, 12, 128, 64), (8, 12, 512, 64), (4, 16, 1024, 64), (2, 12, 4096, 64),
                             (64, 12, 128, 32), (8, 16, 512, 128)):
            qkv = torch.randn(3, B, H, S, D, device=dev, dtype=dtype)
            q, k, v = qkv[0], qkv[1], qkv[2]
            lens = torch.randint(S // 2, S + 1, (B,), device=dev)
            mask = (torch.arange(S, device=dev)[None, :] < lens[:, None]).to(torch.int64)
            o = attention(q, k, v, mask)
            assert_close(o, attention_reference(q, k, v, mask), msg=f"attention B{B} H{H} S{S} D{D}")
            add = torch.zeros(B, 1, 1, S, device=dev, dtype=dtype).masked_fill(mask[:, None, None, :] == 0,
                                                                               torch.finfo(dtype).min)
            ms_ours = do_bench(lambda: attention(q, k, v))
            ms_ours_mask = do_bench(lambda: attention(q, k, v, mask))
            ms_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            ms_sdpa_mask = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, add))
            flops = 4 * B * H * S * S * D
            print(f"{str(dtype):15s} B{B:3d} H{H:3d} S{S:5d} D{D:4d}  ours {ms_ours:7.3f} ms "
                  f"({flops / ms_ours * 1e-9:6.1f} TFLOP/s)  sdpa {ms_sdpa:7.3f} ms | "
                  f"padding mask: ours {ms_ours_mask:7.3f} ms  sdpa(add) {ms_sdpa_mask:7.3f} ms")
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            og = attention(qg, kg, vg, mask)
            do = torch.randn_like(og)
            ms_bwd = do_bench(lambda: torch.autograd.grad(og, (qg, kg, vg), do, retain_graph=True))
            qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
            os_ = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
            ms_bwd_sdpa = do_bench(lambda: torch.autograd.grad(os_, (qs, ks, vs), do.transpose(1, 2),
                                                               retain_graph=True))
            print(f"{'':15s} backward: ours (masked) {ms_bwd:7.3f} ms  sdpa (no mask) {ms_bwd_sdpa:7.3f} ms")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
