"""Compile-rung study: fuse bias + residual add + LayerNorm into the epilogue of the out-projection
and down-projection GEMMs of a BERT layer (7 launches per layer -> 5)?

    PYTHONPATH=. python benchmarks/epilogue_fusion.py --out benchmarks/results
    PYTHONPATH=. python benchmarks/epilogue_fusion.py --out benchmarks/results --also-python /tmp/venv36/bin/python

What it does (no GPU needed, every number is a *compile-rung prediction*, never a timing):

1. A prototype Triton kernel ``gemm_add_ln_kernel``: ``out = LayerNorm(x @ W^T + bias + residual)``
   for x (M, K), W (768, K) (nn.Linear layout), fp16/bf16 operands, fp32 accumulator, two-pass
   fp32 row statistics, fp16/bf16 output.  LayerNorm needs whole rows, so one program owns a
   BLOCK_M x 768 tile, either as three 256-wide sub-accumulators ("3x256", no wasted MMA) or as one
   1024-wide accumulator masked to 768 ("1x1024", tl.arange needs a power of two; 25 % of the MMA
   and of the accumulator registers are wasted).
2. Compiles a sweep of tiles (BLOCK_M 16/32/64/128, BLOCK_K 32/64, 4/8 warps, 2/3 stages) with
   ``bertfast.kernels._compile.compile_spec`` for sm_90 and sm_80 (registers, spills, shared memory, wgmma),
   and, as the baseline, the unfused pair the model launches today: ``bertfast.kernels._gemm.gemm_kernel``
   at ``pick_config``'s tile for (M, 768, K) plus ``add_layernorm``'s forward kernel.
3. Optionally repeats the compile sweep under another Python (e.g. a triton 3.6 venv, the version
   the GPU machines run) and merges the results.
4. Checks the prototype under ``TRITON_INTERPRET=1`` (a subprocess) against an fp32 torch reference.
5. Derives CTA counts / waves on 132 SMs, occupancy from registers and shared memory, and the HBM
   bytes and launches the fusion saves against the layer's GEMM time at peak.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bertfast.kernels._layernorm import ln_fwd_tile  # noqa: E402

HIDDEN, INTERMEDIATE = 768, 3072
SUB_N = 256
M_VALUES = (128, 1024, 4096, 16384)
# Reference chips (public spec-sheet numbers, used only for the arithmetic below).
SMS = {90: 132, 80: 108}
PEAK_FP16_DENSE = {90: 989e12, 80: 312e12}  # FLOP/s, H100/H200 SXM and A100 SXM
HBM_BW = {90: 4.8e12, 80: 2.0e12}  # B/s, H200 (H100 SXM: 3.35e12) and A100 80GB
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
LAUNCH_US = (2.0, 5.0)  # per saved launch, range given in the brief (eager launch + kernel boundary)


# --------------------------------------------------------------------------------------------
# The prototype kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def gemm_add_ln_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, gamma_ptr, beta_ptr, out_ptr,
    M, K, stride_xm, stride_wn, stride_rm, stride_om, eps,
    N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """out[m, :] = LayerNorm(x[m, :] @ w.T + bias + res[m, :]) * gamma + beta over N columns.

    One program owns BLOCK_M full rows.  WIDE=False: N == 3 * 256, three (BLOCK_M, 256) fp32
    accumulators (three tl.dot per K step, each on a 256-row slice of w).  WIDE=True: one
    (BLOCK_M, next_pow2(N)) accumulator, columns >= N read w row 0 and are masked out of the
    statistics and the store.  Rows past M re-read row 0 (x) / row M - 1 (residual); only the
    store is masked.  DOT_UPCAST: interpreter only (bf16 dot), as in kernels/_gemm.py."""
    pid = tl.program_id(0)
    m0 = pid * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = m0 + rm < M
    rows = tl.where(m_ok, m0 + rm, 0)
    x_ptrs = x_ptr + (rows.to(tl.int64) * stride_xm)[:, None] + offs_k[None, :]
    VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    x_ptrs = tl.multiple_of(x_ptrs, [16, 16])
    res_rows = tl.minimum(m0 + rm, M - 1).to(tl.int64) * stride_rm
    out_base = m0.to(tl.int64) * stride_om
    row_off = rm * stride_om
    if WIDE:
        BN: tl.constexpr = triton.next_power_of_2(N)
        rn = tl.arange(0, BN)
        n_ok = rn < N
        cols = tl.where(n_ok, rn, 0)
        w_ptrs = w_ptr + (cols.to(tl.int64) * stride_wn)[None, :] + offs_k[:, None]
        w_ptrs = tl.multiple_of(w_ptrs, [16, 16])
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_left = tl.multiple_of(K - k0, VEC)
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if DOT_UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        z = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        z += tl.load(res_ptr + res_rows[:, None] + rn[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
        z = tl.where(n_ok[None, :], z, 0.0)  # columns >= N hold x @ w[0]: ln_fwd_tile needs them 0
        g = tl.load(gamma_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        bb = tl.load(beta_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        y, mean, rstd = ln_fwd_tile(z, g, bb, n_ok, N, eps)
        tl.store(out_ptr + out_base + row_off[:, None] + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:
        SUB: tl.constexpr = 256
        tl.static_assert(N == 3 * SUB)
        rn = tl.arange(0, SUB)
        w_ptrs = w_ptr + (rn.to(tl.int64) * stride_wn)[None, :] + offs_k[:, None]
        w_ptrs = tl.multiple_of(w_ptrs, [16, 16])
        w_step = SUB * stride_wn
        acc0 = tl.zeros((BLOCK_M, SUB), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, SUB), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, SUB), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_left = tl.multiple_of(K - k0, VEC)
            kmask = offs_k[:, None] < k_left
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b0 = tl.load(w_ptrs, mask=kmask, other=0.0)
            b1 = tl.load(w_ptrs + w_step, mask=kmask, other=0.0)
            b2 = tl.load(w_ptrs + 2 * w_step, mask=kmask, other=0.0)
            if DOT_UPCAST:
                a = a.to(tl.float32)
                b0 = b0.to(tl.float32)
                b1 = b1.to(tl.float32)
                b2 = b2.to(tl.float32)
            acc0 = tl.dot(a, b0, acc0)
            acc1 = tl.dot(a, b1, acc1)
            acc2 = tl.dot(a, b2, acc2)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        r_ptrs = res_ptr + res_rows[:, None] + rn[None, :]
        z0 = acc0 + tl.load(bias_ptr + rn).to(tl.float32)[None, :] + tl.load(r_ptrs).to(tl.float32)
        z1 = acc1 + tl.load(bias_ptr + SUB + rn).to(tl.float32)[None, :] + tl.load(r_ptrs + SUB).to(tl.float32)
        z2 = acc2 + tl.load(bias_ptr + 2 * SUB + rn).to(tl.float32)[None, :] + tl.load(r_ptrs + 2 * SUB).to(tl.float32)
        mean = (tl.sum(z0, axis=1) + tl.sum(z1, axis=1) + tl.sum(z2, axis=1)) / N
        z0 = z0 - mean[:, None]
        z1 = z1 - mean[:, None]
        z2 = z2 - mean[:, None]
        var = (tl.sum(z0 * z0, axis=1) + tl.sum(z1 * z1, axis=1) + tl.sum(z2 * z2, axis=1)) / N
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        o_ptrs = out_ptr + out_base + row_off[:, None] + rn[None, :]
        smask = m_ok[:, None]
        ty = out_ptr.dtype.element_ty
        y0 = z0 * rstd[:, None] * tl.load(gamma_ptr + rn).to(tl.float32)[None, :] + tl.load(beta_ptr + rn).to(tl.float32)[None, :]
        tl.store(o_ptrs, y0.to(ty), mask=smask)
        y1 = (z1 * rstd[:, None] * tl.load(gamma_ptr + SUB + rn).to(tl.float32)[None, :]
              + tl.load(beta_ptr + SUB + rn).to(tl.float32)[None, :])
        tl.store(o_ptrs + SUB, y1.to(ty), mask=smask)
        y2 = (z2 * rstd[:, None] * tl.load(gamma_ptr + 2 * SUB + rn).to(tl.float32)[None, :]
              + tl.load(beta_ptr + 2 * SUB + rn).to(tl.float32)[None, :])
        tl.store(o_ptrs + 2 * SUB, y2.to(ty), mask=smask)


def fused_linear_add_layernorm(x, w, bias, residual, gamma, beta, eps=1e-12, *, block_m=16, block_k=32, wide=False,
                               num_warps=4, num_stages=2):
    """Launch the prototype (x (M, K), w (N, K), residual (M, N), all contiguous, K % 8 == 0)."""
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    grid = (triton.cdiv(M, block_m),)
    gemm_add_ln_kernel[grid](
        x, w, bias, residual, gamma, beta, out, M, K, x.stride(0), w.stride(0), residual.stride(0), out.stride(0), eps,
        N=N, BLOCK_M=block_m, BLOCK_K=block_k, WIDE=wide, DOT_UPCAST=interp and x.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def reference(x, w, bias, residual, gamma, beta, eps=1e-12):
    z = x.float() @ w.float().t() + bias.float() + residual.float()
    return torch.nn.functional.layer_norm(z, (w.shape[0],), gamma.float(), beta.float(), eps)


# --------------------------------------------------------------------------------------------
# Compile specs
# --------------------------------------------------------------------------------------------
_FUSED_INTS = ("K", "stride_xm", "stride_wn", "stride_rm", "stride_om")  # 16-divisible for BERT (M is not)


def ring_bytes(c: dict) -> int:
    """Operand ring buffer estimate: stages x (BLOCK_M + BLOCK_N) x BLOCK_K x 2 bytes."""
    bn = 1024 if c["wide"] else HIDDEN
    return c["num_stages"] * (c["block_m"] + bn) * c["block_k"] * 2


def fused_sweep(arch: int, quick: bool = False) -> tuple[list[dict], list[dict]]:
    """(configs to compile, configs skipped because the operand ring alone exceeds the chip's
    shared memory).  BLOCK_M 128 (384 fp32 accumulators a thread at 8 warps) is compiled once to
    show the spills; the 1024-wide layout only at BLOCK_K 32 / 2 stages; quick: 2 stages only."""
    from bertfast.kernels._compile import SHARED_MEMORY_LIMIT

    todo, skipped = [], []
    for wide in (False, True):
        for bm in (16, 32, 64, 128):
            for bk in (32, 64):
                for warps in (4, 8):
                    for stages in (2, 3):
                        c = dict(kind="fused", dtype="fp16", wide=wide, block_m=bm, block_k=bk, num_warps=warps,
                                 num_stages=stages, arch=arch)
                        if wide and (bk, stages) != (32, 2) or wide and bm > 32:
                            continue
                        if bm == 128 and (bk, warps, stages) != (32, 8, 2):
                            continue
                        if quick and stages == 3:
                            continue
                        if ring_bytes(c) > SHARED_MEMORY_LIMIT[arch]:
                            skipped.append(dict(c, ring_bytes=ring_bytes(c), limit=SHARED_MEMORY_LIMIT[arch]))
                            continue
                        todo.append(c)
    return todo, skipped


def fused_label(c: dict) -> str:
    return f"{c['dtype']} {c['block_m']}x{'1024' if c['wide'] else '3x256'}x{c['block_k']}"


def _fused_spec(c: dict):
    from bertfast.kernels._compile import KernelSpec

    t = c["dtype"]
    sig = {a: f"*{t}" for a in ("x_ptr", "w_ptr", "bias_ptr", "res_ptr", "gamma_ptr", "beta_ptr", "out_ptr")}
    sig.update({a: "i32" for a in ("M",) + _FUSED_INTS})
    sig["eps"] = "fp32"
    const = dict(N=HIDDEN, BLOCK_M=c["block_m"], BLOCK_K=c["block_k"], WIDE=c["wide"], DOT_UPCAST=False)
    sig.update({k: "constexpr" for k in const})
    divisible = tuple(a for a in sig if sig[a].startswith("*")) + _FUSED_INTS
    return KernelSpec(op="gemm_add_ln", fn=gemm_add_ln_kernel, signature=sig, constexprs=const, num_warps=c["num_warps"],
                      num_stages=c["num_stages"], expect_tensor_cores=True, label=fused_label(c), divisible=divisible)


def baseline_items() -> list[dict]:
    """The unfused pair of today: gemm_kernel (no bias: the bias goes into add_layernorm) at every
    tile pick_config returns for the out-proj (K=768) / down-proj (K=3072) at the M values, plus
    add_layernorm's forward kernel for hidden 768 (with x_bias)."""
    from bertfast.kernels import _gemm

    out, seen = [], set()
    for arch in (90, 80):
        for M in M_VALUES:
            for K in (HIDDEN, INTERMEDIATE):
                cfg = _gemm.pick_config(M, HIDDEN, K, torch.float16, (arch // 10, arch % 10), False)
                key = (arch, cfg.label, cfg.num_warps, cfg.num_stages)
                if key not in seen:
                    seen.add(key)
                    out.append(dict(kind="gemm", arch=arch, dtype="fp16", block_m=cfg.block_m, block_n=cfg.block_n,
                                    block_k=cfg.block_k, group_m=cfg.group_m, num_warps=cfg.num_warps,
                                    num_stages=cfg.num_stages))
        out.append(dict(kind="add_ln", arch=arch, dtype="fp16"))
    return out


def _gemm_spec(c: dict):
    from bertfast.kernels import _gemm
    from bertfast.kernels._compile import KernelSpec

    sig = {"x_ptr": "*fp16", "w_ptr": "*fp16", "bias_ptr": "*fp16", "out_ptr": "*fp16", "pre_ptr": "*fp16",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32",
           "SEQ": "i32", "HEAD_DIM": "i32", "HIDDEN": "i32"}
    const = dict(BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], GROUP_M=c["group_m"],
                 HAS_BIAS=False, ACTIVATION=_gemm.ACT_NONE, STORE_PRE=False, HEAD_SPLIT=False,
                 INPUT_PRECISION="tf32", DOT_UPCAST=False)
    divisible = tuple(a for a in sig if a not in ("M", "SEQ"))
    sig.update({k: "constexpr" for k in const})
    return KernelSpec(op="linear", fn=_gemm.gemm_kernel, signature=sig, constexprs=const, num_warps=c["num_warps"],
                      num_stages=c["num_stages"], expect_tensor_cores=True,
                      label=f"fp16 {c['block_m']}x{c['block_n']}x{c['block_k']}", divisible=divisible)


def _add_ln_spec(arch: int):
    import importlib

    for s in importlib.import_module("bertfast.kernels.add_layernorm").compile_specs(arch):
        if (s.name == "_add_layernorm_fwd_kernel" and s.divisible and s.constexprs.get("BLOCK_N") == 1024
                and s.constexprs.get("HAS_XBIAS") and s.signature.get("X") == "*fp16"):
            return s
    raise RuntimeError("add_layernorm forward spec for hidden 768 fp16 not found")


def _compile_one(item: dict) -> dict:
    from bertfast.kernels._compile import compile_spec

    arch = item["arch"]
    if item["kind"] == "fused":
        spec = _fused_spec(item)
    elif item["kind"] == "gemm":
        spec = _gemm_spec(item)
    else:
        spec = _add_ln_spec(arch)
    t0 = time.time()
    try:
        r = asdict(compile_spec(spec, arch))
    except Exception as e:  # keep the sweep going
        r = dict(op=spec.op, kernel=spec.name, label=spec.label, arch=arch, num_warps=spec.num_warps,
                 num_stages=spec.num_stages, ok=False, error=f"{type(e).__name__}: {e}"[:300], registers=-1,
                 shared_bytes=-1, local_bytes=-1, spill_stores=-1, spill_loads=-1, wgmma=False, mma=False,
                 expect_tensor_cores=True, extra={})
    r["compile_s"] = round(time.time() - t0, 2)
    r["item"] = item
    r["triton"] = triton.__version__
    return r


def compile_all(items: list[dict], jobs: int) -> list[dict]:
    if jobs <= 1:
        return [_compile_one(i) for i in items]
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(_compile_one, items))


