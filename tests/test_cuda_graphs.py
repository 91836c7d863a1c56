"""CUDA graphs for every shape (bertfast/cuda_graphs.py) and the static packing they replay
(``bertfast.kernels.padding.Packing.from_mask_static``).

On the CPU: the bucket plan (which bucket, how much padding / slack), the static packing against
``Packing.from_mask`` (exact), the runner's capture sequence with a stub graph (the captured
function's inputs are exactly the static buffers, the plan inside is the one built from them,
nothing is read on the host inside, replays follow the buffers' new contents), and the
eligibility rules of ``maybe_replay``.  On a GPU (skipped without one): replay equals eager.
GPU models are random weights of MiniLM-L6 / bert-base shapes built here (no checkpoint).
"""
import copy
import math

import pytest
import torch

import bertfast
import bertfast.modeling as modeling
from bertfast import cuda_graphs as cg
from bertfast.cuda_graphs import BUCKETS, Bucket, CudaGraphRunner, Limits, graph_inputs, plan_bucket
from bertfast.kernels.padding import Packing
from bertfast.kernels.testing import assert_close

F32 = torch.float32

# ----------------------------------------------------------------------------- bucket plan

LIMITS = Limits.make(32, 512)

# (B, S, T or None, packed) -> (batch, seq, tokens), padding (rows, cols, slack)
CASES = [
    ((1, 10, None, False), (1, 16, None), (0, 6, 0)),
    ((1, 16, None, False), (1, 16, None), (0, 0, 0)),
    ((3, 77, None, False), (4, 128, None), (1, 51, 0)),
    ((8, 20, None, False), (8, 32, None), (0, 12, 0)),
    ((1, 128, None, False), (1, 128, None), (0, 0, 0)),
    ((17, 300, None, False), (32, 384, None), (15, 84, 0)),
    ((32, 512, None, False), (32, 512, None), (0, 0, 0)),
    ((1, 10, 7, True), (1, 16, 16), (0, 6, 9)),
    ((1, 16, 16, True), (1, 16, 16), (0, 0, 0)),
    ((3, 77, 150, True), (4, 128, 160), (1, 51, 10)),
    ((3, 77, 160, True), (4, 128, 160), (1, 51, 0)),
    ((3, 77, 161, True), (4, 128, 192), (1, 51, 31)),
    ((2, 384, 700, True), (2, 384, 768), (0, 0, 68)),
    ((5, 300, 1201, True), (8, 384, 1280), (3, 84, 79)),
    ((32, 512, 16383, True), (32, 512, 16384), (0, 0, 1)),
    ((32, 512, 1, True), (32, 512, 16), (0, 0, 15)),
]


@pytest.mark.parametrize("call,bucket,padding", CASES, ids=[str(c[0]) for c in CASES])
def test_plan_bucket_table(call, bucket, padding):
    B, S, T, packed = call
    b = plan_bucket(B, S, T, packed, LIMITS)
    assert b == Bucket(*bucket)
    assert b.packed == packed
    assert b.padding(B, S, T) == dict(zip(("rows", "cols", "slack"), padding))


def test_limits_from_the_one_table():
    assert LIMITS.batch == BUCKETS["batch"][:6] and LIMITS.seq == BUCKETS["seq"]
    small = Limits.make(6, 100)
    assert small.batch == (1, 2, 4, 6) and small.seq == (16, 32, 64, 100)
    assert plan_bucket(5, 70, None, False, small) == Bucket(6, 100)
    assert plan_bucket(5, 70, 300, True, small) == Bucket(6, 100, 320)
    assert plan_bucket(6, 100, 599, True, small) == Bucket(6, 100, 600)  # capped at batch * seq
    custom = Limits.make(8, 64, batch_buckets=[8, 2], seq_buckets=[64, 20])
    assert custom.batch == (2, 8) and custom.seq == (20, 64)
    with pytest.raises(ValueError, match="largest of batch_buckets \\(4\\) must hold 8"):
        Limits.make(8, 64, batch_buckets=[1, 4])
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        Limits.make(0, 64)


