"""Direct launches: a launched kernel costs what Triton's precompiled path costs, not its JIT dispatch.

``kernel[grid](*args, **consts)`` on a ``triton.jit`` function runs Triton's dispatcher on every
call: it binds the arguments, specializes every one of them, hashes the result into a cache key,
looks the compiled kernel up, reads the current device and stream, builds the launch metadata and
only then calls the compiled kernel's C launcher.  ``Kernel`` wraps a launched ``triton.jit``
function (``_attn_fwd = Kernel(_attn_fwd)``; launch sites are unchanged) and keeps, per call
signature, the ``CompiledKernel`` that Triton's own dispatch returned the first time; later calls
hand the same arguments straight to that kernel's launcher (``CompiledKernel.run``), exactly as
``JITFunction.run`` does at its end (triton 3.6 through 3.9 share that call).

Which compiled kernel a call gets must be the one Triton would pick.  Triton picks by the
arguments' specialization (tensor dtype and 16-byte alignment of its address; an int's type from
its range, whether it is 1, whether it divides by 16; constexpr values; options such as
``num_warps``).  The key here is a refinement of that: constexpr and option values as given, and
per runtime argument ``_spec``: (dtype, address % 16 == 0) for a tensor, (== 1, % 16 == 0, i32 /
i64 / u64 range) for an int, the type for a float / bool / None.  Equal keys therefore mean equal
Triton specializations (``tests/test_launch.py`` checks that against Triton's own specializer,
and that a model forward passes identical arguments to identical compiled kernels either way).
Anything else (a tensor descriptor, a callable grid, a launch hook set by a profiler, torch.compile
tracing, the interpreter, ``BERTFAST_DIRECT_LAUNCH=0``) goes through Triton's dispatch unchanged.
Triton's process-wide compile switches (``knobs.runtime.debug``, instrumentation) are read when a
signature is first launched; changing them later in the process needs ``Kernel.clear()``.

Launch plans keep the compiled kernel (``Kernel.planned``): where an op's launch plan fixes every
argument of a launch but the tensors' addresses (the GEMMs, add + LayerNorm, attention with a
prepared mask), the plan holds a memo of the compiled kernel per 16-byte alignment of those
tensors, and a call computes only that much of the key.  ``VERIFY`` checks every memo hit against
the full key (the tests run with it).

``fake_gpu()`` stands in a GPU on a CPU-only machine: Triton's dispatch runs in full against a
fake CUDA driver (sm_90 target), compiles nothing and records each launch at the C launcher
instead (``bertfast bench host`` measures the host path with it; the tests compare the two paths).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
from typing import Any, Optional

import torch

from bertfast.kernels._common import HAS_TRITON, INTERPRET, switched

# One switch, read once: BERTFAST_DIRECT_LAUNCH=0 sends every launch through Triton's dispatch.
ENABLED = [os.environ.get("BERTFAST_DIRECT_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off")]


def direct_launches(on: bool):
    """Direct launches on (or off: Triton's dispatch) inside the block; the switch is restored after."""
    return switched(ENABLED, on)


# Tests: check every launch remembered by a launch plan (``Kernel.planned``) against the full key.
VERIFY = [False]


def verify_launches():
    """Inside the block every launch a launch plan remembered is checked against the full key
    (``VERIFY``); the switch is restored after."""
    return switched(VERIFY, True)


# Launch observers (bertfast/program.py records one layer's launches): while set, every launch of
# a Kernel, planned or not, is handed to it as ``observer(kernel, grid, args, kwargs, launch)``,
# which returns ``launch()`` (the launch itself).
OBSERVE = contextvars.ContextVar("bertfast_launch_observer", default=None)

# Bumped by every Kernel.clear(): a layer program (bertfast/program.py) made before holds
# compiled kernels that may be gone, so its key names an older epoch and is never found again.
EPOCH = [0]

_TENSOR_POSITIONS = "tensor positions"  # the memo entry that lists a call site's tensor arguments

_KERNELS: list = []  # every Kernel made (module-level kernels: they live as long as the process)

if HAS_TRITON:
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction

    try:
        from triton import knobs as _knobs
    except ImportError:  # pragma: no cover - triton < 3.4 is below the supported floor
        _knobs = None
else:  # pragma: no cover
    JITFunction = None


class _Unsupported(Exception):
    """An argument whose Triton specialization the key does not model: use Triton's dispatch."""


_I32 = (-(2**31), 2**31)


def _spec(a: Any):
    """A value that determines Triton's specialization of runtime argument ``a`` (a refinement:
    equal values here imply equal specializations there)."""
    t = type(a)
    if t is int:
        return (a == 1, not a & 15, _I32[0] <= a < _I32[1], a >= 2**63)
    if t is bool or t is float or a is None:
        return t
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    raise _Unsupported(t.__name__)


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_INT_CODES: dict = {}  # int value -> its _spec as a 4-bit code (bounded: cleared when full)


def _int_code(a: int) -> int:
    code = (a == 1) | (not a & 15) << 1 | (_I32[0] <= a < _I32[1]) << 2 | (a >= 2**63) << 3
    if len(_INT_CODES) >= 4096:
        _INT_CODES.clear()
    _INT_CODES[a] = code
    return code


def _specs(args: tuple) -> tuple:
    """The specialization key of ``args``: ``map(_spec, args)`` flattened, with the common cases
    inline (about 40 % less time than a call per argument for the ~15-35 arguments of a launch):
    a tensor or parameter adds its dtype and its 16-byte alignment, an int its ``_spec`` as a 4-bit
    code, anything else its ``_spec``.  Decodable left to right (a dtype is always followed by its
    alignment flag; codes are ints, the rest types or tuples), so equal keys mean equal ``_spec``
    sequences."""
    out = []
    add = out.append
    codes = _INT_CODES.get
    for a in args:
        t = type(a)
        if t is int:
            c = codes(a)
            add(_int_code(a) if c is None else c)
        elif t in _TENSOR_TYPES:
            add(a.dtype)
            add(a.data_ptr() % 16 == 0)
        else:
            add(_spec(a))
    return tuple(out)


def _hooks_set() -> bool:
    """A launch hook is installed (a profiler such as proton): Triton's dispatch must run it."""
    if _knobs is None:  # pragma: no cover
        return True
    rt = _knobs.runtime
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        if h is not None and getattr(h, "calls", True):
            return True
    return False


CONSTANTS: list = []  # private read-only tensors of the launchers (``constant``)


def constant(*tensors: torch.Tensor) -> None:
    """Declare tensors that a launcher passes to its launches and never changes (the attention
    kernel's stand-in key lengths): a layer program (bertfast/program.py) passes them as they are."""
    CONSTANTS.extend(tensors)


def driver():
    """Triton's active driver (the stand-in under ``fake_gpu``), or None where there is none (no
    triton, no GPU)."""
    if not HAS_TRITON:  # pragma: no cover
        return None
    try:
        return _driver.active
    except RuntimeError:  # no GPU driver on this machine
        return None


def current_device(kernel) -> Any:
    """The device a direct launch of ``kernel`` would use now (its compiled kernels are kept per
    device), or None when its launches go through Triton's dispatch."""
    if not kernel._direct or not ENABLED[0]:
        return None
    d = driver()
    return d.get_current_device() if d is not None else None


# Set while bertfast.kernels.testing.record_launches records every launch at ``kernel[grid]``.
RECORDING_AT_DISPATCH = [False]


def dispatch_only() -> bool:
    """Launches must go through ``kernel[grid]`` now: direct launches off, torch.compile tracing,
    a launch hook set (a profiler's), or launches recorded there (``record_launches``)."""
    return not ENABLED[0] or RECORDING_AT_DISPATCH[0] or torch.compiler.is_compiling() or _hooks_set()


class Kernel:
    """A launched ``triton.jit`` function with direct launches (module docstring).  Anything not
    about launching (``fn``, ``arg_names``, ``params``, ...) is the wrapped function's."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")
        self._direct = HAS_TRITON and not INTERPRET and isinstance(fn, JITFunction)
        self._cache: dict = {}  # (device, consts, specs) -> (CompiledKernel, tail of arguments)
        self._epoch = 0  # bumped by clear(): part of every launch plan's memo key (``planned``)
        _KERNELS.append(self)

    @property
    def launched_fn(self):
        """The wrapped ``triton.jit`` function (what the compile check compiles)."""
        return self.fn

    def __getattr__(self, name):  # only reached for names Kernel does not define
        return getattr(self.__dict__["fn"], name)

    def __getitem__(self, grid):
        obs = OBSERVE.get()
        if obs is not None:
            return functools.partial(self._observed, obs, grid)
        if not self._direct or not ENABLED[0]:
            return self.fn[grid]
        return functools.partial(self._launch, grid)

    def _observed(self, obs, grid, *args, **kwargs):
        if not self._direct or not ENABLED[0]:
            return obs(self, grid, args, kwargs, lambda: self.fn[grid](*args, **kwargs))
        return obs(self, grid, args, kwargs, lambda: self._launch(grid, *args, **kwargs))

    def _launch(self, grid, *args, **kwargs):
        if type(grid) is not tuple or torch.compiler.is_compiling() or _hooks_set():
            return self.fn[grid](*args, **kwargs)
        d = _driver.active
        device = d.get_current_device()
        try:
            key = (device, tuple(kwargs.items()), _specs(args))
            entry = self._cache.get(key)
        except (_Unsupported, TypeError):  # an argument the key does not model, an unhashable keyword
            return self.fn[grid](*args, **kwargs)
        if entry is None:
            return self._first(key, grid, args, kwargs)
        return self._run(entry, d, device, grid, args)

    def planned(self, memo: dict, grid: tuple, args: tuple, kwargs: dict):
        """``self[grid](*args, **kwargs)`` from an op's launch plan: the plan keeps the compiled
        kernel.  ``memo`` is a dict owned by one launch plan and one call site, where every argument
        but the tensors' addresses is fixed by the plan (ints, floats, tensor dtypes, constexprs,
        options): there the compiled kernel is remembered per device, per ``clear()`` epoch and per
        16-byte alignment of the tensor arguments, so a call computes that much of the key, not all
        of it.  The memo goes when its plan does (``PlanCache``); nothing in it is keyed on a tensor.  Under
        ``VERIFY[0]`` (tests) every remembered launch is checked against the full key."""
        obs = OBSERVE.get()
        if obs is not None:
            return obs(self, grid, args, kwargs, functools.partial(self._planned, memo, grid, args, kwargs))
        return self._planned(memo, grid, args, kwargs)

    def _planned(self, memo: dict, grid: tuple, args: tuple, kwargs: dict):
        if not self._direct or not ENABLED[0] or torch.compiler.is_compiling() or _hooks_set():
            return self.fn[grid](*args, **kwargs)
        d = _driver.active
        device = d.get_current_device()
        where = memo.get(_TENSOR_POSITIONS)  # the positions of the tensor arguments (fixed at a call site)
        if where is None:
            where = memo[_TENSOR_POSITIONS] = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        try:
            akey = (device, self._epoch, *[args[i].data_ptr() % 16 == 0 for i in where])
        except AttributeError:  # not a tensor where the call site had one: the full key decides
            return self._launch(grid, *args, **kwargs)
        entry = memo.get(akey)
        if entry is None or VERIFY[0]:
            try:
                key = (device, tuple(kwargs.items()), _specs(args))
                full = self._cache.get(key)
            except (_Unsupported, TypeError):
                return self.fn[grid](*args, **kwargs)
            if entry is not None and full is not entry:
                raise AssertionError(f"{self.__name__}: a launch plan's remembered kernel is not the one its "
                                     f"arguments select (an argument the plan does not fix changed): {key}")
            if full is None:
                kernel = self._first(key, grid, args, kwargs)
                if key in self._cache:
                    memo[akey] = self._cache[key]
                return kernel
            memo[akey] = entry = full
        return self._run(entry, d, device, grid, args)

    def compiled_for(self, device, args: tuple, kwargs: dict):
        """The (compiled kernel, tail of arguments) that a direct launch of ``args`` / ``kwargs``
        on ``device`` uses, or None when none is remembered (not launched yet, Triton's dispatch
        only, an argument the key does not model)."""
        if not self._direct:
            return None
        try:
            return self._cache.get((device, tuple(kwargs.items()), _specs(args)))
        except (_Unsupported, TypeError):
            return None

    def _first(self, key, grid, args: tuple, kwargs: dict):
        """First call of this signature: Triton's dispatch (compiles if needed) and launch; the
        compiled kernel is remembered under ``key``."""
        kernel = self.fn[grid](*args, **kwargs)
        tail = self._tail(len(args), kwargs)
        if kernel is not None and hasattr(kernel, "packed_metadata") and tail is not None:
            self._cache[key] = (kernel, tail)
        return kernel

    @staticmethod
    def _run(entry, d, device, grid, args: tuple):
        kernel, tail = entry
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, d.get_current_stream(device),
                   kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
        return kernel

    def _tail(self, n_args: int, kwargs: dict) -> Optional[tuple]:
        """The values of the parameters after the positional ones, in signature order (keywords,
        else defaults): what Triton's binder appends.  None when that is not well defined."""
        tail = []
        for p in self.fn.params[n_args:]:
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            else:
                if p.default is inspect.Parameter.empty:
                    return None
                tail.append(p.default)
        return tuple(tail)

    def clear(self, device: Any = None) -> None:
        """Forget the remembered compiled kernels (of one device, or all; launch plans' memos too)."""
        self._epoch += 1  # every memo entry made before names an older epoch: never found again
        EPOCH[0] += 1
        if device is None:
            self._cache.clear()
        else:
            for k in [k for k in self._cache if k[0] == device]:
                del self._cache[k]


