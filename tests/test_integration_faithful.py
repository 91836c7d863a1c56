"""bertfast.optimize(model) and attn_implementation="bertfast" are faithful drop-ins: each test
compares with the same transformers model un-optimized (outputs, return types, losses,
gradients), under the Triton interpreter on tiny configs."""
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast import integration, modeling  # noqa: E402
from bertfast.kernels.testing import GRAD_FACTOR, count_host_reads, tolerance  # noqa: E402

pytestmark = [pytest.mark.interpreter, pytest.mark.filterwarnings("ignore::FutureWarning")]

TOL = tolerance(torch.float32, 10)
GTOL = tolerance(torch.float32, 10 * GRAD_FACTOR)


def hf_config(**kw):
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return transformers.BertConfig(**base)


def pair(cls, config, attn="eager", **optimize_kw):
    """(reference, optimized) transformers models with the same weights."""
    torch.manual_seed(0)
    ref = getattr(transformers, cls)._from_config(config, attn_implementation=attn)
    model = getattr(transformers, cls)._from_config(config, attn_implementation=attn)
    model.load_state_dict(ref.state_dict())
    bertfast.optimize(model, **optimize_kw)
    return ref, model


def ids_mask(B=3, S=9, left=False, holes=False):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    if left:
        mask[0, :3] = 0
    if holes:
        mask[2, 2] = 0
        mask[2, 5] = 0
    return ids, mask


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the forwards that ran on bertfast's kernels (modeling.encoder_forward with
    kernels=True): True when packed (padding-free), False when the padded batch ran."""
    calls = []
    orig = modeling.encoder_forward

    @functools.wraps(orig)
    def spy(bert, plan, *a, **k):
        if k["kernels"]:
            calls.append(plan.packing is not None)
        return orig(bert, plan, *a, **k)

    monkeypatch.setattr(modeling, "encoder_forward", spy)
    return calls


def assert_same_structure(got, ref):
    assert type(got) is type(ref)
    if isinstance(ref, tuple):
        assert len(got) == len(ref)
        return
    assert list(got.keys()) == list(ref.keys())
    assert len(got.to_tuple()) == len(ref.to_tuple())


# ----------------------------------------------------------------------------- 1. causality


def _decoder(mode, how, unpad=True):
    cfg = hf_config(is_decoder=True, hidden_dropout_prob=0.1 if mode == "train" else 0.0,
                    attention_probs_dropout_prob=0.1 if mode == "train" else 0.0)
    torch.manual_seed(0)
    if how == "attn_implementation":
        bertfast.register_attention()
        model = transformers.AutoModel.from_config(cfg, attn_implementation="bertfast")
    else:
        model = transformers.BertModel(cfg)
        bertfast.optimize(model, backend="triton", unpad=unpad)
    return model.train(mode == "train")


@pytest.mark.parametrize("how,unpad", [("attn_implementation", None), ("optimize", True), ("optimize", False)])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("padded", [True, False])
def test_decoder_is_causal_in_every_mode(how, unpad, mode, padded, kernel_calls):
    """Changing token p never changes positions < p (fixed dropout seed)."""
    model = _decoder(mode, how, unpad)
    ids, mask = ids_mask()
    mask = mask if padded else None
    p = 4  # a real token of every row
    ids2 = ids.clone()
    ids2[:, p] = (ids2[:, p] + 7) % 100

    def run(x):
        torch.manual_seed(1)
        return model(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state

    a, b = run(ids), run(ids2)
    torch.testing.assert_close(b[:, :p], a[:, :p], rtol=0, atol=1e-6)
    assert (b[:, p] - a[:, p]).abs().max() > 1e-3  # the perturbation does reach position p
    assert len(kernel_calls) == (2 if how == "optimize" else 0)  # optimize: on the kernels


# ----------------------------------------------------------------------------- 2. output flags


@pytest.mark.parametrize("backend", ["triton", "auto"])  # auto on CPU: transformers' own forward
@pytest.mark.parametrize("setting", [
    dict(config=dict(output_hidden_states=True)),
    dict(config=dict(return_dict=False)),
    dict(config=dict(return_dict=False, output_hidden_states=True)),
    dict(config=dict(output_attentions=True)),
    dict(call=dict(output_hidden_states=[0, 2, -1])),
    dict(call=dict(output_hidden_states=-1)),
    dict(call=dict(output_hidden_states=None), config=dict(output_hidden_states=True)),
    dict(call=dict(return_dict=True), config=dict(return_dict=False)),
    dict(call=dict(output_hidden_states=True, return_dict=False)),
])
def test_output_flags_from_config_and_arguments(backend, setting, kernel_calls):
    cfg = hf_config(**setting.get("config", {}))
    ref, model = pair("BertModel", cfg, backend=backend)
    ref.eval(), model.eval()
    ids, mask = ids_mask()
    kw = setting.get("call", {})
    want = ref(input_ids=ids, attention_mask=mask, **kw)
    got = model(input_ids=ids, attention_mask=mask, **kw)
    assert_same_structure(got, want)
    assert len(kernel_calls) == (backend == "triton" and not cfg.output_attentions)
    w = want if isinstance(want, tuple) else want.to_tuple()
    g = got if isinstance(got, tuple) else got.to_tuple()
    m = mask[..., None]
    for x, y in zip(g, w):
        if isinstance(y, tuple):  # hidden states / attentions
            assert len(x) == len(y) and [t is None for t in x] == [t is None for t in y]
            for xi, yi in zip(x, y):
                if yi is not None:
                    torch.testing.assert_close(xi * m if xi.dim() == 3 else xi, yi * m if yi.dim() == 3 else yi, **TOL)
        else:
            torch.testing.assert_close(x * m if x.dim() == 3 else x, y * m if y.dim() == 3 else y, **TOL)


def test_use_cache_of_a_decoder_is_honoured():
    cfg = hf_config(is_decoder=True)  # use_cache=True by default
    ref, model = pair("BertModel", cfg, backend="triton")
    ref.eval(), model.eval()
    ids, mask = ids_mask()
    want, got = ref(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask)
    assert_same_structure(got, want)
    # the cache field is ``cache`` in transformers >= 5.2x, ``past_key_values`` before: as the installed one names it
    field = "cache" if "cache" in type(want).__dataclass_fields__ else "past_key_values"
    assert want[field] is not None and got[field] is not None and got[field].get_seq_length() == ids.shape[1]
    ref.config.use_cache = model.config.use_cache = False
    assert_same_structure(model(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask))


def test_head_outputs_follow_the_config(kernel_calls):
    cfg = hf_config(output_hidden_states=True, return_dict=False)
    ref, model = pair("BertForSequenceClassification", cfg, backend="triton")
    ref.eval(), model.eval()
    ids, mask = ids_mask()
    want, got = ref(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask)
    assert kernel_calls
    assert type(got) is tuple and len(got) == len(want) == 2 and len(got[1]) == len(want[1]) == 3
    torch.testing.assert_close(got[0], want[0], **TOL)


# ----------------------------------------------------------------------------- 3. gradient checkpointing


def _count_layer_calls(model, monkeypatch):
    """Calls of the per-layer function on the kernels (modeling.layer_forward).  (A hook on the
    model's modules would make those layers run as transformers' modules instead.)"""
    calls = []
    orig = modeling.layer_forward

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(modeling, "layer_forward", spy)
    return calls


def _grads(m, calls, ids, mask, labels):
    m.train().zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
    n_forward = len(calls)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, n_forward


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_recomputes_and_keeps_gradients(monkeypatch, every_n_layers):
    ref, model = pair("BertForSequenceClassification", hf_config(), backend="triton")
    ids, mask = ids_mask()
    labels = torch.tensor([0, 1, 1])
    calls = _count_layer_calls(model, monkeypatch)
    plain, _ = _grads(model, calls, ids, mask, labels)
    assert len(calls) == 2  # two layers, no recompute
    want, _ = _grads(ref, [], ids, mask, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                        every_n_layers=every_n_layers)
    calls.clear()
    ckpt, n_forward = _grads(model, calls, ids, mask, labels)
    assert n_forward == 2
    assert len(calls) - n_forward == 2 // every_n_layers  # the checkpointed layers ran again in the backward
    assert set(ckpt) == set(plain) == set(want)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], **GTOL, msg=n)
        torch.testing.assert_close(ckpt[n], want[n], **GTOL, msg=n)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_runs_on_the_kernels(monkeypatch, kernel_calls, use_reentrant):
    """Recomputed on the kernels, hidden dropout replayed with the same masks."""
    _, model = pair("BertForSequenceClassification", hf_config(hidden_dropout_prob=0.1), backend="triton")
    ids, mask = ids_mask()
    labels = torch.tensor([0, 1, 1])
    calls = []
    orig = modeling.layer_forward

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(modeling, "layer_forward", spy)
    # gradient_checkpointing_enable hooks the input embeddings (enable_input_require_grads): they then
    # run as transformers' module, drawing their dropout mask on the padded batch; the same in both runs
    model.enable_input_require_grads()
    plain, _ = _grads(model, calls, ids, mask, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls.clear()
    ckpt, n_forward = _grads(model, calls, ids, mask, labels)
    assert kernel_calls == [True, True] and n_forward == 2 and len(calls) == 4  # packed, layers on the kernels
    assert set(ckpt) == set(plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], **GTOL, msg=n)


# ----------------------------------------------------------------------------- 4. head sizes


def test_unsupported_head_size_auto_runs_transformers_triton_refuses(monkeypatch, kernel_calls):
    cfg = hf_config(num_attention_heads=4)  # head size 16: not a kernel head size
    ref, model = pair("BertModel", cfg)  # auto: accepted
    ref.eval(), model.eval()
    ids, mask = ids_mask()
    # even where auto would pick the kernels (CUDA), the model runs transformers' forward
    monkeypatch.setattr(integration._backend, "resolve", lambda name, device: "triton")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                               ref(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0)
    assert not kernel_calls
    with pytest.raises(ValueError, match="head size 16"):
        bertfast.optimize(transformers.BertModel(cfg), backend="triton")
    # a property that changes after optimize (dtype) is refused at the forward, before any kernel
    ok = transformers.BertModel(hf_config()).eval()
    bertfast.optimize(ok, backend="triton")
    ok.double()
    with pytest.raises(ValueError, match="dtype float64"):
        ok(input_ids=ids, attention_mask=mask)
    assert not kernel_calls


def test_head_sizes_come_from_the_attention_kernels(monkeypatch):
    import importlib

    attn = importlib.import_module("bertfast.kernels.attention")
    model = transformers.BertModel(hf_config(num_attention_heads=4))
    assert "head size 16" in integration.kernel_unsupported(model)
    monkeypatch.setattr(attn, "HEAD_DIMS", (16, 32, 64, 128))
    assert integration.kernel_unsupported(model) is None


# ----------------------------------------------------------------------------- 5. harmless arguments


def test_harmless_transformers_arguments_stay_on_the_kernels(kernel_calls):
    ref, model = pair("BertModel", hf_config(), backend="triton")
    ref.eval(), model.eval()
    ids, mask = ids_mask()
    kw = dict(use_cache=False, past_key_values=None, cache=None, cache_position=None, encoder_hidden_states=None,
              encoder_attention_mask=None, inputs_embeds=None, num_items_in_batch=torch.tensor(5))
    want = ref(ids, mask, **kw)
    got = model(ids, mask, **kw)  # positional input_ids / attention_mask as transformers binds them
    assert len(kernel_calls) == 1
    assert_same_structure(got, want)
    torch.testing.assert_close(got.last_hidden_state * mask[..., None], want.last_hidden_state * mask[..., None], **TOL)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)


def test_arguments_the_kernels_lack_use_transformers_forward(kernel_calls):
    ref, model = pair("BertModel", hf_config(is_decoder=True), backend="triton")
    ref.eval(), model.eval()
    ids, mask = ids_mask()
    for kw in (dict(is_causal=False), dict(cache=transformers.DynamicCache(config=ref.config)), dict(use_cache=True)):
        want = ref(input_ids=ids, attention_mask=mask, **kw)
        if "cache" in kw:
            kw = dict(cache=transformers.DynamicCache(config=ref.config))
        got = model(input_ids=ids, attention_mask=mask, **kw)
        assert_same_structure(got, want)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
    assert not kernel_calls
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(attention_mask=mask)  # transformers' own error


# ----------------------------------------------------------------------------- 6. padding exactness


def test_pooler_with_left_padding_is_exact(kernel_calls):
    ref, model = pair("BertModel", hf_config(), backend="triton")
    ref.eval(), model.eval()
    ids, mask = ids_mask(left=True)
    want, got = ref(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)
    assert kernel_calls == [False]  # the padded computation, on the kernels
    ids, mask = ids_mask()  # right padding only: padding-free as before
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).pooler_output,
                               ref(input_ids=ids, attention_mask=mask).pooler_output, **TOL)
    assert kernel_calls == [False, True]


def test_optimize_unpad_always_is_the_opt_in_masked_route(kernel_calls):
    """optimize(unpad="always") keeps the packed route where the pooler reads a padded first
    token (masked semantics, documented: that row's pooler input is zero); bad values refused."""
    ref, model = pair("BertModel", hf_config(), backend="triton", unpad="always")
    ref.eval(), model.eval()
    ids, mask = ids_mask(left=True)
    got, want = model(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask)
    assert kernel_calls == [True]  # packed although row 0's first token is padding
    real = mask.bool()[..., None]
    torch.testing.assert_close(got.last_hidden_state * real, want.last_hidden_state * real, **TOL)
    torch.testing.assert_close(got.pooler_output[1:], want.pooler_output[1:], **TOL)  # first token real
    torch.testing.assert_close(got.pooler_output[0], torch.tanh(model.pooler.dense.bias), **TOL)
    for bad in ("yes", None, 2):
        with pytest.raises(ValueError, match="unpad"):
            bertfast.optimize(model, unpad=bad)


def _loss_and_grads(m, **kw):
    m.zero_grad(set_to_none=True)
    loss = m(**kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_same_training(ref, model, **kw):
    want_loss, want = _loss_and_grads(ref.train(), **kw)
    got_loss, got = _loss_and_grads(model.train(), **kw)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **GTOL, msg=n)


@pytest.mark.parametrize("left,holes", [(False, False), (True, True)])
def test_question_answering_loss_reads_padding_exactly(left, holes, kernel_calls):
    ref, model = pair("BertForQuestionAnswering", hf_config(), backend="triton")
    ids, mask = ids_mask(left=left, holes=holes)
    _assert_same_training(ref, model, input_ids=ids, attention_mask=mask,
                          start_positions=torch.tensor([4, 1, 3]), end_positions=torch.tensor([6, 2, 8]))
    assert kernel_calls == [False]


@pytest.mark.parametrize("cls", ["BertForTokenClassification", "BertForMaskedLM"])
def test_per_token_labels_at_padded_positions_are_exact(cls, kernel_calls):
    ref, model = pair(cls, hf_config(), backend="triton")
    ids, mask = ids_mask(left=True, holes=True)
    labels = torch.randint(0, 2, ids.shape)
    # -100 at padding: the loss reads real tokens only, padding-free stays
    _assert_same_training(ref, model, input_ids=ids, attention_mask=mask, labels=labels.masked_fill(mask == 0, -100))
    assert kernel_calls == [True]
    # labels at padded positions: the padded computation
    _assert_same_training(ref, model, input_ids=ids, attention_mask=mask, labels=labels)
    assert kernel_calls == [True, False]


def test_causal_lm_with_left_padding_is_exact(kernel_calls):
    ref, model = pair("BertLMHeadModel", hf_config(is_decoder=True), backend="triton")
    ids, mask = ids_mask(left=True)
    labels = ids.masked_fill(mask == 0, -100)  # label 3 of row 0 is read from (padded) position 2's logits
    _assert_same_training(ref, model, input_ids=ids, attention_mask=mask, labels=labels)
    assert not kernel_calls  # a decoder's padded query sees no key: transformers' forward decides
    ids, mask = ids_mask()  # right padding: padding-free kernels
    _assert_same_training(ref, model, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert kernel_calls == [True]


def test_restore_removes_the_head_wrapper():
    _, model = pair("BertForQuestionAnswering", hf_config(), backend="triton")
    assert "forward" in model.__dict__
    bertfast.restore(model)
    assert "forward" not in model.__dict__ and not bertfast.integration.is_optimized(model)



def test_decoder_pooler_reading_padding_uses_transformers_forward_even_unpadded(kernel_calls):
    """unpad=False does not make a decoder's padded computation exact (a padded query before the
    first real token sees no key): the pooler over a padded first token still takes the original."""
    ref, model = pair("BertModel", hf_config(is_decoder=True), backend="triton", unpad=False)
    ref.eval(), model.eval()
    ids, mask = ids_mask(left=True)
    want = ref(input_ids=ids, attention_mask=mask, use_cache=False)
    got = model(input_ids=ids, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=0)
    assert not kernel_calls
    ids, mask = ids_mask()  # right padding: the kernels, padded batch
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, use_cache=False).pooler_output,
                               ref(input_ids=ids, attention_mask=mask, use_cache=False).pooler_output, **TOL)
    assert kernel_calls == [False]


