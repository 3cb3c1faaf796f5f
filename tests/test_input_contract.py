"""One input contract on both backends (issue 10 item 5; README "Input contract").

Integers must be ints (bool included): floats, strings and bytes are TypeError naming the
argument, never converted. Ints too wide for their C field are EINVAL naming the argument, for
ioctls and file calls alike. Data is bytes-like. Wrong object kinds give TypeError or the
kernel's errno, the same on both backends.
"""

from __future__ import annotations

import dataclasses
import errno

import pytest

import guestmem
from guestmem.types import Regs, Segment, Sregs
from guestmem.uapi import Cap, GuestMemfdFlag, MemFlag

P = 4096
SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
NOT_INTS = [4096.0, 4096.7, "4096", b"4096", None]


@pytest.fixture
def vm(system):
    vm = system.create_vm()
    yield vm
    vm.close()


@pytest.fixture
def gmem(vm):
    g = vm.create_guest_memfd(16 * P, SHARED)
    yield g
    g.close()


def _calls(system, vm, gmem, bad):
    """(name of the bad argument, call) for every integer parameter of the public methods."""
    mapping = gmem.mmap()
    return mapping, [
        ("cap", lambda: system.check_extension(bad)),
        ("type", lambda: system.create_vm(bad)),
        ("cap", lambda: vm.check_extension(bad)),
        ("size", lambda: vm.create_guest_memfd(bad)),
        ("flags", lambda: vm.create_guest_memfd(P, bad)),
        ("slot", lambda: vm.set_user_memory_region2(bad, 0, 0, P, mapping.address)),
        ("flags", lambda: vm.set_user_memory_region2(1, bad, 0, P, mapping.address)),
        ("guest_phys_addr", lambda: vm.set_user_memory_region2(1, 0, bad, P, mapping.address)),
        ("memory_size", lambda: vm.set_user_memory_region2(1, 0, 0, bad, mapping.address)),
        ("userspace_addr", lambda: vm.set_user_memory_region2(1, 0, 0, P, bad)),
        ("guest_memfd_offset", lambda: vm.set_user_memory_region2(1, int(MemFlag.GUEST_MEMFD), 0, P,
                                                                  mapping.address, gmem, bad)),
        ("pad1", lambda: vm.set_user_memory_region2(1, 0, 0, P, mapping.address, pad1=bad)),
        ("slot", lambda: vm.set_user_memory_region(bad, 0, 0, P, mapping.address)),
        ("flags", lambda: vm.set_user_memory_region(1, bad, 0, P, mapping.address)),
        ("guest_phys_addr", lambda: vm.set_user_memory_region(1, 0, bad, P, mapping.address)),
        ("memory_size", lambda: vm.set_user_memory_region(1, 0, 0, bad, mapping.address)),
        ("userspace_addr", lambda: vm.set_user_memory_region(1, 0, 0, P, bad)),
        ("pad2", lambda: vm.set_user_memory_region2(1, 0, 0, P, mapping.address, pad2=[bad])),
        ("address", lambda: vm.set_memory_attributes(bad, P, 0)),
        ("size", lambda: vm.set_memory_attributes(0, bad, 0)),
        ("attributes", lambda: vm.set_memory_attributes(0, P, bad)),
        ("flags", lambda: vm.set_memory_attributes(0, P, 0, bad)),
        ("address", lambda: vm.get_memory_attributes(bad, P)),
        ("size", lambda: vm.get_memory_attributes(0, bad)),
        ("cap", lambda: vm.enable_cap(bad)),
        ("args", lambda: vm.enable_cap(Cap.EXIT_HYPERCALL, bad)),
        ("flags", lambda: vm.enable_cap(Cap.EXIT_HYPERCALL, 0, flags=bad)),
        ("nr_mmu_pages", lambda: vm.set_nr_mmu_pages(bad)),
        ("vcpu_id", lambda: vm.create_vcpu(bad)),
        ("mode", lambda: gmem.fallocate(bad, 0, P)),
        ("offset", lambda: gmem.allocate(bad, P)),
        ("len", lambda: gmem.punch_hole(0, bad)),
        ("offset", lambda: gmem.mmap(P, bad)),
        ("prot", lambda: gmem.mmap(P, 0, bad)),
        ("n", lambda: gmem.read(bad)),
        ("n", lambda: gmem.pread(bad, 0)),
        ("offset", lambda: gmem.pread(1, bad)),
        ("offset", lambda: gmem.pwrite(b"x", bad)),
        ("whence", lambda: gmem.lseek(0, bad)),
        ("offset", lambda: gmem.lseek(bad, 0)),
        ("length", lambda: gmem.truncate(bad)),
        ("offset", lambda: mapping.read(bad, 1)),
        ("size", lambda: mapping.fill(0, bad, 0)),
        ("byte", lambda: mapping.fill(0, 1, bad)),
    ]


