"""The x86 guest page walker the model's vCPUs fall back on (arch/x86/kvm/mmu/paging_tmpl.h).

Unicorn translates linear addresses itself while guest code runs; the model walks the guest's
page tables in Python only where it needs a translation outside the engine: the fault address
of an access that stopped emulation, instruction decoding at an exit, interrupt delivery. The
walker is pure: it reads guest-physical memory through the ``read`` callable it is given and
knows nothing of memslots or backings. It covers the three paging modes a guest can enable
(4-level long mode, PAE, 32-bit with optional PSE) and reports, besides the translation, the
table pages it visited (the code cache watches them).
"""

from __future__ import annotations

import struct

from ..uapi import PAGE_SIZE as PAGE


def page_walk(read, cr0: int, cr3: int, cr4: int, efer: int, la: int) -> tuple[int | None, list[int]]:
    """Translate linear address ``la`` with the guest's page tables (paging64_walk_addr style).

    ``read(pa, n)`` returns guest-physical bytes or None: Unicorn's mapped memory on the fast
    path, ``guest_phys.read_guest_phys`` (caller holds vm._lock) otherwise. Returns (physical
    address or None if not present, the physical addresses of the table pages visited).
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
