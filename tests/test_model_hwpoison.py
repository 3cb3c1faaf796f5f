"""hwpoison on guest_memfd pages (spec 3.2, 5.2 step 5.2, 6.5) on the model with real x86 guest code.

Model-only: memory errors cannot be injected into this host's guest_memfd
(``GuestMemfd.inject_hwpoison`` is a model extension). A poisoned page stays in the file;
the guest's next access is a KVM_EXIT_MEMORY_FAULT with errno EHWPOISON (repeated until the
host acts, since the access is not retired), a host mapping of the page SIGBUSes (probed in
a forked child, ``probe.py``), and punching the page heals it: a fresh zero page for guest
and host.
"""

from __future__ import annotations

import errno

import pytest

import probe
from model_guests import GMEM, PAGE, PRIVATE, SW, Machine

from guestmem import hostmem
from guestmem.guest import PORT_SYNC
from guestmem.types import IoExit, MemoryFaultExit
from guestmem.uapi import Errno, GuestMemfdFlag

GPA = 0xC000_0000
MARK0, MARK1 = 0x0101_0101_0101_0101, 0x1111_1111_1111_1111

# Write a mark to pages 0 and 1, sync; then read page 1 and page 0 and report both.
GUEST = "\n".join([
    f"mov r8, {GPA:#x}", f"mov r9, {GPA + PAGE:#x}",
    f"mov rax, {MARK0:#x}", "mov [r8], rax", f"mov rax, {MARK1:#x}", "mov [r9], rax",
    f"mov eax, 1\nout {PORT_SYNC}, eax",
    "mov rsi, [r9]", "mov rdi, [r8]",
    f"mov eax, 2\nout {PORT_SYNC}, eax",
])


def sync(v, step: int):
    ex = v.run()
    assert ex == IoExit(1, 4, PORT_SYNC, 1, step.to_bytes(4, "little")), ex
    return v.get_regs()


def poisoned(gpa: int, private: bool) -> MemoryFaultExit:
    return MemoryFaultExit(flags=8 if private else 0, gpa=gpa, size=PAGE, errno=Errno.EHWPOISON)


def test_private_page_hwpoison_exits_ehwpoison_until_punched_then_reads_zero(model_system):
    m = Machine(model_system, SW)
    gmem = m.vm.create_guest_memfd(2 * PAGE)
    m.add_slot(10, GPA, 2 * PAGE, gmem)
    m.vm.set_memory_attributes(GPA, 2 * PAGE, PRIVATE)
    v, = m.load(GUEST, identity_map=[(GPA, 2 * PAGE)])
    sync(v, 1)
    gmem.inject_hwpoison(PAGE)  # page 1; the guest has it mapped: the poison invalidates it
    assert v.run() == poisoned(GPA + PAGE, private=True)
    assert v.run() == poisoned(GPA + PAGE, private=True)  # the access is not retired
    gmem.punch_hole(PAGE, PAGE)
    r = sync(v, 2)
    assert (r.rsi, r.rdi) == (0, MARK0)  # a fresh zero page; page 0 untouched
    m.close()
    gmem.close()


def test_poison_before_first_touch_exits_on_first_write_and_spares_the_neighbour(model_system):
    """Poison is per page of the file: a neighbour of a poisoned page still works for the guest."""
    m = Machine(model_system, SW)
    gmem = m.vm.create_guest_memfd(2 * PAGE)
    m.add_slot(10, GPA, 2 * PAGE, gmem)
    m.vm.set_memory_attributes(GPA, 2 * PAGE, PRIVATE)
    v, = m.load(GUEST, identity_map=[(GPA, 2 * PAGE)])
    gmem.inject_hwpoison(0)  # before the guest ever touched page 0
    assert v.run() == poisoned(GPA, private=True)  # the first write to page 0
    gmem.punch_hole(0, PAGE)
    sync(v, 1)
    r = sync(v, 2)
    assert (r.rsi, r.rdi) == (MARK1, MARK0)
    m.close()
    gmem.close()


def test_shared_gmem_page_hwpoison_sigbus_on_host_and_ehwpoison_in_guest(model_system):
    """Default VM, gmem MMAP|INIT_SHARED bound GMEM_ONLY: guest and host share the pages."""
    m = Machine(model_system, 0, hypercalls=False)
    flags = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
    gmem = m.vm.create_guest_memfd(2 * PAGE, flags)
    host = gmem.mmap()
    m.vm.set_user_memory_region2(10, GMEM, GPA, 2 * PAGE, host.address, gmem, 0)
    v, = m.load(GUEST, identity_map=[(GPA, 2 * PAGE)])
    sync(v, 1)
    assert host.read(PAGE, 8) == MARK1.to_bytes(8, "little")  # in-place shared memory
    gmem.inject_hwpoison(PAGE)
    assert probe.touch(host, PAGE) == "SIGBUS"
    assert probe.touch(host, PAGE, value=0x42) == "SIGBUS"
    assert probe.touch(host, 0) == MARK0 & 0xFF  # the neighbour still reads
    assert v.run() == poisoned(GPA + PAGE, private=False)
    gmem.punch_hole(PAGE, PAGE)
    assert probe.touch(host, PAGE) == 0  # healed: a fresh zero page for the host ...
    r = sync(v, 2)
    assert (r.rsi, r.rdi) == (0, MARK0)  # ... and for the guest
    host.close()
    m.close()
    gmem.close()


def test_inject_hwpoison_rejects_unaligned_and_out_of_file_offsets(model_system):
    vm = model_system.create_vm(SW)
    gmem = vm.create_guest_memfd(PAGE)
    for bad in (1, PAGE, -PAGE):
        with pytest.raises(OSError) as exc:
            gmem.inject_hwpoison(bad)
        assert exc.value.errno == errno.EINVAL
    gmem.close()
    with pytest.raises(OSError) as exc:
        gmem.inject_hwpoison(0)
    assert exc.value.errno == errno.EBADF
    vm.close()


