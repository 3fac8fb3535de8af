"""The training programs' shared step pieces (programs/training.py): micro-batch accumulation, the data config, the
metrics line, and the router load-balancing loss that every program adds for a mixture of experts."""

from __future__ import annotations

import json

import pytest
import torch

import _sft_fixtures
from _sft_fixtures import build_model_folder, config, model_dir, one_thread, train_file  # noqa: F401
from ftprog.core import load_pretrained, router_aux_loss, token_loss_sum
from ftprog.programs import training
from ftprog.programs.cli import CONFIG_DIR
from ftprog.programs.config import load_config
from ftprog.programs.sft_config import SFTConfig
from test_distill import distill_config, teacher_dir  # noqa: F401
from test_dpo import dpo_config, pairs_file  # noqa: F401
from test_grpo import grpo_config  # noqa: F401

MIXTRAL = ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.5})


@pytest.fixture
def moe_dir(tmp_path, monkeypatch):
    """A tiny Mixtral (4 experts, top-2, coefficient 0.5) with the fixtures' tokenizer."""
    monkeypatch.setitem(_sft_fixtures.FAMILIES, "mixtral", MIXTRAL)
    return build_model_folder(tmp_path / "moe", family="mixtral")


def test_accumulate_sums_losses_metrics_and_gradients():
    w = torch.tensor([1.0, 2.0])

    def micro_step(x):
        loss = (w * x).sum()
        return (loss, {"seen": torch.tensor(1.0), "x": x.sum().to(torch.bfloat16)}), {"w": x}

    loss, sums, grads = training.accumulate(micro_step, [torch.tensor([1.0, 0.0]), torch.tensor([0.5, 3.0])])
    assert loss.item() == 1.0 + 6.5
    assert sums == {"seen": 2.0, "x": 4.5} and sums["x"].dtype == torch.float32
    assert torch.equal(grads["w"], torch.tensor([1.5, 3.0]))


def test_data_config_takes_the_sections_keys(tmp_path):
    cfg, _ = load_config(SFTConfig, "demo", ["data.system_prompt=", "data.val_path=", "seq_len=77", "seed=5",
                                             'data.columns={instruction = "q"}'], builtin_dir=CONFIG_DIR / "sft")
    data = training.data_config(cfg)
    assert data.seq_len == 77 and data.seed == 5 and data.columns == {"instruction": "q"}
    assert data.system_prompt is None and data.val_path is None  # empty keys mean unset
    assert data.format == cfg.data.format and data.train_on_input == cfg.data.train_on_input
    assert not data.path.startswith("builtin:")  # resolved to the asset's file


def test_step_record_puts_the_programs_metrics_after_the_loss():
    record = training.step_record(3, torch.tensor(1.5), 1e-3, torch.tensor(0.25), {"tokens": 40}, 12.345, 0,
                                  kd_loss=0.5)
    assert list(record) == ["step", "loss", "kd_loss", "lr", "tokens", "tokens_per_s", "grad_norm", "epoch"]
    assert record["tokens_per_s"] == 12.3 and record["grad_norm"] == 0.25


def test_with_router_loss_adds_the_weighted_balancing_loss(moe_dir, model_dir):  # noqa: F811
    model = load_pretrained(moe_dir)
    tokens = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # left padding: out of the balancing loss
    targets = tokens.masked_fill(mask == 0, -100)

    def loss_fn(m):
        return token_loss_sum(m, tokens, targets, attention_mask=mask), {"n": torch.tensor(3.0)}

    loss, metrics = training.with_router_loss(loss_fn, model, mask, 0.25)
    sink: list = []
    plain = token_loss_sum(model.with_router_logits(sink), tokens, targets, attention_mask=mask)
    aux = router_aux_loss(sink, model.config, mask)
    assert torch.allclose(loss, plain + 0.25 * aux, rtol=1e-6) and metrics["aux_loss"] == aux
    assert metrics["n"] == 3.0 and not metrics["aux_loss"].requires_grad
    assert training.router_share(model, 2, 2) == 0.5 / 4

    dense = load_pretrained(model_dir)
    assert training.with_router_loss(loss_fn, dense, mask, 0.25)[1].keys() == {"n"}
    assert training.router_share(dense, 2, 2) == 0.0
    sums = {"aux_loss": torch.tensor(6.0), "n": torch.tensor(1.0)}
    assert training.router_metric(sums, 3, 1) == {"aux_loss": 2.0} and list(sums) == ["n"]
    assert training.router_metric(sums, 3, 1) == {}


