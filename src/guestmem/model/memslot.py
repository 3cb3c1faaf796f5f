"""Memslots: one guest-physical range of a VM, optionally bound to a guest_memfd range.

Data model
----------
A ``Memslot`` is the model's ``struct kvm_memory_slot``: id and address space, the GFN
range ``[base_gfn, base_gfn + npages)``, the user flags, ``userspace_addr`` and, for a
GUEST_MEMFD slot, a non-owning link to the file (``gmem``: an ordinary Python reference
that takes no file reference, so the file's own count, not the slot, decides when it is
released) plus ``pgoff``, the first file page. ``gmem`` becomes None when the file is
released while the slot lives on (spec 3.5); ``gmem_only`` is the E2 internal flag set
when the bound file has GUEST_MEMFD_FLAG_MMAP (shared faults come from gmem too).

The VM owns its slots and replaces a Memslot object on MOVE / FLAGS_ONLY rather than
mutating its range, so a reader holding a slot sees a consistent range.

Mixed-attribute hugepage tracking (spec section 4, x86 ``lpage_info`` "mixed" bit): for
level 1 (2 MiB = 512 pages) and level 2 (1 GiB = 512*512 pages), each block aligned to
its size and lying entirely inside the slot is *mixed* when its GFNs do not all carry the
same memory attributes. Mixed blocks are stored as runs of block indices (a
``RangeMap[bool]`` per level, True = mixed), so memory is proportional to runs of mixed
blocks, never to pages or to blocks. Invariants: every stored index names a block fully
inside the slot; a stored block is not uniform in the VM's attribute map; a block not
stored is uniform. Blocks that straddle the slot's edges are never huge-mappable and are
not tracked.

Only the blocks holding an attribute boundary can be mixed, which keeps updates range
based: after ``[start, end)`` is set to one value, every block inside it is uniform (one
slice clear of the block map) and only the two blocks holding ``start`` and ``end - 1``
need a look at the attribute map.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..rangemap import RangeMap
from ..uapi import MemFlag

if TYPE_CHECKING:
    from ..types import MemoryRegion
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
    _mixed: dict[int, Any] = dataclasses.field(
        default_factory=lambda: {level: RangeMap(default=False) for level in LEVEL_PAGES})

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def is_gmem(self) -> bool:
        """Created with KVM_MEM_GUEST_MEMFD (true even after the file is released)."""
        return bool(self.flags & MemFlag.GUEST_MEMFD)

    def _region(self) -> "MemoryRegion":
        """A frozen snapshot in the uapi's terms (``Vm.memslots()``)."""
        from ..types import MemoryRegion

        gmem = self.gmem
        fd = gmem._fd if gmem is not None and getattr(gmem, "_fd", None) is not None else 0
        return MemoryRegion(slot=self.as_id << 16 | self.id, flags=self.flags,
                            guest_phys_addr=self.base_gfn << 12, memory_size=self.npages << 12,
                            userspace_addr=self.userspace_addr, guest_memfd_offset=self.pgoff << 12,
                            guest_memfd=fd, gmem_only=self.gmem_only)

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
        """Number of mixed level-``level`` blocks (O(runs of mixed blocks); introspection only)."""
        return sum(e - s for s, e, _ in self._mixed[level])

    def _init_mixed(self, attributes: RangeMap) -> None:
        """Compute every block's mixed bit at slot creation (kvm_arch_post_set_memory_attributes' init twin).

        A block is mixed iff an attribute boundary falls strictly inside it.
        """
        boundaries: list[int] = []
        for s, e, _ in attributes.stored(self.base_gfn, self.end_gfn):
            boundaries.append(s)
            boundaries.append(e)
        for level, n in LEVEL_PAGES.items():
            first, end = self._full_blocks(level)
            runs: list[tuple[int, int, bool]] = []
            for b in sorted({b // n for b in boundaries if b % n and first <= b // n < end}):
                if runs and runs[-1][1] == b:
                    runs[-1] = (runs[-1][0], b + 1, True)
                else:
                    runs.append((b, b + 1, True))
            self._mixed[level] = RangeMap.from_sorted(runs, default=False)

    def _update_mixed(self, attributes: RangeMap, start: int, end: int) -> None:
        """Recompute after gfns [start, end) were all set to one value (x86 kvm_arch_post_set_memory_attributes).

        Blocks fully inside the range are now uniform: one range clear. Only the head and
        tail blocks (partially covered) need a look at the attribute map. O(log n), however
        many blocks or mixed blocks the range covers.
        """
        start, end = max(start, self.base_gfn), min(end, self.end_gfn)
        if start >= end:
            return
        for level, n in LEVEL_PAGES.items():
            first, last = self._full_blocks(level)
            mixed = self._mixed[level]
            inner_lo, inner_hi = -(-start // n), end // n  # blocks fully covered by the change
            if inner_lo < inner_hi:
                mixed.set(inner_lo, inner_hi, False)
            head, tail = start // n, (end - 1) // n
            for b in (head, tail) if head != tail else (head,):
                if not (first <= b < last) or inner_lo <= b < inner_hi:
                    continue
                is_mixed = attributes.uniform(b * n, (b + 1) * n) is None
                if is_mixed != (b in mixed):
                    mixed.set(b, b + 1, is_mixed)

    def _check_mixed(self, attributes: RangeMap) -> None:
        """Assert the mixed invariants against the attribute map (tests; O(mixed blocks + runs)).

        "Not stored means uniform" is checked from the other side: every attribute boundary
        strictly inside a tracked block marks that block mixed.
        """
        for level, n in LEVEL_PAGES.items():
            first, end = self._full_blocks(level)
            mixed = self._mixed[level]
            mixed.check()
            for lo, hi, _ in mixed:
                assert first <= lo and hi <= end, f"mixed blocks [{lo}, {hi}) of level {level} outside slot {self.id}"
                for b in range(lo, hi):
                    assert attributes.uniform(b * n, (b + 1) * n) is None, f"block {b} level {level} is uniform"
            for s, e, _ in attributes.stored(self.base_gfn, self.end_gfn):
                for g in (s, e):
                    b = g // n
                    assert not (g % n and first <= b < end) or b in mixed, \
                        f"block {b} level {level} holds a boundary at {g:#x} but is not mixed"

    def _snapshot(self) -> tuple:
        return (self.id, self.as_id, self.base_gfn, self.npages, self.flags, self.userspace_addr,
                id(self.gmem) if self.gmem is not None else None, self.pgoff, self.gmem_only,
                self._mixed[1].snapshot(), self._mixed[2].snapshot())
