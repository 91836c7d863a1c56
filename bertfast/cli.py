"""The ``bertfast`` command line (also ``python -m bertfast``).

    bertfast encode TEXT... [--file FILE] [--model PATH|minilm] [--device cpu|cuda]
                            [--dtype float32|float16|bfloat16] [--json] [--batch-size N]
    bertfast encode --input FILE --output FILE.npy|.parquet|.jsonl [--field NAME] [--skip-empty]
                            [--output-dtype float32|float16] [--resume] [--overwrite] [--ray]
                            (bertfast.corpus; under torchrun each rank encodes its share)
    bertfast similarity TEXT_A TEXT_B [--model ...] [--device ...] [--dtype ...]
    bertfast search --index FILE --query TEXT [--top K]   (bertfast.index)
    bertfast finetune --task TASK --train FILE ...        (bertfast.train)
    bertfast fill-mask | classify | tag | answer | generate ...   (bertfast.tasks)
    bertfast info
    bertfast bench ...      (bertfast.bench)
    bertfast profile ...    (bertfast.bench.profile)
    bertfast tune ...       (bertfast.tune; needs a CUDA GPU)

Expected failures (a missing model, a bad argument, no CUDA, ...) print one line
``bertfast: error: ...`` on stderr and exit 1 (2 for usage errors); anything else is a bug and
shows its traceback.  ``--debug`` shows the traceback of expected failures too.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
from typing import Callable, Optional, Sequence

PROG = "bertfast"

# subcommands whose implementation lives in another module, imported only when used:
# name -> (target, one-line help).  The target is "module" or "module:attr"; it (the module, or
# that attribute of it) provides add_arguments(parser) and run(args) -> int.
LAZY_COMMANDS = {
    "bench": ("bertfast.bench", "benchmark bertfast against transformers"),
    "profile": ("bertfast.bench.profile", "profile one forward pass"),
    "tune": ("bertfast.tune", "choose the fastest kernel configurations for this GPU and cache them"),
    "finetune": ("bertfast.train", "fine-tune a model on a task from JSONL/CSV files"),
    "fill-mask": ("bertfast.tasks:FILL_MASK", "predict the [MASK]ed word(s) of a text"),
    "classify": ("bertfast.tasks:CLASSIFY", "classify texts (or text pairs) with a fine-tuned checkpoint"),
    "tag": ("bertfast.tasks:TAG", "label every word of a text with a fine-tuned checkpoint"),
    "answer": ("bertfast.tasks:ANSWER", "extract the answer to a question from a context"),
    "generate": ("bertfast.tasks:GENERATE", "continue a text with a causal LM checkpoint"),
    "search": ("bertfast.index", "search an embedding file for the texts nearest a query"),
}

# how many values of each embedding the default preview shows
PREVIEW_VALUES = 6


class CLIError(ValueError):
    """An expected failure with a message meant for the user."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: ``bertfast: error: ...`` (exit 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(msg: object) -> str:
    text = " ".join(str(msg).split())
    return text or "unknown error"


def _expected_errors() -> tuple:
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
def _dtype_arg(value: str):
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


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")

# public names: bertfast.bench and bertfast.bench.profile use them in their add_arguments
positive_int = _positive_int
nonnegative_int = _nonnegative_int


def _cuda_unavailable_reason() -> Optional[str]:
    import torch

    if torch.cuda.is_available():
        return None
    return "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"


def _device_arg(value: str) -> str:
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
        why = _cuda_unavailable_reason()
        if why is not None:
            raise argparse.ArgumentTypeError(f"cuda requested but CUDA is not available ({why})")
    return value


def _backend_arg(value: str) -> str:
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


def _model_arg(value: str) -> str:
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


def _text_arg(value: str) -> str:
    """A TEXT argument: refused when the shell passed bytes that are not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{value.encode('utf-8', 'replace').decode()[:40]!r} is not valid UTF-8 "
                                         f"text") from None
    return value


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads for the command (main() sets and restores them)."""
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for PyTorch's ops (default: torch's, one per core); on a busy machine "
                        "fewer threads than cores is often faster")


