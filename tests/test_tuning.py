"""The tuner (kernels/tuning.py) on CPU, with a fake timer and a fake device key: candidate lists,
shape-class and device keys, the choice (fastest valid candidate, margin, dropped candidates),
the cache file (round trip, atomic writes, corrupt / stale / unwritable files), the modes and the
no-timing guards; the new candidates' kernels (split-K GEMM, cuBLAS, short-sequence attention
tiles) run under the interpreter against the reference; ``bertfast tune`` on a machine without
CUDA.  The compile rung of the new candidates is in tests/test_compile.py."""
import json
import sys

import pytest
import torch

from bertfast.kernels import _common, _gemm, tuning
from bertfast.kernels.linear import linear_reference
from bertfast.kernels.testing import assert_close, nan_like

A = sys.modules["bertfast.kernels.attention"]  # the package attribute ``bertfast.kernels.attention`` is the function
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CPU = torch.device("cpu")


def _fake_timer(times, calls=None):
    """timer(name, fn) -> times[name] (ms); runs fn once so a candidate that breaks while timed fails."""
    def timer(name, fn):
        fn()
        if calls is not None:
            calls.append(name)
        return times[name]

    return timer


def _tuner(tmp_path, times=None, *, mode="tune", can_time=True, calls=None, **kw):
    return tuning.Tuner(timer=_fake_timer(times or {}, calls), device_key=lambda d: "Fake GPU|sm_90|triton x|torch y",
                        can_time=lambda d: can_time, path=tmp_path / "tuning.json", mode=mode, **kw)


def _toy_problem(outputs, key="toy M<=16", ref=1.0):
    """Candidates a, b, c, ...; run(name) returns outputs[name] (an exception instance is raised)."""
    cands = tuple(tuning.Candidate(n, n) for n in outputs)

    def bench():
        def run(value):
            out = outputs[value]
            if isinstance(out, Exception):
                raise out
            return torch.tensor([out])

        return run, lambda y: bool(torch.allclose(y, torch.tensor([ref])))

    return tuning.Problem("toy", key, cands, bench, "toy shape")


def _gemm_problem(M=64, N=256, K=512, dtype=F16, **flags):
    args = dict(activation=_gemm.ACT_NONE, has_bias=False, has_pre=False, head_split=None)
    args.update(flags)
    return tuning.gemm_problem(M, N, K, dtype, CPU, (9, 0), False, **args)


# ----------------------------------------------------------------------------- candidate lists
def test_gemm_candidates():
    for cap in ((9, 0), (8, 0), (8, 9)):
        for dtype in (F16, BF16, F32):
            for M, N, K in ((8, 768, 768), (128, 768, 3072), (4096, 768, 3072), (4096, 3072, 768)):
                plain = _gemm.gemm_candidates(M, N, K, dtype, cap, False, plain=True)
                fused = _gemm.gemm_candidates(M, N, K, dtype, cap, False, plain=False)
                # the default first, every table entry, unique names
                assert plain[0] == _gemm.pick_config(M, N, K, dtype, cap, False, plain=True)
                assert fused[0] == _gemm.pick_config(M, N, K, dtype, cap, False)
                assert set(_gemm.gemm_configs(dtype, cap, False)) <= set(plain)
                assert set(_gemm.gemm_configs(dtype, cap, False)) <= set(fused)
                assert len({c.name for c in plain}) == len(plain)
                # cuBLAS / split-K only where no fusion is lost
                assert _gemm.CUBLAS in plain and _gemm.CUBLAS not in fused
                assert all(c.split_k == 1 for c in fused)
                splits = [c for c in plain if c.split_k > 1]
                if dtype == F32 or M >= 4096 or cap == (8, 9):
                    assert not splits, (cap, dtype, M)
                tma = [c for c in plain if c.library == "tma"]
                assert bool(tma) == (cap == (9, 0) and dtype != F32)
                assert not any(c.library == "tma" for c in fused)
    # small M, N = 768: split-K offered, each split keeps >= 2 K steps
    c = _gemm.gemm_candidates(128, 768, 768, F16, (9, 0), False, plain=True)
    assert sorted(x.split_k for x in c if x.split_k > 1) == [2, 4]
    c = _gemm.gemm_candidates(128, 768, 3072, F16, (9, 0), False, plain=True)
    assert sorted(x.split_k for x in c if x.split_k > 1) == [2, 4, 8]


