"""Preference losses against TRL 1.16's own loss code on the same log-probs: per-pair losses, rewards, gradients.

TRL computes the DPO and KTO losses inside ``_compute_loss`` methods that also run the model. Those methods are
called here on a stand-in ``self`` (the few attributes they read) and a stand-in model whose per-token log-probs
sum to the given per-sequence values; with ``precompute_ref_logps`` the reference log-probs come from the batch.
CPO/SimPO and ORPO have loss methods of their own, called directly on a stand-in ``self``.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _oracle import optional_oracle

from ftprog.core import (
    LOSS_TYPES, ConfigError, PreferenceLoss, dpo_loss, kto_kl, kto_loss, needs_reference, orpo_loss, reward_metrics,
    simpo_loss, uses_average_logps,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}
PAIRS = 6


def trl(module="trl"):
    return optional_oracle(module, "pip install -e '.[test]'")


def random_logps(seed, n=PAIRS, low=5.0, high=60.0):
    """``n`` fp32 summed log-probs in ``[-high, -low]`` (policy leaves requiring grad) and a reference near them."""
    g = torch.Generator().manual_seed(seed)
    policy = -(low + (high - low) * torch.rand(n, generator=g))
    ref = policy + 2.0 * torch.randn(n, generator=g)
    return policy.requires_grad_(), ref


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


class LogpsModel:
    """Stands in for TRL's model call: ``input_ids`` of width ``w`` carry in column 0 a row number into
    ``tables[w]``; the per-token log-probs it returns hold that row's value in position 0 and zeros after, so
    TRL's sum over tokens gives the value exactly (and the gradient flows back to it)."""

    training = True

    def __init__(self, tables):
        self.tables = tables

    def __call__(self, input_ids, **_):
        width = input_ids.shape[1]
        per_token = F.pad(self.tables[width][input_ids[:, 0]][:, None], (0, width - 2))
        zeros = torch.zeros_like(per_token.detach())
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def stand_in(model=None, **attributes):
    """The attributes TRL's loss code reads from its trainer, on one process (gathers are identities)."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, precompute_ref_logps=True,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           **attributes)


def row_ids(rows, width):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    ids[:, 0] = torch.as_tensor(rows)
    return ids


def trl_dpo(kind, beta, label_smoothing, pc, pr, rc, rr, lengths, pairs):
    """TRL's DPOTrainer._compute_loss on pairs ``pairs`` (row numbers): the mean loss and the logged metrics.
    ``lengths`` ``[2 * PAIRS]``: response lengths (chosen rows, then rejected), which only IPO reads."""
    trainer = trl().DPOTrainer
    width = int(lengths.max()) + 1
    model = LogpsModel({width: torch.cat([pc, pr])})
    self = stand_in(model, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[kind], loss_weights=[1.0],
                    beta=beta, label_smoothing=label_smoothing, use_weighting=False)
    rows = list(pairs) + [PAIRS + i for i in pairs]
    completion_mask = (torch.arange(width)[None, :] < lengths[rows][:, None]).long()
    inputs = {"input_ids": row_ids(rows, width), "attention_mask": torch.ones(len(rows), width, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc[list(pairs)],
              "ref_rejected_logps": rr[list(pairs)]}
    loss = trainer._compute_loss(self, model, inputs, return_outputs=False)
    return loss, self._metrics["train"]


def lengths_for(seed):
    return torch.randint(3, 40, (2 * PAIRS,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,beta,label_smoothing", [
    ("dpo", 0.1, 0.0), ("dpo", 0.5, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0),
    ("hinge", 0.5, 0.0), ("robust", 0.1, 0.0), ("robust", 0.1, 0.1), ("robust", 0.5, 0.3),
])
def test_dpo_kinds_match_trl(kind, beta, label_smoothing):
    """Per-pair losses, rewards and the gradient of the mean loss equal TRL's DPOTrainer for the same type."""
    pc, rc = random_logps(1)
    pr, rr = random_logps(2)
    lengths = lengths_for(3)
    # IPO takes per-token averages; TRL takes the sums and the lengths and divides. Same leaves on both sides.
    scale = 1 / lengths.float() if uses_average_logps(kind) else torch.ones(2 * PAIRS)
    ours = dpo_loss(pc * scale[:PAIRS], pr * scale[PAIRS:], rc * scale[:PAIRS], rr * scale[PAIRS:], kind=kind,
                    beta=beta, label_smoothing=label_smoothing)
    trl_kind = "sigmoid" if kind == "dpo" else kind
    # TRL logs rewards on the summed log-probs even for IPO: ours, on the averages, times the length. That round
    # trip through fp32 averages of log-probs near -60 costs a few ulps of 60 (4e-6 each) in the log-ratio.
    reward_tol = {"rtol": 1e-5, "atol": 1e-5} if uses_average_logps(kind) else TOL
    for i in range(PAIRS):
        loss, metrics = trl_dpo(trl_kind, beta, label_smoothing, pc, pr, rc, rr, lengths, [i])
        torch.testing.assert_close(ours.losses[i], loss.detach(), **TOL)
        torch.testing.assert_close(ours.chosen_rewards[i].item() / scale[i].item(), metrics["rewards/chosen"][0],
                                   **reward_tol)
        torch.testing.assert_close(ours.rejected_rewards[i].item() / scale[PAIRS + i].item(),
                                   metrics["rewards/rejected"][0], **reward_tol)
    loss, metrics = trl_dpo(trl_kind, beta, label_smoothing, pc, pr, rc, rr, lengths, range(PAIRS))
    torch.testing.assert_close(ours.losses.mean(), loss.detach(), **TOL)
    for ours_grad, trl_grad in zip(grads(ours.losses.mean(), [pc, pr]), grads(loss, [pc, pr]), strict=True):
        torch.testing.assert_close(ours_grad, trl_grad, **TOL)
    assert not ours.chosen_rewards.requires_grad and not ours.rejected_rewards.requires_grad


