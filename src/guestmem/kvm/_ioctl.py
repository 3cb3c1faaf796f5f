"""How the kvm backend calls ioctl(2), and the argument encoders it needs.

``fcntl.ioctl`` raises ``OSError`` with the kernel's errno; ``ioctl`` re-raises it through
``guestmem.errors.oserror`` with the ioctl name and its arguments, so every failure message
says which call and which values. The one exception is KVM_RUN: ``Vcpu.run`` calls
``fcntl.ioctl`` itself and builds the error only when the call fails, since a wrapper call
is a measurable share of an exit round trip. (A ctypes ``ioctl`` is no faster: 450-880 ns
per call against 320 ns for ``fcntl.ioctl`` on this host, KVM_GET_API_VERSION in a loop.) Structs travel as ctypes instances (writable buffers);
calls without an argument omit it, which skips CPython's argument parsing (0.25 µs against
0.8 µs per call on this host, see perf-baselines-host.md §2).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
from typing import Any

from ..encoding import encode_array, encode_unsigned
from ..errors import oserror
from ..hostmem import libc

_NO_ARG = object()


def ioctl(fd: int, request: int, name: str, arg: Any = _NO_ARG, detail: str = "") -> int:
    """ioctl(fd, request[, arg]) returning the kernel's return value.

    ``arg`` is an int (passed by value) or a ctypes instance (passed by pointer; the kernel may
    write it back). On failure raises ``OSError(errno, "<strerror>: NAME(detail)")``.
    """
    try:
        if arg is _NO_ARG:
            return fcntl.ioctl(fd, request)
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise oserror(exc.errno, f"{name}({detail})") from None


_SYS_ioctl = 16  # x86-64
_syscall = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_ulong, use_errno=True)(
    ("syscall", libc))


def ioctl_u32(fd: int, request: int, name: str) -> int:
    """ioctl(fd, request) without an argument whose return value is a u32 the kernel passes
    through its int ``r`` (KVM_GET_TSC_KHZ): a value of 2**31 or more arrives negative (masked
    back here; ``fcntl.ioctl`` would raise OSError with errno 0), and one of 2**32 - 4095 or
    more arrives as -errno, a failure for every caller (syscall(2) returns -1)."""
    r = _syscall(_SYS_ioctl, fd, request)
    if r == -1:
        raise oserror(ctypes.get_errno(), f"{name}()")
    return r & 0xFFFFFFFF


def closed_error(what: str) -> OSError:
    """EBADF for a method called on a closed object."""
    return oserror(errno.EBADF, f"{what} is closed")


def int_arg(value: int, field: str) -> int:
    """An ioctl argument passed by value: ``fcntl.ioctl`` takes a C int, so a u32 is passed
    as its signed twin (same bits). Values outside 32 bits: EINVAL naming the field."""
    value = encode_unsigned(value, 32, field)
    return value - (1 << 32) if value >= 1 << 31 else value


def fill_array(array: Any, values: Any, field: str) -> None:
    """Copy ``values`` (None = zeros) into a ctypes u64 array, encoding each element."""
    for i, v in enumerate(encode_array(values, len(array), 64, field)):
        array[i] = v


def ioctl_ulong(fd: int, request: int, name: str, value: int, field: str) -> int:
    """ioctl(fd, request, value) for an ``unsigned long`` passed by value (KVM_CHECK_EXTENSION).

    ``fcntl.ioctl`` passes only a C int, so values outside it go through libc's ioctl with the
    full 64 bits, as the kernel reads them (cap 1 << 32 is an unknown cap: 0, not EINVAL).
    Values wider than 64 bits: EINVAL naming ``field``.
    """
    value = encode_unsigned(value, 64, field)
    detail = f"{field}={value:#x}"
    if value < 1 << 31:
        return ioctl(fd, request, name, value, detail)
    r = libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_ulong(value))
    if r < 0:
        raise oserror(ctypes.get_errno(), f"{name}({detail})")
    return r
