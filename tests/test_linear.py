"""Ladder for ``bertfast.kernels.linear`` (rungs 1, 2 and 4; rung 3 is tests/test_compile.py).

1. the reference in fp32 math agrees with the same math in float64;
2. under the Triton interpreter (CPU tensors) the kernel agrees with the reference: odd shapes,
   every dtype / activation / bias flag, every block configuration of both architectures,
   NaN-prefilled outputs, gradients; bad inputs raise ValueError before any launch;
4. on a CUDA GPU the same parity at bert-base shapes.
"""
import pytest
import torch
import torch.nn.functional as F

import bertfast.kernels._common as common
from bertfast.kernels import _gemm
from bertfast.kernels.linear import linear, linear_reference
from bertfast.kernels.testing import GRAD_FACTOR, assert_close, nan_like

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = [None, "gelu", "gelu_tanh"]
_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


def _make(lead, K, N, dtype, device="cpu", bias=True):
    x = torch.randn(*lead, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return x, w, b


def _run(x, w, b, act):
    """Kernel into a NaN-prefilled buffer, so an element that is never written fails."""
    out = nan_like((*x.shape[:-1], w.shape[0]), x.dtype, x.device)
    y = linear(x, w, b, act, out=out)
    assert y is out
    return y


# _GRAD_SCALE_NOTE: grad_output is scaled by 1/sqrt(rows), as a mean-reduced loss would, so that
# dW and db (sums over all rows) are O(1) like dx and the fixed absolute part of the tolerance
# means the same for all three.  Unscaled, a bf16 dW over 1024 rows has entries of size ~16 and
# the ~2e-2 rounding noise of its near-zero entries would be compared with atol alone.


def _no_launch(*args, **kwargs):
    raise AssertionError("the Triton kernel was launched")


# ------------------------------------------------------------------ rung 1: reference vs float64
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_float64(act, bias):
    x, w, b = _make((5, 37), 384, 200, torch.float32, bias=bias)
    z = x.double() @ w.double().t()
    if bias:
        z = z + b.double()
    if act is not None:
        z = F.gelu(z, approximate=_APPROX[act])
    assert_close(linear_reference(x, w, b, act), z.float(), msg=f"act={act} bias={bias}")


def test_reference_gelu_definitions():
    """gelu is exact erf GELU, gelu_tanh the tanh approximation (checked from their formulas)."""
    z = torch.linspace(-6, 6, 101, dtype=torch.float64)
    eye = torch.eye(101, dtype=torch.float64).float()
    exact = 0.5 * z * (1 + torch.erf(z / 2**0.5))
    tanh = 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)))
    assert_close(linear_reference(z.float()[None], eye, None, "gelu")[0], exact.float())
    assert_close(linear_reference(z.float()[None], eye, None, "gelu_tanh")[0], tanh.float())


# ------------------------------------------------------------------ rung 2: interpreter parity
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_every_flag(dtype, act, bias):
    # M = 300 (two 128-row tiles + tail), N = 200 (not a multiple of any BLOCK_N), K = 384
    x, w, b = _make((300,), 384, 200, dtype, bias=bias)
    assert_close(_run(x, w, b, act), linear_reference(x, w, b, act), msg=f"{dtype} act={act} bias={bias}")


# K = 1000 reductions: the kernel and the reference both accumulate in fp32, only in a different
# order, so they agree to fp32 rounding; the output tolerance of each dtype holds unchanged.
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,K,N,act",
    [
        ((1,), 384, 1000, "gelu"),  # M = 1
        ((37,), 1000, 384, "gelu_tanh"),  # M = 37, K = 1000 (K tail of every BLOCK_K)
        ((3, 77), 100, 130, None),  # 3-D x, M = 231
        ((1, 1), 8, 1, "gelu"),  # N = 1
    ],
)
def test_linear_odd_shapes(dtype, lead, K, N, act):
    x, w, b = _make(lead, K, N, dtype)
    y = _run(x, w, b, act)
    assert y.shape == (*lead, N)
    assert_close(y, linear_reference(x, w, b, act), msg=f"{dtype} {lead} K={K} N={N}")


