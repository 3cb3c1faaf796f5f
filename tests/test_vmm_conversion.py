"""vmm.conversion: one path for MAP_GPA_RANGE and MEMORY_FAULT conversions.

Private memory exists only on the model (this host's kernel has no memory attributes), so
the conversion tests run on the model; on the kernel the manager still answers the guest,
with -KVM_EINVAL for memory that cannot be private.
"""

from __future__ import annotations

import errno

import pytest

from guestmem.guest import PORT_SYNC
from guestmem.types import HypercallExit, MemoryFaultExit
from guestmem.uapi import PAGE_SIZE, Errno, KvmHypercallError, MapGpaRangeAttr, MemoryExitFlag, VmType
from guestmem.vmm.conversion import ConversionManager
from guestmem.vmm.machine import Machine, boot_region
from guestmem.vmm.layout import Region
from guestmem.vmm.memory import Conversion, GuestMemory
from guestmem.vmm.runloop import Outcome

MiB = 1 << 20
DATA = 1 << 32
U64 = (1 << 64) - 1


class RecordingVcpu:
    """Stands in for the vCPU that took the exit: records what the manager answers."""

    vcpu_id = 0

    def __init__(self) -> None:
        self.ret: int | None = None

    def set_hypercall_ret(self, value: int) -> None:
        self.ret = value


@pytest.fixture
def manager(model_system):
    vm = model_system.create_vm(VmType.SW_PROTECTED)
    mem = GuestMemory(vm, [boot_region(), Region("data", DATA, 8 * MiB, private=True)])
    yield ConversionManager(mem)
    mem.close()
    vm.close()


def hc(gpa: int, npages: int, attrs: int, nr: int = 12) -> HypercallExit:
    return HypercallExit(nr=nr, args=(gpa, npages, attrs, 0, 0, 0), ret=0, flags=1)


def test_explicit_conversion_sets_attributes_notifies_and_returns_zero(manager):
    seen, vcpu = [], RecordingVcpu()
    manager.memory.add_listener(seen.append)
    assert manager.handle_hypercall(vcpu, hc(DATA, 513, MapGpaRangeAttr.ENCRYPTED)) == 0
    assert vcpu.ret == 0
    assert manager.memory.private_ranges(DATA, DATA + 8 * MiB) == [(DATA, DATA + 2 * MiB + PAGE_SIZE)]
    assert seen == [Conversion(DATA, 2 * MiB + PAGE_SIZE, True)]
    manager.handle_hypercall(vcpu, hc(DATA, 1, MapGpaRangeAttr.DECRYPTED))
    assert manager.memory.is_private(DATA) is False
    st = manager.stats
    assert (st.conversions, st.explicit, st.implicit, st.bytes_converted) == (2, 2, 0, 2 * MiB + 2 * PAGE_SIZE)
    assert st.by_size == {("to_private", 2 * MiB + PAGE_SIZE): 1, ("to_shared", PAGE_SIZE): 1}


def test_implicit_conversion_follows_the_faulting_access(manager):
    vcpu = RecordingVcpu()
    fault = MemoryFaultExit(flags=int(MemoryExitFlag.PRIVATE), gpa=DATA + MiB, size=PAGE_SIZE, errno=errno.EFAULT)
    assert manager.handle_memory_fault(vcpu, fault) is True
    assert manager.memory.private_ranges(DATA, DATA + 8 * MiB) == [(DATA + MiB, DATA + MiB + PAGE_SIZE)]
    assert manager.handle_memory_fault(vcpu, MemoryFaultExit(0, DATA + MiB, PAGE_SIZE, errno.EFAULT)) is True
    assert manager.memory.private_ranges(DATA, DATA + 8 * MiB) == []
    assert (manager.stats.implicit, manager.stats.explicit) == (2, 0)
    assert vcpu.ret is None  # no hypercall answer on this path


def test_unserviceable_memory_faults_are_reported_not_converted(manager):
    vcpu = RecordingVcpu()
    poisoned = MemoryFaultExit(int(MemoryExitFlag.PRIVATE), DATA, PAGE_SIZE, Errno.EHWPOISON)
    outside = MemoryFaultExit(int(MemoryExitFlag.PRIVATE), 0x1000, PAGE_SIZE, errno.EFAULT)  # boot: shared-only
    assert manager.handle_memory_fault(vcpu, poisoned) is False
    assert manager.handle_memory_fault(vcpu, outside) is False
    assert manager.memory.snapshot().private == ()


