"""Compile every configuration of every kernel for sm_90 and sm_80 and print a resource table.

    python -m bertfast.kernels.compile_check                 # table for sm_90 and sm_80
    python -m bertfast.kernels.compile_check --arch 90 --json results.json --op linear

Runs with no GPU. If ``TRITON_INTERPRET=1`` is set it re-runs itself without it (interpreted
kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict


# Pseudo-ops for the tuner's candidates that are not in the ops' default tables
# (bertfast.kernels.tuning.compile_specs): "tuning" compiles each candidate once (the test suite's rung),
# "tuning-full" every mask / causal / head-dim / dtype variant the tuner may launch.
TUNING_OPS = {"tuning": False, "tuning-full": True}


def _specs(ops, arch):
    import importlib

    from bertfast.kernels import OP_MODULES

    out = []
    for op in ops:
        if op in TUNING_OPS:
            from bertfast.kernels.tuning import compile_specs

            out.extend(compile_specs(arch, full=TUNING_OPS[op]))
            continue
        mod = importlib.import_module(f"bertfast.kernels.{OP_MODULES[op]}")
        out.extend(mod.compile_specs(arch))
    return out


def _work(args):
    op, arch, index = args
    from bertfast.kernels._compile import compile_spec

    spec = _specs([op], arch)[index]
    return asdict(compile_spec(spec, arch))


def problems(r: dict) -> list[str]:
    """What is wrong with one compile result (empty list: all good)."""
    from bertfast.kernels._compile import SHARED_MEMORY_LIMIT

    out = []
    if not r["ok"]:
        return [f"does not compile: {r['error']}"]
    if r["shared_bytes"] > SHARED_MEMORY_LIMIT.get(r["arch"], 101376):
        out.append(f"shared memory {r['shared_bytes']} B over the sm_{r['arch']} limit")
    if r["local_bytes"] > 0 or r["spill_stores"] > 0 or r["spill_loads"] > 0:
        out.append(f"spills: local {r['local_bytes']} B, stores {r['spill_stores']} B, loads {r['spill_loads']} B")
    if r["expect_tensor_cores"]:
        if r["arch"] >= 90 and not r["wgmma"]:
            out.append("GEMM without wgmma on sm_90")
        if r["arch"] < 90 and not r["mma"]:
            out.append("GEMM without mma on sm_80")
    return out


def run(ops=None, archs=(90, 80), jobs=None) -> list[dict]:
    """Compile ``ops`` (default: every op and each tuning candidate once) for ``archs``."""
    from bertfast.kernels import OP_MODULES

    ops = list(ops or [*OP_MODULES, "tuning"])
    tasks = [(op, arch, i) for arch in archs for op in ops for i in range(len(_specs([op], arch)))]
    jobs = jobs or max(1, min(len(tasks), os.cpu_count() or 1))
    if jobs == 1:
        return [_work(t) for t in tasks]
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(_work, tasks))


def table(results: list[dict]) -> str:
    head = f"{'op':<22}{'kernel':<30}{'config':<34}{'sm':>4}{'warps':>6}{'stages':>7}{'regs':>6}{'smem KiB':>9}{'spill B':>8}{'TC':>7}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "-")
        p = problems(r)
        smem = f"{r['shared_bytes'] / 1024:.1f}" if r["ok"] else "-"
        spill = max(r["local_bytes"], r["spill_stores"]) if r["ok"] else "-"
        lines.append(
            f"{r['op']:<22}{r['kernel'][:29]:<30}{r['label'][:33]:<34}{r['arch']:>4}{r['num_warps']:>6}{r['num_stages']:>7}"
            f"{r['registers']:>6}{smem:>9}{spill:>8}{tc:>7}  {'ok' if not p else '; '.join(p)}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--op", nargs="+", default=None,
                    help="ops to compile (default: all, and each tuning candidate once); 'tuning' / 'tuning-full': "
                         "the tuner's candidates once / in every variant")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "bertfast.kernels.compile_check", *(argv or sys.argv[1:])], env=env)
    results = run(args.op, args.arch, args.jobs)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = [r for r in results if problems(r)]
    print(f"\n{len(results)} configurations, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
