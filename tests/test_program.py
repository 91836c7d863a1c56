"""Layer programs (bertfast/program.py): a layer's launches recorded once per case and replayed.

Here, under the interpreter: a replayed layer computes bit for bit what the ops compute (every
mask kind, padded and packed, fp32 / fp16 / bf16, decoder), it follows every change a user can
make to a layer (values, parameters replaced, the fused QKV storage split, eps, dtype), and it
never runs where it must not (training, autograd, attention probabilities, the PyTorch path,
the profiler).  The replay with compiled kernels (addresses as ints) is checked against the
same programs' views and Triton's own launches in tests/test_launch.py (``fake_gpu``).
"""
import random

import pytest
import torch

from bertfast import BertConfig, BertModel, program

pytestmark = pytest.mark.usefixtures("one_thread")

B, S = 3, 37


def _model(dtype=torch.float32, layers=3, **kw):
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, backend="triton", **kw)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).to(dtype).eval()


def _masks():
    full = torch.ones(B, S, dtype=torch.long)
    right, left, holes = full.clone(), full.clone(), full.clone()
    right[1, 20:] = 0
    right[2, 5:] = 0
    left[1, :20] = 0
    holes[0, 3:9] = 0
    holes[2, 30:] = 0
    add = torch.zeros(B, 1, S, S)
    add[:, :, :, 30:] = float("-inf")
    add[1, :, 4, :10] = -3.0
    return {"full": full, "right": right, "left": left, "holes": holes, "additive": add}


