"""Resumable training checkpoints: ``output_dir/step_N/`` written atomically.

A checkpoint folder holds:

- ``state.json``: step, data-loader position, tokens seen, the metrics so far, and the training data's
  fingerprint (:func:`~ftprog.programs.run_guard.data_fingerprint`);
- ``config.toml``: the resolved config of the run (a resumed run must match it: :func:`find_resume_point`);
- ``rng_<rank>.safetensors``: each process's CPU (and CUDA) generator states;

and the trained leaves with the optimizer state, in one of two formats:

- one process (plain leaves): ``model/``, a Hugging Face folder for full
  fine-tuning or a PEFT adapter folder for LoRA / DoRA / QLoRA, and
  ``optimizer.safetensors`` (the flat ``optim.state_dict``: moments and step);
- several processes (sharded DTensor leaves, see ``transforms.shard``):
  ``distributed/``, a ``torch.distributed.checkpoint`` folder: ``.metadata``
  (every tensor's global shape, dtype and where its pieces are) and one
  ``__<rank>_0.distcp`` file per rank with that rank's shards. Keys:
  ``model.<leaf path>`` for the trainable leaves and ``optimizer.<key>`` for
  the ``optim.state_dict`` entries. Each rank writes only its own shards.

Either format resumes a run with any number of processes: a ``distributed/``
checkpoint is re-sharded on load (each rank reads the pieces overlapping its
shards; one process reads them all), a ``model/`` one is split by each rank.

The folder is filled under a temporary name and renamed when every rank has
written its part, so a ``step_N`` folder that exists is whole; older ones
beyond ``keep_last`` are removed only afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..core import CheckpointError, Model, flatten, is_dtensor, load_pretrained, optim, save_pretrained
from ..core._checkpoint import _replace_dir
from ..transforms import has_adapters, load_adapter, save_adapter, save_qat_record, uncompile, unshard, without_qat
from . import distributed
from .run_guard import (
    FINGERPRINT_KEY, Change, ResumeRules, RunError, check_resume, read_checkpoint_config,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL_DIR = re.compile(r"^\.step_(\d+)\.tmp$")
SHARDED_DIR = "distributed"
"""The ``torch.distributed.checkpoint`` subfolder of a checkpoint written by sharded runs."""


def save_model(model: Model, folder: Path) -> None:
    """The trained part of ``model``: its adapter if it has one, else the whole HF model (float weights, with
    ``ft-prog-qat.json`` naming the scheme to convert to when it trained with ``qat``)."""
    if has_adapters(model):
        save_adapter(model, folder)
    else:
        save_pretrained(without_qat(model), folder)
    save_qat_record(model, folder)


def consolidate(model: Model) -> Model:
    """``model`` gathered (a collective: every rank calls it), eager: for the final evaluation and save."""
    return uncompile(unshard(model))


def _is_sharded(model: Model) -> bool:
    """True when a trainable leaf is a DTensor: checkpoints are then written sharded (``distributed/``)."""
    return any(is_dtensor(t) for t in model.trainable_params().values())


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_checkpoint(output_dir: Path, step: int, model: Model, optimizer_state: dict[str, torch.Tensor],
                    state: dict[str, Any], config_toml: str, keep_last: int) -> Path:
    """Write ``output_dir/step_{step}`` atomically, then prune to the newest ``keep_last``.

    Under torchrun every rank calls it: each writes its RNG state and, when
    the model is sharded, its own shards of the trainable leaves and of
    ``optimizer_state`` (``optim.state_dict``); rank 0 writes the rest and
    renames the folder into place once all ranks are done. A failure on any
    rank removes the partial folder and raises on every rank.
    """
    rank, sharded = _rank(), _is_sharded(model)
    target = output_dir / f"step_{step}"
    tmp = output_dir / f".step_{step}.tmp"

    def start() -> None:
        if rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def weights() -> None:
        if sharded:  # a collective: DCP re-raises one rank's failure on all of them
            import torch.distributed.checkpoint as dcp

            dcp.save(_sharded_state(model.trainable_params(), optimizer_state), checkpoint_id=tmp / SHARDED_DIR)
        elif rank == 0:
            save_model(consolidate(model), tmp / "model")
            save_file({k: v.contiguous() for k, v in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))

    def finish() -> None:
        if rank == 0:
            (tmp / "state.json").write_text(json.dumps(state))
            (tmp / "config.toml").write_text(config_toml)
            _replace_dir(tmp, target)

    error = _run_stages([start, lambda: _save_rng(tmp / f"rng_{rank}.safetensors"), weights, finish])
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoints(output_dir)
        cause = error if isinstance(error, BaseException) else None
        reason = _describe(cause) if cause is not None else "failed on another rank"
        raise RunError(f"could not save checkpoint {target} ({reason}); the earlier checkpoint "
                       f"{kept[-1] if kept else '(none)'} is untouched") from cause
    if rank == 0:
        for old in checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return target


def _run_stages(stages: list[Callable[[], None]]) -> BaseException | bool | None:
    """Run the stages in order on every rank, stopping all ranks after the first stage that failed on any
    (the ranks wait for each other after every stage).

    Returns None when all succeeded, this rank's exception, or True when only another rank failed.
    """
    for stage in stages:
        error = None
        try:
            stage()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
            error = e
        if distributed.any_rank(error is not None):
            return error or True
    return None


def _describe(error: BaseException) -> str:
    """``Type: message``; for a CheckpointException, that of each failed rank (without the tracebacks)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {rank}: {_describe(exc)}" for rank, (exc, _) in sorted(failures.items()))
    return f"{type(error).__name__}: {error}"


