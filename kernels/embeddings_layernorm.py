"""BERT embeddings in one kernel: gather the word, position and token-type rows of every token,
sum them in fp32 and LayerNorm the sum (two-pass fp32 statistics in registers).

    y[b, s] = LayerNorm(word[input_ids[b, s]] + position[position_ids[b, s]] + type[token_type_ids[b, s]])

* ``token_type_ids`` None -> all zeros; ``position_ids`` None -> ``arange(S)`` for every sequence;
  ``position_ids`` may also be (S,) (or (1, S), as Hugging Face slices its buffer), shared by the
  batch.  Id tensors are read through their strides (no copies; a broadcast input is stride 0);
  ids of another integer dtype than ``input_ids`` are cast to it (int32 and int64 supported).
* Ids are range-checked on the host before the launch (one device->host sync for all three id
  tensors): an out-of-range id raises ``ValueError`` naming the input and the bad value, never a
  device-side assert.  Inside ``bertfast.kernels._common.trusted_inputs()`` (the model validated the ids
  already) and under torch.compile the check is skipped: no sync, CUDA-graph capturable.
* Backward: one Triton launch recomputes the gathered sum, writes d(sum) in fp32 and per-program
  partial dW / dB of the LayerNorm (reduced with a deterministic ``sum(0)``); the table gradients
  are then scattered with torch ``index_add_`` into fp32 buffers (cast to the table dtype at the
  end): the word table always, the position table after summing over the batch when the
  positions are shared, the type table (or its row 0 when token types are None, by a plain sum).
  ``padding_idx`` (word table only, as in Hugging Face's ``nn.Embedding(padding_idx=...)``)
  zeroes that row's gradient; the forward still reads the row.

Supported: tables and LayerNorm parameters fp32 / fp16 / bf16 (one dtype, also the output's);
hidden size 1..8192.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from bertfast.kernels._common import (
    PlanCache,
    cdiv,
    check_dtype,
    check_out,
    check_same_dtype,
    check_shape,
    check_values,
    dtype_name,
    meta,
    mode_key,
    use_triton,
)
from bertfast.kernels._compile import OLD_PTXAS, KernelSpec
from bertfast.kernels._launch import launched
from bertfast.kernels._layernorm import (
    all_ln_configs,
    bwd_num_programs,
    device_ctx,
    ln_bwd_dz,
    ln_config,
    ln_fwd_tile,
    ln_xhat,
    tl,
    triton,
    short_dtype,
    triton_ptr_type,
    with_aligned,
)

OP = "embeddings_layernorm"
ID_DTYPES = (torch.int32, torch.int64)

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _gather_sum(
    IDS, TT, POS, WE, PE, TE, rows_ld, mask_n, cols, S,
    stride_ib, stride_is, stride_tb, stride_ts, stride_pb, stride_ps, stride_we, stride_pe, stride_te,
):
    """fp32 [ROWS, BLOCK_N] tile of word + position + type rows for flat token indices ``rows_ld``
    (already clamped to M - 1, so the id loads need no mask; columns >= N are 0)."""
    bi = (rows_ld // S).to(tl.int64)
    si = (rows_ld % S).to(tl.int64)
    wid = tl.load(IDS + bi * stride_ib + si * stride_is).to(tl.int64)
    tid = tl.load(TT + bi * stride_tb + si * stride_ts).to(tl.int64)
    pid_ = tl.load(POS + bi * stride_pb + si * stride_ps).to(tl.int64)
    cmask = mask_n[None, :]
    e = tl.load(WE + wid[:, None] * stride_we + cols[None, :], mask=cmask, other=0.0).to(tl.float32)
    e += tl.load(PE + pid_[:, None] * stride_pe + cols[None, :], mask=cmask, other=0.0).to(tl.float32)
    e += tl.load(TE + tid[:, None] * stride_te + cols[None, :], mask=cmask, other=0.0).to(tl.float32)
    return e


@launched
def _embeddings_layernorm_fwd_kernel(
    IDS, TT, POS, WE, PE, TE, W, B, Y, Mean, Rstd,
    M, S, N,
    stride_ib, stride_is, stride_tb, stride_ts, stride_pb, stride_ps,
    stride_we, stride_pe, stride_te, stride_y, eps,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    rows_ld = tl.minimum(rows, M - 1)  # rows past M re-read token M - 1 (stores are masked)
    z = _gather_sum(
        IDS, TT, POS, WE, PE, TE, rows_ld, mask_n, cols, S,
        stride_ib, stride_is, stride_tb, stride_ts, stride_pb, stride_ps, stride_we, stride_pe, stride_te,
    )
    w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask_n, other=0.0).to(tl.float32)
    y, mean, rstd = ln_fwd_tile(z, w, b, mask_n, N, eps)
    rows64 = rows.to(tl.int64)
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
    tl.store(Mean + rows64, mean, mask=mask_m)
    tl.store(Rstd + rows64, rstd, mask=mask_m)


@launched
def _embeddings_layernorm_bwd_kernel(
    DY, IDS, TT, POS, WE, PE, TE, W, Mean, Rstd, DZ, DW, DB,
    M, S, N,
    stride_ib, stride_is, stride_tb, stride_ts, stride_pb, stride_ps,
    stride_we, stride_pe, stride_te, stride_dy, stride_dz,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    num_tiles = tl.cdiv(M, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc_dw = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_db = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    # Column runs of 4 (a true, weaker claim than the full arange): every access then uses one
    # 4-per-thread layout, fp16 / bf16 loads 8 bytes wide and the fp32 dz store 16.  Left to
    # itself, with 16-divisible pointers / strides, Triton loads fp16 8-wide and converts dz
    # through shared memory to its 4-wide store layout: 32 KiB and, at BLOCK_N 8192 / 32 warps
    # on sm_80, a register spill.
    cols = tl.max_contiguous(cols, [4])
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        mask_m = rows < M
        rows_ld = tl.minimum(rows, M - 1)
        z = _gather_sum(
            IDS, TT, POS, WE, PE, TE, rows_ld, mask_n, cols, S,
            stride_ib, stride_is, stride_tb, stride_ts, stride_pb, stride_ps, stride_we, stride_pe, stride_te,
        )
        rows_ld64 = rows_ld.to(tl.int64)
        mean = tl.load(Mean + rows_ld64)
        rstd = tl.load(Rstd + rows_ld64)
        xhat = ln_xhat(z, mean, rstd)
        dy = tl.load(DY + rows_ld64[:, None] * stride_dy + cols[None, :], mask=mask_n[None, :], other=0.0)
        dy = dy.to(tl.float32) * mask_m.to(tl.float32)[:, None]  # padded rows add nothing
        acc_dw += dy * xhat
        acc_db += dy
        w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)
        dz = ln_bwd_dz(xhat, dy, w, rstd, N)
        rows64 = rows.to(tl.int64)
        tl.store(DZ + rows64[:, None] * stride_dz + cols[None, :], dz, mask=mask_m[:, None] & mask_n[None, :])
    out = pid.to(tl.int64) * N + cols
    tl.store(DW + out, tl.sum(acc_dw, axis=0), mask=mask_n)
    tl.store(DB + out, tl.sum(acc_db, axis=0), mask=mask_n)


# --------------------------------------------------------------------------------------------
# Host side: checks, id normalisation, launchers
# --------------------------------------------------------------------------------------------


def _check_id_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ID_DTYPES:
        raise ValueError(f"{OP}: {name} has dtype {dtype_name(t.dtype)}; expected int32 or int64")


def _check(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight, ln_bias,
           eps, padding_idx):
    """All metadata checks (no device work). Returns (B, S, N, padding_idx normalised)."""
    _check_id_tensor("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"{OP}: input_ids has shape {tuple(input_ids.shape)}; expected (batch, seq)")
    bsz, seq = input_ids.shape
    if token_type_ids is not None:
        _check_id_tensor("token_type_ids", token_type_ids)
        if tuple(token_type_ids.shape) != (bsz, seq):
            raise ValueError(
                f"{OP}: token_type_ids has shape {tuple(token_type_ids.shape)}; expected input_ids' shape {(bsz, seq)}"
            )
    if position_ids is not None:
        _check_id_tensor("position_ids", position_ids)
        if tuple(position_ids.shape) not in ((bsz, seq), (seq,), (1, seq)):
            raise ValueError(
                f"{OP}: position_ids has shape {tuple(position_ids.shape)}; expected {(bsz, seq)}, {(seq,)} or {(1, seq)}"
            )
    tables = {"word_weight": word_weight, "position_weight": position_weight, "type_weight": type_weight,
              "ln_weight": ln_weight, "ln_bias": ln_bias}
    for name, t in tables.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_dtype(OP, "word_weight", word_weight)
    check_same_dtype(OP, **tables)
    for name in ("word_weight", "position_weight", "type_weight"):
        t = tables[name]
        if t.dim() != 2 or t.shape[0] < 1:
            raise ValueError(f"{OP}: {name} has shape {tuple(t.shape)}; expected (rows >= 1, hidden)")
    n = word_weight.shape[1]
    check_shape(OP, "position_weight", position_weight, (None, n))
    check_shape(OP, "type_weight", type_weight, (None, n))
    check_shape(OP, "ln_weight", ln_weight, (n,))
    check_shape(OP, "ln_bias", ln_bias, (n,))
    ln_config(n, OP)  # hidden size supported?
    if not isinstance(eps, (float, int)) or not eps > 0:
        raise ValueError(f"{OP}: eps must be a positive float, got {eps!r}")
    if bsz * seq >= 2**31:
        raise ValueError(f"{OP}: {bsz * seq} tokens is more than the supported 2**31 - 1")
    if position_ids is None and seq > position_weight.shape[0]:
        raise ValueError(
            f"{OP}: position_ids is None, so positions are 0..{seq - 1}, but position_weight has only "
            f"{position_weight.shape[0]} rows (sequence length {seq} too long)"
        )
    if padding_idx is not None:
        v = word_weight.shape[0]
        if not isinstance(padding_idx, int) or not -v <= padding_idx < v:
            raise ValueError(f"{OP}: padding_idx must be an int in [-{v}, {v}), got {padding_idx!r}")
        padding_idx = padding_idx % v
    return bsz, seq, n, padding_idx


def _check_id_ranges(ids: dict) -> None:
    """``ids``: name -> (tensor, table rows, table name).  One host sync for all of them."""
    items = [(k, t, rows, tname) for k, (t, rows, tname) in ids.items() if t is not None and t.numel() > 0]
    if not items:
        return
    stats = torch.stack([torch.stack(torch.aminmax(t)).to(torch.int64) for _, t, _, _ in items]).tolist()
    for (name, _, rows, tname), (mn, mx) in zip(items, stats):
        if mn < 0 or mx >= rows:
            bad = mn if mn < 0 else mx
            raise ValueError(
                f"{OP}: {name} holds id {bad}, out of range: ids must be in [0, {rows}) ({tname} has {rows} rows); "
                f"{name} spans [{mn}, {mx}]"
            )


def _normalise_ids(input_ids, token_type_ids, position_ids):
    """(B, S) views (stride 0 where broadcast) of the three id tensors, all in input_ids' dtype."""
    bsz, seq = input_ids.shape
    idt, dev = input_ids.dtype, input_ids.device
    if token_type_ids is None:
        tt = torch.zeros((1, 1), dtype=idt, device=dev).expand(bsz, seq)
    else:
        tt = token_type_ids.to(idt)
    if position_ids is None:
        pos = torch.arange(seq, dtype=idt, device=dev).view(1, seq).expand(bsz, seq)
    else:
        pos = position_ids.to(idt).reshape(-1, seq).expand(bsz, seq)
    return tt, pos


