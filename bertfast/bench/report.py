"""Benchmark output: one JSON document, a markdown table and PNG plots per run.

File names: ``<stem>.json``, ``<stem>.md``, ``<stem>_<suite>_speedup.png`` and
``<stem>_<suite>_peak.png`` with ``stem = <YYYY-MM-DD>_<device>_<suites>`` (``device`` is the GPU
name, e.g. ``nvidia-h100-80gb-hbm3``, or ``cpu``); an existing stem gets ``-2``, ``-3``, ...
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from bertfast.bench.harness import SCHEMA, STATUS_OK, Result, device_slug

REQUIRED_KEYS = ("schema", "environment", "calibration", "settings", "suites", "notes", "results", "summary")
RESULT_KEYS = ("suite", "op", "impl", "shape", "dtype", "status", "reason", "metric", "flops", "bytes", "timing",
               "tflops", "gbps", "fraction_of_peak", "speedup_vs_baseline", "peak_mem_bytes")


# --------------------------------------------------------------------------- JSON
def _clean(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists, unknown objects -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def build_document(results: Sequence[Result], environment: Dict[str, Any], calibration: Dict[str, Any],
                   settings: Dict[str, Any], suites: Sequence[str], notes: Sequence[str] = ()) -> Dict[str, Any]:
    counts: Dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    doc = {
        "schema": SCHEMA,
        "environment": environment,
        "calibration": calibration,
        "settings": settings,
        "suites": list(suites),
        "notes": list(notes),
        "results": [r.to_dict() for r in results],
        "summary": {"cases": len(results), **{f"n_{k}": v for k, v in sorted(counts.items())}},
    }
    return _clean(doc)


def validate_document(doc: Dict[str, Any]) -> List[str]:
    """Problems with a results document (empty: it has every required key)."""
    problems = [f"missing key {k!r}" for k in REQUIRED_KEYS if k not in doc]
    env = doc.get("environment", {})
    for k in ("command", "machine", "device", "versions", "created"):
        if k not in env:
            problems.append(f"environment lacks {k!r}")
    for k in ("torch", "triton", "transformers", "python"):
        if k not in env.get("versions", {}):
            problems.append(f"environment.versions lacks {k!r}")
    for i, r in enumerate(doc.get("results", [])):
        for k in RESULT_KEYS:
            if k not in r:
                problems.append(f"results[{i}] lacks {k!r}")
    return problems


# --------------------------------------------------------------------------- markdown
def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def _mib(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _shape_label(shape: Dict[str, Any], skip: Iterable[str] = ()) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k not in skip)


def markdown_table(results: Sequence[Result], suite: str, footnotes: Dict[str, int]) -> str:
    rows = [r for r in results if r.suite == suite]
    if not rows:
        return ""
    metric_head = "TFLOP/s" if all(r.metric == "tflops" for r in rows) else "TFLOP/s or GB/s"
    end_to_end = suite == "encoder"
    mem_head = "peak MiB" if end_to_end else "peak +MiB"
    base = rows[0].baseline
    head = (f"| op | shape | impl | median ms | p10-p90 ms | {metric_head} | % of peak | vs {base} | {mem_head} | "
            f"check | notes |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if r.status == STATUS_OK:
            t = r.timing or {}
            med = _fmt(t.get("median_ms"))
            spread = f"{_fmt(t.get('p10_ms'))}-{_fmt(t.get('p90_ms'))}"
            rate = (f"{_fmt(r.gbps)} GB/s" if r.metric == "gbps" else f"{_fmt(r.tflops)}") if metric_head != "TFLOP/s" \
                else _fmt(r.tflops)
            frac = "-" if r.fraction_of_peak is None else f"{100 * r.fraction_of_peak:.0f}%"
            sp = "-" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x"
            mem = _mib(r.peak_mem_bytes if end_to_end else r.peak_extra_bytes)
            chk = "-"
            if r.check:
                chk = ("ok" if r.check.get("ok") else "FAIL") + (
                    f" ({r.check['max_abs_err']:.1e})" if r.check.get("max_abs_err") is not None else "")
            notes = r.notes
            if r.info.get("sdpa_backend"):
                notes = (notes + "; " if notes else "") + f"backend: {r.info['sdpa_backend']}"
        else:
            reason = r.reason or r.status
            n = footnotes.setdefault(reason, len(footnotes) + 1)
            med, spread, rate, frac, sp, mem, chk = (f"{r.status} [{n}]", "", "", "", "", "", "")
            notes = r.notes
        lines.append(f"| {r.op} | {_shape_label(r.shape)} | {r.impl} | {med} | {spread} | {rate} | {frac} | {sp} | "
                     f"{mem} | {chk} | {notes} |")
    return "\n".join(lines)


def markdown(doc_results: Sequence[Result], environment: Dict[str, Any], calibration: Dict[str, Any],
             suites: Sequence[str], notes: Sequence[str] = ()) -> str:
    env = environment
    dev = env.get("device", {})
    v = env.get("versions", {})
    out = [f"# bertfast benchmark: {', '.join(suites)}", ""]
    out.append(f"- date: {env.get('created')}")
    out.append(f"- device: {dev.get('name')} ({dev.get('type')})" + (
        f", driver {dev.get('driver')}, CUDA {dev.get('cuda_runtime')}" if dev.get("type") == "cuda" else
        f", {dev.get('threads')} torch threads"))
    out.append(f"- versions: torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, "
               f"bertfast {v.get('bertfast')}, python {v.get('python')}" + (
                   f", git {env.get('git_commit')}" if env.get("git_commit") else ""))
    out.append(f"- command: `{env.get('command')}`")
    cp, mm = calibration.get("copy", {}), calibration.get("matmul", {})
    if "gbps" in cp or "tflops" in mm:
        out.append(f"- measured peaks (this run): copy {_fmt(cp.get('gbps'))} GB/s, "
                   f"{mm.get('dtype')} matmul {mm.get('m')}^3 {_fmt(mm.get('tflops'))} TFLOP/s")
    for n in notes:
        out.append(f"- note: {n}")
    out.append("")
    footnotes: Dict[str, int] = {}
    for s in suites:
        t = markdown_table(doc_results, s, footnotes)
        if t:
            out += [f"## {s}", "", t, ""]
    if footnotes:
        out.append("Unavailable / failed rows:")
        out.append("")
        for reason, n in sorted(footnotes.items(), key=lambda kv: kv[1]):
            out.append(f"[{n}] {reason}")
        out.append("")
    out.append("median over timed calls (warm-up excluded); p10-p90 is the spread; `% of peak` is against the copy "
               "bandwidth (GB/s rows) or matmul rate (TFLOP/s rows) measured at the start of this run; FLOPs count "
               "useful work only (valid tokens, unmasked attention pairs).")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots
def _plot_bars(path: str, title: str, ylabel: str, groups: List[str], series: Dict[str, List[Optional[float]]],
               hline: Optional[float] = None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig_w = min(max(6.0, 0.5 * len(groups) * max(1, len(series)) ** 0.5 + 2), 40.0)
    fig, ax = plt.subplots(figsize=(fig_w, 4.5))
    if not groups or not series:
        ax.text(0.5, 0.5, "no successful rows to plot", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        n = len(series)
        width = 0.8 / n
        xs = list(range(len(groups)))
        for i, (name, vals) in enumerate(series.items()):
            ax.bar([x + (i - (n - 1) / 2) * width for x in xs], [v if v is not None else 0.0 for v in vals],
                   width=width, label=name)
        if hline is not None:
            ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(xs)
        ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group_label(r: Result) -> str:
    skip = ("model",) if r.suite == "encoder" else ()
    prefix = r.shape.get("model", r.op) if r.suite == "encoder" else r.op
    return f"{prefix} {_shape_label(r.shape, skip)}"


def plots(results: Sequence[Result], stem_path: str, suites: Sequence[str], device_name: str) -> List[str]:
    """Two PNGs per suite: speedup vs the baseline per shape, achieved fraction of measured peak."""
    written = []
    for s in suites:
        rows = [r for r in results if r.suite == s]
        if not rows:
            continue
        ok = [r for r in rows if r.status == STATUS_OK]
        groups: List[str] = []
        for r in ok:
            g = _group_label(r)
            if g not in groups:
                groups.append(g)
        impls: List[str] = []
        for r in ok:
            if r.impl not in impls:
                impls.append(r.impl)
        base = rows[0].baseline
        speed = {i: [None] * len(groups) for i in impls if i != base}
        frac = {i: [None] * len(groups) for i in impls}
        for r in ok:
            gi = groups.index(_group_label(r))
            if r.impl in speed and r.speedup_vs_baseline is not None:
                speed[r.impl][gi] = r.speedup_vs_baseline
            if r.fraction_of_peak is not None:
                frac[r.impl][gi] = r.fraction_of_peak
        speed = {k: v for k, v in speed.items() if any(x is not None for x in v)}
        frac = {k: v for k, v in frac.items() if any(x is not None for x in v)}
        p1 = f"{stem_path}_{s}_speedup.png"
        _plot_bars(p1, f"{s}: speedup vs {base} ({device_name})", f"speedup vs {base} (x)", groups if speed else [],
                   speed, hline=1.0)
        p2 = f"{stem_path}_{s}_peak.png"
        _plot_bars(p2, f"{s}: achieved fraction of measured peak ({device_name})", "fraction of peak",
                   groups if frac else [], frac)
        written += [p1, p2]
    return written


# --------------------------------------------------------------------------- files
def file_stem(environment: Dict[str, Any], suites: Sequence[str], out_dir: str) -> str:
    date = (environment.get("created") or _dt.date.today().isoformat())[:10]
    base = f"{date}_{device_slug(environment)}_{'-'.join(suites)}"
    stem, k = base, 1
    while os.path.exists(os.path.join(out_dir, stem + ".json")):
        k += 1
        stem = f"{base}-{k}"
    return stem


def write_all(results: Sequence[Result], environment: Dict[str, Any], calibration: Dict[str, Any],
              settings: Dict[str, Any], suites: Sequence[str], out_dir: str, notes: Sequence[str] = (),
              make_plots: bool = True) -> Dict[str, Any]:
    """Write JSON, markdown and PNGs into ``out_dir``; returns {"json", "markdown", "plots", "text"}."""
    os.makedirs(out_dir, exist_ok=True)
    stem = file_stem(environment, suites, out_dir)
    stem_path = os.path.join(out_dir, stem)
    doc = build_document(results, environment, calibration, settings, suites, notes)
    with open(stem_path + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    text = markdown(results, environment, calibration, suites, notes)
    with open(stem_path + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    pngs = plots(results, stem_path, suites, environment.get("device", {}).get("name") or "") if make_plots else []
    return {"json": stem_path + ".json", "markdown": stem_path + ".md", "plots": pngs, "text": text, "stem": stem}
