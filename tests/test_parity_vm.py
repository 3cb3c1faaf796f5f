"""kvm-ioctls parity, VM side, on both backends: the memslot/attribute shadow (``memslots``,
``get_memory_attributes``, ``stats``), KVM_IRQ_LINE, KVM_IRQFD and KVM_IOEVENTFD with real
eventfds, KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG, KVM_GET_STATS_FD, KVM_GET_EMULATED_CPUID.
Expected errnos are the kernel's (virt/kvm/eventfd.c, kvm_main.c), measured on this host."""

from __future__ import annotations

import ctypes
import errno
import resource
import mmap
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestmem import guest
from guestmem.types import CpuidEntry, IoExit, MemoryRegion
from guestmem.uapi import (Cap, GuestMemfdFlag, IoeventfdFlag, IrqfdFlag, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                           MemFlag, StatsType)

P = 4096
LOG = int(MemFlag.LOG_DIRTY_PAGES)

# An fd number that cannot be open in this process (above its RLIMIT_NOFILE): a fixed small number
# such as 999 is open once earlier tests have used that many fds.
CLOSED_FD = resource.getrlimit(resource.RLIMIT_NOFILE)[0] + 64


def _errno(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args, **kwargs)
    return exc.value.errno


class Ram:
    """Anonymous shared memory for a memslot (writer for guest.load)."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def write(self, offset: int, data: bytes) -> None:
        self.map[offset:offset + len(data)] = data

    def __len__(self) -> int:
        return len(self.map)


@pytest.fixture
def vm(system):
    with system.create_vm() as vm_:
        yield vm_


def real_mode(vm, code: str, ram_size: int = 16 * P, flags: int = 0):
    """Slot 0 = [0, ram_size) of anonymous memory holding ``code`` at 0x1000; vCPU 0 at it."""
    ram = Ram(ram_size)
    vm.set_user_memory_region(0, flags, 0, ram_size, ram.address)
    image = guest.real_mode_guest(code)
    guest.load(image, {0: ram})
    vcpu = vm.create_vcpu(0)
    guest.setup_vcpu(vcpu, image)
    return vcpu, ram


# --- the shadow -------------------------------------------------------------------------------------


def test_memslots_remember_successful_calls_only(vm) -> None:
    a, b = Ram(4 * P), Ram(2 * P)
    assert vm.memslots() == []
    vm.set_user_memory_region(3, 0, 0x10000, 4 * P, a.address)
    vm.set_user_memory_region2(1, LOG, 0x20000, 2 * P, b.address)
    assert _errno(vm.set_user_memory_region, 2, 0, 0x10000 + P, P, b.address) == errno.EEXIST
    assert _errno(vm.set_user_memory_region, 5, 0, 0, 0, 0) == errno.EINVAL  # deleting an empty slot
    assert vm.memslots() == [
        MemoryRegion(slot=1, flags=LOG, guest_phys_addr=0x20000, memory_size=2 * P, userspace_addr=b.address),
        MemoryRegion(slot=3, flags=0, guest_phys_addr=0x10000, memory_size=4 * P, userspace_addr=a.address),
    ]
    vm.set_user_memory_region(3, LOG, 0x40000, 4 * P, a.address)  # move and start logging
    vm.set_user_memory_region2(1, 0, 0, 0)  # delete
    (only,) = vm.memslots()
    assert (only.slot, only.flags, only.guest_phys_addr, only.base_gfn, only.npages) == (3, LOG, 0x40000, 0x40, 4)
    with pytest.raises(Exception):
        only.flags = 0  # a frozen snapshot


def test_memslots_of_a_guest_memfd_slot(vm) -> None:
    gmem = vm.create_guest_memfd(4 * P, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    view = gmem.mmap()
    vm.set_user_memory_region2(7, MemFlag.GUEST_MEMFD, 0x100000, 2 * P, view.address, guest_memfd=gmem,
                               guest_memfd_offset=2 * P)
    (r,) = vm.memslots()
    assert r.is_gmem and r.guest_memfd == gmem.fileno() and r.guest_memfd_offset == 2 * P and r.pgoff == 2
    assert r.gmem_only  # a GUEST_MEMFD_FLAG_MMAP file serves the slot's shared faults (6.18)
    vm.set_user_memory_region2(7, 0, 0, 0)
    view.close()
    gmem.close()


def test_memslots_name_the_address_space_in_the_slot_field(vm) -> None:
    """The slot field carries the address space in its upper 16 bits (api.rst 4.35). With two
    (KVM_CAP_MULTI_ADDRESS_SPACE = 2, SMM) a slot of as_id 1 may overlap as_id 0's GPAs and is
    listed as (1 << 16) | id; with one, as_id 1 is EINVAL and nothing is added."""
    ram = Ram(2 * P)
    vm.set_user_memory_region(2, 0, 0x10000, 2 * P, ram.address)
    smm = (1 << 16) | 2
    if vm.check_extension(Cap.MULTI_ADDRESS_SPACE) < 2:
        assert _errno(vm.set_user_memory_region, smm, 0, 0x10000, 2 * P, ram.address) == errno.EINVAL
        assert [r.slot for r in vm.memslots()] == [2]
        return
    vm.set_user_memory_region(smm, 0, 0x10000, 2 * P, ram.address)
    assert [(r.slot, r.guest_phys_addr) for r in vm.memslots()] == [(2, 0x10000), (smm, 0x10000)]


def test_model_memslots_report_fd_0_once_the_file_is_closed(model_system) -> None:
    """Model side of ``Vm.memslots()`` (its docstring): a bound file whose fd is closed, while a
    mapping keeps the file alive, is reported as guest_memfd 0; kvm reports the fd the call passed."""
    vm = model_system.create_vm()
    gmem = vm.create_guest_memfd(2 * P, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    view = gmem.mmap()
    vm.set_user_memory_region2(3, MemFlag.GUEST_MEMFD, 0, 2 * P, view.address, guest_memfd=gmem)
    assert vm.memslots()[0].guest_memfd == gmem.fileno()
    gmem.close()
    (r,) = vm.memslots()
    assert r.guest_memfd == 0 and r.is_gmem
    view.close()
    vm.close()


def test_memory_attributes_shadow_or_enotty(system, vm) -> None:
    if not system.check_extension(Cap.MEMORY_ATTRIBUTES):  # this host, and the model's 6.18-host profile
        assert _errno(vm.get_memory_attributes, 0, P) == errno.ENOTTY
        return
    assert vm.get_memory_attributes(0, 2 * P) == [(0, 2 * P, 0)]
    assert _errno(vm.get_memory_attributes, 1, P) == errno.EINVAL
    assert _errno(vm.get_memory_attributes, 0, 0) == errno.EINVAL


def test_stats_count_the_same_things_on_both_backends(vm) -> None:
    ram = Ram(8 * P)
    gmem = vm.create_guest_memfd(4 * P)
    vm.set_user_memory_region(0, 0, 0, 8 * P, ram.address)
    vm.set_user_memory_region(1, 0, 0x100000, 2 * P, ram.address)
    st = vm.stats()
    assert (st["memslots"], st["memslot_pages"], st["attribute_ranges"], st["guest_memfds"]) == (2, 10, 0, 1)
    vm.set_user_memory_region(1, 0, 0, 0)
    gmem.close()
    st = vm.stats()
    assert (st["memslots"], st["memslot_pages"], st["guest_memfds"]) == (1, 8, 0)


def test_a_mapping_keeps_its_guest_memfd_counted_after_close(vm) -> None:
    """The file lives while a mapping holds it (the kernel's reference through the VMA), so
    ``guest_memfds`` counts it until the mapping goes too, on both backends."""
    gmem = vm.create_guest_memfd(4 * P, int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED))
    m = gmem.mmap()
    gmem.close()
    assert vm.stats()["guest_memfds"] == 1
    m.close()
    assert vm.stats()["guest_memfds"] == 0


@pytest.mark.parametrize("cap", [Cap.MANUAL_DIRTY_LOG_PROTECT2, Cap.EXIT_HYPERCALL, Cap.DISABLE_QUIRKS2])
def test_enable_cap_with_flags_is_einval(vm, cap) -> None:
    """kvm_vm_ioctl_enable_cap (x86) refuses any flags before it looks at the cap, and the
    generic caps check them too: EINVAL, and the cap stays disabled."""
    assert _errno(vm.enable_cap, cap, 0, flags=1) == errno.EINVAL
    assert _errno(vm.enable_cap, cap, 0, flags=1 << 31) == errno.EINVAL


def test_set_nr_mmu_pages_minimum_is_64(vm) -> None:
    """KVM_MIN_ALLOC_MMU_PAGES is 64: one less is EINVAL; the argument is an unsigned long
    (-1 is 2**64 - 1, a valid count), and a value no u64 holds is refused before the ioctl."""
    assert _errno(vm.set_nr_mmu_pages, 63) == errno.EINVAL
    vm.set_nr_mmu_pages(64)
    vm.set_nr_mmu_pages(-1)
    assert _errno(vm.set_nr_mmu_pages, 1 << 64) == errno.EINVAL


def test_disable_quirks2_takes_only_the_quirks_it_reports(vm) -> None:
    """KVM_CAP_DISABLE_QUIRKS2 (x86 kvm_vm_ioctl_enable_cap): args[0] outside the cap's value
    is EINVAL; any subset of it is accepted."""
    valid = vm.check_extension(Cap.DISABLE_QUIRKS2)
    if not valid:
        pytest.skip("KVM_CAP_DISABLE_QUIRKS2 is 0 on this VM")
    outside = ~valid & ((1 << 64) - 1)
    assert _errno(vm.enable_cap, Cap.DISABLE_QUIRKS2, outside & -outside) == errno.EINVAL  # its lowest bit
    assert _errno(vm.enable_cap, Cap.DISABLE_QUIRKS2, 1 << 63) == errno.EINVAL
    vm.enable_cap(Cap.DISABLE_QUIRKS2, valid & -valid)
    vm.enable_cap(Cap.DISABLE_QUIRKS2, valid)


def test_model_vm_error_messages_name_the_rule() -> None:
    """guestmem.errors: after the strerror the model's message names what was refused (the
    kvm side can only repeat its arguments)."""
    import guestmem

    def message(fn, *args, **kwargs) -> str:
        with pytest.raises(OSError) as exc:
            fn(*args, **kwargs)
        return str(exc.value).split(": ", 1)[1].lower()

    with guestmem.open_system("model", profile="6.18-host") as system:
        vm = system.create_vm()
        assert "flags" in message(vm.enable_cap, Cap.EXIT_HYPERCALL, 0, flags=1)
        assert "kvm_set_user_memory_region flags" in message(vm.set_user_memory_region, 0, MemFlag.GUEST_MEMFD, 0, P)
        assert "nr_mmu_pages" in message(vm.set_nr_mmu_pages, 63)
        assert "memory attributes" in message(vm.get_memory_attributes, 0, P)
        with pytest.raises(OSError) as exc:
            vm.set_memory_attributes(0, P, 0)
        assert re.search(r"\bKVM_SET_MEMORY_ATTRIBUTES\b", str(exc.value)), exc.value  # the ioctl, as spelled
        vm.create_irqchip()
        assert re.search(r"\birqchip\b", message(vm.create_irqchip))
        vcpu = vm.create_vcpu(3)
        assert "vcpu_id 3" in message(vm.create_vcpu, 3)
        vcpu.close()
        gmem = vm.create_guest_memfd(2 * P)
        vm.set_user_memory_region2(5, MemFlag.GUEST_MEMFD, 0, 2 * P, guest_memfd=gmem)
        assert "slot 5" in message(vm.set_user_memory_region2, 5, MemFlag.GUEST_MEMFD, 4 * P, 2 * P,
                                   guest_memfd=gmem)  # a move: gmem slots are immutable
        gmem.close()
        vm.close()
        assert "closed" in message(vm.fileno)
        assert "closed" in message(vm.memslots)
        vm2 = system.create_vm()
        vcpu = vm2.create_vcpu(0)
        with pytest.raises(OSError) as exc:
            vm2.create_irqchip()
        assert re.search(r"\bKVM_CREATE_VCPU\b", str(exc.value)), exc.value  # the ioctl, by its uapi name
        vcpu.close()
        vm2.close()


# --- interrupts and eventfds -------------------------------------------------------------------------


def test_irq_line_needs_an_irqchip(vm) -> None:
    assert _errno(vm.irq_line, 4, 1) == errno.ENXIO
    vm.create_irqchip()
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    with pytest.raises(TypeError):
        vm.irq_line("4", 1)


def test_irqfd_rules(vm) -> None:
    efd, other = os.eventfd(0), os.eventfd(0)
    try:
        assert _errno(vm.irqfd, efd, 4) == errno.EINVAL  # no irqchip
        vm.irqfd(efd, 4, flags=IrqfdFlag.DEASSIGN)  # deassigning nothing succeeds
        vm.create_irqchip()
        assert _errno(vm.irqfd, efd, 4, flags=4) == errno.EINVAL
        vm.irqfd(efd, 4)
        assert _errno(vm.irqfd, efd, 5) == errno.EBUSY  # one irqfd per eventfd
        assert _errno(vm.irqfd, CLOSED_FD, 4) == errno.EBADF
        assert _errno(vm.irqfd, vm.fileno(), 4) == errno.EINVAL  # not an eventfd
        assert _errno(vm.irqfd, other, 6, flags=IrqfdFlag.RESAMPLE, resamplefd=vm.fileno()) == errno.EINVAL
        vm.irqfd(efd, 4, flags=IrqfdFlag.DEASSIGN)
        vm.irqfd(efd, 5)  # free again
    finally:
        os.close(efd)
        os.close(other)


def test_ioeventfd_rules(vm) -> None:
    efd, other = os.eventfd(0), os.eventfd(0)
    try:
        vm.ioeventfd(efd, 0x1000, 4)  # no irqchip needed
        assert _errno(vm.ioeventfd, other, 0x1000, 4) == errno.EEXIST
        assert _errno(vm.ioeventfd, other, 0x1000, 4, datamatch=7, flags=IoeventfdFlag.DATAMATCH) == errno.EEXIST
        vm.ioeventfd(other, 0x1000, 4, flags=IoeventfdFlag.PIO)  # another bus
        for length in (3, 16):
            assert _errno(vm.ioeventfd, other, 0x2000, length) == errno.EINVAL
        assert _errno(vm.ioeventfd, other, 0x3000, 0, flags=IoeventfdFlag.DATAMATCH) == errno.EINVAL
        assert _errno(vm.ioeventfd, other, (1 << 64) - 2, 4) == errno.EINVAL  # wraps
        assert _errno(vm.ioeventfd, other, 0x4000, 4, flags=1 << 5) == errno.EINVAL
        assert _errno(vm.ioeventfd, CLOSED_FD, 0x4000, 4) == errno.EBADF
        assert _errno(vm.ioeventfd, vm.fileno(), 0x4000, 4) == errno.EINVAL
        assert _errno(vm.ioeventfd, other, 0x1000, 4, flags=IoeventfdFlag.DEASSIGN) == errno.ENOENT
        vm.ioeventfd(efd, 0x1000, 4, flags=IoeventfdFlag.DEASSIGN)
        assert _errno(vm.ioeventfd, efd, 0x1000, 4, flags=IoeventfdFlag.DEASSIGN) == errno.ENOENT
    finally:
        os.close(efd)
        os.close(other)


def test_ioeventfd_takes_the_guest_write_instead_of_an_exit(vm) -> None:
    """OUT 0x70 with a matching ioeventfd signals it and the guest goes on; a non-matching
    datamatch leaves the write an exit."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(efd, 0x70, 1, datamatch=0x5A, flags=IoeventfdFlag.PIO | IoeventfdFlag.DATAMATCH)
        vcpu, _ = real_mode(vm, "mov al, 0x5a\nout 0x70, al\nmov al, 0x11\nout 0x70, al\nout 0x71, al")
        ex = vcpu.run()
        assert isinstance(ex, IoExit) and (ex.port, ex.data) == (0x70, b"\x11")
        assert os.eventfd_read(efd) == 1
        ex = vcpu.run()
        assert isinstance(ex, IoExit) and ex.port == 0x71
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        vcpu.close()
    finally:
        os.close(efd)


