"""pytest-benchmark suite: small versions of the ``bertfast bench`` cases.

    pytest benchmarks/ --benchmark-only                      # run them
    pytest benchmarks/ --benchmark-only --benchmark-autosave # keep a run in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare  # compare with the last saved run
    pytest benchmarks/ --benchmark-only --bench-threads 1    # pin torch's CPU threads

The cases come from :mod:`bertfast.bench.suites` (the same builders the CLI uses) at sizes that
also run on a CPU.  Triton rows are skipped without a CUDA GPU, and under ``TRITON_INTERPRET=1``
(interpreter timings are not performance).  Each round is one call; on CUDA the L2 cache is
flushed and the device synchronised before it, and the call synchronises after itself, so the
wall-clock pytest-benchmark measures is the call's own time (launch overhead included).

This directory is not part of the main test suite (``pytest`` alone runs ``tests/`` only).
"""
import pytest
import torch

from bertfast.bench import harness

CUDA = torch.cuda.is_available() and not harness.interpreter_active()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32
ROUNDS = 30 if CUDA else 5


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=None, help="torch CPU threads for the benchmarks")


def pytest_configure(config):
    n = config.getoption("--bench-threads", default=None)
    if n:
        torch.set_num_threads(n)


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
        first = prep.make_inputs()
        n = bencher.copies_for(harness._nbytes(first)) if prep.rotate else 1
        inputs = [first] + [prep.make_inputs() for _ in range(n - 1)]
        state = {"i": 0}

        def setup():
            args = inputs[state["i"] % len(inputs)]
            state["i"] += 1
            if CUDA:
                if not case.end_to_end:
                    bencher._flush()
                torch.cuda.synchronize()
            return args, {}

        def target(*args):
            out = prep.fn(*args)
            if CUDA:
                torch.cuda.synchronize()
            return out

        with harness.InterpreterGuard() as guard:
            benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        if guard.launches:
            pytest.fail("Triton kernels ran in the interpreter: " + harness.INTERPRETER_REASON)
        med = benchmark.stats.stats.median if benchmark.stats else None
        info = {"suite": case.suite, "op": case.op, "impl": case.impl, "shape": case.shape, "dtype": case.dtype,
                "flops": case.flops, "bytes": case.bytes, "device": str(DEVICE), "rotated_copies": n}
        if med:
            if case.flops:
                info["tflops"] = case.flops / med / 1e12
            if case.bytes:
                info["gbps"] = case.bytes / med / 1e9
        info.update({k: v for k, v in prep.info.items() if isinstance(v, (str, int, float))})
        benchmark.extra_info.update(info)

    return run
