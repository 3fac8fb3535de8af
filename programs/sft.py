"""`ft-prog run sft`: supervised fine-tuning, full or with LoRA / DoRA / QLoRA adapters.

Read it top to bottom: data, model and its transforms, optimizer, resume, the
loop, the final save. The loop never branches on the method: the transforms
decided what the parameter tree holds and which leaves are trainable.

Features: response-only loss (prompt and padding masked), chunked fused
cross-entropy, packing or padding, gradient accumulation normalised by the
number of target tokens, global-norm clipping, AdamW/SGD with constant,
linear or cosine schedules and warmup, validation loss, exact-match scoring
of greedy answers, metrics.jsonl / TensorBoard / W&B, atomic resumable
checkpoints every ``save_every`` steps and ``save_every_minutes``, exact resume
after a crash (same command; settings that change what the checkpoint means
must match), one run per output_dir (a lock), Ctrl-C, SIGTERM and SIGUSR1 save
at the end of the step and exit (code 130, 143, 138).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ..core import Model, load_tokenizer, read_config, token_loss_sum
from ..core._data import DataLoader, TokenizedDataset, load_datasets
from . import distributed, run_guard, run_state
from .demo_assets import resolve
from .generate import generate
from .sft_config import SFTConfig
from .training import (
    build_model, build_optimizer, data_config, finish, metrics_log, plan_start, router_metric, router_share,
    run_summary, save_checkpoint, save_or_stop, setup_process, step_record, train_step, with_router_loss,
)

CONFIG = SFTConfig


def step_loss(model: Model, batches: list, num_targets: int, aux_share: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)``: this micro-batch's share of the step's mean loss over all targets, plus, for a mixture
    of experts, ``aux_share`` times its router load-balancing loss (in the metrics as ``aux_loss``)."""
    batch = batches[0]

    def loss(m: Model) -> tuple[torch.Tensor, dict]:
        return token_loss_sum(m, batch.tokens, batch.targets, **batch.model_kwargs()) / num_targets, {}

    return with_router_loss(loss, model, batch.attention_mask, aux_share)


@torch.no_grad()
def validation_loss(model: Model, loader: DataLoader, device: torch.device) -> float:
    total, count = 0.0, 0
    for epoch_batch in DataLoader(loader.dataset, loader.batch_size, packing=loader.packing,
                                  seq_len=loader.seq_len, shuffle=False, fixed_shape=loader.fixed_shape):
        b = epoch_batch.to(device)
        total += token_loss_sum(model, b.tokens, b.targets, training=False, **b.model_kwargs()).item()
        count += b.num_targets
    return total / max(count, 1)


def exact_match(model: Model, data: TokenizedDataset, samples: int, max_new_tokens: int, stop_ids, pad_id) -> float:
    """Share of the first ``samples`` samples whose greedy answer equals the reference tokens exactly."""
    prompts, answers = [], []
    for i in range(min(samples, len(data))):
        ids, mask = data[i]
        start = int(mask.int().argmax())
        end = start + int(mask[start:].int().argmin()) if not mask[start:].all() else len(mask)
        prompts.append(ids[:start].tolist())
        answers.append(ids[start:end].tolist())
    outputs = generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id)
    return sum(o == a for o, a in zip(outputs, answers)) / max(len(prompts), 1)


RESUME_RULES = run_guard.ResumeRules(
    may_change=("max_steps", "epochs", "save_every", "save_every_minutes", "keep_last", "log", "eval_every",
                "exact_match_samples", "max_new_tokens", "threads", "compile", "activation_checkpointing",
                "fuse_projections", "activation_offloading", "output_dir"),
    not_compared=("resume", "resume_allow_changes"),
)
"""Settings a resumed run may change (the change is printed and recorded). Any other one (model, data and its
content, peft.*, dtype, seq_len, packing, batch_size, grad_accum, optimizer.*, seed, ...) changes what the saved
state means: a difference is refused unless listed in ``resume_allow_changes``."""


def run(cfg: SFTConfig, resolved: dict[str, Any]) -> Path:
    dist = distributed.setup()  # one process, or one rank of a torchrun job (`ft-prog run --nproc N`)
    with run_guard.exclusive_output_dir(Path(cfg.output_dir), enabled=dist.is_main):  # one run per output_dir
        return _train(cfg, resolved, dist)