def test_token_buckets_are_few_and_fine():
    """Per (batch, seq) bucket: at most four token buckets per doubling (memory is bounded),
    each at most 25 % above the one below (slack is bounded), the last one batch * seq."""
    tokens = BUCKETS["tokens"]
    assert all(b / a <= 1.25 + 1e-9 for a, b in zip(tokens, tokens[1:]))
    for bb in LIMITS.batch:
        for sb in LIMITS.seq:
            tb = LIMITS.token_buckets(bb, sb)
            assert tb[-1] == bb * sb and list(tb) == sorted(set(tb))
            assert len(tb) <= 4 * max(1, math.log2(bb * sb / 16)) + 1, (bb, sb, len(tb))
            for t in (1, bb * sb // 3 + 1, bb * sb):
                b = plan_bucket(min(bb, 32), sb, min(t, min(bb, 32) * sb), True, LIMITS)
                assert b.tokens <= b.batch * b.seq


@pytest.mark.parametrize("args,match", [
    ((33, 16, None, False), "batch size 33 is larger than the largest bucket \\(32\\)"),
    ((1, 513, None, False), "sequence length 513 is larger than the largest bucket \\(512\\)"),
    ((0, 16, None, False), "batch size must be a positive int"),
    ((2, 16, None, True), "needs the real token count"),
    ((2, 16, 33, True), "needs the real token count T in \\[1, B \\* S = 32\\]"),
    ((2, 16, 0, True), "real token count"),
    ((True, 16, None, False), "batch size must be a positive int"),
])
def test_plan_bucket_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        plan_bucket(*args, LIMITS)


# ----------------------------------------------------------------------------- static packing


def _masks():
    g = torch.Generator().manual_seed(3)
    right = (torch.arange(9)[None] < torch.tensor([9, 4, 1])[:, None]).long()
    left = right.flip(1)
    holes = (torch.rand(3, 9, generator=g) > 0.4).long()
    holes[:, 0] = 1
    empty_rows = right.clone()
    empty_rows[1] = 0
    ones = torch.ones(2, 5, dtype=torch.long)
    single = torch.zeros(2, 6, dtype=torch.bool)
    single[1, 3] = True
    return {"right": right, "left": left, "holes": holes, "empty_rows": empty_rows, "ones": ones,
            "single_bool": single}


def _packing(mask):
    seqlens = (mask != 0).sum(1).tolist()
    return Packing.from_mask(mask) or Packing.from_lengths(mask, seqlens)


@pytest.mark.parametrize("name", list(_masks()))
@pytest.mark.parametrize("extra", [0, 3, None])
def test_static_packing_equals_from_mask(name, extra):
    mask = _masks()[name]
    B, S = mask.shape
    ref = _packing(mask)
    T = ref.total
    cap = B * S if extra is None else min(B * S, T + extra)
    sp = Packing.from_mask_static(mask, cap)
    assert sp.slack and sp.seqlens is None and sp.max_seqlen == S and (sp.B, sp.S) == (B, S)
    assert sp.total == cap and sp.indices.dtype == torch.int64
    assert torch.equal(sp.indices[:T], ref.indices)
    assert torch.equal(sp.indices[T:], torch.full((cap - T,), B * S))
    assert torch.equal(sp.cu_seqlens, ref.cu_seqlens) and sp.cu_seqlens.dtype == torch.int32

    x = torch.randn(B, S, 4)
    gathered = sp.gather(x)
    assert gathered.shape == (cap, 4)
    assert torch.equal(gathered[:T], ref.gather(x))
    assert torch.isfinite(gathered).all()  # slack rows read an in-range position
    ids = torch.randint(0, 50, (B, S))
    assert torch.equal(sp.gather(ids)[:T], ref.gather(ids))

    y = gathered * 2 + 1
    y[T:] = float("nan")  # whatever the slack rows hold is dropped
    out = sp.pad(y)
    assert out.shape == (B, S, 4)
    assert torch.equal(out, ref.pad(y[:T]))
    assert torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum()), 4))


def test_static_packing_gradients_skip_slack():
    mask = _masks()["holes"]
    ref, sp = _packing(mask), Packing.from_mask_static(mask, mask.numel())
    T = ref.total
    x = torch.randn(*mask.shape, 3, requires_grad=True)
    g_ref, = torch.autograd.grad((ref.pad(ref.gather(x) * 3) ** 2).sum(), x)
    g_sp, = torch.autograd.grad((sp.pad(sp.gather(x) * 3) ** 2).sum(), x)
    assert torch.equal(g_sp, g_ref)
    assert T < mask.numel()


def test_static_packing_makes_no_host_read(monkeypatch):
    reads = []
    for name in ("tolist", "item", "__bool__"):
        orig = getattr(torch.Tensor, name)
        def counted(t, *a, _o=orig, _n=name, **k):
            reads.append(_n)
            return _o(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    mask = _masks()["left"]
    sp = Packing.from_mask_static(mask, 20)
    sp.pad(sp.gather(torch.randn(3, 9, 2)))
    assert reads == []


def test_static_packing_fallback_without_nonzero_static(monkeypatch):
    """Older torch / devices without nonzero_static: the argsort fallback gives the same."""
    from bertfast.kernels import padding

    mask = _masks()["holes"]
    want = Packing.from_mask_static(mask, 20).indices
    def missing(*a, **kw):
        raise NotImplementedError("nonzero_static is not implemented for this device")

    monkeypatch.setattr(padding.torch, "nonzero_static", missing)
    assert torch.equal(padding._static_indices(mask.reshape(-1) != 0, 20, mask.numel()), want)


def test_static_packing_refuses():
    mask = _masks()["right"]
    for cap, match in ((0, "capacity must be a python int in \\[1, B \\* S = 27\\]"), (28, "27"), (True, "got True"),
                       (2.0, "got 2.0")):
        with pytest.raises(ValueError, match=match):
            Packing.from_mask_static(mask, cap)
    with pytest.raises(ValueError, match="2-D \\(B, S\\) tensor, got \\(27,\\)"):
        Packing.from_mask_static(mask.reshape(-1), 5)
    p = Packing(torch.arange(3), [3], 1, 3)  # the existing constructor: no slack
    assert p.slack is False and p.total == 3


@pytest.mark.interpreter
def test_varlen_attention_never_reads_slack_rows():
    """The varlen kernel reads rows cu_seqlens[b]:cu_seqlens[b + 1] only: NaN in the slack rows
    changes nothing at the real tokens (trusted mode: cu_seqlens[-1] < rows is allowed there)."""
    from bertfast.kernels import attention_varlen
    from bertfast.kernels._common import trusted_inputs

    mask = _masks()["holes"]
    ref = _packing(mask)
    T, cap = ref.total, ref.total + 5
    sp = Packing.from_mask_static(mask, cap)
    q, k, v = torch.randn(3, cap, 2, 32)
    for t in (q, k, v):
        t[T:] = float("nan")
    want = attention_varlen(q[:T].contiguous(), k[:T].contiguous(), v[:T].contiguous(), ref.cu_seqlens,
                            ref.max_seqlen)
    with trusted_inputs():
        got = attention_varlen(q, k, v, sp.cu_seqlens, sp.max_seqlen)
    assert got.shape == (cap, 2, 32)
    assert_close(got[:T], want, msg="varlen with slack rows")


# ----------------------------------------------------------------------------- the runner on CPU


def _tiny_config(**kw):
    return bertfast.BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40, **kw)


