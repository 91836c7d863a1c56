"""Accelerate existing ``transformers`` BERT models in place.

    model = transformers.AutoModelForSequenceClassification.from_pretrained(...)
    bertfast.optimize(model)          # same object, same parameters, Triton kernels on CUDA
    bertfast.restore(model)           # back to transformers' own forward

``optimize`` finds the BertModel inside (a ``BertModel``, any ``BertFor*`` model, or a
sentence-transformers model wrapping one) and gives it a forward that runs bertfast's own
forward (``bertfast.modeling.encoder_forward``: the same layer functions and ops as bertfast's
models, on the kernels) over the model's *own* modules and parameters: nothing is copied, so fine-tuning and
``save_pretrained`` behave as before.

A drop-in means the same answers as transformers' own forward:

* The same arguments, read the way transformers reads them: ``output_hidden_states`` (a flag, or
  a selection of layers such as ``[0, 2, -1]``), ``output_attentions``, ``return_dict`` and
  ``use_cache`` given as arguments or taken from the config, ``past_key_values`` / ``cache``,
  and any other keyword transformers passes down.  The same return type, keys and tuple order.
* Whatever the kernels do not produce goes to transformers' original forward, untouched:
  attention probabilities, ``inputs_embeds``, cross-attention inputs, a KV cache (a decoder
  with ``use_cache``), a non-2-D mask, ``is_causal`` overrides, keywords bertfast does not know
  with a value, CPU tensors under ``backend="auto"``, and gradient checkpointing where the fast
  path cannot recompute per layer.  Model properties the kernels lack (head size, activation,
  dtype) run the original forward under ``backend="auto"`` and raise ``ValueError`` naming
  them under ``backend="triton"`` (at ``optimize`` and at the forward, before any kernel).
* Padding-free execution (``unpad=True``) leaves padded positions' outputs uncomputed.  Where
  something reads them, the padded computation runs instead: the pooler when a row's first
  token is padding (left padding), and the losses of transformers heads that read padded
  positions (question answering with ``start_positions`` / ``end_positions``, per-token
  ``labels`` other than -100 at padded positions, for a decoder also the label after a padded
  position: the causal LM loss scores logits i against label i + 1; ``optimize`` wraps the
  head's forward to hand its labels to the encoder).  For a decoder those cases take the
  original forward: a padded query that sees no key has no single answer (transformers' eager
  and SDPA differ there).  The decision is ``bertfast.modeling.plan_forward``'s, as for
  bertfast's own models: one host read per forward, shared with the input checks.
* Gradient checkpointing (``model.gradient_checkpointing_enable()``) recomputes each layer in
  the backward with the layer's own checkpoint function, on the kernels.

``register_attention()`` adds ``"bertfast"`` to transformers' attention interface, so
``from_pretrained(..., attn_implementation="bertfast")`` runs the fused attention kernel inside
transformers' own layers.

transformers stays optional: it is imported only by these functions.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from bertfast import backend as _backend
from bertfast import modeling
from bertfast.options import ATTR as _OPTIONS_ATTR
from bertfast.options import RuntimeOptions, attach, options_of

_ORIGINAL = "_bertfast_original_forward"
_HEAD_ORIGINAL = "_bertfast_original_head_forward"

# set by an optimized head's forward to (bert, what its loss reads: per-token labels, QA
# positions); the bert forward inside hands them to its plan (bertfast.modeling.plan_forward),
# which decides in the same host read as the input checks whether the padded computation runs
_HEAD_LOSS = contextvars.ContextVar("bertfast_head_loss", default=None)

# keywords of transformers' BertModel.forward served on the kernel path when they carry a value
_SERVED = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# read here with transformers' own rules
_FLAGS = ("output_attentions", "output_hidden_states", "return_dict", "use_cache")
# only the heads' losses read it (transformers passes the heads' kwargs on to the encoder)
_HARMLESS = ("num_items_in_batch",)
# a head's forward keywords whose loss may read padded positions
_LABEL_ARGS = ("labels", "start_positions", "end_positions")


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


def kernel_unsupported(bert, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why bertfast's kernels cannot run this transformers BERT encoder (a sentence naming the
    property), or None when they can: ``bertfast.backend.kernel_unsupported`` on its config and
    parameter dtype."""
    if dtype is None:
        dtype = bert.embeddings.LayerNorm.weight.dtype
    return _backend.kernel_unsupported(bert.config, dtype)


