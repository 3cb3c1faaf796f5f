"""Kernel profiles (guestmem.model.profile): each version difference, parametrized over profiles.

The expected values below are written from the kernel sources (spec sections 8 and 13; 6.12
from Debian's linux-source-6.12, 6.12.117), not read from the Profile fields, so a wrong
field fails here. Profiles other than the host's kernel line cannot be run on a kernel here:
these are model-only tests; the host's own behaviour for the same rules is checked on both
backends in the conformance files (test_memslots.py, test_guest_memfd.py).
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

import guestmem
from guestmem.model.profile import PROFILES
from guestmem.uapi import Cap, Falloc, MemFlag, VmType

P = 4096
SW = int(VmType.SW_PROTECTED)
GMEM = int(MemFlag.GUEST_MEMFD)
KEEP = int(Falloc.KEEP_SIZE)
PROT_RWX = 7
MAP_SHARED = 1

# name -> facts read in that kernel's sources
EXPECT: dict[str, dict[str, Any]] = {
    "6.8": dict(flags_default=0, flags_sw=0, cap_gmem_default=0, default_binds=False, sw_as=2,
                pre_fault_cap=0, pre_fault_errno=errno.ENOTTY, exec_errno=errno.ENODEV,
                wrapped_bind=True, overlap=errno.EINVAL, collapse_keep=errno.EINVAL),
    "6.12": dict(flags_default=0, flags_sw=0, cap_gmem_default=0, default_binds=False, sw_as=1,
                 pre_fault_cap=1, pre_fault_errno=errno.ENOENT, exec_errno=errno.ENODEV,
                 wrapped_bind=False, overlap=errno.EINVAL, collapse_keep=errno.EOPNOTSUPP),
    "6.18": dict(flags_default=3, flags_sw=1, cap_gmem_default=1, default_binds=True, sw_as=1,
                 pre_fault_cap=1, pre_fault_errno=errno.ENOENT, exec_errno=errno.EPERM,
                 wrapped_bind=True, overlap=errno.EINVAL, collapse_keep=errno.EOPNOTSUPP),
    "6.18-host": dict(flags_default=3, flags_sw=None, cap_gmem_default=1, default_binds=True, sw_as=None,
                      pre_fault_cap=0, pre_fault_errno=errno.ENOSPC, exec_errno=errno.EPERM,
                      wrapped_bind=True, overlap=errno.EINVAL, collapse_keep=errno.EOPNOTSUPP),
    "6.19": dict(flags_default=3, flags_sw=1, cap_gmem_default=1, default_binds=True, sw_as=1,
                 pre_fault_cap=1, pre_fault_errno=errno.ENOENT, exec_errno=errno.EPERM,
                 wrapped_bind=True, overlap=errno.EINVAL, collapse_keep=errno.EOPNOTSUPP),
    "7.0": dict(flags_default=3, flags_sw=1, cap_gmem_default=1, default_binds=True, sw_as=1,
                pre_fault_cap=1, pre_fault_errno=errno.ENOENT, exec_errno=errno.EPERM,
                wrapped_bind=True, overlap=errno.EINVAL, collapse_keep=errno.EOPNOTSUPP),
    "7.2": dict(flags_default=3, flags_sw=1, cap_gmem_default=1, default_binds=True, sw_as=1,
                pre_fault_cap=1, pre_fault_errno=errno.ENOENT, exec_errno=errno.EPERM,
                wrapped_bind=False, overlap=errno.EEXIST, collapse_keep=errno.EOPNOTSUPP),
    # 7.2 plus the in-flight in-place conversion (HugeTLB create flag 1 << 3, INIT_SHARED for
    # private-memory VMs too)
    "next": dict(flags_default=0b1111, flags_alone=0b111, flags_sw=0b1111, cap_gmem_default=1, default_binds=True, sw_as=1,
                 pre_fault_cap=1, pre_fault_errno=errno.ENOENT, exec_errno=errno.EPERM,
                 wrapped_bind=False, overlap=errno.EEXIST, collapse_keep=errno.EOPNOTSUPP),
}

ANON_INODE_FS_MAGIC, GUEST_MEMFD_MAGIC = 0x09041934, 0x474D454D
OWN_FS = {"6.19", "7.0", "7.2", "next"}  # guest_memfd's own pseudo-filesystem, per-file mempolicy


def raises(err: int, fn, *args, **kwargs) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value


@pytest.fixture(params=sorted(EXPECT))
def prof(request):
    with guestmem.open_system("model", profile=request.param) as s:
        yield s, EXPECT[request.param]


def test_every_profile_has_expectations():
    assert set(EXPECT) == set(PROFILES)


def _sw_vm(s, e):
    if e["flags_sw"] is None:
        pytest.skip("this profile has no VM type with private memory")
    return s.create_vm(SW)


def test_guest_memfd_caps(prof):
    s, e = prof
    vm = s.create_vm(0)
    assert s.check_extension(Cap.GUEST_MEMFD) == 1
    assert vm.check_extension(Cap.GUEST_MEMFD) == e["cap_gmem_default"]
    assert vm.check_extension(Cap.GUEST_MEMFD_FLAGS) == e["flags_default"]
    assert s.check_extension(Cap.PRE_FAULT_MEMORY) == e["pre_fault_cap"]
    if e["flags_sw"] is not None:
        sw = s.create_vm(SW)
        assert sw.check_extension(Cap.GUEST_MEMFD_FLAGS) == e["flags_sw"]
        assert sw.check_extension(Cap.GUEST_MEMFD) == 1
        assert sw.check_extension(Cap.MULTI_ADDRESS_SPACE) == e["sw_as"]


@pytest.mark.parametrize("bit", range(64))
def test_create_flags_follow_the_profile(prof, bit):
    s, e = prof
    vm = s.create_vm(0)
    if e.get("flags_alone", e["flags_default"]) & (1 << bit):  # HugeTLB needs a size too
        vm.create_guest_memfd(1 << 30, 1 << bit).close()  # 1 GiB: fits any HugeTLB folio size
    else:
        raises(errno.EINVAL, vm.create_guest_memfd, P, 1 << bit)


def test_which_vms_may_bind(prof):
    s, e = prof
    vm = s.create_vm(0)
    g = vm.create_guest_memfd(2 * P)  # creating works on every VM type
    if e["default_binds"]:
        vm.set_user_memory_region2(0, GMEM, 0, P, 0, g, 0)
    else:
        raises(errno.EINVAL, vm.set_user_memory_region2, 0, GMEM, 0, P, 0, g, 0)
    if e["flags_sw"] is not None:
        sw = s.create_vm(SW)
        sw.set_user_memory_region2(0, GMEM, 0, P, 0, sw.create_guest_memfd(P), 0)


def test_sw_vm_address_spaces(prof):
    s, e = prof
    sw = _sw_vm(s, e)
    if e["sw_as"] == 2:
        sw.set_user_memory_region2(1 << 16 | 1, 0, 0, P)
    else:
        raises(errno.EINVAL, sw.set_user_memory_region2, 1 << 16 | 1, 0, 0, P)


def test_mmap_prot_exec(prof):
    """Noexec mount (EPERM) where the kernel has one, else the missing mmap method (ENODEV)."""
    s, e = prof
    g = s.create_vm(0).create_guest_memfd(P, e["flags_default"] & 1)
    raises(e["exec_errno"], g.mmap, P, 0, PROT_RWX, MAP_SHARED)


def _bind_vm(s, e):
    return s.create_vm(0) if e["default_binds"] else _sw_vm(s, e)


def test_bind_offset_sum_wrapping_s64(prof):
    """offset 2**63 - 4096 with 8 KiB: the loff_t sum wraps negative (docs/kernel-findings.md)."""
    s, e = prof
    vm = _bind_vm(s, e)
    g = vm.create_guest_memfd(16 * P)
    args = (1, GMEM, 0x100000, 2 * P, 0, g, (1 << 63) - P)
    if e["wrapped_bind"]:
        vm.set_user_memory_region2(*args)
        assert vm.memslots()[0].pgoff == (1 << 51) - 1
    else:
        raises(errno.EINVAL, vm.set_user_memory_region2, *args)
    for off in (1 << 63, (1 << 64) - 2 * P, 16 * P, 15 * P):  # never wraps: always past the file
        raises(errno.EINVAL, vm.set_user_memory_region2, 2, GMEM, 0x200000, 2 * P, 0, g, off)


def test_binding_a_bound_file_range(prof):
    s, e = prof
    vm = _bind_vm(s, e)
    g = vm.create_guest_memfd(4 * P)
    vm.set_user_memory_region2(0, GMEM, 0, 2 * P, 0, g, 0)
    raises(e["overlap"], vm.set_user_memory_region2, 1, GMEM, 0x100000, 2 * P, 0, g, P)
    vm.set_user_memory_region2(1, GMEM, 0x100000, 2 * P, 0, g, 2 * P)  # the free half binds


def test_fallocate_vfs_generation(prof):
    s, e = prof
    g = _bind_vm(s, e).create_guest_memfd(4 * P)
    raises(e["collapse_keep"], g.fallocate, int(Falloc.COLLAPSE_RANGE) | KEEP, 0, P)


def test_pre_fault_memory_availability(prof):
    s, e = prof
    vm = s.create_vm(0)
    vcpu = vm.create_vcpu(0)
    raises(e["pre_fault_errno"], vcpu.pre_fault_memory, 1 << 30, P)  # a VM that never had a memslot


def test_wrapped_binding_past_eof_faults_in_the_model():
    """Model deviation (README): the kernel gives a guest page cache past EOF behind a wrapped
    binding; the model has no page there and reports the EFAULT of a missing gmem page
    instead of touching memory outside its backing."""
    with guestmem.open_system("model", profile="6.18") as s:
        vm = s.create_vm(0)
        g = vm.create_guest_memfd(16 * P, 3)
        vm.set_user_memory_region2(1, GMEM, 0x100000, 2 * P, 0, g, (1 << 63) - P)
        raises(errno.EFAULT, vm.create_vcpu(0).pre_fault_memory, 0x100000, 2 * P)


def test_fstatfs_names_the_filesystem(prof):
    s, e = prof
    name = s.profile
    vm = s.create_vm(0)
    a, b = vm.create_guest_memfd(P), vm.create_guest_memfd(P)
    st = a.fstatfs()
    assert st.f_type == (GUEST_MEMFD_MAGIC if name in OWN_FS else ANON_INODE_FS_MAGIC)
    assert (st.f_bsize, st.f_namelen) == (P, 255)
    assert a.fstat().st_ino != b.fstat().st_ino  # one inode per file in every version


def test_fstatfs_on_this_host(system):
    """anon_inodefs (6.18: ANON_INODE_FS_MAGIC, simple_statfs) on both backends."""
    st = system.create_vm().create_guest_memfd(P).fstatfs()
    assert (st.f_type, st.f_bsize, st.f_namelen) == (ANON_INODE_FS_MAGIC, P, 255)


# --- NUMA memory policy (mbind / get_mempolicy with MPOL_F_ADDR, x86-64 syscalls) ---------------

MPOL_DEFAULT, MPOL_BIND, MPOL_F_ADDR = 0, 2, 2


def _libc():
    import ctypes

    from guestmem import hostmem

    return ctypes, hostmem.libc


def mbind(address: int, length: int, mode: int, nodemask: int) -> int:
    ctypes, libc = _libc()
    mask = ctypes.c_ulong(nodemask)
    r = libc.syscall(ctypes.c_long(237), ctypes.c_void_p(address), ctypes.c_ulong(length), ctypes.c_int(mode),
                     ctypes.byref(mask), ctypes.c_ulong(64), ctypes.c_uint(0))
    return 0 if r == 0 else ctypes.get_errno()


def policy_at(address: int) -> int:
    ctypes, libc = _libc()
    mode, mask = ctypes.c_int(-1), ctypes.c_ulong(0)
    r = libc.syscall(ctypes.c_long(239), ctypes.byref(mode), ctypes.byref(mask), ctypes.c_ulong(64),
                     ctypes.c_void_p(address), ctypes.c_ulong(MPOL_F_ADDR))
    assert r == 0, ctypes.get_errno()
    return mode.value


def _policy_seen_by_second_mapping(system, flags: int) -> int:
    g = system.create_vm(0).create_guest_memfd(4 * P, flags)
    m1, m2 = g.mmap(4 * P), g.mmap(4 * P)
    assert mbind(m1.address, 4 * P, MPOL_BIND, 1) == 0
    assert policy_at(m1.address) == MPOL_BIND
    assert mbind(m1.address, P, 99, 1) == errno.EINVAL  # an invalid policy
    seen = policy_at(m2.address)
    m1.close()
    m2.close()
    return seen


@pytest.mark.parametrize("flags", [1, 3], ids=["mmap", "mmap-init-shared"])
def test_mbind_policy_scope(prof, flags):
    """6.19+: mbind sets the file's shared policy, seen through every mapping; before, the
    policy belongs to the mapping (measured on 6.18.44). Model deviation (README): with
    INIT_SHARED its mapping is the memfd's, whose policy is always per file."""
    s, e = prof
    if not e["flags_default"] & 1:
        pytest.skip("no guest_memfd mmap in this kernel")
    per_file = s.profile in OWN_FS or flags == 3  # flags 3 before 6.19: the deviation
    assert _policy_seen_by_second_mapping(s, flags) == (MPOL_BIND if per_file else MPOL_DEFAULT)


