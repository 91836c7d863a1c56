"""pytest-benchmark: attention (Triton padded / varlen vs eager and SDPA) at small sizes."""
import pytest

from bertfast.bench import harness, suites

DEVICE, DTYPE = harness.bench_device()
CUDA = DEVICE.type == "cuda"

if CUDA:
    SEQS, TOKENS, DIRS = [128, 512], 4096, ["fwd", "fwd+bwd"]
else:
    SEQS, TOKENS, DIRS = [64], 128, ["fwd", "fwd+bwd"]

CASES = suites.attention_cases(SEQS, TOKENS, 12, 64, DEVICE, DTYPE,
                               ["triton", "triton-varlen", "eager", "sdpa", "sdpa-mask"],
                               ["full", "mixed"], DIRS, causal=CUDA)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape_label.replace(' ', ',')}]-{c.impl}")
def test_attention(case, run_case):
    run_case(case)
