"""The CPU linears: which GEMM implementation runs each linear, measured on the CPU at hand.

The PyTorch path calls :func:`linear` for every linear of a layer in inference (no autograd
recording, not while ``torch.compile`` traces, CPU tensors, float32 / bfloat16).  For each *shape
class* -- the GEMM's N and K (so fused QKV, FFN1, the attention output projection and FFN2 are
distinct), its epilogue (an activation such as GELU, a residual add, or none), the dtype, and
the token count M rounded up to a power of two (at least 16) -- it runs one of the
implementations this torch build offers (:data:`IMPLS`, the first is the default):

* ``aten``: ``F.linear`` (fp32: MKL's sgemm; bf16: oneDNN through aten), epilogue after it;
* ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` on the live weight (plain layout; oneDNN
  reorders it inside the call), epilogue after it;
* ``onednn-fused``: the same with the epilogue as a oneDNN post-op (GELU, or the residual add
  through ``_linear_pointwise.binary``); only for classes with such an epilogue;
* ``onednn-packed``: the weight reordered to oneDNN's blocked layout for this M
  (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing emits), then the call
  with the post-op where the class has one;
* ``mkl-packed``: ``torch.ops.mkl._mkl_reorder_linear_weight`` + ``_mkl_linear`` (fp32, builds
  with MKL only), epilogue after it.

Prepacked weights are made **per call**, never kept: a weight can change without anything torch
can see (a numpy view, ``w.numpy()[...] = ...``, writes the storage and leaves the version
counter alone), and every complete guard -- comparing the weight with a copy, checksumming it --
reads the whole weight, which measured as slow as reordering it (all-MiniLM-L6-v2's shapes, one
thread, AMD EPYC Zen 5: reorder 0.29-0.64 ms, ``torch.equal`` against a copy 0.12-0.69 ms, the
M=16 GEMM itself 0.05-0.21 ms).  So the packing cost is part of what the tuner times, and a
packed implementation is chosen only where it pays for itself at that token count.  Nothing
here is cached by tensor identity: every call reads the parameter as it is now.

The choice is the GPU tuner's (``bertfast.kernels.tuning``): the same modes (``BERTFAST_AUTOTUNE``,
``tuning.set_mode`` / ``tuning.autotune``), the same cache file and format, one entry per shape
class under a device key naming this CPU (model, family / model numbers, the ISA flags that
matter), torch's version, the CPU capability aten dispatches to and the thread count.  By
default nothing is timed: a stored choice (``bertfast tune --device cpu``, or a process run with
``BERTFAST_AUTOTUNE=1``) or else ``aten``, the path every earlier release ran.  Timing runs each
candidate on synthetic inputs of the class's shape (wall clock, warm-up, the fastest of several
samples: :func:`cpu_timer`), drops one whose output misses the fp32 reference, and keeps the
default unless another is more than ``tuning.MARGIN`` faster.

Native low precision: :func:`cpu_features` reads the ISA flags (``/proc/cpuinfo``, else torch's
cpuinfo probes).  A bfloat16 linear on a CPU without AVX512_BF16 or AMX warns once (such CPUs
emulate bf16 GEMMs: 5.7x slower than fp32 measured on an AVX2-only AMD EPYC Zen 3).
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from bertfast.activations import get_activation_

try:  # the tuner lives with the kernels (triton); without it only the default runs
    from bertfast.kernels import tuning
except ImportError:  # pragma: no cover
    tuning = None

OP = "cpu_linear"
_CPU = torch.device("cpu")
_MK = torch.ops.mkldnn
DTYPES = (torch.float32, torch.bfloat16)

# activation name -> (oneDNN post-op attr, algorithm) for the fused candidates; others run after the GEMM
_POSTOPS: Dict[str, Tuple[str, str]] = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
                                         "gelu_pytorch_tanh": ("gelu", "tanh")}


# ----------------------------------------------------------------------------- the CPU
@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU is and the ISA extensions that decide the GEMMs' speed."""

    model: str  # "AMD EPYC (family 26 model 2)"
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    vnni: bool  # AVX512_VNNI or AVX_VNNI: int8 dot products
    amx: bool  # AMX tiles (bf16 / int8)

    @property
    def native_bf16(self) -> bool:
        """bf16 GEMMs run on bf16 instructions (AVX512_BF16 or AMX), not emulated."""
        return self.avx512_bf16 or self.amx

    def flags(self) -> Dict[str, bool]:
        return {"AVX2": self.avx2, "AVX-512": self.avx512, "AVX512_BF16": self.avx512_bf16, "VNNI": self.vnni,
                "AMX": self.amx}

    def describe(self) -> str:
        """"AMD EPYC (family 26 model 2): AVX2, AVX-512, AVX512_BF16, VNNI; no AMX"."""
        have = [k for k, v in self.flags().items() if v]
        lack = [k for k, v in self.flags().items() if not v]
        text = f"{self.model}: {', '.join(have) or 'none of AVX2 / AVX-512'}"
        return text + (f"; no {', '.join(lack)}" if lack else "")


