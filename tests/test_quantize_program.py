"""`ft-prog run quantize`: size and perplexity before/after, the on-disk format, load_quantized, refusals."""

import json
import math
from pathlib import Path

import pytest
import torch

from ftprog.core import CheckpointError, flatten, from_config, is_plain, load_pretrained, perplexity, save_pretrained
from ftprog.programs.quantize import CONFIG, quantized_model, run
from ftprog.transforms import (
    is_quantized_checkpoint, load_adapter, load_quantized, lora, merge, quantize, save_adapter,
)
from ftprog.transforms._quantized_io import QUANT_FILE, WEIGHTS_FILE, _pack_int4, _unpack_int4

# Every linear fits nf4 (element count divisible by 64 * 256) and int4 (in_features divisible by 32).
CONFIG_JSON = {"model_type": "llama", "hidden_act": "silu", "hidden_size": 256, "intermediate_size": 512,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 640,
               "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
TEXT = ("The quick brown fox jumps over the lazy dog. Hello, world! Fine-tuning language models needs data, "
        "patience and a good tokenizer. What is the capital of France? The capital of France is Paris. ") * 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(model folder with a BPE tokenizer, adapter folder, eval text file)."""
    from _tokfixtures import build_bpe_folder

    root = tmp_path_factory.mktemp("qprog")
    tok = build_bpe_folder(root / "tok")
    model = from_config(CONFIG_JSON, seed=3).replace(source=str(tok))
    folder = save_pretrained(model, root / "model")
    adapted = lora(load_pretrained(folder), rank=4, alpha=8, targets=("q_proj", "down_proj"))
    g = torch.Generator().manual_seed(4)
    adapted = adapted.with_params({p: torch.randn(t.shape, generator=g) * 0.05
                                   for p, t in adapted.trainable_params().items()})
    adapter = save_adapter(adapted, root / "adapter")
    text = root / "eval.txt"
    text.write_text(TEXT)
    return folder, adapter, text


def _cfg(overrides):
    from ftprog.programs.config import from_dict

    data = {"model": {"path": str(overrides.pop("model_path"))}, **overrides}
    return from_dict(CONFIG, data, source="test")


@pytest.mark.parametrize("scheme, max_ratio", [("int8", 0.62), ("int4", 0.42), ("nf4", 0.40)])
def test_run_reports_size_and_perplexity_and_reloads_exactly(folders, tmp_path, scheme, max_ratio, capsys):
    folder, _, text = folders
    out = tmp_path / f"q-{scheme}"
    cfg = _cfg({"model_path": folder, "scheme": scheme, "dtype": "bf16", "output_dir": str(out),
                "eval_text": str(text), "max_length": 32})
    report = run(cfg, {"scheme": scheme})
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "on disk" in printed
    saved = json.loads((out / "quantize_report.json").read_text())
    assert saved["scheme"] == scheme and saved["perplexity_after"] == report["perplexity_after"]
    # Sizes: float bf16 model vs the weights file written.
    assert report["float_bytes"] == sum(t.numel() * 2 for t in flatten(load_pretrained(folder).params).values())
    assert report["quantized_disk_bytes"] == (out / WEIGHTS_FILE).stat().st_size
    assert report["disk_ratio"] < max_ratio, report["disk_ratio"]
    assert report["unquantized_linears"] == []
    # Perplexity: windows of 32 tokens over the whole text; quantization changes it only a little.
    assert report["eval_tokens"] > 64
    assert math.isfinite(report["perplexity_before"]) and report["perplexity_before"] > 1
    rel = abs(report["perplexity_delta"]) / report["perplexity_before"]
    assert rel < (0.01 if scheme == "int8" else 0.05), report

    # The folder on disk: format file, config, tokenizer, never a model.safetensors.
    assert is_quantized_checkpoint(out) and (out / "tokenizer.json").is_file()
    assert not (out / "model.safetensors").exists()
    meta = json.loads((out / QUANT_FILE).read_text())
    assert meta["scheme"] == scheme and meta["format_version"] == 1 and len(meta["quantized"]) == 14
    if scheme == "int4":
        assert meta["group_size"] == 32

    # Loading it back gives the in-memory quantized model's logits exactly.
    _, qmodel = quantized_model(cfg)
    loaded = load_quantized(out)
    tokens = torch.randint(0, 640, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(tokens), qmodel(tokens))
    assert loaded.trainable == qmodel.trainable
    q_flat, l_flat = flatten(qmodel.params), flatten(loaded.params)
    assert {p: type(t) for p, t in q_flat.items()} == {p: type(t) for p, t in l_flat.items()}


def test_adapter_is_merged_before_quantizing(folders, tmp_path):
    folder, adapter, text = folders
    out = tmp_path / "q"
    cfg = _cfg({"model_path": folder, "adapter": str(adapter), "scheme": "int8", "dtype": "fp32",
                "output_dir": str(out), "eval_text": str(text), "max_length": 64})
    report = run(cfg, {})
    base = load_pretrained(folder)
    merged = merge(load_adapter(base, adapter))
    tokens = torch.randint(0, 640, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_quantized(out)(tokens), quantize(merged, "int8")(tokens))
    # The reported "before" is the adapted model's perplexity, not the base's.
    from ftprog.core import load_tokenizer

    text_ids = load_tokenizer(folder).encode(text.read_text())
    assert report["perplexity_before"] == pytest.approx(perplexity(merged, [text_ids], max_length=64)["perplexity"],
                                                        rel=1e-6)
    assert report["perplexity_before"] != pytest.approx(perplexity(base, [text_ids], max_length=64)["perplexity"],
                                                        rel=1e-6)


def test_perplexity_windows_predict_every_token_once(folders):
    folder, _, _ = folders
    model = load_pretrained(folder)
    ids = list(range(1, 71))
    # Windows of 33 tokens starting 32 apart: consecutive windows of 32 predictions that share one token.
    result = perplexity(model, [ids], max_length=33, stride=32)
    ppl, count = result["perplexity"], result["tokens"]
    assert count == 69 and result["windows"] == 3
    # Same as summing the cross-entropy of three separate windows by hand.
    total = 0.0
    for start in range(0, 69, 32):
        window = torch.tensor(ids[start:start + 33])
        logits = model(window[:-1][None]).float()
        total += torch.nn.functional.cross_entropy(logits[0], window[1:], reduction="sum").item()
    assert ppl == pytest.approx(math.exp(total / 69), rel=1e-5)


def test_quantize_and_eval_report_the_same_perplexity(folders, tmp_path):
    """`run quantize`'s before/after and `run eval`'s perplexity are one computation (ftprog.core.perplexity)."""
    from ftprog.programs import evaluate
    from ftprog.programs.config import from_dict

    folder, _, text = folders
    out = tmp_path / "q"
    report = run(_cfg({"model_path": folder, "scheme": "int8", "dtype": "fp32", "output_dir": str(out),
                       "eval_text": str(text), "max_length": 40, "stride": 12}), {})

    def eval_perplexity(model_path):
        cfg = from_dict(evaluate.CONFIG, {"model": {"path": str(model_path)}, "dtype": "fp32", "max_length": 40,
                                          "stride": 12, "perplexity_file": str(text),
                                          "output_dir": str(tmp_path / "eval" / Path(model_path).name)},
                        source="test")
        return evaluate.run(cfg)["perplexity"]

    before, after = eval_perplexity(folder), eval_perplexity(out)  # the float model, then the quantized folder
    assert before["tokens"] == after["tokens"] == report["eval_tokens"] and before["stride"] == 12
    assert before["perplexity"] == report["perplexity_before"]
    assert after["perplexity"] == report["perplexity_after"] != report["perplexity_before"]


def test_int4_packing_round_trip():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    packed = _pack_int4(q, "w")
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(_unpack_int4(packed), q)
    with pytest.raises(ValueError, match="outside"):
        _pack_int4(torch.tensor([[8, 0]], dtype=torch.int8), "w")


def test_refusals_come_before_loading(folders, tmp_path):
    folder, _, text = folders
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        run(_cfg({"model_path": folder, "adapter": str(tmp_path / "nope"), "output_dir": str(tmp_path / "o")}), {})
    with pytest.raises(FileNotFoundError, match="eval_text"):
        run(_cfg({"model_path": folder, "eval_text": str(tmp_path / "missing.txt"),
                  "output_dir": str(tmp_path / "o")}), {})
    with pytest.raises(ValueError, match="max_length"):
        run(_cfg({"model_path": folder, "eval_text": str(text), "max_length": 4096,
                  "output_dir": str(tmp_path / "o")}), {})
    with pytest.raises(ValueError, match=r"stride=64 must be in \[0, max_length - 1 = 63\]"):
        run(_cfg({"model_path": folder, "eval_text": str(text), "max_length": 64, "stride": 64,
                  "output_dir": str(tmp_path / "o")}), {})
    assert not (tmp_path / "o").exists()


def test_output_never_replaces_the_model_or_unasked_folders(folders, tmp_path):
    """`model.path=M output_dir=M` replaced the model with its quantized version; a non-empty output_dir is now
    replaced only with overwrite=true, and the model's own folder (or one inside or around it) never."""
    from ftprog.programs.run_guard import RunError

    folder, adapter, _ = folders
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    for output, relation in [(folder, "is"), (folder / "q", "is inside"), (folder.parent, "holds")]:
        with pytest.raises(RunError, match=f"the output {output} {relation} the input"):
            run(_cfg({"model_path": folder, "output_dir": str(output), "overwrite": True}), {})
    with pytest.raises(RunError, match=f"the output {adapter} is the input"):
        run(_cfg({"model_path": folder, "adapter": str(adapter), "output_dir": str(adapter), "overwrite": True}), {})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files

    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(RunError, match="already exists .* pass overwrite=true to replace it"):
        run(_cfg({"model_path": folder, "output_dir": str(out)}), {})
    assert (out / "notes.txt").read_text() == "the user's"
    run(_cfg({"model_path": folder, "output_dir": str(out), "overwrite": True}), {})
    assert is_quantized_checkpoint(out) and not (out / "notes.txt").exists()


def test_unsupported_shapes_are_listed_or_refused(tmp_path):
    folder = save_pretrained(from_config({**CONFIG_JSON, "intermediate_size": 200}, seed=0), tmp_path / "m")
    cfg = _cfg({"model_path": folder, "scheme": "nf4", "output_dir": str(tmp_path / "q")})
    report = run(cfg, {})
    assert report["unquantized_linears"] and all("mlp" in p for p in report["unquantized_linears"])
    # The reloaded mix of nf4 and float linears computes what the in-memory quantized model computes.
    tokens = torch.tensor([[1, 2, 3]])
    loaded, (_, qmodel) = load_quantized(tmp_path / "q"), quantized_model(cfg)
    assert {p for p, t in flatten(loaded.params).items() if is_plain(t)} == \
        {p for p, t in flatten(qmodel.params).items() if is_plain(t)}
    assert torch.equal(loaded(tokens), qmodel(tokens))
    with pytest.raises(ValueError, match="skip_unsupported"):
        run(_cfg({"model_path": folder, "scheme": "nf4", "skip_unsupported": False,
                  "output_dir": str(tmp_path / "q2")}), {})


def test_quantized_folder_is_refused_by_other_loaders_and_checked_by_ours(folders, tmp_path):
    folder, _, _ = folders
    out = tmp_path / "q"
    run(_cfg({"model_path": folder, "scheme": "int4", "output_dir": str(out)}), {})
    with pytest.raises(CheckpointError, match=r"an ft-prog quantized checkpoint; load it with "
                                              r"ftprog\.transforms\.load_quantized\(path\)"):
        load_pretrained(out)
    with pytest.raises(ValueError, match="already quantized"):
        run(_cfg({"model_path": out, "output_dir": str(tmp_path / "again")}), {})
    with pytest.raises(CheckpointError, match="not a quantized"):
        load_quantized(folder)

    # A tampered file: a component missing, then an unexpected tensor.
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / WEIGHTS_FILE)
    victim = "model.layers.1.mlp.up_proj.weight.scale"
    save_file({k: v for k, v in tensors.items() if k != victim}, out / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="up_proj.weight.scale"):
        load_quantized(out)
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, out / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        load_quantized(out)


