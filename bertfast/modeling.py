"""The BERT encoder in plain PyTorch, in one readable file.

Module and parameter names are those of ``transformers``' BertModel, so its checkpoints load with
``strict=True``::

    embeddings.{word,position,token_type}_embeddings.weight, embeddings.LayerNorm.{weight,bias}
    encoder.layer.N.attention.self.{query,key,value}.{weight,bias}
    encoder.layer.N.attention.output.{dense,LayerNorm}.{weight,bias}
    encoder.layer.N.intermediate.dense.{weight,bias}
    encoder.layer.N.output.{dense,LayerNorm}.{weight,bias}
    pooler.dense.{weight,bias}

Shapes: B batch, S sequence length, C hidden size, H heads, D = C // H head size, V vocabulary.

Layers are post-LN, as in the original BERT: ``x = LayerNorm(x + dropout(sublayer(x)))``.

One forward for both backends.  Every module calls the ops of bertfast/ops.py
(``qkv_projection``, ``attention`` / ``attention_varlen``, ``linear``, ``add_layernorm``,
``embeddings_layernorm``), and each op runs its Triton kernel or its PyTorch path by one rule
(see bertfast/ops.py), so there is no second copy of the model.  The layer functions below
(``embed``, ``self_attention``, ``output_block``, ``layer_forward``, ``encoder_forward``) take
the modules as arguments and read only transformers' names, so ``bertfast.optimize`` runs the
same code on a transformers model's own modules (parameters shared, nothing copied).  A forward
is planned once (bertfast/plan.py: padded or packed, one host read) and its mask built once
(bertfast/masks.py); both are handed to every layer in a ``Forward``.  Output classes live in
bertfast/outputs.py, input checks in bertfast/validation.py, QA helpers in bertfast/qa.py and
run-time options (backend, unpad, graphs) in bertfast/options.py.

Position embeddings: ``position_embedding_type="absolute"`` is a learned table
(``embeddings.position_embeddings.weight``, in the state dict).  ``"sinusoidal"`` is the fixed
sine/cosine table of "Attention is all you need"; it is a *non-persistent buffer*
(``embeddings.sinusoidal_positions``): never trained, not a parameter, not in the state dict or
in saved checkpoints (it is recomputed from the config), and a checkpoint that carries a learned
``embeddings.position_embeddings.weight`` is refused by a sinusoidal model under ``strict``.
transformers has no sinusoidal BERT, so such checkpoints load only in bertfast.

Padding-free execution (``config.unpad``; flash-attention's bert_padding idea): given a 2-D padding mask with actual padding, the real tokens are
gathered once before the embeddings (``Packing``, computed once per forward and handed to the
layers, the Triton kernels and the heads), every per-token part (projections, FFN, LayerNorms)
runs on the T packed tokens (T, C) instead of (B, S, C), attention runs one sequence at a time
(``attention_varlen_torch``; the Triton varlen kernel on that backend), and the output is
scattered back once (``bertfast.kernels.pad``) with zeros at padded positions.  The per-token heads (MLM
transform + decoder, token classifier, QA outputs) also run on the T packed tokens only, so no
head ever normalises the all-zero vector of a padded position, and their logits are scattered
back with **0 at padded positions**.

Exactness.  Whatever a user can read (last_hidden_state and hidden_states at real tokens,
pooler_output, every head's logits at real positions, every loss and every gradient) equals the
padded computation (transformers) within rounding.  Where that needs hidden states at padded
positions (transformers computes them: padded queries attend to the real keys), the forward
runs the padded batch instead, by itself.  ``plan_forward`` (bertfast/plan.py) is the one place that decides, from
one host read per forward (shared with the input validation's value checks).  The padded batch
runs when:

* the pooler is computed (``BertModel`` with its pooler, ``BertForSequenceClassification``) and
  some row's first token is padding (left padding, a hole at position 0, a fully padded row);
* a loss reads every position (``BertForQuestionAnswering`` with start/end positions);
* per-token labels (MLM, token classification) are not -100 at some padded position;
* nothing would be gained or it cannot pack: no padding, ``unpad=False``, ``output_attentions``,
  a 4-D mask, a fully padded batch, the torch backend on a non-CPU device, attention dropout in
  training on the Triton backend, or under torch.compile / jit tracing / CUDA graph capture (no
  host read allowed).

``unpad`` (``model.set_backend(name, unpad=...)``, initially ``config.unpad``; run-time only, never saved):

* ``True`` (default): padding-free where exact, as above.
* ``"always"``: padding-free whenever it can pack, with *masked* semantics where the exact
  result needs padded positions: the pooler of a row whose first token is padding is
  ``tanh(pooler.dense.bias)`` (it reads the zero vector), per-token labels at padded positions
  are ignored (as if -100), and the QA loss softmaxes over the real tokens only.
* ``False``: always the padded batch.

A 4-D mask is taken as complete, as transformers takes it: a decoder adds no causal part of its
own to it (``causal_attention``), so prefix-LM and other custom masks apply exactly as given.

Gradient checkpointing (``gradient_checkpointing_enable``, transformers' API, which its Trainer
calls) recomputes the flagged layers in the backward on either backend (``run_layer``).

Fully padded rows follow transformers in the padded batch: their queries see only padding keys,
each at the dtype's most negative finite score, so the softmax is uniform (no NaN).  Token ids,
token types and positions of any integer dtype (int8, uint8, int16, ...) are accepted (widened
to int64 once).  ``forward`` takes transformers' ``use_cache`` / ``past_key_values`` / ``cache``
/ ``encoder_hidden_states`` / ``encoder_attention_mask`` / ``head_mask`` / ``cache_position`` at
their default values (None, or False for use_cache) and refuses other values by name.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from bertfast import backend, ops, program
from bertfast.activations import get_activation
from bertfast.config import UNPAD_MODES, BertConfig, unpad_mode  # noqa: F401  (the one parser of unpad)
from bertfast.masks import ForwardMask, additive_mask_from, build_forward_mask  # noqa: F401
from bertfast.ops import attention_torch, attention_varlen_torch  # noqa: F401  (the PyTorch attention cores)
from bertfast.options import RuntimeOptions, attach, options_of
from bertfast.outputs import (  # noqa: F401  (re-exported: the output classes)
    BaseModelOutputWithPooling,
    CausalLMOutput,
    MaskedLMOutput,
    ModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from bertfast.plan import ForwardPlan, plan_forward, plan_override  # noqa: F401
from bertfast.qa import as_tokenizer, best_span, qa_loss, span_text  # noqa: F401
from bertfast.validation import _wide, check_ignored_kwargs, validate_inputs  # noqa: F401
from bertfast.kernels._common import trusted_inputs
from bertfast.kernels.padding import Packing  # noqa: F401  (the padding-free layout; torch index ops, no triton)


def sinusoidal_table(num_positions: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(num_positions, dim): PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim)).
    Computed in float64, then cast."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # (ceil(dim/2),)
    angle = pos / torch.pow(10000.0, two_i / dim)  # (P, ceil(dim/2))
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return table.to(dtype)


# ----------------------------------------------------------------------------- one forward


@dataclass
class Forward:
    """What every layer of one forward needs, decided once before the embeddings."""

    kernels: bool  # the Triton kernels run (bertfast.backend.resolve_for); each op may still decline
    training: bool
    act: str  # config.hidden_act: a name of bertfast/activations.py's table
    causal: bool
    packing: Optional[Packing]  # packed real tokens (T, C), or None: the padded batch (B, S, C)
    mask: Optional[ForwardMask]  # the padded batch's attention mask (None when packed)
    need_weights: bool = False  # collect attention probabilities (torch path only)
    attentions: Optional[List[torch.Tensor]] = None
    program: Optional[program.ForwardPrograms] = None  # layer programs on (bertfast/program.py)


# transformers' and bertfast's module trees name these differently
def num_heads(attn_self) -> int:
    return getattr(attn_self, "num_heads", None) or attn_self.num_attention_heads


def is_causal(attn_self) -> bool:
    """bertfast: ``causal``; transformers: ``is_causal`` / ``is_decoder`` (decoder self-attention)."""
    for name in ("causal", "is_causal", "is_decoder"):
        if hasattr(attn_self, name):
            return bool(getattr(attn_self, name))
    return False


def causal_attention(layers, attention_mask) -> bool:
    """Whether a forward masks the future: a decoder's layers (``is_causal``), unless the caller's
    mask is 4-D.  transformers takes a 4-D mask as complete (``create_causal_mask`` returns it as
    given and its attention functions then add no causal part), so a prefix-LM or any custom
    mask is applied exactly as given, on both of bertfast's paths."""
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 4:
        return False
    return bool(len(layers)) and is_causal(layers[0].attention.self)


