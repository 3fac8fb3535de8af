"""Hugging Face model folders: ``config.json`` + safetensors (single file or sharded).

Loading reads tensor by tensor from memory-mapped files, so two full copies
of the weights never coexist; anything missing, unexpected, mis-shaped or
corrupt is an error that names the file and the tensor. Saving is atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import _tree
from ._config import ModelConfig
from ._linear import dense_weight
from ._model import Model, make_model, param_shapes

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a model folder may carry beside its weights; copied along on save.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json", "merges.txt",
    "added_tokens.json",
)
# Buffers some exporters write that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Where a multimodal checkpoint (Gemma3ForConditionalGeneration) keeps its language model, by the transformers
# version that saved it: stored prefix -> ft-prog's. Checkpoints on the Hub and transformers 5 use the first,
# transformers 4.50-4.57 the second.
_LANGUAGE_MODEL_PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                            "model.language_model.": "model."}
# ...and the parts of it that are not the language model (left out when loading).
_NON_LANGUAGE_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector.")


class CheckpointError(ValueError):
    """A model folder that cannot be loaded as it is."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Parse ``path/config.json`` into a :class:`ModelConfig`."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json in the model folder")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(raw, source=str(config_file))


def _weight_map(folder: Path) -> dict[str, Path]:
    """``{tensor name: file}`` from the index, or from the single safetensors file."""
    if (folder / "ft-prog-quantization.json").is_file():
        raise CheckpointError(f"{folder}: an ft-prog quantized checkpoint; load it with "
                              "ftprog.transforms.load_quantized(path) (generate and eval do)")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        for name, file in mapping.items():
            relative = os.path.normpath(str(file))
            if not isinstance(file, str) or os.path.isabs(relative) or relative == os.pardir or \
                    relative.startswith(os.pardir + os.sep):
                raise CheckpointError(f"{index}: tensor {name!r} is mapped to {file!r}, which is outside the model "
                                      "folder; refusing to read it")
        files = {name: folder / file for name, file in mapping.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{index} names {file.name}, which is missing from {folder}")
        return files
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return {name: single for name in _open(single).keys()}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder}: only pickle weights (.bin/.pth) found; ft-prog never unpickles weights. "
            "Convert them to safetensors first, or download the safetensors variant."
        )
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> Model:
    """Load a Hugging Face model folder into a :class:`Model` (every leaf trainable).

    Args:
        path: folder with config.json and model.safetensors or sharded files + index.
        dtype: cast floating tensors to this dtype (default: as stored).
        device: where the tensors go (default: CPU).
    """
    folder = Path(path)
    config = read_config(folder)
    dtype = as_dtype(dtype)
    expected = param_shapes(config)
    files, stored = language_model_tensors(_weight_map(folder), folder)
    present = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters also write the tied copy
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r} "
            f"(expected in {files[next(iter(files))].name if files else WEIGHTS_FILE}); "
            "refusing to initialise them randomly"
        )
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{folder}: unexpected tensor {unexpected[0]!r} in {files[unexpected[0]].name} "
            f"({len(unexpected)} in all) for model_type {config.model_type!r}; is config.json for these weights?"
        )
    flat: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        handle = _open(file)
        with handle:
            for name in names:
                try:
                    tensor = handle.get_tensor(stored.get(name, name))
                except (SafetensorError, OSError, ValueError) as e:
                    raise CheckpointError(f"{file}: cannot read tensor {stored.get(name, name)!r} ({e})") from None
                if tuple(tensor.shape) != expected[name]:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {expected[name]}"
                    )
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                flat[name] = tensor.to(device) if device is not None else tensor
    params = _tree.unflatten({n: flat[n] for n in expected})
    return make_model(config, params, source=str(folder.resolve()))


