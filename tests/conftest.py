"""Test configuration shared by every test file.

* Without CUDA, TRITON_INTERPRET=1 is set before ``kernels`` is imported, so the Triton
  kernels run under the interpreter on CPU tensors (rung 2 of the ladder).
* ``@pytest.mark.gpu`` tests need CUDA and real compiled kernels; they skip cleanly otherwise.
* ``@pytest.mark.interpreter`` tests need the interpreter; they skip on a CUDA run
  (run ``TRITON_INTERPRET=1 pytest -m interpreter`` there to include them).
* Global switches (TF32, matmul precision, default dtype/device, deterministic algorithms,
  grad and anomaly mode, SDPA backends, cuDNN flags, torch's thread count, os.environ, the
  working directory) are snapshotted around every test and every test module and put back
  whatever happens; a test or module that leaves one changed FAILS, naming the switch.  To
  change a switch inside a test, use a fixture that restores it (``tf32_matmul`` below,
  ``monkeypatch.setenv``, or a try/finally) -- never ``monkeypatch.setattr`` on
  ``torch.backends.*`` (those modules keep their switches outside ``__dict__``, and newer
  pytest then deletes the attribute on undo instead of restoring it).
"""
import contextlib
import functools
import importlib.metadata
import json
import os
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bertfast import kernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A kernel with what the model's kernels need from the interpreter: a loop with a run-time bound,
# bf16 loads and stores.  Triton 3.6's interpreter fails it with numpy >= 2.4 ("only 0-dimensional
# arrays can be converted to Python scalars" at the loop, "'InterpreterBuilder' object has no
# attribute 'get_bf16'"): a limitation of that triton, not of bertfast.
_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def probe(x_ptr, n):
    offs = tl.arange(0, 16)
    acc = tl.zeros((16,), dtype=tl.float32)
    for _ in range(0, n):
        acc += tl.load(x_ptr + offs).to(tl.float32)
    tl.store(x_ptr + offs, acc.to(tl.bfloat16))
