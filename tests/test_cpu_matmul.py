"""bf16 matmuls on a CPU without bf16 kernels compute in fp32 (``matmul_dtype``, ``dense_linear``).

``FTPROG_CPU_MATMUL_UPCAST`` forces either path, so both run on any CPU: the upcast path must equal fp32 math on
the bf16 values (rounded once), keep no fp32 copies for the backward, and train a model as the native path does.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ftprog.core import (
    CPU_MATMUL_UPCAST_ENV, dense_linear, from_config, matmul_dtype, token_loss_sum, value_and_grad,
)
from ftprog.transforms import fuse_projections, lora, quantize, trainable

LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
MIXTRAL = {**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
NF4_LLAMA = {**LLAMA, "hidden_size": 128, "intermediate_size": 256, "num_key_value_heads": 4}  # NF4's 16384 blocks


@pytest.fixture
def upcast(monkeypatch):
    monkeypatch.setenv(CPU_MATMUL_UPCAST_ENV, "1")


def test_matmul_dtype_upcasts_only_narrow_floats_on_the_cpu(monkeypatch):
    monkeypatch.setenv(CPU_MATMUL_UPCAST_ENV, "1")
    assert matmul_dtype(torch.bfloat16, "cpu") == torch.float32
    assert matmul_dtype(torch.float16, torch.device("cpu")) == torch.float32
    assert matmul_dtype(torch.float32, "cpu") == torch.float32
    assert matmul_dtype(torch.bfloat16, "meta") == torch.bfloat16  # not a CPU: its own kernels decide
    monkeypatch.setenv(CPU_MATMUL_UPCAST_ENV, "0")
    assert matmul_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    monkeypatch.delenv(CPU_MATMUL_UPCAST_ENV)  # unset: from the CPU, as torch's oneDNN decides
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert matmul_dtype(torch.bfloat16, "cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setenv(CPU_MATMUL_UPCAST_ENV, "yes")
    with pytest.raises(ValueError, match=f"{CPU_MATMUL_UPCAST_ENV}='yes': use 1 .* 0 .* or leave it unset"):
        matmul_dtype(torch.bfloat16, "cpu")


def test_a_wrong_upcast_setting_stops_a_bf16_run_before_loading(tmp_path):
    env = {**os.environ, CPU_MATMUL_UPCAST_ENV: "maybe"}
    proc = subprocess.run([sys.executable, "-m", "ftprog.programs.cli", "run", "sft", "--config", "demo",
                           "dtype=bf16", f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{CPU_MATMUL_UPCAST_ENV}='maybe': use 1" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


@pytest.mark.parametrize("bias", [False, True])
def test_dense_linear_upcast_is_fp32_math_rounded_once_and_keeps_no_fp32_copies(upcast, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).bfloat16().requires_grad_()
    w = torch.randn(48, 64, generator=g).bfloat16().requires_grad_()
    b = torch.randn(48, generator=g).bfloat16().requires_grad_() if bias else None
    grad_out = torch.randn(3, 5, 48, generator=g).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dense_linear(x, w, b)
    assert out.dtype == torch.bfloat16
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)  # the bf16 inputs themselves, never fp32 copies
    out.backward(grad_out)

    leaves = [t.detach().float().requires_grad_() for t in (x, w, *([b] if bias else []))]
    ref = F.linear(*leaves)
    ref.backward(grad_out.float())
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    for leaf, ref_leaf in zip([x, w, *([b] if bias else [])], leaves):
        assert leaf.grad.dtype == torch.bfloat16
        torch.testing.assert_close(leaf.grad, ref_leaf.grad.bfloat16(), rtol=0, atol=0)


def test_dense_linear_saves_only_what_a_gradient_needs(upcast):
    x = torch.randn(4, 64).bfloat16().requires_grad_()
    w = torch.randn(32, 64).bfloat16()  # frozen: grad x needs the weight, nothing needs x
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dense_linear(x, w)
    assert [t.shape for t in saved] == [w.shape]
    out.sum().backward()
    torch.testing.assert_close(x.grad, (torch.ones(4, 32) @ w.float()).bfloat16(), rtol=0, atol=0)


def step(model, monkeypatch, flag):
    monkeypatch.setenv(CPU_MATMUL_UPCAST_ENV, flag)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 16), generator=g)
    return value_and_grad(lambda m: token_loss_sum(m, tokens, tokens) / tokens.numel())(model)


@pytest.mark.parametrize("build", [
    lambda: trainable(from_config(LLAMA, dtype=torch.bfloat16)),
    lambda: fuse_projections(trainable(from_config(LLAMA, dtype=torch.bfloat16))),
    lambda: lora(from_config(LLAMA, dtype=torch.bfloat16), rank=4, alpha=8, targets=("q_proj", "v_proj")),
    lambda: lora(from_config(MIXTRAL, dtype=torch.bfloat16), rank=4, alpha=8, targets=("q_proj", "experts")),
    lambda: lora(quantize(from_config(NF4_LLAMA, dtype=torch.bfloat16), "nf4"), rank=4, alpha=8,
                 targets=("q_proj", "v_proj")),
], ids=["full", "fused-projections", "lora", "moe-grouped-lora", "qlora-nf4"])
def test_a_bf16_model_trains_upcast_as_with_bf16_kernels(monkeypatch, build):
    """The whole step (projections, fused loss, adapters, grouped experts, NF4 bases) upcast against torch's own bf16
    matmuls: both accumulate in fp32, so they differ by summation order and bf16 rounding only."""
    model = build()
    if model.trainable_params():  # LoRA's B starts at zero: move it, so the adapters change the output
        g = torch.Generator().manual_seed(2)
        model = model.with_params({p: t + 0.02 * torch.randn(t.shape, generator=g).to(t.dtype)
                                   for p, t in model.trainable_params().items()})
    loss, grads = step(model, monkeypatch, "1")
    native_loss, native_grads = step(model, monkeypatch, "0")
    torch.testing.assert_close(loss, native_loss, rtol=2e-5, atol=0)
    assert grads.keys() == native_grads.keys() == model.trainable_params().keys()
    for path, grad in grads.items():
        ref = native_grads[path].float()
        assert grad.dtype == native_grads[path].dtype, path
        # bf16 gradients: within a few of their rounding steps of the native ones, relative to the tensor's scale
        assert (grad.float() - ref).abs().max() <= 0.03 * ref.abs().max(), path


def test_a_run_says_when_its_matmuls_compute_in_fp32(monkeypatch):
    from ftprog.programs.training import matmul_note

    monkeypatch.setenv(CPU_MATMUL_UPCAST_ENV, "1")
    note = matmul_note("bf16", torch.device("cpu"))
    assert note.startswith("matmuls: bf16 computed in fp32") and f"{CPU_MATMUL_UPCAST_ENV}=0" in note
    assert matmul_note("fp32", torch.device("cpu")) is None
    monkeypatch.setenv(CPU_MATMUL_UPCAST_ENV, "0")
    assert matmul_note("bf16", torch.device("cpu")) is None