# --- dirty log ---------------------------------------------------------------------------------------


WRITER = "mov byte ptr [0x3000], 1\nmov byte ptr [0x5000], 2\nmov byte ptr [0x6000], 3\nout 0x80, al\nmov byte ptr [0x6004], 4\n"


def test_dirty_log_reports_the_pages_the_guest_wrote(vm) -> None:
    vcpu, ram = real_mode(vm, WRITER, flags=LOG)
    ex = vcpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x80
    log = vm.get_dirty_log(0)
    # Code fetches and the host's own writes are not logged; the guest's stores are.
    assert log.ranges() == ((3, 4), (5, 7)) and log.pages() == 3 and log.npages == 16
    assert vm.get_dirty_log(0).ranges() == ()  # reading the log cleared it
    ex = vcpu.run()  # writes page 6 again: it was write-protected again
    assert vm.get_dirty_log(0).ranges() == ((6, 7),)
    assert ram.map[0x6004] == 4
    vcpu.close()


def test_logging_toggled_on_a_live_slot(vm) -> None:
    """LOG_DIRTY_PAGES switched on by a flags-only change logs the writes that follow (pages
    the guest already mapped writable included); switched off, writes go through again."""
    code = "mov byte ptr [0x3000], 1\nout 0x80, al\nmov byte ptr [0x3001], 2\nmov byte ptr [0x4000], 3\n" \
           "mov al, byte ptr [0x5000]\nout 0x81, al\nmov byte ptr [0x3002], 4\nmov byte ptr [0x5000], 5\n"
    vcpu, ram = real_mode(vm, code)
    assert vcpu.run().port == 0x80
    vm.set_user_memory_region(0, LOG, 0, 16 * P, ram.address)
    assert vcpu.run().port == 0x81
    assert vm.get_dirty_log(0).ranges() == ((3, 5),)
    vm.set_user_memory_region(0, 0, 0, 16 * P, ram.address)
    assert _errno(vm.get_dirty_log, 0) == errno.ENOENT
    ex = vcpu.run()
    assert isinstance(ex, IoExit) and ram.map[0x3000:0x3003] == bytes([1, 2, 4]) and ram.map[0x5000] == 5
    vcpu.close()