def _id_strides(ids, tt, pos):
    return (ids.stride(0), ids.stride(1), tt.stride(0), tt.stride(1), pos.stride(0), pos.stride(1))


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Warps under triton < 3.9 (``_compile.OLD_PTXAS``: 3.6.0 is what the GPU machines run) where
# ``ln_config``'s spill, measured with triton 3.6.0 (``python -m bertfast.kernels.compile_check --op
# embeddings_layernorm``; registers, spill-store bytes):
# * backward BN=512 R=4, 4 warps: 128 regs, 4 - 8 B (fp16 / bf16, 16-divisible N; sm_90 and
#   sm_80); BN=1024 R=2, 4 warps: 96 regs, 4 B (fp16, sm_90; fp32 generic on sm_80: 128, 4 B)
#   -> 8 warps: 76 - 101 regs, no spill (every dtype, both architectures);
# * forward fp32 BN=128 R=16, 4 warps: 80 regs, 8 B (int32 ids, generic, sm_90) -> 8 warps:
#   36 - 64 regs, no spill.
# Rows and BLOCK_N (hence every result) stay; triton 3.9 keeps ``ln_config``'s warps (no spill).
# Not fixed by warps: the backward at BN=8192 R=1 (hidden > 4096) spills under 3.6 with 32 warps
# (64 regs: fp32 48 / 8 B on sm_90, 36 B generic on sm_80; fp16 / bf16 56 B generic on sm_90) and
# with 16 warps (128 regs: fp32 clean on sm_90 but 96 B generic on sm_80; fp16 / bf16 88 B
# generic on sm_90); that needs a kernel that does not hold a whole 8192-wide row in registers.
_OLD_PTXAS_BWD_WARPS = {512: 8, 1024: 8}  # BLOCK_N -> backward warps
_OLD_PTXAS_FWD_WARPS = {(128, torch.float32): 8}  # (BLOCK_N, dtype) -> forward warps


