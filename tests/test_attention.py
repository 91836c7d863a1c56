"""Fused attention: the ladder.

1. the references against an independent float64 computation;
2. the Triton kernels (forward and gradients) against the references, under the interpreter
   on CPU (small B*H so that the file stays around two minutes on a small box);
3. bad input raises ValueError naming the problem (before any launch);
4. ``@pytest.mark.gpu``: the same parity on CUDA at S=512, H=12, D=64, and peak memory that
   does not grow with S*S.
"""
import math
import sys

import pytest
import torch

# the package binds ``bertfast.kernels.attention`` to the function; the module is sys.modules["bertfast.kernels.attention"]
from bertfast.kernels.attention import (
    attention,
    attention_config,
    attention_reference,
    attention_varlen,
    attention_varlen_reference,
    compile_specs,
)
from bertfast.kernels.padding import pad, unpad
from bertfast.kernels.testing import GRAD_FACTOR, assert_close, nan_like

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _naive64(q, k, v, mask=None, causal=False, scale=None):
    """Attention in float64 with explicit loops over rows: an independent ground truth.
    Returns (B, S, H, D) float64."""
    B, H, S, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, S, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                logits = []
                for j in range(S):
                    val = float(q[b, h, i] @ k[b, h, j]) * scale
                    if mask is not None and mask.dim() == 2 and mask[b, j] == 0:
                        val = NEG_INF
                    if mask is not None and mask.dim() == 4:
                        mv = float(mask.expand(B, H, S, S)[b, h, i, j])
                        val = val + mv
                    if causal and j > i:
                        val = NEG_INF
                    logits.append(val)
                finite = [x for x in logits if x != NEG_INF]
                if not finite:
                    continue  # fully masked row: zeros
                mx = max(finite)
                w = torch.tensor([math.exp(x - mx) if x != NEG_INF else 0.0 for x in logits], dtype=torch.float64)
                out[b, i, h] = (w / w.sum()) @ v[b, h]
    return out


def _qkv(B, H, S, D, dtype, device="cpu"):
    """q, k, v as the views qkv_projection returns: [0], [1], [2] of a contiguous (3, B, H, S, D)."""
    qkv = torch.randn(3, B, H, S, D, dtype=torch.float32, device=device).to(dtype)
    return qkv


def _prefix_mask(lengths, S, device="cpu", dtype=torch.int64):
    lengths = torch.as_tensor(lengths, device=device)
    return (torch.arange(S, device=device)[None, :] < lengths[:, None]).to(dtype)


def _check(qkv, run, ref, out_shape, factor=1.0, grad_factor=GRAD_FACTOR, check_out=True):
    """Forward into a NaN-filled ``out=`` buffer, then forward + backward with autograd, both
    against ``ref`` (fp32 math).  ``run(q, k, v, out=None)`` / ``ref(q, k, v)``.
    Returns (output, (dq, dk, dv)) of the kernel."""
    dtype = qkv.dtype
    q, k, v = qkv[0], qkv[1], qkv[2]
    if check_out:
        with torch.no_grad():
            buf = nan_like(out_shape, dtype, device=qkv.device)
            res = run(q, k, v, out=buf)
            assert res.data_ptr() == buf.data_ptr()
            assert_close(buf, ref(q, k, v), factor, msg="forward (out=)")
    base = qkv.detach().clone().requires_grad_()
    q, k, v = base[0], base[1], base[2]
    o = run(q, k, v)
    assert o.shape == tuple(out_shape) and o.is_contiguous() and o.dtype == dtype
    do = torch.randn(o.shape, device=o.device, dtype=torch.float32).to(dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)
    rbase = qkv.detach().float().requires_grad_()
    qr, kr, vr = rbase[0], rbase[1], rbase[2]
    orf = ref(qr, kr, vr)
    rgrads = torch.autograd.grad(orf, (qr, kr, vr), do.float())
    assert_close(o, orf, factor, msg="forward")
    for name, g, rg in zip("qkv", grads, rgrads):
        assert g.shape == rg.shape and g.dtype == dtype
        assert_close(g, rg, grad_factor, msg=f"d{name}")
    return o, grads