def _proc_cpuinfo() -> Optional[Dict[str, str]]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    first = text.split("\n\n", 1)[0]  # every core reports the same
    fields = {}
    for line in first.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            fields.setdefault(k.strip(), v.strip())
    return fields


def _torch_probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # pragma: no cover - a probe this build lacks
        return False


def parse_features(fields: Optional[Dict[str, str]]) -> CpuFeatures:
    """CpuFeatures from /proc/cpuinfo's fields of one core (None: torch's cpuinfo probes and
    ``platform.processor()``)."""
    if fields is None or "flags" not in fields:
        import platform

        return CpuFeatures(platform.processor() or platform.machine() or "unknown CPU",
                           _torch_probe("_is_avx2_supported"), _torch_probe("_is_avx512_supported"),
                           _torch_probe("_is_avx512_bf16_supported"), _torch_probe("_is_vnni_supported"),
                           _torch_probe("_is_amx_tile_supported"))
    flags = set(fields["flags"].split())
    model = fields.get("model name", "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']} model {fields['model']})"
    return CpuFeatures(model, "avx2" in flags, "avx512f" in flags, "avx512_bf16" in flags or "amx_bf16" in flags,
                       "avx512_vnni" in flags or "avx_vnni" in flags, "amx_tile" in flags)


@functools.lru_cache(maxsize=None)
def cpu_features() -> CpuFeatures:
    """This machine's CPU (read once per process)."""
    return parse_features(_proc_cpuinfo())


def device_key(device: Optional[torch.device] = None) -> str:
    """The tuning cache's key for choices made here: CPU, ISA flags, torch, aten's CPU
    capability, threads.  A choice is reused only where all of them are the same."""
    del device
    f = cpu_features()
    flags = ",".join(k for k, v in f.flags().items() if v) or "-"
    return (f"cpu|{f.model}|{flags}|torch {torch.__version__}|aten {torch.backends.cpu.get_cpu_capability()}"
            f"|threads {torch.get_num_threads()}")


# ----------------------------------------------------------------------------- implementations
def _epilogue(y: torch.Tensor, activation: Optional[str], residual: Optional[torch.Tensor]) -> torch.Tensor:
    if activation is not None:
        y = get_activation_(activation)(y)  # y is ours: in place
    if residual is not None:
        y.add_(residual)
    return y


def _aten(x, w, b, activation, residual):
    return _epilogue(F.linear(x, w, b), activation, residual)


def _onednn(x, w, b, activation, residual):
    return _epilogue(_MK._linear_pointwise(x, w, b, "none", [], ""), activation, residual)


def _onednn_post(x, w, b, activation, residual):
    """oneDNN with one epilogue as its post-op (``w`` plain or prepacked): the activation, or
    else the residual add (``_linear_pointwise.binary``); the rest after it."""
    if activation in _POSTOPS:
        attr, algorithm = _POSTOPS[activation]
        return _epilogue(_MK._linear_pointwise(x, w, b, attr, [], algorithm), None, residual)
    if residual is not None and activation is None:
        return _MK._linear_pointwise.binary(x, residual, w, b, "add")
    return _epilogue(_MK._linear_pointwise(x, w, b, "none", [], ""), activation, residual)


def _onednn_packed(x, w, b, activation, residual):
    return _onednn_post(x, _MK._reorder_linear_weight(w, x.shape[0]), b, activation, residual)


def _mkl_packed(x, w, b, activation, residual):
    M = x.shape[0]
    y = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, M), w, b, M)
    return _epilogue(y, activation, residual)


