"""The model's guest_memfd: a VM-owned file of guest-private memory (virt/kvm/guest_memfd.c).

Data model
----------
* ``GuestMemfd`` is both the kernel's gmem inode (size, flags, pages) and its one file
  (``struct kvm_gmem``: the owning VM, the bindings). The fd is a reserved descriptor from
  ``fdtable`` (not close-on-exec, like the kernel's).
* **Memory belongs to the inode.** Each file's pages live in a real memfd (``_memfd``) of
  exactly ``size`` bytes: allocate = fallocate on the memfd, punch = PUNCH_HOLE on it, so
  zeroing and cost are the kernel's. ``_host_address`` is a model-owned MAP_SHARED |
  MAP_NORESERVE view of the whole memfd for the model's vCPUs; it is never handed to users
  (0 if the file is larger than the address space can map).
* **Both are created at first use**, not at KVM_CREATE_GUEST_MEMFD: ``_memfd`` at the first
  allocation, INIT_SHARED mmap or vCPU access, ``_host_address`` at the first vCPU access.
  Until then ``_memfd_fd`` is -1 and ``_host_addr`` None, and no page of the file exists, so
  a punch has nothing to free. Nothing user-visible depends on them (fstat reports
  ``st_blocks`` 0 either way). Keeping the view unmapped until a vCPU needs it also spares
  every punch-hole the kernel's zap of that view. After release both read -1 and 0.
* ``_bindings`` maps file page -> Memslot (a RangeMap; absent = unbound). Invariant: bound
  ranges never overlap, and each slot's range is ``[slot.pgoff, slot.pgoff + npages)``.
* ``_poisoned`` holds the byte offsets (page aligned) of hwpoisoned pages; a punch clears
  them. Host mappings show poisoned pages as SIGBUS.
* ``_state`` (``gmem_inode.FileState``) holds the per-file attributes of the in-place
  conversion series (profile "next"; default private, shared with INIT_SHARED), the host
  pins (``pin``) and the folio accounting (HugeTLB files: 2 MiB / 1 GiB folios). With
  in-place conversion on, a user mapping shows shared pages and SIGBUSes on private ones:
  each conversion remaps the converted range in every live mapping (one mmap per mapping),
  which is how the model zaps the host's PTEs.
* **Lifetimes.** The file pins the VM (``vm._get_kvm`` at create, ``_put_kvm`` at release).
  The file itself is referenced by its fd and by every live user Mapping (the Mapping's
  release callback drops the reference at munmap, like a VMA's file reference).
  When the last reference goes, ``_gmem_release`` nulls ``gmem`` in every bound memslot
  (the slots stay), notifies the VM's invalidation listeners for each bound range, drops
  the bindings, frees the memory and drops the VM reference. A memslot never pins the file.
* All state is guarded by the owning VM's ``_lock``.

Private memory is never readable by the host: read/pread are refused with the kernel's
errno, and without in-place conversion a file that can be mmap'd without INIT_SHARED (the
only kind a VM with private memory may create before it) SIGBUSes on every touch.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
import weakref
from typing import TYPE_CHECKING

from .. import hostmem
from ..encoding import bytes_arg, check_int, encode_signed, encode_unsigned
from ..errors import oserror
from ..hostmem import MAP_PRIVATE, MAP_SHARED, PROT_EXEC, PROT_READ, PROT_WRITE, Mapping
from ..rangemap import RangeMap
from ..types import FileStat, StatFs
from ..uapi import PAGE_SHIFT, PAGE_SIZE, TASK_SIZE_MAX, Falloc, GuestMemfdFlag
from . import fdtable
from .gmem_inode import PRIVATE, FileOps, FileState, size_label

if TYPE_CHECKING:
    from .memslot import Memslot
    from .vm import Vm

_S_IFREG = 0o100000
_ino_counter = itertools.count(0x6D6F0000)  # st_ino values unique per guest_memfd
_S64_MAX = (1 << 63) - 1
_SEEK_MAX = 4  # SEEK_HOLE
_U64 = (1 << 64) - 1
_MAP_TYPE = 0x0F
_MAP_SHARED_VALIDATE = 0x03
_SEEK_MAX = 4  # SEEK_HOLE
_MAP_GROWSDOWN = 0x0100
_MAP_HUGETLB = 0x40000
# do_mmap's LEGACY_MAP_MASK: SHARED PRIVATE FIXED ANONYMOUS GROWSDOWN DENYWRITE EXECUTABLE LOCKED
# NORESERVE POPULATE NONBLOCK STACK HUGETLB UNINITIALIZED (the file has no extra flags)
_LEGACY_MAP_MASK = 0x01 | 0x02 | 0x10 | 0x20 | 0x100 | 0x800 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 \
    | 0x20000 | 0x40000 | 0x4000000
_MMAP_MAX_LEN = TASK_SIZE_MAX - 0x10000  # get_unmapped_area: TASK_SIZE - mmap_min_addr (default 64 KiB)
_MADV_NOHUGEPAGE = 15
_NAME_MAX = 255

# 6.11+ VFS: FALLOC_FL_MODE_MASK (6.17 added WRITE_ZEROES); 6.8 VFS: FALLOC_FL_SUPPORTED_MASK.
# Plain ints, for two reasons: ``~`` on an IntFlag complements only the known bits, and an IntFlag
# operator costs ~1.1 us where an int one costs ~25 ns; fallocate makes several per call, and
# `guestmem bench fileops` (falloc_4k, punch_4k) times it at ~5 us a call.
_KEEP_SIZE = int(Falloc.KEEP_SIZE)
_PUNCH_HOLE = int(Falloc.PUNCH_HOLE)
_PUNCH_KEEP = _PUNCH_HOLE | _KEEP_SIZE
_ZERO_RANGE = int(Falloc.ZERO_RANGE)
_UNSHARE_RANGE = int(Falloc.UNSHARE_RANGE)
_MODE_MASK_E2 = int(Falloc.PUNCH_HOLE | Falloc.COLLAPSE_RANGE | Falloc.ZERO_RANGE | Falloc.INSERT_RANGE
                    | Falloc.UNSHARE_RANGE | Falloc.WRITE_ZEROES)
_SUPPORTED_MASK_E1 = int(Falloc.KEEP_SIZE | Falloc.PUNCH_HOLE | Falloc.NO_HIDE_STALE | Falloc.COLLAPSE_RANGE
                         | Falloc.ZERO_RANGE | Falloc.INSERT_RANGE | Falloc.UNSHARE_RANGE)
_KNOWN_E2 = _MODE_MASK_E2 | _KEEP_SIZE
_SEVERAL_OPS_OK_E2 = (0, _UNSHARE_RANGE, _ZERO_RANGE)  # ops that take KEEP_SIZE or not
_NO_KEEP_E2 = (int(Falloc.COLLAPSE_RANGE), int(Falloc.INSERT_RANGE), int(Falloc.WRITE_ZEROES))

_empty_fd = -1


def _sigbus_fd() -> int:
    """A process-wide empty memfd: any page mapped from it is past EOF, so touching it SIGBUSes."""
    global _empty_fd
    if _empty_fd < 0:
        _empty_fd = hostmem.memfd("guestmem-gmem-private")
    return _empty_fd


class GuestMemfd(FileOps, fdtable.FdObject):
    """A model guest_memfd, returned by ``Vm.create_guest_memfd`` (KVM_CREATE_GUEST_MEMFD)."""


    def __init__(self, vm: "Vm", size: int, flags: int, folio_size: int = PAGE_SIZE) -> None:
        self.vm = vm
        self.size = size
        self.flags = flags
        self._in_place = vm._profile.gmem_in_place_conversion
        self._state = FileState(size >> PAGE_SHIFT, bool(flags & GuestMemfdFlag.INIT_SHARED),
                                folio_size >> PAGE_SHIFT)
        self._pos = 0  # file position of write() (population via write)
        self._memfd_fd = -1  # created at first use (``_memfd``)
        self._empty_fd = -1  # the empty file behind mappings without INIT_SHARED (6.19+: one per file)
        self._host_addr: int | None = None  # mapped at first use (``_host_address``)
        self._bindings: RangeMap["Memslot | None"] = RangeMap(default=None)
        self._poisoned: set[int] = set()
        self._released = False
        # Live user mappings as (weak Mapping, file offset, prot); dead or closed ones are pruned
        # when the list is walked. A list, not a WeakKeyDictionary: conversions walk it each time.
        self._mappings: "list[tuple[weakref.ref[Mapping], int, int]] | None" = None
        self._ino = next(_ino_counter)
        self._uid, self._gid = os.geteuid(), os.getegid()
        self._mtime_ns = self._ctime_ns = time.time_ns()
        self._refs = 1  # the fd; each live user mapping adds one
        self._fd: int | None = fdtable.fd_install(self, cloexec=False)

    @property
    def released(self) -> bool:
        """guestmem extension: the file is gone (its last reference, fd or mapping or pin, dropped)."""
        return self._released

    def __repr__(self) -> str:
        state = "released" if self._released else f"fd={self._fd}"
        return f"<model GuestMemfd size={self.size:#x} flags={self.flags:#x} {state}>"

    @property
    def _memfd(self) -> int:
        """The backing memfd, created at first use; -1 once released.

        :raises OSError: memfd_create/ftruncate's errno (EMFILE, ENOMEM) if it cannot be created.
        """
        fd = self._memfd_fd
        if fd < 0:
            with self.vm._lock:
                fd = self._memfd_fd
                if fd < 0 and not self._released:
                    fd = self._memfd_fd = hostmem.memfd("guestmem-gmem", self.size)
        return fd

    @property
    def _host_address(self) -> int:
        """The model's view of the whole memfd, mapped at first use; 0 if unmappable or released."""
        addr = self._host_addr
        if addr is None:
            with self.vm._lock:
                addr = self._host_addr
                if addr is None:
                    if self._released:
                        return 0
                    try:
                        addr = hostmem.mmap(self.size, PROT_READ | PROT_WRITE, MAP_SHARED | hostmem.MAP_NORESERVE,
                                            self._memfd, 0)
                    except OSError:
                        addr = 0  # larger than the address space (sizes up to 2**63 are legal)
                    self._host_addr = addr
        return addr

    # --- fd ---------------------------------------------------------------------------------

    def _what(self) -> str:
        return "guest_memfd"

    def close(self) -> None:
        """close(2): drop the fd's file reference; release runs once no mapping remains either.

        Idempotent. Mirrors kvm_gmem_release when the last reference goes.
        """
        with self.vm._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            fdtable.fd_close(fd)
            self._fput()

    def _fput(self) -> None:
        with self.vm._lock:
            self._refs -= 1
            assert self._refs >= 0, "guest_memfd reference underflow"
            if self._refs == 0:
                self._gmem_release()

    def _gmem_release(self) -> None:
        """Last reference gone: null bindings, invalidate, free memory, unpin the VM (kvm_gmem_release)."""
        vm = self.vm
        with vm._lock:
            bound = list(self._bindings) if self._bindings else ()
            for _, _, slot in bound:
                slot.gmem = None
            if bound:
                self._bindings.clear()
            self._released = True
            for pg_start, pg_end, slot in bound:
                gfn = slot.base_gfn + (pg_start - slot.pgoff)
                vm._invalidate_range(gfn, gfn + (pg_end - pg_start))
            if self._host_addr:
                hostmem.munmap(self._host_addr, self.size)
            self._host_addr = 0
            if self._memfd_fd >= 0:
                os.close(self._memfd_fd)
                self._memfd_fd = -1
            if self._empty_fd >= 0:
                os.close(self._empty_fd)
                self._empty_fd = -1
            vm._gmems.discard(self)
        vm._put_kvm()

    # --- fallocate --------------------------------------------------------------------------

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the guest_memfd: VFS checks, then kvm_gmem_fallocate's.

        Errors, in order (6.11+ VFS; profile 6.8 uses the 6.8 VFS errnos, spec 2.2):

        * EBADF: the fd is closed.
        * EINVAL: offset < 0 or length <= 0.
        * EOPNOTSUPP: unknown mode bits; PUNCH_HOLE without KEEP_SIZE; COLLAPSE/INSERT/
          WRITE_ZEROES with KEEP_SIZE; several mode bits.
        * EFBIG: offset + length overflows loff_t.
        * EOPNOTSUPP: KEEP_SIZE not set; any bit besides KEEP_SIZE and PUNCH_HOLE.
        * EINVAL: offset or length not page aligned; allocation past the end of the file.

        Mirrors kvm_gmem_fallocate (punch: kvm_gmem_punch_hole; allocate: kvm_gmem_allocate).
        """
        with self.vm._lock:
            self._check()
            mode = encode_unsigned(mode, 32, "mode")
            offset, length = encode_signed(offset, 64, "offset"), encode_signed(length, 64, "len")
            self._vfs_fallocate_checks(mode, offset, length)
            if not mode & _KEEP_SIZE:
                raise oserror(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}: guest_memfd requires KEEP_SIZE")
            if mode & ~_PUNCH_KEEP:
                raise oserror(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}: only KEEP_SIZE and PUNCH_HOLE")
            if (offset | length) & (PAGE_SIZE - 1):
                raise oserror(errno.EINVAL, f"offset {offset:#x} / len {length:#x} not page aligned")
            folio = self._state.folio_pages << PAGE_SHIFT
            if (offset | length) & (folio - 1):
                raise oserror(errno.EINVAL, f"offset {offset:#x} / len {length:#x} not aligned to the "
                                            f"{size_label(folio)} folios of this HugeTLB guest_memfd")
            if mode & _PUNCH_HOLE:
                self._gmem_punch_hole(offset, length)
            else:
                if offset + length > self.size:
                    raise oserror(errno.EINVAL,
                                  f"allocate [{offset:#x}, {offset + length:#x}) beyond size {self.size:#x}")
                self._gmem_allocate(offset, length)
            self._mtime_ns = self._ctime_ns = time.time_ns()  # file_modified()

    def _vfs_fallocate_checks(self, mode: int, offset: int, length: int) -> None:
        """vfs_fallocate's generic checks, in the order of the profile's kernel."""
        if offset < 0 or length <= 0:
            raise oserror(errno.EINVAL, f"fallocate offset {offset} / len {length} out of range")
        keep = _KEEP_SIZE
        if self.vm._profile.vfs_fallocate_611:
            if mode & ~_KNOWN_E2:
                raise oserror(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} has unknown bits")
            op = mode & _MODE_MASK_E2
            if op == _PUNCH_HOLE:
                if not mode & keep:
                    raise oserror(errno.EOPNOTSUPP, "PUNCH_HOLE requires KEEP_SIZE")
            elif op in _NO_KEEP_E2:
                if mode & keep:
                    raise oserror(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} does not take KEEP_SIZE")
            elif op not in _SEVERAL_OPS_OK_E2:
                raise oserror(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} combines several operations")
        else:
            if mode & ~_SUPPORTED_MASK_E1:
                raise oserror(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} has unknown bits")
            if mode & (_PUNCH_HOLE | _ZERO_RANGE) == _PUNCH_HOLE | _ZERO_RANGE:
                raise oserror(errno.EOPNOTSUPP, "PUNCH_HOLE and ZERO_RANGE are exclusive")
            if mode & _PUNCH_HOLE and not mode & keep:
                raise oserror(errno.EOPNOTSUPP, "PUNCH_HOLE requires KEEP_SIZE")
            for op in (Falloc.COLLAPSE_RANGE, Falloc.INSERT_RANGE):
                if mode & op.value and mode & ~op.value:
                    raise oserror(errno.EINVAL, f"fallocate mode {mode:#x}: {op.name} must be used alone")
            if mode & _UNSHARE_RANGE and mode & ~(_UNSHARE_RANGE | keep):
                raise oserror(errno.EINVAL, f"fallocate mode {mode:#x}: UNSHARE_RANGE only with KEEP_SIZE")
        if offset + length > _S64_MAX:
            raise oserror(errno.EFBIG, f"fallocate range [{offset:#x}, +{length:#x}) exceeds the maximum file size")

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(KEEP_SIZE): allocate pages of [offset, offset+length); errors as ``fallocate``."""
        self.fallocate(_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(PUNCH_HOLE|KEEP_SIZE): free pages; never fails past EOF. Errors as ``fallocate``."""
        self.fallocate(_PUNCH_KEEP, offset, length)

    def _gmem_allocate(self, offset: int, length: int) -> None:
        """Allocate missing pages (kvm_gmem_allocate); E1 zeroes here, E2 at first use: both read zero.

        Creating the backing memfd on the first allocation can fail too; like a failed page
        allocation, that is ENOMEM (the kernel's only allocation-failure errno here besides EINTR).
        """
        if self._state.folio_pages > 1:
            # HugeTLB: the folios are accounted here; the model's memfd fills in 4 KiB pages
            # only where they are touched, so a 1 GiB folio costs the host nothing until used.
            self._state.allocated.set(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT, True)
            return
        try:
            fd = self._memfd_fd
            if fd < 0:
                fd = self._memfd
            hostmem.fallocate_encoded(fd, 0, offset, length)
            self._state.allocated.set(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT, True)
        except OSError as exc:
            err = errno.ENOMEM if exc.errno in (errno.ENOSPC, errno.EMFILE, errno.ENFILE) else exc.errno
            raise oserror(err, f"allocating [{offset:#x}, {offset + length:#x})") from None

    def _gmem_punch_hole(self, offset: int, length: int) -> None:
        """Free [offset, offset+length), clear hwpoison there, then invalidate bound GFNs (kvm_gmem_punch_hole)."""
        end = offset + length
        if end > self.size:
            end = self.size
        if offset >= end:
            return  # entirely past EOF: success, nothing to do
        st = self._state
        if st.folio_pages > 1:
            # HugeTLB: split folios are merged back before the whole folio is freed, which
            # needs every page unreferenced (the series' truncate path).
            busy = st.first_busy(offset >> PAGE_SHIFT, end >> PAGE_SHIFT)
            if busy is not None:
                raise oserror(errno.EAGAIN, f"punching [{offset:#x}, {end:#x}): page {busy << PAGE_SHIFT:#x} "
                                            "is in use (pinned)")
            st.merges += st.punch_merges(self._memfd_fd, offset >> PAGE_SHIFT, end >> PAGE_SHIFT)
        st.allocated.set(offset >> PAGE_SHIFT, end >> PAGE_SHIFT, False)
        if self._memfd_fd >= 0:  # without a memfd no page was ever allocated
            hostmem.fallocate_encoded(self._memfd_fd, _PUNCH_KEEP, offset, end - offset)
        if self._poisoned:
            healed = sorted(p for p in self._poisoned if offset <= p < end)
            for page in healed:
                self._poisoned.discard(page)
                self._remap_user_page(page, poisoned=False)
        if self._bindings:  # no memslot maps the file: no GFN to invalidate
            self._invalidate_file_range(offset >> PAGE_SHIFT, end >> PAGE_SHIFT)

    def _invalidate_file_range(self, pg_start: int, pg_end: int) -> None:
        """Notify the VM for every bound part of file pages [pg_start, pg_end) (kvm_gmem_invalidate_begin)."""
        for s, e, slot in self._bindings.stored(pg_start, pg_end):
            gfn = slot.base_gfn + (s - slot.pgoff)
            self.vm._invalidate_range(gfn, gfn + (e - s))

    # --- hwpoison (model only) --------------------------------------------------------------

    def inject_hwpoison(self, offset: int) -> None:
        """Model-only: mark the page at ``offset`` as hit by a memory error (kvm_gmem_error_folio).

        The page stays in the file; bound GFNs are invalidated, guest access then exits with
        EHWPOISON and host mappings SIGBUS until the page is punched.

        :raises OSError: EBADF if closed; EINVAL if ``offset`` is unaligned or past the end.
        """
        with self.vm._lock:
            self._check()
            check_int(offset, "offset")
            if offset < 0 or offset % PAGE_SIZE or offset >= self.size:
                raise oserror(errno.EINVAL, f"hwpoison offset {offset:#x} is not a page of the file")
            if offset in self._poisoned:
                return
            self._poisoned.add(offset)
            self._remap_user_page(offset, poisoned=True)
            self._invalidate_file_range(offset >> PAGE_SHIFT, (offset >> PAGE_SHIFT) + 1)

    def _remap_user_page(self, offset: int, poisoned: bool) -> None:
        """Make every live user mapping of ``offset`` SIGBUS (poisoned) or show the page again."""
        self._user_view(offset, offset + PAGE_SIZE)

    def _host_visible(self) -> bool:
        """Whether user mappings can show any page (else they SIGBUS everywhere)."""
        return self._in_place or bool(self.flags & GuestMemfdFlag.INIT_SHARED)

    def _user_view(self, start: int, end: int) -> None:
        """Remap bytes [start, end) of the file in every live user mapping from the file's state:
        shared pages show the memory, private (in-place) and poisoned pages SIGBUS."""
        if self._mappings is None or not self._host_visible():
            return
        live = []
        for entry in self._mappings:
            m = entry[0]()
            if m is None or m.closed:
                continue
            live.append(entry)
            base, prot = entry[1], entry[2]
            lo, hi = max(start, base), min(end, base + m.length, self.size)
            if lo < hi:
                self._map_range(m.address - base, lo, hi, prot)
        if len(live) != len(self._mappings):
            self._mappings = live

    def _map_range(self, delta: int, lo: int, hi: int, prot: int) -> None:
        """Map file bytes [lo, hi) at address ``delta + offset`` by the file's state (no EOF part)."""
        fixed = MAP_SHARED | hostmem.MAP_FIXED
        if self._in_place:
            for s, e, v in self._state.attributes.ranges(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT):
                fd = _sigbus_fd() if v == PRIVATE else self._memfd
                hostmem.mmap((e - s) << PAGE_SHIFT, prot, fixed, fd, s << PAGE_SHIFT, delta + (s << PAGE_SHIFT))
        else:
            hostmem.mmap(hi - lo, prot, fixed, self._memfd, lo, delta + lo)
        for page in self._poisoned:
            if lo <= page < hi:
                hostmem.mmap(PAGE_SIZE, prot, fixed, _sigbus_fd(), 0, delta + page)

    # --- mmap -------------------------------------------------------------------------------

    def mmap(self, length: int | None = None, offset: int = 0, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_SHARED) -> Mapping:
        """mmap(2) of the guest_memfd (do_mmap's checks, then kvm_gmem_mmap); the Mapping keeps the file alive.

        Arguments are encoded by ``hostmem.gmem_mmap_args`` (both backends). Errors, in the
        kernel's order: EBADF closed; EINVAL offset unaligned; EINVAL MAP_HUGETLB; EINVAL
        length 0; ENOMEM length beyond the address space, or no room for it (before every later
        error); EOVERFLOW offset + length beyond
        the maximum file size (a negative offset too); EOPNOTSUPP MAP_SHARED_VALIDATE with
        flags outside the legacy set; EINVAL unknown map type; EPERM PROT_EXEC (noexec
        mount); ENODEV no mmap method (before 6.18); EINVAL MAP_GROWSDOWN; ENODEV without
        GUEST_MEMFD_FLAG_MMAP; EINVAL not MAP_SHARED. Touching past EOF, any page without INIT_SHARED, or a
        hwpoisoned page raises SIGBUS.
        """
        with self.vm._lock:
            self._check()
            length = self.size if length is None else length
            length, offset, prot, flags = hostmem.gmem_mmap_args(length, offset, prot, flags)
            self._do_mmap_checks(length, offset, prot, flags)
            profile = self.vm._profile
            if self._host_visible():
                mapping = hostmem.map_file(length, prot, MAP_SHARED, self._memfd, offset, release=self._fput)
            elif profile.gmem_mempolicy_per_file:
                # No shared pages exist without INIT_SHARED or in-place conversion: SIGBUS
                # everywhere. One empty file per guest_memfd, so an mbind policy belongs to
                # the file (6.19+).
                if self._empty_fd < 0:
                    self._empty_fd = hostmem.memfd("guestmem-gmem-private")
                mapping = hostmem.map_file(length, prot, MAP_SHARED, self._empty_fd, offset, release=self._fput)
            else:
                empty = hostmem.memfd("guestmem-gmem-private")  # per mapping: mbind stays per VMA
                try:
                    mapping = hostmem.map_file(length, prot, MAP_SHARED, empty, offset, release=self._fput)
                finally:
                    os.close(empty)
            self._refs += 1  # dropped by the mapping's release (munmap, or GC of its last buffer)
            try:
                if self._host_visible() and (self._in_place or self._poisoned) and offset < self.size:
                    self._map_range(mapping.address - offset, offset, min(offset + length, self.size), prot)
                if profile.gmem_collapse_einval:
                    # The kernel's gmem VMA never takes huge pages (MADV_COLLAPSE: EINVAL); a memfd
                    # VMA would, unless marked NOHUGEPAGE.
                    hostmem.madvise(mapping.address, length, _MADV_NOHUGEPAGE)
            except BaseException:
                mapping.close()
                raise
            if self._mappings is None:
                self._mappings = []
            self._mappings.append((weakref.ref(mapping), offset, prot))
            return mapping

    def _do_mmap_checks(self, length: int, offset: int, prot: int, flags: int) -> None:
        """The mmap syscall's and do_mmap's checks for this file, then kvm_gmem_mmap's (encoded args)."""
        if offset & (PAGE_SIZE - 1):
            raise oserror(errno.EINVAL, f"mmap offset {offset:#x} is not page aligned")
        if flags & _MAP_HUGETLB:
            raise oserror(errno.EINVAL, "MAP_HUGETLB on a file that is not hugetlbfs")
        if length == 0:
            raise oserror(errno.EINVAL, "mmap length 0")
        pages = (length + PAGE_SIZE - 1) >> PAGE_SHIFT
        if pages << PAGE_SHIFT > _MMAP_MAX_LEN:
            raise oserror(errno.ENOMEM, f"mmap length {length:#x} exceeds the user address space")
        try:
            self._do_mmap_file_checks(length, pages, offset, prot, flags)
        except OSError:
            # do_mmap places the mapping (get_unmapped_area) before it checks the file: with no
            # room for the length, ENOMEM wins. Looked up on this error path only; a mapping
            # that passes the checks meets the same ENOMEM when the host maps it.
            if not hostmem.room_for(pages << PAGE_SHIFT, TASK_SIZE_MAX - _MMAP_MAX_LEN, TASK_SIZE_MAX):
                raise oserror(errno.ENOMEM, f"mmap length {length:#x}: no room in the address space") from None
            raise

    def _do_mmap_file_checks(self, length: int, pages: int, offset: int, prot: int, flags: int) -> None:
        """do_mmap's checks after the mapping has a place, then kvm_gmem_mmap's."""
        pgoff = (offset & _U64) >> PAGE_SHIFT
        if pgoff > (_S64_MAX - (pages << PAGE_SHIFT)) >> PAGE_SHIFT:  # file_mmap_ok
            raise oserror(errno.EOVERFLOW, f"mmap [{offset:#x}, +{length:#x}) exceeds the maximum file size")
        map_type = flags & _MAP_TYPE
        if map_type == _MAP_SHARED_VALIDATE and flags & ~_LEGACY_MAP_MASK:
            raise oserror(errno.EOPNOTSUPP, f"mmap flags {flags:#x} outside the validated set")
        if map_type not in (MAP_SHARED, _MAP_SHARED_VALIDATE, MAP_PRIVATE):
            raise oserror(errno.EINVAL, f"mmap type {map_type:#x} is unknown")
        if prot & PROT_EXEC and self.vm._profile.gmem_noexec:
            raise oserror(errno.EPERM, "guest_memfd lives on a noexec mount: PROT_EXEC refused")
        if not self.vm._profile.gmem_mmap:  # do_mmap: the file has no mmap method before 6.18
            raise oserror(errno.ENODEV, "guest_memfd has no mmap method on this kernel")
        if flags & _MAP_GROWSDOWN:
            raise oserror(errno.EINVAL, "MAP_GROWSDOWN on a file mapping")
        if not self.flags & GuestMemfdFlag.MMAP:  # kvm_gmem_mmap
            raise oserror(errno.ENODEV, "guest_memfd was created without GUEST_MEMFD_FLAG_MMAP")
        if map_type == MAP_PRIVATE:
            raise oserror(errno.EINVAL, "guest_memfd mappings must be MAP_SHARED")

    # --- refused file operations ------------------------------------------------------------

    def read(self, n: int) -> bytes:
        """read(2) of ``n`` (size_t) bytes: EBADF if closed, else EINVAL (no read method)."""
        self._check()
        encode_unsigned(n, 64, "n")
        raise oserror(errno.EINVAL, "guest_memfd does not support read")

    def write(self, data: bytes) -> int:
        """write(2): EBADF if closed; EINVAL without write population (no write method).

        With ``Profile.gmem_write`` (profile "next") it writes at the file position and
        advances it; errors as ``pwrite``.
        """
        with self.vm._lock:
            self._check()
            view = bytes_arg(data, "data")
            if not self.vm._profile.gmem_write:
                raise oserror(errno.EINVAL, "guest_memfd does not support write")
            n = self._gmem_write(view.tobytes(), self._pos)
            self._pos += n
            return n

    def pread(self, n: int, offset: int) -> bytes:
        """pread(2): EBADF if closed; EINVAL for a negative ``offset`` (loff_t, checked before
        the file); else ESPIPE (the file is not positional). Mirrors ksys_pread64."""
        self._check()
        encode_unsigned(n, 64, "n")
        if encode_signed(offset, 64, "offset") < 0:
            raise oserror(errno.EINVAL, f"pread offset {offset:#x} is negative")
        raise oserror(errno.ESPIPE, "guest_memfd is not seekable")

    def pwrite(self, data: bytes, offset: int) -> int:
        """pwrite(2): EBADF if closed; EINVAL offset < 0 (ksys_pwrite64, before the file); ESPIPE
        without write population (the file is not positional).

        With ``Profile.gmem_write`` (profile "next", the in-flight "population via write"
        series): writes ``data`` into shared pages at ``offset`` and returns its length.
        Errors, in order: EINVAL offset < 0; EINVAL the range ends past the file size;
        EINVAL offset or length not page aligned (kvm_gmem_write_begin); EPERM a page in the
        range is private (inferred: host writes never reach private memory); ENOMEM.
        """
        with self.vm._lock:
            self._check()
            view, offset = bytes_arg(data, "data"), encode_signed(offset, 64, "offset")
            if not self.vm._profile.gmem_write:
                if offset < 0:  # ksys_pwrite64 checks the position before the file
                    raise oserror(errno.EINVAL, f"pwrite offset {offset:#x} is negative")
                raise oserror(errno.ESPIPE, "guest_memfd is not seekable")
            return self._gmem_write(view.tobytes(), offset)

    def lseek(self, offset: int, whence: int) -> int:
        """lseek(2): EBADF if closed; EINVAL whence > SEEK_HOLE (ksys_lseek, before the file's
        llseek); ESPIPE without write population (no_llseek), whatever the offset.

        With ``Profile.gmem_write``: default_llseek (SEEK_SET/CUR/END; EINVAL for another
        whence or a negative result).
        """
        with self.vm._lock:
            self._check()
            offset, whence = encode_signed(offset, 64, "offset"), encode_unsigned(whence, 32, "whence")
            if whence > _SEEK_MAX:  # ksys_lseek, before the file's llseek
                raise oserror(errno.EINVAL, f"lseek whence {whence:#x} > SEEK_MAX")
            if not self.vm._profile.gmem_write:
                raise oserror(errno.ESPIPE, "guest_memfd is not seekable")
            base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}.get(whence)
            if base is None or base + offset < 0:
                raise oserror(errno.EINVAL, f"lseek({offset}, whence={whence})")
            self._pos = base + offset
            return self._pos

    # --- fstat ------------------------------------------------------------------------------

    def fstatfs(self) -> StatFs:
        """fstatfs(2): the filesystem of the file, simple_statfs of its pseudo-fs: f_type is
        ANON_INODE_FS_MAGIC until 6.18, GUEST_MEMFD_MAGIC from 6.19 (profile
        ``gmem_fs_magic``); f_bsize 4096, f_namelen 255.

        :raises OSError: EBADF if closed.
        """
        self._check()
        return StatFs(f_type=self.vm._profile.gmem_fs_magic, f_bsize=PAGE_SIZE, f_namelen=_NAME_MAX)

    def fstat(self) -> FileStat:
        """fstat(2): S_IFREG|0600, st_size = size, blksize 4096, blocks 0, nlink 1, unique ino.

        :raises OSError: EBADF if closed.
        """
        with self.vm._lock:
            self._check()
            return FileStat(st_mode=_S_IFREG | 0o600, st_ino=self._ino, st_size=self.size,
                            st_blksize=PAGE_SIZE, st_blocks=0, st_nlink=1, st_uid=self._uid,
                            st_gid=self._gid, st_mtime_ns=self._mtime_ns, st_ctime_ns=self._ctime_ns)
