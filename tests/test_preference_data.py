"""Preference data (issue 17): row layouts, masks, the shared prompt, truncation, bad rows, the loader."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from ftprog.core import (
    DataConfig, DataError, PreferenceBatch, PreferenceDataset, PreferenceLoader, load_datasets,
    load_preference_datasets, read_rows, tokenize_preferences,
)
from ftprog.core._data import IGNORE_INDEX, MIN_PROMPT_TOKENS, Row, split_validation
from ftprog.core._tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from _tokfixtures import build_bpe_folder, build_sentencepiece_folder


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """Qwen-like byte-level BPE, ChatML template (default system prompt), no bos, eos <|im_end|>."""
    return load_tokenizer(build_bpe_folder(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """Llama 2-like sentencepiece tokenizer: bos <s>, eos </s>, Llama 2 template."""
    return load_tokenizer(build_sentencepiece_folder(tmp_path_factory.mktemp("sp")))


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "capital", "France",
         "Paris", "fine", "thanks"]


def sentence(g: torch.Generator, n: int) -> str:
    return " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=g))


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 10, (1,), generator=g))
        out.append({"prompt": sentence(g, k), "chosen": sentence(g, k + 1) + " yes",
                    "rejected": sentence(g, 2 + i % 5)})
    return out


def kto_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": sentence(g, 2 + i % 4), "completion": sentence(g, 1 + i % 6), "label": i % 3 != 0}
            for i in range(n)]


def rows_of(dicts, file="d.jsonl") -> list[Row]:
    return [Row(d, file, line=i) for i, d in enumerate(dicts, 1)]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], records: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(records)
    return path


def expected_sample(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Prompt + response built independently: the prompt rendered with the generation prompt, then the text the
    template adds for the response up to its end-of-turn token, each encoded on its own."""
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages)
    assert full_text.startswith(prompt_text)
    eot = tokenizer.decode([tokenizer.eos_id])
    response_text = full_text[len(prompt_text): full_text.rindex(eot) + len(eot)]
    prompt = tokenizer.encode(prompt_text)
    response = tokenizer.encode(response_text)
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def sample(side, i) -> tuple[list[int], list[bool]]:
    ids, mask = side[i]
    return ids.tolist(), mask.tolist()


# ------------------------------------------------------------------------------------------------- layouts


def test_string_pairs_mask_exactly_the_response(tok):
    rows = pair_rows(6)
    data = tokenize_preferences(rows_of(rows), tok, 128)
    assert data.paired and len(data) == 6 and data.labels is None
    for i, r in enumerate(rows):
        for side, key in ((data.chosen, "chosen"), (data.rejected, "rejected")):
            msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[key]}]
            assert sample(side, i) == expected_sample(tok, msgs)
            ids, mask = side[i]
            assert tok.decode(ids[mask]) == r[key] + "<|im_end|>"
        p = data.prompt_length(i)
        assert torch.equal(data.chosen[i][0][:p], data.rejected[i][0][:p])
    s = data.stats
    assert (s.rows, s.samples, s.tokens) == (6, 6, data.chosen.num_tokens + data.rejected.num_tokens)
    assert s.trained_tokens == data.chosen.num_targets + data.rejected.num_targets
    assert s.summary() == f"6 pairs from 6 rows, {s.tokens} tokens ({s.trained_tokens} in responses)"


def test_system_prompt_and_fold_system(sp_tok):
    row = {"prompt": "Hello there", "chosen": "Fine, thanks.", "rejected": "The dog sleeps."}
    data = tokenize_preferences(rows_of([row]), sp_tok, 128, system_prompt="Be brief.")
    assert sample(data.chosen, 0)[0][0] == sp_tok.bos_id
    assert sp_tok.decode(data.chosen[0][0]).startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello there [/INST]")
    assert sp_tok.decode(data.chosen[0][0][data.chosen[0][1]]) == "Fine, thanks. </s>"
    folded = tokenize_preferences(rows_of([{**row, "system": "Be brief."}]), sp_tok, 128, fold_system=True)
    assert sp_tok.decode(folded.chosen[0][0]).startswith("<s>[INST] Be brief.\n\nHello there [/INST]")
    assert sample(data.chosen, 0)[1].count(True) == sample(folded.chosen, 0)[1].count(True)