def _config(n: int, dtype: torch.dtype):
    """``ln_config`` for this op and table dtype, with the triton-version rule above."""
    cfg = ln_config(n, OP)
    if OLD_PTXAS:
        cfg = replace(cfg, num_warps=_OLD_PTXAS_FWD_WARPS.get((cfg.block_n, dtype), cfg.num_warps),
                      bwd_num_warps=_OLD_PTXAS_BWD_WARPS.get(cfg.block_n, cfg.bwd_num_warps))
    return cfg


def _forward(ids, tt, pos, we, pe, te, lw, lb, eps, out):
    bsz, seq = ids.shape
    n = we.shape[1]
    m = bsz * seq
    cfg = _config(n, we.dtype)
    dev = we.device
    if out is None:
        out = torch.empty((bsz, seq, n), dtype=we.dtype, device=dev)
    mean = torch.empty((m,), dtype=torch.float32, device=dev)
    rstd = torch.empty((m,), dtype=torch.float32, device=dev)
    if m == 0:
        return out, mean, rstd
    we, pe, te = _rowmajor(we), _rowmajor(pe), _rowmajor(te)
    lw, lb = lw.contiguous(), lb.contiguous()
    y2 = out.view(m, n)
    grid = (cdiv(m, cfg.rows),)
    with device_ctx(dev):
        _embeddings_layernorm_fwd_kernel[grid](
            ids, tt, pos, we, pe, te, lw, lb, y2, mean, rstd,
            m, seq, n, *_id_strides(ids, tt, pos),
            we.stride(0), pe.stride(0), te.stride(0), y2.stride(0), float(eps),
            ROWS=cfg.rows, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
    return out, mean, rstd


def _backward_ln(dy, ids, tt, pos, we, pe, te, lw, mean, rstd):
    """Triton LayerNorm backward through the gathered sum: (dz fp32 (M, N), d ln_weight, d ln_bias)."""
    bsz, seq = ids.shape
    n = we.shape[1]
    m = bsz * seq
    cfg = _config(n, we.dtype)
    dev = we.device
    dz = torch.empty((m, n), dtype=torch.float32, device=dev)
    if m == 0:
        zero = torch.zeros((n,), dtype=lw.dtype, device=dev)
        return dz, zero, zero.clone()
    we, pe, te = _rowmajor(we), _rowmajor(pe), _rowmajor(te)
    lw = lw.contiguous()
    dy2 = dy.reshape(m, n)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    num_tiles = cdiv(m, cfg.rows)
    g = bwd_num_programs(num_tiles, cfg, dev)
    partial = torch.empty((2, g, n), dtype=torch.float32, device=dev)
    with device_ctx(dev):
        _embeddings_layernorm_bwd_kernel[(g,)](
            dy2, ids, tt, pos, we, pe, te, lw, mean, rstd, dz, partial[0], partial[1],
            m, seq, n, *_id_strides(ids, tt, pos),
            we.stride(0), pe.stride(0), te.stride(0), dy2.stride(0), dz.stride(0),
            ROWS=cfg.rows, BLOCK_N=cfg.block_n, num_warps=cfg.bwd_num_warps,
        )
    sums = partial.sum(1).to(lw.dtype)  # deterministic reduction of the per-program partials
    return dz, sums[0], sums[1]


class _EmbeddingsLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, tt, pos, we, pe, te, lw, lb, eps, padding_idx, tt_given, pos_shared, out):
        y, mean, rstd = _forward(ids, tt, pos, we, pe, te, lw, lb, eps, out)
        if out is not None:
            ctx.mark_dirty(out)  # written in place: the caller's buffer becomes the differentiable output
        ctx.save_for_backward(ids, tt, pos, we, pe, te, lw, mean, rstd)
        ctx.padding_idx, ctx.tt_given, ctx.pos_shared = padding_idx, tt_given, pos_shared
        return y

    @staticmethod
    def backward(ctx, dy):
        ids, tt, pos, we, pe, te, lw, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dz, dlw, dlb = _backward_ln(dy, ids, tt, pos, we, pe, te, lw, mean, rstd)
        bsz, seq = ids.shape
        n = we.shape[1]
        dwe = dpe = dte = None
        if bsz * seq == 0:
            need = tuple(need[:3]) + (False,) * 3 + tuple(need[6:])
            dwe, dpe, dte = torch.zeros_like(we), torch.zeros_like(pe), torch.zeros_like(te)
        if need[3]:
            acc = torch.zeros(we.shape, dtype=torch.float32, device=dz.device)
            acc.index_add_(0, ids.reshape(-1).long(), dz)
            if ctx.padding_idx is not None:
                acc[ctx.padding_idx] = 0
            dwe = acc.to(we.dtype)
        if need[4]:
            acc = torch.zeros(pe.shape, dtype=torch.float32, device=dz.device)
            if ctx.pos_shared:  # one position row per s, shared by the batch: sum over b first
                acc.index_add_(0, pos[0].long(), dz.view(bsz, seq, n).sum(0))
            else:
                acc.index_add_(0, pos.reshape(-1).long(), dz)
            dpe = acc.to(pe.dtype)
        if need[5]:
            acc = torch.zeros(te.shape, dtype=torch.float32, device=dz.device)
            if ctx.tt_given:
                acc.index_add_(0, tt.reshape(-1).long(), dz)
            else:  # all tokens use row 0
                acc[0] = dz.sum(0)
            dte = acc.to(te.dtype)
        return (None, None, None, dwe, dpe, dte, dlw if need[6] else None, dlb if need[7] else None,
                None, None, None, None, None)


