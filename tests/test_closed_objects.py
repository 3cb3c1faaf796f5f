"""The kvm-ioctls sweep: every method of a closed System, Vm, GuestMemfd or Vcpu fails with EBADF.

Methods come from the interface Protocols (plus ``fileno``), so a method added to the
interface without an entry here fails ``test_sweep_covers_interface``. Closing twice is a
no-op. Runs on every backend.
"""

from __future__ import annotations

import errno
import inspect

import pytest

from guestmem import interface
from guestmem.types import Regs, Sregs

P = 4096

SYSTEM_CALLS = {
    "fileno": (),
    "api_version": (),
    "check_extension": (1,),
    "vcpu_mmap_size": (),
    "create_vm": (0,),
}
VM_CALLS = {
    "fileno": (),
    "check_extension": (1,),
    "enable_cap": (201, 0),
    "create_guest_memfd": (P,),
    "set_user_memory_region2": (1, 0, 0, P, 0),
    "set_user_memory_region": (1, 0, 0, P, 0),
    "set_memory_attributes": (0, P, 0),
    "create_vcpu": (0,),
}
GMEM_CALLS = {
    "fileno": (),
    "fallocate": (1, 0, P),
    "allocate": (0, P),
    "punch_hole": (0, P),
    "fstat": (),
    "fstatfs": (),
    "mmap": (),
    "read": (1,),
    "write": (b"x",),
    "pread": (1, 0),
    "pwrite": (b"x", 0),
    "lseek": (0, 0),
    "truncate": (P,),
    "set_memory_attributes": (0, P, 0),
}
VCPU_CALLS = {
    "get_regs": (),
    "set_regs": (Regs(),),
    "get_sregs": (),
    "set_sregs": (Sregs(),),
    "run": (),
    "complete_io": (b"",),
    "complete_mmio": (b"",),
    "set_hypercall_ret": (0,),
    "pre_fault_memory": (0, P),
    "kick": (),
}
CASES = {"System": SYSTEM_CALLS, "Vm": VM_CALLS, "GuestMemfd": GMEM_CALLS, "Vcpu": VCPU_CALLS}


def protocol_methods(proto: type) -> set[str]:
    return {name for name, value in vars(proto).items()
            if inspect.isfunction(value) and not name.startswith("_") and name != "close"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sweep_covers_interface(name):
    assert protocol_methods(getattr(interface, name)) <= set(CASES[name])


def check_all_ebadf(obj, calls):
    for method, args in calls.items():
        with pytest.raises(OSError) as info:
            getattr(obj, method)(*args)
        assert info.value.errno == errno.EBADF, f"{method}: {info.value}"


def test_closed_system(backend):
    import guestmem

    system = guestmem.open_system(backend)
    system.close()
    check_all_ebadf(system, SYSTEM_CALLS)
    system.close()  # second close is a no-op


def test_closed_vm(system):
    vm = system.create_vm()
    vm.close()
    check_all_ebadf(vm, VM_CALLS)
    vm.close()


def test_closed_guest_memfd(system):
    vm = system.create_vm()
    g = vm.create_guest_memfd(4 * P)
    g.close()
    check_all_ebadf(g, GMEM_CALLS)
    g.close()
    vm.close()


def test_closed_vcpu(system):
    vm = system.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    check_all_ebadf(vcpu, VCPU_CALLS)
    vcpu.close()
    vm.close()


def test_closing_parent_leaves_children_open(system):
    vm = system.create_vm()
    g = vm.create_guest_memfd(4 * P)
    system.close()
    assert vm.check_extension(1) == 1
    vm.close()
    assert g.fstat().st_size == 4 * P
    g.close()
