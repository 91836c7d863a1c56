"""Pre-flight defect (issue 21): the TF32 switch read by every GEMM plan.

``bertfast.kernels._common.tf32_allowed`` used to read ``torch.backends.cuda.matmul.allow_tf32``
for every plan, fp16 included.  From torch 2.9, once anything has used the new precision API
(``torch.backends.cuda.matmul.fp32_precision = "tf32"``), that legacy read raises RuntimeError
("mix of legacy and new APIs"), so every bertfast GEMM failed.  Now the switch is read through
the API the running torch has, and only fp32 consults it.  Every test puts the switches back
(the conftest checks it)."""
import contextlib

import pytest
import torch

from bertfast.kernels import _common
from bertfast.kernels._common import mode_key, tf32_allowed

NEW_API = hasattr(torch.backends, "fp32_precision")  # torch >= 2.9


@contextlib.contextmanager
def kept_precisions():
    """Put back every switch ``torch.set_float32_matmul_precision`` and the new API write: the
    legacy precision, then (torch >= 2.9) the per-backend matmul precisions and the generic one."""
    before = torch.get_float32_matmul_precision()
    owners = [torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul] if NEW_API else []
    saved = [o.fp32_precision for o in owners]
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        for o, v in zip(owners, saved):
            o.fp32_precision = v


@contextlib.contextmanager
def new_api(matmul=None, generic=None):
    """Set the new API's matmul (and generic) fp32 precision for the block; put everything back."""
    with kept_precisions():
        if generic is not None:
            torch.backends.fp32_precision = generic
        if matmul is not None:
            torch.backends.cuda.matmul.fp32_precision = matmul
        yield


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the legacy allow_tf32 switch")
def test_new_api_makes_the_legacy_read_raise_but_not_ours():
    with new_api(matmul="tf32"):
        with pytest.raises(RuntimeError):  # what the old tf32_allowed read
            torch.backends.cuda.matmul.allow_tf32
        assert tf32_allowed() is True
        assert tf32_allowed(torch.float32) is True
        assert mode_key(torch.float32)[2] is True
        assert tf32_allowed(torch.float16) is False and tf32_allowed(torch.bfloat16) is False
    with new_api(matmul="ieee"):
        assert tf32_allowed() is False
    with new_api(matmul="none", generic="tf32"):  # the matmul precision inherits the generic one
        with pytest.raises(RuntimeError):
            torch.backends.cuda.matmul.allow_tf32
        assert tf32_allowed() is True
    with new_api(matmul="none", generic="none"):  # torch's default: IEEE fp32 matmuls
        assert tf32_allowed() is False


def test_legacy_switches_still_count(tf32_matmul):
    with tf32_matmul(True):
        assert tf32_allowed() is True and mode_key(torch.float32)[2] is True
        assert tf32_allowed(torch.float16) is False and mode_key(torch.float16)[2] is False
    with tf32_matmul(False):
        assert tf32_allowed() is False
    with kept_precisions():
        torch.set_float32_matmul_precision("high")  # TF32 allowed for fp32 matmuls
        assert tf32_allowed() is True
        torch.set_float32_matmul_precision("highest")
        assert tf32_allowed() is False


class _Unreadable:
    """A matmul switch object that refuses every read (what a read of a mixed legacy / new API
    state does), and counts the reads."""

    def __init__(self):
        self.reads = 0

    def __getattr__(self, name):
        self.reads += 1
        raise RuntimeError(f"mix of legacy and new APIs ({name})")


def test_half_precision_never_reads_the_switch(monkeypatch):
    fake = _Unreadable()
    # torch.backends.cuda is a plain module (its ``matmul`` lives in its __dict__): monkeypatch restores it
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    for dt in (torch.float16, torch.bfloat16):
        assert tf32_allowed(dt) is False
        assert mode_key(dt) == (_common.INTERPRET, False, False, _common.TUNE_EPOCH[0])
    assert fake.reads == 0
    with pytest.raises(RuntimeError, match="mix of legacy"):  # fp32 does consult it
        tf32_allowed(torch.float32)
    assert fake.reads == 1


@pytest.mark.interpreter
@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the legacy allow_tf32 switch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_runs_after_the_new_api_was_used(dtype):
    """The defect end to end: a Triton GEMM (the interpreter here) after
    ``fp32_precision = "tf32"``: it raised RuntimeError from the plan before; now it runs and
    matches the reference (fp32 in TF32 precision: within TF32's rounding)."""
    from bertfast.kernels import linear
    from bertfast.kernels.testing import assert_close

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 32, generator=g).to(dtype)
    w = (torch.randn(40, 32, generator=g) * 0.2).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    with new_api(matmul="tf32"):
        got = linear(x, w, b)
    assert_close(got, want, factor=1.0 if dtype != torch.float32 else 30.0, msg=str(dtype))
