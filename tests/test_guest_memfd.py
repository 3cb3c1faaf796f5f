"""guest_memfd conformance: KVM_CREATE_GUEST_MEMFD and the syscalls on its fd.

Ported from tools/testing/selftests/kvm/guest_memfd_test.c (spec §7.1, GT-xx) plus the
rules of spec §2.1/§2.2. Backend-neutral: each test runs on every backend through the
``system`` fixture. Tests needing a flag the VM does not report skip with the reason.
Accesses expected to SIGBUS run in a forked child (tests/probe.py).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time

import pytest

import guestmem
from guestmem.hostmem import MAP_PRIVATE, MAP_SHARED, PROT_EXEC, PROT_READ, PROT_WRITE
from guestmem.uapi import TASK_SIZE_MAX, Cap, Falloc, GuestMemfdFlag as GF

from probe import fill, touch

P = 4096
MAP_GROWSDOWN = 0x0100
MAP_HUGETLB = 0x40000
MAP_SYNC = 0x80000
MMAP_MAX_LEN = TASK_SIZE_MAX - 0x10000  # get_unmapped_area: TASK_SIZE - mmap_min_addr (64 KiB)
MMAP, INIT_SHARED = int(GF.MMAP), int(GF.INIT_SHARED)
PUNCH = Falloc.PUNCH_HOLE | Falloc.KEEP_SIZE
KEEP = Falloc.KEEP_SIZE


@pytest.fixture
def vm(system):
    vm = system.create_vm()
    yield vm
    vm.close()


def supported_flags(vm) -> int:
    return vm.check_extension(Cap.GUEST_MEMFD_FLAGS)


def require(vm, flags: int) -> None:
    have = supported_flags(vm)
    if flags & ~have:
        pytest.skip(f"VM type {vm.type} lacks guest_memfd flags {flags:#x} (KVM_CAP_GUEST_MEMFD_FLAGS={have:#x})")


def raises(err: int, fn, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    return info.value


# Flag sets each GT test runs under (the selftest repeats GT-02..GT-16 per flag set).
FLAG_SETS = [0, MMAP, MMAP | INIT_SHARED]


@pytest.fixture(params=FLAG_SETS, ids=["flags0", "mmap", "mmap_init_shared"])
def flags(request, vm) -> int:
    require(vm, request.param)
    return request.param


def test_gt01_each_flag_bit_accepted_iff_reported(vm):
    have = supported_flags(vm)
    for bit in range(64):
        flag = 1 << bit
        if flag & have:
            vm.create_guest_memfd(P, flag).close()
        else:
            raises(errno.EINVAL, vm.create_guest_memfd, P, flag)


def test_host_reports_mmap_and_init_shared_for_default_vm(system):
    # 6.18 (E2): KVM_CAP_GUEST_MEMFD_FLAGS = MMAP|INIT_SHARED on /dev/kvm and on a default VM.
    if system.check_extension(Cap.GUEST_MEMFD_FLAGS) == 0:
        pytest.skip("kernel predates KVM_CAP_GUEST_MEMFD_FLAGS (6.18)")
    vm = system.create_vm(0)
    assert vm.check_extension(Cap.GUEST_MEMFD) == 1
    assert vm.check_extension(Cap.GUEST_MEMFD_FLAGS) == MMAP | INIT_SHARED
    vm.close()


def test_gt02_create_multiple(vm, flags):
    a = vm.create_guest_memfd(P, flags)
    b = vm.create_guest_memfd(2 * P, flags)
    sa, sb = a.fstat(), b.fstat()
    assert (sa.st_size, sb.st_size) == (P, 2 * P)
    assert a.fstat().st_size == P
    assert sa.st_ino != sb.st_ino
    assert (a.size, a.flags, b.size) == (P, flags, 2 * P)


def test_gt03_unaligned_sizes_are_einval(vm, flags):
    for size in (1, 2, 511, 512, P // 2, P - 1, P + 1, 3 * P - 7):
        raises(errno.EINVAL, vm.create_guest_memfd, size, flags)


@pytest.mark.parametrize("size", [0, -P, -1, 1 << 63, (1 << 64) - P])
def test_size_nonpositive_as_s64_is_einval(vm, size):
    raises(errno.EINVAL, vm.create_guest_memfd, size)


@pytest.mark.parametrize("size", [1 << 40, 1 << 62])
def test_huge_sizes_succeed_without_reserving_memory(vm, size):
    g = vm.create_guest_memfd(size)
    assert g.fstat().st_size == size


def test_reserved_words_are_never_checked(vm):
    g = vm.create_guest_memfd(P, 0, reserved=[0xFFFF_FFFF_FFFF_FFFF] * 6)
    assert g.fstat().st_size == P


def test_flag_check_precedes_size_check(vm, backend):
    """Spec 2.1: the flags rule runs before the size rule. Both are EINVAL and neither changes
    state, so on the kernel the order cannot be seen (docs/testing.md); the model's message
    names the rule that fired, which shows its order."""
    exc = raises(errno.EINVAL, vm.create_guest_memfd, 1, 1 << 63)
    if backend == "model":
        assert "flags" in str(exc) and "size" not in str(exc), exc
    raises(errno.EINVAL, vm.create_guest_memfd, P, 1 << 63)  # the flag alone
    exc = raises(errno.EINVAL, vm.create_guest_memfd, 1, 0)  # the size alone
    if backend == "model":
        assert "size" in str(exc), exc


def test_gt04_read_write_fail(vm, flags):
    g = vm.create_guest_memfd(4 * P, flags)
    raises(errno.EINVAL, g.read, 64)
    raises(errno.EINVAL, g.write, b"\0" * 64)
    raises(errno.ESPIPE, g.pread, 64, 0)
    raises(errno.ESPIPE, g.pwrite, b"\0" * 64, 0)
    raises(errno.ESPIPE, g.lseek, 0, 0)


@pytest.mark.parametrize("gflags", [0, MMAP | INIT_SHARED])
@pytest.mark.parametrize("prot, mflags, err", [
    (PROT_READ | PROT_WRITE, 0, errno.EINVAL), (PROT_READ | PROT_EXEC, 0, errno.EINVAL),
    (PROT_READ, 0xF, errno.EINVAL), (PROT_READ | PROT_EXEC, 0x4, errno.EINVAL),
    (PROT_READ | PROT_WRITE, 0x3 | 0x200000, errno.EOPNOTSUPP), (PROT_READ | PROT_EXEC, 0x3 | 0x200000, errno.EOPNOTSUPP),
])
def test_mmap_type_checked_before_noexec_and_mmap_method(vm, gflags, prot, mflags, err):
    """do_mmap checks MAP_TYPE (EINVAL) and, for MAP_SHARED_VALIDATE, unknown flags (EOPNOTSUPP)
    before the noexec mount (EPERM) and the file's mmap (ENODEV) (measured here)."""
    require(vm, gflags)
    g = vm.create_guest_memfd(4 * P, gflags)
    raises(err, g.mmap, P, 0, prot, mflags)