def attention_dropout_p(attn_self) -> float:
    p = getattr(attn_self, "dropout_p", None)
    if p is None:
        drop = getattr(attn_self, "dropout", None)
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    return float(p)


def position_table(embeddings) -> torch.Tensor:  # (P, C)
    pe = getattr(embeddings, "position_embeddings", None)
    if pe is not None:
        return pe.weight
    return embeddings.sinusoidal_positions  # bertfast's fixed sinusoidal table


def _dropout(x: torch.Tensor, drop, training: bool) -> torch.Tensor:
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    return F.dropout(x, p, training=True) if training and p > 0 else x


def embed(emb, input_ids, token_type_ids, position_ids, inputs_embeds, fwd: Optional[Forward] = None) -> torch.Tensor:
    """Embeddings + LayerNorm + dropout: (B, S, C), or (T, C) of the real tokens when packed
    (positions those of the padded batch, so left padding gives what the padded path gives).
    ``fwd`` None: the PyTorch path on the padded batch, dropout as the module's mode says."""
    if fwd is None:
        fwd = Forward(False, emb.training, "gelu", False, None, None)
    pk = fwd.packing
    if pk is not None:
        if position_ids is None:
            position_ids = pk.indices % pk.S  # (T,): each token's position in its row
        else:
            position_ids = pk.gather(position_ids.expand(pk.B, pk.S))
        input_ids = pk.gather(input_ids)[None] if input_ids is not None else None  # (1, T)
        token_type_ids = pk.gather(token_type_ids)[None] if token_type_ids is not None else None  # (1, T)
        inputs_embeds = pk.gather(inputs_embeds)[None] if inputs_embeds is not None else None  # (1, T, C)
        position_ids = position_ids[None]  # (1, T)
    x = ops.embeddings_layernorm(input_ids, token_type_ids, position_ids, inputs_embeds, emb.word_embeddings,
                                 position_table(emb), emb.token_type_embeddings, emb.LayerNorm, fwd.kernels)
    x = _dropout(x, emb.dropout, fwd.training)
    return x[0] if pk is not None else x  # (T, C) / (B, S, C)


