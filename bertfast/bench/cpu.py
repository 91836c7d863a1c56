"""``bertfast bench cpu``: is bertfast faster on a CPU than what a user already has?

    bertfast bench cpu [--model minilm|PATH] [--threads 1 2] [--workloads NAME ...] [--systems NAME ...]
                       [--rounds N] [--corpus-size 5000] [--compile] [--out DIR] [--quick] [--no-plots]
                       [--seed 0]

all-MiniLM-L6-v2 (or the checkpoint directory ``--model`` names), fp32, ``torch.inference_mode()``.

Workloads (:data:`SHAPES`, :data:`CORPUS`): ``1x16``, ``1x128``, ``32x128`` (full length),
``32-mixed`` (32 x 128, real lengths uniform in [8, 56]: about 75% padding), ``128-mixed-256``
(128 x 256, lengths uniform in [8, 136]: about 72% padding) -- synthetic token ids 1000..20000
between [CLS] and [SEP], right padding, seeded -- and ``corpus``: ``--corpus-size`` texts (1-3
of :data:`SENTENCES` joined, seeded) to L2-normalised mean-pooled embeddings, tokenization
included, each system with its usual pipeline and batches of 32.

Systems (:data:`SYSTEMS`): ``bertfast`` (``BertModel.from_pretrained``, its default CPU path;
``SentenceEncoder`` on the corpus), ``bertfast-bf16`` (the same in bfloat16, opt-in; only on a CPU
with AVX512_BF16 or AMX, elsewhere a row saying why), ``bertfast-int8``
(``bertfast.quantize.quantize_int8`` on a separate copy, opt-in), ``hf-eager`` / ``hf-sdpa``
(transformers), ``hf-compile`` (``torch.compile`` of hf-sdpa; with ``--compile`` only), ``ort``
(ONNX Runtime on the BERT-fused graph of ``onnxruntime.transformers.optimizer``; on the corpus a
tokenizers + ORT + numpy pipeline), ``openvino`` (OpenVINO on the plain exported ONNX graph) and
``sentence-transformers`` (corpus only).  A system that cannot run here is a row saying why
(``not installed (pip install "bertfast[cpu-bench]")``), never a crash.

Timing: for each ``--threads`` n, torch, ONNX Runtime (intra-op n, inter-op 1) and OpenVINO
(``INFERENCE_NUM_THREADS`` n) use n threads -- ORT and OpenVINO use every core unless told.
The systems of one workload are timed round-robin in one loop by the bench harness
(:meth:`bertfast.bench.harness.Bencher.run_group`: two warm-up calls (one on the corpus), then ``--rounds`` rounds,
the starting system rotating), so load from other processes hits them alike; every row keeps
its repetitions and reports median and p10-p90.  The speedup of bertfast over a system is that
system's median / bertfast's median, printed only when the range the two spreads allow lies on
one side of 1 ("within noise" otherwise; :func:`bertfast.bench.harness.compare`).

Correctness, on each row's last timed output (no extra call): every forward row's
last_hidden_state at real tokens against transformers eager (max |diff|, at most
:data:`FP32_ATOL`); bertfast-bf16 and bertfast-int8 by the min (and mean) cosine of mean-pooled,
normalised embeddings against fp32 bertfast; on the corpus the min cosine of each system's
vectors against bertfast's (above :data:`FP32_MIN_COS` for fp32 systems).

The CPU linears (``bertfast.cpu_linear``): during the run the bertfast rows time every linear
shape class on first use -- in their warm-up call -- and keep the fastest implementation
(stored in the tuning cache, as ``bertfast tune --device cpu`` does; ``BERTFAST_AUTOTUNE=off``
runs ``F.linear`` everywhere instead, for before / after comparisons).  Each bertfast row
reports what its linears ran; the report's header names the CPU and its ISA flags (AVX2,
AVX-512, AVX512_BF16, VNNI, AMX), and the file name carries the CPU model.

Writes ``<date>_<cpu>_cpu.json`` (environment, settings, versions, every repetition),
``.md`` (the tables and the targets) and ``_speedup_<n>t.png`` per thread count into ``--out``.
The ONNX exports are cached in ``$XDG_CACHE_HOME/bertfast/onnx/<fingerprint>/``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# parser-side names: no torch import at module level (``bertfast bench --help`` stays fast)
WORKLOADS = ("1x16", "1x128", "32x128", "32-mixed", "128-mixed-256", "corpus")
# --quick: a smoke run (under a minute on one thread of a small CPU): the batch-1 shapes and a short
# corpus; the batched shapes cost seconds per call on one thread (pick them with --workloads)
QUICK_WORKLOADS = ("1x16", "1x128", "corpus")
SYSTEMS = ("bertfast", "bertfast-bf16", "bertfast-int8", "hf-eager", "hf-sdpa", "hf-compile", "ort", "openvino",
           "sentence-transformers")
FORWARD_SYSTEMS = tuple(s for s in SYSTEMS if s != "sentence-transformers")
CORPUS_SYSTEMS = ("bertfast", "bertfast-bf16", "bertfast-int8", "sentence-transformers", "ort")
OPT_IN = ("bertfast-bf16", "bertfast-int8")  # opt-in precisions: checked by cosine, not plotted
DEFAULT_THREADS = (1, 2)
DEFAULT_CORPUS_SIZE = 5000
QUICK_CORPUS_SIZE = 64
CORPUS_BATCH = 32

NOT_INSTALLED = 'not installed (pip install "bertfast[cpu-bench]")'
INT8_MISSING = "not available in this build (bertfast.quantize.quantize_int8 is missing)"
COMPILE_SKIPPED = "skipped: pass --compile (torch.compile on CPU takes minutes)"
BF16_NOT_NATIVE = ("not run: this CPU has no AVX512_BF16 or AMX, so bf16 GEMMs are emulated (5.7x slower than fp32 "
                   "measured on an AVX2 AMD EPYC)")

FP32_ATOL = 1e-4  # max |diff| of last_hidden_state vs transformers eager, fp32 rows
FP32_MIN_COS = 0.9999  # min cosine of corpus vectors vs bertfast's, fp32 systems
INT8_MIN_COS = 0.99  # informational bar for the opt-in int8 row (not an fp32 system)
BF16_MIN_COS = 0.999  # informational bar for the opt-in bf16 row (min over the batch; the mean is reported too)

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
SYNTH_IDS = (1000, 20000)  # synthetic token ids, inclusive

# 32 sentences from 1 to ~90 words: the length mix a sentence-embedding service sees.
# (benchmarks/bench_cpu.py re-exports this list; other scripts import it from there.)
SENTENCES = [
    "Hello there.",
    "The cat sat on the mat.",
    "Where is the nearest train station?",
    "I can't believe it's already Friday again.",
    "Please remember to water the plants while I'm away.",
    "The quarterly report shows a modest increase in revenue.",
    "She walked along the beach at sunset, collecting smooth stones.",
    "Our flight was delayed by three hours because of a storm over the Atlantic.",
    "Reset your password by following the link we just sent to your email address.",
    "The new library opens on Monday, with extended hours for students during exam season.",
    "Add two cups of flour, a pinch of salt and one egg, then stir until the dough is smooth.",
    "Despite the rain, thousands of fans gathered outside the stadium hours before the final match began.",
    "The committee postponed its decision on the budget until more detailed cost estimates are available.",
    "Researchers found that regular exercise improves sleep quality in adults over sixty, "
    "even when the sessions are short.",
    "If the printer shows a paper jam error, open the rear cover, remove any stuck sheets and "
    "restart the device before printing again.",
    "A quick brown fox jumps over the lazy dog.",
    "Thanks!",
    "How do I convert a list of strings into a single comma-separated string in Python?",
    "The museum's new exhibition traces the history of navigation, from Polynesian star charts "
    "to satellite positioning systems used by modern ships and aircraft.",
    "Customers who bought this item also purchased a protective case and a spare charging cable, "
    "according to the store's recommendation engine.",
    "After years of negotiations, the two neighbouring towns finally agreed to share the cost of "
    "building a bridge across the river, which is expected to cut commuting times in half for "
    "thousands of residents who currently take a long detour through the valley.",
    "The patient reported mild headaches and occasional dizziness over the past two weeks.",
    "Turn left at the second roundabout.",
    "Volunteers planted more than four hundred trees in the park last weekend.",
    "In the first chapter, the author introduces a family of farmers whose lives change forever "
    "when a railway line is built through their land, bringing merchants, strangers and new ideas "
    "to a village that had been isolated for generations, and setting brother against brother "
    "over whether to sell the fields or keep working them as their parents had done.",
    "Is this seat taken?",
    "Our support team is available from nine to five on weekdays.",
    "The software update fixes a bug that caused the application to crash when opening large files "
    "on older laptops with limited memory.",
    "Mix the paint thoroughly before applying a second coat.",
    "The central bank kept interest rates unchanged, citing uncertainty about inflation and "
    "slowing growth in several major export markets, while signalling that it could cut rates "
    "later in the year if consumer spending continues to weaken and unemployment keeps rising.",
    "Good morning, everyone.",
    "Stock markets rallied after the announcement.",
]


@dataclass(frozen=True)
class Shape:
    """A fixed-shape forward workload: ``batch`` x ``seq`` token ids, full length or real lengths
    uniform in ``lengths`` (inclusive, right padding); ``rounds`` / ``quick_rounds`` timed rounds."""

    batch: int
    seq: int
    lengths: Optional[Tuple[int, int]] = None
    rounds: int = 15
    quick_rounds: int = 3


SHAPES = {
    "1x16": Shape(1, 16),
    "1x128": Shape(1, 128),
    "32x128": Shape(32, 128, rounds=5, quick_rounds=2),
    "32-mixed": Shape(32, 128, lengths=(8, 56)),  # mean 32 of 128: ~75% padding
    "128-mixed-256": Shape(128, 256, lengths=(8, 136), rounds=5, quick_rounds=2),  # mean 72 of 256: ~72%
}
CORPUS_ROUNDS, CORPUS_QUICK_ROUNDS = 3, 2

# (workload, systems (the fastest of them that ran), bertfast's speedup over it must be at least)
TARGETS = (
    ("32x128", ("openvino",), 1.2),
    ("1x128", ("ort", "openvino"), 1.0),
    ("1x16", ("ort", "openvino"), 1.0),
    ("32-mixed", ("openvino",), 2.0),
    ("128-mixed-256", ("openvino",), 2.0),
    ("corpus", ("sentence-transformers",), 1.5),
    ("corpus", ("ort",), 1.2),
)
# the opt-in rows' own targets: (workload, systems, speedup of the opt-in row over them)
OPT_IN_TARGETS = {"bertfast-bf16": (("32x128", ("bertfast",), 1.8),), "bertfast-int8": TARGETS}


# --------------------------------------------------------------------------- optional packages
def optional_import(name: str):
    """``importlib.import_module(name)``, or :class:`~bertfast.bench.harness.Unavailable` saying
    which package is missing (tests replace this to simulate a machine without it)."""
    from bertfast.bench.harness import Unavailable

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Unavailable(f"{NOT_INSTALLED}: {name} ({e})") from None


def package_versions() -> Dict[str, Optional[str]]:
    from bertfast.bench.harness import _version

    return {k: _version(k) for k in ("onnxruntime", "openvino", "onnx", "sentence-transformers", "tokenizers",
                                      "transformers")}


# --------------------------------------------------------------------------- inputs
def make_batch(shape: Shape, seed: int) -> Dict[str, Any]:
    """Seeded synthetic batch of ``shape``: input_ids (ids in SYNTH_IDS, [CLS] first, [SEP] at
    each real end, 0 after it), attention_mask, token_type_ids (zeros), all int64 (B, S)."""
    import torch

    g = torch.Generator().manual_seed(seed * 7919 + shape.batch * 1009 + shape.seq)
    B, S = shape.batch, shape.seq
    if shape.lengths is None:
        lengths = torch.full((B,), S, dtype=torch.long)
    else:
        lo, hi = shape.lengths
        lengths = torch.randint(lo, hi + 1, (B,), generator=g)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()  # (B, S), right padding
    ids = torch.randint(SYNTH_IDS[0], SYNTH_IDS[1] + 1, (B, S), generator=g)
    ids[:, 0] = CLS_ID
    ids[torch.arange(B), lengths - 1] = SEP_ID
    ids = ids * mask + PAD_ID * (1 - mask)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def padding_fraction(mask) -> float:
    return 1.0 - float(mask.sum()) / mask.numel()


def build_corpus(n: int, seed: int = 0) -> List[str]:
    """``n`` texts, each 1-3 distinct :data:`SENTENCES` joined by a space (seeded): lengths from
    1 to about 270 words, like a real corpus."""
    rng = random.Random(seed)
    return [" ".join(rng.sample(SENTENCES, rng.randint(1, 3))) for _ in range(n)]


# --------------------------------------------------------------------------- thread settings
def ort_session_options(ort, threads: int):
    """ONNX Runtime session options for ``threads`` intra-op threads (ORT uses every core unless
    told), one inter-op thread, sequential execution, all graph optimizations."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def openvino_config(threads: int) -> Dict[str, Any]:
    """OpenVINO ``compile_model`` settings: ``threads`` inference threads (every core unless
    told), latency mode, fp32 (OpenVINO picks bf16 on CPUs that have it unless told)."""
    return {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def _ov_str(value) -> str:
    """An OpenVINO property as text: element types as their short name (``f32``)."""
    name = getattr(value, "get_type_name", None)
    return str(name() if callable(name) else value)


# --------------------------------------------------------------------------- models
def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bertfast" / "onnx"


def export_wrapper(model):
    """A module taking (input_ids, attention_mask, token_type_ids) positionally and calling the
    transformers ``model`` with keywords (transformers 5 orders its positional arguments
    differently); returns last_hidden_state."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    return Wrapper(model).eval()


class Models:
    """Every system's model for one checkpoint directory, loaded once and shared by the thread
    counts and workloads; ``notes`` collects what a reader of the table must know."""

    def __init__(self, model_dir: Path, notes: List[str], cache_dir: Optional[Path] = None):
        self.dir = Path(model_dir)
        self.notes = notes
        self._cache_dir = cache_dir
        self._m: Dict[Any, Any] = {}

    def _get(self, key, make):
        if key not in self._m:
            try:
                self._m[key] = make()
            except Exception as e:  # remembered, so that every workload reports it without retrying
                self._m[key] = e
        v = self._m[key]
        if isinstance(v, BaseException):
            raise v
        return v

    @property
    def config(self) -> Dict[str, Any]:
        return json.loads((self.dir / "config.json").read_text())

    # ---- bertfast
    def bertfast(self):
        def make():
            import torch

            from bertfast import BertModel

            return BertModel.from_pretrained(self.dir, dtype=torch.float32, device="cpu").eval()
        return self._get("bertfast", make)

    @staticmethod
    def quantizer() -> Callable:
        """``bertfast.quantize.quantize_int8`` or Unavailable."""
        from bertfast.bench.harness import Unavailable

        try:
            mod = importlib.import_module("bertfast.quantize")
        except ImportError:
            raise Unavailable(INT8_MISSING) from None
        fn = getattr(mod, "quantize_int8", None)
        if not callable(fn):
            raise Unavailable(INT8_MISSING)
        return fn

    def quantized(self, model):
        """``quantize_int8(model, calibration=None, tokenizer=<the checkpoint directory>)`` on a
        separate instance, with the keywords its signature has (its built-in calibration set):
        its return value, or the model itself when it quantizes in place and returns None."""
        import inspect

        fn = self.quantizer()
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in (("calibration", None), ("tokenizer", str(self.dir))) if k in params}
        out = fn(model, **kw)
        return (out if out is not None else model).eval()

    def bertfast_int8(self):
        def make():
            import torch

            from bertfast import BertModel

            return self.quantized(BertModel.from_pretrained(self.dir, dtype=torch.float32, device="cpu").eval())
        return self._get("bertfast-int8", make)

    def bertfast_bf16(self):
        def make():
            import torch

            from bertfast import BertModel

            return BertModel.from_pretrained(self.dir, dtype=torch.bfloat16, device="cpu").eval()
        return self._get("bertfast-bf16", make)

    def sentence_encoder(self, int8: bool = False, dtype: str = "float32"):
        def make():
            from bertfast import SentenceEncoder

            enc = SentenceEncoder(self.dir, device="cpu", dtype=dtype)
            if int8:
                enc.model = self.quantized(enc.model)
            return enc
        return self._get(("sentence-encoder", int8, dtype), make)

    # ---- transformers
    def hf(self, attn: str):
        def make():
            import torch

            transformers = optional_import("transformers")
            return transformers.BertModel.from_pretrained(str(self.dir), attn_implementation=attn,
                                                          dtype=torch.float32).eval()
        return self._get(("hf", attn), make)

    def hf_compiled(self):
        def make():
            import torch

            return torch.compile(self.hf("sdpa"))
        return self._get("hf-compile", make)

    # ---- ONNX
    def fingerprint(self) -> str:
        from bertfast.bench.harness import _version
        from bertfast.corpus import model_fingerprint

        h = hashlib.sha256(model_fingerprint(self.dir)["sha256"].encode())
        for k in ("torch", "transformers"):
            h.update(f"{k}={_version(k)}".encode())
        return h.hexdigest()[:16]

    def onnx_dir(self) -> Path:
        return (self._cache_dir or cache_root()) / self.fingerprint()

    def onnx_plain(self) -> Path:
        """The transformers model exported to ONNX (opset 17, dynamic batch / sequence), cached."""
        def make():
            import torch

            transformers = optional_import("transformers")
            optional_import("onnx")
            d = self.onnx_dir()
            path = d / "model.onnx"
            if path.is_file():
                self.notes.append(f"ONNX export reused from {d}")
                return path
            d.mkdir(parents=True, exist_ok=True)
            # a throwaway instance: the exported one is not compared with (nor timed) afterwards
            hf = transformers.BertModel.from_pretrained(str(self.dir), attn_implementation="eager",
                                                        dtype=torch.float32).eval()
            ex = make_batch(Shape(2, 16, lengths=(8, 16)), seed=0)
            names = ["input_ids", "attention_mask", "token_type_ids"]
            dyn = {k: {0: "batch", 1: "sequence"} for k in names + ["last_hidden_state"]}
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                t = Path(tmp) / "model.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(export_wrapper(hf), tuple(ex[k] for k in names), str(t), dynamo=False,
                                      opset_version=17, input_names=names, output_names=["last_hidden_state"],
                                      dynamic_axes=dyn)
                os.replace(t, path)
            self.notes.append(f"ONNX export written to {d}")
            return path
        return self._get("onnx-plain", make)

    def onnx_optimized(self) -> Path:
        """The plain export through ``onnxruntime.transformers.optimizer`` (BERT fusions), cached."""
        def make():
            ort = optional_import("onnxruntime")
            optimizer = optional_import("onnxruntime.transformers.optimizer")
            plain = self.onnx_plain()
            path = plain.parent / f"model.bert-opt.ort-{ort.__version__}.onnx"
            fusions = plain.parent / "fusions.json"
            if path.is_file():
                if fusions.is_file():
                    self.notes.append(f"ORT graph fusions: {fusions.read_text().strip()}")
                return path
            cfg = self.config
            opt = optimizer.optimize_model(str(plain), model_type="bert", num_heads=int(cfg["num_attention_heads"]),
                                           hidden_size=int(cfg["hidden_size"]))
            fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
            with tempfile.TemporaryDirectory(dir=plain.parent) as tmp:
                t = Path(tmp) / path.name
                opt.save_model_to_file(str(t))
                os.replace(t, path)
            fusions.write_text(json.dumps(fused) + "\n")
            self.notes.append(f"ORT graph fusions: {json.dumps(fused)}")
            return path
        return self._get("onnx-optimized", make)

    def ort_session(self, threads: int):
        def make():
            ort = optional_import("onnxruntime")
            return ort.InferenceSession(str(self.onnx_optimized()), ort_session_options(ort, threads),
                                        providers=["CPUExecutionProvider"])
        return self._get(("ort", threads), make)

    def ov_compiled(self, threads: int):
        def make():
            ov = optional_import("openvino")
            core = ov.Core()
            return core.compile_model(core.read_model(str(self.onnx_plain())), "CPU", openvino_config(threads))
        return self._get(("openvino", threads), make)

    # ---- corpus pipelines
    def sentence_transformer(self, max_length: int):
        """sentence-transformers' model of the directory (its modules.json: Transformer + mean
        Pooling + Normalize for all-MiniLM-L6-v2), or that stack built explicitly when the
        directory has no modules.json; loaded from the directory, offline."""
        def make():
            st = optional_import("sentence_transformers")
            if (self.dir / "modules.json").is_file():
                model = st.SentenceTransformer(str(self.dir), device="cpu")
            else:
                try:  # sentence-transformers 6; before: sentence_transformers.models (deprecated in 6)
                    mods = importlib.import_module("sentence_transformers.sentence_transformer.modules")
                except ImportError:
                    mods = optional_import("sentence_transformers.models")
                pool = mods.Pooling(int(self.config["hidden_size"]), "mean")
                model = st.SentenceTransformer(modules=[mods.Transformer(str(self.dir)), pool, mods.Normalize()],
                                               device="cpu")
            kinds = [type(mod).__name__ for mod in model]
            if not any(_is_mean_pooling(mod) for mod in model) or "Normalize" not in kinds:
                raise RuntimeError(f"the sentence-transformers model is {kinds}: not mean pooling + Normalize")
            model.max_seq_length = max_length
            return model.eval()
        return self._get(("st", max_length), make)

    def fast_tokenizer(self, max_length: int):
        def make():
            tokenizers = optional_import("tokenizers")
            tok = tokenizers.Tokenizer.from_file(str(self.dir / "tokenizer.json"))
            tok.no_padding()
            tok.enable_truncation(max_length=max_length)
            return tok
        return self._get(("tokenizer", max_length), make)


def _is_mean_pooling(module) -> bool:
    """A sentence-transformers Pooling module in mean mode (``pooling_mode == "mean"`` in
    sentence-transformers 6, ``pooling_mode_mean_tokens`` alone before)."""
    if type(module).__name__ != "Pooling":
        return False
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, str):
        return mode == "mean"
    flags = {k: v for k, v in vars(module).items() if k.startswith("pooling_mode_") and isinstance(v, bool)}
    return bool(flags.get("pooling_mode_mean_tokens")) and sum(flags.values()) == 1


# --------------------------------------------------------------------------- checks
def max_abs_at_real_tokens(out, ref, mask) -> float:
    import torch

    valid = torch.as_tensor(mask).bool()
    err = (torch.as_tensor(out).float() - torch.as_tensor(ref).float()).abs()[valid]
    return float(err.max()) if err.numel() else 0.0


def pooled_normalized(hidden, mask):
    """(B, H) mean over real tokens, L2-normalised, fp32 numpy."""
    import numpy as np

    h = np.asarray(hidden, dtype=np.float32)  # (B, S, H)
    m = np.asarray(mask, dtype=np.float32)[:, :, None]  # (B, S, 1)
    pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def min_cosine(a, b) -> float:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(1).min())


# --------------------------------------------------------------------------- cases
# the key of Result.info under which a row's _Kept travels until finish_checks (never written out)
_KEPT = "_kept"


class _Kept:
    """A row's function that keeps its last output, so that the row is checked after the timing
    loop on what it computed there (the harness's own check would cost one more call per row:
    on the corpus, one more pass over every text)."""

    def __init__(self, fn: Callable, check: Callable):
        self.fn, self.check, self.out = fn, check, None

    def __call__(self, *args):
        self.out = self.fn(*args)
        return self.out


def _prepared(fn: Callable, make_inputs: Callable[[], tuple], check: Callable, info: Dict[str, Any]):
    """A harness Prepared for one row: one input set (the same for every system), ``check``
    applied by :func:`finish_checks` to the last timed output."""
    from bertfast.bench.harness import Prepared

    kept = _Kept(fn, check)
    return Prepared(fn=kept, make_inputs=make_inputs, rotate=False, info={**info, _KEPT: kept})


def native_bf16() -> bool:
    """This CPU runs bf16 GEMMs natively (AVX512_BF16 or AMX)."""
    from bertfast.cpu_linear import cpu_features

    return cpu_features().native_bf16


class _Linears:
    """What a bertfast row's CPU linears ran (``bertfast.cpu_linear.record`` during its calls),
    named by role: qkv, attn-out, ffn1 (+ activation), ffn2."""

    KEY = "_linears"  # its Result.info key until finish_checks (then ``cpu_linears``, a plain dict)

    def __init__(self, config: Dict[str, Any]):
        C = int(config.get("hidden_size", 0))
        inter = int(config.get("intermediate_size", 4 * C))
        self.roles = {(3 * C, C): "qkv", (C, C): "attn-out", (inter, C): "ffn1", (C, inter): "ffn2"}
        self.seen: Dict[tuple, str] = {}

    def wrap(self, fn: Callable) -> Callable:
        from bertfast import cpu_linear

        def recorded(*args):
            with cpu_linear.record(self.seen):
                return fn(*args)
        return recorded

    def summary(self) -> Dict[str, str]:
        """{"qkv": "onednn-packed (M 4096)", ...}: the implementation per role and token bucket."""
        out: Dict[str, List[str]] = {}
        for (N, K, epi, M, _dtype), name in sorted(self.seen.items(), key=lambda kv: kv[0][3]):
            role = self.roles.get((N, K), f"{N}x{K}") + ("" if epi == "none" else f"+{epi}")
            out.setdefault(role, []).append(f"{name} (M {M})")
        return {k: ", ".join(v) for k, v in out.items()}


def linears_text(summary: Optional[Dict[str, str]]) -> str:
    """"linears: qkv onednn-packed (M 4096); ffn1+gelu onednn-fused (M 4096); ..."."""
    if not summary:
        return ""
    return "linears: " + "; ".join(f"{k} {v}" for k, v in summary.items())


def finish_checks(results: Sequence) -> None:
    """Check every timed row on its last output (``Result.check``); a failing check is reported
    on the row, not raised.  A bertfast row's linears become ``info["cpu_linears"]``."""
    from bertfast.bench.harness import STATUS_OK

    for r in results:
        lin = r.info.pop(_Linears.KEY, None)
        if lin is not None and lin.seen:
            r.info["cpu_linears"] = lin.summary()
        kept = r.info.pop(_KEPT, None)
        if kept is None or r.status != STATUS_OK or kept.out is None:
            continue
        try:
            r.check = kept.check(kept.out, None)
        except Exception as e:
            r.check = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        kept.out = None


