"""x86 vCPU state beyond the registers on /dev/kvm: CPUID, MSRs, MP state, TSC frequency.

``VcpuState`` is mixed into ``vcpu.Vcpu``; each method is one vCPU ioctl, with the struct
converted here and nowhere else. Variable-length structs (kvm_cpuid2, kvm_msrs) are built
as a header followed by their entries, as the kernel reads them.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Iterable

from .. import uapi
from ..encoding import encode_unsigned
from ..types import CpuidEntry
from ._ioctl import int_arg, ioctl

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
        idx = list(indices)
        buf = _msrs_buffer(len(idx))
        for e, i in zip(buf.entries, idx):
            e.index = encode_unsigned(i, 32, "index")
        n = ioctl(fd, uapi.KVM_GET_MSRS, "KVM_GET_MSRS", buf, f"nmsrs={len(idx)}")
        return [(e.index, e.data) for e in buf.entries[:n]]

    def set_msrs(self, entries: Iterable[tuple[int, int]]) -> int:
        """KVM_SET_MSRS (api.rst 4.19): returns how many MSRs were set (it stops at the first refusal).

        :raises OSError: EBADF if closed.
        """
        fd = self._check()
        pairs = list(entries)
        buf = _msrs_buffer(len(pairs))
        for e, (i, v) in zip(buf.entries, pairs):
            e.index, e.data = encode_unsigned(i, 32, "index"), encode_unsigned(v, 64, "data")
        return ioctl(fd, uapi.KVM_SET_MSRS, "KVM_SET_MSRS", buf, f"nmsrs={len(pairs)}")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (api.rst 4.38). :raises OSError: EBADF if closed."""
        s = uapi.kvm_mp_state()
        ioctl(self._check(), uapi.KVM_GET_MP_STATE, "KVM_GET_MP_STATE", s)
        return s.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE (api.rst 4.39). :raises OSError: EBADF if closed; EINVAL unknown state."""
        if not isinstance(mp_state, int):
            raise TypeError(f"mp_state must be an int, not {type(mp_state).__name__}")
        s = uapi.kvm_mp_state(encode_unsigned(mp_state, 32, "mp_state"))
        ioctl(self._check(), uapi.KVM_SET_MP_STATE, "KVM_SET_MP_STATE", s, f"mp_state={mp_state}")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the vCPU (api.rst 4.56). :raises OSError: EBADF if closed."""
        return ioctl(self._check(), uapi.KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ on the vCPU (api.rst 4.55). :raises OSError: EBADF if closed; EINVAL."""
        fd = self._check()
        ioctl(fd, uapi.KVM_SET_TSC_KHZ, "KVM_SET_TSC_KHZ", int_arg(khz, "khz"), f"khz={khz}")
