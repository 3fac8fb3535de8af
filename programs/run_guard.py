"""What keeps a program's outputs safe: nothing lost, nothing mixed.

Reusable by every program that trains (sft; later dpo, grpo, distill) or writes a folder the user names:

- :func:`exclusive_output_dir`: one run per output folder (an OS lock, released however the holder ends).
- :func:`stop_between_steps`: Ctrl-C, SIGTERM and SIGUSR1 (what clusters send before a kill) ask the loop to
  checkpoint after the current step and exit; :class:`SaveClock`: a checkpoint every N minutes.
- :class:`ResumeRules` / :func:`check_resume`: a resumed run never silently mixes settings.
- :func:`check_output`: an output never replaces its own source, nor anything without an explicit overwrite.

Failures are :class:`RunError`: one message that says what, where and what to do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from . import distributed


class RunError(RuntimeError):
    """A run that cannot start or go on as configured; the message says what, where and what to do."""


# ---------------------------------------------------------------------------------------------- the lock

LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive_output_dir(folder: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.lock`` (creating the folder) for the block; ``enabled=False``: no-op.

    A second run into the same folder is refused with the holder's PID and host. The lock is ``flock(2)``:
    the OS releases it when the holder ends in any way (SIGKILL included), so a leftover lock file means
    nothing and needs no cleanup. Multi-process runs take it on rank 0 only.
    """
    if not enabled:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot write to output_dir {folder}: {e.strerror or e}; choose an output_dir you can "
                       "write to") from None
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a run that is starting"
        os.close(fd)
        raise RunError(f"output_dir {folder} is in use by another run ({holder}); wait for it to end, or use "
                       "another output_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------- signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Ctrl-C; what SLURM, Kubernetes and spot-instance shutdowns send before a kill; SLURM's ``--signal``."""


class StopRequest:
    """The first stop signal received (``signal``: its number, 0 if none)."""

    def __init__(self) -> None:
        self.signal = 0


@contextlib.contextmanager
def stop_between_steps() -> Iterator[StopRequest]:
    """Within: a stop signal (:data:`STOP_SIGNALS`) only records itself in the yielded :class:`StopRequest`.

    The loop checks it between steps, so the checkpoint it then saves is consistent (a signal acted on
    mid-step could leave the optimizer moments half-updated), and exits with :func:`exit_code`. A second
    Ctrl-C aborts at once; a repeated SIGTERM/SIGUSR1 changes nothing (a launcher forwarding what the
    cluster also sent every process must not turn a save into an abort).
    """
    request = StopRequest()

    def handle(signum, frame):
        if request.signal:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        request.signal = signum
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        with contextlib.suppress(Exception):  # os.write: printing from a handler can re-enter sys.stderr's buffer
            os.write(sys.stderr.fileno(),
                     f"\n{signal.Signals(signum).name}: saving a checkpoint after this step{again}\n".encode())

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield request
        return
    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def agreed_stop(request: StopRequest) -> int:
    """The stop signal any rank received (the highest number if several; 0: none), the same on every rank."""
    return distributed.all_max(request.signal)


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by ``signum``: 130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1."""
    return 128 + signum


class SaveClock:
    """Is a checkpoint due by time? Every ``minutes`` since the last save (0: never); rank 0's clock decides."""

    def __init__(self, minutes: float, *, is_main: bool):
        self.seconds, self.is_main = minutes * 60, is_main
        self.last = time.monotonic()

    def due(self) -> bool:
        """Rank 0's answer on every rank (a collective in multi-process runs: every rank calls it each step)."""
        mine = self.is_main and self.seconds > 0 and time.monotonic() - self.last >= self.seconds
        return distributed.any_rank(mine)

    def saved(self) -> None:
        self.last = time.monotonic()


# ---------------------------------------------------------------------------------------------- resume


@attrs.frozen
class ResumeRules:
    """What a program allows to differ between a run and its resumption (dotted config keys, globs allowed).

    Every key not listed in ``may_change`` or ``not_compared`` changes what the saved state means and must
    match (the default is to refuse). ``may_change`` keys are accepted and the change is printed;
    ``not_compared`` keys are neither compared nor recorded (e.g. ``resume`` itself).
    """

    may_change: tuple[str, ...] = ()
    not_compared: tuple[str, ...] = ()


@attrs.frozen
class Change:
    """One setting that differs from the checkpoint's: ``allowed_by`` names the override that accepted it."""

    key: str
    old: Any
    new: Any
    step: int
    allowed_by: str | None = None

    def describe(self) -> str:
        text = f"{self.key}: {_show(self.old)} -> {_show(self.new)}"
        return text + (f" (allowed by {self.allowed_by})" if self.allowed_by else "")


FINGERPRINT_KEY = "data.fingerprint"
"""The pseudo config key under which the training data's fingerprint is compared."""


def data_fingerprint(dataset: Any) -> str:
    """``"<n> samples, <n> tokens, blake2b <hex>"`` of a :class:`~ftprog.core.TokenizedDataset`'s content (of the
    ``tensors()`` of a dataset that has them, such as a :class:`~ftprog.core.PreferenceDataset`).

    Hashing what the loop trains on (after reading, templating, truncation and skipping) catches a changed
    data file, Hub revision, tokenizer or filter alike; it costs one pass over memory already loaded.
    """
    digest = hashlib.blake2b(digest_size=8)
    tensors = dataset.tensors() if hasattr(dataset, "tensors") else (dataset.ids, dataset.mask, dataset.offsets)
    for t in tensors:
        digest.update(t.contiguous().cpu().numpy().view("uint8"))
    size = f", {dataset.num_tokens} tokens" if hasattr(dataset, "num_tokens") else ""
    return f"{len(dataset)} samples{size}, blake2b {digest.hexdigest()}"


def read_checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    """The resolved config a checkpoint was saved with (its ``config.toml``) as flat dotted keys."""
    file = checkpoint / "config.toml"
    try:
        return _flat(tomllib.loads(file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise RunError(f"{file}: cannot read the checkpoint's config ({e})") from None


def check_resume(checkpoint: Path, step: int, saved: Mapping[str, Any], current: Mapping[str, Any],
                 rules: ResumeRules, allow: Sequence[str] = (), allow_key: str = "resume_allow_changes"
                 ) -> list[Change]:
    """The accepted changes between the ``saved`` config of ``checkpoint`` (at ``step``) and the ``current`` one.

    Both are flat (dotted keys). Keys of ``rules.may_change``, and those the user lists in ``allow``
    (config key ``allow_key``), are accepted; any other difference raises one :class:`RunError` listing each
    key, old -> new, and the ways out. Keys only one side has (a config written by another ft-prog version)
    count as changes too.
    """
    changes, refused = [], []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key, _MISSING), current.get(key, _MISSING)
        if old == new or _matches(key, rules.not_compared):
            continue
        if _matches(key, rules.may_change):
            changes.append(Change(key, old, new, step))
        elif _matches(key, allow):
            changes.append(Change(key, old, new, step, allowed_by=allow_key))
        else:
            refused.append(Change(key, old, new, step))
    if refused:
        lines = "\n".join(f"  {c.describe()}" for c in refused)
        keys = ", ".join(json.dumps(c.key) for c in refused)
        raise RunError(f"cannot resume from {checkpoint}: {len(refused)} setting(s) differ from those it was trained "
                       f"with, and resuming would mix them into one run:\n{lines}\n"
                       f"To start over, set resume=false (removes the checkpoints in {checkpoint.parent}); to keep "
                       f"that run, use a new output_dir. (To override on purpose: {allow_key}=[{keys}].)")
    return changes


def changes_header(changes: Sequence[Mapping[str, Any]]) -> str:
    """Comment lines for a config file: the settings a resumed run changed (so it never claims a value that was
    not used for the whole run); empty when nothing changed."""
    if not changes:
        return ""
    lines = ["# This run was resumed with changed settings; the values below are the last ones used:"]
    lines += [f"#   at step {c['step']}: {Change(**c).describe()}" for c in changes]
    return "\n".join(lines) + "\n"


_MISSING = "(not set)"


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, path))
        else:
            out[path] = value
    return out


