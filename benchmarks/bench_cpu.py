#!/usr/bin/env python3
"""Thin script over the installed harness: ``bertfast bench cpu``.

    python benchmarks/bench_cpu.py [--quick] [--model minilm|PATH] [--threads 1 2] [--workloads NAME ...]
                                   [--systems NAME ...] [--rounds N] [--corpus-size N] [--compile] [--out DIR]

bertfast against ONNX Runtime, OpenVINO, transformers and sentence-transformers on a CPU, at
each thread count, round-robin, with spread and the targets (:mod:`bertfast.bench.cpu`; needs
``pip install "bertfast[cpu-bench]"`` for every row).  Same options as ``bertfast bench cpu``
(see ``--help``); results go to --out (default ./bench-results).

``SENTENCES`` (the length mix of the corpus workload) is re-exported here: other scripts use
``from bench_cpu import SENTENCES``.
"""
import sys

from bertfast.bench import main
from bertfast.bench.cpu import SENTENCES

__all__ = ["SENTENCES", "main"]

if __name__ == "__main__":
    sys.exit(main(["cpu", *sys.argv[1:]], prog="benchmarks/bench_cpu.py"))
