"""bertfast's tokenizer: a ``tokenizers.Tokenizer`` (WordPiece, the Rust library transformers'
fast tokenizers wrap) loaded from a checkpoint directory and called like transformers' fast
tokenizers, with the same argument and key names and the same results.

    >>> from bertfast import Tokenizer
    >>> tok = Tokenizer.from_pretrained("minilm")
    >>> enc = tok(["A question?", "Another one"], ["its context", "a second text"])   # pairs
    >>> enc["input_ids"].shape, enc["token_type_ids"][0].tolist()
    >>> enc.word_ids(0), enc.sequence_ids(0), enc.tokens(0)
    >>> tok("a long context ...", max_length=384, stride=128, return_overflowing_tokens=True,
    ...     return_offsets_mapping=True)       # QA windows; overflow_to_sample_mapping maps them back

Differences from transformers, on purpose: ``truncation=True`` and ``padding=True`` are the
defaults and ``return_tensors="pt"`` is the default (a model can take the result as it is).
Every other argument behaves as in ``transformers.BertTokenizerFast`` (the tests compare them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Union

import torch

__all__ = ["Tokenizer", "BatchEncoding", "TRUNCATION_STRATEGIES", "PADDING_STRATEGIES"]

TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
PADDING_STRATEGIES = ("longest", "max_length")
# transformers writes int(1e30) as model_max_length when a tokenizer has no limit
_NO_LIMIT = 1_000_000
_DEFAULT_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
                     "unk_token": "[UNK]"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_str(v: Any) -> Optional[str]:
    """A special token as tokenizer_config / special_tokens_map write it: a str or {"content": str}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class BatchEncoding(dict):
    """The result of :meth:`Tokenizer.__call__`: a dict (input_ids, token_type_ids,
    attention_mask, and offset_mapping / overflow_to_sample_mapping when asked) whose keys are also
    attributes, plus per-row views of the underlying ``tokenizers.Encoding`` objects:
    :meth:`word_ids`, :meth:`sequence_ids`, :meth:`tokens` (rows are windows when overflowing
    tokens were returned)."""

    def __init__(self, data: dict, encodings: Sequence[Any]):
        super().__init__(data)
        self.encodings = list(encodings)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key or attribute {name!r}") from None

    def _encoding(self, i: int):
        if not -len(self.encodings) <= i < len(self.encodings):
            raise IndexError(f"row {i} out of range: this batch has {len(self.encodings)} row(s)")
        return self.encodings[i]

    def word_ids(self, i: int = 0) -> List[Optional[int]]:
        """Index of the word each token of row ``i`` comes from; None for special and padding tokens."""
        return list(self._encoding(i).word_ids)

    def sequence_ids(self, i: int = 0) -> List[Optional[int]]:
        """0 for tokens of the first text, 1 for the second (pairs), None for special and padding tokens."""
        return list(self._encoding(i).sequence_ids)

    def tokens(self, i: int = 0) -> List[str]:
        return list(self._encoding(i).tokens)

    def to(self, device) -> "BatchEncoding":
        """Move every tensor to ``device`` (in place; returns self)."""
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                self[k] = v.to(device)
        return self


