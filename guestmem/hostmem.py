"""Host memory primitives both backends share: libc mmap/munmap/fallocate and ``Mapping``.

Python's ``mmap.mmap`` refuses to map a regular file past its size, but guest_memfd
mappings may extend past EOF (touching there raises SIGBUS, spec GT-06), so mappings go
through libc directly. A ``Mapping`` is a live ``MAP_SHARED`` view with a real host
address that can serve as a memslot's ``userspace_addr``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap as _mmap
import os

from .encoding import encode_signed
from .errors import oserror

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MAP_FAILED = ctypes.c_void_p(-1).value
PROT_READ, PROT_WRITE, PROT_EXEC = _mmap.PROT_READ, _mmap.PROT_WRITE, _mmap.PROT_EXEC
MAP_SHARED, MAP_PRIVATE = _mmap.MAP_SHARED, _mmap.MAP_PRIVATE
MAP_FIXED = 0x10
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
MAP_NORESERVE = 0x4000


def mmap(length: int, prot: int, flags: int, fd: int, offset: int, address: int = 0) -> int:
    """mmap(2); returns the address or raises OSError with the kernel's errno."""
    addr = _libc.mmap(address or None, length, prot, flags, fd, offset)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise oserror(err, f"mmap(length={length:#x}, offset={offset:#x}, prot={prot}, flags={flags:#x})")
    return addr


def munmap(address: int, length: int) -> None:
    if _libc.munmap(address, length) != 0:
        err = ctypes.get_errno()
        raise oserror(err, f"munmap({address:#x}, {length:#x})")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with the kernel's errno on failure (offset and length are loff_t)."""
    mode = encode_signed(mode, 32, "mode")
    offset, length = encode_signed(offset, 64, "offset"), encode_signed(length, 64, "len")
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise oserror(err, f"fallocate(mode={mode:#x}, offset={offset:#x}, len={length:#x})")


_fallocate = _libc.fallocate


def fallocate_encoded(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) for arguments the caller has already encoded (s32 mode, loff_t offset and len).

    For the model's own memfds, whose arguments passed the guest_memfd checks; same errors
    as ``fallocate``.
    """
    if _fallocate(fd, mode, offset, length):
        err = ctypes.get_errno()
        raise oserror(err, f"fallocate(mode={mode:#x}, offset={offset:#x}, len={length:#x})")


def madvise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise oserror(err, f"madvise({address:#x}, {length:#x}, {advice})")


class Mapping:
    """A live shared mapping: ``.address``, ``.length``, byte access and ``close()``.

    Touching an offset the file cannot back raises SIGBUS in the process, as with any
    mapping; callers that expect SIGBUS probe in a child process.
    """

    __slots__ = ("address", "length", "_owner", "__weakref__")

    def __init__(self, address: int, length: int, owner: object = None) -> None:
        self.address = address
        self.length = length
        self._owner = owner  # what the mapping pins (the model's file object), like a VMA's file ref

    @property
    def closed(self) -> bool:
        return self.address == 0

    def _check(self, offset: int, size: int) -> None:
        if self.closed:
            raise oserror(9, "mapping is closed")
        if offset < 0 or size < 0 or offset + size > self.length:
            raise oserror(22, f"range [{offset:#x}, {offset + size:#x}) is outside the {self.length:#x}-byte mapping")

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return ctypes.string_at(self.address + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        ctypes.memmove(self.address + offset, data, len(data))

    def fill(self, offset: int, size: int, byte: int) -> None:
        self._check(offset, size)
        ctypes.memset(self.address + offset, byte, size)

    def buffer(self) -> memoryview:
        """A writable memoryview over the whole mapping (valid until close)."""
        self._check(0, 0)
        return memoryview((ctypes.c_char * self.length).from_address(self.address)).cast("B")

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        if not self.closed:
            munmap(self.address, self.length)
            self.address = 0
            self._owner = None

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def memfd(name: str, size: int = 0) -> int:
    """A fresh memfd (close-on-exec) truncated to ``size``."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if size:
        os.ftruncate(fd, size)
    return fd