def _has_mkl_packed() -> bool:
    return bool(getattr(torch._C, "has_mkl", False)) and hasattr(torch.ops.mkl, "_mkl_linear")


@dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable
    dtypes: tuple = DTYPES
    fused_only: bool = False  # offered only for classes whose epilogue oneDNN fuses
    available: Callable[[], bool] = lambda: torch.backends.mkldnn.is_available()


IMPLS: Tuple[Impl, ...] = (
    Impl("aten", _aten, available=lambda: True),
    Impl("onednn", _onednn),
    Impl("onednn-fused", _onednn_post, fused_only=True),
    Impl("onednn-packed", _onednn_packed),
    Impl("mkl-packed", _mkl_packed, dtypes=(torch.float32,), available=_has_mkl_packed),
)
_BY_NAME = {i.name: i for i in IMPLS}
DEFAULT = IMPLS[0].name


def epilogue_name(activation: Optional[str], residual: bool) -> str:
    """"none", "gelu", "add", "gelu+add": what follows the GEMM in a class."""
    return "+".join(([activation] if activation else []) + (["add"] if residual else [])) or "none"


def fusable(activation: Optional[str], residual: bool) -> bool:
    """Whether oneDNN runs (part of) the epilogue as a post-op: a known activation or the add."""
    return activation in _POSTOPS or (residual and activation is None)


def candidates(dtype: torch.dtype, activation: Optional[str], residual: bool) -> Tuple[str, ...]:
    """The implementation names offered for a class here, the default first."""
    fused = fusable(activation, residual)
    return tuple(i.name for i in IMPLS
                 if dtype in i.dtypes and (fused or not i.fused_only) and i.available())


def run(name: str, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], activation: Optional[str] = None,
        residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``name``'s activation(x @ w.T + b) (+ residual) for 2-D ``x`` (M, K)."""
    return _BY_NAME[name].fn(x, w, b, activation, residual)


# ----------------------------------------------------------------------------- shape classes and the chooser
def bucket(M: int) -> int:
    """The token count a class is timed at: M rounded up to a power of two, at least 16."""
    return max(16, 1 << max(0, int(M) - 1).bit_length())


def class_key(M: int, N: int, K: int, dtype: torch.dtype, activation: Optional[str], residual: bool) -> str:
    return f"{OP}|{str(dtype).replace('torch.', '')}|M{bucket(M)}|N{N}|K{K}|{epilogue_name(activation, residual)}"


def cpu_timer(fn: Callable[[], object], *, warmup: int = 2, samples: int = 7, target_ms: float = 5.0,
              max_iters: int = 200) -> float:
    """Wall-clock milliseconds of one ``fn()``: ``warmup`` calls, then the fastest of ``samples``
    samples, each of enough calls to last about ``target_ms`` (three samples when one call is
    longer than that).  The fastest, not the median: on a shared CPU other processes only ever
    add time (a descheduled OpenMP thread stalls a whole sample), and the candidates of a class
    are timed one after the other, so the median would rank them partly by when the load came."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max((time.perf_counter() - t0) * 1e3, 1e-4)
    iters = max(1, min(max_iters, int(target_ms / once)))
    if once > target_ms:
        samples = 3
    best = math.inf
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) * 1e3 / iters)
    return best


def can_time(device: Optional[torch.device] = None) -> bool:
    """Timing is possible unless torch.compile / jit is tracing."""
    del device
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def problem(M: int, N: int, K: int, dtype: torch.dtype, activation: Optional[str], residual: bool):
    """The tuner's Problem for one class: candidates and synthetic inputs at M = bucket(M)."""
    names = candidates(dtype, activation, residual)
    Mb = bucket(M)

    def bench():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(Mb, K, generator=g).to(dtype)
        w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
        b = torch.randn(N, generator=g).to(dtype)
        r = torch.randn(Mb, N, generator=g).to(dtype) if residual else None
        ref = F.linear(x.float(), w.float(), b.float())
        if activation is not None:
            ref = get_activation_(activation)(ref)
        if r is not None:
            ref += r.float()
        tol = 1e-3 if dtype == torch.float32 else 5e-2

        def run_(name):
            return run(name, x, w, b, activation, r)

        def check(out):
            return out.shape == ref.shape and bool(torch.allclose(out.float(), ref, rtol=tol, atol=tol))

        return run_, check

    cands = tuple(tuning.Candidate(n, n) for n in names)
    shape = f"{Mb}x{K}x{N} {str(dtype).replace('torch.', '')} {epilogue_name(activation, residual)}"
    return tuning.Problem(OP, class_key(M, N, K, dtype, activation, residual), cands, bench, shape)


