"""The fast encoder on a CUDA GPU (skipped without one), and the GPU-only API's errors on CPU.

Every model here is built in the test from random weights of real shapes -- bert-base (hidden
768, 12 layers, 12 heads) and all-MiniLM-L6-v2 (hidden 384, 6 layers, 12 heads) -- so a GPU
machine needs no checkpoint package, no download and no file over a few kB.  Comparisons with
the real all-MiniLM-L6-v2 weights run on the CPU (tests/test_model.py, tests/test_loading.py).

Accuracy rule (flash-attention's): the Triton fp16 model's error against transformers in fp32
is at most 4x transformers' own fp16 error, measured on the same inputs and weights.
"""
import copy

import pytest
import torch

import bertfast
from bertfast import BertConfig, BertModel

transformers = pytest.importorskip("transformers")

# the shapes of the checkpoints bertfast is used with (vocabulary and positions included)
SHAPES = {
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
    "minilm-l6": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2),
    # only for the CPU run of the harness itself
    "tiny": dict(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=64, type_vocab_size=2),
}

# unit roundoff of each half type: "a few units in the last place" tolerances are multiples of it
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _random_hf(shape, seed=0):
    """A transformers BertModel with the given shape and random weights (fixed seed), fp32, on
    the CPU, in eval mode.  transformers' init leaves LayerNorm scales at 1 and every bias at 0,
    which would hide a kernel that drops them: those are randomised too."""
    torch.manual_seed(seed)
    hf = transformers.BertModel(transformers.BertConfig(**SHAPES[shape])).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return hf


def _ours_like(hf, dtype, device, backend="triton", unpad=True):
    """A bertfast BertModel holding exactly ``hf``'s weights (strict load: every key matches)."""
    ours = BertModel(BertConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.to(device=device, dtype=dtype).set_backend(backend, unpad=unpad)


def _batch(B, S, vocab, device, seed=0, mixed=True):
    """Random ids, a right-padded mask (each sequence 30%..100% of S long), token types 0/1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, S), generator=g)
    lens = torch.randint(max(1, int(0.3 * S)), S + 1, (B,), generator=g) if mixed else torch.full((B,), S)
    mask = (torch.arange(S)[None, :] < lens[:, None]).long()
    tt = (torch.arange(S)[None, :] >= (lens[:, None] // 2)).long() * mask
    return ids.to(device), mask.to(device), tt.to(device)


def _max_err(a, b, mask):
    """Largest |a - b| over the real (unpadded) tokens of (B, S, H) hidden states."""
    m = mask[..., None].to(torch.float32)
    return ((a.float() - b.float()).abs() * m).max().item()


def _assert_same_math(out, ref, mask, dtype, ulps=8):
    """``out`` and ``ref`` are the same computation in the same half dtype, launched on differently
    padded shapes (CUDA-graph buckets) or through another frontend (torch.compile): tiles may differ
    and round differently, by a few units in the last place of the largest output; a real bug
    (wrong slice, stale buffer, missing op) is O(1)."""
    if mask is None:
        err, scale = (out.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    else:
        err, scale = _max_err(out, ref, mask), _max_err(ref, torch.zeros_like(ref), mask)
    assert err <= ulps * EPS[dtype] * max(1.0, scale), (err, scale)


def _check_rule(shape, B=8, S=128, unpad=True, device="cuda", backend="triton", dtype=torch.float16):
    """The accuracy rule on one random-weight model: bertfast in ``dtype`` vs transformers fp32,
    against transformers in ``dtype`` vs transformers fp32."""
    dev = torch.device(device)
    hf32 = _random_hf(shape).to(dev)
    hf16 = copy.deepcopy(hf32).to(dtype)
    ours = _ours_like(hf32, dtype, dev, backend=backend, unpad=unpad)
    ids, mask, tt = _batch(B, S, SHAPES[shape]["vocab_size"], dev)
    with torch.no_grad():
        ref = hf32(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        base = hf16(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        out = ours(ids, mask, tt).last_hidden_state
    assert ref.dtype == torch.float32 and base.dtype == dtype and out.dtype == dtype
    assert out.shape == ref.shape and not torch.isnan(out).any()
    err, err_hf = _max_err(out, ref, mask), _max_err(base, ref, mask)
    assert err_hf > 0, "transformers' half run equals its fp32 run: the comparison measures nothing"
    assert err <= 4 * err_hf + 1e-3, (err, err_hf)


# ----------------------------------------------------------------------------- CPU


def test_cuda_graph_runner_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = BertModel(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="CUDA"):
        bertfast.CudaGraphRunner(model)


def test_accuracy_rule_harness_on_cpu():
    """The GPU tests' harness (random weights, strict weight copy, batches, the 4x rule) on a tiny
    model with bertfast's PyTorch path in bf16, so that its plumbing is exercised on every run."""
    _check_rule("tiny", B=3, S=16, device="cpu", backend="torch", dtype=torch.bfloat16)


def test_random_weights_have_the_real_shapes():
    """The GPU tests' models have the parameter shapes of the real checkpoints."""
    for shape, (hidden, layers, heads) in {"bert-base": (768, 12, 12), "minilm-l6": (384, 6, 12)}.items():
        cfg = transformers.BertConfig(**SHAPES[shape])
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (hidden, layers, heads)
        ours = BertConfig.from_dict(cfg.to_dict())
        assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.intermediate_size) == (
            hidden, layers, heads, 4 * hidden)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [True, False])