def _save_rng(path: Path) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(path))


def _sharded_state(params: dict[str, torch.Tensor], optimizer_state: dict[str, torch.Tensor]) -> dict:
    """The flat DCP state: ``model.<path>`` trainable leaves and ``optimizer.<key>`` state entries."""
    return {**{f"model.{p}": t for p, t in params.items()}, **{f"optimizer.{k}": t for k, t in optimizer_state.items()}}


def remove_partial(output_dir: Path) -> list[Path]:
    """Remove ``.step_N.tmp`` folders a killed save left behind (never complete: a whole one was renamed)."""
    if not output_dir.is_dir():
        return []
    partial = [p for p in output_dir.iterdir() if p.is_dir() and _PARTIAL_DIR.match(p.name)]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``step_N`` folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def newest_intact(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(the newest checkpoint that passes verify_checkpoint or None, [(damaged newer one, why), ...])``."""
    damaged = []
    for folder in reversed(checkpoints(output_dir)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            damaged.append((folder, str(e)))
            continue
        return folder, damaged
    return None, damaged


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the file if checkpoint ``folder`` is incomplete or damaged.

    Cheap (headers and sizes, no tensor data): every safetensors file must open (a 0-byte or torn file does
    not), every JSON/TOML file must parse, and a sharded checkpoint's metadata must read and its shard files
    hold what it lists.
    """
    _check_complete(folder)
    for file in sorted(folder.rglob("*")):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".toml":
                tomllib.loads(file.read_text(encoding="utf-8"))
        except (SafetensorError, OSError, ValueError) as e:  # JSON/TOML/Unicode decode errors are ValueErrors
            raise CheckpointError(f"{file}: damaged ({e})") from None
    if (folder / SHARDED_DIR / ".metadata").is_file():
        _verify_sharded(folder / SHARDED_DIR)


def _verify_sharded(path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a torn pickle raises anything
        raise CheckpointError(f"{path / '.metadata'}: damaged ({type(e).__name__}: {e})") from None
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        have = file.stat().st_size if file.is_file() else None
        if have is None or have < size:
            state = "missing" if have is None else f"{have} bytes, the metadata lists {size}"
            raise CheckpointError(f"{file}: damaged ({state})")


def _check_complete(folder: Path) -> None:
    sharded = (folder / SHARDED_DIR / ".metadata").is_file()
    if not sharded and not ((folder / "model").is_dir() and (folder / "optimizer.safetensors").is_file()):
        raise CheckpointError(f"checkpoint {folder} is incomplete: it holds neither {SHARDED_DIR}/.metadata "
                              "(several processes) nor model/ and optimizer.safetensors (one process); "
                              "remove it to resume from the one before")
    for name in ("state.json", "config.toml"):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name}; remove it to resume from the one before")


def restore(folder: Path, model: Model, base: Model, opt: Any, opt_state: Any) -> tuple[Model, Any, dict]:
    """``(model, optimizer state, state)`` resumed from checkpoint ``folder`` (see :func:`load_checkpoint`).

    Nothing returned maps the checkpoint's files: pruning them later frees their disk space.
    """
    model, saved, state = load_checkpoint(folder, model, base, optim.state_dict(opt_state))
    try:
        return model, optim.load_state_dict(opt, model.trainable_params(), saved), state  # copies `saved` (mapped)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder} does not match this run's optimizer: {e}") from None


def load_checkpoint(folder: Path, model: Model, base: Model, optimizer_state: dict[str, torch.Tensor]
                    ) -> tuple[Model, dict[str, torch.Tensor], dict]:
    """``(model, optimizer_state, state)`` from a checkpoint of either format; restores the RNG states too.

    ``model`` is the model as the program built it (all transforms applied,
    sharded or not); ``base`` the same before adapters were added;
    ``optimizer_state`` a fresh ``optim.state_dict`` of this run (it gives the
    keys, shapes, dtypes and sharding to load into; its tensors are not
    changed). The checkpoint's trained leaves (adapter or full weights) replace
    ``model``'s bit for bit, sharded as ``model``'s are; the returned optimizer
    state is in the same form (for ``optim.load_state_dict``); one process, it maps
    ``optimizer.safetensors`` (:func:`restore` copies and drops it).
    """
    _check_complete(folder)
    sharded = (folder / SHARDED_DIR / ".metadata").is_file()
    if sharded:
        model, optimizer_state = _load_sharded(folder / SHARDED_DIR, model, optimizer_state)
    else:
        if has_adapters(model):
            saved = flatten(load_adapter(base, folder / "model").params)
        else:
            saved = flatten(load_pretrained(folder / "model", device=model.device).params)
        trainable = model.trainable_params()
        wrong = [f"{p} is missing" if p not in saved else
                 f"{p} is {list(saved[p].shape)}, this run has {list(t.shape)}"
                 for p, t in trainable.items() if p not in saved or saved[p].shape != t.shape]
        if wrong:
            raise CheckpointError(f"checkpoint {folder / 'model'} does not match this run's model (another method, "
                                  f"targets, rank or model?): {'; '.join(wrong[:5])}")
        # copy=True: the loaded tensors map the checkpoint's files, which pruning deletes later
        model = model.with_params({p: _like(saved[p].to(t.dtype, copy=True), t) for p, t in trainable.items()})
        optimizer_state = _read_safetensors(folder / "optimizer.safetensors")
    rank_file = folder / f"rng_{_rank()}.safetensors"
    rng = _read_safetensors(rank_file if rank_file.is_file() else folder / "rng_0.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")])
    state = json.loads((folder / "state.json").read_text())
    return model, optimizer_state, state


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: damaged ({e})") from None


