"""``bertfast bench evidence``: all the GPU evidence one short lease can give, in one command.

    bash benchmarks/gpu_evidence.sh --out DIR         # = python -m bertfast bench evidence --out DIR
    bash benchmarks/gpu_evidence.sh --dry-run --out DIR   # the plumbing on CPU, well under a minute

For one H100 / H200 with torch, triton and transformers installed, no internet, run from the
project root (``PYTHONPATH=.``).  The steps run in this order, each in its own process with its
own time limit: a step that overruns is killed (with everything it started) and recorded as
``timeout``, and the next step runs, so the earlier steps always finish (see :data:`STEPS` for
each step's expected time and limit, and why):

1. ``versions``: versions, device properties, clocks, the run's settings.
2. ``gpu-tests``: ``pytest -m gpu`` (correctness on the device; several workers).
3. ``host``: host vs device time per forward of bert-base: eager, eager without device reads
   (the plan given, values trusted) and CUDA-graph replay, at (1, 128) and (32, 128).
4. ``encoder``: bert-base rows vs transformers eager / SDPA at (1,128), (32,128) full and
   mixed, (32,512) mixed.
5. ``attention``: the attention rows at S = 512.
6. ``kernels``: the Triton ops vs eager PyTorch (cuBLAS) at bert-base's layer shapes.
7. ``profile``: one bert-base forward under torch.profiler, grouped by BERT op (+ trace).
8. ``compile``: torch.compile(mode="max-autotune") of transformers, last (its autotuning takes
   the longest and is the least important).
9. ``tune`` (only when ``bertfast tune`` exists and time is left): never before the evidence.

Everything lands in ``--out``: ``evidence.json`` (every step: status, times, data, rows with
their repetitions), ``evidence.md`` (the summary and every step's tables), ``evidence.log``
(every step's output), ``profile_trace.json`` (the profile's Chrome trace) and the
``encoder_speedup.png`` / ``kernels_speedup.png`` plots: at most 8 files, ready to commit under
``benchmarks/results/``.  The JSON and markdown are rewritten after every step, so a run cut
short still leaves what it measured.  Models have random weights of bert-base shape (no
checkpoint package needed).

``--dry-run``: the same steps on CPU (``CUDA_VISIBLE_DEVICES=""``), tiny shapes, Triton in the
interpreter, short loops; its numbers are plumbing, never performance (the files say so).

``--short``: for when only a few minutes of GPU time are left: ``versions`` (which card, which
versions), ``host`` and ``encoder`` (bert-base at (1,128), (32,128) full and mixed) only, in
:data:`SHORT_BUDGET_S` seconds (about two minutes with the start-up), into the same files.

Nothing finished is lost to a kill: ``gpu-tests`` prints every test's outcome as it ends
(``pytest -v``, into evidence.log; parsed into evidence.json, a killed run included), and the
timed steps save their rows after every group, naming the group that was running when the step
was cut (the ``compile`` step times its reference rows as a group of their own before the
compiled model's first call, which is what overruns).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

SCHEMA = "bertfast.bench.evidence/1"
DEFAULT_BUDGET_S = 480
SHORT_BUDGET_S = 100  # --short: with the start-up and a killed step's grace, within two minutes
MIN_STEP_S = 10  # a step is started only with this much of the budget left (or its whole limit, if shorter)
FILES = ("evidence.json", "evidence.md", "evidence.log", "profile_trace.json", "encoder_speedup.png",
         "kernels_speedup.png", "kernels_peak.png", "tune.json")
# the evidence steps measure the default block table: no stored tuning choice, nothing timed
DEFAULT_TABLE = {"BERTFAST_AUTOTUNE": "off", "BERTFAST_TUNE_CACHE": "{work}/no-tuning.json"}
TUNED = {"BERTFAST_AUTOTUNE": "0", "BERTFAST_TUNE_CACHE": "{out}/tune.json"}  # stored choices only


@dataclass
class Step:
    """One time-boxed step: ``argv`` runs in its own process group; ``timeout_s`` is its limit on
    the real run, ``expected_s`` what it should take there, ``why`` the reasoning behind both."""

    name: str
    argv: Optional[List[str]]  # a command; None: the step function of this name, in a forked child
    timeout_s: float
    expected_s: float
    why: str
    optional: bool = False  # runs only if its whole limit is left after the others (tune, kernels-tuned)
    env: Dict[str, str] = field(default_factory=dict)  # "{work}" / "{out}" are filled in
    # what the step's output says, for its record's data (e.g. pytest's per-test outcomes); read
    # from its output also after a kill
    parse_output: Optional[Callable[[List[str]], Dict[str, Any]]] = None


@dataclass
class StepRecord:
    name: str
    status: str  # ok | failed | timeout | skipped | unavailable
    rc: Optional[int]
    elapsed_s: float
    limit_s: float
    expected_s: float
    why: str
    summary: str = ""
    data: Dict[str, Any] = field(default_factory=dict)
    markdown: str = ""


# --------------------------------------------------------------------------- the steps
_FORK = False  # set by run() for the dry run


def _py(name: str) -> Optional[List[str]]:
    """A Python step, :data:`STEP_FUNCS` ``[name]``: on the real run its own interpreter
    (``python -m bertfast.bench.evidence --step NAME``: nothing CUDA did in another process can
    reach it); in the dry run (no GPU) a child forked from the orchestrator, which has imported
    torch, triton, transformers and bertfast once, so a step starts in milliseconds."""
    return None if _FORK else [sys.executable, "-m", "bertfast.bench.evidence", "--step", name]


def steps(dry_run: bool, short: bool = False) -> List[Step]:
    """The evidence steps in order.  Real-run limits sum to :data:`DEFAULT_BUDGET_S` (8 min); the
    expected times come from the work each does (the Triton compile cache is filled by the
    gpu-tests step, so later steps mostly reuse compiled kernels).  ``short``: :func:`short_steps`."""
    if short:
        return short_steps(dry_run)
    py = sys.executable
    # -v: every test's outcome is printed as it ends (a killed run keeps which tests passed)
    if dry_run:
        tests = [py, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:randomly", "-p", "no:cacheprovider",
                 "tests/test_gpu_model.py"]
    else:
        workers = ["-n", "4", "--dist", "loadfile"] if _has_module("xdist") else []
        tests = [py, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:randomly", "-p", "no:cacheprovider", "-rfE",
                 *workers, "tests"]
    out = [
        Step("versions", _py("versions"), 20, 5,
             "imports torch / triton / transformers once and reads nvidia-smi: a few seconds"),
        Step("gpu-tests", tests, 130, 80,
             "pytest -m gpu in 4 workers (one file per worker, --dist loadfile; the GPU has room for all): "
             "collection ~15 s, then mostly Triton compilation of each kernel configuration, shared through "
             "the on-disk cache; correctness first, so it runs before any timing", parse_output=pytest_outcomes),
        Step("host", _py("host"), 40, 20,
             "bert-base fp16 at 2 shapes x 3 modes, 30 interleaved forwards each (~3-10 ms), plus model "
             "build and the first graph captures"),
        Step("encoder", _py("encoder"), 90, 60,
             "4 shapes x 6 implementations, ~0.2 s of timed work per row round-robin, plus CUDA-graph "
             "captures, transformers model builds and the per-step calibration (~2 s)"),
        Step("attention", _py("attention"), 35, 20,
             "S=512, 32 sequences, full and mixed lengths, fwd and fwd+bwd: 4 groups of 4-5 rows"),
        Step("kernels", _py("kernels"), 50, 30,
             "5 ops x 3 token counts x 2 implementations with L2 flush and device-side delay per call"),
        Step("profile", _py("profile"), 25, 12,
             "3 profiled forwards of bert-base at (32,128) mixed after 2 warm-ups, trace export"),
        Step("compile", _py("compile"), 90, 75,
             "torch.compile(mode='max-autotune') of transformers bert-base at (32,128): Inductor autotunes "
             "every GEMM shape (minutes at worst), so it runs last: cut at its limit, it is recorded as a timeout"),
        Step("tune", _py("tune"), 90, 60,
             "bertfast tune on a random bert-base checkpoint at (1,128), (32,128), (32,512): compiles and times "
             "each shape class's candidates; optional, only after every evidence step, with its limit left",
             optional=True, env=TUNED),
        Step("kernels-tuned", _py("kernels-tuned"), 50, 30,
             "the kernels step again with the choices tune stored: the before/after pair", optional=True, env=TUNED),
    ]
    for st in out:
        if not st.optional:
            st.env = {**DEFAULT_TABLE, **st.env}
    if dry_run:  # the same code as the kernels step: nothing more to show without a GPU
        out = [st for st in out if st.name != "kernels-tuned"]
    return out


def short_steps(dry_run: bool) -> List[Step]:
    """``--short``: which card, then the host and encoder steps on fewer shapes and repetitions;
    limits sum to :data:`SHORT_BUDGET_S`.  No gpu-tests step fills the Triton compile cache first,
    so the host step compiles bert-base's kernels (most of its time)."""
    short = {"BERTFAST_EVIDENCE_SHORT": "1"}
    out = [
        Step("versions", _py("versions"), 10, 5, "imports and nvidia-smi: a few seconds"),
        Step("host", _py("host"), 40, 25,
             "compiles bert-base fp16's Triton kernels (no gpu-tests step before it), then 2 shapes x 3 modes, "
             "20 interleaved forwards each", env=dict(short)),
        Step("encoder", _py("encoder"), 50, 35,
             "(1,128) full, (32,128) full and mixed x 6 implementations, ~0.1 s of timed work per row, "
             "graph captures, transformers model builds, calibration", env=dict(short)),
    ]
    for st in out:
        st.env = {**DEFAULT_TABLE, **st.env}
    return out


