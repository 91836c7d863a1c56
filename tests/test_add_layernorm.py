"""add_layernorm: rung 1 (reference vs float64), rung 2 (interpreter parity, forward and
backward), bad input, rung 4 (the same parity on CUDA)."""
import pytest
import torch

import bertfast.kernels._common as common
from bertfast.kernels.add_layernorm import add_layernorm, add_layernorm_reference
from bertfast.kernels._layernorm import MAX_HIDDEN, ln_config
from bertfast.kernels.testing import GRAD_FACTOR, TOLERANCES, assert_close, nan_like

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def _inputs(shape, dtype, device, x_bias=True, requires_grad=False):
    n = shape[-1]
    g = dict(dtype=dtype, device=device)
    t = {
        "x": torch.randn(shape, **g),
        "residual": torch.randn(shape, **g),
        "weight": 1 + 0.5 * torch.randn(n, **g),
        "bias": 0.5 * torch.randn(n, **g),
        "x_bias": 0.5 * torch.randn(n, **g) if x_bias else None,
    }
    if requires_grad:
        for v in t.values():
            if v is not None:
                v.requires_grad_(True)
    return t


def _call(fn, t, **kw):
    return fn(t["x"], t["residual"], t["weight"], t["bias"], EPS, t["x_bias"], **kw)


def _check_forward(shape, dtype, device, x_bias):
    t = _inputs(shape, dtype, device, x_bias)
    out = nan_like(shape, dtype, device)
    y = _call(add_layernorm, t, out=out)
    assert y is out
    assert_close(y, _call(add_layernorm_reference, t), msg=f"{dtype} {shape} x_bias={x_bias}")


def _check_backward(shape, dtype, device, x_bias):
    t = _inputs(shape, dtype, device, x_bias, requires_grad=True)
    names = [k for k, v in t.items() if v is not None]
    y = _call(add_layernorm, t)
    y_ref = _call(add_layernorm_reference, t)
    assert_close(y, y_ref)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [t[k] for k in names], dy)
    want = torch.autograd.grad(y_ref, [t[k] for k in names], dy)
    for k, a, e in zip(names, got, want):
        assert a.dtype == t[k].dtype
        assert_close(a, e, GRAD_FACTOR, msg=f"d{k} {dtype} {shape} x_bias={x_bias}")


# (shape, x_bias): M = 1, 37, 300; hidden 384 and 1000 (non power of two); 3-D input
CASES = [((1, 384), True), ((37, 1000), False), ((300, 384), True), ((3, 7, 1000), True)]


# ---------------------------------------------------------------- rung 1: reference vs float64


@pytest.mark.parametrize("shape,x_bias", [((37, 1000), True), ((5, 3, 384), False), ((2, 4096), True)])
def test_reference_matches_float64(shape, x_bias):
    t = _inputs(shape, torch.float32, "cpu", x_bias)
    t["x"] = t["x"] * 3 + 10  # an offset mean: E[z^2] - E[z]^2 would lose digits here
    z = t["x"].double() + t["residual"].double() + (t["x_bias"].double() if x_bias else 0)
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    want = (z - mean) / torch.sqrt(var + EPS) * t["weight"].double() + t["bias"].double()
    got = _call(add_layernorm_reference, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=TOLERANCES[torch.float32][0], rtol=TOLERANCES[torch.float32][1])


def test_config_table():
    assert ln_config(384).block_n == 512 and ln_config(768).block_n == 1024 and ln_config(1000).block_n == 1024
    assert ln_config(1).block_n == 128 and ln_config(MAX_HIDDEN).block_n == MAX_HIDDEN
    for n in (1, 100, 384, 768, 1024, 3000, 4096, 8192):
        c = ln_config(n)
        assert c.block_n >= n and c.block_n & (c.block_n - 1) == 0
        assert c.rows * c.block_n <= 2048 or c.rows == 1
        assert c.num_warps in (4, 8, 16)


# ---------------------------------------------------------------- rung 2: interpreter parity


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,x_bias", CASES)
def test_forward_interpreter(shape, x_bias, dtype):
    _check_forward(shape, dtype, "cpu", x_bias)


