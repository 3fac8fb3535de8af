"""GRPO's pieces as pure functions: group-normalised advantages and the clipped policy-gradient loss.

Definitions follow TRL's GRPOTrainer (the tests compare against it): a completion's reward is the weighted sum
of its reward functions' values (NaN where none scored it); its advantage is its reward minus its group's mean,
divided by the group's (``scale = "group"``) or the batch's (``"batch"``) sample standard deviation plus 1e-4, or
not divided (``"none"``); unscored completions get advantage 0. Per token,
``loss = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3``, ``ratio =
exp(logp - logp_rollout)``, ``k3 = exp(ref - logp) - (ref - logp) - 1``. The loss types differ only in how
the token losses are averaged (:func:`grpo_loss_sum` / :func:`grpo_normalizer`): ``grpo`` a mean per sequence,
then over sequences; ``dr_grpo`` a sum over the batch divided by sequences x ``max_new_tokens``; ``dapo`` a mean
over every completion token of the batch.
"""

from __future__ import annotations

import attrs
import torch

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def nan_std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected) ignoring NaNs; NaN with fewer than two values."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` advantages of ``rewards [n]`` (groups of ``group_size`` consecutive completions of one prompt; NaN:
    unscored). ``batch_std``: for ``scale="batch"`` under data parallelism, the std over every rank's rewards
    (default: of ``rewards``). A group whose rewards are all equal gets advantage 0, never NaN."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (nan_std(groups, dim=1).repeat_interleave(group_size) + 1e-4)
    elif scale == "batch":
        advantages = advantages / ((nan_std(rewards) if batch_std is None else batch_std) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@attrs.frozen
class TokenLoss:
    """Per-token GRPO losses ``[rows, T]`` and what a step logs about them (masked sums over tokens)."""

    losses: torch.Tensor
    clipped: torch.Tensor
    """``[rows, T]`` bool: the ratio left the clip range on the side where clipping binds."""
    kl: torch.Tensor | None


def grpo_token_loss(logps: torch.Tensor, rollout_logps: torch.Tensor, advantages: torch.Tensor, *,
                    epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                    ref_logps: torch.Tensor | None = None) -> TokenLoss:
    """The clipped surrogate per token (plus ``beta`` times the k3 KL estimate to ``ref_logps``).

    ``logps``, ``rollout_logps``, ``ref_logps``: ``[rows, T]`` log-probs of the completion tokens under the policy
    being trained, the policy that sampled them, and the reference; ``advantages``: ``[rows]``.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - rollout_logps)
    adv = advantages[:, None]
    losses = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + high) * adv)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_token_loss: beta > 0 needs ref_logps")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + beta * kl
    return TokenLoss(losses, clipped, kl)


def grpo_loss_sum(kind: str, token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The numerator of the ``kind`` loss over these rows: per-sequence token means summed (``grpo``), or the
    masked token losses summed (``dr_grpo``, ``dapo``). Divide the sum over all micro-batches and ranks by
    :func:`grpo_normalizer`."""
    masked = (token_losses * mask).sum(-1)
    if kind == "grpo":
        return (masked / mask.sum(-1).clamp(min=1)).sum()
    if kind in ("dr_grpo", "dapo"):
        return masked.sum()
    raise ValueError(f"loss.type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {kind!r}")


def grpo_normalizer(kind: str, sequences: int, tokens: int, max_new_tokens: int) -> float:
    """The denominator of the ``kind`` loss for a batch of ``sequences`` completions holding ``tokens`` scored
    completion tokens (over all ranks): sequences (``grpo``), sequences x ``max_new_tokens`` (``dr_grpo``),
    tokens (``dapo``)."""
    if kind == "grpo":
        return float(max(sequences, 1))
    if kind == "dr_grpo":
        return float(max(sequences, 1) * max_new_tokens)
    if kind == "dapo":
        return float(max(tokens, 1))
    raise ValueError(f"loss.type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {kind!r}")
