"""``bertfast bench host``: what the host does per forward on the Triton path, measured on any machine.

    bertfast bench host [--model bert-base] [--batch N ...] [--seq N ...] [--out DIR] [--quick]

The model runs on CPU tensors as on an H100 that is not there (``bertfast.kernels._launch.fake_gpu``):
the launchers do all their host work (checks, launch plans, allocation), Triton's launch path
runs in full against a stand-in CUDA driver (its dispatch, or bertfast's direct launch of the
compiled kernel) and only the C launcher itself is replaced by a recorder, so the time measured is
bertfast's Python plus Triton's Python per launch; the CUDA driver's own launch cost (a few us
per launch on a GPU host) is not in it.  Per forward it reports:

* ``launches``: Triton kernel launches, and per layer (the layer loop's launches / layers);
* ``torch_ops``: PyTorch ops that do device work (not views, not allocations): each is one more
  launch on a GPU;
* ``reads``: device reads (``.item()``, ``.tolist()``, ``nonzero``, ``bool(tensor)``, ...), in
  the whole forward and inside the layer loop;
* ``inputs``: ``device`` (ids and mask handed to the model as they are: its plan reads the mask,
  one device read) or ``host`` (built on the CPU and handed over through
  ``bertfast.plan.to_device``, which checks them and reads the mask on the host before the copy,
  as SentenceEncoder does: no device read in the forward; ``to_device`` is inside the timed call,
  its read of the host tensors is not counted as a device read);
* ``host_us``: wall time per forward (median, p10, p90, min over interleaved repeats) as the
  model runs by default: layer programs replayed (bertfast/program.py) with the compiled kernels
  launched directly (``bertfast.kernels._launch``); ``ops_us``: the same forward with every layer
  through the ops (``BERTFAST_LAYER_PROGRAMS=0``: what the host did before layer programs);
  ``triton_dispatch_us``: every launch through Triton's JIT dispatch
  (``BERTFAST_DIRECT_LAUNCH=0``); all three timed in the same rounds;
  ``torch_cpu_us``: the CPU time of those PyTorch ops (real CPU compute here, an asynchronous
  launch on a GPU), so ``host_us - torch_cpu_us`` is the host cost a GPU would see, less
  Triton's and PyTorch's launch costs.

The model is bertfast's BertModel with the config's shapes, fp16, random weights, no pooler (its
one GEMM would be real CPU compute here), in eval mode under ``torch.no_grad``.

transformers' own host time is measured the same way where it is installed (``transformers``
rows, same cases, same rounds): its BertModel with the preset's layers and heads but hidden size
2 per head (hidden = 2 x heads, intermediate = 4 x hidden), fp32, SDPA attention, on the CPU:
its Python and PyTorch's dispatcher run as for the real model, and its math is a few
microseconds per op (it cannot run on the meta device: its mask handling reads the mask).
Writes ``<date>_host.json`` and ``.md`` into ``--out``.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

@functools.lru_cache(maxsize=None)
def _no_work() -> frozenset:
    """PyTorch ops that do no device work (views, metadata, allocations, host reads, no-op
    conversions): not counted as launches."""
    from bertfast.program import ALLOC_OPS, VIEW_OPS

    return VIEW_OPS | ALLOC_OPS | {
        "aten::contiguous", "aten::result_type", "aten::is_nonzero", "aten::item",
        "aten::_local_scalar_dense", "aten::to", "aten::dropout", "aten::lift", "aten::lift_fresh"}


# The timed paths, each in every round: (direct launches, layer programs) -> the row's keys
# host_us, ops_us, triton_dispatch_us
PATHS = {"direct": (True, True), "ops": (True, False), "triton": (False, True)}


def _path(name: str):
    """Context: the launch path and layer-program switch of timed path ``name`` (restored after)."""
    import contextlib

    from bertfast import program
    from bertfast.kernels import _launch

    direct, programs = PATHS[name]
    stack = contextlib.ExitStack()
    stack.enter_context(_launch.direct_launches(direct))
    stack.enter_context(program.enabled(programs))
    return stack


def workloads(batches: Optional[List[int]], seqs: Optional[List[int]], quick: bool) -> List[Dict[str, Any]]:
    """(B, S, lengths) cases: the issue's (1,128) full, (32,128) full and mixed by default, each
    with the inputs on the device and from the host (``inputs``)."""
    if batches or seqs:
        out = []
        for b in batches or [1, 32]:
            for s in seqs or [128]:
                out.append({"B": b, "S": s, "lengths": "full"})
                if b > 1:
                    out.append({"B": b, "S": s, "lengths": "mixed"})
        return [{**c, "inputs": i} for c in out for i in ("device", "host")]
    cases = [{"B": 1, "S": 128, "lengths": "full"}, {"B": 32, "S": 128, "lengths": "full"},
             {"B": 32, "S": 128, "lengths": "mixed"}]
    cases = [{**c, "inputs": i} for c in cases for i in ("device", "host")]
    cases.append({"B": 32, "S": 128, "lengths": "mixed", "unpad": False, "inputs": "device"})
    return [cases[0], cases[4], cases[5]] if quick else cases


def _inputs(case, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    B, S = case["B"], case["S"]
    ids = torch.randint(1, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if case["lengths"] == "mixed":  # right padding, lengths uniform in [0.3 S, S]
        lens = torch.randint(max(1, int(0.3 * S)), S + 1, (B,), generator=g)
        mask = (torch.arange(S)[None, :] < lens[:, None]).long()
    return ids, mask


def _call(model, case, ids, mask):
    """One forward of ``case``: the inputs as they are, or through ``bertfast.plan.to_device``."""
    if case.get("inputs") == "host":
        from bertfast.plan import to_device

        return model(**to_device({"input_ids": ids, "attention_mask": mask}, model))
    return model(input_ids=ids, attention_mask=mask)


def _count(model, case, ids, mask):
    """(launches, launches in the layer loop, torch ops with device work, reads, reads in the layer
    loop), in the forward (for host inputs: after ``to_device``, whose read is of the host tensors)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bertfast.kernels.testing import count_host_reads, record_launches

    layers = model.encoder.layer
    marks = {}
    ops = []

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = "aten::" + func.__name__.split(".")[0]
            if name not in _no_work():
                ops.append(name)
            return func(*args, **(kwargs or {}))

    if case.get("inputs") == "host":
        from bertfast.plan import to_device

        kw = to_device({"input_ids": ids, "attention_mask": mask}, model)
    else:
        kw = {"input_ids": ids, "attention_mask": mask}
    with record_launches() as calls, count_host_reads() as reads:
        h1 = layers[0].register_forward_pre_hook(lambda *a: marks.update(start=(len(calls), reads[0])))
        h2 = layers[-1].register_forward_hook(lambda *a: marks.update(end=(len(calls), reads[0])))
        try:
            with _Ops():
                model(**kw)
        finally:
            h1.remove()
            h2.remove()
    if "start" not in marks or "end" not in marks:  # a model that runs its layers without their module call
        return len(calls), None, ops, reads[0], None
    in_loop = marks["end"][0] - marks["start"][0]
    return len(calls), in_loop, ops, reads[0], marks["end"][1] - marks["start"][1]


