"""bertfast.bench.profile (``bertfast profile``): op ranges from module hooks, grouping of profiled ops, and
``bertfast profile`` end to end on CPU (PyTorch path)."""
import argparse
import json
import os

import pytest
import torch

from bertfast.bench import profile as profiling
from bertfast.cli.bench import add_profile_arguments
from bertfast.config import BertConfig
from bertfast.modeling import BertModel


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``--threads 1`` below sets torch's global thread count: put it back for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def test_range_names_for_hugging_face_module_names():
    rn = profiling.range_name
    assert rn("") == "bertfast.forward"
    assert rn("embeddings") == "bertfast.embeddings"
    assert rn("bert.embeddings") == "bertfast.embeddings"
    assert rn("encoder.layer.3") == "bertfast.layer3"
    assert rn("encoder.layer.3.attention.self") == "bertfast.layer3.attention"
    assert rn("encoder.layer.3.attention.self.query") == "bertfast.layer3.qkv.query"
    assert rn("encoder.layer.3.attention.output") == "bertfast.layer3.add_ln.attention"
    assert rn("encoder.layer.3.attention.output.dense") == "bertfast.layer3.attention.out_proj"
    assert rn("encoder.layer.3.intermediate") == "bertfast.layer3.ffn.intermediate"
    assert rn("encoder.layer.3.output") == "bertfast.layer3.add_ln.ffn"
    assert rn("encoder.layer.3.output.dense") == "bertfast.layer3.ffn.output"
    assert rn("encoder.layer.3.output.LayerNorm") is None  # charged to its parent (add+LN)
    assert rn("pooler") == "bertfast.pooler"
    assert rn("encoder") is None


def test_groups():
    g = profiling.group_of
    assert g("bertfast.embeddings") == "embeddings"
    assert g("bertfast.layer0.qkv.key") == "qkv"
    assert g("bertfast.layer11.attention") == "attention"
    assert g("bertfast.layer11.attention.out_proj") == "attention"
    assert g("bertfast.layer2.add_ln.ffn") == "add+LN"
    assert g("bertfast.layer2.ffn.output") == "ffn"
    assert g("bertfast.layer2") == "other" and g("bertfast.pooler") == "other" and g("aten::mm") == "other"
    # ranges a model may emit itself use the same naming
    assert g("bertfast.layer3.attention") == "attention" and g("bertfast.layer3.add_layernorm") == "add+LN"


def _check_profile(att, layers, steps, qkv_per_layer=3):
    groups = att["groups"]
    for name in ("embeddings", "qkv", "attention", "add+LN", "ffn"):
        assert groups[name] > 0, (name, groups)
    assert att["forwards"] == steps
    assert sum(r["share"] for r in att["rows"]) == pytest.approx(1.0)
    assert att["total_us"] == pytest.approx(sum(groups.values()))
    rows = {(r["group"], r["name"]): r for r in att["rows"]}
    # the Q, K, V projections: three GEMMs per layer (transformers), or one fused GEMM (bertfast's
    # PyTorch path in inference); two FFN GEMMs per layer; one attention output projection per layer
    qkv_gemms = sum(r["calls"] for (g, n), r in rows.items() if g == "qkv" and n in ("aten::addmm", "aten::mm"))
    ffn_gemms = sum(r["calls"] for (g, n), r in rows.items() if g == "ffn" and n in ("aten::addmm", "aten::mm"))
    attn_gemms = sum(r["calls"] for (g, n), r in rows.items()
                     if g == "attention" and n in ("aten::addmm", "aten::mm"))
    assert qkv_gemms == qkv_per_layer * layers * steps
    assert ffn_gemms == 2 * layers * steps
    assert attn_gemms >= layers * steps


def test_instrument_bertfast_model_on_cpu():
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    ids = torch.randint(1, 120, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    att = profiling.profile_forward(model, lambda: model(input_ids=ids, attention_mask=mask), steps=2, warmup=1)
    _check_profile(att, layers=2, steps=2, qkv_per_layer=1)
    assert att["ranges"]["encoder.layer.1.attention.self.value"] == "bertfast.layer1.qkv.value"
    # hooks are removed afterwards
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_instrument_transformers_model_on_cpu():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(**TINY)
    hf = transformers.BertModel._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(1, 120, (2, 8))
    att = profiling.profile_forward(hf, lambda: hf(input_ids=ids), steps=1, warmup=0)
    _check_profile(att, layers=2, steps=1)


@pytest.mark.interpreter
def test_instrument_groups_the_functional_triton_path():
    """The layers call no submodule forward: the wrapped bertfast.modeling / bertfast.ops
    entry points give the same groups (grouping only: interpreter times mean nothing)."""
    import bertfast.modeling as fast
    from bertfast import ops

    orig_layer, orig_linear = fast.layer_forward, ops.linear
    torch.manual_seed(0)
    model = BertModel(BertConfig(**{**TINY, "hidden_size": 64, "num_attention_heads": 2})).eval()
    model.set_backend("triton", unpad=True)
    ids = torch.randint(1, 120, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    att = profiling.profile_forward(model, lambda: model(input_ids=ids, attention_mask=mask), steps=1, warmup=0)
    for name in ("embeddings", "qkv", "attention", "add+LN", "ffn"):
        assert att["groups"][name] > 0, (name, att["groups"])
    assert fast.layer_forward is orig_layer and ops.linear is orig_linear  # restored


def test_instrument_without_cuda_has_no_nvtx():
    model = torch.nn.Sequential()
    with profiling.instrument(model, nvtx=True) as inst:
        assert inst.nvtx == torch.cuda.is_available()


def test_bertfast_profile_end_to_end(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_profile_arguments(p)
    args = p.parse_args(["--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1", "--threads", "1",
                         "--out", str(tmp_path), "--lengths", "mixed"])
    assert args.model == "minilm"
    assert profiling.run(args) == 0
    out = capsys.readouterr()
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3, files
    trace = [f for f in files if f.endswith(".trace.json")][0]
    assert trace.startswith("profile_minilm_bertfast_b2_s16_mixed_fp32_cpu")
    tr = json.loads((tmp_path / trace).read_text())
    names = {e.get("name") for e in tr["traceEvents"]}
    assert "bertfast.layer5.attention" in names and "bertfast.embeddings" in names
    doc = json.loads((tmp_path / trace.replace(".trace.json", ".json")).read_text())
    assert doc["forwards"] == 2 and doc["schema"] == "bertfast.profile/1"
    assert {"embeddings", "qkv", "attention", "add+LN", "ffn", "other"} <= set(doc["groups"])
    md = (tmp_path / trace.replace(".trace.json", ".md")).read_text()
    assert "## by op group" in md and "| qkv |" in md
    assert "## by op group" in out.out and "no CUDA GPU" in out.err
