"""What every training program (``sft``, ``dpo``, ``grpo``, ``distill``) does the same way around its own loss.

A program reads top to bottom as: data (:func:`data_config`); :func:`plan_start` (where to continue, decided
before anything is loaded or deleted); model, transforms and optimizer; :meth:`Start.clear` (only now is
anything removed); :meth:`Start.restore` and :func:`metrics_log`; the loop, whose step is :func:`train_step`
over its micro-batches (:func:`accumulate` and :func:`apply_gradients`, or :func:`in_backward_step`),
:func:`step_record` and :func:`save_or_stop` (with :func:`save_checkpoint`); the end (:func:`finish`). The pieces hold no program-specific logic, so a new program
gets the same checkpoints, exact resume, lock, preemption and metrics by calling them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import orjson
import torch

from ..core import (
    CPU_MATMUL_UPCAST_ENV, ConfigError, Model, as_dtype, load_pretrained, matmul_dtype, optim, router_aux_loss,
    value_and_grad,
)
from ..core._checkpoint import recover_interrupted_swaps
from ..core._data import DataConfig
from ..transforms import (
    checkpoint, compile, fuse_projections, lora, merge, offload_activations, qat, quantize, shard, trainable,
)
from . import distributed, run_guard, run_state
from .config import to_toml
from .demo_assets import resolve
from .host_memory import allocator_note
from .metrics import MetricsLog, plot_losses
from .sft_config import optimizer_state_dtype


def setup_process(cfg: Any, dist: distributed.DistInfo) -> tuple[torch.device, Callable[..., None]]:
    """``(device, say)``: this rank's device, seeded RNG and thread count; ``say`` prints on rank 0, first the
    host allocator the command runs on (:func:`~ftprog.programs.host_memory.allocator_note`)."""
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed + dist.rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = print if dist.is_main else (lambda *args, **kwargs: None)
    say(allocator_note(), flush=True)  # which malloc (programs.host_memory): host memory over a long run
    note = matmul_note(getattr(cfg, "dtype", None), device)
    if note:
        say(note, flush=True)
    return device, say


def matmul_note(dtype: str | None, device: torch.device) -> str | None:
    """The line a run prints when its ``dtype`` matmuls compute in fp32 on this CPU (``ftprog.core.matmul_dtype``),
    else None."""
    if dtype is None or device.type != "cpu":
        return None
    narrow = as_dtype(dtype)
    if matmul_dtype(narrow, device) == narrow:
        return None
    return (f"matmuls: {dtype} computed in fp32 (this CPU has no {dtype} matrix kernels: no AVX-512 / AMX; weights "
            f"and activations stay {dtype}; {CPU_MATMUL_UPCAST_ENV}=0 to use torch's slower {dtype} loop)")


def data_config(cfg: Any) -> DataConfig:
    """The data loader's :class:`DataConfig` from ``cfg.data`` (whichever of its keys the program's data section
    has), ``cfg.seq_len`` and ``cfg.seed``; the path resolved (``builtin:`` assets), empty strings as unset."""
    section = attrs.asdict(cfg.data, recurse=False)
    fields = {f.name for f in attrs.fields(DataConfig)} & section.keys()
    values = {k: (section[k] if section[k] != "" or k in ("path", "template") else None) for k in fields}
    return DataConfig(**{**values, "path": resolve(cfg.data.path), "seq_len": cfg.seq_len, "seed": cfg.seed})


def build_model(cfg: Any, device: torch.device, mesh: Any = None, say=print) -> tuple[Model, Model]:
    """``(base, model)``: the loaded (and for QLoRA quantized, for QAT fake-quantized) base, and the model to train.

    Transform order: quantize or qat -> lora -> checkpoint -> shard (over ``mesh``, several processes) ->
    fuse_projections, offload_activations -> compile. ``say`` prints the note that offloading is off on the CPU.
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
    if cfg.activation_offloading and device.type != "cuda":
        say(f"note: activation_offloading is a no-op on {device.type}: activations already live in host memory",
            flush=True)
    return base, run_transforms(cfg, model, mesh)


