"""What every training program (``sft``, ``dpo``) does the same way around its own loss.

A program reads top to bottom as: data; :func:`plan_start` (where to continue, decided before anything is
loaded or deleted); model, transforms and optimizer; :meth:`Start.clear` (only now is anything removed);
:meth:`Start.restore`; the loop, whose step ends in :func:`apply_gradients` and :func:`save_or_stop`; the final
save (:func:`save_final`). The pieces hold no program-specific logic, so a new program gets the same
checkpoints, exact resume, lock, preemption and metrics by calling them.
"""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import torch

from ..core import ConfigError, Model, as_dtype, load_pretrained, optim, reuse_freed_memory
from ..core._checkpoint import recover_interrupted_swaps
from ..transforms import checkpoint, compile, lora, merge, qat, quantize, shard, trainable
from . import distributed, run_guard, run_state
from .config import to_toml
from .demo_assets import resolve


def setup_process(cfg: Any, dist: distributed.DistInfo) -> tuple[torch.device, Callable[..., None]]:
    """``(device, say)``: this rank's device, seeded RNG, thread count and allocator; ``say`` prints on rank 0."""
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed + dist.rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":  # the next step reuses what this one frees, as CUDA's caching allocator does
        reuse_freed_memory()
    return device, (print if dist.is_main else (lambda *args, **kwargs: None))


def build_model(cfg: Any, device: torch.device, mesh: Any = None) -> tuple[Model, Model]:
    """``(base, model)``: the loaded (and for QLoRA quantized, for QAT fake-quantized) base, and the model to train.

    Transform order: quantize or qat -> lora -> checkpoint -> shard (over ``mesh``, several processes) -> compile.
    """
    base = load_pretrained(resolve(cfg.model.path), dtype=as_dtype(cfg.dtype), device=device)
    method = cfg.peft.method
    if method == "qlora":
        base = quantize(base, "nf4")
    if cfg.qat.scheme:  # linears the quantize program would skip (shape) stay float here too
        if method in ("qlora", "dora"):
            raise ConfigError(f"qat.scheme={cfg.qat.scheme!r} needs peft.method none or lora, not {method!r}",
                              key="qat.scheme")
        base = qat(base, cfg.qat.scheme, group_size=cfg.qat.group_size, skip_unsupported=True)
    if method == "none":
        model = trainable(base)
    else:
        model = lora(base, rank=cfg.peft.rank, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                     targets=tuple(cfg.peft.targets), dora=method == "dora", rslora=cfg.peft.rslora, seed=cfg.seed)
    return base, run_transforms(cfg, model, mesh)


def run_transforms(cfg: Any, model: Model, mesh: Any = None) -> Model:
    """``model`` with the transforms that change how it runs: checkpoint -> shard -> compile, as ``cfg`` asks."""
    if cfg.activation_checkpointing:
        model = checkpoint(model)
    if mesh is not None:
        model = shard(model, mesh)
    if cfg.compile:
        model = compile(model)
    return model


def build_optimizer(cfg: Any, total_steps: int, say=print) -> Any:
    """The optimizer and schedule of ``cfg``; a warmup longer than the run is cut to it (``say`` notes it)."""
    o = cfg.optimizer
    warmup = min(o.warmup_steps, total_steps)
    if warmup < o.warmup_steps:
        say(f"note: optimizer.warmup_steps={o.warmup_steps} is longer than the run ({total_steps} steps); warming "
            f"up over all {total_steps} steps instead", flush=True)
    schedule = optim.schedule_by_name(o.schedule, o.lr, total_steps, warmup)
    if o.name == "sgd":
        return optim.sgd(schedule, momentum=o.momentum, weight_decay=o.weight_decay, state_dtype=o.state_dtype)
    return optim.adamw(schedule, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                       state_dtype=o.state_dtype)


# ------------------------------------------------------------------------------------------- start and resume


@attrs.frozen
class Start:
    """Where a run into ``out`` continues (:func:`plan_start`), and the earlier run's checkpoints that
    ``resume=false`` replaces."""

    out: Path
    point: run_state.ResumePoint
    earlier: list[Path]

    def clear(self, dist: distributed.DistInfo, say=print) -> None:
        """Remove what interrupted saves left, damaged checkpoints and (``resume=false``) the earlier run's
        checkpoints, else they would outrank this run's. Call once the model has loaded: a run that fails to
        load removes nothing. Every rank calls it."""
        distributed.barrier()
        if dist.is_main:
            for done in recover_interrupted_swaps(self.out, ["final"]):
                say(done, flush=True)
            for partial in run_state.remove_partial(self.out):
                say(f"removed {partial.name}: an incomplete checkpoint of an interrupted save", flush=True)
            for folder, why in self.point.damaged:
                say(f"{why}: removing the damaged checkpoint {folder.name}; resuming from "
                    f"{self.point.checkpoint.name}", flush=True)
                shutil.rmtree(folder)
            if self.earlier:
                say(f"resume=false: removing the earlier run's checkpoints "
                    f"{', '.join(p.name for p in self.earlier)}", flush=True)
                for old in self.earlier:
                    shutil.rmtree(old)
        distributed.barrier()

    def restore(self, model: Model, base: Model, opt: Any, opt_state: Any, loader: Any, say=print
                ) -> tuple[Model, Any, dict[str, Any]]:
        """``(model, opt_state, state)`` at the checkpoint (the loader moved to its position), or as given with a
        fresh ``state`` (``step``, ``tokens``, ``loader``, ``extra``) when the run starts from scratch."""
        state = {"step": 0, "tokens": 0, "loader": loader.state_dict(), "extra": {}}
        point = self.point
        if point.checkpoint is None:
            return model, opt_state, state
        model, opt_state, state = run_state.restore(point.checkpoint, model, base, opt, opt_state)
        loader.load_state_dict(state["loader"])
        state["extra"].setdefault("config_changes", []).extend(attrs.asdict(c) for c in point.changes)
        say(f"resumed from {point.checkpoint} (step {state['step']})", flush=True)
        if point.changes:
            say("changed settings: " + "; ".join(c.describe() for c in point.changes), flush=True)
        return model, opt_state, state


