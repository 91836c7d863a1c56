"""The one place that decides which implementation runs a forward pass.

* ``"torch"``  : the plain PyTorch reference path (bertfast/modeling.py), any device.
* ``"triton"`` : the Triton kernels (bertfast/ops.py over kernels/), CUDA tensors; on CPU only
  under ``TRITON_INTERPRET=1`` (the interpreter: for tests, not for speed).
* ``"auto"``   : triton for CUDA tensors when triton is importable, torch elsewhere.

Some requests always take the torch path, whatever the backend, because the fused kernels do
not produce what they ask for: ``output_attentions=True`` (the fused attention never forms the
(S, S) probabilities) and ``inputs_embeds`` (no token ids to gather).  Training with
``attention_probs_dropout_prob > 0`` keeps the Triton GEMM / LayerNorm kernels and runs the
attention core with PyTorch SDPA (the fused kernel has no dropout).
"""
from __future__ import annotations

from typing import Optional

import torch

from bertfast.kernels._common import dtype_name, recording_launches

BACKENDS = ("auto", "torch", "triton")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_runs_on(device: torch.device) -> tuple[bool, str]:
    """(can the Triton kernels run on tensors of this device?, why not)."""
    from bertfast import kernels

    if not kernels.HAS_TRITON:
        return False, "triton is not installed"
    if device.type == "cuda":
        if kernels.INTERPRET:
            return True, ""
        return True, ""
    if device.type == "cpu" and (kernels.INTERPRET or recording_launches()):
        return True, ""
    return False, f"the Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to interpret them on CPU"


def resolve(name: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for a forward on ``device``; raises ValueError if ``name`` is
    ``"triton"`` and the kernels cannot run there."""
    check_backend(name)
    if name == "torch":
        return "torch"
    ok, why = triton_runs_on(device)
    if name == "auto":
        # auto never picks the interpreter: it is for tests, not speed
        from bertfast import kernels

        return "triton" if ok and device.type == "cuda" and not kernels.INTERPRET else "torch"
    if not ok:
        raise ValueError(f"backend='triton': {why}")
    return "triton"


def kernel_unsupported(config, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton kernels cannot run a BERT encoder with this config and parameter dtype (a
    sentence naming the property), or None when they can.  ``config``: a bertfast or transformers
    BertConfig.  Head sizes come from the attention kernel's own definition
    (``bertfast.kernels.attention.supports_head_dim``), activations from bertfast/activations.py."""
    from bertfast.activations import ACTIVATIONS
    from bertfast.kernels._common import SUPPORTED_DTYPES

    act = getattr(config, "hidden_act", None)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        return f"hidden_act {act!r} is not supported by the kernels"
    pet = getattr(config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute", "sinusoidal"):
        return f"position_embedding_type {pet!r} is not supported by the kernels (absolute or sinusoidal)"
    heads, hidden = config.num_attention_heads, config.hidden_size
    if not heads or hidden % heads:
        return f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
    from bertfast.kernels.attention import HEAD_DIMS, supports_head_dim

    if not supports_head_dim(hidden // heads):
        return (f"head size {hidden // heads} (hidden_size {hidden} / {heads} heads) is not supported by the "
                f"attention kernel (head sizes {', '.join(map(str, HEAD_DIMS))})")
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype_name(dtype)} is not supported by the kernels"
    return None


def resolve_for(name: str, device: torch.device, config, dtype: torch.dtype) -> str:
    """``resolve`` for a model: ``"auto"`` also takes the torch path when the kernels cannot run
    this config / dtype (``kernel_unsupported``); an explicit ``"triton"`` refuses it by name."""
    choice = resolve(name, device)
    if choice == "triton":
        why = kernel_unsupported(config, dtype)
        if why is not None:
            if name == "triton":
                raise ValueError(f"backend='triton': {why}")
            return "torch"
    return choice
