"""LoRA / DoRA adapters as a rewrite of the parameter tree, the linear kind that computes them, and merging them back.

An adapted linear node holds, beside its ``weight`` (and ``bias``), PEFT's
tensors ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]`` (and DoRA's
``lora_magnitude_vector [out]``) and one static leaf, ``lora`` (a
:class:`LoraSpec`: the scale and dropout the computation needs; its path
``....q_proj.lora`` never matches ``.lora_``, which marks adapter tensors). The node
computes ``y = x W^T + b + scale * (dropout(x) A^T) B^T``; DoRA rescales the
output by ``m / ||W + scale * B A||`` (row norms, treated as a constant as
PEFT does). :func:`ftprog.core.linear` dispatches such nodes here through the
key ``lora_A`` (:func:`ftprog.core.register_linear`), and
:func:`ftprog.core.grouped_linear` (a projection of every expert of a mixture
of experts) to :func:`grouped_lora_linear`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs
import torch
import torch.nn.functional as F

from ..core import (
    Model, dense_linear, dense_weight, flatten, is_quantized, is_training, linear, linear_kind, linear_paths, matches,
    matmul_dtype, per_node_linear, register_linear, tree_map, unflatten,
)
from ..core._decoder import _needs_grad
from ..core._tree import get

from ._base import BASE_KEYS, check_order, record

ALL_LINEAR = "all-linear"
EXPERTS = "experts"
"""The LoRA target that selects every expert projection of a mixture of experts."""
SPEC_KEY = "lora"
"""The key of an adapted node's static :class:`LoraSpec` leaf."""


@attrs.frozen
class LoraSpec:
    """Static settings of one adapted linear.

    Args:
        rank: adapter rank r (``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``).
        alpha: scale numerator: the update is multiplied by ``alpha / r``
            (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout probability on the adapter input, training mode only.
        rslora: rank-stabilised scaling.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)


def lora_delta(node: Mapping) -> torch.Tensor:
    """``scale * B @ A``: the adapter's change to the weight, ``[out, in]``."""
    a, b = node["lora_A"]["weight"], node["lora_B"]["weight"]
    return (b @ a) * node[SPEC_KEY].scale


def lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(x @ a^T) @ b^T`` in the adapters' dtype (``x [..., in]`` upcast to it, as PEFT does) ``-> [..., out]``.

    For the backward it keeps ``x`` in its own dtype and the ``[..., rank]`` middle, not the upcast copy of ``x``
    (an fp32 copy of a bf16 input per adapted linear); the gradients equal autograd's through the same matmuls
    bit for bit. With ``x`` already in the adapters' dtype there is no copy to spare, and without a gradient to
    take nothing is kept: the plain ops run.
    """
    if x.dtype == a.dtype or not _needs_grad(x, a, b):
        return F.linear(F.linear(x.to(a.dtype), a), b)
    return _LoraBranch.apply(x, a, b)[0]


class _LoraBranch(torch.autograd.Function):
    @staticmethod
    def forward(x, a, b):
        middle = F.linear(x.to(a.dtype), a)
        return F.linear(middle, b), middle

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad, _grad_middle):
        if grad is None:
            return None, None, None
        x, a, b, middle = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        grad_b = grad.t().mm(middle.reshape(-1, middle.shape[-1])) if need_b else None
        grad_x = grad_a = None
        if need_x or need_a:
            grad_middle = grad.mm(b)
            if need_a:
                grad_a = grad_middle.t().mm(x.reshape(-1, x.shape[-1]).to(a.dtype))
            if need_x:
                grad_x = grad_middle.mm(a).to(x.dtype).reshape(x.shape)
        return grad_x, grad_a, grad_b


def lora_linear(x: torch.Tensor, node: Mapping) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` through an adapted node (LoRA, or DoRA with a magnitude vector)."""
    spec: LoraSpec = node[SPEC_KEY]
    weight, bias = node["weight"], node.get("bias")
    a, b = node["lora_A"]["weight"], node["lora_B"]["weight"]
    x_drop = F.dropout(x, spec.dropout, training=True) if spec.dropout and is_training() else x
    update = lora_branch(x_drop, a, b).to(x.dtype) * spec.scale
    magnitude = node.get("lora_magnitude_vector")
    if magnitude is None:  # the base through the primitive: a fake-quantized base (transforms.qat) stays so
        return linear(x, {k: v for k, v in node.items() if k in BASE_KEYS}) + update
    # DoRA, as PEFT computes it: with dropout the rescaled base path uses the dropped input.
    with torch.no_grad():
        w = dense_weight(node, a.dtype)
        row_norm = (w + lora_delta(node).to(w.dtype)).norm(dim=1)
    mag_scale = (magnitude / row_norm).to(x.dtype)
    if x_drop is x:
        out = mag_scale * (dense_linear(x, weight) + update)
        return out if bias is None else out + bias
    return dense_linear(x, weight, bias) + (mag_scale - 1) * dense_linear(x_drop, weight) + mag_scale * update