@pytest.mark.interpreter
def test_interpreter_large_hidden():
    _check_forward((5, 4096), torch.float16, "cpu", True)
    _check_backward((3, 4096), torch.bfloat16, "cpu", False)
    _check_backward((2, MAX_HIDDEN), torch.float32, "cpu", True)  # 32-warp backward, d(x_bias) summed on the host


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,x_bias", [((37, 1000), True), ((300, 384), False), ((1, 384), True)])
def test_backward_interpreter(shape, x_bias, dtype):
    _check_backward(shape, dtype, "cpu", x_bias)


@pytest.mark.interpreter
def test_backward_is_deterministic():
    t = _inputs((100, 384), torch.float32, "cpu", True, requires_grad=True)
    dy = torch.randn(100, 384)
    params = [v for v in t.values() if v is not None]
    g1 = torch.autograd.grad(_call(add_layernorm, t), params, dy)
    g2 = torch.autograd.grad(_call(add_layernorm, t), params, dy)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_strided_inputs():
    """Row-strided x (a slice of a wider buffer) and a residual whose last dim is not contiguous."""
    base = torch.randn(37, 1200)
    x = base[:, 100:1100]
    residual = torch.randn(1000, 37).t()
    w, b, xb = torch.randn(1000), torch.randn(1000), torch.randn(1000)
    y = add_layernorm(x, residual, w, b, EPS, xb, out=nan_like((37, 1000), torch.float32))
    assert_close(y, add_layernorm_reference(x, residual, w, b, EPS, xb))
    xg, rg = x.clone().requires_grad_(), residual.clone().requires_grad_()
    dy = torch.randn(1000, 37).t()  # non-contiguous incoming gradient
    got = torch.autograd.grad(add_layernorm(xg, rg, w, b, EPS, xb), [xg, rg], dy)
    want = torch.autograd.grad(add_layernorm_reference(xg, rg, w, b, EPS, xb), [xg, rg], dy)
    for a, e in zip(got, want):
        assert_close(a, e, GRAD_FACTOR)


@pytest.mark.interpreter
def test_empty_rows():
    t = _inputs((0, 384), torch.float16, "cpu", True, requires_grad=True)
    y = _call(add_layernorm, t)
    assert y.shape == (0, 384) and y.dtype == torch.float16
    grads = torch.autograd.grad(y.float().sum(), [t["x"], t["weight"], t["x_bias"]])
    assert grads[0].shape == (0, 384)
    assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0


@pytest.mark.interpreter
def test_no_grad_path_and_partial_requires_grad():
    t = _inputs((37, 384), torch.float32, "cpu", True)
    with torch.no_grad():
        assert_close(_call(add_layernorm, t), _call(add_layernorm_reference, t))
    t["residual"].requires_grad_(True)  # only one input needs a gradient
    (g,) = torch.autograd.grad(_call(add_layernorm, t).sum(), [t["residual"]])
    (g_ref,) = torch.autograd.grad(_call(add_layernorm_reference, t).sum(), [t["residual"]])
    assert_close(g, g_ref, GRAD_FACTOR)


@pytest.mark.interpreter
def test_out_with_autograd():
    t = _inputs((37, 384), torch.bfloat16, "cpu", True, requires_grad=True)
    out = nan_like((37, 384), torch.bfloat16)
    y = _call(add_layernorm, t, out=out)
    assert y is out and y.grad_fn is not None
    (g,) = torch.autograd.grad(y.float().sum(), [t["x"]])
    (g_ref,) = torch.autograd.grad(_call(add_layernorm_reference, t).float().sum(), [t["x"]])
    assert_close(g, g_ref, GRAD_FACTOR)


