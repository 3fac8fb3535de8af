"""The memory planner against what autograd really keeps, and its arithmetic (sharding, verdict, configs)."""

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from ftprog.core import flatten, from_config, optim, token_loss_sum, value_and_grad
from ftprog.programs.plan import (
    NF4_BYTES_PER_PARAM, PlanError, Setup, activation_bytes, estimate, format_plan, layer_params, model_config,
    num_params, parse_memory, plan, projections,
)
from ftprog.transforms import checkpoint, lora, quantize, trainable

# hidden 128 / 4 heads of 32 / 2 KV heads: every projection but k/v holds a multiple of 64 * 256 elements.
CONFIG = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 512, "max_position_embeddings": 512}
NF4_CONFIG = {**CONFIG, "num_key_value_heads": 4}  # k/v too, for NF4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _leaves(t):
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    if hasattr(t, "__tensor_flatten__"):  # NF4: its inner tensors
        return [x for name in t.__tensor_flatten__()[0] for x in _leaves(getattr(t, name))]
    return []


def build(stack: str, dtype: str, config=CONFIG):
    model = from_config(config, dtype=DTYPES[dtype])
    method, *rest = stack.split("+")
    if method == "full":
        model = trainable(model)
    elif method == "qlora":
        model = lora(quantize(model, "nf4"), rank=8, alpha=16)
    else:
        targets = "all-linear" if "all" in rest else ("q_proj", "v_proj")
        model = lora(model, rank=8, alpha=16, targets=targets, dora=method == "dora",
                     dropout=0.1 if "dropout" in rest else 0.0)
    if "checkpoint" in rest:
        model = checkpoint(model)
    return model


def batch(config, packed: bool, b: int = 2, s: int = 32):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config["vocab_size"], (b, s), generator=g)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    kwargs = {"position_ids": torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).expand(b, s)} if packed else {}
    return tokens, targets, kwargs


def saved_tensor_bytes(model, tokens, targets, kwargs) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves during the forward (saved_tensors_hooks)."""
    live = {p: t.detach().requires_grad_(True) for p, t in model.trainable_params().items()}
    params = {x.untyped_storage().data_ptr() for v in [*flatten(model.params).values(), *live.values()]
              for x in _leaves(v)}
    seen: dict[int, int] = {}

    def pack(t):
        if type(t) not in (torch.Tensor, torch.nn.Parameter):  # a quantized (NF4) weight: a parameter
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model.with_params(live), tokens, targets, **kwargs)
    return sum(seen.values())


STACKS = ["full", "lora", "lora+all+dropout", "dora", "qlora", "full+checkpoint", "lora+checkpoint",
          "lora+all+checkpoint"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_activation_bytes_match_saved_tensors(stack, dtype, packed):
    config = NF4_CONFIG if stack.startswith("qlora") else CONFIG
    model = build(stack, dtype, config)
    tokens, targets, kwargs = batch(config, packed)
    measured = saved_tensor_bytes(model, tokens, targets, kwargs)
    method, *rest = stack.split("+")
    setup = Setup(method=method, dtype=dtype, batch_size=2, seq_len=32, rank=8,
                  targets=("all-linear",) if "all" in rest else ("q_proj", "v_proj"),
                  dropout=0.1 if "dropout" in rest else 0.0, checkpoint="checkpoint" in rest, mask=packed,
                  targets_fraction=31 / 32)
    predicted = activation_bytes(model_config(config), setup)["total"]
    assert predicted == pytest.approx(measured, rel=0.15), (predicted, measured)


def test_checkpointing_shrinks_activations_and_lora_keeps_less_than_full():
    shape = model_config("cpu-default")
    full = activation_bytes(shape, Setup(method="full", batch_size=4, seq_len=256))
    adapted = activation_bytes(shape, Setup(method="lora", batch_size=4, seq_len=256))
    ck = activation_bytes(shape, Setup(method="lora", batch_size=4, seq_len=256, checkpoint=True))
    assert ck["total"] < adapted["total"] < full["total"]
    assert ck["recompute"] == adapted["layer_max"] > 0
    double = activation_bytes(shape, Setup(method="lora", batch_size=8, seq_len=256))
    assert double["layers"] == 2 * adapted["layers"]


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive (created inside the mode, plus adopted ones) and their peak."""

    def __init__(self):
        super().__init__()
        self.sizes = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def adopt(self, tensors):
        for t in tensors:
            self._add(t)

    def _add(self, t):
        if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return
        storage = t.untyped_storage()
        if storage in self.sizes:
            return
        n = storage.nbytes()
        self.sizes[storage] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, n)

    def _free(self, n):
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        torch.utils._pytree.tree_map(self._add, out)
        return out


