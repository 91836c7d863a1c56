"""No cache keyed on a tensor's identity: the attention mask is read as it is now.

``kernels/attention.py`` used to keep the analysis of the last 2-D mask it saw, keyed on the
tensor's identity, version counter and data pointer.  A mask refilled without a version bump
(through a numpy view) reused the old analysis, and a CUDA graph captured after a warm-up took
the warm-up's analysis (every replay attended to the warm-up mask's keys).  Now a raw mask is
analysed at every call, and ``prepare_attention_mask`` gives the explicit, once-per-forward
alternative (``AttentionMask``).  The CUDA-graph capture path is followed on CPU by marking the
stream as capturing (``bertfast.kernels.attention._capturing``) inside ``trusted_inputs()``, as
``bertfast.CudaGraphRunner`` runs the model (with a pretended graph: bertfast/cuda_graphs.py).
"""
import os
import pathlib
import sys

import pytest
import torch

from bertfast import kernels  # noqa: F401
from bertfast.kernels import ops
from bertfast.kernels._common import trusted_inputs
from bertfast.kernels.attention import (
    HEAD_DIMS,
    MASK_ADD,
    MASK_KEYS,
    MASK_LENS,
    AttentionMask,
    attention,
    attention_reference,
    prepare_attention_mask,
    supports_head_dim,
)
from bertfast.kernels.testing import assert_close, nan_like, tolerance

ATTN = sys.modules["bertfast.kernels.attention"]  # the package binds ``bertfast.kernels.attention`` to the function
F32 = torch.float32


def _qkv(B, H, S, D=32, dtype=F32):
    return torch.randn(3, B, H, S, D).to(dtype)


