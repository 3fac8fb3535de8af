"""`ft-prog run distill`: knowledge distillation of a teacher into a student (offline or on-policy), full or with
adapters.

Read it top to bottom: data, the vocabulary check, where to continue, the student and the teacher, the loop, the
final save. The machinery around the loop (checkpoints, exact resume, lock, preemption, metrics) is sft's
(:mod:`ftprog.programs.training`).

One step (``distill.mode = "offline"``): on the dataset's responses (sft's data formats, packing and masking),
loss = ``(1 - kd_ratio) * CE + kd_ratio * KD``, both means over the response tokens, KD the chosen divergence
between the teacher's and the student's next-token distributions at ``temperature``
(:func:`ftprog.core.distill_loss_sum`: both output layers chunk by chunk, so neither model's full-vocabulary
logits exist for the batch). The teacher is frozen, runs without an autograd graph, and may be quantized (nf4,
int8) or carry a LoRA adapter. Metrics log ``kd_loss`` and ``ce_loss`` beside ``loss``.

``distill.mode = "on_policy"`` (on-policy distillation; generalized KD with ``distill.lambda``): each row's prompt
(its tokens before the first response token) is continued by the student itself, sampled at ``temperature``
(:func:`ftprog.programs.rollouts.sample_completions`, grpo's rollouts: the seed comes from the checkpointed torch
RNG, so a resumed run samples the same); the teacher scores every sampled token and the loss is the mean over the
sampled tokens of the divergence between the two next-token distributions, over the full vocabulary at each
sampled position (the exact per-position divergence, not a one-sample estimate; usually ``reverse_kl``). The
samples are constants: no gradient flows through the sampling (as GKD). A ``lambda`` share of the steps, drawn
from ``seed`` and the step number, are offline steps on the dataset's responses instead. Metrics add
``sampled`` (1 for a step on the student's samples) and ``completion_length``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from ..core import (
    Model, Tokenizer, as_dtype, distill_loss_sum, load_pretrained, load_tokenizer, read_config,
)
from ..core._data import Batch, DataLoader, TokenizedDataset, load_datasets
from ..transforms import load_adapter, quantize
from . import distributed, run_guard, run_state
from .demo_assets import resolve
from .distill_config import DistillConfig
from .rollouts import rollout_rows, sample_completions
from .sft import RESUME_RULES, exact_match
from .training import (
    build_model, build_optimizer, data_config, finish, metrics_log, plan_start, router_metric, router_share,
    run_summary, run_transforms, save_checkpoint, save_or_stop, setup_process, step_record, train_step,
    with_router_loss,
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


def step_loss(model: Model, teacher: Model, cfg: DistillConfig, batch: Any, num_targets: int, aux_share: float = 0.0,
              sampled: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, {"kd_loss": KD sum, "ce_loss": CE sum})``: this micro-batch's share of the step's mean loss over all
    targets, and its detached sums; for a mixture-of-experts student plus ``aux_share`` times the router's
    load-balancing loss (``aux_loss`` in the metrics). The loss is ``(1 - kd_ratio) * CE + kd_ratio * KD`` on
    dataset responses, the KD alone on the student's own samples (``sampled``)."""
    d = cfg.distill

    def loss(student: Model) -> tuple[torch.Tensor, dict]:
        kd, ce = distill_loss_sum(student, teacher, batch.tokens, batch.targets, kind=d.divergence,
                                  temperature=d.temperature, beta=d.beta, **batch.model_kwargs())
        mixed = kd if sampled else (1 - d.kd_ratio) * ce + d.kd_ratio * kd
        return mixed / num_targets, {"kd_loss": kd.detach(), "ce_loss": ce.detach()}

    return with_router_loss(loss, model, batch.attention_mask, aux_share)


def trains_on_samples(cfg: DistillConfig, step: int) -> bool:
    """Whether step ``step`` (0-based) trains on the student's samples: never offline; on-policy all but a
    ``distill.lambda`` share of the steps, drawn from ``seed`` and ``step`` (the same on every rank and on resume)."""
    d = cfg.distill
    if d.mode == "offline":
        return False
    draw = torch.rand((), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)).item()
    return draw >= d.lambda_


def row_prompts(batch: Batch) -> tuple[list[list[int]], list[bool]]:
    """``(prompts, has_response)`` of a padded batch of dataset rows: each row's tokens up to the one before its
    first response token (where the student continues), or the whole row when it has no response token left."""
    prompts, has_response = [], []
    for tokens, targets, mask in zip(batch.tokens.tolist(), batch.targets.tolist(), batch.attention_mask.tolist()):
        first = next((i for i, t in enumerate(targets) if t != -100), None)
        prompts.append(tokens[: sum(mask) if first is None else first + 1])
        has_response.append(first is not None)
    return prompts, has_response


