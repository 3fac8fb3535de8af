"""Tiny tokenizer folders in the three formats ``load_tokenizer`` reads, built offline.

Each ``build_*`` function trains a small tokenizer on :data:`CORPUS` in a few
hundred milliseconds and writes a Hugging Face style model folder:

* :func:`build_bpe_folder`: byte-level BPE ``tokenizer.json`` (Qwen-like, ChatML), saved by transformers.
* :func:`build_sentencepiece_folder`: sentencepiece BPE ``tokenizer.model`` with byte fallback (Llama 2-like),
  trained with Llama 2's trainer settings; the folder has no ``tokenizer.json``.
* :func:`build_tiktoken_folder`: a Llama 3 "original" ``tokenizer.model`` (lines of ``base64(token) rank``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from gguf import bytes_to_unicode

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "Hello, world! Hello there, how are you doing today? I'm fine, thanks. You're welcome.",
    "Fine-tuning language models needs data, patience and a good tokenizer.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000",
    "Café, naïve, façade, résumé, über, Ärger, smörgåsbord, São Paulo.",
    "Привет, мир! Как дела? Всё хорошо.",
    "你好，世界！今天天气很好。我们一起学习机器学习。",
    "こんにちは世界。日本語のテキストです。",
    "Emoji time: 😀 😃 🚀 🎉 👍🏽 ❤️ 🇫🇷",
    "Tabs\tand  double  spaces   and    more.\n\nNew paragraph.\r\nWindows line.",
    "Assistant: Sure! Here is the answer you asked for. User: thanks a lot.",
    "What is the capital of France? The capital of France is Paris.",
    "Summarise the text in one sentence, please. Keep it short and clear.",
]

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unknown role: ' + message.role) }}"
    "{%- endif %}"
    "{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5-style ChatML template (default system prompt when none is given)."""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
"""Llama 2 chat template as published with meta-llama/Llama-2-7b-chat-hf."""

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
"""Llama 3 Instruct template (whitespace-control layout as on the Hub; contents are trimmed)."""


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _train_byte_level_bpe(vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on CORPUS (all 256 bytes in the alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok


def build_bpe_folder(path: Path) -> Path:
    """Qwen-like folder: tokenizer.json + tokenizer_config.json + chat_template.jinja + generation_config.json.

    eos = ``<|im_end|>``, pad = ``<|endoftext|>``, no bos; generation_config lists both as stop ids.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = _train_byte_level_bpe(600, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 chat_template=CHATML_TEMPLATE)
    hf.save_pretrained(path)
    _write_json(path / "generation_config.json",
                {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]})
    return path


def build_sentencepiece_folder(path: Path) -> Path:
    """Llama 2-like folder: tokenizer.model (sentencepiece BPE, byte fallback) + tokenizer_config.json.

    ids 0/1/2 are ``<unk>``/``<s>``/``</s>``; ``add_bos_token`` is true; the chat template is Llama 2's.
    """
    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    # Llama 2's tokenizer.model trainer_spec (identity normalisation, dummy prefix, digits split, byte fallback).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3), model_prefix=str(path / "tokenizer"), model_type="bpe",
        vocab_size=700, character_coverage=0.9995, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        add_dummy_prefix=True, max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2,
    )
    (path / "tokenizer.vocab").unlink()
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},  # the dict form older transformers wrote
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "added_tokens_decoder": added,
        "chat_template": LLAMA2_TEMPLATE, "clean_up_tokenization_spaces": False,
    })
    return path


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tiktoken_ranks() -> dict[bytes, int]:
    """Mergeable ranks: the 256 single bytes, then the merges of a byte-level BPE trained on CORPUS."""
    from tokenizers import pre_tokenizers

    tok = _train_byte_level_bpe(700, [])
    # ByteLevel maps each byte to one printable char; invert that to get the token's bytes.
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    assert set(byte_of) == set(pre_tokenizers.ByteLevel.alphabet())
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return {bytes(byte_of[c] for c in token): rank for rank, (token, _) in enumerate(by_id)}


def build_tiktoken_folder(path: Path, *, with_config: bool = True) -> Path:
    """Llama 3-like folder with a tiktoken ``tokenizer.model``.

    ``with_config=False`` gives Meta's "original" layout (tokenizer.model only). Otherwise a tokenizer_config.json
    names the 256 special tokens (ids after the BPE ranks) the way Meta's Llama 3.1 tokenizer.py defines them, with
    bos/eos, ``add_bos_token`` and the Llama 3 chat template, and a generation_config.json lists the stop ids
    (end_of_text, eom, eot). transformers reads this folder by converting the ranks to a tokenizers BPE.
    """
    path.mkdir(parents=True, exist_ok=True)
    ranks = tiktoken_ranks()
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (path / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    if not with_config:
        return path
    n = len(ranks)
    specials = llama3_special_tokens()
    added = {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": True} for i, t in enumerate(specials)}
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "add_bos_token": True,
        "added_tokens_decoder": added, "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": False,
    })
    _write_json(path / "generation_config.json", {"bos_token_id": n, "eos_token_id": [n + 1, n + 8, n + 9]})
    return path


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3.1 special tokens in id order (written out independently of the module under test)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(named))]