# ----------------------------------------------------------------------------- a GPU stand-in

_FAKE_DEVICE = -17  # a device index no GPU has: the stand-in's entries never mix with a real GPU's


class _FakeCompiled:
    """What Triton's dispatch gets instead of compiling, under ``fake_gpu``: its launcher records."""

    def __init__(self, name: str, key, launches: list, keep_args: bool):
        self.name, self.key, self._launches, self._keep_args = name, key, launches, keep_args
        self.function = object()
        self.packed_metadata = ()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        if enter is not None:  # as the C launcher does
            enter(launch_metadata)
        self._launches.append((self.name, (g0, g1, g2), self.key, args if self._keep_args else None))
        if exit_ is not None:
            exit_(launch_metadata)


class _FakeDriver:
    """The part of a Triton driver that dispatch uses, for a Hopper GPU that is not there."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return _FAKE_DEVICE

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def fake_gpu(capability: tuple = (9, 0), keep_args: bool = False):
    """Run launchers on CPU tensors as on a GPU of ``capability``: Triton's dispatch (and the direct
    path) run in full, nothing is compiled or run; yields the list of launches, each
    (kernel name, grid, Triton's cache key, arguments if ``keep_args``).  Outputs hold whatever
    ``torch.empty`` gave.  Restores the driver, Triton's per-device caches and the direct path's
    remembered kernels on exit."""
    from triton.backends.compiler import GPUTarget

    from bertfast.kernels import _common

    launches: list = []
    compiled: set = set()  # the triton.jit functions whose caches got stand-ins

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = _FakeCompiled(self.fn.__name__, key, launches, keep_args)
        self.device_caches[device][0][key] = kernel
        compiled.add(self)
        return kernel

    saved_compile = JITFunction.__dict__["_do_compile"]
    saved_driver = _driver._active
    token = _common._RECORDING.set(launches)
    JITFunction._do_compile = do_compile
    _driver.set_active(_FakeDriver(GPUTarget("cuda", capability[0] * 10 + capability[1], 32)))
    try:
        yield launches
    finally:
        JITFunction._do_compile = saved_compile
        _driver._active = saved_driver
        _common._RECORDING.reset(token)
        for k in list(_KERNELS):
            k.clear(_FAKE_DEVICE)
        for fn in compiled:
            fn.device_caches.pop(_FAKE_DEVICE, None)


def launched(fn=None, **jit_kwargs):
    """``@launched`` / ``@launched(do_not_specialize=[...])`` on a kernel launched from the host:
    ``triton.jit`` with direct launches (``Kernel``).  Device functions keep ``@triton.jit``."""
    import triton

    if fn is None:
        return lambda f: Kernel(triton.jit(f, **jit_kwargs))
    return Kernel(triton.jit(fn, **jit_kwargs))
