"""OLMo 2, SmolLM3, Gemma 2, Gemma 3 (text) and Phi-3/4 against transformers and peft on tiny checkpoints that hit
every layer kind (sliding and global, RoPE and no RoPE, soft-capped, fused projections, LongRoPE's short and long
factors, partial rotary): packed rows, the KV cache, LoRA and full fine-tuning gradients, the fused loss with
final soft-capping, and save round trips.

Plain and padded logits and greedy generation of these families are checked with every other architecture in
test_model_parity.py and test_generate.py (they are in ``_hf.ARCHS``)."""

import json

import pytest
import torch
import transformers

from _hf import hf_model, save_hf
from _oracle import causal_lm_loss, peft_grads, peft_reference
from ftprog.core import KVCache, load_pretrained, save_pretrained, token_loss_sum, value_and_grad
from ftprog.transforms import checkpoint, lora

FAMILIES = ["olmo2", "smollm3", "gemma2", "gemma3", "phi3", "phi4-mini"]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.with_params({p: t + 0.05 * torch.randn(t.shape, generator=g).to(t.dtype)
                              for p, t in model.trainable_params().items()})


def test_configs_read_every_layer_kind(tmp_path):
    """The tiny configs really hold the layer kinds the other tests rely on."""
    cfg = {}
    for family in FAMILIES:
        save_hf(family, tmp_path / family)
        cfg[family] = load_pretrained(tmp_path / family).config
    assert [r is None for r in cfg["smollm3"].layer_rotary] == [False, True, False, True]
    assert cfg["gemma2"].layer_windows == (4, None)
    assert cfg["gemma2"].attn_softcap == 0.5 and cfg["gemma2"].final_softcap == 0.3
    g3 = cfg["gemma3"]
    assert g3.layer_windows == (4, 4, None)
    local, _, glob = g3.layer_rotary
    assert (local.theta, local.scaling) == (10000.0, None)
    assert glob.theta == 1000000.0 and dict(glob.scaling)["factor"] == 8.0
    assert cfg["olmo2"].qk_norm == "projection" and cfg["olmo2"].norm_placement == "post"
    phi3, phi4 = cfg["phi3"], cfg["phi4-mini"]
    assert phi3.fused_projections and phi3.layer_windows == (6, 6)
    assert dict(phi3.rotary.scaling)["rope_type"] == "longrope" and phi3.rotary.dim == 16
    assert phi4.rotary.dim == 12 and phi4.tie_word_embeddings


def test_longrope_switches_factors_past_the_original_context(tmp_path):
    """Up to the original context (8) the short factors apply, past it the long ones, for the whole call (as
    transformers decides per forward)."""
    hf = save_hf("phi3", tmp_path)
    model = load_pretrained(tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        for n in (8, 9, 12):
            assert (model(tokens[:, :n]) - hf(tokens[:, :n]).logits).abs().max() <= 1e-4
        # the first 8 positions depend on whether the call reaches past the original context
        assert (model(tokens[:, :8]) - model(tokens[:, :9])[:, :8]).abs().max() > 1e-3


def test_lora_part_names_select_the_fused_projection(tmp_path):
    save_hf("phi3", tmp_path)
    adapted = lora(load_pretrained(tmp_path), rank=2, alpha=4, targets=("q_proj", "v_proj", "up_proj"))
    modules = sorted({p.split(".lora_")[0].split(".", 3)[-1] for p in adapted.trainable})
    assert modules == ["mlp.gate_up_proj", "self_attn.qkv_proj"]
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear layer.*'gate_up_proj'.*'qkv_proj'"):
        lora(load_pretrained(tmp_path), rank=2, alpha=4, targets=("qkv",))


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_packing_and_cache(family, tmp_path):
    save_hf(family, tmp_path)
    model = load_pretrained(tmp_path)
    vocab = model.config.vocab_size
    # 8 positions at most: past the sliding windows (4, 6), within Phi's original LongRoPE context (8), where
    # one call's factors (chosen from its largest position, as transformers does) serve every row
    a, b = torch.randint(0, vocab, (1, 8)), torch.randint(0, vocab, (1, 5))
    with torch.no_grad():
        alone_a, alone_b = model(a), model(b)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), a], dim=1)
        mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 8)], dim=1).long()
        assert (model(padded, attention_mask=mask)[:, 3:] - alone_a).abs().max() <= 1e-5

        packed = model(torch.cat([a, b], dim=1), position_ids=torch.cat([torch.arange(8), torch.arange(5)])[None])
        assert (packed[:, :8] - alone_a).abs().max() <= 1e-5
        assert (packed[:, 8:] - alone_b).abs().max() <= 1e-5

        cache = KVCache.empty(model.config, batch=1, max_len=12, dtype=torch.float32)
        steps = [model(a[:, :5], cache=cache)] + [model(a[:, i : i + 1], cache=cache) for i in range(5, 7)]
        steps.append(model(a[:, 7:], cache=cache))
    assert (torch.cat(steps, dim=1) - alone_a).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_full_gradients_match_peft_and_transformers(family, tmp_path):
    hf = save_hf(family, tmp_path)
    base = load_pretrained(tmp_path)
    tokens = torch.randint(0, base.config.vocab_size, (2, 12))
    with_pad = tokens.clone()
    with_pad[:, 5] = base.config.pad_token_id  # its embedding row gets no gradient from the lookup, as transformers'

    def loss_fn(model, tokens):
        return causal_lm_loss(model(tokens, training=True), tokens)

    full = checkpoint(base)
    loss, grads = value_and_grad(loss_fn)(full, with_pad)
    ref_loss = causal_lm_loss(hf(with_pad).logits, with_pad)
    ref_loss.backward()
    expected = {n: p.grad for n, p in hf.named_parameters()}
    if base.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert grads.keys() == expected.keys()
    for path, g in grads.items():
        assert rel_err(g, expected[path]) <= 1e-5, path
    hf.zero_grad()

    adapted = perturbed(lora(base, rank=4, alpha=8, targets="all-linear"))
    ref = peft_reference(hf, adapted)
    loss, grads = value_and_grad(loss_fn)(adapted, tokens)
    ref_loss = causal_lm_loss(ref(tokens).logits, tokens)
    ref_loss.backward()
    expected = peft_grads(ref)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert grads.keys() == expected.keys() == adapted.trainable
    for path, g in grads.items():
        assert rel_err(g, expected[path]) <= 1e-5, path