def test_dirty_log_errors(vm) -> None:
    ram = Ram(4 * P)
    assert _errno(vm.get_dirty_log, 0) == errno.ENOENT  # no slot
    vm.set_user_memory_region(0, 0, 0, 4 * P, ram.address)
    assert _errno(vm.get_dirty_log, 0) == errno.ENOENT  # no LOG_DIRTY_PAGES
    assert _errno(vm.get_dirty_log, 32764) == errno.EINVAL
    assert _errno(vm.get_dirty_log, 0x7FFF << 16) == errno.EINVAL
    vm.set_user_memory_region(0, LOG, 0, 4 * P, ram.address)  # logging starts with a clean log
    assert vm.get_dirty_log(0).ranges() == ()
    assert _errno(vm.clear_dirty_log, 0, 1, 3) == errno.EINVAL  # first_page not a multiple of 64
    assert _errno(vm.clear_dirty_log, 0, 0, 5) == errno.EINVAL  # beyond the slot
    vm.clear_dirty_log(0, 0, 4)


def test_manual_protect_keeps_the_log_until_cleared(system, vm) -> None:
    vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    assert _errno(vm.enable_cap, Cap.MANUAL_DIRTY_LOG_PROTECT2, 1 << 2) == errno.EINVAL
    vcpu, _ = real_mode(vm, WRITER, flags=LOG)
    vcpu.run()
    assert vm.get_dirty_log(0).ranges() == ((3, 4), (5, 7))
    assert vm.get_dirty_log(0).ranges() == ((3, 4), (5, 7))  # not cleared by reading
    vm.clear_dirty_log(0, 0, 16, bytes([0b00100000, 0]))  # page 5 only
    assert vm.get_dirty_log(0).ranges() == ((3, 4), (6, 7))
    vcpu.close()


