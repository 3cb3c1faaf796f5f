"""x86 vCPU state beyond the registers: CPUID, MSRs, MP state, TSC frequency.

Data model
----------
``VcpuState`` is a mixin of ``vcpu.Vcpu``; each vCPU owns one copy of:

* ``_cpuid``: the entries userspace set with KVM_SET_CPUID2 (empty until then), as
  ``types.CpuidEntry``; KVM_GET_CPUID2 shows them with the CR4-mirroring bits (OSXSAVE,
  OSPKE) taken from the current CR4, as kvm_update_cpuid_runtime keeps them. Once the vCPU has run, only an identical table may be set again
  (kvm_set_cpuid's post-run rule, 5.16+). The guest's CPUID instruction answers from the
  emulated CPU itself (Unicorn), whose leaves are what KVM_GET_SUPPORTED_CPUID reports.
* ``_msrs``: index -> value for the MSRs of ``cpuid.MSRS``; any other index is refused,
  which ends KVM_GET_MSRS/KVM_SET_MSRS at that entry, as kvm_get_msr/kvm_set_msr do.
* ``_mp_state``: KVM_MP_STATE_*; vCPU 0 (the BSP) starts RUNNABLE, others UNINITIALIZED
  (with an in-kernel irqchip; RUNNABLE without). ``_sipi_pending``: a SIPI set with
  KVM_SET_MP_STATE, delivered at the next KVM_GET_MP_STATE (apic->pending_events).
* ``_tsc_khz``: the guest TSC frequency, the host's by default (Unicorn reads the host TSC).
* ``_fpstate``: the guest FPU buffer in the uabi XSAVE layout (4096 bytes, the kernel's
  guest_fpu.fpstate): KVM_GET/SET_FPU read and write its legacy area raw; KVM_GET_XSAVE
  shows init values for the x87, SSE and AVX components whose XSTATE_BV bit is clear, as
  copy_xstate_to_uabi_buf does; KVM_SET_XSAVE copies only the components it marks.
* ``_xcr0``, ``_debugregs``, ``_events`` (a ``types.VcpuEvents``) and ``_lapic`` (the 1 KiB
  register page, only with an in-kernel irqchip).

The model's guest code runs on Unicorn's own FPU, debug and interrupt logic, which this
state does not drive: it is what userspace set (or the reset state), kept so a VMM can
save, restore and migrate it, as with KVM. Injected events and LAPIC registers are
recorded, not delivered (the model emulates no LAPIC; see ``Vm.create_irqchip``).

All of it is guarded by the vCPU's ioctl lock, like vcpu->mutex.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
from typing import TYPE_CHECKING, Any, Iterable

from ..encoding import encode_unsigned, msr_entries, msr_indices

from ..errors import oserror
from ..types import CpuidEntry, DebugRegs, Fpu, LapicState, VcpuEvents, Xcr, Xsave
from ..uapi import KVM_APIC_REG_SIZE, KVM_MAX_XCRS, MpState, VcpuEventValid
from . import cpuid as _cpuid

if TYPE_CHECKING:
    from .stats import StatsFd
    from .unicorn_cpu import Engine

KVM_MAX_CPUID_ENTRIES = 256
MAX_IO_MSRS = 256  # msr_io refuses this many or more
TSC_TOLERANCE_PPM = 250  # kvm.tsc_tolerance_ppm's default
_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
# KVM_SET_MP_STATE's states beyond RUNNABLE, each needing an in-kernel LAPIC.
_LAPIC_MP_STATES = (1, 2, 3, 4, 9)  # UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED, AP_RESET_HOLD
XSAVE_SIZE = 4096
MXCSR_DEFAULT, MXCSR_MASK = 0x1F80, 0xFFFF  # Unicorn's FXSAVE mask: every MXCSR bit but DAZ's neighbours
XFEATURE_FP, XFEATURE_SSE, XFEATURE_YMM = 1, 2, 4
# Byte ranges of each component in the uabi XSAVE buffer (legacy area, then AVX at 576).
_FP_RANGES = ((0, 24), (32, 160))
_SSE_RANGES = ((160, 416),)
_YMM_RANGES = ((576, 832),)
_MXCSR = (24, 32)  # MXCSR and MXCSR_MASK: present when SSE or YMM is
_init = bytearray(XSAVE_SIZE)
_init[0:2] = (0x37F).to_bytes(2, "little")  # FCW after FNINIT
_init[24:32] = MXCSR_DEFAULT.to_bytes(4, "little") + MXCSR_MASK.to_bytes(4, "little")
_INIT_FPSTATE = bytes(_init)
# kvm_vcpu_ioctl_x86_get_vcpu_events without exception payloads or triple-fault events enabled.
_EVENT_FLAGS = int(VcpuEventValid.NMI_PENDING | VcpuEventValid.SHADOW | VcpuEventValid.SMM)
_EVENT_VALID = int(sum(VcpuEventValid))
NMI_VECTOR = 2
# The xAPIC registers KVM's reset writes (kvm_lapic_reset), measured on the host: byte
# offset -> value; the ID register (0x20) holds vcpu_id << 24 and LINT0 (0x350) of the BSP
# is ExtINT (0x700), of the others masked.
_LAPIC_RESET = {0x30: 0x50014, 0xE0: 0xFFFFFFFF, 0xF0: 0xFF, 0x320: 0x10000, 0x330: 0x10000,
                0x340: 0x10000, 0x360: 0x10000, 0x370: 0x10000}


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz (what Unicorn's RDTSC counts at), from sysfs or cpuinfo."""
    try:
        with open("/sys/devices/system/cpu/cpu0/tsc_freq_khz") as f:
            return int(f.read())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return 1_000_000