def run_transforms(cfg: Any, model: Model, mesh: Any = None) -> Model:
    """``model`` with the transforms that change how it runs: checkpoint -> shard -> fuse_projections,
    offload_activations (CUDA only) -> compile, as ``cfg`` asks."""
    if cfg.activation_checkpointing:
        model = checkpoint(model)
    if mesh is not None:
        model = shard(model, mesh)
    if cfg.fuse_projections:
        model = fuse_projections(model)
    if cfg.activation_offloading and model.device.type == "cuda":
        model = offload_activations(model)
    if cfg.compile:
        model = compile(model)
    return model


def build_optimizer(cfg: Any, total_steps: int, say=print) -> Any:
    """The optimizer and schedule of ``cfg``; a warmup longer than the run is cut to it (``say`` notes it).

    ``optimizer.in_backward`` is refused unless the run allows it (one backward per step, no clipping, one
    process; :func:`train_step`)."""
    o = cfg.optimizer
    if o.in_backward:
        _check_in_backward(cfg)
    warmup = min(o.warmup_steps, total_steps)
    if warmup < o.warmup_steps:
        say(f"note: optimizer.warmup_steps={o.warmup_steps} is longer than the run ({total_steps} steps); warming "
            f"up over all {total_steps} steps instead", flush=True)
    schedule = optim.schedule_by_name(o.schedule, o.lr, total_steps, warmup)
    state_dtype = optimizer_state_dtype(cfg)
    if o.state_dtype in optim.LOW_BIT_STATES:
        if o.name != "adamw":
            raise ConfigError(f"optimizer.state_dtype={o.state_dtype!r} (torchao's quantized moments) needs "
                              f"optimizer.name='adamw', not {o.name!r}", key="optimizer.state_dtype")
        if distributed.under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError(f"optimizer.state_dtype={o.state_dtype!r} runs in one process only (sharded params "
                              "are not supported); use bf16 or fp32 with several processes",
                              key="optimizer.state_dtype")
    if o.name == "sgd":
        return optim.sgd(schedule, momentum=o.momentum, weight_decay=o.weight_decay, state_dtype=state_dtype,
                         stochastic_rounding=o.stochastic_rounding)
    return optim.adamw(schedule, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                       state_dtype=state_dtype, stochastic_rounding=o.stochastic_rounding)


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


def metrics_log(cfg: Any, resolved: dict, state: dict, total_steps: int, dist: distributed.DistInfo) -> MetricsLog:
    """``output_dir/metrics.jsonl`` (cut back to the resumed step) and the sinks ``cfg.log`` enables, on rank 0."""
    return MetricsLog(Path(cfg.output_dir), total_steps=total_steps, start_step=state["step"],
                      progress=cfg.log.progress, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                      wandb_project=cfg.log.wandb_project, config=resolved, enabled=dist.is_main)


# ------------------------------------------------------------------------------------------------ the step


def accumulate(micro_step: Callable[[Any], tuple[tuple[torch.Tensor, dict], dict]], micro: Iterable
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """One step's ``(loss summed over the micro-batches and ranks, their metrics summed, their gradients summed)``.

    ``micro_step(batch)`` returns ``((loss share, {name: tensor}), grads)`` as ``value_and_grad(...,
    has_aux=True)`` does; the metrics are summed on the CPU in fp32 over this rank's micro-batches.
    """
    loss, sums, grads = torch.zeros(()), {}, None
    for batch in micro:
        (part, metrics), g = micro_step(batch)
        loss = loss + part.detach().cpu()
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0) + value.detach().float().cpu()
        grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
    return distributed.all_sum(loss), sums, grads


def router_share(model: Model, micro_batches: int, world_size: int) -> float:
    """The weight of one micro-batch's router load-balancing loss in the step's loss: ``router_aux_loss_coef``
    times the mean over the step's micro-batches and ranks (0 for a dense model)."""
    return model.config.moe.aux_loss_coef / (micro_batches * world_size) if model.config.moe else 0.0


def with_router_loss(loss_fn: Callable[[Model], tuple[torch.Tensor, dict]], model: Model,
                     attention_mask: torch.Tensor | None, share: float) -> tuple[torch.Tensor, dict]:
    """``loss_fn(model)``, a ``(loss, metrics)`` pair; for a mixture of experts ``share`` (:func:`router_share`)
    times the router's load-balancing loss of the same forward is added to the loss and, unweighted and
    detached, to the metrics as ``aux_loss``. ``attention_mask [batch, seq]`` leaves padding out of it."""
    if model.config.moe is None:
        return loss_fn(model)
    router_logits: list = []
    loss, metrics = loss_fn(model.with_router_logits(router_logits))
    aux = router_aux_loss(router_logits, model.config, attention_mask)
    return loss + share * aux, {**metrics, "aux_loss": aux.detach()}


