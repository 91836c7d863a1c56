"""The activation table: ``config.hidden_act`` -> (the GEMM epilogue the kernels fuse, or None, and
the PyTorch function).  The one place that knows activations: config validation, the model (both
backends), the heads and the backend choice read it."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# In place, for a tensor the caller owns and autograd does not need (the CPU inference path):
# saves the allocation and one write of a (tokens, intermediate) tensor per layer.
def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch._C._nn.gelu(x, out=x)


def _gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    return torch._C._nn.gelu(x, approximate="tanh", out=x)


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


# name -> (kernel epilogue of bertfast.kernels.linear, or None: the kernels run the GEMM and torch applies
# the function after it; torch function; the same function in place).  "gelu" is BERT's exact
# (erf) GELU; gelu_new and gelu_pytorch_tanh are both its tanh approximation.
Fn = Callable[[torch.Tensor], torch.Tensor]
ACTIVATIONS: Dict[str, Tuple[Optional[str], Fn, Fn]] = {
    "gelu": ("gelu", F.gelu, _gelu_),
    "gelu_new": ("gelu_tanh", _gelu_tanh, _gelu_tanh_),
    "gelu_pytorch_tanh": ("gelu_tanh", _gelu_tanh, _gelu_tanh_),
    "relu": (None, F.relu, torch.relu_),
    "silu": (None, F.silu, _silu_),
    "swish": (None, F.silu, _silu_),
}

NAMES = tuple(ACTIVATIONS)


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch function of ``name``; ValueError for a name not in the table."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported (use one of {', '.join(NAMES)})")
    return ACTIVATIONS[name][1]


def get_activation_(name: str) -> Fn:
    """``name``'s function in place (same values as :func:`get_activation`): only for a tensor
    that nothing else holds and that autograd does not need."""
    get_activation(name)  # the one error for an unknown name
    return ACTIVATIONS[name][2]


def kernel_epilogue(name: str) -> Optional[str]:
    """The activation bertfast.kernels.linear fuses for ``name`` (None: applied by torch after the GEMM)."""
    return ACTIVATIONS[name][0]
