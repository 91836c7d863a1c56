"""Fused QKV projection: one GEMM whose epilogue writes straight into the head-split layout.

* ``qkv_projection(x, weight, bias, num_heads, *, out=None, fallback=False)``:
  x (B, S, hidden) -> (3, B, H, S, D), contiguous, with q = out[0], k = out[1], v = out[2];
  x (T, hidden) (packed tokens, padding-free) -> (3, T, H, D).
  weight (3*hidden, hidden) is the concatenation [W_query; W_key; W_value] (nn.Linear layout),
  bias (3*hidden,) likewise (``None`` is accepted too).
* ``qkv_projection_reference(x, weight, bias, num_heads)``: PyTorch, fp32 math, cast back.

Output row m = b*S + s and column n = which*hidden + h*D + d of the (M, 3*hidden) product go to
``out[which, b, h, s, d]``; the kernel computes that address in its store (``HEAD_SPLIT`` in
``kernels/_gemm.py``), so there is no transpose or copy after the GEMM.  A 2-D x is the same
with S = 1.  The backward uses torch matmuls on the gradient permuted back to (M, 3*hidden).
"""
from __future__ import annotations

from typing import Optional

import torch

from bertfast.kernels import _gemm
from bertfast.kernels._common import PlanCache, check_dtype, check_out, check_same_dtype, meta, mode_key, use_triton

OP = "qkv_projection"


def _out_shape(x: torch.Tensor, num_heads: int) -> tuple:
    hidden = x.shape[-1]
    D = hidden // num_heads
    if x.dim() == 3:
        B, S = x.shape[0], x.shape[1]
        return (3, B, num_heads, S, D)
    return (3, x.shape[0], num_heads, D)


# --------------------------------------------------------------------------- reference
def qkv_projection_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int
) -> torch.Tensor:
    """PyTorch twin of ``qkv_projection``: fp32 math, cast back to x's dtype."""
    hidden = x.shape[-1]
    D = hidden // num_heads
    y = torch.matmul(x.float(), weight.float().t())
    if bias is not None:
        y = y + bias.float()
    if x.dim() == 3:
        B, S = x.shape[:2]
        y = y.view(B, S, 3, num_heads, D).permute(2, 0, 3, 1, 4)
    else:
        y = y.view(x.shape[0], 3, num_heads, D).permute(1, 0, 2, 3)
    return y.contiguous().to(x.dtype)


