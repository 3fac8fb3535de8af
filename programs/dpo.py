"""`ft-prog run dpo`: preference tuning (DPO, IPO, hinge, robust DPO, SimPO, ORPO, KTO), full or with adapters.

Read it top to bottom: data, where to continue, the model and its reference, the loop, the final save. The
machinery around the loop (checkpoints, exact resume, lock, preemption, metrics) is sft's
(:mod:`ftprog.programs.training`).

One step: the chosen and rejected responses of a batch of pairs go through one forward as one batch (chosen
rows first); their log-probabilities come from the chunked output layer (:func:`ftprog.core.token_logprobs`:
never full-vocabulary logits for the whole batch); the reference model's log-probabilities of the same rows
come from the model with its adapters switched off (LoRA / DoRA / QLoRA: no second copy of the weights), a
frozen copy (full fine-tuning, or ``ref.path``), or a table computed once before training
(``ref.precompute``). The loss (``loss.type``) is a pure function of those per-sequence log-probs
(:mod:`ftprog.core._preference`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from ..core import (
    Model, as_dtype, dpo_loss, kto_loss, load_pretrained, load_tokenizer, orpo_loss, read_config, simpo_loss,
    token_logprobs, uses_average_logps,
)
from ..core._data import PreferenceLoader, load_preference_datasets
from ..transforms import without_adapters
from . import distributed, reference, run_guard, run_state
from .demo_assets import resolve
from .dpo_config import DPOConfig
from .sft import RESUME_RULES as SFT_RESUME_RULES
from .sft import exact_match
from .training import (
    build_model, build_optimizer, data_config, finish, metrics_log, plan_start, router_metric, router_share,
    run_summary, run_transforms, save_checkpoint, save_or_stop, setup_process, step_record, train_step,
    with_router_loss,
)

CONFIG = DPOConfig

RESUME_RULES = attrs.evolve(SFT_RESUME_RULES, may_change=(*SFT_RESUME_RULES.may_change, "eval_samples"))
"""As sft's: run length, saving, logging and evaluation settings may change on resume; the loss, reference, data
and everything that shapes the saved state may not (unless listed in ``resume_allow_changes``)."""

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected")
"""What a step logs beside lr, tokens, tokens/s and the gradient norm (means over the step's pairs)."""


def sequence_logps(model: Model, tokens: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor,
                   training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-probs [rows], scored tokens [rows])`` of each row's response (targets not -100)."""
    logps = token_logprobs(model, tokens, targets, attention_mask=attention_mask, training=training)
    return logps.sum(-1), (targets != -100).sum(-1)


def pair_loss(cfg: DPOConfig, policy: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None,
              kl: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """``(per-pair (KTO: per-sample) losses, metric sums)`` from summed response log-probs.

    ``policy``, ``counts``, ``ref``: ``[2 * pairs]`` (chosen rows, then rejected rows) or, for KTO, ``[samples]``
    with ``labels`` (desirable) and ``kl`` (the batch's KL estimate, a 0-d tensor). The metric sums are over the
    pairs (samples) of this micro-batch; the program divides them by the step's global count.
    """
    loss = cfg.loss
    scored = policy / counts.clamp(min=1) if uses_average_logps(loss.type) else policy
    if loss.type == "kto":
        out = kto_loss(scored, ref, labels, kl, beta=loss.beta, desirable_weight=loss.desirable_weight, undesirable_weight=loss.undesirable_weight)
        good, bad = labels, ~labels
        return out.losses, {"rewards/chosen": out.chosen_rewards.sum(), "rewards/rejected": out.rejected_rewards.sum(),
                            "logps/chosen": policy[good].detach().sum(), "logps/rejected": policy[bad].detach().sum(),
                            "chosen": good.sum(), "rejected": bad.sum()}
    n = policy.shape[0] // 2
    chosen, rejected = scored[:n], scored[n:]
    if loss.type == "simpo":
        out = simpo_loss(chosen, rejected, beta=loss.beta, gamma=loss.gamma, label_smoothing=loss.label_smoothing)
    elif loss.type == "orpo":
        out = orpo_loss(chosen, rejected, -chosen, lam=loss.lambda_)
    else:
        out = dpo_loss(chosen, rejected, ref[:n], ref[n:], kind=loss.type, beta=loss.beta,
                       label_smoothing=loss.label_smoothing)
    margin = out.chosen_rewards - out.rejected_rewards
    return out.losses, {"rewards/chosen": out.chosen_rewards.sum(), "rewards/rejected": out.rejected_rewards.sum(),
                        "rewards/margin": margin.sum(), "rewards/accuracy": (margin > 0).float().sum(),
                        "logps/chosen": policy[:n].detach().sum(), "logps/rejected": policy[n:].detach().sum()}


def step_loss(model: Model, cfg: DPOConfig, batch: Any, ref: torch.Tensor | None, kl: torch.Tensor | None,
              count: int, aux_share: float = 0.0) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the step's mean loss (``count``: pairs, or KTO samples, of the whole step over
    all ranks), and its metric sums; for a mixture of experts plus ``aux_share`` times the router's
    load-balancing loss (``aux_loss`` in the metrics)."""

    def loss(m: Model) -> tuple[torch.Tensor, dict]:
        policy, counts = sequence_logps(m, batch.tokens, batch.targets, batch.attention_mask)
        losses, sums = pair_loss(cfg, policy, counts, ref, kl, batch.labels)
        return losses.sum() / count, sums

    return with_router_loss(loss, model, batch.attention_mask, aux_share)


def run(cfg: DPOConfig, resolved: dict[str, Any]) -> Path:
    dist = distributed.setup()  # one process, or one rank of a torchrun job (`ft-prog run dpo --nproc N`)
    with run_guard.exclusive_output_dir(Path(cfg.output_dir), enabled=dist.is_main):  # one run per output_dir
        return _train(cfg, resolved, dist)


def _train(cfg: DPOConfig, resolved: dict[str, Any], dist: distributed.DistInfo) -> Path:
    out = Path(cfg.output_dir)
    device, say = setup_process(cfg, dist)
    _check_settings(cfg)

    # 1. Data first: a bad file fails before any weights load.
    model_path = resolve(cfg.model.path)
    read_config(model_path)
    ref_path = resolve(cfg.ref.path) if cfg.ref.path else None
    if ref_path:
        read_config(ref_path)
    tokenizer = load_tokenizer(model_path)
    data_cfg = data_config(cfg)
    train_data, val_data = load_preference_datasets(data_cfg, tokenizer)
    _check_data(cfg, train_data)
    loader = PreferenceLoader(train_data, cfg.batch_size, seed=cfg.seed, rank=dist.rank,
                              world_size=dist.world_size)
    run_batches = None if cfg.max_steps else loader.total_batches(cfg.epochs)
    total_steps = cfg.max_steps or math.ceil(run_batches / cfg.grad_accum)
    say(f"data: {train_data.stats.summary()}; {total_steps} steps of {cfg.grad_accum} x {cfg.batch_size} "
        f"{'samples' if cfg.loss.type == 'kto' else 'pairs'}", flush=True)

    # 2. Where to continue, decided before anything is loaded or deleted.
    fingerprint = run_guard.data_fingerprint(train_data)
    start = plan_start(cfg, resolved, fingerprint, RESUME_RULES, total_steps,
                       sources=[model_path, ref_path, data_cfg.path, data_cfg.val_path])

    # 3. Model, transforms, optimizer, and the reference.
    # the optimizer first: a refused optimizer setting fails before any weights load
    opt = build_optimizer(cfg, total_steps, say)
    base, model = build_model(cfg, device, dist.mesh, say)
    opt_state = opt.init(model.trainable_params())
    splits = {"train": train_data} if val_data is None else {"train": train_data, "val": val_data}
    reference_of = _reference(cfg, model, ref_path or model_path, device, dist, splits, fingerprint, say)

    # 4. Only now is anything removed; 5. resume.
    start.clear(dist, say)
    model, opt_state, state = start.restore(model, base, opt, opt_state, loader, say)
    state["data_fingerprint"] = fingerprint
    log = metrics_log(cfg, resolved, state, total_steps, dist)
    stop_ids, pad_id = sorted(tokenizer.stop_ids), train_data.pad_id
    if val_data is not None and "val_before" not in state["extra"]:
        state["extra"]["val_before"] = evaluate(model, reference_of, cfg, val_data, device, dist, stop_ids, pad_id)
        log.write("before training: " + _describe(state["extra"]["val_before"]))

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
            count = max(sum(b.global_num_pairs for b in micro), 1)  # over all ranks: the exact global mean
            share = router_share(model, len(micro), dist.world_size)
            # the reference (no gradient, no update hooks) is scored before the micro-batch's forward
            loss, sums, model, opt_state, grad_norm, lr = train_step(
                step_loss, lambda b: (cfg, b, *reference_of(model, b), count, share), micro, model, opt, opt_state,
                cfg, step, out)
            step += 1
            state.update(step=step, tokens=state["tokens"] + distributed.all_sum(sum(b.num_tokens for b in micro)),
                         loader=loader.state_dict())
            if step % cfg.log.every == 0 or step == total_steps:
                speed = (state["tokens"] - start_tokens) / (time.perf_counter() - start_time)
                router = router_metric(sums, len(micro), dist.world_size)
                record = step_record(step, loss, lr, grad_norm, state, speed, loader.epoch, **_means(sums, count),
                                     **router)
                log.log(record)
                log.progress(step, loss=loss.item(), acc=record.get("rewards/accuracy", float("nan")),
                             tok_s=round(speed))
            if val_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                log.log({"step": step, **_prefixed(evaluate(model, reference_of, cfg, val_data, device, dist,
                                                            stop_ids, pad_id, exact=False))})
            save_or_stop(cfg, step, total_steps, stop_request, clock, save, log, say)

    # 7. Final evaluation and outputs (rank 0 reports; evaluation is collective under sharding).
    summary = run_summary(state, start_time, train_data.stats, dist, loss_type=cfg.loss.type)
    if val_data is not None:
        after = evaluate(model, reference_of, cfg, val_data, device, dist, stop_ids, pad_id)
        summary["val_before"], summary["val_after"] = state["extra"]["val_before"], after
        log.log({"step": step, **_prefixed(after)})
    model = run_state.consolidate(model)
    if not dist.is_main:
        distributed.teardown()
        return out / "final"
    lines = [f"done: {step} steps, {state['tokens']} tokens in {summary['seconds']} s"]
    if val_data is not None:
        lines.append(f"held-out {_describe(summary['val_before'])} before -> {_describe(summary['val_after'])} after")
    return finish(cfg, model, state, resolved, log, summary, lines)


# ------------------------------------------------------------------------------------------------ the reference


ReferenceFn = Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]
"""``(model, batch, split="train") -> (reference summed log-probs of the batch's rows or None, KTO's KL estimate
or None)``; ``split`` names the dataset the batch came from ("train" or "val")."""


def _reference(cfg: DPOConfig, model: Model, path: str, device: torch.device, dist: distributed.DistInfo,
               splits: dict[str, Any], fingerprint: str, say) -> ReferenceFn:
    """How this run gets reference log-probs, chosen once: none (SimPO, ORPO), the adapters-off view of the model
    being trained, a frozen copy (full fine-tuning or ``ref.path``), or a table computed before training."""
    if cfg.loss.type in ("simpo", "orpo"):
        return lambda model, batch, split="train": (None, None)
    if cfg.ref.precompute:
        frozen = frozen_reference(cfg, path, device, dist)
        table = reference.precompute(frozen, splits, Path(cfg.output_dir), fingerprint, path, cfg.batch_size,
                                     device, dist, say)
        del frozen  # the table replaces it: training holds one model
        return lambda model, batch, split="train": (table.lookup(batch, split), None)
    if not cfg.ref.path and cfg.peft.method != "none":
        return lambda model, batch, split="train": reference_logps(without_adapters(model), model, batch, cfg)
    frozen = frozen_reference(cfg, path, device, dist)
    return lambda model, batch, split="train": reference_logps(frozen, model, batch, cfg)


def frozen_reference(cfg: Any, path: str, device: torch.device, dist: distributed.DistInfo) -> Model:
    """The model at ``path`` in ``cfg.dtype``, nothing trainable, sharded / compiled as the policy is (no
    activation checkpointing: it never runs a backward)."""
    ref = load_pretrained(path, dtype=as_dtype(cfg.dtype), device=device).replace(trainable=frozenset())
    return run_transforms(attrs.evolve(cfg, activation_checkpointing=False), ref, dist.mesh)


@torch.no_grad()
def reference_logps(ref: Model, model: Model, batch: Any, cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's summed log-probs of the batch's rows and, for KTO, the batch's KL estimate: the mean over
    its mismatched prompt/completion pairs (all ranks) of the policy's minus the reference's log-probs, clamped at
    0 and without gradient, as TRL's KTOTrainer computes it."""
    logps, _ = sequence_logps(ref, batch.tokens, batch.targets, batch.attention_mask, training=False)
    if cfg.loss.type != "kto":
        return logps, None
    policy_kl, _ = sequence_logps(model, batch.kl_tokens, batch.kl_targets, batch.kl_attention_mask, training=False)
    ref_kl, _ = sequence_logps(ref, batch.kl_tokens, batch.kl_targets, batch.kl_attention_mask, training=False)
    total = distributed.all_sum((policy_kl - ref_kl).sum().cpu())  # kto_kl's mean-then-clamp, over all ranks
    return logps, (total / max(batch.global_num_pairs, 1)).clamp(min=0).to(logps.device)


# -------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: Model, reference_of: ReferenceFn, cfg: DPOConfig, data: Any, device: torch.device,
             dist: distributed.DistInfo, stop_ids, pad_id, exact: bool = True) -> dict[str, float]:
    """Held-out means: the loss and the reward metrics over every pair of ``data``, and (``eval_samples``, when
    ``exact``) the share of greedy answers equal to the chosen response."""
    loader = PreferenceLoader(data, cfg.batch_size, shuffle=False, rank=dist.rank, world_size=dist.world_size)
    sums, count = {}, 0
    for batch in loader:
        batch = batch.to(device)
        ref, kl = reference_of(model, batch, "val")
        policy, counts = sequence_logps(model, batch.tokens, batch.targets, batch.attention_mask, training=False)
        losses, parts = pair_loss(cfg, policy, counts, ref, kl, batch.labels)
        parts["loss"] = losses.sum()
        sums = {k: sums.get(k, 0) + v.float().cpu() for k, v in parts.items()}
        count += batch.global_num_pairs
    result = _means(sums, max(count, 1))
    if exact and cfg.eval_samples:
        result["exact_match"] = exact_match(model, data.chosen, cfg.eval_samples, cfg.max_new_tokens, stop_ids,
                                            pad_id)
    return result


