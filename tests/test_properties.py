"""Property tests (hypothesis): random batch (1-4), length (1-16), padding pattern (none, right,
left, holes, all-padding rows, all-padding batch), dtype (fp32 / fp16 / bf16) and causal flag.

* kernel level: ``bertfast.kernels.attention`` (the interpreter) against ``attention_reference``, with raw
  masks (bool / int / float 0-1) and with the prepared-mask API (``prepare_attention_mask``,
  analysed or trusted, 2-D or 4-D additive), into ``out=`` buffers pre-filled with NaN;
* model level: the bertfast torch backend against transformers (a tiny random config saved
  and loaded; ``last_hidden_state`` at real tokens and ``pooler_output``), and the triton
  backend (interpreter) against the torch backend.

Each comparison is within ``bertfast.kernels.testing``'s tolerance table (times a stated factor for
whole models), or the call raises a ``ValueError`` naming the problem.  Reproducible: the
examples are derandomized and no example database is used (``PROFILE``); each property runs a
few explicit examples (every padding pattern) and then a fixed number of generated ones
(``*_EXAMPLES``).
"""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bertfast import kernels  # noqa: E402,F401
from bertfast.kernels.attention import attention, attention_reference, prepare_attention_mask  # noqa: E402
from bertfast.kernels.testing import TOLERANCES, assert_close, nan_like, tolerance  # noqa: E402

# No shrink phase: a failure reports the first failing example (its description is in the
# assertion message) instead of spending minutes of interpreter time shrinking it.
PROFILE = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                   phases=(Phase.explicit, Phase.generate),
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.function_scoped_fixture])

KERNEL_EXAMPLES = 25
PREPARED_EXAMPLES = 25
HF_EXAMPLES = 50
TRITON_EXAMPLES = 10
# whole models (2 layers, GEMMs, LayerNorms) accumulate more roundings than one op
MODEL_FACTOR = {torch.float32: 4.0, torch.float16: 4.0, torch.bfloat16: 4.0}

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATTERNS = ("none", "right", "left", "holes", "padding_rows", "padding_batch")


# ----------------------------------------------------------------------------- strategies


@st.composite
def padding_masks(draw, max_batch=4, max_len=16):
    """(pattern, (B, S) bool mask: True = real token)."""
    B = draw(st.integers(1, max_batch), label="batch")
    S = draw(st.integers(1, max_len), label="length")
    pattern = draw(st.sampled_from(PATTERNS), label="pattern")
    mask = torch.ones(B, S, dtype=torch.bool)
    if pattern == "padding_batch":
        return pattern, torch.zeros(B, S, dtype=torch.bool)
    if pattern == "none":
        return pattern, mask
    if pattern == "holes":
        bits = draw(st.lists(st.booleans(), min_size=B * S, max_size=B * S), label="bits")
        return pattern, torch.tensor(bits, dtype=torch.bool).view(B, S)
    lens = draw(st.lists(st.integers(0 if pattern == "padding_rows" else 1, S), min_size=B, max_size=B), label="lens")
    left = draw(st.booleans(), label="left") if pattern == "padding_rows" else pattern == "left"
    if pattern == "padding_rows":
        dead = draw(st.integers(0, B - 1), label="dead_row")
        lens[dead] = 0
    pos = torch.arange(S)[None, :]
    L = torch.tensor(lens)[:, None]
    mask = pos >= S - L if left else pos < L
    return pattern, mask


def _rows(*rows):
    return torch.tensor(rows, dtype=torch.bool)


# explicit examples (run first, on top of the generated ones): every padding pattern is covered
RIGHT = ("right", _rows([1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]))
LEFT = ("left", _rows([0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]))
HOLES = ("holes", _rows([1, 0, 1, 1, 0], [0, 1, 0, 0, 1]))
DEAD_ROW = ("padding_rows", _rows([0, 0, 0, 0, 0], [1, 1, 0, 0, 0]))
ALL_PADDING = ("padding_batch", _rows([0, 0, 0, 0, 0], [0, 0, 0, 0, 0]))


def _events(*tags):
    """Coverage, shown by ``pytest --hypothesis-show-statistics``."""
    for t in tags:
        event(str(t).replace("torch.", ""))


def _describe(pattern, mask):
    return f"{pattern} B={mask.shape[0]} S={mask.shape[1]} rows={mask.long().tolist()}"


def _qkv(B, H, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, B, H, S, D, generator=g).to(dtype)


MASK_DTYPES = (torch.bool, torch.int64, torch.int32, torch.float32)


# ----------------------------------------------------------------------------- kernel level


@pytest.mark.interpreter
@settings(PROFILE, max_examples=KERNEL_EXAMPLES)
@given(pm=padding_masks(), dtype=st.sampled_from(DTYPES), causal=st.booleans(), heads=st.integers(1, 2),
       mask_dtype=st.sampled_from(MASK_DTYPES), seed=st.integers(0, 2**16))
