"""``bertfast tune``: its arguments, refused while parsing when bad (run by
:func:`bertfast.tune.run`; what it does: :mod:`bertfast.tune`)."""
from __future__ import annotations

import argparse

from bertfast.cli.args import dtype_arg, model_arg, positive_int, run_in


def _int_list(value: str) -> list:
    try:
        out = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        out = []
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {value!r}")
    return out


def _shape_list(value: str) -> list:
    shapes = []
    for item in value.replace(" ", "").split(","):
        parts = item.lower().split("x")
        try:
            b, s = (int(p) for p in parts)
        except ValueError:
            b = s = 0
        if b < 1 or s < 1:
            raise argparse.ArgumentTypeError(f"expected shapes like 8x128,32x512 (batch x sequence length), "
                                             f"got {item!r}")
        shapes.append((b, s))
    return shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bertfast tune``; bad values are refused while parsing."""
    parser.add_argument("--model", default="minilm", type=model_arg, metavar="PATH|NAME",
                        help="model directory or name (default: minilm, the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--batch-sizes", default=[1, 8, 32], type=_int_list, metavar="B,B,...",
                        help="batch sizes to tune for (default: 1,8,32)")
    parser.add_argument("--seq-lens", default=None, type=_int_list, metavar="S,S,...",
                        help="sequence lengths to tune for (default: 128,512 on CUDA, 16,128 on CPU; capped at the "
                             "model's maximum)")
    parser.add_argument("--shapes", default=None, type=_shape_list, metavar="BxS,...",
                        help="explicit (batch x sequence length) shapes, instead of --batch-sizes x --seq-lens")
    parser.add_argument("--lengths", default="both", choices=("full", "mixed", "both"),
                        help="full-length sequences, mixed lengths (padding), or both (default)")
    parser.add_argument("--dtype", default=None, type=dtype_arg, metavar="float32|float16|bfloat16",
                        help="model dtype (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cuda", metavar="cuda[:N]|cpu",
                        help="CUDA device, or cpu for the CPU linears (default: cuda)")
    parser.add_argument("--threads", dest="thread_counts", default=None, type=positive_int, nargs="+", metavar="N",
                        help="--device cpu: the torch thread counts to tune for (default: the current one)")
    parser.add_argument("--force", action="store_true", help="time again the shape classes already in the cache")


run = run_in("bertfast.tune")
