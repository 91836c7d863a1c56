"""Direct launches (bertfast.kernels._launch, issue 21): after Triton's own dispatch has launched a
kernel once, later calls hand the same arguments to the same compiled kernel's launcher.  Checked
on CPU against Triton's dispatch itself, run in full against a stand-in sm_90 driver (``fake_gpu``:
nothing compiled, the C launcher recorded)."""
import os
import subprocess
import sys

import pytest
import torch

from bertfast.kernels._common import INTERPRET

triton = pytest.importorskip("triton")

# Kernels are interpreted or compiled from the moment they are decorated, and the suite runs under
# the interpreter where there is no GPU: there, test_in_a_compiled_process runs this file again in
# a process without the interpreter, and the tests below skip in this one.
compiled_only = pytest.mark.skipif(INTERPRET, reason="run by test_in_a_compiled_process (kernels are interpreted "
                                                     "in this process)")


@pytest.mark.skipif(not INTERPRET, reason="this process runs the tests itself")
def test_in_a_compiled_process():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "-k", "not test_in_a_compiled_process", __file__], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "deselected" in last, tail

from bertfast.kernels import _launch  # noqa: E402


@pytest.fixture
def direct():
    """Set the direct-launch switch for one test (``direct(on)``); restored after."""
    with _launch.direct_launches(_launch.ENABLED[0]):
        yield lambda on: _launch.ENABLED.__setitem__(0, on)


def _norm(launch):
    """A recorded launch with its tensors as what the kernel sees of them (the buffers differ
    between runs): dtype, shape, strides, address alignment."""
    name, grid, key, args = launch
    return name, grid, key, tuple((a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16)
                                  if isinstance(a, torch.Tensor) else a for a in args)


def test_flat_key_is_the_specializations():
    """The launch key (``_specs``: flat, ints as 4-bit codes) tells two argument lists apart exactly
    when their per-argument ``_spec`` differ: 20,000 random lists of tensors (dtype, alignment),
    parameters, ints at every boundary Triton specializes on, floats, bools and None."""
    import random

    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64, dtype=torch.bfloat16)
    values = [x, x[1:], x[8:], y, y[3:], torch.nn.Parameter(torch.zeros(3)), 0, 1, 2, 16, 17, 32, 2**31 - 1,
              2**31 + 16, -2**31, -2**31 - 1, 2**63, 2**64 - 1, 1.5, True, False, None]
    rng = random.Random(0)
    flat_of, spec_of = {}, {}
    for _ in range(20000):
        args = tuple(rng.choice(values) for _ in range(rng.randint(1, 6)))
        flat, specs = _launch._specs(args), tuple(map(_launch._spec, args))
        assert flat_of.setdefault(specs, flat) == flat and spec_of.setdefault(flat, specs) == specs, args
    assert len(spec_of) > 10000


@compiled_only
def test_planned_launch_remembers_per_alignment_and_verifies(direct):
    """``Kernel.planned``: a plan's memo holds one compiled kernel per tensor alignment (the second
    call of each finds it, Triton's dispatch does not run); under VERIFY an argument the plan
    should have fixed but that changed (here an int that becomes 1) is caught, not launched with
    the wrong kernel."""
    import importlib

    al = importlib.import_module("bertfast.kernels.add_layernorm")
    kernel = al._add_layernorm_fwd_kernel
    buf = torch.zeros(4096, dtype=torch.float16)
    kw = dict(HAS_XBIAS=False, ROWS=1, BLOCK_N=64, num_warps=4)

    def args(x, m=8):
        return (x, x, x, x, x, x, buf.float(), buf.float(), m, 64, 64, 64, 64, 1e-5, 0)

    direct(True)
    memo = {}
    with _launch.fake_gpu(keep_args=True) as launches:
        for x in (buf[:1024], buf[1:1025], buf[:1024], buf[1:1025]):  # 16-byte aligned, not
            kernel.planned(memo, (2,), args(x), kw)
        assert len([k for k in memo if k != _launch._TENSOR_POSITIONS]) == 2 and len(launches) == 4
        keys = [launch[2] for launch in launches]
        assert keys[0] == keys[2] != keys[1] == keys[3]  # Triton's own cache keys
        with _launch.verify_launches(), pytest.raises(AssertionError, match="not the one its arguments select"):
            kernel.planned(memo, (2,), args(buf[:1024], m=1), kw)


