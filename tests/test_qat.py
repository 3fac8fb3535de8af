"""Quantization-aware training: ``qat`` fake-quantizes exactly as torchao does, ``convert_qat`` and
``ft-prog run quantize`` turn the trained model into the torchao model it trained for, QAT + LoRA trains the
adapters only, the order table, and ``ft-prog run sft ... qat.scheme=...`` end to end.
"""

from __future__ import annotations

import json

import pytest
import torch

# config, model_dir, one_thread (autouse), train_file: pytest fixtures shared with the sft test files
from _sft_fixtures import config, model_dir, one_thread, train_file  # noqa: F401
from ftprog.core import ConfigError, flatten, from_config, is_quantized, linear, load_pretrained, value_and_grad
from ftprog.core import token_loss_sum
from ftprog.core._tree import get
from ftprog.programs import sft
from ftprog.programs.cli import CONFIG_DIR
from ftprog.programs.config import from_dict, load_config
from ftprog.programs.quantize import CONFIG as QUANTIZE_CONFIG, run as run_quantize
from ftprog.transforms import (
    QAT_SCHEMES, checkpoint, compile, convert_qat, has_adapters, load_adapter, load_quantized, lora, merge, qat,
    qat_spec, quantize, save_quantized, trainable, without_qat,
)
from ftprog.transforms._quantize import torchao_config

CONFIG = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
NODE = "model.layers.0.mlp.down_proj"  # [64, 128]: 4 groups of 32 per row


def tiny(dtype=torch.float32):
    return trainable(from_config(CONFIG, seed=0, dtype=dtype))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    return tokens, targets


def mean_loss(model, tokens, targets):
    return token_loss_sum(model, tokens, targets) / (targets != -100).sum()


def torchao_fake_quantized_linear(weight, scheme, group_size):
    """torchao's own QAT linear (``QATConfig(base_config, step="prepare")``) holding ``weight``."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    holder = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype))
    holder[0].weight = torch.nn.Parameter(weight.detach().clone())
    quantize_(holder, QATConfig(torchao_config(scheme, group_size), step="prepare"))
    assert type(holder[0]).__name__ == "FakeQuantizedLinear"
    return holder[0]


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("group_size", [32, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", QAT_SCHEMES)
def test_fake_quantized_linear_equals_torchaos_and_its_gradients(scheme, dtype, group_size):
    """Forward, weight gradient and input gradient are bit-identical to torchao's FakeQuantizedLinear."""
    model = qat(tiny(dtype), scheme, group_size=group_size)
    node = get(model.params, NODE)
    weight = node["weight"].detach().clone().requires_grad_()
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    ours = linear(x, {**node, "weight": weight})
    ref_linear = torchao_fake_quantized_linear(weight, scheme, group_size)
    x_ref = x.detach().clone().requires_grad_()
    ref = ref_linear(x_ref)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, torch.nn.functional.linear(x, weight))  # it does quantize
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    ours.backward(g)
    ref.backward(g)
    assert torch.equal(weight.grad, ref_linear.weight.grad)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("scheme", QAT_SCHEMES)
def test_gradients_flow_straight_through(scheme):
    """torchao's straight-through estimator: rounding passes the gradient unchanged, so every weight but each
    group's largest-magnitude one gets exactly the float linear's gradient (on the input as the linear sees it);
    the group maxima also get the gradient through the scale they set."""
    from ftprog.transforms._qat import fake_quantize_input

    node = get(qat(tiny(), scheme).params, NODE)
    w = node["weight"].detach().clone().requires_grad_()
    w_float = w.detach().clone().requires_grad_()
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    g = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    linear(x, {**node, "weight": w}).backward(g)
    torch.nn.functional.linear(fake_quantize_input(x, node["qat"]), w_float).backward(g)
    groups = w.detach().abs().view(64, 4, 32)
    group_max = (groups == groups.amax(-1, keepdim=True)).view(64, 128)
    gap = (w.grad - w_float.grad).abs()
    assert gap[~group_max].max() <= 1e-5 * w_float.grad.abs().max()
    assert gap[group_max].max() > 1e-3  # the scale's share


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", QAT_SCHEMES)
def test_converted_model_equals_the_fake_quantized_model(scheme, dtype):
    """convert_qat (torchao's real quantization) computes what QAT trained: measured 0.0 apart in fp32 and bf16."""
    fake = qat(tiny(dtype), scheme)
    real = convert_qat(fake)
    tokens, _ = batch()
    with torch.no_grad():
        got, want, plain = real(tokens), fake(tokens), tiny(dtype)(tokens)
    assert all(is_quantized(flatten(real.params)[f"{p}.weight"]) for p in [NODE])
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (plain - want).abs().max().item() > 1e-3  # and the fake quantization is not a no-op