@contextlib.contextmanager
def _torch_threads(n: Optional[int]):
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


def _add_model_args(p: argparse.ArgumentParser, model_required: bool = False, model_help: Optional[str] = None) -> None:
    if model_required:
        p.add_argument("--model", required=True, type=_model_arg, metavar="PATH",
                       help=model_help or "checkpoint directory")
    else:
        p.add_argument("--model", default="minilm", type=_model_arg, metavar="PATH|NAME",
                       help="model directory or name (default: minilm, the bundled all-MiniLM-L6-v2)")
    p.add_argument("--device", default=None, type=_device_arg, metavar="cpu|cuda",
                   help="device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, type=_dtype_arg, metavar="float32|float16|bfloat16",
                   help="weights and activations dtype (default: float32)")
    p.add_argument("--max-length", type=_positive_int, default=None, metavar="N",
                   help="truncate texts to N tokens (default: the model's max_seq_length)")
    p.add_argument("--backend", default=None, type=_backend_arg, metavar="auto|torch|triton",
                   help="forward-pass implementation (default: the model's, i.e. auto: Triton on CUDA, "
                        "PyTorch elsewhere)")
    add_threads_argument(p)


# ---------------------------------------------------------------------------- encode
def _read_stdin() -> str:
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


def _read_lines(source: str) -> list[str]:
    """The lines of a file ('-': stdin), blank ones kept as rows (row i = line i), split as
    bertfast.corpus splits .txt input (on \\n only)."""
    from bertfast.corpus import split_lines

    if source == "-":
        data = _read_stdin()
    else:
        try:
            with open(source, encoding="utf-8-sig", newline="") as f:
                data = f.read()
        except FileNotFoundError:
            raise CLIError(f"file not found: {source}") from None
        except IsADirectoryError:
            raise CLIError(f"{source} is a directory, not a file") from None
        except UnicodeDecodeError as e:
            raise CLIError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise CLIError(f"cannot read {source}: {e.strerror or e}") from None
    return split_lines(data)


def _collect_texts(args) -> list[str]:
    texts: list[str] = []
    stdin_used = False
    for t in args.texts:
        if t == "-":
            if stdin_used:
                continue
            stdin_used = True
            texts.extend(_read_lines("-"))
        else:
            texts.append(t)
    for f in args.file or []:
        if f == "-" and stdin_used:
            continue
        stdin_used = stdin_used or f == "-"
        texts.extend(_read_lines(f))
    if not texts:
        raise CLIError("no texts to encode: give TEXT arguments, --file FILE, - to read stdin, or --input FILE "
                       "--output FILE")
    if not any(t.strip() for t in texts):
        raise CLIError(f"no texts to encode: the {len(texts)} text(s) given are all blank")
    return texts


def _make_encoder(args):
    from bertfast.sentence import SentenceEncoder

    return SentenceEncoder(args.model, device=args.device, dtype=args.dtype, max_length=args.max_length,
                           backend=args.backend)


def _preview(text: str, width: int = 70) -> str:
    t = " ".join(text.split())
    return t if len(t) <= width else t[: width - 3] + "..."