def _tensors(obj):
    out = []
    cg._map(lambda t, key: out.append(t) or t, obj)
    return out


class _StubGraph:
    """Replays the captured function eagerly, writing into the captured (static) outputs, as a
    CUDA graph does: the inputs are whatever the static buffers hold now."""

    def __init__(self, fn, output, owner):
        self.fn, self.output, self.owner = fn, output, owner

    def replay(self):
        with self.owner.capturing():
            new = self.fn()
        for dst, src in zip(_tensors(self.output), _tensors(new)):
            dst.copy_(src)
        self.owner.replays += 1


class _StubCapture:
    """CudaGraphRunner's device part on the CPU: counts warm-ups, captures and replays; inside
    the "capture" and every replay, counts host reads of tensor values."""

    def __init__(self, monkeypatch=None, pretend_capturing=None):
        self.warmups = self.captures = self.replays = self.pools = self.host_reads = 0
        self.monkeypatch, self.pretend = monkeypatch, pretend_capturing
        self._in = False

    def new_pool(self):
        self.pools += 1
        return object()

    def release(self):
        pass

    def capturing(self):
        import contextlib

        stub = self

        @contextlib.contextmanager
        def ctx():
            saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "item", "__bool__")}

            def counting(name):
                def f(t, *a, **k):
                    stub.host_reads += 1
                    return saved[name](t, *a, **k)
                return f
            for n in saved:
                setattr(torch.Tensor, n, counting(n))
            if self.pretend is not None:
                self.pretend(True)
            try:
                yield
            finally:
                for n, f in saved.items():
                    setattr(torch.Tensor, n, f)
                if self.pretend is not None:
                    self.pretend(False)
        return ctx()

    def capture(self, fn, pool, warmup):
        for _ in range(max(1, warmup)):
            fn()
            self.warmups += 1
        with self.capturing():
            out = fn()
        self.captures += 1
        return _StubGraph(fn, out, self), out, 1000


class _Spy:
    """Records the tensors every forward of the model is called with and the plan each one took."""

    def __init__(self, model, monkeypatch):
        self.calls, self.plans = [], []
        model.register_forward_pre_hook(lambda m, a, kw: self.calls.append((a, dict(kw))) and None, with_kwargs=True)
        orig = modeling.plan_forward

        def spy(*a, **kw):
            plan = orig(*a, **kw)
            self.plans.append(plan)
            return plan
        monkeypatch.setattr(modeling, "plan_forward", spy)