def test_fallback_runs_reference_without_interpreter(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET", False)
    t = _inputs((4, 384), torch.float32, "cpu", True)
    with pytest.raises(ValueError, match="fallback=True"):
        _call(add_layernorm, t)
    assert_close(_call(add_layernorm, t, fallback=True), _call(add_layernorm_reference, t))
    out = nan_like((4, 384), torch.float32)
    assert _call(add_layernorm, t, fallback=True, out=out) is out
    assert_close(out, _call(add_layernorm_reference, t))


# ---------------------------------------------------------------- bad input


def _bad(**over):
    t = _inputs((4, 384), torch.float32, "cpu", True)
    kw = {k: over.pop(k) for k in list(over) if k in ("out", "eps")}
    t.update(over)
    return lambda: add_layernorm(t["x"], t["residual"], t["weight"], t["bias"], kw.get("eps", EPS), t["x_bias"],
                                 out=kw.get("out"), fallback=True)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"residual": torch.randn(4, 383)}, "residual has shape"),
        ({"residual": torch.randn(5, 384)}, "residual has shape"),
        ({"weight": torch.randn(383)}, "weight has shape"),
        ({"bias": torch.randn(1, 384)}, "bias has shape"),
        ({"x_bias": torch.randn(385)}, "x_bias has shape"),
        ({"residual": torch.randn(4, 384, dtype=torch.float16)}, "dtypes must match"),
        ({"x_bias": torch.randn(384, dtype=torch.bfloat16)}, "dtypes must match"),
        ({"x": torch.randn(4, 384, dtype=torch.float64)}, "x has dtype float64"),
        ({"x": torch.randn(2, MAX_HIDDEN + 1), "residual": torch.randn(2, MAX_HIDDEN + 1),
          "weight": torch.randn(MAX_HIDDEN + 1), "bias": torch.randn(MAX_HIDDEN + 1), "x_bias": None},
         "larger than the supported maximum 8192"),
        ({"out": torch.empty(4, 384, dtype=torch.float16)}, "out must be"),
        ({"out": torch.empty(384, 4).t()}, "out must be"),
        ({"eps": -1.0}, "eps must be"),
        ({"x": torch.randn(4, 384, device="meta")}, "one device"),
    ],
)
def test_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)()


# ---------------------------------------------------------------- split-K input (the output blocks' GEMM)
# (M, N, K) of a plain GEMM that the default rule splits over K (sm_90: the interpreter's stand-in):
# attention output / FFN2 of all-MiniLM-L6-v2 at 37 and 128 tokens (2 and 8 planes), odd N, one row.
PARTIAL_CASES = [((37, 384, 384), 2), ((128, 384, 1536), 8), ((5, 200, 1000), 8), ((1, 384, 1536), 8)]


def _dense_inputs(M, N, K, dtype, device):
    g = torch.Generator().manual_seed(M * 7 + N)
    t = _inputs((M, N), dtype, "cpu")
    h = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    return h.to(device), w.to(device), {k: (v.to(device) if v is not None else None) for k, v in t.items()}


def _layernorm(t):
    ln = torch.nn.LayerNorm(t["weight"].shape[0], eps=EPS, device=t["weight"].device, dtype=t["weight"].dtype)
    with torch.no_grad():
        ln.weight.copy_(t["weight"])
        ln.bias.copy_(t["bias"])
    return ln


def _dense(h, w, t):
    """The model's output block on the kernels (bertfast.ops.dense_add_layernorm)."""
    from bertfast import ops

    return ops.dense_add_layernorm(h, w, t["x_bias"], t["residual"], _layernorm(t))


def _check_dense(M, N, K, splits, dtype, device):
    from bertfast.kernels.linear import linear, linear_partials, linear_reference
    from bertfast.kernels.testing import record_launches

    h, w, t = _dense_inputs(M, N, K, dtype, device)
    args = (t["residual"], t["weight"], t["bias"], EPS, t["x_bias"])
    with torch.no_grad():
        assert linear_partials(h, w).shape == (splits, M, N)  # the rule splits this GEMM
        fused = _dense(h, w, t)
        two_kernels = add_layernorm(linear(h, w), *args)  # the GEMM's own reduction, then add + LayerNorm
        ref = add_layernorm_reference(linear_reference(h, w, None, None), *args)
    assert torch.equal(fused, two_kernels), f"{dtype} {M}x{N}x{K}: not the bits of reduce + add_layernorm"
    assert_close(fused, ref, factor=4.0, msg=f"{dtype} {M}x{N}x{K}")
    if device == "cpu":
        with torch.no_grad(), record_launches() as calls:
            _dense(h, w, t)
        names = [c[0] for c in calls]
        assert names == ["gemm_kernel", "_add_layernorm_fwd_kernel"], names  # no splitk_reduce_kernel


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mnk,splits", PARTIAL_CASES)
def test_split_k_partials_into_the_layernorm(mnk, splits, dtype):
    """The output block's LayerNorm kernel adds a split-K GEMM's fp32 planes itself: the same bits
    as the GEMM's reduction kernel followed by add + LayerNorm, within tolerance of the reference,
    in two launches instead of three."""
    _check_dense(*mnk, splits, dtype, "cpu")


