"""Memslots: one guest-physical range of a VM, optionally bound to a guest_memfd range.

Data model
----------
A ``Memslot`` is the model's ``struct kvm_memory_slot``: id and address space, the GFN
range ``[base_gfn, base_gfn + npages)``, the user flags, ``userspace_addr`` and, for a
GUEST_MEMFD slot, a *weak* link to the file (``gmem``; the slot never keeps the file
alive) plus ``pgoff``, the first file page. ``gmem`` becomes None when the file is
released while the slot lives on (spec 3.5); ``gmem_only`` is the E2 internal flag set
when the bound file has GUEST_MEMFD_FLAG_MMAP (shared faults come from gmem too).

The VM owns its slots and replaces a Memslot object on MOVE / FLAGS_ONLY rather than
mutating its range, so a reader holding a slot sees a consistent range.

Mixed-attribute hugepage tracking (spec section 4, x86 ``lpage_info`` "mixed" bit): for
level 1 (2 MiB = 512 pages) and level 2 (1 GiB = 512*512 pages), each block aligned to
its size and lying entirely inside the slot is *mixed* when its GFNs do not all carry the
same memory attributes. Only mixed block indices are stored (a SortedList per level), so
memory is proportional to mixed blocks, never to pages. Invariants: every stored index
names a block fully inside the slot; a stored block is not uniform in the VM's attribute
map. Blocks that straddle the slot's edges are never huge-mappable and are not tracked.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sortedcontainers import SortedList

from ..rangemap import RangeMap
from ..uapi import MemFlag

if TYPE_CHECKING:
    from .guest_memfd import GuestMemfd

LEVEL_PAGES = {1: 1 << 9, 2: 1 << 18}
"""Pages per block at hugepage level 1 (2 MiB) and 2 (1 GiB)."""


@dataclasses.dataclass(eq=False)
class Memslot:
    """A memslot (kvm_memory_slot). ``gmem`` is None for a non-gmem slot or after release."""

    id: int
    as_id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    gmem: "GuestMemfd | None" = None
    pgoff: int = 0
    gmem_only: bool = False
    _mixed: dict[int, Any] = dataclasses.field(default_factory=lambda: {1: SortedList(), 2: SortedList()})

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def is_gmem(self) -> bool:
        """Created with KVM_MEM_GUEST_MEMFD (true even after the file is released)."""
        return bool(self.flags & MemFlag.GUEST_MEMFD)

    def gfn_to_pgoff(self, gfn: int) -> int:
        """The guest_memfd page backing ``gfn`` (gfn must be inside the slot)."""
        assert self.base_gfn <= gfn < self.end_gfn, f"gfn {gfn:#x} outside slot {self.id}"
        return self.pgoff + (gfn - self.base_gfn)

    # --- mixed hugepage blocks ----------------------------------------------------------------

    def _full_blocks(self, level: int) -> tuple[int, int]:
        """Block indices [first, end) of the level's blocks lying entirely inside the slot."""
        n = LEVEL_PAGES[level]
        return -(-self.base_gfn // n), self.end_gfn // n

    def is_mixed(self, level: int, gfn: int) -> bool:
        """Whether the level-``level`` block containing ``gfn`` has mixed attributes.

        False for blocks not entirely inside the slot (never huge-mapped, not tracked).
        Mirrors x86 ``hugepage_test_mixed``.
        """
        return (gfn // LEVEL_PAGES[level]) in self._mixed[level]

    def mixed_count(self, level: int) -> int:
        return len(self._mixed[level])

    def _init_mixed(self, attributes: RangeMap) -> None:
        """Compute every block's mixed bit at slot creation (kvm_arch_post_set_memory_attributes' init twin)."""
        boundaries: list[int] = []
        for s, e, _ in attributes.stored(self.base_gfn, self.end_gfn):
            boundaries.append(s)
            boundaries.append(e)
        for level, n in LEVEL_PAGES.items():
            first, end = self._full_blocks(level)
            mixed = {b // n for b in boundaries if b % n and first <= b // n < end}
            self._mixed[level] = SortedList(mixed)

    def _update_mixed(self, attributes: RangeMap, start: int, end: int) -> None:
        """Recompute after attributes changed over gfns [start, end) (x86 post_set_memory_attributes).

        Blocks fully covered by the change are now uniform; only the head and tail blocks
        (partially covered) need a look at the attribute map. O((k + 1) log n).
        """
        start, end = max(start, self.base_gfn), min(end, self.end_gfn)
        if start >= end:
            return
        for level, n in LEVEL_PAGES.items():
            first, last = self._full_blocks(level)
            mixed = self._mixed[level]
            inner_lo, inner_hi = -(-start // n), end // n  # blocks fully covered by the change
            for b in list(mixed.irange(inner_lo, inner_hi, inclusive=(True, False))):
                mixed.remove(b)
            for b in {start // n, (end - 1) // n}:
                if not (first <= b < last) or inner_lo <= b < inner_hi:
                    continue
                is_mixed = attributes.uniform(b * n, (b + 1) * n) is None
                if is_mixed and b not in mixed:
                    mixed.add(b)
                elif not is_mixed and b in mixed:
                    mixed.remove(b)

    def _check_mixed(self, attributes: RangeMap) -> None:
        """Assert the mixed invariants against the attribute map (tests; O(mixed blocks))."""
        for level, n in LEVEL_PAGES.items():
            first, end = self._full_blocks(level)
            for b in self._mixed[level]:
                assert first <= b < end, f"mixed block {b} of level {level} outside slot {self.id}"
                assert attributes.uniform(b * n, (b + 1) * n) is None, f"block {b} level {level} is uniform"

    def _snapshot(self) -> tuple:
        return (self.id, self.as_id, self.base_gfn, self.npages, self.flags, self.userspace_addr,
                id(self.gmem) if self.gmem is not None else None, self.pgoff, self.gmem_only,
                tuple(self._mixed[1]), tuple(self._mixed[2]))