def self_attention(attn_self, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """Projections, head split, attention core, head merge: x (B, S, C) / (T, C) -> same shape
    (before the output projection)."""
    q, k, v = ops.qkv_projection(x, attn_self, num_heads(attn_self), fwd.kernels)  # (B, H, S, D) / (T, H, D)
    p = attention_dropout_p(attn_self)
    if fwd.packing is not None:
        return ops.attention_varlen(q, k, v, fwd.packing, causal=fwd.causal, dropout_p=p, training=fwd.training,
                                    kernels=fwd.kernels)  # (T, C)
    return ops.attention(q, k, v, fwd.mask, dropout_p=p, training=fwd.training, need_weights=fwd.need_weights,
                         kernels=fwd.kernels, probs=fwd.attentions)  # (B, S, C)


# Submodules and parameters are read through ``_modules`` / ``_parameters`` in the per-layer code:
# nn.Module.__getattr__ costs ~1.4 us per access, ~40 accesses per layer.  Still read at every
# call (nothing held between forwards), so a replaced module or parameter is seen at once.


def output_block(out, h: torch.Tensor, residual: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """LayerNorm(dropout(dense(h)) + residual) (post-LN), ``out`` with .dense / .dropout /
    .LayerNorm.  On the kernels without dropout the dense bias goes into the add + LayerNorm
    kernel (one pass); with dropout it stays in the GEMM so that dropout sees it."""
    mods = out._modules
    dense_mod, drop, ln = mods["dense"], mods["dropout"], mods["LayerNorm"]
    if ops.is_quantized(dense_mod):  # opt-in int8 (bertfast/quantize.py): inference on CPU only
        return ops.add_layernorm(dense_mod(h), residual, ln, None, False, owned=True)
    dense = dense_mod._parameters
    p = drop.p if fwd.training and isinstance(drop, nn.Dropout) else 0.0
    if fwd.kernels and p == 0.0:
        return ops.dense_add_layernorm(h, dense["weight"], dense["bias"], residual, ln)
    if not fwd.kernels and p == 0.0 and ops.inference():  # PyTorch inference: the residual add in the
        y = ops.linear(h, dense["weight"], dense["bias"], None, False, residual=residual)  # GEMM where the
        return ops.add_layernorm(y, None, ln, None, False)  # CPU chooser fuses it (bertfast/cpu_linear.py)
    y = ops.linear(h, dense["weight"], dense["bias"], None, fwd.kernels)
    return ops.add_layernorm(_dropout(y, drop, fwd.training), residual, ln, None, fwd.kernels, owned=True)


def layer_parts(layer) -> Tuple[tuple, tuple]:
    """What ``layer_ops`` reads from a layer: its parameters in a fixed order, and its other values
    (heads, LayerNorm eps): the layer's part of a layer program's key (bertfast/program.py).
    KeyError / AttributeError for a layer of another make (a quantized linear has no weight)."""
    mods = layer._modules
    attn = mods["attention"]._modules
    s, o, out = attn["self"], attn["output"]._modules, mods["output"]._modules
    sm = s._modules
    params = []
    for m in (sm["query"], sm["key"], sm["value"], o["dense"], mods["intermediate"]._modules["dense"], out["dense"],
              o["LayerNorm"], out["LayerNorm"]):
        p = m._parameters
        params += (p["weight"], p["bias"])
    return tuple(params), (num_heads(s), o["LayerNorm"].eps, out["LayerNorm"].eps)


def layer_forward(layer, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """One post-LN BERT layer, x (B, S, C) / (T, C) -> same shape: ``layer_ops``, replayed from a
    layer program where the forward has them on (bertfast/program.py)."""
    if fwd.program is not None:
        try:
            params, scalars = layer_parts(layer)
        except (KeyError, AttributeError):
            return layer_ops(layer, x, fwd)
        return program.run(functools.partial(layer_ops, layer, x, fwd), x, params, scalars, fwd.program)
    return layer_ops(layer, x, fwd)


def layer_ops(layer, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """One post-LN BERT layer through the ops, x (B, S, C) / (T, C) -> same shape::

        x = LN(x + dropout(Wo attention(x)))
        x = LN(x + dropout(W2 act(W1 x)))

    Everything it reads from the layer is in ``layer_parts`` (a layer program's key)."""
    mods = layer._modules
    attn = mods["attention"]._modules
    a = self_attention(attn["self"], x, fwd)
    x = output_block(attn["output"], a, x, fwd)
    inter_mod = mods["intermediate"]._modules["dense"]
    if ops.is_quantized(inter_mod):  # opt-in int8 (bertfast/quantize.py)
        h = get_activation(fwd.act)(inter_mod(x))
    else:
        inter = inter_mod._parameters
        h = ops.linear(x, inter["weight"], inter["bias"], fwd.act, fwd.kernels)  # bias + activation in the epilogue
    return output_block(mods["output"], h, x, fwd)


def run_layer(layer, x, fwd):
    """One layer of a forward: bertfast's layers through their module call (forward hooks run),
    other trees (transformers' layers under ``bertfast.optimize``) functionally.  A layer whose
    ``gradient_checkpointing`` flag is set (``gradient_checkpointing_enable``, bertfast's or
    transformers') is recomputed in the backward when it trains with gradients enabled, as
    transformers' GradientCheckpointingLayer does: through the layer's
    ``_gradient_checkpointing_func`` (``torch.utils.checkpoint.checkpoint`` with the model's
    checkpointing kwargs; the RNG state is preserved, so dropout replays the same masks)."""
    call = layer if isinstance(layer, BertLayer) else functools.partial(layer_forward, layer)
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        ckpt = getattr(layer, "_gradient_checkpointing_func", None)
        if ckpt is None:
            ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        return ckpt(functools.partial(call, fwd=fwd), x)
    return call(x, fwd)


def encoder_forward(bert, plan: ForwardPlan, input_ids, token_type_ids, position_ids, inputs_embeds, *,
                    kernels: bool, output_hidden_states: bool = False, output_attentions: bool = False,
                    layer_fn=None, causal: Optional[bool] = None, embed_fn=None):
    """Embeddings + every layer of ``bert`` (a module with transformers' names: ``.config``,
    ``.embeddings``, ``.encoder.layer``), as ``plan`` says (bertfast/plan.py).  Inputs are assumed
    validated (the plan did it): on the kernels nothing is read on the host here.

    ``layer_fn(layer, x, fwd)``: runs one layer (default: ``run_layer``); ``embed_fn(input_ids,
    token_type_ids, position_ids, inputs_embeds, fwd)``: the embeddings (default: bertfast's
    through their module call, other trees functionally).  ``causal``: whether the future is
    masked (``causal_attention``; None: as the layers say).

    Returns (last_hidden_state (B, S, C), hidden_states or None, attentions or None, the last
    layer's output as the layers produced it ((T, C) packed, or (B, S, C)))."""
    args = (bert, plan, input_ids, token_type_ids, position_ids, inputs_embeds, kernels, output_hidden_states,
            output_attentions, layer_fn, causal, embed_fn)
    if not kernels or torch.compiler.is_compiling():  # value checks are off while tracing anyway
        return _encoder_forward(*args)
    with trusted_inputs():
        return _encoder_forward(*args)


def _encoder_forward(bert, plan, input_ids, token_type_ids, position_ids, inputs_embeds, kernels,
                     output_hidden_states, output_attentions, layer_fn, causal, embed_fn):
    layers = bert.encoder.layer
    if causal is None:
        causal = causal_attention(layers, None)
    packing = plan.packing
    mask = None
    if packing is None:
        dtype = bert.embeddings.LayerNorm.weight.dtype
        mask = build_forward_mask(plan.mask, plan.B, plan.S, dtype, causal=causal, kernels=kernels,
                                  key_lengths=plan.key_lengths)
    fwd = Forward(kernels, bert.training, bert.config.hidden_act, causal, packing, mask,
                  need_weights=output_attentions, attentions=[] if output_attentions else None)
    if kernels and not bert.training and not output_attentions:
        fwd.program = program.for_forward(fwd.act, causal, packing, mask)
    emb = bert.embeddings  # bertfast's through its module call (forward hooks run); other trees functionally
    emb_fn = embed_fn or (emb if isinstance(emb, BertEmbeddings) else functools.partial(embed, emb))
    x = emb_fn(input_ids, token_type_ids, position_ids, inputs_embeds, fwd)  # (B, S, C) / (T, C)
    restore = packing.pad if packing is not None else (lambda h: h)  # -> (B, S, C), zeros at padding
    hidden = [restore(x)] if output_hidden_states else None
    run = layer_fn if layer_fn is not None else run_layer
    for layer in layers:
        x = run(layer, x, fwd)
        if hidden is not None:
            hidden.append(restore(x))
    last = hidden[-1] if hidden is not None else restore(x)
    attentions = tuple(fwd.attentions) if output_attentions else None
    return last, (tuple(hidden) if hidden is not None else None), attentions, x


# ----------------------------------------------------------------------------- modules


class BertEmbeddings(nn.Module):
    """token + segment (token type) + position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        C = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.position_embedding_type = config.position_embedding_type
        if config.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, C)
        else:  # "sinusoidal": fixed table, a buffer (not trained, not saved; see the module docstring)
            self.position_embeddings = None
            self.register_buffer(
                "sinusoidal_positions", sinusoidal_table(config.max_position_embeddings, C), persistent=False
            )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, C)
        self.LayerNorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_table(self) -> torch.Tensor:  # (P, C)
        return position_table(self)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                fwd: Optional[Forward] = None) -> torch.Tensor:
        """(B, S) ids (or (B, S, C) inputs_embeds) -> (B, S, C); (T, C) when ``fwd`` packs."""
        return embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, fwd)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention: projections -> head split -> attention core -> head merge.
    ``causal=True`` (default: ``config.is_decoder``) masks the future, GPT style.  The query,
    key and value weights (and biases) are kept back to back in one storage, so that the kernels'
    fused QKV projection reads them without a copy (``bertfast.ops.fuse_qkv_storage``)."""

    def __init__(self, config: BertConfig, causal: Optional[bool] = None):
        super().__init__()
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = C // self.num_heads
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        self.dropout_p = config.attention_probs_dropout_prob
        self.causal = bool(config.is_decoder) if causal is None else bool(causal)
        ops.fuse_qkv_storage(self.query, self.key, self.value)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() give every parameter a storage of its own: fuse them again
        out = super()._apply(fn, *args, **kwargs)
        ops.fuse_qkv_storage(self.query, self.key, self.value)
        return out

    def forward(self, x, fwd: Optional[Forward] = None, output_attentions: bool = False):
        """x (B, S, C) -> (y (B, S, C), attention probabilities (B, H, S, S) or None).  In a model
        forward the layers call ``self_attention`` with the forward's ``Forward``; alone (``fwd``
        None) this runs the PyTorch path, unmasked, causal as the module says."""
        if fwd is None:
            mask = build_forward_mask(None, x.shape[0], x.shape[1], x.dtype, causal=self.causal, kernels=False)
            fwd = Forward(False, self.training, "gelu", self.causal, None, mask, need_weights=output_attentions,
                          attentions=[] if output_attentions else None)
        y = self_attention(self, x, fwd)
        return y, (fwd.attentions[-1] if fwd.need_weights and fwd.attentions else None)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig, in_features: Optional[int] = None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual, fwd: Forward):
        return output_block(self, h, residual, fwd)  # LN(dropout(dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, causal: Optional[bool] = None):
        super().__init__()
        self.self = BertSelfAttention(config, causal=causal)
        self.output = BertSelfOutput(config)

    def forward(self, x, fwd: Forward):
        return output_block(self.output, self_attention(self.self, x, fwd), x, fwd)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act

    def forward(self, x, fwd: Optional[Forward] = None):  # (..., intermediate_size)
        if ops.is_quantized(self.dense):
            return get_activation(self.hidden_act)(self.dense(x))
        kernels = fwd.kernels if fwd is not None else False
        return ops.linear(x, self.dense.weight, self.dense.bias, self.hidden_act, kernels)


class BertOutput(BertSelfOutput):
    """The FFN's down-projection + dropout + residual + LayerNorm (BertSelfOutput from intermediate_size)."""

    def __init__(self, config: BertConfig):
        super().__init__(config, config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.gradient_checkpointing = False  # recomputed in the backward (run_layer); gradient_checkpointing_enable

    def forward(self, x, fwd: Forward):
        """x: (B, S, C), or (T, C) packed real tokens when ``fwd.packing``; same shape out."""
        return layer_forward(self, x, fwd)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x):
        return self.activation(self.dense(x[:, 0]))  # first ([CLS]) token: (B, C)


# ----------------------------------------------------------------------------- base class


class BertPreTrainedModel(nn.Module):
    """Shared by BertModel and the heads: weight init, weight tying, from_pretrained/save_pretrained."""

    config_class = BertConfig
    base_model_prefix = "bert"
    # alias key -> key it is tied to (the alias is the same Parameter, and is not saved)
    _tied_weights_keys: dict = {}

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a bertfast.BertConfig, got {type(config).__name__}")
        self.config = config

    # --- init, like transformers: N(0, initializer_range) weights, zero biases, LN = (1, 0)
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)

    def init_weights(self) -> None:
        """(Re-)initialise every weight, then tie."""
        self.apply(self._init_weights)
        self.tie_weights()

    def init_head_weights(self) -> None:
        """Initialise everything but the encoder (``self.bert``), then tie."""
        for name, child in self.named_children():
            if name != self.base_model_prefix:
                child.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        pass

    # --- gradient (activation) checkpointing, transformers' API (its Trainer calls it)
    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers: int = 1,
                                      offload: bool = False) -> None:
        """Recompute every ``every_n_layers``-th layer (layers 0, n, 2n, ...) in the backward
        instead of keeping its activations, as transformers' ``gradient_checkpointing_enable``:
        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (default
        ``{"use_reentrant": False}``); ``offload=True`` keeps what the recompute needs in host
        memory (``torch.autograd.graph.save_on_cpu``).  Applies in training with gradients
        enabled, on both backends (``run_layer``); gradients equal those without it."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"gradient_checkpointing_enable: every_n_layers must be an int >= 1, "
                             f"got {every_n_layers!r}")
        kwargs = dict(gradient_checkpointing_kwargs) if gradient_checkpointing_kwargs is not None else {
            "use_reentrant": False}

        def offloaded(function, *args, **kw):
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return torch.utils.checkpoint.checkpoint(function, *args, **kw)

        func = functools.partial(offloaded if offload else torch.utils.checkpoint.checkpoint, **kwargs)
        for i, layer in enumerate(self._layers()):
            layer.gradient_checkpointing = i % every_n_layers == 0
            layer._gradient_checkpointing_func = func

    def gradient_checkpointing_disable(self) -> None:
        for layer in self._layers():
            layer.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self._layers())

    # transformers >= 5.2x names them activation checkpointing (the old names are its deprecated aliases)
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    activation_checkpointing_disable = gradient_checkpointing_disable
    is_activation_checkpointing = is_gradient_checkpointing

    def _layers(self):
        base = self if isinstance(self, BertModel) else getattr(self, self.base_model_prefix)
        return list(base.encoder.layer)

    def __call__(self, *args, **kwargs):
        # inference on CUDA replays a CUDA graph of the whole call where it can (bertfast/cuda_graphs.py;
        # ``set_backend(..., graphs=False)`` turns it off); everything else runs the forward
        from bertfast.cuda_graphs import maybe_replay

        out = maybe_replay(self, args, kwargs)
        return out if out is not None else super().__call__(*args, **kwargs)

    # --- run-time options (bertfast/options.py; the backend choice itself: bertfast/backend.py)
    @property
    def runtime(self) -> RuntimeOptions:
        """The encoder's RuntimeOptions (backend, unpad, graphs), shared by a head and its encoder."""
        root = self if isinstance(self, BertModel) else getattr(self, self.base_model_prefix)
        return options_of(root)

    def set_backend(self, name: str, unpad=None, graphs=None):
        """Switch in place between "torch", "triton" and "auto"; the module tree, parameters and
        state dict do not change.  ``unpad`` sets padding-free execution (both backends): True
        (default: padding-free where exact), ``"always"`` (padding-free with masked semantics)
        or False (the padded batch); see the module docstring.  ``graphs``: CUDA-graph replay for
        inference on CUDA (default True).  ``config.backend`` / ``config.unpad`` are kept equal
        to the live values for inspection (they are the initial values; never saved)."""
        opts = self.runtime.update(backend=name, unpad=unpad, graphs=graphs)
        for m in self.modules():  # heads and their encoder share one config, but be safe
            cfg = getattr(m, "config", None)
            if isinstance(cfg, BertConfig):
                cfg.backend, cfg.unpad = opts.backend, opts.unpad
        return self

    @property
    def backend(self) -> str:
        return self.runtime.backend

    # --- conveniences
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters, tied ones counted once; transformers' flags (its Trainer calls
        ``num_parameters(exclude_embeddings=True)`` for its FLOP count)."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def get_input_embeddings(self) -> nn.Embedding:
        base = getattr(self, self.base_model_prefix, self)
        return base.embeddings.word_embeddings

    # --- loading / saving (bertfast/loading.py)
    @classmethod
    def from_pretrained(cls, path_or_name, dtype=None, device=None, strict: bool = True, **config_overrides):
        """Load a checkpoint directory (config.json + model.safetensors / pytorch_model.bin, sharded
        too) or a known name (``"minilm"``).  Keywords: config fields to override, and
        transformers' ``torch_dtype`` (= ``dtype``), ``attn_implementation`` (accepted, ignored:
        bertfast runs its own attention) and, for ``BertModel``, ``add_pooling_layer``.  A
        ``device`` this torch cannot use is refused first, by name.  See
        ``bertfast.loading.load_pretrained``."""
        from bertfast.loading import load_pretrained

        return load_pretrained(cls, path_or_name, dtype=dtype, device=device, strict=strict, **config_overrides)

    def save_pretrained(self, save_directory, safe_serialization: bool = True) -> Path:
        """Write config.json + model.safetensors (or pytorch_model.bin) that transformers loads."""
        from bertfast.loading import save_pretrained

        return save_pretrained(self, save_directory, safe_serialization=safe_serialization)


