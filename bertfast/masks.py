"""Attention masks: the one builder.

A forward's attention mask is built once (``build_forward_mask``) and handed to every layer as a
``ForwardMask``; nothing is rebuilt per layer and nothing is cached between forwards.

One convention everywhere: a masked score gets the dtype's most negative *finite* value (as
transformers), so that a query row that sees no key gets the uniform softmax, never NaN.  The
one exception is the kernels' own 0/1 key mask (``bertfast.kernels.AttentionMask`` of kind MASK_KEYS /
MASK_LENS), whose masked keys drop out of the softmax exactly; the forward's plan
(bertfast/plan.py) hands the kernels an additive mask instead where some query row would see no
key, so both backends agree with transformers there too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bertfast.kernels.attention import MASK_LENS, AttentionMask, prepare_attention_mask


def additive_from_keep(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool ``keep`` (True = attend), any shape -> additive mask of ``dtype``: 0 where kept, the
    dtype's most negative finite value elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def fold_causal(additive: torch.Tensor, seqlen: int) -> torch.Tensor:
    """An additive mask (broadcastable to (B, H, S, S)) with the future (key j > query i) masked
    at the same finite value: (B|1, H|1, S, S)."""
    future = torch.ones(seqlen, seqlen, dtype=torch.bool, device=additive.device).triu_(1)  # (S, S)
    return additive.masked_fill(future, torch.finfo(additive.dtype).min)


def additive_mask_from(attention_mask: Optional[torch.Tensor], dtype: torch.dtype,
                       known_padded: bool = False) -> Optional[torch.Tensor]:
    """A validated attention_mask -> additive float mask broadcastable to (B, H, S, S), or None
    when nothing is masked.  2-D 0/1 masks become (B, 1, 1, S).  ``known_padded``: the caller
    knows the 2-D mask has padding (no host read here); otherwise an all-ones mask is detected
    with one host read (not while tracing)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask
    keep = attention_mask.bool()  # (B, S)
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if not tracing and not known_padded and bool(keep.all()):
        return None  # no padding: let attention run unmasked (fastest path)
    return additive_from_keep(keep, dtype)[:, None, None, :]  # (B, 1, 1, S)


@dataclass
class ForwardMask:
    """The attention mask of one padded forward, for every layer.

    ``kernel``: what ``bertfast.kernels.attention`` reads (None when the kernels do not run);
    ``kernel_causal``: whether the kernel still applies causal masking itself (False when it was
    folded into an additive mask).  ``additive()``: the additive (B|1, 1|H, S|1, S) mask of the
    PyTorch attention (SDPA / eager), causal folded in where a mask exists, or None; built on
    first use, once per forward.  ``torch_causal``: whether SDPA must still apply ``is_causal``."""

    raw: Optional[torch.Tensor]  # None, 2-D 0/1 (known to hold padding) or 4-D additive
    dtype: torch.dtype
    seqlen: int
    causal: bool
    kernel: Optional[AttentionMask] = None
    kernel_causal: bool = False
    _additive: Optional[torch.Tensor] = None
    _built: bool = False

    def additive(self) -> Optional[torch.Tensor]:
        if not self._built:
            add = additive_mask_from(self.raw, self.dtype, known_padded=True)
            if add is not None and self.causal:
                add = fold_causal(add, self.seqlen)
            self._additive, self._built = add, True
        return self._additive

    @property
    def torch_causal(self) -> bool:
        return self.causal and self.additive() is None


def build_forward_mask(mask: Optional[torch.Tensor], B: int, S: int, dtype: torch.dtype, *, causal: bool,
                       kernels: bool, key_lengths: Optional[torch.Tensor] = None) -> ForwardMask:
    """The mask of a padded forward, from the plan's mask (None: nothing padded; 2-D 0/1 known
    to hold padding; 4-D additive).  ``kernels``: prepare what the attention kernel reads, with
    no host read: ``key_lengths`` (int32 (B,) on the device) when the plan found right padding
    (the kernel's fastest variant), else the per-key mask; a 4-D mask with ``causal`` gets the
    causal part folded in at the same finite value."""
    fm = ForwardMask(mask, dtype, S, causal)
    if not kernels:
        return fm
    if mask is None:
        fm.kernel, fm.kernel_causal = prepare_attention_mask(None, B, None, S), causal
    elif mask.dim() == 4:
        add = fold_causal(mask, S) if causal and mask.is_floating_point() else mask
        fm.kernel = prepare_attention_mask(add, B, None, S)
        fm.kernel_causal = causal and not mask.is_floating_point()
    elif key_lengths is not None:
        fm.kernel, fm.kernel_causal = AttentionMask(MASK_LENS, None, key_lengths, B, None, S), causal
    else:
        fm.kernel, fm.kernel_causal = prepare_attention_mask(mask, B, None, S, analyze=False), causal
    return fm