def _every_config():
    out = []
    for cap in ((9, 0), (8, 0)):
        for dtype in DTYPES:
            for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                for cfg in _gemm.gemm_configs(dtype, cap, tf32):
                    name = f"sm{cap[0]}{cap[1]}-{'tf32' if tf32 else str(dtype)[6:]}-{cfg.label}"
                    out.append(pytest.param(dtype, tf32, cfg, id=name))
    # the same configuration may be listed for both architectures: run it once
    seen, uniq = set(), []
    for p in out:
        key = tuple(p.values)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,tf32,cfg", _every_config())
def test_every_block_config(dtype, tf32, cfg):
    """Every configuration the launchers can pick (both architectures) computes the right thing,
    including the pre-activation store: M, N and K all end in a partial tile."""
    M, N, K = 130, 300, 100
    x, w, b = _make((M,), K, N, dtype)
    y = nan_like((M, N), dtype)
    pre = nan_like((M, N), dtype)
    _gemm.launch_gemm(x, w, b, y, activation=_gemm.ACT_GELU, pre=pre, config=cfg)
    assert_close(pre, linear_reference(x, w, b, None), msg=f"pre {cfg}")
    assert_close(y, linear_reference(x, w, b, "gelu"), msg=f"out {cfg}")


@pytest.mark.interpreter
def test_strided_inputs():
    """x with a row stride != K, x with a non-unit stride along K, a transposed-storage weight."""
    base = torch.randn(37, 2 * 96)
    x_rows = base[:, :96]  # row stride 192
    x_cols = base[:, ::2]  # stride 2 along K
    w = torch.randn(96, 50).t()  # (50, 96) with stride (1, 50)
    b = torch.randn(50)
    for x in (x_rows, x_cols):
        assert_close(_run(x, w, b, "gelu"), linear_reference(x, w, b, "gelu"))
    xe = torch.randn(1, 96).expand(5, 96)  # row stride 0
    assert_close(_run(xe, w, b, None), linear_reference(xe, w, b, None))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_misaligned_operands_are_copied(dtype):
    """The kernel's load hints assume 16-byte aligned rows and K in whole 16-byte units; the
    launcher copies (K zero-padded) whatever is not, and leaves aligned operands alone."""
    base = torch.randn(40, 130).to(dtype)
    w = torch.randn(24, 130).to(dtype)
    vec = 16 // base.element_size()
    x_al, w_al, K = _gemm._align_operands(base[:, :128], w[:, :128])  # row stride 130: not whole 16 B
    assert K == 128 and x_al.data_ptr() != base.data_ptr() and torch.equal(x_al, base[:, :128])
    x_ok = torch.randn(40, 128).to(dtype)
    w_ok = torch.randn(24, 128).to(dtype)
    x_same, w_same, _ = _gemm._align_operands(x_ok, w_ok)
    assert x_same is x_ok and w_same is w_ok
    x_p, w_p, Kp = _gemm._align_operands(base[:, 1:14], w[:, 1:14])  # K = 13, misaligned start
    assert Kp % vec == 0 and Kp >= 13 and x_p.data_ptr() % 16 == 0 and w_p.data_ptr() % 16 == 0
    assert torch.equal(x_p[:, :13], base[:, 1:14]) and not x_p[:, 13:].any() and not w_p[:, 13:].any()
    b = torch.randn(24).to(dtype)
    for x, ww in ((base[:, 1:14], w[:, 1:14]), (base[:, 3:67], w[:, 3:67])):
        assert_close(_run(x, ww, b, "gelu"), linear_reference(x, ww, b, "gelu"))


def test_tile_span_limit_raises():
    """In-tile store offsets are 32-bit: a problem whose tile would overflow them is refused
    before launch (checked on meta tensors, nothing is allocated)."""
    x = torch.empty((4, 64), device="meta")
    w = torch.empty((1 << 25, 64), device="meta")
    with pytest.raises(ValueError, match="32-bit"):
        _gemm.launch_gemm(x, w, None, torch.empty((4, 1 << 25), device="meta"))