@pytest.mark.parametrize("scheme", QAT_SCHEMES)
def test_converted_model_saves_and_loads_bit_identically(scheme, tmp_path):
    real = convert_qat(qat(tiny(), scheme, group_size=16))
    loaded = load_quantized(save_quantized(real, tmp_path / "q"))
    header = json.loads((tmp_path / "q" / "ft-prog-quantization.json").read_text())
    assert header["group_size"] == 16
    tokens, _ = batch()
    with torch.no_grad():
        assert torch.equal(real(tokens), loaded(tokens))


# ------------------------------------------------------------------------------------------ training


def sgd_steps(model, steps=8, lr=0.05):
    tokens, targets = batch()
    grad_fn = value_and_grad(mean_loss)
    losses = []
    for _ in range(steps):
        loss, grads = grad_fn(model, tokens, targets)
        losses.append(loss.item())
        model = model.with_params({p: t - lr * grads[p] for p, t in model.trainable_params().items()})
    return model, losses, grads


def test_qat_lora_trains_the_adapters_over_the_fake_quantized_base():
    base = qat(tiny(), "int8-dynamic-act-int4-weight")
    model = lora(base, rank=4, alpha=8, targets="all-linear")
    assert has_adapters(model) and not has_adapters(base)
    assert all(".lora_" in p for p in model.trainable)
    tokens, _ = batch()
    with torch.no_grad():  # B = 0: exactly the fake-quantized base
        assert torch.equal(model(tokens), base(tokens))
    trained, losses, grads = sgd_steps(model, lr=0.5)
    assert losses[-1] < losses[0] - 0.05, losses
    assert set(grads) == set(model.trainable)
    before, after = flatten(model.params), flatten(trained.params)
    assert all(after[p] is before[p] for p in before if p not in model.trainable)  # the base is untouched
    assert any(not torch.equal(after[p], before[p]) for p in model.trainable)
    # Converted: torchao's int8-dynamic-act-int4 base under the same float adapter computes the same
    real = convert_qat(trained)
    assert has_adapters(real) and is_quantized(flatten(real.params)[f"{NODE}.weight"])
    with torch.no_grad():
        got, want = real(tokens), trained(tokens)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_full_qat_trains_the_float_weights():
    model = qat(tiny(), "int4-weight")
    trained, losses, grads = sgd_steps(model, lr=0.1)
    assert losses[-1] < losses[0] - 0.05, losses
    assert f"{NODE}.weight" in grads and torch.isfinite(grads[f"{NODE}.weight"]).all()
    assert qat_spec(trained) == qat_spec(model)


@pytest.mark.parametrize("stack", ["checkpoint", "checkpoint+compile"])
def test_qat_composes_with_checkpoint_and_compile(stack):
    eager = lora(qat(tiny(), "int8-dynamic-act-int4-weight"), rank=4, alpha=8, targets="all-linear")
    eager = eager.with_params({p: t + 0.1 for p, t in eager.trainable_params().items() if ".lora_B." in p})
    model = eager
    for name in stack.split("+"):
        model = checkpoint(model) if name == "checkpoint" else compile(model, backend="aot_eager")
    tokens, targets = batch()
    ref_loss, ref_grads = value_and_grad(mean_loss)(eager, tokens, targets)
    loss, grads = value_and_grad(mean_loss)(model, tokens, targets)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for p, g in grads.items():
        assert (g - ref_grads[p]).norm() <= 1e-5 * ref_grads[p].norm(), p


# ------------------------------------------------------------------------------------------ refusals


