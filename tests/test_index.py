"""bertfast.index: exact top-k cosine search over embedding files (.npy / .parquet / .jsonl) equals
a brute-force computation, knows its model, returns input rows and texts; ``bertfast search``."""
import importlib.util
import json
import shutil

import numpy as np
import pytest

from bertfast.cli import main
from bertfast.corpus import encode_file, manifest_path
from bertfast.index import Index

from test_corpus import _one_line_error, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = [f"a short line number {i} about subject {i % 11}" if i % 9 else "" for i in range(300)]
LINES[150] = LINES[151]  # a duplicate: a tie, broken by the lower id


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from bertfast.sentence import SentenceEncoder

    d = tmp_path_factory.mktemp("index")
    tiny = make_tiny_model(d / "tiny")
    enc = SentenceEncoder(tiny, device="cpu")
    src = d / "corpus.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    outs = {"npy": d / "emb.npy", "jsonl": d / "emb.jsonl", "raw": d / "raw.npy", "skip": d / "skip.npy"}
    encode_file(src, outs["npy"], model=tiny, encoder=enc, chunk_size=64)
    encode_file(src, outs["jsonl"], model=tiny, encoder=enc, chunk_size=64)
    encode_file(src, outs["raw"], model=tiny, encoder=enc, chunk_size=64, normalize=False)
    encode_file(src, outs["skip"], model=tiny, encoder=enc, chunk_size=64, skip_empty=True)
    if importlib.util.find_spec("pyarrow") is not None:  # parquet output needs it
        outs["parquet"] = d / "emb.parquet"
        encode_file(src, outs["parquet"], model=tiny, encoder=enc, chunk_size=64, output_dtype="float16")
    return tiny, enc, src, outs


def brute_force(vectors, ids, q, k):
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    s = v @ (q / np.linalg.norm(q))
    order = sorted(range(len(s)), key=lambda r: (-s[r], ids[r]))[:k]
    return [int(ids[r]) for r in order], s[order]


@pytest.mark.parametrize("kind", ["npy", "jsonl", "raw", "skip", "parquet"])
def test_top_k_equals_brute_force(setup, kind):
    tiny, enc, src, outs = setup
    if kind not in outs:
        pytest.skip("parquet needs pyarrow (bertfast[parquet])")
    index = Index(outs[kind], block_rows=37)  # several blocks, the last one short
    vectors = np.load(outs["raw"]).astype(np.float32)  # unnormalised: brute_force normalises
    ids = np.arange(len(LINES))
    if kind == "skip":
        keep = [i for i, t in enumerate(LINES) if t.strip()]
        vectors, ids = vectors[keep], ids[keep]
        np.testing.assert_array_equal(index.ids, keep)
    queries = ["line number 151 about subject 8", "subject 3", ""]
    qv = enc.encode(queries, convert_to_numpy=True)
    got = index.search(queries, top=7)
    atol = 2e-3 if kind == "parquet" else 1e-5  # float16 storage
    for q, hits in zip(qv, got):
        want_ids, want_s = brute_force(vectors, ids, q, 7)
        np.testing.assert_allclose([h.score for h in hits], want_s, atol=atol, rtol=0)
        if kind != "parquet":  # float16 rounding may reorder near-ties
            assert [h.id for h in hits] == want_ids
    # the duplicate line: both copies, score 1, lower id first; texts come back from the input
    hits = index.search(LINES[151], top=2)
    assert [h.id for h in hits] == [150, 151] and hits[0].text == LINES[151]
    assert hits[0].score == pytest.approx(1.0, abs=atol)
    # vectors as queries: the same as text queries
    assert [h.id for h in index.search(qv[0], top=7)] == [h.id for h in got[0]]


def test_index_refuses_what_it_cannot_answer(setup, tmp_path):
    tiny, enc, src, outs = setup
    with pytest.raises(ValueError, match="is not the model .* was encoded with"):
        Index(outs["npy"], model="minilm")
    other = make_tiny_model(tmp_path / "other", seed=99)  # same config and tokenizer, other weights
    with pytest.raises(ValueError, match="is not the model"):
        Index(outs["npy"], model=other)
    assert len(Index(outs["npy"], model=tiny)) == len(LINES)
    index = Index(outs["npy"])
    with pytest.raises(ValueError, match=r"query vectors must be \(D,\) or \(Q, D\) with D=32"):
        index.search(np.ones(5))
    with pytest.raises(ValueError, match="top must be a positive int"):
        index.search("x", top=0)
    (tmp_path / "lonely.npy").write_bytes(outs["npy"].read_bytes())
    with pytest.raises(FileNotFoundError, match="has no manifest"):
        Index(tmp_path / "lonely.npy")
    m = json.loads(manifest_path(outs["npy"]).read_text())
    (tmp_path / "lonely.npy.manifest.json").write_text(json.dumps(dict(m, complete=False)))
    with pytest.raises(ValueError, match="does not mark .* complete"):
        Index(tmp_path / "lonely.npy")


