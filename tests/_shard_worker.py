"""Run under torchrun by tests/test_shard.py: sharded vs unsharded loss, grads and an optimizer step, or
compiled sharded vs eager sharded loss and grads."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ftprog.core import from_config, optim, preset, token_loss_sum, value_and_grad
from ftprog.transforms import checkpoint, compile, lora, quantize, shard, trainable

method, out = sys.argv[1], sys.argv[2]  # full, lora, qlora, compile-<backend> (LoRA, checkpointed), or moe
compiled, backend = method.startswith("compile-"), method.removeprefix("compile-")
method = "lora" if compiled else method
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def mixture_of_experts() -> dict[str, torch.Tensor]:
    """A tiny Mixtral (4 experts, top-2), fully trained and with LoRA on attention and experts: loss and gradients of
    shard(model) on this rank's row (summed over ranks) against the model on both rows; ``unused``: how many
    (layer, expert) pairs got no token on this rank (their gathered weights get no gradient from its tokens)."""
    base = from_config({**preset("tiny"), "model_type": "mixtral", "intermediate_size": 64, "vocab_size": 128,
                        "num_local_experts": 4, "num_experts_per_tok": 2}, seed=0)
    tokens = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100

    def loss_fn(m, t, y):
        return token_loss_sum(m, t, y) / int((targets != -100).sum())

    mine = slice(rank, rank + 1)
    _, router_logits = base(tokens[mine], return_router_logits=True)
    chosen = [set(torch.topk(r, 2, dim=-1).indices.flatten().tolist()) for r in router_logits]
    result = {"unused": torch.tensor([sum(4 - len(c) for c in chosen)])}
    for name, model in (("full", trainable(base)),
                        ("lora", lora(base, rank=2, alpha=4, targets=("q_proj", "experts")))):
        model = model.with_params({p: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
                                   for p, t in model.trainable_params().items()})
        ref_loss, ref_grads = value_and_grad(loss_fn)(model, tokens, targets)
        loss, grads = value_and_grad(loss_fn)(shard(model), tokens[mine], targets[mine])
        dist.all_reduce(loss)
        result[f"{name}.loss"], result[f"{name}.ref_loss"] = loss.reshape(1), ref_loss.reshape(1)
        for p, t in grads.items():
            result[f"{name}.grad.{p}"], result[f"{name}.ref_grad.{p}"] = t.full_tensor(), ref_grads[p]
    return result


if method == "moe":
    result = mixture_of_experts()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in result.items()}, out)
    dist.destroy_process_group()
    sys.exit()
config = {**preset("tiny"), "hidden_size": 128, "intermediate_size": 256, "vocab_size": 256}
base = from_config(config, seed=0)
if method == "qlora":
    base = quantize(base, "nf4", skip_unsupported=True)
model = trainable(base) if method == "full" else lora(base, rank=4, alpha=8, targets="all-linear")
model = model.with_params({p: t + 0.02 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
                           for p, t in model.trainable_params().items()})
model = checkpoint(model) if method == "lora" else model
g = torch.Generator().manual_seed(5)
tokens = torch.randint(0, 256, (4, 16), generator=g)
targets = torch.roll(tokens, -1, 1)
targets[:, -1] = -100
total = int((targets != -100).sum())


def loss_fn(m, t, y):
    return token_loss_sum(m, t, y) / total


mine = slice(rank * 2, rank * 2 + 2)
if compiled:  # compile(shard(model)) against shard(model), both on this rank's half of the batch
    sharded = shard(model)
    ref_loss, ref_grads = value_and_grad(loss_fn)(sharded, tokens[mine], targets[mine])
    loss, grads = value_and_grad(loss_fn)(compile(sharded, backend=backend), tokens[mine], targets[mine])
    result = {"loss": loss.reshape(1), "ref_loss": ref_loss.reshape(1)}
    for p, t in grads.items():
        assert type(t).__name__ == "DTensor", p
        result[f"grad.{p}"], result[f"ref_grad.{p}"] = t.full_tensor(), ref_grads[p].full_tensor()
    # a checkpointed model sharded with reshard_after_forward=False (checkpoint() recomputes the gathers) compiles too
    kept = shard(model, reshard_after_forward=False)
    kept_loss, kept_grads = value_and_grad(loss_fn)(compile(kept, backend=backend), tokens[mine], targets[mine])
    result["kept_loss"] = kept_loss.reshape(1)
    for p, t in kept_grads.items():
        result[f"kept_grad.{p}"] = t.full_tensor()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in result.items()}, out)
    dist.destroy_process_group()
    sys.exit()

# reference: the whole batch on one process
ref_loss, ref_grads = value_and_grad(loss_fn)(model, tokens, targets)
sharded = shard(model)
loss, grads = value_and_grad(loss_fn)(sharded, tokens[mine], targets[mine])
dist.all_reduce(loss)
opt = optim.adamw(1e-2)
clipped, norm = optim.clip_by_global_norm(grads, 0.1)
ref_clipped, ref_norm = optim.clip_by_global_norm(ref_grads, 0.1)
state, ref_state = opt.init(sharded.trainable_params()), opt.init(model.trainable_params())
params, ref_params = sharded.trainable_params(), model.trainable_params()
for _ in range(3):  # several steps, so the moments matter
    params, state = opt.update(clipped, state, params)
    ref_params, ref_state = opt.update(ref_clipped, ref_state, ref_params)
buffers = [*params.values(), *state.exp_avg.values(), *state.exp_avg_sq.values()]
local_bytes = sum(t.to_local().numel() * t.element_size() for t in buffers)
full_bytes = sum(t.numel() * t.element_size() for t in [*ref_params.values(), *ref_state.exp_avg.values(),
                                                          *ref_state.exp_avg_sq.values()])
result = {
    "loss": loss.reshape(1), "ref_loss": ref_loss.reshape(1), "norm": norm.full_tensor().reshape(1)
    if hasattr(norm, "full_tensor") else norm.reshape(1), "ref_norm": ref_norm.reshape(1),
    "bytes": torch.tensor([local_bytes, full_bytes]),
}
for p, t in grads.items():
    result[f"grad.{p}"] = t.full_tensor()
    result[f"ref_grad.{p}"] = ref_grads[p]
for p, t in params.items():
    result[f"param.{p}"] = t.full_tensor()
    result[f"ref_param.{p}"] = ref_params[p]
if rank == 0:
    save_file({k: v.contiguous() for k, v in result.items()}, out)
dist.destroy_process_group()
