"""The one linear primitive every projection of every architecture goes through.

What a transform puts at a linear's place in the parameter tree decides what
runs here, so the model code never mentions adapters or quantization:

- ``{"weight": W[, "bias": b]}``: a plain linear. ``W`` may be a torchao
  quantized tensor (NF4, int8, int4): it implements ``F.linear`` itself.
- a node holding a *registered key* (:func:`register_linear`): the function
  registered for that key computes the node, reading whatever the transform
  stored in it (tensors and static settings). ``ftprog.transforms.lora``
  registers LoRA / DoRA this way; a new adapter kind needs no change here.

Mixtures of experts compute one projection of every expert at once with
:func:`grouped_linear` (rows sorted by expert): a kind may register a grouped
implementation beside its per-node one; otherwise each expert's slice goes
through :func:`linear`, so any mix of kinds (quantized, DoRA, unadapted) works.

Training mode (adapter dropout) is one process-wide value that the forward
sets from its context (:func:`set_training`), read with :func:`is_training`.

bf16 / fp16 matmuls on a CPU without native kernels for them compute in fp32 (:func:`matmul_dtype`,
:func:`dense_linear`): the result of the same fp32 accumulation, without torch's scalar fallback loop.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ._tree import is_plain, is_quantized

LinearFn = Callable[[torch.Tensor, Mapping], torch.Tensor]
"""``fn(x [..., in], node) -> [..., out]``: how one kind of linear node computes."""
GroupedLinearFn = Callable[[torch.Tensor, Sequence[int], Sequence[Mapping]], torch.Tensor]
"""``fn(x [rows, in], counts, nodes) -> [rows, out]``: a kind's :func:`grouped_linear` over nodes all of that kind."""

PLAIN_KEYS = frozenset({"weight", "bias"})
_KINDS: dict[str, LinearFn] = {}
_GROUPED: dict[str, GroupedLinearFn] = {}
_training = False


def register_linear(key: str, fn: LinearFn, *, grouped: GroupedLinearFn | None = None) -> None:
    """Make :func:`linear` compute every node that holds ``key`` with ``fn(x, node)``.

    ``key`` is a name no other kind uses (LoRA registers ``"lora_A"``). ``grouped``: how
    :func:`grouped_linear` computes a group of such nodes at once (default: ``fn`` per node).
    Registering a key again replaces its functions (reloading a module is harmless).
    """
    if key in PLAIN_KEYS:
        raise ValueError(f"register_linear: {key!r} is part of every plain linear node; choose another key")
    _KINDS[key] = fn
    _GROUPED.pop(key, None)
    if grouped is not None:
        _GROUPED[key] = grouped


def linear_kind(node: Mapping) -> str | None:
    """The registered key that decides how ``node`` computes; None for a plain (or quantized) linear."""
    for key in node:
        if key not in PLAIN_KEYS:
            if key in _KINDS:
                return key
            raise ValueError(f"linear node with keys {sorted(node)}: no kind is registered for {key!r} "
                             "(the transform that adds it registers it: import it, e.g. ftprog.transforms)")
    return None


def is_training() -> bool:
    """Whether the running forward is in training mode (adapters apply dropout)."""
    return _training


def set_training(on: bool) -> bool:
    """Set training mode; returns the previous value (restore it with another call).

    The decoder sets it from its context around every layer and the output
    layer, so a recomputed (checkpointed) layer sees the mode of its first run.
    """
    global _training
    previous, _training = _training, bool(on)
    return previous