def trl_cpo_loss(loss_type, beta, label_smoothing, chosen, rejected, gamma=0.0):
    """TRL's CPOTrainer.cpo_loss (alpha 0: plain log-prob rewards): per-pair losses and rewards."""
    self = stand_in(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma, alpha=0.0)
    return trl("trl.experimental.cpo").CPOTrainer.cpo_loss(self, chosen, rejected)


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.1), (0.5, 0.25), (0.1, 0.5)])
def test_conservative_dpo_matches_trl(beta, label_smoothing):
    """DPO with label smoothing (conservative DPO). TRL 1.16's DPOTrainer "sigmoid" ignores label_smoothing, so the
    oracle is TRL's CPOTrainer "sigmoid" loss, the same smoothed logistic loss on ``chosen - rejected``, fed the
    log-ratios; the rewards are checked against ``beta * (policy - ref)`` written out."""
    pc, rc = random_logps(4)
    pr, rr = random_logps(5)
    ours = dpo_loss(pc, pr, rc, rr, kind="dpo", beta=beta, label_smoothing=label_smoothing)
    losses, _, _ = trl_cpo_loss("sigmoid", beta, label_smoothing, pc - rc, pr - rr)
    torch.testing.assert_close(ours.losses, losses, **TOL)
    for ours_grad, trl_grad in zip(grads(ours.losses.mean(), [pc, pr]), grads(losses.mean(), [pc, pr]), strict=True):
        torch.testing.assert_close(ours_grad, trl_grad, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, beta * (pc - rc).detach(), **TOL)
    torch.testing.assert_close(ours.rejected_rewards, beta * (pr - rr).detach(), **TOL)


