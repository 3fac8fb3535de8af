"""PEFT adapter folders: ft-prog <-> peft logits parity, merge -> transformers, round trip, errors."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from _hf import save_hf
from ftprog.core import flatten, from_config, is_static, load_pretrained, save_pretrained, value_and_grad
from ftprog.transforms import lora, lora_spec, merge
from ftprog.transforms._adapter_io import load_adapter, save_adapter

import peft
import transformers

TOL = 1e-4


def tokens_for(model, seed=1):
    return torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))


def train(model, steps=3, lr=0.5):
    """A few SGD steps of next-token cross-entropy on random tokens, so B (and magnitudes) move."""
    tokens = tokens_for(model, seed=2)

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    step = value_and_grad(loss_fn)
    for _ in range(steps):
        _, grads = step(model)
        model = model.with_params({p: model.trainable_params()[p] - lr * g for p, g in grads.items()})
    return model


def logits_gap(a, b):
    return (a - b).abs().max().item()


def randomize_peft(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_adapter_paths(pm):
    """PEFT's adapter parameter names as ft-prog paths (the names its saved file uses, minus the prefix)."""
    return sorted(k.removeprefix("base_model.model.").replace(".default", "").replace("_vector.weight", "_vector")
                  for k, _ in pm.named_parameters() if ".lora_" in k)


def rewrite_config(folder, **changes):
    file = folder / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


# (arch, lora kwargs, expected config form)
FT_TO_PEFT = {
    "llama2-qv-lora": ("llama2", dict(targets=["q_proj", "v_proj"]), "names"),
    "llama2-qv-dora": ("llama2", dict(targets=["q_proj", "v_proj"], dora=True), "names"),
    "qwen3-all-lora": ("qwen3", dict(targets="all-linear"), "names"),
    "qwen3-all-dora-rslora": ("qwen3", dict(targets="all-linear", dora=True, rslora=True), "names"),
    "qwen2-layer1-lora": ("qwen2-tied", dict(targets="model.layers.1.*"), "layers"),
    "qwen2-layer1-dora": ("qwen2-tied", dict(targets="model.layers.1.*", dora=True), "layers"),
    "llama3-lmhead-dora": ("llama3.1", dict(targets=["lm_head", "q_proj", "down_proj"], dora=True), "names"),
    "llama3-mixed-lora-rslora": ("llama3.1", dict(targets=["model.layers.0.*.q_proj", "v_proj", "lm_head"],
                                                   rslora=True, dropout=0.1), "regex"),
    "bias-headdim-dora": ("llama-bias-headdim", dict(targets=["k_proj", "o_proj", "up_proj"], dora=True), "names"),
}


