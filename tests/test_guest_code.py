"""A vCPU executes what is in guest memory now, not what was there when it last ran.

The host rewrites guest code through its mapping between runs and while a vCPU runs, another
vCPU rewrites it, the guest rewrites its own: on KVM the CPU fetches from memory, so the new
instructions run. The model must drop whatever it derived from the old bytes (translated
blocks, decoded IN/OUT sites). Every test runs on both backends.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

from guestmem import guest
from guestmem.types import DTable, HltExit, IntrExit, IoExit, Regs, Segment, Sregs
from conftest import GUEST_RAM_SIZE as RAM_SIZE, add_ram, vcpu_of

PORT = 0x11


def out_value(exit_) -> int:
    assert isinstance(exit_, IoExit) and exit_.port == PORT, exit_
    return exit_.data[0]


def test_host_rewrite_between_runs_long_mode(vm):
    """The issue's repro: three programs loaded in turn at one GPA, each run from the start."""
    ram = add_ram(vm, 0, 0)
    vcpu = vcpu_of(vm)
    seen = []
    for k in (1, 2, 3):
        image = guest.long_mode_guest(f"mov al, {k}\nout {PORT}, al\nhlt")
        guest.load(image, {0: ram})
        guest.setup_vcpu(vcpu, image)
        seen.append(out_value(vcpu.run()))
        assert isinstance(vcpu.run(), HltExit)
    assert seen == [1, 2, 3]


def flat_protected_mode(apic_base: int) -> Sregs:
    """32-bit flat protected mode without paging; the GDT (``GDT32``) at GPA 0."""
    flat = dict(base=0, limit=0xFFFF_FFFF, present=1, s=1, g=1, db=1)
    data = Segment(selector=0x10, type=3, **flat)
    return Sregs(cs=Segment(selector=0x08, type=11, **flat), ds=data, es=data, fs=data, gs=data, ss=data,
                 tr=Segment(type=11, present=1, limit=0xFFFF), gdt=DTable(base=0, limit=len(GDT32) - 1),
                 cr0=0x11, apic_base=apic_base)


def _descriptor(access: int) -> bytes:
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, 0xCF, 0)  # flat, 4 KiB granular, 32-bit


GDT32 = bytes(8) + _descriptor(0x9A) + _descriptor(0x92)


def test_host_rewrite_between_runs_protected_mode(vm):
    ram = add_ram(vm, 0, 0)
    ram.write(0, GDT32)
    vcpu = vcpu_of(vm)
    sregs = flat_protected_mode(vcpu.get_sregs().apic_base)
    seen = []
    for k in (1, 2, 3):
        ram.write(0x1000, guest.assemble(f"mov al, {k}\nout {PORT}, al\nhlt", 0x1000, 32))
        vcpu.set_sregs(sregs)
        vcpu.set_regs(Regs(rip=0x1000, rsp=0x8000, rflags=2))
        seen.append(out_value(vcpu.run()))
        assert isinstance(vcpu.run(), HltExit)
    assert seen == [1, 2, 3]


def test_host_rewrite_without_resetting_registers(vm):
    """The guest loops back over code the host rewrites between two exits (no set_regs)."""
    ram = add_ram(vm, 0, 0)
    vcpu = vcpu_of(vm)
    image = guest.long_mode_guest(f"again:\nmov al, 1\nout {PORT}, al\njmp again")
    guest.load(image, {0: ram})
    guest.setup_vcpu(vcpu, image)
    assert out_value(vcpu.run()) == 1
    assert out_value(vcpu.run()) == 1
    ram.write(image.code_gpa + 1, b"\x07")  # the immediate of `mov al, 1`
    assert out_value(vcpu.run()) == 7


