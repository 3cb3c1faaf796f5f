"""In-place shared<->private conversion through the guest_memfd (spec 13.2, profile "next").

No released kernel has KVM_SET_MEMORY_ATTRIBUTES2, so the rules run on the model's "next"
profile; on this host's kernel (and the model's 6.18 profiles) the ioctl must be ENOTTY, which
runs on both backends. What the series' own selftest (guest_memfd_conversions_test) checks is
restated here in our words: files start private (or shared with INIT_SHARED), a conversion
touches exactly the pages asked for, it works before any page exists, punching keeps the
attributes, a referenced page refuses to become private (EAGAIN + error_offset), host touches
of private pages SIGBUS and of shared pages do not, and data survives both directions.
"""

from __future__ import annotations

import ctypes
import errno
import gc

import pytest

import guestmem
from guestmem import uapi
from guestmem.uapi import Cap, GuestMemfdFlag, MemFlag, VmType

from probe import touch

P = 4096
M2, G1, T1 = 2 << 20, 1 << 30, 1 << 40
PRIVATE = 8
SW = int(VmType.SW_PROTECTED)
GMEM = int(MemFlag.GUEST_MEMFD)
MMAP = int(GuestMemfdFlag.MMAP)
INIT_SHARED = int(GuestMemfdFlag.INIT_SHARED)


def raises(err, fn, *args, **kwargs):
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    return info.value


@pytest.fixture
def nxt():
    with guestmem.open_system("model", profile="next") as s:
        yield s


@pytest.fixture
def sw_vm(nxt):
    vm = nxt.create_vm(SW)
    yield vm
    vm.close()


# --- uAPI -------------------------------------------------------------------------------------

def test_kvm_memory_attributes2_layout_is_pinned():
    s = uapi.kvm_memory_attributes2
    assert ctypes.sizeof(s) == 128
    assert [getattr(s, f).offset for f in ("offset", "address", "size", "attributes", "flags",
                                           "error_offset", "reserved")] == [0, 0, 8, 16, 24, 32, 40]
    assert s.reserved.size == 88 and s.error_offset.size == 8
    assert uapi.KVM_SET_MEMORY_ATTRIBUTES2 == 0xC080AED2
    assert Cap.GUEST_MEMFD_MEMORY_ATTRIBUTES == 250


# --- availability ---------------------------------------------------------------------------------

def test_set_memory_attributes2_is_enotty_without_in_place_conversion(system):
    """This host's kernel (6.18) and the model's default profile have no such ioctl."""
    vm = system.create_vm(0)
    gmem = vm.create_guest_memfd(4 * P, MMAP)
    err = raises(errno.ENOTTY, gmem.set_memory_attributes, 0, P, PRIVATE)
    raises(errno.ENOTTY, gmem.set_memory_attributes, 1, 0, 0xFF, 1)  # before any argument check
    assert getattr(err, "error_offset", 0) == 0
    assert system.check_extension(Cap.GUEST_MEMFD_MEMORY_ATTRIBUTES) == 0
    gmem.close()
    raises(errno.EBADF, gmem.set_memory_attributes, 0, P, PRIVATE)
    vm.close()


def test_caps_move_from_vm_to_guest_memfd(nxt):
    dflt, sw = nxt.create_vm(0), nxt.create_vm(SW)
    assert nxt.check_extension(Cap.MEMORY_ATTRIBUTES) == 0
    assert sw.check_extension(Cap.MEMORY_ATTRIBUTES) == 0 and dflt.check_extension(Cap.MEMORY_ATTRIBUTES) == 0
    assert nxt.check_extension(Cap.GUEST_MEMFD_MEMORY_ATTRIBUTES) == PRIVATE
    assert sw.check_extension(Cap.GUEST_MEMFD_MEMORY_ATTRIBUTES) == PRIVATE
    assert dflt.check_extension(Cap.GUEST_MEMFD_MEMORY_ATTRIBUTES) == 0
    assert sw.check_extension(Cap.GUEST_MEMFD_FLAGS) & (MMAP | INIT_SHARED) == MMAP | INIT_SHARED
    raises(errno.EINVAL, sw.set_memory_attributes, 0, P, PRIVATE)  # VM-level PRIVATE is gone
    sw.set_memory_attributes(0, P, 0)