def test_dirty_ring_where_the_host_has_it(system) -> None:
    """KVM_CAP_DIRTY_LOG_RING (this host: up to 1 MiB; the model: 0, no ring). With a ring
    the bitmap interface is off (ENXIO), entries name (slot, page), and only harvested
    entries are reset."""
    with system.create_vm() as vm:
        if not vm.check_extension(Cap.DIRTY_LOG_RING):
            assert _errno(vm.enable_cap, Cap.DIRTY_LOG_RING, 4096) == errno.EINVAL
            assert _errno(vm.reset_dirty_rings) == errno.EINVAL
            vcpu = vm.create_vcpu(0)
            assert _errno(vcpu.collect_dirty_ring) == errno.EINVAL
            vcpu.close()
            return
        assert _errno(vm.enable_cap, Cap.DIRTY_LOG_RING, 100) == errno.EINVAL  # not a power of two
        vm.enable_cap(Cap.DIRTY_LOG_RING, 4096)
        vcpu, _ = real_mode(vm, WRITER, flags=LOG)
        assert vcpu.collect_dirty_ring() == ()
        vcpu.run()
        assert [(g.slot, g.offset) for g in vcpu.collect_dirty_ring()] == [(0, 3), (0, 5), (0, 6)]
        assert vcpu.collect_dirty_ring() == ()
        assert _errno(vm.get_dirty_log, 0) == errno.ENXIO
        assert vm.reset_dirty_rings() == 3
        vcpu.run()  # page 6 again: logged again once reset
        assert [(g.slot, g.offset) for g in vcpu.collect_dirty_ring()] == [(0, 6)]
        vcpu.close()


