"""Inference for every BERT task, from Python and from the command line.

    >>> from bertfast import tasks
    >>> tasks.fill_mask("path/to/mlm-checkpoint", "Paris is the [MASK] of France.", top=5)
    >>> tasks.classify("path/to/sst2-checkpoint", ["great film", "dull film"])
    >>> tasks.tag("path/to/ner-checkpoint", "Ada Lovelace lived in London")
    >>> tasks.answer("Where did she live?", "Ada Lovelace lived in London.", "path/to/qa-checkpoint")
    >>> tasks.generate("path/to/causal-lm-checkpoint", "the weather is", max_new_tokens=10)

Each entry point takes a checkpoint directory or name (loaded with its tokenizer) or a model
already loaded (then pass ``tokenizer=``; :func:`load` gives both).  Label names come from the
checkpoint's ``config.id2label``.

A checkpoint with no trained head for the task is refused before any model is built, in one
line naming the missing weights, e.g. ``checkpoint minilm (...) has no trained
question-answering head (missing qa_outputs.weight, qa_outputs.bias)``: all-MiniLM-L6-v2
(``minilm``) is a sentence encoder and ships no head at all, so every task here refuses it, and
their commands have no default ``--model`` (it is required); fine-tune one with ``bertfast
finetune`` first.  ``classify`` warns when a checkpoint fine-tuned on single texts is given pairs
(or the reverse): ``bertfast finetune`` writes the task to the config's ``finetuning_task``.  The keys are read from the weights file's header
(``bertfast.loading.read_header``): nothing is built or read for a refused checkpoint.  A
checkpoint whose ``config.architectures`` names another BERT head (e.g. a sequence classifier
given to ``tag``, whose ``classifier.*`` weights have the same names) is refused too.

CLI (``bertfast <command> --help``; parsed and printed by bertfast/cli/tasks.py)::

    bertfast fill-mask "Paris is the [MASK] of France." --top 5 --model DIR
    bertfast classify TEXT... [--pair TEXT]... --model DIR
    bertfast tag TEXT --model DIR
    bertfast answer --question Q --context C --model DIR
    bertfast generate PROMPT --max-new-tokens N [--top-k K [--seed S] [--temperature T]] --model DIR

Each takes ``--json`` (machine-readable output) and the model options of ``bertfast encode``
(``--model``, ``--device``, ``--dtype``, ``--max-length``, ``--backend``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["fill_mask", "classify", "tag", "answer", "generate", "load", "check_head"]

ModelArg = Union[str, os.PathLike, torch.nn.Module]
BATCH = 32  # texts per forward (classify)

# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class _Task:
    cls_name: str  # the bertfast.modeling class that runs it
    head: str  # what the refusal message calls its head
    architectures: Tuple[str, ...]  # config.architectures values that hold this head


_TASKS: Dict[str, _Task] = {
    "fill-mask": _Task("BertForMaskedLM", "masked-LM", ("BertForMaskedLM", "BertForPreTraining")),
    "classify": _Task("BertForSequenceClassification", "sequence-classification", ("BertForSequenceClassification",)),
    "tag": _Task("BertForTokenClassification", "token-classification", ("BertForTokenClassification",)),
    "answer": _Task("BertForQuestionAnswering", "question-answering", ("BertForQuestionAnswering",)),
    "generate": _Task("BertLMHeadModel", "causal-LM", ("BertLMHeadModel",)),
}
# BERT architectures that name a head: a checkpoint listing one of them (and none of the task's) is refused
_KNOWN_HEADS = {"BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification", "BertForTokenClassification",
                "BertForQuestionAnswering", "BertLMHeadModel", "BertForNextSentencePrediction",
                "BertForMultipleChoice"}


def head_keys(task: str, config) -> List[str]:
    """The weights a checkpoint must hold for ``task`` beyond the encoder (as transformers names
    them; the tied MLM decoder is the word-embedding matrix and needs no key of its own)."""
    if task in ("fill-mask", "generate"):
        keys = ["cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
                "cls.predictions.bias"]
        return keys + ([] if config.tie_word_embeddings else ["cls.predictions.decoder.weight"])
    if task == "classify":
        return ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    if task == "tag":
        return ["classifier.weight", "classifier.bias"]
    if task == "answer":
        return ["qa_outputs.weight", "qa_outputs.bias"]
    raise ValueError(f"unknown task {task!r}; known: {', '.join(_TASKS)}")


def check_head(model: Union[str, os.PathLike], task: str):
    """Refuse, before anything is built, a checkpoint without a trained head for ``task``: a
    ``CheckpointError`` in one line naming the missing weights (or the architecture it holds
    instead).  Returns (checkpoint directory, its BertConfig)."""
    from bertfast.loading import CheckpointError, load_config, normalize_keys, read_header, resolve_model_path

    spec = _TASKS[task]
    d = resolve_model_path(model)
    config = load_config(d)
    keys = set(normalize_keys(read_header(d)))  # tensor names from the header only
    keys |= {"bert." + k for k in keys if k.startswith("pooler.")}  # a bare BertModel checkpoint's pooler
    missing = [k for k in head_keys(task, config) if k not in keys]
    name = f"checkpoint {model}" + (f" ({d})" if str(d) != str(model) else "")
    if missing:
        raise CheckpointError(f"{name} has no trained {spec.head} head (missing {', '.join(missing)})")
    if task == "generate" and not config.is_decoder:
        raise CheckpointError(f"{name} is not a causal LM (config.is_decoder is false: its attention is "
                              f"bidirectional); fine-tune one with bertfast finetune --task causal-lm")
    if task == "fill-mask" and config.is_decoder:
        raise CheckpointError(f"{name} is a causal LM (config.is_decoder is true), not a masked LM; use bertfast "
                              f"generate")
    archs = [a for a in (config.extra.get("architectures") or []) if isinstance(a, str)]
    other = [a for a in archs if a in _KNOWN_HEADS]
    if other and not any(a in spec.architectures for a in archs):
        raise CheckpointError(f"{name} is a {other[0]} checkpoint, not a {spec.head} one ({spec.cls_name})")
    return d, config


def load(task: str, model: Union[str, os.PathLike], *, device=None, dtype=None,
         backend: Optional[str] = None, max_length: Optional[int] = None):
    """(model in eval mode, :class:`bertfast.Tokenizer`) for ``task`` ("fill-mask", "classify",
    "tag", "answer", "generate") from a checkpoint directory or name, after :func:`check_head`."""
    from bertfast import modeling
    from bertfast.sentence import parse_device, parse_dtype
    from bertfast.tokenization import Tokenizer

    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(_TASKS)}")
    dev, dt = parse_device(device), parse_dtype(dtype)  # argument errors before any file is read
    d, _ = check_head(model, task)
    tok = Tokenizer.from_pretrained(d, max_length=max_length)
    net = getattr(modeling, _TASKS[task].cls_name).from_pretrained(d, dtype=dt, device=dev)
    if backend is not None:
        net.set_backend(backend)
    return net.eval(), tok


def _resolve(task: str, model: ModelArg, tokenizer, **load_kw):
    """A (model, tokenizer) pair from what the caller gave: a path / name, or a loaded model
    (of the task's class) with its tokenizer."""
    from bertfast import modeling

    if isinstance(model, torch.nn.Module):
        want = getattr(modeling, _TASKS[task].cls_name)
        if not isinstance(model, want):
            raise TypeError(f"{task}: expected a {want.__name__}, got {type(model).__name__}")
        if tokenizer is None:
            raise ValueError(f"{task}: a loaded model needs tokenizer= (a bertfast.Tokenizer); or pass a checkpoint "
                             f"path and both are loaded")
        return model, tokenizer
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{task}: model must be a checkpoint directory, a name or a loaded model, got "
                        f"{type(model).__name__}")
    net, tok = load(task, model, **load_kw)
    return net, (tokenizer if tokenizer is not None else tok)


