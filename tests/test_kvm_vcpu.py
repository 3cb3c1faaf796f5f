"""kvm.Vcpu against the real /dev/kvm: lifecycle, registers, exit decoding, completions, kicks.

Guests here run on guest_memfd RAM (MMAP|INIT_SHARED, userspace_addr = the gmem mapping,
which kvm_pvm needs). CPL0 guest code is emulated on this host (~1 µs per
instruction), so CPL0 guests stay a few instructions long and spinning guests run at CPL3.
"""

from __future__ import annotations

import errno
import struct
import threading
import time

import pytest

from guestmem import guest
from guestmem.types import (
    HltExit, HypercallExit, IntrExit, IoExit, MemoryFaultExit, MmioExit, Regs,
)
from guestmem.uapi import Cap, GuestMemfdFlag, Hypercall, IoDirection, MemFlag, MemoryExitFlag

RAM_SIZE = 0x200000
SHARED = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED


@pytest.fixture
def vm(kvm_system):
    vm = kvm_system.create_vm()
    yield vm
    for vcpu in vm.vcpus:
        vcpu.close()
    vm.close()


def boot(vm, image, ram_gpa: int = 0):
    """guest_memfd RAM at ``ram_gpa`` with ``image`` loaded, one vCPU ready to run."""
    gmem = vm.create_guest_memfd(RAM_SIZE, SHARED)
    ram = gmem.mmap()
    vm.set_user_memory_region2(0, MemFlag.GUEST_MEMFD, ram_gpa, RAM_SIZE, userspace_addr=ram.address,
                               guest_memfd=gmem)
    guest.load(image, {ram_gpa: ram})
    vcpu = vm.create_vcpu(0)
    guest.setup_vcpu(vcpu, image)
    return vcpu, gmem, ram


# --- lifecycle and registers ----------------------------------------------------------------------


def test_create_vcpu_has_id_and_fd(vm):
    vcpu = vm.create_vcpu(3)
    assert vcpu.vcpu_id == 3
    assert vcpu.fileno() >= 0


def test_duplicate_vcpu_id_is_eexist(vm):
    vm.create_vcpu(0)
    with pytest.raises(OSError) as exc:
        vm.create_vcpu(0)
    assert exc.value.errno == errno.EEXIST


def test_create_vcpu_on_closed_vm_is_ebadf(kvm_system):
    vm = kvm_system.create_vm()
    vm.close()
    with pytest.raises(OSError) as exc:
        vm.create_vcpu(0)
    assert exc.value.errno == errno.EBADF