# ----------------------------------------------------------------------------- BertModel


class BertModel(BertPreTrainedModel):
    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        attach(self, RuntimeOptions(backend=config.backend, unpad=config.unpad))
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def uses_triton(self, input_ids=None, output_attentions: bool = False) -> bool:
        """Whether a forward with these inputs runs the Triton kernels (see bertfast/backend.py)."""
        if not torch.is_tensor(input_ids) or output_attentions:  # inputs_embeds / attention probabilities: torch path
            return False
        dtype = self.embeddings.LayerNorm.weight.dtype
        return backend.resolve_for(self.runtime.backend, input_ids.device, self.config, dtype) == "triton"

    def packing_for(self, attention_mask, output_attentions: bool = False, input_ids=None) -> Optional[Packing]:
        """The padding-free layout a torch-path forward of this model would use for this
        (validated) mask, or None when it runs the padded batch (see ``plan_forward``; this
        model's pooler, if any, reads the first token).  For inspection; a forward plans itself."""
        if attention_mask is None or not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
            return None
        if input_ids is None:
            input_ids = torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
        plan = plan_forward(self.config, input_ids, attention_mask, None, None, None, self.dtype,
                            output_attentions=output_attentions, reads_first_token=self.pooler is not None,
                            unpad=self.runtime.unpad)
        return plan.packing

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        output_hidden_states=False,
        output_attentions=False,
        return_dict=True,
        **kwargs,
    ):
        """transformers' BertModel.forward.  Keywords transformers takes for a KV cache or
        cross-attention are accepted at their default values (see ``check_ignored_kwargs``)."""
        check_ignored_kwargs(f"{type(self).__name__}.forward", kwargs)
        out, _, _ = self._run(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                              output_hidden_states, output_attentions)
        return out if return_dict is None or return_dict else out.to_tuple()

    def _run(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
             output_hidden_states=False, output_attentions=False, *, reads_all_positions=False, labels=None):
        """The forward, for BertModel and the heads: -> (BaseModelOutputWithPooling, the last
        layer's packed output (T, C) or None, the Packing or None).  The heads run their per-token
        parts on the packed output; ``reads_all_positions`` / ``labels`` tell the plan what their
        loss reads."""
        output_hidden_states, output_attentions = bool(output_hidden_states), bool(output_attentions)
        input_ids, token_type_ids, position_ids = _wide(input_ids), _wide(token_type_ids), _wide(position_ids)
        dtype = self.embeddings.LayerNorm.weight.dtype
        kernels = self.uses_triton(input_ids, output_attentions)
        cfg = self.config
        causal = causal_attention(self.encoder.layer, attention_mask)
        plan = plan_forward(
            cfg, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dtype,
            triton=kernels, output_attentions=output_attentions,
            attention_dropout=self.training and cfg.attention_probs_dropout_prob > 0,
            causal=causal, reads_first_token=self.pooler is not None,
            reads_all_positions=reads_all_positions, labels=labels, unpad=self.runtime.unpad,
        )
        x, hidden_states, attentions, packed = encoder_forward(
            self, plan, input_ids, token_type_ids, position_ids, inputs_embeds, kernels=kernels,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions, causal=causal)
        pooled = self.pooler(x) if self.pooler is not None else None  # (B, C)
        out = BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states, attentions=attentions
        )
        return out, (packed if plan.packing is not None else None), plan.packing


