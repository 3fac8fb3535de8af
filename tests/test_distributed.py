"""`ft-prog run --nproc 2 sft`: 2 gloo processes against 1; sharded (torch.distributed.checkpoint) checkpoints:
bitwise exact resume with 2 processes, re-sharded resume with 1 (and the reverse), clear errors for damaged ones
and for a save that fails on one rank; a rank that dies or hangs."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
import torch
from safetensors.torch import load_file

from _sft_fixtures import build_model_folder, reverse_rows, write_config, write_jsonl

CLI = [sys.executable, "-c", "from ftprog.programs.cli import main; main()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return build_model_folder(root / "model"), write_jsonl(root / "train.jsonl", reverse_rows(32))


def config(tmp_path, assets, name="out"):
    model, data = assets
    return write_config(tmp_path / f"{name}.toml", model, data, tmp_path / name)


def run(cfg, *overrides, nproc=1, timeout=300):
    args = [*CLI, "run", *(["--nproc", str(nproc)] if nproc > 1 else []), "sft", "--config", str(cfg), *overrides]
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(orjson.loads, (out / "metrics.jsonl").read_bytes().splitlines()) if "loss" in r]


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    folder = out / "final"
    file = folder / ("adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists()
                     else "model.safetensors")
    return load_file(file)


def assert_close(a, b, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).norm() <= rtol * b[k].float().norm() + 1e-7, k


COMMON = ["max_steps=4", "save_every=2", "keep_last=5", "batch_size=4", "packing=true"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, assets):
    """``get(method, nproc, *overrides) -> (output folder, stdout)`` of an uninterrupted 4-step run (checkpoint at
    step 2), run once per module and shared by the tests that compare against it."""
    done = {}

    def get(method: str, nproc: int, *overrides: str) -> tuple[Path, str]:
        if (method, nproc, overrides) not in done:
            root = tmp_path_factory.mktemp(f"{method}-{nproc}")
            result = run(config(root, assets), f"peft.method={method}", *COMMON, *overrides, nproc=nproc)
            done[method, nproc, overrides] = root / "out", result.stdout
        return done[method, nproc, overrides]

    return get


def resume_copy(tmp_path, assets, checkpoint: Path, method: str, nproc: int, *overrides: str) -> Path:
    """Re-run to the end in a fresh folder holding only ``checkpoint`` (what a run killed after saving it leaves)."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(checkpoint, out / checkpoint.name)
    result = run(config(tmp_path, assets, "resumed"), f"peft.method={method}", *COMMON, *overrides, nproc=nproc)
    assert f"resumed from {out / checkpoint.name} (step 2)" in result.stdout, result.stdout
    return out


@pytest.mark.parametrize("method", ["none", "lora", "qlora"])
def test_two_processes_equal_one(method, finished):
    (one, one_log), (two, two_log) = finished(method, 1), finished(method, 2)
    assert "resumed" not in one_log + two_log
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    assert_close(final_tensors(two), final_tensors(one))  # the final output is consolidated: full tensors
    assert orjson.loads((two / "summary.json").read_bytes())["processes"] == 2


@pytest.mark.parametrize("method,overrides", [("none", ()), ("lora", ("peft.dropout=0.1",))])
def test_two_process_resume_is_bitwise_exact(method, overrides, tmp_path, assets, finished):
    """Each rank's RNG (LoRA dropout masks), the moments and the shards come back exactly."""
    whole, _ = finished(method, 2, *overrides)
    resumed = resume_copy(tmp_path, assets, whole / "step_2", method, 2, *overrides)
    assert losses(resumed) == losses(whole)[2:]
    a, b = final_tensors(resumed), final_tensors(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_with_another_process_count(first, second, tmp_path, assets, finished):
    """A sharded (DCP) checkpoint re-shards into one process; a one-process checkpoint splits over two."""
    whole, _ = finished("lora", first)
    assert (whole / "step_2" / ("distributed" if first > 1 else "model")).is_dir()
    resumed = resume_copy(tmp_path, assets, whole / "step_2", "lora", nproc=second)
    assert_close(final_tensors(resumed), final_tensors(whole))
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(losses(resumed), losses(whole)[2:]))