x = torch.ones(16, dtype=torch.bfloat16)
probe[(1,)](x, 3)
assert x.float().sum().item() == 48.0, x
"""


@functools.lru_cache(maxsize=None)
def interpreter_problem():
    """None when Triton's interpreter runs bertfast-like kernels here (checked in a subprocess
    with TRITON_INTERPRET=1), else why not, naming the triton and numpy versions."""
    if not kernels.HAS_TRITON:
        return "triton is not installed"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    import numpy
    import triton

    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    return f"the interpreter of triton {triton.__version__} cannot run kernels with numpy {numpy.__version__}: {last}"


def _installed_bertfast_problem():
    """The suite must test the bertfast a user gets from this environment, never a copy that the
    working directory happens to shadow it with.  Installed (wheel or editable): the imported
    package must be the installed one.  Not installed (a plain checkout, as on the GPU machine):
    it must come from a directory put on PYTHONPATH on purpose."""
    import bertfast

    here = os.path.realpath(os.path.dirname(bertfast.__file__))
    try:
        dist = importlib.metadata.distribution("bertfast")
    except importlib.metadata.PackageNotFoundError:
        paths = [os.path.realpath(p or ".") for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if os.path.dirname(here) in paths:
            return None
        return (f"bertfast imported from {here} is neither installed in this environment nor on PYTHONPATH "
                f"(install it, or run a plain checkout with PYTHONPATH=.)")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        url = direct.get("url", "")
        source = os.path.realpath(url[len("file://"):]) if url.startswith("file://") else None
        expected = os.path.join(source, "bertfast") if source else None
    else:
        expected = os.path.realpath(str(dist.locate_file("bertfast")))
    if expected != here:
        return f"bertfast imported from {here}, but the installed distribution is at {expected}"
    return None


def pytest_sessionstart(session):
    problem = _installed_bertfast_problem()
    if problem:
        raise pytest.UsageError(problem)
    if kernels.INTERPRET and not HAS_CUDA and interpreter_problem():
        raise pytest.UsageError(
            f"{interpreter_problem()}; the CPU test run needs a working interpreter (with triton 3.6: numpy<2.4)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (set automatically when there is no CUDA)")
    for item in items:
        if "gpu" in item.keywords and (not HAS_CUDA or kernels.INTERPRET):
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not kernels.INTERPRET:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- global switches
#
# Each switch: (name, getter, setter).  Getters and setters only use APIs present in every torch
# from 2.4 to 2.13; switches a given torch lacks are skipped.  The list is in restore order: the
# legacy matmul-precision views are coupled (setting allow_tf32 rewrites the precision and, on
# torch >= 2.9, the per-backend ``fp32_precision``), so restore runs the list twice.

_MISSING = object()


class _Unreadable:
    """A getter that raised (torch >= 2.9 refuses to read the legacy matmul precision after a mix
    of the legacy and new TF32 APIs): compared by message, never restored."""

    def __init__(self, exc):
        self.msg = f"<unreadable: {type(exc).__name__}: {str(exc)[:80]}>"

    def __eq__(self, other):
        return isinstance(other, _Unreadable) and other.msg == self.msg

    def __repr__(self):
        return self.msg


def _attr(obj_path, name):
    """Getter/setter for ``<obj>.<name>`` where obj is a dotted path under torch; None if absent."""

    def obj():
        o = torch
        for part in obj_path.split(".")[1:]:
            o = getattr(o, part)
        return o

    try:
        getattr(obj(), name)
    except Exception:  # this torch has no such switch
        return None
    return (f"{obj_path}.{name}", lambda: getattr(obj(), name), lambda v: setattr(obj(), name, v))


def _pair(name, getter, setter):
    return (name, getter, setter) if getter is not None and setter is not None else None


def _switches():
    b = torch.backends
    sw = [
        _pair("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision,
              torch.set_float32_matmul_precision),
        _attr("torch.backends.cuda.matmul", "allow_tf32"),
        _attr("torch.backends.cudnn", "allow_tf32"),
        # the per-backend precisions of the new TF32 API (torch >= 2.9); absent before
        _attr("torch.backends", "fp32_precision"),
        _attr("torch.backends.cuda.matmul", "fp32_precision"),
        _attr("torch.backends.cudnn", "fp32_precision"),
        _attr("torch.backends.cudnn.conv", "fp32_precision"),
        _attr("torch.backends.cudnn.rnn", "fp32_precision"),
        _attr("torch.backends.mkldnn", "fp32_precision"),
        _attr("torch.backends.mkldnn.matmul", "fp32_precision"),
        _attr("torch.backends.mkldnn.conv", "fp32_precision"),
        _attr("torch.backends.mkldnn.rnn", "fp32_precision"),
        _attr("torch.backends.cuda.matmul", "allow_fp16_reduced_precision_reduction"),
        _attr("torch.backends.cuda.matmul", "allow_bf16_reduced_precision_reduction"),
        _attr("torch.backends.cudnn", "enabled"),
        _attr("torch.backends.cudnn", "benchmark"),
        _attr("torch.backends.cudnn", "deterministic"),
        _pair("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
        _pair("torch.get_default_device()", getattr(torch, "get_default_device", None),
              getattr(torch, "set_default_device", None)),
        ("torch.are_deterministic_algorithms_enabled() / warn_only",
         lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
         lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
        ("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
        ("torch.is_inference_mode_enabled()", torch.is_inference_mode_enabled, None),  # check only
        ("torch.is_anomaly_enabled()", torch.is_anomaly_enabled, lambda v: torch.autograd.set_detect_anomaly(v)),
        ("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
        ("os.getcwd()", os.getcwd, os.chdir),
        ("os.environ", _environ, _restore_environ),
    ]
    for sdp in ("flash", "mem_efficient", "math", "cudnn"):
        sw.append(_pair(f"torch.backends.cuda.{sdp}_sdp_enabled()", getattr(b.cuda, f"{sdp}_sdp_enabled", None),
                        getattr(b.cuda, f"enable_{sdp}_sdp", None)))
    return [s for s in sw if s is not None]


_PYTEST_OWNED_ENV = ("PYTEST_CURRENT_TEST",)  # pytest rewrites it at each phase
# set by libraries, once per process, the first time a test imports or uses them (torch's inductor,
# the OpenMP runtime scikit-learn loads): their appearance is not a test's leak, and they stay
_LIBRARY_SET_ENV = ("TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "KMP_DUPLICATE_LIB_OK",
                    "KMP_INIT_AT_FORK")


class _Environ(dict):
    """os.environ's copy; equal to another when they differ at most by library-set variables
    appearing (not changing or disappearing)."""

    def __eq__(self, other):
        if not isinstance(other, dict):
            return NotImplemented
        keys = set(self) | set(other)
        return all(self.get(k) == other.get(k) for k in keys
                   if not (k in _LIBRARY_SET_ENV and (k not in self or k not in other)))

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq


def _environ():
    return _Environ((k, v) for k, v in os.environ.items() if k not in _PYTEST_OWNED_ENV)


def _restore_environ(saved):
    for k in [k for k in _environ() if k not in saved and k not in _LIBRARY_SET_ENV]:
        del os.environ[k]
    for k, v in saved.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


SWITCHES = _switches()


def snapshot():
    """{switch name: current value} of every global switch tests must leave as they found."""
    snap = {}
    for name, get, _ in SWITCHES:
        try:
            snap[name] = get()
        except Exception as e:
            snap[name] = _Unreadable(e)
    return snap


def _diff(before, after):
    out = []
    for name, old in before.items():
        new = after.get(name, _MISSING)
        if new == old:
            continue
        if name == "os.environ":
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                          and not (k in _LIBRARY_SET_ENV and (k not in old or k not in new)))
            out.append("os.environ[" + ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
                                                 for k in keys) + "]")
        else:
            out.append(f"{name}: {old!r} -> {new!r}")
    return out


def restore(saved):
    """Put every switch back to ``saved``; returns the switches that could not be restored."""
    for _ in range(2):  # coupled switches: a second pass settles what the first one disturbed
        now = snapshot()
        for name, _, setter in SWITCHES:
            want = saved[name]
            if setter is None or isinstance(want, _Unreadable) or now[name] == want:
                continue
            try:
                setter(want)
            except Exception:
                pass
            now = snapshot()
    return _diff(saved, snapshot())


@contextlib.contextmanager
def keep_global_switches():
    """Snapshot the switches, run the block, put them back whatever happens.  Yields the list of
    leaks found on exit (filled in after the block)."""
    saved = snapshot()
    leaks = []
    try:
        yield leaks
    finally:
        leaks.extend(_diff(saved, snapshot()))
        if leaks:
            stuck = restore(saved)
            if stuck:
                leaks.append("COULD NOT RESTORE: " + "; ".join(stuck))


def _fail_on_leaks(what, leaks):
    if leaks:
        pytest.fail(f"{what} left global switches changed (now restored): " + "; ".join(leaks), pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _module_keeps_global_switches(request):
    """Module-scoped fixtures (e.g. one intra-op thread for a module) must also clean up."""
    with keep_global_switches() as leaks:
        yield
    _fail_on_leaks(f"test module {request.node.nodeid}", leaks)


@pytest.fixture(autouse=True)
def _test_keeps_global_switches(request):
    with keep_global_switches() as leaks:
        yield
    _fail_on_leaks(request.node.nodeid, leaks)


@contextlib.contextmanager
def _tf32(allow):
    saved = snapshot()
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        stuck = restore(saved)
        assert not stuck, stuck


@pytest.fixture
def tf32_matmul():
    """``with tf32_matmul(True): ...`` runs the block with ``torch.backends.cuda.matmul.allow_tf32``
    set, and restores every switch after it, whatever happens (works on torch 2.4 .. 2.13)."""
    return _tf32


@pytest.fixture
def count_calls(monkeypatch):
    """``n = count_calls(owner, "name")``: ``owner.name`` counts its calls in ``n[0]`` for the rest
    of the test (restored after)."""

    def count(owner, name):
        calls = [0]
        orig = getattr(owner, name)

        def counted(*a, **k):
            calls[0] += 1
            return orig(*a, **k)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return count


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models and inputs run as fast on one thread, and on a shared 2-core machine OpenMP
    spin-waiting makes two threads several times slower under load.  Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