def test_closed_vcpu_fails_every_method_with_ebadf(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    calls = {
        "fileno": (), "get_regs": (), "set_regs": (Regs(),), "get_sregs": (), "set_sregs": (None,),
        "run": (), "complete_io": (b"",), "complete_mmio": (b"",), "set_hypercall_ret": (0,),
        "pre_fault_memory": (0, 0x1000), "kick": (),
    }
    for name, args in calls.items():
        with pytest.raises(OSError) as exc:
            getattr(vcpu, name)(*args)
        assert exc.value.errno == errno.EBADF, name
    vcpu.close()  # a second close is a no-op


def test_regs_round_trip(vm):
    vcpu = vm.create_vcpu(0)
    regs = Regs(**{name: (i + 1) * 0x1111_1111_1111 for i, name in enumerate(Regs.__slots__[:16])},
                rip=0x1234, rflags=0x202)
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs


def test_set_regs_value_wider_than_u64_is_einval(vm):
    vcpu = vm.create_vcpu(0)
    with pytest.raises(OSError) as exc:
        vcpu.set_regs(Regs(rax=1 << 64))
    assert exc.value.errno == errno.EINVAL


def test_sregs_round_trip_long_mode(vm):
    vcpu = vm.create_vcpu(0)
    image = guest.long_mode_guest("nop", cpl=3)
    guest.setup_vcpu(vcpu, image)
    got = vcpu.get_sregs()
    assert got.replace(apic_base=image.sregs.apic_base) == image.sregs
    vcpu.set_sregs(got)
    assert vcpu.get_sregs() == got


def test_cpuid_allows_long_mode(vm):
    """Vcpu sets the supported CPUID at creation; without it KVM_SET_SREGS refuses EFER.LME."""
    vcpu = vm.create_vcpu(0)
    guest.setup_vcpu(vcpu, guest.long_mode_guest("nop"))
    assert vcpu.get_sregs().efer & 0x500 == 0x500


# --- exits ----------------------------------------------------------------------------------------


def test_hlt_at_cpl0_is_hlt_exit(vm):
    vcpu, _, _ = boot(vm, guest.long_mode_guest("hlt"))
    assert vcpu.run() == HltExit()
    assert vcpu.get_regs().rip == guest.long_mode_guest("hlt").entry + 1


def test_string_io_data_is_size_times_count_bytes(vm):
    """rep outsb / rep insw: each IoExit carries size*count bytes (OUT) or takes them from
    complete_io (IN). The kernel decides count: on this host an emulated rep outsb exits once per
    byte, while rep insw is batched."""
    code = (f"lea rsi, [rip + msg]\nmov ecx, 5\nmov dx, {guest.PORT_CONSOLE}\nrep outsb\n"
            f"mov rdi, 0x100000\nmov ecx, 3\nmov dx, {guest.PORT_SYNC}\nrep insw\nhlt\nmsg: .ascii \"hello\"")
    vcpu, _, ram = boot(vm, guest.long_mode_guest(code))
    console, words = b"", bytes(range(6))
    while True:
        exit_ = vcpu.run()
        if exit_ == HltExit():
            break
        assert isinstance(exit_, IoExit), exit_
        if exit_.port == guest.PORT_CONSOLE:
            assert len(exit_.data) == exit_.size * exit_.count
            console += exit_.data
        else:
            assert (exit_.port, exit_.size, exit_.data) == (guest.PORT_SYNC, 2, b"")
            n = exit_.size * exit_.count
            vcpu.complete_io(words[:n])
            words = words[n:]
    assert console == b"hello"
    assert ram.read(0x100000, 6) == bytes(range(6))


def test_repeated_out_exits_are_equal_and_carry_only_their_own_bytes(vm):
    """run() may hand out one IoExit per distinct exit: an OUT repeated with the same data is an
    equal exit, and a shorter OUT after a longer one carries only its own bytes (the rest of the
    kernel's PIO data page is left over from the earlier exit)."""
    code = ("mov eax, 0x44332211\nout 0x10, eax\nmov al, 0x55\nout 0x10, al\n"
            "mov eax, 0x44332255\nout 0x10, eax\nout 0x10, al\nout 0x10, ax\n"
            "mov ecx, 3\nagain: out 0x11, al\nloop again\nhlt")
    vcpu, _, _ = boot(vm, guest.long_mode_guest(code))
    exits = []
    while (exit_ := vcpu.run()) != HltExit():
        exits.append(exit_)
    out = int(IoDirection.OUT)
    assert exits == [
        IoExit(direction=out, size=4, port=0x10, count=1, data=bytes.fromhex("11223344")),
        IoExit(direction=out, size=1, port=0x10, count=1, data=b"\x55"),
        IoExit(direction=out, size=4, port=0x10, count=1, data=bytes.fromhex("55223344")),
        IoExit(direction=out, size=1, port=0x10, count=1, data=b"\x55"),
        IoExit(direction=out, size=2, port=0x10, count=1, data=bytes.fromhex("5522")),
    ] + [IoExit(direction=out, size=1, port=0x11, count=1, data=b"\x55")] * 3


def test_mmio_exit_for_gpa_without_memslot(vm):
    """A read and a write at a GPA with no memslot exit as MMIO; complete_mmio answers the read."""
    mmio = 0x4000_0000
    code = f"mov rbx, {mmio:#x}\nmov eax, [rbx]\nmov [rbx + 8], eax\nhlt"
    vcpu, _, _ = boot(vm, guest.long_mode_guest(code, identity_map=[(mmio, 0x1000)]))
    exit_ = vcpu.run()
    assert exit_ == MmioExit(phys_addr=mmio, data=b"", len=4, is_write=False)
    vcpu.complete_mmio(struct.pack("<I", 0xDEADBEEF))
    exit_ = vcpu.run()
    assert exit_ == MmioExit(phys_addr=mmio + 8, data=struct.pack("<I", 0xDEADBEEF), len=4, is_write=True)
    assert vcpu.run() == HltExit()


def test_completions_without_matching_exit_are_einval(vm):
    vcpu, _, _ = boot(vm, guest.long_mode_guest("hlt"))
    assert vcpu.run() == HltExit()
    for call, arg in ((vcpu.complete_io, b"\0"), (vcpu.complete_mmio, b"\0"), (vcpu.set_hypercall_ret, 0)):
        with pytest.raises(OSError) as exc:
            call(arg)
        assert exc.value.errno == errno.EINVAL, call


def test_complete_io_longer_than_the_in_is_einval(vm):
    vcpu, _, _ = boot(vm, guest.long_mode_guest(f"in al, {guest.PORT_SYNC}\nhlt"))
    assert isinstance(vcpu.run(), IoExit)
    with pytest.raises(OSError) as exc:
        vcpu.complete_io(b"\0\0")
    assert exc.value.errno == errno.EINVAL


@pytest.mark.kvm_pvm_differs("kvm_pvm never completes VMMCALL/VMCALL at CPL0: KVM_RUN spins on the "
                              "instruction, with or without the cap (measured)")
def test_map_gpa_range_hypercall_exit(kvm_system, vm):
    """KVM_HC_MAP_GPA_RANGE exits to userspace once enabled; the answer lands in RAX."""
    if not kvm_system.check_extension(Cap.EXIT_HYPERCALL) & (1 << Hypercall.MAP_GPA_RANGE):
        pytest.skip("KVM_CAP_EXIT_HYPERCALL does not offer MAP_GPA_RANGE on this kernel")
    vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << Hypercall.MAP_GPA_RANGE)
    code = "mov eax, 12\nmov rbx, 0x100000\nmov ecx, 2\nmov edx, 0x10\nvmmcall\nhlt"
    vcpu, _, _ = boot(vm, guest.long_mode_guest(code))
    timer = threading.Timer(0.3, vcpu.kick)  # bounds the wait where KVM_RUN spins (kvm_pvm)
    timer.start()
    exit_ = vcpu.run()
    timer.cancel()
    timer.join()
    assert isinstance(exit_, HypercallExit), f"{exit_} at rip {vcpu.get_regs().rip:#x}"
    assert (exit_.nr, exit_.args[:3], exit_.ret) == (Hypercall.MAP_GPA_RANGE, (0x100000, 2, 0x10), 0)
    vcpu.set_hypercall_ret(0x1234)
    assert vcpu.run() == HltExit()
    assert vcpu.get_regs().rax == 0x1234


