"""Exact cosine search over an embedding file written by ``bertfast encode --input --output``.

    bertfast search --index corpus.npy --query "how do I reset my password" --top 5

    >>> from bertfast import Index
    >>> index = Index("corpus.npy")                    # the model comes from corpus.npy.manifest.json
    >>> hits = index.search("how do I reset my password", top=5)
    >>> [(h.id, round(h.score, 3), h.text) for h in hits]

The file is read in blocks of ``block_rows`` rows (a memory map for .npy; parquet row batches;
JSONL lines), each block scored with one matmul against every query, and a running top-k kept:
memory stays bounded by one block whatever the corpus size, and the result is exact (ties broken
by the lower id).  ``id`` is the input row (line ``id + 1`` of a .txt input); texts are read back
from the input file named in the manifest when it is still there, unchanged.

The index knows its model from the manifest: queries given as text are encoded with it, and a
model whose config and weights are not the ones the file was encoded with is refused, whether
given as ``Index(path, model=...)`` (at once) or found at the manifest's path (when a text query
needs it: a later fine-tune into the same directory is caught); vectors of two models are not
comparable.

``Index(path, ann="faiss")`` (``pip install 'bertfast[ann]'``, faiss-cpu) answers from an HNSW
graph instead (approximate: recall below 1 on large corpora; all vectors are loaded into RAM to
build it).  The graph is built on first use and saved as ``FILE.faiss``, reused while it is newer
than FILE and has as many vectors.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

from bertfast.corpus import (EMBEDDING_COLUMN, CorpusReader, _replacing, file_fingerprint, manifest_path,
                             model_fingerprint, read_manifest)

__all__ = ["Index", "Hit", "ANN_BACKENDS", "run"]

DEFAULT_BLOCK_ROWS = 65536
ANN_BACKENDS = ("faiss",)
HNSW_M = 32          # graph degree of the faiss HNSW index
HNSW_EF_SEARCH = 128  # candidates explored per query (at least top)


@dataclass(frozen=True)
class Hit:
    """One search result: ``id`` (the input row; line id + 1 of a .txt input), ``score`` (cosine
    similarity), ``text`` (None when the input file is gone or changed)."""
    id: int
    score: float
    text: Optional[str] = None


class Index:
    """Exact top-k cosine search over ``path`` (.npy / .parquet / .jsonl from bertfast encode)."""

    def __init__(self, path: Union[str, os.PathLike], model: Union[None, str, os.PathLike] = None,
                 device=None, block_rows: int = DEFAULT_BLOCK_ROWS, ann: Optional[str] = None):
        if ann is not None and ann not in ANN_BACKENDS:
            raise ValueError(f"unknown ann backend {ann!r} (choose from {', '.join(ANN_BACKENDS)}, or None: exact)")
        if ann == "faiss" and importlib.util.find_spec("faiss") is None:
            raise ValueError("ann='faiss' needs faiss-cpu, which is not installed: pip install 'bertfast[ann]'")
        self.ann = ann
        self._ann_index = None
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"index file not found: {path}")
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
        mpath = manifest_path(self.path)
        if not mpath.is_file():
            raise FileNotFoundError(f"{path} has no manifest {mpath.name}: an index is a file written by "
                                    f"`bertfast encode --input ... --output {self.path.name}`")
        self.manifest = m = read_manifest(mpath)
        if not m.get("complete"):
            raise ValueError(f"{mpath} does not mark {path} complete; finish the encode run first")
        size = m.get("output", {}).get("size")
        if size is not None and size != self.path.stat().st_size:
            raise ValueError(f"{path} is {self.path.stat().st_size} bytes but its manifest says {size}: the file was "
                             f"changed after encoding")
        self.format = m["output"]["format"]
        self.dim = int(m["embedding_dim"])
        self.rows = int(m["rows"])
        # unit vectors stored as float16 are unit only to ~1e-3: scored as cosines, not dot products
        self.normalized = bool(m.get("normalize")) and m["output"].get("dtype", "float32") == "float32"
        self.model_info = m["model"]
        self.model = model if model is not None else self.model_info.get("path")
        self._model_given = model is not None
        self._model_checked = False
        if model is not None:
            self._check_model()  # a model named by the caller: refused at once
        self.device = device
        self.block_rows = block_rows
        self._encoder = None
        self._ids: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, rows={self.rows}, dim={self.dim}, model={self.model_info.get('name')!r})"

    # ---------------------------------------------------------------- reading
    @property
    def ids(self) -> np.ndarray:
        """(rows,) int64: the input row of each vector (equal to the vector's row unless blank rows
        were skipped)."""
        if self._ids is None:
            if self.format == "npy":
                skipped = np.asarray(self.manifest.get("skipped_rows") or [], dtype=np.int64)
                all_rows = np.arange(self.manifest["input_rows"], dtype=np.int64)
                self._ids = np.delete(all_rows, skipped) if len(skipped) else all_rows
            else:
                self._ids = np.concatenate([ids for ids, _ in self._blocks(with_vectors=False)]) \
                    if self.rows else np.zeros(0, np.int64)
            if len(self._ids) != self.rows:
                raise ValueError(f"{self.path}: {len(self._ids)} ids for {self.rows} rows")
        return self._ids

    def _blocks(self, with_vectors: bool = True) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """(ids (b,), vectors (b, D) float32 or None) blocks of the file, in order."""
        n = self.block_rows
        if self.format == "npy":
            mm = np.load(self.path, mmap_mode="r")  # (N, D), never read whole
            if mm.shape != (self.rows, self.dim):
                raise ValueError(f"{self.path}: shape {mm.shape}, the manifest says ({self.rows}, {self.dim})")
            # row r is input row r unless blank rows were skipped: then (and only then) the id list
            all_rows = not self.manifest.get("skipped_rows")
            ids = None if all_rows else self.ids
            for lo in range(0, self.rows, n):
                block_ids = np.arange(lo, min(lo + n, self.rows), dtype=np.int64) if all_rows else ids[lo:lo + n]
                yield block_ids, (np.asarray(mm[lo:lo + n], dtype=np.float32) if with_vectors else None)
        elif self.format == "parquet":
            import pyarrow.parquet as pq

            cols = ["id", EMBEDDING_COLUMN] if with_vectors else ["id"]
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=n, columns=cols):
                ids = batch.column(0).to_numpy()
                vec = None
                if with_vectors:
                    vec = batch.column(1).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                    vec = vec.reshape(len(ids), self.dim)
                yield ids, vec
        else:
            with open(self.path, encoding="utf-8") as f:
                ids, vecs = [], []
                for line_no, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                        ids.append(int(rec["id"]))
                        if with_vectors:
                            vecs.append(rec[EMBEDDING_COLUMN])
                    except (ValueError, KeyError, TypeError) as e:
                        raise ValueError(f"{self.path}: line {line_no} is not an embedding record ({e})") from None
                    if len(ids) == n:
                        yield np.asarray(ids, np.int64), (np.asarray(vecs, np.float32) if with_vectors else None)
                        ids, vecs = [], []
                if ids:
                    yield np.asarray(ids, np.int64), (np.asarray(vecs, np.float32) if with_vectors else None)

    # ---------------------------------------------------------------- queries
    def _check_model(self) -> None:
        """Refuse a query model whose fingerprint (config + weights) is not the one in the
        manifest, however it was found: given as ``model=``, or the manifest's own path, where a
        later fine-tune may have written another checkpoint since the file was encoded."""
        if self._model_checked:
            return
        where = f"{self.model_info.get('name')} at {self.model_info.get('path')}"
        given = self._model_given
        if self.model is None:
            raise ValueError(f"{manifest_path(self.path)} names no model path; pass the model {self.path} was "
                             f"encoded with as model= / --model")
        try:
            mine = model_fingerprint(self.model)
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError
            if given:
                raise
            raise ValueError(f"the model {self.path} was encoded with ({where}) cannot be read any more ({e}); "
                             f"pass that model with model= / --model") from None
        if mine["sha256"] != self.model_info.get("sha256"):
            if given:
                raise ValueError(f"model {self.model} is not the model {self.path} was encoded with ({where}); query "
                                 f"vectors of another model are not comparable")
            raise ValueError(f"the checkpoint at {self.model_info.get('path')} changed after {self.path} was encoded "
                             f"(its config or weights differ from the manifest's fingerprint): query vectors of "
                             f"another model are not comparable; re-encode, or pass the original model with "
                             f"model= / --model")
        self._model_checked = True

    def encoder(self):
        """The SentenceEncoder of the index's model (loaded on first use, after checking its
        fingerprint against the manifest), with the manifest's max_length and dtype."""
        if self._encoder is None:
            from bertfast.sentence import SentenceEncoder

            self._check_model()
            self._encoder = SentenceEncoder(self.model, device=self.device,
                                            max_length=self.manifest.get("resolved_max_length"))
        return self._encoder

    def _query_vectors(self, query) -> Tuple[np.ndarray, bool]:
        """(Q, D) float32 unit vectors, and whether a single query was given."""
        if isinstance(query, str) or (isinstance(query, (list, tuple)) and query and isinstance(query[0], str)):
            single = isinstance(query, str)
            q = self.encoder().encode([query] if single else list(query), normalize=True, convert_to_numpy=True)
        else:
            try:
                import torch

                if isinstance(query, torch.Tensor):
                    query = query.detach().float().cpu().numpy()
            except ImportError:  # pragma: no cover
                pass
            q = np.asarray(query, dtype=np.float32)
            single = q.ndim == 1
            if single:
                q = q[None]
            if q.ndim != 2 or q.shape[1] != self.dim:
                raise ValueError(f"query vectors must be (D,) or (Q, D) with D={self.dim}, got shape "
                                 f"{tuple(np.shape(query))}")
            if not np.isfinite(q).all():
                raise ValueError("query vectors hold NaN or inf")
        if len(q) == 0:
            raise ValueError("no queries given")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError("a query vector is all zeros (no direction to compare)")
        return q / norms, single

    def search(self, query, top: int = 10, texts: bool = True) -> Union[List[Hit], List[List[Hit]]]:
        """The ``top`` rows nearest each query by cosine similarity, best first.  ``query``: a
        text, a list of texts, or vectors (D,) / (Q, D).  One query gives a list of Hit; several a
        list of such lists."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive int, got {top!r}")
        q, single = self._query_vectors(query)  # (Q, D)
        k = min(top, self.rows)
        if self.ann is not None:
            hits = self._ann_search(q, k)
            if texts:
                hits = self._with_texts(hits)
            return hits[0] if single else hits
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)  # (Q, <=k)
        best_i = np.zeros((len(q), 0), dtype=np.int64)            # row ids, same shape
        for ids, vec in self._blocks():
            scores = q @ vec.T                                        # (Q, b)
            if not self.normalized:
                norms = np.linalg.norm(vec, axis=1)
                scores = scores / np.where(norms > 0, norms, 1.0)[None]
            s = np.concatenate([best_s, scores], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
            best_s, best_i = _top_k(s, i, k)
        hits = [[Hit(int(r), float(v)) for v, r in zip(ss, ii)] for ss, ii in zip(best_s, best_i)]
        if texts:
            hits = self._with_texts(hits)
        return hits[0] if single else hits

    # ---------------------------------------------------------------- approximate (faiss HNSW)
    @property
    def ann_path(self) -> Path:
        return self.path.with_name(self.path.name + ".faiss")

    def _faiss_index(self):
        """The HNSW graph over the unit vectors: loaded from FILE.faiss when it is current, else
        built (every vector in RAM, float32) and saved there (temporary name + os.replace)."""
        import faiss

        if self._ann_index is not None:
            return self._ann_index
        p = self.ann_path
        if p.is_file() and p.stat().st_mtime_ns >= self.path.stat().st_mtime_ns:
            index = faiss.read_index(str(p))
            if index.ntotal == self.rows and index.d == self.dim:
                self._ann_index = index
                return index
        index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        for _, vec in self._blocks():
            norms = np.linalg.norm(vec, axis=1, keepdims=True)
            index.add(np.ascontiguousarray(vec / np.where(norms > 0, norms, 1.0), dtype=np.float32))
        try:
            with _replacing(p) as tmp:
                faiss.write_index(index, str(tmp))
        except (OSError, RuntimeError):  # a read-only directory (faiss raises RuntimeError): the graph still
            pass  # serves this process
        self._ann_index = index
        return index

    def _ann_search(self, q: np.ndarray, k: int) -> List[List[Hit]]:
        index = self._faiss_index()
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        scores, rows = index.search(np.ascontiguousarray(q, dtype=np.float32), k)  # (Q, k) each; -1: none
        ids = self.ids
        return [[Hit(int(ids[r]), float(v)) for v, r in zip(ss, rr) if r >= 0] for ss, rr in zip(scores, rows)]

    # ---------------------------------------------------------------- texts
    def texts_available(self) -> Optional[str]:
        """None when texts can be read back from the input file; else why not."""
        inp = self.manifest.get("input", {})
        p = inp.get("path")
        if not p or not os.path.isfile(p):
            return f"the input file {p} is not there any more"
        now = file_fingerprint(p, hash_contents=False)
        if now["size"] != inp.get("size") or now["mtime_ns"] != inp.get("mtime_ns"):
            return f"the input file {p} changed after encoding"
        return None

    def _with_texts(self, hits: List[List[Hit]]) -> List[List[Hit]]:
        if self.texts_available() is not None:
            return hits
        inp = self.manifest["input"]
        want = {h.id for hs in hits for h in hs}
        found = {}
        reader = CorpusReader(inp["path"], field=inp.get("field"), fmt=inp.get("format"))
        last = max(want) if want else -1
        for row, text in enumerate(reader):  # one pass, stops after the last row wanted
            if row in want:
                found[row] = text
            if row >= last:
                break
        return [[Hit(h.id, h.score, found.get(h.id)) for h in hs] for hs in hits]


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest scores (ties: lower id first), sorted best first."""
    out_s = np.empty((len(scores), min(k, scores.shape[1])), dtype=np.float32)
    out_i = np.empty(out_s.shape, dtype=np.int64)
    for r in range(len(scores)):
        s, i = scores[r], ids[r]
        if len(s) > k:  # everything >= the k-th largest (so every tie at the boundary) stays
            kth = np.partition(s, len(s) - k)[len(s) - k]
            keep = np.nonzero(s >= kth)[0]
            s, i = s[keep], i[keep]
        order = np.lexsort((i, -s))[:k]
        out_s[r], out_i[r] = s[order], i[order]
    return out_s, out_i


# ---------------------------------------------------------------------------- CLI
def run(args) -> int:
    """``bertfast search`` with the arguments bertfast/cli/index.py parsed."""
    import sys

    from bertfast.sentence import parse_device

    if args.device is not None:
        parse_device(args.device)
    index = Index(args.index, model=args.model, device=args.device, ann=args.ann)
    results = index.search(list(args.query), top=args.top)
    if args.json:
        json.dump([{"query": q, "hits": [h.__dict__ for h in hits]} for q, hits in zip(args.query, results)],
                  sys.stdout)
        sys.stdout.write("\n")
        return 0
    why = index.texts_available()
    txt = index.manifest.get("input", {}).get("format") == "txt"
    for q, hits in zip(args.query, results):
        print(f"query: {q}")
        for rank, h in enumerate(hits, 1):
            where = f"id={h.id}" + (f" (line {h.id + 1})" if txt else "")
            text = "" if h.text is None else "  " + " ".join(h.text.split())[:100]
            print(f"  {rank:>3}. {h.score:.4f}  {where}{text}")
    if why is not None:
        print(f"(texts not shown: {why})", file=sys.stderr)
    return 0

