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


# VM methods outside the interface Protocol (extra ioctls and the guestmem extensions): same rule.
EXTRA_VM_CALLS = {"create_irqchip": (), "set_nr_mmu_pages": (64,), "get_tsc_khz": (), "memslots": (),
                  "stats": (), "get_memory_attributes": (0, P)}
MODEL_GMEM_CALLS = {"stats": (), "pin": (0, P), "inject_hwpoison": (0,)}


def test_closed_vm_extra_methods(system):
    """Observed (model): vm.stats() and vm.memslots() worked after vm.close()."""
    vm = system.create_vm()
    vm.close()
    check_all_ebadf(vm, EXTRA_VM_CALLS)


def test_closed_model_guest_memfd_extensions(model_system):
    vm = model_system.create_vm()
    g = vm.create_guest_memfd(4 * P)
    g.close()
    check_all_ebadf(g, MODEL_GMEM_CALLS)
    vm.close()


def _race_close(obj, calls, rounds: int = 30) -> list[str]:
    """Call every method of ``obj`` from two threads while a third closes it; return what escaped
    other than success or EBADF."""
    import threading

    bad: list[str] = []
    start = threading.Barrier(3)

    def hammer() -> None:
        start.wait()
        for _ in range(rounds):
            for method, args in calls.items():
                try:
                    out = getattr(obj, method)(*args)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        bad.append(f"{method}: {exc}")
                except Exception as exc:  # noqa: BLE001 - anything else is the finding
                    bad.append(f"{method}: {type(exc).__name__}: {exc}")
                else:
                    if hasattr(out, "close"):
                        out.close()

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    start.wait()
    obj.close()
    for t in threads:
        t.join()
    return bad


def test_methods_racing_close_give_ebadf_or_complete(system):
    """Every System/Vm/GuestMemfd method racing close() in another thread completes or fails
    with EBADF (never AttributeError or another errno)."""
    import guestmem

    with guestmem.open_system(system.backend) as s:
        assert _race_close(s, {k: v for k, v in SYSTEM_CALLS.items() if k != "create_vm"}) == []
    vm = system.create_vm()
    calls = {k: v for k, v in VM_CALLS.items() if k not in ("create_vcpu", "set_user_memory_region2",
                                                           "set_user_memory_region", "enable_cap")}
    calls.update({k: v for k, v in EXTRA_VM_CALLS.items() if k != "create_irqchip"})
    assert _race_close(vm, calls) == []
    vm = system.create_vm()
    g = vm.create_guest_memfd(64 * P, 3)
    calls = {k: v for k, v in GMEM_CALLS.items() if k not in ("read", "write", "pread", "pwrite", "lseek",
                                                             "truncate")}
    if system.backend == "model":
        calls.update({"stats": ()})
    assert _race_close(g, calls) == []
    vm.close()


def test_vcpu_created_after_the_system_is_closed(system):
    """Fuzzer (tests/test_fuzz_api.py): kvm create_vcpu asked the closed /dev/kvm fd for the
    kvm_run size and CPUID (EBADF) where the kernel needs only the VM fd (the model succeeded)."""
    vm = system.create_vm()
    system.close()
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_regs().rip == 0xFFF0
    vcpu.close()
    vm.close()
