"""How a model runs: activation checkpointing, compilation, parameter dtype."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from ..core import LayerFn, Model, as_dtype, flatten, is_dtensor, is_quantized, recompute
from ..core._tree import tree_map_with_path

from ._base import check_order, record, with_decoder
from ._lora import adapter_leaves


def checkpoint(model: Model, *, every: int = 1) -> Model:
    """Activation checkpointing: recompute every ``every``-th decoder layer in the backward.

    Only layer inputs are kept for those layers, which lowers peak training
    memory for about one extra forward of compute. Dropout masks are
    reproduced in the recomputation (RNG state is preserved). No effect
    without gradients or with a KV cache. Tree and trainable set unchanged.
    """
    check_order(model, "checkpoint")
    if every < 1:
        raise ValueError(f"checkpoint: every must be >= 1, got {every}")
    if "checkpoint" in model.transforms:
        raise ValueError("checkpoint: the model is already checkpointed")

    def wrap(layer_fn: LayerFn, index: int) -> LayerFn:
        return layer_fn if index % every else recomputed(layer_fn)

    return with_decoder(model, "checkpoint", layer_wraps=(*model.decoder.layer_wraps, ("checkpoint", wrap)))


def recomputed(layer_fn: LayerFn) -> LayerFn:
    """``layer_fn`` whose activations are recomputed in the backward (only its inputs are kept).

    Without gradients (inference, generation) it simply runs. Eager, it runs through
    :func:`~ftprog.core.recompute`, which keeps the process free of ``torch._dynamo``
    (~73 MiB of host memory); a sparse layer's router logits come out of the recomputed
    function beside its output, so the router's auxiliary loss still has its gradient.
    Compiled, it is ``torch.utils.checkpoint``, which the compiler traces; a layer whose
    parameters are sharded (DTensors) then saves the outputs of its random ops (attention,
    dropout) instead of replaying them: torch 2.13's partitioner misplaces the saved RNG
    states of replayed random ops when the graph also saves a DeviceMesh, and the compiled
    forward then fails with "expected all tensors_saved_with_vc_check to be Tensors".
    """

    def with_router_logits(p, x, ctx):
        sink: dict[int, torch.Tensor] = {}
        return layer_fn(p, x, dataclasses.replace(ctx, router_logits=sink)), sink

    def run(p, x, ctx):
        if not torch.is_grad_enabled():
            return layer_fn(p, x, ctx)
        if torch.compiler.is_compiling() and any(is_dtensor(t) for t in flatten(p).values()):
            return _torch_checkpoint(layer_fn, p, x, ctx, use_reentrant=False, context_fn=_save_random_ops_context)
        # compiled, recompute is torch's checkpoint, whose traced graph keeps the router's writes to ctx
        if ctx.router_logits is None or torch.compiler.is_compiling():
            return recompute(layer_fn, p, x, ctx)
        out, router_logits = recompute(with_router_logits, p, x, ctx)
        ctx.router_logits.update(router_logits)
        return out

    return run


def _save_random_ops(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective-checkpoint policy: keep the outputs of random ops (SDPA, dropout), recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _save_random_ops_context() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_random_ops)


@attrs.frozen(eq=False)
class Compiled:
    """A forward compiled with ``torch.compile``; ``inner`` is the eager forward."""

    inner: Callable
    compiled: Callable

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.compiled(*args, **kwargs)


def compile(model: Model, **compile_kwargs: Any) -> Model:  # noqa: A001 - the transform's public name
    """``torch.compile`` the whole forward (the outermost call, so it really compiles).

    Gradients come from ``torch.autograd.grad`` over the compiled graph
    (AOTAutograd compiles forward and backward). Apply it last: transforms
    that change the forward refuse a compiled model. Tree and trainable set
    unchanged; results equal the eager model's within float tolerance. A
    sharded model (``shard``) compiles with its gathers in the graph.
    """
    check_order(model, "compile")
    if "compile" in model.transforms:
        raise ValueError("compile: the model is already compiled")
    forward = model.forward
    return record(model, "compile", forward=Compiled(forward, torch.compile(forward, **compile_kwargs)))


def uncompile(model: Model) -> Model:
    """The model with its eager forward again (undoes ``compile``; a model that is not compiled is returned as is).

    For what runs once after training (evaluation, generation with a KV cache, merge and save), where a
    compiled forward would only recompile for every new shape.
    """
    if "compile" not in model.transforms:
        return model
    return model.replace(forward=model.forward.inner, transforms=tuple(t for t in model.transforms if t != "compile"))


def cast(model: Model, dtype: torch.dtype | str) -> Model:
    """Cast every floating-point leaf to ``dtype``; quantized weights and adapters keep theirs.

    Adapters stay in the dtype ``lora(dtype=...)`` gave them (fp32 by default), so
    ``cast`` before or after ``lora`` gives the same model. Returns a new model;
    the input keeps its tensors. Trainable set unchanged.
    """
    check_order(model, "cast")
    dtype = as_dtype(dtype)
    keep = adapter_leaves(model)

    def convert(path: str, t: torch.Tensor) -> torch.Tensor:
        return t if path in keep or is_quantized(t) or not t.is_floating_point() else t.to(dtype)

    return record(model, "cast", params=tree_map_with_path(convert, model.params))