_PLANS = PlanCache()


def embeddings_layernorm(
    input_ids: torch.Tensor,
    token_type_ids: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    type_weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-12,
    *,
    padding_idx: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    fallback: bool = False,
) -> torch.Tensor:
    """LayerNorm(word[input_ids] + position[position_ids] + type[token_type_ids]) -> (B, S, hidden).

    input_ids: (B, S) int32/int64.  token_type_ids: (B, S) or None (zeros).  position_ids: (B, S),
    (S,), (1, S) or None (arange(S)).  Tables (rows, hidden) and ln_weight / ln_bias (hidden,) in
    one dtype (fp32 / fp16 / bf16), the output's.  hidden <= 8192.  Out-of-range ids raise
    ValueError (host check, one sync).  ``padding_idx``: that word row gets gradient 0, as with
    ``nn.Embedding(padding_idx=...)``.  Differentiable in the tables and LayerNorm parameters.
    """
    def build():
        bsz, seq, n, pad = _check(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                                  ln_weight, ln_bias, eps, padding_idx)
        ok = use_triton(OP, input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                        ln_weight, ln_bias, out, fallback=fallback)
        return bsz, seq, n, pad, ok

    # checks and backend once per (shapes, strides, dtypes, device, eps, padding_idx) case
    bsz, seq, n, padding_idx, triton_ok = _PLANS.plan(
        lambda: (meta(input_ids), meta(token_type_ids), meta(position_ids), meta(word_weight), meta(position_weight),
                 meta(type_weight), meta(ln_weight), meta(ln_bias), type(eps), eps, type(padding_idx), padding_idx,
                 fallback, mode_key(word_weight.dtype)) if out is None else None,
        build)
    check_out(OP, out, (bsz, seq, n), word_weight.dtype, word_weight.device)
    if check_values():  # skipped inside bertfast.kernels._common.trusted_inputs() and under torch.compile
        _check_id_ranges({
            "input_ids": (input_ids, word_weight.shape[0], "word_weight"),
            "token_type_ids": (token_type_ids, type_weight.shape[0], "type_weight"),
            "position_ids": (position_ids, position_weight.shape[0], "position_weight"),
        })
    if not triton_ok:
        y = embeddings_layernorm_reference(
            input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight, ln_bias,
            eps, padding_idx=padding_idx,
        )
        if out is not None:
            out.copy_(y)
            return out
        return y
    tt, pos = _normalise_ids(input_ids, token_type_ids, position_ids)
    params = (word_weight, position_weight, type_weight, ln_weight, ln_bias)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        pos_shared = position_ids is None or position_ids.dim() == 1 or position_ids.shape[0] == 1
        return _EmbeddingsLayerNorm.apply(
            input_ids, tt, pos, *params, float(eps), padding_idx, token_type_ids is not None, pos_shared, out
        )
    return _forward(input_ids, tt, pos, *params, eps, out)[0]


