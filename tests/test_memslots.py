"""Memslot rules: KVM_SET_USER_MEMORY_REGION{,2} with and without guest_memfd.

Spec §2.3 (check order), §7.4 (set_memory_region_test.c, SM-xx) and §11. Backend-neutral
through the ``system`` fixture, on a default VM: on 6.18 every VM type may bind a gmem.
Where two rules could both fire, a test pins which errno wins.
"""

from __future__ import annotations

import errno
import os

import pytest

from guestmem.uapi import KVM_USER_MEM_SLOTS, Cap, MemFlag

P = 4096
M2 = 2 << 20
M4 = 4 << 20
GPA = 0xC000_0000
SLOT = 10
G = int(MemFlag.GUEST_MEMFD)
LOG = int(MemFlag.LOG_DIRTY_PAGES)
RO = int(MemFlag.READONLY)


def raises(err: int, fn, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    return info.value


@pytest.fixture
def vm(system):
    vm = system.create_vm()
    if not vm.check_extension(Cap.GUEST_MEMFD):
        pytest.skip("KVM_CAP_GUEST_MEMFD is 0 for a default VM (kernel before 6.18)")
    yield vm
    vm.close()


def add_gmem(vm, gmem, slot=SLOT, gpa=GPA, size=M2, offset=0, flags=G, uaddr=0):
    vm.set_user_memory_region2(slot, flags, gpa, size, uaddr, gmem, offset)


def delete(vm, slot=SLOT):
    vm.set_user_memory_region2(slot, G, 0, 0, 0, -1, 0)


PROBE = 200                 # a slot id no test uses otherwise
FREE_GPA = 0x40_0000_0000   # a GPA no test maps


def gpa_taken(vm, gpa: int, size: int = P) -> bool:
    """Whether [gpa, gpa + size) overlaps a memslot: a probe slot there is EEXIST (spec 2.3 16)."""
    try:
        vm.set_user_memory_region2(PROBE, 0, gpa, size, 0)
    except FileExistsError:
        return True
    vm.set_user_memory_region2(PROBE, 0, 0, 0, 0)
    return False


def file_range_bound(vm, gmem, offset: int, size: int = P) -> bool:
    """Whether pages [offset, offset + size) of ``gmem`` are bound: binding them again at a free
    GPA is EINVAL (spec 2.3 17.5); the caller keeps the range inside the file."""
    try:
        add_gmem(vm, gmem, PROBE, FREE_GPA, size, offset)
    except OSError as exc:
        assert exc.errno == errno.EINVAL, exc
        return True
    delete(vm, PROBE)
    return False


# --- flags (SM-01..SM-03) ---------------------------------------------------------------------

def test_sm01_invalid_flags(system, vm):
    v2_ok = LOG | G | (RO if vm.check_extension(Cap.READONLY_MEM) else 0)
    for bit in range(32):
        flag = 1 << bit
        if flag & ~(LOG | RO):
            raises(errno.EINVAL, vm.set_user_memory_region, 0, flag, 0, M2, 0)
        if flag & ~v2_ok:
            raises(errno.EINVAL, vm.set_user_memory_region2, 0, flag, 0, M2, 0)
        elif flag != G:
            vm.set_user_memory_region2(0, flag, 0, M2, 0)
            vm.set_user_memory_region2(0, flag, 0, 0, 0)


def test_sm02_log_dirty_with_guest_memfd_is_einval(vm):
    g = vm.create_guest_memfd(M2)
    raises(errno.EINVAL, add_gmem, vm, g, flags=G | LOG)


def test_sm03_readonly_with_guest_memfd_is_einval(vm):
    g = vm.create_guest_memfd(M2)
    raises(errno.EINVAL, add_gmem, vm, g, flags=G | RO)


def test_v1_cannot_create_gmem_slot(vm):
    raises(errno.EINVAL, vm.set_user_memory_region, SLOT, G, GPA, M2, 0)


# --- bind (SM-04) -----------------------------------------------------------------------------

def test_sm04_bind_rejects_non_guest_memfd_files(system, vm):
    raises(errno.EINVAL, add_gmem, vm, system)          # /dev/kvm
    raises(errno.EINVAL, add_gmem, vm, vm)              # the VM fd
    fd = os.memfd_create("not-gmem", os.MFD_CLOEXEC)    # a regular memfd
    try:
        os.ftruncate(fd, M2)
        raises(errno.EINVAL, add_gmem, vm, fd)
    finally:
        os.close(fd)


def test_sm04_bind_rejects_other_vms_gmem(system, vm):
    vm2 = system.create_vm()
    g2 = vm2.create_guest_memfd(M2)
    raises(errno.EINVAL, add_gmem, vm, g2)
    assert not gpa_taken(vm, GPA, M2)
    add_gmem(vm2, g2)  # binds fine in its own VM
    assert gpa_taken(vm2, GPA, M2) and file_range_bound(vm2, g2, 0, M2)
    vm2.close()


@pytest.mark.parametrize("offset", [1, 2, 511, 2048, P - 1])
def test_sm04_unaligned_offset_is_einval(vm, offset):
    g = vm.create_guest_memfd(M4)
    raises(errno.EINVAL, add_gmem, vm, g, offset=offset)


def test_sm04_offset_zero_binds(vm):
    g = vm.create_guest_memfd(M2)
    add_gmem(vm, g)
    assert gpa_taken(vm, GPA, M2) and file_range_bound(vm, g, 0, M2)


def test_bind_closed_fd_is_ebadf(vm):
    g = vm.create_guest_memfd(M2)
    number = g.fileno()
    g.close()
    raises(errno.EBADF, add_gmem, vm, g)       # a closed GuestMemfd object
    raises(errno.EBADF, add_gmem, vm, number)  # its (now free) fd number
    raises(errno.EBADF, add_gmem, vm, -1)      # -1 → 0xFFFFFFFF


def test_unaligned_offset_checked_before_fd(vm):
    # Spec §2.3 step 8 precedes bind: an unaligned offset wins over a bad fd.
    raises(errno.EINVAL, add_gmem, vm, -1, offset=1)
    raises(errno.EINVAL, add_gmem, vm, -1, offset=(1 << 64) - P)  # offset+size wraps


@pytest.mark.parametrize("offset,size", [(M2, M2 + P), (M4, P), (0, M4 + P), (-P, P), (M4 - P, 2 * P)])
def test_bind_range_outside_file_is_einval(vm, offset, size):
    g = vm.create_guest_memfd(M4)
    raises(errno.EINVAL, add_gmem, vm, g, size=size, offset=offset)


def test_bind_offset_sum_wraps_in_loff_t(vm):
    """6.18 adds offset + size in loff_t: just below 2**63 the sum wraps negative and the
    end-of-file check passes, so a range far past the file binds (docs/kernel-findings.md).
    Profiles without the wrap: tests/test_profiles.py."""
    g = vm.create_guest_memfd(M2)
    add_gmem(vm, g, size=2 * P, offset=(1 << 63) - P)
    raises(errno.EINVAL, add_gmem, vm, g, SLOT + 1, GPA + M4, P, 1 << 63)  # offset itself negative
    raises(errno.EINVAL, add_gmem, vm, g, SLOT + 1, GPA + M4, P, (1 << 63) - P)  # no wrap: past EOF


def test_bind_exactly_to_end_of_file(vm):
    g = vm.create_guest_memfd(M4)
    add_gmem(vm, g, offset=M2, size=M2)
    assert file_range_bound(vm, g, M2) and file_range_bound(vm, g, M4 - P)
    assert not file_range_bound(vm, g, 0, M2)


def test_bound_file_range_edges(vm):
    """The file-range overlap rule (spec 2.3 17.5) is exact at both ends of a binding."""
    g = vm.create_guest_memfd(3 * M2)
    add_gmem(vm, g, offset=M2, size=M2)
    assert not file_range_bound(vm, g, M2 - P)
    assert file_range_bound(vm, g, M2 - P, 2 * P)
    assert file_range_bound(vm, g, M2)
    assert file_range_bound(vm, g, 2 * M2 - P)
    assert file_range_bound(vm, g, 2 * M2 - P, 2 * P)
    assert not file_range_bound(vm, g, 2 * M2)


def test_pads_are_never_checked(vm):
    g = vm.create_guest_memfd(M2)
    vm.set_user_memory_region2(SLOT, G, GPA, M2, 0, g, 0, pad1=0xFFFF_FFFF, pad2=[(1 << 64) - 1] * 14)
    assert gpa_taken(vm, GPA, M2) and file_range_bound(vm, g, 0, M2)


def test_pads_must_fit_their_fields(vm):
    """Never checked by the kernel, but a value the struct cannot hold is refused before the
    ioctl (EINVAL naming the field), and nothing is created."""
    g = vm.create_guest_memfd(M2)
    raises(errno.EINVAL, vm.set_user_memory_region2, SLOT, G, GPA, M2, 0, g, 0, pad2=[0] * 13 + [1 << 64])
    raises(errno.EINVAL, vm.set_user_memory_region2, SLOT, G, GPA, M2, 0, g, 0, pad1=1 << 32)
    assert not gpa_taken(vm, GPA, M2)


def test_gmem_slot_userspace_addr_still_checked(vm):
    g = vm.create_guest_memfd(M2)
    raises(errno.EINVAL, add_gmem, vm, g, uaddr=5)
    raises(errno.EINVAL, add_gmem, vm, g, uaddr=0x7FFF_FFFF_F000)  # [addr, addr+size) leaves user space


# --- overlap (SM-05, SM-06) -------------------------------------------------------------------

def test_sm05_gpa_overlap_is_eexist(vm):
    g = vm.create_guest_memfd(2 * M4)
    add_gmem(vm, g, SLOT, GPA, M4, 0)
    add_gmem(vm, g, SLOT + 1, 0x1_8000_0000, M4, M4)
    delete(vm, SLOT)
    raises(errno.EEXIST, add_gmem, vm, g, SLOT, 0x1_8000_0000 - M2, M4, 0)
    raises(errno.EEXIST, add_gmem, vm, g, SLOT, 0x1_8000_0000 + M2, M4, 0)
    assert not gpa_taken(vm, GPA, M4)  # the deleted slot's range is free again


def test_gpa_overlap_edges(vm):
    """The GPA overlap rule (spec 2.3 16) is exact at both ends: [start, end) half-open."""
    vm.set_user_memory_region2(1, 0, GPA, M2, 0)
    assert not gpa_taken(vm, GPA - P)
    assert gpa_taken(vm, GPA - P, 2 * P)
    assert gpa_taken(vm, GPA)
    assert gpa_taken(vm, GPA + M2 - P)
    assert gpa_taken(vm, GPA + M2 - P, 2 * P)
    assert not gpa_taken(vm, GPA + M2)
    assert gpa_taken(vm, GPA - P, M2 + 2 * P)  # a probe covering the slot


def test_sm06_file_range_overlap_is_einval(vm):
    g = vm.create_guest_memfd(2 * M4)
    add_gmem(vm, g, SLOT, GPA, M4, 0)
    raises(errno.EINVAL, add_gmem, vm, g, SLOT + 1, 0x1_8000_0000, M4, M2)
    raises(errno.EINVAL, add_gmem, vm, g, SLOT + 1, 0x1_8000_0000, P, M4 - P)
    add_gmem(vm, g, SLOT + 1, 0x1_8000_0000, M4, M4)  # the adjacent range binds
    assert gpa_taken(vm, 0x1_8000_0000, M4)


def test_gpa_overlap_wins_over_file_overlap_and_bad_fd(vm):
    g = vm.create_guest_memfd(2 * M4)
    add_gmem(vm, g, SLOT, GPA, M4, 0)
    raises(errno.EEXIST, add_gmem, vm, g, SLOT + 1, GPA + M2, M4, 0)  # both overlap: EEXIST
    raises(errno.EEXIST, add_gmem, vm, -1, SLOT + 1, GPA + M2, M4, 0)  # EEXIST before EBADF


def test_two_files_bind_same_offsets(vm):
    a, b = vm.create_guest_memfd(M2), vm.create_guest_memfd(M2)
    add_gmem(vm, a, SLOT, GPA, M2, 0)
    add_gmem(vm, b, SLOT + 1, GPA + M2, M2, 0)
    assert gpa_taken(vm, GPA) and gpa_taken(vm, GPA + M2)
    assert file_range_bound(vm, a, 0, M2) and file_range_bound(vm, b, 0, M2)


def test_gpa_overlap_with_plain_slot_is_eexist(vm):
    vm.set_user_memory_region2(1, 0, GPA, M2, 0)
    raises(errno.EEXIST, add_gmem, vm, vm.create_guest_memfd(M2), SLOT, GPA + M2 - P, M2)


# --- immutability -----------------------------------------------------------------------------

def test_identical_reset_of_gmem_slot_is_einval(vm):
    g = vm.create_guest_memfd(M2)
    add_gmem(vm, g)
    raises(errno.EINVAL, add_gmem, vm, g)


def test_gmem_slot_cannot_move_or_change(vm):
    g = vm.create_guest_memfd(M4)
    add_gmem(vm, g)
    raises(errno.EINVAL, add_gmem, vm, g, gpa=GPA + M4)                # move
    raises(errno.EINVAL, add_gmem, vm, g, size=M4)                     # resize


def test_clearing_guest_memfd_flag_is_einval(vm):
    # Dec 2025 fix (6.19-rc1, backported to stable 6.18.y): measured on this 6.18 host.
    g = vm.create_guest_memfd(M2)
    add_gmem(vm, g)
    raises(errno.EINVAL, vm.set_user_memory_region2, SLOT, 0, GPA, M2, 0)
    raises(errno.EINVAL, vm.set_user_memory_region, SLOT, 0, GPA, M2, 0)


def test_adding_guest_memfd_to_plain_slot_is_einval(vm):
    vm.set_user_memory_region2(1, 0, GPA, M2, 0)
    raises(errno.EINVAL, add_gmem, vm, vm.create_guest_memfd(M2), 1, GPA, M2)


def test_plain_slot_rules(vm):
    vm.set_user_memory_region2(1, 0, GPA, M2, 0)
    vm.set_user_memory_region2(1, 0, GPA, M2, 0)                        # identical: no-op
    vm.set_user_memory_region2(1, LOG, GPA, M2, 0)                      # flags only
    assert gpa_taken(vm, GPA, M2)
    vm.set_user_memory_region2(1, LOG, GPA + M4, M2, 0)                 # move
    assert not gpa_taken(vm, GPA, M2) and gpa_taken(vm, GPA + M4) and gpa_taken(vm, GPA + M4 + M2 - P)
    assert not gpa_taken(vm, GPA + M4 + M2)
    raises(errno.EINVAL, vm.set_user_memory_region2, 1, LOG, GPA + M4, M2, M2)   # new address
    raises(errno.EINVAL, vm.set_user_memory_region2, 1, LOG, GPA + M4, M4, 0)    # new size
    raises(errno.EINVAL, vm.set_user_memory_region2, 1, RO, GPA + M4, M2, 0)     # toggle READONLY


def test_move_onto_another_slot_is_eexist(vm):
    vm.set_user_memory_region2(1, 0, GPA, M2, 0)
    vm.set_user_memory_region2(2, 0, GPA + M4, M2, M2)
    raises(errno.EEXIST, vm.set_user_memory_region2, 1, 0, GPA + M4 + M2 - P, M2, 0)
    assert gpa_taken(vm, GPA) and not gpa_taken(vm, GPA + M4 + M2)  # nothing moved
    vm.set_user_memory_region2(1, 0, GPA + M4 + M2, M2, 0)  # right after slot 2: moves
    assert not gpa_taken(vm, GPA, M2) and gpa_taken(vm, GPA + M4 + M2)


def test_vm_reports_its_type(system):
    with system.create_vm(0) as vm:
        assert vm.type == 0


# --- delete -----------------------------------------------------------------------------------

def test_delete_ignores_fd_offset_and_gpa(vm):
    g = vm.create_guest_memfd(M2)
    add_gmem(vm, g)
    vm.set_user_memory_region2(SLOT, G, 0x1234_5000, 0, 0, 9999, P)
    assert not gpa_taken(vm, GPA, M2) and not file_range_bound(vm, g, 0, M2)  # slot and binding went
    add_gmem(vm, g)


def test_delete_still_checks_flags_and_alignment(vm):
    g = vm.create_guest_memfd(M2)
    add_gmem(vm, g)
    raises(errno.EINVAL, vm.set_user_memory_region2, SLOT, 1 << 5, 0, 0, 0)    # unknown flag
    raises(errno.EINVAL, vm.set_user_memory_region2, SLOT, G | RO, 0, 0, 0)     # flag rule
    raises(errno.EINVAL, vm.set_user_memory_region2, SLOT, G, 0, 0, 0, -1, 1)   # offset alignment
    raises(errno.EINVAL, vm.set_user_memory_region2, SLOT, 0, 0x123, 0, 0)      # gpa alignment
    assert gpa_taken(vm, GPA, M2)
    delete(vm)
    assert not gpa_taken(vm, GPA, M2)


def test_v1_deletes_gmem_slot(vm):
    add_gmem(vm, vm.create_guest_memfd(M2))
    vm.set_user_memory_region(SLOT, 0, 0, 0, 0)
    raises(errno.EINVAL, vm.set_user_memory_region, SLOT, 0, 0, 0, 0)  # now empty


def test_delete_empty_slot_is_einval(vm):
    raises(errno.EINVAL, vm.set_user_memory_region2, 3, 0, 0, 0, 0)
    raises(errno.EINVAL, delete, vm, 3)


# --- limits -----------------------------------------------------------------------------------

def test_slot_id_limit(system, vm):
    assert vm.check_extension(Cap.NR_MEMSLOTS) == KVM_USER_MEM_SLOTS
    raises(errno.EINVAL, vm.set_user_memory_region2, KVM_USER_MEM_SLOTS, 0, 0, P, 0)
    vm.set_user_memory_region2(KVM_USER_MEM_SLOTS - 1, 0, 0, P, 0)
    assert gpa_taken(vm, 0)


def test_address_space_limit(vm):
    # KVM_CAP_MULTI_ADDRESS_SPACE reads 0 (unknown cap) on a kernel without SMM, which has
    # one address space; the spec's x86 value 2 assumes SMM. Measured here: 0.
    spaces = max(1, vm.check_extension(Cap.MULTI_ADDRESS_SPACE))
    raises(errno.EINVAL, vm.set_user_memory_region2, (spaces << 16) | 1, 0, 0, P, 0)


@pytest.mark.parametrize("gpa,size,uaddr", [
    (0, 100, 0),                        # size unaligned
    (0, (1 << 64) - P, 0),              # size too large
    (100, P, 0),                        # gpa unaligned
    (0, P, 100),                        # userspace_addr unaligned
    (0, 2 * P, 0x7FFF_FFFF_E000),       # range leaves user space
    ((1 << 64) - P, 2 * P, 0),          # gpa+size wraps
    (0, (1 << 31) * P, 0),              # more than 2^31-1 pages
])
def test_region_argument_einval(vm, gpa, size, uaddr):
    raises(errno.EINVAL, vm.set_user_memory_region2, 1, 0, gpa, size, uaddr)


def test_last_user_page_is_a_valid_address(vm):
    vm.set_user_memory_region2(1, 0, 0, P, 0x7FFF_FFFF_E000)
    assert gpa_taken(vm, 0)


def test_kvm_values_wider_than_their_field_are_einval(kvm_system):
    """kvm wrapper rule: negative values wrap to the field width and reach the kernel, but a
    value no field of that width can hold is EINVAL before any ioctl. (The model currently
    truncates such values instead; this pins the kvm side until the two agree.)"""
    vm = kvm_system.create_vm()
    raises(errno.EINVAL, vm.create_guest_memfd, 1 << 64)
    raises(errno.EINVAL, vm.create_guest_memfd, P, 0, [0] * 7)
    raises(errno.EINVAL, vm.set_user_memory_region2, 1 << 32, 0, 0, P, 0)
    raises(errno.EINVAL, vm.set_user_memory_region2, 1, 0, 0, P, 0, 1 << 32)
    vm.set_user_memory_region2(1, 0, 0, P, 0)  # nothing was created by the rejected calls
    assert gpa_taken(vm, 0)
    vm.close()