def language_model_tensors(files: dict[str, Path], folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """``files`` (``{stored name: file}``) keyed by ft-prog's names, and ``{ft-prog name: stored name}`` where
    they differ: a multimodal checkpoint's language model (``language_model.model.*`` or
    ``model.language_model.*``) becomes ``model.*``; its vision tower and projector are left out, with a note."""
    if not any(name.startswith(tuple(_LANGUAGE_MODEL_PREFIXES)) for name in files):
        return files, {}
    renamed, stored, left_out = {}, {}, 0
    for name, file in files.items():
        prefix = next((p for p in _LANGUAGE_MODEL_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            ours = _LANGUAGE_MODEL_PREFIXES[prefix] + name[len(prefix):]
            renamed[ours], stored[ours] = file, name
        elif name.startswith(_NON_LANGUAGE_PREFIXES):
            left_out += 1
        else:
            renamed[name] = file
    if left_out:
        warnings.warn(f"{folder}: a multimodal checkpoint; loaded its language model only, {left_out} vision "
                      "tower/projector tensors were left out", stacklevel=3)
    return renamed, stored


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def checkpoint_tensors(model: Model) -> dict[str, torch.Tensor]:
    """The tensors a plain HF checkpoint of ``model`` holds (quantized weights dequantized).

    Adapters must be merged first (``ftprog.transforms.merge``): an adapter leaf is an error.
    """
    flat = _tree.flatten(model.params)
    extra = [p for p in flat if p not in param_shapes(model.config)]
    if extra:
        raise ValueError(
            f"the model holds non-checkpoint tensors such as {extra[0]!r}: merge adapters first "
            "(ftprog.transforms.merge) or save them with save_adapter"
        )
    out = {}
    for path, tensor in flat.items():
        if _tree.is_quantized(tensor):
            tensor = dense_weight({"weight": tensor}, model.dtype)
        out[path] = tensor.detach().contiguous()
    return out


def save_pretrained(model: Model, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` as a Hugging Face folder (config.json, safetensors, tokenizer files).

    Shards above ``max_shard_size`` bytes (int, or "500MB", "2GiB") with a
    ``model.safetensors.index.json``. Tied embeddings are written once, as
    transformers expects. Atomic: a temporary sibling folder is filled and then
    renamed, so an interrupted save never leaves a complete-looking folder and
    an existing folder is replaced only once the new one is whole.
    """
    target = Path(path)
    tensors = checkpoint_tensors(model)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    with atomic_folder(target) as tmp:
        config = model.config.to_hf()
        config["dtype"] = config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        copy_tokenizer_files(model.source, tmp)
    return target


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary sibling folder that replaces ``path`` only when the block succeeds.

    An interrupted or failed write leaves no complete-looking folder and the
    previous ``path`` (if any) untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(source: str | os.PathLike | None, folder: Path) -> None:
    """Copy the tokenizer / generation files of model folder ``source`` (if any) into ``folder``."""
    if not source:
        return
    for name in TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file():
            shutil.copy2(src, folder / name)


def recover_interrupted_swaps(parent: Path, names: Iterable[str]) -> list[str]:
    """Finish what a killed :func:`atomic_folder` / :func:`_replace_dir` left in ``parent`` for folders ``names``.

    A ``.NAME.old-PID`` whose ``NAME`` is missing is the previous folder, moved aside just before the kill:
    it is moved back. Other ``.NAME.old-*`` (already replaced) and ``.NAME.tmp-*`` (never swapped in) folders
    are removed. Only call it where no other process writes ``names`` (e.g. under a run's lock). Returns
    what was done, one line each.
    """
    done = []
    for name in names:
        for leftover in sorted(parent.glob(f".{name}.old-*")):
            if not (parent / name).exists():
                os.replace(leftover, parent / name)
                done.append(f"restored {name} from {leftover.name} (a replacement was interrupted)")
            else:
                shutil.rmtree(leftover, ignore_errors=True)
                done.append(f"removed {leftover.name}, left by an interrupted replacement of {name}")
        for leftover in sorted(parent.glob(f".{name}.tmp-*")):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {leftover.name}, an incomplete {name} of an interrupted save")
    return done


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder ``new`` to ``target``; an old ``target`` is removed only after the swap.

    Files get the usual 0644 / folders 0755 (temporary folders and some writers create 0600 / 0700).
    """
    os.chmod(new, 0o755)
    for path in new.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)

