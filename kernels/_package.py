"""bertfast's Triton kernels, one file per op: the package ``bertfast.kernels``.

This file is the package's ``__init__``: the folder has none, so that no top-level package named
``kernels`` exists at the checkout root (Hugging Face's ``kernels`` package, which transformers
imports, owns that name); ``bertfast/__init__.py`` binds the folder as ``bertfast.kernels``.

Each op ``name`` has a PyTorch twin ``name_reference`` (fp32 math, cast back to the input
dtype) that tests check the kernel against.  ``TRITON_INTERPRET=1`` must be set before this
package is imported for the kernels to run under the interpreter (see kernels/_common.py).
"""
from __future__ import annotations

import importlib

from bertfast.kernels._common import INTERPRET, HAS_TRITON  # noqa: F401

# op name -> module in this package.  One module per op; every module exposes
# ``compile_specs(arch)`` for the compile check (python -m bertfast.kernels.compile_check).
OP_MODULES = {
    "qkv_projection": "qkv_projection",
    "linear": "linear",
    "add_layernorm": "add_layernorm",
    "embeddings_layernorm": "embeddings_layernorm",
    "attention": "attention",
}

# public name -> module
_EXPORTS = {
    "qkv_projection": "qkv_projection",
    "qkv_projection_reference": "qkv_projection",
    "linear": "linear",
    "linear_reference": "linear",
    "add_layernorm": "add_layernorm",
    "add_layernorm_reference": "add_layernorm",
    "embeddings_layernorm": "embeddings_layernorm",
    "embeddings_layernorm_reference": "embeddings_layernorm",
    "attention": "attention",
    "attention_reference": "attention",
    "attention_varlen": "attention",
    "attention_varlen_reference": "attention",
    "prepare_attention_mask": "attention",
    "AttentionMask": "attention",
    "supports_head_dim": "attention",
    "unpad": "padding",
    "pad": "padding",
}

__all__ = sorted(_EXPORTS)

# Imported eagerly: each op's module has the op's own name (kernels/linear.py holds linear), and
# importing a submodule binds its name on the package, which would shadow a lazy lookup.
for _name, _module in _EXPORTS.items():
    if HAS_TRITON or _module == "padding":
        globals()[_name] = getattr(importlib.import_module(f"bertfast.kernels.{_module}"), _name)
del _name, _module
