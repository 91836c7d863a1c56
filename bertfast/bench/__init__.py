"""``bertfast bench``: benchmarks users can run.

    bertfast bench [kernels|attention|encoder|host|all|evidence] [--model NAME ...] [--dtype auto|fp16|bf16|fp32]
                   [--batch N ...] [--seq N ...] [--lengths full|mixed|both] [--out DIR] [--quick]
                   [--device auto|cuda|cpu] [--impl NAME ...] [--compile/--no-compile] [--timer events|do_bench]
    bertfast bench cpu [--model minilm|PATH] [--threads 1 2] [--workloads NAME ...] [--systems NAME ...]
                       [--rounds N] [--corpus-size N] [--compile] [--out DIR] [--quick] [--no-plots]

Suites: ``kernels`` (each Triton op vs its eager PyTorch equivalent and torch.compile, plus the
attention cases), ``attention`` (attention only: padded / varlen / causal vs eager, SDPA and
torch.compile, forward and forward+backward), ``encoder`` (whole encoders: bertfast vs
transformers eager / SDPA / torch.compile), ``host`` (bertfast's host work per forward on the
Triton path: launches, device reads and host microseconds with launches recorded instead of run,
on any machine: :mod:`bertfast.bench.host`), ``cpu`` (bertfast on a CPU against what a user
already has: ONNX Runtime, OpenVINO, transformers, sentence-transformers, at 1 and 2 threads, on
fixed shapes and a text corpus: :mod:`bertfast.bench.cpu`), ``all`` (kernels, attention, encoder), ``evidence``
(the one-command GPU evidence run, about 8 minutes, every step time-boxed:
:mod:`bertfast.bench.evidence`; ``--dry-run`` runs its plumbing on CPU in well under a minute).

Numbers that cannot mislead: the rows of one op and shape are timed round-robin in one loop,
every row keeps its repetitions and reports median and p10-p90, noisy rows are flagged, a
speedup is printed only when it lies outside the combined spread ("within noise" otherwise),
and ``% of peak`` is shown only against a peak calibrated on the same device in the same run
(see :mod:`bertfast.bench.harness`).

On a CUDA GPU everything runs.  Without one, the CPU comparisons run (bertfast's PyTorch path vs
transformers eager and SDPA, minilm by default; the eager kernel equivalents at small sizes) and
Triton rows are listed as unavailable: Triton timings need a CUDA GPU, and interpreter timings
(``TRITON_INTERPRET=1``) are never reported as performance.

Writes ``<date>_<device>_<suites>.json`` / ``.md`` / ``_<suite>_speedup.png`` / ``_<suite>_peak.png``
into ``--out`` and prints the table.  The harness is :mod:`bertfast.bench.harness`, the cases
:mod:`bertfast.bench.suites`, the output :mod:`bertfast.bench.report`, ``bertfast profile``
:mod:`bertfast.bench.profile`.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from typing import List, Optional, Sequence

SUITES = ("kernels", "attention", "encoder", "host", "cpu", "all", "evidence")
MODELS = ("minilm", "bert-base", "bert-large")
DEFAULT_OUT = "bench-results"


# every --impl name some suite knows (kernels / attention rows, and suites.ENCODER_IMPLS); kept
# here so that the parser does not import torch; tests/test_cli.py checks it against the suites
IMPLS = ("triton", "triton-varlen", "eager", "sdpa", "sdpa-mask", "compile",
         "hf-eager", "hf-sdpa", "hf-compile", "bertfast-torch", "bertfast-triton", "bertfast-triton-unpad",
         "bertfast-triton-graphs", "bertfast-triton-unpad-graphs")


def model_arg(value: str) -> str:
    """``--model``: a preset name (:data:`MODELS`), or (``bench cpu`` only) a checkpoint directory."""
    import os

    if value in MODELS or os.path.isdir(os.path.expanduser(value)):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(MODELS)}, or a checkpoint "
                                     f"directory for bench cpu)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``bertfast bench`` arguments to ``parser`` (used by bertfast.cli and :func:`main`).
    Bad values (an --out that is a file, --device cuda without CUDA, an unknown --impl, counts
    < 1, an unknown --workloads / --systems name) are refused while parsing, before anything runs."""
    from bertfast.bench import cpu
    from bertfast.cli import bench_device_arg, out_dir_arg, positive_int as _pos_int
    parser.description = ((parser.description + ". ") if parser.description else "") + (
        "Suites: kernels (ops + attention), attention, encoder, host (host work per forward, any machine), "
        "cpu (bertfast vs ONNX Runtime / OpenVINO / transformers / sentence-transformers on a CPU), "
        "all, evidence (the ~8-minute GPU evidence run; --dry-run: its plumbing on CPU) (give the suite first). "
        "Without a CUDA GPU the "
        "CPU comparisons run and Triton rows are marked unavailable.")
    parser.add_argument("suite", nargs="?", default="all", choices=SUITES, help="what to benchmark (default: all)")
    parser.add_argument("--model", nargs="+", type=model_arg, default=None, metavar="NAME",
                        help="model shapes: minilm, bert-base, bert-large (default: all three on GPU for the encoder, "
                             "bert-base and bert-large for kernels; minilm on CPU); bench cpu: one name or a "
                             "checkpoint directory with tokenizer.json (default minilm)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="auto: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", nargs="+", type=_pos_int, default=None, metavar="N", help="batch sizes")
    parser.add_argument("--seq", nargs="+", type=_pos_int, default=None, metavar="N",
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
    parser.add_argument("--threads", nargs="+", type=_pos_int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice); bench cpu: every thread count to run, "
                             "for torch, ONNX Runtime and OpenVINO alike (default: 1 2)")
    parser.add_argument("--workloads", nargs="+", choices=cpu.WORKLOADS, default=None, metavar="NAME",
                        help="bench cpu: " + ", ".join(cpu.WORKLOADS) + " (default: all; --quick: "
                             + " ".join(cpu.QUICK_WORKLOADS) + ")")
    parser.add_argument("--systems", nargs="+", choices=cpu.SYSTEMS, default=None, metavar="NAME",
                        help="bench cpu: " + ", ".join(cpu.SYSTEMS) + " (default: all)")
    parser.add_argument("--rounds", type=_pos_int, default=None, metavar="N",
                        help="bench cpu: timed rounds per workload (default: 15 short, 5 for 32x128 and "
                             "128-mixed-256, 3 for the corpus; fewer with --quick)")
    parser.add_argument("--corpus-size", type=_pos_int, default=None, metavar="N",
                        help=f"bench cpu: texts in the corpus workload (default {cpu.DEFAULT_CORPUS_SIZE}; "
                             f"--quick {cpu.QUICK_CORPUS_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--dry-run", action="store_true",
                        help="evidence: run every step's plumbing on CPU with tiny shapes and the Triton interpreter")
    parser.add_argument("--short", action="store_true",
                        help="evidence: versions, host and encoder only, in about two minutes (same files)")
    parser.add_argument("--budget", type=_pos_int, default=None, metavar="S",
                        help="evidence: seconds for all steps together (default 480); a step gets at most what is "
                             "left")


def _resolve_dtype(name: str, cuda: bool):
    """``--dtype``: auto (fp16 on a GPU, fp32 on CPU) or a name :func:`bertfast.sentence.parse_dtype` takes."""
    import torch

    from bertfast.sentence import parse_dtype

    if name == "auto":
        return torch.float16 if cuda else torch.float32
    return parse_dtype(name)


def plan(args, device, dtype) -> tuple[list, list, list]:
    """(cases, suites run, notes) for these arguments on this device."""
    from bertfast.bench import suites as S
    from bertfast.bench.harness import INTERPRETER_REASON, interpreter_active

    cuda = device.type == "cuda"
    quick = bool(args.quick)
    want = {"all": ["kernels", "attention", "encoder"], "kernels": ["kernels", "attention"]}.get(args.suite, [args.suite])
    notes: List[str] = []
    if not cuda:
        notes.append("no CUDA GPU: running the CPU comparisons (bertfast's PyTorch path vs transformers eager / SDPA, "
                     "eager kernel equivalents at small sizes); Triton timings need a CUDA GPU and are listed as "
                     "unavailable")
    if interpreter_active():
        notes.append(INTERPRETER_REASON + " - Triton kernel timings refused")
    do_compile = args.compile if args.compile is not None else (cuda and not quick)
    if not do_compile and args.compile is None:
        notes.append("torch.compile rows skipped (" + ("--quick" if cuda else "CPU: compiling is slow") +
                     "; pass --compile to include them)")
    modes = ["full", "mixed"] if args.lengths == "both" else [args.lengths]
    impl_filter = set(args.impl) if args.impl else None

    def keep(impls):
        return [i for i in impls if impl_filter is None or i in impl_filter]

    pairs = None
    if args.batch or args.seq:
        bs = args.batch or ([1, 8] if not cuda else [8, 32])
        ss = args.seq or [128]
        pairs = list(itertools.product(bs, ss))

    cases = []
    if "kernels" in want:
        models = args.model or (["bert-base", "bert-large"] if cuda else ["minilm"])
        if cuda and quick and not args.model:
            models = ["bert-base"]
        if pairs:
            tokens = sorted({b * s for b, s in pairs})
        elif cuda:
            tokens = [512, 8192] if quick else [512, 2048, 8192, 32768]
        else:
            tokens = [128] if quick else [256, 1024]
        impls = keep(["triton", "eager"] + (["compile"] if do_compile else []))
        cases += S.kernel_cases(models, tokens, device, dtype, impls, seed=args.seed)
    if "attention" in want:
        impls = keep(["triton", "triton-varlen", "eager", "sdpa", "sdpa-mask"] + (["compile"] if do_compile else []))
        if cuda:
            seqs, total = ([128, 512] if quick else [128, 256, 512]), 16384
        else:
            seqs, total = [128], (256 if quick else 1024)
        dirs = ["fwd"] if (quick and not cuda) else ["fwd", "fwd+bwd"]
        causal = not (quick and not cuda)
        if pairs:
            for b, s in pairs:
                cases += S.attention_cases([s], b * s, 12, 64, device, dtype, impls, modes, dirs, causal, args.seed)
        else:
            cases += S.attention_cases(seqs, total, 12, 64, device, dtype, impls, modes, dirs, causal, args.seed)
    if "encoder" in want:
        if args.model:
            models = args.model
        elif cuda:
            models = ["bert-base"] if quick else ["minilm", "bert-base", "bert-large"]
        else:
            models = ["minilm"]
        if pairs:
            shapes = pairs
        elif cuda:
            shapes = S.ENCODER_SHAPES_GPU_QUICK if quick else S.ENCODER_SHAPES_GPU
        else:
            shapes = S.ENCODER_SHAPES_CPU_QUICK if quick else S.ENCODER_SHAPES_CPU
        impls = keep([i for i in S.ENCODER_IMPLS])
        compile_skip = None
        if not do_compile:
            compile_skip = ("torch.compile skipped: --quick (pass --compile)" if cuda else
                            "torch.compile on CPU is slow; pass --compile to include it")
        cases += S.encoder_cases(models, shapes, device, dtype, impls, modes, args.seed,
                                 compile_mode="max-autotune" if cuda else None, compile_skip_reason=compile_skip)
    ran = [s for s in ("kernels", "attention", "encoder") if s in want]
    return cases, ran, notes


def _other_suite_problem(args) -> Optional[str]:
    """What the suites other than ``cpu`` cannot take (a --model directory, several --threads, the
    cpu-only options); None when fine.  Leaves ``args.threads`` one int (or None) for them."""
    if args.model and any(m not in MODELS for m in args.model):
        return f"--model takes {', '.join(MODELS)} here (a checkpoint directory only with bench cpu)"
    cpu_only = [f"--{k.replace('_', '-')}" for k in ("workloads", "systems", "rounds", "corpus_size")
                if getattr(args, k, None) is not None]
    if cpu_only:
        return f"{', '.join(cpu_only)}: only with bench cpu"
    if isinstance(args.threads, list):
        if len(args.threads) > 1:
            return "--threads takes one value here (several only with bench cpu)"
        args.threads = args.threads[0]
    return None


def run(args) -> int:
    """Run ``bertfast bench`` with parsed ``args``; returns the exit status."""
    import torch

    from bertfast.bench import harness, report

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bertfast: error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.suite == "cpu":
        from bertfast.bench import cpu

        return cpu.run(args)
    bad = _other_suite_problem(args)
    if bad:
        print(f"bertfast: error: {bad}", file=sys.stderr)
        return 2
    if args.suite == "host":
        from bertfast.bench import host

        return host.run(args)
    if args.suite == "evidence":
        from bertfast.bench import evidence

        return evidence.run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = _resolve_dtype(args.dtype, cuda)
    cases, ran, notes = plan(args, device, dtype)
    busy = harness.busy_note(device)
    if busy:
        notes.append(busy)
    for n in notes:
        print(f"bertfast bench: {n}", file=sys.stderr)
    env = harness.environment(device, command=getattr(args, "_command", None))
    bencher = harness.Bencher(device, quick=args.quick, timer=args.timer)
    progress = harness.Progress(len(cases) + 1, enabled=not args.no_progress)
    progress.update("calibrating (copy bandwidth, matmul rate)")
    calibration = harness.calibrate(device, dtype, quick=args.quick, bencher=bencher)
    progress.update("calibrated", advance=1)
    results = harness.run_cases(cases, bencher, calibration, progress)
    progress.close()
    model_notes = set()
    for r in results:
        w = r.info.get("weights")
        if w:
            model_notes.add(f"{r.shape.get('model')}: {w}")
    notes += sorted(model_notes)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}
    from bertfast.kernels._common import dtype_name

    settings.update({"device": str(device), "dtype": dtype_name(dtype),
                     "bench_settings": vars(bencher.settings)})
    out = report.write_all(results, env, calibration, settings, ran, args.out, notes, make_plots=not args.no_plots)
    print(out["text"])
    for line in out["plots_skipped"]:
        print(f"bertfast bench: {line}", file=sys.stderr)
    print(f"bertfast bench: wrote {out['json']}, {out['markdown']}" +
          (f" and {len(out['plots'])} plots" if out["plots"] else ""), file=sys.stderr)
    errors = [r for r in results if r.status == harness.STATUS_ERROR]
    for r in errors:
        print(f"bertfast bench: error in {r.suite}/{r.op} {r.impl} {r.shape}: {r.reason}", file=sys.stderr)
    return 1 if errors else 0


def build_parser(prog: str = "bertfast bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="bertfast benchmarks.")
    add_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "bertfast bench") -> int:
    """Stand-alone entry point (the benchmarks/*.py scripts use it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args._command = ["bertfast", "bench", *argv]  # the equivalent, reproducible command
    return run(args)