def test_hwpoison_in_a_mapping_at_a_file_offset(model_system):
    """A host mapping of the file from page 2 SIGBUSes exactly at the poisoned file page 3,
    whether it existed before the poison or was made after; a punch recovers it (spec 6.5)."""
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(4 * PAGE, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    before = g.mmap(2 * PAGE, 2 * PAGE)
    before.fill(0, 2 * PAGE, 0x44)
    g.inject_hwpoison(3 * PAGE)
    after = g.mmap(2 * PAGE, 2 * PAGE)
    for m in (before, after):
        assert probe.touch(m, PAGE) == "SIGBUS"
        assert probe.touch(m, 0) == 0x44
    g.punch_hole(3 * PAGE, PAGE)
    for m in (before, after):
        assert probe.touch(m, PAGE) == 0
        m.close()
    g.close()
    vm.close()


def test_healing_one_poisoned_page_keeps_its_poisoned_neighbour_sigbus(model_system):
    """Punching poisoned page 1 heals page 1 only: page 2, poisoned too and not punched, still
    SIGBUSes in a mapping that existed before either error (each page is its own folio)."""
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(4 * PAGE, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    m = g.mmap()
    m.fill(0, 4 * PAGE, 0x55)
    g.inject_hwpoison(PAGE)
    g.inject_hwpoison(2 * PAGE)
    g.punch_hole(PAGE, PAGE)
    assert [probe.touch(m, i * PAGE) for i in range(4)] == [0x55, 0, "SIGBUS", 0x55]
    m.close()
    g.close()
    vm.close()


def test_poison_reaches_the_mappings_left_after_one_is_unmapped(model_system):
    """Every live mapping of the file shows each new error, however many others were unmapped
    before: after m1's munmap, pages 0 and then 1 are poisoned, and m2 SIGBUSes at both."""
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(4 * PAGE, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    m1, m2 = g.mmap(), g.mmap()
    m1.close()
    g.inject_hwpoison(0)
    g.inject_hwpoison(PAGE)
    assert [probe.touch(m2, i * PAGE) for i in range(3)] == ["SIGBUS", "SIGBUS", 0]
    m2.close()
    g.close()
    vm.close()


def test_mapping_past_the_end_of_a_poisoned_file(model_system):
    """mmap beyond EOF is allowed (touching it SIGBUSes), also for a file with a poisoned page."""
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(4 * PAGE, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    g.inject_hwpoison(0)
    m = g.mmap(PAGE, 4 * PAGE)
    assert probe.touch(m, 0) == "SIGBUS"
    m.close()
    g.close()
    vm.close()


def test_punching_a_poisoned_page_of_a_private_only_file_keeps_host_mappings_sigbus(model_system):
    """Without INIT_SHARED no page is host-visible (spec 3.3): recovering a poisoned page by a
    punch does not make it appear in an existing mapping."""
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(2 * PAGE, GuestMemfdFlag.MMAP)
    m = g.mmap()
    g.inject_hwpoison(0)
    assert probe.touch(m, 0) == "SIGBUS"
    g.punch_hole(0, PAGE)
    assert probe.touch(m, 0) == "SIGBUS" and probe.touch(m, PAGE) == "SIGBUS"
    m.close()
    g.close()
    vm.close()


@pytest.mark.parametrize("err, reported", [(errno.ENOSPC, errno.ENOMEM), (errno.EMFILE, errno.ENOMEM),
                                           (errno.EINTR, errno.EINTR)])
def test_allocation_failure_is_reported_as_the_kernel_would(model_system, monkeypatch, err, reported):
    """Fault injection on the model's backing store: running out of it is ENOMEM (the only
    allocation failure guest_memfd reports besides EINTR, spec 2.2), and nothing is allocated."""
    from guestmem import hostmem

    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(2 * PAGE)

    def fail(*args):
        raise OSError(err, "injected")
    monkeypatch.setattr(hostmem, "fallocate_encoded", fail)
    with pytest.raises(OSError) as info:
        g.allocate(0, PAGE)
    assert info.value.errno == reported
    assert vm.stats()["gmem"]["pages_allocated"] == 0
    monkeypatch.undo()
    g.allocate(0, 2 * PAGE)
    assert vm.stats()["gmem"]["pages_allocated"] == 2
    g.close()
    vm.close()


def test_poison_past_a_mapping_leaves_the_memory_after_it_alone(model_system):
    """A memory error in a file page that a mapping does not cover changes nothing outside that
    mapping: under a one-page mapping of page 0, poisoning page 1 and then page 0 leaves the
    process's memory right after the mapping as it was (it must not become the file's SIGBUS
    page, nor fail), while the mapping itself SIGBUSes at page 0."""
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(2 * PAGE, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    tries = []
    for _ in range(16):  # the kernel places mappings top down: m usually lands right below `after`
        after = hostmem.map_anonymous(PAGE)
        m = g.mmap(PAGE, 0)
        if m.address + m.length == after.address:
            break
        tries += [after, m]  # keep them, so the next pair lands elsewhere
    else:
        pytest.fail("no mapping of the file was placed right below an anonymous page in 16 tries")
    for t in tries:
        t.close()
    after.fill(0, PAGE, 0x66)
    m.fill(0, PAGE, 0x55)
    g.inject_hwpoison(PAGE)
    assert (probe.touch(m, 0), probe.touch(after, 0)) == (0x55, 0x66)
    g.inject_hwpoison(0)
    assert (probe.touch(m, 0), probe.touch(after, 0)) == ("SIGBUS", 0x66)
    after.close()
    m.close()
    g.close()
    vm.close()
