"""export: hf (merged, transformers oracle), peft (peft oracle), gguf (read back with gguf.GGUFReader), executorch."""

import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch

from ftprog.core import flatten, load_pretrained, load_tokenizer, read_config
from ftprog.core._decoder import rope_inv_freq
from ftprog.programs import export as export_module
from ftprog.programs.export import (
    ExportError, export, export_program, gguf_tensor_name, llama3_rope_factors, load_merged,
)
from ftprog.transforms import load_adapter, lora, quantize, save_adapter

import gguf
from _oracle import optional_oracle

ORACLES = "the oracles extra (README, Development)"


def _adapter(folder, path, targets=("q_proj", "k_proj", "v_proj", "down_proj"), dora=False, seed=1):
    """A PEFT adapter folder for the model in ``folder`` with random (non-zero) A and B."""
    adapted = lora(load_pretrained(folder), rank=4, alpha=8, targets=targets, dora=dora)
    g = torch.Generator().manual_seed(seed)
    adapted = adapted.with_params({p: t + torch.randn(t.shape, generator=g) * 0.05
                                   for p, t in adapted.trainable_params().items()})
    return save_adapter(adapted, path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder, adapter folder, transformers model): a tiny Llama 3.1 (llama3 RoPE) with a byte-level BPE tokenizer."""
    from _hf import hf_model
    from _tokfixtures import build_bpe_folder

    root = tmp_path_factory.mktemp("export")
    hf = hf_model("llama3.1", vocab_size=640)
    hf.save_pretrained(root / "llama")
    build_bpe_folder(root / "llama")
    return root / "llama", _adapter(root / "llama", root / "adapter"), hf


TOKENS = torch.randint(0, 600, (2, 11), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- hf, peft


def test_hf_export_is_the_merged_model_transformers_loads(llama, tmp_path):
    import peft
    import transformers

    folder, adapter, hf = llama
    out = export(folder, tmp_path / "merged", "hf", adapter=adapter)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapter).eval()  # peft wraps in place
    adapted = load_adapter(load_pretrained(folder), adapter)
    with torch.no_grad():
        got, want = merged_hf(TOKENS).logits, reference(TOKENS).logits
        base = hf(TOKENS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapted(TOKENS), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter changes the model


def test_hf_export_casts_and_works_without_adapter(llama, tmp_path):
    folder, _, _ = llama
    out = export(folder, tmp_path / "bf16", "hf", dtype="bf16")
    loaded = load_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    base = flatten(load_pretrained(folder).params)
    assert all(torch.equal(t, base[p].to(torch.bfloat16)) for p, t in flatten(loaded.params).items())


def test_peft_export_reloads_in_peft(llama, tmp_path):
    import peft

    folder, adapter, hf = llama
    out = export(folder, tmp_path / "peft", "peft", adapter=adapter)
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    from safetensors.torch import load_file

    saved, original = load_file(out / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    adapted = load_adapter(load_pretrained(folder), adapter)
    with torch.no_grad():
        torch.testing.assert_close(adapted(TOKENS), reference(TOKENS).logits, rtol=1e-4, atol=1e-5)


def test_bad_inputs_give_clear_errors(llama, tmp_path):
    folder, adapter, _ = llama
    with pytest.raises(ExportError, match="unknown export format 'onnx'.*hf, peft, gguf, executorch"):
        export(folder, tmp_path / "x", "onnx")
    with pytest.raises(ExportError, match="pass adapter=PATH"):
        export(folder, tmp_path / "x", "peft")
    with pytest.raises(FileNotFoundError, match="adapter folder .*nope"):
        export(folder, tmp_path / "x", "hf", adapter=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model folder"):
        export(tmp_path / "no-model", tmp_path / "x", "hf")
    with pytest.raises(ExportError, match="max_seq_len"):
        export(folder, tmp_path / "x", "hf", max_seq_len=16)
    assert not (tmp_path / "x").exists()


def test_export_replaces_nothing_it_was_not_asked_to(llama, tmp_path):
    """An existing output is refused unless overwrite (--overwrite) is given, and then replaced whole; an output that
    is, lies inside or holds the model or adapter folder is refused even with overwrite."""
    from typer.testing import CliRunner

    from ftprog.programs.cli import app
    from ftprog.programs.run_guard import RunError

    folder, adapter, _ = llama
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's")
    result = CliRunner().invoke(app, ["export", str(folder), str(existing), "--format", "hf"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert f"export failed: the output {existing} already exists (a folder that is not empty)" in result.stderr
    assert "--overwrite" in result.stderr and (existing / "notes.txt").read_text() == "the user's"
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_text("an older export")
    with pytest.raises(RunError, match="already exists \\(a file\\)"):
        export(folder, gguf_file, "gguf")
    assert gguf_file.read_text() == "an older export"

    result = CliRunner().invoke(app, ["export", str(folder), str(existing), "--format", "hf", "--overwrite"])
    assert result.exit_code == 0, result.stderr
    assert not (existing / "notes.txt").exists() and load_pretrained(existing).num_params() > 0

    before = sorted(p.name for p in folder.iterdir())
    for output, fmt, relation in [(folder, "hf", "is"), (folder / "merged", "hf", "is inside"),
                                  (folder.parent, "hf", "holds"), (adapter, "peft", "is"),
                                  (folder / "model.gguf", "gguf", "is inside")]:
        with pytest.raises(RunError, match=f"the output {output} {relation} the input"):
            export(folder, output, fmt, adapter=adapter, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before and (adapter / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------- gguf


def _field(reader, key):
    field = reader.get_field(key)
    assert field is not None, f"GGUF metadata {key!r} missing"
    return field.contents()


def _tensors(reader) -> dict[str, torch.Tensor]:
    out = {}
    for t in reader.tensors:
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        else:
            data = torch.from_numpy(data)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        out[t.name] = data.reshape(shape)
    return out


def _unpermute(w, n_head):
    """Inverse of llama.cpp's Q/K permutation (interleaved pairs -> halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf(path, model, dtype, arch):
    """Every tensor of ``path`` equals ``model``'s (permutation undone where llama.cpp rotates pairs, Gemma's +1 on
    norms); RoPE factor tensors and the metadata are there."""
    cfg = model.config
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == arch
    expect = {
        f"{arch}.context_length": cfg.max_position_embeddings, f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_layers, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_heads, f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.attention.key_length": cfg.head_dim, f"{arch}.rope.dimension_count": cfg.rotary.dim,
        f"{arch}.vocab_size": cfg.vocab_size,
    }
    for key, value in expect.items():
        assert _field(reader, key) == value, key
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)

    got = _tensors(reader)
    # Every name is one the gguf package lists for this architecture (what llama.cpp loads).
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    valid = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_enum]}
    for name in got:
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0]) in valid, name
    flat = flatten(model.params)
    names = {gguf_tensor_name(p, cfg) for p in flat}
    rope = cfg.rotary.scaling_dict
    extra = {"llama3": {"rope_freqs.weight"}, "longrope": {"rope_factors_long.weight", "rope_factors_short.weight"}}
    assert set(got) == names | extra.get(rope.get("rope_type"), set())
    assert ("output.weight" in got) == (not cfg.tie_word_embeddings)
    ggml = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    pairwise = arch in ("llama", "smollm3")
    for hf_name, tensor in flat.items():
        name = gguf_tensor_name(hf_name, cfg)
        t = got[name]
        if pairwise and ".q_proj." in hf_name:
            t = _unpermute(t, cfg.num_heads)
        elif pairwise and ".k_proj." in hf_name:
            t = _unpermute(t, cfg.num_kv_heads)
        want_dtype = dtype if tensor.dim() == 2 else torch.float32
        assert types[name] == ggml[want_dtype], name
        if hf_name.endswith("norm.weight"):
            tensor = tensor.float() + cfg.norm_offset  # Gemma: llama.cpp multiplies by the stored weight
        assert torch.equal(t, tensor.to(want_dtype)), name
    if rope.get("rope_type") == "llama3":
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        torch.testing.assert_close(base / got["rope_freqs.weight"], rope_inv_freq(cfg.rotary), rtol=1e-5, atol=0)
    if rope.get("rope_type") == "longrope":
        assert got["rope_factors_long.weight"].tolist() == pytest.approx(list(rope["long_factor"]))
        assert got["rope_factors_short.weight"].tolist() == pytest.approx(list(rope["short_factor"]))
        assert _field(reader, f"{arch}.rope.scaling.original_context_length") == \
            rope["original_max_position_embeddings"]
        assert _field(reader, f"{arch}.rope.scaling.attn_factor") == pytest.approx(rope["attention_factor"])
    return reader


