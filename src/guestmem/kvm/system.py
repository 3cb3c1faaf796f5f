"""``System``: the /dev/kvm fd (KVM_GET_API_VERSION, KVM_CHECK_EXTENSION, KVM_CREATE_VM).

The system fd is opened O_RDWR|O_CLOEXEC. A closed System fails every method with EBADF;
closing twice is a no-op. VMs created from it are independent fds: closing the System does
not close them (the kernel's VM object does not need /dev/kvm to stay open).
"""

from __future__ import annotations

import os

from .. import uapi
from ..errors import oserror
from ..types import CpuidEntry
from ._fd import FdObject
from ._ioctl import int_arg, ioctl, ioctl_ulong
from .vcpu_state import read_cpuid, read_msr_list
from .vcpu import vcpu_setup
from .vm import Vm


def open_system(device: str | None = None) -> "System":
    """Open ``device`` (default ``$GUESTMEM_KVM_DEVICE`` or /dev/kvm) O_RDWR|O_CLOEXEC.

    :raises OSError: the open(2) errno (ENOENT, EACCES, ...), with the device path.
    """
    if device is None:
        device = os.environ.get("GUESTMEM_KVM_DEVICE", "/dev/kvm")
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise oserror(exc.errno, f"cannot open KVM device {device}") from None
    return System(fd, device)


class System(FdObject):
    """An open KVM device (``/dev/kvm``)."""

    backend = "kvm"

    def __init__(self, fd: int, device: str = "/dev/kvm") -> None:
        self._fd = fd
        self.device = device

    def __repr__(self) -> str:
        return f"<kvm.System {self.device} fd={self._fd}>"

    def api_version(self) -> int:
        """KVM_GET_API_VERSION (api.rst 4.1); 12 on every kernel since 2.6.22.

        :raises OSError: EBADF if closed.
        """
        return ioctl(self._check(), uapi.KVM_GET_API_VERSION, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm (api.rst 4.4): the cap's value, 0 if unknown.

        :raises OSError: EBADF if closed.
        """
        fd = self._check()
        return ioctl_ulong(fd, uapi.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", cap, "cap")

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE (api.rst 4.5): bytes to mmap on a vCPU fd for kvm_run.

        :raises OSError: EBADF if closed.
        """
        return ioctl(self._check(), uapi.KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_SUPPORTED_CPUID (api.rst 4.46). :raises OSError: EBADF if closed."""
        return read_cpuid(self._check(), uapi.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def get_emulated_cpuid(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_EMULATED_CPUID (api.rst 4.99): features KVM emulates in software (e.g.
        MOVBE, RDPID), which userspace may expose though the host CPU lacks them.

        :raises OSError: EBADF if closed.
        """
        return read_cpuid(self._check(), uapi.KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID")

    def get_msr_index_list(self) -> tuple[int, ...]:
        """KVM_GET_MSR_INDEX_LIST (api.rst 4.3). :raises OSError: EBADF if closed."""
        return read_msr_list(self._check(), uapi.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def get_msr_feature_index_list(self) -> tuple[int, ...]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST (api.rst 4.3). :raises OSError: EBADF if closed."""
        return read_msr_list(self._check(), uapi.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def create_vm(self, type: int = 0) -> "Vm":  # noqa: A002 - the uapi argument name
        """KVM_CREATE_VM (api.rst 4.2): a new VM of ``type`` (``uapi.VmType``).

        :raises OSError: EBADF if closed; EINVAL if ``type`` is not in KVM_CAP_VM_TYPES;
            ENOMEM/EMFILE on resource exhaustion.
        """
        fd = self._check()
        arg = int_arg(type, "type")
        setup = vcpu_setup(self)  # the VM's vCPUs need no open System (see vcpu_setup)
        vm_fd = ioctl(fd, uapi.KVM_CREATE_VM, "KVM_CREATE_VM", arg, f"type={type}")
        vm = Vm(self, vm_fd, arg & 0xFFFFFFFF)
        vm._vcpu_setup = setup
        return vm


