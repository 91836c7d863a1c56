"""embeddings_layernorm: rung 1 (reference vs float64), rung 2 (interpreter parity, forward and
backward, id dtypes and optional ids), bad input (ids out of range per input, shapes, dtypes),
rung 4 (the same parity on CUDA)."""
import sys

import pytest
import torch

import bertfast.kernels._common as common
from bertfast.kernels.embeddings_layernorm import embeddings_layernorm, embeddings_layernorm_reference
from bertfast.kernels.testing import GRAD_FACTOR, TOLERANCES, assert_close, nan_like

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-12
VOCAB, MAX_POS, TYPES = 97, 80, 3
TABLES = ["word_weight", "position_weight", "type_weight", "ln_weight", "ln_bias"]


def _tables(n, dtype, device, requires_grad=False, vocab=VOCAB, max_pos=MAX_POS, types=TYPES):
    g = dict(dtype=dtype, device=device)
    t = {
        "word_weight": torch.randn(vocab, n, **g),
        "position_weight": torch.randn(max_pos, n, **g),
        "type_weight": torch.randn(types, n, **g),
        "ln_weight": 1 + 0.5 * torch.randn(n, **g),
        "ln_bias": 0.5 * torch.randn(n, **g),
    }
    for v in t.values():
        v.requires_grad_(requires_grad)
    return t


def _ids(bsz, seq, id_dtype, device, types, positions):
    ids = torch.randint(0, VOCAB, (bsz, seq), dtype=id_dtype, device=device)
    ids[0, 0] = 0  # both ends of the table
    ids[-1, -1] = VOCAB - 1
    tt = torch.randint(0, TYPES, (bsz, seq), dtype=id_dtype, device=device) if types else None
    pos = {
        "none": None,
        "s": torch.randperm(MAX_POS, device=device)[:seq].to(id_dtype),
        "1s": torch.arange(seq, dtype=id_dtype, device=device)[None, :],
        "bs": torch.randint(0, MAX_POS, (bsz, seq), dtype=id_dtype, device=device),
    }[positions]
    return ids, tt, pos


def _call(fn, ids, tt, pos, t, **kw):
    return fn(ids, tt, pos, *(t[k] for k in TABLES), EPS, **kw)


def _check(bsz, seq, n, dtype, id_dtype, types, positions, device, padding_idx=None):
    ids, tt, pos = _ids(bsz, seq, id_dtype, device, types, positions)
    # forward without autograd, into a NaN-filled buffer
    t = _tables(n, dtype, device)
    out = nan_like((bsz, seq, n), dtype, device)
    y = _call(embeddings_layernorm, ids, tt, pos, t, out=out, padding_idx=padding_idx)
    assert y is out
    tag = f"{dtype} ids={id_dtype} {bsz}x{seq}x{n} types={types} positions={positions}"
    assert_close(y, _call(embeddings_layernorm_reference, ids, tt, pos, t), msg=tag)
    # forward + backward
    for v in t.values():
        v.requires_grad_(True)
    y = _call(embeddings_layernorm, ids, tt, pos, t, padding_idx=padding_idx)
    y_ref = _call(embeddings_layernorm_reference, ids, tt, pos, t, padding_idx=padding_idx)
    assert y.dtype == dtype and y.shape == (bsz, seq, n)
    assert_close(y, y_ref, msg=tag)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, list(t.values()), dy)
    want = torch.autograd.grad(y_ref, list(t.values()), dy)
    for k, a, e in zip(t, got, want):
        assert a.dtype == dtype
        assert_close(a, e, GRAD_FACTOR, msg=f"d{k} {tag}")
    return got


# ---------------------------------------------------------------- rung 1: reference vs float64


@pytest.mark.parametrize("types,positions", [(True, "bs"), (False, "none"), (True, "s")])
def test_reference_matches_float64(types, positions):
    n = 384
    t = _tables(n, torch.float32, "cpu")
    ids, tt, pos = _ids(3, 17, torch.int64, "cpu", types, positions)
    tt64 = tt if tt is not None else torch.zeros_like(ids)
    pos64 = pos if pos is not None else torch.arange(17)
    e = (t["word_weight"].double()[ids] + t["position_weight"].double()[pos64] + t["type_weight"].double()[tt64])
    mean = e.mean(-1, keepdim=True)
    var = ((e - mean) ** 2).mean(-1, keepdim=True)
    want = (e - mean) / torch.sqrt(var + EPS) * t["ln_weight"].double() + t["ln_bias"].double()
    got = _call(embeddings_layernorm_reference, ids, tt, pos, t)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- rung 2: interpreter parity

