"""Accelerate existing ``transformers`` BERT models in place.

    model = transformers.AutoModelForSequenceClassification.from_pretrained(...)
    bertfast.optimize(model)          # same object, same parameters: Triton kernels on CUDA,
                                      # bertfast's padding-free PyTorch path on CPU
    bertfast.restore(model)           # back to transformers' own forward

``optimize`` finds the BertModel inside (a ``BertModel``, any ``BertFor*`` model, or a
sentence-transformers model wrapping one) and gives it a forward that runs bertfast's own
forward (``bertfast.modeling.encoder_forward``: the same layer functions and ops as bertfast's
models, on the kernels, or on CPU bertfast's PyTorch path) over the model's *own* modules and
parameters: nothing is copied, so fine-tuning and ``save_pretrained`` behave as before.

On CPU (``backend="auto"`` or ``"torch"``) the forward is bertfast's PyTorch path, padding-free:
equal to transformers (SDPA) within fp32 rounding and faster the more padding a batch holds,
since padded tokens are never computed.  Measured on the packaged MiniLM, one thread, fp32, a
loaded 2-core machine: 32 x 128 tokens with lengths 8-128, max |diff| 3.2e-6 at real tokens and
2e-7 on the pooler, 2.2x faster; lengths 100-128, 1.3x; no padding, the same speed (0 diff).

A drop-in means the same answers as transformers' own forward:

* The same arguments, read the way transformers reads them: ``output_hidden_states`` (a flag, or
  a selection of layers such as ``[0, 2, -1]``), ``output_attentions``, ``return_dict`` and
  ``use_cache`` given as arguments or taken from the config, ``past_key_values`` / ``cache``,
  and any other keyword transformers passes down.  The same return type, keys and tuple order.
* Whatever the kernels do not produce goes to transformers' original forward, untouched:
  attention probabilities, ``inputs_embeds``, cross-attention inputs, a KV cache (a decoder
  with ``use_cache``), a non-2-D mask, ``is_causal`` overrides, keywords bertfast does not know
  with a value, and under ``backend="auto"`` tensors on a device other than CUDA and CPU.  Model
  properties the kernels lack (head size, activation, dtype) run the original forward under
  ``backend="auto"`` and raise ``ValueError`` naming them under ``backend="triton"`` (at
  ``optimize`` and at the forward, before any kernel).
* Hooks and wrapped modules: the fast path runs the embeddings and each layer functionally
  (their parameters read by name).  A part with a forward / backward (pre-)hook on it or on a
  module inside, or whose linear / LayerNorm / embedding / dropout is not the plain torch
  module (a PEFT LoRA wrapper, a quantized linear, a replaced ``forward``), runs through
  transformers' own module instead, its hooks firing once as in transformers; the other parts
  stay on the fast path.  A hook the fast path cannot honour (on the encoder module itself, or
  a global module hook) makes the whole forward transformers' under ``backend="auto"`` and is
  refused by name under ``backend="triton"``.  transformers' own output-capturing hooks do not
  count (the fast path returns the hidden states itself).
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
  the backward with the layer's own checkpoint function, on the kernels
  (``bertfast.modeling.run_layer``, the same rule as for bertfast's models).

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
import torch.nn as nn
import torch.nn.functional as F

from bertfast import backend as _backend
from bertfast import modeling
from bertfast.options import ATTR as _OPTIONS_ATTR
from bertfast.options import RuntimeOptions, attach, options_of

_ORIGINAL = "_bertfast_original_forward"
_HEAD_ORIGINAL = "_bertfast_original_head_forward"
_PARTS = "_bertfast_module_parts"  # the last plain result of _module_parts, with its key

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


def torch_path_unsupported(bert) -> Optional[str]:
    """Why bertfast's PyTorch path cannot run this transformers BERT encoder, or None: any head
    size and float dtype run there; the activation must be one of bertfast/activations.py's and
    the position embeddings absolute."""
    from bertfast.activations import ACTIVATIONS

    cfg = bert.config
    act = getattr(cfg, "hidden_act", None)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        return f"hidden_act {act!r} is not one of bertfast's activations"
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {cfg.position_embedding_type!r} is not absolute"
    return None


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

    ``backend="auto"`` runs the kernels on CUDA inputs the kernels support, bertfast's PyTorch
    path on CPU (padding-free; equal to transformers within rounding, see the module docstring)
    and transformers' forward elsewhere; ``"torch"`` runs bertfast's PyTorch path on any device;
    ``"triton"`` insists on the kernels (on CPU only under TRITON_INTERPRET=1) and raises
    ``ValueError`` for a model they cannot run.  ``bertfast.restore`` gives transformers'
    forward back."""
    _backend.check_backend(backend)
    bert = find_bert(model)
    if backend == "triton":
        why = kernel_unsupported(bert) or _module_parts(bert)[0]
        if why is not None:
            raise ValueError(f"bertfast.optimize(backend='triton'): {why}")
    from bertfast.config import unpad_mode

    try:
        unpad_mode(unpad)  # True (exact padding-free), "always" (masked semantics) or False
    except ValueError as e:
        raise ValueError(f"bertfast.optimize: {e}") from None
    opts = RuntimeOptions(backend=backend, unpad=unpad)
    _watch_registrations()
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
        bert.__dict__.pop(_PARTS, None)
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