def _runtime_cpuid(e: CpuidEntry, cr4: int) -> CpuidEntry:
    """``e`` with the bits that mirror CR4 set from ``cr4`` (kvm_update_cpuid_runtime)."""
    for leaf, reg, bit, cr4_bit in _cpuid.RUNTIME_BITS:
        if e.function == leaf and (e.index == 0 or leaf == 0x1):
            value = getattr(e, reg) & ~(1 << bit) | ((cr4 >> cr4_bit) & 1) << bit
            e = dataclasses.replace(e, **{reg: value})
    return e


class VcpuState:
    """CPUID, MSR, MP-state and TSC ioctls of a model vCPU (mixed into ``vcpu.Vcpu``)."""

    if TYPE_CHECKING:  # provided by vcpu.Vcpu
        import threading

        vcpu_id: int
        _vm: Any
        _engine: Engine | None
        _ioctl_lock: threading.Lock

        def _check(self) -> int: ...
        def _stats(self) -> dict: ...

    def _init_state(self, vcpu_id: int) -> None:
        self._cpuid: tuple[CpuidEntry, ...] = ()
        self._msrs = dict(_cpuid.MSRS)
        if vcpu_id != 0:
            self._msrs[0x1B] &= ~0x100  # only the BSP has IA32_APIC_BASE.BSP
        # kvm_arch_vcpu_create: without an in-kernel irqchip every vCPU starts RUNNABLE (nothing
        # would send it INIT/SIPI); with one, only the BSP (measured on this host)
        bsp_only = getattr(self._vm, "_irqchip", False)
        self._mp_state = int(MpState.RUNNABLE if vcpu_id == 0 or not bsp_only else MpState.UNINITIALIZED)
        self._sipi_pending = False
        self._tsc_khz = host_tsc_khz()
        self._fpstate = bytearray(_INIT_FPSTATE)
        self._xcr0 = XFEATURE_FP
        self._debugregs = DebugRegs()
        self._events = VcpuEvents()
        page = bytearray(KVM_APIC_REG_SIZE)
        for off, value in {**_LAPIC_RESET, 0x20: (vcpu_id & 0xFF) << 24,  # the xAPIC ID is a u8
                           0x350: 0x700 if vcpu_id == 0 else 0x10000}.items():
            page[off:off + 4] = value.to_bytes(4, "little")
        self._lapic = bytes(page)

    def get_cpuid2(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_CPUID2 (api.rst 4.63): the entries set by KVM_SET_CPUID2.

        E2BIG for a too small buffer is decided where the struct is (the caller's nent).
        Errors: EBADF (closed).
        """
        self._check()
        with self._ioctl_lock:
            cr4 = self._read_sregs().cr4  # type: ignore[attr-defined]
            return tuple(_runtime_cpuid(e, cr4) for e in self._cpuid)

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        """KVM_SET_CPUID2 (api.rst 4.20): the CPUID table userspace chose for this vCPU.

        Errors, in order: EBADF (closed); TypeError an entry that is not a CpuidEntry, then
        (entry by entry) TypeError/EINVAL a field that is not an int of 32 bits; E2BIG more
        than 256 entries; EINVAL a different table after the vCPU has run (kvm_set_cpuid).
        Mirrors kvm_vcpu_ioctl_set_cpuid2.
        """
        self._check()
        table = tuple(entries)
        for e in table:
            if not isinstance(e, CpuidEntry):
                raise TypeError(f"set_cpuid2 takes CpuidEntry values, not {type(e).__name__}")
        table = tuple(CpuidEntry(*[encode_unsigned(getattr(e, n), 32, n) for n in _CPUID_FIELDS]) for e in table)
        if len(table) > KVM_MAX_CPUID_ENTRIES:
            raise oserror(errno.E2BIG, f"{len(table)} CPUID entries > {KVM_MAX_CPUID_ENTRIES}")
        with self._ioctl_lock:
            if self._engine is not None and table != self._cpuid:
                raise oserror(errno.EINVAL, "KVM_SET_CPUID2 after KVM_RUN must not change the table")
            self._cpuid = table

    def get_msrs(self, indices: Iterable[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS (api.rst 4.18): (index, value) for each index, up to the first unknown one.

        The kernel returns how many it read; that is ``len`` of the result. Errors, in order:
        EBADF; TypeError/EINVAL an index that is not an int of 32 bits; E2BIG 256 indices or
        more (msr_io's MAX_IO_MSRS).
        """
        self._check()
        indices = msr_indices(indices)
        if len(indices) >= MAX_IO_MSRS:
            raise oserror(errno.E2BIG, f"{len(indices)} MSRs: KVM_GET_MSRS takes fewer than {MAX_IO_MSRS}")
        out = []
        with self._ioctl_lock:
            for index in indices:
                if index not in self._msrs:
                    break
                out.append((index, self._msrs[index]))
        return out

    def set_msrs(self, entries: Iterable[tuple[int, int]]) -> int:
        """KVM_SET_MSRS (api.rst 4.19): write (index, value) pairs; returns how many were set.

        Stops at the first MSR the model does not hold (kvm_set_msr refuses it). Errors, in
        order: EBADF; TypeError an entry that is not an (index, value) pair, TypeError/EINVAL
        an index (u32) or value (u64) that does not fit; E2BIG 256 entries or more.
        """
        self._check()
        entries = msr_entries(entries)
        if len(entries) >= MAX_IO_MSRS:
            raise oserror(errno.E2BIG, f"{len(entries)} MSRs: KVM_SET_MSRS takes fewer than {MAX_IO_MSRS}")
        n = 0
        with self._ioctl_lock:
            for index, value in entries:
                if index not in self._msrs:
                    break
                self._msrs[index] = value
                n += 1
        return n

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (api.rst 4.38): the vCPU's KVM_MP_STATE_*.

        A SIPI left pending by KVM_SET_MP_STATE(SIPI_RECEIVED) is accepted first, as
        kvm_apic_accept_events does: the vCPU becomes RUNNABLE at ``sipi_vector``:0000
        (kvm_vcpu_deliver_sipi_vector). Errors: EBADF.
        """
        self._check()
        with self._ioctl_lock:
            sipi, self._sipi_pending = self._sipi_pending and self._mp_state == MpState.INIT_RECEIVED, False
            if sipi:
                self._mp_state = int(MpState.RUNNABLE)
            vector = self._events.sipi_vector & 0xFF
        if sipi:
            s = self.get_sregs()  # type: ignore[attr-defined]
            self.set_sregs(s.replace(cs=s.cs.replace(selector=vector << 8, base=vector << 12)))  # type: ignore[attr-defined]
            self.set_regs(self.get_regs().replace(rip=0))  # type: ignore[attr-defined]
        return self._mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE (api.rst 4.39).

        Errors, in order: EBADF; TypeError/EINVAL not an int of 32 bits; EINVAL a state x86
        does not have, or any state but RUNNABLE without an in-kernel irqchip (the others
        are UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED and AP_RESET_HOLD).
        SIPI_RECEIVED is kept as INIT_RECEIVED with the SIPI pending (``get_mp_state``).
        Mirrors kvm_arch_vcpu_ioctl_set_mpstate.
        """
        self._check()
        mp_state = encode_unsigned(mp_state, 32, "mp_state")
        if mp_state != MpState.RUNNABLE and (mp_state not in _LAPIC_MP_STATES or not self._vm._irqchip):
            raise oserror(errno.EINVAL, f"mp_state {mp_state} is not RUNNABLE or a state of an in-kernel LAPIC")
        with self._ioctl_lock:
            sipi = mp_state == MpState.SIPI_RECEIVED
            self._mp_state, self._sipi_pending = int(MpState.INIT_RECEIVED if sipi else mp_state), sipi

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the vCPU (api.rst 4.56): the guest TSC frequency.

        Errors: EBADF; errno 2**32 - khz for a rate within 4095 of 2**32: the kernel returns
        the u32 through the ioctl's int, so those rates read as -errno (measured).
        """
        self._check()
        khz = self._tsc_khz
        if khz > (1 << 32) - 4096:
            raise oserror((1 << 32) - khz, f"KVM_GET_TSC_KHZ: {khz} kHz comes back as -{(1 << 32) - khz}")
        return khz

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ on the vCPU (api.rst 4.55), as KVM without TSC scaling
        (KVM_CAP_TSC_CONTROL 0): 0 means the host rate; a rate within the tolerance
        (250 ppm) of the host's or above it is taken (above it KVM would catch the guest TSC
        up; the model's guest TSC runs at the host rate, Unicorn reads the host TSC).

        Errors, in order: EBADF; TypeError/EINVAL not an int of 32 bits; EINVAL a rate below
        the tolerance, which the kernel records anyway (kvm_set_tsc_khz sets virtual_tsc_khz
        before set_tsc_khz refuses it; KVM_GET_TSC_KHZ then reads it, measured).
        """
        self._check()
        khz = encode_unsigned(khz, 32, "khz") or host_tsc_khz()
        self._tsc_khz = khz
        if khz < host_tsc_khz() * (1_000_000 - TSC_TOLERANCE_PPM) // 1_000_000:
            raise oserror(errno.EINVAL, f"TSC frequency {khz} kHz is below the host's without TSC scaling")

    # --- FPU, XSAVE, XCRs ---------------------------------------------------------------------

    def get_fpu(self) -> Fpu:
        """KVM_GET_FPU (api.rst 4.22): the legacy area of the FPU buffer, raw.

        ``mxcsr`` is always 0: kvm_arch_vcpu_ioctl_get_fpu never copies it (measured on the
        host too). Errors: EBADF.
        """
        self._check()
        with self._ioctl_lock:
            b = bytes(self._fpstate[:416])
        u = int.from_bytes
        return Fpu(fpr=tuple(b[32 + 16 * i:48 + 16 * i] for i in range(8)), fcw=u(b[0:2], "little"),
                   fsw=u(b[2:4], "little"), ftwx=b[4], last_opcode=u(b[6:8], "little"),
                   last_ip=u(b[8:16], "little"), last_dp=u(b[16:24], "little"),
                   xmm=tuple(b[160 + 16 * i:176 + 16 * i] for i in range(16)), mxcsr=0)

    def set_fpu(self, fpu: Fpu) -> None:
        """KVM_SET_FPU (api.rst 4.23): write the legacy area (MXCSR is not copied, as in
        kvm_arch_vcpu_ioctl_set_fpu). Errors: TypeError; EBADF; EINVAL a field too wide."""
        if not isinstance(fpu, Fpu):
            raise TypeError(f"set_fpu takes an Fpu, not {type(fpu).__name__}")
        self._check()
        fpr = _regs(fpu.fpr, 8, "fpr")  # struct kvm_fpu's order
        parts = [(0, _int(fpu.fcw, 16, "fcw")), (2, _int(fpu.fsw, 16, "fsw")), (4, _int(fpu.ftwx, 8, "ftwx")),
                 (6, _int(fpu.last_opcode, 16, "last_opcode")), (8, _int(fpu.last_ip, 64, "last_ip")),
                 (16, _int(fpu.last_dp, 64, "last_dp"))]
        xmm = _regs(fpu.xmm, 16, "xmm")
        _int(fpu.mxcsr, 32, "mxcsr")
        with self._ioctl_lock:
            st = self._fpstate
            for off, (value, width) in parts:
                st[off:off + width] = value.to_bytes(width, "little")
            st[32:160], st[160:416] = fpr, xmm

    def _xsave(self) -> bytes:
        """The uabi XSAVE image: init values for components XSTATE_BV does not mark."""
        st = self._fpstate
        bv = int.from_bytes(st[512:520], "little")
        out = bytearray(st)
        for bit, ranges in ((XFEATURE_FP, _FP_RANGES), (XFEATURE_SSE, _SSE_RANGES), (XFEATURE_YMM, _YMM_RANGES)):
            if not bv & bit:
                for lo, hi in ranges:
                    out[lo:hi] = _INIT_FPSTATE[lo:hi]
        if not bv & (XFEATURE_SSE | XFEATURE_YMM):
            out[_MXCSR[0]:_MXCSR[1]] = _INIT_FPSTATE[_MXCSR[0]:_MXCSR[1]]
        return bytes(out)

    def get_xsave(self) -> Xsave:
        """KVM_GET_XSAVE (api.rst 4.42). Mirrors fpu_copy_guest_fpstate_to_uabi. Errors: EBADF."""
        self._check()
        with self._ioctl_lock:
            return Xsave(self._xsave())

    def get_xsave2(self) -> Xsave:
        """KVM_GET_XSAVE2 (api.rst 4.136): as KVM_GET_XSAVE; the model's area is 4096 bytes
        (KVM_CAP_XSAVE2). Errors: EBADF."""
        return self.get_xsave()

    def set_xsave(self, xsave: Xsave) -> None:
        """KVM_SET_XSAVE (api.rst 4.43): copy the components XSTATE_BV marks.

        Errors, in order: TypeError; EBADF; EINVAL a region that is not 4096 bytes; EINVAL
        XSTATE_BV outside the supported XCR0 (x87|SSE|AVX), a non-zero XCOMP_BV or reserved
        header bytes; EINVAL MXCSR reserved bits with SSE or AVX marked. Mirrors
        copy_uabi_to_xstate / validate_user_xstate_header.
        """
        if not isinstance(xsave, Xsave) or not isinstance(xsave.region, (bytes, bytearray)):
            raise TypeError(f"set_xsave takes an Xsave with bytes, not {type(xsave).__name__}")
        self._check()
        b = bytes(xsave.region)
        if len(b) != XSAVE_SIZE:
            raise oserror(errno.EINVAL, f"xsave region is {len(b)} bytes; the model's area is {XSAVE_SIZE}")
        bv, comp = int.from_bytes(b[512:520], "little"), int.from_bytes(b[520:528], "little")
        supported = _supported_xcr0()
        if bv & ~supported or comp or any(b[528:576]):
            raise oserror(errno.EINVAL, f"XSAVE header: XSTATE_BV {bv:#x} outside {supported:#x}, "
                                        f"XCOMP_BV {comp:#x} or reserved bytes set")
        mxcsr = int.from_bytes(b[24:28], "little")
        if bv & (XFEATURE_SSE | XFEATURE_YMM) and mxcsr & ~MXCSR_MASK:
            raise oserror(errno.EINVAL, f"MXCSR {mxcsr:#x} has reserved bits (mask {MXCSR_MASK:#x})")
        with self._ioctl_lock:
            st = self._fpstate
            for bit, ranges in ((XFEATURE_FP, _FP_RANGES), (XFEATURE_SSE, _SSE_RANGES), (XFEATURE_YMM, _YMM_RANGES)):
                if bv & bit:
                    for lo, hi in ranges:
                        st[lo:hi] = b[lo:hi]
            if bv & (XFEATURE_SSE | XFEATURE_YMM):
                st[24:28] = b[24:28]
            st[512:520] = bv.to_bytes(8, "little")

    def get_xcrs(self) -> tuple[Xcr, ...]:
        """KVM_GET_XCRS (api.rst 4.44): XCR0. Errors: EBADF."""
        self._check()
        with self._ioctl_lock:
            return (Xcr(0, self._xcr0),)

    def set_xcrs(self, xcrs: Iterable[Xcr], flags: int = 0) -> None:
        """KVM_SET_XCRS (api.rst 4.45): the first XCR0 entry is set, other XCRs ignored.

        Errors, in order: TypeError; EBADF; EINVAL more than 16 entries or flags != 0;
        EINVAL an XCR0 without x87, with AVX but not SSE, or outside the supported features.
        Mirrors kvm_vcpu_ioctl_x86_set_xcrs / __kvm_set_xcr.
        """
        table = list(xcrs)
        for x in table:
            if not isinstance(x, Xcr):
                raise TypeError(f"set_xcrs takes Xcr values, not {type(x).__name__}")
        self._check()
        flags = _int(flags, 32, "flags")[0]
        if len(table) > KVM_MAX_XCRS or flags:
            raise oserror(errno.EINVAL, f"{len(table)} XCRs (max {KVM_MAX_XCRS}) or flags {flags:#x} != 0")
        for x in table:
            xcr, value = _int(x.xcr, 32, "xcr")[0], _int(x.value, 64, "value")[0]
            if xcr != 0:
                continue
            supported = _supported_xcr0()
            if not value & XFEATURE_FP or (value & XFEATURE_YMM and not value & XFEATURE_SSE) or value & ~supported:
                raise oserror(errno.EINVAL, f"XCR0 {value:#x} is not a valid subset of {supported:#x}")
            with self._ioctl_lock:
                self._xcr0 = value
            break

    # --- LAPIC, events, debug registers -------------------------------------------------------

    def _check_lapic(self) -> None:
        if not self._vm._irqchip:  # type: ignore[attr-defined]
            raise oserror(errno.EINVAL, "no in-kernel LAPIC: KVM_CREATE_IRQCHIP first")

    def get_lapic(self) -> LapicState:
        """KVM_GET_LAPIC (api.rst 4.57): the register page, reset values until set.

        Errors: EBADF; EINVAL without an in-kernel irqchip (lapic_in_kernel).
        """
        self._check()
        self._check_lapic()
        with self._ioctl_lock:
            return LapicState(self._lapic)

    def set_lapic(self, lapic: LapicState) -> None:
        """KVM_SET_LAPIC (api.rst 4.58): store the register page (recorded, not emulated).

        Errors: TypeError; EBADF; EINVAL without an in-kernel irqchip; EINVAL a page that
        is not 1024 bytes.
        """
        if not isinstance(lapic, LapicState) or not isinstance(lapic.regs, (bytes, bytearray)):
            raise TypeError(f"set_lapic takes a LapicState with bytes, not {type(lapic).__name__}")
        self._check()
        self._check_lapic()
        if len(lapic.regs) != KVM_APIC_REG_SIZE:
            raise oserror(errno.EINVAL, f"regs is {len(lapic.regs)} bytes; the page is {KVM_APIC_REG_SIZE}")
        with self._ioctl_lock:
            self._lapic = bytes(lapic.regs)

    def get_vcpu_events(self) -> VcpuEvents:
        """KVM_GET_VCPU_EVENTS (api.rst 4.31). Mirrors kvm_vcpu_ioctl_x86_get_vcpu_events
        without exception payloads: a pending exception reads as injected; sipi_vector is 0.
        Errors: EBADF."""
        self._check()
        with self._ioctl_lock:
            e = self._events
        exc = e.exception
        exc = exc.__class__(injected=exc.injected | exc.pending, nr=exc.nr, has_error_code=exc.has_error_code,
                            pending=exc.pending, error_code=exc.error_code)
        return e.replace(exception=exc, sipi_vector=0, flags=_EVENT_FLAGS, interrupt=e.interrupt.__class__(
            injected=e.interrupt.injected if not e.interrupt.soft else 0, nr=e.interrupt.nr,
            shadow=e.interrupt.shadow), exception_has_payload=0, exception_payload=0)

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS (api.rst 4.32): recorded, not delivered (see the module docstring).

        Errors, in order: TypeError; EBADF; EINVAL flags outside KVM_VCPUEVENT_VALID_*;
        EINVAL VALID_PAYLOAD (KVM_CAP_EXCEPTION_PAYLOAD is never enabled on the model); an
        injected exception with vector > 31 or NMI; EINVAL VALID_SMM with SMM state on a
        profile without SMM; EINVAL VALID_TRIPLE_FAULT (KVM_CAP_X86_TRIPLE_FAULT_EVENT not
        enabled). Mirrors kvm_vcpu_ioctl_x86_set_vcpu_events (the kernel's own order).
        """
        if not isinstance(events, VcpuEvents):
            raise TypeError(f"set_vcpu_events takes VcpuEvents, not {type(events).__name__}")
        self._check()
        _check_fields(events, _EVENT_WIDTHS, "events")
        flags = events.flags
        if flags & ~_EVENT_VALID:
            raise oserror(errno.EINVAL, f"vcpu events flags {flags:#x} outside {_EVENT_VALID:#x}")
        if flags & VcpuEventValid.PAYLOAD:
            raise oserror(errno.EINVAL, "VALID_PAYLOAD without KVM_CAP_EXCEPTION_PAYLOAD enabled")
        exc = events.exception.__class__(injected=events.exception.injected, nr=events.exception.nr,
                                         has_error_code=events.exception.has_error_code, pending=0,
                                         error_code=events.exception.error_code)
        if exc.injected and (exc.nr > 31 or exc.nr == NMI_VECTOR):
            raise oserror(errno.EINVAL, f"exception vector {exc.nr} cannot be injected")
        smi, smm = events.smi, self._vm._profile.smm  # type: ignore[attr-defined]
        if flags & VcpuEventValid.SMM and not smm and (smi.smm or smi.pending or smi.smm_inside_nmi):
            raise oserror(errno.EINVAL, "SMM state on a vCPU without SMM")
        if flags & VcpuEventValid.TRIPLE_FAULT:
            raise oserror(errno.EINVAL, "VALID_TRIPLE_FAULT without KVM_CAP_X86_TRIPLE_FAULT_EVENT enabled")
        with self._ioctl_lock:
            old = self._events
            self._events = events.replace(
                exception=exc, exception_has_payload=0, flags=0,
                sipi_vector=events.sipi_vector if flags & VcpuEventValid.SIPI_VECTOR and self._vm._irqchip  # type: ignore[attr-defined]
                else old.sipi_vector,
                interrupt=events.interrupt if flags & VcpuEventValid.SHADOW
                else events.interrupt.__class__(events.interrupt.injected, events.interrupt.nr,
                                                events.interrupt.soft, old.interrupt.shadow),
                nmi=events.nmi if flags & VcpuEventValid.NMI_PENDING
                else events.nmi.__class__(events.nmi.injected, old.nmi.pending, events.nmi.masked),
                smi=smi if flags & VcpuEventValid.SMM else old.smi)

    def get_debugregs(self) -> DebugRegs:
        """KVM_GET_DEBUGREGS (api.rst 4.33). Errors: EBADF."""
        self._check()
        with self._ioctl_lock:
            return self._debugregs

    def set_debugregs(self, debugregs: DebugRegs) -> None:
        """KVM_SET_DEBUGREGS (api.rst 4.34).

        Errors, in order: TypeError; EBADF; EINVAL flags != 0; EINVAL DR6 or DR7 with bits
        above 31. Mirrors kvm_vcpu_ioctl_x86_set_debugregs.
        """
        if not isinstance(debugregs, DebugRegs):
            raise TypeError(f"set_debugregs takes DebugRegs, not {type(debugregs).__name__}")
        self._check()
        if not isinstance(debugregs.db, tuple):
            raise TypeError(f"db must be a tuple of 4 ints, not {type(debugregs.db).__name__}")
        if len(debugregs.db) != 4:
            raise oserror(errno.EINVAL, f"db has {len(debugregs.db)} registers; the struct holds 4")
        db = tuple(_int(v, 64, f"db[{i}]")[0] for i, v in enumerate(debugregs.db))
        dr6, dr7 = _int(debugregs.dr6, 64, "dr6")[0], _int(debugregs.dr7, 64, "dr7")[0]
        flags = _int(debugregs.flags, 64, "flags")[0]
        if flags:
            raise oserror(errno.EINVAL, f"debugregs flags {flags:#x} must be 0")
        if dr6 >> 32 or dr7 >> 32:
            raise oserror(errno.EINVAL, f"DR6 {dr6:#x} / DR7 {dr7:#x} have bits above 31")
        with self._ioctl_lock:
            self._debugregs = DebugRegs(db=db, dr6=dr6, dr7=dr7)  # type: ignore[arg-type]


    def get_stats_fd(self) -> "StatsFd":
        """KVM_GET_STATS_FD on the vCPU (api.rst 4.134): the model vCPU's counters (its
        mappings and IN/OUT sites; see ``model.stats``). Errors: EBADF."""
        from .stats import StatsFd

        self._check()
        return StatsFd(f"kvm-{os.getpid()}/vcpu-{self.vcpu_id}", self._stats)  # type: ignore[attr-defined]

    def collect_dirty_ring(self) -> tuple:
        """Harvest the vCPU's dirty ring: the model has none (see ``Vm.reset_dirty_rings``).
        Errors: EBADF; EINVAL no dirty ring."""
        self._check()
        raise oserror(errno.EINVAL, "the VM has no dirty ring (the model logs dirty pages in bitmaps only)")

# Bit widths of kvm_vcpu_events' fields (nested members: every field is a u8 but error_code).
_EVENT_WIDTHS = {"sipi_vector": 32, "flags": 32, "exception_payload": 64, "error_code": 32}


def _check_fields(value: object, widths: dict[str, int], name: str) -> None:
    """TypeError / EINVAL for any integer field of ``value`` (recursively) that is not an int
    of its struct field's width (``widths``, u8 otherwise)."""
    import dataclasses

    for f in dataclasses.fields(value):  # type: ignore[arg-type]
        v = getattr(value, f.name)
        if dataclasses.is_dataclass(f.default):  # a nested struct: its dataclass only
            if type(v) is not type(f.default):
                raise TypeError(f"{name}.{f.name} must be a {type(f.default).__name__}, not {type(v).__name__}")
            _check_fields(v, widths, f"{name}.{f.name}")
        else:
            _int(v, widths.get(f.name, 8), f"{name}.{f.name}")


def _int(value: object, bits: int, name: str) -> tuple[int, int]:
    """(value, byte width) of an integer field; TypeError for a non-int, EINVAL if too wide."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return encode_unsigned(value, bits, name), bits // 8


def _regs(values: object, n: int, name: str) -> bytes:
    """``n`` 16-byte registers as one byte string. Checked as the kvm backend fills the struct:
    TypeError not a tuple, EINVAL not ``n`` of them, then register by register TypeError not
    bytes, EINVAL not 16 bytes."""
    if not isinstance(values, tuple):
        raise TypeError(f"{name} must be a tuple of {n} registers, not {type(values).__name__}")
    if len(values) != n:
        raise oserror(errno.EINVAL, f"{name} has {len(values)} registers; the struct holds {n}")
    for i, v in enumerate(values):
        if not isinstance(v, (bytes, bytearray)):
            raise TypeError(f"{name}[{i}] must be bytes, not {type(v).__name__}")
        if len(v) != 16:
            raise oserror(errno.EINVAL, f"{name}[{i}] is {len(v)} bytes; the register is 16")
    return b"".join(bytes(v) for v in values)


@functools.lru_cache(maxsize=1)
def _supported_xcr0() -> int:
    """XCR0 bits the model's CPU supports: CPUID leaf 0xD subleaf 0 EAX (x87|SSE|AVX)."""
    for e in _cpuid.supported_cpuid():
        if e.function == 0xD and e.index == 0:
            return e.eax
    return XFEATURE_FP | XFEATURE_SSE

