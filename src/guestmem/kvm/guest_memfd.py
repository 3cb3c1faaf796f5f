"""``GuestMemfd``: a guest_memfd file (fallocate, fstat, mmap, and the syscalls it refuses).

The fd comes from KVM_CREATE_GUEST_MEMFD and is not close-on-exec (the kernel allocates it
with flags 0). Every method is one syscall; its errors are the kernel's, re-raised through
``oserror`` with the call and arguments. The file pins the VM: closing the Vm leaves every
method here working. A mapping holds the file too, so it outlives ``close()``.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from typing import TYPE_CHECKING

from .. import hostmem
from ..encoding import bytes_arg, encode_signed, encode_unsigned
from ..errors import oserror
from ..hostmem import MAP_SHARED, PROT_READ, PROT_WRITE, Mapping
from ..types import FileStat, StatFs
from ..uapi import KVM_SET_MEMORY_ATTRIBUTES2, Falloc, kvm_memory_attributes2
from ._ioctl import fill_array, ioctl
from ._fd import FdObject

if TYPE_CHECKING:
    from .vm import Vm

_MAX_IO = 1 << 16  # buffer passed to read/pread: the count is the caller's, the memory is bounded



class _Statfs(ctypes.Structure):
    """struct statfs (x86-64 glibc layout)."""

    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long), ("f_blocks", ctypes.c_ulong),
                ("f_bfree", ctypes.c_ulong), ("f_bavail", ctypes.c_ulong), ("f_files", ctypes.c_ulong),
                ("f_ffree", ctypes.c_ulong), ("f_fsid", ctypes.c_int * 2), ("f_namelen", ctypes.c_long),
                ("f_frsize", ctypes.c_long), ("f_flags", ctypes.c_long), ("f_spare", ctypes.c_long * 4)]

class GuestMemfd(FdObject):
    """An open guest_memfd of ``size`` bytes created with ``flags`` by ``vm``.

    ``close()`` closes the fd; the file is released when its last reference (fds and mappings)
    goes: then its memslots stay but lose their binding, and its VM reference is dropped.
    """

    def __init__(self, vm: "Vm", fd: int, size: int, flags: int) -> None:
        self.vm = vm
        self.size = size
        self.flags = flags
        self._fd = fd
        self._mappings: "weakref.WeakSet[Mapping]" = weakref.WeakSet()  # each holds the file

    @property
    def released(self) -> bool:
        """guestmem extension: the file is gone (fd closed and every mapping of it unmapped),
        as the model's file is once its last reference goes."""
        return self.closed and not any(not m.closed for m in list(self._mappings))

    def __repr__(self) -> str:
        return f"<kvm.GuestMemfd size={self.size:#x} flags={self.flags:#x} fd={self._fd}>"

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) (api.rst 4.142, spec §2.2).

        :raises OSError: EBADF if closed; VFS: EINVAL (offset < 0, length <= 0), EOPNOTSUPP
            (unknown or invalid mode combination), EFBIG (overflow); guest_memfd: EOPNOTSUPP
            (no KEEP_SIZE, or a bit other than KEEP_SIZE|PUNCH_HOLE), EINVAL (unaligned), then
            allocate only: EINVAL (past EOF), EINTR, ENOMEM. Punching never fails past EOF.
        """
        hostmem.fallocate(self._check(), mode, offset, length)

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(FALLOC_FL_KEEP_SIZE): allocate [offset, offset+length); errors as ``fallocate``."""
        self.fallocate(Falloc.KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(PUNCH_HOLE|KEEP_SIZE): free [offset, offset+length); errors as ``fallocate``."""
        self.fallocate(Falloc.PUNCH_HOLE | Falloc.KEEP_SIZE, offset, length)

    def fstat(self) -> FileStat:
        """fstat(2): size, mode S_IFREG|0600, blksize 4096, blocks always 0.

        :raises OSError: EBADF if closed.
        """
        try:
            st = os.fstat(self._check())
        except OSError as exc:
            if exc.errno is None:
                raise
            raise oserror(exc.errno, "fstat(guest_memfd)") from None
        return FileStat(st_mode=st.st_mode, st_ino=st.st_ino, st_size=st.st_size, st_blksize=st.st_blksize,
                        st_blocks=st.st_blocks, st_nlink=st.st_nlink, st_uid=st.st_uid, st_gid=st.st_gid,
                        st_mtime_ns=st.st_mtime_ns, st_ctime_ns=st.st_ctime_ns)

    def fstatfs(self) -> StatFs:
        """fstatfs(2): f_type names the filesystem (anon inodes until 6.18, guest_memfd's own
        from 6.19), f_bsize and f_namelen.

        :raises OSError: EBADF if closed.
        """
        buf = _Statfs()
        if hostmem.libc.fstatfs(ctypes.c_int(self._check()), ctypes.byref(buf)) != 0:
            raise oserror(ctypes.get_errno(), "fstatfs(guest_memfd)")
        return StatFs(f_type=buf.f_type, f_bsize=buf.f_bsize, f_namelen=buf.f_namelen)

    def mmap(self, length: int | None = None, offset: int = 0, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_SHARED) -> Mapping:
        """mmap(2) of the file (6.18+, GUEST_MEMFD_FLAG_MMAP); ``length`` defaults to ``size``.

        The mapping may extend past EOF; touching there raises SIGBUS, as does touching any
        page of a file without INIT_SHARED. The mapping holds the file (and the VM) until
        it is closed.

        Arguments are encoded by ``hostmem.gmem_mmap_args`` (the same on both backends: ENOMEM
        for a length no size_t holds, EOVERFLOW for such an offset, EINVAL for placement flags);
        the kernel decides the rest.

        :raises OSError: EBADF if closed; the kernel's mmap errno: EINVAL (length 0, unaligned
            offset, MAP_PRIVATE, MAP_HUGETLB, MAP_GROWSDOWN, unknown type), ENOMEM (length
            beyond the address space), EOVERFLOW (offset + length beyond the maximum file size),
            EOPNOTSUPP (MAP_SHARED_VALIDATE with unknown flags), EPERM (PROT_EXEC, noexec
            mount), ENODEV (no GUEST_MEMFD_FLAG_MMAP).
        """
        fd = self._check()
        if length is None:
            length = self.size
        length, offset, prot, flags = hostmem.gmem_mmap_args(length, offset, prot, flags)
        mapping = hostmem.map_file(length, prot, flags, fd, offset)
        self._mappings.add(mapping)
        return mapping

    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0,
                              reserved: object = None) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd (in-place conversion series, spec 13.2).

        :raises OSError: EBADF if closed; ENOTTY on kernels without in-place conversion (this
            host's 6.18); EINVAL flags/reserved non-zero, VM without private memory,
            attributes other than PRIVATE, empty/wrapping/unaligned range or past the file;
            EAGAIN a page is still referenced, with ``error_offset`` set to the kernel's value.
        """
        fd = self._check()
        arg = kvm_memory_attributes2()
        arg.offset = encode_unsigned(offset, 64, "offset")
        arg.size = encode_unsigned(size, 64, "size")
        arg.attributes = encode_unsigned(attributes, 64, "attributes")
        arg.flags = encode_unsigned(flags, 64, "flags")
        fill_array(arg.reserved, reserved, "reserved")
        try:
            ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, "KVM_SET_MEMORY_ATTRIBUTES2", arg,
                  f"offset={arg.offset:#x}, size={arg.size:#x}, attributes={arg.attributes:#x}, flags={arg.flags:#x}")
        except OSError as exc:
            exc.error_offset = arg.error_offset  # type: ignore[attr-defined]
            raise

    def _syscall(self, name: str, func, *args):  # type: ignore[no-untyped-def]
        """``func(fd, *args)`` for arguments already encoded; its errno re-raised with ``name``."""
        fd = self._check()
        try:
            return func(fd, *args)
        except OSError as exc:
            raise oserror(exc.errno, f"{name} on guest_memfd") from None

    def read(self, n: int) -> bytes:
        """read(2) of ``n`` (a size_t) bytes: guest_memfd has no read method.

        At most 64 KiB of buffer is passed, whatever ``n`` (a short read is what read(2) may do).

        :raises OSError: EBADF if closed; EINVAL.
        """
        self._check()
        n = encode_unsigned(n, 64, "n")
        return self._syscall("read", os.read, min(n, _MAX_IO))

    def write(self, data: bytes) -> int:
        """write(2) of the bytes-like ``data``: guest_memfd has no write method.

        :raises OSError: EBADF if closed; EINVAL.
        """
        self._check()
        return self._syscall("write", os.write, bytes_arg(data, "data"))

    def pread(self, n: int, offset: int) -> bytes:
        """pread(2): the file is not positional.

        :raises OSError: EBADF if closed; EINVAL for a negative ``offset`` (loff_t); ESPIPE.
        """
        self._check()
        n, offset = encode_unsigned(n, 64, "n"), encode_signed(offset, 64, "offset")
        return self._syscall("pread", os.pread, min(n, _MAX_IO), offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        """pwrite(2): the file is not positional.

        :raises OSError: EBADF if closed; EINVAL for a negative ``offset`` (loff_t); ESPIPE.
        """
        self._check()
        view, offset = bytes_arg(data, "data"), encode_signed(offset, 64, "offset")
        return self._syscall("pwrite", os.pwrite, view, offset)

    def lseek(self, offset: int, whence: int) -> int:
        """lseek(2): the file is not seekable.

        :raises OSError: EBADF if closed; EINVAL for ``whence`` (unsigned int) > SEEK_MAX; ESPIPE.
        """
        self._check()
        offset, whence = encode_signed(offset, 64, "offset"), encode_signed(whence, 32, "whence")
        return self._syscall("lseek", os.lseek, offset, whence)

    def truncate(self, length: int) -> None:
        """ftruncate(2): the size is immutable.

        :raises OSError: EBADF if closed; EINVAL for any ``length`` (loff_t).
        """
        self._check()
        self._syscall("ftruncate", os.ftruncate, encode_signed(length, 64, "length"))