# ----------------------------------------------------------------------------- hooks and wrapped modules
#
# The fast path (kernels or bertfast's PyTorch path) runs the embeddings and each layer
# functionally: it reads their parameters by name and never calls their modules.  Whatever that
# would skip (a hook, a module wrapped or replaced, e.g. PEFT's LoRA layers, bitsandbytes'
# linears, accelerate's forward hooks) makes that part run through transformers' own module
# instead (``_ModuleLayers``); the rest stays on the fast path.  One rule, ``_module_parts``,
# looked up at every forward (hooks come and go) through ``_module_parts_now``.

# what the kernel path reads by name, and the plain module type it assumes there
_READ_IN_LAYER = {
    "attention.self.query": nn.Linear, "attention.self.key": nn.Linear, "attention.self.value": nn.Linear,
    "attention.self.dropout": nn.Dropout, "attention.output.dense": nn.Linear,
    "attention.output.LayerNorm": nn.LayerNorm, "attention.output.dropout": nn.Dropout,
    "intermediate.dense": nn.Linear, "output.dense": nn.Linear, "output.LayerNorm": nn.LayerNorm,
    "output.dropout": nn.Dropout,
}
_READ_IN_EMBEDDINGS = {
    "word_embeddings": nn.Embedding, "position_embeddings": nn.Embedding, "token_type_embeddings": nn.Embedding,
    "LayerNorm": nn.LayerNorm, "dropout": nn.Dropout,
}
_HOOK_KINDS = {"_forward_pre_hooks": "a forward pre-hook", "_forward_hooks": "a forward hook",
               "_backward_pre_hooks": "a backward pre-hook", "_backward_hooks": "a backward hook"}


def _is_capture_hook(hook) -> bool:
    """transformers' own output-capturing hooks (installed by ``capture_outputs`` the first time
    an output is requested): inactive outside transformers' forward, and the kernel path returns
    the hidden states itself."""
    return (getattr(hook, "__name__", "") == "output_capturing_hook"
            and getattr(hook, "__module__", "").startswith("transformers."))


def _skipped_by_kernels(module) -> Optional[str]:
    """What running ``module`` functionally would skip (a hook, a replaced forward), or None."""
    d = module.__dict__
    for kind, what in _HOOK_KINDS.items():
        hooks = d.get(kind)
        if hooks and not all(_is_capture_hook(h) for h in hooks.values()):
            return f"has {what}"
    if "forward" in d:
        return "has its forward replaced (e.g. by accelerate's hooks)"
    return None


def _not_plain(part, reads: dict) -> Optional[str]:
    """Why ``part`` (a layer or the embeddings) cannot run functionally: a hook on it or on a
    module inside, or a module the kernel path reads by name that is not the plain torch module
    it assumes (a LoRA wrapper, a quantized linear): '<name> <why>', or None."""
    for name, m in part.named_modules():
        why = _skipped_by_kernels(m)
        if why is not None:
            return f"{name or 'it'} {why}"
    for name, plain in reads.items():
        m = part
        for attr in name.split("."):
            m = m._modules.get(attr) if m is not None else None
        if m is None:
            if plain is nn.Dropout or name == "position_embeddings":
                continue  # absent: nothing read (no dropout module, a model without learned positions)
            return f"{name} is missing"
        if not isinstance(m, plain) or type(m).forward is not plain.forward:
            return f"{name} is a {type(m).__module__}.{type(m).__qualname__}, not a plain torch.nn.{plain.__name__}"
        if plain is not nn.Dropout and m._parameters.get("weight") is None:
            return f"{name} has no weight parameter"
    return None


def _global_hooks() -> Optional[str]:
    from torch.nn.modules import module as _m

    for kind in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks"):
        if getattr(_m, kind, None):
            return f"a global module hook is registered (torch.nn.modules.module.{kind})"
    return None


