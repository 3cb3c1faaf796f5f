"""The Unicorn regions of one model vCPU and the host windows behind them (the vCPU's "TDP").

Data model. A vCPU's engine maps guest-physical blocks chosen by the fault path
(``fault.choose_block``). Each mapped block is one ``Region`` of one of two kinds:

- **window**: Unicorn points at a host address range of our own (the region's *window*),
  and the host MMU decides what memory is behind it: the gmem inode (``mmap`` of the gmem's
  memfd at the block's file offset, for private GFNs and GMEM_ONLY slots) or the memslot's
  shared userspace memory (an alias of it made with ``mremap(old_size=0)``, which only works
  for shared mappings: memfd, shmem, ``MAP_SHARED|MAP_ANONYMOUS``).
- **direct**: Unicorn points straight at the backing (``userspace_addr`` memory that cannot be
  aliased, e.g. ``MAP_PRIVATE`` anonymous memory; every region of a TDX-like VM).

Why windows. An invalidation (spec section 6) must make every later guest access see the new
state. Unmapping a Unicorn region costs one TLB-page flush per 4 KiB of its size (13-18 ms
for 1 GiB) plus time that grows with the region count, and the refault costs an exit. KVM
instead relies on its page tables and a TLB flush. So an invalidation first re-resolves each
overlapping region with the fault path (``refresh``): if the whole block still resolves to
data, of the same slot and without a mixed or poisoned page (what ``choose_block`` would map
again), the region stays in Unicorn and only its window is switched to the new backing
with one ``mmap(MAP_FIXED)``/``mremap(MREMAP_FIXED)``. That is atomic for the engine:
Unicorn's softmmu TLB caches the window's host address, not the pages behind it. Everything
that must produce an exit instead of data (no slot, released gmem, hwpoison, a mixed block,
TDX-like views) unmaps the region as before, and the next access faults.

Stale data is impossible: the backing switch happens under ``Vm._lock`` (the invalidating
thread) and ``uc_lock`` (emulation stopped), before the invalidation returns. Punching gmem
needs no switch: the kernel zaps the window's page-table entries with the file's pages.

Translated code. A translation block caches the *bytes* of guest code, so switching the
backing of a page that holds translated code would leave stale code. Window regions are
therefore mapped without execute permission; the first instruction fetch from one stops
emulation (``UC_HOOK_MEM_FETCH_PROT``), ``mark_code`` grants PROT_EXEC and flags the region,
and switching a flagged region's backing flushes the translation cache (``ctl_flush_tb``;
``ctl_remove_cache`` translates its bounds as *virtual* addresses, so it cannot be trusted
for a physical range under paging). Data-only regions switch without any engine call.

Invariants: ``regions`` (guest-physical base -> Region) changes only while the caller holds
``Vm._lock`` and the vCPU's ``uc_lock``; regions never overlap; a window region's window is
always fully backed (never PROT_NONE) while Unicorn maps it, and is unmapped from the host
only after Unicorn unmapped the region.

Limits: an alias keeps the pages of the userspace mapping it was made from; if the VMM
unmaps or replaces that memory under a live memslot (which KVM would see through its MMU
notifier), the guest keeps seeing the old pages until the next invalidation of the range.
"""

from __future__ import annotations

import ctypes
import weakref

from .. import hostmem
from ..uapi import PAGE_SIZE as PAGE
from . import fault
from .unicorn_cpu import unicorn

MAX_REGIONS = 256
_PROT_WRITE = 2  # UC_PROT_WRITE


