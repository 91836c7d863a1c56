"""The Triton forward pass of a BERT encoder.

It runs on any module tree with transformers' BERT names, so the same code serves bertfast's own
``BertModel`` (``backend="triton"``) and a ``transformers`` BertModel accelerated in place by
``bertfast.optimize``.  Parameters are read from the modules at every call: nothing is copied,
fine-tuning updates are seen at once.

Per layer (x: (T, C) packed tokens, or (B, S, C) padded)::

    qkv = qkv_projection(x, [Wq; Wk; Wv], [bq; bk; bv])     # (3, T, H, D) / (3, B, H, S, D)
    a   = attention_varlen(q, k, v, cu_seqlens)              # (T, H, D)    / attention -> (B, S, H, D)
    x   = add_layernorm(linear(a, Wo), x, ln1, x_bias=bo)    # bias + residual + LayerNorm, one kernel
    h   = linear(x, Wi, bi, activation="gelu")               # bias + GELU in the GEMM epilogue
    x   = add_layernorm(linear(h, Wo2), x, ln2, x_bias=bo2)

Padding-free execution (flash-attention's bert_padding idea): the token ids are gathered once,
every layer runs on the packed real tokens, and the output is scattered back once
(``kernels.pad``), padded positions zero.  The layout is a ``kernels.padding.Packing`` computed
once per forward by the caller: bertfast's ``BertModel`` decides padded vs packed in one place
(``bertfast.modeling.plan_forward``, which also keeps exactness: see its docstring) and passes
``packing=`` (a Packing, or None for the padded batch); then this module reads nothing on the
host.  ``bertfast.optimize`` makes the same decision with the same function.

Training: hidden dropout is applied to each projection's output (bias included) before the
add + LayerNorm kernel, exactly as the reference.  The fused attention kernel has no dropout: with
``attention_probs_dropout_prob > 0`` in training mode the attention core runs PyTorch SDPA (with
dropout) on the padded layout; everything else stays on the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernels._common import trusted_inputs
from kernels.padding import Packing

try:  # triton is a Linux x86-64 dependency; without it only the torch backend exists
    from kernels import ops
except ImportError:  # pragma: no cover
    ops = None

# hidden_act -> activation fused into the up-projection GEMM (None: applied by torch after it)
_FUSED_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_TORCH_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "swish": F.silu}


@dataclass
class _Batch:
    """How the tokens of one forward are laid out for the attention kernels."""

    B: int
    S: int
    varlen: bool
    mask: Optional[torch.Tensor] = None  # padded: (B, S) 0/1 or 4-D additive; None = no padding
    indices: Optional[torch.Tensor] = None  # varlen: (T,) flat indices of real tokens in B*S
    cu_seqlens: Optional[torch.Tensor] = None  # varlen: (B + 1,) int32
    max_seqlen: int = 0
    causal: bool = False
    hidden_act: str = "gelu"


# ----------------------------------------------------------------------------- parameters


def num_heads(attn_self) -> int:
    return getattr(attn_self, "num_heads", None) or attn_self.num_attention_heads


def is_causal(attn_self) -> bool:
    """bertfast: ``causal``; transformers: ``is_causal`` / ``is_decoder`` (decoder self-attention)."""
    for name in ("causal", "is_causal", "is_decoder"):
        if hasattr(attn_self, name):
            return bool(getattr(attn_self, name))
    return False


def attention_dropout_p(attn_self) -> float:
    p = getattr(attn_self, "dropout_p", None)
    if p is None:
        drop = getattr(attn_self, "dropout", None)
        p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
    return float(p)


def fused_qkv(attn_self) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated [query; key; value] weight (3C, C) and bias (3C,): a ``torch.cat`` of the
    three Linear parameters, built at every call (differentiable when gradients are enabled).

    Deliberately not cached: a cache keyed on the parameters' identity (storage pointer, version
    counter) misses writes that bypass the version counter (through a numpy view, ``.data``,
    DLPack, another process), and then silently runs stale weights.  The copy costs one read and
    one write of 3C x C weights per layer per forward (bert-base fp16: 3.5 MB per layer), small
    against the layer's GEMMs except at the tiniest batches."""
    lins = (attn_self.query, attn_self.key, attn_self.value)
    return torch.cat([lin.weight for lin in lins]), torch.cat([lin.bias for lin in lins])


