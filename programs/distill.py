"""`ft-prog run distill`: offline knowledge distillation of a teacher into a student, full or with adapters.

Read it top to bottom: data, the vocabulary check, where to continue, the student and the teacher, the loop, the
final save. The machinery around the loop (checkpoints, exact resume, lock, preemption, metrics) is sft's
(:mod:`ftprog.programs.training`).

One step (``distill.mode = "offline"``): on the dataset's responses (sft's data formats, packing and masking),
loss = ``(1 - kd_ratio) * CE + kd_ratio * KD``, both means over the response tokens, KD the chosen divergence
between the teacher's and the student's next-token distributions at ``temperature``
(:func:`ftprog.core.distill_loss_sum`: both output layers chunk by chunk, so neither model's full-vocabulary
logits exist for the batch). The teacher is frozen, runs without an autograd graph, and may be quantized (nf4,
int8) or carry a LoRA adapter. Metrics log ``kd_loss`` and ``ce_loss`` beside ``loss``.

``distill.mode = "on_policy"`` (the student samples, the teacher scores the samples) is not implemented yet; the
config refuses it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from ..core import (
    Model, Tokenizer, as_dtype, distill_loss_sum, load_pretrained, load_tokenizer, optim, read_config,
    value_and_grad,
)
from ..core._data import DataConfig, DataLoader, TokenizedDataset, load_datasets
from ..transforms import load_adapter, quantize
from . import distributed, run_guard, run_state
from .config import to_toml
from .demo_assets import resolve
from .distill_config import DistillConfig
from .metrics import MetricsLog, plot_losses
from .sft import RESUME_RULES, exact_match
from .training import (
    apply_gradients, build_model, build_optimizer, plan_start, run_transforms, save_final, save_or_stop,
    setup_process,
)

CONFIG = DistillConfig

PROBE = "Knowledge distillation: 12 + 30 = 42; naïve café ünïcödé 日本語 <tag> \n\t end."
"""Text both tokenizers must encode to the same ids (letters, digits, spaces, non-ASCII, markup)."""


def check_same_vocabulary(student: Tokenizer, teacher: Tokenizer) -> None:
    """Raise :class:`RunError` naming both tokenizer folders unless they give the same ids for :data:`PROBE` and
    the same special tokens (names, texts, ids)."""
    problems = []
    if student.encode(PROBE) != teacher.encode(PROBE):
        problems.append("they encode the same text to different ids")
    s_special, t_special = _special_ids(student), _special_ids(teacher)
    if s_special != t_special:
        differ = sorted(k for k in s_special.keys() | t_special.keys() if s_special.get(k) != t_special.get(k))
        problems.append("their special tokens differ (" + "; ".join(
            f"{k}: {s_special.get(k)} vs {t_special.get(k)}" for k in differ) + ")")
    if problems:
        raise run_guard.RunError(f"the student's tokenizer ({student.source}) and the teacher's ({teacher.source}) "
                                 f"do not share a vocabulary: {' and '.join(problems)}; distillation compares "
                                 "their next-token distributions id by id, so both must use the same tokenizer")


def _special_ids(tok: Tokenizer) -> dict[str, Any]:
    """``{name: (text, ids)}`` of the named special tokens, plus the stop ids."""
    named = {name: (text, tuple(tok.encode(text))) for name, text in tok.special_tokens.items()}
    return {**named, "stop ids": tuple(sorted(tok.stop_ids))}


def build_teacher(cfg: DistillConfig, device: torch.device, mesh: Any = None) -> Model:
    """The frozen teacher: loaded, quantized (``teacher.quantize``), with its adapter (``teacher.adapter``), then
    sharded / compiled as the student is (never checkpointed: it keeps no activations)."""
    t = cfg.teacher
    teacher = load_pretrained(resolve(t.path), dtype=as_dtype(cfg.dtype), device=device)
    if t.quantize:
        teacher = quantize(teacher, t.quantize, skip_unsupported=True)
    if t.adapter:
        teacher = load_adapter(teacher, t.adapter)
    teacher = teacher.replace(trainable=frozenset())
    return run_transforms(attrs.evolve(cfg, activation_checkpointing=False), teacher, mesh)


def step_loss(model: Model, teacher: Model, cfg: DistillConfig, batch: Any, num_targets: int
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(loss, (KD sum, CE sum))``: this micro-batch's share of the step's mean loss over all targets, and its
    detached sums."""
    d = cfg.distill
    kd, ce = distill_loss_sum(model, teacher, batch.tokens, batch.targets, kind=d.divergence,
                              temperature=d.temperature, beta=d.beta, **batch.model_kwargs())
    loss = ((1 - d.kd_ratio) * ce + d.kd_ratio * kd) / num_targets
    return loss, (kd.detach(), ce.detach())


