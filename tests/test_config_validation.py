"""BertConfig.validate(): every field type- and range-checked, through BertConfig(...), from_dict
and from_json (config.json), with messages ``BertConfig: <field> ...``."""
import json
import math

import pytest
import torch

from bertfast import BertConfig, BertModel, CheckpointError

CFG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
           max_position_embeddings=32)


def refused(field, **kw):
    """The config is refused by all three entry points, naming ``field``."""
    pattern = rf"^BertConfig: {field}\b"
    with pytest.raises(ValueError, match=pattern):
        BertConfig(**{**CFG, **kw})
    with pytest.raises(ValueError, match=pattern):
        BertConfig.from_dict({**CFG, **kw})


BAD = [
    ("is_decoder", dict(is_decoder="false")),
    ("is_decoder", dict(is_decoder="true")),
    ("is_decoder", dict(is_decoder=2)),
    ("is_decoder", dict(is_decoder=1.0)),
    ("is_decoder", dict(is_decoder=None)),
    ("tie_word_embeddings", dict(tie_word_embeddings="no")),
    ("unpad", dict(unpad="yes")),
    ("unpad", dict(unpad="false")),  # a string, truthy
    ("unpad", dict(unpad="Always")),
    ("unpad", dict(unpad="exact")),  # plan_forward's name for True, not a config value
    ("unpad", dict(unpad=None)),
    ("unpad", dict(unpad=2)),
    ("unpad", dict(unpad=1.0)),
    ("layer_norm_eps", dict(layer_norm_eps=float("nan"))),
    ("layer_norm_eps", dict(layer_norm_eps=float("inf"))),
    ("layer_norm_eps", dict(layer_norm_eps=0.0)),
    ("layer_norm_eps", dict(layer_norm_eps="1e-12")),
    ("layer_norm_eps", dict(layer_norm_eps=True)),
    ("hidden_dropout_prob", dict(hidden_dropout_prob=float("nan"))),
    ("attention_probs_dropout_prob", dict(attention_probs_dropout_prob=float("inf"))),
    ("attention_probs_dropout_prob", dict(attention_probs_dropout_prob="0.1")),
    ("classifier_dropout", dict(classifier_dropout=float("nan"))),
    ("classifier_dropout", dict(classifier_dropout=1.5)),
    ("initializer_range", dict(initializer_range=float("nan"))),
    ("initializer_range", dict(initializer_range=float("inf"))),
    ("initializer_range", dict(initializer_range="0.02")),
    ("hidden_size", dict(hidden_size=32.0)),
    ("vocab_size", dict(vocab_size="100")),
    ("num_hidden_layers", dict(num_hidden_layers=0)),
    ("type_vocab_size", dict(type_vocab_size=True)),
    ("hidden_size", dict(hidden_size=30)),  # not divisible by the 4 heads
    ("hidden_act", dict(hidden_act="GELU")),
    ("hidden_act", dict(hidden_act=["gelu"])),
    ("position_embedding_type", dict(position_embedding_type="relative_key")),
    ("problem_type", dict(problem_type="classification")),
    ("problem_type", dict(problem_type=1)),
    ("pad_token_id", dict(pad_token_id=100)),
    ("pad_token_id", dict(pad_token_id=-1)),
    ("pad_token_id", dict(pad_token_id="0")),
    ("pad_token_id", dict(pad_token_id=0.0)),
    ("pad_token_id", dict(pad_token_id=False)),
    ("backend", dict(backend="cuda")),
    ("id2label", dict(id2label={"zero": "a", "1": "b"})),
    ("id2label", dict(id2label={"0": "a", "2": "b"})),  # ids must be 0..num_labels-1
    ("id2label", dict(id2label={"0": "a", "00": "b"})),  # the same id twice
    ("id2label", dict(id2label={"0": "a", "1": "a"})),  # one name for two ids
    ("id2label", dict(id2label={"0": "a", "1": 7})),
    ("id2label", dict(id2label=["a", "b"])),
    ("id2label", dict(id2label={"0": "a", "1": "b", "2": "c"}, num_labels=2)),
    ("label2id", dict(label2id={"a": 0, "b": 0})),  # duplicate ids
    ("label2id", dict(label2id={"a": 0, "b": 5})),
    ("label2id", dict(label2id={"a": "0", "b": 1})),
    ("label2id", dict(label2id={"a": 0})),
    ("label2id", dict(id2label={"0": "a", "1": "b"}, label2id={"a": 1, "b": 0})),  # inconsistent
]


