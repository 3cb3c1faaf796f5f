"""Kernel profiles: which era of guest_memfd (spec section 8) the model reproduces.

Data model
----------
A ``Profile`` is a frozen bag of facts about one kernel build; every era-dependent
decision in the model reads one of its fields, so the eras differ in data, not in code
paths scattered through the model. Profiles are chosen by name in
``open_system(backend="model", profile=...)``; any field can be overridden by keyword
(``open_system("model", memory_attributes=False)``).

Each profile reproduces one kernel line built with ``KVM_SW_PROTECTED_VM`` (memory
attributes and SW_PROTECTED VMs), except ``"6.18-host"``:

* ``"6.8"``: the original design (E1): no create flags, mmap always ENODEV,
  KVM_CAP_GUEST_MEMFD = 0 on a default VM, only VMs with private memory may bind, the 6.8
  VFS fallocate errnos, two address spaces even for SW_PROTECTED VMs, no
  GUEST_MEMFD_FLAGS / PRE_FAULT_MEMORY. Read from the spec's E1 sources (a7800aa80ea4);
  the loff_t bind offset is the spec's reading, not re-read for this profile.
* ``"6.12"``: Debian's stable line, read in Debian's linux-source-6.12 (6.12.117). Still
  before create flags: every create flag EINVAL, GUEST_MEMFD_FLAGS 0, mmap ENODEV (no mmap
  method, and the anon-inode mount is not noexec, so PROT_EXEC is ENODEV too), only VMs
  with private memory bind (KVM_CAP_GUEST_MEMFD 0 on default VMs), no GMEM_ONLY slots. New
  since 6.8: KVM_PRE_FAULT_MEMORY (cap = TDP), one address space for SW_PROTECTED VMs, the
  6.11+ VFS fallocate errnos, the kvm_gmem_bind offset in u64 (no wrap), and the stable
  backport refusing to clear GUEST_MEMFD on a slot. Like 6.8, KVM_EXIT_HYPERCALL leaves
  kvm_run.hypercall.ret as userspace last wrote it (zeroed from 6.13). Not modelled: the
  guest-side "prepare" of each folio (SNP only) and anything not visible through this API. Debian's own build has
  KVM_SW_PROTECTED_VM off (SEV on): there VM_TYPES lacks SW_PROTECTED and the selftests
  needing it skip; this profile models the build with it, as the selftests expect.
* ``"6.18"``: hardware x86 KVM at 6.18 (E2): VM types DEFAULT and SW_PROTECTED,
  KVM_CAP_MEMORY_ATTRIBUTES = 8, guest_memfd MMAP/INIT_SHARED, SMM (two address spaces for
  default VMs) and TDP (KVM_CAP_PRE_FAULT_MEMORY = 1). Where this host's kernel supports a
  feature the model agrees with it (caps, errnos, limits measured on /dev/kvm).
* ``"6.18-host"``: exactly the kernel on the project host (kvm_pvm, 6.18): no memory
  attributes (KVM_SET_MEMORY_ATTRIBUTES -> ENOTTY, cap 0), VM_TYPES = 1, no SMM
  (KVM_CAP_MULTI_ADDRESS_SPACE = 0, one address space), no TDP (PRE_FAULT_MEMORY = 0).
  Conformance tests that touch these points compare the kvm backend against this profile.
* ``"6.19"``: guest_memfd's own pseudo-filesystem (fstatfs f_type GUEST_MEMFD_MAGIC, one
  inode per file as before) and NUMA policy per file: mbind on a mapping sets the file's
  shared policy, read back through any mapping with get_mempolicy(MPOL_F_ADDR) and used by
  later allocations (the model's pages live in a memfd, whose shared policy does exactly
  this). Read in torvalds/linux's stored 7.0-era guest_memfd.c and spec 13.1; the magic's
  value from the patch adding it.
* ``"7.0"``: MADV_COLLAPSE on a mapping is EINVAL. That syzbot fix went to stable too (6.18.44
  here answers EINVAL, so every mmap profile has it) and preparation tracking is internal, so
  no field differs from "6.19"; the name exists so users can ask for the kernel they run.
* ``"7.2"`` (default, ``DEFAULT_PROFILE``): binding a file range another memslot holds is
  EEXIST (was EINVAL) and the bind offset is unsigned, so the loff_t wrap of
  docs/kernel-findings.md is gone. From spec 13.1 ([V]: read by the spec's authors in a
  7.2-era kvm-x86 tree); not re-read here, no 7.2 source in the index.
* ``"host"`` (not a profile, a request): ``host_profile()`` picks the closest one.
* ``"next"``: "7.2" plus what is in flight upstream (spec 13.2-13.3), none of it in a
  released kernel. It follows the **guest_memfd in-place conversion series v8** (Ackerley
  Tng, Sean Christopherson, Fuad Tabba et al., "KVM: guest_memfd: in-place conversion",
  posted 18 Jun 2026, ``gmem-inplace-conversion-v8``) with ``kvm.gmem_in_place_conversion``
  on: memory attributes live in each guest_memfd (KVM_SET_MEMORY_ATTRIBUTES2 on the file,
  KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = 250 as numbered in v8, VM-level PRIVATE gone,
  INIT_SHARED allowed for private-memory VMs, every binding GMEM_ONLY). On top of it, from
  later and less settled postings: HugeTLB backing with 2 MiB / 1 GiB folios (the 2026
  HugeTLB-on-in-place work; its flag and size encoding are our choice, kept in fields below)
  and write()/pwrite() population of shared pages (Kalyazin's "generic population via
  write"). ``GUEST_MEMFD_FLAG_NO_DIRECT_MAP`` (1 << 2, Patrick Roy's series as carried by
  Firecracker) is accepted and reported with its refusal rule (not for VMs whose memory the
  hardware protects: the TDX-like type here); the model has no kernel direct map to remove,
  so it changes nothing else.

The model-only VM type ``GUESTMEM_TDX_LIKE_VM`` (0x100, a guestmem extension outside the
kernel's numbering) has private memory like SW_PROTECTED; its vCPUs (guestmem.model.vcpu)
derive shared/private from a GPA shared bit, as TDX does. It is accepted whenever the
profile has memory attributes and is not reported in KVM_CAP_VM_TYPES.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from typing import Any

from ..uapi import ANON_INODE_FS_MAGIC, GUEST_MEMFD_MAGIC, KVM_ADDRESS_SPACE_NUM, Cap, GuestMemfdFlag, VmType

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

UNCLAIMED_CAPS = frozenset({int(Cap.DIRTY_LOG_RING), int(Cap.DIRTY_LOG_RING_ACQ_REL), int(Cap.COALESCED_MMIO),
                            int(Cap.COALESCED_PIO), int(Cap.SET_GUEST_DEBUG), int(Cap.SET_BOOT_CPU_ID),
                            int(Cap.ADJUST_CLOCK), int(Cap.X86_DISABLE_EXITS), int(Cap.ENFORCE_PV_FEATURE_CPUID),
                            int(Cap.EXIT_ON_EMULATION_FAILURE), int(Cap.X86_APIC_BUS_CYCLES_NS)})
"""Caps the host has that the model answers 0 because it does not implement the feature, so it
never claims it: KVM_CAP_DIRTY_LOG_RING and _ACQ_REL (the model logs dirty pages in bitmaps only,
``model.vm_state``); coalesced MMIO/PIO, KVM_SET_GUEST_DEBUG, KVM_SET_BOOT_CPU_ID and the
kvmclock ioctls (KVM_CAP_ADJUST_CLOCK), and the KVM_ENABLE_CAP caps its ``enable_cap`` refuses
(X86_DISABLE_EXITS, ENFORCE_PV_FEATURE_CPUID, EXIT_ON_EMULATION_FAILURE, X86_APIC_BUS_CYCLES_NS):
neither the model's API nor the drop-in serves them, so a program that checks the cap first
(the kernel's selftests do) skips instead of failing on an unknown ioctl or a refused cap. The differential and host-cap tests compare every other cap with /dev/kvm."""

PRIVATE_MEM_VM_TYPES = frozenset({int(VmType.SW_PROTECTED), GUESTMEM_TDX_LIKE_VM})
_MMAP = int(GuestMemfdFlag.MMAP)
_MMAP_INIT_SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """One kernel build's guest_memfd behaviour (see the module docstring).

    Each field is one user-visible difference between kernel versions; a model rule reads
    exactly one field (STYLE 28), so a profile is data, never a code path.
    """

    name: str
    memory_attributes: bool
    """CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES: SET_MEMORY_ATTRIBUTES exists and SW VMs can be made."""
    smm: bool
    """Default VMs have two memslot address spaces (KVM_CAP_MULTI_ADDRESS_SPACE = 2)."""
    tdp: bool
    """Two-dimensional paging: KVM_CAP_PRE_FAULT_MEMORY reads 1 where the ioctl exists."""
    gmem_mmap: bool = True
    """6.18+: create flags MMAP and INIT_SHARED, KVM_CAP_GUEST_MEMFD_FLAGS, mmap of a gmem
    created with MMAP, GMEM_ONLY memslots. Without it every create flag is EINVAL, the cap
    reads 0 and mmap is ENODEV (the file has no mmap method)."""
    gmem_private_only: bool = False
    """6.8-6.12: only VMs with private memory may bind a guest_memfd (KVM_MEM_GUEST_MEMFD is an
    invalid memslot flag elsewhere) and KVM_CAP_GUEST_MEMFD reads 0 on other VMs."""
    private_vm_smm: bool = False
    """6.8: VMs with private memory keep the SMM address space (kvm_arch_nr_memslot_as_ids
    became 1 for them later)."""
    pre_fault_memory: bool = True
    """6.10+: KVM_PRE_FAULT_MEMORY exists (else ENOTTY, cap 0)."""
    vfs_fallocate_611: bool = True
    """6.11+ vfs_fallocate mode checks (EOPNOTSUPP where 6.8 said EINVAL; spec 2.2)."""
    gmem_noexec: bool = True
    """The gmem file's mount is noexec (anon_inodefs raised SB_I_NOEXEC in 6.15; 6.19's own fs
    is MNT_NOEXEC): mmap(PROT_EXEC) is EPERM before any other file check. Without it the
    missing mmap method answers ENODEV first."""
    bind_offset_signed: bool = True
    """kvm_gmem_bind computes ``offset + size`` in loff_t (6.8, 6.13-7.1): the sum wraps negative
    for offsets just below 2**63 and the end-of-file check passes (docs/kernel-findings.md).
    False: u64 arithmetic (6.12, 7.2+), any offset past the file is EINVAL."""
    bind_overlap_errno: int = errno.EINVAL
    """Binding a file range that another memslot of the file holds: EINVAL, EEXIST from 7.2."""
    hypercall_ret_cleared: bool = True
    """6.13+: KVM zeroes kvm_run.hypercall.ret before a KVM_EXIT_HYPERCALL. Before (6.8, 6.12:
    read in 6.12's MAP_GPA_RANGE exit, which sets nr/args/flags only) the exit shows, and the
    completion loads into RAX, whatever userspace last wrote there."""
    pre_fault_slotless_errno: int = 0
    """kvm_pvm (the project host): KVM_PRE_FAULT_MEMORY on a VM that never had a memslot fails
    with ENOSPC when the vCPU's MMU is loaded, before the no-TDP EOPNOTSUPP (measured; once
    any memslot existed, even if deleted, EOPNOTSUPP). 0: no such rule."""
    gmem_fs_magic: int = ANON_INODE_FS_MAGIC
    """fstatfs f_type of a guest_memfd: ANON_INODE_FS_MAGIC until 6.18, GUEST_MEMFD_MAGIC
    ("GMEM", 0x474d454d) from 6.19, when guest_memfd got its own pseudo-filesystem."""
    gmem_mempolicy_per_file: bool = False
    """6.19+: the mapping's vm_ops carry set_policy/get_policy, so mbind on a guest_memfd
    mapping sets a shared policy of the *file* (seen through every mapping, used by later
    allocations). Before, mbind succeeds but the policy belongs to the mapping (measured on
    6.18.44: a second mapping of the file reads MPOL_DEFAULT)."""
    gmem_collapse_einval: bool = True
    """MADV_COLLAPSE on a guest_memfd mapping is EINVAL and faults stay small pages (the 7.0
    syzbot fix, backported to stable: measured EINVAL on 6.18.44). Irrelevant without mmap."""
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
    gmem_no_direct_map_flag: int = 0
    """GUEST_MEMFD_FLAG_NO_DIRECT_MAP (in flight; 1 << 2 in recent revisions), 0: not offered."""
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

    def gmem_flags(self, private_mem: bool, protected: bool = False) -> int:
        """kvm_gmem_get_supported_flags: MMAP always, INIT_SHARED only without private memory
        unless in-place conversion is on, plus the HugeTLB flag where modelled, and NO_DIRECT_MAP
        except for VMs with hardware-protected memory (``protected``: TDX/SNP-like)."""
        if not self.gmem_mmap:
            return 0
        flags = _MMAP if private_mem and not self.gmem_in_place_conversion else _MMAP_INIT_SHARED
        return flags | self.gmem_hugetlb_flag | (0 if protected else self.gmem_no_direct_map_flag)

    def address_spaces(self, private_mem: bool) -> int:
        """kvm_arch_nr_memslot_as_ids: SMM adds a second one, not for private-mem VMs (6.12+)."""
        if not self.smm:
            return 1
        if private_mem and not self.private_vm_smm:
            return 1
        return KVM_ADDRESS_SPACE_NUM

    def can_bind(self, private_mem: bool) -> bool:
        """Whether KVM_MEM_GUEST_MEMFD is a valid memslot flag for this VM."""
        return private_mem or not self.gmem_private_only


PROFILES: dict[str, Profile] = {
    "6.8": Profile(name="6.8", memory_attributes=True, smm=True, tdp=False, gmem_mmap=False,
                   gmem_private_only=True, private_vm_smm=True, pre_fault_memory=False,
                   vfs_fallocate_611=False, gmem_noexec=False, hypercall_ret_cleared=False),
    "6.12": Profile(name="6.12", memory_attributes=True, smm=True, tdp=True, gmem_mmap=False,
                    gmem_private_only=True, gmem_noexec=False, bind_offset_signed=False,
                    hypercall_ret_cleared=False),
    "6.18": Profile(name="6.18", memory_attributes=True, smm=True, tdp=True),
    "6.18-host": Profile(name="6.18-host", memory_attributes=False, smm=False, tdp=False,
                         pre_fault_slotless_errno=errno.ENOSPC),
    "6.19": Profile(name="6.19", memory_attributes=True, smm=True, tdp=True,
                    gmem_fs_magic=GUEST_MEMFD_MAGIC, gmem_mempolicy_per_file=True),
    "7.0": Profile(name="7.0", memory_attributes=True, smm=True, tdp=True,
                   gmem_fs_magic=GUEST_MEMFD_MAGIC, gmem_mempolicy_per_file=True),
    "7.2": Profile(name="7.2", memory_attributes=True, smm=True, tdp=True,
                   gmem_fs_magic=GUEST_MEMFD_MAGIC, gmem_mempolicy_per_file=True,
                   bind_offset_signed=False, bind_overlap_errno=errno.EEXIST),
}
# "next" is the newest released profile plus the in-flight series: rebase it when a newer one lands.
PROFILES["next"] = dataclasses.replace(PROFILES["7.2"], name="next", gmem_in_place_conversion=True, gmem_write=True,
                                       gmem_hugetlb_flag=1 << 3, gmem_huge_sizes=(1 << 21, 1 << 30),
                                       gmem_no_direct_map_flag=1 << 2)

DEFAULT_PROFILE = "7.2"
"""The newest released kernel the model covers (spec 13: nothing guest_memfd-visible after 7.2)."""

_RELEASED = {"6.8": (6, 8), "6.12": (6, 12), "6.18": (6, 18), "6.19": (6, 19), "7.0": (7, 0), "7.2": (7, 2)}


def host_profile(release: str | None = None, kvm_pvm: bool | None = None) -> tuple[str, str]:
    """The profile closest to the running kernel (``profile="host"``) and why it was chosen.

    kvm_pvm at 6.18 (this project's host) is "6.18-host". Otherwise the newest profile whose
    version is not above the kernel's (a kernel between two profiles has at least the older
    one's behaviour; 7.1 changed nothing visible after 7.0); older kernels get "6.8". Only the
    release string is read: the kernel's build options (memory attributes, TDP) are not probed.
    """
    release = os.uname().release if release is None else release
    if kvm_pvm is None:
        kvm_pvm = os.path.exists("/sys/module/kvm_pvm")
    m = re.match(r"(\d+)\.(\d+)", release)
    if m is None:
        return DEFAULT_PROFILE, f"kernel release {release!r} is unreadable: the default profile"
    version = (int(m.group(1)), int(m.group(2)))
    if kvm_pvm and version == (6, 18):
        return "6.18-host", f"kernel {release} with kvm_pvm: the measured project host"
    older = [name for name, v in _RELEASED.items() if v <= version]
    if not older:
        return "6.8", f"kernel {release} predates every profile: the oldest, 6.8"
    best = max(older, key=_RELEASED.__getitem__)
    how = "exact" if _RELEASED[best] == version else f"newest profile not above {version[0]}.{version[1]}"
    return best, f"kernel {release}: {how}"



def resolve_profile(profile: str | Profile = DEFAULT_PROFILE, **overrides: Any) -> Profile:
    """The named profile (``"host"``: ``host_profile()``) with keyword ``overrides`` applied;
    ValueError for unknown names."""
    if isinstance(profile, Profile):
        base = profile
    else:
        if profile == "host":
            profile = host_profile()[0]
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