def embeddings_layernorm_reference(
    input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight, ln_bias,
    eps=1e-12, padding_idx=None,
) -> torch.Tensor:
    """PyTorch twin: gathers (nn.functional.embedding), fp32 sum and LayerNorm, cast to the tables' dtype
    (gradients accumulated in fp32, cast to the tables' dtype once)."""
    F = torch.nn.functional
    seq = input_ids.shape[1]
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device)
    # Gather from fp32 copies so that the tables' gradients are also accumulated in fp32.
    e = (
        F.embedding(input_ids.long(), word_weight.float(), padding_idx=padding_idx)
        + F.embedding(position_ids.long(), position_weight.float())
        + F.embedding(token_type_ids.long(), type_weight.float())
    )
    y = F.layer_norm(e, (word_weight.shape[1],), ln_weight.float(), ln_bias.float(), eps)
    return y.to(word_weight.dtype)


# --------------------------------------------------------------------------------------------
# Compile check (rung 3): every configuration the launchers can pick
# --------------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Same table on sm_90 and sm_80 (see ``bertfast.kernels._layernorm.ln_config``): table dtype x
    BLOCK_N bucket x id dtype (all three id tensors share input_ids' dtype), forward and backward."""
    specs = []
    strides = ["stride_ib", "stride_is", "stride_tb", "stride_ts", "stride_pb", "stride_ps",
               "stride_we", "stride_pe", "stride_te"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = triton_ptr_type(dtype)
        for idt in ID_DTYPES:
            ip = triton_ptr_type(idt)
            for cfg in (_config(c.block_n, dtype) for c in all_ln_configs()):
                const = {"ROWS": cfg.rows, "BLOCK_N": cfg.block_n}
                label = f"{short_dtype(dtype)} ids {short_dtype(idt)} {cfg.label}"
                fwd_sig = {"IDS": ip, "TT": ip, "POS": ip, "WE": p, "PE": p, "TE": p, "W": p, "B": p, "Y": p,
                           "Mean": "*fp32", "Rstd": "*fp32", "M": "i32", "S": "i32", "N": "i32"}
                fwd_sig.update({s: "i32" for s in strides})
                fwd_sig.update({"stride_y": "i32", "eps": "fp32", "ROWS": "constexpr", "BLOCK_N": "constexpr"})
                bwd_sig = {"DY": p, "IDS": ip, "TT": ip, "POS": ip, "WE": p, "PE": p, "TE": p, "W": p,
                           "Mean": "*fp32", "Rstd": "*fp32", "DZ": "*fp32", "DW": "*fp32", "DB": "*fp32",
                           "M": "i32", "S": "i32", "N": "i32"}
                bwd_sig.update({s: "i32" for s in strides})
                bwd_sig.update({"stride_dy": "i32", "stride_dz": "i32", "ROWS": "constexpr", "BLOCK_N": "constexpr"})
                specs.append(KernelSpec(OP, _embeddings_layernorm_fwd_kernel, fwd_sig, const, cfg.num_warps, 1,
                                        label=label))
                specs.append(KernelSpec(OP, _embeddings_layernorm_bwd_kernel, bwd_sig, const, cfg.bwd_num_warps, 1,
                                        label=label))
    # plus the variant the JIT builds when N % 16 == 0: row-major tables, output and gradients
    # have row stride N.  (The id strides follow the batch / sequence shape, not N.)
    return with_aligned(specs, ("N", "stride_we", "stride_pe", "stride_te", "stride_y", "stride_dy", "stride_dz"))


# --------------------------------------------------------------------------------------------
# Benchmark (Triton tutorial style): python -m bertfast.kernels.embeddings_layernorm
# --------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import sys

    if not torch.cuda.is_available():
        sys.exit("embeddings_layernorm benchmark: needs a CUDA GPU (run the tests for the interpreter path)")
    import triton.testing

    from bertfast.kernels.testing import assert_close

    torch.manual_seed(0)
    dev = "cuda"
    vocab, max_pos, types = 30522, 512, 2
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for bsz, seq, n in ((32, 512, 384), (32, 512, 768), (8, 512, 1024), (64, 128, 768)):
            we = torch.randn(vocab, n, device=dev, dtype=dtype)
            pe = torch.randn(max_pos, n, device=dev, dtype=dtype)
            te = torch.randn(types, n, device=dev, dtype=dtype)
            lw = torch.randn(n, device=dev, dtype=dtype)
            lb = torch.randn(n, device=dev, dtype=dtype)
            ids = torch.randint(0, vocab, (bsz, seq), device=dev)
            tt = torch.randint(0, types, (bsz, seq), device=dev)
            pos = torch.arange(seq, device=dev)
            args = (ids, tt, pos, we, pe, te, lw, lb, 1e-12)
            assert_close(embeddings_layernorm(*args), embeddings_layernorm_reference(*args))

            def eager():
                e = we[ids] + pe[pos] + te[tt]
                return torch.nn.functional.layer_norm(e, (n,), lw, lb, 1e-12)

            t_tri = triton.testing.do_bench(lambda: embeddings_layernorm(*args))
            t_eag = triton.testing.do_bench(eager)
            m = bsz * seq
            # word rows + output (HBM); id tensors; position / type rows mostly hit L2 but are counted
            gbytes = (4 * m * n * we.element_size() + 3 * m * ids.element_size()) / 1e9
            print(
                f"fwd {str(dtype):15} B={bsz:3} S={seq:4} N={n:5}  triton {t_tri * 1e3:8.1f} us "
                f"{gbytes / t_tri * 1e3:7.0f} GB/s   torch {t_eag * 1e3:8.1f} us {gbytes / t_eag * 1e3:7.0f} GB/s"
                f"   (the triton time includes the host id-range check and its sync)"
            )
