"""CUDA graphs for every shape: capture the forward once per bucket, replay it.

    runner = bertfast.CudaGraphRunner(model, max_batch=8, max_seq=128)
    out = runner(input_ids, attention_mask)       # same output type as model(...), sliced to (B, S)

bertfast's models also replay by default for inference on CUDA (``maybe_replay``, called at the
top of their ``__call__``; ``model.set_backend(..., graphs=False)`` / ``RuntimeOptions.graphs``
turns it off).  Only plain calls replay: eval mode, grad mode off, CUDA parameters, the triton
backend, ``input_ids`` / 2-D ``attention_mask`` / ``token_type_ids`` only (no labels, no output
flags), a shape within the largest bucket, no forward hooks on the model, not while compiling
or capturing (``graph_inputs`` gives the reason for any call).  Hooks on submodules run at the
capture only.

At small batches a BERT forward is a few dozen small kernel launches and the CPU's launch
overhead is most of the latency.  A CUDA graph replays all of them with one launch.

**Buckets** (one table, ``BUCKETS``).  A call of shape (B, S) with T real tokens runs in the
smallest bucket that holds it: ``batch`` >= B and ``seq`` >= S from the table (capped at
``max_batch`` / ``max_seq``, the largest bucket being exactly those), and, when the forward runs
padding-free, ``tokens`` >= T from the token table (m * 2**k for m = 4, 5, 6, 7: each step at
most 25 % more, at most four buckets per doubling), capped at batch * seq.  ``plan_bucket`` is
the pure function that decides.  Extra rows and columns of a bucket are padding (mask 0: they
change nothing for the real tokens); extra token slots are *slack* (``Packing.from_mask_static``,
kernels/padding.py: computed, never read, dropped).

**Per call** (``CudaGraphRunner.__call__``): the inputs are validated and the route is planned
eagerly by ``bertfast.modeling.plan_forward`` on the caller's tensors: ONE host read (the value
checks and the padding statistics, T included), or none for inputs that ``bertfast.plan.to_device``
copied from the host (it read them there, before the copy): the replay then starts without
waiting for the device.  The route (padded or packed), B, S and T pick
the bucket; the inputs are copied into that bucket's static buffers (ids, mask, token types;
the padding rows / columns get mask 0); the graph replays; the outputs are sliced back to
(B, S) and cloned (a later replay overwrites the static outputs).

**Capture** happens on the first use of a bucket, on that call's inputs (already copied into
the buffers: a valid batch for the warm-up runs, which compile the kernels).  Inside
``bertfast.kernels._common.trusted_inputs()`` and ``torch.no_grad()``, the plan of the forward is forced
(``bertfast.modeling.plan_override``) to one built *inside the captured region from the static
buffers*: ``Packing.from_mask_static(mask_buf, tokens)`` (device ops: indices and cu_seqlens are
recomputed from the buffer at every replay) or, for the padded route, the mask buffer itself.
The model is then called exactly as a user calls it, so bertfast's models and transformers
models given to ``bertfast.optimize`` both work (both plan through ``plan_forward``).  Nothing
captured depends on a cache outside the graph's inputs: no mask analysis, packing or plan from
one particular batch survives into the replays.

**Memory** per bucket is bounded by the bucket's size (at most max_batch * max_seq tokens) and
reported (``stats()``: device memory the capture reserved, the static outputs' and buffers'
bytes).  All graphs of a runner share one memory pool (they never run concurrently, and every
output is cloned right after its replay).  ``max_graphs`` bounds how many are kept (least
recently used dropped first); ``max_memory`` (bytes) bounds what they reserve: past it, every
graph and the pool are released before the next capture.

Inference only: the model must be in eval mode; the forward runs under ``torch.no_grad``.  Calls
under ``torch.no_grad()`` and ``torch.inference_mode()`` share the graphs, in any order: the
buffers and the captured outputs are ordinary tensors whatever the first call's mode.
"""
from __future__ import annotations

import contextvars
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bertfast.kernels._common import trusted_inputs
from bertfast.kernels.padding import Packing