@pytest.mark.parametrize("offset", [-1, -P, -(1 << 63)])
def test_negative_pread_pwrite_offset_is_einval_before_espipe(vm, offset):
    """ksys_pread64/ksys_pwrite64 refuse pos < 0 before looking at the file (measured here)."""
    g = vm.create_guest_memfd(4 * P)
    raises(errno.EINVAL, g.pread, 64, offset)
    raises(errno.EINVAL, g.pwrite, b"\0" * 64, offset)


@pytest.mark.parametrize("whence, err", [(0, errno.ESPIPE), (3, errno.ESPIPE), (4, errno.ESPIPE),
                                         (5, errno.EINVAL), (7, errno.EINVAL), (-1, errno.EINVAL)])
@pytest.mark.parametrize("offset", [0, -1, 1 << 62])
def test_lseek_bad_whence_is_einval_before_espipe(vm, whence, err, offset):
    """ksys_lseek refuses whence > SEEK_HOLE (unsigned: -1 too) before the file's llseek,
    which is ESPIPE for any offset."""
    g = vm.create_guest_memfd(4 * P)
    raises(err, g.lseek, offset, whence)


def test_mprotect_exec_on_a_mapping(vm, backend):
    """guest_memfd's mount is noexec, so a mapping lacks VM_MAYEXEC: mprotect(PROT_EXEC) is
    EACCES on the kernel. Model deviation (README): its mapping is a memfd mapping, which the
    raw mprotect cannot be stopped from making executable."""
    import ctypes

    from guestmem import hostmem

    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = g.mmap(4 * P, 0, PROT_READ | PROT_WRITE, MAP_SHARED)
    libc = hostmem.libc
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    r = libc.mprotect(m.address, P, PROT_READ | PROT_EXEC)
    err = ctypes.get_errno()
    if backend == "model":
        assert r == 0, "the model's mapping became non-executable: update the README deviation"
    else:
        assert r == -1 and err == errno.EACCES, (r, err)
    m.close()


