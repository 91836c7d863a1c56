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

The attention core (scores, mask, softmax, dropout, probs @ V) lives in ``attention_torch``,
separate from the projections and the head split, so that another implementation (a Triton
kernel) can be put behind it without touching the rest.

Position embeddings: ``position_embedding_type="absolute"`` is a learned table
(``embeddings.position_embeddings.weight``, in the state dict).  ``"sinusoidal"`` is the fixed
sine/cosine table of "Attention is all you need"; it is a *non-persistent buffer*
(``embeddings.sinusoidal_positions``): never trained, not a parameter, not in the state dict or
in saved checkpoints (it is recomputed from the config), and a checkpoint that carries a learned
``embeddings.position_embeddings.weight`` is refused by a sinusoidal model under ``strict``.
transformers has no sinusoidal BERT, so such checkpoints load only in bertfast.

Padding-free execution (``config.unpad``; flash-attention's bert_padding idea, as the Triton
path in bertfast/fast.py): given a 2-D padding mask with actual padding, the real tokens are
gathered once before the embeddings (``Packing``, computed once per forward and handed to the
layers, the Triton kernels and the heads), every per-token part (projections, FFN, LayerNorms)
runs on the T packed tokens (T, C) instead of (B, S, C), attention runs one sequence at a time
(``attention_varlen_torch``; the Triton varlen kernel on that backend), and the output is
scattered back once (``kernels.pad``) with zeros at padded positions.  The per-token heads (MLM
transform + decoder, token classifier, QA outputs) also run on the T packed tokens only, so no
head ever normalises the all-zero vector of a padded position, and their logits are scattered
back with **0 at padded positions**.

Exactness.  Whatever a user can read (last_hidden_state and hidden_states at real tokens,
pooler_output, every head's logits at real positions, every loss and every gradient) equals the
padded computation (transformers) within rounding.  Where that needs hidden states at padded
positions (transformers computes them: padded queries attend to the real keys), the forward
runs the padded batch instead, by itself.  ``plan_forward`` is the one place that decides, from
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

``config.unpad`` (``model.set_backend(name, unpad=...)``; run-time only, never saved):

* ``True`` (default): padding-free where exact, as above.
* ``"always"``: padding-free whenever it can pack, with *masked* semantics where the exact
  result needs padded positions: the pooler of a row whose first token is padding is
  ``tanh(pooler.dense.bias)`` (it reads the zero vector), per-token labels at padded positions
  are ignored (as if -100), and the QA loss softmaxes over the real tokens only.
* ``False``: always the padded batch.

Fully padded rows follow transformers in the padded batch: their queries see only padding keys,
each at the dtype's most negative finite score, so the softmax is uniform (no NaN).  Token ids,
token types and positions of any integer dtype (int8, uint8, int16, ...) are accepted (widened
to int64 once).  ``forward`` takes transformers' ``use_cache`` / ``past_key_values`` / ``cache``
/ ``encoder_hidden_states`` / ``encoder_attention_mask`` / ``head_mask`` / ``cache_position`` at
their default values (None, or False for use_cache) and refuses other values by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bertfast import backend, fast
from kernels._common import check_values, host_read_possible
from bertfast.config import UNPAD_MODES, BertConfig, unpad_mode  # noqa: F401  (the one parser of config.unpad)
from kernels.padding import Packing  # noqa: F401  (the padding-free layout; torch index ops, no triton)

# ----------------------------------------------------------------------------- outputs


class ModelOutput:
    """Base of the output dataclasses: attribute (``out.logits``), key (``out["logits"]``) and
    integer/slice indexing (``out[0]``) over the fields that are not None, in field order, as
    transformers' ModelOutput.  Iterating yields the keys (like a dict)."""

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def get(self, key, default=None):
        return getattr(self, key) if key in self.keys() else default

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass(eq=False)
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None  # (B, S, C)
    pooler_output: Optional[torch.Tensor] = None  # (B, C)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # embeddings + each layer, (B, S, C) each
    attentions: Optional[Tuple[torch.Tensor, ...]] = None  # each layer, (B, H, S, S)


@dataclass(eq=False)
class MaskedLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # (B, S, V)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass(eq=False)
class SequenceClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # (B, num_labels)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass(eq=False)
class TokenClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # (B, S, num_labels)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass(eq=False)
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    start_logits: Optional[torch.Tensor] = None  # (B, S)
    end_logits: Optional[torch.Tensor] = None  # (B, S)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


# ----------------------------------------------------------------------------- small helpers


def get_activation(name: str):
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, as BERT
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"hidden_act {name!r} is not supported")


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _wide(t):
    """Integer tensors of any dtype as int32/int64 (what embedding lookups and kernels take);
    anything else unchanged."""
    if torch.is_tensor(t) and _is_int(t) and t.dtype not in (torch.int32, torch.int64):
        return t.to(torch.int64)
    return t


