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

    bad = {f"{r['kernel']} [{r['label']}] sm_{r['arch']}": problems(r) for r in results if problems(r)}
    assert not bad, proc.stdout + "\n" + json.dumps(bad, indent=1)