def test_message_list_layouts_agree(tok):
    user = {"role": "user", "content": "What is the capital of France?"}
    good, bad = {"role": "assistant", "content": "Paris."}, {"role": "assistant", "content": "London."}
    layouts = [
        {"prompt": user["content"], "chosen": good["content"], "rejected": bad["content"]},  # strings
        {"chosen": [user, good], "rejected": [user, bad]},  # implicit prompt (HH-RLHF style)
        {"prompt": [user], "chosen": [good], "rejected": [bad]},  # explicit prompt list
        {"prompt": user["content"], "chosen": [good], "rejected": [bad]},  # string prompt + response lists
        {"prompt": "not used", "chosen": [user, good], "rejected": [user, bad]},  # UltraFeedback-binarized
        {"chosen": [{"from": "human", "value": user["content"]}, {"from": "gpt", "value": "Paris."}],
         "rejected": [{"from": "human", "value": user["content"]}, {"from": "gpt", "value": "London."}]},
    ]
    data = tokenize_preferences(rows_of(layouts), tok, 128)
    for i in range(1, len(layouts)):
        assert sample(data.chosen, i) == sample(data.chosen, 0) and sample(data.rejected, i) == sample(data.rejected, 0)
    assert sample(data.chosen, 0) == expected_sample(tok, [user, good])


def test_multi_turn_prompt_masks_only_the_final_response(tok):
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How are you?"},
               {"role": "user", "content": "Fine, thanks."}]
    row = {"chosen": history + [{"role": "assistant", "content": "You're welcome."}],
           "rejected": history + [{"role": "assistant", "content": "The dog sleeps."}]}
    data = tokenize_preferences(rows_of([row]), tok, 256)
    assert sample(data.chosen, 0) == expected_sample(tok, row["chosen"])
    ids, mask = data.rejected[0]
    assert tok.decode(ids[mask]) == "The dog sleeps.<|im_end|>"
    assert "Hi! How are you?" in tok.decode(ids[: data.prompt_length(0)])


