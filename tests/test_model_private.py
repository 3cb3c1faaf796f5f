"""Model-only: private memory, memory attributes, mixed hugepage blocks, invalidation, all-or-nothing.

The host kernel has no memory-attribute support (KVM_SET_MEMORY_ATTRIBUTES -> ENOTTY), so
these rules (spec sections 2.4, 4, 6) are checked on the model alone.
"""

from __future__ import annotations

import errno
import resource

import pytest

import guestmem
from guestmem.model import GUESTMEM_TDX_LIKE_VM
from guestmem.uapi import Cap, MemFlag, VmType

from probe import touch

P = 4096
M2, G1 = 2 << 20, 1 << 30
PRIVATE = 8
SW = int(VmType.SW_PROTECTED)
GMEM = int(MemFlag.GUEST_MEMFD)


def raises(err, fn, *args, **kwargs):
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    return info.value


@pytest.fixture
def sw_vm(model_system):
    vm = model_system.create_vm(SW)
    yield vm
    vm.close()


@pytest.fixture
def default_vm(model_system):
    vm = model_system.create_vm(0)
    yield vm
    vm.close()


def test_caps_of_default_profile(model_system):
    s = model_system
    assert s.check_extension(Cap.MEMORY_ATTRIBUTES) == 8
    assert s.check_extension(Cap.VM_TYPES) == 0b11
    sw, dflt = s.create_vm(SW), s.create_vm(0)
    assert sw.check_extension(Cap.MEMORY_ATTRIBUTES) == 8 and dflt.check_extension(Cap.MEMORY_ATTRIBUTES) == 0
    assert sw.check_extension(Cap.GUEST_MEMFD_FLAGS) == 1 and dflt.check_extension(Cap.GUEST_MEMFD_FLAGS) == 3
    assert sw.check_extension(Cap.MULTI_ADDRESS_SPACE) == 1 and dflt.check_extension(Cap.MULTI_ADDRESS_SPACE) == 2


def test_host_profile_has_no_attributes():
    with guestmem.open_system("model", profile="6.18-host") as s:
        assert s.check_extension(Cap.MEMORY_ATTRIBUTES) == 0 and s.check_extension(Cap.VM_TYPES) == 1
        raises(errno.EINVAL, s.create_vm, SW)
        vm = s.create_vm(0)
        raises(errno.ENOTTY, vm.set_memory_attributes, 0, P, 0)
        raises(errno.EINVAL, vm.set_user_memory_region2, 1 << 16, 0, 0, P)  # one address space


def test_option_override_memory_attributes_false():
    with guestmem.open_system("model", memory_attributes=False) as s:
        raises(errno.ENOTTY, s.create_vm(0).set_memory_attributes, 0, P, 0)


def test_default_vm_private_is_einval_and_zero_is_noop(default_vm):
    raises(errno.EINVAL, default_vm.set_memory_attributes, 0, P, PRIVATE)
    default_vm.set_memory_attributes(0, P, 0)
    assert default_vm.stats()["invalidations"] == 0


@pytest.mark.parametrize("args, err", [
    ((0, P, PRIVATE, 1), errno.EINVAL),            # flags first
    ((1, 0, 1, 0), errno.EINVAL),                  # unsupported attribute bit before size checks
    ((0, 0, PRIVATE, 0), errno.EINVAL),            # size 0
    (((1 << 64) - P, 2 * P, PRIVATE, 0), errno.EINVAL),  # wraps
    ((1, P, PRIVATE, 0), errno.EINVAL),            # unaligned address
    ((0, P + 1, PRIVATE, 0), errno.EINVAL),        # unaligned size
])
def test_set_memory_attributes_errno(sw_vm, args, err):
    before = sw_vm._snapshot()
    raises(err, sw_vm.set_memory_attributes, *args)
    assert sw_vm._snapshot() == before


def test_attributes_any_gfn_no_memslot_needed(sw_vm):
    top = (1 << 64) - 3 * P
    sw_vm.set_memory_attributes(top, P, PRIVATE)
    raises(errno.EINVAL, sw_vm.set_memory_attributes, top, 3 * P, PRIVATE)  # ends at 2**64: wraps to 0
    assert sw_vm.get_memory_attributes(top - P, 3 * P) == [(top - P, top, 0), (top, top + P, PRIVATE),
                                                           (top + P, top + 2 * P, 0)]


