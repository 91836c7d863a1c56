"""Where a CPU forward's time goes: bertfast's default CPU path on all-MiniLM-L6-v2 split by op
(torch profiler self time), next to what the GEMMs and the attention core could take at best on
this CPU.  Used to judge ``bertfast bench cpu``'s targets that the GEMM ceiling alone does not
explain (1x128 against OpenVINO, bf16 against fp32).

    python benchmarks/cpu_forward_breakdown.py [--model minilm] [--threads 1] [--shapes 1x128 32x128]
                                               [--dtypes float32 bfloat16] [--out DIR]

Per (shape, dtype): the forward's median ms (20 calls after warm-up; 5 at batch 32), then the
profiler's self CPU time per forward of the ops that take > 0.5 % of it.  The linears run the
implementations ``bertfast tune --device cpu`` measures (timed on first use and stored in the
tuning cache, as ``bertfast bench cpu`` does).  Then the attention core of one layer at that
shape, (B, H, S, D) views as the model makes them, through each formulation torch offers:
``F.scaled_dot_product_attention`` (the model's), explicit ``matmul`` + ``softmax`` + ``matmul``
(fp32 softmax for bf16), and its two batched GEMMs alone.  Writes
``<date>_<cpu-slug>_cpu-breakdown.{md,json}`` with ``--out``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from cpu_gemm_roofline import study_main, time_ms  # this folder's sibling script (run as python benchmarks/...)


def _batch(B: int, S: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(20000, vocab), (B, S), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": torch.ones(B, S, dtype=torch.long),
            "token_type_ids": torch.zeros(B, S, dtype=torch.long)}


def forward_breakdown(model, batch, n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(2):
            model(**batch)
        st = time_ms(lambda: model(**batch), n)
        steps = 3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                model(**batch)
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / steps / 1e3
    ops = sorted(((e.key, e.self_cpu_time_total / steps / 1e3, e.count // steps) for e in prof.key_averages()),
                 key=lambda r: -r[1])
    return {"forward_ms": st, "profiled_ms": total,
            "ops": [{"op": k, "ms": ms, "calls": c} for k, ms, c in ops if ms > 0.005 * total]}


def attention_core(B: int, S: int, H: int, D: int, dtype: torch.dtype, n: int) -> list:
    y = torch.randn(B, S, 3, H, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    q, k, v = y.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, D) views of the fused QKV output
    scale = 1.0 / math.sqrt(D)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    scores = torch.matmul(qc, kc.transpose(-2, -1))
    probs = torch.softmax(scores.float(), -1).to(dtype)

    def explicit():
        s = torch.matmul(q, k.transpose(-2, -1)).float().mul_(scale)
        return torch.matmul(torch.softmax(s, -1).to(dtype), v)

    cases = {
        "sdpa (the model's)": lambda: F.scaled_dot_product_attention(q, k, v),
        "explicit matmul + fp32 softmax + matmul": explicit,
        "q @ k^T alone (batched GEMM)": lambda: torch.matmul(qc, kc.transpose(-2, -1)),
        "softmax alone (fp32)": lambda: torch.softmax(scores.float(), -1),
        "p @ v alone (batched GEMM)": lambda: torch.matmul(probs, vc),
    }
    flops = {"q @ k^T alone (batched GEMM)": 2 * B * H * S * S * D, "p @ v alone (batched GEMM)": 2 * B * H * S * S * D}
    rows = []
    with torch.inference_mode():
        for name, fn in cases.items():
            st = time_ms(fn, n)
            f = flops.get(name)
            rows.append({"case": name, "ms": st["median_ms"], "p10_ms": st["p10_ms"], "p90_ms": st["p90_ms"],
                         "gflops": f / st["median_ms"] / 1e6 if f else None})
    return rows


def measure(model_name: str, threads: int, shapes, dtypes) -> dict:
    from bertfast import BertModel, cpu_linear
    from bertfast.kernels import tuning
    from bertfast.kernels._common import dtype_name
    from bertfast.loading import resolve_model_path

    path = resolve_model_path(model_name)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = []
    try:
        with tuning.autotune():  # first use of each linear class times it (kept in the tuning cache)
            for dtype in dtypes:
                model = BertModel.from_pretrained(path, dtype=dtype, device="cpu").eval()
                cfg = model.config
                H = cfg.num_attention_heads
                for B, S in shapes:
                    n = 20 if B * S <= 512 else 5
                    doc = forward_breakdown(model, _batch(B, S, cfg.vocab_size), n)
                    doc.update(shape=f"{B}x{S}", dtype=dtype_name(dtype),
                               attention=attention_core(B, S, H, cfg.hidden_size // H, dtype, 4 * n))
                    out.append(doc)
    finally:
        torch.set_num_threads(before)
    return {"model": model_name, "threads": threads, "cpu": cpu_linear.cpu_features().describe(),
            "torch": torch.__version__, "rows": out}


def table(doc: dict) -> str:
    lines = [f"CPU forward breakdown, {doc['model']}, {doc['cpu']}, {doc['threads']} thread(s), torch {doc['torch']}", ""]
    for r in doc["rows"]:
        f = r["forward_ms"]
        lines += [f"### {r['shape']} {r['dtype']}: forward {f['median_ms']:.2f} ms [{f['p10_ms']:.2f}, {f['p90_ms']:.2f}]"
                  f" (profiled {r['profiled_ms']:.2f} ms a forward)", "",
                  "| op (self CPU time) | ms a forward | calls | share |", "|---|---|---|---|"]
        for o in r["ops"]:
            lines.append(f"| {o['op']} | {o['ms']:.2f} | {o['calls']} | {100 * o['ms'] / r['profiled_ms']:.1f} % |")
        lines += ["", "Attention core of one layer (ms [p10, p90]; GFLOP/s of the batched GEMMs):", "",
                  "| formulation | ms | GFLOP/s |", "|---|---|---|"]
        for a in r["attention"]:
            g = f"{a['gflops']:.0f}" if a["gflops"] else ""
            lines.append(f"| {a['case']} | {a['ms']:.3f} [{a['p10_ms']:.3f}, {a['p90_ms']:.3f}] | {g} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    def run(a, dtypes):
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
        doc = measure(a.model, a.threads, shapes, dtypes)
        return doc, table(doc)

    return study_main(__doc__.split("\n\n")[0], "cpu-breakdown",
                      lambda p: p.add_argument("--shapes", nargs="+", default=["1x128", "32x128"]), run)


if __name__ == "__main__":
    raise SystemExit(main())