@pytest.mark.interpreter
def test_empty_and_degenerate(monkeypatch):
    x, w, b = _make((0,), 64, 32, torch.float16)
    monkeypatch.setattr(_gemm, "launch_gemm", _no_launch)
    y = linear(x, w, b, "gelu")
    assert y.shape == (0, 32)
    y = linear(torch.randn(2, 0, 64), torch.randn(32, 64), None)
    assert y.shape == (2, 0, 32)
    # K = 0: the product is empty, the result is act(bias)
    x0, w0, b0 = torch.randn(4, 0), torch.randn(6, 0), torch.randn(6)
    assert_close(linear(x0, w0, b0, "gelu"), linear_reference(x0, w0, b0, "gelu"))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_gradients(dtype, act):
    x, w, b = _make((3, 29), 96, 70, dtype)
    g = (torch.randn(3, 29, 70) / (3 * 29) ** 0.5).to(dtype)  # see _GRAD_SCALE_NOTE
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    y = linear(*leaves, act)
    y_ref = linear_reference(*ref, act)
    assert_close(y.detach(), y_ref.detach())
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, ref, g)
    for name, a, e in zip(("x", "weight", "bias"), grads, grads_ref):
        assert_close(a, e, factor=GRAD_FACTOR, msg=f"d{name} {dtype} act={act}")


@pytest.mark.interpreter
def test_gradients_partial():
    """Only the weight requires grad (frozen input), no bias; then only x."""
    x, w, _ = _make((40,), 64, 48, torch.float32, bias=False)
    wl, wr = w.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(40, 48) / 40**0.5
    (dw,) = torch.autograd.grad(linear(x, wl, None, "gelu_tanh"), [wl], g)
    (dw_ref,) = torch.autograd.grad(linear_reference(x, wr, None, "gelu_tanh"), [wr], g)
    assert_close(dw, dw_ref, factor=GRAD_FACTOR)
    xl, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(linear(xl, w, None, "gelu"), [xl], g)
    (dx_ref,) = torch.autograd.grad(linear_reference(xr, w, None, "gelu"), [xr], g)
    assert_close(dx, dx_ref, factor=GRAD_FACTOR)


# ------------------------------------------------------------------ bad input -> ValueError
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(4, 8, dtype=torch.float16), torch.randn(3, 8), None, None), "dtypes must match"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8), torch.randn(3, dtype=torch.float16), None), "dtypes must match"),
        (lambda: (torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), None, None), "dtype float64"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 9), None, None), "weight has shape"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8, 1), None, None), "weight must be 2-D"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8), torch.randn(4), None), "bias has shape"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8), None, "relu"), "activation"),
        (lambda: (torch.tensor(1.0), torch.randn(3, 1), None, None), "at least one dimension"),
    ],
)
def test_bad_input_raises(make, match, monkeypatch):
    monkeypatch.setattr(_gemm, "launch_gemm", _no_launch)
    x, w, b, act = make()
    with pytest.raises(ValueError, match=match):
        linear(x, w, b, act)
    with pytest.raises(ValueError, match=match):  # checked even when falling back
        linear(x, w, b, act, fallback=True)


def test_bad_out_raises(monkeypatch):
    monkeypatch.setattr(_gemm, "launch_gemm", _no_launch)
    x, w, b = _make((4,), 8, 3, torch.float32)
    for out in (torch.empty(4, 4), torch.empty(4, 3, dtype=torch.float16), torch.empty(3, 4).t()):
        with pytest.raises(ValueError, match="out must be"):
            linear(x, w, b, out=out)
    with pytest.raises(ValueError, match="autograd"):
        linear(x.requires_grad_(), w, b, out=torch.empty(4, 3))


