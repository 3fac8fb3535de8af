"""How a model runs: activation checkpointing, compilation, parameter dtype."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from ftprog.core import Model, as_dtype, tree_map

from ._base import decoder_of, is_quantized, with_decoder
from ._shard import Sharded


def checkpoint(model: Model, *, every: int = 1) -> Model:
    """Activation checkpointing: recompute every ``every``-th decoder layer in the backward.

    Only layer inputs are kept for those layers, which lowers peak training
    memory for about one extra forward of compute. Dropout masks are
    reproduced in the recomputation (RNG state is preserved). No effect
    without gradients or with a KV cache. Tree and trainable set unchanged.
    """
    if every < 1:
        raise ValueError(f"checkpoint: every must be >= 1, got {every}")
    decoder = decoder_of(model, "checkpoint")
    if decoder.wrap_layer is not None:
        raise ValueError("checkpoint: the model is already checkpointed")

    def wrap(layer_fn: Callable) -> Callable:
        def run(p, x, cos, sin, mask, cfg, adapter, training, cache, index):
            if index % every or cache is not None or not torch.is_grad_enabled():
                return layer_fn(p, x, cos, sin, mask, cfg, adapter, training, cache, index)
            return _torch_checkpoint(layer_fn, p, x, cos, sin, mask, cfg, adapter, training, cache, index,
                                     use_reentrant=False)

        return run

    return with_decoder(model, "checkpoint", wrap_layer=wrap)


@attrs.frozen(eq=False)
class Compiled:
    """A forward compiled with ``torch.compile``; ``inner`` is the eager forward."""

    inner: Callable
    compiled: Callable

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.compiled(*args, **kwargs)

    def output_layer(self, params: Any) -> Any:
        return self.inner.output_layer(params)


def compile(model: Model, **compile_kwargs: Any) -> Model:  # noqa: A001 - the transform's public name
    """``torch.compile`` the whole forward (the outermost call, so it really compiles).

    Gradients come from ``torch.autograd.grad`` over the compiled graph
    (AOTAutograd compiles forward and backward). Apply it last: transforms
    that change the forward refuse a compiled model. Tree and trainable set
    unchanged; results equal the eager model's within float tolerance. A
    sharded model (``shard``) compiles with its gathers in the graph.
    """
    forward = model.forward
    if not isinstance(forward, Sharded):
        forward = decoder_of(model, "compile")
    elif forward.compile_error:
        raise ValueError(f"compile: {forward.compile_error}")
    return model.replace(forward=Compiled(forward, torch.compile(forward, **compile_kwargs)))


def cast(model: Model, dtype: torch.dtype | str) -> Model:
    """Cast every floating-point leaf to ``dtype`` (quantized weights are kept as they are).

    Returns a new model; the input keeps its tensors. Trainable set unchanged.
    """
    dtype = as_dtype(dtype)

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t if is_quantized(t) or not t.is_floating_point() else t.to(dtype)

    return model.replace(params=tree_map(convert, model.params))