def grouped_lora_linear(x: torch.Tensor, counts: Sequence[int], nodes: Sequence[Mapping]) -> torch.Tensor:
    """``x [rows, in] -> [rows, out]``: ``counts[e]`` rows (sorted) through adapted node ``e``, every adapter at once.

    The bases run per node; the adapters in two matmuls over all of them: ``h = dropout(x) @ cat(A_e)^T``
    ``[rows, sum r_e]``, each row's columns of other nodes' adapters zeroed (a mask that also holds the scale),
    then ``h @ cat(B_e)^T``. The adapters compute in ``x``'s dtype (their factors cast to it, as PEFT computes the
    adapters of 3-D expert weights: in the weights' dtype), not in their own fp32 as :func:`lora_linear` does:
    in fp32 both give the same values; in bf16 the grouped path runs on the CPU's bf16 matrix units (in fp32 on
    a CPU without them, :func:`ftprog.core.matmul_dtype`).

    Dropout is one mask over the sorted rows: each row is one token's input to one node, so every node's adapter
    sees its own independently dropped inputs, as PEFT drops each adapted linear's input. DoRA nodes, or nodes
    whose :class:`LoraSpec` differ, run per node (:func:`lora_linear`).
    """
    specs = {node[SPEC_KEY] for node in nodes}
    if len(specs) != 1 or any("lora_magnitude_vector" in node for node in nodes):
        return per_node_linear(x, counts, nodes)
    spec = specs.pop()
    base = per_node_linear(x, counts, [{k: v for k, v in node.items() if k in BASE_KEYS} for node in nodes])
    compute = matmul_dtype(x.dtype, x.device)
    a = torch.cat([node["lora_A"]["weight"] for node in nodes]).to(compute)
    b = torch.cat([node["lora_B"]["weight"] for node in nodes], dim=1).to(compute)
    x_drop = F.dropout(x, spec.dropout, training=True) if spec.dropout and is_training() else x
    h = F.linear(x_drop.to(compute), a)
    h = h * own_adapter_mask(counts, [node["lora_A"]["weight"].shape[0] for node in nodes], spec.scale, h)
    if compute == x.dtype:
        return torch.addmm(base, h, b.t())
    return base + (h @ b.t()).to(x.dtype)


def own_adapter_mask(counts: Sequence[int], ranks: Sequence[int], scale: float, x: torch.Tensor) -> torch.Tensor:
    """``[sum counts, sum ranks]`` in ``x``'s dtype and device: block diagonal, node ``e``'s block (its rows, its
    adapter's columns) ``counts[e] x ranks[e]`` of ``scale``, 0 elsewhere."""
    return torch.block_diag(*[torch.full((n, r), scale, dtype=x.dtype, device=x.device)
                              for n, r in zip(counts, ranks)])


register_linear("lora_A", lora_linear, grouped=grouped_lora_linear)


def adapted_paths(model: Model) -> list[str]:
    """Module paths of the linears that hold an adapter of any registered kind, in model order."""
    return [p for p in linear_paths(model.config)
            if linear_kind({k: v for k, v in get(model.params, p).items() if k not in BASE_KEYS}) is not None]


def adapter_leaves(model: Model) -> set[str]:
    """Paths of every leaf an adapter added (tensors and static settings; not the base ``weight``/``bias``)."""
    return {f"{m}.{p}" for m in adapted_paths(model) for p in flatten(get(model.params, m))
            if p.split(".", 1)[0] not in BASE_KEYS}


