"""The benchmark harness: cases, fresh-process workers run round-robin, aggregation, comparisons.

    python -m benchmarks --preset quick                 # smoke test, under a minute
    python -m benchmarks --preset cpu-target            # the CPU comparison (about 20-30 min on 2 cores)
    python -m benchmarks --preset gpu                   # Llama 3.2 1B shape on one GPU (benchmarks/gpu.sh)
    python -m benchmarks --preset cpu-target --list     # print the cases only
    python -m benchmarks --preset cpu-target --torchtune-python tt/bin/python   # + torchtune (benchmarks/README.md)
    python -m benchmarks --preset cpu-target --only dpo                 # the LoRA DPO step against TRL's DPOTrainer
    python -m benchmarks --preset cpu-target --only rollout,grpo        # rollouts vs generate, GRPO vs GRPOTrainer
    python -m benchmarks --preset cpu-target --only distill             # the KD step: chunked loss vs full logits
    python -m benchmarks --preset moe --threads 1       # tiny mixture of experts, LoRA on experts, vs transformers + PEFT

Every measurement runs in its own fresh interpreter (:mod:`benchmarks.worker`), so peak memory belongs to
one configuration; the cases of a round run one after the other and rounds are rotated (round ``r`` starts
at case ``r``), so slow drifts of a shared machine spread over all systems. Outputs go to
``benchmarks/results/<name>/``: ``results.json`` (everything, raw step times included), ``results.md``
and ``results.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.flops import train_step_flops
from ftprog.programs.host_memory import allocator_library, preload_env

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# The fixed-shape train cases torchtune runs (benchmarks/torchtune_worker.py); it runs the sft workload too.
TORCHTUNE_METHODS = ("lora", "full")
TORCHTUNE_STACKS = ((), ("checkpoint",))
# ft-prog settings no baseline has (the optimizer's moments in another dtype, its step in the backward, fused
# projections, activation offloading): cases with them are compared with the baseline's case without them.
FTPROG_ONLY_STACKS = ("fp32-state", "int8-state", "fp8-state", "int4-state", "in-backward", "fuse", "offload",
                      "stochastic-rounding")
# Baselines ft-prog is compared against, in table order; ftprog-base: an earlier ft-prog (--ftprog-baseline);
# trl: TRL's DPOTrainer (the dpo cases).
BASELINES = ("hf", "torchtune", "trl", "ftprog-base")
# Case kinds a preset builds (--only picks some).
CASE_KINDS = ("train", "sft", "generate", "dpo", "rollout", "grpo", "distill")
# The target for the DPO case: ft-prog's tokens/s at least this many times TRL's, its peak memory at most
# this share of TRL's.
DPO_TARGET = {"speedup": 1.3, "memory_ratio": 0.7}
# Issue 18's target for the GRPO case: ft-prog's step speed (generated tokens per second of step time) at least this
# many times TRL's GRPOTrainer's, its peak memory at most this share of TRL's.
GRPO_TARGET = {"speedup": 1.5, "memory_ratio": 0.6}

# Settings torchtune publishes peak memory for, as ft-prog cases of the same setting (last in the gpu preset, so
# the time budget drops them first). torchtune publishes nothing for the Llama 3.2 1B shape.
PUBLISHED = [
    {"method": "lora", "stack": ["checkpoint", "compile"], "dtype": "bf16",
     "case": {"shape": "llama-3.2-3b", "batch": 2, "seq": 4096, "rank": 64,
              "targets": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
     "reference": {"source": "torchtune 0.6.1 README, 'Optimization flags' table, LoRA row: Llama 3.2 3B, batch 2, "
                             "seq 4096 packed, bf16, compile, chunked cross-entropy, activation checkpointing, LoRA "
                             "r=64 on q, v, output and MLP (3B_lora_single_device), one A100",
                   "peak_memory_gib": 8.5, "memory_kind": "peak active memory", "tokens_per_s": 8210,
                   "hardware": "A100"}},
]

# Issue 16's target for the mixture-of-experts case (preset ``moe``): ft-prog's LoRA step at least this many times
# transformers + PEFT's tokens/s.
MOE_TARGET = {"speedup": 1.5}
# Benchmark-only model shapes (config.json dicts), besides ``ftprog.core.PRESETS``: tiny mixtures of experts, 8
# experts, top-2 (Mixtral's architecture); ``moe-test`` is the test suite's.
_MIXTRAL = {"model_type": "mixtral", "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "rope_theta": 10000.0, "max_position_embeddings": 2048, "num_local_experts": 8, "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.02, "sliding_window": None}
SHAPES = {
    "moe-tiny": {**_MIXTRAL, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192},
    "moe-test": {**_MIXTRAL, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
}

# Loss agreement between the systems at step 0 (same weights, same batch): relative tolerance by dtype.
LOSS_TOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}
# The GRPO check's gradients (ft-prog's and TRL's on TRL's step-0 rollout): relative L2 difference by dtype. In bf16
# every layer's activations and both systems' log-prob paths round differently (~1e-2 seen on cpu-default); fp32
# agrees to ~1e-6.
GRAD_TOL = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


# ------------------------------------------------------------------------------------------------ presets


def _train(system, method, stack=(), **kw) -> dict[str, Any]:
    return {"kind": "train", "system": system, "method": method, "stack": list(stack), **kw}


def preset_cases(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(settings, cases)`` of a preset; command-line options narrow or change them."""
    if name == "quick":
        s = dict(shape="tiny", device="cpu", dtypes=["bf16"], threads=[1], batch=2, seq=64, rank=8,
                 targets=["q_proj", "v_proj"], warmup=1, steps=2, rounds=1, methods=["lora"],
                 extras=[("ftprog", "full", ()), ("ftprog", "lora", ("checkpoint",))],
                 sft_settings={"ftprog": ["default", "best"], "hf": ["default"]},
                 sft=dict(n=16, seed=0, seq_len=64, median=24, sigma=0.6, min_len=6, prompt_frac=0.4, batch=4,
                          warmup=1),
                 generate=dict(prompt_len=8, new_tokens=8, repeats=1),
                 dpo=dict(batch=2, max_len=64, beta=0.1, warmup=1, steps=2,
                          workload=dict(seed=0, prompt_median=16, response_median=12, sigma=0.6, min_len=4)),
                 rollout=dict(rows=4, new_tokens=8, warmup=1, repeats=2,
                              workload=dict(seed=0, median=12, sigma=0.6, min_len=4, max_len=32)),
                 grpo=dict(prompts=2, group=2, new_tokens=8, warmup=1, steps=2,
                           workload=dict(seed=0, median=12, sigma=0.6, min_len=4, max_len=32)),
                 distill=dict(batch=2, seq=64, warmup=1, steps=2, teacher_ratio=4.0,
                              workload=dict(n=48, seed=0, median=24, sigma=0.6, min_len=6, prompt_frac=0.4)),
                 peak_dtypes=["bf16"], help_repeats=2, demo=False)
    elif name == "cpu-target":
        s = dict(shape="cpu-default", device="cpu", dtypes=["bf16"], threads=[1, 2], batch=4, seq=256, rank=8,
                 targets=["q_proj", "v_proj"], warmup=2, steps=8, rounds=2, methods=["lora", "full"],
                 extras=[("ftprog", "lora", ("checkpoint",)), ("hf", "lora", ("checkpoint",)),
                         ("ftprog", "full", ("checkpoint",)), ("hf", "full", ("checkpoint",)),
                         ("ftprog", "dora", ()), ("hf", "dora", ()), ("ftprog", "qlora", ()), ("hf", "qlora", ()),
                         ("ftprog", "lora", ("compile",)), ("hf", "lora", ("compile",)),
                         ("ftprog", "full", ("fp32-state",)), ("ftprog", "full", ("stochastic-rounding",)),
                         ("ftprog", "full", ("in-backward", "int8-state")),
                         ("ftprog", "full", ("checkpoint", "in-backward", "int8-state")),
                         ("ftprog", "full", ("checkpoint", "in-backward", "int4-state"))],
                 sft=dict(n=96, seed=0, seq_len=512, median=160, sigma=0.6, min_len=16, prompt_frac=0.4, batch=4,
                          warmup=2),
                 generate=dict(prompt_len=32, new_tokens=64, repeats=3),
                 dpo=dict(batch=4, max_len=256, beta=0.1, warmup=2, steps=6, stacks=[[], ["checkpoint"]],
                          workload=dict(seed=0, prompt_median=80, response_median=48, sigma=0.6, min_len=8)),
                 rollout=dict(rows=8, new_tokens=64, warmup=1, repeats=3,
                              workload=dict(seed=0, median=48, sigma=0.6, min_len=8, max_len=128)),
                 grpo=dict(prompts=2, group=4, new_tokens=64, warmup=1, steps=3,
                           workload=dict(seed=0, median=48, sigma=0.6, min_len=8, max_len=128)),
                 distill=dict(batch=4, seq=256, warmup=1, steps=4, teacher_ratio=4.0,
                              workload=dict(n=128, seed=0, median=160, sigma=0.6, min_len=16, prompt_frac=0.4)),
                 peak_dtypes=["bf16", "fp32"], help_repeats=5, demo=True)
    elif name == "cpu-250m":  # issue 20: a shape closer to what people fine-tune (254M), the fixed-shape train cases
        s = dict(shape="cpu-250m", device="cpu", dtypes=["bf16"], threads=[2], batch=2, seq=256, rank=8,
                 targets=["q_proj", "v_proj"], warmup=1, steps=4, rounds=1, methods=["lora", "full"],
                 extras=[("ftprog", "full", ("fp32-state",)), ("ftprog", "full", ("stochastic-rounding",)),
                         ("ftprog", "full", ("in-backward", "int8-state")),
                         ("ftprog", "full", ("in-backward", "fp8-state")),
                         ("ftprog", "lora", ("checkpoint",)), ("hf", "lora", ("checkpoint",)),
                         ("ftprog", "full", ("checkpoint",)), ("hf", "full", ("checkpoint",)),
                         ("ftprog", "full", ("checkpoint", "in-backward", "int8-state")),
                         ("ftprog", "full", ("checkpoint", "in-backward", "int4-state"))],
                 peak_dtypes=["bf16"], help_repeats=0, demo=False,
                 default_skip=["sft", "generate", "dpo", "rollout", "grpo", "distill", "startup", "profile"])
    elif name == "gpu":
        s = dict(shape="llama-3.2-1b", device="cuda", dtypes=["bf16"], threads=[None], batch=4, seq=2048, rank=8,
                 targets=["q_proj", "v_proj"], warmup=3, steps=10, rounds=1, methods=["lora"],
                 extras=[("ftprog", "lora", ("compile",)), ("ftprog", "lora", ("checkpoint",)),
                         ("hf", "lora", ("checkpoint",)), ("ftprog", "full", ()), ("hf", "full", ()),
                         ("ftprog", "qlora", ()), ("ftprog", "full", ("fuse",)),
                         ("ftprog", "full", ("in-backward", "int8-state")),
                         ("ftprog", "lora", ("checkpoint", "offload"))],
                 sft=dict(n=192, seed=0, seq_len=2048, median=300, sigma=0.7, min_len=16, prompt_frac=0.4, batch=4,
                          warmup=2),
                 generate=dict(prompt_len=64, new_tokens=128, repeats=2),
                 dpo=dict(batch=4, max_len=1024, beta=0.1, warmup=2, steps=8,
                          workload=dict(seed=0, prompt_median=300, response_median=200, sigma=0.6, min_len=16)),
                 rollout=dict(rows=32, new_tokens=256, warmup=1, repeats=3,
                              workload=dict(seed=0, median=200, sigma=0.6, min_len=16, max_len=512)),
                 grpo=dict(prompts=4, group=8, new_tokens=256, warmup=1, steps=4,
                           workload=dict(seed=0, median=200, sigma=0.6, min_len=16, max_len=512)),
                 distill=dict(batch=4, seq=2048, warmup=2, steps=5, teacher_ratio=4.0,
                              workload=dict(n=400, seed=0, median=300, sigma=0.7, min_len=16, prompt_frac=0.4)),
                 peak_dtypes=["bf16"], help_repeats=3, demo=False, published=PUBLISHED)
    elif name == "moe":  # issue 16: a tiny mixture of experts, LoRA on attention and every expert, vs transformers + PEFT
        s = dict(shape="moe-tiny", device="cpu", dtypes=["bf16"], threads=[1, 2], batch=4, seq=256, rank=8,
                 targets=["q_proj", "v_proj", "experts"], warmup=2, steps=6, rounds=3, methods=["lora"], extras=[],
                 peak_dtypes=["bf16"], help_repeats=0, demo=False,
                 default_skip=["sft", "generate", "dpo", "rollout", "grpo", "distill", "startup"])
    else:
        raise SystemExit(f"unknown preset {name!r}: quick, cpu-target, cpu-250m, gpu, moe")

    for key in ("shape", "device", "batch", "seq", "rank", "warmup", "steps", "rounds"):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
            s[f"{key}_set"] = True  # the grpo cases take --warmup / --steps too
    if "dpo" in s:
        s["dpo"] = {**s["dpo"], **{k: getattr(args, k) for k in ("warmup", "steps")
                                   if getattr(args, k, None) is not None}}
    if args.threads:
        s["threads"] = [int(t) for t in args.threads.split(",")]
    if args.dtypes:
        s["dtypes"] = args.dtypes.split(",")
    if args.methods:
        s["methods"] = args.methods.split(",")
    skip = set(args.skip.split(",")) if args.skip else set()
    skip |= set(s.get("default_skip", ()))
    if args.demo is not None:
        s["demo"] = args.demo
    s["skip"] = sorted(skip)

    common = dict(shape=s["shape"], device=s["device"], batch=s["batch"], seq=s["seq"], rank=s["rank"],
                  targets=s["targets"], warmup=s["warmup"], steps=s["steps"], profile="profile" not in skip)
    systems = [x for x in ("ftprog", "hf") if x not in skip]
    # torchtune: a third system for the fixed-shape train cases (lora, full; stack - or checkpoint) and the sft
    # workload, run by the torchtune environment's interpreter; only when one is given (main drops these cases if
    # its probe fails)
    torchtune = bool(getattr(args, "torchtune_python", None)) and "torchtune" not in skip
    s["torchtune_cases"] = torchtune
    extras = list(s["extras"])
    if torchtune:
        extras += [("torchtune", m, st) for sy, m, st in s["extras"]
                   if sy == "hf" and m in TORCHTUNE_METHODS and tuple(st) in TORCHTUNE_STACKS]
    cases: list[dict[str, Any]] = []
    for dtype in s["dtypes"]:
        for threads in s["threads"]:
            for method in s["methods"]:
                for system in systems + (["torchtune"] if torchtune and method in TORCHTUNE_METHODS else []):
                    cases.append(_train(system, method, dtype=dtype, threads=threads, **common))
        if "extras" not in skip:
            for system, method, stack in extras:
                if (system not in systems and system != "torchtune") or any(x in skip for x in stack) \
                        or method in skip:
                    continue
                cases.append(_train(system, method, stack, dtype=dtype, threads=s["threads"][-1], **common))
    dtype, threads = s["dtypes"][0], s["threads"][-1]
    if "sft" not in skip:
        w = dict(s["sft"])
        batch, warmup = w.pop("batch"), w.pop("warmup")
        for system in systems + (["torchtune"] if torchtune else []):
            for setting in s.get("sft_settings", {}).get(system, ("default", "best")):
                cases.append({"kind": "sft", "system": system, "setting": setting, "method": "lora",
                              "shape": s["shape"], "device": s["device"], "dtype": dtype, "threads": threads,
                              "batch": batch, "warmup": warmup, "rank": s["rank"], "targets": s["targets"],
                              "workload": w})
    if "generate" not in skip:
        for system in systems:
            cases.append({"kind": "generate", "system": system, "shape": s["shape"], "device": s["device"],
                          "dtype": dtype, "threads": threads, **s["generate"]})
    if "dpo" not in skip:
        cases += dpo_cases(s, dtype, threads, [x for x in ("ftprog", "trl") if x not in skip])
    if "rollout" not in skip:
        cases += rl_cases(s, "rollout", dtype, threads, [x for x in ("ftprog", "hf") if x not in skip])
    if "grpo" not in skip:
        cases += rl_cases(s, "grpo", dtype, threads, [x for x in ("ftprog", "trl") if x not in skip])
    if "distill" not in skip and "ftprog" not in skip:
        cases += distill_cases(s, dtype, threads)
    if args.only:
        kinds = set(args.only.split(","))
        if kinds - set(CASE_KINDS):
            raise SystemExit(f"--only {args.only}: case kinds are {', '.join(CASE_KINDS)}")
        cases = [c for c in cases if c["kind"] in kinds]
    if getattr(args, "ftprog_baseline", None):  # each ft-prog case, then the same on an earlier source tree (run
        # next to each other, so the machine's drifts hit both alike)
        cases = [x for c in cases for x in ([c, {**c, "system": "ftprog-base"}] if c["system"] == "ftprog" else [c])]
    if "published" not in skip and s["device"].startswith("cuda"):  # ft-prog alone, at a setting torchtune
        # published a GPU figure for (its own shape, batch and length whatever --shape says); last
        for p in s.get("published", ()):
            cases.append(_train("ftprog", p["method"], p["stack"], **{**common, **p["case"]}, dtype=p["dtype"],
                                threads=s["threads"][-1], tag="published", reference=p["reference"]))
    return s, cases


