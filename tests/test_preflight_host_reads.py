"""Zero device reads per forward when the host already knows the lengths (issue 21, item 2).

``bertfast.plan.to_device(batch, model)`` checks a batch of host (CPU) inputs and reads the
mask's padding statistics on the host, then copies the batch to the model's device; a forward
given those copies plans from what was read on the host.  On this CPU machine the model's device
is the CPU too, so "device reads" are counted around the forward (``count_host_reads``): one per
forward from tensors that did not come through ``to_device``, none from its copies.  The copies
give exactly the outputs of the inputs they were made from, on every route (packed, padded with
key lengths, per-key mask, additive mask for a fully padded row), and a copy written to after
``to_device`` is read again."""
import pytest
import torch

import bertfast
from bertfast.kernels.testing import count_host_reads
from bertfast.plan import plan_forward, to_device

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
S = 10


def _config(**kw):
    return bertfast.BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40, **kw)


def _masks():
    lens = torch.tensor([10, 6, 2])
    right = (torch.arange(S)[None] < lens[:, None]).long()
    holes = right.clone()
    holes[0, 3:5] = 0
    empty = right.clone()
    empty[1] = 0
    return {"right": right, "left": right.flip(1), "holes": holes, "empty_row": empty,
            "full": torch.ones(3, S, dtype=torch.long), "none": None}


