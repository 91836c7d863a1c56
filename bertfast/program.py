"""Layer programs: one layer's launches, recorded once per case and replayed (issue 21).

An inference forward on the kernels runs the same seven launches in every layer, and the same
ones again in the next forward of that shape: only the tensors' addresses change.  The ops
(bertfast/ops.py, bertfast/kernels/) decide each launch (checks, plans, block sizes, grids,
scalar arguments) and cost ~100 us of Python a layer for it.  A layer program keeps what they
decided for one *case* and replays it:

* **Recording.**  The layer runs through the ops as always, with a launch observer
  (``bertfast.kernels._launch.OBSERVE``) and a dispatch mode watching: every launch (kernel, grid,
  arguments, constexprs), every allocation, and whether anything else ran.  Each tensor argument
  is traced to its *source*: the layer input, a parameter, a tensor of the forward (the prepared
  mask, ``cu_seqlens``), a private constant of the launchers (``bertfast.kernels._launch.constant``)
  or an allocation made in the layer, with its byte offset.  A layer that did anything a replay cannot repeat (a PyTorch
  op with device work (a copy, a ``cat``), a host read, a launch argument of another kind, an
  argument traced to nothing) gets no program: it keeps running through the ops.
* **Key.**  Everything the ops' decisions depend on, read at every call, never a tensor's
  identity: the layer input's and every parameter's shape, strides, dtype, device and 16-byte
  alignment, the layer's scalars (heads, LayerNorm eps), the forward's mask / packing layout and
  host-known lengths (``for_forward``), the global switches of ``mode_key`` and the launchers'
  epoch.  Parameters that shared a storage when recorded (the fused QKV weight: query, key, value
  back to back) must still lie at the same distances (*guards*); else the ops run.
* **Replay.**  The layer's intermediates are planned into one workspace, by lifetime: buffers
  never alive at the same launch share memory, so the workspace is about the peak of the ops' own
  allocations; the output gets its own tensor.  Launches go straight to the compiled kernels' launchers with the addresses as
  ints (``CompiledKernel.run``, as ``bertfast.kernels._launch`` does; Triton's launcher takes an
  int as a device pointer), or, where there are no compiled kernels to call (the interpreter,
  ``BERTFAST_DIRECT_LAUNCH=0``, a launch hook such as a profiler's, ``record_launches``),
  through ``kernel[grid](...)`` with views of the same memory: the same launches, their results
  bit for bit those of the ops (the interpreter tests compare them).

A case is recorded the second time it is seen (the first compiles and makes the ops' plans), so a
bert-base forward replays from its third layer on, and every layer of later forwards.  Programs
run in inference only (no autograd graph recorded, no dropout, no attention probabilities, not
while torch.compile traces); ``BERTFAST_LAYER_PROGRAMS=0`` turns them off.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bertfast.kernels import _launch
from bertfast.kernels._common import PlanCache, launch_device, mode_key, switched

# One switch, read once: BERTFAST_LAYER_PROGRAMS=0 runs every layer through the ops.
ENABLED = [os.environ.get("BERTFAST_LAYER_PROGRAMS", "1").strip().lower() not in ("0", "false", "no", "off")]


def enabled(on: bool):
    """Layer programs on (or off) inside the block; the switch is restored after."""
    return switched(ENABLED, on)


# PyTorch ops that do no device work: views and metadata ...
VIEW_OPS = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided",
    "aten::select", "aten::slice", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::t",
    "aten::transpose", "aten::permute", "aten::detach", "aten::alias", "aten::split", "aten::split_with_sizes",
    "aten::narrow", "aten::unbind", "aten::resolve_conj", "aten::resolve_neg", "aten::expand_as", "aten::view_as",
    "aten::set_",
})
# ... and allocations (their contents are whatever the memory held)
ALLOC_OPS = frozenset({"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                       "aten::new_empty_strided"})

_ALIGN = 256  # byte alignment of each buffer in a workspace (what CUDA's caching allocator gives)


class _Skip(Exception):
    """The recorded layer did something a replay cannot repeat: no program for this case."""


class ForwardPrograms:
    """What one forward contributes to its layers' programs: the part of the key that is the
    same for every layer (``sig``) and the forward's tensors that launches may read."""

    __slots__ = ("sig", "tensors", "ptrs")

    def __init__(self, sig: tuple, tensors: Tuple[torch.Tensor, ...]):
        self.sig, self.tensors = sig, tensors
        self.ptrs = [t.data_ptr() for t in tensors]


