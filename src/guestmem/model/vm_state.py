"""The model VM's interrupt lines, irqfds, ioeventfds, dirty log and stats fd.

Data model
----------
``VmState`` is mixed into ``vm.Vm`` and guarded by its ``_lock``.

* ``_irq_levels``: GSI -> last level from KVM_IRQ_LINE. The model emulates no PIC or IOAPIC
  (``Vm.create_irqchip``), so levels and irqfds are recorded, never delivered to a vCPU.
* ``_irqfds``: eventfd id -> (gsi, resample eventfd id or None), as kvm_irqfd_assign keeps
  one irqfd per eventfd and VM.
* ``_ioeventfds``: the registered ``_Ioeventfd`` records, each holding its own dup of the
  eventfd (the kernel holds an eventfd_ctx reference), so a guest write still signals it
  after the caller closed its fd. They *are* delivered: a model vCPU whose exit is an OUT
  or an MMIO write matching one writes 1 to the eventfd and resumes the guest instead of
  exiting (``_ioeventfd_signal``), as the in-kernel io bus does.
* ``_dirty``: (as_id, id) -> RangeMap of dirty slot pages (True), one per memslot with
  KVM_MEM_LOG_DIRTY_PAGES, created when the flag appears (all set with
  KVM_DIRTY_LOG_INITIALLY_SET), kept across a MOVE, dropped with the flag or the slot.
  Pages are logged the way KVM logs them: vCPUs map a logged slot with 4 KiB pages,
  read-only until the page is dirty; the write fault marks it (``_log_dirty``) and maps it
  writable. Reading the log without manual protect clears it and invalidates the dirty
  runs, which write-protects them again (``exits.map_backing`` / ``handle_fault``).
  Exception frames the model pushes are logged too (``guest_phys.write_guest_phys``).
  Host writes through ``userspace_addr`` are not, as on KVM.
* ``_manual_dirty``: the KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 options enabled on the VM.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any

from ..encoding import check_int, encode_fd, encode_unsigned
from ..errors import oserror
from ..rangemap import RangeMap
from ..types import DirtyLog, IoExit, MmioExit, bitmap_runs
from ..uapi import (KVM_IOEVENTFD_VALID_FLAG_MASK, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                    KVM_USER_MEM_SLOTS, IoeventfdFlag, IoDirection, IrqfdFlag, MemFlag)
from . import fdtable
from .stats import StatsFd

_INT_MAX = (1 << 31) - 1
_U64 = (1 << 64) - 1
_BUS_MMIO, _BUS_PIO, _BUS_CCW = 0, 1, 2


def _int(value: Any, name: str) -> int:
    check_int(value, name)  # the input contract (README): bool is an int, nothing is converted
    return value


def _eventfd(fd: int, what: str) -> int:
    """The eventfd id of ``fd`` (eventfd_ctx_fdget): EBADF if not open, EINVAL if not an eventfd."""
    if fd > _INT_MAX or fd < 0:
        raise oserror(errno.EBADF, f"{what} {fd} is not an open file descriptor")
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        raise oserror(errno.EBADF, f"{what} {fd} is not an open file descriptor") from None
    if fdtable.lookup(fd) is not None:
        raise oserror(errno.EINVAL, f"{what} {fd} is not an eventfd")
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
            raise oserror(errno.EINVAL, f"{what} {fd} is not an eventfd")
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("eventfd-id:"):
                    return int(line.split(":")[1])
    except OSError as exc:
        raise oserror(errno.EINVAL, f"{what} {fd}: {exc.strerror}") from None
    return -fd  # a kernel without eventfd-id in fdinfo: the fd number stands for the file


class _Ioeventfd:
    __slots__ = ("bus", "addr", "len", "wildcard", "datamatch", "eventfd", "dup")

    def __init__(self, bus: int, addr: int, length: int, wildcard: bool, datamatch: int, eventfd: int,
                 dup: int) -> None:
        self.bus, self.addr, self.len, self.wildcard = bus, addr, length, wildcard
        self.datamatch, self.eventfd, self.dup = datamatch, eventfd, dup

    def collides(self, o: "_Ioeventfd") -> bool:
        """ioeventfd_check_collision: same bus and address, lengths and datamatch overlapping."""
        return (self.bus == o.bus and self.addr == o.addr and
                (not self.len or not o.len or
                 (self.len == o.len and (self.wildcard or o.wildcard or self.datamatch == o.datamatch))))

    def matches(self, bus: int, addr: int, data: bytes) -> bool:
        """ioeventfd_in_range: a write of ``data`` at ``addr`` on ``bus`` signals this one."""
        if bus != self.bus or addr != self.addr or (self.len and len(data) != self.len):
            return False
        return self.wildcard or int.from_bytes(data, "little") == self.datamatch


class VmState:
    """KVM_IRQ_LINE, KVM_IRQFD, KVM_IOEVENTFD, KVM_{GET,CLEAR}_DIRTY_LOG, KVM_GET_STATS_FD."""

    def _init_vm_state(self) -> None:
        self._irq_levels: dict[int, int] = {}
        self._irqfds: dict[int, tuple[int, int | None]] = {}
        self._ioeventfds: list[_Ioeventfd] = []
        self._dirty: dict[tuple[int, int], RangeMap[bool]] = {}
        self._manual_dirty = 0

    # --- interrupts and eventfds --------------------------------------------------------------

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE (api.rst 4.25): record ``level`` of GSI ``irq`` (not delivered).

        Errors, in order: EBADF closed fd; ENXIO without an in-kernel irqchip. Mirrors
        kvm_vm_ioctl_irq_line.
        """
        self._check()  # type: ignore[attr-defined]  # EBADF before the arguments (and again under the lock)
        irq = encode_unsigned(_int(irq, "irq"), 32, "irq")
        level = encode_unsigned(_int(level, "level"), 32, "level")
        with self._lock:  # type: ignore[attr-defined]
            self._check()  # type: ignore[attr-defined]
            if not self._irqchip:  # type: ignore[attr-defined]
                raise oserror(errno.ENXIO, "KVM_IRQ_LINE without an in-kernel irqchip")
            self._irq_levels[irq] = level

    def irqfd(self, fd: Any, gsi: int, flags: int = 0, resamplefd: Any = None) -> None:
        """KVM_IRQFD (api.rst 4.75): bind eventfd ``fd`` to GSI ``gsi`` (recorded, not delivered).

        Errors, in order: EBADF closed VM fd; EINVAL flags beyond DEASSIGN|RESAMPLE. Deassign:
        EBADF/EINVAL ``fd`` not an open eventfd, then success whether or not it was bound.
        Assign: EINVAL without an in-kernel irqchip; EBADF/EINVAL ``fd``; with RESAMPLE,
        EBADF/EINVAL ``resamplefd``; EBUSY the eventfd already bound on this VM. Mirrors
        kvm_irqfd / kvm_irqfd_assign / kvm_irqfd_deassign.
        """
        self._check()  # type: ignore[attr-defined]
        fd = encode_fd(fd, "fd")
        gsi = encode_unsigned(_int(gsi, "gsi"), 32, "gsi")
        flags = encode_unsigned(_int(flags, "flags"), 32, "flags")
        rfd = encode_fd(resamplefd, "resamplefd")
        with self._lock:  # type: ignore[attr-defined]
            self._check()  # type: ignore[attr-defined]
            if flags & ~int(IrqfdFlag.DEASSIGN | IrqfdFlag.RESAMPLE):
                raise oserror(errno.EINVAL, f"irqfd flags {flags:#x} outside DEASSIGN|RESAMPLE")
            if flags & IrqfdFlag.DEASSIGN:
                ev = _eventfd(fd, "fd")
                if self._irqfds.get(ev, (None,))[0] == gsi:
                    del self._irqfds[ev]
                return
            if not self._irqchip:  # type: ignore[attr-defined]
                raise oserror(errno.EINVAL, "KVM_IRQFD without an in-kernel irqchip")
            ev = _eventfd(fd, "fd")
            resample = _eventfd(rfd, "resamplefd") if flags & IrqfdFlag.RESAMPLE else None
            if ev in self._irqfds:
                raise oserror(errno.EBUSY, f"eventfd {fd} is already an irqfd of this VM")
            self._irqfds[ev] = (gsi, resample)

    def ioeventfd(self, fd: Any, addr: int, len: int, datamatch: int = 0, flags: int = 0) -> None:  # noqa: A002
        """KVM_IOEVENTFD (api.rst 4.59): signal eventfd ``fd`` on a guest write to ``addr``.

        Errors, in order: EBADF closed VM fd. Deassign (flags outside the valid mask are
        ignored): EBADF/EINVAL ``fd`` not an open eventfd; ENOENT no registration with that
        bus, eventfd, address, length and datamatch. Assign: EINVAL ``len`` not 0/1/2/4/8;
        EINVAL addr + len wraps; EINVAL flags outside the valid mask; EINVAL ``len`` 0 with
        DATAMATCH; EBADF/EINVAL ``fd``; EEXIST a colliding registration. Mirrors
        kvm_ioeventfd / kvm_deassign_ioeventfd_idx / kvm_assign_ioeventfd(_idx).
        """
        self._check()  # type: ignore[attr-defined]
        # struct kvm_ioeventfd's order
        datamatch = encode_unsigned(_int(datamatch, "datamatch"), 64, "datamatch")
        addr = encode_unsigned(_int(addr, "addr"), 64, "addr")
        length = encode_unsigned(_int(len, "len"), 32, "len")
        fd = encode_fd(fd, "fd")
        flags = encode_unsigned(_int(flags, "flags"), 32, "flags")
        with self._lock:  # type: ignore[attr-defined]
            self._check()  # type: ignore[attr-defined]
            bus = (_BUS_PIO if flags & IoeventfdFlag.PIO else
                   _BUS_CCW if flags & IoeventfdFlag.VIRTIO_CCW_NOTIFY else _BUS_MMIO)
            wildcard = not flags & IoeventfdFlag.DATAMATCH
            if flags & IoeventfdFlag.DEASSIGN:
                ev = _eventfd(fd, "fd")
                for p in self._ioeventfds:
                    if (p.bus, p.eventfd, p.addr, p.len, p.wildcard) == (bus, ev, addr, length, wildcard) and \
                            (wildcard or p.datamatch == datamatch):
                        self._ioeventfds.remove(p)
                        os.close(p.dup)
                        return
                raise oserror(errno.ENOENT, f"no ioeventfd for fd {fd} at {addr:#x} (len {length})")
            if length not in (0, 1, 2, 4, 8):
                raise oserror(errno.EINVAL, f"ioeventfd len {length} is not 0, 1, 2, 4 or 8")
            if addr + length > _U64:
                raise oserror(errno.EINVAL, f"ioeventfd [{addr:#x}, +{length}) wraps")
            if flags & ~KVM_IOEVENTFD_VALID_FLAG_MASK:
                raise oserror(errno.EINVAL, f"ioeventfd flags {flags:#x} outside {KVM_IOEVENTFD_VALID_FLAG_MASK:#x}")
            if not length and not wildcard:
                raise oserror(errno.EINVAL, "ioeventfd len 0 cannot match data")
            ev = _eventfd(fd, "fd")
            new = _Ioeventfd(bus, addr, length, wildcard, datamatch if not wildcard else 0, ev, -1)
            if any(p.collides(new) for p in self._ioeventfds):
                raise oserror(errno.EEXIST, f"an ioeventfd at {addr:#x} (len {length}) collides")
            new.dup = os.dup(fd)
            self._ioeventfds.append(new)

    def _ioeventfd_signal(self, ex: Any) -> bool:
        """If exit ``ex`` is a write an ioeventfd claims, signal it and return True (the vCPU
        then completes the access and resumes, as kvm_io_bus_write does in the kernel)."""
        if ex.__class__ is IoExit:
            if ex.direction != IoDirection.OUT or ex.count != 1:
                return False
            bus, addr, data = _BUS_PIO, ex.port, ex.data
        elif ex.__class__ is MmioExit:
            if not ex.is_write:
                return False
            bus, addr, data = _BUS_MMIO, ex.phys_addr, ex.data
        else:
            return False
        with self._lock:  # type: ignore[attr-defined]
            for p in self._ioeventfds:
                if p.matches(bus, addr, data):
                    os.eventfd_write(p.dup, 1)
                    return True
        return False

    def _release_vm_state(self) -> None:
        """Drop the eventfd references when the VM is destroyed (kvm_eventfd / ioeventfd release)."""
        for p in self._ioeventfds:
            os.close(p.dup)
        self._ioeventfds.clear()
        self._irqfds.clear()
        self._dirty.clear()

    # --- dirty log ----------------------------------------------------------------------------

    def _dirty_log_commit(self, old: Any, new: Any) -> None:
        """Keep ``_dirty`` in step with a committed memslot change (``new`` None: deleted).

        Called under ``_lock`` by the memslot code; enabling or disabling logging on a live
        slot invalidates it, so vCPUs write-protect its pages or map them writable again
        (kvm_mmu_slot_apply_flags).
        """
        key = (old or new).as_id, (old or new).id
        if new is None or not new.flags & MemFlag.LOG_DIRTY_PAGES:
            if self._dirty.pop(key, None) is not None and new is not None:
                self._invalidate_range(new.base_gfn, new.end_gfn)  # type: ignore[attr-defined]
            return
        if key in self._dirty and old is not None and old.flags & MemFlag.LOG_DIRTY_PAGES:
            return  # MOVE or another flag: the bitmap stays
        log: RangeMap[bool] = RangeMap(default=False)
        if self._manual_dirty & KVM_DIRTY_LOG_INITIALLY_SET:
            log.set(0, new.npages, True)
        self._dirty[key] = log
        if old is not None:
            self._invalidate_range(new.base_gfn, new.end_gfn)  # type: ignore[attr-defined]

    def _dirty_logged(self, slot: Any) -> bool:
        """Whether vCPUs map ``slot`` write-protected for logging (not for READONLY slots)."""
        return (slot.as_id, slot.id) in self._dirty and not slot.flags & MemFlag.READONLY

    def _is_dirty(self, slot: Any, gfn: int) -> bool:
        return self._dirty[(slot.as_id, slot.id)].get(gfn - slot.base_gfn)

    def _log_dirty(self, slot: Any, gfn: int) -> bool:
        """mark_page_dirty for a guest write to ``gfn`` (caller holds ``_lock``); False if the
        slot is not being logged."""
        log = self._dirty.get((slot.as_id, slot.id))
        if log is None or slot.flags & MemFlag.READONLY:
            return False
        page = gfn - slot.base_gfn
        log.set(page, page + 1, True)
        return True

    def _slot_for_log(self, slot: int) -> tuple[Any, RangeMap[bool]]:
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if as_id >= self._nr_as or id_ >= KVM_USER_MEM_SLOTS:  # type: ignore[attr-defined]
            raise oserror(errno.EINVAL, f"slot {as_id}:{id_} out of range")
        memslot = self._slots.get((as_id, id_))  # type: ignore[attr-defined]
        log = self._dirty.get((as_id, id_))
        if memslot is None or log is None:
            raise oserror(errno.ENOENT, f"slot {as_id}:{id_} does not exist or does not log dirty pages")
        return memslot, log

    def _reprotect(self, memslot: Any, runs: list[tuple[int, int]]) -> None:
        for lo, hi in runs:
            self._invalidate_range(memslot.base_gfn + lo, memslot.base_gfn + hi)  # type: ignore[attr-defined]

    def get_dirty_log(self, slot: int, npages: int | None = None) -> DirtyLog:
        """KVM_GET_DIRTY_LOG (api.rst 4.8): the slot's dirty pages since the last call.

        Without manual protect the log is cleared and the pages write-protected again;
        with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE it is left for ``clear_dirty_log``.
        ``npages`` only sizes the bitmap (the slot's own size when None). Errors, in order:
        EBADF closed fd; EINVAL as_id or id out of range; ENOENT no such slot or no
        KVM_MEM_LOG_DIRTY_PAGES. Mirrors kvm_get_dirty_log_protect.
        """
        self._check()  # type: ignore[attr-defined]
        slot = encode_unsigned(_int(slot, "slot"), 32, "slot")
        if npages is not None:
            npages = encode_unsigned(_int(npages, "npages"), 32, "npages")
        with self._lock:  # type: ignore[attr-defined]
            self._check()  # type: ignore[attr-defined]
            memslot, log = self._slot_for_log(slot)
            runs = [(s, e) for s, e, _ in log]
            n = memslot.npages if npages is None else npages
            bits = 0
            for s, e in runs:
                bits |= ((1 << (e - s)) - 1) << s
            if not self._manual_dirty & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                log.clear()
                self._reprotect(memslot, runs)
        size = (n + 63) // 64 * 8
        return DirtyLog(slot=slot, npages=n, bitmap=(bits & ((1 << (size * 8)) - 1)).to_bytes(size, "little"))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (api.rst 4.117): clear and write-protect the pages set in
        ``bitmap`` (bit i = page first_page + i; None = all ``num_pages``).

        Errors, in order: EBADF closed fd; EINVAL as_id or id out of range; EINVAL
        ``first_page`` not a multiple of 64; ENOENT no such slot or no logging; EINVAL a range
        beyond the slot, or ``num_pages`` not a multiple of 64 short of the slot's end; EFAULT
        a bitmap with fewer than ``num_pages`` bits.
        Mirrors kvm_clear_dirty_log_protect.
        """
        self._check()  # type: ignore[attr-defined]
        slot = encode_unsigned(_int(slot, "slot"), 32, "slot")
        first_page = encode_unsigned(_int(first_page, "first_page"), 64, "first_page")
        num_pages = encode_unsigned(_int(num_pages, "num_pages"), 32, "num_pages")
        if bitmap is None:
            bitmap = b"\xff" * ((num_pages + 63) // 64 * 8)
        if not isinstance(bitmap, (bytes, bytearray)):
            raise TypeError(f"bitmap must be bytes, not {type(bitmap).__name__}")
        with self._lock:  # type: ignore[attr-defined]
            self._check()  # type: ignore[attr-defined]
            as_id, id_ = slot >> 16, slot & 0xFFFF
            if as_id >= self._nr_as or id_ >= KVM_USER_MEM_SLOTS:  # type: ignore[attr-defined]
                raise oserror(errno.EINVAL, f"slot {as_id}:{id_} out of range")
            if first_page & 63:
                raise oserror(errno.EINVAL, f"first_page {first_page} is not a multiple of 64")
            memslot, log = self._slot_for_log(slot)
            n = memslot.npages
            if first_page > n or num_pages > n - first_page or (num_pages < n - first_page and num_pages & 63):
                raise oserror(errno.EINVAL, f"pages [{first_page}, +{num_pages}) do not fit slot of {n} pages")
            if len(bitmap) < (num_pages + 7) // 8:  # copy_from_user, after the checks
                raise oserror(errno.EFAULT, f"bitmap of {len(bitmap)} bytes is short for {num_pages} pages")
            cleared = []
            for s, e in bitmap_runs(bytes(bitmap), num_pages):
                for ds, de, _ in log.stored(first_page + s, first_page + e):
                    cleared.append((ds, de))
                log.set(first_page + s, first_page + e, False)
            self._reprotect(memslot, cleared)

    def _enable_manual_dirty_log(self, options: int) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (kvm_vm_ioctl_enable_cap_generic): INITIALLY_SET
        only together with MANUAL_PROTECT_ENABLE."""
        allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if options & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            allowed |= KVM_DIRTY_LOG_INITIALLY_SET
        if options & ~allowed:
            raise oserror(errno.EINVAL, f"MANUAL_DIRTY_LOG_PROTECT2 options {options:#x} outside {allowed:#x}")
        self._manual_dirty = options

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS (api.rst 4.128). The model has no dirty ring (its
        KVM_CAP_DIRTY_LOG_RING is 0 and enable_cap refuses it), so this is the kernel's
        answer for a VM without one. Errors: EBADF closed fd; EINVAL no dirty ring.
        """
        self._check()  # type: ignore[attr-defined]
        raise oserror(errno.EINVAL, "the VM has no dirty ring (the model logs dirty pages in bitmaps only)")

    # --- statistics ---------------------------------------------------------------------------

    def get_stats_fd(self) -> StatsFd:
        """KVM_GET_STATS_FD on the VM (api.rst 4.134): the model VM's counters (see
        ``model.stats``). Errors: EBADF closed fd."""
        self._check()  # type: ignore[attr-defined]
        return StatsFd(f"kvm-{os.getpid()}", self.stats)  # type: ignore[attr-defined]