_PYTEST_OUTCOME = re.compile(r"(?:^|\s)(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)")
_PYTEST_NODE = re.compile(r"(\S+\.py::\S+)")


def pytest_outcomes(lines: List[str]) -> Dict[str, Any]:
    """Per-test outcomes from ``pytest -v`` output (one worker's line format or xdist's, either
    order of id and outcome): {"tests": {node id: outcome}, "counts": {outcome: n}}; a test seen
    twice (its outcome, then the summary's failure line) keeps its first outcome."""
    tests: Dict[str, str] = {}
    for line in lines:
        outcome, node = _PYTEST_OUTCOME.search(line), _PYTEST_NODE.search(line)
        if outcome and node:
            tests.setdefault(node.group(1), outcome.group(1).lower())
    counts: Dict[str, int] = {}
    for o in tests.values():
        counts[o] = counts.get(o, 0) + 1
    return {"tests": tests, "counts": counts}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------- orchestration
def _kill_group(proc: subprocess.Popen) -> None:
    """End a step's process group (the step and whatever it started: pytest workers, compile
    workers): SIGTERM, then SIGKILL after 5 s; once the step itself has ended, SIGKILL for what
    outlived it (a child that ignores SIGTERM must not hold the GPU during the next step)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    _end_leftovers(proc)


def _end_leftovers(proc) -> None:
    """SIGKILL whatever is left of an ended step's process group (background children it left
    running, e.g. compile or test workers): the next step gets the device to itself."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Forked:
    """A forked child with the waiting interface of ``subprocess.Popen`` that ``run_step`` uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode


def _spawn(step: Step, env: Dict[str, str], log):
    """Start a step in its own process group: its command, or (``argv`` None) a forked child
    running its step function with ``env`` and its output in ``log``."""
    if step.argv is not None or not _FORK:
        argv = step.argv or [sys.executable, "-m", "bertfast.bench.evidence", "--step", step.name]
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 1
    try:  # the child: never returns into the orchestrator's code
        os.setsid()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        os.environ.clear()
        os.environ.update(env)
        STEP_FUNCS[step.name]()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def preimport() -> None:
    """Import what every step needs once, before forking (never initialising CUDA: a forked child
    could not use it)."""
    import importlib

    for name in ("torch", "transformers", "bertfast.kernels.testing", "bertfast.modeling", "bertfast.bench.suites",
                 "bertfast.bench.report", "bertfast.bench.profile", "bertfast.plan"):
        importlib.import_module(name)
    import transformers

    transformers.BertModel, transformers.BertConfig  # lazy attributes: their import is the slow part


def run_step(step: Step, limit_s: float, env: Dict[str, str], log, work: str) -> StepRecord:
    """Run one step with its limit; its output goes to ``log``; a step writes its result to
    ``<work>/<name>.json`` (read back here, also after a timeout: the partial rows)."""
    out = env.get("BERTFAST_EVIDENCE_OUT", "")
    env = {**env, **{k: v.format(work=work, out=out) for k, v in step.env.items()}, "BERTFAST_EVIDENCE_STEP": step.name}
    log.write(f"\n===== {step.name}: {' '.join(step.argv) if step.argv else 'step function ' + step.name} (limit {limit_s:.0f} s)\n")
    log.flush()
    start = log.tell()
    t0 = time.monotonic()
    proc = _spawn(step, env, log)
    try:
        rc = proc.wait(timeout=limit_s)
        status = "ok" if rc == 0 else "failed"
        _end_leftovers(proc)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc, status = None, "timeout"
    elapsed = time.monotonic() - t0
    log.flush()
    with open(log.name, encoding="utf-8", errors="replace") as f:  # this step's output
        f.seek(start)
        tail = [line.strip() for line in f.read().splitlines() if line.strip()]
    parsed = step.parse_output(tail) if step.parse_output is not None else {}
    log.write(f"===== {step.name}: {status} (rc {rc}) after {elapsed:.1f} s\n")
    log.flush()
    rec = StepRecord(step.name, status, rc, round(elapsed, 2), round(limit_s, 1), step.expected_s, step.why)
    if tail:
        rec.summary = tail[-1][:200]  # e.g. pytest's "12 passed, 3 skipped in 40.1s"
        if status == "failed" and "needs a CUDA GPU" in tail[-1]:
            rec.status = "unavailable"
    path = os.path.join(work, step.name + ".json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                got = json.load(f)
            rec.data, rec.markdown = got.get("data", {}), got.get("markdown", "")
            rec.summary = got.get("summary", "") or rec.summary
            if got.get("status") == "unavailable":
                rec.status = "unavailable"
        except (OSError, ValueError) as e:
            rec.summary = f"unreadable result file: {e}"
    rec.data.update(parsed)
    if status == "timeout":
        so_far = parsed.get("counts")
        if so_far:
            rec.summary = "finished before the kill: " + ", ".join(f"{n} {o}" for o, n in sorted(so_far.items()))
        rec.summary = (f"killed at its {limit_s:.0f} s limit" + ("; partial results kept" if rec.data else "") +
                       (f" ({rec.summary})" if rec.summary else ""))
    elif rec.status == "failed":
        rec.summary = f"exit status {rc}: {rec.summary or 'see evidence.log'}"
    return rec


def run_steps(plan: Sequence[Step], out: str, budget_s: float, env: Dict[str, str], header: Dict[str, Any],
              on_step: Optional[Callable[[List[StepRecord]], None]] = None) -> List[StepRecord]:
    """Run ``plan`` in order within ``budget_s``: each step gets min(its limit, what is left);
    with less than :data:`MIN_STEP_S` left a step is skipped; optional steps run only when their
    whole limit is left.  Writes evidence.json / .md / .log after every step."""
    os.makedirs(out, exist_ok=True)
    records: List[StepRecord] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bertfast-evidence-") as work, \
            open(os.path.join(out, "evidence.log"), "w", encoding="utf-8") as log:
        env = {**env, "BERTFAST_EVIDENCE_WORK": work, "BERTFAST_EVIDENCE_OUT": os.path.abspath(out)}
        for step in plan:
            left = max(0.0, budget_s - (time.monotonic() - t0))
            limit = min(step.timeout_s, left)
            if (step.optional and left < step.timeout_s) or limit < min(MIN_STEP_S, step.timeout_s):
                why = f"skipped: {left:.0f} s of the {budget_s:.0f} s budget left"
                records.append(StepRecord(step.name, "skipped", None, 0.0, 0.0, step.expected_s, step.why, why))
                print(f"bertfast evidence: {step.name}: {why}", file=sys.stderr)
            else:
                print(f"bertfast evidence: {step.name} (limit {limit:.0f} s, expected {step.expected_s:.0f} s) ...",
                      file=sys.stderr, flush=True)
                rec = run_step(step, limit, env, log, work)
                records.append(rec)
                print(f"bertfast evidence: {step.name}: {rec.status} in {rec.elapsed_s:.0f} s"
                      + (f" - {rec.summary}" if rec.summary else ""), file=sys.stderr, flush=True)
            write_outputs(out, header, records, budget_s)
            if on_step:
                on_step(records)
    return records


def write_outputs(out: str, header: Dict[str, Any], records: Sequence[StepRecord], budget_s: float) -> None:
    doc = {"schema": SCHEMA, **header, "budget_s": budget_s,
           "total_s": round(sum(r.elapsed_s for r in records), 2), "steps": [asdict(r) for r in records]}
    from bertfast.bench.report import _clean

    with open(os.path.join(out, "evidence.json"), "w", encoding="utf-8") as f:
        json.dump(_clean(doc), f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "evidence.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(header, records, budget_s))


def summary_markdown(header: Dict[str, Any], records: Sequence[StepRecord], budget_s: float) -> str:
    lines = [f"# bertfast GPU evidence{' (SHORT RUN: versions, host, encoder)' if header.get('short') else ''}"
             f"{' (DRY RUN: plumbing on CPU, not performance)' if header.get('dry_run') else ''}",
             "", f"- date: {header.get('created')}", f"- command: `{header.get('command')}`",
             f"- git commit: {header.get('git_commit')}",
             f"- budget: {budget_s:.0f} s; steps took {sum(r.elapsed_s for r in records):.0f} s", "",
             "| step | status | took s | limit s | expected s | summary |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r.name} | {r.status} | {r.elapsed_s:.0f} | {r.limit_s:.0f} | {r.expected_s:.0f} | "
                     f"{r.summary.replace('|', '/')} |")
    lines.append("")
    for r in records:
        if r.markdown:
            lines += [f"## {r.name}", "", r.markdown.rstrip(), ""]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """``bertfast bench evidence`` (parsed ``bertfast bench`` arguments: --out, --dry-run, --budget,
    --short)."""
    from bertfast.bench.harness import git_commit

    out = args.out
    dry = bool(getattr(args, "dry_run", False))
    short = bool(getattr(args, "short", False))
    budget = float(args.budget or (SHORT_BUDGET_S if short else DEFAULT_BUDGET_S))
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if dry:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", BERTFAST_EVIDENCE_DRY_RUN="1")
    else:
        env.pop("TRITON_INTERPRET", None)  # interpreted kernels would make every Triton row meaningless
        env.pop("BERTFAST_EVIDENCE_DRY_RUN", None)
    if dry:
        # the dry run forks its Python steps from this process: it must have imported kernels under
        # the interpreter and must never see a GPU; otherwise start afresh with that environment
        from bertfast import kernels

        if not kernels.INTERPRET or os.environ.get("CUDA_VISIBLE_DEVICES") != "":
            argv = [sys.executable, "-m", "bertfast.bench.evidence", "--out", out, "--dry-run", "--budget",
                    str(int(budget))] + (["--short"] if short else [])
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, argv, env)
        preimport()
    header = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": dry, "short": short,
              "command": " ".join(getattr(args, "_command", None) or ["bertfast", "bench", "evidence"]),
              "git_commit": git_commit()}
    cwd = os.getcwd()
    try:
        os.chdir(root)  # pytest's tests/ and the relative paths of the steps
        global _FORK
        _FORK = dry
        records = run_steps(steps(dry, short), os.path.join(cwd, out), budget, env, header)
    finally:
        os.chdir(cwd)
    print(summary_markdown(header, records, budget).split("\n## ")[0])
    print(f"bertfast evidence: wrote {out}/ ({', '.join(sorted(os.listdir(os.path.join(cwd, out))))})",
          file=sys.stderr)
    bad = [r for r in records if r.status in ("failed", "timeout")]
    return 1 if bad else 0


# =========================================================================== inside a step
def _dry() -> bool:
    return os.environ.get("BERTFAST_EVIDENCE_DRY_RUN") == "1"


def _step_name() -> str:
    return os.environ.get("BERTFAST_EVIDENCE_STEP", "step")


def _short() -> bool:
    return os.environ.get("BERTFAST_EVIDENCE_SHORT") == "1"


def _save(data: Dict[str, Any], markdown: str, summary: str, status: str = "ok") -> None:
    """This step's result for the orchestrator (rewritten as the step progresses: partial rows
    survive a timeout)."""
    from bertfast.bench.report import _clean

    path = os.path.join(os.environ["BERTFAST_EVIDENCE_WORK"], _step_name() + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean({"status": status, "data": data, "markdown": markdown, "summary": summary}), f)
    os.replace(tmp, path)


def _out_path(name: str) -> str:
    return os.path.join(os.environ["BERTFAST_EVIDENCE_OUT"], name)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(device):
    import torch

    return torch.float16 if device.type == "cuda" else torch.float32


def _model_name() -> str:
    return "tiny" if _dry() else "bert-base"


def step_versions() -> None:
    import platform

    import torch

    from bertfast.bench import harness

    device = _device()
    env = harness.environment(device, ["bertfast", "bench", "evidence"])
    from bertfast.kernels._common import tf32_allowed

    extra: Dict[str, Any] = {"tf32_matmul": tf32_allowed(torch.float32),  # (the legacy read can raise)
                             "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                             "python": platform.python_version(), "loadavg": os.getloadavg()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        extra.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1))
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu," \
                "utilization.gpu,memory.used"
            p = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True,
                               timeout=15)
            extra["nvidia_smi"] = p.stdout.strip()
        except Exception as e:  # no nvidia-smi: recorded, not fatal
            extra["nvidia_smi"] = f"unavailable: {type(e).__name__}: {e}"
        try:
            import triton

            extra["triton_target"] = str(triton.runtime.driver.active.get_current_target())
        except Exception as e:
            extra["triton_target"] = f"unavailable: {type(e).__name__}"
    v = env["versions"]
    dev = env["device"]
    md = [f"- device: {dev.get('name')} ({dev.get('type')}), capability {extra.get('capability', '-')}, "
          f"{extra.get('sm_count', '-')} SMs, driver {dev.get('driver')}, CUDA {dev.get('cuda_runtime')}",
          f"- versions: torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, python "
          f"{v['python']}, git {env.get('git_commit')}",
          f"- TF32 matmul {extra['tf32_matmul']}, load average {extra['loadavg']}"]
    if extra.get("nvidia_smi"):
        md += ["", "```", extra["nvidia_smi"], "```"]
    _save({"environment": env, **extra}, "\n".join(md),
          f"{dev.get('name')}, torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}")


def _bench_rows(cases, title: str, settings=None) -> None:
    """Time ``cases`` group by group (round-robin within each), saving the rows after every group."""
    name = _step_name()
    from bertfast.bench import harness, report

    device = _device()
    bencher = harness.Bencher(device, quick=_dry(), settings=settings)
    cal = harness.calibrate(device, _dtype(device), quick=True, bencher=bencher, tiny=_dry())
    peaks = harness.peaks_of(cal)
    results: List[Any] = [None] * len(cases)
    done: List[Any] = []
    for idx in harness.groups_of(cases):
        group = [cases[i] for i in idx]
        # the rows so far, and what runs now: what a kill in this group leaves
        _save_rows(done, cal, title, partial=True,
                   running=f"{group[0].op} {group[0].shape_label}: {', '.join(c.impl for c in group)}")
        for i, r in zip(idx, bencher.run_group(group, peaks)):
            results[i] = r
        done = [r for r in results if r is not None]
        harness.compute_speedups(done)
        _save_rows(done, cal, title, partial=len(done) < len(cases))
        if bencher.cuda:
            import torch

            torch.cuda.empty_cache()
    keep = {"encoder": ("speedup",), "kernels": ("speedup", "peak")}.get(name, ())
    if keep:
        stem = os.path.join(os.environ["BERTFAST_EVIDENCE_WORK"], "plot")
        written, skipped = report.plots(done, stem, [done[0].suite], str(device))
        for kind in keep:
            src = f"{stem}_{done[0].suite}_{kind}.png"
            if src in written:
                os.replace(src, _out_path(f"{name}_{kind}.png"))
        for line in skipped:
            print(line, file=sys.stderr)


def _save_rows(results, cal, title: str, partial: bool, running: str = "") -> None:
    """The step's rows so far; ``running``: the group being timed now (what a kill would have cut)."""
    from bertfast.bench import report

    footnotes: Dict[str, int] = {}
    md = [title, "", report.markdown_table(results, results[0].suite, footnotes) if results else "(no rows yet)"]
    if footnotes:
        md += ["", *[f"[{n}] {reason}" for reason, n in sorted(footnotes.items(), key=lambda kv: kv[1])]]
    cp, mm = cal.get("copy", {}), cal.get("matmul", {})
    md += ["", f"calibrated in this step: copy {report._fmt(cp.get('gbps'))} GB/s, {mm.get('dtype')} matmul "
               f"{report._fmt(mm.get('tflops'))} TFLOP/s" + (" - partial: the step was cut short" if partial else "")]
    if running:
        md += ["", f"running when this was saved (cut there if the step was killed): {running}"]
    ok = [r for r in results if r.status == "ok"]
    sig = [r for r in ok if r.speedup_significant]
    summary = f"{len(ok)}/{len(results)} rows ok, {len(sig)} speedups outside the noise" + (" (partial)" if partial
                                                                                             else "")
    if running:
        summary += f"; running: {running}"
    data = {"calibration": cal, "results": [r.to_dict() for r in results]}
    if running:
        data["running"] = running
    _save(data, "\n".join(md), summary)


