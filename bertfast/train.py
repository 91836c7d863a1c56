"""Fine-tuning: ``bertfast.train(...)`` and ``bertfast finetune``.

    bertfast finetune --task classify --train train.jsonl --eval dev.jsonl --model minilm --out runs/sst
    bertfast finetune --task qa --train squad.jsonl --eval dev.jsonl --out runs/qa --epochs 2 --precision bf16
    bertfast finetune ... --out runs/sst --resume          # continue an interrupted run, nothing lost

    >>> import bertfast
    >>> result = bertfast.train("classify", "train.jsonl", "dev.jsonl", model="minilm", out="runs/sst")
    >>> result.metrics        # {'loss': ..., 'accuracy': ..., 'macro_f1': ...} of the last evaluation

Tasks, their head, the fields each JSONL line / CSV row needs (renamed with ``--*-field``) and
the evaluation metric:

==========  =================================  ==================================  ========================
task        head                               fields (default names)              metric
==========  =================================  ==================================  ========================
classify    BertForSequenceClassification      text, label                         accuracy, macro F1
pair        BertForSequenceClassification      text, text_pair, label              accuracy, macro F1
tokens      BertForTokenClassification         tokens (words), tags (one per word) token accuracy, F1
qa          BertForQuestionAnswering           question, context, answers          exact match, F1
mlm         BertForMaskedLM                    text                                masked accuracy, perplexity
causal-lm   BertLMHeadModel (is_decoder=True)  text                                perplexity
==========  =================================  ==================================  ========================

Data files (.jsonl, .csv, .tsv, .parquet; .txt lines are ``{"text": line}``) are read by
:mod:`bertfast.data`, as ``bertfast encode`` reads them; a null field, an empty label and a
null word are refused naming the file and line.  Labels / tags are strings or ints; their
names go into the checkpoint's config (``id2label``, ``label2id``; ``finetuning_task`` says
which task trained the head).  ``answers`` is ``{"text": str, "answer_start": int}`` (a character offset into
the context) or SQuAD's ``{"text": [...], "answer_start": [...]}``; in CSV files it is that
JSON as a string, and tokens / tags are whitespace-separated.

Written to ``--out``: the fine-tuned model (``save_pretrained``: transformers loads it) with its
tokenizer, ``metrics.json`` (every epoch's evaluation) and ``checkpoint/`` -- the latest training
state (model, optimizer, scheduler, RNG states, position in the data order), written at the end
of each epoch, every ``--save-steps`` optimizer steps, on Ctrl-C and at ``--stop-after-steps``.
``--resume`` continues from it and reaches the same weights, step count and losses as a run that
was never interrupted (fp32 on CPU, bit for bit), whenever the interruption came: SIGINT is held
back while an optimizer step is applied (with the position and RNG states that go with it),
and ``checkpoint`` is a symbolic link to ``checkpoint.XXXX/``, switched to a new complete
directory by one rename, so a process that dies while saving leaves the previous checkpoint.
``--no-checkpoint`` writes none (it holds the weights and AdamW's two moments: three times the
model's size), and the run cannot be resumed.

A batch with nothing to learn from (MLM that masked no token of its short texts, token tagging
with every label ignored) is skipped and counted: ``skipped_batches`` in each epoch's record
and a line on stderr.  A NaN or infinite loss of a batch that has targets stops the run.
Under torchrun (WORLD_SIZE > 1) ``bertfast finetune`` refuses to start.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import string
import sys
import tempfile
import threading
import time
import types
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from bertfast.collators import (
    IGNORE_INDEX, CausalLMCollator, LengthGroupedBatches, MLMCollator, align_labels, pad_batch, qa_features,
)
from bertfast.progress import Progress

__all__ = ["train", "TrainResult", "TASKS", "read_records", "run"]

TASKS = ("classify", "tokens", "pair", "qa", "mlm", "causal-lm")
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.json"
# settings a resumed run must share with the run it continues (else it would not be the same run)
_RESUME_KEYS = ("task", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "seed",
                "max_length", "stride", "mlm_probability", "whole_word", "label_all_subwords", "precision",
                "max_grad_norm")
DEFAULT_FIELDS = {"text_field": "text", "text_pair_field": "text_pair", "label_field": "label",
                  "tokens_field": "tokens", "tags_field": "tags", "question_field": "question",
                  "context_field": "context", "answers_field": "answers"}
_FIELDS_OF_TASK = {
    "classify": ("text_field", "label_field"),
    "pair": ("text_field", "text_pair_field", "label_field"),
    "tokens": ("tokens_field", "tags_field"),
    "qa": ("question_field", "context_field", "answers_field"),
    "mlm": ("text_field",),
    "causal-lm": ("text_field",),
}


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.  ``metrics``: the last evaluation (empty without an eval
    file); ``history``: one dict per epoch (``epoch``, ``train_loss``, eval metrics);
    ``stopped``: True when the run stopped early (``stop_after_steps``) with a checkpoint to resume."""
    output_dir: Path
    global_step: int
    total_steps: int
    metrics: Dict[str, float]
    history: List[Dict[str, float]]
    train_loss: float
    stopped: bool = False
    seconds: float = 0.0


# ============================================================================ reading data
class _Record(dict):
    """One example: its fields, plus where it came from (for error messages)."""
    source: str = ""
    line: int = 0