def _token_table(lo: int = 16, hi: int = 256 * 512, steps: Sequence[int] = (4, 5, 6, 7)) -> Tuple[int, ...]:
    """m * 2**k for m in ``steps``, from ``lo`` to ``hi``: ratio between neighbours <= 1.25."""
    out = set()
    k = 0
    while steps[0] << k <= hi:
        out.update(m << k for m in steps if lo <= m << k <= hi)
        k += 1
    return tuple(sorted(out))


# The one bucket table: batch sizes, sequence lengths, token counts (packed route).
BUCKETS: Dict[str, Tuple[int, ...]] = {
    "batch": (1, 2, 4, 8, 16, 32, 64, 128, 256),
    "seq": (16, 32, 64, 128, 256, 384, 512),
    "tokens": _token_table(),
}

# Limits of the runner that ``maybe_replay`` makes for a model (default-on graphs).
AUTO = dict(max_batch=32, max_graphs=16, max_memory=2 * 2**30)

_RUNNER_ATTR = "_bertfast_cuda_graphs"
_IN_RUNNER = contextvars.ContextVar("bertfast_cuda_graphs_running", default=False)


class CaptureError(RuntimeError):
    """A graph could not be made (buffers allocated, warm-up, capture): the device cannot
    capture what the forward does.  ``maybe_replay`` turns graphs off for the model on it; any
    other error of a replayed call (filling the buffers, the replay) is not a capture failure."""


# 2-D (batch, seq) outputs that are per token (the others, (batch, features), are per sequence)
_PER_TOKEN_2D = frozenset({"start_logits", "end_logits"})


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"CudaGraphRunner: {name} must be an int >= {lo}, got {v!r}")
    return v


# ----------------------------------------------------------------------------- bucket plan


@dataclass(frozen=True)
class Limits:
    """The buckets one runner may use: sorted batch sizes, sequence lengths and token counts
    (the largest batch / seq bucket is the runner's max_batch / max_seq)."""

    batch: Tuple[int, ...]
    seq: Tuple[int, ...]
    tokens: Tuple[int, ...] = BUCKETS["tokens"]

    @property
    def max_batch(self) -> int:
        return self.batch[-1]

    @property
    def max_seq(self) -> int:
        return self.seq[-1]

    @classmethod
    def make(cls, max_batch: int, max_seq: int, batch_buckets: Optional[Sequence[int]] = None,
             seq_buckets: Optional[Sequence[int]] = None, table: Dict[str, Tuple[int, ...]] = BUCKETS) -> "Limits":
        """From the table (or explicit bucket lists): the entries below the maximum, then the
        maximum itself."""
        max_batch, max_seq = _check_int("max_batch", max_batch), _check_int("max_seq", max_seq)
        out = []
        for name, given, top, key in (("batch_buckets", batch_buckets, max_batch, "batch"),
                                      ("seq_buckets", seq_buckets, max_seq, "seq")):
            if given is not None:
                vals = sorted({_check_int(name, int(v) if not isinstance(v, bool) else v) for v in given})
                if vals[-1] < top:
                    raise ValueError(f"CudaGraphRunner: the largest of {name} ({vals[-1]}) must hold {top}")
                vals = [v for v in vals if v < top] + [top]
            else:
                vals = [v for v in table[key] if v < top] + [top]
            out.append(tuple(vals))
        return cls(out[0], out[1], tuple(table["tokens"]))

    def fits(self, B: int, S: int) -> bool:
        return 1 <= B <= self.max_batch and 1 <= S <= self.max_seq

    def token_buckets(self, batch: int, seq: int) -> Tuple[int, ...]:
        """The token buckets of a (batch, seq) bucket: table entries below batch * seq, then
        batch * seq (a bounded number: at most four per doubling)."""
        cap = batch * seq
        return tuple(t for t in self.tokens if t < cap) + (cap,)


@dataclass(frozen=True)
class Bucket:
    """A captured shape: the static buffers are (batch, seq); ``tokens`` is the packed
    capacity (padding-free route) or None (the padded route)."""

    batch: int
    seq: int
    tokens: Optional[int] = None

    @property
    def packed(self) -> bool:
        return self.tokens is not None

    def padding(self, B: int, S: int, T: Optional[int] = None) -> Dict[str, int]:
        """What the bucket adds to a (B, S) call with T real tokens: padding rows, padding
        columns, slack token slots (packed route; 0 for the padded one)."""
        return {"rows": self.batch - B, "cols": self.seq - S,
                "slack": (self.tokens - T) if self.packed and T is not None else 0}


