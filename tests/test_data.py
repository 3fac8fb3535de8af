"""The data pipeline: sources, formats and masks, tokenizing, batching (padded / packed), the resumable loader."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
import torch
import torch.nn.functional as F
from ftprog.core import from_config
from ftprog.core._data import (
    IGNORE_INDEX,
    Batch,
    DataConfig,
    DataError,
    DataLoader,
    Format,
    Row,
    TokenizedDataset,
    collate_packed,
    collate_padded,
    data_files,
    load_datasets,
    pack_rows,
    read_rows,
    split_validation,
    tokenize_dataset,
)
from ftprog.core._tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from _hubserver import FakeHub
from _tokfixtures import build_bpe_folder, build_sentencepiece_folder, build_tiktoken_folder

# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """Qwen-like byte-level BPE with a ChatML template: eos <|im_end|>, pad <|endoftext|>, no bos."""
    return load_tokenizer(build_bpe_folder(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """Llama 2-like sentencepiece tokenizer: bos <s>, eos </s>, no pad, Llama 2 template."""
    return load_tokenizer(build_sentencepiece_folder(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def bare_tok(tmp_path_factory):
    """Llama 3 "original" tiktoken folder: no tokenizer_config.json, so no chat template."""
    return load_tokenizer(build_tiktoken_folder(tmp_path_factory.mktemp("tk"), with_config=False))


@pytest.fixture(scope="module")
def model(tok):
    cfg = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": tok.vocab_size,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False}
    return from_config(cfg, seed=0)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


CHAT = [
    {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "The fox runs."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"},
                  {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Thanks!"},
                  {"role": "assistant", "content": "You're welcome."}]},
]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` conversations of varied lengths (1-3 exchanges)."""
    g = torch.Generator().manual_seed(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "capital", "France",
             "Paris", "fine", "thanks"]
    out = []
    for i in range(n):
        msgs = []
        for _ in range(1 + i % 3):
            k = int(torch.randint(2, 12, (1,), generator=g))
            pick = lambda m: " ".join(words[j] for j in torch.randint(0, len(words), (m,), generator=g))
            msgs += [{"role": "user", "content": pick(k)}, {"role": "assistant", "content": pick(k + 3)}]
        out.append({"messages": msgs})
    return out


# ---------------------------------------------------------------------------------------------------- sources


def test_read_jsonl_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    rows = read_rows(f)
    assert [r.data for r in rows] == [{"text": "a"}, {"text": "b"}]
    assert [r.line for r in rows] == [1, 3]
    assert rows[1].where == f"{f}:3"