@pytest.mark.parametrize("bad", NOT_INTS, ids=repr)
def test_integer_arguments_are_never_converted(system, vm, gmem, bad):
    """Observed: create_guest_memfd(4096.7), ("4096") and (b"4096") made 4096-byte files and
    kvm create_vm(0.5) made a type-0 VM."""
    mapping, calls = _calls(system, vm, gmem, bad)
    before = vm._snapshot() if system.backend == "model" else None
    for name, call in calls:
        with pytest.raises(TypeError, match=rf"^{name}\b"):  # the argument's own name, first
            call()
    if before is not None:
        assert vm._snapshot() == before
    mapping.close()


def test_bool_and_intenum_are_ints(vm):
    g = vm.create_guest_memfd(P, flags=False)
    assert g.size == P and vm.check_extension(True) == vm.check_extension(1)
    g.close()


@pytest.mark.parametrize("call, name", [
    (lambda g: g.read(2**64), "n"),
    (lambda g: g.pread(1, 2**64), "offset"),
    (lambda g: g.pread(1, -(2**63) - 1), "offset"),
    (lambda g: g.pwrite(b"x", 2**64), "offset"),
    (lambda g: g.lseek(2**64, 0), "offset"),
    (lambda g: g.lseek(0, 2**32), "whence"),
    (lambda g: g.truncate(2**64), "length"),
    (lambda g: g.fallocate(1, 2**64, P), "offset"),
], ids=["read", "pread-big", "pread-small", "pwrite", "lseek-offset", "lseek-whence", "truncate", "fallocate"])
def test_file_calls_with_ints_too_wide_are_einval(gmem, call, name):
    """Observed: kvm read/pread/pwrite/lseek/truncate raised OverflowError where the model gave OSError."""
    with pytest.raises(OSError) as info:
        call(gmem)
    assert info.value.errno == errno.EINVAL and name in str(info.value)


@pytest.mark.parametrize("call, name, bits", [
    (lambda vm, v: vm.set_user_memory_region2(v, 0, 0, P, 0), "slot", 32),
    (lambda vm, v: vm.set_user_memory_region2(1, v, 0, P, 0), "flags", 32),
    (lambda vm, v: vm.set_user_memory_region2(1, 0, v, P, 0), "guest_phys_addr", 64),
    (lambda vm, v: vm.set_user_memory_region2(1, 0, 0, v, 0), "memory_size", 64),
    (lambda vm, v: vm.set_user_memory_region2(1, 0, 0, P, 0, pad1=v), "pad1", 32),
    (lambda vm, v: vm.create_guest_memfd(P, v), "flags", 64),
    (lambda vm, v: vm.enable_cap(v), "cap", 32),
    (lambda vm, v: vm.enable_cap(Cap.EXIT_HYPERCALL, 0, flags=v), "flags", 32),
    (lambda vm, v: vm.set_nr_mmu_pages(v), "nr_mmu_pages", 64),
], ids=["slot", "memslot-flags", "gpa", "memory_size", "pad1", "gmem-flags", "cap", "cap-flags", "nr_mmu_pages"])
def test_vm_calls_refuse_ints_wider_than_their_c_field(vm, call, name, bits):
    """Each ioctl field has the width of its uapi struct member (kvm_userspace_memory_region2,
    kvm_create_guest_memfd, kvm_enable_cap; the unsigned long argument of KVM_SET_NR_MMU_PAGES):
    2**bits is EINVAL naming the field and its width before the ioctl, and 2**bits - 1 reaches
    the kernel's own rules (whatever they answer, it is not the width)."""
    with pytest.raises(OSError) as info:
        call(vm, 1 << bits)
    assert info.value.errno == errno.EINVAL and f"{name}=" in str(info.value) and f"u{bits}" in str(info.value)
    try:
        call(vm, (1 << bits) - 1)
    except OSError as exc:
        assert "does not fit" not in str(exc), exc


