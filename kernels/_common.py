"""Shared launcher plumbing for every kernel in ``kernels/``: the one place that decides
whether a call runs the Triton kernel or the PyTorch reference, and the argument checks
every launcher performs before it launches anything.

Backend rule (used by every op):
* all tensors on CUDA                      -> Triton kernel
* CPU tensors and ``TRITON_INTERPRET=1``    -> Triton kernel under the interpreter
* CPU tensors otherwise, ``fallback=True``  -> PyTorch reference, silently
* CPU tensors otherwise                     -> ``ValueError`` naming the problem

``TRITON_INTERPRET`` is read once, when ``kernels`` is imported, because ``triton.jit``
decides at decoration time whether a kernel is compiled or interpreted.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterable, Optional

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    """"float16" for torch.float16: the one spelling of a dtype in messages and reports."""
    return str(dtype).replace("torch.", "")

try:  # triton is a Linux x86-64 dependency; elsewhere only the references exist
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False


_TRUSTED = contextvars.ContextVar("bertfast_kernels_trusted", default=False)


@contextlib.contextmanager
def trusted_inputs():
    """Inside this block, launchers skip the checks that read tensor *values* on the host (id
    ranges, cu_seqlens monotonicity, 0/1 masks): the caller has validated them already.  Shape,
    dtype and device checks still run.  Used by the model (which validates its inputs once per
    forward) so that a forward makes no per-layer host synchronisation and can be captured in a
    CUDA graph."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


_RECORDING = contextvars.ContextVar("bertfast_kernels_recording", default=None)


def recording_launches() -> bool:
    """True inside ``bertfast.kernels.testing.record_launches()``: launches are recorded, not run, and the
    launchers take CPU tensors as if they were on a GPU (host-overhead measurement on CPU)."""
    return _RECORDING.get() is not None


def check_values() -> bool:
    """Whether launchers should run their value checks (host reads) now."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace a ContextVar read
        return False
    return not _TRUSTED.get()


def host_read_possible(device: torch.device) -> bool:
    """Whether tensor values on ``device`` may be read on the host now: not while torch.compile
    or jit traces, nor while a CUDA graph is being captured (the one rule, for the model's plan
    and the kernels' mask analysis)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def use_triton(op: str, *tensors: Optional[torch.Tensor], fallback: bool = False) -> bool:
    """True when ``op`` should launch its Triton kernel for these tensors, False when it should
    run the PyTorch reference (only with ``fallback=True``); raises ``ValueError`` otherwise."""
    ts = [t for t in tensors if t is not None]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    dev = next(iter(devices)) if devices else torch.device("cpu")
    if not HAS_TRITON:
        if fallback:
            return False
        raise ValueError(f"{op}: triton is not installed; pass fallback=True to run the PyTorch reference")
    if dev.type == "cuda":
        return True
    if (INTERPRET or _RECORDING.get() is not None) and dev.type == "cpu":
        return True
    if fallback:
        return False
    raise ValueError(
        f"{op}: tensors are on {dev}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set "
        f"before importing kernels, for the interpreter). Pass fallback=True to run the PyTorch reference."
    )


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: Iterable[torch.dtype] = SUPPORTED_DTYPES) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise ValueError(f"{op}: {name} has dtype {dtype_name(t.dtype)}; expected one of {names}")


def check_same_dtype(op: str, **tensors: Optional[torch.Tensor]) -> torch.dtype:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dtypes = {v.dtype for _, v in items}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k}={dtype_name(v.dtype)}" for k, v in items)
        raise ValueError(f"{op}: dtypes must match, got {desc}")
    return items[0][1].dtype


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """``shape`` entries may be ``None`` (any size)."""
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected {want}")