# ----------------------------------------------------------------------------- task heads


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """transform, then the decoder.  ``config.tie_word_embeddings=True`` (the default): its weight is
    the word-embedding matrix and its bias is ``bias`` (the same Parameters, as in transformers).
    False: ``decoder.weight`` and ``decoder.bias`` are Parameters of their own (as transformers 5
    does), loaded from and saved to the checkpoint; ``bias`` is kept (and saved) but unused."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        if config.tie_word_embeddings:
            self.decoder.bias = self.bias

    def forward(self, x):
        return self.decoder(self.transform(x))  # (B, S, V)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


def _head_forward_bert(model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                       output_hidden_states, output_attentions, kwargs=None, **needs):
    """The encoder of a head: -> (BaseModelOutputWithPooling, packed last output (T, C) or
    None, Packing or None).  ``needs``: what the head's loss reads (``plan_forward``)."""
    check_ignored_kwargs(f"{type(model).__name__}.forward", kwargs or {})
    return model.bert._run(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, output_attentions, **needs)


def _per_token(head, o, packed, packing):
    """A per-token head on the real tokens only: on the packed output (T, C) when the forward
    packed (the logits scattered back, 0 at padded positions), else on the padded batch.
    Returns (logits (B, S, ...), packed logits (T, ...) or None)."""
    if packing is None:
        return head(o.last_hidden_state), None
    lp = head(packed)  # (T, ...)
    return packing.pad(lp), lp


