"""Keep torchao's import-time noise out of the user's terminal.

Importing torchao 0.18 on a machine without its CUDA kernels logs a "Failed to load .../_C_*.so" warning
per kernel library and makes torch log that ``KernelPreference`` "is an Enum subclass ...". Neither
is the user's business: :func:`quiet_torchao_import` routes exactly those records to the ``ftprog``
debug log (shown as warnings again with ``FTPROG_DEBUG=1``); every other warning stays as it is. It
installs logging filters only (torchao itself is still imported where it is used), so it is cheap and
covers every import path.
"""

from __future__ import annotations

import logging
import os
import re

_NOISE = {
    "torchao": re.compile(r"^Failed to load .*\.so\b"),
    "torch.utils._pytree": re.compile(r"KernelPreference'?>? is an Enum subclass"),
}
_debug_log = logging.getLogger("ftprog.torchao")


class _ToDebugLog(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not self.pattern.search(record.getMessage()):
            return True
        _debug_log.debug("%s: %s", record.name, record.getMessage())
        return False


def quiet_torchao_import() -> None:
    """Route torchao's known import-time noise to the debug log (idempotent; a no-op with ``FTPROG_DEBUG=1``)."""
    if os.environ.get("FTPROG_DEBUG", "") not in ("", "0"):
        return
    for name, pattern in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToDebugLog) for f in logger.filters):
            logger.addFilter(_ToDebugLog(pattern))
