"""sft's configuration surface, each setting checked by its effect: the logged learning rate against the schedule
computed here, the logged gradient norm and clipping against torch's ``clip_grad_norm_``, decoupled weight decay,
bf16 optimizer state, epochs, ``keep_last`` pruning, activation checkpointing, the TensorBoard sink and a really
compiled run.

Runs are in-process (``sft.run``) on the tiny offline model of tests/_sft_fixtures.py, a few steps each.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# config, model_dir, one_thread (autouse), train_file: pytest fixtures shared with the other sft test file
from _sft_fixtures import config, model_dir, one_thread, reverse_rows, train_file, write_config, write_jsonl  # noqa: F401
from ftprog.programs import run_state, sft, training
from ftprog.programs.cli import CONFIG_DIR
from ftprog.programs.config import load_config
from ftprog.programs.run_guard import RunError

QUIET = ["log.plot=false"]


def run_sft(config_file: Path, *overrides: str) -> Path:
    cfg, resolved = load_config(sft.CONFIG, config_file, [*QUIET, *overrides], builtin_dir=CONFIG_DIR / "sft")
    sft.run(cfg, resolved)
    return Path(cfg.output_dir)


def logged(out: Path) -> list[dict]:
    """The per-step training records of metrics.jsonl."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


# ----------------------------------------------------------------------------------------------- schedule


def expected_lr(schedule: str, lr: float, warmup: int, total: int, count: int) -> float:
    """The learning rate of the update after ``count`` updates: linear warmup from 0, then the decay."""
    if count < warmup:
        return lr * count / warmup
    done = (count - warmup) / (total - warmup)
    return lr * {"constant": 1.0, "linear": 1.0 - done, "cosine": 0.5 * (1.0 + math.cos(math.pi * done))}[schedule]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_logged_lr_follows_the_schedule(schedule, config):
    out = run_sft(config, "max_steps=7", "optimizer.lr=2e-3", "optimizer.warmup_steps=3",
                  f"optimizer.schedule={schedule}")
    records = logged(out)
    assert [r["step"] for r in records] == list(range(1, 8))
    expected = [expected_lr(schedule, 2e-3, 3, 7, step - 1) for step in range(1, 8)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=1e-18)


# ----------------------------------------------------------------------------------- gradient norm, clipping

SGD = ["max_steps=1", "optimizer.name=sgd", "optimizer.schedule=constant"]
ETA = 10.0  # SGD's step: large, so the gradient read back from the update is exact to many digits