def _prefix(lengths, S):
    return (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.fixture
def capturing(monkeypatch):
    """Pretend a CUDA graph is being captured (the capture path, followed on CPU)."""
    monkeypatch.setattr(ATTN, "_capturing", lambda device: True)


@pytest.fixture
def inductor_env(monkeypatch):
    """torch.compile / opcheck set TORCHINDUCTOR_CACHE_DIR in os.environ on first use: set it
    first (to the value torch would pick) so that the test leaves os.environ as it found it."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # pragma: no cover - other torch versions
        return
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


class _HostReads:
    """Counts host reads of tensor values (``tolist`` / ``item`` / ``bool``)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("tolist", "item", "__bool__"):
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **kw):
                self.n += 1
                return _orig(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.fixture
def host_reads(monkeypatch):
    return _HostReads(monkeypatch)


# ----------------------------------------------------------------------------- the defects


@pytest.mark.interpreter
def test_mask_refilled_through_numpy_view_is_read_again():
    """A refill through a numpy view does not bump the version counter: the old identity cache
    kept the first analysis (a prefix mask's key lengths) and was 1.9 off the reference."""
    B, H, S = 2, 1, 20
    q, k, v = _qkv(B, H, S)
    mask = _prefix([20, 8], S)
    assert_close(attention(q, k, v, mask), attention_reference(q, k, v, mask))
    version = mask._version
    mask.numpy()[:] = 0
    mask.numpy()[:, 0] = 1
    mask.numpy()[1, 13] = 1  # a hole: no longer a prefix mask
    assert mask._version == version  # really no version bump
    assert_close(attention(q, k, v, mask), attention_reference(q, k, v, mask))


@pytest.mark.interpreter
def test_mask_refilled_through_numpy_view_is_read_again_in_trusted_mode():
    B, H, S = 2, 1, 20
    q, k, v = _qkv(B, H, S)
    mask = _prefix([20, 8], S)
    with trusted_inputs():
        attention(q, k, v, mask)
        mask.numpy()[0, 3:] = 0
        mask.numpy()[1, :] = 1
        assert_close(attention(q, k, v, mask), attention_reference(q, k, v, mask))


@pytest.mark.interpreter
def test_capture_path_reads_the_mask_buffer_not_the_warmup(capturing):
    """CudaGraphRunner warms up on its static mask buffer (key 0 only), then captures: the
    capture must compute the key mask from the buffer (so that replays see each new mask), not
    take the warm-up's analysis.  The buffer is refilled in between without a version bump."""
    B, H, S = 2, 2, 24
    q, k, v = _qkv(B, H, S)
    buf = torch.zeros(B, S, dtype=torch.long)
    buf[:, 0] = 1
    with trusted_inputs():
        ATTN._capturing = lambda device: False  # the warm-up runs outside the capture
        attention(q, k, v, buf)
        attention(q, k, v, buf)
        ATTN._capturing = lambda device: True  # now "capturing" (the fixture restores the original)
        buf.numpy()[:] = _prefix([24, 17], S).numpy()
        buf.numpy()[1, 5] = 0
        out = attention(q, k, v, buf)
    assert_close(out, attention_reference(q, k, v, buf))


@pytest.mark.interpreter
def test_model_mask_refilled_through_numpy_view_triton_padded():
    """Model level (the padded triton path, as CUDA graphs run it): 0.02 off before."""
    from bertfast import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertModel(cfg).eval().set_backend("triton", unpad=False)
    ids = torch.randint(1, 50, (2, 12))
    mask = _prefix([12, 5], 12)
    with torch.no_grad():
        model(ids, mask)
        mask.numpy()[0, 7:] = 0
        mask.numpy()[1, 2] = 0
        got = model(ids, mask).last_hidden_state
        want = model(ids, mask.clone()).last_hidden_state
    real = mask.bool()
    assert_close(got[real], want[real], msg="refilled mask")


class _PretendGraph:
    """A CUDA graph stand-in on the CPU: replay re-runs the captured function with the kernels
    told a capture is on (no host read), writing into the captured (static) output."""

    def __init__(self, fn, output):
        self.fn, self.output = fn, output

    def replay(self):
        ATTN._capturing = lambda device: True
        try:
            new = self.fn()
        finally:
            ATTN._capturing = lambda device: False
        self.output.last_hidden_state.copy_(new.last_hidden_state)
        self.output.pooler_output.copy_(new.pooler_output)


class _PretendCapture:
    """CudaGraphRunner's device part on the CPU: warm-up outside the capture, then the
    (pretended) capture with the kernels told a capture is on."""

    def new_pool(self):
        return None

    def release(self):
        pass

    def capture(self, fn, pool, warmup):
        ATTN._capturing = lambda device: False
        for _ in range(max(1, warmup)):
            fn()
        graph = _PretendGraph(fn, None)
        ATTN._capturing = lambda device: True
        try:
            graph.output = fn()
        finally:
            ATTN._capturing = lambda device: False
        return graph, graph.output, 0


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # packed: the slack rows' uninitialised values, never read
@pytest.mark.parametrize("unpad", [False, True])
def test_model_capture_path_reads_the_mask_buffer(capturing, unpad):
    """The CudaGraphRunner capture sequence on CPU (bertfast/cuda_graphs.py): trusted inputs, the
    plan forced to the one built from the static buffers, warm-up and (pretended) capture on the
    first batch, then replays of batches with other padding through the same buffer tensor:
    each equals eager on its own mask (nothing captured kept the warm-up's mask analysis,
    packing or plan)."""
    from bertfast import BertConfig, BertModel
    from bertfast.cuda_graphs import CudaGraphRunner

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertModel(cfg).eval().set_backend("triton", unpad=unpad)
    ids = torch.randint(1, 50, (2, 10))
    runner = CudaGraphRunner(model, max_batch=2, max_seq=16, warmup=2, capture=_PretendCapture())
    holes = _prefix([10, 6], 10)
    holes[1, 2] = 0
    for mask in (_prefix([10, 1], 10), holes, _prefix([7, 6], 10), _prefix([10, 3], 10)):
        got = runner(ids, mask).last_hidden_state
        with torch.no_grad():
            want = model(ids, mask).last_hidden_state
        real = mask.bool()
        assert_close(got[real], want[real], factor=10, msg=f"capture path {mask.tolist()}")
    assert len(runner._graphs) <= 2 < 4  # replays, not one capture per batch


def test_no_identity_caches_in_kernels():
    """No cache in kernels/ keyed on a tensor's identity, version counter or data pointer."""
    root = pathlib.Path(ATTN.__file__).parent
    assert not hasattr(ATTN, "_MASK_CACHE")
    for path in sorted(root.glob("*.py")):
        src = path.read_text()
        assert "._version" not in src, path.name
        assert "weakref" not in src, path.name
        # data_ptr() only for alignment checks (``% 16``) and storage-alias checks
        for line in src.splitlines():
            if "data_ptr()" in line:
                assert "% 16" in line or "untyped_storage()" in line, (path.name, line)


# ----------------------------------------------------------------------------- prepare_attention_mask


def test_prepare_kinds():
    B, H, S = 3, 2, 8
    assert prepare_attention_mask(None, B, H, S).is_empty
    assert prepare_attention_mask(torch.ones(B, S, dtype=torch.long), B, H, S).is_empty  # analysed: all ones
    pm = prepare_attention_mask(_prefix([8, 3, 0], S), B, H, S)
    assert pm.kind == MASK_LENS and pm.kvlen.tolist() == [8, 3, 0] and pm.mask is None
    holes = _prefix([8, 3, 5], S)
    holes[0, 2] = 0
    pm = prepare_attention_mask(holes, B, H, S)
    assert pm.kind == MASK_KEYS and pm.mask.dtype == torch.int8 and pm.kvlen.tolist() == [8, 3, 5]
    add = torch.zeros(B, 1, S, S)
    pm = prepare_attention_mask(add, B, H, S)
    assert pm.kind == MASK_ADD and pm.kvlen is None and pm.mask.dtype == F32
    pm = prepare_attention_mask(torch.ones(B, 1, 1, S, dtype=torch.bool), B, None, S)
    assert pm.kind == MASK_ADD and pm.mask.shape == (B, 1, 1, S)


def test_prepare_host_reads(host_reads, monkeypatch):
    """One host read per analysis; none in trusted mode, with analyze=False, or while capturing
    (even with analyze=True)."""
    B, H, S = 2, 2, 8
    mask = _prefix([8, 3], S)
    host_reads.n = 0
    assert prepare_attention_mask(mask, B, H, S).kind == MASK_LENS
    assert host_reads.n == 1
    host_reads.n = 0
    with trusted_inputs():
        assert prepare_attention_mask(mask, B, H, S).kind == MASK_KEYS
        assert host_reads.n == 0
        assert prepare_attention_mask(mask, B, H, S, analyze=True).kind == MASK_LENS  # explicit: one read
        assert host_reads.n == 1
    host_reads.n = 0
    assert prepare_attention_mask(mask, B, H, S, analyze=False).kind == MASK_KEYS
    monkeypatch.setattr(ATTN, "_capturing", lambda device: True)
    assert prepare_attention_mask(mask, B, H, S, analyze=True).kind == MASK_KEYS
    assert host_reads.n == 0


def test_prepare_validates():
    B, H, S = 2, 2, 8
    with pytest.raises(ValueError, match="only 0 and 1"):
        prepare_attention_mask(torch.full((B, S), 2), B, H, S)
    with trusted_inputs():  # no value check without a host read
        assert prepare_attention_mask(torch.full((B, S), 2), B, H, S).kind == MASK_KEYS
    with pytest.raises(ValueError, match="2-D attention_mask has shape"):
        prepare_attention_mask(torch.ones(B, S + 1), B, H, S)
    with pytest.raises(ValueError, match="not broadcastable"):
        prepare_attention_mask(torch.zeros(B, 3, S, S), B, H, S)
    with pytest.raises(ValueError, match="2-D \\(B, S\\) or 4-D"):
        prepare_attention_mask(torch.ones(B, 1, S), B, H, S)
    with pytest.raises(ValueError, match="tensor or an AttentionMask"):
        prepare_attention_mask([[1] * S] * B, B, H, S)


def test_prepared_mask_is_a_snapshot_and_dense_round_trips():
    B, H, S = 2, 1, 8
    q, k, v = _qkv(B, H, S, dtype=torch.float64)
    for mask in (_prefix([8, 3], S), torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0], [0] * 8])):
        pm = prepare_attention_mask(mask, B, H, S)
        want = attention_reference(q, k, v, mask)
        mask.fill_(1)  # the prepared mask keeps what it was made from
        torch.testing.assert_close(attention_reference(q, k, v, pm), want)
        torch.testing.assert_close(attention_reference(q, k, v, pm.dense()), want)