IDS = torch.randint(1, 100, (B, S), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def programs(monkeypatch, count_calls):
    """Programs on, a fresh cache, and a count of the layers replayed (``replays[0]``)."""
    monkeypatch.setattr(program, "ENABLED", [True])
    monkeypatch.setattr(program, "_PROGRAMS", program.PlanCache(maxsize=256))
    return count_calls(program.Program, "run_views")


def _forward(model, mask, on: bool, ids=IDS, **kw):
    with torch.no_grad():
        before = program.ENABLED[0]
        program.ENABLED[0] = on
        try:
            return model(input_ids=ids, attention_mask=mask, **kw)
        finally:
            program.ENABLED[0] = before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("kind", ["full", "right", "left", "holes", "additive"])
def test_replay_is_bit_identical_to_the_ops(programs, dtype, unpad, kind):
    """Three forwards with programs on (the first sees the case, the second records it, the rest
    replay): every one's output and every hidden state bit for bit the ops' own."""
    model = _model(dtype)
    model.set_backend("triton", unpad=unpad)
    mask = _masks()[kind]
    if mask.dim() == 4:
        mask = mask.to(dtype)  # an additive mask has the model's dtype
    want = _forward(model, mask, False, output_hidden_states=True)
    for _ in range(3):
        got = _forward(model, mask, True, output_hidden_states=True)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        for g, w in zip(got.hidden_states, want.hidden_states):
            assert torch.equal(g, w)
    assert programs[0] >= 2 * 3  # layers 3.. of the first two forwards, all of the third


def test_replay_under_inference_mode(programs):
    """``torch.inference_mode`` (SentenceEncoder's) as ``no_grad``: recorded, replayed, same bits."""
    model = _model(torch.float16)
    mask = _masks()["right"]
    want = _forward(model, mask, False).last_hidden_state
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(model(input_ids=IDS, attention_mask=mask).last_hidden_state, want)
    assert programs[0] > 0


def test_decoder_and_sinusoidal_positions_replay(programs):
    model = _model(torch.float16, is_decoder=True, position_embedding_type="sinusoidal")
    mask = _masks()["right"]
    want = _forward(model, mask, False).last_hidden_state
    for _ in range(3):
        assert torch.equal(_forward(model, mask, True).last_hidden_state, want)
    assert programs[0] > 0


def test_replay_follows_every_change_to_a_layer(programs):
    """After the case is recorded: values changed in place, a parameter replaced by another
    tensor, the query / key / value storage split (the recorded fused launch would read the wrong
    memory: the guard sends the layer through the ops), a LayerNorm eps changed, the model cast
    to another dtype: each forward equals the ops' on the model as it is now."""
    model = _model(torch.float32)
    mask = _masks()["holes"]
    layer = model.encoder.layer[1]
    for _ in range(3):
        _forward(model, mask, True)
    assert programs[0] > 0

    def check():
        want = _forward(model, mask, False).last_hidden_state
        for _ in range(2):
            assert torch.equal(_forward(model, mask, True).last_hidden_state, want)

    with torch.no_grad():
        layer.output.dense.weight.mul_(1.5)  # in place
    check()
    with torch.no_grad():
        layer.intermediate.dense.weight = torch.nn.Parameter(layer.intermediate.dense.weight * -1.0)
        layer.attention.output.LayerNorm.bias = torch.nn.Parameter(layer.attention.output.LayerNorm.bias + 0.25)
    check()
    n = programs[0]
    with torch.no_grad():  # key's weight out of the shared storage: no longer one fused [q; k; v] view
        layer.attention.self.key.weight = torch.nn.Parameter(layer.attention.self.key.weight.clone() * 2)
    check()
    assert programs[0] > n  # the other layers still replay
    layer.output.LayerNorm.eps = 1e-2
    check()
    model.to(torch.float16)
    check()


@pytest.mark.parametrize("case", ["training", "grad", "attentions", "torch backend", "profiler"])
def test_no_program_where_it_must_not_run(programs, case):
    """Training (dropout), a forward that records autograd, attention probabilities, the PyTorch
    path, the profiler's per-op ranges: no program is recorded or replayed."""
    from bertfast.bench.profile import instrument

    model = _model()
    mask = _masks()["right"]
    for _ in range(3):
        if case == "training":
            model.train()
            model(input_ids=IDS, attention_mask=mask)
        elif case == "grad":
            model(input_ids=IDS, attention_mask=mask)
        elif case == "attentions":
            _forward(model, mask, True, output_attentions=True)
        elif case == "torch backend":
            model.set_backend("torch")
            _forward(model, mask, True)
        else:
            with instrument(model), torch.no_grad():
                model(input_ids=IDS, attention_mask=mask)
    assert programs[0] == 0 and len(program._PROGRAMS) == 0


def test_a_layer_that_does_other_work_gets_no_program(programs, monkeypatch):
    """A layer whose ops do device work besides the launches (here the QKV weight concatenated,
    as for unfused weights) is recorded once, found unfit, and runs through the ops after."""
    from bertfast import ops

    monkeypatch.setattr(ops, "fused_qkv_view", lambda *a: None)
    model = _model()
    mask = _masks()["left"]
    want = _forward(model, mask, False).last_hidden_state
    for _ in range(3):
        assert torch.equal(_forward(model, mask, True).last_hidden_state, want)
    assert programs[0] == 0 and "aten::cat" in program.LAST_SKIP[0]


def test_workspace_plan_never_overlaps_live_buffers():
    """``_plan_workspace``: buffers alive at the same step never share a byte, every offset is
    256-byte aligned, and the workspace is at most the sum of the sizes (at least the peak)."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        sizes = [rng.choice([1, 17, 256, 1000, 4096, 65536]) for _ in range(n)]
        lives = []
        for _ in range(n):
            a = rng.randint(0, 9)
            lives.append((a, rng.randint(a, 9)))
        offs, total = program._plan_workspace(sizes, lives)
        rounded = [-(-s // 256) * 256 for s in sizes]
        peak = max(sum(r for r, (f, l) in zip(rounded, lives) if f <= t <= l) for t in range(10))
        assert peak <= total <= sum(rounded)
        for i in range(n):
            assert offs[i] % 256 == 0 and offs[i] + rounded[i] <= total
            for j in range(i):
                live_together = lives[i][0] <= lives[j][1] and lives[j][0] <= lives[i][1]
                apart = offs[i] + rounded[i] <= offs[j] or offs[j] + rounded[j] <= offs[i]
                assert apart or not live_together


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [True, False])
def test_replay_on_the_gpu_is_bit_identical(unpad, monkeypatch, count_calls):
    """On CUDA (skipped without): bert-base shapes (4 layers), fp16, three masks, eager (graphs
    off): the replays with the compiled kernels (addresses as ints) give the ops' bits; with CUDA
    graphs (the default) the forwards captured with programs on give them too."""
    monkeypatch.setattr(program, "_PROGRAMS", program.PlanCache(maxsize=256))
    replays = count_calls(program.Program, "run")
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                     intermediate_size=3072, backend="triton")
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).to("cuda", torch.float16).eval()
    ids = torch.randint(1, 30522, (8, 128), device="cuda")
    masks = [torch.ones(8, 128, dtype=torch.long, device="cuda") for _ in range(3)]
    masks[1][1, 60:] = 0
    masks[1][5, 9:] = 0
    masks[2][0, :17] = 0
    masks[2][3, 40:44] = 0
    model.set_backend("triton", unpad=unpad, graphs=False)
    wants = [_forward(model, mask, False, ids).last_hidden_state for mask in masks]
    for graphs in (False, True):  # graphs: captured with the programs on (recorded in the warm-up)
        model.set_backend("triton", unpad=unpad, graphs=graphs)
        for mask, want in zip(masks, wants):
            for _ in range(3):
                assert torch.equal(_forward(model, mask, True, ids).last_hidden_state, want)
        if not graphs:
            assert replays[0] >= 3 * 6