@pytest.mark.parametrize("length", [0, P, 4 * P, 8 * P, -1])
def test_truncate_is_einval(vm, length):
    g = vm.create_guest_memfd(4 * P)
    raises(errno.EINVAL, g.truncate, length)
    assert g.fstat().st_size == 4 * P


def test_repr_names_size_flags_and_fd(vm):
    """Both backends: a guest_memfd's repr shows its size, flags and fd (what a log needs)."""
    g = vm.create_guest_memfd(4 * P)
    text = repr(g)
    assert "size=0x4000" in text and "flags=0x0" in text and f"fd={g.fileno()}" in text, text
    g.close()


def test_gt05_mmap_supported(vm):
    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = g.mmap(4 * P, 0, PROT_READ | PROT_WRITE, MAP_SHARED)
    m.fill(0, 4 * P, 0xAA)
    assert m.read(0, 4 * P) == b"\xaa" * (4 * P)
    g.punch_hole(0, P)
    assert m.read(0, P) == b"\0" * P
    assert m.read(P, 3 * P) == b"\xaa" * (3 * P)
    m.fill(0, P, 0xAA)
    assert m.read(0, 4 * P) == b"\xaa" * (4 * P)
    m.close()


def test_gt06_fault_overflow_sigbus_past_eof(vm):
    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = g.mmap(16 * P)  # mapping past EOF is allowed
    assert fill(m, 0, 16 * P, 0xAA) == "SIGBUS"
    assert touch(m, 4 * P) == "SIGBUS"
    # The child wrote every in-file byte before faulting; the memory is shared.
    assert m.read(0, 4 * P) == b"\xaa" * (4 * P)
    m.close()


def test_gt09_fault_private_without_init_shared(vm):
    require(vm, MMAP)
    g = vm.create_guest_memfd(4 * P, MMAP)
    m = g.mmap(4 * P)
    assert fill(m, 0, 4 * P, 0xAA) == "SIGBUS"
    assert touch(m, 0) == "SIGBUS"
    m.close()


def test_gt10_mmap_private_is_einval(vm):
    for f in (MMAP, MMAP | INIT_SHARED):
        require(vm, f)
        g = vm.create_guest_memfd(4 * P, f)
        raises(errno.EINVAL, g.mmap, 4 * P, 0, PROT_READ | PROT_WRITE, MAP_PRIVATE)


def test_mmap_exec_is_eperm(vm):
    # Spec §2.2 marks this (inferred); measured on 6.18: EPERM (noexec mount).
    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    raises(errno.EPERM, g.mmap, 4 * P, 0, PROT_READ | PROT_EXEC, MAP_SHARED)


RX, R = PROT_READ | PROT_EXEC, PROT_READ