def read_records(path: Union[str, os.PathLike], fmt: Optional[str] = None) -> List[_Record]:
    """Every example of a data file, read by :class:`bertfast.data.DataFile` (the rules of every
    bertfast command: .jsonl objects, .csv / .tsv with a header row, .parquet, or .txt whose lines
    are ``{"text": line}``).  The format comes from the extension unless ``fmt`` is given.  Every
    problem is a one-line error naming the file and the line."""
    from bertfast.data import DEFAULT_COLUMN, DataFile

    data = DataFile(path, fmt, what="data")
    records: List[_Record] = []
    for row in data.rows():
        value = {DEFAULT_COLUMN: row.value} if data.format == "txt" else row.value
        if not isinstance(value, dict):
            raise ValueError(f"{data.where(row.line)}: expected a JSON object with named fields, got "
                             f"{type(value).__name__}")
        r = _Record(value)
        r.source, r.line = str(data.path), row.line
        records.append(r)
    if not records:
        raise ValueError(f"{data.path}: no examples")
    return records


def _field(rec: _Record, name: str, flag: str) -> Any:
    if name not in rec:
        have = ", ".join(map(str, rec)) or "none"
        raise ValueError(f"{rec.source}:{rec.line}: missing field {name!r} (fields: {have}; choose another with "
                         f"--{flag.replace('_', '-')})")
    if rec[name] is None:
        raise ValueError(f"{rec.source}:{rec.line}: field {name!r} is null (a JSON null or a missing CSV cell)")
    return rec[name]


def _text(rec, name, flag) -> str:
    v = _field(rec, name, flag)
    if not isinstance(v, str):
        raise ValueError(f"{rec.source}:{rec.line}: field {name!r} must be a string, got {type(v).__name__}")
    return v


def _words(rec, name, flag) -> List[Any]:
    v = _field(rec, name, flag)
    if isinstance(v, str):  # CSV: whitespace-separated
        v = v.split()
    if not isinstance(v, list) or not v:
        raise ValueError(f"{rec.source}:{rec.line}: field {name!r} must be a non-empty list, got {v!r}")
    for i, w in enumerate(v):
        if isinstance(w, bool) or not isinstance(w, (str, int, float)):
            raise ValueError(f"{rec.source}:{rec.line}: field {name!r}: item {i} is {json.dumps(w)}, not a word "
                             f"(str) or number")
    return v


def _label_key(v: Any, rec, name) -> Union[str, int]:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"{rec.source}:{rec.line}: field {name!r} must be a label name (str) or id (int), got {v!r}")
    if isinstance(v, str) and not v.strip():
        raise ValueError(f"{rec.source}:{rec.line}: field {name!r} is an empty label {v!r} (an empty CSV cell?)")
    return v