@pytest.mark.parametrize("stack,dtype", [("lora", "bf16"), ("full", "bf16"), ("lora+checkpoint", "fp32"), ("qlora", "bf16"),
                                         ("full", "fp32"), ("full+bf16state", "bf16")])
def test_step_peak_matches_live_tensors(stack, dtype):
    """The whole step (value_and_grad, clip, in-place AdamW), as programs/sft.py runs it."""
    config = {**CONFIG, "hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 4096, "num_hidden_layers": 4}
    model = build(stack, dtype, config)
    tracker = LiveBytes()
    tracker.adopt(x for v in flatten(model.params).values() for x in _leaves(v))
    tokens, targets, kwargs = batch(config, packed=True, b=4, s=128)
    n = int((targets != -100).sum())
    grad_fn = value_and_grad(lambda m: token_loss_sum(m, tokens, targets, **kwargs) / n)
    state_dtype = "bf16" if "bf16state" in stack else "fp32"
    opt = optim.adamw(1e-4, state_dtype=state_dtype)
    with tracker:
        state = opt.init(model.trainable_params())
        gc.collect()
        for _ in range(2):
            _, grads = grad_fn(model)
            grads, _ = optim.clip_by_global_norm(grads, 1.0, inplace=True)  # as sft does
            params, state = opt.update(grads, state, model.trainable_params(), inplace=True)
            model = model.with_params(params)
            del grads, params
    method, *rest = stack.split("+")
    p = estimate(config, method=method, dtype=dtype, batch_size=4, seq_len=128, checkpoint="checkpoint" in rest,
                 mask=True, targets_fraction=127 / 128, state_dtype=state_dtype)
    assert p.tensor_peak == pytest.approx(tracker.peak, rel=0.15), (p.peak_phase, p.phases, tracker.peak)


@pytest.mark.parametrize("config", [CONFIG, {**CONFIG, "tie_word_embeddings": True, "attention_bias": True,
                                              "model_type": "qwen2"}, "tiny"])
def test_parameter_counts_match_a_built_model(config):
    """The planner's counts come from the model's own parameter shapes: they match a model built from the config."""
    model = from_config(config)
    leaves = flatten(model.params)
    cfg = model_config(config)
    assert num_params(cfg) == model.num_params()
    linear, other = layer_params(cfg)
    layer0 = {k: v.numel() for k, v in leaves.items() if k.startswith("model.layers.0.")}
    assert linear == sum(n for k, n in layer0.items() if k.endswith("_proj.weight"))
    assert linear + other == sum(layer0.values())
    for name, (fan_in, fan_out) in projections(cfg).items():
        part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        assert leaves[f"model.layers.0.{part}.{name}.weight"].shape == (fan_out, fan_in)
    with pytest.raises(TypeError, match="ModelConfig"):
        model_config(3)


def test_weights_gradients_optimizer_by_method():
    shape = model_config("llama-3.2-1b")
    n = num_params(shape)
    full = estimate(shape, method="full", dtype="bf16", batch_size=1, seq_len=128)
    assert full.weights == 2 * n and full.gradients == 2 * n and full.optimizer == 8 * n
    bf16_state = estimate(shape, method="full", dtype="bf16", batch_size=1, seq_len=128, state_dtype="bf16")
    assert bf16_state.optimizer == 4 * n and "bf16 state" in str(bf16_state.breakdown())
    with pytest.raises(PlanError, match="optimizer state dtype"):
        estimate(shape, method="full", state_dtype="int8")
    adapted = estimate(shape, method="lora", dtype="bf16", batch_size=1, seq_len=128, rank=16,
                       targets=("all-linear",))
    per_layer = sum(16 * (a + b) for a, b in projections(shape).values())
    assert adapted.trainable_params == shape.num_layers * per_layer
    assert adapted.adapters == 4 * adapted.trainable_params and adapted.optimizer == 8 * adapted.trainable_params
    q = estimate(shape, method="qlora", dtype="bf16", batch_size=1, seq_len=128)
    linear = shape.num_layers * layer_params(shape)[0]
    assert q.weights == int(linear * NF4_BYTES_PER_PARAM + (n - linear) * 2)
    assert 0.51 < NF4_BYTES_PER_PARAM < 0.52


def test_sharding_divides_params_grads_and_state_not_activations():
    one = estimate("llama-3.2-1b", method="full", dtype="bf16", batch_size=2, seq_len=1024, nproc=1)
    four = estimate("llama-3.2-1b", method="full", dtype="bf16", batch_size=2, seq_len=1024, nproc=4)
    for field in ("weights", "gradients", "optimizer"):
        assert getattr(four, field) == pytest.approx(getattr(one, field) / 4, abs=1)
    assert four.activations == one.activations
    assert four.peak < one.peak


def test_fits_verdict():
    p = estimate("llama-3.2-1b", method="lora", dtype="bf16", batch_size=4, seq_len=2048, memory="80GiB",
                 device="cuda")
    assert p.fits is True and "fits in 80.00 GiB" in format_plan(p)
    small = estimate("llama-3.2-1b", method="lora", dtype="bf16", batch_size=4, seq_len=2048, memory="2GiB",
                     device="cuda")
    assert small.fits is False and "does NOT fit" in format_plan(small)
    assert estimate("tiny", method="lora").fits is None
    assert small.peak == small.tensor_peak + small.overhead


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("1.5 gib") == int(1.5 * 2**30)
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory(1000) == 1000
    with pytest.raises(PlanError, match="24GiB"):
        parse_memory("lots")


def test_plan_of_builtin_configs():
    demo = plan("demo", device="cpu")
    assert demo.setup.method == "full" and demo.setup.seq_len == 64 and demo.setup.batch_size == 32
    text = format_plan(demo)
    for word in ("weights", "gradients", "optimizer", "activations", "peak"):
        assert word in text

    # The model folder is not downloaded: the preset of the same name gives the shape, with a note.
    q = plan("llama3_2_1b_qlora", memory="24GiB", device="cuda")
    assert q.setup.method == "qlora" and q.setup.checkpoint and q.fits is True
    assert any("preset" in note for note in q.notes)
    longer = plan("llama3_2_1b_qlora", ["seq_len=4096"], device="cuda")
    assert longer.activations > q.activations
    sharded = plan("llama3_2_1b_full", nproc=2, device="cuda")
    assert sharded.nproc == 2 and sharded.weights < plan("llama3_2_1b_full", device="cuda").weights

    with pytest.raises(PlanError, match="config.json"):
        plan("demo", ["model.path=/nonexistent/model-folder"], device="cpu")


def test_loss_softmax_block_as_the_loss_takes_it():
    """The plan holds the fp32 softmax block the loss takes on each device."""
    from ftprog.core import _loss

    config = {**CONFIG, "vocab_size": 32000}
    cpu, cuda = (estimate(config, method="full", dtype="bf16", batch_size=4, seq_len=256, device=d) for d in ("cpu", "cuda"))
    assert (cpu.softmax_rows, cuda.softmax_rows) == (_loss._softmax_rows(32000, torch.device("cpu")), 524)
    assert cuda.loss_chunk - cpu.loss_chunk == (524 - 16) * 32000 * 8
    assert "16 rows at a time" in format_plan(cpu)
