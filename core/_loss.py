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

from ._linear import dense_weight, linear_kind, matmul_dtype
from ._model import Model
from ._recompute import recompute
from ._tree import is_plain

IGNORE = -100


# fp32 elements of a logits chunk whose softmax is taken at once. CPU: a block that stays in cache, where one
# pass over a whole chunk would stream through memory several times; 2 MiB blocks (16 rows of a 32k vocabulary,
# 4 of a 128k one) were fastest on a 1 MiB-L2 EPYC, 1.1x and 1.3x over 32 rows. CUDA: fewer, larger launches.
_SOFTMAX_BLOCK_CPU = 1 << 19
_SOFTMAX_BLOCK_CUDA = 1 << 24


# Rows a chunk of target positions is padded to (zero rows) before the output projection. The number of target
# positions changes from batch to batch; the chunk's matmuls and buffers in a few repeating shapes reuse what the
# allocator and the matmul library keep, where a new shape each batch grew a process's memory without bound
# (measured: bf16 [n, 512] x [512, 32000] matmuls with 120 distinct n grew RSS 0.6 -> 4.2 GiB; in 128-row
# buckets it stayed flat). The padding costs at most 127 rows of the chunk's matmuls.
_ROWS_QUANTUM = 128

# Vocabulary rows of the output weight upcast at a time on a CPU without bf16 matmuls (matmul_dtype): fp32
# copies of slices, never of the whole [vocab, hidden] weight (125 MiB at vocab 32k x hidden 1024), and the
# weight gradient's fp32 product one slice at a time too.
_UPCAST_ROWS = 4096

# Logits elements a chunk holds when the output weight is frozen (LoRA, a DPO reference, a teacher): with no weight
# gradient summed over a chunk's rows, smaller chunks only cost more, smaller matmul calls (and, on a CPU upcasting
# the weight, one more upcast of its slices per chunk). 2**24 elements: 512 rows of a 32k vocabulary (one loss call
# at 1,020 rows x hidden 512, upcast, 2 threads: 0.55 s against 0.51 s at 1,024 rows; 128 rows took 0.74 s), 128
# rows of a 128k one (63 MiB of fp32 logits instead of 501 MiB at chunk_size 1024).
_FROZEN_CHUNK_ELEMENTS = 1 << 24


def _vocab_slices(weight: torch.Tensor, compute: torch.dtype):
    """``(first row, rows of the weight in the compute dtype)`` over the vocabulary: the weight itself when it is
    already in that dtype, else copies of ``_UPCAST_ROWS`` rows made one at a time, as they are used."""
    if weight.dtype == compute:
        yield 0, weight
        return
    for start in range(0, weight.shape[0], _UPCAST_ROWS):
        yield start, weight[start : start + _UPCAST_ROWS].to(compute)


def _project(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``h @ weight.T``, ``[rows, vocab]`` in ``h``'s dtype (a weight in another dtype upcast a slice at a
    time)."""
    if weight.dtype == h.dtype or weight.shape[0] <= _UPCAST_ROWS:
        return h @ weight.to(h.dtype).T
    out = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    for start, w in _vocab_slices(weight, h.dtype):
        out[:, start : start + len(w)] = h @ w.T
    return out


def _back_project(g: torch.Tensor, weight: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``g @ weight``, ``[rows, hidden]`` in the compute dtype, for ``g [rows, vocab]`` (the logits' gradient)."""
    out = None
    for first, w in _vocab_slices(weight, compute):
        part = g[:, first : first + len(w)]
        out = part @ w if out is None else out.addmm_(part, w)
    return out


