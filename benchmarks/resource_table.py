"""Per-kernel GPU resource table (registers, shared memory, spills, tensor-core use) for every
configuration the launchers can pick, compiled for sm_90 and sm_80 on any machine (no GPU needed).

    python benchmarks/resource_table.py                     # print the table (sm_90 and sm_80)
    python benchmarks/resource_table.py --arch 90 --op linear attention
    python benchmarks/resource_table.py --save              # also write benchmarks/results/<date>_resource-table_<archs>_triton-<version>.{md,json}

A thin wrapper over ``python -m bertfast.kernels.compile_check`` (``bertfast.kernels.compile_check.run`` / ``table``).
Exit status 1 when a configuration has a problem (does not compile, spills, too much shared
memory, a GEMM without tensor cores).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--op", nargs="+", default=None, help="ops (default: all)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: CPU count)")
    ap.add_argument("--save", action="store_true", help="write the table and raw results into benchmarks/results/")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for --save")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # interpreted kernels cannot be compiled: run again without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    import triton

    from bertfast.kernels.compile_check import problems, run, table

    results = run(args.op, tuple(args.arch), args.jobs)
    text = table(results)
    bad = [r for r in results if problems(r)]
    print(text)
    print(f"\n{len(results)} configurations, {len(bad)} with problems")
    if args.save:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"{datetime.date.today().isoformat()}_resource-table_sm{'-sm'.join(map(str, args.arch))}"
                                      f"_triton-{triton.__version__}")
        with open(stem + ".md", "w", encoding="utf-8") as f:
            f.write(f"# Kernel resource table ({', '.join('sm_%d' % a for a in args.arch)})\n\n")
            f.write(f"`python benchmarks/resource_table.py --arch {' '.join(map(str, args.arch))}`, "
                    f"{datetime.date.today().isoformat()}, triton {triton.__version__} (its bundled ptxas)\n\n```\n{text}\n```\n\n"
                    f"{len(results)} configurations, {len(bad)} with problems\n")
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