def step_encoder() -> None:
    from bertfast.bench import harness, suites

    device, model = _device(), _model_name()
    dtype = _dtype(device)
    if _dry():
        shapes = [((1, 8), ["full"]), ((2, 16), ["mixed"])]
        settings = harness.BenchSettings(warmup_ms=0, target_ms=5, min_reps=5, max_reps=5, min_warmup=1)
    elif _short():  # the table: (1,128), (32,128) full and mixed; half the timed work
        shapes = [((1, 128), ["full"]), ((32, 128), ["full", "mixed"])]
        settings = harness.BenchSettings(warmup_ms=20, target_ms=100, min_reps=15, max_reps=200, min_warmup=3,
                                         rotation_budget_bytes=1 * 2**30)
    else:
        shapes = [((1, 128), ["full"]), ((32, 128), ["full", "mixed"]), ((32, 512), ["mixed"])]
        settings = harness.BenchSettings(warmup_ms=30, target_ms=200, min_reps=20, max_reps=400, min_warmup=3,
                                         rotation_budget_bytes=1 * 2**30)
    impls = ["hf-eager", "hf-sdpa", "bertfast-triton", "bertfast-triton-unpad", "bertfast-triton-graphs",
             "bertfast-triton-unpad-graphs"]
    cache = suites.ModelCache(device, dtype)
    cases = []
    for shape, modes in shapes:
        cases += suites.encoder_cases([model], [shape], device, dtype, impls, modes, cache=cache)
    _bench_rows(cases, f"{model} encoder, {suites.dtype_name(dtype)}, random weights; baseline "
                                  "transformers eager", settings)


