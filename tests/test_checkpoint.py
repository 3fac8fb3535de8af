"""Loading and saving Hugging Face folders: round trips with transformers, sharding, atomicity, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hf import LLAMA3_ROPE, hf_config, save_hf
from ftprog.core import CheckpointError, ConfigError, flatten, from_config, load_pretrained, save_pretrained


def hf_load(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama3.2-tied", "qwen2-window", "qwen3", "mistral-window"])
def test_save_then_transformers_loads_identical_logits(arch, tmp_path):
    save_hf(arch, tmp_path / "src")
    model = load_pretrained(tmp_path / "src")
    save_pretrained(model, tmp_path / "out")
    ref = hf_load(tmp_path / "out")
    tokens = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(ref(tokens).logits, model(tokens))
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")


def test_from_config_model_round_trips(tmp_path):
    model = from_config(hf_config("qwen3").to_dict(), seed=3)
    again = from_config(hf_config("qwen3").to_dict(), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(flatten(model.params).values(), flatten(again.params).values()))
    save_pretrained(model, tmp_path)
    tokens = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(hf_load(tmp_path)(tokens).logits, model(tokens))
        assert torch.equal(load_pretrained(tmp_path)(tokens), model(tokens))


def test_sharded_save_and_load_both_ways(tmp_path):
    save_hf("llama2", tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "ours", max_shard_size="60KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "ours" / f).is_file() for f in files)
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    tokens = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        assert torch.equal(hf_load(tmp_path / "ours")(tokens).logits, model(tokens))
        assert torch.equal(load_pretrained(tmp_path / "ours")(tokens), model(tokens))


def test_older_config_fields_are_read(tmp_path):
    """Hub checkpoints carry rope_theta / rope_scaling / torch_dtype instead of rope_parameters / dtype."""
    ref = save_hf("llama3.1", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.pop("dtype", None)
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = "float32"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_pretrained(tmp_path)
    assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.rope_theta == LLAMA3_ROPE["rope_theta"]
    tokens = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        assert (ref(tokens).logits - model(tokens)).abs().max() <= 1e-5


def test_dtype_and_tokenizer_files_travel(tmp_path):
    save_hf("qwen2-tied", tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"eos_token": "x"}')
    model = load_pretrained(tmp_path / "src", dtype="bf16")
    assert model.dtype == torch.bfloat16
    save_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"eos_token": "x"}'
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_interrupted_save_leaves_previous_folder_intact(tmp_path, monkeypatch):
    import ftprog.core._checkpoint as ckpt

    save_hf("llama2", tmp_path / "src")
    model = load_pretrained(tmp_path / "src")
    save_pretrained(model, tmp_path / "out")
    before = load_file(tmp_path / "out" / "model.safetensors")
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) % 2 == 0:
            raise OSError(28, "No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_pretrained(model, tmp_path / "out", max_shard_size="60KB")
    calls.clear()
    with pytest.raises(OSError, match="No space"):
        save_pretrained(model, tmp_path / "new", max_shard_size="60KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no half-written folder, no temp left
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- bad input: each names the file and the tensor or key ----

@pytest.fixture
def folder(tmp_path):
    save_hf("llama2", tmp_path)
    return tmp_path


def rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama2").to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_pickle_weights_are_refused(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_pretrained(folder)


def test_unknown_model_type_and_bad_config(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config.json: unsupported model_type 'gpt2'"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    with pytest.raises(ConfigError, match="'hidden_size' should be int"):
        load_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_pretrained(folder)


def test_missing_tensor_is_never_random(folder):
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing .*'model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(folder)


def test_unexpected_tensor(folder):
    rewrite_weights(folder, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.extra.weight' in model.safetensors"):
        load_pretrained(folder)


def test_shape_mismatch(folder):
    rewrite_weights(folder, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(65,\)"):
        load_pretrained(folder)


def test_corrupt_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(folder)


def test_index_naming_a_missing_shard(tmp_path):
    save_hf("llama2", tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_pretrained(tmp_path)


def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path):
    """A weight_map entry may not point out of the model folder (``../x.safetensors``), even to a real file."""
    model = tmp_path / "model"
    save_hf("llama2", model, max_shard_size="100KB")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    (tmp_path / "elsewhere").mkdir()
    (model / shard).rename(tmp_path / "elsewhere" / shard)
    for outside in (f"../elsewhere/{shard}", str(tmp_path / "elsewhere" / shard)):
        index["weight_map"] = {k: outside if v == shard else v for k, v in index["weight_map"].items()}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=rf"tensor '{name}' is mapped to '{outside}', which is outside the "
                                                  "model folder"):
            load_pretrained(model)
        index = json.loads(json.dumps(index).replace(outside, shard))


def test_interrupted_swap_leftovers_are_recovered(tmp_path):
    """After a kill between the two renames of a folder swap, the moved-aside folder is put back if nothing replaced
    it; other leftovers (an older copy, an unfinished new one) are removed."""
    from ftprog.core._checkpoint import recover_interrupted_swaps

    (tmp_path / ".final.old-11").mkdir()
    (tmp_path / ".final.old-11" / "model.safetensors").write_text("the previous final")
    (tmp_path / ".final.tmp-ab12").mkdir()
    (tmp_path / ".other.tmp-cd34").mkdir()  # not a name asked about: untouched
    done = recover_interrupted_swaps(tmp_path, ["final"])
    assert (tmp_path / "final" / "model.safetensors").read_text() == "the previous final"
    assert done == ["restored final from .final.old-11 (a replacement was interrupted)",
                    "removed .final.tmp-ab12, an incomplete final of an interrupted save"]
    (tmp_path / ".final.old-12").mkdir()  # final/ exists: this is an older copy
    assert recover_interrupted_swaps(tmp_path, ["final"]) == [
        "removed .final.old-12, left by an interrupted replacement of final"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-cd34", "final"]