def _pick(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"CudaGraphRunner: {what} {n} is larger than the largest bucket ({buckets[-1]})")


def plan_bucket(B: int, S: int, T: Optional[int], packed: bool, limits: Limits) -> Bucket:
    """The bucket of a (B, S) call with T real tokens (None: not known / not needed) on the
    padded (``packed=False``) or padding-free route.  Pure: no tensor, no device."""
    for name, v in (("batch size", B), ("sequence length", S)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"CudaGraphRunner: {name} must be a positive int, got {v!r}")
    batch = _pick(B, limits.batch, "batch size")
    seq = _pick(S, limits.seq, "sequence length")
    if not packed:
        return Bucket(batch, seq, None)
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= B * S:
        raise ValueError(f"CudaGraphRunner: the packed route needs the real token count T in [1, B * S = {B * S}], "
                         f"got {T!r}")
    return Bucket(batch, seq, _pick(T, limits.token_buckets(batch, seq), "token count"))


# ----------------------------------------------------------------------------- the model's runtime


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder root of a bertfast model / head or a transformers BERT model (where its
    runtime options and pooler live)."""
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    return inner if isinstance(inner, torch.nn.Module) else model


def _runtime(model: torch.nn.Module) -> Tuple[str, Any, bool, bool]:
    """(backend name, unpad mode, graphs on, is a bertfast-planned model) of a model."""
    from bertfast.options import ATTR, options_of

    enc = encoder_of(model)
    if ATTR in enc.__dict__:
        o = options_of(enc)
        return o.backend, o.unpad, o.graphs, True
    legacy = enc.__dict__.get("_bertfast_options")  # bertfast.optimize before RuntimeOptions
    if isinstance(legacy, dict):
        return legacy.get("backend", "auto"), legacy.get("unpad", True), bool(legacy.get("graphs", True)), True
    from bertfast.modeling import BertPreTrainedModel

    cfg = getattr(model, "config", None)
    ours = isinstance(model, BertPreTrainedModel) or isinstance(enc, BertPreTrainedModel)
    return getattr(cfg, "backend", "auto"), getattr(cfg, "unpad", True), True, ours


def _param(model):
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("CudaGraphRunner: the model has no parameters")
    return p


# ----------------------------------------------------------------------------- outputs


def _map(fn, obj, key=None):
    """fn(tensor, key) on every tensor of a (nested) model output; keeps its type."""
    if isinstance(obj, torch.Tensor):
        return fn(obj, key)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, o, key) for o in obj)
    if hasattr(obj, "keys") and hasattr(obj, "__getitem__"):  # bertfast / transformers ModelOutput, dict
        kwargs = {k: _map(fn, obj[k], k) for k in obj.keys()}
        try:
            return type(obj)(**kwargs)
        except TypeError:
            return kwargs
    return obj


def _cutter(bb: int, sb: int, B: int, S: int):
    def cut(t: torch.Tensor, key) -> torch.Tensor:
        per_token = t.dim() >= 3 or key in _PER_TOKEN_2D or key is None
        if t.dim() >= 2 and t.shape[0] == bb and t.shape[1] == sb and per_token:
            return t[:B, :S].clone()
        if t.dim() >= 1 and t.shape[0] == bb:
            return t[:B].clone()
        return t.clone()
    return cut


def _nbytes(obj) -> int:
    n = [0]

    def add(t, key):
        n[0] += t.numel() * t.element_size()
        return t
    _map(add, obj)
    return n[0]


# ----------------------------------------------------------------------------- capture backends


class CudaCapture:
    """The device part of a capture: warm-up on a side stream, ``torch.cuda.graph`` into the
    runner's pool, the device memory it reserved.  (CPU tests hand the runner a stub with the
    same three methods.)"""

    def __init__(self, device: torch.device):
        self.device = device

    def new_pool(self):
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], Any], pool, warmup: int):
        """-> (graph with .replay(), the static output, bytes reserved)."""
        dev = self.device
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_reserved(dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):  # compiles the Triton kernels, settles the allocator
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        torch.cuda.synchronize(dev)
        return graph, out, max(0, torch.cuda.memory_reserved(dev) - before)

    def release(self):
        """After the runner dropped its graphs: hand their memory back to the device."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()


