"""`ft-prog run grpo`: reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO), full or with adapters.

Read it top to bottom: prompts, rewards, where to continue, the model and its reference, the loop, the final
save. The machinery around the loop (checkpoints, exact resume, lock, preemption, metrics) is sft's
(:mod:`ftprog.programs.training`).

One step: ``batch_size`` prompts, each sampled ``group_size`` times by the policy itself (ft-prog's batched KV-cache
generation on the same parameters: no copy, no second engine), the log-probs of the sampled tokens recorded; the
completions scored by the reward functions (:mod:`ftprog.programs.rewards`); group-normalised advantages; then
``num_iterations`` optimizer steps on those rollouts, each token's ratio to the sampling policy clipped, plus
``beta`` times the k3 KL to the reference (the model with its adapters off, or a frozen copy) when ``beta > 0``.
The losses are pure functions (:mod:`ftprog.core._grpo`). The sampling RNG is the process's torch RNG, which every
checkpoint saves: a resumed run draws the same completions.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import attrs
import orjson
import torch

from ..core import (
    Model, group_advantages, grpo_loss_sum, grpo_normalizer, grpo_token_loss, load_tokenizer, read_config,
    token_logprobs,
)
from ..core._data import DataLoader, load_prompt_datasets
from ..transforms import without_adapters
from . import distributed, rewards, run_guard, run_state
from .demo_assets import resolve
from .dpo import frozen_reference
from .generate import cut_at_stop, generate
from .grpo_config import GRPOConfig
from .rollouts import rollout_rows, sample_completions
from .sft import RESUME_RULES as SFT_RESUME_RULES
from .training import (
    build_model, build_optimizer, data_config, finish, metrics_log, plan_start, router_metric, router_share,
    run_summary, save_checkpoint, save_or_stop, setup_process, train_step, with_router_loss,
)

CONFIG = GRPOConfig

RESUME_RULES = attrs.evolve(SFT_RESUME_RULES, may_change=(*SFT_RESUME_RULES.may_change, "eval_samples"))
"""As sft's; the rewards, sampling settings and loss are part of what the saved state means."""


@attrs.frozen(eq=False)
class Rollouts:
    """One step's sampled completions, ready for the training forward.

    ``tokens``/``targets``/``attention_mask``: ``[rows, S]`` prompt + completion, right-padded, targets on the
    completion tokens (-100 elsewhere, and everywhere for a truncated completion under ``mask_truncated``);
    ``rollout_logps``: ``[rows, S]`` the sampling policy's log-probs at the target positions; ``advantages``:
    ``[rows]``; ``ref_logps``: ``[rows, S]`` or None.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor
    rollout_logps: torch.Tensor
    advantages: torch.Tensor
    ref_logps: torch.Tensor | None = None

    def rows(self, part: slice) -> Rollouts:
        pick = lambda t: None if t is None else t[part]
        return Rollouts(*(pick(getattr(self, f.name)) for f in attrs.fields(Rollouts)))


def step_loss(model: Model, cfg: GRPOConfig, part: Rollouts, normalizer: float, aux_share: float = 0.0
              ) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the step's loss, and its masked sums (tokens, clipped tokens, KL); for a
    mixture of experts plus ``aux_share`` times the router's load-balancing loss (``aux_loss`` in the sums)."""

    def loss(m: Model) -> tuple[torch.Tensor, dict]:
        logps = token_logprobs(m, part.tokens, part.targets, attention_mask=part.attention_mask,
                               temperature=cfg.temperature)
        out = grpo_token_loss(logps, part.rollout_logps, part.advantages, epsilon=cfg.loss.epsilon,
                              epsilon_high=cfg.loss.epsilon_high or None, beta=cfg.loss.beta, ref_logps=part.ref_logps)
        mask = (part.targets != -100).float()
        sums = {"tokens": mask.sum(), "clipped": (out.clipped * mask).sum()}
        if out.kl is not None:
            sums["kl"] = (out.kl.detach() * mask).sum()
        return grpo_loss_sum(cfg.loss.type, out.losses, mask) / normalizer, sums

    return with_router_loss(loss, model, part.attention_mask, aux_share)


def run(cfg: GRPOConfig, resolved: dict[str, Any]) -> Path:
    dist = distributed.setup()  # one process, or one rank of a torchrun job (`ft-prog run --nproc N grpo`)
    with run_guard.exclusive_output_dir(Path(cfg.output_dir), enabled=dist.is_main):  # one run per output_dir
        return _train(cfg, resolved, dist)