def check_out(op: str, out: Optional[torch.Tensor], shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if out is None:
        return
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"{op}: out must be a contiguous {dtype_name(dtype)} tensor of shape {tuple(shape)} "
            f"on {device}, got {dtype_name(out.dtype)} {tuple(out.shape)} on {out.device}"
        )


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device; the interpreter counts as Hopper (sm_90) so that it runs
    the configuration an H100 would pick."""
    if device.type == "cuda" and not INTERPRET:
        return torch.cuda.get_device_capability(device)
    return (9, 0)


def tf32_allowed(dtype: torch.dtype = torch.float32) -> bool:
    """Whether a matmul of ``dtype`` may round its inputs to TF32: only fp32 asks (fp16 / bf16 read
    nothing and get False), and fp32 follows torch's own switch for CUDA matmuls, IEEE unless the
    user enabled TF32.  The switch is read through the API this torch has: from torch 2.9 the
    per-backend precision (``torch.backends.cuda.matmul.fp32_precision``, "none" resolving to
    ``torch.backends.fp32_precision``; every legacy setter writes it too), because once anything
    has used that API, reading the legacy ``allow_tf32`` raises RuntimeError; before 2.9 the
    legacy ``allow_tf32``."""
    if dtype != torch.float32:
        return False
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9: the legacy switch is the only one
        return bool(matmul.allow_tf32)
    return precision == "tf32"


# ----------------------------------------------------------------------------- launch plans

_NULL = contextlib.nullcontext()


@contextlib.contextmanager
def switched(flag: list, value):
    """Run a block with a one-element switch list (``ENABLED = [True]``) set to ``value``; the
    previous value is restored after, whatever happens."""
    before = flag[0]
    flag[0] = value
    try:
        yield
    finally:
        flag[0] = before


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (``triton.cdiv`` costs microseconds per call on the host)."""
    return -(-a // b)


def launch_device(device: torch.device):
    """Context for launching on ``device``: a no-op unless it is a CUDA device other than the
    current one (switching devices costs microseconds per launch)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NULL
    return torch.cuda.device(device)



def meta(t: Optional[torch.Tensor]):
    """What a launch plan may depend on about a tensor: shape, strides, dtype, device (never its
    values or identity).  None stays None."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


# Bumped by bertfast.kernels.tuning whenever a stored or measured choice may change a configuration, so
# that launch plans made before it are made again (one int in every plan key).
TUNE_EPOCH = [0]


def mode_key(dtype: torch.dtype) -> tuple:
    """The global switches a launch plan depends on: the interpreter, recording
    (bertfast.kernels.testing), for fp32 torch's TF32 switch, and the tuner's epoch (bertfast.kernels.tuning)."""
    return (INTERPRET, _RECORDING.get() is not None, tf32_allowed(dtype), TUNE_EPOCH[0])


class PlanCache:
    """Launch plans of one op, keyed by the metadata of its arguments (``meta``, ``mode_key``,
    flags): what the checks concluded and what the launch needs (block sizes, grid, output shape,
    integer arguments), computed once per shape and reused.  A key holds no tensor, value or
    identity, so nothing a caller can change in place reaches a cached decision; pointers and
    alignment are still looked at on every call.  Bounded: cleared when full."""

    def __init__(self, maxsize: int = 1024):
        self._plans: dict = {}
        self.maxsize = maxsize

    def get(self, key):
        return self._plans.get(key)

    def plan(self, key_fn, build):
        """The plan for ``key_fn()`` (None: nothing to key on, e.g. an ``out=`` buffer), made by
        ``build()`` on a miss: ``build`` runs every check (and raises), so a cached plan is one
        the checks passed.  An argument that is not a tensor (AttributeError in ``key_fn``) gets
        no key: ``build`` says what is wrong."""
        try:
            key = key_fn()
        except AttributeError:
            key = None
        plan = self._plans.get(key) if key is not None else None
        if plan is None:
            plan = build()
            if key is not None:
                self.put(key, plan)
        return plan

    def put(self, key, plan):
        if len(self._plans) >= self.maxsize:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
