"""The configuration of `ft-prog run grpo` (TOML keys, defaults and allowed values).

Everything but ``data``, ``loss``, ``reward`` and the sampling keys is sft's (:class:`TrainingConfig`):
``batch_size`` counts prompts, each sampled ``group_size`` times; ``grad_accum`` splits a step's completions into
that many forwards; ``seq_len`` bounds prompt plus completion.
"""

from __future__ import annotations

from typing import Literal

import attrs

from .config import in_range
from .sft_config import DataSourceSection, TrainingConfig


@attrs.frozen
class PromptDataSection(DataSourceSection):
    format: Literal["prompt"] = "prompt"
    """Rows with a ``prompt`` (a string: one user turn; or a chat message list) and the columns rewards read."""


@attrs.frozen
class GRPOLossSection:
    type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """How token losses are averaged: per sequence then over sequences (GRPO), over sequences x max_new_tokens
    (Dr. GRPO), over every completion token (DAPO)."""
    epsilon: float = attrs.field(default=0.2, validator=in_range(0, low_open=True))
    """Lower clip range of the ratio: ``1 - epsilon``."""
    epsilon_high: float = attrs.field(default=0.0, validator=in_range(0))
    """Upper clip range ``1 + epsilon_high`` (DAPO's clip-higher); 0: ``epsilon``."""
    beta: float = attrs.field(default=0.0, validator=in_range(0))
    """Weight of the k3 KL estimate to the reference; 0 loads no reference."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's or the batch's reward std (or not: Dr. GRPO)."""
    mask_truncated: bool = False
    """Completions that hit max_new_tokens without stopping get no loss."""


@attrs.frozen
class RewardSection:
    functions: list[str] = attrs.field(factory=lambda: ["exact_match"], validator=attrs.validators.min_len(1))
    """Built-ins (exact_match, contains, regex, numeric, length) or ``"file.py:function"`` (user code)."""
    weights: list[float] = attrs.field(factory=list)
    """One weight per function (empty: all 1)."""
    reference_column: str = "answer"
    """The data column exact_match / contains / numeric compare with."""
    pattern: str = ""
    """regex: the pattern a whole (stripped) completion must match."""
    tolerance: float = attrs.field(default=1e-6, validator=in_range(0))
    """numeric: the absolute tolerance."""
    target_length: int = attrs.field(default=512, validator=in_range(1))
    """length: characters past which the penalty starts."""


@attrs.frozen
class GRPOConfig(TrainingConfig):
    data: PromptDataSection = PromptDataSection()
    loss: GRPOLossSection = GRPOLossSection()
    reward: RewardSection = RewardSection()
    output_dir: str = "runs/grpo"
    group_size: int = attrs.field(default=8, validator=in_range(2))
    """Completions sampled per prompt (the group advantages are normalised over)."""
    num_iterations: int = attrs.field(default=1, validator=in_range(1))
    """Optimizer steps taken on each batch of rollouts (ratios clipped against the sampling policy)."""
    temperature: float = attrs.field(default=1.0, validator=in_range(0, low_open=True))
    top_p: float = attrs.field(default=1.0, validator=in_range(0, 1, low_open=True))
    top_k: int = attrs.field(default=0, validator=in_range(0))
    """0: no top-k filter."""
    stop: list[str] = attrs.field(factory=list)
    """Strings that end a completion (besides the tokenizer's stop tokens); the completion is cut before them."""
    eval_samples: int = attrs.field(default=0, validator=in_range(0))
    """Held-out prompts whose greedy completions are scored before and after training (and every eval_every)."""
