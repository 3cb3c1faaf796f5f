"""Touch guest memory in a forked child, so an expected SIGBUS/SIGSEGV kills only the child.

``touch`` returns the byte read (after writing ``value`` if given) or the name of the signal
that killed the child. The child restores default signal handling (pytest enables
faulthandler) and leaves with ``os._exit``, never returning into the test runner.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
from typing import Callable

from guestmem.hostmem import Mapping

_SIGNALS = {signal.SIGBUS: "SIGBUS", signal.SIGSEGV: "SIGSEGV"}


def in_child(fn: Callable[[], int]) -> int | str:
    """Run ``fn`` in a forked child; its return value (0..255) or the fatal signal's name."""
    pid = os.fork()
    if pid == 0:  # child
        status = 255
        try:
            faulthandler.disable()
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            status = int(fn()) & 0xFF
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return _SIGNALS.get(sig, signal.Signals(sig).name)
    return os.WEXITSTATUS(status)


def touch(mapping: Mapping, offset: int, value: int | None = None) -> int | str:
    """Read (or write ``value`` then read) the byte at ``offset`` of ``mapping`` in a child."""
    address = mapping.address + offset

    def access() -> int:
        cell = ctypes.c_uint8.from_address(address)
        if value is not None:
            cell.value = value
        return cell.value

    return in_child(access)


def fill(mapping: Mapping, offset: int, size: int, value: int) -> int | str:
    """memset [offset, offset+size) of ``mapping`` in a child: 0 on success or the signal name."""
    address = mapping.address + offset
    return in_child(lambda: ctypes.memset(address, value, size) and 0)
