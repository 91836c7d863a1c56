"""``benchmarks/gpu_evidence.sh`` (``bertfast bench evidence``): the dry run end to end on CPU,
and the orchestration rules (a step that overruns is killed with what it started and recorded,
the next step still runs; the budget skips what no longer fits; the script's header names every
step with its expected time and limit)."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from bertfast.bench import evidence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_evidence.sh")


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """Every step runs (CPU, tiny shapes, interpreter), the folder holds at most the 8 files a lent
    machine hands back, and the JSON / markdown describe every step."""
    out = tmp_path / "evidence"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["PYTHON"] = sys.executable
    t0 = time.monotonic()
    p = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=400, cwd=str(tmp_path))
    took = time.monotonic() - t0
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    files = sorted(os.listdir(out))
    assert {"evidence.json", "evidence.md", "evidence.log"} <= set(files) and set(files) <= set(evidence.FILES)
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    doc = json.loads((out / "evidence.json").read_text())
    assert doc["schema"] == evidence.SCHEMA and doc["dry_run"] is True
    names = [s["name"] for s in doc["steps"]]
    assert names == [s.name for s in evidence.steps(True)]
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status.pop("tune") == "unavailable"  # tuning needs a CUDA GPU, said plainly
    assert set(status.values()) == {"ok"}, status
    by = {s["name"]: s for s in doc["steps"]}
    assert "skipped" in by["gpu-tests"]["summary"]  # pytest's own summary line: the GPU tests skip on CPU
    tests = by["gpu-tests"]["data"]["tests"]  # every test's outcome (pytest -v), as printed when it ended
    assert tests and all("::" in k for k in tests) and set(tests.values()) == {"skipped"}
    assert by["gpu-tests"]["data"]["counts"] == {"skipped": len(tests)}
    enc = by["encoder"]["data"]["results"]
    assert {r["impl"] for r in enc if r["status"] == "ok"} == {"hf-eager", "hf-sdpa"}
    assert all(len(r["timing"]["times_ms"]) == r["timing"]["n"] for r in enc if r["status"] == "ok")
    assert all(r["status"] == "unavailable" for r in enc if r["impl"].startswith("bertfast-triton"))
    host = by["host"]["data"]["rows"]
    assert {r["mode"] for r in host} == {"eager", "eager, host mask", "eager, host mask, through the ops",
                                         "graph replay", "graph replay, host mask"}
    reads = {r["mode"]: r["device_reads"] for r in host if "device_reads" in r and r["lengths"] == "mixed"}
    assert reads["eager, host mask"] == 0 < reads["eager"]  # the mask read on the host: nothing read in the forward
    comp = by["compile"]["data"]["results"]  # the reference rows first, as a group of their own
    assert [r["impl"] for r in comp] == ["hf-sdpa", "bertfast-triton-unpad-graphs", "hf-sdpa", "hf-compile"]
    assert comp[0]["group"] != comp[2]["group"] and "running" not in by["compile"]["data"]
    assert by["profile"]["data"]["forwards"] == 1 and "profile_trace.json" in files
    md = (out / "evidence.md").read_text()
    assert "DRY RUN" in md and "| kernels | ok |" in md and "## encoder" in md
    log = (out / "evidence.log").read_text()
    assert "===== compile: ok" in log
    print(f"dry run took {took:.0f} s")


def _step(name, code, timeout, **kw):
    return evidence.Step(name, [sys.executable, "-c", code], timeout, timeout / 2, "test", **kw)


def test_overrunning_step_is_killed_with_its_children_and_the_next_runs(tmp_path):
    pidfile = tmp_path / "child.pid"
    hang = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(c.pid)); print('started', flush=True); "
            f"time.sleep(60)")
    plan = [_step("hang", hang, 2.5), _step("after", "print('12 passed in 0.1s')", 20),
            _step("broken", "import sys; print('boom'); sys.exit(3)", 20)]
    t0 = time.monotonic()
    recs = evidence.run_steps(plan, str(tmp_path / "out"), 60, dict(os.environ), {"created": "now"})
    assert time.monotonic() - t0 < 20
    assert [(r.name, r.status) for r in recs] == [("hang", "timeout"), ("after", "ok"), ("broken", "failed")]
    assert recs[0].rc is None and "killed at its" in recs[0].summary
    assert recs[1].summary == "12 passed in 0.1s" and recs[2].rc == 3 and "boom" in recs[2].summary
    child = int(pidfile.read_text())
    for _ in range(50):  # the step's own child went with it (its process group was ended)
        if not _alive(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the timed-out step's child {child} still runs")
    doc = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert [s["status"] for s in doc["steps"]] == ["timeout", "ok", "failed"]
    assert "| hang | timeout |" in (tmp_path / "out" / "evidence.md").read_text()
    log = (tmp_path / "out" / "evidence.log").read_text()
    assert "started" in log and "===== hang: timeout" in log


def _alive(pid):  # a zombie waiting for a reaper counts as ended
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("timeout", [False, True])
def test_children_that_outlive_their_step_are_ended(tmp_path, timeout):
    """A step's child that ignores SIGTERM, left behind by a step that ended by itself or on
    SIGTERM at its limit, must not run on (holding the GPU) into the next step."""
    pidfile = tmp_path / "child.pid"
    child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {child!r}]); "
            f"time.sleep(0.5); open({str(pidfile)!r}, 'w').write(str(c.pid))"
            + ("; time.sleep(60)" if timeout else ""))
    recs = evidence.run_steps([_step("leaves", code, 3.0 if timeout else 20)], str(tmp_path / "out"), 60,
                              dict(os.environ), {})
    assert recs[0].status == ("timeout" if timeout else "ok")
    pid = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail(f"the step's child {pid} still runs after the step ended")


def test_budget_skips_steps_that_no_longer_fit(tmp_path):
    plan = [_step("a", "import time; time.sleep(1.5)", 30), _step("b", "print(1)", 30),
            _step("opt", "print(2)", 30, optional=True)]
    recs = evidence.run_steps(plan, str(tmp_path), evidence.MIN_STEP_S + 1, dict(os.environ), {})
    assert [r.status for r in recs] == ["ok", "skipped", "skipped"]
    assert recs[0].limit_s == pytest.approx(evidence.MIN_STEP_S + 1, abs=0.1) and "budget" in recs[1].summary
    # an optional step runs only with its whole limit left
    recs = evidence.run_steps(plan[1:], str(tmp_path), 25, dict(os.environ), {})
    assert [r.status for r in recs] == ["ok", "skipped"]


def test_script_header_states_every_step_with_its_times():
    """The header is the documentation of the real run: every step, its expected time and its limit,
    equal to the code's; the evidence limits fit the default budget (8 minutes)."""
    text = open(SCRIPT, encoding="utf-8").read()
    for st in evidence.steps(False):
        m = re.search(rf"^#\s+{re.escape(st.name)}\s+(\d+) s /\s+(\d+) s", text, re.M)
        assert m, f"{st.name} missing from the header of {SCRIPT}"
        assert (int(m.group(1)), int(m.group(2))) == (st.expected_s, st.timeout_s), st.name
    main = [s for s in evidence.steps(False) if not s.optional]
    assert sum(s.timeout_s for s in main) <= evidence.DEFAULT_BUDGET_S
    assert [s.name for s in main][-1] == "compile" and all(s.optional for s in evidence.steps(False)[len(main):])
    assert "-m bertfast.bench.evidence" in text
    short = text[text.index("# --short"):]
    for st in evidence.steps(False, short=True):
        m = re.search(rf"^#\s+{re.escape(st.name)}\s+(\d+) s /\s+(\d+) s", short, re.M)
        assert m, f"{st.name} missing from the --short part of the header of {SCRIPT}"
        assert (int(m.group(1)), int(m.group(2))) == (st.expected_s, st.timeout_s), st.name
    assert sum(s.timeout_s for s in evidence.steps(False, short=True)) <= evidence.SHORT_BUDGET_S <= 110