def test_get_memory_attributes_ranges_and_noop(sw_vm):
    calls = []
    sw_vm._add_invalidation_listener(lambda s, e: calls.append((s, e)))
    sw_vm.set_user_memory_region(0, 0, 0, 4 * M2)
    sw_vm.set_memory_attributes(M2, P, PRIVATE)
    assert sw_vm.get_memory_attributes(0, 2 * M2) == [(0, M2, 0), (M2, M2 + P, PRIVATE), (M2 + P, 2 * M2, 0)]
    assert sw_vm._attribute_at((M2 >> 12)) == PRIVATE and sw_vm._attribute_at(0) == 0
    n = len(calls)
    assert calls[-1] == (M2 >> 12, (2 * M2) >> 12)  # widened to the enclosing 2 MiB block
    sw_vm.set_memory_attributes(M2, P, PRIVATE)  # unchanged: no invalidation
    assert len(calls) == n
    sw_vm.set_memory_attributes(0, 4 * M2, 0)
    assert sw_vm.get_memory_attributes(0, 4 * M2) == [(0, 4 * M2, 0)]
    sw_vm._check_invariants()


def test_attributes_survive_memslot_delete(sw_vm):
    sw_vm.set_user_memory_region(0, 0, 0, M2)
    sw_vm.set_memory_attributes(0, M2, PRIVATE)
    sw_vm.set_user_memory_region(0, 0, 0, 0)
    assert sw_vm._attribute_ranges(0, 512) == [(0, 512, PRIVATE)]


def test_mixed_block_tracking(sw_vm):
    sw_vm.set_memory_attributes(G1 + M2 + P, P, PRIVATE)  # before the slot exists
    sw_vm.set_user_memory_region(3, 0, 0, 4 * G1)
    slot = sw_vm._slot_for_gfn(0)
    g = (G1 + M2) >> 12
    assert slot.is_mixed(1, g) and slot.is_mixed(2, g) and not slot.is_mixed(1, 0)
    sw_vm.set_memory_attributes(G1 + M2, M2, PRIVATE)  # whole 2M block uniform again
    assert not slot.is_mixed(1, g) and slot.is_mixed(2, g)
    sw_vm.set_memory_attributes(G1, G1, PRIVATE)
    assert not slot.is_mixed(2, g)
    assert sw_vm.stats()["mixed_blocks"]["0:3"] == {"2M": 0, "1G": 0}
    sw_vm._check_invariants()


