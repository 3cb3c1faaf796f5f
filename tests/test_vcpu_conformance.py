"""vCPU ioctls behave alike on both backends: creation, reset state, register checks, completions.

Each test runs on the kernel (this host's /dev/kvm) and on the model; the expected values come
from the kernel (KVM's vCPU reset, kvm_vm_ioctl_create_vcpu, kvm_arch_vcpu_ioctl_set_sregs).
"""

from __future__ import annotations

import dataclasses
import errno

import pytest

from guestmem import guest
from guestmem.types import HltExit, IoExit, MmioExit
from guestmem.uapi import GuestMemfdFlag, MemFlag

RAM_SIZE = 0x200000
SHARED = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
MMIO_GPA = 0x4000_0000  # no memslot there
PORT = 0x11


@pytest.fixture
def vm(system):
    vm = system.create_vm()
    vm.test_objects = []
    yield vm
    for obj in reversed(vm.test_objects):
        obj.close()
    vm.close()


def boot(vm, code: str, **kwargs):
    gmem = vm.create_guest_memfd(RAM_SIZE, SHARED)
    ram = gmem.mmap()
    vm.set_user_memory_region2(0, MemFlag.GUEST_MEMFD, 0, RAM_SIZE, userspace_addr=ram.address, guest_memfd=gmem)
    image = guest.long_mode_guest(code, identity_map=[(MMIO_GPA, RAM_SIZE)], **kwargs)
    guest.load(image, {0: ram})
    vcpu = vm.create_vcpu(0)
    vm.test_objects += [gmem, ram, vcpu]
    guest.setup_vcpu(vcpu, image)
    return vcpu


# --- completing exits (issue 11 item 4) ----------------------------------------------------------


def test_complete_io_none_after_an_out(vm):
    vcpu = boot(vm, f"mov al, 3\nout {PORT}, al\nhlt")
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit) and exit_.data == b"\x03"
    vcpu.complete_io(None)
    assert isinstance(vcpu.run(), HltExit)


def test_complete_mmio_none_after_a_write(vm):
    vcpu = boot(vm, f"mov rbx, {MMIO_GPA:#x}\nmov byte ptr [rbx], 7\nhlt")
    exit_ = vcpu.run()
    assert isinstance(exit_, MmioExit) and exit_.is_write and exit_.data == b"\x07"
    vcpu.complete_mmio(None)
    assert isinstance(vcpu.run(), HltExit)


def test_completions_need_data_after_a_read(vm):
    vcpu = boot(vm, f"in al, {PORT}\nmov rbx, {MMIO_GPA:#x}\nmov al, [rbx]\nhlt")
    assert isinstance(vcpu.run(), IoExit)
    with pytest.raises(TypeError):
        vcpu.complete_io(None)
    vcpu.complete_io(b"\x01")
    exit_ = vcpu.run()
    assert isinstance(exit_, MmioExit) and not exit_.is_write
    with pytest.raises(TypeError):
        vcpu.complete_mmio(None)
    vcpu.complete_mmio(b"\x02")
    assert isinstance(vcpu.run(), HltExit)
    assert vcpu.get_regs().rax & 0xFF == 2


def test_completion_none_without_matching_exit_is_einval(vm):
    vcpu = boot(vm, f"out {PORT}, al\nhlt")
    assert isinstance(vcpu.run(), IoExit)
    with pytest.raises(OSError) as exc:
        vcpu.complete_mmio(None)
    assert exc.value.errno == errno.EINVAL


# --- creation (issue 11 item 3) -----------------------------------------------------------------


@pytest.mark.parametrize("vcpu_id", [-1, 4096, 5000, 2**32, 2**40])
def test_create_vcpu_refuses_ids_from_kvm_max_vcpu_ids(system, vcpu_id):
    with system.create_vm() as vm:
        with pytest.raises(OSError) as exc:
            vm.create_vcpu(vcpu_id)
        assert exc.value.errno == errno.EINVAL
        vm.create_vcpu(4095).close()  # the last id KVM_CAP_MAX_VCPU_ID allows