def _torch_cpu_us(forward, steps: int) -> float:
    """CPU time of the PyTorch ops that do device work in ``forward()``, per call (profiler self
    time), with Triton launches recorded."""
    from torch.profiler import ProfilerActivity, profile

    from bertfast.kernels.testing import record_launches

    with record_launches(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            forward()
    total = 0.0
    for evt in prof.key_averages():
        if evt.key.startswith("aten::") and evt.key not in _no_work():
            total += evt.self_cpu_time_total
    return total / steps


def _transformers_model(cfg):
    """transformers' BertModel with ``cfg``'s layers and heads, 2 dims per head (module docstring);
    None where transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    H = cfg.num_attention_heads
    hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, num_hidden_layers=cfg.num_hidden_layers,
                                     num_attention_heads=H, hidden_size=2 * H, intermediate_size=8 * H,
                                     max_position_embeddings=cfg.max_position_embeddings)
    hf_cfg._attn_implementation = "sdpa"
    return transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()


def _stats(times) -> Dict[str, Any]:
    from bertfast.bench.harness import summarize

    st = summarize(times)  # the harness's statistics (in us here, despite its key names)
    return {"median": st["median_ms"], "p10": st["p10_ms"], "p90": st["p90_ms"], "min": st["min_ms"], "n": st["n"]}


def measure(config_name: str = "bert-base", cases=None, repeat: int = 200, warmup: int = 10, seed: int = 0,
            progress=None, transformers_rows: bool = True, **config_overrides) -> Dict[str, Any]:
    """Run the host measurement; returns the JSON document (see the module docstring).
    ``config_overrides``: BertConfig fields over the preset's (e.g. num_hidden_layers)."""
    import torch

    from bertfast import BertConfig, BertModel
    from bertfast.bench.suites import PRESET_OF
    from bertfast.kernels import _launch
    from bertfast.kernels._common import INTERPRET
    from bertfast.kernels.testing import record_launches

    cfg = BertConfig.preset(PRESET_OF[config_name], **config_overrides, backend="triton")
    torch.manual_seed(seed)
    cases = cases or workloads(None, None, False)
    # kernels decorated under the interpreter cannot take Triton's launch path: recorded at dispatch
    stand_in = record_launches() if INTERPRET else _launch.fake_gpu()
    with torch.no_grad(), stand_in:
        model = BertModel(cfg, add_pooling_layer=False).to(torch.float16).eval()
        hf = _transformers_model(cfg) if transformers_rows else None
        inputs = []
        rows = []
        for case in cases:
            model.set_backend("triton", unpad=case.get("unpad", True))
            ids, mask = _inputs(case, cfg.vocab_size, seed)
            for path in PATHS:
                with _path(path):
                    for _ in range(warmup):
                        _call(model, case, ids, mask)
            launches, in_loop, ops, reads, loop_reads = _count(model, case, ids, mask)
            rows.append({**case, "unpad": case.get("unpad", True), "inputs": case.get("inputs", "device"),
                         "tokens": int(mask.sum()),
                         "launches": launches,
                         "launches_per_layer": in_loop / cfg.num_hidden_layers if in_loop is not None else None,
                         "torch_ops": len(ops), "torch_op_names": sorted(set(ops)),
                         "reads": reads, "reads_in_layer_loop": loop_reads, "times_us": {p: [] for p in PATHS}})
            inputs.append((ids, mask))
        hf_rows = []
        if hf is not None:
            for case, (ids, mask) in zip(cases, inputs):
                if case.get("inputs", "device") == "device" and case.get("unpad", True):
                    for _ in range(warmup):
                        hf(input_ids=ids, attention_mask=mask)
                    hf_rows.append(({"B": case["B"], "S": case["S"], "lengths": case["lengths"], "times_us": []},
                                    ids, mask))
        # interleaved timing: one forward of each case and launch path per round, so machine noise
        # hits all alike
        for r in range(repeat):
            for row, (ids, mask) in zip(rows, inputs):
                model.set_backend("triton", unpad=row["unpad"])
                for path in PATHS:
                    with _path(path):
                        t0 = time.perf_counter()
                        _call(model, row, ids, mask)
                        row["times_us"][path].append((time.perf_counter() - t0) * 1e6)
            for hrow, ids, mask in hf_rows:
                t0 = time.perf_counter()
                hf(input_ids=ids, attention_mask=mask)
                hrow["times_us"].append((time.perf_counter() - t0) * 1e6)
            if progress is not None and r % max(1, repeat // 10) == 0:
                progress(f"timing {r}/{repeat}")
    for row, (ids, mask) in zip(rows, inputs):
        model.set_backend("triton", unpad=row["unpad"])
        times = row.pop("times_us")
        row["host_us"], row["ops_us"], row["triton_dispatch_us"] = (_stats(times[p]) for p in PATHS)
        with torch.no_grad():
            row["torch_cpu_us"] = _torch_cpu_us(lambda: _call(model, row, ids, mask), steps=min(20, repeat))
        row["host_minus_torch_cpu_us"] = row["host_us"]["median"] - row["torch_cpu_us"]
    transformers = []
    for hrow, ids, mask in hf_rows:
        hrow["host_us"] = _stats(hrow.pop("times_us"))
        with torch.no_grad():
            hrow["torch_cpu_us"] = _torch_cpu_us(lambda: hf(input_ids=ids, attention_mask=mask), steps=min(20, repeat))
        hrow["host_minus_torch_cpu_us"] = hrow["host_us"]["median"] - hrow["torch_cpu_us"]
        transformers.append(hrow)
    return {"schema": "bertfast.bench.host/3", "model": config_name, "dtype": "float16",
            "layers": cfg.num_hidden_layers, "rows": rows, "transformers": transformers,
            "launch_path": "recorded at dispatch (TRITON_INTERPRET=1)" if INTERPRET else "stand-in sm_90 driver",
            "environment": _environment()}


def _environment() -> Dict[str, Any]:
    import os
    import platform

    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    from bertfast.bench.harness import git_commit
    from bertfast.cpu_linear import cpu_features

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": tv,
            "cpu": cpu_features().describe(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg": load,
            "machine": platform.machine(), "commit": git_commit()}


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def format_table(doc: Dict[str, Any]) -> str:
    where = ("on a stand-in GPU (Triton's launch path runs, the C launcher is recorded)"
             if doc.get("launch_path", "").startswith("stand-in") else
             "launches recorded at Triton's dispatch (the interpreter: neither launch path is in these times)")
    lines = [f"bertfast bench host: {doc['model']} ({doc['layers']} layers, fp16), {where}; times per forward in us",
             "",
             "| B x S | lengths | unpad | inputs | tokens | launches | per layer | torch ops | reads | "
             "reads in layers | host us: median [p10, p90] | host us, through the ops | host us, Triton dispatch | "
             "torch CPU us | host - torch CPU us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def span(h):
        return f"{h['median']:.0f} [{h['p10']:.0f}, {h['p90']:.0f}]"

    for r in doc["rows"]:
        lines.append(
            f"| {r['B']} x {r['S']} | {r['lengths']} | {r['unpad']} | {r.get('inputs', 'device')} | {r['tokens']} | "
            f"{r['launches']} | "
            f"{_fmt(r['launches_per_layer'])} | {r['torch_ops']} | {r['reads']} | {_fmt(r['reads_in_layer_loop'])} | "
            f"{span(r['host_us'])} | {span(r['ops_us'])} | {span(r['triton_dispatch_us'])} | {r['torch_cpu_us']:.0f} | "
            f"{r['host_minus_torch_cpu_us']:.0f} |")
    if doc.get("transformers"):
        lines += ["", "transformers, measured the same way (same layers and heads, 2 dims per head, fp32, SDPA, CPU: "
                      "its Python and dispatcher, a few us of math per op):", "",
                  "| B x S | lengths | host us: median [p10, p90] | torch CPU us | host - torch CPU us |",
                  "|---|---|---|---|---|"]
        for r in doc["transformers"]:
            lines.append(f"| {r['B']} x {r['S']} | {r['lengths']} | {span(r['host_us'])} | {r['torch_cpu_us']:.0f} | "
                         f"{r['host_minus_torch_cpu_us']:.0f} |")
    env = doc["environment"]
    lines += ["", f"CPU {env.get('cpu', 'unknown')}; torch {env['torch']}, triton {env['triton']}, {env['cpu_count']} CPUs, "
                  f"{env['threads']} threads, load average {env['loadavg']}, commit {env['commit']}"]
    return "\n".join(lines)


def run(args) -> int:
    models = args.model or ["bert-base"]
    if len(models) != 1:
        print("bertfast: error: bench host takes one --model", file=sys.stderr)
        return 2
    cases = workloads(args.batch, args.seq, args.quick)
    repeat = 30 if args.quick else 200

    def progress(msg):
        if not args.no_progress:
            print(f"bertfast bench host: {msg}", file=sys.stderr)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    doc = measure(models[0], cases, repeat=repeat, warmup=3 if args.quick else 10, seed=args.seed, progress=progress)
    text = format_table(doc)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{date.today().isoformat()}_host"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    print(f"bertfast bench host: wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0
