"""Recomputation in the backward (activation checkpointing) in eager mode, without the compiler's import.

``torch.utils.checkpoint`` imports ``torch._dynamo`` on its first call (both of its variants run the
recomputation with the compiler disabled), which adds ~73 MiB of resident set and ~1.3 s to a CPU process
that never compiles (torch 2.13). :func:`recompute` keeps the same contract for a function of explicit
tensor arguments: the forward runs without a graph, only the tensor arguments are kept (as autograd saved
tensors, so ``saved_tensors_hooks`` such as activation offloading see exactly them), and the backward runs
the function again with the forward's random-number and autocast states before taking its gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten


def recompute(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` whose intermediate tensors are not kept for the backward but computed again there.

    Args:
        fn: a function of ``args`` alone: every tensor it needs a gradient for must be in ``args`` (nested in
            tuples, lists or dicts); what it reads otherwise (closures, other objects) gets no gradient.
        args: its arguments; the tensors among them are kept for the backward.

    Returns ``fn(*args)``: a tensor, or tuples, lists and dicts of tensors. Its gradients equal those of
    ``fn(*args)`` run plainly: the rerun has the forward's random states (the CPU's and the inputs' CUDA
    device's: dropout masks are the same) and autocast state. First-order gradients only. Without gradients
    enabled it simply runs ``fn``; under ``torch.compile`` it is ``torch.utils.checkpoint``, which the compiler
    traces (and has imported already).
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    if torch.compiler.is_compiling():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    leaves, args_spec = tree_flatten(args)
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaves[i] for i in slots]
    # what the backward's call closes over holds no tensor: the graph keeps it until the whole backward ends,
    # while the saved tensors are freed as soon as this function's backward is done
    template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def call(tensors: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], Any]:
        filled = list(template)
        for i, t in zip(slots, tensors):
            filled[i] = t
        out = fn(*tree_unflatten(filled, args_spec))
        return tree_flatten(out)

    result: dict[str, Any] = {}
    outputs = _Recompute.apply(call, result, *tensors)
    return tree_unflatten(list(outputs), result["spec"])


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: Callable, result: dict, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.call = call
        ctx.cuda_device = next((t.device for t in tensors if t.is_cuda), None)
        ctx.rng_states = _rng_states(ctx.cuda_device)
        ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                        for kind in ("cpu", "cuda") if kind == "cpu" or ctx.cuda_device is not None]
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        outputs, result["spec"] = call(tensors)
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise TypeError("recompute: the function must return tensors (in tuples, lists or dicts)")
        ctx.mark_non_differentiable(*(o for o in outputs if not (o.is_floating_point() or o.is_complex())))
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        inputs = tuple(t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:]))
        devices = [ctx.cuda_device] if ctx.cuda_device is not None else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(torch.enable_grad())
            for kind, enabled, dtype in ctx.autocast:  # the forward's autocast, as it was
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            _set_rng_states(ctx.rng_states, ctx.cuda_device)
            outputs, _ = ctx.call(inputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, None, *(next(found) if t.requires_grad else None for t in inputs))


def _rng_states(cuda_device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(cuda_device) if cuda_device is not None else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[torch.Tensor, torch.Tensor | None], cuda_device: torch.device | None) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, cuda_device)
