"""`ft-prog plan`: predict the peak training memory of an sft config before loading anything.

The planner does not model the decoder: it builds the model from ``config.json`` alone on the meta device
(shapes and dtypes, no data), through the transforms sft applies (:func:`~ftprog.transforms.quantize`,
:func:`~ftprog.transforms.lora`, :func:`~ftprog.transforms.checkpoint`), and runs one real training
micro-batch on it: ``value_and_grad`` of :func:`ftprog.core.token_loss_sum`, then the optimizer's ``init``
(:func:`measure`). It does so for a 1- and a 2-layer copy of the model and scales by the layer count, every
layer costing what the second one does. A new architecture or transform is planned with no change here.

Measured on the meta tensors, per rank:

- **activations**: the distinct storages autograd saves for the backward (``saved_tensors_hooks``),
  parameters excluded; under activation checkpointing that is each layer's input, by the real transform;
- **gradients**: the gradients the backward returns;
- **backward**: the most bytes alive during the backward (saved tensors not yet released, gradients so far,
  and everything else: incoming gradients, a checkpointed layer recomputed, NF4 weights dequantized);
- **weights, adapters, optimizer state**: sums over the transformed parameter tree (NF4 weights as torchao
  stores them) and over the state the optimizer's ``init`` creates.

Static terms, and why:

- **loss chunk**: the logits of one chunk of target positions and the fp32 softmax of a block of its rows
  live only inside the loss's forward, and on meta tensors the loss takes CUDA-sized softmax blocks, so the
  CPU block (2 MiB; 64 MiB on CUDA) comes from the loss's own block size;
- the optimizer's and gradient clipping's **fp32 pieces** of narrower params: transient in the update, sized
  by the optimizer's piece size;
- **sharding** over ``nproc`` ranks divides weights, gradients and optimizer state and adds one gathered
  layer;
- a fixed **runtime overhead** (the process / CUDA context), measured once; on the CPU also the memory the
  allocator holds beyond the live tensors over a whole run (:data:`HOST_ALLOCATOR_SLACK`).

Meta tensors differ from CPU ones in three places, bridged while measuring: scaled-dot-product attention on
meta always takes the math kernel (which keeps ``[batch, heads, seq, seq]`` probabilities), so it is
routed to the kernel CPU tensors of the same shapes get (flash attention: q, k, v, output, log-sum-exp and
the additive mask); ``flex_attention`` refuses meta tensors, so where the planned device takes that path
(:func:`ftprog.core._decoder.attention_path`: CUDA) it is replaced by what its kernel keeps (q, k, v, output
and log-sum-exp; no ``[seq, seq]`` mask); and the loss's boolean target mask has no data, so every position
counts as a target (the worst case). On CUDA the plan assumes the CPU kernels' saved tensors (its fused attention keeps the
same; its dropout a 1-byte mask where CPU keeps the scaled noise, so a dropout plan is a little high).

The peak is the largest of the step's phases (end of forward, backward, gradient clipping, optimizer
update), each being the tensors alive at that moment; see :func:`estimate`. ``tests/test_plan.py`` checks
the measurements against the bytes autograd keeps on real CPU tensors and the phases against live tensor
bytes of real steps; ``python -m benchmarks`` the whole peak against measured peak memory.

Example::

    from .plan import plan, format_plan
    print(format_plan(plan("llama3_2_1b_qlora", ["seq_len=4096"], memory="24GiB")))
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import unittest.mock
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.fx.experimental._config as fx_config
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core import (
    PRESETS, Model, ModelConfig, as_dtype, flatten, from_config, is_static, matmul_dtype, optim, preset,
    token_loss_sum, value_and_grad,
)
from ..core import _decoder
from ..core._decoder import attention_path
# a chunk's padded rows; the output weight's vocabulary rows upcast at a time; the loss's fp32 softmax block
from ..core._loss import _UPCAST_ROWS, _frozen_chunk_rows, _padded_rows, _softmax_rows
from ..core._optim import _LOW_BIT_PIECE, _UPCAST_NUMEL  # the optimizer's upcast / gradient-norm piece sizes
from ..transforms import checkpoint, fuse_projections, lora, param_bytes, quantize, trainable
from . import demo_assets
from .config import load_config
from .sft_config import SFTConfig, optimizer_state_dtype

# Bytes of one element of each training dtype.
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

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

LOW_BIT_UPDATE_TEMPORARIES = 7
"""fp32 piece-sized tensors alive at once in torchao's AdamW step on quantized moments run eagerly (the param,
grad, both moments dequantized, the squared grad, the denominator, the update), counted from
``single_param_adam``; an upper bound for the compiled step (int8: 2, the new moments in fp32; fp8: none; int4
not measured)."""

LOW_BIT_COMPILE_OVERHEAD = 20 * 2**20
"""Host memory the compiled low-bit AdamW step (``state_dtype`` int8 / fp8 / int4) adds to a CPU run's peak beyond
torchao's import: inductor and the compiled kernels. Alone, they grow the resident set by 78-84 MiB over the eager
step (cpu-default, torch 2.13), but much of that lands in heap the run already holds: in the benchmark harness's
cases (AMD EPYC, mimalloc, cpu-default 1 + 3 steps and ``cpu-250m`` 1 step, two runs) the low-bit cases' peaks
exceed their planned tensor peaks by 85-117 MiB more than the other full and LoRA cases' do, torchao's import
(:data:`QUANTIZE_IMPORT_OVERHEAD`) included."""

HOST_ALLOCATOR_SLACK = 0.4
"""cpu: host memory the allocator holds beyond the live tensors over a whole run, as a fraction of the tensor
peak. Measured with ``python -m benchmarks.longrun`` (full fine-tuning, bf16, 4 x 256 packed, 2 threads,
300 steps; peak RSS = 370 MiB + (1 + slack) x planned tensor peak): cpu-default with 6 layers 0.41 on mimalloc
and 0.48 on glibc's malloc, with 2 layers 0.41 on mimalloc. The freed blocks of a step's transients (logits,
gradients, upcast pieces) stay with the allocator for the next step."""

QUANTIZE_IMPORT_OVERHEAD = 80 * 2**20
"""Host memory importing torchao adds on CPU (QLoRA, low-bit moments): +81-86 MiB of resident set measured
(torchao 0.18), ``torch._dynamo``'s +73 included (torchao imports it). Activation checkpointing imports
nothing (:func:`ftprog.core.recompute`)."""

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
    if isinstance(config, str):
        config = preset(config)
    if isinstance(config, Mapping):
        config = ModelConfig.from_hf(config, source="config")
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a ModelConfig, a config dict or a preset name, got {type(config).__name__}")
    return config


# ------------------------------------------------------------------------------------ measuring on meta


@attrs.frozen
class Step:
    """One training micro-batch of a model of some depth, run on meta tensors (bytes unless said)."""

    elements: int  # parameter elements (a quantized weight counts those it stands for)
    param_bytes: int  # every parameter leaf as stored (a quantized weight by its inner tensors)
    trainable: int  # elements of the trainable leaves
    trainable_bytes: int
    saved: int  # distinct non-parameter storages autograd saved in the forward for the backward
    gradients: int  # the gradients the backward returned
    optimizer: int  # the state the optimizer's init made for the trainable leaves
    backward: tuple[tuple[int, int, int], ...]  # (saved, gradients, other) alive after each op of the backward


@attrs.frozen
class Footprint:
    """Training memory of a ``num_layers``-deep model, from its steps at 1 and 2 layers.

    A mixture of experts with dense layers among its sparse ones (Qwen3-MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step``) has two kinds of layer: ``one`` and ``two`` are then all sparse, ``mixed`` a sparse
    layer followed by a dense one, and ``dense_layers`` of the ``num_layers`` cost what that dense layer does.
    """

    num_layers: int
    one: Step
    two: Step
    mixed: Step | None = None
    dense_layers: int = 0

    def scaled(self, name: str) -> int:
        """:class:`Step` field ``name`` at ``num_layers`` layers: the 1-layer value plus each added layer's
        difference."""
        at_one, at_two = getattr(self.one, name), getattr(self.two, name)
        dense = 0 if self.mixed is None else self.dense_layers * (getattr(self.mixed, name) - at_one)
        return at_one + (self.num_layers - self.dense_layers - 1) * (at_two - at_one) + dense

    def layer_param_bytes(self) -> int:
        """The parameter bytes of the largest layer (what sharding gathers at once)."""
        dense = 0 if self.mixed is None else self.mixed.param_bytes - self.one.param_bytes
        return max(self.two.param_bytes - self.one.param_bytes, dense)

    def backward_peak(self, shards: int = 1) -> int:
        """The most bytes alive during the backward at ``num_layers`` layers, gradients divided over ``shards``.

        A layer added between the two of a 2-layer model adds its saved tensors to each moment of the
        backward before it and its gradients to each moment after it, so each added layer raises the peak
        by at most the larger of the two: the plan adds that (exact when the 2-layer peak lies on the side
        of that larger term, as it does when one term dominates).
        """
        def peak(step: Step) -> float:
            return max((s + g / shards + o for s, g, o in step.backward), default=0)

        def per_layer(step: Step) -> float:
            return max(step.saved - self.one.saved, (step.gradients - self.one.gradients) / shards)

        if self.num_layers == 1:
            return int(peak(self.one))
        sparse = self.num_layers - self.dense_layers
        if sparse >= 2 or self.mixed is None:
            return int(peak(self.two) + (sparse - 2) * per_layer(self.two)
                       + self.dense_layers * (per_layer(self.mixed) if self.mixed else 0))
        return int(peak(self.mixed) + (self.dense_layers - 1) * per_layer(self.mixed))


def measure(build: Callable[..., Model], num_layers: int, *, batch_size: int, seq_len: int,
            mask: bool = True, chunk_size: int = 1024, optimizer: Any = None, backward: bool = True,
            dense_layers: int = 0) -> Footprint:
    """Run one training micro-batch of ``build(1)`` and ``build(2)`` on meta tensors; scale to ``num_layers``.

    ``build(n)`` returns the model to plan, ``n`` layers deep, with every leaf on the meta device (see
    :func:`model_builder`); its forward may be anything :func:`ftprog.core.token_loss_sum` can call. The
    micro-batch is ``[batch_size, seq_len]`` tokens, all of them targets, with packed position ids when
    ``mask`` (so attention gets an explicit mask, as in sft) and plain causal attention otherwise.
    ``optimizer`` (default: AdamW with fp32 state) sizes the optimizer state. ``backward=False`` runs the
    forward only: the gradients, the optimizer state and the backward stay 0 (faster, for ``saved``).
    ``dense_layers``: how many of the ``num_layers`` are dense among sparse ones (a mixture of experts); a third
    step then runs ``build(2, dense=1)``, a sparse layer and a dense one.
    """
    optimizer = optim.adamw(1e-3) if optimizer is None else optimizer

    def step(n: int, **kinds: int) -> Step:
        return _run_step(build(n, **kinds), batch_size, seq_len, mask, chunk_size, optimizer, backward)

    mixed = step(2, dense=1) if dense_layers else None
    return Footprint(num_layers, step(1), step(2), mixed, dense_layers)


def _run_step(model: Model, batch_size: int, seq_len: int, mask: bool, chunk_size: int, optimizer: Any,
              backward: bool) -> Step:
    leaves = {p: t for p, t in flatten(model.params).items() if not is_static(t)}
    off_meta = [path for path, t in leaves.items() if t.device.type != "meta"]
    if off_meta:
        raise ValueError(f"measure needs the model on the meta device; {off_meta[0]!r} is on "
                         f"{leaves[off_meta[0]].device}")
    trainable = model.trainable_params()
    sizes = dict(elements=sum(t.numel() for t in leaves.values()), param_bytes=param_bytes(model),
                 trainable=sum(t.numel() for t in trainable.values()), trainable_bytes=param_bytes(trainable))
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    kwargs = {"position_ids": tokens} if mask else {}  # zeros: every position starts a document
    storages = _Storages(leaves.values())
    at_backward = {}

    def loss_fn(m: Model) -> torch.Tensor:
        with torch.autograd.graph.saved_tensors_hooks(storages.saved, lambda t: t):
            loss = token_loss_sum(m, tokens, tokens, chunk_size=chunk_size, **kwargs)
        at_backward.update(clock=storages.clock, saved=storages.total("saved"))
        return loss

    # the loss picks its target positions with a boolean mask: without data, every position is a target
    with _attention_as_on_cpu(), _flex_as_on_cuda(), \
            fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        if not backward:  # the trainable leaves need gradients, as value_and_grad makes them, or less is saved
            with torch.enable_grad():
                loss_fn(model.with_params({p: t.detach().requires_grad_(True) for p, t in trainable.items()}))
            return Step(**sizes, saved=at_backward["saved"], gradients=0, optimizer=0, backward=())
        with storages:
            _, grads = value_and_grad(loss_fn)(model)
            backward_end = storages.clock
            state = optimizer.init(trainable)
    optimizer_bytes = storages.total("other", born_after=backward_end)
    del state
    for g in grads.values():
        storages.add(g, "gradient")
    return Step(**sizes, saved=at_backward["saved"], gradients=storages.total("gradient"), optimizer=optimizer_bytes,
                backward=storages.timeline(at_backward["clock"] + 1, backward_end))


class _Storages(TorchDispatchMode):
    """The storages of meta tensors the ops under it create: when (op count) each was made and freed, and kind.

    Kinds: ``param`` (those of ``params``, quantized ones by their inner tensors), ``saved`` (autograd saved
    it for the backward), ``gradient``, ``other``. A storage counts once however many tensors view it.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.clock = 0
        self.lives: list[list] = []  # [born, freed (None: alive), bytes, kind]
        self._index: dict[int, int] = {}  # live storage -> its entry in lives
        stack = list(params)
        while stack:
            t = stack.pop()
            if hasattr(t, "__tensor_flatten__"):
                stack += [getattr(t, name) for name in t.__tensor_flatten__()[0]]
            else:
                self.add(t, "param")

    def add(self, t: Any, kind: str = "other") -> None:
        """Track ``t``'s storage (a plain meta tensor); a tracked one takes ``kind`` unless it is a parameter or
        ``kind`` is ``other`` (a view of a saved tensor is no new storage)."""
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._index:
            entry = self.lives[self._index[key]]
            if entry[3] != "param" and kind != "other":
                entry[3] = kind
            return
        self._index[key] = len(self.lives)
        self.lives.append([self.clock, None, storage.nbytes(), kind])
        weakref.finalize(storage, self._free, key)

    def saved(self, t: torch.Tensor) -> torch.Tensor:
        """A ``saved_tensors_hooks`` pack hook: label ``t``'s storage saved, keep ``t`` as it is."""
        self.add(t, "saved")
        return t

    def _free(self, key: int) -> None:
        self.lives[self._index.pop(key)][1] = self.clock

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        for t in tree_leaves(out):
            self.add(t)
        return out

    def total(self, kind: str, born_after: int = -1) -> int:
        """Bytes of the storages of ``kind`` alive now (made after op ``born_after``)."""
        return sum(n for born, freed, n, k in self.lives if k == kind and freed is None and born > born_after)

    def timeline(self, start: int, end: int) -> tuple[tuple[int, int, int], ...]:
        """``(saved, gradients, other)`` bytes alive after each op from ``start`` to ``end``."""
        column = {"saved": 0, "gradient": 1, "other": 2}
        deltas = [[0, 0, 0] for _ in range(end - start + 2)]
        for born, freed, n, kind in self.lives:
            first, last = max(born, start), end if freed is None else min(freed, end)
            if kind != "param" and first <= last:  # alive after ops first .. last
                deltas[first - start][column[kind]] += n
                deltas[last - start + 1][column[kind]] -= n
        alive, out = [0, 0, 0], []
        for delta in deltas[:-1]:
            alive = [a + d for a, d in zip(alive, delta)]
            out.append(tuple(alive))
        return tuple(out)


