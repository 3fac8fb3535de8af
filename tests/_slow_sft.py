"""``ft-prog ARGS`` with every training step slowed by a sleep (numerics untouched), so that a signal sent once
training has started lands mid-run (tests/test_distributed.py). With ``run --nproc N`` the launcher starts this
script, not ``ftprog.programs.cli``, as torchrun's workers."""

import sys
import time

from ftprog.programs import distributed, sft
from ftprog.programs.cli import main

if distributed.under_torchrun():
    fast = sft.step_loss

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return fast(*args, **kwargs)

    sft.step_loss = slow
else:
    torchrun_command = distributed.torchrun_command

    def this_script(args, **kwargs):
        command = torchrun_command(args, **kwargs)
        assert command[-len(args) - 2 :] == ["-m", "ftprog.programs.cli", *args]
        return [*command[: -len(args) - 2], __file__, *args]

    distributed.torchrun_command = this_script
sys.argv = ["ft-prog", *sys.argv[1:]]
main()