def test_order_and_misuse_are_errors_naming_the_fix():
    model = tiny()
    with pytest.raises(ValueError, match="qat after lora: apply qat before lora"):
        qat(lora(model, rank=2, alpha=2), "int4-weight")
    with pytest.raises(ValueError, match="qat after compile: apply compile last"):
        qat(compile(model, backend="eager"), "int4-weight")
    checkpoint_first = qat(checkpoint(model), "int4-weight")  # checkpoint commutes with the tree transforms
    assert checkpoint_first.transforms == ("checkpoint", "qat")
    with pytest.raises(ValueError, match="convert_qat"):
        quantize(qat(model, "int4-weight"), "int4-weight")
    with pytest.raises(ValueError, match="already fake-quantized"):
        qat(qat(model, "int4-weight"), "int4-weight")
    with pytest.raises(ValueError, match="is quantized"):
        qat(quantize(model, "int8"), "int8-weight")
    with pytest.raises(ValueError, match="unknown scheme 'int3'.*int4-weight"):
        qat(model, "int3")
    with pytest.raises(ValueError, match=r"cannot fake-quantize 'model.layers.0.self_attn.q_proj'.*group_size = 48"):
        qat(model, "int4-weight", group_size=48)
    with pytest.warns(UserWarning, match="stay float"):
        partial = qat(model, "int4-weight", group_size=128, skip_unsupported=True)  # in 64 / 128: q, k, v, o, ...
    assert [p for p in flatten(partial.params) if p.endswith(".qat")] == [
        f"model.layers.{i}.mlp.down_proj.qat" for i in range(2)]
    with pytest.raises(ValueError, match="DoRA over a fake-quantized base"):
        lora(qat(model, "int4-weight"), rank=2, alpha=2, dora=True)
    with pytest.raises(ValueError, match="no fake-quantized linears"):
        convert_qat(model)


def test_without_qat_and_merge_give_plain_models():
    model = lora(qat(tiny(), "int4-weight"), rank=2, alpha=2, targets=["q_proj"])
    assert "qat" not in without_qat(model).transforms and qat_spec(without_qat(model)) is None
    merged = merge(model)
    assert qat_spec(merged) is None and "qat" not in merged.transforms
    assert not [p for p in flatten(merged.params) if not isinstance(flatten(merged.params)[p], torch.Tensor)]


# ------------------------------------------------------------------------------------------ the programs


def run_sft(config_file, *overrides):
    cfg, resolved = load_config(sft.CONFIG, config_file, list(overrides), builtin_dir=CONFIG_DIR / "sft")
    return sft.run(cfg, resolved)


def quantize_program(model_path, out, **settings):
    cfg = from_dict(QUANTIZE_CONFIG, {"model": {"path": str(model_path)}, "dtype": "fp32", "output_dir": str(out),
                                      **settings}, source="test")
    return run_quantize(cfg, {})


def test_sft_with_qat_saves_float_weights_that_run_quantize_converts_exactly(config, tmp_path):  # noqa: F811
    final = run_sft(config, "qat.scheme=int8-dynamic-act-int4-weight", "max_steps=4", "log.plot=false")
    record = json.loads((final / "ft-prog-qat.json").read_text())
    assert record["scheme"] == "int8-dynamic-act-int4-weight" and record["group_size"] == 32
    assert len(record["linears"]) == 14
    trained = load_pretrained(final)  # a plain HF folder: float weights
    assert not any(is_quantized(t) for t in flatten(trained.params).values())
    quantize_program(final, tmp_path / "q", scheme="int8-dynamic-act-int4-weight")
    converted = load_quantized(tmp_path / "q")
    tokens = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = converted(tokens), qat(trained, "int8-dynamic-act-int4-weight")(tokens)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    with pytest.raises(ConfigError, match=r"ft-prog-qat.json: this model was trained \(qat\) for "
                                          r"scheme=int8-dynamic-act-int4-weight group_size=32"):
        quantize_program(final, tmp_path / "q2", scheme="int4-weight")


def test_sft_with_qat_and_lora_saves_the_adapter_and_the_record(config, model_dir, tmp_path):  # noqa: F811
    final = run_sft(config, "qat.scheme=int4-weight", "qat.group_size=64", "peft.method=lora",
                    "optimizer.lr=1e-2", "max_steps=3", "log.plot=false")
    assert json.loads((final / "ft-prog-qat.json").read_text())["group_size"] == 64
    adapted = load_adapter(qat(load_pretrained(model_dir), "int4-weight", group_size=64), final)
    assert qat_spec(adapted).group_size == 64 and has_adapters(adapted)
    with pytest.raises(ConfigError, match="qat.scheme='int4-weight' needs peft.method none or lora"):
        run_sft(config, "qat.scheme=int4-weight", "peft.method=qlora", "max_steps=1", f"output_dir={tmp_path / 'q'}")
