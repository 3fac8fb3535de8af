"""One measurement in a fresh process: ``python -m benchmarks.worker CASE.json RESULT.json``.

The harness (:mod:`benchmarks.harness`) writes a case (a JSON object, ``kind`` one of ``weights``, ``peak``,
``train``, ``sft``, ``generate``, ``dpo``, ``rollout``, ``grpo``), starts this module in a new interpreter with the
thread count in the environment, and reads the result back. A fresh process per measurement makes peak memory (resident set
on CPU, ``max_memory_allocated`` on CUDA) belong to that configuration alone.

Systems: ``ftprog`` (this library, as ``programs/sft.py`` runs a step: ``value_and_grad`` of the chunked
target-only loss, ``clip_by_global_norm``, AdamW updating in place) and ``hf`` (transformers + PEFT, as the
``Trainer`` runs a step: ``model(input_ids, labels=...)`` with full-vocabulary logits, ``loss.backward()``,
``clip_grad_norm_``, ``torch.optim.AdamW(fused=True)``, its default optimizer). Both load the same
safetensors checkpoint; LoRA ``A`` matrices are initialised identically, ``B`` is zero. The fixed-shape
``train`` cases and the ``sft`` workload have a third system, ``torchtune`` (:mod:`benchmarks.torchtune_worker`),
run by the torchtune environment's interpreter.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.flops import moe_shape

LR = 1e-4
MAX_GRAD_NORM = 1.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------ memory


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int | None:
    """Resident set size now (bytes)."""
    return _status("VmRSS")


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that memory a process freed while
    loading (a dtype cast, the bf16 weights NF4 replaced) does not count as training memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """``VmHWM``: the most resident memory since the process started or :func:`reset_peak_rss`."""
    return _status("VmHWM")


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Memory:
    """Peak memory of a region: resident set on CPU, allocator statistics on CUDA."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = rss()

    def start(self) -> None:
        import torch

        gc.collect()
        trim_heap()
        self.before = rss()
        self.reset = reset_peak_rss()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_before = torch.cuda.memory_allocated()

    def stop(self) -> dict[str, Any]:
        import torch

        out = {"rss_baseline": self.baseline, "rss_before": self.before,
               "rss_peak": peak_rss() if self.reset else None, "ru_maxrss": ru_maxrss()}
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            out.update(cuda_allocated_before=self.cuda_before, cuda_max_allocated=torch.cuda.max_memory_allocated(),
                       cuda_max_reserved=torch.cuda.max_memory_reserved())
        return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


# ------------------------------------------------------------------------------------------------- models


