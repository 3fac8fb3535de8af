"""Offline fixtures for the `ft-prog run sft` tests: a tiny HF model folder with a tokenizer, JSONL data, configs.

The model is a transformers Llama (tied embeddings) whose linear layers all have NF4-compatible shapes
(element count divisible by 64 * 256), so the same folder serves full, LoRA, DoRA and QLoRA runs; the
tokenizer is the byte-level BPE ChatML folder of :mod:`_tokfixtures`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=640, max_position_embeddings=128, rms_norm_eps=1e-5,
             tie_word_embeddings=True)


# Another family of the same size: ``build_model_folder(folder, family="gemma2")``.
FAMILIES = {"llama": ("LlamaConfig", {}),
            "gemma2": ("Gemma2Config", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
                                        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0})}


def build_model_folder(folder: Path, seed: int = 0, family: str = "llama") -> Path:
    """A random transformers model saved with the ChatML BPE tokenizer of ``_tokfixtures`` (vocab 600 < 640)."""
    import transformers

    from _tokfixtures import build_bpe_folder

    build_bpe_folder(folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    torch.manual_seed(seed)
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**MODEL, **extra, eos_token_id=ids["<|im_end|>"],
                                             pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    return folder


def reverse_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Instruct rows "word" -> "drow" of 2 to 9 letters (so samples have different target counts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 9)))
        rows.append({"instruction": word, "output": word[::-1]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_config(path: Path, model: Path, data: Path, output_dir: Path) -> Path:
    """A small fp32 sft config; tests vary it with ``key=value`` overrides."""
    path.write_text(f"""\
dtype = "fp32"
seed = 0
seq_len = 64
batch_size = 4
max_steps = 6
output_dir = {json.dumps(str(output_dir))}

[model]
path = {json.dumps(str(model))}

[data]
path = {json.dumps(str(data))}
format = "instruct"

[peft]
method = "none"
targets = ["all-linear"]
rank = 4
alpha = 8.0

[optimizer]
lr = 1e-3
schedule = "constant"

[log]
progress = false
""")
    return path


# Fixtures the sft test files share (imported by name into each): one intra-op thread, the model folder, the data
# file and a config over both.


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread in-process (the tests' subprocesses get ``OMP_NUM_THREADS=1``: same count, so their
    results compare bit for bit); on a shared 2-core machine, OpenMP threads spinning against other jobs made the
    sft tests 6x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("sft-model") / "model")


@pytest.fixture(scope="session")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "train.jsonl", reverse_rows(48))


@pytest.fixture
def config(tmp_path, model_dir, train_file):
    """A small fp32 config file (output_dir = tmp_path/out)."""
    return write_config(tmp_path / "sft.toml", model_dir, train_file, tmp_path / "out")
