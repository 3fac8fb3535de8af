"""`ft-prog run --nproc 2 sft`: 2 gloo processes against 1, re-sharded resume, and a rank that dies or hangs."""

import os
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


@pytest.mark.parametrize("method", ["none", "lora", "qlora"])
def test_two_processes_equal_one(method, tmp_path, assets):
    overrides = [f"peft.method={method}", "max_steps=3", "batch_size=4", "packing=true"]
    one = run(config(tmp_path, assets, "one"), *overrides)
    two = run(config(tmp_path, assets, "two"), *overrides, nproc=2)
    assert "resumed" not in one.stdout + two.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    assert_close(final_tensors(tmp_path / "two"), final_tensors(tmp_path / "one"))
    assert orjson.loads((tmp_path / "two" / "summary.json").read_bytes())["processes"] == 2


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_with_another_process_count(first, second, tmp_path, assets):
    overrides = ["peft.method=lora", "max_steps=4", "save_every=2", "keep_last=5"]
    run(config(tmp_path, assets, "whole"), *overrides, nproc=first)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "step_2", resumed / "step_2")
    result = run(config(tmp_path, assets, "resumed"), *overrides, nproc=second)
    assert "resumed from" in result.stdout
    assert_close(final_tensors(resumed), final_tensors(tmp_path / "whole"))


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
    assert "rank" in stderr.lower() and ("1" in stderr)
    assert list((tmp_path / "out").glob("step_*"))  # the last complete checkpoint is kept for a re-run