def _encode_corpus(args) -> int:
    """``encode --input FILE --output FILE``: bertfast.corpus in one process, bertfast.distributed
    under torchrun (WORLD_SIZE > 1) or with --ray."""
    if args.texts or args.file:
        raise CLIError("give either TEXT/--file (a preview on stdout) or --input/--output (a file), not both")
    if args.output is None:
        raise CLIError("--input needs --output FILE (.npy, .parquet or .jsonl)")
    if args.json:
        raise CLIError("--json prints a preview of TEXT/--file; with --input, choose the format with --output "
                       "(e.g. out.jsonl)")
    common = dict(model=args.model, field=args.field, device=args.device, dtype=args.dtype,
                  max_length=args.max_length, backend=args.backend, batch_size=args.batch_size,
                  normalize=not args.no_normalize, output_dtype=args.output_dtype, skip_empty=args.skip_empty,
                  chunk_size=args.chunk_size, resume=True if args.resume else None, overwrite=args.overwrite,
                  progress=args.progress)
    if args.workers is not None and not args.ray:
        raise CLIError("--workers is for --ray (under torchrun, --nproc-per-node sets the number of processes)")
    if args.ray:
        from bertfast.distributed import encode_file_ray

        manifest = encode_file_ray(args.input, args.output, num_workers=args.workers, **common)
    elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from bertfast.distributed import encode_file_torchrun

        manifest = encode_file_torchrun(args.input, args.output, _kill_after_chunks=args.kill_after_chunks, **common)
        if manifest is None:  # ranks other than 0: rank 0 reports
            return 0
    else:
        from bertfast.corpus import encode_file

        manifest = encode_file(args.input, args.output, _kill_after_chunks=args.kill_after_chunks, **common)
    skipped = len(manifest.get("skipped_rows") or [])
    note = f", {skipped} blank row(s) skipped (listed in the manifest)" if skipped else ""
    print(f"{args.output}: {manifest['rows']} rows x {manifest['embedding_dim']} ({manifest['output']['dtype']})"
          f"{note}; manifest {args.output}.manifest.json")
    return 0


def _encode_layers(args):
    """The ``layers=`` of SentenceEncoder.encode from --layer N (repeatable) / --scalar-mix."""
    if args.scalar_mix:
        return "scalar_mix"
    if args.layer:
        return args.layer[0] if len(args.layer) == 1 else list(args.layer)
    return None


def _print_token_vectors(rows, as_json: bool) -> None:
    out = sys.stdout
    if as_json:
        json.dump([{"text": r.text, "tokens": r.tokens, "offsets": [list(o) for o in r.offsets],
                    "vectors": r.vectors.tolist(), "truncated": r.truncated} for r in rows], out)
        out.write("\n")
        return
    for i, r in enumerate(rows):
        cut = " (truncated)" if r.truncated else ""
        out.write(f"[{i}] {_preview(r.text) if r.text.strip() else '(blank: no tokens)'}{cut}\n")
        for tok, (a, b), v in zip(r.tokens, r.offsets, r.vectors):
            vals = ", ".join(f"{x:+.4f}" for x in v[:PREVIEW_VALUES].tolist())
            more = ", ..." if v.shape[0] > PREVIEW_VALUES else ""
            out.write(f"    {tok}\t{a}-{b}\t[{vals}{more}]\n")


def cmd_encode(args) -> int:
    layers = _encode_layers(args)
    if args.input is not None:
        if args.tokens or layers is not None:
            raise CLIError("--tokens / --layer / --scalar-mix apply to TEXT / --file; corpus files (--input) "
                           "store sentence embeddings of the last layer")
        return _encode_corpus(args)
    if args.output is not None:
        raise CLIError("--output needs --input FILE (TEXT/--file print a preview on stdout)")
    corpus_only = [flag for flag, given in (
        ("--field", args.field is not None), ("--output-dtype", args.output_dtype != "float32"),
        ("--skip-empty", args.skip_empty), ("--chunk-size", args.chunk_size is not None), ("--resume", args.resume),
        ("--overwrite", args.overwrite), ("--ray", args.ray), ("--workers", args.workers is not None)) if given]
    if corpus_only:
        raise CLIError(f"{', '.join(corpus_only)}: only with --input FILE --output FILE (TEXT/--file print a "
                       f"preview on stdout)")
    texts = _collect_texts(args)  # before loading the model: a bad file fails fast
    enc = _make_encoder(args)
    if args.tokens:  # raw vectors unless asked otherwise: --no-normalize is the default here
        rows = enc.encode(texts, batch_size=args.batch_size, normalize=False, show_progress=args.progress,
                          output="tokens", layers=layers)
        _print_token_vectors(rows, args.json)
        return 0
    emb = enc.encode(texts, batch_size=args.batch_size, normalize=not args.no_normalize,
                     show_progress=args.progress, layers=layers).cpu()
    out = sys.stdout
    if args.json:
        json.dump([{"text": t, "embedding": e} for t, e in zip(texts, emb.tolist())], out)
        out.write("\n")
        return 0
    dim = emb.shape[1]
    norms = emb.norm(dim=1)
    for i, (t, e) in enumerate(zip(texts, emb)):
        vals = ", ".join(f"{v:+.4f}" for v in e[:PREVIEW_VALUES].tolist())
        more = ", ..." if dim > PREVIEW_VALUES else ""
        out.write(f"[{i}] {_preview(t) if t.strip() else '(blank: the embedding of [CLS] [SEP])'}\n")
        out.write(f"    dim={dim} norm={float(norms[i]):.4f} [{vals}{more}]\n")
    return 0