def lora_a_init(config: dict[str, Any], rank: int, targets: set[str], seed: int = 0) -> dict[tuple[int, str], Any]:
    """The LoRA ``A`` matrices ``ftprog.transforms.lora(seed=seed)`` draws, keyed ``(layer, projection)``."""
    import torch

    from benchmarks.flops import _linears

    lin = _linears(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(config["num_hidden_layers"]):
        for name in LINEARS:
            if name in targets:
                fan_in = lin[name][0]
                a = torch.empty(rank, fan_in)
                bound = 1 / math.sqrt(fan_in)
                a.uniform_(-bound, bound, generator=gen)
                out[(i, name)] = a
    return out


def build_ftprog(case: dict[str, Any]):
    import torch

    from ftprog.core import load_pretrained
    from ftprog.transforms import checkpoint, compile, fuse_projections, lora, offload_activations, quantize, trainable

    method, stack = case["method"], case.get("stack", [])
    model = load_pretrained(case["checkpoint"], dtype=torch_dtype(case["dtype"]), device=case["device"])
    if method == "qlora":
        model = quantize(model, "nf4")
    if method == "full":
        model = trainable(model)
    else:
        model = lora(model, rank=case["rank"], alpha=2 * case["rank"], targets=tuple(case["targets"]),
                     dora=method == "dora")
    if "checkpoint" in stack:
        model = checkpoint(model)
    if "fuse" in stack:
        model = fuse_projections(model)
    if "offload" in stack:
        if model.device.type != "cuda":
            raise RuntimeError("unavailable: activation offloading runs on CUDA only (a no-op on the CPU)")
        model = offload_activations(model)
    if "compile" in stack:
        model = compile(model)
    del torch
    return model


def build_hf(case: dict[str, Any]):
    import torch
    import transformers

    from benchmarks.flops import adapted_names

    method, stack = case["method"], case.get("stack", [])
    if method == "qlora":
        raise RuntimeError("unavailable: QLoRA in transformers needs bitsandbytes 4-bit layers (not installed; "
                           "no CPU kernels)")
    attn = case.get("attn_implementation", _hf_attention(case))
    model = transformers.AutoModelForCausalLM.from_pretrained(case["checkpoint"], dtype=torch_dtype(case["dtype"]),
                                                              attn_implementation=attn).to(case["device"])
    model.config.use_cache = False
    if "checkpoint" in stack:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.get("adapter"):  # LoRA on experts: ft-prog's initial adapter, which PEFT fuses into its expert adapters
        import peft

        model = peft.PeftModel.from_pretrained(model, case["adapter"], is_trainable=True)
    elif method in ("lora", "dora"):
        import peft

        targets = sorted(adapted_names(case["targets"]))
        config = peft.LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"], lora_dropout=0.0,
                                 target_modules=targets, use_dora=method == "dora")
        model = peft.get_peft_model(model, config)
        inits = lora_a_init(json.loads((Path(case["checkpoint"]) / "config.json").read_text()), case["rank"],
                            set(targets))
        layers = model.base_model.model.model.layers
        with torch.no_grad():
            for (i, name), a in inits.items():
                parent = layers[i].self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layers[i].mlp
                getattr(parent, name).lora_A["default"].weight.copy_(a)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    forward = torch.compile(model) if "compile" in stack else model
    return model, forward


def baseline_adamw(params):
    """The baselines' optimizer: ``torch.optim.AdamW`` at ``LR``, fused where the device has the kernel (as the
    Trainer and torchtune's recipes configure it)."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=LR, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=LR)


LOW_BIT_STACKS = {"int8-state": "int8", "fp8-state": "fp8", "int4-state": "int4"}
"""Stacks that give ft-prog's AdamW torchao's block-quantized moments (``optimizer.state_dtype``)."""


def optimizer_state_dtype(case: dict[str, Any]):
    """ft-prog's AdamW moments: for full fine-tuning in the params' dtype, as ``torch.optim.AdamW`` keeps them
    for the baseline's bf16 params (identical work; stack ``fp32-state`` keeps fp32 moments instead, ``int8-state``
    / ``fp8-state`` / ``int4-state`` torchao's quantized ones; ``stochastic-rounding``, ft-prog's default, rounds the
    bf16 params and moments stochastically); LoRA adapters are fp32 in both systems, and so are their moments."""
    stack = case.get("stack", [])
    low_bit = [LOW_BIT_STACKS[x] for x in stack if x in LOW_BIT_STACKS]
    if low_bit:
        return low_bit[0]
    if case["method"] != "full" or "fp32-state" in stack:
        return None
    return torch_dtype(case["dtype"])


def plan_summary(case: dict[str, Any], cfg: dict[str, Any], *, batch: int, seq: int, mask: bool) -> dict[str, Any]:
    """What ``ftprog.programs.plan.estimate`` predicts for this case (compared with the measured peak)."""
    from ftprog.programs.plan import estimate

    p = estimate(cfg, method=case["method"], dtype=case["dtype"], batch_size=batch, seq_len=seq,
                 rank=case.get("rank", 8), targets=tuple(case.get("targets", ("q_proj", "v_proj"))),
                 state_dtype=str(optimizer_state_dtype(case) or "fp32").replace("torch.", ""),
                 checkpoint="checkpoint" in case.get("stack", []), mask=mask,
                 fuse_projections="fuse" in case.get("stack", []),
                 in_backward="in-backward" in case.get("stack", []),
                 stochastic_rounding="stochastic-rounding" in case.get("stack", []),
                 device=case["device"], max_grad_norm=MAX_GRAD_NORM)
    return {"peak": p.peak, "tensor_peak": p.tensor_peak, "overhead": p.overhead, "phase": p.peak_phase,
            "phases": p.phases, "weights": p.weights, "adapters": p.adapters, "gradients": p.gradients,
            "optimizer": p.optimizer, "activations": p.activations, "loss_chunk": p.loss_chunk,
            "approximate": "compile" in case.get("stack", [])}


def _import_hf() -> None:
    import importlib

    for name in ("transformers", "peft"):
        importlib.import_module(name)


def _import_torchtune() -> None:
    """torchtune and the benchmark's torchtune worker (the torchtune environment: no ftprog, transformers, peft)."""
    import importlib

    for name in ("torchtune.models.llama3", "benchmarks.torchtune_worker"):
        importlib.import_module(name)


