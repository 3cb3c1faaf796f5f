"""Guest-physical reads and writes the model makes on the guest's behalf (kvm_read_guest /
kvm_write_guest).

The vCPU reads guest memory outside the engine to walk page tables, decode the instruction at
an exit and read IDT gates; it writes it to push exception frames. Both go through the backing
the fault path (``fault.lookup``) decides for the GFN, never through Unicorn's mappings, so
they see what the guest would see whether or not the page is mapped in the engine yet. Nothing
is mapped here. A write marks the page dirty in the slot's log, as KVM does for the pages it
writes for the guest. Callers hold ``vm._lock``; an access stays within one page.
"""

from __future__ import annotations

import ctypes

from ..uapi import PAGE_SIZE as PAGE
from .fault import PHYS_LIMIT, lookup


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
