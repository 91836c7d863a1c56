"""BertConfig: the hyper-parameters of a BERT encoder.

Field names and defaults are those of ``transformers.BertConfig``, so ``BertConfig(**kwargs)``
takes the same keywords and ``BertConfig.from_json("config.json")`` reads a Hugging Face
checkpoint's config.  Keys of a config.json that bertfast does not use (``_name_or_path``,
``use_cache``, ``transformers_version``, ...) are kept in ``config.extra``, out of the way: they
are not attributes, they do not affect the model, and ``to_dict`` writes them back unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

from bertfast.activations import NAMES as ACTIVATIONS  # the activation table (bertfast/activations.py)
POSITION_EMBEDDING_TYPES = ("absolute", "sinusoidal")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "num_labels")
_BOOL_FIELDS = ("is_decoder", "tie_word_embeddings")

# Fields that choose how the model runs, not what it computes: not saved in config.json.
RUNTIME_FIELDS = ("backend", "unpad")

# config.unpad: True (padding-free where exact, the default), "always" (padding-free whenever it
# can pack, masked semantics) or False (the padded batch); see bertfast/modeling.py
UNPAD_MODES = (False, True, "always")
_UNPAD_BY_MODE = {"off": False, "exact": True, "always": "always"}


def unpad_mode(value: Any) -> str:
    """A ``config.unpad`` value -> "off" (False), "exact" (True) or "always".  JSON ``0`` / ``1``
    mean False / True; anything else (None, "false", "yes", 1.0, ...) raises ValueError."""
    if value is True or (type(value) is int and value == 1):
        return "exact"
    if value is False or (type(value) is int and value == 0):
        return "off"
    if isinstance(value, str) and value == "always":
        return "always"
    raise ValueError(f"unpad must be True, False or 'always', got {_show(value)}")


# Keys that describe the file rather than the model: to_dict sets them itself.
_WRITTEN_BY_TO_DICT = ("model_type", "architectures", "num_labels")

PRESETS: Dict[str, Dict[str, Any]] = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def _show(v: Any) -> str:
    """A value for an error message: repr plus its type when the type is the problem."""
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return r if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{r} ({type(v).__name__})"


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _label_id(k: Any) -> Optional[int]:
    """A label id from an int or a decimal string ("0", as JSON object keys are); None if not one."""
    if isinstance(k, bool):
        return None
    if isinstance(k, int):
        return k
    if isinstance(k, str) and k.strip().lstrip("-").isdigit():
        return int(k)
    return None


def _no_duplicate_keys(pairs):
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"BertConfig: key {k!r} appears more than once in the JSON object")
        out[k] = v
    return out


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    position_embedding_type: str = "absolute"  # "absolute" (learned) or "sinusoidal" (fixed table)
    is_decoder: bool = False  # True -> causal self-attention in every layer
    num_labels: int = 2  # classification / QA heads
    classifier_dropout: Optional[float] = None  # None -> hidden_dropout_prob
    id2label: Optional[Dict[int, str]] = None
    label2id: Optional[Dict[str, int]] = None
    problem_type: Optional[str] = None  # sequence classification: None (inferred), "regression", ...
    # False: the MLM decoder has its own weight (and bias), loaded from and saved to the checkpoint;
    # True: it is the word-embedding matrix (transformers' name and default)
    tie_word_embeddings: bool = True
    # run-time choices, not part of a checkpoint (never written to config.json):
    backend: str = "auto"  # "torch" (reference), "triton" (kernels), "auto" (triton on CUDA, torch elsewhere)
    # padding-free execution (triton; torch on CPU) when a 2-D padding mask has padding: True (where
    # exact, the default), "always" (whenever it can pack, masked semantics) or False (never); see unpad_mode
    unpad: Union[bool, str] = True
    # config.json keys bertfast does not use, kept so that to_dict writes them back
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field (type, range, consistency); raise ValueError ``BertConfig: <field> ...``.

        Normalises in place what is unambiguous: JSON ``0`` / ``1`` for a bool field become
        False / True, ``id2label`` keys become ints ("0" -> 0) and ``classifier_dropout`` etc. stay
        as given.  Strings are never accepted for bools ("false" is truthy)."""
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"BertConfig: {name} must be a positive integer, got {_show(v)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool):
                continue
            # JSON 0 / 1 mean false / true without ambiguity (and transformers reads them so); anything
            # else (a string like "false", which is truthy, 2, 1.0, null) is refused
            if type(v) is int and v in (0, 1):
                setattr(self, name, bool(v))
                continue
            raise ValueError(f"BertConfig: {name} must be a bool (true / false), got {_show(v)}")
        for name, choices in (("hidden_act", ACTIVATIONS), ("position_embedding_type", POSITION_EMBEDDING_TYPES)):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in choices:
                raise ValueError(f"BertConfig: {name} {_show(v)} is not supported; use one of {', '.join(choices)}")
        if self.problem_type is not None and (not isinstance(self.problem_type, str)
                                              or self.problem_type not in PROBLEM_TYPES):
            raise ValueError(
                f"BertConfig: problem_type {_show(self.problem_type)} is not one of None, {', '.join(PROBLEM_TYPES)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            v = getattr(self, name)
            if v is None and name == "classifier_dropout":
                continue
            if not _is_real(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"BertConfig: {name} must be a probability in [0, 1], got {_show(v)}")
        try:
            self.unpad = _UNPAD_BY_MODE[unpad_mode(self.unpad)]  # JSON 0 / 1 -> False / True
        except ValueError as e:
            raise ValueError(f"BertConfig: {e}") from None
        from bertfast.backend import BACKENDS

        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"BertConfig: backend {_show(self.backend)} is not one of {', '.join(BACKENDS)}")
        if not _is_real(self.layer_norm_eps) or not math.isfinite(self.layer_norm_eps) or self.layer_norm_eps <= 0:
            raise ValueError(f"BertConfig: layer_norm_eps must be a finite number > 0, got {_show(self.layer_norm_eps)}")
        if (not _is_real(self.initializer_range) or not math.isfinite(self.initializer_range)
                or self.initializer_range < 0):
            raise ValueError(
                f"BertConfig: initializer_range must be a finite number >= 0, got {_show(self.initializer_range)}")
        if self.pad_token_id is not None:
            if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
                raise ValueError(f"BertConfig: pad_token_id must be an integer or None, got {_show(self.pad_token_id)}")
            if not 0 <= self.pad_token_id < self.vocab_size:
                raise ValueError(
                    f"BertConfig: pad_token_id {self.pad_token_id} is outside [0, vocab_size={self.vocab_size})")
        self._validate_labels()
        if not isinstance(self.extra, dict):
            raise ValueError(f"BertConfig: extra must be a dict, got {type(self.extra).__name__}")

    def _validate_labels(self) -> None:
        n = self.num_labels
        if self.id2label is not None:
            if not isinstance(self.id2label, dict):
                raise ValueError(f"BertConfig: id2label must be a mapping of label ids to names, got "
                                 f"{type(self.id2label).__name__}")
            id2label: Dict[int, str] = {}
            for k, v in self.id2label.items():
                i = _label_id(k)
                if i is None:
                    raise ValueError(f"BertConfig: id2label key {k!r} is not an integer label id")
                if i in id2label:
                    raise ValueError(f"BertConfig: id2label has label id {i} twice (key {k!r} repeats it)")
                if not isinstance(v, str):
                    raise ValueError(f"BertConfig: id2label[{k!r}] must be a string label name, got {_show(v)}")
                id2label[i] = v
            if len(id2label) != n:
                raise ValueError(f"BertConfig: id2label has {len(id2label)} labels but num_labels is {n}")
            if sorted(id2label) != list(range(n)):
                raise ValueError(f"BertConfig: id2label keys must be the label ids 0..{n - 1}, got {sorted(id2label)}")
            names = list(id2label.values())
            dup = sorted({x for x in names if names.count(x) > 1})
            if dup:
                raise ValueError(f"BertConfig: id2label gives the name {dup[0]!r} to more than one label id")
            self.id2label = dict(sorted(id2label.items()))
        if self.label2id is not None:
            if not isinstance(self.label2id, dict):
                raise ValueError(f"BertConfig: label2id must be a mapping of label names to ids, got "
                                 f"{type(self.label2id).__name__}")
            seen: Dict[int, str] = {}
            for k, v in self.label2id.items():
                if not isinstance(k, str):
                    raise ValueError(f"BertConfig: label2id key {k!r} must be a string label name")
                i = _label_id(v) if not isinstance(v, str) else None
                if i is None:
                    raise ValueError(f"BertConfig: label2id[{k!r}] must be an integer label id, got {_show(v)}")
                if not 0 <= i < n:
                    raise ValueError(f"BertConfig: label2id[{k!r}] = {i} is outside [0, num_labels={n})")
                if i in seen:
                    raise ValueError(f"BertConfig: label2id maps both {seen[i]!r} and {k!r} to label id {i}")
                seen[i] = k
            if len(self.label2id) != n:
                raise ValueError(f"BertConfig: label2id has {len(self.label2id)} labels but num_labels is {n}")
            if self.id2label is not None:
                for i, name in self.id2label.items():
                    if self.label2id.get(name) != i:
                        raise ValueError(
                            f"BertConfig: label2id does not match id2label: id2label[{i}] is {name!r} but "
                            f"label2id[{name!r}] is {self.label2id.get(name)!r}")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ constructors
    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        """``"bert-base"``, ``"bert-large"`` or ``"minilm-l6"``; keywords override fields."""
        if name not in PRESETS:
            raise ValueError(f"BertConfig.preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: Dict[str, Any], **overrides) -> "BertConfig":
        """Build from a Hugging Face style dict; unknown keys go to ``extra``.  Keyword overrides
        win; overriding ``num_labels`` drops a stale ``id2label``/``label2id`` of another size."""
        if not isinstance(d, dict):
            raise ValueError(f"BertConfig.from_dict: expected a dict, got {type(d).__name__}")
        d = {**d, **overrides}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _WRITTEN_BY_TO_DICT and k != "extra"}
        extra.update(d.get("extra") or {})
        if "architectures" in d:
            extra["architectures"] = d["architectures"]
        id2label = known.get("id2label")
        if isinstance(id2label, dict):
            if "num_labels" in overrides and "id2label" not in overrides:
                if len(id2label) != overrides["num_labels"]:  # the checkpoint's label maps are of another size
                    known.pop("id2label", None)
                    known.pop("label2id", None)
            elif "num_labels" not in known:
                known["num_labels"] = len(id2label)
            # num_labels and id2label both from the file (or both overridden) and disagreeing: validate() says so
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: Union[str, Path], **overrides) -> "BertConfig":
        """Read a config.json; every field is validated (ValueError ``BertConfig: <field> ...``).
        A key written twice in the file is refused (JSON readers silently keep the last)."""
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f, object_pairs_hook=_no_duplicate_keys)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, **overrides)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self, architectures: Optional[list] = None) -> Dict[str, Any]:
        """A Hugging Face config.json dict (``model_type: "bert"``, ``architectures``) that
        ``transformers.BertConfig`` reads back."""
        d: Dict[str, Any] = {k: v for k, v in self.extra.items() if k != "architectures"}
        if architectures is None:
            architectures = self.extra.get("architectures") or ["BertModel"]
        d["architectures"] = list(architectures)
        d["model_type"] = "bert"
        for f in dataclasses.fields(self):
            if f.name in ("extra", "num_labels", "id2label", "label2id") or f.name in RUNTIME_FIELDS:
                continue
            d[f.name] = getattr(self, f.name)
        # transformers derives num_labels from id2label: always write the label maps
        id2label = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        label2id = self.label2id or {v: k for k, v in id2label.items()}
        d["id2label"] = {str(k): v for k, v in id2label.items()}
        d["label2id"] = dict(label2id)
        return dict(sorted(d.items()))

    def to_json(self, path: Union[str, Path], architectures: Optional[list] = None, **extra_keys) -> None:
        d = self.to_dict(architectures)
        d.update(extra_keys)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes) -> "BertConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
