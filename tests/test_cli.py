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


# ------------------------------------------------------------------------------------- export, plan, multi-node


@pytest.fixture(scope="module")
def exportable(tmp_path_factory):
    """(model folder, adapter folder): a tiny Llama 3.1 with a byte-level BPE tokenizer and a non-zero LoRA."""
    import torch

    from _hf import hf_model
    from _tokfixtures import build_bpe_folder
    from ftprog.core import load_pretrained
    from ftprog.transforms import lora, save_adapter

    root = tmp_path_factory.mktemp("cli-export")
    hf_model("llama3.1", vocab_size=640).save_pretrained(root / "model")
    build_bpe_folder(root / "model")
    adapted = lora(load_pretrained(root / "model"), rank=4, alpha=8, targets=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(0)
    adapted = adapted.with_params({p: t + 0.05 * torch.randn(t.shape, generator=g)
                                   for p, t in adapted.trainable_params().items()})
    return root / "model", save_adapter(adapted, root / "adapter")


def _tensors(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_export_command_passes_each_flag(exportable, tmp_path):
    """`ft-prog export` writes what `export(...)` writes with the same settings: --format/-f, --adapter, --dtype,
    --max-seq-len; it prints the path written and fails as one message."""
    import torch

    from ftprog.programs.export import export

    model, adapter = exportable
    result = runner.invoke(app, ["export", str(model), str(tmp_path / "hf"), "--format", "hf", "--adapter",
                                 str(adapter), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "hf")
    ours = _tensors(tmp_path / "hf")
    reference = _tensors(export(model, tmp_path / "reference", "hf", adapter=adapter, dtype="bf16"))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    base = _tensors(model)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[q], base[q].to(torch.bfloat16)), "the adapter was not merged"

    result = runner.invoke(app, ["export", str(model), str(tmp_path / "peft"), "-f", "peft", "--adapter", str(adapter)])
    assert result.exit_code == 0, result.output
    saved, written = _tensors(adapter), _tensors(tmp_path / "peft")
    assert saved.keys() == written.keys() and all(torch.equal(saved[k], written[k]) for k in saved)

    import gguf

    result = runner.invoke(app, ["export", str(model), str(tmp_path / "m.gguf"), "-f", "gguf", "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16

    result = runner.invoke(app, ["export", str(model), str(tmp_path / "et" / "m.pte"), "-f", "executorch",
                                 "--max-seq-len", "24"])
    assert result.exit_code == 0, result.output
    program = torch.export.load(tmp_path / "et" / "m.pt2")
    [seq] = [r for r in program.range_constraints.values() if r.upper != r.lower]
    assert (seq.lower, seq.upper) == (2, 24)

    result = runner.invoke(app, ["export", str(model), str(tmp_path / "x"), "--format", "onnx"])
    assert result.exit_code == 1 and "export failed: unknown export format 'onnx'" in result.stderr
    result = runner.invoke(app, ["export", str(model), str(tmp_path / "x"), "-f", "hf", "--max-seq-len", "8"])
    assert result.exit_code == 1 and "max_seq_len applies to the executorch format only" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,kwargs", [
    (["--device", "cpu"], {"device": "cpu"}),
    (["--device", "cuda", "--nproc", "2", "--memory", "8GiB"], {"device": "cuda", "nproc": 2, "memory": "8GiB"}),
    (["seq_len=32", "batch_size=2", "--device", "cpu"], {"overrides": ["seq_len=32", "batch_size=2"], "device": "cpu"}),
], ids=["device", "nproc-memory", "overrides"])
def test_plan_command_passes_each_flag(args, kwargs, tmp_path, monkeypatch):
    """`ft-prog plan` prints the plan `plan(...)` makes with the same settings."""
    from ftprog.programs.plan import format_plan, plan

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = runner.invoke(app, ["plan", "demo", *args])
    assert result.exit_code == 0, result.output
    expected = plan("demo", kwargs.pop("overrides", []), **kwargs)
    assert result.stdout.strip() == format_plan(expected)
    assert f"{kwargs['device']} process" in result.stdout
    assert ("2 ranks (per rank)" in result.stdout) == (kwargs.get("nproc") == 2)
    assert ("fits in 8.00 GiB" in result.stdout) == ("memory" in kwargs)


def test_plan_command_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = runner.invoke(app, ["plan", "demo", "--memory", "lots"])
    assert result.exit_code == 2 and "plan error: cannot read memory size 'lots'" in result.stderr
    result = runner.invoke(app, ["plan", "demo", "seq_len=0"])
    assert result.exit_code == 2 and "'seq_len'" in result.stderr and "must be >= 2" in result.stderr
    result = runner.invoke(app, ["plan", "demo", f"model.path={tmp_path / 'none'}"])
    assert result.exit_code == 2 and "no config.json there" in result.stderr


_TORCHRUN_COMMANDS = []


class _Torchrun:
    """Stands for the torchrun process `ft-prog run --nproc` starts: records its command line, exits 0."""

    def __init__(self, cmd, **kwargs):
        _TORCHRUN_COMMANDS.append(cmd)

    def wait(self):
        return 0


def _torchrun_args(cmd: list[str]):
    """The command line as torchrun itself parses it (after ``python -c '...torchrun_main()'``)."""
    from torch.distributed.run import parse_args

    assert cmd[1] == "-c" and "torchrun_main()" in cmd[2]
    return parse_args(cmd[3:])


@pytest.mark.parametrize("nodes", ["one", "two"])
def test_run_nproc_and_multi_node_flags_reach_torchrun(nodes, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "Popen", _Torchrun)
    _TORCHRUN_COMMANDS.clear()
    multi = ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500"] if nodes == "two" else []
    result = runner.invoke(app, ["run", "--nproc", "3", *multi, "sft", "--config", "demo", "max_steps=5"])
    assert result.exit_code == 0, result.output
    [cmd] = _TORCHRUN_COMMANDS
    args = _torchrun_args(cmd)
    assert (args.nproc_per_node, args.max_restarts, args.module) == ("3", 0, True)
    assert args.training_script == "ftprog.programs.cli"
    assert args.training_script_args == ["run", "sft", "--config", "demo", "max_steps=5"]
    if nodes == "two":
        assert (args.nnodes, args.node_rank, args.rdzv_backend, args.rdzv_endpoint) == ("2", 1, "c10d", "node0:29500")
        assert not args.standalone
    else:
        assert args.nnodes == "1" and args.standalone


def test_multi_node_run_without_endpoint_is_one_message(monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "Popen", _Torchrun)
    _TORCHRUN_COMMANDS.clear()
    result = runner.invoke(app, ["run", "--nproc", "2", "--nnodes", "2", "sft", "--config", "demo"])
    assert result.exit_code == 1 and _TORCHRUN_COMMANDS == []
    assert "error: multi-node runs need --rdzv-endpoint HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr
