"""Generation: greedy parity with transformers (every architecture, with and without a PEFT adapter),
sampling, stop strings, the `ft-prog run generate` program and its errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from _hf import ARCHS, hf_model
from ftprog.core import from_config, load_pretrained, save_pretrained
from ftprog.programs.cli import app
from ftprog.programs.generate import GenerateConfig, cut_at_stop, generate, next_token_probs, run, sample_next
from ftprog.programs.sft_config import ModelSection
from ftprog.transforms import load_adapter

import transformers
import peft

NEW_TOKENS = 12


def random_prompts(vocab, lengths=(5, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompts, new_tokens, pad_id=0):
    """transformers' greedy continuations of left-padded prompts (attention_mask marks the padding)."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=None)
    return out[:, longest:].tolist()


def add_peft_adapter(hf, folder, seed=0):
    """A PEFT LoRA on q/v/down_proj with random non-zero A and B, saved to ``folder``."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    pm = peft.get_peft_model(hf, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(folder)
    return pm.eval()


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_transformers(tmp_path, arch, adapter):
    hf = hf_model(arch, seed=1)
    hf.save_pretrained(tmp_path / "model")
    model = load_pretrained(tmp_path / "model")
    if adapter:
        hf = add_peft_adapter(hf, tmp_path / "adapter")
        model = load_adapter(model, tmp_path / "adapter")
    prompts = random_prompts(model.config.vocab_size)
    ours = generate(model, prompts, max_new_tokens=NEW_TOKENS)
    assert ours == hf_greedy(hf, prompts, NEW_TOKENS)
    # Row by row (no padding) gives the same tokens as the padded batch.
    assert [generate(model, [p], max_new_tokens=NEW_TOKENS)[0] for p in prompts] == ours


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = from_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=3)
    model = model.with_params({"model.embed_tokens.weight": model.params["model"]["embed_tokens"]["weight"] * 50})
    prompts = random_prompts(64, (4, 7))
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = generate(model, prompts, seed=5, **kw)
    assert a == generate(model, prompts, seed=5, **kw)
    assert a != generate(model, prompts, seed=6, **kw)
    greedy = generate(model, prompts, max_new_tokens=16)
    assert generate(model, prompts, seed=7, top_k=1, **kw) == greedy
    assert generate(model, prompts, seed=7, top_p=1e-6, **kw) == greedy
    assert generate(model, prompts, seed=5, top_k=5, top_p=0.9, **kw) != greedy


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    # top_p keeps the most likely tokens until their mass reaches top_p (0.665 + 0.245 >= 0.8).
    draws = {sample_next(logits, temperature=1.0, top_p=0.8, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}


def hf_probs(logits, temperature, top_k, top_p):
    """transformers' sampling distribution: its temperature, top-k and top-p warpers in the order generate applies
    them (each only when it filters anything: temperature != 1, top_k != 0, top_p < 1)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(torch.zeros(len(logits), 1, dtype=torch.long), logits.clone()).softmax(-1)


SAMPLING = [(t, k, p) for t in (0.5, 1.3) for k in (0, 5) for p in (1.0, 0.8)]


@pytest.mark.parametrize("temperature, top_k, top_p", SAMPLING)
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 3
    ours = next_token_probs(logits, temperature=temperature, top_k=top_k or None, top_p=top_p)
    expected = hf_probs(logits, temperature, top_k, top_p)
    assert torch.equal(ours, expected)  # the same float ops in the same order: bit-identical (measured)
    # The filters do filter here (top_p at 0.8 keeps fewer tokens than top_k alone, ...).
    kept = (ours > 0).sum(-1)
    assert (kept < 50).all() if top_k or top_p < 1 else (kept == 50).all()


@pytest.mark.parametrize("scale", [8.0, 3.0, 0.2])
def test_top_p_on_a_large_vocabulary_equals_transformers(scale):
    """Top-p over 4096 tokens, nuclei of a few tokens (found by a top-k), hundreds (larger top-ks) and almost the
    whole vocabulary (a sort): the same tokens kept as transformers' warper, the same probabilities."""
    logits = torch.randn(6, 4096, generator=torch.Generator().manual_seed(2)) * scale
    ours = next_token_probs(logits, temperature=0.9, top_p=0.9)
    expected = hf_probs(logits, 0.9, 0, 0.9)
    assert torch.equal(ours > 0, expected > 0)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-8)
    kept = int((ours > 0).sum(-1).max())
    assert {8.0: kept <= 64, 3.0: 64 < kept < 1024, 0.2: kept > 1024}[scale], kept


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.5, 0, 1.0), (1.3, 0, 1.0), (1.3, 5, 0.8), (0.5, 0, 0.8)])
def test_sample_frequencies_follow_the_distribution(temperature, top_k, top_p):
    """200k seeded draws: each token's frequency within 5 standard deviations of transformers' probability."""
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(1)) * 1.5
    draws = 200_000
    expected = hf_probs(logits, temperature, top_k, top_p)[0].double()
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits.expand(draws, -1), temperature=temperature, top_k=top_k or None, top_p=top_p,
                      generator=g)
    freq = torch.bincount(ids, minlength=10).double() / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert torch.equal(freq > 0, expected > 0)  # never a filtered-out token
    assert ((freq - expected).abs() <= 5 * sigma).all(), (freq, expected)  # measured: at most 2.7 sigma


