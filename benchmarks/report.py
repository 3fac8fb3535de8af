"""Markdown table and PNG chart of a benchmark's ``results.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _mib(n: float | None) -> str:
    return "-" if not n else f"{n / 2**20:,.0f}"


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


NAMES = {"ftprog": "ft-prog", "hf": "transformers", "torchtune": "torchtune", "trl": "TRL",
         "ftprog-base": "ft-prog (baseline tree)"}


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _what(case: dict[str, Any]) -> str:
    stack = "+".join(case.get("stack") or []) or "-"
    return f"{case['method']} | {stack}"  # two table cells


def machine_lines(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    gpu = f"{m['gpu']} ({m.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB, CUDA {m.get('cuda_version')})" if m.get("gpu") \
        else "none"
    return [
        f"- CPU: {m.get('cpu')} ({m.get('cpu_flags') or 'no flags read'}), {m.get('cores')} cores "
        f"({m.get('cores_usable')} usable), {(m.get('memory_bytes') or 0) / 2**30:.0f} GiB RAM",
        f"- GPU: {gpu}",
        f"- torch {m.get('torch')} (default {m.get('threads_default')} threads), transformers {m.get('transformers')}, "
        f"peft {m.get('peft')}, torchao {m.get('torchao')}; Python {m.get('python')}; {m.get('platform')}",
        f"- ft-prog commit {m.get('git')}; started {r['started']}, {r['wall_s'] / 60:.1f} min; load average "
        f"{m.get('load_average')} at start, {r.get('load_average_end')} at the end (above the core count = a busy "
        "machine: treat timings as noisy)",
    ]


def baseline_tree_lines(r: dict[str, Any]) -> list[str]:
    """ft-prog against the earlier ft-prog of ``--ftprog-baseline``, case by case (empty without it)."""
    pairs = [sp for sp in r.get("speedups", []) if "ftprog-base" in sp]
    if not pairs:
        return []
    lines = ["## ft-prog against an earlier ft-prog (`--ftprog-baseline`, same cases, same run)", "",
             "| case | metric | ft-prog | earlier ft-prog | ratio | ratio, round by round | fastest step | "
             "memory ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for sp in pairs:
        lines.append(f"| {sp['label']} | {sp['metric']} | {sp['ftprog']:,.1f} | {sp['ftprog-base']:,.1f} | "
                     f"{_times(sp.get('speedup_ftprog-base'))} | {_times(sp.get('paired_speedup_ftprog-base'))} | "
                     f"{_times(sp.get('fastest_step_speedup_ftprog-base'))} | "
                     f"{_num(sp.get('memory_ratio_ftprog-base'), '.3f')} |")
    key = "paired_speedup_ftprog-base" if all("paired_speedup_ftprog-base" in sp for sp in pairs) else \
        "speedup_ftprog-base"
    worst = min(pairs, key=lambda sp: sp[key])
    lines += ["", "Ratio: this tree's metric over the earlier tree's (above 1 = faster now), from all rounds' steps; "
              "round by round: the median over rounds of the ratio within a round, where each pair of cases ran "
              "one after the other, in turn A B and B A (robust to the machine's drifts); fastest step: the "
              "earlier tree's fastest step time over this tree's (noise only adds time). Slowest case: "
              f"{worst['label']}, "
              f"{worst[key]:.3f}x ({'round by round' if key.startswith('paired') else 'all rounds'}).", ""]
    return lines


def time_breakdown_lines(train: list[dict[str, Any]], heading: str = "## Where the step time goes") -> list[str]:
    """The "where the step time goes" table of the train (or dpo) rows that carry a profiled step."""
    profiled = [x for x in train if "error" not in x and x.get("time_breakdown")]
    if not profiled:
        return []
    parts = list(profiled[0]["time_breakdown"]["parts"])
    lines = [heading, "",
             f"One more step per case under `torch.profiler`, after the timed ones ({profiled[0]['time_breakdown']['basis']}"
             "; share of the profiled total). Matmul: `mm`/`addmm`/`bmm`-like ops; attention: SDPA kernels; softmax: "
             "the loss's vocabulary softmax; other: element-wise ops, norms, copies, embedding. Busy: the profiled "
             "total over the step's wall time (on a GPU, the share of the step with a kernel running).", "",
             "| system | method | stack | profiled step ms | busy | " + " | ".join(parts) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in parts) + " |"]
    for x in profiled:
        c, b = x["case"], x["time_breakdown"]
        total = b["total_s"] or 1.0
        lines.append(f"| {c['system']} | {c['method']} | {'+'.join(c['stack']) or '-'} | {b['step_s'] * 1e3:,.0f} | "
                     f"{_pct(b['total_s'] / b['step_s'])} | " + " | ".join(_pct(b["parts"][k] / total) for k in parts)
                     + " |")
    return lines + [""]


def published_lines(train: list[dict[str, Any]]) -> list[str]:
    """ft-prog against the figures torchtune publishes for the same setting (the cases with a ``reference``)."""
    ref_rows = [x for x in train if x["case"].get("reference")]
    if not ref_rows:
        return []
    lines = ["## Against published figures", "",
             "| case | ft-prog peak memory GiB | published GiB | ratio | ft-prog tokens/s | published tokens/s | source |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for x in ref_rows:
        ref = x["case"]["reference"]
        if "error" in x:
            lines.append(f"| {x['label']} | {x['error'][:80]} | {ref['peak_memory_gib']} | | | {ref['tokens_per_s']} | "
                         f"{ref['source']} |")
            continue
        mem = x.get("peak_memory")
        gib = mem / 2**30 if mem else None
        ratio = f"{gib / ref['peak_memory_gib']:.2f}" if gib else "-"
        lines.append(f"| {x['label']} | {_num(gib, '.2f')} | {ref['peak_memory_gib']} ({ref['memory_kind']}) | {ratio} | "
                     f"{x['tokens_per_s']:,.0f} | {ref['tokens_per_s']:,} ({ref['hardware']}) | {ref['source']} |")
    lines += ["", "Ratio: ft-prog's peak over the published one (below 1 = less memory). The published tokens/s "
              "come from other hardware: context, not a comparison.", ""]
    return lines


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    rows = r["rows"]
    lines = [f"# ft-prog benchmark `{r['name']}` (preset {r['preset']})", "", "## Machine", ""]
    lines += machine_lines(r)
    lines.append("")
    if any(x["case"]["kind"] not in ("dpo", "rollout", "grpo", "distill") for x in rows):  # these describe their own settings
        lines += [f"Shape `{s['shape']}`, batch {s['batch']} x seq {s['seq']}, LoRA r={s['rank']} on "
                  f"{', '.join(s['targets'])}, AdamW lr 1e-4 + grad clipping 1.0 in every system. Each case: a fresh "
                  f"process, {s['warmup']} warm-up + {s['steps']} timed steps, {s['rounds']} round(s) round-robin; "
                  "step time = median over all timed steps, spread = (p90 - p10) / median.", ""]
    else:
        lines += [f"Each case: a fresh process, {s['rounds']} round(s) round-robin.", ""]

    if r.get("matmul_peak"):
        lines += ["## Matmul peak (torch.mm, measured in this run)", "",
                  "| dtype | threads | n | TFLOP/s (start / end) | 1x512x1408 linear us (start / end) |",
                  "| --- | --- | --- | --- | --- |"]
        busy = False
        for p in r["matmul_peak"]:
            end = p.get("flops_per_s_end")
            lat = [p.get("small_linear_s"), p.get("small_linear_end_s")]
            busy |= any(x and x > 1e-3 for x in lat)
            dtype = p["dtype"] if p.get("computed_in", p["dtype"]) == p["dtype"] else \
                f"{p['dtype']} (computed in {p['computed_in']}: no {p['dtype']} kernels on this CPU)"
            lines.append(f"| {dtype} | {p['threads'] or 'default'} | {p['n']} | {p['flops_per_s'] / 1e12:.3f} / "
                         f"{'-' if end is None else format(end / 1e12, '.3f')} | "
                         + " / ".join("-" if x is None else f"{x * 1e6:,.0f}" for x in lat) + " |")
        if busy:
            lines += ["", "**Busy machine**: a tiny linear took over a millisecond (normally ~0.1 ms): other processes "
                      "deschedule this run's threads, and every multi-threaded op then waits a scheduler quantum. "
                      "Timings at those thread counts are not valid; rerun on a quiet machine."]
        lines.append("")

    train = [x for x in rows if x["case"]["kind"] == "train"]
    if train:
        lines += ["## Training step (fixed shape)", "",
                  "| system | method | stack | dtype | threads | step ms (median) | spread | tokens/s | "
                  "matmul util. | peak mem MiB | planned MiB | plan err | step-0 loss | first step s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in train:
            c = x["case"]
            if "error" in x:
                lines.append(f"| {c['system']} | {_what(c)} | {c['dtype']} | {c['threads'] or '-'} | "
                             f"{x['error'][:90]} |" + " |" * 8)
                continue
            plan = x.get("plan") or {}
            planned = plan.get("peak") if not c["device"].startswith("cuda") else plan.get("tensor_peak")
            err = _pct(x.get("plan_error"), signed=True) + (" (approx.)" if plan.get("approximate") else "") \
                if plan else "-"
            lines.append(
                f"| {c['system']} | {_what(c)} | {c['dtype']} | {c['threads'] or '-'} | "
                f"{x['time']['median_s'] * 1e3:,.0f} | {_pct(x['time']['spread'])} | {x['tokens_per_s']:,.0f} | "
                f"{_pct(x.get('utilisation'))} | {_mib(x.get('peak_memory'))} | {_mib(planned)} | {err} | "
                f"{x['losses'][0]:.4f} | {_num(x.get('first_step_s'), '.2f')} |")
        errors = [x["plan_error"] for x in train if x.get("plan_error") is not None
                  and not (x.get("plan") or {}).get("approximate")]
        if errors:
            worst = max(errors, key=abs)
            lines += ["", f"Memory planner: predicted vs measured peak over {len(errors)} ft-prog cases (compile "
                      f"excluded): mean |error| {sum(abs(e) for e in errors) / len(errors):.1%}, worst {worst:+.1%} "
                      f"(goal: within 15%): {'met' if abs(worst) <= 0.15 else 'NOT met'}. The plan's fixed runtime overhead "
                      "(370 MiB on CPU, measured on the cpu-default shape) over-counts tiny shapes."]
            windowed = short_window_plan_errors(train)
            if windowed:
                from ftprog.programs.plan import HOST_ALLOCATOR_SLACK

                lines[-1] += (" On the CPU the plan is a whole run's peak: it adds the memory the allocator holds over "
                              f"hundreds of steps ({HOST_ALLOCATOR_SLACK:.0%} of the tensor peak), which these few "
                              f"timed steps do not reach; without it: mean |error| "
                              f"{sum(abs(e) for e in windowed) / len(windowed):.1%}, worst "
                              f"{max(windowed, key=abs):+.1%} (`benchmarks.longrun` measures whole runs).")
        kind = train[0].get("peak_memory_kind", "")
        lines += ["", f"Peak memory: {kind} of the worker during the timed steps (weights and optimizer state "
                  "included; the load is excluded). Planned: `ftprog.programs.plan.estimate` for the same case "
                  "(CPU: + runtime overhead). Matmul utilisation: analytic matmul FLOPs of the step (ft-prog: "
                  "output layer on target positions only; transformers, torchtune: every position) / median step "
                  "time / the torch.mm peak at the same dtype and threads.", ""]
        notes = sorted({x["allocator"] for x in r["rows"] if x.get("allocator")})
        if notes:
            lines[-1:-1] = ["", f"Host memory: ft-prog's cases run on the malloc `ft-prog run` picks ({'; '.join(notes)}); "
                            "the baselines on the C library's."]
        lines += time_breakdown_lines(train)
        lines += published_lines(train)

    against_baselines = [sp for sp in r.get("speedups", []) if "hf" in sp or "torchtune" in sp]
    if against_baselines:
        tt = any("torchtune" in sp for sp in against_baselines)
        head = "| case | metric | ft-prog | transformers | speed-up | memory ratio |"
        if tt:
            head += " torchtune | speed-up vs torchtune | memory ratio vs torchtune |"
        lines += ["## ft-prog vs transformers + PEFT" + (" and torchtune" if tt else "") + " (same case)", "",
                  head, "|" + " --- |" * (9 if tt else 6)]
        for sp in against_baselines:
            label = sp["label"] + (f" (theirs: {sp['against']})" if sp.get("against") else "")
            line = (f"| {label} | {sp['metric']} | {sp['ftprog']:,.1f} | {_num(sp.get('hf'), ',.1f')} | "
                    f"{_times(sp.get('speedup'))} | {_num(sp.get('memory_ratio'), '.2f')} |")
            if tt:
                line += (f" {_num(sp.get('torchtune'), ',.1f')} | {_times(sp.get('speedup_torchtune'))} | "
                         f"{_num(sp.get('memory_ratio_torchtune'), '.2f')} |")
            lines.append(line)
        lines += ["", "Speed-up: ft-prog's metric over the baseline's (above 1 = ft-prog faster); memory ratio: "
                  "ft-prog's peak over the baseline's (below 1 = ft-prog uses less).", ""]

    lines += moe_lines(r)
    lines += baseline_tree_lines(r)
    lines += dpo_lines(r)
    lines += grpo_lines(r)
    lines += distill_lines(r)

    if any(not ck["label"].startswith("grpo-") for ck in r.get("loss_checks", [])):  # grpo: in its own section
        lines += ["## Same work? Step-0 loss, same weights and batch", "",
                  "| case | baseline | ft-prog | baseline loss | abs diff | rel diff | ok (tol) | "
                  "step-1 ft-prog / baseline |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for ck in r["loss_checks"]:
            if ck["label"].startswith("grpo-"):  # in the GRPO section
                continue
            other = ck.get("baseline_loss", ck.get("hf_loss"))
            other1 = ck.get("baseline_loss_step1", ck.get("hf_loss_step1"))
            step1 = (f"{ck['ftprog_loss_step1']:.4f} / {other1:.4f}" if "ftprog_loss_step1" in ck else "-")
            lines.append(f"| {ck['label']} | {NAMES.get(ck.get('baseline', 'hf'), ck.get('baseline'))} | "
                         f"{ck['ftprog_loss']:.5f} | {other:.5f} | {ck['abs_diff']:.2e} | "
                         f"{ck['rel_diff']:.2e} | {'yes' if ck['ok'] else 'NO'} ({ck['tolerance']:g}) | {step1} |")
        lines.append("")

    sft = [x for x in rows if x["case"]["kind"] == "sft"]
    if sft:
        w = sft[0]["case"]["workload"]
        lines += ["## Realistic SFT workload", "",
                  f"{w['n']} instruction samples, log-normal lengths (median {w['median']}, sigma {w['sigma']}, cut "
                  f"to [{w['min_len']}, {w['seq_len']}]), prompt ~{w['prompt_frac']:.0%} of each sample (masked), "
                  f"batch {sft[0]['case']['batch']}, LoRA; one epoch timed after {sft[0]['case']['warmup']} warm-up "
                  "batches. Effective tokens = trained (non-padding, non-prompt) tokens.", "",
                  "| system | setting | how | batches | padding | effective tokens/s | real tokens/s | peak mem MiB | "
                  "check loss |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in sft:
            c = x["case"]
            if "error" in x:
                lines.append(f"| {c['system']} | {c['setting']} | {x['error'][:90]} | | | | | | |")
                continue
            lines.append(f"| {c['system']} | {c['setting']} | {x['description']} | {x['batches']} | "
                         f"{_pct(x['padding_share'])} | {x['effective_tokens_per_s']:,.0f} | "
                         f"{x['real_tokens_per_s']:,.0f} | {_mib(x.get('peak_memory'))} | "
                         f"{_num(x.get('check_loss'), '.5f')} |")
        best = {c: max((x["effective_tokens_per_s"] for x in sft if x["case"]["system"] == c and "error" not in x
                        and x["case"]["setting"] == "best"), default=None) for c in NAMES}
        against = [f"{best['ftprog'] / best[b]:.2f}x {NAMES[b]}" for b in ("hf", "torchtune") if best["ftprog"] and best[b]]
        if against:
            lines += ["", f"Best setting against best setting: ft-prog {' and '.join(against)} in effective tokens/s."]
        lines += ["", "Check loss: the loss on the transformers default's first padded batch at the initial weights "
                  "(the same-work check; for transformers' default it is its first loss: see Same work?)."]
        lines.append("")

    gen = [x for x in rows if x["case"]["kind"] == "generate"]
    if gen:
        lines += ["## Generation (greedy, batch 1, same prompt and length, KV cache)", "",
                  "| system | prompt | new tokens | tokens/s | decode tokens/s | prefill ms |",
                  "| --- | --- | --- | --- | --- | --- |"]
        outs = {}
        for x in gen:
            c = x["case"]
            if "error" in x:
                lines.append(f"| {c['system']} | {x['error'][:90]} | | | | |")
                continue
            outs[c["system"]] = x["output"]
            lines.append(f"| {c['system']} | {x['prompt_len']} | {x['new_tokens']} | {x['tokens_per_s']:,.1f} | "
                         f"{x['decode_tokens_per_s']:,.1f} | {x['prefill_s'] * 1e3:,.1f} |")
        if "ftprog" in outs and "hf" in outs:
            a, b = outs["ftprog"], outs["hf"]
            same = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
            lines += ["", f"Greedy outputs agree on the first {same} of {len(b)} tokens."]
        lines.append("")

    st = r.get("startup") or {}
    if st:
        lines += ["## Start-up", "", f"- `ft-prog --help`: {_num(st.get('help_median_s'), '.2f')} s (median of "
                  f"{len(st.get('help_s', []))})"]
        for i, d in enumerate(st.get("demo") or []):
            lines.append(f"- demo (`ft-prog run sft --config demo max_steps=1`), run {i + 1}: first training step "
                         f"after {_num(d['first_step_s'], '.2f')} s, process done after {d['total_s']:.2f} s"
                         + (f" (exit {d['returncode']}: {d['error']})" if d.get("returncode") else ""))
        lines.append("")

    tt = r.get("torchtune") or {}
    tt_rows = [x for x in rows if x["case"]["system"] == "torchtune" and "error" not in x]
    adapter = next((x.get("adapter_dtype") for x in tt_rows if x.get("adapter_dtype")), None)
    if tt_rows:
        kinds = sorted({x["case"]["kind"] for x in tt_rows})
        what = {"train": "fixed-shape train cases (lora, full; base and checkpoint stacks)",
                "sft": "the realistic SFT workload (default: unpacked `padded_collate_sft` batches; best: "
                       "`PackedDataset` + `padded_collate_packed`)"}
        tt_line = (f"measured above: torchtune {tt.get('version')} (torch {tt.get('torch')}, interpreter "
                   f"`{tt.get('python')}`), {' and '.join(what[k] for k in kinds if k in what)}, "
                   "built as its single-device recipes build the model: `llama3` / `lora_llama3` "
                   "component builders in the model dtype, `hf_to_tune` weights from the same checkpoint, "
                   "`set_num_output_chunks(8)` + `CEWithChunkedOutputLoss`, `set_activation_checkpointing` "
                   "on `TransformerSelfAttentionLayer`; `torch.optim.AdamW(fused=True)` + `clip_grad_norm_` as "
                   "for transformers. Its output layer computes every position's logits (in 8 chunks).")
        if adapter:
            tt_line += (f" torchtune keeps LoRA adapters (and so their gradients and AdamW moments) in the model "
                        f"dtype ({adapter}); PEFT and ft-prog keep them in fp32.")
    elif tt.get("available"):
        tt_line = (f"available ({tt.get('version')}), not measured" + (": run with --torchtune-python PATH"
                                                                          if not tt.get("cases") else ""))
    else:
        tt_line = "skipped" if tt.get("skipped") else f"{tt.get('reason')}. {tt.get('note', '')}"
    hf = "measured above" if any(x["case"]["system"] == "hf" for x in rows) else "not in this run"
    lines += ["## Baselines", "", f"- transformers + PEFT: {hf}.",
              "- TRL: measured above (" + ", ".join(sorted({x["case"]["kind"].upper() for x in rows
                                                           if x["case"]["system"] == "trl"})) + ")."
              if any(x["case"]["system"] == "trl" for x in rows) else None,
              "- torchtune: " + tt_line,
              "- transformers QLoRA: unavailable (needs bitsandbytes 4-bit layers: not installed, no CPU kernels)."
              if any(x["case"].get("method") == "qlora" and x["case"]["system"] == "hf" for x in rows) else "", ""]
    return "\n".join(line for line in lines if line is not None)


def moe_lines(r: dict[str, Any]) -> list[str]:
    """The mixture-of-experts section (preset ``moe``): the shape, how each system computes the experts, ft-prog
    against transformers + PEFT per case, and issue 16's target."""
    from benchmarks.flops import moe_shape
    from benchmarks.harness import MOE_TARGET

    configs = r.get("model_configs", {})
    rows = [x for x in r["rows"] if x["case"]["kind"] == "train"
            and moe_shape(configs.get(f"{x['case']['shape']}-{x['case']['dtype']}", {}))]
    if not rows:
        return []
    c = rows[0]["case"]
    cfg = configs[f"{c['shape']}-{c['dtype']}"]
    experts, top_k, width, sparse = moe_shape(cfg)
    impl = next((x.get("experts_implementation") for x in rows if x.get("experts_implementation")), None)
    params = {x["case"]["system"]: x.get("trainable_params") for x in rows if "error" not in x}
    lines = ["## Mixture of experts (issue 16)", "",
             f"Shape `{c['shape']}`: {cfg['model_type']}, {len(sparse)} sparse layers of {experts} experts, top-{top_k}, "
             f"expert width {width}, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}. LoRA r={c['rank']} on "
             f"{', '.join(c['targets'])}: both systems start from ft-prog's initial adapter (one per expert projection; "
             "PEFT fuses them into adapters of transformers' 3-D expert tensors, the gate and up ones into one of rank "
             f"2r). Trainable parameters: ft-prog {_num(params.get('ftprog'))}, transformers "
             f"{_num(params.get('hf'))}. Cross-entropy only (no router loss) in both. transformers computes the "
             f"experts with `experts_implementation={impl!r}`; ft-prog sorts the (token, expert) pairs by expert and "
             "runs each expert's base projections over its slice (padded on the CPU to a multiple of a row block), "
             "every expert's adapters of a projection together in two matmuls "
             "(`ftprog.core._decoder.grouped_experts`, `ftprog.core.grouped_linear`).", ""]
    for sp in r.get("speedups", []):
        if "hf" not in sp or not any(sp["label"] == x["label"] for x in rows):
            continue
        speed = sp.get("paired_speedup", sp["speedup"])
        lines += [f"**ft-prog against transformers + PEFT** ({sp['label']}): tokens/s {sp['speedup']:.2f}x (median "
                  f"step), {_times(sp.get('paired_speedup'))} round by round, {_times(sp.get('fastest_step_speedup'))} "
                  f"fastest steps; peak memory {_num(sp.get('memory_ratio'), '.2f')}x. Issue 16's target: >= "
                  f"{MOE_TARGET['speedup']}x tokens/s ({'met' if speed >= MOE_TARGET['speedup'] else 'NOT met'}).", ""]
    return lines


