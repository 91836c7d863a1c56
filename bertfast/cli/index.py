"""``bertfast search``: the arguments of :class:`bertfast.index.Index` (run by
:func:`bertfast.index.run`)."""
from __future__ import annotations

from bertfast.cli.args import positive_int, run_in, text_arg


def add_arguments(p) -> None:
    from bertfast.index import ANN_BACKENDS

    p.add_argument("--index", required=True, metavar="FILE",
                   help="an embedding file written by `bertfast encode --input ... --output FILE`")
    p.add_argument("--query", "-q", action="append", required=True, type=text_arg, metavar="TEXT",
                   help="the text to search for; repeatable")
    p.add_argument("--top", "-k", type=positive_int, default=10, metavar="K", help="results per query (default 10)")
    p.add_argument("--model", default=None, metavar="PATH|NAME",
                   help="refuse to search unless this is the model the index was encoded with (default: that model)")
    p.add_argument("--device", default=None, metavar="cpu|cuda", help="device for encoding the query")
    p.add_argument("--json", action="store_true", help='print [{"query", "hits": [{"id", "score", "text"}]}]')
    p.add_argument("--ann", choices=ANN_BACKENDS, default=None,
                   help="approximate search with faiss HNSW (bertfast[ann]; graph cached as FILE.faiss); "
                        "default: exact")


run = run_in("bertfast.index")