@pytest.mark.parametrize("exit, code", [
    (hc(DATA + 8 * MiB, 1, MapGpaRangeAttr.ENCRYPTED), KvmHypercallError.EINVAL),      # past guest memory
    (hc(DATA + 8 * MiB - PAGE_SIZE, 2, MapGpaRangeAttr.ENCRYPTED), KvmHypercallError.EINVAL),  # straddles the end
    (hc(0x1000, 1, MapGpaRangeAttr.ENCRYPTED), KvmHypercallError.EINVAL),             # shared-only region
    (hc(DATA + 1, 1, MapGpaRangeAttr.ENCRYPTED), KvmHypercallError.EINVAL),           # unaligned
    (hc(DATA, 0, MapGpaRangeAttr.ENCRYPTED), KvmHypercallError.EINVAL),               # no pages
    (hc(DATA, 1 << 60, MapGpaRangeAttr.ENCRYPTED), KvmHypercallError.EINVAL),         # gfn overflow
    (hc(DATA, 1, 1 << 7), KvmHypercallError.EINVAL),                                  # unknown attribute bit
    (hc(DATA, 1, 0, nr=11), KvmHypercallError.ENOSYS),                                # not MAP_GPA_RANGE
])
def test_bad_requests_return_kvm_error_codes_to_the_guest(manager, exit, code):
    vcpu = RecordingVcpu()
    before = manager.memory.snapshot()
    assert manager.handle_hypercall(vcpu, exit) == -code
    assert vcpu.ret == -code & U64
    assert manager.memory.snapshot() is before


def test_failures_are_counted_by_code(manager):
    manager.convert(DATA + 8 * MiB, PAGE_SIZE, True)
    manager.convert(0, PAGE_SIZE, True)
    assert manager.stats.failed == 2 and manager.stats.errors == {"KVM_EINVAL": 2}
    assert manager.stats.conversions == 0


def test_conversion_discards_the_opposite_backing(manager):
    mem = manager.memory
    mem.fill(DATA, 4 * MiB, 0x5A)
    assert manager.convert(DATA, 2 * MiB, True) == 0
    assert mem.read(DATA, 2 * MiB) == bytes(2 * MiB)  # the shared pages were dropped
    assert mem.read(DATA + 2 * MiB, 8) == b"\x5a" * 8
    assert manager.stats.discarded_bytes == 2 * MiB


def test_conversion_without_discard_keeps_shared_pages(model_system):
    vm = model_system.create_vm(VmType.SW_PROTECTED)
    mem = GuestMemory(vm, [boot_region(), Region("data", DATA, 4 * MiB, private=True)])
    try:
        mgr = ConversionManager(mem, discard=False)
        mem.fill(DATA, PAGE_SIZE, 0x5A)
        assert mgr.convert(DATA, PAGE_SIZE, True) == 0
        assert mem.read(DATA, 8) == b"\x5a" * 8 and mgr.stats.discarded_bytes == 0
    finally:
        mem.close()
        vm.close()


def test_kernel_vm_answers_the_guest_with_kvm_einval(kvm_system):
    """On the kernel (no private memory here) nothing is private-capable: every request is refused."""
    vm = kvm_system.create_vm(0)
    mem = GuestMemory(vm, [boot_region(), Region("data", DATA, 4 * MiB)])
    try:
        mgr = ConversionManager(mem)
        vcpu = RecordingVcpu()
        assert mgr.handle_hypercall(vcpu, hc(DATA, 1, MapGpaRangeAttr.ENCRYPTED)) == -KvmHypercallError.EINVAL
        assert vcpu.ret == -KvmHypercallError.EINVAL & U64
    finally:
        mem.close()
        vm.close()


# --- through a real guest (model: private memory) ----------------------------------------------------

REOPEN = f"""
    mov rbx, {DATA:#x}
    mov ecx, 1
    mov edx, 0x10
    mov eax, 12
    vmcall
    mov r8, rax
    mov rax, 0x5555555555555555
    mov [rbx], rax
    mov ecx, 1
    xor edx, edx
    mov eax, 12
    vmcall
    mov ecx, 1
    mov edx, 0x10
    mov eax, 12
    vmcall
    mov rdi, [rbx]
    mov rbx, {DATA + 64 * MiB:#x}
    mov ecx, 1
    mov edx, 0x10
    mov eax, 12
    vmcall
    mov rsi, rax
    mov rdx, r8
    mov eax, 1
    out {PORT_SYNC}, eax
    xor eax, eax
    out 0xf4, eax
"""