def test_shifted_labels_of_a_decoder_are_planned():
    """plan_forward(shifted_labels=True): the causal LM loss scores logits i against label i + 1,
    so a padded position followed by a real label is read (the unshifted check misses it)."""
    from bertfast.modeling import plan_forward

    cfg = hf_config(is_decoder=True)
    ids, mask = ids_mask(left=True)  # row 0: positions 0..2 padded, 3.. real
    labels = ids.masked_fill(mask == 0, -100)
    kw = dict(triton=True, causal=True, unpad=True, labels=labels)
    plain = plan_forward(cfg, ids, mask, None, None, None, torch.float32, **kw)
    shifted = plan_forward(cfg, ids, mask, None, None, None, torch.float32, shifted_labels=True, **kw)
    assert plain.packing is not None and plain.reads_padding == ""
    assert shifted.packing is None and "labels on padded positions" in shifted.reads_padding
    right_ids, right = ids_mask()  # right padding: the label after a padded position is -100 too
    p = plan_forward(cfg, right_ids, right, None, None, None, torch.float32, shifted_labels=True,
                     **{**kw, "labels": right_ids.masked_fill(right == 0, -100)})
    assert p.packing is not None and p.reads_padding == ""


# ----------------------------------------------------------------------------- 7. host reads




@pytest.mark.parametrize("cls,left,loss", [
    ("BertModel", False, None),  # packed
    ("BertModel", True, None),  # the pooler reads a padded first token: the padded batch
    ("BertForTokenClassification", True, "labels"),  # -100 at padding: packed
    ("BertForTokenClassification", True, "labels-on-padding"),  # the padded batch
    ("BertForMaskedLM", False, "labels"),
    ("BertForQuestionAnswering", False, "qa"),  # the padded batch
    ("BertForSequenceClassification", True, "labels"),  # left padding under the pooler: the padded batch
    ("BertLMHeadModel", False, "labels"),  # a decoder, shifted labels: packed
])
def test_one_host_read_per_optimized_forward(cls, left, loss, kernel_calls):
    """plan_forward reads the input checks and every padding statistic (lengths, first token,
    labels on padding) in one host read; nothing else in the optimized forward reads the host
    (before: 3 per forward: validate_inputs, the pooler's or the head's padding check, the layout)."""
    decoder = cls == "BertLMHeadModel"
    _, model = pair(cls, hf_config(is_decoder=decoder), backend="triton")
    model.eval()
    # (a decoder: no holes, else the label after a hole is read from a padded position's logits
    # and transformers' forward serves it)
    ids, mask = ids_mask(left=left, holes=not decoder)
    kw = dict(input_ids=ids, attention_mask=mask)
    if decoder:
        kw["use_cache"] = False
    if loss == "qa":
        kw.update(start_positions=torch.tensor([4, 1, 3]), end_positions=torch.tensor([6, 2, 8]))
    elif cls == "BertForSequenceClassification":
        kw["labels"] = torch.tensor([0, 1, 1])
    elif loss is not None:
        labels = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(4))
        kw["labels"] = labels if loss == "labels-on-padding" else labels.masked_fill(mask == 0, -100)
    with torch.no_grad():
        model(**kw)  # warm-up
        kernel_calls.clear()
        with count_host_reads() as n:
            out = model(**kw)
    assert n[0] == 1, f"{n[0]} host reads in one optimized {cls} forward"
    pooler_reads_padding = left and cls in ("BertModel", "BertForSequenceClassification")
    packed = not pooler_reads_padding and loss not in ("qa", "labels-on-padding")
    assert kernel_calls == [packed]
    if loss is not None:
        assert out.loss is not None and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- 8. hooks and wrapped modules