# transformers' BertModel / BertFor* forward keywords bertfast has no use for, with the values
# that ask for nothing (accepted and ignored); any other value is refused by name
_IGNORED_KWARGS = {
    "use_cache": (None, False),
    "past_key_values": (None,),
    "cache": (None,),
    "encoder_hidden_states": (None,),
    "encoder_attention_mask": (None,),
    "head_mask": (None,),
    "cache_position": (None,),
}


def check_ignored_kwargs(where: str, kwargs: dict) -> None:
    """Accept transformers' forward keywords at their do-nothing values; refuse the rest by name
    (ValueError for a value that needs an unsupported feature, TypeError for an unknown name)."""
    for name, value in kwargs.items():
        if name not in _IGNORED_KWARGS:
            raise TypeError(f"{where}() got an unexpected keyword argument {name!r}")
        if not any(value is ok for ok in _IGNORED_KWARGS[name]):
            what = {"use_cache": "a KV cache (use_cache=True)", "past_key_values": "a KV cache",
                    "cache": "a KV cache", "encoder_hidden_states": "cross-attention",
                    "encoder_attention_mask": "cross-attention", "head_mask": "head masking",
                    "cache_position": "a KV cache"}[name]
            raise ValueError(f"{where}: {name}={_short(value)} needs {what}, which bertfast does not support "
                             f"(pass {name}=None{' or False' if name == 'use_cache' else ''}, or leave it out)")


def _short(value) -> str:
    if torch.is_tensor(value):
        return f"<tensor {tuple(value.shape)}>"
    r = repr(value)
    return r if len(r) <= 40 else f"<{type(value).__name__}>"


def validate_inputs(
    config: BertConfig,
    input_ids: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    token_type_ids: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> Tuple[int, int]:
    """Every check on the model's inputs, before any computation; raises ValueError naming the
    problem.  Returns (B, S).  (``plan_forward`` runs the same checks and reads the padding
    statistics it needs in the same host read.)"""
    B, S, _ = _validate_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dtype)
    return B, S


