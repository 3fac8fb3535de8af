"""Fused projections: q/k/v as one matmul and gate/up as one, the tree left in the checkpoint's layout.

Design (chosen for exactness): the parameter tree keeps its separate ``q_proj`` / ``k_proj`` / ``v_proj`` and
``gate_proj`` / ``up_proj`` leaves, so gradients, the optimizer state, checkpoints, resume and adapters see the
model they always saw. Right before a layer runs (a :data:`~ftprog.core.Prepare`, so also inside a recomputed
layer) its plain parts are put under one ``qkv_proj`` / ``gate_up_proj`` node, which :func:`fused_linear`
computes as one matmul over their concatenated weights. The concatenation is a transient of that call: it is
neither kept for the backward (the backward concatenates again) nor kept between steps, so the fused model's
memory is the unfused model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..core import Model, dense_linear, is_plain, register_linear
from ..core._linear import linear_grads

from ._base import check_order, with_decoder

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"), ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))
"""``(block, separate projections, fused name)``: the projections one matmul computes together."""

PARTS_KEY, SIZES_KEY = "fused_parts", "fused_sizes"
"""The keys of a fused linear node: its parts' ``{"weight"[, "bias"]}`` nodes in output order (the key
:func:`~ftprog.core.register_linear` dispatches on, first) and their output sizes."""


def fuse_projections(model: Model) -> Model:
    """Run each layer's q/k/v projections as one matmul, and gate/up as one.

    A group is fused in a layer when every part of it is a plain linear (a plain weight, biases on all parts
    or none): a part carrying an adapter (LoRA, DoRA), a quantized or fake-quantized weight keeps the group
    separate, decided each forward from what the tree holds. So it serves full fine-tuning, and under LoRA it
    fuses the groups no adapter sits on (their frozen base weights; gradients still flow to the input).
    Logits and gradients equal the unfused model's up to float rounding; the tree, trainable set and saved
    checkpoints are unchanged. Order: after ``shard`` (it fuses the gathered weights), before ``compile``.
    """
    check_order(model, "fuse_projections")
    if "fuse_projections" in model.transforms:
        raise ValueError("fuse_projections: the model's projections are already fused")
    decoder = model.decoder
    return with_decoder(model, "fuse_projections", prepares=(*decoder.prepares, ("fuse_projections", fused_layer)))


def fused_layer(node: Mapping) -> Mapping:
    """A layer's parameter node with each fusable group (:data:`GROUPS`) under its fused name; other nodes as is."""
    changed = {}
    for block, parts, fused_name in GROUPS:
        sub = node.get(block)
        if isinstance(sub, Mapping) and _fusable([sub.get(name) for name in parts]):
            rest = {k: v for k, v in sub.items() if k not in parts}
            nodes = tuple(sub[name] for name in parts)
            sizes = tuple(n["weight"].shape[0] for n in nodes)
            changed[block] = {**rest, fused_name: {PARTS_KEY: nodes, SIZES_KEY: sizes}}
    return {**node, **changed} if changed else node


def _fusable(parts: Sequence) -> bool:
    if not all(isinstance(p, Mapping) and set(p) in ({"weight"}, {"weight", "bias"}) for p in parts):
        return False
    tensors = [t for p in parts for t in p.values()]
    return all(is_plain(t) for t in tensors) and len({"bias" in p for p in parts}) == 1 and \
        len({(t.dtype, t.device) for t in tensors}) == 1


def fused_linear(x: torch.Tensor, node: Mapping) -> torch.Tensor:
    """``x [..., in] -> [..., sum of the parts' out]``: the parts of ``node[PARTS_KEY]`` as one matmul."""
    parts = node[PARTS_KEY]
    weights = [p["weight"] for p in parts]
    biases = [p["bias"] for p in parts if "bias" in p]
    return _FusedLinear.apply(x, len(weights), *weights, *biases)


class _FusedLinear(torch.autograd.Function):
    """``F.linear(x, cat(weights), cat(biases))``, keeping only ``x`` and the weights themselves for the backward.

    Each weight's gradient is its rows of one ``[sum out, in]`` product (views of one buffer).
    """

    @staticmethod
    def forward(x, count, *tensors):
        weights, biases = tensors[:count], tensors[count:]
        return dense_linear(x, torch.cat(weights), torch.cat(biases) if biases else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, count, *tensors = inputs
        ctx.count, ctx.has_bias = count, len(tensors) > count
        ctx.save_for_backward(x, *tensors[:count])

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_w, need_b = any(needs[2:2 + ctx.count]), ctx.has_bias and any(needs[2 + ctx.count:])
        grad_x, flat_w, flat_b = linear_grads(grad, x if need_w else None, torch.cat(weights) if needs[0] else None,
                                              need_b)
        sizes = [w.shape[0] for w in weights]
        grad_w = list(flat_w.split(sizes)) if need_w else [None] * ctx.count
        grad_b = list(flat_b.split(sizes)) if need_b else [None] * (ctx.count if ctx.has_bias else 0)
        mine = [g if n else None for g, n in zip(grad_w + grad_b, needs[2:])]
        return grad_x, None, *mine


register_linear(PARTS_KEY, fused_linear)
