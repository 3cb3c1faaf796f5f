"""``FdObject``: what every kvm object shares -- it owns one kernel fd.

A closed object fails every method with EBADF (``_check``), closes its fd at most once,
and is a context manager. Subclasses name themselves for error messages (``_what``) and
release anything else they hold in ``_release`` (the vCPU's kvm_run mapping).
"""

from __future__ import annotations

import os

from ..errors import refuse_copy
from ._ioctl import closed_error


class FdObject:
    _fd: int

    __reduce_ex__ = refuse_copy  # a copy would close (or use) the fd a second time

    def _what(self) -> str:
        return type(self).__name__

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _check(self) -> int:
        if self._fd < 0:
            raise closed_error(self._what())
        return self._fd

    def fileno(self) -> int:
        """The file descriptor.

        :raises OSError: EBADF if closed.
        """
        return self._check()

    def _release(self) -> None:
        """Free what the object holds besides its fd (called once, before the fd closes)."""

    def close(self) -> None:
        """close(2) the fd; a second close is a no-op."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._release()
            os.close(fd)

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