@pytest.fixture
def layer_forward_calls(monkeypatch):
    """Layers run on the kernels (modeling.layer_forward), in order."""
    calls = []
    orig = modeling.layer_forward

    def spy(layer, *a, **k):
        calls.append(layer)
        return orig(layer, *a, **k)

    monkeypatch.setattr(modeling, "layer_forward", spy)
    return calls


def test_module_hooks_fire_once_as_in_transformers(kernel_calls, layer_forward_calls):
    """A forward pre-hook and a forward hook (one that changes the output) on a BertLayer, and a
    hook on the word embeddings: each fires once per forward, as in transformers, and the hooked
    parts run through transformers' modules (before: the kernel path skipped them, 0 calls);
    the other layer stays on the kernels, padding-free."""
    ref, model = pair("BertModel", hf_config(), backend="triton")
    ref.eval(), model.eval()
    ids, mask = ids_mask(left=True, holes=True)
    fired = {}

    def hook_up(m, tag):
        bert = integration.find_bert(m)
        bert.encoder.layer[1].register_forward_pre_hook(lambda *a: fired.setdefault((tag, "pre"), []).append(1))
        bert.encoder.layer[1].register_forward_hook(lambda mod, args, out: out * 1.5)
        bert.embeddings.word_embeddings.register_forward_hook(
            lambda *a: fired.setdefault((tag, "emb"), []).append(1))

    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # a plain forward first: hooks registered after it are seen
    kernel_calls.clear(), layer_forward_calls.clear()
    hook_up(ref, "ref"), hook_up(model, "ours")
    want = ref(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    got = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    assert fired == {("ref", "pre"): [1], ("ref", "emb"): [1], ("ours", "pre"): [1], ("ours", "emb"): [1]}
    m = mask[..., None]
    torch.testing.assert_close(got.last_hidden_state * m, want.last_hidden_state * m, **TOL)
    torch.testing.assert_close(got.pooler_output[1:], want.pooler_output[1:], **TOL)  # row 0: left padding
    layers = integration.find_bert(model).encoder.layer
    assert kernel_calls == [False] and layer_forward_calls == [layers[0]]  # (the pooler reads row 0's padding)
    kernel_calls.clear(), layer_forward_calls.clear()
    ids, mask = ids_mask()  # right padding: packed; the hooked layer's input padded and its output packed again
    want = ref(input_ids=ids, attention_mask=mask)
    got = model(input_ids=ids, attention_mask=mask)
    m = mask[..., None]
    torch.testing.assert_close(got.last_hidden_state * m, want.last_hidden_state * m, **TOL)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)
    assert kernel_calls == [True] and layer_forward_calls == [layers[0]]
    assert len(fired[("ours", "pre")]) == len(fired[("ref", "pre")]) == 2


