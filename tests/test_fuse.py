"""fuse_projections: q/k/v and gate/up as one matmul each, the tree in the checkpoint's layout."""

import pytest
import torch

from _sft_fixtures import model_dir, train_file, write_config  # noqa: F401, F811 - pytest fixtures
from ftprog.core import flatten, from_config, load_pretrained, save_pretrained, token_loss_sum, value_and_grad
from ftprog.transforms import checkpoint, fuse_projections, lora, quantize, shard, trainable
from ftprog.transforms._fuse import PARTS_KEY, fused_layer

LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
QWEN2 = {**LLAMA, "model_type": "qwen2"}  # q/k/v biases


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.with_params({p: t + 0.05 * torch.randn(t.shape, generator=g)
                              for p, t in flatten(model.params).items()})


def loss_and_grads(model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 16), generator=g)
    positions = torch.cat([torch.arange(10), torch.arange(6)]).expand(2, 16)  # two packed documents a row
    loss, grads = value_and_grad(lambda m: token_loss_sum(m, tokens, tokens, position_ids=positions))(model)
    return loss, grads


def assert_same_step(model, reference):
    loss, grads = loss_and_grads(model)
    ref_loss, ref_grads = loss_and_grads(reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for path, g in grads.items():
        torch.testing.assert_close(g, ref_grads[path], rtol=1e-5, atol=1e-6, msg=path)


@pytest.mark.parametrize("config", [LLAMA, QWEN2], ids=["llama", "qwen2-bias"])
def test_full_finetune_logits_and_grads_equal_unfused(config):
    """Every leaf trainable (q/k/v biases too): the loss and each original leaf's gradient equal the unfused model's."""
    model = trainable(perturbed(from_config(config, seed=0)))
    fused = fuse_projections(model)
    assert fused.params is model.params and fused.trainable == model.trainable
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), model(tokens), rtol=1e-5, atol=1e-6)
    assert_same_step(fused, model)
    assert_same_step(checkpoint(fused), model)  # prepared again inside the recomputation


def test_groups_with_adapters_or_quantized_weights_stay_separate():
    """LoRA on q/v keeps q/k/v separate but fuses the frozen gate/up; gradients still equal. int8 weights: none."""
    base = perturbed(from_config(LLAMA, seed=0))
    adapted = lora(base, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    adapted = adapted.with_params({p: t + 0.1 for p, t in adapted.trainable_params().items() if ".lora_B." in p})
    node = fused_layer(adapted.params["model"]["layers"]["0"])
    assert "q_proj" in node["self_attn"] and "qkv_proj" not in node["self_attn"]
    assert PARTS_KEY in node["mlp"]["gate_up_proj"] and "gate_proj" not in node["mlp"]
    assert_same_step(fuse_projections(adapted), adapted)
    quantized = fused_layer(quantize(base, "int8").params["model"]["layers"]["0"])
    assert "qkv_proj" not in quantized["self_attn"] and "gate_up_proj" not in quantized["mlp"]


def test_saved_checkpoint_keeps_the_original_layout(tmp_path):
    model = perturbed(from_config(LLAMA, seed=0))
    fused = fuse_projections(trainable(model))
    save_pretrained(fused, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert flatten(loaded.params).keys() == flatten(model.params).keys()
    assert "model.layers.0.self_attn.q_proj.weight" in flatten(loaded.params)
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(fuse_projections(loaded)(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def test_order_and_repetition_are_refused():
    fused = fuse_projections(from_config(LLAMA, seed=0))
    with pytest.raises(ValueError, match="already fused"):
        fuse_projections(fused)
    with pytest.raises(ValueError, match="shard after fuse_projections"):
        shard(fused)


def test_plan_measures_the_fused_model_and_it_keeps_no_more():
    """The planner runs the real transform: activations and every phase equal the unfused model's (the
    concatenated weights are transients; v is not kept as a view of the whole q/k/v output)."""
    from ftprog.programs.plan import estimate

    unfused, fused = (estimate("tiny", method="full", dtype="fp32", batch_size=2, seq_len=64, fuse_projections=f)
                      for f in (False, True))
    assert fused.setup.fuse_projections and fused.activations == unfused.activations
    assert fused.phases == unfused.phases


def test_sft_with_fuse_projections_trains_as_unfused_and_resumes_exactly(
        tmp_path, model_dir, train_file, capsys):  # noqa: F811
    """``fuse_projections = true`` in an sft run: the losses of the unfused run (fp32, float rounding apart); a
    run stopped at a checkpoint and resumed ends bit for bit where the uninterrupted fused run ends."""
    import json
    import shutil

    from safetensors.torch import load_file
    from ftprog.programs import sft
    from ftprog.programs.cli import CONFIG_DIR
    from ftprog.programs.config import load_config

    config = write_config(tmp_path / "sft.toml", model_dir, train_file, tmp_path / "out")

    def run(out, *overrides):
        cfg, resolved = load_config(sft.CONFIG, config, ["log.plot=false", "threads=1", f"output_dir={tmp_path / out}",
                                                         *overrides], builtin_dir=CONFIG_DIR / "sft")
        sft.run(cfg, resolved)
        records = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r], load_file(tmp_path / out / "final" / "model.safetensors")

    plain_losses, _ = run("plain", "max_steps=4")
    fused_losses, fused = run("fused", "max_steps=4", "fuse_projections=true")
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    assert "model.layers.0.self_attn.q_proj.weight" in fused and "model.layers.0.mlp.gate_proj.weight" in fused
    run("resumed", "max_steps=4", "save_every=2", "fuse_projections=true")
    shutil.rmtree(tmp_path / "resumed" / "final")  # as if stopped after the step-2 checkpoint
    capsys.readouterr()
    resumed_losses, resumed = run("resumed", "max_steps=4", "save_every=2", "fuse_projections=true")
    assert "resumed from" in capsys.readouterr().out and "step_2" in str(sorted((tmp_path / "resumed").iterdir()))
    assert resumed_losses[-2:] == fused_losses[-2:]
    assert all(torch.equal(resumed[k], fused[k]) for k in fused)