def _batch(mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (3, S), generator=g)
    batch = {"input_ids": ids, "token_type_ids": (torch.arange(S)[None] >= 5).long().expand(3, S).contiguous()}
    if mask is not None:
        batch["attention_mask"] = mask
    return batch


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a.keys() if torch.is_tensor(a[k]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("mask_name", list(_masks()))
def test_copies_from_to_device_plan_without_a_device_read(backend, unpad, mask_name):
    torch.manual_seed(0)
    model = bertfast.BertForSequenceClassification(_config(num_labels=3)).eval().set_backend(backend, unpad=unpad)
    batch = _batch(_masks()[mask_name])
    with torch.no_grad():
        with count_host_reads() as n:
            want = model(**batch)
        assert n[0] == 1  # the plan's one read, from the inputs as given
        with count_host_reads() as n:
            dev = to_device(batch, model)
        assert n[0] == 1  # the same read, on the host tensors, before the copy
        for _ in range(2):  # and as often as the copies are used
            with count_host_reads() as n:
                got = model(**dev)
            assert n[0] == 0, f"{n[0]} device reads in a forward of to_device's copies"
            assert _equal(got, want)
    assert set(dev) == set(batch) and all(dev[k] is not batch[k] and torch.equal(dev[k], batch[k]) for k in batch)


def test_plan_from_the_host_equals_the_plan_from_the_device():
    cfg = _config()
    model = bertfast.BertModel(cfg).eval()
    for name, mask in _masks().items():
        if mask is None:
            continue
        batch = _batch(mask)
        dev = to_device(batch, model)
        for triton, unpad, first in ((False, True, True), (True, True, False), (True, False, True),
                                     (True, "always", True)):
            kw = dict(triton=triton, unpad=unpad, reads_first_token=first)
            want = plan_forward(cfg, batch["input_ids"], mask, batch["token_type_ids"], None, None, torch.float32, **kw)
            with count_host_reads() as n:
                got = plan_forward(cfg, dev["input_ids"], dev["attention_mask"], dev["token_type_ids"], None, None,
                                   torch.float32, **kw)
            assert n[0] == 0
            what = f"{name} triton={triton} unpad={unpad}"
            assert (got.B, got.S, got.reason, got.reads_padding, got.masked) == \
                (want.B, want.S, want.reason, want.reads_padding, want.masked), what
            assert (got.packing is None) == (want.packing is None), what
            if want.packing is not None:
                assert got.packing.seqlens == want.packing.seqlens and got.packing.max_seqlen == want.packing.max_seqlen
                assert torch.equal(got.packing.indices, want.packing.indices), what
                assert torch.equal(got.packing.cu_seqlens, want.packing.cu_seqlens), what
            for field in ("mask", "key_lengths"):
                a, b = getattr(got, field), getattr(want, field)
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (what, field)


def test_a_copy_written_to_afterwards_is_read_again():
    torch.manual_seed(0)
    model = bertfast.BertModel(_config()).eval()
    batch = _batch(_masks()["right"])
    dev = to_device(batch, model)
    with torch.no_grad():
        dev["attention_mask"][0, 7:] = 0  # in place: the version counter moves
        with count_host_reads() as n:
            got = model(**dev)
        assert n[0] == 1
        want = model(**{k: v.clone() for k, v in dev.items()})
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        dev = to_device(batch, model)
        view = dev["input_ids"][:, :5]  # a view is another tensor: not one to_device made
        with count_host_reads() as n:
            model(input_ids=view, attention_mask=dev["attention_mask"][:, :5])
        assert n[0] == 1
        with count_host_reads() as n:  # combined with an input from elsewhere
            model(input_ids=dev["input_ids"], attention_mask=dev["attention_mask"],
                  token_type_ids=torch.zeros(3, S, dtype=torch.long))
        assert n[0] == 1
        with count_host_reads() as n:  # another model's config: checked against that one instead
            bertfast.BertModel(_config()).eval()(**dev)
        assert n[0] == 1
        with count_host_reads() as n:  # a forward with labels reads them on the device
            bertfast.BertForTokenClassification(model.config).eval()(**dev, labels=torch.zeros(3, S, dtype=torch.long))
        assert n[0] == 1
        with count_host_reads() as n:  # the copies themselves are still as read
            model(**dev)
        assert n[0] == 0


def test_under_inference_mode_the_copies_keep_their_version_counters():
    """SentenceEncoder encodes under torch.inference_mode(): the copies are still ordinary
    tensors (an inference tensor has no version counter, so a write to it could not be seen)."""
    torch.manual_seed(0)
    model = bertfast.BertModel(_config()).eval()
    batch = _batch(_masks()["holes"])
    with torch.inference_mode():
        dev = to_device(batch, model)
        assert not any(t.is_inference() for t in dev.values())
        with count_host_reads() as n:
            got = model(**dev)
        assert n[0] == 0
        dev["attention_mask"][2, 0] = 0
        with count_host_reads() as n:
            model(**dev)
        assert n[0] == 1
    with torch.no_grad():
        want = model(**batch)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


@pytest.mark.parametrize("change,match", [
    (lambda b: b["input_ids"].__setitem__((0, 0), 60), "outside the vocabulary"),
    (lambda b: b["attention_mask"].__setitem__((0, 0), 2), "only 0 and 1"),
    (lambda b: b["token_type_ids"].__setitem__((0, 0), 2), "outside \\[0, type_vocab_size=2\\)"),
    (lambda b: b.__setitem__("attention_mask", b["attention_mask"][:, :4]), "attention_mask has shape"),
])
def test_bad_input_is_refused_by_to_device(change, match):
    model = bertfast.BertModel(_config()).eval()
    batch = {k: v.clone() for k, v in _batch(_masks()["right"]).items()}
    change(batch)
    with pytest.raises(ValueError, match=match):
        to_device(batch, model)


def test_plain_cpu_copies_are_not_remembered_a_numpy_write_is_seen(monkeypatch):
    """Off the interpreter (a plain CPU run), a CPU copy is read again by the plan: a write
    through a numpy view does not move the version counter, so remembering it would go stale."""
    from bertfast import kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)
    torch.manual_seed(0)
    model = bertfast.BertModel(_config()).eval()
    batch = _batch(_masks()["right"])
    dev = to_device(batch, model)
    dev["attention_mask"].numpy()[0, 4:] = 0  # no version-counter bump
    with torch.no_grad():
        got = model(**dev)
        want = model(**{k: v.clone() for k, v in dev.items()})
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