@pytest.mark.interpreter
@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("form", ["none", "prefix", "holes", "empty_row", "additive", "bool4d"])
def test_attention_with_prepared_mask(form, trusted):
    B, H, S = 3, 2, 20
    q, k, v = _qkv(B, H, S)
    mask = {
        "none": None,
        "prefix": _prefix([20, 9, 1], S),
        "holes": (torch.rand(B, S) > 0.5).long(),
        "empty_row": _prefix([20, 0, 7], S),
        "additive": torch.randn(B, 1, S, S).masked_fill(torch.rand(B, 1, S, S) > 0.7, float("-inf")),
        "bool4d": torch.rand(B, H, S, S) > 0.3,
    }[form]
    ctx = trusted_inputs() if trusted else torch.no_grad()
    with ctx:
        pm = prepare_attention_mask(mask, B, H, S)
        for causal in (False, True):
            want = attention_reference(q, k, v, mask, causal=causal)
            out = nan_like((B, S, H, 32), F32)
            attention(q, k, v, pm, causal=causal, out=out)
            assert_close(out, want, msg=f"{form} causal={causal}")
            assert_close(ops.attention(q, k, v, pm, causal=causal), want)


@pytest.mark.interpreter
def test_prepared_mask_gradients_match_raw_mask():
    B, H, S = 2, 2, 20
    qkv = _qkv(B, H, S)
    mask = _prefix([20, 9], S)
    mask[0, 4] = 0
    do = torch.randn(B, S, H, 32)
    grads = []
    for m in (mask, prepare_attention_mask(mask, B, H, S)):
        base = qkv.clone().requires_grad_()
        o = attention(base[0], base[1], base[2], m)
        grads.append(torch.autograd.grad(o, base, do)[0])
    assert_close(grads[1], grads[0])


