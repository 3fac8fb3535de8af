"""The benchmark harness end to end (the "quick" preset in a subprocess) and its FLOP / workload helpers.

No assertion here depends on how fast anything ran.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftprog.core import matmul_dtype

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import workload  # noqa: E402
from benchmarks.flops import train_step_flops  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick"
    # the rollout, GRPO and distillation cases have their own end-to-end tests below
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "quick", "--out-dir", str(out),
                           "--skip", "rollout,grpo,distill"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_preset_writes_json_markdown_and_chart(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    for key in ("machine", "settings", "rows", "loss_checks", "speedups", "matmul_peak", "startup", "torchtune",
                "raw_runs"):
        assert key in results, key
    m = results["machine"]
    assert m["cpu"] and m["cores"] and m["torch"]
    assert results["matmul_peak"][0]["flops_per_s"] > 0
    # measured in the dtype ft-prog multiplies bf16 in here (fp32 on a CPU without bf16 kernels)
    upcast = matmul_dtype(torch.bfloat16, "cpu") == torch.float32
    assert results["matmul_peak"][0]["computed_in"] == ("fp32" if upcast else "bf16")

    rows = {r["label"]: r for r in results["rows"]}
    failed = {label: r["error"] for label, r in rows.items() if "error" in r}
    assert not failed, failed
    train = [r for r in results["rows"] if r["case"]["kind"] == "train"]
    assert {r["case"]["system"] for r in train} == {"ftprog", "hf"}
    for r in train:
        assert r["time"]["median_s"] > 0 and r["time"]["n"] == results["settings"]["steps"]
        assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and r["utilisation"] > 0
        assert r["peak_memory"] > 0 and len(r["losses"]) == results["settings"]["warmup"] + results["settings"]["steps"]
        if r["case"]["system"] == "ftprog":
            # The quick preset's tiny shape: the plan's fixed CPU runtime overhead (measured on cpu-default) over-
            # counts it, measured +34% to +44% (sft: +38%, -15% for the approximate packed case); the README's
            # 10.6% is the cpu-target preset's. Bounded at that measured level: a planner off by more shows here.
            assert r["plan"]["peak"] > 0 and abs(r["plan_error"]) <= 0.6, (r["label"], r["plan_error"])
            assert r["allocator"].startswith("host memory: ")  # the malloc `ft-prog run sft` picks
        else:
            assert "allocator" not in r
        b = r["time_breakdown"]  # one profiled step: where its time went, by op category
        assert set(b["parts"]) == {"matmul", "attention", "optimizer", "softmax", "other"}
        assert b["parts"]["matmul"] > 0 and b["parts"]["attention"] > 0 and b["step_s"] > 0
        assert b["total_s"] == pytest.approx(sum(b["parts"].values()))
        times = [o["s"] for o in b["top_ops"]]
        assert times and times == sorted(times, reverse=True) and times[0] <= b["total_s"]
    dpo = {r["case"]["system"]: r for r in results["rows"] if r["case"]["kind"] == "dpo"}
    assert set(dpo) == {"ftprog", "trl"}  # the DPO case (checked in detail below): profiled like the train cases
    assert all(r["time_breakdown"]["parts"]["matmul"] > 0 and r["time_breakdown"]["top_ops"] for r in dpo.values())

    # The same weights and batch give the same step-0 loss in both systems.
    assert results["loss_checks"] and all(c["ok"] for c in results["loss_checks"]), results["loss_checks"]
    sft = [r for r in results["rows"] if r["case"]["kind"] == "sft"]
    assert {(r["case"]["system"], r["case"]["setting"]) for r in sft} >= {("ftprog", "default"), ("ftprog", "best"),
                                                                           ("hf", "default")}
    for r in sft:
        assert 0 < r["trained_tokens"] < r["real_tokens"] <= r["batch_cells"]
        assert r["effective_tokens_per_s"] > 0
        if r["case"]["system"] == "ftprog":
            assert abs(r["plan_error"]) <= 0.6, (r["label"], r["plan_error"])  # as the train cases above
    packed = next(r for r in sft if r["case"]["system"] == "ftprog" and r["case"]["setting"] == "best")
    padded = next(r for r in sft if r["case"]["system"] == "ftprog" and r["case"]["setting"] == "default")
    assert packed["trained_tokens"] == padded["trained_tokens"]  # same samples, batched differently
    gen = {r["case"]["system"]: r for r in results["rows"] if r["case"]["kind"] == "generate"}
    assert set(gen) == {"ftprog", "hf"} and all(len(g["output"]) == g["new_tokens"] for g in gen.values())
    assert results["startup"]["help_median_s"] > 0
    assert results["torchtune"].get("available") or results["torchtune"]["reason"].startswith("unavailable")

    md = (out / "results.md").read_text()
    for heading in ("## Machine", "## Training step", "## Same work?", "## Realistic SFT workload", "## Generation",
                    "## Start-up", "## Baselines", "## Where the step time goes"):
        assert heading in md, heading
    assert "Host memory: ft-prog's cases run on the malloc `ft-prog run` picks (host memory: " in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results.md" in stdout


def test_flops_count_trained_and_frozen_weights():
    b, s = 2, 16
    full = train_step_flops(TINY, method="full", batch=b, seq=s)
    lora = train_step_flops(TINY, method="lora", batch=b, seq=s, rank=8)
    t = b * s
    h, i, v, layers = 64, 176, 512, 2
    q, kv = 64, 32
    per_token = 2 * (h * q + 2 * h * kv + q * h + 3 * h * i)
    attention = 2 * t * q * (s + 1)
    head = 2 * b * (s - 1) * h * v
    assert full["forward"] == pytest.approx(layers * (t * per_token + attention) + head)
    # Full fine-tuning: every weight gets a gradient and every input one, except the embedding output.
    assert full["backward"] == pytest.approx(2 * layers * (t * per_token + attention) + 2 * head)
    assert lora["forward"] > full["forward"] - 1  # adapters add work
    assert lora["backward"] < full["backward"]  # frozen weights: no weight gradients
    hf = train_step_flops(TINY, method="lora", batch=b, seq=s, rank=8, logits_all_positions=True)
    assert hf["forward"] - lora["forward"] == pytest.approx(2 * b * h * v)  # logits of every last position too


def test_moe_case_against_transformers_does_the_same_work(tmp_path, monkeypatch):
    """``--preset moe`` (its cases; the workers run in this process, on the test shape): ft-prog and transformers +
    PEFT both train LoRA on attention and every expert of a tiny mixture of experts (8 experts, top-2) from the same
    initial adapter (PEFT fuses ft-prog's per-expert adapters), with the same step-0 loss; the report compares them
    against issue 16's target."""
    import ftprog.core
    from benchmarks import harness, report, worker

    monkeypatch.setattr(ftprog.core, "reuse_freed_memory", lambda: True)  # process-wide: not in the test process
    args = harness.build_parser().parse_args(["--preset", "moe", "--shape", "moe-test", "--threads", "1", "--warmup",
                                              "1", "--steps", "1", "--batch", "2", "--seq", "16", "--skip", "profile"])
    settings, cases = harness.preset_cases("moe", args)
    assert [harness.case_label(c) for c in cases] == ["train-ftprog-lora-base-bf16-t1", "train-hf-lora-base-bf16-t1"]
    path = tmp_path / "moe-test-bf16"
    adapters = harness.moe_adapters(cases, "moe-test", "bf16", path)
    assert list(adapters) == [(8, ("q_proj", "v_proj", "experts"))]  # one initial adapter for both systems
    worker.run_weights({"config": harness.SHAPES["moe-test"], "dtype": "bf16", "path": str(path),
                        "adapters": list(adapters.values())})
    for c in cases:
        c.update(checkpoint=str(path), adapter=adapters[harness._adapter_key(c)]["path"])
    results = [[{**worker.run_train(c), "ok": True}] for c in cases]
    config = json.loads((path / "config.json").read_text())
    summary = harness.aggregate(settings, cases, results, {}, {("moe-test", "bf16"): config})
    rows = {r["case"]["system"]: r for r in summary["rows"]}
    ours, hf = rows["ftprog"], rows["hf"]
    assert hf["experts_implementation"] == "grouped_mm"
    # 2 layers x 8 experts x 3 projections x rank 8 x (in + out), + q and v; PEFT's fused gate/up adapter is rank 2r
    assert ours["trainable_params"] == 2 * (8 * 8 * 3 * (64 + 128) + 8 * (64 + 64) + 8 * (64 + 32))
    assert hf["trainable_params"] == ours["trainable_params"] + 2 * 8 * 8 * 2 * 128
    (check,) = summary["loss_checks"]
    assert check["ok"] and check["rel_diff"] < 1e-3
    (sp,) = summary["speedups"]
    assert sp["speedup"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    md = "\n".join(report.moe_lines({"rows": summary["rows"], "speedups": summary["speedups"],
                                     "model_configs": {"moe-test-bf16": config}}))
    assert "## Mixture of experts (issue 16)" in md and "Issue 16's target: >= 1.5x" in md
    assert "2 sparse layers of 8 experts, top-2, expert width 128" in md and "'grouped_mm'" in md


def test_moe_flops_count_top_k_experts_and_the_router():
    from benchmarks.harness import SHAPES

    cfg = SHAPES["moe-test"]
    dense = {**{k: v for k, v in cfg.items() if k not in ("num_local_experts", "num_experts_per_tok")},
             "model_type": "llama"}
    b, s, t, h, i = 2, 16, 32, 64, 128
    moe = train_step_flops(cfg, method="full", batch=b, seq=s)
    plain = train_step_flops(dense, method="full", batch=b, seq=s)
    mlp, router = 2 * t * 3 * h * i, 2 * t * h * 8
    # per layer: the top-2 experts' MLPs instead of one MLP, and the router; forward 1x, backward 2x
    assert moe["forward"] - plain["forward"] == pytest.approx(2 * (mlp + router))
    assert moe["backward"] - plain["backward"] == pytest.approx(2 * 2 * (mlp + router))
    lora = train_step_flops(cfg, method="lora", batch=b, seq=s, lora_targets=("experts",))
    assert lora["forward"] - train_step_flops(cfg, method="lora", batch=b, seq=s, lora_targets=())["forward"] \
        == pytest.approx(2 * 3 * 2 * (2 * t) * 8 * (h + i))  # 2 layers, 3 projections, 2 experts per token


def test_workload_is_deterministic_and_masks_prompts():
    spec = {"n": 50, "seed": 3, "seq_len": 128, "median": 40, "sigma": 0.6, "min_len": 8, "prompt_frac": 0.4,
            "vocab": 100}
    a, b = workload.samples(spec), workload.samples(spec)
    assert a == b
    stats = workload.summary(a)
    assert stats["samples"] == 50 and 8 <= min(len(x) for x, _ in a) and stats["max_len"] <= 128
    assert 0.25 < stats["prompt_share"] < 0.55
    for ids, mask in a:
        assert len(ids) == len(mask) and not mask[0] and mask[-1]
        assert mask == sorted(mask)  # prompt first, then the response


def test_torchtune_baseline_is_optional():
    """``--torchtune-python`` adds torchtune train and sft cases; an interpreter that is not there is recorded as
    unavailable (the harness then drops those cases). Needs no torchtune environment."""
    from benchmarks import harness

    res = harness.probe_torchtune(None, str(ROOT / "no-such-env" / "bin" / "python"))
    assert res["available"] is False and res["reason"].startswith("unavailable")

    def labels(*argv):
        args = harness.build_parser().parse_args(["--preset", "cpu-target", "--threads", "1", *argv])
        return [harness.case_label(c) for c in harness.preset_cases("cpu-target", args)[1]]

    assert not any("torchtune" in x for x in labels())
    tt = [x for x in labels("--torchtune-python", "/nowhere/python") if "torchtune" in x]
    assert sorted(tt) == sorted([f"train-torchtune-{m}-{s}-bf16-t1" for m in ("lora", "full")
                                 for s in ("base", "checkpoint")]
                                + [f"sft-torchtune-{s}-bf16-t1" for s in ("default", "best")])
    assert "sft-torchtune-default-bf16-t1" not in labels("--torchtune-python", "/nowhere/python", "--skip", "sft")
    assert not any("torchtune" in x for x in labels("--torchtune-python", "/nowhere/python", "--skip", "torchtune"))


def test_comparisons_cover_each_baseline():
    from benchmarks import harness, report

    def row(system, tps, loss, mem):
        case = {"kind": "train", "system": system, "method": "lora", "stack": [], "dtype": "bf16", "threads": 1,
                "batch": 2, "seq": 8}
        return {"case": case, "label": harness.case_label(case), "tokens_per_s": tps, "losses": [loss, loss],
                "peak_memory": mem}

    rows = [row("ftprog", 200.0, 5.0, 100), row("hf", 100.0, 5.001, 200), row("torchtune", 50.0, 5.2, 400)]
    (sp,) = harness.speedups(rows)
    assert sp["speedup"] == pytest.approx(2) and sp["speedup_torchtune"] == pytest.approx(4)
    assert sp["memory_ratio"] == pytest.approx(0.5) and sp["memory_ratio_torchtune"] == pytest.approx(0.25)
    checks = {c["baseline"]: c for c in harness.loss_checks(rows)}
    assert checks["hf"]["ok"] and not checks["torchtune"]["ok"]  # 4% off: over the bf16 tolerance
    (sp,) = harness.speedups(rows[:2])  # no torchtune: the transformers comparison alone
    assert "speedup_torchtune" not in sp and sp["speedup"] == pytest.approx(2)
    md = report.markdown({"name": "t", "preset": "quick", "settings": {"shape": "tiny", "batch": 2, "seq": 8,
                          "rank": 8, "targets": ["q_proj"], "warmup": 1, "steps": 1, "rounds": 1},
                          "machine": {}, "started": "-", "wall_s": 1.0, "rows": [], "speedups": harness.speedups(rows),
                          "loss_checks": harness.loss_checks(rows), "torchtune": {"available": False,
                                                                                   "reason": "unavailable: x"}})
    assert "speed-up vs torchtune" in md and "| torchtune |" in md


def test_sft_comparisons_cover_torchtune():
    """The realistic SFT rows: ft-prog's effective tokens/s over each baseline's per setting, the check loss
    compared for every baseline that measured it, and torchtune's rows in the report."""
    from benchmarks import harness, report

    def row(system, setting, tps, first_loss, check_loss=None, mem=100):
        case = {"kind": "sft", "system": system, "setting": setting, "method": "lora", "dtype": "bf16",
                "threads": 1, "batch": 4, "workload": {"n": 8, "median": 20, "sigma": 0.6, "min_len": 6,
                                                       "seq_len": 64, "prompt_frac": 0.4}, "warmup": 1}
        return {"case": case, "label": harness.case_label(case), "effective_tokens_per_s": tps,
                "first_loss": first_loss, "check_loss": check_loss, "peak_memory": mem, "description": f"{system}",
                "batches": 2, "padding_share": 0.1, "real_tokens_per_s": 2 * tps}

    rows = [row("ftprog", "default", 300.0, 6.0, 6.0), row("ftprog", "best", 600.0, 6.0, 6.0),
            row("hf", "default", 100.0, 6.001), row("hf", "best", 150.0, 7.0),
            row("torchtune", "default", 200.0, 6.0001, 6.0001, mem=200),
            row("torchtune", "best", 300.0, 6.0001, 6.0001, mem=400)]
    sp = {s["label"]: s for s in harness.speedups(rows)}
    default, best = sp["sft-ftprog-default-bf16-t1"], sp["sft-ftprog-best-bf16-t1"]
    assert default["metric"] == "effective_tokens_per_s"
    assert default["speedup"] == pytest.approx(3) and default["speedup_torchtune"] == pytest.approx(1.5)
    assert best["speedup"] == pytest.approx(4) and best["speedup_torchtune"] == pytest.approx(2)
    assert best["memory_ratio_torchtune"] == pytest.approx(0.25)
    checks = {(c["label"], c["baseline"]) for c in harness.loss_checks(rows)}
    # hf best batches differently and has no check loss: not compared; torchtune measures it in both settings
    assert checks == {("sft-ftprog-default-bf16-t1", "hf"), ("sft-ftprog-default-bf16-t1", "torchtune"),
                      ("sft-ftprog-best-bf16-t1", "torchtune")}
    assert all(c["ok"] for c in harness.loss_checks(rows))
    md = report.markdown({"name": "t", "preset": "quick", "settings": {"shape": "tiny", "batch": 2, "seq": 8,
                          "rank": 8, "targets": ["q_proj"], "warmup": 1, "steps": 1, "rounds": 1},
                          "machine": {}, "started": "-", "wall_s": 1.0, "rows": rows, "speedups": harness.speedups(rows),
                          "loss_checks": harness.loss_checks(rows), "torchtune": {"available": True, "version": "0.6.1"}})
    assert "| torchtune | default | torchtune |" in md and "| torchtune | best | torchtune |" in md
    assert "| sft-ftprog-best-bf16-t1 | effective_tokens_per_s | 600.0 | 150.0 | 4.00x |" in md
    assert "| 300.0 | 2.00x | 0.25 |" in md  # the torchtune columns of the best row
    assert "ft-prog 4.00x transformers and 2.00x torchtune" in md


def test_published_figure_case_and_its_report():
    """The gpu preset ends with ft-prog at a setting torchtune publishes peak memory for (its own shape, batch and
    length), compared with that figure and with no baseline of another shape."""
    from benchmarks import harness, report

    def cases(*argv):
        args = harness.build_parser().parse_args(["--preset", "gpu", *argv])
        return harness.preset_cases("gpu", args)[1]

    tagged = [c for c in cases() if c.get("tag") == "published"]
    assert [harness.case_label(c) for c in tagged] == [
        "train-ftprog-lora-checkpoint+compile-bf16-tdefault-published-llama-3.2-3b"]
    assert cases()[-1].get("tag") == "published"  # last: the time budget drops it first
    (case,) = tagged
    assert (case["shape"], case["batch"], case["seq"], case["rank"], len(case["targets"])) == (
        "llama-3.2-3b", 2, 4096, 64, 6)
    assert case["reference"]["peak_memory_gib"] == 8.5
    assert not any(c.get("tag") for c in cases("--skip", "published"))
    assert not any(c.get("tag") for c in cases("--device", "cpu"))  # GPU figures: CUDA runs only

    mine = {"case": case, "label": harness.case_label(case), "tokens_per_s": 900.0, "losses": [5.0],
            "peak_memory": 4.25 * 2**30}
    plain = {**case, "shape": "llama-3.2-1b", "system": "hf"}  # the same but for the shape
    other = {"case": plain, "label": harness.case_label(plain), "tokens_per_s": 100.0, "losses": [5.0],
             "peak_memory": 2**30}
    assert harness.speedups([mine, other]) == []  # another shape is not the same case
    assert harness.speedups([mine, {**other, "case": {**plain, "shape": case["shape"]}}])[0]["speedup"] == 9
    md = "\n".join(report.published_lines([mine, other]))
    assert "## Against published figures" in md and "| 4.25 | 8.5 (peak active memory) | 0.50 | 900 |" in md


def test_earlier_ftprog_tree_runs_every_ftprog_case_and_is_reported(tmp_path):
    """``--ftprog-baseline TREE``: each ft-prog case also runs as ``ftprog-base`` with TREE's packages first on the
    import path; the report compares the two case by case; a folder that is not a source tree is refused."""
    from benchmarks import harness, report

    args = harness.build_parser().parse_args(["--preset", "quick", "--ftprog-baseline", str(ROOT)])
    cases = harness.preset_cases("quick", args)[1]
    ours = [harness.case_label(c).replace("-ftprog-", "-") for c in cases if c["system"] == "ftprog"]
    base = [harness.case_label(c).replace("-ftprog-base-", "-") for c in cases if c["system"] == "ftprog-base"]
    assert ours and ours == base
    twins = [i for i, c in enumerate(cases) if c["system"] == "ftprog-base"]
    assert all(cases[i - 1] == {**cases[i], "system": "ftprog"} for i in twins)  # each runs right after its twin
    swapped = harness._swap_pairs(list(range(len(cases))), cases)  # odd rounds: the twin first
    assert all(swapped[i - 1] == i and swapped[i] == i - 1 for i in twins)

    earlier = tmp_path / "earlier"  # a stand-in source tree: the shim must win over the installed ft-prog
    for name in ("core", "transforms", "programs"):
        (earlier / name).mkdir(parents=True)
        (earlier / name / "__init__.py").write_text(f"TREE = 'earlier {name}'\n")
    shim = Path(harness.baseline_shim(str(earlier), tmp_path / "out"))
    code = "import ftprog.core, ftprog.programs; print(ftprog.core.TREE, '/', ftprog.programs.TREE)"
    env = {"PYTHONPATH": str(shim), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "earlier core / earlier programs"
    with pytest.raises(SystemExit, match="not an ft-prog source tree"):
        harness.baseline_shim(str(tmp_path / "out"), tmp_path / "x")

    def row(system, round_medians, mem):  # 16 tokens per step; the machine twice as slow in round 2
        case = {"kind": "train", "system": system, "method": "lora", "stack": [], "dtype": "bf16", "threads": 1,
                "batch": 2, "seq": 8}
        steps = [t for m in round_medians for t in (m, m)]
        return {"case": case, "label": harness.case_label(case), "runs": len(round_medians), "losses": [5.0],
                "peak_memory": mem, "round_medians_s": round_medians, "time": harness.summarize_times(steps),
                "tokens_per_s": 16 / harness.summarize_times(steps)["median_s"]}

    (sp,) = harness.speedups([row("ftprog", [1.0, 2.0], 100), row("ftprog-base", [0.99, 1.98], 100)])
    assert sp["paired_speedup_ftprog-base"] == pytest.approx(0.99) and sp["memory_ratio_ftprog-base"] == pytest.approx(1)
    assert sp["fastest_step_speedup_ftprog-base"] == pytest.approx(0.99)
    md = "\n".join(report.baseline_tree_lines({"speedups": [sp]}))
    assert "earlier ft-prog" in md and "0.99x" in md and "0.990x (round by round)" in md


def test_dpo_case_against_trl_does_the_same_work(tmp_path):
    """``--only dpo`` on the tiny shape (fp32, so one update's effect shows above rounding): ft-prog and TRL's
    DPOTrainer both train, see the same real and padded tokens at every step, start at loss log 2 (B = 0: the
    policy is the reference), and agree on the loss after one and two updates; the report compares them."""
    import math

    out = tmp_path / "dpo"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "quick", "--only", "dpo", "--dtypes",
                           "fp32", "--skip", "peak,profile", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["case"]["system"]: r for r in results["rows"]}
    assert set(rows) == {"ftprog", "trl"} and all(r["case"]["kind"] == "dpo" for r in rows.values())
    assert not [r["error"] for r in rows.values() if "error" in r]
    ours, trl = rows["ftprog"], rows["trl"]
    assert trl["reference"] == "adapters disabled" and ours["trainable_params"] == trl["trainable_params"]
    for r in (ours, trl):
        assert r["tokens_per_s"] > 0 and r["best_tokens_per_s"] > 0 and r["peak_memory"] > 0
        assert r["time"]["n"] == r["case"]["steps"]
        assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    n = ours["case"]["warmup"] + ours["case"]["steps"]
    assert len(ours["step_tokens"]) == n and ours["step_tokens"] == trl["step_tokens"]
    assert ours["step_cells"] == trl["step_cells"] and ours["step_scored"] == trl["step_scored"]
    moved = [abs(x - math.log(2)) for x in ours["losses"][1:]]
    assert min(moved) > 5e-6  # the updates changed the loss, by more than the systems disagree on it
    assert ours["losses"][1:] == pytest.approx(trl["losses"][1:], abs=2e-6)

    (check,) = results["loss_checks"]
    assert check["baseline"] == "trl" and check["ok"] and check["same_tokens"]
    (sp,) = results["speedups"]
    assert sp["speedup_trl"] == pytest.approx(ours["tokens_per_s"] / trl["tokens_per_s"])
    assert sp["memory_ratio_trl"] == pytest.approx(ours["peak_memory"] / trl["peak_memory"])
    md = (out / "results.md").read_text()
    assert "## DPO step (LoRA) against TRL's DPOTrainer" in md and "**ft-prog against TRL**" in md
    assert "Issue 17's target" in md


def test_dpo_pairs_fit_and_only_filters_cases():
    spec = {"n": 40, "seed": 1, "max_len": 64, "prompt_median": 30, "response_median": 20, "sigma": 0.8,
            "min_len": 4, "vocab": 100}
    pairs = workload.preference_pairs(spec)
    assert pairs == workload.preference_pairs(spec) and len(pairs) == 40
    assert all(len(p) + max(len(c), len(r)) <= 64 and min(len(p), len(c), len(r)) >= 4 for p, c, r in pairs)
    assert all(3 <= t < 100 for pair in pairs for part in pair for t in part)
    assert any(c != r for _, c, r in pairs)

    from benchmarks import harness

    def labels(*argv):
        args = harness.build_parser().parse_args(["--preset", "quick", *argv])
        return [harness.case_label(c) for c in harness.preset_cases("quick", args)[1]]

    assert labels("--only", "dpo") == ["dpo-ftprog-lora-base-bf16-t1", "dpo-trl-lora-base-bf16-t1"]
    assert "dpo-trl-lora-base-bf16-t1" in labels() and not any(x.startswith("dpo-") for x in labels("--skip", "dpo"))
    assert labels("--only", "dpo", "--skip", "trl") == ["dpo-ftprog-lora-base-bf16-t1"]
    with pytest.raises(SystemExit, match="case kinds"):
        labels("--only", "dpo,nonsense")


def test_trl_logprob_head_probe_reports_time_and_memory():
    from benchmarks.trl_logprob_head import measure

    (r,) = measure(rows=16, hidden=8, vocab=64, repeats=1)
    assert set(r) == {"policy_forward_s", "policy_backward_s", "policy_peak_mib", "reference_forward_s",
                      "reference_peak_mib"}
    assert all(r[k] > 0 for k in ("policy_forward_s", "policy_backward_s", "reference_forward_s"))
    assert r["policy_peak_mib"] >= 0 and r["reference_peak_mib"] >= 0


def test_rollout_and_grpo_cases_do_the_same_work(tmp_path):
    """``--only rollout,grpo`` on the tiny shape (fp32): ft-prog's sampled generation and transformers' ``generate``
    both report tokens/s and memory for the same number of generated tokens; ft-prog's GRPO step and TRL's
    GRPOTrainer both train, see the same rows, prompt and completion tokens at every step, and ft-prog's step-0 loss
    and clipped gradient on TRL's own rollout equal TRL's; the report compares them against issue 18's target."""
    out = tmp_path / "grpo"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "quick", "--only", "rollout,grpo",
                           "--dtypes", "fp32", "--skip", "peak,profile", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {(r["case"]["kind"], r["case"]["system"]): r for r in results["rows"]}
    assert set(rows) == {("rollout", "ftprog"), ("rollout", "hf"), ("grpo", "ftprog"), ("grpo", "trl")}
    assert not [r["error"] for r in rows.values() if "error" in r]
    ours, hf = rows["rollout", "ftprog"], rows["rollout", "hf"]
    case = ours["case"]
    for r in (ours, hf):
        assert r["tokens_per_s"] > 0 and r["peak_memory"] > 0 and len(r["tokens_per_s_all"]) == case["repeats"]
        assert r["generated"] == [case["workload"]["n"] * case["new_tokens"]] * (case["warmup"] + case["repeats"])
    assert ours["longest_prompt"] > min(len(p) for p in workload.prompts(case["workload"]))  # padded prompts

    ours, trl = rows["grpo", "ftprog"], rows["grpo", "trl"]
    c = ours["case"]
    n = c["warmup"] + c["steps"]
    for r in (ours, trl):
        assert r["tokens_per_s"] > 0 and r["peak_memory"] > 0 and r["time"]["n"] == c["steps"]
        assert r["rollout_median_s"] > 0 and r["train_median_s"] > 0 and len(r["losses"]) == n
    assert ours["trainable_params"] == trl["trainable_params"] and trl["reference"] == "none (beta 0)"
    assert ours["step_rows"] == trl["step_rows"] == [c["prompts"] * c["group"]] * n
    assert ours["step_completion_tokens"] == trl["step_completion_tokens"] == [c["prompts"] * c["group"]
                                                                               * c["new_tokens"]] * n
    assert ours["step_prompt_tokens"] == trl["step_prompt_tokens"]
    on = trl["step0_check"]
    assert on["max_abs_advantage"] > 0.1 and on["trl_clipped_grad_norm"] > 0  # a real gradient to compare
    assert on["grad_rel_diff"] < 1e-5 and on["ftprog_loss"] == pytest.approx(on["trl_loss"], abs=1e-6)
    (check,) = results["loss_checks"]
    assert check["baseline"] == "trl" and check["ok"] and check["same_tokens"]
    sp = {s["label"]: s for s in results["speedups"]}
    assert sp["grpo-ftprog-fp32-t1"]["speedup_trl"] == pytest.approx(ours["tokens_per_s"] / trl["tokens_per_s"])
    assert sp["rollout-ftprog-fp32-t1"]["speedup"] == pytest.approx(rows["rollout", "ftprog"]["tokens_per_s"]
                                                                     / hf["tokens_per_s"])
    md = (out / "results.md").read_text()
    assert "## Rollouts: batched sampled generation" in md and "## GRPO step (LoRA) against TRL's GRPOTrainer" in md
    assert "Issue 18's target" in md and "**Same work?** Rows, prompt and completion tokens per step: identical" in md


def test_grpo_pieces_prompts_reward_tokenizer_and_case_selection():
    """The prompts are fixed by the seed and vary in length; the reward is a fixed function of token ids; TRL's
    word-level tokenizer gives back exactly the prompt ids; ``--only`` / ``--skip`` pick the new cases."""
    from benchmarks import grpo_worker, harness

    spec = {"n": 12, "seed": 3, "median": 10, "sigma": 0.6, "min_len": 4, "max_len": 20, "vocab": 600}
    prompts = workload.prompts(spec)
    assert prompts == workload.prompts(spec) and len(prompts) == 12 and len({len(p) for p in prompts}) > 1
    assert all(4 <= len(p) <= 20 and all(3 <= t < 600 for t in p) for p in prompts)
    assert grpo_worker.token_reward([7, 13, 6]) == pytest.approx((0 + 6 / 6 + 6 / 6) / 3)
    tok = grpo_worker._tokenizer(600)
    assert tok(text=[" ".join(f"t{t}" for t in p) for p in prompts])["input_ids"] == prompts
    assert (tok.pad_token_id, tok.eos_token_id) == (grpo_worker.PAD_ID, grpo_worker.EOS_ID)

    def labels(*argv):
        args = harness.build_parser().parse_args(["--preset", "quick", *argv])
        return [harness.case_label(c) for c in harness.preset_cases("quick", args)[1]]

    assert labels("--only", "rollout,grpo") == ["rollout-ftprog-bf16-t1", "rollout-hf-bf16-t1",
                                                "grpo-ftprog-bf16-t1", "grpo-trl-bf16-t1"]
    assert labels("--only", "grpo", "--skip", "trl") == ["grpo-ftprog-bf16-t1"]
    assert not any(x.startswith(("rollout-", "grpo-")) for x in labels("--skip", "rollout,grpo"))
    args = harness.build_parser().parse_args(["--preset", "quick", "--only", "grpo", "--steps", "5"])
    assert {c["steps"] for c in harness.preset_cases("quick", args)[1]} == {5}


def test_distill_case_chunked_and_full_logits_do_the_same_work(tmp_path):
    """``--only distill`` on the tiny shape (fp32): a teacher about 4x the student's parameters (same vocabulary);
    the chunked loss `ft-prog run distill` trains on and the same loss from both models' full logits give the same
    losses step by step on the same packed rows; both report tokens/s and peak memory, and the report sets them
    side by side."""
    from benchmarks import distill_worker, harness
    from ftprog.core import preset

    student = preset("tiny")
    teacher = distill_worker.teacher_config(student, 4.0)
    assert teacher["vocab_size"] == student["vocab_size"] and teacher["hidden_size"] == 2 * student["hidden_size"]
    assert 3 <= distill_worker.approx_params(teacher) / distill_worker.approx_params(student) <= 5

    out = tmp_path / "distill"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "quick", "--only", "distill", "--dtypes",
                           "fp32", "--warmup", "0", "--steps", "2", "--skip", "peak,profile", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["case"]["variant"]: r for r in results["rows"]}
    assert set(rows) == {"chunked", "full-logits"} and not [r["error"] for r in rows.values() if "error" in r]
    chunked, full = rows["chunked"], rows["full-logits"]
    for r in (chunked, full):
        assert r["tokens_per_s"] > 0 and r["peak_memory"] > 0 and r["time"]["n"] == 2
        assert 3 <= r["teacher_params"] / r["params"] <= 5
    assert chunked["step_tokens"] == full["step_tokens"] and chunked["step_scored"] == full["step_scored"]
    assert chunked["losses"] == pytest.approx(full["losses"], rel=1e-6) and chunked["losses"][1] != chunked["losses"][0]
    md = (out / "results.md").read_text()
    assert "## Distillation step (offline KD, LoRA student)" in md and "**Chunked against full logits**" in md
    labels = [harness.case_label(c) for c in harness.preset_cases(
        "quick", harness.build_parser().parse_args(["--preset", "quick", "--only", "distill"]))[1]]
    assert labels == ["distill-ftprog-chunked-bf16-t1", "distill-ftprog-full-logits-bf16-t1"]


def test_longrun_samples_rss_through_a_run(tmp_path):
    """The long-run memory case's sampler: RSS through a child's run, steps placed on the time axis, the plot;
    and the harness cases it runs (full fine-tuning, enough samples for the steps)."""
    from benchmarks import longrun

    code = ("import json, sys, time\nblocks = []\nfor step in range(1, 13):\n    blocks.append(bytearray(4 << 20))\n"
            f"    open({str(tmp_path / 'm.jsonl')!r}, 'a').write(json.dumps({{'step': step}}) + '\\n')\n"
            "    print(f'step {step}', flush=True)\n    time.sleep(0.05)\n")
    run = longrun.sample([sys.executable, "-c", code], interval=0.01, steps_file=tmp_path / "m.jsonl")
    assert run["rc"] == 0 and len(run["samples"]) > 5 and {10, 12} <= set(run["steps"])
    summary = longrun.summarize(run)
    assert summary["last_step"] == 12 and summary["peak_over_step"] >= 1.0  # it grew by 4 MiB a step
    assert summary["peak_over_early_peak"] >= 1.0 and summary["peak_to_step10_mib"] >= summary["step10_mib"]
    assert longrun.plot({"child": run}, tmp_path / "rss.png").read_bytes()[:4] == b"\x89PNG"
    cases = longrun.cases("tiny", steps=300)
    assert {c["system"] for c in cases} == {"ftprog", "hf"} and all(c["method"] == "full" for c in cases)
    assert cases[0]["workload"]["n"] >= 300 * cases[0]["batch"] and all(c["print_steps"] for c in cases)


def test_memory_technique_case_compares_with_the_baselines_plain_full_fine_tuning(tmp_path, monkeypatch):
    """The ``in-backward`` + ``int8-state`` stack (issue 20's memory case): ft-prog's full fine-tuning with torchao's
    int8 moments, updated in the backward, from the same weights and batch as transformers' plain full
    fine-tuning (same step-0 loss); the comparison and its report name the baseline's stack, and the plan counts
    the int8 moments and no phase holding every gradient."""
    from benchmarks import harness, report, worker

    monkeypatch.setenv("FTPROG_COMPILE_OPTIMIZER", "0")  # the eager int8 step: compiling it here costs ~12 s
    path = tmp_path / "tiny-bf16"
    worker.run_weights({"config": {**TINY, "model_type": "llama"}, "dtype": "bf16", "path": str(path)})
    common = dict(kind="train", method="full", dtype="bf16", threads=1, batch=2, seq=16, shape="tiny", rank=8,
                  targets=["q_proj", "v_proj"], warmup=1, steps=1, device="cpu", checkpoint=str(path))
    cases = [{**common, "system": "ftprog", "stack": ["in-backward", "int8-state"]},
             {**common, "system": "hf", "stack": []}]
    rows = []
    for c in cases:
        out = worker.run_train(c)
        rows.append({"case": c, "label": harness.case_label(c), "tokens_per_s": 1.0, "peak_memory": out["rss_peak"],
                     **out})
    ours, hf = rows
    assert ours["losses"][0] == pytest.approx(hf["losses"][0], rel=1e-2)
    assert ours["losses"][1] != ours["losses"][0]  # the in-backward step updated the weights
    plain = worker.plan_summary({**cases[0], "stack": []}, worker._config(cases[0]), batch=2, seq=16, mask=False)
    assert ours["plan"]["optimizer"] < plain["optimizer"] / 1.5  # int8 codes + scales against bf16 moments
    assert set(ours["plan"]["phases"]) == {"forward", "backward"} < set(plain["phases"])  # updates in the backward
    (sp,) = harness.speedups(rows)
    assert sp["against"] == "base" and sp["memory_ratio"] == pytest.approx(ours["peak_memory"] / hf["peak_memory"])
    md = report.markdown({"name": "t", "preset": "quick", "settings": {"shape": "tiny", "batch": 2, "seq": 16,
                          "rank": 8, "targets": ["q_proj"], "warmup": 1, "steps": 1, "rounds": 1},
                          "machine": {}, "started": "-", "wall_s": 1.0, "rows": [], "speedups": [sp],
                          "loss_checks": [], "torchtune": {"available": False, "reason": "x"}})
    assert "train-ftprog-full-in-backward+int8-state-bf16-t1 (theirs: base)" in md


def test_gpu_preset_measures_fused_projections_offloading_and_in_backward(tmp_path, monkeypatch):
    """The gpu preset's cases for issue 20's techniques (full fine-tuning with fused projections, with in-backward +
    int8 moments; LoRA with offloading under checkpointing), each compared with transformers' case without them; on
    the CPU the fused case runs the plain case's step (same losses) and offloading reports itself unavailable."""
    import ftprog.transforms
    from benchmarks import harness, worker

    fused_models, fuse = [], ftprog.transforms.fuse_projections

    def fuse_projections(model):  # the worker imports the transform when it builds a model
        fused_models.append(fuse(model))
        return fused_models[-1]

    monkeypatch.setattr(ftprog.transforms, "fuse_projections", fuse_projections)
    args = harness.build_parser().parse_args(["--preset", "gpu"])
    gpu = {harness.case_label(c): c for c in harness.preset_cases("gpu", args)[1]}
    for method, stack in (("full", "fuse"), ("full", "in-backward+int8-state"), ("lora", "checkpoint+offload")):
        assert f"train-ftprog-{method}-{stack}-bf16-tdefault" in gpu, sorted(gpu)
    path = tmp_path / "tiny-bf16"
    worker.run_weights({"config": {**TINY, "model_type": "llama"}, "dtype": "bf16", "path": str(path)})
    common = dict(kind="train", system="ftprog", method="full", dtype="bf16", threads=1, batch=2, seq=16,
                  shape="tiny", rank=8, targets=["q_proj", "v_proj"], warmup=1, steps=1, device="cpu",
                  checkpoint=str(path))
    rows = []
    for stack in ([], ["fuse"]):
        case = {**common, "stack": stack}
        out = worker.run_train(case)
        rows.append({"case": case, "label": harness.case_label(case), "tokens_per_s": 1.0,
                     "peak_memory": out["rss_peak"], **out})
    plain, fused = rows
    assert [m.device.type for m in fused_models].count("cpu") == 1  # the trained model (the plan's are on meta)
    assert fused["losses"] == pytest.approx(plain["losses"], rel=1e-3)
    assert fused["losses"][1] != fused["losses"][0]  # a real step between them
    hf = {**plain, "case": {**plain["case"], "system": "hf"}, "tokens_per_s": 0.5}
    (sp,) = harness.speedups([fused, hf])
    assert sp["against"] == "base" and sp["speedup"] == 2
    with pytest.raises(RuntimeError, match="unavailable: activation offloading runs on CUDA only"):
        worker.run_train({**common, "stack": ["checkpoint", "offload"]})


def test_rounding_benchmark_shows_stochastic_rounding_keeping_small_updates(tmp_path):
    """benchmarks.rounding: at lr 1e-4, bf16 params and moments rounded to nearest lose most updates, and the
    held-out loss stalls above the stochastically rounded run's."""
    from benchmarks import rounding

    out = tmp_path / "curves.json"
    curves = rounding.main(["--steps", "200", "--lrs", "1e-4", "--out", str(out),
                            "--variants", "bf16/bf16/nearest,bf16/bf16/stochastic"])["1e-4"]
    nearest, stochastic = curves["bf16/bf16/nearest"], curves["bf16/bf16/stochastic"]
    assert len(nearest) == len(stochastic) == 5
    assert stochastic[-1] < nearest[-1] - 0.08, curves
    assert json.loads(out.read_text())["curves"]["1e-4"] == curves
    with pytest.raises(SystemExit):
        rounding.main(["--variants", "bf16/int8/nearest"])
