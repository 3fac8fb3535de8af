"""quantize: NF4 / int8 / int4 weights, QLoRA, merge, save, memory, refusals."""

import functools
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from ftprog.core import (
    dense_weight, flatten, from_config, is_quantized, load_pretrained, save_pretrained, value_and_grad,
)
from ftprog.transforms import cast, checkpoint, compile, lora, merge
from ftprog.transforms._quantize import SCHEMES, param_bytes, quantize, tensor_nbytes

# Every linear of these shapes fits NF4 (element count divisible by 64 * 256) and int4 (in % 32).
BASE = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 512, "vocab_size": 256, "max_position_embeddings": 64, "hidden_act": "silu",
        "tie_word_embeddings": False}
CONFIGS = {
    "llama": {**BASE, "model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
    "qwen2": {**BASE, "model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
}
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def make(arch="llama", dtype=torch.float32, **overrides):
    """A tiny random model; biases (qwen2 q/k/v) get random values so they matter."""
    model = from_config({**CONFIGS[arch], **overrides}, seed=1, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    biases = {p: (torch.randn(t.shape, generator=g) * 0.1).to(dtype)
              for p, t in flatten(model.params).items() if p.endswith(".bias")}
    return model.with_params(biases) if biases else model


@functools.lru_cache(maxsize=None)
def make_quantized(arch, dtype, scheme):
    """(base, quantize(base, scheme)), built once per test session (models are immutable)."""
    base = make(arch, dtype)
    return base, quantize(base, scheme)


def quantized_paths(model):
    return sorted(p for p, t in flatten(model.params).items() if is_quantized(t))


def dequantized(qmodel, base):
    """``base`` with every quantized weight of ``qmodel`` replaced by its dequantized plain tensor."""
    return base.with_params({p: dense_weight({"weight": flatten(qmodel.params)[p]}) for p in quantized_paths(qmodel)})


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def loss_fn(model, tokens):
    logits = model(tokens, training=True)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())


def set_lora_b(model, seed=3):
    """Non-zero B (and magnitudes nudged) so adapters change the output and A gets gradients."""
    g = torch.Generator().manual_seed(seed)
    new = {}
    for p, t in flatten(model.params).items():
        if p.endswith("lora_B.weight"):
            new[p] = (torch.randn(t.shape, generator=g) * 0.05).to(t.dtype)
        elif p.endswith("lora_magnitude_vector"):
            new[p] = t * (1 + 0.1 * torch.rand(t.shape, generator=g)).to(t.dtype)
    return model.with_params(new)


# ---------------------------------------------------------------- forward parity


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_dequantized_reference(arch, scheme, dtype):
    base, q = make_quantized(arch, dtype, scheme)
    linears = sorted(p for p in flatten(base.params) if p.endswith("_proj.weight"))
    assert quantized_paths(q) == linears  # all-linear: every projection, not lm_head / embeddings / norms / biases
    for p in quantized_paths(q):
        w = flatten(q.params)[p]
        assert w.dtype == dtype and w.shape == flatten(base.params)[p].shape
        dense = dense_weight({"weight": w})
        assert type(dense) is torch.Tensor and dense.dtype == dtype
        assert rel_err(dense, flatten(base.params)[p]) < {"nf4": 0.15, "int8": 0.01, "int4": 0.15}[scheme]
    ref = dequantized(q, base)
    with torch.no_grad():
        got, want = q(TOKENS), ref(TOKENS)
    assert got.dtype == dtype
    # fp32: same math up to summation order. bf16: rounding points differ (int8's kernel scales after the
    # matmul; NF4 adds the bias after a rounded matmul), a few bf16 ulps.
    tol = 1e-5 if dtype == torch.float32 else (3e-2 if scheme == "int8" else 1e-2)
    assert rel_err(got, want) < tol
    with torch.no_grad():  # and quantization error itself stays modest against the original model
        assert rel_err(got, base(TOKENS)) < (0.03 if scheme == "int8" else 0.4)


def test_biases_embeddings_norms_untouched_and_shared():
    base = make("qwen2", torch.bfloat16)
    q = quantize(base, "nf4")
    fb, fq = flatten(base.params), flatten(q.params)
    assert fb.keys() == fq.keys()
    for p, t in fb.items():
        if not p.endswith("_proj.weight"):
            assert fq[p] is t, p  # shared, not copied
    assert any(p.endswith("q_proj.bias") for p in fb)


# ---------------------------------------------------------------- trainable set, input untouched


def test_quantized_leaves_not_trainable_and_input_unchanged():
    base = make("llama", torch.bfloat16)
    before = {p: (t, t.clone()) for p, t in flatten(base.params).items()}
    q = quantize(base, "nf4", targets=["q_proj", "model.layers.1.mlp.*"])
    done = set(quantized_paths(q))
    assert done == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                    "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                    "model.layers.1.mlp.down_proj.weight"}
    assert q.trainable == base.trainable - done
    assert base.trainable == frozenset(before)
    for p, (t, copy) in before.items():
        now = flatten(base.params)[p]
        assert now is t and type(now) is torch.Tensor and torch.equal(now, copy)
    for p, t in flatten(q.params).items():
        if p not in done:
            assert t.data_ptr() == before[p][0].data_ptr()
    with torch.no_grad():
        base(TOKENS), q(TOKENS)
    # the quantized model trains what is left, e.g. the norms
    loss, grads = value_and_grad(loss_fn)(q, TOKENS)
    assert set(grads) == set(q.trainable) and torch.isfinite(loss)


def test_lm_head_only_when_asked():
    base = make("llama", torch.bfloat16)
    q = quantize(base, "int8", targets=["all-linear", "lm_head"])
    assert "lm_head.weight" in quantized_paths(q)
    assert "model.embed_tokens.weight" not in quantized_paths(q)
    with pytest.raises(ValueError, match="lm_head has no weight"):
        quantize(make("llama", torch.bfloat16, tie_word_embeddings=True), "nf4", targets="lm_head")


# ---------------------------------------------------------------- QLoRA


def qlora_pair(dtype, dora, scheme="nf4"):
    """(lora on the quantized base, lora on the dequantized plain base), same adapter values."""
    base, q = make_quantized("llama", dtype, scheme)
    ref_base = dequantized(q, base)
    kw = dict(rank=4, alpha=8, targets="all-linear", dora=dora, seed=5)
    adapted, ref = set_lora_b(lora(q, **kw)), set_lora_b(lora(ref_base, **kw))
    for p, t in flatten(ref.params).items():
        if ".lora_" in p:
            assert torch.equal(t, flatten(adapted.params)[p]), p
    return adapted, ref


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qlora_forward_and_grads_equal_dequantized_reference(dora, dtype):
    adapted, ref = qlora_pair(dtype, dora)
    assert adapted.trainable == ref.trainable and all(".lora_" in p for p in adapted.trainable)
    with torch.no_grad():
        got, want = adapted(TOKENS), ref(TOKENS)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert rel_err(got, want) < tol
    loss, grads = value_and_grad(loss_fn)(adapted, TOKENS)
    ref_loss, ref_grads = value_and_grad(loss_fn)(ref, TOKENS)
    assert abs(loss.item() - ref_loss.item()) < tol
    assert set(grads) == set(ref_grads)
    for p in grads:
        assert grads[p].norm() > 0, p
        assert rel_err(grads[p], ref_grads[p]) < 10 * tol, p


def test_qlora_bf16_close_to_fp32_compute():
    """A bf16 QLoRA step against the same weights (dequantized) computed entirely in fp32."""
    adapted, ref = qlora_pair(torch.bfloat16, dora=False)
    ref32 = cast(ref, torch.float32)
    with torch.no_grad():
        assert rel_err(adapted(TOKENS), ref32(TOKENS)) < 3e-2
    _, grads = value_and_grad(loss_fn)(adapted, TOKENS)
    _, grads32 = value_and_grad(loss_fn)(ref32, TOKENS)
    assert max(rel_err(grads[p], grads32[p]) for p in grads) < 0.1


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_lora_on_int8_int4_base_grads_equal_reference(scheme):
    adapted, ref = qlora_pair(torch.float32, dora=False, scheme=scheme)
    _, grads = value_and_grad(loss_fn)(adapted, TOKENS)
    _, ref_grads = value_and_grad(loss_fn)(ref, TOKENS)
    assert max(rel_err(grads[p], ref_grads[p]) for p in grads) < 1e-4


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_checkpoint_same_grads(dora):
    adapted, _ = qlora_pair(torch.bfloat16, dora)
    loss, grads = value_and_grad(loss_fn)(adapted, TOKENS)
    ck_loss, ck_grads = value_and_grad(loss_fn)(checkpoint(adapted), TOKENS)
    assert torch.equal(loss, ck_loss)
    for p in grads:
        assert torch.allclose(grads[p], ck_grads[p], rtol=1e-5, atol=1e-7), p


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_qlora_gives_plain_model_with_same_logits(dora, dtype):
    adapted, _ = qlora_pair(dtype, dora)
    merged = merge(adapted)
    flat = flatten(merged.params)
    assert not quantized_paths(merged) and all(type(t) is torch.Tensor for t in flat.values())
    assert not any(".lora_" in p for p in flat)
    assert all(t.dtype == dtype for t in flat.values())
    with torch.no_grad():
        # bf16: the merged weights are rounded to bf16 once more
        assert rel_err(merged(TOKENS), adapted(TOKENS)) < (1e-5 if dtype == torch.float32 else 2e-2)


# ---------------------------------------------------------------- memory


def test_nf4_bytes_at_most_0_3_of_bf16():
    base, q = make_quantized("llama", torch.bfloat16, "nf4")
    pattern = "*_proj.weight"
    plain, packed = param_bytes(base, pattern), param_bytes(q, pattern)
    assert plain == sum(t.numel() * 2 for p, t in flatten(base.params).items() if p.endswith("_proj.weight"))
    assert packed / plain <= 0.3
    # whole model: embeddings, lm_head and norms unchanged
    assert param_bytes(base) - param_bytes(q) == plain - packed
    # one NF4 weight: 4 bits per value + int8 scaler per 64 + a few small tensors
    w = flatten(q.params)["model.layers.0.mlp.up_proj.weight"]
    assert w.numel() // 2 + w.numel() // 64 < tensor_nbytes(w) < w.numel() // 2 + w.numel() // 64 + 256
    assert tensor_nbytes(flatten(base.params)["model.norm.weight"]) == 256 * 2
    assert param_bytes(q.params, pattern) == packed
    int8 = param_bytes(make_quantized("llama", torch.bfloat16, "int8")[1], pattern)
    assert 0.5 <= int8 / plain <= 0.52


# ---------------------------------------------------------------- shape rules


def test_nf4_shape_rule_error_and_skip():
    # hidden 128, 2 kv heads of 32: k_proj / v_proj are 64 x 128 = 8192 elements, not a multiple of 16384
    base = make("llama", torch.bfloat16, hidden_size=128, intermediate_size=256)
    with pytest.raises(ValueError, match=r"cannot quantize 'model\.layers\.0\.self_attn\.k_proj\.weight'.*16384"):
        quantize(base, "nf4")
    with pytest.warns(UserWarning, match=r"4 weights left unquantized.*v_proj"):
        q = quantize(base, "nf4", skip_unsupported=True)
    skipped = {f"model.layers.{i}.self_attn.{n}_proj.weight" for i in range(2) for n in "kv"}
    assert set(quantized_paths(q)) == {p for p in flatten(base.params) if p.endswith("_proj.weight")} - skipped
    assert skipped <= q.trainable
    with torch.no_grad():
        assert rel_err(q(TOKENS), dequantized(q, base)(TOKENS)) < 1e-3
    # int8 has no shape rule; narrowing targets avoids the problem too
    assert len(quantized_paths(quantize(base, "int8"))) == 14
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(quantized_paths(quantize(base, "nf4", targets=["q_proj", "o_proj", "*.mlp.*"]))) == 10


def test_int4_group_rule():
    # hidden 80: q/k/v/o/gate/up have in_features 80, not a multiple of 32; down_proj (in 96) fits
    base = make("llama", torch.float32, hidden_size=80, intermediate_size=96)
    with pytest.raises(ValueError, match=r"q_proj\.weight'.*in_features = 80.*not divisible by 32"):
        quantize(base, "int4")
    with pytest.warns(UserWarning, match="12 weights left unquantized"):
        q = quantize(base, "int4", skip_unsupported=True)
    assert quantized_paths(q) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]


# ---------------------------------------------------------------- refusals


def test_refusals():
    base = make("llama", torch.bfloat16)
    with pytest.raises(ValueError, match=r"unknown scheme 'fp8'; valid schemes are nf4, int8, int4"):
        quantize(base, "fp8")
    with pytest.raises(ValueError, match="quantize before lora"):
        quantize(lora(base, rank=4, alpha=8), "nf4")
    q = quantize(base, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, "nf4")
    with pytest.raises(ValueError, match="quantize after compile: apply compile last"):
        quantize(compile(base), "nf4")
    with pytest.raises(ValueError, match=r"quantize: targets \['nope'\] match no linear layer"):
        quantize(base, "nf4", targets="nope")
    with pytest.raises(ValueError, match="select no linear layer"):
        quantize(base, "nf4", targets=[])
    # checkpoint before quantize is fine (it does not touch the tree)
    assert len(quantized_paths(quantize(checkpoint(base), "nf4"))) == 14


def test_torchao_not_imported_with_ftprog():
    code = ("import sys, ftprog.core, ftprog.transforms, ftprog.transforms._quantize; "
            "assert 'torchao' not in sys.modules, 'torchao imported at ftprog import time'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- save


def test_save_pretrained_writes_dequantized_weights_transformers_loads(tmp_path):
    import transformers

    base = make("qwen2", torch.bfloat16)
    q = quantize(base, "nf4")
    save_pretrained(q, tmp_path)
    ref = dequantized(q, base)
    loaded = load_pretrained(tmp_path)
    for p, t in flatten(ref.params).items():
        assert torch.equal(flatten(loaded.params)[p], t), p
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(TOKENS).logits, cast(ref, torch.float32)(TOKENS)) < 1e-5
