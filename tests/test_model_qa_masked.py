"""unpad="always" (masked semantics) with a QA start / end position on a padded token: that
position is ignored, as transformers ignores one outside the sequence and as the token heads
ignore labels on padding (before: the padded token's logit was finfo.min and the loss 1.7e38)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import bertfast
from bertfast import BertConfig
from bertfast.kernels.testing import tolerance

transformers = pytest.importorskip("transformers")

TOL = tolerance(torch.float32)
CFG = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
           max_position_embeddings=32, num_labels=2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ours = bertfast.BertForQuestionAnswering(BertConfig(**CFG)).eval()
    d = tmp_path_factory.mktemp("qa")
    ours.save_pretrained(d)
    ref = transformers.BertForQuestionAnswering.from_pretrained(d, attn_implementation="eager").eval()
    return ours, ref


def batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


def masked_reference(ref, ids, mask, starts, ends):
    """transformers' logits, its loss rule (positions clamped to S, S ignored), the softmax over
    the real tokens only and positions on padded tokens ignored."""
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask)
    pad = mask == 0
    S = ids.shape[1]
    neg = torch.finfo(torch.float32).min

    def term(logits, pos):
        pos = pos.clamp(0, S)
        on_pad = pad.gather(1, pos.clamp(max=S - 1)[:, None])[:, 0] & (pos < S)
        return F.cross_entropy(logits.masked_fill(pad, neg), pos.masked_fill(on_pad, S), ignore_index=S)

    return (term(out.start_logits, starts) + term(out.end_logits, ends)) / 2


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_positions_on_padding_are_ignored_under_unpad_always(pair, backend):
    ours, ref = pair
    ids, mask = batch()
    ours.set_backend(backend, unpad="always")
    try:
        cases = [
            (torch.tensor([2, 8, 5]), torch.tensor([4, 9, 6])),  # row 1's start and end on right padding
            (torch.tensor([2, 3, 1]), torch.tensor([4, 5, 2])),  # row 2's start and end on left padding
            (torch.tensor([2, 8, 4]), torch.tensor([4, 5, 0])),  # one of each, mixed with real ones
            (torch.tensor([2, 3, 50]), torch.tensor([4, 5, 7])),  # beyond S: ignored, as transformers
        ]
        for starts, ends in cases:
            with torch.no_grad():
                got = ours(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends).loss
            assert torch.isfinite(got) and got < 100, (starts, ends, got)
            torch.testing.assert_close(got, masked_reference(ref, ids, mask, starts, ends), **TOL)
        # positions on real tokens only: the masked loss as before
        starts, ends = torch.tensor([2, 3, 5]), torch.tensor([4, 5, 7])
        with torch.no_grad():
            got = ours(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends).loss
        torch.testing.assert_close(got, masked_reference(ref, ids, mask, starts, ends), **TOL)
    finally:
        ours.set_backend("auto", unpad=True)


def test_exact_mode_keeps_transformers_loss_on_padding(pair):
    """unpad=True (the default): a position on a padded token reads that token's logit, exactly
    as transformers does (the padded batch runs)."""
    ours, ref = pair
    ids, mask = batch()
    starts, ends = torch.tensor([2, 8, 1]), torch.tensor([4, 9, 2])
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends).loss
        want = ref(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends).loss
    torch.testing.assert_close(got, want, **TOL)
