"""Fused linear layer: ``act(x @ weight.T + bias)`` in one Triton GEMM.

* ``linear(x, weight, bias=None, activation=None, *, out=None, fallback=False)``:
  x (..., K), weight (N, K) as ``nn.Linear`` stores it, bias (N,);
  ``activation`` in ``(None, "gelu", "gelu_tanh")`` (exact erf GELU / tanh approximation) is
  applied with the bias in the GEMM epilogue, on the fp32 accumulator.
* ``linear_reference(x, weight, bias=None, activation=None)``: the same in PyTorch, fp32 math,
  cast back to x's dtype.

The kernel itself (and the block-size rule) lives in ``kernels/_gemm.py``, shared with
``qkv_projection``.  Without bias and activation (BERT's attention-output and FFN2 projections,
whose bias and residual go into the add + LayerNorm kernel) the default there may be split-K (small
M) or the persistent TMA kernel (large M, sm_90): ``_gemm.pick_config``.

Autograd: the backward uses torch matmuls (dX = dZ @ W, dW = dZ^T @ X, db = sum dZ).  With an
activation, dZ = dY * act'(Z) needs the pre-activation Z: the forward kernel *saves* it (a
second store in the same epilogue, only when a gradient is needed).  Saving costs one (M, N)
tensor, exactly what eager ``F.gelu`` keeps for its backward, and avoids recomputing the GEMM
(which would add a third GEMM to the two of the backward, +50% backward FLOPs).  Z is the
fp32 accumulator plus bias rounded once to the input dtype, the same value eager PyTorch would
hand to GELU in that dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from bertfast.kernels import _gemm
from bertfast.kernels._common import PlanCache, check_dtype, check_out, check_same_dtype, meta, mode_key, use_triton

OP = "linear"
ACTIVATIONS = (None, "gelu", "gelu_tanh")
_TORCH_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


# --------------------------------------------------------------------------- reference
def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None
) -> torch.Tensor:
    """PyTorch twin of ``linear``: fp32 math, result cast back to x's dtype."""
    _check_activation(activation)
    z = torch.matmul(x.float(), weight.float().t())
    if bias is not None:
        z = z + bias.float()
    if activation is not None:
        z = F.gelu(z, approximate=_TORCH_APPROX[activation])
    return z.to(x.dtype)


