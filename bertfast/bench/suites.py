"""The benchmark cases: kernels (one BERT op each), attention, and end-to-end encoders.

Every builder returns a list of :class:`~bertfast.bench.harness.Case`; nothing is allocated until
the harness calls ``case.build()``.  Triton rows carry ``triton=True`` so the harness refuses them
off CUDA or under ``TRITON_INTERPRET=1``; features that do not exist yet (a model without a
backend switch, no ``CudaGraphRunner``) raise :class:`Unavailable` at build time and show up as
``unavailable`` rows with the reason, so the same code lights up when they land.

Counting rules (per call):

* GEMM ``x (M, K) @ W (N, K)^T``: ``2*M*N*K`` FLOPs (bias / activation not counted).
* Memory-bound ops: each operand read once, each output written once, parameters once
  (``add_layernorm``: ``(2 reads + 1 write) * M*N*elem + 3*N*elem`` for x, residual, out,
  and weight, bias, x_bias; ``embeddings_layernorm``: ids, the gathered word rows, the S position
  rows and the type table, the LN parameters and the output).
* Attention: ``4*D*H*sum_b(L_b^2)`` forward FLOPs over valid (query, key) pairs only (padding and
  the masked half of causal attention excluded: ``L(L+1)/2`` pairs); forward+backward is 3.5x the
  forward (the backward's five matmuls against the forward's two).
* Encoders: the GEMM and attention FLOPs over valid tokens only, so padded and padding-free
  implementations are compared on the same useful work.

Triton rows are timed as the model calls the kernels: inside ``trusted_inputs()`` (the value
checks that read the device, such as id ranges and ``cu_seqlens`` order, are the forward's plan's
job, done once per forward), with the attention mask prepared once outside the timed call
(``prepare_attention_mask``, as the encoder prepares it once per forward for every layer); the
encoder rows get their inputs through ``bertfast.plan.to_device`` (checked and the mask read on
the host, as SentenceEncoder does with a tokenizer's batch).  No timed call of a Triton row
reads the device (tests/test_bench_harness.py); the SDPA and eager rows never did.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from bertfast.bench.harness import Case, Prepared, Unavailable
from bertfast.kernels._common import dtype_name

# model name -> (hidden, heads, intermediate, layers)
MODEL_SHAPES: Dict[str, Dict[str, int]] = {
    "minilm": dict(hidden=384, heads=12, inter=1536, layers=6),
    "bert-base": dict(hidden=768, heads=12, inter=3072, layers=12),
    "bert-large": dict(hidden=1024, heads=16, inter=4096, layers=24),
    "tiny": dict(hidden=64, heads=2, inter=128, layers=2),  # plumbing runs (the evidence dry run, tests)
}
PRESET_OF = {"minilm": "minilm-l6", "bert-base": "bert-base", "bert-large": "bert-large"}

KERNEL_OPS = ("qkv", "linear_gelu", "linear", "add_layernorm", "embeddings_layernorm")
ENCODER_SHAPES_GPU = [(1, 128), (8, 128), (32, 128), (32, 512), (16, 512)]
ENCODER_SHAPES_GPU_QUICK = [(1, 128), (32, 128)]
ENCODER_SHAPES_CPU = [(1, 128), (8, 128)]
ENCODER_SHAPES_CPU_QUICK = [(1, 32), (4, 64)]

def elsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# =========================================================================== counting
def gemm_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def gemm_bytes(m: int, n: int, k: int, elem: int, bias: bool = True) -> float:
    return float((m * k + n * k + m * n + (n if bias else 0)) * elem)


def add_layernorm_bytes(m: int, n: int, elem: int, x_bias: bool = True) -> float:
    """x and residual read, output written (M*N each), weight, bias (and x_bias) read once."""
    return float(3 * m * n * elem + (3 if x_bias else 2) * n * elem)


def embeddings_layernorm_bytes(b: int, s: int, hidden: int, elem: int, type_vocab: int = 2, id_bytes: int = 8) -> float:
    m = b * s
    ids = 2 * m * id_bytes + s * id_bytes  # input_ids, token_type_ids (B, S); position_ids (S,)
    rows = (m + s + type_vocab) * hidden * elem  # gathered word rows, S position rows, type table
    return float(ids + rows + 2 * hidden * elem + m * hidden * elem)


def attention_flops(lengths: Sequence[int], heads: int, head_dim: int, causal: bool = False,
                    backward: bool = False) -> float:
    pairs = sum((L * (L + 1) // 2) if causal else L * L for L in lengths)
    fwd = 4.0 * head_dim * heads * pairs
    return fwd * 3.5 if backward else fwd


def attention_bytes(lengths: Sequence[int], heads: int, head_dim: int, elem: int, backward: bool = False) -> float:
    t = sum(lengths)
    fwd = 4 * t * heads * head_dim * elem  # q, k, v read, o written
    return float(fwd * (3 if backward else 1))  # + o, do, q, k, v read and dq, dk, dv written


def encoder_flops(lengths: Sequence[int], hidden: int, inter: int, layers: int, pooler: bool = True) -> float:
    t = sum(lengths)
    per_layer = gemm_flops(t, 4 * hidden, hidden) + gemm_flops(t, 2 * inter, hidden) + 4.0 * hidden * sum(L * L for L in lengths)
    return layers * per_layer + (gemm_flops(len(lengths), hidden, hidden) if pooler else 0.0)


def mixed_lengths(batch: int, seq: int, seed: int = 0, low: float = 0.3, high: float = 1.0) -> List[int]:
    """Lengths uniform in [low*S, high*S] (at least 1), reproducible."""
    g = torch.Generator().manual_seed(seed * 1000003 + batch * 131 + seq)
    lo = max(1, math.ceil(low * seq))
    hi = max(lo, int(high * seq))
    return torch.randint(lo, hi + 1, (batch,), generator=g).tolist()


def lengths_for(mode: str, batch: int, seq: int, seed: int = 0) -> List[int]:
    return [seq] * batch if mode == "full" else mixed_lengths(batch, seq, seed)


# =========================================================================== helpers
def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32, generator=gen) * scale).to(dtype)


def _kernels_attr(name: str):
    """The Triton op ``bertfast.kernels.<name>``; Unavailable where triton is not installed (the kernels
    package then exports only its PyTorch references)."""
    from bertfast import kernels

    if not kernels.HAS_TRITON:
        raise Unavailable(f"bertfast.kernels.{name} needs triton, which is not importable here")
    return getattr(kernels, name)


def _close_check(dtype: torch.dtype, factor: float = 1.0):
    """A check comparing the output with ``ref_fn`` evaluated in fp32 on the same inputs and cast
    back (the kernels' own reference rule), within bertfast.kernels.testing's tolerance for the dtype."""

    def make(ref_fn: Callable[..., torch.Tensor]):
        def check(out, args):
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            with torch.no_grad():
                ref = ref_fn(*up).to(dtype)
            o, r = (out[0] if isinstance(out, tuple) else out), ref
            if tuple(o.shape) != tuple(r.shape):
                try:
                    r = r.reshape(o.shape)
                except RuntimeError:
                    return {"ok": False, "error": f"shape {tuple(o.shape)} != reference {tuple(r.shape)}"}
            err = (o.float() - r.float()).abs()
            from bertfast.kernels.testing import tolerance

            tol = tolerance(o.dtype, factor)
            ok = bool(torch.all(err <= tol["atol"] + tol["rtol"] * r.float().abs()).item())
            return {"ok": ok, "max_abs_err": float(err.max().item()) if err.numel() else 0.0, **tol}

        return check

    return make


def _compiled(fn: Callable, mode: Optional[str] = None, backend: str = "inductor") -> Callable:
    """``torch.compile(fn)`` for one case.  Dynamo's caches are reset first: every case compiles
    the same code object at a new shape, and past the recompile limit Dynamo would silently fall
    back to eager.  ``backend="eager"``: Dynamo's capture only (plumbing runs on CPU)."""
    torch._dynamo.reset()
    kw = {"mode": mode} if mode else {}
    return torch.compile(fn, dynamic=False, backend=backend, **kw)


def _no_grad(fn: Callable) -> Callable:
    def run(*a):
        with torch.no_grad():
            return fn(*a)

    return run


def _as_the_model_calls(fn: Callable) -> Callable:
    """A Triton op called as the model's forward calls it: inside ``trusted_inputs()``, so that
    the value checks that read the device (the forward's plan did them once) stay out of the
    timed call."""
    from bertfast.kernels._common import trusted_inputs

    def run(*a):
        with trusted_inputs():
            return fn(*a)

    return run


def sdpa_backend(q, k, v, attn_mask=None, is_causal=False, scale=None) -> str:
    """Which SDPA kernel PyTorch picks for these inputs (``torch._fused_sdp_choice``; the
    profiler's op names as a fallback)."""
    names = {0: "math", 1: "flash", 2: "mem-efficient", 3: "cudnn", 4: "overrideable", -1: "error"}
    suffix = " (cpu)" if q.device.type == "cpu" else ""
    try:
        choice = int(torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal, scale=scale))
        return names.get(choice, f"backend {choice}") + suffix
    except Exception:
        pass
    try:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        ops = {e.name for e in prof.events()}
    except Exception as e:  # pragma: no cover
        return f"unknown ({type(e).__name__})"
    for key, label in (("cudnn_attention", "cudnn"), ("flash_attention", "flash"),
                       ("efficient_attention", "mem-efficient"), ("attention_math", "math")):
        if any(key in n for n in ops):
            return label + suffix
    return "unknown"