# --------------------------------------------------------------------------------------------
# rung 1: references vs float64
# --------------------------------------------------------------------------------------------
def _masks_for_reference(B, S):
    lens = _prefix_mask([S, 3, 0], S)[:B]
    arb = (torch.rand(B, S) > 0.4).long()
    arb[-1] = 0
    add = torch.randn(B, 1, S, S)
    add[0, 0, :, 2:4] = NEG_INF
    add[0, 0, 1] = NEG_INF  # a fully masked row
    add[-1, 0, 2] = torch.finfo(torch.float32).min  # finite "masked": uniform row
    hf = torch.zeros(B, 1, 1, S).masked_fill(lens[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    return {"none": None, "lens": lens, "arbitrary": arb, "additive": add, "hf4d": hf}


@pytest.mark.parametrize("mask_name", ["none", "lens", "arbitrary", "additive", "hf4d"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_float64(mask_name, causal):
    B, H, S, D = 3, 2, 6, 8
    q, k, v = torch.randn(3, B, H, S, D)
    mask = _masks_for_reference(B, S)[mask_name]
    got = attention_reference(q, k, v, mask, causal=causal)
    want = _naive64(q, k, v, mask, causal)
    assert got.shape == (B, S, H, D) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(got).any()
    if mask_name == "hf4d" and not causal:
        # finite "masked" values are scores: the fully padded batch averages v uniformly
        # (whereas the 2-D mask gives zeros there)
        uniform = v[2].double().mean(1).unsqueeze(0).expand(S, H, D)
        torch.testing.assert_close(got[2].double(), uniform, atol=1e-5, rtol=1e-5)


def test_reference_fully_masked_rows_are_zero_with_zero_grads():
    B, H, S, D = 2, 1, 5, 4
    qkv = torch.randn(3, B, H, S, D, requires_grad=True)
    mask = _prefix_mask([5, 0], S)
    o = attention_reference(qkv[0], qkv[1], qkv[2], mask)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    o.sum().backward()
    assert not torch.isnan(qkv.grad).any()
    assert torch.equal(qkv.grad[:, 1], torch.zeros_like(qkv.grad[:, 1]))


def test_reference_scale_and_dtype():
    q, k, v = torch.randn(3, 1, 2, 5, 8, dtype=torch.float64)
    got = attention_reference(q, k, v, scale=0.3)
    torch.testing.assert_close(got, _naive64(q, k, v, scale=0.3))
    assert attention_reference(q.half(), k.half(), v.half()).dtype == torch.float16


def test_varlen_reference_matches_padded_reference():
    H, D = 2, 8
    lens = [1, 5, 0, 3]
    T = sum(lens)
    q, k, v = torch.randn(3, T, H, D)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    got = attention_varlen_reference(q, k, v, cu, max(lens), causal=True)
    assert got.shape == (T, H, D)
    for b, (s0, s1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if s1 == s0:
            continue
        sub = [t[s0:s1].permute(1, 0, 2)[None] for t in (q, k, v)]
        torch.testing.assert_close(got[s0:s1], _naive64(*sub, causal=True)[0].float(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# rung 2: the kernels under the interpreter
# --------------------------------------------------------------------------------------------
def _run_attn(mask=None, causal=False, scale=None):
    def run(q, k, v, out=None):
        return attention(q, k, v, mask, causal=causal, scale=scale, out=out)

    def ref(q, k, v):
        return attention_reference(q, k, v, mask, causal=causal, scale=scale)

    return run, ref


# (S, D, dtype): every S in 1, 7, 77, 128, 200 for every dtype; D alternates 32 / 64
_PLAIN = [
    (1, 32, F32), (7, 64, F32), (77, 32, F32), (128, 64, F32), (200, 32, F32),
    (1, 64, F16), (7, 32, F16), (77, 64, F16), (128, 32, F16), (200, 64, F16),
    (1, 32, BF16), (7, 64, BF16), (77, 32, BF16), (128, 64, BF16), (200, 32, BF16),
    (77, 128, F16), (50, 128, F32),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("S,D,dtype", _PLAIN, ids=[f"S{s}-D{d}-{str(t)[6:]}" for s, d, t in _PLAIN])
def test_kernel_plain(S, D, dtype):
    B, H = 1, (2 if S < 128 else 1)
    run, ref = _run_attn()
    _check(_qkv(B, H, S, D, dtype), run, ref, (B, S, H, D))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_kernel_padding_mask(dtype):
    """Right padding with several lengths per batch, one batch fully padded (zeros, zero grads)."""
    B, H, S, D = 4, 1, 77, 32
    lengths = [77, 40, 0, 17]
    mask = _prefix_mask(lengths, S, dtype=torch.int64 if dtype != F16 else torch.bool)
    run, ref = _run_attn(mask)
    o, (dq, dk, dv) = _check(_qkv(B, H, S, D, dtype), run, ref, (B, S, H, D))
    assert torch.count_nonzero(o[2]) == 0
    for g in (dq, dk, dv):
        assert torch.count_nonzero(g[2]) == 0
    # keys past the length get no gradient
    assert torch.count_nonzero(dk[1, :, 40:]) == 0 and torch.count_nonzero(dv[3, :, 17:]) == 0


@pytest.mark.interpreter
def test_kernel_padding_mask_float_and_all_valid():
    B, H, S, D = 2, 2, 33, 64
    run, ref = _run_attn(_prefix_mask([33, 20], S, dtype=torch.float32))
    _check(_qkv(B, H, S, D, F32), run, ref, (B, S, H, D))
    run, ref = _run_attn(torch.ones(B, S, dtype=torch.int64))  # all valid: the unmasked variant
    _check(_qkv(B, H, S, D, F16), run, ref, (B, S, H, D))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,causal", [(F32, False), (F16, False), (BF16, True)])
def test_kernel_arbitrary_mask(dtype, causal):
    """A non-prefix 0/1 key mask (holes, left padding, a fully masked row)."""
    B, H, S, D = 3, 1, 77, 32
    mask = (torch.rand(B, S) > 0.5).to(torch.int32)
    mask[1, :10] = 0  # left padding
    mask[1, 60:] = 0
    mask[2] = 0  # fully masked
    run, ref = _run_attn(mask, causal=causal)
    o, grads = _check(_qkv(B, H, S, D, dtype), run, ref, (B, S, H, D))
    assert torch.count_nonzero(o[2]) == 0
    assert all(torch.count_nonzero(g[2]) == 0 for g in grads)
    dk = grads[1]
    assert torch.count_nonzero(dk[0].transpose(0, 1)[mask[0] == 0]) == 0


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,causal,shape", [
    (F32, False, "full"), (F16, False, "hf"), (F32, True, "full"), (BF16, False, "bool"),
])
def test_kernel_additive_mask(dtype, causal, shape):
    B, H, S, D = 2, 2, 40, 32
    if shape == "full":  # (B, 1, S, S) float with -inf, a fully masked row, a finfo.min row
        mask = torch.randn(B, 1, S, S)
        mask[0, 0, :, 5:9] = NEG_INF
        mask[1, 0, 3] = NEG_INF
        mask[1, 0, 7] = torch.finfo(torch.float32).min
    elif shape == "hf":  # the Hugging Face extended mask (B, 1, 1, S) in the model dtype
        keep = _prefix_mask([S, 25], S)
        mask = torch.zeros(B, 1, 1, S, dtype=dtype).masked_fill(keep[:, None, None, :] == 0, torch.finfo(dtype).min)
    else:  # bool (B, H, S, S), True = attend
        mask = torch.rand(B, H, S, S) > 0.3
        mask[0, 1, 4] = False
    run, ref = _run_attn(mask, causal=causal)
    o, grads = _check(_qkv(B, H, S, D, dtype), run, ref, (B, S, H, D))
    if shape == "full" and not causal:
        assert torch.count_nonzero(o[1, 3]) == 0  # the -inf row
        assert torch.count_nonzero(grads[0][1, :, 3]) == 0


@pytest.mark.interpreter
@pytest.mark.parametrize("S,D,dtype", [(7, 32, F32), (77, 64, F32), (200, 32, F16), (128, 64, BF16)])
def test_kernel_causal(S, D, dtype):
    B, H = 1, (2 if S < 128 else 1)
    run, ref = _run_attn(causal=True)
    _check(_qkv(B, H, S, D, dtype), run, ref, (B, S, H, D))


@pytest.mark.interpreter
def test_kernel_causal_with_padding_and_scale():
    B, H, S, D = 3, 1, 50, 64
    run, ref = _run_attn(_prefix_mask([50, 21, 0], S), causal=True, scale=0.2)
    o, grads = _check(_qkv(B, H, S, D, F32), run, ref, (B, S, H, D))
    assert torch.count_nonzero(o[2]) == 0


@pytest.mark.interpreter
def test_kernel_general_strides():
    """q from a (3, B, H, S, D) buffer, k as a transposed (B, S, H, D) tensor, v with D not unit stride."""
    B, H, S, D = 2, 2, 21, 32
    qkv = _qkv(B, H, S, D, F32)
    q = qkv[0]
    k = qkv[1].transpose(1, 2).contiguous().transpose(1, 2)
    v = qkv[2].transpose(-1, -2).contiguous().transpose(-1, -2)
    mask = _prefix_mask([21, 9], S)
    assert_close(attention(q, k, v, mask), attention_reference(q, k, v, mask))
    out = torch.empty(B, S, H, D)
    assert attention(q, k, v, out=out).data_ptr() == out.data_ptr()
    # off the launch contract (copied internally): misaligned data, strides not 16-divisible,
    # and a misaligned out= buffer (filled by a copy)
    flat = torch.randn(B * H * S * D + 1)
    q2 = flat[1:].view(B, H, S, D)
    k2 = torch.randn(B, H, S, D + 8)[..., :D]
    buf = torch.full((B * S * H * D + 3,), float("nan"))
    out2 = buf[3:].view(B, S, H, D)
    res = attention(q2, k2, v, mask, out=out2)
    assert res.data_ptr() == out2.data_ptr()
    assert_close(out2, attention_reference(q2, k2, v, mask))


def _run_varlen(cu, max_seqlen, causal=False):
    def run(q, k, v, out=None):
        return attention_varlen(q, k, v, cu, max_seqlen, causal=causal, out=out)

    def ref(q, k, v):
        return attention_varlen_reference(q, k, v, cu, max_seqlen, causal=causal)

    return run, ref


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,causal,lens", [
    (F32, False, [1, 37, 0, 20]), (F16, True, [33, 1, 16]), (BF16, False, [5, 1, 50]), (F32, True, [1]),
])
def test_kernel_varlen(dtype, causal, lens):
    H, D = 2, 32
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    qkv = torch.randn(3, T, H, D).to(dtype)
    run, ref = _run_varlen(cu, max(lens), causal)
    _check(qkv, run, ref, (T, H, D))


@pytest.mark.interpreter
def test_kernel_varlen_larger_max_seqlen_and_no_grad_path():
    lens = [3, 9]
    cu = torch.tensor([0, 3, 12], dtype=torch.int32)
    q, k, v = torch.randn(3, 12, 1, 64)
    got = attention_varlen(q, k, v, cu, 40)  # max_seqlen is an upper bound
    assert_close(got, attention_varlen_reference(q, k, v, cu, max(lens)))


@pytest.mark.interpreter
def test_kernel_matches_padded_on_real_tokens_via_unpad():
    """unpad -> attention_varlen -> pad equals padded attention on the real tokens (and grads)."""
    B, H, S, D = 3, 2, 29, 32
    mask = _prefix_mask([29, 12, 1], S)
    hidden = torch.randn(B, S, 3, H, D, requires_grad=True)  # a fused (B, S, 3*H*D) projection output
    packed, idx, cu, mx = unpad(hidden, mask)
    o_var = attention_varlen(packed[:, 0], packed[:, 1], packed[:, 2], cu, mx)
    o_pad = pad(o_var, idx, B, S)
    qkv = hidden.permute(2, 0, 3, 1, 4)  # (3, B, H, S, D)
    o_ref = attention(qkv[0], qkv[1], qkv[2], mask)
    real = mask.bool()
    assert_close(o_pad[real], o_ref[real])
    assert torch.count_nonzero(o_pad[~real]) == 0
    g1 = torch.autograd.grad((o_pad * real[..., None, None]).sum(), hidden)[0]
    g2 = torch.autograd.grad((o_ref * real[..., None, None]).sum(), hidden)[0]
    assert_close(g1, g2, GRAD_FACTOR)


@pytest.mark.interpreter
@pytest.mark.parametrize("cap,D,dtype", [
    ((9, 0), 64, F16), ((9, 0), 32, BF16), ((9, 0), 128, F16), ((9, 0), 128, F32),
    ((8, 0), 64, BF16), ((8, 0), 32, F16), ((8, 0), 128, F16), ((8, 0), 128, F32),
], ids=lambda x: str(x).replace("torch.", "").replace(", ", "."))
def test_kernel_with_gpu_block_sizes(monkeypatch, cap, D, dtype):
    """The exact tiles an H100 / A100 would use, run under the interpreter: causal + padding,
    an arbitrary key mask, an additive mask, varlen; S not a multiple of any block."""
    mod = sys.modules["bertfast.kernels.attention"]  # the package attribute ``bertfast.kernels.attention`` is the function
    real = mod.attention_config
    monkeypatch.setattr(mod, "attention_config", lambda d, dt, s, c, **kw: real(d, dt, s, cap, interpret=False, **kw))
    B, H, S = 2, 1, 200
    keys = (torch.rand(B, S) > 0.3).long()
    add = torch.randn(B, 1, 1, S).masked_fill(torch.rand(B, 1, 1, S) > 0.8, NEG_INF)
    for mask, causal in ((_prefix_mask([200, 131], S), True), (keys, False), (add, True)):
        run, ref = _run_attn(mask, causal=causal)
        _check(_qkv(B, H, S, D, dtype), run, ref, (B, S, H, D), check_out=False)
    lens = [150, 1, 49]
    cu = torch.tensor([0, 150, 151, 200], dtype=torch.int32)
    run, ref = _run_varlen(cu, max(lens), causal=False)
    _check(torch.randn(3, 200, H, D).to(dtype), run, ref, (200, H, D), check_out=False)


@pytest.mark.interpreter
def test_kernel_tf32_switch_keeps_results_close(tf32_matmul):
    """With TF32 allowed the fp32 launch takes the non-IEEE variant (same math here)."""
    with tf32_matmul(True):
        run, ref = _run_attn(causal=True)
        _check(_qkv(1, 1, 20, 32, F32), run, ref, (1, 20, 1, 32), check_out=False)


@pytest.mark.interpreter
def test_same_mask_reused_and_modified_in_place():
    """The 2-D mask is analysed at every call (nothing is cached on the tensor): reuse and
    in-place changes are seen (tests/test_mask_cache.py covers refills without a version bump)."""
    B, H, S, D = 2, 1, 20, 32
    q, k, v = _qkv(B, H, S, D, F32)
    mask = _prefix_mask([20, 8], S)
    for _ in range(2):
        assert_close(attention(q, k, v, mask), attention_reference(q, k, v, mask))
    mask[1, 3] = 0  # now not a prefix mask
    assert_close(attention(q, k, v, mask), attention_reference(q, k, v, mask))
    mask[1].zero_()
    o = attention(q, k, v, mask)
    assert_close(o, attention_reference(q, k, v, mask))
    assert torch.count_nonzero(o[1]) == 0


@pytest.mark.interpreter
def test_trusted_inputs_skip_host_reads_and_stay_correct():
    """Inside trusted_inputs() the 2-D mask is not analysed on the host (per-key-tile variant)
    and cu_seqlens values are not checked; results are unchanged."""
    from bertfast.kernels._common import trusted_inputs

    B, H, S, D = 2, 1, 30, 32
    q, k, v = _qkv(B, H, S, D, F16)
    mask = _prefix_mask([30, 11], S)
    with trusted_inputs():
        assert_close(attention(q, k, v, mask, causal=True), attention_reference(q, k, v, mask, causal=True))
        cu = torch.tensor([0, 1, 30], dtype=torch.int32)
        qv, kv, vv = torch.randn(3, 30, H, D)
        assert_close(attention_varlen(qv, kv, vv, cu, 29), attention_varlen_reference(qv, kv, vv, cu, 29))


@pytest.mark.interpreter
def test_out_with_autograd_is_rejected():
    qkv = torch.randn(3, 1, 1, 8, 32, requires_grad=True)
    with pytest.raises(ValueError, match="out="):
        attention(qkv[0], qkv[1], qkv[2], out=torch.empty(1, 8, 1, 32))


# --------------------------------------------------------------------------------------------
# rung 3: bad input
# --------------------------------------------------------------------------------------------
def _bad_cases():
    q, k, v = torch.randn(3, 2, 2, 8, 32)
    cases = [
        ("dtypes must match", lambda: attention(q, k.half(), v)),
        ("float64", lambda: attention(q.double(), k.double(), v.double())),
        ("head dim D=48", lambda: attention(*torch.randn(3, 1, 1, 8, 48))),
        ("same shape", lambda: attention(q, k[:, :, :4], v)),
        ("expected \\(B, H, S, D\\)", lambda: attention(q[0], k[0], v[0])),
        ("2-D attention_mask has shape", lambda: attention(q, k, v, torch.ones(2, 7))),
        ("2-D \\(B, S\\) or 4-D", lambda: attention(q, k, v, torch.ones(2, 1, 8))),
        ("not broadcastable", lambda: attention(q, k, v, torch.zeros(2, 3, 8, 8))),
        ("only 0 and 1", lambda: attention(q, k, v, torch.full((2, 8), -10000.0))),
        ("additive float mask", lambda: attention(q, k, v, torch.zeros(2, 1, 1, 8, dtype=torch.int64))),
        ("out must be", lambda: attention(q, k, v, out=torch.empty(2, 2, 8, 32))),
        ("out must be", lambda: attention(q, k, v, out=torch.empty(2, 8, 2, 32, dtype=torch.float16))),
        ("scale must be finite", lambda: attention(q, k, v, scale=float("nan"))),
    ]
    qv, kv, vv = torch.randn(3, 10, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases += [
        ("int32", lambda: attention_varlen(qv, kv, vv, cu.long(), 6)),
        ("1-D", lambda: attention_varlen(qv, kv, vv, cu[None], 6)),
        ("monotone", lambda: attention_varlen(qv, kv, vv, torch.tensor([0, 7, 4, 10], dtype=torch.int32), 6)),
        ("total_tokens", lambda: attention_varlen(qv, kv, vv, torch.tensor([0, 4, 9], dtype=torch.int32), 6)),
        ("cu_seqlens\\[0\\]", lambda: attention_varlen(qv, kv, vv, torch.tensor([1, 4, 10], dtype=torch.int32), 6)),
        ("max_seqlen = 5 is smaller", lambda: attention_varlen(qv, kv, vv, cu, 5)),
        ("max_seqlen must be a python int", lambda: attention_varlen(qv, kv, vv, cu, 6.0)),
        ("total_tokens, H, D", lambda: attention_varlen(q, k, v, cu, 6)),
        ("out must be", lambda: attention_varlen(qv, kv, vv, cu, 6, out=torch.empty(10, 2, 31))),
    ]
    return cases


@pytest.mark.parametrize("match,call", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises(match, call):
    with pytest.raises(ValueError, match=match):
        call()


def test_cpu_without_interpreter_needs_fallback(monkeypatch):
    import bertfast.kernels._common as common

    monkeypatch.setattr(common, "INTERPRET", False)
    q, k, v = torch.randn(3, 1, 2, 9, 32)
    with pytest.raises(ValueError, match="fallback=True"):
        attention(q, k, v)
    mask = _prefix_mask([5], 9)
    torch.testing.assert_close(attention(q, k, v, mask, causal=True, fallback=True),
                               attention_reference(q, k, v, mask, causal=True))
    out = nan_like((1, 9, 2, 32), torch.float32)
    attention(q, k, v, out=out, fallback=True)
    torch.testing.assert_close(out, attention_reference(q, k, v))
    qv, kv, vv = torch.randn(3, 9, 2, 32)
    cu = torch.tensor([0, 1, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="fallback=True"):
        attention_varlen(qv, kv, vv, cu, 8)
    torch.testing.assert_close(attention_varlen(qv, kv, vv, cu, 8, fallback=True),
                               attention_varlen_reference(qv, kv, vv, cu, 8))


# --------------------------------------------------------------------------------------------
# configuration / compile specs (no compilation here: tests/test_compile.py does that)
# --------------------------------------------------------------------------------------------
def test_config_is_deterministic_and_covered_by_compile_specs():
    for arch in (90, 80):
        labels = {s.label for s in compile_specs(arch)}
        kinds = {(s.fn.__name__ if hasattr(s.fn, "__name__") else s.fn.fn.__name__) for s in compile_specs(arch)}
        assert {"_attn_fwd", "_attn_bwd_pre", "_attn_bwd_dkdv", "_attn_bwd_dq"} <= kinds
        for D in (32, 64, 128):
            for dt in ("fp16", "bf16", "fp32-ieee", "fp32-tf32"):
                for variant in ("lens/varlen", "keymask", "addmask"):
                    for c in ("", " causal"):
                        for k in ("fwd", "dkdv", "dq"):
                            assert f"{k} D{D} {dt} {variant}{c}" in labels
        for D in (32, 64, 128):
            for dtype in (F16, BF16, F32):
                cfg = attention_config(D, dtype, 512, (arch // 10, arch % 10), interpret=False)
                assert cfg == attention_config(D, dtype, 512, (arch // 10, arch % 10), interpret=False)
                specs = [s for s in compile_specs(arch) if s.constexprs.get("HEAD_DIM") == D]
                assert any(s.constexprs.get("BLOCK_M") == cfg["fwd"].block_m
                           and s.constexprs.get("BLOCK_N") == cfg["fwd"].block_n for s in specs)
    # the interpreter config leaves partial tiles at the tested lengths
    cfg = attention_config(64, F16, 77, (9, 0), interpret=True)
    assert 77 % cfg["fwd"].block_m and 77 % cfg["fwd"].block_n and cfg["fwd"].block_m != cfg["fwd"].block_n


# --------------------------------------------------------------------------------------------
# rung 4: CUDA
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("case", ["plain", "padding", "arbitrary", "additive", "causal", "causal_padding"])
def test_gpu_parity(dtype, case):
    B, H, S, D = 2, 12, 512, 64
    dev = "cuda"
    mask = None
    if case in ("padding", "causal_padding"):
        mask = _prefix_mask([512, 300], S, device=dev)
    elif case == "arbitrary":
        mask = (torch.rand(B, S, device=dev) > 0.3).long()
    elif case == "additive":
        mask = torch.randn(B, 1, S, S, device=dev)
        mask[:, :, :, 400:] = NEG_INF
    run, ref = _run_attn(mask, causal=case.startswith("causal"))
    _check(_qkv(B, H, S, D, dtype, device=dev), run, ref, (B, S, H, D))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("D", [32, 128])
def test_gpu_head_dims(dtype, D):
    B, H, S = 2, 4, 300
    run, ref = _run_attn(_prefix_mask([300, 177], S, device="cuda"))
    _check(_qkv(B, H, S, D, dtype, device="cuda"), run, ref, (B, S, H, D))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen(dtype, causal):
    H, D = 12, 64
    lens = [512, 1, 300, 77]
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    qkv = torch.randn(3, T, H, D, device="cuda").to(dtype)
    run, ref = _run_varlen(cu, max(lens), causal)
    _check(qkv, run, ref, (T, H, D))


@pytest.mark.gpu
def test_gpu_memory_does_not_grow_with_s_squared():
    B, H, D = 1, 12, 64
    extra = {}
    for S in (1024, 4096):
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=F16, requires_grad=True) for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        o = attention(q, k, v, causal=True)
        o.backward(torch.ones_like(o))
        torch.cuda.synchronize()
        extra[S] = torch.cuda.max_memory_allocated() - base
        # an S x S fp32 score matrix alone would be B*H*S*S*4 bytes
        assert extra[S] < 16 * q.numel() * q.element_size(), (S, extra[S])
        del q, k, v, o
    assert extra[4096] < 6 * extra[1024]  # 4x the tokens: linear growth, not 16x
