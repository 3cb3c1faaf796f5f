"""kvm-ioctls parity, vCPU side, on both backends: KVM_{GET,SET}_FPU, KVM_{GET,SET}_XSAVE,
KVM_GET_XSAVE2, KVM_{GET,SET}_XCRS, KVM_{GET,SET}_LAPIC, KVM_{GET,SET}_VCPU_EVENTS,
KVM_{GET,SET}_DEBUGREGS. Expected values are the kernel's (arch/x86/kvm/x86.c, measured on
this host's /dev/kvm where noted)."""

from __future__ import annotations

import errno

import pytest

from guestmem.types import DebugRegs, ExceptionEvent, Fpu, LapicState, NmiEvent, VcpuEvents, Xcr, Xsave
from guestmem.uapi import VcpuEventValid

XSTATE_BV = slice(512, 520)


def _errno(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args, **kwargs)
    return exc.value.errno


@pytest.fixture
def vcpu(system):
    with system.create_vm() as vm:
        v = vm.create_vcpu(0)
        yield v
        v.close()


def test_fpu_reset_state_and_round_trip(vcpu) -> None:
    fpu = vcpu.get_fpu()
    assert fpu.fcw == 0x37F and fpu.fsw == 0 and fpu.ftwx == 0
    # kvm_arch_vcpu_ioctl_get_fpu never copies MXCSR: it reads as 0 (measured on the host).
    assert fpu.mxcsr == 0
    new = fpu.replace(fcw=0x27F, fsw=0x100, last_ip=0x1234, xmm=tuple(bytes([i]) * 16 for i in range(16)),
                      fpr=tuple(bytes([0x80 + i]) * 10 + bytes(6) for i in range(8)))
    vcpu.set_fpu(new)
    assert vcpu.get_fpu() == new


def test_fpu_wrong_types_and_widths(vcpu) -> None:
    with pytest.raises(TypeError):
        vcpu.set_fpu((0x37F,))
    with pytest.raises(TypeError):
        vcpu.set_fpu(Fpu(fcw="0x37f"))
    with pytest.raises(TypeError):
        vcpu.set_fpu(Fpu(xmm=(0,) * 16))
    assert _errno(vcpu.set_fpu, Fpu(fcw=1 << 16)) == errno.EINVAL
    assert _errno(vcpu.set_fpu, Fpu(xmm=(bytes(15),) * 16)) == errno.EINVAL


def test_xsave_shows_init_state_for_components_xstate_bv_does_not_mark(vcpu) -> None:
    """KVM_SET_FPU writes the legacy area but not XSTATE_BV, so KVM_GET_XSAVE still reports
    the x87/SSE init state (copy_xstate_to_uabi_buf); KVM_SET_XSAVE with the bits set makes
    the state visible to both views."""
    x = vcpu.get_xsave()
    assert len(x.region) == 4096 and x.xstate_bv == 0
    assert x.region[0:2] == (0x37F).to_bytes(2, "little")
    assert x.region[24:28] == (0x1F80).to_bytes(4, "little")  # MXCSR reset value
    vcpu.set_fpu(vcpu.get_fpu().replace(fcw=0x27F, xmm=(b"\x11" * 16,) * 16))
    x = vcpu.get_xsave()
    assert x.region[0:2] == (0x37F).to_bytes(2, "little") and x.region[160:176] == bytes(16)
    region = bytearray(x.region)
    region[0:2] = (0x7F).to_bytes(2, "little")
    region[160:176] = b"\x22" * 16
    region[24:28] = (0x1F00).to_bytes(4, "little")
    region[XSTATE_BV] = (3).to_bytes(8, "little")
    vcpu.set_xsave(Xsave(bytes(region)))
    x = vcpu.get_xsave()
    assert x.xstate_bv == 3 and x.region[0:2] == (0x7F).to_bytes(2, "little")
    assert x.region[160:176] == b"\x22" * 16 and x.region[24:28] == (0x1F00).to_bytes(4, "little")
    fpu = vcpu.get_fpu()
    assert fpu.fcw == 0x7F and fpu.xmm[0] == b"\x22" * 16 and fpu.xmm[1] == bytes(16)  # the SSE component came whole from the region
    assert vcpu.get_xsave2().region[:4096] == x.region


def test_set_xsave_refuses_unsupported_features_and_reserved_mxcsr(vcpu) -> None:
    region = bytearray(vcpu.get_xsave().region)
    region[XSTATE_BV] = (1 << 62).to_bytes(8, "little")
    assert _errno(vcpu.set_xsave, Xsave(bytes(region))) == errno.EINVAL
    region[XSTATE_BV] = (2).to_bytes(8, "little")
    region[24:28] = (1 << 31).to_bytes(4, "little")  # MXCSR bit 31 is reserved everywhere
    assert _errno(vcpu.set_xsave, Xsave(bytes(region))) == errno.EINVAL
    assert _errno(vcpu.set_xsave, Xsave(bytes(100))) == errno.EINVAL
    with pytest.raises(TypeError):
        vcpu.set_xsave(bytes(4096))


