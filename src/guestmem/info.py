"""``guestmem info``: what this host's KVM offers, and which backend each feature runs on.

``host_report()`` opens the KVM device, reads the capabilities that matter for guest-first
memory on /dev/kvm and on a default VM, decodes their bit masks by name, and derives a
verdict per guestmem feature: "kernel" when the host can do it, "model" (with the reason)
when only the software model can. Without KVM the report says so and everything is
"model"; building a report never raises for a missing or inaccessible device.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any

from .uapi import KVM_EXIT_HYPERCALL_VALID_MASK, Cap, GuestMemfdFlag, MemoryAttribute, VmType

KERNEL, MODEL = "kernel", "model"


@dataclasses.dataclass(frozen=True)
class Feature:
    """One guestmem feature and the backend it runs on here."""

    name: str
    backend: str  # "kernel" or "model"
    reason: str


@dataclasses.dataclass(frozen=True)
class HostReport:
    """The host facts behind backend selection; ``to_dict()`` gives plain JSON data."""

    device: str
    kvm_present: bool
    kvm_accessible: bool
    kvm_reason: str
    kernel_release: str
    kvm_modules: list[str]
    api_version: int | None = None
    vcpu_mmap_size: int | None = None
    vm_types: list[str] = dataclasses.field(default_factory=list)
    caps: dict[str, int] = dataclasses.field(default_factory=dict)
    vm_caps: dict[str, int] = dataclasses.field(default_factory=dict)
    guest_memfd_flags: list[str] = dataclasses.field(default_factory=list)
    vm_guest_memfd_flags: list[str] = dataclasses.field(default_factory=list)
    memory_attributes: list[str] = dataclasses.field(default_factory=list)
    vm_error: str | None = None
    model_profile: str = ""
    """The model profile ``open_system("model", profile="host")`` picks here, and why."""
    model_profile_reason: str = ""
    features: list[Feature] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decode_bits(value: int, flags: type[enum.Enum]) -> list[str]:
    """Names of the bits set in ``value`` (``flags`` members are single bits or bit
    positions for VmType); unknown bits appear as hex."""
    names = []
    for member in flags:  # type: ignore[attr-defined]
        bit = 1 << member.value if flags is VmType else member.value
        if bit and value & bit:
            names.append(member.name)
            value &= ~bit
    if value:
        names.append(f"{value:#x}")
    return names


def _kvm_modules() -> list[str]:
    try:
        return sorted(m for m in os.listdir("/sys/module") if m == "kvm" or m.startswith("kvm_"))
    except OSError:
        return []


def host_report(device: str | None = None) -> HostReport:
    """Probe ``device`` (default ``$GUESTMEM_KVM_DEVICE`` or /dev/kvm) and build the report."""
    from .kvm import open_system

    if device is None:
        device = os.environ.get("GUESTMEM_KVM_DEVICE", "/dev/kvm")
    from .model.profile import host_profile

    profile, profile_reason = host_profile()
    base = dict(device=device, kvm_present=os.path.exists(device), kernel_release=os.uname().release,
                kvm_modules=_kvm_modules(), model_profile=profile, model_profile_reason=profile_reason)
    try:
        system = open_system(device)
    except OSError as exc:
        why = f"{device}: {os.strerror(exc.errno)}" if exc.errno else f"{device}: {exc}"
        return HostReport(kvm_accessible=False, kvm_reason=why, features=_verdict(None, None, why), **base)
    try:
        system.api_version()
    except OSError as exc:  # opened, but not a KVM device (e.g. --device /dev/null)
        system.close()
        why = f"{device} is not a KVM device (KVM_GET_API_VERSION: {os.strerror(exc.errno or 0)})"
        return HostReport(kvm_accessible=False, kvm_reason=why, features=_verdict(None, None, why), **base)
    with system:
        caps = {cap.name: system.check_extension(cap) for cap in Cap}
        report: dict[str, Any] = dict(
            kvm_accessible=True, kvm_reason=f"{device} opened read-write",
            api_version=system.api_version(), vcpu_mmap_size=system.vcpu_mmap_size(),
            caps=caps, vm_types=decode_bits(caps["VM_TYPES"] or 1, VmType),
            guest_memfd_flags=decode_bits(caps["GUEST_MEMFD_FLAGS"], GuestMemfdFlag),
            memory_attributes=decode_bits(caps["MEMORY_ATTRIBUTES"], MemoryAttribute))
        vm_caps: dict[str, int] | None = None
        try:
            vm = system.create_vm(VmType.DEFAULT)
        except OSError as exc:
            report["vm_error"] = f"KVM_CREATE_VM(0): {exc}"
        else:
            with vm:
                vm_caps = {cap.name: vm.check_extension(cap) for cap in Cap}
            report["vm_caps"] = vm_caps
            report["vm_guest_memfd_flags"] = decode_bits(vm_caps["GUEST_MEMFD_FLAGS"], GuestMemfdFlag)
    return HostReport(features=_verdict(caps, vm_caps, None), **base, **report)


def _verdict(caps: dict[str, int] | None, vm_caps: dict[str, int] | None, absent: str | None) -> list[Feature]:
    if caps is None or vm_caps is None:
        why = f"KVM absent ({absent})" if absent else "cannot create a default VM"
        names = ["guest_memfd", "guest_memfd mmap (in-place shared memory)", "memslots v2 with guest_memfd",
                 "private memory (KVM_SET_MEMORY_ATTRIBUTES)", "software-protected VMs", "memory-fault exits",
                 "MAP_GPA_RANGE hypercall exits", "KVM_PRE_FAULT_MEMORY", "hwpoison", "vCPUs running guest code"]
        return [Feature(n, MODEL, why) for n in names]

    def feat(name: str, ok: bool, yes: str, no: str) -> Feature:
        return Feature(name, KERNEL if ok else MODEL, yes if ok else no)

    shared = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    private = bool(caps["MEMORY_ATTRIBUTES"] & MemoryAttribute.PRIVATE)
    sw_vm = bool(caps["VM_TYPES"] & (1 << VmType.SW_PROTECTED))
    gmem = vm_caps["GUEST_MEMFD"] >= 1
    return [
        feat("guest_memfd", gmem, "KVM_CAP_GUEST_MEMFD=1 on a default VM",
             f"KVM_CAP_GUEST_MEMFD={vm_caps['GUEST_MEMFD']} on a default VM"),
        feat("guest_memfd mmap (in-place shared memory)", vm_caps["GUEST_MEMFD_FLAGS"] & shared == shared,
             "default VM reports GUEST_MEMFD_FLAGS MMAP|INIT_SHARED",
             f"KVM_CAP_GUEST_MEMFD_FLAGS={vm_caps['GUEST_MEMFD_FLAGS']:#x} on a default VM"),
        feat("memslots v2 with guest_memfd", bool(caps["USER_MEMORY2"]) and gmem,
             "KVM_CAP_USER_MEMORY2=1", "KVM_CAP_USER_MEMORY2=0 or no guest_memfd"),
        feat("private memory (KVM_SET_MEMORY_ATTRIBUTES)", private and sw_vm,
             "MEMORY_ATTRIBUTES has PRIVATE and SW_PROTECTED VMs exist",
             f"KVM_CAP_MEMORY_ATTRIBUTES={caps['MEMORY_ATTRIBUTES']:#x}"
             + ("" if sw_vm else " and no SW_PROTECTED VM type")),
        feat("software-protected VMs", sw_vm, "KVM_CAP_VM_TYPES has SW_PROTECTED",
             f"KVM_CAP_VM_TYPES={caps['VM_TYPES']:#x} lacks SW_PROTECTED"),
        feat("memory-fault exits", bool(caps["MEMORY_FAULT_INFO"]) and private,
             "KVM_CAP_MEMORY_FAULT_INFO=1 and private memory",
             "private-memory faults need KVM_SET_MEMORY_ATTRIBUTES"),
        feat("MAP_GPA_RANGE hypercall exits", bool(caps["EXIT_HYPERCALL"] & KVM_EXIT_HYPERCALL_VALID_MASK) and private,
             "KVM_CAP_EXIT_HYPERCALL has MAP_GPA_RANGE",
             "conversions need private memory" if caps["EXIT_HYPERCALL"] & KVM_EXIT_HYPERCALL_VALID_MASK
             else f"KVM_CAP_EXIT_HYPERCALL={caps['EXIT_HYPERCALL']:#x}"),
        feat("KVM_PRE_FAULT_MEMORY", bool(caps["PRE_FAULT_MEMORY"]), "KVM_CAP_PRE_FAULT_MEMORY=1",
             "KVM_CAP_PRE_FAULT_MEMORY=0 (no TDP MMU)"),
        Feature("hwpoison", MODEL, "memory-error injection on gmem pages is simulated by the model"),
        Feature("vCPUs running guest code", KERNEL, "KVM_CREATE_VCPU on this device"),
    ]
