"""Model-only: the model's fd table resolves fds like fdget() + an f_op check (spec 2.3 step 17).

Model objects own real descriptors, so their numbers never collide with real files; the
tie-breaks (EBADF for an fd not open at all, EINVAL for an open file of the wrong kind)
are checked explicitly.
"""

from __future__ import annotations

import errno
import os

import pytest

from guestmem.model import GuestMemfd, fdtable
from guestmem.uapi import MemFlag

P = 4096
GMEM = int(MemFlag.GUEST_MEMFD)


def raises(err, fn, *args, **kwargs):
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value


@pytest.fixture
def vm(model_system):
    vm = model_system.create_vm(0)
    yield vm
    vm.close()


def bind(vm, fd, slot=0):
    vm.set_user_memory_region2(slot, GMEM, 0, P, 0, fd, 0)


def test_fd_numbers_are_real_and_distinct(model_system, vm):
    g = vm.create_guest_memfd(P)
    fds = {model_system.fileno(), vm.fileno(), g.fileno()}
    assert len(fds) == 3
    for fd in fds:
        os.fstat(fd)  # really open in the process
    assert fdtable.lookup(g.fileno()) is g


def test_gmem_fd_is_inheritable_vm_fd_is_not(vm):
    g = vm.create_guest_memfd(P)
    assert os.get_inheritable(g.fileno()) and not os.get_inheritable(vm.fileno())


@pytest.mark.parametrize("fd", [999_999, -1, 0xFFFF_FFFF, 1 << 31])
def test_fd_not_open_is_ebadf(vm, fd):
    raises(errno.EBADF, bind, vm, fd)


def test_closed_gmem_fd_is_ebadf(vm):
    g = vm.create_guest_memfd(P)
    fd = g.fileno()
    g.close()
    raises(errno.EBADF, bind, vm, fd)
    raises(errno.EBADF, bind, vm, g)  # the closed object itself


def test_vm_and_system_fds_are_einval(model_system, vm):
    raises(errno.EINVAL, bind, vm, vm.fileno())
    raises(errno.EINVAL, bind, vm, model_system.fileno())


def test_real_memfd_is_einval(vm):
    fd = os.memfd_create("not-gmem")
    try:
        raises(errno.EINVAL, bind, vm, fd)
    finally:
        os.close(fd)


def test_ebadf_wins_over_bind_offset_error(vm):
    """fd validity is checked before the offset fits the file; offset alignment before both."""
    raises(errno.EBADF, vm.set_user_memory_region2, 0, GMEM, 0, P, 0, 999_999, 1 << 40)
    raises(errno.EINVAL, vm.set_user_memory_region2, 0, GMEM, 0, P, 0, 999_999, 1)


def test_other_vms_gmem_is_einval_then_binds_at_home(model_system, vm):
    other = model_system.create_vm(0)
    g = other.create_guest_memfd(P)
    raises(errno.EINVAL, bind, vm, g)
    bind(other, g)
    assert isinstance(fdtable.lookup(g.fileno()), GuestMemfd)


def test_close_removes_entry_before_number_reuse(vm):
    g = vm.create_guest_memfd(P)
    fd = g.fileno()
    g.close()
    assert fdtable.lookup(fd) is None
