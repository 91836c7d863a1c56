"""bertfast.optimize / restore on transformers models, and attn_implementation="bertfast".

Runs the kernels under the interpreter (CPU) on tiny transformers configs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast.kernels.testing import GRAD_FACTOR, tolerance  # noqa: E402

pytestmark = pytest.mark.interpreter


def hf_config(**kw):
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return transformers.BertConfig(**base)


def inputs(B=3, S=11):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (B, S), generator=g)
    tt = torch.randint(0, 2, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 2:] = 0
    return ids, tt, mask


TOL = tolerance(torch.float32, 10)


@pytest.mark.parametrize("cls", ["BertModel", "BertForSequenceClassification", "BertForTokenClassification",
                                 "BertForMaskedLM", "BertForQuestionAnswering"])
@pytest.mark.parametrize("unpad", [True, False])
def test_optimize_keeps_outputs_and_parameters(cls, unpad):
    torch.manual_seed(0)
    model = getattr(transformers, cls)(hf_config()).eval()
    ids, tt, mask = inputs()
    ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    same = bertfast.optimize(model, backend="triton", unpad=unpad)
    assert same is model and bertfast.integration.is_optimized(model)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params  # shared, not copied
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    key = "last_hidden_state" if cls == "BertModel" else ("start_logits" if "Question" in cls else "logits")
    a, b = out[key], ref[key]
    if tuple(a.shape[:2]) == tuple(mask.shape):  # per-token outputs: compare real tokens
        m = mask.view(*mask.shape, *([1] * (a.dim() - 2)))
        a, b = a * m, b * m
    torch.testing.assert_close(a, b, **TOL)
    bertfast.restore(model)
    assert not bertfast.integration.is_optimized(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, token_type_ids=tt)[key], ref[key],
                               rtol=0, atol=0)


def test_optimized_model_trains_like_the_original():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(hf_config()).train()
    ids, tt, mask = inputs()
    labels = torch.tensor([0, 1, 1])

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    bertfast.optimize(model, backend="triton")
    got = grads()
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], **tolerance(torch.float32, 10 * GRAD_FACTOR), msg=n)


def test_unsupported_requests_use_the_original_forward():
    model = transformers.AutoModel.from_config(hf_config(), attn_implementation="eager").eval()
    ids, tt, mask = inputs()
    ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    bertfast.optimize(model, backend="triton")
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == 2
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_runs_bertfasts_pytorch_path(backend, monkeypatch):
    """On CPU, optimize runs bertfast's padding-free PyTorch path (before: auto silently kept
    transformers' forward): outputs and gradients equal transformers' within rounding; restore
    gives transformers' forward back."""
    from bertfast import modeling

    runs = []
    orig = modeling.encoder_forward

    def spy(bert, plan, *a, **k):
        runs.append((k["kernels"], plan.packing is not None))
        return orig(bert, plan, *a, **k)

    monkeypatch.setattr(modeling, "encoder_forward", spy)
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(hf_config(num_attention_heads=4))  # head size 16: any size
    model = transformers.BertForSequenceClassification(hf_config(num_attention_heads=4))
    model.load_state_dict(ref.state_dict())
    ids, tt, mask = inputs()
    bertfast.optimize(model, backend=backend)
    with torch.no_grad():
        want = ref.eval()(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        got = model.eval()(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    assert runs == [(False, True)]  # the PyTorch path, packed
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    m = mask[..., None]
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g * m, w * m, **TOL)
    labels = torch.tensor([0, 1, 1])

    def grads(mdl):
        mdl.train().zero_grad(set_to_none=True)
        mdl(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).loss.backward()
        return {n: p.grad for n, p in mdl.named_parameters() if p.grad is not None}

    want_g, got_g = grads(ref), grads(model)
    assert set(got_g) == set(want_g)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], **tolerance(torch.float32, 10 * GRAD_FACTOR), msg=n)
    bertfast.restore(model)
    runs.clear()
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert not runs
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)


def test_optimize_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="no BERT encoder"):
        bertfast.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="head size"):  # head size 16: the kernels cannot run it
        bertfast.optimize(transformers.BertModel(hf_config(num_attention_heads=4)), backend="triton")
    bertfast.optimize(transformers.BertModel(hf_config(num_attention_heads=4)))  # auto: accepted (CPU: any head size)


def test_optimized_model_validates_inputs():
    model = transformers.BertModel(hf_config()).eval()
    bertfast.optimize(model, backend="triton")
    ids, tt, mask = inputs()
    with pytest.raises(ValueError, match="token id"):
        model(input_ids=ids + 100, attention_mask=mask)


def test_attn_implementation_bertfast():
    bertfast.register_attention()
    torch.manual_seed(0)
    cfg = hf_config()
    ref_model = transformers.BertModel(cfg).eval()
    model = transformers.AutoModel.from_config(cfg, attn_implementation="bertfast").eval()
    model.load_state_dict(ref_model.state_dict())
    assert model.config._attn_implementation == "bertfast"
    ids, tt, mask = inputs()
    calls = []
    orig = bertfast.integration.bertfast_attention_forward

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    transformers.AttentionInterface.register("bertfast", spy)
    try:
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    finally:
        bertfast.register_attention()
    ref = ref_model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(out * mask[..., None], ref * mask[..., None], **TOL)
