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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

# Activations the model knows (see modeling.get_activation).  gelu_new and gelu_pytorch_tanh
# are both the tanh approximation of GELU.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
POSITION_EMBEDDING_TYPES = ("absolute", "sinusoidal")

# Fields that choose how the model runs, not what it computes: not saved in config.json.
RUNTIME_FIELDS = ("backend", "unpad")

# Keys that describe the file rather than the model: to_dict sets them itself.
_WRITTEN_BY_TO_DICT = ("model_type", "architectures", "num_labels")

PRESETS: Dict[str, Dict[str, Any]] = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


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
    # run-time choices, not part of a checkpoint (never written to config.json):
    backend: str = "auto"  # "torch" (reference), "triton" (kernels), "auto" (triton on CUDA, torch elsewhere)
    unpad: bool = True  # run layers on packed real tokens when a padding mask is given (triton; torch on CPU)
    # config.json keys bertfast does not use, kept so that to_dict writes them back
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if self.label2id is not None:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_labels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"BertConfig: {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig: hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"BertConfig: position_embedding_type {self.position_embedding_type!r} is not supported; "
                f"use one of {', '.join(POSITION_EMBEDDING_TYPES)}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            v = getattr(self, name)
            if v is None and name == "classifier_dropout":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"BertConfig: {name} must be a probability in [0, 1], got {v!r}")
        from bertfast.backend import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"BertConfig: backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ValueError(f"BertConfig: layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(f"BertConfig: initializer_range must be >= 0, got {self.initializer_range!r}")
        if self.pad_token_id is not None and not (0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"BertConfig: pad_token_id {self.pad_token_id} is outside [0, vocab_size={self.vocab_size})")
        if self.id2label is not None and len(self.id2label) != self.num_labels:
            raise ValueError(
                f"BertConfig: id2label has {len(self.id2label)} labels but num_labels is {self.num_labels}"
            )

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
        d = {**d, **overrides}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _WRITTEN_BY_TO_DICT and k != "extra"}
        extra.update(d.get("extra") or {})
        if "architectures" in d:
            extra["architectures"] = d["architectures"]
        id2label = known.get("id2label")
        if "num_labels" in known and id2label is not None and len(id2label) != known["num_labels"]:
            if "id2label" in overrides:  # the caller asked for both: let validate() complain
                pass
            else:
                known.pop("id2label", None)
                known.pop("label2id", None)
        elif "num_labels" not in known and id2label is not None:
            known["num_labels"] = len(id2label)
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: Union[str, Path], **overrides) -> "BertConfig":
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
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
