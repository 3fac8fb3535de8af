"""The configuration of `ft-prog run sft` (TOML keys, defaults and allowed values)."""

from __future__ import annotations

from typing import Literal

import attrs

from .config import in_range


@attrs.frozen
class ModelSection:
    path: str = ""
    """A Hugging Face model folder, or ``builtin:demo-model``."""


@attrs.frozen
class DataSourceSection:
    """Where the data comes from and how rows become token ids; each program adds its ``format``."""

    path: str = ""
    """A local file or folder (json, jsonl, csv, parquet, txt), a Hub dataset repo id, or ``builtin:demo-data``."""
    split: str = "train"
    columns: dict[str, str] = attrs.field(factory=dict)
    """Column mapping, e.g. ``{instruction = "prompt", output = "completion"}``."""
    template: Literal["model", "chatml"] = "model"
    """Chat template: the tokenizer's own, or ChatML for models without one."""
    system_prompt: str = ""
    fold_system: bool = False
    """Put a system message (the row's or ``system_prompt``) at the start of the first user turn: for chat
    templates without a system role (Gemma's)."""
    val_path: str = ""
    """Validation data; empty: ``val_split`` of the same source if it has one, else ``val_fraction``."""
    val_split: str = "validation"
    val_fraction: float = attrs.field(default=0.0, validator=in_range(0))
    skip_bad: bool = False


@attrs.frozen
class DataSection(DataSourceSection):
    format: Literal["instruct", "chat", "text"] = "instruct"
    train_on_input: bool = False


@attrs.frozen
class PeftSection:
    method: Literal["none", "lora", "dora", "qlora"] = "lora"
    rank: int = attrs.field(default=8, validator=in_range(1))
    alpha: float = attrs.field(default=16.0, validator=in_range(0, low_open=True))
    dropout: float = attrs.field(default=0.0, validator=in_range(0, 1, high_open=True))
    targets: list[str] = attrs.field(factory=lambda: ["q_proj", "v_proj"], validator=attrs.validators.min_len(1))
    rslora: bool = False
    merge_at_end: bool = False
    """Also write the merged Hugging Face model to ``output_dir/final/merged``."""


@attrs.frozen
class QatSection:
    scheme: Literal["", "int8-dynamic-act-int4-weight", "int4-weight", "int8-weight"] = ""
    """Quantization-aware training (empty: off): every linear but ``lm_head`` computes with torchao's
    fake-quantized weights (and int8 per-token inputs for ``int8-dynamic-act-int4-weight``) while training;
    convert the result with ``ft-prog run quantize`` and the same ``scheme`` and ``group_size``."""
    group_size: int = attrs.field(default=32, validator=in_range(0))
    """Input features per weight scale (0: one scale per output row)."""


@attrs.frozen
class OptimizerSection:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = attrs.field(default=2e-4, validator=in_range(0, low_open=True))
    weight_decay: float = attrs.field(default=0.0, validator=in_range(0))
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.999], validator=[
        in_range(0, 1, high_open=True), attrs.validators.min_len(2), attrs.validators.max_len(2)])
    eps: float = attrs.field(default=1e-8, validator=in_range(0, low_open=True))
    momentum: float = attrs.field(default=0.0, validator=in_range(0, 1, high_open=True))
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = attrs.field(default=0, validator=in_range(0))
    """Linear warmup from 0; longer than the run, it is cut to the run's length (a note says so)."""
    max_grad_norm: float = attrs.field(default=1.0, validator=in_range(0))
    """Clip gradients to this global norm; 0 disables clipping."""
    state_dtype: Literal["auto", "fp32", "bf16", "int8", "fp8", "int4"] = "auto"
    """Dtype of the optimizer moments. auto: bf16 for full fine-tuning with ``dtype = "bf16"`` (what torch.optim
    keeps for bf16 params, half of fp32's memory; with ``stochastic_rounding`` they keep moving where rounding to
    nearest stalls them), fp32 otherwise (LoRA adapters, fp32 params). int8 and fp8 (adamw only, one process) keep
    them block-quantized by torchao, a quarter of fp32's, int4 an eighth, updated by torchao's step compiled (on
    54M params, 1 thread: int8 2.7 s, fp8 0.37 s, fp32 0.19 s per update; the first update compiles)."""
    stochastic_rounding: bool = True
    """Round bf16 params (and bf16 moments) stochastically after each update instead of to nearest: updates under
    half a bf16 step of a weight (most at fine-tuning learning rates) then move it on average instead of being
    lost. The step is computed in fp32 pieces; the random bits come from the step number and the parameter's
    name, so a resumed run continues bitwise. fp32 params and moments: no effect."""
    in_backward: bool = False
    """Update each parameter as soon as its gradient is complete in the backward, and free that gradient: full
    fine-tuning then never holds all gradients at once. Needs grad_accum = 1 and max_grad_norm = 0 (the update
    happens before the global gradient norm is known); one process. Every training program (grpo: any
    num_iterations, each optimizer step being one backward)."""