def plan_start(cfg: Any, resolved: dict[str, Any], fingerprint: str, rules: run_guard.ResumeRules,
               total_steps: int, sources: Iterable[str | None]) -> Start:
    """Decide where a run continues before anything is loaded or deleted: the newest intact checkpoint of
    ``cfg.output_dir``, whose settings (under ``rules``) and data (``fingerprint``) must be this run's; with
    ``resume=false`` none (the earlier run's checkpoints go in :meth:`Start.clear`). Refuses to write into
    any of ``sources`` (the model and data paths)."""
    out = Path(cfg.output_dir)
    earlier = [] if cfg.resume else run_state.checkpoints(out)
    point = run_state.ResumePoint()
    if cfg.resume:
        point = run_state.find_resume_point(out, run_guard.flat_config(resolved), fingerprint, rules,
                                            cfg.resume_allow_changes, total_steps)
    for replaced in [out / "final", *earlier]:  # never a folder this run replaces or removes
        run_guard.check_output(replaced, sources=list(sources), overwrite=True)
    return Start(out, point, earlier)


# ------------------------------------------------------------------------------------------------ the step


def clip_gradients(grads: dict, max_norm: float) -> tuple[dict, torch.Tensor]:
    """``(grads clipped to global norm max_norm (0: not clipped), their global norm before clipping)``.

    The grads are scaled in place: they are this step's own tensors from ``value_and_grad``.
    """
    if max_norm > 0:
        return optim.clip_by_global_norm(grads, max_norm, inplace=True)
    return grads, torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads.values()]))


def apply_gradients(model: Model, grads: dict, loss: torch.Tensor, opt: Any, opt_state: Any, max_grad_norm: float,
                    step: int, out: Path) -> tuple[Model, Any, torch.Tensor, float]:
    """Clip, check and apply one step's gradients: ``(model, opt_state, grad_norm, lr)``.

    A non-finite loss or gradient norm stops the run before the update, naming the step and the last good
    checkpoint. The update is in place: the program owns these tensors, and a functional copy would cost
    params-sized memory.
    """
    grads, grad_norm = clip_gradients(grads, max_grad_norm)
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        last = run_state.checkpoints(out)
        raise run_guard.RunError(f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at "
                                 f"step {step + 1}; stopped before updating. Last good checkpoint: "
                                 f"{last[-1] if last else 'none'} (lower optimizer.lr?)")
    lr = opt.lr_at(opt_state.count)
    params, opt_state = opt.update(grads, opt_state, model.trainable_params(), inplace=True)
    return model.with_params(params), opt_state, grad_norm, lr


def save_or_stop(cfg: Any, step: int, total_steps: int, stop_request: run_guard.StopRequest,
                 clock: run_guard.SaveClock, save: Callable[[int], Path], log: Any, say=print) -> None:
    """End of a step: save a checkpoint when one is due (every ``cfg.save_every`` steps, or by ``clock``) or a stop
    signal came (then also exit with the signal's code, pointing at the same command to resume). Stop signals
    are acted on between steps, so the checkpoint they save is a consistent one. Every rank calls it."""
    stop = run_guard.agreed_stop(stop_request) if step < total_steps else 0
    due = clock.due() or bool(cfg.save_every and step % cfg.save_every == 0)
    if due and step < total_steps or stop:
        where = save(step)
        clock.saved()
    if stop:
        log.close()
        say(f"\ninterrupted ({signal.Signals(stop).name}): saved {where} (step {step}); run the same "
            "command to resume", file=sys.stderr)
        raise SystemExit(run_guard.exit_code(stop))


def save_final(cfg: Any, out: Path, model: Model, state: dict, resolved: dict) -> Path:
    """``out/final``: the HF model (full) or the PEFT adapter (+ ``merged/`` when asked), with the config."""
    final = out / "final"
    run_state.save_model(model, final)
    changes = run_guard.changes_header(state["extra"].get("config_changes", []))
    (final / "ft-prog-config.toml").write_text(changes + to_toml(resolved))
    if cfg.peft.method != "none" and cfg.peft.merge_at_end:
        from ..core import save_pretrained

        save_pretrained(merge(model), final / "merged")
    return final