def _mremap_alias(src: int, size: int, dst: int = 0) -> int:
    """A second mapping of the shared pages at ``src`` (at ``dst`` if given), or raise OSError."""
    flags = hostmem.MREMAP_MAYMOVE | (hostmem.MREMAP_FIXED if dst else 0)
    addr = hostmem.libc.mremap(src, 0, size, flags, dst or None)
    if addr in (None, hostmem.MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mremap alias of {src:#x}+{size:#x}")
    return addr


def _shared_vma(address: int, length: int) -> bool:
    """Whether [address, address+length) lies inside one shared mapping of this process."""
    for lo, hi, perms in hostmem.process_mappings():
        if lo <= address < hi:
            return address + length <= hi and perms[3:4] == b"s"
    return False


class Region:
    """One mapped block. ``window`` is 0 for a direct region; ``target`` names its backing."""

    __slots__ = ("size", "level", "prot", "window", "target", "slot", "code", "ptr")

    def __init__(self, size: int, level: int, prot: int, window: int, target: tuple, slot, ptr: int) -> None:
        self.size, self.level, self.prot, self.window, self.target, self.slot = size, level, prot, window, target, slot
        self.code = False
        self.ptr = ptr  # the host address Unicorn maps the region onto (the window, or the backing)


def _target(b: fault.Backing, start_gfn: int) -> tuple:
    """What backs the block at ``start_gfn``: ("gmem", gmem id, file offset) or ("host", address)."""
    if b.gmem is not None:
        return ("gmem", id(b.gmem), (b.slot.pgoff + start_gfn - b.slot.base_gfn) * PAGE)
    return ("host", fault.host_address(b, start_gfn))


class RegionMap:
    """The regions of one vCPU; every method runs with uc_lock held (and Vm._lock to change them)."""

    def __init__(self) -> None:
        self.regions: dict[int, Region] = {}
        self.unmapped = False  # a region was unmapped: Unicorn may believe a #PF is in flight
        self.gen = 0  # bumped by every unmap: host pointers taken before may dangle (code_cache)
        self._aliasable: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Memslot -> bool

    def overlapping(self, lo: int, hi: int) -> list[int]:
        return [a for a, r in self.regions.items() if a < hi and lo < a + r.size]

    def unmap(self, uc, bases: list[int]) -> None:
        self.unmapped |= bool(bases)  # unmapping the code page raises #PF inside Unicorn (2.1.4)
        if bases:
            self.gen += 1
        for a in bases:
            r = self.regions.pop(a)
            uc.mem_unmap(a, r.size)
            if r.window:
                hostmem.munmap(r.window, r.size)

    def clear(self, uc) -> None:
        self.unmap(uc, list(self.regions))

    def can_window(self, b: fault.Backing) -> bool:
        """Whether ``b``'s memory can sit behind a window: gmem, or one shared userspace mapping."""
        if b.gmem is not None:
            return True
        slot = b.slot
        ok = self._aliasable.get(slot)
        if ok is None:
            ok = self._aliasable[slot] = _shared_vma(slot.userspace_addr, slot.npages * PAGE)
        return ok

    @staticmethod
    def _back(window: int, size: int, b: fault.Backing, start_gfn: int) -> int:
        """Put ``b``'s block behind ``window`` (0: a new window); returns the window address."""
        t = _target(b, start_gfn)
        if t[0] == "gmem":
            flags = hostmem.MAP_SHARED | hostmem.MAP_NORESERVE | (hostmem.MAP_FIXED if window else 0)
            return hostmem.mmap(size, hostmem.PROT_READ | hostmem.PROT_WRITE, flags, b.gmem._memfd, t[2], window)
        return _mremap_alias(t[1], size, window)

    def map(self, uc, addr: int, size: int, level: int, b: fault.Backing, start_gfn: int, prot: int,
            window: bool) -> None:
        """Map the block [addr, addr+size) onto ``b`` (a window region if ``window``)."""
        if len(self.regions) >= MAX_REGIONS:
            self.clear(uc)
        self.unmap(uc, self.overlapping(addr, addr + size))
        if window:
            w = self._back(0, size, b, start_gfn)
            prot &= ~unicorn().unicorn_const.UC_PROT_EXEC  # granted by mark_code (module doc)
            try:
                uc.mem_map_ptr(addr, size, prot, w)
            except Exception:
                hostmem.munmap(w, size)
                raise
        else:
            w = 0
            uc.mem_map_ptr(addr, size, prot, fault.host_address(b, start_gfn))
        self.regions[addr] = Region(size, level, prot, w, _target(b, start_gfn), b.slot,
                                    w or fault.host_address(b, start_gfn))

    def containing(self, addr: int) -> int | None:
        for a, r in self.regions.items():
            if a <= addr < a + r.size:
                return a
        return None

    def region_of(self, addr: int) -> tuple[int, Region] | None:
        """(base, Region) of the region mapping engine-physical ``addr``, or None."""
        base = self.containing(addr)
        return None if base is None else (base, self.regions[base])

    def mark_code(self, uc, base: int) -> None:
        """First fetch from a window region: allow execution and remember it holds code."""
        r = self.regions[base]
        r.code = True
        r.prot |= unicorn().unicorn_const.UC_PROT_EXEC
        uc.mem_protect(base, r.size, r.prot)

    def refresh(self, uc, vm, bases: list[int]) -> tuple[list[int], bool]:
        """Re-resolve ``bases`` after an invalidation (caller holds both locks).

        Switches the backing of window regions that still map data; returns (the bases that
        must be unmapped, whether a switched region held translated code).
        """
        drop, flush = [], False
        for base in bases:
            r = self.regions[base]
            gfn = base // PAGE
            try:
                b, ex = fault.lookup(vm, gfn, None)
            except OSError:
                b, ex = None, True
            if ex is not None or b is None or b.slot is not r.slot or (r.level and not fault.block_ok(vm, b, r.level, gfn)):
                drop.append(base)
                continue
            if r.prot & _PROT_WRITE and b.gmem is None and vm._dirty_logged(b.slot) and not vm._is_dirty(b.slot, gfn):
                drop.append(base)  # a logged page whose log was read: write-protect it again (vm_state)
                continue
            t = _target(b, gfn)
            if t == r.target:
                continue
            if not r.window or not self.can_window(b):
                drop.append(base)
                continue
            self._back(r.window, r.size, b, gfn)
            r.target = t
            flush |= r.code
        return drop, flush

    def protect(self, uc, mask: int) -> None:
        """Set every region's protection to its own ``& mask`` (mask = all bits: restore)."""
        for a, r in self.regions.items():
            uc.mem_protect(a, r.size, r.prot & mask)

    def counts(self) -> dict[int, int]:
        out = {0: 0, 1: 0, 2: 0}
        for r in self.regions.values():
            out[r.level] += 1
        return out