def test_attention_candidates():
    for cap in ((9, 0), (8, 0)):
        for D in A.HEAD_DIMS:
            for add in (False, True):
                short = A.attention_candidates(D, F16, 128, cap, additive_mask=add)
                assert short[0] == A.attention_config(D, F16, 128, cap, interpret=False, additive_mask=add)["fwd"]
                if (cap, D, add) == ((8, 0), 64, True):  # the short tiles spill there (triton 3.6): none offered
                    assert len(short) == 1
                else:
                    assert len(short) > 1
                assert len(set(short)) == len(short)
                assert len({A.config_name(c) for c in short}) == len(short)
                if add:
                    assert all(c.num_stages <= 2 for c in short)
                # long sequences and fp32: only the table's tile (nothing to tune)
                assert len(A.attention_candidates(D, F16, 512, cap, additive_mask=add)) == 1
                assert len(A.attention_candidates(D, F32, 64, cap, additive_mask=add)) == 1


# ----------------------------------------------------------------------------- keys
def test_shape_class_keys():
    k = lambda **kw: _gemm_problem(**kw).key  # noqa: E731
    assert k(M=100) == k(M=128) == k(M=65) != k(M=129) != k(M=64)
    assert k(M=1) == k(M=16)  # the smallest class
    assert k(dtype=F16) != k(dtype=BF16)
    assert k(N=768) != k(N=256) and k(K=768) != k(K=512)
    assert k() != k(has_bias=True) != k(has_bias=True, activation=_gemm.ACT_GELU)
    assert k(has_bias=True, activation=_gemm.ACT_GELU) != k(has_bias=True, activation=_gemm.ACT_GELU, has_pre=True)
    assert "qkv" in k(N=768, K=256, has_bias=True, head_split=(16, 64, 256))
    ctx = A.TuneContext(CPU, 2, 12, False, A.MASK_LENS, False)
    ak = lambda S=128, **kw: tuning.attention_problem(64, F16, S, (9, 0), False, ctx._replace(**kw)).key  # noqa: E731
    assert ak(100) == ak(128) != ak(64)
    assert ak() != ak(causal=True) != ak(varlen=True) != ak(mask_kind=A.MASK_KEYS)
    assert ak(batch=1) == ak(batch=32)  # the batch is timed, not keyed


def test_device_key(monkeypatch):
    import triton

    monkeypatch.setattr(tuning, "_DEVICE_KEYS", {})
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    key = tuning.device_key(torch.device("cuda"))
    assert key == f"NVIDIA H200|sm_90|triton {triton.__version__}|torch {torch.__version__}"
    assert tuning.device_key(torch.device("cuda:0")) == key
    assert tuning.device_key(CPU) is None
    monkeypatch.setattr(_common, "INTERPRET", True)
    assert tuning.device_key(torch.device("cuda")) is None


