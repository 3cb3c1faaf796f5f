"""x86 vCPU state beyond the registers: CPUID, MSRs, MP state, TSC frequency.

Data model
----------
``VcpuState`` is a mixin of ``vcpu.Vcpu``; each vCPU owns one copy of:

* ``_cpuid``: the entries userspace set with KVM_SET_CPUID2 (empty until then), as
  ``types.CpuidEntry``. Once the vCPU has run, only an identical table may be set again
  (kvm_set_cpuid's post-run rule, 5.16+). The guest's CPUID instruction answers from the
  emulated CPU itself (Unicorn), whose leaves are what KVM_GET_SUPPORTED_CPUID reports.
* ``_msrs``: index -> value for the MSRs of ``cpuid.MSRS``; any other index is refused,
  which ends KVM_GET_MSRS/KVM_SET_MSRS at that entry, as kvm_get_msr/kvm_set_msr do.
* ``_mp_state``: KVM_MP_STATE_*; vCPU 0 (the BSP) starts RUNNABLE, others UNINITIALIZED.
* ``_tsc_khz``: the guest TSC frequency, the host's by default (Unicorn reads the host TSC).

All of it is guarded by the vCPU's ioctl lock, like vcpu->mutex.
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Iterable

from ..errors import oserror
from ..types import CpuidEntry
from ..uapi import MpState
from . import cpuid as _cpuid

KVM_MAX_CPUID_ENTRIES = 256


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


class VcpuState:
    """CPUID, MSR, MP-state and TSC ioctls of a model vCPU (mixed into ``vcpu.Vcpu``)."""

    def _init_state(self, vcpu_id: int) -> None:
        self._cpuid: tuple[CpuidEntry, ...] = ()
        self._msrs = dict(_cpuid.MSRS)
        if vcpu_id != 0:
            self._msrs[0x1B] &= ~0x100  # only the BSP has IA32_APIC_BASE.BSP
        self._mp_state = int(MpState.RUNNABLE if vcpu_id == 0 else MpState.UNINITIALIZED)
        self._tsc_khz = host_tsc_khz()

    def get_cpuid2(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_CPUID2 (api.rst 4.63): the entries set by KVM_SET_CPUID2.

        E2BIG for a too small buffer is decided where the struct is (the caller's nent).
        Errors: EBADF (closed).
        """
        self._check()
        with self._ioctl_lock:
            return self._cpuid

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        """KVM_SET_CPUID2 (api.rst 4.20): the CPUID table userspace chose for this vCPU.

        Errors, in order: EBADF (closed); E2BIG more than 256 entries; EINVAL a different
        table after the vCPU has run (kvm_set_cpuid). Mirrors kvm_vcpu_ioctl_set_cpuid2.
        """
        self._check()
        table = tuple(entries)
        for e in table:
            if not isinstance(e, CpuidEntry):
                raise TypeError(f"set_cpuid2 takes CpuidEntry values, not {type(e).__name__}")
        if len(table) > KVM_MAX_CPUID_ENTRIES:
            raise oserror(errno.E2BIG, f"{len(table)} CPUID entries > {KVM_MAX_CPUID_ENTRIES}")
        with self._ioctl_lock:
            if self._u is not None and table != self._cpuid:  # type: ignore[attr-defined]
                raise oserror(errno.EINVAL, "KVM_SET_CPUID2 after KVM_RUN must not change the table")
            self._cpuid = table

    def get_msrs(self, indices: Iterable[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS (api.rst 4.18): (index, value) for each index, up to the first unknown one.

        The kernel returns how many it read; that is ``len`` of the result. Errors: EBADF.
        """
        self._check()
        out = []
        with self._ioctl_lock:
            for index in indices:
                if index not in self._msrs:
                    break
                out.append((index, self._msrs[index]))
        return out

    def set_msrs(self, entries: Iterable[tuple[int, int]]) -> int:
        """KVM_SET_MSRS (api.rst 4.19): write (index, value) pairs; returns how many were set.

        Stops at the first MSR the model does not hold (kvm_set_msr refuses it). Errors: EBADF.
        """
        self._check()
        n = 0
        with self._ioctl_lock:
            for index, value in entries:
                if index not in self._msrs or not 0 <= value < 1 << 64:
                    break
                self._msrs[index] = value
                n += 1
        return n

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (api.rst 4.38): the vCPU's KVM_MP_STATE_*. Errors: EBADF."""
        self._check()
        with self._ioctl_lock:
            return self._mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE (api.rst 4.39). Errors: EBADF; EINVAL a state x86 does not have.

        Mirrors kvm_arch_vcpu_ioctl_set_mpstate (without an in-kernel LAPIC model beyond that).
        """
        self._check()
        if not isinstance(mp_state, int):
            raise TypeError(f"mp_state must be an int, not {type(mp_state).__name__}")
        if mp_state not in MpState.__members__.values():
            raise oserror(errno.EINVAL, f"mp_state {mp_state} is not an x86 KVM_MP_STATE")
        with self._ioctl_lock:
            self._mp_state = int(mp_state)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the vCPU (api.rst 4.56): the guest TSC frequency. Errors: EBADF."""
        self._check()
        return self._tsc_khz

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ on the vCPU (api.rst 4.55). Errors: EBADF; EINVAL for 0.

        The model's guest TSC always runs at the host rate (Unicorn reads the host TSC), so
        only the host frequency is accepted; others are EINVAL, as on a host without TSC scaling.
        """
        self._check()
        if khz == 0 or khz != self._tsc_khz:
            raise oserror(errno.EINVAL, f"TSC frequency {khz} kHz: the model has no TSC scaling")