@pytest.mark.parametrize("gmem_flags, args, err", [
    # do_mmap's own checks (length, offset, noexec mount) run before guest_memfd's mmap method,
    # whose MMAP-flag check (ENODEV) runs before its MAP_SHARED check (EINVAL). Measured on 6.18.
    (0, (0, 0, RX, MAP_SHARED), errno.EINVAL),          # length 0 before PROT_EXEC
    (0, (P, 1, RX, MAP_SHARED), errno.EINVAL),          # unaligned offset before PROT_EXEC
    (0, (P, 0, RX, MAP_SHARED), errno.EPERM),           # PROT_EXEC before no-MMAP-flag
    (0, (P, 0, RX, MAP_PRIVATE), errno.EPERM),
    (0, (P, 0, R, MAP_PRIVATE), errno.ENODEV),          # no-MMAP-flag before MAP_PRIVATE
    (MMAP, (P, 0, RX, MAP_PRIVATE), errno.EPERM),       # PROT_EXEC before MAP_PRIVATE
    (MMAP | INIT_SHARED, (P, 0, RX, MAP_PRIVATE), errno.EPERM),
    (0, (P, 0, R, MAP_SHARED | MAP_GROWSDOWN), errno.EINVAL),  # do_mmap's GROWSDOWN before the method
    (MMAP | INIT_SHARED, (P, 0, R, MAP_SHARED | MAP_GROWSDOWN), errno.EINVAL),
    (MMAP, (P, 0, RX, MAP_SHARED | MAP_GROWSDOWN), errno.EPERM),  # PROT_EXEC before GROWSDOWN
    # ksys_mmap_pgoff refuses MAP_HUGETLB on a file that is not hugetlbfs, before do_mmap
    (MMAP | INIT_SHARED, (P, 0, R, MAP_SHARED | MAP_HUGETLB), errno.EINVAL),
    (0, (0, 0, RX, MAP_PRIVATE | MAP_HUGETLB), errno.EINVAL),
    # do_mmap rounds the length up to pages and finds no room for it (ENOMEM) before
    # file_mmap_ok's EOVERFLOW: one byte more than the address space allows is a page more
    (MMAP | INIT_SHARED, (MMAP_MAX_LEN + 1, (1 << 63) - MMAP_MAX_LEN, R, MAP_SHARED), errno.ENOMEM),
], ids=["len0-exec", "offset-exec", "exec-nommap", "exec-nommap-private", "nommap-private",
        "exec-private", "exec-private-init-shared", "growsdown-nommap", "growsdown", "exec-growsdown",
        "hugetlb", "hugetlb-len0-exec-private", "len-rounded-up-enomem-before-eoverflow"])
def test_mmap_check_order(vm, gmem_flags, args, err):
    require(vm, gmem_flags)
    g = vm.create_guest_memfd(4 * P, gmem_flags)
    raises(err, g.mmap, *args)
    assert g.fstat().st_size == 4 * P  # the file is unharmed
    g.close()


@pytest.mark.parametrize("profile, err", [("6.8", errno.ENODEV), ("6.12", errno.ENODEV), ("6.18", errno.EINVAL)])
def test_mmap_growsdown_before_and_after_guest_memfd_had_mmap(profile, err):
    """do_mmap refuses a file without an mmap method (ENODEV) before it looks at MAP_GROWSDOWN
    (EINVAL): until 6.18 guest_memfd's file operations have no mmap, so GROWSDOWN is ENODEV
    there; from 6.18 the method exists (its own no-MMAP-flag ENODEV comes later), so EINVAL."""
    import guestmem
    from guestmem.pytest_plugin import backend_skip_reason

    if backend_skip_reason("model"):
        pytest.skip(backend_skip_reason("model"))
    with guestmem.open_system("model", profile=profile) as system:
        g = system.create_vm().create_guest_memfd(4 * P)
        raises(err, g.mmap, P, 0, R, MAP_SHARED | MAP_GROWSDOWN)


def test_gt12_mmap_without_mmap_flag_is_enodev(vm):
    g = vm.create_guest_memfd(4 * P, 0)
    raises(errno.ENODEV, g.mmap, P)
    raises(errno.ENODEV, g.mmap, 4 * P)


def test_gt13_file_size(vm, flags):
    st = vm.create_guest_memfd(4 * P, flags).fstat()
    assert st.st_size == 4 * P
    assert st.st_blksize == P


def test_fstat_fields(vm):
    g = vm.create_guest_memfd(4 * P)
    st = g.fstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_nlink == 1
    assert st.st_blocks == 0
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())  # the caller's fsuid/fsgid (spec 2.1)
    g.allocate(0, 4 * P)
    assert g.fstat().st_blocks == 0  # i_blocks is never accounted


