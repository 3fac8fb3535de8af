"""The distillation case of the benchmark worker: one offline KD step of `ft-prog run distill`, and the same step
with the loss computed from both models' full logits (the memory ft-prog's chunked loss saves).

The student is the case's checkpoint (LoRA or full, as the train cases build it); the teacher a random model of the
same vocabulary about ``teacher_ratio`` times the student's parameters (:func:`teacher_config`: twice the width,
as many layers as reach the ratio), frozen. Both variants train the same packed rows of the case's SFT workload
(prompts masked) with ``loss = (1 - kd_ratio) * CE + kd_ratio * forward KL`` (temperature 1) and AdamW, clipping
1.0:

- ``chunked``: ``programs/distill.py``'s ``step_loss`` (``distill_loss_sum``: both output layers chunk by chunk
  over the target positions, each chunk recomputed in the backward);
- ``full-logits``: each model's ``[batch, seq, vocab]`` logits of the whole batch, then the same divergence and
  cross-entropy on the target positions (what a straightforward implementation holds).

Step times exclude building the batch. Peak memory: from just before the first step (both models and the optimizer
state built) to the end of the timed steps.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import workload
from benchmarks.flops import _linears
from benchmarks.worker import (
    LR, MAX_GRAD_NORM, Memory, _config, build_ftprog, profile_step, sync, torch_dtype,
)

PAD_ID = 0


def approx_params(config: dict[str, Any]) -> int:
    """Weights of a Llama-shaped ``config``: embeddings (and an untied output layer), linears, norms."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    embed = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    per_layer = sum(a * b for a, b in _linears(config).values()) + 2 * h
    return embed + layers * per_layer + h


def teacher_config(student: dict[str, Any], ratio: float) -> dict[str, Any]:
    """The student's config at twice the width (hidden, MLP, head size), with the number of layers that brings its
    weights closest to ``ratio`` times the student's; same vocabulary."""
    wide = {**student, "hidden_size": 2 * student["hidden_size"],
            "intermediate_size": 2 * student["intermediate_size"]}
    if student.get("head_dim"):
        wide["head_dim"] = 2 * student["head_dim"]
    one, two = (approx_params({**wide, "num_hidden_layers": n}) for n in (1, 2))
    target = ratio * approx_params(student)
    wide["num_hidden_layers"] = max(1, round((target - one) / (two - one)) + 1)
    return wide


def run_distill(case: dict[str, Any]) -> dict[str, Any]:
    """``warmup + steps`` distillation steps (and, with ``profile``, one more under the profiler): per-step times,
    losses and token counts, both models' sizes, and the peak memory of the timed steps."""
    from ftprog.core import DataLoader, TokenizedDataset, from_config, optim, value_and_grad
    from ftprog.programs.host_memory import allocator_note
    from ftprog.programs.distill import step_loss
    from ftprog.programs.distill_config import DistillConfig, DistillSection
    from ftprog.programs.training import apply_gradients

    device, n_steps = case["device"], case["warmup"] + case["steps"]
    out: dict[str, Any] = {}
    mem = Memory(device)
    out["allocator"] = allocator_note()  # the harness preloads what `ft-prog run distill` does
    data = TokenizedDataset.from_samples(workload.samples(case["workload"]), case["seq"], PAD_ID)
    loader = DataLoader(data, case["batch"], packing=True, seq_len=case["seq"], seed=0)
    batches = [b.to(device) for _, b in zip(range(n_steps + bool(case.get("profile"))), loader.forever())]
    if len(batches) < n_steps:
        raise RuntimeError(f"the workload packs into {len(batches)} batches, fewer than the {n_steps} steps")

    cfg = DistillConfig(distill=DistillSection(kd_ratio=case["kd_ratio"], divergence=case["divergence"]))
    t_config = teacher_config(_config(case), case["teacher_ratio"])
    teacher = from_config(t_config, seed=1, dtype=torch_dtype(case["dtype"]), device=device)
    teacher = teacher.replace(trainable=frozenset())
    state = {"model": build_ftprog(case)}
    out.update(params=state["model"].num_params(), teacher_params=teacher.num_params(),
               teacher_layers=t_config["num_hidden_layers"], teacher_hidden=t_config["hidden_size"],
               trainable_params=sum(t.numel() for t in state["model"].trainable_params().values()))
    opt = optim.adamw(LR)
    state["opt"] = opt.init(state["model"].trainable_params())
    loss_fn = step_loss if case["variant"] == "chunked" else full_logits_step_loss
    grad_fn = value_and_grad(loss_fn, has_aux=True)
    scratch = case.get("scratch", "/tmp")  # apply_gradients names it in its non-finite error

    def step(batch):
        model = state["model"]
        (loss, _), grads = grad_fn(model, teacher, cfg, batch, batch.num_targets)
        loss = loss.cpu()
        state["model"], state["opt"], _, _ = apply_gradients(model, grads, loss, opt, state["opt"], MAX_GRAD_NORM,
                                                             0, scratch)
        return loss

    mem.start()
    times, losses = [], []
    for batch in batches[:n_steps]:
        sync(device)
        t0 = time.perf_counter()
        losses.append(float(step(batch)))
        sync(device)
        times.append(time.perf_counter() - t0)
    out.update(mem.stop())
    if case.get("profile"):
        out["time_breakdown"] = profile_step(lambda: step(batches[n_steps]), device)
    b = batches[:n_steps]
    out.update(step_tokens=[x.num_tokens for x in b], step_cells=[x.tokens.numel() for x in b],
               step_scored=[x.num_targets for x in b], step_times=times[case["warmup"]:],
               warmup_times=times[: case["warmup"]], losses=losses)
    return out


def full_logits_step_loss(model, teacher, cfg, batch, num_targets):
    """``programs/distill.py``'s step loss computed from both models' full ``[batch, seq, vocab]`` logits."""
    import torch
    import torch.nn.functional as F

    from ftprog.core import distill_divergence

    d = cfg.distill
    keep = batch.targets != -100
    s_logits = model(batch.tokens, training=True, **batch.model_kwargs()).float()
    with torch.no_grad():
        t_logits = teacher(batch.tokens, **batch.model_kwargs()).float()
    kd = (distill_divergence(s_logits, t_logits, d.divergence, temperature=d.temperature, beta=d.beta)
          * keep).sum()
    ce = F.cross_entropy(s_logits.flatten(0, 1), batch.targets.flatten(), reduction="sum")
    loss = ((1 - d.kd_ratio) * ce + d.kd_ratio * kd) / num_targets
    return loss, (kd.detach(), ce.detach())
