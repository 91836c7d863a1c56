"""``bertfast bench`` and ``bertfast profile``: their arguments, and the stand-alone entry points
of the measurement package (:mod:`bertfast.bench`): :func:`bench_main` (``benchmarks/*.py``,
``bertfast.bench.main``), :func:`profile_main` (``bertfast.bench.profile.main``) and
:func:`evidence_main` (``python -m bertfast.bench.evidence``).  The runs are the library's:
``bertfast.bench.run``, ``bertfast.bench.profile.run``, ``bertfast.bench.evidence.run``.

Bad values (an --out that is a file, --device cuda without CUDA, an unknown --impl, counts < 1,
...) are refused while parsing, before anything runs.  Importing this module imports no torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from bertfast.bench import DEFAULT_OUT, IMPLS, MODELS, SUITES
from bertfast.cli.args import Command, bench_device_arg, nonnegative_int, out_dir_arg, positive_int, run_in


# ---------------------------------------------------------------------------- bertfast bench
def bench_model_arg(value: str) -> str:
    """``--model``: a preset name (:data:`bertfast.bench.MODELS`), or (``bench cpu`` only) a checkpoint directory."""
    if value in MODELS or os.path.isdir(os.path.expanduser(value)):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(MODELS)}, or a checkpoint "
                                     f"directory for bench cpu)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``bertfast bench`` arguments to ``parser`` (``bertfast bench`` and :func:`bench_main`).
    Bad values (an --out that is a file, --device cuda without CUDA, an unknown --impl, counts
    < 1, an unknown --workloads / --systems name) are refused while parsing, before anything runs."""
    from bertfast.bench import cpu

    parser.description = ((parser.description + ". ") if parser.description else "") + (
        "Suites: kernels (ops + attention), attention, encoder, host (host work per forward, any machine), "
        "cpu (bertfast vs ONNX Runtime / OpenVINO / transformers / sentence-transformers on a CPU), "
        "all, evidence (the ~8-minute GPU evidence run; --dry-run: its plumbing on CPU) (give the suite first). "
        "Without a CUDA GPU the "
        "CPU comparisons run and Triton rows are marked unavailable.")
    parser.add_argument("suite", nargs="?", default="all", choices=SUITES, help="what to benchmark (default: all)")
    parser.add_argument("--model", nargs="+", type=bench_model_arg, default=None, metavar="NAME",
                        help="model shapes: minilm, bert-base, bert-large (default: all three on GPU for the encoder, "
                             "bert-base and bert-large for kernels; minilm on CPU); bench cpu: one name or a "
                             "checkpoint directory with tokenizer.json (default minilm)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="auto: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", nargs="+", type=positive_int, default=None, metavar="N", help="batch sizes")
    parser.add_argument("--seq", nargs="+", type=positive_int, default=None, metavar="N",
                        help="sequence lengths (with --batch: every combination)")
    parser.add_argument("--lengths", default="both", choices=("full", "mixed", "both"),
                        help="full-length sequences, mixed lengths uniform in [0.3, 1.0]*S, or both (default)")
    parser.add_argument("--out", default=DEFAULT_OUT, type=out_dir_arg, metavar="DIR",
                        help=f"directory for JSON / markdown / PNG (default: ./{DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="a few small shapes and short timing loops")
    parser.add_argument("--device", default="auto", type=bench_device_arg, choices=("auto", "cuda", "cpu"))
    parser.add_argument("--impl", nargs="+", default=None, choices=IMPLS, metavar="NAME",
                        help="only these implementations: " + ", ".join(IMPLS))
    parser.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include torch.compile rows (default: on GPU without --quick; off on CPU, where "
                             "compiling is slow)")
    parser.add_argument("--timer", default="events", choices=("events", "do_bench"),
                        help="GPU timer: CUDA events per call (default) or triton.testing.do_bench")
    parser.add_argument("--threads", nargs="+", type=positive_int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice); bench cpu: every thread count to run, "
                             "for torch, ONNX Runtime and OpenVINO alike (default: 1 2)")
    parser.add_argument("--workloads", nargs="+", choices=cpu.WORKLOADS, default=None, metavar="NAME",
                        help="bench cpu: " + ", ".join(cpu.WORKLOADS) + " (default: all; --quick: "
                             + " ".join(cpu.QUICK_WORKLOADS) + ")")
    parser.add_argument("--systems", nargs="+", choices=cpu.SYSTEMS, default=None, metavar="NAME",
                        help="bench cpu: " + ", ".join(cpu.SYSTEMS) + " (default: all)")
    parser.add_argument("--rounds", type=positive_int, default=None, metavar="N",
                        help="bench cpu: timed rounds per workload (default: 15 short, 5 for 32x128 and "
                             "128-mixed-256, 3 for the corpus; fewer with --quick)")
    parser.add_argument("--corpus-size", type=positive_int, default=None, metavar="N",
                        help=f"bench cpu: texts in the corpus workload (default {cpu.DEFAULT_CORPUS_SIZE}; "
                             f"--quick {cpu.QUICK_CORPUS_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--dry-run", action="store_true",
                        help="evidence: run every step's plumbing on CPU with tiny shapes and the Triton interpreter")
    parser.add_argument("--short", action="store_true",
                        help="evidence: versions, host and encoder only, in about two minutes (same files)")
    parser.add_argument("--budget", type=positive_int, default=None, metavar="S",
                        help="evidence: seconds for all steps together (default 480); a step gets at most what is "
                             "left")


def build_bench_parser(prog: str = "bertfast bench") -> argparse.ArgumentParser:
    """``bertfast bench``'s arguments in a parser of their own (plain argparse errors)."""
    p = argparse.ArgumentParser(prog=prog, description="bertfast benchmarks.")
    add_bench_arguments(p)
    return p


def bench_main(argv: Optional[Sequence[str]] = None, prog: str = "bertfast bench") -> int:
    """Stand-alone entry point (the benchmarks/*.py scripts use it, as ``bertfast.bench.main``)."""
    from bertfast import bench

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_bench_parser(prog).parse_args(argv)
    args._command = ["bertfast", "bench", *argv]  # the equivalent, reproducible command
    return bench.run(args)


# ---------------------------------------------------------------------------- bertfast profile
def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``bertfast profile`` arguments to ``parser``.  Bad values (counts < 1, a negative
    --warmup, an --out that is a file, --device cuda without CUDA) are refused while parsing."""
    parser.add_argument("--model", default="minilm", metavar="NAME|PATH",
                        help="minilm (bundled weights), bert-base, bert-large (random weights), or a checkpoint "
                             "directory (default: minilm)")
    parser.add_argument("--impl", default="bertfast", choices=("bertfast", "transformers"),
                        help="profile bertfast's BertModel (default) or transformers' (same weights)")
    parser.add_argument("--backend", default=None, choices=("torch", "triton", "auto"),
                        help="bertfast backend (default: the model's default); the forward runs eagerly, without "
                             "CUDA-graph replay, so that every op shows")
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"),
                        help="transformers attention implementation for --impl transformers")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=128)
    parser.add_argument("--lengths", default="full", choices=("full", "mixed"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="auto: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default="auto", type=bench_device_arg, choices=("auto", "cuda", "cpu"))
    parser.add_argument("--steps", type=positive_int, default=3, help="profiled forwards (default 3)")
    parser.add_argument("--warmup", type=nonnegative_int, default=2,
                        help="forwards before profiling (default 2; 0: none)")
    parser.add_argument("--top", type=positive_int, default=30, help="rows in the per-kernel table (default 30)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="profile-results", type=out_dir_arg, metavar="DIR",
                        help="directory for the trace and tables (default: ./profile-results)")


def profile_main(argv: Optional[Sequence[str]] = None) -> int:
    """``bertfast profile`` on a parser of its own (``bertfast.bench.profile.main``; the evidence
    run's profile step)."""
    from bertfast.bench import profile

    p = argparse.ArgumentParser(prog="bertfast profile", description="Profile one encoder forward.")
    add_profile_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args._command = ["bertfast profile", *argv]
    return profile.run(args)


# ---------------------------------------------------------------------------- evidence run
def evidence_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bertfast.bench.evidence --step NAME`` (inside a step's process), or the whole
    run: ``python -m bertfast.bench.evidence [--out DIR] [--dry-run] [--budget S]``."""
    from bertfast.bench import evidence

    p = argparse.ArgumentParser(prog="python -m bertfast.bench.evidence")
    p.add_argument("--step", choices=sorted(evidence.STEP_FUNCS), help="run one step here (its result needs "
                   "BERTFAST_EVIDENCE_WORK / BERTFAST_EVIDENCE_OUT / BERTFAST_EVIDENCE_STEP)")
    p.add_argument("--out", default="evidence")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--short", action="store_true", help="versions, host and encoder only, in about two minutes")
    p.add_argument("--budget", type=int, default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.step:
        evidence.STEP_FUNCS[args.step]()
        return 0
    args._command = ["python -m bertfast.bench.evidence", *argv]
    return evidence.run(args)


BENCH = Command(add_bench_arguments, run_in("bertfast.bench"))
PROFILE = Command(add_profile_arguments, run_in("bertfast.bench.profile"))
