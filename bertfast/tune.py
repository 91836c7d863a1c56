"""``bertfast tune``: fill the tuning cache for one model ahead of time and print what was chosen.

    bertfast tune [--model PATH|minilm] [--batch-sizes 1,8,32] [--seq-lens 128,512]
                  [--shapes 8x128,32x512] [--lengths full|mixed|both] [--dtype float16]
                  [--device cuda[:N]|cpu] [--threads N ...] [--force]

Runs forwards of the model (Triton backend, no CUDA graphs, no gradients) at every requested
(batch, sequence length), with full and / or mixed sequence lengths (mixed: padding-free and
padded), while the tuner is in
"tune" mode (``bertfast.kernels.tuning``): every op / shape class those forwards use is timed on this GPU
and the fastest valid candidate stored in the cache (``$BERTFAST_TUNE_CACHE`` or
``~/.cache/bertfast/tuning.json``), where later processes find it without timing anything.
Classes already in the cache are reported as "cache" and not timed again unless ``--force``.

Needs a CUDA GPU: elsewhere it stops with one line saying so (exit 1) -- except with
``--device cpu``: the same forwards on the PyTorch CPU path (default float32; sequence lengths
16,128 unless given), where every linear's shape class (fused QKV, FFN1 + activation, the output
projections; by token-count bucket) times the implementations this torch offers
(``bertfast.cpu_linear``) and stores the fastest under this CPU's key, once per ``--threads``
count (choices are per thread count; default: torch's current one).
"""
from __future__ import annotations

import sys

import torch


def _device(value: str) -> torch.device:
    """The CUDA device to tune on, or CLIError saying plainly why there is none."""
    from bertfast.cli.args import CLIError, cuda_unavailable_reason
    from bertfast.kernels import INTERPRET

    why = cuda_unavailable_reason()
    if why is not None:
        raise CLIError(f"tuning needs a CUDA GPU ({why}); nothing was tuned")
    if INTERPRET:
        raise CLIError("tuning needs compiled kernels, but TRITON_INTERPRET=1 is set; unset it")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type != "cuda":
        raise CLIError(f"--device must be cuda or cuda:N (tuning measures on a CUDA GPU), got {value!r}")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _batches(shapes, lengths: str, vocab: int, device):
    """(label, input_ids, attention_mask) for every shape and length setting."""
    g = torch.Generator().manual_seed(0)
    for B, S in shapes:
        ids = torch.randint(1000, max(1001, vocab), (B, S), generator=g)
        settings = ("full", "mixed") if lengths == "both" else (lengths,)
        for setting in settings:
            mask = torch.ones(B, S, dtype=torch.long)
            if setting == "mixed":
                lens = torch.randint(max(1, S // 4), S + 1, (B,), generator=g)
                lens[0] = S
                mask = (torch.arange(S)[None, :] < lens[:, None]).long()
            if setting == "mixed" and B == 1:
                continue  # one sequence: nothing to mix
            yield f"{B}x{S} {setting}", (ids * mask).to(device), mask.to(device)


def _report(decisions) -> str:
    rows = [("op", "shape class", "timed at", "choice", "default", "vs default", "source")]
    for d in sorted(decisions, key=lambda d: (d.op, d.key)):
        t_def, t_ch = d.times_ms.get(d.default), d.times_ms.get(d.choice)
        gain = f"{t_def / t_ch:.2f}x" if t_def and t_ch else "-"
        rows.append((d.op, d.key, d.shape, d.choice, d.default, gain, d.source))
        for name, why in sorted(d.dropped.items()):
            rows.append(("", "", "", f"  dropped {name}", why, "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _forwards(model, work, device) -> None:
    """The model's forwards at every batch: mixed lengths padding-free (varlen attention, the
    default) and padded (key lengths)."""
    backend = "triton" if device.type == "cuda" else "torch"
    for i, (label, ids, mask) in enumerate(work, 1):
        for unpad in ((True, False) if label.endswith("mixed") else (True,)):
            what = f"{label}{'' if unpad else ' padded'}"
            print(f"bertfast tune: [{i}/{len(work)}] forward {what}", file=sys.stderr, flush=True)
            model.set_backend(backend, unpad=unpad, graphs=False)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)


def run(args) -> int:
    """``bertfast tune`` with the arguments bertfast/cli/tune.py parsed; returns the exit status."""
    from bertfast.cli.args import CLIError
    from bertfast.modeling import BertModel
    from bertfast.sentence import parse_dtype
    from bertfast.kernels import tuning

    cpu = args.device == "cpu"
    if args.thread_counts and not cpu:
        raise CLIError("--threads is for --device cpu (the CPU linears' choices are per thread count)")
    device = torch.device("cpu") if cpu else _device(args.device)
    dtype = parse_dtype(args.dtype or ("float32" if cpu else "float16"))
    if cpu and dtype == torch.float16:
        raise CLIError("--device cpu tunes float32 or bfloat16 (the CPU path has no float16 GEMMs)")
    model = BertModel.from_pretrained(args.model, dtype=dtype, device=device).eval()
    max_len = int(getattr(model.config, "max_position_embeddings", 512))
    seq_lens = args.seq_lens or ([16, 128] if cpu else [128, 512])
    shapes = args.shapes or [(b, s) for b in args.batch_sizes for s in seq_lens]
    shapes = [(b, min(s, max_len)) for b, s in shapes]
    vocab = int(getattr(model.config, "vocab_size", 30522))
    work = list(_batches(shapes, args.lengths, vocab, device))
    if cpu:
        return _run_cpu(args, model, work, device, dtype)
    with tuning.autotune("tune", force=args.force) as tuner:
        tuner.decisions.clear()
        _forwards(model, work, device)
        decisions = list(tuner.decisions.values())
        path = tuner.cache_file()
    name = torch.cuda.get_device_name(device)
    print(f"bertfast tune: {args.model}, {str(dtype).replace('torch.', '')}, {name}: {len(decisions)} shape classes "
          f"with more than one candidate")
    if decisions:
        print(_report(decisions))
    tuned = sum(d.source == "tuned" for d in decisions)
    print(f"\n{tuned} timed now, {len(decisions) - tuned} already in the cache: {path}")
    return 0


def _run_cpu(args, model, work, device, dtype) -> int:
    """``--device cpu``: the CPU linears' choices, per thread count."""
    from bertfast import cpu_linear
    from bertfast.kernels import tuning

    cpu_linear.warn_emulated_bf16(dtype)
    before = torch.get_num_threads()
    try:
        for n in args.thread_counts or [before]:
            torch.set_num_threads(n)
            with tuning.autotune("tune", force=args.force):
                tuner = cpu_linear.TUNER
                tuner.forget()  # report every class of these forwards: stored ones are read again, as "cache"
                _forwards(model, work, device)
                decisions = list(tuner.decisions.values())
                path = tuner.cache_file()
            print(f"bertfast tune: {args.model}, {str(dtype).replace('torch.', '')}, "
                  f"{cpu_linear.cpu_features().describe()}, torch {torch.__version__}, {n} thread(s): "
                  f"{len(decisions)} linear shape classes")
            if decisions:
                print(_report(decisions))
            tuned = sum(d.source == "tuned" for d in decisions)
            print(f"\n{tuned} timed now, {len(decisions) - tuned} already in the cache: {path}\n")
    finally:
        torch.set_num_threads(before)
    return 0