def _validate_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dtype,
                     extra=None):
    """validate_inputs, plus ``extra``: a callable (B, S) -> 1-D int64 tensor (or None) of
    statistics the caller wants read on the host in the same synchronisation as the value
    checks.  Returns (B, S, the extra values as python ints, or None).

    Checks of tensor *values* (id ranges, 0/1 masks) read the values on the host.  While
    ``torch.compile`` traces the model, and inside ``kernels._common.trusted_inputs()`` (CUDA
    graph capture, after the runner validated the inputs), they are skipped: a host read would
    break the graph."""
    values = check_values()  # False under torch.compile and inside kernels._common.trusted_inputs()
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds (got both or neither)")
    if input_ids is not None:
        if not torch.is_tensor(input_ids) or not _is_int(input_ids):
            what = _dtype_name(input_ids.dtype) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor, got {what}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have 2 dims (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
    else:
        if not torch.is_tensor(inputs_embeds) or not inputs_embeds.is_floating_point():
            raise ValueError("inputs_embeds must be a floating-point tensor")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, seq_len, hidden_size={config.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.dtype != dtype:
            raise ValueError(
                f"inputs_embeds has dtype {_dtype_name(inputs_embeds.dtype)}; the model's dtype is {_dtype_name(dtype)}"
            )
        B, S = inputs_embeds.shape[:2]
    if B == 0 or S == 0:
        raise ValueError(f"empty input: batch size {B}, sequence length {S}")
    if position_ids is None and S > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {S} is longer than max_position_embeddings={config.max_position_embeddings}"
        )
    device = (input_ids if input_ids is not None else inputs_embeds).device
    # value checks, gathered so that the host reads every statistic in one synchronisation:
    # (tensor, upper bound, message taking the offending value)
    ranges = []
    if input_ids is not None:
        ranges.append((input_ids, config.vocab_size,
                       lambda bad: f"input_ids holds token id {bad} outside the vocabulary [0, vocab_size={config.vocab_size})"))
    for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids), ("attention_mask", attention_mask)):
        if torch.is_tensor(t) and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}")

    if token_type_ids is not None:
        if not torch.is_tensor(token_type_ids) or not _is_int(token_type_ids):
            raise ValueError("token_type_ids must be an integer tensor")
        if tuple(token_type_ids.shape) != (B, S):
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}; expected {(B, S)} like input_ids")
        ranges.append((token_type_ids, config.type_vocab_size,
                       lambda bad: f"token_type_ids holds token type {bad} outside [0, type_vocab_size={config.type_vocab_size})"))

    if position_ids is not None:
        if not torch.is_tensor(position_ids) or not _is_int(position_ids):
            raise ValueError("position_ids must be an integer tensor")
        ok = (position_ids.dim() == 1 and position_ids.shape[0] == S) or (
            position_ids.dim() == 2 and position_ids.shape[1] == S and position_ids.shape[0] in (1, B)
        )
        if not ok:
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)}; expected ({B}, {S}), (1, {S}) or ({S},)"
            )
        ranges.append((position_ids, config.max_position_embeddings,
                       lambda bad: f"position_ids holds position {bad} outside [0, max_position_embeddings={config.max_position_embeddings})"))

    if attention_mask is not None:
        if not torch.is_tensor(attention_mask):
            raise ValueError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() == 2:
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, S)} to match input_ids"
                )
            if attention_mask.dtype != torch.bool:
                if attention_mask.is_complex():
                    raise ValueError(f"attention_mask has dtype {_dtype_name(attention_mask.dtype)}")
                not01 = ((attention_mask != 0) & (attention_mask != 1)).any().to(torch.int64)
                ranges.append((not01[None], 1,
                               lambda bad: "a 2-D attention_mask must hold only 0 and 1 (1 = attend, 0 = padding)"))
        elif attention_mask.dim() == 4:
            if attention_mask.dtype != dtype:
                raise ValueError(
                    f"a 4-D attention_mask is additive and must have the model's dtype {_dtype_name(dtype)}, "
                    f"got {_dtype_name(attention_mask.dtype)}"
                )
            H = config.num_attention_heads
            want = (B, H, S, S)
            if any(d not in (1, w) for d, w in zip(attention_mask.shape, want)):
                raise ValueError(
                    f"4-D attention_mask of shape {tuple(attention_mask.shape)} does not broadcast to (B, H, S, S) = {want}"
                )
        else:
            raise ValueError(
                f"attention_mask must have 2 dims (batch, seq_len) or 4 (additive, broadcastable to "
                f"(batch, heads, seq_len, seq_len)), got shape {tuple(attention_mask.shape)}"
            )
    if not values:
        ranges = []
    extra_t = extra(B, S) if extra is not None else None
    extra_vals = None
    if ranges or extra_t is not None:
        parts = []
        if ranges:
            parts.append(torch.stack([m.to(torch.int64) for t, _, _ in ranges for m in torch.aminmax(_wide(t))]))
        if extra_t is not None:
            parts.append(extra_t.to(device=device, dtype=torch.int64).reshape(-1))
        stats = torch.cat(parts).tolist()  # the one host read of the forward
        for i, (_, bound, message) in enumerate(ranges):
            lo, hi = int(stats[2 * i]), int(stats[2 * i + 1])
            if lo < 0 or hi >= bound:
                raise ValueError(message(lo if lo < 0 else hi))
        if extra_t is not None:
            extra_vals = [int(v) for v in stats[2 * len(ranges):]]
    return B, S, extra_vals


