"""pytest-benchmark: the kernel-suite ops (Triton vs eager PyTorch) at small sizes."""
import pytest

import torch

from bertfast.bench import harness, suites

CUDA = torch.cuda.is_available() and not harness.interpreter_active()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32

if CUDA:
    MODELS, TOKENS = ["bert-base"], [2048]
else:
    MODELS, TOKENS = ["minilm"], [128]

CASES = suites.kernel_cases(MODELS, TOKENS, DEVICE, DTYPE, ["triton", "eager"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape_label.replace(' ', ',')}]-{c.impl}")
def test_kernel(case, run_case):
    run_case(case)