def _batch(B, S, lengths=None, left=False, holes=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (B, S), generator=g)
    lens = torch.tensor(lengths if lengths is not None else [S] * B)
    mask = (torch.arange(S)[None] < lens[:, None]).long()
    if left:
        mask = mask.flip(1)
    if holes:
        mask[:, 1::3] = 0
        mask[:, 0] = 1
    tt = (torch.arange(S)[None] >= S // 2).long() * mask
    return ids, mask, tt


def _runner(model, capture, **kw):
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq", 32)
    kw.setdefault("warmup", 1)
    return CudaGraphRunner(model, capture=capture, **kw)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the slack row's uninitialised values, never read
@pytest.mark.parametrize("unpad", [True, False])
def test_captured_function_runs_on_exactly_the_static_buffers(unpad, monkeypatch):
    torch.manual_seed(0)
    model = bertfast.BertModel(_tiny_config()).eval().set_backend("triton", unpad=unpad)
    stub = _StubCapture()
    runner = _runner(model, stub)
    spy = _Spy(model, monkeypatch)
    ids, mask, tt = _batch(3, 11, [11, 6, 2])
    out = runner(ids, mask, tt)
    (g,) = runner._graphs.values()
    assert stub.captures == 1 and stub.warmups == 1 and stub.replays == 1
    want_bucket = Bucket(4, 16, 20) if unpad else Bucket(4, 16, None)  # T = 11 + 6 + 2 = 19 real tokens: 1 slack
    assert g.bucket == want_bucket and runner.captured() == [want_bucket]
    # every call of the model (warm-up, capture, replay) took exactly the static buffers, by keyword
    assert len(spy.calls) == 3
    for args, kw in spy.calls:
        assert args == () and set(kw) == {"input_ids", "attention_mask", "token_type_ids"}
        for name in kw:
            assert kw[name] is g.inputs[name], name
    # ... and the plan it took is the override built from those buffers
    inner = [p for p in spy.plans if p.B == 4]
    assert len(inner) == 3 and all(p is not None for p in inner)
    assert inner[-1] is g.plan and (g.plan.B, g.plan.S) == (4, 16)
    buf = g.inputs["attention_mask"]
    if unpad:
        assert g.kind == "packed" and g.plan.packing.slack and g.plan.mask is None
        assert torch.equal(g.plan.packing.indices, Packing.from_mask_static(buf, g.bucket.tokens).indices)
    else:
        assert g.plan.packing is None and g.plan.mask is buf and g.kind == "lengths"
        assert torch.equal(g.plan.key_lengths, torch.tensor([11, 6, 2, 0], dtype=torch.int32))
    # the buffers hold the call, padding rows / columns masked
    assert torch.equal(buf[:3, :11], mask) and not buf[3:].any() and not buf[:, 11:].any()
    assert torch.equal(g.inputs["input_ids"][:3, :11], ids) and torch.equal(g.inputs["token_type_ids"][:3, :11], tt)
    assert stub.host_reads == 0  # nothing read on the host inside the captured function
    # the output: eager's, cut back to (B, S)
    with torch.no_grad():
        ref = model(ids, mask, tt)
    assert out.last_hidden_state.shape == (3, 11, 64) and out.pooler_output.shape == (3, 64)
    real = mask.bool()
    assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], msg="hidden")
    assert_close(out.pooler_output, ref.pooler_output, msg="pooler")
    assert out.last_hidden_state.data_ptr() != g.output.last_hidden_state.data_ptr()  # a copy
    # a smaller call in the same bucket: the buffers are refilled whole (no stale row / column)
    ids2, mask2, tt2 = _batch(3, 9, [9, 9, 2], seed=1)
    out2 = runner(ids2, mask2, tt2)
    assert len(runner._graphs) == 1 and stub.captures == 1 and stub.replays == 2
    assert torch.equal(buf[:3, :9], mask2) and not buf[3:].any() and not buf[:, 9:].any()
    assert not g.inputs["token_type_ids"][:, 9:].any() and (g.inputs["input_ids"][:, 9:] == 0).all()
    with torch.no_grad():
        ref2 = model(ids2, mask2, tt2)
    real = mask2.bool()
    assert_close(out2.last_hidden_state[real], ref2.last_hidden_state[real], msg="second call")
    assert_close(out2.pooler_output, ref2.pooler_output, msg="second pooler")
    assert stub.host_reads == 0


@pytest.mark.interpreter
def test_replays_follow_the_buffers_not_the_capture(monkeypatch):
    """Capture on one batch, then batches with other padding in the same buckets (right, left,
    holes, none, a fully padded row): each replay equals eager on its own batch."""
    torch.manual_seed(0)
    model = bertfast.BertForSequenceClassification(_tiny_config(num_labels=3)).eval().set_backend("triton")
    stub = _StubCapture()
    runner = _runner(model, stub, max_batch=4, max_seq=16)
    batches = [
        _batch(3, 12, [12, 7, 3]),
        _batch(3, 10, [10, 9, 1], seed=1),
        _batch(2, 12, [12, 5], left=True, seed=2),   # pooler reads a padded first token: padded bucket
        _batch(3, 12, [12, 12, 12], holes=True, seed=3),
        _batch(4, 16, seed=4),                        # no padding
        _batch(3, 12, [12, 0, 4], seed=5),            # a fully padded row: the additive padded graph
        _batch(3, 12, [6, 7, 3], seed=6),
    ]
    for i, (ids, mask, tt) in enumerate(batches):
        out = runner(ids, mask, tt)
        with torch.no_grad():
            ref = model(ids, mask, tt)
        assert out.logits.shape == (ids.shape[0], 3)
        assert_close(out.logits, ref.logits, msg=f"batch {i}")
    kinds = sorted(g.kind for g in runner._graphs.values())
    assert "packed" in kinds and "additive" in kinds and ("keys" in kinds or "lengths" in kinds)
    assert stub.captures == len(runner._graphs) < len(batches)
    assert stub.host_reads == 0
    st = runner.stats()
    assert len(st["graphs"]) == len(runner._graphs) and st["reserved_bytes"] == 1000 * len(runner._graphs)
    assert all(r["buffer_bytes"] == 3 * 8 * r["batch"] * r["seq"] and r["output_bytes"] > 0 for r in st["graphs"])


@pytest.mark.interpreter
def test_capture_path_reads_the_mask_buffer(monkeypatch):
    """The capture sequence with the kernels told a capture is on (no host read allowed: the
    attention mask is analysed from the buffer inside the graph), then a replay after the buffer
    was refilled with a different mask: equals eager on the new mask."""
    import sys

    attn = sys.modules["bertfast.kernels.attention"]
    monkeypatch.setattr(attn, "_capturing", lambda device: False, raising=False)

    def pretend(on):
        attn._capturing = (lambda device: True) if on else (lambda device: False)

    torch.manual_seed(0)
    model = bertfast.BertModel(_tiny_config()).eval().set_backend("triton", unpad=False)
    runner = _runner(model, _StubCapture(pretend_capturing=pretend))
    for lengths, holes in (([10, 1], False), ([10, 6], True), ([3, 10], False)):
        ids, mask, tt = _batch(2, 10, lengths, holes=holes)
        out = runner(ids, mask, tt).last_hidden_state
        with torch.no_grad():
            want = model(ids, mask, tt).last_hidden_state
        real = mask.bool()
        assert_close(out[real], want[real], msg=f"{lengths} holes={holes}")


