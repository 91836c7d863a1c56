"""Extractive question answering helpers: the best answer span from start/end logits, the text
of a token span, and getting a ``tokenizers.Tokenizer`` from what a user holds."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F


def qa_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
            end_positions: torch.Tensor, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Extractive QA loss, transformers' rule: the mean of the start and end cross-entropies over
    the S positions of each row, positions clamped to [0, S] and S ignored (a position outside
    the sequence plays no part).

    ``padding`` (bool (B, S), True at padded tokens; ``unpad="always"``'s masked semantics): the
    softmax covers the real tokens only, and a start / end position on a padded token is ignored,
    as a position outside the sequence is (as per-token labels on padding are ignored by the
    token heads).  A row whose position is ignored adds nothing to that term; when every row's
    is, the term is NaN, as transformers' is for positions all outside the sequence."""
    S = start_logits.shape[1]
    starts = start_positions.reshape(-1).clamp(0, S)
    ends = end_positions.reshape(-1).clamp(0, S)
    if padding is not None:
        pad = padding.reshape(start_logits.shape)
        start_logits = start_logits.masked_fill(pad, torch.finfo(start_logits.dtype).min)
        end_logits = end_logits.masked_fill(pad, torch.finfo(end_logits.dtype).min)
        starts, ends = _ignore_padded(starts, pad, S), _ignore_padded(ends, pad, S)
    return (F.cross_entropy(start_logits, starts, ignore_index=S)
            + F.cross_entropy(end_logits, ends, ignore_index=S)) / 2


def _ignore_padded(positions: torch.Tensor, pad: torch.Tensor, S: int) -> torch.Tensor:
    """(B,) positions in [0, S] -> S (ignored) where the position is a padded token of its row."""
    if positions.shape[0] != pad.shape[0]:
        return positions  # transformers' cross_entropy names the mismatch
    on_pad = pad.gather(1, positions.clamp(max=S - 1).to(pad.device)[:, None])[:, 0] & (positions < S)
    return positions.masked_fill(on_pad.to(positions.device), S)


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, max_answer_len: int = 30,
              mask: Optional[torch.Tensor] = None):
    """Highest ``start_logits[i] + end_logits[j]`` with ``i <= j < i + max_answer_len`` and both
    i and j allowed by ``mask`` (bool, e.g. the context tokens).

    (S,) logits -> (start, end, score); (B, S) logits -> a list of those, one per row.
    Raises ValueError when no span is allowed."""
    if start_logits.shape != end_logits.shape or start_logits.dim() not in (1, 2):
        raise ValueError(
            f"best_span: start_logits {tuple(start_logits.shape)} and end_logits {tuple(end_logits.shape)} "
            "must both be (S,) or (B, S)"
        )
    if max_answer_len < 1:
        raise ValueError(f"best_span: max_answer_len must be >= 1, got {max_answer_len}")
    single = start_logits.dim() == 1
    s = start_logits.detach().float().reshape(-1, start_logits.shape[-1])  # (B, S); B = 1 for one row
    e = end_logits.detach().float().reshape(s.shape)
    B, S = s.shape
    scores = s[:, :, None] + e[:, None, :]  # (B, S_start, S_end)
    idx = torch.arange(S, device=s.device)
    length = idx[None, :] - idx[:, None]  # (S, S): end - start
    valid = ((length >= 0) & (length < max_answer_len))[None]  # (1, S, S)
    if mask is not None:
        if mask.numel() != B * S:
            raise ValueError(f"best_span: mask has shape {tuple(mask.shape)}; expected that of the logits")
        m = mask.to(device=s.device, dtype=torch.bool).reshape(B, S)
        valid = valid & m[:, :, None] & m[:, None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    best, flat = scores.reshape(B, S * S).max(dim=-1)
    res = []
    for b in range(B):
        if best[b] == float("-inf"):
            raise ValueError("best_span: no allowed span (the mask allows no position)")
        i = int(flat[b])
        res.append((i // S, i % S, float(best[b])))
    return res[0] if single else res


def span_text(text: str, offsets, start: int, end: int) -> str:
    """The characters of ``text`` covered by tokens start..end (inclusive), given the tokenizer's
    (char_start, char_end) offsets of each token."""
    return text[offsets[start][0]: offsets[end][1]]


def as_tokenizer(obj):
    """A ``tokenizers.Tokenizer`` from a Tokenizer, a tokenizer.json path (or its directory), or
    an object holding one in a ``tokenizer`` / ``_tokenizer`` attribute."""
    from tokenizers import Tokenizer

    seen = 0
    while not isinstance(obj, Tokenizer) and seen < 3:
        if isinstance(obj, (str, Path)):
            p = Path(obj)
            if p.is_dir():
                p = p / "tokenizer.json"
            return Tokenizer.from_file(str(p))
        inner = getattr(obj, "tokenizer", None) or getattr(obj, "_tokenizer", None)
        if inner is None:
            break
        obj = inner
        seen += 1
    if not isinstance(obj, Tokenizer):
        raise TypeError(
            f"expected a tokenizers.Tokenizer, a tokenizer.json path or an object with a .tokenizer, "
            f"got {type(obj).__name__}"
        )
    return obj
