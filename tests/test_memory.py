"""reuse_freed_memory: a freed block comes back without page faults (in a fresh process: it is process-wide)."""

import platform
import subprocess
import sys

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
