"""Per-file memory state of the in-place conversion series: attributes, pins and folios.

Data model
----------
With ``kvm.gmem_in_place_conversion`` on (profile "next"), shared/private is a property of
the guest_memfd inode, not of the VM's GFNs. ``FileState`` is the part of the model's
``GuestMemfd`` that holds it; the file's public methods validate and lock, then call in here.

* ``attributes`` is a RangeMap over file pages whose default is the file's initial state:
  PRIVATE, or 0 (shared) with GUEST_MEMFD_FLAG_INIT_SHARED. A fresh file stores no run; a
  file of any size with n conversions stores O(n) runs, and a conversion costs O(log n)
  whatever it covers (a RangeMap set); ``shared_pages()`` sums the stored runs (introspection).
* ``pins`` holds the live host references (``GuestMemfd.pin``: a DMA pin, a long-lived
  page reference) as page ranges, keyed by handle. A conversion to private fails with EAGAIN
  while a pin overlaps it; ``first_busy`` gives the first busy page. Pins are few; their
  list is scanned, the attributes are not.
* ``folio_pages`` is the folio size in pages: 1 for ordinary files, 512 (2 MiB) or 262144
  (1 GiB) for HugeTLB files. A HugeTLB block (aligned folio-sized range) with any allocated
  page counts as one allocated huge folio; it is *split* (its pages are 4 KiB folios) while
  any of its pages is shared and *merged* back when all of them are private again (the
  series splits on conversion to shared so the host can map and reference single pages).
  ``splits`` and ``merges`` count those events. Which pages are allocated is the union of
  ``allocated`` (runs allocated explicitly: fallocate, pin, write) and the backing memfd's
  data extents (SEEK_DATA/SEEK_HOLE: pages a guest or host touch filled in; shmem reports
  fallocated but untouched pages as holes), so it costs O(runs + extents). The model's memfd
  may hold only some 4 KiB pages of an allocated block.

Invariants: ``attributes`` holds only 0 and PRIVATE, inside [0, npages); every pin lies inside the file and covers only
pages that were shared when it was taken.
"""

from __future__ import annotations

import errno
import os
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ..encoding import encode_array, encode_signed, encode_unsigned
from ..errors import oserror
from ..rangemap import RangeMap
from ..uapi import PAGE_SHIFT, PAGE_SIZE, GuestMemfdFlag, MemoryAttribute

if TYPE_CHECKING:
    from .vm import Vm

PRIVATE = int(MemoryAttribute.PRIVATE)  # stored in the attribute maps, which the fault path tests with &
_U64 = (1 << 64) - 1


def size_label(nbytes: int) -> str:
    """"4K", "2M", "1G" for a folio size in bytes."""
    return f"{nbytes >> 30}G" if nbytes >= 1 << 30 else f"{nbytes >> 20}M" if nbytes >= 1 << 20 else f"{nbytes >> 10}K"