def step_attention() -> None:
    from bertfast.bench import harness, suites

    device = _device()
    dtype = _dtype(device)
    impls = ["triton", "triton-varlen", "eager", "sdpa", "sdpa-mask"]
    if _dry():
        cases = suites.attention_cases([16], 32, 2, 16, device, dtype, impls, ["full", "mixed"], ["fwd"], False)
        settings = harness.BenchSettings(warmup_ms=0, target_ms=5, min_reps=5, max_reps=5, min_warmup=1)
    else:
        cases = suites.attention_cases([512], 32 * 512, 12, 64, device, dtype, impls, ["full", "mixed"],
                                       ["fwd", "fwd+bwd"], False)
        settings = harness.BenchSettings(warmup_ms=20, target_ms=150, min_reps=20, max_reps=300, min_warmup=3,
                                         rotation_budget_bytes=1 * 2**30)
    sh = cases[0].shape
    _bench_rows(cases, f"attention at S={sh['S']}, {sh['B']} sequences, {sh['H']} heads x {sh['D']}; baseline eager "
                       "(matmul-softmax-matmul)", settings)


def step_kernels() -> None:
    from bertfast.bench import harness, suites

    device = _device()
    dtype = _dtype(device)
    if _dry():
        cases = suites.kernel_cases(["tiny"], [16], device, dtype, ["triton", "eager"])
        settings = harness.BenchSettings(warmup_ms=0, target_ms=5, min_reps=5, max_reps=5, min_warmup=1)
    else:  # (1,128), (32,128), (32,512) tokens at bert-base's layer shapes
        cases = suites.kernel_cases(["bert-base"], [128, 32 * 128, 32 * 512], device, dtype, ["triton", "eager"])
        settings = harness.BenchSettings(warmup_ms=10, target_ms=100, min_reps=20, max_reps=400, min_warmup=3,
                                         rotation_budget_bytes=1 * 2**30)
    _bench_rows(cases, f"kernels at {_model_name()} layer shapes; baseline eager PyTorch (cuBLAS GEMMs)",
                settings)