# --- stats and emulated CPUID ------------------------------------------------------------------------


def test_stats_fds_of_vm_and_vcpu(vm) -> None:
    with vm.get_stats_fd() as sfd:
        st = sfd.read()
    assert st.id.startswith("kvm-") and st.descriptors
    assert len(st.values) == len(st.descriptors)
    assert all(len(v) == d.size and d.type <= StatsType.LOG_HIST for d, v in zip(st.descriptors, st.values))
    assert st[st.descriptors[0].name] is not None
    with pytest.raises(KeyError):
        st["no such stat"]
    vcpu = vm.create_vcpu(0)
    sfd = vcpu.get_stats_fd()
    assert sfd.read().id.endswith("/vcpu-0")
    sfd.close()
    assert _errno(sfd.read) == errno.EBADF
    vcpu.close()


def test_kvm_stats_fd_counts_exits(kvm_system) -> None:
    """kvm only: the kernel's vCPU statistics count the guest's exits (the generic ``exits``;
    kvm_pvm leaves ``io_exits`` at 0, measured)."""
    with kvm_system.create_vm() as vm:
        vcpu, _ = real_mode(vm, "out 0x80, al\nout 0x80, al")
        sfd = vcpu.get_stats_fd()
        before = sfd.read()["exits"]
        vcpu.run()
        vcpu.run()
        assert sfd.read()["exits"] - before >= 2
        sfd.close()
        vcpu.close()