@pytest.mark.parametrize("flags", [1, 3], ids=["mmap", "mmap-init-shared"])
def test_mbind_policy_is_per_mapping_on_this_host(system, backend, flags):
    """6.18 has no set_policy for guest_memfd mappings: a second mapping reads MPOL_DEFAULT
    (measured). The model matches without INIT_SHARED; with it, the pinned deviation."""
    expected = MPOL_BIND if backend == "model" and flags == 3 else MPOL_DEFAULT
    assert _policy_seen_by_second_mapping(system, flags) == expected


def test_model_mappings_never_take_huge_pages(prof):
    """Model-only (the kernel's VMA has no such flag to read): every mmap profile marks its
    memfd mapping NOHUGEPAGE, so MADV_COLLAPSE is EINVAL as on the kernel, whatever the host's
    shmem THP setting (a bare memfd mapping collapses: measured)."""
    s, e = prof
    if not e["flags_default"] & 1:
        pytest.skip("no guest_memfd mmap in this kernel")
    m = s.create_vm(0).create_guest_memfd(4 << 20, e["flags_default"] & 3).mmap(4 << 20)
    with open("/proc/self/smaps") as f:
        smaps = f.read()
    start = f"{m.address:x}-"
    block = smaps[smaps.index(start):]
    flags_line = next(line for line in block.splitlines() if line.startswith("VmFlags:"))
    assert " nh" in flags_line, flags_line
    m.close()