def _hf_attention(case: dict[str, Any]) -> str:
    """SDPA where transformers has it; Gemma 2 has only eager attention there (its scores are soft-capped)."""
    return "eager" if _config(case).get("model_type") == "gemma2" else "sdpa"


def _config(case: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(case["checkpoint"]) / "config.json").read_text())


# -------------------------------------------------------------------------------------------------- kinds


def run_weights(case: dict[str, Any]) -> dict[str, Any]:
    """Write the random-weight checkpoint both systems load."""
    from ftprog.core import from_config, save_pretrained

    model = from_config(case["config"], seed=case.get("seed", 0), dtype=torch_dtype(case["dtype"]))
    save_pretrained(model, case["path"])
    for a in case.get("adapters", ()):  # the initial adapters of LoRA cases on experts (harness.moe_adapters)
        from ftprog.transforms import lora, save_adapter

        save_adapter(lora(model, rank=a["rank"], alpha=2 * a["rank"], targets=tuple(a["targets"])), a["path"])
    return {"path": case["path"], "params": model.num_params()}


def run_peak(case: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.flops import measure_matmul_peak

    return measure_matmul_peak(case["device"], case["dtype"], case.get("seconds", 1.0))


def _timed(step, device: str, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for _ in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return times, losses


# Where a step's time goes: op names of each category (aten ops, by self time, so an op that dispatches to
# another is not counted twice). Matmul names match exactly; the others by substring.
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_scaled_mm",
              "aten::_int_mm", "aten::mkldnn_linear"}
TIME_CATEGORIES = (("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
                   ("optimizer", ("_fused_adam", "_foreach_", "_fused_sgd")),
                   ("softmax", ("softmax",)))


def profile_step(step, device: str) -> dict[str, Any]:
    """One more step under ``torch.profiler``: ``{"basis", "step_s", "total_s", "parts": {category: s}, "top_ops"}``
    (``top_ops``: the 8 aten ops with the most time, ``{"op", "s", "calls"}``).

    CPU: the self CPU time of every aten op (one thread: about the step's wall time); CUDA: the GPU time of the
    kernels each op launched (``step_s - total_s`` is then time the GPU sat idle). Categories: ``matmul`` (the
    ops in :data:`MATMUL_OPS`), ``attention``, ``optimizer``, ``softmax`` (the loss's vocabulary softmax, and
    any attention computed outside SDPA), ``other`` (element-wise ops, norms, copies, embedding, ...).
    """
    from torch.profiler import profile

    sync(device)
    with profile(activities=profiler_activities(device)) as prof:
        t0 = time.perf_counter()
        step()
        sync(device)
        step_s = time.perf_counter() - t0
    return time_breakdown(prof, device, step_s)


def profiler_activities(device: str) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])