def _has_key_lengths() -> bool:
    from dataclasses import fields

    from bertfast.modeling import ForwardPlan

    return any(f.name == "key_lengths" for f in fields(ForwardPlan))


def mask_kind(plan) -> str:
    """How the graph of an eager plan's route masks: "packed" (padding-free), "additive" (the
    padded route with a 4-D additive mask: a row with no real key), "lengths" (the padded route
    with a prefix mask, as per-row key lengths: right padding or none, which the bucket's padding
    rows and columns keep a prefix) or "keys" (the 0/1 mask: holes, left padding)."""
    if plan.packing is not None:
        return "packed"
    if torch.is_tensor(plan.mask) and plan.mask.dim() == 4:
        return "additive"
    if (plan.mask is None or getattr(plan, "key_lengths", None) is not None) and _has_key_lengths():
        return "lengths"
    return "keys"


class _Graph:
    def __init__(self, key, bucket: Bucket, kind: str, inputs: Dict[str, torch.Tensor]):
        self.key, self.bucket, self.kind = key, bucket, kind
        self.inputs = inputs
        self.graph = None
        self.output: Any = None
        self.plan = None  # the ForwardPlan the last run of the captured body used
        self.reserved_bytes = 0
        self.replays = 0
        self.capture_s = 0.0