def _model(layers=2):
    from bertfast import BertConfig, BertModel

    cfg = BertConfig.preset("bert-base", backend="triton", num_hidden_layers=layers, vocab_size=1000)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).to(torch.float16).eval()


@compiled_only
@pytest.mark.parametrize("unpad", [True, False])
def test_model_forward_launches_what_triton_launches(direct, unpad, monkeypatch):
    """Three forwards (full, right-padded, left-padded with a hole) under Triton's dispatch and
    under direct launches: the same kernels, grids, compiled kernels (Triton's cache keys) and
    arguments, launch for launch; the direct path really ran (its launches are not Triton's).
    Through the ops (layer programs off: their launches are checked below)."""
    from bertfast import program

    monkeypatch.setattr(program, "ENABLED", [False])
    model = _model()
    model.set_backend("triton", unpad=unpad)
    ids = torch.randint(1, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    masks = [torch.ones(3, 24, dtype=torch.long), torch.ones(3, 24, dtype=torch.long),
             torch.ones(3, 24, dtype=torch.long)]
    masks[1][1, 15:] = 0
    masks[1][2, 5:] = 0
    masks[2][0, :7] = 0
    masks[2][2, 10:12] = 0
    runs = {}
    for on in (False, True):
        direct(on)
        # VERIFY: every launch a launch plan remembered (Kernel.planned) is checked against the full key
        with torch.no_grad(), _launch.fake_gpu(keep_args=True) as launches, _launch.verify_launches():
            for _ in range(2):
                for mask in masks:
                    model(input_ids=ids, attention_mask=mask)
        runs[on] = [_norm(x) for x in launches]
    assert len(runs[True]) == len(runs[False]) > 6 * 2 * 3
    assert runs[True] == runs[False]
    # the second round of forwards took the direct path: Triton's dispatch ran only for new keys
    counted = {}

    def count_jit(self, *a, **k):
        counted["jit"] = counted.get("jit", 0) + 1
        return run(self, *a, **k)

    from triton.runtime.jit import JITFunction

    run = JITFunction.run
    direct(True)
    with torch.no_grad(), _launch.fake_gpu() as launches:
        model(input_ids=ids, attention_mask=masks[0])
        first = len(launches)
        JITFunction.run = count_jit
        try:
            model(input_ids=ids, attention_mask=masks[0])
        finally:
            JITFunction.run = run
    assert len(launches) == 2 * first and counted.get("jit", 0) == 0


@compiled_only
def test_key_refines_triton_specialization(direct):
    """Arguments that differ only in what Triton specializes on (address alignment, dtype, ints
    equal to 1, divisible by 16, beyond 32 bits, a float, None): each call gets the compiled
    kernel Triton's dispatch would pick, launch for launch."""
    import importlib

    al = importlib.import_module("bertfast.kernels.add_layernorm")
    kernel = al._add_layernorm_fwd_kernel
    base = torch.zeros(4096, dtype=torch.float16)
    calls = []
    for dtype in (torch.float16, torch.bfloat16):
        buf = base.to(dtype)
        for off in (0, 1, 8):
            x = buf[off:off + 1024]
            for m in (1, 2, 16, 17, 2**31 + 16):
                for eps in (1e-5, 1e-12):
                    calls.append(((x, x, x, x, x, x, base.float(), base.float(), m, 64, 64, 64, 64, eps, 0),
                                  dict(HAS_XBIAS=False, ROWS=1, BLOCK_N=64, num_warps=4)))
    calls += calls[::-1]  # the second pass finds every key remembered
    seen = {}
    for on in (False, True):
        direct(on)
        with _launch.fake_gpu(keep_args=True) as launches:
            for args, kw in calls:
                kernel[(3, 1)](*args, **kw)
        seen[on] = [_norm(x) for x in launches]
    assert seen[True] == seen[False]
    assert len({x[2] for x in seen[False]}) >= 8  # the cases do reach different compiled kernels


@compiled_only
def test_triton_dispatch_where_the_key_does_not_apply(direct):
    """A launch hook (a profiler), a callable grid and an argument type the key does not model go
    through Triton's dispatch every time."""
    import importlib

    from triton import knobs

    al = importlib.import_module("bertfast.kernels.add_layernorm")
    kernel = al._add_layernorm_fwd_kernel
    x = torch.zeros(1024, dtype=torch.float16)
    args = (x, x, x, x, x, x, x.float(), x.float(), 8, 64, 64, 64, 64, 1e-5, 0)
    kw = dict(HAS_XBIAS=False, ROWS=1, BLOCK_N=64, num_warps=4)
    direct(True)
    hooked = []
    with _launch.fake_gpu() as launches:
        kernel[(2,)](*args, **kw)
        assert len(kernel._cache) == 1
        knobs.runtime.launch_enter_hook.add(hooked.append)
        try:
            assert _launch._hooks_set()
            kernel[(2,)](*args, **kw)
        finally:
            knobs.runtime.launch_enter_hook.remove(hooked.append)
        assert not _launch._hooks_set()
        kernel[lambda meta: (2,)](*args, **kw)
        with pytest.raises(_launch._Unsupported):
            _launch._spec(object())
    assert len(launches) == 3 and len(hooked) == 1  # Triton called the hook: its dispatch ran
    assert not kernel._cache  # forgotten on leaving the stand-in


@compiled_only
def test_fake_gpu_restores_everything():
    """The stand-in driver, the compile hook, Triton's per-device caches and the remembered kernels
    are all put back; a launch outside it refuses CPU tensors as before."""
    import importlib

    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from bertfast.kernels import _common

    al = importlib.import_module("bertfast.kernels.add_layernorm")
    before = (driver._active, JITFunction.__dict__["_do_compile"], _common._RECORDING.get())
    x = torch.zeros(64, 32, dtype=torch.float16)
    w = torch.ones(32, dtype=torch.float16)
    with _launch.fake_gpu() as launches:
        al.add_layernorm(x, x, w, w)
        assert launches and _common.recording_launches()
    assert (driver._active, JITFunction.__dict__["_do_compile"], _common._RECORDING.get()) == before
    fn = al._add_layernorm_fwd_kernel.fn
    assert _launch._FAKE_DEVICE not in fn.device_caches and not al._add_layernorm_fwd_kernel._cache
    with pytest.raises(ValueError, match="CUDA tensors"):
        al.add_layernorm(x, x, w, w)


@compiled_only
def test_every_launched_kernel_is_direct():
    """Every kernel a launcher starts is a ``_launch.Kernel`` (module-level names of the op
    modules that are triton.jit functions launched from the host are wrapped); the compile check
    sees the wrapped triton.jit function."""
    import importlib

    from triton.runtime.jit import JITFunction

    from bertfast.kernels import OP_MODULES

    found = []
    for mod_name in set(OP_MODULES.values()) | {"_gemm"}:
        mod = importlib.import_module(f"bertfast.kernels.{mod_name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, _launch.Kernel):
                assert isinstance(obj.launched_fn, JITFunction), name
                found.append(name)
    assert {"_attn_fwd", "_attn_bwd_dq", "_add_layernorm_fwd_kernel", "_embeddings_layernorm_fwd_kernel",
            "gemm_kernel"} <= set(found), found


@compiled_only
def test_switch_off_by_environment():
    """BERTFAST_DIRECT_LAUNCH=0: every launch through Triton's dispatch (read once, at import)."""
    code = "from bertfast.kernels import _launch; print(_launch.ENABLED[0])"
    env = {**os.environ, "BERTFAST_DIRECT_LAUNCH": "0"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _same_launches(ops_run, prog_run):
    """Launch for launch: kernel, grid, Triton's cache key, and every argument but the addresses
    (tensors through the ops, ints from a layer program; TMA descriptors compared but for their base)."""
    assert len(ops_run) == len(prog_run)
    for (n1, g1, k1, a1), (n2, g2, k2, a2) in zip(ops_run, prog_run):
        assert (n1, g1, k1) == (n2, g2, k2)
        assert len(a1) == len(a2), n1
        for x, y in zip(a1, a2):
            if isinstance(x, torch.Tensor):
                assert type(y) is int or isinstance(y, torch.Tensor), (n1, x, y)
            elif hasattr(x, "base") and hasattr(x, "block_shape"):
                assert (x.shape, x.strides, x.block_shape) == (y.shape, y.strides, y.block_shape), n1
            else:
                assert type(x) is type(y) and x == y, (n1, x, y)


@compiled_only
@pytest.mark.parametrize("shape,unpad", [((3, 24), True), ((3, 24), False), ((32, 128), False)])
def test_layer_programs_launch_what_the_ops_launch(direct, shape, unpad, monkeypatch, count_calls):
    """Layer programs (bertfast/program.py) replayed with the compiled kernels, for three masks
    (full, right-padded, left-padded with a hole; at (32, 128) the plain GEMMs take the TMA kernel,
    whose descriptors are rebuilt through Triton's dispatch): the same kernels, grids, compiled
    kernels (Triton's cache keys) and other arguments as the ops, launch for launch; under VERIFY
    every address passed is the one of the view a launch through ``kernel[grid]`` passes (those
    replays are checked bit for bit against the ops in tests/test_program.py); Triton's dispatch
    runs only for the TMA launches."""
    from triton.runtime.jit import JITFunction

    from bertfast import program

    monkeypatch.setattr(program, "_PROGRAMS", program.PlanCache())
    monkeypatch.setattr(program, "ENABLED", [False])
    replays = count_calls(program.Program, "run")
    model = _model(layers=3)
    model.set_backend("triton", unpad=unpad)
    b, s = shape
    ids = torch.randint(1, 1000, (b, s), generator=torch.Generator().manual_seed(1))
    masks = [torch.ones(b, s, dtype=torch.long) for _ in range(3)]
    masks[1][1, s // 2:] = 0
    masks[1][2, 5:] = 0
    masks[2][0, :7] = 0
    masks[2][2, 10:12] = 0
    direct(True)
    with torch.no_grad(), _launch.fake_gpu(keep_args=True) as launches, _launch.verify_launches():
        for mask in masks:
            model(input_ids=ids, attention_mask=mask)
        ops_run = list(launches)
        program.ENABLED[0] = True
        for _ in range(2):  # each case seen, recorded, replayed from the third layer on
            for mask in masks:
                model(input_ids=ids, attention_mask=mask)
        n, replays[0] = len(launches), 0
        jit = count_calls(JITFunction, "run")
        for mask in masks:
            model(input_ids=ids, attention_mask=mask)
        prog_run = launches[n:]
    assert replays[0] == 3 * 3  # every layer of the last round
    _same_launches(ops_run, prog_run)
    tma = sum(1 for launch in prog_run if launch[0] == "gemm_tma_kernel")
    assert jit[0] == tma and (tma > 0) == (shape == (32, 128))


@compiled_only
def test_bench_host_counts_the_launches_of_replayed_layers():
    """``bertfast bench host`` on the stand-in GPU (this process: compiled kernels): layers replayed
    from their programs still count their launches (``record_launches`` sends a replay through
    ``kernel[grid]``), 7 a layer, and the three timed paths run."""
    from bertfast.bench.host import measure

    cases = [{"B": 1, "S": 16, "lengths": "full", "inputs": "host"},
             {"B": 2, "S": 16, "lengths": "mixed", "inputs": "device"}]
    doc = measure("minilm", cases=cases, repeat=3, warmup=3, transformers_rows=False, num_hidden_layers=3)
    for row in doc["rows"]:
        assert row["launches"] == 1 + 7 * 3 and row["launches_per_layer"] == 7, row
        assert row["host_us"]["n"] == row["ops_us"]["n"] == row["triton_dispatch_us"]["n"] == 3
