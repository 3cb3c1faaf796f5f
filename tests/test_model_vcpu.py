"""The model vCPU on a model VM: exits, MAP_GPA_RANGE, private memory, invalidation, hwpoison,
kick, KVM_PRE_FAULT_MEMORY, and vCPUs racing the host's punches.

Model-only: private memory, memory-fault exits and hwpoison cannot run on this host's KVM (the
exits the host can run are in test_vcpu_conformance and test_guest_code, on both backends).
"""

from __future__ import annotations

import errno
import threading

import pytest

from model_guests import GMEM, PAGE, PRIVATE, Machine

from guestmem.guest import PORT_DONE
from guestmem.types import HltExit, HypercallExit, IntrExit, IoExit, MemoryFaultExit, MmioExit
from guestmem.uapi import Errno, KvmHypercallError, MemoryExitFlag

GPA = 0x4000_0000
MMIO = 0x8000_0000
U64 = 1 << 64


def done(ex) -> bool:
    """The exit ``guest.long_mode_guest``'s epilogue makes once the test's code has run."""
    return isinstance(ex, IoExit) and ex.port == PORT_DONE


def private_fault(gpa: int, err: int = errno.EFAULT) -> MemoryFaultExit:
    return MemoryFaultExit(flags=int(MemoryExitFlag.PRIVATE), gpa=gpa, size=PAGE, errno=err)


@pytest.fixture
def machines(model_system):
    """A factory of model VMs (SW_PROTECTED, MAP_GPA_RANGE exits on), closed after the test."""
    made: list[Machine] = []

    def make(**kwargs) -> Machine:
        made.append(Machine(model_system, **kwargs))
        return made[-1]

    yield make
    for m in made:
        m.close()
        for obj in m.keep:  # guest_memfds and shared mappings
            obj.close()


def private_slot(m: Machine, size: int):
    """A guest_memfd of ``size`` bound as slot 10 at GPA and made private: (gmem, shared mapping)."""
    gmem = m.vm.create_guest_memfd(size)
    m.keep.append(gmem)
    shared = m.add_slot(10, GPA, size, gmem)
    m.vm.set_memory_attributes(GPA, size, PRIVATE)
    return gmem, shared


def test_io_mmio_hlt_exits(machines):
    m = machines()
    v, = m.load(f"""
        mov al, 7; out 0x10, al
        mov dx, 0x20; in eax, dx; mov ebx, eax
        mov rdi, {MMIO:#x}; mov rsi, [rdi]
        mov qword ptr [rdi+8], 0x77
        hlt""", identity_map=[(MMIO, PAGE)])
    assert v.run() == IoExit(1, 1, 0x10, 1, b"\x07")
    assert v.run() == IoExit(0, 4, 0x20, 1, b"")
    v.complete_io(b"\x44\x33\x22\x11")
    assert v.run() == MmioExit(MMIO, b"", 8, False)
    v.complete_mmio(b"\x99" * 8)
    assert v.run() == MmioExit(MMIO + 8, b"\x77" + bytes(7), 8, True)
    assert v.run() == HltExit()
    r = v.get_regs()
    assert r.rbx == 0x11223344 and r.rsi == 0x9999999999999999


HYPERCALLS = """
    mov rax, 12; mov rbx, 0x200000; mov rcx, 1; mov rdx, 0x10; vmcall; mov r8, rax
    mov rax, 12; mov rbx, 0x200001; mov rcx, 1; vmmcall; mov r9, rax
    mov rax, 12; mov rbx, 0x200000; mov rcx, 0; vmcall; mov r10, rax
    mov rax, 99; vmcall; mov r11, rax"""


def test_map_gpa_range_exits_once_enabled_and_bad_calls_fail_in_the_guest(machines):
    """MAP_GPA_RANGE exits with the answer landing in RAX; an unaligned GPA and zero pages are
    -KVM_EINVAL and an unknown hypercall -KVM_ENOSYS, all without an exit."""
    v, = machines().load(HYPERCALLS)
    assert v.run() == HypercallExit(nr=12, args=(0x200000, 1, 0x10, 0, 0, 0), ret=0, flags=1)
    v.set_hypercall_ret(5)
    assert done(v.run())
    r = v.get_regs()
    assert r.r8 == 5
    assert r.r9 == r.r10 == U64 - KvmHypercallError.EINVAL
    assert r.r11 == U64 - KvmHypercallError.ENOSYS


def test_map_gpa_range_without_the_cap_is_enosys(machines):
    v, = machines(hypercalls=False).load(HYPERCALLS)
    assert done(v.run())
    assert v.get_regs().r8 == U64 - KvmHypercallError.ENOSYS


def test_private_access_without_gmem_or_slot_is_an_efault_memory_fault(machines):
    """PE-02: a private access to a slot without guest_memfd, or to no slot, exits EFAULT with
    PRIVATE; once the page is shared again the access completes."""
    m = machines()
    m.add_slot(10, 0xC000_0000, 2 << 20)
    m.vm.set_memory_attributes(0xC000_0000, PAGE, PRIVATE)
    m.vm.set_memory_attributes(0xD000_0000, PAGE, PRIVATE)
    v, = m.load("mov rdi, 0xc0000000; mov rax, [rdi]; mov rdi, 0xd0000000; mov rax, [rdi]",
                identity_map=[(0xC000_0000, PAGE), (0xD000_0000, PAGE)])
    assert v.run() == private_fault(0xC000_0000)
    m.vm.set_memory_attributes(0xC000_0000, PAGE, 0)
    assert v.run() == private_fault(0xD000_0000)