class LoraLinear(torch.nn.Module):
    """A LoRA wrapper in place of an nn.Linear, as PEFT builds one: the original linear in
    ``base_layer``, a low-rank update beside it (no ``weight`` of its own)."""

    def __init__(self, base, r=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.randn(self.lora_A.weight.shape, generator=g) * 0.1)
            self.lora_B.weight.copy_(torch.randn(self.lora_B.weight.shape, generator=g) * 0.1)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * 2.0


def _add_lora(model):
    for i, layer in enumerate(integration.find_bert(model).encoder.layer):
        attn = layer.attention.self
        attn.query, attn.value = LoraLinear(attn.query, seed=2 * i), LoraLinear(attn.value, seed=2 * i + 1)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or n.startswith("classifier"))


def test_lora_wrapped_linears_train_like_transformers(kernel_calls, layer_forward_calls):
    """LoRA wrappers in place of the attention projections: those layers run through their
    modules (before: KeyError: 'weight'), same loss and adapter gradients as transformers; the
    embeddings stay on the kernels."""
    ref, model = pair("BertForSequenceClassification", hf_config(), backend="triton")
    ids, mask = ids_mask()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # a forward first: wrappers injected after it are seen
    kernel_calls.clear(), layer_forward_calls.clear()
    _add_lora(ref), _add_lora(model)
    _assert_same_training(ref, model, input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    assert kernel_calls == [True] and layer_forward_calls == []
    with torch.no_grad():  # and inference under backend="triton" / "auto" alike
        got = model.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, ref.eval()(input_ids=ids, attention_mask=mask).logits, **TOL)


