"""bertfast.corpus and ``bertfast encode --input --output``: readers (row i = line / record i,
blank rows kept), writers (.npy / .parquet / .jsonl), the manifest, resuming after a real kill,
refusing a mismatching run.  A tiny random model with the minilm tokenizer keeps this fast."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bertfast.cli import main
from bertfast.corpus import CorpusReader, encode_file, manifest_path, parts_dir, read_manifest, split_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_LINES = 5000
CHUNK = 700  # 5000 rows -> 8 chunks, the last one short
# vectors of one text encoded in two batches of other compositions differ by float rounding only
BATCH_ATOL = 1e-5


def make_tiny_model(d, seed=1234):
    """A random 2-layer BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer files, saved to ``d``."""
    from bertfast import BertConfig, BertModel
    from bertfast.loading import resolve_model_path

    d.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)
        BertModel(cfg).save_pretrained(d)
    src = resolve_model_path("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, d / name)
    return d


def corpus_lines(n=N_LINES):
    """n short lines; every 97th blank (one of them whitespace only), some repeated."""
    out = []
    for i in range(n):
        if i % 97 == 0:
            out.append("   " if i % 194 == 0 else "")
        else:
            out.append(f"sentence {i} talks about topic {i % 13} and {i % 7}")
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def encoder(tiny):
    from bertfast.sentence import SentenceEncoder

    return SentenceEncoder(tiny, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    p = d / "corpus.txt"
    p.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tiny, encoder):
    """The uninterrupted single-process run: corpus.txt -> ref.npy (+ manifest)."""
    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    m = encode_file(corpus, out, model=tiny, chunk_size=CHUNK, encoder=encoder, progress=False)
    return out, m


def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bertfast", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _one_line_error(rc, err, expect):
    assert rc != 0 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bertfast: error: "), err
    assert expect in lines[0], err


# ---------------------------------------------------------------------------- readers
def test_split_lines_is_line_numbering():
    assert split_lines("a\n\nb\r\nc\x0cd\u2028e") == ["a", "", "b", "c\x0cd\u2028e"]
    assert split_lines("a\n") == ["a"] and split_lines("") == [] and split_lines("\n") == [""]


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_readers_rows_and_chunk_offsets(tmp_path, chunk):
    texts = ["first", "", "third, with a comma", "fourth \"quoted\"\nover two lines", "  ", "sixth é"]
    files = {}
    files["txt"] = tmp_path / "a.txt"
    files["txt"].write_bytes(b"\xef\xbb\xbffirst\r\n\nthird, with a comma\nfourth\x0cff\n  \nsixth \xc3\xa9")
    txt_rows = ["first", "", "third, with a comma", "fourth\x0cff", "  ", "sixth é"]
    files["jsonl"] = tmp_path / "a.jsonl"
    files["jsonl"].write_text("\n".join(json.dumps({"t": t, "n": i}) if i != 1 else '{"t": null}'
                                        for i, t in enumerate(texts)) + "\n", encoding="utf-8")
    import csv

    files["csv"] = tmp_path / "a.csv"
    with open(files["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["n", "t"])
        for i, t in enumerate(texts):
            w.writerow([i, t])
    for fmt, p in files.items():
        r = CorpusReader(p, field=None if fmt == "txt" else "t")
        want = txt_rows if fmt == "txt" else texts
        assert list(r) == want, fmt
        n, starts = r.plan(chunk)
        assert n == len(want) and len(starts) == -(-n // chunk)
        got = []
        for j, s in enumerate(starts):
            lo, hi = j * chunk, min((j + 1) * chunk, n)
            got.extend(r.read(lo, hi, s))
        assert got == want, fmt


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet input needs pyarrow (bertfast[parquet])")
    import pyarrow.parquet as pq

    texts = [f"text {i}" if i % 5 else None for i in range(23)]
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": list(range(23)), "body": texts}), p, row_group_size=4)
    r = CorpusReader(p, field="body")
    want = ["" if t is None else t for t in texts]
    assert list(r) == want
    n, starts = r.plan(5)
    assert n == 23
    assert sum((r.read(j * 5, min(j * 5 + 5, n), s) for j, s in enumerate(starts)), []) == want
    with pytest.raises(ValueError, match="column 'id' is int64, not a string column"):
        CorpusReader(p, field="id")
    with pytest.raises(ValueError, match=r"give --field.*columns: id, body"):
        CorpusReader(p)


@pytest.mark.parametrize("content, field, expect", [
    ('{"t": "a"}\n\n{"t": "b"}\n', "t", "bad.jsonl:2: blank line"),
    ('{"t": "a"}\n{"x": "b"}\n', "t", "bad.jsonl:2: no field 't' (its keys: x)"),
    ('{"t": "a"}\n{"t": 3}\n', "t", "bad.jsonl:2: the text field 't' is a JSON int, not a string"),
    ('{"t": "a"}\n{"t": "a"\n', "t", "bad.jsonl:2: not valid JSON"),
    ('{"t": "a"}\n', None, "bad.jsonl:1: a JSON object without a 'text' key: give --field (its keys: t)"),
    ('{"t": "a"}\n{"t": "b", "t": "c"}\n', "t", "bad.jsonl:2: the object names key 't' twice"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, field, expect):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        CorpusReader(p, field=field).plan(10)


def test_bad_input_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="input file not found"):
        CorpusReader(tmp_path / "nope.txt")
    (tmp_path / "a.xml").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the input format"):
        CorpusReader(tmp_path / "a.xml")
    (tmp_path / "a.txt").write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(ValueError, match="a.txt:2: not UTF-8"):
        CorpusReader(tmp_path / "a.txt").plan(10)
    with pytest.raises(ValueError, match="--field 'x' is for .jsonl/.csv/.tsv/.parquet"):
        CorpusReader(tmp_path / "a.txt", field="x")
    (tmp_path / "a.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"no column 'c' \(columns: a, b\)"):
        CorpusReader(tmp_path / "a.csv", field="c")


# ---------------------------------------------------------------------------- encode to files
def test_5000_lines_npy_rows_are_lines(reference, corpus, encoder):
    out, m = reference
    lines = corpus_lines()
    emb = np.load(out, mmap_mode="r")
    assert emb.shape == (N_LINES, encoder.embedding_dim) and emb.dtype == np.float32
    assert m["complete"] and m["rows"] == N_LINES and m["skipped_rows"] == [] and m["n_chunks"] == 8
    assert read_manifest(manifest_path(out)) == m
    assert not parts_dir(out).exists()
    # blank and whitespace-only lines are rows: the embedding of [CLS] [SEP]
    blank = encoder.encode("", convert_to_numpy=True)
    for i in (0, 97, 194, 4947):
        np.testing.assert_allclose(emb[i], blank, atol=BATCH_ATOL, rtol=0)
    # row i is line i: rows all over the file (first / last of a chunk, the last row) against the library
    rows = [1, 2, 699, 700, 701, 1399, 2500, 4200, 4998, 4999]
    want = encoder.encode([lines[i] for i in rows], convert_to_numpy=True)
    np.testing.assert_allclose(emb[rows], want, atol=BATCH_ATOL, rtol=0)
    # and not some other row: neighbours are different texts, hence far from exact
    assert np.abs(emb[rows[1:]] - want[:-1]).max() > 1e-2


def test_5000_lines_parquet_skip_empty(tmp_path, reference, corpus, tiny, capsys):
    pa = pytest.importorskip("pyarrow", reason="parquet output needs pyarrow (bertfast[parquet])")
    import pyarrow.parquet as pq

    out = tmp_path / "emb.parquet"
    assert main(["encode", "--input", str(corpus), "--output", str(out), "--model", str(tiny), "--skip-empty",
                 "--chunk-size", str(CHUNK), "--no-progress"]) == 0
    blanks = [i for i, t in enumerate(corpus_lines()) if not t.strip()]
    assert f"{N_LINES - len(blanks)} rows x 32 (float32), {len(blanks)} blank row(s) skipped" in capsys.readouterr().out
    m = read_manifest(manifest_path(out))
    assert m["skipped_rows"] == blanks and m["rows"] == N_LINES - len(blanks)
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    ids = table.column("id").to_numpy()
    np.testing.assert_array_equal(ids, np.setdiff1d(np.arange(N_LINES), blanks))
    vec = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), 32)
    ref = np.load(reference[0])
    np.testing.assert_allclose(vec, ref[ids], atol=BATCH_ATOL, rtol=0)  # id = the input line, whatever was skipped


def test_resume_after_a_real_kill(tmp_path, reference, corpus, tiny, encoder):
    out = tmp_path / "emb.npy"
    args = ["encode", "--input", corpus, "--output", out, "--model", tiny, "--chunk-size", CHUNK, "--no-progress"]
    proc = _run(*args, "--kill-after-chunks", 3)
    assert proc.returncode == -9, proc.stderr  # SIGKILL: no cleanup ran
    assert not out.exists() and not manifest_path(out).exists()  # nothing looks complete
    parts = parts_dir(out)
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == [f"chunk-{j:08d}.npz" for j in range(3)]
    assert read_manifest(parts / "manifest.json")["rows_done"] == 3 * CHUNK
    # another setting: a one-line refusal, the interrupted run left as it was
    proc = _run(*args, "--no-normalize")
    _one_line_error(proc.returncode, proc.stderr, "interrupted run with other settings (normalize: True before")
    # the same command resumes (in this process: the model is already loaded)
    m = encode_file(corpus, out, model=tiny, chunk_size=CHUNK, encoder=encoder, resume=True, progress=False)
    assert m["complete"] and m["rows"] == N_LINES and not parts.exists()
    np.testing.assert_array_equal(np.load(out), np.load(reference[0]))  # no row lost, duplicated or changed
    # done: running it again does nothing; a different job on the same output is refused
    mtime = out.stat().st_mtime_ns
    assert encode_file(corpus, out, model=tiny, encoder=encoder)["complete"] and out.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="already exists from another run.*use --overwrite"):
        encode_file(corpus, out, model=tiny, encoder=encoder, output_dtype="float16")


_KILL_MID_CHUNK = """
import os, signal, sys
from bertfast import corpus
from bertfast.sentence import SentenceEncoder