# =========================================================================== kernels suite
class KernelCaseFactory:
    """Builds the kernel-suite cases for one (model shape, tokens, dtype, device)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, impls: Sequence[str], seed: int = 0,
                 compile_mode: Optional[str] = None):
        self.device, self.dtype, self.impls, self.seed = device, dtype, list(impls), seed
        self.compile_mode = compile_mode
        self.dn = dtype_name(dtype)
        self.e = elsize(dtype)

    def _case(self, op, impl, shape, flops, nbytes, metric, build, triton=False, notes="", group=None) -> Case:
        return Case(suite="kernels", op=op, impl=impl, shape=shape, dtype=self.dn, flops=flops, bytes=nbytes,
                    metric=metric, build=build, triton=triton, notes=notes, group=group or "")

    def _variants(self, op, shape, flops, nbytes, metric, make_inputs, eager, triton_fn, reference=None,
                  eager_notes: str = "") -> List[Case]:
        """triton / eager / compile rows sharing inputs and counts."""
        check = _close_check(self.dtype)(reference or eager)
        out = []
        for impl in self.impls:
            if impl == "triton":
                def build(tf=triton_fn):
                    return Prepared(fn=_no_grad(_as_the_model_calls(tf())), make_inputs=make_inputs, check=check)
                out.append(self._case(op, "triton", shape, flops, nbytes, metric, build, triton=True))
            elif impl == "eager":
                out.append(self._case(op, "eager", shape, flops, nbytes, metric,
                                      lambda: Prepared(fn=_no_grad(eager), make_inputs=make_inputs), notes=eager_notes))
            elif impl == "compile":
                mode = self.compile_mode

                def build_c(mode=mode):
                    return Prepared(fn=_no_grad(_compiled(eager, mode)), make_inputs=make_inputs, check=check)
                out.append(self._case(op, "compile", shape, flops, nbytes, metric, build_c,
                                      notes=f"torch.compile({'mode=' + mode if mode else 'default'}) of eager"))
        return out

    def qkv(self, hidden, heads, batch, seq) -> List[Case]:
        dev, dt, m = self.device, self.dtype, batch * seq
        d = hidden // heads
        shape = {"hidden": hidden, "M": m, "B": batch, "S": seq}

        def make_inputs():
            g = _gen(dev, self.seed)
            return (_randn((batch, seq, hidden), dt, dev, g), _randn((3 * hidden, hidden), dt, dev, g, hidden ** -0.5),
                    _randn((3 * hidden,), dt, dev, g, 0.1))

        def eager(x, w, b):  # three Linears + head split, into the same (3, B, H, S, D) layout
            outs = [F.linear(x, w[i * hidden:(i + 1) * hidden], b[i * hidden:(i + 1) * hidden])
                    .view(batch, seq, heads, d).transpose(1, 2) for i in range(3)]
            return torch.stack(outs)

        def triton_fn():
            f = _kernels_attr("qkv_projection")
            return lambda x, w, b: f(x, w, b, heads)

        return self._variants("qkv", shape, gemm_flops(m, 3 * hidden, hidden), gemm_bytes(m, 3 * hidden, hidden, self.e),
                              "tflops", make_inputs, eager, triton_fn,
                              eager_notes="3x F.linear + view/transpose, stacked into (3, B, H, S, D)")

    def linear(self, k, n, m, activation) -> List[Case]:
        dev, dt = self.device, self.dtype
        op = "linear_gelu" if activation else "linear"
        shape = {"K": k, "N": n, "M": m}

        def make_inputs():
            g = _gen(dev, self.seed)
            return (_randn((m, k), dt, dev, g), _randn((n, k), dt, dev, g, k ** -0.5), _randn((n,), dt, dev, g, 0.1))

        def eager(x, w, b):
            y = F.linear(x, w, b)
            return F.gelu(y) if activation else y

        def triton_fn():
            f = _kernels_attr("linear")
            return lambda x, w, b: f(x, w, b, activation=activation)

        return self._variants(op, shape, gemm_flops(m, n, k), gemm_bytes(m, n, k, self.e), "tflops", make_inputs, eager,
                              triton_fn)

    def add_layernorm(self, hidden, m, eps=1e-12) -> List[Case]:
        dev, dt = self.device, self.dtype
        shape = {"N": hidden, "M": m}

        def make_inputs():
            g = _gen(dev, self.seed)
            return (_randn((m, hidden), dt, dev, g), _randn((m, hidden), dt, dev, g),
                    1 + _randn((hidden,), dt, dev, g, 0.1), _randn((hidden,), dt, dev, g, 0.1),
                    _randn((hidden,), dt, dev, g, 0.1))

        def eager(x, r, w, b, xb):  # bias add, residual add, then F.layer_norm
            return F.layer_norm(x + xb + r, (hidden,), w, b, eps)

        def triton_fn():
            f = _kernels_attr("add_layernorm")
            return lambda x, r, w, b, xb: f(x, r, w, b, eps, x_bias=xb)

        return self._variants("add_layernorm", shape, 0.0, add_layernorm_bytes(m, hidden, self.e), "gbps", make_inputs,
                              eager, triton_fn)

    def embeddings_layernorm(self, hidden, batch, seq, vocab=30522, max_pos=512, type_vocab=2, eps=1e-12) -> List[Case]:
        dev, dt = self.device, self.dtype
        shape = {"hidden": hidden, "M": batch * seq, "B": batch, "S": seq}

        def make_inputs():
            g = _gen(dev, self.seed)
            ids = torch.randint(0, vocab, (batch, seq), device=dev, generator=g)
            tt = torch.randint(0, type_vocab, (batch, seq), device=dev, generator=g)
            pos = torch.arange(seq, device=dev)  # (S,), shared by the batch
            return (ids, tt, pos, _randn((vocab, hidden), dt, dev, g, 0.02), _randn((max_pos, hidden), dt, dev, g, 0.02),
                    _randn((type_vocab, hidden), dt, dev, g, 0.02), 1 + _randn((hidden,), dt, dev, g, 0.1),
                    _randn((hidden,), dt, dev, g, 0.1))

        def eager(ids, tt, pos, ww, pw, tw, lw, lb):  # three lookups, two adds, F.layer_norm
            x = F.embedding(ids, ww) + F.embedding(pos, pw) + F.embedding(tt, tw)
            return F.layer_norm(x, (hidden,), lw, lb, eps)

        def triton_fn():
            f = _kernels_attr("embeddings_layernorm")
            return lambda ids, tt, pos, ww, pw, tw, lw, lb: f(ids, tt, pos, ww, pw, tw, lw, lb, eps)

        return self._variants("embeddings_layernorm", shape, 0.0,
                              embeddings_layernorm_bytes(batch, seq, hidden, self.e, type_vocab), "gbps", make_inputs,
                              eager, triton_fn)


def _split_tokens(m: int) -> tuple[int, int]:
    """(B, S) for M tokens: S=128 when it divides M (BERT-like), else one sequence."""
    for s in (128, 512, 64, 32):
        if m % s == 0:
            return m // s, s
    return 1, m


def kernel_cases(models: Sequence[str], tokens: Sequence[int], device: torch.device, dtype: torch.dtype,
                 impls: Sequence[str], ops: Sequence[str] = KERNEL_OPS, seed: int = 0,
                 compile_mode: Optional[str] = None) -> List[Case]:
    f = KernelCaseFactory(device, dtype, impls, seed, compile_mode)
    cases: List[Case] = []
    for model in models:
        sh = MODEL_SHAPES[model]
        h, nh, inter = sh["hidden"], sh["heads"], sh["inter"]
        for m in tokens:
            b, s = _split_tokens(m)
            if "qkv" in ops:
                cases += f.qkv(h, nh, b, s)
            if "linear_gelu" in ops:
                cases += f.linear(h, inter, m, "gelu")
            if "linear" in ops:
                cases += f.linear(inter, h, m, None)
            if "add_layernorm" in ops:
                cases += f.add_layernorm(h, m)
            if "embeddings_layernorm" in ops and s <= 512:
                cases += f.embeddings_layernorm(h, b, s)
    return cases


# =========================================================================== attention suite
def _pack_index(lengths: Sequence[int], seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for i, L in enumerate(lengths):
        mask[i, :L] = True
    idx = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return idx.to(device), cu.to(device)


def attention_cases(seqs: Sequence[int], total_tokens: int, heads: int, head_dim: int, device: torch.device,
                    dtype: torch.dtype, impls: Sequence[str], lengths_modes: Sequence[str] = ("full", "mixed"),
                    directions: Sequence[str] = ("fwd", "fwd+bwd"), causal: bool = True, seed: int = 0,
                    compile_mode: Optional[str] = None, suite: str = "attention") -> List[Case]:
    """Attention at ``total_tokens`` = B*S tokens for each S: padded (with a key-padding mask when
    lengths are mixed), varlen (packed), and causal (full lengths), each vs matmul-softmax-matmul
    eager, SDPA (no mask / with mask; the backend it picks is recorded) and torch.compile."""
    dn, e = dtype_name(dtype), elsize(dtype)
    scale = head_dim ** -0.5
    cases: List[Case] = []
    for seq in seqs:
        batch = max(1, total_tokens // seq)
        for mode in lengths_modes:
            lengths = lengths_for(mode, batch, seq, seed)
            variants = [("attention", False)] + ([("attention_causal", True)] if causal and mode == "full" else [])
            for op, is_causal in variants:
                for direction in directions:
                    bwd = direction != "fwd"
                    shape = {"B": batch, "S": seq, "H": heads, "D": head_dim, "lengths": mode, "dir": direction}
                    flops = attention_flops(lengths, heads, head_dim, is_causal, bwd)
                    nbytes = attention_bytes(lengths, heads, head_dim, e, bwd)
                    cases += _attention_impl_cases(suite, op, shape, dn, flops, nbytes, batch, seq, heads, head_dim,
                                                   lengths, mode, is_causal, bwd, scale, device, dtype, impls, seed,
                                                   compile_mode)
    return cases


def _attention_impl_cases(suite, op, shape, dn, flops, nbytes, batch, seq, heads, d, lengths, mode, causal, bwd, scale,
                          device, dtype, impls, seed, compile_mode) -> List[Case]:
    padded = mode != "full"

    def valid_mask():
        return torch.arange(seq, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]

    def make_inputs():
        g = _gen(device, seed)
        q, k, v = (_randn((batch, heads, seq, d), dtype, device, g).requires_grad_(bwd) for _ in range(3))
        dout = _randn((batch, seq, heads, d), dtype, device, g) if bwd else None
        return q, k, v, valid_mask(), dout

    def timed(core: Callable) -> Callable:
        """core(q, k, v, valid) -> (B, S, H, D); forward (no grad) or forward+backward."""
        if not bwd:
            def f(q, k, v, valid, dout=None):
                with torch.no_grad():
                    return core(q, k, v, valid)

            return f

        def fb(q, k, v, valid, dout):
            q.grad = k.grad = v.grad = None
            core(q, k, v, valid).backward(dout)

        return fb

    def eager_core(q, k, v, valid):  # matmul - softmax - matmul, additive mask, BERT's eager path
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if padded:
            s = s.masked_fill(~valid[:, None, None, :], torch.finfo(s.dtype).min)
        if causal:
            s = s.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=s.device).triu(1), torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1)
        return torch.matmul(p, v).transpose(1, 2).contiguous()

    def sdpa_core(with_mask):
        def core(q, k, v, valid):
            m = valid[:, None, None, :] if with_mask else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal and m is None,
                                                  scale=scale).transpose(1, 2)
        return core

    def ref_check():  # fp32 reference on valid query rows (padded rows are free to differ)
        def ref(q, k, v, valid, dout=None):
            with torch.no_grad():
                return eager_core(q.float(), k.float(), v.float(), valid)

        def check(out, args):
            if bwd:
                return None
            r = ref(*args)
            valid = args[3]
            o = out.float()
            err = (o - r).abs()[valid]
            from bertfast.kernels.testing import tolerance

            tol = tolerance(out.dtype)
            ok = bool(torch.all(err <= tol["atol"] + tol["rtol"] * r.abs()[valid]).item())
            return {"ok": ok, "max_abs_err": float(err.max().item()) if err.numel() else 0.0, **tol}

        return check

    def mk(impl, build, triton=False, notes=""):
        return Case(suite=suite, op=op, impl=impl, shape=shape, dtype=dn, flops=flops, bytes=nbytes, metric="tflops",
                    build=build, triton=triton, notes=notes)

    out: List[Case] = []
    for impl in impls:
        if impl == "eager":
            out.append(mk("eager", lambda: Prepared(fn=timed(eager_core), make_inputs=make_inputs)))
        elif impl == "sdpa":
            notes = "no mask: attends to padding too (speed reference only)" if padded else ""

            def b_sdpa():
                f = timed(sdpa_core(False))
                p = Prepared(fn=f, make_inputs=make_inputs)
                q, k, v, _, _ = make_inputs()
                p.info["sdpa_backend"] = sdpa_backend(q, k, v, None, causal, scale)
                return p
            out.append(mk("sdpa", b_sdpa, notes=notes))
        elif impl == "sdpa-mask":
            if not padded:
                continue

            def b_sdpa_m():
                p = Prepared(fn=timed(sdpa_core(True)), make_inputs=make_inputs)
                q, k, v, valid, _ = make_inputs()
                p.info["sdpa_backend"] = sdpa_backend(q, k, v, valid[:, None, None, :], False, scale)
                return p
            out.append(mk("sdpa-mask", b_sdpa_m))
        elif impl == "compile":
            def b_comp():
                return Prepared(fn=timed(_compiled(eager_core, compile_mode)), make_inputs=make_inputs)
            out.append(mk("compile", b_comp, notes="torch.compile of eager"))
        elif impl == "triton":
            def b_tri():
                att = _kernels_attr("attention")
                from bertfast.kernels.attention import prepare_attention_mask

                # prepared once, outside the timed call, as the encoder prepares its mask once per
                # forward for every layer (a right-padding mask becomes per-row key lengths)
                prepared = prepare_attention_mask(valid_mask() if padded else None, batch, None, seq, analyze=True)

                def core(q, k, v, valid):
                    return att(q, k, v, prepared, causal=causal, scale=scale)
                return Prepared(fn=timed(_as_the_model_calls(core)), make_inputs=make_inputs, check=ref_check())
            out.append(mk("triton", b_tri, triton=True,
                          notes="padded" + (" + key lengths, prepared once" if padded else "")))
        elif impl == "triton-varlen":
            def b_var():
                att = _kernels_attr("attention_varlen")
                idx, cu = _pack_index(lengths, seq, device)
                maxlen = max(lengths)
                total = sum(lengths)

                def make_packed():
                    q, k, v, valid, dout = make_inputs()
                    pk = [t.detach().transpose(1, 2).reshape(batch * seq, heads, d)[idx].contiguous().requires_grad_(bwd)
                          for t in (q, k, v)]
                    pd = dout.reshape(batch * seq, heads, d)[idx].contiguous() if bwd else None
                    return (*pk, valid, pd, q, k, v)

                @_as_the_model_calls
                def core(qp, kp, vp):
                    return att(qp, kp, vp, cu, maxlen, causal=causal)

                if bwd:
                    def fn(qp, kp, vp, valid, pd, *_):
                        qp.grad = kp.grad = vp.grad = None
                        core(qp, kp, vp).backward(pd)
                else:
                    def fn(qp, kp, vp, *_):
                        with torch.no_grad():
                            return core(qp, kp, vp)

                def check(o, args):
                    if bwd:
                        return None
                    q, k, v, valid = args[5], args[6], args[7], args[3]
                    with torch.no_grad():
                        r = eager_core(q.float(), k.float(), v.float(), valid).reshape(batch * seq, heads, d)[idx]
                    err = (o.float() - r).abs()
                    from bertfast.kernels.testing import tolerance

                    tol = tolerance(o.dtype)
                    ok = bool(torch.all(err <= tol["atol"] + tol["rtol"] * r.abs()).item())
                    return {"ok": ok, "max_abs_err": float(err.max().item()) if err.numel() else 0.0, **tol}

                p = Prepared(fn=fn, make_inputs=make_packed, check=check)
                p.info["total_tokens"] = total
                return p
            out.append(mk("triton-varlen", b_var, triton=True, notes="packed, cu_seqlens"))
    return out


# =========================================================================== encoder suite
class ModelCache:
    """Loads each (model, implementation) once per run and shares weights between bertfast and
    transformers so that outputs can be compared."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._bf: Dict[str, Any] = {}
        self._hf: Dict[tuple, Any] = {}
        self.notes: Dict[str, str] = {}

    def config(self, name: str):
        from bertfast.config import BertConfig

        if name in PRESET_OF:
            return BertConfig.preset(PRESET_OF[name])
        sh = MODEL_SHAPES[name]
        return BertConfig(hidden_size=sh["hidden"], num_attention_heads=sh["heads"], intermediate_size=sh["inter"],
                          num_hidden_layers=sh["layers"])

    def bertfast_base(self, name: str):
        """The bertfast model in its default state (weights shared with the other impls)."""
        if name not in self._bf:
            import bertfast.modeling as modeling

            model = None
            if name == "minilm":
                try:
                    model = modeling.BertModel.from_pretrained("minilm", dtype=self.dtype, device=self.device)
                    self.notes[name] = "weights: bundled all-MiniLM-L6-v2"
                except Exception as e:
                    self.notes[name] = f"weights: random (minilm checkpoint not loadable: {type(e).__name__}: {e})"
            if model is None:
                torch.manual_seed(0)
                model = modeling.BertModel(self.config(name)).to(device=self.device, dtype=self.dtype)
                self.notes.setdefault(name, "weights: random (shape preset)")
            self._bf[name] = model.eval()
        return self._bf[name]

    def bertfast(self, name: str, backend: str, unpad: bool = False, graphs: bool = False) -> "_BackendSwitch":
        """The shared bertfast model with the setting a row runs it in (:class:`_BackendSwitch`)."""
        return _BackendSwitch(self.bertfast_base(name), backend, unpad, graphs)

    def transformers(self, name: str, attn: str):
        key = (name, attn)
        if key not in self._hf:
            try:
                import transformers
            except Exception as e:
                raise Unavailable(f"transformers is not installed ({e})") from None
            bf = self.bertfast_base(name)
            hf_cfg = transformers.BertConfig(**{k: v for k, v in bf.config.to_dict().items()
                                                if k not in ("architectures",)})
            hf = transformers.BertModel._from_config(hf_cfg, attn_implementation=attn, dtype=self.dtype)
            missing, unexpected = hf.load_state_dict(bf.state_dict(), strict=False)
            hf = hf.to(device=self.device, dtype=self.dtype).eval()
            hf._bertfast_same_weights = not missing
            self._hf[key] = hf
        return self._hf[key]