def _texts(x, name: str) -> Tuple[List[str], bool]:
    single = isinstance(x, str)
    items = [x] if single else (list(x) if isinstance(x, (list, tuple)) else None)
    if items is None:
        raise TypeError(f"{name} must be a str or a list of str, got {type(x).__name__}")
    if not items:
        raise ValueError(f"{name} is an empty list")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a str")
        if not t.strip():
            raise ValueError(f"{name}[{i}] is empty" if not single else f"{name} is empty")
    return items, single


def _labels(config) -> List[str]:
    id2label = config.id2label or {}
    return [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]


def _fits(enc, tok, what: str) -> None:
    n = enc["input_ids"].shape[1]
    if n > tok.model_max_length:
        raise ValueError(f"{what} is {n} tokens; the model takes at most {tok.model_max_length}")


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _model_inputs(enc, net) -> dict:
    """A tokenizer batch's model inputs on ``net``'s device, checked and the mask read on the
    host first (``bertfast.plan.to_device``): the forward then makes no device read."""
    from bertfast.plan import to_device

    return to_device({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}, net)


# ----------------------------------------------------------------------------- entry points


@torch.inference_mode()
def fill_mask(model: ModelArg, text: Union[str, Sequence[str]], top: int = 5, *, tokenizer=None, **load_kw):
    """The ``top`` most likely tokens for each ``[MASK]`` of ``text`` (a masked-LM checkpoint).

    Returns, for one mask, a list of ``{"token", "token_id", "score" (softmax probability),
    "sequence" (text with that mask filled)}``, most likely first; for several masks a list of
    such lists (one per mask, left to right); for a list of texts, a list of those."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"fill_mask: top must be a positive int, got {top!r}")
    texts, single = _texts(text, "text")
    net, tok = _resolve("fill-mask", model, tokenizer, **load_kw)
    top = min(top, net.config.vocab_size)
    results = []
    for t in texts:
        enc = tok(t, truncation=False, return_offsets_mapping=True)
        _fits(enc, tok, "the text")
        where = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[:, 0].tolist()
        if not where:
            raise ValueError(f"fill_mask: no {tok.mask_token} token in {t!r}")
        logits = net(**_model_inputs(enc, net)).logits[0]  # (S, V)
        probs = torch.softmax(logits[where].float(), dim=-1)  # (M, V)
        scores, ids = probs.topk(top, dim=-1)
        per_mask = []
        for m, pos in enumerate(where):
            start, end = enc["offset_mapping"][0, pos].tolist()
            options = []
            for s, i in zip(scores[m].tolist(), ids[m].tolist()):
                token = tok.convert_ids_to_tokens(i)
                word = token[2:] if token.startswith("##") else token
                options.append({"token": token, "token_id": i, "score": s, "sequence": t[:start] + word + t[end:]})
            per_mask.append(options)
        results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
    return results[0] if single else results


@torch.inference_mode()
def classify(model: ModelArg, texts: Union[str, Sequence[str]], pairs=None, *, tokenizer=None, **load_kw):
    """Classify texts (or text pairs: ``pairs`` one second text per text, or one str for all)
    with a sequence-classification checkpoint.  Texts longer than the model are truncated
    (longest first), as in training.

    Returns per text ``{"label": name, "score": float, "scores": {name: float}}``: softmax
    probabilities; sigmoid ones for ``problem_type="multi_label_classification"`` (plus
    ``"labels"``: every label scoring >= 0.5); for regression (one label) ``score`` is the
    predicted value.  One text gives one dict, a list a list."""
    items, single = _texts(texts, "texts")
    if pairs is not None:
        pair_items, one_pair = _texts(pairs, "pairs")
        if one_pair:
            pair_items = pair_items * len(items)
        elif len(pair_items) != len(items):
            raise ValueError(f"classify: {len(items)} text(s) but {len(pair_items)} pair text(s); give one pair "
                             f"text per text, or one for all")
    net, tok = _resolve("classify", model, tokenizer, **load_kw)
    cfg, names = net.config, _labels(net.config)
    trained = cfg.extra.get("finetuning_task")  # written by bertfast finetune: "classify" or "pair"
    if trained == "classify" and pairs is not None:
        warnings.warn("this classifier was fine-tuned on single texts (bertfast finetune --task classify), "
                      "not pairs: the scores of text pairs mean little", UserWarning, stacklevel=3)
    elif trained == "pair" and pairs is None:
        warnings.warn("this classifier was fine-tuned on text pairs (bertfast finetune --task pair): give the "
                      "second texts (pairs= / --pair)", UserWarning, stacklevel=3)
    regression = cfg.problem_type == "regression" or cfg.num_labels == 1
    multi = cfg.problem_type == "multi_label_classification"
    out = []
    for s in range(0, len(items), BATCH):
        chunk = items[s:s + BATCH]
        enc = tok(chunk, pair_items[s:s + BATCH] if pairs is not None else None)
        logits = net(**_model_inputs(enc, net)).logits.float()  # (b, num_labels)
        if regression:
            out += [{"label": names[0], "score": float(v), "scores": {names[0]: float(v)}} for v in logits[:, 0]]
            continue
        probs = torch.sigmoid(logits) if multi else torch.softmax(logits, -1)
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            r = {"label": names[best], "score": row[best], "scores": dict(zip(names, row))}
            if multi:
                r["labels"] = [n for n, p in zip(names, row) if p >= 0.5]
            out.append(r)
    return out[0] if single else out


@torch.inference_mode()
def tag(model: ModelArg, text: Union[str, Sequence[str]], *, tokenizer=None, stride: Optional[int] = None,
        **load_kw):
    """Label every word of ``text`` with a token-classification checkpoint; each word takes
    the prediction of its first sub-word (as ``collators.align_labels`` trains it).  A text
    longer than the model runs in overlapping windows (``stride`` tokens of overlap, default a
    quarter of the window); each word is labelled in the window where it sits farthest from an
    edge.

    Returns ``[{"word", "label", "score" (softmax probability), "start", "end" (character
    offsets)}, ...]`` per text (one text: that list)."""
    texts, single = _texts(text, "text")
    net, tok = _resolve("tag", model, tokenizer, **load_kw)
    names = _labels(net.config)
    overlap = stride if stride is not None else tok.model_max_length // 4
    results = []
    for t in texts:
        enc = tok(t, stride=overlap, return_overflowing_tokens=True, return_offsets_mapping=True)
        logits = net(**_model_inputs(enc, net)).logits.float()  # (W, S, L)
        probs = torch.softmax(logits, -1).cpu()
        best: Dict[int, Tuple[int, int, int]] = {}  # word -> (distance to the window's edge, window, token)
        for w in range(probs.shape[0]):
            word_ids = enc.word_ids(w)
            real = [j for j, wid in enumerate(word_ids) if wid is not None]
            seen = set()
            for j in real:
                wid = word_ids[j]
                if wid in seen:  # not the first sub-word
                    continue
                seen.add(wid)
                margin = min(j - real[0], real[-1] - j)
                if wid not in best or margin > best[wid][0]:
                    best[wid] = (margin, w, j)
        words = []
        for wid in sorted(best):
            _, w, j = best[wid]
            enc_w = enc.encodings[w]
            start, end = enc_w.word_to_chars(wid)
            p = probs[w, j]
            k = int(p.argmax())
            words.append({"word": t[start:end], "label": names[k], "score": float(p[k]), "start": start, "end": end})
        results.append(words)
    return results[0] if single else results


@torch.inference_mode()
def answer(question: str, context: str, model: ModelArg, *, tokenizer=None, max_answer_len: int = 30,
           max_length: int = 384, stride: Optional[int] = None, **load_kw) -> dict:
    """The answer span of ``context`` for ``question`` (an extractive QA checkpoint).  A long
    context is read in overlapping windows (``collators.qa_features``: ``max_length`` tokens, at
    most the model's; ``stride`` tokens of overlap, default min(128, a third of the window));
    the best span of every window (``qa.best_span``: context tokens only, at most
    ``max_answer_len`` tokens) competes by its score, as transformers' SQuAD post-processing
    compares start + end logits across windows.

    Returns ``{"answer", "start", "end" (character offsets in context), "score" (start + end
    logit), "window"}``."""
    from bertfast.collators import qa_features
    from bertfast.qa import best_span

    for name, v in (("question", question), ("context", context)):
        if not isinstance(v, str):
            raise TypeError(f"answer: {name} must be a str, got {type(v).__name__}")
        if not v.strip():
            raise ValueError(f"answer: {name} is empty")
    net, tok = _resolve("answer", model, tokenizer, **load_kw)
    window = min(max_length, tok.model_max_length)
    overlap = stride if stride is not None else min(128, window // 3)
    feats = qa_features(tok, [question], [context], max_length=window, stride=overlap)
    out = net(**_model_inputs(feats, net))
    best = None
    for w, offsets in enumerate(feats["offset_mapping"]):
        in_context = torch.tensor([o is not None for o in offsets])
        if not bool(in_context.any()):
            continue  # the question filled the window
        s, e, score = best_span(out.start_logits[w], out.end_logits[w], max_answer_len=max_answer_len, mask=in_context)
        if best is None or score > best[0]:
            best = (score, w, offsets[s][0], offsets[e][1])
    if best is None:
        raise ValueError(f"answer: the question leaves no room for the context in {max_length} tokens")
    score, w, start, end = best
    return {"answer": context[start:end], "start": start, "end": end, "score": score, "window": w}


@torch.inference_mode()
def generate(model: ModelArg, prompt: str, max_new_tokens: int = 20, *, top_k: Optional[int] = None,
             temperature: float = 1.0, seed: Optional[int] = None, stop_at_sep: bool = True, tokenizer=None,
             **load_kw) -> dict:
    """Continue ``prompt`` with a causal-LM checkpoint (``BertLMHeadModel.generate``): greedy, or
    top-k sampling when ``top_k`` is given (0: the whole vocabulary) at ``temperature``, drawn
    with a ``torch.Generator`` seeded by ``seed`` (same seed, same text).

    The prompt is ``[CLS]`` + its tokens (no ``[SEP]``); generation stops at ``[SEP]`` (the end
    of every training text) unless ``stop_at_sep=False``.  Returns ``{"text" (prompt +
    continuation), "generated" (the continuation), "token_ids" (the new ids)}``."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"generate: prompt must be a non-empty str, got {prompt!r}")
    if top_k is None and (seed is not None or temperature != 1.0):
        raise ValueError("generate: seed and temperature apply to sampling: give top_k too (greedy decoding is "
                         "deterministic)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"generate: seed must be an int, got {seed!r}")
    net, tok = _resolve("generate", model, tokenizer, **load_kw)
    dev = _device_of(net)
    body = tok(prompt, add_special_tokens=False, truncation=False)["input_ids"][0].tolist()
    ids = torch.tensor([[tok.cls_token_id] + body], dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    out = net.generate(ids, max_new_tokens=max_new_tokens, do_sample=top_k is not None,
                       top_k=top_k if top_k is not None else 0, temperature=temperature,
                       eos_token_id=tok.sep_token_id if stop_at_sep else None, generator=generator)
    new = out[0, ids.shape[1]:].tolist()
    return {"text": tok.decode(out[0].tolist(), skip_special_tokens=True),
            "generated": tok.decode(new, skip_special_tokens=True), "token_ids": new}
