"""Long-run memory: a training command's resident set sampled through hundreds of steps.

The timed cases measure a short window of steps and so never see memory that creeps up over a run (a heap
that fragments). This case runs a whole training command in a child process, reads its resident set every
``interval`` seconds from ``/proc/<pid>/status``, timestamps the lines it prints (to place steps on the time
axis) and reports the level at step 10, the peak and their ratio; :func:`plot` draws the curves.

    python -m benchmarks.longrun --out runs/longrun -- ft-prog run sft --config my.toml

The harness case (:func:`run_cases`): full fine-tuning on the realistic SFT workload (the cpu-target preset's
lengths), enough samples for ``steps`` of ft-prog's packed batches, one worker process per system (ft-prog,
transformers, torchtune when its interpreter is given) sampled the same way; ft-prog on the malloc ``ft-prog
run`` picks, the baselines on the C library's. Padded baselines take a batch per ``batch`` samples, so they
run more steps over the same samples.

    python -m benchmarks.longrun --harness --out runs/longrun --shape cpu-default --steps 300
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

STEP = re.compile(r"\bstep[ =:]*(\d+)\b", re.IGNORECASE)


def _rss(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in bytes (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _new_steps(path: Path | None, seen: int) -> tuple[list[int], int]:
    """Step numbers of the rows of the JSONL file ``path`` past byte ``seen``, and the new end."""
    if path is None or not path.is_file():
        return [], seen
    with path.open("rb") as fh:
        fh.seek(seen)
        text = fh.read()
    done = text.rfind(b"\n") + 1  # a row still being written waits for the next poll
    steps = []
    for row in text[:done].splitlines():
        try:
            steps.append(int(json.loads(row)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return steps, seen + done


def sample(cmd: list[str], *, env: dict[str, str] | None = None, interval: float = 0.05,
           timeout: float | None = None, steps_file: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` and sample its resident set every ``interval`` s.

    Returns ``{"rc", "wall_s", "samples": [[t, rss_bytes]], "lines": [[t, line]], "steps": {step: t}}``, times in
    seconds from the start; ``steps`` holds the first time each step number was printed (``step 10``,
    ``step=10``) or appeared as a row's ``"step"`` in the JSONL file ``steps_file`` (a metrics log).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[list[Any]] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append([time.perf_counter() - start, line.rstrip("\n")])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: list[list[float]] = []
    steps: dict[int, float] = {}
    seen = 0
    while proc.poll() is None:
        value = _rss(proc.pid)
        now = time.perf_counter() - start
        if value is not None:
            samples.append([now, value])
        new, seen = _new_steps(steps_file, seen)
        for step in new:
            steps.setdefault(step, now)
        if timeout is not None and time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(interval)
    reader.join(timeout=5)
    for t, line in lines:
        for m in STEP.finditer(line):
            steps.setdefault(int(m.group(1)), t)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - start, "samples": samples, "lines": lines,
            "steps": steps}


def summarize(run: dict[str, Any], reference_step: int | None = 10) -> dict[str, Any]:
    """Peak RSS, the RSS when ``reference_step`` was printed (None: at a tenth of the run's time, for commands
    that print no steps) and their ratio (MiB), and the last step seen. A step's RSS swings between its peak (the
    backward) and the level between steps, so the run's peak is also given over the highest RSS up to
    ``reference_step`` (``peak_over_early_peak``: how much the in-step peak grew over the run)."""
    samples = run["samples"]
    if not samples:
        return {"error": "no samples"}
    peak = max(v for _, v in samples)
    if reference_step is None:
        at = samples[-1][0] / 10
        reference_step = "10pct"
    else:
        at = run["steps"].get(reference_step) or run["steps"].get(str(reference_step))
    level = early_peak = None
    if at is not None:
        before = [v for t, v in samples if t <= at]
        level, early_peak = (before[-1], max(before)) if before else (None, None)
    steps = [int(s) for s in run["steps"]]
    mib = 2**20
    return {"peak_mib": round(peak / mib, 1), f"step{reference_step}_mib": round(level / mib, 1) if level else None,
            "peak_over_step": round(peak / level, 3) if level else None,
            f"peak_to_step{reference_step}_mib": round(early_peak / mib, 1) if early_peak else None,
            "peak_over_early_peak": round(peak / early_peak, 3) if early_peak else None,
            "last_step": max(steps) if steps else None, "wall_s": round(run["wall_s"], 1), "rc": run["rc"]}


def plot(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    """RSS (MiB) over time of each run (label -> :func:`sample` result), one line each, to ``path`` (png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, run in runs.items():
        ax.plot([t for t, _ in run["samples"]], [v / 2**20 for _, v in run["samples"]], label=label, lw=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident set (MiB)")
    ax.set_title("memory over a long run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SAMPLES_PER_PACKED_BATCH = 12  # the cpu-target workload packs ~3 samples (median 160 tokens) per 512-token row


def cases(shape: str, *, steps: int = 300, batch: int = 4, dtype: str = "bf16", threads: int = 2,
          systems: tuple[str, ...] = ("ftprog", "hf")) -> list[dict[str, Any]]:
    """One long full fine-tune of the realistic SFT workload per system (a worker ``sft`` case)."""
    workload = dict(n=steps * SAMPLES_PER_PACKED_BATCH, seed=0, seq_len=512, median=160, sigma=0.6, min_len=16,
                    prompt_frac=0.4)
    return [{"kind": "sft", "system": system, "setting": "default", "method": "full", "shape": shape,
             "device": "cpu", "dtype": dtype, "threads": threads, "batch": batch, "warmup": 0, "rank": 8,
             "targets": ["q_proj", "v_proj"], "workload": workload, "profile": False, "print_steps": True}
            for system in systems]


def run_cases(out: Path, long_cases: list[dict[str, Any]], *, pythons: dict[str, str] | None = None,
              timeout: float | None = None) -> dict[str, Any]:
    """Write the checkpoint, run each case in a worker sampled every 50 ms; ``out/longrun.json`` (summaries and
    samples) and ``out/longrun.png`` (the curves)."""
    from benchmarks.harness import Runner

    runner = Runner(out, timeout or 24 * 3600, pythons=pythons)
    shape, dtype = long_cases[0]["shape"], long_cases[0]["dtype"]
    weights = out / f"weights-{shape}-{dtype}"
    res = runner.run({"kind": "weights", "config": shape, "dtype": dtype, "path": str(weights), "seed": 0,
                      "threads": None}, f"weights-{shape}-{dtype}")
    if not res.get("ok"):
        raise SystemExit(f"could not build the {shape} checkpoint: {res.get('error')}")
    vocab = json.loads((weights / "config.json").read_text())["vocab_size"]
    runs, summaries = {}, {}
    for case in long_cases:
        case = {**case, "checkpoint": str(weights), "workload": {**case["workload"], "vocab": vocab}}
        label = f"longrun-{case['system']}-{case['method']}-{dtype}-t{case['threads']}"
        case_file, result_file = out / "logs" / f"{label}.case.json", out / "logs" / f"{label}.result.json"
        case_file.write_text(json.dumps(case, indent=1))
        python = (pythons or {}).get(case["system"], sys.executable)
        runs[label] = sample([python, "-m", "benchmarks.worker", str(case_file), str(result_file)],
                             env=runner.env(case["threads"], case["system"]), timeout=timeout)
        summaries[label] = summarize(runs[label], reference_step=10 if 10 in runs[label]["steps"] else None)
        print(label, json.dumps(summaries[label]), flush=True)
        # after every case, so a long harness run stopped part-way keeps the runs it finished
        (out / "longrun.json").write_text(json.dumps({"summaries": summaries, "runs": runs}))
        plot(runs, out / "longrun.png")
    return summaries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for samples.json and rss.png")
    ap.add_argument("--harness", action="store_true", help="run the harness case (ft-prog and the baselines)")
    ap.add_argument("--shape", default="cpu-default")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torchtune-python", help="interpreter of a torchtune environment (adds torchtune)")
    ap.add_argument("--systems", help="comma-separated systems of the harness case (default: ftprog, hf and "
                                      "torchtune when its interpreter is given)")
    ap.add_argument("--label", default="run")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--steps-file", type=Path, help="a JSONL metrics log whose rows carry the step number")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.harness:
        systems = tuple(args.systems.split(",")) if args.systems else \
            ("ftprog", "hf", "torchtune") if args.torchtune_python else ("ftprog", "hf")
        pythons = {"torchtune": args.torchtune_python} if args.torchtune_python else None
        run_cases(out, cases(args.shape, steps=args.steps, threads=args.threads, systems=systems), pythons=pythons)
        return 0
    run = sample(cmd, interval=args.interval, steps_file=args.steps_file)
    summary = summarize(run)
    (out / f"{args.label}.json").write_text(json.dumps({"cmd": cmd, "summary": summary, **run}))
    plot({args.label: run}, out / f"{args.label}.png")
    print(json.dumps(summary))
    return 0 if run["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
