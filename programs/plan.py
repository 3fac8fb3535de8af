"""`ft-prog plan`: predict the peak training memory of an sft config before loading anything.

The prediction needs only the model's ``config.json`` (or a preset name) and the
sft config. It adds up, per rank:

- **weights**: every leaf at the training dtype; NF4 linears (QLoRA) at 0.516
  bytes per parameter (4-bit codes + one int8 scaler per block of 64 + one fp32
  factor per 256 scalers);
- **adapters**: LoRA ``A``/``B`` (and DoRA magnitudes), fp32 as ``lora`` keeps them;
- **gradients**: one tensor per trainable leaf, in the leaf's dtype;
- **optimizer**: AdamW's two moments per trainable leaf (SGD with momentum: one), fp32 or
  ``optimizer.state_dtype``;
- **activations**: the tensors autograd saves for the backward, derived op by op
  from the decoder (:mod:`ftprog.core._decoder`): which tensor each op saves depends
  on which of its inputs need a gradient, so full fine-tuning, LoRA on some
  projections and a frozen base differ; activation checkpointing keeps each
  layer's input and recomputes one layer at a time in the backward;
- **loss**: :func:`ftprog.core.token_loss_sum` keeps the gradient of the hidden
  states of the target positions (and for a trainable output layer its weight
  gradient) from the forward, plus the logits of one chunk and the fp32
  softmax of a block of its rows (2 MiB on CPU, 64 MiB on CUDA);
- a fixed **runtime overhead** (the process / CUDA context), measured once.

Sharding over ``nproc`` ranks divides weights, gradients and optimizer state.

The per-op rules were measured on CPU (torch 2.13). On CUDA the plan assumes the
same saved tensors from fused attention kernels (flash / memory-efficient: q, k,
v, output, log-sum-exp); an attention call that falls back to the math kernel
(e.g. an explicit mask with grouped-query attention on a kernel without GQA
support) also keeps the ``[batch, heads, seq, seq]`` probabilities, which this
plan does not count.
The peak is the largest of the step's phases (end of forward, start and end of
the backward, gradient clipping, optimizer update), each being the tensors
alive at that moment; see :func:`estimate`. The activation formula is checked
against the bytes autograd really saves (``tests/test_plan.py``) and the whole
peak against measured peak memory (``python -m benchmarks``).

Example::

    from ftprog.programs.plan import plan, format_plan
    print(format_plan(plan("llama3_2_1b_qlora", ["seq_len=4096"], memory="24GiB")))
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ftprog.core import ModelConfig

# Bytes of one element of each training dtype.
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""4-bit codes, an int8 scaler per 64 values, an fp32 factor per 256 scalers (about 0.516)."""

RUNTIME_OVERHEAD = {"cpu": 370 * 2**20, "cuda": 640 * 2**20}
"""Memory outside the model's tensors.

cpu: peak resident set minus peak live-tensor bytes of training steps of the
cpu-default shape (LoRA, full, checkpointed, QLoRA; bf16, 4 x 256), measured
once on the 2-core EPYC development VM with torch 2.13 CPU: 363-378 MiB. About
266 MiB of it is the interpreter with torch and ft-prog imported, the rest
oneDNN/OpenMP buffers and heap kept by the allocator. Tiny models use less
(about 290 MiB in all). ``python -m benchmarks`` reports the planner's error
against the measured peak for every ft-prog case.
cuda: the CUDA context and cuBLAS/cuDNN workspaces (an estimate; peak
``torch.cuda.max_memory_allocated`` excludes it, the card's free memory does not).
"""

CHECKPOINT_IMPORT_OVERHEAD = 75 * 2**20
"""Host memory the first checkpointed step adds on CPU: non-reentrant ``torch.utils.checkpoint`` imports
``torch._dynamo`` (and with it much of torch), measured as +75-86 MiB of resident set (torch 2.13 CPU)."""

