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
    """Run ``bertfast bench`` with the arguments bertfast/cli/bench.py parsed; returns the exit status."""
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


def main(argv: Optional[Sequence[str]] = None, prog: str = "bertfast bench") -> int:
    """Stand-alone entry point (the benchmarks/*.py scripts use it): bertfast/cli/bench.py parses."""
    from bertfast.cli.bench import bench_main

    return bench_main(argv, prog)