def _meta(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)


def for_forward(act: str, causal: bool, packing, mask) -> Optional[ForwardPrograms]:
    """The forward's part of the programs' key and its tensors, or None: programs off (the
    switch, or a forward that records an autograd graph or is being traced; the caller rules
    out training, attention probabilities and the PyTorch path)."""
    if not ENABLED[0] or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if packing is not None:
        cu = packing.cu_seqlens
        sig = ("packed", act, causal, packing.B, packing.S, packing.total, packing.max_seqlen, packing.slack,
               _meta(cu))
        tensors = (cu,) if cu is not None else ()
    else:
        pm = mask.kernel if mask is not None else None
        if pm is None:
            return None  # the kernels do not read this mask: the attention op runs its PyTorch path
        sig = ("padded", act, causal, mask.kernel_causal, mask.seqlen, mask.dtype, pm.kind, pm.batch, pm.heads,
               pm.seqlen, _meta(pm.mask), _meta(pm.kvlen))
        tensors = tuple(t for t in (pm.mask, pm.kvlen) if t is not None)
    return ForwardPrograms(sig, tensors)


# ----------------------------------------------------------------------------- recording


class _Watch(TorchDispatchMode):
    """Keeps every allocation (alive until the recording is traced, so that no two buffers share an
    address) and notes the first other op (device work or a host read: ``bad``), outside the
    launches themselves (``paused``)."""

    def __init__(self):
        super().__init__()
        self.allocs: List[torch.Tensor] = []
        self.bad: Optional[str] = None
        self.paused = 0  # inside a launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = "aten::" + func.__name__.split(".")[0]
        if name in ALLOC_OPS:
            self.allocs.append(out)
        elif name not in VIEW_OPS and self.bad is None:
            self.bad = name
        return out


class _Step:
    """One launch of a program."""

    __slots__ = ("kernel", "grid", "args", "slots", "views", "kwargs", "entry")

    def __init__(self, kernel, grid, args, slots, views, kwargs, entry):
        self.kernel, self.grid, self.kwargs, self.entry = kernel, grid, kwargs, entry
        self.args = args  # the arguments, tensors as None (filled per replay)
        self.slots = slots  # ((position, source, byte offset), ...) of the tensor arguments
        self.views = views  # ((size, stride, dtype, TMA descriptor or None), ...) of the tensor arguments


