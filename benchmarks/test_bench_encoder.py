"""pytest-benchmark: whole encoders (bertfast vs transformers) at small sizes."""
import pytest

from bertfast.bench import harness, suites

DEVICE, DTYPE = harness.bench_device()
CUDA = DEVICE.type == "cuda"

if CUDA:
    MODELS, SHAPES = ["bert-base"], [(8, 128)]
    IMPLS = ["hf-eager", "hf-sdpa", "bertfast-torch", "bertfast-triton", "bertfast-triton-unpad",
             "bertfast-triton-graphs"]
else:
    MODELS, SHAPES = ["minilm"], [(2, 32)]
    IMPLS = ["hf-eager", "hf-sdpa", "bertfast-torch", "bertfast-triton"]

CASES = suites.encoder_cases(MODELS, SHAPES, DEVICE, DTYPE, IMPLS, ["full", "mixed"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape_label.replace(' ', ',')}]-{c.impl}")
def test_encoder(case, run_case):
    run_case(case)
