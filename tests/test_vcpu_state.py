"""VM and vCPU set-up ioctls KVM programs issue (the selftests' vm_create/vcpu_add path),
on both backends: KVM_CREATE_IRQCHIP, KVM_SET_NR_MMU_PAGES, KVM_GET_TSC_KHZ,
KVM_ENABLE_CAP(DISABLE_QUIRKS2), KVM_{GET,SET}_CPUID2, KVM_{GET,SET}_MSRS,
KVM_{GET,SET}_MP_STATE and the system's CPUID and MSR lists."""

from __future__ import annotations

import errno

import pytest

from guestmem.types import CpuidEntry
from guestmem.uapi import Cap, MpState

IA32_TSC, IA32_APIC_BASE, NO_SUCH_MSR = 0x10, 0x1B, 0x4B564DFF


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_create_irqchip_twice_is_eexist(system) -> None:
    with system.create_vm() as vm:
        vm.create_irqchip()
        assert _errno(vm.create_irqchip) == errno.EEXIST


def test_create_irqchip_after_create_vcpu_is_einval(system) -> None:
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert _errno(vm.create_irqchip) == errno.EINVAL
        vcpu.close()


def test_set_nr_mmu_pages_below_the_minimum_is_einval(system) -> None:
    with system.create_vm() as vm:
        vm.set_nr_mmu_pages(64)
        assert _errno(vm.set_nr_mmu_pages, 63) == errno.EINVAL


def test_disable_quirks2_takes_only_the_cap_s_quirks(system) -> None:
    with system.create_vm() as vm:
        valid = vm.check_extension(Cap.DISABLE_QUIRKS2)
        assert valid
        vm.enable_cap(Cap.DISABLE_QUIRKS2, valid)
        top = 1 << 31
        assert not valid & top
        assert _errno(vm.enable_cap, Cap.DISABLE_QUIRKS2, top) == errno.EINVAL


def test_tsc_khz_of_vm_and_vcpu_agree(system) -> None:
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vm.get_tsc_khz() > 0
        assert vcpu.get_tsc_khz() == vm.get_tsc_khz()
        vcpu.close()


def test_mp_state_of_the_bsp_is_runnable_and_unknown_states_are_einval(system) -> None:
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.get_mp_state() == MpState.RUNNABLE
        assert _errno(vcpu.set_mp_state, 7) == errno.EINVAL
        vcpu.set_mp_state(int(MpState.RUNNABLE))
        with pytest.raises(TypeError):
            vcpu.set_mp_state("0")
        vcpu.close()


def test_supported_cpuid_is_what_set_cpuid2_then_get_cpuid2_returns(system) -> None:
    supported = system.get_supported_cpuid()
    leaves = {e.function for e in supported}
    assert 0 in leaves and 0x8000_0000 in leaves
    assert all(isinstance(e, CpuidEntry) for e in supported)
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(supported)
        got = vcpu.get_cpuid2()
        assert [(e.function, e.index) for e in got] == [(e.function, e.index) for e in supported]
        with pytest.raises(TypeError):
            vcpu.set_cpuid2([(0, 0, 0, 0, 0, 0, 0)])
        vcpu.close()


def test_msrs_stop_at_the_first_unknown_index(system) -> None:
    assert IA32_APIC_BASE in system.get_msr_index_list() or IA32_TSC in system.get_msr_index_list()
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        got = vcpu.get_msrs([IA32_APIC_BASE, NO_SUCH_MSR, IA32_TSC])
        assert [i for i, _ in got] == [IA32_APIC_BASE]
        assert got[0][1] & 0x100  # BSP flag of vCPU 0
        assert vcpu.set_msrs([(IA32_APIC_BASE, got[0][1]), (NO_SUCH_MSR, 0)]) == 1
        vcpu.close()


def test_model_cpuid_describes_the_emulated_cpu(model_system) -> None:
    """Model only: the supported CPUID is Unicorn's CPU, whose physical address width (40
    bits) is what the model's guest-physical space has (its TDX-like shared bit is bit 39)."""
    from guestmem.model import fault

    leaf = {e.function: e for e in model_system.get_supported_cpuid()}
    phys_bits = leaf[0x8000_0008].eax & 0xFF
    assert 1 << (phys_bits - 1) == fault.TDX_SHARED_BIT


def test_osxsave_is_not_supported_but_follows_cr4_in_get_cpuid2(system) -> None:
    """CPUID.1:ECX.OSXSAVE mirrors CR4.OSXSAVE: KVM_GET_SUPPORTED_CPUID never has it, and a
    vCPU's KVM_GET_CPUID2 shows it once CR4.OSXSAVE is set (kvm_update_cpuid_runtime)."""
    osxsave, cr4_osxsave = 1 << 27, 1 << 18
    supported = system.get_supported_cpuid()
    leaf1 = next(e for e in supported if e.function == 1)
    assert not leaf1.ecx & osxsave
    if not leaf1.ecx & (1 << 26):
        pytest.skip("this CPU has no XSAVE")
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(supported)
        assert not next(e for e in vcpu.get_cpuid2() if e.function == 1).ecx & osxsave
        sregs = vcpu.get_sregs()
        vcpu.set_sregs(sregs.replace(cr4=sregs.cr4 | cr4_osxsave))
        assert next(e for e in vcpu.get_cpuid2() if e.function == 1).ecx & osxsave
        vcpu.close()
