"""The one timing harness every bertfast benchmark uses.

A run is: describe the machine (:func:`environment`), measure what this device can actually do
(:func:`calibrate`: a large device-to-device copy for bandwidth and a large half-precision matmul
for the matrix rate, both in the same process as the cases), then time each :class:`Case` with
:class:`Bencher` and attach FLOP and byte counts so every row can be read as GB/s or TFLOP/s and
as a fraction of the measured peak.

Timing rules
------------
* Rows of one group (the systems compared at one op and shape) are timed **round-robin** in one
  loop (:meth:`Bencher.run_group`): every round runs each once, the starting row rotating, so
  load from other processes hits them alike and every row has the same repetitions.
* GPU: one pair of CUDA events around every call; the first call (compile / autotune) is timed
  separately and warm-up calls are excluded.  Kernel rows zero a buffer larger than the L2 cache
  and then enqueue a device-side delay (``torch.cuda._sleep``) before each call, so that the GPU
  is busy while the host issues the call and the events measure the device alone; end-to-end
  rows synchronise before each call instead, so that the host work a user pays is included.
  Device reads inside a call are counted (``bertfast.kernels.testing.count_host_reads``) and flagged on
  kernel rows.  ``timer="do_bench"`` uses ``triton.testing.do_bench`` (not interleaved).
* CPU: :data:`CLOCK` (``time.perf_counter``) around every call.
* Inputs are rotated between several copies (enough to exceed the last-level cache, within a
  memory budget shared by the group) so that no call finds its inputs cached by the previous one.
* Every row keeps its repetitions (``timing["times_ms"]``) and reports median, p10/p90, IQR,
  min, max, mean, std and n; a row whose p10-p90 spread exceeds :data:`NOISE_REL` of its median
  is flagged ``noisy``.  A speedup counts only when it lies outside the combined spread
  (:func:`compare`); otherwise it is "within noise".
* ``% of peak`` only against the copy bandwidth / matmul rate calibrated on the same device in
  the same run (:func:`calibrate`), in the row's dtype, and for bandwidth rows only when the
  rotated inputs exceed the cache; above 100% is flagged with the reason.
* Peak memory: ``torch.cuda.max_memory_allocated`` around one call on CUDA; ``None`` on CPU (there
  is no faithful allocator counter for PyTorch's CPU allocations, so nothing is made up).

Interpreter rule: Triton timings are refused when ``TRITON_INTERPRET=1`` is set (``kernels``
then runs every kernel in the Python interpreter, whose speed says nothing about a GPU), and a
case that launches an interpreted Triton kernel anyway is refused after the fact.
"""
from __future__ import annotations

import datetime as _dt
import importlib
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

from bertfast.kernels._common import dtype_name, tf32_allowed

SCHEMA = "bertfast.bench/1"

INTERPRETER_REASON = (
    "TRITON_INTERPRET=1 is set: Triton kernels would run in the Python interpreter, whose timings say "
    "nothing about GPU performance; Triton timings need a CUDA GPU with TRITON_INTERPRET unset"
)
NO_GPU_REASON = "Triton timings need a CUDA GPU (this machine has none)"

class Unavailable(Exception):
    """Raised while preparing a case when something it needs is missing on this machine (a CUDA
    GPU, transformers, a model's weights): the row is reported ``unavailable`` with the message."""


STATUS_OK = "ok"
STATUS_UNAVAILABLE = "unavailable"
STATUS_ERROR = "error"


def interpreter_active() -> bool:
    """True when Triton kernels would be interpreted: ``bertfast.kernels.INTERPRET`` (read when ``kernels``
    was imported) or the environment variable as it is now."""
    env = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    mod = sys.modules.get("kernels")
    return env or bool(getattr(mod, "INTERPRET", False))


