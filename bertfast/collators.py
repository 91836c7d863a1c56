"""Data collators for BERT tasks, as plain functions and small classes (no framework needed;
they also work as ``collate_fn`` of a ``torch.utils.data.DataLoader`` or transformers' ``Trainer``):

* :func:`pad_batch` / :class:`PaddingCollator` -- dynamic padding of a list of tokenized examples
  to the longest one of the batch;
* :class:`LengthGroupedBatches` -- a batch sampler that groups examples of similar length
  (sorted within shuffled buckets), so that dynamic padding pads little;
* :func:`mask_tokens` / :class:`MLMCollator` -- BERT's masked-LM corruption (15 % of the tokens;
  of those 80 % [MASK], 10 % a random token, 10 % unchanged), special tokens and padding never
  masked, optional whole-word masking, seeded;
* :func:`align_labels` -- word labels to sub-word tokens (first sub-word or all, -100 elsewhere);
* :func:`qa_features` -- question/context pairs to model inputs, long contexts split into
  overlapping windows, character answer spans to start/end token positions ([CLS] = 0 when the
  answer is not inside a window);
* :func:`causal_lm_labels` / :class:`CausalLMCollator` -- next-token labels (the shift happens
  inside :class:`bertfast.BertLMHeadModel`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

__all__ = [
    "IGNORE_INDEX", "pad_batch", "PaddingCollator", "LengthGroupedBatches", "mask_tokens", "MLMCollator",
    "align_labels", "qa_features", "char_span_to_tokens", "causal_lm_labels", "CausalLMCollator",
]

IGNORE_INDEX = -100  # label value the losses skip (PyTorch's cross_entropy default)

# per-token keys and their padding value (None: the tokenizer's pad id)
_PAD_VALUES = {"input_ids": None, "token_type_ids": 0, "attention_mask": 0, "special_tokens_mask": 1,
               "word_ids": -1}


# ----------------------------------------------------------------------------- padding / batching
def _as_list(v) -> list:
    return v.tolist() if isinstance(v, torch.Tensor) else list(v)


def pad_batch(features: Sequence[Mapping[str, Any]], pad_token_id: int = 0, *,
              pad_to_multiple_of: Optional[int] = None, label_pad_id: int = IGNORE_INDEX) -> Dict[str, Any]:
    """Pad a list of examples (dicts of ``input_ids`` lists and friends) to the longest one.

    Per-token keys: input_ids (padded with ``pad_token_id``), token_type_ids (0), attention_mask
    (0; created as 1s for real tokens when missing), special_tokens_mask (1), word_ids (-1; None
    entries become -1), and ``labels`` when it is a list (``label_pad_id``).  Scalar keys
    (a class label, start/end positions) are stacked into (B,) tensors.  Anything else that is
    not a number (offsets, texts) is returned as a list, one entry per example.
    Returns int64 tensors (B, S) where S is the longest length, rounded up to
    ``pad_to_multiple_of``."""
    if not features:
        raise ValueError("pad_batch: no examples (an empty batch)")
    for i, f in enumerate(features):
        if "input_ids" not in f:
            raise ValueError(f"pad_batch: example {i} has no 'input_ids' (keys: {', '.join(map(str, f))})")
    lengths = [len(f["input_ids"]) for f in features]
    S = max(lengths)
    if pad_to_multiple_of:
        S = int(math.ceil(S / pad_to_multiple_of) * pad_to_multiple_of)
    B = len(features)
    out: Dict[str, Any] = {}
    keys = list(features[0].keys())
    if "attention_mask" not in keys:
        keys.append("attention_mask")
    for key in keys:
        if key == "attention_mask" and "attention_mask" not in features[0]:
            vals = [[1] * n for n in lengths]
        else:
            missing = [i for i, f in enumerate(features) if key not in f]
            if missing:
                raise ValueError(f"pad_batch: example {missing[0]} has no {key!r} but example 0 has")
            vals = [f[key] for f in features]
        per_token = key in _PAD_VALUES or (key == "labels" and not isinstance(vals[0], (int, float))
                                           and not (isinstance(vals[0], torch.Tensor) and vals[0].dim() == 0))
        if per_token:
            pad = pad_token_id if key == "input_ids" else (label_pad_id if key == "labels" else _PAD_VALUES[key])
            t = torch.full((B, S), pad, dtype=torch.long)
            for i, v in enumerate(vals):
                row = [pad if x is None else x for x in _as_list(v)]
                if len(row) != lengths[i]:
                    raise ValueError(f"pad_batch: example {i} has {len(row)} {key} but {lengths[i]} input_ids")
                t[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            out[key] = t
        elif all(isinstance(v, (int, float, bool)) or (isinstance(v, torch.Tensor) and v.dim() == 0) for v in vals):
            floats = any(isinstance(v, float) or (isinstance(v, torch.Tensor) and v.is_floating_point())
                         for v in vals)
            out[key] = torch.tensor([float(v) if floats else int(v) for v in vals],
                                    dtype=torch.float32 if floats else torch.long)
        else:
            out[key] = list(vals)
    return out


class PaddingCollator:
    """``collate_fn`` that pads a list of tokenized examples with :func:`pad_batch`."""

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        return pad_batch(features, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)


class LengthGroupedBatches:
    """A batch sampler (yields lists of example indices) that puts examples of similar length
    together: each epoch the indices are shuffled, cut into buckets of ``bucket_size`` examples
    (default 50 batches), sorted by length within each bucket (longest first), cut into batches,
    and the batches are shuffled.  Deterministic given ``seed`` and the epoch
    (:meth:`set_epoch`), so a resumed run sees the same batches; ``shuffle=False`` gives batches
    of the data in its order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 bucket_size: Optional[int] = None, drop_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise ValueError("LengthGroupedBatches: no examples")
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.bucket_size = max(batch_size, int(bucket_size) if bucket_size else 50 * batch_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        """Every batch of ``epoch`` (default: the current one), in order."""
        n = len(self.lengths)
        if not self.shuffle:
            order = list(range(n))
            batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.epoch if epoch is None else epoch))
            order = torch.randperm(n, generator=g).tolist()
            batches = []
            for b0 in range(0, n, self.bucket_size):
                bucket = sorted(order[b0:b0 + self.bucket_size], key=lambda i: -self.lengths[i])
                batches.extend(bucket[i:i + self.batch_size] for i in range(0, len(bucket), self.batch_size))
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