def _adapter_key(c: dict[str, Any]) -> tuple | None:
    """The initial adapter a LoRA case on experts starts from (both systems load it), or None."""
    if c.get("method") != "lora" or "experts" not in c.get("targets", ()):
        return None
    return c["rank"], tuple(c["targets"])


def moe_adapters(cases: list[dict[str, Any]], shape: str, dtype: str, path: Path) -> dict[tuple, dict[str, Any]]:
    """The initial adapters (``ftprog.transforms.lora``, seed 0: A random, B zero) of the LoRA cases on experts of one
    checkpoint, keyed by :func:`_adapter_key`: the weights worker writes them next to the checkpoint and transformers
    loads them through PEFT (which fuses the per-expert adapters into its 3-D expert tensors' ones), so both systems
    start from the same A matrices."""
    out = {}
    for c in cases:
        key = _adapter_key(c)
        if key is not None and key not in out and (c["shape"], c["dtype"]) == (shape, dtype):
            out[key] = {"rank": key[0], "targets": list(key[1]), "path": f"{path}-adapter-r{key[0]}-{len(out)}"}
    return out


def dpo_cases(s: dict[str, Any], dtype: str, threads: int | None, systems: list[str]) -> list[dict[str, Any]]:
    """The LoRA DPO step of ft-prog and of TRL's DPOTrainer on the preset's preference pairs (``s["dpo"]``): one
    batch of pairs per step, ``warmup + steps`` of them (and one more for the profiled step); each of the preset's
    stacks (``checkpoint``: activation checkpointing in both, TRL's default)."""
    d = s["dpo"]
    n_pairs = d["batch"] * (d["warmup"] + d["steps"] + 1)
    stacks = [st for st in d.get("stacks", [[]]) if not set(st) & set(s["skip"])]
    return [{"kind": "dpo", "system": system, "method": "lora", "stack": list(stack), "shape": s["shape"],
             "device": s["device"], "dtype": dtype, "threads": threads, "batch": d["batch"], "seq": d["max_len"],
             "rank": s["rank"], "targets": s["targets"], "warmup": d["warmup"], "steps": d["steps"], "beta": d["beta"],
             "profile": "profile" not in s["skip"], "workload": {**d["workload"], "n": n_pairs, "max_len": d["max_len"]}}
            for stack in stacks for system in systems]


