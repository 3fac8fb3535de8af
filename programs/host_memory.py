"""Which ``malloc`` an ``ft-prog`` command runs on (host memory over long runs).

Tensors on the CPU come from the C library's ``malloc``. glibc's heap fragments over a long training run: a
step's tensors vary in size (the loss's target rows, packed documents), freed blocks are split for smaller
requests, and the heap grows by tens of MiB at a time that it does not give back. Measured on a 2-layer
cpu-default full fine-tune (bf16, 4 x 256 packed, 2 threads, a busy 2-core VM): with glibc kept from trimming
(``ftprog.core.reuse_freed_memory``) the resident set grew from ~1.0 to 5.6 GiB in 197 steps; with a fixed
256 KiB mmap threshold from 0.81 to 1.20 GiB in 100 steps; with mimalloc preloaded see the README.

So a command runs on mimalloc where it is installed (the ``cmeel-mimalloc`` wheel ships ``libmimalloc.so``; a
dependency of ft-prog on Linux x86_64, ``pip install ft-prog[mimalloc]`` elsewhere it has a wheel):
:func:`preload_allocator` re-executes the command once with it in
``LD_PRELOAD``, before torch is imported. ``FTPROG_ALLOCATOR=system`` keeps the C library's ``malloc``;
``FTPROG_ALLOCATOR=/path/to/lib.so`` preloads another (jemalloc, tcmalloc). This module imports no torch.

mimalloc runs with :data:`MIMALLOC_OPTIONS` unless the environment sets them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "FTPROG_ALLOCATOR"
_PRELOADED_ENV = "FTPROG_ALLOCATOR_PRELOADED"  # set in the re-executed process: never re-execute twice

MIMALLOC_OPTIONS = {"MIMALLOC_ALLOW_THP": "0"}
"""Environment settings a preloaded mimalloc gets unless already set. No transparent huge pages: with them mimalloc
gives freed memory back to the system only in whole 2 MiB pages, and its arenas start out larger. Measured at
``cpu-250m`` (254M parameters, bf16, 2 x 256, 2 threads, AMD EPYC VM), peak resident memory over a warm-up and two
steps: LoRA 1,104 -> 1,071 MiB, LoRA with checkpointing 970 -> 933, full fine-tuning 2,397 -> 2,283, at the same
step times within noise; before loading, 245 -> 222 MiB. (``MIMALLOC_PURGE_DELAY=0`` took LoRA to 1,002 MiB but
its steps about a third longer: 7.3-7.7 s against 5.4-5.6.)"""


def allocator_library() -> Path | None:
    """The ``malloc`` library ``ft-prog`` preloads: ``$FTPROG_ALLOCATOR`` if it names a file, else the
    ``libmimalloc.so`` of the installed ``cmeel-mimalloc``; None for ``FTPROG_ALLOCATOR=system``, off Linux, or
    when neither is there."""
    choice = os.environ.get(ALLOCATOR_ENV, "")
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice:
        return Path(choice) if Path(choice).is_file() else None
    spec = importlib.util.find_spec("cmeel")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(folder).parent / "cmeel.prefix" / "lib" / "libmimalloc.so"
        if lib.is_file():
            return lib
    return None


def preload_allocator() -> None:
    """Re-execute this process (same interpreter and arguments, same pid) with :func:`allocator_library` in
    ``LD_PRELOAD``, once; nothing when there is none, it is loaded already, or this is the re-executed
    process. Call it first thing in a command's entry point, before torch is imported."""
    lib = allocator_library()
    if lib is None or os.environ.get(_PRELOADED_ENV) or _loaded(lib):
        return
    env = preload_env(lib, dict(os.environ, **{_PRELOADED_ENV: str(lib)}))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def preload_env(lib: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``lib`` first in ``LD_PRELOAD`` and, for mimalloc, :data:`MIMALLOC_OPTIONS` where ``env`` does
    not set them (a new dict)."""
    env = dict(env)
    env["LD_PRELOAD"] = os.pathsep.join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    if "mimalloc" in Path(lib).name:
        for key, value in MIMALLOC_OPTIONS.items():
            env.setdefault(key, value)
    return env


def _loaded(lib: Path) -> bool:
    try:
        return str(lib.resolve()) in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def allocator_note() -> str:
    """One line saying which ``malloc`` this process runs on, and why."""
    lib = Path(os.environ.get(_PRELOADED_ENV) or allocator_library() or "/nonexistent")
    if _loaded(lib):
        return f"host memory: {lib.name} (preloaded; glibc's heap fragments over long runs; {ALLOCATOR_ENV}=system " \
               "to keep it)"
    choice = os.environ.get(ALLOCATOR_ENV, "")
    if choice == "system":
        why = f"{ALLOCATOR_ENV}=system"
    elif choice:
        why = f"{ALLOCATOR_ENV}={choice} is not a file"
    else:
        why = "pip install cmeel-mimalloc for flat memory over long runs"
    return f"host memory: the C library's malloc ({why})"