src, out, model, chunk, kill_at, count = sys.argv[1:]
corpus.SLICE_SAVE_SECONDS = 0.0  # save every slice (the default saves about one a second)
enc = SentenceEncoder(model, device="cpu")
real, calls = enc.encode, []


def encode(texts, **kw):
    calls.append(len(texts))
    with open(count, "w") as f:
        f.write(str(sum(calls)))  # rows handed to the encoder so far, the one in flight included
    if len(calls) == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)  # while this slice is encoded
    return real(texts, **kw)


enc.encode = encode
corpus.encode_file(src, out, model=model, chunk_size=int(chunk), encoder=enc, progress=False)
"""


def test_a_kill_mid_chunk_redoes_at_most_one_slice(tmp_path, reference, corpus, tiny, encoder):
    """kill -9 in the middle of a chunk (700 rows = slices of 256 + 256 + 188): the slices of the
    chunk encoded before the kill are on disk, the resumed run re-encodes only the slice that was
    in flight (at most PROGRESS_ROWS rows, not the chunk), and the output is bit-identical to
    the uninterrupted run.  A slice file that does not continue the saved ones is ignored."""
    from bertfast.corpus import PROGRESS_ROWS

    out, count = tmp_path / "emb.npy", tmp_path / "count"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # chunk 0: calls 1-3; chunk 1: slices 1 and 2 saved, killed during its 3rd (call 6)
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_CHUNK, str(corpus), str(out), str(tiny), str(CHUNK), "6",
                           str(count)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr
    before_kill = int(count.read_text())
    assert before_kill == 2 * CHUNK  # the slice in flight: rows 512..699 of chunk 1
    parts = parts_dir(out)
    assert sorted(p.name for p in parts.glob("*.npz")) == [
        "chunk-00000000.npz", "slice-00000001-00000000.npz", f"slice-00000001-{PROGRESS_ROWS:08d}.npz"]
    np.savez(parts / "slice-00000003-00000256.npz", ids=np.arange(3 * CHUNK + 256, 3 * CHUNK + 300),
             emb=np.ones((44, 32), np.float32))  # not after a saved slice: ignored
    rows = []

    class Counting:
        embedding_dim, max_length = encoder.embedding_dim, encoder.max_length

        def encode(self, texts, **kw):
            rows.append(len(texts))
            return encoder.encode(texts, **kw)

    m = encode_file(corpus, out, model=tiny, chunk_size=CHUNK, encoder=Counting(), resume=True, progress=False)
    assert m["complete"] and not parts.exists()
    np.testing.assert_array_equal(np.load(out), np.load(reference[0]))  # no row lost, duplicated or changed
    redone = before_kill + sum(rows) - N_LINES
    assert 0 < redone <= PROGRESS_ROWS, (before_kill, sum(rows))


def test_small_outputs_jsonl_float16_and_errors(tmp_path, tiny, encoder, capsys):
    src = tmp_path / "in.jsonl"
    texts = ["a cat", None, "a dog", "a bird"]
    src.write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n", encoding="utf-8")
    want = encoder.encode(["" if t is None else t for t in texts], convert_to_numpy=True)
    out = tmp_path / "out.jsonl"
    assert main(["encode", "-i", str(src), "--field", "body", "-o", str(out), "--model", str(tiny)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.array([r["embedding"] for r in recs]), want, atol=BATCH_ATOL, rtol=0)
    out16 = tmp_path / "out16.npy"
    assert main(["encode", "-i", str(src), "--field", "body", "-o", str(out16), "--model", str(tiny),
                 "--output-dtype", "float16", "--chunk-size", "3"]) == 0
    e16 = np.load(out16)
    assert e16.dtype == np.float16 and e16.shape == (4, 32)
    np.testing.assert_allclose(e16.astype(np.float32), want, atol=2e-3, rtol=0)
    capsys.readouterr()
    cases = [
        (["--input", str(src), "--model", str(tiny)], "--input needs --output"),
        (["--output", str(out), "--model", str(tiny)], "--output needs --input"),
        (["hi", "--input", str(src), "--output", str(out)], "not both"),
        (["--input", str(src), "--field", "body", "--output", str(tmp_path / "o.txt")], "cannot tell the output"),
        (["--input", str(src), "--field", "nope", "--output", str(tmp_path / "o.npy"), "--model", str(tiny)],
         "in.jsonl:1: no field 'nope'"),
        (["--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o.npy")], "input file not found"),
        (["hi", "--field", "body", "--skip-empty"], "--field, --skip-empty: only with --input"),
        (["--input", str(src), "--field", "body", "--output", str(out)], "already exists from another run"),
        (["--input", str(src), "--field", "body", "--output", str(tmp_path / "n.npy"), "--resume"],
         "nothing to resume"),
    ]
    for args, expect in cases:
        rc = main(["encode", *args])
        _one_line_error(rc, capsys.readouterr().err, expect)
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "n.npy.parts").exists()
    # --overwrite replaces a finished output of another job
    assert main(["encode", "-i", str(src), "--field", "body", "-o", str(out), "--model", str(tiny),
                 "--output-dtype", "float16", "--overwrite"]) == 0
    assert read_manifest(manifest_path(out))["output"]["dtype"] == "float16"
    (tmp_path / "foreign.npy").write_bytes(b"not ours")
    rc = main(["encode", "-i", str(src), "--field", "body", "-o", str(tmp_path / "foreign.npy"), "--model", str(tiny)])
    _one_line_error(rc, capsys.readouterr().err, "already exists (not written by bertfast encode)")


def test_csv_blank_lines_are_no_records(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes(b'n,t\r\n0,first\r\n\r\n1,"two\r\n\r\nlines"\n2,\n\n3,last\n\n')
    import csv

    with open(p, newline="", encoding="utf-8") as f:
        want = [r["t"] for r in csv.DictReader(f)]  # what a user joining the output back counts
    assert want == ["first", "two\r\n\r\nlines", "", "last"]
    r = CorpusReader(p, field="t")
    assert list(r) == want
    n, starts = r.plan(1)
    assert n == 4 and [r.read(j, j + 1, s)[0] for j, s in enumerate(starts)] == want


def test_stopped_before_the_parts_were_removed(tmp_path, tiny, encoder):
    """A run stopped after writing the complete manifest but before removing OUTPUT.parts (a
    kill during the rmtree of many chunk files) is complete: the next run only cleans up."""
    src = tmp_path / "in.txt"
    src.write_text("a\nb\nc\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    m = encode_file(src, out, model=tiny, encoder=encoder, chunk_size=2, progress=False)
    leftover = parts_dir(out)
    leftover.mkdir()
    (leftover / "chunk-00000001.npz").write_bytes(b"half removed")
    before = out.read_bytes()
    again = encode_file(src, out, model=tiny, encoder=encoder, progress=False)
    assert again == m and out.read_bytes() == before and not leftover.exists()


def test_torchrun_plan_balances_the_ranks(tmp_path, tiny):
    """The default chunks under N processes: a multiple of N, of one size (4800 rows on 2 ranks:
    4 x 1200, not 2048 + 2752); a resumed run splits the chunks left, not all of them."""
    from bertfast.corpus import EncodeJob

    src = tmp_path / "in.txt"
    src.write_text("".join(f"{i}\n" for i in range(4800)), encoding="utf-8")
    job = EncodeJob(src, tmp_path / "out.npy", model=tiny, world_size=2)
    m = job.prepare()
    assert m["chunk_size"] == 1200 and m["n_chunks"] == 4
    assert [len(job.rank_chunks(r, 2)) for r in range(2)] == [2, 2]
    assert [job.rank_chunks(r, 3, todo=[1, 2, 3]) for r in range(3)] == [[1], [2], [3]]
    for world, rows, chunks in [(2, 400, 2), (3, 10, 3), (2, 1, 1), (8, 100_000, 56)]:
        src.write_text("x\n" * rows, encoding="utf-8")
        shutil.rmtree(parts_dir(tmp_path / "out.npy"))
        m = EncodeJob(src, tmp_path / "out.npy", model=tiny, world_size=world).prepare()
        sizes = [min(m["chunk_size"], rows - j * m["chunk_size"]) for j in range(m["n_chunks"])]
        assert m["n_chunks"] == chunks and sum(sizes) == rows and max(sizes) - min(sizes) <= chunks, (world, rows)


def test_model_fingerprint_sees_every_weight(tmp_path, tiny):
    """Another checkpoint that differs only in a late encoder layer (a fine-tune with frozen
    embeddings) is another model: a run of one is never resumed, or searched, with the other."""
    from bertfast import BertModel
    from bertfast.corpus import model_fingerprint

    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    m = BertModel.from_pretrained(tiny)
    with torch.no_grad():
        m.encoder.layer[-1].output.dense.weight.mul_(2)
    m.save_pretrained(other)
    assert model_fingerprint(other)["sha256"] != model_fingerprint(tiny)["sha256"]
    assert model_fingerprint(tmp_path / ".." / tmp_path.name / "other")["sha256"] == model_fingerprint(other)["sha256"]


def test_stopped_while_assembling(tmp_path, tiny, encoder):
    """A run stopped while assembling OUTPUT (every chunk written; OUTPUT's temporary file half
    written, or OUTPUT renamed into place but no complete manifest yet) resumes by assembling
    again, and the temporary file of the stopped run does not stay behind."""
    from bertfast.corpus import EncodeJob

    src = tmp_path / "in.txt"
    src.write_text("a\n\nb\nc\n", encoding="utf-8")
    ref = tmp_path / "ref.npy"
    encode_file(src, ref, model=tiny, encoder=encoder, chunk_size=2, progress=False)
    out = tmp_path / "out.npy"
    job = EncodeJob(src, out, model=tiny, chunk_size=2)
    job.prepare()
    job.encode_chunks(encoder, range(2), progress=False)
    stale = tmp_path / ".out.npy.tmp-99999999"
    stale.write_bytes(b"half an output")
    out.write_bytes(b"renamed, but is it whole?")  # no OUTPUT.manifest.json: not complete
    m = encode_file(src, out, model=tiny, encoder=encoder, progress=False)
    assert m["complete"] and m["rows"] == 4 and not parts_dir(out).exists()
    np.testing.assert_array_equal(np.load(out), np.load(ref))
    assert not stale.exists()
