"""How one forward runs: padded batch or packed real tokens, decided in one place.

``plan_forward`` validates a forward's inputs and decides, from one host read (shared with the
value checks), whether the layers run the packed real tokens (``bertfast.kernels.padding.Packing``) or
the padded batch; the rule and what it guarantees are in bertfast/modeling.py's docstring.  The
result, a ``ForwardPlan``, is made once per forward and handed to everything that needs the
layout: the embeddings, every layer, the heads and the output restore.  The same function plans
bertfast's models and transformers models accelerated with ``bertfast.optimize``.

Inputs that start on the host (a tokenizer's CPU tensors) need no device read at all:
``to_device(batch, model)`` runs the same checks and reads the same padding statistics on the
host tensors, then copies them to the model's device (pinned memory, ``non_blocking``: the host
does not wait for the device), and remembers what it read for the copies it made.  A forward
given those copies, unchanged since (their version counters say so), plans from what was read
on the host: zero device reads per forward, eager or a CUDA-graph replay, so the host can queue
the next batch while the device still runs this one.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from bertfast.config import unpad_mode
from bertfast.masks import additive_mask_from
from bertfast.validation import _validate_inputs
from bertfast.kernels._common import host_read_possible, trusted_inputs
from bertfast.kernels.padding import Packing

_PLAN_OVERRIDE = contextvars.ContextVar("bertfast_plan_override", default=None)


@contextlib.contextmanager
def plan_override(plan: "ForwardPlan"):
    """Inside this block every forward takes ``plan`` instead of planning itself (input shapes,
    dtypes and devices are still checked; values are not read: use it inside
    ``bertfast.kernels._common.trusted_inputs()`` after validating the inputs).  For CUDA-graph capture
    (bertfast/cuda_graphs.py): the plan's Packing is built on the device from the static mask
    buffer, so the captured graph holds no decision made from one particular batch's values."""
    token = _PLAN_OVERRIDE.set(plan)
    try:
        yield plan
    finally:
        _PLAN_OVERRIDE.reset(token)


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
    # padded route with a right-padding (prefix) 2-D mask: the per-row lengths, int32 (B,) on the
    # device, for the attention kernel's fastest mask variant; None otherwise
    key_lengths: Optional[torch.Tensor] = None


def plan_forward(
    config,
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
    forced = None if torch.compiler.is_compiling() else _PLAN_OVERRIDE.get()  # (dynamo cannot read a ContextVar)
    if forced is not None:  # a CUDA-graph capture: the plan of the static buffers, nothing read
        B, S, _ = _validate_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                   dtype)
        if (forced.B, forced.S) != (B, S):
            raise ValueError(f"plan_override: the plan is for (B, S) = {(forced.B, forced.S)}, the inputs are "
                             f"{(B, S)}")
        return forced
    mode = unpad_mode(getattr(config, "unpad", True) if unpad is None else unpad)
    m = attention_mask
    stats_wanted = torch.is_tensor(m) and m.dim() == 2 and host_read_possible(m.device)
    lab = labels if (torch.is_tensor(labels) and not labels.is_floating_point()) else None
    dev_lens = []  # the per-row lengths on the device, int32 (B,), made by stats()

    def stats(B, S):
        if not stats_wanted or tuple(m.shape) != (B, S):
            return None
        parts, lens32 = _padding_stats(m, lab, shifted_labels)
        dev_lens.append(lens32)
        return parts

    known = _read_on_host(config, input_ids, m, token_type_ids, position_ids) if lab is None else None
    if known is not None:  # to_device checked the values and read the statistics on the host
        with trusted_inputs():
            B, S, _ = _validate_inputs(config, input_ids, attention_mask, token_type_ids, position_ids,
                                       inputs_embeds, dtype)
        vals = list(known.stats) if m is not None else None
    else:
        B, S, vals = _validate_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                      dtype, extra=stats)
    if vals is None:  # no 2-D mask, or no host read allowed: the padded batch, mask as given
        why = "no 2-D mask" if not (torch.is_tensor(m) and m.dim() == 2) else "no host read allowed (tracing/capture)"
        return ForwardPlan(B, S, None, m, reason=why)
    lens, first_padded, right_padded = vals[:B], bool(vals[B]), bool(vals[B + 1])
    labels_on_padding = bool(vals[B + 2]) if len(vals) > B + 2 else False
    T = sum(lens)
    if T == B * S:
        return ForwardPlan(B, S, None, None, reason="no padding")
    # the padded batch with a padding mask; a query row that sees no real key gets the
    # uniform softmax of transformers' additive mask (the Triton 0/1 key mask gives zeros)
    dead_rows = min(lens) == 0 or (causal and first_padded)
    key_lengths = None
    if right_padded:  # the attention kernel's key lengths: made with the statistics, or now on the device
        key_lengths = dev_lens[0] if dev_lens else (m != 0).sum(1, dtype=torch.int32)
    padded_mask = m
    if triton and dead_rows:
        padded_mask, key_lengths = additive_mask_from(m, dtype, known_padded=True), None  # (B, 1, 1, S)
    needs = []
    if reads_first_token and first_padded:
        needs.append("the pooler reads a padded first token")
    if reads_all_positions:
        needs.append("the loss reads every position")
    if labels_on_padding:
        needs.append("labels on padded positions")
    reads = "; ".join(needs)

    def padded(why):
        return ForwardPlan(B, S, None, padded_mask, reason=why, reads_padding=reads, key_lengths=key_lengths)

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


