"""Data files, read one way everywhere: ``bertfast encode --input`` (bertfast.corpus, Ray and
torchrun included), ``bertfast finetune`` (bertfast.train) and the search index read their
.txt / .jsonl / .csv / .tsv / .parquet files through :class:`DataFile`.

The rules, the same for every command:

* **Format** from the suffix: ``.txt`` / ``.text`` (lines), ``.jsonl`` / ``.ndjson`` / ``.json``
  (one JSON value a line), ``.csv``, ``.tsv`` (a table with a header row), ``.parquet`` / ``.pq``.
* **Text** is UTF-8; a byte order mark at the start of the file is dropped; anything else is
  refused naming the line.
* **.txt**: every line is a row (split on ``\\n`` only, one trailing ``\\r`` dropped; so row
  numbers are those of ``wc -l`` / ``sed -n``); a blank line is a row whose text is empty.
* **.jsonl**: every line is a row holding one JSON value; a blank line is refused (row i stays
  line i); an object naming a key twice is refused (JSON parsers would keep the last silently).
* **.csv / .tsv**: the first row names the columns, each name once; every following record is a
  row (a quoted cell may span lines; a blank line is no record, as ``csv.DictReader`` and
  ``pandas.read_csv`` count them); an empty cell is the empty string; a record with more cells
  than the header is refused, one with fewer has null (None) for the missing cells; malformed
  quoting (a quote never closed, text after a closing quote) is refused.
* **.parquet**: the file's columns; a null cell is None.
* **null** (JSON null, a parquet null, a missing CSV cell) is None: never the word "None"; each
  reader says what it means for its field (encode: an empty text; finetune: refused).
* **The text column** (:func:`pick_column`): the one named by ``--field`` / ``--*-field``; else
  ``text`` when the file has it; else the only column; else an error listing the columns.
* **Errors**: one-line ``ValueError``\\ s starting ``PATH:LINE:`` (parquet: ``PATH: row N:``).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Union

__all__ = ["FORMATS", "SUFFIXES", "DataFile", "Row", "format_of", "pick_column", "need_pyarrow", "DEFAULT_COLUMN"]

FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")
SUFFIXES = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
            ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_COLUMN = "text"
_PARQUET_SLICE = 4096  # parquet rows converted to Python at a time
_BOM = b"\xef\xbb\xbf"


class Row(NamedTuple):
    """One row: ``pos`` where it starts (a byte offset; the row index for parquet, which
    :meth:`DataFile.rows` takes back as ``start``), ``line`` its first line (1-based; the row
    number for parquet; None when reading started at a byte offset whose line is unknown), and
    ``value``: the line's text (.txt), its JSON value (.jsonl) or {column: cell} (tables)."""
    pos: int
    line: Optional[int]
    value: Any


def format_of(path: Union[str, os.PathLike], fmt: Optional[str] = None, allowed: Sequence[str] = FORMATS,
              what: str = "input") -> str:
    """The format of ``path``: ``fmt`` when given (one of ``allowed``), else from its suffix."""
    if fmt is not None:
        fmt = {"json": "jsonl", "ndjson": "jsonl"}.get(fmt, fmt)
        if fmt not in allowed:
            raise ValueError(f"unknown {what} format {fmt!r} (choose from {', '.join(allowed)})")
        return fmt
    suffix = Path(path).suffix.lower()
    found = SUFFIXES.get(suffix)
    if found not in allowed:
        raise ValueError(f"{path}: cannot tell the {what} format from the suffix {suffix or '(none)'!r} "
                         f"(expected one of {', '.join(s for s, f in SUFFIXES.items() if f in allowed)})")
    return found


def need_pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(f"{what} needs pyarrow, which is not installed: pip install 'bertfast[parquet]'") from None
    return pyarrow


def pick_column(path, columns: Sequence[str], field: Optional[str], kind: str, flag: str = "--field") -> str:
    """The column holding the text: ``field`` when given, else ``text`` when there is one, else the
    only column; a one-line error listing the columns otherwise."""
    names = ", ".join(map(str, columns)) or "none"
    if field is not None:
        if field not in columns:
            raise ValueError(f"{path}: no column {field!r} (columns: {names})")
        return field
    if DEFAULT_COLUMN in columns:
        return DEFAULT_COLUMN
    if len(columns) == 1:
        return columns[0]
    raise ValueError(f"{path}: give {flag}, the {kind} column holding the text (columns: {names})")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = v
    return obj