def test_hooks_the_kernels_cannot_honour_are_refused_or_run_by_transformers(monkeypatch, kernel_calls):
    """A hook on the encoder module itself (the kernel path never calls it): backend="triton"
    refuses by name, at optimize and at the forward; "auto" runs transformers' own forward."""
    ids, mask = ids_mask()
    hooked = transformers.BertModel(hf_config()).eval()
    hooked.encoder.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="encoder has a forward hook"):
        bertfast.optimize(hooked, backend="triton")
    ref, model = pair("BertModel", hf_config(), backend="triton")
    ref.eval(), model.eval()
    fired = []
    handle = model.encoder.register_forward_hook(lambda *a: fired.append(1))
    with pytest.raises(ValueError, match="encoder has a forward hook"):
        model(input_ids=ids, attention_mask=mask)
    bertfast.optimize(model, backend="auto")
    monkeypatch.setattr(integration._backend, "resolve", lambda name, device: "triton")  # as on CUDA
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                               ref(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0)
    assert fired == [1] and not kernel_calls
    handle.remove()
    model(input_ids=ids, attention_mask=mask)
    assert kernel_calls == [True]


def test_transformers_output_capturing_hooks_keep_the_kernels(kernel_calls, layer_forward_calls):
    """transformers installs its own output-capturing hooks the first time an output is asked
    of its forward; they are inactive outside it, so the layers stay on the kernels after."""
    ref, model = pair("BertModel", hf_config(), backend="triton")
    ref.eval(), model.eval()
    ids, mask = ids_mask()
    model(input_ids=ids, attention_mask=mask, output_attentions=True)  # transformers' forward: hooks installed
    assert any(layer._forward_hooks for layer in model.encoder.layer)
    assert not kernel_calls
    got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert kernel_calls == [True] and len(layer_forward_calls) == 2
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g * mask[..., None], w * mask[..., None], **TOL)