class Program:
    """One case's launches (module docstring).  Sources: 0 the layer input, 1.. the parameters,
    then the forward's tensors, the constants, and the buffers (workspace ones, then the output)."""

    def __init__(self, device, steps: List[_Step], n_params: int, n_fwd: int, constants: list, out_spec: tuple,
                 offsets: list, ws_bytes: int, out_buf: int, out_view: tuple, guards: list, compiled: bool):
        self.device, self.steps, self.constants, self.guards = device, steps, constants, guards
        self.out_spec = out_spec  # (size, stride, dtype) of the output's allocation
        self.offsets = offsets  # workspace byte offset per buffer (None: the output)
        self.ws_bytes, self.out_buf, self.out_view = ws_bytes, out_buf, out_view
        self.compiled = compiled  # some step has its compiled kernel (``entry``): ``run`` calls it
        self.first = 1 + n_params + n_fwd + len(constants)  # source index of buffer 0

    # -------------------------------------------------------------------- replay
    def _buffers(self, device) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        ws = torch.empty(self.ws_bytes, dtype=torch.uint8, device=device) if self.ws_bytes else None
        size, stride, dtype = self.out_spec
        out = torch.empty_strided(size, stride, dtype=dtype, device=device)
        return ws, out

    def _result(self, out: torch.Tensor) -> torch.Tensor:
        size, stride, offset = self.out_view
        if offset == 0 and out.shape == size and out.stride() == stride:
            return out
        return out.as_strided(size, stride, out.storage_offset() + offset // out.element_size())

    def _bases(self, x, params, fwd, ws, out) -> Tuple[list, list]:
        """Per source: the tensor whose memory it is, and the byte offset of its data in it."""
        bases: list = [x, *params, *fwd.tensors, *self.constants]
        byte0: list = [0] * len(bases)
        for o in self.offsets:
            bases.append(ws if o is not None else out)
            byte0.append(o if o is not None else 0)
        return bases, byte0

    @staticmethod
    def _launch_views(st: _Step, bases: list, byte0: list) -> None:
        a = list(st.args)
        descs = False
        for (pos, src, off), (size, stride, dtype, desc) in zip(st.slots, st.views):
            v = _view(bases[src], byte0[src] + off, size, stride, dtype)
            a[pos] = v if desc is None else dataclasses.replace(desc, base=v)
            descs = descs or desc is not None
        # TMA descriptors: Triton's dispatch builds them (what Kernel does with them too)
        (st.kernel.fn if descs else st.kernel)[st.grid](*a, **st.kwargs)

    def run(self, x: torch.Tensor, ptrs: list, params: Sequence, fwd: ForwardPrograms, d, device) -> torch.Tensor:
        """Replay with the compiled kernels (a step without one, e.g. a launch with TMA descriptors,
        through ``kernel[grid]``): ``ptrs`` the input's and parameters' addresses."""
        ws, out = self._buffers(x.device)
        ptrs = ptrs + fwd.ptrs
        ptrs += [c.data_ptr() for c in self.constants]
        base = ws.data_ptr() if ws is not None else 0
        ptrs += [base + o if o is not None else 0 for o in self.offsets]
        ptrs[self.first + self.out_buf] = out.data_ptr()
        stream = d.get_current_stream(device)
        bases = None
        with launch_device(x.device):
            for st in self.steps:
                if st.entry is None:
                    if bases is None:
                        bases = self._bases(x, params, fwd, ws, out)
                    self._launch_views(st, *bases)
                    continue
                a = st.args.copy()
                for pos, src, off in st.slots:
                    a[pos] = ptrs[src] + off
                if _launch.VERIFY[0]:
                    self._verify(st, a, self._bases(x, params, fwd, ws, out), device)
                kernel, tail = st.entry
                g = st.grid
                kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                           *a, *tail)
        return self._result(out)

    @staticmethod
    def _verify(st: _Step, a: list, bases: Tuple[list, list], device) -> None:
        """Tests (``bertfast.kernels._launch.VERIFY``): the addresses passed are those of the views a
        launch through ``kernel[grid]`` passes, and the compiled kernel is the one those select."""
        views = list(st.args)
        for (pos, src, off), (size, stride, dtype, _) in zip(st.slots, st.views):
            views[pos] = _view(bases[0][src], bases[1][src] + off, size, stride, dtype)
            if views[pos].data_ptr() != a[pos]:
                raise AssertionError(f"layer program: {st.kernel.__name__} argument {pos}: address {a[pos]:#x}, "
                                     f"its view's {views[pos].data_ptr():#x}")
        if st.kernel.compiled_for(device, tuple(views), st.kwargs) is not st.entry:
            raise AssertionError(f"layer program: {st.kernel.__name__}: the compiled kernel is not the one its "
                                 f"arguments select")

    def run_views(self, x: torch.Tensor, params: Sequence, fwd: ForwardPrograms) -> torch.Tensor:
        """Replay through ``kernel[grid](...)`` with views of the same memory (module docstring)."""
        ws, out = self._buffers(x.device)
        bases = self._bases(x, params, fwd, ws, out)
        with launch_device(x.device):
            for st in self.steps:
                self._launch_views(st, *bases)
        return self._result(out)


