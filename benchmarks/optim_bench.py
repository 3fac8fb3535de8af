"""Step time of ft-prog's AdamW against torch.optim.AdamW on a 56M-parameter set of tensors.

    python -m benchmarks.optim_bench [--device cuda] [--dtype bf16] [--steps 10] [--rounds 3]

Variants run round-robin (``--rounds`` times, ``--steps`` timed steps each, on
fresh params) and each keeps its best median, which tames a busy machine.
Prints that step time of each variant and its ratio to
``torch.optim.AdamW(foreach=True)`` and to ``torch.optim.AdamW(fused=True)``.
``functional`` is ft-prog's default (returns new params: clone + kernel);
``inplace`` is ``update(..., inplace=True)``. For bf16 params torch keeps bf16
state while ft-prog keeps fp32 state (and upcasts), so the bf16 rows compare
different amounts of work; the fp32 rows are like for like.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ftprog.core._optim import adamw

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shapes(vocab: int = 29000, hidden: int = 512, inter: int = 1536, layers: int = 12) -> list[tuple[int, ...]]:
    """A Llama-like set of tensors: 55.8M parameters in 110 tensors."""
    out: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        out += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return out + [(hidden,)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    base = {f"t{i}": (torch.randn(s, generator=gen) * 0.02).to(device, dtype) for i, s in enumerate(shapes())}
    grads = {k: (torch.randn(v.shape, generator=gen) * 1e-3).to(device, dtype) for k, v in base.items()}
    n = sum(v.numel() for v in base.values())
    print(f"AdamW step, {n / 1e6:.1f}M params in {len(base)} tensors, {args.dtype} on {device} "
          f"({torch.get_num_threads()} CPU threads), best of {args.rounds} medians of {args.steps} steps")
    hp = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def torch_variant(**kw):
        def make():
            ps = [torch.nn.Parameter(v.clone()) for v in base.values()]
            for p, g in zip(ps, grads.values()):
                p.grad = g
            return torch.optim.AdamW(ps, **hp, **kw).step
        return make

    def our_variant(*, fused: bool | None, inplace: bool):
        def make():
            opt = adamw(hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"], fused=fused)
            holder = {"params": {k: v.clone() for k, v in base.items()}}
            holder["state"] = opt.init(holder["params"])

            def step() -> None:
                holder["params"], holder["state"] = opt.update(grads, holder["state"], holder["params"],
                                                               inplace=inplace)
            return step
        return make

    variants = {
        "torch AdamW foreach": torch_variant(foreach=True),
        "torch AdamW fused": torch_variant(fused=True),
        "ours fused functional": our_variant(fused=True, inplace=False),
        "ours fused inplace": our_variant(fused=True, inplace=True),
        "ours foreach functional": our_variant(fused=False, inplace=False),
        "ours foreach inplace": our_variant(fused=False, inplace=True),
    }
    results: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, make in variants.items():
            t = timed(make(), device, args.steps)
            results[name] = min(t, results.get(name, float("inf")))
    foreach, fused = results["torch AdamW foreach"], results["torch AdamW fused"]
    for name, t in results.items():
        print(f"  {name:26s} {t * 1e3:9.2f} ms   x{t / foreach:5.2f} vs torch foreach   "
              f"x{t / fused:5.2f} vs torch fused")
    return results


if __name__ == "__main__":
    main()
