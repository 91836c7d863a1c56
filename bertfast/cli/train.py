"""``bertfast finetune``: the arguments of :func:`bertfast.train.train` (run by
:func:`bertfast.train.run`)."""
from __future__ import annotations

import argparse

from bertfast.cli.args import (
    add_progress_arguments, add_threads_argument, device_arg, model_arg, nonnegative_int, out_dir_arg, positive_int,
    run_in,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bertfast.train import DEFAULT_FIELDS, TASKS

    p.add_argument("--task", required=True, choices=TASKS, help="what to fine-tune (the head and the metric)")
    p.add_argument("--train", required=True, metavar="FILE", help="training data (.jsonl, .csv or .tsv)")
    p.add_argument("--eval", metavar="FILE", default=None, help="evaluation data, scored after every epoch")
    p.add_argument("--model", default="minilm", type=model_arg, metavar="PATH|minilm",
                   help="checkpoint to start from (default: minilm)")
    p.add_argument("--out", required=True, type=out_dir_arg, metavar="DIR",
                   help="output directory: the fine-tuned model, metrics.json, checkpoint/")
    p.add_argument("--epochs", type=positive_int, default=3, metavar="N", help="default 3")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="examples per micro-batch (16)")
    p.add_argument("--eval-batch-size", type=positive_int, default=64, metavar="N", help="default 64")
    p.add_argument("--grad-accum", type=positive_int, default=1, metavar="N",
                   help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, metavar="X", default=5e-5, help="peak learning rate of AdamW (default 5e-5)")
    p.add_argument("--weight-decay", type=float, metavar="X", default=0.01, help="default 0.01 (not on biases / LayerNorm)")
    p.add_argument("--warmup-ratio", type=float, metavar="X", default=0.1, help="share of the steps for linear warm-up (0.1)")
    p.add_argument("--max-grad-norm", type=float, metavar="X", default=1.0, help="gradient clipping (0: none; default 1)")
    p.add_argument("--max-length", type=positive_int, default=128, metavar="N", help="tokens per example (128)")
    p.add_argument("--stride", type=nonnegative_int, default=32, metavar="N",
                   help="qa: tokens shared by consecutive windows of a long context (default 32)")
    p.add_argument("--mlm-probability", type=float, metavar="X", default=0.15, help="mlm: share of tokens masked (0.15)")
    p.add_argument("--whole-word", action="store_true", help="mlm: mask whole words")
    p.add_argument("--label-all-subwords", action="store_true",
                   help="tokens: label every sub-word of a word (default: the first only)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (weights stay fp32)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the head init, data order, dropout, masking")
    p.add_argument("--device", type=device_arg, default=None, metavar="cpu|cuda",
                   help="default: cuda when available")
    p.add_argument("--save-steps", type=nonnegative_int, default=0, metavar="N",
                   help="also checkpoint every N optimizer steps (default: at the end of each epoch)")
    p.add_argument("--stop-after-steps", type=positive_int, default=None, metavar="N",
                   help="stop after N optimizer steps with a checkpoint, as an interruption would")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                   help="write no checkpoint/ (the training state: weights plus AdamW's two moments, 3x the "
                        "model's size); the run cannot be resumed")
    add_threads_argument(p)
    p.add_argument("--overwrite", action="store_true", help="start over although --out holds a run")
    add_progress_arguments(p, "always show the progress line", "no progress line")
    for key, default in DEFAULT_FIELDS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, metavar="NAME",
                       help=f"field name (default {default!r})")


run = run_in("bertfast.train")
