"""offload_activations: saved activations kept in host memory between forward and backward.

Only the CPU is here: the copies go host -> host, which checks the hooks' round trip and the checkpoint
composition (gradients equal). The pinned copies, the side stream and the memory saved need a GPU.
"""

import pytest
import torch

from ftprog.core import flatten, from_config, token_loss_sum, value_and_grad
from ftprog.transforms import _offload, checkpoint, offload_activations, trainable

LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def model():
    base = from_config(LLAMA, seed=0)
    g = torch.Generator().manual_seed(1)
    return trainable(base.with_params({p: t + 0.05 * torch.randn(t.shape, generator=g)
                                       for p, t in flatten(base.params).items()}))


def step(m):
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    return value_and_grad(lambda x: token_loss_sum(x, tokens, tokens))(m)


def assert_same_step(m, reference):
    (loss, grads), (ref_loss, ref_grads) = step(m), step(reference)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for path, g in grads.items():
        assert torch.equal(g, ref_grads[path]), path


@pytest.fixture
def packed(monkeypatch):
    """The shapes of the tensors the pack hook copied, in order."""
    shapes = []
    to_host = _offload.to_host

    def recording(t, **kwargs):
        out = to_host(t, **kwargs)
        if out is not t:
            shapes.append(tuple(t.shape))
        return out

    monkeypatch.setattr(_offload, "to_host", recording)
    return shapes


def test_saved_tensors_round_trip_through_host_copies(packed):
    """Forced on a CPU model (every saved tensor, min_bytes=0): activations are packed as copies, parameters are
    not, and the loss and gradients are bitwise those of the plain model."""
    plain = model()
    assert_same_step(offload_activations(plain, min_bytes=0), plain)
    assert len(packed) > 10 and (128, 64) not in packed and (64, 64) not in packed  # activations, no weights
    t = torch.arange(6.0)
    copy = _offload.to_host(t)
    assert copy.host.data_ptr() != t.data_ptr() and torch.equal(_offload.back_from_host(copy), t)


def test_with_checkpointing_only_the_layer_inputs_move(packed):
    """Outside the checkpoint the hooks see what it keeps, each layer's input [2, 16, 64], and nothing else."""
    plain = model()
    offloaded = offload_activations(checkpoint(plain), min_bytes=0)
    assert [name for name, _ in offloaded.decoder.layer_wraps] == ["checkpoint", "offload_activations"]
    assert_same_step(offloaded, plain)
    assert packed == [(2, 16, 64)] * 2


def test_order_and_repetition_are_refused():
    offloaded = offload_activations(model())
    with pytest.raises(ValueError, match="already offloaded"):
        offload_activations(offloaded)
    with pytest.raises(ValueError, match="checkpoint after offload_activations"):
        checkpoint(offloaded)


def test_config_keys_on_cpu_fuse_and_note_that_offloading_is_off(tmp_path):
    """``fuse_projections = true`` applies the transform; ``activation_offloading = true`` on the CPU applies
    nothing and says so once."""
    from ftprog.core import save_pretrained
    from ftprog.programs.sft_config import ModelSection, PeftSection, SFTConfig
    from ftprog.programs.training import build_model

    save_pretrained(model(), tmp_path / "m")
    cfg = SFTConfig(model=ModelSection(path=str(tmp_path / "m")), peft=PeftSection(method="none"), dtype="fp32",
                    activation_offloading=True, fuse_projections=True)
    said = []
    _, built = build_model(cfg, torch.device("cpu"), say=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert built.transforms == ("fuse_projections",)
    assert len(said) == 1 and "activation_offloading is a no-op on cpu" in said[0]
    assert SFTConfig().activation_offloading is False and SFTConfig().fuse_projections is False