def _view(base: torch.Tensor, byte_offset: int, size, stride, dtype) -> torch.Tensor:
    """The (size, stride, dtype) tensor at ``byte_offset`` bytes from ``base``'s first element."""
    item = dtype.itemsize
    start = base.storage_offset() * base.element_size() + byte_offset
    if base.dtype == dtype:
        return base.as_strided(size, stride, start // item)
    return torch.empty(0, dtype=dtype, device=base.device).set_(base.untyped_storage(), start // item, size, stride)


def _plan_workspace(sizes: List[int], lives: List[Tuple[int, int]]) -> Tuple[List[int], int]:
    """Byte offsets of buffers in one workspace: two buffers whose lifetimes (first, last step)
    overlap never overlap in memory.  Largest first, each at the lowest offset that fits (what
    memory planners do); returns (offsets, workspace bytes)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    placed: list = []  # (offset, end, first, last)
    offsets = [0] * len(sizes)
    total = 0
    for i in order:
        n = -(-max(sizes[i], 1) // _ALIGN) * _ALIGN
        first, last = lives[i]
        busy = sorted((o, e) for o, e, f, l in placed if f <= last and first <= l)
        at = 0
        for o, e in busy:
            if at + n <= o:
                break
            at = max(at, e)
        offsets[i] = at
        placed.append((at, at + n, first, last))
        total = max(total, at + n)
    return offsets, total


def record(body: Callable[[], torch.Tensor], x: torch.Tensor, params: Sequence,
           fwd: ForwardPrograms) -> Tuple[torch.Tensor, Optional[Program], Optional[str]]:
    """Run ``body()`` (the layer through the ops) once, watched: (its result, the program or None,
    why not)."""
    launches: list = []

    watch = _Watch()

    def observe(kernel, grid, args, kwargs, launch):
        launches.append((kernel, grid, args, dict(kwargs), _launch.current_device(kernel)))
        watch.paused += 1  # what the launch itself does (the interpreter copies its arguments) is not the layer's
        try:
            return launch()
        finally:
            watch.paused -= 1

    token = _launch.OBSERVE.set(observe)
    try:
        with watch:
            y = body()
    finally:
        _launch.OBSERVE.reset(token)
    try:
        if watch.bad is not None:
            raise _Skip(f"{watch.bad} in the layer")
        prog = _trace(y, x, params, fwd, launches, watch.allocs)
    except _Skip as e:
        return y, None, str(e)
    return y, prog, None


def _trace(y, x, params, fwd, launches, allocs) -> Program:
    if not launches:
        raise _Skip("no launch")
    if not isinstance(y, torch.Tensor) or y.numel() == 0:
        raise _Skip("not a tensor result")
    n_params = len(params)
    constants = list(_launch.CONSTANTS)
    fixed = [x, *params, *fwd.tensors, *constants]
    first_buf = len(fixed)
    by_storage: dict = {}  # storage address -> (source, its data_ptr); buffers take precedence
    for i, t in enumerate(allocs):
        by_storage[t.untyped_storage().data_ptr()] = (first_buf + i, t.untyped_storage().data_ptr())
    for i, t in enumerate(fixed):
        if t is not None:
            by_storage.setdefault(t.untyped_storage().data_ptr(), (i, t.data_ptr()))
    # guards: parameters that share a storage keep their distances
    guards = []
    seen: dict = {}
    for i, p in enumerate(params, start=1):
        if p is None:
            continue
        sp = p.untyped_storage().data_ptr()
        if sp in seen:
            guards.append((i, seen[sp], p.data_ptr() - fixed[seen[sp]].data_ptr()))
        else:
            seen[sp] = i
    device = None
    steps = []
    used: dict = {}  # buffer -> [first step, last step]
    for s, (kernel, grid, args, kwargs, dev) in enumerate(launches):
        if type(grid) is not tuple or not all(type(g) is int for g in grid) or not 1 <= len(grid) <= 3:
            raise _Skip(f"{kernel.__name__}: grid {grid!r}")
        device = dev if device is None else device
        if dev != device:
            raise _Skip("launches on two devices")
        a: list = []
        slots, views = [], []
        for pos, v in enumerate(args):
            desc = None
            if dataclasses.is_dataclass(v) and isinstance(getattr(v, "base", None), torch.Tensor):
                desc, v = v, v.base  # a TMA descriptor (triton.tools.tensor_descriptor): rebuilt on its base
            if isinstance(v, torch.Tensor):
                if v.numel() == 0:
                    raise _Skip(f"{kernel.__name__}: an empty tensor argument")
                hit = by_storage.get(v.untyped_storage().data_ptr())
                if hit is None:
                    raise _Skip(f"{kernel.__name__}: argument {pos} is no input, parameter, mask or buffer")
                src, ptr0 = hit
                slots.append((pos, src, v.data_ptr() - ptr0))
                views.append((tuple(v.shape), tuple(v.stride()), v.dtype, desc))
                if src >= first_buf:
                    life = used.setdefault(src - first_buf, [s, s])
                    life[1] = s
                a.append(None)
            elif v is None or type(v) in (int, float, bool):
                a.append(v)
            else:
                raise _Skip(f"{kernel.__name__}: argument {pos} of type {type(v).__name__}")
        entry = kernel.compiled_for(dev, args, kwargs) if dev is not None and all(v[3] is None for v in views) \
            else None
        g = grid + (1,) * (3 - len(grid))
        steps.append(_Step(kernel, grid if entry is None else g, a, tuple(slots), tuple(views), kwargs, entry))
    out_hit = by_storage.get(y.untyped_storage().data_ptr())
    if out_hit is None or out_hit[0] < first_buf or y.dtype != allocs[out_hit[0] - first_buf].dtype:
        raise _Skip("the result is not a buffer of the layer")
    out_buf = out_hit[0] - first_buf
    out_view = (tuple(y.shape), tuple(y.stride()), y.data_ptr() - out_hit[1])
    # buffers: the ones launches use (and the output), the rest dropped
    keep = sorted(set(used) | {out_buf})
    renum = {b: i for i, b in enumerate(keep)}
    t = allocs[out_buf]
    out_spec = (tuple(t.shape), tuple(t.stride()), t.dtype)
    ws_ids = [b for b in keep if b != out_buf]
    offs, ws_bytes = _plan_workspace([allocs[b].untyped_storage().nbytes() for b in ws_ids],
                                     [tuple(used[b]) for b in ws_ids])
    offsets: List[Optional[int]] = [None] * len(keep)
    for b, o in zip(ws_ids, offs):
        offsets[renum[b]] = o
    for st in steps:
        st.slots = tuple((pos, first_buf + renum[src - first_buf] if src >= first_buf else src, off)
                         for pos, src, off in st.slots)
    compiled = any(st.entry is not None for st in steps)
    return Program(device, steps, n_params, len(fwd.tensors), constants, out_spec, offsets, ws_bytes,
                   renum[out_buf], out_view, guards, compiled)


# ----------------------------------------------------------------------------- the cache

_PROGRAMS = PlanCache(maxsize=256)
_SEEN = object()  # a case seen once: recorded when seen again
_NONE = object()  # a case that has no program (``record`` said why): the ops run
LAST_SKIP: List[Optional[str]] = [None]  # why the last recording made no program (tests, debugging)


def clear() -> None:
    """Forget every program."""
    _PROGRAMS.clear()


def run(body: Callable[[], torch.Tensor], x: torch.Tensor, params: Sequence, scalars: tuple,
        fwd: ForwardPrograms) -> torch.Tensor:
    """One layer: its program replayed, or ``body()`` (the layer through the ops) where there is
    none yet (recording it the second time the case is seen) or can be none.  ``params``: the
    parameters the layer's launches may read, in a fixed order; ``scalars``: every other value of
    the layer that the ops' decisions read (heads, eps)."""
    ptrs = [x.data_ptr()]
    psig = []
    for p in params:
        if p is None:
            psig.append(None)
            ptrs.append(0)
        else:
            ptr = p.data_ptr()
            ptrs.append(ptr)
            psig.append((p.shape, p.stride(), p.dtype, p.device, ptr % 16))
    key = (fwd.sig, scalars, x.shape, x.stride(), x.dtype, x.device, ptrs[0] % 16, mode_key(x.dtype),
           _launch.EPOCH[0], _launch.ENABLED[0], *psig)
    prog = _PROGRAMS.get(key)
    if prog is None:
        _PROGRAMS.put(key, _SEEN)
        return body()
    if prog is _NONE:
        return body()
    if prog is _SEEN:
        y, prog, why = record(body, x, params, fwd)
        LAST_SKIP[0] = why
        _PROGRAMS.put(key, prog if prog is not None else _NONE)
        return y
    for i, j, delta in prog.guards:
        if ptrs[i] - ptrs[j] != delta:
            return body()
    if prog.compiled and not _launch.dispatch_only():
        d = _launch.driver()
        device = d.get_current_device()
        if device == prog.device:
            return prog.run(x, ptrs, params, fwd, d, device)
    return prog.run_views(x, params, fwd)
