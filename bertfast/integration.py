"""Accelerate existing ``transformers`` BERT models in place.

    model = transformers.AutoModelForSequenceClassification.from_pretrained(...)
    bertfast.optimize(model)          # same object, same parameters, Triton kernels on CUDA
    bertfast.restore(model)           # back to transformers' own forward

``optimize`` finds the BertModel inside (a ``BertModel``, any ``BertFor*`` model, or a
sentence-transformers model wrapping one) and gives it a forward that runs bertfast's kernels
(bertfast/fast.py) on the *same* parameters: nothing is copied, so fine-tuning and
``save_pretrained`` behave as before.  Requests the kernels do not serve (``output_attentions``,
``inputs_embeds``, cross-attention, a KV cache, CPU tensors outside the interpreter) go to the
original forward unchanged.

``register_attention()`` adds ``"bertfast"`` to transformers' attention interface, so
``from_pretrained(..., attn_implementation="bertfast")`` runs the fused attention kernel inside
transformers' own layers.

transformers stays optional: it is imported only by these functions.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from bertfast import backend as _backend
from bertfast import fast

_ORIGINAL = "_bertfast_original_forward"


def find_bert(model: torch.nn.Module) -> torch.nn.Module:
    """The BERT encoder module inside ``model``: the first module with ``embeddings``,
    ``encoder.layer`` and a BERT config."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if (hasattr(m, "embeddings") and hasattr(getattr(m, "encoder", None), "layer")
                and getattr(cfg, "model_type", None) == "bert"):
            return m
    raise ValueError(f"bertfast.optimize: no BERT encoder found in {type(model).__name__} "
                     "(expected a transformers BertModel, BertFor* model or a sentence-transformers model of one)")


def _check_supported(bert) -> None:
    cfg = bert.config
    act = getattr(cfg, "hidden_act", None)
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish"):
        raise ValueError(f"bertfast.optimize: hidden_act {act!r} is not supported")
    pet = getattr(cfg, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise ValueError(f"bertfast.optimize: position_embedding_type {pet!r} is not supported (only 'absolute')")
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError("bertfast.optimize: models with cross-attention are not supported")
    if cfg.hidden_size // cfg.num_attention_heads not in (32, 64, 128):
        raise ValueError(f"bertfast.optimize: head size {cfg.hidden_size // cfg.num_attention_heads} is not "
                         "supported by the attention kernel (32, 64 or 128)")


def optimize(model: torch.nn.Module, *, unpad: bool = True, backend: str = "auto") -> torch.nn.Module:
    """Accelerate a transformers BERT model in place; returns the same object.

    ``backend="auto"`` runs the kernels on CUDA inputs and transformers' forward elsewhere;
    ``"triton"`` insists on the kernels (on CPU only under TRITON_INTERPRET=1)."""
    _backend.check_backend(backend)
    bert = find_bert(model)
    _check_supported(bert)
    if _ORIGINAL in bert.__dict__:  # already optimized: update the options
        bert._bertfast_options = {"unpad": bool(unpad), "backend": backend}
        return model
    original = bert.forward  # bound method of the class
    bert._bertfast_options = {"unpad": bool(unpad), "backend": backend}
    bert.__dict__[_ORIGINAL] = original
    bert.forward = functools.wraps(original)(functools.partial(_fast_forward, bert))
    return model


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``optimize``: the model's own forward again, caches dropped."""
    bert = find_bert(model)
    if _ORIGINAL in bert.__dict__:
        del bert.__dict__[_ORIGINAL]
        bert.__dict__.pop("forward", None)
        bert.__dict__.pop("_bertfast_options", None)
    for m in bert.modules():
        m.__dict__.pop("_bertfast_qkv", None)
    return model


def is_optimized(model: torch.nn.Module) -> bool:
    return _ORIGINAL in find_bert(model).__dict__


def _fast_forward(bert, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                  output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
    original = bert.__dict__[_ORIGINAL]
    opts = bert._bertfast_options
    cache_used = any(kwargs.get(k) is not None for k in ("cache", "past_key_values")) or kwargs.get("use_cache")
    eligible = (input_ids is not None and inputs_embeds is None and encoder_hidden_states is None
                and not output_attentions and not cache_used
                and (attention_mask is None or attention_mask.dim() == 2))
    if eligible:
        eligible = _backend.resolve(opts["backend"], input_ids.device) == "triton"
    if not eligible:
        return original(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds,
                        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                        return_dict=return_dict, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    from bertfast.modeling import validate_inputs

    dtype = bert.embeddings.LayerNorm.weight.dtype
    # transformers' config has the field names validate_inputs reads
    validate_inputs(bert.config, input_ids, attention_mask, token_type_ids, position_ids, None, dtype)
    if output_hidden_states is None:
        output_hidden_states = getattr(bert.config, "output_hidden_states", False)
    last, hidden = fast.encoder_forward(bert, input_ids, attention_mask, token_type_ids, position_ids,
                                        unpad=opts["unpad"], output_hidden_states=bool(output_hidden_states))
    pooled = bert.pooler(last) if getattr(bert, "pooler", None) is not None else None
    out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=last, pooler_output=pooled,
                                                       hidden_states=hidden)
    if return_dict is False:
        return out.to_tuple()
    return out


# ----------------------------------------------------------------------------- attn_implementation


def bertfast_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention-interface function: query/key/value (B, H, S, D), attention_mask
    the 2-D (B, S) padding mask (bertfast registers flash-attention style mask creation) or None;
    returns ((B, S, H, D), None)."""
    import kernels

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("attn_implementation='bertfast' supports self-attention over the whole sequence only "
                         "(no KV cache, no cross-attention)")
    if dropout > 0.0:  # the fused kernel has no dropout
        mask = None
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :] if attention_mask.dim() == 2 else attention_mask.bool()
            mask = keep
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                             is_causal=causal and mask is None, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attention_mask, float("-inf"))
    out = kernels.attention(query, key, value, attention_mask, causal=causal, scale=scaling, fallback=True)
    return out, None  # (B, S, H, D)


def register_attention(name: str = "bertfast") -> None:
    """Make ``attn_implementation="bertfast"`` available in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, bertfast_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)  # keep the 2-D padding mask
