"""What a model vCPU's engine derived from guest code bytes, checked against memory before each entry.

Data model. Unicorn (QEMU TCG) translates guest code into translation blocks (TBs) and keeps
running them from its cache; ``io_sites`` decodes each IN/OUT instruction once. Both are
derived from the bytes that were in guest memory when they were made. QEMU notices stores the
same engine makes through its own MMU, but not writes made behind its back: by the host
through its mapping of guest memory, by another vCPU (another engine over the same memory),
by another process sharing the memfd. Hardware fetches what is in memory; for cross-modifying
code the SDM (vol. 3, "Handling Self- and Cross-Modifying Code") guarantees the new bytes once
the executing processor serialises, and VM entry serialises. So the model looks before every
entry into the engine (each ``emu_start`` of ``Vcpu._run_once``):

- ``record`` runs from the engine's UC_HOOK_EDGE_GENERATED hook, which QEMU calls once per
  *generated* TB (never per execution), and keeps per guest-physical page the byte span its
  TBs cover with a copy of those bytes. QEMU calls that hook only once some TB has run on the
  engine, so ``unicorn_cpu.Engine`` runs one scratch instruction on every new engine;
- ``stale`` compares each page's span with memory through the host pointer behind the
  engine's region (one copy and one ``bytes`` comparison per page: ~0.1-0.3 us per entry for
  a guest running from one code page). A difference, or a page the engine no longer
  maps, makes the vCPU flush every TB, forget every IN/OUT site and ``clear`` this cache.

Only the bytes TBs cover are compared, so data stored next to code does not flush anything;
a guest that rewrites its own code does, on its next entry, which is correct and slow.

Invariants: every TB in the engine lies inside a recorded span (TBs made before the cache was
last cleared are gone: ``clear`` is only called right after ``ctl_flush_tb``); a span's copy is
never refreshed without a flush, so a change made before a span was extended is still seen.
All methods run with the vCPU's ``uc_lock`` held (inside a hook or around ``emu_start``).

Limits: the copy is taken when the hook runs, just after QEMU read the bytes; a write that
lands in those microseconds of the first translation goes unnoticed until the TB is dropped
for another reason. A vCPU that keeps running without leaving the engine picks up new code at
its next exit, or when kicked (``kick``), as the SDM allows until it serialises.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..uapi import PAGE_SIZE as PAGE

if TYPE_CHECKING:
    from .regions import Region, RegionMap

_string_at = ctypes.string_at
_PAGE_MASK = PAGE - 1


def _view(host: int, n: int):
    """A ctypes char array over ``n`` bytes of host memory; ``.raw`` copies them out (~50 ns for
    a short span, where ``string_at`` costs ~450 ns: the check runs on every entry)."""
    return (ctypes.c_char * n).from_address(host)


@dataclass(slots=True)
class CodeSpan:
    """The bytes [lo, hi) of one guest-physical page that TBs were translated from."""

    lo: int
    hi: int
    copy: bytes  # the bytes when they were translated
    view: ctypes.Array  # the same bytes in memory now, through the engine region's host pointer
    gen: int  # ``RegionMap.gen`` when ``view`` was made: a later unmap may leave it dangling
    found: tuple[int, Region]  # (base, region) of the engine region the page was found in


class CodeCache:
    """Byte spans of guest-physical pages that the engine's TBs were translated from."""

    def __init__(self) -> None:
        self.pages: dict[int, CodeSpan] = {}  # physical page -> its span

    def __len__(self) -> int:
        return len(self.pages)

    def clear(self) -> None:
        """Forget every span (the caller just flushed every TB)."""
        self.pages.clear()

    def record(self, pa: int, n: int, regions: RegionMap) -> None:
        """A TB covers [pa, pa+n) (within one page) of guest-physical memory."""
        page, lo = pa & ~_PAGE_MASK, pa & _PAGE_MASK
        hi = lo + n
        found = regions.region_of(page)
        if found is None:
            return  # not mapped in the engine: nothing can have been translated from it
        host = found[1].ptr + page - found[0]
        e = self.pages.get(page)
        if e is None:
            self.pages[page] = CodeSpan(lo, hi, _string_at(host + lo, n), _view(host + lo, n), regions.gen, found)
            return
        old_lo, old_hi = e.lo, e.hi
        if lo >= old_lo and hi <= old_hi:
            return
        new_lo, new_hi = min(lo, old_lo), max(hi, old_hi)
        # keep the old copy for the old span: a change already made there must still show
        e.copy = _string_at(host + new_lo, old_lo - new_lo) + e.copy + _string_at(host + old_hi, new_hi - old_hi)
        e.lo, e.hi, e.view, e.gen, e.found = new_lo, new_hi, _view(host + new_lo, new_hi - new_lo), regions.gen, found

    def stale(self, regions: RegionMap) -> bool:
        """Whether memory under a recorded span differs from its copy, or is no longer mapped."""
        gen = regions.gen
        for page, e in self.pages.items():
            if e.gen != gen:  # a region was unmapped since: the view may dangle
                base, region = e.found
                if regions.regions.get(base) is not region:  # its region went: find the page again
                    found = regions.region_of(page)
                    if found is None:
                        return True
                    e.view, e.found = _view(found[1].ptr + page - found[0] + e.lo, e.hi - e.lo), found
                e.gen = gen
            if e.view.raw != e.copy:
                return True
        return False