def position_table(embeddings) -> torch.Tensor:
    pe = getattr(embeddings, "position_embeddings", None)
    if pe is not None:
        return pe.weight
    return embeddings.sinusoidal_positions  # bertfast's fixed sinusoidal table


# ----------------------------------------------------------------------------- pieces


def _dense_add_layernorm(dense, ln, dropout, h, residual, training: bool) -> torch.Tensor:
    """LayerNorm(dropout(dense(h)) + residual): GEMM without bias, then bias + residual + LN in one
    kernel; in training with dropout the bias goes into the GEMM so dropout sees it."""
    p = dropout.p if training and isinstance(dropout, torch.nn.Dropout) else 0.0
    if p > 0.0:
        y = F.dropout(ops.linear(h, dense.weight, dense.bias), p, training=True)
        return ops.add_layernorm(y, residual, ln.weight, ln.bias, ln.eps)
    y = ops.linear(h, dense.weight, None)
    return ops.add_layernorm(y, residual, ln.weight, ln.bias, ln.eps, dense.bias)


def _attention(attn_self, x: torch.Tensor, batch: _Batch, training: bool) -> torch.Tensor:
    """Self-attention of one layer up to (not including) the output projection: (..., C)."""
    H = num_heads(attn_self)
    C = x.shape[-1]
    w, b = fused_qkv(attn_self)
    qkv = ops.qkv_projection(x, w, b, H)  # (3, T, H, D) or (3, B, H, S, D)
    q, k, v = qkv[0], qkv[1], qkv[2]
    p = attention_dropout_p(attn_self) if training else 0.0
    if batch.varlen:
        a = ops.attention_varlen(q, k, v, batch.cu_seqlens, batch.max_seqlen, causal=batch.causal)  # (T, H, D)
        return a.view(x.shape[0], C)
    if p > 0.0:  # the fused kernel has no dropout: SDPA with dropout on (B, H, S, D)
        mask = batch.mask
        if mask is not None and mask.dim() == 2:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                mask == 0, torch.finfo(q.dtype).min)[:, None, None, :]
        if batch.causal and mask is not None:
            S = q.shape[-2]
            future = torch.ones(S, S, dtype=torch.bool, device=q.device).triu_(1)
            mask = mask.masked_fill(future, torch.finfo(q.dtype).min)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                           is_causal=batch.causal and mask is None)  # (B, H, S, D)
        return a.transpose(1, 2).reshape(batch.B, batch.S, C)
    a = ops.attention(q, k, v, batch.mask, causal=batch.causal)  # (B, S, H, D)
    return a.view(batch.B, batch.S, C)


def layer_forward(layer, x: torch.Tensor, batch: _Batch, training: bool) -> torch.Tensor:
    """One post-LN BERT layer on the kernels; x (T, C) or (B, S, C)."""
    attn = layer.attention
    a = _attention(attn.self, x, batch, training)
    x = _dense_add_layernorm(attn.output.dense, attn.output.LayerNorm, attn.output.dropout, a, x, training)
    act_name = batch.hidden_act
    inter = layer.intermediate.dense
    fused = _FUSED_ACTIVATIONS.get(act_name)
    if fused is not None:
        h = ops.linear(x, inter.weight, inter.bias, fused)
    else:
        h = _TORCH_ACTIVATIONS[act_name](ops.linear(x, inter.weight, inter.bias))
    out = layer.output
    return _dense_add_layernorm(out.dense, out.LayerNorm, out.dropout, h, x, training)


# ----------------------------------------------------------------------------- whole encoder


