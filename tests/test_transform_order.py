"""The order table: every stack it allows runs and equals the eager stack; every order it refuses names both.

Tree transforms (quantize, lora) decide the loss and gradients; runtime transforms (checkpoint, shard,
compile) must not change them. Sharding runs on a one-process gloo group here (the 2-process equality is
tests/test_shard.py's).
"""

import itertools

import pytest
import torch

from ftprog.core import from_config, is_dtensor, token_loss_sum, value_and_grad
from ftprog.transforms import (
    ORDER, cast, check_order, checkpoint, compile, lora, merge, quantize, shard, trainable, unshard,
)

CONFIG = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
TREE = {"quantize": lambda m: quantize(m, "int8"),
        "cast": lambda m: cast(m, torch.bfloat16),
        "lora": lambda m: lora(m, rank=4, alpha=8, targets="all-linear", dropout=0.1)}
RUNTIME = {"checkpoint": checkpoint, "shard": shard, "compile": lambda m: compile(m, backend="aot_eager"),
           "shard(keep-gathered)": lambda m: shard(m, reshard_after_forward=False)}
APPLY = {**TREE, **RUNTIME}


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def base_model():
    model = from_config(CONFIG, seed=0)
    g = torch.Generator().manual_seed(1)
    return model.with_params({p: t + 0.05 * torch.randn(t.shape, generator=g) for p, t in
                              model.trainable_params().items() if p.endswith("norm.weight")})


def build(names):
    model = base_model()
    for name in names:
        model = APPLY[name](model)
    if "lora" not in names:  # full fine-tuning of what is not quantized
        from ftprog.core import flatten, is_plain

        model = trainable(model, [p for p, t in flatten(model.params).items() if is_plain(t) or is_dtensor(t)])
    if "lora" in names:  # B = 0 would make most gradients zero
        model = model.with_params({p: t + 0.1 for p, t in model.trainable_params().items() if ".lora_B." in p})
    return model


def loss_and_grads(model):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100

    def loss_fn(m):
        return token_loss_sum(m, tokens, targets) / (targets != -100).sum()

    torch.manual_seed(3)  # the same dropout masks in every stack
    loss, grads = value_and_grad(loss_fn)(model)
    return loss, {p: t.full_tensor() if is_dtensor(t) else t for p, t in grads.items()}


def allowed_stacks():
    """Every subset of the table's transforms in table order (cast aside), plus the orders COMMUTES adds."""
    canonical = [n for names in ORDER for n in names if n in APPLY and n != "cast"]
    stacks = [subset for size in range(1, len(canonical) + 1) for subset in itertools.combinations(canonical, size)]
    return stacks + [
        ("cast",), ("cast", "quantize", "lora", "checkpoint", "shard", "compile"), ("lora", "cast", "compile"),
        ("lora", "checkpoint", "cast"), ("checkpoint", "quantize", "lora"), ("checkpoint", "lora", "shard"),
        ("lora", "checkpoint", "shard(keep-gathered)", "compile"), ("lora", "shard(keep-gathered)", "compile"),
    ]


@pytest.mark.parametrize("names", allowed_stacks(), ids="+".join)
def test_allowed_stack_runs_and_equals_its_eager_tree(names, process_group):
    model = build(names)
    assert model.transforms == tuple(n.removesuffix("(keep-gathered)") for n in names)
    reference = build([n for n in names if n in TREE])
    ref_loss, ref_grads = loss_and_grads(reference)
    loss, grads = loss_and_grads(model)
    assert grads.keys() == ref_grads.keys() and grads
    tol = 1e-5 if "cast" not in names else 3e-2  # bf16: compiled kernels round differently
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    for path, g in grads.items():
        assert (g - ref_grads[path]).norm() <= tol * ref_grads[path].norm().clamp(min=1e-12), path
    if "shard" in names:
        plain = unshard(model)
        assert "shard" not in plain.transforms and not any(is_dtensor(t) for t in plain.trainable_params().values())
        with torch.no_grad():
            assert torch.allclose(plain(torch.arange(8)[None]), reference(torch.arange(8)[None]), atol=1e-6)


REFUSED = [("quantize", "cast"), ("lora", "quantize"), ("checkpoint", "checkpoint"), ("shard", "lora"),
           ("shard", "checkpoint"), ("compile", "shard"), ("compile", "quantize"), ("shard", "cast"),
           ("compile", "merge")]


@pytest.mark.parametrize("first,second", REFUSED, ids="-then-".join)
def test_refused_order_names_both_transforms_and_the_order(first, second, process_group):
    model = APPLY[first](base_model()) if first != "lora" else lora(base_model(), rank=2, alpha=2)
    then = {**APPLY, "merge": merge}[second]
    with pytest.raises(ValueError, match=rf"{second}.*{first}|already") as error:
        then(model)
    if "already" not in str(error.value):
        assert f"{second} after {first}" in str(error.value) and "order: cast -> quantize/qat -> lora" in str(error.value)


def test_uncompile_gives_the_eager_model_back_for_merge_and_generation():
    from ftprog.transforms import uncompile

    adapted = lora(base_model(), rank=2, alpha=2)
    compiled = compile(checkpoint(adapted), backend="eager")
    with pytest.raises(ValueError, match="merge after compile"):
        merge(compiled)
    eager = uncompile(compiled)
    assert eager.transforms == ("lora", "checkpoint") and eager.forward is compiled.forward.inner
    assert uncompile(adapted) is adapted
    merged = merge(eager)
    with torch.no_grad():
        assert torch.allclose(merged(torch.arange(8)[None]), adapted(torch.arange(8)[None]), atol=1e-5)


def test_check_order_is_the_one_table():
    model = compile(base_model(), backend="eager")
    with pytest.raises(ValueError, match="lora after compile: apply compile last"):
        check_order(model, "lora")
    check_order(checkpoint(base_model()), "quantize")  # checkpoint commutes with the tree transforms