class Tokenizer:
    """bertfast's tokenizer: a ``tokenizers.Tokenizer`` from a checkpoint directory
    (``tokenizer.json``, or ``vocab.txt`` when there is none, honouring ``tokenizer_config.json``:
    ``do_lower_case``, ``strip_accents``, ``tokenize_chinese_chars``, ``model_max_length``, special
    tokens), called like transformers' fast tokenizers (same argument and key names).

    Attributes: ``cls_token_id``, ``sep_token_id``, ``pad_token_id``, ``mask_token_id``,
    ``unk_token_id`` (and the ``*_token`` strings), ``vocab_size``, ``model_max_length`` (the
    default truncation / padding length), ``all_special_ids``, ``all_special_tokens``,
    ``backend_tokenizer`` (the ``tokenizers.Tokenizer``), ``name_or_path``.
    """

    padding_side = "right"
    truncation_side = "right"
    pad_token_type_id = 0
    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def __init__(self, backend, *, model_max_length: int = 512, special_tokens: Optional[dict] = None,
                 do_lower_case: bool = True, name_or_path: str = "") -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        if not isinstance(backend, _RustTokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2 ([CLS] and [SEP]), got {model_max_length!r}")
        self._tokenizer = backend
        # settings are applied per call (like transformers); start from none
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.model_max_length = int(model_max_length)
        self.do_lower_case = bool(do_lower_case)
        self.name_or_path = str(name_or_path)
        specials = {**_DEFAULT_SPECIALS, **{k: v for k, v in (special_tokens or {}).items() if v is not None}}
        for attr, token in specials.items():
            tid = self._tokenizer.token_to_id(token)
            if tid is None:
                raise ValueError(f"special token {attr}={token!r} is not in the vocabulary of {name_or_path or 'the tokenizer'}")
            setattr(self, attr, token)
            setattr(self, f"{attr}_id", int(tid))
        self.all_special_tokens = [specials[k] for k in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")]
        self.all_special_ids = [getattr(self, f"{k}_id") for k in ("unk_token", "sep_token", "pad_token", "cls_token",
                                                                   "mask_token")]

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path_or_name: Union[str, os.PathLike] = "minilm",
                        max_length: Optional[int] = None) -> "Tokenizer":
        """Load the tokenizer of a checkpoint directory or a known name (``"minilm"``).

        ``max_length`` overrides ``model_max_length`` (the default length of ``truncation=True``
        and ``padding="max_length"``).  Without it: ``tokenizer_config.json``'s
        ``model_max_length``, capped at ``max_position_embeddings`` of ``config.json`` when the
        directory has one (so a default-truncated batch always fits the model)."""
        from bertfast.loading import resolve_model_path

        if not isinstance(path_or_name, (str, os.PathLike)):
            raise TypeError(f"path_or_name must be a name or a directory path, got {type(path_or_name).__name__}")
        path = Path(resolve_model_path(path_or_name))
        tok_config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        lower = tok_config.get("do_lower_case", True)
        lower = lower if isinstance(lower, bool) else True
        backend = cls._load_backend(path, tok_config, lower)
        specials = {}
        for attr in _DEFAULT_SPECIALS:
            specials[attr] = _token_str(special_map.get(attr)) or _token_str(tok_config.get(attr))
        max_positions = _read_json(path / "config.json").get("max_position_embeddings")
        mml = tok_config.get("model_max_length")
        limit = mml if isinstance(mml, int) and not isinstance(mml, bool) and 2 <= mml < _NO_LIMIT else None
        if isinstance(max_positions, int) and max_positions >= 2:
            limit = max_positions if limit is None else min(limit, max_positions)
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
                raise ValueError(f"max_length must be an int >= 2 ([CLS] and [SEP]), got {max_length!r}")
            if isinstance(max_positions, int) and max_length > max_positions:
                raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={max_positions} "
                                 f"({path / 'config.json'})")
            limit = max_length
        return cls(backend, model_max_length=limit or 512, special_tokens=specials, do_lower_case=lower,
                   name_or_path=str(path))

    @staticmethod
    def _load_backend(path: Path, tok_config: dict, lower: bool):
        from tokenizers import Tokenizer as _RustTokenizer

        tj = path / "tokenizer.json"
        if tj.is_file():
            try:
                return _RustTokenizer.from_file(str(tj))
            except Exception as e:  # tokenizers raises its own exception type
                raise ValueError(f"cannot load tokenizer {tj}: {e}") from None
        vocab = path / "vocab.txt"
        if vocab.is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            strip = tok_config.get("strip_accents")
            chinese = tok_config.get("tokenize_chinese_chars", True)
            try:
                return BertWordPieceTokenizer(str(vocab), lowercase=lower,
                                              strip_accents=strip if isinstance(strip, bool) else None,
                                              handle_chinese_chars=chinese if isinstance(chinese, bool) else True,
                                              clean_text=True)._tokenizer
            except Exception as e:
                raise ValueError(f"cannot load tokenizer vocabulary {vocab}: {e}") from None
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> Path:
        """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json
        (transformers' ``AutoTokenizer.from_pretrained`` and :meth:`from_pretrained` read them)."""
        from tokenizers import Tokenizer as _RustTokenizer

        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        clean = _RustTokenizer.from_str(self._tokenizer.to_str())
        clean.no_truncation()
        clean.no_padding()
        clean.save(str(d / "tokenizer.json"))
        vocab = sorted(self._tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
        with open(d / "vocab.txt", "w", encoding="utf-8") as f:
            f.writelines(tok + "\n" for tok, _ in vocab)
        specials = {k: getattr(self, k) for k in _DEFAULT_SPECIALS}
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.do_lower_case,
               "model_max_length": self.model_max_length, **specials}
        with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        with open(d / "special_tokens_map.json", "w", encoding="utf-8") as f:
            json.dump(specials, f, indent=2)
        return d

    # ------------------------------------------------------------------ vocabulary
    @property
    def backend_tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=False))

    def __len__(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def get_vocab(self) -> dict:
        return dict(self._tokenizer.get_vocab(with_added_tokens=True))

    def convert_ids_to_tokens(self, ids) -> Union[str, List[str]]:
        """Token strings of ids (an int gives a str); an id outside the vocabulary is a ValueError."""
        single = isinstance(ids, int) and not isinstance(ids, bool)
        out = []
        for i in ([ids] if single else self._id_list(ids)):
            t = self._tokenizer.id_to_token(i)
            if t is None:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {len(self)}")
            out.append(t)
        return out[0] if single else out

    def convert_tokens_to_ids(self, tokens) -> Union[int, List[int]]:
        """Ids of token strings (a str gives an int); unknown tokens map to ``unk_token_id``."""
        single = isinstance(tokens, str)
        out = []
        for t in ([tokens] if single else list(tokens)):
            if not isinstance(t, str):
                raise TypeError(f"tokens must be str, got {type(t).__name__}")
            tid = self._tokenizer.token_to_id(t)
            out.append(self.unk_token_id if tid is None else int(tid))
        return out[0] if single else out

    def _id_list(self, ids) -> List[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"expected a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            if isinstance(i, torch.Tensor):
                i = i.item()
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"token ids must be ints, got {type(i).__name__}")
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is out of range for a vocabulary of {len(self)}")
            out.append(i)
        return out

    def tokenize(self, text: str) -> List[str]:
        """WordPiece tokens of ``text``, without special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._tokenizer.encode(text, add_special_tokens=False).tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (a list, or a 1-D tensor); ``##`` pieces are joined."""
        return self._tokenizer.decode(self._id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> List[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _texts(x, name: str, split: bool) -> tuple[list, bool]:
        """(list of inputs, whether a single input was given)."""
        def one(v) -> bool:
            if split:
                return isinstance(v, (list, tuple)) and all(isinstance(w, str) for w in v)
            return isinstance(v, str)

        if one(x):
            return [list(x) if split else x], True
        if isinstance(x, (str, bytes, bytearray)) or not isinstance(x, Iterable):
            want = "a list of words (or a list of such lists)" if split else "a str or a list of str"
            raise TypeError(f"{name} must be {want}, got {type(x).__name__}")
        items = list(x)
        if not items:
            raise ValueError(f"{name} is an empty list")
        for i, v in enumerate(items):
            if not one(v):
                want = "a list of str words" if split else "a str"
                raise TypeError(f"{name}[{i}] is a {type(v).__name__}, not {want}")
        return [list(v) for v in items] if split else items, False

    def _strategies(self, truncation, padding, max_length, stride, pad_to_multiple_of, pair: bool):
        if truncation is True:
            truncation = "longest_first"
        elif truncation in (False, None, "do_not_truncate"):
            truncation = None
        elif truncation not in TRUNCATION_STRATEGIES:
            raise ValueError(f"truncation must be True, False or one of {', '.join(TRUNCATION_STRATEGIES)}; "
                             f"got {truncation!r}")
        if padding is True:
            padding = "longest"
        elif padding in (False, None, "do_not_pad"):
            padding = None
        elif padding not in PADDING_STRATEGIES:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length'; got {padding!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ValueError(f"stride must be an int >= 0, got {stride!r}")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                               or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        if truncation == "only_second" and not pair:
            raise ValueError("truncation='only_second' needs text pairs (text_pair is None)")
        length = self.model_max_length if max_length is None else max_length
        if truncation is not None:
            specials = 3 if pair else 2
            if length <= specials:
                raise ValueError(f"max_length={length} leaves no room for text next to the {specials} special tokens")
            if stride and stride >= length - specials:
                raise ValueError(f"stride={stride} must be smaller than max_length - {specials} special tokens "
                                 f"= {length - specials}")
        return truncation, padding, length

    def _configure(self, truncation, padding, length, stride, pad_to_multiple_of) -> None:
        """Set the backend's truncation and padding for this call (only when they change)."""
        tok = self._tokenizer
        if truncation is None:
            if tok.truncation is not None:
                tok.no_truncation()
        else:
            target = {"max_length": length, "stride": stride, "strategy": truncation,
                      "direction": self.truncation_side}
            current = None if tok.truncation is None else {k: tok.truncation.get(k) for k in target}
            if current != target:
                tok.enable_truncation(**target)
        if padding is None:
            if tok.padding is not None:
                tok.no_padding()
        else:
            target = {"length": length if padding == "max_length" else None, "direction": self.padding_side,
                      "pad_id": self.pad_token_id, "pad_token": self.pad_token, "pad_type_id": self.pad_token_type_id,
                      "pad_to_multiple_of": pad_to_multiple_of}
            if tok.padding != target:
                tok.enable_padding(**target)

    def _check_stride_room(self, texts, pairs, truncation, length, stride, split, add_special) -> None:
        """With only one text of a pair truncated, the room left for it (``length`` minus the
        other text and the special tokens) must exceed ``stride``; the Rust library otherwise
        panics (a ``BaseException`` with a Rust backtrace, not an error).  Say so in one line."""
        tok = self._tokenizer
        tok.no_truncation()
        tok.no_padding()
        first = tok.encode_batch(texts, is_pretokenized=split, add_special_tokens=False)
        second = tok.encode_batch(pairs, is_pretokenized=split, add_special_tokens=False)
        specials = 3 if add_special else 0
        kept, name = (first, "text") if truncation == "only_second" else (second, "text_pair")
        for i, (a, b) in enumerate(zip(first, second)):
            if len(a) + len(b) + specials <= length:
                continue  # not truncated
            room = length - specials - len(kept[i])
            if 0 < room <= stride:
                raise ValueError(f"{name}[{i}] is {len(kept[i])} tokens: with max_length={length} it leaves "
                                 f"{room} token(s) per window for the other text, not more than stride={stride}; "
                                 f"use a shorter {name}, a larger max_length or a smaller stride")

    def __call__(self, text, text_pair=None, *, max_length: Optional[int] = None,
                 truncation: Union[bool, str] = True, padding: Union[bool, str] = True, stride: int = 0,
                 return_overflowing_tokens: bool = False, return_offsets_mapping: bool = False,
                 return_special_tokens_mask: bool = False, is_split_into_words: bool = False,
                 pad_to_multiple_of: Optional[int] = None, add_special_tokens: bool = True,
                 return_tensors: Optional[str] = "pt") -> BatchEncoding:
        """Tokenize a text or a batch (``text`` a str or a list of str; ``text_pair`` likewise for
        pairs, whose second text gets token type 1).  With ``is_split_into_words=True`` each text is
        a list of words (``word_ids`` then index those words).

        truncation: True (= "longest_first"), "only_first", "only_second" or False, to
            ``max_length`` (default ``model_max_length``).
        padding: True (= "longest": to the longest row), "max_length" or False.
        stride, return_overflowing_tokens: the truncated tokens come back as further rows
            (windows), each overlapping the previous one by ``stride`` tokens; the key
            ``overflow_to_sample_mapping`` gives the input index of each row.
        return_tensors: "pt" (int64 tensors (B, S); offsets (B, S, 2)) or None (lists; a single
            text without overflow gives un-batched lists, as in transformers).
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        texts, single = self._texts(text, "text", is_split_into_words)
        pairs = None
        if text_pair is not None:
            pairs, single_pair = self._texts(text_pair, "text_pair", is_split_into_words)
            if single_pair != single or len(pairs) != len(texts):
                raise ValueError(f"text has {len(texts)} item(s) but text_pair has {len(pairs)}; give one pair text "
                                 f"per text")
        truncation, padding, length = self._strategies(truncation, padding, max_length, stride, pad_to_multiple_of,
                                                       pairs is not None)
        if pairs is not None and stride and truncation in ("only_first", "only_second"):
            self._check_stride_room(texts, pairs, truncation, length, stride, is_split_into_words,
                                    add_special_tokens)
        self._configure(truncation, padding, length, stride, pad_to_multiple_of)
        inputs = texts if pairs is None else list(zip(texts, pairs))
        try:
            encodings = self._tokenizer.encode_batch(inputs, is_pretokenized=is_split_into_words,
                                                     add_special_tokens=add_special_tokens)
        except Exception as e:  # the Rust library's errors (e.g. a pair text too short to truncate)
            raise ValueError(f"cannot tokenize: {e}") from None

        rows, sample = [], []
        for i, enc in enumerate(encodings):
            group = [enc] + (list(enc.overflowing) if return_overflowing_tokens else [])
            rows.extend(group)
            sample.extend([i] * len(group))
        data = {"input_ids": [e.ids for e in rows], "token_type_ids": [e.type_ids for e in rows],
                "attention_mask": [e.attention_mask for e in rows]}
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [e.offsets for e in rows]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = sample
        if return_tensors == "pt":
            lengths = {len(r) for r in data["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(f"rows have different lengths ({min(lengths)} to {max(lengths)} tokens) and cannot "
                                 f"form one tensor: use padding=True, or return_tensors=None")
            data = {k: torch.tensor(v, dtype=torch.long) for k, v in data.items()}
            if "offset_mapping" in data and data["offset_mapping"].dim() == 2:  # zero-length rows
                data["offset_mapping"] = data["offset_mapping"].reshape(len(rows), -1, 2)
        elif single and not return_overflowing_tokens:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, rows)

    def __repr__(self) -> str:
        return (f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, do_lower_case={self.do_lower_case})")