def _means(sums: dict, count: int) -> dict[str, float]:
    """Global means of summed metrics (KTO: chosen/rejected sums over their own sample counts)."""
    sums = {k: distributed.all_sum(v) for k, v in sorted(sums.items())}
    per = {"rewards/chosen": sums.get("chosen"), "logps/chosen": sums.get("chosen"),
           "rewards/rejected": sums.get("rejected"), "logps/rejected": sums.get("rejected")}
    out = {}
    for key, value in sums.items():
        if key in ("chosen", "rejected"):
            continue
        n = per.get(key)
        n = count if n is None else float(n)
        out[key] = float(value) / n if n else float("nan")
    return out


def _prefixed(result: dict[str, float]) -> dict[str, float]:
    return {f"val_{k}": v for k, v in result.items()}


def _describe(result: dict[str, float]) -> str:
    parts = [f"reward accuracy {result['rewards/accuracy']:.1%}"] if "rewards/accuracy" in result else []
    parts += [f"loss {result['loss']:.4f}"]
    if "exact_match" in result:
        parts.append(f"exact match {result['exact_match']:.1%}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------------ checks


def _check_settings(cfg: DPOConfig) -> None:
    if cfg.ref.precompute and cfg.loss.type == "kto":
        raise run_guard.RunError("ref.precompute does not work with loss.type='kto': its KL pairs are drawn from "
                                 "each batch; leave ref.precompute=false")
    if cfg.ref.precompute and cfg.loss.type in ("simpo", "orpo"):
        raise run_guard.RunError(f"ref.precompute: loss.type={cfg.loss.type!r} needs no reference model")


def _check_data(cfg: DPOConfig, data: Any) -> None:
    paired = data.rejected is not None
    if cfg.loss.type == "kto" and paired:
        raise run_guard.RunError(f"loss.type='kto' takes unpaired rows (prompt, completion, label); {cfg.data.path} "
                                 "holds pairs (chosen, rejected): use a paired loss (dpo, ipo, ...)")
    if cfg.loss.type != "kto" and not paired:
        raise run_guard.RunError(f"loss.type={cfg.loss.type!r} takes pairs (prompt, chosen, rejected); "
                                 f"{cfg.data.path} holds unpaired rows (completion, label): use loss.type='kto'")
