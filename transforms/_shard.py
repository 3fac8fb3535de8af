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

In the decoder, sharding is one ``prepare`` (gather, then cast for
``mixed_precision``) applied to every parameter sub-tree right before use,
and with ``reshard_after_forward`` one layer wrap that recomputes the layer
(gather included) in the backward. A ``checkpoint`` applied before ``shard``
stays inside that recomputation: nested, the layer is still recomputed once.

``compile`` goes after ``shard``; the recomputed layers then save the outputs
of their random ops (see ``transforms._runtime.recomputed``).

Quantized weights (NF4/int8/int4) stay replicated: each rank holds the whole
(already 4x smaller) quantized base; adapters and other leaves are sharded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ..core import LayerFn, Model, as_dtype, flatten, is_dtensor, is_quantized, tree_map, unflatten

from ._base import check_order, record
from ._runtime import recomputed


def gather(tree: Any) -> Any:
    """The tree with every sharded leaf all-gathered (gradients flow back reduce-scattered)."""
    from torch.distributed.tensor import Partial

    def full(t):
        return t.full_tensor(grad_placements=[Partial()]) if is_dtensor(t) else t

    return tree_map(full, tree) if isinstance(tree, Mapping) else full(tree)


def shard(model: Model, mesh: Any = None, *, reshard_after_forward: bool = True,
          mixed_precision: torch.dtype | str | None = None) -> Model:
    """Shard the model's leaves across the data-parallel ``mesh`` (default: all ranks of the process group).

    Tree: plain leaves become ``DTensor(Shard(0))``; quantized leaves stay as
    they are (replicated). Trainable set unchanged; gradients of trainable
    leaves come back as sharded DTensors summed over ranks, so divide the
    loss by the global number of targets (see ``Batch.global_num_targets``).
    ``mixed_precision``: gather floating-point parameters in this dtype (e.g.
    bf16) while the sharded leaves keep theirs. Order: after quantize / lora /
    checkpoint, before compile.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    check_order(model, "shard")
    if "shard" in model.transforms:
        raise ValueError("shard: the model is already sharded")
    if mesh is None:
        if not dist.is_initialized():
            raise RuntimeError("shard: torch.distributed is not initialised; launch with `ft-prog run --nproc N` "
                               "(torchrun) or call init_process_group first")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    cast = as_dtype(mixed_precision)

    def to_shard(t: torch.Tensor) -> torch.Tensor:
        return t if is_quantized(t) else distribute_tensor(t.detach(), mesh, [Shard(0)])

    def prepare(node: Mapping) -> Mapping:
        full = gather(node)
        if cast is not None:
            full = tree_map(lambda t: t.to(cast) if t.is_floating_point() and not is_quantized(t) else t, full)
        return full

    def wrap(layer_fn: LayerFn, index: int) -> LayerFn:
        return recomputed(layer_fn)

    decoder = model.decoder
    wraps = (*decoder.layer_wraps, ("shard", wrap)) if reshard_after_forward else decoder.layer_wraps
    sharded = attrs.evolve(decoder, layer_wraps=wraps, prepares=(*decoder.prepares, ("shard", prepare)))
    return record(model, "shard", params=tree_map(to_shard, model.params), forward=sharded)


def unshard(model: Model) -> Model:
    """The model with every sharded leaf gathered to a plain tensor, eager and unsharded (a collective).

    Undoes ``shard`` (and a ``compile`` after it, whose graph was for the sharded
    model); other transforms stay. A model that is not sharded is returned as it is.
    """
    if "shard" not in model.transforms:
        return model
    flat = flatten(model.params)
    full = {p: t.full_tensor() if is_dtensor(t) else t for p, t in flat.items()}
    return model.replace(params=unflatten(full), forward=model.decoder.without("shard"),
                         transforms=tuple(t for t in model.transforms if t not in ("shard", "compile")))