if tuning is not None:
    class CpuTuner(tuning.Tuner):
        """The GPU tuner with this CPU's key, wall-clock timer and timing rule; its mode and
        ``--force`` follow the process-wide tuner's (one switch for both)."""

        def __init__(self, **kw):
            kw.setdefault("timer", lambda name, fn: cpu_timer(fn))
            kw.setdefault("device_key", device_key)
            kw.setdefault("can_time", can_time)
            super().__init__(**kw)

        @property
        def mode(self) -> str:
            return self._mode if self._mode is not None else tuning.TUNER.mode

        @property
        def retune(self) -> bool:
            return self._retune or tuning.TUNER.retune

        @retune.setter
        def retune(self, value: bool) -> None:
            self._retune = value

    TUNER: Optional["CpuTuner"] = CpuTuner()
else:  # pragma: no cover
    TUNER = None


@contextlib.contextmanager
def using(tuner):
    """Within the block every class is decided by ``tuner`` (a ``CpuTuner``: tests with a fake
    timer, a benchmark with its own cache file); the process-wide one afterwards."""
    global TUNER
    saved = TUNER
    TUNER = tuner
    tuning._bump_epoch()  # decisions remembered from the other tuner are dropped
    try:
        yield tuner
    finally:
        TUNER = saved
        tuning._bump_epoch()


def choice(M: int, N: int, K: int, dtype: torch.dtype, activation: Optional[str] = None,
           residual: bool = False) -> str:
    """The implementation for this class here: stored, measured (tune mode) or the default."""
    if TUNER is None:
        return DEFAULT
    args = (OP, bucket(M), N, K, dtype, activation, residual, torch.get_num_threads())
    return tuning._remember(args, lambda: TUNER.decide(problem(M, N, K, dtype, activation, residual), _CPU)).name


# ----------------------------------------------------------------------------- the entry point
_WARNED: set = set()
_SEEN: Optional[dict] = None  # record()'s dict while one is active


@contextlib.contextmanager
def record(into: dict):
    """Within the block, ``into[(N, K, epilogue, M bucket, dtype name)] = implementation`` for
    every linear :func:`linear` runs (benchmarks report what ran)."""
    global _SEEN
    saved, _SEEN = _SEEN, into
    try:
        yield into
    finally:
        _SEEN = saved


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`linear` serves this call: CPU, fp32 / bf16, same dtypes, a contiguous
    weight, at least one token, no autograd recording, not under torch.compile tracing."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and w.dtype == x.dtype and not torch.is_grad_enabled()
            and w.is_contiguous() and x.numel() > 0 and not torch.compiler.is_compiling())


def warn_emulated_bf16(dtype: torch.dtype) -> None:
    """One warning per process when bf16 runs on a CPU without native bf16 instructions."""
    if dtype == torch.bfloat16 and "bf16" not in _WARNED and not cpu_features().native_bf16:
        _WARNED.add("bf16")
        warnings.warn(f"bertfast: bfloat16 on this CPU ({cpu_features().describe()}) has no AVX512_BF16 or AMX: "
                      f"its GEMMs are emulated and measured 5.7x slower than float32 on an AVX2 CPU; "
                      f"use float32 (or bertfast.quantize_int8) for speed", RuntimeWarning, stacklevel=4)


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], activation: Optional[str] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """activation(x @ w.T + b) + residual with the implementation chosen for this class; ``x``
    (..., K), ``residual`` shaped like the output.  Call only where :func:`usable` holds."""
    warn_emulated_bf16(x.dtype)
    N, K = w.shape
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    r2 = residual.reshape(-1, N).contiguous() if residual is not None else None
    name = choice(x2.shape[0], N, K, x.dtype, activation, residual is not None)
    if _SEEN is not None:
        _SEEN[(N, K, epilogue_name(activation, residual is not None), bucket(x2.shape[0]),
               str(x.dtype).replace("torch.", ""))] = name
    return run(name, x2, w, b, activation, r2).view(*x.shape[:-1], N)
