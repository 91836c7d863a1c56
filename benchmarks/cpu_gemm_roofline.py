"""Where the CPU's GEMM ceiling is: the encoder's linears at each token count, through every
implementation ``bertfast.cpu_linear`` can choose, against a square 2048^3 GEMM (the best this
core reaches), in GFLOP/s per thread count.  Used to judge ``bertfast bench cpu``'s targets: a
model whose GEMMs already run at the ceiling cannot gain more than its non-GEMM share.

    python benchmarks/cpu_gemm_roofline.py [--model minilm] [--threads 1] [--tokens 128 4096] [--out DIR]

Prints a Markdown table (median of 7 timed calls after one warm-up, p10-p90 in brackets) and,
with ``--out``, writes ``<date>_<cpu-slug>_gemm-roofline.{md,json}``.
"""
from __future__ import annotations

import argparse
import time

import torch


def time_ms(fn, n: int = 7) -> dict:
    """The bench harness's statistics (ms) of ``n`` timed calls after one warm-up."""
    from bertfast.bench.harness import summarize

    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return summarize(ts)


def measure(model: str, threads: int, tokens, dtypes) -> dict:
    from bertfast import cpu_linear
    from bertfast.kernels._common import dtype_name
    from bertfast.bench.suites import PRESET_OF
    from bertfast.config import BertConfig

    cfg = BertConfig.preset(PRESET_OF[model])
    C, I = cfg.hidden_size, cfg.intermediate_size
    linears = {"qkv": (3 * C, C), "attn-out": (C, C), "ffn1": (I, C), "ffn2": (C, I)}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for dtype in dtypes:
            cases = [(name, M, N, K) for M in tokens for name, (N, K) in linears.items()] + [("square", 2048, 2048, 2048)]
            for name, M, N, K in cases:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(M, K, generator=g).to(dtype)
                w = torch.randn(N, K, generator=g).to(dtype)
                b = torch.randn(N, generator=g).to(dtype)
                for impl in cpu_linear.IMPLS:
                    if impl.fused_only or not impl.available() or dtype not in impl.dtypes:
                        continue
                    st = time_ms(lambda: impl.fn(x, w, b, None, None))
                    rows.append({"dtype": dtype_name(dtype), "linear": name, "M": M, "N": N, "K": K,
                                 "impl": impl.name, "ms": st["median_ms"], "p10_ms": st["p10_ms"],
                                 "p90_ms": st["p90_ms"], "gflops": 2 * M * N * K / st["median_ms"] / 1e6})
    finally:
        torch.set_num_threads(before)
    return {"model": model, "threads": threads, "cpu": cpu_linear.cpu_features().describe(),
            "torch": torch.__version__, "rows": rows}


def table(doc: dict) -> str:
    lines = [f"GEMM ceiling, {doc['cpu']}, {doc['threads']} thread(s), torch {doc['torch']} ({doc['model']} linears)", "",
             "| dtype | linear | M x N x K | impl | ms [p10, p90] | GFLOP/s |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['dtype']} | {r['linear']} | {r['M']} x {r['N']} x {r['K']} | {r['impl']} | "
                     f"{r['ms']:.2f} [{r['p10_ms']:.2f}, {r['p90_ms']:.2f}] | {r['gflops']:.0f} |")
    return "\n".join(lines)


def study_main(description: str, kind: str, add_arguments, run) -> int:
    """The command line of the CPU study scripts (this one, ``cpu_forward_breakdown.py``):
    ``--model``, ``--threads``, ``--dtypes``, ``--out`` and the script's own arguments
    (``add_arguments(parser)``); ``run(args, dtypes)`` returns the JSON document (with its "cpu")
    and its Markdown, printed and, with ``--out``, written as ``<date>_<cpu-slug>_<kind>.{md,json}``."""
    from bertfast.bench.cpu import save_study

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="minilm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    add_arguments(p)
    a = p.parse_args()
    doc, text = run(a, [getattr(torch, d) for d in a.dtypes])
    print(text)
    if a.out:
        print(f"wrote {save_study(a.out, kind, doc, text)}.md and .json")
    return 0


def main() -> int:
    def run(a, dtypes):
        doc = measure(a.model, a.threads, a.tokens, dtypes)
        return doc, table(doc)

    return study_main(__doc__.split("\n\n")[0], "gemm-roofline",
                      lambda p: p.add_argument("--tokens", type=int, nargs="+", default=[128, 4096]), run)


if __name__ == "__main__":
    raise SystemExit(main())
