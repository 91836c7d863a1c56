"""``bertfast profile``: one encoder shape under ``torch.profiler``, grouped by BERT op.

    bertfast profile [--model minilm|bert-base|bert-large|PATH] [--impl bertfast|transformers]
                     [--backend torch|triton|auto] [--batch N] [--seq N] [--lengths full|mixed]
                     [--dtype auto|fp16|bf16|fp32] [--device auto|cuda|cpu] [--steps N] [--out DIR]

Writes into ``--out``: ``<stem>.trace.json`` (Chrome / Perfetto trace: open it in
https://ui.perfetto.dev or chrome://tracing), ``<stem>.md`` (the tables) and ``<stem>.json``
(the same rows, machine-readable); prints the tables.  The forward runs eagerly (no CUDA-graph
replay: a replay would show as one graph launch, not as the ops).  This module is part of the
measurement package (:mod:`bertfast.bench`: harness, suites, reports, host budget, evidence run).

How ops are grouped: :class:`instrument` wraps module forwards with hooks (no change to the
model) that open a ``torch.profiler.record_function`` range, and on CUDA an NVTX range (so Nsight
Systems shows the same structure), named after the op:

    bertfast.forward                      the whole forward (root module)
    bertfast.embeddings                   embeddings + LayerNorm               -> embeddings
    bertfast.layer3                       one encoder layer (glue)             -> other
    bertfast.layer3.qkv.query             Q / K / V (or fused QKV) projection  -> qkv
    bertfast.layer3.attention             scores, softmax, context (core)      -> attention
    bertfast.layer3.attention.out_proj    attention output projection          -> attention
    bertfast.layer3.add_ln.attention      residual add + LayerNorm after attn  -> add+LN
    bertfast.layer3.ffn.intermediate      FFN up-projection + GELU             -> ffn
    bertfast.layer3.ffn.output            FFN down-projection                  -> ffn
    bertfast.layer3.add_ln.ffn            residual add + LayerNorm after FFN   -> add+LN
    bertfast.pooler                       pooler                               -> other

The layers run functionally (``bertfast.modeling.layer_forward`` calls the ops of ``bertfast.ops``,
not the submodules' forwards); while profiling, :class:`instrument` also wraps
``bertfast.modeling.layer_forward`` and the ``bertfast.ops`` entry points it calls, which yields the same names (``bertfast.layerN.qkv``,
``.attention``, ``.attention.out_proj`` (the layer's first GEMM after attention), ``.add_ln``,
``.ffn``, ``bertfast.embeddings``) and groups.

It works for any BertModel-like module tree with Hugging Face names (``embeddings``,
``encoder.layer.N.attention.self[.query|key|value]``, ``attention.output[.dense]``,
``intermediate``, ``output[.dense]``): bertfast's and transformers'.  Ranges the model emits
itself with the same ``bertfast.layerN.<op>`` naming are grouped the same way.  Every profiled
op (CPU) or GPU kernel is charged to the innermost range around it; its share is of the
forward's total (GPU kernel time on CUDA, CPU time on CPU).  Work a module does without calling
its child modules (e.g. a fused QKV computed inside ``attention.self``) is charged to the parent.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Any, Dict, Optional

import torch

PREFIX = "bertfast"
GROUPS = ("embeddings", "qkv", "attention", "add+LN", "ffn", "other")
QKV_NAMES = {"query", "key", "value", "qkv", "Wqkv", "in_proj", "qkv_proj", "q_proj", "k_proj", "v_proj"}


# --------------------------------------------------------------------------- naming
def range_name(module_name: str, prefix: str = PREFIX) -> Optional[str]:
    """The profiler range for a module (by its name in ``named_modules``), or None for modules
    that get no range of their own."""
    if module_name == "":
        return f"{prefix}.forward"
    parts = module_name.split(".")
    # position of the "layer.N" part
    for i in range(len(parts) - 1):
        if parts[i] in ("layer", "layers") and parts[i + 1].isdigit():
            layer = f"{prefix}.layer{parts[i + 1]}"
            rel = parts[i + 2:]
            break
    else:
        last = parts[-1]
        if last == "embeddings":
            return f"{prefix}.embeddings"
        if last == "pooler":
            return f"{prefix}.pooler"
        return None
    r = ".".join(rel)
    if r == "":
        return layer
    if r in ("attention.self", "attention.attn", "attn"):
        return f"{layer}.attention"
    if len(rel) == 3 and rel[0] == "attention" and rel[1] in ("self", "attn") and rel[2] in QKV_NAMES:
        return f"{layer}.qkv.{rel[2]}"
    if r == "attention.output":
        return f"{layer}.add_ln.attention"
    if r == "attention.output.dense":
        return f"{layer}.attention.out_proj"
    if r == "intermediate":
        return f"{layer}.ffn.intermediate"
    if r == "output":
        return f"{layer}.add_ln.ffn"
    if r == "output.dense":
        return f"{layer}.ffn.output"
    return None


def group_of(name: Optional[str], prefix: str = PREFIX) -> str:
    """Op group of a range name (``bertfast.layer3.attention`` -> ``attention``)."""
    if not name or not name.startswith(prefix + "."):
        return "other"
    parts = name[len(prefix) + 1:].split(".")
    if parts[0] in ("embeddings", "embeddings_layernorm", "embedding"):
        return "embeddings"
    if parts[0].startswith("layer") and len(parts) > 1:
        op = parts[1].lower()
        if op in ("qkv", "qkv_projection"):
            return "qkv"
        if op in ("attention", "attn", "attention_core", "sdpa"):
            return "attention"
        if op in ("add_ln", "add_layernorm", "add+ln", "layernorm", "ln"):
            return "add+LN"
        if op in ("ffn", "mlp", "intermediate", "linear_gelu"):
            return "ffn"
    return "other"


# --------------------------------------------------------------------------- instrumentation
class _Range:
    """record_function + (on CUDA) NVTX range, as a context manager."""

    def __init__(self, name: str, nvtx: bool):
        self.name, self.nvtx = name, nvtx

    def __enter__(self):
        self.rf = torch.autograd.profiler.record_function(self.name)
        self.rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self.rf.__exit__(None, None, None)
        return False


# bertfast.ops entry point -> op suffix of its range (None: decided per call)
_FUNCTIONAL_OPS = {
    "qkv_projection": "qkv",
    "attention": "attention",
    "attention_varlen": "attention",
    "add_layernorm": "add_ln",
    "add_layernorm_partials": "add_ln",
    "linear": None,  # first in a layer: attention output projection; later ones: FFN
    "linear_partials": None,  # the same (a split-K GEMM whose sums the next add_ln adds)
    "embeddings_layernorm": "embeddings",
}


class instrument:
    """Context manager: profiler (and NVTX on CUDA) ranges around the forward of every module of
    ``model`` that :func:`range_name` names.  ``names`` maps module name -> range name.

    The layers run functionally (``bertfast.modeling.layer_forward``: no submodule forward below
    the layer is called), so with ``functional=True`` the entry points it calls are wrapped too
    while the context is open: ``bertfast.modeling.layer_forward`` (-> ``bertfast.layerN``) and the
    ``bertfast.ops`` functions (-> ``bertfast.layerN.qkv`` / ``.attention`` / ``.attention.out_proj``
    / ``.add_ln`` / ``.ffn``, ``bertfast.embeddings``), and layer programs are off (a replay calls
    no op: bertfast/program.py).  Everything is restored on exit."""

    def __init__(self, model: torch.nn.Module, prefix: str = PREFIX, nvtx: Optional[bool] = None,
                 functional: bool = True):
        self.model = model
        self.prefix = prefix
        self.nvtx = torch.cuda.is_available() if nvtx is None else (nvtx and torch.cuda.is_available())
        self.functional = functional
        self.names: Dict[str, str] = {}
        self._handles: list = []
        self._open: Dict[int, list] = defaultdict(list)
        self._patched: list = []  # (object, attribute, original)
        self._layer: list = [None]  # index of the layer the functional path is in
        self._linears = 0  # linear calls so far in that layer

    # ---- functional (Triton backend) path
    def _layer_index(self) -> Dict[int, int]:
        for name, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] in ("layer", "layers"):
                return {id(m): i for i, m in enumerate(mod)}
        return {}

    def _op_range(self, op: str, args, kwargs) -> str:
        suffix = _FUNCTIONAL_OPS.get(op, op)
        i = self._layer[0]
        if op in ("linear", "linear_partials"):  # in a post-LN layer the first GEMM after attention is its
            # output projection
            self._linears += 1
            suffix = "attention.out_proj" if self._linears == 1 and i is not None else "ffn"
        if suffix == "embeddings" or i is None:
            return f"{self.prefix}.{suffix}"
        return f"{self.prefix}.layer{i}.{suffix}"

    def _patch(self, obj, attr, wrapper):
        self._patched.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, wrapper)

    def _patch_functional(self):
        import bertfast.modeling as fast
        from bertfast import ops, program

        index = self._layer_index()
        orig_layer = fast.layer_forward
        inst = self

        def layer_forward(layer, *a, **k):
            i = index.get(id(layer))
            prev = inst._layer[0], inst._linears
            inst._layer[0], inst._linears = i, 0
            try:
                with _Range(f"{inst.prefix}.layer{i}" if i is not None else f"{inst.prefix}.layer", inst.nvtx):
                    return orig_layer(layer, *a, **k)
            finally:
                inst._layer[0], inst._linears = prev

        self._patch(fast, "layer_forward", layer_forward)
        self._patch(program, "ENABLED", [False])  # a replayed layer program calls no op: every op is named
        for op in _FUNCTIONAL_OPS:
            self._patch(ops, op, self._op_wrapper(op, getattr(ops, op)))

    def _op_wrapper(self, op: str, orig):
        def wrapped(*a, **k):
            with _Range(self._op_range(op, a, k), self.nvtx):
                return orig(*a, **k)

        wrapped.__wrapped__ = orig
        return wrapped

    def _pre(self, name: str):
        def hook(module, args):
            self._open[id(module)].append(_Range(name, self.nvtx).__enter__())

        return hook

    def _post(self, module, args, output):
        stack = self._open.get(id(module))
        if stack:
            stack.pop().__exit__()

    def __enter__(self):
        if self.functional:
            self._patch_functional()
        for mname, module in self.model.named_modules():
            rn = range_name(mname, self.prefix)
            if rn is None:
                continue
            self.names[mname] = rn
            self._handles.append(module.register_forward_pre_hook(self._pre(rn)))
            try:
                self._handles.append(module.register_forward_hook(self._post, always_call=True))
            except TypeError:  # older torch: no always_call
                self._handles.append(module.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, attr, orig in reversed(self._patched):
            setattr(obj, attr, orig)
        self._patched.clear()
        for stack in self._open.values():  # ranges left open by an exception
            while stack:
                stack.pop().__exit__()
        return False


# --------------------------------------------------------------------------- attribution
def _enclosing_range(evt, prefix: str):
    e = evt
    while e is not None:
        if e.name.startswith(prefix + "."):
            return e
        e = getattr(e, "cpu_parent", None)
    return None


def _is_device_event(evt) -> bool:
    dt = getattr(evt, "device_type", None)
    return dt is not None and getattr(dt, "name", str(dt)).upper() not in ("CPU",)


def attribute(events, cuda: bool, prefix: str = PREFIX) -> Dict[str, Any]:
    """Charge every CPU op (``cuda=False``: its self CPU time) or GPU kernel (``cuda=True``) of the
    profiled forwards to the innermost ``bertfast.*`` range around it.

    Returns {"rows": [...per (group, name)...], "groups": {group: us}, "total_us", "forward_us",
    "forwards", "unattributed_us"}.  Times in microseconds."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    forward_us, forwards = 0.0, 0
    device_total = 0.0
    for e in events:
        if _is_device_event(e):
            if cuda:
                device_total += e.time_range.end - e.time_range.start
            continue
        if e.name == f"{prefix}.forward":
            forward_us += e.time_range.end - e.time_range.start
            forwards += 1
        rng = _enclosing_range(e, prefix)
        if rng is None:
            continue  # outside the profiled forwards
        group = group_of(rng.name, prefix)
        if cuda:
            for k in getattr(e, "kernels", []) or []:
                if getattr(e, "is_legacy", False) and k.name == e.name:
                    continue
                key = (group, k.name)
                r = rows.setdefault(key, {"group": group, "name": k.name, "calls": 0, "total_us": 0.0})
                r["calls"] += 1
                r["total_us"] += float(k.duration)
        else:
            is_range = e is rng  # a range's self time: Python / framework work between its ops
            key = (group, f"[python / framework: {group}]" if is_range else e.name)
            r = rows.setdefault(key, {"group": group, "name": key[1], "calls": 0, "total_us": 0.0})
            r["calls"] += 0 if is_range else 1
            r["total_us"] += float(e.self_cpu_time_total)
    total = sum(r["total_us"] for r in rows.values())
    unattributed = 0.0
    if cuda and device_total > total:
        unattributed = device_total - total
        rows[("other", "[kernels outside any range]")] = {"group": "other", "name": "[kernels outside any range]",
                                                          "calls": 0, "total_us": unattributed}
        total = device_total
    groups = {g: 0.0 for g in GROUPS}
    for r in rows.values():
        groups[r["group"]] = groups.get(r["group"], 0.0) + r["total_us"]
    out_rows = sorted(rows.values(), key=lambda r: -r["total_us"])
    for r in out_rows:
        r["mean_us"] = r["total_us"] / r["calls"] if r["calls"] else None
        r["share"] = r["total_us"] / total if total else 0.0
    return {"rows": out_rows, "groups": groups, "total_us": total, "forward_us": forward_us, "forwards": forwards,
            "unattributed_us": unattributed, "time_kind": "GPU kernel time" if cuda else "CPU self time"}


