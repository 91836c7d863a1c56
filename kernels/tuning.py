"""Self-tuning: pick the fastest kernel configuration of a shape class on the GPU at hand.

The launchers choose block sizes in one place each (``_gemm.plan_gemm`` through
``gemm_choice``, ``attention.attention_config`` through ``attention_choice``); this module is
what those places ask.  For each op and *shape class* (below) there is a short candidate list,
the default table's entry first:

* GEMM (``linear``, ``qkv_projection``): every entry of the block table; for a plain GEMM (no
  bias, activation, pre-activation store or head split: BERT's output projections, whose bias
  goes into the LayerNorm kernel, so no fusion is lost) also cuBLAS via ``torch.mm`` and, for
  fp16 / bf16, split-K at small M and the persistent TMA kernel's tiles on sm_90
  (``_gemm.gemm_candidates``).  The default (``_gemm.pick_config``) of a plain fp16 / bf16 GEMM
  is itself split-K at small M and the TMA kernel at large M on sm_90; a stored choice wins.
* attention forward (padded and varlen), fp16 / bf16: the table's tile plus 64-row tiles for
  sequences of at most 128 tokens (``attention.attention_candidates``).

Modes (env ``BERTFAST_AUTOTUNE``, or ``set_mode``):

* ``0`` / unset -- **the default**: use a stored choice when the cache has one for this GPU,
  else the default table.  Nothing is timed.
* ``1``: as above, and on first use of a shape class with no stored choice, time the candidates
  on the launch's device (synthetic inputs of the launch's shape; CUDA events, warm-up, median
  of several samples), drop every candidate that fails to compile / launch or whose output does
  not match the fp32 reference within the dtype's tolerance, keep the fastest (the default
  unless another is more than ``MARGIN`` faster) and store it.
* ``off``: always the default table (for comparisons).

The environment variable is read when a shape class is first planned in a process; ``set_mode``
(or the ``autotune()`` context) takes effect at once (launch plans are made again).

Why stored-only by default: no choice has been validated on a GPU by the project yet, and timing
on first use adds seconds of latency (compiles plus timing of several candidates) to the first
forward of every new shape class; ``bertfast tune --model M`` fills the cache ahead of time,
explicitly.  A stored choice was measured and checked on that very GPU / software stack.

Nothing is ever timed while a CUDA graph is being captured, while ``torch.compile`` / jit
traces, under the Triton interpreter, while launches are recorded (``bertfast.kernels.testing``), or on
a CPU device: then the stored choice or the default is used.

Cache: one JSON file, ``$BERTFAST_TUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/bertfast/tuning.json``
(``~/.cache/bertfast/tuning.json``).  Entries are keyed by a device key (GPU name, compute
capability, triton and torch versions) and then by the shape-class key.  An unreadable or
corrupt file, or an entry naming a configuration that is no longer a candidate, gives a warning
(once) and the defaults, never an error.  Writes re-read the file, merge, and replace it
atomically (temporary file + ``os.replace``); a failed write warns once and keeps the choice in
memory.

Shape classes: GEMM by dtype / precision, M rounded up to a power of two (at least 16), N, K
and the epilogue flags; attention by dtype, head dim, sequence length rounded up to a power of
two (at least 16), padded / varlen, mask kind and causal.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bertfast.kernels import _common

ENV_MODE = "BERTFAST_AUTOTUNE"
ENV_CACHE = "BERTFAST_TUNE_CACHE"
SCHEMA = "bertfast.tune/1"
MODES = ("off", "cached", "tune")
_ENV_MODES = {"": "cached", "0": "cached", "false": "cached", "no": "cached", "cached": "cached",
              "1": "tune", "true": "tune", "yes": "tune", "on": "tune", "tune": "tune",
              "off": "off", "never": "off"}
# a candidate replaces the default only when it is faster by more than this fraction (noise)
MARGIN = 0.03


# ----------------------------------------------------------------------------- candidates and problems
@dataclass(frozen=True)
class Candidate:
    """One configuration of one op: ``name`` is what the cache stores, ``value`` what the
    launcher uses (a ``GemmConfig``, an attention ``Config``)."""

    name: str
    value: Any


@dataclass
class Problem:
    """One shape class at its first use: its key, its candidates (the default first) and how to
    run them.  ``bench()`` makes the inputs (once, when timing is needed) and returns
    ``(run, check)``: ``run(value)`` launches the op with that configuration and returns its
    output; ``check(output)`` says whether the output matches the reference."""

    op: str
    key: str
    candidates: tuple
    bench: Callable[[], tuple]
    shape: str = ""  # the problem timed, for reports

    @property
    def default(self) -> Candidate:
        return self.candidates[0]


def _attention_module():
    # ``bertfast.kernels.attention`` the package attribute is the function; the module is this one
    import importlib

    return importlib.import_module("bertfast.kernels.attention")


def _pow2_bucket(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


# ----------------------------------------------------------------------------- timing
def cuda_timer(fn: Callable[[], Any], *, warmup: int = 3, samples: int = 7, target_ms: float = 1.0,
               max_iters: int = 200) -> float:
    """Median time of one ``fn()`` call in milliseconds on the current CUDA stream: ``warmup``
    calls (compilation, caches), then ``samples`` samples, each timed with CUDA events over
    enough calls to last about ``target_ms`` (one call's time is estimated first)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    iters = max(1, min(max_iters, int(target_ms / once)))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    times.sort()
    return times[len(times) // 2]


def _default_timer(name: str, fn: Callable[[], Any]) -> float:
    del name
    return cuda_timer(fn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_possible(device: torch.device) -> bool:
    """Whether candidates may be timed on ``device`` now: a real CUDA device, not under the
    interpreter or launch recording, not while torch.compile / jit traces, not while a CUDA
    graph is being captured."""
    if device.type != "cuda" or _common.INTERPRET or _common.recording_launches():
        return False
    return _common.host_read_possible(device)


# ----------------------------------------------------------------------------- cache
def cache_path() -> Path:
    """Where choices are stored: ``$BERTFAST_TUNE_CACHE``, else the per-user cache directory."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bertfast" / "tuning.json"


_DEVICE_KEYS: dict = {}


def device_key(device: torch.device) -> Optional[str]:
    """"<GPU name>|sm_<major><minor>|triton <v>|torch <v>" for a CUDA device, None otherwise: a
    choice is only reused on the same GPU model with the same compiler and torch."""
    if device.type != "cuda" or _common.INTERPRET:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = _DEVICE_KEYS.get(index)
    if key is None:
        import triton

        major, minor = torch.cuda.get_device_capability(index)
        key = f"{torch.cuda.get_device_name(index)}|sm_{major}{minor}|triton {triton.__version__}|torch {torch.__version__}"
        _DEVICE_KEYS[index] = key
    return key


def _read_cache(path: Path) -> dict:
    """The ``devices`` table of a cache file ({} when the file does not exist); raises
    ``ValueError`` naming the problem when it cannot be read or is not a cache file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("devices"), dict):
        raise ValueError(f"{path} is not a bertfast tuning cache (expected schema {SCHEMA!r})")
    devices = doc["devices"]
    for dk, entries in devices.items():
        if not isinstance(entries, dict) or not all(isinstance(e, dict) and isinstance(e.get("choice"), str)
                                                    for e in entries.values()):
            raise ValueError(f"{path}: malformed entries for device {dk!r}")
    return devices


def _write_cache(path: Path, devices: dict) -> None:
    """Replace ``path`` atomically with a cache holding ``devices``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "devices": devices}
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json.tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- the chooser
@dataclass
class Decision:
    """One choice made in this process, for reports (``bertfast tune``)."""

    op: str
    key: str
    shape: str
    choice: str
    default: str
    source: str  # "tuned", "cache" or "default"
    times_ms: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)


class Tuner:
    """Chooses among a problem's candidates: stored choice, measurement, or the default.

    Everything environment-dependent is injectable so that the logic runs on CPU in tests:
    ``timer(name, fn) -> ms``, ``device_key(device) -> str | None``, ``can_time(device) -> bool``,
    ``path`` (cache file; default: ``cache_path()`` at each load), ``mode`` (default: the env)."""

    def __init__(self, *, timer: Callable[[str, Callable[[], Any]], float] = _default_timer,
                 device_key: Callable[[torch.device], Optional[str]] = device_key,
                 can_time: Callable[[torch.device], bool] = timing_possible,
                 path: Optional[os.PathLike] = None, mode: Optional[str] = None):
        self.timer = timer
        self.device_key = device_key
        self.can_time = can_time
        self.path = Path(path) if path is not None else None
        self._mode = _check_mode(mode) if mode is not None else None
        self.retune = False  # re-time even when a choice is stored (``bertfast tune --force``)
        self.decisions: dict = {}  # (device key, class key) -> Decision made in this process
        self._memo: dict = {}  # (device key, class key) -> candidate name
        self._tuned: set = set()  # (device key, class key) timed in this process
        self._disk: Optional[dict] = None  # devices table as loaded (None: not loaded yet)
        self._disk_path: Optional[Path] = None
        self._warned: set = set()
        self._lock = threading.RLock()

    # -- configuration
    @property
    def mode(self) -> str:
        if self._mode is not None:
            return self._mode
        raw = os.environ.get(ENV_MODE, "").strip().lower()
        if raw not in _ENV_MODES:
            self._warn("mode", f"bertfast: {ENV_MODE}={raw!r} is not one of 0, 1, off; using 0 (stored choices only)")
            return "cached"
        return _ENV_MODES[raw]

    def set_mode(self, mode: Optional[str]) -> None:
        """"off", "cached", "tune", or None (follow ``BERTFAST_AUTOTUNE`` again)."""
        self._mode = _check_mode(mode) if mode is not None else None
        _bump_epoch()

    def cache_file(self) -> Path:
        return self.path if self.path is not None else cache_path()

    def forget(self) -> None:
        """Drop what this process loaded or decided (the file is untouched)."""
        with self._lock:
            self._memo.clear()
            self._tuned.clear()
            self._disk = None
            self.decisions.clear()
        _bump_epoch()

    # -- choosing
    def choose(self, problem: Problem, device: torch.device) -> Candidate:
        """The candidate to launch for ``problem`` on ``device`` (see the module docstring)."""
        return self.decide(problem, device)[0]

    def decide(self, problem: Problem, device: torch.device) -> tuple:
        """(candidate, final): ``final`` is False when the default was returned only because
        timing is impossible right now (capture, tracing), so the caller should ask again later."""
        cands = problem.candidates
        if len(cands) == 1:
            return cands[0], True
        mode = self.mode
        dk = self.device_key(device) if mode != "off" else None
        if dk is None:
            return problem.default, True
        by_name = {c.name: c for c in cands}
        ident = (dk, problem.key)
        with self._lock:
            name = self._memo.get(ident)
            if name in by_name and (not self.retune or ident in self._tuned):
                return by_name[name], True
            if not self.retune:
                entry = self._stored(dk, problem.key)
                if entry is not None:
                    if entry["choice"] in by_name:
                        self._memo[ident] = entry["choice"]
                        self._note(problem, dk, entry["choice"], "cache", entry)
                        return by_name[entry["choice"]], True
                    self._warn(("stale", problem.key),
                               f"bertfast: the tuning cache {self.cache_file()} names {entry['choice']!r} for "
                               f"{problem.key}, which is no longer a candidate; using the default")
            if mode != "tune":
                return problem.default, True
            if not self.can_time(device):
                return problem.default, False
            entry = self._measure(problem, device)
            self._memo[ident] = entry["choice"]
            self._tuned.add(ident)
            self._note(problem, dk, entry["choice"], "tuned", entry)
            self._store(dk, problem.key, entry)
        _bump_epoch()
        return by_name[entry["choice"]], True

    def _measure(self, problem: Problem, device: torch.device) -> dict:
        """Time every candidate that runs and matches the reference; the entry to store."""
        # the timer's CUDA events go to the current device's stream: make it the launch's device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return self._measure_here(problem, device)

    def _measure_here(self, problem: Problem, device: torch.device) -> dict:
        run, check = problem.bench()
        times, dropped = {}, {}
        for c in problem.candidates:
            try:
                out = run(c.value)
                _sync(device)
                ok = check(out)
            except Exception as e:  # does not compile, out of resources, launch error: never chosen
                dropped[c.name] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
                continue
            if not ok:
                dropped[c.name] = "output does not match the reference"
                continue
            try:
                ms = float(self.timer(c.name, lambda c=c: run(c.value)))
            except Exception as e:
                dropped[c.name] = f"failed while timing: {type(e).__name__}: {str(e)[:160]}"
                continue
            if not math.isfinite(ms) or ms <= 0:
                dropped[c.name] = f"timer returned {ms!r}"
                continue
            times[c.name] = ms
        default = problem.default.name
        if not times:
            choice = default  # nothing ran: the default would raise by itself at launch
        else:
            choice = min(times, key=times.get)
            if default in times and times[default] <= times[choice] * (1.0 + MARGIN):
                choice = default
        return {"choice": choice, "default": default, "op": problem.op, "shape": problem.shape,
                "times_ms": {k: round(v, 5) for k, v in times.items()}, "dropped": dropped,
                "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def _note(self, problem: Problem, dk: str, choice: str, source: str, entry: dict) -> None:
        self.decisions[(dk, problem.key)] = Decision(
            problem.op, problem.key, problem.shape or entry.get("shape", ""), choice, problem.default.name, source,
            dict(entry.get("times_ms", {})), dict(entry.get("dropped", {})))

    # -- the file
    def _stored(self, dk: str, key: str) -> Optional[dict]:
        path = self.cache_file()
        if self._disk is None or self._disk_path != path:
            try:
                self._disk = _read_cache(path)
            except ValueError as e:
                self._warn(("read", str(path)), f"bertfast: ignoring the tuning cache: {e}; using default "
                                                f"configurations")
                self._disk = {}
            self._disk_path = path
        return self._disk.get(dk, {}).get(key)

    def _store(self, dk: str, key: str, entry: dict) -> None:
        path = self.cache_file()
        try:
            try:
                devices = _read_cache(path)  # merge with what other processes stored meanwhile
            except ValueError:
                devices = {}  # unreadable: replaced by a valid file (the warning came at load)
            devices.setdefault(dk, {})[key] = entry
            _write_cache(path, devices)
            self._disk, self._disk_path = devices, path
        except OSError as e:
            self._warn(("write", str(path)), f"bertfast: cannot write the tuning cache {path} ({e}); "
                                             f"choices are kept for this process only")

    def _warn(self, tag, msg: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"tuning mode must be one of {MODES}, got {mode!r}")
    return mode


def _bump_epoch() -> None:
    """Invalidate every launcher's cached launch plans (they hold the configurations chosen)
    and the remembered choices."""
    _common.TUNE_EPOCH[0] += 1
    _CHOICES.clear()


# the process-wide tuner the launchers ask
TUNER = Tuner()


def set_mode(mode: Optional[str]) -> None:
    """Process-wide: "off", "cached" (the default), "tune", or None (follow ``BERTFAST_AUTOTUNE``)."""
    TUNER.set_mode(mode)


@contextlib.contextmanager
def autotune(mode: str = "tune", *, force: bool = False):
    """Within the block, the process-wide tuner runs in ``mode`` (``force``: re-time stored
    classes too); restored afterwards."""
    old_mode, old_retune = TUNER._mode, TUNER.retune
    TUNER.set_mode(mode)
    TUNER.retune = force
    try:
        yield TUNER
    finally:
        TUNER._mode, TUNER.retune = old_mode, old_retune
        _bump_epoch()


# ----------------------------------------------------------------------------- GEMM
_CHOICES: dict = {}  # launch arguments -> (epoch, config): final decisions, per process


def _remember(args: tuple, decide: Callable[[], tuple]):
    """``decide()``'s (value, final) for ``args``, kept while the tuning epoch is unchanged (the
    slow launch paths plan every call: this keeps the question a dict lookup)."""
    hit = _CHOICES.get(args)
    epoch = _common.TUNE_EPOCH[0]
    if hit is not None and hit[0] == epoch:
        return hit[1]
    value, final = decide()
    if final:
        if len(_CHOICES) >= 4096:
            _CHOICES.clear()
        _CHOICES[args] = (epoch, value)
    return value


def gemm_choice(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, capability: tuple[int, int],
                allow_tf32: bool, *, activation: int, has_bias: bool, has_pre: bool,
                head_split: Optional[tuple[int, int, int]]):
    """The ``GemmConfig`` for one GEMM launch (``_gemm.plan_gemm``'s one question)."""
    from bertfast.kernels import _gemm

    if device.type != "cuda" or _common.INTERPRET:  # nothing to tune: the table's rule
        return _gemm.pick_config(M, N, K, dtype, capability, allow_tf32, store_pre=has_pre,
                                 plain=_gemm.is_plain(activation, has_bias, has_pre, head_split))
    args = ("gemm", M, N, K, dtype, device, capability, allow_tf32, activation, has_bias, has_pre, head_split)

    def decide():
        problem = gemm_problem(M, N, K, dtype, device, capability, allow_tf32, activation=activation,
                               has_bias=has_bias, has_pre=has_pre, head_split=head_split)
        cand, final = TUNER.decide(problem, device)
        return cand.value, final

    return _remember(args, decide)


def gemm_problem(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, capability: tuple[int, int],
                 allow_tf32: bool, *, activation: int, has_bias: bool, has_pre: bool,
                 head_split: Optional[tuple[int, int, int]]) -> Problem:
    """The shape class of one GEMM launch, its candidates and its bench."""
    from bertfast.kernels import _gemm

    plain = _gemm.is_plain(activation, has_bias, has_pre, head_split)
    cands = _gemm.gemm_candidates(M, N, K, dtype, capability, allow_tf32, plain=plain, store_pre=has_pre)
    prec = _gemm.precision_of(dtype, allow_tf32)
    act = {v: k for k, v in _gemm.ACTIVATIONS.items()}[activation] or "none"
    flags = f"bias={int(has_bias)} act={act} pre={int(has_pre)}"
    if head_split is not None:
        flags += f" qkv D={head_split[1]}"
    key = f"gemm {_common.dtype_name(dtype)} {prec} M<={_pow2_bucket(M)} N={N} K={K} {flags}"
    shape = f"M={M} N={N} K={K}" + (f" S={head_split[0]}" if head_split else "")
    return Problem("gemm", key, tuple(Candidate(c.name, c) for c in cands),
                   lambda: _gemm_bench(M, N, K, dtype, device, activation, has_bias, has_pre, head_split,
                                       prec == "tf32"), shape)


def _gemm_bench(M, N, K, dtype, device, activation, has_bias, has_pre, head_split, tf32=False):
    """Synthetic operands of the launch's shape; (run, check) for ``Tuner._measure``."""
    import torch.nn.functional as F

    from bertfast.kernels import _gemm
    from bertfast.kernels.testing import tolerance

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((M, K), generator=g, device=device, dtype=torch.float32).to(dtype)
    w = (torch.randn((N, K), generator=g, device=device, dtype=torch.float32) / math.sqrt(K)).to(dtype)
    b = torch.randn((N,), generator=g, device=device, dtype=torch.float32).to(dtype) if has_bias else None
    z = x.float() @ w.float().t()
    if b is not None:
        z = z + b.float()
    ref = z
    if activation != _gemm.ACT_NONE:
        ref = F.gelu(z, approximate="tanh" if activation == _gemm.ACT_GELU_TANH else "none")
    if head_split is not None:
        seq, head_dim, hidden = head_split
        shape = (3, M // seq, hidden // head_dim, seq, head_dim)
        ref = ref.view(M // seq, seq, 3, hidden // head_dim, head_dim).permute(2, 0, 3, 1, 4)
    else:
        shape = (M, N)
    ref = ref.to(dtype)
    out = torch.empty(shape, dtype=dtype, device=device)
    pre = torch.empty(shape, dtype=dtype, device=device) if has_pre else None
    # TF32 rounds fp32 operands to fp16's 10-bit mantissa: fp16's tolerance (the fp32 one would
    # drop every TF32 candidate, the default included, as "does not match")
    tol = tolerance(torch.float16 if tf32 else dtype, 4.0 if K > 512 else 1.0)

    def run(cfg):
        plan = _gemm.plan_gemm(M, N, K, dtype, device, x.stride(0), w.stride(0), activation=activation,
                               has_bias=has_bias, has_pre=has_pre, head_split=head_split, config=cfg)
        return _gemm.run_gemm(plan, x, w, b, out, pre)

    def check(y):
        ok = torch.allclose(y.float(), ref.float(), **tol)
        out.fill_(float("nan"))  # the next candidate must write every element itself
        return ok

    out.fill_(float("nan"))
    return run, check


# ----------------------------------------------------------------------------- attention
def attention_choice(head_dim: int, dtype: torch.dtype, seqlen: int, capability: tuple[int, int],
                     additive_mask: bool, ctx):
    """The forward ``Config`` for one attention launch (``attention.attention_config``'s
    question); ``ctx``: an ``attention.TuneContext``."""
    if ctx.device.type != "cuda" or _common.INTERPRET:
        A = _attention_module()

        return A.attention_candidates(head_dim, dtype, seqlen, capability, additive_mask=additive_mask)[0]
    args = ("attention", head_dim, dtype, seqlen, capability, additive_mask, ctx)

    def decide():
        problem = attention_problem(head_dim, dtype, seqlen, capability, additive_mask, ctx)
        cand, final = TUNER.decide(problem, ctx.device)
        return cand.value, final

    return _remember(args, decide)


def attention_problem(head_dim: int, dtype: torch.dtype, seqlen: int, capability: tuple[int, int],
                      additive_mask: bool, ctx) -> Problem:
    """The shape class of one attention forward launch, its candidates and its bench."""
    A = _attention_module()

    cands = A.attention_candidates(head_dim, dtype, seqlen, capability, additive_mask=additive_mask)
    layout = "varlen" if ctx.varlen else "padded"
    key = (f"attention {_common.dtype_name(dtype)} D={head_dim} S<={_pow2_bucket(seqlen)} {layout} "
           f"mask={A._MASK_NAMES[ctx.mask_kind]} causal={int(ctx.causal)}")
    shape = f"B={ctx.batch} H={ctx.heads} S={seqlen} D={head_dim}"
    return Problem("attention", key, tuple(Candidate(A.config_name(c), c) for c in cands),
                   lambda: _attention_bench(head_dim, dtype, seqlen, capability, additive_mask, ctx), shape)


def _attention_bench(D, dtype, S, capability, additive_mask, ctx):
    """Synthetic q, k, v (and a mask of the launch's kind) of the launch's shape; (run, check)."""
    A = _attention_module()
    from bertfast.kernels.testing import tolerance

    dev, B, H = ctx.device, ctx.batch, ctx.heads
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn((3, B, H, S, D), generator=g, device=dev, dtype=torch.float32).to(dtype)
    q, k, v = qkv[0], qkv[1], qkv[2]
    base = A._table_config(D, dtype, capability, additive_mask)
    scale = 1.0 / math.sqrt(D)
    ieee = False  # fp16 / bf16 only (fp32 has a single candidate)
    if ctx.varlen:
        # B sequences of S tokens, packed (T, H, D)
        qp, kp, vp = (t.transpose(1, 2).reshape(B * S, H, D) for t in (q, k, v))
        cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=dev)
        ref = A.attention_reference(q, k, v, causal=ctx.causal, scale=scale).reshape(B * S, H, D)

        def plan_for(cfg):
            return A._Plan(True, B, H, S, D, A.MASK_NONE, None, (0, 0, 0, 0), None, cu, B * S, ctx.causal, scale,
                           ieee, {**base, "fwd": cfg})

        args = (qp, kp, vp)
    else:
        if ctx.mask_kind == A.MASK_KEYS:
            raw = (torch.rand((B, S), generator=g, device=dev) > 0.2).to(torch.int64)
            raw[:, 0] = 1
            pm = A.prepare_attention_mask(raw, B, H, S, analyze=False)
        elif ctx.mask_kind == A.MASK_ADD:
            raw = torch.zeros((B, 1, 1, S), device=dev).masked_fill(
                torch.rand((B, 1, 1, S), generator=g, device=dev) > 0.8, float("-inf"))
            raw[..., 0] = 0.0
            pm = A.prepare_attention_mask(raw, B, H, S)
        else:
            pm = A.prepare_attention_mask(None, B, H, S)
        ref = A.attention_reference(q, k, v, pm, causal=ctx.causal, scale=scale)
        kind, mask_t, mstrides, kvlen = A._mask_args(pm, B, H, S)

        def plan_for(cfg):
            return A._Plan(False, B, H, S, D, kind, mask_t, mstrides, kvlen, None, 0, ctx.causal, scale, ieee,
                           {**base, "fwd": cfg})

        args = (q, k, v)
    tol = tolerance(dtype)

    def run(cfg):
        return A._forward(*args, plan_for(cfg), None)[0]

    def check(o):
        return bool(torch.allclose(o.float(), ref.float(), **tol))

    return run, check


# ----------------------------------------------------------------------------- compile rung
def compile_specs(arch: int, full: bool = False) -> list:
    """KernelSpecs of the tuning candidates that are not in the ops' own ``compile_specs`` (which
    list the defaults, split-K and the TMA kernel's default tile included): the persistent TMA
    GEMM's other tiles and the short-sequence attention forward tiles.  ``full``: both dtypes of the GEMMs and every mask kind x causal x
    head dim x dtype of every attention candidate (what the tuner may launch); otherwise each
    candidate once (fp16; attention at its head dims without mask, not causal), which is what the
    test suite compiles."""
    from dataclasses import replace as dc_replace

    from bertfast.kernels import _gemm
    A = _attention_module()

    specs = _gemm.tma_specs("linear", arch, tuple(t for t in _gemm.TMA_TILES if t != _gemm.TMA_DEFAULT))
    if not full:  # GEMM candidates once: fp16 (bf16 differs only in the element type)
        specs = [s for s in specs if s.label.startswith("fp16")]
    cap = (arch // 10, arch % 10)
    base = {(s.constexprs["HEAD_DIM"], s.label.split()[2], s.constexprs["MASK_KIND"], s.constexprs["CAUSAL"]): s
            for s in A.compile_specs(arch) if s.name == "_attn_fwd" and s.label.split()[2] in ("fp16", "bf16")}
    seen = set()
    for (D, dt, kind, causal), spec in sorted(base.items(), key=lambda kv: str(kv[0])):
        if not full and (dt != "fp16" or kind != A.MASK_LENS or causal):
            continue
        dtype = torch.float16 if dt == "fp16" else torch.bfloat16
        for c in A.attention_candidates(D, dtype, A.SHORT_SEQ, cap, additive_mask=kind == A.MASK_ADD)[1:]:
            ident = (D, dt, kind, causal, c)
            if ident in seen:
                continue
            seen.add(ident)
            specs.append(dc_replace(
                spec, constexprs={**spec.constexprs, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                num_warps=c.num_warps, num_stages=c.num_stages,
                label=spec.label.replace("fwd ", f"fwd short {c.block_m}x{c.block_n} ", 1)))
    return specs
