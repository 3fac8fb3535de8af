"""The training programs' shared step pieces (programs/training.py): micro-batch accumulation, the data config, the
metrics line, and the router load-balancing loss that every program adds for a mixture of experts."""

from __future__ import annotations

import json

import pytest
import torch

import _sft_fixtures
from _sft_fixtures import build_model_folder, model_dir, one_thread, train_file  # noqa: F401
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
    config = request.getfixturevalue(f"{program}_config")
    overrides = [f"model.path={moe_dir}", "max_steps=2", "log.every=1", "log.plot=false", "eval_every=0",
                 'peft.targets=["q_proj", "experts"]']
    cfg, resolved = load_config(module.CONFIG, config, overrides, builtin_dir=CONFIG_DIR / program)
    module.run(cfg, resolved)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    # num_experts * sum_e f_e P_e: 1 when perfectly balanced, at most num_experts
    assert all(1.0 <= r["aux_loss"] <= 4.0 for r in steps), steps
