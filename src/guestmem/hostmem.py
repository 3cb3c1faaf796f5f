"""Host memory primitives both backends share: libc mmap/munmap/fallocate, the
``host_range_mapped`` probe, and ``Mapping``.

Python's ``mmap.mmap`` refuses to map a regular file past its size, but guest_memfd
mappings may extend past EOF (touching there raises SIGBUS, spec GT-06), so the kernel maps
the file through libc; ``map_file`` then moves that mapping under an ``mmap.mmap`` object,
which owns it. A ``Mapping`` is a live view with a real host address that can serve as a
memslot's ``userspace_addr``; it cannot dangle (see its docstring).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap as _mmap
import os
import weakref
from typing import Callable, Iterator

from .encoding import bytes_arg, check_int, encode_signed
from .errors import oserror, refuse_copy

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
"""The one ctypes handle on the C library: every libc call guestmem makes goes through it, with
its prototype declared here. A handle on libc itself (not ``CDLL(None)``) resolves libc's own
symbols, never those a preloaded library interposes: the drop-in /dev/kvm interposes mmap,
ioctl and more, and its Python side must reach the real calls."""
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_HOST_PAGE = _mmap.PAGESIZE  # msync wants a host-page-aligned address

MAP_FAILED = ctypes.c_void_p(-1).value
PROT_READ, PROT_WRITE, PROT_EXEC = _mmap.PROT_READ, _mmap.PROT_WRITE, _mmap.PROT_EXEC
MAP_SHARED, MAP_PRIVATE = _mmap.MAP_SHARED, _mmap.MAP_PRIVATE
MAP_FIXED = 0x10
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
MAP_NORESERVE = 0x4000


MAP_32BIT = 0x40
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
_S64_MIN, _U64_LIMIT = -(1 << 63), 1 << 64
_S64_LIMIT, _S32_LIMIT = 1 << 63, 1 << 31
_PLACEMENT_FLAGS = MAP_FIXED | MAP_FIXED_NOREPLACE | MAP_32BIT | MAP_ANONYMOUS


def encode_mmap_args(length: int, offset: int, prot: int, flags: int) -> tuple[int, int, int, int]:
    """mmap(2)'s arguments as C passes them: ``length`` a size_t, ``offset`` an off_t, ``prot``
    and ``flags`` C ints (negative values wrap, as C would).

    :raises TypeError: an argument is not an int.
    :raises OSError: ENOMEM for a length no size_t holds (no mapping can be that long, the
        kernel's errno for an impossible length); EOVERFLOW for an offset no off_t holds (its
        page index overflows, the kernel's errno); EINVAL for prot/flags wider than an int.
    """
    if (length.__class__ is int and offset.__class__ is int and prot.__class__ is int and flags.__class__ is int
            and 0 <= length < _S64_LIMIT and 0 <= offset < _S64_LIMIT and 0 <= prot < _S32_LIMIT
            and 0 <= flags < _S32_LIMIT):
        # Already as C passes them (every internal window switch of the model's vCPUs comes here:
        # the checks below measured ~0.8 µs of the ~40 µs round trip `guestmem bench conversion` times).
        return length, offset, prot, flags
    check_int(length, "length")
    check_int(offset, "offset")
    if not _S64_MIN <= length < _U64_LIMIT:
        raise oserror(errno.ENOMEM, f"mmap length {length:#x} does not fit in a size_t")
    if not _S64_MIN <= offset < _U64_LIMIT:
        raise oserror(errno.EOVERFLOW, f"mmap offset {offset:#x} does not fit in an off_t")
    offset &= _U64_LIMIT - 1
    return (length & (_U64_LIMIT - 1), offset - _U64_LIMIT if offset >> 63 else offset,
            encode_signed(prot, 32, "prot"), encode_signed(flags, 32, "flags"))


def gmem_mmap_args(length: int, offset: int, prot: int, flags: int) -> tuple[int, int, int, int]:
    """The arguments of ``GuestMemfd.mmap`` on both backends: ``encode_mmap_args``, then
    EINVAL for flags that choose the address or drop the file (MAP_FIXED, MAP_FIXED_NOREPLACE,
    MAP_32BIT, MAP_ANONYMOUS): the method has no address argument and maps this file."""
    length, offset, prot, flags = encode_mmap_args(length, offset, prot, flags)
    if flags & _PLACEMENT_FLAGS:
        raise oserror(errno.EINVAL, f"mmap flags {flags:#x}: guest_memfd mappings take no placement "
                                    "flags (MAP_FIXED*, MAP_32BIT) and are never MAP_ANONYMOUS")
    return length, offset, prot, flags


def mmap(length: int, prot: int, flags: int, fd: int, offset: int, address: int = 0) -> int:
    """mmap(2); returns the address or raises OSError with the kernel's errno (arguments
    encoded as by ``encode_mmap_args``)."""
    length, offset, prot, flags = encode_mmap_args(length, offset, prot, flags)
    addr = libc.mmap(address or None, length, prot, flags, fd, offset)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise oserror(err, f"mmap(length={length:#x}, offset={offset:#x}, prot={prot}, flags={flags:#x})")
    return addr


def process_mappings() -> Iterator[tuple[int, int, bytes]]:
    """This process's mappings now, in address order: ``(start, end, perms)`` per line of
    /proc/self/maps (``perms`` as the kernel prints it, e.g. b"rw-s")."""
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            rng, perms = line.split(b" ", 2)[:2]
            lo, _, hi = rng.partition(b"-")
            yield int(lo, 16), int(hi, 16), perms


def room_for(length: int, low: int, high: int) -> bool:
    """Whether [low, high) of the address space has a gap of ``length`` bytes between the
    process's mappings now (read, not probed with a mapping, so the layout stays as it was)."""
    end = low
    for start, stop, _ in process_mappings():
        if start >= high:
            break
        if min(start, high) - end >= length:
            return True
        end = max(end, stop)
    return high - end >= length