def test_stop_tokens_and_stop_strings():
    model = from_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=4)
    prompts = random_prompts(64, (3, 6))
    full = generate(model, prompts, max_new_tokens=16)
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    # A stop token ends its row (included); the other row goes on.
    stopped = generate(model, prompts, max_new_tokens=16, stop_ids=[full[0][4]])
    assert stopped[0] == full[0][: full[0].index(full[0][4]) + 1] and stopped[1][:3] == full[1][:3]
    # A stop string ends the row at the token that completes it; the text is cut before it.
    stop = decode(full[1][5:7])
    out = generate(model, prompts, max_new_tokens=16, stop_strings=[stop], decode=decode)
    assert len(out[1]) <= 7 and stop in decode(out[1])
    assert cut_at_stop(decode(out[1]), [stop]) == cut_at_stop(decode(full[1]), [stop])
    assert cut_at_stop("abcXdeYf", ["Y", "X"]) == "abc" and cut_at_stop("abc", ["", "z"]) == "abc"


# ----------------------------------------------------------------------------------------- the program


@pytest.fixture()
def demo_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def config(**kw):
    kw.setdefault("model", ModelSection(path="builtin:demo-model"))
    kw.setdefault("dtype", "fp32")
    return GenerateConfig(**kw)


def test_cli_runs_the_demo_with_chat(demo_cache):
    result = CliRunner().invoke(app, ["run", "generate", "--config", "demo", "max_new_tokens=8"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "generated" in result.output


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random model with a trained BPE tokenizer (600 tokens, mostly words): its output is readable text."""
    from _tokfixtures import build_bpe_folder

    folder = tmp_path_factory.mktemp("text-model")
    hf_model("qwen3", vocab_size=600, max_position_embeddings=256).save_pretrained(folder)
    build_bpe_folder(folder)  # after the model: its generation_config.json names the stop ids
    return folder


def test_program_batches_chats_files_and_stop_strings(text_model, tmp_path, capsys):
    from ftprog.core import load_tokenizer

    tokenizer = load_tokenizer(text_model)
    model_cfg = ModelSection(path=str(text_model))
    one = run(config(model=model_cfg, prompt="Hello", chat=True, max_new_tokens=12))
    # The same prompts from a JSONL file (one as chat messages, one as text), batched with left padding.
    file = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hello"}]}, {"prompt": "The quick brown fox"}]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_file = tmp_path / "out.jsonl"
    both = run(config(model=model_cfg, prompts_file=str(file), max_new_tokens=12, output_file=str(out_file)))
    assert both[0] == one[0]
    model = load_pretrained(text_model)
    ids = tokenizer.encode("The quick brown fox")
    expected = generate(model, [ids], max_new_tokens=12, stop_ids=tokenizer.stop_ids)[0]
    assert both[1] == tokenizer.decode(expected, skip_special_tokens=True) and len(both[1]) > 6
    assert [json.loads(line)["completion"] for line in out_file.read_text().splitlines()] == both
    # A stop string taken from the middle of the greedy text cuts it there, also when streaming.
    text = both[1]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    capsys.readouterr()
    cut = run(config(model=model_cfg, prompt="The quick brown fox", max_new_tokens=12, stop=[stop], stream=True))
    assert cut == [cut_at_stop(text, [stop])] and len(cut[0]) < len(text)
    assert capsys.readouterr().out.startswith(cut[0] + "\n")


def test_program_errors(demo_cache, tmp_path):
    with pytest.raises(ValueError, match="prompt is empty"):
        run(config(prompt="  "))
    with pytest.raises(ValueError, match="not both"):
        run(config(prompt="x", prompts_file="p.txt"))
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens: shorten the prompt"):
        run(config(prompt="word " * 100, max_new_tokens=10))
    with pytest.raises(FileNotFoundError, match="adapter folder .* does not exist"):
        run(config(prompt="x", adapter=str(tmp_path / "missing")))
    # An adapter trained on another base model.
    other = hf_model("llama2")
    add_peft_adapter(other, tmp_path / "other-adapter")
    with pytest.raises(ValueError, match="wrong base model"):
        run(config(prompt="x", adapter=str(tmp_path / "other-adapter")))


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantized_generation_equals_the_quantized_model(demo_cache, tmp_path, scheme):
    """`run generate quantize=...` writes the greedy text of the model quantized in memory (transforms.quantize)."""
    from ftprog.core import load_tokenizer
    from ftprog.programs.demo_assets import resolve
    from ftprog.programs.generate import encode_prompt
    from ftprog.transforms import quantize

    file = tmp_path / "prompts.txt"
    file.write_text("Once upon a time\napple tree\n")
    cfg = config(prompts_file=str(file), max_new_tokens=24, quantize=scheme)
    out = run(cfg)
    path = resolve(cfg.model.path)
    tokenizer = load_tokenizer(path)
    ids = [encode_prompt(tokenizer, p, cfg) for p in file.read_text().splitlines()]
    model = load_pretrained(path)
    quantized = generate(quantize(model, scheme, skip_unsupported=True), ids, max_new_tokens=24,
                         stop_ids=tokenizer.stop_ids)
    decode = lambda rows: [tokenizer.decode(r, skip_special_tokens=True) for r in rows]  # noqa: E731
    assert out == decode(quantized)
    # Prompts whose text quantization changes (chosen among a dozen): the check above sees the quantization.
    assert out != decode(generate(model, ids, max_new_tokens=24, stop_ids=tokenizer.stop_ids))


def test_saved_preset_roundtrip_generates_like_transformers(tmp_path):
    """A ft-prog-saved model loads in transformers and generates the same tokens."""
    model = from_config("tiny", seed=2)
    save_pretrained(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    prompts = random_prompts(model.config.vocab_size, (6, 9))
    assert generate(model, prompts, max_new_tokens=8) == hf_greedy(hf, prompts, 8)