def additive_mask_from(attention_mask: Optional[torch.Tensor], dtype: torch.dtype,
                       known_padded: bool = False) -> Optional[torch.Tensor]:
    """A validated attention_mask -> additive float mask broadcastable to (B, H, S, S), or None
    when nothing is masked.  2-D 0/1 masks become (B, 1, 1, S): 0 where attended, the dtype's most
    negative value at padding keys (finite, so a fully padded row gives a uniform softmax, not NaN).
    ``known_padded``: the caller knows the mask has padding (no host read here)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask
    keep = attention_mask.bool()  # (B, S)
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if not tracing and not known_padded and bool(keep.all()):
        return None  # no padding: let attention run unmasked (fastest path)
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)
    return mask[:, None, None, :]  # (B, 1, 1, S)


# ----------------------------------------------------------------------------- padded or packed


# UNPAD_MODES / unpad_mode (``config.unpad`` -> "off" / "exact" / "always") live in
# bertfast/config.py, which validates the field with them; imported above.


@dataclass
class ForwardPlan:
    """How one forward runs: the decision of ``plan_forward``.

    ``packing``: the layout of the packed route, or None for the padded batch.  ``mask``: the
    attention mask of the padded batch (None when nothing is padded; 2-D 0/1, or a 4-D additive
    (B, 1, 1, S) mask where some query row would see no real key, so that it gets transformers'
    uniform softmax).  ``masked``: "always" semantics took effect (the packed route although an
    output reads padded positions).  ``reason``: why the padded batch runs ("" when packed).
    ``reads_padding``: what reads padded positions (the pooler, the loss, labels; "" when nothing
    does or nothing was read), whichever route was chosen: a caller whose padded route is not
    exact either (a decoder's padded query that sees no key) runs something else there."""

    B: int
    S: int
    packing: Optional[Packing]
    mask: Optional[torch.Tensor]
    masked: bool = False
    reason: str = ""
    reads_padding: str = ""


def plan_forward(
    config: BertConfig,
    input_ids: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    token_type_ids: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    dtype: torch.dtype,
    *,
    triton: bool = False,
    output_attentions: bool = False,
    attention_dropout: bool = False,
    causal: bool = False,
    reads_first_token: bool = False,
    reads_all_positions: bool = False,
    labels: Optional[torch.Tensor] = None,
    shifted_labels: bool = False,
    unpad=None,
) -> ForwardPlan:
    """Validate the inputs and decide, in one place, whether this forward runs the packed real
    tokens or the padded batch (see the module docstring for the rule).  One host read in all:
    the validation's value checks and the padding statistics (per-row lengths, whether a first
    token is padding, whether labels sit on padding) are read together.

    What the caller will read: ``reads_first_token`` (the pooler), ``reads_all_positions`` (a
    loss over every position, QA), ``labels`` (per-token labels, -100 = ignored;
    ``shifted_labels``: a causal LM loss may also score the logits at i against label i + 1, so
    a position counts as read when its own or the next label is not -100).  ``triton``:
    the Triton backend runs (packs on any device; no attention dropout in its varlen kernel);
    ``attention_dropout``: training with attention dropout; ``causal``: decoder attention.
    ``unpad``: overrides ``config.unpad`` (for configs without one, e.g. transformers')."""
    mode = unpad_mode(getattr(config, "unpad", True) if unpad is None else unpad)
    m = attention_mask
    stats_wanted = torch.is_tensor(m) and m.dim() == 2 and host_read_possible(m.device)
    lab = labels if (torch.is_tensor(labels) and not labels.is_floating_point()) else None

    def stats(B, S):
        if not stats_wanted or tuple(m.shape) != (B, S):
            return None
        valid = m != 0
        parts = [valid.sum(1, dtype=torch.int64), (~valid[:, 0]).any().to(torch.int64)[None]]
        if lab is not None and lab.numel() == B * S:
            read = lab.to(m.device).reshape(B, S) != -100  # (transformers' heads take labels on any device)
            if shifted_labels and S > 1:  # the logits at i are scored against label i + 1
                read = torch.cat([read[:, :-1] | read[:, 1:], read[:, -1:]], 1)
            parts.append((read & ~valid).any().to(torch.int64)[None])
        return torch.cat(parts)

    B, S, vals = _validate_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                  dtype, extra=stats)
    if vals is None:  # no 2-D mask, or no host read allowed: the padded batch, mask as given
        why = "no 2-D mask" if not (torch.is_tensor(m) and m.dim() == 2) else "no host read allowed (tracing/capture)"
        return ForwardPlan(B, S, None, m, reason=why)
    lens, first_padded = vals[:B], bool(vals[B])
    labels_on_padding = bool(vals[B + 1]) if len(vals) > B + 1 else False
    T = sum(lens)
    if T == B * S:
        return ForwardPlan(B, S, None, None, reason="no padding")
    # the padded batch with a padding mask; a query row that sees no real key gets the
    # uniform softmax of transformers' additive mask (the Triton 0/1 key mask gives zeros)
    dead_rows = min(lens) == 0 or (causal and first_padded)
    padded_mask = m
    if triton and dead_rows:
        padded_mask = additive_mask_from(m, dtype, known_padded=True)  # (B, 1, 1, S)
    needs = []
    if reads_first_token and first_padded:
        needs.append("the pooler reads a padded first token")
    if reads_all_positions:
        needs.append("the loss reads every position")
    if labels_on_padding:
        needs.append("labels on padded positions")
    reads = "; ".join(needs)

    def padded(why):
        return ForwardPlan(B, S, None, padded_mask, reason=why, reads_padding=reads)

    if mode == "off":
        return padded("unpad=False")
    if output_attentions:
        return padded("output_attentions (the probabilities are (B, H, S, S))")
    if not triton and m.device.type != "cpu":
        return padded("torch backend on a GPU (the per-sequence attention loop is launch-bound)")
    if triton and attention_dropout:
        return padded("attention dropout in training (the varlen kernel has no dropout)")
    if T == 0:
        return padded("every token is padding")
    if needs and mode == "exact":
        return padded(reads)
    return ForwardPlan(B, S, Packing.from_lengths(m, lens), None, masked=bool(needs), reads_padding=reads)