def _label_names(values: Sequence[Union[str, int]]) -> List[str]:
    """Sorted label names.  Integer labels (JSON ints, or CSV's strings of them) sort numerically,
    so labels 0..K-1 get themselves as ids whichever the file format; others (e.g. 1..5) get ids
    in their order -- never a class that no example has."""
    uniq = {str(v) for v in values}
    if all(re.fullmatch(r"-?[0-9]+", v) and str(int(v)) == v for v in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


# ============================================================================ options
@dataclasses.dataclass
class _Options:
    task: str
    train_file: str
    eval_file: Optional[str]
    model: str
    out: str
    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 128
    stride: int = 32
    mlm_probability: float = 0.15
    whole_word: bool = False
    label_all_subwords: bool = False
    precision: str = "fp32"
    seed: int = 0
    device: Optional[str] = None
    save_steps: int = 0
    stop_after_steps: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    checkpoint: bool = True
    progress: Optional[bool] = None
    fields: Dict[str, str] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_length < 4:
            raise ValueError(f"max_length must be >= 4 tokens, got {self.max_length}")
        for name in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm", "mlm_probability"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_ratio > 1 or not 0 < self.mlm_probability <= 1:
            raise ValueError("warmup_ratio must be in [0, 1] and mlm_probability in (0, 1]")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ValueError(f"stop_after_steps must be >= 1, got {self.stop_after_steps}")
        if not self.checkpoint:
            given = [flag for flag, on in (("resume", self.resume), ("save_steps", self.save_steps),
                                           ("stop_after_steps", self.stop_after_steps is not None)) if on]
            if given:
                raise ValueError(f"checkpoint=False (--no-checkpoint) writes no training state, so "
                                 f"{', '.join(given)} cannot apply")
        unknown = sorted(set(self.fields) - set(DEFAULT_FIELDS))
        if unknown:
            raise ValueError(f"unknown field option(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_FIELDS)}")

    def field(self, key: str) -> str:
        return self.fields.get(key) or DEFAULT_FIELDS[key]


# ============================================================================ tasks
class _Task:
    """What differs between tasks: the head, how records become features, the collator, the metric."""
    head = ""
    metric_names: tuple = ()

    def __init__(self, opts: _Options, tokenizer):
        self.opts, self.tok = opts, tokenizer
        self.labels: Optional[List[str]] = None

    def fit_labels(self, records: Sequence[_Record], config_labels: Optional[List[str]]) -> None:
        """Decide the label names (from the training data, or a fine-tuned checkpoint's config)."""

    def config_overrides(self) -> dict:
        if self.labels is None:
            return {}
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {n: i for i, n in enumerate(self.labels)}}

    def features(self, records: Sequence[_Record]) -> List[dict]:
        raise NotImplementedError

    def collate(self, feats: Sequence[dict], generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
        return pad_batch(feats, self.tok.pad_token_id)

    def has_targets(self, batch: Dict[str, Any]) -> bool:
        """Whether the batch has anything to learn from (per-token tasks: a labelled token; a
        loss over no token is 0 / 0 = NaN).  Read from the labels on the host, before any forward."""
        return True

    def evaluate(self, model, records, feats, batches, run_batch) -> Dict[str, float]:
        raise NotImplementedError

    def _outputs(self, feats, batches, run_batch, generator=None):
        """(example indices, collated batch, model output) for each evaluation batch."""
        for idx in batches:
            batch = self.collate([feats[i] for i in idx], generator)
            yield idx, batch, run_batch(batch)

    def _label_id(self, v, rec, name) -> int:
        key = str(_label_key(v, rec, name))
        if key not in self.label2id:
            raise ValueError(f"{rec.source}:{rec.line}: label {v!r} of field {name!r} is not one of the "
                             f"training labels ({', '.join(self.labels)})")
        return self.label2id[key]

    def _set_labels(self, names: List[str], config_labels: Optional[List[str]]) -> None:
        if config_labels and set(names) <= set(config_labels):
            names = list(config_labels)  # keep a fine-tuned checkpoint's label ids
        if len(names) < 2:
            raise ValueError(f"the training data has {len(names)} label(s) ({', '.join(names)}); need at least 2")
        self.labels = names
        self.label2id = {n: i for i, n in enumerate(names)}


def _macro_f1(pred: Sequence[int], gold: Sequence[int], classes: Sequence[int]) -> float:
    f1s = []
    present = set(pred) | set(gold)  # as scikit-learn: a class neither predicted nor in the gold set is left out
    for c in (c for c in classes if c in present):
        tp = sum(1 for p, g in zip(pred, gold) if p == c and g == c)
        fp = sum(1 for p, g in zip(pred, gold) if p == c and g != c)
        fn = sum(1 for p, g in zip(pred, gold) if p != c and g == c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return sum(f1s) / len(f1s) if f1s else 0.0


class _Classify(_Task):
    head = "BertForSequenceClassification"
    pair = False

    def _label_field(self):
        return self.opts.field("label_field")

    def fit_labels(self, records, config_labels):
        name = self._label_field()
        self._set_labels(_label_names([_label_key(_field(r, name, "label_field"), r, name) for r in records]),
                         config_labels)

    def features(self, records):
        tf, pf, lf = self.opts.field("text_field"), self.opts.field("text_pair_field"), self._label_field()
        texts = [_text(r, tf, "text_field") for r in records]
        pairs = [_text(r, pf, "text_pair_field") for r in records] if self.pair else None
        labels = [self._label_id(_field(r, lf, "label_field"), r, lf) for r in records]
        enc = self.tok(texts, pairs, truncation=True, max_length=self.opts.max_length, padding=False,
                       return_tensors=None)
        return [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i], "labels": labels[i]}
                for i in range(len(records))]

    def evaluate(self, model, records, feats, batches, run_batch):
        pred, gold, loss, n = [], [], 0.0, 0
        for idx, batch, out in self._outputs(feats, batches, run_batch):
            loss += float(out.loss) * len(idx)
            n += len(idx)
            pred += out.logits.argmax(-1).tolist()
            gold += batch["labels"].tolist()
        acc = sum(p == g for p, g in zip(pred, gold)) / len(gold)
        return {"loss": loss / n, "accuracy": acc, "macro_f1": _macro_f1(pred, gold, range(len(self.labels)))}


class _Pair(_Classify):
    pair = True


def _any_label(labels: torch.Tensor) -> bool:
    return bool((labels != IGNORE_INDEX).any())


class _Tokens(_Task):
    head = "BertForTokenClassification"

    def has_targets(self, batch):
        return _any_label(batch["labels"])

    def fit_labels(self, records, config_labels):
        name = self.opts.field("tags_field")
        tags = [_label_key(t, r, name) for r in records for t in _words(r, name, "tags_field")]
        self._set_labels(_label_names(tags), config_labels)
        self.outside = self.label2id.get("O")  # NER's outside tag: F1 leaves it out

    def features(self, records):
        wf, tf = self.opts.field("tokens_field"), self.opts.field("tags_field")
        words, tags = [], []
        for r in records:
            w = [str(x) for x in _words(r, wf, "tokens_field")]
            t = [self._label_id(x, r, tf) for x in _words(r, tf, "tags_field")]
            if len(w) != len(t):
                raise ValueError(f"{r.source}:{r.line}: {len(w)} word(s) in {wf!r} but {len(t)} tag(s) in {tf!r}")
            words.append(w)
            tags.append(t)
        enc = self.tok(words, is_split_into_words=True, truncation=True, max_length=self.opts.max_length,
                       padding=False, return_tensors=None)
        return [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                 "labels": align_labels(enc.word_ids(i), tags[i], label_all_subwords=self.opts.label_all_subwords)}
                for i in range(len(records))]

    def evaluate(self, model, records, feats, batches, run_batch):
        pred, gold, loss, n = [], [], 0.0, 0
        for _, batch, out in self._outputs(feats, batches, run_batch):
            labels = batch["labels"]
            keep = labels != IGNORE_INDEX
            k = int(keep.sum())
            loss += float(out.loss) * k
            n += k
            pred += out.logits.argmax(-1)[keep].tolist()
            gold += labels[keep].tolist()
        acc = sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)
        o = self.outside
        tp = sum(1 for p, g in zip(pred, gold) if p == g and g != o)
        n_pred = sum(1 for p in pred if p != o)
        n_gold = sum(1 for g in gold if g != o)
        f1 = 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 1.0
        return {"loss": loss / max(n, 1), "accuracy": acc, "f1": f1}