@attrs.frozen
class LogSection:
    every: int = attrs.field(default=1, validator=in_range(1))
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ft-prog"
    plot: bool = True
    """Write ``loss_curve.png`` at the end."""


@attrs.frozen
class TrainingConfig:
    """What every training program's config has: the model and its transforms, the optimizer, the run's length,
    checkpoints and resume, logging."""

    model: ModelSection = ModelSection()
    peft: PeftSection = PeftSection()
    qat: QatSection = QatSection()
    optimizer: OptimizerSection = OptimizerSection()
    log: LogSection = LogSection()
    dtype: Literal["fp32", "bf16"] = "bf16"
    seed: int = 0
    seq_len: int = attrs.field(default=512, validator=in_range(2))
    batch_size: int = attrs.field(default=4, validator=in_range(1))
    grad_accum: int = attrs.field(default=1, validator=in_range(1))
    max_steps: int = attrs.field(default=0, validator=in_range(0))
    """Stop after this many optimizer steps (0: run ``epochs`` epochs)."""
    epochs: int = attrs.field(default=1, validator=in_range(1))
    activation_checkpointing: bool = False
    fuse_projections: bool = False
    """Run q/k/v and gate/up as one matmul each where no adapter or quantization sits on them
    (``transforms.fuse_projections``); checkpoints keep the separate layout."""
    activation_offloading: bool = False
    """Keep saved activations in pinned host memory from the forward to the backward (CUDA;
    ``transforms.offload_activations``); with ``activation_checkpointing`` only each layer's input moves.
    A no-op with a note on the CPU, where activations already are in host memory."""
    compile: bool = False
    threads: int = attrs.field(default=0, validator=in_range(0))
    """CPU threads for torch (0: torch's default). Small models often run faster on 1."""
    output_dir: str = "runs/sft"
    save_every: int = attrs.field(default=0, validator=in_range(0))
    """Save a resumable checkpoint every N steps (0: by time only, ``save_every_minutes``)."""
    save_every_minutes: float = attrs.field(default=30.0, validator=in_range(0))
    """Also save one when this many minutes passed since the last (0: never), so a kill without warning
    loses bounded work."""
    keep_last: int = attrs.field(default=2, validator=in_range(0))
    """Checkpoints kept (0: all)."""
    resume: bool = True
    """Continue from the newest ``step_N`` checkpoint in ``output_dir``; false: start over (removing them)."""
    resume_allow_changes: list[str] = attrs.field(factory=list)
    """Settings (dotted keys or globs, e.g. ``["optimizer.lr"]``) allowed to differ from the checkpoint's on
    resume, on purpose; the change is recorded in summary.json and final/ft-prog-config.toml."""
    eval_every: int = attrs.field(default=0, validator=in_range(0))
    """Validation metrics every N steps (0: only at the end, if there is validation data)."""
    max_new_tokens: int = attrs.field(default=32, validator=in_range(1))


def optimizer_state_dtype(cfg: TrainingConfig) -> str:
    """``optimizer.state_dtype`` with ``auto`` resolved: ``"bf16"`` for full fine-tuning of bf16 params, ``"fp32"``
    otherwise."""
    dtype = cfg.optimizer.state_dtype
    if dtype != "auto":
        return dtype
    return "bf16" if cfg.dtype == "bf16" and cfg.peft.method == "none" else "fp32"


@attrs.frozen
class SFTConfig(TrainingConfig):
    data: DataSection = DataSection()
    packing: bool = True
    """Pack samples into rows of ``seq_len`` (document masks keep them apart): no compute spent on padding."""
    exact_match_samples: int = attrs.field(default=0, validator=in_range(0))
    """Score greedy answers on this many validation samples before and after training (instruct/chat)."""