def _param_names(fn) -> tuple:
    """Names of ``fn``'s positional-or-keyword parameters (self excluded for bound methods)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # pragma: no cover
        return ()
    return tuple(n for n, p in sig.parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _bind(names: tuple, args: tuple, kwargs: dict) -> Optional[dict]:
    """args + kwargs as one dict of keywords; None when they do not bind (the original forward
    then raises transformers' own error)."""
    if len(args) > len(names):
        return None
    bound = dict(kwargs)
    for name, value in zip(names, args):
        if name in bound:
            return None
        bound[name] = value
    return bound


def optimize(model: torch.nn.Module, *, unpad=True, backend: str = "auto") -> torch.nn.Module:
    """Accelerate a transformers BERT model in place; returns the same object.

    ``unpad``: ``True`` (padding-free where exact, else the padded batch), ``"always"`` (always
    padding-free: masked semantics, opt-in, as bertfast's ``config.unpad``) or ``False``.

    ``backend="auto"`` runs the kernels on CUDA inputs the kernels support and transformers'
    forward elsewhere; ``"triton"`` insists on the kernels (on CPU only under TRITON_INTERPRET=1)
    and raises ``ValueError`` for a model they cannot run."""
    _backend.check_backend(backend)
    bert = find_bert(model)
    if backend == "triton":
        why = kernel_unsupported(bert)
        if why is not None:
            raise ValueError(f"bertfast.optimize(backend='triton'): {why}")
    from bertfast.config import unpad_mode

    try:
        unpad_mode(unpad)  # True (exact padding-free), "always" (masked semantics) or False
    except ValueError as e:
        raise ValueError(f"bertfast.optimize: {e}") from None
    opts = RuntimeOptions(backend=backend, unpad=unpad)
    if _ORIGINAL not in bert.__dict__:
        original = bert.forward  # bound method of the class
        bert.__dict__[_ORIGINAL] = original
        bert.__dict__["_bertfast_params"] = _param_names(original)
        bert.forward = functools.wraps(original)(functools.partial(_fast_forward, bert))
    attach(bert, opts)  # the encoder's RuntimeOptions (bertfast/options.py), as on bertfast's models
    _wrap_head(model, bert)
    return model


def _wrap_head(model, bert) -> None:
    """Let the head's forward hand what its loss reads (labels, QA positions) to the encoder's plan."""
    if model is bert or _HEAD_ORIGINAL in model.__dict__:
        return
    original = model.forward
    names = _param_names(original)
    if not any(n in names for n in _LABEL_ARGS):
        return
    model.__dict__[_HEAD_ORIGINAL] = original
    model.__dict__["_bertfast_head_params"] = names
    model.forward = functools.wraps(original)(functools.partial(_head_forward, model, bert))


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``optimize``: the model's own forward (and the head's) again."""
    bert = find_bert(model)
    if _ORIGINAL in bert.__dict__:
        del bert.__dict__[_ORIGINAL]
        bert.__dict__.pop("forward", None)
        bert.__dict__.pop(_OPTIONS_ATTR, None)
        bert.__dict__.pop("_bertfast_params", None)
    for m in model.modules():
        if _HEAD_ORIGINAL in m.__dict__:
            del m.__dict__[_HEAD_ORIGINAL]
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_bertfast_head_params", None)
    return model


def is_optimized(model: torch.nn.Module) -> bool:
    return _ORIGINAL in find_bert(model).__dict__


# ----------------------------------------------------------------------------- exact padding


def _head_forward(head, bert, *args, **kwargs):
    """The head's own forward, with what its loss reads handed to the encoder's plan (no host
    read here): per-token ``labels`` and whether QA positions are given."""
    original = head.__dict__[_HEAD_ORIGINAL]
    if _ORIGINAL not in bert.__dict__ or torch.compiler.is_compiling():  # traced: no host read, nothing to plan
        return original(*args, **kwargs)
    bound = _bind(head.__dict__.get("_bertfast_head_params", ()), args, kwargs)
    if bound is None:
        return original(*args, **kwargs)  # transformers' own error
    loss = {"labels": bound.get("labels"),
            "reads_all_positions": bound.get("start_positions") is not None or bound.get("end_positions") is not None}
    token = _HEAD_LOSS.set((bert, loss))
    try:
        return original(*args, **kwargs)
    finally:
        _HEAD_LOSS.reset(token)


# ----------------------------------------------------------------------------- gradient checkpointing


def _checkpointing(bert) -> bool:
    """Whether transformers would checkpoint some layer of this forward (GradientCheckpointingLayer:
    the layer's flag, training mode, gradients enabled)."""
    return bert.training and torch.is_grad_enabled() and any(
        getattr(layer, "gradient_checkpointing", False) for layer in bert.encoder.layer)


def checkpointed_layer(layer, x, fwd):
    """One layer on the kernels, recomputed in the backward when the layer is checkpointed
    (its ``_gradient_checkpointing_func``: ``torch.utils.checkpoint.checkpoint`` with the
    model's checkpointing kwargs, RNG state preserved so dropout replays the same masks)."""
    if getattr(layer, "gradient_checkpointing", False) and fwd.training and torch.is_grad_enabled():
        ckpt = getattr(layer, "_gradient_checkpointing_func", None)
        if ckpt is None:
            from torch.utils.checkpoint import checkpoint

            ckpt = functools.partial(checkpoint, use_reentrant=False)
        return ckpt(functools.partial(modeling.layer_forward, layer, fwd=fwd), x)
    return modeling.layer_forward(layer, x, fwd)


# ----------------------------------------------------------------------------- the forward


def _fast_forward(bert, *args, **kwargs):
    original = bert.__dict__[_ORIGINAL]
    route = _route(bert, args, kwargs)
    out = _kernel_forward(bert, route) if route is not None else None
    if out is None:
        return original(*args, **kwargs)
    return out


def _route(bert, args, kwargs) -> Optional[dict]:
    """The kernel path's inputs, or None: transformers' original forward serves this call.  No
    host read here (the padding decision is ``_kernel_forward``'s plan)."""
    bound = _bind(bert.__dict__.get("_bertfast_params", ()), args, kwargs)
    if bound is None:
        return None
    cfg = bert.config
    if "is_causal" in bound or hasattr(cfg, "is_causal"):  # merge_with_config_defaults' causal override
        return None
    for name, value in bound.items():
        if name in _SERVED or name in _FLAGS or name in _HARMLESS:
            continue
        if value is not None:  # inputs_embeds, encoder states, a cache, flash varlen kwargs, anything unknown
            return None
    input_ids = bound.get("input_ids")
    mask = bound.get("attention_mask")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        return None
    if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
        return None
    # output flags exactly as transformers' capture_outputs reads them: a keyword given (even None)
    # wins over the config
    if bound.get("output_attentions", getattr(cfg, "output_attentions", False)):
        return None  # the fused attention never forms the probabilities
    # use_cache as merge_with_config_defaults and BertModel.forward resolve it
    use_cache = bound.get("use_cache")
    if use_cache is None:
        use_cache = getattr(cfg, "use_cache", None)
    if use_cache and getattr(bert, "gradient_checkpointing", False) and bert.training and torch.is_grad_enabled():
        use_cache = False
    if use_cache and getattr(cfg, "is_decoder", False):
        return None  # transformers returns a KV cache
    opts = options_of(bert)
    if _backend.resolve(opts.backend, input_ids.device) != "triton":
        return None
    why = kernel_unsupported(bert)
    if why is not None:
        if opts.backend == "triton":
            raise ValueError(f"bertfast.optimize(backend='triton'): {why}")
        return None
    checkpoint = _checkpointing(bert)
    layers = bert.encoder.layer
    causal = bool(len(layers)) and modeling.is_causal(layers[0].attention.self)
    attention_dropout = bool(bert.training and len(layers) and modeling.attention_dropout_p(layers[0].attention.self) > 0)
    return {
        "input_ids": input_ids, "attention_mask": mask, "token_type_ids": bound.get("token_type_ids"),
        "position_ids": bound.get("position_ids"), "unpad": opts.unpad, "checkpoint": checkpoint,
        "causal": causal, "attention_dropout": attention_dropout,
        "output_hidden_states": bound.get("output_hidden_states", getattr(cfg, "output_hidden_states", False)),
        "return_dict": bound.get("return_dict", getattr(cfg, "return_dict", True)),
    }


def _hidden_selection(bert, ohs, num_hidden_states: int) -> Optional[set]:
    """The hidden-state indices ``output_hidden_states`` selects (None: all), as transformers'
    capture_outputs resolves them."""
    try:
        from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states
    except ImportError:  # older transformers: a flag only
        return None
    selected = selected_hidden_states(ohs)
    if selected is None:
        return None
    return resolve_hidden_states_indices(bert, selected)


def _head_loss(bert, input_ids) -> dict:
    """What the loss of the optimized head around this forward reads (``_head_forward``):
    plan_forward's ``labels`` (per-token ones only, as the mask's shape) and ``reads_all_positions``."""
    ctx = None if torch.compiler.is_compiling() else _HEAD_LOSS.get()
    if ctx is None or ctx[0] is not bert:
        return {}
    loss = ctx[1]
    labels = loss["labels"]
    per_token = torch.is_tensor(labels) and tuple(labels.shape) == tuple(input_ids.shape)
    return {"labels": labels if per_token else None, "reads_all_positions": loss["reads_all_positions"]}


def _kernel_forward(bert, route: dict):
    """The forward on the kernels, as planned by ``bertfast.modeling.plan_forward`` (input checks
    and the padded / packed decision in one host read); None where transformers' original
    forward must serve it (a decoder whose padded positions are read)."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    ids, mask, tts, pos = route["input_ids"], route["attention_mask"], route["token_type_ids"], route["position_ids"]
    dtype = bert.embeddings.LayerNorm.weight.dtype
    causal = route["causal"]
    # transformers' config has the field names plan_forward reads (config.unpad: optimize's option)
    plan = modeling.plan_forward(bert.config, ids, mask, tts, pos, None, dtype, triton=True, causal=causal,
                        attention_dropout=route["attention_dropout"],
                        reads_first_token=getattr(bert, "pooler", None) is not None,
                        shifted_labels=bool(getattr(bert.config, "is_decoder", False)),
                        unpad=route["unpad"], **_head_loss(bert, ids))
    if causal and plan.reads_padding:
        return None  # a padded query before the first real token sees no key: transformers decides
    ohs = route["output_hidden_states"]
    extra = {"layer_fn": checkpointed_layer} if route["checkpoint"] else {}
    last, hidden, _, _ = modeling.encoder_forward(bert, plan, ids, tts, pos, None, kernels=True,
                                                  output_hidden_states=bool(ohs), **extra)
    pooled = bert.pooler(last) if getattr(bert, "pooler", None) is not None else None
    out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=last, pooler_output=pooled)
    if ohs:
        hidden = list(hidden)
        selection = _hidden_selection(bert, ohs, len(hidden))
        if selection is not None:
            hidden = [h if i in selection else None for i, h in enumerate(hidden)]
        out["hidden_states"] = tuple(hidden)
    if route["return_dict"] is False:
        return out.to_tuple()
    return out


# ----------------------------------------------------------------------------- attn_implementation


def bertfast_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention-interface function: query/key/value (B, H, S, D), attention_mask
    the 2-D (B, S) padding mask (bertfast registers flash-attention style mask creation), a 4-D
    mask, or None; returns ((B, S, H, D), None).  Causal attention (``is_causal``, else the
    module's ``is_causal``) is applied in every mode, padding mask or not, dropout or not."""
    from bertfast import kernels
    from bertfast.masks import additive_from_keep, fold_causal

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("attn_implementation='bertfast' supports self-attention over the whole sequence only "
                         "(no KV cache, no cross-attention)")
    if dropout > 0.0:  # the fused kernel has no dropout: SDPA with dropout
        S = query.shape[-2]
        additive = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                additive = additive_from_keep(attention_mask.bool()[:, None, None, :], query.dtype)
            elif attention_mask.dtype == torch.bool:
                additive = additive_from_keep(attention_mask, query.dtype)
            else:
                additive = attention_mask.to(query.dtype)
        if causal and additive is not None:
            additive = fold_causal(additive, S)  # finite, so a row that sees no key gives a uniform softmax
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=additive, dropout_p=dropout,
                                             is_causal=causal and additive is None, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    out = kernels.attention(query, key, value, attention_mask, causal=causal, scale=scaling, fallback=True)
    return out, None  # (B, S, H, D)


def register_attention(name: str = "bertfast") -> None:
    """Make ``attn_implementation="bertfast"`` available in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, bertfast_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)  # keep the 2-D padding mask
