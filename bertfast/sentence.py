"""Sentence embeddings: a bertfast :class:`~bertfast.modeling.BertModel` + its tokenizer +
mean pooling + L2 normalisation, the recipe of sentence-transformers models such as
all-MiniLM-L6-v2.

    >>> from bertfast import SentenceEncoder
    >>> enc = SentenceEncoder("minilm")
    >>> emb = enc.encode(["A man is eating food.", "Someone is having a meal."])   # (2, 384)
    >>> enc.similarity("A man is eating food.", "Someone is having a meal.")
    0.7...
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from bertfast.pooling import mean_pool
from kernels._common import dtype_name

__all__ = ["SentenceEncoder", "parse_dtype", "parse_device"]

# encode() shows a progress line by default above this many texts (when stderr is a terminal)
PROGRESS_THRESHOLD = 256

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``None`` / a torch floating dtype / one of float32, float16, bfloat16 (aliases fp32, fp16,
    half, bf16, with or without a ``torch.`` prefix) -> torch dtype; ``ValueError`` otherwise."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}; expected one of {', '.join(DTYPE_NAMES)}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")


def _device_type_available(kind: str) -> bool:
    """Whether this torch runtime can hold tensors on devices of type ``kind`` (other than cpu
    and cuda): mps, or an accelerator module such as ``torch.xpu`` that says it is available."""
    if kind == "mps":
        return bool(torch.backends.mps.is_available())
    check = getattr(getattr(torch, kind, None), "is_available", None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # pragma: no cover - a backend module that cannot even answer
        return False


def parse_device(device: Union[None, str, torch.device]) -> torch.device:
    """``None`` -> ``cuda`` when available, else ``cpu``.  A device this machine cannot run the
    encoder on raises ``ValueError`` naming it, before any weights are loaded: an unknown device
    string, ``meta`` (tensors without data), CUDA without CUDA or past the last GPU, and any other
    device type that torch does not report as available here (mps / xpu are accepted where they are)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise ValueError(f"device {name!r} is not supported (meta tensors hold no data); use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r} requested but CUDA is not available ({why})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    if not _device_type_available(dev.type):
        raise ValueError(f"device {name!r} is not supported or not available on this machine; use cpu, cuda or cuda:N")
    return dev


class _Progress:
    """A dependency-free progress line on stderr: redrawn in place on a terminal, a few plain
    lines (every ~10 %) otherwise."""

    def __init__(self, total: int, desc: str = "encoding", stream=None) -> None:
        self.total = total
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.done = 0
        self._last_draw = 0.0
        self._last_decile = -1

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.desc}: {self.done}/{self.total} texts ({pct:3.0f}%) {rate:,.1f} texts/s, {elapsed:.1f}s"

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= 0.1 or self.done >= self.total:
                self.stream.write("\r" + self._line())
                self.stream.flush()
                self._last_draw = now
        else:
            decile = int(10 * self.done / self.total) if self.total else 10
            if decile != self._last_decile and (decile > self._last_decile):
                self._last_decile = decile
                self.stream.write(self._line() + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line() + "\n")
            self.stream.flush()


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


