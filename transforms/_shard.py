"""Fully sharded data parallelism (FSDP2 semantics) on DTensor leaves.

Design: every plain leaf of the tree becomes a ``DTensor`` sharded on dim 0
across the data-parallel mesh, so parameters, gradients and optimizer state
take about 1/N of the memory per rank. Each decoder layer gathers its own
parameters right before it runs (``full_tensor(grad_placements=[Partial()])``,
whose backward is a reduce-scatter: gradients come back sharded and summed
over ranks). We chose DTensor leaves over ``fully_shard`` on module shells
because the model stays a parameter tree: the optimizer, checkpoints
(torch.distributed.checkpoint) and the loss need no module, and the same
``value_and_grad`` differentiates sharded and unsharded models.

``reshard_after_forward=True`` recomputes each layer's gather (and forward)
in the backward, as activation checkpointing does (so it subsumes the
``checkpoint`` transform), so only one layer's full parameters are alive at a
time; ``False`` keeps the gathered parameters of every layer from the forward
to the backward (faster, more memory).

``compile`` goes after ``shard``. Under torch.compile the recomputed layers
save the outputs of their random ops (attention, dropout) instead of
replaying them: torch 2.13's partitioner misplaces the saved RNG states of
replayed random ops when the graph also saves a DeviceMesh (as every graph
with DTensor inputs does), and the compiled forward then fails with
"expected all tensors_saved_with_vc_check to be Tensors".

Quantized weights (NF4/int8/int4) stay replicated: each rank holds the whole
(already 4x smaller) quantized base; adapters and other leaves are sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from ftprog.core import Decoder, Model, tree_map

from ._base import is_quantized


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather(tree: Any) -> Any:
    """The tree with every sharded leaf all-gathered (gradients flow back reduce-scattered)."""
    from torch.distributed.tensor import Partial

    def full(t):
        return t.full_tensor(grad_placements=[Partial()]) if _is_dtensor(t) else t

    return tree_map(full, tree) if isinstance(tree, Mapping) else full(tree)


def _save_random_ops(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective-checkpoint policy: keep the outputs of random ops (SDPA, dropout), recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_context() -> Any:
    """``context_fn`` of the per-layer checkpoint: plain recomputation eagerly, ``_save_random_ops`` compiled."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts, noop_context_fn

    if torch.compiler.is_compiling():
        return create_selective_checkpoint_contexts(_save_random_ops)
    return noop_context_fn()


@attrs.frozen(eq=False)
class Sharded:
    """A forward over a sharded tree: non-layer leaves gathered up front, layers gathered one at a time.

    ``compile_error``: why ``compile`` must refuse this forward (None: it compiles).
    """

    inner: Decoder
    compile_error: str | None = None

    def __call__(self, params: Mapping, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # the output layer is gathered only when logits are asked for (the loss gathers it itself)
        skip = ("model", "lm_head") if kwargs.get("return_hidden") else ("model",)
        top = {k: v if k in skip else gather(v) for k, v in params.items() if k != "model"}
        model = {k: (v if k == "layers" else gather(v)) for k, v in params["model"].items()}
        return self.inner({**top, "model": model}, tokens, **kwargs)

    def output_layer(self, params: Mapping) -> Mapping:
        return gather(self.inner.output_layer(params))


def shard(model: Model, mesh: Any = None, *, reshard_after_forward: bool = True,
          mixed_precision: torch.dtype | str | None = None) -> Model:
    """Shard the model's leaves across the data-parallel ``mesh`` (default: all ranks of the process group).

    Tree: plain leaves become ``DTensor(Shard(0))``; quantized leaves stay as
    they are (replicated). Trainable set unchanged; gradients of trainable
    leaves come back as sharded DTensors summed over ranks, so divide the
    loss by the global number of targets (see ``Batch.global_num_targets``).
    ``mixed_precision``: gather parameters in this dtype (e.g. bf16) while the
    sharded leaves keep theirs. Order: after quantize / lora / checkpoint,
    before compile.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    if not isinstance(model.forward, Decoder):
        raise ValueError(f"shard: the model's forward is {type(model.forward).__name__}; apply shard after "
                         "quantize/lora/checkpoint and before compile, once")
    if mesh is None:
        if not dist.is_initialized():
            raise RuntimeError("shard: torch.distributed is not initialised; launch with `ft-prog run --nproc N` "
                               "(torchrun) or call init_process_group first")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    from ftprog.core import as_dtype

    cast = as_dtype(mixed_precision)

    def to_shard(t: torch.Tensor) -> torch.Tensor:
        return t if is_quantized(t) else distribute_tensor(t.detach(), mesh, [Shard(0)])

    decoder = model.forward
    inner_wrap = decoder.wrap_layer

    def wrap(layer_fn: Callable) -> Callable:
        def gathered(p, x, *rest):
            full = gather(p)
            if cast is not None:
                full = tree_map(lambda t: t.to(cast) if t.is_floating_point() and not is_quantized(t) else t, full)
            return layer_fn(full, x, *rest)

        if not reshard_after_forward:  # a checkpointed model recomputes its layers' gathers in the backward
            return gathered if inner_wrap is None else inner_wrap(gathered)

        def resharded(p, x, cos, sin, mask, cfg, adapter, training, cache, index):
            if not torch.is_grad_enabled() or cache is not None:
                return gathered(p, x, cos, sin, mask, cfg, adapter, training, cache, index)
            return _torch_checkpoint(gathered, p, x, cos, sin, mask, cfg, adapter, training, cache, index,
                                     use_reentrant=False, context_fn=_recompute_context)

        return resharded

    sharded = attrs.evolve(decoder, wrap_layer=wrap)
    error = None
    if inner_wrap is not None and not reshard_after_forward:
        error = ("a model checkpointed before shard(reshard_after_forward=False) does not compile in torch 2.13 "
                 "(its recomputed random ops save RNG states that the partitioner misplaces next to the saved "
                 "DeviceMesh); use reshard_after_forward=True, which recomputes every layer itself")
    return model.replace(params=tree_map(to_shard, model.params), forward=Sharded(sharded, error))
