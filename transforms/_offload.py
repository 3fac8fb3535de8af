"""Activation offloading: what a layer keeps for the backward waits in host memory instead of on the device.

Every tensor autograd saves inside a layer (``saved_tensors_hooks``) of at least ``min_bytes`` is copied to
pinned host memory on a side CUDA stream (overlapping the forward's compute) and copied back when the
backward unpacks it; the layer's own parameters stay where they are. Under activation checkpointing the hooks
sit outside the checkpoint, so they see only what it keeps, each layer's input (:func:`ftprog.core.recompute`
saves its tensor arguments as autograd saved tensors and runs the layer without a graph), and the recomputed forward's
tensors live on the device as checkpointing has them. On a CPU model the copies go from host memory to host
memory: that is how the tests check the round trip; training programs do not apply it there
(``activation_offloading`` is a no-op with a note on the CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from ..core import LayerContext, LayerFn, Model, flatten

from ._base import check_order, with_decoder

NAME = "offload_activations"
HOST = torch.device("cpu")


def offload_activations(model: Model, *, min_bytes: int = 2**20) -> Model:
    """Keep each layer's saved activations in (pinned) host memory between its forward and its backward.

    Args:
        model: the model to train; apply after ``checkpoint`` (then only each layer's input moves: what
            checkpointing keeps) and before ``compile``.
        min_bytes: smaller saved tensors stay on the device (their copies would cost more than they free).

    Gradients equal the model's without it; tree and trainable set unchanged. Only training forwards
    (gradients enabled) move anything.
    """
    check_order(model, NAME)
    if NAME in model.transforms:
        raise ValueError(f"{NAME}: the model's activations are already offloaded")
    wraps = (*model.decoder.layer_wraps, (NAME, functools.partial(_saved_on_host, min_bytes=min_bytes)))
    return with_decoder(model, NAME, layer_wraps=wraps)


def _saved_on_host(layer_fn: LayerFn, index: int, *, min_bytes: int) -> LayerFn:
    def run(p: Mapping, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return layer_fn(p, x, ctx)
        params = {t.untyped_storage().data_ptr() for t in flatten(p).values() if type(t) is torch.Tensor}
        pack = functools.partial(to_host, keep=params, min_bytes=min_bytes)
        with torch.autograd.graph.saved_tensors_hooks(pack, back_from_host):
            return layer_fn(p, x, ctx)

    return run


def to_host(t: torch.Tensor, *, keep: set[int] = frozenset(), min_bytes: int = 0) -> Any:
    """A ``saved_tensors_hooks`` pack hook: ``t`` copied to host memory, unless it is small or in ``keep``
    (storage pointers of parameters). From CUDA: into pinned memory on a side stream, which waits for the
    work that made ``t``; ``t``'s memory is not reused before the copy is done."""
    if type(t) is not torch.Tensor or t.numel() * t.element_size() < min_bytes or \
            t.untyped_storage().data_ptr() in keep:
        return t
    if not t.is_cuda:
        return _Offloaded(t.detach().clone(), t.device, None)
    stream = _side_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        host = torch.empty_like(t, device=HOST, pin_memory=True)
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    t.record_stream(stream)
    return _Offloaded(host, t.device, done)


def back_from_host(packed: Any) -> torch.Tensor:
    """The unpack hook of :func:`to_host`: the tensor on its device again (after its copy to the host finished)."""
    if not isinstance(packed, _Offloaded):
        return packed
    if packed.done is None:
        return packed.host.to(packed.device)
    torch.cuda.current_stream(packed.device).wait_event(packed.done)
    return packed.host.to(packed.device, non_blocking=True)


class _Offloaded:
    __slots__ = ("host", "device", "done")

    def __init__(self, host: torch.Tensor, device: torch.device, done: Any) -> None:
        self.host, self.device, self.done = host, device, done


@functools.cache
def _side_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device)