# --------------------------------------------------------------------------- checks
def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _validate(x, weight, bias, activation, out) -> tuple[int, int, int]:
    """Every check, before anything is launched; returns (M, N, K)."""
    _check_activation(activation)
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_dtype(OP, "x", x)
    check_same_dtype(OP, x=x, weight=weight, bias=bias)
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension (..., K), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(
            f"{OP}: weight has shape {tuple(weight.shape)} but x has K={K} features (last dim of x "
            f"{tuple(x.shape)}); expected weight of shape (N, {K})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"{OP}: bias has shape {tuple(bias.shape)}; expected ({N},) to match weight {tuple(weight.shape)}")
    check_out(OP, out, (*x.shape[:-1], N), x.dtype, x.device)
    return math.prod(x.shape[:-1]), N, K


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernel reads rows with unit stride along the last dim; any row stride is fine."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- launcher
def _forward(x, weight, bias, activation, out, save_pre: bool):
    """Launch (or skip for empty problems); returns (y, pre-activation or None)."""
    M, K = math.prod(x.shape[:-1]), x.shape[-1]
    N = weight.shape[0]
    y = out if out is not None else torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    want_pre = save_pre and activation is not None
    pre = torch.empty_like(y) if want_pre else None
    if M == 0 or N == 0:
        return y, pre
    if K == 0:  # nothing to multiply: the result is act(bias)
        z = torch.zeros((M, N), dtype=torch.float32, device=x.device)
        if bias is not None:
            z += bias.float()
        if pre is not None:
            pre.copy_(z.view(pre.shape))
        if activation is not None:
            z = F.gelu(z, approximate=_TORCH_APPROX[activation])
        y.copy_(z.view(y.shape))
        return y, pre
    x2 = _k_contiguous(x.reshape(M, K))
    w = _k_contiguous(weight)
    b = bias.contiguous() if bias is not None else None
    _gemm.launch_gemm(
        x2, w, b, y.view(M, N), activation=_gemm.ACTIVATIONS[activation],
        pre=pre.view(M, N) if pre is not None else None,
    )
    return y, pre


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        y, pre = _forward(x, weight, bias, activation, None, save_pre=True)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, pre)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, pre = ctx.saved_tensors
        N, K = weight.shape
        dz = dy.reshape(-1, N)
        if ctx.activation is not None:
            # act'(Z) in fp32 on the saved pre-activation, one rounding back to the dtype
            dz = torch.ops.aten.gelu_backward(
                dz.float(), pre.reshape(-1, N).float(), approximate=_TORCH_APPROX[ctx.activation]
            ).to(dy.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dz @ weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = dz.t() @ x.reshape(-1, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dz.float().sum(0).to(dy.dtype)
        return dx, dw, db, None


_PLANS = PlanCache()


class _Plan:
    """The checks' verdict and the launch plan of one (shapes, strides, dtypes, device) case."""

    __slots__ = ("kernel", "M", "N", "K", "out_shape", "gemm")

    def __init__(self, kernel, M, N, K, out_shape, gemm):
        self.kernel, self.M, self.N, self.K, self.out_shape, self.gemm = kernel, M, N, K, out_shape, gemm


def _make_plan(x, weight, bias, activation, fallback) -> _Plan:
    """Run every check (raises ValueError) and plan the launch.  ``gemm`` is None when the
    operands' layout needs the general path (copies, empty sizes)."""
    M, N, K = _validate(x, weight, bias, activation, None)
    kernel = use_triton(OP, x, weight, bias, fallback=fallback)
    gemm = None
    if kernel and M > 0 and N > 0 and K > 0 and (bias is None or bias.is_contiguous()):
        x2 = _gemm.inplace_operand(x, M, K, weight)  # None: a layout that needs a copy takes the general path
        if x2 is not None:
            gemm = _gemm.plan_gemm(M, N, K, x.dtype, x.device, x2.stride(0), weight.stride(0),
                                   activation=_gemm.ACTIVATIONS[activation], has_bias=bias is not None, has_pre=False)
    return _Plan(kernel, M, N, K, (*x.shape[:-1], N), gemm)


def _plan_of(x, weight, bias, activation, fallback, keyed: bool = True) -> _Plan:
    """This case's plan: made (every check) once per (shapes, strides, dtypes, device, activation,
    mode) and reused; ``keyed`` False (an ``out=`` buffer): made for this call only."""
    return _PLANS.plan(
        lambda: (meta(x), meta(weight), meta(bias), type(activation), activation, fallback,
                 mode_key(x.dtype)) if keyed else None,
        lambda: _make_plan(x, weight, bias, activation, fallback))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    *,
    out: Optional[torch.Tensor] = None,
    fallback: bool = False,
) -> torch.Tensor:
    """``act(x @ weight.T + bias)`` with one Triton GEMM; see the module docstring.

    The checks and the launch plan are made once per (shapes, strides, dtypes, device,
    activation) case and reused (``bertfast.kernels._common.PlanCache``); pointers are checked per call."""
    plan = _plan_of(x, weight, bias, activation, fallback, keyed=out is None)
    check_out(OP, out, plan.out_shape, x.dtype, x.device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad and out is not None:
        raise ValueError(f"{OP}: out= does not support autograd (an input requires grad); call without out=")
    if not plan.kernel:
        y = linear_reference(x, weight, bias, activation)
        return out.copy_(y) if out is not None else y
    if needs_grad:
        return _LinearFunction.apply(x, weight, bias, activation)
    if plan.gemm is not None and out is None and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0:
        y = torch.empty(plan.out_shape, dtype=x.dtype, device=x.device)
        _gemm.run_gemm(plan.gemm, x.view(plan.M, plan.K), weight, bias, y.view(plan.M, plan.N))
        return y
    return _forward(x, weight, bias, activation, out, save_pre=False)[0]


def linear_partials(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """``x @ weight.T`` as the (split_k, M, N) fp32 partial sums of its split-K GEMM, left for the
    consumer to add (``bertfast.kernels.add_layernorm.add_layernorm_partials``), when this case's
    plan is split-K and runs in place: no bias, nothing needs a gradient, row-major 16-byte aligned
    operands.  None otherwise: call :func:`linear`.  Same checks and plan as :func:`linear`."""
    plan = _plan_of(x, weight, None, None, False)
    g = plan.gemm
    if g is None or g.split_k <= 1 or not plan.kernel or x.data_ptr() % 16 or weight.data_ptr() % 16:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    return _gemm.run_gemm_partials(g, x.view(plan.M, plan.K), weight)


# --------------------------------------------------------------------------- compile check
def compile_specs(arch: int) -> list:
    """Every configuration ``linear`` can launch on ``arch``: each dtype / precision x each
    block configuration of ``_gemm.gemm_configs`` x bias x activation x (pre-activation store,
    used when a gradient is needed), and the plain GEMMs' defaults (split-K with its reduction,
    the persistent TMA kernel on sm_90: ``_gemm.plain_default_specs``)."""
    flags = []
    for has_bias in (False, True):
        flags.append(dict(HAS_BIAS=has_bias))
        for act in (_gemm.ACT_GELU, _gemm.ACT_GELU_TANH):
            for store_pre in (False, True):
                flags.append(dict(HAS_BIAS=has_bias, ACTIVATION=act, STORE_PRE=store_pre))
    return _gemm.gemm_specs(OP, arch, flags) + _gemm.plain_default_specs(OP, arch)


# --------------------------------------------------------------------------- quick check
if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("kernels/linear.py: the correctness check and timing need a CUDA GPU; none found "
                         "(run `python -m pytest tests/test_linear.py` for the interpreter tests)")
    import triton

    from bertfast.kernels.testing import assert_close

    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (M, N, K), act in (((4096, 3072, 768), "gelu"), ((4096, 768, 3072), None), ((37, 1000, 1000), "gelu_tanh")):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
            b = torch.randn(N, device=dev, dtype=dtype)
            y = linear(x, w, b, act)
            assert_close(y, linear_reference(x, w, b, act), factor=4.0 if K > 512 else 1.0, msg=f"{dtype} {M}x{N}x{K} {act}")
            ms = triton.testing.do_bench(lambda: linear(x, w, b, act))
            approx = _TORCH_APPROX.get(act)
            ms_t = triton.testing.do_bench(
                lambda: F.gelu(F.linear(x, w, b), approximate=approx) if act else F.linear(x, w, b)
            )
            tflops = lambda t: 2 * M * N * K / t * 1e-9
            print(f"{str(dtype):15} M={M:5} N={N:5} K={K:5} {str(act):9}  triton {ms:7.3f} ms {tflops(ms):6.1f} TFLOP/s"
                  f"   torch {ms_t:7.3f} ms {tflops(ms_t):6.1f} TFLOP/s")
    print("linear: correct")