def test_xcr0_starts_as_x87_and_takes_only_valid_values(vcpu) -> None:
    assert vcpu.get_xcrs() == (Xcr(0, 1),)
    vcpu.set_xcrs([Xcr(0, 3)])
    assert vcpu.get_xcrs() == (Xcr(0, 3),)
    for bad in (0, 2, 5):  # no x87; SSE alone; AVX without SSE
        assert _errno(vcpu.set_xcrs, [Xcr(0, bad)]) == errno.EINVAL
    assert _errno(vcpu.set_xcrs, [Xcr(0, 1)], flags=1) == errno.EINVAL
    assert _errno(vcpu.set_xcrs, [Xcr(0, 1)] * 17) == errno.EINVAL
    vcpu.set_xcrs([Xcr(1, 0xFF), Xcr(0, 1)])  # only XCR0 exists: other XCRs are skipped
    assert vcpu.get_xcrs() == (Xcr(0, 1),)
    assert vcpu.get_xcrs() == (Xcr(0, 1),)
    with pytest.raises(TypeError):
        vcpu.set_xcrs([(0, 1)])


def test_debugregs_reset_round_trip_and_checks(vcpu) -> None:
    assert vcpu.get_debugregs() == DebugRegs(db=(0, 0, 0, 0), dr6=0xFFFF0FF0, dr7=0x400, flags=0)
    new = DebugRegs(db=(0x1000, 0x2000, 0x3000, 0x4000), dr6=0xFFFF0FF0, dr7=0x401)
    vcpu.set_debugregs(new)
    assert vcpu.get_debugregs() == new
    for bad in (DebugRegs(flags=1), DebugRegs(dr6=1 << 32), DebugRegs(dr7=1 << 32)):
        assert _errno(vcpu.set_debugregs, bad) == errno.EINVAL
    assert vcpu.get_debugregs() == new
    with pytest.raises(TypeError):
        vcpu.set_debugregs(DebugRegs(db=("1", 0, 0, 0)))


def test_vcpu_events_reset_round_trip_and_checks(vcpu) -> None:
    ev = vcpu.get_vcpu_events()
    valid = VcpuEventValid.NMI_PENDING | VcpuEventValid.SHADOW | VcpuEventValid.SMM
    assert ev == VcpuEvents(flags=int(valid))
    vcpu.set_vcpu_events(ev.replace(nmi=NmiEvent(pending=1), flags=int(VcpuEventValid.NMI_PENDING)))
    assert vcpu.get_vcpu_events().nmi.pending == 1
    vcpu.set_vcpu_events(ev.replace(exception=ExceptionEvent(injected=1, nr=6)))
    assert vcpu.get_vcpu_events().exception == ExceptionEvent(injected=1, nr=6)
    # Without VALID_PAYLOAD a pending exception is dropped before the vector check.
    vcpu.set_vcpu_events(ev.replace(exception=ExceptionEvent(pending=1, nr=40)))
    assert vcpu.get_vcpu_events().exception.pending == 0
    assert _errno(vcpu.set_vcpu_events, ev.replace(flags=0x40)) == errno.EINVAL
    assert _errno(vcpu.set_vcpu_events, ev.replace(flags=int(VcpuEventValid.PAYLOAD))) == errno.EINVAL
    assert _errno(vcpu.set_vcpu_events, ev.replace(flags=int(VcpuEventValid.TRIPLE_FAULT))) == errno.EINVAL
    for nr in (2, 32):  # NMI and beyond the exception vectors
        assert _errno(vcpu.set_vcpu_events, ev.replace(exception=ExceptionEvent(injected=1, nr=nr))) == errno.EINVAL
    with pytest.raises(TypeError):
        vcpu.set_vcpu_events(ev.replace(sipi_vector="0"))


def test_lapic_needs_an_irqchip(vcpu) -> None:
    assert _errno(vcpu.get_lapic) == errno.EINVAL
    assert _errno(vcpu.set_lapic, LapicState(bytes(1024))) == errno.EINVAL


def test_lapic_reset_values_and_round_trip(system) -> None:
    with system.create_vm() as vm:
        vm.create_irqchip()
        bsp, ap = vm.create_vcpu(0), vm.create_vcpu(1)
        a, b = bsp.get_lapic(), ap.get_lapic()
        assert len(a.regs) == 1024
        assert a.register(0x20) == 0 and b.register(0x20) == 1 << 24  # APIC ID
        assert a.register(0x30) & 0xFF == 0x14  # version: integrated APIC
        assert a.register(0xF0) == 0xFF and a.register(0xE0) == 0xFFFFFFFF  # SVR, DFR
        assert a.register(0x350) == 0x700 and b.register(0x350) == 0x10000  # LINT0: ExtINT on the BSP
        regs = bytearray(b.regs)
        regs[0x80:0x84] = (0x20).to_bytes(4, "little")  # TPR
        ap.set_lapic(LapicState(bytes(regs)))
        assert ap.get_lapic().register(0x80) == 0x20
        assert _errno(ap.set_lapic, LapicState(bytes(10))) == errno.EINVAL
        far = vm.create_vcpu(257)
        assert far.get_lapic().register(0x20) == 1 << 24  # the xAPIC ID register holds the id's low byte
        for v in (bsp, ap, far):
            v.close()


CLOSED_CALLS = {
    "get_fpu": (), "set_fpu": (Fpu(),), "get_xsave": (), "get_xsave2": (), "set_xsave": (Xsave(bytes(4096)),),
    "get_xcrs": (), "set_xcrs": ([Xcr(0, 1)],), "get_lapic": (), "set_lapic": (LapicState(bytes(1024)),),
    "get_vcpu_events": (), "set_vcpu_events": (VcpuEvents(),), "get_debugregs": (),
    "set_debugregs": (DebugRegs(),), "get_stats_fd": (), "collect_dirty_ring": (),
}


@pytest.mark.parametrize("method", sorted(CLOSED_CALLS))
def test_closed_vcpu_state_methods_fail_with_ebadf(system, method) -> None:
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.close()
        assert _errno(getattr(vcpu, method), *CLOSED_CALLS[method]) == errno.EBADF
