"""bertfast.quantize: the opt-in int8 CPU inference path (fbgemm int8 GEMMs, per-token scales,
fp32 outlier channels) -- accuracy on real sentences, row independence, the layer's arithmetic
against exact dequantized math, the refusals."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import bertfast
from bertfast import quantize as Q
from bertfast.loading import resolve_model_path

pytestmark = pytest.mark.usefixtures("one_thread")

# Held-out sentences (none in Q.CALIBRATION_SENTENCES): the CPU benchmark's 32 sentences, 3 to ~90
# words (bertfast/bench/cpu.py).
from bertfast.bench.cpu import SENTENCES as HELD_OUT  # noqa: E402

# The rule: the int8 path exists only while embeddings stay at cosine >= 0.99 vs fp32
# (measured on these sentences: min 0.996, mean 0.9993).
MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def tok():
    return bertfast.Tokenizer.from_pretrained(resolve_model_path("minilm"))


@pytest.fixture(scope="module")
def fp32():
    return bertfast.BertModel.from_pretrained(resolve_model_path("minilm")).eval()


@pytest.fixture(scope="module")
def int8(fp32, tok):
    return Q.quantize_int8(fp32, tokenizer=tok, inplace=False)


def embed(model, enc):
    """Mean-pooled, L2-normalised sentence embeddings (B, C)."""
    with torch.inference_mode():
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state  # (B, S, C)
    m = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_held_out_sentences_keep_cosine(fp32, int8, tok):
    assert not set(HELD_OUT) & set(Q.CALIBRATION_SENTENCES)
    enc = tok(HELD_OUT, padding=True)
    assert fp32.packing_for(enc["attention_mask"]) is not None  # the padded batch runs packed
    cos = (embed(int8, enc) * embed(fp32, enc)).sum(-1)  # (B,)
    assert cos.min().item() >= MIN_COSINE, cos
    assert cos.mean().item() >= 0.998, cos.mean()


def test_sentence_alone_equals_sentence_in_batch(int8, tok):
    # per-token scales: a row's result does not depend on the other rows; only the fp32 parts
    # (attention, LayerNorm, a GEMM's blocking) may round differently (measured: 1 - cos < 1e-6)
    picks = [HELD_OUT[i] for i in (0, 16, 20, 24)]
    batch = embed(int8, tok(picks, padding=True))
    for i, s in enumerate(picks):
        alone = embed(int8, tok([s], padding=True))[0]
        assert torch.dot(alone, batch[i]).item() >= 0.99999, s


def test_layers_replaced_and_packed_path_used(fp32, int8, tok):
    C = 384
    for model_layer, fp_layer in zip(int8.encoder.layer, fp32.encoder.layer):
        sa = model_layer.attention.self
        assert isinstance(sa.qkv_int8, Q.QuantizedLinear) and sa.qkv_int8.out_features == 3 * C  # fused q/k/v
        for path in Q._TARGETS:
            q = model_layer.get_submodule(path)
            kind = Q._QKVPart if path.startswith("attention.self.") else Q.QuantizedLinear
            assert isinstance(q, kind) and q.quantized
            assert "weight" not in dict(q.named_parameters())
            assert isinstance(fp_layer.get_submodule(path), nn.Linear)  # inplace=False left the original alone
    assert not any(p.requires_grad for p in int8.parameters())  # inference only: nothing left to train
    sa = int8.encoder.layer[2].attention.self
    x = torch.randn(5, C)
    with torch.inference_mode():
        torch.testing.assert_close(sa.value(x), sa.qkv_int8(x)[:, 2 * C:], atol=0, rtol=0)  # a part called alone
    assert isinstance(int8.embeddings.LayerNorm, nn.LayerNorm) and isinstance(int8.pooler.dense, nn.Linear)
    enc = tok(HELD_OUT[:8], padding=True)
    seen = []
    layer0 = int8.encoder.layer[0]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
             for m in (layer0.intermediate.dense, layer0.attention.self.qkv_int8)]
    try:
        embed(int8, enc)
    finally:
        for h in hooks:
            h.remove()
    T = int(enc["attention_mask"].sum())
    assert seen == [torch.Size([T, C])] * 2  # (T, C): only the real tokens; one fused QKV call


def _exact(q: Q.QuantizedLinear, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer must compute, in fp64 from its own int8 weight: the dequantized int8 part on
    the quantized activations, plus the fp32 outlier channels, plus the bias."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wq, _ = torch.ops.quantized.linear_unpack(q._packed)
    w_int = wq.dequantize().double()  # (N, C): smoothed, outlier columns zero
    x = x.double()
    idx = q.outlier_idx
    xs = x * q.inv_smooth_in.double()  # zero at the outlier channels
    assert (xs[:, idx] == 0).all()
    s = xs.abs().amax(1, keepdim=True).clamp_min(1e-30)
    u = torch.clamp(torch.round(xs / s * Q._ACT_QMAX), -Q._ACT_QMAX, Q._ACT_QMAX) / Q._ACT_QMAX * s
    w = lin.weight.detach().double()
    return u @ w_int.t() + x[:, idx] @ w[:, idx].t() + lin.bias.detach().double()


def test_quantized_linear_matches_fp32_and_exact_int8_math():
    lin = nn.Linear(384, 1536)
    x = torch.randn(300, 384)
    x[:, [7, 100]] *= 40.0  # two outlier channels, as LayerNorm outputs of BERT have
    q = Q.QuantizedLinear(lin, x.abs().amax(0), outlier_channels=4).eval()
    assert set(q.outlier_idx.tolist()) >= {7, 100}
    with torch.inference_mode():
        y, ref = q(x), lin(x)
        # int8 tolerance: 1% relative error (measured 0.4%)
        assert ((y - ref).norm() / ref.norm()).item() < 0.01
        # the kernel computes the stated int8 arithmetic: only fp32 rounding and the odd tie at a
        # grid point differ (measured 2.5e-5 relative); int16 saturation would give ~1e-2
        exact = _exact(q, lin, x)
        assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-4
        # (B, S, C) in, (B, S, N) out, same rows
        assert torch.equal(q(x.view(3, 100, 384)), y.view(3, 100, 1536))


def test_no_int16_saturation_on_adversarial_weights():
    # weights pattern (small, big, big, small): the pairs the AVX2 kernel multiplies together
    # (input channels 2i, 2i+1) hold one big weight each, so the pair bound lets each reach ~127;
    # with all activations at the top of the uint8 grid, a wrong pairing would saturate int16
    lin = nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01)
        lin.weight[:, 1::4] = 0.3
        lin.weight[:, 2::4] = 0.3
    q = Q.QuantizedLinear(lin, None, outlier_channels=0).eval()
    x = torch.cat([torch.ones(8, 256), -torch.ones(8, 256)])
    with torch.inference_mode():
        y = q(x)
    assert torch.allclose(y.double(), _exact(q, lin, x), rtol=1e-5, atol=1e-4)
    assert ((y - lin(x)).norm() / lin(x).norm()).item() < 0.01


def test_zero_row_gives_the_bias_exactly_and_empty_input():
    lin = nn.Linear(64, 32)
    q = Q.QuantizedLinear(lin, torch.rand(64) + 0.1, outlier_channels=4).eval()
    x = torch.randn(4, 64)
    x[2] = 0.0
    with torch.inference_mode():
        y = q(x)
        assert torch.isfinite(y).all()
        assert torch.equal(y[2], lin.bias.detach())
        assert q(torch.zeros(0, 64)).shape == (0, 32)


def test_inference_only():
    q = Q.QuantizedLinear(nn.Linear(16, 8), None, outlier_channels=0)
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="inference-only"):
        q.train()(x)
    q.eval()
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x.requires_grad_())
    with pytest.raises(RuntimeError, match="fp32 CPU"):
        with torch.no_grad():
            q(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="fp32 CPU"):
        with torch.no_grad():
            q(torch.randn(2, 16, device="meta"))


def test_model_in_training_mode_refuses(int8, tok):
    model = copy.deepcopy(int8).train()
    with pytest.raises(RuntimeError, match="inference-only"):
        with torch.no_grad():
            model(**tok(["Hello there."], padding=True))


def _tiny(**kw):
    cfg = bertfast.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, **kw)
    return bertfast.BertModel(cfg).eval()


def _ids():
    return [{"input_ids": torch.randint(5, 100, (2, 7))}]


def test_refusals():
    with pytest.raises(ValueError, match="fp32"):
        Q.quantize_int8(_tiny().half(), _ids())
    with pytest.raises(ValueError, match="CPU"):
        Q.quantize_int8(_tiny().to("meta"), _ids())
    with pytest.raises(ValueError, match="tokenizer"):
        Q.quantize_int8(_tiny(), ["a sentence without a tokenizer"])
    with pytest.raises(ValueError, match="tokenizer"):
        Q.quantize_int8(_tiny())  # no calibration, no tokenizer, not the uncased vocabulary
    with pytest.raises(ValueError, match="outlier_channels"):
        Q.quantize_int8(_tiny(), _ids(), outlier_channels=-1)
    model = Q.quantize_int8(_tiny(), _ids())
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_int8(model, _ids())
    with pytest.raises(RuntimeError, match="cannot be saved"):
        model.state_dict()


def test_head_model_and_dict_calibration():
    cfg = bertfast.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, num_labels=3)
    model = bertfast.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits
    out = Q.quantize_int8(model, [{"input_ids": ids, "attention_mask": mask}], inplace=False)
    assert isinstance(out.bert.encoder.layer[1].output.dense, Q.QuantizedLinear)
    assert isinstance(model.bert.encoder.layer[1].output.dense, nn.Linear)
    with torch.inference_mode():
        got = out(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, ref, atol=0.05), (got - ref).abs().max()


def test_missing_op_is_named(monkeypatch):
    monkeypatch.setattr(Q, "_OPS", ("linear_prepack", "no_such_int8_op"))
    with pytest.raises(RuntimeError, match="torch.ops.quantized.no_such_int8_op"):
        Q.quantize_int8(_tiny(), _ids())


def test_to_moves_or_refuses_by_name_and_leaves_the_model_whole():
    """``.to("cpu")`` / ``.cpu()`` / ``.float()`` of a quantized model keep it working; a dtype or a
    device it cannot run (``.half()``, ``.to(torch.bfloat16)``, ``.double()``, ``.cuda()``, ``.to("meta")``,
    also on a part of it) is refused by name, before any tensor changes: the outputs stay the same."""
    model = Q.quantize_int8(_tiny(), _ids())
    ids = torch.randint(5, 100, (2, 9))
    with torch.inference_mode():
        before = model(input_ids=ids).last_hidden_state
    assert model.to("cpu") is model and model.cpu() is model and model.float() is model
    state = {n: t.clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    for convert in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double(), lambda m: m.cuda(),
                    lambda m: m.to("meta"), lambda m: m.embeddings.half(),
                    lambda m: m.encoder.layer[0].to(torch.float16)):
        with pytest.raises(ValueError, match="int8-quantized.*(cannot be converted to|cannot be moved off the CPU)"):
            convert(model)
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert after.keys() == state.keys()
    for n, t in state.items():
        assert after[n].dtype == t.dtype and after[n].device == t.device and torch.equal(after[n], t), n
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).last_hidden_state, before)
    copied = copy.deepcopy(model)  # a copy is guarded too (its own modules, not the original's)
    with pytest.raises(ValueError, match="int8-quantized"):
        copied.half()
    assert copied.cpu() is copied
