"""Mixtral and Qwen3-MoE against transformers (and peft) on tiny checkpoints (``_hf.MOE_ARCHS``): the checkpoint's
per-expert layout kept in the tree and on save, top-k routing, plain / padded / packed / cached logits, bf16,
greedy generation, full fine-tuning gradients, the router's load-balancing loss, per-expert LoRA (grouped over the
experts = one expert at a time), padded expert rows, and the sft program's ``aux_loss``."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from _hf import MOE_ARCHS, save_hf
from _oracle import causal_lm_loss
from ftprog.core import (
    ConfigError, KVCache, ModelConfig, from_config, grouped_linear, linear_paths, load_pretrained, param_shapes,
    per_node_linear, router_aux_loss, save_pretrained, set_training, value_and_grad,
)
from ftprog.core import _decoder
from ftprog.core._decoder import expert_row_block, padded_slots, route
from ftprog.transforms import checkpoint, load_adapter, lora, merge, save_adapter
from ftprog.transforms._lora import LoraSpec

ARCHS = sorted(MOE_ARCHS)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def stored_shapes(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def hf_grads_by_our_names(hf, model) -> dict[str, torch.Tensor]:
    """transformers' gradients under ft-prog's (the checkpoint's) names: its fused in-memory experts
    (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) split per expert."""
    moe = model.config.moe
    gate, up, down = moe.projections
    out = {}
    for name, p in hf.named_parameters():
        if ".mlp.experts." not in name and ".mlp.gate." not in name:
            out[name] = p.grad
            continue
        layer = name.split(".mlp.")[0]
        block = f"{layer}.{moe.block}"
        if name.endswith("mlp.gate.weight"):
            out[f"{block}.gate.weight"] = p.grad
        elif name.endswith("gate_up_proj"):
            for e in range(moe.num_experts):
                g, u = p.grad[e].chunk(2, dim=0)
                out[f"{block}.experts.{e}.{gate}.weight"], out[f"{block}.experts.{e}.{up}.weight"] = g, u
        else:
            for e in range(moe.num_experts):
                out[f"{block}.experts.{e}.{down}.weight"] = p.grad[e]
    return out


def test_configs_read_the_expert_layout(tmp_path):
    """Each tiny config holds what the other tests rely on: dense and sparse layers mixed, renormalised top-k or
    not, sliding windows, q/k norms; the tree keeps the checkpoint's per-expert names."""
    cfg = {arch: (save_hf(arch, tmp_path / arch), load_pretrained(tmp_path / arch).config)[1] for arch in ARCHS}
    mixtral, qwen, step2 = cfg["mixtral"], cfg["qwen3-moe"], cfg["qwen3-moe-step2"]
    assert mixtral.moe.sparse_layers == (0, 1) and mixtral.moe.projections == ("w1", "w3", "w2")
    assert mixtral.moe.block == "block_sparse_moe" and mixtral.layer_windows == (5, 5)
    assert mixtral.moe.num_experts == 4 and mixtral.moe.top_k == 2 and mixtral.moe.aux_loss_coef == 0.02
    assert qwen.moe.sparse_layers == (0, 2) and qwen.moe.normalize_top_k and qwen.qk_norm == "head"
    assert qwen.moe.intermediate_size == 48 and qwen.intermediate_size == 128
    assert step2.moe.sparse_layers == (1, 3) and not step2.moe.normalize_top_k and step2.layer_windows == (6,) * 4
    paths = linear_paths(qwen)
    assert "model.layers.0.mlp.experts.7.down_proj" in paths and "model.layers.1.mlp.down_proj" in paths
    assert "model.layers.0.mlp.gate" not in paths  # the router is no LoRA / quantization target
    assert param_shapes(mixtral)["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == (64, 128)


def test_config_errors_name_the_key():
    base = dict(model_type="qwen3_moe", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    with pytest.raises(ConfigError, match="num_experts_per_tok 5 should be between 1 and num_experts 4"):
        ModelConfig.from_hf({**base, "num_experts_per_tok": 5})
    with pytest.raises(ConfigError, match=r"mlp_only_layers \[2\] name layers outside 0..1"):
        ModelConfig.from_hf({**base, "mlp_only_layers": [2]})
    with pytest.raises(ConfigError, match="decoder_sparse_step should be >= 1"):
        ModelConfig.from_hf({**base, "decoder_sparse_step": 0})
    with pytest.raises(ConfigError, match="key 'num_experts_per_tok' should be int, got '2'"):
        ModelConfig.from_hf({**base, "num_experts_per_tok": "2"})
    # a key left out takes transformers' default, as for every family
    assert ModelConfig.from_hf({k: v for k, v in base.items() if k != "moe_intermediate_size"}).moe.intermediate_size \
        == 768


def test_route_is_softmax_top_k_then_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, 0.0]])
    probs = torch.softmax(logits, dim=-1)
    weights, experts = route(logits, 2, normalize=False)
    assert experts.tolist() == [[0, 1], [2, 1]]
    assert torch.allclose(weights, probs.gather(1, experts))
    weights, _ = route(logits, 2, normalize=True)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert torch.allclose(weights[0], probs[0, :2] / probs[0, :2].sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tmp_path):
    """Plain, left- and right-padded batches, packed rows (position_ids restarting) and KV-cache decoding, each
    within 1e-4 of transformers' fp32 logits."""
    hf = save_hf(arch, tmp_path)
    model = load_pretrained(tmp_path)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4
        got = model(tokens, attention_mask=mask)
        want = hf(tokens, attention_mask=mask, position_ids=positions).logits
        assert (got[mask.bool()] - want[mask.bool()]).abs().max() <= 1e-4

        a, b = tokens[2:, :8], tokens[2:, 8:]
        packed = model(tokens[2:], position_ids=torch.cat([torch.arange(8), torch.arange(4)])[None])
        assert (packed[:, :8] - hf(a).logits).abs().max() <= 1e-4
        assert (packed[:, 8:] - hf(b).logits).abs().max() <= 1e-4

        cache = KVCache.empty(model.config, batch=3, max_len=16, dtype=torch.float32)
        steps = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in (6, 7)]
        steps.append(model(tokens[:, 8:], cache=cache))
        assert (torch.cat(steps, dim=1) - hf(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_match_transformers(arch, tmp_path):
    """In bf16 the routing weights are rounded where transformers rounds them (Qwen3-MoE casts them to bf16,
    Mixtral scales in fp32): a few bf16 steps of the largest logit apart, as the dense families."""
    ref = save_hf(arch, tmp_path).to(torch.bfloat16)
    model = load_pretrained(tmp_path, dtype="bf16")
    tokens = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(tokens).logits.float(), model(tokens).float()
    assert (got - expected).abs().max() <= 1.5e-2 * expected.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_transformers(arch, tmp_path):
    from test_generate import hf_greedy, random_prompts

    from ftprog.programs.generate import generate

    hf = save_hf(arch, tmp_path, seed=1)
    model = load_pretrained(tmp_path)
    prompts = random_prompts(model.config.vocab_size)
    assert generate(model, prompts, max_new_tokens=10) == hf_greedy(hf, prompts, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_round_trips_names_shapes_and_logits(arch, tmp_path):
    """save_pretrained writes the tensors transformers saved, under the same names and shapes (per expert), and a
    config.json that transformers loads into the same model; loading it again gives the same config."""
    hf = save_hf(arch, tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "ours")
    assert stored_shapes(tmp_path / "ours") == stored_shapes(tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(again) is type(hf)
    for key in ("num_experts_per_tok", "router_aux_loss_coef", "sliding_window", "num_local_experts",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size"):
        assert getattr(again.config, key, None) == getattr(hf.config, key, None), key
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (again(tokens).logits - hf(tokens).logits).abs().max() == 0
    assert load_pretrained(tmp_path / "ours").config.to_hf() == model.config.to_hf()


@pytest.mark.parametrize("arch", ARCHS)
def test_full_fine_tuning_gradients_equal_transformers(arch, tmp_path):
    """Cross-entropy plus the weighted router loss, with activation checkpointing: loss and every gradient
    (router, each expert, dense layers) equal transformers' ``labels`` loss with ``output_router_logits``."""
    hf = save_hf(arch, tmp_path)
    model = checkpoint(load_pretrained(tmp_path))
    # no pad token (id 0): transformers' nn.Embedding(padding_idx) never gives the pad row a gradient
    tokens = torch.randint(3, model.config.vocab_size, (2, 12))
    coef = model.config.moe.aux_loss_coef

    def loss_fn(m, tokens):
        sink = []
        logits = m.with_router_logits(sink)(tokens, training=True)
        return causal_lm_loss(logits, tokens) + coef * router_aux_loss(sink, m.config)

    loss, grads = value_and_grad(loss_fn)(model, tokens)
    out = hf(tokens, labels=tokens, output_router_logits=True)
    out.loss.backward()
    expected = hf_grads_by_our_names(hf, model)
    assert abs(loss.item() - out.loss.item()) <= 1e-5 * out.loss.item()
    assert grads.keys() == expected.keys()
    for path, g in grads.items():
        assert rel_err(g, expected[path]) <= 1e-5, path


@pytest.mark.parametrize("arch", ARCHS)
def test_router_aux_loss_equals_transformers(arch, tmp_path):
    """The load-balancing loss over the sparse layers equals transformers' ``aux_loss``, unpadded and with
    padding (attention_mask leaves padding out); the forward returns one router-logit tensor per sparse layer."""
    hf = save_hf(arch, tmp_path)
    model = load_pretrained(tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, -3:] = 0
    with torch.no_grad():
        logits, router_logits = model(tokens, return_router_logits=True)
        assert len(router_logits) == len(model.config.moe.sparse_layers)
        assert router_logits[0].shape == (30, model.config.moe.num_experts)
        assert torch.equal(logits, model(tokens))
        want = hf(tokens, output_router_logits=True).aux_loss
        assert abs(router_aux_loss(router_logits, model.config).item() - want.item()) <= 1e-6 * want.item()

        _, router_logits = model(tokens, attention_mask=mask, return_router_logits=True)
        want = hf(tokens, attention_mask=mask, output_router_logits=True).aux_loss
        got = router_aux_loss(router_logits, model.config, mask)
        assert abs(got.item() - want.item()) <= 1e-6 * want.item()
        assert abs(router_aux_loss(router_logits, model.config).item() - got.item()) > 1e-4  # the mask counts
    assert router_aux_loss((), model.config).item() == 0


def test_router_jitter_is_training_only(tmp_path):
    """Mixtral's router_jitter_noise: the same logits in eval mode, noisy ones in training mode."""
    save_hf("mixtral", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "router_jitter_noise": 0.1}))
    model = load_pretrained(tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens, training=False))
        torch.manual_seed(0)
        noisy = model(tokens, training=True)
    assert (noisy - model(tokens)).abs().max() > 1e-3


def test_from_config_builds_a_random_moe():
    model = from_config(dict(model_type="qwen3_moe", vocab_size=32, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=8, mlp_only_layers=[0]))
    assert set(model.params["model"]["layers"]["1"]["mlp"]["experts"]) == {"0", "1", "2", "3"}
    assert "gate_proj" in model.params["model"]["layers"]["0"]["mlp"]
    assert model(torch.randint(0, 32, (1, 5))).shape == (1, 5, 32)


@pytest.mark.parametrize("arch, targets", [("mixtral", ("q_proj", "v_proj", "experts")),
                                           ("qwen3-moe", ("q_proj", "gate_proj", "up_proj", "down_proj"))])
def test_expert_lora_loads_in_peft_with_the_same_logits(arch, targets, tmp_path):
    """Per-expert adapters (one per expert projection, the checkpoint's per-expert layout) saved by save_adapter:
    peft (which fuses them into its adapters of transformers' 3-D expert tensors) computes the same logits;
    load_adapter reads them back exactly; merge folds them into the experts. Qwen3-MoE with every layer sparse,
    as Qwen3-30B-A3B: peft's conversion drops the dense layers' MLP targets of a mixed model."""
    import peft

    from _hf import hf_model

    overrides = {"mlp_only_layers": []} if arch.startswith("qwen3") else {}
    hf = hf_model(arch, **overrides)
    hf.save_pretrained(tmp_path / "base")
    adapted = lora(load_pretrained(tmp_path / "base"), rank=2, alpha=4, targets=targets)
    moe = adapted.config.moe
    expert_adapters = {p for p in adapted.trainable if ".experts." in p}
    assert len(expert_adapters) == 2 * 3 * moe.num_experts * len(moe.sparse_layers)
    g = torch.Generator().manual_seed(0)
    adapted = adapted.with_params({p: 0.3 * torch.randn(t.shape, generator=g)
                                   for p, t in adapted.trainable_params().items()})
    save_adapter(adapted, tmp_path / "adapter")
    tokens = torch.randint(0, adapted.config.vocab_size, (2, 10))
    with torch.no_grad():
        base_logits = hf(tokens).logits
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()  # adapts hf in place
    with torch.no_grad():
        ours = adapted(tokens)
        assert (ours - base_logits).abs().max() > 1e-2  # the experts' adapters change the logits
        assert (ours - ref(tokens).logits).abs().max() <= 1e-4
        assert torch.equal(load_adapter(load_pretrained(tmp_path / "base"), tmp_path / "adapter")(tokens), ours)
        assert (merge(adapted)(tokens) - ours).abs().max() <= 1e-4


def test_expert_lora_gradients_and_router_target(tmp_path):
    """Each expert's adapter gets the gradient of its own tokens only (an expert no token chose gets zeros), the
    loss and gradients through activation checkpointing equal eager ones; the router is no LoRA target."""
    save_hf("mixtral", tmp_path)
    adapted = lora(load_pretrained(tmp_path), rank=2, alpha=4, targets="experts")
    g = torch.Generator().manual_seed(0)
    adapted = adapted.with_params({p: 0.3 * torch.randn(t.shape, generator=g)
                                   for p, t in adapted.trainable_params().items()})
    tokens = torch.randint(3, adapted.config.vocab_size, (1, 3))

    def loss_fn(m, tokens):
        return causal_lm_loss(m(tokens, training=True), tokens)

    loss, grads = value_and_grad(loss_fn)(adapted, tokens)
    ck_loss, ck_grads = value_and_grad(loss_fn)(checkpoint(adapted), tokens)
    assert abs(loss.item() - ck_loss.item()) <= 1e-6 * loss.item()
    for path, grad in grads.items():
        assert rel_err(ck_grads[path], grad) <= 1e-5 if grad.abs().max() > 0 else ck_grads[path].abs().max() == 0
    _, router_logits = adapted(tokens, return_router_logits=True)
    # the last position's output feeds no loss term: the experts that the first two positions chose in layer 0
    chosen = {int(e) for e in route(router_logits[0][:-1], 2, True)[1].unique()}
    assert len(chosen) < 4
    for e in range(4):
        touched = grads[f"model.layers.0.block_sparse_moe.experts.{e}.w2.lora_B.weight"].abs().max() > 0
        assert touched == (e in chosen), e
    with pytest.raises(ValueError, match="lora target 'gate' is a mixture of experts' router"):
        lora(load_pretrained(tmp_path), rank=2, alpha=4, targets=("q_proj", "gate"))
    with pytest.raises(ValueError, match=r"\['w9'\] match no linear layer.*'experts'.*'w1'"):
        lora(load_pretrained(tmp_path), rank=2, alpha=4, targets=("w9",))


def expert_nodes(counts, rank=3, dropout=0.0, hidden=16, out=12, seed=0):
    """fp32 LoRA nodes of one projection of ``len(counts)`` experts (``B`` random, so the adapters count), and
    ``x [sum counts, hidden]`` sorted by expert."""
    g = torch.Generator().manual_seed(seed)
    spec = LoraSpec(rank=rank, alpha=2.0 * rank, dropout=dropout)
    nodes = [{"weight": torch.randn(out, hidden, generator=g),
              "lora_A": {"weight": torch.randn(rank, hidden, generator=g)},
              "lora_B": {"weight": torch.randn(out, rank, generator=g)}, "lora": spec} for _ in counts]
    return nodes, torch.randn(sum(counts), hidden, generator=g)


def adapter_leaves_of(nodes):
    return [t for n in nodes for t in (n["lora_A"]["weight"], n["lora_B"]["weight"])]


def test_grouped_lora_equals_the_per_expert_loop():
    """grouped_linear over LoRA experts (every adapter in two matmuls, masked) = one lora_linear per expert:
    output and the gradients of the input and every adapter, fp32, with an expert no token chose (whose adapter
    gets zero gradients); nodes of mixed kinds (plain, DoRA) and bad counts take the per-node path / are refused."""
    counts = [3, 0, 5, 2]
    nodes, x = expert_nodes(counts)
    leaves = [x.requires_grad_(), *adapter_leaves_of(nodes)]
    for t in leaves:
        t.requires_grad_()
    weight = torch.randn(10, 12)
    results = []
    for fn in (grouped_linear, per_node_linear):
        y = fn(x, counts, nodes)
        results.append((y, torch.autograd.grad((y * weight).sum(), leaves)))
    (y, grads), (ref, ref_grads) = results
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max().clamp(min=1e-6)
    assert grads[3].abs().max() == 0 and grads[4].abs().max() == 0  # expert 1's A and B: no tokens
    with torch.no_grad():
        mixed = [nodes[0], {"weight": nodes[1]["weight"]}, {**nodes[2], "lora_magnitude_vector": torch.ones(12)},
                 nodes[3]]
        assert torch.equal(grouped_linear(x, counts, mixed), per_node_linear(x, counts, mixed))
        dora = [{**n, "lora_magnitude_vector": torch.ones(12)} for n in nodes]
        assert torch.equal(grouped_linear(x, counts, dora), per_node_linear(x, counts, dora))
    with pytest.raises(ValueError, match=r"counts \[3, 0, 5\] \(sum 8\) for 4 nodes and 10 rows"):
        grouped_linear(x, [3, 0, 5], nodes)


def test_grouped_lora_dropout_drops_each_experts_input():
    """With dropout, the grouped path draws one dropout mask over the sorted rows (each row is one expert's input
    token, so every expert's adapter input is dropped independently, as peft drops each adapted linear's input)
    and the base sees the undropped rows; outside training there is no dropout."""
    counts = [4, 0, 6]
    nodes, x = expert_nodes(counts, dropout=0.5)
    previous = set_training(True)
    try:
        torch.manual_seed(7)
        y = grouped_linear(x, counts, nodes)
        torch.manual_seed(7)
        dropped = F.dropout(x, 0.5)
    finally:
        set_training(previous)
    scale = nodes[0]["lora"].scale
    ref = torch.cat([F.linear(r, n["weight"])
                     + scale * F.linear(F.linear(d, n["lora_A"]["weight"]), n["lora_B"]["weight"])
                     for r, d, n in zip(x.split(counts), dropped.split(counts), nodes)])
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(grouped_linear(x, counts, nodes), per_node_linear(x, counts, nodes), rtol=1e-5, atol=1e-5)


def test_padded_expert_rows_change_nothing(monkeypatch):
    """On the CPU each expert's rows are padded to a multiple of a block (few matmul shapes for oneDNN's kernel
    cache): padding rows carry weight 0 after the real rows of their expert, all rows a fixed number of blocks, and
    a LoRA-on-experts model's logits and adapter gradients are those without padding (fp32)."""
    token, weight = torch.tensor([5, 1, 2, 0, 7, 3, 4, 6, 8]), torch.arange(1.0, 10.0)
    rows, weights, counts = padded_slots(token, weight, [3, 0, 5, 1], block=4)
    assert counts == [4, 0, 8, 16] and len(rows) == (3 + 4) * 4
    assert rows[:3].tolist() == [5, 1, 2] and rows[4:9].tolist() == [0, 7, 3, 4, 6] and rows[12] == 8
    assert weights.tolist() == [1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 0, 0, 9] + [0] * 15
    assert expert_row_block("cpu", 2048, 8) == 16 and expert_row_block("cuda", 2048, 8) == 1
    config = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 4,
              "num_experts_per_tok": 2}
    model = lora(from_config(config, seed=0), rank=2, alpha=4, targets="experts")
    g = torch.Generator().manual_seed(0)
    model = model.with_params({p: 0.3 * torch.randn(t.shape, generator=g) for p, t in model.trainable_params().items()})
    tokens = torch.randint(0, 64, (2, 64), generator=g)  # 256 (token, expert) pairs: blocks of 4 rows
    results = []
    for cap in (32, 1):
        monkeypatch.setitem(_decoder.EXPERT_ROW_BLOCK, "cpu", cap)
        results.append(value_and_grad(lambda m: causal_lm_loss(m(tokens, training=True), tokens))(model))
    (loss, grads), (ref_loss, ref_grads) = results
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    for path, grad in ref_grads.items():
        assert (grads[path] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp(min=1e-6), path


def test_sft_adds_and_logs_the_router_loss(tmp_path, monkeypatch):
    """`ft-prog run sft` on a mixture of experts: the step loss is cross-entropy plus router_aux_loss_coef times
    the load-balancing loss, which metrics.jsonl logs as ``aux_loss``; LoRA on attention and experts trains."""
    import _sft_fixtures
    from typer.testing import CliRunner

    from _sft_fixtures import build_model_folder, reverse_rows, write_config, write_jsonl
    from ftprog.programs.cli import app

    monkeypatch.setitem(_sft_fixtures.FAMILIES, "mixtral", ("MixtralConfig", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.5}))
    model = build_model_folder(tmp_path / "model", family="mixtral")
    data = write_jsonl(tmp_path / "train.jsonl", reverse_rows(24))
    cfg = write_config(tmp_path / "sft.toml", model, data, tmp_path / "out")
    overrides = ["peft.method=lora", 'peft.targets=["q_proj", "experts"]', "max_steps=3", "grad_accum=2",
                 "optimizer.lr=1e-2", "log.every=1"]
    run = CliRunner().invoke(app, ["run", "sft", "--config", str(cfg), *overrides])
    assert run.exit_code == 0, run.output
    records = [r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    assert len(records) == 3
    # the balancing loss is num_experts * sum f_e P_e: 1 when perfectly balanced, at most num_experts
    assert all(1.0 <= r["aux_loss"] <= 4.0 for r in records)
