"""Next-token cross-entropy that never materialises full-vocabulary fp32 logits.

Only positions with a target (prompt and padding are ``-100``) go through the
output projection, ``chunk_size`` positions at a time. For a plain output
weight the gradient is computed in the same pass (the logits of a chunk are
freed as soon as its gradient is taken), so the backward costs no second
vocabulary matmul; an adapted or quantized output layer falls back to
recomputing each chunk in the backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._linear import dense_weight, linear
from ._model import Model

IGNORE = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i W^T, t_i)`` with grads for ``h`` (and ``W``) computed chunk by chunk in the forward."""

    @staticmethod
    def forward(hidden, weight, targets, chunk_size, hidden_grad, weight_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden_grad or weight_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logp = torch.log_softmax((h @ weight.T).float(), dim=-1)
            total -= logp.gather(1, t[:, None]).sum()
            if grad_hidden is None:
                continue
            # d(sum CE)/d logits = softmax - one_hot(target), computed in place over the log-probabilities
            probs = logp.exp_()
            probs[torch.arange(len(t), device=t.device), t] -= 1
            probs = probs.to(weight.dtype)
            if hidden_grad:
                grad_hidden[start : start + chunk_size] = probs @ weight
            if grad_weight is not None:
                grad_weight += (probs.T @ h).float()  # matmul in the weight's dtype, accumulated in fp32
        return total, grad_hidden, grad_weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_hidden, grad_weight = output
        ctx.mark_non_differentiable(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = inputs[1].dtype

    @staticmethod
    def backward(ctx, grad_total, _gh, _gw):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_total.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_weight * grad_total).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None


def _head_loss_chunk(head: Any, hidden: torch.Tensor, targets: torch.Tensor, adapter, training: bool) -> torch.Tensor:
    logits = linear(hidden, head, adapter, training).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def token_loss_sum(
    model: Model,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    training: bool = True,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) over positions whose target is not ``-100``.

    Args:
        tokens: ``[batch, seq]`` input ids.
        targets: ``[batch, seq]`` the id each position should predict, ``-100`` to skip.
        chunk_size: positions per output-projection chunk (bounds the fp32 logits held).

    Divide by the number of targets (over all micro-batches of a step) for the mean.
    """
    hidden = model.forward(model.params, tokens, attention_mask=attention_mask, position_ids=position_ids,
                           training=training, return_hidden=True)
    keep = targets.reshape(-1) != IGNORE
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets.reshape(-1)[keep]
    head = model.forward.output_layer(model.params)
    grad = torch.is_grad_enabled()
    if "lora_A" not in head:  # a plain weight, or a quantized (frozen) one used dequantized chunk-free
        weight = head["weight"]
        if type(weight) not in (torch.Tensor, torch.nn.Parameter):
            weight = dense_weight(head, hidden.dtype)
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, grad and hidden.requires_grad,
                                         grad and weight.requires_grad)[0]
    adapter = model.decoder.adapter
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        total = total + checkpoint(_head_loss_chunk, head, hidden[start : start + chunk_size],
                                   targets[start : start + chunk_size], adapter, training, use_reentrant=False)
    return total