# --------------------------------------------------------------------------- checks
def _validate(x, weight, bias, num_heads, out) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_dtype(OP, "x", x)
    check_same_dtype(OP, x=x, weight=weight, bias=bias)
    if x.dim() not in (2, 3):
        raise ValueError(f"{OP}: x must be (B, S, hidden) or (T, hidden), got shape {tuple(x.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"{OP}: num_heads must be a positive int, got {num_heads!r}")
    hidden = x.shape[-1]
    if hidden % num_heads != 0:
        raise ValueError(f"{OP}: hidden size {hidden} is not divisible by num_heads={num_heads}")
    if weight.dim() != 2 or tuple(weight.shape) != (3 * hidden, hidden):
        raise ValueError(
            f"{OP}: weight has shape {tuple(weight.shape)}; expected (3*hidden, hidden) = ({3 * hidden}, {hidden}) "
            f"for x with hidden={hidden} (the concatenation [query; key; value])"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != 3 * hidden):
        raise ValueError(f"{OP}: bias has shape {tuple(bias.shape)}; expected ({3 * hidden},) (3*hidden)")
    check_out(OP, out, _out_shape(x, num_heads), x.dtype, x.device)


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- launcher
def _forward(x, weight, bias, num_heads, out):
    hidden = x.shape[-1]
    M = x.shape[0] * (x.shape[1] if x.dim() == 3 else 1)
    S = x.shape[1] if x.dim() == 3 else 1
    y = out if out is not None else torch.empty(_out_shape(x, num_heads), dtype=x.dtype, device=x.device)
    if M == 0 or hidden == 0:
        return y
    x2 = _k_contiguous(x.reshape(M, hidden))
    _gemm.launch_gemm(
        x2, _k_contiguous(weight), bias.contiguous() if bias is not None else None, y,
        head_split=(S, hidden // num_heads, hidden),
    )
    return y


class _QKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_heads):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return _forward(x, weight, bias, num_heads, None)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        hidden = x.shape[-1]
        # (3, B, H, S, D) -> (B, S, 3, H, D) -> (M, 3*hidden); (3, T, H, D) -> (T, 3, H, D)
        perm = (1, 3, 0, 2, 4) if dy.dim() == 5 else (1, 0, 2, 3)
        dz = dy.permute(*perm).reshape(-1, 3 * hidden)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dz @ weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = dz.t() @ x.reshape(-1, hidden)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dz.float().sum(0).to(dy.dtype)
        return dx, dw, db, None


_PLANS = PlanCache()


def _make_plan(x, weight, bias, num_heads, fallback):
    """Every check (raises ValueError), the backend and, when the operands can be read in
    place, the GEMM launch plan: (kernel?, output shape, M, hidden, GemmPlan or None)."""
    _validate(x, weight, bias, num_heads, None)
    kernel = use_triton(OP, x, weight, bias, fallback=fallback)
    shape = _out_shape(x, num_heads)
    hidden = x.shape[-1]
    S = x.shape[1] if x.dim() == 3 else 1
    M = x.shape[0] * S
    gemm = None
    if kernel and M > 0 and hidden > 0 and (bias is None or bias.is_contiguous()):
        x2 = _gemm.inplace_operand(x, M, hidden, weight)  # None: a layout that needs a copy takes the general path
        if x2 is not None:
            gemm = _gemm.plan_gemm(M, weight.shape[0], hidden, x.dtype, x.device, x2.stride(0), weight.stride(0),
                                   has_bias=bias is not None, has_pre=False,
                                   head_split=(S, hidden // num_heads, hidden))
    return kernel, shape, M, hidden, gemm


def qkv_projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    num_heads: int,
    *,
    out: Optional[torch.Tensor] = None,
    fallback: bool = False,
) -> torch.Tensor:
    """x @ weight.T + bias written as (3, B, H, S, D) (or (3, T, H, D) for 2-D x).  Checks and
    launch plan once per (shapes, strides, dtypes, device, heads) case (``PlanCache``)."""
    plan = _PLANS.plan(
        lambda: (meta(x), meta(weight), meta(bias), type(num_heads), num_heads, fallback,
                 mode_key(x.dtype)) if out is None else None,
        lambda: _make_plan(x, weight, bias, num_heads, fallback))
    kernel, shape, M, hidden, gemm = plan
    check_out(OP, out, shape, x.dtype, x.device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad and out is not None:
        raise ValueError(f"{OP}: out= does not support autograd (an input requires grad); call without out=")
    if not kernel:
        y = qkv_projection_reference(x, weight, bias, num_heads)
        return out.copy_(y) if out is not None else y
    if needs_grad:
        return _QKVFunction.apply(x, weight, bias, num_heads)
    if gemm is not None and out is None and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0:
        y = torch.empty(shape, dtype=x.dtype, device=x.device)
        _gemm.run_gemm(gemm, x.view(M, hidden), weight, bias, y)
        return y
    return _forward(x, weight, bias, num_heads, out)


# --------------------------------------------------------------------------- compile check
def compile_specs(arch: int) -> list:
    """Every configuration ``qkv_projection`` can launch on ``arch``: each dtype / precision x
    each block configuration of ``_gemm.gemm_configs`` x bias / no bias, head-split store."""
    flags = [dict(HAS_BIAS=b, HEAD_SPLIT=True) for b in (True, False)]
    return _gemm.gemm_specs(OP, arch, flags)


# --------------------------------------------------------------------------- quick check
if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("kernels/qkv_projection.py: the correctness check and timing need a CUDA GPU; none found "
                         "(run `python -m pytest tests/test_qkv_projection.py` for the interpreter tests)")
    import triton

    from bertfast.kernels.testing import assert_close

    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for B, S, hidden, H in ((8, 512, 768, 12), (32, 128, 1024, 16), (3, 77, 384, 6)):
            x = torch.randn(B, S, hidden, device=dev, dtype=dtype)
            w = torch.randn(3 * hidden, hidden, device=dev, dtype=dtype) / hidden**0.5
            b = torch.randn(3 * hidden, device=dev, dtype=dtype)
            y = qkv_projection(x, w, b, H)
            assert_close(y, qkv_projection_reference(x, w, b, H), factor=4.0 if hidden > 512 else 1.0,
                         msg=f"{dtype} B={B} S={S} hidden={hidden}")
            D = hidden // H
            ms = triton.testing.do_bench(lambda: qkv_projection(x, w, b, H))
            # what the unfused model does: one GEMM, then a head-split copy
            ms_t = triton.testing.do_bench(
                lambda: torch.nn.functional.linear(x, w, b).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).contiguous()
            )
            tflops = lambda t: 2 * B * S * 3 * hidden * hidden / t * 1e-9
            print(f"{str(dtype):15} B={B:3} S={S:4} hidden={hidden:5}  triton {ms:7.3f} ms {tflops(ms):6.1f} TFLOP/s"
                  f"   torch+copy {ms_t:7.3f} ms {tflops(ms_t):6.1f} TFLOP/s")
    print("qkv_projection: correct")