def _block_runs(runs: Iterable[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Merged runs of block indices (blocks of ``n`` pages) touched by page runs ``runs``."""
    out: list[tuple[int, int]] = []
    for s, e in runs:
        lo, hi = s // n, -(-e // n)
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _measure(a: list[tuple[int, int]], b: list[tuple[int, int]], c: list[tuple[int, int]]) -> int:
    """Length of (a ∩ b) minus c, for sorted disjoint run lists (a sweep over their bounds)."""
    points = sorted({p for runs in (a, b, c) for r in runs for p in r})
    total = 0
    ia = ib = ic = 0
    for lo, hi in zip(points, points[1:]):
        while ia < len(a) and a[ia][1] <= lo:
            ia += 1
        while ib < len(b) and b[ib][1] <= lo:
            ib += 1
        while ic < len(c) and c[ic][1] <= lo:
            ic += 1
        in_a = ia < len(a) and a[ia][0] <= lo
        in_b = ib < len(b) and b[ib][0] <= lo
        in_c = ic < len(c) and c[ic][0] <= lo
        if in_a and in_b and not in_c:
            total += hi - lo
    return total


class FileState:
    """Attributes, pins and folio accounting of one guest_memfd (see the module docstring)."""

    __slots__ = ("npages", "attributes", "pins", "folio_pages", "splits", "merges", "allocated")

    def __init__(self, npages: int, init_shared: bool, folio_pages: int = 1) -> None:
        self.npages = npages
        self.attributes: RangeMap[int] = RangeMap(default=0 if init_shared else PRIVATE)
        self.pins: dict[int, tuple[int, int]] = {}
        self.folio_pages = folio_pages
        self.splits = 0
        self.merges = 0
        self.allocated: RangeMap[bool] = RangeMap(default=False)

    # --- attributes -----------------------------------------------------------------------------

    def is_private(self, page: int) -> bool:
        return self.attributes.get(page) == PRIVATE

    def shared_pages(self) -> int:
        """Pages whose attribute is 0 (O(runs): the stored runs are the non-default ones)."""
        stored = sum(e - s for s, e, _ in self.attributes)
        return stored if self.attributes.default == PRIVATE else self.npages - stored

    def _shared_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(s, e) for s, e, v in self.attributes.ranges(start, end) if v == 0]

    def store(self, start: int, end: int, value: int, memfd: int) -> None:
        """Set pages [start, end) to ``value`` (validated, not a no-op) and account folios."""
        huge = self.folio_pages > 1
        if huge:
            n = self.folio_pages
            blo, bhi = (start // n) * n, -(-end // n) * n
            before = _block_runs(self._shared_runs(blo, bhi), n)
        self.attributes.set(start, end, value)
        if huge:
            after = _block_runs(self._shared_runs(blo, bhi), n)
            allocated = self.allocated_blocks(memfd, blo, bhi)
            self.splits += _measure(allocated, after, before)
            self.merges += _measure(allocated, before, after)

    # --- pins -----------------------------------------------------------------------------------

    def first_busy(self, start: int, end: int) -> int | None:
        """The first page of [start, end) held by a pin, or None."""
        if not self.pins:
            return None
        busy = [max(s, start) for s, e in self.pins.values() if s < end and e > start]
        return min(busy) if busy else None

    # --- folios ---------------------------------------------------------------------------------

    def allocated_runs(self, memfd: int, start: int, end: int) -> list[tuple[int, int]]:
        """Merged page runs of [start, end) holding memory (explicit allocations and data)."""
        runs = sorted([(s, e) for s, e, _ in self.allocated.stored(start, end)] + list(_data_extents(memfd, start, end)))
        out: list[tuple[int, int]] = []
        for s, e in runs:
            s, e = max(s, start), min(e, end)
            if out and s <= out[-1][1]:
                if e > out[-1][1]:
                    out[-1] = (out[-1][0], e)
            elif s < e:
                out.append((s, e))
        return out

    def allocated_blocks(self, memfd: int, start: int, end: int) -> list[tuple[int, int]]:
        """Merged runs of block indices in pages [start, end) holding allocated memory."""
        return _block_runs(self.allocated_runs(memfd, start, end), self.folio_pages)

    def punch_merges(self, memfd: int, start: int, end: int) -> int:
        """Split allocated blocks inside [start, end) (block aligned): merged before they are freed."""
        n = self.folio_pages
        split = _block_runs(self._shared_runs(start, end), n)
        return _measure(self.allocated_blocks(memfd, start, end), split, [])

    def folio_counts(self, memfd: int) -> dict[int, int]:
        """Folios by size in bytes: {4096: n, folio size: m} (O(runs + extents))."""
        n = self.folio_pages
        if n == 1:
            return {1 << PAGE_SHIFT: sum(e - s for s, e in self.allocated_runs(memfd, 0, self.npages))}
        allocated = self.allocated_blocks(memfd, 0, self.npages)
        split = _measure(allocated, _block_runs(self._shared_runs(0, self.npages), n), [])
        whole = sum(e - s for s, e in allocated) - split
        return {1 << PAGE_SHIFT: split * n, n << PAGE_SHIFT: whole}

    def check(self) -> None:
        """Assert the invariants (tests; O(runs))."""
        self.attributes.check()
        assert all(v == PRIVATE or v == 0 for _, _, v in self.attributes.ranges(0, self.npages))
        assert all(0 <= s < e <= self.npages for s, e, _ in self.attributes)
        for s, e in self.pins.values():
            assert 0 <= s < e <= self.npages


def _data_extents(memfd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Page runs of [start, end) that hold allocated pages in ``memfd`` (SEEK_DATA/SEEK_HOLE)."""
    if memfd < 0:
        return
    pos, limit = start << PAGE_SHIFT, end << PAGE_SHIFT
    while pos < limit:
        try:
            data = os.lseek(memfd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data at or after pos
            return
        if data >= limit:
            return
        hole = min(os.lseek(memfd, data, os.SEEK_HOLE), limit)
        yield data >> PAGE_SHIFT, -(-hole >> PAGE_SHIFT)
        pos = hole


class GmemPin:
    """A host reference on pages of a guest_memfd (``GuestMemfd.pin``); ``release()`` drops it.

    Model-only: stands for a DMA pin (pin_user_pages) or a long-lived page reference taken
    through a host mapping. While it lives, converting its pages to private fails with
    EAGAIN and the file stays open (the pin holds a file reference, as its mapping would).
    A pin garbage-collected unreleased is released then, with a ResourceWarning (as an
    unclosed Python file is); until then it holds its pages and its file.
    """

    __slots__ = ("offset", "length", "_gmem", "__weakref__")

    def __init__(self, gmem: "FileOps", offset: int, length: int) -> None:
        self.offset, self.length, self._gmem = offset, length, gmem

    @property
    def released(self) -> bool:
        return self._gmem is None

    def release(self) -> None:
        """Drop the pin (idempotent)."""
        gmem, self._gmem = self._gmem, None
        if gmem is not None:
            gmem._unpin(self)

    def __del__(self) -> None:
        if getattr(self, "_gmem", None) is not None:
            warnings.warn(f"unreleased {self!r}", ResourceWarning, source=self, stacklevel=2)
            self.release()

    def __enter__(self) -> "GmemPin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._gmem is None else "held"
        return f"<GmemPin [{self.offset:#x}, +{self.length:#x}) {state}>"


class FileOps:
    """The in-place conversion methods of the model's ``GuestMemfd`` (mixed into it; this module
    keeps them beside the state they manage). They use the file's ``vm``, ``size``, ``flags``,
    ``_state``, ``_memfd`` and the helpers ``_check``, ``_gmem_allocate``, ``_user_view``,
    ``_invalidate_file_range`` and ``_fput``."""

    vm: "Vm"
    size: int
    flags: int
    _state: FileState
    _in_place: bool
    _refs: int
    _memfd_fd: int
    _memfd: int
    _bindings: Any

    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0,
                              reserved: object = None) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd (in-place conversion series v8, spec 13.2).

        Sets pages [offset, offset+size) of the file private (``attributes`` = PRIVATE) or
        shared (0). To private, host mappings of the range are zapped and pages still
        referenced (``pin``) refuse the conversion; to shared needs no check. Guest mappings
        of the bound GFNs are invalidated. A range that already has ``attributes`` is a no-op.

        Errors, in order: EBADF closed; ENOTTY without ``kvm.gmem_in_place_conversion``;
        EINVAL flags or a reserved word non-zero; EINVAL the VM has no private memory;
        EINVAL attributes other than PRIVATE; EINVAL size 0 or offset + size wraps; EINVAL
        not page aligned; EINVAL past the end of the file; EAGAIN a page is in use, with the
        exception's ``error_offset`` set to the first busy page (attributes unchanged).
        Mirrors kvm_gmem_set_attributes / __kvm_gmem_set_attributes.
        """
        with self.vm._lock:
            self._check()
            offset, size = encode_unsigned(offset, 64, "offset"), encode_unsigned(size, 64, "size")
            attributes, flags = encode_unsigned(attributes, 64, "attributes"), encode_unsigned(flags, 64, "flags")
            words = () if reserved is None else encode_array(reserved, 11, 64, "reserved")
            if not self._in_place:
                raise oserror(errno.ENOTTY, "KVM_SET_MEMORY_ATTRIBUTES2 needs kvm.gmem_in_place_conversion")
            if flags or any(words):
                raise oserror(errno.EINVAL, f"flags {flags:#x} and reserved words must be 0")
            if not self.vm._private_mem:
                raise oserror(errno.EINVAL, "the guest_memfd's VM has no private memory")
            if attributes & ~PRIVATE:
                raise oserror(errno.EINVAL, f"attributes {attributes:#x} outside supported {PRIVATE:#x}")
            if size == 0 or offset + size > _U64:
                raise oserror(errno.EINVAL, f"range [{offset:#x}, +{size:#x}) is empty or wraps")
            if (offset | size) & (PAGE_SIZE - 1):
                raise oserror(errno.EINVAL, f"range [{offset:#x}, +{size:#x}) is not page aligned")
            if offset + size > self.size:
                raise oserror(errno.EINVAL, f"range [{offset:#x}, +{size:#x}) ends past the file size {self.size:#x}")
            self._gmem_set_attributes(offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT, attributes)

    def _gmem_set_attributes(self, start: int, end: int, attributes: int) -> None:
        """Validated conversion of file pages [start, end) (caller holds the VM lock)."""
        st = self._state
        if st.attributes.uniform(start, end) == attributes:
            return
        if attributes == PRIVATE:
            # The kernel zaps host mappings first and then finds the busy page; a zapped shared
            # page refaults unchanged, so checking first leaves the same visible state on EAGAIN.
            busy = st.first_busy(start, end)
            if busy is not None:
                err = oserror(errno.EAGAIN, f"converting [{start << PAGE_SHIFT:#x}, {end << PAGE_SHIFT:#x}) to "
                                            f"private: page {busy << PAGE_SHIFT:#x} is in use")
                err.error_offset = busy << PAGE_SHIFT  # type: ignore[attr-defined]
                raise err
        st.store(start, end, attributes, self._memfd_fd)
        self._user_view(start << PAGE_SHIFT, end << PAGE_SHIFT)
        if self._bindings:
            self._invalidate_file_range(start, end)

    def pin(self, offset: int, length: int) -> GmemPin:
        """Model-only: hold pages [offset, offset+length) the way a DMA pin or a long-lived host
        reference does; returns a ``GmemPin`` to ``release()``.

        The pages are allocated (as a host fault would). While pinned, converting any of them
        to private fails with EAGAIN (and punching a HugeTLB file's folio holding them).
        Errors: EBADF closed; EINVAL length 0, not page aligned or past the file; EFAULT a
        page the host cannot reach (no GUEST_MEMFD_FLAG_MMAP, or a private page).
        """
        with self.vm._lock:
            self._check()
            offset, length = encode_unsigned(offset, 64, "offset"), encode_unsigned(length, 64, "length")
            if length == 0 or (offset | length) & (PAGE_SIZE - 1) or offset + length > self.size:
                raise oserror(errno.EINVAL, f"pin [{offset:#x}, +{length:#x}) is not whole pages of the file")
            start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
            if not self.vm._profile.gmem_mmap or not self.flags & GuestMemfdFlag.MMAP:
                raise oserror(errno.EFAULT, "pin: the guest_memfd cannot be mapped by the host")
            private = (self._state.attributes.uniform(start, end) != 0 if self._in_place
                       else not self.flags & GuestMemfdFlag.INIT_SHARED)
            if private:
                raise oserror(errno.EFAULT, f"pin [{offset:#x}, +{length:#x}): private pages cannot be pinned")
            self._gmem_allocate(offset, length)
            handle = GmemPin(self, offset, length)
            self._state.pins[id(handle)] = (start, end)
            self._refs += 1
            return handle

    def _unpin(self, handle: GmemPin) -> None:
        with self.vm._lock:
            del self._state.pins[id(handle)]
            self._fput()

    def stats(self) -> dict:
        """guestmem extension: the file's pages and folios.

        ``pages_private`` / ``pages_shared`` by attribute (all private or all shared without
        in-place conversion, by INIT_SHARED), ``pages_allocated`` (4 KiB pages of memory held),
        ``folios`` by size label, ``splits`` / ``merges`` of huge folios, live ``pins``.
        :raises OSError: EBADF if closed.
        """
        with self.vm._lock:
            self._check()
            return self._stats()

    def _stats(self) -> dict:
        st, fd = self._state, self._memfd_fd
        shared = st.shared_pages()
        if st.folio_pages > 1:  # whole folios are charged
            allocated = sum(e - s for s, e in st.allocated_blocks(fd, 0, st.npages)) * st.folio_pages
        else:
            allocated = os.fstat(fd).st_blocks * 512 >> PAGE_SHIFT if fd >= 0 else 0
        return {
            "size": self.size,
            "folio_size": st.folio_pages << PAGE_SHIFT,
            "pages_private": st.npages - shared,
            "pages_shared": shared,
            "pages_allocated": allocated,
            "attribute_ranges": len(st.attributes),
            "folios": {size_label(k): v for k, v in st.folio_counts(fd).items()},
            "splits": st.splits,
            "merges": st.merges,
            "pins": len(st.pins),
        }

    def truncate(self, length: int) -> None:
        """ftruncate(2) to ``length`` (loff_t): EBADF if closed, else EINVAL (the size is
        immutable; kvm_gmem_setattr)."""
        self._check()
        encode_signed(length, 64, "length")
        raise oserror(errno.EINVAL, "guest_memfd size is immutable")

    def _gmem_write(self, data: bytes, offset: int) -> int:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        offset = encode_signed(offset, 64, "offset")
        n = len(data)
        if offset < 0:
            raise oserror(errno.EINVAL, f"write offset {offset} is negative")
        if n == 0:
            return 0
        if offset + n > self.size:
            raise oserror(errno.EINVAL, f"write [{offset:#x}, +{n:#x}) ends past the file size {self.size:#x}")
        if (offset | n) & (PAGE_SIZE - 1):
            raise oserror(errno.EINVAL, f"write [{offset:#x}, +{n:#x}) is not whole pages")
        start, end = offset >> PAGE_SHIFT, (offset + n) >> PAGE_SHIFT
        if self._state.attributes.uniform(start, end) != 0:
            first = next(s for s, _, v in self._state.attributes.ranges(start, end) if v)
            raise oserror(errno.EPERM, f"write into private page {first << PAGE_SHIFT:#x}")
        try:
            n = os.pwrite(self._memfd, data, offset)
            self._state.allocated.set(start, end, True)
            return n
        except OSError as exc:
            raise oserror(errno.ENOMEM if exc.errno == errno.ENOSPC else exc.errno, "write population") from None