# --- QA: SQuAD's answer normalisation and scores
_PUNCTUATION = frozenset(string.punctuation)


def _normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _span_f1(pred: str, gold: str) -> float:
    p, g = _normalize_answer(pred).split(), _normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


class _QA(_Task):
    head = "BertForQuestionAnswering"
    max_answer_len = 30

    def _columns(self, records):
        qf, cf, af = (self.opts.field(k) for k in ("question_field", "context_field", "answers_field"))
        qs = [_text(r, qf, "question_field") for r in records]
        cs = [_text(r, cf, "context_field") for r in records]
        ans = []
        for r in records:
            a = _field(r, af, "answers_field")
            if isinstance(a, str):  # CSV: the answers dict as JSON
                try:
                    a = json.loads(a)
                except json.JSONDecodeError:
                    raise ValueError(f"{r.source}:{r.line}: field {af!r} must be JSON "
                                     f'{{"text": ..., "answer_start": ...}}, got {a[:40]!r}') from None
            ans.append(a)
        return qs, cs, ans

    def features(self, records):
        qs, cs, ans = self._columns(records)
        try:
            f = qa_features(self.tok, qs, cs, ans, max_length=self.opts.max_length, stride=self.opts.stride)
        except ValueError as e:  # name the line: "answers[3]" -> the record's file and line
            m = re.search(r"answers\[(\d+)\]", str(e))
            if m:
                r = records[int(m.group(1))]
                raise ValueError(f"{r.source}:{r.line}: {e}") from None
            raise
        feats = []
        for r in range(f["input_ids"].shape[0]):
            n = int(f["attention_mask"][r].sum())
            feats.append({"input_ids": f["input_ids"][r, :n].tolist(), "token_type_ids": f["token_type_ids"][r, :n].tolist(),
                          "start_positions": int(f["start_positions"][r]), "end_positions": int(f["end_positions"][r]),
                          "example_index": int(f["example_index"][r]), "offsets": f["offset_mapping"][r][:n]})
        return feats

    def config_overrides(self):
        return {"num_labels": 2, "id2label": None, "label2id": None}

    def collate(self, feats, generator=None):
        return pad_batch([{k: v for k, v in f.items() if k not in ("offsets", "example_index")} for f in feats],
                         self.tok.pad_token_id)

    def evaluate(self, model, records, feats, batches, run_batch):
        from bertfast.qa import best_span

        _, contexts, answers = self._columns(records)

        best: Dict[int, tuple] = {}
        loss, n = 0.0, 0
        for idx, batch, out in self._outputs(feats, batches, run_batch):
            loss += float(out.loss) * len(idx)
            n += len(idx)
            for row, i in enumerate(idx):
                offs = feats[i]["offsets"]
                mask = torch.tensor([o is not None for o in offs] + [False] * (batch["input_ids"].shape[1] - len(offs)))
                if not mask.any():
                    continue
                s, e, score = best_span(out.start_logits[row].float(), out.end_logits[row].float(),
                                        max_answer_len=self.max_answer_len, mask=mask)
                ex = feats[i]["example_index"]
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, contexts[ex][offs[s][0]:offs[e][1]])
        em = f1 = 0.0
        for ex, a in enumerate(answers):
            golds = [""] if a is None else (a["text"] if isinstance(a["text"], list) else [a["text"]])
            golds = golds or [""]
            pred = best.get(ex, (0.0, ""))[1]
            em += max(float(_normalize_answer(pred) == _normalize_answer(g)) for g in golds)
            f1 += max(_span_f1(pred, g) for g in golds)
        k = len(answers)
        return {"loss": loss / max(n, 1), "exact_match": em / k, "f1": f1 / k}


