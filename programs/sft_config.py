"""The configuration of `ft-prog run sft` (TOML keys, defaults and allowed values)."""

from __future__ import annotations

from typing import Literal

import attrs


@attrs.frozen
class ModelSection:
    path: str = ""
    """A Hugging Face model folder, or ``builtin:demo-model``."""


@attrs.frozen
class DataSection:
    path: str = ""
    """A local file or folder (json, jsonl, csv, parquet, txt), a Hub dataset repo id, or ``builtin:demo-data``."""
    format: Literal["instruct", "chat", "text"] = "instruct"
    split: str = "train"
    columns: dict[str, str] = attrs.field(factory=dict)
    """Column mapping, e.g. ``{instruction = "prompt", output = "completion"}``."""
    template: Literal["model", "chatml"] = "model"
    """Chat template: the tokenizer's own, or ChatML for models without one."""
    system_prompt: str = ""
    train_on_input: bool = False
    val_path: str = ""
    """Validation data; empty: ``val_split`` of the same source if it has one, else ``val_fraction``."""
    val_split: str = "validation"
    val_fraction: float = 0.0
    skip_bad: bool = False


@attrs.frozen
class PeftSection:
    method: Literal["none", "lora", "dora", "qlora"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = attrs.field(factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False
    merge_at_end: bool = False
    """Also write the merged Hugging Face model to ``output_dir/final/merged``."""


@attrs.frozen
class OptimizerSection:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Clip gradients to this global norm; 0 disables clipping."""
    state_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the optimizer moments: bf16 halves their memory (what torch.optim keeps for bf16 params)."""


@attrs.frozen
class LogSection:
    every: int = 1
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ft-prog"
    plot: bool = True
    """Write ``loss_curve.png`` at the end."""


@attrs.frozen
class SFTConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    peft: PeftSection = PeftSection()
    optimizer: OptimizerSection = OptimizerSection()
    log: LogSection = LogSection()
    dtype: Literal["fp32", "bf16"] = "bf16"
    seed: int = 0
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run ``epochs`` epochs)."""
    epochs: int = 1
    packing: bool = True
    """Pack samples into rows of ``seq_len`` (document masks keep them apart): no compute spent on padding."""
    activation_checkpointing: bool = False
    compile: bool = False
    threads: int = 0
    """CPU threads for torch (0: torch's default). Small models often run faster on 1."""
    output_dir: str = "runs/sft"
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    resume: bool = True
    """Continue from the newest ``step_N`` checkpoint in ``output_dir``; false: start over (removing them)."""
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end, if there is validation data)."""
    exact_match_samples: int = 0
    """Score greedy answers on this many validation samples before and after training (instruct/chat)."""
    max_new_tokens: int = 32
