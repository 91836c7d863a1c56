"""The fast encoder on a CUDA GPU (skipped without one), and the GPU-only API's errors on CPU.

Accuracy rule (flash-attention's): the Triton fp16 model's error against transformers in fp32
is at most 4x transformers' own fp16 error, measured on the same inputs."""
import pytest
import torch

import bertfast
from bertfast import BertConfig, BertModel

transformers = pytest.importorskip("transformers")


def test_cuda_graph_runner_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = BertModel(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="CUDA"):
        bertfast.CudaGraphRunner(model)


def _batch(B, S, vocab, device, seed=0, mixed=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, S), generator=g)
    lens = torch.randint(max(1, int(0.3 * S)), S + 1, (B,), generator=g) if mixed else torch.full((B,), S)
    mask = (torch.arange(S)[None, :] < lens[:, None]).long()
    tt = torch.zeros(B, S, dtype=torch.long)
    return ids.to(device), mask.to(device), tt.to(device)


def _max_err(a, b, mask):
    m = mask[..., None].to(torch.float32)
    return ((a.float() - b.float()).abs() * m).max().item()


def _check_rule(hf_model_dir=None, config=None, B=8, S=128, unpad=True):
    dev = torch.device("cuda")
    if hf_model_dir is not None:
        hf32 = transformers.BertModel.from_pretrained(hf_model_dir).to(dev).eval()
    else:
        torch.manual_seed(0)
        hf32 = transformers.BertModel(transformers.BertConfig(**config)).to(dev).eval()
    hf16 = transformers.BertModel(hf32.config).to(dev).half().eval()
    hf16.load_state_dict(hf32.state_dict())
    ours = BertModel(BertConfig.from_dict(hf32.config.to_dict())).to(dev).eval()
    ours.load_state_dict(hf32.state_dict(), strict=False)
    ours = ours.half().set_backend("triton", unpad=unpad)
    ids, mask, tt = _batch(B, S, hf32.config.vocab_size, dev)
    with torch.no_grad():
        ref = hf32(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        base = hf16(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        out = ours(ids, mask, tt).last_hidden_state
    assert out.dtype == torch.float16 and not torch.isnan(out).any()
    err, err_hf = _max_err(out, ref, mask), _max_err(base, ref, mask)
    assert err <= 4 * err_hf + 1e-3, (err, err_hf)


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [True, False])
def test_minilm_fp16_triton_within_4x_of_transformers_fp16(unpad):
    _check_rule(hf_model_dir=str(bertfast.resolve_model_path("minilm")), unpad=unpad)


@pytest.mark.gpu
def test_bert_base_random_fp16_triton_within_4x_of_transformers_fp16():
    cfg = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072)
    _check_rule(config=cfg, B=4, S=256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_runner_matches_eager(dtype):
    model = BertModel.from_pretrained("minilm", dtype=dtype, device="cuda").set_backend("triton", unpad=False)
    runner = bertfast.CudaGraphRunner(model, max_batch=8, max_seq=128)
    for B, S in ((1, 128), (3, 77), (8, 20), (1, 128)):
        ids, mask, tt = _batch(B, S, model.config.vocab_size, "cuda", seed=B * S)
        with torch.no_grad():
            ref = model(ids, mask, tt)
        out = runner(ids, mask, tt)
        assert out.last_hidden_state.shape == (B, S, model.config.hidden_size)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        assert _max_err(out.last_hidden_state, ref.last_hidden_state, mask) < tol
        torch.testing.assert_close(out.pooler_output.float(), ref.pooler_output.float(), atol=tol, rtol=tol)
    assert (1, 128) in runner.captured_shapes()


@pytest.mark.gpu
def test_compile_fullgraph_triton_backend_gpu():
    torch._dynamo.reset()
    model = BertModel.from_pretrained("minilm", dtype=torch.float16, device="cuda").set_backend("triton")
    ids, mask, tt = _batch(4, 64, model.config.vocab_size, "cuda")
    with torch.no_grad():
        ref = model(ids, mask, tt).last_hidden_state
        out = torch.compile(model, fullgraph=True)(ids, mask, tt).last_hidden_state
    assert _max_err(out, ref, mask) < 2e-3


@pytest.mark.gpu
def test_optimize_transformers_model_fp16_gpu():
    path = str(bertfast.resolve_model_path("minilm"))
    model = transformers.BertModel.from_pretrained(path, torch_dtype=torch.float16).cuda().eval()
    ids, mask, tt = _batch(8, 128, model.config.vocab_size, "cuda")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        bertfast.optimize(model)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert _max_err(out, ref, mask) < 1e-2
