"""Ladder for ``bertfast.kernels.qkv_projection`` (rungs 1, 2 and 4; rung 3 is tests/test_compile.py).

1. the reference in fp32 math agrees with float64, and its layout is the head split that a
   Hugging Face BERT self-attention builds from three separate projections;
2. under the Triton interpreter the kernel (GEMM + head-split store) agrees with the reference:
   odd shapes (S = 1, 77; hidden 384, 1000; head_dim 125), packed 2-D tokens, every dtype, bias /
   no bias, NaN-prefilled outputs, every block configuration, gradients; bad inputs raise;
4. on a CUDA GPU the same parity at bert-base / bert-large shapes.
"""
import pytest
import torch

import bertfast.kernels._common as common
from bertfast.kernels import _gemm
from bertfast.kernels.qkv_projection import qkv_projection, qkv_projection_reference
from bertfast.kernels.testing import GRAD_FACTOR, assert_close, nan_like

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _make(lead, hidden, dtype, device="cpu", bias=True):
    x = torch.randn(*lead, hidden, device=device).to(dtype)
    w = (torch.randn(3 * hidden, hidden, device=device) / hidden**0.5).to(dtype)
    b = torch.randn(3 * hidden, device=device).to(dtype) if bias else None
    return x, w, b


def _shape(x, H):
    hidden = x.shape[-1]
    if x.dim() == 3:
        return (3, x.shape[0], H, x.shape[1], hidden // H)
    return (3, x.shape[0], H, hidden // H)


def _run(x, w, b, H):
    out = nan_like(_shape(x, H), x.dtype, x.device)
    y = qkv_projection(x, w, b, H, out=out)
    assert y is out
    return y


def _no_launch(*args, **kwargs):
    raise AssertionError("the Triton kernel was launched")


# ------------------------------------------------------------------ rung 1: reference
@pytest.mark.parametrize("lead", [(2, 7), (9,)])
def test_reference_matches_float64(lead):
    x, w, b = _make(lead, 96, torch.float32)
    y64 = qkv_projection_reference(x.double(), w.double(), b.double(), 4)
    assert y64.dtype == torch.float64
    assert_close(qkv_projection_reference(x, w, b, 4), y64.float())


def test_reference_layout_is_the_hf_head_split():
    """out[0/1/2] == (x @ Wq/k/v.T + b).view(B, S, H, D).transpose(1, 2), as HF BERT does it;
    the packed 2-D form is the same with the S axis dropped."""
    B, S, hidden, H = 2, 5, 48, 3
    D = hidden // H
    x, w, b = _make((B, S), hidden, torch.float32)
    y = qkv_projection_reference(x, w, b, H)
    assert y.shape == (3, B, H, S, D) and y.is_contiguous()
    for i in range(3):
        lin = torch.nn.functional.linear(x, w[i * hidden:(i + 1) * hidden], b[i * hidden:(i + 1) * hidden])
        assert_close(y[i], lin.view(B, S, H, D).transpose(1, 2))
    y2 = qkv_projection_reference(x.reshape(B * S, hidden), w, b, H)
    assert y2.shape == (3, B * S, H, D)
    assert_close(y2, y.permute(0, 1, 3, 2, 4).reshape(3, B * S, H, D))


# ------------------------------------------------------------------ rung 2: interpreter parity
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,hidden,H",
    [
        ((2, 77), 384, 6),  # S = 77 (tiles straddle batch rows), D = 64
        ((4, 1), 384, 12),  # S = 1, D = 32
        ((3, 5), 1000, 8),  # hidden 1000, D = 125 (tiles straddle q/k/v and heads)
        ((37,), 384, 6),  # packed tokens, 2-D x
        ((1,), 1000, 10),  # one token
    ],
)
def test_qkv_matches_reference(dtype, lead, hidden, H):
    x, w, b = _make(lead, hidden, dtype)
    y = _run(x, w, b, H)
    assert y.shape == _shape(x, H) and y.is_contiguous()
    assert_close(y, qkv_projection_reference(x, w, b, H), msg=f"{dtype} {lead} hidden={hidden} H={H}")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_without_bias(dtype):
    x, w, _ = _make((3, 11), 96, dtype, bias=False)
    assert_close(_run(x, w, None, 4), qkv_projection_reference(x, w, None, 4))


def _configs():
    seen, out = set(), []
    for cap in ((9, 0), (8, 0)):
        for dtype in DTYPES:
            for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                for cfg in _gemm.gemm_configs(dtype, cap, tf32):
                    if (dtype, tf32, cfg) not in seen:
                        seen.add((dtype, tf32, cfg))
                        out.append(pytest.param(dtype, tf32, cfg, id=f"sm{cap[0]}{cap[1]}-{'tf32' if tf32 else str(dtype)[6:]}-{cfg.label}"))
    return out


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,tf32,cfg", _configs())
def test_every_block_config(dtype, tf32, cfg):
    """The head-split store of every configuration: M = 2*67 rows and 3*80 columns, so tiles
    cross batch, head and q/k/v boundaries and end in partial tiles."""
    B, S, hidden, H = 2, 67, 80, 5
    x, w, b = _make((B, S), hidden, dtype)
    y = nan_like(_shape(x, H), dtype)
    _gemm.launch_gemm(x.reshape(B * S, hidden), w, b, y, head_split=(S, hidden // H, hidden), config=cfg)
    assert_close(y, qkv_projection_reference(x, w, b, H), msg=str(cfg))


@pytest.mark.interpreter
def test_strided_x_and_empty(monkeypatch):
    base = torch.randn(2, 9, 2 * 64)
    for x in (base[..., :64], base[..., ::2]):  # row stride 128 / stride 2 along hidden
        w, b = _make((1,), 64, torch.float32)[1:]
        assert_close(_run(x, w, b, 4), qkv_projection_reference(x, w, b, 4))
    monkeypatch.setattr(_gemm, "launch_gemm", _no_launch)
    x, w, b = _make((0, 7), 64, torch.float16)
    assert qkv_projection(x, w, b, 4).shape == (3, 0, 4, 7, 16)
    x, w, b = _make((0,), 64, torch.float16)
    assert qkv_projection(x, w, b, 4).shape == (3, 0, 4, 16)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(2, 13), (21,)])
def test_gradients(dtype, lead):
    x, w, b = _make(lead, 64, dtype)
    g = (torch.randn(_shape(x, 4)) / x[..., 0].numel() ** 0.5).to(dtype)  # O(1) dW / db, as a mean loss
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    y = qkv_projection(*leaves, 4)
    y_ref = qkv_projection_reference(*ref, 4)
    assert_close(y.detach(), y_ref.detach())
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, ref, g)
    for name, a, e in zip(("x", "weight", "bias"), grads, grads_ref):
        assert_close(a, e, factor=GRAD_FACTOR, msg=f"d{name} {dtype} {lead}")


