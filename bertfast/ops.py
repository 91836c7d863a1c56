"""The ops a BERT layer calls.  Each picks, per call, the Triton kernel or PyTorch.

    qkv_projection(x, attn_self, H)        # (B, S, C) -> q, k, v (B, H, S, D);  (T, C) -> (T, H, D) each
    attention(q, k, v, mask, ...)          # -> (B, S, C)   (padded batch; mask: bertfast.masks.ForwardMask)
    attention_varlen(q, k, v, packing, ...)  # -> (T, C)    (packed real tokens)
    linear(x, weight, bias, activation)    # bias + activation fused into the GEMM epilogue on the kernels
    add_layernorm(y, residual, ln, x_bias) # LayerNorm(y + x_bias + residual), one kernel
    embeddings_layernorm(...)              # word + position + token type, LayerNorm

The rule, the same for every op: the kernels run when the forward's ``kernels`` flag is set
(``bertfast.backend.resolve_for``: the user's backend choice, the device, the interpreter, the
config's head size / activation / position embeddings and the dtype, decided once per forward)
and the op itself can serve the call; otherwise the op runs its PyTorch path.  What an op's
kernel cannot serve: attention with dropout in training (no dropout in the fused kernel: SDPA),
attention probabilities (``need_weights``: the explicit softmax), an activation the GEMM
epilogue lacks (the GEMM on the kernels, the activation by torch), ``inputs_embeds`` (nothing to
gather).  The PyTorch paths compute exactly what transformers' BERT modules compute (same ops,
same order), so the torch backend matches transformers within rounding.

The ops read parameters from the modules at every call: nothing is copied or cached.  The fused
QKV weight is the one exception to "nothing copied" in training (a ``torch.cat`` of the three
Linear weights, differentiable); in inference it is a zero-copy view when the three weights lie
back to back in one storage, as bertfast's own models keep them (``fuse_qkv_storage``).

The PyTorch path in inference (no autograd recording: ``torch.inference_mode`` / ``no_grad``)
runs that fused view as one QKV GEMM, and writes the activation and the residual add into the
GEMM outputs it just made instead of new tensors (the same values, fewer allocations).  An
opt-in int8 linear (bertfast/quantize.py) is called as a module (``is_quantized``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from bertfast import cpu_linear
from bertfast.activations import get_activation, get_activation_, kernel_epilogue
from bertfast.masks import fold_causal

try:  # triton is a Linux x86-64 dependency; without it only the PyTorch paths exist
    from bertfast.kernels import ops as kops
except ImportError:  # pragma: no cover
    kops = None


# ----------------------------------------------------------------------------- fused QKV weight


def _back_to_back(ts: Tuple[torch.Tensor, ...]) -> bool:
    """Whether the tensors are contiguous, alike, and lie one after the other in memory that
    belongs to the first one's storage (so that one strided view of it covers all of them)."""
    first = ts[0]
    shape, dtype, n = first.shape, first.dtype, first.numel()
    step = n * first.element_size()
    ptr = first.data_ptr()
    for i, t in enumerate(ts):
        if t.dtype != dtype or t.shape != shape or not t.is_contiguous() or t.data_ptr() != ptr + i * step:
            return False
    st = first.untyped_storage()  # the span lies inside it (adjacent separate allocations do not pass)
    return first.storage_offset() * first.element_size() + len(ts) * step <= st.nbytes()