def test_memory_fault_exit_after_gmem_released(vm):
    """Closing the last reference to a bound gmem leaves the slot without a file: a CPL3 guest
    access then fails KVM_RUN with EFAULT + KVM_EXIT_MEMORY_FAULT (spec 3.5, 11.2), which run()
    returns as an exit. CPL3 because kvm_pvm's emulator (CPL0) reads through userspace_addr."""
    data_gpa = 0x4000_0000
    code = f"mov rbx, {data_gpa:#x}\nmov eax, [rbx]\nout {guest.PORT_DONE}, eax"
    vcpu, _, _ = boot(vm, guest.long_mode_guest(code, cpl=3, identity_map=[(data_gpa, 0x1000)]))
    data = vm.create_guest_memfd(0x1000, SHARED)
    vm.set_user_memory_region2(1, MemFlag.GUEST_MEMFD, data_gpa, 0x1000, guest_memfd=data)
    data.close()
    exit_ = vcpu.run()
    assert exit_ == MemoryFaultExit(flags=0, gpa=data_gpa, size=0x1000, errno=errno.EFAULT)
    assert not flags_private(exit_.flags)


def flags_private(flags: int) -> bool:
    return bool(flags & MemoryExitFlag.PRIVATE)


# --- kicks ----------------------------------------------------------------------------------------


