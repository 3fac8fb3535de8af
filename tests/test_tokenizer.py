"""load_tokenizer / Tokenizer checked against transformers 5 (and tiktoken) on tiny tokenizers of each format.

Every tokenizer is trained offline in a temporary folder by ``_tokfixtures``; transformers' AutoTokenizer loading
the same folder is the oracle (for the tiktoken file it converts the ranks to a tokenizers BPE; the tests also
compare with a ``tiktoken.Encoding`` built from the same ranks).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import transformers

from _tokfixtures import (  # noqa: E402
    CHATML_TEMPLATE as QWEN_TEMPLATE,
    LLAMA3_PATTERN,
    build_bpe_folder,
    build_sentencepiece_folder,
    build_tiktoken_folder,
    llama3_special_tokens,
    tiktoken_ranks,
)

from ftprog.core._tokenizer import CHATML_TEMPLATE, LLAMA3_SPECIAL_TOKENS, Tokenizer, load_tokenizer  # noqa: E402

FORMATS = ("bpe", "sentencepiece", "tiktoken")
BUILDERS = {"bpe": build_bpe_folder, "sentencepiece": build_sentencepiece_folder, "tiktoken": build_tiktoken_folder}

TEXTS = [
    "Hello world", "Hello, world! How are you today?", "", " ", "x", "  leading and trailing  ",
    "tabs\tand\nnewlines\n\n\nend", "whitespace     runs      here", "\r\nWindows\r\nline", "\n starts with newline",
    "Café naïve façade — “quotes” … Ärger", "Привет, мир! Всё хорошо.", "你好，世界！今天天气很好。机器学习",
    "日本語のテキストです", "emoji 😀🚀🎉 👍🏽 ❤️ 🇫🇷 family 👨‍👩‍👧 end", "digits 1234567890 and 3.14159",
    "code:\n    def f(x):\n        return x ** 2\n", "it's they're we'll I'd you've", "▁starts with a meta space",
    "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b", "<s>[INST] hi [/INST] yo </s>", "x</s>y<s> z",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<|eot_id|><|eot_id|>",
    "<unk> literal", "<0x41> looks like a byte piece", "<|im_end", "<|reserved_special_token_7|>!",
]
FRAGMENTS = ["a", "b", "the", " ", "  ", "\n", "\t", "😀", "你好", "é", "Hello", " world", "123", "'s", "!?", "\r\n",
             "▁", "<s>", "</s>", "<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|begin_of_text|>", "<|endoftext|>"]


def random_texts(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return ["".join(rnd.choice(FRAGMENTS) for _ in range(rnd.randint(1, 12))) for _ in range(n)]


CHATS = [
    [{"role": "system", "content": "You are terse. Réponds en français si besoin."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And of Japan? 日本"},
     {"role": "assistant", "content": " Tokyo — 東京 😀\n"}],
    [{"role": "user", "content": "Hello there!"},
     {"role": "assistant", "content": "Hi! How can I help?"}],
    [{"role": "user", "content": "Hello there!"},
     {"role": "assistant", "content": "Hi!\n\nHow can I help?", "name": None},
     {"role": "user", "content": "Summarise the text in one sentence, please."}],
]


def expected_assistant_runs(fmt: str, chat: list[dict]) -> list[str]:
    """What each masked run of tokens decodes to: the content as the template writes it + the closing token(s)."""
    contents = [m["content"] for m in chat if m["role"] == "assistant"]
    if fmt == "bpe":  # ChatML writes contents verbatim, then <|im_end|>
        return [c + "<|im_end|>" for c in contents]
    if fmt == "sentencepiece":  # Llama 2: ' ' + content.strip() + ' ' + eos (decode drops the leading "▁")
        return [c.strip() + " </s>" for c in contents]
    return [c.strip() + "<|eot_id|>" for c in contents]  # Llama 3: content | trim, then <|eot_id|>


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {fmt: build(root / fmt) for fmt, build in BUILDERS.items()}


def hf_tokenizer(folder: Path):
    transformers.logging.set_verbosity_error()  # the tiktoken file makes it log a sentencepiece fallback
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module", params=FORMATS)
def pair(request, folders) -> tuple[str, Tokenizer, object]:
    """(format, ours, transformers') for one folder."""
    folder = folders[request.param]
    return request.param, load_tokenizer(folder), hf_tokenizer(folder)


def masked_runs(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """Decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(r) for r in [*runs, current] if r]


# ------------------------------------------------------------------------------------------ encode / decode


def test_encode_matches_transformers(pair):
    fmt, tok, hf = pair
    for text in TEXTS + random_texts(300, seed=1):
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), (fmt, text)


def test_decode_matches_transformers_and_round_trips(pair):
    fmt, tok, hf = pair
    rnd = random.Random(2)
    specials = sorted(tok.stop_ids | {i for i in (tok.bos_id, tok.pad_id) if i is not None})
    for text in TEXTS + random_texts(200, seed=3):
        ids = tok.encode(text)
        mixed = [*rnd.sample(specials, 1), *ids, *rnd.sample(specials, 1), *ids]  # specials at the start, inside
        for seq in (ids, mixed):
            assert tok.decode(seq) == hf.decode(seq), (fmt, text)
            assert tok.decode(seq, skip_special_tokens=True) == hf.decode(seq, skip_special_tokens=True), (fmt, text)
        # sentencepiece (like transformers) drops the space its "▁" prefix stands for, and reads "▁" as a space.
        if fmt != "sentencepiece" or not (text.startswith(" ") or "▁" in text):
            assert tok.decode(ids) == text, (fmt, text)


def test_decode_accepts_tensors(pair):
    import torch
    _, tok, _ = pair
    ids = tok.encode("Hello world 😀")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


def test_special_ids_match_transformers(pair):
    fmt, tok, hf = pair
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.vocab_size == len(hf)
    assert tok.special_tokens == hf.special_tokens_map
    expected_stops = {
        "bpe": {"<|im_end|>", "<|endoftext|>"},  # eos + generation_config
        "sentencepiece": {"</s>"},
        "tiktoken": {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"},
    }[fmt]
    assert tok.stop_ids == frozenset(hf.convert_tokens_to_ids(sorted(expected_stops)))


def test_bos_eos(pair):
    fmt, tok, hf = pair
    text = "Hello world"
    # add_bos_token/add_eos_token say what transformers' default encode adds.
    assert tok.encode(text, add_bos=tok.add_bos_token, add_eos=tok.add_eos_token) == hf.encode(text)
    assert tok.add_bos_token == (fmt != "bpe") and not tok.add_eos_token
    assert tok.encode(text, add_eos=True)[-1] == tok.eos_id
    if tok.bos_id is None:
        with pytest.raises(ValueError, match="no bos token"):
            tok.encode(text, add_bos=True)
    else:
        assert tok.encode(text, add_bos=True) == [tok.bos_id, *tok.encode(text)]


def test_offsets_cover_the_text(pair):
    fmt, tok, _ = pair
    for text in TEXTS + random_texts(100, seed=4):
        ids, spans = tok._backend.encode_offsets(text)
        assert ids == tok.encode(text)
        assert all(0 <= a <= b <= len(text) for a, b in spans)
        assert [a for a, _ in spans] == sorted(a for a, _ in spans)
        covered = {k for a, b in spans for k in range(a, b)}
        assert covered == set(range(len(text))), (fmt, text)


# --------------------------------------------------------------------------------------------------- chat


def test_chat_rendering_matches_transformers(pair):
    fmt, tok, hf = pair
    for chat in CHATS:
        for gen in (False, True):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen), (fmt, chat)
            ids, mask = tok.encode_chat(chat, add_generation_prompt=gen)
            assert ids == hf.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
            assert ids == tok.encode(text) and len(mask) == len(ids)


def test_assistant_mask_covers_contents_and_stop_token(pair):
    fmt, tok, _ = pair
    for chat in CHATS:
        ids, mask = tok.encode_chat(chat, add_generation_prompt=chat[-1]["role"] == "user")
        assert masked_runs(tok, ids, mask) == expected_assistant_runs(fmt, chat), fmt
        # the stop token closing each turn is the last masked token of its run
        ends = [k for k in range(len(ids)) if mask[k] and (k + 1 == len(ids) or not mask[k + 1])]
        assert all(ids[k] in tok.stop_ids for k in ends)


def test_assistant_mask_finds_the_right_occurrence(folders):
    tok = load_tokenizer(folders["bpe"])
    # "a" also occurs in the user's question and in the "<|im_start|>assistant" header before the answer.
    chat = [{"role": "user", "content": "OK, a or b?"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "OK"}, {"role": "assistant", "content": "OK"}]
    ids, mask = tok.encode_chat(chat)
    assert masked_runs(tok, ids, mask) == ["a<|im_end|>", "OK<|im_end|>"]
    # A template whose renderings of the first messages are not prefixes of the whole chat: contents are then
    # searched for forward from the previous one, which still skips the user's identical words.
    counted = tok.with_chat_template("{{ messages | length }}" + CHATML_TEMPLATE)
    chat = [{"role": "user", "content": "OK"}, {"role": "assistant", "content": "OK"},
            {"role": "user", "content": "OK"}, {"role": "assistant", "content": "OK"}]
    ids, mask = counted.encode_chat(chat)
    assert masked_runs(counted, ids, mask) == ["OK<|im_end|>"] * 2
    assert counted.decode(ids[:mask.index(True)]).endswith("user\nOK<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt", ["bpe", "tiktoken"])
def test_assistant_mask_equals_transformers_generation_mask(folders, fmt):
    """transformers masks what a template wraps in {% generation %}; wrap content + end-of-turn and compare."""
    template = {
        "bpe": QWEN_TEMPLATE.replace(
            "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
            "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.role == 'assistant' %}{% generation %}"
            "{{- message.content + '<|im_end|>' }}{% endgeneration %}{%- else %}{{- message.content + '<|im_end|>' }}"
            "{%- endif %}{{- '\\n' }}"),
        "tiktoken": "{{- bos_token }}{%- for message in messages %}"
                    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
                    "{%- if message.role == 'assistant' %}{% generation %}"
                    "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
                    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
                    "{%- endfor %}"
                    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                    "{%- endif %}",
    }[fmt]
    assert "generation" in template
    tok, hf = load_tokenizer(folders[fmt]).with_chat_template(template), hf_tokenizer(folders[fmt])
    for chat in CHATS:
        ids, mask = tok.encode_chat(chat)
        out = hf.apply_chat_template(chat, chat_template=template, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ids == out["input_ids"]
        assert mask == [bool(m) for m in out["assistant_masks"]]


def test_template_features_match_transformers(folders):
    tok, hf = load_tokenizer(folders["bpe"]), hf_tokenizer(folders["bpe"])
    template = (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if loop.index0 == 4 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m | tojson }}\n{{ m.content | tojson(indent=2) }}\n{% endfor %}"
        "{{ ns.n }}|{{ bos_token is defined }}|{{ eos_token }}|{{ pad_token }}|{{ tools is none }}|"
        "{{ strftime_now('%Y') }}|{{ {'k': 'é'} | tojson(indent=1) }}"
    )
    tok = tok.with_chat_template(template)
    chat = CHATS[0]
    rendered = tok.apply_chat_template(chat)
    assert rendered == hf.apply_chat_template(chat, tokenize=False, chat_template=template)
    assert "日本" in rendered and "\"é\"" in rendered and "français" not in rendered  # non-ASCII kept; continue


def test_chatml_default_and_missing_template(tmp_path):
    folder = build_tiktoken_folder(tmp_path / "original", with_config=False)
    tok = load_tokenizer(folder)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=r"has no chat_template.*with_chat_template"):
        tok.apply_chat_template(CHATS[1])
    with pytest.raises(ValueError, match="has no chat_template"):
        tok.encode_chat(CHATS[1])
    chatml = tok.with_chat_template(Tokenizer.CHATML_TEMPLATE)
    assert tok.chat_template is None and chatml.chat_template == CHATML_TEMPLATE
    assert chatml.apply_chat_template(CHATS[1], add_generation_prompt=True) == (
        "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        "<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------- tiktoken file


def test_tiktoken_original_folder_defaults(tmp_path):
    import tiktoken

    folder = build_tiktoken_folder(tmp_path / "original", with_config=False)
    tok = load_tokenizer(folder)
    ranks = tiktoken_ranks()
    n = len(ranks)
    assert tuple(llama3_special_tokens()) == LLAMA3_SPECIAL_TOKENS
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, None)
    assert tok.stop_ids == {n + 1, n + 8, n + 9}  # end_of_text, eom, eot
    assert tok.add_bos_token and not tok.add_eos_token
    reference = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={t: n + i for i, t in enumerate(llama3_special_tokens())})
    for text in TEXTS + random_texts(300, seed=5):
        ids = tok.encode(text)
        assert ids == reference.encode(text, allowed_special="all"), text
        assert tok.decode(ids) == reference.decode(ids) == text
    assert tok.encode("<|start_header_id|>x<|end_header_id|>")[::2] == [n + 6, n + 7]


def test_tiktoken_config_renames_special_tokens(tmp_path):
    folder = build_tiktoken_folder(tmp_path / "tt")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    n = min(int(i) for i in config["added_tokens_decoder"])
    config["added_tokens_decoder"][str(n + 5)]["content"] = "<|custom|>"  # replaces <|step_id|>
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.encode("<|custom|>") == [n + 5]
    assert len(tok.encode("<|step_id|>")) > 1
    assert tok.decode([n + 5]) == "<|custom|>"


# ------------------------------------------------------------------------------------ sentencepiece options


@pytest.mark.parametrize("option", [{"legacy": True}, {"add_prefix_space": False}])
def test_sentencepiece_prefix_options_match_transformers(tmp_path, option):
    folder = build_sentencepiece_folder(tmp_path / "sp")
    config = json.loads((folder / "tokenizer_config.json").read_text()) | option
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = load_tokenizer(folder), hf_tokenizer(folder)
    for text in TEXTS + random_texts(100, seed=6):
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), (option, text)
        assert tok.decode(ids) == hf.decode(ids), (option, text)


def test_sentencepiece_folder_saved_by_transformers_reads_the_same(tmp_path, folders):
    """transformers saves a converted tokenizer.json; that folder and the tokenizer.model one agree."""
    saved = tmp_path / "saved"
    hf_tokenizer(folders["sentencepiece"]).save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file()
    via_model, via_json = load_tokenizer(folders["sentencepiece"]), load_tokenizer(saved)
    for text in TEXTS + random_texts(100, seed=7):
        assert via_json.encode(text) == via_model.encode(text), text
    assert (via_json.bos_id, via_json.eos_id, via_json.pad_id, via_json.vocab_size, via_json.add_bos_token) == (
        via_model.bos_id, via_model.eos_id, via_model.pad_id, via_model.vocab_size, via_model.add_bos_token)
    assert via_json.chat_template == via_model.chat_template
    assert via_json.encode_chat(CHATS[0]) == via_model.encode_chat(CHATS[0])


# --------------------------------------------------------------------------------------- config variants


def test_config_variants(tmp_path):
    folder = build_bpe_folder(tmp_path / "bpe")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "A"}]
    config["eos_token"] = {"content": "<|im_end|>", "lstrip": False, "rstrip": False}
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "eos_token": "x"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    tok = load_tokenizer(folder)
    assert tok.chat_template == "A"
    assert (tok.eos_id, tok.pad_id) == (2, 0)  # config wins over special_tokens_map; the map fills in pad
    assert tok.stop_ids == {2, 0, 1}  # eos, <|endoftext|> (end of text), generation_config's id
    (folder / "chat_template.jinja").write_text("B")  # transformers 5's file wins over the config
    assert load_tokenizer(folder).chat_template == "B"


# ------------------------------------------------------------------------------------------------ errors


def test_missing_or_broken_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"empty.*no tokenizer.json or tokenizer.model"):
        load_tokenizer(empty)
    (empty / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"empty/tokenizer.json"):
        load_tokenizer(empty)
    (empty / "tokenizer.json").unlink()
    (empty / "tokenizer.model").write_bytes(b"\x00\xff\x10 not a model \x8a")
    with pytest.raises(ValueError, match=r"empty/tokenizer.model"):
        load_tokenizer(empty)
    (empty / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"empty/tokenizer_config.json"):
        load_tokenizer(empty)


def test_template_errors_name_the_folder(folders):
    tok = load_tokenizer(folders["bpe"])
    where = str(folders["bpe"])
    with pytest.raises(ValueError, match="Unknown role: tool") as err:  # the template's raise_exception
        tok.apply_chat_template([{"role": "tool", "content": "42"}])
    assert where in str(err.value)
    with pytest.raises(ValueError, match="roles must alternate"):
        load_tokenizer(folders["sentencepiece"]).encode_chat([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="invalid chat template") as err:
        tok.with_chat_template("{% for m in messages %}")
    assert where in str(err.value)
    with pytest.raises(ValueError, match="chat template failed"):
        tok.with_chat_template("{{ messages[0].content + 1 }}").apply_chat_template(CHATS[1])
    with pytest.raises(ValueError, match="list of dicts"):
        tok.apply_chat_template("hello")
    with pytest.raises(ValueError, match="empty conversation"):
        tok.encode_chat(iter([]))


def test_unmaskable_assistant_content(folders):
    tok = load_tokenizer(folders["bpe"])
    shouting = tok.with_chat_template("{% for m in messages %}{{ m.role }}: {{ m.content | upper }}\n{% endfor %}")
    with pytest.raises(ValueError, match="assistant message 1"):
        shouting.encode_chat(CHATS[1])
    parts = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    with pytest.raises(ValueError, match="non-string content"):
        tok.with_chat_template("{{ messages | tojson }}").encode_chat(parts)
