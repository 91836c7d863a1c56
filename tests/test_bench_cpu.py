"""``bertfast bench cpu`` (bertfast.bench.cpu): parser, inputs, thread settings, targets, and
quick runs on a tiny random BERT (same weights for bertfast and transformers; the MiniLM
tokenizer) so that nothing here times MiniLM."""
import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bertfast import bench, cpu_linear
from bertfast.bench import cpu, harness
from bertfast.cli.bench import add_bench_arguments

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _own_cpu_tuner():
    """The runs below tune the CPU linears (in tune mode, into the test's cache directory): with a
    tuner of their own, so that no choice stays in the process-wide one for later tests."""
    with cpu_linear.using(cpu_linear.CpuTuner()):
        yield


HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
HAS_OV = importlib.util.find_spec("openvino") is not None


def _parse(argv):
    p = argparse.ArgumentParser(prog="bertfast bench")
    add_bench_arguments(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- parser
def test_parser_accepts_the_cpu_options(tmp_path):
    args = _parse(["cpu", "--threads", "1", "2", "--workloads", "1x16", "corpus", "--systems", "bertfast", "ort",
                   "--rounds", "4", "--corpus-size", "100", "--model", str(tmp_path), "--quick", "--no-plots",
                   "--compile", "--out", str(tmp_path / "o")])
    assert args.suite == "cpu" and args.threads == [1, 2] and args.workloads == ["1x16", "corpus"]
    assert args.systems == ["bertfast", "ort"] and args.rounds == 4 and args.corpus_size == 100
    assert args.model == [str(tmp_path)] and args.compile is True
    assert "cpu" in bench.SUITES


@pytest.mark.parametrize("argv", [["cpu", "--workloads", "64x64"], ["cpu", "--systems", "tensorrt"],
                                  ["cpu", "--threads", "0"], ["cpu", "--threads", "1", "-2"],
                                  ["cpu", "--rounds", "0"], ["cpu", "--corpus-size", "0"],
                                  ["cpu", "--model", "no-such-model-or-dir"]])
def test_parser_refuses_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    assert argv[1] in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [(["encoder", "--threads", "1", "2"], "--threads takes one value"),
                                      (["encoder", "--workloads", "1x16"], "only with bench cpu"),
                                      (["host", "--model", "."], "checkpoint directory only with bench cpu"),
                                      (["cpu", "--batch", "2"], "--batch: not used by bench cpu"),
                                      (["cpu", "--dtype", "fp16"], "fp32 only"),
                                      (["cpu", "--model", "minilm", "bert-base"], "one --model")])
def test_cpu_only_values_and_the_cpu_suite_refusals(argv, msg, capsys):
    assert bench.run(_parse(argv)) == 2
    assert msg in capsys.readouterr().err


def test_one_thread_value_still_reaches_the_other_suites():
    args = _parse(["encoder", "--threads", "3"])
    assert bench._other_suite_problem(args) is None and args.threads == 3


# ----------------------------------------------------------------------------- inputs
def test_workload_batches_have_the_stated_padding_and_special_tokens():
    for name, want in (("32-mixed", 0.75), ("128-mixed-256", 0.72), ("32x128", 0.0), ("1x16", 0.0)):
        spec = cpu.SHAPES[name]
        b = cpu.make_batch(spec, seed=0)
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape == (spec.batch, spec.seq) and mask.dtype == torch.long
        assert abs(cpu.padding_fraction(mask) - want) < 0.08, (name, cpu.padding_fraction(mask))
        lengths = mask.sum(1)
        assert (ids[:, 0] == cpu.CLS_ID).all()
        assert (ids[torch.arange(spec.batch), lengths - 1] == cpu.SEP_ID).all()
        assert (ids[mask == 0] == cpu.PAD_ID).all()  # right padding
        assert (mask[:, :-1] >= mask[:, 1:]).all()
        inner = ids[(mask == 1) & (ids != cpu.CLS_ID) & (ids != cpu.SEP_ID)]
        assert inner.min() >= cpu.SYNTH_IDS[0] and inner.max() <= cpu.SYNTH_IDS[1]
        assert torch.equal(ids, cpu.make_batch(spec, seed=0)["input_ids"])  # seeded


def test_corpus_is_seeded_and_varied():
    a = cpu.build_corpus(300, seed=0)
    assert a == cpu.build_corpus(300, seed=0) and a != cpu.build_corpus(300, seed=1)
    words = [len(t.split()) for t in a]
    assert min(words) <= 5 and max(words) >= 100 and len(set(a)) > 150
    assert 30 <= len(cpu.SENTENCES) <= 40


