"""The configuration of `ft-prog run distill` (TOML keys, defaults and allowed values).

Everything but ``data``, ``teacher``, ``distill`` and the evaluation keys is sft's (:class:`TrainingConfig`): the
student is ``model.path`` with sft's transforms (full, LoRA, DoRA, QLoRA, QAT).
"""

from __future__ import annotations

from typing import Literal

import attrs

from .config import TOML_KEY, in_range
from .sft_config import DataSection, TrainingConfig


@attrs.frozen
class TeacherSection:
    path: str = ""
    """The teacher's model folder (or ``builtin:demo-sft-model``); its tokenizer must give the student's ids."""
    quantize: Literal["", "nf4", "int8"] = ""
    """Hold the teacher quantized (``ftprog.transforms.quantize``): a big teacher in little memory."""
    adapter: str = ""
    """A LoRA adapter folder (PEFT format) put on the teacher: a LoRA-tuned teacher."""


@attrs.frozen
class DistillSection:
    mode: Literal["offline", "on_policy"] = "offline"
    """``offline``: every step trains on the dataset's responses. ``on_policy``: the student samples a completion of
    each row's prompt and the step's loss is the divergence at every sampled token (the teacher scores them); a
    ``lambda`` share of the steps are offline steps on the dataset's responses instead (generalized KD)."""
    kd_ratio: float = attrs.field(default=0.5, validator=in_range(0, 1))
    """An offline step's loss = (1 - kd_ratio) * cross-entropy + kd_ratio * divergence, both means over the
    response tokens. An on-policy step's loss is the divergence alone (a cross-entropy on the student's own
    samples would only sharpen it); its ``ce_loss`` metric is the student's NLL of its samples."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """``forward_kl``: KL(teacher || student); ``reverse_kl``: KL(student || teacher); ``jsd``: the generalized
    Jensen-Shannon divergence with ``beta`` (GKD's; TRL's ``beta`` convention)."""
    temperature: float = attrs.field(default=1.0, validator=in_range(0, low_open=True))
    """Both models' logits are divided by it before the softmax (the loss is not multiplied by its square, as in
    TRL); the cross-entropy stays at temperature 1. ``on_policy``: the student also samples at it (as TRL's GKD)."""
    beta: float = attrs.field(default=0.5, validator=in_range(0, 1, low_open=True, high_open=True))
    """``jsd``'s weight of the teacher in the mixture (unused by the KLs)."""
    lambda_: float = attrs.field(default=0.0, validator=in_range(0, 1), metadata={TOML_KEY: "lambda"})
    """``on_policy``: the share of steps that train on the dataset's responses instead of the student's samples
    (config key ``distill.lambda``; which steps is drawn from ``seed`` and the step number). Note TRL's
    ``GKDTrainer`` ``lmbda`` is the other share (the on-policy one): its ``lmbda`` is ``1 - lambda`` here."""
    max_new_tokens: int = attrs.field(default=128, validator=in_range(1))
    """``on_policy``: the most tokens sampled per completion (a stop token ends one earlier)."""


@attrs.frozen
class DistillConfig(TrainingConfig):
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    distill: DistillSection = DistillSection()
    packing: bool = True
    """Pack samples into rows of ``seq_len`` (document masks keep them apart), as sft."""
    output_dir: str = "runs/distill"
    exact_match_samples: int = attrs.field(default=0, validator=in_range(0))
    """Score the student's greedy answers on this many validation samples before and after training."""