class SentenceEncoder:
    """Encode sentences into L2-normalised mean-pooled BERT embeddings.

    Args:
        model: a model name known to :func:`bertfast.loading.resolve_model_path` (``"minilm"``)
            or a directory holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``
            (``vocab.txt`` is used when ``tokenizer.json`` is missing).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``; default CUDA when
            available, else CPU.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` (a string or a torch dtype).
        max_length: truncation length in tokens, [CLS] and [SEP] included.  Default:
            ``max_seq_length`` of ``sentence_bert_config.json`` if present (256 for MiniLM), else
            the smaller of the tokenizer's ``model_max_length`` and the model's
            ``max_position_embeddings``.
        backend: forwarded to ``model.set_backend(backend)``; stored as ``self.backend``.

    Attributes: ``model``, ``tokenizer`` (a ``tokenizers.Tokenizer``), ``model_path``,
    ``device``, ``dtype``, ``max_length``, ``embedding_dim``, ``backend``.
    """

    def __init__(
        self,
        model: Union[str, os.PathLike] = "minilm",
        device: Union[None, str, torch.device] = None,
        dtype: Union[None, str, torch.dtype] = None,
        max_length: Optional[int] = None,
        backend: Optional[str] = None,
    ) -> None:
        from bertfast.loading import resolve_model_path
        from bertfast.modeling import BertModel

        # argument checks first: cheap, and before any weights are read
        self.device = parse_device(device)
        torch_dtype = parse_dtype(dtype)
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
        ):
            raise ValueError(f"max_length must be an int >= 2 ([CLS] and [SEP]), got {max_length!r}")
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a name or a directory path, got {type(model).__name__}")

        self.model_path = Path(resolve_model_path(model))
        self.model = BertModel.from_pretrained(self.model_path, dtype=torch_dtype, device=self.device)
        self.model.eval()
        try:
            first = next(self.model.parameters())
            self.dtype = first.dtype
            self.device = first.device
        except StopIteration:  # pragma: no cover - a BERT always has parameters
            self.dtype = torch_dtype or torch.float32

        self.backend = backend
        if backend is not None:
            set_backend = getattr(self.model, "set_backend", None)
            if set_backend is None:
                raise ValueError(
                    f"backend={backend!r} was requested but {type(self.model).__name__} has no set_backend() "
                    "in this version of bertfast; leave backend=None"
                )
            set_backend(backend)

        config = self.model.config
        max_positions = int(getattr(config, "max_position_embeddings", 512))
        self.embedding_dim = int(config.hidden_size)

        tok_config = _read_json(self.model_path / "tokenizer_config.json")
        st_config = _read_json(self.model_path / "sentence_bert_config.json")
        if max_length is None:
            if isinstance(st_config.get("max_seq_length"), int):
                max_length = st_config["max_seq_length"]
            else:
                mml = tok_config.get("model_max_length")
                # transformers writes a huge sentinel (int(1e30)) when there is no limit
                max_length = mml if isinstance(mml, int) and 2 <= mml < 1_000_000 else max_positions
            max_length = min(max_length, max_positions)
        elif max_length > max_positions:
            raise ValueError(
                f"max_length={max_length} exceeds the model's max_position_embeddings={max_positions}"
            )
        self.max_length = int(max_length)

        self.tokenizer, self.pad_id = self._load_tokenizer(self.model_path, tok_config, config)
        # truncation here; padding is done per batch by _pad (to the longest text of the batch)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)

    # ------------------------------------------------------------------ tokenizer
    @staticmethod
    def _load_tokenizer(path: Path, tok_config: dict, config: Any):
        from tokenizers import Tokenizer

        tj = path / "tokenizer.json"
        if tj.is_file():
            try:
                tok = Tokenizer.from_file(str(tj))
            except Exception as e:  # tokenizers raises its own exception type
                raise ValueError(f"cannot load tokenizer {tj}: {e}") from None
        elif (path / "vocab.txt").is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            lower = bool(tok_config.get("do_lower_case", True))
            tok = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lower)._tokenizer
        else:
            raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
        pad_id = None
        padding = tok.padding
        if isinstance(padding, dict) and isinstance(padding.get("pad_id"), int):
            pad_id = padding["pad_id"]
        if pad_id is None:
            pad_id = tok.token_to_id("[PAD]")
        if pad_id is None:
            pad_id = getattr(config, "pad_token_id", None) or 0
        return tok, int(pad_id)

    def _pad(self, encodings: Sequence[Any]) -> dict:
        """Pad a list of ``tokenizers.Encoding`` to the longest one: input_ids, token_type_ids,
        attention_mask as int64 CPU tensors of shape (batch, longest)."""
        n = len(encodings)
        longest = max(len(e.ids) for e in encodings)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        types = torch.zeros((n, longest), dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, e in enumerate(encodings):
            k = len(e.ids)
            ids[i, :k] = torch.tensor(e.ids, dtype=torch.long)
            types[i, :k] = torch.tensor(e.type_ids, dtype=torch.long)
            mask[i, :k] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}

    def tokenize(self, texts: Union[str, Sequence[str]]) -> dict:
        """Tokenize like :meth:`encode` does (truncation to ``max_length``, padding to the
        longest text): a dict of int64 CPU tensors input_ids / token_type_ids / attention_mask."""
        texts = self._check_texts(texts)[0]
        return self._pad(self.tokenizer.encode_batch(texts))

    @staticmethod
    def _check_texts(texts: Union[str, Sequence[str]]) -> tuple[list, bool]:
        single = isinstance(texts, str)
        if single:
            texts = [texts]
        elif isinstance(texts, (bytes, bytearray)):
            raise TypeError("texts must be str or a list of str, got bytes; decode it first")
        else:
            try:
                texts = list(texts)
            except TypeError:
                raise TypeError(f"texts must be str or a list of str, got {type(texts).__name__}") from None
        if not texts:
            raise ValueError("no texts to encode (got an empty list)")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str")
        return texts, single

    # ------------------------------------------------------------------ encoding
    def _forward(self, batch: dict) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return mean_pool(hidden, batch["attention_mask"], dtype=torch.float32)

    def encode(
        self,
        texts: Union[str, Sequence[str]],
        batch_size: int = 32,
        normalize: bool = True,
        show_progress: Optional[bool] = None,
        convert_to_numpy: bool = False,
    ):
        """Embed ``texts`` (a str or a list of str).

        Texts are tokenized once, sorted by token count so that each batch pads to similar
        lengths, run through the model under ``torch.inference_mode()``, mean-pooled over real
        tokens and (``normalize=True``) L2-normalised; the original order is restored.

        Returns an fp32 tensor (N, hidden) on the model's device (a numpy array on the CPU with
        ``convert_to_numpy=True``); a single string gives shape (hidden,).
        ``show_progress=None`` shows a progress line on stderr when N > PROGRESS_THRESHOLD and
        stderr is a terminal.
        """
        texts, single = self._check_texts(texts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(texts)
        if show_progress is None:
            show_progress = n > PROGRESS_THRESHOLD and bool(getattr(sys.stderr, "isatty", lambda: False)())
        progress = _Progress(n) if show_progress else None

        encodings = self.tokenizer.encode_batch(texts)
        # longest first: the first batch is the largest, so an out-of-memory error shows at once
        order = sorted(range(n), key=lambda i: -len(encodings[i].ids))
        out = torch.empty((n, self.embedding_dim), dtype=torch.float32, device=self.device)
        try:
            with torch.inference_mode():
                for start in range(0, n, batch_size):
                    idx = order[start:start + batch_size]
                    pooled = self._forward(self._pad([encodings[i] for i in idx]))
                    if normalize:
                        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
                    out[torch.tensor(idx, device=self.device)] = pooled
                    if progress is not None:
                        progress.update(len(idx))
        finally:
            if progress is not None:
                progress.close()
        if single:
            out = out[0]
        if convert_to_numpy:
            return out.cpu().numpy()
        return out

    def similarity(self, a, b, batch_size: int = 32):
        """Cosine similarity.  ``a`` and ``b`` are each a str, a list of str or embeddings
        (a tensor of shape (hidden,) or (N, hidden)).  str vs str gives a float; a list vs a
        str a tensor (len(a),); a list vs a list the matrix (len(a), len(b))."""
        ea, sa = self._as_embeddings(a, batch_size)
        eb, sb = self._as_embeddings(b, batch_size)
        ea = torch.nn.functional.normalize(ea.float(), dim=-1)
        eb = torch.nn.functional.normalize(eb.float(), dim=-1).to(ea.device)
        sim = ea @ eb.T
        if sa and sb:
            return float(sim[0, 0])
        if sb:
            return sim[:, 0]
        if sa:
            return sim[0]
        return sim

    def _as_embeddings(self, x, batch_size: int) -> tuple[torch.Tensor, bool]:
        if isinstance(x, torch.Tensor):
            if x.dim() == 1:
                return x.unsqueeze(0), True
            if x.dim() == 2:
                return x, False
            raise ValueError(f"similarity: embeddings must be (hidden,) or (N, hidden), got {tuple(x.shape)}")
        texts, single = self._check_texts(x)
        return self.encode(texts, batch_size=batch_size, normalize=True), single

    # ------------------------------------------------------------------ misc
    def get_sentence_embedding_dimension(self) -> int:
        """The embedding size (sentence-transformers' name for ``embedding_dim``)."""
        return self.embedding_dim

    def __repr__(self) -> str:
        return (
            f"SentenceEncoder(model={str(self.model_path)!r}, device={str(self.device)!r}, "
            f"dtype={dtype_name(self.dtype)}, max_length={self.max_length}, "
            f"embedding_dim={self.embedding_dim}, backend={self.backend!r})"
        )