def _padding_stats(m: torch.Tensor, labels: Optional[torch.Tensor] = None, shifted_labels: bool = False):
    """The padding statistics of a 2-D 0/1 mask (B, S), on its device, for one host read: (int64
    tensor [the B row lengths, whether some first token is padding, whether the mask is a prefix
    (right padding), whether ``labels`` sit on padding (only with labels)], the lengths as int32
    (B,))."""
    B, S = m.shape
    valid = m != 0
    lens32 = valid.sum(1, dtype=torch.int32)  # (B,)
    prefix = (valid == (torch.arange(S, device=m.device)[None, :] < lens32[:, None])).all()  # right padding
    parts = [lens32.to(torch.int64), (~valid[:, 0]).any().to(torch.int64)[None], prefix.to(torch.int64)[None]]
    if labels is not None and labels.numel() == B * S:
        read = labels.to(m.device).reshape(B, S) != -100  # (transformers' heads take labels on any device)
        if shifted_labels and S > 1:  # the logits at i are scored against label i + 1
            read = torch.cat([read[:, :-1] | read[:, 1:], read[:, -1:]], 1)
        parts.append((read & ~valid).any().to(torch.int64)[None])
    return torch.cat(parts), lens32


# ----------------------------------------------------------------------------- inputs read on the host

# the inputs whose values a plan reads, and the roles ``to_device`` remembers them in
_ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class HostRead:
    """What ``to_device`` read on the host for one batch: the values passed the checks against
    ``config``; ``stats``: the mask's padding statistics (``_padding_stats`` without labels), or
    None when the batch had no 2-D mask."""

    config: Any
    stats: Optional[Tuple[int, ...]]


# id(device tensor) -> (weak reference to it, HostRead, role, its version counter when copied)
_READ: Dict[int, tuple] = {}


def _remember(t: torch.Tensor, read: HostRead, role: str) -> None:
    key = id(t)

    def forget(ref, key=key):
        entry = _READ.get(key)
        if entry is not None and entry[0] is ref:
            del _READ[key]

    _READ[key] = (weakref.ref(t, forget), read, role, t._version)