def bench_device() -> tuple:
    """(device, dtype) benchmarks run on here: CUDA in fp16 when a GPU is usable and Triton is
    not interpreted, else the CPU in fp32."""
    if torch.cuda.is_available() and not interpreter_active():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why Triton cases cannot be timed on ``device`` (``None``: they can)."""
    if interpreter_active():
        return INTERPRETER_REASON
    if device.type != "cuda":
        return NO_GPU_REASON
    try:
        importlib.import_module("triton")
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


def cpu_name() -> str:
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


def git_commit() -> Optional[str]:
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
        "name": cpu_name(),
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
            "cpu": cpu_name(),
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
        "git_commit": git_commit(),
        "triton_interpret": interpreter_active(),
    }


def busy_note(device: torch.device) -> Optional[str]:
    """A warning when CPU timings will be quantised by the scheduler: the 1-minute load average
    plus torch's threads exceed the cores.  A multi-threaded PyTorch op then waits for its
    descheduled threads, so its time grows in steps of the kernel's scheduler tick (4 ms at 250
    Hz): seen here as pytest-benchmark medians in 4 ms steps (eager attention at 2x12x64x64: about
    24 ms with 2 threads on a loaded 2-core machine, 1.5 ms with 1)."""
    if device.type != "cpu":
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        return None
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    if threads > 1 and load + threads > cores + 0.5:
        return (f"the machine is busy (load average {load:.1f} on {cores} cores, torch uses {threads} threads): "
                f"multi-threaded CPU timings wait for the scheduler (steps of a few ms); rows are interleaved and "
                f"noisy ones flagged; --threads 1 gives steadier numbers")
    return None


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
# A row whose p10-p90 spread exceeds this fraction of its median is flagged "noisy" (table and
# plot): its median alone would claim more precision than the repetitions support.
NOISE_REL = 0.25


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _round(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def summarize(times_ms: Sequence[float]) -> Dict[str, Any]:
    """Median, spread (p10-p90, IQR), min, max, mean, std, n, and the repetitions themselves
    (``times_ms``, in the order they were taken, 5 significant digits) of a timed row.
    ``spread_rel`` = (p90 - p10) / median; ``noisy`` when it exceeds :data:`NOISE_REL`."""
    raw = [float(t) for t in times_ms]
    xs = sorted(raw)
    n = len(xs)
    mean = sum(xs) / n if n else float("nan")
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    med, p10, p90 = _quantile(xs, 0.5), _quantile(xs, 0.1), _quantile(xs, 0.9)
    p25, p75 = _quantile(xs, 0.25), _quantile(xs, 0.75)
    rel = (p90 - p10) / med if n and med > 0 else float("nan")
    return {
        "median_ms": med,
        "p10_ms": p10,
        "p90_ms": p90,
        "p25_ms": p25,
        "p75_ms": p75,
        "iqr_ms": p75 - p25,
        "min_ms": xs[0] if xs else float("nan"),
        "max_ms": xs[-1] if xs else float("nan"),
        "mean_ms": mean,
        "std_ms": std,
        "n": n,
        "spread_rel": rel,
        "noisy": bool(n and (not math.isfinite(rel) or rel > NOISE_REL)),
        "times_ms": [_round(x) for x in raw],
    }


def compare(base: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Any]:
    """How much faster ``other`` is than ``base`` (timings from :func:`summarize`).

    ``speedup`` = base median / other median.  ``low``, ``high``: the range the two spreads
    allow, base p10 / other p90 to base p90 / other p10.  ``significant`` only when that whole
    range lies on one side of 1 (the p10-p90 bands do not overlap): otherwise the difference is
    within the noise of the run and no speedup is claimed."""
    b_med, o_med = base["median_ms"], other["median_ms"]
    if not (b_med and o_med and b_med > 0 and o_med > 0):
        return {"speedup": None, "low": None, "high": None, "significant": False}
    low = base["p10_ms"] / other["p90_ms"] if other["p90_ms"] > 0 else float("nan")
    high = base["p90_ms"] / other["p10_ms"] if other["p10_ms"] > 0 else float("inf")
    return {"speedup": b_med / o_med, "low": low, "high": high,
            "significant": bool(math.isfinite(low) and (low > 1.0 or high < 1.0))}


def speedup_text(r: "Result", digits: int = 2) -> str:
    """What a table prints for a row's speedup: ``"1.42x"`` when it is outside the combined
    spread, ``"within noise"`` when not, ``"-"`` when there is none (the baseline itself, or no
    baseline row)."""
    if r.speedup_vs_baseline is None or r.impl == r.baseline:
        return "-"
    if not r.speedup_significant:
        return "within noise"
    return f"{r.speedup_vs_baseline:.{digits}f}x"


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
    before: Optional[Callable[[], Any]] = None  # run before each call, outside the timing (a model's setting)


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
    speedup_vs_baseline: Optional[float] = None  # baseline median / this median (see compare())
    speedup_low: Optional[float] = None  # the range the two p10-p90 spreads allow
    speedup_high: Optional[float] = None
    speedup_significant: bool = False  # False: "within noise", no speedup is claimed
    peak_mem_bytes: Optional[int] = None  # max_memory_allocated during one call (CUDA only)
    peak_extra_bytes: Optional[int] = None  # ... minus what was allocated before the call
    check: Optional[Dict[str, Any]] = None
    info: Dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    flags: List[str] = field(default_factory=list)  # what makes this row's numbers less than plain

    @property
    def noisy(self) -> bool:
        return bool(self.timing and self.timing.get("noisy"))

    @property
    def median_ms(self) -> Optional[float]:
        return self.timing["median_ms"] if self.timing else None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- bencher
@dataclass
class BenchSettings:
    warmup_ms: float
    target_ms: float  # timed work per row (a group of n rows runs about n * target_ms)
    min_reps: int
    max_reps: int
    min_warmup: int = 1
    rotation_budget_bytes: int = 512 * 2**20  # shared by the rows of one group
    max_copies: int = 16

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> "BenchSettings":
        if device.type == "cuda":
            if quick:
                return cls(warmup_ms=10, target_ms=60, min_reps=10, max_reps=200, min_warmup=3,
                           rotation_budget_bytes=1 * 2**30)
            return cls(warmup_ms=50, target_ms=300, min_reps=20, max_reps=2000, min_warmup=5,
                       rotation_budget_bytes=2 * 2**30)
        # CPU: at least 10 repetitions, so that p10 and p90 are repetitions, not the extremes
        if quick:
            return cls(warmup_ms=0, target_ms=60, min_reps=10, max_reps=40, min_warmup=1,
                       rotation_budget_bytes=64 * 2**20, max_copies=4)
        return cls(warmup_ms=100, target_ms=800, min_reps=15, max_reps=100, min_warmup=2,
                   rotation_budget_bytes=256 * 2**20, max_copies=8)


def nbytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or lists / tuples / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o) for o in obj.values())
    return 0


# The host clock of CPU timings (tests replace it with a fake, noisy one).
CLOCK: Callable[[], float] = time.perf_counter


@dataclass
class _Live:
    """One row being timed inside its group: the function, its rotated inputs and the samples."""

    res: Result
    fn: Callable
    inputs: List[tuple]
    flush: bool  # zero a buffer larger than the L2 before each call (CUDA kernel rows)
    sync_before: bool  # end-to-end rows: synchronise before each call (host overhead included)
    prep: Optional[Prepared] = None
    first_ms: float = float("nan")
    est_ms: float = 1e-3
    host_ms: float = 0.0  # host time to issue one call (CUDA kernel rows: sizes the device delay)
    calls: int = 0
    times: List[float] = field(default_factory=list)
    events: list = field(default_factory=list)

    def next_args(self) -> tuple:
        """The next input set; applies the row's setting first (``Prepared.before``, untimed)."""
        if self.prep is not None and self.prep.before is not None:
            self.prep.before()
        args = self.inputs[self.calls % len(self.inputs)]
        self.calls += 1
        return args


