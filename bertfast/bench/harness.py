"""The one timing harness every bertfast benchmark uses.

A run is: describe the machine (:func:`environment`), measure what this device can actually do
(:func:`calibrate`: a large device-to-device copy for bandwidth and a large half-precision matmul
for the matrix rate, both in the same process as the cases), then time each :class:`Case` with
:class:`Bencher` and attach FLOP and byte counts so every row can be read as GB/s or TFLOP/s and
as a fraction of the measured peak.

Timing rules
------------
* GPU: one pair of CUDA events around every call; the first call (compile / autotune) is timed
  separately and warm-up calls are excluded.  Kernel cases zero a buffer larger than the L2 cache
  before each call (a cold cache, and the zeroing keeps the GPU queue ahead of Python, so launch
  overhead does not count); end-to-end cases synchronise before each call instead, so that the
  host-side overhead a user pays is included.  ``timer="do_bench"`` uses ``triton.testing.do_bench``.
* CPU: ``time.perf_counter`` around every call.
* Inputs are rotated between several copies (enough to exceed the last-level cache, within a
  memory budget) so that no call finds its inputs already cached by the previous one.
* Reported: median, p10/p90, min, max, mean, std and the number of timed calls.
* Peak memory: ``torch.cuda.max_memory_allocated`` around one call on CUDA; ``None`` on CPU (there
  is no faithful allocator counter for PyTorch's CPU allocations, so nothing is made up).

Interpreter rule: Triton timings are refused when ``TRITON_INTERPRET=1`` is set (``kernels``
then runs every kernel in the Python interpreter, whose speed says nothing about a GPU), and a
case that launches an interpreted Triton kernel anyway is refused after the fact.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from kernels._common import dtype_name

SCHEMA = "bertfast.bench/1"

INTERPRETER_REASON = (
    "TRITON_INTERPRET=1 is set: Triton kernels would run in the Python interpreter, whose timings say "
    "nothing about GPU performance; Triton timings need a CUDA GPU with TRITON_INTERPRET unset"
)
NO_GPU_REASON = "Triton timings need a CUDA GPU (this machine has none)"

class Unavailable(Exception):
    """Raised while preparing a case when a feature it needs does not exist (yet) on this
    machine or in this version of bertfast: the row is reported ``unavailable`` with the message."""


STATUS_OK = "ok"
STATUS_UNAVAILABLE = "unavailable"
STATUS_ERROR = "error"


def interpreter_active() -> bool:
    """True when Triton kernels would be interpreted: ``kernels.INTERPRET`` (read when ``kernels``
    was imported) or the environment variable as it is now."""
    env = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    mod = sys.modules.get("kernels")
    return env or bool(getattr(mod, "INTERPRET", False))


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why Triton cases cannot be timed on ``device`` (``None``: they can)."""
    if interpreter_active():
        return INTERPRETER_REASON
    if device.type != "cuda":
        return NO_GPU_REASON
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency on Linux x86-64
        return f"triton is not importable: {e}"
    return None


# --------------------------------------------------------------------------- environment
def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        m = sys.modules.get(mod)
        return getattr(m, "__version__", None)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> Optional[str]:
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run(
                [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0].strip()
        except Exception:
            pass
    return None


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() or None
    except Exception:
        pass
    return None


def _cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache the inputs must not fit in (L2 on GPU, L3 on CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    for idx in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size", encoding="utf-8") as f:
                s = f.read().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1], 1)
            return int(s.rstrip("KMG")) * mult
        except (OSError, ValueError):
            continue
    return 32 * 2**20


def device_info(device: torch.device) -> Dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_bytes": int(props.total_memory),
            "l2_bytes": _cache_bytes(device),
            "driver": _nvidia_driver(),
            "cuda_runtime": torch.version.cuda,
        }
    return {
        "type": "cpu",
        "name": _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "llc_bytes": _cache_bytes(device),
        "driver": None,
        "cuda_runtime": None,
    }