def test_duplicate_vcpu_id_is_eexist_even_after_close(system):
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(3)
        with pytest.raises(OSError) as exc:
            vm.create_vcpu(3)
        assert exc.value.errno == errno.EEXIST
        vcpu.close()  # the vCPU lives until its VM is destroyed
        with pytest.raises(OSError) as exc:
            vm.create_vcpu(3)
        assert exc.value.errno == errno.EEXIST
        vm.create_vcpu(4).close()


def test_vcpu_count_limit_comes_before_the_duplicate_check(system):
    """KVM_CAP_MAX_VCPUS vCPUs exist: one more is EINVAL, even for an id in use (EEXIST
    would be checked only after the count)."""
    limit = system.check_extension(66)  # KVM_CAP_MAX_VCPUS
    with system.create_vm() as vm:
        vcpus = [vm.create_vcpu(i) for i in range(limit)]
        try:
            for vcpu_id in (limit, 0):
                with pytest.raises(OSError) as exc:
                    vm.create_vcpu(vcpu_id)
                assert exc.value.errno == errno.EINVAL, vcpu_id
        finally:
            for vcpu in vcpus:
                vcpu.close()


# --- reset state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpu_id", [0, 1])
def test_new_vcpu_is_at_the_reset_vector(system, vcpu_id):
    with system.create_vm() as vm:
        with vm.create_vcpu(vcpu_id) as vcpu:
            r, s = vcpu.get_regs(), vcpu.get_sregs()
    assert (r.rip, r.rflags, r.rdx) == (0xFFF0, 0x2, 0x600)
    assert (s.cs.selector, s.cs.base, s.cs.limit) == (0xF000, 0xFFFF_0000, 0xFFFF)
    assert (s.cr0, s.cr4, s.efer) == (0x6000_0010, 0, 0)
    assert s.apic_base == 0xFEE0_0800 | (0x100 if vcpu_id == 0 else 0)  # BSP flag on vCPU 0 only


def test_new_vcpu_state_equals_kvm_field_by_field(kvm_system, model_system):
    """Every field KVM_GET_REGS and KVM_GET_SREGS report for fresh vCPUs 0 and 1."""
    seen = {}
    for name, system in (("kvm", kvm_system), ("model", model_system)):
        with system.create_vm() as vm:
            for vcpu_id in (0, 1):
                with vm.create_vcpu(vcpu_id) as vcpu:
                    seen[name, vcpu_id] = (vcpu.get_regs(), vcpu.get_sregs())
    for vcpu_id in (0, 1):
        (kr, ks), (mr, ms) = seen["kvm", vcpu_id], seen["model", vcpu_id]
        assert dataclasses.asdict(mr) == dataclasses.asdict(kr)
        assert dataclasses.asdict(ms) == dataclasses.asdict(ks)


# --- KVM_SET_REGS / KVM_SET_SREGS checks ---------------------------------------------------------


@pytest.fixture
def vcpu(vm):
    vcpu = vm.create_vcpu(0)
    vm.test_objects.append(vcpu)
    return vcpu


@pytest.mark.parametrize("field", ["rax", "r15", "rip", "rflags"])
def test_set_regs_with_a_value_beyond_u64_is_einval(vcpu, field):
    before = vcpu.get_regs()
    with pytest.raises(OSError) as exc:
        vcpu.set_regs(before.replace(**{field: 2**64}))
    assert exc.value.errno == errno.EINVAL
    assert vcpu.get_regs() == before


def test_set_regs_keeps_rflags_bit_1_set(vcpu):
    vcpu.set_regs(vcpu.get_regs().replace(rflags=0, rax=-1))
    r = vcpu.get_regs()
    assert (r.rflags, r.rax) == (0x2, 2**64 - 1)


PE, NW, CD, PG = 1 << 0, 1 << 29, 1 << 30, 1 << 31
PAE, LME, LMA = 1 << 5, 1 << 8, 1 << 10


def _long_mode(s, **changes):
    return s.replace(**{"cr0": s.cr0 | PE | PG, "cr4": PAE, "efer": LME | LMA, **changes})