@pytest.mark.parametrize("call, err", [
    (lambda g: g.pread(1, -1), errno.EINVAL),   # ksys_pread64 checks pos < 0 before the file
    (lambda g: g.pread(-1, 0), errno.ESPIPE),   # count is a size_t: -1 wraps
    (lambda g: g.pwrite(b"x", -P), errno.EINVAL),
    (lambda g: g.pwrite(b"x", 2**64 - 1), errno.EINVAL),  # loff_t: these bits are -1
    (lambda g: g.lseek(0, 5), errno.EINVAL),    # whence > SEEK_MAX, before the file's llseek
    (lambda g: g.lseek(0, -1), errno.EINVAL),
    (lambda g: g.lseek(-1, 0), errno.ESPIPE),
    (lambda g: g.read(-1), errno.EINVAL),
    (lambda g: g.truncate(-1), errno.EINVAL),
], ids=["pread-neg-offset", "pread-neg-count", "pwrite-neg-offset", "pwrite-u64-max", "lseek-whence-5", "lseek-whence-neg",
        "lseek-neg-offset", "read-neg-count", "truncate-neg"])
def test_file_call_errnos_in_the_kernels_order(gmem, call, err):
    with pytest.raises(OSError) as info:
        call(gmem)
    assert info.value.errno == err


@pytest.mark.parametrize("data", ["abc", 3, None, [1]], ids=repr)
def test_data_arguments_are_bytes_like(gmem, data):
    for call in (lambda: gmem.write(data), lambda: gmem.pwrite(data, 0)):
        with pytest.raises(TypeError, match=r"^data\b"):
            call()


def test_guest_memfd_argument_kinds(system, vm, gmem):
    mapping = gmem.mmap()
    gmem_slot = (1, int(MemFlag.GUEST_MEMFD), 0, P, mapping.address)
    for bad in ("abc", 1.5, b"3"):
        with pytest.raises(TypeError, match="guest_memfd"):
            vm.set_user_memory_region2(*gmem_slot, bad)
    with pytest.raises(OSError) as info:
        vm.set_user_memory_region2(*gmem_slot, vm)  # a VM fd is not a guest_memfd
    assert info.value.errno == errno.EINVAL
    other = guestmem.open_system("model")
    other_gmem = other.create_vm().create_guest_memfd(P)
    with pytest.raises(OSError) as info:
        vm.set_user_memory_region2(*gmem_slot, other_gmem)  # another VM's (or backend's) file
    assert info.value.errno == errno.EINVAL
    other_gmem.close()
    other.close()
    mapping.close()


def test_register_arguments_are_regs_and_sregs(vm):
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    for call, name in [(lambda: vcpu.set_regs("x"), "regs"), (lambda: vcpu.set_regs(sregs), "regs"),
                       (lambda: vcpu.set_sregs(Regs()), "sregs"),
                       (lambda: vcpu.set_sregs(dataclasses.replace(sregs, cs=5)), "sregs.cs"),
                       (lambda: vcpu.set_sregs(dataclasses.replace(sregs, gdt=Segment())), "sregs.gdt"),
                       (lambda: vcpu.set_sregs(dataclasses.replace(sregs, interrupt_bitmap=7)), "interrupt_bitmap"),
                       (lambda: vcpu.set_regs(Regs(rax=1.5)), "rax")]:
        with pytest.raises(TypeError, match=name):
            call()
    assert vcpu.get_sregs() == sregs
    vcpu.close()