def test_search_cli_and_missing_texts(setup, tmp_path, capsys):
    tiny, enc, src, outs = setup
    assert main(["search", "--index", str(outs["npy"]), "--query", LINES[7], "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"query: {LINES[7]}" and out[1].split()[:4] == ["1.", "1.0000", "id=7", "(line"]
    assert LINES[7] in out[1] and len(out) == 4
    assert main(["search", "--index", str(outs["npy"]), "-q", "a", "-q", "b", "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["query"] for d in data] == ["a", "b"] and all(len(d["hits"]) == 2 for d in data)
    rc = main(["search", "--index", str(outs["npy"]), "--query", "x", "--model", "minilm"])
    _one_line_error(rc, capsys.readouterr().err, "is not the model")
    rc = main(["search", "--index", str(tmp_path / "none.npy"), "--query", "x"])
    _one_line_error(rc, capsys.readouterr().err, "index file not found")
    # the input changed after encoding: scores still, texts not
    moved = tmp_path / "copy.npy"
    moved.write_bytes(outs["npy"].read_bytes())
    m = json.loads(manifest_path(outs["npy"]).read_text())
    m["input"]["path"] = str(tmp_path / "gone.txt")
    (tmp_path / "copy.npy.manifest.json").write_text(json.dumps(m))
    hits = Index(moved).search(LINES[7], top=1)
    assert hits[0].id == 7 and hits[0].text is None


def test_faiss_hnsw_backend(setup):
    pytest.importorskip("faiss", reason="the ann backend needs faiss-cpu (bertfast[ann])")
    tiny, enc, src, outs = setup
    exact = Index(outs["skip"])
    approx = Index(outs["skip"], ann="faiss")
    approx.ann_path.unlink(missing_ok=True)
    queries = ["line number 151 about subject 8", "subject 3", "about subject 10"]
    got, want = approx.search(queries, top=10), exact.search(queries, top=10)
    assert approx.ann_path.is_file()  # built once, saved, reused by the next Index
    recall = np.mean([len({h.id for h in g} & {h.id for h in w}) / 10 for g, w in zip(got, want)])
    assert recall >= 0.9, recall  # 270 vectors: HNSW is (nearly) exact here
    for g, w in zip(got, want):
        by_id = {h.id: h.score for h in w}
        for h in g:  # scores are cosines, ids map to input rows (blank rows were skipped)
            if h.id in by_id:
                assert h.score == pytest.approx(by_id[h.id], abs=1e-5)
            assert LINES[h.id].strip() and h.text == LINES[h.id]
    again = Index(outs["skip"], ann="faiss")
    assert [h.id for h in again.search(queries[0], top=10)] == [h.id for h in got[0]]
    with pytest.raises(ValueError, match="unknown ann backend 'annoy'"):
        Index(outs["skip"], ann="annoy")


def test_faiss_graph_that_cannot_be_saved_still_serves(setup, monkeypatch):
    faiss = pytest.importorskip("faiss", reason="the ann backend needs faiss-cpu (bertfast[ann])")
    tiny, enc, src, outs = setup

    def refuse(index, path):  # what faiss does when it cannot open the file (e.g. a read-only directory)
        raise RuntimeError(f"Error: could not open {path} for writing")

    monkeypatch.setattr(faiss, "write_index", refuse)
    approx = Index(outs["skip"], ann="faiss")
    approx.ann_path.unlink(missing_ok=True)
    hits = approx.search("subject 3", top=5)
    assert len(hits) == 5 and not approx.ann_path.exists()
    exact = {h.id for h in Index(outs["skip"]).search("subject 3", top=5)}
    assert len({h.id for h in hits} & exact) >= 4  # approximate, as test_faiss_hnsw_backend's recall bound


def test_float16_file_scores_are_cosines_of_the_stored_vectors(setup, tmp_path):
    """Unit vectors stored as float16 are unit to ~1e-3 only: the scores are still the cosines of
    the stored vectors (to float32 rounding), so the order is brute force's."""
    tiny, enc, src, outs = setup
    out = tmp_path / "emb16.npy"
    encode_file(src, out, model=tiny, encoder=enc, chunk_size=64, output_dtype="float16")
    stored = np.load(out).astype(np.float32)
    assert np.abs(np.linalg.norm(stored, axis=1) - 1).max() > 1e-5  # else this test could not fail
    q = enc.encode("subject 3", convert_to_numpy=True)
    want_ids, want_s = brute_force(stored, np.arange(len(LINES)), q, 20)
    hits = Index(out, block_rows=50).search(q, top=20)
    np.testing.assert_allclose([h.score for h in hits], want_s, atol=1e-6, rtol=0)


def test_search_without_model_checks_the_checkpoint_at_the_manifest_path(setup, tmp_path, capsys):
    """Issue 22, item 4: a new fine-tune written into the directory the index was encoded with:
    the query model is found through the manifest and its fingerprint is checked as --model's
    is, instead of scoring with another model's vectors."""
    from bertfast.sentence import SentenceEncoder

    tiny, enc, src, outs = setup
    model_dir = make_tiny_model(tmp_path / "model")
    out = tmp_path / "emb.npy"
    encode_file(src, out, model=model_dir, encoder=SentenceEncoder(model_dir, device="cpu"), chunk_size=64)
    assert Index(out).search(LINES[7], top=1)[0].id == 7  # the same checkpoint: answers
    make_tiny_model(model_dir, seed=99)  # "a new fine-tune into the same directory": same config, other weights
    index = Index(out)  # vectors as queries need no model: still answered
    assert index.search(np.load(out)[7], top=1)[0].id == 7
    with pytest.raises(ValueError, match=r"the checkpoint at .*model changed after .*emb.npy was encoded"):
        index.search(LINES[7], top=1)
    capsys.readouterr()  # the encode's progress lines above: only the search command's output below
    rc = main(["search", "--index", str(out), "--query", LINES[7]])
    _one_line_error(rc, capsys.readouterr().err, "changed after")
    assert main(["search", "--index", str(outs["npy"]), "--query", LINES[7], "--model", str(tiny)]) == 0  # original
    capsys.readouterr()
    shutil.rmtree(model_dir)  # the checkpoint is gone
    with pytest.raises(ValueError, match=r"the model .*emb.npy was encoded with .* cannot be read any more"):
        Index(out).search("x")
