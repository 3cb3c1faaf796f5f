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


# --- CR2 belongs to #PF only (issue 15 item 2) ---------------------------------------------------


def test_cr2_keeps_its_value_through_other_exceptions(vm):
    """CR2 changes only on a #PF: a #UD handler reads what the guest last wrote there."""
    image = guest.long_mode_guest("mov rax, 0x1234\nmov cr2, rax\nud2")
    vector, _, _, cr2 = report(boot(vm, image))
    assert (vector, cr2) == (6, 0x1234)


@pytest.mark.parametrize("code,vector", [("nop\nud2", 6), ("xor ecx, ecx\nmov eax, 1\nxor edx, edx\ndiv ecx", 0)])
def test_cr2_after_a_non_page_fault_exception_is_the_reset_value(vm, code, vector):
    got_vector, _, _, cr2 = report(boot(vm, guest.long_mode_guest(code, cpl=3)))
    assert (got_vector, cr2) == (vector, 0)


def test_get_sregs_reports_the_cr2_that_set_sregs_gave(vm):
    vcpu = boot(vm, guest.long_mode_guest("nop\nud2"))
    vcpu.set_sregs(vcpu.get_sregs().replace(cr2=0xABC000))
    vector, _, _, cr2 = report(vcpu)
    assert (vector, cr2, vcpu.get_sregs().cr2) == (6, 0xABC000, 0xABC000)


# --- 32-bit protected mode (issue 11 item 2) -----------------------------------------------------

PM_GDT, PM_IDT, PM_STUBS, PM_CODE, PM_STACK = 0x0, 0x800, 0x1000, 0x3000, 0x8000
PM_CS, PM_DS = 0x08, 0x10


def _flat_descriptor(access: int) -> bytes:
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, 0xCF, 0)  # base 0, 4 GiB, 32-bit


def _gate32(handler: int, gate_type: int = 0xE) -> bytes:
    return struct.pack("<HHBBH", handler & 0xFFFF, PM_CS, 0, 0x80 | gate_type, handler >> 16)


def protected_mode_guest(code: str, handlers: dict[int, str] | None = None):
    """(memory chunks, Regs, Sregs) of a flat 32-bit CPL0 guest without paging: ``code`` at
    PM_CODE, every vector's gate pointing at a stub that reports like the long-mode builder's
    (EAX = EDI = vector, ESI = error code, EDX = pushed EIP, ECX = CR2, OUT to PORT_FAIL), or
    at the code in ``handlers[vector]``."""
    from guestmem.types import DTable, Regs, Segment, Sregs

    handlers = handlers or {}
    gdt = bytes(8) + _flat_descriptor(0x9A) + _flat_descriptor(0x92)
    common = PM_STUBS + 32 * 16
    stubs = bytearray()
    for vector in range(32):
        push_error = "" if vector in (8, 10, 11, 12, 13, 14, 17) else "push 0\n"
        stub = guest.assemble(f"{push_error}push {vector}\njmp {common:#x}", PM_STUBS + len(stubs), 32)
        stubs += stub.ljust(16, b"\xcc")
    stubs += guest.assemble("pop edi\npop esi\nmov edx, [esp]\nmov ecx, cr2\nmov eax, edi\n"
                            f"report: out {guest.PORT_FAIL}, eax\njmp report", common, 32)
    text = guest.assemble(f"{code}\ndone: out {guest.PORT_DONE}, eax\njmp done", PM_CODE, 32)
    chunks = [(PM_GDT, gdt), (PM_STUBS, bytes(stubs)), (PM_CODE, text)]
    gates = {v: PM_STUBS + 16 * v for v in range(32)}
    at = PM_CODE + len(text) + 0x10
    for vector, body in handlers.items():
        blob = guest.assemble(body, at, 32)
        chunks.append((at, blob))
        gates[vector] = at
        at += len(blob) + 0x10
    chunks.append((PM_IDT, b"".join(_gate32(gates[v]) for v in range(32))))
    flat = dict(base=0, limit=0xFFFF_FFFF, present=1, s=1, g=1, db=1)
    data = Segment(selector=PM_DS, type=3, **flat)
    sregs = Sregs(cs=Segment(selector=PM_CS, type=11, **flat), ds=data, es=data, fs=data, gs=data, ss=data,
                  tr=Segment(type=11, present=1, limit=0xFFFF, s=0), gdt=DTable(base=PM_GDT, limit=len(gdt) - 1),
                  idt=DTable(base=PM_IDT, limit=32 * 8 - 1), cr0=0x11)
    return chunks, Regs(rip=PM_CODE, rsp=PM_STACK, rflags=2), sregs