@pytest.mark.interpreter
def test_runner_limits_and_weights(monkeypatch):
    torch.manual_seed(0)
    model = bertfast.BertModel(_tiny_config()).eval().set_backend("triton", unpad=False)
    stub = _StubCapture()
    runner = _runner(model, stub, max_graphs=2)
    for S in (20, 30, 17):
        runner(*_batch(1, S)[:2])
    assert runner.captured_shapes() == [(1, 32)] and len(runner._graphs) == 1  # one bucket
    runner(*_batch(1, 12)[:2])
    runner(*_batch(2, 12)[:2])
    assert len(runner._graphs) == 2 and runner.evictions == 1  # least recently used dropped
    with pytest.raises(ValueError, match="does not fit the largest bucket \\(4, 32\\)"):
        runner(*_batch(5, 8)[:2])
    with pytest.raises(ValueError, match="outside the vocabulary"):  # validated before anything runs
        runner(torch.full((1, 8), 999), None)
    with pytest.raises(ValueError, match="only 0 and 1"):
        runner(torch.ones(1, 8, dtype=torch.long), torch.full((1, 8), 2))
    with pytest.raises(ValueError, match="2-D"):
        runner(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 1, 1, 8))
    before = stub.captures
    with torch.no_grad():
        model.embeddings.word_embeddings.weight = torch.nn.Parameter(model.embeddings.word_embeddings.weight * 1)
    runner(*_batch(2, 12)[:2])  # a replaced weight: graphs hold addresses, so they are dropped
    assert stub.captures == before + 1 and runner.resets == 1
    capped = _runner(model, _StubCapture(), max_memory=1500)
    for B, S in ((1, 5), (1, 20), (2, 5)):  # the stub reports 1000 bytes per capture
        capped(*_batch(B, S)[:2])
    assert capped.resets == 1 and capped.captured() == [Bucket(2, 16)]  # past 1500: all released first
    assert capped.stats()["reserved_bytes"] == 1000
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        runner(*_batch(1, 8)[:2])
    with pytest.raises(ValueError, match="eval mode"):
        _runner(model, _StubCapture())


def test_runner_constructor_refuses():
    model = bertfast.BertModel(_tiny_config()).eval()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            CudaGraphRunner(model)
    with pytest.raises(ValueError, match="max_seq 64 is longer than max_position_embeddings=40"):
        CudaGraphRunner(model, max_seq=64, capture=_StubCapture())
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
        CudaGraphRunner(model, max_graphs=0, capture=_StubCapture())
    with pytest.raises(ValueError, match="torch.nn.Module"):
        CudaGraphRunner("model", capture=_StubCapture())


# ----------------------------------------------------------------------------- maybe_replay


@pytest.mark.interpreter
def test_maybe_replay_eligibility(monkeypatch):
    """The rules, on CPU tensors with the graphs' device type pointed at the CPU (the backend
    resolves to triton there under the interpreter)."""
    monkeypatch.setattr(cg, "_DEVICE_TYPE", "cpu")
    model = bertfast.BertModel(_tiny_config()).eval().set_backend("triton")
    ids, mask, tt = _batch(2, 8)

    def why(*args, **kw):
        got, reason = graph_inputs(model, args, kw)
        assert (got is None) == bool(reason)
        return reason or got

    def same(got, want):
        return len(got) == len(want) and all(a is b for a, b in zip(got, want))

    with torch.no_grad():
        assert same(why(ids, mask, tt), (ids, mask, tt))
        assert same(why(ids), (ids, None, None))
        assert same(why(input_ids=ids, attention_mask=mask, return_dict=True, output_hidden_states=False,
                        labels=None, use_cache=False), (ids, mask, None))
        assert "keyword labels" in why(ids, mask, labels=ids)
        assert "keyword output_hidden_states=True" in why(ids, output_hidden_states=True)
        assert "keyword output_attentions" in why(ids, output_attentions=True)
        assert "keyword return_dict=False" in why(ids, return_dict=False)
        assert "keyword position_ids" in why(ids, position_ids=ids)
        assert "keyword inputs_embeds" in why(inputs_embeds=torch.randn(2, 8, 64))
        assert "given twice" in why(ids, input_ids=ids)
        assert "positionally" in why(ids, mask, tt, None)
        assert "2-D integer" in why(ids.float())
        assert "2-D integer" in why(ids[0])
        assert "attention_mask is not a 2-D" in why(ids, mask[:, None, None, :])
        assert "device" in why(ids.to("meta"))
        assert "largest bucket" in why(torch.ones(33, 8, dtype=torch.long))
        assert "largest bucket" in why(torch.ones(2, 41, dtype=torch.long))  # max_position_embeddings=40
        big = torch.ones(32, 40, dtype=torch.long)  # the largest bucket itself fits
        assert same(why(big), (big, None, None))
        model.set_backend("torch")
        assert "does not resolve to triton" in why(ids)
        model.set_backend("triton", graphs=False)
        assert why(ids) == "graphs=False"
        model.set_backend("triton", graphs=True)
        assert same(why(ids), (ids, None, None))
        model.config.output_hidden_states = True
        try:
            assert "config.output_hidden_states" in why(ids)
        finally:
            model.config.output_hidden_states = False
        handle = model.register_forward_hook(lambda *a: None)
        assert "forward hooks" in why(ids)
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
        try:
            assert "forward hooks" in why(ids)
        finally:
            handle.remove()
        assert same(why(ids), (ids, None, None))
        token = cg._IN_RUNNER.set(True)
        try:
            assert "inside a runner" in why(ids)
        finally:
            cg._IN_RUNNER.reset(token)
        model.train()
        assert why(ids) == "training mode"
        model.eval()
        monkeypatch.setattr(cg, "_capturing_now", lambda: True)
        assert "being captured" in why(ids)
        monkeypatch.setattr(cg, "_capturing_now", lambda: False)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert why(ids) == "compiling / tracing"
        monkeypatch.undo()
        assert why(ids) == "parameters not on CUDA"  # the real device type again
    monkeypatch.setattr(cg, "_DEVICE_TYPE", "cpu")
    assert why(ids) == "grad mode is on"


