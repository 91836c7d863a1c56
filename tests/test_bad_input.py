"""Every bad input raises ValueError naming the problem, before any computation."""
import pytest
import torch

import bertfast
from bertfast import BertConfig, BertModel

B, S = 2, 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=8, type_vocab_size=2)).eval()
    m.calls = 0

    def hook(*_):
        m.calls += 1

    m.embeddings.register_forward_pre_hook(hook)  # counts computations that started
    return m


@pytest.fixture
def ids():
    return torch.randint(1, 50, (B, S), generator=torch.Generator().manual_seed(0))


def check(model, match, **kw):
    before = model.calls
    with pytest.raises(ValueError, match=match):
        model(**kw)
    assert model.calls == before, "the model started computing before raising"


def test_good_input_runs(model, ids):
    before = model.calls
    model(input_ids=ids, attention_mask=torch.ones(B, S), token_type_ids=torch.zeros(B, S, dtype=torch.long))
    assert model.calls == before + 1


@pytest.mark.parametrize("bad, match", [
    (50, r"token id 50 outside the vocabulary \[0, vocab_size=50\)"),
    (-1, r"token id -1 outside the vocabulary"),
])
def test_token_id_out_of_range(model, ids, bad, match):
    ids[1, 3] = bad
    check(model, match, input_ids=ids)


@pytest.mark.parametrize("bad", [2, -1])
def test_token_type_out_of_range(model, ids, bad):
    tt = torch.zeros(B, S, dtype=torch.long)
    tt[0, 2] = bad
    check(model, rf"token_type_ids holds token type {bad} outside \[0, type_vocab_size=2\)", input_ids=ids,
          token_type_ids=tt)


def test_token_type_shape_and_dtype(model, ids):
    check(model, "token_type_ids has shape", input_ids=ids, token_type_ids=torch.zeros(B, S + 1, dtype=torch.long))
    check(model, "token_type_ids must be an integer tensor", input_ids=ids, token_type_ids=torch.zeros(B, S))


def test_sequence_too_long(model):
    check(model, r"sequence length 9 is longer than max_position_embeddings=8", input_ids=torch.ones(1, 9, dtype=torch.long))


@pytest.mark.parametrize("shape", [(B, S + 1), (B + 1, S), (B * S,), (B, S, 1)])
def test_attention_mask_shape(model, ids, shape):
    match = "attention_mask has shape" if len(shape) == 2 else "attention_mask must have 2 dims"
    check(model, match, input_ids=ids, attention_mask=torch.ones(shape))


def test_2d_mask_values_not_0_1(model, ids):
    m = torch.ones(B, S)
    m[0, 1] = 0.5
    check(model, "must hold only 0 and 1", input_ids=ids, attention_mask=m)
    check(model, "must hold only 0 and 1", input_ids=ids, attention_mask=torch.full((B, S), 2))


def test_4d_mask_wrong_dtype_or_shape(model, ids):
    check(model, "must have the model's dtype float32, got float64", input_ids=ids,
          attention_mask=torch.zeros(B, 1, 1, S, dtype=torch.float64))
    check(model, "must have the model's dtype float32, got int64", input_ids=ids,
          attention_mask=torch.zeros(B, 1, 1, S, dtype=torch.long))
    check(model, "does not broadcast", input_ids=ids, attention_mask=torch.zeros(B, 3, S, S))
    model(input_ids=ids, attention_mask=torch.zeros(1, 1, S, S))  # broadcastable: fine


def test_both_or_neither_ids_and_embeds(model, ids):
    check(model, "exactly one of input_ids or inputs_embeds")
    check(model, "exactly one of input_ids or inputs_embeds", input_ids=ids, inputs_embeds=torch.zeros(B, S, 16))


def test_inputs_embeds_checks(model):
    check(model, "inputs_embeds must have shape", inputs_embeds=torch.zeros(B, S, 15))
    check(model, "inputs_embeds has dtype float64", inputs_embeds=torch.zeros(B, S, 16, dtype=torch.float64))


@pytest.mark.parametrize("pos, match", [
    (torch.tensor([0, 1, 2, 3, 4, 8]), r"position 8 outside \[0, max_position_embeddings=8\)"),
    (torch.tensor([-1, 1, 2, 3, 4, 5]), "position -1 outside"),
    (torch.arange(S + 1), "position_ids has shape"),
    (torch.arange(S).float(), "position_ids must be an integer tensor"),
])
def test_position_ids(model, ids, pos, match):
    check(model, match, input_ids=ids, position_ids=pos)


@pytest.mark.parametrize("bad, match", [
    (torch.ones(B, S), "input_ids must be an integer tensor, got float32"),
    (torch.ones(B, S, dtype=torch.bool), "input_ids must be an integer tensor, got bool"),
    (torch.ones(S, dtype=torch.long), r"input_ids must have 2 dims \(batch, seq_len\), got shape \(6,\)"),
    (torch.ones(1, B, S, dtype=torch.long), "input_ids must have 2 dims"),
    (torch.ones(B, 0, dtype=torch.long), "empty input"),
    ([[1, 2, 3]], "input_ids must be an integer tensor, got list"),
])
def test_bad_input_ids(model, bad, match):
    check(model, match, input_ids=bad)


def test_heads_validate_too():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=8)
    for cls in (bertfast.BertForMaskedLM, bertfast.BertForSequenceClassification,
                bertfast.BertForTokenClassification, bertfast.BertForQuestionAnswering):
        with pytest.raises(ValueError, match="token id 77"):
            cls(cfg)(input_ids=torch.tensor([[1, 77]]))
