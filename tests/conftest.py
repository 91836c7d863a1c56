"""Test configuration shared by every test file.

* Without CUDA, TRITON_INTERPRET=1 is set before ``kernels`` is imported, so the Triton
  kernels run under the interpreter on CPU tensors (rung 2 of the ladder).
* ``@pytest.mark.gpu`` tests need CUDA and real compiled kernels; they skip cleanly otherwise.
* ``@pytest.mark.interpreter`` tests need the interpreter; they skip on a CUDA run
  (run ``TRITON_INTERPRET=1 pytest -m interpreter`` there to include them).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (set automatically when there is no CUDA)")
    for item in items:
        if "gpu" in item.keywords and (not HAS_CUDA or kernels.INTERPRET):
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not kernels.INTERPRET:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
