"""The activation table: ``config.hidden_act`` -> (the GEMM epilogue the kernels fuse, or None, and
the PyTorch function).  The one place that knows activations: config validation, the model (both
backends), the heads and the backend choice read it."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# name -> (kernel epilogue of kernels.linear, or None: the kernels run the GEMM and torch applies
# the function after it; torch function).  "gelu" is BERT's exact (erf) GELU; gelu_new and
# gelu_pytorch_tanh are both its tanh approximation.
ACTIVATIONS: Dict[str, Tuple[Optional[str], Callable[[torch.Tensor], torch.Tensor]]] = {
    "gelu": ("gelu", F.gelu),
    "gelu_new": ("gelu_tanh", _gelu_tanh),
    "gelu_pytorch_tanh": ("gelu_tanh", _gelu_tanh),
    "relu": (None, F.relu),
    "silu": (None, F.silu),
    "swish": (None, F.silu),
}

NAMES = tuple(ACTIVATIONS)


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch function of ``name``; ValueError for a name not in the table."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported (use one of {', '.join(NAMES)})")
    return ACTIVATIONS[name][1]


def kernel_epilogue(name: str) -> Optional[str]:
    """The activation kernels.linear fuses for ``name`` (None: applied by torch after the GEMM)."""
    return ACTIVATIONS[name][0]
