"""Kernel profiles: which era of guest_memfd (spec section 8) the model reproduces.

Data model
----------
A ``Profile`` is a frozen bag of facts about one kernel build; every era-dependent
decision in the model reads one of its fields, so the eras differ in data, not in code
paths scattered through the model. Profiles are chosen by name in
``open_system(backend="model", profile=...)``; any field can be overridden by keyword
(``open_system("model", memory_attributes=False)``).

* ``"6.18"`` (default): hardware x86 KVM at 6.18 (E2) built with memory-attribute support
  and ``KVM_SW_PROTECTED_VM``: VM types DEFAULT and SW_PROTECTED, KVM_CAP_MEMORY_ATTRIBUTES
  = 8, guest_memfd MMAP/INIT_SHARED, SMM (two address spaces for default VMs) and TDP
  (KVM_CAP_PRE_FAULT_MEMORY = 1). Where this host's kernel supports a feature the model
  agrees with it (caps, errnos, limits measured on /dev/kvm).
* ``"6.18-host"``: exactly the kernel on the project host (kvm_pvm, 6.18): no memory
  attributes (KVM_SET_MEMORY_ATTRIBUTES -> ENOTTY, cap 0), VM_TYPES = 1, no SMM
  (KVM_CAP_MULTI_ADDRESS_SPACE = 0, one address space), no TDP (PRE_FAULT_MEMORY = 0).
  Conformance tests that touch these points compare the kvm backend against this profile.
* ``"6.8"``: the original design (E1) on a kernel with ``KVM_SW_PROTECTED_VM``: no create
  flags, mmap always ENODEV, KVM_CAP_GUEST_MEMFD = 0 on a default VM, only VMs with private
  memory may bind, zeroing at allocation, the 6.8 VFS fallocate errnos, two address spaces
  even for SW_PROTECTED VMs, no GUEST_MEMFD_FLAGS / PRE_FAULT_MEMORY caps.
* ``"next"``: "6.18" plus what is in flight upstream (spec 13.2-13.3), none of it in a
  released kernel. It follows the **guest_memfd in-place conversion series v8** (Ackerley
  Tng, Sean Christopherson, Fuad Tabba et al., "KVM: guest_memfd: in-place conversion",
  posted 18 Jun 2026, ``gmem-inplace-conversion-v8``) with ``kvm.gmem_in_place_conversion``
  on: memory attributes live in each guest_memfd (KVM_SET_MEMORY_ATTRIBUTES2 on the file,
  KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = 250 as numbered in v8, VM-level PRIVATE gone,
  INIT_SHARED allowed for private-memory VMs, every binding GMEM_ONLY). On top of it, from
  later and less settled postings: HugeTLB backing with 2 MiB / 1 GiB folios (the 2026
  HugeTLB-on-in-place work; its flag and size encoding are our choice, kept in fields below)
  and write()/pwrite() population of shared pages (Kalyazin's "generic population via
  write"). NO_DIRECT_MAP is not modelled (the model has no direct map to remove).

The model-only VM type ``GUESTMEM_TDX_LIKE_VM`` (0x100, a guestmem extension outside the
kernel's numbering) has private memory like SW_PROTECTED; its vCPUs (guestmem.model.vcpu)
derive shared/private from a GPA shared bit, as TDX does. It is accepted whenever the
profile has memory attributes and is not reported in KVM_CAP_VM_TYPES.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..uapi import VmType

GUESTMEM_TDX_LIKE_VM = 0x100
"""guestmem extension: a model-only VM type with private memory and TDX-style implicit conversions."""

# KVM_CHECK_EXTENSION values of every nonzero cap below 300 on the project host (6.18.44,
# kvm_pvm), measured on /dev/kvm and a default VM. Caps the model does not compute from the
# profile (spec 1.2) answer from here, so the model agrees with the host on everything
# guest_memfd does not touch. VM fds differ from /dev/kvm only where HOST_VM_CAPS says.
HOST_CAPS: dict[int, int] = {
    0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 6: 1, 7: 1, 8: 1, 9: 2, 10: 32764, 11: 1, 12: 1, 14: 1, 15: 2, 16: 1,
    21: 1, 22: 1, 23: 1, 24: 1, 25: 4096, 26: 1, 30: 1, 31: 32, 32: 1, 33: 1, 34: 1, 35: 1, 36: 1, 37: 1,
    39: 14, 40: 1, 41: 1, 47: 1, 50: 1, 51: 1, 54: 1, 55: 1, 56: 1, 59: 1, 61: 1, 66: 1024, 70: 1, 72: 1,
    74: 7, 76: 1, 77: 1, 81: 1, 82: 1, 89: 1, 95: 1, 97: 1, 98: 1, 100: 1, 105: 1, 116: 1, 121: 1,
    122: 1, 127: 1, 128: 4096, 129: 15, 136: 1, 143: 14, 153: 1, 159: 1, 162: 1, 164: 1, 168: 3, 173: 1,
    182: 1, 183: 1, 184: 1, 185: 1, 187: 1, 188: 1, 189: 1, 190: 1, 192: 1048576, 195: 2031619, 197: 1,
    200: 1, 201: 4096, 203: 1, 204: 1, 206: 1, 208: 4096, 209: 1, 213: 1535, 215: 1, 218: 1, 220: 1,
    223: 1048576, 226: 1, 231: 1, 232: 1, 234: 1, 235: 1, 237: 1, 238: 1, 244: 3,
}
HOST_VM_CAPS: dict[int, int] = {129: 11}

PRIVATE_MEM_VM_TYPES = frozenset({int(VmType.SW_PROTECTED), GUESTMEM_TDX_LIKE_VM})


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """One kernel build's guest_memfd behaviour (see the module docstring)."""

    name: str
    era: int
    """1 = E1 (6.8), 2 = E2 (6.18)."""
    memory_attributes: bool
    """CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES: SET_MEMORY_ATTRIBUTES exists and SW VMs can be made."""
    smm: bool
    """Default VMs have two memslot address spaces (KVM_CAP_MULTI_ADDRESS_SPACE = 2)."""
    tdp: bool
    """Two-dimensional paging: KVM_CAP_PRE_FAULT_MEMORY (6.10+) reads 1."""
    max_gpa_bits: int = 52
    """Memslots must end at or below 2**max_gpa_bits (x86 kvm_mmu_max_gfn, measured: 52)."""
    gmem_in_place_conversion: bool = False
    """Module parameter ``kvm.gmem_in_place_conversion`` (in-place series): attributes are
    per guest_memfd and set with KVM_SET_MEMORY_ATTRIBUTES2 on the file; off: that ioctl is ENOTTY."""
    gmem_attributes_cap: int = 250
    """Number of KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES (250 in v8; 245/246/249 in earlier revisions)."""
    gmem_write: bool = False
    """write()/pwrite() populate shared pages of a guest_memfd (in flight); off: EINVAL / ESPIPE."""
    gmem_hugetlb_flag: int = 0
    """Create flag asking for HugeTLB folios (0: no HugeTLB backing). In flight, uAPI unsettled."""
    gmem_huge_sizes: tuple[int, ...] = ()
    """Folio sizes a HugeTLB guest_memfd may ask for, encoded as log2(size) << gmem_huge_shift."""
    gmem_huge_shift: int = 26
    """Bit position of the 6-bit log2(folio size) field in the create flags (as MAP_HUGE_SHIFT)."""

    @property
    def vm_types(self) -> frozenset[int]:
        """Types KVM_CREATE_VM accepts (the model extension included)."""
        if self.memory_attributes:
            return frozenset({0, int(VmType.SW_PROTECTED), GUESTMEM_TDX_LIKE_VM})
        return frozenset({0})

    @property
    def vm_types_cap(self) -> int:
        return 0b11 if self.memory_attributes else 0b1

    def gmem_flags(self, private_mem: bool) -> int:
        """kvm_gmem_get_supported_flags: MMAP always (E2), INIT_SHARED only without private memory
        unless in-place conversion is on, plus the HugeTLB flag where modelled."""
        if self.era < 2:
            return 0
        flags = 0b01 if private_mem and not self.gmem_in_place_conversion else 0b11
        return flags | self.gmem_hugetlb_flag

    def address_spaces(self, private_mem: bool) -> int:
        """kvm_arch_nr_memslot_as_ids: SMM adds a second one, except for private-mem VMs (E2+)."""
        if not self.smm:
            return 1
        if private_mem and self.era >= 2:
            return 1
        return 2

    def can_bind(self, private_mem: bool) -> bool:
        """Whether KVM_MEM_GUEST_MEMFD is a valid memslot flag for this VM (E1: private-mem VMs only)."""
        return self.era >= 2 or private_mem


