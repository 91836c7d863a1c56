"""Pooling helpers that turn BERT hidden states into fixed-size vectors.

* :func:`mean_pool` -- masked mean over the sequence (sentence-transformers' "mean tokens" pooling).
* :class:`ScalarMix` -- ELMo-style learned mix of every layer's hidden states:
  ``h = gamma * sum_k softmax(s)_k * h_k``.

Both run in plain PyTorch on any device and accumulate in fp32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["mean_pool", "ScalarMix"]

# Smallest token count a row is divided by: a fully padded row sums to 0 and gives 0 / eps = 0.
_MIN_COUNT = 1e-9


def _check_mask(fn: str, hidden: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != hidden.dim() - 1 or tuple(mask.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{fn}: attention_mask has shape {tuple(mask.shape)}; expected {tuple(hidden.shape[:-1])} "
            f"to match hidden of shape {tuple(hidden.shape)}"
        )
    if mask.device != hidden.device:
        raise ValueError(f"{fn}: attention_mask is on {mask.device} but hidden is on {hidden.device}")


def mean_pool(
    hidden: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    *,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Masked mean of ``hidden`` (batch, seq, hidden) over the sequence.

    ``attention_mask`` (batch, seq) holds 1 / True for real tokens and 0 / False for padding (any
    integer, bool or float dtype; float values act as weights).  ``None`` averages every position.
    Sums and counts are accumulated in fp32; a row with no real token gives zeros, not NaN.

    Returns (batch, hidden) in ``dtype`` (default: ``hidden.dtype``).
    """
    if hidden.dim() != 3:
        raise ValueError(f"mean_pool: hidden must be (batch, seq, hidden), got shape {tuple(hidden.shape)}")
    out_dtype = hidden.dtype if dtype is None else dtype
    h = hidden.float()
    if attention_mask is None:
        return h.mean(dim=1).to(out_dtype)
    _check_mask("mean_pool", hidden, attention_mask)
    m = attention_mask.to(torch.float32)
    # elementwise product + sum rather than a matmul: exact fp32 even where TF32 matmuls are enabled
    summed = (h * m.unsqueeze(-1)).sum(dim=1)
    count = m.sum(dim=1, keepdim=True).clamp(min=_MIN_COUNT)
    return (summed / count).to(out_dtype)


TensorsArg = Union[Sequence[torch.Tensor], torch.Tensor]


class ScalarMix(nn.Module):
    """Learned weighted sum of ``num_layers`` tensors of one shape (ELMo, Peters et al. 2018)::

        h = gamma * (w_1 * h_1 + ... + w_L * h_L),   w = softmax(scalar_parameters)

    Typical use with ``output_hidden_states=True`` (embeddings + every layer)::

        out = model(ids, attention_mask=mask, output_hidden_states=True)
        mix = ScalarMix(len(out.hidden_states))
        h = mix(out.hidden_states, mask)

    Args:
        num_layers: how many tensors are mixed (``config.num_hidden_layers + 1`` for BERT's
            ``hidden_states``, which include the embedding output).
        do_layer_norm: normalise each tensor before mixing, over the last dimension and every
            unmasked position of each batch element (mean and variance over tokens x hidden units,
            per layer and per batch element), so padding does not move the statistics.
        initial_scalar_parameters: ``num_layers`` floats (the logits before the softmax); default
            all zeros, i.e. a plain average.
        trainable: when False the scalars and gamma are frozen (``requires_grad=False``).

    ``forward(tensors, mask=None)``: ``tensors`` is a sequence of ``num_layers`` tensors of one
    shape (batch, ..., hidden), or one tensor stacked on dim 0.  ``mask`` (batch, ...) is needed
    only for ``do_layer_norm``-ing padded batches.  Returns a tensor of the inputs' shape and
    dtype; the mix itself is accumulated in fp32.
    """

    def __init__(
        self,
        num_layers: int,
        do_layer_norm: bool = False,
        initial_scalar_parameters: Optional[Sequence[float]] = None,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"ScalarMix: num_layers must be a positive int, got {num_layers!r}")
        if initial_scalar_parameters is None:
            init = [0.0] * num_layers
        else:
            init = [float(x) for x in initial_scalar_parameters]
            if len(init) != num_layers:
                raise ValueError(
                    f"ScalarMix: initial_scalar_parameters has {len(init)} values; expected num_layers={num_layers}"
                )
        self.num_layers = num_layers
        self.do_layer_norm = bool(do_layer_norm)
        self.scalar_parameters = nn.Parameter(torch.tensor(init, dtype=torch.float32), requires_grad=trainable)
        self.gamma = nn.Parameter(torch.tensor([1.0], dtype=torch.float32), requires_grad=trainable)
        self.eps = 1e-12

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, do_layer_norm={self.do_layer_norm}"

    def normalized_weights(self) -> torch.Tensor:
        """The softmax-normalised layer weights (num_layers,), fp32, differentiable."""
        return torch.softmax(self.scalar_parameters.float(), dim=0)

    def _layer_norm(self, t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        # statistics over every dim but the batch dim, weighted by the mask
        b = t.shape[0]
        flat = t.reshape(b, -1)
        if mask is None:
            mean = flat.mean(dim=1)
            var = flat.var(dim=1, unbiased=False)
        else:
            w = mask.to(torch.float32).unsqueeze(-1).expand_as(t).reshape(b, -1)
            n = w.sum(dim=1).clamp(min=1.0)
            mean = (flat * w).sum(dim=1) / n
            var = (((flat - mean[:, None]) ** 2) * w).sum(dim=1) / n
        shape = (b,) + (1,) * (t.dim() - 1)
        return (t - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)

    def forward(self, tensors: TensorsArg, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(tensors, torch.Tensor):
            tensors = list(tensors.unbind(0))
        else:
            tensors = list(tensors)
        if len(tensors) != self.num_layers:
            raise ValueError(
                f"ScalarMix: got {len(tensors)} tensors; expected num_layers={self.num_layers} "
                "(BERT's hidden_states hold num_hidden_layers + 1 tensors, the embeddings included)"
            )
        ref = tensors[0]
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"ScalarMix: tensors[{i}] is a {type(t).__name__}, not a Tensor")
            if t.shape != ref.shape:
                raise ValueError(
                    f"ScalarMix: tensors[{i}] has shape {tuple(t.shape)}; expected {tuple(ref.shape)} like tensors[0]"
                )
            if t.device != ref.device:
                raise ValueError(f"ScalarMix: tensors[{i}] is on {t.device}; expected {ref.device} like tensors[0]")
        if self.do_layer_norm and mask is not None:
            if ref.dim() < 2:
                raise ValueError("ScalarMix: a mask needs tensors of shape (batch, ..., hidden)")
            _check_mask("ScalarMix", ref, mask)

        weights = self.normalized_weights().to(ref.device)
        out = None
        for k, t in enumerate(tensors):
            x = t.float()
            if self.do_layer_norm:
                x = self._layer_norm(x, mask)
            term = weights[k] * x
            out = term if out is None else out + term
        out = self.gamma.float().to(ref.device) * out
        return out.to(ref.dtype)