@pytest.mark.parametrize("discard, expected", [(True, 0), (False, 0x5555555555555555)])
def test_guest_sees_discarded_private_memory_as_zero_and_gets_errors_in_rax(model_system, discard, expected):
    """Private -> shared -> private: with discard the guest_memfd page was punched (fresh zeros);
    without it the old private contents come back (spec section 4). A request beyond guest
    memory returns -KVM_EINVAL in RAX and the guest keeps running."""
    with Machine(model_system, [boot_region(), Region("data", DATA, 4 * MiB, private=True)]) as m:
        m.conversions.discard = discard
        seen = {}

        def sync(vcpu, exit):
            r = vcpu.get_regs()
            seen.update(first=r.rdx, reread=r.rdi, bad=r.rsi)
            return Outcome.HANDLED

        m.io_handlers[PORT_SYNC] = sync
        m.load_assembly(REOPEN)
        (loop,) = m.run(timeout=20)
        assert loop.result == 0
        assert seen == {"first": 0, "reread": expected, "bad": -KvmHypercallError.EINVAL & U64}
        assert m.exits["hypercall"] == 4
        assert m.conversions.stats.conversions == 3 and m.conversions.stats.failed == 1


# --- pre-faulting, counters and error codes -----------------------------------------------------------


def gmem_pages_allocated(vm) -> int:
    return vm.stats()["gmem"]["pages_allocated"]


@pytest.mark.parametrize("prefault", [True, False])
def test_prefault_maps_the_converted_range_on_the_requesting_vcpu(model_system, prefault):
    """With prefault, a conversion to private pre-faults the range on the vCPU that asked
    (KVM_PRE_FAULT_MEMORY on private GFNs allocates the gmem pages, spec 2.5), on both the
    explicit (MAP_GPA_RANGE or a direct call) and the implicit path; without a vCPU, or without prefault, nothing is allocated."""
    vm = model_system.create_vm(VmType.SW_PROTECTED)
    mem = GuestMemory(vm, [boot_region(), Region("data", DATA, 8 * MiB, private=True)])
    vcpu = vm.create_vcpu(0)
    try:
        mgr = ConversionManager(mem, prefault=prefault)
        assert mgr.prefault is prefault
        assert mgr.convert(DATA, 3 * MiB, True, vcpu=vcpu) == 0
        fault = MemoryFaultExit(int(MemoryExitFlag.PRIVATE), DATA + 4 * MiB, PAGE_SIZE, errno.EFAULT)
        assert mgr.handle_memory_fault(vcpu, fault) is True
        assert mgr.convert(DATA + 6 * MiB, 2 * PAGE_SIZE, True) == 0  # no vCPU: nothing to pre-fault on
        asker = RecordingVcpu()  # took the MAP_GPA_RANGE exit; pre-faults through the real vCPU
        asker.pre_fault_memory = vcpu.pre_fault_memory
        assert mgr.handle_hypercall(asker, hc(DATA + 5 * MiB, 2, MapGpaRangeAttr.ENCRYPTED)) == 0
        done = 3 * MiB + 3 * PAGE_SIZE if prefault else 0
        assert mgr.stats.prefaulted_bytes == done
        assert gmem_pages_allocated(vm) == done // PAGE_SIZE
    finally:
        vcpu.close()
        mem.close()
        vm.close()


def test_counters_accumulate_over_conversions(manager, monkeypatch):
    from guestmem.vmm import conversion

    clock = iter(range(0, 1000, 5))  # a clock whose every reading is 5 s after the last
    monkeypatch.setattr(conversion.time, "perf_counter", lambda: float(next(clock)))
    assert manager.convert(DATA, 2 * PAGE_SIZE, True) == 0
    assert manager.convert(DATA, PAGE_SIZE, False) == 0
    assert manager.convert(DATA + MiB, PAGE_SIZE, True, explicit=False) == 0
    manager.convert(DATA + 1, PAGE_SIZE, True)
    d = manager.stats.as_dict()
    assert d.pop("seconds") == 4 * 5.0  # each conversion, failed or not, read the clock twice
    assert d == {
        "conversions": 3, "bytes_converted": 4 * PAGE_SIZE, "explicit": 2, "implicit": 1, "failed": 1,
        "by_direction": {"to_private": 2, "to_shared": 1},
        "by_size": [{"direction": "to_private", "size": PAGE_SIZE, "label": "4 KiB", "count": 1},
                    {"direction": "to_private", "size": 2 * PAGE_SIZE, "label": "8 KiB", "count": 1},
                    {"direction": "to_shared", "size": PAGE_SIZE, "label": "4 KiB", "count": 1}],
        "errors": {"KVM_EINVAL": 1}, "discarded_bytes": 4 * PAGE_SIZE, "prefaulted_bytes": 0,
        "eagain_retries": 0, "pins_released": 0,
    }


