"""A realistic SFT workload: variable-length instruction samples with the prompt masked out.

Lengths are log-normal (like instruction datasets: most samples short, a long tail), cut to
``[min_len, seq_len]``; each sample's prompt takes a share of its tokens drawn around 40%. Token ids are
random (speed does not depend on them). Everything is a function of the seed, so every system in a run
sees exactly the same samples.
"""

from __future__ import annotations

import math
import random
from typing import Any


def samples(spec: dict[str, Any]) -> list[tuple[list[int], list[bool]]]:
    """``[(ids, train_mask)]`` for ``spec`` (keys: n, seed, seq_len, median, sigma, min_len, prompt_frac, vocab)."""
    rng = random.Random(spec.get("seed", 0))
    out = []
    mu = math.log(spec["median"])
    for _ in range(spec["n"]):
        n = int(round(rng.lognormvariate(mu, spec.get("sigma", 0.6))))
        n = max(spec.get("min_len", 8), min(spec["seq_len"], n))
        frac = min(0.8, max(0.1, rng.gauss(spec.get("prompt_frac", 0.4), 0.12)))
        prompt = max(1, min(n - 2, int(round(n * frac))))
        ids = [rng.randrange(3, spec["vocab"]) for _ in range(n)]
        out.append((ids, [False] * prompt + [True] * (n - prompt)))
    return out


def order(n: int, seed: int = 0) -> list[int]:
    """The shuffled sample order ft-prog's DataLoader uses for epoch 0 (``randperm`` seeded with ``seed``)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def summary(data: list[tuple[list[int], list[bool]]]) -> dict[str, float]:
    lengths = sorted(len(ids) for ids, _ in data)
    tokens = sum(lengths)
    trained = sum(sum(m[1:]) for _, m in data)
    return {"samples": len(data), "tokens": tokens, "trained_tokens": trained,
            "mean_len": tokens / max(len(data), 1), "median_len": lengths[len(lengths) // 2] if lengths else 0,
            "max_len": lengths[-1] if lengths else 0, "prompt_share": 1 - trained / max(tokens, 1)}


def preference_pairs(spec: dict[str, Any]) -> list[tuple[list[int], list[int], list[int]]]:
    """``[(prompt, chosen, rejected)]`` token lists for ``spec`` (keys: n, seed, max_len, prompt_median,
    response_median, sigma, min_len, vocab).

    Prompt and response lengths are log-normal; the two responses of a pair differ in length and content.
    ``len(prompt) + len(longer response) <= max_len``, so no system truncates anything.
    """
    rng = random.Random(spec.get("seed", 0))
    sigma, low, max_len = spec.get("sigma", 0.6), spec.get("min_len", 4), spec["max_len"]

    def length(median: float, high: int) -> int:
        return max(low, min(high, int(round(rng.lognormvariate(math.log(median), sigma)))))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, spec["vocab"]) for _ in range(n)]

    out = []
    for _ in range(spec["n"]):
        chosen, rejected = (length(spec["response_median"], max_len // 2) for _ in range(2))
        prompt = length(spec["prompt_median"], max_len - max(chosen, rejected))
        out.append((tokens(prompt), tokens(chosen), tokens(rejected)))
    return out


def prompts(spec: dict[str, Any]) -> list[list[int]]:
    """``n`` prompts (token lists) of log-normal lengths in ``[min_len, max_len]`` (keys: n, seed, median, sigma,
    min_len, max_len, vocab): the rollout and GRPO cases' prompts, left-padded to different widths."""
    rng = random.Random(spec.get("seed", 0))
    mu, sigma = math.log(spec["median"]), spec.get("sigma", 0.6)
    out = []
    for _ in range(spec["n"]):
        n = max(spec.get("min_len", 4), min(spec["max_len"], int(round(rng.lognormvariate(mu, sigma)))))
        out.append([rng.randrange(3, spec["vocab"]) for _ in range(n)])
    return out
