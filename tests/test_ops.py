"""The kernels as torch.library custom ops (kernels/ops.py) and torch.compile of the model.

* ``torch.library.opcheck`` on every op (under the interpreter): schema, fake (meta)
  implementation vs real output, autograd registration.
* The fake implementations give the shapes the real ops give.
* ``torch.compile(model, fullgraph=True)`` captures the torch backend (CPU) and the Triton
  backend (interpreter: the custom ops are opaque calls in the graph) with no graph break and
  matches eager."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bertfast import kernels  # registers the ops
from bertfast import BertConfig, BertModel
from bertfast.kernels import ops  # noqa: F401
from bertfast.kernels.testing import tolerance

OPS = torch.ops.bertfast


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    B, S, H, D = 2, 5, 2, 32
    C = H * D
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 3:] = 0
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    return {
        "linear": (OPS.linear.default, (r(7, C), r(48, C), r(48), "gelu")),
        "linear_nobias": (OPS.linear.default, (r(7, C), r(48, C), None, "none")),
        "qkv_projection": (OPS.qkv_projection.default, (r(B, S, C), r(3 * C, C), r(3 * C), H)),
        "qkv_projection_packed": (OPS.qkv_projection.default, (r(9, C), r(3 * C, C), r(3 * C), H)),
        "add_layernorm": (OPS.add_layernorm.default, (r(7, C), r(7, C), r(C), r(C), 1e-12, r(C))),
        "embeddings_layernorm": (OPS.embeddings_layernorm.default,
                                 (torch.randint(0, 30, (B, S), generator=g), torch.randint(0, 2, (B, S), generator=g),
                                  None, r(30, C), r(16, C), r(2, C), r(C), r(C), 1e-12, 0)),
        "attention": (OPS.attention.default, (r(B, H, S, D), r(B, H, S, D), r(B, H, S, D), mask, False, None)),
        "attention_causal": (OPS.attention.default, (r(B, H, S, D), r(B, H, S, D), r(B, H, S, D), None, True, None)),
        "attention_varlen": (OPS.attention_varlen.default, (r(8, H, D), r(8, H, D), r(8, H, D), cu, 5, False, None)),
    }


CASES = _cases()


def _requires_grad(args):
    return tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    torch.library.opcheck(op, _requires_grad(args))


@pytest.mark.interpreter
@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_shapes_match_real(name):
    op, args = CASES[name]
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = op(*fake_args)
    assert tuple(fake.shape) == tuple(real.shape) and fake.dtype == real.dtype


@pytest.mark.interpreter
def test_custom_op_gradients_match_eager_autograd():
    op, args = CASES["add_layernorm"]
    a = _requires_grad(args)
    b = _requires_grad(args)
    g = torch.randn(7, 64)
    op(*a).backward(g)
    kernels.add_layernorm(*b[:5], x_bias=b[5]).backward(g)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            torch.testing.assert_close(x.grad, y.grad, **tolerance(torch.float32))


def _tiny_model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _ids():
    ids = torch.randint(0, 100, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask


@pytest.mark.slow
def test_compile_fullgraph_torch_backend_cpu():
    torch._dynamo.reset()
    model = _tiny_model().set_backend("torch")
    ids, mask = _ids()
    with torch.no_grad():
        ref = model(ids, mask).last_hidden_state
        out = torch.compile(model, fullgraph=True)(ids, mask).last_hidden_state
    m = mask[..., None]
    torch.testing.assert_close(out * m, ref * m, **tolerance(torch.float32, 10))


@pytest.mark.interpreter
def test_compile_fullgraph_triton_backend_captures_custom_ops():
    torch._dynamo.reset()
    model = _tiny_model().set_backend("triton")
    ids, mask = _ids()
    seen = []

    def backend(gm, example_inputs):  # record the captured graph, run it as is
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    with torch.no_grad():
        ref = model(ids, mask).last_hidden_state
        out = torch.compile(model, fullgraph=True, backend=backend)(ids, mask).last_hidden_state
    assert len(seen) == 1  # one graph: no break
    targets = seen[0]
    for name in ("embeddings_layernorm", "qkv_projection", "attention", "linear", "add_layernorm"):
        assert f"bertfast.{name}.default" in targets, (name, sorted(targets))
    m = mask[..., None]
    torch.testing.assert_close(out * m, ref * m, **tolerance(torch.float32, 10))


@pytest.mark.interpreter
def test_compiled_model_reads_nothing_on_the_host_when_it_runs():
    """Compiled code holds no value check: running the compiled forward (custom ops included)
    reads no tensor value on the host, outside trusted_inputs() too (the custom ops run their
    launchers trusted).  The eager forward of the same model reads once (its plan)."""
    from bertfast.kernels.testing import count_host_reads

    torch._dynamo.reset()
    model = _tiny_model().set_backend("triton")
    ids, mask = _ids()
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, example_inputs: gm.forward)
    with torch.no_grad():
        compiled(ids, mask)  # traces
        with count_host_reads() as n:
            out = compiled(ids, mask).last_hidden_state
        assert n[0] == 0
        with count_host_reads() as n:
            ref = model(ids, mask).last_hidden_state
        assert n[0] == 1
    m = mask[..., None]
    torch.testing.assert_close(out * m, ref * m, **tolerance(torch.float32, 10))
