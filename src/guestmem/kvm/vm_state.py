"""What a KVM VM fd has beyond memslots and guest_memfd: interrupts, eventfds, the dirty log,
binary stats, and the shadow of what this process set.

``VmState`` is mixed into ``vm.Vm``. Each public method is one VM ioctl with its struct
converted here, except the three shadow readers (``memslots``, ``get_memory_attributes``,
``stats``): the kernel has no GET for memslots or memory attributes, so, as QEMU does, the
Vm remembers the arguments of every *successful* KVM_SET_USER_MEMORY_REGION{,2} (deletion
included) and KVM_SET_MEMORY_ATTRIBUTES call made through it. Calls made on the raw fd
behind its back are not seen.

Shadow data model: ``_regions`` maps slot (as_id << 16 | id) to a frozen ``MemoryRegion``;
``_attr_shadow`` is a RangeMap over GFNs (gaps = 0); ``_gmem_files`` holds the guest_memfds
created through this Vm (weakly), to count them and to know a bound file's flags.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import weakref
from typing import Any

from .. import uapi
from ..encoding import check_int, encode_fd, encode_unsigned
from ..errors import oserror
from ..rangemap import RangeMap
from ..types import DirtyLog, MemoryRegion
from ._ioctl import ioctl
from .stats import StatsFd

_U64 = (1 << 64) - 1


def _int(value: Any, name: str) -> int:
    check_int(value, name)  # the input contract (README): bool is an int, nothing is converted
    return value


def bitmap_bytes(npages: int) -> int:
    """Bytes of a dirty bitmap for ``npages``: rounded up to whole u64 words, as the kernel
    writes it (kvm_dirty_bitmap_bytes)."""
    return (npages + 63) // 64 * 8


_shadowed: "weakref.WeakSet[VmState]" = weakref.WeakSet()


def _new_shadow_locks_in_child() -> None:
    # A fork taken while another thread recorded a memslot: the child's copy of that lock
    # would stay held (the ioctls themselves answer EIO in the child, the shadow still reads).
    for vm in list(_shadowed):
        vm._shadow_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_shadow_locks_in_child)


class VmState:
    """Interrupt, eventfd, dirty-log and stats ioctls of a KVM VM, and its shadow."""

    def _init_shadow(self) -> None:
        self._shadow_lock = threading.Lock()
        _shadowed.add(self)
        self._regions: dict[int, MemoryRegion] = {}
        self._attr_shadow: RangeMap[int] = RangeMap()
        self._gmem_files: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()

    # --- the shadow ---------------------------------------------------------------------------

    def _remember_gmem(self, gmem: Any) -> None:
        self._gmem_files[id(gmem)] = gmem

    def _remember_memslot(self, slot: int, flags: int, gpa: int, size: int, uaddr: int,
                          guest_memfd: int = 0, offset: int = 0) -> None:
        """Record a successful memslot call (size 0 deletes), with the values the kernel read."""
        with self._shadow_lock:
            if size == 0:
                self._regions.pop(slot, None)
                return
            old = self._regions.get(slot)
            gmem_only = old.gmem_only if old is not None else False
            if old is None and flags & uapi.MemFlag.GUEST_MEMFD:
                gmem_only = any(g.flags & uapi.GuestMemfdFlag.MMAP and not g.closed and g.fileno() == guest_memfd
                                for g in list(self._gmem_files.values()))
            self._regions[slot] = MemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size,
                                               userspace_addr=uaddr, guest_memfd_offset=offset,
                                               guest_memfd=guest_memfd, gmem_only=gmem_only)

    def _remember_attributes(self, address: int, size: int, attributes: int) -> None:
        with self._shadow_lock:
            self._attr_shadow.set(address >> uapi.PAGE_SHIFT, (address + size) >> uapi.PAGE_SHIFT, attributes)

    def memslots(self) -> list[MemoryRegion]:
        """guestmem extension (no ioctl): the memslots set through this Vm, sorted by (as_id, id).

        :raises OSError: EBADF if closed.
        """
        self._check()  # type: ignore[attr-defined]
        with self._shadow_lock:
            return [self._regions[k] for k in sorted(self._regions)]

    def get_memory_attributes(self, address: int, size: int) -> list[tuple[int, int, int]]:
        """guestmem extension (no ioctl): attributes set through this Vm over [address, address+size).

        Byte ranges (start, end, attributes) tiling the range, gaps as 0, as on the model.

        :raises OSError: EBADF if closed; ENOTTY if the kernel has no memory attributes
            (KVM_CAP_MEMORY_ATTRIBUTES == 0, as on this host); EINVAL for an empty, wrapping
            or unaligned range.
        """
        self._check()  # type: ignore[attr-defined]
        address, size = encode_unsigned(_int(address, "address"), 64, "address"), encode_unsigned(_int(size, "size"), 64, "size")
        # /dev/kvm's value says whether the kernel has the ioctl (a VM's is 0 without private memory).
        if not self._kernel_has_attributes:  # type: ignore[attr-defined]
            raise oserror(errno.ENOTTY, "this kernel has no memory attributes (KVM_CAP_MEMORY_ATTRIBUTES is 0)")
        if size == 0 or address + size > _U64:
            raise oserror(errno.EINVAL, f"attribute range [{address:#x}, +{size:#x}) is empty or wraps")
        if address % uapi.PAGE_SIZE or size % uapi.PAGE_SIZE:
            raise oserror(errno.EINVAL, f"attribute range [{address:#x}, +{size:#x}) is not page aligned")
        with self._shadow_lock:
            runs = self._attr_shadow.ranges(address >> uapi.PAGE_SHIFT, (address + size) >> uapi.PAGE_SHIFT)
        return [(s << uapi.PAGE_SHIFT, e << uapi.PAGE_SHIFT, v) for s, e, v in runs]

    def stats(self) -> dict[str, Any]:
        """guestmem extension: counters of the shadow, with the model's names for them
        (``memslots``, ``memslot_pages``, ``attribute_ranges``, ``guest_memfds``), plus the
        kernel's own VM statistics (KVM_GET_STATS_FD) under ``kernel``.

        :raises OSError: EBADF if closed (as every method of a closed Vm, on both backends).
        """
        self._check()  # type: ignore[attr-defined]
        with self._shadow_lock:
            out: dict[str, Any] = {
                "memslots": len(self._regions),
                "memslot_pages": sum(r.npages for r in self._regions.values()),
                "attribute_ranges": len(self._attr_shadow),
                "guest_memfds": sum(1 for g in list(self._gmem_files.values()) if not g.released),
            }
        if self.closed:  # type: ignore[attr-defined]
            return out  # closed by another thread meanwhile: the shadow is still a consistent answer
        try:
            with self.get_stats_fd() as sfd:
                out["kernel"] = sfd.read().as_dict()
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
        return out

    # --- interrupts and eventfds --------------------------------------------------------------

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE (api.rst 4.25): set GSI ``irq`` of the in-kernel irqchip to ``level``.

        :raises OSError: EBADF if closed; ENXIO without an in-kernel irqchip. A GSI without
            a route is accepted (measured: 4096 gives 0).
        """
        fd = self._check()  # type: ignore[attr-defined]
        s = uapi.kvm_irq_level(irq=encode_unsigned(_int(irq, "irq"), 32, "irq"),
                               level=encode_unsigned(_int(level, "level"), 32, "level"))
        ioctl(fd, uapi.KVM_IRQ_LINE, "KVM_IRQ_LINE", s, f"irq={s.irq}, level={s.level}")

    def irqfd(self, fd: Any, gsi: int, flags: int = 0, resamplefd: Any = None) -> None:
        """KVM_IRQFD (api.rst 4.75): a write to eventfd ``fd`` raises GSI ``gsi``
        (``flags`` ``uapi.IrqfdFlag``: DEASSIGN removes it, RESAMPLE adds ``resamplefd``).

        ``fd``/``resamplefd`` are fds or objects with ``fileno()`` (``os.eventfd()`` gives one).

        :raises OSError: EBADF if closed; then in the kernel's order EINVAL for unknown flags;
            EINVAL without an in-kernel irqchip (x86 kvm_arch_irqfd_allowed); EBADF ``fd``
            not open; EINVAL ``fd`` not an eventfd; EBUSY that eventfd already assigned on
            this VM. DEASSIGN of an eventfd never assigned succeeds (kvm_irqfd_deassign).
        """
        vm_fd = self._check()  # type: ignore[attr-defined]
        s = uapi.kvm_irqfd()
        s.fd = encode_fd(fd, "fd")
        s.gsi = encode_unsigned(_int(gsi, "gsi"), 32, "gsi")
        s.flags = encode_unsigned(_int(flags, "flags"), 32, "flags")
        s.resamplefd = encode_fd(resamplefd, "resamplefd")
        ioctl(vm_fd, uapi.KVM_IRQFD, "KVM_IRQFD", s,
              f"fd={s.fd}, gsi={s.gsi}, flags={s.flags:#x}, resamplefd={s.resamplefd}")

    def ioeventfd(self, fd: Any, addr: int, len: int, datamatch: int = 0, flags: int = 0) -> None:  # noqa: A002
        """KVM_IOEVENTFD (api.rst 4.59): a guest write of ``len`` bytes to MMIO (or, with
        ``IoeventfdFlag.PIO``, port) ``addr`` signals eventfd ``fd`` instead of exiting; with
        DATAMATCH only when the value is ``datamatch``; DEASSIGN removes it.

        :raises OSError: EBADF if closed; then in the kernel's order EINVAL for flags outside
            the valid mask, a ``len`` other than 0/1/2/4/8, 0 with DATAMATCH, or an address
            range that wraps; EBADF ``fd`` not open; EINVAL ``fd`` not an eventfd; EEXIST the
            same (addr, len, datamatch) already registered; ENOENT DEASSIGN of one that is not.
        """
        vm_fd = self._check()  # type: ignore[attr-defined]
        s = uapi.kvm_ioeventfd()
        s.datamatch = encode_unsigned(_int(datamatch, "datamatch"), 64, "datamatch")
        s.addr = encode_unsigned(_int(addr, "addr"), 64, "addr")
        s.len = encode_unsigned(_int(len, "len"), 32, "len")
        raw = encode_fd(fd, "fd")
        s.fd = raw - (1 << 32) if raw >= 1 << 31 else raw
        s.flags = encode_unsigned(_int(flags, "flags"), 32, "flags")
        ioctl(vm_fd, uapi.KVM_IOEVENTFD, "KVM_IOEVENTFD", s,
              f"fd={s.fd}, addr={s.addr:#x}, len={s.len}, datamatch={s.datamatch:#x}, flags={s.flags:#x}")

    # --- dirty log ----------------------------------------------------------------------------

    def _slot_pages(self, slot: int) -> int:
        with self._shadow_lock:
            region = self._regions.get(slot)
        return region.npages if region is not None else 0

    def get_dirty_log(self, slot: int, npages: int | None = None) -> DirtyLog:
        """KVM_GET_DIRTY_LOG (api.rst 4.8): the pages of memslot ``slot`` the guest wrote since
        the last call (without manual protect, the call also clears and re-protects them).

        The bitmap is sized from the memslot shadow; pass ``npages`` for a slot set behind
        this Vm's back (at least its size: the kernel writes the slot's whole bitmap). The
        result holds ``npages`` pages.

        :raises OSError: EBADF if closed; EINVAL for an as_id or id out of range; ENOENT for
            a slot that does not exist or lacks KVM_MEM_LOG_DIRTY_PAGES; ENXIO when the VM
            uses the dirty ring without a bitmap.
        """
        fd = self._check()  # type: ignore[attr-defined]
        slot = encode_unsigned(_int(slot, "slot"), 32, "slot")
        known = self._slot_pages(slot)
        n = known if npages is None else encode_unsigned(_int(npages, "npages"), 32, "npages")
        # The kernel writes the whole slot's bitmap whatever npages says: never less room than that.
        buf = (ctypes.c_uint8 * max(bitmap_bytes(n), bitmap_bytes(known), 8))()
        s = uapi.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(buf))
        ioctl(fd, uapi.KVM_GET_DIRTY_LOG, "KVM_GET_DIRTY_LOG", s, f"slot={slot:#x}")
        return DirtyLog(slot=slot, npages=n, bitmap=bytes(buf)[:bitmap_bytes(n)])

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (api.rst 4.117): clear and re-protect the pages set in ``bitmap``
        (bit i = page first_page + i; None = all ``num_pages``); meant for VMs with
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled, accepted without it.

        :raises OSError: EBADF if closed; then in the kernel's order ENXIO with a dirty ring;
            EINVAL an as_id/id out of range; EINVAL ``first_page`` not a multiple of 64;
            ENOENT a slot without a dirty bitmap; EINVAL a range beyond the slot or
            ``num_pages`` not a multiple of 64 short of the slot's end; EFAULT a bitmap with
            fewer than ``num_pages`` bits.
        """
        fd = self._check()  # type: ignore[attr-defined]
        slot = encode_unsigned(_int(slot, "slot"), 32, "slot")
        first_page = encode_unsigned(_int(first_page, "first_page"), 64, "first_page")
        num_pages = encode_unsigned(_int(num_pages, "num_pages"), 32, "num_pages")
        if bitmap is None:
            bitmap = b"\xff" * bitmap_bytes(num_pages)
        if not isinstance(bitmap, (bytes, bytearray)):
            raise TypeError(f"bitmap must be bytes, not {type(bitmap).__name__}")
        # The kernel copies whole u64 words after its checks: a bitmap with a bit for every page
        # is padded with zeros to that; a shorter one is passed as NULL, so the copy faults
        # (EFAULT) where the kernel's checks put it, last.
        size = max(len(bitmap), bitmap_bytes(num_pages), 8)
        buf = (ctypes.c_uint8 * size).from_buffer_copy(bytes(bitmap).ljust(size, b"\0"))
        short = len(bitmap) < (num_pages + 7) // 8
        s = uapi.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                     dirty_bitmap=0 if short else ctypes.addressof(buf))
        ioctl(fd, uapi.KVM_CLEAR_DIRTY_LOG, "KVM_CLEAR_DIRTY_LOG", s,
              f"slot={slot:#x}, first_page={first_page:#x}, num_pages={num_pages}, bitmap of {len(bitmap)} bytes")

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS (api.rst 4.128): re-protect the pages of every ring entry
        userspace marked harvested (``Vcpu.collect_dirty_ring``); returns how many.

        :raises OSError: EBADF if closed; EINVAL without KVM_CAP_DIRTY_LOG_RING enabled.
        """
        return ioctl(self._check(), uapi.KVM_RESET_DIRTY_RINGS, "KVM_RESET_DIRTY_RINGS")  # type: ignore[attr-defined]

    # --- statistics ---------------------------------------------------------------------------

    def get_stats_fd(self) -> StatsFd:
        """KVM_GET_STATS_FD on the VM (api.rst 4.134): the VM's binary statistics.

        :raises OSError: EBADF if closed; ENOTTY before Linux 5.14.
        """
        fd = ioctl(self._check(), uapi.KVM_GET_STATS_FD, "KVM_GET_STATS_FD")  # type: ignore[attr-defined]
        return StatsFd(fd, "VM")