def distill_cases(s: dict[str, Any], dtype: str, threads: int | None) -> list[dict[str, Any]]:
    """One offline distillation step of ft-prog (``s["distill"]``): the preset's shape as the LoRA student, a random
    teacher ``teacher_ratio`` times its parameters (benchmarks/distill_worker.py), forward KL, kd_ratio 0.5, packed
    rows of an SFT workload; the ``chunked`` loss `ft-prog run distill` computes and the same loss from both
    models' ``full-logits``, so the report can set their peak memory side by side."""
    d = dict(s["distill"])
    d.update({k: s[k] for k in ("warmup", "steps", "batch", "seq") if s.get(f"{k}_set")})
    return [{"kind": "distill", "system": "ftprog", "variant": variant, "method": "lora", "stack": [],
             "shape": s["shape"], "device": s["device"], "dtype": dtype, "threads": threads, "batch": d["batch"],
             "seq": d["seq"], "rank": s["rank"], "targets": s["targets"], "warmup": d["warmup"], "steps": d["steps"],
             "teacher_ratio": d["teacher_ratio"], "kd_ratio": 0.5, "divergence": "forward_kl",
             "profile": "profile" not in s["skip"], "workload": {**d["workload"], "seq_len": d["seq"]}}
            for variant in ("chunked", "full-logits")]