@torch.no_grad()
def evaluate(model: Model, teacher: Model, cfg: DistillConfig, data: TokenizedDataset, device: torch.device
             ) -> dict[str, float]:
    """Held-out means over every response token: ``loss``, ``kd_loss``, ``ce_loss``."""
    d = cfg.distill
    kd = ce = 0.0
    count = 0
    for b in _val_loader(data, cfg):
        b = b.to(device)
        part_kd, part_ce = distill_loss_sum(model, teacher, b.tokens, b.targets, kind=d.divergence,
                                            temperature=d.temperature, beta=d.beta, training=False,
                                            **b.model_kwargs())
        kd, ce, count = kd + part_kd.item(), ce + part_ce.item(), count + b.num_targets
    kd, ce = kd / max(count, 1), ce / max(count, 1)
    return {"loss": (1 - d.kd_ratio) * ce + d.kd_ratio * kd, "kd_loss": kd, "ce_loss": ce}


def run(cfg: DistillConfig, resolved: dict[str, Any]) -> Path:
    dist = distributed.setup()  # one process, or one rank of a torchrun job (`ft-prog run distill --nproc N`)
    with run_guard.exclusive_output_dir(Path(cfg.output_dir), enabled=dist.is_main):  # one run per output_dir
        return _train(cfg, resolved, dist)


