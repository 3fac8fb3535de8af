"""The command line: help without torch, version, listing, and the embedded demo."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ftprog.programs.cli import app

runner = CliRunner()


def test_help_does_not_import_torch():
    code = "import sys; from ftprog.programs.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "ls" in result.output


def test_version_and_ls():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("ft-prog ")
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0 and "cpu-default" in result.output


def test_demo_saves_loads_and_generates(tmp_path):
    result = runner.invoke(app, ["demo", "--output-dir", str(tmp_path / "demo"), "--new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "loaded back (identical)" in result.output and "tokens/s" in result.output
    assert (tmp_path / "demo" / "model.safetensors").is_file()


def test_one_config_error_for_model_and_program_configs(tmp_path):
    """config.json errors and TOML config errors are one class; a bad config.json under `run` exits 1, no traceback."""
    from ftprog.core import ConfigError as CoreConfigError
    from ftprog.core import read_config
    from ftprog.programs.config import ConfigError

    assert ConfigError is CoreConfigError
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        read_config(tmp_path / "model")
    result = runner.invoke(app, ["run", "quantize", f"model.path={tmp_path / 'model'}",
                                 f"output_dir={tmp_path / 'out'}"])
    assert result.exit_code == 1, result.output
    assert "error:" in result.stderr and "config.json: unsupported model_type 'gpt2'" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_torchao_import_noise_stays_out_of_the_terminal():
    """torchao's import logs "Failed to load .../_C_*.so" (CUDA kernels absent) and makes torch log a KernelPreference
    deprecation: not the user's business, so ft-prog routes exactly those to its debug log; other warnings stay."""
    code = ("import logging; from ftprog.core import from_config; from ftprog.transforms import quantize; "
            "quantize(from_config('tiny'), 'int8'); logging.getLogger('torchao').warning('a real torchao warning')")
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ours.returncode == 0, ours.stderr
    assert not any(word in ours.stderr for word in ("Failed to load", "KernelPreference")), ours.stderr
    assert "a real torchao warning" in ours.stderr


def test_debug_option_shows_tracebacks(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPROG_DEBUG", "0")  # off; restored (unset) afterwards, as --debug sets it
    missing = str(tmp_path / "no-model")
    quiet = runner.invoke(app, ["run", "generate", f"model.path={missing}", "prompt=hi"])
    assert quiet.exit_code == 1 and "does not exist" in quiet.stderr and "Traceback" not in quiet.stderr
    loud = runner.invoke(app, ["--debug", "run", "generate", f"model.path={missing}", "prompt=hi"])
    assert loud.exit_code == 1 and "Traceback" in loud.stderr and "does not exist" in loud.stderr
