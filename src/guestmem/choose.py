"""Choosing a backend by what the caller needs: the rule behind ``open_system("auto", needs=...)``
and ``guestmem run``'s ``--backend auto``.

The kernel is chosen when /dev/kvm is usable and can do everything in ``needs``; otherwise the
model, which can do all of them. ``choose_backend`` returns the choice with a one-line reason,
so a caller (the CLI, a test fixture) can say why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from .uapi import Cap, GuestMemfdFlag, MemoryAttribute, VmType

__all__ = ["NEEDS", "Choice", "choose_backend", "kernel_private_memory"]

NEEDS = frozenset({"private_memory", "vcpus", "mmap"})
"""What a caller may need: private memory (a VM type with PRIVATE attributes), vCPUs that run
guest code, and host mmap of guest_memfd (GUEST_MEMFD_FLAG_MMAP)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    """The backend picked (``"kvm"`` or ``"model"``) and why, in one line."""

    backend: str
    reason: str


def kernel_private_memory(system: Any) -> tuple[bool, str]:
    """Whether the kvm ``system`` can give a VM private memory, and why not."""
    types = system.check_extension(Cap.VM_TYPES)
    if not types & (1 << VmType.SW_PROTECTED):
        return False, (f"this kernel has no VM type with private memory (KVM_CAP_VM_TYPES={types:#x} lacks "
                       "SW_PROTECTED)")
    vm = system.create_vm(VmType.SW_PROTECTED)
    try:
        attrs = vm.check_extension(Cap.MEMORY_ATTRIBUTES)
    finally:
        vm.close()
    if not attrs & MemoryAttribute.PRIVATE:
        return False, f"this kernel's KVM_CAP_MEMORY_ATTRIBUTES={attrs:#x} lacks PRIVATE"
    return True, "KVM_CAP_MEMORY_ATTRIBUTES has PRIVATE and SW_PROTECTED VMs exist"


def _kernel_lacks(system: Any, need: str) -> str | None:
    """Why the kernel behind ``system`` cannot do ``need`` (None when it can)."""
    if need == "private_memory":
        ok, why = kernel_private_memory(system)
        return None if ok else why
    if need == "mmap":
        flags = system.check_extension(Cap.GUEST_MEMFD_FLAGS)
        if not flags & GuestMemfdFlag.MMAP:
            return f"this kernel's KVM_CAP_GUEST_MEMFD_FLAGS={flags:#x} lacks MMAP"
        return None
    return None  # "vcpus": any usable /dev/kvm runs vCPUs


def choose_backend(needs: Iterable[str] = (), *, device: str | None = None) -> Choice:
    """The backend for a caller that needs ``needs`` (a subset of ``NEEDS``).

    :raises ValueError: an unknown need.
    """
    from . import kvm_available, open_system

    wanted = list(needs) if not isinstance(needs, str) else [needs]
    unknown = sorted(set(wanted) - NEEDS)
    if unknown:
        raise ValueError(f"unknown need(s) {unknown}: expected some of {sorted(NEEDS)}")
    ok, why = kvm_available(device)
    if not ok:
        return Choice("model", f"no usable KVM ({why})")
    options = {"device": device} if device else {}
    with open_system("kvm", **options) as system:
        for need in wanted:
            lacks = _kernel_lacks(system, need)
            if lacks is not None:
                return Choice("model", f"needs {need.replace('_', ' ')}, but {lacks}")
    if wanted:
        return Choice("kvm", f"the kernel can do everything needed ({', '.join(wanted)})")
    return Choice("kvm", f"{why}")
