"""The configuration of `ft-prog run distill` (TOML keys, defaults and allowed values).

Everything but ``data``, ``teacher``, ``distill`` and the evaluation keys is sft's (:class:`TrainingConfig`): the
student is ``model.path`` with sft's transforms (full, LoRA, DoRA, QLoRA, QAT).
"""

from __future__ import annotations

from typing import Literal

import attrs

from .config import in_range
from .sft_config import DataSection, TrainingConfig


@attrs.frozen
class TeacherSection:
    path: str = ""
    """The teacher's model folder (or ``builtin:demo-sft-model``); its tokenizer must give the student's ids."""
    quantize: Literal["", "nf4", "int8"] = ""
    """Hold the teacher quantized (``ftprog.transforms.quantize``): a big teacher in little memory."""
    adapter: str = ""
    """A LoRA adapter folder (PEFT format) put on the teacher: a LoRA-tuned teacher."""


def _offline_only(instance, attribute, value) -> None:
    if value == "on_policy":
        raise ValueError("mode 'on_policy' (the student samples, the teacher scores its tokens) is not implemented "
                         "yet; use 'offline' (the KD loss on the dataset's responses)")


@attrs.frozen
class DistillSection:
    mode: Literal["offline", "on_policy"] = attrs.field(default="offline", validator=_offline_only)
    """``offline``: the KD loss on the dataset's responses. ``on_policy`` (the student's own samples scored by the
    teacher) is not implemented yet: it is refused."""
    kd_ratio: float = attrs.field(default=0.5, validator=in_range(0, 1))
    """loss = (1 - kd_ratio) * cross-entropy + kd_ratio * divergence, both means over the response tokens."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """``forward_kl``: KL(teacher || student); ``reverse_kl``: KL(student || teacher); ``jsd``: the generalized
    Jensen-Shannon divergence with ``beta`` (GKD's; TRL's ``beta`` convention)."""
    temperature: float = attrs.field(default=1.0, validator=in_range(0, low_open=True))
    """Both models' logits are divided by it before the softmax (the loss is not multiplied by its square, as in
    TRL); the cross-entropy stays at temperature 1."""
    beta: float = attrs.field(default=0.5, validator=in_range(0, 1, low_open=True, high_open=True))
    """``jsd``'s weight of the teacher in the mixture (unused by the KLs)."""


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
