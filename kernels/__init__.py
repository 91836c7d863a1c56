"""bertfast's Triton kernels, one file per op.

Each op ``name`` has a PyTorch twin ``name_reference`` (fp32 math, cast back to the input
dtype) that tests check the kernel against.  Names are resolved lazily so that importing
``kernels`` does not import every op (or triton) until one is used.
"""
from __future__ import annotations

import importlib

from kernels._common import INTERPRET, HAS_TRITON  # noqa: F401

# op name -> module in this package.  One module per op; every module exposes
# ``compile_specs(arch)`` for the compile check (python -m kernels.compile_check).
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
    "unpad": "padding",
    "pad": "padding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = importlib.import_module(f"kernels.{_EXPORTS[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