@pytest.mark.slow
def test_short_dry_run_end_to_end(tmp_path):
    """``--short``: versions, host and encoder only, into the same files, within its budget; the
    encoder step at the issue's shapes only (the dry run's tiny ones here)."""
    out = tmp_path / "evidence"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["PYTHON"] = sys.executable
    t0 = time.monotonic()
    p = subprocess.run(["bash", SCRIPT, "--dry-run", "--short", "--out", str(out)], capture_output=True, text=True,
                       env=env, timeout=300, cwd=str(tmp_path))
    took = time.monotonic() - t0
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    files = sorted(os.listdir(out))
    assert {"evidence.json", "evidence.md", "evidence.log"} <= set(files) and set(files) <= set(evidence.FILES)
    doc = json.loads((out / "evidence.json").read_text())
    assert doc["short"] is True and doc["dry_run"] is True and doc["budget_s"] == evidence.SHORT_BUDGET_S
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [("versions", "ok"), ("host", "ok"), ("encoder", "ok")]
    assert doc["total_s"] <= evidence.SHORT_BUDGET_S
    enc = doc["steps"][2]["data"]["results"]
    assert {r["impl"] for r in enc if r["status"] == "ok"} == {"hf-eager", "hf-sdpa"}
    md = (out / "evidence.md").read_text()
    assert "SHORT RUN" in md and "## host" in md and "## encoder" in md and "## kernels" not in md
    print(f"short dry run took {took:.0f} s")