def test_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.ENV_CACHE, str(tmp_path / "x.json"))
    assert tuning.cache_path() == tmp_path / "x.json"
    monkeypatch.delenv(tuning.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_path() == tmp_path / "bertfast" / "tuning.json"


# ----------------------------------------------------------------------------- the choice
def test_fastest_valid_candidate_is_chosen_and_stored(tmp_path):
    t = _tuner(tmp_path, {"a": 2.0, "b": 1.0, "c": 0.5, "d": 0.1})
    p = _toy_problem({"a": 1.0, "b": 1.0, "c": 9.0, "d": RuntimeError("out of resources: shared memory")})
    assert t.choose(p, CPU).name == "b"  # c mismatches, d fails: dropped, never chosen
    d = t.decisions[("Fake GPU|sm_90|triton x|torch y", p.key)]
    assert (d.choice, d.default, d.source) == ("b", "a", "tuned")
    assert d.times_ms == {"a": 2.0, "b": 1.0}
    assert d.dropped["c"] == "output does not match the reference" and "out of resources" in d.dropped["d"]
    doc = json.loads((tmp_path / "tuning.json").read_text())
    assert doc["schema"] == tuning.SCHEMA
    entry = doc["devices"]["Fake GPU|sm_90|triton x|torch y"][p.key]
    assert entry["choice"] == "b" and entry["default"] == "a" and set(entry["dropped"]) == {"c", "d"}
    assert [f.name for f in tmp_path.iterdir()] == ["tuning.json"]  # no temporary file left behind


def test_default_kept_within_margin(tmp_path):
    t = _tuner(tmp_path, {"a": 1.0, "b": 1.0 / (1 + tuning.MARGIN / 2)})
    assert t.choose(_toy_problem({"a": 1.0, "b": 1.0}), CPU).name == "a"
    t = _tuner(tmp_path / "2", {"a": 1.0, "b": 1.0 / (1 + 2 * tuning.MARGIN)})
    assert t.choose(_toy_problem({"a": 1.0, "b": 1.0}), CPU).name == "b"


def test_every_candidate_fails_gives_default(tmp_path):
    t = _tuner(tmp_path, {"a": 1.0, "b": 1.0})
    p = _toy_problem({"a": ValueError("boom"), "b": 5.0})
    assert t.choose(p, CPU).name == "a"
    assert set(t.decisions[("Fake GPU|sm_90|triton x|torch y", p.key)].dropped) == {"a", "b"}


def test_single_candidate_never_timed(tmp_path):
    calls = []
    t = _tuner(tmp_path, {"a": 1.0}, calls=calls)
    assert t.choose(_toy_problem({"a": 1.0}), CPU).name == "a"
    assert calls == [] and not (tmp_path / "tuning.json").exists()


def test_cached_choice_reused_without_timing(tmp_path):
    p = _toy_problem({"a": 1.0, "b": 1.0})
    _tuner(tmp_path, {"a": 2.0, "b": 1.0}).choose(p, CPU)
    calls = []
    for mode in ("cached", "tune"):
        t = _tuner(tmp_path, {"a": 0.1, "b": 9.0}, calls=calls, mode=mode)
        assert t.choose(p, CPU).name == "b" and calls == []
        assert t.decisions[("Fake GPU|sm_90|triton x|torch y", p.key)].source == "cache"
    t = _tuner(tmp_path, {"a": 0.1, "b": 9.0}, calls=calls, mode="tune")
    t.retune = True  # bertfast tune --force: time again, once per process
    assert t.choose(p, CPU).name == "a" and sorted(calls) == ["a", "b"]
    assert t.choose(p, CPU).name == "a" and len(calls) == 2
    # another GPU (device key) does not see the choice
    other = tuning.Tuner(timer=_fake_timer({}), device_key=lambda d: "Other GPU", can_time=lambda d: False,
                         path=tmp_path / "tuning.json", mode="cached")
    assert other.choose(p, CPU).name == "a"


def test_modes(tmp_path, monkeypatch):
    p = _toy_problem({"a": 1.0, "b": 1.0})
    calls = []
    monkeypatch.delenv(tuning.ENV_MODE, raising=False)
    t = _tuner(tmp_path, {"a": 2.0, "b": 1.0}, calls=calls, mode=None)
    assert t.mode == "cached" and t.choose(p, CPU).name == "a" and calls == []  # default: nothing timed
    monkeypatch.setenv(tuning.ENV_MODE, "1")
    assert t.mode == "tune" and t.choose(p, CPU).name == "b" and sorted(calls) == ["a", "b"]
    monkeypatch.setenv(tuning.ENV_MODE, "off")
    assert t.mode == "off" and t.choose(p, CPU).name == "a"  # stored choice ignored
    monkeypatch.setenv(tuning.ENV_MODE, "0")
    assert t.choose(p, CPU).name == "b"
    monkeypatch.setenv(tuning.ENV_MODE, "sometimes")
    with pytest.warns(RuntimeWarning, match="BERTFAST_AUTOTUNE"):
        assert t.mode == "cached"
    with pytest.raises(ValueError, match="tuning mode"):
        t.set_mode("fast")


def test_no_timing_when_impossible(tmp_path):
    """During capture / tracing (can_time False) the default is used and not remembered: a later
    call where timing is possible tunes."""
    p = _toy_problem({"a": 1.0, "b": 1.0})
    calls = []
    t = _tuner(tmp_path, {"a": 2.0, "b": 1.0}, calls=calls, can_time=False)
    assert t.decide(p, CPU) == (p.candidates[0], False) and calls == []
    t.can_time = lambda d: True
    assert t.decide(p, CPU) == (p.candidates[1], True)


def test_timing_possible_guards(monkeypatch):
    cuda = torch.device("cuda")
    assert not tuning.timing_possible(CPU)
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tuning.timing_possible(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not tuning.timing_possible(cuda)  # CUDA-graph capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not tuning.timing_possible(cuda)  # torch.compile tracing
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    from bertfast.kernels.testing import record_launches

    with record_launches():
        assert not tuning.timing_possible(cuda)
    monkeypatch.setattr(_common, "INTERPRET", True)
    assert not tuning.timing_possible(cuda)


# ----------------------------------------------------------------------------- the cache file
@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": "other"}), json.dumps([1, 2]),
                                     json.dumps({"schema": tuning.SCHEMA, "devices": {"g": {"k": {"x": 1}}}}),
                                     b"\xff\xfe\x00garbage"])
