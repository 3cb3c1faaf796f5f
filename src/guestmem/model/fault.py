"""The model's fault path: what backs a guest frame, and how large a block may be mapped.

Data model. A model vCPU (``vcpu.py``) runs guest code on one Unicorn instance. Unicorn's
"physical" address space plays the role of the TDP/EPT tables: a guest-physical range is
mapped in Unicorn only while it is valid, and what backs it is decided here:

- gmem-backed (a private GFN, or any GFN of a GMEM_ONLY slot): the gmem inode at file page
  ``pgoff + gfn - base_gfn`` (its memfd ``_memfd``; ``_host_address`` is the model's view);
- shared, non-GMEM_ONLY: the memslot's ``userspace_addr`` memory of this process.

An access to an unmapped range stops emulation and is resolved by ``lookup`` in the
order of the kernel's fault path (``kvm_mmu_faultin_pfn`` / ``kvm_mmu_faultin_pfn_gmem`` /
``kvm_mmu_prepare_memory_fault_exit`` in arch/x86/kvm/mmu/mmu.c), spec section 5.2. It returns
either ``None`` (mapped; retry the access), an exit, or raises ``OSError(EFAULT)`` (shared
host memory not mapped: KVM_RUN fails without a memory-fault exit). On the pre-fault path the
gmem page behind a backing is allocated (``allocate_gmem_page``, kvm_gmem_get_pfn).

Mapping size: a fault maps the largest aligned block (1 GiB, 2 MiB, else 4 KiB) that lies
inside one memslot, is not "mixed" (``Memslot.is_mixed``), has no poisoned gmem page and, for
host memory, is fully mapped in this process (kvm_mmu_hugepage_adjust: ``block_ok``,
``choose_block``). ``regions.RegionMap`` maps the block in the engine (through a host window
where it can) and re-checks it with the same rules on every invalidation.

TDX-like VMs: the shared/private view comes from a GPA bit in the guest's page tables.
Unicorn 2.1 (QEMU TCG) implements 40 physical address bits, so bit 51 would be a reserved-bit
page fault; the model uses bit 39 (``TDX_SHARED_BIT``), the highest bit the emulated MMU
carries. Both aliases of a GFN may be mapped: the private view at ``gpa``, the shared view at
``gpa | TDX_SHARED_BIT``.
"""

from __future__ import annotations

import errno as _errno

from ..errors import oserror
from ..hostmem import fallocate, host_range_mapped
from ..types import MemoryFaultExit
from ..uapi import PAGE_SIZE as PAGE, Errno, Falloc, MemFlag, MemoryAttribute, MemoryExitFlag
from .memslot import LEVEL_PAGES

TDX_SHARED_BIT = 1 << 39
PHYS_LIMIT = 1 << 39
"""Guest-physical addresses the emulated MMU can reach (QEMU TCG: 40 bits; bit 39 is the
TDX-like shared bit)."""

# Plain ints: an IntFlag operator costs ~1.1 us, an int one ~25 ns, and every fault tests these
# (`guestmem bench touch` and `conversion` time the fault path).
_PRIVATE = int(MemoryAttribute.PRIVATE)
_GUEST_MEMFD = int(MemFlag.GUEST_MEMFD)
_KEEP_SIZE = int(Falloc.KEEP_SIZE)


class Backing:
    """Where one GFN's memory lives, as the fault path decided it."""

    __slots__ = ("slot", "private", "gmem", "host")

    def __init__(self, slot, private: bool, gmem, host: int) -> None:
        self.slot = slot
        self.private = private
        self.gmem = gmem  # the GuestMemfd when gmem-backed, else None
        self.host = host  # host address of the GFN's first byte


def _fault_exit(gfn: int, private: bool, err: int) -> MemoryFaultExit:
    """kvm_mmu_prepare_memory_fault_exit: page-aligned gpa, size 4096, PRIVATE iff the fault was."""
    return MemoryFaultExit(flags=int(MemoryExitFlag.PRIVATE) if private else 0,
                           gpa=gfn * PAGE, size=PAGE, errno=err)


def _poisoned(gmem, pgoff: int, npages: int) -> bool:
    """Whether a page in [pgoff, pgoff+npages) is poisoned (``_poisoned`` holds byte offsets)."""
    lo, hi = pgoff * PAGE, (pgoff + npages) * PAGE
    return any(lo <= p < hi for p in gmem._poisoned)