class CudaGraphRunner:
    """Bucketed CUDA-graph replay of ``model(input_ids=, attention_mask=, token_type_ids=)``.

    ``model``: a bertfast model (BertModel or a head) or a transformers BERT model accelerated
    with ``bertfast.optimize``, on a CUDA device, in eval mode.  ``max_batch`` / ``max_seq``: the
    largest bucket (default max_seq: the position table).  ``batch_buckets`` / ``seq_buckets``:
    other bucket lists than ``BUCKETS``'.  ``warmup``: eager runs before each capture.
    ``max_graphs``: graphs kept (least recently used dropped); ``max_memory``: bytes the graphs
    may reserve before all are released (None: no bound).  ``capture``: the device part
    (default ``CudaCapture``; tests pass a stub).

    Outputs are cut back to the call's (B, S): a tensor whose first two dims are the bucket's
    (batch, seq) and that has a third dim, or a 2-D one named ``start_logits`` / ``end_logits``,
    is per token ([:B, :S]); any other tensor whose first dim is the bucket's batch is per
    sequence ([:B]).  In a tuple output (no names) every 2-D (batch, seq) tensor counts as per
    token.  Every output is a copy (the next replay overwrites the static outputs).

    A graph holds the addresses of the weights: replacing a parameter or buffer (``.half()``,
    ``.to()``, a new Parameter) drops every graph at the next call (in-place updates, e.g.
    ``load_state_dict``, are seen by the replays)."""

    def __init__(self, model: torch.nn.Module, max_batch: int = 32, max_seq: Optional[int] = None,
                 batch_buckets: Optional[Sequence[int]] = None, seq_buckets: Optional[Sequence[int]] = None,
                 warmup: int = 2, max_graphs: int = 64, max_memory: Optional[int] = None, capture=None):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"CudaGraphRunner: model must be a torch.nn.Module, got {type(model).__name__}")
        device = _param(model).device
        if capture is None:
            if not torch.cuda.is_available():
                raise ValueError("CudaGraphRunner needs a CUDA GPU (torch.cuda.is_available() is False)")
            if device.type != "cuda":
                raise ValueError(f"CudaGraphRunner: the model is on {device}; move it to a CUDA device first")
            capture = CudaCapture(device)
        if model.training:
            raise ValueError("CudaGraphRunner: the model must be in eval mode (call model.eval())")
        if not _runtime(model)[3]:
            raise ValueError("CudaGraphRunner: the model must be a bertfast model or a transformers model given to "
                             "bertfast.optimize (its forward must plan through bertfast.modeling.plan_forward)")
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise ValueError("CudaGraphRunner: the model has no config")
        max_pos = int(getattr(cfg, "max_position_embeddings", 512))
        max_seq = max_pos if max_seq is None else max_seq
        _check_int("max_seq", max_seq)
        if max_seq > max_pos:
            raise ValueError(f"CudaGraphRunner: max_seq {max_seq} is longer than max_position_embeddings={max_pos}")
        self.limits = Limits.make(max_batch, max_seq, batch_buckets, seq_buckets)
        if self.limits.seq[-1] > max_pos:  # pragma: no cover - Limits caps at max_seq
            raise ValueError("CudaGraphRunner: a seq bucket is longer than the position table")
        self.warmup = _check_int("warmup", warmup, 0)
        self.max_graphs = _check_int("max_graphs", max_graphs)
        if max_memory is not None:
            _check_int("max_memory", max_memory)
        self.max_memory = max_memory
        self.model, self.config, self.device = model, cfg, device
        self.max_batch, self.max_seq = self.limits.max_batch, self.limits.max_seq
        self.batch_buckets, self.seq_buckets = self.limits.batch, self.limits.seq
        self.pad_token_id = int(getattr(cfg, "pad_token_id", 0) or 0)
        self._capture_api = capture
        self._graphs: "OrderedDict[tuple, _Graph]" = OrderedDict()
        self._pool = capture.new_pool()
        self._weights = self._weights_key()
        self.evictions = 0
        self.resets = 0
        self.disabled = ""  # why maybe_replay stopped using this runner ("" while it is on)

    # ------------------------------------------------------------------ bookkeeping
    def _weights_key(self):
        """Where the weights live: a graph holds their addresses, so it is dropped when a
        parameter or buffer is replaced (``model.half()``, ``.to()``, a new Parameter, a new
        submodule).  Walks the module tree's own tables at every call (nothing kept between
        calls; ``model.parameters()`` would cost four times as much)."""
        out = []

        def walk(mod):
            for table in (mod._parameters, mod._buffers):
                for t in table.values():
                    out.append(t.data_ptr() if t is not None else 0)
            for child in mod._modules.values():
                if child is not None:
                    walk(child)

        walk(self.model)
        return tuple(out)

    def reset(self) -> None:
        """Release every graph and the memory pool."""
        self._graphs.clear()
        self._capture_api.release()
        self._pool = self._capture_api.new_pool()
        self.resets += 1

    def captured_shapes(self) -> List[Tuple[int, int]]:
        """The (batch, seq) of every captured graph (padded and packed)."""
        return sorted({(g.bucket.batch, g.bucket.seq) for g in self._graphs.values()})

    def captured(self) -> List[Bucket]:
        return [g.bucket for g in self._graphs.values()]

    def stats(self) -> Dict[str, Any]:
        """Per graph: bucket, mask kind, device memory reserved by its capture, static output
        and input bytes, replays, capture time; and the totals."""
        rows = []
        for g in self._graphs.values():
            rows.append({"batch": g.bucket.batch, "seq": g.bucket.seq, "tokens": g.bucket.tokens,
                         "mask": g.kind,
                         "reserved_bytes": g.reserved_bytes, "output_bytes": _nbytes(g.output),
                         "buffer_bytes": _nbytes(g.inputs), "replays": g.replays, "capture_s": g.capture_s})
        return {"graphs": rows, "reserved_bytes": sum(r["reserved_bytes"] for r in rows),
                "max_graphs": self.max_graphs, "max_memory": self.max_memory,
                "evictions": self.evictions, "resets": self.resets}

    def fits(self, B: int, S: int) -> bool:
        return self.limits.fits(B, S)

    # ------------------------------------------------------------------ plan
    def _backend(self) -> str:
        from bertfast.backend import resolve_for

        name = _runtime(self.model)[0]
        return resolve_for(name, self.device, self.config, _param(self.model).dtype)

    def plan(self, input_ids, attention_mask=None, token_type_ids=None):
        """Validate and plan the call (one host read; none for ``bertfast.plan.to_device``'s
        copies): -> (ForwardPlan, Bucket, mask kind (see ``mask_kind``), backend)."""
        from bertfast.modeling import plan_forward

        enc = encoder_of(self.model)
        backend = self._backend()
        unpad = _runtime(self.model)[1]
        dtype = _param(self.model).dtype
        plan = plan_forward(self.config, input_ids, attention_mask, token_type_ids, None, None, dtype,
                            triton=backend == "triton", causal=bool(getattr(self.config, "is_decoder", False)),
                            reads_first_token=getattr(enc, "pooler", None) is not None, unpad=unpad)
        packed = plan.packing is not None
        if packed and backend != "triton":
            raise ValueError("CudaGraphRunner: the padding-free route of the torch backend needs host-side sequence "
                             "lengths and cannot be captured; use the triton backend or unpad=False")
        bucket = plan_bucket(plan.B, plan.S, plan.packing.total if packed else None, packed, self.limits)
        return plan, bucket, mask_kind(plan), backend

    def _static_plan(self, g: _Graph):
        """The plan of the captured body, built from the static buffers (device ops only)."""
        from bertfast.modeling import ForwardPlan, additive_mask_from

        b, mask = g.bucket, g.inputs["attention_mask"]
        if g.kind == "packed":
            return ForwardPlan(b.batch, b.seq, Packing.from_mask_static(mask, b.tokens), None)
        if g.kind == "additive":  # a fully padded row: transformers' uniform softmax, as the eager plan
            return ForwardPlan(b.batch, b.seq, None, additive_mask_from(mask, _param(self.model).dtype,
                                                                         known_padded=True))
        if g.kind == "lengths":  # a prefix mask (right padding; the bucket's padding keeps it one)
            return ForwardPlan(b.batch, b.seq, None, mask, key_lengths=(mask != 0).sum(1, dtype=torch.int32))
        return ForwardPlan(b.batch, b.seq, None, mask)

    def _body(self, g: _Graph):
        """The captured function: the static plan from the buffers, then the model called as a
        user calls it, on the buffers.  Outside inference mode whatever the caller's mode, so that
        the static outputs are ordinary tensors, as the buffers are (``_new_graph``)."""
        from bertfast.modeling import plan_override

        token = _IN_RUNNER.set(True)
        try:
            with torch.inference_mode(False), torch.no_grad(), trusted_inputs():
                plan = self._static_plan(g)
                g.plan = plan
                with plan_override(plan):
                    return self.model(input_ids=g.inputs["input_ids"], attention_mask=g.inputs["attention_mask"],
                                      token_type_ids=g.inputs["token_type_ids"])
        finally:
            _IN_RUNNER.reset(token)

    def _new_graph(self, key, bucket: Bucket, kind: str) -> _Graph:
        """A bucket's static buffers.  Made outside inference mode whatever the first call's mode:
        an inference tensor could not be refilled by a later call under ``torch.no_grad`` (and an
        ordinary tensor can be refilled under both)."""
        dev = self.device
        shape = (bucket.batch, bucket.seq)
        with torch.inference_mode(False):
            inputs = {
                "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long, device=dev),
                "attention_mask": torch.zeros(shape, dtype=torch.long, device=dev),
                "token_type_ids": torch.zeros(shape, dtype=torch.long, device=dev),
            }
        return _Graph(key, bucket, kind, inputs)

    def _fill(self, g: _Graph, input_ids, attention_mask, token_type_ids):
        B, S = input_ids.shape
        ids, mask, tt = g.inputs["input_ids"], g.inputs["attention_mask"], g.inputs["token_type_ids"]
        ids.fill_(self.pad_token_id)
        mask.zero_()
        tt.zero_()
        ids[:B, :S].copy_(input_ids)
        if attention_mask is None:
            mask[:B, :S].fill_(1)
        else:
            mask[:B, :S].copy_(attention_mask)
        if token_type_ids is not None:
            tt[:B, :S].copy_(token_type_ids)

    def _capture(self, g: _Graph) -> None:
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)  # least recently used
            self.evictions += 1
        if self.max_memory is not None and self._graphs and \
                sum(x.reserved_bytes for x in self._graphs.values()) >= self.max_memory:
            self.reset()
        t0 = time.perf_counter()
        g.graph, g.output, g.reserved_bytes = self._capture_api.capture(lambda: self._body(g), self._pool,
                                                                         self.warmup)
        g.capture_s = time.perf_counter() - t0
        self._graphs[g.key] = g
        self._weights = self._weights_key()  # as captured (should the first forward have moved a weight)

    # ------------------------------------------------------------------ replay
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 token_type_ids: Optional[torch.Tensor] = None):
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError("CudaGraphRunner: input_ids must be a (batch, seq_len) integer tensor")
        if attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.dim() != 2):
            raise ValueError("CudaGraphRunner: attention_mask must be the 2-D (batch, seq_len) padding mask")
        if self.model.training:
            raise ValueError("CudaGraphRunner: the model is in training mode; graphs are for inference (model.eval())")
        B, S = input_ids.shape
        if not self.fits(B, S):
            raise ValueError(f"CudaGraphRunner: shape (batch, seq_len) = {(B, S)} does not fit the largest bucket "
                             f"{(self.max_batch, self.max_seq)}")
        dev = self.device
        input_ids = input_ids.to(dev)
        attention_mask = attention_mask.to(dev) if attention_mask is not None else None
        token_type_ids = token_type_ids.to(dev) if torch.is_tensor(token_type_ids) else token_type_ids
        weights = self._weights_key()
        if weights != self._weights:
            self.reset()
            self._weights = weights
        plan, bucket, kind, backend = self.plan(input_ids, attention_mask, token_type_ids)  # the host read, if any
        key = (bucket, kind, backend)
        g = self._graphs.get(key)
        if g is None:
            try:
                g = self._new_graph(key, bucket, kind)
            except RuntimeError as e:  # out of memory for the buffers
                raise CaptureError(f"{type(e).__name__}: {e}") from e
            self._fill(g, input_ids, attention_mask, token_type_ids)  # the capture's warm-up runs on this batch
            try:
                self._capture(g)
            except RuntimeError as e:
                raise CaptureError(f"{type(e).__name__}: {e}") from e
        else:
            self._graphs.move_to_end(key)
            self._fill(g, input_ids, attention_mask, token_type_ids)
        g.graph.replay()
        g.replays += 1
        return _map(_cutter(bucket.batch, bucket.seq, B, S), g.output)


