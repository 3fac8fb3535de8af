"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

ft-prog's adapter leaves already carry PEFT's names (``...q_proj.lora_A.weight``,
``...lora_B.weight``, ``...lora_magnitude_vector``); in the file they get PEFT's
``base_model.model.`` prefix. Which modules are adapted is written the way PEFT
reads it back exactly: a list of module names, the same plus
``layers_to_transform``, or a regex over full module names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core import Model, flatten, is_quantized, linear_paths
from ..core._checkpoint import atomic_folder

from ._base import check_order
from ._lora import ALL_LINEAR, has_adapters, lora, lora_spec, resolve_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
# LoraConfig fields that change what the adapter computes and that ft-prog does not implement.
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "target_parameters",
               "trainable_token_indices", "lora_bias", "fan_in_fan_out", "use_qalora", "alora_invocation_tokens",
               "kasa_config", "monteclora_config", "use_bdlora", "arrow_config")


def _layer_index(path: str, layers_pattern) -> int | None:
    """The layer number in ``path`` as PEFT finds it (the first numbered segment)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path) for p in patterns)), None)
    return int(match["idx"]) if match else None


def _peft_selects(path: str, cfg: dict) -> bool:
    """Whether PEFT puts an adapter on module ``path`` (peft.tuners.tuners_utils.check_target_module_exists)."""
    exclude = cfg.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, path) if isinstance(exclude, str)
                    else path in exclude or any(path.endswith(f".{e}") for e in exclude)):
        return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if path in targets:
        return True
    if not any(path.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(path, cfg.get("layers_pattern"))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def _target_config(model: Model, paths: list[str]) -> dict:
    """``target_modules`` (and ``layers_to_transform``) that make PEFT adapt exactly ``paths``."""
    candidates = linear_paths(model.config)
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    layers = sorted({i for p in paths if (i := _layer_index(p, None)) is not None})
    for cfg in ({"target_modules": names, "layers_to_transform": None},
                {"target_modules": names, "layers_to_transform": layers},
                {"target_modules": "|".join(map(re.escape, paths)), "layers_to_transform": None}):
        if {p for p in candidates if _peft_selects(p, cfg)} == set(paths):
            return cfg
    raise AssertionError(f"no PEFT target_modules reproduces {paths}")  # the regex above always does


def _adapter_tensors(model: Model) -> dict[str, torch.Tensor]:
    flat = flatten(model.params)
    return {p: t for p, t in flat.items() if p.endswith(SUFFIXES)}


def save_adapter(model: Model, path: str | os.PathLike) -> Path:
    """Write ``model``'s adapters as a PEFT folder that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        model: a model with adapters (``ftprog.transforms.lora``).
        path: the folder to write (replaced atomically if it exists).

    Returns:
        The folder path.

    Example:
        >>> save_adapter(lora(model, rank=8, alpha=16), "out/adapter")  # doctest: +SKIP
    """
    spec = lora_spec(model)
    tensors = _adapter_tensors(model)
    if spec is None or not tensors:
        raise ValueError("save_adapter: the model has no adapters (apply ftprog.transforms.lora first)")
    adapted = [p[: -len(".lora_A.weight")] for p in tensors if p.endswith(".lora_A.weight")]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model.source, "revision": None,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        **_target_config(model, adapted), "layers_pattern": None, "exclude_modules": None,
        "use_dora": any(p.endswith(".lora_magnitude_vector") for p in tensors), "use_rslora": spec.rslora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True,
    }
    target = Path(path)
    with atomic_folder(target) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({PREFIX + p: t.detach().contiguous() for p, t in tensors.items()},
                  str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return target


def _read_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no {CONFIG_FILE} in the adapter folder")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters (LoRA, DoRA) load")
    for key in UNSUPPORTED:
        if cfg.get(key) not in (None, False, {}, []):
            raise ValueError(f"{file}: {key}={cfg[key]!r} is not supported by ft-prog")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={cfg['bias']!r} is not supported by ft-prog (only 'none')")
    if not cfg.get("target_modules"):
        raise ValueError(f"{file}: target_modules is missing")
    if not isinstance(cfg.get("r"), int):
        raise ValueError(f"{file}: r is missing or not an integer")
    return cfg


def _lora_targets(model: Model, paths: list[str]) -> tuple[str, ...]:
    """Targets for :func:`lora` selecting exactly ``paths``: names where a name covers all layers, else globs."""
    by_name: dict[str, list[str]] = {}
    for p in paths:
        by_name.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    every = linear_paths(model.config)
    targets = []
    for name, chosen in by_name.items():
        if chosen == [p for p in every if p.rsplit(".", 1)[-1] == name]:
            targets.append(name)
        else:  # one glob per layer: model.layers.3.*.q_proj
            targets += [".".join(p.split(".")[:3]) + f".*.{name}" for p in chosen]
    assert resolve_targets(model, targets) == paths, (targets, paths)
    return tuple(targets)


def _shape_error(weights: Path, key: str, got, want, suffix: str = "", r: int | None = None) -> ValueError:
    """A rank that is not the config's r, or else a tensor for another base model."""
    rank_dim = {".lora_A.weight": 0, ".lora_B.weight": 1}.get(suffix)
    if rank_dim is not None and len(got) == 2 and got[1 - rank_dim] == want[1 - rank_dim]:
        return ValueError(f"{weights}: tensor {key!r} has rank {got[rank_dim]} but {CONFIG_FILE} says r={r}")
    return ValueError(f"{weights}: tensor {key!r} has shape {tuple(got)}, the model needs {tuple(want)}: "
                      "wrong base model?")