def _train(cfg: GRPOConfig, resolved: dict[str, Any], dist: distributed.DistInfo) -> Path:
    out = Path(cfg.output_dir)
    device, say = setup_process(cfg, dist)
    if cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.functions):
        raise run_guard.RunError(f"reward.weights has {len(cfg.reward.weights)} values for "
                                 f"{len(cfg.reward.functions)} reward.functions")
    if cfg.batch_size % dist.world_size:
        raise run_guard.RunError(f"batch_size {cfg.batch_size} (prompts) must be a multiple of the {dist.world_size} "
                                 "processes")
    if cfg.save_every % cfg.num_iterations or cfg.eval_every % cfg.num_iterations:
        raise run_guard.RunError(f"save_every ({cfg.save_every}) and eval_every ({cfg.eval_every}) must be multiples "
                                 f"of num_iterations ({cfg.num_iterations}): checkpoints and evaluations come "
                                 "between rollouts")
    if cfg.max_new_tokens >= cfg.seq_len:
        raise run_guard.RunError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt in seq_len "
                                 f"({cfg.seq_len})")

    # 1. Prompts and rewards first: bad data or a bad reward file fail before any weights load.
    model_path = resolve(cfg.model.path)
    read_config(model_path)
    tokenizer = load_tokenizer(model_path)
    data_cfg = data_config(cfg)
    train_data, val_data = load_prompt_datasets(data_cfg, tokenizer, cfg.seq_len - cfg.max_new_tokens)
    reward_fns = rewards.build(cfg.reward.functions, cfg.reward, say)
    weights = torch.tensor(cfg.reward.weights or [1.0] * len(reward_fns))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    prompt_ids = train_data.as_tokenized(cfg.seq_len, pad_id)
    loader = _PromptLoader(prompt_ids, cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    total_steps = cfg.max_steps or loader.total_batches(cfg.epochs) * cfg.num_iterations
    say(f"data: {train_data.stats.summary()}; {total_steps} steps, a rollout of {cfg.batch_size} prompts x "
        f"{cfg.group_size} completions every {cfg.num_iterations}", flush=True)

    # 2. Where to continue (the prompts and their columns are the data), before anything is loaded or deleted.
    fingerprint = run_guard.data_fingerprint(prompt_ids) + f", rows {_rows_digest(train_data.columns)}"
    start = plan_start(cfg, resolved, fingerprint, RESUME_RULES, total_steps,
                       sources=[model_path, data_cfg.path, data_cfg.val_path])

    # 3. Model, transforms, optimizer, the reference (only with beta > 0).
    # the optimizer first: a refused optimizer setting fails before any weights load
    opt = build_optimizer(cfg, total_steps, say)
    base, model = build_model(cfg, device, dist.mesh, say)
    opt_state = opt.init(model.trainable_params())
    frozen = None
    if cfg.loss.beta and cfg.peft.method == "none":
        frozen = frozen_reference(cfg, model_path, device, dist)
    reference_of = (lambda m: frozen) if frozen is not None else without_adapters

    # 4. Only now is anything removed; 5. resume.
    start.clear(dist, say)
    model, opt_state, state = start.restore(model, base, opt, opt_state, loader, say)
    state["data_fingerprint"] = fingerprint
    log = metrics_log(cfg, resolved, state, total_steps, dist)
    stop_ids = sorted(tokenizer.stop_ids)
    sample = dict(max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                  stop_strings=cfg.stop, decode=tokenizer.decode, all_steps=dist.distributed)
    if val_data is not None and cfg.eval_samples and "eval_before" not in state["extra"]:
        state["extra"]["eval_before"] = evaluate(model, cfg, val_data, reward_fns, weights, tokenizer, sample)
        log.write(f"held-out reward before training: {_describe(state['extra']['eval_before'])}")

    def save(step: int) -> Path:
        return save_checkpoint(cfg, step, model, opt_state, state, resolved)

    # 6. The loop: a rollout, then num_iterations optimizer steps on it. Checkpoints and stop signals come
    # between rollouts, so a resumed run samples again from the same RNG state.
    batches = loader.forever()
    start_time = time.perf_counter()
    step = state["step"]
    clock = run_guard.SaveClock(cfg.save_every_minutes, is_main=dist.is_main)
    with run_guard.stop_between_steps() as stop_request:
        while step < total_steps:
            t0 = time.perf_counter()
            batch, stats = sample_and_score(model, cfg, train_data, next(batches), reward_fns, weights, tokenizer,
                                            sample, reference_of, device)
            rollout_seconds = time.perf_counter() - t0
            sequences = distributed.all_sum(len(batch.advantages))
            tokens = int(distributed.all_sum(int((batch.targets != -100).sum())))
            normalizer = grpo_normalizer(cfg.loss.type, sequences, tokens, cfg.max_new_tokens)
            t1 = time.perf_counter()
            for _ in range(min(cfg.num_iterations, total_steps - step)):
                parts = _micro_batches(batch, cfg.grad_accum)
                share = router_share(model, len(parts), dist.world_size)
                loss, sums, model, opt_state, grad_norm, lr = train_step(
                    step_loss, lambda part: (cfg, part, normalizer, share), parts, model, opt, opt_state, cfg, step,
                    out)
                step += 1
                train_seconds = time.perf_counter() - t1
                state.update(step=step, tokens=state["tokens"] + tokens, loader=loader.state_dict())
                if step % cfg.log.every == 0 or step == total_steps:
                    router = router_metric(sums, len(parts), dist.world_size)
                    sums = {k: float(distributed.all_sum(v)) for k, v in sorted(sums.items())}
                    record = {"step": step, "loss": loss.item(), **stats, **router,
                              "clip_fraction": sums["clipped"] / max(sums["tokens"], 1),
                              **({"kl": sums["kl"] / max(sums["tokens"], 1)} if "kl" in sums else {}),
                              "rollout_seconds": round(rollout_seconds, 3), "train_seconds": round(train_seconds, 3),
                              "train_tokens_per_s": round(tokens / max(train_seconds, 1e-9), 1),
                              "lr": lr, "tokens": state["tokens"], "grad_norm": grad_norm.item(),
                              "epoch": loader.epoch}
                    log.log(record)
                    log.progress(step, loss=loss.item(), reward=stats["reward"], tok_s=stats["rollout_tokens_per_s"])
            if val_data is not None and cfg.eval_samples and cfg.eval_every and step % cfg.eval_every == 0 \
                    and step < total_steps:
                result = evaluate(model, cfg, val_data, reward_fns, weights, tokenizer, sample)
                log.log({"step": step, **{f"val_{k}": v for k, v in result.items()}})
            save_or_stop(cfg, step, total_steps, stop_request, clock, save, log, say)

    # 7. Final evaluation and outputs.
    summary = run_summary(state, start_time, train_data.stats, dist, loss_type=cfg.loss.type)
    if val_data is not None and cfg.eval_samples:
        summary["eval_before"] = state["extra"]["eval_before"]
        summary["eval_after"] = evaluate(model, cfg, val_data, reward_fns, weights, tokenizer, sample)
        log.log({"step": step, **{f"val_{k}": v for k, v in summary["eval_after"].items()}})
    model = run_state.consolidate(model)
    if not dist.is_main:
        distributed.teardown()
        return out / "final"
    lines = [f"done: {step} steps, {state['tokens']} completion tokens trained in {summary['seconds']} s"]
    if "eval_after" in summary:
        lines.append(f"held-out reward (greedy, {cfg.eval_samples} prompts): {_describe(summary['eval_before'])} "
                     f"before -> {_describe(summary['eval_after'])} after")
    return finish(cfg, model, state, resolved, log, summary, lines)


class _PromptLoader(DataLoader):
    """:class:`DataLoader`'s order, epochs, resume state and rank slicing over prompts: a batch is this rank's
    prompt indices."""

    def batch(self, epoch: int, index: int) -> list[int]:
        return self._plan(epoch)[index][self.rank :: self.world_size]


def _rows_digest(columns: list[dict]) -> str:
    import hashlib

    return hashlib.blake2b(orjson.dumps(columns, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def _micro_batches(batch: Rollouts, count: int) -> list[Rollouts]:
    rows = len(batch.advantages)
    size = max(1, math.ceil(rows / count))
    return [batch.rows(slice(i, i + size)) for i in range(0, rows, size)]


# ----------------------------------------------------------------------------------------------------- rollouts


def completion_texts(tokenizer: Any, completions: list[list[int]], stop_ids: set[int], stop: list[str]) -> list[str]:
    """Each completion's text: its tokens without a final stop token, cut before the first stop string."""
    return [cut_at_stop(tokenizer.decode(c[:-1] if c and c[-1] in stop_ids else c), stop) for c in completions]


@torch.no_grad()
def sample_and_score(model: Model, cfg: GRPOConfig, data: Any, indices: list[int], reward_fns, weights: torch.Tensor,
                     tokenizer: Any, sample: dict, reference_of, device: torch.device) -> tuple[Rollouts, dict]:
    """Sample ``group_size`` completions of each prompt at ``indices`` with the policy, score them and build the
    training rows; and the step's rollout metrics (over all ranks)."""
    group = cfg.group_size
    prompts = [data.ids[i] for i in indices for _ in range(group)]
    t0 = time.perf_counter()
    completions, logps = sample_completions(model, prompts, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                            top_p=cfg.top_p if cfg.top_p < 1 else None, **sample)
    rollout_seconds = time.perf_counter() - t0
    stops = set(sample["stop_ids"])
    texts = completion_texts(tokenizer, completions, stops, cfg.stop)
    # hit max_new_tokens without a stop token or a stop string
    truncated = [len(c) >= cfg.max_new_tokens and c[-1] not in stops
                 and cut_at_stop(tokenizer.decode(c), cfg.stop) == tokenizer.decode(c) for c in completions]
    per_fn = torch.tensor(_rewards(reward_fns, data, indices, group, texts), dtype=torch.float32)  # [functions, n]
    total = (per_fn * weights[:, None]).nansum(0)
    total[per_fn.isnan().all(0)] = float("nan")  # no function scored it: no advantage
    batch_std = _global_std(total) if cfg.loss.scale_rewards == "batch" else None
    advantages = group_advantages(total, group, cfg.loss.scale_rewards, batch_std)
    scored = [not (cfg.loss.mask_truncated and t) for t in truncated]
    tokens, targets, mask, old = rollout_rows(prompts, completions, logps, scored, sample["pad_id"])
    batch = Rollouts(tokens.to(device), targets.to(device), mask.to(device), old.to(device), advantages.to(device))
    if cfg.loss.beta:
        ref = reference_of(model)
        batch = attrs.evolve(batch, ref_logps=token_logprobs(ref, batch.tokens, batch.targets,
                                                             attention_mask=batch.attention_mask, training=False,
                                                             temperature=cfg.temperature))
    lengths = torch.tensor([float(len(c)) for c in completions])
    generated = distributed.all_sum(float(lengths.sum()))
    stats = {"reward": _global_mean(total), "reward_std": _global_std(total).item(),
             **{f"rewards/{name}": _global_mean(per_fn[i]) for i, (name, _) in enumerate(reward_fns)},
             "completion_length": generated / distributed.all_sum(float(len(lengths))),
             "completion_length_max": float(distributed.all_max(int(lengths.max()))),
             "truncated": distributed.all_sum(float(sum(truncated))) / distributed.all_sum(float(len(truncated))),
             "rollout_tokens_per_s": round(generated / max(rollout_seconds, 1e-9), 1)}
    return batch, stats


def _rewards(reward_fns, data: Any, indices: list[int], group: int, texts: list[str]) -> list[list[float]]:
    rows = [i for i in indices for _ in range(group)]
    columns: dict[str, list] = {}
    for i in rows:
        for key in data.columns[i]:
            columns.setdefault(key, [])
    for key in columns:
        columns[key] = [data.columns[i].get(key) for i in rows]
    return rewards.score(reward_fns, [data.prompts[i] for i in rows], texts, columns, [data.where[i] for i in rows])


def _global_mean(values: torch.Tensor) -> float:
    """NaN-ignoring mean over every rank's values."""
    kept = values[~values.isnan()]
    count = distributed.all_sum(float(kept.numel()))
    return distributed.all_sum(float(kept.sum())) / count if count else float("nan")


def _global_std(values: torch.Tensor) -> torch.Tensor:
    """NaN-ignoring sample std over every rank's values (``nan_std`` of them all)."""
    mean = _global_mean(values)
    kept = values[~values.isnan()]
    count = distributed.all_sum(float(kept.numel()))
    square = distributed.all_sum(float(((kept - mean) ** 2).sum()))
    return torch.tensor(math.sqrt(square / (count - 1)) if count > 1 else float("nan"))


# -------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: Model, cfg: GRPOConfig, data: Any, reward_fns, weights: torch.Tensor, tokenizer: Any,
             sample: dict) -> dict[str, float]:
    """Mean reward (and per function) of greedy completions of the first ``eval_samples`` held-out prompts."""
    indices = list(range(min(cfg.eval_samples, len(data))))
    completions = generate(model, [data.ids[i] for i in indices], **sample)
    texts = completion_texts(tokenizer, completions, set(sample["stop_ids"]), cfg.stop)
    per_fn = torch.tensor(_rewards(reward_fns, data, indices, 1, texts), dtype=torch.float32)
    total = (per_fn * weights[:, None]).nansum(0)
    result = {"reward": float(total.mean())}
    result.update({f"rewards/{name}": float(torch.nanmean(per_fn[i])) for i, (name, _) in enumerate(reward_fns)})
    return result


def _describe(result: dict[str, float]) -> str:
    parts = [f"reward {result['reward']:.3f}"]
    parts += [f"{k.removeprefix('rewards/')} {v:.1%}" if k == "rewards/exact_match" else
              f"{k.removeprefix('rewards/')} {v:.3f}" for k, v in result.items() if k.startswith("rewards/")]
    return ", ".join(parts)