def has_adapters(model: Model) -> bool:
    """Whether any linear of the model holds an adapter (LoRA, DoRA or another registered kind)."""
    return bool(adapted_paths(model))


def lora_spec(model: Model) -> LoraSpec | None:
    """The :class:`LoraSpec` the model's LoRA adapters share; None without LoRA adapters."""
    specs = {get(model.params, p)[SPEC_KEY] for p in adapted_paths(model) if SPEC_KEY in get(model.params, p)}
    if len(specs) > 1:
        raise ValueError(f"the model's LoRA adapters have different settings: {sorted(map(repr, specs))}")
    return next(iter(specs), None)


FUSED_PARTS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
"""Separate projection name -> the fused projection that holds it (models with ``fused_projections``)."""


def resolve_targets(model: Model, targets: str | Sequence[str]) -> list[str]:
    """Module paths selected by ``targets``.

    A target is a module name (``"q_proj"``, matching the last part of the
    path, as PEFT's ``target_modules``), a glob over module paths
    (``"model.layers.1*.mlp.*"``), ``"all-linear"`` (every linear but
    ``lm_head``, as PEFT) or ``"lm_head"``.

    Fused projections (Phi-3/4's ``qkv_proj`` and ``gate_up_proj``) stay fused: a target naming a part
    (``q_proj``, ``k_proj``, ``v_proj``; ``gate_proj``, ``up_proj``) selects the whole fused projection, which
    gets one adapter in the checkpoint's layout (as PEFT adapts these models).

    Mixtures of experts: ``"experts"`` selects every projection of every expert (each gets its own adapter, in
    the checkpoint's per-expert layout); a projection name (``w1``, ``gate_proj``) selects it in every expert
    (and, for Qwen3-MoE, in the dense layers' MLPs). The router (``gate``) is not a target.
    """
    if isinstance(targets, str):
        targets = (targets,)
    if model.config.fused_projections:
        targets = tuple(dict.fromkeys(FUSED_PARTS.get(t, t) for t in targets))
    candidates = linear_paths(model.config)
    chosen = []
    for path in candidates:
        name = path.rsplit(".", 1)[-1]
        for t in targets:
            if (t == ALL_LINEAR and path != "lm_head") or t in (name, path) or matches(path, t) or \
                    (t == EXPERTS and f".{EXPERTS}." in path):
                chosen.append(path)
                break
    unknown = [t for t in targets if t != ALL_LINEAR and not any(
        t in (p, p.rsplit(".", 1)[-1]) or matches(p, t) or (t == EXPERTS and f".{EXPERTS}." in p)
        for p in candidates)]
    if unknown:
        if "gate" in unknown and model.config.moe is not None:
            raise ValueError("lora target 'gate' is a mixture of experts' router; ft-prog adapts the attention "
                             "and expert projections only (the router is trained in full fine-tuning)")
        names = sorted({p.rsplit(".", 1)[-1] for p in candidates})
        if model.config.moe is not None:
            names = sorted({n for n in names if not n.isdigit()} | {EXPERTS})
        hint = " (tied embeddings: lm_head has no weight of its own)" if "lm_head" in unknown else ""
        raise ValueError(f"lora targets {unknown} match no linear layer{hint}; linear names are {names}")
    return chosen