def step_compile() -> None:
    from bertfast.bench import harness, suites

    device, model = _device(), _model_name()
    dtype = _dtype(device)
    if _dry():  # Dynamo's capture only: Inductor on CPU would take minutes
        shape, mode, backend = (2, 16), None, "eager"
        settings = harness.BenchSettings(warmup_ms=0, target_ms=5, min_reps=5, max_reps=5, min_warmup=1)
    else:
        shape, mode, backend = (32, 128), "max-autotune", "inductor"
        settings = harness.BenchSettings(warmup_ms=30, target_ms=200, min_reps=20, max_reps=400, min_warmup=3)
    # first the rows that cannot overrun, as a group of their own (saved when it ends); then the
    # compiled model, interleaved with its baseline again: its first call (the autotuning) is what
    # overruns, and a kill there keeps the first group's rows
    def rows(impls, group=""):
        cases = suites.encoder_cases([model], [shape], device, dtype, impls, ["mixed"], compile_mode=mode,
                                     compile_backend=backend)
        for c in cases:
            c.baseline = "hf-sdpa"
            c.group += group
        return cases

    cases = rows(["hf-sdpa", "bertfast-triton-unpad-graphs"]) + rows(["hf-sdpa", "hf-compile"], " (compiled)")
    _bench_rows(cases, f"torch.compile(mode={mode!r}, backend={backend!r}) of transformers {model}; "
                                  "first-call time (compilation) in the JSON; baseline transformers SDPA", settings)