def test_columns_mapping(tok):
    rows = pair_rows(3)
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    plain = tokenize_preferences(rows_of(rows), tok, 128)
    mapped = tokenize_preferences(rows_of(renamed), tok, 128,
                                  columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert all(torch.equal(a, b) for a, b in zip(plain.tensors(), mapped.tensors()))
    with pytest.raises(DataError, match="cannot tell the preference layout"):
        tokenize_preferences(rows_of(renamed), tok, 128)


def test_unpaired_kto_rows(tok, tmp_path):
    rows = kto_rows(6)
    labels = [True, "false", 1, 0, "TRUE", False]
    for r, label in zip(rows, labels):
        r["label"] = label
    data = tokenize_preferences(rows_of(rows), tok, 128)
    assert not data.paired and data.rejected is None
    assert data.labels.tolist() == [True, False, True, False, True, False]
    for i, r in enumerate(rows):
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        assert sample(data.chosen, i) == expected_sample(tok, msgs)
    assert data.stats.summary().startswith("6 samples (3 desirable, 3 undesirable) from 6 rows")
    f = write_csv(tmp_path / "k.csv", ["prompt", "completion", "label"], [["Hi", "Hello", "1"], ["Hi", "Go", "0"]])
    assert tokenize_preferences(read_rows(f), tok, 64).labels.tolist() == [True, False]
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'chosen'"):
        tokenize_preferences(rows_of(rows), tok, 128, paired=True)


def test_csv_message_lists(tok, tmp_path):
    user = {"role": "user", "content": "Hello there"}
    chosen = [user, {"role": "assistant", "content": "Hi!"}]
    rejected = [user, {"role": "assistant", "content": "[1, 2]"}]  # a JSON array as text in an assistant turn
    f = write_csv(tmp_path / "m.csv", ["chosen", "rejected"], [[json.dumps(chosen), json.dumps(rejected)]])
    from_csv = tokenize_preferences(read_rows(f), tok, 128)
    jsonl = write_jsonl(tmp_path / "m.jsonl", [{"chosen": chosen, "rejected": rejected}])
    from_jsonl = tokenize_preferences(read_rows(jsonl), tok, 128)
    assert all(torch.equal(a, b) for a, b in zip(from_csv.tensors(), from_jsonl.tensors()))
    text = tokenize_preferences(rows_of([{"prompt": "Hi", "chosen": "[1, 2]", "rejected": "[3]"}]), tok, 64)
    assert tok.decode(text.chosen[0][0][text.chosen[0][1]]) == "[1, 2]<|im_end|>"  # not a CSV: plain text


# ---------------------------------------------------------------------------------------------------- bad rows

GOOD = {"prompt": "Hello there", "chosen": "Hi!", "rejected": "Go away."}
USER, ASSISTANT = {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Hello", "chosen": "Hi!"}, "missing field 'rejected'"),
    ({"chosen": "Hi!", "rejected": "Go."}, "missing field 'prompt'"),
    ({"prompt": "Hello", "chosen": "  ", "rejected": "Go."}, "empty response in 'chosen'"),
    ({"prompt": "", "chosen": "Hi!", "rejected": "Go."}, "empty field 'prompt'"),
    ({"prompt": "Hello", "chosen": 3, "rejected": "Go."}, "field 'chosen' should be a string or a list"),
    ({"prompt": "Hello", "chosen": "Same.", "rejected": "Same."}, "'chosen' and 'rejected' are the same response"),
    ({"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "Other"}, ASSISTANT | {"content": "x"}]},
     r"'chosen' and 'rejected' do not share the prompt before the response \(message 0 differs\)"),
    ({"chosen": [USER, ASSISTANT, USER], "rejected": [USER, {"role": "assistant", "content": "Go."}]},
     "the last message of 'chosen' is a user message"),
    ({"chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "Go."}]}, "missing field 'prompt'"),
    ({"chosen": [USER, {"role": "robot", "content": "x"}], "rejected": [USER, ASSISTANT]},
     "message 1: unsupported role 'robot'"),
])
def test_bad_rows_name_file_and_line(tmp_path, tok, bad, message):
    f = write_jsonl(tmp_path / "p.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataError, match=rf"p\.jsonl:3: {message}.*\(set skip_bad to skip bad rows\)"):
        tokenize_preferences(read_rows(f), tok, 64)


def test_bad_rows_in_csv_and_kto(tmp_path, tok):
    f = write_csv(tmp_path / "p.csv", ["prompt", "chosen", "rejected"],
                  [["Hello", "Hi!", "Go."], ["Two\nlines", "Same", "Same"]])
    with pytest.raises(DataError, match=r"p\.csv row 2 \(line 3\): 'chosen' and 'rejected' are the same"):
        tokenize_preferences(read_rows(f), tok, 64)
    k = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Hi", "completion": "Yo", "label": True},
                                          {"prompt": "Hi", "completion": "Yo", "label": "maybe"},
                                          '{"prompt": "Hi", '])
    with pytest.raises(DataError, match=r"k\.jsonl:2: field 'label' should be true/false \(or 1/0\), got 'maybe'"):
        tokenize_preferences(read_rows(k), tok, 64)
    data = tokenize_preferences(read_rows(k), tok, 64, skip_bad=True)
    assert data.stats.skipped == 2 and "k.jsonl:3: invalid JSON" in data.stats.skipped_examples[1]


def test_skip_bad_counts_and_empty_is_an_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "x"}, "not json", GOOD | {"chosen": "Yes."}])
    data = tokenize_preferences(read_rows(f), tok, 64, skip_bad=True)
    assert (len(data), data.stats.skipped, data.stats.rows) == (2, 2, 4)
    assert data.stats.skipped_examples[0].startswith(f"{f}:2: missing field 'chosen'")
    assert "2 bad rows skipped" in data.stats.summary()
    g = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match="no usable preference samples .*1 bad rows skipped"):
        tokenize_preferences(read_rows(g), tok, 64, skip_bad=True)


# -------------------------------------------------------------------------------------------------- truncation


def test_truncation_cuts_the_prompt_left_and_keeps_both_responses(sp_tok):
    prompt = " ".join(WORDS * 4)
    row = {"prompt": prompt, "chosen": "The quick brown fox jumps over the lazy dog.", "rejected": "Paris."}
    full = tokenize_preferences(rows_of([row]), sp_tok, 1024)
    seq_len = 48
    data = tokenize_preferences(rows_of([row]), sp_tok, seq_len)
    c_ids, c_mask = sample(full.chosen, 0)
    r_ids, r_mask = sample(full.rejected, 0)
    p = full.prompt_length(0)
    keep = seq_len - (len(c_ids) - p)  # the longer response decides the prompt
    kept_prompt = [sp_tok.bos_id] + c_ids[p - keep + 1: p]
    assert sample(data.chosen, 0) == (kept_prompt + c_ids[p:], [False] * keep + c_mask[p:])
    assert sample(data.rejected, 0) == (kept_prompt + r_ids[p:], [False] * keep + r_mask[p:])
    assert len(data.chosen[0][0]) == seq_len
    s = data.stats
    assert (s.truncated_prompts, s.truncated_responses, s.dropped) == (1, 0, 0)
    assert "1 prompts truncated" in s.summary()


