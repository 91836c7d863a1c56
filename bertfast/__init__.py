"""bertfast: a BERT encoder for PyTorch, a drop-in for Hugging Face transformers' BERT.

    from bertfast import BertModel
    model = BertModel.from_pretrained("minilm")      # the packaged all-MiniLM-L6-v2 checkpoint

``mean_pool``, ``ScalarMix`` (bertfast.pooling) and ``SentenceEncoder`` (bertfast.sentence) are
imported lazily, on first use.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def _bind_kernels() -> None:
    """Make the Triton kernels importable as ``bertfast.kernels``, their one import name.

    The kernels live in the source tree's top-level ``kernels/`` folder (one file per op), which
    has no ``__init__.py`` on purpose: a top-level package named ``kernels`` at the checkout root
    would shadow Hugging Face's ``kernels`` package (which transformers imports) in every Python
    process started there.  A wheel installs that folder as ``bertfast/kernels/``
    (pyproject.toml's package-dir); an editable install or a plain checkout on ``PYTHONPATH``
    keeps it beside this package.  Either way the package's own code is ``kernels/_package.py``,
    and its submodules are found in that folder."""
    name = __name__ + ".kernels"
    if name in sys.modules:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(here, "kernels")  # installed from the wheel
    if not os.path.isfile(os.path.join(folder, "_package.py")):
        folder = os.path.join(os.path.dirname(here), "kernels")  # the source tree
    init = os.path.join(folder, "_package.py")
    if not os.path.isfile(init):
        raise ImportError(f"bertfast's kernels are missing: no {init} (a broken install?)")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    globals()["kernels"] = module


_bind_kernels()

from bertfast.config import BertConfig  # noqa: E402
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
