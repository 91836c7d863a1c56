"""Tolerances per dtype and comparison helpers: the single place tests (and benchmarks'
correctness checks) take their tolerances from."""
from __future__ import annotations

import contextlib

import torch

# (atol, rtol) for an output of this dtype compared with the fp32-math reference cast to the
# same dtype.  One rounding of the output is 2**-24 (fp32), 2**-11 (fp16), 2**-8 (bf16) relative;
# the bounds leave room for a few roundings plus a different fp32 summation order.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Gradients pass through more roundings (and reductions over the batch): a fixed, stated factor.
GRAD_FACTOR = 4.0


def tolerance(dtype: torch.dtype, factor: float = 1.0) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol * factor, "rtol": rtol * factor}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, factor: float = 1.0, msg: str = "") -> None:
    """Compare with the tolerance of ``actual``'s dtype; NaN anywhere fails."""
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{msg} output holds NaN (an element was not written?)"
    torch.testing.assert_close(
        actual.float().cpu(), expected.to(actual.dtype).float().cpu(), **tolerance(actual.dtype, factor), msg=msg or None
    )


def nan_like(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """An output buffer pre-filled with NaN, so that an element the kernel forgets to write fails."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


@contextlib.contextmanager
def count_host_reads():
    """Counts the ways a tensor's values reach the host while the block runs (``tolist``,
    ``item``, ``bool``/``int``/``float`` of a tensor, ``nonzero``): ``with count_host_reads() as n:
    ...; n[0]``.  Patches ``torch.Tensor`` for the block and restores it whatever happens."""
    n = [0]
    patched = []

    def wrap(owner, name):
        orig = getattr(owner, name)

        def counted(*a, **k):
            n[0] += 1
            return orig(*a, **k)

        setattr(owner, name, counted)
        patched.append((owner, name, orig))

    try:
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
            wrap(torch.Tensor, name)
        wrap(torch, "nonzero")
        yield n
    finally:
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)


@contextlib.contextmanager
def record_launches():
    """Run the launchers on CPU tensors as if on a GPU, with every Triton kernel launch recorded
    instead of run: ``with record_launches() as calls: ...``; ``calls`` is a list of
    (kernel name, grid).  Outputs hold whatever ``torch.empty`` gave: for measuring what the host
    does around launches (bertfast bench host), never for results.  Restores everything on exit."""
    import triton.runtime.jit as jit

    from bertfast.kernels import _common

    calls: list = []

    def getitem(self, grid):
        name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "kernel")

        def launch(*args, **kwargs):
            calls.append((name, tuple(grid) if isinstance(grid, (tuple, list)) else grid))

        return launch

    from bertfast.kernels import _launch
    from bertfast.kernels._launch import Kernel

    classes = [jit.JITFunction, Kernel]
    try:  # kernels decorated under TRITON_INTERPRET=1 are InterpretedFunctions
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    saved = [(c, c.__dict__.get("__getitem__")) for c in classes]
    planned = Kernel.planned
    token = _common._RECORDING.set(calls)
    for c in classes:
        c.__getitem__ = getitem

    def kernel_getitem(self, grid):  # reported to a launch observer first (bertfast/program.py)
        obs = _launch.OBSERVE.get()
        if obs is None:
            return getitem(self, grid)

        def launch(*args, **kwargs):
            return obs(self, grid, args, kwargs, lambda: getitem(self, grid)(*args, **kwargs))

        return launch

    Kernel.__getitem__ = kernel_getitem
    Kernel.planned = lambda self, memo, grid, args, kwargs: kernel_getitem(self, grid)(*args, **kwargs)
    at_dispatch = _launch.RECORDING_AT_DISPATCH[0]
    _launch.RECORDING_AT_DISPATCH[0] = True  # layer programs replay through kernel[grid] (recorded)
    try:
        yield calls
    finally:
        _launch.RECORDING_AT_DISPATCH[0] = at_dispatch
        for c, orig in saved:
            if orig is None:
                del c.__getitem__
            else:
                c.__getitem__ = orig
        Kernel.planned = planned
        _common._RECORDING.reset(token)
