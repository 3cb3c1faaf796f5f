"""Guest exceptions and software interrupts go through the guest's own IDT on both backends.

The builder's IDT (``guestmem.guest``) turns every exception into an OUT to PORT_FAIL with
EAX = RDI = vector, RSI = error code, RDX = the RIP the CPU pushed, RCX = CR2. On the kvm
backend the CPU (or kvm_pvm's emulator at CPL0) delivers; on the model ``model.interrupts``
does. The same guest binary must give the same report on both. Handlers the test writes
itself check the frame the CPU pushed and IRETQ back.
"""

from __future__ import annotations

import struct

import pytest

from guestmem import guest
from guestmem.types import IoExit, ShutdownExit
from guestmem.uapi import GuestMemfdFlag, MemFlag

RAM_SIZE = 0x200000
KVM_PVM_SOFT_INT = ("kvm_pvm runs no INT n/INT3 in long mode: at CPL0 its emulator fails with "
                    "KVM_EXIT_INTERNAL_ERROR, at CPL3 the guest gets #UD (measured; real mode works)")
SHARED = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
UNMAPPED = 0x4000_0000  # not in the builder's identity map


@pytest.fixture
def vm(system):
    vm = system.create_vm()
    vm.test_objects = []  # what boot() made, kept alive for the test and closed after it
    yield vm
    for obj in reversed(vm.test_objects):
        obj.close()
    vm.close()


def boot(vm, image):
    gmem = vm.create_guest_memfd(RAM_SIZE, SHARED)
    ram = gmem.mmap()
    vm.set_user_memory_region2(0, MemFlag.GUEST_MEMFD, 0, RAM_SIZE, userspace_addr=ram.address, guest_memfd=gmem)
    guest.load(image, {0: ram})
    vcpu = vm.create_vcpu(0)
    guest.setup_vcpu(vcpu, image)
    vm.test_objects += [gmem, ram, vcpu]
    return vcpu


def idt_gate(vector: int, cpl: int = 0) -> int:
    """Where the builder puts the IDT gate of ``vector`` (its layout does not depend on the code)."""
    return guest.long_mode_guest("nop", cpl=cpl).sregs.idt.base + vector * 16


def report(vcpu):
    """(vector, error code, pushed RIP, CR2) from the builder's PORT_FAIL report."""
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit) and exit_.port == guest.PORT_FAIL, exit_
    r = vcpu.get_regs()
    assert struct.unpack("<I", exit_.data)[0] == r.rdi
    return r.rdi, r.rsi, r.rdx, r.rcx


@pytest.mark.parametrize("cpl", [0, 3])
def test_invalid_opcode_reaches_the_guest_handler(vm, cpl):
    image = guest.long_mode_guest("nop\nud2", cpl=cpl)
    vector, _, rip, _ = report(boot(vm, image))
    assert (vector, rip) == (6, image.entry + 1)


@pytest.mark.parametrize("cpl,error_code", [(0, 0b010), (3, 0b110)])  # write, not present (, user)
def test_page_fault_pushes_error_code_and_sets_cr2(vm, cpl, error_code):
    image = guest.long_mode_guest(f"mov rbx, {UNMAPPED + 0x18:#x}\nmov byte ptr [rbx], 1", cpl=cpl)
    vector, code, rip, cr2 = report(boot(vm, image))
    assert (vector, code, cr2) == (14, error_code, UNMAPPED + 0x18)
    assert rip == image.entry + len(guest.assemble(f"mov rbx, {UNMAPPED + 0x18:#x}", image.entry))


def test_general_protection_on_non_canonical_address(vm):
    image = guest.long_mode_guest("mov rbx, 0x8000000000000000\nmov rax, [rbx]", cpl=3)
    vector, code, _, _ = report(boot(vm, image))
    assert (vector, code) == (13, 0)


def test_divide_error(vm):
    image = guest.long_mode_guest("xor ecx, ecx\nmov eax, 1\nxor edx, edx\ndiv ecx", cpl=3)
    vector, code, rip, _ = report(boot(vm, image))
    assert (vector, code) == (0, 0)
    assert rip == image.entry + len(guest.assemble("xor ecx, ecx\nmov eax, 1\nxor edx, edx", image.entry))


@pytest.mark.kvm_pvm_differs(KVM_PVM_SOFT_INT)
def test_int3_returns_after_the_instruction(vm):
    image = guest.long_mode_guest("nop\nint3\nnop", cpl=0)
    vector, _, rip, _ = report(boot(vm, image))
    assert (vector, rip) == (3, image.entry + 2)