def step_host() -> None:
    """Host vs device time per forward, interleaved: eager and graph replay, each with the mask
    on the device (the plan reads it: one device read) and with the mask from the host
    (``bertfast.plan.to_device`` inside the timed call: checked and read on the host, copied
    without waiting; no device read); and eager with the host mask with layer programs off
    (every layer through the ops: the before of bertfast/program.py)."""
    import torch

    from bertfast import program
    from bertfast.bench import harness, suites
    from bertfast.plan import to_device
    from bertfast.kernels.testing import count_host_reads

    device = _device()
    cuda = device.type == "cuda"
    dtype = _dtype(device)
    model = suites.ModelCache(device, dtype).bertfast_base(_model_name())  # random weights, seed 0
    cfg = model.config
    shapes = [(1, 8, "full"), (2, 8, "mixed")] if _dry() else [(1, 128, "full"), (32, 128, "full"),
                                                                 (32, 128, "mixed")]
    reps = 3 if _dry() else (20 if _short() else 30)
    backend = "torch" if _dry() else "triton"  # the dry run: the same plumbing, no interpreted kernels
    rows = []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for B, S, mode in shapes:
        lengths = suites.lengths_for(mode, B, S)
        host_mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
        host = {"input_ids": torch.randint(1000, cfg.vocab_size, (B, S)) * host_mask, "attention_mask": host_mask}
        ids, mask = host["input_ids"].to(device), host_mask.to(device)

        def run(graphs, from_host, programs=True):
            """(inputs, forward): a mode's call is forward(inputs()); its device reads are counted in
            the forward (to_device reads the host tensors, never the device).  ``programs`` False:
            every layer through the ops (bertfast/program.py off: the eager host path before them)."""
            def inputs():
                return to_device(host, model) if from_host else {"input_ids": ids, "attention_mask": mask}

            def forward(kw):
                model.set_backend(backend, graphs=graphs)
                with program.enabled(programs):
                    return model(**kw)
            return inputs, forward

        modes = {"eager": run(False, False), "eager, host mask": run(False, True),
                 "eager, host mask, through the ops": run(False, True, programs=False)}
        if cuda:
            modes.update({"graph replay": run(True, False), "graph replay, host mask": run(True, True)})
        samples: Dict[str, Dict[str, List[float]]] = {m: {"host_ms": [], "wall_ms": [], "device_ms": []}
                                                      for m in modes}
        reads = {}
        with torch.inference_mode():
            for m, (inputs, forward) in modes.items():
                for _ in range(2):  # warm-up (first graph capture included)
                    forward(inputs())
                sync()
                kw = inputs()
                with count_host_reads() as n:
                    forward(kw)
                sync()
                reads[m] = n[0]
            for r in range(reps):
                order = list(modes.items())
                order = order[r % len(order):] + order[:r % len(order)]
                for m, (inputs, forward) in order:
                    sync()
                    if cuda:
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                    t0 = time.perf_counter()
                    forward(inputs())
                    t1 = time.perf_counter()
                    if cuda:
                        e.record()
                    sync()
                    t2 = time.perf_counter()
                    samples[m]["host_ms"].append((t1 - t0) * 1e3)
                    samples[m]["wall_ms"].append((t2 - t0) * 1e3)
                    if cuda:
                        samples[m]["device_ms"].append(s.elapsed_time(e))
        for m in modes:
            row = {"B": B, "S": S, "lengths": mode, "mode": m, "device_reads": reads[m]}
            for k, xs in samples[m].items():
                row[k] = harness.summarize(xs) if xs else None
            rows.append(row)
        if not cuda:
            rows += [{"B": B, "S": S, "lengths": mode, "mode": m, "unavailable": "CUDA graphs need a CUDA GPU"}
                     for m in ("graph replay", "graph replay, host mask")]
        _save_host_rows(rows, backend, partial=(B, S, mode) != shapes[-1])