# ----------------------------------------------------------------------------- attention core


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
        S_q, S_k = q.shape[-2], k.shape[-2]
        future = torch.ones(S_q, S_k, dtype=torch.bool, device=q.device).triu_(1)  # (S, S) True above diagonal
        neg = torch.tensor(torch.finfo(additive_mask.dtype).min, dtype=additive_mask.dtype, device=q.device)
        additive_mask = torch.where(future, neg, additive_mask)  # (B, 1|H, S, S)
        causal = False  # folded into the mask
    if not need_weights:
        # fast path: fused kernel (flash / memory-efficient on CPU and CUDA)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=p, is_causal=causal)
        return out, None
    # explicit path, when the attention probabilities are wanted
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, S, S)
    if additive_mask is not None:
        scores = scores + additive_mask
    if causal:
        S_q, S_k = scores.shape[-2:]
        future = torch.ones(S_q, S_k, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
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
        if self.position_embeddings is not None:
            return self.position_embeddings.weight
        return self.sinusoidal_positions

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, S, C)
        S = inputs_embeds.shape[1]
        table = self.position_table()
        if position_ids is None:
            pos = table[:S]  # (S, C): positions 0..S-1, broadcast over the batch (no gather)
        else:
            pos = F.embedding(position_ids, table)  # (B|1, S, C) or (S, C)
        if token_type_ids is None:
            typ = self.token_type_embeddings.weight[0]  # (C,): type 0 everywhere
        else:
            typ = self.token_type_embeddings(token_type_ids)  # (B, S, C)
        x = inputs_embeds + typ + pos  # (B, S, C)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention: projections -> head split -> attention core -> head merge.
    ``causal=True`` (default: ``config.is_decoder``) masks the future, GPT style."""

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

    def forward(self, x, additive_mask=None, output_attentions=False, packing: Optional[Packing] = None):
        H, D = self.num_heads, self.head_dim
        if packing is not None:  # x: (T, C) packed real tokens; attention one sequence at a time
            T, C = x.shape
            q = self.query(x).view(T, H, D)
            k = self.key(x).view(T, H, D)
            v = self.value(x).view(T, H, D)
            y = attention_varlen_torch(q, k, v, packing.seqlens, self.causal, self.dropout_p, self.training)
            return y.view(T, C), None
        B, S, C = x.shape
        # projections and head split: (B, S, C) -> (B, S, H, D) -> (B, H, S, D); views, no copies
        q = self.query(x).view(B, S, H, D).transpose(1, 2)
        k = self.key(x).view(B, S, H, D).transpose(1, 2)
        v = self.value(x).view(B, S, H, D).transpose(1, 2)
        # attention core
        y, probs = attention_torch(
            q, k, v, additive_mask, self.causal, self.dropout_p, self.training, need_weights=output_attentions
        )
        # merge heads: (B, H, S, D) -> (B, S, H, D) -> (B, S, C)
        y = y.transpose(1, 2).reshape(B, S, C)
        return y, probs


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # post-LN


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, causal: Optional[bool] = None):
        super().__init__()
        self.self = BertSelfAttention(config, causal=causal)
        self.output = BertSelfOutput(config)

    def forward(self, x, additive_mask=None, output_attentions=False, packing: Optional[Packing] = None):
        h, probs = self.self(x, additive_mask, output_attentions, packing)
        return self.output(h, x), probs


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))  # (B, S, intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # post-LN


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, additive_mask=None, output_attentions=False, packing: Optional[Packing] = None):
        """x: (B, S, C), or (T, C) packed real tokens with ``packing``; same shape out."""
        x, probs = self.attention(x, additive_mask, output_attentions, packing)  # LN(x + attn(x))
        x = self.output(self.intermediate(x), x)  # LN(x + mlp(x))
        return x, probs


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x, additive_mask=None, output_hidden_states=False, output_attentions=False,
                packing: Optional[Packing] = None, restore_last: bool = True):
        """x: (B, S, C), or (T, C) packed real tokens with ``packing`` (the layers then run on the
        packed tokens and the outputs are scattered back, zeros at padding).
        Returns (last (B, S, C), hidden states or None, attention probabilities or None); with
        ``restore_last=False`` the last output is returned as the layers produced it ((T, C))."""
        restore = packing.pad if packing is not None else (lambda h: h)  # -> (B, S, C)
        all_hidden = [restore(x)] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for layer in self.layer:
            x, probs = layer(x, additive_mask, output_attentions, packing)
            if output_hidden_states:
                all_hidden.append(restore(x))
            if output_attentions:
                all_attn.append(probs)
        if restore_last:
            x = all_hidden[-1] if output_hidden_states else restore(x)
        return x, (tuple(all_hidden) if all_hidden is not None else None), (
            tuple(all_attn) if all_attn is not None else None
        )


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

    # --- backend switch (the choice itself lives in bertfast/backend.py)
    def set_backend(self, name: str, unpad=None):
        """Switch in place between "torch", "triton" and "auto"; the module tree, parameters and
        state dict do not change.  ``unpad`` sets padding-free execution (both backends): True
        (default: padding-free where exact), ``"always"`` (padding-free with masked semantics)
        or False (the padded batch); see the module docstring."""
        backend.check_backend(name)
        if unpad is not None:
            unpad_mode(unpad)  # refuses anything else by value
            unpad = "always" if unpad == "always" else bool(unpad)
        self.config.backend = name
        if unpad is not None:
            self.config.unpad = unpad
        for m in self.modules():  # heads and their encoder share one config, but be safe
            cfg = getattr(m, "config", None)
            if isinstance(cfg, BertConfig):
                cfg.backend = name
                if unpad is not None:
                    cfg.unpad = unpad
        return self

    @property
    def backend(self) -> str:
        return self.config.backend

    # --- conveniences
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied parameters counted once

    def get_input_embeddings(self) -> nn.Embedding:
        base = getattr(self, self.base_model_prefix, self)
        return base.embeddings.word_embeddings

    # --- loading / saving (bertfast/loading.py)
    @classmethod
    def from_pretrained(cls, path_or_name, dtype=None, device=None, strict: bool = True, **config_overrides):
        """Load a checkpoint directory (config.json + model.safetensors / pytorch_model.bin, sharded
        too) or a known name (``"minilm"``).  See ``bertfast.loading.load_pretrained``."""
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
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def uses_triton(self, input_ids=None, output_attentions: bool = False) -> bool:
        """Whether a forward with these inputs runs the Triton kernels (see bertfast/backend.py)."""
        if not torch.is_tensor(input_ids) or output_attentions:  # inputs_embeds / attention probabilities: torch path
            return False
        dtype = self.embeddings.LayerNorm.weight.dtype
        return backend.resolve_for(self.config.backend, input_ids.device, self.config, dtype) == "triton"

    def packing_for(self, attention_mask, output_attentions: bool = False, input_ids=None) -> Optional[Packing]:
        """The padding-free layout a torch-path forward of this model would use for this
        (validated) mask, or None when it runs the padded batch (see ``plan_forward``; this
        model's pooler, if any, reads the first token).  For inspection; a forward plans itself."""
        if attention_mask is None or not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
            return None
        if input_ids is None:
            input_ids = torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
        plan = plan_forward(self.config, input_ids, attention_mask, None, None, None, self.dtype,
                            output_attentions=output_attentions, reads_first_token=self.pooler is not None)
        return plan.packing

    def _embed_packed(self, packing: Packing, input_ids, token_type_ids, position_ids, inputs_embeds) -> torch.Tensor:
        """Embeddings of the real tokens only: (T, C).  Positions are those of the padded
        batch (0..S-1 unless given), so left padding gives what the padded path gives."""
        B, S = packing.B, packing.S
        if position_ids is None:
            position_ids = torch.arange(S, device=packing.indices.device)
        pos = packing.gather(position_ids.expand(B, S))[None]  # (1, T)
        ids = packing.gather(input_ids)[None] if input_ids is not None else None  # (1, T)
        types = packing.gather(token_type_ids)[None] if token_type_ids is not None else None  # (1, T)
        embeds = packing.gather(inputs_embeds)[None] if inputs_embeds is not None else None  # (1, T, C)
        return self.embeddings(ids, types, pos, embeds)[0]  # (T, C)

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
        triton = self.uses_triton(input_ids, output_attentions)
        cfg = self.config
        plan = plan_forward(
            cfg, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dtype,
            triton=triton, output_attentions=output_attentions,
            attention_dropout=self.training and cfg.attention_probs_dropout_prob > 0,
            causal=bool(cfg.is_decoder), reads_first_token=self.pooler is not None,
            reads_all_positions=reads_all_positions, labels=labels,
        )
        packing, packed = plan.packing, None
        attentions = None
        if triton:
            # fused kernels; packed (varlen) or padded as planned (bertfast/fast.py)
            x, hidden_states, packed, _ = fast.encoder_forward(
                self, input_ids, plan.mask, token_type_ids, position_ids,
                output_hidden_states=output_hidden_states, packing=packing, return_packed=True,
            )
            if packing is None:
                packed = None
        elif packing is None:  # the padded batch
            x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, S, C)
            m = plan.mask
            # (B, 1, 1, S) / 4-D / None; a 2-D mask here is known to hold padding (no host read)
            mask = additive_mask_from(m, x.dtype, known_padded=m is not None and m.dim() == 2)
            x, hidden_states, attentions = self.encoder(x, mask, output_hidden_states, output_attentions)
        else:  # padding-free: embed and run the T real tokens only
            x = self._embed_packed(packing, input_ids, token_type_ids, position_ids, inputs_embeds)  # (T, C)
            packed, hidden_states, _ = self.encoder(x, None, output_hidden_states, False, packing, restore_last=False)
            x = hidden_states[-1] if output_hidden_states else packing.pad(packed)  # (B, S, C)
        pooled = self.pooler(x) if self.pooler is not None else None  # (B, C)
        out = BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states, attentions=attentions
        )
        return out, packed, packing


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
        batch, unless ``unpad="always"`` (then the softmax is over the real tokens only).
        Padding-free, the logits at padded positions are 0."""
        with_loss = start_positions is not None and end_positions is not None
        o, packed, packing = _head_forward_bert(self, input_ids, attention_mask, token_type_ids, position_ids,
                                                inputs_embeds, output_hidden_states, output_attentions, kwargs,
                                                reads_all_positions=with_loss)
        logits, _ = _per_token(self.qa_outputs, o, packed, packing)  # (B, S, num_labels)
        start_logits = logits[..., 0].contiguous()  # (B, S)
        end_logits = logits[..., 1].contiguous()  # (B, S)
        loss = None
        if with_loss:
            S = start_logits.shape[1]
            start_positions = start_positions.reshape(-1).clamp(0, S)
            end_positions = end_positions.reshape(-1).clamp(0, S)
            sl, el = start_logits, end_logits
            if packing is not None:  # unpad="always": masked semantics, real tokens only
                pad = (attention_mask == 0).reshape(sl.shape)
                sl = sl.masked_fill(pad, torch.finfo(sl.dtype).min)
                el = el.masked_fill(pad, torch.finfo(el.dtype).min)
            loss = (F.cross_entropy(sl, start_positions, ignore_index=S)
                    + F.cross_entropy(el, end_positions, ignore_index=S)) / 2
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


# ----------------------------------------------------------------------------- QA helpers


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, max_answer_len: int = 30,
              mask: Optional[torch.Tensor] = None):
    """Highest ``start_logits[i] + end_logits[j]`` with ``i <= j < i + max_answer_len`` and both
    i and j allowed by ``mask`` (bool, e.g. the context tokens).

    (S,) logits -> (start, end, score); (B, S) logits -> a list of those, one per row.
    Raises ValueError when no span is allowed."""
    if start_logits.shape != end_logits.shape or start_logits.dim() not in (1, 2):
        raise ValueError(
            f"best_span: start_logits {tuple(start_logits.shape)} and end_logits {tuple(end_logits.shape)} "
            "must both be (S,) or (B, S)"
        )
    if max_answer_len < 1:
        raise ValueError(f"best_span: max_answer_len must be >= 1, got {max_answer_len}")
    single = start_logits.dim() == 1
    s = start_logits.detach().float().reshape(-1, start_logits.shape[-1])  # (B, S); B = 1 for one row
    e = end_logits.detach().float().reshape(s.shape)
    B, S = s.shape
    scores = s[:, :, None] + e[:, None, :]  # (B, S_start, S_end)
    idx = torch.arange(S, device=s.device)
    length = idx[None, :] - idx[:, None]  # (S, S): end - start
    valid = ((length >= 0) & (length < max_answer_len))[None]  # (1, S, S)
    if mask is not None:
        if mask.numel() != B * S:
            raise ValueError(f"best_span: mask has shape {tuple(mask.shape)}; expected that of the logits")
        m = mask.to(device=s.device, dtype=torch.bool).reshape(B, S)
        valid = valid & m[:, :, None] & m[:, None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    best, flat = scores.reshape(B, S * S).max(dim=-1)
    res = []
    for b in range(B):
        if best[b] == float("-inf"):
            raise ValueError("best_span: no allowed span (the mask allows no position)")
        i = int(flat[b])
        res.append((i // S, i % S, float(best[b])))
    return res[0] if single else res


def span_text(text: str, offsets, start: int, end: int) -> str:
    """The characters of ``text`` covered by tokens start..end (inclusive), given the tokenizer's
    (char_start, char_end) offsets of each token."""
    return text[offsets[start][0]: offsets[end][1]]


def as_tokenizer(obj):
    """A ``tokenizers.Tokenizer`` from a Tokenizer, a tokenizer.json path (or its directory), or
    an object holding one in a ``tokenizer`` / ``_tokenizer`` attribute."""
    from tokenizers import Tokenizer

    seen = 0
    while not isinstance(obj, Tokenizer) and seen < 3:
        if isinstance(obj, (str, Path)):
            p = Path(obj)
            if p.is_dir():
                p = p / "tokenizer.json"
            return Tokenizer.from_file(str(p))
        inner = getattr(obj, "tokenizer", None) or getattr(obj, "_tokenizer", None)
        if inner is None:
            break
        obj = inner
        seen += 1
    if not isinstance(obj, Tokenizer):
        raise TypeError(
            f"expected a tokenizers.Tokenizer, a tokenizer.json path or an object with a .tokenizer, "
            f"got {type(obj).__name__}"
        )
    return obj