def lora(model: Model, *, rank: int, alpha: float, dropout: float = 0.0,
         targets: str | Sequence[str] = ("q_proj", "v_proj"), dora: bool = False, rslora: bool = False,
         seed: int = 0, dtype: torch.dtype = torch.float32) -> Model:
    """Add LoRA (or DoRA) adapters to the targeted linears.

    Tree: each targeted node ``{weight[, bias]}`` gains ``lora_A.weight``
    ``[rank, in]`` (Kaiming-uniform, as PEFT) and ``lora_B.weight``
    ``[out, rank]`` (zeros), so the adapted model computes exactly the base
    model at first; DoRA adds ``lora_magnitude_vector [out]`` = the row norms of
    the base weight. Adapters are kept in ``dtype`` (fp32 by default, as PEFT
    does for half-precision bases). Base weights are shared, not copied.

    Each node also gets the static leaf ``lora`` (:class:`LoraSpec`: scale, dropout).

    Trainable set afterwards: the adapter leaves (and DoRA magnitudes) only.
    Works on quantized bases (``quantize`` then ``lora`` is QLoRA).
    """
    check_order(model, "lora")
    if rank < 1:
        raise ValueError(f"lora: rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora: dropout must be in [0, 1), got {dropout}")
    if has_adapters(model):
        raise ValueError("lora: the model already has adapters; merge them first (ftprog.transforms.merge)")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    paths = resolve_targets(model, targets)
    if dora and "qat" in model.transforms:
        raise ValueError("lora: DoRA over a fake-quantized base (qat) is not supported; use LoRA (dora=False)")
    spec = LoraSpec(rank=rank, alpha=float(alpha), dropout=dropout, rslora=rslora)
    generator = torch.Generator().manual_seed(seed)
    flat = dict(flatten(model.params))
    new = []
    for path in paths:
        node = get(model.params, path)
        out_features, in_features = node["weight"].shape
        a = torch.empty(rank, in_features)
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
        a.uniform_(-bound, bound, generator=generator)
        entries = {f"{path}.lora_A.weight": a.to(dtype),
                   f"{path}.lora_B.weight": torch.zeros(out_features, rank, dtype=dtype)}
        if dora:
            entries[f"{path}.lora_magnitude_vector"] = dense_weight(node, dtype).norm(dim=1)
        device = node["weight"].device
        entries = {k: v.to(device) for k, v in entries.items()}
        flat.update(entries)
        flat[f"{path}.{SPEC_KEY}"] = spec
        new += entries
    return record(model, "lora", params=unflatten(flat), trainable=frozenset(new))


def without_adapters(model: Model) -> Model:
    """The base model under the adapters, as a view: every adapter leaf left out, every other tensor shared.

    Its logits are those of the model before ``lora`` (DoRA: before its magnitudes too), whatever the adapters
    learned since: the reference model of preference tuning at no extra weight memory. Forward wrappers
    (checkpoint, shard, compile) stay; nothing is trainable. ValueError when the model has no adapters.
    """
    leaves = adapter_leaves(model)
    if not leaves:
        raise ValueError("without_adapters: the model has no adapters (full fine-tuning needs a frozen copy)")
    kept = {p: t for p, t in flatten(model.params).items() if p not in leaves}
    return model.replace(params=unflatten(kept), trainable=frozenset())


def merge(model: Model, dtype: torch.dtype | None = None) -> Model:
    """Fold the adapters into the base weights: a plain model with the same logits.

    ``W <- W + scale * B A`` (DoRA: then each row rescaled to its magnitude).
    Quantized weights are dequantized to ``dtype`` (default: the embedding's
    dtype). The result has no adapter leaves and every leaf trainable. A
    fake-quantized base (``qat``) becomes plain: its logits are then those of
    the float weights, and ``convert_qat`` no longer applies.
    """
    check_order(model, "merge")
    modules = adapted_paths(model)
    if not modules:
        raise ValueError("merge: the model has no adapters to merge")
    unknown = [m for m in modules if SPEC_KEY not in get(model.params, m)]
    if unknown:
        raise ValueError(f"merge: {unknown[0]!r} holds an adapter of another kind than LoRA/DoRA "
                         f"({linear_kind(get(model.params, unknown[0]))!r}); merge folds LoRA/DoRA only")
    dtype = dtype or model.dtype
    params = unflatten(flatten(model.params))  # new dicts, same tensors: the nodes below are edited in place
    for module in modules:
        node = get(params, module)
        with torch.no_grad():
            w = dense_weight(node, torch.float32) + lora_delta(node).float()
            if "lora_magnitude_vector" in node:
                w = w * (node["lora_magnitude_vector"].float() / w.norm(dim=1))[:, None]
        for key in [k for k in node if k not in ("weight", "bias")]:
            del node[key]
        node["weight"] = w.to(dtype)
    params = unflatten({p: v for p, v in flatten(params).items() if p.rsplit(".", 1)[-1] != "qat"})
    params = tree_map(lambda t: dense_weight({"weight": t}, dtype) if is_quantized(t) else t, params)
    return model.replace(params=params, trainable=frozenset(flatten(params)),
                         transforms=tuple(t for t in model.transforms if t not in ("lora", "load_adapter", "qat")))
