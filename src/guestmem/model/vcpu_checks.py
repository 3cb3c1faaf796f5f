"""A model vCPU's reset state and the checks of KVM_CREATE_VCPU, KVM_SET_REGS and KVM_SET_SREGS.

Data model. Pure functions over ``types.Regs``/``types.Sregs``; ``vcpu.Vcpu`` and
``vm.Vm.create_vcpu`` call them before any state changes. The values were measured on this
project's host (``/dev/kvm``: kvm_pvm, Linux 6.18, AMD EPYC; ``tests/test_vcpu_conformance.py``
compares both backends field by field) and follow the kernel functions named below:

- creation (kvm_vm_ioctl_create_vcpu): the id is an unsigned long, EINVAL from
  KVM_MAX_VCPU_IDS (KVM_CAP_MAX_VCPU_ID) on, then EINVAL once KVM_CAP_MAX_VCPUS vCPUs exist,
  and EEXIST for an id in use -- by any vCPU ever created, since a closed vCPU fd does not
  destroy the vCPU before its VM;
- reset (kvm_vcpu_reset, vmx/svm vcpu_reset): real mode at the reset vector, CS selector
  0xF000 with base 0xFFFF0000 and RIP 0xFFF0; RDX = 0x600 (no CPUID leaf 1 set yet); APIC
  base 0xFEE00000, enabled, with the BSP flag on vCPU 0 only;
- KVM_SET_REGS (__set_regs): every field must fit its u64; RFLAGS bit 1 reads back set;
- KVM_SET_SREGS (__set_sregs_common): every field must fit its struct field, then
  kvm_is_valid_sregs: long mode (EFER.LME and CR0.PG) needs CR4.PAE, EFER.LMA and a CR3
  below MAXPHYADDR; outside it EFER.LMA and CS.L must be clear; kvm_is_valid_cr4 (reserved
  bits, which depend on CPUID: the mask below is the one this host's KVM refuses);
  kvm_is_valid_cr0 (no bit above 31, NW needs CD, PG needs PE); kvm_set_apic_base (reserved
  bits, x2APIC without xAPIC enabled). All are EINVAL, so their order cannot be seen.
"""

from __future__ import annotations

import errno

from ..encoding import check_sregs_types, check_type, encode_unsigned
from ..errors import oserror
from ..types import Regs, Segment, Sregs
from ..uapi import Cap
from .profile import HOST_CAPS

KVM_MAX_VCPU_IDS = HOST_CAPS[int(Cap.MAX_VCPU_ID)]
KVM_MAX_VCPUS = HOST_CAPS[int(Cap.MAX_VCPUS)]
MAXPHYADDR = 40  # the model's CPU (cpuid: Unicorn's x86-64 reports 40 physical address bits)

_CR0_PE, _CR0_NW, _CR0_CD, _CR0_PG = 1 << 0, 1 << 29, 1 << 30, 1 << 31
_CR4_PAE = 1 << 5
# CR4 bits KVM_SET_SREGS accepts here (measured: 0-11, FSGSBASE, OSXSAVE, SMEP, SMAP, PKE);
# LA57, VMXE, SMXE, PCIDE, CET and every undefined bit are EINVAL.
_CR4_VALID = (1 << 12) - 1 | 1 << 16 | 1 << 18 | 1 << 20 | 1 << 21 | 1 << 22
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10
_APIC_BSP, _APIC_X2APIC, _APIC_ENABLE = 1 << 8, 1 << 10, 1 << 11
_APIC_RESERVED = 0x2FF | ~((1 << MAXPHYADDR) - 1)

_SEG_BITS = {"base": 64, "limit": 32, "selector": 16, "type": 8, "present": 8, "dpl": 8, "db": 8, "s": 8,
             "l": 8, "g": 8, "avl": 8, "unusable": 8}
_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_REG_FIELDS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
               "r13", "r14", "r15", "rip", "rflags")
_RFLAGS_FIXED = 0x2


def check_vcpu_id(vcpu_id: int, created: int) -> int:
    """The id as the kernel reads it (an unsigned long), or EINVAL (kvm_vm_ioctl_create_vcpu)."""
    vcpu_id = encode_unsigned(vcpu_id, 64, "vcpu_id")
    if vcpu_id >= KVM_MAX_VCPU_IDS:
        raise oserror(errno.EINVAL, f"vcpu_id {vcpu_id:#x} is not below KVM_MAX_VCPU_IDS ({KVM_MAX_VCPU_IDS})")
    if created >= KVM_MAX_VCPUS:
        raise oserror(errno.EINVAL, f"the VM already has KVM_MAX_VCPUS ({KVM_MAX_VCPUS}) vCPUs")
    return vcpu_id


