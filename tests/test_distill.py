"""Distillation: the chunked KD loss against full-logits references (and TRL's GKD loss), the teacher's isolation,
and `ft-prog run distill` end to end (metrics, resume after SIGKILL, the vocabulary check, the demo)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftprog.core import DIVERGENCES, distill_divergence, distill_loss_sum, from_config, preset, value_and_grad
from ftprog.transforms import lora


def models(student_method: str = "full"):
    """A tiny student (trainable) and a bigger teacher (3 layers) of the same vocabulary."""
    student = from_config(preset("tiny"), seed=1)
    teacher = from_config({**preset("tiny"), "num_hidden_layers": 3, "hidden_size": 96}, seed=2)
    if student_method == "lora":
        student = lora(student, rank=4, alpha=8, targets="all-linear")
        student = student.with_params({p: t + 0.05 * torch.randn_like(t)
                                       for p, t in student.trainable_params().items()})
    return student, teacher


def batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (3, 20), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :7] = -100  # a masked prompt
    targets[2, 12:] = -100  # padding
    return tokens, targets


def reference_divergence(s_logits, t_logits, kind, temperature, beta):
    """Per-row divergence written from probabilities, the textbook way."""
    p_s = torch.softmax(s_logits / temperature, -1)
    p_t = torch.softmax(t_logits / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p_t, p_s)
    if kind == "reverse_kl":
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def reference_sums(student, teacher, tokens, targets, kind, temperature, beta):
    """(KD sum, CE sum) from both models' full logits of the whole batch."""
    keep = targets != -100
    s_logits = student(tokens, training=True).float()[keep]
    with torch.no_grad():
        t_logits = teacher(tokens).float()[keep]
    kd = reference_divergence(s_logits, t_logits, kind, temperature, beta).sum()
    return kd, F.cross_entropy(s_logits, targets[keep], reduction="sum")


SETTINGS = [("forward_kl", 1.0, 0.5), ("forward_kl", 2.0, 0.5), ("reverse_kl", 1.0, 0.5), ("reverse_kl", 0.7, 0.5),
            ("jsd", 1.0, 0.5), ("jsd", 2.0, 0.1), ("jsd", 1.0, 0.9)]


@pytest.mark.parametrize("kind,temperature,beta", SETTINGS)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_loss_and_grads_match_full_logits(kind, temperature, beta, method):
    """Chunked KD and CE sums over the target positions, and their gradients, equal a full-logits fp32 computation
    (the per-target means within 1e-6 nats: a KL is a difference of near-equal fp32 sums over the vocabulary)."""
    student, teacher = models(method)
    tokens, targets = batch(student.config.vocab_size)

    def chunked(m):
        kd, ce = distill_loss_sum(m, teacher, tokens, targets, kind=kind, temperature=temperature, beta=beta,
                                  chunk_size=7)
        return kd + 0.3 * ce, (kd.detach(), ce.detach())

    def full(m):
        kd, ce = reference_sums(m, teacher, tokens, targets, kind, temperature, beta)
        return (kd + 0.3 * ce).float(), (kd.detach(), ce.detach())

    (_, (kd, ce)), grads = value_and_grad(chunked, has_aux=True)(student)
    (_, (ref_kd, ref_ce)), ref_grads = value_and_grad(full, has_aux=True)(student)
    n = int((targets != -100).sum())  # per-target means: the loss a step trains on (measured gaps: <= 6e-8)
    assert kd.dtype == torch.float32 and kd.item() > 0
    assert abs(kd.item() - ref_kd.item()) / n <= 1e-6
    assert abs(ce.item() - ref_ce.item()) / n <= 1e-6
    for path, g in grads.items():
        assert (g - ref_grads[path]).norm() <= 1e-5 * ref_grads[path].norm(), path


@pytest.mark.parametrize("kind,temperature,beta", SETTINGS)
def test_divergence_equals_trl_generalized_jsd(kind, temperature, beta):
    """TRL's GKD loss (beta 0: forward KL, beta 1: reverse KL; logits / T, no T^2 factor) on the same logits."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer").GKDTrainer
    g = torch.Generator().manual_seed(3)
    s_logits, t_logits = torch.randn(2, 5, 50, generator=g).mul(3).unbind(0)
    trl_beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": beta}[kind]
    expected = gkd.generalized_jsd_loss(s_logits[None], t_logits[None], beta=trl_beta, temperature=temperature,
                                        reduction="sum")
    got = distill_divergence(s_logits, t_logits, kind, temperature=temperature, beta=beta).sum()
    assert abs(got.item() - expected.item()) <= 1e-6 * expected.item()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_equals_unchunked(kind):
    student, teacher = models()
    tokens, targets = batch(student.config.vocab_size)
    sums = [distill_loss_sum(student, teacher, tokens, targets, kind=kind, chunk_size=size) for size in (5, 4096)]
    (kd_a, ce_a), (kd_b, ce_b) = sums
    assert torch.allclose(kd_a, kd_b, rtol=1e-6) and torch.allclose(ce_a, ce_b, rtol=1e-6)


def test_teacher_gets_no_gradient_and_no_graph():
    """Even with teacher leaves that require grad, nothing of the loss's graph reaches them, and no tensor saved for
    the backward holds a whole batch's logits."""
    student, teacher = models()
    teacher = teacher.with_params({p: t.detach().requires_grad_(True)
                                   for p, t in teacher.trainable_params().items()})
    leaves = list(teacher.trainable_params().values())
    tokens, targets = batch(student.config.vocab_size)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    student = student.with_params({p: t.detach().requires_grad_(True)
                                   for p, t in student.trainable_params().items()})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kd, ce = distill_loss_sum(student, teacher, tokens, targets, kind="jsd", chunk_size=4)
    assert kd.requires_grad and ce.requires_grad
    assert all(g is None for g in torch.autograd.grad(kd + ce, leaves, allow_unused=True))
    vocab = student.config.vocab_size
    assert saved and not [s for s in saved if s[-1:] == (vocab,)]  # logits exist inside a chunk's checkpoint only


def test_no_targets_gives_zero_in_the_graph():
    student, _ = models()
    _, teacher = models()
    tokens, targets = batch(student.config.vocab_size)
    (loss, grads) = value_and_grad(lambda m: sum(distill_loss_sum(m, teacher, tokens, torch.full_like(targets, -100))))(
        student)
    assert loss.item() == 0 and all(g.abs().sum() == 0 for g in grads.values())


def test_unknown_divergence_and_bad_beta_are_refused():
    s, t = torch.zeros(2, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        distill_divergence(s, t, "kl")
    with pytest.raises(ValueError, match="0 < beta < 1"):
        distill_divergence(s, t, "jsd", beta=1.0)
