"""Lifetime rules of spec §3.5 and §11: who keeps whom alive.

- the guest_memfd file pins its VM: with the VM fd closed, fallocate and punch still work
  (private_mem_conversions_test PC-06);
- a mapping holds the file: data stays reachable after the gmem fd is closed;
- a memslot does not hold the file: closing the gmem leaves the slot, which still occupies
  its GPA range and can be deleted normally;
- pages belong to the file offset, not the slot: unbind/rebind shows the same bytes.
"""

from __future__ import annotations

import errno

import pytest

from guestmem.uapi import Cap, GuestMemfdFlag, MemFlag

P = 4096
M2 = 2 << 20
GPA = 0xC000_0000
G = int(MemFlag.GUEST_MEMFD)
SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)


def raises(err: int, fn, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    return info.value


def require_shared(vm) -> None:
    if vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & SHARED != SHARED:
        pytest.skip("guest_memfd MMAP|INIT_SHARED not supported for this VM")


def test_gmem_pins_vm_fallocate_after_vm_close(system):
    vm = system.create_vm()
    g = vm.create_guest_memfd(M2)
    g.allocate(0, M2)
    vm.close()
    g.punch_hole(0, M2)   # PC-06
    g.allocate(0, M2)
    assert g.fstat().st_size == M2
    g.close()


def test_gmem_with_bound_slot_outlives_vm_fd(system):
    vm = system.create_vm()
    require_shared(vm)
    g = vm.create_guest_memfd(M2, SHARED)
    m = g.mmap()
    m.fill(0, M2, 0x5A)
    vm.set_user_memory_region2(10, G, GPA, M2, m.address, g, 0)
    vm.close()
    g.punch_hole(0, P)  # still punches: the page reads as a fresh zero page
    assert m.read(0, P) == b"\0" * P and m.read(P, P) == b"\x5a" * P
    g.allocate(0, P)
    assert m.read(0, P) == b"\0" * P
    m.close()
    g.close()


def test_vm_outlives_system_close(system):
    vm = system.create_vm()
    system.close()
    g = vm.create_guest_memfd(M2)
    vm.set_user_memory_region2(10, G, GPA, M2, 0, g, 0)
    assert g.fstat().st_size == M2
    raises(errno.EEXIST, vm.set_user_memory_region2, 11, 0, GPA, P, 0)  # the slot is there
    vm.close()


def test_mapping_keeps_file_alive_after_fd_close(system):
    vm = system.create_vm()
    require_shared(vm)
    g = vm.create_guest_memfd(4 * P, SHARED)
    m = g.mmap()
    m.fill(0, 4 * P, 0x3C)
    g.close()
    vm.close()
    assert m.read(0, 4 * P) == b"\x3c" * (4 * P)
    m.fill(P, P, 0x11)
    assert m.read(P, P) == b"\x11" * P
    raises(errno.EBADF, g.fstat)
    m.close()


def test_closing_gmem_leaves_slot_that_can_be_deleted(system):
    vm = system.create_vm()
    g = vm.create_guest_memfd(M2)
    vm.set_user_memory_region2(10, G, GPA, M2, 0, g, 0)
    g.close()
    g2 = vm.create_guest_memfd(M2)
    # The slot is still there: its id is taken and its GPA range still overlaps.
    raises(errno.EINVAL, vm.set_user_memory_region2, 10, G, GPA, M2, 0, g2, 0)
    raises(errno.EEXIST, vm.set_user_memory_region2, 11, G, GPA, M2, 0, g2, 0)
    vm.set_user_memory_region2(10, G, 0, 0, 0, -1, 0)  # delete; unbind is a no-op
    vm.set_user_memory_region2(10, G, GPA, M2, 0, g2, 0)
    raises(errno.EEXIST, vm.set_user_memory_region2, 11, 0, GPA, P, 0)
    raises(errno.EINVAL, vm.set_user_memory_region2, 11, G, GPA + M2, P, 0, g2, 0)  # g2 is bound
    vm.close()


def test_pages_belong_to_file_offset_not_slot(system):
    vm = system.create_vm()
    require_shared(vm)
    g = vm.create_guest_memfd(M2, SHARED)
    m = g.mmap()
    m.fill(0, M2, 0x77)
    vm.set_user_memory_region2(10, G, GPA, M2, m.address, g, 0)
    vm.set_user_memory_region2(10, G, 0, 0, 0, -1, 0)
    vm.set_user_memory_region2(11, G, GPA + M2, P, m.address, g, M2 - P)
    assert m.read(0, M2) == b"\x77" * M2  # bind/unbind never frees or clears pages
    m.close()
    vm.close()


def test_deleting_slot_unbinds_file_range(system):
    vm = system.create_vm()
    g = vm.create_guest_memfd(M2)
    vm.set_user_memory_region2(10, G, GPA, M2, 0, g, 0)
    raises(errno.EINVAL, vm.set_user_memory_region2, 11, G, GPA + M2, M2, 0, g, 0)
    vm.set_user_memory_region2(10, 0, 0, 0, 0)
    vm.set_user_memory_region2(11, G, GPA + M2, M2, 0, g, 0)
    raises(errno.EINVAL, vm.set_user_memory_region2, 12, G, GPA + 2 * M2, P, 0, g, M2 - P)  # bound again
    raises(errno.EEXIST, vm.set_user_memory_region2, 12, 0, GPA + M2, P, 0)
    vm.close()