def _module_parts(bert):
    """(why the whole forward must be transformers' own, or None; why the embeddings run as a
    module, or None; per layer, why it runs as a module, or None)."""
    whole = _global_hooks()
    encoder = _skipped_by_kernels(bert.encoder)
    if whole is None and encoder is not None:
        whole = f"encoder {encoder} (the kernel path never calls the encoder module)"
    embeddings = _not_plain(bert.embeddings, _READ_IN_EMBEDDINGS)
    layers = [_not_plain(layer, _READ_IN_LAYER) for layer in bert.encoder.layer]
    first = next((f"encoder.layer.{i} {why}" for i, why in enumerate(layers) if why is not None), None)
    if whole is None and first is not None and not hasattr(bert, "_create_attention_masks"):
        whole = f"{first}, and this transformers has no _create_attention_masks to build its layers' mask"
    return whole, (f"embeddings {embeddings}" if embeddings else None), layers


# Scanning every module at every forward costs ~0.1 ms for bert-base; the plain result is kept
# until a hook is registered anywhere (torch's RemovableHandle counter: module, global and tensor
# hooks all take one) or a submodule is registered anywhere (torch's global module-registration
# hook, e.g. PEFT injecting LoRA layers).  A result that found hooks or wrappers is not kept, so
# removing them is seen at the next forward.  Not seen: a ``forward`` assigned on a module
# instance after that model's first forward (accelerate installs its hooks while loading).
_REGISTRATIONS = [0]


def _count_registration(module, name, submodule):
    _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    if not getattr(_watch_registrations, "installed", False):
        torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
        _watch_registrations.installed = True


def _module_parts_now(bert):
    """``_module_parts``, kept while nothing was registered since (see above)."""
    from torch.utils.hooks import RemovableHandle

    key = (RemovableHandle.next_id, _REGISTRATIONS[0], len(bert.encoder.layer))
    kept = bert.__dict__.get(_PARTS)
    if kept is not None and kept[0] == key:
        return kept[1]
    parts = _module_parts(bert)
    if parts[0] is None and parts[1] is None and not any(parts[2]):
        bert.__dict__[_PARTS] = (key, parts)
    else:
        bert.__dict__.pop(_PARTS, None)
    return parts


def _transformers_mask(bert, mask, hidden):
    """The attention mask transformers' own layers take for this forward (what its BertModel
    builds for its attention implementation), from the caller's 2-D mask and the (B, S, C)
    embedding output.  Feature-detected: ``_create_attention_masks``' keywords differ between
    transformers versions (``cache`` / ``position_ids`` or ``past_key_values``)."""
    create = bert._create_attention_masks
    given = {"attention_mask": mask, "encoder_attention_mask": None, "embedding_output": hidden,
             "encoder_hidden_states": None, "cache": None, "past_key_values": None, "cache_position": None,
             "position_ids": None}
    names = inspect.signature(create).parameters
    self_mask, _ = create(**{k: v for k, v in given.items() if k in names})
    return self_mask


class _ModuleLayers:
    """``layer_fn`` / ``embed_fn`` of a forward where some parts run through transformers' modules
    (``_module_parts``): those parts are called as modules on the padded batch, with transformers'
    own mask (their hooks, wrappers and gradient checkpointing as transformers runs them), the
    others on the kernels.  On the packed route a module's input is padded and its output packed
    again: every part is per token but attention, which masks the padded keys, so the real
    tokens' outputs are those of the padded computation."""

    def __init__(self, bert, mask, embeddings_why, layer_whys):
        self.bert, self.mask = bert, mask
        self.embeddings_why = embeddings_why
        self.by_layer = {id(layer): why for layer, why in zip(bert.encoder.layer, layer_whys)}
        self._hf_mask = None

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, fwd):
        if self.embeddings_why is None:
            return modeling.embed(self.bert.embeddings, input_ids, token_type_ids, position_ids, inputs_embeds, fwd)
        x = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        return fwd.packing.gather(x) if fwd.packing is not None else x  # (T, C) / (B, S, C)

    def layer(self, layer, x, fwd):
        if self.by_layer.get(id(layer)) is None:
            return modeling.run_layer(layer, x, fwd)
        h = fwd.packing.pad(x) if fwd.packing is not None else x  # (B, S, C)
        if self._hf_mask is None:
            self._hf_mask = (_transformers_mask(self.bert, self.mask, h),)
        out = layer(h, self._hf_mask[0])
        out = out[0] if isinstance(out, tuple) else out
        return fwd.packing.gather(out) if fwd.packing is not None else out


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
    kernels = _backend.resolve(opts.backend, input_ids.device) == "triton"
    if kernels:
        why = kernel_unsupported(bert)
        if why is not None:
            if opts.backend == "triton":
                raise ValueError(f"bertfast.optimize(backend='triton'): {why}")
            return None
    elif opts.backend == "auto" and input_ids.device.type != "cpu":
        return None  # no faster path there (a GPU without the kernels, MPS, ...): transformers' forward
    elif torch_path_unsupported(bert) is not None:
        return None
    whole, embeddings, module_layers = _module_parts_now(bert)
    if whole is not None:
        if opts.backend == "triton":
            raise ValueError(f"bertfast.optimize(backend='triton'): {whole}, which the kernels would skip; "
                             "backend='auto' runs transformers' own forward for such a model")
        return None
    modules = None
    if embeddings is not None or any(w is not None for w in module_layers):
        modules = _ModuleLayers(bert, mask, embeddings, module_layers)
    layers = bert.encoder.layer
    causal = modeling.causal_attention(layers, mask)
    attention_dropout = bool(bert.training and len(layers) and modeling.attention_dropout_p(layers[0].attention.self) > 0)
    return {
        "input_ids": input_ids, "attention_mask": mask, "token_type_ids": bound.get("token_type_ids"),
        "position_ids": bound.get("position_ids"), "unpad": opts.unpad, "modules": modules, "kernels": kernels,
        "causal": causal, "attention_dropout": attention_dropout,
        "output_hidden_states": bound.get("output_hidden_states", getattr(cfg, "output_hidden_states", False)),
        "return_dict": bound.get("return_dict", getattr(cfg, "return_dict", True)),
    }