def environment(device: torch.device, command: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Everything needed to interpret (and reproduce) a run."""
    if command is not None:
        cmd = list(command)
    else:
        prog = os.path.basename(sys.argv[0] or "python")
        if prog == "__main__.py":  # python -m PACKAGE
            prog = "python -m " + os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0])))
        cmd = [prog, *sys.argv[1:]]
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(cmd),
        "argv": cmd,
        "machine": {
            "platform": platform.platform(),
            "arch": platform.machine(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
        },
        "device": device_info(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "driver": _nvidia_driver() if device.type == "cuda" else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "bertfast": _version("bertfast"),
            "numpy": _version("numpy"),
            "cuda": torch.version.cuda,
        },
        "git_commit": _git_commit(),
        "triton_interpret": interpreter_active(),
    }


def device_slug(env: Dict[str, Any]) -> str:
    """Short file-name-safe device name: ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    dev = env.get("device", {})
    if dev.get("type") != "cuda":
        return "cpu"
    name = str(dev.get("name") or "gpu").lower()
    out = "".join(c if c.isalnum() else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "gpu"


# --------------------------------------------------------------------------- statistics
def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
    xs = sorted(float(t) for t in times_ms)
    n = len(xs)
    mean = sum(xs) / n if n else float("nan")
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {
        "median_ms": _quantile(xs, 0.5),
        "p10_ms": _quantile(xs, 0.1),
        "p90_ms": _quantile(xs, 0.9),
        "min_ms": xs[0] if xs else float("nan"),
        "max_ms": xs[-1] if xs else float("nan"),
        "mean_ms": mean,
        "std_ms": std,
        "n": n,
    }


# --------------------------------------------------------------------------- interpreter guard
class InterpreterGuard:
    """Counts Triton kernels launched through the interpreter while active (a safety net: a case
    whose implementation ends up interpreted is refused, not reported)."""

    def __init__(self):
        self.launches = 0
        self._orig = None
        self._cls = None

    def __enter__(self):
        try:
            from triton.runtime import interpreter as _interp

            cls = getattr(_interp, "GridExecutor", None)
        except Exception:
            cls = None
        if cls is not None and hasattr(cls, "__call__"):
            orig = cls.__call__
            guard = self

            def counting(this, *a, **k):
                guard.launches += 1
                return orig(this, *a, **k)

            self._cls, self._orig = cls, orig
            cls.__call__ = counting
        return self

    def __exit__(self, *exc):
        if self._cls is not None:
            self._cls.__call__ = self._orig
        return False


# --------------------------------------------------------------------------- cases
@dataclass
class Prepared:
    """A case ready to run: ``fn(*args)`` for ``args`` from ``make_inputs()`` (called once per
    rotated copy).  ``check(out, args)`` may return a dict describing correctness; ``info()`` may
    return facts learned while preparing (e.g. the SDPA backend)."""

    fn: Callable[..., Any]
    make_inputs: Callable[[], tuple]
    check: Optional[Callable[[Any, tuple], Dict[str, Any]]] = None
    info: Dict[str, Any] = field(default_factory=dict)
    rotate: bool = True  # False: one input set only (e.g. the inputs are huge already)


@dataclass
class Case:
    """One timed row: ``impl`` of ``op`` at ``shape``.

    ``flops``: useful floating-point operations of one call (masked / padded work excluded).
    ``bytes``: minimal DRAM traffic of one call (each operand read once, each output written once).
    ``metric``: ``"tflops"`` (compute-bound: GEMMs, attention, encoders) or ``"gbps"``
    (memory-bound).  ``build`` returns a :class:`Prepared`; ``unavailable`` (a reason) skips it.
    """

    suite: str
    op: str
    impl: str
    shape: Dict[str, Any]
    dtype: str
    flops: float = 0.0
    bytes: float = 0.0
    metric: str = "tflops"
    build: Optional[Callable[[], Prepared]] = None
    unavailable: Optional[str] = None
    baseline: str = "eager"  # impl that speedups in this group are measured against
    end_to_end: bool = False  # True: include host overhead (sync before each call, no cache flush)
    triton: bool = False  # True: the implementation launches Triton kernels
    group: str = ""  # rows with the same group compare against each other (speedup vs baseline)
    notes: str = ""

    def __post_init__(self):
        if not self.group:
            self.group = f"{self.suite}/{self.op}/" + ",".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def shape_label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


@dataclass
class Result:
    suite: str
    op: str
    impl: str
    shape: Dict[str, Any]
    dtype: str
    group: str
    baseline: str
    status: str
    reason: Optional[str] = None
    metric: str = "tflops"
    flops: float = 0.0
    bytes: float = 0.0
    timing: Optional[Dict[str, float]] = None
    first_call_ms: Optional[float] = None
    rotated_copies: int = 0
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    fraction_of_peak: Optional[float] = None
    speedup_vs_baseline: Optional[float] = None
    peak_mem_bytes: Optional[int] = None  # max_memory_allocated during one call (CUDA only)
    peak_extra_bytes: Optional[int] = None  # ... minus what was allocated before the call
    check: Optional[Dict[str, Any]] = None
    info: Dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def median_ms(self) -> Optional[float]:
        return self.timing["median_ms"] if self.timing else None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- bencher
@dataclass
class BenchSettings:
    warmup_ms: float
    target_ms: float
    min_reps: int
    max_reps: int
    min_warmup: int = 1
    rotation_budget_bytes: int = 512 * 2**20
    max_copies: int = 16

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> "BenchSettings":
        if device.type == "cuda":
            if quick:
                return cls(warmup_ms=10, target_ms=60, min_reps=10, max_reps=200, min_warmup=3,
                           rotation_budget_bytes=1 * 2**30)
            return cls(warmup_ms=50, target_ms=300, min_reps=20, max_reps=2000, min_warmup=5,
                       rotation_budget_bytes=2 * 2**30)
        if quick:
            return cls(warmup_ms=0, target_ms=60, min_reps=3, max_reps=20, min_warmup=0,
                       rotation_budget_bytes=64 * 2**20, max_copies=4)
        return cls(warmup_ms=100, target_ms=800, min_reps=5, max_reps=100, min_warmup=2,
                   rotation_budget_bytes=256 * 2**20, max_copies=8)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


class Bencher:
    def __init__(self, device: torch.device, quick: bool = False, timer: str = "events",
                 settings: Optional[BenchSettings] = None):
        self.device = torch.device(device)
        self.quick = quick
        self.timer = timer if self.device.type == "cuda" else "perf_counter"
        self.settings = settings or BenchSettings.for_device(self.device, quick)
        self.cache_bytes = _cache_bytes(self.device)
        self._flush_buf = None

    # ---- helpers
    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _flush(self):
        if self.device.type != "cuda":
            return
        if self._flush_buf is None:
            # twice the L2, at least 64 MiB: zeroing it evicts everything the last call cached
            n = max(2 * self.cache_bytes, 64 * 2**20)
            self._flush_buf = torch.empty(n // 4, dtype=torch.int32, device=self.device)
        self._flush_buf.zero_()

    def copies_for(self, set_bytes: int) -> int:
        """How many input copies to rotate through: enough to exceed 2x the last-level cache."""
        s = self.settings
        if set_bytes <= 0:
            return 1
        want = math.ceil(2 * self.cache_bytes / set_bytes)
        afford = max(1, s.rotation_budget_bytes // set_bytes)
        return int(max(1, min(want, afford, s.max_copies)))

    def _call_once_ms(self, fn, args, flush: bool, sync_before: bool) -> float:
        if self.device.type == "cuda":
            if flush:
                self._flush()
            if sync_before:
                self.sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1e3

    # ---- the timer
    def time(self, fn: Callable, inputs: List[tuple], *, flush: bool = True, sync_before: bool = False) -> Dict[str, Any]:
        """Time ``fn(*inputs[i % len(inputs)])``: first call separately, warm-up excluded, then
        enough calls to fill ``target_ms``.  Returns :func:`summarize` plus ``first_call_ms``."""
        s = self.settings
        first = self._call_once_ms(fn, inputs[0], flush, True)
        # warm-up: at least min_warmup calls and warmup_ms of work
        k, spent, warm = 0, 0.0, []
        while k < s.min_warmup or spent < s.warmup_ms:
            t = self._call_once_ms(fn, inputs[(k + 1) % len(inputs)], flush, sync_before)
            warm.append(t)
            spent += t
            k += 1
            if k >= 10 * max(s.max_reps, 1):
                break
        est = max(sorted(warm)[len(warm) // 2] if warm else first, 1e-4)
        reps = int(min(max(math.ceil(s.target_ms / est), s.min_reps), s.max_reps))

        if self.timer == "do_bench" and self.device.type == "cuda":
            import triton.testing

            counter = [0]

            def call():
                args = inputs[counter[0] % len(inputs)]
                counter[0] += 1
                fn(*args)

            q = triton.testing.do_bench(call, warmup=int(max(s.warmup_ms, 1)), rep=int(max(s.target_ms, 1)),
                                        quantiles=[0.5, 0.1, 0.9, 0.0, 1.0])
            med, p10, p90, lo, hi = (float(v) for v in q)
            out = {"median_ms": med, "p10_ms": p10, "p90_ms": p90, "min_ms": lo, "max_ms": hi,
                   "mean_ms": med, "std_ms": float("nan"), "n": -1}
        elif self.device.type == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            self.sync()
            for i in range(reps):
                args = inputs[i % len(inputs)]
                if flush:
                    self._flush()
                if sync_before:
                    self.sync()
                starts[i].record()
                fn(*args)
                ends[i].record()
            self.sync()
            out = summarize([a.elapsed_time(b) for a, b in zip(starts, ends)])
        else:
            times = []
            for i in range(reps):
                args = inputs[i % len(inputs)]
                t0 = time.perf_counter()
                fn(*args)
                times.append((time.perf_counter() - t0) * 1e3)
            out = summarize(times)
        out["first_call_ms"] = first
        out["timer"] = self.timer
        out["flush"] = bool(flush and self.device.type == "cuda")
        return out

    def peak_memory(self, fn: Callable, args: tuple) -> tuple[Optional[int], Optional[int]]:
        """(max_memory_allocated during one call, the part above what was allocated before it);
        ``(None, None)`` off CUDA."""
        if self.device.type != "cuda":
            return None, None
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn(*args)
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        return int(peak), int(max(peak - base, 0))

    # ---- a case
    def run_case(self, case: Case, peaks: Optional[Dict[str, float]] = None) -> Result:
        res = Result(suite=case.suite, op=case.op, impl=case.impl, shape=dict(case.shape), dtype=case.dtype,
                     group=case.group, baseline=case.baseline, status=STATUS_OK, metric=case.metric,
                     flops=float(case.flops), bytes=float(case.bytes), notes=case.notes)
        if case.unavailable or case.build is None:
            res.status, res.reason = STATUS_UNAVAILABLE, case.unavailable or "no implementation"
            return res
        if case.triton:
            why = triton_unavailable_reason(self.device)
            if why:
                res.status, res.reason = STATUS_UNAVAILABLE, why
                return res
        inputs = None
        try:
            with InterpreterGuard() as guard:
                prep = case.build()
                res.info.update(prep.info or {})
                first = prep.make_inputs()
                n = self.copies_for(_nbytes(first)) if prep.rotate else 1
                inputs = [first] + [prep.make_inputs() for _ in range(n - 1)]
                res.rotated_copies = n
                # the first call (compilation, autotuning) is timed on its own inside time()
                timing = self.time(prep.fn, inputs, flush=not case.end_to_end, sync_before=case.end_to_end)
                if prep.check is not None:
                    out = prep.fn(*inputs[0])
                    try:
                        res.check = prep.check(out, inputs[0])
                    except Exception as e:  # a broken check is reported, not fatal
                        res.check = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    del out
                res.peak_mem_bytes, res.peak_extra_bytes = self.peak_memory(prep.fn, inputs[0])
            if guard.launches:
                res.status, res.reason = STATUS_UNAVAILABLE, (
                    f"refused: {guard.launches} Triton kernel launches ran in the interpreter; " + INTERPRETER_REASON)
                return res
        except Unavailable as e:
            res.status, res.reason = STATUS_UNAVAILABLE, str(e)
            return res
        except Exception as e:
            res.status = STATUS_ERROR
            msg = f"{type(e).__name__}: {e}".strip()
            res.reason = msg.splitlines()[0][:300] if msg else type(e).__name__
            res.info["traceback"] = traceback.format_exc(limit=6)[-2000:]
            return res
        finally:
            del inputs
        res.first_call_ms = timing.pop("first_call_ms")
        res.info["timer"] = timing.pop("timer")
        res.info["cache_flush"] = timing.pop("flush")
        res.timing = timing
        med_s = timing["median_ms"] / 1e3
        if med_s > 0:
            if case.flops:
                res.tflops = case.flops / med_s / 1e12
            if case.bytes:
                res.gbps = case.bytes / med_s / 1e9
        if peaks:
            if case.metric == "gbps" and res.gbps and peaks.get("gbps"):
                res.fraction_of_peak = res.gbps / peaks["gbps"]
            elif case.metric == "tflops" and res.tflops and peaks.get("tflops"):
                res.fraction_of_peak = res.tflops / peaks["tflops"]
        return res


def compute_speedups(results: List[Result]) -> None:
    """Fill ``speedup_vs_baseline`` = baseline median / this median within each group."""
    base: Dict[str, float] = {}
    for r in results:
        if r.status == STATUS_OK and r.impl == r.baseline and r.median_ms:
            base[r.group] = r.median_ms
    for r in results:
        b = base.get(r.group)
        if b and r.status == STATUS_OK and r.median_ms:
            r.speedup_vs_baseline = b / r.median_ms


# --------------------------------------------------------------------------- calibration
def calibrate(device: torch.device, dtype: torch.dtype, quick: bool = False,
              bencher: Optional[Bencher] = None) -> Dict[str, Any]:
    """Measure achievable bandwidth (device-to-device copy) and matrix rate (square matmul in
    ``dtype``) on ``device`` now, in this process: the peaks every fraction is relative to (from
    the fastest of the timed calls; the median-based rates are kept too)."""
    import dataclasses

    device = torch.device(device)
    b = bencher or Bencher(device, quick)
    # the peaks are the best of at least 10 timed calls (a peak is what the device can do)
    b = Bencher(device, quick, b.timer if b.timer != "perf_counter" else "events",
                dataclasses.replace(b.settings, min_reps=max(b.settings.min_reps, 10)))
    cuda = device.type == "cuda"
    if cuda:
        copy_bytes = (256 if quick else 1024) * 2**20
        n = 4096 if quick else 8192
        mm_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        if dtype == torch.float32:
            mm_dtype = torch.float32  # TF32 or IEEE per torch.backends.cuda.matmul.allow_tf32
    else:
        copy_bytes = 64 * 2**20  # larger than a server CPU's last-level cache
        n = 1024
        mm_dtype = dtype if dtype != torch.float16 else torch.float32
    out: Dict[str, Any] = {"device": str(device)}
    try:
        src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        t = b.time(lambda s, d: d.copy_(s), [(src, dst)], flush=False)
        moved = 2 * copy_bytes  # read + write
        out["copy"] = {"bytes_moved": moved, "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                       "p90_ms": t["p90_ms"], "gbps": moved / (t["min_ms"] / 1e3) / 1e9,
                       "gbps_median": moved / (t["median_ms"] / 1e3) / 1e9}
        del src, dst
    except Exception as e:  # pragma: no cover - out of memory on a small device
        out["copy"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(mm_dtype)
        c = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(mm_dtype)
        t = b.time(torch.matmul, [(a, c)], flush=False)
        fl = 2.0 * n ** 3
        out["matmul"] = {"m": n, "n": n, "k": n, "dtype": dtype_name(mm_dtype),
                         "median_ms": t["median_ms"], "min_ms": t["min_ms"], "p90_ms": t["p90_ms"],
                         "tflops": fl / (t["min_ms"] / 1e3) / 1e12,
                         "tflops_median": fl / (t["median_ms"] / 1e3) / 1e12,
                         "tf32": bool(cuda and mm_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)}
        del a, c
    except Exception as e:  # pragma: no cover
        out["matmul"] = {"error": f"{type(e).__name__}: {e}"}
    out["peak_gbps"] = out["copy"].get("gbps")
    out["peak_tflops"] = out["matmul"].get("tflops")
    return out


def peaks_of(calibration: Dict[str, Any]) -> Dict[str, float]:
    return {"gbps": calibration.get("peak_gbps") or 0.0, "tflops": calibration.get("peak_tflops") or 0.0}


# --------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True, stream=None, width: int = 24):
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()

    def _bar(self) -> str:
        filled = int(self.width * self.done / self.total)
        return "[" + "#" * filled + "." * (self.width - filled) + f"] {self.done}/{self.total}"

    def update(self, label: str, advance: int = 0) -> None:
        self.done += advance
        if not self.enabled or (not self.tty and not advance):
            return  # without a terminal: one line per finished step
        el = time.perf_counter() - self.t0
        line = f"{self._bar()} {el:6.1f}s {label}"
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + line[: cols - 1].ljust(cols - 1))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_cases(cases: List[Case], bencher: Bencher, calibration: Optional[Dict[str, Any]] = None,
              progress: Optional[Progress] = None) -> List[Result]:
    peaks = peaks_of(calibration or {})
    results = []
    for case in cases:
        label = f"{case.suite} {case.op} {case.shape_label} {case.impl}"
        if progress:
            progress.update(label)
        results.append(bencher.run_case(case, peaks))
        if progress:
            progress.update(label, advance=1)
        if bencher.device.type == "cuda":
            torch.cuda.empty_cache()
    compute_speedups(results)
    return results