def test_kick_before_run_returns_intr_once(vm):
    vcpu, _, _ = boot(vm, guest.long_mode_guest("hlt"))
    vcpu.kick()
    assert vcpu.run() == IntrExit()
    assert vcpu.run() == HltExit()


def test_kick_from_another_thread_interrupts_spinning_guest(vm):
    code = "spin: jmp spin"
    vcpu, _, _ = boot(vm, guest.long_mode_guest(code, cpl=3))
    result = []
    runner = threading.Thread(target=lambda: result.append(vcpu.run()))
    runner.start()
    time.sleep(0.05)
    assert result == []
    vcpu.kick()
    runner.join(5)
    assert result == [IntrExit()]
    assert vcpu.get_regs().rip == guest.long_mode_guest(code, cpl=3).entry


def test_kick_from_main_thread_interrupts_run_in_main_thread(vm):
    """A kick from a helper thread interrupts KVM_RUN in the main thread (signal handler path)."""
    vcpu, _, _ = boot(vm, guest.long_mode_guest("spin: jmp spin", cpl=3))
    timer = threading.Timer(0.05, vcpu.kick)
    timer.start()
    assert vcpu.run() == IntrExit()
    timer.join()


def test_kick_interrupts_only_the_kicked_vcpu(kvm_system, vm):
    """Two vCPUs spin on two threads; kicking one returns IntrExit there and leaves the other
    running until its own kick (kick finds the thread inside this vCPU's run)."""
    other_vm = kvm_system.create_vm()
    try:
        booted = [boot(v, guest.long_mode_guest("spin: jmp spin", cpl=3)) for v in (vm, other_vm)]
        vcpus = [b[0] for b in booted]  # booted keeps each guest's memory alive
        results: list[list] = [[], []]
        threads = [threading.Thread(target=lambda i=i: results[i].append(vcpus[i].run())) for i in (0, 1)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        vcpus[0].kick()
        threads[0].join(5)
        time.sleep(0.05)
        assert results == [[IntrExit()], []]
        vcpus[1].kick()
        threads[1].join(5)
        assert results == [[IntrExit()], [IntrExit()]]
    finally:
        for vcpu in other_vm.vcpus:
            vcpu.close()
        other_vm.close()


# --- KVM_PRE_FAULT_MEMORY ---------------------------------------------------------------------------


def test_pre_fault_memory_argument_checks(vm):
    """Argument checks run before the capability-dependent part, on every kernel with the ioctl."""
    vcpu, _, _ = boot(vm, guest.long_mode_guest("hlt"))
    for args in ((0, 0x1000, 1), (0x10, 0x1000), (0, 0x10), (0, 0)):
        with pytest.raises(OSError) as exc:
            vcpu.pre_fault_memory(*args)
        assert exc.value.errno in (errno.EINVAL, errno.ENOTTY), args


def test_pre_fault_memory_without_the_cap_fails(kvm_system, vm):
    """Without TDP (kvm_pvm is shadow paging only) the ioctl exists but is EOPNOTSUPP."""
    if kvm_system.check_extension(Cap.PRE_FAULT_MEMORY):
        pytest.skip("KVM_CAP_PRE_FAULT_MEMORY is set: the ioctl works here (test_pre_fault_memory)")
    vcpu, _, _ = boot(vm, guest.long_mode_guest("hlt"))
    with pytest.raises(OSError) as exc:
        vcpu.pre_fault_memory(0, 0x1000)
    assert exc.value.errno in (errno.ENOTTY, errno.EOPNOTSUPP)


def test_pre_fault_memory(kvm_system, vm):
    if not kvm_system.check_extension(Cap.PRE_FAULT_MEMORY):
        pytest.skip("KVM_CAP_PRE_FAULT_MEMORY is 0 (no TDP: kvm_pvm is shadow paging only)")
    vcpu, _, _ = boot(vm, guest.long_mode_guest("hlt"))
    assert vcpu.pre_fault_memory(0, 0x2000) == (0x2000, 0)
    with pytest.raises(OSError) as exc:
        vcpu.pre_fault_memory(0, 0x1000, flags=1)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        vcpu.pre_fault_memory(0x4000_0000, 0x1000)
    assert exc.value.errno == errno.ENOENT