def test_punch_attribute_flip_and_delete_reach_a_running_vcpu(machines):
    """Each change invalidates what the vCPU has mapped: a punched private page reads as a fresh
    zero page, a page made shared reads the slot's userspace memory, a mixed 2 MiB block is
    mapped with 4 KiB pages, and a deleted slot's shared access is MMIO."""
    m = machines()
    gmem, shared = private_slot(m, 4 << 20)
    v, = m.load(f"""
        mov rdi, {GPA:#x}; mov byte ptr [rdi], 0x5a; out 0x10, al
        again: mov bl, [rdi]; out 0x11, al; jmp again""", identity_map=[(GPA, 4 << 20)])
    stat = f"vcpu{v.vcpu_id}_mappings"
    assert v.run().port == 0x10
    assert m.vm.stats()[f"{stat}_2m"] == 2  # the guest image's block and the uniform private block
    assert v.run().port == 0x11
    assert v.get_regs().rbx & 0xFF == 0x5A and shared.read(0, 1) == b"\0"  # the write went to gmem
    gmem.punch_hole(0, PAGE)
    assert v.run().port == 0x11
    assert v.get_regs().rbx & 0xFF == 0
    m.vm.set_memory_attributes(GPA + PAGE, PAGE, 0)  # the first 2 MiB block is mixed now
    assert m.vm.stats()[f"{stat}_4k"] == 0
    assert v.run().port == 0x11
    assert m.vm.stats()[f"{stat}_4k"] >= 1
    m.vm.set_memory_attributes(GPA, PAGE, 0)
    shared.write(0, b"\x33")
    assert v.run().port == 0x11
    assert v.get_regs().rbx & 0xFF == 0x33
    m.vm.set_user_memory_region2(10, GMEM, GPA, 0, 0)
    assert v.run() == MmioExit(GPA, b"", 1, False)


def test_hwpoison_faults_until_the_page_is_punched(machines):
    m = machines()
    gmem, _ = private_slot(m, 2 << 20)
    gmem.inject_hwpoison(0)
    v, = m.load(f"mov rdi, {GPA:#x}; mov al, [rdi]", identity_map=[(GPA, PAGE)])
    assert v.run() == private_fault(GPA, Errno.EHWPOISON)
    gmem.punch_hole(0, PAGE)
    assert done(v.run())


def test_private_access_after_the_gmem_is_released_is_efault(machines):
    """Closing the last reference releases the file: its slots stay but lose their binding."""
    m = machines()
    gmem, _ = private_slot(m, 2 << 20)
    gmem.close()
    v, = m.load(f"mov rdi, {GPA:#x}; mov al, [rdi]", identity_map=[(GPA, PAGE)])
    assert v.run() == private_fault(GPA)


def test_kick_makes_run_return_intr(machines):
    v, = machines().load("l: jmp l")
    v.kick()
    assert v.run() == IntrExit()
    t = threading.Timer(0.2, v.kick)
    t.start()
    assert v.run() == IntrExit()
    t.join()


def test_pre_fault_memory_rules(machines):
    m = machines()
    private_slot(m, (2 << 20) + PAGE)
    v, = m.load("hlt")
    for args in ((GPA, PAGE, 1), (GPA + 1, PAGE, 0), (GPA, 0, 0), (U64 - PAGE, 2 * PAGE, 0)):
        with pytest.raises(OSError) as exc:
            v.pre_fault_memory(*args)
        assert exc.value.errno == errno.EINVAL, args
    assert v.pre_fault_memory(GPA, 2 << 20) == (GPA + (2 << 20), 0)  # PF-01
    assert v.pre_fault_memory(GPA + (2 << 20), 2 * PAGE) == (GPA + (2 << 20) + PAGE, PAGE)  # PF-02: partial
    with pytest.raises(OSError) as exc:
        v.pre_fault_memory(GPA + (2 << 20) + PAGE, PAGE)  # PF-03: no memslot
    assert exc.value.errno == errno.ENOENT


def test_concurrent_vcpus_with_host_punching(machines):
    """4 vCPUs write and verify private pages while the host punches: no stale data, no deadlock."""
    m = machines()
    gmem, _ = private_slot(m, 4 << 20)
    vcpus = m.load(f"""
        mov rdi, {GPA:#x}; add rdi, r12
        l: mov byte ptr [rdi], r13b; mov al, [rdi]; cmp al, r13b; jne bad; out 0x10, al; jmp l
        bad: mov bl, al; out 0x11, al; hlt""", identity_map=[(GPA, 4 << 20)], vcpus=4)
    errors: list = []
    stop = threading.Event()

    def worker(i: int, v) -> None:
        v.set_regs(v.get_regs().replace(r12=i * 0x100000, r13=0x11 * (i + 1)))
        for _ in range(300):
            ex = v.run()
            if not (isinstance(ex, IoExit) and ex.port == 0x10):
                errors.append((i, ex))
                return

    def puncher() -> None:
        while not stop.is_set():
            for i in range(4):
                gmem.punch_hole(i * 0x100000, PAGE)

    threads = [threading.Thread(target=worker, args=(i, v)) for i, v in enumerate(vcpus)]
    p = threading.Thread(target=puncher)
    p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    stop.set()
    p.join(timeout=5)
    assert not any(t.is_alive() for t in threads) and not p.is_alive()
    assert not errors
