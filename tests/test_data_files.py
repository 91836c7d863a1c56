"""Data files are read one way everywhere (bertfast.data): ``bertfast encode --input`` and
``bertfast finetune`` see the same rows of a .txt / .jsonl / .csv / .tsv / .parquet file, refuse
the same bad files with the same ``PATH:LINE`` errors, and pick the ``text`` column by default.
Also the output lock of ``encode`` and its progress lines in a log."""
import csv
import io
import json
import threading

import numpy as np
import pytest
import torch

from bertfast import corpus, progress
from bertfast.cli import main
from bertfast.corpus import CorpusReader, encode_file
from bertfast.train import read_records

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"text": "a good film", "label": "pos"}, {"text": "", "label": "neg"},
        {"text": "two\nlines, \"quoted\"", "label": "pos"}, {"text": "tab\there", "label": "neg"}]


def make_tiny_model(d):
    """A random 2-layer BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer, saved to ``d``."""
    import shutil

    from bertfast import BertConfig, BertModel
    from bertfast.loading import resolve_model_path

    d.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=128)).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(resolve_model_path("minilm") / name, d / name)
    return d


def write_table(path, rows, delimiter):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(list(rows[0]))
        for r in rows:
            w.writerow(list(r.values()))
    return path


@pytest.fixture
def files(tmp_path):
    out = {"csv": write_table(tmp_path / "d.csv", ROWS, ","), "tsv": write_table(tmp_path / "d.tsv", ROWS, "\t")}
    out["jsonl"] = tmp_path / "d.jsonl"
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}), out["parquet"])
    return out


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_encode_and_finetune_read_the_same_rows(files, fmt):
    """The same file gives finetune's records and encode's texts, with the ``text`` column chosen
    by default (no --field needed), for every table format; TSV is a table, not lines."""
    recs = read_records(files[fmt])
    assert [dict(r) for r in recs] == ROWS
    reader = CorpusReader(files[fmt])
    assert reader.field == "text" and list(reader) == [r["text"] for r in ROWS]