def test_grad_norm_is_logged_and_clipping_scales_the_update(config, model_dir, tmp_path):
    """One SGD step recovers the gradient (w0 - w1) / lr: its norm is the logged grad_norm; with a max_grad_norm
    a quarter of it, the step is the one torch.nn.utils.clip_grad_norm_ makes of that gradient, and the logged
    norm is still the norm before clipping."""
    w0 = weights(model_dir)
    free = run_sft(config, *SGD, f"optimizer.lr={ETA}", "optimizer.max_grad_norm=0", f"output_dir={tmp_path / 'a'}")
    w1 = weights(free / "final")
    assert w1.keys() == w0.keys()
    grads = {k: (w0[k] - w1[k]) / ETA for k in w0}
    norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()])).item()
    [record] = logged(free)
    assert record["grad_norm"] == pytest.approx(norm, rel=2e-5)  # measured 6.2e-6 (fp32 sums of 1.3M squares)

    max_norm = norm / 4
    clipped = run_sft(config, *SGD, f"optimizer.lr={ETA}", f"optimizer.max_grad_norm={max_norm}",
                      f"output_dir={tmp_path / 'b'}")
    [after] = logged(clipped)
    assert after["grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-6)  # the norm before clipping
    params = {k: torch.nn.Parameter(w0[k].clone()) for k in w0}
    for k, p in params.items():
        p.grad = grads[k].clone()
    torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
    w2 = weights(clipped / "final")
    for k, p in params.items():
        expected = w0[k] - ETA * p.grad
        torch.testing.assert_close(w2[k], expected, rtol=0, atol=3e-7, msg=k)  # measured 1.2e-7
        assert (w2[k] - w0[k]).norm() < 0.3 * (w1[k] - w0[k]).norm() + 1e-12, k  # a quarter of the step


# ----------------------------------------------------------------------------------------------- weight decay


def test_weight_decay_is_decoupled(config, model_dir, tmp_path):
    """AdamW with weight_decay=wd ends one step at lr * wd * w0 below the same step without it."""
    w0 = weights(model_dir)
    common = ["max_steps=1", "optimizer.lr=1e-2", "optimizer.schedule=constant"]
    plain = weights(run_sft(config, *common, f"output_dir={tmp_path / 'a'}") / "final")
    decayed = weights(run_sft(config, *common, "optimizer.weight_decay=0.5", f"output_dir={tmp_path / 'b'}") / "final")
    for k in w0:
        torch.testing.assert_close(decayed[k] - plain[k], -1e-2 * 0.5 * w0[k], rtol=0, atol=2e-7,
                                   msg=k)  # measured 1.24e-7: one rounding of the weights (1.0) in each run


# -------------------------------------------------------------------------------- optimizer state, keep_last


@pytest.fixture(scope="module")
def state_runs(tmp_path_factory, model_dir, train_file):
    """Two runs of 4 steps saving every step with keep_last=2: optimizer state in bf16 and in fp32."""
    root = tmp_path_factory.mktemp("state")
    config = write_config(root / "sft.toml", model_dir, train_file, root / "out")
    common = ["max_steps=4", "save_every=1", "keep_last=2", "optimizer.lr=1e-3"]
    return {dtype: run_sft(config, *common, f"optimizer.state_dtype={dtype}", f"output_dir={root / dtype}")
            for dtype in ("bf16", "fp32")}


def test_keep_last_prunes_older_checkpoints(state_runs):
    for out in state_runs.values():
        assert [p.name for p in run_state.checkpoints(out)] == ["step_2", "step_3"]  # step 4 is final/
        assert (out / "final").is_dir()


def test_bf16_optimizer_state_is_bf16_and_trains(state_runs, model_dir):
    low = load_file(state_runs["bf16"] / "step_3" / "optimizer.safetensors")
    high = load_file(state_runs["fp32"] / "step_3" / "optimizer.safetensors")
    assert low.keys() == high.keys() and int(low["count"]) == 3
    moments = [k for k in low if k != "count"]
    assert moments and all(k.startswith(("exp_avg.", "exp_avg_sq.")) for k in moments)
    assert {low[k].dtype for k in moments} == {torch.bfloat16}
    assert {high[k].dtype for k in moments} == {torch.float32}
    for k in moments:  # the same moments, kept in bf16 (the runs drift apart a little from step 2 on)
        assert (low[k].float() - high[k]).norm() <= 3e-2 * high[k].norm(), k  # measured 1.8e-2
    losses = [r["loss"] for r in logged(state_runs["bf16"])]
    reference = [r["loss"] for r in logged(state_runs["fp32"])]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1
    assert losses == pytest.approx(reference, rel=5e-3)  # measured 1.2e-3
    assert losses[0] == reference[0] and losses[1:] != reference[1:]  # the updates used the bf16 moments


# ---------------------------------------------------------------------------------------------------- epochs


@pytest.mark.parametrize("epochs,grad_accum", [(2, 1), (3, 2)])
def test_epochs_set_the_number_of_steps(epochs, grad_accum, config, model_dir, tmp_path):
    """max_steps=0: ``epochs`` passes over the data, each sample once per epoch (padded batches of 4 of 10 rows:
    3 batches an epoch, the last one short); ``grad_accum`` batches make a step, the last step takes what is left."""
    from ftprog.core import DataConfig, load_datasets, load_tokenizer

    data = write_jsonl(tmp_path / "ten.jsonl", reverse_rows(10, seed=3))
    out = run_sft(config, f"data.path={data}", "max_steps=0", f"epochs={epochs}", f"grad_accum={grad_accum}",
                  "packing=false", "batch_size=4")
    batches = epochs * math.ceil(10 / 4)
    steps = math.ceil(batches / grad_accum)
    records = logged(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    assert [r["epoch"] for r in records] == [min(s * grad_accum, batches) // 3 for s in range(1, steps + 1)]
    # each epoch trains on every sample once: its tokens are the dataset's, at each epoch's end and in all
    epoch_tokens = load_datasets(DataConfig(path=str(data), format="instruct", seq_len=64),
                                 load_tokenizer(model_dir))[0].num_tokens
    tokens = {r["step"]: r["tokens"] for r in records}
    assert tokens[steps] == epochs * epoch_tokens
    if grad_accum == 1:
        assert [tokens[3 * k] for k in range(1, epochs + 1)] == [k * epoch_tokens for k in range(1, epochs + 1)]


# ------------------------------------------------------------------------------------ activation checkpointing


def test_activation_checkpointing_gives_the_same_losses(config, tmp_path, monkeypatch):
    """With LoRA dropout on, so the recomputed forward must redraw the same masks."""
    calls = []
    real = training.checkpoint
    monkeypatch.setattr(training, "checkpoint", lambda model: calls.append(1) or real(model))
    common = ["max_steps=4", "peft.method=lora", "peft.dropout=0.1", "optimizer.lr=1e-2"]
    plain = run_sft(config, *common, f"output_dir={tmp_path / 'a'}")
    assert calls == []
    checkpointed = run_sft(config, *common, "activation_checkpointing=true", f"output_dir={tmp_path / 'b'}")
    assert calls == [1]
    assert [r["loss"] for r in logged(checkpointed)] == [r["loss"] for r in logged(plain)]  # measured: equal
    a, b = weights(plain / "final"), weights(checkpointed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ TensorBoard


_WRITERS = []


class _RecordingWriter:
    """Stands for ``torch.utils.tensorboard.SummaryWriter``: records what the sink writes."""

    def __init__(self, logdir):
        self.logdir, self.scalars, self.closed = Path(logdir), [], False
        _WRITERS.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_sink_gets_every_logged_number(config, monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    _WRITERS.clear()
    out = run_sft(config, "max_steps=3", "log.tensorboard=true", "data.val_fraction=4", "eval_every=2")
    [writer] = _WRITERS
    assert writer.logdir == out / "tensorboard" and writer.closed
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [(k, v, r["step"]) for r in lines for k, v in r.items() if k != "step"]
    assert writer.scalars == expected
    assert {"loss", "lr", "grad_norm", "val_loss"} <= {tag for tag, _, _ in writer.scalars}


def test_tensorboard_without_the_package_is_a_clear_error(config, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without tensorboard
    with pytest.raises(RunError, match=r"log\.tensorboard=true needs the tensorboard package: pip install tensorboard"):
        run_sft(config, "max_steps=1", "log.tensorboard=true")


def test_tensorboard_events_file_reads_back(config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_sft(config, "max_steps=3", "log.tensorboard=true")
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    reader = EventAccumulator(str(events[0]))
    reader.Reload()
    assert {"loss", "lr", "grad_norm", "tokens"} <= set(reader.Tags()["scalars"])
    records = logged(out)
    assert [(e.step, e.value) for e in reader.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]  # stored as fp32


# ---------------------------------------------------------------------------------------------------- compile


@pytest.fixture(scope="module")
def one_layer_dir(model_dir, tmp_path_factory):
    """The fixture model cut to one small layer (hidden 64), same tokenizer: the least there is to compile."""
    import shutil

    import transformers

    from _sft_fixtures import MODEL

    folder = tmp_path_factory.mktemp("one-layer") / "model"
    shutil.copytree(model_dir, folder)
    for weights_file in folder.glob("*.safetensors"):
        weights_file.unlink()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.update({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    assert MODEL["vocab_size"] == config.vocab_size
    return folder


def test_compiled_run_trains_like_the_eager_one(config, one_layer_dir, tmp_path):
    """A real ``torch.compile`` (sft's default backend, inductor), two steps: the losses and weights of the eager run
    (SGD: the update is linear in the gradient, so rounding differences stay rounding-sized). The compile takes
    about 30 s on 2 shared cores even for one small layer."""
    from torch._dynamo.utils import counters

    common = [f"model.path={one_layer_dir}", "max_steps=2", "batch_size=2", "optimizer.name=sgd", "optimizer.lr=0.1"]
    eager = run_sft(config, *common, f"output_dir={tmp_path / 'eager'}")
    counters.clear()
    compiled = run_sft(config, *common, "compile=true", f"output_dir={tmp_path / 'compiled'}")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the forward
    assert [r["loss"] for r in logged(compiled)] == pytest.approx([r["loss"] for r in logged(eager)],
                                                                  rel=1e-6)  # measured 8e-8
    a, b = weights(eager / "final"), weights(compiled / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-8, msg=k)  # measured 7.5e-9