def test_transformers_refuses_the_quantized_folder(folders, tmp_path):
    import transformers

    folder, _, _ = folders
    out = tmp_path / "q"
    run(_cfg({"model_path": folder, "scheme": "int8", "output_dir": str(out)}), {})
    with pytest.raises(OSError, match="no file named model.safetensors"):  # transformers' words: its weights are
        transformers.AutoModelForCausalLM.from_pretrained(out)           # in no file it reads


@pytest.mark.parametrize("scheme, dtype", [("int8", "fp32"), ("nf4", "bf16")])  # (bf16 int8: the float tokens)
def test_generate_on_the_quantized_folder_equals_the_in_memory_model(folders, tmp_path, scheme, dtype):
    """Greedy tokens of the folder `run quantize` wrote: those of the model quantized in memory, which differ
    from the float model's; through generate() and (int8; nf4 on CPU is slow) `run generate` on the folder."""
    from ftprog.core import load_tokenizer
    from ftprog.programs import generate as gen
    from ftprog.programs.config import from_dict

    # Untied: the tied random model repeats its last token whatever its precision.
    untied = from_config({**CONFIG_JSON, "tie_word_embeddings": False}, seed=3).replace(source=str(folders[0]))
    folder = save_pretrained(untied, tmp_path / "untied")
    out = tmp_path / "q"
    cfg = _cfg({"model_path": folder, "scheme": scheme, "dtype": dtype, "output_dir": str(out)})
    run(cfg, {})
    float_model, qmodel = quantized_model(cfg)
    loaded = load_quantized(out)
    prompts = [[5, 6, 7, 8]]
    new = gen.generate(loaded, prompts, max_new_tokens=6)
    assert new == gen.generate(qmodel, prompts, max_new_tokens=6)
    assert new != gen.generate(float_model, prompts, max_new_tokens=6)  # quantization shows in the tokens
    if scheme != "int8":
        return
    # Greedy with the cache equals greedy over the full sequence.
    seq = torch.tensor(prompts)
    for token in new[0]:
        assert loaded(seq)[0, -1].argmax().item() == token
        seq = torch.cat([seq, torch.tensor([[token]])], 1)
    # The program on the folder (the quantized checkpoint loaded as it is).
    gcfg = from_dict(gen.CONFIG, {"model": {"path": str(out)}, "prompt": "The quick brown fox",
                                  "max_new_tokens": 8, "stream": False}, source="test")
    tokenizer = load_tokenizer(out)
    ids = gen.encode_prompt(tokenizer, gcfg.prompt, gcfg)
    expected = gen.generate(qmodel, [ids], max_new_tokens=8, stop_ids=tokenizer.stop_ids)[0]
    assert gen.run(gcfg) == [tokenizer.decode(expected, skip_special_tokens=True)]


def test_cli_demo_config(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ftprog.programs.cli import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a small text for the demo model. " * 4)
    out = tmp_path / "demo-q"
    result = CliRunner().invoke(app, ["run", "quantize", "--config", "demo", f"output_dir={out}",
                                      f"eval_text={text}", "scheme=int4"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and (out / QUANT_FILE).is_file()
    assert json.loads((out / "quantize_report.json").read_text())["scheme"] == "int4"