# ------------------------------------------------------------------ bad input -> ValueError
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (*_make((2, 3), 64, torch.float16)[:2], torch.randn(192), 4), "dtypes must match"),
        (lambda: (*_make((2, 3), 64, torch.float64), 4), "dtype float64"),
        (lambda: (*_make((2, 3), 64, torch.float32), 5), "not divisible by num_heads"),
        (lambda: (*_make((2, 3), 64, torch.float32), 0), "num_heads must be a positive int"),
        (lambda: (torch.randn(2, 3, 64), torch.randn(3 * 64, 32), torch.randn(192), 4), "weight has shape"),
        (lambda: (torch.randn(2, 3, 64), torch.randn(64, 64), torch.randn(192), 4), "weight has shape"),
        (lambda: (torch.randn(2, 3, 64), torch.randn(192, 64), torch.randn(64), 4), "bias has shape"),
        (lambda: (torch.randn(1, 2, 3, 64), torch.randn(192, 64), torch.randn(192), 4), "x must be"),
    ],
)
def test_bad_input_raises(make, match, monkeypatch):
    monkeypatch.setattr(_gemm, "launch_gemm", _no_launch)
    x, w, b, H = make()
    with pytest.raises(ValueError, match=match):
        qkv_projection(x, w, b, H)
    with pytest.raises(ValueError, match=match):
        qkv_projection(x, w, b, H, fallback=True)


