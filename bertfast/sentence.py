"""Sentence embeddings: a bertfast :class:`~bertfast.modeling.BertModel` + its tokenizer
(:class:`bertfast.Tokenizer`) + mean pooling + L2 normalisation, the recipe of
sentence-transformers models such as all-MiniLM-L6-v2; and contextual vectors: every token's,
or one word's in its sentence, of any layer or an ELMo-style mix of all of them.

    >>> from bertfast import SentenceEncoder
    >>> enc = SentenceEncoder("minilm")
    >>> emb = enc.encode(["A man is eating food.", "Someone is having a meal."])   # (2, 384)
    >>> enc.similarity("A man is eating food.", "Someone is having a meal.")
    0.7...
    >>> tv = enc.encode("The bank of the river.", output="tokens")  # TokenVectors: tokens, offsets, vectors (T, 384)
    >>> enc.word_vectors("I sat on the bank.", "bank", layers=-2)   # (1, 384): that word, second-to-last layer
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from bertfast.plan import copy_to_device, to_device
from bertfast.pooling import ScalarMix, mean_pool
from bertfast.progress import THRESHOLD as PROGRESS_THRESHOLD, Progress
from bertfast.kernels._common import dtype_name

__all__ = ["SentenceEncoder", "TokenVectors", "parse_dtype", "parse_device"]

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


@dataclass(eq=False)
class TokenVectors:
    """The contextual vectors of one text (``SentenceEncoder.encode(..., output="tokens")``).

    ``tokens``: its word pieces (T of them; ``[CLS]``, ``[SEP]`` and padding excluded, and the
    pieces past ``max_length`` too: ``truncated`` says whether any were cut); ``offsets``: each
    piece's (char_start, char_end) in ``text``; ``vectors``: (T, hidden) fp32, row t the hidden
    state of ``tokens[t]`` (of the layer(s) asked for)."""

    text: str
    tokens: List[str]
    offsets: List[Tuple[int, int]]
    vectors: torch.Tensor  # (T, H)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.tokens)


LayersArg = Union[None, int, Sequence[int], str, ScalarMix]


class SentenceEncoder:
    """Encode sentences into L2-normalised mean-pooled BERT embeddings, or read the contextual
    vector of every token or word.

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

    Attributes: ``model``, ``tokenizer`` (a :class:`bertfast.Tokenizer`), ``model_path``,
    ``device``, ``dtype``, ``max_length``, ``embedding_dim``, ``num_layers`` (the encoder's
    layers; ``hidden_states`` has ``num_layers + 1``, the embeddings first), ``backend``.

    ``layers`` (of :meth:`encode` and :meth:`word_vectors`) chooses the hidden states read:
    None (default) the last layer; an int, an index into ``hidden_states`` (0 the embedding
    output, 1..num_layers the layers, negative from the end: -1 is the last layer); a list of
    ints, their average; ``"scalar_mix"``, an ELMo-style :class:`bertfast.pooling.ScalarMix` over
    all ``num_layers + 1`` hidden states with its initial weights (uniform softmax weights,
    gamma 1: the average of all of them); or a ``ScalarMix`` module of your own (e.g. trained
    with a downstream model), whose weights are used as they are.
    """

    def __init__(
        self,
        model: Union[str, os.PathLike] = "minilm",
        device: Union[None, str, torch.device] = None,
        dtype: Union[None, str, torch.dtype] = None,
        max_length: Optional[int] = None,
        backend: Optional[str] = None,
    ) -> None:
        from bertfast.loading import load_config, resolve_model_path
        from bertfast.modeling import BertModel
        from bertfast.tokenization import Tokenizer, _read_json

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
        max_positions = int(load_config(self.model_path).max_position_embeddings)
        if max_length is None:
            st_len = _read_json(self.model_path / "sentence_bert_config.json").get("max_seq_length")
            if isinstance(st_len, int) and not isinstance(st_len, bool) and st_len >= 2:
                max_length = min(st_len, max_positions)
        elif max_length > max_positions:
            raise ValueError(
                f"max_length={max_length} exceeds the model's max_position_embeddings={max_positions}"
            )
        # the tokenizer's model_max_length (capped at max_position_embeddings) when max_length is None
        self.tokenizer = Tokenizer.from_pretrained(self.model_path, max_length=max_length)
        self.max_length = self.tokenizer.model_max_length
        self.pad_id = self.tokenizer.pad_token_id

        self.model = BertModel.from_pretrained(self.model_path, dtype=torch_dtype, device=self.device)
        self.model.eval()
        first = next(self.model.parameters())
        self.dtype, self.device = first.dtype, first.device

        self.backend = backend
        if backend is not None:
            self.model.set_backend(backend)
        self.embedding_dim = int(self.model.config.hidden_size)
        self.num_layers = int(self.model.config.num_hidden_layers)

    # ------------------------------------------------------------------ tokenizer
    def _tokenize(self, texts: List[str], **kw):
        """Unpadded token lists of ``texts``, truncated to ``max_length`` (a BatchEncoding of lists)."""
        return self.tokenizer(texts, padding=False, max_length=self.max_length, return_tensors=None, **kw)

    def _pad(self, enc, rows: Sequence[int]) -> dict:
        """Rows of an unpadded BatchEncoding padded to their longest: input_ids, token_type_ids,
        attention_mask as int64 CPU tensors (batch, longest)."""
        from bertfast.collators import pad_batch

        keys = ("input_ids", "token_type_ids", "attention_mask")
        return pad_batch([{k: enc[k][i] for k in keys} for i in rows], self.pad_id)

    def tokenize(self, texts: Union[str, Sequence[str]]) -> dict:
        """Tokenize like :meth:`encode` does (truncation to ``max_length``, padding to the
        longest text): a dict of int64 CPU tensors input_ids / token_type_ids / attention_mask."""
        texts = self._check_texts(texts)[0]
        enc = self._tokenize(texts)
        return self._pad(enc, range(len(texts)))

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

    # ------------------------------------------------------------------ layers
    def _check_layers(self, layers: LayersArg) -> LayersArg:
        """Validate ``layers`` (see the class docstring) before any forward; "scalar_mix" becomes
        a uniform ScalarMix over all hidden states."""
        n = self.num_layers + 1  # hidden_states: the embeddings + every layer

        def index(i, what):
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"{what} must be an int in [-{n}, {n - 1}] (hidden_states holds the embeddings and "
                                 f"{self.num_layers} layers), got {i!r}")
            return i

        if layers is None or isinstance(layers, ScalarMix):
            if isinstance(layers, ScalarMix) and layers.num_layers != n:
                raise ValueError(f"layers: the ScalarMix mixes {layers.num_layers} tensors; this model has {n} "
                                 f"hidden states (num_hidden_layers + 1)")
            return layers
        if isinstance(layers, str):
            if layers != "scalar_mix":
                raise ValueError(f"layers must be None, an int, a list of ints, 'scalar_mix' or a ScalarMix; got "
                                 f"{layers!r}")
            return ScalarMix(n, trainable=False)
        if isinstance(layers, (list, tuple)):
            if not layers:
                raise ValueError("layers is an empty list")
            return [index(i, f"layers[{k}]") for k, i in enumerate(layers)]
        return index(layers, "layers")

    def _hidden(self, batch: dict, layers: LayersArg) -> torch.Tensor:
        """(batch, seq, hidden) fp32: the hidden states ``layers`` (already checked) selects, for a
        batch on the model's device (``bertfast.plan.to_device``)."""
        out = self.model(**batch, output_hidden_states=layers is not None)
        if layers is None:
            return out.last_hidden_state.float()
        hs = out.hidden_states  # embeddings + every layer, (B, S, H) each
        if isinstance(layers, int):
            return hs[layers].float()
        if isinstance(layers, list):
            return torch.stack([hs[i].float() for i in layers]).mean(0)
        mix = layers.to(self.device)
        return mix([h.float() for h in hs], batch["attention_mask"]).float()

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        texts: Union[str, Sequence[str]],
        batch_size: int = 32,
        normalize: Optional[bool] = None,
        show_progress: Optional[bool] = None,
        convert_to_numpy: bool = False,
        output: str = "sentence",
        layers: LayersArg = None,
    ):
        """Embed ``texts`` (a str or a list of str).

        Texts are tokenized once, sorted by token count so that each batch pads to similar
        lengths, run through the model under ``torch.inference_mode()`` and the original order
        is restored.

        ``output="sentence"`` (default): the hidden states (of ``layers``, see the class
        docstring) mean-pooled over real tokens and, with ``normalize`` (default True),
        L2-normalised: an fp32 tensor (N, hidden) on the model's device (a numpy array on the
        CPU with ``convert_to_numpy=True``); a single string gives shape (hidden,).

        ``output="tokens"``: one :class:`TokenVectors` per text (a single string gives one):
        the vector of every word piece with its token string and character offsets, ``[CLS]``,
        ``[SEP]`` and padding excluded; ``normalize=True`` L2-normalises each vector (default
        False); vectors are fp32 CPU tensors (numpy arrays with ``convert_to_numpy=True``).

        ``show_progress=None`` shows a progress line on stderr when N > PROGRESS_THRESHOLD and
        stderr is a terminal.
        """
        texts, single = self._check_texts(texts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if output not in ("sentence", "tokens"):
            raise ValueError(f"output must be 'sentence' or 'tokens', got {output!r}")
        tokens = output == "tokens"
        normalize = (not tokens) if normalize is None else bool(normalize)
        layers = self._check_layers(layers)
        n = len(texts)
        if show_progress is None:
            show_progress = n > PROGRESS_THRESHOLD and bool(getattr(sys.stderr, "isatty", lambda: False)())
        progress = Progress(n, "encoding", unit="texts", show=bool(show_progress))

        enc = self._tokenize(texts, return_offsets_mapping=tokens, return_special_tokens_mask=tokens)
        lengths = [len(ids) for ids in enc["input_ids"]]
        # longest first: the first batch is the largest, so an out-of-memory error shows at once
        order = sorted(range(n), key=lambda i: -lengths[i])
        out = [None] * n if tokens else torch.empty((n, self.embedding_dim), dtype=torch.float32, device=self.device)
        try:
            with torch.inference_mode():
                for start in range(0, n, batch_size):
                    idx = order[start:start + batch_size]
                    # checked and read on the host, then copied without waiting for the device: the
                    # forward makes no device read (bertfast/plan.py), so the host runs ahead
                    batch = to_device(self._pad(enc, idx), self.model)
                    hidden = self._hidden(batch, layers)  # (b, S, H) fp32
                    if tokens:
                        for row, i in enumerate(idx):
                            out[i] = self._token_vectors(texts[i], enc, i, hidden[row], normalize)
                    else:
                        pooled = mean_pool(hidden, batch["attention_mask"], dtype=torch.float32)
                        if normalize:
                            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
                        out[copy_to_device(torch.tensor(idx), self.device)] = pooled
                    progress.update(len(idx))
        finally:
            progress.close()
        if tokens:
            if convert_to_numpy:
                for tv in out:
                    tv.vectors = tv.vectors.numpy()
            return out[0] if single else out
        if single:
            out = out[0]
        if convert_to_numpy:
            return out.cpu().numpy()
        return out

    def _token_vectors(self, text: str, enc, i: int, hidden: torch.Tensor, normalize: bool) -> TokenVectors:
        """Row ``i`` of a tokenized batch -> its TokenVectors (specials and padding dropped)."""
        keep = [j for j, s in enumerate(enc["special_tokens_mask"][i]) if not s]
        vec = hidden[keep].cpu()  # (T, H)
        if normalize:
            vec = torch.nn.functional.normalize(vec, p=2.0, dim=-1)
        offsets = [tuple(enc["offset_mapping"][i][j]) for j in keep]
        pieces = enc.tokens(i)
        truncated = bool(enc.encodings[i].overflowing)  # the tokenizer cut pieces past max_length
        return TokenVectors(text, [pieces[j] for j in keep], offsets, vec, truncated)

    def word_vectors(self, sentence: str, word: str, occurrence: Optional[int] = None,
                     layers: LayersArg = None) -> torch.Tensor:
        """The contextual vector of ``word`` in ``sentence``: the mean of its word pieces' vectors
        (of ``layers``).  ``word`` matches whole tokens only ("cat" is not found inside
        "concatenate"), case-insensitively when the tokenizer lowercases; it may span several
        words ("New York").

        Returns (N, hidden) fp32, one row per occurrence, left to right; with ``occurrence=k``
        (0-based) the (hidden,) vector of the k-th one.  ValueError when ``word`` is not in the
        sentence, when ``occurrence`` is out of range, or when the word lies past ``max_length``."""
        if not isinstance(sentence, str) or not isinstance(word, str):
            raise TypeError(f"sentence and word must be str, got {type(sentence).__name__} and {type(word).__name__}")
        if not word.strip():
            raise ValueError("word is empty")
        if occurrence is not None and (isinstance(occurrence, bool) or not isinstance(occurrence, int)
                                       or occurrence < 0):
            raise ValueError(f"occurrence must be an int >= 0 (0 = the first), got {occurrence!r}")
        tv = self.encode(sentence, output="tokens", layers=layers)
        flags = re.IGNORECASE if self.tokenizer.do_lower_case else 0
        starts = {s for s, _ in tv.offsets}
        ends = {e for _, e in tv.offsets}
        spans, cut = [], False
        for m in re.finditer(re.escape(word.strip()), sentence, flags):
            s, e = m.span()
            if tv.truncated and (not tv.offsets or s >= tv.offsets[-1][1]):
                cut = True
            elif s in starts and e in ends:
                spans.append([t for t, (a, b) in enumerate(tv.offsets) if a >= s and b <= e])
        if not spans:
            if cut:
                raise ValueError(f"word {word!r} lies past max_length={self.max_length} tokens of the sentence "
                                 f"(truncated)")
            raise ValueError(f"word {word!r} is not in the sentence {sentence[:80]!r}")
        vecs = torch.stack([tv.vectors[rows].mean(0) for rows in spans])  # (N, H)
        if occurrence is None:
            return vecs
        if occurrence >= len(spans):
            raise ValueError(f"occurrence={occurrence} but {word!r} occurs {len(spans)} time(s) in the sentence")
        return vecs[occurrence]

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
