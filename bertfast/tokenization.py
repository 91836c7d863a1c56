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
defaults and ``return_tensors="pt"`` is the default (a model can take the result as it is); a
``max_length`` with no room for text next to the special tokens, and ``truncation="only_second"``
without text pairs, are refused (transformers skips truncation or fails only on long inputs).
Every other argument behaves as in ``transformers.BertTokenizerFast`` (the tests compare them,
call after call).  Where the Rust library would abort (a ``stride`` not smaller than the tokens a
window keeps of a text), the call is refused first with a ValueError.

No call leaves state behind: the Rust backend's truncation and padding are set for the duration
of one call (under a lock) and put back as they were, so ``backend_tokenizer`` (used directly
by e.g. ``BertForQuestionAnswering.answer``) and later calls never see an earlier call's settings.
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Tokenizer", "BatchEncoding", "TRUNCATION_STRATEGIES", "PADDING_STRATEGIES"]

TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
PADDING_STRATEGIES = ("longest", "max_length")
SIDES = ("right", "left")
# transformers writes int(1e30) as model_max_length when a tokenizer has no limit
_NO_LIMIT = 1_000_000
_DEFAULT_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
                     "unk_token": "[UNK]"}
# tokenizer_config.json key -> (BertNormalizer argument, transformers' default).  transformers'
# BertTokenizerFast builds its normalizer from these keys, whatever tokenizer.json's normalizer says.
_NORMALIZER_KEYS = {"do_lower_case": ("lowercase", True), "strip_accents": ("strip_accents", None),
                    "tokenize_chinese_chars": ("handle_chinese_chars", True)}


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


def _normalizer_flags(tok_config: dict, where: Path) -> dict:
    """The BertNormalizer arguments transformers' BertTokenizerFast takes from
    tokenizer_config.json: ``do_lower_case``, ``strip_accents``, ``tokenize_chinese_chars``, with
    transformers' defaults (True, None: strip when lowercasing, True) where a key is missing."""
    flags = {}
    for key, (arg, default) in _NORMALIZER_KEYS.items():
        value = tok_config.get(key, default)
        if not isinstance(value, bool) and not (value is None and key == "strip_accents"):
            want = "true, false or null" if key == "strip_accents" else "true or false"
            raise ValueError(f"{where}: {key} must be {want}, got {value!r}")
        flags[arg] = value
    return flags


def _config_clean_up(tok_config: dict, where: Path) -> bool:
    """tokenizer_config.json's ``clean_up_tokenization_spaces``: transformers (5.x) cleans up
    decoded text when it is true, not when it is false, null or missing."""
    value = tok_config.get("clean_up_tokenization_spaces")
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{where}: clean_up_tokenization_spaces must be true or false, got {value!r}")
    return bool(value)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before ``.`` ``?`` ``!`` ``,`` and
    English contractions (``" 's"`` -> ``"'s"``, ``" n't"`` -> ``"n't"``, ``" ' "`` -> ``"'"``),
    the same replacements in the same order."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _config_side(tok_config: dict, key: str, where: Path) -> str:
    side = tok_config.get(key, "right")
    if side not in SIDES:
        raise ValueError(f"{where}: {key} must be 'right' or 'left', got {side!r}")
    return side


def _kept_lengths(n1: int, n2: Optional[int], budget: int, strategy: str) -> Optional[Tuple[int, Optional[int]]]:
    """The lengths the tokenizers library truncates a text of ``n1`` tokens and its pair of ``n2``
    (None: no pair) to, with ``budget`` tokens for both (max_length less the special tokens), as
    its ``truncate_encodings`` computes them; None where it raises an error instead (the text to
    truncate is too short, or only_second without a pair)."""
    total = n1 + (n2 or 0)
    if total <= budget:
        return n1, n2
    if strategy == "longest_first":
        if n2 is None:
            return budget, None
        short, long_ = min(n1, n2), max(n1, n2)
        long_ = short if short > budget else max(short, budget - short)
        if short + long_ > budget:
            short, long_ = budget // 2, budget // 2 + budget % 2
        return (short, long_) if n1 <= n2 else (long_, short)
    target = n1 if strategy == "only_first" else n2
    if target is None or target <= total - budget:
        return None
    kept = target - (total - budget)
    return (kept, n2) if strategy == "only_first" else (n1, kept)