def _token_loss(logits, packed_logits, packing, labels):
    """Cross-entropy of per-token labels (-100 = ignored).  Packed: over the real tokens only
    (labels at padded positions play no part)."""
    n = logits.shape[-1]
    if packing is not None and labels.numel() == packing.B * packing.S:
        return F.cross_entropy(packed_logits.reshape(-1, n), packing.gather(labels.reshape(packing.B, packing.S)),
                               ignore_index=-100)
    return F.cross_entropy(logits.reshape(-1, n), labels.reshape(-1), ignore_index=-100)


class BertForMaskedLM(BertPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_head_weights()

    def tie_weights(self) -> None:
        """Tie (``config.tie_word_embeddings``) or untie the decoder; ``_tied_weights_keys`` (per
        instance) lists the alias keys loading and saving skip: none when untied."""
        head = self.cls.predictions
        if self.config.tie_word_embeddings:
            head.decoder.weight = self.bert.embeddings.word_embeddings.weight
            head.decoder.bias = head.bias
            self._tied_weights_keys = dict(type(self)._tied_weights_keys)
            self._untied_fallback_keys = {}
            return
        # untied: own Parameters (copies, should they still be shared from an earlier tie)
        if head.decoder.weight is self.bert.embeddings.word_embeddings.weight:
            head.decoder.weight = nn.Parameter(head.decoder.weight.detach().clone())
        if head.decoder.bias is head.bias:
            head.decoder.bias = nn.Parameter(head.bias.detach().clone())
        self._tied_weights_keys = {}
        # a checkpoint written before transformers 5 has no decoder.bias (it was ``bias`` itself)
        self._untied_fallback_keys = {"cls.predictions.decoder.bias": "cls.predictions.bias"}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=False, output_attentions=False,
                return_dict=True, **kwargs):
        """labels: (B, S) token ids, -100 where no loss is wanted.  Padding-free, the head runs on
        the real tokens only and the logits at padded positions are 0."""
        o, packed, packing = _head_forward_bert(self, input_ids, attention_mask, token_type_ids, position_ids,
                                                inputs_embeds, output_hidden_states, output_attentions, kwargs,
                                                labels=labels)
        logits, lp = _per_token(self.cls, o, packed, packing)  # (B, S, V)
        loss = _token_loss(logits, lp, packing, labels) if labels is not None else None
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=o.hidden_states, attentions=o.attentions)
        return out if return_dict is None or return_dict else out.to_tuple()