PROFILES: dict[str, Profile] = {
    "6.18": Profile(name="6.18", era=2, memory_attributes=True, smm=True, tdp=True),
    "6.18-host": Profile(name="6.18-host", era=2, memory_attributes=False, smm=False, tdp=False),
    "6.8": Profile(name="6.8", era=1, memory_attributes=True, smm=True, tdp=False),
    "next": Profile(name="next", era=2, memory_attributes=True, smm=True, tdp=True,
                    gmem_in_place_conversion=True, gmem_write=True, gmem_hugetlb_flag=1 << 3,
                    gmem_huge_sizes=(1 << 21, 1 << 30)),
}


def resolve_profile(profile: str | Profile = "6.18", **overrides: Any) -> Profile:
    """The named profile with keyword ``overrides`` applied; ValueError for unknown names."""
    if isinstance(profile, Profile):
        base = profile
    else:
        try:
            base = PROFILES[profile]
        except KeyError:
            raise ValueError(f"unknown model profile {profile!r}: expected one of {sorted(PROFILES)}") from None
    if overrides:
        fields = {f.name for f in dataclasses.fields(Profile)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(f"unknown model option(s) {sorted(unknown)}: expected profile= or one of {sorted(fields)}")
        base = dataclasses.replace(base, **overrides)
    return base
