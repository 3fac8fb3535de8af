"""`ft-prog run sft`: supervised fine-tuning, full or with LoRA / DoRA / QLoRA adapters.

Read it top to bottom: data, model and its transforms, optimizer, resume, the
loop, the final save. The loop never branches on the method: the transforms
decided what the parameter tree holds and which leaves are trainable.

Features: response-only loss (prompt and padding masked), chunked fused
cross-entropy, packing or padding, gradient accumulation normalised by the
number of target tokens, global-norm clipping, AdamW/SGD with constant,
linear or cosine schedules and warmup, validation loss, exact-match scoring
of greedy answers, metrics.jsonl / TensorBoard / W&B, atomic resumable
checkpoints every ``save_every`` steps, exact resume after a crash (same
command), Ctrl-C saves at the end of the step and exits (code 130).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from ftprog.core import (
    Model, as_dtype, load_pretrained, load_tokenizer, optim, reuse_freed_memory, token_loss_sum, value_and_grad,
)
from ftprog.core._data import DataConfig, DataLoader, TokenizedDataset, load_datasets
from ftprog.programs import distributed, run_state
from ftprog.programs.config import to_toml
from ftprog.programs.demo_assets import resolve
from ftprog.programs.generate import generate
from ftprog.programs.metrics import MetricsLog, plot_losses
from ftprog.programs.sft_config import SFTConfig
from ftprog.transforms import checkpoint, compile, lora, merge, quantize, shard, trainable

CONFIG = SFTConfig


def build_model(cfg: SFTConfig, device: torch.device, mesh: Any = None) -> tuple[Model, Model]:
    """``(base, model)``: the loaded (and for QLoRA quantized) base, and the model to train.

    Transform order: quantize -> lora -> checkpoint -> shard (over ``mesh``, several processes) -> compile.
    """
    base = load_pretrained(resolve(cfg.model.path), dtype=as_dtype(cfg.dtype), device=device)
    method = cfg.peft.method
    if method == "qlora":
        base = quantize(base, "nf4")
    if method == "none":
        model = trainable(base)
    else:
        model = lora(base, rank=cfg.peft.rank, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                     targets=tuple(cfg.peft.targets), dora=method == "dora", rslora=cfg.peft.rslora, seed=cfg.seed)
    if cfg.activation_checkpointing:
        model = checkpoint(model)
    if mesh is not None:
        model = shard(model, mesh)
    if cfg.compile:
        model = compile(model)
    return base, model


def build_optimizer(cfg: SFTConfig, total_steps: int) -> Any:
    o = cfg.optimizer
    schedule = optim.schedule_by_name(o.schedule, o.lr, total_steps, o.warmup_steps)
    if o.name == "sgd":
        return optim.sgd(schedule, momentum=o.momentum, weight_decay=o.weight_decay, state_dtype=o.state_dtype)
    return optim.adamw(schedule, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                       state_dtype=o.state_dtype)


def clip_gradients(grads: dict, max_norm: float) -> tuple[dict, torch.Tensor]:
    """``(grads clipped to global norm max_norm (0: not clipped), their global norm before clipping)``.

    The grads are scaled in place: they are this step's own tensors from ``value_and_grad``.
    """
    if max_norm > 0:
        return optim.clip_by_global_norm(grads, max_norm, inplace=True)
    return grads, torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads.values()]))


def step_loss(model: Model, batches: list, num_targets: int) -> torch.Tensor:
    """Mean loss over the targets of all micro-batches of a step (this micro-batch's share)."""
    batch = batches[0]
    return token_loss_sum(model, batch.tokens, batch.targets, **batch.model_kwargs()) / num_targets


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


def run(cfg: SFTConfig, resolved: dict[str, Any]) -> Path:
    out = Path(cfg.output_dir)
    dist = distributed.setup()  # one process, or one rank of a torchrun job (`ft-prog run --nproc N`)
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed + dist.rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":  # the next step reuses what this one frees, as CUDA's caching allocator does
        reuse_freed_memory()
    say = print if dist.is_main else (lambda *args, **kwargs: None)

    # 1. Data first: a bad file fails before any weights load.
    model_path = resolve(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    d = cfg.data
    data_cfg = DataConfig(path=resolve(d.path), format=d.format, split=d.split, columns=d.columns,
                          template=d.template, system_prompt=d.system_prompt or None,
                          train_on_input=d.train_on_input, val_path=d.val_path or None, val_split=d.val_split,
                          val_fraction=d.val_fraction, skip_bad=d.skip_bad, seq_len=cfg.seq_len, seed=cfg.seed)
    train_data, val_data = load_datasets(data_cfg, tokenizer)
    # compiled and packed: every batch one shape (the last one filled up with empty rows), so one compile
    loader = DataLoader(train_data, cfg.batch_size, packing=cfg.packing, seq_len=cfg.seq_len, seed=cfg.seed,
                        rank=dist.rank, world_size=dist.world_size, fixed_shape=cfg.packing and cfg.compile)
    total_steps = cfg.max_steps or math.ceil(loader.total_batches(cfg.epochs) / cfg.grad_accum)
    say(f"data: {train_data.stats.summary()}; {total_steps} steps of {cfg.grad_accum} x {cfg.batch_size}"
          f"{' packed' if cfg.packing else ''} rows", flush=True)

    # 2. Model and transforms; 3. optimizer over the trainable leaves.
    base, model = build_model(cfg, device, dist.mesh)
    opt = build_optimizer(cfg, total_steps)
    opt_state = opt.init(model.trainable_params())
    stop_ids, pad_id = sorted(tokenizer.stop_ids), train_data.pad_id

    # 4. Resume from the newest complete checkpoint (same command, same config); resume=false starts over.
    state = {"step": 0, "tokens": 0, "loader": loader.state_dict(), "extra": {}}
    found = run_state.checkpoints(out)
    if dist.is_main:
        for partial in run_state.remove_partial(out):
            say(f"removed {partial.name}: an incomplete checkpoint of an interrupted save", flush=True)
    distributed.barrier()
    if found and not cfg.resume:
        say(f"resume=false: removing the earlier run's checkpoints {', '.join(p.name for p in found)}", flush=True)
        for old in found if dist.is_main else []:  # else they would outrank this run's checkpoints
            shutil.rmtree(old)
        distributed.barrier()
        found = []
    if found:
        model, saved_opt, state = run_state.load_checkpoint(found[-1], model, base, optim.state_dict(opt_state))
        opt_state = optim.load_state_dict(opt, model.trainable_params(), saved_opt)
        loader.load_state_dict(state["loader"])
        say(f"resumed from {found[-1]} (step {state['step']})", flush=True)
    log = MetricsLog(out, total_steps=total_steps, start_step=state["step"], progress=cfg.log.progress,
                     tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                     config=resolved, enabled=dist.is_main)
    if cfg.exact_match_samples and val_data is not None and "exact_match_before" not in state["extra"]:
        state["extra"]["exact_match_before"] = exact_match(model, val_data, cfg.exact_match_samples,
                                                           cfg.max_new_tokens, stop_ids, pad_id)
        log.write(f"exact match before training: {state['extra']['exact_match_before']:.1%}")

    def save(step: int) -> Path:
        return run_state.save_checkpoint(out, step, model, optim.state_dict(opt_state), state,
                                         to_toml(resolved), cfg.keep_last)

    # 5. The loop. Ctrl-C is acted on between steps, so the checkpoint it saves is a consistent one.
    grad_fn = value_and_grad(step_loss)
    batches = loader.forever()
    start_time, start_tokens = time.perf_counter(), state["tokens"]
    step = state["step"]
    with _interrupt_between_steps() as interrupted:
        while step < total_steps:
            micro = [next(batches).to(device) for _ in range(cfg.grad_accum)]
            num_targets = max(sum(b.global_num_targets for b in micro), 1)  # over all ranks: exact global mean
            loss, grads = torch.zeros(()), None
            for b in micro:
                part, g = grad_fn(model, [b], num_targets)
                loss = loss + part.cpu()
                grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
            loss = distributed.all_sum(loss)  # each rank holds its share of the global mean
            grads, grad_norm = clip_gradients(grads, cfg.optimizer.max_grad_norm)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                last = run_state.checkpoints(out)
                raise RuntimeError(f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at step "
                                   f"{step + 1}; stopped before updating. Last good checkpoint: "
                                   f"{last[-1] if last else 'none'} (lower optimizer.lr?)")
            lr = opt.lr_at(opt_state.count)
            # in place: the program owns these tensors, and a functional copy would cost params-sized memory
            params, opt_state = opt.update(grads, opt_state, model.trainable_params(), inplace=True)
            model = model.with_params(params)
            step += 1
            state.update(step=step, tokens=state["tokens"] + distributed.all_sum(sum(b.num_tokens for b in micro)),
                         loader=loader.state_dict())
            if step % cfg.log.every == 0 or step == total_steps:
                speed = (state["tokens"] - start_tokens) / (time.perf_counter() - start_time)
                log.log({"step": step, "loss": loss.item(), "lr": lr, "tokens": state["tokens"],
                         "tokens_per_s": round(speed, 1), "grad_norm": grad_norm.item(), "epoch": loader.epoch})
                log.progress(step, loss=loss.item(), lr=lr, tok_s=round(speed))
            if val_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                log.log({"step": step, "val_loss": validation_loss(model, _val_loader(val_data, cfg), device)})
            stop = distributed.any_rank(interrupted()) and step < total_steps
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps or stop:
                where = save(step)
            if stop:
                log.close()
                say(f"\ninterrupted: saved {where} (step {step}); run the same command to resume", file=sys.stderr)
                raise SystemExit(130)

    # 6. Final evaluation and outputs (rank 0, on the gathered model).
    model = run_state.consolidate(model)
    if not dist.is_main:
        distributed.teardown()
        return out / "final"
    summary = {"steps": step, "tokens": state["tokens"], "seconds": round(time.perf_counter() - start_time, 1),
               "data": attrs.asdict(train_data.stats), "processes": dist.world_size}
    if val_data is not None:
        summary["val_loss"] = validation_loss(model, _val_loader(val_data, cfg), device)
        log.log({"step": step, "val_loss": summary["val_loss"]})
    if cfg.exact_match_samples and val_data is not None:
        summary["exact_match_before"] = state["extra"]["exact_match_before"]
        summary["exact_match_after"] = exact_match(model, val_data, cfg.exact_match_samples, cfg.max_new_tokens,
                                                   stop_ids, pad_id)
    final = save_final(cfg, out, model, state, resolved)
    log.close()
    if cfg.log.plot:
        plot_losses(log.records, out / "loss_curve.png")
    _report(summary, final, out, model, tokenizer, val_data, cfg, stop_ids, pad_id)
    distributed.teardown()
    return final


@contextlib.contextmanager
def _interrupt_between_steps():
    """Within: Ctrl-C only sets a flag (``interrupted()``) the loop checks after each step; a second one aborts.

    Acting on it between steps keeps model, optimizer state, data position and RNG consistent in the checkpoint
    (a KeyboardInterrupt raised mid-step could leave the optimizer moments half-updated).
    """
    flag = []

    def handle(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)
        with contextlib.suppress(Exception):  # os.write: printing from a handler can re-enter sys.stderr's buffer
            os.write(sys.stderr.fileno(), b"\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)\n")

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield lambda: bool(flag)
    finally:
        signal.signal(signal.SIGINT, previous)


def _val_loader(val_data: TokenizedDataset, cfg: SFTConfig) -> DataLoader:
    return DataLoader(val_data, cfg.batch_size, packing=cfg.packing, seq_len=cfg.seq_len, shuffle=False,
                      fixed_shape=cfg.packing and cfg.compile)


def save_final(cfg: SFTConfig, out: Path, model: Model, state: dict, resolved: dict) -> Path:
    """``out/final``: the HF model (full) or the PEFT adapter (+ ``merged/`` when asked)."""
    final = out / "final"
    run_state.save_model(model, final)
    (final / "ft-prog-config.toml").write_text(to_toml(resolved))
    if cfg.peft.method != "none" and cfg.peft.merge_at_end:
        from ftprog.core import save_pretrained

        save_pretrained(merge(model), final / "merged")
    return final


def _report(summary, final, out, model, tokenizer, val_data, cfg, stop_ids, pad_id) -> None:
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
    lines.append(f"model: {final}   metrics: {out / 'metrics.jsonl'}   loss curve: {out / 'loss_curve.png'}")
    print("\n".join(lines), flush=True)
    import orjson

    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