def test_cpu_without_interpreter(monkeypatch):
    """The backend rule: CPU tensors without the interpreter raise, unless fallback=True, which
    runs the reference (and never the kernel)."""
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(_gemm, "launch_gemm", _no_launch)
    x, w, b = _make((5,), 16, 7, torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        linear(x, w, b)
    y = linear(x, w, b, "gelu", fallback=True)
    assert torch.equal(y, linear_reference(x, w, b, "gelu"))
    out = nan_like((5, 7), torch.float32)
    assert linear(x, w, b, "gelu", out=out, fallback=True) is out
    assert torch.equal(out, y)


def test_mixed_devices_raise():
    x = torch.randn(4, 8)
    w = torch.randn(3, 8, device="meta")
    with pytest.raises(ValueError, match="one device"):
        linear(x, w, None, fallback=True)


def test_pick_config_is_deterministic_and_listed():
    for cap in ((9, 0), (8, 0), (8, 6), (12, 0)):
        for dtype in DTYPES:
            for tf32 in (False, True):
                listed = _gemm.gemm_configs(dtype, cap, tf32)
                for M, N, K in ((1, 768, 768), (4096, 3072, 768), (4096, 768, 3072), (16384, 2304, 768), (37, 1000, 1000)):
                    c = _gemm.pick_config(M, N, K, dtype, cap, tf32)
                    assert c in listed and c == _gemm.pick_config(M, N, K, dtype, cap, tf32)
                if cap not in ((9, 0), (8, 0)):  # consumer parts: ~99 KiB of shared memory
                    elsize = 2 if dtype != torch.float32 else 4
                    assert all(c.shared_bytes(elsize) <= 96 * 1024 for c in listed)
    # big GEMMs take a big tile on Hopper, tiny M the small one
    assert _gemm.pick_config(4096, 3072, 768, torch.float16, (9, 0), False).block_m == 128
    assert _gemm.pick_config(8, 768, 768, torch.float16, (9, 0), False).block_m == 64


# ------------------------------------------------------------------ the default rule of plain GEMMs
HALF = [torch.float16, torch.bfloat16]
BERT_M = (128, 2700, 4096)  # 1x128, 32x128 mixed lengths packed, 32x128 full
BERT_PLAIN = ((768, 768), (768, 3072))  # (N, K): attention output, FFN2
BERT_FUSED = ((2304, 768), (3072, 768))  # QKV (bias + head split), FFN1 (bias + GELU)


def _docstring_table():
    """The rows of ``pick_config``'s table: (name, N, K, M, config name, tiles, programs, waves)."""
    rows = []
    for line in _gemm.pick_config.__doc__.splitlines():
        f = line.split()
        if len(f) >= 9 and f[0] in ("QKV", "attn-out", "FFN1", "FFN2") and f[1].isdigit():
            rows.append((f[0], int(f[1]), int(f[2]), int(f[3]), " ".join(f[4:-3]), int(f[-3]), int(f[-2]), float(f[-1])))
    return rows


def test_docstring_table_is_the_rule():
    """Every row of ``pick_config``'s table (bert-base, fp16, H100) is what the rule returns."""
    rows = _docstring_table()
    assert len(rows) == 12 and {r[3] for r in rows} == set(BERT_M)
    for name, N, K, M, cfg_name, tiles, programs, waves in rows:
        cfg = _gemm.pick_config(M, N, K, torch.float16, (9, 0), False, plain=name in ("attn-out", "FFN2"))
        assert cfg.name == cfg_name, (name, M)
        t, p, w = _gemm.launch_summary(cfg, M, N)
        assert (t, p, round(w, 2)) == (tiles, programs, waves), (name, M)


@pytest.mark.parametrize("dtype", HALF)
def test_default_rule_takes_split_k_and_tma_where_the_table_says(dtype):
    """sm_90: plain GEMMs below half the SMs in tiles take split-K, plain GEMMs whose table tile is
    the big one take the TMA kernel; fused epilogues, fp32 and the other shapes keep the table."""
    for N, K in BERT_PLAIN:
        small = _gemm.pick_config(128, N, K, dtype, (9, 0), False, plain=True)
        assert small.split_k == {768: 4, 3072: 8}[K] and small.library == "triton"
        assert _gemm.launch_summary(small, 128, N)[:2] == (12, 12 * small.split_k)  # 12 programs before
        for M in (2700, 4096):
            assert _gemm.pick_config(M, N, K, dtype, (9, 0), False, plain=True) == _gemm.TMA_DEFAULT
        for M in BERT_M:  # fp32 and not-plain: the table tile of gemm_kernel, as before
            table = _gemm.pick_config(M, N, K, dtype, (9, 0), False)
            assert table.split_k == 1 and table.library == "triton"
            for tf32 in (False, True):
                f32 = _gemm.pick_config(M, N, K, torch.float32, (9, 0), tf32, plain=True)
                assert f32 == _gemm.pick_config(M, N, K, torch.float32, (9, 0), tf32)
    for N, K in BERT_FUSED:
        for M in BERT_M:
            c = _gemm.pick_config(M, N, K, dtype, (9, 0), False)
            assert c.split_k == 1 and c.library == "triton"
    # the boundaries: tiles < 66 of 132 SMs (N = 768: M <= 640); >= 2 K steps a split; TMA only
    # with the big tile and N, K multiples of 8 (descriptor rows of whole 16 bytes)
    assert _gemm.pick_config(640, 768, 768, dtype, (9, 0), False, plain=True).split_k == 2
    assert _gemm.pick_config(704, 768, 768, dtype, (9, 0), False, plain=True).split_k == 1
    assert _gemm.pick_config(128, 768, 192, dtype, (9, 0), False, plain=True).split_k == 1  # 3 K steps
    assert _gemm.pick_config(128, 768, 256, dtype, (9, 0), False, plain=True).split_k == 2
    assert _gemm.pick_config(4096, 772, 768, dtype, (9, 0), False, plain=True).library == "triton"
    assert _gemm.pick_config(1100, 1040, 200, dtype, (9, 0), False, plain=True) == _gemm.TMA_DEFAULT
    # A100: split-K on its own small tile, no TMA; consumer parts: the table
    assert _gemm.pick_config(128, 768, 3072, dtype, (8, 0), False, plain=True).split_k == 8
    assert _gemm.pick_config(4096, 768, 3072, dtype, (8, 0), False, plain=True).library == "triton"
    assert _gemm.pick_config(128, 768, 3072, dtype, (8, 6), False, plain=True).split_k == 1


def test_plain_defaults_are_tuning_candidates():
    for cap in ((9, 0), (8, 0), (8, 6), (10, 0)):
        for dtype in DTYPES:
            for M in (1, 37, 128, 640, 2700, 4096):
                for N, K in (*BERT_PLAIN, (1040, 200), (200, 1000)):
                    cands = _gemm.gemm_candidates(M, N, K, dtype, cap, False, plain=True)
                    assert cands[0] == _gemm.pick_config(M, N, K, dtype, cap, False, plain=True)


def _expected_plan(x, w):
    M, K = x.reshape(-1, x.shape[-1]).shape
    x2, w2, Kp = _gemm._align_operands(x.reshape(M, K), w)
    return _gemm.plan_gemm(M, w.shape[0], Kp, x.dtype, x.device, x2.stride(0), w2.stride(0),
                           has_bias=False, has_pre=False)


# M not a multiple of the tile, N not a multiple of BLOCK_N, K with a partial last K step (and
# K = 300, 190: not whole 16 bytes, zero-padded by the launcher).  fp16 / bf16 tolerances of
# ``testing.TOLERANCES`` (atol = rtol = 2e-3 / 1.6e-2): the kernels and the reference both
# accumulate in fp32, in a different order.
SPLIT_K_SHAPES = [((37,), 1000, 200, 8), ((3, 43), 300, 768, 2), ((130,), 520, 72, 4)]
TMA_SHAPES = [((1100,), 200, 1040), ((2, 600), 190, 1096)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("lead,K,N,splits", SPLIT_K_SHAPES)
def test_default_split_k(dtype, lead, K, N, splits):
    """The default of a small-M plain GEMM is split-K (``splitk_reduce_kernel`` adding the
    planes): into a NaN-prefilled ``out=``, through the planned fast path, bit-identical twice."""
    x, w, _ = _make(lead, K, N, dtype, bias=False)
    assert _expected_plan(x, w).split_k == splits
    ref = linear_reference(x, w, None, None)
    y = _run(x, w, None, None)
    assert_close(y, ref, msg=f"{dtype} {lead} K={K} N={N}")
    assert torch.equal(linear(x, w), y)  # deterministic: the same bits on the other path


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("lead,K,N", TMA_SHAPES)
def test_default_tma(dtype, lead, K, N):
    """The default of a large-M plain GEMM on sm_90 (the interpreter's stand-in) is the persistent
    TMA kernel: partial tiles in M, N and K (zero-filled loads, clipped stores)."""
    x, w, _ = _make(lead, K, N, dtype, bias=False)
    assert _expected_plan(x, w).tma
    ref = linear_reference(x, w, None, None)
    assert_close(_run(x, w, None, None), ref, msg=f"{dtype} {lead} K={K} N={N}")
    assert_close(linear(x, w), ref)


@pytest.mark.interpreter
def test_splitk_reduce_adds_in_a_fixed_order():
    """Plane 0 first, then 1, 2, ... in fp32: 1e8 + 1 + 1 - 1e8 is 0 in that order (and 2 in
    another); one rounding to the output dtype."""
    planes = torch.tensor([[1e8, 0.5], [1.0, 0.25], [1.0, 0.125], [-1e8, 0.0625]], dtype=torch.float32)
    for dtype in (torch.float32, torch.float16):
        out = nan_like((2,), dtype)
        _gemm.splitk_reduce_kernel[(1,)](planes, out, 2, 4, BLOCK=16, num_warps=1, num_stages=1)
        assert out.tolist() == [0.0, 0.9375]


@pytest.mark.interpreter
def test_plain_defaults_make_no_host_read():
    """Split-K and the TMA kernel read nothing back from the device (CUDA graph capture, trusted
    inputs): their launch plans depend on shapes and pointers only."""
    from bertfast.kernels.testing import count_host_reads

    for lead, K, N in (((37,), 1000, 200), ((1100,), 200, 1040)):
        x, w, _ = _make(lead, K, N, torch.float16, bias=False)
        linear(x, w)  # plans made
        with count_host_reads() as n:
            linear(x, w)
            linear(x, w, out=nan_like((*lead, N), torch.float16))
        assert n[0] == 0


# ------------------------------------------------------------------ rung 4: GPU
BERT_BASE = [((8, 128), 768, 3072, "gelu"), ((8, 128), 3072, 768, None), ((8, 128), 768, 768, None), ((1, 77), 768, 3072, "gelu_tanh")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,act", BERT_BASE)
def test_gpu_bert_base(dtype, lead, K, N, act):
    x, w, b = _make(lead, K, N, dtype, device="cuda")
    assert_close(_run(x, w, b, act), linear_reference(x, w, b, act), msg=f"{dtype} {lead} K={K} N={N}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,cfg", _every_config())
def test_gpu_every_block_config(dtype, tf32, cfg, tf32_matmul):
    M, N, K = 1000, 1000, 1000
    x, w, b = _make((M,), K, N, dtype, device="cuda")
    y, pre = nan_like((M, N), dtype, "cuda"), nan_like((M, N), dtype, "cuda")
    with tf32_matmul(tf32):  # the reference below runs with the switch restored (IEEE fp32)
        _gemm.launch_gemm(x, w, b, y, activation=_gemm.ACT_GELU_TANH, pre=pre, config=cfg)
        torch.cuda.synchronize()
    # tf32 rounds the operands to 10-bit mantissas: compare with the fp16 tolerance x 4 then
    factor = 4.0 * (2e-3 / 1e-4) if tf32 else 1.0
    assert_close(pre, linear_reference(x, w, b, None), factor=factor)
    assert_close(y, linear_reference(x, w, b, "gelu_tanh"), factor=factor)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_gpu_gradients(dtype, act):
    x, w, b = _make((8, 128), 768, 3072, dtype, device="cuda")
    g = (torch.randn(8, 128, 3072, device="cuda") / (8 * 128) ** 0.5).to(dtype)  # see _GRAD_SCALE_NOTE
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    grads = torch.autograd.grad(linear(*leaves, act), leaves, g)
    grads_ref = torch.autograd.grad(linear_reference(*ref, act), ref, g)
    for name, a, e in zip(("x", "weight", "bias"), grads, grads_ref):
        assert_close(a, e, factor=GRAD_FACTOR, msg=f"d{name} {dtype} act={act}")


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """M * N > 2**31: the row offsets of the output (and of x) need 64 bits."""
    M, N, K = (1 << 21) + 37, 1040, 16
    x, w, b = _make((M,), K, N, torch.float16, device="cuda")
    y = linear(x, w, b)
    rows = torch.tensor([0, M // 2, M - 37, M - 1], device="cuda")
    assert_close(y[rows], linear_reference(x[rows], w, b))


class _Recorder:
    """Stands in for the jitted kernel: records the launch keyword arguments."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)

    def planned(self, memo, grid, args, kwargs):  # a launch from a launch plan (Kernel.planned)
        self.calls.append(kwargs)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,allow,expect", [
    (torch.float32, False, "ieee"), (torch.float32, True, "tf32"), (torch.float16, False, "tf32"), (torch.float16, True, "tf32"),
])
def test_input_precision_follows_tf32_switch(dtype, allow, expect, monkeypatch, tf32_matmul):
    rec = _Recorder()
    monkeypatch.setattr(_gemm, "gemm_kernel", rec)
    x, w, b = _make((300,), 64, 64, dtype)
    with tf32_matmul(allow):
        linear(x, w, b)
    (kw,) = rec.calls
    assert kw["INPUT_PRECISION"] == expect
    cfg = _gemm.pick_config(300, 64, 64, dtype, (9, 0), allow)
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]) == (
        cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
