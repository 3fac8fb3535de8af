"""Preference-tuning losses: pure functions of per-sequence log-probabilities.

Every input is an fp32 tensor of shape ``[pairs]`` (paired losses) or ``[samples]`` (KTO): the log-probability
of each response given its prompt, either summed over the response tokens or averaged per response token, as
:func:`uses_average_logps` says for the loss type (the choice TRL 1.16 makes for the same loss). Losses come
back per pair (or sample); the training loss is their mean. Rewards are detached and only for logging.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from ._config import ConfigError

# loss.type -> (log-probs averaged per response token, needs a reference model)
_LOSS_INPUTS = {
    "dpo": (False, True),
    "ipo": (True, True),  # TRL divides the summed log-ratios by the completion lengths
    "hinge": (False, True),
    "robust": (False, True),
    "simpo": (True, False),
    "orpo": (True, False),
    "kto": (False, True),
}
LOSS_TYPES = tuple(_LOSS_INPUTS)
_DPO_KINDS = ("dpo", "ipo", "hinge", "robust")


@attrs.frozen(eq=False)
class PreferenceLoss:
    """What a preference loss returns.

    Attributes:
        losses: ``[pairs]`` (or ``[samples]`` for KTO) fp32 per-pair loss; the training loss is ``losses.mean()``.
        chosen_rewards: detached implicit rewards of the chosen (KTO: desirable) responses.
        rejected_rewards: the same for the rejected (KTO: undesirable) responses.
        paired: whether ``chosen_rewards[i]`` and ``rejected_rewards[i]`` belong to one prompt (False for KTO,
            whose two reward tensors have their own lengths, either possibly empty).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    paired: bool = True


def _loss_inputs(kind: str) -> tuple[bool, bool]:
    if kind not in _LOSS_INPUTS:
        raise ConfigError(f"loss.type {kind!r} is not one of {', '.join(LOSS_TYPES)}", key="loss.type")
    return _LOSS_INPUTS[kind]


def uses_average_logps(kind: str) -> bool:
    """True when loss ``kind`` takes log-probs averaged per response token, False when summed over them."""
    return _loss_inputs(kind)[0]


def needs_reference(kind: str) -> bool:
    """True when loss ``kind`` takes reference-model log-probs (False: SimPO and ORPO are reference-free)."""
    return _loss_inputs(kind)[1]


def _check_positive(value: float, key: str) -> None:
    if not value > 0:
        raise ConfigError(f"{key} should be > 0, got {value!r}", key=key)