def _padded_rows(rows: int, chunk_size: int) -> int:
    """Rows a chunk of ``rows`` target positions is computed at: rounded up to :data:`_ROWS_QUANTUM`, at most
    ``chunk_size`` (never fewer than ``rows``)."""
    return max(rows, min(chunk_size, -(-rows // _ROWS_QUANTUM) * _ROWS_QUANTUM))


def _frozen_chunk_rows(chunk_size: int, vocab: int) -> int:
    """Positions per chunk for a frozen output weight: ``chunk_size``, capped at :data:`_FROZEN_CHUNK_ELEMENTS`
    logits (whole :data:`_ROWS_QUANTUM` buckets, at least one)."""
    rows = max(_ROWS_QUANTUM, _FROZEN_CHUNK_ELEMENTS // vocab // _ROWS_QUANTUM * _ROWS_QUANTUM)
    return min(chunk_size, rows)


def _pad_rows(h: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``h [rows, hidden]`` with zero rows appended up to :func:`_padded_rows` (``h`` itself when none)."""
    padded = _padded_rows(len(h), chunk_size)
    if padded == len(h):
        return h
    out = h.new_zeros((padded, h.shape[1]))
    out[: len(h)] = h
    return out


def _softmax_rows(vocab: int, device: torch.device) -> int:
    """Rows of ``[rows, vocab]`` fp32 logits one softmax pass takes (at least 1)."""
    return max(1, (_SOFTMAX_BLOCK_CPU if device.type == "cpu" else _SOFTMAX_BLOCK_CUDA) // vocab)


def _block_nll(rows: torch.Tensor, targets: torch.Tensor, cap: float | None, grad: bool,
               temperature: float = 1.0) -> torch.Tensor:
    """``[r]`` fp32 ``-log softmax(softcap(rows) / temperature)[target]`` of a block of logits ``rows [r, vocab]``;
    with ``grad``, ``rows`` is overwritten by the gradient of that NLL (``softmax - one_hot``, through the
    temperature and the softcap).

    One fp32 softmax pass serves loss and gradient: ``-log p_target = (max - x_target) - log p_max``, where
    ``p_max >= 1 / vocab`` never underflows.
    """
    x = rows.float()
    if cap is not None:
        capped = torch.tanh(x / cap)
        x = capped * cap
    if temperature != 1.0:
        x = x / temperature
    probs = torch.softmax(x, dim=-1)
    nll = x.amax(-1) - x.gather(1, targets[:, None]).squeeze(1) - probs.amax(-1).log()
    if grad:
        probs[torch.arange(len(targets), device=targets.device), targets] -= 1
        if temperature != 1.0:
            probs /= temperature
        if cap is not None:  # d softcap(z) / dz = 1 - tanh(z / cap)^2
            probs *= 1 - capped * capped
        rows.copy_(probs)
    return nll


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(softcap(h_i W^T), t_i)`` with grads for ``h`` (and ``W``) computed chunk by chunk in the forward.

    ``cap``: logits soft-capping ``cap * tanh(z / cap)`` (Gemma 2), or None.
    """

    @staticmethod
    def forward(hidden, weight, targets, chunk_size, hidden_grad, weight_grad, cap):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_grad = hidden_grad or weight_grad
        if not weight_grad:
            chunk_size = _frozen_chunk_rows(chunk_size, weight.shape[0])
        grad_hidden = torch.empty_like(hidden) if hidden_grad else None
        grad_weight = None  # one chunk: in the weight's dtype; several: accumulated in fp32
        single = hidden.shape[0] <= chunk_size
        block = _softmax_rows(weight.shape[0], hidden.device)
        weight_dtype, compute = weight.dtype, matmul_dtype(weight.dtype, weight.device)
        sliced = compute != weight_dtype  # a CPU without bf16 matmuls: fp32 copies of vocabulary slices
        for start in range(0, hidden.shape[0], chunk_size):
            t = targets[start : start + chunk_size]
            h = _pad_rows(hidden[start : start + chunk_size], chunk_size)  # zero rows: zero logits, no gradient
            h = h.to(compute)
            logits = _project(h, weight)
            # softmax, loss and d(sum CE)/d logits, a few rows at a time; the gradient overwrites the logits
            for r in range(0, len(t), block):
                total += _block_nll(logits[r : min(r + block, len(t))], t[r : r + block], cap, need_grad).sum()
            if not need_grad:
                continue
            dh = None
            for first, w in _vocab_slices(weight, compute):
                g = logits[:, first : first + len(w)]
                if hidden_grad:
                    dh = g @ w if dh is None else dh.addmm_(g, w)
                if not weight_grad:
                    continue
                if single and not sliced:
                    grad_weight = g.T @ h  # in the compute dtype (bf16: fp32 accumulation inside)
                    continue
                if grad_weight is None:
                    grad_weight = torch.zeros(weight.shape, dtype=weight_dtype if single else torch.float32,
                                              device=weight.device)
                if single:  # rounded once to the weight's dtype
                    grad_weight[first : first + len(w)] = g.T @ h
                else:
                    grad_weight[first : first + len(w)] += g.T @ h
            if hidden_grad:
                grad_hidden[start : start + len(t)] = dh[: len(t)]
        if weight_grad and grad_weight is None:  # no target positions (e.g. an empty data-parallel slice)
            grad_weight = torch.zeros_like(weight, dtype=weight_dtype)
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


class _LinearTokenNLL(torch.autograd.Function):
    """``[n]`` fp32 ``CE(softcap(h_i W^T), t_i)`` per row, for a frozen ``W``; ``d/dh`` is computed chunk by chunk in
    the forward (unscaled) and scaled by each row's incoming gradient in the backward."""

    @staticmethod
    def forward(hidden, weight, targets, chunk_size, hidden_grad, cap, temperature):
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden_grad else None
        chunk_size = _frozen_chunk_rows(chunk_size, weight.shape[0])
        block = _softmax_rows(weight.shape[0], hidden.device)
        compute = matmul_dtype(weight.dtype, weight.device)
        for start in range(0, hidden.shape[0], chunk_size):
            t = targets[start : start + chunk_size]
            logits = _project(_pad_rows(hidden[start : start + chunk_size], chunk_size).to(compute), weight)
            for r in range(0, len(t), block):
                tr = t[r : r + block]
                nll[start + r : start + r + len(tr)] = _block_nll(logits[r : r + len(tr)], tr, cap, hidden_grad,
                                                                  temperature)
            if hidden_grad:
                grad_hidden[start : start + len(t)] = _back_project(logits, weight, compute)[: len(t)]
        return nll, grad_hidden

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_hidden = output
        if grad_hidden is not None:
            ctx.mark_non_differentiable(grad_hidden)
        ctx.save_for_backward(grad_hidden)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_nll, _gh):
        (grad_hidden,) = ctx.saved_tensors
        if grad_nll is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        return grad_hidden * grad_nll[:, None].to(grad_hidden.dtype), None, None, None, None, None, None


def _chunk_logprobs(model: Model, head: Any, hidden: torch.Tensor, targets: torch.Tensor, training: bool,
                    temperature: float) -> torch.Tensor:
    logits = model.logits(hidden, training=training, output_layer=head).float() / temperature
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def _chunk_loss(model: Model, head: Any, hidden: torch.Tensor, targets: torch.Tensor, training: bool) -> torch.Tensor:
    logits = model.logits(hidden, training=training, output_layer=head).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _target_rows(model: Model, tokens, targets, attention_mask, position_ids, training):
    """``(hidden [n, hidden], target ids [n], keep [batch * seq] bool)`` of the positions with a target."""
    hidden = model.hidden_states(tokens, attention_mask=attention_mask, position_ids=position_ids,
                                 training=training)
    keep = targets.reshape(-1) != IGNORE
    return hidden.reshape(-1, hidden.shape[-1])[keep], targets.reshape(-1)[keep], keep


def _fusable_weight(head: Any, dtype: torch.dtype) -> torch.Tensor | None:
    """The output layer's weight when the fused losses can use it: plain, or quantized (frozen) used
    dequantized; None for an adapted layer or one with a bias (those go through ``Model.logits``)."""
    if "bias" in head or linear_kind(head) is not None:
        return None
    return head["weight"] if is_plain(head["weight"]) else dense_weight(head, dtype)


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
        chunk_size: positions per output-projection chunk (bounds the fp32 logits held); a frozen output
            weight takes fewer at a time (at most 2**24 logits: 512 rows of a 32k vocabulary).

    Divide by the number of targets (over all micro-batches of a step) for the mean.
    """
    hidden, targets, _ = _target_rows(model, tokens, targets, attention_mask, position_ids, training)
    head = model.output_layer()
    grad = torch.is_grad_enabled()
    weight = _fusable_weight(head, hidden.dtype)
    if weight is not None:
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, grad and hidden.requires_grad,
                                         grad and weight.requires_grad, model.config.final_softcap)[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        total = total + recompute(_chunk_loss, model, head, hidden[start : start + chunk_size],
                                  targets[start : start + chunk_size], training)
    return total


def token_logprobs(
    model: Model,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    training: bool = True,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[batch, seq]`` fp32 ``log p(targets)`` at positions whose target is not ``-100`` (0 elsewhere), ``p`` the
    softmax of the logits divided by ``temperature`` (the distribution sampling at that temperature draws from,
    before top-k / top-p).

    Same arguments as :func:`token_loss_sum`, and the same memory bound: only target positions go through the
    output layer, ``chunk_size`` at a time, so full-vocabulary fp32 logits never exist for the whole batch. Sum
    a row for a sequence's log-probability (preference losses). With a frozen output layer (LoRA, or no grad)
    the gradient for the hidden states is taken in the same pass; a trainable one recomputes each chunk in the
    backward.
    """
    hidden, ids, keep = _target_rows(model, tokens, targets, attention_mask, position_ids, training)
    head = model.output_layer()
    weight = _fusable_weight(head, hidden.dtype)
    if weight is not None and not (torch.is_grad_enabled() and weight.requires_grad):
        nll = _LinearTokenNLL.apply(hidden, weight, ids, chunk_size, torch.is_grad_enabled() and hidden.requires_grad,
                                    model.config.final_softcap, temperature)[0]
        picked = -nll
    else:
        parts = [recompute(_chunk_logprobs, model, head, hidden[start : start + chunk_size],
                           ids[start : start + chunk_size], training, temperature)
                 for start in range(0, hidden.shape[0], chunk_size)]
        picked = torch.cat(parts) if parts else hidden.sum(-1).float()  # no targets: empty, still in the graph
    out = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device).masked_scatter(keep, picked)
    return out.view(targets.shape)