def flat_config(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config as flat dotted keys (``{"optimizer.lr": 1e-4, ...}``), as :func:`check_resume` takes it."""
    return _flat(json.loads(json.dumps(resolved)))  # tuples -> lists, as read back from TOML


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or fnmatch.fnmatchcase(key, p) or key.startswith(p + ".") for p in patterns)


def _show(value: Any) -> str:
    return value if value == _MISSING else json.dumps(value)


# ---------------------------------------------------------------------------------------------- outputs


def check_output(output: str | os.PathLike, *, sources: Iterable[str | os.PathLike | None], overwrite: bool,
                 option: str = "overwrite=true") -> None:
    """Refuse to write ``output`` over a source, or over anything that exists unless ``overwrite``.

    ``output`` may not be a source, lie inside one or hold one, even with ``overwrite`` (the source would
    be gone, or half-written over, before the output is whole). An existing file or non-empty folder is
    replaced only with ``overwrite`` (``option`` is how the user says so: ``--overwrite``, ``overwrite=true``).
    Call it before anything is loaded, so that a refusal comes at once.
    """
    target = Path(output).expanduser().resolve()
    for source in sources:
        if not source:
            continue
        src = Path(source).expanduser().resolve()
        if target == src or src in target.parents or target in src.parents:
            relation = "is" if target == src else "is inside" if src in target.parents else "holds"
            raise RunError(f"the output {output} {relation} the input {source}: writing it would destroy the input; "
                           "choose an output outside the input (and not holding it)")
    if overwrite:
        return
    path = Path(output)
    if path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir())):
        what = "a folder that is not empty" if path.is_dir() else "a file"
        raise RunError(f"the output {output} already exists ({what}); nothing was written. Choose another output, "
                       f"or pass {option} to replace it")
