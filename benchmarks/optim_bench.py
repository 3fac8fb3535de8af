"""Step time of ft-prog's AdamW against torch.optim.AdamW on a 56M-parameter set of tensors.

    python -m benchmarks.optim_bench [--device cuda] [--dtype bf16] [--steps 10] [--rounds 3]
    python -m benchmarks.optim_bench --states fp32,bf16,int8,fp8 [--shape cpu-default] [--dtype bf16] [--threads 1]
                                     [--sft-step]

``--states``: ft-prog's AdamW update on a preset's parameters (``--shape``) with each moment dtype (a ``+sr``
suffix, e.g. ``bf16+sr``: with ``stochastic_rounding``), every one in a fresh interpreter: the first update
(for int8 / fp8 / int4 it compiles the step; pass a fresh ``TORCHINDUCTOR_CACHE_DIR`` for a cold compile) and
the median of the next ``--steps``. ``--sft-step``
adds the whole full fine-tuning step of that model (forward, backward, clipping, in-place update) on
random 4 x 256 token batches.

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
import json
import statistics
import subprocess
import sys
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


STATES = {"fp32": None, "bf16": torch.bfloat16, "int8": "int8", "fp8": "fp8", "int4": "int4"}


def one_state(state: str, shape: str, device: torch.device, dtype: torch.dtype, steps: int,
              sft_step: bool) -> dict[str, float]:
    """Seconds of the first update and median seconds of the next ``steps`` (and of the whole step)."""
    from ftprog.core import from_config, token_loss_sum, value_and_grad
    from ftprog.core._optim import clip_by_global_norm
    from ftprog.transforms import trainable

    model = trainable(from_config(shape, dtype=dtype, device=device))
    params = model.trainable_params()
    gen = torch.Generator().manual_seed(0)
    grads = {k: (torch.randn(v.shape, generator=gen) * 1e-3).to(device, dtype) for k, v in params.items()}
    name, _, rounding = state.partition("+")
    opt = adamw(1e-4, weight_decay=0.01, state_dtype=STATES[name], stochastic_rounding=rounding == "sr")
    state_ = opt.init(params)
    times = []
    for _ in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        params, state_ = opt.update(grads, state_, params, inplace=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"first_update_s": times[0], "update_s": statistics.median(times[1:]),
           "params": sum(v.numel() for v in params.values())}
    if sft_step:
        vocab = model.config.vocab_size
        batches = [torch.randint(0, vocab, (4, 257), generator=gen).to(device) for _ in range(steps + 1)]
        grad_fn = value_and_grad(lambda m, t: token_loss_sum(m, t[:, :-1], t[:, 1:]) / t[:, 1:].numel())
        step_times = []
        for tokens in batches:
            sync(device)
            t0 = time.perf_counter()
            _, g = grad_fn(model, tokens)
            g, _ = clip_by_global_norm(g, 1.0, inplace=True)
            new, state_ = opt.update(g, state_, model.trainable_params(), inplace=True)
            model = model.with_params(new)
            del g, new
            sync(device)
            step_times.append(time.perf_counter() - t0)
        out["sft_step_s"] = statistics.median(step_times[1:])
    return out


def states_table(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each of ``--states`` in a fresh interpreter (its own compile), printed as a table."""
    results = {}
    for state in args.states.split(","):
        cmd = [sys.executable, "-m", "benchmarks.optim_bench", "--one-state", state, "--shape", args.shape,
               "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
               "--threads", str(args.threads), *(["--sft-step"] if args.sft_step else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[state] = json.loads(done.stdout.strip().splitlines()[-1])
    n = next(iter(results.values()))["params"]
    print(f"AdamW update, {args.shape} ({n / 1e6:.1f}M params), {args.dtype} on {args.device}, "
          f"{args.threads} thread(s), median of {args.steps}")
    print(f"  {'state':6s} {'first update':>13s} {'update':>9s}" + (f" {'sft step':>9s}" if args.sft_step else ""))
    for state, r in results.items():
        print(f"  {state:6s} {r['first_update_s']:12.2f}s {r['update_s']:8.3f}s"
              + (f" {r['sft_step_s']:8.2f}s" if args.sft_step else ""))
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--states", help="comma-separated moment dtypes (fp32, bf16, int8, fp8, int4; +sr: stochastic "
                                     "rounding, e.g. bf16+sr): the --shape table")
    ap.add_argument("--shape", default="cpu-default", help="preset whose parameters --states updates")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sft-step", action="store_true", help="--states also times the whole training step")
    ap.add_argument("--one-state", choices=sorted([*STATES, *(f"{k}+sr" for k in STATES)]), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one_state:
        print(json.dumps(one_state(args.one_state, args.shape, torch.device(args.device), DTYPES[args.dtype],
                                   args.steps, args.sft_step)))
        return {}
    if args.states:
        return states_table(args)
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