# ----------------------------------------------------------------------------- masked LM
def _word_starts(word_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) word index per token (-1: none) -> (B, S) id of the word group, -1 for none: tokens
    with the same word index next to each other form one group."""
    B, S = word_ids.shape
    prev = torch.cat([torch.full((B, 1), -2, dtype=word_ids.dtype), word_ids[:, :-1]], dim=1)
    start = (word_ids != prev) & (word_ids >= 0)
    group = torch.cumsum(start.long().flatten(), 0).view(B, S) - 1
    return torch.where(word_ids >= 0, group, torch.full_like(group, -1))


def mask_tokens(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int,
                special_ids: Sequence[int] = (), attention_mask: Optional[torch.Tensor] = None,
                special_tokens_mask: Optional[torch.Tensor] = None, word_ids: Optional[torch.Tensor] = None,
                mlm_probability: float = 0.15, mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption of a batch ``input_ids`` (B, S).

    Each eligible token is chosen with probability ``mlm_probability`` (with ``word_ids`` (B, S),
    -1 for none: each *word* is chosen with that probability and all its sub-words with it).
    Chosen tokens become [MASK] with probability ``mask_replace_prob``, a random non-special token
    with ``random_replace_prob``, and stay as they are otherwise.  Never chosen: ids in
    ``special_ids``, positions where ``special_tokens_mask`` is 1, padding (``attention_mask`` 0).

    Returns ``(inputs, labels)``: the corrupted copy and (B, S) labels holding the original id at
    chosen positions and -100 elsewhere."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"mask_tokens: input_ids must be an integer tensor (B, S), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    for name, p in (("mlm_probability", mlm_probability), ("mask_replace_prob", mask_replace_prob),
                    ("random_replace_prob", random_replace_prob)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"mask_tokens: {name} must be in [0, 1], got {p}")
    if mask_replace_prob + random_replace_prob > 1.0 + 1e-9:
        raise ValueError(f"mask_tokens: mask_replace_prob + random_replace_prob = "
                         f"{mask_replace_prob + random_replace_prob} > 1")
    ids = input_ids.long()
    dev = ids.device
    eligible = torch.ones_like(ids, dtype=torch.bool)
    if special_ids:
        eligible &= ~torch.isin(ids, torch.tensor(sorted(set(int(i) for i in special_ids)), device=dev))
    for name, m, bad in (("attention_mask", attention_mask, 0), ("special_tokens_mask", special_tokens_mask, 1)):
        if m is not None:
            if tuple(m.shape) != tuple(ids.shape):
                raise ValueError(f"mask_tokens: {name} has shape {tuple(m.shape)}, input_ids {tuple(ids.shape)}")
            eligible &= m.to(dev) != bad
    if word_ids is None:
        chosen = torch.rand(ids.shape, generator=generator, device="cpu").to(dev) < mlm_probability
    else:
        if tuple(word_ids.shape) != tuple(ids.shape):
            raise ValueError(f"mask_tokens: word_ids has shape {tuple(word_ids.shape)}, input_ids {tuple(ids.shape)}")
        group = _word_starts(word_ids.long().cpu())
        n_groups = int(group.max()) + 1 if group.numel() else 0
        pick = torch.rand(max(n_groups, 1), generator=generator) < mlm_probability
        chosen = (pick[group.clamp(min=0)] & (group >= 0)).to(dev)
    chosen &= eligible
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))

    u = torch.rand(ids.shape, generator=generator).to(dev)
    to_mask = chosen & (u < mask_replace_prob)
    to_random = chosen & (u >= mask_replace_prob) & (u < mask_replace_prob + random_replace_prob)
    allowed = torch.ones(int(vocab_size), dtype=torch.bool)
    specials = [int(i) for i in special_ids if 0 <= int(i) < vocab_size] + [int(mask_token_id)]
    allowed[specials] = False
    pool = torch.nonzero(allowed).flatten()  # random replacements come from the non-special tokens
    random_ids = pool[torch.randint(len(pool), ids.shape, generator=generator)].to(dev)
    out = torch.where(to_mask, torch.full_like(ids, int(mask_token_id)), ids)
    out = torch.where(to_random, random_ids, out)
    return out.to(input_ids.dtype), labels


class MLMCollator:
    """``collate_fn`` for masked-LM training: pads a list of tokenized examples (:func:`pad_batch`)
    and corrupts them with :func:`mask_tokens`, adding ``labels``.

    ``whole_word=True`` masks whole words; the examples then need ``word_ids`` (the tokenizer's
    ``BatchEncoding.word_ids(i)``).  ``seed`` seeds the collator's own generator (its state is
    :meth:`state_dict`); a ``generator`` passed to the call is used instead for that batch."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, *, whole_word: bool = False,
                 mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1, seed: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.vocab_size = int(tokenizer.vocab_size)
        # every special token, [UNK] included (as transformers' all_special_ids): never masked, never a
        # random replacement
        specials = {int(tokenizer.cls_token_id), int(tokenizer.sep_token_id), self.pad_token_id, self.mask_token_id}
        if getattr(tokenizer, "unk_token_id", None) is not None:
            specials.add(int(tokenizer.unk_token_id))
        self.special_ids = sorted(specials)
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.whole_word = bool(whole_word)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def __call__(self, features: Sequence[Mapping[str, Any]], generator: Optional[torch.Generator] = None):
        if self.whole_word and any("word_ids" not in f for f in features):
            raise ValueError("MLMCollator(whole_word=True) needs 'word_ids' in every example "
                             "(BatchEncoding.word_ids(i) of the tokenizer)")
        feats = [{k: v for k, v in f.items() if k != "labels"} for f in features]
        batch = pad_batch(feats, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        word_ids = batch.pop("word_ids", None)
        stm = batch.pop("special_tokens_mask", None)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
            special_ids=self.special_ids, attention_mask=batch["attention_mask"], special_tokens_mask=stm,
            word_ids=word_ids if self.whole_word else None, mlm_probability=self.mlm_probability,
            mask_replace_prob=self.mask_replace_prob, random_replace_prob=self.random_replace_prob,
            generator=generator if generator is not None else self.generator)
        return batch