@pytest.mark.parametrize("case", list(FT_TO_PEFT))
def test_ftprog_adapter_loads_in_peft(case, tmp_path):
    arch, kwargs, form = FT_TO_PEFT[case]
    ref = save_hf(arch, tmp_path / "base")
    base = load_pretrained(tmp_path / "base")
    adapted = train(lora(base, rank=4, alpha=8, **kwargs))
    tokens = tokens_for(base)
    with torch.no_grad():
        got, plain = adapted(tokens), base(tokens)
    assert logits_gap(got, plain) > 1e-3  # the adapter really changes the output

    save_adapter(adapted, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == base.source
    assert {"names": isinstance(cfg["target_modules"], list) and cfg["layers_to_transform"] is None,
            "layers": cfg["layers_to_transform"] == [1],
            "regex": isinstance(cfg["target_modules"], str)}[form]

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(adapter|key|keyword).*")
        pm = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    expected_paths = sorted(p for p in flatten(adapted.params) if ".lora_" in p)
    assert peft_adapter_paths(pm) == expected_paths
    with torch.no_grad():
        expected = pm(tokens).logits
    gap = logits_gap(got, expected)
    print(f"\n[ftprog->peft] {case}: max logit diff {gap:.2e}")
    assert gap <= TOL


# (arch, LoraConfig kwargs)
PEFT_TO_FT = {
    "llama2-qv-lora": ("llama2", dict(target_modules=["q_proj", "v_proj"])),
    "llama2-all-exclude-dora": ("llama2", dict(target_modules="all-linear", exclude_modules=["down_proj"],
                                               use_dora=True)),
    "qwen3-all-dora": ("qwen3", dict(target_modules="all-linear", use_dora=True)),
    "qwen2-regex-lora-rslora": ("qwen2-tied", dict(target_modules=r".*\.layers\.1\.mlp\..*_proj", use_rslora=True)),
    "llama3-layers-lmhead-dora": ("llama3.1", dict(target_modules=["q_proj", "k_proj", "lm_head"],
                                                   layers_to_transform=[0], use_dora=True, lora_dropout=0.05)),
}


@pytest.mark.parametrize("case", list(PEFT_TO_FT))
def test_peft_adapter_loads_in_ftprog(case, tmp_path):
    arch, kwargs = PEFT_TO_FT[case]
    ref = save_hf(arch, tmp_path / "base")
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM", **kwargs))
    randomize_peft(pm)
    pm.save_pretrained(tmp_path / "adapter")
    pm.eval()
    base = load_pretrained(tmp_path / "base")
    model = load_adapter(base, tmp_path / "adapter")
    tokens = tokens_for(base)
    with torch.no_grad():
        expected, got = pm(tokens).logits, model(tokens)
    assert logits_gap(got, base(tokens).detach()) > 1e-3
    assert sorted(model.trainable) == peft_adapter_paths(pm)
    gap = logits_gap(got, expected)
    print(f"\n[peft->ftprog] {case}: max logit diff {gap:.2e}")
    assert gap <= TOL


def test_base_weights_saved_by_peft_replace_the_base(tmp_path):
    """With lm_head targeted PEFT also saves lm_head.base_layer.weight, and loads it over the base model's."""
    save_hf("llama3.1", tmp_path / "base")
    load_hf = lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pm = peft.get_peft_model(load_hf(), peft.LoraConfig(r=4, target_modules=["lm_head", "v_proj"]))
    randomize_peft(pm)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        pm.save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.lm_head.base_layer.weight"] += 0.05
    save_file(tensors, file)
    pm = peft.PeftModel.from_pretrained(load_hf(), tmp_path / "adapter").eval()
    base = load_pretrained(tmp_path / "base")
    model = load_adapter(base, tmp_path / "adapter")
    assert not torch.equal(model.params["lm_head"]["weight"], base.params["lm_head"]["weight"])
    tokens = tokens_for(base)
    with torch.no_grad():
        gap = logits_gap(model(tokens), pm(tokens).logits)
    print(f"\n[peft->ftprog] lm_head base_layer override: max logit diff {gap:.2e}")
    assert gap <= TOL


@pytest.mark.parametrize("arch,kwargs", [
    ("llama3.1", dict(targets=["q_proj", "v_proj", "lm_head"])),
    ("llama3.1", dict(targets="all-linear", dora=True)),
    ("qwen2-tied", dict(targets=["k_proj", "gate_proj"], dora=True, rslora=True)),
], ids=["lora", "dora", "dora-rslora"])
def test_merge_then_save_loads_in_transformers(arch, kwargs, tmp_path):
    save_hf(arch, tmp_path / "base")
    adapted = train(lora(load_pretrained(tmp_path / "base"), rank=4, alpha=8, **kwargs))
    save_pretrained(merge(adapted), tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokens = tokens_for(adapted)
    with torch.no_grad():
        gap = logits_gap(hf(tokens).logits, adapted(tokens))
    print(f"\n[merge->transformers] {arch} {kwargs}: max logit diff {gap:.2e}")
    assert gap <= TOL


@pytest.mark.parametrize("kwargs", [dict(targets=["q_proj", "v_proj"]),
                                    dict(targets=["model.layers.0.*.q_proj", "down_proj"], dora=True, rslora=True)])
def test_round_trip_is_bitwise(kwargs, tmp_path):
    save_hf("llama3.1", tmp_path / "base")
    base = load_pretrained(tmp_path / "base")
    adapted = train(lora(base, rank=4, alpha=8, dropout=0.1, **kwargs))
    save_adapter(adapted, tmp_path / "adapter")
    save_adapter(adapted, tmp_path / "adapter")  # replacing an existing folder works
    back = load_adapter(base, tmp_path / "adapter")
    a, b = flatten(adapted.params), flatten(back.params)
    assert a.keys() == b.keys() and back.trainable == adapted.trainable
    assert all(a[p] == b[p] if is_static(a[p]) else torch.equal(a[p], b[p]) and a[p].dtype == b[p].dtype for p in a)
    sa, sb = lora_spec(adapted), lora_spec(back)
    assert (sa.rank, sa.alpha, sa.dropout, sa.rslora) == (sb.rank, sb.alpha, sb.dropout, sb.rslora)
    tokens = tokens_for(base)
    with torch.no_grad():
        assert torch.equal(adapted(tokens), back(tokens))
    half = load_adapter(base, tmp_path / "adapter", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.trainable_params().values())
    assert not list(tmp_path.glob(".adapter*"))  # no temporary folders left behind


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama base, and a DoRA adapter on q_proj/v_proj of it (rank 4)."""
    root = tmp_path_factory.mktemp("adapter")
    save_hf("llama2", root / "base")
    base = load_pretrained(root / "base")
    adapted = lora(base, rank=4, alpha=8, targets=["q_proj", "v_proj"], dora=True)
    adapted = adapted.with_params({p: t + 0.01 for p, t in adapted.trainable_params().items()})
    save_adapter(adapted, root / "adapter")
    return base, adapted, root / "adapter"


@pytest.fixture
def copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved[2], tmp_path / "adapter")


def test_save_without_adapters_fails(saved, tmp_path):
    with pytest.raises(ValueError, match="no adapters"):
        save_adapter(saved[0], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_folder_and_files(saved, copy, tmp_path):
    base = saved[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(base, tmp_path / "nope")
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(base, copy)
    (copy / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only adapter_model.bin"):
        load_adapter(base, copy)
    (copy / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(base, copy)


@pytest.mark.parametrize("changes,match", [
    (dict(peft_type="IA3"), "peft_type is 'IA3'"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern.*not supported"),
    (dict(alpha_pattern={"q_proj": 8}), "alpha_pattern.*not supported"),
    (dict(bias="all"), "bias='all'"),
    (dict(target_modules=["embed_tokens"]), "match no linear layer"),
    (dict(r=8), r"rank 4 but adapter_config.json says r=8"),
    (dict(use_dora=False), "unexpected tensor .*lora_magnitude_vector.*use_dora is false"),
    (dict(target_modules=["q_proj"]), r"unexpected tensor .*v_proj.lora_A.weight.*target_modules"),
    (dict(target_modules=["q_proj", "v_proj", "k_proj"]), r"missing tensor .*k_proj"),
])
def test_bad_config(saved, copy, changes, match):
    rewrite_config(copy, **changes)
    with pytest.raises(ValueError, match=match):
        load_adapter(saved[0], copy)


def test_missing_and_unexpected_tensors(saved, copy):
    file = copy / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, file)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: missing tensor '{key}'"):
        load_adapter(saved[0], copy)
    extra = "base_model.model.model.embed_tokens.lora_embedding_A"
    save_file({**tensors, extra: torch.zeros(4, 96)}, file)
    with pytest.raises(ValueError, match=f"unexpected tensor '{extra}' \\(not a LoRA/DoRA adapter weight"):
        load_adapter(saved[0], copy)
    save_file({**tensors, "base_model.model.model.embed_tokens.weight": torch.zeros(95, 64)}, file)
    with pytest.raises(ValueError, match=r"embed_tokens.weight' has shape \(95, 64\), the model needs \(96, 64\)"):
        load_adapter(saved[0], copy)


def test_adapter_for_another_base(saved):
    base, _, folder = saved
    hf = base.config.to_hf()
    wider = from_config({**hf, "hidden_size": 96, "head_dim": 16, "num_attention_heads": 6, "num_key_value_heads": 2})
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight' has shape \(4, 64\), the model needs \(4, 96\): "
                                         "wrong base model"):
        load_adapter(wider, folder)
    shallow = from_config({**hf, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"module 'model.layers.1.self_attn.q_proj', which the model does not have: "
                                         "wrong base model"):
        load_adapter(shallow, folder)


def test_lm_head_adapter_on_tied_base(tmp_path):
    save_hf("llama3.1", tmp_path / "untied")
    adapted = lora(load_pretrained(tmp_path / "untied"), rank=2, alpha=4, targets=["lm_head", "q_proj"])
    save_adapter(adapted, tmp_path / "adapter")
    save_hf("llama3.2-tied", tmp_path / "tied")
    with pytest.raises(ValueError, match="lm_head is tied to the embeddings here.*wrong base model"):
        load_adapter(load_pretrained(tmp_path / "tied"), tmp_path / "adapter")


def test_load_on_adapted_model_fails(saved):
    _, adapted, folder = saved
    with pytest.raises(ValueError, match="already has adapters"):
        load_adapter(adapted, folder)