@pytest.mark.parametrize("program", ["dpo", "grpo", "distill"])
def test_every_program_trains_a_mixture_of_experts_with_its_router_loss(program, moe_dir, request, tmp_path):
    """dpo, grpo and distill add the router loss as sft does, and log it as ``aux_loss`` each step."""
    import importlib

    module = importlib.import_module(f"ftprog.programs.{program}")
    config_file = request.getfixturevalue(f"{program}_config")
    overrides = [f"model.path={moe_dir}", "max_steps=2", "log.every=1", "log.plot=false", "eval_every=0",
                 'peft.targets=["q_proj", "experts"]']
    cfg, resolved = load_config(module.CONFIG, config_file, overrides, builtin_dir=CONFIG_DIR / program)
    module.run(cfg, resolved)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    # num_experts * sum_e f_e P_e: 1 when perfectly balanced, at most num_experts
    assert all(1.0 <= r["aux_loss"] <= 4.0 for r in steps), steps


# --------------------------------------------------------------------------- optimizer in the backward


def _in_backward_cfg(in_backward: bool) -> SFTConfig:
    from ftprog.programs.sft_config import OptimizerSection

    return SFTConfig(optimizer=OptimizerSection(in_backward=in_backward, max_grad_norm=0.0, weight_decay=0.1))


def test_train_step_in_backward_equals_the_normal_step(tmp_path):
    """train_step with optimizer.in_backward gives the params, optimizer state, loss, metrics and gradient norm of
    its accumulate + apply_gradients path (fp32, no clipping); a leaf the loss does not reach still gets the
    zero-gradient update (weight decay) value_and_grad's zeros give it."""
    from ftprog.core import from_config, optim
    from ftprog.transforms import trainable

    model = trainable(from_config("tiny", seed=0))
    unreached = "model.layers.1.mlp.down_proj.weight"
    assert unreached in model.trainable_params()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 16), generator=g) for _ in range(2)]

    def loss_fn(m, tokens):
        m = m.with_params({unreached: m.trainable_params()[unreached].detach()})  # no gradient reaches it
        loss = token_loss_sum(m, tokens[:, :-1], tokens[:, 1:]) / tokens[:, 1:].numel()
        return loss, {"rows": torch.tensor(float(len(tokens)))}

    opt = optim.adamw(optim.schedule_by_name("constant", 1e-2, 2, 0), weight_decay=0.1)
    runs = {}
    for in_backward in (False, True):
        m = model.with_params({k: v.clone() for k, v in model.trainable_params().items()})
        state, seen = opt.init(m.trainable_params()), []
        for step, tokens in enumerate(batches):
            loss, sums, m, state, norm, lr = training.train_step(loss_fn, lambda b: (b,), [tokens], m, opt, state,
                                                                 _in_backward_cfg(in_backward), step, tmp_path)
            seen.append((loss, sums, norm, lr))
        runs[in_backward] = m, state, seen
    (plain, plain_state, plain_seen), (eager, eager_state, eager_seen) = runs[False], runs[True]
    for (loss, sums, norm, lr), (loss2, sums2, norm2, lr2) in zip(plain_seen, eager_seen):
        assert torch.equal(loss, loss2) and sums == sums2 == {"rows": 2.0} and lr == lr2
        torch.testing.assert_close(norm2, norm, rtol=1e-6, atol=0)
    for path, t in plain.trainable_params().items():
        assert torch.equal(eager.trainable_params()[path], t), path
    assert not torch.equal(plain.trainable_params()[unreached], model.trainable_params()[unreached])  # decayed
    plain_flat, eager_flat = optim.state_dict(plain_state), optim.state_dict(eager_state)
    assert plain_flat.keys() == eager_flat.keys() and all(torch.equal(plain_flat[k], eager_flat[k])
                                                          for k in plain_flat)


@pytest.mark.parametrize("program", ["sft", "dpo", "grpo", "distill"])
@pytest.mark.parametrize("overrides, message", [
    (["grad_accum=2", "optimizer.max_grad_norm=0"], "grad_accum=2: a step would run 2 backwards"),
    (["optimizer.max_grad_norm=1.0"], "optimizer.max_grad_norm=1.0: clipping to a global norm needs every gradient"),
], ids=["grad_accum", "clipping"])
def test_every_program_refuses_in_backward_where_a_step_is_not_one_unclipped_backward(
        program, overrides, message, request, monkeypatch, tmp_path):
    """optimizer.in_backward with grad_accum > 1 (grpo: the rollout split into several backwards) or clipping: one
    ConfigError naming the key and why, before any weights load."""
    import importlib

    from ftprog.core import ConfigError

    def refuse(*args, **kwargs):
        raise AssertionError("load_pretrained called before the optimizer settings were checked")

    monkeypatch.setattr(training, "load_pretrained", refuse)
    module = importlib.import_module(f"ftprog.programs.{program}")
    config_file = request.getfixturevalue("config" if program == "sft" else f"{program}_config")
    cfg, resolved = load_config(module.CONFIG, config_file, ["optimizer.in_backward=true", *overrides],
                                builtin_dir=CONFIG_DIR / program)
    with pytest.raises(ConfigError, match=message) as e:
        module.run(cfg, resolved)
    assert e.value.key == "optimizer.in_backward"