@pytest.mark.parametrize("err, code", [
    (errno.EINVAL, KvmHypercallError.EINVAL), (errno.EPERM, KvmHypercallError.EPERM),
    (errno.ENOTTY, KvmHypercallError.EOPNOTSUPP), (errno.ENOMEM, KvmHypercallError.EFAULT),
    (None, KvmHypercallError.EFAULT),
])
def test_a_failed_attribute_change_answers_the_guest_with_its_kvm_code(manager, monkeypatch, err, code):
    """Fault injection: an OSError from KVM_SET_MEMORY_ATTRIBUTES becomes the guest's -KVM_E*
    (EFAULT for errors MAP_GPA_RANGE has no code for), and nothing is counted as converted."""
    def fail(*args):
        raise OSError(err, "injected") if err is not None else OSError("injected")
    monkeypatch.setattr(manager.memory, "set_attributes", fail)
    vcpu = RecordingVcpu()
    assert manager.handle_hypercall(vcpu, hc(DATA, 1, MapGpaRangeAttr.ENCRYPTED)) == -code
    assert vcpu.ret == -code & U64
    assert manager.stats.conversions == 0 and manager.stats.errors == {f"KVM_{code.name}": 1}


def _vm_and_layer(mem):
    return mem.vm.get_memory_attributes(0, 1 << 52), mem.private_ranges(0, 1 << 52), mem.snapshot()


@pytest.mark.parametrize("args, kwargs, name", [
    ((DATA + 0.0, PAGE_SIZE, True), {}, "gpa"),  # was: the VM converted int(gpa), then the map raised
    ((DATA, float(PAGE_SIZE), True), {}, "size"),
    ((DATA, PAGE_SIZE, "shared"), {}, "private"),  # was: a truthy string converted to private
    ((DATA, PAGE_SIZE, True), {"vcpu": object()}, "vcpu"),  # with prefault on: was converted, then raised
])
def test_a_conversion_refused_for_its_arguments_changes_nothing(model_system, args, kwargs, name):
    """Model only (private memory). Wrong argument types are TypeError naming the argument,
    before the VM is touched: the VM, the layer's map and the manager's counters are as before."""
    vm = model_system.create_vm(VmType.SW_PROTECTED)
    mem = GuestMemory(vm, [boot_region(), Region("data", DATA, 8 * MiB, private=True)])
    try:
        manager = ConversionManager(mem, prefault=True)
        assert manager.prefault  # the model has KVM_PRE_FAULT_MEMORY
        assert manager.convert(DATA + MiB, PAGE_SIZE, True) == 0
        before = _vm_and_layer(mem), manager.stats.as_dict()
        with pytest.raises(TypeError, match=f"^{name} must be"):
            manager.convert(*args, **kwargs)
        after = _vm_and_layer(mem), manager.stats.as_dict()
        assert after[0] == before[0]
        assert {k: v for k, v in after[1].items() if k != "seconds"} == \
            {k: v for k, v in before[1].items() if k != "seconds"}
    finally:
        mem.close()
        vm.close()


@pytest.mark.parametrize("gpa, size", [(0, PAGE_SIZE), (DATA + 1, PAGE_SIZE), (DATA, 0), (DATA + 8 * MiB, PAGE_SIZE),
                                       (DATA + 8 * MiB - PAGE_SIZE, 2 * PAGE_SIZE), (U64 + 1 - PAGE_SIZE, PAGE_SIZE)])
def test_a_conversion_refused_for_its_range_changes_nothing(manager, gpa, size):
    """Model only. Ranges the manager refuses answer -KVM_EINVAL and leave the VM and the
    layer as they were."""
    mem = manager.memory
    assert manager.convert(DATA + MiB, PAGE_SIZE, True) == 0
    before = _vm_and_layer(mem)
    assert manager.convert(gpa, size, True) == -KvmHypercallError.EINVAL
    assert _vm_and_layer(mem) == before