def rl_cases(s: dict[str, Any], kind: str, dtype: str, threads: int | None, systems: list[str]) -> list[dict]:
    """The ``rollout`` cases (batched sampled generation, ft-prog against transformers' ``generate``) or the ``grpo``
    cases (one LoRA GRPO step, ft-prog against TRL's GRPOTrainer) of the preset (``s[kind]``): temperature 1,
    top-p 0.95, left-padded prompts of different lengths (``workload.prompts``)."""
    d = dict(s[kind])
    if kind == "grpo":
        d.update({k: s[k] for k in ("warmup", "steps") if s.get(f"{k}_set")})
        n = d["prompts"] * (d["warmup"] + d["steps"] + 1)
        extra = dict(method="lora", stack=[], rank=s["rank"], targets=s["targets"], profile="profile" not in s["skip"])
    else:
        n, extra = d.pop("rows"), {}
    return [{"kind": kind, "system": system, "shape": s["shape"], "device": s["device"], "dtype": dtype,
             "threads": threads, "temperature": 1.0, "top_p": 0.95, **extra, **d,
             "workload": {**d["workload"], "n": n}} for system in systems]


# ------------------------------------------------------------------------------------------------ running


class Runner:
    """Starts workers in fresh interpreters and keeps their logs."""

    def __init__(self, out: Path, timeout: float, verbose: bool = True, pythons: dict[str, str] | None = None,
                 paths: dict[str, str] | None = None):
        self.out = out
        self.pythons = pythons or {}  # system -> interpreter (torchtune: its own environment)
        self.paths = paths or {}  # system -> a PYTHONPATH entry put first (ftprog-base: the earlier tree's shim)
        self.timeout = timeout
        self.verbose = verbose
        self.count = 0
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def env(self, threads: int | None, system: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if system in self.paths:
            env["PYTHONPATH"] = self.paths[system] + os.pathsep + env["PYTHONPATH"]
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(threads)
        lib = allocator_library()
        if system == "ftprog" and lib is not None:  # the malloc `ft-prog run` re-executes itself with
            env = preload_env(lib, env)
        return env

    def run(self, case: dict[str, Any], label: str) -> dict[str, Any]:
        self.count += 1
        stem = f"{self.count:03d}-{label}"
        case_file = self.out / "logs" / f"{stem}.case.json"
        result_file = self.out / "logs" / f"{stem}.result.json"
        case_file.write_text(json.dumps(case, indent=1))
        start = time.perf_counter()
        with open(self.out / "logs" / f"{stem}.log", "w") as log:
            try:
                python = self.pythons.get(case.get("system"), sys.executable)
                proc = subprocess.run([python, "-m", "benchmarks.worker", str(case_file), str(result_file)],
                                      cwd=ROOT, env=self.env(case.get("threads"), case.get("system")), stdout=log,
                                      stderr=log,
                                      timeout=self.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        elapsed = time.perf_counter() - start
        if result_file.is_file():
            result = json.loads(result_file.read_text())
        else:
            result = {"ok": False, "error": f"worker exited with {rc} and no result (log: logs/{stem}.log)"}
        result["process_s"] = elapsed
        if self.verbose:
            status = "ok" if result.get("ok") else f"FAILED: {result.get('error', '')[:160]}"
            print(f"  [{elapsed:6.1f}s] {label}: {status}", flush=True)
        return result


def case_label(c: dict[str, Any]) -> str:
    if c["kind"] == "train":
        stack = "+".join(c["stack"]) or "base"
        tag = f"-{c['tag']}-{c['shape']}" if c.get("tag") else ""
        return f"train-{c['system']}-{c['method']}-{stack}-{c['dtype']}-t{c['threads'] or 'default'}{tag}"
    if c["kind"] == "sft":
        return f"sft-{c['system']}-{c['setting']}-{c['dtype']}-t{c['threads'] or 'default'}"
    if c["kind"] == "generate":
        return f"generate-{c['system']}-{c['dtype']}-t{c['threads'] or 'default'}"
    if c["kind"] == "dpo":
        stack = "+".join(c["stack"]) or "base"
        return f"dpo-{c['system']}-{c['method']}-{stack}-{c['dtype']}-t{c['threads'] or 'default'}"
    if c["kind"] in ("rollout", "grpo"):
        return f"{c['kind']}-{c['system']}-{c['dtype']}-t{c['threads'] or 'default'}"
    if c["kind"] == "distill":
        return f"distill-{c['system']}-{c['variant']}-{c['dtype']}-t{c['threads'] or 'default'}"
    return c["kind"]


def _swap_pairs(order: list[int], cases: list[dict]) -> list[int]:
    """``order`` with each ft-prog case and the ``ftprog-base`` twin right after it exchanged."""
    out, k = [], 0
    while k < len(order):
        i = order[k]
        if k + 1 < len(order) and cases[i]["system"] == "ftprog" and cases[order[k + 1]]["system"] == "ftprog-base":
            out += [order[k + 1], i]
            k += 2
        else:
            out.append(i)
            k += 1
    return out


def baseline_shim(tree: str, out: Path) -> str:
    """A folder whose ``ftprog/{core,transforms,programs}`` link to an earlier source tree's folders.

    Put first on ``PYTHONPATH``, it makes ``import ftprog.core`` load that tree (the installed ft-prog is found
    later on the import path); the benchmark worker itself still comes from this tree.
    """
    source = Path(tree).resolve()
    missing = [d for d in ("core", "transforms", "programs") if not (source / d / "__init__.py").is_file()]
    if missing:
        raise SystemExit(f"--ftprog-baseline {tree}: not an ft-prog source tree (no {', '.join(missing)}/__init__.py)")
    shim = out / "ftprog-baseline"  # removed at the end of the run, as the weights are
    (shim / "ftprog").mkdir(parents=True, exist_ok=True)
    for name in ("core", "transforms", "programs"):
        link = shim / "ftprog" / name
        if not link.exists():
            link.symlink_to(source / name, target_is_directory=True)
    return str(shim)


def time_startup(repeats: int, demo: bool, out: Path) -> dict[str, Any]:
    """``ft-prog --help`` wall time, and the demo's time to its first training step."""
    exe = Path(sys.executable).parent / "ft-prog"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "ftprog.programs.cli"]
    help_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd + ["--help"], capture_output=True, timeout=120)
        help_times.append(time.perf_counter() - t0)
    res: dict[str, Any] = {"help_s": help_times, "help_median_s": statistics.median(help_times) if help_times else None}
    if not demo:
        return res
    runs = []
    for attempt in range(2):  # the first run may build the cached demo assets; the second is warm
        folder = Path(tempfile.mkdtemp(prefix="ftprog-demo-", dir=out))
        args = cmd + ["run", "sft", "--config", "demo", "max_steps=1", "log.every=1", "log.progress=false",
                      "log.plot=false", "eval_every=0", "exact_match_samples=0", "save_every=0", "optimizer.warmup_steps=0",
                      f"output_dir={folder / 'run'}"]
        metrics = folder / "run" / "metrics.jsonl"
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = None
        while proc.poll() is None and time.perf_counter() - t0 < 600:
            if first is None and metrics.is_file() and b'"loss"' in metrics.read_bytes():
                first = time.perf_counter() - t0
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        total = time.perf_counter() - t0
        if first is None and metrics.is_file() and b'"loss"' in metrics.read_bytes():
            first = total
        last = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        runs.append({"first_step_s": first, "total_s": total, "returncode": proc.returncode,
                     "error": (last[-1] if last else "no output")[:300] if proc.returncode else None})
        shutil.rmtree(folder, ignore_errors=True)
    res["demo"] = runs
    return res