def test_bad_out_and_backend_rule(monkeypatch):
    monkeypatch.setattr(_gemm, "launch_gemm", _no_launch)
    x, w, b = _make((2, 3), 64, torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        qkv_projection(x, w, b, 4, out=torch.empty(3, 2, 3, 4, 16))  # (3, B, S, H, D): wrong order
    with pytest.raises(ValueError, match="autograd"):
        qkv_projection(x, w.requires_grad_(), b, 4, out=torch.empty(3, 2, 4, 3, 16))
    w = w.detach()
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA"):
        qkv_projection(x, w, b, 4)
    out = nan_like((3, 2, 4, 3, 16), torch.float32)
    assert qkv_projection(x, w, b, 4, out=out, fallback=True) is out
    assert torch.equal(out, qkv_projection_reference(x, w, b, 4))


def test_sequence_too_long_raises():
    """The head-split store uses 32-bit offsets within a tile: (2*S + BLOCK_M) * hidden must
    stay below 2**31; checked on meta tensors before any launch."""
    S, hidden = 1 << 24, 64
    x = torch.empty((S, hidden), device="meta")
    w = torch.empty((3 * hidden, hidden), device="meta")
    out = torch.empty((3, 1, 4, S, 16), device="meta")
    with pytest.raises(ValueError, match="sequence length"):
        _gemm.launch_gemm(x, w, None, out, head_split=(S, 16, hidden))


# ------------------------------------------------------------------ rung 4: GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,hidden,H", [((8, 128), 768, 12), ((2, 512), 1024, 16), ((1000,), 768, 12), ((3, 77), 384, 6)])
def test_gpu_bert_shapes(dtype, lead, hidden, H):
    x, w, b = _make(lead, hidden, dtype, device="cuda")
    assert_close(_run(x, w, b, H), qkv_projection_reference(x, w, b, H), msg=f"{dtype} {lead} hidden={hidden}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,cfg", _configs())
def test_gpu_every_block_config(dtype, tf32, cfg, tf32_matmul):
    B, S, hidden, H = 4, 200, 768, 12
    x, w, b = _make((B, S), hidden, dtype, device="cuda")
    y = nan_like(_shape(x, H), dtype, "cuda")
    with tf32_matmul(tf32):  # the reference below runs with the switch restored (IEEE fp32)
        _gemm.launch_gemm(x.reshape(B * S, hidden), w, b, y, head_split=(S, hidden // H, hidden), config=cfg)
        torch.cuda.synchronize()
    # tf32 rounds operands to 10-bit mantissas: the fp16 tolerance x 4 then
    assert_close(y, qkv_projection_reference(x, w, b, H), factor=4.0 * (2e-3 / 1e-4) if tf32 else 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_gradients(dtype):
    x, w, b = _make((8, 128), 768, dtype, device="cuda")
    g = (torch.randn(_shape(x, 12), device="cuda") / (8 * 128) ** 0.5).to(dtype)  # O(1) dW / db, as a mean loss
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    grads = torch.autograd.grad(qkv_projection(*leaves, 12), leaves, g)
    grads_ref = torch.autograd.grad(qkv_projection_reference(*ref, 12), ref, g)
    for name, a, e in zip(("x", "weight", "bias"), grads, grads_ref):
        assert_close(a, e, factor=GRAD_FACTOR, msg=f"d{name} {dtype}")