def soft_int_guest(cpl: int, handler_tail: str) -> guest.GuestImage:
    """A guest that installs a DPL-3 trap gate for INT 0x80 whose CPL0 handler checks the frame
    (RIP after the INT, CS, RFLAGS, RSP, SS; EAX = 0xbad if not) and then runs ``handler_tail``."""
    kernel_ss = guest.long_mode_guest("nop").sregs.ss.selector
    cs, ss = (guest.SEL_USER_CODE, guest.SEL_USER_DATA) if cpl == 3 else (guest.SEL_KERNEL_CODE, kernel_ss)
    return guest.long_mode_guest(f"""
        lea rax, [rip + handler]
        mov rbx, {idt_gate(0x80, cpl):#x}
        mov word ptr [rbx], ax
        mov word ptr [rbx + 2], {guest.SEL_KERNEL_CODE}
        mov word ptr [rbx + 4], 0xef00
        shr rax, 16
        mov word ptr [rbx + 6], ax
        shr rax, 16
        mov dword ptr [rbx + 8], eax
        mov dword ptr [rbx + 12], 0
        mov r8, rsp
        pushfq
        pop r9
        xor eax, eax
        int 0x80
    after:
        out {guest.PORT_DONE}, eax
        jmp after
    handler:
        lea rcx, [rip + after]
        cmp [rsp], rcx
        jne bad
        cmp qword ptr [rsp + 8], {cs}
        jne bad
        cmp [rsp + 16], r9
        jne bad
        cmp [rsp + 24], r8
        jne bad
        cmp qword ptr [rsp + 32], {ss}
        jne bad
        add eax, 0x1234
        {handler_tail}
    bad:
        mov eax, 0xbad
        {handler_tail}
    """, cpl=cpl)


def run_with_room_for_vector_0x80(vm, image):
    vcpu = boot(vm, image)
    sregs = vcpu.get_sregs()
    vcpu.set_sregs(sregs.replace(idt=sregs.idt.__class__(base=sregs.idt.base, limit=0xFFF)))
    return vcpu.run()


@pytest.mark.kvm_pvm_differs(KVM_PVM_SOFT_INT)
@pytest.mark.parametrize("cpl", [0, 3])
def test_software_interrupt_handler_sees_the_frame(vm, cpl):
    """At CPL3 the handler runs at CPL0 on the TSS's RSP0 stack, SS:RSP of the caller pushed."""
    image = soft_int_guest(cpl, f"out {guest.PORT_DONE}, eax")
    assert run_with_room_for_vector_0x80(vm, image) == IoExit(1, 4, guest.PORT_DONE, 1, struct.pack("<I", 0x1234))


@pytest.mark.kvm_pvm_differs(KVM_PVM_SOFT_INT)
@pytest.mark.parametrize("cpl", [0, 3])
def test_iretq_returns_from_the_handler(vm, cpl):
    image = soft_int_guest(cpl, "iretq")
    assert run_with_room_for_vector_0x80(vm, image) == IoExit(1, 4, guest.PORT_DONE, 1, struct.pack("<I", 0x1234))


@pytest.mark.kvm_pvm_differs("kvm_pvm reports #DF here, where the SDM and hardware KVM deliver the #NP (measured)")
def test_fault_while_delivering_a_benign_exception_is_delivered_serially(vm):
    """A #UD whose gate is not present raises #NP while delivering; #UD is benign, so the #NP
    is delivered (SDM table 6-5), with the IDT error code vector*8+2."""
    image = guest.long_mode_guest(f"mov rbx, {idt_gate(6) + 5:#x}\nand byte ptr [rbx], 0x7f\nud2")
    vector, code, _, _ = report(boot(vm, image))
    assert (vector, code) == (11, 6 * 8 + 2)


def test_page_fault_without_handler_becomes_double_fault(vm):
    """#PF then #NP (its gate cleared) is a double fault, delivered to the #DF handler."""
    image = guest.long_mode_guest(
        f"mov rbx, {idt_gate(14) + 5:#x}\nand byte ptr [rbx], 0x7f\nmov rbx, {UNMAPPED:#x}\nmov al, [rbx]")
    vector, code, _, _ = report(boot(vm, image))
    assert (vector, code) == (8, 0)


def test_guest_without_idt_shuts_down_on_exception(vm):
    image = guest.long_mode_guest("ud2")
    vcpu = boot(vm, image)
    vcpu.set_sregs(vcpu.get_sregs().replace(idt=image.sregs.idt.__class__(base=0, limit=0)))
    assert vcpu.run() == ShutdownExit()


def test_real_mode_int_goes_through_the_ivt_and_iret_returns(vm):
    """Real mode: INT 0x21 pushes FLAGS, CS, IP and jumps through IVT entry 0x21; IRET returns."""
    image = guest.real_mode_guest(f"""
        mov word ptr [0x84], handler
        mov word ptr [0x86], 0
        xor eax, eax
        int 0x21
        add eax, 1
        out {guest.PORT_DONE}, eax
    spin:
        jmp spin
    handler:
        mov eax, 0x4320
        iret
    """)
    assert boot(vm, image).run() == IoExit(1, 4, guest.PORT_DONE, 1, struct.pack("<I", 0x4321))