def test_long_response_is_cut_at_its_end(tok):
    long = " ".join(WORDS * 6)
    row = {"prompt": "Hello there", "chosen": long, "rejected": "Fine."}
    full = tokenize_preferences(rows_of([row]), tok, 1024)
    seq_len = 40
    data = tokenize_preferences(rows_of([row]), tok, seq_len)
    p = full.prompt_length(0)
    c_ids, _ = sample(full.chosen, 0)
    r_ids, _ = sample(full.rejected, 0)
    kept_prompt = c_ids[p - MIN_PROMPT_TOKENS: p]  # no bos in this tokenizer
    assert sample(data.chosen, 0)[0] == kept_prompt + c_ids[p: p + seq_len - MIN_PROMPT_TOKENS]
    assert sample(data.rejected, 0)[0] == kept_prompt + r_ids[p:]
    assert all(sample(data.chosen, 0)[1][MIN_PROMPT_TOKENS:])
    assert (data.stats.truncated_prompts, data.stats.truncated_responses) == (1, 1)


def test_huge_prompt_is_bounded_from_its_end(tok):
    prompt = " ".join(WORDS * 400)  # ~24k characters: encoded only in part
    row = {"prompt": prompt, "completion": "Fine, thanks.", "label": True}
    data = tokenize_preferences(rows_of([row]), tok, 32)
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Fine, thanks."}]
    ids, mask = expected_sample(tok, msgs)
    n = mask.count(True)
    assert sample(data.chosen, 0) == (ids[len(ids) - 32:], mask[len(ids) - 32:])
    assert n < 32


# -------------------------------------------------------------------------------------------------- batches


def expected_rows(samples, pad_id):
    """``(tokens, targets, attention)`` lists built position by position."""
    width = max(len(ids) for ids, _ in samples)
    out = []
    for ids, mask in samples:
        tokens = ids + [pad_id] * (width - len(ids))
        targets = [ids[t + 1] if t + 1 < len(ids) and mask[t + 1] else IGNORE_INDEX for t in range(width)]
        out.append((tokens, targets, [1] * len(ids) + [0] * (width - len(ids))))
    return out


def test_paired_batch_rows_and_targets(tok):
    data = tokenize_preferences(rows_of(pair_rows(10)), tok, 128)
    loader = PreferenceLoader(data, 4, seed=3)
    order = loader.order(0)[:4]
    batch = loader.batch(0, 0)
    assert isinstance(batch, PreferenceBatch) and batch.tokens.shape[0] == 8
    samples = [sample(data.chosen, i) for i in order] + [sample(data.rejected, i) for i in order]
    for r, (tokens, targets, attention) in enumerate(expected_rows(samples, data.pad_id)):
        assert batch.tokens[r].tolist() == tokens
        assert batch.targets[r].tolist() == targets
        assert batch.attention_mask[r].tolist() == attention
    assert (batch.num_pairs, batch.global_num_pairs) == (4, 4)
    assert batch.num_tokens == sum(len(ids) for ids, _ in samples)
    assert batch.labels is None and batch.kl_tokens is None
    assert batch.model_kwargs() == {"attention_mask": batch.attention_mask}
    moved = batch.to("cpu")
    assert torch.equal(moved.targets, batch.targets) and moved.num_pairs == 4