def _train(cfg: DistillConfig, resolved: dict[str, Any], dist: distributed.DistInfo) -> Path:
    out = Path(cfg.output_dir)
    device, say = setup_process(cfg, dist)

    # 1. Data and the vocabulary check first: a bad file or a mismatched teacher fails before any weights load.
    model_path, teacher_path = resolve(cfg.model.path), resolve(cfg.teacher.path)
    if not cfg.teacher.path:
        raise run_guard.RunError("teacher.path is empty: name the teacher's model folder")
    read_config(model_path)
    read_config(teacher_path)
    tokenizer = load_tokenizer(model_path)
    check_same_vocabulary(tokenizer, load_tokenizer(teacher_path))
    d = cfg.data
    data_cfg = DataConfig(path=resolve(d.path), format=d.format, split=d.split, columns=d.columns,
                          template=d.template, system_prompt=d.system_prompt or None,
                          train_on_input=d.train_on_input, fold_system=d.fold_system, val_path=d.val_path or None,
                          val_split=d.val_split, val_fraction=d.val_fraction, skip_bad=d.skip_bad,
                          seq_len=cfg.seq_len, seed=cfg.seed)
    train_data, val_data = load_datasets(data_cfg, tokenizer)
    loader = DataLoader(train_data, cfg.batch_size, packing=cfg.packing, seq_len=cfg.seq_len, seed=cfg.seed,
                        rank=dist.rank, world_size=dist.world_size, fixed_shape=cfg.packing and cfg.compile)
    run_batches = None if cfg.max_steps else loader.total_batches(cfg.epochs)
    total_steps = cfg.max_steps or math.ceil(run_batches / cfg.grad_accum)
    say(f"data: {train_data.stats.summary()}; {total_steps} steps of {cfg.grad_accum} x {cfg.batch_size}"
        f"{' packed' if cfg.packing else ''} rows", flush=True)

    # 2. Where to continue, decided before anything is loaded or deleted.
    fingerprint = run_guard.data_fingerprint(train_data)
    start = plan_start(cfg, resolved, fingerprint, RESUME_RULES, total_steps,
                       sources=[model_path, teacher_path, cfg.teacher.adapter or None, data_cfg.path,
                                data_cfg.val_path])

    # 3. Student (sft's transforms), optimizer, and the frozen teacher.
    base, model = build_model(cfg, device, dist.mesh)
    opt = build_optimizer(cfg, total_steps, say)
    opt_state = opt.init(model.trainable_params())
    teacher = build_teacher(cfg, device, dist.mesh)
    stop_ids, pad_id = sorted(tokenizer.stop_ids), train_data.pad_id

    # 4. Only now is anything removed; 5. resume.
    start.clear(dist, say)
    model, opt_state, state = start.restore(model, base, opt, opt_state, loader, say)
    state["data_fingerprint"] = fingerprint
    log = MetricsLog(out, total_steps=total_steps, start_step=state["step"], progress=cfg.log.progress,
                     tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                     config=resolved, enabled=dist.is_main)
    if cfg.exact_match_samples and val_data is not None and "exact_match_before" not in state["extra"]:
        state["extra"]["exact_match_before"] = exact_match(model, val_data, cfg.exact_match_samples,
                                                           cfg.max_new_tokens, stop_ids, pad_id)
        log.write(f"student exact match before training: {state['extra']['exact_match_before']:.1%}")

    def save(step: int) -> Path:
        return run_state.save_checkpoint(out, step, model, optim.state_dict(opt_state), state,
                                         to_toml(resolved), cfg.keep_last)

    # 6. The loop.
    grad_fn = value_and_grad(step_loss, has_aux=True)
    batches = loader.forever()
    start_time, start_tokens = time.perf_counter(), state["tokens"]
    step = state["step"]
    clock = run_guard.SaveClock(cfg.save_every_minutes, is_main=dist.is_main)
    with run_guard.stop_between_steps() as stop_request:
        while step < total_steps:
            accum = cfg.grad_accum if run_batches is None else min(cfg.grad_accum, run_batches - step * cfg.grad_accum)
            micro = [next(batches).to(device) for _ in range(accum)]
            num_targets = max(sum(b.global_num_targets for b in micro), 1)  # over all ranks: exact global mean
            loss, kd, ce, grads = torch.zeros(()), torch.zeros(()), torch.zeros(()), None
            for b in micro:
                (part, (part_kd, part_ce)), g = grad_fn(model, teacher, cfg, b, num_targets)
                loss, kd, ce = loss + part.cpu(), kd + part_kd.cpu(), ce + part_ce.cpu()
                grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
            loss = distributed.all_sum(loss)
            model, opt_state, grad_norm, lr = apply_gradients(model, grads, loss, opt, opt_state,
                                                              cfg.optimizer.max_grad_norm, step, out)
            step += 1
            state.update(step=step, tokens=state["tokens"] + distributed.all_sum(sum(b.num_tokens for b in micro)),
                         loader=loader.state_dict())
            if step % cfg.log.every == 0 or step == total_steps:
                speed = (state["tokens"] - start_tokens) / (time.perf_counter() - start_time)
                record = {"step": step, "loss": loss.item(),
                          "kd_loss": distributed.all_sum(kd).item() / num_targets,
                          "ce_loss": distributed.all_sum(ce).item() / num_targets, "lr": lr,
                          "tokens": state["tokens"], "tokens_per_s": round(speed, 1), "grad_norm": grad_norm.item(),
                          "epoch": loader.epoch}
                log.log(record)
                log.progress(step, loss=loss.item(), kd=record["kd_loss"], lr=lr, tok_s=round(speed))
            if val_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                log.log({"step": step, **_prefixed(evaluate(model, teacher, cfg, val_data, device))})
            save_or_stop(cfg, step, total_steps, stop_request, clock, save, log, say)

    # 7. Final evaluation and outputs (rank 0, on the gathered model).
    model = run_state.consolidate(model)
    if not dist.is_main:
        distributed.teardown()
        return out / "final"
    summary = {"steps": step, "tokens": state["tokens"], "seconds": round(time.perf_counter() - start_time, 1),
               "data": attrs.asdict(train_data.stats), "processes": dist.world_size,
               "divergence": cfg.distill.divergence, "kd_ratio": cfg.distill.kd_ratio}
    if state["extra"].get("config_changes"):
        summary["config_changes"] = state["extra"]["config_changes"]
    lines = [f"done: {step} steps, {state['tokens']} tokens in {summary['seconds']} s"]
    if val_data is not None:
        summary["val"] = evaluate(model, teacher, cfg, val_data, device)
        log.log({"step": step, **_prefixed(summary["val"])})
        lines.append("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["val"].items()))
    if cfg.exact_match_samples and val_data is not None:
        summary["exact_match_before"] = state["extra"]["exact_match_before"]
        summary["exact_match_after"] = exact_match(model, val_data, cfg.exact_match_samples, cfg.max_new_tokens,
                                                   stop_ids, pad_id)
        lines.append(f"student exact match on {cfg.exact_match_samples} held-out samples: "
                     f"{summary['exact_match_before']:.1%} before -> {summary['exact_match_after']:.1%} after")
    final = save_final(cfg, out, model, state, resolved)
    log.close()
    if cfg.log.plot:
        plot_losses(log.records, out / "loss_curve.png")
    lines.append(f"model: {final}   metrics: {out / 'metrics.jsonl'}   loss curve: {out / 'loss_curve.png'}")
    print("\n".join(lines), flush=True)
    import orjson

    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    distributed.teardown()
    return final


def _val_loader(data: TokenizedDataset, cfg: DistillConfig) -> DataLoader:
    return DataLoader(data, cfg.batch_size, packing=cfg.packing, seq_len=cfg.seq_len, shuffle=False,
                      fixed_shape=cfg.packing and cfg.compile)


def _prefixed(result: dict[str, float]) -> dict[str, float]:
    return {f"val_{k}": v for k, v in result.items()}