def test_read_json_array_object_and_jsonl_fallback(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"text": "x"}]}))
    (tmp_path / "c.json").write_text(json.dumps({"train": [{"text": "t"}], "test": [{"text": "u"}]}))
    (tmp_path / "d.json").write_text('{"text": "x"}\n{"text": "y"}\n')
    rows = read_rows(tmp_path / "a.json")
    assert [r.data["text"] for r in rows] == ["x", "y"] and [r.row for r in rows] == [1, 2]
    assert rows[1].where == f"{tmp_path / 'a.json'} row 2"
    assert [r.data["text"] for r in read_rows(tmp_path / "b.json")] == ["x"]
    assert [r.data["text"] for r in read_rows(tmp_path / "c.json")] == ["t"]
    assert [r.data["text"] for r in read_rows(tmp_path / "c.json", split="test")] == ["u"]
    assert [r.line for r in read_rows(tmp_path / "d.json")] == [1, 2]
    (tmp_path / "e.json").write_text('[{"text": "x"},\n {"text": }]')
    with pytest.raises(DataError, match=r"e\.json: invalid JSON at line 2"):
        read_rows(tmp_path / "e.json")
    (tmp_path / "f.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="f.json: expected a JSON array"):
        read_rows(tmp_path / "f.json")


def test_read_csv(tmp_path, tok):
    f = tmp_path / "d.csv"
    f.write_text('prompt,completion\n"Say hi","Hi!"\n"Two\nlines","ok"\n"x","y"\n', encoding="utf-8")
    rows = read_rows(f)
    assert [r.data for r in rows] == [{"prompt": "Say hi", "completion": "Hi!"},
                                      {"prompt": "Two\nlines", "completion": "ok"}, {"prompt": "x", "completion": "y"}]
    assert [(r.row, r.line) for r in rows] == [(1, 2), (2, 3), (3, 5)]
    data = tokenize_dataset(rows, tok, "instruct", 64, columns={"instruction": "prompt", "output": "completion"})
    assert len(data) == 3
    ids, mask = data[1]
    assert "Two\nlines" in tok.decode(ids)
    assert trained_text(tok, ids, mask) == "ok<|im_end|>"


def test_read_parquet_nested_chat(tmp_path, tok):
    f = write_parquet(tmp_path / "d.parquet", CHAT[:1] * 3)
    rows = read_rows(f)
    assert [r.row for r in rows] == [1, 2, 3]
    assert rows[0].data == CHAT[0]
    data = tokenize_dataset(rows, tok, "chat", 128)
    assert trained_text(tok, *data[0]) == "The fox runs.<|im_end|>"


def test_read_txt_paragraphs(tmp_path, sp_tok):
    f = tmp_path / "d.txt"
    f.write_text("First paragraph\nstill first.\n\n\n  \nSecond one.\n\nThird\n", encoding="utf-8")
    rows = read_rows(f)
    assert [r.data["text"] for r in rows] == ["First paragraph\nstill first.", "Second one.", "Third"]
    assert [r.line for r in rows] == [1, 6, 8]
    data = tokenize_dataset(rows, sp_tok, "text", 64)
    ids, mask = data[0]
    assert ids.tolist() == sp_tok.encode("First paragraph\nstill first.", add_bos=True, add_eos=True)
    assert ids[0] == sp_tok.bos_id and ids[-1] == sp_tok.eos_id
    assert mask.tolist() == [False] + [True] * (len(ids) - 1)


def test_read_directory_sorted_and_splits(tmp_path):
    d = tmp_path / "plain"
    write_jsonl(d / "b.jsonl", [{"text": "b"}])
    write_jsonl(d / "a.jsonl", [{"text": "a"}])
    write_parquet(d / "sub" / "c.parquet", [{"text": "c"}])
    (d / "README.md").write_text("# not data")
    (d / "dataset_info.json").write_text("{}")
    (d / ".hidden.jsonl").write_text('{"text": "h"}\n')
    assert [r.data["text"] for r in read_rows(d)] == ["a", "b", "c"]  # no split names: all train
    with pytest.raises(DataError, match="no files for split 'test'"):
        read_rows(d, split="test")

    s = tmp_path / "splits"
    write_jsonl(s / "data" / "train-00000-of-00002.jsonl", [{"text": "t0"}])
    write_jsonl(s / "data" / "train-00001-of-00002.jsonl", [{"text": "t1"}])
    write_jsonl(s / "data" / "validation-00000-of-00001.jsonl", [{"text": "v"}])
    write_jsonl(s / "test" / "part.jsonl", [{"text": "x"}])
    assert [r.data["text"] for r in read_rows(s)] == ["t0", "t1"]
    assert [r.data["text"] for r in read_rows(s, split="validation")] == ["v"]
    assert [r.data["text"] for r in read_rows(s, split="test")] == ["x"]
    assert [p.name for p in data_files(s, split="train")] == ["train-00000-of-00002.jsonl",
                                                             "train-00001-of-00002.jsonl"]
    # The synonyms datasets knows: training -> train, dev -> validation, evaluation -> test.
    y = tmp_path / "synonyms"
    for name, text in (("training.jsonl", "t"), ("dev.jsonl", "v"), ("evaluation-0.jsonl", "x")):
        write_jsonl(y / name, [{"text": text}])
    assert [[r.data["text"] for r in read_rows(y, split=split)] for split in ("train", "validation", "test")] == \
        [["t"], ["v"], ["x"]]


def test_missing_source_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(tmp_path / "x.xml")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_rows(tmp_path / "empty.jsonl")


HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    from ftprog.core._data import DataError, read_rows
    out = {}
    for split in ("train", "test"):
        out[split] = [r.data["text"] for r in read_rows("org/tiny", split=split)]
    out["again"] = [r.data["text"] for r in read_rows("org/tiny")]
    out["files"] = sorted({r.file.split("snapshots/")[1].split("/", 1)[1] for r in read_rows("org/tiny")})
    try:
        read_rows("org/missing")
    except DataError as e:
        out["missing"] = str(e)
    print(json.dumps(out))
""")


def test_hub_dataset_download(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet_bytes(texts):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{"text": t} for t in texts]), buf)
        return buf.getvalue()

    with FakeHub() as hub:
        hub.add("org/tiny", {
            "README.md": "---\nlicense: mit\n---\n",
            "data/train-00000-of-00001.parquet": parquet_bytes(["p0", "p1"]),
            "data/test-00000-of-00001.parquet": parquet_bytes(["q0"]),
            "data/train.jsonl": '{"text": "same data as json lines"}\n',  # another format: ignored
        }, repo_type="dataset")
        hub.add("org/some-model", {"config.json": "{}"})  # model repos are served too
        env = {**os.environ, **hub.env(tmp_path / "hf_home")}
        proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, check=False,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        downloads = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert out["train"] == ["p0", "p1"] and out["again"] == ["p0", "p1"]
    assert out["test"] == ["q0"]
    assert out["files"] == ["data/train-00000-of-00001.parquet"]
    assert "org/missing" in out["missing"] and "could not download" in out["missing"]
    assert not any(p.endswith("README.md") for p in downloads)
    assert len(downloads) == len(set(downloads)) == 3  # each data file fetched once, then served from the cache
    assert (tmp_path / "hf_home" / "hub" / "datasets--org--tiny").is_dir()


# ------------------------------------------------------------------------------------------- formats / masks


def test_instruct_mapping_and_mask(tok):
    rows = [Row({"prompt": "Summarise", "ctx": "The dog sleeps.", "completion": "A dog naps."}, "mem", line=1),
            Row({"prompt": "Say hi", "ctx": "", "completion": "Hi!"}, "mem", line=2)]
    data = tokenize_dataset(rows, tok, "instruct", 128, system_prompt="Be brief.",
                            columns={"instruction": "prompt", "input": "ctx", "output": "completion"})
    ids, mask = data[0]
    expected = tok.encode_chat([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Summarise\n\nThe dog sleeps."},
                                {"role": "assistant", "content": "A dog naps."}])[0]
    assert ids.tolist() == expected
    assert trained_text(tok, ids, mask) == "A dog naps.<|im_end|>"
    assert "<|im_start|>user\nSay hi<|im_end|>" in tok.decode(data[1][0])
    assert data.stats.trained_tokens == int(data.mask.sum())


def test_chat_openai_and_sharegpt_match(tok):
    to_sharegpt = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [Row(CHAT[1], "a", line=1),
            Row({"conversations": [{"from": to_sharegpt[m["role"]], "value": m["content"]}
                                   for m in CHAT[1]["messages"]]}, "b", line=1)]
    data = tokenize_dataset(rows, tok, "chat", 256)
    (ids0, mask0), (ids1, mask1) = data[0], data[1]
    assert torch.equal(ids0, ids1) and torch.equal(mask0, mask1)
    assert trained_text(tok, ids0, mask0) == "Paris.<|im_end|>You're welcome.<|im_end|>"
    assert "Be brief." in tok.decode(ids0)
    everything = tokenize_dataset(rows[:1], tok, "chat", 256, train_on_input=True)
    assert everything[0][1].tolist() == [False] + [True] * (len(ids0) - 1)
    # a column mapping names the conversation column
    mapped = tokenize_dataset([Row({"dialog": CHAT[1]["messages"]}, "c", line=1)], tok, "chat", 256,
                              columns={"messages": "dialog"})
    assert torch.equal(mapped[0][0], ids0)


def test_auto_format(tok, sp_tok):
    rows = [Row(CHAT[0], "f", line=1)]
    assert torch.equal(tokenize_dataset(rows, tok, "auto", 64)[0][0], tokenize_dataset(rows, tok, "chat", 64)[0][0])
    rows = [Row({"instruction": "Say hi", "output": "Hi!"}, "f", line=1)]
    assert trained_text(tok, *tokenize_dataset(rows, tok, "auto", 64)[0]) == "Hi!<|im_end|>"
    rows = [Row({"text": "Hello world"}, "f", line=1)]
    assert tokenize_dataset(rows, sp_tok, "auto", 64)[0][0][0] == sp_tok.bos_id
    with pytest.raises(DataError, match="f:1: cannot detect the data format"):
        tokenize_dataset([Row({"foo": 1}, "f", line=1)], tok, "auto", 64)


def test_text_without_bos(tok):
    ids, mask = tokenize_dataset([Row({"body": "Hello world"}, "f", line=1)], tok, "text", 64,
                                 columns={"text": "body"})[0]
    assert ids.tolist() == tok.encode("Hello world") + [tok.eos_id]  # no bos token in this vocabulary
    assert mask.tolist() == [False] + [True] * (len(ids) - 1)


def test_no_chat_template(bare_tok):
    rows = [Row(CHAT[0], "f", line=1)]
    with pytest.raises(DataError, match="no chat template.*chatml"):
        tokenize_dataset(rows, bare_tok, "chat", 128)
    ids, mask = tokenize_dataset(rows, bare_tok, "chat", 128, template="chatml")[0]
    text = bare_tok.decode(ids)
    assert text.startswith("<|im_start|>user\nHello there")
    assert trained_text(bare_tok, ids, mask).startswith("The fox runs.")
    assert tokenize_dataset([Row({"text": "hi"}, "f", line=1)], bare_tok, "text", 16)[0][0][0] == bare_tok.bos_id


# ---------------------------------------------------------------------------------------------- bad rows


BAD = [
    # (file name, content lines, format, location, message)
    ("d.jsonl", ['{"text": "ok"}', '{"text": "broken"', '{"text": "ok"}'], "text", ":2", "invalid JSON"),
    ("d.jsonl", ['{"text": "ok"}', '[1, 2]'], "text", ":2", "expected a JSON object"),
    ("d.jsonl", ['{"text": "ok"}', '{"body": "x"}'], "text", ":2", "missing field 'text'"),
    ("d.jsonl", ['{"text": 5}'], "text", ":1", "should be a string, got a number"),
    ("d.jsonl", ['{"text": "ok"}', '{"text": "  "}'], "text", ":2", "empty field 'text'"),
    ("d.jsonl", ['{"instruction": "a", "output": ""}'], "instruct", ":1", "empty field 'output'"),
    ("d.jsonl", ['{"instruction": "a"}'], "instruct", ":1", "missing field 'output'"),
    ("d.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'], "chat", ":1", "no assistant turn"),
    ("d.jsonl", ['{"messages": [{"role": "robot", "content": "hi"}]}'], "chat", ":1", "unsupported role"),
    ("d.jsonl", ['{"messages": "hello"}'], "chat", ":1", "not JSON"),
    ("d.jsonl", ['{"messages": {"a": 1}}'], "chat", ":1", "should be a list of messages"),
    ("d.jsonl", ['{"conversations": [{"speaker": "x"}]}'], "chat", ":1", "neither 'role'"),
    ("d.csv", ["text", "ok", '"a","b"'], "text", " row 2 (line 3)", "has 2 fields, the header has 1"),
    ("d.json", ['[{"text": "ok"}, "oops"]'], "text", " row 2", "expected a JSON object, got a string"),
]


def _write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name,lines,fmt,where,message", BAD, ids=[b[4] for b in BAD])
def test_bad_rows_name_file_and_line(tmp_path, tok, name, lines, fmt, where, message):
    f = _write_lines(tmp_path / name, lines)
    with pytest.raises(DataError) as err:
        tokenize_dataset(read_rows(f), tok, fmt, 64)
    assert f"{f}{where}: " in str(err.value) and message in str(err.value)


def test_skip_bad_counts(tmp_path, tok):
    f = _write_lines(tmp_path / "d.jsonl", ['{"text": "one"}', "not json", '{"text": ""}', '{"text": "two"}',
                                            '{"x": 1}'])
    data = tokenize_dataset(read_rows(f), tok, "text", 64, skip_bad=True)
    assert len(data) == 2 and data.stats.rows == 5 and data.stats.skipped == 3
    assert data.stats.skipped_examples[0].startswith(f"{f}:2: invalid JSON")
    assert "3 bad rows skipped" in data.stats.summary()


def test_empty_dataset_is_an_error(tmp_path, tok):
    f = _write_lines(tmp_path / "d.jsonl", ['{"output": "x"}', '{"output": "y"}'])
    with pytest.raises(DataError, match=r"no usable samples .*2 bad rows skipped.*missing field 'instruction'"):
        tokenize_dataset(read_rows(f), tok, "instruct", 64, skip_bad=True)
    with pytest.raises(DataError, match="no usable samples"):
        load_datasets(DataConfig(str(f), format="instruct", skip_bad=True), tok)


def test_truncation_and_no_target_drops(tok):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 10
    rows = [Row({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_answer}]},
                "f", line=1),
            Row({"messages": [{"role": "user", "content": "Hello, world! " * 30},
                              {"role": "assistant", "content": "ok"}]}, "f", line=2),
            Row(CHAT[0], "f", line=3)]
    full = tokenize_dataset(rows, tok, "chat", 4096)
    assert full.stats.truncated == 0 and len(full) == 3
    cut = tokenize_dataset(rows, tok, "chat", 60)
    # row 1 is cut inside the answer (kept), row 2's answer lies past token 60 (dropped), row 3 fits
    assert cut.stats.truncated == 2 and cut.stats.no_targets == 1 and len(cut) == 2
    assert cut.lengths.tolist() == [60, len(full[2][0])]
    assert cut[0][0].tolist() == full[0][0][:60].tolist()
    assert cut.stats.tokens == int(cut.lengths.sum())


def test_a_huge_row_is_truncated_without_tokenizing_all_of_it(tok):
    """A 10 MB single-line sample took 4 GB to tokenize before being cut to seq_len: only a prefix long enough for
    seq_len tokens is tokenized now, and the tokens kept are those of the whole text."""
    words = "the quick brown fox jumps over the lazy dog, hello world! "
    huge = (words * (2_000_000 // len(words)))[:2_000_000]
    rows = [Row({"text": huge}, "f", line=1),
            Row({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": huge}]}, "f",
                line=2)]
    whole = tok.encode(huge[:20_000])  # far more than seq_len tokens: its first ones are the huge text's
    encoded = []

    class Recording:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text, **kwargs):
            encoded.append(len(text))
            return tok.encode(text, **kwargs)

        def with_chat_template(self, template):
            return tok.with_chat_template(template)

    text = tokenize_dataset(rows[:1], Recording(), "text", 128)
    assert text.stats.truncated == 1 and text[0][0].tolist() == whole[:128]
    assert max(encoded) <= 16 * (128 + 16) * 2
    chat = tokenize_dataset(rows[1:], tok, "chat", 128)
    reference = tokenize_dataset([Row({"messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": huge[:20_000]}]}, "f", line=2)],
                                 tok, "chat", 128)
    assert chat.stats.truncated == 1 and chat[0][0].tolist() == reference[0][0].tolist()
    assert chat[0][1].tolist() == reference[0][1].tolist()


# ------------------------------------------------------------------------------------------------ batching


def _dataset(tok, n=12, seq_len=96, seed=0) -> TokenizedDataset:
    rows = [Row(r, "mem", line=i + 1) for i, r in enumerate(chat_rows(n, seed))]
    return tokenize_dataset(rows, tok, "chat", seq_len)


def _sum_loss(model, tokens, targets, **kwargs) -> torch.Tensor:
    logits = model(tokens, **kwargs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _reference_loss(model, samples) -> torch.Tensor:
    """Each sample alone, unpadded: the summed next-token loss over its trained tokens."""
    total = torch.zeros((), dtype=torch.float64)
    for ids, mask in samples:
        logits = model(ids[None])[0, :-1]
        targets = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
        total += F.cross_entropy(logits.double(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def test_packed_batch_equals_unpadded_samples(tok, model):
    data = _dataset(tok, n=10, seq_len=192)
    loader = DataLoader(data, batch_size=3, packing=True, seed=1)
    batch = next(iter(loader))
    rows = pack_rows(data.lengths.tolist(), loader.order(0), 192)[:3]
    assert batch.shape == (3, 192) and batch.attention_mask is None
    assert any(len(r) > 1 for r in rows), "the test needs rows holding several samples"
    samples = [data[i] for row in rows for i in row]
    assert batch.num_targets == int((batch.targets != IGNORE_INDEX).sum()) == sum(int(m.sum()) for _, m in samples)
    # positions restart per sample; a sample's last token predicts nothing
    for r, row in enumerate(rows):
        starts = torch.tensor(data.lengths.tolist())[row].cumsum(0) - torch.tensor(data.lengths.tolist())[row]
        assert (batch.position_ids[r, starts] == 0).all()
        assert (batch.targets[r, starts[1:] - 1] == IGNORE_INDEX).all()
    with torch.no_grad():
        packed = _sum_loss(model, batch.tokens, batch.targets, **batch.model_kwargs())
        reference = _reference_loss(model, samples)
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=0)


def test_padded_batch_equals_unpadded_samples(tok, model):
    data = _dataset(tok, n=10, seq_len=96)
    loader = DataLoader(data, batch_size=4, seed=3, pad_to_multiple_of=8)
    batch = next(iter(loader))
    samples = [data[i] for i in loader.order(0)[:4]]
    longest = max(len(ids) for ids, _ in samples)
    assert batch.shape == (4, min(96, -(-longest // 8) * 8)) and batch.position_ids is None
    assert batch.attention_mask.sum(1).tolist() == [len(ids) for ids, _ in samples]
    assert (batch.tokens[batch.attention_mask == 0] == tok.pad_id).all()
    with torch.no_grad():
        padded = _sum_loss(model, batch.tokens, batch.targets, **batch.model_kwargs())
        unmasked = _sum_loss(model, batch.tokens, batch.targets)  # right padding + causal: the mask is optional
        reference = _reference_loss(model, samples)
    torch.testing.assert_close(padded, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(unmasked, reference, rtol=1e-5, atol=0)


def test_collate_details():
    a = (torch.tensor([5, 6, 7]), torch.tensor([False, False, True]))
    b = (torch.tensor([8, 9]), torch.tensor([False, True]))
    padded = collate_padded([a, b], pad_id=0)
    assert padded.tokens.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded.targets.tolist() == [[-100, 7, -100], [9, -100, -100]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert (padded.num_targets, padded.num_tokens) == (2, 5)
    packed = collate_packed([[a, b]], pad_id=0, seq_len=7)
    assert packed.tokens.tolist() == [[5, 6, 7, 8, 9, 0, 0]]
    assert packed.targets.tolist() == [[-100, 7, -100, 9, -100, -100, -100]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert (packed.num_targets, packed.num_tokens) == (2, 5)


def _best_fit_loads(lengths, seq_len):
    """Reference best-fit decreasing, the obvious quadratic way: the token count of each row, in opening order."""
    loads = []
    for n in sorted(lengths, reverse=True):
        fits = [r for r, used in enumerate(loads) if used + n <= seq_len]
        if fits:
            loads[max(fits, key=loads.__getitem__)] += n  # least room left that still fits
        else:
            loads.append(n)
    return loads


def _check_rows(rows, lengths, order, seq_len):
    position = {i: p for p, i in enumerate(order)}
    assert sorted(i for row in rows for i in row) == sorted(order)  # every sample exactly once
    assert all(row and sum(lengths[i] for i in row) <= seq_len for row in rows)
    assert all([position[i] for i in row] == sorted(position[i] for i in row) for row in rows)  # in `order` order


def test_pack_rows_best_fit_decreasing():
    assert pack_rows([3, 3, 2, 2], [0, 1, 2, 3], 5) == [[0, 3], [1, 2]]  # next-fit needs 3 rows
    assert pack_rows([3, 2, 4, 1], [0, 1, 2, 3], 5) == [[2, 3], [0, 1]]  # `order` ascending: longest first
    # rows rank as order[r] for the r-th row opened; members in `order` order
    assert pack_rows([3, 3, 2, 2], [3, 1, 0, 2], 5) == [[3, 0], [1, 2]]
    assert pack_rows([4], iter([0]), 4) == [[0]] and pack_rows([], [], 8) == []
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):  # the loads of best-fit decreasing, whatever `order` (ties do not change them)
        n, seq_len = int(torch.randint(1, 30, (), generator=rng)), int(torch.randint(4, 40, (), generator=rng))
        lengths = torch.randint(1, seq_len + 1, (n,), generator=rng).tolist()
        order = torch.randperm(n, generator=rng).tolist()
        rows = pack_rows(lengths, order, seq_len)
        _check_rows(rows, lengths, order, seq_len)
        loads = sorted(sum(lengths[i] for i in row) for row in rows)
        assert loads == sorted(_best_fit_loads(lengths, seq_len)), (lengths, seq_len)
        assert rows == pack_rows(tuple(lengths), iter(order), seq_len)  # deterministic
    with pytest.raises(ValueError, match=r"sample 3 has 9 tokens, more than seq_len=8"):
        pack_rows([1, 10, 2, 9], [0, 3, 1, 2], 8)  # the first too-long sample in `order`


def _workload_lengths(n, seed):
    """Lengths like benchmarks/workload.py: log-normal, median 160, sigma 0.6, cut to [16, 512]."""
    rng = random.Random(seed)
    return [max(16, min(512, round(rng.lognormvariate(math.log(160), 0.6)))) for _ in range(n)]


def _next_fit(lengths, order, seq_len):
    rows = []
    for i in order:
        if rows and sum(lengths[j] for j in rows[-1]) + lengths[i] <= seq_len:
            rows[-1].append(i)
        else:
            rows.append([i])
    return rows


def test_pack_rows_little_padding_in_random_row_order():
    padding = lambda rows, lengths: 1 - sum(lengths[i] for row in rows for i in row) / (len(rows) * 512)
    lengths = _workload_lengths(10_000, seed=0)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    rows = pack_rows(lengths, order, 512)
    _check_rows(rows, lengths, order, 512)
    # measured: next-fit 21.6%, best-fit decreasing 0.3% (the benchmark's 96 samples: 22.2% -> 2.7%)
    assert padding(_next_fit(lengths, order, 512), lengths) > 0.15
    assert padding(rows, lengths) < 0.05
    assert rows == pack_rows(lengths, order, 512)
    # another order: other rows, as many of them
    other = pack_rows(lengths, torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist(), 512)
    assert len(other) == len(rows) and {tuple(sorted(r)) for r in other} != {tuple(sorted(r)) for r in rows}

    # the row order is random, not by length or by how many samples a row holds: compare the first and last fifth
    def first_and_last(stat, rows):
        k = len(rows) // 5
        return [sum(stat(r) for r in part) / len(part) for part in (rows[:k], rows[-k:])]

    longest = lambda row: max(lengths[i] for i in row)
    top = sorted(lengths, reverse=True)[:20]
    assert sorted((longest(r) for r in rows[:20]), reverse=True) != top
    first, last = first_and_last(longest, rows)
    assert abs(first - last) < 15, (first, last)
    first, last = first_and_last(len, rows)
    assert abs(first - last) < 0.3, (first, last)
    # small datasets too (ranking rows by their members' smallest position fails this: 3.2 vs 2.0 samples a row)
    counts = [0.0, 0.0]
    for seed in range(100):
        lengths = _workload_lengths(96, seed)
        order = torch.randperm(96, generator=torch.Generator().manual_seed(seed)).tolist()
        counts = [c + x / 100 for c, x in zip(counts, first_and_last(len, pack_rows(lengths, order, 512)))]
    assert abs(counts[0] - counts[1]) < 0.3, counts


def _same(a: Batch, b: Batch) -> bool:
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("packing", [False, True])
def test_loader_resumes_exactly(tok, packing):
    data = _dataset(tok, n=23, seq_len=64)
    make = lambda: DataLoader(data, batch_size=2, packing=packing, seed=7)
    reference = make()
    per_epoch = [reference.num_batches(e) for e in range(3)]
    stream = reference.forever()
    uninterrupted = [next(stream) for _ in range(sum(per_epoch))]
    assert sum(b.num_targets for b in uninterrupted[:per_epoch[0]]) == data.num_targets  # every target once
    for k in (1, per_epoch[0] - 1, per_epoch[0], per_epoch[0] + 2):  # mid-epoch, at and across the boundary
        first = make()
        stream = first.forever()
        consumed = [next(stream) for _ in range(k)]
        state = first.state_dict()
        assert all(_same(x, y) for x, y in zip(consumed, uninterrupted))
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        stream = resumed.forever()
        rest = [next(stream) for _ in range(len(uninterrupted) - k)]
        assert all(_same(x, y) for x, y in zip(rest, uninterrupted[k:])), f"resume after {k} batches"
    # one-epoch iteration: the state after the last batch points at the next epoch
    loader = make()
    assert len(list(loader)) == per_epoch[0] and loader.state_dict() == {"epoch": 1, "batch_index": 0}
    # the order depends on (seed, epoch) only
    assert loader.order(0) == make().order(0) != loader.order(1)
    assert DataLoader(data, 2, seed=8).order(0) != loader.order(0)
    assert DataLoader(data, 2, shuffle=False).order(3) == list(range(len(data)))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_cover_the_global_batch(tok, packing, world_size):
    data = _dataset(tok, n=21, seq_len=64)
    whole = DataLoader(data, batch_size=4, packing=packing, seed=2)
    ranks = [DataLoader(data, batch_size=4, packing=packing, seed=2, rank=r, world_size=world_size)
             for r in range(world_size)]
    assert all(r.batches_per_epoch == whole.batches_per_epoch for r in ranks)

    def rows_of(batch):  # each row's real tokens (padding stripped), as a tuple
        keep = batch.attention_mask.bool() if batch.attention_mask is not None else torch.ones_like(batch.tokens,
                                                                                                   dtype=torch.bool)
        return [tuple(batch.tokens[i][keep[i]].tolist()) for i in range(batch.tokens.shape[0])]

    for full, *parts in zip(whole, *ranks):
        pieces = [rows_of(p) for p in parts]
        assert sorted(row for piece in pieces for row in piece) == sorted(rows_of(full))  # disjoint cover
        assert all(p.global_num_targets == full.num_targets for p in parts)
        assert sum(p.num_targets for p in parts) == full.num_targets
    with pytest.raises(ValueError, match="multiple of world_size"):
        DataLoader(data, batch_size=3, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_fixed_shape_fills_the_last_packed_batch_with_empty_rows(tok, world_size):
    data = _dataset(tok, n=21, seq_len=64)
    plain = DataLoader(data, batch_size=4, packing=True, seed=2)
    assert plain._plan(0)[-1] and len(plain._plan(0)[-1]) < 4  # the case being tested: a short last batch
    for rank in range(world_size):
        fixed = DataLoader(data, batch_size=4, packing=True, seed=2, fixed_shape=True, rank=rank,
                           world_size=world_size)
        sliced = DataLoader(data, batch_size=4, packing=True, seed=2, rank=rank, world_size=world_size)
        assert fixed.batches_per_epoch == plain.batches_per_epoch
        for a, b in zip(fixed, sliced):
            assert a.tokens.shape == (4 // world_size, 64)
            n = b.tokens.shape[0]  # the same rows first, then empty ones: all padding, no targets
            assert torch.equal(a.tokens[:n], b.tokens) and torch.equal(a.targets[:n], b.targets)
            assert (a.tokens[n:] == data.pad_id).all() and (a.targets[n:] == -100).all()
            assert (a.num_targets, a.num_tokens, a.global_num_targets) == (b.num_targets, b.num_tokens,
                                                                           b.global_num_targets)
    with pytest.raises(ValueError, match="fixed_shape needs packing"):
        DataLoader(data, 4, fixed_shape=True)


def test_drop_last_and_lengths(tok):
    data = _dataset(tok, n=10, seq_len=64)
    assert DataLoader(data, 4).batches_per_epoch == 3
    loader = DataLoader(data, 4, drop_last=True)
    assert loader.batches_per_epoch == 2 and all(b.tokens.shape[0] == 4 for b in loader)
    packed = DataLoader(data, 2, packing=True)
    assert packed.total_batches(2) == packed.num_batches(0) + packed.num_batches(1)
    assert len({packed.num_batches(e) for e in range(4)}) == 1  # the row count depends on the lengths only
    assert packed._plan(0) != packed._plan(1)  # but the rows change with the epoch
    with pytest.raises(ValueError, match="more than seq_len"):
        DataLoader(data, 2, packing=True, seq_len=8)


# ---------------------------------------------------------------------------------------------- validation


def test_split_validation(tok, tmp_path):
    data = _dataset(tok, n=20, seq_len=64)
    train, val = split_validation(data, 0.25, seed=0)
    assert (len(train), len(val)) == (15, 5)
    again = split_validation(data, 0.25, seed=0)[1]
    assert torch.equal(val.ids, again.ids)
    all_ids = {tuple(data[i][0].tolist()) for i in range(len(data))}
    parts = [{tuple(d[i][0].tolist()) for i in range(len(d))} for d in (train, val)]
    assert parts[0] | parts[1] == all_ids and not parts[0] & parts[1]
    assert val.stats.samples == 5 and val.stats.trained_tokens == val.num_targets
    rows = [Row({"text": str(i)}, "f", line=i) for i in range(10)]
    rtrain, rval = split_validation(rows, 3, seed=1)
    assert len(rval) == 3 and sorted(r.line for r in rtrain + rval) == list(range(10))
    with pytest.raises(DataError, match="cannot hold out 10 of 10 samples for validation and still train"):
        split_validation(rows, 10)

    f = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    g = write_jsonl(tmp_path / "val.jsonl", chat_rows(3, seed=5))
    train, val = load_datasets(DataConfig(str(f), seq_len=64, val_fraction=0.25), tok)
    assert (len(train), len(val)) == (6, 2)
    train, val = load_datasets(DataConfig(str(f), seq_len=64, val_path=str(g)), tok)
    assert (len(train), len(val)) == (8, 3)
    train, val = load_datasets(DataConfig(str(tmp_path), seq_len=64, val_split="validation"), tok)
    assert (len(train), len(val)) == (8, 3)  # "val.jsonl" names the validation split
    assert load_datasets(DataConfig(str(f), seq_len=64), tok)[1] is None  # a single file has no other split
    # a program's own config object with the same attribute names
    section = SimpleNamespace(path=str(f), format="chat", split="train", columns={}, template="model",
                              system_prompt="", train_on_input=False, val_path="", val_split="validation",
                              val_fraction=2, skip_bad=False)
    train, val = load_datasets(section, tok, seq_len=64, seed=0)
    assert (len(train), len(val)) == (6, 2)
    train, val = load_datasets(SimpleNamespace(**{**vars(section), "path": str(tmp_path)}), tok, seq_len=64)
    assert (len(train), len(val)) == (8, 3)  # the folder's validation split wins over val_fraction


def test_format_validation():
    with pytest.raises(DataError, match="unknown data format"):
        Format("sharegpt")


# Gemma's chat template in its essentials: no system role (it raises), user/model turns.
GEMMA_LIKE_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_template_without_a_system_role_says_so_and_folds_on_request(tok, tmp_path):
    gemma_tok = tok.with_chat_template(GEMMA_LIKE_TEMPLATE)
    rows = [Row({"instruction": "reverse abc", "output": "cba", "system": "Be brief."}, "g.jsonl", line=1)]
    with pytest.raises(DataError, match=r"g.jsonl:1: .*the chat template has no system role \(System role not "
                                        r"supported\); set fold_system=true \(data.fold_system in sft\)"):
        tokenize_dataset(rows, gemma_tok, "instruct", 64)
    data = tokenize_dataset(rows, gemma_tok, "instruct", 64, fold_system=True)
    text = gemma_tok.decode(data[0][0].tolist())
    assert text.startswith("<start_of_turn>user\nBe brief.\n\nreverse abc<end_of_turn>\n<start_of_turn>model\ncba")
    chat = [Row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "c", line=1)]
    folded = tokenize_dataset(chat, gemma_tok, "chat", 64, system_prompt="Sys", fold_system=True)
    assert gemma_tok.decode(folded[0][0].tolist()).startswith("<start_of_turn>user\nSys\n\nhi<end_of_turn>")
    with pytest.raises(DataError, match="fold_system: the system message is not followed by a user turn"):
        tokenize_dataset([Row({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
                              "c", line=1)], gemma_tok, "chat", 64, fold_system=True)
    # generation's chat prompts follow the same rule
    from ftprog.programs.generate import GenerateConfig, encode_prompt

    cfg = GenerateConfig(chat=True, system_prompt="Be brief.")
    with pytest.raises(ValueError, match="the chat template has no system role"):
        encode_prompt(gemma_tok, "hi", cfg)
    ids = encode_prompt(gemma_tok, "hi", attrs.evolve(cfg, fold_system=True))
    assert gemma_tok.decode(ids) == "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