def probe_torchtune(extra_path: str | None, python: str | None = None) -> dict[str, Any]:
    """Whether torchtune imports (its Llama builders and chunked loss, and the benchmark's torchtune worker),
    here or in the interpreter ``python`` (``--torchtune-python``); the reason when it does not."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    if python:
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = ("import torch, torchtune, safetensors; from torchtune.models.llama3_2 import lora_llama3_2_1b; "
            "from torchtune.models.llama3 import lora_llama3; "
            "from torchtune.modules.loss import CEWithChunkedOutputLoss; "
            + ("import benchmarks.torchtune_worker; " if python else "")
            + "print(torchtune.__version__, torch.__version__)")
    try:
        proc = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "reason": f"unavailable: {python}: {type(e).__name__}: {e}",
                "note": "--torchtune-python must be the interpreter of an environment with torchtune"}
    if proc.returncode == 0:
        version, torch_version = (proc.stdout.strip().splitlines()[-1].split() + ["?"])[:2]
        res = {"available": True, "version": version, "torch": torch_version}
        if python:
            res["python"] = python
        return res
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit {proc.returncode}"
    note = ("torchtune 0.6.1 (pip install --no-deps) fails to import with torchao 0.18: "
            "No module named 'torchao.dtypes.nf4tensor' (checked on the development VM)")
    return {"available": False, "reason": f"unavailable: {reason}", "note": note}


# ------------------------------------------------------------------------------------------------ aggregation


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_times(times: list[float]) -> dict[str, float]:
    med = statistics.median(times) if times else float("nan")
    p10, p90 = _quantile(times, 0.1), _quantile(times, 0.9)
    return {"median_s": med, "p10_s": p10, "p90_s": p90, "min_s": min(times, default=float("nan")),
            "max_s": max(times, default=float("nan")), "spread": (p90 - p10) / med if times and med else float("nan"),
            "n": len(times)}


def aggregate(settings: dict, cases: list[dict], runs: list[list[dict]], peaks: dict, configs: dict) -> dict:
    """Per-case summaries plus the cross-system comparisons."""
    rows = []
    for case, results in zip(cases, runs):
        ok = [r for r in results if r.get("ok")]
        row: dict[str, Any] = {"case": case, "label": case_label(case), "runs": len(results), "ok_runs": len(ok)}
        if not ok:
            row["error"] = next((r.get("error") for r in results if r.get("error")), "no result")
            rows.append(row)
            continue
        first = ok[0]
        mem_key = "cuda_max_allocated" if case["device"].startswith("cuda") else "rss_peak"
        mems = [r.get(mem_key) for r in ok if r.get(mem_key)]
        row["peak_memory"] = max(mems) if mems else None
        row["peak_memory_kind"] = "max_memory_allocated" if mem_key.startswith("cuda") else "peak RSS (VmHWM)"
        row["rss_baseline"] = first.get("rss_baseline")
        if first.get("allocator") is not None:
            row["allocator"] = first["allocator"]
        if case["kind"] == "train":
            times = [t for r in ok for t in r["step_times"]]
            row["time"] = summarize_times(times)
            row["round_medians_s"] = [statistics.median(r["step_times"]) for r in ok if r["step_times"]]
            row["first_step_s"] = first["warmup_times"][0] if first.get("warmup_times") else None
            row["tokens_per_s"] = first["tokens_per_step"] / row["time"]["median_s"]
            row["losses"] = first["losses"]
            row["time_breakdown"] = first.get("time_breakdown")
            row["params"], row["trainable_params"] = first.get("params"), first.get("trainable_params")
            if first.get("adapter_dtype"):  # torchtune: LoRA adapters in the model dtype
                row["adapter_dtype"] = first["adapter_dtype"]
            if first.get("experts_implementation"):  # transformers on a mixture of experts
                row["experts_implementation"] = first["experts_implementation"]
            cfg = configs[(case["shape"], case["dtype"])]
            fl = train_step_flops(cfg, method=case["method"], batch=case["batch"], seq=case["seq"], rank=case["rank"],
                                  lora_targets=case["targets"], logits_all_positions=case["system"] != "ftprog")
            row["flops_per_step"] = fl["total"]
            row["flops_per_s"] = fl["total"] / row["time"]["median_s"]
            peak = peaks.get((case["dtype"], case.get("threads")))
            row["utilisation"] = row["flops_per_s"] / peak if peak else None
        elif case["kind"] == "sft":
            best = max(ok, key=lambda r: r["effective_tokens_per_s"])
            row.update({k: best[k] for k in ("description", "batches", "epoch_s", "trained_tokens", "real_tokens",
                                             "batch_cells", "padding_share", "effective_tokens_per_s",
                                             "real_tokens_per_s")})
            row["effective_tokens_per_s_runs"] = [r["effective_tokens_per_s"] for r in ok]
            row["time"] = summarize_times(best["step_times"])
            row["first_loss"] = first.get("first_loss")
            row["check_loss"] = first.get("check_loss")  # on the baseline's first padded batch, if measured
        elif case["kind"] == "dpo":
            row.update(dpo_summary(case, ok))
        elif case["kind"] == "rollout":
            row.update(rollout_summary(ok))
        elif case["kind"] == "grpo":
            row.update(grpo_summary(case, ok))
        elif case["kind"] == "distill":
            row.update(dpo_summary(case, ok))  # the same per-step facts as a DPO row
            row.update({k: first.get(k) for k in ("teacher_params", "teacher_layers", "teacher_hidden")})
            row["step_memory"] = _step_memory(case, ok)
        elif case["kind"] == "generate":
            best = max(ok, key=lambda r: r["tokens_per_s"])
            row.update({k: best[k] for k in ("prompt_len", "new_tokens", "prefill_s", "total_s", "tokens_per_s",
                                             "decode_tokens_per_s", "output")})
            row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in ok]
        if first.get("plan"):
            plan = first["plan"]
            row["plan"] = plan
            if row.get("peak_memory"):
                predicted = plan["tensor_peak"] if case["device"].startswith("cuda") else plan["peak"]
                row["plan_error"] = predicted / row["peak_memory"] - 1
        rows.append(row)
    return {"rows": rows, "loss_checks": loss_checks(rows), "speedups": speedups(rows)}


def dpo_summary(case: dict, ok: list[dict]) -> dict[str, Any]:
    """A DPO row: tokens/s per run (the timed steps' real tokens over their time), their median, and the best-steps
    figure (each step at its fastest over the runs: every run trains the same batches, so noise only adds time)."""
    w = case["warmup"]
    runs = [sum(r["step_tokens"][w:]) / sum(r["step_times"]) for r in ok]
    fastest = [min(ts) for ts in zip(*(r["step_times"] for r in ok))]
    first = ok[0]
    return {"time": summarize_times([t for r in ok for t in r["step_times"]]), "tokens_per_s_runs": runs,
            "tokens_per_s": statistics.median(runs), "best_tokens_per_s": sum(first["step_tokens"][w:]) / sum(fastest),
            "first_step_s": first["warmup_times"][0] if first.get("warmup_times") else None,
            "losses": first["losses"], "step_tokens": first["step_tokens"], "step_cells": first["step_cells"],
            "step_scored": first["step_scored"], "time_breakdown": first.get("time_breakdown"),
            "params": first.get("params"), "trainable_params": first.get("trainable_params"),
            "reference": first.get("reference"), "trl_version": first.get("trl"),
            "rss_before_steps": max((r["rss_before"] for r in ok if r.get("rss_before")), default=None)}


def _step_memory(case: dict, ok: list[dict]) -> int | None:
    """What the steps add to the memory held before them (models, optimizer state): the peak minus that, the
    largest over the runs."""
    if case["device"].startswith("cuda"):
        return max((r["cuda_max_allocated"] - r["cuda_allocated_before"] for r in ok), default=None)
    return max((r["rss_peak"] - r["rss_before"] for r in ok if r.get("rss_peak") and r.get("rss_before")),
               default=None)


def rollout_summary(ok: list[dict]) -> dict[str, Any]:
    """A rollout row: generated tokens/s of every timed generation of every run, their median and the best."""
    rates = [x for r in ok for x in r["tokens_per_s_runs"]]
    first = ok[0]
    return {"tokens_per_s_runs": [r["tokens_per_s"] for r in ok], "tokens_per_s_all": rates,
            "tokens_per_s": statistics.median(rates), "best_tokens_per_s": max(rates),
            "time": summarize_times([t for r in ok for t in r["run_times"]]),
            **{k: first[k] for k in ("rows", "prompt_tokens", "longest_prompt", "generated")},
            "rss_before_steps": max((r["rss_before"] for r in ok if r.get("rss_before")), default=None)}


def grpo_summary(case: dict, ok: list[dict]) -> dict[str, Any]:
    """A GRPO row: generated tokens per second of step time for each run (the timed steps' completion tokens over
    their time), their median and the best-steps figure; the median step, rollout and training times."""
    w = case["warmup"]
    runs = [sum(r["step_completion_tokens"][w:]) / sum(r["step_times"]) for r in ok]
    fastest = [min(ts) for ts in zip(*(r["step_times"] for r in ok))]
    first = ok[0]

    def timed(key: str) -> list[float]:
        return [t for r in ok for t in r[key][w:]]

    return {"time": summarize_times([t for r in ok for t in r["step_times"]]), "tokens_per_s_runs": runs,
            "tokens_per_s": statistics.median(runs),
            "best_tokens_per_s": sum(first["step_completion_tokens"][w:]) / sum(fastest),
            "rollout_median_s": statistics.median(timed("rollout_times")),
            "train_median_s": statistics.median(timed("train_times")),
            "generate_median_s": statistics.median(timed("generate_times")) if first.get("generate_times") else None,
            "first_step_s": first["warmup_times"][0] if first.get("warmup_times") else None,
            **{k: first.get(k) for k in ("losses", "step_rows", "step_prompt_tokens", "step_completion_tokens",
                                         "time_breakdown", "params", "trainable_params", "reference", "step0_check")},
            "trl_version": first.get("trl"),
            "rss_before_steps": max((r["rss_before"] for r in ok if r.get("rss_before")), default=None)}


def _key(row: dict, *fields: str, plain: bool = False) -> tuple:
    """The row's case fields as a hashable key; ``plain``: its stack without :data:`FTPROG_ONLY_STACKS`."""
    c = row["case"]
    if plain:
        c = {**c, "stack": [x for x in c.get("stack") or [] if x not in FTPROG_ONLY_STACKS]}
    return tuple(tuple(c.get(f)) if isinstance(c.get(f), list) else c.get(f) for f in fields)


def loss_checks(rows: list[dict]) -> list[dict]:
    """Step-0 loss of ft-prog against each baseline (transformers, torchtune) on the same weights and batch."""
    out = []
    fields = ("kind", "shape", "method", "stack", "dtype", "threads", "batch", "seq", "setting", "tag")
    ours = {_key(r, *fields): r for r in rows if r["case"]["system"] == "ftprog" and "error" not in r}
    for r in rows:
        if r["case"]["system"] not in BASELINES or "error" in r or r["case"]["kind"] not in ("train", "sft", "dpo",
                                                                                                "grpo"):
            continue
        if r["case"]["kind"] == "sft" and r["case"]["setting"] != "default" and r.get("check_loss") is None:
            continue  # a best setting batches differently: comparable only where it measured the check loss
        mine = ours.get(_key(r, *fields))
        if mine is None:
            continue
        a = mine["losses"][0] if r["case"]["kind"] in ("train", "dpo", "grpo") else mine.get("first_loss")
        b = r["losses"][0] if r["case"]["kind"] in ("train", "dpo", "grpo") else r.get("first_loss")
        if a is None or b is None:
            continue
        rel = abs(a - b) / max(abs(b), 1e-12)
        check = {"label": mine["label"], "baseline": r["case"]["system"], "ftprog_loss": a, "baseline_loss": b,
                 "abs_diff": abs(a - b), "rel_diff": rel, "tolerance": LOSS_TOL[r["case"]["dtype"]],
                 "ok": rel <= LOSS_TOL[r["case"]["dtype"]]}
        if r["case"]["kind"] in ("train", "dpo") and len(mine["losses"]) > 1 and len(r["losses"]) > 1:
            check["ftprog_loss_step1"], check["baseline_loss_step1"] = mine["losses"][1], r["losses"][1]
        if r["case"]["kind"] == "dpo":  # the same batches: the same real and padded tokens at every step
            check["same_tokens"] = all(mine[k] == r[k] for k in ("step_tokens", "step_cells", "step_scored"))
            check["ok"] = check["ok"] and check["same_tokens"]
        if r["case"]["kind"] == "grpo":
            check.update(grpo_check(mine, r))
        out.append(check)
    return out


def grpo_check(mine: dict, trl: dict) -> dict[str, Any]:
    """Same work in the GRPO step: the same rows, prompt and completion tokens at every step (completions differ:
    other RNG paths); the loss definitions through ft-prog's step 0 on TRL's own step-0 rollout (same weights): the
    losses (both about 0: every ratio is 1 and each group's advantages sum to 0; within ``LOSS_TOL`` of the largest
    advantage) and the clipped LoRA gradients (relative L2 difference within ``GRAD_TOL``)."""
    same = all(mine[k] == trl[k] for k in ("step_rows", "step_prompt_tokens", "step_completion_tokens"))
    ck = trl.get("step0_check") or {}
    tol = LOSS_TOL[trl["case"]["dtype"]]
    grads_ok = ck.get("grad_rel_diff", float("inf")) <= GRAD_TOL[trl["case"]["dtype"]]
    loss_ok = abs(ck.get("ftprog_loss", float("inf")) - ck.get("trl_loss", 0.0)) <= tol * max(
        1.0, ck.get("max_abs_advantage", 1.0))
    return {"same_tokens": same, "grad_rel_diff": ck.get("grad_rel_diff"), "ok": same and grads_ok and loss_ok,
            "grad_tolerance": GRAD_TOL[trl["case"]["dtype"]],
            "on_trl_rollout": ck}


def _per_round(row: dict) -> list[float]:
    """The row's metric in each round, in round order (empty where a round failed)."""
    if row["case"]["kind"] == "train":
        medians = row.get("round_medians_s") or []
        values = [row["tokens_per_s"] * row["time"]["median_s"] / m for m in medians]  # tokens per step / median
    else:  # sft: effective tokens/s; generate, dpo: tokens/s of each run
        values = row.get("effective_tokens_per_s_runs" if row["case"]["kind"] == "sft" else "tokens_per_s_runs", [])
    return values if len(values) == row.get("runs", len(values)) else []


def speedups(rows: list[dict]) -> list[dict]:
    """ft-prog tokens/s over each baseline's for the same case, and ft-prog's peak memory over theirs.

    Transformers under ``hf``, ``speedup``, ``memory_ratio``; torchtune under ``torchtune``,
    ``speedup_torchtune``, ``memory_ratio_torchtune`` (absent where that baseline has no such case). An ft-prog
    case whose stack holds ft-prog-only settings (:data:`FTPROG_ONLY_STACKS`) is compared with the baseline's case
    without them (e.g. full fine-tuning with int8 moments and the step in the backward against the baseline's
    plain full fine-tuning), and the entry names the baseline's stack under ``against``."""
    out = []
    fields = ("kind", "shape", "method", "stack", "dtype", "threads", "batch", "seq", "setting", "tag")
    theirs = {b: {_key(r, *fields): r for r in rows if r["case"]["system"] == b and "error" not in r}
              for b in BASELINES}
    for r in rows:
        if r["case"]["system"] != "ftprog" or "error" in r:
            continue
        metric = {"train": "tokens_per_s", "sft": "effective_tokens_per_s", "generate": "tokens_per_s",
                  "dpo": "tokens_per_s", "rollout": "tokens_per_s", "grpo": "tokens_per_s",
                  "distill": "tokens_per_s"}[r["case"]["kind"]]
        entry: dict[str, Any] = {"label": r["label"], "metric": metric, "ftprog": r[metric]}
        for b in BASELINES:
            other = theirs[b].get(_key(r, *fields)) or theirs[b].get(_key(r, *fields, plain=True))
            if other is None:
                continue
            suffix = "" if b == "hf" else f"_{b}"
            if other["case"].get("stack") != r["case"].get("stack"):
                entry["against"] = "+".join(other["case"].get("stack") or []) or "base"
            entry[b] = other[metric]
            entry["speedup" + suffix] = r[metric] / other[metric]
            if r["case"]["kind"] == "train" and r.get("time") and other.get("time"):  # robust to added noise
                entry["fastest_step_speedup" + suffix] = other["time"]["min_s"] / r["time"]["min_s"]
            if r["case"]["kind"] in ("dpo", "grpo", "rollout"):  # each step (generation) at its fastest over the runs
                entry["fastest_step_speedup" + suffix] = r["best_tokens_per_s"] / other["best_tokens_per_s"]
            ours, base = _per_round(r), _per_round(other)
            if ours and len(ours) == len(base):  # round by round (runs next to each other), then the median
                entry["paired_speedup" + suffix] = statistics.median(a / b for a, b in zip(ours, base))
            if r.get("peak_memory") and other.get("peak_memory"):
                entry["memory_ratio" + suffix] = r["peak_memory"] / other["peak_memory"]
        if len(entry) > 3:
            out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", help="quick | cpu-target | cpu-250m | gpu | moe (default: quick)")
    ap.add_argument("--name", help="results folder name (default: <preset>-<timestamp>)")
    ap.add_argument("--out-dir", help="write results here instead of benchmarks/results/<name>")
    ap.add_argument("--shape", help="model shape preset (ftprog.core.PRESETS or harness.SHAPES), e.g. tiny, "
                                    "cpu-default, moe-tiny")
    ap.add_argument("--device", help="cpu or cuda")
    ap.add_argument("--dtypes", help="comma-separated: bf16,fp32")
    ap.add_argument("--threads", help="comma-separated CPU thread counts, e.g. 1,2")
    ap.add_argument("--methods", help="comma-separated core methods: lora,full (extras keep their own)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--warmup", type=int, help="untimed steps per run (train and dpo cases)")
    ap.add_argument("--steps", type=int, help="timed steps per run (train and dpo cases)")
    ap.add_argument("--rounds", type=int, help="round-robin repetitions of every case")
    ap.add_argument("--skip", help="comma-separated: hf, ftprog, extras, compile, checkpoint, dora, qlora, sft, "
                                   "generate, dpo, rollout, grpo, trl, startup, peak, torchtune, profile (the profiled step after "
                                   "each training case's timed steps), published (the gpu preset's cases with a "
                                   "published torchtune figure)")
    ap.add_argument("--only", help="comma-separated case kinds to run: train, sft, generate, dpo, rollout, grpo "
                                   "(e.g. --only dpo: the LoRA DPO step against TRL's DPOTrainer; --only rollout,grpo: "
                                   "sampled generation against transformers and the GRPO step against TRL)")
    ap.add_argument("--demo", action=argparse.BooleanOptionalAction, default=None,
                    help="time the demo's first training step")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    ap.add_argument("--budget", type=float, help="seconds for the whole run: cases that would start later are "
                                                  "skipped (and reported as such); outputs are always written")
    ap.add_argument("--torchtune-path", help="extra PYTHONPATH where torchtune is installed (probe only)")
    ap.add_argument("--torchtune-python", metavar="PATH",
                    help="interpreter of an environment with torchtune (benchmarks/README.md): adds torchtune as a "
                         "third system of the fixed-shape train cases (lora, full; base and checkpoint stacks) and "
                         "of the realistic SFT workload (default and best)")
    ap.add_argument("--ftprog-baseline", metavar="TREE",
                    help="source tree of an earlier ft-prog (e.g. `git worktree add ../base HEAD~1`): every ft-prog "
                         "case also runs on it, round-robin, as system ftprog-base; the report compares the two")
    ap.add_argument("--keep-weights", action="store_true", help="keep the random-weight checkpoints")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    return ap


def main(argv: list[str] | None = None) -> Path | None:
    args = build_parser().parse_args(argv)
    settings, cases = preset_cases(args.preset, args)
    if args.list:
        for c in cases:
            print(case_label(c))
        return None
    name = args.name or f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out_dir) if args.out_dir else RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"benchmark {args.preset!r}: {len(cases)} cases x {settings['rounds']} rounds -> {out}", flush=True)
    info = machine.describe()
    print(f"machine: {info.get('cpu')} ({info.get('cores_usable')} cores usable), torch {info.get('torch')}, "
          f"{info.get('gpu') or 'no GPU'}, load {info.get('load_average')}", flush=True)
    if settings["device"].startswith("cuda") and not info.get("cuda"):
        raise SystemExit("preset needs CUDA but torch sees no GPU")
    paths = {"ftprog-base": baseline_shim(args.ftprog_baseline, out)} if args.ftprog_baseline else None
    runner = Runner(out, args.timeout, pythons={"torchtune": args.torchtune_python} if args.torchtune_python else None,
                    paths=paths)
    skip = set(settings["skip"])
    # torchtune first: without it the torchtune cases are dropped (recorded unavailable, as without the option)
    torchtune = (probe_torchtune(args.torchtune_path, args.torchtune_python) if "torchtune" not in skip
                 else {"skipped": True})
    if any(c["system"] == "torchtune" for c in cases):
        n_tt = sum(c["system"] == "torchtune" for c in cases)
        if torchtune.get("available"):
            torchtune["cases"] = n_tt
            print(f"torchtune {torchtune.get('version')} ({args.torchtune_python}): {n_tt} cases", flush=True)
        else:
            cases = [c for c in cases if c["system"] != "torchtune"]
            print(f"torchtune: {torchtune.get('reason')}: its {n_tt} cases dropped", flush=True)

    # 1. One random-weight checkpoint per (shape, dtype), loaded by every system.
    weights_dir = Path(tempfile.mkdtemp(prefix="weights-", dir=out))
    configs: dict[tuple[str, str], dict] = {}
    for shape, dtype in sorted({(c["shape"], c["dtype"]) for c in cases}):
        path = weights_dir / f"{shape}-{dtype}"
        weights = {"kind": "weights", "config": SHAPES.get(shape, shape), "dtype": dtype, "path": str(path), "seed": 0,
                   "threads": None}
        adapters = moe_adapters(cases, shape, dtype, path)
        res = runner.run({**weights, "adapters": sorted(adapters.values(), key=str)}, f"weights-{shape}-{dtype}")
        if not res.get("ok"):
            raise SystemExit(f"could not build the {shape} checkpoint: {res.get('error')}\n{res.get('traceback', '')}")
        configs[(shape, dtype)] = json.loads((path / "config.json").read_text())
        for c in cases:
            if (c["shape"], c["dtype"]) == (shape, dtype):
                c["checkpoint"] = str(path)
                if _adapter_key(c) in adapters:
                    c["adapter"] = adapters[_adapter_key(c)]["path"]
                if c["kind"] in ("sft", "dpo", "rollout", "grpo", "distill"):
                    c["workload"] = {**c["workload"], "vocab": configs[(shape, dtype)]["vocab_size"]}

    # 2. The matmul peak of each (dtype, threads) the cases use.
    peaks: dict[tuple[str, int | None], float] = {}
    peak_rows = []
    if "peak" not in skip:
        for dtype in sorted({c["dtype"] for c in cases} | set(settings["peak_dtypes"])):
            for threads in settings["threads"]:
                res = runner.run({"kind": "peak", "device": settings["device"], "dtype": dtype, "threads": threads},
                                 f"peak-{dtype}-t{threads}")
                if res.get("ok"):
                    peaks[(dtype, threads)] = res["flops_per_s"]
                    peak_rows.append({"dtype": dtype, "threads": threads, "flops_per_s": res["flops_per_s"],
                                      "n": res["n"], "small_linear_s": res["small_linear_median_s"],
                                      "computed_in": res["computed_in"]})

    # 3. Baselines that may be missing, start-up time.
    startup = (time_startup(settings["help_repeats"], settings["demo"], out)
               if "startup" not in skip and not args.only else {})  # --only: those cases alone

    # 4. The cases, round-robin, each in a fresh process.
    runs: list[list[dict]] = [[] for _ in cases]
    for r in range(settings["rounds"]):
        print(f"round {r + 1}/{settings['rounds']}", flush=True)
        # rounds start at a different case; by pairs with --ftprog-baseline, so a pair is never split
        shift = (r * (2 if args.ftprog_baseline else 1)) % max(len(cases), 1)
        order = list(range(shift, len(cases))) + list(range(shift))
        if args.ftprog_baseline and r % 2:  # every other round a pair runs the other way round (A B, then B A)
            order = _swap_pairs(order, cases)
        for i in order:
            longest = max((x.get("process_s", 0) for rs in runs for x in rs), default=0.0)
            if args.budget and time.time() - started + longest > args.budget:
                runs[i].append({"ok": False, "error": f"skipped: the run's time budget ({args.budget:.0f} s) was "
                                                      "spent", "round": r})
                print(f"  skipped (budget): {case_label(cases[i])}", flush=True)
                continue
            res = runner.run(cases[i], case_label(cases[i]))
            res["round"] = r
            runs[i].append(res)

    # 5. The same small-op probe at the end: a busy machine shows up as millisecond latencies.
    if "peak" not in skip:
        for row in peak_rows:
            res = runner.run({"kind": "peak", "device": settings["device"], "dtype": row["dtype"],
                              "threads": row["threads"], "seconds": 0.3}, f"peak-end-{row['dtype']}-t{row['threads']}")
            if res.get("ok"):
                row["small_linear_end_s"] = res["small_linear_median_s"]
                row["flops_per_s_end"] = res["flops_per_s"]

    summary = aggregate(settings, cases, runs, peaks, configs)
    results = {
        "preset": args.preset, "name": name, "settings": settings, "machine": info,
        "load_average_end": machine.load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                 time.localtime(started)),
        "wall_s": time.time() - started, "matmul_peak": peak_rows, "torchtune": torchtune, "startup": startup,
        "model_configs": {f"{k[0]}-{k[1]}": v for k, v in configs.items()}, **summary,
        "raw_runs": [{"label": case_label(c), "results": rs} for c, rs in zip(cases, runs)],
    }
    from benchmarks import report

    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = report.markdown(results)
    (out / "results.md").write_text(markdown)
    chart = report.chart(results, out / "results.png")
    if not args.keep_weights:
        shutil.rmtree(weights_dir, ignore_errors=True)
    if paths:
        shutil.rmtree(paths["ftprog-base"], ignore_errors=True)
    print(markdown)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + (f", {chart}" if chart else ""), flush=True)
    return out