def encoder_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    token_type_ids: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    *,
    output_hidden_states: bool = False,
    packing: Optional[Packing] = None,
    return_packed: bool = False,
    layer_fn=None,
):
    """Embeddings + every layer on the kernels.  ``model`` has ``.config.hidden_act``,
    ``.embeddings`` and ``.encoder.layer`` with transformers' names.  Inputs are assumed
    validated (the caller's job, before this): the kernels run in trusted mode, with no per-layer
    host reads.

    ``packing``: the caller's decision (``bertfast.modeling.plan_forward``), a
    ``kernels.padding.Packing`` (run the packed real tokens, varlen attention) or None (run the
    padded batch with ``attention_mask`` as given: a 2-D 0/1 mask, a 4-D additive one, or None
    for no padding).  Nothing is read on the host here.

    ``layer_fn(layer, x, batch, training)``: runs one layer (default ``layer_forward``; e.g. a
    gradient-checkpointed wrapper of it).

    Returns (last_hidden_state (B, S, C), hidden_states or None), plus, with ``return_packed``,
    the last layer's output as the layers produced it ((T, C) packed, or (B, S, C)) and the
    Packing used (or None)."""
    args = (model, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, packing,
            return_packed, layer_fn)
    if torch.compiler.is_compiling():  # value checks are off while tracing anyway
        return _encoder_forward(*args)
    with trusted_inputs():
        return _encoder_forward(*args)


def _encoder_forward(model, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                     packing, return_packed, layer_fn):
    emb = model.embeddings
    act = model.config.hidden_act
    if act not in _FUSED_ACTIVATIONS and act not in _TORCH_ACTIVATIONS:
        raise ValueError(f"bertfast: hidden_act {act!r} is not supported by the triton backend")
    layers = model.encoder.layer
    training = model.training
    B, S = input_ids.shape
    causal = is_causal(layers[0].attention.self) if len(layers) else False
    mask = attention_mask
    varlen = packing is not None
    if varlen:
        indices, cu_seqlens, max_seqlen = packing.indices, packing.cu_seqlens, packing.max_seqlen
    ln = emb.LayerNorm
    table = position_table(emb)
    pad_idx = getattr(emb.word_embeddings, "padding_idx", None)
    if varlen:
        if position_ids is None:
            pos = (indices % S)[None]  # (1, T)
        else:
            pos = position_ids.expand(B, S).reshape(-1)[indices][None]  # (1, T)
        ids = input_ids.reshape(-1)[indices][None]  # (1, T)
        tts = token_type_ids.reshape(-1)[indices][None] if token_type_ids is not None else None
        x = ops.embeddings_layernorm(ids, tts, pos, emb.word_embeddings.weight, table,
                                     emb.token_type_embeddings.weight, ln.weight, ln.bias, ln.eps,
                                     padding_idx=pad_idx)[0]  # (T, C)
        batch = _Batch(B, S, True, None, indices, cu_seqlens, max_seqlen, causal, act)
    else:
        x = ops.embeddings_layernorm(input_ids, token_type_ids, position_ids, emb.word_embeddings.weight, table,
                                     emb.token_type_embeddings.weight, ln.weight, ln.bias, ln.eps,
                                     padding_idx=pad_idx)  # (B, S, C)
        if causal and mask is not None and mask.dim() == 4 and mask.is_floating_point():
            # an additive mask: fold the causal part in at the same finite value (as the torch
            # path and transformers do), so that a query that sees no real key (a padded first
            # token) gets the uniform softmax over every key, not only key 0 of the kernel's -inf
            future = torch.ones(S, S, dtype=torch.bool, device=mask.device).triu_(1)  # (S, S)
            mask = mask.masked_fill(future, torch.finfo(mask.dtype).min)  # (B|1, 1|H, S, S)
            causal = False
        batch = _Batch(B, S, False, mask, causal=causal, hidden_act=act)
    x = F.dropout(x, emb.dropout.p, training=True) if training and emb.dropout.p > 0 else x

    def restore(h):  # (T, C) -> (B, S, C) with zeros at padding
        return ops.pad(h, batch.indices, B, S) if batch.varlen else h

    hidden = [restore(x)] if output_hidden_states else None
    run_layer = layer_fn if layer_fn is not None else layer_forward
    for layer in layers:
        x = run_layer(layer, x, batch, training)
        if hidden is not None:
            hidden.append(restore(x))
    last = hidden[-1] if hidden is not None else restore(x)
    hidden = tuple(hidden) if hidden is not None else None
    if return_packed:
        return last, hidden, x, packing
    return last, hidden