def test_bench_cpu_script_reexports_sentences(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    monkeypatch.delitem(sys.modules, "bench_cpu", raising=False)
    from bench_cpu import SENTENCES

    assert SENTENCES is cpu.SENTENCES


# ----------------------------------------------------------------------------- thread settings
def test_ort_session_options_carry_the_thread_count():
    class FakeOptions:
        pass

    fake = SimpleNamespace(SessionOptions=FakeOptions, ExecutionMode=SimpleNamespace(ORT_SEQUENTIAL="seq"),
                           GraphOptimizationLevel=SimpleNamespace(ORT_ENABLE_ALL="all"))
    so = cpu.ort_session_options(fake, 3)
    assert (so.intra_op_num_threads, so.inter_op_num_threads, so.execution_mode, so.graph_optimization_level) == (
        3, 1, "seq", "all")
    if HAS_ORT:
        import onnxruntime

        real = cpu.ort_session_options(onnxruntime, 2)
        assert real.intra_op_num_threads == 2 and real.inter_op_num_threads == 1


def test_openvino_config_carries_the_thread_count_and_fp32():
    c = cpu.openvino_config(2)
    assert c["INFERENCE_NUM_THREADS"] == 2 and c["INFERENCE_PRECISION_HINT"] == "f32"
    assert c["PERFORMANCE_HINT"] == "LATENCY"


# ----------------------------------------------------------------------------- timing loop
def test_rows_get_two_warm_up_calls_exact_rounds_and_a_check_on_their_last_output():
    calls = {"a": 0, "b": 0}

    def case(name):
        def fn(x):
            calls[name] += 1
            return x + calls[name]

        def build():
            return cpu._prepared(fn, lambda: (torch.zeros(2),), lambda out, args: {"ok": True, "last": float(out[0])},
                                 {})
        return harness.Case(suite="cpu", op="toy", impl=name, shape={"n": 2}, dtype="float32", build=build,
                            baseline="a", end_to_end=True)

    res = cpu.cpu_bencher(4).run_group([case("a"), case("b")])
    cpu.finish_checks(res)
    for r in res:
        assert r.status == "ok" and r.timing["n"] == 4
        assert calls[r.impl] == 2 + 4  # first call + one warm-up, then the rounds; no extra call for the check
        assert r.check == {"ok": True, "last": 6.0} and cpu._KEPT not in r.info
    assert res[0].info["interleaved_with"] == ["b"]


# ----------------------------------------------------------------------------- targets
def _summ(center, spread):
    return harness.summarize([center * (1 + spread * k) for k in (-1, -0.5, 0, 0.5, 1)])


def test_targets_met_missed_and_within_noise():
    t = {("32x128", "bertfast"): _summ(10.0, 0.02), ("32x128", "openvino"): _summ(20.0, 0.02),  # 2x: met (>= 1.2)
         ("32-mixed", "bertfast"): _summ(10.0, 0.02), ("32-mixed", "openvino"): _summ(15.0, 0.02),  # 1.5x: missed
         ("corpus", "bertfast"): _summ(10.0, 0.3), ("corpus", "sentence-transformers"): _summ(15.0, 0.3),  # noise
         ("1x16", "bertfast"): _summ(10.0, 0.02), ("1x16", "ort"): _summ(8.0, 0.02),
         ("1x16", "openvino"): _summ(30.0, 0.02)}
    out = {(r["workload"], r["vs"]): r for r in cpu.evaluate_targets(t, reasons={("corpus", "ort"): "not installed"})}
    assert out[("32x128", "openvino")]["status"] == "met"
    assert out[("32-mixed", "openvino")]["status"] == "missed"
    assert out[("corpus", "sentence-transformers")]["status"] == "within noise"
    # best of ORT / OpenVINO is the faster one (ORT here): 0.8x, below 1.0
    assert out[("1x16", "ort")]["status"] == "missed" and "best of ort/openvino = ort" in out[("1x16", "ort")]["text"]
    assert out[("corpus", "ort")]["status"] == "n/a" and "not installed" in out[("corpus", "ort")]["text"]
    assert "2.00x" in out[("32x128", "openvino")]["text"] and "met" in out[("32x128", "openvino")]["text"]
    # the speedup cell follows the harness convention
    assert cpu.speedup_cell(cpu.vs(t[("32x128", "openvino")], t[("32x128", "bertfast")])).startswith("2.00x (")
    assert cpu.speedup_cell(cpu.vs(t[("corpus", "sentence-transformers")],
                                   t[("corpus", "bertfast")])).startswith("within noise (")


# ----------------------------------------------------------------------------- quick runs on a tiny BERT
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer, 32-wide random BERT saved by transformers, with the MiniLM tokenizer files."""
    transformers = pytest.importorskip("transformers")
    from bertfast.loading import resolve_model_path

    try:
        minilm = Path(resolve_model_path("minilm"))
    except Exception as e:
        pytest.skip(f"the minilm tokenizer is needed: {e}")
    d = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(str(d))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, d / name)
    return d


def _quick_args(model_dir, out, *extra):
    return _parse(["cpu", "--quick", "--threads", "1", "--model", str(model_dir), "--out", str(out), "--no-plots",
                   "--no-progress", "--workloads", "1x16", "32-mixed", "corpus", "--corpus-size", "24",
                   "--rounds", "3", *extra])


def _doc(out):
    (js,) = [f for f in os.listdir(out) if f.endswith("_cpu.json")]
    assert os.path.isfile(os.path.join(out, js[:-5] + ".md"))
    return json.loads(Path(out, js).read_text())


def test_quick_run_without_optional_packages(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """No ONNX Runtime / OpenVINO / sentence-transformers (simulated): their rows say how to
    install them; bertfast matches transformers eager; an int8 quantizer (a stand-in here) gets
    its own rows, checked by cosine, and its own opt-in target lines."""
    real = cpu.optional_import
    missing = {"onnxruntime", "onnxruntime.transformers.optimizer", "openvino", "sentence_transformers", "onnx"}

    def fake_import(name):
        if name in missing:
            raise harness.Unavailable(f"{cpu.NOT_INSTALLED}: {name}")
        return real(name)

    monkeypatch.setattr(cpu, "optional_import", fake_import)
    monkeypatch.setattr(cpu.Models, "quantizer", staticmethod(lambda: lambda model, calibration=None: model))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rc = cpu.run(_quick_args(tiny_checkpoint, tmp_path / "out"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    doc = _doc(tmp_path / "out")
    assert doc["schema"] == "bertfast.bench.cpu/1" and doc["environment"]["versions"]["torch"]
    assert "onnxruntime" in doc["environment"]["versions"]
    rows = {(r["op"], r["impl"]): r for r in doc["results"]}
    for w in ("1x16", "32-mixed"):
        for s in cpu.FORWARD_SYSTEMS:
            assert (w, s) in rows, (w, s)
        for s in ("ort", "openvino"):
            assert rows[(w, s)]["status"] == "unavailable" and "pip install" in rows[(w, s)]["reason"]
        assert "pass --compile" in rows[(w, "hf-compile")]["reason"]
        bf = rows[(w, "bertfast")]
        assert bf["status"] == "ok" and bf["check"]["ok"] and bf["check"]["max_abs_err"] <= 1e-4
        assert bf["timing"]["n"] == 3 == len(bf["timing"]["times_ms"])
        assert rows[(w, "hf-sdpa")]["check"]["ok"]
        q = rows[(w, "bertfast-int8")]
        assert q["status"] == "ok" and q["check"]["min_cos"] > 0.99999  # the stand-in does not quantize
    assert rows[("corpus", "sentence-transformers")]["status"] == "unavailable"
    assert rows[("corpus", "ort")]["status"] == "unavailable"
    assert rows[("corpus", "bertfast")]["status"] == "ok"
    assert rows[("32-mixed", "bertfast")]["shape"]["padding"] > 0.6
    # the CPU and its flags, in the header, the JSON and the file name (family / model included)
    feats = doc["environment"]["machine"]["cpu_features"]
    assert set(feats) == {"model", "AVX2", "AVX-512", "AVX512_BF16", "VNNI", "AMX"}
    assert cpu_linear.cpu_features().describe() in captured.out
    assert cpu._slug(feats["model"]) in os.listdir(tmp_path / "out")[0]
    # every bertfast row says what its linears ran, by role
    for w in ("1x16", "32-mixed", "corpus"):
        lin = rows[(w, "bertfast")]["info"]["cpu_linears"]
        assert {"qkv", "attn-out+add", "ffn1+gelu", "ffn2+add"} <= set(lin), lin
        assert all(v.split(" ")[0] in {i.name for i in cpu_linear.IMPLS} for v in lin.values())
    assert "linears: qkv " in captured.out
    # the bf16 row: run and checked by cosine where the CPU has native bf16, a reason elsewhere
    for w in ("1x16", "32-mixed", "corpus"):
        b16 = rows[(w, "bertfast-bf16")]
        if cpu_linear.cpu_features().native_bf16:
            assert b16["status"] == "ok" and b16["check"]["ok"] and b16["check"]["min_cos"] > cpu.BF16_MIN_COS
            assert "cpu_linears" in b16["info"]
        else:
            assert b16["status"] == "unavailable" and "AVX512_BF16" in b16["reason"]
    lines = [t for t in doc["targets"] if t["workload"] in ("1x16", "32-mixed", "corpus")]
    assert {t["candidate"] for t in lines} == {"bertfast", "bertfast-int8"}  # bf16's target is at 32x128
    assert all(t["status"] == "n/a" for t in lines if t["vs"] in ("openvino", "ort/openvino", "ort"))
    assert "| 1x16 | ort | unavailable: not installed (pip install" in captured.out
    assert "[opt-in]" in captured.out and "targets" in captured.out


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime and onnx are not installed (pip install onnxruntime onnx)")
def test_quick_run_with_onnx_runtime(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """ORT (and OpenVINO when installed) run on the tiny model with the thread count asked for,
    match transformers eager, and the export is cached for the next run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    systems = ["bertfast", "hf-eager", "ort"] + (["openvino"] if HAS_OV else [])
    rc = cpu.run(_quick_args(tiny_checkpoint, tmp_path / "out", "--systems", *systems))
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    rows = {(r["op"], r["impl"]): r for r in _doc(tmp_path / "out")["results"]}
    for w in ("1x16", "32-mixed"):
        o = rows[(w, "ort")]
        assert o["status"] == "ok", o["reason"]
        assert o["check"]["ok"] and o["check"]["max_abs_err"] <= 1e-4
        assert o["info"]["intra_op_num_threads"] == 1 and o["info"]["inter_op_num_threads"] == 1
        assert o["info"]["bertfast_speedup"]["speedup"] > 0
        if HAS_OV:
            v = rows[(w, "openvino")]
            assert v["status"] == "ok", v["reason"]
            assert v["check"]["ok"] and v["info"]["INFERENCE_NUM_THREADS"] == 1
            assert v["info"]["INFERENCE_PRECISION_HINT"] == "f32"
    c = rows[("corpus", "ort")]
    assert c["status"] == "ok" and c["check"]["min_cos"] > cpu.FP32_MIN_COS
    assert ("corpus", "sentence-transformers") not in rows  # not asked for
    # the export is cached: a second checkpoint user finds it
    notes = []
    again = cpu.Models(tiny_checkpoint, notes)
    assert again.onnx_plain().is_file() and any("reused" in n for n in notes)


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers is not installed")
def test_sentence_transformers_stack_built_for_a_directory_without_modules_json(tiny_checkpoint):
    """The tiny checkpoint has no modules.json: the stack is built as Transformer + mean Pooling +
    Normalize, truncates like bertfast's SentenceEncoder and gives the same vectors."""
    assert not (tiny_checkpoint / "modules.json").exists()
    models = cpu.Models(tiny_checkpoint, [])
    enc = models.sentence_encoder()
    st = models.sentence_transformer(enc.max_length)
    assert [type(m).__name__ for m in st][1:] == ["Pooling", "Normalize"] and cpu._is_mean_pooling(st[1])
    texts = cpu.build_corpus(12, seed=3)
    with torch.inference_mode():
        got = st.encode(texts, batch_size=4, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)
    want = enc.encode(texts, batch_size=4, normalize=True, show_progress=False, convert_to_numpy=True)
    assert cpu.min_cosine(got, want) > cpu.FP32_MIN_COS


def test_bf16_row_says_why_on_a_cpu_without_native_bf16(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    models = cpu.Models(tiny_checkpoint, [])
    (case,) = cpu.forward_cases(models, "1x16", 1, ["bertfast-bf16"], 0, False, {})
    assert case.unavailable == cpu.BF16_NOT_NATIVE and "no AVX512_BF16 or AMX" in case.unavailable
    (case,) = cpu.corpus_cases(models, 1, ["bertfast-bf16"], ["a text"], {})
    assert case.unavailable == cpu.BF16_NOT_NATIVE


def test_bf16_target_is_against_fp32_bertfast_at_full_length():
    s = {"median_ms": 100.0, "p10_ms": 95.0, "p90_ms": 105.0}
    fast = {"median_ms": 50.0, "p10_ms": 48.0, "p90_ms": 52.0}
    (t,) = cpu.evaluate_targets({("32x128", "bertfast"): s, ("32x128", "bertfast-bf16"): fast}, "bertfast-bf16")
    assert t["vs"] == "bertfast" and t["target"] == 1.8 and t["status"] == "met"
