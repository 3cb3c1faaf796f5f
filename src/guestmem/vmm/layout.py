"""Guest memory layout as values: regions, the memslots they become, and layout snapshots.

A VMM declares its guest memory as ``Region`` values (guest address, size, private-capable
or shared-only, backing kind); ``validate`` checks them once (page aligned, sorted,
non-overlapping: vm-memory's rule) and ``plan_slots`` cuts them into memslots that respect
the kernel's limits: a slot never exceeds KVM_MEM_MAX_NR_PAGES (big regions are split on
2 MiB boundaries) and the total stays under KVM_CAP_NR_MEMSLOTS. Regions end at or below
``MAX_GPA`` (2**52): sizes no backend can map fail at once, and the slot count is computed
before any slot is enumerated, so no size makes planning slow. ``Snapshot`` is what readers
that must not lock see of a ``GuestMemory`` (``vmm.memory``): the layout and its private
runs at one generation. Nothing here touches a backend.
"""

from __future__ import annotations

import dataclasses
import errno
from bisect import bisect_right
from collections.abc import Iterable

from ..errors import oserror
from ..types import page_aligned
from ..uapi import KVM_MEM_MAX_NR_PAGES, PAGE_SHIFT, PAGE_SIZE

__all__ = ["Region", "Slot", "Snapshot", "BACKINGS", "LAYOUTS", "MAX_GPA", "MAX_SLOT_SIZE", "plan_slots", "validate"]

_2M = 2 << 20
MAX_SLOT_SIZE = (KVM_MEM_MAX_NR_PAGES << PAGE_SHIFT) & ~(_2M - 1)
"""The largest memslot the layout creates: under KVM_MEM_MAX_NR_PAGES, 2 MiB aligned."""

MAX_GPA = 1 << 52
"""Guest memory ends at or below this address: x86-64's MAXPHYADDR is at most 52 bits, so no
backend maps memory above it (KVM's kvm_mmu_max_gfn; the model's max_gpa_bits, measured 52)."""

BACKINGS = ("auto", "gmem", "memfd")
LAYOUTS = ("auto", "in-place", "two-backings")


@dataclasses.dataclass(frozen=True, slots=True)
class Region:
    """One declared range of guest memory.

    :param private: private-capable (backed by a guest_memfd for private pages and a memfd
        for shared ones); False for shared-only memory.
    :param backing: shared-only regions: "gmem" (MMAP|INIT_SHARED guest_memfd), "memfd", or
        "auto" (gmem when the VM supports it). Private-capable regions always use both.
    :param gmem_mmap: private-capable regions: create the guest_memfd with MMAP when the VM
        allows it. The slot is then GMEM_ONLY: shared and private pages both live in the
        guest_memfd, and the host's view is its mapping (without INIT_SHARED, which VMs with
        private memory cannot have on 6.18, every host touch faults).
    """

    name: str
    gpa: int
    size: int
    private: bool = False
    backing: str = "auto"
    gmem_mmap: bool = False

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclasses.dataclass(frozen=True, slots=True)
class Slot:
    """One memslot the layout created (the KVM_SET_USER_MEMORY_REGION2 arguments)."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int
    region: str



@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable view of the layout and the private ranges at one ``generation``."""

    generation: int
    regions: tuple[Region, ...]
    slots: tuple[Slot, ...]
    private: tuple[tuple[int, int], ...]  # sorted, merged [gpa, end) runs that are PRIVATE
    backings: tuple[str, ...]  # per region: "gmem+memfd", "gmem-mmap" (GMEM_ONLY), "gmem", "memfd"

    def is_private(self, gpa: int) -> bool:
        i = bisect_right(self.private, (gpa, 1 << 64)) - 1
        return i >= 0 and self.private[i][0] <= gpa < self.private[i][1]

    def private_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The private parts of [start, end), clipped."""
        out = []
        i = max(bisect_right(self.private, (start, 1 << 64)) - 1, 0)
        for s, e in self.private[i:]:
            if s >= end:
                break
            if e > start:
                out.append((max(s, start), min(e, end)))
        return out


def validate(regions: Iterable[Region]) -> tuple[Region, ...]:
    """The regions sorted by address; EINVAL (empty, unaligned, past MAX_GPA, unknown backing,
    a name used twice) or EEXIST (overlap) otherwise."""
    out = tuple(sorted(regions, key=lambda r: r.gpa))
    if not out:
        raise oserror(errno.EINVAL, "a guest needs at least one memory region")
    names = set()
    for r in out:
        if r.size <= 0 or not page_aligned(r.size) or not page_aligned(r.gpa) or r.gpa < 0:
            raise oserror(errno.EINVAL, f"region {r.name!r} [{r.gpa:#x}, +{r.size:#x}) must be page aligned and non-empty")
        if r.end > MAX_GPA:
            raise oserror(errno.EINVAL, f"region {r.name!r} [{r.gpa:#x}, +{r.size:#x}) ends past {MAX_GPA:#x}: "
                                        "x86-64 guest physical addresses have at most 52 bits")
        if r.backing not in BACKINGS:
            raise oserror(errno.EINVAL, f"region {r.name!r}: backing {r.backing!r} is not one of {BACKINGS}")
        if r.name in names:
            raise oserror(errno.EINVAL, f"region name {r.name!r} is used twice")
        names.add(r.name)
    for a, b in zip(out, out[1:]):
        if a.end > b.gpa:
            raise oserror(errno.EEXIST, f"regions {a.name!r} and {b.name!r} overlap at {b.gpa:#x}")
    return out


def plan_slots(regions: Iterable[Region], nr_memslots: int, first_slot: int = 0,
               max_slot_size: int = MAX_SLOT_SIZE) -> list[tuple[int, Region, int, int]]:
    """Split regions into memslots: ``(slot, region, offset_in_region, size)`` per slot.

    The number of slots is computed first, so the work is bounded by ``nr_memslots`` whatever
    the region sizes.

    :raises OSError: EINVAL if ``max_slot_size`` is not a positive multiple of the page size;
        ENOSPC if the layout needs more than ``nr_memslots`` slots.
    """
    if max_slot_size <= 0 or max_slot_size % PAGE_SIZE:
        raise oserror(errno.EINVAL, f"max_slot_size {max_slot_size:#x} is not a positive multiple of {PAGE_SIZE:#x}")
    regions = tuple(regions)
    needed = first_slot + sum(-(-r.size // max_slot_size) for r in regions if r.size > 0)
    if needed > nr_memslots:
        raise oserror(errno.ENOSPC, f"the layout needs {needed} memslots but the VM allows {nr_memslots} "
                                    "(KVM_CAP_NR_MEMSLOTS)")
    out = []
    slot = first_slot
    for r in regions:
        off = 0
        while off < r.size:
            size = min(max_slot_size, r.size - off)
            out.append((slot, r, off, size))
            slot += 1
            off += size
    assert slot == needed
    return out