def test_encode_tsv_embeds_the_text_column_not_the_lines(tmp_path, files, capsys):
    """``bertfast encode --input data.tsv`` once embedded each line with its tab and label, the
    header as row 0: now the rows are the records and the vectors those of the ``text`` cells."""
    from bertfast.sentence import SentenceEncoder

    tiny = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out.npy"
    assert main(["encode", "--input", str(files["tsv"]), "--output", str(out), "--model", str(tiny)]) == 0
    got = np.load(out)
    want = SentenceEncoder(tiny, device="cpu").encode([r["text"] for r in ROWS], convert_to_numpy=True)
    assert got.shape == want.shape == (len(ROWS), 32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    manifest = json.loads((tmp_path / "out.npy.manifest.json").read_text())
    assert manifest["input"]["format"] == "tsv" and manifest["input"]["field"] == "text"


BAD = [  # (file name, content, message after "PATH")
    ("dup.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "text": "c", "label": "y"}\n',
     ":2: the object names key 'text' twice"),
    ("dup.csv", "text,label,text\na,x,b\n", ":1: the header names column 'text' twice"),
    ("dup.tsv", "text\tlabel\tlabel\na\tx\ty\n", ":1: the header names column 'label' twice"),
    ("blank.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n', ":2: blank line"),
    ("wide.csv", "text,label\na,x\nb,y,z\n", ":3: 3 values but the header names 2 columns"),
    ("latin1.csv", "text,label\nna\xefve,x\n".encode("latin-1"), ":2: not UTF-8 text"),
    ("quote.csv", 'text,label\n"a,x\n', ":2: not valid CSV"),
]


@pytest.mark.parametrize("name, content, message", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_refused_alike_by_encode_and_finetune(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    errors = []
    for read in (lambda: read_records(p), lambda: CorpusReader(p, field="text").plan(10)):
        with pytest.raises(ValueError) as e:
            read()
        errors.append(str(e.value))
    assert errors[0] == errors[1] and errors[0].startswith(f"{p}{message}"), errors


def test_finetune_refuses_an_empty_label_cell_and_null_words(tmp_path, capsys):
    """An empty CSV label cell once became a class named ""; a JSON null among the words the word
    "None".  Both are refused in one line naming the file and the line."""
    from bertfast.train import _Classify, _Options, _Tokens

    p = tmp_path / "train.csv"
    p.write_text("text,label\na good film,pos\na bad film,\nfine,neg\n", encoding="utf-8")
    opts = _Options(task="classify", train_file=str(p), eval_file=None, model="minilm", out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=rf"^{p}:3: field 'label' is an empty label ''"):
        _Classify(opts, None).fit_labels(read_records(p), None)
    q = tmp_path / "ner.jsonl"
    q.write_text(json.dumps({"tokens": ["Paris", None], "tags": ["LOC", "O"]}) + "\n", encoding="utf-8")
    opts = _Options(task="tokens", train_file=str(q), eval_file=None, model="minilm", out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=rf"^{q}:1: field 'tokens': item 1 is null, not a word"):
        _Tokens(opts, None).features(read_records(q))
    r = tmp_path / "null.jsonl"
    r.write_text(json.dumps({"text": None, "label": "x"}) + "\n", encoding="utf-8")
    opts = _Options(task="classify", train_file=str(r), eval_file=None, model="minilm", out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=rf"^{r}:1: field 'text' is null"):
        _Classify(opts, None).features(read_records(r))


def test_finetune_cli_names_the_empty_label_line(tmp_path, capsys):
    p = tmp_path / "train.csv"
    p.write_text("text,label\na good film,pos\na bad film,\n", encoding="utf-8")
    rc = main(["finetune", "--task", "classify", "--train", str(p), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"bertfast: error: {p}:3: field 'label' is an empty label '' (an empty CSV cell?)\n"


def test_default_text_column_and_when_to_ask(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("id,body\n1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"give --field, the CSV column holding the text \(columns: id, body\)"):
        CorpusReader(p)
    one = tmp_path / "b.csv"
    one.write_text("body\nx\n", encoding="utf-8")
    assert CorpusReader(one).field == "body"  # the only column
    j = tmp_path / "c.jsonl"
    j.write_text('"plain string"\n"another"\n', encoding="utf-8")
    assert CorpusReader(j).field is None and list(CorpusReader(j)) == ["plain string", "another"]


def test_txt_lines_are_text_records_for_finetune(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_bytes(b"\xef\xbb\xbffirst\r\n\nthird\n")
    assert [dict(r) for r in read_records(p)] == [{"text": "first"}, {"text": ""}, {"text": "third"}]
    assert [r.line for r in read_records(p)] == [1, 2, 3] and list(CorpusReader(p)) == ["first", "", "third"]


def test_csv_line_numbers_count_quoted_line_breaks(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('text,label\n"one\ntwo\nthree",x\n\nb,y\n', encoding="utf-8")
    from bertfast.data import DataFile

    rows = list(DataFile(p).rows())
    assert [r.line for r in rows] == [2, 6] and rows[1].value == {"text": "b", "label": "y"}


# ----------------------------------------------------------------------------- the output lock
class _BlockingEncoder:
    """Stands in for a SentenceEncoder: encode() waits until released (a run in progress)."""
    embedding_dim, max_length = 4, 16

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, texts, **kw):
        self.started.set()
        assert self.release.wait(60)
        return np.zeros((len(texts), 4), dtype=np.float32)


def test_second_run_on_one_output_is_refused_in_one_line(tmp_path, capsys):
    """While one encode run writes an output, a second on the same output stops at once with
    "another run is writing ..." (it once died on a raw errno message, or raced the first)."""
    tiny = make_tiny_model(tmp_path / "tiny")
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i}\n" for i in range(50)), encoding="utf-8")
    out = tmp_path / "out.npy"
    enc = _BlockingEncoder()
    first = threading.Thread(target=encode_file, args=(src, out), kwargs=dict(model=tiny, encoder=enc, progress=False))
    first.start()
    try:
        assert enc.started.wait(60)
        rc = main(["encode", "--input", str(src), "--output", str(out), "--model", str(tiny)])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1
        assert err.startswith(f"bertfast: error: another run is writing {out} (it holds ")
    finally:
        enc.release.set()
        first.join(60)
    assert np.load(out).shape == (50, 4) and not corpus.lock_path(out).exists()
    with corpus.output_lock(out):  # taken and given back: the next run goes ahead
        pass
    assert not corpus.lock_path(out).exists()


# ----------------------------------------------------------------------------- progress in a log
def test_progress_lines_in_a_log_finer_than_a_chunk(tmp_path, monkeypatch):
    """stderr redirected to a file: periodic plain lines (every progress.INTERVAL seconds; 0 here),
    updated every PROGRESS_ROWS rows, not once per chunk."""
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i}\n" for i in range(1000)), encoding="utf-8")
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    monkeypatch.setattr(corpus.sys, "stderr", log)

    class Encoder:
        embedding_dim, max_length = 4, 16

        def encode(self, texts, **kw):
            return np.zeros((len(texts), 4), dtype=np.float32)

    encode_file(src, tmp_path / "out.npy", model=_any_model(tmp_path), encoder=Encoder(), chunk_size=1000)
    lines = log.getvalue().splitlines()
    assert len(lines) >= 4 and lines[0].startswith("encoding in.txt: 256/1,000 rows"), lines
    assert lines[-1].startswith("encoding in.txt: 1,000/1,000 rows (100%)") and "\r" not in log.getvalue()


def _any_model(tmp_path):
    return make_tiny_model(tmp_path / "tiny")


def test_run_progress_is_quiet_below_the_threshold_and_when_off():
    log = io.StringIO()
    bar = progress.Progress(100, "x", show=None, stream=log, interval=0.0)
    bar.update(100)
    bar.close()
    assert log.getvalue() == ""  # 100 rows: too few to report
    bar = progress.Progress(10_000, "x", show=False, stream=log, interval=0.0)
    bar.update(10_000)
    bar.close()
    assert log.getvalue() == ""


# ----------------------------------------------------------------------------- --threads
def test_encode_threads_flag(tmp_path, capsys, monkeypatch):
    from bertfast.sentence import SentenceEncoder

    seen = []
    encode = SentenceEncoder.encode

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        return encode(self, *a, **k)

    monkeypatch.setattr(SentenceEncoder, "encode", spy)
    before = torch.get_num_threads()
    tiny = _any_model(tmp_path)
    assert main(["encode", "a text", "--model", str(tiny), "--threads", "3"]) == 0
    assert seen == [3] and torch.get_num_threads() == before
    assert main(["encode", "a text", "--model", str(tiny), "--threads", "0"]) == 2
    assert "--threads: expected a positive integer, got '0'" in capsys.readouterr().err
