"""Host memory: reuse_freed_memory (a freed block comes back without page faults; in a fresh process, it is
process-wide) and the malloc `ft-prog run` re-executes itself with (programs/host_memory.py)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import resource, sys, torch
from ftprog.core import reuse_freed_memory

def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)  # 64 MiB, written (paged in), freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_block()
default = faults_of_a_fresh_block()
applied = reuse_freed_memory()
for _ in range(3):  # grow the heap (an aligned block may not fit the hole the last one left, at first)
    faults_of_a_fresh_block()
print(applied, default, max(faults_of_a_fresh_block() for _ in range(3)))
"""


def test_reuse_freed_memory_stops_page_faults_on_reallocation():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    applied, default, reused = out[0] == "True", int(out[1]), int(out[2])
    glibc = platform.libc_ver()[0] == "glibc"
    assert applied == glibc  # applied exactly where the C library is glibc; elsewhere it changes nothing
    if glibc:
        pages = (64 << 20) // 4096
        assert default > pages // 2  # glibc's default maps the block afresh each time
        assert reused < pages // 20


HOST_MEMORY_PROBE = r"""
import os, sys
from ftprog.programs.host_memory import allocator_note, preload_allocator
preload_allocator()  # re-executes this very command once, the library in LD_PRELOAD
print(os.getpid(), "torch" in sys.modules, allocator_note())
"""


def _a_preloadable_library():
    from ftprog.programs.host_memory import allocator_library

    for lib in (allocator_library(), "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"):  # mimalloc, else inert
        if lib is not None and Path(lib).is_file():
            return str(lib)
    pytest.skip("no malloc library to preload here")


def test_preload_allocator_reexecutes_once_with_the_library():
    lib = _a_preloadable_library()
    env = {**os.environ, "FTPROG_ALLOCATOR": lib}
    env.pop("FTPROG_ALLOCATOR_PRELOADED", None)
    proc = subprocess.Popen([sys.executable, "-c", HOST_MEMORY_PROBE], env=env, stdout=subprocess.PIPE, text=True)
    out = proc.communicate()[0].split(maxsplit=2)
    assert int(out[0]) == proc.pid and out[1] == "False"  # the same process, re-executed before torch loaded
    assert out[2].strip().startswith(f"host memory: {Path(lib).name} (preloaded")
    system = subprocess.run([sys.executable, "-c", HOST_MEMORY_PROBE], env={**env, "FTPROG_ALLOCATOR": "system"},
                            capture_output=True, text=True, check=True).stdout
    assert "host memory: the C library's malloc (FTPROG_ALLOCATOR=system)" in system
