"""Guest-physical resolution for model vCPUs: the fault path, page walks, guest-physical reads.

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
host memory not mapped: KVM_RUN fails without a memory-fault exit).

Mapping size: a fault maps the largest aligned block (1 GiB, 2 MiB, else 4 KiB) that lies
inside one memslot, is not "mixed" (``Memslot.is_mixed``), has no poisoned gmem page and, for
host memory, is fully mapped in this process. ``regions.RegionMap`` maps the block in the
engine (through a host window where it can) and re-checks it with the same rules on every
invalidation.

TDX-like VMs: the shared/private view comes from a GPA bit in the guest's page tables.
Unicorn 2.1 (QEMU TCG) implements 40 physical address bits, so bit 51 would be a reserved-bit
page fault; the model uses bit 39 (``TDX_SHARED_BIT``), the highest bit the emulated MMU
carries. Both aliases of a GFN may be mapped: the private view at ``gpa``, the shared view at
``gpa | TDX_SHARED_BIT``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import struct

from ..errors import oserror
from ..types import MemoryFaultExit
from ..uapi import Errno, MemFlag, MemoryAttribute, MemoryExitFlag

PAGE = 4096
TDX_SHARED_BIT = 1 << 39
PHYS_LIMIT = 1 << 39
"""Guest-physical addresses the emulated MMU can reach (QEMU TCG: 40 bits; bit 39 is the
TDX-like shared bit)."""
LEVEL_PAGES = {2: 1 << 18, 1: 1 << 9, 0: 1}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def host_range_mapped(address: int, length: int) -> bool:
    """True if [address, address+length) is mapped in this process.

    msync(2) with no flags only walks the VMAs (ENOMEM at a hole) and writes nothing back,
    so its cost does not grow with ``length`` the way mincore's per-page vector does.
    """
    if address == 0 or address % PAGE:
        return False
    return _libc.msync(address, length, 0) == 0


_PRIVATE = int(MemoryAttribute.PRIVATE)  # plain ints: IntFlag operators cost ~2 us on the fault path
_GUEST_MEMFD = int(MemFlag.GUEST_MEMFD)


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
    """Whether the aligned block at gfn ``start`` can be mapped as one region (kvm_mmu_hugepage_adjust)."""
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
    if b.gmem is not None:
        return b.gmem._host_address + (b.slot.pgoff + start_gfn - b.slot.base_gfn) * PAGE
    return b.slot.userspace_addr + (start_gfn - b.slot.base_gfn) * PAGE


def _backed_address(vm, gpa: int) -> int | None:
    """The host address of guest-physical ``gpa`` through its backing, or None if not backed
    (MMIO, no slot, a fault exit). Caller holds vm._lock; nothing is mapped."""
    gpa %= PHYS_LIMIT  # a TDX-like shared alias reaches the same GFN
    try:
        b, _ = lookup(vm, gpa // PAGE, None)
    except OSError:
        return None
    return None if b is None else b.host + gpa % PAGE


def read_guest_phys(vm, gpa: int, size: int) -> bytes | None:
    """Read guest-physical memory through its backing, up to the end of ``gpa``'s page
    (caller holds vm._lock). Used by the vCPU's own page walk and instruction decoding;
    None if not backed."""
    host = _backed_address(vm, gpa)
    return None if host is None else ctypes.string_at(host, min(size, PAGE - gpa % PAGE))


def write_guest_phys(vm, gpa: int, data: bytes) -> bool:
    """Write guest-physical memory (within one page) through its backing (caller holds vm._lock).

    Used to push exception frames; False if the page is not backed or ``data`` crosses it.
    """
    host = _backed_address(vm, gpa)
    if host is None or len(data) > PAGE - gpa % PAGE:
        return False
    ctypes.memmove(host, data, len(data))
    gfn = gpa % PHYS_LIMIT // PAGE
    slot = vm._slot_for_gfn(gfn)
    if slot is not None:
        vm._log_dirty(slot, gfn)  # KVM marks the pages it writes for the guest dirty
    return True


def page_walk(read, cr0: int, cr3: int, cr4: int, efer: int, la: int) -> tuple[int | None, list[int]]:
    """Translate linear address ``la`` with the guest's page tables (paging64_walk_addr style).

    ``read(pa, n)`` returns guest-physical bytes or None: Unicorn's mapped memory on the fast
    path, ``read_guest_phys`` (caller holds vm._lock) otherwise. Returns (physical address or
    None if not present, the physical addresses of the table pages visited).
    """
    tables: list[int] = []
    if not cr0 & (1 << 31):
        return la, tables
    mask = 0x000F_FFFF_FFFF_F000

    def entry(table: int, index: int, width: int) -> int | None:
        tables.append(table & ~(PAGE - 1))
        raw = read(table + index * width, width)
        if raw is None or len(raw) < width:
            return None
        return struct.unpack("<Q" if width == 8 else "<I", raw)[0]

    if efer & (1 << 10):  # long mode, 4-level
        table = cr3 & mask
        for shift in (39, 30, 21, 12):
            e = entry(table, (la >> shift) & 0x1FF, 8)
            if e is None or not e & 1:
                return None, tables
            if shift in (30, 21) and e & 0x80:
                return (e & mask & ~((1 << shift) - 1)) | (la & ((1 << shift) - 1)), tables
            table = e & mask
        return table | (la & 0xFFF), tables
    if cr4 & (1 << 5):  # PAE
        e = entry(cr3 & 0xFFFF_FFE0, (la >> 30) & 3, 8)
        if e is None or not e & 1:
            return None, tables
        table = e & mask
        for shift in (21, 12):
            e = entry(table, (la >> shift) & 0x1FF, 8)
            if e is None or not e & 1:
                return None, tables
            if shift == 21 and e & 0x80:
                return (e & mask & ~0x1FFFFF) | (la & 0x1FFFFF), tables
            table = e & mask
        return table | (la & 0xFFF), tables
    e = entry(cr3 & 0xFFFF_F000, (la >> 22) & 0x3FF, 4)
    if e is None or not e & 1:
        return None, tables
    if e & 0x80 and cr4 & (1 << 4):
        return (e & 0xFFC0_0000) | (la & 0x3F_FFFF), tables
    e = entry(e & 0xFFFF_F000, (la >> 12) & 0x3FF, 4)
    if e is None or not e & 1:
        return None, tables
    return (e & 0xFFFF_F000) | (la & 0xFFF), tables


def allocate_gmem_page(b: Backing) -> None:
    """Allocate the gmem page behind ``b`` (kvm_gmem_get_pfn on the pre-fault path)."""
    from ..hostmem import fallocate

    off = b.host - b.gmem._host_address
    fallocate(b.gmem._memfd, 0x01, off, PAGE)  # FALLOC_FL_KEEP_SIZE
    b.gmem._state.allocated.set(off // PAGE, off // PAGE + 1, True)