def test_maybe_replay_cpu_model_runs_eagerly():
    model = bertfast.BertModel(_tiny_config()).eval()
    with torch.no_grad():
        assert cg.maybe_replay(model, (torch.ones(1, 4, dtype=torch.long),), {}) is None
    assert cg.runner_of(model) is None


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the slack rows' uninitialised values, never read
def test_maybe_replay_keeps_one_runner_in_the_model(monkeypatch):
    """The runner lives in the model's __dict__ (not a global, not keyed by tensors); a copy of
    the model gets none; a replayed call equals eager."""
    torch.manual_seed(0)
    model = bertfast.BertModel(_tiny_config()).eval().set_backend("triton")
    stub = _StubCapture()
    monkeypatch.setattr(cg, "_DEVICE_TYPE", "cpu")
    ids, mask, _ = _batch(2, 9, [9, 4])
    with torch.no_grad():
        out = cg.maybe_replay(model, (ids, mask), {}, capture=stub)
        again = cg.maybe_replay(model, (ids, mask), {}, capture=stub)
        ref = model.forward(ids, mask)  # eager (model(...) would replay too: __call__ asks maybe_replay)
    runner = cg.runner_of(model)
    assert isinstance(model.__dict__[cg._RUNNER_ATTR], cg._Slot) and runner.model is model
    assert stub.captures == 1 and stub.replays == 2 and runner.max_batch == cg.AUTO["max_batch"]
    real = mask.bool()
    assert_close(out.last_hidden_state[real], ref.last_hidden_state[real])
    assert torch.equal(out.last_hidden_state, again.last_hidden_state)
    twin = copy.deepcopy(model)
    assert cg.runner_of(twin) is None and cg.runner_of(model) is runner
    assert "_bertfast_cuda_graphs" not in model.state_dict() and not any("graphs" in k for k in model.state_dict())
    cg.drop_graphs(model)
    assert cg.runner_of(model) is None


def test_maybe_replay_falls_back_to_eager_when_a_capture_fails(monkeypatch):
    monkeypatch.setattr(cg, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cg, "graph_inputs", lambda m, a, k: ((a[0], None, None), ""))

    class Broken(_StubCapture):
        def capture(self, fn, pool, warmup):
            self.captures += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    model = bertfast.BertModel(_tiny_config()).eval()
    stub = Broken()
    ids = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="replay is off for this BertModel.*not permitted"):
        assert cg.maybe_replay(model, (ids,), {}, capture=stub) is None
    with torch.no_grad():
        assert cg.maybe_replay(model, (ids,), {}, capture=stub) is None  # off: no second try
        with pytest.raises(ValueError, match="outside the vocabulary"):  # bad input: the forward's own error
            cg.drop_graphs(model)
            cg.maybe_replay(model, (torch.full((1, 4), 999),), {}, capture=stub)
    assert stub.captures == 1


def _graph_warnings(caught) -> list:
    return [str(w.message) for w in caught if "CUDA-graph" in str(w.message)]


@pytest.mark.interpreter
@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_graphs_survive_any_mix_of_inference_mode_and_no_grad(first, monkeypatch):
    """Pre-flight defect (issue 21): the static buffers were made in the first call's grad mode;
    after a first call under ``torch.inference_mode()`` they were inference tensors, a later call
    under ``torch.no_grad()`` could not refill them, and graphs went off for good with a warning
    that "the capture failed".  Now every call replays, in either order of the two modes."""
    import warnings

    monkeypatch.setattr(cg, "_DEVICE_TYPE", "cpu")
    torch.manual_seed(0)
    model = bertfast.BertModel(_tiny_config()).eval().set_backend("triton", unpad=False)
    stub = _StubCapture()
    other = "no_grad" if first == "inference_mode" else "inference_mode"
    modes = [first, other, first, other]
    batches = [_batch(2, 9, [9, 4], seed=i) for i in range(len(modes))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode, (ids, mask, tt) in zip(modes, batches):
            with getattr(torch, mode)():
                out = cg.maybe_replay(model, (ids, mask, tt), {}, capture=stub)
                assert out is not None, (mode, _graph_warnings(caught))
                ref = model.forward(ids, mask, tt)
            real = mask.bool()
            assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], msg=mode)
    assert _graph_warnings(caught) == []
    runner = cg.runner_of(model)
    assert runner.disabled == "" and stub.captures == 1 and stub.replays == len(modes)
    g, = runner._graphs.values()
    assert not any(t.is_inference() for t in g.inputs.values())
    assert not any(t.is_inference() for t in _tensors(g.output))


