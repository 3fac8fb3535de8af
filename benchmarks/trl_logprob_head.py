"""TRL's log-prob head alone, on one DPO step's positions: ``python -m benchmarks.trl_logprob_head``.

The dpo cases' profile shows where TRL's step time goes on a CPU; this isolates the part its ``DPOTrainer`` adds
on top of the model: ``trl.kernels.ChunkedLogProbFunction`` with the outputs the trainer asks for (log-probs,
entropy, mean logit, top-1) on the policy, and log-probs only on the reference, as its fused LM head calls it off
Triton devices (every position scored). Prints time and peak-RSS growth per call; default sizes: the
cpu-default shape's hidden size and vocabulary, 8 rows (4 pairs) x 255 positions, bf16, 1 thread.
"""

from __future__ import annotations

import argparse
import gc
import time

from benchmarks.worker import peak_rss, reset_peak_rss, rss, trim_heap


def measure(rows: int, hidden: int, vocab: int, repeats: int) -> list[dict[str, float]]:
    """``repeats`` x ``{"policy_forward_s", "policy_backward_s", "policy_peak_mib", "reference_forward_s",
    "reference_peak_mib"}`` (peak: RSS high-water mark over the RSS before the call)."""
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.02).bfloat16()
    states = torch.randn(rows, hidden, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)

    def head(h, outputs):
        return ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                            outputs)[0]

    def start() -> int:
        gc.collect()
        trim_heap()
        before = rss()
        reset_peak_rss()
        return before

    out = []
    for _ in range(repeats):
        before = start()
        t0 = time.perf_counter()
        logps = head(states, ("log_probs", "entropy", "mean_logits", "is_top1"))
        t1 = time.perf_counter()
        logps.sum().backward()
        t2 = time.perf_counter()
        res = {"policy_forward_s": t1 - t0, "policy_backward_s": t2 - t1,
               "policy_peak_mib": (peak_rss() - before) / 2**20}
        states.grad = None
        del logps
        before = start()
        t0 = time.perf_counter()
        with torch.no_grad():
            head(states.detach(), ("log_probs",))
        res.update(reference_forward_s=time.perf_counter() - t0, reference_peak_mib=(peak_rss() - before) / 2**20)
        out.append(res)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trl_logprob_head", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8 * 255, help="positions scored (default: 8 rows x 255)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    for r in measure(args.rows, args.hidden, args.vocab, args.repeats):
        print(f"policy: forward {r['policy_forward_s']:.2f} s, backward {r['policy_backward_s']:.2f} s, peak RSS "
              f"+{r['policy_peak_mib']:,.0f} MiB; reference: forward {r['reference_forward_s']:.2f} s, peak RSS "
              f"+{r['reference_peak_mib']:,.0f} MiB")


if __name__ == "__main__":
    main()
