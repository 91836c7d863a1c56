"""The kernels as ``torch.library`` custom ops, and the entry points the model calls.

Eager calls go straight to the public functions (their ``torch.autograd.Function`` s carry the
Triton backward kernels) with no dispatcher overhead.  While ``torch.compile`` traces, the same
entry points call the registered custom ops ``torch.ops.bertfast.*``: opaque to the compiler,
with fake (meta) implementations that give output shapes, so a bertfast model is captured with
``fullgraph=True`` and no graph breaks.

Autograd through a custom op: each op has a ``*_backward`` op that recomputes the forward inside
and runs the kernels' own backward (the LayerNorm and attention backward kernels, torch matmuls
for the GEMMs).  The recomputation costs one extra forward of that op in compiled training;
eager training does not pay it.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from bertfast.kernels._common import trusted_inputs
from bertfast.kernels.add_layernorm import add_layernorm as _add_layernorm
from bertfast.kernels.add_layernorm import add_layernorm_partials  # noqa: F401  (re-exported; inference, eager)
from bertfast.kernels.attention import AttentionMask, prepare_attention_mask  # noqa: F401  (re-exported)
from bertfast.kernels.attention import attention as _attention
from bertfast.kernels.attention import attention_varlen as _attention_varlen
from bertfast.kernels.embeddings_layernorm import embeddings_layernorm as _embeddings_layernorm
from bertfast.kernels.linear import linear as _linear
from bertfast.kernels.linear import linear_partials as _linear_partials
from bertfast.kernels.padding import pad, unpad  # noqa: F401  (index ops: data-dependent shapes, eager only)
from bertfast.kernels.qkv_projection import qkv_projection as _qkv_projection

NS = "bertfast"


def _trusted(fn):
    """Run a custom op's implementation in ``trusted_inputs()``: compiled code calls it at run
    time, where a launcher's value check would be a host read inside the compiled graph (and
    break CUDA-graph capture of it).  Shape / dtype checks still run.  Value checks (id ranges,
    0/1 masks) do not run in compiled code, the model's included: where inputs may be bad,
    check them eagerly first (``bertfast.validation.validate_inputs``)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with trusted_inputs():
            return fn(*args, **kwargs)

    return run


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def _vjp(fn, inputs: Sequence[Optional[Tensor]], grad: Tensor) -> List[Tensor]:
    """Gradients of ``fn(*inputs)`` w.r.t. the floating tensors among ``inputs``, given the output
    gradient, by recomputing the forward with the eager kernels' autograd."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None and t.is_floating_point() else t for t in inputs]
        out = fn(*leaves)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
    res = []
    for t in leaves:
        if t is not None and t.requires_grad:
            g = next(grads)
            g = torch.zeros_like(t) if g is None else g
            # outputs of a custom op may not alias each other (add_layernorm's dx is also d residual;
            # some backward kernels return views of one buffer)
            ptr = g.untyped_storage().data_ptr()
            if g.numel() and any(r.numel() and r.untyped_storage().data_ptr() == ptr for r in res):
                g = g.clone()
            res.append(g)
        else:
            res.append(grad.new_empty(0))
    return res


def _none_if_absent(g: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else g


def _empty_like_or_placeholder(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else torch.empty_like(t)


# ----------------------------------------------------------------------------- linear


def _act(activation: str) -> Optional[str]:
    return None if activation == "none" else activation


@torch.library.custom_op(f"{NS}::linear", mutates_args=())
@_trusted
def linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    return _linear(x, weight, bias, _act(activation))


@linear_op.register_fake
def _(x, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op(f"{NS}::linear_backward", mutates_args=())
@_trusted
def linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                       activation: str) -> List[Tensor]:
    return _vjp(lambda a, w, b: _linear(a, w, b, _act(activation)), (x, weight, bias), grad)


@linear_backward_op.register_fake
def _(grad, x, weight, bias, activation):
    return [torch.empty_like(x), torch.empty_like(weight), _empty_like_or_placeholder(bias, grad)]


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.activation = inputs[3]


def _linear_bwd(ctx, grad):
    x, w, b = ctx.saved_tensors
    dx, dw, db = linear_backward_op(grad, x, w, b, ctx.activation)
    return dx, dw, _none_if_absent(db, b), None


linear_op.register_autograd(_linear_bwd, setup_context=_linear_setup)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    if _compiling():
        return linear_op(x, weight, bias, activation or "none")
    return _linear(x, weight, bias, activation)


# ----------------------------------------------------------------------------- qkv_projection


@torch.library.custom_op(f"{NS}::qkv_projection", mutates_args=())
@_trusted
def qkv_projection_op(x: Tensor, weight: Tensor, bias: Tensor, num_heads: int) -> Tensor:
    return _qkv_projection(x, weight, bias, num_heads)


def _qkv_shape(x: Tensor, weight: Tensor, num_heads: int) -> tuple:
    C = weight.shape[0] // 3
    D = C // num_heads
    if x.dim() == 2:
        return (3, x.shape[0], num_heads, D)
    return (3, x.shape[0], num_heads, x.shape[1], D)


@qkv_projection_op.register_fake
def _(x, weight, bias, num_heads):
    return x.new_empty(_qkv_shape(x, weight, num_heads))


@torch.library.custom_op(f"{NS}::qkv_projection_backward", mutates_args=())
@_trusted
def qkv_projection_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                               num_heads: int) -> List[Tensor]:
    return _vjp(lambda a, w, b: _qkv_projection(a, w, b, num_heads), (x, weight, bias), grad)


@qkv_projection_backward_op.register_fake
def _(grad, x, weight, bias, num_heads):
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)]


def _qkv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.num_heads = inputs[3]


def _qkv_bwd(ctx, grad):
    x, w, b = ctx.saved_tensors
    dx, dw, db = qkv_projection_backward_op(grad, x, w, b, ctx.num_heads)
    return dx, dw, db, None


qkv_projection_op.register_autograd(_qkv_bwd, setup_context=_qkv_setup)


def qkv_projection(x: Tensor, weight: Tensor, bias: Tensor, num_heads: int) -> Tensor:
    if _compiling():
        return qkv_projection_op(x, weight, bias, num_heads)
    return _qkv_projection(x, weight, bias, num_heads)


# ----------------------------------------------------------------------------- add_layernorm


@torch.library.custom_op(f"{NS}::add_layernorm", mutates_args=())
@_trusted
def add_layernorm_op(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float,
                     x_bias: Optional[Tensor]) -> Tensor:
    return _add_layernorm(x, residual, weight, bias, eps, x_bias)


@add_layernorm_op.register_fake
def _(x, residual, weight, bias, eps, x_bias):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NS}::add_layernorm_backward", mutates_args=())
@_trusted
def add_layernorm_backward_op(grad: Tensor, x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float,
                              x_bias: Optional[Tensor]) -> List[Tensor]:
    return _vjp(lambda a, r, w, b, xb: _add_layernorm(a, r, w, b, eps, xb), (x, residual, weight, bias, x_bias), grad)


@add_layernorm_backward_op.register_fake
def _(grad, x, residual, weight, bias, eps, x_bias):
    return [torch.empty_like(x), torch.empty_like(residual), torch.empty_like(weight), torch.empty_like(bias),
            _empty_like_or_placeholder(x_bias, grad)]


def _addln_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, x_bias = inputs
    ctx.save_for_backward(x, residual, weight, bias, x_bias)
    ctx.eps = eps


def _addln_bwd(ctx, grad):
    x, residual, weight, bias, x_bias = ctx.saved_tensors
    dx, dr, dw, db, dxb = add_layernorm_backward_op(grad, x, residual, weight, bias, ctx.eps, x_bias)
    return dx, dr, dw, db, None, _none_if_absent(dxb, x_bias)


add_layernorm_op.register_autograd(_addln_bwd, setup_context=_addln_setup)


def add_layernorm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-12,
                  x_bias: Optional[Tensor] = None) -> Tensor:
    if _compiling():
        return add_layernorm_op(x, residual, weight, bias, float(eps), x_bias)
    return _add_layernorm(x, residual, weight, bias, eps, x_bias)


def linear_partials(x: Tensor, weight: Tensor) -> Optional[Tensor]:
    """``x @ weight.T`` as a split-K GEMM's fp32 partial sums (``bertfast.kernels.linear.linear_partials``)
    where its plan is split-K and nothing needs a gradient, else None (then call ``linear``); None
    while torch.compile traces (the custom ops carry that path)."""
    if _compiling():
        return None
    return _linear_partials(x, weight)


# ----------------------------------------------------------------------------- embeddings_layernorm


@torch.library.custom_op(f"{NS}::embeddings_layernorm", mutates_args=())
@_trusted
def embeddings_layernorm_op(input_ids: Tensor, token_type_ids: Optional[Tensor], position_ids: Optional[Tensor],
                            word_weight: Tensor, position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor,
                            ln_bias: Tensor, eps: float, padding_idx: Optional[int]) -> Tensor:
    return _embeddings_layernorm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                                 ln_weight, ln_bias, eps, padding_idx=padding_idx)


@embeddings_layernorm_op.register_fake
def _(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight, ln_bias, eps,
      padding_idx):
    return word_weight.new_empty((*input_ids.shape, word_weight.shape[1]))


@torch.library.custom_op(f"{NS}::embeddings_layernorm_backward", mutates_args=())
@_trusted
def embeddings_layernorm_backward_op(grad: Tensor, input_ids: Tensor, token_type_ids: Optional[Tensor],
                                     position_ids: Optional[Tensor], word_weight: Tensor, position_weight: Tensor,
                                     type_weight: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                                     padding_idx: Optional[int]) -> List[Tensor]:
    def fn(we, pe, te, lw, lb):
        return _embeddings_layernorm(input_ids, token_type_ids, position_ids, we, pe, te, lw, lb, eps,
                                     padding_idx=padding_idx)

    return _vjp(fn, (word_weight, position_weight, type_weight, ln_weight, ln_bias), grad)


@embeddings_layernorm_backward_op.register_fake
def _(grad, input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight, ln_bias,
      eps, padding_idx):
    return [torch.empty_like(t) for t in (word_weight, position_weight, type_weight, ln_weight, ln_bias)]


def _emb_setup(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs[:8]])
    ctx.eps, ctx.padding_idx = inputs[8], inputs[9]
    ctx.present = (inputs[1] is not None, inputs[2] is not None)


def _emb_bwd(ctx, grad):
    ids, tt, pos, we, pe, te, lw, lb = ctx.saved_tensors
    grads = embeddings_layernorm_backward_op(grad, ids, tt, pos, we, pe, te, lw, lb, ctx.eps, ctx.padding_idx)
    return (None, None, None, *grads, None, None)


embeddings_layernorm_op.register_autograd(_emb_bwd, setup_context=_emb_setup)


def embeddings_layernorm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                         ln_weight, ln_bias, eps=1e-12, *, padding_idx=None) -> Tensor:
    if _compiling():
        return embeddings_layernorm_op(input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                       type_weight, ln_weight, ln_bias, float(eps), padding_idx)
    return _embeddings_layernorm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                                 ln_weight, ln_bias, eps, padding_idx=padding_idx)


# ----------------------------------------------------------------------------- attention


# The attention op takes either a raw mask (mask_kind = -1: analysed inside, as the eager
# function does) or the tensors of an ``AttentionMask`` (mask_kind = its kind, attention_mask =
# its ``mask``, kvlen = its ``kvlen``): a custom op cannot take the object itself.  While
# torch.compile traces, the entry point prepares the mask in the graph (device ops only, no host
# read) and passes its parts, so the compiled model makes no host read per layer.


def _op_mask(q: Tensor, attention_mask: Optional[Tensor], kvlen: Optional[Tensor], mask_kind: int):
    if mask_kind < 0:
        return attention_mask
    B, H, S, _ = q.shape
    return AttentionMask(int(mask_kind), attention_mask, kvlen, B, None, S)


@torch.library.custom_op(f"{NS}::attention", mutates_args=())
@_trusted
def attention_op(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], causal: bool,
                 scale: Optional[float], kvlen: Optional[Tensor] = None, mask_kind: int = -1) -> Tensor:
    return _attention(q, k, v, _op_mask(q, attention_mask, kvlen, mask_kind), causal=causal, scale=scale)


@attention_op.register_fake
def _(q, k, v, attention_mask, causal, scale, kvlen=None, mask_kind=-1):
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D))


@torch.library.custom_op(f"{NS}::attention_backward", mutates_args=())
@_trusted
def attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor],
                          causal: bool, scale: Optional[float], kvlen: Optional[Tensor] = None,
                          mask_kind: int = -1) -> List[Tensor]:
    mask = _op_mask(q, attention_mask, kvlen, mask_kind)

    def fn(a, b, c):
        return _attention(a, b, c, mask, causal=causal, scale=scale)

    return _vjp(fn, (q, k, v), grad)


@attention_backward_op.register_fake
def _(grad, q, k, v, attention_mask, causal, scale, kvlen=None, mask_kind=-1):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _attn_setup(ctx, inputs, output):
    q, k, v, mask, causal, scale, kvlen, mask_kind = inputs  # defaults filled in by torch
    ctx.save_for_backward(q, k, v, mask, kvlen)
    ctx.causal, ctx.scale, ctx.mask_kind = causal, scale, mask_kind


def _attn_bwd(ctx, grad):
    q, k, v, mask, kvlen = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad, q, k, v, mask, ctx.causal, ctx.scale, kvlen, ctx.mask_kind)
    # one gradient per input; trailing Nones for the defaulted kvlen / mask_kind are dropped
    return dq, dk, dv, None, None, None, None, None


attention_op.register_autograd(_attn_bwd, setup_context=_attn_setup)


def attention(q: Tensor, k: Tensor, v: Tensor, attention_mask=None, *, causal: bool = False,
              scale: Optional[float] = None) -> Tensor:
    """``bertfast.kernels.attention.attention`` (eager) / the ``bertfast::attention`` op (compiling);
    ``attention_mask``: None, a raw mask or an ``AttentionMask`` (``prepare_attention_mask``)."""
    if _compiling():
        B, H, S, _ = q.shape
        pm = prepare_attention_mask(attention_mask, B, H, S)  # traced: device ops only, no host read
        return attention_op(q, k, v, pm.mask, bool(causal), scale, pm.kvlen, int(pm.kind))
    return _attention(q, k, v, attention_mask, causal=causal, scale=scale)


@torch.library.custom_op(f"{NS}::attention_varlen", mutates_args=())
@_trusted
def attention_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
                        scale: Optional[float]) -> Tensor:
    return _attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)


@attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    return torch.empty_like(q)


@torch.library.custom_op(f"{NS}::attention_varlen_backward", mutates_args=())
@_trusted
def attention_varlen_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                 causal: bool, scale: Optional[float]) -> List[Tensor]:
    def fn(a, b, c):
        return _attention_varlen(a, b, c, cu_seqlens, max_seqlen, causal=causal, scale=scale)

    return _vjp(fn, (q, k, v), grad)


@attention_varlen_backward_op.register_fake
def _(grad, q, k, v, cu_seqlens, max_seqlen, causal, scale):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu, max_seqlen, causal, scale = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale


def _varlen_bwd(ctx, grad):
    q, k, v, cu = ctx.saved_tensors
    dq, dk, dv = attention_varlen_backward_op(grad, q, k, v, cu, ctx.max_seqlen, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


attention_varlen_op.register_autograd(_varlen_bwd, setup_context=_varlen_setup)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, causal: bool = False,
                     scale: Optional[float] = None) -> Tensor:
    if _compiling():
        return attention_varlen_op(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), scale)
    return _attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