@pytest.mark.parametrize("head", ["fused", "lora"])
def test_loss_applies_final_softcap(head, tmp_path):
    """Gemma 2's final soft-capping in both output-layer loss paths: the fused one (a plain output layer) and the
    chunked one an adapted output layer takes. Loss and gradients equal cross-entropy of transformers' capped
    logits."""
    hf = hf_model("gemma2", tie_word_embeddings=head == "fused")
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 10))
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    if head == "lora":
        model = perturbed(lora(model, rank=2, alpha=4, targets=("lm_head", "q_proj")))
        hf = peft_reference(hf, model)

    def loss_fn(m, tokens):
        return token_loss_sum(m, tokens, targets, chunk_size=7) / targets.ne(-100).sum()

    loss, grads = value_and_grad(loss_fn)(model, tokens)
    ref_loss = causal_lm_loss(hf(tokens).logits, tokens)
    ref_loss.backward()
    expected = peft_grads(hf) if head == "lora" else {n: p.grad for n, p in hf.named_parameters()}
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    for path, g in grads.items():
        assert rel_err(g, expected[path]) <= 1e-5, path


@pytest.mark.parametrize("family", FAMILIES)
def test_save_round_trips_through_transformers(family, tmp_path):
    hf = save_hf(family, tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(again) is type(hf)
    assert type(again.config) is type(hf.config)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (again(tokens).logits - hf(tokens).logits).abs().max() == 0
    assert load_pretrained(tmp_path / "ours").config.to_hf() == model.config.to_hf()


def test_sft_plan_and_generate_on_gemma2(tmp_path):
    """The programs take a new family with no change: `ft-prog plan` answers, `ft-prog run sft` trains LoRA with
    activation checkpointing through the fused soft-capped loss, and `ft-prog run generate` reads the result."""
    from typer.testing import CliRunner

    from _sft_fixtures import build_model_folder, reverse_rows, write_config, write_jsonl
    from ftprog.programs.cli import app

    model = build_model_folder(tmp_path / "model", family="gemma2")
    data = write_jsonl(tmp_path / "train.jsonl", reverse_rows(24))
    cfg = write_config(tmp_path / "sft.toml", model, data, tmp_path / "out")
    runner = CliRunner()
    overrides = ["peft.method=lora", "activation_checkpointing=true", "max_steps=4", "optimizer.lr=1e-2"]
    plan = runner.invoke(app, ["plan", str(cfg), *overrides, "--device", "cpu", "--memory", "8GiB"])
    assert plan.exit_code == 0 and "fits in 8.00 GiB" in plan.output, plan.output
    run = runner.invoke(app, ["run", "sft", "--config", str(cfg), *overrides])
    assert run.exit_code == 0, run.output
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    gen = runner.invoke(app, ["run", "generate", f"model.path={model}", f"adapter={tmp_path / 'out' / 'final'}",
                              'prompt="abc"', "max_new_tokens=4"])
    assert gen.exit_code == 0, gen.output


def test_generation_recomputes_the_cache_where_longrope_switches(tmp_path):
    """A prompt shorter than the original context (8) that grows past it: the cached short-factor keys are
    recomputed with the long factors once, as transformers' generate does, so greedy tokens stay equal."""
    from test_generate import hf_greedy

    from ftprog.programs.generate import generate

    hf = save_hf("phi3", tmp_path)
    model = load_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    for length in range(2, 9):
        prompt = torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist()
        assert generate(model, [prompt], max_new_tokens=12) == hf_greedy(hf, [prompt], 12), length


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_and_compile_equal_eager(family, tmp_path):
    from ftprog.transforms import compile

    # torch 2.13's dynamo fails ("lift_tracked_freevar_to_input should not be called on root SubgraphTracer")
    # when, in one process, a checkpointed layer of a second family with other norm settings is compiled after
    # a first (gemma2 then gemma3; one model per process, with any number of recompiles, works): start clean
    torch._dynamo.reset()
    save_hf(family, tmp_path)
    adapted = perturbed(lora(load_pretrained(tmp_path), rank=2, alpha=4, targets="all-linear"))
    compiled = compile(checkpoint(adapted), backend="aot_eager")
    tokens = torch.randint(0, adapted.config.vocab_size, (2, 12))

    def loss_fn(model, tokens):
        return causal_lm_loss(model(tokens, training=True), tokens)

    eager_loss, eager_grads = value_and_grad(loss_fn)(adapted, tokens)
    loss, grads = value_and_grad(loss_fn)(compiled, tokens)
    assert abs(loss.item() - eager_loss.item()) <= 1e-5 * eager_loss.item()
    for path, g in grads.items():
        assert rel_err(g, eager_grads[path]) <= 1e-5, path


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("family", ["gemma2", "phi4-mini"])
def test_checkpoint_and_shard_equal_eager(family, tmp_path, process_group):
    """Sharding (FSDP2 on a 1-process gloo group) of the families' own trees: sandwich norms, soft-caps, fused
    projections, tied embeddings; loss and gradients through the fused loss equal the eager model's."""
    from ftprog.core import is_dtensor
    from ftprog.transforms import shard, unshard

    save_hf(family, tmp_path)
    adapted = perturbed(lora(load_pretrained(tmp_path), rank=2, alpha=4, targets="all-linear"))
    sharded = shard(checkpoint(adapted))
    tokens = torch.randint(0, adapted.config.vocab_size, (2, 12))
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)

    def loss_fn(m, tokens):
        return token_loss_sum(m, tokens, targets) / targets.ne(-100).sum()

    eager_loss, eager_grads = value_and_grad(loss_fn)(adapted, tokens)
    loss, grads = value_and_grad(loss_fn)(sharded, tokens)
    assert abs(loss.item() - eager_loss.item()) <= 1e-5 * eager_loss.item()
    for path, g in grads.items():
        g = g.full_tensor() if is_dtensor(g) else g
        assert rel_err(g, eager_grads[path]) <= 1e-5, path
    with torch.no_grad():
        assert (unshard(sharded)(tokens) - adapted(tokens)).abs().max() <= 1e-6