def test_fallocate_updates_mtime_and_ctime(vm):
    g = vm.create_guest_memfd(4 * P)
    before = g.fstat()
    time.sleep(0.03)  # coarse (jiffy) file timestamps
    g.allocate(0, P)
    after = g.fstat()
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns
    time.sleep(0.03)
    g.punch_hole(0, P)
    assert g.fstat().st_mtime_ns > after.st_mtime_ns


def test_gt14_fallocate(vm, flags):
    g = vm.create_guest_memfd(4 * P, flags)
    g.fallocate(KEEP, 0, 4 * P)                              # (a)
    raises(errno.EINVAL, g.fallocate, PUNCH, P - 1, P)       # (b)
    raises(errno.EINVAL, g.fallocate, KEEP, 4 * P, P)        # (c)
    raises(errno.EINVAL, g.fallocate, KEEP, 5 * P, P)        # (d)
    g.fallocate(PUNCH, 4 * P, P)                             # (e) punch past EOF succeeds
    g.fallocate(PUNCH, 5 * P, P)                             # (f)
    raises(errno.EINVAL, g.fallocate, PUNCH, P, P - 1)       # (g)
    g.fallocate(PUNCH, P, P)                                 # (h)
    g.fallocate(KEEP, P, P)                                  # (i)


@pytest.mark.parametrize("offset,length", [(0, 1), (0, P - 1), (0, P + 1), (1, 1), (1, P - 1), (1, P),
                                           (1, P + 1), (P, 1), (P, P - 1), (P, P + 1)])
def test_gt15_invalid_punch_hole(vm, flags, offset, length):
    g = vm.create_guest_memfd(4 * P, flags)
    raises(errno.EINVAL, g.punch_hole, offset, length)


@pytest.mark.parametrize("mode,offset,length,err", [
    (KEEP, -P, P, errno.EINVAL),                  # VFS: offset < 0
    (KEEP, 0, 0, errno.EINVAL),                   # VFS: len <= 0
    (PUNCH, 0, 0, errno.EINVAL),
    (KEEP, 0, -P, errno.EINVAL),
    (0x100 | KEEP, 0, P, errno.EOPNOTSUPP),       # VFS: unknown mode bit
    (Falloc.PUNCH_HOLE, 0, P, errno.EOPNOTSUPP),  # VFS: punch without KEEP_SIZE
    (Falloc.COLLAPSE_RANGE | KEEP, 0, P, errno.EOPNOTSUPP),
    (Falloc.INSERT_RANGE | KEEP, 0, P, errno.EOPNOTSUPP),
    (Falloc.ZERO_RANGE | PUNCH, 0, P, errno.EOPNOTSUPP),
    (KEEP, (1 << 63) - P, 2 * P, errno.EFBIG),    # VFS: offset+len overflows
    (Falloc.PUNCH_HOLE, (1 << 63) - P, 2 * P, errno.EOPNOTSUPP),      # VFS: the mode before the sum
    (Falloc.COLLAPSE_RANGE, (1 << 63) - P, 2 * P, errno.EFBIG),       # a VFS-valid mode: then the sum
    (0, 0, P, errno.EOPNOTSUPP),                  # gmem: no KEEP_SIZE
    (Falloc.ZERO_RANGE, 0, P, errno.EOPNOTSUPP),
    (Falloc.COLLAPSE_RANGE, 0, P, errno.EOPNOTSUPP),
    (Falloc.ZERO_RANGE | KEEP, 0, P, errno.EOPNOTSUPP),     # gmem: bit beyond KEEP|PUNCH
    (Falloc.UNSHARE_RANGE | KEEP, 0, P, errno.EOPNOTSUPP),
    (KEEP, 1, P, errno.EINVAL),                   # gmem: unaligned
    (KEEP, 0, 1, errno.EINVAL),
    (Falloc.ZERO_RANGE | KEEP, 1, 1, errno.EOPNOTSUPP),     # mode check before alignment
    (KEEP, 3 * P, 2 * P, errno.EINVAL),           # allocate past EOF
])
def test_fallocate_errno(vm, mode, offset, length, err):
    g = vm.create_guest_memfd(4 * P)
    raises(err, g.fallocate, mode, offset, length)