def all_items(quick: bool = False) -> tuple[list[dict], list[dict]]:
    items, skipped = [], []
    for arch in (90, 80):
        todo, skip = fused_sweep(arch, quick)
        items += todo
        skipped += skip
        items += [b for b in baseline_items() if b["arch"] == arch]
    return items, skipped


# --------------------------------------------------------------------------------------------
# Correctness under the interpreter
# --------------------------------------------------------------------------------------------
CHECK_CASES = (  # (M, K, dtype, block_m, block_k, wide)
    (40, 64, torch.float16, 16, 32, False),
    (40, 64, torch.float16, 32, 32, True),
    (40, 64, torch.bfloat16, 16, 32, False),
    (40, 768, torch.float16, 32, 64, False),  # out-projection K
    (40, 768, torch.float16, 16, 32, True),
    (40, 3072, torch.bfloat16, 16, 64, False),  # down-projection K
)
TOL = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}  # (atol, rtol) on a unit-variance output


def check_interpreter() -> list[dict]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out = []
    for M, K, dtype, bm, bk, wide in CHECK_CASES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).to(dtype)
        w = (torch.randn(HIDDEN, K, generator=g) / math.sqrt(K)).to(dtype)
        bias = (0.1 * torch.randn(HIDDEN, generator=g)).to(dtype)
        res = torch.randn(M, HIDDEN, generator=g).to(dtype)
        gamma = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype)
        beta = (0.1 * torch.randn(HIDDEN, generator=g)).to(dtype)
        t0 = time.time()
        y = fused_linear_add_layernorm(x, w, bias, res, gamma, beta, 1e-12, block_m=bm, block_k=bk, wide=wide)
        dt = time.time() - t0
        ref = reference(x, w, bias, res, gamma, beta, 1e-12)
        err = (y.float() - ref).abs()
        atol, rtol = TOL[dtype]
        ok = bool(torch.allclose(y.float(), ref, atol=atol, rtol=rtol))
        # what rounding the fp32 reference to the output dtype alone costs, for scale
        round_err = (ref.to(dtype).float() - ref).abs().max().item()
        out.append(dict(M=M, K=K, N=HIDDEN, dtype=str(dtype).replace("torch.", ""), block_m=bm, block_k=bk,
                        layout="1x1024" if wide else "3x256", max_abs_err=err.max().item(),
                        mean_abs_err=err.mean().item(), output_rounding_err=round_err, atol=atol, rtol=rtol, ok=ok,
                        seconds=round(dt, 2)))
    return out