# (B, S, hidden, id dtype, token types given, positions): S = 1 and 77, hidden 384 / 1000 / 768,
# int32 and int64 ids, token types given or None, positions (B, S), (S,), (1, S) or None.
CASES = [
    (2, 77, 384, torch.int64, True, "s"),
    (1, 1, 1000, torch.int32, False, "none"),
    (3, 13, 768, torch.int32, True, "bs"),
    (2, 9, 1000, torch.int64, False, "1s"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,seq,n,id_dtype,types,positions", CASES)
def test_parity_interpreter(bsz, seq, n, id_dtype, types, positions, dtype):
    _check(bsz, seq, n, dtype, id_dtype, types, positions, "cpu")


@pytest.mark.interpreter
def test_parity_interpreter_hidden_4096():
    _check(2, 3, 4096, torch.bfloat16, torch.int64, True, "none", "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("padding_idx", [0, -1])
def test_padding_idx_zeroes_word_gradient(padding_idx):
    dword = _check(2, 13, 384, torch.float32, torch.int64, True, "s", "cpu", padding_idx=padding_idx)[0]
    assert torch.count_nonzero(dword[padding_idx % VOCAB]) == 0


@pytest.mark.interpreter
def test_hf_style_buffers_and_strided_ids():
    """Hugging Face passes token types as an expanded (stride-0) buffer and positions as a
    (1, S) slice of an int64 buffer; ids may be a strided view; id dtypes may differ."""
    bsz, seq, n = 3, 11, 384
    t = _tables(n, torch.float16, "cpu", requires_grad=True)
    ids = torch.randint(0, VOCAB, (bsz, 2 * seq), dtype=torch.int32)[:, ::2]
    tt = torch.zeros(1, MAX_POS, dtype=torch.int64)[:, :seq].expand(bsz, seq)
    pos = torch.arange(MAX_POS, dtype=torch.int64)[None, 5 : 5 + seq]
    y = _call(embeddings_layernorm, ids, tt, pos, t)
    y_ref = _call(embeddings_layernorm_reference, ids, tt, pos, t)
    assert_close(y, y_ref)
    dy = torch.randn_like(y)
    for k, a, e in zip(TABLES, torch.autograd.grad(y, list(t.values()), dy),
                       torch.autograd.grad(y_ref, list(t.values()), dy)):
        assert_close(a, e, GRAD_FACTOR, msg=f"d{k}")


@pytest.mark.interpreter
def test_out_with_autograd():
    t = _tables(384, torch.float16, "cpu", requires_grad=True)
    ids, tt, pos = _ids(2, 7, torch.int32, "cpu", False, "none")
    out = nan_like((2, 7, 384), torch.float16)
    y = _call(embeddings_layernorm, ids, tt, pos, t, out=out)
    assert y is out and y.grad_fn is not None
    got = torch.autograd.grad(y.float().sum(), list(t.values()))
    want = torch.autograd.grad(_call(embeddings_layernorm_reference, ids, tt, pos, t).float().sum(), list(t.values()))
    for a, e in zip(got, want):
        assert_close(a, e, GRAD_FACTOR)


@pytest.mark.interpreter
def test_backward_is_deterministic():
    t = _tables(384, torch.float32, "cpu", requires_grad=True)
    ids, tt, pos = _ids(3, 20, torch.int64, "cpu", True, "bs")
    dy = torch.randn(3, 20, 384)
    g1 = torch.autograd.grad(_call(embeddings_layernorm, ids, tt, pos, t), list(t.values()), dy)
    g2 = torch.autograd.grad(_call(embeddings_layernorm, ids, tt, pos, t), list(t.values()), dy)
    for a, b in zip(g1[3:], g2[3:]):  # LayerNorm weight / bias: partial sums + sum(0), bitwise
        assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("bsz,seq", [(0, 5), (2, 0)])
def test_empty(bsz, seq):
    t = _tables(384, torch.float16, "cpu", requires_grad=True)
    ids = torch.zeros(bsz, seq, dtype=torch.int64)
    y = _call(embeddings_layernorm, ids, None, None, t)
    assert y.shape == (bsz, seq, 384) and y.dtype == torch.float16
    grads = torch.autograd.grad(y.float().sum(), list(t.values()))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.interpreter
def test_trusted_inputs_skip_the_id_check(monkeypatch):
    mod = sys.modules["bertfast.kernels.embeddings_layernorm"]  # the package attribute is the function

    t = _tables(128, torch.float32, "cpu")
    ids, tt, pos = _ids(2, 5, torch.int64, "cpu", True, "s")
    monkeypatch.setattr(mod, "_check_id_ranges", lambda *a: pytest.fail("value check ran inside trusted_inputs()"))
    with common.trusted_inputs():
        y = _call(embeddings_layernorm, ids, tt, pos, t)
    assert_close(y, _call(embeddings_layernorm_reference, ids, tt, pos, t))


def test_fallback_runs_reference_without_interpreter(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET", False)
    t = _tables(384, torch.float32, "cpu")
    ids, tt, pos = _ids(2, 7, torch.int64, "cpu", True, "s")
    with pytest.raises(ValueError, match="fallback=True"):
        _call(embeddings_layernorm, ids, tt, pos, t)
    assert_close(_call(embeddings_layernorm, ids, tt, pos, t, fallback=True),
                 _call(embeddings_layernorm_reference, ids, tt, pos, t))
    with pytest.raises(ValueError, match=r"input_ids holds id 193, out of range"):  # checked on the fallback path too
        _call(embeddings_layernorm, ids + VOCAB, tt, pos, t, fallback=True)


# ---------------------------------------------------------------- bad input

_BAD_IDS = [
    ("input_ids", -1, r"input_ids holds id -1, out of range: ids must be in \[0, 97\) \(word_weight has 97 rows\)"),
    ("input_ids", VOCAB, r"input_ids holds id 97, out of range: ids must be in \[0, 97\)"),
    ("token_type_ids", -3, r"token_type_ids holds id -3, out of range: ids must be in \[0, 3\) \(type_weight"),
    ("token_type_ids", TYPES, r"token_type_ids holds id 3, out of range: ids must be in \[0, 3\)"),
    ("position_ids", -2, r"position_ids holds id -2, out of range: ids must be in \[0, 80\) \(position_weight"),
    ("position_ids", MAX_POS + 5, r"position_ids holds id 85, out of range: ids must be in \[0, 80\)"),
]


@pytest.mark.parametrize("name,value,match", _BAD_IDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_id_out_of_range(name, value, match, id_dtype):
    t = _tables(128, torch.float32, "cpu")
    ids, tt, pos = _ids(2, 6, id_dtype, "cpu", True, "bs")
    bad = {"input_ids": ids, "token_type_ids": tt, "position_ids": pos}[name]
    bad[1, 3] = value
    with pytest.raises(ValueError, match=match):
        _call(embeddings_layernorm, ids, tt, pos, t)


def _bad(over):
    t = _tables(128, torch.float32, "cpu")
    ids, tt, pos = _ids(2, 6, torch.int64, "cpu", True, "bs")
    a = {"input_ids": ids, "token_type_ids": tt, "position_ids": pos, **t, "eps": EPS}
    kw = {k: over.pop(k) for k in list(over) if k in ("out", "padding_idx")}
    a.update(over)
    return lambda: embeddings_layernorm(*a.values(), **kw, fallback=True)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"input_ids": torch.zeros(12, dtype=torch.int64)}, r"input_ids has shape \(12,\)"),
        ({"input_ids": torch.zeros(2, 6)}, "input_ids has dtype float32; expected int32 or int64"),
        ({"token_type_ids": torch.zeros(2, 5, dtype=torch.int64)}, "token_type_ids has shape"),
        ({"token_type_ids": torch.zeros(2, 6, dtype=torch.int16)}, "token_type_ids has dtype int16"),
        ({"position_ids": torch.zeros(7, dtype=torch.int64)}, "position_ids has shape"),
        ({"position_ids": torch.zeros(3, 6, dtype=torch.int64)}, "position_ids has shape"),
        ({"position_ids": None, "input_ids": torch.zeros(1, MAX_POS + 1, dtype=torch.int64), "token_type_ids": None},
         "sequence length 81 too long"),
        ({"position_weight": torch.randn(MAX_POS, 64)}, "position_weight has shape"),
        ({"type_weight": torch.randn(TYPES, 129)}, "type_weight has shape"),
        ({"type_weight": torch.randn(0, 128)}, "type_weight has shape"),
        ({"ln_weight": torch.randn(127)}, "ln_weight has shape"),
        ({"ln_bias": torch.randn(128, dtype=torch.float16)}, "dtypes must match"),
        ({"word_weight": torch.randn(VOCAB, 128, dtype=torch.bfloat16)}, "dtypes must match"),
        ({k: torch.randn(r, 128, dtype=torch.float64) for k, r in
          (("word_weight", VOCAB), ("position_weight", MAX_POS), ("type_weight", TYPES))}, "float64"),
        ({"word_weight": torch.randn(VOCAB, 8200), "position_weight": torch.randn(MAX_POS, 8200),
          "type_weight": torch.randn(TYPES, 8200), "ln_weight": torch.randn(8200), "ln_bias": torch.randn(8200)},
         "hidden size 8200 is larger than the supported maximum 8192"),
        ({"out": torch.empty(2, 6, 128, dtype=torch.float16)}, "out must be"),
        ({"padding_idx": VOCAB}, "padding_idx must be"),
        ({"eps": 0.0}, "eps must be"),
        ({"input_ids": torch.zeros(2, 6, dtype=torch.int64, device="meta")}, "one device"),
    ],
)
def test_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(dict(over))()


# ---------------------------------------------------------------- rung 4: CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bsz,seq,n,id_dtype,types,positions",
    CASES + [(32, 77, 768, torch.int64, True, "1s"), (8, 64, 4096, torch.int32, True, "bs"),
             (4, 16, 8192, torch.int64, False, "none"), (3, 5, 100, torch.int32, True, "s")],
)
def test_gpu_parity(bsz, seq, n, id_dtype, types, positions, dtype):
    _check(bsz, seq, n, dtype, id_dtype, types, positions, "cuda", padding_idx=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name,value,match", _BAD_IDS)
def test_gpu_id_out_of_range(name, value, match):
    t = _tables(768, torch.float16, "cuda")
    ids, tt, pos = _ids(2, 6, torch.int64, "cuda", True, "bs")
    {"input_ids": ids, "token_type_ids": tt, "position_ids": pos}[name][1, 3] = value
    with pytest.raises(ValueError, match=match):
        _call(embeddings_layernorm, ids, tt, pos, t)
    torch.cuda.synchronize()  # no device-side assert was raised