def test_corrupt_cache_warns_once_and_uses_defaults(tmp_path, content):
    path = tmp_path / "tuning.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    p, q = _toy_problem({"a": 1.0, "b": 1.0}), _toy_problem({"a": 1.0, "b": 1.0}, key="other")
    t = _tuner(tmp_path, {"a": 2.0, "b": 1.0}, mode="cached")
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache") as rec:
        assert t.choose(p, CPU).name == "a"
        assert t.choose(q, CPU).name == "a"
    assert len([w for w in rec if "ignoring" in str(w.message)]) == 1
    # tuning replaces the unusable file with a valid one
    t.set_mode("tune")
    assert t.choose(p, CPU).name == "b"
    assert json.loads(path.read_text())["devices"]["Fake GPU|sm_90|triton x|torch y"][p.key]["choice"] == "b"


def test_stale_entry_warns_and_uses_default(tmp_path):
    p = _toy_problem({"a": 1.0, "b": 1.0})
    doc = {"schema": tuning.SCHEMA, "devices": {"Fake GPU|sm_90|triton x|torch y": {p.key: {"choice": "gone"}}}}
    (tmp_path / "tuning.json").write_text(json.dumps(doc))
    t = _tuner(tmp_path, mode="cached")
    with pytest.warns(RuntimeWarning, match="no longer a candidate"):
        assert t.choose(p, CPU).name == "a"


def test_store_merges_with_other_processes(tmp_path):
    p, q = _toy_problem({"a": 1.0, "b": 1.0}), _toy_problem({"a": 1.0, "b": 1.0}, key="other")
    t1, t2 = _tuner(tmp_path, {"a": 2.0, "b": 1.0}), _tuner(tmp_path, {"a": 1.0, "b": 2.0})
    t1.choose(p, CPU)
    t2._stored("x", "y")  # t2 loaded the file before t1's second write ...
    t1.choose(q, CPU)
    t2.choose(_toy_problem({"a": 1.0, "b": 1.0}, key="third"), CPU)  # ... and its write keeps t1's entries
    entries = json.loads((tmp_path / "tuning.json").read_text())["devices"]["Fake GPU|sm_90|triton x|torch y"]
    assert {k: e["choice"] for k, e in entries.items()} == {p.key: "b", q.key: "b", "third": "a"}