def munmap(address: int, length: int) -> None:
    if libc.munmap(address, length) != 0:
        err = ctypes.get_errno()
        raise oserror(err, f"munmap({address:#x}, {length:#x})")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with the kernel's errno on failure (offset and length are loff_t)."""
    mode = encode_signed(mode, 32, "mode")
    offset, length = encode_signed(offset, 64, "offset"), encode_signed(length, 64, "len")
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise oserror(err, f"fallocate(mode={mode:#x}, offset={offset:#x}, len={length:#x})")


_fallocate = libc.fallocate


def fallocate_encoded(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) for arguments the caller has already encoded (s32 mode, loff_t offset and len).

    For the model's own memfds, whose arguments passed the guest_memfd checks; same errors
    as ``fallocate``. Skipping the encoders saves ~0.2 us of the ~5 us 4 KiB allocate and punch
    that `guestmem bench fileops` times.
    """
    if _fallocate(fd, mode, offset, length):
        err = ctypes.get_errno()
        raise oserror(err, f"fallocate(mode={mode:#x}, offset={offset:#x}, len={length:#x})")


def host_range_mapped(address: int, length: int) -> bool:
    """True if [address, address+length) is mapped in this process (page-aligned ``address``).

    msync(2) with no flags only walks the VMAs (ENOMEM at a hole) and writes nothing back,
    so its cost does not grow with ``length`` the way mincore's per-page vector does.
    """
    if address == 0 or address % _HOST_PAGE:
        return False
    return libc.msync(address, length, 0) == 0


def madvise(address: int, length: int, advice: int) -> None:
    if libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise oserror(err, f"madvise({address:#x}, {length:#x}, {advice})")


class Mapping:
    """A live mapping: ``.address``, ``.length``, bounds-checked byte access and ``close()``.

    Built on ``mmap.mmap`` (see ``map_file``), so it cannot dangle: ``read``/``write``/``fill``
    check ``[offset, offset + size)`` against ``length`` at any size; a ``buffer()`` keeps the
    underlying mapping alive after the Mapping object is gone, and ``close()`` while a buffer is
    still exported raises BufferError (as ``mmap.mmap.close`` does), leaving the mapping
    open. Copies and pickles are refused (TypeError): a copy would outlive ``close()``.

    Touching an offset the file cannot back (past EOF, a guest_memfd page that is not
    shared) raises SIGBUS in the process, as with any mapping; callers that expect SIGBUS
    probe in a child process. A mapping without PROT_READ/PROT_WRITE refuses the access
    with EFAULT instead of faulting (what a syscall given that address would say).
    """

    __slots__ = ("_mm", "address", "length", "_prot", "_release", "__weakref__")

    def __init__(self, mm: _mmap.mmap, address: int, length: int, prot: int, release: object = None) -> None:
        if not isinstance(mm, _mmap.mmap):
            raise TypeError("Mapping does not adopt raw addresses: use hostmem.map_file, map_memfd or map_anonymous")
        self._mm = mm
        self.address = address
        self.length = length
        self._prot = prot
        self._release = release  # weakref.finalize of mm: what the mapping pins (the model's file reference)

    __reduce_ex__ = refuse_copy

    @property
    def closed(self) -> bool:
        return self._mm.closed

    def _check(self, offset: object, size: object, need: int) -> None:
        check_int(offset, "offset")
        check_int(size, "size")
        if self._mm.closed:
            raise oserror(errno.EBADF, "mapping is closed")
        if offset < 0 or size < 0 or offset + size > self.length:  # type: ignore[operator]
            raise oserror(errno.EINVAL, f"range [{offset:#x}, +{size:#x}) is outside the {self.length:#x}-byte mapping")
        if not self._prot & need:
            raise oserror(errno.EFAULT, f"mapping prot {self._prot:#x} does not allow this access")

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (any size: the result is one bytes object)."""
        self._check(offset, size, PROT_READ | PROT_WRITE)
        return self._mm[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        """Copy the bytes-like ``data`` to ``offset``."""
        view = bytes_arg(data, "data")
        self._check(offset, view.nbytes, PROT_WRITE)
        self._mm[offset:offset + view.nbytes] = view

    def fill(self, offset: int, size: int, byte: int) -> None:
        """Set ``size`` bytes at ``offset`` to ``byte`` (0..255)."""
        check_int(byte, "byte")
        if not 0 <= byte <= 0xFF:
            raise oserror(errno.EINVAL, f"byte {byte:#x} is not a byte value")
        self._check(offset, size, PROT_WRITE)
        chunk = bytes([byte]) * min(size, _FILL_CHUNK)
        end = offset + size
        while offset < end:
            n = min(end - offset, _FILL_CHUNK)
            self._mm[offset:offset + n] = chunk[:n] if n < len(chunk) else chunk
            offset += n

    def buffer(self) -> memoryview:
        """A memoryview over the whole mapping (read-only without PROT_WRITE).

        The view keeps the mapping alive; ``close()`` raises BufferError until it is released.
        """
        self._check(0, 0, PROT_READ | PROT_WRITE)
        view = memoryview(self._mm)
        return view if self._prot & PROT_WRITE else view.toreadonly()

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        """munmap(2); a second close is a no-op.

        :raises BufferError: a ``buffer()`` view is still alive (the mapping stays open).
        """
        if not self._mm.closed:
            self._mm.close()
            self.address = 0
        if self._release is not None:
            self._release()  # type: ignore[operator]

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # live buffers: the mmap.mmap stays until the last one goes


_FILL_CHUNK = 1 << 20


def map_file(length: int, prot: int, flags: int, fd: int, offset: int = 0,
             release: "Callable[[], object] | None" = None) -> Mapping:
    """mmap(2) of ``fd`` as a ``Mapping``; the kernel decides every error.

    The kernel maps the file where it likes first (so its errno wins); the mapping is then
    placed over an ``mmap.mmap`` reservation of the same length with MAP_FIXED, so the
    ``mmap.mmap`` object owns it (export counting, munmap at close). ``release`` runs once,
    when the mapping goes (close or garbage collection of its last buffer).
    """
    address = mmap(length, prot, flags, fd, offset)
    try:
        mm = _mmap.mmap(-1, length, flags=MAP_PRIVATE | MAP_NORESERVE, prot=PROT_READ | PROT_WRITE)
    except BaseException:
        munmap(address, length)
        raise
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        mmap(length, prot, flags | MAP_FIXED, fd, offset, base)
    except BaseException:
        mm.close()
        raise
    finally:
        munmap(address, length)
    fin = None
    if release is not None:
        fin = weakref.finalize(mm, release)
        fin.atexit = False
    return Mapping(mm, base, length, prot, fin)


def map_anonymous(length: int) -> Mapping:
    """A shared anonymous read-write mapping (MAP_NORESERVE) of ``length`` bytes."""
    return map_file(length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)


def map_memfd(name: str, length: int) -> Mapping:
    """A read-write MAP_SHARED | MAP_NORESERVE mapping of a fresh memfd of ``length`` bytes
    (the memfd itself is closed: the mapping keeps its pages)."""
    fd = memfd(name, length)
    try:
        return map_file(length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
    finally:
        os.close(fd)


def memfd(name: str, size: int = 0) -> int:
    """A fresh memfd (close-on-exec) truncated to ``size``."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if size:
        os.ftruncate(fd, size)
    return fd
