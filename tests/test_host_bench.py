"""``bertfast bench host``: the host budget of a forward on the Triton path, checked on CPU with
every launch recorded instead of run (bertfast.kernels.testing.record_launches)."""
import json

import pytest
import torch

from bertfast.bench import host

CASES = [{"B": 2, "S": 16, "lengths": "full"}, {"B": 4, "S": 16, "lengths": "mixed"},
         {"B": 4, "S": 16, "lengths": "mixed", "unpad": False}]
HOST_CASES = [{**c, "inputs": "host"} for c in CASES]


# Launches per layer: QKV, attention, attention output, add + LayerNorm, FFN1, FFN2, add +
# LayerNorm, whatever the GEMM rule (kernels/_gemm.pick_config) picks: where it splits a plain GEMM
# (attention output, FFN2) over K, the add + LayerNorm kernel adds the partial sums (no reduction
# launch; ``bertfast.ops.dense_add_layernorm``).
PER_LAYER = 7


def test_split_k_partials_go_into_the_layernorm(docs):
    """The small cases split both plain GEMMs over K (sm_90: the recorder's stand-in), and still
    launch 7 kernels a layer: the reductions are in the add + LayerNorm kernels."""
    from bertfast.kernels import _gemm

    row = docs[2]["rows"][0]
    assert row["tokens"] == 32 and row["launches_per_layer"] == 7
    for N, K in ((384, 384), (384, 1536)):
        assert _gemm.pick_config(32, N, K, torch.float16, (9, 0), False, plain=True).split_k > 1


@pytest.fixture(scope="module")
def docs():
    return {L: host.measure("minilm", CASES, repeat=3, warmup=1, num_hidden_layers=L, vocab_size=500)
            for L in (2, 3)}


@pytest.fixture(scope="module")
def host_doc():
    return host.measure("minilm", CASES + HOST_CASES, repeat=3, warmup=1, num_hidden_layers=2, vocab_size=500)


def test_inputs_from_the_host_make_no_device_read(host_doc):
    """The same forwards with the inputs built on the CPU and handed over through
    bertfast.plan.to_device (the mask read on the host before the copy): no device read at all,
    the same launches (issue 21)."""
    rows = host_doc["rows"]
    device, from_host = rows[:len(CASES)], rows[len(CASES):]
    for d, h in zip(device, from_host):
        assert (d["inputs"], h["inputs"]) == ("device", "host")
        assert d["reads"] == 1 and h["reads"] == 0 and h["reads_in_layer_loop"] == 0, (d, h)
        assert h["launches"] == d["launches"] == 1 + PER_LAYER * 2
    assert "| 4 x 16 | mixed | True | host |" in host.format_table(host_doc)
    assert [c["inputs"] for c in host.workloads(None, None, False)] == ["device", "host"] * 3 + ["device"]


@pytest.mark.parametrize("layers", [2, 3])
def test_launches_and_reads_per_forward(docs, layers):
    """7 launches per layer + 1 (embeddings); one device read per forward (the plan), none in the
    layer loop; padded (right padding), packed and full batches alike."""
    for row in docs[layers]["rows"]:
        assert row["launches"] == 1 + PER_LAYER * layers, row
        assert row["launches_per_layer"] == PER_LAYER, row
        assert row["reads"] == 1 and row["reads_in_layer_loop"] == 0, row
        assert row["host_us"]["n"] == 3 and row["host_us"]["min"] > 0


def test_no_torch_op_per_layer(docs):
    """The PyTorch ops of a forward (plan statistics, packing, restore) run once per forward: a
    layer more adds none."""
    for a, b in zip(docs[2]["rows"], docs[3]["rows"]):
        assert a["torch_ops"] == b["torch_ops"], (a["torch_op_names"], b["torch_op_names"])
    full, packed, padded = docs[2]["rows"]
    assert "aten::index_select" not in full["torch_op_names"]  # no packing without padding
    assert {"aten::index_select", "aten::index_copy"} <= set(packed["torch_op_names"])  # gather once, restore once
    assert padded["torch_ops"] == full["torch_ops"]  # right padding: key lengths from the plan, no mask work


def test_recording_restores_the_launchers():
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit

    from bertfast.kernels import _common
    from bertfast.kernels.testing import record_launches

    from bertfast.kernels._launch import Kernel

    before = jit.JITFunction.__getitem__, interp.InterpretedFunction.__getitem__, Kernel.__getitem__
    with record_launches() as calls:
        assert _common.recording_launches()
        assert jit.JITFunction.__getitem__ is not before[0] and Kernel.__getitem__ is not before[2]
    assert (jit.JITFunction.__getitem__, interp.InterpretedFunction.__getitem__, Kernel.__getitem__) == before
    assert not _common.recording_launches() and calls == []


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    from bertfast.bench import main

    rc = main(["host", "--model", "minilm", "--quick", "--batch", "2", "--seq", "16", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| 2 x 16 | full |" in out and "launches" in out
    (js,) = tmp_path.glob("*_host.json")
    doc = json.loads(js.read_text())
    assert doc["schema"] == "bertfast.bench.host/3" and doc["rows"][0]["launches"] == 1 + PER_LAYER * 6
    row = doc["rows"][0]
    assert row["host_us"]["n"] == row["ops_us"]["n"] == row["triton_dispatch_us"]["n"] == 30  # every path, same rounds
    # transformers measured the same way: same cases (inputs on the device, unpad default), same rounds
    assert [(r["B"], r["S"], r["lengths"]) for r in doc["transformers"]] == [(2, 16, "full"), (2, 16, "mixed")]
    assert all(r["host_us"]["n"] == 30 and r["host_us"]["median"] > 0 for r in doc["transformers"])
    assert "transformers, measured the same way" in out and doc["environment"]["cpu"] in out
    assert list(tmp_path.glob("*_host.md"))
    assert torch.get_num_threads() >= 1