def test_unwritable_cache_warns_and_keeps_choice(tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    t = tuning.Tuner(timer=_fake_timer({"a": 2.0, "b": 1.0}), device_key=lambda d: "g", can_time=lambda d: True,
                     path=tmp_path / "file" / "tuning.json", mode="tune")
    p = _toy_problem({"a": 1.0, "b": 1.0})
    with pytest.warns(RuntimeWarning) as rec:
        assert t.choose(p, CPU).name == "b"
    assert any("cannot write the tuning cache" in str(w.message) for w in rec)
    assert t.choose(p, CPU).name == "b"  # kept in memory


def test_launcher_hooks_ask_the_tuner(monkeypatch, tmp_path):
    """``plan_gemm``'s and ``attention_config``'s one question goes to ``tuning.TUNER`` for a CUDA
    device (no tensor is needed to ask), and a stored choice comes back; a choice changes the
    tuning epoch that every launch-plan key holds."""
    cuda = torch.device("cuda")
    M, N, K = 128, 768, 768
    args = dict(activation=_gemm.ACT_NONE, has_bias=False, has_pre=False, head_split=None)
    p = tuning.gemm_problem(M, N, K, F16, cuda, (9, 0), False, **args)
    split = next(c for c in p.candidates[1:] if c.value.split_k > 1)  # not the default (split-K 4)
    assert p.default.value.split_k == 4 and split.value.split_k == 2
    ctx = A.TuneContext(cuda, 8, 12, False, A.MASK_LENS, True)
    ap = tuning.attention_problem(64, F16, 128, (9, 0), False, ctx)
    dk = "Fake GPU|sm_90|triton x|torch y"
    doc = {"schema": tuning.SCHEMA, "devices": {dk: {p.key: {"choice": split.name},
                                                     ap.key: {"choice": ap.candidates[1].name}}}}
    (tmp_path / "tuning.json").write_text(json.dumps(doc))
    monkeypatch.setattr(tuning, "TUNER", _tuner(tmp_path, mode="cached"))
    monkeypatch.setattr(tuning, "_CHOICES", {})
    monkeypatch.setattr(_common, "INTERPRET", False)
    assert tuning.gemm_choice(M, N, K, F16, cuda, (9, 0), False, **args) == split.value
    assert tuning.gemm_choice(100, N, K, F16, cuda, (9, 0), False, **args) == split.value  # same class
    assert tuning.gemm_choice(M, N, K, F16, CPU, (9, 0), False, **args) == p.candidates[0].value  # CPU: the default
    cfg = A.attention_config(64, F16, 128, (9, 0), interpret=False, tune=ctx)
    assert cfg["fwd"] == ap.candidates[1].value
    assert A.attention_config(64, F16, 128, (9, 0), interpret=False)["fwd"] == ap.candidates[0].value
    before = _common.mode_key(F16)
    tuning.TUNER.set_mode("off")
    assert _common.mode_key(F16) != before
    assert tuning.gemm_choice(M, N, K, F16, cuda, (9, 0), False, **args) == p.candidates[0].value


@pytest.mark.parametrize("M,default", [(128, "64x128x64 splitk8 w4 s4"), (4096, "tma 128x128x64 w8 s4")])
def test_stored_choice_overrides_the_plain_defaults(monkeypatch, tmp_path, M, default):
    """The plain GEMMs' new defaults (split-K at small M, the TMA kernel at large M on sm_90) are
    defaults only: a stored choice for the shape class (here the table tile) still wins, and
    without one the default is what ``pick_config`` says."""
    cuda = torch.device("cuda")
    N, K = 768, 3072
    args = dict(activation=_gemm.ACT_NONE, has_bias=False, has_pre=False, head_split=None)
    p = tuning.gemm_problem(M, N, K, F16, cuda, (9, 0), False, **args)
    assert p.default.name == default
    table = _gemm.pick_config(M, N, K, F16, (9, 0), False)
    assert table.name in [c.name for c in p.candidates[1:]]
    dk = "Fake GPU|sm_90|triton x|torch y"
    monkeypatch.setattr(tuning, "TUNER", _tuner(tmp_path, mode="cached"))
    monkeypatch.setattr(tuning, "_CHOICES", {})
    monkeypatch.setattr(_common, "INTERPRET", False)
    assert tuning.gemm_choice(M, N, K, F16, cuda, (9, 0), False, **args).name == default
    doc = {"schema": tuning.SCHEMA, "devices": {dk: {p.key: {"choice": table.name}}}}
    (tmp_path / "tuning.json").write_text(json.dumps(doc))
    tuning.TUNER.forget()
    assert tuning.gemm_choice(M, N, K, F16, cuda, (9, 0), False, **args) == table


def test_plan_gemm_refuses_split_k_and_cublas_with_epilogue():
    for cfg in (_gemm.CUBLAS, _gemm.TMA_TILES[0], _gemm.replace(_gemm.SPLIT_K_TILE["sm90"], split_k=2)):
        with pytest.raises(ValueError, match="without bias"):
            _gemm.plan_gemm(64, 64, 64, F16, CPU, 64, 64, has_bias=True, has_pre=False, config=cfg)


# ----------------------------------------------------------------------------- real candidates, interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_gemm_candidates_run_and_match(tmp_path, dtype):
    """Every GEMM candidate of a plain small-M problem (table tiles, split-K, cuBLAS) runs and
    matches the reference inside the tuner; the fake timer's favourite is chosen."""
    p = _gemm_problem(M=32, N=256, K=256, dtype=dtype)
    names = [c.name for c in p.candidates]
    assert "cublas" in names and (dtype == F32 or any("splitk" in n for n in names))
    fav = names[-2]
    t = _tuner(tmp_path, {n: (0.5 if n == fav else 1.0) for n in names})
    assert t.choose(p, CPU).name == fav
    assert t.decisions[("Fake GPU|sm_90|triton x|torch y", p.key)].dropped == {}


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,M,K,family,splits,tma", [(F16, 37, 192, "sm90", (8,), 0), (BF16, 130, 100, "sm80", (2,), 1)])
def test_split_k_tma_and_cublas_through_launch_gemm(dtype, M, K, family, splits, tma):
    """Split-K (K not a multiple of the split, partial tiles; 8 splits of 3 K steps leave empty
    splits), the persistent TMA kernel (edges zero-filled / clipped by the descriptors) and
    cuBLAS through the launcher, into NaN-filled outputs."""
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(200, K) / K**0.5).to(dtype)
    for cfg in (_gemm.CUBLAS, _gemm.TMA_TILES[tma],
                *(_gemm.replace(_gemm.SPLIT_K_TILE[family], split_k=s) for s in splits)):
        y = nan_like((M, 200), dtype)
        _gemm.launch_gemm(x, w, None, y, config=cfg)
        assert_close(y, linear_reference(x, w, None, None), msg=cfg.name)