def _save_host_rows(rows: List[Dict[str, Any]], backend: str, partial: bool) -> None:
    """The host step's rows so far (saved after every shape: a kill keeps the finished shapes)."""
    md = ["host = time until the forward returns (launches issued; a device read waits for the GPU inside it), "
          "wall = until the device is done (synchronised), device = CUDA events around the call; host mask = "
          "the inputs built on the CPU, bertfast.plan.to_device inside the timed call; median "
          "[p10-p90] ms over interleaved forwards" + (" - dry run: CPU, PyTorch backend (plumbing only)"
                                                      if _dry() else ""), "",
          "| B x S | lengths | mode | device reads | host ms | wall ms | device ms | host/wall |",
          "|---|---|---|---|---|---|---|---|"]

    def cell(t):
        return "-" if not t else f"{t['median_ms']:.3g} [{t['p10_ms']:.3g}-{t['p90_ms']:.3g}]" + (
            " (noisy)" if t["noisy"] else "")

    for r in rows:
        if "unavailable" in r:
            md.append(f"| {r['B']} x {r['S']} | {r['lengths']} | {r['mode']} | - | {r['unavailable']} | | | |")
            continue
        ratio = r["host_ms"]["median_ms"] / r["wall_ms"]["median_ms"] if r["wall_ms"]["median_ms"] else None
        md.append(f"| {r['B']} x {r['S']} | {r['lengths']} | {r['mode']} | {r['device_reads']} | {cell(r['host_ms'])} "
                  f"| {cell(r['wall_ms'])} | {cell(r.get('device_ms'))} | "
                  f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    if partial:
        md += ["", "partial: the step was cut short after these shapes"]
    _save({"model": _model_name(), "backend": backend, "rows": rows}, "\n".join(md),
          f"{len(rows)} rows ({', '.join(sorted({r['mode'] for r in rows}))})" + (" (partial)" if partial else ""))


def step_profile() -> None:
    from bertfast.bench import profile

    work = os.environ["BERTFAST_EVIDENCE_WORK"]
    out = os.path.join(work, "profile")
    argv = ["--model", _model_name(), "--batch", "2" if _dry() else "32", "--seq", "16" if _dry() else "128",
            "--lengths", "mixed", "--steps", "1" if _dry() else "3", "--warmup", "1" if _dry() else "2",
            "--backend", "torch" if _dry() else "triton", "--out", out]
    rc = profile.main(argv)
    if rc != 0:
        raise SystemExit(rc)
    files = os.listdir(out)
    md = "".join(open(os.path.join(out, f), encoding="utf-8").read() for f in files if f.endswith(".md"))
    (doc_name,) = [f for f in files if f.endswith(".json") and not f.endswith(".trace.json")]
    with open(os.path.join(out, doc_name), encoding="utf-8") as f:
        doc = json.load(f)
    trace = [f for f in files if f.endswith(".trace.json")]
    note = ""
    if trace:
        size = os.path.getsize(os.path.join(out, trace[0]))
        if size < 15 * 2**20:  # what comes back from a lent machine: 16 MiB a file
            os.replace(os.path.join(out, trace[0]), _out_path("profile_trace.json"))
            note = "trace: profile_trace.json (open in https://ui.perfetto.dev)"
        else:
            note = f"trace not kept: {size / 2**20:.0f} MiB"
    doc.pop("environment", None)
    _save(doc, "```\n" + md.strip() + "\n```\n\n" + note, note or "profiled")


def step_tune() -> None:
    """``bertfast tune`` on a random checkpoint of the evidence model's shape (no checkpoint
    package needed); the choices land in ``$BERTFAST_TUNE_CACHE`` (``<out>/tune.json``)."""
    import contextlib
    import io

    import torch

    from bertfast import cli
    from bertfast.bench import suites

    ckpt = os.path.join(os.environ["BERTFAST_EVIDENCE_WORK"], "tune-checkpoint")
    suites.ModelCache(torch.device("cpu"), torch.float32).bertfast_base(_model_name()).save_pretrained(ckpt)
    shapes = "1x8,2x16" if _dry() else "1x128,32x128,32x512"
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = cli.main(["tune", "--model", ckpt, "--shapes", shapes, "--lengths", "both"])
    sys.stdout.write(buf.getvalue())
    sys.stderr.write(err.getvalue())
    text = (buf.getvalue() + err.getvalue()).strip()
    last = text.splitlines()[-1] if text else ""
    status = "unavailable" if rc != 0 and "CUDA GPU" in text else ("ok" if rc == 0 else "failed")
    _save({"rc": rc, "shapes": shapes, "cache": os.environ.get("BERTFAST_TUNE_CACHE")},
          "```\n" + text + "\n```", last[:200], status=status)
    if status == "failed":
        raise SystemExit(rc)


STEP_FUNCS = {"tune": step_tune, "kernels-tuned": step_kernels, "versions": step_versions, "host": step_host, "encoder": step_encoder, "attention": step_attention,
              "kernels": step_kernels, "profile": step_profile, "compile": step_compile}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bertfast.bench.evidence``: parsed by bertfast/cli/bench.py (:func:`evidence_main`)."""
    from bertfast.cli.bench import evidence_main

    return evidence_main(argv)


if __name__ == "__main__":
    sys.exit(main())
