"""Next-token cross-entropy that never materialises full-vocabulary fp32 logits.

Only positions with a target (prompt and padding are ``-100``) go through the
output projection, ``chunk_size`` positions at a time. For a plain (or
quantized, used dequantized) output weight the gradient is computed in the
same pass (the logits of a chunk are freed as soon as its gradient is taken),
so the backward costs no second vocabulary matmul; any other output layer (an
adapted one) goes through :meth:`Model.logits` chunk by chunk, each chunk
recomputed in the backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._linear import dense_weight, linear_kind
from ._model import Model
from ._tree import is_plain

IGNORE = -100


# fp32 elements of a logits chunk whose softmax is taken at once. CPU: a block that stays in cache, where one
# pass over a whole chunk would stream through memory several times; 2 MiB blocks (16 rows of a 32k vocabulary,
# 4 of a 128k one) were fastest on a 1 MiB-L2 EPYC, 1.1x and 1.3x over 32 rows. CUDA: fewer, larger launches.
_SOFTMAX_BLOCK_CPU = 1 << 19
_SOFTMAX_BLOCK_CUDA = 1 << 24


def _softmax_rows(vocab: int, device: torch.device) -> int:
    """Rows of ``[rows, vocab]`` fp32 logits one softmax pass takes (at least 1)."""
    return max(1, (_SOFTMAX_BLOCK_CPU if device.type == "cpu" else _SOFTMAX_BLOCK_CUDA) // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(softcap(h_i W^T), t_i)`` with grads for ``h`` (and ``W``) computed chunk by chunk in the forward.

    ``cap``: logits soft-capping ``cap * tanh(z / cap)`` (Gemma 2), or None.
    """

    @staticmethod
    def forward(hidden, weight, targets, chunk_size, hidden_grad, weight_grad, cap):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_grad = hidden_grad or weight_grad
        grad_hidden = torch.empty_like(hidden) if hidden_grad else None
        grad_weight = None  # one chunk: in the weight's dtype; several: accumulated in fp32
        single = hidden.shape[0] <= chunk_size
        block = _softmax_rows(weight.shape[0], hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logits = h @ weight.T
            # softmax, loss and d(sum CE)/d logits = softmax - one_hot(target), a few rows at a time; the
            # gradient overwrites the logits it came from. One fp32 softmax pass serves loss and gradient:
            # -log p_target = (max - x_target) - log p_max, where p_max >= 1 / vocab never underflows.
            for r in range(0, len(t), block):
                rows, tr = logits[r : r + block], t[r : r + block]
                x = rows.float()
                if cap is not None:
                    capped = torch.tanh(x / cap)
                    x = capped * cap
                probs = torch.softmax(x, dim=-1)
                total += (x.amax(-1) - x.gather(1, tr[:, None]).squeeze(1) - probs.amax(-1).log()).sum()
                if need_grad:
                    probs[torch.arange(len(tr), device=tr.device), tr] -= 1
                    if cap is not None:  # d softcap(z) / dz = 1 - tanh(z / cap)^2
                        probs *= 1 - capped * capped
                    rows.copy_(probs)
            if not need_grad:
                continue
            if hidden_grad:
                grad_hidden[start : start + chunk_size] = logits @ weight
            if weight_grad:
                part = logits.T @ h  # matmul in the weight's dtype (fp32 accumulation inside)
                if single:
                    grad_weight = part
                elif grad_weight is None:
                    grad_weight = part.float()
                else:
                    grad_weight += part
        if weight_grad and grad_weight is None:  # no target positions (e.g. an empty data-parallel slice)
            grad_weight = torch.zeros_like(weight)
        return total, grad_hidden, grad_weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_hidden, grad_weight = output
        ctx.mark_non_differentiable(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = inputs[1].dtype
        # the gradient outputs are never differentiated: no [vocab, hidden] zeros for their incoming grads
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_total, _gh, _gw):
        if grad_total is None:
            return None, None, None, None, None, None, None
        grad_hidden, grad_weight = ctx.saved_tensors
        # a 0-d fp32 factor keeps the gradient's dtype and rounds once
        dh = grad_hidden * grad_total if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            if grad_weight.dtype == ctx.weight_dtype:
                # used by this backward only: scaled in place instead of into a fresh [vocab, hidden] tensor
                # (a second backward through the same graph fails autograd's saved-tensor version check)
                dw = grad_weight.mul_(grad_total)
            else:  # the fp32 sum of several chunks: scaled and rounded to the weight's dtype in one pass
                dw = torch.empty(grad_weight.shape, dtype=ctx.weight_dtype, device=grad_weight.device)
                torch.mul(grad_weight, grad_total, out=dw)
        return dh, dw, None, None, None, None, None


def _chunk_loss(model: Model, head: Any, hidden: torch.Tensor, targets: torch.Tensor, training: bool) -> torch.Tensor:
    logits = model.logits(hidden, training=training, output_layer=head).float()
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
    hidden = model.hidden_states(tokens, attention_mask=attention_mask, position_ids=position_ids,
                                 training=training)
    keep = targets.reshape(-1) != IGNORE
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets.reshape(-1)[keep]
    head = model.output_layer()
    grad = torch.is_grad_enabled()
    if "bias" not in head and linear_kind(head) is None:  # plain, or quantized (frozen) used dequantized
        weight = head["weight"] if is_plain(head["weight"]) else dense_weight(head, hidden.dtype)
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, grad and hidden.requires_grad,
                                         grad and weight.requires_grad, model.config.final_softcap)[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        total = total + checkpoint(_chunk_loss, model, head, hidden[start : start + chunk_size],
                                   targets[start : start + chunk_size], training, use_reentrant=False)
    return total
