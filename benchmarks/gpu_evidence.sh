#!/usr/bin/env bash
# All the GPU evidence one short lease can give, in one command (about 8 minutes):
#
#   PYTHONPATH=. bash benchmarks/gpu_evidence.sh --out $OUT/evidence      # on one H100 / H200
#   PYTHONPATH=. bash benchmarks/gpu_evidence.sh --short --out $OUT/evidence   # a few minutes left: ~2 min
#   bash benchmarks/gpu_evidence.sh --dry-run --out /tmp/evidence         # the plumbing, on CPU, < 1 min
#
# For a machine with torch 2.11, triton 3.6 and transformers 5.17 installed, no internet, no
# package install, run from the project root.  This script is a thin caller of
# `python -m bertfast.bench.evidence` (= `python -m bertfast bench evidence`; bertfast/bench/evidence.py
# holds the steps); every argument is passed on (--out DIR, --dry-run, --short, --budget SECONDS;
# default budget 480 s, 100 s with --short).
#
# Steps, in order, each in its own process group with its own limit (a step that overruns is
# killed with everything it started and recorded as "timeout"; the next step still runs).
# Expected time on an H100/H200 / limit, and why:
#   versions        5 s /  20 s  imports torch, triton, transformers once; nvidia-smi
#   gpu-tests      80 s / 130 s  pytest -m gpu -v, 4 workers (--dist loadfile): ~15 s collection, then
#                                mostly Triton compiles, shared by the on-disk cache; correctness before timing;
#                                every test's outcome printed as it ends (kept in evidence.log / .json if killed)
#   host           20 s /  40 s  bert-base fp16, (1,128) and (32,128): eager and graph replay, each with
#                                the mask on the device / from the host, 30 interleaved forwards each
#   encoder        60 s /  90 s  bert-base vs transformers eager/SDPA at (1,128), (32,128) full+mixed,
#                                (32,512) mixed; 6 rows per shape, ~0.2 s timed each, graph captures
#   attention      20 s /  35 s  S=512, 32 sequences, full/mixed, fwd and fwd+bwd
#   kernels        30 s /  50 s  5 ops x 3 token counts at bert-base's layer shapes, Triton vs cuBLAS/eager,
#                                L2 flush + device-side delay before every timed call
#   profile        12 s /  25 s  3 profiled bert-base forwards at (32,128), Chrome trace
#   compile        75 s /  90 s  torch.compile(mode="max-autotune") of transformers: Inductor autotunes
#                                every GEMM shape, the slowest and least important step, so last; its
#                                reference rows are timed and saved first, as a group of their own
#   ---------------------------------------------------------------- 300 s expected / 480 s limits
#   tune           60 s /  90 s  optional: bertfast tune, only after every evidence step and only when
#   kernels-tuned  30 s /  50 s  its whole limit is left; then the kernels step again on the stored choices
#
# --short (host and encoder only, for when a few minutes of GPU time are left; same files):
#   versions        5 s /  10 s  which card, which versions
#   host           25 s /  40 s  as above, 20 forwards each; compiles the kernels (no gpu-tests step before)
#   encoder        35 s /  50 s  (1,128) full, (32,128) full and mixed; ~0.1 s timed per row
#   ---------------------------------------------------------------- 65 s expected / 100 s limits
#
# Output (at most 8 files in --out, what a lent machine hands back): evidence.json, evidence.md,
# evidence.log, profile_trace.json, encoder_speedup.png, kernels_speedup.png, kernels_peak.png,
# tune.json (the tuned choices, when the tune step ran).  JSON and markdown are rewritten after
# every step (and the timed steps' rows after every group), so a run cut short keeps what it
# measured.  Random weights (bert-base shapes): no checkpoint package is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
for a in "$@"; do  # the dry run: CPU only, Triton in the interpreter (read when kernels is imported)
  if [ "$a" = "--dry-run" ]; then export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1; fi
done
exec "$PY" -m bertfast.bench.evidence "$@"
