"""Gradient (activation) checkpointing on bertfast's own models, with transformers' API
(``gradient_checkpointing_enable`` / ``activation_checkpointing_enable``, which transformers'
Trainer calls): the checkpointed layers run again in the backward, the gradients are those
without it (dropout replayed with the same masks), on both backends."""
import pytest
import torch

import bertfast
from bertfast import BertConfig
from bertfast.kernels.testing import GRAD_FACTOR, tolerance

GTOL = tolerance(torch.float32, 10 * GRAD_FACTOR)
CFG = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
           max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask, torch.tensor([0, 1, 1])


def run(model, calls):
    """Loss and gradients of one training step (fixed dropout seed); the layer calls of the
    forward and of the backward."""
    ids, mask, labels = batch()
    model.train().zero_grad(set_to_none=True)
    calls.clear()
    torch.manual_seed(7)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    n_forward = len(calls)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, n_forward, len(calls) - n_forward


@pytest.mark.parametrize("backend,every_n_layers,use_reentrant", [
    ("torch", 1, False), ("torch", 2, False), ("torch", 1, True),
    pytest.param("triton", 2, False, marks=pytest.mark.interpreter),
    pytest.param("triton", 1, True, marks=pytest.mark.interpreter)])
def test_checkpointing_recomputes_layers_and_keeps_gradients(backend, every_n_layers, use_reentrant):
    torch.manual_seed(0)
    model = bertfast.BertForSequenceClassification(BertConfig(**CFG))
    model.set_backend(backend)
    calls = []
    for i, layer in enumerate(model.bert.encoder.layer):  # (a pre-hook: the recompute stops early, after
        layer.register_forward_pre_hook(lambda *a, i=i: calls.append(i))  # the last tensor the backward needs)
    loss, want, n_forward, n_backward = run(model, calls)
    assert (n_forward, n_backward) == (4, 0)
    assert model.supports_gradient_checkpointing and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
                                        every_n_layers=every_n_layers)
    assert model.is_gradient_checkpointing
    assert [layer.gradient_checkpointing for layer in model.bert.encoder.layer] == \
        [i % every_n_layers == 0 for i in range(4)]
    got_loss, got, n_forward, n_backward = run(model, calls)
    assert n_forward == 4 and n_backward == 4 // every_n_layers  # the checkpointed layers ran again
    torch.testing.assert_close(got_loss, loss, rtol=0, atol=0)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **GTOL, msg=n)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    _, _, n_forward, n_backward = run(model, calls)
    assert (n_forward, n_backward) == (4, 0)
    # no recompute outside training or without gradients
    model.gradient_checkpointing_enable()
    model.eval()
    with torch.no_grad():
        calls.clear()
        model(input_ids=batch()[0])
    assert len(calls) == 4


def test_activation_checkpointing_names_and_offload():
    """transformers >= 5.2x calls activation_checkpointing_enable (its Trainer too); offload keeps
    the saved activations in host memory; the gradients do not change."""
    torch.manual_seed(0)
    model = bertfast.BertForMaskedLM(BertConfig(**{**CFG, "hidden_dropout_prob": 0.0}))
    ids, mask, _ = batch()
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        model.train().zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads()
    model.activation_checkpointing_enable(offload=True)
    assert model.is_activation_checkpointing
    got = grads()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **GTOL, msg=n)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    with pytest.raises(ValueError, match="every_n_layers"):
        model.gradient_checkpointing_enable(every_n_layers=0)
