"""The rollout and GRPO cases of the benchmark worker: ft-prog against transformers' ``generate`` and TRL's GRPOTrainer.

``rollout``: batched sampled generation (temperature, top-p, no top-k, left-padded prompts of different lengths,
KV cache) of ``new_tokens`` tokens per prompt on the same weights, no stop token (transformers: ``eos_token_id``
None and ``min_new_tokens = max_new_tokens``), so both generate exactly ``rows x new_tokens`` tokens.

- ``ftprog``: ``programs.generate.generate(..., return_logprobs=True)``, as ``ft-prog run grpo`` samples.
- ``hf``: ``model.generate(do_sample=True, ...)``, as TRL's native (no vLLM) generation calls it.

``grpo``: one LoRA GRPO step per batch of ``prompts`` prompts, ``group`` completions each, ``beta = 0``,
``num_iterations = 1``, loss type ``grpo`` (per-sequence token mean, then the mean over sequences), advantages
normalised by the group's std, clip epsilon 0.2, the same AdamW (lr constant, no weight decay, clipping 1.0) and
the same LoRA adapters (rank, alpha, targets, ``A`` matrices; ``B`` zero). The reward is :func:`token_reward`, a
fixed function of a completion's token ids, so both systems score the same way.

- ``ftprog``: the step ``programs/grpo.py`` runs: ``sample_and_score`` (its KV-cache generation on the policy,
  recording log-probs; rewards; advantages; the training rows), ``value_and_grad(step_loss)``, ``apply_gradients``.
- ``trl``: ``trl.GRPOTrainer`` with a PEFT ``LoraConfig`` and its native ``transformers`` generation; prompts in
  dataset order (``shuffle_dataset=False``), ``min_new_tokens = max_completion_length`` so no row stops early.

Both take step times from just before sampling to the end of the optimizer step (TRL: ``on_step_begin`` to
``on_step_end``) and split them into rollout (generation + scoring) and training. Peak memory: the resident-set
high-water mark from just before the first step to the end of the timed steps. Completions differ between the
systems (different RNG paths); the token counts do not. The same-work check of the loss: after its timed steps the
TRL worker recomputes ft-prog's step-0 loss and gradient on TRL's own step-0 rollout and advantages (same initial
weights) and compares them with TRL's loss and its clipped LoRA gradients.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from benchmarks import workload
from benchmarks.worker import (
    LR, MAX_GRAD_NORM, Memory, _config, _hf_attention, build_ftprog, lora_a_init, profile_step, profiler_activities,
    sync, time_breakdown, torch_dtype,
)

PAD_ID = 0
EOS_ID = 1  # TRL needs an end token; it is never generated (min_new_tokens)


def token_reward(ids: list[int]) -> float:
    """The benchmark's reward: the mean of ``(id mod 7) / 6`` over a completion's tokens, in [0, 1] (deterministic,
    cheap, and rarely equal across a group, so advantages are not 0)."""
    return sum((t % 7) / 6 for t in ids) / max(len(ids), 1)


# ------------------------------------------------------------------------------------------------ rollout


def run_rollout(case: dict[str, Any]) -> dict[str, Any]:
    """``warmup + repeats`` batched sampled generations of ``new_tokens`` tokens from the case's prompts: generated
    tokens/s of each timed one, and the peak memory over them."""
    import torch

    if case["system"] == "hf":
        import transformers  # noqa: F401  (before the baseline RSS is read)
    device, n_new = case["device"], case["new_tokens"]
    mem = Memory(device)
    prompts = workload.prompts(case["workload"])
    if case["system"] == "ftprog":
        from ftprog.core import load_pretrained
        from ftprog.programs.generate import generate

        model = load_pretrained(case["checkpoint"], dtype=torch_dtype(case["dtype"]), device=device)

        def run(seed: int) -> list[int]:
            out, logps = generate(model, prompts, max_new_tokens=n_new, stop_ids=(), pad_id=PAD_ID,
                                  temperature=case["temperature"], top_p=case["top_p"], seed=seed,
                                  return_logprobs=True)
            assert all(len(lp) == len(o) for lp, o in zip(logps, out))
            return [len(o) for o in out]
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            case["checkpoint"], dtype=torch_dtype(case["dtype"]), attn_implementation=_hf_attention(case)
        ).to(device).eval()
        ids, attention = left_padded(prompts, device)

        def run(seed: int) -> list[int]:
            torch.manual_seed(seed)
            with torch.no_grad():
                res = model.generate(ids, attention_mask=attention, do_sample=True, temperature=case["temperature"],
                                     top_p=case["top_p"], top_k=0, max_new_tokens=n_new, min_new_tokens=n_new,
                                     pad_token_id=PAD_ID, eos_token_id=None)
            return [res.shape[1] - ids.shape[1]] * len(prompts)

    mem.start()
    times, counts = [], []
    for k in range(case["warmup"] + case["repeats"]):
        sync(device)
        t0 = time.perf_counter()
        lengths = run(k)
        sync(device)
        times.append(time.perf_counter() - t0)
        counts.append(sum(lengths))
    out = mem.stop()
    w = case["warmup"]
    rates = [n / t for n, t in zip(counts[w:], times[w:])]
    return {**out, "rows": len(prompts), "prompt_tokens": sum(len(p) for p in prompts),
            "longest_prompt": max(len(p) for p in prompts), "generated": counts, "run_times": times[w:],
            "warmup_times": times[:w], "tokens_per_s_runs": rates, "tokens_per_s": statistics.median(rates)}


def left_padded(prompts: list[list[int]], device):
    """``(ids, attention_mask)`` ``[rows, longest]``: the prompts left-padded with ``PAD_ID``."""
    import torch

    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = torch.tensor(p)
        mask[r, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------ grpo step


def run_grpo(case: dict[str, Any]) -> dict[str, Any]:
    """``warmup + steps`` GRPO steps (and, with ``profile``, one more under the profiler): step, rollout and training
    times, losses, per-step token counts, and the peak memory of the timed steps."""
    if case["system"] == "trl":  # imported before the baseline RSS is read, as the trainer needs them
        import peft  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401

        return _run_trl(case)
    return _run_ftprog(case)


def step_prompts(case: dict[str, Any]) -> list[list[list[int]]]:
    """The prompts of each step (``prompts`` of them), in the order both systems take them."""
    prompts, size = workload.prompts(case["workload"]), case["prompts"]
    return [prompts[i: i + size] for i in range(0, len(prompts) - size + 1, size)]


def grpo_config(case: dict[str, Any]):
    from ftprog.programs.grpo_config import GRPOConfig, GRPOLossSection

    return GRPOConfig(group_size=case["group"], max_new_tokens=case["new_tokens"], temperature=case["temperature"],
                      top_p=case["top_p"], num_iterations=1, loss=GRPOLossSection(type="grpo", beta=0.0))


def _run_ftprog(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ftprog.core import grpo_normalizer, optim, value_and_grad
    from ftprog.programs.host_memory import allocator_note
    from ftprog.programs.grpo import sample_and_score, step_loss
    from ftprog.programs.training import apply_gradients
    from ftprog.transforms import without_adapters

    device, n_steps = case["device"], case["warmup"] + case["steps"]
    out: dict[str, Any] = {}
    mem = Memory(device)
    out["allocator"] = allocator_note()  # the harness preloads what `ft-prog run grpo` does
    cfg = grpo_config(case)
    steps = step_prompts(case)
    flat = [p for s in steps for p in s]
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731  (the reward reads the ids back)
    data = SimpleNamespace(ids=flat, columns=[{} for _ in flat], prompts=[decode(p) for p in flat],
                           where=[f"prompt {i}" for i in range(len(flat))])
    reward_fns = [("token_reward", lambda prompts, completions, **_: [
        token_reward([int(t) for t in c.split()]) for c in completions])]
    sample = dict(max_new_tokens=cfg.max_new_tokens, stop_ids=[], pad_id=PAD_ID, stop_strings=[], decode=decode,
                  all_steps=False)
    state = {"model": build_ftprog(case)}
    out["params"] = state["model"].num_params()
    out["trainable_params"] = sum(t.numel() for t in state["model"].trainable_params().values())
    opt = optim.adamw(LR)
    state["opt"] = opt.init(state["model"].trainable_params())
    grad_fn = value_and_grad(step_loss, has_aux=True)
    scratch = tempfile.mkdtemp(prefix="grpo-bench-")  # apply_gradients names it in its non-finite error
    record: dict[str, list] = {k: [] for k in ("rows", "prompt_tokens", "completion_tokens", "rollout", "train",
                                               "generate")}

    def step(k: int):
        indices = list(range(k * case["prompts"], (k + 1) * case["prompts"]))
        t0 = time.perf_counter()
        batch, stats = sample_and_score(state["model"], cfg, data, indices, reward_fns, torch.tensor([1.0]),
                                        SimpleNamespace(decode=decode), sample, without_adapters, device)
        sync(device)
        t1 = time.perf_counter()
        tokens = int((batch.targets != -100).sum())
        normalizer = grpo_normalizer(cfg.loss.type, len(batch.advantages), tokens, cfg.max_new_tokens)
        (loss, _), grads = grad_fn(state["model"], cfg, batch, normalizer)
        loss = loss.cpu()
        state["model"], state["opt"], _, _ = apply_gradients(state["model"], grads, loss, opt, state["opt"],
                                                             MAX_GRAD_NORM, k, scratch)
        sync(device)
        record["rollout"].append(t1 - t0)
        record["train"].append(time.perf_counter() - t1)
        record["rows"].append(len(batch.advantages))
        record["prompt_tokens"].append(sum(len(data.ids[i]) for i in indices) * cfg.group_size)
        record["completion_tokens"].append(tokens)
        generated = stats["completion_length"] * len(batch.advantages)
        record["generate"].append(generated / stats["rollout_tokens_per_s"])  # its generate call alone
        return loss, stats

    mem.start()
    times, losses, rewards = [], [], []
    for k in range(n_steps):
        sync(device)
        t0 = time.perf_counter()
        loss, stats = step(k)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        rewards.append(stats["reward"])
    out.update(mem.stop())
    if case.get("profile"):
        out["time_breakdown"] = profile_step(lambda: step(n_steps), device)
    out.update(_facts(record, n_steps), step_times=times[case["warmup"]:], warmup_times=times[: case["warmup"]],
               losses=losses, rewards=rewards, generate_times=record["generate"][:n_steps])
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def _facts(record: dict[str, list], n_steps: int) -> dict[str, Any]:
    return {"step_rows": record["rows"][:n_steps], "step_prompt_tokens": record["prompt_tokens"][:n_steps],
            "step_completion_tokens": record["completion_tokens"][:n_steps],
            "rollout_times": record["rollout"][:n_steps], "train_times": record["train"][:n_steps]}


def _tokenizer(vocab_size: int):
    """A word-level tokenizer whose words are the token ids (``t17`` is id 17): TRL tokenizes the text prompts
    back to exactly the benchmark's ids."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab_size)} | {"<pad>": PAD_ID, "<eos>": EOS_ID}  # no special word is a
    del words[f"t{PAD_ID}"], words[f"t{EOS_ID}"]  # prefix of another (an added token would split "t17" at "t1")
    tok = Tokenizer(WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


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
    steps = step_prompts(case)[: n_steps + profile]
    flat = [p for s in steps for p in s]
    tokenizer = _tokenizer(_config(case)["vocab_size"])
    texts = [" ".join(f"t{t}" for t in p) for p in flat]
    if tokenizer(text=texts)["input_ids"] != flat:
        raise RuntimeError("the word-level tokenizer does not give back the benchmark's prompt ids")
    dataset = datasets.Dataset.from_dict({"prompt": texts})
    model = transformers.AutoModelForCausalLM.from_pretrained(case["checkpoint"], dtype=torch_dtype(case["dtype"]),
                                                              attn_implementation="sdpa").to(device)
    targets = sorted(adapted_names(case["targets"]))
    lora = peft.LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"], lora_dropout=0.0, target_modules=targets,
                           task_type="CAUSAL_LM")
    scratch = tempfile.mkdtemp(prefix="grpo-bench-trl-")
    rows = case["prompts"] * case["group"]
    args = trl.GRPOConfig(
        output_dir=scratch, per_device_train_batch_size=rows, num_generations=case["group"],
        max_completion_length=case["new_tokens"], generation_kwargs={"min_new_tokens": case["new_tokens"]},
        temperature=case["temperature"], top_p=case["top_p"], top_k=0, beta=0.0, num_iterations=1,
        loss_type="grpo", scale_rewards="group", epsilon=0.2, max_steps=n_steps + profile, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        gradient_checkpointing=False, bf16=False, fp16=False, use_vllm=False, shuffle_dataset=False,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        use_cpu=device == "cpu", dataloader_num_workers=0)
    record: dict[str, list] = {k: [] for k in ("rows", "prompt_tokens", "completion_tokens", "rollout", "train",
                                               "losses", "times", "rewards", "generate")}
    step0: dict[str, Any] = {}

    def ids_reward(prompts, completions, completion_ids, **_):
        return [token_reward(c) for c in completion_ids]

    class Trainer(trl.GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            res = super()._generate_and_score_completions(inputs)
            sync(device)
            record["rollout"].append(time.perf_counter() - t0)
            return res

        def _generate(self, prompts):
            t0 = time.perf_counter()
            res = super()._generate(prompts)
            record["generate"].append(time.perf_counter() - t0)
            return res

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(float(loss.detach()))
            record["rows"].append(int(inputs["completion_ids"].shape[0]))
            record["prompt_tokens"].append(int(inputs["prompt_mask"].sum()))
            record["completion_tokens"].append(int(inputs["completion_mask"].sum()))
            if not step0:
                step0.update({k: inputs[k].detach().cpu() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                     "completion_mask", "advantages")})
            return loss

    class Clock(transformers.TrainerCallback):
        """Times each step; resets the memory peak before the first and reads it after the last timed one; keeps
        step 0's clipped LoRA gradients; profiles the extra step after the timed ones."""

        def on_train_begin(self, args, state, control, **kw):
            mem.start()

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == n_steps:  # the extra step
                self.prof = torch.profiler.profile(activities=profiler_activities(device))
                self.prof.__enter__()
            sync(device)
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if state.global_step == 0:
                step0["grads"] = {n: p.grad.detach().float().cpu().clone() for n, p in trainer.model.named_parameters()
                                  if p.requires_grad and p.grad is not None}

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

    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      reward_funcs=[ids_reward], peft_config=lora, callbacks=[Clock()])
    out["reference"] = "none (beta 0)" if trainer.ref_model is None else "a reference model"
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
    record["train"] = [t - r for t, r in zip(record["times"], record["rollout"])]
    w = case["warmup"]
    out.update(_facts(record, n_steps), step_times=record["times"][w:n_steps], warmup_times=record["times"][:w],
               losses=record["losses"][:n_steps], generate_times=record["generate"][:n_steps])
    out["step0_check"] = ftprog_on_trl_rollout(case, step0, record["losses"][0])
    return out