class DataFile:
    """One data file, read row by row in order (see the module docstring for the rules).

    ``columns``: the header of a .csv / .tsv, the schema of a .parquet file, None for .txt /
    .jsonl.  ``rows(start)`` iterates from a position an earlier pass returned (``Row.pos``),
    so a chunk of a large file is read without reading what comes before it."""

    def __init__(self, path: Union[str, os.PathLike], fmt: Optional[str] = None, what: str = "input"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{what} file not found: {path}")
        if self.path.is_dir():
            raise IsADirectoryError(f"{path} is a directory, not an {what} file")
        self.format = format_of(path, fmt, FORMATS, what)
        self.columns: Optional[List[str]] = None
        self._data_start, self._data_line = 0, 1  # where the rows begin (after a table's header)
        if self.format in ("csv", "tsv"):
            self._read_header()
        elif self.format == "parquet":
            need_pyarrow("parquet input")
            import pyarrow.parquet as pq

            self.columns = list(pq.ParquetFile(self.path).schema_arrow.names)

    def where(self, line: Optional[int], pos: Optional[int] = None) -> str:
        """``PATH:LINE`` (parquet: ``PATH: row N``) for error messages."""
        if self.format == "parquet":
            return f"{self.path}: row {line}"
        if line is None:
            return f"{self.path}: near byte {pos}"
        return f"{self.path}:{line}"

    # -- lines
    def _lines(self, offset: int) -> Iterator[tuple]:
        """(byte offset, raw line with its line break) from ``offset``; the BOM of line 1 removed."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            pos = offset
            for raw in f:
                start = pos
                pos += len(raw)
                if start == 0 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                yield start, raw

    def _decode(self, raw: bytes, line: Optional[int], pos: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.where(line, pos)}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                             f"line)") from None

    @staticmethod
    def _strip_eol(raw: bytes) -> bytes:
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        return raw

    # -- tables
    def _records(self, offset: int, line: Optional[int]) -> Iterator[tuple]:
        """(byte offset, first line, cells, offset after it, line after it) of each CSV / TSV
        record from ``offset``; blank lines are skipped (no record)."""
        state = {"line": line, "pos": offset}

        def lines():  # csv.reader pulls one line at a time, no read-ahead: state is exact between records
            for pos, raw in self._lines(offset):
                text = self._decode(raw, state["line"], pos)
                state["pos"] = pos + len(raw)
                if state["line"] is not None:
                    state["line"] += 1
                yield text

        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, self.path.stat().st_size))  # no cell is longer than the file
        try:
            # strict: a quote left open (it would swallow the rest of the file into one cell) or text
            # after a closing quote is an error, not a guess
            reader = csv.reader(lines(), delimiter="\t" if self.format == "tsv" else ",", strict=True)
            while True:
                start, first = state["pos"], state["line"]
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise ValueError(f"{self.where(first, start)}: not valid {self.format.upper()} ({e})") from None
                if cells:  # a blank line is no record
                    yield start, first, cells, state["pos"], state["line"]
        finally:
            csv.field_size_limit(limit)

    def _read_header(self) -> None:
        for _, line, cells, end, next_line in self._records(0, 1):
            seen = set()
            for name in cells:
                if name in seen:
                    raise ValueError(f"{self.where(line)}: the header names column {name!r} twice")
                seen.add(name)
            self.columns = list(cells)
            self._data_start, self._data_line = end, next_line
            return
        raise ValueError(f"{self.path}: empty {self.format.upper()} file (expected a header row naming the columns)")

    # -- rows
    def rows(self, start: Optional[int] = None, columns: Optional[Sequence[str]] = None) -> Iterator[Row]:
        """Every row from ``start`` (a ``Row.pos``; default: the first row).  ``columns``: the
        parquet columns to read (default all)."""
        if self.format == "parquet":
            yield from self._parquet_rows(start or 0, columns)
            return
        if start is None or start <= self._data_start:
            offset, line = self._data_start, self._data_line
        else:
            offset, line = start, None
        if self.format in ("csv", "tsv"):
            names = self.columns
            for pos, first, cells, _, _ in self._records(offset, line):
                if len(cells) > len(names):
                    raise ValueError(f"{self.where(first, pos)}: {len(cells)} values but the header names "
                                     f"{len(names)} columns")
                yield Row(pos, first, {n: (cells[i] if i < len(cells) else None) for i, n in enumerate(names)})
            return
        for pos, raw in self._lines(offset):
            text = self._decode(self._strip_eol(raw), line, pos)
            if self.format == "txt":
                yield Row(pos, line, text)
            else:
                yield Row(pos, line, self._json(text, line, pos))
            if line is not None:
                line += 1

    def _json(self, text: str, line: Optional[int], pos: int) -> Any:
        if not text.strip():
            raise ValueError(f"{self.where(line, pos)}: blank line; JSONL needs one JSON value per line "
                             f"(row i = line i)")
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates)
        except _DuplicateKey as e:
            raise ValueError(f"{self.where(line, pos)}: the object names key {e.args[0]!r} twice") from None
        except ValueError as e:
            raise ValueError(f"{self.where(line, pos)}: not valid JSON ({e})") from None

    def _parquet_rows(self, start_row: int, columns: Optional[Sequence[str]]) -> Iterator[Row]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        columns = list(columns) if columns is not None else self.columns
        row = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n <= start_row:  # a whole row group before the range: not read
                row += n
                continue
            key = (g, tuple(columns))
            cached = getattr(self, "_parquet_group", None)  # chunks in a row: the same row group again
            if cached is not None and cached[0] == key:
                table = cached[1]
            else:
                table = pf.read_row_group(g, columns=columns)
                self._parquet_group = (key, table)  # one row group at most
            skip = max(0, start_row - row)
            row += skip
            # to Python in slices: a row group may hold a million rows, a chunk needs a few thousand
            for a in range(skip, n, _PARQUET_SLICE):
                for value in table.slice(a, _PARQUET_SLICE).to_pylist():
                    yield Row(row, row + 1, value)
                    row += 1

    def count(self) -> int:
        """The number of rows (parquet: from the metadata; others: one pass)."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        return sum(1 for _ in self.rows())
