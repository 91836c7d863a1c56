"""Rung 3: every configuration of every kernel compiles for sm_90 and sm_80 on this CPU
machine, fits the chip's shared memory, does not spill, and GEMMs use tensor cores
(wgmma on sm_90).  Runs ``python -m bertfast.kernels.compile_check`` in a subprocess without
TRITON_INTERPRET (kernels are interpreted or compiled from the moment they are decorated)."""
import json
import os
import subprocess
import sys

import pytest

from bertfast.kernels import OP_MODULES

pytestmark = pytest.mark.compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# "tuning": each candidate of bertfast.kernels.tuning that is not in an op's default table, compiled once
# per architecture (split-K GEMM, short-sequence attention tiles); every variant of them:
# python -m bertfast.kernels.compile_check --op tuning-full
@pytest.mark.parametrize("op", [*sorted(OP_MODULES), "tuning"])
def test_compiles_for_sm90_and_sm80(op, tmp_path):
    out = tmp_path / "res.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bertfast.kernels.compile_check", "--op", op, "--arch", "90", "80", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert out.exists(), proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results, f"{op}: no configurations listed by compile_specs()"
    assert {r["arch"] for r in results} == {90, 80}
    from bertfast.kernels.compile_check import problems

    from bertfast.kernels._compile import OLD_PTXAS

    known = KNOWN_OLD_PTXAS.get(op) if OLD_PTXAS else None
    name = lambda r: f"{r['kernel']} [{r['label']}] sm_{r['arch']}"  # noqa: E731
    bad = {name(r): problems(r) for r in results if problems(r) and not (known and known(r))}
    assert not bad, proc.stdout + "\n" + json.dumps(bad, indent=1)
    if known:  # still there: when a kernel change fixes them, drop the entry
        assert any(problems(r) for r in results if known(r)), f"{op}: the known triton-3.6 spills are gone"


# The one limitation of triton < 3.9's ptxas (3.6.0 is the GPU machines') that no block size fixes:
# the embeddings LayerNorm backward at BLOCK_N 8192 (hidden 4097..8192, above every BERT size)
# spills 8-56 B with 32 warps and 88-96 B with 16 (kernels/embeddings_layernorm.py measures each);
# fixing it needs a kernel that does not hold a whole row in registers.  Every other problem of
# the op still fails the test, and so does this entry once those configurations stop spilling.
KNOWN_OLD_PTXAS = {
    "embeddings_layernorm": lambda r: r["kernel"].startswith("_embeddings_layernorm_bwd") and "BN=8192" in r["label"],
}