# --------------------------------------------------------------------------------------------
# Derived numbers
# --------------------------------------------------------------------------------------------
def occupancy(r: dict) -> dict:
    """CTAs per SM allowed by registers, shared memory and threads."""
    from bertfast.kernels._compile import SHARED_MEMORY_LIMIT

    threads = 32 * r["num_warps"]
    regs = max(r["registers"], 1)
    by_regs = REGS_PER_SM // (math.ceil(regs / 8) * 8 * threads)
    smem_sm = SHARED_MEMORY_LIMIT[r["arch"]] + 1024  # per-SM capacity; each CTA also reserves 1 KiB
    by_smem = smem_sm // (r["shared_bytes"] + 1024) if r["shared_bytes"] >= 0 else 0
    by_threads = MAX_THREADS_PER_SM // threads
    return dict(ctas_per_sm=max(0, min(by_regs, by_smem, by_threads, MAX_CTAS_PER_SM)), by_regs=by_regs,
                by_smem=by_smem, warps_per_sm=max(0, min(by_regs, by_smem, by_threads)) * r["num_warps"])


def waves(ctas: int, arch: int, per_sm: int) -> dict:
    slots = SMS[arch] * max(per_sm, 1)
    w = -(-ctas // slots)
    return dict(ctas=ctas, waves=w, sm_fill=round(min(ctas, SMS[arch]) / SMS[arch], 3),
                last_wave_fill=round((ctas - (w - 1) * slots) / slots, 3) if ctas else 0.0)


def traffic_model(arch: int) -> list[dict]:
    """Per layer: bytes the two fused LayerNorms avoid, launches saved, vs the GEMM time at peak."""
    rows = []
    for M in (128, 512, 1024, 4096, 16384):
        saved_bytes = 2 * (2 * M * HIDDEN * 2)  # write + re-read the (M, 768) fp16 GEMM output, twice
        t_saved_us = saved_bytes / HBM_BW[arch] * 1e6
        flops_fused = 2 * M * HIDDEN * (HIDDEN + INTERMEDIATE)  # out-proj + down-proj
        flops_layer = 2 * M * HIDDEN * (3 * HIDDEN + HIDDEN + 2 * INTERMEDIATE)  # all four GEMMs
        t_fused_gemms_us = flops_fused / PEAK_FP16_DENSE[arch] * 1e6
        t_gemms_us = flops_layer / PEAK_FP16_DENSE[arch] * 1e6
        # minimum HBM traffic of the two unfused add_layernorm kernels (read y, residual; write out)
        ln_bytes = 2 * (3 * M * HIDDEN * 2)
        rows.append(dict(
            M=M, saved_MB=round(saved_bytes / 1e6, 3), saved_us_at_hbm_peak=round(t_saved_us, 2),
            launches_saved=2, launch_us_saved=[2 * LAUNCH_US[0], 2 * LAUNCH_US[1]],
            outproj_downproj_gemm_us_at_peak=round(t_fused_gemms_us, 2), layer_gemms_us_at_peak=round(t_gemms_us, 2),
            two_add_ln_kernels_us_at_hbm_peak=round(ln_bytes / HBM_BW[arch] * 1e6, 2),
            saved_fraction_of_layer_gemms=round((t_saved_us + 2 * LAUNCH_US[0]) / t_gemms_us, 3),
        ))
    return rows


def gemm_l2_stream(M: int, K: int, bm: int, bn: int) -> dict:
    """Operand bytes every CTA streams through L2 -> SMEM (x rows + w columns over the whole K)."""
    per_cta = (bm + bn) * K * 2
    tiles = -(-M // bm) * -(-HIDDEN // bn)
    return dict(per_cta_MB=round(per_cta / 1e6, 3), total_MB=round(per_cta * tiles / 1e6, 2),
                flop_per_byte=round(2 * bm * bn * K / per_cta, 1))


def problems(r: dict) -> list[str]:
    from bertfast.kernels.compile_check import problems as p

    return p(r)


def summarize(results: list[dict]) -> dict:
    """Per (triton, arch, config): resources, occupancy, waves at the M values."""
    rows = []
    for r in results:
        it = r["item"]
        arch = r["arch"]
        row = dict(triton=r["triton"], arch=arch, kind=it["kind"], label=r["label"], num_warps=r["num_warps"],
                   num_stages=r["num_stages"], ok=r["ok"], error=r["error"], registers=r["registers"],
                   shared_bytes=r["shared_bytes"], local_bytes=r["local_bytes"], spill_stores=r["spill_stores"],
                   spill_loads=r["spill_loads"], wgmma=r["wgmma"], mma=r["mma"], compile_s=r.get("compile_s"),
                   problems=problems(r))
        if r["ok"]:
            row.update(occupancy(r))
            if it["kind"] in ("fused", "gemm"):
                bm = it["block_m"]
                bn = HIDDEN if it["kind"] == "fused" else it["block_n"]
                row["waves"] = {M: waves(-(-M // bm) * -(-HIDDEN // bn), arch, row["ctas_per_sm"]) for M in M_VALUES}
                row["l2_stream_outproj_M4096"] = gemm_l2_stream(4096, HIDDEN, bm, bn)
                row["l2_stream_downproj_M4096"] = gemm_l2_stream(4096, INTERMEDIATE, bm, bn)
        rows.append(row)
    return rows


def _fmt_rows(rows: list[dict]) -> str:
    head = ("| triton | sm | kernel | tile (BMxBNxBK) | warps | stages | regs | spill B | smem KiB | TC | CTA/SM "
            "| CTAs M=128 / 4096 / 16384 | waves M=4096 / 16384 | status |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['triton']} | {r['arch']} | {r['kind']} | {r['label']} | {r['num_warps']} | "
                         f"{r['num_stages']} | - | - | - | - | - | - | - | compile error: {r['error'][:80]} |")
            continue
        tc = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma"] else "none")
        spill = max(r["local_bytes"], r["spill_stores"])
        w = r.get("waves")
        ctas = " / ".join(str(w[M]["ctas"]) for M in (128, 4096, 16384)) if w else "-"
        wv = " / ".join(str(w[M]["waves"]) for M in (4096, 16384)) if w else "-"
        status = "ok" if not r["problems"] else "; ".join(r["problems"])
        lines.append(f"| {r['triton']} | {r['arch']} | {r['kind']} | {r['label']} | {r['num_warps']} | {r['num_stages']} "
                     f"| {r['registers']} | {spill} | {r['shared_bytes'] / 1024:.1f} | {tc} | {r['ctas_per_sm']} "
                     f"| {ctas} | {wv} | {status} |")
    return "\n".join(lines)


def _run_interpreter_check() -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreter-check"], env=env,
                          capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        return [dict(ok=False, error=proc.stderr[-2000:])]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_other_python(python: str, quick: bool, jobs: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    args = [python, os.path.abspath(__file__), "--compile-only", "--quick", "--jobs", str(jobs)]  # always 2-stage only
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return []
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--date", default="2026-12-01", help="date stamp of the output file names")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="skip the 3-stage half of the sweep")
    ap.add_argument("--also-python", default=None, help="another python (e.g. a triton 3.6 venv) to repeat the compile sweep")
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--interpreter-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.interpreter_check:
        print(json.dumps(check_interpreter()))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    items, skipped = all_items(args.quick)
    if args.compile_only:
        print(json.dumps(compile_all(items, args.jobs)))
        return 0

    t0 = time.time()
    results = compile_all(items, args.jobs)
    print(f"compiled {len(results)} kernels with triton {triton.__version__} in {time.time() - t0:.0f} s", file=sys.stderr)
    if args.also_python:
        t1 = time.time()
        other = _run_other_python(args.also_python, args.quick, args.jobs)
        print(f"compiled {len(other)} kernels with {args.also_python} in {time.time() - t1:.0f} s", file=sys.stderr)
        results += other
    t1 = time.time()
    check = _run_interpreter_check()
    print(f"interpreter check in {time.time() - t1:.0f} s: {check}", file=sys.stderr)

    rows = summarize(results)
    data = dict(
        date=args.date, generated=datetime.datetime.now().isoformat(timespec="seconds"),
        command="PYTHONPATH=. python benchmarks/epilogue_fusion.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        note="compile-rung predictions (triton.compile for GPUTarget cuda 90/80 on a CPU machine); no GPU timings",
        triton_versions=sorted({r["triton"] for r in rows}),
        chips=dict(sms=SMS, peak_fp16_dense_flops=PEAK_FP16_DENSE, hbm_bytes_per_s=HBM_BW),
        compile=rows, skipped_ring_exceeds_shared_memory=skipped, interpreter_check=check,
        traffic_model={arch: traffic_model(arch) for arch in (90, 80)},
    )
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"epilogue_fusion_{args.date}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    with open(stem + "_table.md", "w", encoding="utf-8") as f:
        f.write(f"# epilogue fusion compile table ({', '.join(data['triton_versions'])})\n\n{_fmt_rows(rows)}\n")
    print(_fmt_rows(rows))
    print(f"wrote {stem}.json and {stem}_table.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
