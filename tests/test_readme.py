"""The README's Python examples run as written (on a tiny model folder instead of a real one)."""

import re
import subprocess
import sys
from pathlib import Path

from ftprog.core import from_config, preset, save_pretrained

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_transforms_script_runs(tmp_path):
    script = next(b for b in python_blocks() if "save_adapter(model" in b)
    assert len(script.strip().splitlines()) <= 30
    folder = tmp_path / "model"
    config = {**preset("tiny"), "hidden_size": 256, "intermediate_size": 512, "vocab_size": 256}
    save_pretrained(from_config(config), folder)
    code = script.replace('"models/Llama-3.2-1B"', repr(str(folder))).replace('"out/adapter"',
                                                                          repr(str(tmp_path / "adapter")))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    losses = [float(line.split()[1]) for line in result.stdout.splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
