"""The backend interface: one Protocol per kernel object, implemented by kvm and model.

``guestmem.kvm`` drives /dev/kvm; ``guestmem.model`` implements the same behaviour in
software. Upper layers (vmm, cli) use only these methods. Every failure is
``OSError(errno)`` with the kernel's errno; a closed object fails every method with EBADF.
"""

from __future__ import annotations

from typing import Any, Protocol, Self, runtime_checkable

from .hostmem import MAP_SHARED, PROT_READ, PROT_WRITE, Mapping
from .types import Exit, FileStat, Regs, Sregs, StatFs


@runtime_checkable
class Closable(Protocol):
    """What every object below shares: it owns an fd. ``close()`` is idempotent; once closed,
    ``closed`` is True and every other method fails with EBADF. As a context manager the
    object is itself (EBADF if already closed) and closes on exit."""

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run."""

    def close(self) -> None:
        """close(2) the fd."""

    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class GuestMemfd(Closable, Protocol):
    size: int
    flags: int

    def fileno(self) -> int:
        """The file descriptor of this guest_memfd."""

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the guest_memfd: allocate (mode 0) or PUNCH_HOLE|KEEP_SIZE; EINVAL/EOPNOTSUPP per the kernel's rules."""

    def allocate(self, offset: int, length: int) -> None:
        """Allocate (fallocate mode 0) ``length`` bytes at ``offset``."""

    def punch_hole(self, offset: int, length: int) -> None:
        """Free ``length`` bytes at ``offset`` (fallocate PUNCH_HOLE|KEEP_SIZE); invalidates guest mappings."""

    def fstat(self) -> FileStat:
        """fstat(2): size, blocks allocated, mode and times as a ``FileStat``."""

    def fstatfs(self) -> StatFs:
        """fstatfs(2): f_type names the filesystem (anon inodes until 6.18, guest_memfd's own from 6.19)."""

    def mmap(self, length: int | None = None, offset: int = 0, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_SHARED) -> Mapping:
        """mmap(2) of the file (needs GUEST_MEMFD_FLAG_MMAP): ENODEV without it, EPERM for PROT_EXEC, EINVAL for MAP_PRIVATE."""

    def read(self, n: int) -> bytes:
        """read(2) at the file position (guest_memfd has no read: EINVAL from the VFS)."""

    def write(self, data: bytes) -> int:
        """write(2) at the file position (EINVAL unless the kernel populates shared pages by write)."""

    def pread(self, n: int, offset: int) -> bytes:
        """pread(2) at ``offset``."""

    def pwrite(self, data: bytes, offset: int) -> int:
        """pwrite(2) at ``offset``."""

    def lseek(self, offset: int, whence: int) -> int:
        """lseek(2); SEEK_SET/CUR/END as the kernel's generic llseek."""

    def truncate(self, length: int) -> None:
        """ftruncate(2): guest_memfd's size is fixed (EINVAL)."""

    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0,
                              reserved: Any = None) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on the file (in-place conversion; ENOTTY where the kernel lacks it)."""

    def close(self) -> None:
        """Close the file; memory belongs to the inode and stays while a memslot still binds it."""


@runtime_checkable
class Vcpu(Closable, Protocol):
    vcpu_id: int

    def get_regs(self) -> Regs:
        """KVM_GET_REGS (api.rst 4.11): the general-purpose registers."""

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS (api.rst 4.12): EINVAL for a value that does not fit its field."""

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS (api.rst 4.13): segments, descriptor tables, control registers, EFER, APIC base."""

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS (api.rst 4.14): EINVAL for CR0/CR4/EFER combinations the kernel refuses."""

    def run(self) -> Exit:
        """KVM_RUN (api.rst 4.10): run until an exit, returned as an exit dataclass (MEMORY_FAULT included)."""

    def complete_io(self, data: bytes | None) -> None:
        """Answer a KVM_EXIT_IO IN with ``data`` (None after an OUT: nothing to answer)."""

    def complete_mmio(self, data: bytes | None) -> None:
        """Answer a KVM_EXIT_MMIO read with ``data`` (None after a write)."""

    def set_hypercall_ret(self, value: int) -> None:
        """The value KVM_EXIT_HYPERCALL returns to the guest in RAX on the next KVM_RUN."""

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY (api.rst 4.143): map ``size`` bytes at ``gpa`` ahead of use; returns what is left."""

    def kick(self) -> None:
        """Make a KVM_RUN in another thread return KVM_EXIT_INTR (immediate_exit plus a signal)."""

    def close(self) -> None:
        """Close the vCPU fd."""


@runtime_checkable
class Vm(Closable, Protocol):
    type: int

    def fileno(self) -> int:
        """The VM file descriptor."""

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (api.rst 4.4): the capability's value for this VM type."""

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP (api.rst 4.37) with ``args`` (up to four)."""

    def create_guest_memfd(self, size: int, flags: int = 0, reserved: Any = None) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD (api.rst 4.142): a guest_memfd of ``size`` bytes with ``flags``."""

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int = 0, guest_memfd: Any = None,
                                guest_memfd_offset: int = 0, pad1: int = 0, pad2: Any = None) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (api.rst 4.140): add, move, modify or delete a memslot, with a guest_memfd binding."""

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (api.rst 4.35): the v1 memslot ioctl."""

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (api.rst 4.141): make a GPA range private or shared."""

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU (api.rst 4.7): EINVAL for an id beyond the limit, EEXIST for a duplicate."""

    def close(self) -> None:
        """Close the VM fd; the VM lives on while a guest_memfd or vCPU still pins it."""


@runtime_checkable
class System(Closable, Protocol):
    backend: str

    def api_version(self) -> int:
        """KVM_GET_API_VERSION (api.rst 4.1): 12."""

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm (api.rst 4.4)."""

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE (api.rst 4.5): the size of a vCPU's kvm_run mapping."""

    def create_vm(self, type: int = 0) -> Vm:
        """KVM_CREATE_VM (api.rst 4.2): a VM of ``type`` (0, or a type KVM_CAP_VM_TYPES lists)."""

    def close(self) -> None:
        """Close /dev/kvm; VMs already created live on."""