def test_cap_number_is_a_profile_field():
    with guestmem.open_system("model", profile="next", gmem_attributes_cap=246) as s:
        assert s.check_extension(246) == PRIVATE and s.check_extension(250) == 0
    with guestmem.open_system("model", profile="next", gmem_in_place_conversion=False) as s:
        assert s.check_extension(250) == 0 and s.check_extension(Cap.MEMORY_ATTRIBUTES) == PRIVATE
        raises(errno.ENOTTY, s.create_vm(SW).create_guest_memfd(P).set_memory_attributes, 0, P, 0)


def test_every_binding_is_gmem_only(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P)  # not even GUEST_MEMFD_FLAG_MMAP
    sw_vm.set_user_memory_region2(1, GMEM, 0, 4 * P, 0, gmem, 0)
    assert all(s.gmem_only for s in sw_vm.memslots())


# --- argument checks, in order -----------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs", [
    ((0, P, PRIVATE, 1), {}),                        # flags
    ((0, P, PRIVATE), {"reserved": [0] * 10 + [1]}),  # a reserved word
    ((0, P, PRIVATE | 1), {}),                       # an attribute besides PRIVATE
    ((0, 0, PRIVATE), {}),                           # size 0
    ((P, (1 << 64) - P, PRIVATE), {}),               # offset + size wraps
    ((1, P, PRIVATE), {}),                           # misaligned offset
    ((0, P + 1, PRIVATE), {}),                       # misaligned size
    ((4 * P, P, PRIVATE), {}),                       # past the end of the file
])
def test_invalid_arguments_are_einval_and_change_nothing(sw_vm, args, kwargs):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    before = sw_vm._snapshot()
    raises(errno.EINVAL, gmem.set_memory_attributes, *args, **kwargs)
    assert sw_vm._snapshot() == before


def test_vm_without_private_memory_is_einval_before_attribute_checks(nxt):
    vm = nxt.create_vm(0)
    gmem = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    raises(errno.EINVAL, gmem.set_memory_attributes, 0, P, 0)
    raises(errno.EINVAL, gmem.set_memory_attributes, 0, 0, 0xFF)


def test_flags_are_checked_before_the_vm_type(nxt):
    """Both are EINVAL; the message tells which rule fired, and flags come first."""
    gmem = nxt.create_vm(0).create_guest_memfd(P)
    assert "flags" in str(raises(errno.EINVAL, gmem.set_memory_attributes, 0, P, PRIVATE, 1))


# --- initial state, indexing and precision --------------------------------------------------------------

def test_init_private_file_sigbuses_on_host_touch(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP)
    st = gmem.stats()
    assert (st["pages_private"], st["pages_shared"], st["attribute_ranges"]) == (4, 0, 0)
    m = gmem.mmap()
    assert [touch(m, i * P) for i in range(4)] == ["SIGBUS"] * 4