def random_average_logps(seed):
    """Per-token average log-probs in ``[-3, -0.05]``, policy leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    return (-(0.05 + 2.95 * torch.rand(PAIRS, generator=g))).requires_grad_()


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (10.0, 3.0, 0.0),
                                                        (2.0, 1.0, 0.2)])
def test_simpo_matches_trl(beta, gamma, label_smoothing):
    """SimPO equals TRL's CPOTrainer loss_type="simpo" (with cpo_alpha 0, i.e. no NLL term): losses, rewards,
    gradients."""
    pc, pr = random_average_logps(6), random_average_logps(7)
    ours = simpo_loss(pc, pr, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    losses, chosen_rewards, rejected_rewards = trl_cpo_loss("simpo", beta, label_smoothing, pc, pr, gamma)
    torch.testing.assert_close(ours.losses, losses, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **TOL)
    for ours_grad, trl_grad in zip(grads(ours.losses.mean(), [pc, pr]), grads(losses.mean(), [pc, pr]), strict=True):
        torch.testing.assert_close(ours_grad, trl_grad, **TOL)


@pytest.mark.parametrize("lam", [0.1, 0.25, 1.0])
def test_orpo_matches_trl(lam):
    """ORPO equals TRL's ORPOTrainer: its odds_ratio_loss per pair, and its total ``nll - mean(beta * ratio)``."""
    pc, pr = random_average_logps(8), random_average_logps(9)
    pc.data[0] = -1e-3  # near log p = 0, where log(1 - p) needs expm1
    nll = torch.tensor(1.7, requires_grad=True)
    ours = orpo_loss(pc, pr, nll, lam=lam)
    self = stand_in(beta=lam)
    ratio_losses, chosen_rewards, rejected_rewards, _, _ = trl("trl.experimental.orpo").ORPOTrainer.odds_ratio_loss(
        self, pc, pr)
    torch.testing.assert_close(ours.losses, nll - ratio_losses, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **TOL)
    trl_loss = nll - ratio_losses.mean()  # get_batch_loss_metrics' total
    torch.testing.assert_close(ours.losses.mean(), trl_loss, **TOL)
    inputs = [pc, pr, nll]
    for ours_grad, trl_grad in zip(grads(ours.losses.mean(), inputs), grads(trl_loss, inputs), strict=True):
        torch.testing.assert_close(ours_grad, trl_grad, **TOL)


KL_SAMPLES = 5


def trl_kto(beta, desirable_weight, undesirable_weight, policy, ref, desirable, policy_kl, ref_kl, samples):
    """TRL's KTOTrainer._compute_loss on samples ``samples`` (row numbers) with the whole KL batch: the mean loss
    and the logged metrics. Its ``_compute_kl_logps`` (TRL's too) runs the KL rows through the stand-in model."""
    trainer = trl().KTOTrainer
    model = LogpsModel({2: policy, 3: policy_kl})  # width 2: the samples, width 3: the mismatched KL pairs
    self = stand_in(model, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight)
    self._compute_kl_logps = trainer._compute_kl_logps.__get__(self)
    rows = list(samples)
    ones = torch.ones(len(rows), 2, dtype=torch.long)
    kl_ones = torch.ones(KL_SAMPLES, 3, dtype=torch.long)
    batch = {"label": desirable[rows], "input_ids": row_ids(rows, 2), "attention_mask": ones,
             "completion_mask": ones, "ref_logps": ref[rows], "KL_input_ids": row_ids(range(KL_SAMPLES), 3),
             "KL_attention_mask": kl_ones, "KL_completion_mask": kl_ones, "ref_KL_logps": ref_kl}
    loss = trainer._compute_loss(self, model, batch, return_outputs=False)
    return loss, self._metrics["train"]


def kto_inputs(kl_mean, desirable):
    """Samples and a KL batch whose mean log-ratio is ``kl_mean``, some of its entries of the other sign."""
    policy, ref = random_logps(10, n=len(desirable))
    policy_kl, ref_kl = random_logps(11, n=KL_SAMPLES)
    offsets = torch.tensor([3.0, -2.0, 1.0, -1.5, 0.5])
    policy_kl = (ref_kl + offsets - offsets.mean() + kl_mean).detach()
    return policy, ref, torch.tensor(desirable), policy_kl, ref_kl


MIXED = [True, False, True, True, False, False, True]