INVALID_SREGS = {
    "PG without PE": lambda s: s.replace(cr0=s.cr0 | PG),
    "CR0 bit 32": lambda s: s.replace(cr0=s.cr0 | 1 << 32),
    "CR0 bit 63": lambda s: s.replace(cr0=s.cr0 | 1 << 63),
    "NW without CD": lambda s: s.replace(cr0=(s.cr0 & ~CD) | NW),
    "LME and PG without PAE": lambda s: _long_mode(s, cr4=0),
    "LME and PG without LMA": lambda s: _long_mode(s, efer=LME),
    "LMA without PG": lambda s: s.replace(cr0=s.cr0 | PE, cr4=PAE, efer=LME | LMA),
    "LMA alone": lambda s: s.replace(efer=LMA),
    "CS.L in real mode": lambda s: s.replace(cs=s.cs.replace(l=1)),
    "CS.L in protected mode": lambda s: s.replace(cr0=s.cr0 | PE, cs=s.cs.replace(l=1)),
    "long mode CR3 beyond MAXPHYADDR": lambda s: _long_mode(s, cr3=1 << 52),
    "CR4 reserved bit 15": lambda s: s.replace(cr4=1 << 15),
    "CR4.VMXE": lambda s: s.replace(cr4=1 << 13),
    "CR4.LA57": lambda s: s.replace(cr4=1 << 12),
    "CR4 bit 63": lambda s: s.replace(cr4=1 << 63),
    "APIC base reserved bit 0": lambda s: s.replace(apic_base=s.apic_base | 1),
    "APIC base reserved bit 9": lambda s: s.replace(apic_base=s.apic_base | 1 << 9),
    "APIC base bit 63": lambda s: s.replace(apic_base=s.apic_base | 1 << 63),
    "x2APIC without xAPIC enabled": lambda s: s.replace(apic_base=(s.apic_base & ~(1 << 11)) | 1 << 10),
    "selector beyond u16": lambda s: s.replace(ds=s.ds.replace(selector=1 << 16)),
    "cr3 beyond u64": lambda s: s.replace(cr3=2**64),
}


@pytest.mark.parametrize("case", sorted(INVALID_SREGS))
def test_set_sregs_refuses_what_kvm_refuses(vcpu, case):
    before = vcpu.get_sregs()
    with pytest.raises(OSError) as exc:
        vcpu.set_sregs(INVALID_SREGS[case](before))
    assert exc.value.errno == errno.EINVAL
    assert vcpu.get_sregs() == before


VALID_SREGS = {
    "protected mode": lambda s: s.replace(cr0=s.cr0 | PE),
    "long mode": lambda s: _long_mode(s),
    "long mode with 64-bit CS": lambda s: _long_mode(s, cs=s.cs.replace(l=1)),
    "EFER.LME without PG": lambda s: s.replace(efer=LME),
    "CD and NW clear": lambda s: s.replace(cr0=s.cr0 & ~(CD | NW)),
    "CR4 OSFXSR|OSXMMEXCPT|PAE|PSE": lambda s: s.replace(cr4=1 << 9 | 1 << 10 | PAE | 1 << 4),
    "CR4 SMEP|SMAP": lambda s: s.replace(cr4=1 << 20 | 1 << 21),
    "APIC disabled": lambda s: s.replace(apic_base=s.apic_base & ~(1 << 11)),
    "x2APIC": lambda s: s.replace(apic_base=s.apic_base | 1 << 10),
}


@pytest.mark.kvm_pvm_differs("kvm_pvm accepts CR0.PG outside long mode but reads it back clear (measured)")
def test_set_sregs_keeps_32_bit_paging(vcpu):
    want = vcpu.get_sregs()
    want = want.replace(cr0=want.cr0 | PE | PG)
    vcpu.set_sregs(want)
    assert vcpu.get_sregs().cr0 == want.cr0


@pytest.mark.parametrize("case", sorted(VALID_SREGS))
def test_set_sregs_accepts_what_kvm_accepts(vcpu, case):
    want = VALID_SREGS[case](vcpu.get_sregs())
    vcpu.set_sregs(want)
    got = vcpu.get_sregs()
    assert (got.cr0, got.cr4, got.efer, got.apic_base, got.cs.l) == (want.cr0, want.cr4, want.efer, want.apic_base, want.cs.l)
