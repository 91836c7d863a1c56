"""``bertfast fill-mask | classify | tag | answer | generate``: their arguments, and the
commands that call :mod:`bertfast.tasks` and print its results (text, or ``--json``)."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, List

from bertfast import tasks
from bertfast.cli.args import CLIError, Command, add_model_args, nonnegative_int, positive_int, read_stdin, text_arg


def _common(p: argparse.ArgumentParser, finetune_task: str) -> None:
    # required: the bundled minilm is a sentence encoder without any task head
    add_model_args(p, model_required=True,
                   model_help=f"a checkpoint with this task's trained head, e.g. from bertfast finetune --task "
                              f"{finetune_task}")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _load_kw(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, backend=args.backend, max_length=args.max_length)


def _emit(args, result, lines: Callable[[], List[str]]) -> int:
    if args.json:
        json.dump(result, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in lines()))
    return 0


def _fill_mask_args(p):
    p.add_argument("text", type=text_arg, metavar="TEXT", help="a text with one or more [MASK] tokens")
    p.add_argument("--top", type=positive_int, default=5, metavar="K", help="predictions per mask (default 5)")
    _common(p, "mlm")


def _fill_mask_run(args) -> int:
    res = tasks.fill_mask(args.model, args.text, top=args.top, **_load_kw(args))
    per_mask = res if res and isinstance(res[0], list) else [res]

    def lines():
        out = []
        for m, options in enumerate(per_mask):
            if len(per_mask) > 1:
                out.append(f"[MASK] {m + 1} of {len(per_mask)}:")
            for k, o in enumerate(options):
                out.append(f"{k + 1:3d}. {o['token']:<15s} {o['score']:.4f}  {o['sequence']}")
        return out

    return _emit(args, res, lines)


def _classify_args(p):
    p.add_argument("texts", nargs="+", type=text_arg, metavar="TEXT", help="texts to classify")
    p.add_argument("--pair", action="append", type=text_arg, metavar="TEXT",
                   help="second text of a pair (NLI, paraphrase): once for every TEXT, or once per TEXT")
    _common(p, "classify")


def _classify_run(args) -> int:
    pairs = args.pair
    if pairs is not None and len(pairs) not in (1, len(args.texts)):
        raise CLIError(f"{len(args.texts)} TEXT(s) but {len(pairs)} --pair: give one --pair for all, or one per TEXT")
    pairs = pairs[0] if pairs is not None and len(pairs) == 1 else pairs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        res = tasks.classify(args.model, args.texts, pairs, **_load_kw(args))
    for w in caught:  # one line each, as the errors
        print(f"bertfast: warning: {w.message}", file=sys.stderr)

    def lines():
        return [f"{r['label']}\t{r['score']:.4f}\t{t}" for r, t in zip(res, args.texts)]

    return _emit(args, res, lines)


def _tag_args(p):
    p.add_argument("text", type=text_arg, metavar="TEXT", help="the text whose words are labelled")
    _common(p, "tokens")


def _tag_run(args) -> int:
    res = tasks.tag(args.model, args.text, **_load_kw(args))
    return _emit(args, res, lambda: [f"{w['word']}\t{w['label']}\t{w['score']:.4f}" for w in res])


def _answer_args(p):
    p.add_argument("--question", "-q", required=True, type=text_arg, metavar="Q", help="the question")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--context", "-c", type=text_arg, metavar="C", help="the text holding the answer")
    g.add_argument("--context-file", metavar="FILE", help="read the context from FILE ('-' for stdin)")
    p.add_argument("--max-answer-len", type=positive_int, default=30, metavar="N",
                   help="longest answer in tokens (default 30)")
    p.add_argument("--stride", type=positive_int, default=None, metavar="N",
                   help="token overlap of the windows of a long context (default min(128, a third of a window))")
    _common(p, "qa")


def _answer_run(args) -> int:
    context = args.context
    if context is None:
        if args.context_file == "-":
            context = read_stdin()
        else:
            try:
                context = Path(args.context_file).read_text(encoding="utf-8-sig")
            except FileNotFoundError:
                raise CLIError(f"file not found: {args.context_file}") from None
            except (OSError, UnicodeDecodeError) as e:
                raise CLIError(f"cannot read {args.context_file}: {e}") from None
    kw = _load_kw(args)
    max_length = kw.pop("max_length") or 384
    res = tasks.answer(args.question, context, args.model, max_answer_len=args.max_answer_len,
                       max_length=max_length, stride=args.stride, **kw)
    return _emit(args, res, lambda: [res["answer"], f"(score {res['score']:.3f}, characters {res['start']}-"
                                                    f"{res['end']})"])


def _generate_args(p):
    p.add_argument("prompt", type=text_arg, metavar="PROMPT", help="the text to continue")
    p.add_argument("--max-new-tokens", type=nonnegative_int, default=20, metavar="N",
                   help="tokens to add at most (default 20)")
    p.add_argument("--top-k", type=nonnegative_int, default=None, metavar="K",
                   help="sample among the K most likely tokens (0: all) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (with --top-k)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the sampling (with --top-k)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at [SEP]")
    _common(p, "causal-lm")


def _generate_run(args) -> int:
    if args.top_k is None and (args.seed is not None or args.temperature != 1.0):
        raise CLIError("--seed and --temperature apply to sampling: add --top-k K (greedy decoding is deterministic)")
    res = tasks.generate(args.model, args.prompt, args.max_new_tokens, top_k=args.top_k,
                         temperature=args.temperature, seed=args.seed, stop_at_sep=not args.no_stop, **_load_kw(args))
    return _emit(args, res, lambda: [res["text"]])


FILL_MASK = Command(_fill_mask_args, _fill_mask_run)
CLASSIFY = Command(_classify_args, _classify_run)
TAG = Command(_tag_args, _tag_run)
ANSWER = Command(_answer_args, _answer_run)
GENERATE = Command(_generate_args, _generate_run)
