"""Guest memory layout: regions, their backings and memslots, and the shared/private map.

Design note
-----------
A VMM declares its guest memory as ``Region`` values (guest address, size, private-capable
or shared-only, backing kind). ``GuestMemory`` validates them once (page aligned, sorted,
non-overlapping: vm-memory's rule) and creates, using only the backend interface:

* for a **private-capable** region: one guest_memfd for the private half (flags 0) and one
  host memfd, mapped MAP_SHARED, for the shared half; each memslot has
  ``KVM_MEM_GUEST_MEMFD``, binds consecutive guest_memfd offsets and points
  ``userspace_addr`` at the memfd mapping. With ``gmem_mmap`` (and a VM offering MMAP) the
  guest_memfd has MMAP, which makes the kernel bind it **GMEM_ONLY** (spec 2.3, 11.8): the
  guest's shared accesses go to the guest_memfd as well, so there is no memfd, and the
  host's view and ``userspace_addr`` are the guest_memfd's own mapping. A VM with private
  memory cannot create INIT_SHARED guest_memfds (spec 2.1), and without INIT_SHARED every
  host touch of that mapping faults (spec 3.3): ``read``/``write``/``fill`` then refuse
  with EFAULT (``host_accessible`` says which regions the host can touch). Private-capable
  regions need a VM whose KVM_CAP_MEMORY_ATTRIBUTES includes PRIVATE, otherwise
  construction fails with EOPNOTSUPP and a message saying why (the real kernel on this host
  has no memory attributes).
* for a **private-capable** region with **in-place conversion** (the VM reports PRIVATE in
  KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: the in-place series, model profile "next"): one
  guest_memfd created MMAP|INIT_SHARED serves both kinds. Its mapping is the host's view
  and ``userspace_addr``, every binding is GMEM_ONLY, and conversions are
  KVM_SET_MEMORY_ATTRIBUTES2 on the file: nothing is allocated twice and nothing needs
  discarding. The host view SIGBUSes on private pages, so ``read``/``write``/``fill``
  refuse ranges holding private pages with EFAULT (checked under ``lock``, which
  conversions hold too). ``conversion`` picks the layout: "in-place", "two-backings" or
  "auto" (in-place when the VM offers it).
* for a **shared-only** region: a guest_memfd created MMAP|INIT_SHARED, with
  ``userspace_addr`` set to its own mapping (spec 11.8, "GMEM_ONLY"), when the VM reports
  both flags in KVM_CAP_GUEST_MEMFD_FLAGS; otherwise a plain memfd.

Regions, their validation and the memslot plan (KVM_MEM_MAX_NR_PAGES, KVM_CAP_NR_MEMSLOTS,
``MAX_GPA``) live in ``vmm.layout``; resident-memory probes in ``vmm.residency``.

The attribute map is authoritative and range based: a ``RangeMap`` over gfns holding
``MemoryAttribute.PRIVATE`` runs (gaps are shared). ``set_attributes`` is the only writer:
it calls KVM_SET_MEMORY_ATTRIBUTES (in place: KVM_SET_MEMORY_ATTRIBUTES2 on the region's
guest_memfd), updates the map and then notifies every listener once with the whole range
(QEMU's RamDiscardManager, but per range, not per page).

Pins: ``pin`` takes a host reference on shared guest pages the way a device model's DMA
mapping does (backends with ``GuestMemfd.pin``: the model). A conversion to private that
the kernel refuses with EAGAIN because of a reference the VMM holds releases the VMM's pins
in the range (calling each pin's ``on_release`` first, so the device can stop using the
pages), retries once and counts both in ``eagain``; a reference the VMM does not hold
fails the conversion with the kernel's error and ``error_offset``.

Readers that must not lock (vCPU threads, the report) take ``snapshot()``: an immutable
``Snapshot`` of the layout and the private runs at one generation. Snapshots are built
lazily, copy-on-write: a conversion bumps the generation, and the next reader builds a new
tuple; a snapshot already handed out never changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable
from typing import Any

from .. import hostmem
from ..errors import oserror
from ..hostmem import MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE, Mapping
from ..interface import GuestMemfd, Vm
from ..rangemap import RangeMap
from ..uapi import (
    PAGE_SHIFT, PAGE_SIZE, Cap, Falloc, GuestMemfdFlag, MemFlag, MemoryAttribute,
)
from .layout import LAYOUTS, Region, Slot, Snapshot, plan_slots, validate
from .residency import process_memory, resident_runs

__all__ = ["Conversion", "GuestMemory"]

PRIVATE = int(MemoryAttribute.PRIVATE)
_INIT_SHARED_MMAP = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)


@dataclasses.dataclass(frozen=True, slots=True)
class Conversion:
    """What listeners receive: ``[gpa, gpa+size)`` became private (True) or shared (False)."""

    gpa: int
    size: int
    private: bool


class _Backed:
    """A region with the objects backing it (owned by GuestMemory)."""

    __slots__ = ("region", "gmem", "memfd", "mapping", "kind", "host_access", "pins")

    def __init__(self, region: Region) -> None:
        self.region = region
        self.gmem: GuestMemfd | None = None
        self.memfd = -1
        self.mapping: Mapping | None = None  # the host's shared view (memfd or gmem mapping)
        self.kind = ""
        self.host_access = True  # False: the view is a guest_memfd mapping without INIT_SHARED
        self.pins: list[_Pin] = []  # host references the VMM holds (in-place regions)


class _Pin:
    """A pin the VMM took with ``GuestMemory.pin``; ``release()`` drops it (idempotent)."""

    __slots__ = ("gpa", "size", "handle", "on_release", "_owner")

    def __init__(self, owner: _Backed, gpa: int, size: int, handle: Any, on_release: Callable[[], None] | None):
        self.gpa, self.size, self.handle, self.on_release, self._owner = gpa, size, handle, on_release, owner

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.pins.remove(self)
            self.handle.release()


class GuestMemory:
    """Creates and owns a VM's guest memory; keeps the authoritative attribute map.

    Thread safety: ``set_attributes`` and ``discard`` serialise on ``lock`` (an RLock that the
    conversion manager also holds across a whole conversion); ``snapshot()`` and the host
    views need no lock.
    """

    def __init__(self, vm: Vm, regions: Iterable[Region], *, first_slot: int = 0, conversion: str = "auto") -> None:
        self.vm = vm
        self.regions = validate(regions)
        self.lock = threading.RLock()
        self._attrs: RangeMap[int] = RangeMap(default=0)
        self._listeners: list[Callable[[Conversion], None]] = []
        self._generation = 0
        self._snapshot: Snapshot | None = None
        self._backed: list[_Backed] = []
        self._starts = [r.gpa for r in self.regions]
        self.eagain = 0  # in-place conversions retried after releasing the VMM's pins
        self.pins_released = 0
        vm_level = bool(vm.check_extension(Cap.MEMORY_ATTRIBUTES) & PRIVATE)
        gmem_flags = vm.check_extension(Cap.GUEST_MEMFD_FLAGS) if vm.check_extension(Cap.GUEST_MEMFD) else 0
        in_place = bool(vm.check_extension(Cap.GUEST_MEMFD_MEMORY_ATTRIBUTES) & PRIVATE) \
            and gmem_flags & _INIT_SHARED_MMAP == _INIT_SHARED_MMAP
        self._gmem_flags = gmem_flags
        if conversion not in LAYOUTS:
            raise ValueError(f"unknown conversion layout {conversion!r}: choose one of {', '.join(LAYOUTS)}")
        if conversion == "auto":
            conversion = "in-place" if in_place else "two-backings"
        self.conversion = conversion
        """The layout of private-capable regions: "in-place" or "two-backings"."""
        self.in_place = conversion == "in-place"
        # Host accesses serialise with conversions only in place, where a page turning private
        # under a read would SIGBUS; the two-backing views never fault.
        self._view_lock: Any = self.lock if self.in_place else contextlib.nullcontext()
        self.has_private = in_place if self.in_place else vm_level
        for r in self.regions:
            if r.private and self.in_place and not in_place:
                raise oserror(errno.EOPNOTSUPP, f"region {r.name!r}: in-place conversion needs PRIVATE in "
                                                "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES and MMAP|INIT_SHARED "
                                                f"guest_memfds, which this VM (type {vm.type}) lacks")
            if r.private and not self.has_private:
                raise oserror(errno.EOPNOTSUPP, f"region {r.name!r} needs private memory, but this VM (type {vm.type}) "
                                                "has none: KVM_CAP_MEMORY_ATTRIBUTES lacks PRIVATE")
            if r.backing == "gmem" and not r.private and gmem_flags & _INIT_SHARED_MMAP != _INIT_SHARED_MMAP:
                raise oserror(errno.EOPNOTSUPP, f"region {r.name!r}: a shared guest_memfd needs MMAP|INIT_SHARED in "
                                                "KVM_CAP_GUEST_MEMFD_FLAGS")
        nr = vm.check_extension(Cap.NR_MEMSLOTS) or 32
        plan = plan_slots(self.regions, nr, first_slot)
        self.use_v2 = bool(vm.check_extension(Cap.USER_MEMORY2))
        slots: list[Slot] = []
        try:
            for r in self.regions:
                self._backed.append(self._create_backing(r))
            by_name = {b.region.name: b for b in self._backed}
            for slot, r, off, size in plan:
                b = by_name[r.name]
                flags = int(MemFlag.GUEST_MEMFD) if b.gmem is not None else 0
                assert b.mapping is not None
                s = Slot(slot, flags, r.gpa + off, size, b.mapping.address + off, off if b.gmem is not None else 0, r.name)
                if b.gmem is not None or self.use_v2:
                    vm.set_user_memory_region2(s.slot, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr,
                                               b.gmem, s.guest_memfd_offset)
                else:
                    vm.set_user_memory_region(s.slot, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr)
                slots.append(s)
        except BaseException:
            self.close()
            raise
        self.slots = tuple(slots)

    # --- construction -------------------------------------------------------------------------

    def _create_backing(self, r: Region) -> _Backed:
        b = _Backed(r)
        want_gmem = r.backing == "gmem" or (r.backing == "auto" and self._gmem_flags & _INIT_SHARED_MMAP == _INIT_SHARED_MMAP)
        if r.private and self.in_place:
            # One guest_memfd for both kinds; it starts shared like the attribute map.
            b.gmem = self.vm.create_guest_memfd(r.size, _INIT_SHARED_MMAP)
            b.mapping = b.gmem.mmap(r.size)
            b.kind = "gmem-inplace"
            return b
        if r.private and r.gmem_mmap and self._gmem_flags & GuestMemfdFlag.MMAP:
            # GMEM_ONLY: the guest's shared pages are in the guest_memfd too, so it is the
            # host's view. INIT_SHARED only if this VM offers it (no VM with private memory
            # does on 6.18); without it the host cannot touch the mapping at all.
            flags = int(GuestMemfdFlag.MMAP) | int(self._gmem_flags & GuestMemfdFlag.INIT_SHARED)
            b.gmem = self.vm.create_guest_memfd(r.size, flags)
            b.mapping = b.gmem.mmap(r.size)
            b.kind = "gmem-mmap"
            b.host_access = bool(flags & GuestMemfdFlag.INIT_SHARED)
            return b
        if r.private:
            b.gmem = self.vm.create_guest_memfd(r.size, 0)
            b.kind = "gmem+memfd"
        elif want_gmem:
            b.gmem = self.vm.create_guest_memfd(r.size, int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED))
            b.mapping = b.gmem.mmap(r.size)
            b.kind = "gmem"
            return b
        else:
            b.kind = "memfd"
        b.memfd = hostmem.memfd(f"guestmem-{r.name}", r.size)
        b.mapping = hostmem.map_file(r.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, b.memfd, 0)
        return b

    # --- lookups ------------------------------------------------------------------------------

    def _find(self, gpa: int) -> _Backed | None:
        i = bisect_right(self._starts, gpa) - 1
        if i < 0:
            return None
        b = self._backed[i]
        return b if gpa < b.region.end else None

    def region_at(self, gpa: int) -> Region | None:
        b = self._find(gpa)
        return None if b is None else b.region

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def gmem(self, name: str) -> GuestMemfd | None:
        """The guest_memfd backing region ``name`` (None for memfd-backed regions)."""
        return self._backed[self.regions.index(self.region(name))].gmem

    def shared_mapping(self, name: str) -> Mapping:
        """The host's shared view of region ``name`` (what the memslot's userspace_addr maps).

        For a region that is not ``host_accessible`` this is a guest_memfd mapping that
        SIGBUSes on every touch: use ``read``/``write``, which refuse instead.
        """
        m = self._backed[self.regions.index(self.region(name))].mapping
        assert m is not None
        return m

    def within_private_capable(self, gpa: int, size: int) -> bool:
        """True if [gpa, gpa+size) lies inside one private-capable region."""
        b = self._find(gpa)
        return b is not None and b.region.private and size > 0 and gpa + size <= b.region.end

    def host_accessible(self, name: str) -> bool:
        """Whether the host can touch region ``name``'s shared view (False for a GMEM_ONLY
        region whose guest_memfd lacks INIT_SHARED: every touch faults, spec 3.3)."""
        return self._backed[self.regions.index(self.region(name))].host_access

    def _host(self, gpa: int, size: int) -> tuple[Mapping, int]:
        b = self._find(gpa)
        if b is None or size < 0 or gpa + size > b.region.end:
            raise oserror(errno.EFAULT, f"guest range [{gpa:#x}, +{size:#x}) is not inside one region")
        if not b.host_access:
            raise oserror(errno.EFAULT, f"guest range [{gpa:#x}, +{size:#x}): region {b.region.name!r} is GMEM_ONLY "
                                        "and its guest_memfd has no INIT_SHARED, so every host touch faults")
        if b.kind == "gmem-inplace" and size and self._attrs.uniform(gpa >> PAGE_SHIFT, (gpa + size + PAGE_SIZE - 1)
                                                                     >> PAGE_SHIFT) != 0:
            raise oserror(errno.EFAULT, f"guest range [{gpa:#x}, +{size:#x}) holds private pages, which the "
                                        "in-place host view cannot touch (SIGBUS)")
        assert b.mapping is not None
        return b.mapping, gpa - b.region.gpa

    def read(self, gpa: int, size: int) -> bytes:
        """Read guest memory through the host's shared view (never the private backing).

        :raises OSError: EFAULT outside one region, on a view the host cannot touch, or (in
            place) on a range holding private pages.
        """
        with self._view_lock:  # in place: no conversion may make the range private meanwhile
            m, off = self._host(gpa, size)
            return m.read(off, size)

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest memory through the host's shared view (errors as ``read``)."""
        with self._view_lock:
            m, off = self._host(gpa, len(data))
            m.write(off, data)

    def fill(self, gpa: int, size: int, byte: int) -> None:
        with self._view_lock:
            m, off = self._host(gpa, size)
            m.fill(off, size, byte)

    # --- pins -----------------------------------------------------------------------------------

    def pin(self, gpa: int, size: int, on_release: Callable[[], None] | None = None) -> _Pin:
        """Hold shared guest pages [gpa, gpa+size) the way a device's DMA mapping does.

        ``on_release`` is called if a conversion needs the pages back (then the pin is dropped).

        :raises OSError: EFAULT outside one guest_memfd-backed region; EOPNOTSUPP if the
            backend cannot pin; the backend's errno (EFAULT for private pages).
        """
        with self.lock:
            b = self._find(gpa)
            if b is None or b.gmem is None or size <= 0 or gpa + size > b.region.end:
                raise oserror(errno.EFAULT, f"pin [{gpa:#x}, +{size:#x}) is not inside one guest_memfd region")
            pin_fn = getattr(b.gmem, "pin", None)
            if pin_fn is None:
                raise oserror(errno.EOPNOTSUPP, "this backend cannot pin guest_memfd pages")
            p = _Pin(b, gpa, size, pin_fn(gpa - b.region.gpa, size), on_release)
            b.pins.append(p)
            return p

    # --- attributes ---------------------------------------------------------------------------

    def attributes(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """``(gpa, end, attributes)`` runs tiling [start, end) (gaps read 0, shared)."""
        with self.lock:
            runs = self._attrs.ranges(start >> PAGE_SHIFT, (end + PAGE_SIZE - 1) >> PAGE_SHIFT)
        return [(max(s << PAGE_SHIFT, start), min(e << PAGE_SHIFT, end), v) for s, e, v in runs]

    def private_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """What is private in [start, end)? Sorted ``(gpa, end)`` runs."""
        return [(s, e) for s, e, v in self.attributes(start, end) if v & PRIVATE]

    def is_private(self, gpa: int, size: int = PAGE_SIZE) -> bool | None:
        """True/False if all of [gpa, gpa+size) is private/shared; None if mixed."""
        with self.lock:
            v = self._attrs.uniform(gpa >> PAGE_SHIFT, (gpa + size + PAGE_SIZE - 1) >> PAGE_SHIFT)
        return None if v is None else bool(v & PRIVATE)

    def add_listener(self, listener: Callable[[Conversion], None]) -> None:
        """Call ``listener(Conversion)`` after every attribute change, once per whole range."""
        with self.lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Conversion], None]) -> None:
        with self.lock:
            self._listeners.remove(listener)

    def check_attribute_range(self, gpa: int, size: int, private: bool) -> None:
        """Validate a ``set_attributes`` call without changing anything.

        :raises TypeError: ``gpa``/``size`` not ints, ``private`` not a bool.
        :raises OSError: EINVAL if the range is unaligned or empty, or not inside one
            private-capable region (only those have memory that can be private).
        """
        for name, value in (("gpa", gpa), ("size", size)):
            if not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not isinstance(private, bool):
            raise TypeError(f"private must be a bool, not {type(private).__name__}")
        if size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise oserror(errno.EINVAL, f"attribute range [{gpa:#x}, +{size:#x}) must be page aligned and non-empty")
        if not self.within_private_capable(gpa, size):
            raise oserror(errno.EINVAL, f"attribute range [{gpa:#x}, +{size:#x}) is not inside one private-capable "
                                        "region")

    def set_attributes(self, gpa: int, size: int, private: bool) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES for [gpa, gpa+size), then the map, then the listeners.

        All or nothing: the arguments are checked first (``check_attribute_range``), then the
        kernel call, which changes nothing when it fails; only then the map. So after any
        failure the VM and the map agree.

        :raises TypeError: see ``check_attribute_range``.
        :raises OSError: EINVAL for a range that is unaligned, empty or not inside one
            private-capable region; the kernel's errno (ENOTTY without attributes).
        """
        self.check_attribute_range(gpa, size, private)
        attrs = PRIVATE if private else 0
        with self.lock:
            if self.in_place:
                self.eagain += self._set_file_attributes(gpa, size, attrs)
            else:
                self.vm.set_memory_attributes(gpa, size, attrs)
            self._attrs.set(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, attrs)
            self._generation += 1
            event = Conversion(gpa, size, private)
            for listener in list(self._listeners):
                listener(event)

    def _set_file_attributes(self, gpa: int, size: int, attrs: int) -> int:
        """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd of the private-capable region holding
        the range; on EAGAIN, release the VMM's own pins there and retry once. Returns the
        number of retries (0 or 1)."""
        b = self._find(gpa)
        if b is None or b.kind != "gmem-inplace" or gpa + size > b.region.end:
            raise oserror(errno.EINVAL, f"in-place conversion of [{gpa:#x}, +{size:#x}) must lie inside one "
                                        "private-capable region")
        assert b.gmem is not None
        off = gpa - b.region.gpa
        try:
            b.gmem.set_memory_attributes(off, size, attrs)
            return 0
        except BlockingIOError as exc:
            mine = [p for p in b.pins if p.gpa < gpa + size and p.gpa + p.size > gpa]
            if not mine:
                exc.add_note(f"the page at guest {b.region.gpa + getattr(exc, 'error_offset', 0):#x} is referenced "
                             "outside this VMM")
                raise
        for p in mine:
            if p.on_release is not None:
                p.on_release()
            p.release()
        self.pins_released += len(mine)
        b.gmem.set_memory_attributes(off, size, attrs)
        return 1

    def discard(self, gpa: int, size: int, private: bool) -> list[tuple[str, int, int]]:
        """Free the backing a range no longer uses; returns ``(what, offset, length)`` per step.

        ``private`` is the new state: going private drops the shared pages (punch the memfd),
        going shared punches the guest_memfd range. Only private-capable regions have two
        backings; the range may span several of them.
        """
        done = []
        with self.lock:
            pos, end = gpa, gpa + size
            while pos < end:
                b = self._find(pos)
                if b is None:
                    nxt = bisect_right(self._starts, pos)
                    if nxt >= len(self._starts) or self._starts[nxt] >= end:
                        break
                    pos = self._starts[nxt]
                    continue
                stop = min(end, b.region.end)
                if b.region.private and b.kind != "gmem-inplace":  # in place: one backing, nothing to free
                    off, length = pos - b.region.gpa, stop - pos
                    if private:
                        if b.memfd >= 0:  # GMEM_ONLY regions have no separate shared memory
                            hostmem.fallocate(b.memfd, Falloc.PUNCH_HOLE | Falloc.KEEP_SIZE, off, length)
                            done.append(("memfd", off, length))
                    else:
                        assert b.gmem is not None
                        b.gmem.punch_hole(off, length)
                        done.append(("gmem", off, length))
                pos = stop
        return done

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current immutable Snapshot (rebuilt only after a conversion)."""
        snap = self._snapshot
        if snap is not None and snap.generation == self._generation:
            return snap
        with self.lock:
            private = tuple((s << PAGE_SHIFT, e << PAGE_SHIFT) for s, e, v in self._attrs if v & PRIVATE)
            snap = Snapshot(self._generation, self.regions, self.slots, private,
                            tuple(b.kind for b in self._backed))
            self._snapshot = snap
        return snap

    def populated(self, name: str) -> list[tuple[int, int]]:
        """Resident pages of region ``name``'s shared view, as ``(gpa, end)`` runs (mincore)."""
        r = self.region(name)
        m = self.shared_mapping(name)
        return [(r.gpa + (s << PAGE_SHIFT), r.gpa + (e << PAGE_SHIFT)) for s, e in resident_runs(m.address, m.length)]

    # --- teardown -----------------------------------------------------------------------------

    def host_memory(self) -> dict[str, int]:
        """Host memory the guest's memory uses now: the process's anonymous RSS plus the bytes
        allocated in every memfd and guest_memfd backing a region (shared memory counted once,
        through its file). guest_memfd bytes come from ``GuestMemfd.stats()`` where the
        backend has it (the model); a kernel guest_memfd reports none (st_blocks is 0)."""
        memfd = gmem = 0
        for b in self._backed:
            if b.memfd >= 0:
                memfd += os.fstat(b.memfd).st_blocks * 512
            if b.gmem is not None:
                stats = getattr(b.gmem, "stats", None)
                gmem += stats()["pages_allocated"] * PAGE_SIZE if stats is not None else b.gmem.fstat().st_blocks * 512
        anon = process_memory()["rss_anon"]
        return {"rss_anon": anon, "memfd": memfd, "guest_memfd": gmem, "total": anon + memfd + gmem}

    def close(self) -> None:
        """Unmap and close every backing (memslots go away with the VM)."""
        for b in self._backed:
            for p in list(b.pins):
                p.release()
            if b.mapping is not None:
                b.mapping.close()
            if b.memfd >= 0:
                os.close(b.memfd)
                b.memfd = -1
            if b.gmem is not None:
                b.gmem.close()
        self._backed = []
        self._starts = []