def load_adapter(model: Model, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Model:
    """Put the PEFT LoRA/DoRA adapter in folder ``path`` on base ``model``.

    Reads folders written by :func:`save_adapter` or by PEFT's ``save_pretrained``
    (``target_modules`` as a list, a regex or ``"all-linear"``, ``layers_to_transform``,
    ``exclude_modules``, DoRA, rsLoRA). With an adapter on ``lm_head`` PEFT also saves
    the base ``lm_head.base_layer.weight`` and loads it over the base's: so do we.
    Anything that would not reproduce PEFT's model exactly is an error naming
    the file and the tensor.

    Args:
        model: the base model (without adapters) the adapter was trained on.
        path: the adapter folder.
        dtype: dtype of the adapter leaves (fp32 by default, as PEFT).

    Returns:
        ``lora(model, ...)`` with the saved tensors in; the adapter leaves are trainable.
    """
    check_order(model, "load_adapter")
    if has_adapters(model):
        raise ValueError("load_adapter: the model already has adapters; merge them first (ftprog.transforms.merge)")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    cfg = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        bin_only = (folder / "adapter_model.bin").exists()
        why = " (only adapter_model.bin, and ft-prog never unpickles weights)" if bin_only else ""
        raise FileNotFoundError(f"{weights}: no {WEIGHTS_FILE} in the adapter folder{why}")

    candidates = linear_paths(model.config)
    targets = cfg["target_modules"]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:  # PEFT expands it to full names, minus lm_head
        cfg = {**cfg, "target_modules": resolve_targets(model, ALL_LINEAR)}
    paths = [p for p in candidates if _peft_selects(p, cfg)]
    if not paths:
        raise ValueError(f"{folder / CONFIG_FILE}: target_modules {targets!r} match no linear layer of the model")
    adapted = lora(model, rank=cfg["r"], alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0),
                   targets=_lora_targets(model, paths), dora=bool(cfg.get("use_dora")),
                   rslora=bool(cfg.get("use_rslora")), dtype=dtype)
    base = flatten(model.params)
    expected = {p: t for p, t in flatten(adapted.params).items() if p in adapted.trainable}

    try:
        handle = safe_open(str(weights), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    loaded = {}
    with handle:
        for key in handle.keys():
            name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
            if key.startswith(PREFIX) and name in base:
                # PEFT saves the base lm_head / embed_tokens with adapters on them, and loads them back over the base.
                tensor, want = handle.get_tensor(key), base[name]
                if tensor.shape != want.shape:
                    raise _shape_error(weights, key, tensor.shape, want.shape)
                if not torch.equal(tensor.to(want.dtype), want):
                    if is_quantized(want):
                        raise ValueError(f"{weights}: tensor {key!r} replaces a quantized base weight; not supported")
                    loaded[name] = tensor.to(dtype=want.dtype, device=want.device)
                continue
            suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
            if not key.startswith(PREFIX) or suffix is None:
                raise ValueError(f"{weights}: unexpected tensor {key!r} (not a LoRA/DoRA adapter weight)")
            module = name[: -len(suffix)]
            if module not in candidates:
                hint = " (lm_head is tied to the embeddings here)" if module == "lm_head" else ""
                raise ValueError(f"{weights}: tensor {key!r} is for module {module!r}, which the model does not "
                                 f"have{hint}: wrong base model?")
            if name not in expected:
                why = "use_dora is false" if suffix == ".lora_magnitude_vector" else "target_modules does not select it"
                raise ValueError(f"{weights}: unexpected tensor {key!r} ({why} in {CONFIG_FILE})")
            tensor, want = handle.get_tensor(key), expected[name]
            if tensor.shape != want.shape:
                raise _shape_error(weights, key, tensor.shape, want.shape, suffix, cfg["r"])
            loaded[name] = tensor.to(dtype=want.dtype, device=want.device)
    missing = [p for p in expected if p not in loaded]
    if missing:
        raise ValueError(f"{weights}: missing tensor {PREFIX + missing[0]!r} ({len(missing)} in all) for a module "
                         f"that {CONFIG_FILE} targets")
    return adapted.with_params(loaded)
