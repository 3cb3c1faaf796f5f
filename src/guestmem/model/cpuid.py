"""What the model's CPU is: the CPUID leaves and MSRs of Unicorn's x86, as KVM reports them.

Data model
----------
``supported_cpuid()`` answers KVM_GET_SUPPORTED_CPUID: every leaf the emulated CPU (Unicorn's
default x86-64 model) implements, read by executing CPUID in Unicorn once per process, so
a guest that sees these values sees the CPU that really runs it (vendor, family, features,
40 physical address bits); the bits that follow CR4 at run time (OSXSAVE, OSPKE) are clear, as
KVM reports them. Leaves with subleaves carry KVM_CPUID_FLAG_SIGNIFCANT_INDEX, as
in kvm_dev_ioctl_get_cpuid (arch/x86/kvm/cpuid.c). ``MSRS`` lists the MSRs the model keeps
per vCPU (KVM_GET_MSR_INDEX_LIST) with their reset values; feature MSRs are none.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading

from ..types import CpuidEntry
from ..uapi import CpuidFlag

# Leaves whose ECX input selects a subleaf, and how many subleaves to report.
_SUBLEAVES = {0x4: None, 0x7: None, 0xB: None, 0xD: 64}

# MSRs a model vCPU holds: index -> reset value (SDM vol. 3, table "IA-32 architectural MSRs").
MSRS: dict[int, int] = {
    0x10: 0,            # IA32_TIME_STAMP_COUNTER
    0x1B: 0xFEE00900,   # IA32_APIC_BASE (BSP, xAPIC enabled)
    0x174: 0, 0x175: 0, 0x176: 0,  # SYSENTER_CS/ESP/EIP
    0x277: 0x0007040600070406,     # IA32_PAT
    0xC0000080: 0,      # EFER
    0xC0000081: 0, 0xC0000082: 0, 0xC0000083: 0, 0xC0000084: 0,  # STAR, LSTAR, CSTAR, FMASK
    0xC0000100: 0, 0xC0000101: 0, 0xC0000102: 0,  # FS_BASE, GS_BASE, KERNEL_GS_BASE
    0xC0000103: 0,      # TSC_AUX
}

_lock = threading.Lock()

# CPUID bits that mirror CR4 at run time (kvm_update_cpuid_runtime): KVM never reports them
# as supported and sets them in a vCPU's table from its CR4. (leaf, register, bit, CR4 bit)
RUNTIME_BITS = ((0x1, "ecx", 27, 18),   # OSXSAVE <- CR4.OSXSAVE
                (0x7, "ecx", 4, 22))    # OSPKE <- CR4.PKE


def _new_lock_in_child() -> None:  # a fork taken while another thread held _lock
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


@functools.lru_cache(maxsize=1)
def supported_cpuid() -> tuple[CpuidEntry, ...]:
    """The CPUID leaves of Unicorn's x86-64 CPU (KVM_GET_SUPPORTED_CPUID), computed once."""
    from .unicorn_cpu import unicorn

    u = unicorn()
    x = u.x86_const
    with _lock:
        uc = u.Uc(u.unicorn_const.UC_ARCH_X86, u.unicorn_const.UC_MODE_64)
        uc.mem_map(0x1000, 0x1000)
        uc.mem_write(0x1000, b"\x0f\xa2")  # cpuid

        def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
            uc.reg_write(x.UC_X86_REG_RAX, leaf)
            uc.reg_write(x.UC_X86_REG_RCX, sub)
            uc.emu_start(0x1000, 0x1002)
            return tuple(uc.reg_read(r) for r in (x.UC_X86_REG_EAX, x.UC_X86_REG_EBX,
                                                  x.UC_X86_REG_ECX, x.UC_X86_REG_EDX))  # type: ignore[return-value]

        out: list[CpuidEntry] = []
        for base in (0, 0x8000_0000):
            top = cpuid(base)[0]
            for leaf in range(base, top + 1):
                if leaf in _SUBLEAVES:
                    limit = _SUBLEAVES[leaf]
                    sub = 0
                    while True:
                        regs = cpuid(leaf, sub)
                        # leaf 4 ends at cache type 0, 0xB at level type 0, 7 at EAX of subleaf 0
                        if leaf == 0x4 and regs[0] & 0x1F == 0 or leaf == 0xB and regs[2] & 0xFF00 == 0 and sub:
                            break
                        if leaf == 0xD and sub > 1 and not any(regs):
                            sub += 1
                            if sub >= (limit or 64):
                                break
                            continue
                        out.append(CpuidEntry(leaf, sub, int(CpuidFlag.SIGNIFCANT_INDEX), *regs))
                        sub += 1
                        if leaf == 0x7 and sub > cpuid(0x7)[0] or leaf == 0xB and sub > 8 or sub >= (limit or 64):
                            break
                else:
                    out.append(CpuidEntry(leaf, 0, 0, *cpuid(leaf)))
        for leaf, reg, bit, _ in RUNTIME_BITS:
            out = [dataclasses.replace(e, **{reg: getattr(e, reg) & ~(1 << bit)}) if e.function == leaf else e
                   for e in out]
        return tuple(out)
