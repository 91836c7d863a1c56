"""What every ``bertfast`` command shares: the one-line-error parser, the argument types (each
refuses a bad value while parsing, in one line naming it), the model / threads option groups,
stdin reading, and :class:`CLIError` with the rule for which failures print one line.

Nothing here imports torch at import time: the types that need it import it when called.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

PROG = "bertfast"


class CLIError(ValueError):
    """An expected failure with a message meant for the user."""


@dataclass(frozen=True)
class Command:
    """A lazily imported ``bertfast`` subcommand (a target of bertfast.cli's LAZY_COMMANDS):
    ``add_arguments(parser)`` while parsing, ``run(args) -> int`` after."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Any], int]


def run_in(module: str) -> Callable[[Any], int]:
    """A command's ``run(args)``: ``module.run(args)``, the module imported (and its ``run`` looked
    up) only when the command runs."""
    def run(args) -> int:
        import importlib

        return importlib.import_module(module).run(args)

    run.__qualname__ = f"run_in({module!r})"
    return run


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: ``bertfast: error: ...`` (exit 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(msg: object) -> str:
    text = " ".join(str(msg).split())
    return text or "unknown error"


def expected_errors() -> tuple:
    """Exception types reported as one line rather than a traceback."""
    errors: list = [CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError,
                    UnicodeDecodeError]
    try:  # CheckpointError subclasses ValueError; listed for clarity should that ever change
        from bertfast.loading import CheckpointError

        errors.append(CheckpointError)
    except Exception:
        pass
    return tuple(errors)


# ---------------------------------------------------------------------------- argument types
def dtype_arg(value: str):
    from bertfast.sentence import DTYPE_NAMES, parse_dtype

    try:
        parse_dtype(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {value!r} (choose from {', '.join(DTYPE_NAMES)})"
        ) from None
    return value


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= lo, else a one-line error naming the value."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is None or n < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return n

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def cuda_unavailable_reason() -> Optional[str]:
    """Why CUDA cannot be used here (None when it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    return "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"


def device_arg(value: str) -> str:
    """cpu, cuda or cuda:N that this machine has; refused at parse time otherwise (meta included)."""
    import torch

    from bertfast.sentence import parse_device

    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; use cpu, cuda or cuda:N") from None
    try:
        dev = parse_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if dev.type not in ("cpu", "cuda"):
        why = " (meta tensors hold no data)" if dev.type == "meta" else ""
        raise argparse.ArgumentTypeError(f"device {value!r} is not supported{why}; use cpu, cuda or cuda:N")
    return value


def bench_device_arg(value: str) -> str:
    """``--device`` of bench / profile (choices auto, cuda, cpu): cuda refused here without CUDA."""
    if value == "cuda":
        why = cuda_unavailable_reason()
        if why is not None:
            raise argparse.ArgumentTypeError(f"cuda requested but CUDA is not available ({why})")
    return value


def backend_arg(value: str) -> str:
    from bertfast.backend import BACKENDS

    if value not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {value!r} (choose from {', '.join(BACKENDS)})")
    return value


def out_dir_arg(value: str) -> str:
    """An output directory: may not exist yet, but may not be an existing file (nor under one)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty string")
    p = os.path.abspath(os.path.expanduser(value))
    if os.path.exists(p) and not os.path.isdir(p):
        raise argparse.ArgumentTypeError(f"{value} is an existing file, not a directory")
    parent = os.path.dirname(p)
    while parent and not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{value}: {parent} is a file, so the directory cannot be created")
    return value


def model_arg(value: str) -> str:
    """A checkpoint directory (or known name) holding config.json and a weights file."""
    from bertfast.loading import CONFIG_NAME, CheckpointError, find_weights_file, resolve_model_path

    try:
        d = resolve_model_path(value)
        if not (d / CONFIG_NAME).is_file():
            raise CheckpointError(f"{d / CONFIG_NAME}: missing {CONFIG_NAME}")
        find_weights_file(d)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def text_arg(value: str) -> str:
    """A TEXT argument: refused when the shell passed bytes that are not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{value.encode('utf-8', 'replace').decode()[:40]!r} is not valid UTF-8 "
                                         f"text") from None
    return value


# ---------------------------------------------------------------------------- option groups
def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads for the command (main() sets and restores them)."""
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for PyTorch's ops (default: torch's, one per core); on a busy machine "
                        "fewer threads than cores is often faster")


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """torch.set_num_threads(n) for the block (nothing when n is None), then the previous count."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_model_args(p: argparse.ArgumentParser, model_required: bool = False, model_help: Optional[str] = None) -> None:
    """``--model --device --dtype --max-length --backend --threads`` of encode, similarity and the tasks."""
    if model_required:
        p.add_argument("--model", required=True, type=model_arg, metavar="PATH",
                       help=model_help or "checkpoint directory")
    else:
        p.add_argument("--model", default="minilm", type=model_arg, metavar="PATH|NAME",
                       help="model directory or name (default: minilm, the bundled all-MiniLM-L6-v2)")
    p.add_argument("--device", default=None, type=device_arg, metavar="cpu|cuda",
                   help="device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, type=dtype_arg, metavar="float32|float16|bfloat16",
                   help="weights and activations dtype (default: float32)")
    p.add_argument("--max-length", type=positive_int, default=None, metavar="N",
                   help="truncate texts to N tokens (default: the model's max_seq_length)")
    p.add_argument("--backend", default=None, type=backend_arg, metavar="auto|torch|triton",
                   help="forward-pass implementation (default: the model's, i.e. auto: Triton on CUDA, "
                        "PyTorch elsewhere)")
    add_threads_argument(p)


def add_progress_arguments(p: argparse.ArgumentParser, always_help: str, never_help: str) -> None:
    """``--progress`` / ``--no-progress`` (dest ``progress``: True, False, or None when neither)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help=always_help)
    g.add_argument("--no-progress", dest="progress", action="store_false", help=never_help)


# ---------------------------------------------------------------------------- input
def read_stdin() -> str:
    """stdin as UTF-8 text, read as bytes where possible (text mode may decode with
    surrogateescape, which lets invalid bytes through as lone surrogates)."""
    buf = getattr(sys.stdin, "buffer", None)
    if buf is not None:
        raw = buf.read()
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise CLIError(f"stdin is not UTF-8 text ({e.reason} at byte {e.start})") from None
    data = sys.stdin.read()
    try:
        data.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CLIError(f"stdin is not UTF-8 text (undecodable byte at character {e.start})") from None
    return data
