"""pytest-benchmark: the kernel-suite ops (Triton vs eager PyTorch) at small sizes."""
import pytest

from bertfast.bench import harness, suites

DEVICE, DTYPE = harness.bench_device()
CUDA = DEVICE.type == "cuda"

if CUDA:
    MODELS, TOKENS = ["bert-base"], [2048]
else:
    MODELS, TOKENS = ["minilm"], [128]

CASES = suites.kernel_cases(MODELS, TOKENS, DEVICE, DTYPE, ["triton", "eager"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape_label.replace(' ', ',')}]-{c.impl}")
def test_kernel(case, run_case):
    run_case(case)
