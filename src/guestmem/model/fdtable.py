"""The model's file-descriptor table: integer fds for model objects, like a process's.

Data model
----------
Every model object that the kernel would expose as a file (the /dev/kvm handle, VMs,
vCPUs, guest_memfds) reserves a real descriptor of this process (``/dev/null``) and uses
its number as its fd. So model fd numbers never collide with real files, and an fd that
is open in the process but not in the table is a real, non-model file.

``_table`` maps fd number -> object for every reserved descriptor still open. Invariant:
an fd is in the table iff the model holds the reserved descriptor with that number open.
Removal happens before the real close, so a number is never reused while still mapped.

Resolution mirrors fdget() followed by an f_op check (kvm_gmem_bind):

* not in the table and not open in the process (or negative / > INT_MAX) -> EBADF;
* open in the process but not a model object, or a model object of another kind -> the
  caller's "wrong file" errno (EINVAL for guest_memfd).

The table also stands for the rest of the calling process the kernel looks at. ``mm`` is a
token for this process's address space (the kernel's ``current->mm``): a VM records it at
creation, and its VM and vCPU ioctls from another mm (a forked child) fail with EIO, as in
kvm_vm_ioctl/kvm_vcpu_ioctl. In a forked child ``mm`` is replaced, and every object
registered with ``at_fork_in_child`` gets fresh locks: the child's copies of locks that
other threads held at the fork would otherwise never be released.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import weakref
from typing import Any, TypeVar

from ..errors import oserror, refuse_copy

T = TypeVar("T")

_lock = threading.Lock()
_table: dict[int, Any] = {}

mm = object()
"""This process's address space (current->mm); a new object in every forked child."""

_fork_hooks: "weakref.WeakSet[Any]" = weakref.WeakSet()


def at_fork_in_child(obj: Any) -> None:
    """Call ``obj._after_fork_in_child()`` in a forked child while ``obj`` lives (new locks)."""
    _fork_hooks.add(obj)


def _after_fork_in_child() -> None:
    # Only the forking thread exists in the child: nothing else can hold these now.
    global _lock, mm
    _lock = threading.Lock()
    mm = object()
    for obj in list(_fork_hooks):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

_INT_MAX = (1 << 31) - 1


def fd_install(obj: Any, *, cloexec: bool = True) -> int:
    """Reserve a real descriptor and map its number to ``obj``; returns the fd."""
    fd = os.open("/dev/null", os.O_RDWR | (os.O_CLOEXEC if cloexec else 0))
    if not cloexec:
        os.set_inheritable(fd, True)  # guest_memfd fds are not close-on-exec
    with _lock:
        assert fd not in _table, f"fd {fd} reserved twice"
        _table[fd] = obj
    return fd


def fd_close(fd: int) -> None:
    """Drop ``fd`` from the table, then close the reserved descriptor."""
    with _lock:
        _table.pop(fd, None)
    try:
        os.close(fd)
    except OSError:
        pass


def _open_in_process(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def fdget(fd: int) -> Any:
    """The model object for ``fd``, or None for a real non-model file; EBADF if not open."""
    if fd < 0 or fd > _INT_MAX:
        raise oserror(errno.EBADF, f"fd {fd} is not an open file descriptor")
    with _lock:
        obj = _table.get(fd)
    if obj is not None:
        return obj
    if not _open_in_process(fd):
        raise oserror(errno.EBADF, f"fd {fd} is not an open file descriptor")
    return None


def fdget_typed(fd: int, kind: type[T], wrong: int, what: str) -> T:
    """fdget plus an f_op check: ``wrong`` errno unless the file is a ``kind``."""
    obj = fdget(fd)
    if not isinstance(obj, kind):
        raise oserror(wrong, f"fd {fd} is not a {what}")
    return obj


def lookup(fd: int) -> Any:
    """The table entry for ``fd`` or None (no errors; for tests and diagnostics)."""
    with _lock:
        return _table.get(fd)


class FdObject:
    """What every model object that owns an fd shares, as ``kvm._fd.FdObject`` does for the kvm
    objects: ``closed``, ``fileno``, the EBADF check and the context manager.

    ``_check()`` is the check every call on the fd makes first (EBADF closed; returns the fd);
    the VM and vCPU add their ioctls' mm check to it, while ``_check_fd()`` stays EBADF only,
    for what is not an ioctl. Subclasses set ``_fd`` from ``fd_install`` and name themselves in
    ``_what`` for messages; ``close`` releases the fd once.
    """

    _fd: int | None

    __reduce_ex__ = refuse_copy  # a copy would close (or use) the fd a second time

    def _what(self) -> str:
        return type(self).__name__

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _check_fd(self) -> int:
        fd = self._fd
        if fd is None:
            raise oserror(errno.EBADF, f"{self._what()} is closed")
        return fd

    _check = _check_fd

    def fileno(self) -> int:
        """The file descriptor. :raises OSError: EBADF once closed."""
        return self._check_fd()

    def close(self) -> None:
        """close(2); a second close is a no-op."""
        fd, self._fd = self._fd, None
        if fd is not None:
            fd_close(fd)

    def __enter__(self):
        self._check_fd()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