def test_killed_pytest_keeps_every_finished_test(tmp_path):
    """gpu-tests runs pytest -v: each outcome is printed as the test ends, so a run killed at its
    limit still says which tests passed and failed (in the record's data and summary)."""
    tests = tmp_path / "test_some.py"
    tests.write_text("import time\n\ndef test_a():\n    pass\n\ndef test_b():\n    assert False\n\n"
                     "def test_hangs():\n    time.sleep(60)\n")
    argv = [sys.executable, "-m", "pytest", "-v", "-p", "no:randomly", "-p", "no:cacheprovider", str(tests)]
    step = evidence.Step("gpu-tests", argv, 20, 10, "test", parse_output=evidence.pytest_outcomes)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    recs = evidence.run_steps([step], str(tmp_path / "out"), 60, env, {})
    rec = recs[0]
    assert rec.status == "timeout"
    assert {k.rsplit("/", 1)[-1]: v for k, v in rec.data["tests"].items()} == {
        "test_some.py::test_a": "passed", "test_some.py::test_b": "failed"}  # not test_hangs: it never ended
    assert "1 failed, 1 passed" in rec.summary and "killed at its 20 s limit" in rec.summary
    doc = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert doc["steps"][0]["data"]["counts"] == {"passed": 1, "failed": 1}


def test_pytest_outcomes_reads_both_line_formats():
    lines = ["tests/test_x.py::test_a PASSED                 [ 33%]",
             "[gw1] [ 66%] FAILED tests/test_y.py::test_b[fp16-1]",
             "[gw0] [100%] SKIPPED tests/test_z.py::test_c",
             "FAILED tests/test_y.py::test_b[fp16-1] - assert 1 == 2",  # the -rfE summary: already counted
             "tests/test_x.py::test_d ",  # started, never finished
             "===== 1 passed, 1 failed, 1 skipped in 3.2s ====="]
    got = evidence.pytest_outcomes(lines)
    assert got["tests"] == {"tests/test_x.py::test_a": "passed", "tests/test_y.py::test_b[fp16-1]": "failed",
                            "tests/test_z.py::test_c": "skipped"}
    assert got["counts"] == {"passed": 1, "failed": 1, "skipped": 1}


def test_timed_steps_keep_finished_groups_and_name_the_cut_one(tmp_path, monkeypatch):
    """A timed step saves its rows after every group and, before each group, what runs: killed in
    a group (here: the step's process ends inside it), the result file holds every finished row and
    names the group that was cut."""
    import torch

    from bertfast.bench.harness import Case, Prepared

    def case(impl, group, fail=False):
        def build():
            if fail:
                raise SystemExit(9)  # the process ends here, as a kill would end it
            return Prepared(fn=lambda x: x + 1, make_inputs=lambda: (torch.ones(8),))
        return Case(suite="encoder", op="encoder", impl=impl, shape={"B": 1, "S": 8}, dtype="float32", group=group,
                    build=build,
                    baseline="a")

    monkeypatch.setenv("BERTFAST_EVIDENCE_WORK", str(tmp_path))
    monkeypatch.setenv("BERTFAST_EVIDENCE_STEP", "compile")
    monkeypatch.setenv("BERTFAST_EVIDENCE_DRY_RUN", "1")
    from bertfast.bench import harness

    settings = harness.BenchSettings(warmup_ms=0, target_ms=1, min_reps=3, max_reps=3, min_warmup=1)
    cases = [case("a", "g1"), case("b", "g1"), case("a", "g2"), case("slow", "g2", fail=True)]
    with pytest.raises(SystemExit):
        evidence._bench_rows(cases, "title", settings)
    got = json.loads((tmp_path / "compile.json").read_text())
    assert [r["impl"] for r in got["data"]["results"]] == ["a", "b"] and all(
        r["status"] == "ok" for r in got["data"]["results"])
    assert got["data"]["running"] == "encoder B=1 S=8: a, slow"
    assert "running: encoder B=1 S=8: a, slow" in got["summary"]
