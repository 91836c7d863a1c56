"""The ``bertfast`` command line: encode / similarity / info / bench / profile, and one-line
errors (``bertfast: error: ...``, non-zero exit, no traceback) for every expected failure."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from bertfast import cli
from bertfast.cli import encode as cli_encode
from bertfast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _run_module(*args, input=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "bertfast", *args], cwd=ROOT, input=input, capture_output=True, text=True,
        timeout=timeout, env=env,
    )


def _assert_one_line_error(rc, err, expect=None):
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("bertfast: error: "), err
    if expect is not None:
        assert expect in lines[0], err


# ---------------------------------------------------------------------------- encode
def test_encode_preview(capsys):
    assert main(["encode", "A man is eating food.", "Someone is having a meal.", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("dim=384 norm=1.0000") == 2
    assert "[0] A man is eating food." in out and "[1] Someone is having a meal." in out


def test_encode_json_file_and_stdin(tmp_path, monkeypatch, capsys):
    f = tmp_path / "texts.txt"
    f.write_text("first line\n\nsecond line\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    assert main(["encode", "inline", "-", "--file", str(f), "--json", "--batch-size", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    # the blank line is a row (row i = line i), encoded as the empty text ([CLS] [SEP])
    assert [d["text"] for d in data] == ["inline", "from stdin", "first line", "", "second line"]
    for d in data:
        assert len(d["embedding"]) == 384
        assert abs(sum(v * v for v in d["embedding"]) - 1.0) < 1e-4
    # the same text gives the same embedding as the library
    from bertfast import SentenceEncoder

    ref = SentenceEncoder("minilm", device="cpu").encode("inline")
    torch.testing.assert_close(torch.tensor(data[0]["embedding"]), ref)


def test_encode_preview_keeps_blank_lines(tmp_path, capsys):
    f = tmp_path / "texts.txt"
    f.write_text("one\n\n  \nfour\n", encoding="utf-8")
    assert main(["encode", "--file", str(f), "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "[0] one" in out and "[3] four" in out
    assert out.count("(blank: the embedding of [CLS] [SEP])") == 2 and out.count("dim=384 norm=1.0000") == 4


def test_encode_no_normalize(capsys):
    assert main(["encode", "hello world", "--json", "--no-normalize", "--backend", "torch"]) == 0
    emb = json.loads(capsys.readouterr().out)[0]["embedding"]
    assert abs(sum(v * v for v in emb) - 1.0) > 1e-3


# ---------------------------------------------------------------------------- similarity
def test_similarity(capsys):
    assert main(["similarity", "A man is eating food.", "Someone is having a meal."]) == 0
    para = float(capsys.readouterr().out.strip())
    assert main(["similarity", "A man is eating food.", "The new movie is awesome."]) == 0
    unrelated = float(capsys.readouterr().out.strip())
    assert -1.0 <= unrelated < para <= 1.0
    assert para > 0.5


# ---------------------------------------------------------------------------- info / help
def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch    {torch.__version__}" in out
    assert "triton" in out
    assert "Triton on GPU:" in out and "Triton interpreter:" in out
    assert "PyTorch:" in out and "yes" in out
    assert "default model: minilm -> " in out
    if not torch.cuda.is_available():
        assert "Triton on GPU:      no" in out


def test_help_lists_all_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("encode", "similarity", "info", "bench", "profile"):
        assert cmd in out
    assert main([]) == 2  # no command: help on stderr


def test_lazy_command_not_available(monkeypatch, capsys):
    monkeypatch.setitem(cli.LAZY_COMMANDS, "bench", ("bertfast._no_such_module", "benchmark"))
    assert main(["bench", "--whatever", "x"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "not available" in lines[0], err


def test_lazy_command_dispatch(monkeypatch, capsys, tmp_path):
    mod = tmp_path / "fake_bench_mod.py"
    mod.write_text(
        "def add_arguments(p):\n    p.add_argument('--n', type=int, default=1)\n"
        "def run(args):\n    print('ran', args.n)\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.LAZY_COMMANDS, "profile", ("fake_bench_mod", "profile"))
    assert main(["profile", "--n", "7"]) == 3
    assert capsys.readouterr().out.strip() == "ran 7"


# ---------------------------------------------------------------------------- expected failures
def _failures(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad_model = tmp_path / "not_a_model"
    bad_model.mkdir()
    cases = {
        "missing-model-dir": (["encode", "hi", "--model", str(tmp_path / "nope")], None),
        "dir-without-checkpoint": (["encode", "hi", "--model", str(bad_model)], None),
        "unknown-dtype": (["encode", "hi", "--dtype", "float64"], "unknown dtype 'float64'"),
        "empty-text-list": (["encode"], "no texts to encode"),
        "empty-file": (["encode", "--file", str(empty)], "no texts to encode"),
        "file-not-found": (["encode", "--file", str(tmp_path / "missing.txt")], "file not found"),
        "bad-batch-size": (["encode", "hi", "--batch-size", "0"], "positive integer"),
        "max-length-too-big": (["encode", "hi", "--max-length", "100000"], "max_position_embeddings"),
        "similarity-missing-arg": (["similarity", "only one"], None),
        "unknown-command": (["frobnicate"], None),
        "unknown-backend": (["encode", "hi", "--backend", "cuda-magic"], "cuda-magic"),
    }
    if not torch.cuda.is_available():
        cases["cuda-without-cuda"] = (["encode", "hi", "--device", "cuda"], "CUDA is not available")
    return cases


@pytest.mark.parametrize(
    "case",
    ["missing-model-dir", "dir-without-checkpoint", "unknown-dtype", "empty-text-list", "empty-file",
     "file-not-found", "bad-batch-size", "max-length-too-big", "similarity-missing-arg", "unknown-command",
     "unknown-backend", "cuda-without-cuda"],
)
def test_expected_failure_is_one_line(case, tmp_path, capsys, monkeypatch):
    cases = _failures(tmp_path)
    if case not in cases:
        pytest.skip("CUDA is available here")
    argv, expect = cases[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc = main(argv)
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err, expect)
    assert captured.out == ""


def test_unexpected_error_keeps_traceback(monkeypatch):
    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli_encode, "cmd_info", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])


def test_debug_shows_traceback_for_expected_errors():
    with pytest.raises(ValueError, match="unknown dtype|CUDA|no texts"):
        main(["--debug", "encode"])


# ---------------------------------------------------------------------------- real processes
def test_python_m_bertfast_info_and_encode_stdin():
    proc = _run_module("info")
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch:" in proc.stdout
    proc = _run_module("encode", "-", "--json", input="hello\nworld\n")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [d["text"] for d in data] == ["hello", "world"] and len(data[0]["embedding"]) == 384


def test_process_errors_are_one_line(tmp_path):
    proc = _run_module("encode", "hi", "--model", str(tmp_path / "nope"))
    _assert_one_line_error(proc.returncode, proc.stderr)


# ---------------------------------------------------------------------------- refused at parse time
def _refused_args(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9\n".encode("latin-1"))
    cases = {
        "encode-device-meta": (["encode", "hi", "--device", "meta"], "argument --device: device 'meta'"),
        "encode-device-unknown": (["encode", "hi", "--device", "gpu0"], "unknown device 'gpu0'"),
        "similarity-device-meta": (["similarity", "a", "b", "--device", "meta"], "'meta' is not supported"),
        "encode-backend": (["encode", "hi", "--backend", "fast"], "argument --backend: unknown backend 'fast'"),
        "encode-max-length-0": (["encode", "hi", "--max-length", "0"], "--max-length: expected a positive"),
        "encode-batch-size-neg": (["encode", "hi", "--batch-size", "-3"], "--batch-size: expected a positive"),
        "encode-model-missing": (["encode", "hi", "--model", str(tmp_path / "nope")], "argument --model"),
        "encode-latin1-file": (["encode", "--file", str(bad_utf8)], "is not UTF-8 text"),
        "profile-out-file": (["profile", "--out", str(a_file)], "argument --out: " + str(a_file) + " is an existing file"),
        "profile-out-under-file": (["profile", "--out", str(a_file / "sub")], "is a file"),
        "profile-batch-0": (["profile", "--batch", "0"], "argument --batch"),
        "profile-seq-neg": (["profile", "--seq", "-8"], "argument --seq"),
        "profile-steps-0": (["profile", "--steps", "0"], "argument --steps"),
        "profile-warmup-neg": (["profile", "--warmup", "-1"], "argument --warmup"),
        "profile-top-0": (["profile", "--top", "0"], "argument --top"),
        "profile-threads-0": (["profile", "--threads", "0"], "argument --threads"),
        "profile-device-meta": (["profile", "--device", "meta"], "argument --device"),
        "profile-impl": (["profile", "--impl", "onnx"], "argument --impl"),
        "bench-out-file": (["bench", "--out", str(a_file)], "argument --out"),
        "bench-impl": (["bench", "encoder", "--impl", "bertfast-torch", "nope"], "argument --impl: invalid choice: 'nope'"),
        "bench-threads-0": (["bench", "--threads", "0"], "argument --threads"),
        "bench-batch-0": (["bench", "--batch", "0"], "argument --batch"),
        "bench-device-meta": (["bench", "--device", "meta"], "argument --device"),
    }
    if not torch.cuda.is_available():
        cases["bench-device-cuda"] = (["bench", "--device", "cuda"], "CUDA is not available")
        cases["profile-device-cuda"] = (["profile", "--device", "cuda"], "CUDA is not available")
        cases["encode-device-cuda1"] = (["encode", "hi", "--device", "cuda:1"], "CUDA is not available")
    return cases


REFUSED = ["encode-device-meta", "encode-device-unknown", "similarity-device-meta", "encode-backend",
           "encode-max-length-0", "encode-batch-size-neg", "encode-model-missing", "encode-latin1-file",
           "profile-out-file", "profile-out-under-file", "profile-batch-0", "profile-seq-neg", "profile-steps-0",
           "profile-warmup-neg", "profile-top-0", "profile-threads-0", "profile-device-meta", "profile-impl",
           "bench-out-file", "bench-impl", "bench-threads-0", "bench-batch-0", "bench-device-meta",
           "bench-device-cuda", "profile-device-cuda", "encode-device-cuda1"]


@pytest.mark.parametrize("case", REFUSED)
def test_bad_argument_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    cases = _refused_args(tmp_path)
    if case not in cases:
        pytest.skip("CUDA is available here")
    argv, expect = cases[case]

    def no_work(*a, **k):
        raise AssertionError("a model was loaded / a run started for a bad argument")

    import bertfast.bench
    import bertfast.bench.profile
    import bertfast.sentence

    monkeypatch.setattr(bertfast.sentence.SentenceEncoder, "__init__", no_work)
    monkeypatch.setattr(bertfast.bench, "run", no_work)
    monkeypatch.setattr(bertfast.bench.profile, "run", no_work)
    rc = main(argv)
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err, expect)
    assert captured.out == ""
    if case != "encode-latin1-file":  # a file's contents are read after parsing, still before the model
        assert rc == 2


def test_bench_impl_names_match_the_suites():
    from bertfast.bench import IMPLS, suites

    assert set(suites.ENCODER_IMPLS) <= set(IMPLS)


def test_non_utf8_stdin_is_one_line(capsys, monkeypatch):
    class BytesStdin:
        buffer = io.BytesIO(b"ok\n\xff\xfe bad\n")

    monkeypatch.setattr(sys, "stdin", BytesStdin())
    rc = main(["encode", "-"])
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err, "stdin is not UTF-8 text")
    # a text stream that let bad bytes through as surrogates (surrogateescape) is refused too
    monkeypatch.setattr(sys, "stdin", io.StringIO(b"caf\xe9\n".decode("utf-8", "surrogateescape")))
    rc = main(["encode", "-"])
    _assert_one_line_error(rc, capsys.readouterr().err, "stdin is not UTF-8 text")


def test_process_bad_arguments_are_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "bertfast", "encode", "-"], cwd=ROOT, input=b"caf\xe9\n",
                          capture_output=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _assert_one_line_error(proc.returncode, proc.stderr.decode(), "stdin is not UTF-8 text")
    for args, expect in ((["encode", "hi", "--device", "meta"], "--device"),
                         (["profile", "--out", str(a_file)], "--out"),
                         (["bench", "--impl", "nope"], "--impl")):
        proc = _run_module(*args)
        _assert_one_line_error(proc.returncode, proc.stderr, expect)
        assert proc.returncode == 2


# ---------------------------------------------------------------------------- the command line in one place
def test_argparse_only_in_the_cli_package():
    """Every parser and argument type lives in bertfast/cli/: no other module of the package
    imports argparse (the library modules take plain arguments)."""
    import ast

    cli_dir = os.path.join(ROOT, "bertfast", "cli") + os.sep
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "bertfast")):
        for name in files:
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or path.startswith(cli_dir):
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            if "argparse" in imported:
                offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_every_command_is_parsed_in_the_cli_package():
    """Each lazy command's target is in bertfast.cli and has add_arguments() and run(); the library
    modules it runs define no parser."""
    import importlib

    for name, (target, _) in cli.LAZY_COMMANDS.items():
        assert target.startswith("bertfast.cli."), (name, target)
        obj = cli.lazy_target(target)
        assert callable(obj.add_arguments) and callable(obj.run), name
    for module in ("bertfast.train", "bertfast.tasks", "bertfast.index", "bertfast.tune", "bertfast.bench",
                   "bertfast.bench.profile", "bertfast.bench.evidence"):
        mod = importlib.import_module(module)
        assert not hasattr(mod, "add_arguments") and not hasattr(mod, "build_parser"), module


def test_python_m_evidence_parses_in_the_cli_package():
    proc = subprocess.run([sys.executable, "-m", "bertfast.bench.evidence", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m bertfast.bench.evidence") and "--step" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "bertfast.bench.evidence", "--step", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