@pytest.mark.interpreter
def test_a_fill_error_is_not_a_capture_failure(monkeypatch):
    """An error while refilling the buffers runs that call eagerly with a warning that says so;
    graphs stay on (only a failed capture turns them off)."""
    monkeypatch.setattr(cg, "_DEVICE_TYPE", "cpu")
    torch.manual_seed(0)
    model = bertfast.BertModel(_tiny_config()).eval().set_backend("triton", unpad=False)
    stub = _StubCapture()
    ids, mask, tt = _batch(2, 9, [9, 4])
    with torch.no_grad():
        assert cg.maybe_replay(model, (ids, mask, tt), {}, capture=stub) is not None
        runner = cg.runner_of(model)
        fill = runner._fill

        def broken(*a, **k):
            raise RuntimeError("cannot write the buffer")

        monkeypatch.setattr(runner, "_fill", broken)
        with pytest.warns(RuntimeWarning) as caught:
            assert cg.maybe_replay(model, (ids, mask, tt), {}, capture=stub) is None  # this call: eager
        messages = _graph_warnings(caught)
        assert len(messages) == 1 and "cannot write the buffer" in messages[0] and "runs eagerly" in messages[0]
        assert "capture failed" not in messages[0]
        assert runner.disabled == "" and stub.captures == 1
        monkeypatch.setattr(runner, "_fill", fill)
        assert cg.maybe_replay(model, (ids, mask, tt), {}, capture=stub) is not None  # graphs still on
    assert stub.replays == 2 and cg.runner_of(model) is runner


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the slack rows' uninitialised values, never read
@pytest.mark.parametrize("unpad", [True, False])
def test_replay_of_inputs_read_on_the_host_makes_no_device_read(unpad, monkeypatch):
    """Inputs copied by ``bertfast.plan.to_device`` (the mask read on the host before the copy):
    the capture call and every replay read nothing from the device; the same inputs handed over
    as they are cost the plan's one read.  Outputs equal eager (SentenceEncoder's setting:
    torch.inference_mode)."""
    from bertfast.kernels.testing import count_host_reads
    from bertfast.plan import to_device

    monkeypatch.setattr(cg, "_DEVICE_TYPE", "cpu")
    torch.manual_seed(0)
    model = bertfast.BertModel(_tiny_config()).eval().set_backend("triton", unpad=unpad)
    stub = _StubCapture()
    with torch.inference_mode():
        for seed, lengths in enumerate(([9, 4], [9, 9], [3, 7], [9, 4])):
            ids, mask, tt = _batch(2, 9, lengths, seed=seed)
            dev = to_device({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}, model)
            with count_host_reads() as n:
                out = cg.maybe_replay(model, (), dev, capture=stub)
            assert out is not None and n[0] == 0, (lengths, n[0])
            with count_host_reads() as n:
                again = cg.maybe_replay(model, (ids, mask, tt), {}, capture=stub)
            assert n[0] == 1
            ref = model.forward(ids, mask, tt)
            real = mask.bool()
            assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], msg=str(lengths))
            assert torch.equal(out.last_hidden_state, again.last_hidden_state)
    assert stub.host_reads == 0 and stub.replays == 8 and stub.captures == len(cg.runner_of(model)._graphs)


# ----------------------------------------------------------------------------- GPU

SHAPES = {
    "minilm-l6": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2),
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
}