class Bencher:
    """Times rows.  The rows of one group (the systems compared at one op and shape) are timed
    round-robin in one loop: round ``r`` runs each row once, starting at row ``r mod n``, so
    machine noise (another process, clock changes) hits every system alike and every row has the
    same number of repetitions.

    GPU: a pair of CUDA events around every call.  Kernel rows (not ``end_to_end``) zero a buffer
    larger than the L2 and then enqueue a device-side delay (``torch.cuda._sleep``, about twice
    the call's measured host issue time) before the start event, so the GPU is still busy while
    the host issues the call: the time between the events is the device's, not the launch
    overhead's.  End-to-end rows synchronise before each call instead (what a user waits for,
    host work included).  CPU: :data:`CLOCK` around every call."""

    def __init__(self, device: torch.device, quick: bool = False, timer: str = "events",
                 settings: Optional[BenchSettings] = None, clock: Optional[Callable[[], float]] = None):
        self.device = torch.device(device)
        self.quick = quick
        self.timer = timer if self.device.type == "cuda" else "perf_counter"
        self.settings = settings or BenchSettings.for_device(self.device, quick)
        self.cache_bytes = _cache_bytes(self.device)
        self.clock = clock or CLOCK
        self._flush_buf = None
        self._cycles_per_ms: Optional[float] = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    # ---- helpers
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush_cache(self):
        """Zero a buffer twice the L2 (at least 64 MiB): evicts whatever the last call cached (CUDA)."""
        if not self.cuda:
            return
        if self._flush_buf is None:
            n = max(2 * self.cache_bytes, 64 * 2**20)
            self._flush_buf = torch.empty(n // 4, dtype=torch.int32, device=self.device)
        self._flush_buf.zero_()

    def copies_for(self, set_bytes: int, share: int = 1) -> int:
        """How many input copies to rotate through: enough to exceed 2x the last-level cache,
        within the rotation budget split between ``share`` rows timed together."""
        s = self.settings
        if set_bytes <= 0:
            return 1
        want = math.ceil(2 * self.cache_bytes / set_bytes)
        afford = max(1, s.rotation_budget_bytes // max(share, 1) // set_bytes)
        return int(max(1, min(want, afford, s.max_copies)))

    def inputs_for(self, prep: Prepared, share: int = 1) -> List[tuple]:
        """The rotated input sets of a prepared row."""
        first = prep.make_inputs()
        n = self.copies_for(nbytes(first), share) if prep.rotate else 1
        return [first] + [prep.make_inputs() for _ in range(n - 1)]

    def cycles_per_ms(self) -> float:
        """GPU clock cycles per millisecond of ``torch.cuda._sleep`` (measured once)."""
        if self._cycles_per_ms is None:
            cycles = 2_000_000
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            torch.cuda._sleep(cycles)  # once untimed: the first call loads the kernel
            s.record()
            torch.cuda._sleep(cycles)
            e.record()
            e.synchronize()
            self._cycles_per_ms = cycles / max(s.elapsed_time(e), 1e-3)
        return self._cycles_per_ms

    def _delay(self, ms: float) -> None:
        torch.cuda._sleep(max(int(ms * self.cycles_per_ms()), 1000))

    def _once_ms(self, lv: _Live) -> float:
        """One call on its own (synchronised before and after): first call and warm-up."""
        args = lv.next_args()
        if self.cuda:
            if lv.flush:
                self.flush_cache()
            self.sync()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            lv.fn(*args)
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        t0 = self.clock()
        lv.fn(*args)
        return (self.clock() - t0) * 1e3

    def _warm(self, lv: _Live) -> None:
        """First call (compile / autotune) timed on its own, then warm-up; estimates the time of
        one call, and on CUDA kernel rows the host time to issue one."""
        s = self.settings
        lv.first_ms = self._once_ms(lv)
        k, spent, warm = 0, 0.0, []
        while k < s.min_warmup or spent < s.warmup_ms:
            t = self._once_ms(lv)
            warm.append(t)
            spent += t
            k += 1
            if k >= 10 * max(s.max_reps, 1):
                break
        lv.est_ms = max(sorted(warm)[len(warm) // 2] if warm else lv.first_ms, 1e-4)
        if self.cuda and not lv.sync_before:
            self.sync()
            self._delay(20.0)  # the GPU is busy: the clock below sees the host's issue time alone
            t0 = time.perf_counter()
            lv.fn(*lv.next_args())
            lv.host_ms = (time.perf_counter() - t0) * 1e3
            self.sync()

    def _device_reads(self, lv: _Live) -> int:
        """Device-to-host reads (``.item()``, ``.tolist()``, ``nonzero``, ...) in one call."""
        from bertfast.kernels.testing import count_host_reads

        args = lv.next_args()
        with count_host_reads() as n:
            lv.fn(*args)
        self.sync()
        return int(n[0])

    def _rounds(self, lives: List[_Live]) -> int:
        s = self.settings
        total = sum(lv.est_ms for lv in lives)
        want = math.ceil(s.target_ms * len(lives) / max(total, 1e-4))
        return int(min(max(want, s.min_reps), s.max_reps))

    def _time_round_robin(self, lives: List[_Live]) -> None:
        rounds, n = self._rounds(lives), len(lives)
        for r in range(rounds):
            for lv in lives[r % n:] + lives[:r % n]:
                args = lv.next_args()
                if self.cuda:
                    if lv.flush:
                        self.flush_cache()
                    if lv.sync_before:
                        self.sync()
                    else:
                        self._delay(min(2.0 * lv.host_ms + 0.02, 20.0))
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    lv.fn(*args)
                    e.record()
                    lv.events.append((s, e))
                else:
                    t0 = self.clock()
                    lv.fn(*args)
                    lv.times.append((self.clock() - t0) * 1e3)
            self.sync()  # a bounded queue; the next round's delays give the host its head start again
        for lv in lives:
            lv.times += [s.elapsed_time(e) for s, e in lv.events]
            lv.events.clear()

    def _time_do_bench(self, lv: _Live) -> Dict[str, Any]:
        import triton.testing

        s = self.settings
        q = triton.testing.do_bench(lambda: lv.fn(*lv.next_args()), warmup=int(max(s.warmup_ms, 1)),
                                    rep=int(max(s.target_ms, 1)), quantiles=[0.5, 0.1, 0.9, 0.0, 1.0])
        med, p10, p90, lo, hi = (float(v) for v in q)
        rel = (p90 - p10) / med if med > 0 else float("nan")
        return {"median_ms": med, "p10_ms": p10, "p90_ms": p90, "min_ms": lo, "max_ms": hi, "mean_ms": med,
                "std_ms": float("nan"), "n": -1, "spread_rel": rel, "noisy": not rel <= NOISE_REL,
                "times_ms": [], "interleaved": False}

    # ---- the timer
    def time(self, fn: Callable, inputs: List[tuple], *, flush: bool = True, sync_before: bool = False) -> Dict[str, Any]:
        """Time ``fn(*inputs[i % len(inputs)])`` alone: first call separately, warm-up excluded,
        then enough calls to fill ``target_ms``.  Returns :func:`summarize` plus
        ``first_call_ms``, ``timer`` and ``flush``."""
        lv = _Live(res=None, fn=fn, inputs=list(inputs), flush=flush and self.cuda, sync_before=sync_before)
        self._warm(lv)
        if self.timer == "do_bench" and self.cuda:
            out = self._time_do_bench(lv)
        else:
            self._time_round_robin([lv])
            out = summarize(lv.times)
        out.update(first_call_ms=lv.first_ms, timer=self.timer, flush=lv.flush)
        return out

    def peak_memory(self, fn: Callable, args: tuple) -> tuple[Optional[int], Optional[int]]:
        """(max_memory_allocated during one call, the part above what was allocated before it);
        ``(None, None)`` off CUDA."""
        if not self.cuda:
            return None, None
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn(*args)
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        return int(peak), int(max(peak - base, 0))

    # ---- rows
    def run_case(self, case: Case, peaks: Optional[Dict[str, Any]] = None) -> Result:
        return self.run_group([case], peaks)[0]

    def run_group(self, cases: Sequence[Case], peaks: Optional[Dict[str, Any]] = None) -> List[Result]:
        """Time ``cases`` (the rows of one group) round-robin; one Result per case, in order."""
        results, lives = [], []
        with InterpreterGuard() as guard:
            for case in cases:
                res = _result_of(case)
                results.append(res)
                why = case.unavailable or (None if case.build is not None else "no implementation")
                if why is None and case.triton:
                    why = triton_unavailable_reason(self.device)
                if why:
                    res.status, res.reason = STATUS_UNAVAILABLE, why
                    continue
                before = guard.launches
                lv = self._prepare(case, res, len(cases))
                if lv is not None and guard.launches > before:
                    res.status, res.reason = STATUS_UNAVAILABLE, (
                        f"refused: {guard.launches - before} Triton kernel launches ran in the interpreter; "
                        + INTERPRETER_REASON)
                    lv = None
                if lv is not None:
                    lives.append(lv)
            for lv in lives:
                lv.res.info["interleaved_with"] = [o.res.impl for o in lives if o is not lv]
            try:
                if self.timer == "do_bench" and self.cuda:
                    for lv in lives:
                        lv.res.timing = self._time_do_bench(lv)
                else:
                    self._time_round_robin(lives)
            except Exception as e:  # one broken row spoils the loop: report it on every row of the group
                for lv in lives:
                    _fail(lv.res, e)
                lives = []
            for lv in lives:
                self._finish(lv, peaks)
            del lives
        return results

    def _prepare(self, case: Case, res: Result, share: int) -> Optional[_Live]:
        try:
            prep = case.build()
            res.info.update(prep.info or {})
            lv = _Live(res=res, fn=prep.fn, inputs=self.inputs_for(prep, share), prep=prep,
                       flush=self.cuda and not case.end_to_end, sync_before=case.end_to_end)
            res.rotated_copies = len(lv.inputs)
            self._warm(lv)
            res.info["device_reads"] = self._device_reads(lv)
            return lv
        except Unavailable as e:
            res.status, res.reason = STATUS_UNAVAILABLE, str(e)
        except Exception as e:
            _fail(res, e)
        return None

    def _finish(self, lv: _Live, peaks: Optional[Dict[str, Any]]) -> None:
        res, prep = lv.res, lv.prep
        try:
            if prep.check is not None:
                args = lv.next_args()
                out = prep.fn(*args)
                try:
                    res.check = prep.check(out, args)
                except Exception as e:  # a broken check is reported, not fatal
                    res.check = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                del out
            res.peak_mem_bytes, res.peak_extra_bytes = self.peak_memory(prep.fn, lv.next_args())
        except Exception as e:
            _fail(res, e)
            return
        if res.timing is None:
            res.timing = summarize(lv.times)
        res.first_call_ms = lv.first_ms
        res.info.update(timer=self.timer, cache_flush=lv.flush)
        if self.cuda and not lv.sync_before:
            res.info["host_issue_ms"] = lv.host_ms
        med_s = res.timing["median_ms"] / 1e3
        if med_s > 0:
            if res.flops:
                res.tflops = res.flops / med_s / 1e12
            if res.bytes:
                res.gbps = res.bytes / med_s / 1e9
        if res.timing.get("noisy"):
            res.flags.append(f"noisy: p10-p90 is {100 * res.timing['spread_rel']:.0f}% of the median")
        reads = res.info.get("device_reads") or 0
        if reads and not lv.sync_before:
            res.flags.append(f"{reads} device reads inside the timed call (each one waits for the GPU)")
        working_set = nbytes(lv.inputs[0]) * len(lv.inputs)
        res.fraction_of_peak, why = self._peak_fraction(res, peaks, working_set)
        if why:
            res.info["peak_note"] = why
        if res.fraction_of_peak is not None and res.fraction_of_peak > 1.0:
            res.flags.append(f"above the calibrated peak ({100 * res.fraction_of_peak:.0f}%): the calibration ran "
                             "slower than this row (load during calibration, or this row's data stayed in cache)")

    def _peak_fraction(self, res: Result, peaks: Optional[Dict[str, Any]], working_set: int):
        """(fraction of the calibrated peak, why none): only against a peak calibrated on this
        device in this run, in the row's dtype (matrix rate), for data that cannot sit in the
        last-level cache (bandwidth)."""
        if not peaks or peaks.get("device") != str(self.device):
            return None, "no peak calibrated on this device in this run"
        if res.metric == "gbps":
            if not (res.gbps and peaks.get("gbps")):
                return None, None
            if working_set < 2 * self.cache_bytes:
                return None, (f"inputs fit in the last-level cache ({working_set / 2**20:.1f} MiB rotated vs "
                              f"{self.cache_bytes / 2**20:.0f} MiB): the DRAM copy peak does not apply")
            return res.gbps / peaks["gbps"], None
        if not (res.tflops and peaks.get("tflops")):
            return None, None
        if peaks.get("matmul_dtype") and peaks["matmul_dtype"] != res.dtype:
            return None, f"the matmul peak was calibrated in {peaks['matmul_dtype']}, this row is {res.dtype}"
        return res.tflops / peaks["tflops"], None


def _result_of(case: Case) -> Result:
    return Result(suite=case.suite, op=case.op, impl=case.impl, shape=dict(case.shape), dtype=case.dtype,
                  group=case.group, baseline=case.baseline, status=STATUS_OK, metric=case.metric,
                  flops=float(case.flops), bytes=float(case.bytes), notes=case.notes)


def _fail(res: Result, e: BaseException) -> None:
    res.status = STATUS_ERROR
    msg = f"{type(e).__name__}: {e}".strip()
    res.reason = msg.splitlines()[0][:300] if msg else type(e).__name__
    res.info["traceback"] = traceback.format_exc(limit=6)[-2000:]
    res.timing = None


def compute_speedups(results: List[Result]) -> None:
    """Fill ``speedup_vs_baseline`` (baseline median / this median), its range and whether it is
    outside the combined spread (:func:`compare`) within each group."""
    base: Dict[str, Result] = {}
    for r in results:
        if r.status == STATUS_OK and r.impl == r.baseline and r.median_ms:
            base[r.group] = r
    for r in results:
        b = base.get(r.group)
        if b is None or r.status != STATUS_OK or not r.median_ms:
            continue
        c = compare(b.timing, r.timing)
        r.speedup_vs_baseline, r.speedup_low, r.speedup_high = c["speedup"], c["low"], c["high"]
        r.speedup_significant = c["significant"] and r is not b


# --------------------------------------------------------------------------- calibration
def calibrate(device: torch.device, dtype: torch.dtype, quick: bool = False,
              bencher: Optional[Bencher] = None, tiny: bool = False) -> Dict[str, Any]:
    """Measure achievable bandwidth (device-to-device copy) and matrix rate (square matmul in
    ``dtype``) on ``device`` now, in this process: the peaks every fraction is relative to (from
    the fastest of the timed calls; the median-based rates are kept too).  ``tiny``: small sizes
    for plumbing runs (the evidence dry run), whose peaks mean nothing."""
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
            mm_dtype = torch.float32  # TF32 or IEEE per torch's switch (bertfast.kernels._common.tf32_allowed)
    else:
        copy_bytes = 64 * 2**20  # larger than a server CPU's last-level cache
        n = 1024
        mm_dtype = dtype if dtype != torch.float16 else torch.float32
    if tiny:
        copy_bytes, n = 4 * 2**20, 128
    out: Dict[str, Any] = {"device": str(device), "tiny": tiny}
    try:
        src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        t = b.time(lambda s, d: d.copy_(s), [(src, dst)], flush=False)
        moved = 2 * copy_bytes  # read + write
        out["copy"] = {"bytes_moved": moved, "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                       "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"], "reps": t["n"], "noisy": t["noisy"],
                       "gbps": moved / (t["min_ms"] / 1e3) / 1e9,
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
                         "median_ms": t["median_ms"], "min_ms": t["min_ms"], "p10_ms": t["p10_ms"],
                         "p90_ms": t["p90_ms"], "reps": t["n"], "noisy": t["noisy"],
                         "tflops": fl / (t["min_ms"] / 1e3) / 1e12,
                         "tflops_median": fl / (t["median_ms"] / 1e3) / 1e12,
                         "tf32": bool(cuda and tf32_allowed(mm_dtype))}
        del a, c
    except Exception as e:  # pragma: no cover
        out["matmul"] = {"error": f"{type(e).__name__}: {e}"}
    out["peak_gbps"] = out["copy"].get("gbps")
    out["peak_tflops"] = out["matmul"].get("tflops")
    return out


def peaks_of(calibration: Dict[str, Any]) -> Dict[str, Any]:
    """The peaks rows are compared with, and where and in which dtype they were measured."""
    return {"gbps": calibration.get("peak_gbps") or 0.0, "tflops": calibration.get("peak_tflops") or 0.0,
            "device": calibration.get("device"), "matmul_dtype": (calibration.get("matmul") or {}).get("dtype")}


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


def groups_of(cases: Sequence[Case]) -> List[List[int]]:
    """Indices of ``cases`` by group (the systems compared at one op and shape), in first-seen
    order."""
    order: Dict[str, List[int]] = {}
    for i, c in enumerate(cases):
        order.setdefault(c.group, []).append(i)
    return list(order.values())


def run_cases(cases: List[Case], bencher: Bencher, calibration: Optional[Dict[str, Any]] = None,
              progress: Optional[Progress] = None) -> List[Result]:
    """Run every case, each group's rows round-robin (:meth:`Bencher.run_group`); results in the
    order of ``cases``, with speedups against each group's baseline."""
    peaks = peaks_of(calibration or {})
    results: List[Optional[Result]] = [None] * len(cases)
    for idx in groups_of(cases):
        group = [cases[i] for i in idx]
        if progress:
            c = group[0]
            progress.update(f"{c.suite} {c.op} {c.shape_label} ({', '.join(g.impl for g in group)})")
        for i, r in zip(idx, bencher.run_group(group, peaks)):
            results[i] = r
        if progress:
            progress.update(f"{group[0].suite} {group[0].op} {group[0].shape_label}", advance=len(group))
        if bencher.cuda:
            torch.cuda.empty_cache()
    compute_speedups(results)
    return results