def lookup(vm, gfn: int, fault_private: bool | None):
    """Decide the backing of ``gfn`` (caller holds ``vm._lock``), spec 5.2 steps 2-6.

    ``fault_private`` is the access's own view (TDX-like VMs) or None (taken from the attribute,
    as KVM does for SW_PROTECTED). Returns ``(Backing | None, exit | None)``; ``(None, None)``
    means emulated MMIO.
    """
    attr_private = bool(vm._private_mem and vm._attribute_at(gfn) & _PRIVATE)
    if fault_private is None:
        fault_private = attr_private
    elif fault_private != attr_private:
        return None, _fault_exit(gfn, fault_private, _errno.EFAULT)
    slot = vm._slot_for_gfn(gfn)
    if slot is None:
        if fault_private:
            return None, _fault_exit(gfn, True, _errno.EFAULT)
        return None, None
    if fault_private or slot.gmem_only:
        gmem = slot.gmem
        if not slot.flags & _GUEST_MEMFD or gmem is None or gmem._released or not gmem._host_address:
            return None, _fault_exit(gfn, fault_private, _errno.EFAULT)
        pgoff = slot.pgoff + gfn - slot.base_gfn
        if pgoff >= gmem.size // PAGE:
            # Only a wrapped bind range check (Profile.bind_offset_signed) binds past EOF; the
            # kernel then allocates page cache past i_size, the model has no page: a documented
            # deviation (README), reported as the fault exit of a released file.
            return None, _fault_exit(gfn, fault_private, _errno.EFAULT)
        if _poisoned(gmem, pgoff, 1):
            return None, _fault_exit(gfn, fault_private, Errno.EHWPOISON)
        return Backing(slot, fault_private, gmem, gmem._host_address + pgoff * PAGE), None
    host = slot.userspace_addr + (gfn - slot.base_gfn) * PAGE
    if not host_range_mapped(host, PAGE):
        raise oserror(_errno.EFAULT, f"gfn {gfn:#x}: userspace_addr {host:#x} is not mapped in this process")
    return Backing(slot, False, None, host), None


def block_ok(vm, b: Backing, level: int, start: int) -> bool:
    """Whether the aligned level-``level`` (1 or 2) block at gfn ``start`` can be mapped as one
    region (kvm_mmu_hugepage_adjust)."""
    slot, n = b.slot, LEVEL_PAGES[level]
    if start < slot.base_gfn or start + n > slot.base_gfn + slot.npages:
        return False
    if vm._private_mem and slot.is_mixed(level, start):
        return False
    if b.gmem is not None:
        pgoff = slot.pgoff + start - slot.base_gfn
        if vm._private_mem and vm._profile.gmem_in_place_conversion and b.gmem._state.attributes.uniform(pgoff, pgoff + n) is None:
            return False  # in-place: the file's attributes are mixed inside the block
        return pgoff + n <= b.gmem.size // PAGE and not _poisoned(b.gmem, pgoff, n)
    return host_range_mapped(slot.userspace_addr + (start - slot.base_gfn) * PAGE, n * PAGE)


def choose_block(vm, gfn: int, b: Backing) -> tuple[int, int, int]:
    """The largest mappable block holding ``gfn``: (start gfn, npages, level)."""
    for level in (2, 1):
        n = LEVEL_PAGES[level]
        start = gfn & ~(n - 1)
        if block_ok(vm, b, level, start):
            return start, n, level
    return gfn, 1, 0


def host_address(b: Backing, start_gfn: int) -> int:
    """The host address of gfn ``start_gfn`` through the backing ``b`` (same slot)."""
    if b.gmem is not None:
        return b.gmem._host_address + (b.slot.pgoff + start_gfn - b.slot.base_gfn) * PAGE
    return b.slot.userspace_addr + (start_gfn - b.slot.base_gfn) * PAGE


def allocate_gmem_page(b: Backing) -> None:
    """Allocate the gmem page behind ``b`` (kvm_gmem_get_pfn on the pre-fault path)."""
    off = b.host - b.gmem._host_address
    fallocate(b.gmem._memfd, _KEEP_SIZE, off, PAGE)
    b.gmem._state.allocated.set(off // PAGE, off // PAGE + 1, True)