def sample_rows(student: Model, batch: Batch, cfg: DistillConfig, sample: dict[str, Any]) -> Batch:
    """The student's own completions of ``batch``'s prompts (:func:`row_prompts`) as training rows: a padded
    :class:`Batch` on the batch's device whose targets are the sampled tokens (none for a row without a
    response). ``sample``: :func:`~ftprog.programs.generate.generate`'s ``stop_ids``, ``pad_id``, ``all_steps``."""
    prompts, has_response = row_prompts(batch)
    completions, logps = sample_completions(student, prompts, temperature=cfg.distill.temperature,
                                            max_new_tokens=cfg.distill.max_new_tokens, **sample)
    tokens, targets, mask, _ = rollout_rows(prompts, completions, logps, has_response, sample["pad_id"])
    count = int((targets != -100).sum())
    device = batch.tokens.device
    return Batch(tokens.to(device), targets.to(device), mask.to(device), None, count, int(mask.sum()), count)


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
    student_config = read_config(model_path)
    read_config(teacher_path)
    tokenizer = load_tokenizer(model_path)
    check_same_vocabulary(tokenizer, load_tokenizer(teacher_path))
    on_policy = _check_on_policy(cfg, student_config)
    data_cfg = data_config(cfg)
    train_data, val_data = load_datasets(data_cfg, tokenizer)
    packing = cfg.packing and not on_policy  # on-policy: one sample per row, its prompt where the student continues
    loader = DataLoader(train_data, cfg.batch_size, packing=packing, seq_len=cfg.seq_len, seed=cfg.seed,
                        rank=dist.rank, world_size=dist.world_size, fixed_shape=packing and cfg.compile)
    run_batches = None if cfg.max_steps else loader.total_batches(cfg.epochs)
    total_steps = cfg.max_steps or math.ceil(run_batches / cfg.grad_accum)
    say(f"data: {train_data.stats.summary()}; {total_steps} steps of {cfg.grad_accum} x {cfg.batch_size}"
        f"{' packed' if packing else ''} rows" + (f", the student's own completions on all but a "
                                                  f"{cfg.distill.lambda_:g} share of the steps" if on_policy else ""),
        flush=True)

    # 2. Where to continue, decided before anything is loaded or deleted.
    fingerprint = run_guard.data_fingerprint(train_data)
    start = plan_start(cfg, resolved, fingerprint, RESUME_RULES, total_steps,
                       sources=[model_path, teacher_path, cfg.teacher.adapter or None, data_cfg.path,
                                data_cfg.val_path])

    # 3. Student (sft's transforms), optimizer, and the frozen teacher.
    # the optimizer first: a refused optimizer setting fails before any weights load
    opt = build_optimizer(cfg, total_steps, say)
    base, model = build_model(cfg, device, dist.mesh, say)
    opt_state = opt.init(model.trainable_params())
    teacher = build_teacher(cfg, device, dist.mesh)
    stop_ids, pad_id = sorted(tokenizer.stop_ids), train_data.pad_id
    sample = {"stop_ids": stop_ids, "pad_id": pad_id, "all_steps": dist.distributed}

    # 4. Only now is anything removed; 5. resume.
    start.clear(dist, say)
    model, opt_state, state = start.restore(model, base, opt, opt_state, loader, say)
    state["data_fingerprint"] = fingerprint
    log = metrics_log(cfg, resolved, state, total_steps, dist)
    if cfg.exact_match_samples and val_data is not None and "exact_match_before" not in state["extra"]:
        state["extra"]["exact_match_before"] = exact_match(model, val_data, cfg.exact_match_samples,
                                                           cfg.max_new_tokens, stop_ids, pad_id)
        log.write(f"student exact match before training: {state['extra']['exact_match_before']:.1%}")

    def save(step: int) -> Path:
        return save_checkpoint(cfg, step, model, opt_state, state, resolved)

    # 6. The loop.
    batches = loader.forever()
    start_time, start_tokens = time.perf_counter(), state["tokens"]
    step = state["step"]
    clock = run_guard.SaveClock(cfg.save_every_minutes, is_main=dist.is_main)
    with run_guard.stop_between_steps() as stop_request:
        while step < total_steps:
            accum = cfg.grad_accum if run_batches is None else min(cfg.grad_accum, run_batches - step * cfg.grad_accum)
            micro = [next(batches).to(device) for _ in range(accum)]
            sampled = trains_on_samples(cfg, step)
            if sampled:  # the student continues the prompts; the teacher scores its tokens in the loss
                micro = [sample_rows(model, b, cfg, sample) for b in micro]
                num_targets = max(int(distributed.all_sum(sum(b.num_targets for b in micro))), 1)
            else:
                num_targets = max(sum(b.global_num_targets for b in micro), 1)  # over all ranks: exact global mean
            share = router_share(model, len(micro), dist.world_size)
            loss, sums, model, opt_state, grad_norm, lr = train_step(  # the teacher: frozen, no update hooks
                step_loss, lambda b: (teacher, cfg, b, num_targets, share, sampled), micro, model, opt, opt_state,
                cfg, step, out)
            step += 1
            state.update(step=step, tokens=state["tokens"] + distributed.all_sum(sum(b.num_tokens for b in micro)),
                         loader=loader.state_dict())
            if step % cfg.log.every == 0 or step == total_steps:
                speed = (state["tokens"] - start_tokens) / (time.perf_counter() - start_time)
                router = router_metric(sums, len(micro), dist.world_size)
                means = {k: distributed.all_sum(v).item() / num_targets for k, v in sorted(sums.items())}
                if on_policy:
                    means["sampled"] = int(sampled)
                    if sampled:
                        rows = distributed.all_sum(sum(len(b.tokens) for b in micro))
                        means["completion_length"] = num_targets / rows
                record = step_record(step, loss, lr, grad_norm, state, speed, loader.epoch, **means, **router)
                log.log(record)
                log.progress(step, loss=loss.item(), kd=record["kd_loss"], lr=lr, tok_s=round(speed))
            if val_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                log.log({"step": step, **_prefixed(evaluate(model, teacher, cfg, val_data, device))})
            save_or_stop(cfg, step, total_steps, stop_request, clock, save, log, say)

    # 7. Final evaluation (every rank: the teacher stays sharded) and outputs (rank 0, on the gathered model).
    d = cfg.distill
    summary = run_summary(state, start_time, train_data.stats, dist, mode=d.mode, divergence=d.divergence,
                          kd_ratio=d.kd_ratio, **({"lambda": d.lambda_} if on_policy else {}))
    if val_data is not None:
        summary["val"] = evaluate(model, teacher, cfg, val_data, device)
    model = run_state.consolidate(model)
    if not dist.is_main:
        distributed.teardown()
        return out / "final"
    lines = [f"done: {step} steps, {state['tokens']} tokens in {summary['seconds']} s"]
    if val_data is not None:
        log.log({"step": step, **_prefixed(summary["val"])})
        lines.append("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["val"].items()))
    if cfg.exact_match_samples and val_data is not None:
        summary["exact_match_before"] = state["extra"]["exact_match_before"]
        summary["exact_match_after"] = exact_match(model, val_data, cfg.exact_match_samples, cfg.max_new_tokens,
                                                   stop_ids, pad_id)
        lines.append(f"student exact match on {cfg.exact_match_samples} held-out samples: "
                     f"{summary['exact_match_before']:.1%} before -> {summary['exact_match_after']:.1%} after")
    return finish(cfg, model, state, resolved, log, summary, lines)


def _check_on_policy(cfg: DistillConfig, student: Any) -> bool:
    """Whether the run is on-policy; refuses keys that mean nothing in its mode and samples that cannot fit."""
    d = cfg.distill
    if d.mode == "offline":
        if d.lambda_:
            raise run_guard.RunError(f"distill.lambda = {d.lambda_} mixes dataset responses into on-policy steps: "
                                     "it needs distill.mode = 'on_policy'")
        return False
    if cfg.seq_len + d.max_new_tokens > student.max_position_embeddings:
        raise run_guard.RunError(f"seq_len ({cfg.seq_len}) + distill.max_new_tokens ({d.max_new_tokens}) exceeds the "
                                 f"student's context ({student.max_position_embeddings} positions): a prompt and "
                                 "its sampled completion must fit")
    return True


def _val_loader(data: TokenizedDataset, cfg: DistillConfig) -> DataLoader:
    return DataLoader(data, cfg.batch_size, packing=cfg.packing, seq_len=cfg.seq_len, shuffle=False,
                      fixed_shape=cfg.packing and cfg.compile)


def _prefixed(result: dict[str, float]) -> dict[str, float]:
    return {f"val_{k}": v for k, v in result.items()}