@contextlib.contextmanager
def _attention_as_on_cpu() -> Iterator[None]:
    """Scaled-dot-product attention on meta tensors runs the kernel CPU tensors of the same shapes get."""
    with torch.library._scoped_library("aten", "IMPL") as library:
        library.impl("scaled_dot_product_attention", _cpu_attention, "AutogradMeta")
        yield


def _cpu_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` for meta tensors, dispatched as the CPU does (meta always takes math)."""
    def on_cpu(t: torch.Tensor | None) -> torch.Tensor | None:  # uninitialised, never read: only its layout counts
        return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).requires_grad_(
            t.requires_grad)

    choice = torch._fused_sdp_choice(on_cpu(query), on_cpu(key), on_cpu(value), attn_mask=on_cpu(attn_mask),
                                     dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernels take it additive, in the query dtype
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    if choice == SDPBackend.FLASH_ATTENTION.value:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]


@contextlib.contextmanager
def _flex_as_on_cuda() -> Iterator[None]:
    """The decoder's ``flex_attention`` call, on meta tensors, keeps what the CUDA kernel keeps for the backward."""
    def saves_only(q, k, v, *mask_scale_cap):
        return _FlexSaves.apply(q, k, v)

    with unittest.mock.patch.object(_decoder, "flex_kernel", saves_only):
        yield


class _FlexSaves(torch.autograd.Function):
    """Shapes only: ``flex_attention``'s output, saving q, k, v, the output and the fp32 log-sum-exp
    ``[batch, heads, q_len]`` as its kernel does."""

    @staticmethod
    def forward(q, k, v):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.save_for_backward(q, k, v, output, q.new_empty(q.shape[:-1], dtype=torch.float32))

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ----------------------------------------------------------------------------------------------------- plan


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
    """The batches carry an attention mask or packed position ids (sft always does): attention gets an
    explicit mask, ``[B, 1, S, S]`` on the CPU, a block mask on CUDA (``device``). False: plain causal batches
    (benchmarks)."""
    chunk_size: int = 1024
    fuse_projections: bool = False
    """q/k/v and gate/up fused (``transforms.fuse_projections``): measured through the real transform."""
    adapter_dtype: str = "fp32"
    device: str = "cpu"
    """cpu or cuda: the loss's softmax block and the runtime overhead."""

    def __attrs_post_init__(self):
        if self.method not in ("full", "lora", "dora", "qlora"):
            raise PlanError(f"unknown method {self.method!r} (full, lora, dora, qlora)")
        for name in ("dtype", "adapter_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise PlanError(f"unknown {name} {getattr(self, name)!r} ({', '.join(DTYPE_BYTES)})")


def model_builder(config: ModelConfig, setup: Setup) -> Callable[[int], Model]:
    """``build(num_layers)``: the model sft trains for ``setup``, ``config`` cut to ``num_layers`` layers, on meta.

    The transforms are sft's, in its order: quantize (QLoRA) -> lora or trainable -> checkpoint. A setting
    they refuse (a LoRA target that matches nothing, a shape NF4 cannot hold) is a :class:`PlanError`.
    """
    def build(num_layers: int, dense: int = 0) -> Model:
        """``dense``: of a mixture of experts' ``num_layers``, how many (the last ones) are dense; the others are
        sparse."""
        cut = attrs.evolve(config, num_layers=num_layers, layer_windows=config.layer_windows[:num_layers])
        if config.moe is not None:
            cut = attrs.evolve(cut, moe=attrs.evolve(config.moe, sparse_layers=tuple(range(num_layers - dense))))
        with torch.device("meta"):
            model = from_config(cut, dtype=as_dtype(setup.dtype))
        path = attention_path(setup.device, triton=True)  # a CUDA machine has torch's Triton
        model = model.replace(forward=attrs.evolve(model.decoder, attention=path))
        try:
            if setup.method == "qlora":
                model = quantize(model, "nf4")
            if setup.method == "full":
                model = trainable(model)
            else:
                model = lora(model, rank=setup.rank, alpha=setup.rank, dropout=setup.dropout, targets=setup.targets,
                             dora=setup.method == "dora", dtype=as_dtype(setup.adapter_dtype))
        except ValueError as e:
            raise PlanError(str(e)) from None
        model = fuse_projections(model) if setup.fuse_projections else model
        return checkpoint(model) if setup.checkpoint else model

    return build


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
            ", NF4 linears" if u.method == "qlora" else "") + shard
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
            ("runtime", self.overhead, f"{self.device} process / context" + (
                f" + allocator slack ({HOST_ALLOCATOR_SLACK:.0%} of the tensor peak)" if self.device == "cpu" else
                " (fixed)")),
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
    in_backward: bool = False,
    stochastic_rounding: bool = False,
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
    are still held). The model is measured with and without activation checkpointing (:func:`measure`).

    Phases (tensor bytes alive; ``static`` = weights + adapters + optimizer state):

    - ``forward``: static + activations + one loss chunk's logits and softmax block (+ accumulated grads);
    - ``backward``: static + the backward's measured peak (+ a gathered layer when sharded, + accumulated
      grads);
    - ``grad accumulation``: static + 3 x gradients (the sum, the new part and the running total);
    - ``clip``: static + gradients + the fp32 pieces their norms are taken of; ``update``: static +
      gradients + the upcast pieces of params narrower than the optimizer state (+ the new trainable params
      of a functional update). ``state_dtype``: the optimizer moments' dtype (int8 / fp8 / int4: torchao's
      quantized ones, their step's fp32 pieces). ``in_backward``: the optimizer runs in the backward, so no phase holds
      all gradients (see :func:`ftprog.programs.training.in_backward_step`). ``stochastic_rounding``: bf16 params
      and moments are upcast to fp32 pieces for the step, beside the rounding's fixed noise table
    """
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
    if state_dtype not in DTYPE_BYTES and state_dtype not in optim.LOW_BIT_STATES:
        raise PlanError(f"unknown optimizer state dtype {state_dtype!r} "
                        f"({', '.join([*DTYPE_BYTES, *optim.LOW_BIT_STATES])})")
    if state_dtype in optim.LOW_BIT_STATES and optimizer != "adamw":
        raise PlanError(f"optimizer state {state_dtype!r} is for adamw only")
    if optimizer not in ("adamw", "sgd"):
        raise PlanError(f"unknown optimizer {optimizer!r} (adamw, sgd)")
    opt = (optim.adamw(1e-3, state_dtype=state_dtype) if optimizer == "adamw"
           else optim.sgd(1e-3, momentum=momentum, state_dtype=state_dtype))
    dense_layers = 0 if s.moe is None or not s.moe.sparse_layers else s.num_layers - len(s.moe.sparse_layers)
    run = functools.partial(measure, num_layers=s.num_layers, batch_size=u.batch_size, seq_len=u.seq_len,
                            mask=u.mask, chunk_size=u.chunk_size, optimizer=opt, dense_layers=dense_layers)
    plain = functools.cache(model_builder(s, attrs.evolve(u, checkpoint=False)))  # one (quantized) base per depth
    built = {False: plain, True: lambda num_layers, **kinds: checkpoint(plain(num_layers, **kinds))}
    footprint = run(built[u.checkpoint])
    other = run(built[not u.checkpoint], backward=False).scaled("saved")
    activations = footprint.scaled("saved")
    acts_ck, acts_full = (activations, other) if u.checkpoint else (other, activations)
    notes = []

    trainable, trainable_bytes = footprint.scaled("trainable"), footprint.scaled("trainable_bytes")
    adapters = 0 if u.method == "full" else trainable_bytes
    weights = footprint.scaled("param_bytes") - adapters
    weights, adapters_s, grads_s, opt_s = (x / nproc for x in (
        weights, adapters, footprint.scaled("gradients"), footprint.scaled("optimizer")))
    gathered = 0
    if nproc > 1:  # a sharded layer is gathered whole for its forward / backward
        gathered = footprint.layer_param_bytes()
        notes.append("sharded: one layer's weights are gathered at a time (included in the backward)")
    static = weights + adapters_s + opt_s

    # The loss's transients: a chunk's [chunk, vocab] logits in the weight dtype (overwritten by their
    # gradient; a frozen output weight's chunks are at most _frozen_chunk_rows rows), the fp32 softmax of a block
    # of its rows at a time (its fp32 copy of the rows is freed with the block: measured, the peak holds one fp32
    # block beside the logits), and for a trained output weight whose targets span several chunks the chunk's
    # [vocab, hidden] weight-gradient product.
    # On a CPU without bf16 matmuls (matmul_dtype) the loss multiplies fp32 copies of a chunk's rows and of the
    # output weight's vocabulary slices, one at a time, into fp32 logits; the hidden gradient is summed in fp32
    # and a trained weight's gradient is written slice by slice. Beside the logits, the peak holds the largest of:
    # a softmax block; a slice's product before it is copied into the logits (none for one slice), the slice and
    # the rows; in the gradient pass a slice and the next one (or the slice's weight-gradient product), the rows,
    # their gradient and the weight's gradient (live-tensor accounting of one loss call: within 1 MiB of this at
    # vocab 4k and 32k, hidden 256 to 1024).
    b, V = DTYPE_BYTES[u.dtype], s.vocab_size
    m = 4 if matmul_dtype(as_dtype(u.dtype), kind) == torch.float32 else b
    targets = u.batch_size * u.seq_len
    chunk_size = u.chunk_size if u.method == "full" else _frozen_chunk_rows(u.chunk_size, V)
    chunk = _padded_rows(min(chunk_size, targets), chunk_size)  # the loss pads a chunk's rows to a bucket
    softmax_rows = min(chunk, _softmax_rows(V, torch.device(kind)))
    loss_chunk = chunk * V * m + softmax_rows * V * 4
    if m != b:
        H, rows = s.hidden_size, min(V, _UPCAST_ROWS)
        weight_grad = V * H * (b if targets <= u.chunk_size else 4) if u.method == "full" else 0
        project = chunk * rows * 4 * (V > rows) + rows * H * 4 + chunk * H * 4
        back = (1 + (V > rows or u.method == "full")) * rows * H * 4 + 2 * chunk * H * 4 + weight_grad
        loss_chunk = chunk * V * 4 + max(softmax_rows * V * 4, project, back)
    elif u.method == "full" and targets > u.chunk_size:
        loss_chunk += V * s.hidden_size * b
    accum = grads_s if grad_accum > 1 else 0
    pieces = min(trainable, _UPCAST_NUMEL)
    if state_dtype in optim.LOW_BIT_STATES:  # torchao's step keeps at most ~7 fp32 temporaries of each piece
        upcast = min(trainable, _LOW_BIT_PIECE) * 4 * LOW_BIT_UPDATE_TEMPORARIES
    else:
        state_bytes = DTYPE_BYTES[state_dtype]
        upcast = pieces * state_bytes * 2 if trainable_bytes < trainable * state_bytes else 0
        if stochastic_rounding and (trainable_bytes < trainable * 4 or state_bytes < 4):
            # params and grads, and bf16 moments too, in fp32 pieces; the noise table (int32)
            upcast = pieces * 4 * (2 + 2 * (state_bytes < 4)) + 2 * _UPCAST_NUMEL * 4
    norm_pieces = pieces * 4 if trainable_bytes < trainable * 4 else 0
    phases = {
        "forward": static + activations + loss_chunk + accum,
        "backward": static + footprint.backward_peak(nproc) + gathered + accum,
        "clip": static + grads_s + norm_pieces if max_grad_norm > 0 else 0,
        "update": static + grads_s + (0 if inplace_update else trainable_bytes / nproc) + upcast,
    }
    if in_backward:  # each gradient is applied and freed as it completes: the backward without the gradients'
        # running total, plus the largest gradient (a [vocab, hidden] one in full fine-tuning) and its update
        largest = V * s.hidden_size * b if u.method == "full" else 0
        phases = {"forward": phases["forward"],
                  "backward": static + footprint.backward_peak(shards=1 << 62) + largest + upcast}
    if grad_accum > 1:
        phases["grad accumulation"] = static + 3 * grads_s
    phases = {k: int(v) for k, v in phases.items()}
    peak_phase = max(phases, key=phases.get)
    if overhead is None:
        overhead = RUNTIME_OVERHEAD[kind]
        if kind == "cpu":  # torch modules loaded on first use count in the process's resident set
            low_bit = state_dtype in optim.LOW_BIT_STATES
            overhead += QUANTIZE_IMPORT_OVERHEAD * (u.method == "qlora" or low_bit)
            overhead += LOW_BIT_COMPILE_OVERHEAD * low_bit
            overhead += HOST_ALLOCATOR_SLACK * phases[peak_phase]
    return Plan(
        model=model_name or "config", setup=u, device=str(device), nproc=nproc, grad_accum=grad_accum,
        optimizer_name=optimizer, num_params=footprint.scaled("elements") - (0 if u.method == "full" else trainable),
        trainable_params=trainable, weights=int(weights), adapters=int(adapters_s), gradients=int(grads_s),
        optimizer=int(opt_s), activations=activations, activations_checkpointed=acts_ck,
        activations_full=acts_full, loss_chunk=int(loss_chunk), phases=phases, peak_phase=peak_phase,
        tensor_peak=phases[peak_phase], overhead=int(overhead), memory=parse_memory(memory), notes=tuple(notes),
        state_dtype=state_dtype, softmax_rows=softmax_rows,
    )


# ------------------------------------------------------------------------------------------ sft configs


def _model_config(path: str) -> tuple[dict[str, Any], str, str | None]:
    """``(config.json dict, where it came from, note)`` for ``model.path``, without loading weights."""
    if path in PRESETS:
        return dict(PRESETS[path]), f"preset {path}", None
    if path.startswith("builtin:"):
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
    """The preset of a Hub model's folder name: ``Llama-3.2-1B-Instruct`` -> ``llama-3.2-1b``,
    ``Mistral-7B-Instruct-v0.3`` -> ``mistral-7b-v0.3``."""
    key = re.sub(r"[-_](instruct|it|chat|base)(?=$|[-_]v[0-9])", "", name.lower())
    return key if key in PRESETS else None


def plan(config_name_or_path: str, overrides: Iterable[str] | Mapping[str, Any] = (), *,
         memory: int | str | None = None, nproc: int = 1, device: str | None = None) -> Plan:
    """Plan the peak memory of ``ft-prog run sft --config CONFIG [overrides]`` on one of ``nproc`` ranks.

    ``model.path`` may be a model folder (its config.json is read), a preset name (``llama-3.2-1b``) or
    ``builtin:demo-model``; a missing folder whose name is a preset's (``models/Llama-3.2-1B-Instruct``)
    is planned with that preset's shape, with a note. ``device`` (cpu / cuda) picks the runtime overhead;
    default: cuda if torch sees a GPU. ``memory`` (``"24GiB"``) sets the budget ``Plan.fits`` checks.
    """
    cfg, _ = load_config(SFTConfig, config_name_or_path, overrides, builtin_dir=Path(__file__).parent / "configs" / "sft")
    raw, source, note = _model_config(cfg.model.path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    method = "full" if cfg.peft.method == "none" else cfg.peft.method
    setup = Setup(method=method, dtype=cfg.dtype, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                  rank=cfg.peft.rank, targets=tuple(cfg.peft.targets), dropout=cfg.peft.dropout,
                  checkpoint=cfg.activation_checkpointing, mask=True, fuse_projections=cfg.fuse_projections)
    opt = cfg.optimizer
    result = estimate(raw, setup, nproc=nproc, grad_accum=cfg.grad_accum, optimizer=opt.name,
                      momentum=opt.momentum, state_dtype=optimizer_state_dtype(cfg), max_grad_norm=opt.max_grad_norm,
                      stochastic_rounding=opt.stochastic_rounding,
                      in_backward=opt.in_backward, device=device, memory=memory,
                      model_name=source)
    notes = (note,) if note else ()
    if cfg.activation_offloading and str(device).startswith("cuda"):
        notes += ("activation_offloading: planned with the activations on the device (an upper bound; the saved "
                  "tensors of at least 1 MiB wait in host memory instead)",)
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