@pytest.mark.interpreter
def test_gemm_bench_accepts_tf32_rounding_only_under_tf32():
    """The tuner's reference check of an fp32 GEMM under TF32 allows TF32's rounding (10-bit
    mantissas, fp16's tolerance): with the IEEE fp32 tolerance every TF32 candidate, the default
    included, would be dropped as "does not match"."""
    args = dict(activation=_gemm.ACT_NONE, has_bias=False, has_pre=False, head_split=None)
    for tf32 in (False, True):
        p = tuning.gemm_problem(16, 32, 32, F32, CPU, (9, 0), tf32, **args)
        run, check = p.bench()
        y = run(p.default.value).clone()
        assert check(y)
        assert check(y * (1 + 1e-3)) == tf32  # an error of TF32's size (2**-10 relative)


@pytest.mark.interpreter
def test_tma_choice_falls_back_for_tensors_descriptors_refuse():
    """A stored TMA choice is per shape class, but TMA descriptors refuse an ``out=`` at an odd
    offset and a one-row x with an odd row stride (``_align_operands`` keeps those): the launch
    takes the table's default instead of failing an assertion inside triton."""
    M, N, K = 5, 16, 32
    x, w = torch.randn(M, K).to(F16), torch.randn(N, K).to(F16)
    buf = torch.full((M * N + 1,), float("nan"), dtype=F16)
    y = buf[1:].view(M, N)  # contiguous, 2 bytes past an aligned start
    _gemm.launch_gemm(x, w, None, y, config=_gemm.TMA_TILES[0])
    assert_close(y, linear_reference(x, w, None, None))
    x1 = torch.randn(1, K + 3).to(F16)[:, :K]  # one row, row stride K + 3
    y1 = nan_like((1, N), F16)
    _gemm.launch_gemm(x1, w, None, y1, config=_gemm.TMA_TILES[0])
    assert_close(y1, linear_reference(x1, w, None, None))


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,varlen,causal,cap", [(A.MASK_LENS, False, False, (9, 0)), (A.MASK_LENS, True, True, (8, 0)),
                                                    (A.MASK_KEYS, False, True, (9, 0)), (A.MASK_ADD, False, False, (8, 0))])
def test_attention_candidates_run_and_match(tmp_path, kind, varlen, causal, cap):
    """Every short-sequence attention tile runs and matches the reference inside the tuner
    (padded with each mask kind, varlen, causal), S = 77: partial tiles."""
    ctx = A.TuneContext(CPU, 2, 2, causal, kind, varlen)
    p = tuning.attention_problem(32, F16, 77, cap, kind == A.MASK_ADD, ctx)
    names = [c.name for c in p.candidates]
    assert len(names) > 1
    t = _tuner(tmp_path, {n: (0.5 if n == names[-1] else 1.0) for n in names})
    assert t.choose(p, CPU).name == names[-1]
    assert t.decisions[("Fake GPU|sm_90|triton x|torch y", p.key)].dropped == {}


# ----------------------------------------------------------------------------- CLI
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_tune_cli_without_cuda(capsys):
    from bertfast.cli import main

    assert main(["tune"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bertfast: error: tuning needs a CUDA GPU"), err


def test_tune_cli_bad_arguments(capsys):
    from bertfast.cli import main

    for argv in (["tune", "--batch-sizes", "0"], ["tune", "--shapes", "8by128"], ["tune", "--seq-lens", "x"]):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bertfast: error:"), err