def test_one_host_read_per_forward_with_a_prepared_mask(host_reads, monkeypatch):
    """Prepare once, run many layers: one host read in all (the kernels' launches are stubbed:
    only the host-side work is counted)."""
    monkeypatch.setattr(ATTN, "_run", lambda op, q, k, v, plan, out: q.new_zeros(plan.batch, plan.seqlen,
                                                                                 plan.heads, plan.head_dim))
    monkeypatch.setattr(ATTN, "use_triton", lambda *a, **kw: True)
    B, H, S = 2, 2, 16
    q, k, v = _qkv(B, H, S)
    mask = _prefix([16, 5], S)
    host_reads.n = 0
    pm = prepare_attention_mask(mask, B, H, S)
    for _ in range(6):
        attention(q, k, v, pm)
    assert host_reads.n == 1
    host_reads.n = 0
    for _ in range(3):  # a raw mask is analysed at every call
        attention(q, k, v, mask)
    assert host_reads.n == 3


def test_prepared_mask_checked_against_the_call():
    B, H, S = 2, 2, 8
    q, k, v = _qkv(B, H, S)
    pm = prepare_attention_mask(_prefix([8, 3], S), B, H, S)
    with pytest.raises(ValueError, match="prepared for \\(B, S\\)"):
        attention(*_qkv(B, H, S + 1), pm)
    with pytest.raises(ValueError, match="prepared for H = 2"):
        attention(*_qkv(B, 4, S), pm)
    with pytest.raises(ValueError, match="int32"):
        attention(q, k, v, pm._replace(kvlen=pm.kvlen.long()))
    with pytest.raises(ValueError, match="needs a mask tensor"):
        attention(q, k, v, pm._replace(kind=MASK_KEYS))
    with pytest.raises(ValueError, match="kind must be"):
        attention(q, k, v, pm._replace(kind=7))
    with pytest.raises(ValueError, match="is on meta"):
        attention(q, k, v, pm._replace(kvlen=pm.kvlen.to("meta")))