def test_madv_collapse_is_einval(system):
    ctypes, libc = _libc()
    m = system.create_vm(0).create_guest_memfd(8 << 20, 3).mmap(8 << 20)
    m.fill(0, 8 << 20, 1)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    aligned = (m.address + (2 << 20) - 1) & ~((2 << 20) - 1)
    assert libc.madvise(aligned, 2 << 20, 25) == -1 and ctypes.get_errno() == errno.EINVAL  # MADV_COLLAPSE
    m.close()


# --- choosing a profile for the running kernel ---------------------------------------------------

@pytest.mark.parametrize("release, pvm, expected", [
    ("6.18.44-fc-v857", True, "6.18-host"), ("6.18.3", False, "6.18"), ("6.12.117-amd64", False, "6.12"),
    ("6.15.2", False, "6.12"), ("6.19.0", False, "6.19"), ("7.1.4", False, "7.0"), ("7.2.0", False, "7.2"),
    ("7.9.1", False, "7.2"), ("5.15.0", False, "6.8"), ("6.8.0-50-generic", False, "6.8"),
    ("6.12.5", True, "6.12"), ("weird", False, "7.2"),
])
def test_host_profile_choice(release, pvm, expected):
    from guestmem.model.profile import host_profile

    name, why = host_profile(release, pvm)
    assert name == expected and release in why


