"""Fused bias + residual add + LayerNorm: ``LayerNorm(x + x_bias + residual)`` over the last dim.

In BERT, ``x`` is an output projection's GEMM result *without* its bias, ``x_bias`` that
Linear's bias and ``residual`` the sublayer input.  One pass: x, residual, x_bias, weight and
bias are read once, the output written once, and per-row mean / rstd (fp32, 8 bytes a row)
saved for the backward.  Statistics are two-pass fp32 over the row held in registers.

Backward (Triton, deterministic): one persistent launch recomputes ``z = x + x_bias + residual``,
writes ``dx`` (which is also d residual) and per-program fp32 partial sums of dW, dB and
d x_bias (= dx summed over rows), reduced on the host with ``sum(0)``.  For hidden > 4096 the
d x_bias accumulator would not fit in registers next to the row; it is then a host
``dx.sum(0)`` (fp32 accumulation).

Supported: fp32 / fp16 / bf16 (all tensors one dtype), hidden size 1..8192, any number of rows.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from bertfast.kernels._common import (
    PlanCache,
    cdiv,
    check_dtype,
    check_out,
    check_same_dtype,
    check_shape,
    meta,
    mode_key,
    use_triton,
)
from bertfast.kernels._compile import OLD_PTXAS, KernelSpec
from bertfast.kernels._gemm import SPLIT_K_FACTORS
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

OP = "add_layernorm"


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@launched
def _add_layernorm_fwd_kernel(
    X, R, XB, W, B, Y, Mean, Rstd,
    M, N, stride_x, stride_r, stride_y, eps, stride_s,
    HAS_XBIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr = 1,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    rows64 = rows.to(tl.int64)
    rows_ld = tl.minimum(rows, M - 1).to(tl.int64)  # rows past M re-read row M - 1 (stores are masked)

    x_ptrs = X + rows_ld[:, None] * stride_x + cols[None, :]
    x = tl.load(x_ptrs, mask=mask_n[None, :], other=0.0).to(tl.float32)
    if SPLITS > 1:
        # X: the (SPLITS, M, N) fp32 planes of a split-K GEMM, stride_s apart: added in the order
        # 0, 1, ... and rounded once to the output dtype, as splitk_reduce_kernel stores the result
        for s in tl.static_range(1, SPLITS):
            x += tl.load(x_ptrs + s * stride_s, mask=mask_n[None, :], other=0.0)
        x = x.to(Y.dtype.element_ty).to(tl.float32)
    r = tl.load(R + rows_ld[:, None] * stride_r + cols[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
    z = x + r
    if HAS_XBIAS:
        z += tl.load(XB + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask_n, other=0.0).to(tl.float32)

    y, mean, rstd = ln_fwd_tile(z, w, b, mask_n, N, eps)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows64, mean, mask=mask_m)
    tl.store(Rstd + rows64, rstd, mask=mask_m)


@launched
def _add_layernorm_bwd_kernel(
    DY, X, R, XB, W, Mean, Rstd, DX, DW, DB, DXB,
    M, N, stride_dy, stride_x, stride_r, stride_dx,
    HAS_XBIAS: tl.constexpr, SUM_DXB: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    num_tiles = tl.cdiv(M, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc_dw = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_db = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_dxb = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        mask_m = rows < M
        rows64 = rows.to(tl.int64)
        rows_ld = tl.minimum(rows, M - 1).to(tl.int64)
        x = tl.load(X + rows_ld[:, None] * stride_x + cols[None, :], mask=mask_n[None, :], other=0.0)
        r = tl.load(R + rows_ld[:, None] * stride_r + cols[None, :], mask=mask_n[None, :], other=0.0)
        z = x.to(tl.float32) + r.to(tl.float32)
        if HAS_XBIAS:
            z += tl.load(XB + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mean = tl.load(Mean + rows_ld)
        rstd = tl.load(Rstd + rows_ld)
        xhat = ln_xhat(z, mean, rstd)
        dy = tl.load(DY + rows_ld[:, None] * stride_dy + cols[None, :], mask=mask_n[None, :], other=0.0)
        dy = dy.to(tl.float32) * mask_m.to(tl.float32)[:, None]  # padded rows add nothing
        acc_dw += dy * xhat
        acc_db += dy
        # w is re-read every tile (an L1 hit) rather than held: registers are the limit at 8192
        w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)
        dz = ln_bwd_dz(xhat, dy, w, rstd, N)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dz.to(DX.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
        if SUM_DXB:
            acc_dxb += dz
    out = pid.to(tl.int64) * N + cols
    tl.store(DW + out, tl.sum(acc_dw, axis=0), mask=mask_n)
    tl.store(DB + out, tl.sum(acc_db, axis=0), mask=mask_n)
    if SUM_DXB:
        tl.store(DXB + out, tl.sum(acc_dxb, axis=0), mask=mask_n)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------


# Backward warps by BLOCK_N under triton < 3.9 (``_compile.OLD_PTXAS``: 3.6.0 is what the GPU
# machines run), measured with triton 3.6.0 (``python -m bertfast.kernels.compile_check --op add_layernorm``;
# registers, spill-store bytes), with ``ln_config``'s 8 warps on sm_80:
# * BN=2048 R=1: 4 - 8 B (fp32 with x_bias, 80 regs; bf16 16-divisible, 64 regs) -> 16 warps:
#   51 - 64 regs, no spill (every dtype / variant, sm_90 and sm_80);
# * BN=4096 R=1: 4 - 12 B (fp32 / fp16 / bf16 generic, 128 regs; 16 warps still 4 B, bf16
#   16-divisible, 64 regs) -> 32 warps: 44 - 59 regs, no spill.
# Rows and BLOCK_N (hence every result) stay; triton 3.9 keeps 8 warps (no spill there).
_OLD_PTXAS_BWD_WARPS = {2048: 16, 4096: 32}


def _config(n: int):
    """``ln_config`` for this op, with the triton-version rule above."""
    from dataclasses import replace

    cfg = ln_config(n, OP)
    if OLD_PTXAS and cfg.block_n in _OLD_PTXAS_BWD_WARPS:
        cfg = replace(cfg, bwd_num_warps=_OLD_PTXAS_BWD_WARPS[cfg.block_n])
    return cfg


# Rows per program of the split-K input (``add_layernorm_partials``) by BLOCK_N, where ``ln_config``'s
# spill with the planes' loads: BN=128 R=16 fp16 / bf16 generic on sm_80, 8 B (splits 2 and 4,
# triton 3.9; ``python -m bertfast.kernels.compile_check --op add_layernorm``) -> R=8: no spill.
# Rows are independent, so the result is the same bits; only the grid changes.
_PARTIALS_ROWS = {128: 8}


@functools.lru_cache(maxsize=None)
def _partials_config(n: int):
    """The forward configuration of the split-K input: ``_config`` with the rows rule above."""
    from dataclasses import replace

    cfg = _config(n)
    return replace(cfg, rows=_PARTIALS_ROWS[cfg.block_n]) if cfg.block_n in _PARTIALS_ROWS else cfg


def _rows2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, N) view with unit column stride (copies only when the last dim is not contiguous)."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _check(x, residual, weight, bias, x_bias, eps):
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_dtype(OP, "x", x)
    check_same_dtype(OP, x=x, residual=residual, weight=weight, bias=bias, x_bias=x_bias)
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dim (..., N), got a scalar")
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"{OP}: residual has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}")
    n = x.shape[-1]
    check_shape(OP, "weight", weight, (n,))
    check_shape(OP, "bias", bias, (n,))
    if x_bias is not None:
        check_shape(OP, "x_bias", x_bias, (n,))
    if not isinstance(eps, (float, int)) or not eps > 0:
        raise ValueError(f"{OP}: eps must be a positive float, got {eps!r}")
    cfg = ln_config(n, OP)
    m = x.numel() // n if n else 0
    if m >= 2**31:
        raise ValueError(f"{OP}: {m} rows is more than the supported 2**31 - 1")
    return cfg


def _forward(x, residual, weight, bias, eps, x_bias, out):
    """Launch the forward kernel; returns (y, mean, rstd)."""
    n = x.shape[-1]
    cfg = ln_config(n, OP)
    m = x.numel() // n
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return out, mean, rstd
    x2, r2 = _rows2d(x, n), _rows2d(residual, n)
    y2 = out.view(-1, n)
    w, b = weight.contiguous(), bias.contiguous()
    xb = x_bias.contiguous() if x_bias is not None else w  # dummy pointer, never read
    grid = (cdiv(m, cfg.rows),)
    with device_ctx(x.device):
        _add_layernorm_fwd_kernel[grid](
            x2, r2, xb, w, b, y2, mean, rstd,
            m, n, x2.stride(0), r2.stride(0), y2.stride(0), float(eps), 0,
            HAS_XBIAS=x_bias is not None, ROWS=cfg.rows, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
    return out, mean, rstd


def _backward(dy, x, residual, weight, x_bias, mean, rstd):
    """Launch the backward kernel; returns (dx, dweight, dbias, dx_bias or None)."""
    n = x.shape[-1]
    cfg = _config(n)
    m = x.numel() // n
    has_xb = x_bias is not None
    sum_dxb = has_xb and cfg.bwd_sums_dxb
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0:
        z = torch.zeros((n,), dtype=weight.dtype, device=x.device)
        return dx, z, z.clone(), (z.clone() if has_xb else None)
    dy2, x2, r2 = _rows2d(dy, n), _rows2d(x, n), _rows2d(residual, n)
    dx2 = dx.view(-1, n)
    w = weight.contiguous()
    xb = x_bias.contiguous() if has_xb else w  # dummy pointer when there is no x_bias, never read
    num_tiles = cdiv(m, cfg.rows)
    g = bwd_num_programs(num_tiles, cfg, x.device)
    partial = torch.empty((3 if sum_dxb else 2, g, n), dtype=torch.float32, device=x.device)
    with device_ctx(x.device):
        _add_layernorm_bwd_kernel[(g,)](
            dy2, x2, r2, xb, w, mean, rstd, dx2, partial[0], partial[1], partial[-1],
            m, n, dy2.stride(0), x2.stride(0), r2.stride(0), dx2.stride(0),
            HAS_XBIAS=has_xb, SUM_DXB=sum_dxb, ROWS=cfg.rows, BLOCK_N=cfg.block_n, num_warps=cfg.bwd_num_warps,
        )
    sums = partial.sum(1).to(weight.dtype)  # deterministic reduction of the per-program partials
    dxb = None
    if has_xb:
        dxb = sums[2] if sum_dxb else dx2.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, sums[0], sums[1], dxb


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, x_bias, eps, out):
        y, mean, rstd = _forward(x, residual, weight, bias, eps, x_bias, out)
        if out is not None:
            ctx.mark_dirty(out)  # written in place: the caller's buffer becomes the differentiable output
        ctx.save_for_backward(x, residual, weight, x_bias, mean, rstd)
        ctx.has_xb = x_bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, residual, weight, x_bias, mean, rstd = ctx.saved_tensors
        dx, dw, db, dxb = _backward(dy, x, residual, weight, x_bias if ctx.has_xb else None, mean, rstd)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dx if need[1] else None,
            dw if need[2] else None,
            db if need[3] else None,
            dxb if need[4] else None,
            None,
            None,
        )


_PLANS = PlanCache()


def _make_plan(x, residual, weight, bias, eps, x_bias, fallback):
    """Every check (raises ValueError), the backend and, for row-major operands, the launch:
    (kernel?, grid or None, m, n, cfg, memo of the planned launch)."""
    cfg = _check(x, residual, weight, bias, x_bias, eps)
    kernel = use_triton(OP, x, residual, weight, bias, x_bias, fallback=fallback)
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    grid = None
    if kernel and m > 0 and all(t is None or t.is_contiguous() for t in (x, residual, weight, bias, x_bias)):
        grid = (cdiv(m, cfg.rows),)
    return kernel, grid, m, n, cfg, {}  # {}: the compiled kernel of the planned launch (Kernel.planned)


def add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    x_bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    fallback: bool = False,
) -> torch.Tensor:
    """``LayerNorm(x + x_bias + residual)`` over the last dim, in one kernel.

    x, residual: (..., N); weight, bias, x_bias: (N,); all one dtype (fp32 / fp16 / bf16);
    N <= 8192.  ``out``: optional contiguous output buffer of x's shape and dtype.  Differentiable
    in every tensor input (Triton backward).  CPU tensors need TRITON_INTERPRET=1 or
    ``fallback=True`` (runs :func:`add_layernorm_reference`).  Checks and launch plan once per
    (shapes, strides, dtypes, device, eps) case (``PlanCache``).
    """
    plan = _PLANS.plan(
        lambda: (meta(x), meta(residual), meta(weight), meta(bias), meta(x_bias), type(eps), eps, fallback,
                 mode_key(x.dtype)) if out is None else None,
        lambda: _make_plan(x, residual, weight, bias, eps, x_bias, fallback))
    check_out(OP, out, tuple(x.shape), x.dtype, x.device)
    kernel, grid, m, n, cfg, memo = plan
    if not kernel:
        y = add_layernorm_reference(x, residual, weight, bias, eps, x_bias)
        if out is not None:
            out.copy_(y)
            return out
        return y
    tensors = (x, residual, weight, bias, x_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _AddLayerNorm.apply(x, residual, weight, bias, x_bias, float(eps), out)
    if grid is not None and out is None:  # planned: contiguous operands, output like x
        return _infer(x, residual, weight, bias, eps, x_bias, m, n, cfg, 1, memo)
    return _forward(x, residual, weight, bias, eps, x_bias, out)[0]


def _infer(x, residual, weight, bias, eps, x_bias, m: int, n: int, cfg, splits: int, memo: dict) -> torch.Tensor:
    """The planned launch without autograd: contiguous operands, a new output like residual.  No
    statistics are kept: one scratch row buffer takes both the mean and the rstd stores (each
    program writes its own rows, nothing reads them).  ``splits`` > 1: x is the (splits, M, N) fp32
    partial sums of a split-K GEMM (``add_layernorm_partials``).  ``memo``: the plan's compiled
    kernel (``Kernel.planned``)."""
    dev = residual.device
    y = torch.empty(residual.shape, dtype=residual.dtype, device=dev)
    scratch = torch.empty((m,), dtype=torch.float32, device=dev)
    with device_ctx(dev):
        _add_layernorm_fwd_kernel.planned(
            memo, (cdiv(m, cfg.rows),),
            (x, residual, x_bias if x_bias is not None else weight, weight, bias, y, scratch, scratch,
             m, n, n, n, n, float(eps), m * n if splits > 1 else 0),
            dict(HAS_XBIAS=x_bias is not None, ROWS=cfg.rows, BLOCK_N=cfg.block_n, SPLITS=splits,
                 num_warps=cfg.num_warps))
    return y


def add_layernorm_partials(
    partials: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    x_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``add_layernorm(x, residual, ...)`` where ``x`` is a split-K GEMM's result still in its fp32
    partial sums: ``partials`` (S, M, N), x = the planes added in order and rounded once to
    residual's dtype (``bertfast.kernels.linear.linear_partials``; the bits of
    ``splitk_reduce_kernel`` + :func:`add_layernorm`, one launch and one round trip of x less).
    residual: contiguous (..., N) of M rows.  Inference only (no autograd): the model calls it with
    no gradient to record."""
    kernel, m, n, cfg, splits, memo = _PARTIAL_PLANS.plan(
        lambda: (meta(partials), meta(residual), meta(weight), meta(bias), meta(x_bias), type(eps), eps,
                 mode_key(residual.dtype)),
        lambda: _make_partials_plan(partials, residual, weight, bias, eps, x_bias))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (residual, weight, bias, x_bias)):
        raise ValueError(f"{OP}: partials input is for inference; an input requires grad")
    if not kernel:  # the PyTorch twin: the same planes' sum, rounded once
        x = partials[0].clone()
        for s in range(1, splits):
            x += partials[s]
        return add_layernorm_reference(x.to(residual.dtype).view(residual.shape), residual, weight, bias, eps, x_bias)
    return _infer(partials, residual, weight, bias, eps, x_bias, m, n, cfg, splits, memo)


