"""Matmul FLOPs of one training step, counted analytically, and the machine's measured matmul peak.

Conventions (those of model-FLOPs utilisation):

- a matmul ``[m, k] @ [k, n]`` is ``2 m k n`` FLOPs; element-wise ops, norms and softmax are not counted;
- forward: every projection (``2 * in * out`` per token), LoRA adapters (``2 * r * (in + out)`` per token,
  DoRA adds the per-step ``B @ A``), causal attention (``QK^T`` and ``PV`` over the causal half:
  ``2 * q_dim * (S + 1)`` per token) and the output layer (``2 * hidden * vocab`` per position that gets
  logits: target positions only for ft-prog, every position for transformers);
- mixtures of experts: each token runs its ``top_k`` experts' MLPs (width ``moe_intermediate_size`` or, for
  Mixtral, ``intermediate_size``) and the router (``2 * hidden * experts`` per token); LoRA target ``experts``
  adapts every expert's gate, up and down projections;
- backward: for each matmul, the input gradient when the input needs one and the weight gradient when the
  weight is trained (so ``2x`` the forward for trained weights, ``1x`` for frozen ones, ``0`` before the
  first adapter of a LoRA model); attention backward is ``2x`` its forward. Recomputation under activation
  checkpointing is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import time
from typing import Any

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _linears(c: dict[str, Any]) -> dict[str, tuple[int, int]]:
    h, i = c["hidden_size"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    q, kv = heads * hd, c.get("num_key_value_heads", heads) * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def adapted_names(targets: Any) -> set[str]:
    """Projection names a LoRA ``targets`` value selects (names, ``all-linear``, or ``experts``: the MLP projections
    of every expert)."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    out: set[str] = set()
    for t in targets:
        out |= set(ATTENTION + MLP) if t == "all-linear" else set(MLP) if t == "experts" else {t}
    return out & set(ATTENTION + MLP)


def moe_shape(c: dict[str, Any]) -> tuple[int, int, int, set[int]] | None:
    """``(experts, top_k, expert width, sparse layer indices)`` of a Mixtral / Qwen3-MoE config.json; None for a
    dense model."""
    experts = c.get("num_local_experts") or c.get("num_experts")
    if not experts:
        return None
    layers = range(c["num_hidden_layers"])
    if c.get("model_type") == "mixtral":
        return experts, c.get("num_experts_per_tok", 2), c["intermediate_size"], set(layers)
    step, dense = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or ())
    sparse = {i for i in layers if i not in dense and (i + 1) % step == 0}
    return experts, c.get("num_experts_per_tok", 8), c.get("moe_intermediate_size", 768), sparse


def train_step_flops(config: dict[str, Any], *, method: str, batch: int, seq: int, targets_per_row: int | None = None,
                     rank: int = 8, lora_targets: Any = ("q_proj", "v_proj"), logits_all_positions: bool = False
                     ) -> dict[str, float]:
    """``{"forward", "backward", "total"}`` matmul FLOPs of one step on ``batch x seq`` tokens.

    ``method``: full, lora, dora or qlora (qlora counts like lora: the NF4 weights are dequantized and
    multiplied in the compute dtype). ``targets_per_row``: positions with a loss target (default ``seq - 1``).
    """
    full = method == "full"
    adapted = set() if full else adapted_names(lora_targets)
    lin = _linears(config)
    t = batch * seq
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    q_dim = heads * hd
    fwd = bwd = 0.0
    stream_rg = full  # does the residual stream need a gradient yet?

    moe = moe_shape(config)

    def linear(name: str, input_rg: bool, tokens: float = t, width: int | None = None) -> bool:
        """``width``: an expert's intermediate size (its gate/up outputs, its down projection's input)."""
        nonlocal fwd, bwd
        fan_in, fan_out = lin[name]
        if width is not None:
            fan_in, fan_out = (width, fan_out) if name == "down_proj" else (fan_in, width)
        f = 2.0 * tokens * fan_in * fan_out
        fwd += f
        if input_rg:
            bwd += f  # grad input
        if full:
            bwd += f  # grad weight
            return True
        if name in adapted:
            fa = 2.0 * tokens * rank * (fan_in + fan_out)
            fwd += fa
            # grads of B and A, the gradient flowing from B to A, and (if needed) to the input
            bwd += fa + 2.0 * tokens * rank * fan_out + (2.0 * tokens * rank * fan_in if input_rg else 0.0)
            if method == "dora":
                fwd += 2.0 * fan_in * fan_out * rank  # B @ A for the weight norm, once per step
            return True
        return input_rg

    for layer in range(config["num_hidden_layers"]):
        n1 = stream_rg or full
        q = linear("q_proj", n1)
        k = linear("k_proj", n1)
        v = linear("v_proj", n1)
        att = 2.0 * t * q_dim * (seq + 1)  # QK^T and PV, causal
        fwd += att
        attn_rg = q or k or v
        if attn_rg:
            bwd += 2 * att
        o = linear("o_proj", attn_rg)
        x2 = stream_rg or o
        if moe is not None and layer in moe[3]:  # the router, then top_k experts per token
            experts, top_k, width, _ = moe
            router = 2.0 * t * config["hidden_size"] * experts
            fwd += router
            bwd += router * ((1 if x2 else 0) + (1 if full else 0))
            g = linear("gate_proj", x2, t * top_k, width)
            u = linear("up_proj", x2, t * top_k, width)
            d = linear("down_proj", g or u, t * top_k, width)
        else:
            g = linear("gate_proj", x2)
            u = linear("up_proj", x2)
            d = linear("down_proj", g or u)
        stream_rg = x2 or d
    positions = t if logits_all_positions else batch * (seq - 1 if targets_per_row is None else targets_per_row)
    head = 2.0 * positions * config["hidden_size"] * config["vocab_size"]
    fwd += head
    bwd += head * (1 + (1 if full else 0))  # grad hidden (+ grad weight when trained)
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def measure_matmul_peak(device: str = "cpu", dtype: str = "bf16", seconds: float = 1.0) -> dict[str, Any]:
    """Best FLOP/s of a large square ``torch.mm`` (n = 2048 on CPU, 8192 on CUDA) over about ``seconds``, in the
    dtype ft-prog multiplies ``dtype`` matrices in (``computed_in``: fp32 for bf16 on a CPU without bf16 kernels,
    ``ftprog.core.matmul_dtype``, where torch's bf16 loop would take minutes to measure)."""
    import torch

    from ftprog.core import matmul_dtype

    names = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    dt = matmul_dtype(names[dtype], device)
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        torch.mm(a, b)
    sync()
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    # A small op's latency: a parallel region waits for every thread, so when other processes deschedule one
    # (a busy machine), a 1 x 512 x 1408 linear takes a scheduler quantum (milliseconds) instead of ~0.1 ms.
    x = torch.randn(1, 512, device=device).to(dt)
    w = torch.randn(1408, 512, device=device).to(dt)
    lat = []
    for _ in range(50):
        sync()
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        sync()
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"n": n, "flops_per_s": 2.0 * n**3 / best, "best_s": best, "reps": reps,
            "computed_in": next(name for name, d in names.items() if d == dt),
            "small_linear_median_s": lat[len(lat) // 2], "small_linear_p90_s": lat[int(len(lat) * 0.9)]}