def format_tables(att: Dict[str, Any], top: int = 30, title: str = "") -> str:
    n = max(att["forwards"], 1)
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines.append(f"{att['forwards']} profiled forwards; wall time per forward (CPU side) "
                 f"{att['forward_us'] / n / 1e3:.3f} ms; {att['time_kind']} per forward {att['total_us'] / n / 1e3:.3f} ms")
    lines += ["", "## by op group", "", "| group | total ms | per forward ms | share of forward |", "|---|---|---|---|"]
    for g, us in sorted(att["groups"].items(), key=lambda kv: -kv[1]):
        share = us / att["total_us"] if att["total_us"] else 0.0
        lines.append(f"| {g} | {us / 1e3:.3f} | {us / n / 1e3:.3f} | {100 * share:.1f}% |")
    what = "kernel" if att["time_kind"].startswith("GPU") else "op"
    lines += ["", f"## by {what} (top {top})", "",
              f"| group | {what} | calls | total ms | mean us | share of forward |", "|---|---|---|---|---|---|"]
    for r in att["rows"][:top]:
        name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
        mean = "-" if r["mean_us"] is None else f"{r['mean_us']:.1f}"
        lines.append(f"| {r['group']} | `{name}` | {r['calls']} | {r['total_us'] / 1e3:.3f} | {mean} | "
                     f"{100 * r['share']:.1f}% |")
    if len(att["rows"]) > top:
        rest = sum(r["total_us"] for r in att["rows"][top:])
        lines.append(f"| | ({len(att['rows']) - top} more) | | {rest / 1e3:.3f} | | "
                     f"{100 * rest / att['total_us'] if att['total_us'] else 0:.1f}% |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- profiling
def profile_forward(model, call, steps: int = 3, warmup: int = 2, cuda: bool = False,
                    trace_path: Optional[str] = None, prefix: str = PREFIX) -> Dict[str, Any]:
    """Run ``call()`` (one forward of ``model``) ``warmup`` times, then ``steps`` times under the
    profiler with :class:`instrument` ranges; returns :func:`attribute`'s dict (+ ``ranges``)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(warmup):
            call()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with instrument(model, prefix) as inst, torch.inference_mode():
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(steps):
                call()
            if cuda:
                torch.cuda.synchronize()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    att = attribute(prof.events(), cuda, prefix)
    att["ranges"] = dict(inst.names)
    return att


def _load(args, device, dtype):
    """(model to instrument, callable for the forward)."""
    from bertfast.bench.suites import MODEL_SHAPES, ModelCache

    cache = ModelCache(device, dtype)
    if args.model in MODEL_SHAPES or args.model == "minilm-l6":
        name = "minilm" if args.model == "minilm-l6" else args.model
        if args.impl == "transformers":
            return cache.transformers(name, args.attn), cache.notes.get(name, "")
        base = cache.bertfast_base(name)
        note = cache.notes.get(name, "")
    else:
        from bertfast.modeling import BertModel

        base = BertModel.from_pretrained(args.model, dtype=dtype, device=device).eval()
        note = f"weights: {args.model}"
        if args.impl == "transformers":
            import transformers

            hf = transformers.BertModel.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
            return hf.to(device).eval(), note
    if args.backend is not None:
        base.set_backend(args.backend)
    # the ranges are the eager forward's: CUDA-graph replay would show one replay, not the ops
    base.set_backend(base.backend, graphs=False)
    return base, note


def run(args) -> int:
    """Run ``bertfast profile`` with the arguments bertfast/cli/bench.py parsed; returns the exit status."""
    from bertfast.bench import _resolve_dtype
    from bertfast.bench.harness import Unavailable, device_slug, environment, interpreter_active
    from bertfast.bench.suites import lengths_for

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bertfast: error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = _resolve_dtype(args.dtype, cuda)
    if args.batch < 1 or args.seq < 1 or args.steps < 1:
        print("bertfast: error: --batch, --seq and --steps must be positive", file=sys.stderr)
        return 2
    if interpreter_active() and args.impl == "bertfast" and args.backend in ("triton", "auto"):
        print("bertfast profile: TRITON_INTERPRET=1 is set: Triton kernels would be interpreted; the profile would "
              "say nothing about GPU performance", file=sys.stderr)
        return 2
    if not cuda:
        print("bertfast profile: no CUDA GPU: profiling the PyTorch path on CPU (CPU op times; Triton kernels need a "
              "CUDA GPU)", file=sys.stderr)
    try:
        model, note = _load(args, device, dtype)
    except Unavailable as e:
        print(f"bertfast: error: {e}", file=sys.stderr)
        return 2
    lengths = lengths_for(args.lengths, args.batch, args.seq, 0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30522, (args.batch, args.seq), generator=g)
    mask = torch.zeros(args.batch, args.seq, dtype=torch.long)
    for i, L in enumerate(lengths):
        mask[i, :L] = 1
    ids, mask = (ids * mask).to(device), mask.to(device)

    def call():
        return model(input_ids=ids, attention_mask=mask)

    os.makedirs(args.out, exist_ok=True)
    model_tag = os.path.basename(os.path.normpath(args.model)) if args.model not in ("minilm", "bert-base",
                                                                                     "bert-large") else args.model
    dn = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    env = environment(device, getattr(args, "_command", None))
    stem = f"profile_{model_tag}_{args.impl}_b{args.batch}_s{args.seq}_{args.lengths}_{dn}_{device_slug(env)}"
    stem_path = os.path.join(args.out, stem)
    trace = stem_path + ".trace.json"
    att = profile_forward(model, call, steps=args.steps, warmup=args.warmup, cuda=cuda, trace_path=trace)
    backend = getattr(model, "backend", None) if args.impl == "bertfast" else f"transformers {args.attn}"
    title = (f"bertfast profile: {args.model} ({args.impl}{', backend ' + str(backend) if backend else ''}), "
             f"batch {args.batch}, seq {args.seq}, lengths {args.lengths}, {dn}, {env['device']['name']}")
    text = format_tables(att, top=args.top, title=title)
    if note:
        text += f"\n{note}\n"
    with open(stem_path + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    doc = {"schema": "bertfast.profile/1", "environment": env,
           "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)},
           "trace": os.path.basename(trace), **{k: v for k, v in att.items()}}
    with open(stem_path + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(text)
    print(f"bertfast profile: wrote {trace} (open in https://ui.perfetto.dev), {stem_path}.md, {stem_path}.json",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """``bertfast profile`` stand-alone (bertfast/cli/bench.py parses)."""
    from bertfast.cli.bench import profile_main

    return profile_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