def _check_smoothing(label_smoothing: float, upper: float, closed: bool) -> None:
    ok = 0 <= label_smoothing <= upper if closed else 0 <= label_smoothing < upper
    if not ok:
        bound = f"[0, {upper}]" if closed else f"[0, {upper})"
        raise ConfigError(f"loss.label_smoothing should lie in {bound}, got {label_smoothing!r}",
                          key="loss.label_smoothing")


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - e) log sigmoid(x) - e log sigmoid(-x)``: the logistic loss with a label flipped with probability e."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    kind: str = "dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """A loss on the policy's log-ratio margin over a reference: ``h = (pc - rc) - (pr - rr)``, per pair.

    ``kind``:
        - ``dpo``: ``-log sigmoid(beta h)``; with ``label_smoothing`` e > 0 conservative DPO,
          ``-(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)``.
        - ``ipo``: ``(h - 1 / (2 beta))^2`` (beta is the paper's tau).
        - ``hinge``: ``max(0, 1 - beta h)``.
        - ``robust``: robust DPO, the unbiased loss under labels flipped with probability e (in [0, 0.5)):
          ``(-(1-e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``[pairs]`` fp32 log-probs of the responses
            under the policy and the reference: summed over response tokens, except for ``ipo``, which takes
            them averaged per response token (TRL's IPO divides the summed log-ratios by the response lengths).

    Returns:
        per-pair losses and rewards ``beta * (policy - ref)`` on the inputs as given (for ``ipo`` on the
        per-token averages; TRL logs IPO's rewards on the sums).
    """
    if kind not in _DPO_KINDS:
        _loss_inputs(kind)  # an unknown type: the error lists them all
        raise ConfigError(f"loss.type {kind!r} has its own function ({kind}_loss), not dpo_loss", key="loss.type")
    _check_positive(beta, "loss.beta")
    if kind == "robust":
        _check_smoothing(label_smoothing, 0.5, closed=False)
    elif kind == "dpo":
        _check_smoothing(label_smoothing, 0.5, closed=True)
    elif label_smoothing != 0:
        raise ConfigError(f"loss.label_smoothing applies to dpo and robust only, not {kind}",
                          key="loss.label_smoothing")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if kind == "dpo":
        losses = _smoothed_logistic(beta * margin, label_smoothing)
    elif kind == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        e = label_smoothing
        losses = (-(1 - e) * F.logsigmoid(beta * margin) + e * F.logsigmoid(-beta * margin)) / (1 - 2 * e)
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO: reference-free ``-log sigmoid(beta (pc - pr) - gamma)`` per pair (``label_smoothing`` e as in
    conservative DPO). Not CPO: no NLL term.

    Args:
        policy_chosen, policy_rejected: ``[pairs]`` fp32 log-probs averaged per response token.
        beta: reward scale; gamma: target reward margin (in reward units, as the paper's gamma).

    Returns:
        per-pair losses; rewards ``beta * policy`` (what TRL's CPOTrainer logs for SimPO).
    """
    _check_positive(beta, "loss.beta")
    _check_smoothing(label_smoothing, 0.5, closed=True)
    losses = _smoothed_logistic(beta * (policy_chosen - policy_rejected) - gamma, label_smoothing)
    return PreferenceLoss(losses, beta * policy_chosen.detach(), beta * policy_rejected.detach())


_MINUS_LN2 = -math.log(2)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` without cancellation (expm1 near 0, log1p far from it)."""
    # the log1p branch sees only its own inputs: near 0, exp(x) rounds to 1 and log1p(-1) = -inf, whose gradient,
    # though not selected, would turn the where's gradient into nan
    return torch.where(x > _MINUS_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x.clamp(max=_MINUS_LN2))))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    lam: float,
) -> PreferenceLoss:
    """ORPO: ``chosen_nll - lam * log sigmoid(log odds(pc) - log odds(pr))``, ``odds(p) = p / (1 - p)``.

    Args:
        policy_chosen, policy_rejected: ``[pairs]`` fp32 log-probs averaged per response token (< 0).
        chosen_nll: the SFT term: mean NLL per token of the chosen responses, a scalar (the mean over the
            batch's chosen tokens, as TRL computes it) or ``[pairs]``.
        lam: weight of the odds-ratio term (TRL's ORPOConfig ``beta``).

    Returns:
        per-pair losses (their mean is TRL's ORPO loss when ``chosen_nll`` is that scalar); rewards
        ``lam * policy`` (what TRL's ORPOTrainer logs).
    """
    _check_positive(lam, "loss.lambda")
    log_odds = (policy_chosen - policy_rejected) - (_log1mexp(policy_chosen) - _log1mexp(policy_rejected))
    losses = chosen_nll - lam * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, lam * policy_chosen.detach(), lam * policy_rejected.detach())


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's batch KL estimate ``z0 = max(0, mean(policy_kl_logps - ref_kl_logps))`` (0-d, detached): the mean is
    taken before the clamp, as TRL does.

    ``policy_kl_logps``, ``ref_kl_logps``: ``[kl_samples]`` summed log-probs of mismatched prompt/completion pairs
    (each prompt with another sample's completion). Under data parallelism take the mean over every rank's pairs
    (TRL: the mean of the per-process means, equal counts per process) and clamp it the same way.
    """
    return (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO on unpaired samples, with ``r = policy - ref`` and the batch KL estimate ``z0`` (:func:`kto_kl`):
    desirable ``w_d (1 - sigmoid(beta (r - z0)))``, undesirable ``w_u (1 - sigmoid(beta (z0 - r)))``.

    Args:
        policy_logps, ref_logps: ``[samples]`` fp32 log-probs of each completion, summed over its tokens.
        desirable: ``[samples]`` bool, True for a desirable completion (all True or all False is fine).
        kl: ``z0``, a 0-d tensor (no gradient flows into it).

    Returns:
        per-sample losses in input order (their mean is TRL's loss); rewards ``beta * r`` of the desirable
        samples (``chosen_rewards``) and of the undesirable ones (``rejected_rewards``), either possibly empty.
    """
    _check_positive(beta, "loss.beta")
    _check_positive(desirable_weight, "loss.desirable_weight")
    _check_positive(undesirable_weight, "loss.undesirable_weight")
    desirable = desirable.bool()  # a 0/1 label column works too; an integer index tensor must not
    z0 = kl.detach()
    ratio = policy_logps - ref_logps
    # 1 - sigmoid(x) written as sigmoid(-x): exact where 1 - sigmoid(x) would cancel
    losses = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (z0 - ratio)),
                         undesirable_weight * torch.sigmoid(beta * (ratio - z0)))
    rewards = beta * ratio.detach()
    return PreferenceLoss(losses, rewards[desirable], rewards[~desirable], paired=False)


def reward_metrics(result: PreferenceLoss) -> dict[str, float]:
    """``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy`` (batch means).

    For KTO (unpaired) the margin is the difference of the two means, and a key is left out when its samples are
    missing from the batch (no accuracy at all: it needs pairs), as TRL's KTOTrainer logs them.
    """
    chosen, rejected = result.chosen_rewards.float(), result.rejected_rewards.float()
    metrics = {"loss": result.losses.detach().mean().item()}
    if len(chosen):
        metrics["rewards/chosen"] = chosen.mean().item()
    if len(rejected):
        metrics["rewards/rejected"] = rejected.mean().item()
    if result.paired:
        metrics["rewards/margin"] = (chosen - rejected).mean().item()
        metrics["rewards/accuracy"] = (chosen > rejected).float().mean().item()
    elif len(chosen) and len(rejected):
        metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
