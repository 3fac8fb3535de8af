"""Text generation with a KV cache: greedy or sampled, batched with left padding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ftprog.core import KVCache, Model


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[batch]`` from last-position logits ``[batch, vocab]``.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided
    by the temperature, restricted to the ``top_k`` most likely tokens and to
    the smallest set whose probability reaches ``top_p``, then sampled.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens.

    Prompts are left-padded into one batch; the KV cache holds exactly the
    longest prompt plus ``max_new_tokens``. A sequence ends at its first stop
    token (included in its output). ``on_tokens`` receives each step's new
    token per row (for streaming). Returns the new tokens of each prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of {limit}"
        )
    device = model.device
    batch = len(prompts)
    tokens = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, longest + max_new_tokens, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), device=device)
        mask[row, longest - len(prompt):] = 1
    cache = KVCache.empty(model.config, batch, longest + max_new_tokens, model.dtype, device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = model(tokens, attention_mask=mask[:, : cache.length + tokens.shape[1]], cache=cache)[:, -1]
        next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        next_ids = torch.where(done, pad_id, next_ids)
        step = next_ids.tolist()
        for row in range(batch):
            if not done[row]:
                outputs[row].append(step[row])
        if on_tokens is not None:
            on_tokens([t if not d else None for t, d in zip(step, done.tolist())])
        done |= torch.isin(next_ids, stops)
        if done.all():
            break
        tokens = next_ids[:, None]
    return outputs