def _train(cfg: SFTConfig, resolved: dict[str, Any], dist: distributed.DistInfo) -> Path:
    out = Path(cfg.output_dir)
    device, say = setup_process(cfg, dist)

    # 1. Data first: a bad file fails before any weights load.
    model_path = resolve(cfg.model.path)
    read_config(model_path)  # a missing or broken model folder is named as such
    tokenizer = load_tokenizer(model_path)
    data_cfg = data_config(cfg)
    train_data, val_data = load_datasets(data_cfg, tokenizer)
    # compiled and packed: every batch one shape (the last one filled up with empty rows), so one compile
    loader = DataLoader(train_data, cfg.batch_size, packing=cfg.packing, seq_len=cfg.seq_len, seed=cfg.seed,
                        rank=dist.rank, world_size=dist.world_size, fixed_shape=cfg.packing and cfg.compile)
    # max_steps=0: `epochs` epochs, whose last step takes only the batches left (none of the next epoch's)
    run_batches = None if cfg.max_steps else loader.total_batches(cfg.epochs)
    total_steps = cfg.max_steps or math.ceil(run_batches / cfg.grad_accum)
    say(f"data: {train_data.stats.summary()}; {total_steps} steps of {cfg.grad_accum} x {cfg.batch_size}"
          f"{' packed' if cfg.packing else ''} rows", flush=True)

    # 2. Where to continue, decided before anything is loaded or deleted: the newest intact checkpoint, whose
    # settings and data must be this run's (resume=false: none; the earlier run's checkpoints go in step 4).
    fingerprint = run_guard.data_fingerprint(train_data)
    start = plan_start(cfg, resolved, fingerprint, RESUME_RULES, total_steps,
                       sources=[model_path, data_cfg.path, data_cfg.val_path])

    # 3. Model and transforms; optimizer over the trainable leaves.
    # the optimizer first: a refused optimizer setting fails before any weights load
    opt = build_optimizer(cfg, total_steps, say)
    base, model = build_model(cfg, device, dist.mesh, say)
    opt_state = opt.init(model.trainable_params())
    stop_ids, pad_id = sorted(tokenizer.stop_ids), train_data.pad_id

    # 4. Only now is anything removed: what interrupted saves left, damaged checkpoints, with resume=false the
    # earlier run's checkpoints (else they would outrank this run's).
    start.clear(dist, say)

    # 5. Resume (same command; the changes the rules accept are printed and recorded).
    model, opt_state, state = start.restore(model, base, opt, opt_state, loader, say)
    state["data_fingerprint"] = fingerprint
    log = metrics_log(cfg, resolved, state, total_steps, dist)
    if cfg.exact_match_samples and val_data is not None and "exact_match_before" not in state["extra"]:
        state["extra"]["exact_match_before"] = exact_match(model, val_data, cfg.exact_match_samples,
                                                           cfg.max_new_tokens, stop_ids, pad_id)
        log.write(f"exact match before training: {state['extra']['exact_match_before']:.1%}")

    def save(step: int) -> Path:
        return save_checkpoint(cfg, step, model, opt_state, state, resolved)

    # 6. The loop. Stop signals are acted on between steps, so the checkpoint they save is a consistent one.
    batches = loader.forever()
    start_time, start_tokens = time.perf_counter(), state["tokens"]
    step = state["step"]
    clock = run_guard.SaveClock(cfg.save_every_minutes, is_main=dist.is_main)
    with run_guard.stop_between_steps() as stop_request:
        while step < total_steps:
            accum = cfg.grad_accum if run_batches is None else min(cfg.grad_accum, run_batches - step * cfg.grad_accum)
            micro = [next(batches).to(device) for _ in range(accum)]
            num_targets = max(sum(b.global_num_targets for b in micro), 1)  # over all ranks: exact global mean
            aux_share = router_share(model, len(micro), dist.world_size)
            loss, sums, model, opt_state, grad_norm, lr = train_step(
                step_loss, lambda b: ([b], num_targets, aux_share), micro, model, opt, opt_state, cfg, step, out)
            step += 1
            state.update(step=step, tokens=state["tokens"] + distributed.all_sum(sum(b.num_tokens for b in micro)),
                         loader=loader.state_dict())
            if step % cfg.log.every == 0 or step == total_steps:
                speed = (state["tokens"] - start_tokens) / (time.perf_counter() - start_time)
                log.log(step_record(step, loss, lr, grad_norm, state, speed, loader.epoch,
                                    **router_metric(sums, len(micro), dist.world_size)))
                log.progress(step, loss=loss.item(), lr=lr, tok_s=round(speed))
            if val_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                log.log({"step": step, "val_loss": validation_loss(model, _val_loader(val_data, cfg), device)})
            save_or_stop(cfg, step, total_steps, stop_request, clock, save, log, say)

    # 7. Final evaluation and outputs (rank 0, on the gathered model).
    model = run_state.consolidate(model)
    if not dist.is_main:
        distributed.teardown()
        return out / "final"
    summary = run_summary(state, start_time, train_data.stats, dist)
    if val_data is not None:
        summary["val_loss"] = validation_loss(model, _val_loader(val_data, cfg), device)
        log.log({"step": step, "val_loss": summary["val_loss"]})
    if cfg.exact_match_samples and val_data is not None:
        summary["exact_match_before"] = state["extra"]["exact_match_before"]
        summary["exact_match_after"] = exact_match(model, val_data, cfg.exact_match_samples, cfg.max_new_tokens,
                                                   stop_ids, pad_id)
    return finish(cfg, model, state, resolved, log, summary,
                  _report(summary, model, tokenizer, val_data, cfg, stop_ids, pad_id))


def _val_loader(val_data: TokenizedDataset, cfg: SFTConfig) -> DataLoader:
    return DataLoader(val_data, cfg.batch_size, packing=cfg.packing, seq_len=cfg.seq_len, shuffle=False,
                      fixed_shape=cfg.packing and cfg.compile)


def _report(summary, model, tokenizer, val_data, cfg, stop_ids, pad_id) -> list[str]:
    """The lines the end of a run prints: steps and speed, validation loss, exact match, one sample answer."""
    lines = [f"done: {summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']} s"]
    if "val_loss" in summary:
        lines.append(f"validation loss: {summary['val_loss']:.4f}")
    if "exact_match_after" in summary:
        lines.append(f"exact match on {cfg.exact_match_samples} held-out samples: "
                     f"{summary['exact_match_before']:.1%} before -> {summary['exact_match_after']:.1%} after")
    if val_data is not None and len(val_data):
        ids, mask = val_data[0]
        prompt = ids[: int(mask.int().argmax())].tolist()
        answer = generate(model, [prompt], max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids, pad_id=pad_id)[0]
        lines.append(f"sample: {tokenizer.decode(prompt)!r} -> {tokenizer.decode(answer)!r}")
    return lines