class BertForSequenceClassification(BertPreTrainedModel):
    """[CLS] pooled output -> dropout -> classifier.  A sentence pair is one sequence
    ``[CLS] a [SEP] b [SEP]`` with token_type_ids 0 for a, 1 for b."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_head_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=False, output_attentions=False,
                return_dict=True, **kwargs):
        """labels: (B,) class ids (cross-entropy) or, when num_labels == 1, (B,) targets (MSE);
        float (B, num_labels) labels or config.problem_type="multi_label_classification": BCE."""
        o, _, _ = _head_forward_bert(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                     output_hidden_states, output_attentions, kwargs)
        logits = self.classifier(self.dropout(o.pooler_output))  # (B, num_labels)
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif not labels.is_floating_point():
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                if self.num_labels == 1:
                    loss = F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
                else:
                    loss = F.mse_loss(logits, labels.to(logits.dtype))
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            elif problem == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                raise ValueError(f"config.problem_type {problem!r} is not supported")
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=o.hidden_states, attentions=o.attentions)
        return out if return_dict is None or return_dict else out.to_tuple()


class BertForTokenClassification(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_head_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=False, output_attentions=False,
                return_dict=True, **kwargs):
        """labels: (B, S) class ids, -100 where ignored (padding, sub-word continuations).
        Padding-free, the classifier runs on the real tokens only; logits at padded positions are 0."""
        o, packed, packing = _head_forward_bert(self, input_ids, attention_mask, token_type_ids, position_ids,
                                                inputs_embeds, output_hidden_states, output_attentions, kwargs,
                                                labels=labels)
        logits, lp = _per_token(lambda h: self.classifier(self.dropout(h)), o, packed, packing)  # (B, S, num_labels)
        loss = _token_loss(logits, lp, packing, labels) if labels is not None else None
        out = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=o.hidden_states, attentions=o.attentions)
        return out if return_dict is None or return_dict else out.to_tuple()


class BertForQuestionAnswering(BertPreTrainedModel):
    """Extractive QA: per-token start/end logits over ``[CLS] question [SEP] context [SEP]``."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"BertForQuestionAnswering needs num_labels=2 (start, end), got num_labels={config.num_labels}")
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_head_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_hidden_states=False,
                output_attentions=False, return_dict=True, **kwargs):
        """start_positions/end_positions: (B,) token indices; positions outside the sequence are
        clamped to S and ignored in the loss (as transformers).  The loss softmaxes over every
        position, padding included (as transformers): with both given the forward runs the padded
        batch, unless ``unpad="always"`` (then the softmax is over the real tokens only and a
        position on a padded token is ignored like one outside the sequence: ``qa_loss``).
        Padding-free, the logits at padded positions are 0."""
        with_loss = start_positions is not None and end_positions is not None
        o, packed, packing = _head_forward_bert(self, input_ids, attention_mask, token_type_ids, position_ids,
                                                inputs_embeds, output_hidden_states, output_attentions, kwargs,
                                                reads_all_positions=with_loss)
        logits, _ = _per_token(self.qa_outputs, o, packed, packing)  # (B, S, num_labels)
        start_logits = logits[..., 0].contiguous()  # (B, S)
        end_logits = logits[..., 1].contiguous()  # (B, S)
        loss = None
        if with_loss:  # packed although the loss reads every position: unpad="always", real tokens only
            padding = (attention_mask == 0) if packing is not None else None
            loss = qa_loss(start_logits, end_logits, start_positions, end_positions, padding)
        out = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                           hidden_states=o.hidden_states, attentions=o.attentions)
        return out if return_dict is None or return_dict else out.to_tuple()

    @torch.no_grad()
    def answer(self, question: str, context: str, tokenizer, max_answer_len: int = 30) -> dict:
        """The best answer span of ``context`` for ``question``.

        tokenizer: a ``tokenizers.Tokenizer``, a path to a tokenizer.json (or a directory holding
        one), or any object with a ``tokenizer`` attribute that is one (e.g. a SentenceEncoder).
        Returns {"answer", "start", "end" (character offsets in context), "score",
        "start_token", "end_token"}."""
        tok = as_tokenizer(tokenizer)
        enc = tok.encode(question, context)
        keep = [i for i, a in enumerate(enc.attention_mask) if a]  # drop padding, if the tokenizer pads
        if len(keep) > self.config.max_position_embeddings:
            raise ValueError(
                f"question + context is {len(keep)} tokens; the model takes at most "
                f"{self.config.max_position_embeddings}"
            )
        dev = self.device
        ids = torch.tensor([[enc.ids[i] for i in keep]], dtype=torch.long, device=dev)
        types = torch.tensor([[enc.type_ids[i] for i in keep]], dtype=torch.long, device=dev)
        in_context = torch.tensor([enc.sequence_ids[i] == 1 for i in keep], device=dev)
        was_training = self.training
        self.eval()
        try:
            out = self(input_ids=ids, token_type_ids=types)
        finally:
            self.train(was_training)
        s, e, score = best_span(out.start_logits[0], out.end_logits[0], max_answer_len=max_answer_len, mask=in_context)
        s, e = keep[s], keep[e]  # back to the tokenizer's positions
        start_char, end_char = enc.offsets[s][0], enc.offsets[e][1]
        return {"answer": context[start_char:end_char], "start": start_char, "end": end_char, "score": score,
                "start_token": s, "end_token": e}


# ----------------------------------------------------------------------------- causal LM head