def test_kto_kl_rows_are_the_shifted_completions(tok):
    rows = kto_rows(7)
    data = tokenize_preferences(rows_of(rows), tok, 128)
    loader = PreferenceLoader(data, 4, seed=1)
    for index in range(loader.num_batches()):
        units = loader._plan(0)[index]
        batch = loader.batch(0, index)
        n = len(units)
        assert batch.labels.tolist() == [bool(rows[i]["label"]) for i in units]
        for g, i in enumerate(units):
            # TRL's KTOTrainer: KL_completion_ids = [completions[-1]] + completions[:-1] (sample g gets g - 1)
            j = units[(g - 1) % n]
            msgs = [{"role": "user", "content": rows[i]["prompt"]},
                    {"role": "assistant", "content": rows[j]["completion"]}]
            ids, mask = expected_sample(tok, msgs)
            (tokens, targets, attention), = expected_rows([(ids, mask)], data.pad_id)
            width = len(tokens)
            assert batch.kl_tokens[g, :width].tolist() == tokens
            assert batch.kl_targets[g].tolist() == targets + [IGNORE_INDEX] * (batch.kl_targets.shape[1] - width)
            assert batch.kl_attention_mask[g].sum() == len(ids)
        assert batch.kl_model_kwargs() == {"attention_mask": batch.kl_attention_mask}


def test_kl_sample_is_fitted_to_seq_len(tok):
    rows = [{"prompt": " ".join(WORDS * 3), "completion": "Fine.", "label": True},
            {"prompt": "Hi", "completion": " ".join(WORDS * 3), "label": False}]
    data = tokenize_preferences(rows_of(rows), tok, 64)
    ids, mask = data.kl_sample(0, 1)
    assert len(ids) == 64 and ids[-mask.sum():].tolist() == data.chosen[1][0][data.chosen[1][1]].tolist()[:mask.sum()]
    assert ids[:MIN_PROMPT_TOKENS].tolist() == data.chosen[0][0][data.prompt_length(0) - MIN_PROMPT_TOKENS:
                                                                data.prompt_length(0)].tolist()


def trimmed(tokens, attention, r):
    return tokens[r][attention[r].bool()].tolist()