def test_sregs_type_is_checked_before_anything_else(vm):
    vcpu = vm.create_vcpu(0)
    with pytest.raises(TypeError):
        vcpu.set_sregs(Sregs(cs=None))  # type: ignore[arg-type]
    vcpu.close()


# --- model hygiene (issue 10 item 6, model part) --------------------------------------------------

def test_memslots_are_frozen_snapshots(model_system):
    """Observed: ``vm.memslots()[0].base_gfn = 0`` corrupted the VM."""
    vm = model_system.create_vm()
    g = vm.create_guest_memfd(4 * P)
    vm.set_user_memory_region2(1, int(MemFlag.GUEST_MEMFD), 0x10_0000, 4 * P, 0, g, 0)
    before = vm._snapshot()
    (slot,) = vm.memslots()
    assert (slot.slot, slot.guest_phys_addr, slot.memory_size) == (1, 0x10_0000, 4 * P)
    for field in ("slot", "guest_phys_addr", "memory_size"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(slot, field, 0)
    assert vm._snapshot() == before
    vm._check_invariants()
    g.close()
    vm.close()


# --- found by tests/test_fuzz_api.py ----------------------------------------------------------------

def test_pre_fault_memory_encodes_its_arguments_before_any_check(vm):
    """Fuzzer: the model formatted a float gpa into its message (ValueError) and checked TDP
    support before the u64 fields, where kvm refuses a too-wide gpa first (EINVAL)."""
    vcpu = vm.create_vcpu(0)
    with pytest.raises(TypeError, match="gpa"):
        vcpu.pre_fault_memory(0.0, -(2**100))
    with pytest.raises(OSError) as info:
        vcpu.pre_fault_memory(-(2**100), P)
    assert info.value.errno == errno.EINVAL and "gpa" in str(info.value)
    with pytest.raises(TypeError, match="flags"):
        vcpu.pre_fault_memory(0, P, "0")
    vcpu.close()


def test_get_memory_attributes_encodes_before_the_support_check(backend):
    """Fuzzer: on a kernel without memory attributes (this host; model profile "6.18-host") the
    model said ENOTTY for a float address, where kvm raises TypeError (arguments are encoded
    before any check)."""
    options = {"profile": "6.18-host"} if backend == "model" else {}
    with guestmem.open_system(backend, **options) as system:
        vm = system.create_vm()
        with pytest.raises(TypeError, match="address"):
            vm.get_memory_attributes(4096.7, 0.0)
        with pytest.raises(OSError) as info:
            vm.get_memory_attributes(2**64, P)
        assert info.value.errno == errno.EINVAL and "address" in str(info.value)
        vm.close()


@pytest.mark.parametrize("bits", [8, 32, 64])
def test_encoders_agree_with_twos_complement_at_the_width_boundaries(bits) -> None:
    """encode_unsigned/encode_signed return what a C field of ``bits`` holds, on and off their
    fast path for plain in-range ints (bools and IntEnums take the full path: same value)."""
    import enum

    from guestmem.encoding import encode_signed, encode_unsigned

    limit = 1 << bits

    def signed(v: int) -> int:
        v %= limit
        return v - limit if v >> (bits - 1) else v

    Big = enum.IntEnum("Big", {"TOP": limit - 1})
    edges = [0, 1, (limit >> 1) - 1, limit >> 1, limit - 1, -1, -(limit >> 1), True, Big.TOP]
    for v in edges:
        got_u, got_s = encode_unsigned(v, bits, "x"), encode_signed(v, bits, "x")
        assert (got_u, got_s) == (v % limit, signed(v)), v
        assert type(got_u) is int and type(got_s) is int
    for v in (limit, -(limit >> 1) - 1):
        for encode in (encode_unsigned, encode_signed):
            with pytest.raises(OSError) as exc:
                encode(v, bits, "x")
            assert exc.value.errno == errno.EINVAL and "x=" in str(exc.value)
    for v in (1.0, "1", None):
        for encode in (encode_unsigned, encode_signed):
            with pytest.raises(TypeError, match="x must be an int"):
                encode(v, bits, "x")
