"""Under torchrun: ``ft-prog ARGS`` where rank 1's torch.distributed.checkpoint writes into a folder whose path
contains ``argv[1]`` fail as on a full disk (tests/test_distributed.py)."""

import errno
import os
import sys

from torch.distributed.checkpoint import filesystem

from ftprog.programs.cli import main

failing, args = sys.argv[1], sys.argv[2:]
real_write = filesystem._FileSystemWriter.write_data


def full_disk(self, plan, planner):
    if failing in str(self.path):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
    return real_write(self, plan, planner)


if os.environ["RANK"] == "1":
    filesystem._FileSystemWriter.write_data = full_disk
sys.argv = ["ft-prog", *args]
main()