def _gpu_model(cls=None, shape="minilm-l6", dtype=torch.float16, unpad=True, **extra):
    torch.manual_seed(0)
    cls = cls or bertfast.BertModel
    model = cls(bertfast.BertConfig(**SHAPES[shape], **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model.to(device="cuda", dtype=dtype).set_backend("triton", unpad=unpad, graphs=False)


def _gpu_batch(B, S, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30522, (B, S), generator=g)
    lens = torch.randint(max(1, S // 3), S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None] < lens[:, None]).long()
    if kind == "left":
        mask = mask.flip(1)
    elif kind == "none":
        mask = torch.ones(B, S, dtype=torch.long)
    elif kind == "holes":
        mask[:, 2::5] = 0
    elif kind == "empty_row":
        mask[B // 2] = 0
    tt = (torch.arange(S)[None] >= S // 2).long() * mask
    return ids.cuda(), mask.cuda(), tt.cuda()


def _close(out, ref, mask=None, dtype=torch.float16):
    if mask is not None:
        out, ref = out[mask.bool()], ref[mask.bool()]
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() + 1
    assert err <= (2e-2 if dtype == torch.float16 else 8e-2) * scale, (err, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("kind", ["right", "left", "none", "holes", "empty_row"])
def test_gpu_replay_equals_eager(kind, unpad):
    model = _gpu_model(unpad=unpad)
    runner = CudaGraphRunner(model, max_batch=8, max_seq=128)
    for B, S, seed in ((3, 77, 0), (8, 128, 1), (3, 70, 2), (1, 5, 3)):
        ids, mask, tt = _gpu_batch(B, S, kind, seed)
        with torch.no_grad():
            ref = model(ids, mask, tt)
        out = runner(ids, mask, tt)
        assert out.last_hidden_state.shape == (B, S, 384) and out.pooler_output.shape == (B, 384)
        _close(out.last_hidden_state, ref.last_hidden_state, mask)
        _close(out.pooler_output, ref.pooler_output)
    if unpad and kind in ("right", "holes"):
        assert any(b.packed for b in runner.captured())
    st = runner.stats()
    assert st["graphs"] and all(r["reserved_bytes"] >= 0 and r["output_bytes"] > 0 for r in st["graphs"])


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [True, False])
def test_gpu_replay_after_the_mask_changes(unpad):
    """Same bucket, different padding each call (captured on the first): replays follow the
    buffers, not the capture's batch."""
    model = _gpu_model(unpad=unpad)
    runner = CudaGraphRunner(model, max_batch=4, max_seq=64)
    ids, _, tt = _gpu_batch(4, 60, "right")
    for seed, kind in enumerate(("right", "holes", "right", "left", "none", "right")):
        _, mask, _ = _gpu_batch(4, 60, kind, seed)
        with torch.no_grad():
            ref = model(ids, mask, tt)
        out = runner(ids, mask, tt)
        _close(out.last_hidden_state, ref.last_hidden_state, mask)
    assert len(runner.captured()) <= 3  # packed / padded variants of one (4, 64) bucket


@pytest.mark.gpu
def test_gpu_heads_and_dtypes():
    for cls, extra in ((bertfast.BertForSequenceClassification, dict(num_labels=3)),
                       (bertfast.BertForTokenClassification, dict(num_labels=5)),
                       (bertfast.BertForQuestionAnswering, {}),
                       (bertfast.BertForMaskedLM, {})):
        for dtype in (torch.float16, torch.bfloat16):
            model = _gpu_model(cls, dtype=dtype, **extra)
            runner = CudaGraphRunner(model, max_batch=4, max_seq=64)
            ids, mask, tt = _gpu_batch(3, 50, "right")
            with torch.no_grad():
                ref = model(ids, mask, tt)
            out = runner(ids, mask, tt)
            for key in ref.keys():
                if torch.is_tensor(ref[key]):
                    assert out[key].shape == ref[key].shape, (cls.__name__, key)
                    per_token = ref[key].dim() >= 2 and ref[key].shape[:2] == mask.shape
                    _close(out[key], ref[key], mask if per_token else None, dtype)


@pytest.mark.gpu
def test_gpu_bert_base_shape():
    model = _gpu_model(shape="bert-base")
    runner = CudaGraphRunner(model, max_batch=4, max_seq=256)
    ids, mask, tt = _gpu_batch(4, 200, "right")
    with torch.no_grad():
        ref = model(ids, mask, tt)
    _close(runner(ids, mask, tt).last_hidden_state, ref.last_hidden_state, mask)


@pytest.mark.gpu
def test_gpu_optimized_transformers_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**SHAPES["minilm-l6"], num_labels=2))
    hf = hf.eval().cuda().half()
    bertfast.optimize(hf)
    runner = CudaGraphRunner(hf, max_batch=8, max_seq=128)
    for kind in ("right", "left", "none"):
        ids, mask, tt = _gpu_batch(5, 100, kind)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        out = runner(ids, mask, tt)
        _close(out.logits, ref.logits)


@pytest.mark.gpu
def test_gpu_default_on_inference_replays():
    """bertfast's models replay by default for inference on CUDA (maybe_replay in __call__);
    graphs=False, grad mode and training run eagerly."""
    model = _gpu_model()
    ids, mask, tt = _gpu_batch(3, 40, "right")
    with torch.no_grad():
        ref = model(ids, mask, tt)  # graphs=False: eager
        assert cg.runner_of(model) is None
        model.set_backend("triton", graphs=True)
        out = model(ids, mask, tt)
        out2 = model(ids, mask, tt)
    runner = cg.runner_of(model)
    assert runner is not None and len(runner.captured()) == 1
    _close(out.last_hidden_state, ref.last_hidden_state, mask)
    assert torch.equal(out.last_hidden_state, out2.last_hidden_state)
    model(ids, mask, tt)  # grad mode: eager, no new capture
    assert sum(g.replays for g in runner._graphs.values()) == 2


def test_model_call_asks_maybe_replay_first(monkeypatch):
    """bertfast's models' __call__ offers every call to maybe_replay (the default-on path for
    inference on CUDA) and runs the forward when it declines; heads included."""
    seen = []

    def spy(model, args, kwargs):
        seen.append(type(model).__name__)
        return None

    monkeypatch.setattr(cg, "maybe_replay", spy)
    model = bertfast.BertModel(_tiny_config()).eval()
    head = bertfast.BertForSequenceClassification(_tiny_config()).eval()
    ids = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert model(ids).last_hidden_state.shape[:2] == (1, 4)
        head(ids)
    assert seen == ["BertModel", "BertForSequenceClassification"]  # a head runs its encoder directly
