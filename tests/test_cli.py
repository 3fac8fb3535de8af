"""The command line: help without torch, version, listing, and the embedded demo."""

import subprocess
import sys

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