@pytest.mark.interpreter
def test_split_k_planes_added_in_order_and_rounded_once():
    """Planes are added 0, 1, 2, ... in fp32 and the sum rounded once to the output dtype before
    the bias and residual: 1e8 + 1 + 1 - 1e8 is 0 in that order (2 in another)."""
    from bertfast.kernels.add_layernorm import add_layernorm_partials

    planes = torch.tensor([[1e8, 0.5], [1.0, 0.25], [1.0, 0.125], [-1e8, 0.0625]]).view(4, 1, 2)
    ones, zeros = torch.ones(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float16)
    residual = torch.tensor([[0.0, 0.0]], dtype=torch.float16)
    with torch.no_grad():
        y = add_layernorm_partials(planes, residual, ones, zeros, 1e-5, zeros)
        x = torch.tensor([[0.0, 0.9375]], dtype=torch.float16)
        assert torch.equal(y, add_layernorm(x, residual, ones, zeros, 1e-5, zeros))


@pytest.mark.interpreter
def test_split_k_partials_only_without_gradients():
    """With a gradient to record the output block runs linear + add_layernorm (their autograd); the
    partials entry refuses inputs that need one, by name."""
    from bertfast.kernels.add_layernorm import add_layernorm_partials
    from bertfast.kernels.linear import linear_partials

    h, w, t = _dense_inputs(37, 384, 384, torch.float16, "cpu")
    w.requires_grad_(True)
    assert linear_partials(h, w) is None
    y = _dense(h, w, t)
    (g,) = torch.autograd.grad(y.float().sum(), w)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="partials"):
        add_layernorm_partials(torch.zeros(2, 37, 384), t["residual"].requires_grad_(True), t["weight"], t["bias"])
    with torch.no_grad(), pytest.raises(ValueError, match="partials of shape"):
        add_layernorm_partials(torch.zeros(2, 36, 384), t["residual"], t["weight"], t["bias"])
    with torch.no_grad(), pytest.raises(ValueError, match="float32"):
        add_layernorm_partials(torch.zeros(2, 37, 384, dtype=torch.float16), t["residual"], t["weight"], t["bias"])


# ---------------------------------------------------------------- rung 4: CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,x_bias",
    CASES + [((16384, 768), True), ((4096, 1024), False), ((3, 4096), True), ((129, 8192), True), ((2, 100), True)],
)
def test_gpu_parity(shape, x_bias, dtype):
    _check_forward(shape, dtype, "cuda", x_bias)
    _check_backward(shape, dtype, "cuda", x_bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mnk,splits", [((128, 768, 768), 4), ((128, 768, 3072), 8)])
def test_gpu_split_k_partials_into_the_layernorm(mnk, splits, dtype):
    """bert-base's output blocks at 128 tokens on the GPU (132 SMs: split 4 and 8)."""
    if torch.cuda.get_device_properties(0).multi_processor_count != 132:
        pytest.skip("the split factors asserted are those of a 132-SM GPU")
    _check_dense(*mnk, splits, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_deterministic_and_empty():
    t = _inputs((8192, 768), torch.float16, "cuda", True, requires_grad=True)
    dy = torch.randn(8192, 768, device="cuda", dtype=torch.float16)
    params = [v for v in t.values() if v is not None]
    g1 = torch.autograd.grad(_call(add_layernorm, t), params, dy)
    g2 = torch.autograd.grad(_call(add_layernorm, t), params, dy)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    assert _call(add_layernorm, _inputs((0, 768), torch.float16, "cuda")).shape == (0, 768)
