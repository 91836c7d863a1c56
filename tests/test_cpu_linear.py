"""The CPU linears (bertfast/cpu_linear.py): every implementation computes the same linear, the
choice among them is measured (here with a fake timer) and stored where the GPU tuner stores its
choices, a stored choice is reused without timing, and nothing stale is ever read: weights
written in place -- through torch or through a numpy view -- are seen by the next forward."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from bertfast import BertModel, cpu_linear
from bertfast.activations import get_activation
from bertfast.kernels import tuning

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
M, N, K = 40, 96, 64  # M: bucket 64


def fake_timer(times: dict):
    """A timer that runs nothing and reports ``times[name]`` ms (2.0 for names not listed)."""
    calls = []

    def timer(name, fn):
        calls.append(name)
        return times.get(name, 2.0)

    timer.calls = calls
    return timer


def make_tuner(tmp_path, times=None, mode="tune"):
    timer = fake_timer(times or {})
    t = cpu_linear.CpuTuner(timer=timer, path=tmp_path / "tuning.json", mode=mode)
    t.fake = timer
    return t


def inputs(dtype=torch.float32, residual=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype) if residual else None
    return x, w, b, r


EPILOGUES = [(None, False), ("gelu", False), ("gelu_new", False), (None, True), ("gelu", True), ("relu", False)]


@pytest.mark.parametrize("activation,residual", EPILOGUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_implementation_computes_the_linear(dtype, activation, residual):
    x, w, b, r = inputs(dtype, residual)
    ref = F.linear(x.double(), w.double(), b.double())
    if activation is not None:
        ref = get_activation(activation)(ref)
    if residual:
        ref = ref + r.double()
    names = cpu_linear.candidates(dtype, activation, residual)
    assert names[0] == "aten" and "onednn" in names and "onednn-packed" in names
    assert ("onednn-fused" in names) == (activation in ("gelu", "gelu_new") or (residual and activation is None))
    assert ("mkl-packed" in names) == (dtype == torch.float32 and bool(torch._C.has_mkl))
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    for name in names:
        r_before = None if r is None else r.clone()
        out = cpu_linear.run(name, x, w, b, activation, r)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, msg=name)
        if r is not None:
            assert torch.equal(r, r_before), f"{name} wrote into the residual"


def test_classes_are_told_apart_by_shape_epilogue_dtype_and_token_bucket():
    key = cpu_linear.class_key
    assert key(40, N, K, torch.float32, None, False) == key(64, N, K, torch.float32, None, False)
    assert cpu_linear.bucket(40) == 64 and cpu_linear.bucket(3) == 16 and cpu_linear.bucket(65) == 128
    others = {key(65, N, K, torch.float32, None, False), key(40, K, N, torch.float32, None, False),
              key(40, N, K, torch.bfloat16, None, False), key(40, N, K, torch.float32, "gelu", False),
              key(40, N, K, torch.float32, None, True)}
    assert len(others) == 5 and key(40, N, K, torch.float32, None, False) not in others


@pytest.mark.parametrize("activation,residual", [("gelu", False), (None, True)])
def test_each_implementation_is_chosen_when_it_is_fastest_and_the_choice_is_reused(tmp_path, activation, residual):
    names = cpu_linear.candidates(torch.float32, activation, residual)
    assert len(names) >= 4
    for fastest in names:
        path = tmp_path / fastest
        path.mkdir()
        t = make_tuner(path, {fastest: 1.0})
        prob = cpu_linear.problem(M, N, K, torch.float32, activation, residual)
        assert t.choose(prob, CPU).name == fastest
        assert sorted(t.fake.calls) == sorted(names)  # every candidate timed once
        doc = json.loads((path / "tuning.json").read_text())
        assert doc["schema"] == tuning.SCHEMA  # the GPU tuner's file and format
        entry = doc["devices"][cpu_linear.device_key()][prob.key]
        assert entry["choice"] == fastest and set(entry["times_ms"]) == set(names)
        # a new process (new tuner, stored choices only) reuses it without timing anything
        again = make_tuner(path, mode="cached")
        assert again.choose(cpu_linear.problem(M, N, K, torch.float32, activation, residual), CPU).name == fastest
        assert again.fake.calls == []
        assert again.decisions[(cpu_linear.device_key(), prob.key)].source == "cache"


def test_the_default_stays_unless_another_is_clearly_faster(tmp_path):
    t = make_tuner(tmp_path, {"aten": 1.02, "onednn": 1.0, "onednn-packed": 1.5, "mkl-packed": 1.5})
    assert t.choose(cpu_linear.problem(M, N, K, torch.float32, None, False), CPU).name == "aten"  # within 3%
    t = make_tuner(tmp_path, {"aten": 1.2, "onednn": 1.0})
    assert t.choose(cpu_linear.problem(M, 2 * N, K, torch.float32, None, False), CPU).name == "onednn"


def test_without_a_stored_choice_nothing_is_timed_by_default(tmp_path):
    t = make_tuner(tmp_path, {"onednn": 0.1}, mode="cached")
    assert t.choose(cpu_linear.problem(M, N, K, torch.float32, None, False), CPU).name == "aten"
    assert t.fake.calls == [] and not (tmp_path / "tuning.json").exists()


def test_a_wrong_output_is_never_chosen(tmp_path, monkeypatch):
    real = cpu_linear.run

    def broken(name, x, w, b, activation=None, residual=None):
        out = real(name, x, w, b, activation, residual)
        return out + 1.0 if name == "onednn" else out

    monkeypatch.setattr(cpu_linear, "run", broken)
    t = make_tuner(tmp_path, {"onednn": 0.1})
    d_key = cpu_linear.problem(M, N, K, torch.float32, None, False)
    assert t.choose(d_key, CPU).name == "aten"
    assert "onednn" in t.decisions[(cpu_linear.device_key(), d_key.key)].dropped


def test_the_key_names_the_cpu_its_flags_torch_and_threads():
    key = cpu_linear.device_key()
    f = cpu_linear.cpu_features()
    assert key.startswith("cpu|") and f.model in key and torch.__version__ in key
    assert f"threads {torch.get_num_threads()}" in key
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
        assert cpu_linear.device_key() != key
    finally:
        torch.set_num_threads(before)


def test_isa_flags_are_read_from_cpuinfo():
    zen3 = cpu_linear.parse_features({"model name": "AMD EPYC 7B13", "cpu family": "25", "model": "1",
                                      "flags": "fpu sse avx avx2 fma"})
    assert zen3.model == "AMD EPYC 7B13 (family 25 model 1)"
    assert zen3.avx2 and not (zen3.avx512 or zen3.avx512_bf16 or zen3.vnni or zen3.amx or zen3.native_bf16)
    spr = cpu_linear.parse_features({"model name": "Intel Xeon", "flags": "avx2 avx512f avx512_vnni amx_tile amx_bf16"})
    assert spr.native_bf16 and spr.amx and spr.vnni and spr.avx512
    assert "no AVX512_BF16" not in spr.describe() and "no AVX" in zen3.describe()


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch):
    zen3 = cpu_linear.parse_features({"model name": "AMD EPYC", "flags": "avx2"})
    monkeypatch.setattr(cpu_linear, "cpu_features", lambda: zen3)
    monkeypatch.setattr(cpu_linear, "_WARNED", set())
    x, w, b, _ = inputs(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no AVX512_BF16 or AMX"):
        with torch.inference_mode():
            cpu_linear.linear(x, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            cpu_linear.linear(x, w, b)  # once per process
            cpu_linear.linear(x.float(), w.float(), b.float())  # fp32: never


def test_bf16_on_a_native_cpu_is_silent(monkeypatch):
    monkeypatch.setattr(cpu_linear, "cpu_features",
                        lambda: cpu_linear.parse_features({"model name": "x", "flags": "avx2 avx512f avx512_bf16"}))
    monkeypatch.setattr(cpu_linear, "_WARNED", set())
    x, w, b, _ = inputs(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            cpu_linear.linear(x, w, b)


def test_only_inference_on_cpu_in_fp32_or_bf16_is_served():
    x, w, b, _ = inputs()
    assert not cpu_linear.usable(x, w)  # autograd recording
    with torch.no_grad():
        assert cpu_linear.usable(x, w)
        assert not cpu_linear.usable(x.double(), w.double())
        assert not cpu_linear.usable(x, w.t().contiguous().t())  # a strided weight: aten


# ----------------------------------------------------------------------------- in the model
@pytest.fixture(scope="module")
def model():
    return BertModel.from_pretrained("minilm").eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return ids * mask, mask


def _forward(model, tuner):
    ids, mask = _batch()
    with cpu_linear.using(tuner), torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]


def test_the_model_runs_the_chosen_implementation(model, tmp_path, monkeypatch):
    ran = []
    real = cpu_linear.run

    def spy(name, x, w, b, activation=None, residual=None):
        ran.append((name, cpu_linear.fusable(activation, residual is not None)))
        return real(name, x, w, b, activation, residual)

    t = make_tuner(tmp_path, {"onednn-fused": 1.0, "onednn": 1.5})
    _forward(model, t)  # decides (timing with the fake timer)
    monkeypatch.setattr(cpu_linear, "run", spy)
    _forward(model, t)
    L = model.config.num_hidden_layers
    # QKV, attention output, FFN1 + GELU, FFN2 in every layer; the fused one wherever it is offered
    assert len(ran) == 4 * L and ran.count(("onednn-fused", True)) >= L
    assert all(name == ("onednn-fused" if fused else "onednn") for name, fused in ran)
    # a second process reads the stored choices, times nothing, runs the same
    first = list(ran)
    ran.clear()
    again = make_tuner(tmp_path, mode="cached")
    _forward(model, again)
    assert again.fake.calls == [] and ran == first


IMPL_NAMES = [i.name for i in cpu_linear.IMPLS if i.available()]


@pytest.mark.parametrize("name", IMPL_NAMES)
def test_weights_written_in_place_are_seen_by_every_implementation(model, tmp_path, name):
    """Through torch (version counter bumped) and through a numpy view (not bumped): the next
    forward sees the new values, whatever the implementation (nothing packed is kept)."""
    t = make_tuner(tmp_path, {name: 1.0})
    aten = cpu_linear.CpuTuner(mode="off")  # F.linear everywhere: the reference
    layer = model.encoder.layer[2]
    value, inter = layer.attention.self.value.weight, layer.intermediate.dense.weight
    before = _forward(model, t)
    saved = (value.detach().clone(), inter.detach().clone())
    try:
        v0 = value._version
        value.detach().numpy()[:, :5] *= -3.0  # numpy: no version bump
        inter.detach().numpy()[7] = 0.5
        assert value._version == v0
        after_numpy = _forward(model, t)
        torch.testing.assert_close(after_numpy, _forward(model, aten), atol=1e-4, rtol=1e-4)
        assert (after_numpy - before).abs().max() > 1e-2
        with torch.no_grad():
            inter.mul_(0.5)  # torch: version bumped, same storage
        after_torch = _forward(model, t)
        torch.testing.assert_close(after_torch, _forward(model, aten), atol=1e-4, rtol=1e-4)
        assert (after_torch - after_numpy).abs().max() > 1e-2
    finally:
        with torch.no_grad():
            value.copy_(saved[0])
            inter.copy_(saved[1])
    torch.testing.assert_close(_forward(model, t), before, atol=0, rtol=0)