class _BackendSwitch:
    """A row's setting of the shared bertfast model: backend, padding-free execution and CUDA-graph
    replay (``model.set_backend(name, unpad=..., graphs=...)``), so several implementations share
    one copy of the weights.  The rows of a group are timed round-robin, so each row applies its
    setting before each of its calls (``apply``, outside the timed call: Prepared.before)."""

    def __init__(self, model, backend: str, unpad: bool, graphs: bool = False):
        self.model, self.backend, self.unpad, self.graphs = model, backend, unpad, graphs
        self.config = model.config

    def apply(self):
        rt = self.model.runtime
        if (rt.backend, rt.unpad, rt.graphs) == (self.backend, self.unpad, self.graphs):
            return self.model
        try:
            self.model.set_backend(self.backend, unpad=self.unpad, graphs=self.graphs)
        except ValueError as e:
            raise Unavailable(f"model.set_backend({self.backend!r}) refused: {e}") from None
        return self.model


# graphs rows: bertfast's own CUDA-graph replay (set_backend(graphs=True)) of the padded route and of the
# padding-free route (token buckets); the other bertfast-triton rows run eagerly (graphs=False)
ENCODER_IMPLS = ("hf-eager", "hf-sdpa", "hf-compile", "bertfast-torch", "bertfast-triton", "bertfast-triton-unpad",
                 "bertfast-triton-graphs", "bertfast-triton-unpad-graphs")