def _selected_hidden_states(bert, ohs, hidden: tuple) -> tuple:
    """The hidden states a ``output_hidden_states`` value other than a plain flag returns, read
    the way the installed transformers' ``capture_outputs`` reads it (``hidden``: the embedding
    output, then every layer's output).  Feature-detected, not version-compared:

    * transformers >= 5.2x (``resolve_hidden_states_indices`` exists): an int or a list of ints
      selects among all ``L + 1`` hidden states (negative indices count from the end); the tuple
      keeps its length, None where not selected.
    * transformers 5.x before that (``capture_outputs`` without it): a list / tuple / set selects
      layer *outputs* by layer index (the embedding output is not returned, negative indices
      select nothing); the tuple has one entry per layer, None where not selected.  Any other
      truthy value (an int) is a flag: every hidden state.
    * no ``output_capturing`` module (transformers 4): a flag."""
    try:
        from transformers.utils import output_capturing as capturing
    except ImportError:  # transformers 4: output_hidden_states is a flag
        return hidden
    if hasattr(capturing, "resolve_hidden_states_indices"):
        selected = capturing.selected_hidden_states(ohs)
        if selected is None:
            return hidden
        keep = capturing.resolve_hidden_states_indices(bert, selected)
        return tuple(h if i in keep else None for i, h in enumerate(hidden))
    if isinstance(ohs, (list, tuple, set)):
        keep = set(ohs)
        return tuple(h if i in keep else None for i, h in enumerate(hidden[1:]))
    return hidden


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
    """The forward on the fast path (the kernels, or on CPU bertfast's PyTorch path), as planned
    by ``bertfast.modeling.plan_forward`` (input checks and the padded / packed decision in one
    host read); None where transformers' original forward must serve it (a decoder whose padded
    positions are read)."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    ids, mask, tts, pos = route["input_ids"], route["attention_mask"], route["token_type_ids"], route["position_ids"]
    dtype = bert.embeddings.LayerNorm.weight.dtype
    causal = route["causal"]
    # transformers' config has the field names plan_forward reads (config.unpad: optimize's option)
    kernels = route["kernels"]  # the Triton kernels, or bertfast's PyTorch path (CPU)
    plan = modeling.plan_forward(bert.config, ids, mask, tts, pos, None, dtype, triton=kernels, causal=causal,
                        attention_dropout=route["attention_dropout"],
                        reads_first_token=getattr(bert, "pooler", None) is not None,
                        shifted_labels=bool(getattr(bert.config, "is_decoder", False)),
                        unpad=route["unpad"], **_head_loss(bert, ids))
    if causal and plan.reads_padding:
        return None  # a padded query before the first real token sees no key: transformers decides
    ohs = route["output_hidden_states"]
    modules = route["modules"]  # parts that run through transformers' modules (hooks, wrappers)
    parts = {"layer_fn": modules.layer, "embed_fn": modules.embed} if modules is not None else {}
    last, hidden, _, _ = modeling.encoder_forward(bert, plan, ids, tts, pos, None, kernels=kernels,
                                                  output_hidden_states=bool(ohs), causal=causal, **parts)
    pooled = bert.pooler(last) if getattr(bert, "pooler", None) is not None else None
    out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=last, pooler_output=pooled)
    if ohs:
        out["hidden_states"] = _selected_hidden_states(bert, ohs, tuple(hidden))
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
