"""The configuration of `ft-prog run dpo` (TOML keys, defaults and allowed values).

Everything but ``data``, ``loss``, ``ref`` and the evaluation keys is sft's (:class:`TrainingConfig`).
"""

from __future__ import annotations

from typing import Literal

import attrs

from .config import TOML_KEY, in_range
from .sft_config import DataSourceSection, TrainingConfig

@attrs.frozen
class PreferenceDataSection(DataSourceSection):
    format: Literal["preference"] = "preference"
    """Rows with ``prompt``, ``chosen``, ``rejected`` (strings, or chat message lists sharing the prompt), or
    unpaired ``prompt``, ``completion``, ``label`` rows (KTO)."""


@attrs.frozen
class LossSection:
    type: Literal["dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = "dpo"
    beta: float = attrs.field(default=0.1, validator=in_range(0, low_open=True))
    """Inverse temperature of the implicit reward (IPO: the regularisation; ORPO: unused, see ``lambda``)."""
    label_smoothing: float = attrs.field(default=0.0, validator=in_range(0, 0.5, high_open=True))
    """Assumed share of flipped preference labels (robust DPO; conservative DPO for ``dpo``; SimPO)."""
    gamma: float = attrs.field(default=0.5, validator=in_range(0))
    """SimPO's target reward margin, divided by ``beta`` as in its paper (``gamma / beta`` is the logit margin)."""
    lambda_: float = attrs.field(default=0.1, validator=in_range(0), metadata={TOML_KEY: "lambda"})
    """ORPO's weight of the odds-ratio term beside the chosen responses' NLL (config key ``loss.lambda``)."""
    desirable_weight: float = attrs.field(default=1.0, validator=in_range(0, low_open=True))
    """KTO: weight of the desirable samples' losses."""
    undesirable_weight: float = attrs.field(default=1.0, validator=in_range(0, low_open=True))
    """KTO: weight of the undesirable samples' losses."""


@attrs.frozen
class RefSection:
    path: str = ""
    """A different reference model folder; empty: the starting model (with LoRA: the model with its adapters
    switched off, which costs no memory; full fine-tuning: a frozen copy)."""
    precompute: bool = False
    """Compute the reference log-probs once over the data before training (stored in ``output_dir/reference``,
    resumable) and free the reference model: full fine-tuning at one model's memory."""


@attrs.frozen
class DPOConfig(TrainingConfig):
    data: PreferenceDataSection = PreferenceDataSection()
    loss: LossSection = LossSection()
    ref: RefSection = RefSection()
    output_dir: str = "runs/dpo"
    eval_samples: int = attrs.field(default=0, validator=in_range(0))
    """Score greedy answers of this many validation pairs against their chosen response (exact match) before and
    after training; 0: reward accuracy only."""