QUANTIZE_IMPORT_OVERHEAD = 80 * 2**20
"""Host memory importing torchao adds on CPU (QLoRA): +81 MiB of resident set measured (torchao 0.18)."""

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanError(ValueError):
    """A config whose memory cannot be planned (no model shape, unknown option)."""


def parse_memory(text: str | int | float | None) -> int | None:
    """``"24GiB"`` -> bytes. Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024);
    ``"24G"`` means GB. A bare number is bytes."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read memory size {text!r}; write e.g. 24GiB, 80GB or 16000MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``512 B``."""
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def model_config(config: Any) -> ModelConfig:
    """The :class:`ftprog.core.ModelConfig` of ``config``: a ModelConfig, a config.json dict or a preset name."""
    from ftprog.core import ModelConfig, preset

    if isinstance(config, str):
        config = preset(config)
    if isinstance(config, Mapping):
        config = ModelConfig.from_hf(config, source="config")
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a ModelConfig, a config dict or a preset name, got {type(config).__name__}")
    return config


def projections(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of one layer's projections (``q_proj`` ... ``down_proj``)."""
    from ftprog.core import param_shapes

    shapes = param_shapes(attrs.evolve(config, num_layers=1))
    return {name: shapes[f"model.layers.0.{'self_attn' if name in _ATTENTION else 'mlp'}.{name}.weight"][::-1]
            for name in _ATTENTION + _MLP}


def layer_params(config: ModelConfig) -> tuple[int, int]:
    """``(projection weights, other leaves)`` element counts of one decoder layer."""
    from ftprog.core import param_shapes

    shapes = param_shapes(attrs.evolve(config, num_layers=1))
    layer = {k: math.prod(v) for k, v in shapes.items() if k.startswith("model.layers.0.")}
    linear = sum(n for k, n in layer.items() if k.endswith("_proj.weight"))
    return linear, sum(layer.values()) - linear


def num_params(config: ModelConfig) -> int:
    """Element count of every tensor a checkpoint of ``config`` holds."""
    from ftprog.core import param_shapes

    return sum(math.prod(shape) for shape in param_shapes(config).values())


def resolve_targets(config: ModelConfig, targets: str | Sequence[str]) -> tuple[set[str], bool]:
    """``(layer projection names, lm_head?)`` that LoRA ``targets`` select (as ``transforms.lora`` reads them).

    Patterns are matched against the name of the projection in layer 0; a glob over layer numbers is taken
    to select that projection in every layer (the planner models uniform layers).
    """
    from fnmatch import fnmatchcase

    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    names: set[str] = set()
    head = False
    for t in targets:
        if t == "all-linear":
            names |= set(_ATTENTION + _MLP)
            continue
        if t == "lm_head":
            if config.tie_word_embeddings:
                raise PlanError("lora target 'lm_head': the model ties its embeddings, lm_head has no weight")
            head = True
            continue
        hit = {n for n in _ATTENTION + _MLP
               if t == n or fnmatchcase(f"model.layers.0.{'self_attn' if n in _ATTENTION else 'mlp'}.{n}", t)
               or fnmatchcase(n, t)}
        if not hit:
            raise PlanError(f"lora target {t!r} matches no linear layer (names: {', '.join(_ATTENTION + _MLP)})")
        names |= hit
    return names, head


# ----------------------------------------------------------------------------------------------- activations


@attrs.frozen
class Setup:
    """One training configuration, as the planner sees it."""

    method: str = "lora"  # full | lora | dora | qlora
    dtype: str = "bf16"
    batch_size: int = 4
    seq_len: int = 512
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    checkpoint: bool = False
    mask: bool = True
    """The batches carry an attention mask or packed position ids (sft always does): one ``[B, 1, S, S]``
    bool mask is built and kept. False: plain causal batches (benchmarks)."""
    targets_fraction: float = 1.0
    """Share of positions with a loss target (the planner assumes every one: the worst case)."""
    chunk_size: int = 1024
    adapter_dtype: str = "fp32"
    device: str = "cpu"
    """cpu or cuda: dropout keeps a noise tensor in the input dtype on CPU, a bool mask on CUDA."""

    def __attrs_post_init__(self):
        if self.method not in ("full", "lora", "dora", "qlora"):
            raise PlanError(f"unknown method {self.method!r} (full, lora, dora, qlora)")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"unknown dtype {self.dtype!r} ({', '.join(DTYPE_BYTES)})")


