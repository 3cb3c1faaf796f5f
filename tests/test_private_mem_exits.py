"""private_mem_kvm_exits PE-01/PE-02 (spec 7.3) on the model with real x86 guest code.

Model-only: this host's KVM has no private memory (KVM_SET_MEMORY_ATTRIBUTES is ENOTTY).
"""

from __future__ import annotations

import errno
import threading

import pytest

from model_guests import GMEM, PAGE, PRIVATE, Machine

from guestmem.guest import PORT_DONE
from guestmem.types import IoExit, MemoryFaultExit

GPA = 0xC000_0000
READ_LOOP = f"mov rdi, {GPA:#x}\nl1: mov rax, [rdi]\njmp l1"


def test_pe01_private_access_after_memslot_deleted(model_system):
    m = Machine(model_system)
    gmem = m.vm.create_guest_memfd(PAGE)
    m.add_slot(10, GPA, PAGE, gmem)
    m.vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    v, = m.load(READ_LOOP, identity_map=[(GPA, PAGE)])
    out: list = []
    t = threading.Thread(target=lambda: out.append(v.run()))
    t.start()
    t.join(timeout=0.2)  # the guest is spinning on its private page
    m.vm.set_user_memory_region2(10, GMEM, GPA, 0, 0)
    t.join(timeout=10)
    assert not t.is_alive()
    assert out == [MemoryFaultExit(flags=8, gpa=GPA, size=4096, errno=errno.EFAULT)]
    m.close()
    gmem.close()


def test_pe02_private_access_to_non_gmem_slot(model_system):
    m = Machine(model_system)
    m.add_slot(10, GPA, PAGE)
    m.vm.set_memory_attributes(GPA, PAGE, PRIVATE)
    v, = m.load(READ_LOOP, identity_map=[(GPA, PAGE)])
    assert v.run() == MemoryFaultExit(flags=8, gpa=GPA, size=4096, errno=errno.EFAULT)
    m.close()


def test_io_exit_is_exact_and_in_completes_into_rax(model_system):
    """Each OUT/IN exits right after itself: no later instruction of its block has run."""
    m = Machine(model_system)
    v, = m.load(f"mov eax, 0x11223344\nl1: out {PORT_DONE}, eax\ninc rbx\nmov dx, 0x20\nin eax, dx\n"
                "add rbx, rax\njmp l1")
    for i in range(3):
        ex = v.run()
        eax = 0x100 if i else 0x11223344  # from the second round on, what the IN completed with
        assert ex == IoExit(1, 4, PORT_DONE, 1, eax.to_bytes(4, "little")) and v.get_regs().rbx == i * 0x101
        ex = v.run()
        assert ex == IoExit(0, 4, 0x20, 1, b"") and v.get_regs().rbx == i * 0x101 + 1
        v.complete_io((0x100).to_bytes(4, "little"))
    m.close()


def test_vcpu_fd_pins_vm_and_closes(model_system):
    m = Machine(model_system)
    v, = m.load("hlt")
    fd = v.fileno()
    assert fd >= 0
    m.vm.close()
    assert m.vm._users >= 1  # the vCPU still pins the VM
    v.close()
    with pytest.raises(OSError) as exc:
        v.fileno()
    assert exc.value.errno == errno.EBADF