@example(pm=RIGHT, dtype=torch.float32, causal=False, heads=2, mask_dtype=torch.int64, seed=1)
@example(pm=LEFT, dtype=torch.float16, causal=True, heads=1, mask_dtype=torch.bool, seed=2)
@example(pm=HOLES, dtype=torch.bfloat16, causal=False, heads=2, mask_dtype=torch.float32, seed=3)
@example(pm=DEAD_ROW, dtype=torch.bfloat16, causal=True, heads=2, mask_dtype=torch.int32, seed=4)
@example(pm=ALL_PADDING, dtype=torch.float32, causal=False, heads=1, mask_dtype=torch.int64, seed=5)
def test_kernel_raw_mask_matches_reference(pm, dtype, causal, heads, mask_dtype, seed):
    pattern, valid = pm
    _events(pattern, dtype, f"causal={causal}")
    B, S = valid.shape
    qkv = _qkv(B, heads, S, 32, dtype, seed)
    q, k, v = qkv[0], qkv[1], qkv[2]
    mask = None if pattern == "none" and seed % 2 else valid.to(mask_dtype)
    want = attention_reference(q, k, v, mask, causal=causal)
    out = nan_like((B, S, heads, 32), dtype)
    res = attention(q, k, v, mask, causal=causal, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert_close(out, want, msg=_describe(pattern, valid))
    # a query row with no visible key is zero (never NaN)
    if mask is not None:
        vis = valid[:, None, :].expand(B, S, S)
        if causal:
            vis = vis & torch.ones(S, S, dtype=torch.bool).tril()
        dead = ~vis.any(-1)  # (B, S) query rows
        assert torch.count_nonzero(out[dead]) == 0


def _additive(valid, dtype, inf):
    fill = float("-inf") if inf else torch.finfo(dtype).min
    return torch.zeros(valid.shape, dtype=dtype).masked_fill(~valid, fill)[:, None, None, :]


@pytest.mark.interpreter
@settings(PROFILE, max_examples=PREPARED_EXAMPLES)
@given(pm=padding_masks(), dtype=st.sampled_from(DTYPES), causal=st.booleans(), heads=st.integers(1, 2),
       form=st.sampled_from(("2d", "2d_trusted", "2d_analyze_in_trusted", "4d_inf", "4d_min", "4d_bool")),
       layers=st.integers(1, 3), seed=st.integers(0, 2**16))
@example(pm=RIGHT, dtype=torch.float16, causal=False, heads=2, form="2d", layers=3, seed=1)
@example(pm=LEFT, dtype=torch.float32, causal=True, heads=2, form="2d_analyze_in_trusted", layers=2, seed=2)
@example(pm=HOLES, dtype=torch.float32, causal=True, heads=1, form="2d_trusted", layers=2, seed=3)
@example(pm=DEAD_ROW, dtype=torch.bfloat16, causal=False, heads=2, form="4d_min", layers=1, seed=4)
@example(pm=ALL_PADDING, dtype=torch.float32, causal=True, heads=1, form="4d_inf", layers=1, seed=5)
def test_kernel_prepared_mask_matches_reference(pm, dtype, causal, heads, form, layers, seed):
    """One AttentionMask, prepared once, serves several calls (the layers of one forward)."""
    from bertfast.kernels._common import trusted_inputs

    pattern, valid = pm
    _events(pattern, dtype, f"causal={causal}", form)
    B, S = valid.shape
    if form.startswith("2d"):
        mask = valid.long()
    elif form == "4d_bool":
        mask = valid[:, None, None, :].expand(B, heads, S, S)
    else:
        mask = _additive(valid, torch.float32, form == "4d_inf")
    if form == "2d":
        prepared = prepare_attention_mask(mask, B, heads, S)
    else:
        with trusted_inputs():
            analyze = True if form == "2d_analyze_in_trusted" else None
            prepared = prepare_attention_mask(mask, B, heads, S, analyze=analyze)
    for layer in range(layers):
        qkv = _qkv(B, heads, S, 32, dtype, seed + layer)
        q, k, v = qkv[0], qkv[1], qkv[2]
        want = attention_reference(q, k, v, mask, causal=causal)
        out = nan_like((B, S, heads, 32), dtype)
        attention(q, k, v, prepared, causal=causal, out=out)
        assert_close(out, want, msg=f"{form} layer {layer}: {_describe(pattern, valid)}")


# ----------------------------------------------------------------------------- model level

transformers = pytest.importorskip("transformers")

HIDDEN, LAYERS, HEADS, VOCAB, MAX_POS = 64, 2, 2, 64, 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random transformers BertModel per causal flag, saved; transformers' copy in eval
    mode with eager attention (its reference semantics for fully masked rows: a uniform
    softmax at the dtype's most negative score)."""
    out = {}
    for causal in (False, True):
        torch.manual_seed(1234 + causal)
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, intermediate_size=128,
                                      max_position_embeddings=MAX_POS, type_vocab_size=2,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      is_decoder=causal, use_cache=False, attn_implementation="eager")
        ref = transformers.BertModel(cfg).eval()
        with torch.no_grad():  # non-trivial LayerNorm parameters and biases
            for name, p in ref.named_parameters():
                if "LayerNorm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        d = tmp_path_factory.mktemp(f"tiny_causal{int(causal)}")
        ref.save_pretrained(d)
        loaded = transformers.BertModel.from_pretrained(d, attn_implementation="eager").eval()
        out[causal] = (d, loaded)
    return out


_MODELS = {}


def _ours(checkpoints, causal, dtype=torch.float32):
    from bertfast import BertModel

    key = (causal, dtype)
    if key not in _MODELS:
        d, _ = checkpoints[causal]
        _MODELS[key] = BertModel.from_pretrained(d, dtype=dtype).eval()
    return _MODELS[key]


def _inputs(valid, seed):
    g = torch.Generator().manual_seed(seed)
    B, S = valid.shape
    ids = torch.randint(1, VOCAB, (B, S), generator=g).masked_fill(~valid, 0)
    types = torch.randint(0, 2, (B, S), generator=g)
    return ids, types


def _value_error_names_problem(exc: ValueError) -> bool:
    msg = str(exc).lower()
    return any(w in msg for w in ("attention_mask", "padding", "mask", "token"))


def _compare(a, b, valid, dtype, factor, what, pooled_rows=None):
    """last_hidden_state at real tokens, pooler_output (of ``pooled_rows``: all by default)."""
    real = valid
    if real.any():
        assert_close(a.last_hidden_state[real], b.last_hidden_state[real].to(dtype), factor,
                     msg=f"{what}: last_hidden_state at real tokens")
    rows = slice(None) if pooled_rows is None else pooled_rows
    assert_close(a.pooler_output[rows], b.pooler_output[rows].to(dtype), factor, msg=f"{what}: pooler_output")


@settings(PROFILE, max_examples=HF_EXAMPLES)
@given(pm=padding_masks(max_len=16), causal=st.booleans(), unpad=st.sampled_from([True, False, "always"]),
       seed=st.integers(0, 2**16))
@example(pm=RIGHT, causal=False, unpad=True, seed=1)
@example(pm=RIGHT, causal=True, unpad=False, seed=2)
@example(pm=LEFT, causal=False, unpad=True, seed=3)
@example(pm=LEFT, causal=True, unpad=True, seed=4)
@example(pm=HOLES, causal=False, unpad=True, seed=5)
@example(pm=DEAD_ROW, causal=True, unpad=True, seed=6)
@example(pm=ALL_PADDING, causal=False, unpad=True, seed=7)
def test_model_torch_backend_matches_transformers(checkpoints, pm, causal, unpad, seed):
    pattern, valid = pm
    _events(pattern, f"causal={causal}", f"unpad={unpad}")
    _, ref = checkpoints[causal]
    model = _ours(checkpoints, causal).set_backend("torch", unpad=unpad)
    ids, types = _inputs(valid, seed)
    mask = valid.long()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        try:
            got = model(ids, attention_mask=mask, token_type_ids=types)
        except ValueError as e:
            assert _value_error_names_problem(e), e
            return
    # unpad="always" opts into masked semantics: the pooler of a row whose first token is padding
    # reads the zero vector (documented in bertfast/modeling.py); everything else is exact
    rows = valid[:, 0] if unpad == "always" else None
    _compare(got, want, valid, torch.float32, MODEL_FACTOR[torch.float32],
             f"torch backend unpad={unpad} causal={causal} {_describe(pattern, valid)}", rows)


@pytest.mark.interpreter
@settings(PROFILE, max_examples=TRITON_EXAMPLES)
@given(pm=padding_masks(max_len=16), dtype=st.sampled_from(DTYPES), causal=st.booleans(),
       unpad=st.booleans(), seed=st.integers(0, 2**16))
@example(pm=RIGHT, dtype=torch.float16, causal=False, unpad=True, seed=1)
@example(pm=LEFT, dtype=torch.bfloat16, causal=False, unpad=True, seed=2)
@example(pm=HOLES, dtype=torch.float32, causal=False, unpad=False, seed=3)
@example(pm=ALL_PADDING, dtype=torch.float32, causal=False, unpad=True, seed=4)
@example(pm=DEAD_ROW, dtype=torch.float32, causal=True, unpad=True, seed=5)
def test_model_triton_backend_matches_torch_backend(checkpoints, pm, dtype, causal, unpad, seed):
    pattern, valid = pm
    _events(pattern, dtype, f"causal={causal}", f"unpad={unpad}")
    model = _ours(checkpoints, causal, dtype)
    ids, types = _inputs(valid, seed)
    mask = valid.long()
    with torch.no_grad():
        try:
            want = model.set_backend("torch", unpad=False)(ids, attention_mask=mask, token_type_ids=types)
        except ValueError as e:
            assert _value_error_names_problem(e), e
            return
        got = model.set_backend("triton", unpad=unpad)(ids, attention_mask=mask, token_type_ids=types)
    _compare(got, want, valid, dtype, MODEL_FACTOR[dtype],
             f"triton unpad={unpad} {dtype} causal={causal} {_describe(pattern, valid)}")


def test_tolerance_table_covers_property_dtypes():
    assert all(d in TOLERANCES for d in DTYPES)
    assert all(math.isfinite(tolerance(d, MODEL_FACTOR[d])["atol"]) for d in DTYPES)