def test_punch_far_beyond_eof_succeeds(vm):
    g = vm.create_guest_memfd(4 * P)
    g.punch_hole(1 << 40, 1 << 30)


def test_never_allocated_file_punches_stats_and_allocates(vm, flags):
    """A file with no page yet: punching inside it succeeds, fstat is unchanged, memory reads zero."""
    g = vm.create_guest_memfd(4 * P, flags)
    before = g.fstat()
    g.punch_hole(0, 4 * P)
    g.punch_hole(P, P)
    after = g.fstat()
    assert (after.st_size, after.st_blocks, after.st_ino) == (before.st_size, before.st_blocks, before.st_ino)
    raises(errno.EINVAL, g.allocate, 0, 5 * P)  # past EOF is refused before anything is allocated
    g.allocate(P, P)
    if flags & INIT_SHARED:
        m = g.mmap()
        assert m.read(0, 4 * P) == b"\0" * (4 * P)
        m.close()
    g.close()


def test_punch_hole_then_host_sees_zero_page(vm):
    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = g.mmap()
    m.fill(0, 4 * P, 0x5A)
    g.punch_hole(P, 2 * P)
    assert m.read(0, P) == b"\x5a" * P
    assert m.read(P, 2 * P) == b"\0" * (2 * P)
    assert m.read(3 * P, P) == b"\x5a" * P
    m.close()


def test_fresh_memory_reads_zero_and_allocate_keeps_data(vm):
    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = g.mmap()
    assert m.read(0, 4 * P) == b"\0" * (4 * P)
    m.fill(0, P, 7)
    g.allocate(0, 4 * P)  # allocating already-present pages never clears them
    assert m.read(0, P) == b"\x07" * P
    m.close()


def test_set_memory_attributes_is_enotty_without_attribute_support(kvm_system):
    """The host kernel lacks memory attributes (spec §10): the ioctl is unknown."""
    if kvm_system.check_extension(Cap.MEMORY_ATTRIBUTES):
        pytest.skip("this kernel supports KVM_SET_MEMORY_ATTRIBUTES")
    vm = kvm_system.create_vm()
    raises(errno.ENOTTY, vm.set_memory_attributes, 0, P, 0)
    raises(errno.ENOTTY, vm.set_memory_attributes, 0, P, 8)
    vm.close()


