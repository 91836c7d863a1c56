"""bertfast: a BERT encoder for PyTorch, a drop-in for Hugging Face transformers' BERT.

    from bertfast import BertModel
    model = BertModel.from_pretrained("minilm")      # the packaged all-MiniLM-L6-v2 checkpoint

``mean_pool``, ``ScalarMix`` (bertfast.pooling) and ``SentenceEncoder`` (bertfast.sentence) are
imported lazily, on first use.
"""
from __future__ import annotations

import importlib

from bertfast.config import BertConfig
from bertfast.loading import CheckpointError, resolve_model_path
from bertfast.modeling import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
    BertPreTrainedModel,
    ModelOutput,
    best_span,
)

__version__ = "0.1.0"

# name -> module, imported on first access
_LAZY = {
    "mean_pool": "bertfast.pooling",
    "ScalarMix": "bertfast.pooling",
    "SentenceEncoder": "bertfast.sentence",
    "optimize": "bertfast.integration",
    "restore": "bertfast.integration",
    "register_attention": "bertfast.integration",
    "CudaGraphRunner": "bertfast.cuda_graphs",
    "Tokenizer": "bertfast.tokenization",
    "train": "bertfast.train",
    "Index": "bertfast.index",
    "quantize_int8": "bertfast.quantize",
}

__all__ = [
    "BertConfig",
    "BertModel",
    "BertPreTrainedModel",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertLMHeadModel",
    "ModelOutput",
    "best_span",
    "CheckpointError",
    "resolve_model_path",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bertfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
