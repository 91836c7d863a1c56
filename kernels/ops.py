"""Entry points the model calls (placeholder: eager passthrough; custom ops come next)."""
from kernels import (  # noqa: F401
    add_layernorm, attention, attention_varlen, embeddings_layernorm, linear, pad, qkv_projection, unpad,
)