def test_guest_memfd_fd_is_not_cloexec_and_is_rdwr(kvm_system):
    """Spec §2.1 / §11.1: the gmem fd is allocated with flags 0 (no O_CLOEXEC), O_RDWR."""
    import fcntl
    import os

    vm = kvm_system.create_vm()
    g = vm.create_guest_memfd(P)
    assert os.get_inheritable(g.fileno())
    assert fcntl.fcntl(g.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    assert os.readlink(f"/proc/self/fd/{g.fileno()}") == "anon_inode:[kvm-gmem]"  # E2 (6.18)
    g.close()
    vm.close()


def test_mmap_at_a_file_offset_shows_that_page(vm):
    """A mapping at a non-zero, page-aligned file offset starts at that page of the file."""
    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    whole = g.mmap()
    whole.fill(2 * P, P, 0x22)
    part = g.mmap(2 * P, 2 * P)
    assert part.read(0, P) == b"\x22" * P and part.read(P, P) == b"\0" * P
    part.fill(P, P, 0x33)
    assert whole.read(3 * P, P) == b"\x33" * P
    part.close()
    whole.close()


@pytest.mark.parametrize("mode, err", [
    (0xFFFFFFFF, errno.EOPNOTSUPP),   # every bit: unknown mode bits
    (-1, errno.EOPNOTSUPP),           # the same 32 bits, as a C int
    (1 << 32, errno.EINVAL),          # no 32-bit mode holds it: refused before the syscall
])
def test_fallocate_mode_at_the_edges_of_its_32_bits(vm, mode, err):
    g = vm.create_guest_memfd(4 * P)
    raises(err, g.fallocate, mode, 0, P)


@pytest.mark.parametrize("offset, length, err", [
    (0, (1 << 63) - 1, errno.EINVAL),  # ends exactly at LLONG_MAX: past vfs_fallocate, then unaligned
    (P, (1 << 63) - P, errno.EFBIG),   # ends at 2**63: the loff_t sum overflows
    (0, (1 << 64) - 1, errno.EINVAL),  # len is a loff_t: these bits are -1, len <= 0
])
def test_fallocate_range_edges_of_loff_t(vm, offset, length, err):
    g = vm.create_guest_memfd(4 * P)
    raises(err, g.fallocate, PUNCH, offset, length)
    g.close()


@pytest.mark.parametrize("offset, length", [(0, P + 1), (1, P), (P - 1, P + 1), ((1 << 64) - 1, P)],
                         ids=["len-unaligned", "offset-unaligned", "both-unaligned", "offset-u64-max"])
def test_fallocate_unaligned_or_negative_is_einval(vm, offset, length):
    """kvm_gmem_fallocate: offset and len must both be page aligned (EINVAL), even where their
    bitwise and is aligned; an offset whose loff_t is -1 is EINVAL in vfs_fallocate."""
    g = vm.create_guest_memfd(4 * P)
    raises(errno.EINVAL, g.fallocate, KEEP, offset, length)
    g.close()


@pytest.mark.parametrize("length", [P, P + 1, 2 * P - 1])
def test_mmap_offset_at_the_maximum_file_size(vm, length):
    """file_mmap_ok: the mapping, rounded up to pages, must end within MAX_LFS_FILESIZE; the
    last offset that fits maps (beyond EOF, which is allowed), one page more is EOVERFLOW."""
    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    pages = -(-length // P)
    last = (((1 << 63) - 1 - pages * P) >> 12) << 12
    g.mmap(length, last).close()
    raises(errno.EOVERFLOW, g.mmap, length, last + P)
    g.close()


@pytest.mark.parametrize("gmem_flags, prot, mflags", [
    (MMAP | INIT_SHARED, R, MAP_SHARED),         # file_mmap_ok's EOVERFLOW
    (MMAP | INIT_SHARED, R, 0x3 | MAP_SYNC),     # MAP_SHARED_VALIDATE's EOPNOTSUPP
    (0, RX, MAP_SHARED),                         # the noexec mount's EPERM
    (0, R, MAP_SHARED),                          # kvm_gmem_mmap's ENODEV
    (MMAP, R, MAP_PRIVATE),                      # kvm_gmem_mmap's EINVAL
], ids=["eoverflow", "validate", "exec", "nommap", "private"])
def test_mmap_without_room_is_enomem_before_the_files_checks(vm, gmem_flags, prot, mflags):
    """do_mmap finds the mapping a place (get_unmapped_area, ENOMEM if there is none) before
    it checks the file: a length just inside the address space limit, that no live process
    has room for, is ENOMEM even where the file would refuse the mapping (measured here)."""
    require(vm, gmem_flags)
    g = vm.create_guest_memfd(4 * P, gmem_flags)
    raises(errno.ENOMEM, g.mmap, MMAP_MAX_LEN, (1 << 63) - MMAP_MAX_LEN, prot, mflags)
    raises(errno.ENOMEM, g.mmap, MMAP_MAX_LEN - P, (1 << 63) - MMAP_MAX_LEN + P, prot, mflags)
    g.close()


def test_model_allocation_is_counted_per_page(model_system):
    """guestmem extension: ``GuestMemfd.stats()['pages_allocated']`` follows allocate and punch,
    and ``folios`` counts the same pages: an ordinary guest_memfd's folios are single 4 KiB
    pages (kvm_gmem_get_folio, order 0), allocated by fallocate before any touch."""
    g = model_system.create_vm().create_guest_memfd(8 * P)
    g.allocate(P, 3 * P)
    assert (g.stats()["pages_allocated"], g.stats()["folios"]) == (3, {"4K": 3})
    g.punch_hole(2 * P, P)
    assert (g.stats()["pages_allocated"], g.stats()["folios"]) == (2, {"4K": 2})
    g.close()


def test_model_error_messages_name_the_rule(model_system):
    """guestmem.errors: the message after the strerror names what was refused (model side;
    the kvm side can only repeat its arguments)."""
    vm = model_system.create_vm()
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    no_mmap = vm.create_guest_memfd(P)
    cases = [
        (lambda: g.read(1), "read"), (lambda: g.write(b"x"), "write"),
        (lambda: g.pread(1, 0), "seek"), (lambda: g.pwrite(b"x", 0), "seek"), (lambda: g.lseek(0, 0), "seek"),
        (lambda: g.fallocate(0x100 | KEEP, 0, P), "mode"), (lambda: g.fallocate(PUNCH & ~KEEP, 0, P), "keep_size"),
        (lambda: g.fallocate(Falloc.COLLAPSE_RANGE | KEEP, 0, P), "keep_size"),  # takes no KEEP_SIZE
        (lambda: g.fallocate(Falloc.UNSHARE_RANGE | KEEP, 0, P), "punch_hole"),  # guest_memfd's own rule
        (lambda: g.mmap(P, 0, PROT_READ | PROT_EXEC), "prot_exec"),
        (lambda: g.mmap(1 << 48), "address space"), (lambda: g.mmap(2 * P, (1 << 63) - P), "file size"),
        (lambda: vm.create_guest_memfd(P, 1 << 40), "flags"), (lambda: vm.create_guest_memfd(1), "size"),
        (lambda: g.lseek(0, 5), "whence"), (lambda: g.pread(1, -1), "negative"),
        (lambda: g.inject_hwpoison(P + 1), "offset"),
        (lambda: g.fallocate(KEEP, (1 << 63) - P, 2 * P), "file size"),
    ]
    for call, word in cases:
        with pytest.raises(OSError) as info:
            call()
        assert word in str(info.value).split(": ", 1)[1].lower(), info.value
    # uapi names and the object's own name are spelled as in the kernel, as whole words
    for call, name in [(lambda: g.mmap(P, 0, PROT_READ | PROT_EXEC), "PROT_EXEC"),
                       (lambda: g.mmap(P, 0, PROT_READ, MAP_SHARED | MAP_GROWSDOWN), "MAP_GROWSDOWN"),
                       (lambda: no_mmap.mmap(P), "guest_memfd"), (lambda: no_mmap.mmap(P), "GUEST_MEMFD_FLAG_MMAP"),
                       (lambda: g.read(1), "guest_memfd"),
                       (lambda: no_mmap.mmap(P, 0, PROT_READ | PROT_EXEC), "guest_memfd")]:  # its mount
        with pytest.raises(OSError) as info:
            call()
        assert re.search(rf"\b{name}\b", str(info.value)), info.value
    g.close()
    no_mmap.close()
    with pytest.raises(OSError) as info:
        g.fstat()
    assert info.value.errno == errno.EBADF and re.search(r"\bguest_memfd\b", str(info.value)), info.value
    vm.close()
    with guestmem.open_system("model", profile="6.8") as s68:  # the 6.8 VFS rules' own messages
        g68 = s68.create_vm(0).create_guest_memfd(P)
        with pytest.raises(OSError) as info:
            g68.fallocate(0x100 | KEEP, 0, P)
        assert info.value.errno == errno.EOPNOTSUPP and "mode" in str(info.value).split(": ", 1)[1], info.value


def test_map_sync_is_ignored_with_map_shared_and_refused_with_validate(vm):
    """do_mmap: flags outside the legacy set are ignored with MAP_SHARED and EOPNOTSUPP with
    MAP_SHARED_VALIDATE (guest_memfd does not support MAP_SYNC). Measured on 6.18."""
    require(vm, MMAP | INIT_SHARED)
    g = vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    map_sync, map_shared_validate = 0x80000, 0x03
    g.mmap(P, 0, PROT_READ | PROT_WRITE, MAP_SHARED | map_sync).close()
    raises(errno.EOPNOTSUPP, g.mmap, P, 0, PROT_READ | PROT_WRITE, map_shared_validate | map_sync)
    g.mmap(P, 0, PROT_READ | PROT_WRITE, map_shared_validate).close()


def test_fallocate_on_a_closed_guest_memfd_is_ebadf(vm):
    g = vm.create_guest_memfd(4 * P)
    g.close()
    raises(errno.EBADF, g.fallocate, KEEP, 0, P)