# ---------------------------------------------------------------------------- similarity
def cmd_similarity(args) -> int:
    for name, t in (("TEXT_A", args.text_a), ("TEXT_B", args.text_b)):
        if not t.strip():
            raise CLIError(f"{name} is empty")
    enc = _make_encoder(args)
    sim = enc.similarity(args.text_a, args.text_b)
    print(f"{sim:.6f}")
    return 0


# ---------------------------------------------------------------------------- info
def _triton_version() -> tuple[Optional[str], str]:
    try:
        import triton

        return getattr(triton, "__version__", "unknown"), ""
    except Exception as e:  # ImportError, or a broken install
        return None, _one_line(f"{type(e).__name__}: {e}")


def _backend_report(torch, triton_version: Optional[str], triton_error: str) -> list[tuple[str, bool, str]]:
    rows = []
    # Triton on the GPU
    if triton_version is None:
        rows.append(("Triton on GPU", False, f"triton is not importable ({triton_error})"))
    elif not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        rows.append(("Triton on GPU", False, why))
    elif getattr(torch.version, "hip", None):
        rows.append(("Triton on GPU", False, "ROCm build: kernels are written and checked for NVIDIA sm_80 / sm_90"))
    else:
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        if all(c >= (8, 0) for c in caps):
            rows.append(("Triton on GPU", True, "CUDA device(s) with compute capability "
                         + ", ".join(f"{a}.{b}" for a, b in caps)))
        else:
            rows.append(("Triton on GPU", False, "compute capability "
                         + ", ".join(f"{a}.{b}" for a, b in caps) + " < 8.0 (kernels target sm_80+)"))
    # Triton interpreter
    if triton_version is None:
        rows.append(("Triton interpreter", False, "triton is not importable"))
    else:
        on = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
        rows.append(("Triton interpreter", True,
                     "TRITON_INTERPRET=1 is set: kernels run on CPU tensors (slow; for tests)" if on else
                     "set TRITON_INTERPRET=1 to run kernels on CPU tensors (slow; for tests)"))
    rows.append(("PyTorch", True, "plain PyTorch path, any device"))
    return rows


