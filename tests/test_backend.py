"""The Triton backend of BertModel against the torch backend (issue: the fast encoder).

Under the interpreter (CPU, TRITON_INTERPRET=1) on a tiny 2-layer, hidden-64 config with padding:
forward and the gradient of every parameter, padded and padding-free execution, each dtype.
Low-precision runs follow flash-attention's test rule: the Triton model's error against the fp32
reference is at most 4x the torch backend's own error in that dtype (plus one rounding)."""
import pytest
import torch

import bertfast
from bertfast import BertConfig, BertModel
from bertfast.kernels.testing import GRAD_FACTOR, TOLERANCES, tolerance

pytestmark = pytest.mark.interpreter


def tiny_config(**kw) -> BertConfig:
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def batch(B=3, S=13, vocab=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    tt = torch.randint(0, 2, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    if B > 2:
        mask[2, 1:] = 0  # one real token
    return ids, tt, mask


def real(x, mask):
    return x * mask[..., None].to(x.dtype)


def run(model, backend, unpad, ids, tt, mask, **kw):
    model.set_backend(backend, unpad=unpad)
    return model(ids, mask, tt, **kw)


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_forward_fp32_matches_torch_backend(unpad, act):
    model = BertModel(tiny_config(hidden_act=act)).eval()
    ids, tt, mask = batch()
    ref = run(model, "torch", False, ids, tt, mask, output_hidden_states=True)
    out = run(model, "triton", unpad, ids, tt, mask, output_hidden_states=True)
    tol = tolerance(torch.float32, 10)  # 2 layers of GEMMs, LN and attention in another summation order
    torch.testing.assert_close(real(out.last_hidden_state, mask), real(ref.last_hidden_state, mask), **tol)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, **tol)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for h, r in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(real(h, mask), real(r, mask), **tol)
    if unpad:  # padded positions are zeros in padding-free execution
        assert out.last_hidden_state[1, 7:].abs().max() == 0
        assert out.last_hidden_state[2, 1:].abs().max() == 0


def test_unpadded_equals_padded_and_no_padding_fast_path():
    model = BertModel(tiny_config()).eval()
    ids, tt, mask = batch()
    a = run(model, "triton", True, ids, tt, mask).last_hidden_state
    b = run(model, "triton", False, ids, tt, mask).last_hidden_state
    torch.testing.assert_close(real(a, mask), real(b, mask), **tolerance(torch.float32, 4))
    full = torch.ones_like(mask)
    c = run(model, "triton", True, ids, tt, full).last_hidden_state
    d = run(model, "torch", True, ids, tt, full).last_hidden_state
    torch.testing.assert_close(c, d, **tolerance(torch.float32, 10))


def test_causal_and_sinusoidal():
    model = BertModel(tiny_config(is_decoder=True, position_embedding_type="sinusoidal")).eval()
    ids, tt, mask = batch()
    ref = run(model, "torch", False, ids, tt, mask).last_hidden_state
    for unpad in (False, True):
        out = run(model, "triton", unpad, ids, tt, mask).last_hidden_state
        torch.testing.assert_close(real(out, mask), real(ref, mask), **tolerance(torch.float32, 10))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_4x_of_torch(dtype):
    torch.manual_seed(0)
    model = BertModel(tiny_config()).eval()
    ids, tt, mask = batch()
    ref = run(model, "torch", False, ids, tt, mask).last_hidden_state  # fp32 reference
    model = model.to(dtype)
    torch_lp = run(model, "torch", False, ids, tt, mask).last_hidden_state.float()
    for unpad in (False, True):
        tri = run(model, "triton", unpad, ids, tt, mask).last_hidden_state
        assert tri.dtype == dtype and not torch.isnan(tri).any()
        err_tri = (real(tri.float(), mask) - real(ref, mask)).abs().max().item()
        err_torch = (real(torch_lp, mask) - real(ref, mask)).abs().max().item()
        one_rounding = TOLERANCES[dtype][1] * ref.abs().max().item()
        assert err_tri <= 4 * err_torch + one_rounding, (dtype, unpad, err_tri, err_torch)


@pytest.mark.parametrize("unpad", [False, True])
def test_gradients_of_every_parameter_match(unpad):
    torch.manual_seed(0)
    model = BertModel(tiny_config()).train()  # dropout 0: deterministic training forward
    ids, tt, mask = batch()
    target = torch.randn(3, 13, 64)

    def grads(backend):
        model.zero_grad(set_to_none=True)
        out = run(model, backend, unpad, ids, tt, mask)
        loss = (real(out.last_hidden_state, mask) * target).sum() + out.pooler_output.sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, got = grads("torch"), grads("triton")
    assert set(ref) == set(got)
    assert "encoder.layer.0.attention.self.query.weight" in got  # reaches q/k/v through the fused weight
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **tolerance(torch.float32, 10 * GRAD_FACTOR), msg=name)


def test_fused_qkv_cache_follows_parameter_updates():
    model = BertModel(tiny_config()).eval()
    ids, tt, mask = batch()
    run(model, "triton", True, ids, tt, mask)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.key.weight.mul_(0.5)  # in-place change: version bump
    out = run(model, "triton", True, ids, tt, mask).last_hidden_state
    ref = run(model, "torch", False, ids, tt, mask).last_hidden_state
    torch.testing.assert_close(real(out, mask), real(ref, mask), **tolerance(torch.float32, 10))


def test_state_dict_and_parameters_do_not_depend_on_backend():
    model = BertModel(tiny_config()).eval()
    keys = list(model.state_dict())
    ids, tt, mask = batch()
    run(model, "triton", True, ids, tt, mask)
    assert list(model.state_dict()) == keys
    assert model.backend == "triton"
    model.set_backend("torch")
    assert model.config.backend == "torch"


def test_output_attentions_falls_back_to_torch_path():
    model = BertModel(tiny_config()).eval()
    ids, tt, mask = batch()
    out = run(model, "triton", True, ids, tt, mask, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 2, 13, 13)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        tiny_config(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        BertModel(tiny_config()).set_backend("fast")


def test_heads_run_on_triton_backend():
    cfg = tiny_config()
    model = bertfast.BertForSequenceClassification(cfg).eval()
    ids, tt, mask = batch()
    ref = model(ids, mask, tt).logits
    model.set_backend("triton")
    assert model.bert.config.backend == "triton"
    torch.testing.assert_close(model(ids, mask, tt).logits, ref, **tolerance(torch.float32, 10))


def test_unsupported_head_size_auto_runs_torch_triton_refuses(monkeypatch):
    """A head size the attention kernel lacks (16) is found when the backend is chosen: "auto"
    runs the torch path even where it would pick the kernels (CUDA inputs; simulated here), and
    an explicit "triton" refuses by name before any kernel launches."""
    from bertfast import backend, modeling

    model = BertModel(tiny_config(num_attention_heads=4)).eval()  # head size 16
    ids, tt, mask = batch()
    want = run(model, "torch", True, ids, tt, mask)
    launched = []
    orig = modeling.encoder_forward

    def spy(*a, **k):
        if k["kernels"]:
            launched.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(modeling, "encoder_forward", spy)
    monkeypatch.setattr(backend, "resolve", lambda name, device: "torch" if name == "torch" else "triton")
    got = run(model, "auto", True, ids, tt, mask)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
    with pytest.raises(ValueError, match="head size 16"):
        run(model, "triton", True, ids, tt, mask)
    ok = BertModel(tiny_config()).eval().double()  # a dtype the kernels lack
    with pytest.raises(ValueError, match="dtype float64"):
        run(ok, "triton", True, ids, tt, mask)
    assert not launched