def router_metric(sums: dict, micro_batches: int, world_size: int) -> dict[str, float]:
    """``{"aux_loss": mean router loss of the step}`` taken out of ``sums`` (:func:`accumulate`'s), or ``{}``
    for a dense model. Every rank calls it."""
    if "aux_loss" not in sums:
        return {}
    return {"aux_loss": distributed.all_sum(sums.pop("aux_loss")).item() / (micro_batches * world_size)}


def _check_in_backward(cfg: Any) -> None:
    why = None
    if cfg.grad_accum > 1:
        why = (f"grad_accum={cfg.grad_accum}: a step would run {cfg.grad_accum} backwards (one per micro-batch) and "
               "each parameter is updated as soon as its gradient of one backward is complete, so gradients cannot "
               "be summed over micro-batches; use grad_accum=1 (and a larger batch_size)")
    elif cfg.optimizer.max_grad_norm > 0:
        why = (f"optimizer.max_grad_norm={cfg.optimizer.max_grad_norm}: clipping to a global norm needs every "
               "gradient before the first update; set optimizer.max_grad_norm=0")
    elif distributed.under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        why = "it runs in one process only"
    if why:
        raise ConfigError(f"optimizer.in_backward=true: {why}", key="optimizer.in_backward")


def train_step(loss_fn: Callable[..., tuple[torch.Tensor, dict]], args_of: Callable[[Any], tuple], micro: list,
               model: Model, opt: Any, opt_state: Any, cfg: Any, step: int, out: Path
               ) -> tuple[torch.Tensor, dict, Model, Any, torch.Tensor, float]:
    """One optimizer step over the micro-batches ``micro``: ``(loss, metric sums, model, opt_state, grad_norm, lr)``.

    ``loss_fn(model, *args_of(batch))`` returns a micro-batch's ``(loss share, metrics)`` (``args_of`` runs just
    before that micro-batch's forward, on the model before this step: a reference computed there sees no update).
    With ``optimizer.in_backward`` the step's one micro-batch runs through :func:`in_backward_step`; otherwise
    :func:`accumulate` then :func:`apply_gradients`, clipped to ``optimizer.max_grad_norm``.
    """
    if cfg.optimizer.in_backward:
        (batch,) = micro  # build_optimizer refused grad_accum > 1
        return in_backward_step(loss_fn, model, opt, opt_state, step, out, *args_of(batch))
    grad_fn = value_and_grad(loss_fn, has_aux=True)
    loss, sums, grads = accumulate(lambda b: grad_fn(model, *args_of(b)), micro)
    model, opt_state, grad_norm, lr = apply_gradients(model, grads, loss, opt, opt_state,
                                                      cfg.optimizer.max_grad_norm, step, out)
    return loss, sums, model, opt_state, grad_norm, lr


