"""Remove and restore padding tokens, for running BERT on packed (varlen) sequences.

* ``unpad(hidden, attention_mask) -> (packed, indices, cu_seqlens, max_seqlen)``
* ``pad(packed, indices, batch, seqlen) -> hidden``
* ``Packing``: the layout of one padded batch (indices, per-sequence lengths, ``cu_seqlens``,
  ``max_seqlen``), computed once per forward and handed to every part that needs it (the torch
  layers, the Triton varlen kernels, the per-token heads), flash-attention's bert_padding style.
  ``Packing.from_lengths`` builds it from lengths the caller already read on the host (no host
  read of its own); ``Packing.from_mask`` reads the mask itself (one host read).

These are index operations (a gather and a scatter), written with differentiable torch ops:
they run on any device, without triton or the interpreter, and autograd flows through both.
The layout they produce is the one ``kernels.attention_varlen`` reads: the tokens of sequence
``b`` are rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` of ``packed``, in their original order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

__all__ = ["unpad", "pad", "Packing"]


def _mask_info(op: str, attention_mask: torch.Tensor, batch: int, seqlen: int, device):
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"{op}: attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(
            f"{op}: attention_mask has shape {tuple(attention_mask.shape)}; expected (B, S) = {(batch, seqlen)}"
        )
    if attention_mask.device != device:
        raise ValueError(f"{op}: attention_mask is on {attention_mask.device} but hidden is on {device}")
    if attention_mask.is_complex():
        raise ValueError(f"{op}: attention_mask must be bool, integer or float (0/1)")
    return attention_mask != 0


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Gather the tokens whose mask is 1.

    hidden (B, S, ...), attention_mask (B, S) with values 0/1 (bool, int or float).
    Returns ``packed`` (total, ...), ``indices`` (total,) int64 flat indices into B*S,
    ``cu_seqlens`` (B + 1,) int32 and ``max_seqlen`` (python int).  One host synchronisation
    (for ``max_seqlen`` and the mask check).
    """
    op = "unpad"
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"{op}: hidden must be a tensor, got {type(hidden).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"{op}: hidden has shape {tuple(hidden.shape)}; expected (B, S, ...)")
    B, S = hidden.shape[0], hidden.shape[1]
    valid = _mask_info(op, attention_mask, B, S, hidden.device)
    if attention_mask.dtype == torch.bool:
        binary = torch.ones((), dtype=torch.bool, device=hidden.device)
    else:
        binary = ((attention_mask == 0) | (attention_mask == 1)).all()
    lens = valid.sum(1, dtype=torch.int32)
    max_len = lens.max() if B > 0 else torch.zeros((), dtype=torch.int32, device=hidden.device)
    is_binary, max_seqlen = torch.stack([binary.to(torch.int64), max_len.to(torch.int64)]).tolist()
    if not is_binary:
        raise ValueError(f"{op}: attention_mask must hold only 0 and 1 (1 = real token)")
    indices = torch.nonzero(valid.reshape(-1), as_tuple=False).reshape(-1)
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=hidden.device)
    cu_seqlens[1:] = torch.cumsum(lens, 0, dtype=torch.int32)
    packed = hidden.reshape(B * S, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, int(max_seqlen)


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter packed tokens (total, ...) back to (batch, seqlen, ...), zeros at padded positions."""
    op = "pad"
    if not isinstance(packed, torch.Tensor) or packed.dim() < 1:
        raise ValueError(f"{op}: packed must be a tensor of shape (total, ...)")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype != torch.int64:
        desc = f"{tuple(indices.shape)} {str(indices.dtype).replace('torch.', '')}" if isinstance(indices, torch.Tensor) \
            else type(indices).__name__
        raise ValueError(f"{op}: indices must be a 1-D int64 tensor, got {desc}")
    if indices.device != packed.device:
        raise ValueError(f"{op}: indices is on {indices.device} but packed is on {packed.device}")
    if indices.numel() != packed.shape[0]:
        raise ValueError(f"{op}: packed has {packed.shape[0]} tokens but indices has {indices.numel()}")
    for name, val in (("batch", batch), ("seqlen", seqlen)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{op}: {name} must be a non-negative python int, got {val!r}")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    out = out.index_copy(0, indices, packed)
    return out.reshape(batch, seqlen, *packed.shape[1:])


def _real_indices(valid_flat: torch.Tensor, total: int) -> torch.Tensor:
    """Flat indices of the True entries of a 1-D bool tensor, ``total`` of them (known on the
    host), without a host synchronisation (``nonzero`` would read the count back)."""
    try:
        return torch.nonzero_static(valid_flat, size=total).reshape(-1)
    except (NotImplementedError, RuntimeError, AttributeError):  # pragma: no cover - older torch / devices
        return torch.argsort((~valid_flat).to(torch.int8), stable=True)[:total]


@dataclass
class Packing:
    """Where the real tokens of a padded (B, S) batch are, for padding-free execution.

    The T real tokens are packed sequence after sequence, each in its original order (the layout
    of ``unpad``): ``indices[t]`` is token t's flat position in the B*S grid, sequence b holds
    ``seqlens[b]`` tokens (0 for a fully padded row), rows ``cu_seqlens[b]:cu_seqlens[b + 1]``
    of the packed tensor (``cu_seqlens`` int32 on the device, as ``kernels.attention_varlen``
    reads it)."""

    indices: torch.Tensor  # (T,) int64
    seqlens: List[int]  # B python ints, sum T
    B: int
    S: int
    cu_seqlens: Optional[torch.Tensor] = None  # (B + 1,) int32
    max_seqlen: int = 0

    @property
    def total(self) -> int:
        return self.indices.numel()

    @classmethod
    def from_lengths(cls, attention_mask: torch.Tensor, seqlens: List[int]) -> "Packing":
        """From a validated 2-D 0/1 mask (B, S) and its per-row counts of real tokens, already
        read on the host by the caller (``seqlens``, python ints): no host read here."""
        B, S = attention_mask.shape
        valid = attention_mask != 0
        indices = _real_indices(valid.reshape(-1), int(sum(seqlens)))
        cu = torch.zeros(B + 1, dtype=torch.int32, device=attention_mask.device)
        cu[1:] = torch.cumsum(valid.sum(1, dtype=torch.int32), 0, dtype=torch.int32)
        return cls(indices, [int(n) for n in seqlens], B, S, cu, max(seqlens) if seqlens else 0)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Optional["Packing"]:
        """From a validated 2-D 0/1 mask (B, S); None when nothing is padded.  One host read."""
        B, S = attention_mask.shape
        seqlens = (attention_mask != 0).sum(1).tolist()
        if sum(seqlens) == B * S:
            return None
        return cls.from_lengths(attention_mask, seqlens)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...): the real tokens."""
        return t.reshape(self.B * self.S, *t.shape[2:]).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...), zeros at padded positions."""
        return pad(x, self.indices, self.B, self.S)