def dense_weight(node: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight of a linear node as a plain tensor (NF4/int8/int4 dequantized)."""
    return _dense(node["weight"], dtype)


def _dense(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if is_quantized(w):
        # NF4Tensor.dequantize is a static lookup helper; its full dequantization is get_original_weight.
        w = w.get_original_weight() if hasattr(w, "get_original_weight") else w.dequantize()
    return w if dtype is None else w.to(dtype)


CPU_MATMUL_UPCAST_ENV = "FTPROG_CPU_MATMUL_UPCAST"
"""``FTPROG_CPU_MATMUL_UPCAST=1`` computes every bf16 / fp16 matmul on the CPU in fp32, ``0`` never does; unset,
:func:`matmul_dtype` decides from the CPU."""


@functools.cache
def _cpu_has_kernels(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN multiplies ``dtype`` matrices on this CPU (AVX-512 or AMX for bf16, AVX-512-FP16 or
    AMX-FP16 for fp16; Arm with BF16). Without, torch runs a scalar loop."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # no oneDNN in this build: the same scalar loop
        return False


def matmul_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype :func:`dense_linear` and the fused loss multiply ``dtype`` matrices in on ``device``.

    ``dtype`` itself, except bf16 / fp16 on a CPU without oneDNN kernels for it (no AVX-512 / AMX: AMD Zen 2-3,
    Intel desktop CPUs): fp32 there. Measured on a 2-core AMD EPYC (AVX2), torch 2.13: a bf16 ``[1024, 512] x
    [512, 1408]`` linear took 155 ms, upcast to fp32 19 ms; ``[1024, 1024]^2`` 2,217 ms against 14 ms. Both
    accumulate in fp32; results differ by summation order and the one rounding of the output. Set
    :data:`CPU_MATMUL_UPCAST_ENV` to force it.
    """
    if dtype not in (torch.bfloat16, torch.float16) or torch.device(device).type != "cpu":
        return dtype
    forced = os.environ.get(CPU_MATMUL_UPCAST_ENV, "").strip()
    if forced in ("0", "1"):
        return torch.float32 if forced == "1" else dtype
    if forced:
        raise ValueError(f"{CPU_MATMUL_UPCAST_ENV}={forced!r}: use 1 (bf16 / fp16 matmuls on the CPU in fp32), 0 "
                         "(in their own dtype) or leave it unset (decided from the CPU)")
    return dtype if _cpu_has_kernels(dtype) else torch.float32


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed in :func:`matmul_dtype` (fp32 for bf16 on a CPU without bf16
    kernels, an NF4 weight dequantized to it; the backward too, keeping only ``x`` and ``weight`` themselves,
    never fp32 copies)."""
    compute = matmul_dtype(x.dtype, x.device)
    # An NF4 weight's own linear is a dequantization and a matmul in x's dtype, so it upcasts like a plain one;
    # int8 / int4 weights keep torchao's kernels.
    nf4 = is_quantized(weight) and hasattr(weight, "get_original_weight")
    if compute == x.dtype or not (nf4 or is_plain(weight) and weight.dtype == x.dtype):
        return F.linear(x, weight, bias)
    return _UpcastLinear.apply(x, weight, bias, compute)


class _UpcastLinear(torch.autograd.Function):
    """``F.linear`` on ``compute`` copies of its inputs (an NF4 weight dequantized), the output (and the
    gradients) rounded back to theirs."""

    @staticmethod
    def forward(x, weight, bias, compute):
        out = F.linear(x.to(compute), _dense(weight, compute), None if bias is None else bias.to(compute))
        return out.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, compute = inputs
        ctx.compute, ctx.has_bias = compute, bias is not None
        need_x, need_w = ctx.needs_input_grad[:2]
        # grad x needs the weight, grad weight needs x: keep only what a gradient needs
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        return *linear_grads(grad, x if need_w else None, weight if need_x else None, need_b), None


def linear_grads(grad: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None, bias: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad x, grad weight, grad bias)`` of ``F.linear(x, weight, bias)`` for its output's ``grad [..., out]``,
    computed in :func:`matmul_dtype` and returned in ``grad``'s dtype; grad x only given ``weight [out, in]``
    (plain or NF4), grad weight only given ``x [..., in]``, grad bias only if ``bias``."""
    compute = matmul_dtype(grad.dtype, grad.device)
    g = grad.to(compute)
    grad_x = (g @ _dense(weight, compute)).to(grad.dtype) if weight is not None else None
    flat = g.reshape(-1, g.shape[-1])
    grad_w = (flat.t() @ x.reshape(-1, x.shape[-1]).to(compute)).to(grad.dtype) if x is not None else None
    grad_b = flat.sum(0).to(grad.dtype) if bias else None
    return grad_x, grad_w, grad_b


def _kind(node: Mapping) -> str | None:
    return None if len(node) == 1 or (len(node) == 2 and "bias" in node) else linear_kind(node)


def linear(x: torch.Tensor, node: Mapping) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` through whatever the tree holds at this linear."""
    kind = _kind(node)
    if kind is None:
        return dense_linear(x, node["weight"], node.get("bias"))
    return _KINDS[kind](x, node)


def grouped_linear(x: torch.Tensor, counts: Sequence[int], nodes: Sequence[Mapping]) -> torch.Tensor:
    """``x [rows, in] -> [rows, out]``, the first ``counts[0]`` rows through ``nodes[0]``, the next ``counts[1]``
    through ``nodes[1]``, ... (one projection of every expert over tokens sorted by expert).

    Nodes all of one kind that registered a grouped implementation compute through it; any other group (plain,
    quantized, mixed kinds) runs :func:`linear` per node. A node with ``count`` 0 still runs (on no rows), so its
    parameters take part in the backward.
    """
    if len(counts) != len(nodes) or sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_linear: counts {list(counts)} (sum {sum(counts)}) for {len(nodes)} nodes and "
                         f"{x.shape[0]} rows; give one count per node, summing to the rows")
    kinds = {_kind(node) for node in nodes}
    grouped = _GROUPED.get(kinds.pop()) if len(kinds) == 1 else None
    if grouped is not None:
        return grouped(x, counts, nodes)
    return per_node_linear(x, counts, nodes)


def per_node_linear(x: torch.Tensor, counts: Sequence[int], nodes: Sequence[Mapping]) -> torch.Tensor:
    """:func:`grouped_linear` as one :func:`linear` per node: what a grouped implementation must equal in fp32
    (in a narrower dtype it may round differently, e.g. LoRA's grouped adapters compute in the input's dtype)."""
    # split, not slicing: its backward is one concatenation rather than a zero-filled copy per slice
    return torch.cat([linear(rows, node) for rows, node in zip(x.split(list(counts)), nodes)])