def test_host_profile_opens_here():
    from guestmem.model.profile import host_profile

    with guestmem.open_system("model", profile="host") as s:
        assert s.profile == host_profile()[0]


def test_default_profile_is_the_newest_release():
    with guestmem.open_system("model") as s:
        assert s.profile == "7.2"


def test_hypercall_ret_before_and_after_613(prof):
    """KVM_EXIT_HYPERCALL's ``ret``: 6.13+ zero it before exiting; 6.8/6.12 leave what userspace
    wrote last, which the next completion loads into RAX if userspace writes nothing."""
    from guestmem import guest, hostmem
    from guestmem.types import HltExit, HypercallExit

    s, e = prof
    vm = s.create_vm(0)
    vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << 12)
    call = "mov eax, 12\nmov rbx, 0x100000\nmov ecx, 1\nxor edx, edx\nvmmcall\n"
    image = guest.long_mode_guest(call + call + "hlt")
    ram_size = 2 << 20
    ram = hostmem.map_memfd("ram", ram_size)
    vm.set_user_memory_region(0, 0, 0, ram_size, ram.address)
    guest.load(image, {0: ram})
    vcpu = vm.create_vcpu(0)
    guest.setup_vcpu(vcpu, image)
    first = vcpu.run()
    assert isinstance(first, HypercallExit) and first.ret == 0
    vcpu.set_hypercall_ret(0x55)
    second = vcpu.run()
    stale = s.profile in ("6.8", "6.12")
    assert isinstance(second, HypercallExit) and second.ret == (0x55 if stale else 0)
    assert vcpu.run() == HltExit()  # completed without set_hypercall_ret
    assert vcpu.get_regs().rax == (0x55 if stale else 0)
    vcpu.close()
    ram.close()