def ftprog_on_trl_rollout(case: dict[str, Any], step0: dict[str, Any], trl_loss: float) -> dict[str, Any]:
    """ft-prog's step-0 loss and clipped gradient on TRL's step-0 rollout and advantages, at the same initial weights
    (rollout log-probs = the policy's own, so every ratio is 1, as in TRL with ``num_iterations = 1``), against
    TRL's loss and clipped LoRA gradients: the relative L2 difference of the gradients."""
    import torch

    from ftprog.core import grpo_normalizer, token_logprobs, value_and_grad
    from ftprog.programs.grpo import Rollouts, rollout_rows, step_loss

    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(step0["prompt_ids"], step0["prompt_mask"])]
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(step0["completion_ids"], step0["completion_mask"])]
    model = build_ftprog({**case, "device": "cpu"})
    zeros = [[0.0] * len(c) for c in completions]
    tokens, targets, mask, _ = rollout_rows(prompts, completions, zeros, [True] * len(prompts), PAD_ID)
    cfg = grpo_config(case)
    with torch.no_grad():
        own = token_logprobs(model, tokens, targets, attention_mask=mask, training=False, temperature=cfg.temperature)
    batch = Rollouts(tokens, targets, mask, own.float(), step0["advantages"].float())
    normalizer = grpo_normalizer("grpo", len(prompts), int((targets != -100).sum()), cfg.max_new_tokens)
    (loss, _), grads = value_and_grad(step_loss, has_aux=True)(model, cfg, batch, normalizer)
    norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads.values()))
    scale = min(1.0, MAX_GRAD_NORM / (float(norm) + 1e-6))  # torch's clip_grad_norm_
    theirs = {n.replace("base_model.model.", "", 1).replace(".default", ""): g for n, g in step0["grads"].items()}
    if set(theirs) != set(grads):
        raise RuntimeError(f"LoRA parameter names differ: {sorted(set(theirs) ^ set(grads))[:4]}")
    diff = torch.sqrt(sum((g.float() * scale - theirs[n]).pow(2).sum() for n, g in grads.items()))
    trl_norm = torch.sqrt(sum(g.pow(2).sum() for g in theirs.values()))
    return {"ftprog_loss": float(loss), "trl_loss": trl_loss, "ftprog_grad_norm": float(norm),
            "ftprog_clipped_grad_norm": float(norm) * scale, "trl_clipped_grad_norm": float(trl_norm),
            "grad_rel_diff": float(diff / max(float(trl_norm), 1e-30)),
            "max_abs_advantage": float(step0["advantages"].abs().max())}
