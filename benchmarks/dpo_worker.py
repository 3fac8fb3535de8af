"""The DPO case of the benchmark worker: one LoRA DPO step per batch of preference pairs, ft-prog against TRL.

Both systems train the same LoRA adapters (same rank, alpha, targets, ``A`` matrices; ``B`` zero, no dropout) on
the same safetensors checkpoint, with the same batches of pairs (:func:`benchmarks.workload.preference_pairs`,
in the order ft-prog's ``PreferenceLoader`` shuffles them for epoch 0), the same sigmoid DPO loss (``beta``),
the reference = the model with its adapters switched off, computed under ``no_grad`` for every batch, and the
same AdamW step (``lr`` constant, no weight decay, global-norm clipping at 1.0).

- ``ftprog``: the step ``programs/dpo.py`` runs: the adapters-off reference log-probs (``reference_logps`` on
  ``without_adapters(model)``), ``value_and_grad(step_loss)`` over one forward of the chosen and rejected rows,
  then ``apply_gradients`` (clip, check, in-place AdamW).
- ``trl``: ``trl.DPOTrainer`` with a PEFT ``LoraConfig`` (it wraps the model itself and disables the adapters for
  the reference), ``precompute_ref_log_probs=False``, no gradient checkpointing (the ``checkpoint`` stack turns
  it on, as ft-prog's), no autocast (the model is loaded in the case's dtype, as transformers' SFT case is),
  pairs taken in dataset order. Its dataset is given already tokenized (``prompt_ids`` / ``chosen_ids`` /
  ``rejected_ids``, the columns its tokenizer writes), so its tokenizing map is skipped; its collator pads
  and builds the rows as it always does. Step times are taken by a callback, from ``on_step_begin`` to
  ``on_step_end`` (the batch is collated before; logging after).

Step times in both exclude building the batch. Peak memory: the resident-set high-water mark from just before
the first step (ft-prog: after the model and optimizer state are built; TRL: ``on_train_begin``, after its
optimizer is built) to the end of the timed steps.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import workload
from benchmarks.worker import (
    LR, MAX_GRAD_NORM, Memory, _config, build_ftprog, lora_a_init, profile_step, profiler_activities, sync,
    time_breakdown, torch_dtype,
)

PAD_ID = 0


def pairs_in_order(case: dict[str, Any]) -> list[tuple[list[int], list[int], list[int]]]:
    """The case's pairs in the order both systems take them: ft-prog's ``PreferenceLoader`` order of epoch 0."""
    pairs = workload.preference_pairs(case["workload"])
    return [pairs[i] for i in workload.order(len(pairs), case["workload"].get("seed", 0))]


def run_dpo(case: dict[str, Any]) -> dict[str, Any]:
    """``warmup + steps`` DPO steps (and, with ``profile``, one more under the profiler): per-step times, losses
    and token counts, and the peak memory of the timed steps."""
    if case["system"] == "trl":  # imported before the baseline RSS is read, as the trainer needs them
        import peft  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401

        return _run_trl(case)
    return _run_ftprog(case)


def _step_facts(tokens: list[int], cells: list[int], scored: list[int]) -> dict[str, Any]:
    return {"step_tokens": tokens, "step_cells": cells, "step_scored": scored}


def _run_ftprog(case: dict[str, Any]) -> dict[str, Any]:
    from ftprog.core import (
        PreferenceDataset, PreferenceLoader, TokenizedDataset, optim, value_and_grad,
    )
    from ftprog.programs.dpo import reference_logps, step_loss
    from ftprog.programs.host_memory import allocator_note
    from ftprog.programs.dpo_config import DPOConfig, LossSection
    from ftprog.programs.training import apply_gradients
    from ftprog.transforms import without_adapters

    device, B, n_steps = case["device"], case["batch"], case["warmup"] + case["steps"]
    out: dict[str, Any] = {}
    mem = Memory(device)
    out["allocator"] = allocator_note()  # the harness preloads what `ft-prog run dpo` does
    pairs = workload.preference_pairs(case["workload"])
    chosen = [(p + c, [False] * len(p) + [True] * len(c)) for p, c, _ in pairs]
    rejected = [(p + r, [False] * len(p) + [True] * len(r)) for p, _, r in pairs]
    data = PreferenceDataset(TokenizedDataset.from_samples(chosen, case["seq"], PAD_ID),
                             TokenizedDataset.from_samples(rejected, case["seq"], PAD_ID), None)
    loader = PreferenceLoader(data, B, seed=case["workload"].get("seed", 0))
    batches = [loader.batch(0, i).to(device) for i in range(n_steps + bool(case.get("profile")))]
    expected = workload.order(len(pairs), case["workload"].get("seed", 0))
    if [int(i) for b in batches for i in b.indices] != expected[: len(batches) * B]:
        raise RuntimeError("PreferenceLoader's order is not workload.order's: TRL would see other batches")

    cfg = DPOConfig(loss=LossSection(beta=case["beta"]))
    state = {"model": build_ftprog(case)}
    out["params"] = state["model"].num_params()
    out["trainable_params"] = sum(t.numel() for t in state["model"].trainable_params().values())
    opt = optim.adamw(LR)
    state["opt"] = opt.init(state["model"].trainable_params())
    grad_fn = value_and_grad(step_loss, has_aux=True)
    scratch = Path(tempfile.mkdtemp(prefix="dpo-bench-"))  # apply_gradients names it in its non-finite error

    def step(batch):
        model = state["model"]
        ref, kl = reference_logps(without_adapters(model), model, batch, cfg)
        (loss, parts), grads = grad_fn(model, cfg, batch, ref, kl, batch.global_num_pairs)
        loss = loss.cpu()
        state["sums"] = {k: v.detach().float().cpu() for k, v in parts.items()}  # the program's metric sums
        state["model"], state["opt"], _, _ = apply_gradients(model, grads, loss, opt, state["opt"], MAX_GRAD_NORM,
                                                             0, scratch)
        return loss

    mem.start()
    times, losses = [], []
    for batch in batches[:n_steps]:
        sync(device)
        t0 = time.perf_counter()
        loss = step(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out.update(mem.stop())
    if case.get("profile"):
        out["time_breakdown"] = profile_step(lambda: step(batches[n_steps]), device)
    b = batches[:n_steps]
    out.update(_step_facts([x.num_tokens for x in b], [x.tokens.numel() for x in b],
                           [int((x.targets != -100).sum()) for x in b]))
    out.update(step_times=times[case["warmup"]:], warmup_times=times[: case["warmup"]], losses=losses)
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def _tokenizer():
    """A two-token tokenizer: TRL needs one for its pad token; the data comes tokenized."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def _run_trl(case: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from benchmarks.flops import adapted_names

    device, n_steps = case["device"], case["warmup"] + case["steps"]
    profile = bool(case.get("profile"))
    out: dict[str, Any] = {"trl": trl.__version__}
    mem = Memory(device)
    pairs = pairs_in_order(case)[: (n_steps + profile) * case["batch"]]
    dataset = datasets.Dataset.from_dict({"prompt_ids": [p for p, _, _ in pairs],
                                          "chosen_ids": [c for _, c, _ in pairs],
                                          "rejected_ids": [r for _, _, r in pairs]})
    model = transformers.AutoModelForCausalLM.from_pretrained(case["checkpoint"], dtype=torch_dtype(case["dtype"]),
                                                              attn_implementation="sdpa").to(device)
    targets = sorted(adapted_names(case["targets"]))
    lora = peft.LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"], lora_dropout=0.0, target_modules=targets,
                           task_type="CAUSAL_LM")
    scratch = tempfile.mkdtemp(prefix="dpo-bench-trl-")
    args = trl.DPOConfig(
        output_dir=scratch, per_device_train_batch_size=case["batch"], max_steps=n_steps + profile,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, beta=case["beta"], loss_type=["sigmoid"], max_length=case["seq"],
        precompute_ref_log_probs=False, gradient_checkpointing="checkpoint" in case.get("stack", []),
        bf16=False, fp16=False, train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, use_cpu=device == "cpu", dataloader_num_workers=0)
    record: dict[str, list] = {"losses": [], "tokens": [], "cells": [], "scored": [], "times": []}

    class Trainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already the token columns its tokenizing map writes

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(float((loss[0] if return_outputs else loss).detach()))
            record["tokens"].append(int(inputs["attention_mask"].sum()))
            record["cells"].append(inputs["input_ids"].numel())
            record["scored"].append(int(inputs["completion_mask"][:, 1:].sum()))
            return loss

    class Clock(transformers.TrainerCallback):
        """Times each step; resets the memory peak before the first and reads it after the last timed one;
        profiles the extra step after them."""

        def on_train_begin(self, args, state, control, **kw):
            mem.start()

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == n_steps:  # the extra step
                self.prof = torch.profiler.profile(activities=profiler_activities(device))
                self.prof.__enter__()
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            elapsed = time.perf_counter() - self.t0
            if state.global_step <= n_steps:
                record["times"].append(elapsed)
                if state.global_step == n_steps:
                    out.update(mem.stop())
            else:
                self.prof.__exit__(None, None, None)
                out["time_breakdown"] = time_breakdown(self.prof, device, elapsed)

    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer(),
                      peft_config=lora, callbacks=[Clock()])
    out["reference"] = "adapters disabled" if trainer.ref_model is None else "separate reference model"
    inits = lora_a_init(_config(case), case["rank"], set(targets))
    layers = trainer.model.base_model.model.model.layers
    with torch.no_grad():
        for (i, name), a in inits.items():
            parent = layers[i].self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layers[i].mlp
            getattr(parent, name).lora_A["default"].weight.copy_(a)
    out["params"] = sum(p.numel() for p in trainer.model.parameters())
    out["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    w = case["warmup"]
    out.update(_step_facts(record["tokens"][:n_steps], record["cells"][:n_steps], record["scored"][:n_steps]))
    out.update(step_times=record["times"][w:], warmup_times=record["times"][:w], losses=record["losses"][:n_steps])
    return out