@dataclass(frozen=True)
class _Settings:
    """One call's truncation and padding, resolved as transformers resolves its arguments."""
    truncation: Optional[str]          # a TRUNCATION_STRATEGIES name; None: off
    padding: Optional[str]             # a PADDING_STRATEGIES name; None: off
    length: int                        # the truncation length, and the padding length of "max_length"
    stride: int
    pad_to_multiple_of: Optional[int]
    unbounded: bool                    # no max_length in effect: rows past model_max_length are warned about

    def backend_truncation(self, side: str) -> Optional[dict]:
        if self.truncation is None:
            return None
        return {"max_length": self.length, "stride": self.stride, "strategy": self.truncation, "direction": side}

    def backend_padding(self, tok: "Tokenizer") -> Optional[dict]:
        if self.padding is None:
            return None
        return {"length": self.length if self.padding == "max_length" else None, "direction": tok.padding_side,
                "pad_id": tok.pad_token_id, "pad_token": tok.pad_token, "pad_type_id": tok.pad_token_type_id,
                "pad_to_multiple_of": self.pad_to_multiple_of}


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
    (``tokenizer.json``, or ``vocab.txt`` when there is none), read as transformers'
    ``BertTokenizerFast`` reads it: ``tokenizer_config.json``'s ``do_lower_case``,
    ``strip_accents`` and ``tokenize_chinese_chars`` decide the normalizer (transformers'
    defaults where it says nothing), plus ``model_max_length``, ``padding_side``,
    ``truncation_side`` and the special tokens; called like transformers' fast tokenizers (same
    argument and key names).

    Attributes: ``cls_token_id``, ``sep_token_id``, ``pad_token_id``, ``mask_token_id``,
    ``unk_token_id`` (and the ``*_token`` strings), ``vocab_size``, ``model_max_length`` (the
    default truncation / padding length), ``all_special_ids``, ``all_special_tokens``,
    ``do_lower_case`` / ``strip_accents`` / ``tokenize_chinese_chars`` (the normalizer's),
    ``clean_up_tokenization_spaces`` (decode's default, from tokenizer_config.json: False when it
    says nothing, as in transformers 5), ``backend_tokenizer`` (the ``tokenizers.Tokenizer``,
    never left truncating or padding), ``name_or_path``.
    """

    padding_side = "right"
    truncation_side = "right"
    pad_token_type_id = 0
    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def __init__(self, backend, *, model_max_length: int = 512, special_tokens: Optional[dict] = None,
                 name_or_path: str = "", clean_up_tokenization_spaces: bool = False) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        if not isinstance(backend, _RustTokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2 ([CLS] and [SEP]), got {model_max_length!r}")
        self._tokenizer = backend
        self._lock = threading.Lock()
        self._warned_too_long = False
        # truncation and padding are per call (like transformers): none saved in tokenizer.json stays on
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.model_max_length = int(model_max_length)
        self.name_or_path = str(name_or_path)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
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

    def __getstate__(self) -> dict:  # pickling (DataLoader workers, Ray): the lock is per process
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("clean_up_tokenization_spaces", False)  # pickled by a bertfast without it
        self.__dict__.update(state)
        self._lock = threading.Lock()

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
        config_file = path / "tokenizer_config.json"
        tok_config = _read_json(config_file)
        special_map = _read_json(path / "special_tokens_map.json")
        backend = cls._load_backend(path, _normalizer_flags(tok_config, config_file))
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
        tok = cls(backend, model_max_length=limit or 512, special_tokens=specials, name_or_path=str(path),
                  clean_up_tokenization_spaces=_config_clean_up(tok_config, config_file))
        tok.padding_side = _config_side(tok_config, "padding_side", config_file)
        tok.truncation_side = _config_side(tok_config, "truncation_side", config_file)
        return tok

    @staticmethod
    def _load_backend(path: Path, normalizer_flags: dict):
        """tokenizer.json (its normalizer replaced by one with ``normalizer_flags``, as
        transformers does), else vocab.txt with those flags."""
        from tokenizers import Tokenizer as _RustTokenizer, normalizers

        tj = path / "tokenizer.json"
        if tj.is_file():
            try:
                backend = _RustTokenizer.from_file(str(tj))
            except Exception as e:  # tokenizers raises its own exception type
                raise ValueError(f"cannot load tokenizer {tj}: {e}") from None
            backend.normalizer = normalizers.BertNormalizer(clean_text=True, **normalizer_flags)
            return backend
        vocab = path / "vocab.txt"
        if vocab.is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            try:
                return BertWordPieceTokenizer(str(vocab), clean_text=True, **normalizer_flags)._tokenizer
            except Exception as e:
                raise ValueError(f"cannot load tokenizer vocabulary {vocab}: {e}") from None
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> Path:
        """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json.
        transformers' ``AutoTokenizer.from_pretrained`` and :meth:`from_pretrained` read them back
        to the same ids: the config carries the normalizer's flags (transformers rebuilds the
        normalizer from them), the length, the sides, the special tokens and decode's
        ``clean_up_tokenization_spaces``."""
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
               "strip_accents": self.strip_accents, "tokenize_chinese_chars": self.tokenize_chinese_chars,
               "model_max_length": self.model_max_length, "padding_side": self.padding_side,
               "truncation_side": self.truncation_side,
               "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces, **specials}
        with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        with open(d / "special_tokens_map.json", "w", encoding="utf-8") as f:
            json.dump(specials, f, indent=2)
        return d

    # ------------------------------------------------------------------ normalizer flags
    def _bert_normalizer(self):
        from tokenizers import normalizers

        n = self._tokenizer.normalizer
        return n if isinstance(n, normalizers.BertNormalizer) else None

    @property
    def do_lower_case(self) -> bool:
        n = self._tokenizer.normalizer
        return n is not None and n.normalize_str("A") == "a"

    @property
    def strip_accents(self) -> Optional[bool]:
        """True / False, or None: stripped when lowercasing (BERT's rule)."""
        n = self._bert_normalizer()
        return None if n is None else n.strip_accents

    @property
    def tokenize_chinese_chars(self) -> bool:
        n = self._bert_normalizer()
        return n is not None and bool(n.handle_chinese_chars)

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
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        out = []
        for i in ids:
            if isinstance(i, torch.Tensor) or (hasattr(i, "dtype") and hasattr(i, "item")):  # a numpy int too
                i = i.item()
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"token ids must be ints, got {type(i).__name__}")
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is out of range for a vocabulary of {len(self)}")
            out.append(i)
        return out

    def tokenize(self, text: str, pair: Optional[str] = None, add_special_tokens: bool = False) -> List[str]:
        """WordPiece tokens of ``text`` (then ``pair``), without special tokens unless
        ``add_special_tokens``; never truncated or padded (as transformers')."""
        if not isinstance(text, str) or not (pair is None or isinstance(pair, str)):
            raise TypeError(f"tokenize takes a str and an optional str pair, got {type(text).__name__} and "
                            f"{type(pair).__name__}")
        items, _ = self._inputs(text, pair, split=False)
        (enc,) = self._encode(items, None, split=False, add_special_tokens=add_special_tokens)
        return list(enc.tokens)

    @staticmethod
    def _rows(ids) -> Optional[list]:
        """The sequences of a batch of id sequences (a list of lists / 1-D tensors, a 2-D tensor or
        array), None when ``ids`` is one sequence: how transformers' decode tells them apart."""
        if hasattr(ids, "ndim") and hasattr(ids, "tolist"):  # a tensor / numpy array
            return list(ids) if ids.ndim > 1 else None
        if isinstance(ids, (list, tuple)) and ids and (isinstance(ids[0], (list, tuple))
                                                       or getattr(ids[0], "ndim", 0) >= 1):
            return list(ids)
        return None

    def decode(self, ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> Union[str, List[str]]:
        """Text of a sequence of ids (a list, a 1-D tensor or array, or one int); ``##`` pieces
        are joined.  Special tokens are kept unless ``skip_special_tokens`` (transformers' default
        too).  ``clean_up_tokenization_spaces`` (default: the tokenizer's, from
        tokenizer_config.json) removes the spaces before punctuation and contractions as
        transformers does (:func:`clean_up_tokenization`).  A batch of sequences (a list of
        lists, a 2-D tensor) gives a list of texts, as in transformers."""
        rows = self._rows(ids)
        if rows is not None:
            return [self.decode(r, skip_special_tokens, clean_up_tokenization_spaces) for r in rows]
        text = self._tokenizer.decode(self._id_list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> List[str]:
        """:meth:`decode` of each sequence; one sequence (a flat list of ids) gives a list of its
        one text, an empty batch an empty list (as in transformers)."""
        if not hasattr(sequences, "ndim"):
            sequences = list(sequences)
        if len(sequences) == 0:
            return []
        rows = self._rows(sequences)
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces)
                for s in ([sequences] if rows is None else rows)]

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _is_one(v, split: bool) -> bool:
        """One text: a str, or (``is_split_into_words``) a list of str words."""
        if split:
            return isinstance(v, (list, tuple)) and all(isinstance(w, str) for w in v)
        return isinstance(v, str)

    @staticmethod
    def _batch(x, name: str, kind: str) -> list:
        if isinstance(x, (str, bytes, bytearray)) or not isinstance(x, Iterable):
            raise TypeError(f"{name} must be a {kind} or a list of them, got {type(x).__name__}")
        items = list(x)
        if not items:
            raise ValueError(f"{name} is an empty list")
        return items

    def _inputs(self, text, text_pair, split: bool) -> Tuple[List[tuple], bool]:
        """(items, single): the inputs as (first, second) tuples, second None for a text without
        a pair; single when one text (or pair) was given.  As transformers reads them: a batch
        item may be a (text, text_pair) tuple; a single text's empty text_pair ("" or []) means
        no pair, while an empty text_pair in a batch is an empty second segment."""
        kind = "list of str words" if split else "str"
        one = (lambda v: self._is_one(v, split))
        norm = list if split else str
        if one(text):
            if text_pair is not None and not one(text_pair):
                error = ValueError if isinstance(text_pair, (list, tuple)) else TypeError  # a batch, or no text at all
                raise error(f"text is one text but text_pair is a {type(text_pair).__name__}, not a {kind}: give one "
                            f"pair text per text")
            return [(norm(text), norm(text_pair) if text_pair else None)], True
        batch = self._batch(text, "text", kind)
        if text_pair is None:
            items = []
            for i, v in enumerate(batch):
                if one(v):
                    items.append((norm(v), None))
                elif isinstance(v, (list, tuple)) and len(v) == 2 and one(v[0]) and one(v[1]):
                    items.append((norm(v[0]), norm(v[1])))
                else:
                    raise TypeError(f"text[{i}] is a {type(v).__name__}, not a {kind} or a ({kind}, {kind}) pair")
            return items, False
        pairs = self._batch(text_pair, "text_pair", kind)
        if len(pairs) != len(batch):
            raise ValueError(f"text has {len(batch)} item(s) but text_pair has {len(pairs)}; give one pair text "
                             f"per text")
        for name, seq in (("text", batch), ("text_pair", pairs)):
            for i, v in enumerate(seq):
                if not one(v):
                    raise TypeError(f"{name}[{i}] is a {type(v).__name__}, not a {kind}"
                                    + (" (text_pair is given: text holds first texts only)" if name == "text" else ""))
        return [(norm(a), norm(b)) for a, b in zip(batch, pairs)], False

    def _num_special(self, pair: bool) -> int:
        pp = self._tokenizer.post_processor
        return 0 if pp is None else int(pp.num_special_tokens_to_add(pair))

    def _settings(self, truncation, padding, max_length, stride, pad_to_multiple_of, items,
                  add_special_tokens: bool) -> _Settings:
        """The call's truncation and padding, resolved (and refused) as transformers does."""
        # transformers warns, then pads to the longest row
        ignores_max_length = padding is True and max_length is not None and truncation in (None, False,
                                                                                          "do_not_truncate")
        if truncation is None and max_length is not None and padding is False:
            truncation = "longest_first"  # transformers: max_length alone (no padding) truncates
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
        pairs = any(b is not None for _, b in items)
        if truncation == "only_second" and not pairs:
            raise ValueError("truncation='only_second' needs text pairs (text_pair is None)")
        length = self.model_max_length if max_length is None else max_length
        where = f"max_length={length}" + (" (model_max_length)" if max_length is None else "")
        if truncation is not None and add_special_tokens:
            specials = self._num_special(pairs)
            if length <= specials:
                raise ValueError(f"{where} leaves no room for text next to the {specials} special tokens")
        if truncation is not None and padding is not None and pad_to_multiple_of and length % pad_to_multiple_of:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} does not divide {where}: with truncation "
                             f"and padding both on, rows would be padded past max_length; give a max_length that is "
                             f"a multiple of it")
        if ignores_max_length:
            warnings.warn("`max_length` is ignored when `padding`=`True` and there is no truncation strategy. "
                          "To pad to max length, use `padding='max_length'`.", stacklevel=3)
        unbounded = max_length is None and truncation is None and padding != "max_length"
        return _Settings(truncation, padding, length, stride, pad_to_multiple_of, unbounded)

    def _refuse_stride_panics(self, items, settings: _Settings, split: bool, add_special_tokens: bool) -> None:
        """The tokenizers library aborts (a Rust panic: a ``BaseException`` with a backtrace, not
        an error) when a text is truncated to fewer tokens than ``stride`` + 1 per window.  Which
        texts are truncated, and to what, depends on their lengths: compute that as the library
        does (:func:`_kept_lengths`) and refuse such a call here, naming the text."""
        firsts = self._encode([(a, None) for a, _ in items], None, split=split, add_special_tokens=False)
        with_pair = [(b, None) for _, b in items if b is not None]
        seconds = iter(self._encode(with_pair, None, split=split, add_special_tokens=False) if with_pair else [])
        stride, length, strategy = settings.stride, settings.length, settings.truncation
        for i, ((_, b), first) in enumerate(zip(items, firsts)):
            n = (len(first), None if b is None else len(next(seconds)))
            specials = self._num_special(b is not None) if add_special_tokens else 0
            kept = _kept_lengths(n[0], n[1], length - specials, strategy)
            if kept is None:
                continue  # the library raises its own error (a text too short to truncate)
            for j, name in enumerate(("text", "text_pair")):
                if n[j] is None or not 0 < kept[j] < n[j] or stride < kept[j]:
                    continue
                taken = [f"{specials} special tokens"] if specials else []
                if n[1 - j] is not None:
                    other = f"{('text', 'text_pair')[1 - j]}[{i}]"
                    taken.append(f"the {kept[1 - j]} tokens kept of {other} (truncation={strategy!r})")
                less = f" less {' and '.join(taken)}" if taken else ""
                raise ValueError(f"stride={stride} must be smaller than the {kept[j]} token(s) of {name}[{i}] that fit "
                                 f"in each window: max_length={length}{less}; use a larger max_length or a smaller "
                                 f"stride")

    def _encode(self, items, settings: Optional[_Settings], *, split: bool, add_special_tokens: bool) -> list:
        """The one place that runs the Rust backend: its truncation and padding are set to this
        call's (``settings`` None: neither) and put back as they were, under a lock, so no call
        leaves state that another call, or a direct user of ``backend_tokenizer``, would see."""
        tok = self._tokenizer
        inputs = [a if b is None else (a, b) for a, b in items]
        with self._lock:
            before = (tok.truncation, tok.padding)
            try:
                self._set_backend(settings and settings.backend_truncation(self.truncation_side),
                                  settings and settings.backend_padding(self))
                return tok.encode_batch(inputs, is_pretokenized=split, add_special_tokens=add_special_tokens)
            except Exception as e:  # the Rust library's errors (e.g. a pair text too short to truncate)
                raise ValueError(f"cannot tokenize: {e}") from None
            except BaseException as e:  # a Rust panic that the checks above did not foresee
                if type(e).__name__ != "PanicException":
                    raise
                raise ValueError(f"cannot tokenize: the tokenizers library aborted: {str(e).splitlines()[0]}") from None
            finally:
                self._set_backend(*before)

    def _set_backend(self, truncation: Optional[dict], padding: Optional[dict]) -> None:
        tok = self._tokenizer
        if truncation is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(**truncation)
        if padding is None:
            tok.no_padding()
        else:
            tok.enable_padding(**padding)

    def __call__(self, text, text_pair=None, *, max_length: Optional[int] = None,
                 truncation: Union[bool, str, None] = True, padding: Union[bool, str] = True, stride: int = 0,
                 return_overflowing_tokens: bool = False, return_offsets_mapping: bool = False,
                 return_special_tokens_mask: bool = False, is_split_into_words: bool = False,
                 pad_to_multiple_of: Optional[int] = None, add_special_tokens: bool = True,
                 return_tensors: Optional[str] = "pt") -> BatchEncoding:
        """Tokenize a text or a batch (``text`` a str or a list of str; ``text_pair`` likewise for
        pairs, whose second text gets token type 1; or a batch of ``(text, text_pair)`` tuples).
        With ``is_split_into_words=True`` each text is a list of words (``word_ids`` then index
        those words).

        truncation: True (= "longest_first"), "only_first", "only_second" or False, to
            ``max_length`` (default ``model_max_length``).  None: as transformers, truncation
            only when ``max_length`` is given and ``padding=False``.
        padding: True (= "longest": to the longest row), "max_length" or False;
            ``pad_to_multiple_of`` rounds the length up (it must divide max_length when
            truncating, as transformers requires).
        stride, return_overflowing_tokens: the truncated tokens come back as further rows
            (windows), each overlapping the previous one by ``stride`` tokens; the key
            ``overflow_to_sample_mapping`` gives the input index of each row.
        return_tensors: "pt" (int64 tensors (B, S); offsets (B, S, 2)) or None (lists; a single
            text without overflow gives un-batched lists, as in transformers).

        Without any max_length in effect (truncation off, no max_length, no max_length padding),
        a row longer than ``model_max_length`` gives transformers' warning, once per tokenizer.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        items, single = self._inputs(text, text_pair, is_split_into_words)
        settings = self._settings(truncation, padding, max_length, stride, pad_to_multiple_of, items,
                                  add_special_tokens)
        if settings.truncation is not None and settings.stride:
            self._refuse_stride_panics(items, settings, is_split_into_words, add_special_tokens)
        encodings = self._encode(items, settings, split=is_split_into_words, add_special_tokens=add_special_tokens)

        rows, sample = [], []
        for i, enc in enumerate(encodings):
            group = [enc] + (list(enc.overflowing) if return_overflowing_tokens else [])
            rows.extend(group)
            sample.extend([i] * len(group))
        if settings.unbounded:
            self._warn_if_too_long(rows)
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

    def _warn_if_too_long(self, rows) -> None:
        """transformers' warning for a row past model_max_length with no max_length in effect:
        once per tokenizer, for the first such row."""
        if self._warned_too_long:
            return
        for enc in rows:
            if len(enc.ids) > self.model_max_length:
                self._warned_too_long = True
                warnings.warn(f"Token indices sequence length is longer than the specified maximum sequence length "
                              f"for this model ({len(enc.ids)} > {self.model_max_length}). Running this sequence "
                              f"through the model will result in indexing errors", stacklevel=3)
                return

    def __repr__(self) -> str:
        return (f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, do_lower_case={self.do_lower_case})")