def encoder_cases(models: Sequence[str], shapes: Sequence[tuple], device: torch.device, dtype: torch.dtype,
                  impls: Sequence[str], lengths_modes: Sequence[str] = ("full", "mixed"), seed: int = 0,
                  compile_mode: Optional[str] = "max-autotune", cache: Optional[ModelCache] = None,
                  compile_skip_reason: Optional[str] = None, compile_backend: str = "inductor") -> List[Case]:
    """Whole-encoder rows for every (model, (batch, seq), lengths mode, implementation).  The
    baseline is transformers eager; flops count valid tokens only."""
    cache = cache or ModelCache(device, dtype)
    cases: List[Case] = []
    for name in models:
        for batch, seq in shapes:
            for mode in lengths_modes:
                cases += _encoder_rows(cache, name, batch, seq, mode, device, dtype, impls, seed, compile_mode,
                                       compile_skip_reason, compile_backend)
    return cases


def _encoder_rows(cache: ModelCache, name: str, batch: int, seq: int, mode: str, device: torch.device,
                  dtype: torch.dtype, impls: Sequence[str], seed: int, compile_mode: Optional[str],
                  compile_skip_reason: Optional[str], compile_backend: str = "inductor") -> List[Case]:
    sh = MODEL_SHAPES[name]
    cuda = device.type == "cuda"
    lengths = lengths_for(mode, batch, seq, seed)
    shape = {"model": name, "B": batch, "S": seq, "lengths": mode}
    flops = encoder_flops(lengths, sh["hidden"], sh["inter"], sh["layers"])
    vocab = 30522
    counter = [0]

    def host_inputs():
        # a different token draw for every rotated copy; the lengths (and so the work) stay fixed
        counter[0] += 1
        g = torch.Generator().manual_seed(seed * 7919 + 17 + counter[0])
        mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
        ids = torch.randint(1000, vocab, (batch, seq), generator=g) * mask  # pad token 0 after each sequence
        return ids, mask

    def make_inputs():
        ids, mask = host_inputs()
        return ids.to(device), mask.to(device)

    def inputs_for(model):
        """bertfast's inputs as SentenceEncoder makes them from a tokenizer's batch: checked, the
        mask read on the host, then copied (bertfast.plan.to_device; like the other rows' copy,
        outside the timed call), so that the forward reads nothing from the device."""
        from bertfast.plan import to_device

        def make():
            ids, mask = host_inputs()
            dev = to_device({"input_ids": ids, "attention_mask": mask}, model)
            return dev["input_ids"], dev["attention_mask"]
        return make

    def check(out, args):
        """bertfast vs transformers eager with the same weights, on valid tokens."""
        hf = cache.transformers(name, "eager")
        if not getattr(hf, "_bertfast_same_weights", False):
            return None
        o = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        with torch.inference_mode():
            r = hf(input_ids=args[0], attention_mask=args[1]).last_hidden_state
        valid = args[1].bool()
        err = (o.float() - r.float()).abs()[valid]
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        return {"ok": bool(err.max().item() <= tol) if err.numel() else True,
                "max_abs_err": float(err.max().item()) if err.numel() else 0.0, "vs": "hf-eager", "atol": tol}

    def wrap(call):
        def fn(ids, mask):
            with torch.inference_mode():
                return call(input_ids=ids, attention_mask=mask)
        return fn

    def hf_build(attn):
        def build():
            hf = cache.transformers(name, attn)
            return Prepared(fn=wrap(hf), make_inputs=make_inputs, info={"weights": cache.notes.get(name, "")})
        return build

    def compile_build():
        hf = cache.transformers(name, "sdpa")
        return Prepared(fn=wrap(_compiled(hf, compile_mode, compile_backend)), make_inputs=make_inputs)

    def bertfast_build(backend, unpad=False, graphs=False):
        def build():
            switch = cache.bertfast(name, backend, unpad, graphs)
            model = switch.apply()  # a refused setting raises Unavailable now, before any timing
            return Prepared(fn=wrap(model), make_inputs=inputs_for(model), check=check, before=switch.apply,
                            info={"weights": cache.notes.get(name, ""), "inputs": "bertfast.plan.to_device"})
        return build

    rows = []
    for impl in impls:
        triton = impl.startswith("bertfast-triton")
        notes, unavailable = "", None
        if impl in ("hf-eager", "hf-sdpa"):
            build = hf_build(impl.split("-")[1])
        elif impl == "hf-compile":
            build, unavailable = compile_build, compile_skip_reason
            notes = f"torch.compile(mode={compile_mode!r}" + (
                f", backend={compile_backend!r}" if compile_backend != "inductor" else "") + ") of transformers SDPA"
        elif impl == "bertfast-torch":
            build = bertfast_build("torch", unpad=True)  # the default: padding-free on CPU
        elif triton:
            graphs = impl.endswith("graphs")
            if graphs and not cuda:
                unavailable = "CUDA graphs need a CUDA GPU"
            build = bertfast_build("triton", "unpad" in impl, graphs)
        else:
            continue
        rows.append(Case(suite="encoder", op="encoder", impl=impl, shape=dict(shape), dtype=dtype_name(dtype),
                         flops=flops, bytes=0.0, metric="tflops", build=build, unavailable=unavailable,
                         baseline="hf-eager", end_to_end=True, triton=triton, notes=notes))
    return rows