def fused_qkv_view(query, key, value) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The fused [query; key; value] weight (3C, C) and bias (3C,) as zero-copy views of the
    live parameters, or None when they do not lie back to back in one storage."""
    qp, kp, vp = query._parameters, key._parameters, value._parameters  # (nn.Module.__getattr__ costs ~1.4 us)
    ws = (qp["weight"], kp["weight"], vp["weight"])
    bs = (qp["bias"], kp["bias"], vp["bias"])
    if any(b is None for b in bs) or not (_back_to_back(ws) and _back_to_back(bs)):
        return None
    C_out, C_in = ws[0].shape
    return ws[0].as_strided((3 * C_out, C_in), (C_in, 1)), bs[0].as_strided((3 * C_out,), (1,))


def fused_qkv(query, key, value) -> Tuple[torch.Tensor, torch.Tensor]:
    """The [query; key; value] weight (3C, C) and bias (3C,) of three nn.Linear.

    A zero-copy view of the live parameters when they lie back to back in one storage and no
    gradient is wanted (inference); otherwise a ``torch.cat`` (differentiable), built at every
    call.  Never cached: either way the values are those of the parameters now."""
    qp, kp, vp = query._parameters, key._parameters, value._parameters
    ws = (qp["weight"], kp["weight"], vp["weight"])
    bs = (qp["bias"], kp["bias"], vp["bias"])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in ws + bs)
    if not grad and not torch.compiler.is_compiling():
        wb = fused_qkv_view(query, key, value)
        if wb is not None:
            return wb
    return torch.cat(ws), torch.cat(bs)


@torch.no_grad()
def fuse_qkv_storage(query, key, value) -> None:
    """Put the three Linear weights (and biases) back to back in one new storage each, in place
    (``param.data``: the Parameter objects, their names and any optimizer state stay), so that
    ``fused_qkv`` needs no copy.  Called by bertfast's attention module after construction and
    after every ``.to()`` / ``.half()`` / ``.cuda()``."""
    for attr in ("weight", "bias"):
        ps = [getattr(m, attr) for m in (query, key, value)]
        if any(p is None for p in ps) or _back_to_back(tuple(ps)):
            continue
        if len({(p.shape, p.dtype, p.device) for p in ps}) != 1:
            continue
        buf = torch.empty((3, *ps[0].shape), dtype=ps[0].dtype, device=ps[0].device)
        for i, p in enumerate(ps):
            buf[i].copy_(p)
        for i, p in enumerate(ps):
            p.data = buf[i]


# ----------------------------------------------------------------------------- the ops


def inference() -> bool:
    """No autograd graph is being recorded (``torch.no_grad`` / ``torch.inference_mode``): the
    PyTorch paths may then write into tensors they made themselves and fuse the QKV GEMM."""
    return not torch.is_grad_enabled()


def is_quantized(linear) -> bool:
    """A linear layer replaced by an opt-in quantized one (bertfast/quantize.py): called as a
    module, ``y = linear(x)`` with its bias; it has no ``weight`` parameter."""
    return getattr(linear, "quantized", False)


def qkv_projection(x: torch.Tensor, attn_self, num_heads: int, kernels: bool):
    """q, k, v of one layer: x (B, S, C) -> three (B, H, S, D) views; x (T, C) -> three (T, H, D).

    PyTorch path in inference: one GEMM on the fused [query; key; value] weight when it is a
    zero-copy view (bertfast's own models; ``fused_qkv``): fewer, wider GEMMs, each output the
    same dot products as the three Linears'."""
    mods = attn_self._modules
    if kernels:
        w, b = fused_qkv(mods["query"], mods["key"], mods["value"])
        return kops.qkv_projection(x, w, b, num_heads).unbind(0)  # 3 x (B, H, S, D) / (T, H, D)
    C = x.shape[-1]
    D = C // num_heads
    lins = (mods["query"], mods["key"], mods["value"])
    y = None
    if "qkv_int8" in mods:  # opt-in int8 (bertfast/quantize.py): one fused int8 GEMM
        y = mods["qkv_int8"](x)  # (..., 3C)
    elif inference() and not any(is_quantized(m) for m in lins) and not torch.compiler.is_compiling():
        wb = fused_qkv_view(*lins)
        if wb is not None:  # (..., 3C); on CPU the implementation chosen for this class (bertfast/cpu_linear.py)
            y = cpu_linear.linear(x, *wb) if cpu_linear.usable(x, wb[0]) else F.linear(x, *wb)
    if y is not None:
        if x.dim() == 2:  # packed (T, C) -> 3 x (T, H, D)
            return y.view(x.shape[0], 3, num_heads, D).unbind(1)
        B, S, _ = x.shape  # (B, S, 3, H, D) -> 3 x (B, H, S, D)
        return y.view(B, S, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    if x.dim() == 2:  # packed (T, C)
        T = x.shape[0]
        return tuple(lin(x).view(T, num_heads, D) for lin in lins)
    B, S, _ = x.shape
    # (B, S, C) -> (B, S, H, D) -> (B, H, S, D); views, no copies
    return tuple(lin(x).view(B, S, num_heads, D).transpose(1, 2) for lin in lins)


def attention(q, k, v, mask, *, dropout_p: float, training: bool, need_weights: bool, kernels: bool,
              probs: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Self-attention core of the padded batch: q, k, v (B, H, S, D) -> (B, S, C) (heads merged).
    ``mask``: the forward's ``bertfast.masks.ForwardMask`` (causal included).  With
    ``need_weights`` the probabilities (B, H, S, S) are appended to ``probs``."""
    B, H, S, D = q.shape
    p = dropout_p if training else 0.0
    if kernels and p == 0.0 and not need_weights:
        a = kops.attention(q, k, v, mask.kernel, causal=mask.kernel_causal)  # (B, S, H, D)
        return a.view(B, S, H * D)
    y, w = attention_torch(q, k, v, mask.additive(), mask.torch_causal, p, training, need_weights)
    if need_weights and probs is not None:
        probs.append(w)
    return y.transpose(1, 2).reshape(B, S, H * D)  # (B, H, S, D) -> (B, S, C)


def attention_varlen(q, k, v, packing, *, causal: bool, dropout_p: float, training: bool,
                     kernels: bool) -> torch.Tensor:
    """Self-attention within each packed sequence: q, k, v (T, H, D) -> (T, C)."""
    T, H, D = q.shape
    if kernels:  # (the plan never packs a training forward with attention dropout on the kernels)
        a = kops.attention_varlen(q, k, v, packing.cu_seqlens, packing.max_seqlen, causal=causal)  # (T, H, D)
        return a.view(T, H * D)
    return attention_varlen_torch(q, k, v, packing.seqlens, causal, dropout_p, training).view(T, H * D)


def linear(x, weight, bias, activation: Optional[str], kernels: bool,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """activation(x @ weight.T + bias) (+ ``residual``, shaped like the output); ``activation``: a
    name of the activation table or None.  PyTorch path in inference on CPU: the implementation
    chosen for this shape class on this CPU (bertfast/cpu_linear.py), which may fuse the
    activation or the residual add into the GEMM."""
    if kernels:
        epi = kernel_epilogue(activation) if activation is not None else None
        y = kops.linear(x, weight, bias, epi)
        if activation is not None and epi is None:
            y = get_activation(activation)(y)
        return y if residual is None else y.add_(residual)
    if cpu_linear.usable(x, weight):
        return cpu_linear.linear(x, weight, bias, activation, residual)
    y = F.linear(x, weight, bias)
    if activation is not None:
        y = (get_activation_(activation) if inference() else get_activation(activation))(y)  # y is ours
    if residual is not None:
        y = y.add_(residual) if inference() else y + residual
    return y


def add_layernorm(y, residual, ln, x_bias: Optional[torch.Tensor], kernels: bool, owned: bool = False) -> torch.Tensor:
    """LayerNorm(y + x_bias + residual) with ``ln``'s weight, bias and eps.  ``owned``: ``y`` is a
    temporary of the caller's that the PyTorch path may overwrite (in inference).  ``residual``
    None: already in ``y`` (added by ``linear``; PyTorch path)."""
    p = ln._parameters
    if kernels:
        return kops.add_layernorm(y, residual, p["weight"], p["bias"], ln.eps, x_bias)
    if x_bias is not None:
        y = y + x_bias
    if residual is not None:
        y = y.add_(residual) if owned and inference() else y + residual
    return F.layer_norm(y, ln.normalized_shape, p["weight"], p["bias"], ln.eps)


def linear_partials(h, weight) -> Optional[torch.Tensor]:
    """h @ weight.T as a split-K GEMM's fp32 partial sums, or None (``bertfast.kernels.ops.linear_partials``)."""
    return kops.linear_partials(h, weight)


def add_layernorm_partials(partials, residual, ln, x_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """LayerNorm(partials added + x_bias + residual) (``bertfast.kernels.ops.add_layernorm_partials``)."""
    p = ln._parameters
    return kops.add_layernorm_partials(partials, residual, p["weight"], p["bias"], ln.eps, x_bias)


def dense_add_layernorm(h, weight, x_bias: Optional[torch.Tensor], residual, ln) -> torch.Tensor:
    """LayerNorm(h @ weight.T + x_bias + residual) on the kernels: an output block (attention
    output, FFN2).  Where the GEMM's plan is split-K (small M, fp16 / bf16) and nothing needs a
    gradient, the LayerNorm kernel adds the GEMM's fp32 partial sums itself (the same bits as the
    GEMM's own reduction kernel, one launch less); otherwise ``linear`` then ``add_layernorm``."""
    partials = linear_partials(h, weight)
    if partials is not None:
        return add_layernorm_partials(partials, residual, ln, x_bias)
    return add_layernorm(linear(h, weight, None, None, True), residual, ln, x_bias, True)


def embeddings_layernorm(input_ids, token_type_ids, position_ids, inputs_embeds, word, position_table,
                         token_type, ln, kernels: bool) -> torch.Tensor:
    """LayerNorm(word[ids] + token_type[types] + position_table[positions]) -> (B, S, C).

    ``position_ids`` None: positions 0..S-1; ``token_type_ids`` None: type 0 everywhere."""
    if kernels and inputs_embeds is None:
        return kops.embeddings_layernorm(input_ids, token_type_ids, position_ids, word.weight, position_table,
                                         token_type.weight, ln.weight, ln.bias, ln.eps,
                                         padding_idx=word.padding_idx)
    if inputs_embeds is None:
        inputs_embeds = word(input_ids)  # (B, S, C)
    S = inputs_embeds.shape[1]
    if position_ids is None:
        pos = position_table[:S]  # (S, C): broadcast over the batch (no gather)
    else:
        pos = F.embedding(position_ids, position_table)  # (B|1, S, C) or (S, C)
    typ = token_type.weight[0] if token_type_ids is None else token_type(token_type_ids)  # (C,) / (B, S, C)
    return ln(inputs_embeds + typ + pos)


# ----------------------------------------------------------------------------- PyTorch attention cores


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additive_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q @ k^T / sqrt(D) + mask) @ v.

    q, k, v: (B, H, S, D); additive_mask: float, broadcastable to (B, H, S, S), or None;
    causal: query i sees keys 0..i only.  Returns (out (B, H, S, D), probs (B, H, S, S) or None);
    probs are returned (after dropout, as transformers does) only when need_weights."""
    p = dropout_p if training else 0.0
    if causal and additive_mask is not None:
        additive_mask = fold_causal(additive_mask, q.shape[-2])  # (B, 1|H, S, S)
        causal = False
    if not need_weights:
        # fused kernel (flash / memory-efficient on CPU and CUDA)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=p, is_causal=causal)
        return out, None
    # explicit path, when the attention probabilities are wanted
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, S, S)
    if additive_mask is not None:
        scores = scores + additive_mask
    if causal:
        scores = fold_causal(scores, scores.shape[-1])
    probs = torch.softmax(scores, dim=-1)  # (B, H, S, S)
    if p > 0.0:
        probs = F.dropout(probs, p=p, training=True)
    out = torch.matmul(probs, v)  # (B, H, S, D)
    return out, probs


def attention_varlen_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqlens: list,
    causal: bool = False,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Attention within each sequence of a packed batch.

    q, k, v: (T, H, D), the tokens of B sequences one after the other, ``seqlens[b]`` of them for
    sequence b (python ints, sum T); a token attends only to its own sequence (and, when causal,
    to the tokens before it there).  No mask, no work on padding.  Returns (T, H, D).

    One unmasked SDPA call per sequence (4-D, so that CPU takes its flash kernel).  On CPU this
    beat scattering q/k/v to a padded (B, H, S, D) layout for one masked SDPA call and gathering
    the result, at every batch shape measured (B x S = 32 x 66 with 71% padding: 5x; 256 x 20: 2x;
    256 x 128: 3.5x; 4 x 512: 3x; 1 thread, H=12, D=32), and sorting the sequences into 4 length
    buckets (one masked call each) on the whole all-MiniLM-L6-v2 forward (175 vs 194 ms)."""
    p = dropout_p if training else 0.0
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D) views (4-D: CPU flash kernel)
    out = [
        F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p, is_causal=causal)[0].transpose(0, 1)  # (L, H, D)
        for qs, ks, vs in zip(q.split(seqlens, 2), k.split(seqlens, 2), v.split(seqlens, 2))
    ]
    return torch.cat(out)  # (T, H, D)