def test_mixed_blocks_partial_edges_not_tracked(sw_vm):
    sw_vm.set_user_memory_region(0, 0, P, M2)  # unaligned: no 2M block fully inside
    sw_vm.set_memory_attributes(M2 // 2, P, PRIVATE)
    assert sw_vm._slot_for_gfn(1).mixed_count(1) == 0
    sw_vm._check_invariants()


def test_one_tib_slot_with_many_ranges_stays_range_based(sw_vm):
    tib = 1 << 40
    sw_vm.set_user_memory_region(0, 0, 0, tib)
    sw_vm.set_memory_attributes(0, tib, PRIVATE)
    for i in range(2000):
        sw_vm.set_memory_attributes((i + 1) * 3 * M2 + P * (i % 7), P, 0)
    st = sw_vm.stats()
    assert st["attribute_ranges"] == 2001 and st["mixed_blocks"]["0:0"]["2M"] == 2000
    sw_vm.set_memory_attributes(0, tib, 0)
    assert sw_vm.stats()["attribute_ranges"] == 0 and sw_vm.stats()["mixed_blocks"]["0:0"] == {"2M": 0, "1G": 0}


def test_tdx_like_vm_has_private_memory(model_system):
    vm = model_system.create_vm(GUESTMEM_TDX_LIKE_VM)
    assert vm._private_mem and vm.check_extension(Cap.MEMORY_ATTRIBUTES) == 8
    vm.set_memory_attributes(0, P, PRIVATE)
    raises(errno.EINVAL, vm.create_guest_memfd, P, 2)  # no INIT_SHARED with private memory


def test_private_vm_gmem_never_host_readable(sw_vm):
    g = sw_vm.create_guest_memfd(M2, 1)
    raises(errno.EINVAL, g.read, 16)
    raises(errno.ESPIPE, g.pread, 16, 0)
    m = g.mmap()  # mappable, but every touch SIGBUSes (checked in a child)
    assert touch(m, 0) == "SIGBUS" and touch(m, M2 - 1) == "SIGBUS"
    m.close()


def test_invalidation_on_punch_delete_release_hwpoison(sw_vm):
    calls = []
    sw_vm._add_invalidation_listener(lambda s, e: calls.append((s, e)))
    g = sw_vm.create_guest_memfd(4 * M2)
    sw_vm.set_user_memory_region2(1, GMEM, 1 << 30, M2, 0, g, M2)
    base = (1 << 30) >> 12
    g.punch_hole(M2 + P, P)
    assert calls[-1] == (base + 1, base + 2)
    g.punch_hole(3 * M2, M2)  # unbound range: nothing to invalidate
    assert len(calls) == 1
    g.inject_hwpoison(M2 + 2 * P)
    assert calls[-1] == (base + 2, base + 3) and (M2 + 2 * P) in g._poisoned
    g.punch_hole(M2, M2)
    assert not g._poisoned
    g.close()  # release: bindings nulled, range invalidated, slot stays
    assert calls[-1] == (base, base + 512)
    slot = sw_vm._slot_for_gfn(base)
    assert slot is not None and slot.gmem is None and g._released
    sw_vm.set_user_memory_region2(1, GMEM, 0, 0, 0, -1)  # delete works, unbind is a no-op
    assert calls[-1] == (base, base + 512)
    sw_vm._check_invariants()


def test_mapping_pins_file_and_vm(model_system):
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(M2, 3)
    vm.set_user_memory_region2(0, GMEM, 0, M2, 0, g, 0)
    m = g.mmap()
    m.write(0, b"kept")
    g.close()
    vm.close()
    assert not g._released and not vm._dead
    assert vm._slot_for_gfn(0).gmem is g
    m.close()
    assert g._released and vm._dead


@pytest.mark.parametrize("profile", ["6.18", "7.2"])
def test_mapping_of_a_file_without_init_shared_pins_it_until_munmap(profile):
    """The VMA holds a file reference whatever the file's pages show: a mapping of an MMAP file
    without INIT_SHARED (SIGBUS on every touch) keeps file and VM alive after both fds close,
    and its munmap runs kvm_gmem_release (the slot's binding goes, the VM is destroyed).
    6.18 maps an empty file per mapping, 6.19+ one per guest_memfd (its NUMA policy)."""
    with guestmem.open_system("model", profile=profile) as system:
        vm = system.create_vm(0)
        g = vm.create_guest_memfd(M2, 1)
        vm.set_user_memory_region2(0, GMEM, 0, M2, 0, g, 0)
        m = g.mmap()
        assert touch(m, 0) == "SIGBUS"
        g.close()
        vm.close()
        assert not g._released and not vm._dead and vm._slot_for_gfn(0).gmem is g
        m.close()
        assert g._released and vm._dead


def test_data_belongs_to_the_file_not_the_gpa(model_system):
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(M2, 3)
    m = g.mmap()
    m.write(P, b"abc")
    vm.set_user_memory_region2(0, GMEM, 0, M2, 0, g, 0)
    vm.set_user_memory_region2(0, 0, 0, 0)
    vm.set_user_memory_region2(0, GMEM, 1 << 32, M2, 0, g, 0)
    assert m.read(P, 3) == b"abc"
    g.punch_hole(0, M2)
    assert m.read(P, 3) == b"\0\0\0"
    m.close()
    g.close()


# An fd that cannot be open (above RLIMIT_NOFILE): 999 was, in the model's fd table, once
# earlier tests in the same process had left that many objects (a guest_memfd of another VM: EINVAL).
CLOSED_FD = resource.getrlimit(resource.RLIMIT_NOFILE)[0] + 64


@pytest.mark.parametrize("call, err", [
    (lambda vm, g: vm.set_user_memory_region2(2, GMEM, 0x4000_0000, M2, 0, g, P), errno.EEXIST),   # file overlap (7.2)
    (lambda vm, g: vm.set_user_memory_region2(2, GMEM, 0x1000, M2, 0, g, 2 * M2), errno.EEXIST),   # GPA overlap
    (lambda vm, g: vm.set_user_memory_region2(2, GMEM, 0x4000_0000, M2, 0, CLOSED_FD, 2 * M2), errno.EBADF),
    (lambda vm, g: vm.set_user_memory_region2(1, 0, 0, M2, 0), errno.EINVAL),        # clear GUEST_MEMFD
    (lambda vm, g: vm.set_user_memory_region2(2, GMEM, 1 << 52, M2, 0, g, 2 * M2), errno.EINVAL),  # beyond max GFN
    (lambda vm, g: vm.set_user_memory_region2(7, 0, 0, 0), errno.EINVAL),            # delete missing
    (lambda vm, g: vm.set_memory_attributes(0, M2, 1), errno.EINVAL),                # unsupported attribute
    (lambda vm, g: g.fallocate(1, 4 * M2, P), errno.EINVAL),                         # allocate past EOF
], ids=["file-overlap", "gpa-overlap", "ebadf", "clear-gmem-flag", "max-gfn", "delete-missing",
        "attribute", "allocate-past-eof"])
def test_failing_calls_change_nothing(sw_vm, call, err):
    """Spec 2.3/2.4/2.2: each call fails with its errno, and the VM is as it was (STYLE 11)."""
    g = sw_vm.create_guest_memfd(4 * M2)
    sw_vm.set_user_memory_region2(1, GMEM, 0, M2, 0, g, 0)
    sw_vm.set_memory_attributes(P, P, PRIVATE)
    before = sw_vm._snapshot()
    raises(err, call, sw_vm, g)
    assert sw_vm._snapshot() == before
    sw_vm._check_invariants()


def test_enable_cap_exit_hypercall_mask(sw_vm):
    sw_vm.enable_cap(Cap.EXIT_HYPERCALL, 0x1000)
    assert sw_vm._exit_hypercall_mask == 0x1000
    raises(errno.EINVAL, sw_vm.enable_cap, Cap.EXIT_HYPERCALL, 0x1001)
    assert sw_vm._exit_hypercall_mask == 0x1000


def test_stats_include_each_open_vcpus_counters(sw_vm):
    """A vCPU adds its mapping counters to the VM's stats() while it is open, and only then."""
    assert not any(k.startswith("vcpu") for k in sw_vm.stats())
    v = sw_vm.create_vcpu(0)
    st = sw_vm.stats()
    assert {k: st[k] for k in st if k.startswith("vcpu")} == {
        "vcpu0_mappings_4k": 0, "vcpu0_mappings_2m": 0, "vcpu0_mappings_1g": 0, "vcpu0_io_sites": 0}
    v.close()
    assert not any(k.startswith("vcpu") for k in sw_vm.stats())


def test_hwpoison_sigbus_in_host_mapping_until_punched(model_system):
    """Host mmap access to a hwpoisoned page SIGBUSes; punching the page recovers it (spec 6.5)."""
    vm = model_system.create_vm(0)
    g = vm.create_guest_memfd(4 * P, 3)
    m = g.mmap()
    m.write(0, b"x")
    g.inject_hwpoison(P)
    assert touch(m, P) == "SIGBUS" and touch(m, 0) == ord("x")
    m2 = g.mmap()  # new mappings see the poison too
    assert touch(m2, P) == "SIGBUS"
    g.punch_hole(P, P)
    assert touch(m, P) == 0 and touch(m2, P, 5) == 5
    raises(errno.EINVAL, g.inject_hwpoison, 4 * P)
    m.close(), m2.close(), g.close()


def test_vcpu_holds_the_vm_until_it_closes(model_system):
    """Spec 3.5: a vCPU holds one VM reference (kvm_get_kvm), dropped at close; the VM goes
    when its fd, its vCPUs and its guest_memfds are all closed."""
    vm = model_system.create_vm(0)
    v0, v1 = vm.create_vcpu(0), vm.create_vcpu(1)
    g = vm.create_guest_memfd(P)
    assert vm.stats()["guest_memfds"] == 1
    vm.close()
    v0.close()
    g.close()
    assert not vm._dead
    v1.close()
    assert vm._dead


def test_vm_error_messages_name_the_rule(model_system):
    vm, other = model_system.create_vm(SW), model_system.create_vm(SW)
    g = other.create_guest_memfd(M2)
    cases = [
        (lambda: vm.set_user_memory_region2(1, GMEM, 0, M2, 0, g, 0), "another vm"),
        (lambda: vm.set_memory_attributes(0, P, PRIVATE, 1), "flags"),
        (lambda: vm.set_memory_attributes(1 << 64, P, PRIVATE), "address"),
        (lambda: vm.set_user_memory_region2(1, GMEM, 0, M2, 0, 1 << 32, 0), "guest_memfd"),
        (lambda: vm.set_user_memory_region2(1 << 16, 0, 0, M2, 0), "address space"),
    ]
    for call, word in cases:
        with pytest.raises(OSError) as info:
            call()
        assert word in str(info.value).split(": ", 1)[1].lower(), info.value
    g.close()
    vm.close()
    other.close()