def test_minilm_shape_fp16_triton_within_4x_of_transformers_fp16(unpad):
    _check_rule("minilm-l6", B=8, S=128, unpad=unpad)


@pytest.mark.gpu
def test_bert_base_shape_fp16_triton_within_4x_of_transformers_fp16():
    _check_rule("bert-base", B=4, S=256)


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_runner_matches_eager(dtype, unpad):
    """Explicit runner (padded buckets with unpad=False, packed token buckets with unpad=True)
    against the eager forward (graphs=False, so that the reference is not itself a replay)."""
    model = _ours_like(_random_hf("minilm-l6"), dtype, "cuda", unpad=unpad).set_backend("triton", graphs=False)
    runner = bertfast.CudaGraphRunner(model, max_batch=8, max_seq=128)
    for B, S in ((1, 128), (3, 77), (8, 20), (1, 128)):
        ids, mask, tt = _batch(B, S, model.config.vocab_size, "cuda", seed=B * S)
        with torch.no_grad():
            ref = model(ids, mask, tt)
        out = runner(ids, mask, tt)
        assert out.last_hidden_state.shape == (B, S, model.config.hidden_size)
        assert out.last_hidden_state.dtype == dtype
        _assert_same_math(out.last_hidden_state, ref.last_hidden_state, mask, dtype)
        _assert_same_math(out.pooler_output, ref.pooler_output, None, dtype)
    assert (1, 128) in runner.captured_shapes()


@pytest.mark.gpu
def test_compile_fullgraph_triton_backend_gpu():
    torch._dynamo.reset()
    model = _ours_like(_random_hf("minilm-l6"), torch.float16, "cuda")
    ids, mask, tt = _batch(4, 64, model.config.vocab_size, "cuda")
    with torch.no_grad():
        ref = model(ids, mask, tt).last_hidden_state
        out = torch.compile(model, fullgraph=True)(ids, mask, tt).last_hidden_state
    _assert_same_math(out, ref, mask, torch.float16)


@pytest.mark.gpu
def test_optimize_transformers_model_fp16_gpu():
    """bertfast.optimize on a transformers fp16 model: within 4x of its own fp16 error (against
    its fp32 twin)."""
    hf32 = _random_hf("minilm-l6").cuda()
    model = copy.deepcopy(hf32).half()
    ids, mask, tt = _batch(8, 128, model.config.vocab_size, "cuda")
    with torch.no_grad():
        ref = hf32(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        base = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        bertfast.optimize(model)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert out.dtype == torch.float16 and not torch.isnan(out).any()
    err, err_hf = _max_err(out, ref, mask), _max_err(base, ref, mask)
    assert err <= 4 * err_hf + 1e-3, (err, err_hf)
