"""What rounding bf16 params and AdamW moments costs in training quality: held-out loss after N steps.

    python -m benchmarks.rounding [--steps 2000] [--lrs 1e-4,1e-3] [--variants all] [--out results.json]

A tiny Llama (``tiny`` preset: hidden 64, 2 layers, vocab 512) trained from its random initialisation on
synthetic bigram text (every token has 4 likely successors, probabilities 0.5 / 0.25 / 0.15 / 0.1; batch 8 x 64),
AdamW with a cosine schedule (5% warmup) and clipping at 1.0, the same batches for every variant. Variants
(``params/moments/rounding``):

- ``bf16/fp32/nearest``: fp32 moments, the bf16 params rounded to nearest after each update;
- ``bf16/bf16/nearest``: what ``torch.optim.AdamW`` does with bf16 params (transformers, torchtune);
- ``bf16/bf16/stochastic``: ft-prog's default for bf16 full fine-tuning (``optimizer.stochastic_rounding``);
- ``bf16/fp32/stochastic``;
- ``fp32/fp32/-``: fp32 params, the reference a bf16 run would match if no update were lost.

Prints the held-out loss (8 fixed batches) at every fifth of the run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

VARIANTS = ("bf16/fp32/nearest", "bf16/bf16/nearest", "bf16/bf16/stochastic", "bf16/fp32/stochastic", "fp32/fp32/-")
VOCAB, BATCH, SEQ = 512, 8, 64


def _bigram_batches(seed: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """A batch sampler of the fixed synthetic language: ``sample(generator) -> (tokens, targets)``."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])

    def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=gen)
        for t in range(SEQ):
            x[:, t + 1] = successors[x[:, t], torch.multinomial(probs, BATCH, replacement=True, generator=gen)]
        return x[:, :-1], x[:, 1:]

    return sample


def train(variant: str, lr: float, steps: int, points: int = 5) -> list[float]:
    """Held-out loss of ``variant`` at ``points`` evenly spaced steps of a ``steps``-step run."""
    from ftprog.core import from_config, optim, token_loss_sum, value_and_grad

    params_dtype, moments, rounding = variant.split("/")
    model = from_config("tiny", seed=0, dtype=torch.bfloat16 if params_dtype == "bf16" else torch.float32)
    assert model.config.vocab_size == VOCAB
    opt = optim.adamw(optim.cosine(lr, steps, steps // 20),
                      state_dtype=torch.bfloat16 if moments == "bf16" else torch.float32,
                      stochastic_rounding=rounding == "stochastic")
    params = model.trainable_params()
    state = opt.init(params)
    sample = _bigram_batches(0)
    train_gen = torch.Generator().manual_seed(1)
    held_out = [sample(torch.Generator().manual_seed(100 + i)) for i in range(8)]

    def loss_fn(m, tokens, targets):
        return token_loss_sum(m, tokens, targets) / targets.numel()

    grad_fn = value_and_grad(loss_fn)
    curve = []
    for step in range(steps):
        _, grads = grad_fn(model, *sample(train_gen))
        grads, _ = optim.clip_by_global_norm(grads, 1.0, inplace=True)
        params, state = opt.update(grads, state, params, inplace=True)
        model = model.with_params(params)
        if (step + 1) % max(steps // points, 1) == 0:
            with torch.no_grad():
                curve.append(sum(float(loss_fn(model, x, y)) for x, y in held_out) / len(held_out))
    return curve


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lrs", default="1e-4,1e-3", help="comma-separated peak learning rates")
    ap.add_argument("--variants", default="all", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the curves here as JSON")
    args = ap.parse_args(argv)
    variants = VARIANTS if args.variants == "all" else tuple(args.variants.split(","))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, list[float]]] = {}
    for lr in args.lrs.split(","):
        results[lr] = {}
        for variant in variants:
            t0 = time.perf_counter()
            results[lr][variant] = curve = train(variant, float(lr), args.steps)
            print(f"lr {lr:>6} {variant:22s} held-out loss {' '.join(f'{x:.4f}' for x in curve)} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": args.steps, "curves": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