@pytest.mark.parametrize("kind", ["paired", "kto"])
def test_two_ranks_together_equal_one_rank(tok, kind):
    data = tokenize_preferences(rows_of(pair_rows(9) if kind == "paired" else kto_rows(9)), tok, 128)
    whole = PreferenceLoader(data, 4, seed=5)
    ranks = [PreferenceLoader(data, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for index in range(whole.num_batches()):
        one = whole.batch(0, index)
        parts = [loader.batch(0, index) for loader in ranks]
        n = one.num_pairs
        assert sum(p.num_pairs for p in parts) == n and all(p.global_num_pairs == n for p in parts)
        for j in range(n):
            part, local = parts[j % 2], j // 2
            rows = [(j, local)] + ([(n + j, part.num_pairs + local)] if kind == "paired" else [])
            for r1, rp in rows:  # both rows of a pair on the same rank
                assert trimmed(one.tokens, one.attention_mask, r1) == trimmed(part.tokens, part.attention_mask, rp)
                w = int(one.attention_mask[r1].sum())
                assert one.targets[r1, :w].tolist() == part.targets[rp, :w].tolist()
            if kind == "kto":
                assert one.labels[j] == part.labels[local]
                assert (trimmed(one.kl_tokens, one.kl_attention_mask, j)
                        == trimmed(part.kl_tokens, part.kl_attention_mask, local))
    with pytest.raises(ValueError, match="multiple of world_size"):
        PreferenceLoader(data, 3, world_size=2)


def test_loader_resume_equals_uninterrupted(tok):
    data = tokenize_preferences(rows_of(pair_rows(11)), tok, 128)
    reference = PreferenceLoader(data, 3, seed=2)
    assert reference.total_batches(2) == 8
    stream = reference.forever()
    expected = [next(stream) for _ in range(8)]
    first = PreferenceLoader(data, 3, seed=2)
    got = []
    for batch in first:
        got.append(batch)
        if len(got) == 3:
            break
    state = first.state_dict()
    resumed = PreferenceLoader(data, 3, seed=2)
    resumed.load_state_dict(state)
    stream = resumed.forever()
    got += [next(stream) for _ in range(5)]
    assert [b.tokens.tolist() for b in got] == [b.tokens.tolist() for b in expected]
    assert expected[0].tokens.tolist() != expected[4].tokens.tolist()  # a new order in epoch 1


# ------------------------------------------------------------------------------------------- datasets, config


def test_subset_tensors_and_split(tok):
    data = tokenize_preferences(rows_of(kto_rows(8)), tok, 128)
    part = data.subset([5, 1])
    assert isinstance(part, PreferenceDataset) and len(part) == 2
    assert sample(part.chosen, 0) == sample(data.chosen, 5) and part.labels.tolist() == [data.labels[5], data.labels[1]]
    assert part.stats.samples == 2 and part.stats.desirable == int(part.labels.sum())
    assert part.stats.tokens == part.chosen.num_tokens
    assert len(part.tensors()) == 4 and torch.equal(part.tensors()[3], part.labels)
    train, val = split_validation(data, 0.25, seed=0)
    assert (len(train), len(val)) == (6, 2)
    pairs = tokenize_preferences(rows_of(pair_rows(4)), tok, 128)
    assert len(pairs.tensors()) == 6 and pairs.lengths.tolist() == [
        max(a, b) for a, b in zip(pairs.chosen.lengths.tolist(), pairs.rejected.lengths.tolist())]
    assert pairs.seq_len == 128 and pairs.pad_id == tok.pad_id


def test_load_preference_datasets_validation(tmp_path, tok):
    f = write_jsonl(tmp_path / "train.jsonl", pair_rows(10))
    train, val = load_preference_datasets(DataConfig(str(f), format="preference", seq_len=128, val_fraction=0.2), tok)
    assert (len(train), len(val)) == (8, 2)
    v = write_jsonl(tmp_path / "val.jsonl", pair_rows(3, seed=1))
    train, val = load_preference_datasets(DataConfig(str(f), format="preference", seq_len=128, val_path=str(v)), tok)
    assert (len(train), len(val)) == (10, 3) and val.paired
    folder = tmp_path / "repo"
    write_jsonl(folder / "train.jsonl", pair_rows(5))
    write_jsonl(folder / "validation.jsonl", pair_rows(2, seed=2))
    train, val = load_preference_datasets(DataConfig(str(folder), format="preference"), tok)
    assert (len(train), len(val)) == (5, 2)
    assert load_preference_datasets(DataConfig(str(f), format="preference"), tok)[1] is None
    k = write_jsonl(tmp_path / "kto.jsonl", kto_rows(3))
    with pytest.raises(DataError, match=r"kto\.jsonl:1: missing field 'chosen'"):
        load_preference_datasets(DataConfig(str(f), format="preference", val_path=str(k)), tok)
    with pytest.raises(DataError, match="missing field 'chosen'"):
        load_preference_datasets(DataConfig(str(k), format="preference"), tok, paired=True)
    with pytest.raises(DataError, match="needs data.format = 'preference'"):
        load_preference_datasets(DataConfig(str(f)), tok)
    with pytest.raises(DataError, match="load_preference_datasets"):
        load_datasets(DataConfig(str(f), format="preference"), tok)
    train, _ = load_preference_datasets(DataConfig(str(k), format="preference", seq_len=64), tok)
    assert not train.paired and train.seq_len == 64


class BoundaryTokenizer:
    """A stub whose encoding of the prompt's last characters depends on the response (as a tokenizer that merges
    across the boundary would): chosen ``"a"`` -> ``[1, 2, 3] + [5] + [7, 9]``, rejected -> ``[1, 2, 4] + [8] * k
    + [7, 9]``, the assistant mask on ``[7, 9]``."""

    bos_id, eos_id, pad_id, chat_template = None, 9, 0, "stub"

    def encode(self, text, *, add_bos=False, add_eos=False):
        return [ord(c) for c in text]

    def encode_chat(self, messages, *, add_generation_prompt=False):
        response = messages[-1]["content"]
        middle = [3, 5] if response == "a" else [4] + [8] * len(response)
        ids = [1, 2, *middle, 7, 9]
        return ids, [False] * (len(ids) - 2) + [True, True]

    def with_chat_template(self, template):
        return self


def test_pair_prompt_is_the_shared_prefix():
    rows = rows_of([{"prompt": "p", "chosen": "a", "rejected": "bb"},
                    {"prompt": "p", "chosen": "a", "rejected": "b" * 9}])
    data = tokenize_preferences(rows, BoundaryTokenizer(), 8)
    assert len(data) == 1  # the shared prompt is [1, 2]; [3, 5] and [4, 8, 8] belong to the responses, untrained
    assert sample(data.chosen, 0) == ([1, 2, 3, 5, 7, 9], [False] * 4 + [True, True])
    assert sample(data.rejected, 0) == ([1, 2, 4, 8, 8, 7, 9], [False] * 5 + [True, True])
    assert data.stats.dropped == 1  # the second row's rejected response keeps no trained token in 8 - 2 tokens
    assert data.stats.truncated_responses == 1 and "1 dropped with no response tokens" in data.stats.summary()
