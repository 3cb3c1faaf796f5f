"""``Vm``: a KVM VM fd (memslots, guest_memfd creation, memory attributes, vCPUs).

Every method is one VM ioctl. Arguments are encoded into the uapi struct exactly as the
kernel reads them (negative values wrap to their two's-complement u64/u32), so the kernel
decides every errno in its own check order. The only errors raised without calling the
kernel are EBADF on a closed Vm and EINVAL for a value no field of that width can hold.

Lifetimes follow the kernel: a GuestMemfd pins the kernel VM, so closing this fd does not
stop fallocate/punch on its guest_memfds; vCPUs hold their own fds and are not closed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import uapi
from ..encoding import encode_fd, encode_unsigned
from ._fd import FdObject
from ._ioctl import fill_array, ioctl, ioctl_ulong
from .vm_state import VmState

if TYPE_CHECKING:
    from .guest_memfd import GuestMemfd
    from .system import System



def _encode_memslot(s: Any, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                    userspace_addr: int) -> str:
    """Fill the fields v1 and v2 memslot structs share, in field order; returns them for messages."""
    s.slot = encode_unsigned(slot, 32, "slot")
    s.flags = encode_unsigned(flags, 32, "flags")
    s.guest_phys_addr = encode_unsigned(guest_phys_addr, 64, "guest_phys_addr")
    s.memory_size = encode_unsigned(memory_size, 64, "memory_size")
    s.userspace_addr = encode_unsigned(userspace_addr, 64, "userspace_addr")
    return (f"slot={s.slot:#x}, flags={s.flags:#x}, guest_phys_addr={s.guest_phys_addr:#x}, "
            f"memory_size={s.memory_size:#x}, userspace_addr={s.userspace_addr:#x}")

class Vm(VmState, FdObject):
    """An open KVM VM of ``type`` created by ``system``.

    ``close()`` closes the VM fd; the kernel VM lives on while a guest_memfd, a mapping of one,
    or a vCPU fd holds it.
    """

    def __init__(self, system: "System", fd: int, type: int) -> None:  # noqa: A002
        self.system = system
        self.type = type
        self._fd = fd
        # Whether the kernel has KVM_SET_MEMORY_ATTRIBUTES (/dev/kvm's cap; a VM's own is 0
        # without private memory), read now: the VM outlives a closed System.
        self._kernel_has_attributes = bool(system.check_extension(uapi.Cap.MEMORY_ATTRIBUTES))
        self.vcpus: list[Any] = []
        self._vcpu_setup: Any = None  # (kvm_run size, supported CPUID), set by System.create_vm
        self.dirty_ring_bytes = 0
        self._init_shadow()

    def __repr__(self) -> str:
        return f"<kvm.Vm type={self.type} fd={self._fd}>"

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (api.rst 4.4): the cap's value for this VM type.

        :raises OSError: EBADF if closed.
        """
        fd = self._check()
        return ioctl_ulong(fd, uapi.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", cap, "cap")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd (api.rst 4.37) with up to four ``args``.

        :raises OSError: EBADF if closed; EINVAL for an unknown cap, nonzero flags or bad
            args (KVM_CAP_EXIT_HYPERCALL: bits outside 1<<KVM_HC_MAP_GPA_RANGE).
        """
        fd = self._check()
        s = uapi.kvm_enable_cap()
        s.cap = encode_unsigned(cap, 32, "cap")
        s.flags = encode_unsigned(flags, 32, "flags")
        fill_array(s.args, args, "args")
        ioctl(fd, uapi.KVM_ENABLE_CAP, "KVM_ENABLE_CAP", s, f"cap={s.cap}, args={list(s.args)}, flags={s.flags:#x}")
        if s.cap in (uapi.Cap.DIRTY_LOG_RING, uapi.Cap.DIRTY_LOG_RING_ACQ_REL):
            self.dirty_ring_bytes = s.args[0]  # vCPUs map their ring of this size (vcpu_state)

    def create_guest_memfd(self, size: int, flags: int = 0, reserved: Any = None) -> "GuestMemfd":
        """KVM_CREATE_GUEST_MEMFD (api.rst 4.142): a new guest_memfd of ``size`` bytes.

        ``size`` is sent as the u64 the kernel reads as signed, so negative sizes reach it.
        ``reserved`` (six u64, default zeros) is never checked by the kernel.

        :raises OSError: EBADF if closed; then, in the kernel's order: EINVAL for ``flags``
            outside KVM_CAP_GUEST_MEMFD_FLAGS of this VM; EINVAL for ``size`` <= 0 (as s64) or
            not a multiple of 4096; EMFILE/ENOMEM.
        """
        from .guest_memfd import GuestMemfd

        fd = self._check()
        s = uapi.kvm_create_guest_memfd()
        s.size = encode_unsigned(size, 64, "size")
        s.flags = encode_unsigned(flags, 64, "flags")
        fill_array(s.reserved, reserved, "reserved")
        gfd = ioctl(fd, uapi.KVM_CREATE_GUEST_MEMFD, "KVM_CREATE_GUEST_MEMFD", s,
                    f"size={s.size:#x}, flags={s.flags:#x}")
        gmem = GuestMemfd(self, gfd, s.size, s.flags)
        self._remember_gmem(gmem)
        return gmem

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int = 0, guest_memfd: Any = None,
                                guest_memfd_offset: int = 0, pad1: int = 0, pad2: Any = None) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (api.rst 4.140): create, modify or delete (size 0) a memslot.

        ``guest_memfd`` is a GuestMemfd, anything with ``fileno()``, a raw fd (negative wraps
        to u32, -1 → 0xFFFFFFFF) or None (0). A closed object is sent as -1, so the kernel
        reports EBADF at bind time, after its other checks.

        :raises OSError: EBADF if closed; then in kernel order (spec §2.3): EINVAL for slot id
            >= 32764, flags not allowed (LOG_DIRTY or READONLY with GUEST_MEMFD), unaligned or
            oversized memory_size/guest_phys_addr/userspace_addr, unaligned or wrapping
            guest_memfd_offset, bad address space, deleting an empty slot, changing a gmem
            slot; EEXIST for a GPA overlap; then bind: EBADF (fd not open), EINVAL (not a
            guest_memfd, other VM's, offset/size outside the file, file range already bound).
        """
        fd = self._check()
        s = uapi.kvm_userspace_memory_region2()
        what = _encode_memslot(s, slot, flags, guest_phys_addr, memory_size, userspace_addr)
        s.guest_memfd_offset = encode_unsigned(guest_memfd_offset, 64, "guest_memfd_offset")
        s.guest_memfd = encode_fd(guest_memfd, "guest_memfd")
        s.pad1 = encode_unsigned(pad1, 32, "pad1")
        fill_array(s.pad2, pad2, "pad2")
        ioctl(fd, uapi.KVM_SET_USER_MEMORY_REGION2, "KVM_SET_USER_MEMORY_REGION2", s,
              f"{what}, guest_memfd={s.guest_memfd}, guest_memfd_offset={s.guest_memfd_offset:#x}")
        self._remember_memslot(s.slot, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr,
                               s.guest_memfd, s.guest_memfd_offset)

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (api.rst 4.35), the v1 memslot ioctl.

        Same rules as v2, except that any flag beyond LOG_DIRTY_PAGES|READONLY gives EINVAL
        first, so v1 cannot create a gmem slot; it can delete one (size 0).

        :raises OSError: EBADF if closed; EINVAL (flags, then as set_user_memory_region2);
            EEXIST for a GPA overlap.
        """
        fd = self._check()
        s = uapi.kvm_userspace_memory_region()
        what = _encode_memslot(s, slot, flags, guest_phys_addr, memory_size, userspace_addr)
        ioctl(fd, uapi.KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", s, what)
        self._remember_memslot(s.slot, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr)

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (api.rst 4.141): set attributes of [address, address+size).

        :raises OSError: EBADF if closed; ENOTTY if the kernel lacks memory attributes
            (KVM_CAP_MEMORY_ATTRIBUTES == 0, as on this host); else EINVAL for flags != 0,
            attributes outside the VM's supported set, size 0 or wrap, unaligned range; ENOMEM.
        """
        fd = self._check()
        s = uapi.kvm_memory_attributes()
        s.address = encode_unsigned(address, 64, "address")
        s.size = encode_unsigned(size, 64, "size")
        s.attributes = encode_unsigned(attributes, 64, "attributes")
        s.flags = encode_unsigned(flags, 64, "flags")
        ioctl(fd, uapi.KVM_SET_MEMORY_ATTRIBUTES, "KVM_SET_MEMORY_ATTRIBUTES", s,
              f"address={s.address:#x}, size={s.size:#x}, attributes={s.attributes:#x}, flags={s.flags:#x}")
        self._remember_attributes(s.address, s.size, s.attributes)

    def create_vcpu(self, vcpu_id: int) -> Any:
        """KVM_CREATE_VCPU (api.rst 4.7): a new vCPU with ``vcpu_id`` (see ``kvm.vcpu.Vcpu``).

        :raises OSError: EBADF if closed; EINVAL for an id >= KVM_MAX_VCPU_IDS; EEXIST for a
            duplicate id.
        """
        self._check()
        from .vcpu import Vcpu

        vcpu = Vcpu(self, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (api.rst 4.24).

        :raises OSError: EBADF if closed; EEXIST already created; EINVAL after KVM_CREATE_VCPU.
        """
        ioctl(self._check(), uapi.KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP")

    def set_nr_mmu_pages(self, nr_mmu_pages: int) -> None:
        """KVM_SET_NR_MMU_PAGES (api.rst 4.29). :raises OSError: EBADF if closed; EINVAL below 64."""
        fd = self._check()
        n = encode_unsigned(nr_mmu_pages, 64, "nr_mmu_pages")
        # The argument travels by value as an unsigned long; fcntl.ioctl takes a C int.
        ioctl(fd, uapi.KVM_SET_NR_MMU_PAGES, "KVM_SET_NR_MMU_PAGES", n if n < 1 << 31 else -1, f"nr_mmu_pages={n}")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the VM (api.rst 4.56). :raises OSError: EBADF if closed."""
        return ioctl(self._check(), uapi.KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ")
