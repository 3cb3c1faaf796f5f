"""TDX-like VMs (``GUESTMEM_TDX_LIKE_VM``) on the model with real x86 guest code.

Model-only: no TDX on this host, and the VM type is a guestmem extension. The guest picks
shared or private per access through a GPA bit in its page tables, as TDX does; Unicorn's
MMU has 40 physical address bits, so the shared bit is bit 39 (``TDX_SHARED_BIT``). An
access whose view disagrees with the VM's attribute is a KVM_EXIT_MEMORY_FAULT (spec 5.2
step 2, 5.3): flags PRIVATE iff the access was private, the page-aligned GPA without the
shared bit, size 4096, errno EFAULT; the instruction is not retired, so after the host
converts with KVM_SET_MEMORY_ATTRIBUTES the re-run repeats it against the right backing.
"""

from __future__ import annotations

import errno

import pytest

from model_guests import PAGE, PRIVATE, Machine

from guestmem.guest import PORT_SYNC
from guestmem.model import GUESTMEM_TDX_LIKE_VM
from guestmem.model.fault import TDX_SHARED_BIT
from guestmem.types import IoExit, MemoryFaultExit

GPA = 0xC000_0000
OFF = 0x18  # not page aligned: the exit still reports the page
PRIV_ADDR, SHARED_ADDR = GPA + OFF, (GPA | TDX_SHARED_BIT) + OFF
SHARED_FILL = 0x5A
PRIVATE_VALUE = 0x1111_2222_3333_4444
SHARED_VALUE = 0x7777_8888_9999_AAAA


def fault(private: bool) -> MemoryFaultExit:
    return MemoryFaultExit(flags=8 if private else 0, gpa=GPA, size=PAGE, errno=errno.EFAULT)


def report(step: int) -> str:
    """The guest hands RAX (the value it read) to the host in RDI on PORT_SYNC with EAX = step."""
    return f"mov rdi, rax\nmov eax, {step}\nout {PORT_SYNC}, eax"


GUEST = "\n".join([
    f"mov r8, {PRIV_ADDR:#x}", f"mov r9, {SHARED_ADDR:#x}",
    "mov rax, [r8]", report(1),                                       # private read of a shared page
    f"mov rax, {PRIVATE_VALUE:#x}", "mov [r8], rax", report(10),      # private write
    "mov rax, [r9]", report(2),                                       # shared read of a private page
    "mov rax, [r8]", report(3),                                       # private read again
    f"mov rax, {SHARED_VALUE:#x}", "mov [r9], rax", "mov eax, 0", report(4),  # shared write
])


@pytest.fixture
def tdx(model_system):
    m = Machine(model_system, GUESTMEM_TDX_LIKE_VM)
    gmem = m.vm.create_guest_memfd(PAGE)
    shared = m.add_slot(10, GPA, PAGE, gmem)
    shared.fill(0, PAGE, SHARED_FILL)
    v, = m.load(GUEST, identity_map=[(GPA, PAGE), (GPA | TDX_SHARED_BIT, PAGE)])
    yield m, v, shared
    m.close()
    gmem.close()


def sync(v, step: int) -> int:
    ex = v.run()
    assert ex == IoExit(1, 4, PORT_SYNC, 1, step.to_bytes(4, "little")), ex
    return v.get_regs().rdi


def test_tdx_like_mismatched_accesses_exit_until_the_host_converts(tdx):
    m, v, shared = tdx
    # 1. Private access, VM says shared: exit flags PRIVATE; after conversion, gmem (zero).
    assert v.run() == fault(private=True)
    assert v.run() == fault(private=True)  # not retired: the same access faults again
    m.vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    assert sync(v, 1) == 0
    assert sync(v, 10) == PRIVATE_VALUE
    # 2. Shared access, VM says private: exit flags 0; after conversion, the shared backing.
    assert v.run() == fault(private=False)
    m.vm.set_memory_attributes(GPA, PAGE, 0)
    assert sync(v, 2) == int.from_bytes(bytes([SHARED_FILL]) * 8, "little")
    assert shared.read(OFF, 8) == bytes([SHARED_FILL]) * 8  # the private write never leaked
    # 3. Private again: conversion does not touch gmem, so the private write is still there.
    assert v.run() == fault(private=True)
    m.vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    assert sync(v, 3) == PRIVATE_VALUE
    # 4. A shared *write* while private exits too, and lands in the shared backing once converted.
    assert v.run() == fault(private=False)
    m.vm.set_memory_attributes(GPA, PAGE, 0)
    sync(v, 4)
    assert shared.read(OFF, 8) == SHARED_VALUE.to_bytes(8, "little")


def test_tdx_like_matching_accesses_never_exit(tdx):
    """With the attribute matching each access's view up front, no memory fault happens."""
    m, v, shared = tdx
    m.vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    assert sync(v, 1) == 0
    sync(v, 10)
    m.vm.set_memory_attributes(GPA, PAGE, 0)
    assert sync(v, 2) == int.from_bytes(bytes([SHARED_FILL]) * 8, "little")
    m.vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    assert sync(v, 3) == PRIVATE_VALUE
    m.vm.set_memory_attributes(GPA, PAGE, 0)
    sync(v, 4)
    assert shared.read(OFF, 8) == SHARED_VALUE.to_bytes(8, "little")
