"""Gradients with respect to a model's trainable leaves only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._model import Model


def value_and_grad(loss_fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
    """Turn ``loss_fn(model, *args) -> loss`` into ``f(model, *args) -> (loss, grads)``.

    ``grads`` is ``{path: tensor}`` for the model's trainable leaves (same
    order as ``model.trainable_params()``); frozen and quantized leaves get no
    gradient and no autograd graph is kept for them. With ``has_aux`` the loss
    function returns ``(loss, aux)`` and ``f`` returns ``((loss, aux), grads)``.

    Built on ``torch.autograd.grad`` without ``create_graph``: it composes with
    activation checkpointing, NF4 weights and compile, and costs no more memory
    than ``loss.backward()``. The returned loss is detached.
    """

    def wrapped(model: Model, *args: Any, **kwargs: Any):
        leaves = model.trainable_params()
        if not leaves:
            raise ValueError("the model has no trainable leaves: use ftprog.transforms.trainable or lora first")
        live = {path: t.detach().requires_grad_(True) for path, t in leaves.items()}
        with torch.enable_grad():
            out = loss_fn(model.with_params(live), *args, **kwargs)
            loss, aux = out if has_aux else (out, None)
            if loss.dim() != 0:
                raise ValueError(f"the loss function must return a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        grads = {p: torch.zeros_like(t) if g is None else g for (p, t), g in zip(live.items(), grads)}
        value = loss.detach()
        return ((value, aux) if has_aux else value), grads

    return wrapped