_PARTIAL_PLANS = PlanCache()


def _make_partials_plan(partials, residual, weight, bias, eps, x_bias):
    """Every check of ``add_layernorm_partials`` (raises ValueError): (kernel?, m, n, cfg, splits,
    memo of the planned launch); kernel False: the PyTorch twin runs (also for operands that are
    not contiguous)."""
    if not isinstance(partials, torch.Tensor) or partials.dim() != 3 or partials.dtype != torch.float32:
        raise ValueError(f"{OP}: partials must be a (splits, M, N) float32 tensor, got "
                         f"{getattr(partials, 'dtype', type(partials).__name__)} {tuple(getattr(partials, 'shape', ()))}")
    kernel, grid, m, n, _, _ = _make_plan(residual, residual, weight, bias, eps, x_bias, False)
    if tuple(partials.shape[1:]) != (m, n) or not partials.is_contiguous() or partials.device != residual.device:
        raise ValueError(f"{OP}: partials of shape {tuple(partials.shape)} on {partials.device} do not match "
                         f"{m} rows of {n} of residual on {residual.device} (contiguous (splits, M, N) expected)")
    return bool(kernel) and grid is not None, m, n, _partials_config(n), partials.shape[0], {}


def add_layernorm_reference(x, residual, weight, bias, eps=1e-12, x_bias=None) -> torch.Tensor:
    """PyTorch twin: fp32 math, result cast back to x.dtype."""
    z = x.float() + residual.float()
    if x_bias is not None:
        z = z + x_bias.float()
    y = torch.nn.functional.layer_norm(z, (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Compile check (rung 3): every configuration the launchers can pick
# --------------------------------------------------------------------------------------------


def compile_specs(arch: int) -> list[KernelSpec]:
    """Same table on sm_90 and sm_80 (see ``bertfast.kernels._layernorm.ln_config``)."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = triton_ptr_type(dtype)
        for cfg in (_config(c.block_n) for c in all_ln_configs()):
            for has_xb in (False, True):
                label = f"{short_dtype(dtype)} {cfg.label}{' x_bias' if has_xb else ''}"
                fwd_sig = {
                    "X": p, "R": p, "XB": p, "W": p, "B": p, "Y": p, "Mean": "*fp32", "Rstd": "*fp32",
                    "M": "i32", "N": "i32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32", "eps": "fp32",
                    "stride_s": "i32", "HAS_XBIAS": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr",
                    "SPLITS": "constexpr",
                }
                bwd_sig = {
                    "DY": p, "X": p, "R": p, "XB": p, "W": p, "Mean": "*fp32", "Rstd": "*fp32", "DX": p,
                    "DW": "*fp32", "DB": "*fp32", "DXB": "*fp32",
                    "M": "i32", "N": "i32", "stride_dy": "i32", "stride_x": "i32", "stride_r": "i32",
                    "stride_dx": "i32",
                    "HAS_XBIAS": "constexpr", "SUM_DXB": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr",
                }
                fwd_const = {"HAS_XBIAS": has_xb, "ROWS": cfg.rows, "BLOCK_N": cfg.block_n, "SPLITS": 1}
                bwd_const = {"HAS_XBIAS": has_xb, "ROWS": cfg.rows, "BLOCK_N": cfg.block_n,
                             "SUM_DXB": has_xb and cfg.bwd_sums_dxb}
                bwd_label = label + ("" if has_xb == bwd_const["SUM_DXB"] else " (dxb on host)")
                specs.append(KernelSpec(OP, _add_layernorm_fwd_kernel, fwd_sig, fwd_const, cfg.num_warps, 1,
                                        label=label))
                specs.append(KernelSpec(OP, _add_layernorm_bwd_kernel, bwd_sig, bwd_const, cfg.bwd_num_warps, 1,
                                        label=bwd_label))
                if dtype != torch.float32 and has_xb:  # split-K input (add_layernorm_partials): fp32 planes
                    pcfg = _partials_config(cfg.block_n)
                    for splits in SPLIT_K_FACTORS:
                        specs.append(KernelSpec(OP, _add_layernorm_fwd_kernel, dict(fwd_sig, X="*fp32"),
                                                dict(fwd_const, ROWS=pcfg.rows, SPLITS=splits), pcfg.num_warps, 1,
                                                label=f"{short_dtype(dtype)} {pcfg.label} x_bias splitk{splits}"))
    # plus the variant the JIT builds when N % 16 == 0 (rows contiguous, so strides == N)
    return with_aligned(specs, ("N", "stride_x", "stride_r", "stride_y", "stride_s", "stride_dy", "stride_dx"))


# --------------------------------------------------------------------------------------------
# Benchmark (Triton tutorial style): python -m bertfast.kernels.add_layernorm
# --------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import sys

    if not torch.cuda.is_available():
        sys.exit("add_layernorm benchmark: needs a CUDA GPU (run the tests for the interpreter path)")
    import triton.testing

    from bertfast.kernels.testing import assert_close

    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, n in ((16384, 384), (16384, 768), (16384, 1024), (4096, 4096)):
            x = torch.randn(m, n, device=dev, dtype=dtype)
            r = torch.randn(m, n, device=dev, dtype=dtype)
            w = torch.randn(n, device=dev, dtype=dtype)
            b = torch.randn(n, device=dev, dtype=dtype)
            xb = torch.randn(n, device=dev, dtype=dtype)
            assert_close(add_layernorm(x, r, w, b, 1e-12, xb), add_layernorm_reference(x, r, w, b, 1e-12, xb))

            def eager():
                return torch.nn.functional.layer_norm(x + xb + r, (n,), w, b, 1e-12)

            t_tri = triton.testing.do_bench(lambda: add_layernorm(x, r, w, b, 1e-12, xb))
            t_eag = triton.testing.do_bench(eager)
            gbytes = 3 * m * n * x.element_size() / 1e9  # x, residual read; y written
            print(
                f"fwd {str(dtype):15} M={m:6} N={n:5}  triton {t_tri * 1e3:8.1f} us {gbytes / t_tri * 1e3:7.0f} GB/s"
                f"   torch {t_eag * 1e3:8.1f} us {gbytes / t_eag * 1e3:7.0f} GB/s"
            )
            xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
            wg, bg, xbg = w.clone().requires_grad_(), b.clone().requires_grad_(), xb.clone().requires_grad_()
            dy = torch.randn_like(x)
            y_t = add_layernorm(xg, rg, wg, bg, 1e-12, xbg)
            y_e = torch.nn.functional.layer_norm(xg + xbg + rg, (n,), wg, bg, 1e-12)
            params = [xg, rg, wg, bg, xbg]
            t_tri = triton.testing.do_bench(lambda: torch.autograd.grad(y_t, params, dy, retain_graph=True))
            t_eag = triton.testing.do_bench(lambda: torch.autograd.grad(y_e, params, dy, retain_graph=True))
            gbytes = 4 * m * n * x.element_size() / 1e9  # dy, x, residual read; dx written
            print(
                f"bwd {str(dtype):15} M={m:6} N={n:5}  triton {t_tri * 1e3:8.1f} us {gbytes / t_tri * 1e3:7.0f} GB/s"
                f"   torch {t_eag * 1e3:8.1f} us {gbytes / t_eag * 1e3:7.0f} GB/s"
            )