def test_fallback_reference_path_takes_a_prepared_mask(monkeypatch):
    import bertfast.kernels._common as common

    monkeypatch.setattr(common, "INTERPRET", False)
    B, H, S = 2, 2, 9
    q, k, v = _qkv(B, H, S)
    mask = _prefix([9, 4], S)
    pm = prepare_attention_mask(mask, B, H, S)
    torch.testing.assert_close(attention(q, k, v, pm, causal=True, fallback=True),
                               attention_reference(q, k, v, mask, causal=True))


# ----------------------------------------------------------------------------- custom op / torch.compile


def _op_cases():
    g = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 2, 5, 32

    def r():
        return torch.randn(B, H, S, D, generator=g)

    lens = _prefix([5, 3], S)
    holes = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    cases = {}
    for name, m in (("lens", lens), ("keys", holes), ("add", torch.randn(B, 1, S, S))):
        pm = prepare_attention_mask(m, B, H, S)
        cases[name] = (r(), r(), r(), pm.mask, False, None, pm.kvlen, pm.kind)
    return cases


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["lens", "keys", "add"])
def test_opcheck_prepared_parts(name, inductor_env):
    args = _op_cases()[name]
    args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and a.dim() == 4 and a.shape[1] != 1 else a for a in args)
    torch.library.opcheck(torch.ops.bertfast.attention.default, args)


@pytest.mark.interpreter
@pytest.mark.parametrize("prepared", [False, True])
def test_compile_fullgraph_prepares_in_graph_without_host_reads(prepared, inductor_env):
    """torch.compile(fullgraph=True) of an encoder-like loop: the mask is prepared inside the graph
    (device ops, key-mask variant), every layer is one bertfast.attention node; matches eager."""
    torch._dynamo.reset()
    B, H, S = 2, 2, 12
    q, k, v = _qkv(B, H, S)
    mask = _prefix([12, 5], S)
    mask[0, 3] = 0
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    def f(q, k, v, mask):
        m = prepare_attention_mask(mask, B, H, S) if prepared else mask
        o = q
        for _ in range(2):
            o = ops.attention(o, k, v, m, causal=False).transpose(1, 2)
        return o

    with torch.no_grad():
        want = f(q, k, v, mask)
        got = torch.compile(f, fullgraph=True, backend=backend)(q, k, v, mask)
    assert len(graphs) == 1
    assert graphs[0].count("bertfast.attention.default") == 2
    torch.testing.assert_close(got, want, **tolerance(F32))


# ----------------------------------------------------------------------------- head dims, sentinel


def test_supports_head_dim():
    assert HEAD_DIMS == (32, 64, 128)
    assert all(supports_head_dim(d) for d in HEAD_DIMS)
    for d in (0, 16, 48, 96, 256, -64, 64.0, "64", True, None):
        assert not supports_head_dim(d), d
    with pytest.raises(ValueError, match="head dim D=48"):
        attention(*torch.randn(3, 1, 1, 8, 48))


@pytest.mark.interpreter
def test_sentinel_not_cached_while_capturing(monkeypatch):
    """The per-device constant tensors made during a capture hold their values only on replay:
    they are not kept for later calls; made outside a capture they are kept (never written)."""
    monkeypatch.setattr(ATTN, "_SENTINEL", {})
    q, k, v = _qkv(1, 1, 8)
    monkeypatch.setattr(ATTN, "_capturing", lambda device: True)
    assert_close(attention(q, k, v), attention_reference(q, k, v))
    assert ATTN._SENTINEL == {}
    monkeypatch.setattr(ATTN, "_capturing", lambda device: False)
    assert_close(attention(q, k, v), attention_reference(q, k, v))
    no_lens, rows = ATTN._SENTINEL[q.device]
    assert no_lens.tolist() == [2**31 - 1] and rows.tolist() == [0, 2**31 - 1]