def cmd_info(args) -> int:
    import torch

    try:
        from importlib.metadata import version

        bf_version = version("bertfast")
    except Exception:
        bf_version = "unknown"
    triton_version, triton_error = _triton_version()
    lines = [
        f"bertfast {bf_version}",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (no CUDA)"),
        f"triton   {triton_version}" if triton_version else f"triton   not installed ({triton_error})",
        "devices:",
        f"  cpu: {platform.machine() or 'unknown'}, {os.cpu_count()} cores visible, "
        f"torch threads={torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("  cuda: not available" + (" (torch built without CUDA)" if torch.version.cuda is None else ""))
    lines.append("backends:")
    for name, ok, why in _backend_report(torch, triton_version, triton_error):
        lines.append(f"  {name + ':':20s}{'yes' if ok else 'no ':3s}  {why}")
    try:
        from bertfast.loading import resolve_model_path

        path = resolve_model_path("minilm")
        lines.append(f"default model: minilm -> {path}")
    except Exception as e:
        lines.append(f"default model: minilm -> not available ({_one_line(e)})")
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------- bench / profile
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
    """The full parser.  The bench / profile modules are imported only when ``argv`` selects
    them (so that ``bertfast encode`` never imports them)."""
    parser = _Parser(prog=PROG, description="bertfast: a fast BERT encoder (Triton on GPU, PyTorch on CPU)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.unavailable_commands = {}  # lazy command -> why its module cannot be imported
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("encode", help="embed texts (mean pooling + L2 normalisation)",
                       description="Embed texts and print a preview (or --json).")
    p.add_argument("texts", nargs="*", type=_text_arg, metavar="TEXT",
                   help="texts to embed; '-' reads one text per line from stdin")
    p.add_argument("--file", "-f", action="append", metavar="FILE",
                   help="read texts from FILE, one per line ('-' for stdin); repeatable")
    _add_model_args(p)
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="texts per batch (default 32)")
    p.add_argument("--json", action="store_true", help='print [{"text": ..., "embedding": [...]}, ...]')
    p.add_argument("--no-normalize", action="store_true", help="skip the L2 normalisation")
    p.add_argument("--tokens", action="store_true",
                   help="print the contextual vector of every word piece (with its character offsets) instead "
                        "of one sentence embedding; [CLS], [SEP] and padding left out; not normalised")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layer", type=int, action="append", metavar="N",
                   help="read hidden state N (0 = embeddings, -1 = last layer, the default); repeat to average "
                        "several layers")
    g.add_argument("--scalar-mix", action="store_true",
                   help="an equal-weight ScalarMix of every layer's hidden states (embeddings included)")
    g = p.add_argument_group("corpus files (bertfast.corpus): row i of --output is row i of --input")
    g.add_argument("--input", "-i", metavar="FILE",
                   help="encode every row of FILE: .txt (one text per line, blank lines kept as rows: the "
                        "embedding of [CLS] [SEP]), .jsonl / .csv / .tsv / .parquet (the text column: --field)")
    g.add_argument("--field", metavar="NAME",
                   help="the JSON key / CSV, TSV or parquet column holding the text (default: text when there "
                        "is one, else the only column)")
    g.add_argument("--output", "-o", metavar="FILE",
                   help="write the embeddings to FILE: .npy (N, D), .parquet (id, embedding) or .jsonl, plus "
                        "FILE.manifest.json")
    g.add_argument("--output-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the stored vectors (default float32)")
    g.add_argument("--skip-empty", action="store_true",
                   help="leave blank rows out (the manifest lists them in skipped_rows; the id column of "
                        ".parquet/.jsonl keeps the input row)")
    g.add_argument("--chunk-size", type=_positive_int, default=None, metavar="N",
                   help="rows per chunk file, the unit of resuming and of work per process (default 2048)")
    g.add_argument("--resume", action="store_true",
                   help="insist on resuming an interrupted run (a matching one is resumed anyway)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output or interrupted run")
    g.add_argument("--ray", action="store_true",
                   help="encode on Ray Data (bertfast[ray]): the current cluster, or a local one")
    g.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="with --ray: model replicas (default: one per GPU, else 2 CPU workers)")
    # tests only: SIGKILL the process after N chunks, a real interruption (see tests/test_corpus.py)
    g.add_argument("--kill-after-chunks", type=_positive_int, default=None, help=argparse.SUPPRESS)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show a progress line on stderr")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show progress (default: shown for many texts on a terminal)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("similarity", help="cosine similarity of two texts",
                       description="Print the cosine similarity of the embeddings of two texts.")
    p.add_argument("text_a", type=_text_arg, metavar="TEXT_A")
    p.add_argument("text_b", type=_text_arg, metavar="TEXT_B")
    _add_model_args(p)
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("info", help="versions, devices, usable backends, default model",
                       description="Print versions, devices, which backends can run here and the default model path.")
    p.set_defaults(func=cmd_info)

    selected = _first_command(list(argv) if argv is not None else sys.argv[1:])
    for name, (target, help_text) in LAZY_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text} ({target})")
        error = None
        if selected == name:
            try:
                lazy_target(target).add_arguments(p)
            except ImportError as e:
                error = _one_line(f"cannot import {target}: {e}")
            except AttributeError as e:
                error = _one_line(f"{target} has no add_arguments(): {e}")
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
        with _torch_threads(threads if isinstance(threads, int) else None):
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
        if args.debug or not isinstance(e, _expected_errors()):
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