# ----------------------------------------------------------------------------- token labels
def align_labels(word_ids: Sequence[Optional[int]], word_labels: Sequence[int], *,
                 label_all_subwords: bool = False, ignore_index: int = IGNORE_INDEX) -> List[int]:
    """Labels of the words of one text -> labels of its tokens.

    ``word_ids`` are the tokenizer's (``BatchEncoding.word_ids(i)``: the word index of every token,
    None for special and padding tokens).  The first sub-word of each word gets the word's label;
    the other sub-words get ``ignore_index`` (-100), or the word's label too with
    ``label_all_subwords=True``; special and padding tokens get ``ignore_index``.
    A word index past the end of ``word_labels`` is a ValueError (labels and words disagree)."""
    out, prev = [], None
    n = len(word_labels)
    for w in word_ids:
        if w is None:
            out.append(ignore_index)
        else:
            if not 0 <= w < n:
                raise ValueError(f"align_labels: token of word {w} but only {n} word label(s) were given")
            out.append(int(word_labels[w]) if (w != prev or label_all_subwords) else ignore_index)
        prev = w
    return out


# ----------------------------------------------------------------------------- question answering
def _answer_span(answer: Any, context: str, i: int) -> Optional[tuple[int, int]]:
    """(char_start, char_end) of an answer {"text", "answer_start"} (SQuAD's lists: the first one);
    None for no answer (empty text).  The text must be what the context holds at that offset."""
    if answer is None:
        return None
    if not isinstance(answer, Mapping) or "text" not in answer or "answer_start" not in answer:
        raise ValueError(f"qa_features: answers[{i}] must be a dict with 'text' and 'answer_start', got {answer!r}")
    text, start = answer["text"], answer["answer_start"]
    if isinstance(text, (list, tuple)):
        if len(text) != (len(start) if isinstance(start, (list, tuple)) else -1):
            raise ValueError(f"qa_features: answers[{i}] has {len(text)} text(s) but answer_start {start!r}")
        if not text:
            return None
        text, start = text[0], start[0]
    if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
        raise ValueError(f"qa_features: answers[{i}]: text must be a str and answer_start an int, got {answer!r}")
    if text == "":
        return None
    end = start + len(text)
    if start < 0 or end > len(context) or context[start:end] != text:
        raise ValueError(f"qa_features: answers[{i}]: {text!r} is not at character {start} of its context "
                         f"(found {context[max(start, 0):max(end, 0)]!r})")
    return start, end