def test_two_process_checkpoint_is_sharded_by_both_ranks(finished):
    from torch.distributed.checkpoint import FileSystemReader

    out, _ = finished("lora", 2)
    step = out / "step_2"
    assert sorted(p.name for p in step.iterdir()) == [
        "config.toml", "distributed", "rng_0.safetensors", "rng_1.safetensors", "state.json"]
    assert sorted(p.name for p in (step / "distributed").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    metadata = FileSystemReader(str(step / "distributed")).read_metadata()
    files: dict[str, set] = {}
    for index, info in metadata.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    adapter = {k for k in metadata.state_dict_metadata if k.startswith("model.")}
    moments = {k for k in metadata.state_dict_metadata if k.startswith("optimizer.exp_avg")}
    assert adapter and moments and "optimizer.count" in metadata.state_dict_metadata
    assert all(".lora_" in k for k in adapter)  # only the trained leaves
    for key in adapter | moments:  # every leaf and moment is split: half written by each rank
        assert files[key] == {"__0_0.distcp", "__1_0.distcp"}, key
        shape = metadata.state_dict_metadata[key].size
        assert [c.sizes[0] for c in metadata.state_dict_metadata[key].chunks] == [shape[0] // 2] * 2, key


def run_in_process(cfg: Path, *overrides: str) -> None:
    from ftprog.programs import sft
    from ftprog.programs.cli import CONFIG_DIR
    from ftprog.programs.config import load_config

    sft.run(*load_config(sft.CONFIG, cfg, list(overrides), builtin_dir=CONFIG_DIR / "sft"))


@pytest.mark.parametrize("damage,error", [pytest.param(d, e, id=d) for d, e in [
    ("no shard", r"no intact checkpoint to resume from in .*out: .*step_2/distributed/__1_0.distcp: damaged "
                 r"\(missing\)"),
    ("torn shard", r"no intact checkpoint .*step_2/distributed/__1_0.distcp: damaged \(\d+ bytes, the metadata lists"),
    ("no metadata", r"no intact checkpoint .*checkpoint .*step_2 is incomplete"),
    ("other method", r"checkpoint .*step_2/distributed does not match .*missing \['model\.model\.embed_tokens"),
    ("other rank", r"checkpoint .*step_2/distributed does not match .*lora_A.weight is torch.float32\[4, 256\], "
                   r"this run has torch.float32\[8, 256\]"),
]])
def test_bad_sharded_checkpoint_names_the_folder(damage, error, tmp_path, assets, finished):
    """Damage is found before the model loads; a checkpoint of another model shape, resumed on purpose
    (resume_allow_changes), fails on loading with the mismatch named."""
    from ftprog.core import CheckpointError
    from ftprog.programs.run_guard import RunError

    out = tmp_path / "out"
    shutil.copytree(finished("lora", 2)[0] / "step_2", out / "step_2")
    shards = out / "step_2" / "distributed"
    if damage == "torn shard":
        (shards / "__1_0.distcp").write_bytes((shards / "__1_0.distcp").read_bytes()[:100])
    elif damage in ("no shard", "no metadata"):
        (shards / ("__1_0.distcp" if damage == "no shard" else ".metadata")).unlink()
    allowed = 'resume_allow_changes=["peft.*"]'
    overrides = {"other method": ["peft.method=none", allowed],
                 "other rank": ["peft.method=lora", "peft.rank=8", allowed]}
    with pytest.raises(CheckpointError if damage.startswith("other") else RunError, match=error):
        run_in_process(config(tmp_path, assets), *overrides.get(damage, ["peft.method=lora"]), *COMMON)


SLOW_SFT = Path(__file__).parent / "_slow_sft.py"


def test_sigterm_saves_on_every_rank_exits_143_and_resumes_exactly(tmp_path, assets, finished):
    """SIGTERM to `ft-prog run --nproc 2` (what SLURM / Kubernetes send before a kill) reaches both workers through
    torchrun; they agree on a step, save a sharded checkpoint and exit 143; re-running ends bit for bit as the
    uninterrupted 2-process run."""
    whole, _ = finished("lora", 2)
    out = tmp_path / "out"
    launcher = subprocess.Popen([sys.executable, str(SLOW_SFT), "run", "--nproc", "2", "sft", "--config",
                                 str(config(tmp_path, assets)), "peft.method=lora", *COMMON],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # step 1 is done, each later one takes a second
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, stderr[-3000:]
    assert "interrupted (SIGTERM): saved" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("SIGTERM: saving a checkpoint after this step") == 2, stderr[-3000:]  # both ranks
    saved = [p.name for p in out.glob("step_*")]
    assert saved and sorted(p.name for p in (out / saved[-1] / "distributed").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (out / "final").exists()

    result = run(config(tmp_path, assets), "peft.method=lora", *COMMON, nproc=2)
    assert "resumed from" in result.stdout
    assert losses(out) == losses(whole)
    a, b = final_tensors(out), final_tensors(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FAILING_SAVE = Path(__file__).parent / "_failing_save.py"


def test_failed_save_on_one_rank_keeps_previous_checkpoint(tmp_path, assets):
    """Rank 1's disk is full when step_4's shards are written: both ranks stop with an error, step_2 stays whole."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           str(FAILING_SAVE), "step_4", "run", "sft", "--config", str(config(tmp_path, assets)),
           "peft.method=lora", "max_steps=6", "save_every=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0
    assert f"could not save checkpoint {out / 'step_4'}" in result.stderr, result.stderr[-3000:]
    assert "rank 1: OSError: [Errno 28] No space left on device" in result.stderr and f"{out / 'step_2'} is untouched" in result.stderr
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == ["step_2"]
    assert (out / "step_2" / "distributed" / ".metadata").is_file()


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's workers (read from their environment)."""
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "LOCAL_RANK" in env and child.name().startswith("python"):
            found[int(env["RANK"])] = child.pid
    return found


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_failed_rank_ends_the_job(fault, tmp_path, assets):
    cfg = config(tmp_path, assets)
    args = [*CLI, "run", "--nproc", "2", "sft", "--config", str(cfg), "peft.method=lora", "max_steps=100000",
            "save_every=1"]
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**ENV, "FTPROG_DIST_TIMEOUT": "8"})
    deadline = time.time() + 240
    while not list((tmp_path / "out").glob("step_*")) and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.5)
    pids = worker_pids(launcher)
    assert launcher.poll() is None and set(pids) == {0, 1}, launcher.stderr.read() if launcher.poll() else pids
    os.kill(pids[1], signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
    start = time.time()
    try:
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if fault == "hangs" and psutil.pid_exists(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    assert launcher.returncode != 0
    assert time.time() - start < 120
    # torchrun's summary names each rank's end; "Root Cause" is the first to fail.
    assert "Failures:" in stderr and "Root Cause (first observed failure):" in stderr, stderr[-3000:]
    failures, root = stderr.split("Failures:")[-1].split("Root Cause (first observed failure):")
    killed = r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9 \(pid: \d+\)\s*\(SIGKILL\)"
    if fault == "dies":
        assert re.search(killed, root), stderr[-3000:]
    else:  # rank 0 gives up on the stopped rank 1 after FTPROG_DIST_TIMEOUT (8 s); torchrun then kills rank 1
        assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 1 ", root), stderr[-3000:]
        assert re.search(killed, failures), stderr[-3000:]  # (gloo's own words for the timeout vary)
    assert list((tmp_path / "out").glob("step_*"))  # the last complete checkpoint is kept for a re-run
    # the surviving rank says what happened in one line, not "a bug in ft-prog" with a traceback
    assert "rank 0: " in stderr and "lost contact with another process of this run" in stderr, stderr[-3000:]
    assert "this is a bug in ft-prog" not in stderr


def test_two_process_run_scores_exact_match_and_merges(tmp_path, assets):
    """The end of a 2-process LoRA run: exact match before/after (generation on the gathered model, rank 0) and
    merge_at_end on the consolidated model."""
    result = run(config(tmp_path, assets), "peft.method=lora", *COMMON, "data.val_fraction=0.25",
                 "exact_match_samples=2", "max_new_tokens=4", "peft.merge_at_end=true", nproc=2)
    assert "exact match on 2 held-out samples" in result.stdout, result.stdout
    summary = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())
    assert {"exact_match_before", "exact_match_after"} <= summary.keys() and summary["processes"] == 2
    merged = load_file(tmp_path / "out" / "final" / "merged" / "model.safetensors")
    assert not any("lora_" in k for k in merged)
