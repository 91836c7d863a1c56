"""Remove and restore padding tokens, for running BERT on packed (varlen) sequences.

* ``unpad(hidden, attention_mask) -> (packed, indices, cu_seqlens, max_seqlen)``
* ``pad(packed, indices, batch, seqlen) -> hidden``
* ``Packing``: the layout of one padded batch (indices, per-sequence lengths, ``cu_seqlens``,
  ``max_seqlen``), computed once per forward and handed to every part that needs it (the torch
  layers, the Triton varlen kernels, the per-token heads), flash-attention's bert_padding style.
  ``Packing.from_lengths`` builds it from lengths the caller already read on the host (no host
  read of its own); ``Packing.from_mask`` reads the mask itself (one host read);
  ``Packing.from_mask_static`` builds it on the device for a fixed token capacity (no host read:
  for CUDA graphs, bertfast/cuda_graphs.py).

These are index operations (a gather and a scatter), written with differentiable torch ops:
they run on any device, without triton or the interpreter, and autograd flows through both.
The layout they produce is the one ``bertfast.kernels.attention_varlen`` reads: the tokens of sequence
``b`` are rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` of ``packed``, in their original order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from bertfast.kernels._common import dtype_name

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
        desc = f"{tuple(indices.shape)} {dtype_name(indices.dtype)}" if isinstance(indices, torch.Tensor) \
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


def _static_indices(valid_flat: torch.Tensor, capacity: int, fill: int) -> torch.Tensor:
    """The flat indices of the True entries of a 1-D bool tensor, in order, in a tensor of
    exactly ``capacity`` entries: the first min(count, capacity) real indices, then ``fill``.
    Device ops only (no host read, capturable in a CUDA graph)."""
    try:
        return torch.nonzero_static(valid_flat, size=capacity, fill_value=fill).reshape(-1)
    except (NotImplementedError, RuntimeError, AttributeError):  # pragma: no cover - older torch / devices
        n = valid_flat.numel()
        order = torch.argsort((~valid_flat).to(torch.int8), stable=True)  # real positions first, in order
        if capacity > n:
            order = torch.cat([order, order.new_full((capacity - n,), fill)])
        order = order[:capacity]
        real = torch.arange(capacity, device=valid_flat.device) < valid_flat.sum()
        return torch.where(real, order, torch.full_like(order, fill))


@dataclass
class Packing:
    """Where the real tokens of a padded (B, S) batch are, for padding-free execution.

    The T real tokens are packed sequence after sequence, each in its original order (the layout
    of ``unpad``): ``indices[t]`` is token t's flat position in the B*S grid, sequence b holds
    ``seqlens[b]`` tokens (0 for a fully padded row), rows ``cu_seqlens[b]:cu_seqlens[b + 1]``
    of the packed tensor (``cu_seqlens`` int32 on the device, as ``bertfast.kernels.attention_varlen``
    reads it).

    A *static* packing (``slack=True``, from ``from_mask_static``) has room for a fixed number
    of tokens, ``total`` (the capacity), of which only the first ``cu_seqlens[-1]`` are real;
    the remaining *slack* slots hold the index ``B * S``, one past the grid (a "dump" row).
    ``gather`` and ``pad`` handle them (no out-of-range index reaches a device kernel; slack rows
    are dropped on the way back), so a packed forward over ``total >= T`` rows gives, at the
    real tokens, exactly the result over the T real tokens: every per-token op (embeddings, GEMM,
    LayerNorm, activations) is row-wise, and the varlen attention kernel reads only rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]``, never a row past ``cu_seqlens[-1]``, so the slack rows
    only hold per-token values nobody reads.  Its ``seqlens`` are None (they are not known on
    the host): the torch path's per-sequence attention loop needs them, so static packings are
    for the Triton path only.  Code that indexes with ``indices`` itself (instead of calling
    ``gather`` / ``pad``) must treat ``indices == B * S`` as "no token"."""

    indices: torch.Tensor  # (T,) int64; (capacity,) with slack slots = B * S when ``slack``
    seqlens: Optional[List[int]]  # B python ints, sum T; None for a static packing
    B: int
    S: int
    cu_seqlens: Optional[torch.Tensor] = None  # (B + 1,) int32
    max_seqlen: int = 0
    slack: bool = False  # static packing: indices may hold B * S (slack slots past the real tokens)

    @property
    def total(self) -> int:
        """Rows of the packed tensor: the real token count, or a static packing's capacity."""
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

    @classmethod
    def from_mask_static(cls, attention_mask: torch.Tensor, capacity: int) -> "Packing":
        """From a validated 2-D 0/1 mask (B, S) holding at most ``capacity`` real tokens, with
        device ops only (no host read: capturable in a CUDA graph, so that a replay packs
        whatever mask its static buffer holds).  ``indices`` has exactly ``capacity`` entries:
        the real tokens' flat positions in order, then ``B * S`` in the slack slots;
        ``cu_seqlens`` counts the real tokens only; ``max_seqlen = S`` (the longest sequence is
        not known on the host); ``seqlens`` None.  A mask with more than ``capacity`` real
        tokens is the caller's error (it is not checked: that would need a host read)."""
        op = "Packing.from_mask_static"
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            what = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else \
                type(attention_mask).__name__
            raise ValueError(f"{op}: attention_mask must be a 2-D (B, S) tensor, got {what}")
        if attention_mask.is_complex():
            raise ValueError(f"{op}: attention_mask must be bool, integer or float (0/1)")
        B, S = attention_mask.shape
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= B * S:
            raise ValueError(f"{op}: capacity must be a python int in [1, B * S = {B * S}], got {capacity!r}")
        valid = attention_mask != 0
        indices = _static_indices(valid.reshape(-1), capacity, B * S)
        cu = torch.zeros(B + 1, dtype=torch.int32, device=attention_mask.device)
        cu[1:] = torch.cumsum(valid.sum(1, dtype=torch.int32), 0, dtype=torch.int32)
        return cls(indices, None, B, S, cu, S, slack=True)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...): the real tokens (a static packing's slack rows repeat the
        last grid position: in range, never read)."""
        idx = self.indices
        if self.slack:
            idx = idx.clamp(max=self.B * self.S - 1)
        return t.reshape(self.B * self.S, *t.shape[2:]).index_select(0, idx)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...), zeros at padded positions (a static packing's slack rows
        go to a dump row past the grid, which is dropped)."""
        if not self.slack:
            return pad(x, self.indices, self.B, self.S)
        n = self.B * self.S
        out = pad(x, self.indices, 1, n + 1)  # (1, B*S + 1, ...): row B*S is the dump row
        return out[0, :n].reshape(self.B, self.S, *x.shape[1:])