@pytest.mark.parametrize("beta,desirable_weight,undesirable_weight,kl_mean", [
    (0.1, 1.0, 1.0, 0.7), (0.5, 1.33, 0.8, 0.7), (0.1, 1.0, 2.0, -0.4), (0.3, 1.0, 1.0, 0.0),
])
def test_kto_matches_trl(beta, desirable_weight, undesirable_weight, kl_mean):
    """Per-sample losses, rewards and the gradient of the mean loss equal TRL's KTOTrainer, the KL estimate z0 taken
    as TRL takes it (mean over the KL batch, then clamped at 0: kl_mean -0.4 clamps, its entries of both signs do
    not), with no gradient into it."""
    policy, ref, desirable, policy_kl, ref_kl = kto_inputs(kl_mean, MIXED)
    policy_kl.requires_grad_()
    ours = kto_loss(policy, ref, desirable, kto_kl(policy_kl, ref_kl), beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight)
    chosen_rewards, rejected_rewards = iter(ours.chosen_rewards), iter(ours.rejected_rewards)
    for i, is_desirable in enumerate(MIXED):
        loss, metrics = trl_kto(beta, desirable_weight, undesirable_weight, policy, ref, desirable, policy_kl,
                                ref_kl, [i])
        torch.testing.assert_close(ours.losses[i], loss.detach(), **TOL)
        key, ours_reward = ("rewards/chosen", chosen_rewards) if is_desirable else ("rewards/rejected",
                                                                                    rejected_rewards)
        torch.testing.assert_close(next(ours_reward).item(), metrics[key][0], **TOL)
    loss, metrics = trl_kto(beta, desirable_weight, undesirable_weight, policy, ref, desirable, policy_kl, ref_kl,
                            range(len(MIXED)))
    torch.testing.assert_close(ours.losses.mean(), loss.detach(), **TOL)
    assert metrics["kl"][0] == pytest.approx(max(kl_mean, 0.0), abs=1e-5)  # the inputs are as intended
    torch.testing.assert_close(grads(ours.losses.mean(), [policy])[0], grads(loss, [policy])[0], **TOL)
    assert torch.autograd.grad(ours.losses.mean(), policy_kl, allow_unused=True)[0] is None  # z0 is detached


@pytest.mark.parametrize("desirable", [[True] * 4, [False] * 4])
def test_kto_one_sided_batch_matches_trl(desirable):
    """A batch of only desirable (or only undesirable) samples: TRL's loss and gradient; the missing side's rewards
    are empty and its metrics left out."""
    policy, ref, labels, policy_kl, ref_kl = kto_inputs(0.7, desirable)
    ours = kto_loss(policy, ref, labels, kto_kl(policy_kl, ref_kl), beta=0.2, desirable_weight=1.2, undesirable_weight=0.9)
    loss, trl_metrics = trl_kto(0.2, 1.2, 0.9, policy, ref, labels, policy_kl, ref_kl, range(4))
    torch.testing.assert_close(ours.losses.mean(), loss.detach(), **TOL)
    torch.testing.assert_close(grads(ours.losses.mean(), [policy])[0], grads(loss, [policy])[0], **TOL)
    present, missing = ("chosen", "rejected") if desirable[0] else ("rejected", "chosen")
    assert len(getattr(ours, f"{missing}_rewards")) == 0 and len(getattr(ours, f"{present}_rewards")) == 4
    metrics = reward_metrics(ours)
    torch.testing.assert_close(metrics[f"rewards/{present}"], trl_metrics[f"rewards/{present}"][0], **TOL)
    assert f"rewards/{missing}" not in metrics and f"rewards/{missing}" not in trl_metrics
    assert "rewards/margin" not in metrics and "rewards/accuracy" not in metrics


def all_losses(chosen, rejected):
    """Every loss type on policy log-probs ``chosen``/``rejected`` (reference 0 where one is needed)."""
    zeros = torch.zeros_like(chosen)
    kto_policy = torch.cat([chosen, rejected])
    desirable = torch.tensor([True] * len(chosen) + [False] * len(rejected))
    return {
        **{kind: dpo_loss(chosen, rejected, zeros, zeros, kind=kind, beta=0.1,
                          label_smoothing=0.2 if kind in ("dpo", "robust") else 0.0)
           for kind in ("dpo", "ipo", "hinge", "robust")},
        "simpo": simpo_loss(chosen, rejected, beta=2.0, gamma=1.0, label_smoothing=0.1),
        "orpo": orpo_loss(chosen, rejected, torch.tensor(1.0), lam=0.1),
        "kto": kto_loss(kto_policy, torch.zeros_like(kto_policy), desirable, kto_kl(kto_policy.detach(),
                        torch.zeros_like(kto_policy)), beta=0.1),
    }


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_margins_stay_finite(sign):
    """Margins of +-1e4 (log-probs of -1e-3 against -1e4): every loss and its gradient finite; the logistic
    losses saturate to 0 or grow linearly instead of overflowing. ORPO's gradient stays finite as p -> 1."""
    chosen = torch.tensor([-1e-3, -1e4, -0.5]) if sign > 0 else torch.tensor([-1e4, -1e-3, -1e4])
    rejected = torch.tensor([-1e4, -1e-3, -1e4]) if sign > 0 else torch.tensor([-1e-3, -1e4, -0.5])
    chosen.requires_grad_()
    for kind, result in all_losses(chosen, rejected).items():
        assert torch.isfinite(result.losses).all(), kind
        assert torch.isfinite(grads(result.losses.mean(), [chosen])[0]).all(), kind
    near_certain = torch.tensor([-1e-8, -1e-4], requires_grad=True)  # ORPO's log(1 - p) as p -> 1
    orpo = orpo_loss(near_certain, torch.tensor([-2.0, -1e4]), torch.tensor(1.0), lam=0.1)
    assert torch.isfinite(grads(orpo.losses.mean(), [near_certain])[0]).all()
    dpo = dpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([sign * 1e4]))
    expected = 0.0 if sign > 0 else 1e3  # margin sign * 1e4, beta 0.1: -log sigmoid(-1e3) = 1e3
    torch.testing.assert_close(dpo.losses, torch.tensor([expected]), **TOL)


