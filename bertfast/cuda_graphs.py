"""CUDA graphs for small-batch latency: capture the forward once per (batch, seq) bucket, replay it.

    runner = bertfast.CudaGraphRunner(model, max_batch=8, max_seq=128)
    out = runner(input_ids, attention_mask)       # same output object as model(...), sliced to (B, S)

At batch 1 a BERT forward is a few dozen small kernel launches and the CPU's launch overhead is
most of the latency.  A CUDA graph replays all of them with one launch.  Inputs are copied into
static buffers of the smallest bucket that holds them (extra rows and columns are padding: mask
0, so they change nothing for the real tokens), the graph is replayed, and the outputs are
sliced back to the caller's shape (copies, so a later replay does not overwrite them).

Graphs are captured lazily, one per bucket, on first use.  Inputs are validated eagerly (one
host read) before each replay; inside the graph the kernels run in trusted mode, with no host
synchronisation, and in padded mode (padding-free packing has data-dependent shapes, which a
graph cannot hold).  Inference only (``torch.no_grad``); the model must be in eval mode.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from kernels._common import trusted_inputs

_DEFAULT_SEQ_BUCKETS = (16, 32, 64, 128, 256, 384, 512)


def _pow2_buckets(limit: int) -> Tuple[int, ...]:
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return tuple(sorted(set(out)))


@contextlib.contextmanager
def _padded_mode(model):
    """Turn padding-free execution off for the capture (bertfast models and optimized
    transformers models keep the flag in different places)."""
    saved = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "unpad") and getattr(cfg, "backend", None) is not None:
            saved.append((cfg, "unpad", cfg.unpad))
            cfg.unpad = False
        opts = m.__dict__.get("_bertfast_options")
        if opts is not None:
            saved.append((opts, "unpad", opts["unpad"]))
            opts["unpad"] = False
    try:
        yield
    finally:
        for obj, key, value in reversed(saved):
            if isinstance(obj, dict):
                obj[key] = value
            else:
                setattr(obj, key, value)


def _map(fn, obj):
    """Apply fn to every tensor of a (nested) model output; keeps its type."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, o) for o in obj)
    if hasattr(obj, "keys") and hasattr(obj, "__getitem__"):  # bertfast / transformers ModelOutput, dict
        kwargs = {k: _map(fn, obj[k]) for k in obj.keys()}
        try:
            return type(obj)(**kwargs)
        except TypeError:
            return kwargs
    return obj


class _Graph:
    def __init__(self, batch: int, seq: int):
        self.batch, self.seq = batch, seq
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: Dict[str, torch.Tensor] = {}
        self.output: Any = None


class CudaGraphRunner:
    """Bucketed CUDA-graph replay of ``model(input_ids, attention_mask, token_type_ids)``.

    ``model``: a bertfast model (BertModel or a head) or a transformers BERT model accelerated
    with ``bertfast.optimize``, on a CUDA device, in eval mode.  ``batch_buckets`` /
    ``seq_buckets``: the shapes graphs are captured for (default: powers of two up to
    ``max_batch``; 16, 32, 64, 128, 256, 384, 512 up to ``max_seq``)."""

    def __init__(self, model: torch.nn.Module, max_batch: int = 32, max_seq: Optional[int] = None,
                 batch_buckets: Optional[Sequence[int]] = None, seq_buckets: Optional[Sequence[int]] = None,
                 warmup: int = 2):
        if not torch.cuda.is_available():
            raise ValueError("CudaGraphRunner needs a CUDA GPU (torch.cuda.is_available() is False)")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CudaGraphRunner: the model is on {device}; move it to a CUDA device first")
        if model.training:
            raise ValueError("CudaGraphRunner: the model must be in eval mode (call model.eval())")
        cfg = getattr(model, "config", None)
        max_pos = int(getattr(cfg, "max_position_embeddings", 512))
        max_seq = int(max_seq or max_pos)
        if max_seq > max_pos:
            raise ValueError(f"CudaGraphRunner: max_seq {max_seq} is longer than max_position_embeddings={max_pos}")
        if max_batch < 1 or max_seq < 1:
            raise ValueError("CudaGraphRunner: max_batch and max_seq must be positive")
        self.model = model
        self.device = device
        self.config = cfg
        self.max_batch, self.max_seq = int(max_batch), max_seq
        self.batch_buckets = tuple(sorted(set(batch_buckets or _pow2_buckets(self.max_batch))))
        self.seq_buckets = tuple(sorted(set(seq_buckets or [s for s in _DEFAULT_SEQ_BUCKETS if s < max_seq] + [max_seq])))
        if self.batch_buckets[-1] < self.max_batch or self.seq_buckets[-1] < self.max_seq:
            raise ValueError("CudaGraphRunner: the largest bucket must hold max_batch x max_seq")
        self.warmup = int(warmup)
        self.pad_token_id = int(getattr(cfg, "pad_token_id", 0) or 0)
        self._graphs: Dict[Tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    # ------------------------------------------------------------------ buckets
    @staticmethod
    def _bucket(n: int, buckets: Sequence[int], what: str, limit: int) -> int:
        for b in buckets:
            if n <= b:
                return b
        raise ValueError(f"CudaGraphRunner: {what} {n} is larger than the largest bucket ({limit})")

    def captured_shapes(self) -> list:
        return sorted(self._graphs)

    # ------------------------------------------------------------------ capture
    def _run(self, g: _Graph):
        with torch.no_grad(), trusted_inputs():
            return self.model(input_ids=g.inputs["input_ids"], attention_mask=g.inputs["attention_mask"],
                              token_type_ids=g.inputs["token_type_ids"])

    def _capture(self, batch: int, seq: int) -> _Graph:
        g = _Graph(batch, seq)
        dev = self.device
        g.inputs = {
            "input_ids": torch.full((batch, seq), self.pad_token_id, dtype=torch.long, device=dev),
            "attention_mask": torch.zeros((batch, seq), dtype=torch.long, device=dev),
            "token_type_ids": torch.zeros((batch, seq), dtype=torch.long, device=dev),
        }
        g.inputs["attention_mask"][:, 0] = 1  # a valid batch for the warm-up runs
        with _padded_mode(self.model):
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(max(1, self.warmup)):  # compiles the Triton kernels, settles the allocator
                    self._run(g)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                g.output = self._run(g)
        g.graph = graph
        self._graphs[(batch, seq)] = g
        return g

    # ------------------------------------------------------------------ replay
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 token_type_ids: Optional[torch.Tensor] = None):
        from bertfast.modeling import validate_inputs

        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError("CudaGraphRunner: input_ids must be a (batch, seq_len) integer tensor")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("CudaGraphRunner: attention_mask must be the 2-D (batch, seq_len) padding mask")
        dtype = next(self.model.parameters()).dtype
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        token_type_ids = token_type_ids.to(self.device) if token_type_ids is not None else None
        validate_inputs(self.config, input_ids, attention_mask, token_type_ids, None, None, dtype)
        B, S = input_ids.shape
        bb = self._bucket(B, self.batch_buckets, "batch size", self.max_batch)
        sb = self._bucket(S, self.seq_buckets, "sequence length", self.max_seq)
        g = self._graphs.get((bb, sb)) or self._capture(bb, sb)
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
        g.graph.replay()

        def cut(t: torch.Tensor) -> torch.Tensor:
            if t.dim() >= 2 and t.shape[0] == bb and t.shape[1] == sb:
                return t[:B, :S].clone()
            if t.dim() >= 1 and t.shape[0] == bb:
                return t[:B].clone()
            return t.clone()

        return _map(cut, g.output)