def time_breakdown(prof, device: str, step_s: float) -> dict[str, Any]:
    """:func:`profile_step`'s result from a finished ``torch.profiler.profile`` of one step of ``step_s`` seconds."""
    cuda = device.startswith("cuda")
    parts = {"matmul": 0.0, **{name: 0.0 for name, _ in TIME_CATEGORIES}, "other": 0.0}
    ops = []
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        us = getattr(ev, "self_device_time_total", 0.0) if cuda else ev.self_cpu_time_total
        ops.append((ev.key, us / 1e6, ev.count))
        if ev.key in MATMUL_OPS:
            category = "matmul"
        else:
            category = next((name for name, pieces in TIME_CATEGORIES if any(x in ev.key for x in pieces)), "other")
        parts[category] += us / 1e6
    top = sorted(ops, key=lambda x: -x[1])[:8]
    return {"basis": "GPU kernel time" if cuda else "self CPU time of aten ops", "step_s": step_s,
            "total_s": sum(parts.values()), "parts": parts,
            "top_ops": [{"op": k, "s": t, "calls": n} for k, t, n in top]}


def run_train(case: dict[str, Any]) -> dict[str, Any]:
    """Fixed-shape training steps: ``batch x seq`` random tokens, every position but the last a target."""
    import torch

    if case["system"] == "hf":  # imported before the baseline RSS is read, as the model needs them
        _import_hf()
    elif case["system"] == "torchtune":  # runs in the torchtune environment: no ftprog, transformers or peft
        _import_torchtune()
    device, B, S = case["device"], case["batch"], case["seq"]
    mem = Memory(device)
    cfg = _config(case)
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg["vocab_size"], (B, S), generator=gen).to(device)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    n_targets = int((targets != -100).sum())
    out: dict[str, Any] = {}

    if case["system"] == "ftprog":
        from ftprog.core import optim, token_loss_sum, value_and_grad
        from ftprog.programs.host_memory import allocator_note

        out["allocator"] = allocator_note()  # the harness preloads what `ft-prog run sft` does
        state = {"model": build_ftprog(case)}
        model = state["model"]
        out["params"] = model.num_params()
        out["trainable_params"] = sum(t.numel() for t in model.trainable_params().values())
        opt = optim.adamw(LR, state_dtype=optimizer_state_dtype(case),
                          stochastic_rounding="stochastic-rounding" in case.get("stack", []))
        state["opt"] = opt.init(model.trainable_params())

        def loss_fn(m, tok, tgt):
            return token_loss_sum(m, tok, tgt) / n_targets

        grad_fn = value_and_grad(loss_fn)

        def step():
            m = state["model"]
            loss, grads = grad_fn(m, tokens, targets)
            grads, _ = optim.clip_by_global_norm(grads, MAX_GRAD_NORM, inplace=True)
            params, state["opt"] = opt.update(grads, state["opt"], m.trainable_params(), inplace=True)
            del grads
            state["model"] = m.with_params(params)
            return loss

        def step_in_backward():  # `optimizer.in_backward`: sft's step, each leaf updated as its gradient
            # completes (unclipped: clipping needs every gradient first)
            from ftprog.programs.training import in_backward_step

            loss, _, state["model"], state["opt"], _, _ = in_backward_step(
                lambda m: (loss_fn(m, tokens, targets), {}), state["model"], opt, state["opt"], 0, Path("."))
            return loss

        if "in-backward" in case.get("stack", []):
            step = step_in_backward
        del model
    elif case["system"] == "torchtune":
        from benchmarks.torchtune_worker import train_step

        step, facts = train_step(case, tokens)
        out.update(facts)
    else:
        model, forward = build_hf(case)
        out["params"] = sum(p.numel() for p in model.parameters())
        if moe_shape(cfg):  # a mixture of experts: how transformers computes them
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            out["experts_implementation"] = getattr(base.config, "_experts_implementation", None)
        params = [p for p in model.parameters() if p.requires_grad]
        out["trainable_params"] = sum(p.numel() for p in params)
        opt = baseline_adamw(params)
        labels = tokens  # transformers shifts the labels itself: position i predicts tokens[i + 1]

        def step():
            loss = forward(input_ids=tokens, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    mem.start()
    times, losses = _timed(step, device, case["warmup"], case["steps"])
    out.update(mem.stop())
    if case.get("profile"):  # after the timed steps and the memory reading: neither sees the profiler
        out["time_breakdown"] = profile_step(step, device)
    if case["system"] == "ftprog" and not case.get("baseline_tree"):
        out["plan"] = plan_summary(case, cfg, batch=B, seq=S, mask=False)
    out.update(step_times=times[case["warmup"]:], warmup_times=times[: case["warmup"]], losses=losses,
               tokens_per_step=B * S, targets_per_step=n_targets)
    return out


def padded_batch(data, idx: list[int]):
    """``(input ids, labels, attention mask)`` ``[len(idx), longest]`` of samples ``idx``, right-padded with 0;
    labels are the ids where the sample trains them, else -100 (unshifted, as transformers takes them)."""
    import torch

    width = max(len(data[i][0]) for i in idx)
    ids = torch.zeros(len(idx), width, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    for r, i in enumerate(idx):
        tok, trained = data[i]
        ids[r, : len(tok)] = torch.tensor(tok)
        labels[r, : len(tok)] = torch.where(torch.tensor(trained), torch.tensor(tok), -100)
        mask[r, : len(tok)] = 1
    return ids, labels, mask


def padded_first_batch_loss(model, data, batch_size: int, seed: int, device: str) -> float:
    """The model's mean loss on the baseline's first (padded) batch, before training: the same-work check of
    the model and loss (ft-prog's own first batch is packed, so it holds other samples)."""
    import torch

    from benchmarks import workload
    from ftprog.core import token_loss_sum

    tokens, labels, mask = padded_batch(data, workload.order(len(data), seed)[:batch_size])
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t + 1 (the baseline shifts its labels so)
    with torch.no_grad():
        total = token_loss_sum(model, tokens.to(device), targets.to(device), attention_mask=mask.to(device),
                               training=False)
    return float(total) / int((targets != -100).sum())


def run_sft(case: dict[str, Any]) -> dict[str, Any]:
    """One epoch of the realistic workload (after ``warmup`` untimed batches): effective tokens/s."""
    import torch

    from benchmarks import workload

    device, spec, B = case["device"], case["workload"], case["batch"]
    data = workload.samples(spec)
    if case["system"] == "hf":
        _import_hf()
    elif case["system"] == "torchtune":
        _import_torchtune()
    setting = case["setting"]
    out: dict[str, Any] = {"setting": setting}

    if case["system"] == "ftprog":
        from ftprog.core import DataLoader, TokenizedDataset, optim, token_loss_sum, value_and_grad
        from ftprog.programs.host_memory import allocator_note

        out["allocator"] = allocator_note()  # the harness preloads what `ft-prog run sft` does
        dataset = TokenizedDataset.from_samples(data, spec["seq_len"], pad_id=0)
        # sft's defaults: packed rows (best-fit), document masks, target-only chunked loss; best: + compile, and
        # then (as sft does) one batch shape: a short last batch filled up with empty rows, so no recompile
        loader = DataLoader(dataset, B, packing=True, seq_len=spec["seq_len"], seed=spec.get("seed", 0),
                            fixed_shape=setting == "best")
        n_batches = loader.num_batches(0)
        out["description"] = ("packed rows of seq_len (default), document masks, target-only chunked loss"
                              + (", compiled forward (batches of one shape)" if setting == "best" else ""))
        if setting == "best":
            case = {**case, "stack": [*case.get("stack", []), "compile"]}
        state = {"model": build_ftprog(case)}
        out["check_loss"] = padded_first_batch_loss(state["model"], data, B, spec.get("seed", 0), device)
        opt = optim.adamw(LR)
        state["opt"] = opt.init(state["model"].trainable_params())

        def loss_fn(m, batch):
            return token_loss_sum(m, batch.tokens, batch.targets, **batch.model_kwargs()) / max(batch.num_targets, 1)

        grad_fn = value_and_grad(loss_fn)

        def step(i: int):
            batch = loader.batch(0, i).to(device)
            m = state["model"]
            loss, grads = grad_fn(m, batch)
            grads, _ = optim.clip_by_global_norm(grads, MAX_GRAD_NORM, inplace=True)
            params, state["opt"] = opt.update(grads, state["opt"], m.trainable_params(), inplace=True)
            state["model"] = m.with_params(params)
            return loss, batch.num_targets, batch.num_tokens, batch.tokens.numel()
    elif case["system"] == "torchtune":  # runs in the torchtune environment: no ftprog, transformers or peft
        from benchmarks.torchtune_worker import sft_step

        step, n_batches, facts = sft_step(case, data)
        out.update(facts)
    else:
        order = workload.order(len(data), spec.get("seed", 0))
        flat = False
        if setting == "best":
            from transformers.utils import is_flash_attn_2_available

            if device.startswith("cuda") and is_flash_attn_2_available():
                case = {**case, "attn_implementation": "flash_attention_2"}
                flat = True
                out["description"] = "padding-free packing (flash_attention_2, position ids), full-vocab logits"
                from ftprog.core._data import pack_rows

                rows = pack_rows([len(ids) for ids, _ in data], order, spec["seq_len"])
                groups = [[i for row in rows[k : k + B] for i in row] for k in range(0, len(rows), B)]
            else:
                from transformers.trainer_pt_utils import LengthGroupedSampler

                sampler = LengthGroupedSampler(B, lengths=[len(ids) for ids, _ in data],
                                               generator=torch.Generator().manual_seed(spec.get("seed", 0)))
                order = list(sampler)
                groups = [order[k : k + B] for k in range(0, len(order), B)]
                out["description"] = ("group_by_length padded batches (flash-attention packing unavailable), "
                                      "full-vocab logits")
        else:
            groups = [order[k : k + B] for k in range(0, len(order), B)]
            out["description"] = "padded batches (Trainer default), full-vocab logits"
        n_batches = len(groups)
        model, forward = build_hf(case)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = baseline_adamw(params)

        def collate(idx: list[int]):
            if flat:
                ids = torch.tensor([t for i in idx for t in data[i][0]])[None]
                labels = torch.tensor([t if m and j > 0 else -100 for i in idx
                                       for j, (t, m) in enumerate(zip(*data[i]))])[None]
                pos = torch.cat([torch.arange(len(data[i][0])) for i in idx])[None]
                return {"input_ids": ids, "labels": labels, "position_ids": pos}, ids.numel()
            ids, labels, mask = padded_batch(data, idx)
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}, ids.numel()

        def step(i: int):
            inputs, cells = collate(groups[i])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            loss = forward(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lab = inputs["labels"]
            n_targets = int((lab[:, 1:] != -100).sum())
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
            return loss.detach(), n_targets, real, cells

    mem = Memory(device)
    mem.start()
    warm_losses = []
    for i in range(min(case["warmup"], n_batches)):
        loss, *_ = step(i)
        warm_losses.append(float(loss))
    sync(device)
    times, targets, real, cells = [], 0, 0, 0
    start = time.perf_counter()
    for i in range(n_batches):
        t0 = time.perf_counter()
        loss, n_t, n_r, n_c = step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
        targets += n_t
        real += n_r
        cells += n_c
        if case.get("print_steps"):  # the long-run case places its memory samples on steps by these lines
            print(f"step {i + 1}", flush=True)
    total = time.perf_counter() - start
    out.update(mem.stop())
    if case["system"] == "ftprog" and not case.get("baseline_tree"):  # padded batches: the plan's worst case
        out["plan"] = plan_summary(case, _config(case), batch=B, seq=spec["seq_len"], mask=True)
    out.update(first_loss=out.get("check_loss", warm_losses[0] if warm_losses else None), batches=n_batches, epoch_s=total, step_times=times,
               trained_tokens=targets, real_tokens=real, batch_cells=cells, padding_share=1 - real / max(cells, 1),
               effective_tokens_per_s=targets / total, real_tokens_per_s=real / total)
    return out


def run_generate(case: dict[str, Any]) -> dict[str, Any]:
    """Greedy generation of ``new_tokens`` tokens after a ``prompt_len``-token prompt, batch 1."""
    import torch

    device, n_new = case["device"], case["new_tokens"]
    cfg = _config(case)
    gen = torch.Generator().manual_seed(99)
    prompt = torch.randint(3, cfg["vocab_size"], (case["prompt_len"],), generator=gen).tolist()
    if case["system"] == "ftprog":
        from ftprog.core import load_pretrained
        from ftprog.programs.generate import generate

        model = load_pretrained(case["checkpoint"], dtype=torch_dtype(case["dtype"]), device=device)

        def run(n: int) -> list[int]:
            return generate(model, [prompt], max_new_tokens=n, stop_ids=())[0]
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            case["checkpoint"], dtype=torch_dtype(case["dtype"]), attn_implementation=_hf_attention(case)
        ).to(device).eval()
        ids = torch.tensor([prompt], device=device)

        def run(n: int) -> list[int]:
            with torch.no_grad():
                res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)
            return res[0, ids.shape[1]:].tolist()

    run(4)  # warm-up
    times = {}
    outputs = None
    for n in (1, n_new):
        best = float("inf")
        for _ in range(case.get("repeats", 3)):
            sync(device)
            t0 = time.perf_counter()
            res = run(n)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        times[n] = best
        if n == n_new:
            outputs = res
    decode = (n_new - 1) / max(times[n_new] - times[1], 1e-9)
    return {"prompt_len": len(prompt), "new_tokens": n_new, "prefill_s": times[1], "total_s": times[n_new],
            "tokens_per_s": n_new / times[n_new], "decode_tokens_per_s": decode, "output": outputs}


