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


def test_first_example_runs(tmp_path):
    """The first example ("Using the library"): load, encode with bos, logits, the printed keys, a copy that
    transformers loads with the same weights."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from _tokfixtures import build_sentencepiece_folder
    from ftprog.core import load_pretrained

    script = python_blocks()[0]
    promised = re.search(r"^print\(.*\)\s+# (.*)$", script, re.MULTILINE).group(1)
    folder, copy = tmp_path / "model", tmp_path / "copy"
    save_pretrained(from_config({**preset("tiny"), "vocab_size": 768}), folder)
    build_sentencepiece_folder(folder)  # a tokenizer with a bos token (Llama 2's layout)
    code = script.replace('"path/to/Llama-3.2-1B"', repr(str(folder))).replace('"out/copy"', repr(str(copy)))
    assert code.count(repr(str(folder))) == 2 and repr(str(copy)) in code
    code += "\nprint(list(logits.shape), len(ids[0]), ids[0, 0].item() == tok.bos_id, logits.dtype)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    printed, checks = result.stdout.splitlines()
    assert printed == promised
    shape, length, bos, dtype = re.fullmatch(r"(\[.*\]) (\d+) (\w+) (\S+)", checks).groups()
    assert shape == f"[1, {length}, 768]" and bos == "True" and dtype == "torch.bfloat16"

    source, saved = load_file(folder / "model.safetensors"), load_file(copy / "model.safetensors")
    assert source.keys() == saved.keys()
    assert all(torch.equal(saved[k], source[k].to(torch.bfloat16)) for k in source)  # dtype="bf16", as loaded
    assert (copy / "tokenizer.model").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(copy).eval()
    tokens = torch.randint(0, 700, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits.float(), load_pretrained(copy)(tokens).float(),
                                   rtol=0, atol=4e-3)  # one bf16 step at the logits' size (< 1); measured 0
