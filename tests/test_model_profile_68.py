"""Model-only: profile "6.8" reproduces the original guest_memfd design (spec section 8, E1).

No 6.8 kernel is available here, so these rules are checked on the model alone.
"""

from __future__ import annotations

import errno

import pytest

import guestmem
from guestmem.uapi import Cap, Falloc, MemFlag, VmType

P = 4096
SW = int(VmType.SW_PROTECTED)
GMEM = int(MemFlag.GUEST_MEMFD)
KEEP = int(Falloc.KEEP_SIZE)


def raises(err, fn, *args, **kwargs):
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value


@pytest.fixture
def sys68():
    with guestmem.open_system("model", profile="6.8") as s:
        yield s


def test_caps(sys68):
    dflt, sw = sys68.create_vm(0), sys68.create_vm(SW)
    assert sys68.check_extension(Cap.GUEST_MEMFD) == 1
    assert dflt.check_extension(Cap.GUEST_MEMFD) == 0 and sw.check_extension(Cap.GUEST_MEMFD) == 1
    for cap in (Cap.GUEST_MEMFD_FLAGS, Cap.PRE_FAULT_MEMORY):
        assert sys68.check_extension(cap) == 0 and sw.check_extension(cap) == 0
    assert sw.check_extension(Cap.MULTI_ADDRESS_SPACE) == 2  # E1: always 2
    assert sw.check_extension(Cap.MEMORY_ATTRIBUTES) == 8


@pytest.mark.parametrize("bit", range(64))
def test_every_create_flag_is_einval(sys68, bit):
    raises(errno.EINVAL, sys68.create_vm(SW).create_guest_memfd, P, 1 << bit)


def test_mmap_is_always_enodev(sys68):
    g = sys68.create_vm(0).create_guest_memfd(P)
    raises(errno.ENODEV, g.mmap)


def test_default_vm_cannot_bind_but_sw_vm_can(sys68):
    vm = sys68.create_vm(0)
    g = vm.create_guest_memfd(2 * P)  # creating works on any VM type
    raises(errno.EINVAL, vm.set_user_memory_region2, 0, GMEM, 0, P, 0, g, 0)
    sw = sys68.create_vm(SW)
    g2 = sw.create_guest_memfd(2 * P)
    sw.set_user_memory_region2(0, GMEM, 0, P, 0, g2, 0)
    sw.set_user_memory_region2(1 << 16 | 1, 0, 0, P)  # SW VMs keep two address spaces in E1
    assert not sw._slot_for_gfn(0).gmem_only


@pytest.mark.parametrize("mode, err", [
    (Falloc.COLLAPSE_RANGE | KEEP, errno.EINVAL),        # 6.11+: EOPNOTSUPP
    (Falloc.INSERT_RANGE | KEEP, errno.EINVAL),
    (Falloc.UNSHARE_RANGE | Falloc.ZERO_RANGE, errno.EINVAL),
    (Falloc.PUNCH_HOLE | Falloc.ZERO_RANGE | KEEP, errno.EOPNOTSUPP),
    (Falloc.WRITE_ZEROES, errno.EOPNOTSUPP),             # unknown to the 6.8 VFS
    (Falloc.NO_HIDE_STALE | KEEP, errno.EOPNOTSUPP),     # passes the VFS, gmem refuses
    (Falloc.PUNCH_HOLE, errno.EOPNOTSUPP),
    (0, errno.EOPNOTSUPP),
    # each 6.8 rule alone: what passes the VFS meets guest_memfd's KEEP_SIZE/PUNCH_HOLE rule
    (Falloc.COLLAPSE_RANGE, errno.EOPNOTSUPP), (Falloc.INSERT_RANGE, errno.EOPNOTSUPP),
    (Falloc.UNSHARE_RANGE | KEEP, errno.EOPNOTSUPP),
    (Falloc.COLLAPSE_RANGE | Falloc.PUNCH_HOLE | KEEP, errno.EINVAL),  # collapse only alone
    # and their order: PUNCH|ZERO exclusive, then PUNCH needs KEEP, then collapse/insert/unshare
    (Falloc.UNSHARE_RANGE | Falloc.ZERO_RANGE | Falloc.PUNCH_HOLE | KEEP, errno.EOPNOTSUPP),
    (Falloc.PUNCH_HOLE | Falloc.COLLAPSE_RANGE, errno.EOPNOTSUPP),
])
def test_fallocate_uses_68_vfs_errnos(sys68, mode, err):
    g = sys68.create_vm(SW).create_guest_memfd(4 * P)
    raises(err, g.fallocate, int(mode), 0, P)


def test_allocate_and_punch_work(sys68):
    g = sys68.create_vm(SW).create_guest_memfd(4 * P)
    g.allocate(0, 4 * P)
    g.punch_hole(0, 1 << 30)
    raises(errno.EINVAL, g.allocate, 0, 8 * P)