def run_dpo(case: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.dpo_worker import run_dpo

    return run_dpo(case)


def run_rollout(case: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.grpo_worker import run_rollout

    return run_rollout(case)


def run_grpo(case: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.grpo_worker import run_grpo

    return run_grpo(case)


def run_distill(case: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.distill_worker import run_distill

    return run_distill(case)


KINDS = {"weights": run_weights, "peak": run_peak, "train": run_train, "sft": run_sft, "generate": run_generate,
         "dpo": run_dpo, "rollout": run_rollout, "grpo": run_grpo, "distill": run_distill}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    case_file, result_file = Path(argv[0]), Path(argv[1])
    case = json.loads(case_file.read_text())
    if case.get("system") == "ftprog-base":  # an earlier ft-prog on the import path: the same code, no plan
        case = {**case, "system": "ftprog", "baseline_tree": True}
    import torch

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        result = KINDS[case["kind"]](case)
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - the harness records the failure and goes on
        msg = str(e)
        result = {"ok": False, "error": msg if msg.startswith("unavailable") else f"{type(e).__name__}: {msg}",
                  "traceback": traceback.format_exc()[-3000:]}
    result.update(threads=torch.get_num_threads(), wall_s=time.perf_counter() - start, pid=os.getpid())
    if "ftprog.core" in sys.modules:  # which source tree ran (--ftprog-baseline puts an earlier one first)
        result["ftprog_source"] = str(Path(sys.modules["ftprog.core"].__file__).resolve().parent.parent)
    result_file.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