def short_window_plan_errors(train: list[dict[str, Any]]) -> list[float]:
    """The CPU cases' plan errors without the plan's whole-run allocator slack (a few timed steps' peak)."""
    from ftprog.programs.plan import HOST_ALLOCATOR_SLACK

    out = []
    for x in train:
        plan, c = x.get("plan") or {}, x["case"]
        if x.get("plan_error") is None or plan.get("approximate") or c["device"].startswith("cuda"):
            continue
        out.append((plan["peak"] - HOST_ALLOCATOR_SLACK * plan["tensor_peak"]) / x["peak_memory"] - 1)
    return out


def dpo_lines(r: dict[str, Any]) -> list[str]:
    """The DPO section: each system's step, ft-prog against TRL, and the issue's target."""
    from benchmarks.harness import DPO_TARGET

    rows = [x for x in r["rows"] if x["case"]["kind"] == "dpo"]
    if not rows:
        return []
    c, w = rows[0]["case"], rows[0]["case"]["workload"]
    trl = next((x.get("trl_version") for x in rows if x.get("trl_version")), None)
    lines = ["## DPO step (LoRA) against TRL's DPOTrainer", "",
             f"Shape `{c['shape']}`, {c['dtype']}, {c['threads'] or 'default'} thread(s); batches of {c['batch']} "
             f"preference pairs (chosen and rejected rows in one forward: {2 * c['batch']} rows, right-padded to the "
             f"batch's longest), random tokens, log-normal lengths (prompt median {w['prompt_median']}, responses "
             f"median {w['response_median']}, sigma {w['sigma']}; prompt + response <= max length {c['seq']}, so "
             f"nothing is truncated), in ft-prog's shuffled order for both systems. Sigmoid DPO, beta {c['beta']}; "
             f"LoRA r={c['rank']} alpha={2 * c['rank']} on {', '.join(c['targets'])}, same A matrices, B zero, no "
             "dropout; the reference is the model with its adapters off, computed under no_grad every step; "
             "AdamW lr 1e-4 constant, no weight decay, clipping 1.0. TRL: `trl.DPOTrainer`"
             + (f" {trl}" if trl else "") + " with a PEFT `LoraConfig`, `precompute_ref_log_probs=False`, no "
             "gradient checkpointing (stack `checkpoint`: activation checkpointing in both, TRL's default), no "
             "autocast (model in its dtype). "
             f"{c['warmup']} warm-up + {c['steps']} timed steps per process; tokens = real (non-padding) tokens of "
             "the chosen and rejected rows.", "",
             "| system | stack | step ms (median) | spread | tokens/s (median of runs) | tokens/s of each run | "
             "best-steps tokens/s | peak mem MiB | of which before the steps | loss at steps 0, 1, 2 | "
             "tokens / padded cells per step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        if "error" in x:
            lines.append(f"| {x['case']['system']} | {'+'.join(x['case']['stack']) or '-'} | {x['error'][:120]} |"
                         + " |" * 8)
            continue
        cells = ", ".join(f"{a}/{b}" for a, b in zip(x["step_tokens"], x["step_cells"]))
        lines.append(f"| {NAMES.get(x['case']['system'], x['case']['system'])} | {'+'.join(x['case']['stack']) or '-'} | "
                     f"{x['time']['median_s'] * 1e3:,.0f} | "
                     f"{_pct(x['time']['spread'])} | {x['tokens_per_s']:,.0f} | "
                     f"{', '.join(f'{v:,.0f}' for v in x['tokens_per_s_runs'])} | {x['best_tokens_per_s']:,.0f} | "
                     f"{_mib(x.get('peak_memory'))} | {_mib(x.get('rss_before_steps'))} | {', '.join(f'{v:.6f}' for v in x['losses'][:3])} | {cells} |")
    lines += ["", "tokens/s of each run: the timed steps' tokens over their time in that process; best steps: every "
              "step at its fastest over the runs (all runs train the same batches; a busy machine only adds time). "
              "Peak memory: the process's peak RSS over the warm-up and timed steps (weights, imports and optimizer "
              "state included; loading excluded), the largest over the runs; of which before the steps: its RSS "
              "just before the first step (libraries, weights, adapters; TRL: its optimizer object too), so the "
              "difference is what the steps themselves add."
              + (" ft-prog runs on the malloc `ft-prog run dpo` picks; TRL on the C library's."
                 if any(x.get("allocator") for x in rows) else ""),
              "", "Losses: in bf16 one update moves the loss by less than the rounding of the summed log-probs, so "
              "the two systems' losses after step 0 differ by rounding (an fp32 run shows them agree; see "
              "benchmarks/README.md).", ""]
    for sp in r.get("speedups", []):
        if "trl" not in sp or not sp["label"].startswith("dpo-"):
            continue
        speed, mem = sp.get("paired_speedup_trl", sp["speedup_trl"]), sp.get("memory_ratio_trl")
        ok_speed = speed >= DPO_TARGET["speedup"]
        ok_mem = mem is not None and mem <= DPO_TARGET["memory_ratio"]
        lines += [f"**ft-prog against TRL** ({sp['label']}): tokens/s {sp['speedup_trl']:.2f}x (median of runs), "
                  f"{_times(sp.get('paired_speedup_trl'))} round by round, {_times(sp.get('fastest_step_speedup_trl'))}"
                  f" best steps; peak memory {_num(mem, '.2f')}x. Issue 17's target: >= {DPO_TARGET['speedup']}x "
                  f"tokens/s ({'met' if ok_speed else 'NOT met'}), <= {DPO_TARGET['memory_ratio']}x peak memory "
                  f"({'met' if ok_mem else 'NOT met'}).", ""]
    lines += time_breakdown_lines(rows, "### Where the DPO step's time goes")
    for x in rows:
        top = (x.get("time_breakdown") or {}).get("top_ops")
        if top:
            lines.append(f"- {NAMES.get(x['case']['system'], x['case']['system'])} "
                         f"({'+'.join(x['case']['stack']) or 'base'}), most time: "
                         + ", ".join(f"`{o['op']}` {o['s'] * 1e3:,.0f} ms ({o['calls']} calls)" for o in top[:6]))
    return lines + [""]


def distill_lines(r: dict[str, Any]) -> list[str]:
    """The distillation section: the chunked KD step against the same loss from both models' full logits."""
    rows = [x for x in r["rows"] if x["case"]["kind"] == "distill"]
    if not rows:
        return []
    c, w = rows[0]["case"], rows[0]["case"]["workload"]
    ok = [x for x in rows if "error" not in x]
    sizes = (f"student {ok[0]['params'] / 1e6:,.1f}M parameters, teacher {ok[0]['teacher_params'] / 1e6:,.1f}M "
             f"({ok[0]['teacher_params'] / ok[0]['params']:.1f}x: hidden {ok[0]['teacher_hidden']}, "
             f"{ok[0]['teacher_layers']} layers, same vocabulary)" if ok else "")
    lines = ["## Distillation step (offline KD, LoRA student)", "",
             f"Shape `{c['shape']}` as the student, {sizes}; {c['dtype']}, {c['threads'] or 'default'} thread(s). "
             f"Packed rows of {c['batch']} x {c['seq']} tokens from an SFT workload (log-normal lengths, median "
             f"{w['median']}, prompts masked); loss = {1 - c['kd_ratio']:g} CE + {c['kd_ratio']:g} "
             f"{c['divergence']} (temperature 1); LoRA r={c['rank']} on {', '.join(c['targets'])}, AdamW lr 1e-4, "
             f"clipping 1.0. `chunked`: `ft-prog run distill`'s loss (both output layers chunk by chunk over the "
             "target positions); `full-logits`: the same loss from both models' whole-batch logits. "
             f"{c['warmup']} warm-up + {c['steps']} timed steps per process; tokens = real tokens.", "",
             "| variant | step ms (median) | spread | tokens/s (median of runs) | peak mem MiB | of which before the "
             "steps | added by the steps MiB | loss at steps 0, 1, 2 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        if "error" in x:
            lines.append(f"| {x['case']['variant']} | {x['error'][:120]} |" + " |" * 6)
            continue
        lines.append(f"| {x['case']['variant']} | {x['time']['median_s'] * 1e3:,.0f} | {_pct(x['time']['spread'])} | "
                     f"{x['tokens_per_s']:,.0f} | {_mib(x.get('peak_memory'))} | {_mib(x.get('rss_before_steps'))} | "
                     f"{_mib(x.get('step_memory'))} | {', '.join(f'{v:.6f}' for v in x['losses'][:3])} |")
    by = {x["case"]["variant"]: x for x in ok}
    if {"chunked", "full-logits"} <= by.keys() and by["full-logits"].get("step_memory"):
        a, b = by["chunked"], by["full-logits"]
        lines += ["", f"**Chunked against full logits**: peak memory {_num(a['peak_memory'] / b['peak_memory'], '.2f')}x"
                  f" (what the steps add: {_num(a['step_memory'] / b['step_memory'], '.2f')}x), tokens/s "
                  f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x."]
    return lines + [""]


def grpo_lines(r: dict[str, Any]) -> list[str]:
    """The rollout and GRPO sections: sampled generation against transformers, the GRPO step against TRL's
    GRPOTrainer, the same-work checks and the issue's target."""
    from benchmarks.harness import GRPO_TARGET

    lines: list[str] = []
    roll = [x for x in r["rows"] if x["case"]["kind"] == "rollout"]
    if roll:
        c, w = roll[0]["case"], roll[0]["case"]["workload"]
        lines += ["## Rollouts: batched sampled generation against transformers' generate", "",
                  f"Shape `{c['shape']}`, {c['dtype']}, {c['threads'] or 'default'} thread(s); {w['n']} prompts of "
                  f"random tokens, log-normal lengths (median {w['median']}, sigma {w['sigma']}, in [{w['min_len']}, "
                  f"{w['max_len']}]), left-padded into one batch; {c['new_tokens']} new tokens each, temperature "
                  f"{c['temperature']}, top-p {c['top_p']}, no top-k, KV cache, no stop token (transformers: "
                  "`eos_token_id=None`, `min_new_tokens = max_new_tokens`). ft-prog: `generate(..., "
                  "return_logprobs=True)` as `ft-prog run grpo` samples; transformers: `model.generate(do_sample=True)` "
                  f"as TRL's native generation calls it. {c['warmup']} warm-up + {c['repeats']} timed generations "
                  "per process.", "",
                  "| system | rows x new tokens | generated tokens/s (median) | each run's median | best | "
                  "peak mem MiB | of which before |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for x in roll:
            if "error" in x:
                lines.append(f"| {x['case']['system']} | {x['error'][:120]} |" + " |" * 5)
                continue
            lines.append(f"| {NAMES.get(x['case']['system'], x['case']['system'])} | {x['rows']} x "
                         f"{x['generated'][0] // max(x['rows'], 1)} | {x['tokens_per_s']:,.0f} | "
                         f"{', '.join(f'{v:,.0f}' for v in x['tokens_per_s_runs'])} | {x['best_tokens_per_s']:,.0f} | "
                         f"{_mib(x.get('peak_memory'))} | {_mib(x.get('rss_before_steps'))} |")
        lines.append("")
        for sp in r.get("speedups", []):
            if sp["label"].startswith("rollout-") and "hf" in sp:
                lines += [f"**ft-prog against transformers** (rollout): generated tokens/s {sp['speedup']:.2f}x "
                          f"(median), {_times(sp.get('paired_speedup'))} round by round, "
                          f"{_times(sp.get('fastest_step_speedup'))} best; peak memory "
                          f"{_num(sp.get('memory_ratio'), '.2f')}x.", ""]
    rows = [x for x in r["rows"] if x["case"]["kind"] == "grpo"]
    if not rows:
        return lines
    c, w = rows[0]["case"], rows[0]["case"]["workload"]
    trl = next((x.get("trl_version") for x in rows if x.get("trl_version")), None)
    lines += ["## GRPO step (LoRA) against TRL's GRPOTrainer", "",
              f"Shape `{c['shape']}`, {c['dtype']}, {c['threads'] or 'default'} thread(s); each step {c['prompts']} "
              f"prompts x {c['group']} completions of {c['new_tokens']} tokens (temperature {c['temperature']}, "
              f"top-p {c['top_p']}, no stop token), prompts of random tokens (log-normal lengths, median "
              f"{w['median']}), the same prompts in the same order in both. Reward: the mean of (id mod 7) / 6 over "
              "the completion's tokens; advantages normalised by the group's std; loss `grpo` (token mean per "
              f"sequence, mean over sequences), epsilon 0.2, beta 0, num_iterations 1; LoRA r={c['rank']} "
              f"alpha={2 * c['rank']} on {', '.join(c['targets'])}, same A, B zero; AdamW lr 1e-4 constant, no weight "
              "decay, clipping 1.0. ft-prog: `sample_and_score` + `value_and_grad(step_loss)` + `apply_gradients` "
              "as `programs/grpo.py` runs them. TRL: `trl.GRPOTrainer`" + (f" {trl}" if trl else "") + " with a PEFT "
              "`LoraConfig`, native transformers generation (no vLLM), no gradient checkpointing, no autocast. "
              f"{c['warmup']} warm-up + {c['steps']} timed steps per process. Step time: sampling + scoring + "
              "training + optimizer step; tokens = generated completion tokens.", "",
              "| system | step ms (median) | rollout ms | of which generate | training ms | spread | "
              "tokens/s (median of runs) | each run | best steps | peak mem MiB | of which before | "
              "rows / prompt tokens / completion tokens per step |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        if "error" in x:
            lines.append(f"| {x['case']['system']} | {x['error'][:120]} |" + " |" * 10)
            continue
        counts = ", ".join(f"{a}/{b}/{t}" for a, b, t in zip(x["step_rows"], x["step_prompt_tokens"],
                                                              x["step_completion_tokens"]))
        gen = f"{x['generate_median_s'] * 1e3:,.0f}" if x.get("generate_median_s") else "-"
        lines.append(f"| {NAMES.get(x['case']['system'], x['case']['system'])} | {x['time']['median_s'] * 1e3:,.0f} | "
                     f"{x['rollout_median_s'] * 1e3:,.0f} | {gen} | {x['train_median_s'] * 1e3:,.0f} | "
                     f"{_pct(x['time']['spread'])} | {x['tokens_per_s']:,.0f} | "
                     f"{', '.join(f'{v:,.0f}' for v in x['tokens_per_s_runs'])} | {x['best_tokens_per_s']:,.0f} | "
                     f"{_mib(x.get('peak_memory'))} | {_mib(x.get('rss_before_steps'))} | {counts} |")
    lines += ["", "Rollout: sampling, rewards, advantages and the training rows (ft-prog: `sample_and_score`; TRL: "
              "`_generate_and_score_completions`); of which generate: the generation call alone (TRL's `_generate`); "
              "training: the rest of the step (forward, backward, clipping, AdamW). Peak memory as in the DPO "
              "section: peak RSS from just before the first step, the largest over the runs.", ""]
    for ck in r.get("loss_checks", []):
        if not ck["label"].startswith("grpo-"):
            continue
        on = ck.get("on_trl_rollout") or {}
        lines += [f"**Same work?** Rows, prompt and completion tokens per step: "
                  f"{'identical' if ck.get('same_tokens') else 'DIFFERENT'} (completions themselves differ: other RNG "
                  f"paths). Loss definitions: ft-prog's step 0 on TRL's own step-0 rollout and advantages (same "
                  f"initial weights, every ratio 1): loss {_num(on.get('ftprog_loss'), '.3g')} vs TRL's "
                  f"{_num(on.get('trl_loss'), '.3g')}, clipped LoRA gradient norm "
                  f"{_num(on.get('ftprog_clipped_grad_norm'), '.6g')} vs {_num(on.get('trl_clipped_grad_norm'), '.6g')}, "
                  f"relative L2 difference of the gradients {_num(on.get('grad_rel_diff'), '.2e')} "
                  f"({'ok' if ck['ok'] else 'NOT ok'}, tolerance {ck.get('grad_tolerance', ck['tolerance']):g}).", ""]
    for sp in r.get("speedups", []):
        if "trl" not in sp or not sp["label"].startswith("grpo-"):
            continue
        speed, mem = sp.get("paired_speedup_trl", sp["speedup_trl"]), sp.get("memory_ratio_trl")
        ok_speed, ok_mem = speed >= GRPO_TARGET["speedup"], mem is not None and mem <= GRPO_TARGET["memory_ratio"]
        lines += [f"**ft-prog against TRL** ({sp['label']}): step speed (tokens per second of step time) "
                  f"{sp['speedup_trl']:.2f}x (median of runs), {_times(sp.get('paired_speedup_trl'))} round by round, "
                  f"{_times(sp.get('fastest_step_speedup_trl'))} best steps; peak memory {_num(mem, '.2f')}x. Issue "
                  f"18's target: >= {GRPO_TARGET['speedup']}x step speed ({'met' if ok_speed else 'NOT met'}), <= "
                  f"{GRPO_TARGET['memory_ratio']}x peak memory ({'met' if ok_mem else 'NOT met'}).", ""]
    lines += time_breakdown_lines(rows, "### Where the GRPO step's time goes")
    for x in rows:
        top = (x.get("time_breakdown") or {}).get("top_ops")
        if top:
            lines.append(f"- {NAMES.get(x['case']['system'], x['case']['system'])}, most time: "
                         + ", ".join(f"`{o['op']}` {o['s'] * 1e3:,.0f} ms ({o['calls']} calls)" for o in top[:6]))
    return lines + [""]


def chart(r: dict[str, Any], path: Path) -> Path | None:
    """Bars: training tokens/s, peak memory (measured vs planned), SFT effective tokens/s, generation tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in r["rows"] if "error" not in x]
    train = [x for x in rows if x["case"]["kind"] == "train"]
    sft = [x for x in rows if x["case"]["kind"] == "sft"]
    gen = [x for x in rows if x["case"]["kind"] == "generate"]
    colors = {"ftprog": "#1f77b4", "hf": "#ff7f0e", "torchtune": "#9467bd", "ftprog-base": "#7f7f7f"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))

    def label(x: dict) -> str:
        c = x["case"]
        if c["kind"] == "train":
            return f"{c['method']}{'+' + '+'.join(c['stack']) if c['stack'] else ''}\n{c['dtype']} t{c['threads'] or '-'}"
        if c["kind"] == "sft":
            return f"{c['setting']}"
        return c["system"]

    ax = axes[0][0]
    if train:
        ys = [x["tokens_per_s"] for x in train]
        lo = [x["tokens_per_s"] - x["tokens_per_s"] * x["time"]["median_s"] / x["time"]["p90_s"] for x in train]
        hi = [x["tokens_per_s"] * x["time"]["median_s"] / x["time"]["p10_s"] - x["tokens_per_s"] for x in train]
        ax.bar(range(len(train)), ys, color=[colors[x["case"]["system"]] for x in train], yerr=[lo, hi], capsize=3)
        ax.set_xticks(range(len(train)), [label(x) for x in train], fontsize=7, rotation=45, ha="right")
    from matplotlib.patches import Patch

    handles = [Patch(color=colors["ftprog"], label="ft-prog"), Patch(color=colors["hf"], label="transformers + PEFT")]
    for system in ("torchtune", "ftprog-base"):
        if any(x["case"]["system"] == system for x in train):
            handles.append(Patch(color=colors[system], label=NAMES[system]))
    ax.legend(handles=handles, fontsize=8)
    ax.set_title("training tokens/s (whiskers: p10-p90 of step time)")
    ax.set_ylabel("tokens/s")

    ax = axes[0][1]
    if train:
        xs = range(len(train))
        ax.bar([i - 0.2 for i in xs], [(x.get("peak_memory") or 0) / 2**20 for x in train], width=0.4,
               color=[colors[x["case"]["system"]] for x in train], label="measured")
        cuda = r["settings"]["device"].startswith("cuda")
        planned = [((x.get("plan") or {}).get("tensor_peak" if cuda else "peak") or 0) / 2**20 for x in train]
        ax.bar([i + 0.2 for i in xs], planned, width=0.4, color="#2ca02c", label="planned (ft-prog)")
        ax.set_xticks(list(xs), [label(x) for x in train], fontsize=7, rotation=45, ha="right")
        ax.legend(fontsize=8)
    ax.set_title("peak memory, MiB " + ("(max_memory_allocated)" if r["settings"]["device"].startswith("cuda")
                                        else "(peak RSS)"))

    ax = axes[1][0]
    if sft:
        ax.bar(range(len(sft)), [x["effective_tokens_per_s"] for x in sft],
               color=[colors[x["case"]["system"]] for x in sft])
        ax.set_xticks(range(len(sft)), [f"{x['case']['system']}\n{x['case']['setting']}" for x in sft], fontsize=8)
    ax.set_title("realistic SFT: effective (trained) tokens/s")

    ax = axes[1][1]
    if gen:
        ax.bar(range(len(gen)), [x["tokens_per_s"] for x in gen], color=[colors[x["case"]["system"]] for x in gen])
        ax.set_xticks(range(len(gen)), [x["case"]["system"] for x in gen])
    ax.set_title("greedy generation tokens/s (batch 1)")

    m = r["machine"]
    fig.suptitle(f"ft-prog benchmark {r['name']}: {r['settings']['shape']} on {m.get('gpu') or m.get('cpu')} "
                 f"(torch {m.get('torch')}, load {m.get('load_average')})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
