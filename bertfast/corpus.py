"""Corpus-scale encoding: a file of texts in, a file of embeddings out.

    bertfast encode --input corpus.txt --output corpus.npy            # one process
    torchrun --nproc-per-node 4 -m bertfast encode --input ... --output ...   # one rank per GPU / CPU worker
    bertfast encode --input corpus.parquet --field text --output emb.parquet --ray   # a Ray cluster

    >>> from bertfast.corpus import encode_file
    >>> manifest = encode_file("corpus.txt", "corpus.npy", model="minilm")

**Rows.**  The input is read by :mod:`bertfast.data` (the rules every bertfast command shares):
row ``i`` of the output is row ``i`` of the input, always: line ``i`` of a ``.txt`` file (split
on ``\\n`` only, a trailing ``\\r`` dropped, so row numbers are those of ``wc -l`` / ``sed -n``),
line ``i`` of a ``.jsonl`` file, record ``i`` of a ``.csv`` / ``.tsv`` (after the header; blank
lines are no records, as for ``csv.DictReader`` and ``pandas.read_csv``) or of a ``.parquet``
file.  The text is the ``field`` column / key, by default ``text`` when there is one (else the
only column).  A blank text (empty or whitespace only; a JSON/parquet null or a missing CSV cell
too) is encoded like any other: it gets the model's embedding of the empty sequence ``[CLS] [SEP]``
(what ``SentenceEncoder.encode("")`` gives, as sentence-transformers does).  ``skip_empty=True``
(``--skip-empty``) leaves blank rows out instead; the manifest lists them (``skipped_rows``)
and the ``id`` column of .parquet/.jsonl outputs keeps each vector's input row.

**Files.**  While it runs, the work lives in ``OUTPUT.parts/``: ``manifest.json`` (model,
settings, input path + size + mtime + sha256, chunk size, rows done in whole chunks) and one
``chunk-J.npz`` per ``chunk_size`` input rows (ids + vectors), each written to a temporary name
and renamed into place, so a chunk file is whole or absent.  A chunk is encoded in slices of
``PROGRESS_ROWS`` (256) rows; while it is, the slices encoded since the last save are saved as
``slice-J-POS.npz`` (its rows from position POS: ids + fp32 vectors, written the same way) once
``SLICE_SAVE_SECONDS`` have passed since the chunk began or the last save, and removed when the
chunk file is written.  So a kill loses at most about that long plus one slice of work, not a
chunk: a resumed run starts each unfinished chunk after its saved slices (a slice file that does
not continue them, e.g. with other ids, is ignored and removed).  Older bertfast versions,
which ignore slice files, resume such a directory from its chunk files.

When every chunk is there, the output is assembled (chunk by chunk, so memory stays bounded by
one chunk whatever the corpus size) into a temporary file, renamed to OUTPUT with
``os.replace``, and ``OUTPUT.manifest.json`` is written with ``"complete": true``; then the
parts directory is removed.  A run that stops (a kill, a crash, Ctrl-C) leaves the parts
directory; running the same command again resumes from the chunks and slices already written
(``resume=True`` / ``--resume`` insists on it).  A parts directory from a different run (another
model, input, setting) is refused with a one-line error.

One run writes an output at a time: a run holds ``.OUTPUT.lock`` (``flock``, released with its
process however it ends), and a second run on the same output stops at once with "another run
is writing OUTPUT".  Progress (:class:`bertfast.progress.Progress`) goes to stderr every 256
rows: redrawn in place on a terminal; in a log, a plain line every tenth of the work and at least
every 30 s.

Chunks, not processes, are the unit of work: under torchrun each rank encodes a contiguous range
of chunks (so the merged output keeps the input order) and rank 0 assembles after a barrier; with
Ray, the chunks are rows of a Ray dataset (bertfast.distributed).  A run may be resumed with a
different number of processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from bertfast.data import DEFAULT_COLUMN, FORMATS, DataFile, need_pyarrow, pick_column
from bertfast.progress import Progress

__all__ = [
    "INPUT_FORMATS", "OUTPUT_FORMATS", "OUTPUT_DTYPES", "CorpusReader", "EncodeJob", "encode_file",
    "split_lines", "read_manifest", "manifest_path", "model_fingerprint", "file_fingerprint",
]

INPUT_FORMATS = FORMATS
OUTPUT_FORMATS = ("npy", "parquet", "jsonl")
OUTPUT_DTYPES = ("float32", "float16")
MANIFEST_VERSION = 1
DEFAULT_CHUNK_SIZE = 2048
PROGRESS_ROWS = 256  # rows encoded between two progress updates (a chunk is encoded in such slices)
# a chunk's slices are saved (slice-J-POS.npz) once this many seconds have passed since the chunk
# began or since the last save: a kill loses at most about this long plus one slice of work
SLICE_SAVE_SECONDS = 1.0
EMBEDDING_COLUMN = "embedding"
# the settings that must be equal for a run to resume another one (the rest, e.g. batch size,
# device or backend, may change between the two)
_RUN_KEYS = ("model", "model_dtype", "max_length", "normalize", "input", "output", "skip_empty", "chunk_size")


def _is_blank(text: str) -> bool:
    return not text.strip()


def split_lines(data: str) -> List[str]:
    """``data`` split into lines as :class:`CorpusReader` splits a .txt file: on ``\\n`` only,
    one trailing ``\\r`` dropped from each line, no empty last line for a final ``\\n``.  (Not
    ``str.splitlines``, which also splits on form feeds, ``\\x1c`` and U+2028, so its line numbers
    differ from an editor's.)"""
    if not data:
        return []
    lines = data.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


_OUTPUT_SUFFIXES = {".npy": "npy", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
                    ".json": "jsonl"}


def _output_format(path: Union[str, os.PathLike]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _OUTPUT_SUFFIXES:
        raise ValueError(f"{path}: cannot tell the output format from the suffix {suffix or '(none)'!r} "
                         f"(expected one of {', '.join('.' + f for f in OUTPUT_FORMATS)})")
    return _OUTPUT_SUFFIXES[suffix]


# ---------------------------------------------------------------------------- fingerprints
def file_fingerprint(path: Union[str, os.PathLike], hash_contents: bool = True) -> dict:
    """{"path", "size", "mtime_ns", "sha256"} of a file (sha256 of its bytes, read in 8 MiB blocks)."""
    p = Path(path)
    st = p.stat()
    out = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if hash_contents:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        out["sha256"] = h.hexdigest()
    return out


def model_fingerprint(model: Union[str, os.PathLike]) -> dict:
    """{"name", "path", "sha256"} identifying a checkpoint: sha256 of config.json and of the whole
    weights file, so two checkpoints with the same config but other weights differ, wherever they
    differ (a part of the file would miss e.g. a fine-tune with frozen embeddings).  Loading the
    model reads the whole file anyway; this is one more read, from the page cache."""
    from bertfast.loading import CONFIG_NAME, find_weights_file, resolve_model_path

    d = Path(resolve_model_path(model))
    h = hashlib.sha256()
    h.update((d / CONFIG_NAME).read_bytes())
    h.update(file_fingerprint(find_weights_file(d))["sha256"].encode())
    return {"name": str(model), "path": str(d.resolve()), "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------- reading
class CorpusReader:
    """The texts of an input file, row by row, in order, read by :class:`bertfast.data.DataFile`
    (its rules: rows, headers, empty cells, duplicate keys, line numbers in errors).  ``field``
    names the JSON key / CSV, TSV or parquet column holding the text; left out, it is ``text``
    when there is one, else the only column (.jsonl lines may also be plain JSON strings).  A null
    text (JSON / parquet null, a missing CSV cell) is the empty text.

    ``plan(chunk_size)`` makes one pass over the file and returns the row count and, for each
    chunk, where it starts (a byte offset, or a row index for parquet), so ``read(lo, hi, start)``
    can read one chunk without reading what comes before it (torchrun ranks and Ray workers)."""

    def __init__(self, path: Union[str, os.PathLike], field: Optional[str] = None, fmt: Optional[str] = None):
        self.file = DataFile(path, fmt)
        self.path, self.format = self.file.path, self.file.format
        if self.format == "txt" and field is not None:
            raise ValueError(f"--field {field!r} is for .jsonl/.csv/.tsv/.parquet input; {path} is a text file "
                             f"(one text per line)")
        if self.file.columns is not None:
            field = pick_column(self.path, self.file.columns, field, self.format.upper())
        elif self.format == "jsonl" and field is None:
            first = next(iter(self.file.rows()), None)
            if first is not None and isinstance(first.value, dict):
                keys = ", ".join(map(str, first.value))
                if DEFAULT_COLUMN not in first.value:
                    raise ValueError(f"{self.file.where(first.line)}: a JSON object without a {DEFAULT_COLUMN!r} "
                                     f"key: give --field (its keys: {keys})")
                field = DEFAULT_COLUMN
        self.field = field
        if self.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            t = pq.ParquetFile(self.path).schema_arrow.field(self.field).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise ValueError(f"{self.path}: column {self.field!r} is {t}, not a string column")

    def _text(self, row) -> str:
        value = row.value
        if self.format == "txt":
            return value
        if self.format == "jsonl":
            where = self.file.where(row.line, row.pos)
            if isinstance(value, dict):
                if self.field is None:
                    raise ValueError(f"{where}: a JSON object, but the first line is a plain string (its keys: "
                                     f"{', '.join(map(str, value))})")
                if self.field not in value:
                    raise ValueError(f"{where}: no field {self.field!r} (its keys: {', '.join(map(str, value))})")
                value = value[self.field]
            elif self.field is not None:
                raise ValueError(f"{where}: a JSON {type(value).__name__}, not an object with field {self.field!r}")
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: the text{' field ' + repr(self.field) if self.field else ''} is a JSON "
                                 f"{type(value).__name__}, not a string")
        else:
            value = value[self.field]
        return "" if value is None else value

    def _rows(self, start: Optional[int] = None) -> Iterator[Tuple[int, str]]:
        """(position of the row, text) from position ``start`` (a byte offset; a row for parquet)."""
        for row in self.file.rows(start, columns=[self.field] if self.format == "parquet" else None):
            yield row.pos, self._text(row)

    # -- public API
    def __iter__(self) -> Iterator[str]:
        for _, text in self._rows():
            yield text

    def plan(self, chunk_size: int) -> Tuple[int, List[int]]:
        """(number of rows, start position of each chunk of ``chunk_size`` rows); every row is
        parsed once, so a bad row fails here, before any model is loaded."""
        if self.format == "parquet":
            n = self.file.count()
            return n, list(range(0, n, chunk_size))
        starts: List[int] = []
        n = 0
        for pos, _ in self._rows():
            if n % chunk_size == 0:
                starts.append(pos)
            n += 1
        return n, starts

    def read(self, lo: int, hi: int, start: int) -> List[str]:
        """Texts of rows [lo, hi), the first of which begins at position ``start`` (from plan())."""
        out: List[str] = []
        for _, text in self._rows(start):
            if len(out) >= hi - lo:
                break
            out.append(text)
        if len(out) != hi - lo:
            raise ValueError(f"{self.path} changed while it was read: expected rows {lo}..{hi - 1}, "
                             f"found {len(out)} of them")
        return out


# ---------------------------------------------------------------------------- small file helpers
def _tmp_name(path: Path, pid: Union[int, str, None] = None) -> Path:
    """The temporary name ``path`` is written under: ``.NAME.tmp-PID`` in the same directory
    (``pid="*"``: the glob of every process's)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; when the block ends, rename it onto ``path``
    (os.replace), or remove it when the block raised: ``path`` is the old file or the whole new one."""
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` with ``write(file)`` through a temporary name, fsync, then os.replace."""
    with _replacing(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda f: json.dump(data, f, indent=1, sort_keys=True), mode="w")


def lock_path(output: Union[str, os.PathLike]) -> Path:
    """The lock file of a run writing ``output``: ``.NAME.lock`` beside it."""
    p = Path(output)
    return p.with_name(f".{p.name}.lock")


@contextlib.contextmanager
def output_lock(output: Union[str, os.PathLike]) -> Iterator[None]:
    """Hold the lock of ``output`` for the block: one run writes an output at a time.  A second run
    is refused at once with a one-line error.  The lock is the operating system's (``flock``), so
    it goes with its process however that ends (a killed run can be resumed right away); the lock
    file is removed when the block ends.  Without ``fcntl`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path = lock_path(output)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"another run is writing {output} (it holds {path}); wait for it to finish or "
                             f"stop it, then run this again") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the previous holder finished and removed it
            same = False
        if same:
            break
        os.close(fd)  # locked a file that is gone: lock the new one
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a waiting run then sees a new file
        os.close(fd)


def manifest_path(output: Union[str, os.PathLike]) -> Path:
    """Where the manifest of a finished output lives: ``OUTPUT.manifest.json``."""
    p = Path(output)
    return p.with_name(p.name + ".manifest.json")


def parts_dir(output: Union[str, os.PathLike]) -> Path:
    p = Path(output)
    return p.with_name(p.name + ".parts")


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    """A manifest as a dict; ValueError naming the file when it is missing or unreadable."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest {p}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read manifest {p}: {e}") from None
    if not isinstance(data, dict) or data.get("bertfast_manifest") != MANIFEST_VERSION:
        raise ValueError(f"{p} is not a bertfast manifest (version {MANIFEST_VERSION})")
    return data


def _first_difference(old: dict, new: dict) -> Optional[str]:
    """The first setting of ``new`` that ``old`` does not share, as text; None when they agree.
    Paths, mtimes and names are not compared: a moved, copied or touched file with the same
    bytes (sha256) is the same input, and a renamed checkpoint the same model."""
    for key in _RUN_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(b):
                if k in ("mtime_ns", "name", "path"):
                    continue
                if a.get(k) != b.get(k):
                    return f"{key}.{k}: {a.get(k)!r} before, {b.get(k)!r} now"
        elif a != b:
            return f"{key}: {a!r} before, {b!r} now"
    return None


def _chunk_name(j: int) -> str:
    return f"chunk-{j:08d}.npz"


def _slice_name(j: int, pos: int) -> str:
    """The file of chunk ``j``'s rows from position ``pos`` (after blank rows are left out)."""
    return f"slice-{j:08d}-{pos:08d}.npz"


def _read_slice(path: Path) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of a slice file, None when it cannot be read."""
    try:
        with np.load(path) as z:
            return z["ids"], z["emb"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


# ---------------------------------------------------------------------------- the job
class EncodeJob:
    """One ``encode --input --output`` run: the plan (rows, chunks), the manifest, the chunk
    files and the final assembly.  :func:`encode_file` drives it in one process; torchrun
    ranks and Ray drive the same pieces (bertfast.distributed)."""

    def __init__(self, input, output, *, model="minilm", field=None, input_format=None, dtype=None,
                 max_length=None, normalize=True, output_dtype="float32", skip_empty=False, chunk_size=None,
                 world_size: int = 1):
        import torch

        from bertfast.sentence import parse_dtype
        from bertfast.kernels._common import dtype_name

        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"unknown output dtype {output_dtype!r} (choose from {', '.join(OUTPUT_DTYPES)})")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.output = Path(output)
        self.output_format = _output_format(output)
        if self.output_format == "parquet":
            need_pyarrow("parquet output")
        if self.output.is_dir():
            raise IsADirectoryError(f"--output {output} is a directory; give a file name ending in "
                                    f"{', '.join('.' + f for f in OUTPUT_FORMATS)}")
        if not self.output.parent.is_dir():
            raise FileNotFoundError(f"--output {output}: directory {self.output.parent} does not exist")
        self.reader = CorpusReader(input, field=field, fmt=input_format)
        if self.reader.path.resolve() == self.output.resolve():
            raise ValueError(f"--output {output} is the input file")
        torch_dtype = parse_dtype(dtype)
        self.model = model
        self.settings = {
            "model": model_fingerprint(model),
            "model_dtype": dtype_name(torch_dtype or torch.float32),
            "max_length": max_length,
            "normalize": bool(normalize),
            "output": {"format": self.output_format, "dtype": output_dtype},
            "skip_empty": bool(skip_empty),
        }
        self.requested_chunk_size = chunk_size
        self.world_size = world_size
        self.parts = parts_dir(output)
        self.final_manifest = manifest_path(output)
        self.manifest: Optional[dict] = None
        self._done: Optional[set] = None  # record_progress: chunks on disk, listed once, then kept up to date

    # -- preparing (one process: rank 0)
    def prepare(self, resume: Optional[bool] = None, overwrite: bool = False) -> dict:
        """Check the input, the output and any earlier run; create OUTPUT.parts/manifest.json.
        Returns the manifest; ``manifest["complete"]`` is True when OUTPUT is already done."""
        fp = file_fingerprint(self.reader.path)
        inp = dict(fp, format=self.reader.format, field=self.reader.field)
        settings = dict(self.settings, input=inp)
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.final_manifest.unlink(missing_ok=True)
        # a finished run of the same job: nothing to do
        if self.final_manifest.exists() and self.output.exists():
            old = read_manifest(self.final_manifest)
            diff = _first_difference(old, dict(settings, chunk_size=old.get("chunk_size")))
            if diff is None and old.get("complete"):
                if self.requested_chunk_size not in (None, old.get("chunk_size")):
                    diff = f"chunk_size: {old.get('chunk_size')} before, {self.requested_chunk_size} now"
                else:
                    # the complete manifest is written after OUTPUT is in place and before the parts
                    # directory is removed: a run stopped in between left parts that are no longer needed
                    shutil.rmtree(self.parts, ignore_errors=True)
                    self.manifest = old
                    return old
            raise ValueError(f"{self.output} already exists from another run ({diff or 'incomplete'}); "
                             f"use --overwrite to replace it")
        if self.output.exists() and not self.parts.exists() and not overwrite:
            raise ValueError(f"{self.output} already exists (not written by bertfast encode); use --overwrite "
                             f"to replace it")
        old = None
        if self.parts.exists():
            try:
                old = read_manifest(self.parts / "manifest.json")
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"{self.parts} is not a resumable run ({e}); use --overwrite to start again")
            chunk = self.requested_chunk_size or old.get("chunk_size")
            diff = _first_difference(old, dict(settings, chunk_size=chunk))
            if diff is not None:
                raise ValueError(f"{self.parts} is an interrupted run with other settings ({diff}); run the same "
                                 f"command to resume it, or use --overwrite to start again")
        elif resume:
            raise ValueError(f"--resume: nothing to resume ({self.parts} does not exist)")
        if old is not None:
            manifest = old
        else:
            chunk = self.requested_chunk_size
            if chunk is None:
                chunk = DEFAULT_CHUNK_SIZE
                if self.world_size > 1:
                    # as many chunks as DEFAULT_CHUNK_SIZE gives, rounded up to a multiple of the
                    # processes, all of one size: each process gets the same number of rows (4800 rows
                    # on 2 processes: 4 x 1200, not 2048 vs 2048 + 704), a small input a chunk each
                    n = sum(1 for _ in self.reader)
                    k = -(-max(n, 1) // chunk)
                    k = -(-k // self.world_size) * self.world_size
                    chunk = max(1, -(-n // k))
            rows, starts = self.reader.plan(chunk)
            if rows == 0:
                raise ValueError(f"{self.reader.path} has no rows to encode")
            manifest = dict(settings, bertfast_manifest=MANIFEST_VERSION, complete=False, chunk_size=chunk,
                            input_rows=rows, chunk_starts=starts, n_chunks=len(starts), rows_done=0,
                            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.parts.mkdir(exist_ok=False)
            _write_json(self.parts / "manifest.json", manifest)
        self.manifest = manifest
        return manifest

    def attach(self, manifest: dict) -> None:
        """Use a manifest prepared by another process (torchrun ranks other than 0)."""
        self.manifest = manifest

    # -- chunks
    def chunk_range(self, j: int) -> Tuple[int, int]:
        cs, n = self.manifest["chunk_size"], self.manifest["input_rows"]
        return j * cs, min((j + 1) * cs, n)

    def chunk_rows(self, chunks: Sequence[int]) -> int:
        """The number of input rows in ``chunks``."""
        return sum(hi - lo for lo, hi in map(self.chunk_range, chunks))

    def done_chunks(self) -> set:
        """Chunks whose file is in the parts directory (each file is whole: written by rename)."""
        done = set()
        for p in self.parts.glob("chunk-*.npz"):
            try:
                done.add(int(p.name[6:-4]))
            except ValueError:
                pass
        return done

    def chunks_left(self, chunks: Optional[Sequence[int]] = None) -> List[int]:
        """The chunks of ``chunks`` (default: every chunk) whose file is not written yet, in order;
        the parts directory is listed once."""
        done = self.done_chunks()
        return [j for j in (range(self.manifest["n_chunks"]) if chunks is None else chunks) if j not in done]

    def rank_chunks(self, rank: int, world_size: int, todo: Optional[Sequence[int]] = None) -> Sequence[int]:
        """The chunks rank ``rank`` of ``world_size`` encodes: a contiguous share of ``todo``
        (default: every chunk).  Rank 0 lists the chunks still to do once and sends the list to
        every rank, so that a resumed run splits what is left evenly (each rank listing the files
        itself would race with the chunks the others are writing)."""
        todo = list(range(self.manifest["n_chunks"])) if todo is None else list(todo)
        n = len(todo)
        return todo[rank * n // world_size:(rank + 1) * n // world_size]

    def chunk_texts(self, j: int) -> Tuple[np.ndarray, List[str]]:
        """(input row ids, texts) of chunk ``j``, blank rows left out when skip_empty."""
        lo, hi = self.chunk_range(j)
        texts = self.reader.read(lo, hi, self.manifest["chunk_starts"][j])
        ids = np.arange(lo, hi, dtype=np.int64)
        if self.manifest["skip_empty"]:
            keep = [i for i, t in enumerate(texts) if not _is_blank(t)]
            ids, texts = ids[keep], [texts[i] for i in keep]
        return ids, texts

    def write_chunk(self, j: int, ids: np.ndarray, emb: np.ndarray) -> None:
        """Save chunk ``j`` (ids (n,), vectors (n, D) cast to the output dtype) atomically."""
        dim = self.manifest.get("embedding_dim")
        if emb.ndim != 2 or emb.shape[0] != len(ids) or (dim is not None and len(ids) and emb.shape[1] != dim):
            raise ValueError(f"chunk {j}: {len(ids)} ids but embeddings of shape {emb.shape}")
        emb = np.ascontiguousarray(emb, dtype=self.manifest["output"]["dtype"])
        _atomic_write(self.parts / _chunk_name(j), lambda f: np.savez(f, ids=ids, emb=emb))
        if self._done is not None:
            self._done.add(j)

    def write_slice(self, j: int, pos: int, ids: np.ndarray, emb: np.ndarray) -> Path:
        """Save rows ``pos``.. of chunk ``j`` (ids (n,), fp32 vectors (n, D)) atomically."""
        path = self.parts / _slice_name(j, pos)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        _atomic_write(path, lambda f: np.savez(f, ids=ids, emb=emb))
        return path

    def saved_slices(self, chunks: Sequence[int]) -> Dict[int, Tuple[np.ndarray, List[str], int, List[np.ndarray],
                                                                      List[Path]]]:
        """What a stopped run saved of the unfinished chunks ``chunks``: {j: (ids, texts, rows
        covered, [fp32 vectors of those rows], [their slice files])} for each chunk with slice
        files.  The slices count from the chunk's first row on, each where the last one ended,
        with the ids of those rows; a slice file that does not continue them is removed."""
        found: Dict[int, List[Tuple[int, Path]]] = {}
        wanted = set(chunks)
        for p in self.parts.glob("slice-*.npz"):
            try:
                j, pos = map(int, p.name[len("slice-"):-len(".npz")].split("-"))
            except ValueError:
                continue
            if j in wanted:
                found.setdefault(j, []).append((pos, p))
        out = {}
        dim = self.manifest.get("embedding_dim")
        for j, files in sorted(found.items()):
            ids, texts = self.chunk_texts(j)
            covered, parts, paths = 0, [], []
            for pos, p in sorted(files):
                got = _read_slice(p) if pos == covered else None
                if got is not None:
                    sid, emb = got
                    n = len(sid)
                    if (n == 0 or emb.dtype != np.float32 or emb.shape != (n, dim)
                            or not np.array_equal(sid, ids[covered:covered + n])):
                        got = None
                if got is None:
                    p.unlink(missing_ok=True)
                    continue
                covered += n
                parts.append(emb)
                paths.append(p)
            out[j] = (ids, texts, covered, parts, paths)
        return out

    def encode_chunks(self, encoder, chunks: Sequence[int], *, batch_size: int = 32, progress: Optional[bool] = None,
                      desc: Optional[str] = None, after_chunk: Optional[Callable[[], None]] = None,
                      kill_after: Optional[int] = None) -> int:
        """Encode the chunks of ``chunks`` not yet on disk with ``encoder`` (a SentenceEncoder);
        returns the number of input rows in the chunks it wrote.  Each chunk is encoded in slices of
        PROGRESS_ROWS rows, starting after the slices a stopped run saved of it; the slices are
        saved every SLICE_SAVE_SECONDS.  Progress (rows/s) on stderr.  ``after_chunk`` runs after
        each chunk file is written; ``kill_after`` (tests only) SIGKILLs this process after that
        many chunks, a real interruption between two chunks."""
        self._note_encoder(encoder)
        dim = self.manifest["embedding_dim"]
        todo = self.chunks_left(chunks)
        saved = self.saved_slices(todo)
        total = self.chunk_rows(chunks)
        done = total - self.chunk_rows(todo) + sum(covered for _, _, covered, _, _ in saved.values())
        if done and todo and progress is not False:
            print(f"resuming: {done} of {total} rows already encoded", file=sys.stderr)
        bar = Progress(total, desc or f"encoding {self.reader.path.name}", unit="rows", done=done, show=progress)
        encoded = 0
        try:
            for k, j in enumerate(todo):
                ids, texts, covered, parts, paths = saved.pop(j, None) or (*self.chunk_texts(j), 0, [], [])
                # in slices, for the progress line and the saved work: each text's vector does not
                # depend on the others in its call (padding-free path), so slices give the vectors of one call
                fresh: List[np.ndarray] = []  # vectors of the rows from ``covered`` on, not saved yet
                last_save = time.perf_counter()
                for a in range(covered, len(texts), PROGRESS_ROWS):
                    fresh.append(encoder.encode(texts[a:a + PROGRESS_ROWS], batch_size=batch_size,
                                                normalize=self.manifest["normalize"], show_progress=False,
                                                convert_to_numpy=True))  # (n, D) float32
                    bar.update(len(fresh[-1]))
                    end = a + len(fresh[-1])
                    if end < len(texts) and time.perf_counter() - last_save >= SLICE_SAVE_SECONDS:
                        block = np.concatenate(fresh)
                        paths.append(self.write_slice(j, covered, ids[covered:end], block))
                        parts.append(block)
                        covered, fresh, last_save = end, [], time.perf_counter()
                self.write_chunk(j, ids, np.concatenate([np.zeros((0, dim), dtype=np.float32)] + parts + fresh))
                for p in paths:  # the chunk file holds them now (a stop before this: ignored, j is done)
                    p.unlink(missing_ok=True)
                rows = self.chunk_rows([j])
                encoded += rows
                bar.update(rows - len(texts))  # the blank rows skipped
                if after_chunk is not None:
                    after_chunk()
                if kill_after is not None and k + 1 >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            bar.close()
        return encoded

    def _note_encoder(self, encoder) -> None:
        self.manifest["embedding_dim"] = int(encoder.embedding_dim)
        self.manifest["resolved_max_length"] = int(encoder.max_length)

    def record_progress(self) -> None:
        """Rewrite the parts manifest with the rows done so far (one process, between chunks; the
        directory is listed on the first call only: once per chunk would be quadratic)."""
        if self._done is None:
            self._done = self.done_chunks()
        self.manifest["rows_done"] = self.chunk_rows(self._done)
        _write_json(self.parts / "manifest.json", self.manifest)

    # -- the end
    def finalize(self) -> dict:
        """Assemble the chunks into OUTPUT (temporary name + os.replace), write the complete
        manifest, remove the parts directory.  Refuses when a chunk is missing."""
        m = self.manifest
        missing = self.chunks_left()
        if missing:
            raise ValueError(f"{self.parts}: {len(missing)} chunk(s) missing (first: {missing[0]}); run the same "
                             f"command again to encode them")
        chunks = [self.parts / _chunk_name(j) for j in range(m["n_chunks"])]
        counts, dim = [], None
        for p in chunks:  # the ids only (np.load of an .npz reads an array when it is indexed)
            with np.load(p) as z:
                counts.append(len(z["ids"]))
                if dim is None and len(z["ids"]):
                    dim = z["emb"].shape[1]
        rows = sum(counts)
        if dim is None:
            dim = m.get("embedding_dim")
        if rows == 0 or dim is None:
            raise ValueError(f"{self.reader.path}: every row is blank; nothing was encoded (--skip-empty)")
        dtype = np.dtype(m["output"]["dtype"])
        fmt = m["output"]["format"]
        for stale in self.output.parent.glob(_tmp_name(self.output, "*").name):  # a run stopped while assembling
            stale.unlink(missing_ok=True)
        skipped: List[int] = []
        with _replacing(self.output) as tmp:
            writer = _OutputWriter(fmt, tmp, rows, dim, dtype)
            for j, p in enumerate(chunks):
                with np.load(p) as z:
                    ids, emb = z["ids"], z["emb"]
                    writer.write(ids, emb.reshape(len(ids), dim))
                    if m["skip_empty"]:
                        skipped.extend(_gaps(ids, self.chunk_range(j)))
            writer.close()
        m.update(complete=True, rows=rows, rows_done=m["input_rows"], embedding_dim=int(dim), skipped_rows=skipped,
                 output=dict(m["output"], path=str(self.output.resolve()), size=self.output.stat().st_size),
                 finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        m.pop("chunk_starts", None)
        _write_json(self.final_manifest, m)
        shutil.rmtree(self.parts, ignore_errors=True)
        return m


def _gaps(ids: np.ndarray, rng: Tuple[int, int]) -> List[int]:
    """Rows of [lo, hi) not in ids."""
    present = np.zeros(rng[1] - rng[0], dtype=bool)
    present[ids - rng[0]] = True
    return (np.nonzero(~present)[0] + rng[0]).tolist()


class _OutputWriter:
    """Writes (ids, vectors) blocks, in order, to one output file of the given format."""

    def __init__(self, fmt: str, path: Path, rows: int, dim: int, dtype: np.dtype):
        self.fmt, self.path, self.dim, self.dtype = fmt, path, dim, dtype
        self.pos = 0
        if fmt == "npy":
            self.mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, dim))  # (N, D)
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            value = pa.float16() if dtype == np.float16 else pa.float32()
            self.schema = pa.schema([("id", pa.int64()), (EMBEDDING_COLUMN, pa.list_(value, dim))])
            self.pq = pq.ParquetWriter(path, self.schema)
        else:
            self.f = open(path, "w", encoding="utf-8")

    def write(self, ids: np.ndarray, emb: np.ndarray) -> None:
        n = len(ids)
        if n == 0:
            return
        if self.fmt == "npy":
            self.mm[self.pos:self.pos + n] = emb
        elif self.fmt == "parquet":
            import pyarrow as pa

            flat = pa.array(np.ascontiguousarray(emb, dtype=self.dtype).reshape(-1))
            vectors = pa.FixedSizeListArray.from_arrays(flat, self.dim)
            self.pq.write_table(pa.table([pa.array(ids, pa.int64()), vectors], schema=self.schema))
        else:
            values = emb.astype(self.dtype).tolist()
            buf = io.StringIO()
            for i, v in zip(ids.tolist(), values):
                buf.write(json.dumps({"id": i, EMBEDDING_COLUMN: v}))
                buf.write("\n")
            self.f.write(buf.getvalue())
        self.pos += n

    def close(self) -> None:
        if self.fmt == "npy":
            self.mm.flush()
            del self.mm
        elif self.fmt == "parquet":
            self.pq.close()
        else:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()


# ---------------------------------------------------------------------------- one process
def encode_file(input, output, *, model="minilm", field=None, input_format=None, device=None, dtype=None,
                max_length=None, backend=None, batch_size: int = 32, normalize: bool = True,
                output_dtype: str = "float32", skip_empty: bool = False, chunk_size: Optional[int] = None,
                resume: Optional[bool] = None, overwrite: bool = False, progress: Optional[bool] = None,
                encoder=None, _kill_after_chunks: Optional[int] = None) -> dict:
    """Encode every row of ``input`` into ``output`` (.npy / .parquet / .jsonl) in one process,
    resuming an interrupted run of the same job.  Returns the complete manifest (a dict; also in
    ``OUTPUT.manifest.json``).  ``encoder``: an already loaded SentenceEncoder of ``model``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    job = EncodeJob(input, output, model=model, field=field, input_format=input_format, dtype=dtype,
                    max_length=max_length, normalize=normalize, output_dtype=output_dtype, skip_empty=skip_empty,
                    chunk_size=chunk_size)
    with output_lock(job.output):
        manifest = job.prepare(resume=resume, overwrite=overwrite)
        if manifest.get("complete"):
            return manifest
        if encoder is None:
            from bertfast.sentence import SentenceEncoder

            encoder = SentenceEncoder(model, device=device, dtype=dtype, max_length=max_length, backend=backend)
        job.encode_chunks(encoder, range(manifest["n_chunks"]), batch_size=batch_size, progress=progress,
                          after_chunk=job.record_progress, kill_after=_kill_after_chunks)
        return job.finalize()