def in_backward_step(loss_fn: Callable[..., tuple[torch.Tensor, dict]], model: Model, opt: Any, opt_state: Any,
                     step: int, out: Path, *args: Any) -> tuple[torch.Tensor, dict, Model, Any, torch.Tensor, float]:
    """One step with the optimizer in the backward: ``(loss, metrics, model, opt_state, grad_norm, lr)``.

    ``loss_fn(model, *args)`` returns ``(loss, metrics)``, as for ``value_and_grad(..., has_aux=True)``. Each
    trainable leaf is updated in place (``opt.update`` on that leaf alone) as soon as its gradient is complete,
    and the gradient is dropped, so the step never holds all gradients. A leaf the loss does not reach (an expert
    no token chose) is updated after the backward with a zero gradient, as ``value_and_grad`` gives it. The result
    equals :func:`apply_gradients` without clipping. A non-finite loss stops the run before any update; a
    non-finite gradient stops it in the backward, some leaves already updated (the last checkpoint is intact).
    ``loss`` and ``metrics`` are this process's, detached on the CPU (one micro-batch, one process).
    """
    lr = opt.lr_at(opt_state.count)
    squares, updated = [], set()
    live = {path: t.detach().requires_grad_(True) for path, t in model.trainable_params().items()}

    def update(path: str) -> Callable[[torch.Tensor], None]:
        def hook(leaf: torch.Tensor) -> None:
            grad, leaf.grad = leaf.grad, None
            square = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
            if not torch.isfinite(square):
                _stop_non_finite(f"non-finite gradient of {path}", step, out, updated=True)
            squares.append(square)
            updated.add(path)
            opt.update({path: grad}, optim.restrict(opt_state, [path]), {path: leaf}, inplace=True)
        return hook

    handles = [t.register_post_accumulate_grad_hook(update(path)) for path, t in live.items()]
    try:
        with torch.enable_grad():
            loss, metrics = loss_fn(model.with_params(live), *args)
            if not torch.isfinite(loss):
                _stop_non_finite(f"non-finite loss ({loss.item()})", step, out, updated=False)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for path in [p for p in live if p not in updated]:
            leaf = live[path]
            opt.update({path: torch.zeros_like(leaf)}, optim.restrict(opt_state, [path]), {path: leaf}, inplace=True)
    params = {path: t.detach() for path, t in live.items()}
    grad_norm = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    metrics = {k: v.detach().float().cpu() for k, v in metrics.items()}
    return (loss.detach().cpu(), metrics, model.with_params(params), attrs.evolve(opt_state, count=opt_state.count + 1),
            grad_norm, lr)


def _stop_non_finite(what: str, step: int, out: Path, *, updated: bool) -> None:
    last = run_state.checkpoints(out)
    when = "some parameters were already updated" if updated else "stopped before updating"
    raise run_guard.RunError(f"{what} at step {step + 1}; {when}. Last good checkpoint: "
                             f"{last[-1] if last else 'none'} (lower optimizer.lr?)")


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


def step_record(step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor, state: dict,
                tokens_per_s: float, epoch: int, **metrics: Any) -> dict[str, Any]:
    """The metrics.jsonl line of a step: the program's ``metrics`` between the loss and the common columns."""
    return {"step": step, "loss": loss.item(), **metrics, "lr": lr, "tokens": state["tokens"],
            "tokens_per_s": round(tokens_per_s, 1), "grad_norm": grad_norm.item(), "epoch": epoch}


def save_checkpoint(cfg: Any, step: int, model: Model, opt_state: Any, state: dict, resolved: dict) -> Path:
    """``output_dir/step_N``: the trainable leaves, the optimizer state, ``state`` and the config, atomically;
    only the newest ``keep_last`` kept."""
    return run_state.save_checkpoint(Path(cfg.output_dir), step, model, optim.state_dict(opt_state), state,
                                     to_toml(resolved), cfg.keep_last)


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


def run_summary(state: dict, start_time: float, data_stats: Any, dist: distributed.DistInfo, **extra: Any
                ) -> dict[str, Any]:
    """summary.json's common part: steps, tokens, seconds since ``start_time``, the data's counts, processes."""
    return {"steps": state["step"], "tokens": state["tokens"], "seconds": round(time.perf_counter() - start_time, 1),
            "data": attrs.asdict(data_stats), "processes": dist.world_size, **extra}


def finish(cfg: Any, model: Model, state: dict, resolved: dict, log: MetricsLog, summary: dict, lines: list[str]
           ) -> Path:
    """Rank 0's end of a run: ``output_dir/final`` (:func:`save_final`), metrics closed and plotted, ``lines`` and
    where everything is printed, ``summary.json`` (with the settings a resume changed); then the process group
    is left. Returns the final folder."""
    out = Path(cfg.output_dir)
    if state["extra"].get("config_changes"):
        summary["config_changes"] = state["extra"]["config_changes"]
    final = save_final(cfg, out, model, state, resolved)
    log.close()
    if cfg.log.plot:
        plot_losses(log.records, out / "loss_curve.png")
    lines = [*lines, f"model: {final}   metrics: {out / 'metrics.jsonl'}   loss curve: {out / 'loss_curve.png'}"]
    print("\n".join(lines), flush=True)
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    distributed.teardown()
    return final


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