@pytest.mark.parametrize("field,kw", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_field_refused(field, kw):
    refused(field, **kw)


def test_good_values_accepted_and_normalised():
    c = BertConfig(**CFG, id2label={"0": "neg", "1": "pos"}, label2id={"neg": 0, "pos": 1},
                   classifier_dropout=0.2, problem_type="regression", pad_token_id=None, layer_norm_eps=1e-5)
    assert c.id2label == {0: "neg", 1: "pos"} and c.label2id == {"neg": 0, "pos": 1}
    # JSON 0 / 1 for a bool: unambiguous, read as False / True and written back as real bools
    c = BertConfig.from_dict({**CFG, "is_decoder": 0, "tie_word_embeddings": 0})
    assert c.is_decoder is False and c.tie_word_embeddings is False
    assert c.to_dict()["is_decoder"] is False and c.to_dict()["tie_word_embeddings"] is False
    assert BertConfig(**CFG, is_decoder=1).is_decoder is True
    # replace() validates too
    with pytest.raises(ValueError, match="^BertConfig: layer_norm_eps"):
        c.replace(layer_norm_eps=-1.0)


def test_tie_word_embeddings_round_trip(tmp_path):
    c = BertConfig(**CFG)
    assert c.tie_word_embeddings is True and c.to_dict()["tie_word_embeddings"] is True
    c = BertConfig(**CFG, tie_word_embeddings=False)
    c.to_json(tmp_path / "config.json")
    back = BertConfig.from_json(tmp_path / "config.json")
    assert back.tie_word_embeddings is False and "tie_word_embeddings" not in back.extra
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False


def _write(d, **changes):
    d.mkdir(exist_ok=True)
    BertModel(BertConfig(**CFG)).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_string_bool_in_config_json_is_refused(tmp_path):
    """"is_decoder": "false" used to make the model causal (a non-empty string is truthy)."""
    d = _write(tmp_path / "ckpt", is_decoder="false")
    with pytest.raises(CheckpointError, match=r"config\.json.*BertConfig: is_decoder must be a bool"):
        BertModel.from_pretrained(d)
    with pytest.raises(ValueError, match="is_decoder"):
        BertConfig.from_json(d / "config.json")


def test_nan_layer_norm_eps_in_config_json_is_refused(tmp_path):
    """NaN (a JSON extension Python reads) used to load and give NaN outputs."""
    d = tmp_path / "ckpt"
    _write(d)
    text = (d / "config.json").read_text()
    cfg = json.loads(text)
    cfg["layer_norm_eps"] = math.nan
    (d / "config.json").write_text(json.dumps(cfg))  # writes the bare NaN token
    assert "NaN" in (d / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"config\.json.*BertConfig: layer_norm_eps"):
        BertModel.from_pretrained(d)


def test_bad_labels_in_config_json_are_refused(tmp_path):
    d = _write(tmp_path / "ckpt", id2label={"0": "a", "1": "b"}, label2id={"a": 1, "b": 0})
    with pytest.raises(CheckpointError, match=r"config\.json.*label2id does not match id2label"):
        BertModel.from_pretrained(d)
    d = _write(tmp_path / "ckpt2", id2label={"0": "a", "x": "b"})
    with pytest.raises(CheckpointError, match=r"config\.json.*id2label key 'x'"):
        BertModel.from_pretrained(d)
    d = _write(tmp_path / "ckpt3", num_labels=3)  # id2label (2 labels) disagrees with num_labels
    with pytest.raises(CheckpointError, match=r"config\.json.*num_labels"):
        BertModel.from_pretrained(d)


def test_duplicate_key_in_config_json_is_refused(tmp_path):
    d = _write(tmp_path / "ckpt")
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text.replace('{', '{"is_decoder": true, ', 1))
    with pytest.raises(CheckpointError, match=r"config\.json.*'is_decoder' appears more than once"):
        BertModel.from_pretrained(d)


def test_override_num_labels_still_drops_stale_label_maps(tmp_path):
    d = _write(tmp_path / "ckpt")
    c = BertConfig.from_json(d / "config.json", num_labels=5)
    assert c.num_labels == 5 and c.id2label is None


def test_transformers_config_round_trip_keeps_flags(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertConfig(**CFG, tie_word_embeddings=False, is_decoder=False)
    ref.save_pretrained(tmp_path)
    c = BertConfig.from_json(tmp_path / "config.json")
    assert c.tie_word_embeddings is False and c.is_decoder is False
    for key in ("use_cache", "add_cross_attention", "transformers_version"):
        assert key in c.extra


def test_unpad_modes_accepted_and_parsed_in_one_place():
    """config.unpad: True (exact, default), "always" (masked semantics) or False; JSON 0 / 1 read as
    False / True.  BertConfig.validate and bertfast.modeling share one parser."""
    from bertfast import config as config_module
    from bertfast import modeling

    assert modeling.unpad_mode is config_module.unpad_mode and modeling.UNPAD_MODES == config_module.UNPAD_MODES
    assert BertConfig(**CFG).unpad is True
    for value, want, mode in ((True, True, "exact"), (False, False, "off"), ("always", "always", "always"),
                              (1, True, "exact"), (0, False, "off")):
        c = BertConfig(**CFG, unpad=value)
        assert c.unpad == want and type(c.unpad) is type(want), value
        assert modeling.unpad_mode(c.unpad) == mode
        assert BertConfig.from_dict({**CFG, "unpad": value}).unpad == want
    c = BertConfig(**CFG).replace(unpad="always")
    assert c.unpad == "always" and "unpad" not in c.to_dict()  # run-time only, never saved
    c.unpad = "sometimes"  # set by hand: validate() says so
    with pytest.raises(ValueError, match=r"^BertConfig: unpad must be True, False or 'always'"):
        c.validate()
    with pytest.raises(ValueError, match="unpad"):
        modeling.unpad_mode(None)
    # set_backend(unpad="always") leaves a config that validates
    m = BertModel(BertConfig(**CFG)).set_backend("torch", unpad="always")
    assert m.config.unpad == "always"
    m.config.validate()
