"""The model's /dev/kvm handle: capabilities and VM creation (kvm_dev_ioctl).

Data model
----------
A ``System`` holds the chosen ``Profile`` (the kernel being reproduced) and a reserved fd.
It owns nothing else: VMs reference the System only for their profile and capability
answers, and outlive its close (a VM does not depend on the /dev/kvm fd staying open).
Capability values are computed in one place, ``_extension``, for both the /dev/kvm fd
(``vm=None``) and VM fds, from the profile and the VM's type (spec 1.2).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from ..encoding import encode_unsigned
from ..errors import oserror
from ..types import CpuidEntry
from ..uapi import (KVM_ADDRESS_SPACE_NUM, KVM_API_VERSION, KVM_EXIT_HYPERCALL_VALID_MASK, KVM_USER_MEM_SLOTS,
                    KVM_VCPU_MMAP_PAGES, PAGE_SIZE, Cap, MemoryAttribute)
from . import fdtable
from .profile import DEFAULT_PROFILE, GUESTMEM_TDX_LIKE_VM, HOST_CAPS, HOST_VM_CAPS, UNCLAIMED_CAPS, Profile, resolve_profile

if TYPE_CHECKING:
    from .vm import Vm

_PRIVATE = int(MemoryAttribute.PRIVATE)  # KVM_CAP_MEMORY_ATTRIBUTES' value: the attribute bits, a plain int


class System(fdtable.FdObject):
    """A model KVM system handle, returned by ``open_system(backend="model")``.

    ``close()`` closes the system fd; existing VMs stay usable.
    """

    backend = "model"

    def __init__(self, profile: Profile) -> None:
        self._profile = profile
        self._fd: int | None = fdtable.fd_install(self)

    @property
    def profile(self) -> str:
        """guestmem extension: the name of the kernel profile the model reproduces."""
        return self._profile.name

    def __repr__(self) -> str:
        return f"<model System profile={self._profile.name!r} fd={self._fd}>"

    def _what(self) -> str:
        return "KVM system fd"

    def api_version(self) -> int:
        """KVM_GET_API_VERSION (api.rst 4.1): always 12. :raises OSError: EBADF if closed."""
        self._check()
        return KVM_API_VERSION

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE (api.rst 4.5): 3 pages on x86. :raises OSError: EBADF if closed."""
        self._check()
        return KVM_VCPU_MMAP_PAGES * PAGE_SIZE

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm (api.rst 4.4): the cap's value; 0 if unknown.

        :raises OSError: EBADF if closed. Mirrors kvm_vm_ioctl_check_extension_generic (kvm == NULL).
        """
        self._check()
        return self._extension(encode_unsigned(cap, 64, "cap"), None)

    def _extension(self, cap: int, vm: "Vm | None") -> int:
        """Capability values of spec 1.2 for the profile, on /dev/kvm (vm None) or a VM."""
        p = self._profile
        private = vm is not None and vm._private_mem
        if cap == Cap.USER_MEMORY or cap == Cap.USER_MEMORY2 or cap == Cap.MEMORY_FAULT_INFO:
            return 1
        if cap == Cap.NR_MEMSLOTS:
            return KVM_USER_MEM_SLOTS
        if cap == Cap.READONLY_MEM:
            return 1  # no model VM type has protected state
        if cap == Cap.MULTI_ADDRESS_SPACE:
            if not p.smm:
                return 0  # KVM_MAX_NR_ADDRESS_SPACES == 1: the cap is compiled out
            return KVM_ADDRESS_SPACE_NUM if vm is None else p.address_spaces(private)
        if cap == Cap.EXIT_HYPERCALL:
            return KVM_EXIT_HYPERCALL_VALID_MASK
        if cap == Cap.MEMORY_ATTRIBUTES:
            if not p.memory_attributes or p.gmem_in_place_conversion:
                return 0  # in-place conversion: attributes are set on the guest_memfd instead
            return _PRIVATE if vm is None or private else 0
        if cap == p.gmem_attributes_cap and p.gmem_in_place_conversion:
            return _PRIVATE if vm is None or private else 0
        if cap == Cap.GUEST_MEMFD:
            if p.gmem_private_only and vm is not None and not private:
                return 0
            return 1
        if cap == Cap.VM_TYPES:
            return p.vm_types_cap
        if cap == Cap.PRE_FAULT_MEMORY:
            return 1 if p.tdp and p.pre_fault_memory else 0
        if cap == Cap.GUEST_MEMFD_FLAGS:
            return p.gmem_flags(private, vm is not None and vm.type == GUESTMEM_TDX_LIKE_VM)
        if cap in UNCLAIMED_CAPS:
            return 0
        if vm is not None and cap in HOST_VM_CAPS:
            return HOST_VM_CAPS[cap]
        return HOST_CAPS.get(cap, 0)

    def get_supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_SUPPORTED_CPUID (api.rst 4.46): the CPUID leaves of the emulated CPU.

        They are Unicorn's x86-64 CPU's own answers (guestmem.model.cpuid), so a guest given
        this table sees the CPU that runs it. E2BIG for a too small buffer is decided where
        the struct is. :raises OSError: EBADF if closed.
        """
        self._check()
        from .cpuid import supported_cpuid

        return supported_cpuid()

    def get_emulated_cpuid(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_EMULATED_CPUID (api.rst 4.99): features emulated beyond the CPU's own.

        Empty: the model's whole CPU is emulated and KVM_GET_SUPPORTED_CPUID already lists
        everything it implements. :raises OSError: EBADF if closed.
        """
        self._check()
        return ()

    def get_msr_index_list(self) -> tuple[int, ...]:
        """KVM_GET_MSR_INDEX_LIST (api.rst 4.3): the MSRs KVM_GET_MSRS/SET_MSRS accept.

        :raises OSError: EBADF if closed.
        """
        self._check()
        from .cpuid import MSRS

        return tuple(MSRS)

    def get_msr_feature_index_list(self) -> tuple[int, ...]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST (api.rst 4.3): feature MSRs; the model has none.

        :raises OSError: EBADF if closed.
        """
        self._check()
        return ()

    def create_vm(self, type: int = 0) -> "Vm":
        """KVM_CREATE_VM (api.rst 4.2): a new model VM of ``type``.

        Errors: EBADF closed; EINVAL type not supported by the profile (KVM_CAP_VM_TYPES,
        plus the model's GUESTMEM_TDX_LIKE_VM when memory attributes exist). Mirrors
        kvm_dev_ioctl_create_vm / kvm_arch_init_vm.
        """
        self._check()
        type = encode_unsigned(type, 32, "type")  # noqa: A001 - the uapi argument name
        if type not in self._profile.vm_types:
            raise oserror(errno.EINVAL, f"VM type {type:#x} is not supported (KVM_CAP_VM_TYPES)")
        from .vm import Vm

        return Vm(self, type)


def open_system(profile: str | Profile = DEFAULT_PROFILE, **options: Any) -> System:
    """Open a model System reproducing ``profile``: a name in ``PROFILES`` (default: the newest,
    ``DEFAULT_PROFILE``) or ``"host"``, the one closest to the running kernel (``host_profile``).

    Keyword ``options`` override single profile fields, e.g. ``memory_attributes=False``.
    """
    return System(resolve_profile(profile, **options))
