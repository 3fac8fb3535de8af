"""Every built-in config validates (`ft-prog validate`), and every sft one is planned (`ft-prog plan`) before its
model is downloaded, with the shape of the model its header names (a preset checked against the model card)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftprog.core import from_config, preset
from ftprog.programs.cli import CONFIG_DIR, app

CONFIGS = sorted((p.parent.name, p.stem) for p in CONFIG_DIR.glob("*/*.toml"))
SFT = [name for program, name in CONFIGS if program == "sft"]

# The Hub models the built-in configs train (the folder their header downloads into), their presets and the
# parameter counts (billions) their model cards publish, as printed there (rounded or cut at the last digit): total
# and, where the card gives it, without the embedding and output layers. The presets' shapes must give them.
MODEL_CARDS = {
    "llama-3.2-1b": ("Llama-3.2-1B-Instruct", "1.23", None),
    "llama-3.2-3b": ("Llama-3.2-3B-Instruct", "3.21", None),
    "llama-3.1-8b": ("Llama-3.1-8B-Instruct", "8.03", None),
    "qwen2.5-0.5b": ("Qwen2.5-0.5B-Instruct", "0.49", "0.36"),
    "qwen2.5-1.5b": ("Qwen2.5-1.5B-Instruct", "1.54", "1.31"),
    "qwen2.5-3b": ("Qwen2.5-3B-Instruct", "3.09", "2.77"),
    "qwen2.5-7b": ("Qwen2.5-7B-Instruct", "7.61", "6.53"),
    "qwen3-0.6b": ("Qwen3-0.6B", "0.6", "0.44"),
    "qwen3-1.7b": ("Qwen3-1.7B", "1.7", "1.4"),
    "qwen3-4b": ("Qwen3-4B", "4.0", "3.6"),
    "qwen3-8b": ("Qwen3-8B", "8.2", "6.95"),
    "mistral-7b-v0.3": ("Mistral-7B-Instruct-v0.3", "7.25", None),
    "gemma-2-2b": ("gemma-2-2b-it", "2.6", None),
    "gemma-3-1b": ("gemma-3-1b-it", "1.0", None),
    "phi-4-mini": ("Phi-4-mini-instruct", "3.8", None),
    "olmo-2-0425-1b": ("OLMo-2-0425-1B-Instruct", "1.5", None),
    "smollm3-3b": ("SmolLM3-3B", "3.1", None),
    "mixtral-8x7b-v0.1": ("Mixtral-8x7B-Instruct-v0.1", "46.7", None),
    "qwen3-30b-a3b": ("Qwen3-30B-A3B", "30.5", "29.9"),
}
PRESET_OF = {hub: shape for shape, (hub, _, _) in MODEL_CARDS.items()}


def as_printed(billions: float, printed: str) -> bool:
    """``billions`` is ``printed`` up to its last digit (cards round or cut: less than one unit of it away)."""
    decimals = len(printed.partition(".")[2])
    return abs(billions - float(printed)) < 10 ** -decimals


def test_every_program_has_its_configs():
    assert len(SFT) == 25
    assert {program for program, _ in CONFIGS} == {"sft", "dpo", "grpo", "distill", "eval", "generate", "quantize"}


@pytest.mark.parametrize("program,name", CONFIGS, ids=[f"{p}/{n}" for p, n in CONFIGS])
def test_builtin_config_validates(program, name, tmp_path):
    result = CliRunner().invoke(app, ["validate", name, "--program", program])
    assert result.exit_code == 0, result.output
    assert f"# {name}: valid {program} config" in result.stderr
    resolved = tmp_path / "resolved.toml"  # what it prints is the whole resolved config: it validates the same
    resolved.write_text(result.stdout)
    again = CliRunner().invoke(app, ["validate", str(resolved), "--program", program])
    assert again.exit_code == 0 and again.stdout == result.stdout, again.output


def _hub_folder(name: str) -> str:
    """The folder the config's header says to download into (``--output-dir models/...``)."""
    header = (CONFIG_DIR / "sft" / f"{name}.toml").read_text()
    return re.search(r"--output-dir (\S+)", header).group(1)


@pytest.mark.parametrize("name", SFT)
def test_builtin_sft_config_is_planned_before_the_download(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ folder here: nothing is downloaded
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the demo model is not built either
    result = CliRunner().invoke(app, ["plan", name, "--device", "cuda", "--memory", "1TiB"])
    assert result.exit_code == 0, result.output
    assert "fits in" in result.output and "peak" in result.output
    if name == "demo":
        return
    folder = _hub_folder(name)
    assert not Path(folder).exists()
    note = re.search(rf"note: {re.escape(folder)} not found: planned with the '([^']+)' preset shape", result.output)
    assert note, result.output
    shape = note.group(1)
    assert shape == PRESET_OF[Path(folder).name]
    planned = float(re.search(r"\(([0-9,.]+)M params\)", result.output).group(1).replace(",", ""))
    assert planned == pytest.approx(base_params(shape) / 1e6, abs=0.05), shape


def base_params(shape: str) -> int:
    import torch

    with torch.device("meta"):
        return from_config(preset(shape)).num_params()


@pytest.mark.parametrize("shape", list(MODEL_CARDS))
def test_preset_shapes_have_the_model_cards_parameter_counts(shape):
    config = preset(shape)
    total = base_params(shape)
    embeddings = config["vocab_size"] * config["hidden_size"] * (1 if config["tie_word_embeddings"] else 2)
    _, printed_total, printed_body = MODEL_CARDS[shape]
    assert as_printed(total / 1e9, printed_total), (shape, total)
    if printed_body is not None:
        assert as_printed((total - embeddings) / 1e9, printed_body), (shape, total - embeddings)
