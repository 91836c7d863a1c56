"""``bertfast encode``, ``bertfast similarity`` and ``bertfast info``: the commands that are
always there (their parsers are built on every call; torch is imported when one runs).

    bertfast encode TEXT... [--file FILE] [--model PATH|minilm] [--device cpu|cuda]
                            [--dtype float32|float16|bfloat16] [--json] [--batch-size N]
    bertfast encode --input FILE --output FILE.npy|.parquet|.jsonl [--field NAME] [--skip-empty]
                            [--output-dtype float32|float16] [--resume] [--overwrite] [--ray]
                            (bertfast.corpus; under torchrun each rank encodes its share)
    bertfast similarity TEXT_A TEXT_B [--model ...] [--device ...] [--dtype ...]
    bertfast info
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

from bertfast.cli.args import (
    CLIError, add_model_args, add_progress_arguments, cuda_unavailable_reason, one_line, positive_int, read_stdin,
    text_arg,
)

# how many values of each embedding the default preview shows
PREVIEW_VALUES = 6


# ---------------------------------------------------------------------------- encode
def _read_lines(source: str) -> list[str]:
    """The lines of a file ('-': stdin), blank ones kept as rows (row i = line i), split as
    bertfast.corpus splits .txt input (on \\n only)."""
    from bertfast.corpus import split_lines

    if source == "-":
        data = read_stdin()
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
        return None, one_line(f"{type(e).__name__}: {e}")


def _backend_report(torch, triton_version: Optional[str], triton_error: str) -> list[tuple[str, bool, str]]:
    rows = []
    # Triton on the GPU
    if triton_version is None:
        rows.append(("Triton on GPU", False, f"triton is not importable ({triton_error})"))
    elif not torch.cuda.is_available():
        rows.append(("Triton on GPU", False, cuda_unavailable_reason()))
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
        lines.append(f"default model: minilm -> not available ({one_line(e)})")
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------- parsers
def add_commands(sub) -> None:
    """The encode, similarity and info subparsers, added to ``sub`` (bertfast.cli's subparsers)."""
    p = sub.add_parser("encode", help="embed texts (mean pooling + L2 normalisation)",
                       description="Embed texts and print a preview (or --json).")
    p.add_argument("texts", nargs="*", type=text_arg, metavar="TEXT",
                   help="texts to embed; '-' reads one text per line from stdin")
    p.add_argument("--file", "-f", action="append", metavar="FILE",
                   help="read texts from FILE, one per line ('-' for stdin); repeatable")
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="texts per batch (default 32)")
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
    g.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                   help="rows per chunk file, the unit of resuming and of work per process (default 2048)")
    g.add_argument("--resume", action="store_true",
                   help="insist on resuming an interrupted run (a matching one is resumed anyway)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output or interrupted run")
    g.add_argument("--ray", action="store_true",
                   help="encode on Ray Data (bertfast[ray]): the current cluster, or a local one")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="with --ray: model replicas (default: one per GPU, else 2 CPU workers)")
    # tests only: SIGKILL the process after N chunks, a real interruption (see tests/test_corpus.py)
    g.add_argument("--kill-after-chunks", type=positive_int, default=None, help=argparse.SUPPRESS)
    add_progress_arguments(p, "always show a progress line on stderr",
                           "never show progress (default: shown for many texts on a terminal)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("similarity", help="cosine similarity of two texts",
                       description="Print the cosine similarity of the embeddings of two texts.")
    p.add_argument("text_a", type=text_arg, metavar="TEXT_A")
    p.add_argument("text_b", type=text_arg, metavar="TEXT_B")
    add_model_args(p)
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("info", help="versions, devices, usable backends, default model",
                       description="Print versions, devices, which backends can run here and the default model path.")
    p.set_defaults(func=cmd_info)