def test_emulated_cpuid(system) -> None:
    entries = system.get_emulated_cpuid()
    assert isinstance(entries, tuple) and all(isinstance(e, CpuidEntry) for e in entries)


CLOSED_CALLS = {  # stats() is introspection and works on a closed VM on both backends
    "memslots": (), "get_memory_attributes": (0, P), "irq_line": (0, 1), "irqfd": (0, 0),
    "ioeventfd": (0, 0x1000, 4), "get_dirty_log": (0,), "clear_dirty_log": (0, 0, 64), "get_stats_fd": (),
    "reset_dirty_rings": (),
}


@pytest.mark.parametrize("method", sorted(CLOSED_CALLS))
def test_closed_vm_methods_fail_with_ebadf(system, method) -> None:
    vm = system.create_vm()
    vm.close()
    assert _errno(getattr(vm, method), *CLOSED_CALLS[method]) == errno.EBADF


@given(st.binary(max_size=64), st.integers(0, 600))
def test_bitmap_runs_match_a_bit_by_bit_reference(bitmap, nbits):
    """The dirty-log run finder (shared by DirtyLog.ranges and the model's log) against a per-bit scan."""
    from guestmem.types import bitmap_runs

    bits = [i < nbits and i < 8 * len(bitmap) and bool(bitmap[i // 8] >> (i % 8) & 1) for i in range(nbits + 1)]
    expect, start = [], None
    for i, bit in enumerate(bits):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            expect.append((start, i))
            start = None
    assert bitmap_runs(bitmap, nbits) == expect