class _Saved:
    """Tensors saved for the backward, keyed so that one tensor saved by several ops counts once."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    def add(self, key: str, nbytes: float) -> None:
        self.items.setdefault(key, int(nbytes))

    def total(self, prefix: str = "") -> int:
        return sum(v for k, v in self.items.items() if k.startswith(prefix))


def activation_bytes(config: ModelConfig, setup: Setup) -> dict[str, int]:
    """Bytes autograd keeps from the forward to the backward of one micro-batch, derived op by op.

    Returns ``{"layers", "shared", "final_norm", "loss", "total", "layer_max", "recompute"}``:
    ``layers`` sums what each decoder layer keeps (its input only, under activation checkpointing),
    ``shared`` the RoPE tables, the attention mask and the token ids, ``loss`` what
    :func:`token_loss_sum` keeps (target mask, ``d loss / d hidden``, fp32 output-weight gradient),
    ``total`` their sum (the activation memory at the end of the forward); ``layer_max`` is the most one
    layer keeps without checkpointing, which a checkpointed layer holds again while it is recomputed in the
    backward (``recompute``, 0 without checkpointing).

    The rules are those of the ops in :mod:`ftprog.core._decoder`: ``F.linear`` keeps its input when the
    weight needs a gradient; a LoRA linear keeps its input cast to the adapter dtype (a copy per adapted
    projection when the dtypes differ) and the rank-r intermediate; RMSNorm keeps its fp32 input and the
    reciprocal RMS when the input needs a gradient and its normalised input when the weight does; RoPE
    keeps only the cos/sin tables; SDPA keeps q, k, v, the output and the log-sum-exp (GQA keys and values
    unexpanded); SwiGLU keeps gate, silu(gate), up, and the product when ``down_proj`` is trained.
    """
    s, u = config, setup
    b = DTYPE_BYTES[u.dtype]
    ab = DTYPE_BYTES[u.adapter_dtype]
    B, S = u.batch_size, u.seq_len
    T = B * S
    H, Q, K, I, r = s.hidden_size, s.q_dim, s.kv_dim, s.intermediate_size, u.rank
    full = u.method == "full"
    adapted, head_adapted = (set(), False) if full else resolve_targets(s, u.targets)
    dora = u.method == "dora"
    shapes = projections(s)
    saved = _Saved()

    def norm(pre: str, x: str, x_rg: bool, w_rg: bool, rows: int, width: int) -> bool:
        if x_rg:  # pow / mul keep the fp32 input (a copy for bf16) and the reciprocal RMS
            saved.add(f"{pre}{x}.f32", rows * width * 4)
            saved.add(f"{pre}{x}.rsqrt", rows * 4)
        if w_rg:  # weight * normalised input keeps the normalised input
            saved.add(f"{pre}{x}.normalised", rows * width * b)
        return x_rg or w_rg

    def linear(pre: str, name: str, x: str, x_rg: bool) -> bool:
        fan_in, fan_out = shapes[name]
        if full:
            saved.add(pre + x, T * fan_in * b)
            return True
        if name not in adapted:
            return x_rg
        if u.dropout > 0:  # a fresh dropped copy per adapted projection, cast to the adapter dtype
            if x_rg:  # CPU: the input times a scaled noise tensor (input dtype); CUDA: a bool mask
                saved.add(f"{pre}{name}.dropout_mask", T * fan_in * (1 if u.device == "cuda" else b))
            saved.add(f"{pre}{name}.adapter_input", T * fan_in * ab)
        elif ab != b:
            saved.add(f"{pre}{name}.adapter_input", T * fan_in * ab)
        else:
            saved.add(pre + x, T * fan_in * ab)
        saved.add(f"{pre}{name}.lora_hidden", T * r * ab)
        if dora:  # magnitude / ||W + BA||, then mag_scale * (base + update)
            saved.add(f"{pre}{name}.dora_sum", T * fan_out * b)
            if u.dropout > 0:  # base + (mag_scale - 1) * base(dropped) + mag_scale * update
                saved.add(f"{pre}{name}.dora_base_dropped", T * fan_out * b)
            saved.add(f"{pre}{name}.dora_scale", fan_out * (4 + b))
        return True

    x_rg = full  # the embedding output needs a gradient only when the embedding is trained
    if full:
        saved.add("shared.tokens", T * 8)
    per_layer = []
    for i in range(s.num_layers):
        pre = f"layer{i}."
        before = saved.total(pre)
        n1 = norm(pre, "x", x_rg, full, T, H)
        q_rg, k_rg, v_rg = (linear(pre, n, "n1", n1) for n in ("q_proj", "k_proj", "v_proj"))
        if s.qk_norm:
            q_rg = norm(pre, "q", q_rg, full, T * s.num_heads, s.head_dim)
            k_rg = norm(pre, "k", k_rg, full, T * s.num_kv_heads, s.head_dim)
        attn_rg = q_rg or k_rg or v_rg
        if q_rg or k_rg:
            saved.add("shared.cos", T * s.head_dim * b)
            saved.add("shared.sin", T * s.head_dim * b)
        if attn_rg:
            saved.add(pre + "q_rot", T * Q * b)
            saved.add(pre + "k_rot", T * K * b)
            saved.add(pre + "v", T * K * b)
            saved.add(pre + "attn_out", T * Q * b)
            saved.add(pre + "lse", B * s.num_heads * S * 4)
            if u.mask:  # SDPA turns the bool mask into an additive one in the compute dtype, per layer
                saved.add(pre + "mask", B * S * S * b)
        o_rg = linear(pre, "o_proj", "attn_out", attn_rg)
        x2_rg = x_rg or o_rg
        n2 = norm(pre, "x2", x2_rg, full, T, H)
        gate_rg = linear(pre, "gate_proj", "n2", n2)
        up_rg = linear(pre, "up_proj", "n2", n2)
        if gate_rg:  # silu keeps gate; the product keeps up
            saved.add(pre + "gate", T * I * b)
            saved.add(pre + "up", T * I * b)
        if up_rg:  # the product keeps silu(gate)
            saved.add(pre + "silu", T * I * b)
        down_rg = linear(pre, "down_proj", "product", gate_rg or up_rg)
        x_rg = x2_rg or down_rg
        per_layer.append(saved.total(pre) - before)

    shared = saved.total("shared.")
    if u.checkpoint:  # only each layer's input (and the shared tables / mask) stays; layers are recomputed
        layers = s.num_layers * T * H * b
        shared = 2 * T * s.head_dim * b + (B * S * S if u.mask else 0) + (T * 8 if full else 0)
    else:
        layers = sum(per_layer)
    final = _Saved()
    if x_rg:
        final.add("f32", T * H * 4)
        final.add("rsqrt", T * 4)
    if full:
        final.add("normalised", T * H * b)
    targets = int(round(T * u.targets_fraction))
    loss = 0
    if x_rg:
        loss += T  # the boolean target mask (index backward)
        if not head_adapted:
            loss += targets * H * b  # d loss / d hidden, computed in the forward by the fused loss
    head_trained = full
    if head_trained:  # the output-weight gradient, computed in the forward: in the weight's dtype when the
        # targets fit one chunk, else accumulated in fp32
        loss += s.vocab_size * H * (b if targets <= u.chunk_size else 4)
    if head_adapted:  # adapted output layer: checkpointed chunks keep their inputs and targets
        loss += targets * (H * b + 8)
    total = layers + shared + final.total() + loss
    layer_max = max(per_layer) if per_layer else 0
    return {"layers": int(layers), "shared": int(shared), "final_norm": final.total(), "loss": int(loss),
            "total": int(total), "layer_max": int(layer_max), "recompute": int(layer_max if u.checkpoint else 0)}


# ----------------------------------------------------------------------------------------------------- plan


@attrs.frozen
class Plan:
    """Predicted peak training memory of one rank, with its breakdown (bytes).

    ``peak`` = ``tensor_peak`` (the most tensor bytes alive at once, the phase ``peak_phase``) +
    ``overhead``. ``fits`` is None without a ``memory`` budget.
    """

    model: str
    setup: Setup
    device: str
    nproc: int
    grad_accum: int
    optimizer_name: str
    num_params: int
    trainable_params: int
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    activations_full: int
    loss_chunk: int
    phases: dict[str, int]
    peak_phase: str
    tensor_peak: int
    overhead: int
    memory: int | None = None
    notes: tuple[str, ...] = ()
    state_dtype: str = "fp32"
    softmax_rows: int = 1

    @property
    def peak(self) -> int:
        return self.tensor_peak + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.peak <= self.memory

    def breakdown(self) -> list[tuple[str, int, str]]:
        """``(item, bytes, note)`` rows of the static memory and the activations."""
        u = self.setup
        shard = f" / {self.nproc} ranks" if self.nproc > 1 else ""
        weight_note = f"{self.num_params / 1e6:,.1f}M params, {u.dtype}" + (
            ", NF4 linears (0.516 B/param)" if u.method == "qlora" else "") + shard
        act_note = (f"batch {u.batch_size} x seq {u.seq_len}, "
                    + ("activation checkpointing" if u.checkpoint else "no checkpointing")
                    + f" (with: {fmt_bytes(self.activations_checkpointed)}, without: {fmt_bytes(self.activations_full)})")
        return [
            ("weights", self.weights, weight_note),
            ("adapters", self.adapters, f"rank {u.rank} on {', '.join(u.targets)}, {u.adapter_dtype}"
             if u.method != "full" else "none (full fine-tuning)"),
            ("gradients", self.gradients, f"{self.trainable_params / 1e6:,.2f}M trainable" + shard),
            ("optimizer", self.optimizer, f"{self.optimizer_name}, {self.state_dtype} state" + shard),
            ("activations", self.activations, act_note),
            ("loss chunk", self.loss_chunk, f"{u.dtype} logits of {min(u.chunk_size, u.batch_size * u.seq_len)} "
             f"target positions (+ fp32 softmax of {self.softmax_rows} rows at a time)"),
            ("runtime", self.overhead, f"{self.device} process / context (fixed)"),
        ]

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=True)
        out.update(peak=self.peak, fits=self.fits)
        return out


def estimate(
    config: Any,
    setup: Setup | None = None,
    *,
    nproc: int = 1,
    grad_accum: int = 1,
    optimizer: str = "adamw",
    momentum: float = 0.0,
    state_dtype: str = "fp32",
    max_grad_norm: float = 1.0,
    inplace_update: bool = True,
    device: str = "cpu",
    memory: int | str | None = None,
    overhead: int | None = None,
    model_name: str | None = None,
    **setup_fields: Any,
) -> Plan:
    """The memory plan of training ``config`` (a ModelConfig, config.json dict, or preset name).

    ``setup`` (or its fields as keywords: ``method``, ``dtype``, ``batch_size``, ``seq_len``, ``rank``,
    ``targets``, ``dropout``, ``checkpoint``, ``mask``, ...) describes the step as :mod:`ftprog.programs.sft`
    runs it: ``value_and_grad`` of :func:`token_loss_sum`, ``clip_by_global_norm`` (in place), then the
    optimizer update in place (``inplace_update=False``: a functional update, new params while the old ones
    are still held).

    Phases (tensor bytes alive; ``static`` = weights + adapters + optimizer state):

    - ``forward``: static + activations + the fp32 logits of one loss chunk (+ accumulated grads);
    - ``backward start``: static + activations + the output-weight gradient cast + one layer's backward
      workspace (+ the recomputed layer under checkpointing);
    - ``backward end``: static + all gradients + workspace;
    - ``grad accumulation``: static + 3 x gradients (the sum, the new part and the running total);
    - ``clip``: static + gradients + the fp32 pieces their norms are taken of; ``update``: static +
      gradients + the upcast pieces of params narrower than the optimizer state (+ the new trainable params
      of a functional update). ``state_dtype``: the optimizer moments' dtype.
    """
    import torch

    from ftprog.core._loss import _softmax_rows  # the row block the loss takes its fp32 softmax in
    from ftprog.core._optim import _UPCAST_NUMEL  # the optimizer's upcast / gradient-norm piece size

    config = model_config(config)
    if setup is None:
        setup = Setup(**{k: (tuple(v) if k == "targets" else v) for k, v in setup_fields.items()})
    elif setup_fields:
        setup = attrs.evolve(setup, **setup_fields)
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if setup.device != kind:
        setup = attrs.evolve(setup, device=kind)
    u, s = setup, config
    if nproc < 1:
        raise PlanError(f"nproc must be at least 1, got {nproc}")
    b = DTYPE_BYTES[u.dtype]
    ab = DTYPE_BYTES[u.adapter_dtype]
    H, V = s.hidden_size, s.vocab_size
    T = u.batch_size * u.seq_len
    lin, other = layer_params(s)
    total_params = num_params(s)
    shapes = projections(s)
    linear_params = s.num_layers * lin
    notes = []

    # Weights (QLoRA: every layer projection in NF4, the rest in the training dtype).
    if u.method == "qlora":
        weights = linear_params * NF4_BYTES_PER_PARAM + (total_params - linear_params) * b
    else:
        weights = total_params * b
    adapter_params = 0
    if u.method != "full":
        names, head = resolve_targets(s, u.targets)
        for name in names:
            fan_in, fan_out = shapes[name]
            adapter_params += s.num_layers * (u.rank * (fan_in + fan_out) + (fan_out if u.method == "dora" else 0))
        if head:
            adapter_params += u.rank * (H + V) + (V if u.method == "dora" else 0)
    trainable = total_params if u.method == "full" else adapter_params
    trainable_bytes = trainable * (b if u.method == "full" else ab)
    adapters = adapter_params * ab
    grads = trainable_bytes
    if state_dtype not in DTYPE_BYTES:
        raise PlanError(f"unknown optimizer state dtype {state_dtype!r} ({', '.join(DTYPE_BYTES)})")
    state_bytes = DTYPE_BYTES[state_dtype]
    state_per_param = {"adamw": 2, "sgd": 1 if momentum else 0}[optimizer] * state_bytes
    opt_state = trainable * state_per_param

    weights, adapters_s, grads_s, opt_s = (x / nproc for x in (weights, adapters, grads, opt_state))
    if nproc > 1:  # a sharded layer is gathered whole for its forward / backward
        notes.append("sharded: one layer's weights are gathered at a time (included in the workspace)")
    static = weights + adapters_s + opt_s

    acts = activation_bytes(s, u)
    acts_ck = activation_bytes(s, attrs.evolve(u, checkpoint=True))
    acts_full = activation_bytes(s, attrs.evolve(u, checkpoint=False))
    chunk = min(u.chunk_size, max(1, int(round(T * u.targets_fraction))))
    head_trained = u.method == "full"
    # A chunk's [chunk, vocab] logits in the weight dtype (overwritten by their gradient), the fp32 copy and
    # softmax of a block of its rows at a time, and for a trained output weight the chunk's [vocab, hidden]
    # weight-gradient product (plus the fp32 running sum when the targets span several chunks).
    targets_n = max(1, int(round(T * u.targets_fraction)))
    softmax_rows = min(chunk, _softmax_rows(V, torch.device(u.device)))
    loss_chunk = chunk * V * b + softmax_rows * V * 8
    if head_trained and targets_n > u.chunk_size:
        loss_chunk += V * H * (b + 4)
    # Backward workspace of one layer: the residual-stream gradient (twice, in flight), the MLP's
    # intermediate gradients, fp32 norm gradients; a sharded layer's gathered weights.
    I = s.intermediate_size
    workspace = T * (2 * H * b + 3 * I * b + 2 * H * 4) + (lin + other) * b * (nproc > 1)
    head_cast = V * H * b if head_trained else 0  # the scaled output-weight gradient at the backward start
    accum = grads_s if grad_accum > 1 else 0
    upcast = min(trainable, _UPCAST_NUMEL) * state_bytes * 2 if u.method == "full" and b < state_bytes else 0
    norm_pieces = min(trainable, _UPCAST_NUMEL) * 4 if u.method == "full" and b < 4 else 0
    if u.method == "qlora":  # an NF4 linear is dequantized whole for its matmul (forward and backward)
        workspace += max(a * c for a, c in shapes.values()) * b
    phases = {
        "forward": static + acts["total"] + loss_chunk + accum,
        "backward start": static + acts["total"] + head_cast + workspace + acts["recompute"] + accum,
        "backward end": static + grads_s + workspace + acts["shared"] + accum,
        "clip": static + grads_s + norm_pieces if max_grad_norm > 0 else 0,
        "update": static + grads_s + (0 if inplace_update else trainable_bytes / nproc) + upcast,
    }
    if grad_accum > 1:
        phases["grad accumulation"] = static + 3 * grads_s
    phases = {k: int(v) for k, v in phases.items()}
    peak_phase = max(phases, key=phases.get)
    if overhead is None:
        overhead = RUNTIME_OVERHEAD[kind]
        if kind == "cpu":  # torch modules loaded on first use count in the process's resident set
            overhead += CHECKPOINT_IMPORT_OVERHEAD * u.checkpoint + QUANTIZE_IMPORT_OVERHEAD * (u.method == "qlora")
    return Plan(
        model=model_name or "config", setup=u, device=str(device), nproc=nproc, grad_accum=grad_accum,
        optimizer_name=optimizer, num_params=total_params, trainable_params=trainable,
        weights=int(weights), adapters=int(adapters_s), gradients=int(grads_s), optimizer=int(opt_s),
        activations=acts["total"], activations_checkpointed=acts_ck["total"], activations_full=acts_full["total"],
        loss_chunk=int(loss_chunk), phases=phases, peak_phase=peak_phase, tensor_peak=phases[peak_phase],
        overhead=int(overhead), memory=parse_memory(memory), notes=tuple(notes), state_dtype=state_dtype,
        softmax_rows=softmax_rows,
    )


# ------------------------------------------------------------------------------------------ sft configs


def _model_config(path: str) -> tuple[dict[str, Any], str, str | None]:
    """``(config.json dict, where it came from, note)`` for ``model.path``, without loading weights."""
    from ftprog.core import PRESETS

    if path in PRESETS:
        return dict(PRESETS[path]), f"preset {path}", None
    if path.startswith("builtin:"):
        from ftprog.programs import demo_assets

        if path != demo_assets.DEMO_MODEL:
            raise PlanError(f"unknown built-in model {path!r}")
        folder = demo_assets.cache_dir() / "model"
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text()), path, None
        vocab = 256 + len(demo_assets._SPECIALS)  # byte-level tokenizer + specials, rounded up as demo_model does
        return {**demo_assets._MODEL_CONFIG, "vocab_size": (vocab + 63) // 64 * 64}, path, None
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text()), str(folder / "config.json"), None
    if folder.is_file() and folder.name.endswith(".json"):
        return json.loads(folder.read_text()), str(folder), None
    guess = _preset_for(folder.name)
    if guess is not None:
        return dict(PRESETS[guess]), f"preset {guess}", (
            f"{path} not found: planned with the {guess!r} preset shape (download the model for its own config)")
    raise PlanError(f"model.path {path!r}: no config.json there. Download the model first, or plan a preset "
                    f"shape with model.path=NAME ({', '.join(PRESETS)})")


def _preset_for(name: str) -> str | None:
    from ftprog.core import PRESETS

    key = re.sub(r"[-_](instruct|it|chat|base)$", "", name.lower())
    return key if key in PRESETS else None


def plan(config_name_or_path: str, overrides: Iterable[str] | Mapping[str, Any] = (), *,
         memory: int | str | None = None, nproc: int = 1, device: str | None = None) -> Plan:
    """Plan the peak memory of ``ft-prog run sft --config CONFIG [overrides]`` on one of ``nproc`` ranks.

    ``model.path`` may be a model folder (its config.json is read), a preset name (``llama-3.2-1b``) or
    ``builtin:demo-model``; a missing folder whose name is a preset's (``models/Llama-3.2-1B-Instruct``)
    is planned with that preset's shape, with a note. ``device`` (cpu / cuda) picks the runtime overhead;
    default: cuda if torch sees a GPU. ``memory`` (``"24GiB"``) sets the budget ``Plan.fits`` checks.
    """
    from ftprog.programs.config import load_config
    from ftprog.programs.sft_config import SFTConfig

    cfg, _ = load_config(SFTConfig, config_name_or_path, overrides, builtin_dir=Path(__file__).parent / "configs" / "sft")
    raw, source, note = _model_config(cfg.model.path)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    method = "full" if cfg.peft.method == "none" else cfg.peft.method
    setup = Setup(method=method, dtype=cfg.dtype, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                  rank=cfg.peft.rank, targets=tuple(cfg.peft.targets), dropout=cfg.peft.dropout,
                  checkpoint=cfg.activation_checkpointing, mask=True)
    opt = cfg.optimizer
    result = estimate(raw, setup, nproc=nproc, grad_accum=cfg.grad_accum, optimizer=opt.name,
                      momentum=opt.momentum, state_dtype=opt.state_dtype, max_grad_norm=opt.max_grad_norm, device=device, memory=memory,
                      model_name=source)
    notes = (note,) if note else ()
    if cfg.packing:
        notes += ("packed rows: every batch is batch_size x seq_len tokens",)
    else:
        notes += ("padded batches: planned at the longest possible row (seq_len); most batches are shorter",)
    return attrs.evolve(result, notes=result.notes + notes)


def format_plan(p: Plan) -> str:
    """The plan as a table: the breakdown, the phases, the peak and the verdict."""
    u = p.setup
    lines = [f"memory plan: {u.method} fine-tuning of {p.model} ({p.num_params / 1e6:,.1f}M params), {u.dtype}, "
             f"batch {u.batch_size} x seq {u.seq_len}" + (f" x {p.grad_accum} accumulated" if p.grad_accum > 1 else "")
             + f", {p.device}" + (f", {p.nproc} ranks (per rank)" if p.nproc > 1 else ""), ""]
    for name, nbytes, note in p.breakdown():
        lines.append(f"  {name:12s} {fmt_bytes(nbytes):>11s}   {note}")
    lines.append("")
    lines.append("  phases (tensors alive):")
    for name, nbytes in p.phases.items():
        mark = "  <- peak" if name == p.peak_phase else ""
        lines.append(f"    {name:18s} {fmt_bytes(nbytes):>11s}{mark}")
    lines.append("")
    lines.append(f"  peak {fmt_bytes(p.peak)} = {fmt_bytes(p.tensor_peak)} tensors ({p.peak_phase}) + "
                 f"{fmt_bytes(p.overhead)} runtime")
    if not u.checkpoint and p.activations_full > p.activations_checkpointed:
        saved = p.activations_full - p.activations_checkpointed
        lines.append(f"  activation checkpointing would save about {fmt_bytes(saved)} of activations")
    for note in p.notes:
        lines.append(f"  note: {note}")
    if p.memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"  {verdict} in {fmt_bytes(p.memory)} ({fmt_bytes(abs(p.memory - p.peak))} "
                     f"{'to spare' if p.fits else 'short'})")
    return "\n".join(lines)
