"""x86 vCPU state beyond the registers on /dev/kvm: CPUID, MSRs, MP state, TSC frequency,
FPU, XSAVE, XCRs, LAPIC, vcpu events and debug registers.

``VcpuState`` is mixed into ``vcpu.Vcpu``; each method is one vCPU ioctl, with the struct
converted here and nowhere else. Variable-length structs (kvm_cpuid2, kvm_msrs) are built
as a header followed by their entries, as the kernel reads them. Fixed structs whose fields
mirror a ``types`` dataclass field for field (kvm_fpu, kvm_debugregs, kvm_vcpu_events) go
through ``struct_to_value`` / ``value_to_struct``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
from typing import TYPE_CHECKING, Any, Iterable

from .. import uapi
from ..encoding import encode_unsigned, msr_entries, msr_indices
from ..errors import oserror
from ..structcodec import check_bytes, encode_field, struct_to_value, value_to_struct
from ..types import CpuidEntry, DebugRegs, DirtyGfn, Fpu, LapicState, VcpuEvents, Xcr, Xsave
from ._ioctl import int_arg, ioctl, ioctl_u32
from .stats import StatsFd

_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def cpuid_buffer(nent: int) -> ctypes.Structure:
    """A kvm_cpuid2 header followed by room for ``nent`` entries."""
    class _Cpuid(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", uapi.kvm_cpuid_entry2 * nent)]
    return _Cpuid(nent=nent)


def cpuid_entries(buf: ctypes.Structure) -> tuple[CpuidEntry, ...]:
    return tuple(CpuidEntry(*[getattr(e, n) for n in _CPUID_FIELDS]) for e in buf.entries[:buf.nent])


def read_cpuid(fd: int, request: int, name: str) -> tuple[CpuidEntry, ...]:
    """A kvm_cpuid2-returning ioctl, growing the buffer while the kernel says E2BIG."""
    nent = 64
    while True:
        buf = cpuid_buffer(nent)
        try:
            ioctl(fd, request, name, buf, f"nent={nent}")
            return cpuid_entries(buf)
        except OSError as exc:
            if exc.errno != errno.E2BIG or nent >= 4096:
                raise
            nent *= 2


def _msrs_buffer(n: int) -> ctypes.Structure:
    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("entries", uapi.kvm_msr_entry * n)]
    return _Msrs(nmsrs=n)


def read_msr_list(fd: int, request: int, name: str) -> tuple[int, ...]:
    """KVM_GET_MSR_INDEX_LIST-style ioctl: ask for the count (E2BIG), then for the list."""
    n = 0
    while True:
        class _List(ctypes.Structure):
            _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * n)]
        buf = _List(nmsrs=n)
        try:
            ioctl(fd, request, name, buf, f"nmsrs={n}")
            return tuple(buf.indices[:buf.nmsrs])
        except OSError as exc:
            if exc.errno != errno.E2BIG or buf.nmsrs <= n:
                raise
            n = buf.nmsrs


class VcpuState:
    """CPUID, MSR, MP-state and TSC ioctls of a KVM vCPU (mixed into ``vcpu.Vcpu``)."""

    if TYPE_CHECKING:  # provided by vcpu.Vcpu / FdObject
        vm: Any
        vcpu_id: int
        _ring: mmap.mmap | None
        _ring_next: int

        def _check(self) -> int: ...

    def get_cpuid2(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_CPUID2 (api.rst 4.63): the vCPU's CPUID entries. :raises OSError: EBADF if closed."""
        return read_cpuid(self._check(), uapi.KVM_GET_CPUID2, "KVM_GET_CPUID2")

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        """KVM_SET_CPUID2 (api.rst 4.20).

        :raises OSError: EBADF if closed; E2BIG more than 256 entries; EINVAL a changed table
            after KVM_RUN or inconsistent entries.
        """
        fd = self._check()
        table = list(entries)
        for e in table:
            if not isinstance(e, CpuidEntry):
                raise TypeError(f"set_cpuid2 takes CpuidEntry values, not {type(e).__name__}")
        buf = cpuid_buffer(len(table))
        for dst, src in zip(buf.entries, table):
            for n in _CPUID_FIELDS:
                setattr(dst, n, encode_unsigned(getattr(src, n), 32, n))
        ioctl(fd, uapi.KVM_SET_CPUID2, "KVM_SET_CPUID2", buf, f"nent={len(table)}")

    def get_msrs(self, indices: Iterable[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS (api.rst 4.18): (index, value) up to the first MSR KVM refuses.

        :raises OSError: EBADF if closed.
        """
        fd = self._check()
        idx = msr_indices(indices)
        buf = _msrs_buffer(len(idx))
        for e, i in zip(buf.entries, idx):
            e.index = i
        n = ioctl(fd, uapi.KVM_GET_MSRS, "KVM_GET_MSRS", buf, f"nmsrs={len(idx)}")
        return [(e.index, e.data) for e in buf.entries[:n]]

    def set_msrs(self, entries: Iterable[tuple[int, int]]) -> int:
        """KVM_SET_MSRS (api.rst 4.19): returns how many MSRs were set (it stops at the first refusal).

        :raises TypeError: an entry that is not an (index, value) pair.
        :raises OSError: EBADF if closed.
        """
        fd = self._check()
        pairs = msr_entries(entries)
        buf = _msrs_buffer(len(pairs))
        for e, (i, v) in zip(buf.entries, pairs):
            e.index, e.data = i, v
        return ioctl(fd, uapi.KVM_SET_MSRS, "KVM_SET_MSRS", buf, f"nmsrs={len(pairs)}")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (api.rst 4.38). :raises OSError: EBADF if closed."""
        s = uapi.kvm_mp_state()
        ioctl(self._check(), uapi.KVM_GET_MP_STATE, "KVM_GET_MP_STATE", s)
        return s.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE (api.rst 4.39). :raises OSError: EBADF if closed; EINVAL unknown state."""
        fd = self._check()
        s = uapi.kvm_mp_state(encode_unsigned(mp_state, 32, "mp_state"))
        ioctl(fd, uapi.KVM_SET_MP_STATE, "KVM_SET_MP_STATE", s, f"mp_state={mp_state}")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the vCPU (api.rst 4.56).

        :raises OSError: EBADF if closed; errno 2**32 - khz for a rate set within 4095 of
            2**32 (the kernel returns the rate as an int: -errno).
        """
        return ioctl_u32(self._check(), uapi.KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ on the vCPU (api.rst 4.55). :raises OSError: EBADF if closed; EINVAL."""
        fd = self._check()
        ioctl(fd, uapi.KVM_SET_TSC_KHZ, "KVM_SET_TSC_KHZ", int_arg(khz, "khz"), f"khz={khz}")

    # --- FPU, XSAVE, XCRs ---------------------------------------------------------------------

    def get_fpu(self) -> Fpu:
        """KVM_GET_FPU (api.rst 4.22): x87 and SSE state. :raises OSError: EBADF if closed."""
        s = uapi.kvm_fpu()
        ioctl(self._check(), uapi.KVM_GET_FPU, "KVM_GET_FPU", s)
        return struct_to_value(Fpu, s)

    def set_fpu(self, fpu: Fpu) -> None:
        """KVM_SET_FPU (api.rst 4.23).

        :raises TypeError: not an ``Fpu``, or a field of the wrong type.
        :raises OSError: EBADF if closed; EINVAL for a value that does not fit its field.
        """
        if not isinstance(fpu, Fpu):
            raise TypeError(f"set_fpu takes an Fpu, not {type(fpu).__name__}")
        fd = self._check()
        ioctl(fd, uapi.KVM_SET_FPU, "KVM_SET_FPU", value_to_struct(fpu, uapi.kvm_fpu(), "fpu"))

    def get_xsave(self) -> Xsave:
        """KVM_GET_XSAVE (api.rst 4.42): the first 4096 bytes of the XSAVE area.

        :raises OSError: EBADF if closed; ENOTTY/EINVAL where KVM_CAP_XSAVE is 0.
        """
        s = uapi.kvm_xsave()
        ioctl(self._check(), uapi.KVM_GET_XSAVE, "KVM_GET_XSAVE", s)
        return Xsave(bytes(s))

    def get_xsave2(self) -> Xsave:
        """KVM_GET_XSAVE2 (api.rst 4.136): the whole XSAVE area, KVM_CAP_XSAVE2 (VM fd) bytes.

        :raises OSError: EBADF if closed; ENOTTY without KVM_CAP_XSAVE2.
        """
        fd = self._check()
        size = max(self.vm.check_extension(uapi.Cap.XSAVE2), ctypes.sizeof(uapi.kvm_xsave))
        buf = (ctypes.c_uint8 * size)()
        ioctl(fd, uapi.KVM_GET_XSAVE2, "KVM_GET_XSAVE2", buf, f"size={size}")
        return Xsave(bytes(buf))

    def set_xsave(self, xsave: Xsave) -> None:
        """KVM_SET_XSAVE (api.rst 4.43): load an XSAVE area (4096 bytes, or KVM_CAP_XSAVE2 bytes).

        :raises TypeError: not an ``Xsave`` or ``region`` not bytes.
        :raises OSError: EBADF if closed; EINVAL for a region shorter than 4096 bytes or
            longer than KVM_CAP_XSAVE2, or a state the kernel refuses (XSTATE_BV outside the
            guest's XCR0 support, MXCSR reserved bits).
        """
        if not isinstance(xsave, Xsave) or not isinstance(xsave.region, (bytes, bytearray)):
            raise TypeError(f"set_xsave takes an Xsave with bytes, not {type(xsave).__name__}")
        fd = self._check()
        size = max(self.vm.check_extension(uapi.Cap.XSAVE2), ctypes.sizeof(uapi.kvm_xsave))
        if not ctypes.sizeof(uapi.kvm_xsave) <= len(xsave.region) <= size:
            raise oserror(errno.EINVAL, f"xsave region is {len(xsave.region)} bytes; the kernel reads "
                                        f"{ctypes.sizeof(uapi.kvm_xsave)}..{size}")
        buf = (ctypes.c_uint8 * size).from_buffer_copy(bytes(xsave.region).ljust(size, b"\0"))
        ioctl(fd, uapi.KVM_SET_XSAVE, "KVM_SET_XSAVE", buf, f"size={len(xsave.region)}")

    def get_xcrs(self) -> tuple[Xcr, ...]:
        """KVM_GET_XCRS (api.rst 4.44): the extended control registers (XCR0 only on x86).

        :raises OSError: EBADF if closed; EINVAL without XSAVE on the host.
        """
        s = uapi.kvm_xcrs()
        ioctl(self._check(), uapi.KVM_GET_XCRS, "KVM_GET_XCRS", s)
        return tuple(Xcr(x.xcr, x.value) for x in s.xcrs[:min(s.nr_xcrs, uapi.KVM_MAX_XCRS)])

    def set_xcrs(self, xcrs: Iterable[Xcr], flags: int = 0) -> None:
        """KVM_SET_XCRS (api.rst 4.45): the first entry for XCR0 is set; other XCRs are ignored.

        :raises TypeError: an entry that is not an ``Xcr``.
        :raises OSError: EBADF if closed; then in the kernel's order EINVAL for more than
            KVM_MAX_XCRS (16) entries or ``flags`` != 0; EINVAL for an XCR0 value the guest
            cannot have (x87 bit clear, AVX without SSE, bits beyond the guest's CPUID leaf 0xD).
        """
        table = list(xcrs)
        for x in table:
            if not isinstance(x, Xcr):
                raise TypeError(f"set_xcrs takes Xcr values, not {type(x).__name__}")
        fd = self._check()
        s = uapi.kvm_xcrs()
        s.nr_xcrs = encode_unsigned(len(table), 32, "nr_xcrs")
        s.flags = encode_field(flags, 32, "flags")
        if len(table) > uapi.KVM_MAX_XCRS:  # the array holds 16: the kernel's EINVAL, said here
            raise oserror(errno.EINVAL, f"{len(table)} XCRs > KVM_MAX_XCRS ({uapi.KVM_MAX_XCRS})")
        for dst, x in zip(s.xcrs, table):
            dst.xcr, dst.value = encode_field(x.xcr, 32, "xcr"), encode_field(x.value, 64, "value")
        ioctl(fd, uapi.KVM_SET_XCRS, "KVM_SET_XCRS", s, f"nr_xcrs={len(table)}, flags={s.flags:#x}")

    # --- LAPIC, events, debug registers -------------------------------------------------------

    def get_lapic(self) -> LapicState:
        """KVM_GET_LAPIC (api.rst 4.57): the local APIC register page.

        :raises OSError: EBADF if closed; EINVAL without an in-kernel irqchip (KVM_CREATE_IRQCHIP).
        """
        s = uapi.kvm_lapic_state()
        ioctl(self._check(), uapi.KVM_GET_LAPIC, "KVM_GET_LAPIC", s)
        return LapicState(bytes(s))

    def set_lapic(self, lapic: LapicState) -> None:
        """KVM_SET_LAPIC (api.rst 4.58).

        :raises TypeError: not a ``LapicState`` with bytes.
        :raises OSError: EBADF if closed; EINVAL for a page that is not 1024 bytes; EINVAL
            without an in-kernel irqchip (measured); EINVAL for an APIC ID the kernel refuses.
        """
        if not isinstance(lapic, LapicState) or not isinstance(lapic.regs, (bytes, bytearray)):
            raise TypeError(f"set_lapic takes a LapicState with bytes, not {type(lapic).__name__}")
        fd = self._check()
        check_bytes(lapic.regs, uapi.KVM_APIC_REG_SIZE, "regs")
        s = uapi.kvm_lapic_state.from_buffer_copy(bytes(lapic.regs))
        ioctl(fd, uapi.KVM_SET_LAPIC, "KVM_SET_LAPIC", s)

    def get_vcpu_events(self) -> VcpuEvents:
        """KVM_GET_VCPU_EVENTS (api.rst 4.31): pending/injected exception, interrupt, NMI, SMI.

        :raises OSError: EBADF if closed.
        """
        s = uapi.kvm_vcpu_events()
        ioctl(self._check(), uapi.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", s)
        return struct_to_value(VcpuEvents, s)

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS (api.rst 4.32); ``flags`` says which optional parts are valid.

        :raises TypeError: not a ``VcpuEvents`` or a field of the wrong type.
        :raises OSError: EBADF if closed; EINVAL for flags outside KVM_VCPUEVENT_VALID_*,
            PAYLOAD/TRIPLE_FAULT without their capability, an exception both pending and
            injected, an exception vector > 31, SMM fields without SMM support.
        """
        if not isinstance(events, VcpuEvents):
            raise TypeError(f"set_vcpu_events takes VcpuEvents, not {type(events).__name__}")
        fd = self._check()
        s = value_to_struct(events, uapi.kvm_vcpu_events(), "events")
        ioctl(fd, uapi.KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", s, f"flags={s.flags:#x}")

    def get_debugregs(self) -> DebugRegs:
        """KVM_GET_DEBUGREGS (api.rst 4.33): DR0-3, DR6, DR7. :raises OSError: EBADF if closed."""
        s = uapi.kvm_debugregs()
        ioctl(self._check(), uapi.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", s)
        return struct_to_value(DebugRegs, s)

    def set_debugregs(self, debugregs: DebugRegs) -> None:
        """KVM_SET_DEBUGREGS (api.rst 4.34).

        :raises TypeError: not a ``DebugRegs`` or a field of the wrong type.
        :raises OSError: EBADF if closed; EINVAL for flags != 0 or DR6/DR7 with bits above 31.
        """
        if not isinstance(debugregs, DebugRegs):
            raise TypeError(f"set_debugregs takes DebugRegs, not {type(debugregs).__name__}")
        fd = self._check()
        s = value_to_struct(debugregs, uapi.kvm_debugregs(), "debugregs")
        ioctl(fd, uapi.KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", s)

    def get_stats_fd(self) -> StatsFd:
        """KVM_GET_STATS_FD on the vCPU (api.rst 4.134): the vCPU's binary statistics.

        :raises OSError: EBADF if closed; ENOTTY before Linux 5.14.
        """
        fd = ioctl(self._check(), uapi.KVM_GET_STATS_FD, "KVM_GET_STATS_FD")
        return StatsFd(fd, f"vCPU {self.vcpu_id}")

    # --- dirty ring ---------------------------------------------------------------------------

    def collect_dirty_ring(self) -> tuple[DirtyGfn, ...]:
        """Harvest this vCPU's dirty ring (api.rst 8.29, KVM_CAP_DIRTY_LOG_RING): the entries
        the kernel published (KVM_DIRTY_GFN_F_DIRTY) since the last call, each then marked
        KVM_DIRTY_GFN_F_RESET so the next ``Vm.reset_dirty_rings()`` re-protects its page.

        The ring (``Vm.dirty_ring_bytes``, set by enable_cap before the vCPU was created) is
        mapped at page KVM_DIRTY_LOG_PAGE_OFFSET of the vCPU fd on first use. x86 stores are
        ordered, so the flag store after reading an entry is the release the ABI asks for.

        :raises OSError: EBADF if closed; EINVAL if the VM has no dirty ring.
        """
        fd = self._check()
        ring = getattr(self, "_ring", None)
        if ring is None:
            size = self.vm.dirty_ring_bytes
            if not size:
                raise oserror(errno.EINVAL, "the VM has no dirty ring (enable KVM_CAP_DIRTY_LOG_RING first)")
            try:
                ring = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                 offset=uapi.KVM_DIRTY_LOG_PAGE_OFFSET * uapi.PAGE_SIZE)
            except OSError as exc:
                raise oserror(exc.errno or errno.EIO, f"mmap of the dirty ring of vCPU {self.vcpu_id}") from None
            self._ring, self._ring_next = ring, 0
        entries = len(ring) // _GFN.size
        out = []
        while True:
            at = (self._ring_next % entries) * _GFN.size
            flags, slot, offset = _GFN.unpack_from(ring, at)
            if not flags & uapi.DirtyGfnFlag.DIRTY:
                break
            out.append(DirtyGfn(slot=slot, offset=offset))
            _U32.pack_into(ring, at, int(uapi.DirtyGfnFlag.RESET))
            self._ring_next += 1
        return tuple(out)

    def _release_dirty_ring(self) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            self._ring = None
            ring.close()


_GFN = struct.Struct("<IIQ")  # struct kvm_dirty_gfn: flags, slot, offset
_U32 = struct.Struct("<I")
assert _GFN.size == ctypes.sizeof(uapi.kvm_dirty_gfn)
