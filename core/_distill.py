"""Knowledge-distillation loss computed chunk by chunk from a student's and a teacher's hidden states.

Both models run their decoder once; only positions with a target (``-100`` elsewhere) go through the output
layers, ``chunk_size`` positions at a time, so neither model's full-vocabulary logits ever exist for the whole
batch. The teacher runs under ``no_grad`` (no autograd graph, no gradient); each chunk is recomputed in the
backward (:func:`~ftprog.core.recompute`), so one chunk's logits of each model exist at a time.

Divergences, per target position, with ``p_s = softmax(student_logits / T)`` and ``p_t = softmax(teacher_logits /
T)`` (TRL's ``GKDTrainer.generalized_jsd_loss`` conventions; the loss is *not* multiplied by ``T^2``, as in TRL):

- ``forward_kl``: ``KL(p_t || p_s)`` (TRL's ``beta = 0``);
- ``reverse_kl``: ``KL(p_s || p_t)`` (TRL's ``beta = 1``);
- ``jsd``: the generalized Jensen-Shannon divergence of the GKD paper, ``beta * KL(p_t || m) + (1 - beta) *
  KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``, ``0 < beta < 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._loss import _target_rows
from ._model import Model
from ._recompute import recompute

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def distill_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, *,
                       temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """``[rows]`` fp32 divergence of each row's teacher and student distributions over the last axis (see the module
    docstring for ``kind``, ``temperature`` and ``beta``)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence {kind!r}: expected one of {', '.join(DIVERGENCES)}")
    log_s = (student_logits.float() / temperature).log_softmax(-1)
    log_t = (teacher_logits.float() / temperature).log_softmax(-1)
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    if not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (beta 0 is forward_kl, beta 1 reverse_kl)")
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``[rows]`` ``KL(p || q)`` from log-probabilities (finite: a log-softmax of finite logits)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _chunk_losses(student: Model, s_head: Any, teacher: Model, t_head: Any, s_hidden: torch.Tensor,
                  t_hidden: torch.Tensor, targets: torch.Tensor, kind: str, temperature: float, beta: float,
                  training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed divergence, summed student cross-entropy)`` of one chunk of target rows."""
    s_logits = student.logits(s_hidden, training=training, output_layer=s_head).float()
    with torch.no_grad():
        t_logits = teacher.logits(t_hidden, output_layer=t_head).float()
    vocab = min(s_logits.shape[-1], t_logits.shape[-1])  # rows past a shared tokenizer's ids: embedding padding
    kd = distill_divergence(s_logits[:, :vocab], t_logits[:, :vocab], kind, temperature=temperature, beta=beta)
    return kd.sum(), F.cross_entropy(s_logits, targets, reduction="sum")


def distill_loss_sum(
    student: Model,
    teacher: Model,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    training: bool = True,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(KD sum, CE sum)``: fp32 scalars summed over the positions whose target is not ``-100``.

    Args:
        student: the model being trained (gradients flow to its trainable leaves).
        teacher: a model of the same vocabulary; run under ``no_grad``, it gets no gradient and no graph.
        tokens: ``[batch, seq]`` input ids (the same for both models).
        targets: ``[batch, seq]`` the id each position should predict, ``-100`` to skip.
        kind: the divergence, ``forward_kl``, ``reverse_kl`` or ``jsd`` (module docstring), at ``temperature``; the
            student's cross-entropy is at temperature 1.
        chunk_size: positions per output-layer chunk (bounds the fp32 logits held: one chunk of each model).

    Divide each by the number of targets (over all micro-batches of a step) for the means.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence {kind!r}: expected one of {', '.join(DIVERGENCES)}")
    kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
    s_hidden, ids, _ = _target_rows(student, tokens, targets, training=training, **kwargs)
    with torch.no_grad():
        t_hidden, _, _ = _target_rows(teacher, tokens, targets, training=False, **kwargs)
    s_head, t_head = student.output_layer(), teacher.output_layer()
    kd = ce = s_hidden[:0].float().sum()  # zero, in the graph even without targets (an empty data-parallel slice)
    for start in range(0, s_hidden.shape[0], chunk_size):
        end = start + chunk_size
        part_kd, part_ce = recompute(_chunk_losses, student, s_head, teacher, t_head, s_hidden[start:end],
                                     t_hidden[start:end], ids[start:end], kind, temperature, beta, training)
        kd, ce = kd + part_kd, ce + part_ce
    return kd, ce
