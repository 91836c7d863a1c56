"""Benchmark output: one JSON document, a markdown table and PNG plots per run.

File names: ``<stem>.json``, ``<stem>.md``, ``<stem>_<suite>_speedup.png`` and
``<stem>_<suite>_peak.png`` with ``stem = <YYYY-MM-DD>_<device>_<suites>`` (``device`` is the GPU
name, e.g. ``nvidia-h100-80gb-hbm3``, or ``cpu``); an existing stem gets ``-2``, ``-3``, ...

Nothing here claims more than the run measured: a noisy row is marked ``(noisy)`` (table) and
hatched (plots), a speedup inside the combined spread reads ``within noise``, plots carry p10-p90
error bars, and a plot with no bar is not written (one line says so instead).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from bertfast.bench.harness import NOISE_REL, SCHEMA, STATUS_OK, Result, device_slug, speedup_text

REQUIRED_KEYS = ("schema", "environment", "calibration", "settings", "suites", "notes", "results", "summary")
RESULT_KEYS = ("suite", "op", "impl", "shape", "dtype", "status", "reason", "metric", "flops", "bytes", "timing",
               "tflops", "gbps", "fraction_of_peak", "speedup_vs_baseline", "speedup_low", "speedup_high",
               "speedup_significant", "flags", "peak_mem_bytes")


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


def _speedup_cell(r: Result) -> str:
    text = speedup_text(r)
    if text == "-" or r.speedup_low is None:
        return text
    return f"{text} ({_fmt(r.speedup_low)}-{_fmt(r.speedup_high)})"


def markdown_table(results: Sequence[Result], suite: str, footnotes: Dict[str, int]) -> str:
    rows = [r for r in results if r.suite == suite]
    if not rows:
        return ""
    metric_head = "TFLOP/s" if all(r.metric == "tflops" for r in rows) else "TFLOP/s or GB/s"
    end_to_end = suite == "encoder"
    mem_head = "peak MiB" if end_to_end else "peak +MiB"
    base = rows[0].baseline
    head = (f"| op | shape | impl | median ms | p10-p90 ms | n | {metric_head} | % of peak | vs {base} (range) | "
            f"{mem_head} | check | flags, notes |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        notes = "; ".join(r.flags + ([r.notes] if r.notes else []))
        if r.status == STATUS_OK:
            t = r.timing or {}
            med = _fmt(t.get("median_ms")) + (" (noisy)" if r.noisy else "")
            spread = f"{_fmt(t.get('p10_ms'))}-{_fmt(t.get('p90_ms'))}"
            reps = str(t.get("n", "-"))
            rate = (f"{_fmt(r.gbps)} GB/s" if r.metric == "gbps" else f"{_fmt(r.tflops)}") if metric_head != "TFLOP/s" \
                else _fmt(r.tflops)
            frac = "-" if r.fraction_of_peak is None else f"{100 * r.fraction_of_peak:.0f}%"
            if r.fraction_of_peak is not None and r.fraction_of_peak > 1.0:
                frac += " (!)"
            sp = _speedup_cell(r)
            mem = _mib(r.peak_mem_bytes if end_to_end else r.peak_extra_bytes)
            chk = "-"
            if r.check:
                chk = ("ok" if r.check.get("ok") else "FAIL") + (
                    f" ({r.check['max_abs_err']:.1e})" if r.check.get("max_abs_err") is not None else "")
            if r.info.get("sdpa_backend"):
                notes = (notes + "; " if notes else "") + f"backend: {r.info['sdpa_backend']}"
        else:
            reason = r.reason or r.status
            n = footnotes.setdefault(reason, len(footnotes) + 1)
            med, spread, reps, rate, frac, sp, mem, chk = (f"{r.status} [{n}]", "", "", "", "", "", "", "")
        lines.append(f"| {r.op} | {_shape_label(r.shape)} | {r.impl} | {med} | {spread} | {reps} | {rate} | {frac} | "
                     f"{sp} | {mem} | {chk} | {notes} |")
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
        noisy = [k for k, v in (("copy", cp), ("matmul", mm)) if v.get("noisy")]
        out.append(f"- measured peaks (this run, best of the timed calls): copy {_fmt(cp.get('gbps'))} GB/s, "
                   f"{mm.get('dtype')} matmul {mm.get('m')}^3 {_fmt(mm.get('tflops'))} TFLOP/s" +
                   (f" (noisy calibration: {', '.join(noisy)})" if noisy else ""))
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
    out.append(f"median over n timed calls (warm-up excluded), the rows of one op and shape timed round-robin; "
               f"p10-p90 is the spread, and a row whose spread exceeds {100 * NOISE_REL:.0f}% of its median is "
               "flagged (noisy). A speedup is printed only when it lies outside the combined spread (range: "
               "baseline p10 / row p90 to baseline p90 / row p10), else `within noise`. `% of peak` is against the "
               "copy bandwidth (GB/s rows) or matmul rate (TFLOP/s rows, same dtype) measured on this device at the "
               "start of this run, shown only where it applies (bandwidth rows whose inputs exceed the cache); (!) "
               "marks a row above the calibrated peak. FLOPs count useful work only (valid tokens, unmasked "
               "attention pairs).")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots
# one bar: (value, low, high, noisy); None where the row has no value
Bar = Optional[Tuple[float, float, float, bool]]


def _plot_bars(path: str, title: str, ylabel: str, groups: List[str], series: Dict[str, List[Bar]],
               hline: Optional[float] = None) -> None:
    """Grouped bars with error bars (low-high); noisy rows hatched and marked in the legend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig_w = min(max(6.0, 0.5 * len(groups) * max(1, len(series)) ** 0.5 + 2), 40.0)
    fig, ax = plt.subplots(figsize=(fig_w, 4.5))
    n = len(series)
    width = 0.8 / n
    any_noisy = False
    for i, (name, bars) in enumerate(series.items()):
        xs, vals, lo, hi, hatch = [], [], [], [], []
        for gi, b in enumerate(bars):
            if b is None:
                continue
            v, low, high, noisy = b
            xs.append(gi + (i - (n - 1) / 2) * width)
            vals.append(v)
            lo.append(max(v - low, 0.0) if math.isfinite(low) else 0.0)
            hi.append(max(high - v, 0.0) if math.isfinite(high) else 0.0)
            hatch.append(noisy)
            any_noisy |= noisy
        bars_ = ax.bar(xs, vals, width=width, label=name, yerr=[lo, hi], capsize=2,
                       error_kw={"elinewidth": 0.8})
        for patch, noisy in zip(bars_, hatch):
            if noisy:
                patch.set_hatch("//")
                patch.set_alpha(0.55)
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(range(len(groups))))
    ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    note = "error bars: p10-p90 range" + (f"; hatched: noisy (spread > {100 * NOISE_REL:.0f}% of median)"
                                          + (" or above the calibrated peak (see the table)" if hline == 1.0
                                             and "peak" in ylabel else "") if any_noisy else "")
    ax.set_title(f"{title}\n{note}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group_label(r: Result) -> str:
    skip = ("model",) if r.suite == "encoder" else ()
    prefix = r.shape.get("model", r.op) if r.suite == "encoder" else r.op
    return f"{prefix} {_shape_label(r.shape, skip)}"


def _speedup_bar(r: Result) -> Bar:
    if r.speedup_vs_baseline is None or r.impl == r.baseline:
        return None
    low = r.speedup_low if r.speedup_low is not None else r.speedup_vs_baseline
    high = r.speedup_high if r.speedup_high is not None else r.speedup_vs_baseline
    return (r.speedup_vs_baseline, low, high, r.noisy)


def _peak_bar(r: Result) -> Bar:
    f, t = r.fraction_of_peak, r.timing or {}
    if f is None:
        return None
    med, p10, p90 = t.get("median_ms"), t.get("p10_ms"), t.get("p90_ms")
    low = f * med / p90 if med and p90 else f
    high = f * med / p10 if med and p10 else f
    return (f, low, high, r.noisy or f > 1.0)  # above the peak: hatched too (the table says why)


def plots(results: Sequence[Result], stem_path: str, suites: Sequence[str],
          device_name: str) -> Tuple[List[str], List[str]]:
    """Per suite, a speedup-vs-baseline PNG and an achieved-fraction-of-peak PNG, each written
    only when it has at least one bar.  Returns (files written, one line per plot not written)."""
    written, skipped = [], []
    for s in suites:
        rows = [r for r in results if r.suite == s]
        if not rows:
            continue
        ok = [r for r in rows if r.status == STATUS_OK]
        base = rows[0].baseline
        for kind, bar_of, ylabel, hline in (
                ("speedup", _speedup_bar, f"speedup vs {base} (x)", 1.0),
                ("peak", _peak_bar, "fraction of measured peak", 1.0)):
            groups: List[str] = []
            series: Dict[str, List[Bar]] = {}
            for r in ok:
                b = bar_of(r)
                if b is None:
                    continue
                g = _group_label(r)
                if g not in groups:
                    groups.append(g)
                series.setdefault(r.impl, [])
            if not series:
                what = "no row with a speedup" if kind == "speedup" else "no row with a fraction of a calibrated peak"
                skipped.append(f"{s}: {what}; {os.path.basename(stem_path)}_{s}_{kind}.png not written")
                continue
            for name in series:
                series[name] = [None] * len(groups)
            for r in ok:
                b = bar_of(r)
                if b is not None:
                    series[r.impl][groups.index(_group_label(r))] = b
            path = f"{stem_path}_{s}_{kind}.png"
            title = (f"{s}: speedup vs {base} ({device_name})" if kind == "speedup" else
                     f"{s}: achieved fraction of the peak measured in this run ({device_name})")
            _plot_bars(path, title, ylabel, groups, series, hline=hline)
            written.append(path)
    return written, skipped


# --------------------------------------------------------------------------- files
def file_stem(environment: Dict[str, Any], suites: Sequence[str], out_dir: str, device: Optional[str] = None) -> str:
    """``<date>_<device>_<suites>``, ``-2``, ``-3``, ... when taken; ``device`` defaults to
    :func:`harness.device_slug`."""
    date = (environment.get("created") or _dt.date.today().isoformat())[:10]
    base = f"{date}_{device or device_slug(environment)}_{'-'.join(suites)}"
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
    pngs, skipped = (plots(results, stem_path, suites, environment.get("device", {}).get("name") or "")
                     if make_plots else ([], []))
    return {"json": stem_path + ".json", "markdown": stem_path + ".md", "plots": pngs, "plots_skipped": skipped,
            "text": text, "stem": stem}