def _shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) labels -> (B, S) the label each position's logits are scored against: the next
    token's (``labels[:, 1:]``), -100 at the last position (transformers' ForCausalLMLoss)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def _next_token_loss(logits, packed_logits, packing, shifted, num_items_in_batch=None):
    """Cross-entropy of the logits at i against label i + 1 (``shifted``), -100 ignored, in fp32
    (as transformers).  Packed: over the real tokens only.  ``num_items_in_batch`` (transformers'
    Trainer under gradient accumulation): summed, then divided by it."""
    n = logits.shape[-1]
    if packing is not None:
        lg, lab = packed_logits, packing.gather(shifted.to(packed_logits.device))  # (T, V), (T,)
    else:
        lg, lab = logits.reshape(-1, n), shifted.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(lg.float(), lab, ignore_index=-100)
    total = F.cross_entropy(lg.float(), lab, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class BertLMHeadModel(BertPreTrainedModel):
    """GPT-style next-token prediction with BERT: causal self-attention (``config.is_decoder=True``,
    required: with bidirectional attention every position would see the token it predicts) and
    the MLM head's transform + decoder (``cls.predictions.*``, decoder tied to the word
    embeddings unless ``config.tie_word_embeddings=False``).  Parameter names, logits, loss and
    gradients are transformers' BertLMHeadModel's.

    From an encoder checkpoint (e.g. minilm, which has no head)::

        model = BertLMHeadModel.from_pretrained("minilm", is_decoder=True)   # head newly initialised
    """

    _tied_weights_keys = BertForMaskedLM._tied_weights_keys
    tie_weights = BertForMaskedLM.tie_weights  # one tying rule for both MLM-head models

    def __init__(self, config: BertConfig):
        if isinstance(config, BertConfig) and not config.is_decoder:
            raise ValueError(
                "BertLMHeadModel needs config.is_decoder=True (causal attention; bidirectional attention "
                "would let every position see the token it predicts): pass is_decoder=True, e.g. "
                "BertLMHeadModel.from_pretrained(path, is_decoder=True)")
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_head_weights()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=False, output_attentions=False,
                return_dict=True, num_items_in_batch=None, **kwargs):
        """labels: (B, S) token ids (usually ``input_ids`` with -100 at padding); shifted inside:
        the logits at i are scored against ``labels[:, i + 1]`` (-100 ignored), as transformers.
        Padding-free, the head runs on the real tokens only and the logits at padded positions
        are 0; a padded position whose next label is not -100 makes the forward run the padded
        batch (its logits are then read)."""
        shifted = None
        if labels is not None:
            ref = input_ids if input_ids is not None else inputs_embeds
            want = tuple(ref.shape[:2]) if torch.is_tensor(ref) else None
            if not torch.is_tensor(labels) or labels.is_floating_point() or tuple(labels.shape) != want:
                got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
                raise ValueError(f"BertLMHeadModel: labels must be an integer tensor of shape (B, S) = {want}, "
                                 f"got {got}")
            shifted = _shift_labels(_wide(labels))  # (B, S)
        o, packed, packing = _head_forward_bert(self, input_ids, attention_mask, token_type_ids, position_ids,
                                                inputs_embeds, output_hidden_states, output_attentions, kwargs,
                                                labels=shifted)
        logits, lp = _per_token(self.cls, o, packed, packing)  # (B, S, V)
        loss = _next_token_loss(logits, lp, packing, shifted, num_items_in_batch) if shifted is not None else None
        out = CausalLMOutput(loss=loss, logits=logits, hidden_states=o.hidden_states, attentions=o.attentions)
        return out if return_dict is None or return_dict else out.to_tuple()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens=20, do_sample=False, top_k=50,
                 temperature=1.0, eos_token_id=None, generator=None) -> torch.LongTensor:
        """Continue each prompt by up to ``max_new_tokens`` tokens, one forward per token (no KV
        cache: every step re-reads the prompt and the tokens so far).

        ``do_sample=False``: greedy (the most likely token; deterministic).  ``do_sample=True``:
        sample from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
        tokens (``top_k=0``: the whole vocabulary), drawn with ``generator`` (a
        ``torch.Generator`` on the model's device; a fixed seed gives the same tokens every time;
        None: torch's global RNG).  A row stops at ``eos_token_id`` (an id or a list of ids; it
        is kept in the output) and is filled with ``config.pad_token_id`` (0 if None)
        afterwards; generation ends when every row has stopped.

        input_ids (B, S) with ``attention_mask`` (B, S) 0/1: prompts padded on either side (or
        with holes); each prompt is continued after its last real token, positions counted from
        its first real token, as transformers' generate does for left padding.  Returns (B, S + n)
        int64: ``input_ids`` as given, then the n <= max_new_tokens new tokens per row."""
        ids, mask = self._check_generate_args(input_ids, attention_mask, max_new_tokens, do_sample, top_k,
                                              temperature, eos_token_id, generator)
        B, S = ids.shape
        dev = ids.device
        eos = torch.tensor(sorted(set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])),
                           dtype=torch.long, device=dev)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        # left-align the prompts: real tokens last, so that position -1 is every row's newest token
        lens = mask.sum(1)  # (B,)
        L = int(lens.max())
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # padding first, real tokens in order
        seq = torch.gather(ids, 1, order)[:, S - L:]  # (B, L)
        seq_mask = torch.gather(mask, 1, order)[:, S - L:]  # (B, L)
        seq = seq.masked_fill(seq_mask == 0, pad)
        new = torch.empty(B, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                pos = (seq_mask.cumsum(1) - 1).clamp(min=0)  # (B, L + t): counted from the first real token
                h = self.bert(input_ids=seq, attention_mask=seq_mask, position_ids=pos).last_hidden_state  # (B, L+t, C)
                logits = self.cls(h[:, -1]).float()  # (B, V): the head on the newest position only
                nxt = self._next_token(logits, do_sample, top_k, temperature, generator)  # (B,)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                new = torch.cat([new, nxt[:, None]], 1)
                seq = torch.cat([seq, nxt[:, None]], 1)
                seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], 1)
                if eos.numel():
                    done |= torch.isin(nxt, eos)
                    if bool(done.all()):
                        break
        finally:
            self.train(was_training)
        return torch.cat([ids, new], 1)

    @staticmethod
    def _next_token(logits, do_sample, top_k, temperature, generator) -> torch.Tensor:
        """(B, V) fp32 logits -> (B,) the chosen token ids."""
        if not do_sample:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def _check_generate_args(self, input_ids, attention_mask, max_new_tokens, do_sample, top_k, temperature,
                             eos_token_id, generator):
        """Every generate() argument checked before the first forward: ValueError naming it."""
        cfg, V = self.config, self.config.vocab_size

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point() \
                or input_ids.dtype == torch.bool:
            what = (f"a {input_ids.dim()}-D {input_ids.dtype} tensor" if torch.is_tensor(input_ids)
                    else type(input_ids).__name__)
            raise ValueError(f"generate: input_ids must be a 2-D integer tensor (B, S) (one prompt: ids[None]), "
                             f"got {what}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"generate: input_ids of shape {tuple(input_ids.shape)} holds no prompt")
        if input_ids.device != self.device:
            raise ValueError(f"generate: input_ids is on {input_ids.device}, the model on {self.device}")
        ids = input_ids.long()
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != tuple(ids.shape):
                got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
                raise ValueError(f"generate: attention_mask must be a (B, S) = {tuple(ids.shape)} tensor, got {got}")
            if attention_mask.device != ids.device:
                raise ValueError(f"generate: attention_mask is on {attention_mask.device}, input_ids on {ids.device}")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("generate: attention_mask must hold only 0 (padding) and 1 (real token)")
            mask = attention_mask.long()
            if bool((mask.sum(1) == 0).any()):
                row = int((mask.sum(1) == 0).nonzero()[0])
                raise ValueError(f"generate: prompt {row} is all padding (attention_mask row {row} is all 0)")
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        longest = int(mask.sum(1).max()) + max_new_tokens
        if longest > cfg.max_position_embeddings:  # the position table (learned or sinusoidal) has no more rows
            raise ValueError(f"generate: the longest prompt plus max_new_tokens={max_new_tokens} is {longest} "
                             f"tokens; the model has max_position_embeddings={cfg.max_position_embeddings}")
        if not isinstance(do_sample, bool):
            raise ValueError(f"generate: do_sample must be True or False, got {do_sample!r}")
        if top_k is not None and (not is_int(top_k) or top_k < 0):
            raise ValueError(f"generate: top_k must be an int >= 0 (0: no top-k filter), got {top_k!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"generate: temperature must be a finite number > 0, got {temperature!r}")
        if eos_token_id is not None:
            eos = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
            bad = [e for e in eos if not is_int(e) or not 0 <= e < V]
            if bad or not eos:
                raise ValueError(f"generate: eos_token_id must be a token id in [0, vocab_size={V}) or a list of "
                                 f"them, got {eos_token_id!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generate: generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != ids.device.type:
                raise ValueError(f"generate: generator is on {generator.device}, the model on {ids.device} "
                                 f"(make it with torch.Generator(device=...))")
        return ids, mask
