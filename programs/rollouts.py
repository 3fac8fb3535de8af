"""Rollouts: the policy samples completions of prompts, and the samples become training rows.

Shared by the programs that train on a model's own samples (``grpo``; ``distill`` with ``distill.mode =
"on_policy"``). The sampling seed is drawn from the process's torch RNG, which every checkpoint saves: a resumed
run draws the same completions.
"""

from __future__ import annotations

import torch

from ..core import Model
from .generate import generate


@torch.no_grad()
def sample_completions(model: Model, prompts: list[list[int]], *, temperature: float, top_k: int | None = None,
                       top_p: float | None = None, **sample) -> tuple[list[list[int]], list[list[float]]]:
    """``(completions, logprobs)``: one sampled completion of each prompt (token ids, a stop token included) and
    each sampled token's fp32 log-probability under ``log_softmax(logits / temperature)``. ``sample``: the rest of
    :func:`~ftprog.programs.generate.generate`'s keywords (``max_new_tokens``, ``stop_ids``, ``pad_id``, ...)."""
    seed = int(torch.randint(0, 2**62, (1,)))  # from the checkpointed torch RNG: a resumed run samples the same
    return generate(model, prompts, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    return_logprobs=True, **sample)


def rollout_rows(prompts: list[list[int]], completions: list[list[int]], logps: list[list[float]],
                 scored: list[bool], pad_id: int) -> tuple[torch.Tensor, ...]:
    """``(tokens, targets, attention_mask, rollout_logps)`` ``[rows, S]``: each prompt followed by its completion
    (right-padded); a completion token is the target of the position before it; rows not ``scored`` get none."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    rows = len(prompts)
    tokens = torch.full((rows, width), pad_id, dtype=torch.int64)
    targets = torch.full((rows, width), -100, dtype=torch.int64)
    mask = torch.zeros((rows, width), dtype=torch.int64)
    old = torch.zeros((rows, width), dtype=torch.float32)
    for r, (p, c, lp) in enumerate(zip(prompts, completions, logps)):
        n, m = len(p), len(c)
        tokens[r, : n + m] = torch.tensor(p + c)
        mask[r, : n + m] = 1
        if scored[r] and m:
            targets[r, n - 1 : n + m - 1] = torch.tensor(c)
            old[r, n - 1 : n + m - 1] = torch.tensor(lp)
    return tokens, targets, mask, old
