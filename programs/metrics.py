"""Run logging: progress bar, ``metrics.jsonl``, optional TensorBoard / W&B, loss-curve PNG."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import orjson

from .run_guard import RunError


class MetricsLog:
    """One JSON line per logged step in ``output_dir/metrics.jsonl``, mirrored to the enabled sinks.

    On resume the file is cut back to the steps at or before the checkpoint,
    so it always describes one uninterrupted run.
    """

    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int = 0, progress: bool = True,
                 tensorboard: bool = False, wandb: bool = False, wandb_project: str = "ft-prog",
                 config: dict[str, Any] | None = None, enabled: bool = True):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.records = [r for r in self._read() if r["step"] <= start_step] if enabled else []
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in self.records))
        self._file = self.path.open("ab") if enabled else None
        self._bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._tb = self._wandb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RunError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        if enabled and wandb:
            try:
                import wandb as wandb_module
            except ImportError as e:
                raise RunError("log.wandb=true needs the wandb package: pip install wandb "
                                   "(WANDB_MODE=offline works without network)") from e
            self._wandb = wandb_module.init(project=wandb_project, dir=str(output_dir), config=config or {},
                                            resume="allow")

    def _read(self) -> list[dict[str, Any]]:
        """The records so far; a line that is not a record (torn by a power loss or a full disk) is dropped with
        a warning."""
        if not self.path.is_file():
            return []
        records = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                print(f"warning: {self.path}:{number}: not a complete metrics record (torn by an interrupted "
                      f"write?); dropped: {line[:80]!r}", file=sys.stderr, flush=True)
        return records

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold ``step``); numbers go to every sink."""
        if not self.enabled:
            return
        self.records.append(record)
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def progress(self, step: int, **shown: Any) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()},
                                  refresh=True)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


SECOND_PANEL = (("rewards/accuracy", "reward accuracy (chosen > rejected)"), ("reward", "mean reward"))
"""The metric a run's plot shows beside its loss, the first one it logged: preference tuning's reward accuracy,
RL's mean reward."""


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training (and validation) loss against step, as a PNG, with a second panel beside it when the run logged
    one of :data:`SECOND_PANEL` (its validation values too); None when nothing was logged."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    key, label = next(((k, lab) for k, lab in SECOND_PANEL if any(k in r for r in records)), (None, None))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if key else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if key else "loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if key:
        ax = axes[0][1]
        ax.plot(*zip(*[(r["step"], r[key]) for r in records if key in r]), label=f"train {label}", linewidth=1.2)
        held_out = [(r["step"], r[f"val_{key}"]) for r in records if f"val_{key}" in r]
        if held_out:
            ax.plot(*zip(*held_out), "o-", label=f"validation {label}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