# ----------------------------------------------------------------------------- default for inference


_HARMLESS = {  # keywords accepted at these values only
    "position_ids": (None,), "inputs_embeds": (None,), "labels": (None,), "head_mask": (None,),
    "start_positions": (None,), "end_positions": (None,), "past_key_values": (None,),
    "encoder_hidden_states": (None,), "encoder_attention_mask": (None,), "cache_position": (None,),
    "use_cache": (None, False), "output_hidden_states": (None, False), "output_attentions": (None, False),
    "return_dict": (None, True),
}
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_DEVICE_TYPE = "cuda"  # graphs replay on this device type (tests point it at the CPU)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None))


def _capturing_now() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _auto_max_seq(cfg) -> int:
    """The longest sequence ``maybe_replay``'s runner captures: the seq table's largest bucket,
    capped at the position table."""
    return min(BUCKETS["seq"][-1], int(getattr(cfg, "max_position_embeddings", 512)))


def graph_inputs(model, args: tuple, kwargs: dict):
    """Whether ``model(*args, **kwargs)`` may replay a CUDA graph: -> ((input_ids,
    attention_mask, token_type_ids), "") or (None, why not)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: dynamo cannot trace a ContextVar read
        return None, "compiling / tracing"
    if _IN_RUNNER.get():
        return None, "inside a runner (capture or warm-up)"
    if not isinstance(model, torch.nn.Module) or model.training:
        return None, "training mode"
    if torch.is_grad_enabled():
        return None, "grad mode is on"
    p = next(model.parameters(), None)
    if p is None or p.device.type != _DEVICE_TYPE:
        return None, "parameters not on CUDA"
    if _capturing_now():
        return None, "a CUDA graph is being captured"
    backend, _, graphs, ours = _runtime(model)
    if not graphs:
        return None, "graphs=False"
    if model._forward_hooks or model._forward_pre_hooks or _global_hooks():
        return None, "forward hooks (a replay would skip them)"
    if not ours:
        return None, "not a bertfast-planned model"
    if len(args) > len(_INPUTS):
        return None, "more than input_ids, attention_mask, token_type_ids positionally"
    got = dict(zip(_INPUTS, args))
    for k, v in kwargs.items():
        if k in _INPUTS:
            if k in got:
                return None, f"{k} given twice"
            got[k] = v
        elif k not in _HARMLESS or not any(v is ok for ok in _HARMLESS[k]):
            return None, f"keyword {k}={'<tensor>' if torch.is_tensor(v) else v!r}"
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None, "no config"
    for flag in ("output_hidden_states", "output_attentions"):
        if getattr(cfg, flag, False) is True:
            return None, f"config.{flag}"
    if getattr(cfg, "use_return_dict", True) is False or getattr(cfg, "return_dict", True) is False:
        return None, "config.return_dict is False (tuple outputs)"
    ids, mask, tt = (got.get(k) for k in _INPUTS)
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        return None, "input_ids is not a 2-D integer tensor"
    if ids.device != p.device:
        return None, "input_ids not on the model's device"
    for name, t in (("attention_mask", mask), ("token_type_ids", tt)):
        if t is None:
            continue
        if not torch.is_tensor(t) or t.dim() != 2 or t.device != p.device:
            return None, f"{name} is not a 2-D tensor on the model's device"
    try:
        from bertfast.backend import resolve_for

        if resolve_for(backend, p.device, cfg, p.dtype) != "triton":
            return None, "the backend does not resolve to triton"
    except ValueError as e:
        return None, str(e)
    B, S = ids.shape
    max_seq = _auto_max_seq(cfg)
    if not (1 <= B <= AUTO["max_batch"] and 1 <= S <= max_seq):
        return None, f"shape {(B, S)} larger than the largest bucket {(AUTO['max_batch'], max_seq)}"
    return (ids, mask, tt), ""


class _Slot:
    """Holds a model's runner in its ``__dict__``; copies and pickles of the model get none
    (a CUDA graph cannot be copied: the copy captures its own)."""

    def __init__(self, runner):
        self.runner = runner

    def __deepcopy__(self, memo):
        return _Slot(None)

    def __reduce__(self):
        return (_Slot, (None,))


def runner_of(model, create: bool = False, capture=None) -> Optional[CudaGraphRunner]:
    """The runner ``maybe_replay`` keeps for ``model`` (in ``model.__dict__``), made on demand."""
    slot = model.__dict__.get(_RUNNER_ATTR)
    runner = slot.runner if isinstance(slot, _Slot) else None
    if runner is not None:
        p = _param(model)
        if runner.device != p.device:
            runner = None
    if runner is None and create:
        cfg = model.config
        max_seq = _auto_max_seq(cfg)
        runner = CudaGraphRunner(model, max_batch=AUTO["max_batch"], max_seq=max_seq, max_graphs=AUTO["max_graphs"],
                                 max_memory=AUTO["max_memory"], capture=capture)
        model.__dict__[_RUNNER_ATTR] = _Slot(runner)
    return runner


def maybe_replay(model, args: tuple, kwargs: dict, capture=None):
    """For bertfast's models' ``__call__``: the output of a CUDA-graph replay of
    ``model(*args, **kwargs)``, or None when this call runs eagerly (see ``graph_inputs``).

    Bad input raises the forward's own ValueError (``plan_forward`` validates before anything
    runs).  Should a capture fail (``CaptureError``: an op the device cannot capture, no memory
    for the graph), graphs are switched off for this model with a warning naming the error, and
    the call (and every later one) runs eagerly.  Any other RuntimeError of the replayed call
    (filling the buffers, the replay) is not a capture failure: this call runs eagerly, with a
    warning naming the error, and graphs stay on."""
    inputs, _ = graph_inputs(model, args, kwargs)
    if inputs is None:
        return None
    runner = runner_of(model, create=True, capture=capture)
    if runner.disabled:
        return None
    try:
        return runner(*inputs)
    except ValueError:
        raise
    except CaptureError as e:
        runner.reset()
        runner.disabled = str(e)
        warnings.warn(f"bertfast: CUDA-graph replay is off for this {type(model).__name__} (the capture failed: "
                      f"{runner.disabled}); it runs eagerly", RuntimeWarning, stacklevel=3)
        return None
    except RuntimeError as e:
        warnings.warn(f"bertfast: a CUDA-graph replay of this {type(model).__name__} failed ({type(e).__name__}: "
                      f"{e}); this call runs eagerly, graphs stay on", RuntimeWarning, stacklevel=3)
        return None


def drop_graphs(model) -> None:
    """Release the graphs ``maybe_replay`` captured for ``model``."""
    model.__dict__.pop(_RUNNER_ATTR, None)
