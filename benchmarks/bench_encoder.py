"""Thin script over the installed harness: ``bertfast bench encoder``.

    python benchmarks/bench_encoder.py [--quick] [--model ...] [--dtype ...] [--batch N ...] [--seq N ...]
                                       [--lengths full|mixed|both] [--out DIR] ...

Same options as ``bertfast bench`` (see ``--help``); results go to --out (default ./bench-results).
"""
import sys

from bertfast.bench import main

if __name__ == "__main__":
    sys.exit(main(["encoder", *sys.argv[1:]], prog="benchmarks/bench_encoder.py"))