def boot32(vm, code: str, handlers: dict[int, str] | None = None):
    chunks, regs, sregs = protected_mode_guest(code, handlers)
    gmem = vm.create_guest_memfd(RAM_SIZE, SHARED)
    ram = gmem.mmap()
    vm.set_user_memory_region2(0, MemFlag.GUEST_MEMFD, 0, RAM_SIZE, userspace_addr=ram.address, guest_memfd=gmem)
    for gpa, blob in chunks:
        ram.write(gpa, blob)
    vcpu = vm.create_vcpu(0)
    vm.test_objects += [gmem, ram, vcpu]
    vcpu.set_sregs(sregs.replace(apic_base=vcpu.get_sregs().apic_base))
    vcpu.set_regs(regs)
    return vcpu


def test_protected_mode_invalid_opcode_reaches_the_handler(vm):
    vector, code, eip, _ = report(boot32(vm, "nop\nud2"))
    assert (vector, code, eip) == (6, 0, PM_CODE + 1)


def test_protected_mode_divide_error(vm):
    setup = "xor ecx, ecx\nmov eax, 1\nxor edx, edx"
    vector, code, eip, _ = report(boot32(vm, f"{setup}\ndiv ecx"))
    assert (vector, code, eip) == (0, 0, PM_CODE + len(guest.assemble(setup, PM_CODE, 32)))


def test_protected_mode_general_protection_pushes_the_selector(vm):
    """Loading DS with a selector beyond the GDT limit: #GP with the selector as error code."""
    vector, code, _, _ = report(boot32(vm, "mov ax, 0x40\nmov ds, ax"))
    assert (vector, code) == (13, 0x40)


def _frame_checking_handler(tail: str) -> dict[int, str]:
    """A #UD handler that checks the frame (EIP of the ud2, CS, EFLAGS with RF set, as for every
    fault), adds 0x233 to EAX (0xbad instead if the frame is wrong), skips the ud2 and runs
    ``tail``."""
    ud2_at = PM_CODE + len(guest.assemble("pushfd\npop ebx\nmov eax, 0x1000", PM_CODE, 32))
    return {6: f"""
        cmp dword ptr [esp], {ud2_at:#x}
        jne bad
        cmp dword ptr [esp + 4], {PM_CS}
        jne bad
        or ebx, 0x10000
        cmp [esp + 8], ebx
        jne bad
        add eax, 0x233
        add dword ptr [esp], 2
        {tail}
    bad:
        mov eax, 0xbad
        add dword ptr [esp], 2
        {tail}
    """}


PM_FRAME_CODE = "pushfd\npop ebx\nmov eax, 0x1000\nud2\nadd eax, 1"


def test_protected_mode_handler_sees_the_frame(vm):
    vcpu = boot32(vm, PM_FRAME_CODE, _frame_checking_handler(f"out {guest.PORT_DONE}, eax"))
    assert vcpu.run() == IoExit(1, 4, guest.PORT_DONE, 1, struct.pack("<I", 0x1233))


@pytest.mark.kvm_pvm_differs("kvm_pvm's emulator fails IRETD in 32-bit protected mode at CPL0 "
                             "(KVM_EXIT_INTERNAL_ERROR, measured)")
def test_protected_mode_iretd_returns_from_the_handler(vm):
    vcpu = boot32(vm, PM_FRAME_CODE, _frame_checking_handler("iretd"))
    assert vcpu.run() == IoExit(1, 4, guest.PORT_DONE, 1, struct.pack("<I", 0x1234))


def test_protected_mode_without_idt_shuts_down(vm):
    vcpu = boot32(vm, "ud2")
    sregs = vcpu.get_sregs()
    vcpu.set_sregs(sregs.replace(idt=sregs.idt.__class__(base=0, limit=0)))
    assert vcpu.run() == ShutdownExit()