def test_multimodal_gemma3_loads_as_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder loads as its gemma3_text language model (vision tower left out, with
    a note), in both weight layouts: transformers 5's and the Hub's ``language_model.model.*`` and transformers
    4.5x's ``model.language_model.*``. Its logits equal the multimodal model's on text; it trains and generates as
    transformers does; saved, it is a gemma3_text folder that Gemma3ForCausalLM loads."""
    from safetensors.torch import load_file, save_file

    from _hf import hf_gemma3_multimodal
    from ftprog.programs.generate import generate

    hf = hf_gemma3_multimodal()
    hf.save_pretrained(tmp_path / "mm")
    stored = load_file(tmp_path / "mm" / "model.safetensors")
    assert any(k.startswith("language_model.model.layers.") for k in stored)  # the layout transformers 5.25 saves
    older = tmp_path / "mm-4.5x"  # the same weights as transformers 4.50-4.57 saved them
    older.mkdir()
    (older / "config.json").write_text((tmp_path / "mm" / "config.json").read_text())
    renames = {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
               "multi_modal_projector.": "model.multi_modal_projector."}
    save_file({next((new + k[len(old):] for old, new in renames.items() if k.startswith(old)), k): t
               for k, t in stored.items()}, older / "model.safetensors")

    tokens = torch.randint(0, 90, (2, 10))  # text only: below the image tokens (93-95)
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
    for folder in (tmp_path / "mm", older):
        with pytest.warns(UserWarning, match=r"multimodal checkpoint; loaded its language model only, \d+ vision"):
            model = load_pretrained(folder)
        assert model.config.model_type == "gemma3_text" and model.config.layer_windows == (4, 4, None)
        with torch.no_grad():
            assert (model(tokens) - want).abs().max() <= 1e-4

    loss, grads = value_and_grad(lambda m, t: causal_lm_loss(m(t, training=True), t))(model, tokens)
    assert torch.isfinite(loss) and grads.keys() == set(model.trainable)
    prompt = tokens[:1].tolist()
    with torch.no_grad():
        hf_new = hf.generate(input_ids=tokens[:1], do_sample=False, max_new_tokens=5, min_new_tokens=5,
                             eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
    assert generate(model, prompt, max_new_tokens=5) == [hf_new]

    out = save_pretrained(model, tmp_path / "text")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    text_hf = transformers.Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (text_hf(tokens).logits - want).abs().max() <= 1e-4
        assert torch.equal(load_pretrained(out)(tokens), model(tokens))