def _recalled(t: Optional[torch.Tensor], role: str) -> Optional[HostRead]:
    """The HostRead remembered for ``t`` in ``role``, if ``t`` is a copy ``to_device`` made and
    nothing has written to it since (its version counter is unchanged)."""
    entry = _READ.get(id(t)) if torch.is_tensor(t) else None
    if entry is None or entry[0]() is not t or entry[2] != role or t.is_inference() or t._version != entry[3]:
        return None
    return entry[1]


def _read_on_host(config, input_ids, attention_mask, token_type_ids, position_ids) -> Optional[HostRead]:
    """The HostRead of this forward's inputs: every value input given is a copy of one
    ``to_device`` batch, checked against this config, unchanged since; else None (the plan reads
    the device).  Not while tracing or capturing: a plan made there must not depend on one batch."""
    if torch.compiler.is_compiling() or not torch.is_tensor(input_ids) or not host_read_possible(input_ids.device):
        return None
    read = _recalled(input_ids, "input_ids")
    if read is None or read.config is not config:
        return None
    for role, t in zip(_ROLES[1:], (attention_mask, token_type_ids, position_ids)):
        if t is not None and _recalled(t, role) is not read:
            return None
    return read


def _stands_for_a_device(device: torch.device) -> bool:
    """Whether copies on ``device`` are worth remembering: on a GPU the plan's read is a sync that
    the host read saves; a plain CPU tensor is read for free, and its memory can be written
    through a numpy view without the version counter seeing it, so CPU copies are never
    remembered (except where CPU tensors stand for a GPU: under the Triton interpreter or while
    launches are recorded, the tests' stand-ins for CUDA)."""
    from bertfast import kernels
    from bertfast.kernels._common import recording_launches

    return device.type != "cpu" or kernels.INTERPRET or recording_launches()


def copy_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of host tensor ``t`` on ``device`` (always a new tensor).  To a GPU through pinned
    memory, ``non_blocking``: a blocking copy from pageable memory synchronises the stream, i.e.
    waits for everything queued before it, as a device read does."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, copy=True)


def to_device(batch: Mapping[str, Any], model: torch.nn.Module) -> Dict[str, Any]:
    """Copy a batch of host inputs (a dict or a tokenizer's BatchEncoding of CPU tensors:
    ``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``, anything else too)
    to ``model``'s device for ``model(**batch)``, after checking them against the model's config
    and reading the mask's padding statistics on the host (bad input raises the forward's
    ValueError here).  The forward's plan then reads nothing from the device (see the module
    docstring): a copy written to afterwards, or combined with inputs from elsewhere, is planned
    from the device as usual.  Labels are copied but not read here (a forward with labels reads
    the device).  Returns a new dict; the copies are ordinary tensors even under
    ``torch.inference_mode`` (on a plain CPU model, where nothing is remembered, the host tensors
    themselves: a copy would gain nothing)."""
    param = next(model.parameters())
    device, config = param.device, model.config
    host = {role: batch.get(role) for role in _ROLES}
    ids, mask = host["input_ids"], host["attention_mask"]
    read = None
    given = [t for t in host.values() if t is not None]
    if (torch.is_tensor(ids) and all(torch.is_tensor(t) and t.device.type == "cpu" for t in given)
            and (mask is None or mask.dim() == 2)):
        extra = (lambda B, S: _padding_stats(mask)[0]) if mask is not None else None
        _, _, stats = _validate_inputs(config, ids, mask, host["token_type_ids"], host["position_ids"], None,
                                       param.dtype, extra=extra)
        read = HostRead(config, tuple(stats) if stats is not None else None)
    remember = read is not None and _stands_for_a_device(device)
    out = {}
    with torch.inference_mode(False):  # ordinary tensors: their version counters tell a later write
        for key, v in batch.items():
            if torch.is_tensor(v):  # a plain CPU model takes the host tensors as they are: no copy
                v = copy_to_device(v, device) if v.device.type == "cpu" and (remember or device.type != "cpu") \
                    else v.to(device)
            out[key] = v
    if remember:
        for role in _ROLES:
            if host[role] is not None:
                _remember(out[role], read, role)
    return out