def char_span_to_tokens(offsets: Sequence[Optional[Sequence[int]]], start_char: int, end_char: int
                        ) -> Optional[tuple[int, int]]:
    """Token indices (first, last) covering the characters ``[start_char, end_char)``, given the
    (char_start, char_end) offsets of each token (None for tokens outside the text); None when
    the span is not entirely inside the tokens given (e.g. cut by a window)."""
    pos = [(j, o) for j, o in enumerate(offsets) if o is not None]
    if not pos or not (pos[0][1][0] <= start_char and end_char <= pos[-1][1][1]):
        return None
    first = next((j for j, o in pos if o[1] > start_char), None)
    last = next((j for j, o in reversed(pos) if o[0] < end_char), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def qa_features(tokenizer, questions: Sequence[str], contexts: Sequence[str],
                answers: Optional[Sequence[Any]] = None, *, max_length: int = 384, stride: int = 128
                ) -> Dict[str, Any]:
    """Question/context pairs -> model inputs, one row per window.

    A context longer than ``max_length`` (with the question) overflows into several windows, each
    overlapping the previous one by ``stride`` tokens; only the context is ever truncated.
    Keys: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 (B, S), padded to the
    longest row), ``example_index`` (B,) (the pair each row comes from), ``offset_mapping`` (a
    list per row: the (char_start, char_end) in the context of each token, None for question,
    special and padding tokens) and, with ``answers`` (each ``{"text": str, "answer_start": int}``,
    a character span of its context; SQuAD's lists are accepted, the first answer is used),
    ``start_positions`` / ``end_positions`` (B,): the answer's first and last token in that row,
    or 0 ([CLS]) when the row does not hold the whole answer (or there is none).

    ``tokenizer`` is a :class:`bertfast.Tokenizer` (or transformers' fast tokenizer)."""
    questions, contexts = list(questions), list(contexts)
    if len(questions) != len(contexts):
        raise ValueError(f"qa_features: {len(questions)} question(s) but {len(contexts)} context(s)")
    if not questions:
        raise ValueError("qa_features: no questions")
    if answers is not None:
        answers = list(answers)
        if len(answers) != len(contexts):
            raise ValueError(f"qa_features: {len(answers)} answer(s) for {len(contexts)} context(s)")
        spans = [_answer_span(a, c, i) for i, (a, c) in enumerate(zip(answers, contexts))]
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding=True,
                    return_tensors="pt")
    example_index = torch.as_tensor(enc["overflow_to_sample_mapping"], dtype=torch.long)
    B = example_index.shape[0]
    offsets = []
    for r in range(B):
        seq = enc.sequence_ids(r)
        offsets.append([tuple(int(x) for x in o) if s == 1 else None
                        for o, s in zip(enc["offset_mapping"][r].tolist(), seq)])
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "token_type_ids": enc["token_type_ids"], "example_index": example_index, "offset_mapping": offsets}
    if answers is not None:
        starts, ends = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
        for r in range(B):
            span = spans[int(example_index[r])]
            tok = None if span is None else char_span_to_tokens(offsets[r], *span)
            if tok is not None:
                starts[r], ends[r] = tok
        out["start_positions"], out["end_positions"] = starts, ends
    return out


# ----------------------------------------------------------------------------- causal LM
def causal_lm_labels(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token labels: ``input_ids`` with -100 at padding.  Not shifted: the model compares
    ``labels[:, 1:]`` with ``logits[:, :-1]`` (as transformers' BertLMHeadModel does)."""
    labels = input_ids.clone().long()
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"causal_lm_labels: attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        labels[attention_mask == 0] = IGNORE_INDEX
    return labels


class CausalLMCollator(PaddingCollator):
    """``collate_fn`` for causal-LM training: :func:`pad_batch` plus :func:`causal_lm_labels`."""

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        batch = pad_batch([{k: v for k, v in f.items() if k != "labels"} for f in features], self.pad_token_id,
                          pad_to_multiple_of=self.pad_to_multiple_of)
        batch["labels"] = causal_lm_labels(batch["input_ids"], batch["attention_mask"])
        return batch