def _lm_metrics(outputs, shift: bool, accuracy_name: str) -> Dict[str, float]:
    """Loss (mean NLL over the labelled tokens), accuracy and perplexity of a language-model head
    over the evaluation batches; ``shift``: position t predicts token t + 1 (causal LM)."""
    nll, correct, n = 0.0, 0, 0
    for _, batch, out in outputs:
        labels = batch["labels"].to(out.logits.device)
        logits = out.logits
        if shift:
            labels, logits = labels[:, 1:], logits[:, :-1]
        keep = labels != IGNORE_INDEX
        logits = logits[keep].float()  # (M, V)
        nll += float(torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"))
        correct += int((logits.argmax(-1) == labels[keep]).sum())
        n += int(keep.sum())
    mean = nll / max(n, 1)
    return {"loss": mean, accuracy_name: correct / max(n, 1), "perplexity": math.exp(min(mean, 700.0))}


class _MLM(_Task):
    head = "BertForMaskedLM"
    eval_seed = 12345  # the eval set is masked the same way every epoch

    def __init__(self, opts, tokenizer):
        super().__init__(opts, tokenizer)
        self.collator = MLMCollator(tokenizer, opts.mlm_probability, whole_word=opts.whole_word)

    def features(self, records):
        tf = self.opts.field("text_field")
        texts = [_text(r, tf, "text_field") for r in records]
        enc = self.tok(texts, truncation=True, max_length=self.opts.max_length, padding=False, return_tensors=None)
        feats = []
        for i in range(len(texts)):
            f = {"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i]}
            if self.opts.whole_word:
                f["word_ids"] = enc.word_ids(i)
            feats.append(f)
        return feats

    def collate(self, feats, generator=None):
        return self.collator(feats, generator=generator)

    def has_targets(self, batch):
        return _any_label(batch["labels"])

    def evaluate(self, model, records, feats, batches, run_batch):
        g = torch.Generator().manual_seed(self.eval_seed)
        return _lm_metrics(self._outputs(feats, batches, run_batch, g), shift=False, accuracy_name="masked_accuracy")


class _CausalLM(_Task):
    head = "BertLMHeadModel"

    def __init__(self, opts, tokenizer):
        super().__init__(opts, tokenizer)
        self.collator = CausalLMCollator(tokenizer.pad_token_id)

    def config_overrides(self):
        return {"is_decoder": True}

    def features(self, records):
        tf = self.opts.field("text_field")
        texts = [_text(r, tf, "text_field") for r in records]
        enc = self.tok(texts, truncation=True, max_length=self.opts.max_length, padding=False, return_tensors=None)
        return [{"input_ids": enc["input_ids"][i]} for i in range(len(texts))]

    def collate(self, feats, generator=None):
        return self.collator(feats)

    def has_targets(self, batch):  # position t predicts token t + 1: the labels from position 1 on
        return _any_label(batch["labels"][:, 1:])

    def evaluate(self, model, records, feats, batches, run_batch):
        return _lm_metrics(self._outputs(feats, batches, run_batch), shift=True, accuracy_name="next_token_accuracy")


_TASK_CLASSES = {"classify": _Classify, "pair": _Pair, "tokens": _Tokens, "qa": _QA, "mlm": _MLM,
                 "causal-lm": _CausalLM}


# ============================================================================ state
@dataclasses.dataclass(eq=False)
class _Boundary:
    """Where the last optimizer step left the run: the position of the next micro-batch, the RNG
    states then, and the epoch's running loss and skipped-batch count (a checkpoint's contents
    beside the model, optimizer and scheduler)."""
    epoch: int
    batch_pos: int
    rng: dict
    loss_sum: float
    loss_count: int
    skipped: int


@contextlib.contextmanager
def _held_sigint():
    """Hold SIGINT (Ctrl-C, ``kill -INT``) back while the block runs and deliver it when the
    block is done, so that an optimizer step (weights, optimizer, scheduler, step count and
    position) is never interrupted half applied.  Only the main thread can handle signals;
    elsewhere, or when Python does not own the SIGINT handler, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed outside Python: cannot be put back
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:  # the block finished: now the interruption, as it would have come
        if callable(previous):
            previous(signal.SIGINT, received[0])
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _model_class(name: str):
    import bertfast

    if not hasattr(bertfast.modeling, name):
        raise ValueError(f"this bertfast has no {name} (needed for this task)")
    return getattr(bertfast.modeling, name)


def _batch_to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


# ============================================================================ the loop
def train(task: str, train_file: Union[str, os.PathLike], eval_file: Union[None, str, os.PathLike] = None, *,
          model: Union[str, os.PathLike] = "minilm", out: Union[str, os.PathLike] = "bertfast-finetuned",
          epochs: int = 3, batch_size: int = 16, eval_batch_size: int = 64, grad_accum: int = 1, lr: float = 5e-5,
          weight_decay: float = 0.01, warmup_ratio: float = 0.1, max_grad_norm: float = 1.0, max_length: int = 128,
          stride: int = 32, mlm_probability: float = 0.15, whole_word: bool = False,
          label_all_subwords: bool = False, precision: str = "fp32", seed: int = 0, device=None,
          save_steps: int = 0, stop_after_steps: Optional[int] = None, resume: bool = False,
          overwrite: bool = False, checkpoint: bool = True, progress: Optional[bool] = None,
          **fields: str) -> TrainResult:
    """Fine-tune ``model`` (a checkpoint directory or "minilm") on ``task`` from ``train_file``
    (JSONL / CSV), evaluating on ``eval_file`` after every epoch; write the result to ``out``.

    ``fields``: the field names, e.g. ``text_field="sentence"``, ``label_field="y"`` (see the
    module docstring for each task's fields).  ``grad_accum`` micro-batches make one optimizer
    step (AdamW, linear warm-up over ``warmup_ratio`` of the steps then linear decay, gradient
    norm clipped at ``max_grad_norm``).  ``precision="bf16"`` runs forward and loss under bf16
    autocast (weights and optimizer stay fp32).  ``seed`` fixes the head's initialisation, the
    data order, dropout and MLM masking.  ``stop_after_steps`` stops (checkpointed) after that
    many optimizer steps in all, as an interruption would; ``resume=True`` continues from
    ``out/checkpoint``; ``checkpoint=False`` writes no ``checkpoint/`` at all (it holds the
    weights and AdamW's two moments, three times the model's size), so the run cannot be
    resumed.  Not under torchrun: every rank would train the same model into the same ``out``
    (use DDP in a training loop of your own).  ``progress``: show the progress line on stderr
    (default: on a terminal; a few plain lines otherwise, ``False`` for none)."""
    opts = _Options(task=task, train_file=str(train_file), eval_file=None if eval_file is None else str(eval_file),
                    model=str(model), out=str(out), epochs=epochs, batch_size=batch_size,
                    eval_batch_size=eval_batch_size, grad_accum=grad_accum, lr=float(lr),
                    weight_decay=float(weight_decay), warmup_ratio=float(warmup_ratio),
                    max_grad_norm=float(max_grad_norm), max_length=max_length, stride=stride,
                    mlm_probability=float(mlm_probability), whole_word=bool(whole_word),
                    label_all_subwords=bool(label_all_subwords), precision=precision, seed=int(seed),
                    device=None if device is None else str(device), save_steps=int(save_steps or 0),
                    stop_after_steps=stop_after_steps, resume=bool(resume), overwrite=bool(overwrite),
                    checkpoint=bool(checkpoint), progress=progress,
                    fields={k: v for k, v in fields.items() if v is not None})
    opts.check()
    _refuse_torchrun()
    return _Trainer(opts).run()


def _refuse_torchrun() -> None:
    """bertfast finetune trains in one process: under torchrun every rank would run the same
    training and write the same --out."""
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if world != "1":
        raise ValueError(f"bertfast finetune trains in one process, but WORLD_SIZE={world} (torchrun): every rank "
                         f"would train the same model into the same --out; run it without torchrun (for "
                         f"data-parallel training, wrap a bertfast model in DDP in your own training loop)")


class _Trainer:
    def __init__(self, opts: _Options):
        from bertfast.loading import resolve_model_path
        from bertfast.sentence import parse_device
        from bertfast.tokenization import Tokenizer

        self.opts = opts
        self.err = sys.stderr
        self.device = parse_device(opts.device)
        self.out = Path(opts.out)
        self.ckpt = self.out / CHECKPOINT_DIR
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file, not a directory")
        self.state = None
        if opts.resume:
            if not (self.ckpt / STATE_FILE).is_file():
                raise FileNotFoundError(f"nothing to resume: {self.ckpt / STATE_FILE} does not exist "
                                        f"(run without --resume first)")
            try:
                self.state = torch.load(self.ckpt / STATE_FILE, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file: pickle / zip / torch errors
                raise ValueError(f"cannot read the training state {self.ckpt / STATE_FILE}: {e}") from None
            saved = self.state["options"]
            diff = [f"{k}={getattr(opts, k)!r} (checkpoint: {saved.get(k)!r})" for k in _RESUME_KEYS
                    if saved.get(k) != getattr(opts, k)]
            if diff:
                raise ValueError(f"--resume with settings other than the interrupted run's: {', '.join(diff)}")
        elif (self.ckpt / STATE_FILE).is_file() and not opts.overwrite:
            raise ValueError(f"{self.out} already holds a training run; pass --resume to continue it or "
                                  f"--overwrite to start over")
        # the directory the checkpoint link points at now (later saves point the link elsewhere)
        model_dir = self.ckpt.resolve() if self.state is not None else resolve_model_path(opts.model)
        self.model_dir = Path(model_dir)
        self.tok = Tokenizer.from_pretrained(self.model_dir, max_length=None)
        self.task = _TASK_CLASSES[opts.task](opts, self.tok)

    # ------------------------------------------------------------------ setup
    def _load(self):
        opts, task = self.opts, self.task
        from bertfast.loading import load_config

        train_records = read_records(opts.train_file)
        eval_records = read_records(opts.eval_file) if opts.eval_file else None
        config = load_config(self.model_dir)
        if opts.max_length > config.max_position_embeddings:
            raise ValueError(f"max_length={opts.max_length} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
        names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else None
        task.fit_labels(train_records, names)
        self.train_feats = task.features(train_records)
        self.eval_records = eval_records
        self.eval_feats = task.features(eval_records) if eval_records else None
        torch.manual_seed(opts.seed)  # a new head's initialisation
        cls = _model_class(task.head)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = cls.from_pretrained(self.model_dir, **task.config_overrides())
        for w in caught:
            if "newly initialised" in str(w.message) or "has no pooler" in str(w.message):
                print(f"bertfast finetune: {w.message}", file=self.err)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        model.config.extra["finetuning_task"] = opts.task  # as transformers names it: what the head learned
        self.model = model.to(self.device)
        lengths = [len(f["input_ids"]) for f in self.train_feats]
        self.sampler = LengthGroupedBatches(lengths, opts.batch_size, seed=opts.seed)
        self.batches_per_epoch = len(self.sampler)
        self.steps_per_epoch = -(-self.batches_per_epoch // opts.grad_accum)
        self.total_steps = self.steps_per_epoch * opts.epochs
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.dim() < 2 or "LayerNorm" in n or n.endswith(".bias") else decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
        warmup = int(round(opts.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(warmup, self.total_steps))

    def _eval_batches(self) -> List[List[int]]:
        n = len(self.eval_feats)
        order = sorted(range(n), key=lambda i: -len(self.eval_feats[i]["input_ids"]))
        bs = self.opts.eval_batch_size
        return [order[i:i + bs] for i in range(0, n, bs)]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.opts.precision == "bf16")

    def _run_batch(self, batch):
        with self._autocast():
            return self.model(**_batch_to(batch, self.device))

    def evaluate(self) -> Dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model, self.eval_records, self.eval_feats, self._eval_batches(),
                                         self._run_batch)
        self.model.train()
        return {k: float(v) for k, v in metrics.items()}

    # ------------------------------------------------------------------ checkpoints
    def _save_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tok.save_pretrained(directory)

    def _save_checkpoint(self, b: "_Boundary") -> None:
        """Everything the next step needs: weights, optimizer, scheduler, RNG states, position.

        Written to a new directory ``checkpoint.XXXX``; then ``checkpoint`` (a symbolic link) is
        pointed at it by one rename (``os.replace`` of a new link onto the old one), and the
        previous directory removed.  So whenever the process dies, ``checkpoint`` is the old
        state or the new one, whole."""
        if not self.opts.checkpoint:
            return
        self._remove_stale_checkpoints()
        new = Path(tempfile.mkdtemp(prefix=CHECKPOINT_DIR + ".", dir=self.out))
        self._save_model(new)
        torch.save({"options": dataclasses.asdict(self.opts), "epoch": b.epoch, "batch_pos": b.batch_pos,
                    "global_step": self.global_step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": b.rng, "history": self.history,
                    "loss_sum": b.loss_sum, "loss_count": b.loss_count, "skipped": b.skipped,
                    "last_loss": self.last_loss}, new / STATE_FILE)
        old = self._checkpoint_target()
        if self.ckpt.is_dir() and not self.ckpt.is_symlink():
            # a checkpoint directory of an older bertfast: a directory cannot be replaced by a link in
            # one step, so it is moved aside first (the one save whose death can leave no checkpoint)
            old = Path(tempfile.mkdtemp(prefix=CHECKPOINT_DIR + ".", dir=self.out))
            self.ckpt.rename(old)
        link = self.out / f".{CHECKPOINT_DIR}.link-{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(new.name, link)  # relative: the output directory may be moved
        os.replace(link, self.ckpt)  # the one step that switches to the new state
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._saved = b

    def _checkpoint_target(self) -> Optional[Path]:
        """The directory ``checkpoint`` points at (None when there is no checkpoint link)."""
        if not self.ckpt.is_symlink():
            return None
        return self.out / os.readlink(self.ckpt)

    def _remove_stale_checkpoints(self) -> None:
        """Directories and links of saves that a dead process left half written."""
        keep = self._checkpoint_target()
        for p in self.out.glob(CHECKPOINT_DIR + ".*"):  # checkpoint.XXXX (also an older bertfast's .tmp / .old)
            if p.is_dir() and not p.is_symlink() and (keep is None or p.name != keep.name):
                shutil.rmtree(p, ignore_errors=True)
        for p in self.out.glob(f".{CHECKPOINT_DIR}.link-*"):
            p.unlink(missing_ok=True)

    def _remove_checkpoint(self) -> None:
        """Start over (--overwrite): the checkpoint of the earlier run goes."""
        target = self._checkpoint_target()
        if self.ckpt.is_symlink():
            self.ckpt.unlink()
        elif self.ckpt.is_dir():
            shutil.rmtree(self.ckpt)
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)
        self._remove_stale_checkpoints()

    def _write_metrics(self) -> None:
        with open(self.out / METRICS_FILE, "w", encoding="utf-8") as f:
            json.dump({"task": self.opts.task, "global_step": self.global_step, "total_steps": self.total_steps,
                       "history": self.history}, f, indent=2)

    # ------------------------------------------------------------------ run
    def _batch_generator(self, epoch: int, pos: int) -> torch.Generator:
        """The MLM masking of batch ``pos`` of ``epoch``: a function of the seed and position only,
        so a resumed run masks exactly as an uninterrupted one."""
        return torch.Generator().manual_seed((self.opts.seed * 1_000_003 + epoch) * 1_000_003 + pos)

    def _progress(self, epoch: int, done: int) -> Progress:
        """The progress line of one epoch (``done`` batches of it already done): batches, running
        loss, examples/s and tokens/s; shown unless ``progress=False``."""
        return Progress(self.batches_per_epoch, f"epoch {epoch + 1}/{self.opts.epochs}", unit="batches", done=done,
                        show=self.opts.progress is not False, stream=self.err, rates=("examples", "tokens"))

    def run(self) -> TrainResult:
        opts = self.opts
        t0 = time.perf_counter()
        self._load()
        self.out.mkdir(parents=True, exist_ok=True)
        self.history: List[Dict[str, float]] = []
        self.global_step, start_epoch, start_pos = 0, 0, 0
        loss_sum, loss_count, skipped = 0.0, 0, 0
        self.last_loss = last_value = float("nan")
        if self.state is not None:
            st = self.state
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
            self.global_step, start_epoch, start_pos = st["global_step"], st["epoch"], st["batch_pos"]
            self.history, loss_sum, loss_count = list(st["history"]), st["loss_sum"], st["loss_count"]
            skipped = st.get("skipped", 0)
            self.last_loss = st["last_loss"]
            _set_rng_state(st["rng"])
            print(f"bertfast finetune: resuming at step {self.global_step}/{self.total_steps} "
                  f"(epoch {start_epoch + 1}, batch {start_pos})", file=self.err)
        else:
            if opts.overwrite:
                self._remove_checkpoint()
            torch.manual_seed(opts.seed)
            random.seed(opts.seed)
        self.model.train()
        stopped = False
        # the state at the last optimizer step: what a checkpoint holds.  The live model, optimizer,
        # scheduler and step count change only inside _held_sigint() blocks, together with it, so
        # an interruption anywhere saves weights and position of one and the same step
        boundary = _Boundary(start_epoch, start_pos, _rng_state(), loss_sum, loss_count, skipped)
        self._saved: Optional[_Boundary] = None
        try:
            for epoch in range(start_epoch, opts.epochs):
                batches = self.sampler.batches(epoch)
                pos0 = start_pos if epoch == start_epoch else 0
                if epoch != start_epoch:
                    loss_sum, loss_count, skipped = 0.0, 0, 0
                bar = self._progress(epoch, pos0)
                self.optimizer.zero_grad(set_to_none=True)
                for pos in range(pos0, len(batches)):
                    idx = batches[pos]
                    # the micro-batches of this optimizer step (the last step of an epoch may have fewer)
                    group0 = (pos // opts.grad_accum) * opts.grad_accum
                    n_group = min(opts.grad_accum, len(batches) - group0)
                    batch = self.task.collate([self.train_feats[i] for i in idx], self._batch_generator(epoch, pos))
                    if self.task.has_targets(batch):
                        out = self._run_batch(batch)
                        loss = out.loss.float()
                        loss_value = float(loss.detach())  # the one host sync of the micro-batch
                        if not math.isfinite(loss_value):
                            raise ValueError(f"the loss is {loss_value} at step {self.global_step + 1} "
                                             f"(epoch {epoch + 1}, batch {pos}); try a lower --lr")
                        (loss / n_group).backward()
                        loss_sum += loss_value
                        loss_count += 1
                        last_value = loss_value
                        bar.loss = loss_sum / loss_count
                    else:  # nothing to learn from (e.g. MLM masked no token of these short texts)
                        skipped += 1
                    bar.examples += len(idx)
                    bar.tokens += int(batch["attention_mask"].sum())
                    if pos - group0 + 1 == n_group:  # the step
                        with _held_sigint():
                            if opts.max_grad_norm > 0:
                                torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts.max_grad_norm)
                            self.optimizer.step()
                            self.scheduler.step()
                            self.optimizer.zero_grad(set_to_none=True)
                            self.global_step += 1
                            self.last_loss = last_value
                            boundary = _Boundary(epoch, pos + 1, _rng_state(), loss_sum, loss_count, skipped)
                            stop = opts.stop_after_steps is not None and self.global_step >= opts.stop_after_steps
                            if stop or (opts.save_steps and self.global_step % opts.save_steps == 0):
                                self._save_checkpoint(boundary)
                        if stop:
                            stopped = True
                            break
                    bar.update(1)
                bar.close()
                if stopped:
                    print(f"bertfast finetune: stopped after step {self.global_step}/{self.total_steps}; "
                          f"continue with --resume", file=self.err)
                    break
                record = {"epoch": epoch + 1, "step": self.global_step, "train_loss": loss_sum / max(loss_count, 1),
                          "skipped_batches": skipped}
                if self.eval_feats:
                    record.update(self.evaluate())
                with _held_sigint():  # the epoch's end: history, metrics.json and checkpoint together
                    self.history.append(record)
                    if skipped:
                        print(f"bertfast finetune: epoch {epoch + 1}: skipped {skipped} of {len(batches)} batches "
                              f"with no labelled token (nothing to learn from)", file=self.err)
                    print("bertfast finetune: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in record.items()), file=self.err)
                    self._write_metrics()
                    boundary = _Boundary(epoch + 1, 0, _rng_state(), 0.0, 0, 0)
                    self._save_checkpoint(boundary)
            if not stopped:  # interrupted while writing it: --resume writes it again
                self._save_model(self.out)
        except KeyboardInterrupt:  # keep everything up to the last optimizer step
            if not opts.checkpoint:
                print(f"\nbertfast finetune: interrupted at step {self.global_step}; no checkpoint written "
                      f"(--no-checkpoint): the run cannot be resumed", file=self.err)
                raise
            if self._saved is not boundary:
                self._save_checkpoint(boundary)
            print(f"\nbertfast finetune: interrupted; checkpoint at step {self.global_step} in {self.ckpt} "
                  f"(continue with --resume)", file=self.err)
            raise
        metrics = {k: v for k, v in (self.history[-1] if self.history else {}).items()
                   if k not in ("epoch", "step", "train_loss", "skipped_batches")}
        train_loss = self.history[-1]["train_loss"] if self.history and not stopped else (
            loss_sum / max(loss_count, 1))
        return TrainResult(output_dir=self.out, global_step=self.global_step, total_steps=self.total_steps,
                           metrics=metrics, history=list(self.history), train_loss=float(train_loss),
                           stopped=stopped, seconds=time.perf_counter() - t0)


# ============================================================================ CLI
def run(args) -> int:
    """``bertfast finetune`` with the arguments bertfast/cli/train.py parsed; prints a JSON summary."""
    fields = {k: getattr(args, k) for k in DEFAULT_FIELDS if getattr(args, k, None) is not None}
    unused = sorted(set(fields) - set(_FIELDS_OF_TASK[args.task]))
    if unused:
        raise ValueError(f"--task {args.task} does not read {', '.join('--' + k.replace('_', '-') for k in unused)}")
    result = train(args.task, args.train, args.eval, model=args.model, out=args.out, epochs=args.epochs,
                   batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, grad_accum=args.grad_accum,
                   lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                   max_grad_norm=args.max_grad_norm, max_length=args.max_length, stride=args.stride,
                   mlm_probability=args.mlm_probability, whole_word=args.whole_word,
                   label_all_subwords=args.label_all_subwords, precision=args.precision, seed=args.seed,
                   device=args.device, save_steps=args.save_steps, stop_after_steps=args.stop_after_steps,
                   resume=args.resume, overwrite=args.overwrite, checkpoint=args.checkpoint, progress=args.progress,
                   **fields)
    summary = {"output_dir": str(result.output_dir), "global_step": result.global_step,
               "total_steps": result.total_steps, "stopped": result.stopped, "train_loss": result.train_loss,
               "metrics": result.metrics, "seconds": round(result.seconds, 2)}
    print(json.dumps(summary))
    return 0


# ``bertfast.train(...)`` works whether ``bertfast.train`` resolved to this function (the lazy
# export) or to this module (after ``import bertfast.train``, e.g. by the CLI)
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