def test_gguf_llama_with_adapter(llama, tmp_path):
    folder, adapter, _ = llama
    path = export(folder, tmp_path / "llama.gguf", "gguf", adapter=adapter, dtype="fp16")
    merged = load_merged(folder, adapter=adapter)
    reader = check_gguf(path, merged, torch.float16, "llama")
    # The Q weight really is permuted (not just copied).
    q = _tensors(reader)["blk.0.attn_q.weight"]
    assert not torch.equal(q, merged.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"].half())
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16

    # Tokenizer: byte-level BPE tokenizer.json -> gpt2 with merges; ids and template from the folder.
    tok = load_tokenizer(folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == len(types) == 640
    added = {t["id"] for t in tj["added_tokens"]}
    for text, i in tj["model"]["vocab"].items():
        assert tokens[i] == text and (i in added or types[i] == gguf.TokenType.NORMAL)
    for added in tj["added_tokens"]:
        assert tokens[added["id"]] == added["content"] and types[added["id"]] == gguf.TokenType.CONTROL
    assert tokens[639] == "[PAD639]" and types[639] == gguf.TokenType.UNUSED
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == len(tj["model"]["merges"]) and all(" " in m for m in merges)
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_id
    assert reader.get_field("tokenizer.ggml.bos_token_id") is None  # the tokenizer has no bos
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template


# Tiny configs as llama.cpp computes them (the _hf.ARCHS defaults that it cannot are refused, test_gguf_refusals).
LLAMA_CPP_CONFIGS = {
    "gemma2": {"query_pre_attn_scalar": 32},  # llama.cpp's Gemma attention scale is head_dim ** -0.5
    "phi3": {"sliding_window": None},  # llama.cpp's phi3 graph has no sliding window
    "smollm3": {"no_rope_layer_interval": 4, "attention_bias": False},  # no RoPE on every 4th layer, no biases
    "mixtral": {"sliding_window": None},  # llama.cpp's llama graph has no sliding window
    "qwen3-moe": {"mlp_only_layers": [], "decoder_sparse_step": 1},  # its qwen3moe graph: every layer sparse
}


@pytest.mark.parametrize("arch, gguf_arch, dtype", [
    ("qwen2-tied", "qwen2", torch.bfloat16),
    ("qwen3", "qwen3", torch.float32),
    ("llama-bias-headdim", "llama", torch.bfloat16),
    ("smollm2", "llama", torch.float16),
    ("gemma2", "gemma2", torch.bfloat16),
    ("gemma3", "gemma3", torch.float16),
    ("phi3", "phi3", torch.float32),
    ("phi4-mini", "phi3", torch.bfloat16),
    ("olmo2", "olmo2", torch.float16),
    ("smollm3", "smollm3", torch.float32),
])
def test_gguf_families(arch, gguf_arch, dtype, tmp_path):
    from _hf import hf_model
    from _tokfixtures import build_bpe_folder

    folder = tmp_path / arch
    hf_model(arch, vocab_size=640, **LLAMA_CPP_CONFIGS.get(arch, {})).save_pretrained(folder)
    build_bpe_folder(folder)
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    path = export(folder, tmp_path / "out", "gguf", dtype=name)
    assert path == tmp_path / "out" / "model.gguf"
    model = load_pretrained(folder)
    reader = check_gguf(path, model, dtype, gguf_arch)
    names = {t.name for t in reader.tensors}
    key = lambda k: _field(reader, f"{gguf_arch}.{k}")  # noqa: E731
    if arch in ("qwen3", "gemma3", "olmo2"):
        assert {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    if arch == "qwen2-tied":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    if arch == "llama-bias-headdim":
        assert {"blk.0.attn_q.bias", "blk.0.attn_output.bias", "blk.1.ffn_gate.bias"} <= names
        assert key("attention.key_length") == 24
    if arch in ("gemma2", "gemma3"):  # sandwich norms; windows per layer
        assert {"blk.1.attn_norm.weight", "blk.1.post_attention_norm.weight", "blk.1.ffn_norm.weight",
                "blk.1.post_ffw_norm.weight"} <= names
        assert key("attention.sliding_window") == 4
        assert key("attention.sliding_window_pattern") == [w is not None for w in model.config.layer_windows]
    if arch == "gemma2":
        assert key("attn_logit_softcapping") == pytest.approx(0.5)
        assert key("final_logit_softcapping") == pytest.approx(0.3)
    if arch == "gemma3":  # global layers: base 1e6 with linear scaling 8; local layers: base 1e4
        assert key("rope.freq_base_swa") == 10000.0 and key("rope.scaling.factor") == 8.0
        assert key("rope.scaling.type") == "linear"
    if arch.startswith("phi"):  # fused projections stay fused
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.ffn_gate.weight" not in names
    if arch == "phi4-mini":
        assert key("rope.dimension_count") == 12  # partial rotary: 0.75 of head_dim 16
    if arch == "olmo2":  # post-norm layers: no pre-norm tensors
        assert {"blk.2.post_attention_norm.weight", "blk.2.post_ffw_norm.weight"} <= names
        assert not any(n.endswith(("attn_norm.weight", "ffn_norm.weight")) for n in names)


@pytest.mark.parametrize("arch, gguf_arch, block, projections", [
    ("mixtral", "llama", "block_sparse_moe", ("w1", "w3", "w2")),
    ("qwen3-moe", "qwen3moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
])
def test_gguf_mixtures_of_experts(arch, gguf_arch, block, projections, tmp_path):
    """Each layer's per-expert weights as llama.cpp's 3-D ``ffn_{gate,up,down}_exps`` (experts stacked in order),
    the router as ``ffn_gate_inp``, the expert counts and width in the metadata; every name one the gguf package
    lists for the architecture."""
    from _hf import hf_model
    from _tokfixtures import build_bpe_folder

    folder = tmp_path / arch
    hf_model(arch, vocab_size=640, **LLAMA_CPP_CONFIGS[arch]).save_pretrained(folder)
    build_bpe_folder(folder)
    reader = gguf.GGUFReader(export(folder, tmp_path / "moe.gguf", "gguf"))
    model = load_pretrained(folder)
    moe = model.config.moe
    assert _field(reader, f"{gguf_arch}.expert_count") == moe.num_experts
    assert _field(reader, f"{gguf_arch}.expert_used_count") == moe.top_k
    assert _field(reader, f"{gguf_arch}.expert_feed_forward_length") == moe.intermediate_size
    got = _tensors(reader)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch]
    valid = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_enum]}
    assert all(re.sub(r"^blk\.\d+\.", "blk.{bid}.", n.rsplit(".", 1)[0]) in valid for n in got)
    assert not any(".experts." in n or "ffn_gate.weight" in n for n in got)
    layers = model.params["model"]["layers"]
    for i in range(model.config.num_layers):
        node = layers[str(i)][block]
        assert torch.equal(got[f"blk.{i}.ffn_gate_inp.weight"], node["gate"]["weight"])
        for proj, name in zip(projections, ("gate", "up", "down")):
            stacked = torch.stack([node["experts"][str(e)][proj]["weight"] for e in range(moe.num_experts)])
            assert torch.equal(got[f"blk.{i}.ffn_{name}_exps.weight"], stacked), (i, name)


def test_gguf_sentencepiece_and_tiktoken_tokenizers(tmp_path):
    from _hf import hf_model
    from _tokfixtures import build_sentencepiece_folder, build_tiktoken_folder

    # sentencepiece tokenizer.model -> "llama" with scores and types.
    folder = tmp_path / "spm"
    hf_model("llama2", vocab_size=768).save_pretrained(folder)
    build_sentencepiece_folder(folder)
    reader = gguf.GGUFReader(export(folder, tmp_path / "spm.gguf", "gguf"))
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens, scores = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert _field(reader, "tokenizer.ggml.model") == "llama" and len(tokens) == 768
    for i in range(sp.get_piece_size()):
        assert tokens[i] == sp.id_to_piece(i)
        # tokenizer_config.json's added_tokens_decoder (<unk>, <s>, </s>) makes them control tokens of score
        # -1000, as llama.cpp's convert script does; the others keep their sentencepiece score.
        assert scores[i] == pytest.approx(-1000.0 if i < 3 else sp.get_score(i))
    assert types[0] == types[1] == types[2] == gguf.TokenType.CONTROL
    assert tokens[700:] == [f"[PAD{i}]" for i in range(700, 768)] or sp.get_piece_size() < 700
    assert types[3] == gguf.TokenType.BYTE  # <0x00>, byte fallback
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1 and _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True

    # Llama 3 tiktoken tokenizer.model -> "gpt2": merges rebuilt from the ranks, 256 specials after them.
    folder = tmp_path / "tiktoken"
    hf_model("llama3.1", vocab_size=1024).save_pretrained(folder)
    build_tiktoken_folder(folder)
    reader = gguf.GGUFReader(export(folder, tmp_path / "tt.gguf", "gguf"))
    tokens, merges = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type")
    n = sum(1 for line in (folder / "tokenizer.model").read_text().splitlines() if line.strip())
    assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert len(merges) == n - 256
    for i, merge_ in enumerate(merges):  # each merge concatenates to the token of the next rank
        assert merge_.replace(" ", "") == tokens[256 + i]
    assert tokens[n] == "<|begin_of_text|>" and types[n] == gguf.TokenType.CONTROL
    assert _field(reader, "tokenizer.ggml.bos_token_id") == n
    assert _field(reader, "tokenizer.ggml.eos_token_id") == n + 9  # <|eot_id|>


# llama.cpp (n_threads=1) against ft-prog's fp32 logits: the largest difference allowed for an fp32 export with an
# f32 KV cache and for an fp16 export with llama.cpp's default f16 KV cache (f16 weights, and activations rounded to
# f16 in llama.cpp's f16 matmul). Max |logit| is 0.3 to 1; measured max abs differences in the comments
# (fp32 / fp16). Gemma's fp32 bound is wider because ggml's CPU GELU reads an fp16 table (GGML_GELU_FP16): the GeGLU
# output carries f16 rounding even in an fp32 model. Phi-3's LongRoPE (factors up to 5, attention factor 1.15)
# sharpens the attention further, so its few float ulps of RoPE differences show a little more.
LLAMA_CPP_BOUNDS = {
    "llama3.1": (1e-6, 1.5e-3),  # 4.2e-7 / 8.4e-4
    "qwen3": (1e-6, 1.5e-3),  # 3.3e-7 / 3.8e-4
    "gemma2": (5e-4, 1.5e-3),  # 1.6e-4 / 5.7e-4 (GELU table)
    "gemma3": (1e-3, 2.5e-3),  # 3.5e-4 / 1.2e-3 (GELU table)
    "phi3": (4e-6, 5e-3),  # 1.7e-6 / 2.3e-3 (LongRoPE)
    "phi4-mini": (4e-6, 5e-3),  # 1.6e-6 / 2.9e-3 (LongRoPE)
    "olmo2": (1e-6, 1.5e-3),  # 6.2e-7 / 7.0e-4
    "smollm3": (1e-6, 1.5e-3),  # 5.7e-7 / 9.1e-4
    "mixtral": (1e-6, 1.5e-3),  # 5.4e-7 / 9.4e-4
    "qwen3-moe": (1e-6, 1.5e-3),  # 3.0e-7 / 5.2e-4
}


@pytest.mark.parametrize("arch", list(LLAMA_CPP_BOUNDS))
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gguf_runs_in_llama_cpp(arch, dtype, tmp_path):
    """llama.cpp itself (llama-cpp-python, when installed) computes our logits and our tokenization."""
    llama_cpp = optional_oracle("llama_cpp", ORACLES)
    from _hf import hf_model
    from _tokfixtures import build_bpe_folder

    hf = hf_model(arch, vocab_size=640, max_position_embeddings=256, **LLAMA_CPP_CONFIGS.get(arch, {}))
    c = hf.config
    q_k_rows = (c.num_attention_heads + c.num_key_value_heads) * (getattr(c, "head_dim", None)
                                                                  or c.hidden_size // c.num_attention_heads)
    with torch.no_grad():  # sharp attention, so that a wrong RoPE layout would show
        for name, p in hf.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10)
            elif name.endswith("qkv_proj.weight"):
                p[:q_k_rows].mul_(10)
    # A folder (so general.name) without "phi" in it: llama.cpp then looks up Phi-3's <|end|>, which the tiny
    # tokenizer lacks.
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    build_bpe_folder(folder)
    path = export(folder, tmp_path / "m.gguf", "gguf", dtype=dtype)
    kv = llama_cpp.GGML_TYPE_F32 if dtype == "fp32" else None  # None: llama.cpp's default (f16)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=kv, type_v=kv)
    # 32 tokens: past Phi-3's original context (8), where both ft-prog and llama.cpp (n_ctx 64) take the long factors
    ids = torch.randint(0, 600, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]))
    model = load_pretrained(folder)
    assert model.dtype == torch.float32
    want = model(torch.tensor([ids]))[0].detach()
    print(f"{arch} {dtype}: max |logit| {want.abs().max():.3g}, max abs difference {(got - want).abs().max():.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=LLAMA_CPP_BOUNDS[arch][dtype == "fp16"])
    text = "Hello, world! <|im_start|>user\nThe quick brown fox 2024.<|im_end|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == load_tokenizer(folder).encode(text)


def test_gguf_of_the_demo_model(tmp_path, monkeypatch):
    from ftprog.programs.demo_assets import resolve

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export("builtin:demo-model", tmp_path / "demo.gguf", "gguf")
    assert not [w for w in caught if "pre-tokenizer" in str(w.message)]
    reader = check_gguf(path, load_pretrained(resolve("builtin:demo-model")), torch.float32, "llama")
    # A byte-level vocabulary without merges: one inert merge keeps llama.cpp (which needs the key) loading it.
    assert _field(reader, "tokenizer.ggml.merges") == ["\u0100 \u0100"]
    assert _field(reader, "tokenizer.ggml.pre") == "default"


def test_gguf_refusals(tmp_path):
    from _hf import hf_model
    from _tokfixtures import build_bpe_folder

    for arch in ("mistral-window", "qwen2-window"):
        folder = tmp_path / arch
        hf_model(arch).save_pretrained(folder)
        with pytest.raises(ExportError, match="sliding-window"):
            export(folder, tmp_path / "w.gguf", "gguf")
    # What llama.cpp's graph of a family computes differently is refused before the weights load, naming
    # model_type and the difference (the _hf.ARCHS defaults; LLAMA_CPP_CONFIGS holds their exportable variants).
    graph = "which llama.cpp's '{}' graph does not represent"
    for arch, overrides, message in [
        ("gemma2", {}, r"model_type 'gemma2' has attention scale 0.204124 \(query_pre_attn_scalar 24; llama.cpp "
                       r"takes 32\), " + graph.format("gemma2")),
        ("gemma2", {"query_pre_attn_scalar": 32, "attn_logit_softcapping": None},
         r"'gemma2' has no attention or no final soft-capping \(llama.cpp always caps both\)"),
        ("phi3", {}, r"model_type 'phi3' has sliding-window attention \(window 6\), " + graph.format("phi3")),
        ("smollm3", {"attention_bias": False}, r"model_type 'smollm3' has layers without RoPE \[1, 3\] \(llama.cpp: every 4th\)"),
        ("smollm3", {"no_rope_layer_interval": 4}, r"model_type 'smollm3' has qkv/o projection biases"),
        ("olmo2", {"attention_bias": True}, r"model_type 'olmo2' has qkv/o projection biases"),
        ("qwen3", {"attention_bias": True},
         r"model_type 'qwen3' has qkv/o projection biases"),
        ("qwen3-moe", {}, r"model_type 'qwen3_moe' has dense layers among its sparse ones \(sparse: \[0, 2\]\), "
         + graph.format("qwen3moe")),
        ("qwen3-moe", {"mlp_only_layers": [], "norm_topk_prob": False},
         r"'qwen3_moe' does not renormalise its top-k routing weights \(norm_topk_prob false\)"),
        ("llama2", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                        "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}},
         r"model_type 'llama' has longrope RoPE scaling, " + graph.format("llama")),
    ]:
        folder = tmp_path / f"{arch}-refused"
        hf_model(arch, **overrides).save_pretrained(folder)
        with pytest.raises(ExportError, match=message):
            export(folder, tmp_path / "r.gguf", "gguf")
    folder = tmp_path / "notok"
    hf_model("llama2").save_pretrained(folder)
    with pytest.raises(ExportError, match="needs the model's tokenizer"):
        export(folder, tmp_path / "n.gguf", "gguf")
    folder = tmp_path / "small-vocab"
    hf_model("llama2").save_pretrained(folder)  # vocab_size 96 < the tokenizer's 603 ids
    build_bpe_folder(folder)
    with pytest.raises(ExportError, match="vocab_size is 96"):
        export(folder, tmp_path / "s.gguf", "gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_gguf_tensor_names_come_from_the_gguf_name_map(llama):
    folder, _, _ = llama
    config = read_config(folder)
    assert config.num_layers == 2
    assert gguf_tensor_name("model.layers.1.self_attn.q_proj.weight", config) == "blk.1.attn_q.weight"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.bias", config) == "blk.0.ffn_down.bias"
    assert gguf_tensor_name("model.embed_tokens.weight", config) == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight", config) == "output.weight"
    with pytest.raises(ExportError, match=r"no GGUF name for tensor 'model.layers.0.self_attn.q_norm.weight' in "
                                          r"llama.cpp's 'llama' architecture"):
        gguf_tensor_name("model.layers.0.self_attn.q_norm.weight", config)  # only qwen3 has q/k norms
    with pytest.raises(ExportError, match="no GGUF name for tensor 'model.layers.2.mlp.up_proj.weight'"):
        gguf_tensor_name("model.layers.2.mlp.up_proj.weight", config)  # no third layer


def test_llama_permutation_turns_half_split_rope_into_pairwise_rope():
    """Why Q/K are permuted: llama.cpp's llama graph rotates adjacent pairs (GGML rope mode 0), HF the two halves."""
    from ftprog.core._decoder import apply_rope
    from ftprog.programs.export import llama_permute

    n_head, head_dim, hidden, seq = 3, 8, 12, 5
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n_head * head_dim, hidden, generator=g), torch.randn(seq, hidden, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(seq).float()[:, None] * inv_freq  # [seq, head_dim / 2]
    # Hugging Face: rotate (x[i], x[i + d/2]) by angle i.
    emb = torch.cat((angles, angles), -1)
    q_hf = apply_rope((x @ w.T).view(1, seq, n_head, head_dim).transpose(1, 2), emb.cos()[None], emb.sin()[None])
    q_hf = q_hf[0].transpose(0, 1)  # [seq, heads, head_dim]
    # llama.cpp (rope mode 0) on the permuted weight: rotate (x[2i], x[2i + 1]) by angle i.
    q = (x @ llama_permute(w, n_head).T).view(seq, n_head, head_dim // 2, 2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    q_cpp = torch.stack((q[..., 0] * cos - q[..., 1] * sin, q[..., 0] * sin + q[..., 1] * cos), -1)
    # The same rotated vectors, in llama.cpp's interleaved order: attention scores are identical.
    want = llama_permute(q_hf.reshape(seq, -1).T, n_head).T.reshape(seq, n_head, head_dim)
    torch.testing.assert_close(q_cpp.flatten(-2), want)


def test_llama3_rope_factors_match_the_forward():
    from ftprog.core import ModelConfig

    config = ModelConfig.from_hf({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 8, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}})
    base = 1.0 / (config.rope_theta ** (torch.arange(0, 128, 2).float() / 128))
    factors = llama3_rope_factors(config)
    assert factors[0] == 1.0 and factors[-1] == 32.0
    torch.testing.assert_close(base / factors, rope_inv_freq(config.rotary), rtol=1e-5, atol=0)


def test_gguf_from_a_quantized_checkpoint_is_dequantized(llama, tmp_path):
    from ftprog.transforms import load_quantized, save_quantized

    folder, _, _ = llama
    qfolder = save_quantized(quantize(load_pretrained(folder), "int8"), tmp_path / "q")
    path = export(qfolder, tmp_path / "q.gguf", "gguf")
    check_gguf(path, load_merged(qfolder), torch.float32, "llama")
    dense = flatten(load_merged(qfolder).params)["model.layers.0.mlp.up_proj.weight"]
    q = flatten(load_quantized(qfolder).params)["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(dense, q.dequantize())


# ---------------------------------------------------------------------------------------------- executorch


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from _hf import hf_model

    folder = tmp_path_factory.mktemp("et") / "m"
    hf_model("llama2", num_hidden_layers=1).save_pretrained(folder)  # one layer: lowering takes a while
    return folder


def test_exported_program_equals_eager_for_any_length(small):
    model = load_pretrained(small)
    program = export_program(model, max_seq_len=64)
    module = program.module()
    for length in (2, 7, 33, 64):
        tokens = torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(length))
        torch.testing.assert_close(module(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="max_seq_len"):
        export_program(model, max_seq_len=1)


def test_executorch_without_the_package_writes_pt2_and_says_so(small, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "executorch_available", lambda: False)
    with pytest.warns(UserWarning, match=r"executorch package is not installed.*pip install ft-prog\[executorch\]"):
        path = export(small, tmp_path / "out.pte", "executorch", max_seq_len=32)
    assert path == tmp_path / "out.pt2" and path.is_file() and not (tmp_path / "out.pte").exists()
    program = torch.export.load(path)
    model = load_pretrained(small)
    tokens = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(program.module()(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_executorch_pte_runs_in_the_runtime(small, tmp_path):
    Runtime = optional_oracle("executorch.runtime", ORACLES).Runtime

    folder = small
    adapter = _adapter(folder, tmp_path / "adapter", targets=("q_proj", "v_proj"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export(folder, tmp_path / "out", "executorch", adapter=adapter, max_seq_len=48)
    assert path == tmp_path / "out" / "model.pte" and (tmp_path / "out" / "model.pt2").is_file()
    method = Runtime.get().load_program(path).load_method("forward")
    adapted = load_adapter(load_pretrained(folder), adapter)
    for length in (2, 9, 48):
        tokens = torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(length))
        out = method.execute([tokens])[0]
        # fp32 throughout; max |logit| about 0.6, measured max abs difference 2.7e-7 (length 48)
        torch.testing.assert_close(out, adapted(tokens), rtol=0, atol=1e-6)
    assert read_config(folder).vocab_size == out.shape[-1]
