"""``bertfast bench host``: the host budget of a forward on the Triton path, checked on CPU with
every launch recorded instead of run (bertfast.kernels.testing.record_launches)."""
import json

import pytest
import torch

from bertfast.bench import host

CASES = [{"B": 2, "S": 16, "lengths": "full"}, {"B": 4, "S": 16, "lengths": "mixed"},
         {"B": 4, "S": 16, "lengths": "mixed", "unpad": False}]


@pytest.fixture(scope="module")
def docs():
    return {L: host.measure("minilm", CASES, repeat=3, warmup=1, num_hidden_layers=L, vocab_size=500)
            for L in (2, 3)}


@pytest.mark.parametrize("layers", [2, 3])
def test_launches_and_reads_per_forward(docs, layers):
    """7 launches per layer + 1 (embeddings); one device read per forward (the plan), none in the
    layer loop; padded (right padding), packed and full batches alike."""
    for row in docs[layers]["rows"]:
        assert row["launches"] == 1 + 7 * layers, row
        assert row["launches_per_layer"] == 7, row
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

    before = jit.JITFunction.__getitem__, interp.InterpretedFunction.__getitem__
    with record_launches() as calls:
        assert _common.recording_launches()
        assert jit.JITFunction.__getitem__ is not before[0]
    assert (jit.JITFunction.__getitem__, interp.InterpretedFunction.__getitem__) == before
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
    assert doc["schema"] == "bertfast.bench.host/1" and doc["rows"][0]["launches"] == 1 + 7 * 6
    assert list(tmp_path.glob("*_host.md"))
    assert torch.get_num_threads() >= 1
