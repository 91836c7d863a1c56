"""pytest-benchmark suite: small versions of the ``bertfast bench`` cases.

    pytest benchmarks/ --benchmark-only                      # run them
    pytest benchmarks/ --benchmark-only --benchmark-autosave # keep a run in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare  # compare with the last saved run
    pytest benchmarks/ --benchmark-only --bench-threads 2    # torch CPU threads (default 1 on CPU)

The cases come from :mod:`bertfast.bench.suites` (the same builders the CLI uses) at sizes that
also run on a CPU.  Triton rows are skipped without a CUDA GPU, and under ``TRITON_INTERPRET=1``
(interpreter timings are not performance).

Timer and rounds.  The clock is ``time.perf_counter`` (nanosecond resolution).  Each round
times enough calls (``iterations``) to last about :data:`ROUND_MS`, so that a sub-millisecond
row is not one call against the clock's and the scheduler's granularity; the inputs rotate
inside the round.  On CUDA every call ends with a synchronisation (what the round measures is
the calls' own time, launch overhead included; ``bertfast bench`` has the device-side timings).

Threads.  On CPU torch runs 1 thread here unless ``--bench-threads`` says otherwise: on a busy
machine a multi-threaded op waits for its descheduled threads, and its time grows in steps of
the scheduler tick (4 ms at 250 Hz) -- the medians of this suite once came out in 4 ms steps for
exactly that reason (eager attention at 2x12x64x64: ~24 ms with 2 threads on a loaded 2-core
machine, 1.5 ms with 1).

This directory is not part of the main test suite (``pytest`` alone runs ``tests/`` only).
"""
import math
import time

import pytest
import torch

from bertfast.bench import harness

DEVICE, DTYPE = harness.bench_device()
CUDA = DEVICE.type == "cuda"
ROUNDS = 30 if CUDA else 15
ROUND_MS = 2.0  # at least this much timed work per round


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=None,
                     help="torch CPU threads for the benchmarks (default: 1 on CPU)")


def pytest_configure(config):
    n = config.getoption("--bench-threads", default=None)
    if n or not CUDA:
        torch.set_num_threads(n or 1)


@pytest.fixture
def run_case(benchmark):
    """Benchmark one harness Case with pytest-benchmark; skips unavailable rows."""

    def run(case):
        if case.unavailable:
            pytest.skip(case.unavailable)
        if case.triton:
            why = harness.triton_unavailable_reason(DEVICE)
            if why:
                pytest.skip(why)
        benchmark.group = case.group  # rows of one op and shape are compared side by side
        bencher = harness.Bencher(DEVICE, quick=True)
        try:
            prep = case.build()
        except harness.Unavailable as e:
            pytest.skip(str(e))
        inputs = bencher.inputs_for(prep)
        state = {"i": 0}

        def target():
            if prep.before is not None:
                prep.before()
            out = prep.fn(*inputs[state["i"] % len(inputs)])
            state["i"] += 1
            if CUDA:
                torch.cuda.synchronize()
            return out

        with harness.InterpreterGuard() as guard:
            target()  # first call (compilation) outside the rounds
            t0 = time.perf_counter()
            target()
            one_ms = (time.perf_counter() - t0) * 1e3
            iterations = max(1, math.ceil(ROUND_MS / max(one_ms, 1e-6)))
            benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=1, iterations=iterations)
        if guard.launches:
            pytest.fail("Triton kernels ran in the interpreter: " + harness.INTERPRETER_REASON)
        med = benchmark.stats.stats.median if benchmark.stats else None
        info = {"suite": case.suite, "op": case.op, "impl": case.impl, "shape": case.shape, "dtype": case.dtype,
                "flops": case.flops, "bytes": case.bytes, "device": str(DEVICE), "rotated_copies": len(inputs),
                "iterations": iterations, "threads": torch.get_num_threads()}
        if med:
            if case.flops:
                info["tflops"] = case.flops / med / 1e12
            if case.bytes:
                info["gbps"] = case.bytes / med / 1e9
        info.update({k: v for k, v in prep.info.items() if isinstance(v, (str, int, float))})
        benchmark.extra_info.update(info)

    return run
