"""The ``bertfast`` command line (also ``python -m bertfast``): every argparse parser of the
project lives in this package; the library modules take plain arguments.

    bertfast encode TEXT... | --input FILE --output FILE ...   (cli/encode.py; bertfast.corpus)
    bertfast similarity TEXT_A TEXT_B [--model ...] [--device ...] [--dtype ...]   (cli/encode.py)
    bertfast info                                              (cli/encode.py)
    bertfast search --index FILE --query TEXT [--top K]   (cli/index.py; bertfast.index)
    bertfast finetune --task TASK --train FILE ...        (cli/train.py; bertfast.train)
    bertfast fill-mask | classify | tag | answer | generate ...   (cli/tasks.py; bertfast.tasks)
    bertfast bench ...      (cli/bench.py; bertfast.bench)
    bertfast profile ...    (cli/bench.py; bertfast.bench.profile)
    bertfast tune ...       (cli/tune.py; bertfast.tune; needs a CUDA GPU)

The argument types and helpers every command shares are in :mod:`bertfast.cli.args`.

Expected failures (a missing model, a bad argument, no CUDA, ...) print one line
``bertfast: error: ...`` on stderr and exit 1 (2 for usage errors); anything else is a bug and
shows its traceback.  ``--debug`` shows the traceback of expected failures too.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Optional, Sequence

from bertfast.cli.args import PROG, CLIError, Parser, expected_errors, one_line, torch_threads
from bertfast.cli.encode import add_commands as _add_always_there_commands

__all__ = ["main", "build_parser", "CLIError", "LAZY_COMMANDS", "PROG"]

# subcommands whose parser and implementation are imported only when used:
# name -> (target, one-line help).  The target is "module" or "module:attr"; it (the module, or
# that attribute of it) provides add_arguments(parser) and run(args) -> int.
LAZY_COMMANDS = {
    "bench": ("bertfast.cli.bench:BENCH", "benchmark bertfast against transformers"),
    "profile": ("bertfast.cli.bench:PROFILE", "profile one forward pass"),
    "tune": ("bertfast.cli.tune", "choose the fastest kernel configurations for this GPU and cache them"),
    "finetune": ("bertfast.cli.train", "fine-tune a model on a task from JSONL/CSV files"),
    "fill-mask": ("bertfast.cli.tasks:FILL_MASK", "predict the [MASK]ed word(s) of a text"),
    "classify": ("bertfast.cli.tasks:CLASSIFY", "classify texts (or text pairs) with a fine-tuned checkpoint"),
    "tag": ("bertfast.cli.tasks:TAG", "label every word of a text with a fine-tuned checkpoint"),
    "answer": ("bertfast.cli.tasks:ANSWER", "extract the answer to a question from a context"),
    "generate": ("bertfast.cli.tasks:GENERATE", "continue a text with a causal LM checkpoint"),
    "search": ("bertfast.cli.index", "search an embedding file for the texts nearest a query"),
}

# the library module each lazy command runs, named in its --help description
IMPLEMENTED_IN = {"bench": "bertfast.bench", "profile": "bertfast.bench.profile", "tune": "bertfast.tune",
                  "finetune": "bertfast.train", "fill-mask": "bertfast.tasks", "classify": "bertfast.tasks",
                  "tag": "bertfast.tasks", "answer": "bertfast.tasks", "generate": "bertfast.tasks",
                  "search": "bertfast.index"}


def lazy_target(target: str):
    """The object a LAZY_COMMANDS target names: a module, or ``module:attr``."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def _lazy_runner(name: str, target: str, error: Optional[str]) -> Callable:
    def run(args) -> int:
        if error is not None:
            print(f"{PROG}: error: '{name}' is not available ({error})", file=sys.stderr)
            return 2
        return lazy_target(target).run(args)

    return run


def _first_command(argv: Sequence[str]) -> Optional[str]:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


# ---------------------------------------------------------------------------- parser
def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The full parser.  The modules of the lazy commands are imported only when ``argv``
    selects them (so that ``bertfast encode`` never imports them)."""
    parser = Parser(prog=PROG, description="bertfast: a fast BERT encoder (Triton on GPU, PyTorch on CPU)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.unavailable_commands = {}  # lazy command -> why its module cannot be imported
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _add_always_there_commands(sub)

    selected = _first_command(list(argv) if argv is not None else sys.argv[1:])
    for name, (target, help_text) in LAZY_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text} ({IMPLEMENTED_IN.get(name, target)})")
        error = None
        if selected == name:
            try:
                lazy_target(target).add_arguments(p)
            except ImportError as e:
                error = one_line(f"cannot import {target}: {e}")
            except AttributeError as e:
                error = one_line(f"{target} has no add_arguments(): {e}")
            if error is not None:  # main() ignores whatever follows, then reports "not available"
                parser.unavailable_commands[name] = error
        p.set_defaults(func=_lazy_runner(name, target, error))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``bertfast`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and getattr(args, "command", None) not in parser.unavailable_commands:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        threads = getattr(args, "threads", None)  # one count; `bench cpu --threads 1 2` runs each itself
        with torch_threads(threads if isinstance(threads, int) else None):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `bertfast encode ... | head`): stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except Exception:
            pass
        return 141
    except Exception as e:
        if args.debug or not isinstance(e, expected_errors()):
            raise
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1