def test_logps_table_covers_every_loss_type():
    """Summed vs per-token-averaged log-probs and whether a reference is needed, as TRL 1.16 feeds each loss."""
    averaged = {kind for kind in LOSS_TYPES if uses_average_logps(kind)}
    reference = {kind for kind in LOSS_TYPES if needs_reference(kind)}
    assert set(LOSS_TYPES) == {"dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto"}
    assert averaged == {"ipo", "simpo", "orpo"}
    assert reference == {"dpo", "ipo", "hinge", "robust", "kto"}
    with pytest.raises(ConfigError, match="loss.type 'dop' is not one of dpo, ipo") as error:
        uses_average_logps("dop")
    assert error.value.key == "loss.type"


@pytest.mark.parametrize("call,key,message", [
    (lambda x: dpo_loss(x, x, x, x, kind="robust", label_smoothing=0.5), "loss.label_smoothing", r"\[0, 0.5\)"),
    (lambda x: dpo_loss(x, x, x, x, kind="dpo", label_smoothing=-0.1), "loss.label_smoothing", r"\[0, 0.5\]"),
    (lambda x: dpo_loss(x, x, x, x, kind="hinge", label_smoothing=0.1), "loss.label_smoothing",
     "dpo and robust only"),
    (lambda x: dpo_loss(x, x, x, x, kind="ipo", beta=0.0), "loss.beta", "should be > 0"),
    (lambda x: dpo_loss(x, x, x, x, kind="simpo"), "loss.type", "simpo_loss"),
    (lambda x: dpo_loss(x, x, x, x, kind="sigmoid"), "loss.type", "is not one of"),
    (lambda x: simpo_loss(x, x, beta=-1.0, gamma=0.5), "loss.beta", "should be > 0"),
    (lambda x: orpo_loss(x, x, x, lam=0.0), "loss.lambda", "should be > 0"),
    (lambda x: kto_loss(x, x, x > 0, kto_kl(x, x), undesirable_weight=0.0), "loss.undesirable_weight", "should be > 0"),
])
def test_bad_settings_name_their_config_key(call, key, message):
    with pytest.raises(ConfigError, match=message) as error:
        call(torch.zeros(2))
    assert error.value.key == key


def test_reward_metrics():
    """Batch means as TRL logs them: paired (accuracy counts strict wins) and unpaired KTO (margin of the means)."""
    paired = PreferenceLoss(torch.tensor([1.0, 3.0]), torch.tensor([0.5, -0.2]), torch.tensor([0.1, -0.2]))
    assert reward_metrics(paired) == pytest.approx({"loss": 2.0, "rewards/chosen": 0.15, "rewards/rejected": -0.05,
                                                    "rewards/margin": 0.2, "rewards/accuracy": 0.5})
    unpaired = PreferenceLoss(torch.tensor([0.5, 0.25, 0.75]), torch.tensor([0.4, 0.2]), torch.tensor([-0.6]),
                              paired=False)
    assert reward_metrics(unpaired) == pytest.approx({"loss": 0.5, "rewards/chosen": 0.3, "rewards/rejected": -0.6,
                                                      "rewards/margin": 0.9})
