"""Output classes of bertfast's models: transformers-style ModelOutput dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch


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
class CausalLMOutput(MaskedLMOutput):
    """BertLMHeadModel's output: ``loss`` (next-token cross-entropy), ``logits`` (B, S, V),
    ``hidden_states``, ``attentions`` (transformers' CausalLMOutputWithCrossAttentions without
    the cache and cross-attention fields, which bertfast does not have)."""


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
