"""Perplexity of token sequences with sliding windows: the one computation ``run eval`` and ``run quantize`` report.

Token level: every token of a document but the first is predicted exactly once, and the
perplexity is ``exp(total negative log-likelihood / number of predicted tokens)`` over all
documents together (token-weighted, not a mean of per-document perplexities).

Windows: a document longer than ``max_length`` tokens is read in windows of up to ``max_length``
tokens whose starts are ``stride`` tokens apart (``0 < stride < max_length``). A window predicts
only the tokens the previous window did not reach, so each of those has at least
``max_length - stride`` tokens of context (all earlier tokens in the first window). A smaller
stride gives more context per token at more compute; ``stride = max_length - 1`` gives
consecutive windows that share one token.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ._data import IGNORE_INDEX
from ._loss import token_loss_sum
from ._model import Model


def perplexity_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """``(tokens, targets)`` windows scoring every token of ``ids`` but the first exactly once.

    Windows of up to ``max_length`` tokens start ``stride`` apart; each scores the tokens the
    previous one did not reach. ``targets[k]`` is the id that position ``k`` predicts, or -100 (not scored).
    """
    windows, scored_to = [], 1
    for begin in range(0, max(len(ids) - 1, 0), stride):
        end = min(begin + max_length, len(ids))
        tokens = ids[begin:end]
        targets = [ids[j] if scored_to <= j < end else IGNORE_INDEX for j in range(begin + 1, end)] + [IGNORE_INDEX]
        windows.append((tokens, targets))
        scored_to = end
        if end == len(ids):
            break
    return windows


@torch.no_grad()
def perplexity(model: Model, documents: list[list[int]], *, max_length: int, stride: int | None = None,
               batch_size: int = 8) -> dict[str, Any]:
    """Token-weighted perplexity of tokenized ``documents`` (windows: see the module docstring).

    Args:
        model: any model (base, adapted, merged, quantized).
        documents: token ids per document (with BOS if the tokenizer adds one).
        max_length: tokens per window (at most the model's context).
        stride: tokens between window starts, in ``[1, max_length - 1]``; None: ``max_length // 2``.
        batch_size: windows per forward (right-padded).

    Returns:
        ``perplexity``, ``nll_per_token`` (nats), ``tokens`` (predicted), ``documents``, ``windows``,
        ``max_length``, ``stride`` and ``seconds``.
    """
    stride = max(max_length // 2, 1) if stride is None else stride
    if not 0 < stride < max_length:  # windows must overlap: a window's first token is only context
        raise ValueError(f"stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    windows = [w for ids in documents for w in perplexity_windows(ids, max_length, stride)]
    total, count, start = 0.0, 0, time.perf_counter()
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        width = max(len(t) for t, _ in chunk)
        tokens = torch.tensor([t + [0] * (width - len(t)) for t, _ in chunk], device=model.device)
        targets = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for _, y in chunk], device=model.device)
        total += token_loss_sum(model, tokens, targets, training=False).item()
        count += int((targets != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("no tokens to score: every document has fewer than 2 tokens")
    return {"perplexity": math.exp(total / count), "nll_per_token": total / count, "tokens": count,
            "documents": len(documents), "windows": len(windows), "max_length": max_length, "stride": stride,
            "seconds": round(time.perf_counter() - start, 3)}
