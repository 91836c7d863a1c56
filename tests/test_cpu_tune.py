"""``bertfast tune --device cpu``: times the CPU linears of real forwards, stores the choices per
thread count under this CPU's key in the tuning cache, and a second run finds them there."""
import argparse
import json

import pytest
import torch

from bertfast import cpu_linear, tune
from bertfast.cli import CLIError
from bertfast.cli import tune as tune_cli
from bertfast.kernels import tuning

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(*argv):
    p = argparse.ArgumentParser()
    tune_cli.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV_CACHE, str(path))
    with cpu_linear.using(cpu_linear.CpuTuner()):  # a fresh tuner (nothing loaded from another file)
        yield path


def test_tune_cpu_stores_every_linear_class_per_thread_count(cache, capsys):
    before = torch.get_num_threads()
    assert tune.run(_args("--device", "cpu", "--shapes", "1x16", "--lengths", "full", "--threads", "1", "2")) == 0
    assert torch.get_num_threads() == before  # put back
    out = capsys.readouterr().out
    assert cpu_linear.cpu_features().describe() in out and "1 thread(s)" in out and "2 thread(s)" in out
    devices = json.loads(cache.read_text())["devices"]
    keys = {k for k in devices if k.startswith("cpu|")}
    assert {k.rsplit("|", 1)[1] for k in keys} == {"threads 1", "threads 2"}
    for k in keys:
        classes = devices[k]
        # MiniLM at 16 tokens: fused QKV, attention output + residual, FFN1 + GELU, FFN2 + residual
        assert {c.split("|", 3)[3] for c in classes} == {"N1152|K384|none", "N384|K384|add", "N1536|K384|gelu",
                                                          "N384|K1536|add"}
        for entry in classes.values():
            assert entry["choice"] in entry["times_ms"] and len(entry["times_ms"]) >= 3
    # a second run times nothing: every class comes from the cache
    assert tune.run(_args("--device", "cpu", "--shapes", "1x16", "--lengths", "full", "--threads", "1")) == 0
    assert "0 timed now, 4 already in the cache" in capsys.readouterr().out


def test_tune_cpu_refusals():
    with pytest.raises(CLIError, match="--threads is for --device cpu"):
        tune.run(_args("--threads", "1"))
    with pytest.raises(CLIError, match="float32 or bfloat16"):
        tune.run(_args("--device", "cpu", "--dtype", "float16", "--shapes", "1x16"))