def test_rewritten_io_instruction_of_another_length_exits_exactly(vm):
    """An IN/OUT site the model decoded (``out imm8, al``, 2 bytes) becomes ``out dx, al``
    (1 byte): the exit must still come right after the new instruction."""
    ram = add_ram(vm, 0, 0)
    vcpu = vcpu_of(vm)
    first = guest.long_mode_guest(f"mov al, 1\nmov dx, {PORT}\nout {PORT}, al\nmov al, 9\nhlt")
    guest.load(first, {0: ram})
    guest.setup_vcpu(vcpu, first)
    assert out_value(vcpu.run()) == 1
    second = guest.long_mode_guest(f"mov al, 2\nmov dx, {PORT}\nout dx, al\nmov al, 8\nhlt")
    assert second.code_gpa == first.code_gpa
    guest.load(second, {0: ram})
    guest.setup_vcpu(vcpu, second)
    assert out_value(vcpu.run()) == 2
    r = vcpu.get_regs()
    at = second.code_gpa + len(guest.assemble(f"mov al, 2\nmov dx, {PORT}\nout dx, al", second.code_gpa))
    assert (r.rip, r.rax & 0xFF) == (at, 2)
    assert isinstance(vcpu.run(), HltExit)
    assert vcpu.get_regs().rax & 0xFF == 8


def test_another_vcpu_rewrites_code(vm):
    """vCPU 1 patches the immediate of an instruction vCPU 0 has already run."""
    low = add_ram(vm, 0, 0)
    high = add_ram(vm, 1, RAM_SIZE)
    runner = guest.long_mode_guest(f"again:\nmov al, 1\nout {PORT}, al\njmp again")
    target = runner.code_gpa + 1
    writer = guest.long_mode_guest(f"mov rbx, {target:#x}\nmov byte ptr [rbx], 5\nhlt",
                                   memory_base=RAM_SIZE, memory_size=RAM_SIZE, identity_map=[(0, RAM_SIZE)])
    guest.load(runner, {0: low})
    guest.load(writer, {RAM_SIZE: high})
    v0, v1 = vcpu_of(vm, 0), vcpu_of(vm, 1)
    guest.setup_vcpu(v0, runner)
    guest.setup_vcpu(v1, writer)
    assert [out_value(v0.run()) for _ in range(2)] == [1, 1]  # the loop has been translated
    assert isinstance(v1.run(), HltExit)
    assert low.read(target, 1) == b"\x05"
    assert out_value(v0.run()) == 5


def test_guest_rewrites_its_own_code(vm):
    ram = add_ram(vm, 0, 0)
    vcpu = vcpu_of(vm)
    image = guest.long_mode_guest(f"""
        again:
        mov al, 1
        out {PORT}, al
        lea rbx, [rip + again]
        inc byte ptr [rbx + 1]
        jmp again
    """)
    guest.load(image, {0: ram})
    guest.setup_vcpu(vcpu, image)
    assert [out_value(vcpu.run()) for _ in range(3)] == [1, 2, 3]


def test_host_rewrite_while_the_vcpu_runs(vm):
    """The host turns a spin loop into a fall-through while a thread is inside run(): that
    thread's run ends (on kvm at once, on the model at the next entry: a kick) and the new
    code runs."""
    ram = add_ram(vm, 0, 0)
    vcpu = vcpu_of(vm)
    image = guest.long_mode_guest(f"spin:\njmp spin\nmov al, 0x42\nout {PORT}, al\nhlt")
    guest.load(image, {0: ram})
    guest.setup_vcpu(vcpu, image)
    exits = []

    def loop():
        while True:
            ex = vcpu.run()
            exits.append(ex)
            if not isinstance(ex, IntrExit):
                return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(0.1)
    assert not exits, exits  # still spinning
    ram.write(image.code_gpa + 1, b"\x00")  # jmp spin (EB FE) -> jmp +0 (EB 00): one byte, atomic
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        vcpu.kick()
        thread.join(0.05)
    if thread.is_alive():  # never returned: stop it so the fixture can close the vCPU
        vcpu.kick()
        pytest.fail(f"the vCPU kept running the old code; exits: {exits[-3:]}")
    assert out_value(exits[-1]) == 0x42
