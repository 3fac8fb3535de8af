"""Offline assets of the embedded demo: a tiny model, its tokenizer and a generated dataset.

The preference demo (`ft-prog run dpo --config demo`) starts from the sft demo's trained model
(``builtin:demo-sft-model``: the sft demo is run once to make it) and a generated preference set on the same
task (``builtin:demo-preference-data``: chosen = the reversal, rejected = a plausible wrong one).

The demo task is string reversal: the user message is a few lowercase letters,
the assistant answers them reversed ("stone" -> "enots"). A randomly
initialised model cannot do it; a couple of minutes of fine-tuning on 2 CPU
cores teaches it, which the demo measures as exact-match accuracy on a
held-out split before and after training.

Config values ``builtin:demo-model`` and ``builtin:demo-data`` name these
assets; they are built on first use under ``<cache>/ft-prog/demo`` (cache:
``$XDG_CACHE_HOME`` or ``~/.cache``) and reused afterwards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
DEMO_MODEL = "builtin:demo-model"
DEMO_DATA = "builtin:demo-data"
DEMO_SFT_MODEL = "builtin:demo-sft-model"
DEMO_PREFERENCE_DATA = "builtin:demo-preference-data"
DEMO_STUDENT_MODEL = "builtin:demo-student-model"
DEMO_TEACHER_MODEL = "builtin:demo-teacher-model"
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_MODEL_CONFIG = {
    "model_type": "llama", "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 352,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
}


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "ft-prog" / "demo"


def resolve(value: str) -> str:
    """Map ``builtin:NAME`` to the folder/file of that asset (building it once); other values pass through."""
    if not value.startswith(BUILTIN_PREFIX):
        return value
    if value == DEMO_MODEL:
        return str(demo_model())
    if value == DEMO_DATA:
        return str(demo_data())
    if value == DEMO_SFT_MODEL:
        return str(demo_sft_model())
    if value == DEMO_PREFERENCE_DATA:
        return str(demo_preference_data())
    if value == DEMO_STUDENT_MODEL:
        return str(demo_student_model())
    if value == DEMO_TEACHER_MODEL:
        return str(demo_teacher_model())
    raise ValueError(f"unknown built-in asset {value!r}; available: {DEMO_MODEL}, {DEMO_DATA}, {DEMO_SFT_MODEL}, "
                     f"{DEMO_PREFERENCE_DATA}, {DEMO_STUDENT_MODEL}, {DEMO_TEACHER_MODEL}")


def _write_tokenizer(folder: Path) -> int:
    """A byte-level tokenizer (256 bytes + ChatML specials, no merges); returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "chat_template": _CHAT_TEMPLATE, "model_max_length": _MODEL_CONFIG["max_position_embeddings"],
              "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def demo_model(seed: int = 0) -> Path:
    """The demo model folder: a random 0.6M-parameter Llama-shaped model and its tokenizer."""
    from ..core import from_config, save_pretrained

    folder = cache_dir() / "model"
    if (folder / "model.safetensors").is_file():
        return folder
    staging = cache_dir() / f".tokenizer-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(staging)
    eos = json.loads((staging / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in eos}
    config = {**_MODEL_CONFIG, "vocab_size": (vocab + 63) // 64 * 64, "eos_token_id": ids["<|im_end|>"],
              "pad_token_id": ids["<|endoftext|>"]}
    model = from_config(config, seed=seed).replace(source=str(staging))
    save_pretrained(model, folder)
    for file in staging.iterdir():
        file.unlink()
    staging.rmdir()
    return folder


def demo_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` instruct rows: 3-6 random lowercase letters and their reversal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        rows.append({"instruction": word, "output": word[::-1]})
    return rows


def demo_data() -> Path:
    """The demo dataset folder: ``train.jsonl`` (4000 rows) and ``validation.jsonl`` (200 rows)."""
    folder = cache_dir() / "data"
    if (folder / "validation.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", 4000, 1), ("validation", 200, 2)):
        tmp = folder / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(count, seed)))
        tmp.replace(folder / f"{name}.jsonl")
    return folder


SFT_DEMO_STEPS = 120
"""Steps of the sft demo run that makes the preference demo's starting model: a partly trained model (the full
300-step demo answers every held-out word right, leaving preference tuning nothing to improve)."""


def demo_sft_model() -> Path:
    """The preference demo's starting model: the sft demo (``ft-prog run sft --config demo``) stopped after
    ``SFT_DEMO_STEPS`` steps, trained once under the cache folder."""
    return _trained_sft_demo("sft-model", SFT_DEMO_STEPS)


def demo_teacher_model() -> Path:
    """The distillation demo's teacher: the whole sft demo (300 steps: every held-out word right), trained once
    under the cache folder."""
    return _trained_sft_demo("teacher-model", 0)


def _trained_sft_demo(name: str, steps: int) -> Path:
    """``cache/name``: the final model of the sft demo run for ``steps`` steps (0: the demo's own length)."""
    folder = cache_dir() / name
    if (folder / "model.safetensors").is_file():
        return folder
    from . import sft
    from .cli import CONFIG_DIR
    from .config import load_config

    run_dir = cache_dir() / f"{name}-run"
    print(f"preparing {name}: training the sft demo once into {run_dir} (about a minute)", flush=True)
    overrides = [f"output_dir={run_dir}", "log.progress=false", "log.plot=false"]
    if steps:
        overrides.append(f"max_steps={steps}")
    cfg, resolved = load_config(sft.CONFIG, "demo", overrides, builtin_dir=CONFIG_DIR / "sft")
    final = sft.run(cfg, resolved)
    staging = cache_dir() / f".{name}-{os.getpid()}"
    shutil.copytree(final, staging)
    staging.replace(folder)
    shutil.rmtree(run_dir, ignore_errors=True)
    return folder


def wrong_reversal(word: str, rng: random.Random) -> str:
    """A plausible wrong answer for reversing ``word``: unreversed, two letters swapped, one dropped or doubled."""
    right = word[::-1]
    for _ in range(10):
        kind = rng.choice(("unreversed", "swap", "drop", "double"))
        i = rng.randrange(len(right) - 1)
        wrong = {"unreversed": word, "swap": right[:i] + right[i + 1] + right[i] + right[i + 2:],
                 "drop": right[:i] + right[i + 1:], "double": right[:i] + right[i] + right[i:]}[kind]
        if wrong != right:
            return wrong
    return right + right[-1]


def demo_preference_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` preference rows on the demo task: ``prompt`` (letters), ``chosen`` (the reversal), ``rejected``."""
    rng = random.Random(seed)
    return [{"prompt": r["instruction"], "chosen": r["output"], "rejected": wrong_reversal(r["instruction"], rng)}
            for r in demo_rows(count, seed)]


def demo_preference_data() -> Path:
    """The preference demo's folder: ``train.jsonl`` (2000 pairs) and ``validation.jsonl`` (200 pairs), on words
    other than the sft demo's."""
    folder = cache_dir() / "preference-data"
    if (folder / "validation.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", 2000, 11), ("validation", 200, 12)):
        tmp = folder / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in demo_preference_rows(count, seed)))
        tmp.replace(folder / f"{name}.jsonl")
    return folder


_STUDENT_SHAPE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2}
"""The distillation demo's student: half the demo model's width, 2 layers instead of 3 (about 4x fewer
parameters outside the embeddings)."""


def demo_student_model(seed: int = 1) -> Path:
    """The distillation demo's student: a random model smaller than the demo model, with its tokenizer (so the
    sft demo's trained model can teach it)."""
    from ..core import from_config, save_pretrained

    folder = cache_dir() / "student-model"
    if (folder / "model.safetensors").is_file():
        return folder
    like = demo_model()
    config = {**json.loads((like / "config.json").read_text()), **_STUDENT_SHAPE}
    save_pretrained(from_config(config, seed=seed).replace(source=str(like)), folder)
    return folder