def _load_sharded(path: Path, model: Model, optimizer_state: dict[str, torch.Tensor]
                  ) -> tuple[Model, dict[str, torch.Tensor]]:
    """Trainable leaves and optimizer state from a DCP folder, re-sharded to this run's layout (any process count)."""
    import torch.distributed
    import torch.distributed.checkpoint as dcp

    params = {p: torch.empty_like(t) for p, t in model.trainable_params().items()}
    opt = {k: torch.empty_like(v) for k, v in optimizer_state.items()}
    target = _sharded_state(params, opt)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in target if k not in saved]
    unexpected = [k for k in saved if k not in target]
    wrong = [f"{k} is {saved[k].properties.dtype}{list(saved[k].size)}, this run has {t.dtype}{list(t.shape)}"
             for k, t in target.items()
             if k in saved and (saved[k].size != t.shape or saved[k].properties.dtype != t.dtype)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint {path} does not match this run's model and optimizer (another method, "
                              f"model or optimizer?): missing {missing[:5]}, unexpected {unexpected[:5]}"
                              f"{''.join('; ' + w for w in wrong[:5])}")
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it loads without a process group, as asked
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(target, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a CheckpointException on every rank when any rank failed to read
        raise CheckpointError(f"could not read checkpoint {path}: {_describe(e)}") from e
    return model.with_params(params), opt


def _like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` sharded as ``like`` is (when ``like`` is a DTensor), else as it is."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, like.device_mesh, like.placements)


# ------------------------------------------------------------------------------------------ resume decisions


@attrs.frozen
class ResumePoint:
    """Where a run continues: ``checkpoint`` (None: from scratch), the accepted config changes, and the newer
    checkpoints found damaged (``(folder, why)``), which the run removes once the model is loaded."""

    checkpoint: Path | None = None
    changes: list[Change] = attrs.field(factory=list)
    damaged: list[tuple[Path, str]] = attrs.field(factory=list)


def find_resume_point(output_dir: Path, config: dict[str, Any], data_fingerprint: str, rules: ResumeRules,
                      allow: Sequence[str], total_steps: int) -> ResumePoint:
    """Decide where a run into ``output_dir`` continues, before anything is loaded or deleted.

    The newest intact checkpoint is chosen (damaged newer ones are reported); its config and data
    fingerprint are compared with this run's (``config``: :func:`~ftprog.programs.run_guard.flat_config`)
    under ``rules`` (:func:`~ftprog.programs.run_guard.check_resume`); a run that would end before the
    checkpoint's step, or replace a finished run's ``final/`` with an earlier state, is refused. Every
    refusal is one message (:class:`RunError`) naming the folder and the ways out.
    """
    checkpoint, damaged = newest_intact(output_dir)
    if checkpoint is None and damaged:
        listed = "; ".join(why for _, why in damaged)
        raise RunError(f"no intact checkpoint to resume from in {output_dir}: {listed}. Set resume=false to start "
                       "over (removes them), or use a new output_dir")
    point = ResumePoint(checkpoint=checkpoint, damaged=damaged)
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text())
        saved, current = read_checkpoint_config(checkpoint), dict(config)
        if "data_fingerprint" in state:  # checkpoints of older versions have none
            saved[FINGERPRINT_KEY], current[FINGERPRINT_KEY] = state["data_fingerprint"], data_fingerprint
        changes = check_resume(checkpoint, state["step"], saved, current, rules, allow)
        if state["step"] > total_steps:
            raise RunError(f"this run ends at step {total_steps}, before the step of checkpoint {checkpoint} "
                           f"({state['step']}): set max_steps to at least {state['step']} to continue it, or "
                           "resume=false to start over")
        point = attrs.evolve(point, changes=changes)
    _check_finished_run(output_dir, total_steps, checkpoint)
    return point


def _check_finished_run(output_dir: Path, total_steps: int, checkpoint: Path | None) -> None:
    """Refuse to replace a finished run's ``final/`` from scratch, or with a state earlier than its own."""
    final = output_dir / "final"
    if not final.is_dir():
        return
    if checkpoint is None:
        raise RunError(f"{output_dir} holds the final model of a finished run ({final}) and no checkpoint to "
                       "continue from, so training again would replace it: use another output_dir, or "
                       "resume=false to train from scratch and replace it")
    try:
        steps = json.loads((output_dir / "summary.json").read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no summary: the final save was interrupted, so final/ is not a finished run's
    if steps > total_steps:
        raise RunError(f"{output_dir} holds a finished run of {steps} steps ({final}); this run would end at step "
                       f"{total_steps} and replace it with an earlier state: set max_steps to at least {steps}, "
                       "use another output_dir, or resume=false to start over")