def _unavailable_case(workload: str, system: str, shape: Dict[str, Any], reason: str):
    from bertfast.bench.harness import Case

    return Case(suite="cpu", op=workload, impl=system, shape=dict(shape), dtype="float32", unavailable=reason,
                baseline="bertfast", end_to_end=True)


def _as_numpy(batch: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v.numpy() for k, v in batch.items()}


def forward_cases(models: Models, workload: str, threads: int, systems: Sequence[str], seed: int,
                  do_compile: bool, refs: Dict[str, Any]) -> list:
    """One :class:`~bertfast.bench.harness.Case` per system for a fixed-shape workload at
    ``threads``; every system gets the same batch (``refs`` caches it and the references)."""
    import torch

    from bertfast.bench.harness import Case, Unavailable

    spec = SHAPES[workload]
    if workload not in refs:
        refs[workload] = {"batch": make_batch(spec, seed)}
    r = refs[workload]
    batch = r["batch"]
    mask = batch["attention_mask"]
    shape = {"workload": workload, "B": spec.batch, "S": spec.seq, "threads": threads,
             "padding": round(padding_fraction(mask), 3), "tokens": int(mask.sum())}

    def reference(kind: str):
        """transformers eager's (``hf``) or fp32 bertfast's (``bertfast``) last_hidden_state."""
        if kind not in r:
            model = models.hf("eager") if kind == "hf" else models.bertfast()
            with torch.inference_mode():
                r[kind] = model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state.clone()
        return r[kind]

    def fp32_check(out, args):
        try:
            ref = reference("hf")
        except Unavailable as e:
            return {"ok": None, "vs": "hf-eager", "why": str(e)}
        err = max_abs_at_real_tokens(out, ref, mask)
        return {"ok": bool(err <= FP32_ATOL), "max_abs_err": err, "vs": "hf-eager", "atol": FP32_ATOL}

    def cosine_check(bar: float):
        def check(out, args):
            a, b = pooled_normalized(out.float(), mask), pooled_normalized(reference("bertfast"), mask)
            cos = min_cosine(a, b)
            mean = float((a * b).sum(1).mean())
            return {"ok": bool(cos >= bar), "min_cos": cos, "mean_cos": mean, "vs": "bertfast", "min_cos_bar": bar}
        return check

    def torch_fn(model):
        def fn(ids, m):
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=m).last_hidden_state
        return fn

    def torch_inputs():
        return (batch["input_ids"], mask)

    def build_for(system: str) -> Callable[[], Any]:
        def build():
            info = {"torch_threads": torch.get_num_threads()}
            if system in ("bertfast", "bertfast-bf16"):
                lin = _Linears(models.config)
                info[_Linears.KEY] = lin
                if system == "bertfast":
                    return _prepared(lin.wrap(torch_fn(models.bertfast())), torch_inputs, fp32_check, info)
                return _prepared(lin.wrap(torch_fn(models.bertfast_bf16())), torch_inputs, cosine_check(BF16_MIN_COS),
                                 info)
            if system == "bertfast-int8":
                return _prepared(torch_fn(models.bertfast_int8()), torch_inputs, cosine_check(INT8_MIN_COS), info)
            if system in ("hf-eager", "hf-sdpa"):
                return _prepared(torch_fn(models.hf(system[3:])), torch_inputs, fp32_check, info)
            if system == "hf-compile":
                return _prepared(torch_fn(models.hf_compiled()), torch_inputs, fp32_check, info)
            feeds = _as_numpy(batch)
            if system == "ort":
                sess = models.ort_session(threads)
                so = sess.get_session_options()

                def ort_fn(f):
                    return torch.from_numpy(sess.run(["last_hidden_state"], f)[0])
                info.update(intra_op_num_threads=so.intra_op_num_threads,
                            inter_op_num_threads=so.inter_op_num_threads, graph=models.onnx_optimized().name)
                return _prepared(ort_fn, lambda: (feeds,), fp32_check, info)
            if system == "openvino":
                compiled = models.ov_compiled(threads)
                req = compiled.create_infer_request()

                def ov_fn(f):
                    req.infer(f)
                    return torch.from_numpy(req.get_output_tensor(0).data)
                info.update({k: _ov_str(compiled.get_property(k)) for k in ("INFERENCE_PRECISION_HINT",
                                                                            "PERFORMANCE_HINT")})
                info["INFERENCE_NUM_THREADS"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
                return _prepared(ov_fn, lambda: (feeds,), fp32_check, info)
            raise ValueError(f"unknown system {system!r}")
        return build

    cases = []
    for system in systems:
        if system not in FORWARD_SYSTEMS:
            continue
        if system == "hf-compile" and not do_compile:
            cases.append(_unavailable_case(workload, system, shape, COMPILE_SKIPPED))
            continue
        if system == "bertfast-bf16" and not native_bf16():
            cases.append(_unavailable_case(workload, system, shape, BF16_NOT_NATIVE))
            continue
        notes = {"bertfast-bf16": "bfloat16 weights and activations (opt-in); LayerNorm / softmax accumulate in fp32",
                 "hf-compile": "torch.compile of hf-sdpa; compile time excluded (first call)",
                 "ort": "ONNX Runtime, BERT-fused graph", "openvino": "OpenVINO, plain ONNX graph"}.get(system, "")
        cases.append(Case(suite="cpu", op=workload, impl=system, shape=dict(shape),
                          dtype="bfloat16" if system == "bertfast-bf16" else "float32",
                          build=build_for(system), baseline="bertfast", end_to_end=True, notes=notes))
    return cases


def ort_pipeline(models: Models, threads: int, max_length: int, batch_size: int = CORPUS_BATCH) -> Callable:
    """texts -> (N, H) normalised mean-pooled embeddings with the fast tokenizer, ONNX Runtime
    and numpy: sorted by length, batches of ``batch_size`` padded to their longest, original
    order restored."""
    import numpy as np

    tok = models.fast_tokenizer(max_length)
    sess = models.ort_session(threads)

    def encode(texts):
        encs = tok.encode_batch(list(texts))
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i].ids))
        out = None
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            longest = max(len(encs[i].ids) for i in idx)
            ids = np.zeros((len(idx), longest), dtype=np.int64)
            mask = np.zeros_like(ids)
            types = np.zeros_like(ids)
            for row, i in enumerate(idx):
                e = encs[i]
                n = len(e.ids)
                ids[row, :n], types[row, :n], mask[row, :n] = e.ids, e.type_ids, 1
            hidden = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                       "token_type_ids": types})[0]  # (b, L, H)
            pooled = pooled_normalized(hidden, mask)
            if out is None:
                out = np.empty((len(encs), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled
        return out

    return encode


def corpus_cases(models: Models, threads: int, systems: Sequence[str], texts: List[str], refs: Dict[str, Any]) -> list:
    """The corpus workload: one Case per corpus system, each its own usual pipeline (batch 32);
    checked by the min cosine against bertfast's vectors."""
    import numpy as np
    import torch

    from bertfast.bench.harness import Case

    shape = {"workload": "corpus", "texts": len(texts), "batch": CORPUS_BATCH, "threads": threads}

    def bertfast_vectors():
        if "corpus" not in refs:  # the bertfast row's check stores them; computed here only without that row
            enc = models.sentence_encoder()
            refs["corpus"] = enc.encode(texts, batch_size=CORPUS_BATCH, normalize=True, show_progress=False,
                                        convert_to_numpy=True)
        return refs["corpus"]

    def keep_reference(out, args):
        refs.setdefault("corpus", out)
        return {"ok": True, "reference": True}

    def check_for(bar: float):
        def check(out, args):
            cos = min_cosine(out, bertfast_vectors())
            return {"ok": bool(cos > bar), "min_cos": cos, "vs": "bertfast", "min_cos_bar": bar}
        return check

    def build_for(system: str):
        def build():
            info = {"torch_threads": torch.get_num_threads()}
            if system in ("bertfast", "bertfast-bf16", "bertfast-int8"):
                enc = models.sentence_encoder(int8=system == "bertfast-int8",
                                              dtype="bfloat16" if system == "bertfast-bf16" else "float32")
                info["max_length"] = enc.max_length

                def fn(t):
                    return enc.encode(t, batch_size=CORPUS_BATCH, normalize=True, show_progress=False,
                                      convert_to_numpy=True)
                check = {"bertfast": keep_reference, "bertfast-bf16": check_for(BF16_MIN_COS),
                         "bertfast-int8": check_for(INT8_MIN_COS)}[system]
                if system != "bertfast-int8":
                    lin = _Linears(models.config)
                    info[_Linears.KEY] = lin
                    fn = lin.wrap(fn)
                return _prepared(fn, lambda: (texts,), check, info)
            max_length = models.sentence_encoder().max_length  # the same truncation for every system
            info["max_length"] = max_length
            if system == "sentence-transformers":
                st = models.sentence_transformer(max_length)

                def fn(t):
                    with torch.inference_mode():
                        return np.asarray(st.encode(t, batch_size=CORPUS_BATCH, normalize_embeddings=True,
                                                    show_progress_bar=False, convert_to_numpy=True))
                info["modules"] = [type(m).__name__ for m in st]
                return _prepared(fn, lambda: (texts,), check_for(FP32_MIN_COS), info)
            if system == "ort":
                fn = ort_pipeline(models, threads, max_length)
                info["intra_op_num_threads"] = models.ort_session(threads).get_session_options().intra_op_num_threads
                return _prepared(fn, lambda: (texts,), check_for(FP32_MIN_COS), info)
            raise ValueError(f"unknown corpus system {system!r}")
        return build

    notes = {"bertfast": "bertfast.SentenceEncoder.encode (length-sorted batches of 32)",
             "bertfast-bf16": "SentenceEncoder in bfloat16 (opt-in)",
             "bertfast-int8": "SentenceEncoder with quantize_int8 (opt-in)",
             "sentence-transformers": "SentenceTransformer.encode(batch_size=32, normalize_embeddings=True)",
             "ort": "ORT pipeline: tokenizers, length-sorted batches of 32, ORT, numpy mean pool + normalise"}
    return [_unavailable_case("corpus", s, shape, BF16_NOT_NATIVE) if s == "bertfast-bf16" and not native_bf16()
            else Case(suite="cpu", op="corpus", impl=s, shape=dict(shape),
                      dtype="bfloat16" if s == "bertfast-bf16" else "float32", build=build_for(s),
                      baseline="bertfast", end_to_end=True, notes=notes[s])
            for s in systems if s in CORPUS_SYSTEMS]


# --------------------------------------------------------------------------- comparisons
def vs(other: Dict[str, Any], candidate: Dict[str, Any]) -> Dict[str, Any]:
    """How much faster ``candidate`` is than ``other`` (timings from harness.summarize): other's
    median / candidate's median, with the range the spreads allow (:func:`harness.compare`)."""
    from bertfast.bench.harness import compare

    return compare(other, candidate)


def speedup_cell(c: Optional[Dict[str, Any]], digits: int = 2) -> str:
    """``"1.42x (1.30-1.55)"`` outside the combined spread, ``"within noise (0.9-1.2)"`` inside
    it (the harness's convention, :func:`harness.speedup_text`), ``"-"`` when there is none."""
    from bertfast.bench.harness import speedup_text

    if not c or c.get("speedup") is None:
        return "-"
    text = speedup_text(SimpleNamespace(speedup_vs_baseline=c["speedup"], impl="other", baseline="bertfast",
                                        speedup_significant=c["significant"]), digits)
    return f"{text} ({c['low']:.{digits}f}-{c['high']:.{digits}f})"


def target_status(c: Dict[str, Any], target: float) -> str:
    """"met" when the whole range the spreads allow is at or above ``target``, "missed" when it
    is all below, "within noise" when it straddles the target."""
    if c.get("speedup") is None or c.get("low") is None:
        return "n/a"
    if c["low"] >= target:
        return "met"
    if c["high"] < target:
        return "missed"
    return "within noise"


def evaluate_targets(timings: Dict[Tuple[str, str], Dict[str, Any]], candidate: str = "bertfast",
                     reasons: Optional[Dict[Tuple[str, str], str]] = None) -> List[Dict[str, Any]]:
    """The targets of ``candidate`` (:data:`TARGETS`, :data:`OPT_IN_TARGETS` for the opt-in rows)
    checked from measured timings: ``timings[(workload, system)]`` is a harness.summarize dict;
    ``reasons[(workload, system)]`` why a row has none."""
    reasons = reasons or {}
    out = []
    for workload, others, target in OPT_IN_TARGETS.get(candidate, TARGETS):
        mine = timings.get((workload, candidate))
        row = {"candidate": candidate, "workload": workload, "vs": "/".join(others), "target": target}
        present = [(s, timings[(workload, s)]) for s in others if (workload, s) in timings]
        if mine is None or not present:
            missing = [(workload, candidate)] if mine is None else [(workload, s) for s in others]
            why = "; ".join(f"{s}: {reasons.get((w, s), 'not measured')}" for w, s in missing)
            row.update(status="n/a", speedup=None, low=None, high=None,
                       text=f"{candidate} vs {row['vs']} on {workload}: target >= {target:g}x: n/a ({why})")
            out.append(row)
            continue
        best, t = min(present, key=lambda p: p[1]["median_ms"])
        c = vs(t, mine)
        status = target_status(c, target)
        which = best if len(others) == 1 else f"best of {'/'.join(others)} = {best}"
        row.update(vs=best, status=status, speedup=c["speedup"], low=c["low"], high=c["high"],
                   text=(f"{candidate} vs {which} on {workload}: {c['speedup']:.2f}x "
                         f"({c['low']:.2f}-{c['high']:.2f}, {t['median_ms']:.1f} / {mine['median_ms']:.1f} ms), "
                         f"target >= {target:g}x: {status}"))
        out.append(row)
    return out


# --------------------------------------------------------------------------- tables
def _ms(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def _check_cell(chk: Optional[Dict[str, Any]]) -> str:
    if not chk:
        return "-"
    if chk.get("ok") is None:
        return f"n/a ({chk.get('why', '')})"
    if chk.get("reference"):
        return "reference"
    word = "ok" if chk["ok"] else "FAIL"
    if "max_abs_err" in chk:
        return f"{word} (max diff {chk['max_abs_err']:.1e} vs {chk['vs']})"
    if "min_cos" in chk:
        mean = f", mean {chk['mean_cos']:.6f}" if "mean_cos" in chk else ""
        return f"{word} (min cos {chk['min_cos']:.6f}{mean} vs {chk['vs']})"
    return word


def _row_notes(r) -> str:
    parts = list(r.flags)
    if r.notes:
        parts.append(r.notes)
    if r.impl == "hf-compile" and r.first_call_ms is not None and math.isfinite(r.first_call_ms):
        parts.append(f"compile + first call {r.first_call_ms / 1e3:.1f} s")
    if "INFERENCE_PRECISION_HINT" in r.info:
        p = r.info["INFERENCE_PRECISION_HINT"]
        parts.append(f"precision {p}" + ("" if p == "f32" else " (NOT f32: not an fp32 row)") +
                     f", {r.info.get('INFERENCE_NUM_THREADS')} threads")
    if "intra_op_num_threads" in r.info:
        parts.append(f"intra-op {r.info['intra_op_num_threads']} threads")
    if r.info.get("cpu_linears"):
        parts.append(linears_text(r.info["cpu_linears"]))
    return "; ".join(parts)


def table(results: Sequence, threads: int) -> str:
    """Markdown table of one thread count: workload x system, median, spread, rate, bertfast's
    speedup over the row, check."""
    from bertfast.bench.harness import STATUS_OK

    head = ("| workload | system | median ms | p10-p90 ms | n | rate | bertfast speedup (range) | check | notes |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [f"### {threads} thread{'s' if threads > 1 else ''}", "", head]
    for r in results:
        if r.status != STATUS_OK:
            lines.append(f"| {r.op} | {r.impl} | {r.status}: {r.reason} |  |  |  |  |  |  |")
            continue
        t = r.timing
        med = _ms(t["median_ms"]) + (" (noisy)" if r.noisy else "")
        if r.op == "corpus":
            rate = f"{r.shape['texts'] / (t['median_ms'] / 1e3):.0f} sent/s"
        else:
            rate = f"{r.shape['tokens'] / (t['median_ms'] / 1e3) / 1e3:.1f}k tok/s"
        sp = "-" if r.impl == "bertfast" else speedup_cell(r.info.get("bertfast_speedup"))
        lines.append(f"| {r.op} | {r.impl} | {med} | {_ms(t['p10_ms'])}-{_ms(t['p90_ms'])} | {t['n']} | {rate} | "
                     f"{sp} | {_check_cell(r.check)} | {_row_notes(r)} |")
    return "\n".join(lines)


def targets_text(targets: Sequence[Dict[str, Any]]) -> str:
    lines = ["targets (from the numbers above; met / missed only outside the combined p10-p90 range):"]
    for t in targets:
        mark = " [opt-in]" if t["candidate"] in OPT_IN else ""
        lines.append(f"- {t['text']}{mark}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- run
def _slug(text: str, limit: int = 40) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:limit].strip("-") or "cpu"


def save_study(out_dir: str, kind: str, doc: Dict[str, Any], text: str) -> str:
    """Write a CPU study script's results (``benchmarks/cpu_*.py``) as
    ``<date>_<cpu-slug>_<kind>.{json,md}`` into ``out_dir``; ``doc["cpu"]`` names the CPU.  Returns
    the path without suffix."""
    from datetime import date

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{date.today().isoformat()}_{_slug(doc['cpu'].split(':')[0])}_{kind}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    return str(stem)


def file_stem(environment: Dict[str, Any], out_dir: str) -> str:
    """``<date>_<cpu-slug>_cpu`` (the CPU's model name with its family / model numbers where
    /proc/cpuinfo has them: "AMD EPYC" alone names several generations), ``-2``, ``-3``, ... when
    taken (:func:`report.file_stem`)."""
    from bertfast.bench.report import file_stem as stem_of

    machine = environment.get("machine", {})
    cpu = (machine.get("cpu_features") or {}).get("model") or machine.get("cpu") or "cpu"  # family / model included
    return stem_of(environment, ["cpu"], out_dir, device=_slug(cpu))


def cpu_bencher(rounds: int, extra_warmup: int = 1):
    """The harness's Bencher on the CPU with exactly ``rounds`` timed rounds and 1 +
    ``extra_warmup`` warm-up calls per row (the first call, timed on its own, and the extra ones;
    the corpus takes none extra: one call is a whole pass over it), without the device-read count
    (one more call per row, and there is no device to read from)."""
    import torch

    from bertfast.bench import harness

    class CpuBencher(harness.Bencher):
        def _device_reads(self, lv):
            return 0

    settings = harness.BenchSettings(warmup_ms=0, target_ms=0, min_reps=rounds, max_reps=rounds,
                                     min_warmup=extra_warmup,
                                     max_copies=1)
    return CpuBencher(torch.device("cpu"), quick=False, settings=settings)


def plot_speedups(results: Sequence, path: str, threads: int, cpu: str) -> bool:
    """Bars of bertfast's speedup over each system per workload, p10-p90 error bars; False when
    no row has one."""
    from bertfast.bench.report import _plot_bars

    groups: List[str] = []
    series: Dict[str, Dict[str, tuple]] = {}
    noisy = {r.op: r.noisy for r in results if r.impl == "bertfast" and r.timing}
    for r in results:
        c = r.info.get("bertfast_speedup")
        if not c or c.get("speedup") is None or r.impl in OPT_IN:  # opt-in rows: in the table, not here
            continue
        if r.op not in groups:
            groups.append(r.op)
        series.setdefault(r.impl, {})[r.op] = (c["speedup"], c["low"], c["high"], r.noisy or noisy.get(r.op, False))
    if not series:
        return False
    bars = {name: [s.get(g) for g in groups] for name, s in series.items()}
    _plot_bars(path, f"bertfast speedup over each system, {threads} thread{'s' if threads > 1 else ''} ({cpu})",
               "speedup of bertfast (x)", groups, bars, hline=1.0)
    return True


def resolve_workloads(args) -> List[str]:
    if args.workloads:
        return list(dict.fromkeys(args.workloads))
    return list(QUICK_WORKLOADS if args.quick else WORKLOADS)


def rounds_for(workload: str, args) -> int:
    if args.rounds:
        return int(args.rounds)
    if workload == "corpus":
        return CORPUS_QUICK_ROUNDS if args.quick else CORPUS_ROUNDS
    spec = SHAPES[workload]
    return spec.quick_rounds if args.quick else spec.rounds


def measure(args, model_dir: Path, log: Callable[[str], None]) -> Dict[str, Any]:
    """Run every workload x system at every thread count; returns {"results": {n: [Result]},
    "targets": {n: [...]}, "notes": [...]}."""
    import torch

    from bertfast.bench import harness

    notes: List[str] = []
    models = Models(model_dir, notes)
    systems = list(dict.fromkeys(args.systems or SYSTEMS))
    workloads = resolve_workloads(args)
    corpus_size = args.corpus_size or (QUICK_CORPUS_SIZE if args.quick else DEFAULT_CORPUS_SIZE)
    texts = build_corpus(corpus_size, args.seed) if "corpus" in workloads else []
    refs: Dict[str, Any] = {}
    out: Dict[str, Any] = {"results": {}, "targets": {}, "notes": notes, "corpus_size": corpus_size}
    before = torch.get_num_threads()
    tuner, saved_mode = _tune_cpu_linears(notes)
    try:
        for n in args.threads or DEFAULT_THREADS:
            torch.set_num_threads(n)
            busy = harness.busy_note(torch.device("cpu"))
            if busy:
                notes.append(f"{n} threads: {busy}")
            rows = []
            for w in workloads:
                if w == "corpus":
                    cases = corpus_cases(models, n, systems, texts, refs)
                else:
                    cases = forward_cases(models, w, n, systems, args.seed, bool(args.compile), refs)
                if not cases:
                    continue
                log(f"{n} thread{'s' if n > 1 else ''}, {w}: {', '.join(c.impl for c in cases)} "
                    f"({rounds_for(w, args)} rounds)")
                res = cpu_bencher(rounds_for(w, args), 0 if w == "corpus" else 1).run_group(cases)
                finish_checks(res)
                bf = next((r for r in res if r.impl == "bertfast" and r.status == harness.STATUS_OK), None)
                for r in res:
                    if bf is not None and r is not bf and r.status == harness.STATUS_OK:
                        r.info["bertfast_speedup"] = vs(r.timing, bf.timing)
                rows += res
            out["results"][n] = rows
            timings = {(r.op, r.impl): r.timing for r in rows if r.status == harness.STATUS_OK and r.timing}
            reasons = {(r.op, r.impl): r.reason or r.status for r in rows if r.status != harness.STATUS_OK}
            targets = evaluate_targets(timings, "bertfast", reasons)
            for opt in OPT_IN:
                if any(r.impl == opt and r.status == harness.STATUS_OK for r in rows):
                    targets += evaluate_targets(timings, opt, reasons)
            out["targets"][n] = [t for t in targets if t["workload"] in workloads]
    finally:
        torch.set_num_threads(before)
        if tuner is not None:
            tuner.set_mode(saved_mode)
    return out


def _tune_cpu_linears(notes: List[str]):
    """Puts the CPU linears' tuner in "tune" mode for the run (each linear shape class of the
    bertfast rows timed on first use, i.e. in the row's warm-up call), unless
    ``BERTFAST_AUTOTUNE=off``; returns (tuner, its mode to restore)."""
    from bertfast import cpu_linear

    tuner = cpu_linear.TUNER
    if tuner is None:  # pragma: no cover - no tuner without bertfast.kernels
        notes.append("CPU linears: F.linear everywhere (bertfast.kernels.tuning did not import)")
        return None, None
    saved = tuner._mode
    if tuner.mode == "off":
        notes.append("CPU linears: F.linear everywhere (BERTFAST_AUTOTUNE=off)")
        return tuner, saved
    tuner.set_mode("tune")
    notes.append(f"CPU linears (bertfast rows): every shape class timed on first use, in the row's warm-up call, "
                 f"unless already stored, and the fastest implementation kept (bertfast.cpu_linear; cache "
                 f"{tuner.cache_file()}); each row says what its linears ran (M: token-count bucket)")
    return tuner, saved


def run(args) -> int:
    """``bertfast bench cpu`` with parsed ``args``; returns the exit status."""
    import torch

    from bertfast.bench import harness
    from bertfast.bench.report import _clean
    from bertfast.loading import CheckpointError, resolve_model_path

    def refuse(msg: str) -> int:  # an expected failure: one line, as the CLI prints them
        print(f"bertfast: error: {msg}", file=sys.stderr)
        return 2

    unused = [f"--{k}" for k in ("batch", "seq", "impl") if getattr(args, k, None)]
    if unused:
        return refuse(f"{', '.join(unused)}: not used by bench cpu (its shapes and systems are --workloads and "
                      f"--systems)")
    if getattr(args, "dtype", "auto") not in ("auto", "fp32"):
        return refuse("bench cpu runs fp32 only (bertfast-bf16 and bertfast-int8 are its opt-in rows)")
    names = args.model or ["minilm"]
    if len(names) != 1:
        return refuse("bench cpu takes one --model (a name or a checkpoint directory)")
    try:
        model_dir = Path(resolve_model_path(names[0]))
    except CheckpointError as e:
        return refuse(" ".join(str(e).split()))
    if not (model_dir / "tokenizer.json").is_file():
        return refuse(f"{model_dir}: bench cpu needs tokenizer.json next to the weights")

    def log(msg: str) -> None:
        if not getattr(args, "no_progress", False):
            print(f"bertfast bench cpu: {msg}", file=sys.stderr, flush=True)

    threads = list(args.threads or DEFAULT_THREADS)
    from bertfast.cpu_linear import cpu_features

    env = harness.environment(torch.device("cpu"), command=getattr(args, "_command", None))
    features = cpu_features()
    env["machine"]["cpu_features"] = {"model": features.model, **features.flags()}
    env["versions"].update({k: v for k, v in package_versions().items() if k not in env["versions"]})
    m = measure(args, model_dir, log)
    notes = list(dict.fromkeys(m["notes"]))
    notes.append("bertfast speedup = the system's median / bertfast's median (above 1: bertfast is faster); "
                 "'within noise' when the range the p10-p90 spreads allow contains 1")
    notes.append("ORT: intra_op_num_threads = n, inter_op_num_threads = 1; OpenVINO: INFERENCE_NUM_THREADS = n, "
                 "INFERENCE_PRECISION_HINT requested f32 and reported per row (every fp32 row must say f32)")
    if "corpus" in resolve_workloads(args):
        notes.append("corpus: tokenization (Hugging Face tokenizers in every system) uses its own thread pool; "
                     "set RAYON_NUM_THREADS before the run to pin it")
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}
    settings.update(model_dir=str(model_dir), threads=threads, workloads=resolve_workloads(args),
                    corpus_size=m["corpus_size"], rounds={w: rounds_for(w, args) for w in resolve_workloads(args)},
                    shapes={k: vars(v) for k, v in SHAPES.items()}, fp32_atol=FP32_ATOL, fp32_min_cos=FP32_MIN_COS)

    label = model_dir.name if os.path.isdir(os.path.expanduser(names[0])) else names[0]
    md = [f"# bertfast bench cpu: {label}", "",
          f"- model: {model_dir} (fp32)", f"- date: {env['created']}",
          f"- cpu: {features.describe()} ({env['machine']['cpu_count']} logical cores)",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
          f"- command: `{env['command']}`"] + [f"- note: {n}" for n in notes] + [""]
    for n in threads:
        md += [table(m["results"][n], n), "", targets_text(m["targets"][n]), ""]
    text = "\n".join(md) + "\n"
    print(text)

    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, file_stem(env, out_dir))
    doc = {"schema": "bertfast.bench.cpu/1", "environment": env, "settings": settings, "notes": notes,
           "results": [r.to_dict() for n in threads for r in m["results"][n]],
           "targets": [dict(t, threads=n) for n in threads for t in m["targets"][n]]}
    pngs: List[str] = []
    if not args.no_plots:
        if importlib.util.find_spec("matplotlib") is None:
            log("plots skipped: matplotlib is not installed")
        else:
            for n in threads:
                path = f"{stem}_speedup_{n}t.png"
                if plot_speedups(m["results"][n], path, n, env["machine"]["cpu"]):
                    pngs.append(path)
                else:
                    log(f"{os.path.basename(path)} not written: no row with a speedup")
    doc["plots"] = [os.path.basename(p) for p in pngs]
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(_clean(doc), f, indent=1)
        f.write("\n")
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    log(f"wrote {stem}.json, {stem}.md" + (f" and {len(pngs)} plot{'s' if len(pngs) > 1 else ''}" if pngs else ""))
    rows = [r for n in threads for r in m["results"][n]]
    bad = [r for r in rows if r.status == harness.STATUS_ERROR]
    for r in bad:
        log(f"error in {r.op} {r.impl} ({r.shape.get('threads')} threads): {r.reason}")
    failed = [r for r in rows if r.check and r.check.get("ok") is False and r.impl not in OPT_IN]
    for r in failed:
        log(f"check failed: {r.op} {r.impl} ({r.shape.get('threads')} threads): {_check_cell(r.check)}")
    return 1 if bad or failed else 0