def test_init_shared_file_is_host_accessible(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    assert gmem.stats()["pages_shared"] == 4
    m = gmem.mmap()
    m.write(3 * P, b"shared")
    assert m.read(3 * P, 6) == b"shared"
    gmem.set_memory_attributes(3 * P, P, PRIVATE)
    assert touch(m, 3 * P) == "SIGBUS" and touch(m, 2 * P, 7) == 7


@pytest.mark.parametrize("page", [0, 1, 7, 15])
def test_conversion_changes_exactly_the_pages_asked_for(sw_vm, page):
    gmem = sw_vm.create_guest_memfd(16 * P, MMAP)
    m = gmem.mmap()
    gmem.set_memory_attributes(page * P, P, 0)
    seen = [touch(m, i * P, 0x5A) for i in range(16)]
    assert seen == [0x5A if i == page else "SIGBUS" for i in range(16)]
    gmem.set_memory_attributes(0, 16 * P, 0)
    gmem.set_memory_attributes(page * P, P, PRIVATE)
    seen = [touch(m, i * P) for i in range(16)]
    assert seen == ["SIGBUS" if i == page else 0 for i in range(16)]


def test_range_edges_are_exact_in_a_mapping_at_an_offset(sw_vm):
    gmem = sw_vm.create_guest_memfd(8 * P, MMAP)
    m = gmem.mmap(4 * P, offset=2 * P)  # file pages 2..5
    gmem.set_memory_attributes(3 * P, 2 * P, 0)  # file pages 3 and 4
    assert [touch(m, i * P) for i in range(4)] == ["SIGBUS", 0, 0, "SIGBUS"]


def test_no_op_conversion_invalidates_nothing(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP)
    sw_vm.set_user_memory_region2(1, GMEM, 0, 4 * P, 0, gmem, 0)
    n = sw_vm.stats()["invalidations"]
    gmem.set_memory_attributes(0, 4 * P, PRIVATE)
    assert sw_vm.stats()["invalidations"] == n
    gmem.set_memory_attributes(P, P, 0)
    assert sw_vm.stats()["invalidations"] == n + 1


def test_conversion_before_allocation_then_host_write_allocates(sw_vm):
    gmem = sw_vm.create_guest_memfd(8 * P, MMAP)
    gmem.set_memory_attributes(0, 8 * P, 0)
    assert gmem.stats()["pages_allocated"] == 0
    m = gmem.mmap()
    m.write(5 * P, b"x")
    assert gmem.stats()["pages_allocated"] == 1


def test_data_survives_shared_private_shared(sw_vm):
    """In place: converting does not zero or move the page (the selftest's A->B->C values)."""
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = gmem.mmap()
    m.write(P, b"kept")
    gmem.set_memory_attributes(P, P, PRIVATE)
    assert touch(m, P) == "SIGBUS"
    gmem.set_memory_attributes(P, P, 0)
    assert m.read(P, 4) == b"kept"


def test_punch_hole_keeps_attributes_and_frees_data(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP)
    gmem.set_memory_attributes(P, 2 * P, 0)
    m = gmem.mmap()
    m.write(P, b"data")
    gmem.punch_hole(0, 4 * P)
    st = gmem.stats()
    assert (st["pages_shared"], st["pages_allocated"]) == (2, 0)
    assert m.read(P, 4) == b"\0" * 4
    assert touch(m, 0) == "SIGBUS" and touch(m, 3 * P) == "SIGBUS"


def test_mappings_made_after_a_conversion_follow_the_file(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP)
    gmem.set_memory_attributes(2 * P, P, 0)
    m = gmem.mmap()
    assert [touch(m, i * P) for i in range(4)] == ["SIGBUS", "SIGBUS", 0, "SIGBUS"]


# --- references: EAGAIN with error_offset ------------------------------------------------------------------

def test_pinned_page_refuses_private_with_error_offset(sw_vm):
    gmem = sw_vm.create_guest_memfd(16 * P, MMAP | INIT_SHARED)
    m = gmem.mmap()
    m.write(9 * P, b"dma")
    pin = gmem.pin(9 * P, 2 * P)
    before = sw_vm._snapshot()
    err = raises(errno.EAGAIN, gmem.set_memory_attributes, 4 * P, 8 * P, PRIVATE)
    assert isinstance(err, BlockingIOError) and err.error_offset == 9 * P
    assert sw_vm._snapshot() == before and gmem.stats()["pages_shared"] == 16
    assert m.read(9 * P, 3) == b"dma" and touch(m, 4 * P) == 0  # still mapped and shared
    gmem.set_memory_attributes(0, 9 * P, PRIVATE)  # pages before the pin are free to go
    err = raises(errno.EAGAIN, gmem.set_memory_attributes, 0, 16 * P, PRIVATE)
    assert err.error_offset == 9 * P
    pin.release()
    pin.release()  # idempotent
    gmem.set_memory_attributes(0, 16 * P, PRIVATE)
    assert gmem.stats()["pages_private"] == 16


def test_error_offset_is_the_first_busy_page_of_several_pins(sw_vm):
    gmem = sw_vm.create_guest_memfd(32 * P, MMAP | INIT_SHARED)
    with gmem.pin(20 * P, P), gmem.pin(12 * P, 4 * P):
        assert raises(errno.EAGAIN, gmem.set_memory_attributes, 14 * P, 10 * P, PRIVATE).error_offset == 14 * P
        assert raises(errno.EAGAIN, gmem.set_memory_attributes, 16 * P, 8 * P, PRIVATE).error_offset == 20 * P
    gmem.set_memory_attributes(0, 32 * P, PRIVATE)


def test_punching_a_pinned_4k_page_frees_it_from_the_file(sw_vm):
    """Only a HugeTLB folio must be unreferenced to be punched (it is merged first); a 4 KiB
    page is simply truncated out of the file while the pin keeps its own reference, so the
    punch succeeds and the file shows a fresh zero page there."""
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = gmem.mmap()
    m.write(P, b"dma")
    with gmem.pin(P, P):
        gmem.punch_hole(0, 2 * P)
        assert m.read(P, 3) == b"\0\0\0"
    m.close()


def test_vm_stats_sum_the_stats_of_its_open_files(sw_vm):
    """guestmem extension: ``Vm.stats()["gmem"]`` is the sum of ``GuestMemfd.stats()`` over the
    VM's files that are not released (folio counts summed per size)."""
    a = sw_vm.create_guest_memfd(8 * P, MMAP | INIT_SHARED)
    b = sw_vm.create_guest_memfd(4 * P, MMAP)
    a.allocate(0, 3 * P)
    a.set_memory_attributes(0, 2 * P, PRIVATE)
    b.allocate(P, P)
    pin = a.pin(4 * P, P)
    counters = ("pages_private", "pages_shared", "pages_allocated", "splits", "merges", "pins")

    def total(*files) -> dict:
        stats = [f.stats() for f in files]
        out = {k: sum(s[k] for s in stats) for k in counters}
        out["folios"] = {size: sum(s["folios"].get(size, 0) for s in stats)
                         for size in set().union(*(s["folios"] for s in stats))}
        return out

    want = total(a, b)
    assert sw_vm.stats()["gmem"] == want
    assert (want["pages_allocated"], want["pins"], want["pages_private"]) == (5, 1, 2 + 4)
    pin.release()
    b.close()
    assert sw_vm.stats()["gmem"] == total(a)
    a.close()


def test_conversion_to_shared_ignores_pins(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    with gmem.pin(0, P):
        gmem.set_memory_attributes(P, P, PRIVATE)
        gmem.set_memory_attributes(0, 4 * P, 0)


def test_pin_rules(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP)
    raises(errno.EFAULT, gmem.pin, 0, P)  # private pages cannot be reached by the host
    raises(errno.EINVAL, gmem.pin, 0, 0)
    raises(errno.EINVAL, gmem.pin, 1, P)
    raises(errno.EINVAL, gmem.pin, 3 * P, 2 * P)
    raises(errno.EFAULT, sw_vm.create_guest_memfd(P).pin, 0, P)  # no MMAP: no host mapping
    gmem.set_memory_attributes(0, 2 * P, 0)
    pin = gmem.pin(0, 2 * P)
    assert gmem.stats()["pages_allocated"] == 2 and gmem.stats()["pins"] == 1
    gmem.close()
    assert not gmem._released  # the pin holds the file, like the mapping it came through
    pin.release()
    assert gmem._released


def test_a_pin_dropped_unreleased_is_released_with_a_warning(sw_vm):
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    pin = gmem.pin(P, P)
    raises(errno.EAGAIN, gmem.set_memory_attributes, 0, 4 * P, PRIVATE)
    with pytest.warns(ResourceWarning, match="unreleased <GmemPin"):
        del pin
        gc.collect()
    assert gmem.stats()["pins"] == 0
    gmem.set_memory_attributes(0, 4 * P, PRIVATE)  # the page is free again
    gmem.close()
    assert gmem._released  # and the file's last reference went with it


# --- scale ------------------------------------------------------------------------------------------

def test_one_tib_file_with_many_mixed_ranges(sw_vm):
    gmem = sw_vm.create_guest_memfd(T1)
    n = 20_000
    for i in range(n):
        gmem.set_memory_attributes(i * 3 * M2, P, 0)
    st = gmem.stats()
    assert st["attribute_ranges"] == n and st["pages_shared"] == n
    gmem._state.check()
    gmem.set_memory_attributes(0, T1, PRIVATE)
    assert gmem.stats()["attribute_ranges"] == 0 and gmem.stats()["pages_private"] == T1 // P
    gmem.set_memory_attributes(0, T1, 0)
    assert gmem.stats()["pages_shared"] == T1 // P


# --- the guest's view -------------------------------------------------------------------------------

GUEST_GPA = 1 << 32


def _rmw_guest(system, gmem_flags: int, npages: int = 4):
    """A SW VM whose vCPU, on each run, reads the byte at RBX, writes CL there and reports the
    byte read on PORT_SYNC; the memory is one guest_memfd bound at 4 GiB (GMEM_ONLY)."""
    from model_guests import Machine

    from guestmem.guest import PORT_SYNC

    m = Machine(system, hypercalls=False)
    gmem = m.vm.create_guest_memfd(npages * P, gmem_flags)
    m.vm.set_user_memory_region2(1, GMEM, GUEST_GPA, npages * P, 0, gmem, 0)
    (v,) = m.load(f"rmw: mov al, byte ptr [rbx]\nmov byte ptr [rbx], cl\nout {PORT_SYNC}, al\njmp rmw",
                  identity_map=[(GUEST_GPA, npages * P)])

    def rmw(page: int, write: int) -> int:
        from guestmem.types import IoExit

        v.set_regs(v.get_regs().replace(rbx=GUEST_GPA + page * P, rcx=write))
        ex = v.run()
        assert isinstance(ex, IoExit) and ex.port == PORT_SYNC, ex
        return ex.data[0]

    return m, gmem, rmw


def test_guest_and_host_share_one_page_across_conversions(nxt):
    """The selftest's init-private flow: guest writes private, host cannot see it; shared: both
    see the same bytes; private again: the host SIGBUSes and the guest keeps the data."""
    m, gmem, rmw = _rmw_guest(nxt, MMAP)
    host = gmem.mmap()
    assert touch(host, 0, 0x41) == "SIGBUS"
    assert rmw(0, 0x41) == 0
    assert touch(host, 0) == "SIGBUS"
    gmem.set_memory_attributes(0, P, 0)
    assert host.read(0, 1) == b"\x41"
    host.write(0, b"\x42")
    assert rmw(0, 0x43) == 0x42
    assert host.read(0, 1) == b"\x43"
    gmem.set_memory_attributes(0, P, PRIVATE)
    assert touch(host, 0) == "SIGBUS"
    assert rmw(0, 0x45) == 0x43
    assert gmem.stats()["pages_allocated"] == 1
    m.close()


def test_guest_sees_init_shared_pages_written_by_the_host(nxt):
    m, gmem, rmw = _rmw_guest(nxt, MMAP | INIT_SHARED)
    host = gmem.mmap()
    host.write(2 * P, b"\x77")
    assert rmw(2, 0x78) == 0x77 and host.read(2 * P, 1) == b"\x78"
    m.close()


def test_write_population_fills_shared_pages_for_the_guest(nxt):
    m, gmem, rmw = _rmw_guest(nxt, 0)
    raises(errno.EPERM, gmem.pwrite, b"\x11" * P, 0)  # private
    gmem.set_memory_attributes(0, 2 * P, 0)
    assert gmem.pwrite(b"\x11" * P, P) == P
    raises(errno.EINVAL, gmem.pwrite, b"\x11", 0)            # not whole pages
    raises(errno.EINVAL, gmem.pwrite, b"\x11" * 2 * P, 3 * P)  # past the end of the file
    assert gmem.lseek(0, 0) == 0 and gmem.write(b"\x22" * P) == P and gmem.lseek(0, 1) == P
    assert rmw(1, 0) == 0x11 and rmw(0, 0) == 0x22
    m.close()


def test_write_population_starts_at_file_position_zero(nxt):
    """A new file's position is 0: the first write() fills page 0 and leaves the position after it."""
    gmem = nxt.create_vm(0).create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = gmem.mmap()
    assert gmem.write(b"\x5a" * P) == P and gmem.lseek(0, 1) == P
    raises(errno.EINVAL, gmem.lseek, -2 * P, 1)  # default_llseek: a negative position is EINVAL
    raises(errno.EINVAL, gmem.lseek, -5 * P, 2)
    assert gmem.lseek(0, 1) == P and gmem.lseek(-P, 2) == 3 * P
    assert gmem.write(b"\x6b" * P) == P and gmem.lseek(0, 1) == 4 * P  # each write advances it
    assert m.read(3 * P, P) == b"\x6b" * P
    assert m.read(0, P) == b"\x5a" * P and m.read(P, P) == b"\0" * P
    m.close()


def test_hugetlb_file_size_must_be_a_multiple_of_its_folios(nxt):
    """HugeTLB series: a guest_memfd of 2 MiB folios whose size is not a multiple of 2 MiB is
    EINVAL (the message names the folio size)."""
    p = guestmem.model.profile.PROFILES["next"]
    flags = p.gmem_hugetlb_flag | (21 << p.gmem_huge_shift)
    vm = nxt.create_vm(SW)
    err = raises(errno.EINVAL, vm.create_guest_memfd, M2 + P, flags)
    assert "0x200000" in str(err), err
    vm.create_guest_memfd(2 * M2, flags).close()
    vm.close()


def test_write_population_is_refused_before_the_series(system):
    gmem = system.create_vm(0).create_guest_memfd(P, MMAP | INIT_SHARED)
    raises(errno.EINVAL, gmem.write, b"\0" * P)
    raises(errno.ESPIPE, gmem.pwrite, b"\0" * P, 0)
    raises(errno.ESPIPE, gmem.lseek, 0, 0)


def test_tdx_like_fault_view_is_checked_against_the_file(nxt):
    """With the attributes in the file, a TDX-like access whose view disagrees with the bound
    file page exits (flags PRIVATE iff the access was private), and after the host converts
    the file the access sees the same page: converting moves no data."""
    from model_guests import Machine
    from test_model_tdx_like import GPA, GUEST, PRIVATE_VALUE, fault, sync

    from guestmem.model import GUESTMEM_TDX_LIKE_VM
    from guestmem.model.fault import TDX_SHARED_BIT

    m = Machine(nxt, GUESTMEM_TDX_LIKE_VM)
    gmem = m.vm.create_guest_memfd(P)  # private by default
    m.vm.set_user_memory_region2(10, GMEM, GPA, P, 0, gmem, 0)
    v, = m.load(GUEST, identity_map=[(GPA, P), (GPA | TDX_SHARED_BIT, P)])
    assert sync(v, 1) == 0                     # private read of a private page: no exit
    assert sync(v, 10) == PRIVATE_VALUE
    assert v.run() == fault(private=False)     # shared read, file says private
    gmem.set_memory_attributes(0, P, 0)
    assert sync(v, 2) == PRIVATE_VALUE         # in place: the shared view is the same page
    assert v.run() == fault(private=True)      # private read, file says shared
    gmem.set_memory_attributes(0, P, PRIVATE)
    assert sync(v, 3) == PRIVATE_VALUE
    m.close()


def test_hwpoison_and_punch_follow_the_file_attributes(sw_vm):
    """A poisoned shared page SIGBUSes; punching heals it back to a zero shared page, while a
    healed private page stays unreachable from the host."""
    gmem = sw_vm.create_guest_memfd(4 * P, MMAP)
    gmem.set_memory_attributes(0, 2 * P, 0)
    m = gmem.mmap()
    m.write(0, b"x")
    gmem.inject_hwpoison(0)
    gmem.inject_hwpoison(3 * P)
    assert touch(m, 0) == "SIGBUS" and touch(m, P) == 0
    gmem.punch_hole(0, 4 * P)
    assert touch(m, 0) == 0 and touch(m, 3 * P) == "SIGBUS"
    gmem.set_memory_attributes(3 * P, P, 0)
    assert touch(m, 3 * P) == 0


@pytest.mark.parametrize("profile, in_place", [("6.18", False), ("next", True)])
def test_rules_that_differ_by_profile(profile, in_place):
    """One field (gmem_in_place_conversion) decides each rule; the same calls on both profiles."""
    with guestmem.open_system("model", profile=profile) as s:
        sw = s.create_vm(SW)
        assert bool(sw.check_extension(Cap.GUEST_MEMFD_FLAGS) & INIT_SHARED) == in_place
        if in_place:
            sw.create_guest_memfd(P, MMAP | INIT_SHARED)
        else:
            raises(errno.EINVAL, sw.create_guest_memfd, P, MMAP | INIT_SHARED)
        gmem = sw.create_guest_memfd(4 * P)  # no MMAP
        sw.set_user_memory_region2(1, GMEM, 0, 4 * P, 0, gmem, 0)
        assert sw.memslots()[0].gmem_only == in_place
        assert (sw.check_extension(Cap.MEMORY_ATTRIBUTES) == PRIVATE) != in_place
        assert (sw.check_extension(Cap.GUEST_MEMFD_MEMORY_ATTRIBUTES) == PRIVATE) == in_place
        if in_place:
            raises(errno.EINVAL, sw.set_memory_attributes, 0, P, PRIVATE)
            gmem.set_memory_attributes(0, P, 0)
        else:
            sw.set_memory_attributes(0, P, PRIVATE)
            raises(errno.ENOTTY, gmem.set_memory_attributes, 0, P, 0)
