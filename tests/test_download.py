"""`ft-prog download` against an offline stand-in of the Hub."""

import os
import subprocess
import sys

from _hubserver import FakeHub


def run_cli(args, env):
    code = "from ftprog.programs.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def test_download_model_skips_original_pth(tmp_path):
    files = {"config.json": b"{}", "model.safetensors": b"x" * 100, "original/consolidated.00.pth": b"p" * 50,
             "tokenizer.json": b"{}"}
    with FakeHub() as hub:
        hub.add("org/tiny", files)
        env = {**os.environ, **hub.env(tmp_path / "hf_home"), "HF_TOKEN": "secret"}
        out = tmp_path / "model"
        result = run_cli(["download", "org/tiny", "--output-dir", str(out)], env)
        assert result.returncode == 0, result.stderr
        got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts)
        assert got == ["config.json", "model.safetensors", "tokenizer.json"]
        assert (out / "model.safetensors").read_bytes() == b"x" * 100
        assert str(out) in result.stdout

        only = tmp_path / "only"
        result = run_cli(["download", "org/tiny", "--output-dir", str(only), "--include", "*.json"], env)
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in only.iterdir() if p.is_file()) == ["config.json", "tokenizer.json"]

        result = run_cli(["download", "org/missing"], env)
        assert result.returncode != 0 and "no model repository 'org/missing'" in result.stderr
