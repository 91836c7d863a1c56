"""Checks on a model's inputs, before any computation: every problem a ValueError naming it.

``validate_inputs`` checks shapes, dtypes and devices on the host, and tensor values (id ranges,
0/1 masks) in one host read, together with any statistics the caller asks for (``extra``: the
forward's plan reads its padding statistics in the same synchronisation).  Value checks are
skipped while torch.compile traces and inside ``bertfast.kernels._common.trusted_inputs()``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

from bertfast.kernels._common import check_values
from bertfast.kernels._common import dtype_name as _dtype_name

if TYPE_CHECKING:  # pragma: no cover
    from bertfast.config import BertConfig


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
# accepted with any value and ignored: transformers' Trainer passes num_items_in_batch to every
# forward that takes **kwargs; transformers' classification / token / QA / MLM heads ignore it
# too (a mean loss).  BertLMHeadModel takes it as a real argument, as transformers' does.
_ANY_VALUE_KWARGS = ("num_items_in_batch",)


def check_ignored_kwargs(where: str, kwargs: dict) -> None:
    """Accept transformers' forward keywords at their do-nothing values; refuse the rest by name
    (ValueError for a value that needs an unsupported feature, TypeError for an unknown name)."""
    for name, value in kwargs.items():
        if name in _ANY_VALUE_KWARGS:
            continue
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
    ``torch.compile`` traces the model, and inside ``bertfast.kernels._common.trusted_inputs()`` (CUDA
    graph capture, after the runner validated the inputs), they are skipped: a host read would
    break the graph."""
    values = check_values()  # False under torch.compile and inside bertfast.kernels._common.trusted_inputs()
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