def reset_regs() -> Regs:
    """General registers after KVM_CREATE_VCPU (kvm_vcpu_reset)."""
    return Regs(rdx=0x600, rip=0xFFF0, rflags=_RFLAGS_FIXED)


def reset_sregs(vcpu_id: int) -> Sregs:
    """Special registers after KVM_CREATE_VCPU: real mode at the reset vector."""
    s = Sregs()
    return s.replace(cs=s.cs.replace(selector=0xF000, base=0xFFFF_0000),
                     apic_base=0xFEE0_0000 | _APIC_ENABLE | (_APIC_BSP if vcpu_id == 0 else 0))


def encode_regs(regs: Regs) -> Regs:
    """``regs`` as KVM_SET_REGS stores them: u64 fields (EINVAL if one does not fit), RFLAGS
    with its fixed bit 1."""
    check_type(regs, Regs, "regs")
    values = {n: encode_unsigned(getattr(regs, n), 64, n) for n in _REG_FIELDS}
    values["rflags"] |= _RFLAGS_FIXED
    return Regs(**values)


def encode_sregs(s: Sregs) -> Sregs:
    """``s`` with every field encoded to its struct kvm_sregs width, or EINVAL."""
    check_sregs_types(s)
    segs = {n: Segment(**{f: encode_unsigned(getattr(getattr(s, n), f), b, f"{n}.{f}") for f, b in _SEG_BITS.items()})
            for n in _SEGS}
    tables = {n: getattr(s, n).__class__(base=encode_unsigned(getattr(s, n).base, 64, f"{n}.base"),
                                         limit=encode_unsigned(getattr(s, n).limit, 16, f"{n}.limit"))
              for n in ("gdt", "idt")}
    crs = {n: encode_unsigned(getattr(s, n), 64, n) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")}
    if len(s.interrupt_bitmap) != 4:
        raise oserror(errno.EINVAL, "interrupt_bitmap needs 4 words")
    bitmap = tuple(encode_unsigned(w, 64, f"interrupt_bitmap[{i}]") for i, w in enumerate(s.interrupt_bitmap))
    return Sregs(**segs, **tables, **crs, interrupt_bitmap=bitmap)


def check_sregs(s: Sregs) -> None:
    """EINVAL for a state KVM_SET_SREGS refuses (``s`` already encoded)."""
    if s.efer & _EFER_LME and s.cr0 & _CR0_PG:
        if not s.cr4 & _CR4_PAE or not s.efer & _EFER_LMA:
            raise oserror(errno.EINVAL, "EFER.LME with CR0.PG needs CR4.PAE and EFER.LMA")
        if s.cr3 >> MAXPHYADDR:
            raise oserror(errno.EINVAL, f"cr3 {s.cr3:#x} is beyond MAXPHYADDR ({MAXPHYADDR} bits)")
    elif s.efer & _EFER_LMA or s.cs.l:
        raise oserror(errno.EINVAL, "EFER.LMA or CS.L outside long mode (EFER.LME with CR0.PG)")
    if s.cr4 & ~_CR4_VALID:
        raise oserror(errno.EINVAL, f"cr4 {s.cr4:#x} sets reserved bits {s.cr4 & ~_CR4_VALID:#x}")
    if s.cr0 >> 32:
        raise oserror(errno.EINVAL, f"cr0 {s.cr0:#x} sets bits above 31")
    if s.cr0 & _CR0_NW and not s.cr0 & _CR0_CD:
        raise oserror(errno.EINVAL, "CR0.NW without CR0.CD")
    if s.cr0 & _CR0_PG and not s.cr0 & _CR0_PE:
        raise oserror(errno.EINVAL, "CR0.PG without CR0.PE")
    if s.apic_base & _APIC_RESERVED or (s.apic_base & _APIC_X2APIC and not s.apic_base & _APIC_ENABLE):
        raise oserror(errno.EINVAL, f"apic_base {s.apic_base:#x} sets reserved bits or x2APIC without xAPIC")
