"""The model's VM: memslots, memory attributes, guest_memfd creation (virt/kvm/kvm_main.c).

Data model
----------
* A ``Vm`` owns its memslots (``_slots``: (as_id, id) -> Memslot, plus one RangeMap per
  address space mapping GFN -> Memslot for O(log n) lookup), the per-GFN memory attributes
  (``_attributes``: a RangeMap over GFNs, absent = 0 = shared) and its guest_memfds
  (``_gmems``, weak: the *files* own themselves through their references).
* References: the VM fd counts one, every live guest_memfd (fd or mapping) one, every vCPU
  one (``_get_kvm``/``_put_kvm``, as kvm_get_kvm/kvm_put_kvm). Closing the fd only makes
  the VM's methods fail with EBADF; the VM is destroyed when the count reaches zero, so a
  guest_memfd keeps memslots and attributes alive (spec 3.5).
* ``_lock`` (an RLock) guards all VM state and every guest_memfd of the VM. Every ioctl
  validates its whole argument first, then commits (all or nothing); ``_snapshot()``
  returns a comparable image of the state so tests can check that failures change nothing.
* Invariants: slots of one address space never overlap in GFNs; the sum of their pages is
  ``_nr_memslot_pages``; a gmem slot's binding is recorded in exactly its file's
  ``_bindings``; attributes are only non-zero on VMs with private memory.
* Invalidation listeners (the vCPUs' MMU) are called synchronously under ``_lock`` *after*
  each state change with a GFN range to forget: punch-hole of bound pages, attribute
  changes (widened to the enclosing huge blocks at the edges, like x86), memslot delete and
  move, guest_memfd release, hwpoison.
"""

from __future__ import annotations

import errno
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

from ..encoding import encode_array, encode_fd, encode_unsigned
from ..errors import oserror
from ..rangemap import RangeMap
from ..types import MemoryRegion
from ..uapi import (KVM_API_VERSION, KVM_EXIT_HYPERCALL_VALID_MASK, KVM_MEM_MAX_NR_PAGES, KVM_MEM_SLOTS_NUM,
                    KVM_USER_MEM_SLOTS, PAGE_SHIFT, PAGE_SIZE, TASK_SIZE_MAX, Cap, GuestMemfdFlag, MemFlag, MemoryAttribute)
from . import fdtable
from .guest_memfd import GuestMemfd
from .memslot import LEVEL_PAGES, Memslot
from .profile import GUESTMEM_TDX_LIKE_VM, PRIVATE_MEM_VM_TYPES, Profile
from .vm_state import VmState
from .vcpu_checks import check_vcpu_id

if TYPE_CHECKING:
    from .system import System

_U64 = (1 << 64) - 1
_V1_FLAGS = int(MemFlag.LOG_DIRTY_PAGES | MemFlag.READONLY)  # int: ~ on IntFlag keeps only known bits

InvalidationListener = Callable[[int, int], None]


class Vm(VmState, fdtable.FdObject):
    """A model VM, returned by ``System.create_vm`` (KVM_CREATE_VM)."""


    def __init__(self, system: "System", type: int) -> None:
        self.type = type
        self.system = system
        self._profile: Profile = system._profile
        self._private_mem = type in PRIVATE_MEM_VM_TYPES
        self._in_place = self._profile.gmem_in_place_conversion  # attributes live in the files
        self._lock = threading.RLock()
        self._nr_as = self._profile.address_spaces(self._private_mem)
        self._slots: dict[tuple[int, int], Memslot] = {}
        self._gfn_maps: list[RangeMap[Memslot | None]] = [RangeMap(default=None) for _ in range(self._nr_as)]
        self._nr_memslot_pages = 0
        self._had_memslot = False  # ever: profile.pre_fault_slotless_errno
        self._attributes: RangeMap[int] = RangeMap()
        self._gmems: "weakref.WeakSet[GuestMemfd]" = weakref.WeakSet()
        self._listeners: list[InvalidationListener] = []
        self._stats_providers: list[Callable[[], dict]] = []
        self._exit_hypercall_mask = 0
        self._irqchip = False
        self._created_vcpus = 0
        self._vcpu_ids: set[int] = set()  # every vCPU id created, closed or not (kvm_get_vcpu_by_id)
        self._invalidations = 0
        self._users = 1
        self._dead = False
        self._mm = fdtable.mm  # kvm->mm: VM and vCPU ioctls from another process get EIO
        self._init_vm_state()  # irq lines, irqfds, ioeventfds, dirty logs (vm_state)
        self._fd: int | None = fdtable.fd_install(self)
        fdtable.at_fork_in_child(self)

    def __repr__(self) -> str:
        return f"<model Vm type={self.type:#x} fd={self._fd} slots={len(self._slots)}>"

    # --- fd and lifetime ----------------------------------------------------------------------

    def _what(self) -> str:
        return "VM fd"

    def _check(self) -> int:
        """The checks every VM ioctl makes first (kvm_vm_ioctl): EBADF closed, EIO from another mm;
        returns the fd."""
        fd = self._fd
        if fd is None:
            raise oserror(errno.EBADF, "VM fd is closed")
        if self._mm is not fdtable.mm:
            raise oserror(errno.EIO, "the VM belongs to another process (its creator's mm; used after fork)")
        return fd

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()  # the parent's may be held by a thread the child lacks

    def close(self) -> None:
        """close(2) on the VM fd; the VM lives on while guest_memfds or vCPUs reference it. Idempotent."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            fdtable.fd_close(fd)
        self._put_kvm()

    def _get_kvm(self) -> None:
        """Take a VM reference (kvm_get_kvm); vCPUs and guest_memfds hold one each."""
        with self._lock:
            assert not self._dead, "reference to a destroyed VM"
            self._users += 1

    def _put_kvm(self) -> None:
        """Drop a VM reference; the last one destroys the VM (kvm_destroy_vm)."""
        with self._lock:
            self._users -= 1
            assert self._users >= 0, "VM reference underflow"
            if self._users:
                return
            for slot in list(self._slots.values()):
                self._unbind(slot)
            self._slots.clear()
            self._gfn_maps = [RangeMap(default=None) for _ in range(self._nr_as)]
            self._attributes.clear()
            self._nr_memslot_pages = 0
            self._release_vm_state()
            self._dead = True

    # --- capabilities -------------------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (api.rst 4.4): the cap's value for this VM; 0 if unknown.

        :raises OSError: EBADF if the VM fd is closed. Mirrors kvm_vm_ioctl_check_extension_generic.
        """
        self._check()
        return self.system._extension(encode_unsigned(cap, 64, "cap"), self)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM (api.rst 4.37): KVM_CAP_EXIT_HYPERCALL and KVM_CAP_DISABLE_QUIRKS2.

        Errors, in order: EBADF closed fd; EINVAL flags != 0; EINVAL (DISABLE_QUIRKS2) quirks
        outside the cap's value; EINVAL unknown cap; EINVAL (EXIT_HYPERCALL) args[0] has bits
        other than 1 << KVM_HC_MAP_GPA_RANGE. Mirrors x86 kvm_vm_ioctl_enable_cap.
        """
        with self._lock:
            self._check()
            cap, flags = encode_unsigned(cap, 32, "cap"), encode_unsigned(flags, 32, "flags")
            argv = encode_array(args, 4, 64, "args")
            if flags:
                raise oserror(errno.EINVAL, f"enable_cap flags {flags:#x} must be 0")
            if cap == Cap.DISABLE_QUIRKS2:
                valid = self.system._extension(cap, self)
                if argv[0] & ~valid:
                    raise oserror(errno.EINVAL, f"quirks {argv[0]:#x} outside KVM_CAP_DISABLE_QUIRKS2 {valid:#x}")
                return  # no quirk changes what the model does
            if cap == Cap.MANUAL_DIRTY_LOG_PROTECT2:
                self._enable_manual_dirty_log(argv[0])
                return
            if cap != Cap.EXIT_HYPERCALL:
                raise oserror(errno.EINVAL, f"capability {cap} cannot be enabled on a VM")
            if argv[0] & ~KVM_EXIT_HYPERCALL_VALID_MASK:
                raise oserror(errno.EINVAL, f"EXIT_HYPERCALL mask {argv[0]:#x} has bits outside {KVM_EXIT_HYPERCALL_VALID_MASK:#x}")
            self._exit_hypercall_mask = argv[0]

    # --- guest_memfd --------------------------------------------------------------------------

    def create_guest_memfd(self, size: int, flags: int = 0, reserved: Any = None) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD (api.rst 4.142): a new guest_memfd of ``size`` bytes.

        ``reserved`` is never checked, as in the kernel. Errors, in order: EBADF closed VM fd;
        EINVAL flags outside KVM_CAP_GUEST_MEMFD_FLAGS for this VM (none in 6.8); EINVAL
        (s64)size <= 0 or size not page aligned. Mirrors kvm_gmem_create / __kvm_gmem_create.
        """
        with self._lock:
            self._check()
            size, flags = encode_unsigned(size, 64, "size"), encode_unsigned(flags, 64, "flags")
            if reserved is not None:
                encode_array(reserved, 6, 64, "reserved")  # never checked, but must fit the struct
            if flags:
                supported = self._profile.gmem_flags(self._private_mem, self.type == GUESTMEM_TDX_LIKE_VM)
                if self._profile.gmem_hugetlb_flag:
                    supported |= 0x3F << self._profile.gmem_huge_shift  # the folio-size field
                if flags & ~supported:
                    raise oserror(errno.EINVAL, f"guest_memfd flags {flags:#x} outside supported {supported:#x}")
            if size == 0 or size >= 1 << 63 or size & (PAGE_SIZE - 1):
                raise oserror(errno.EINVAL, f"guest_memfd size {size:#x} must be positive and page aligned")
            folio = self._hugetlb_folio_size(flags, size)
            gmem = GuestMemfd(self, size, flags, folio)
            self._users += 1  # the file pins the VM
            self._gmems.add(gmem)
            return gmem

    def _hugetlb_folio_size(self, flags: int, size: int) -> int:
        """The folio size a create request asks for (HugeTLB series, profile fields); 4 KiB without it.

        Errors: EINVAL folio-size bits without the HugeTLB flag, a size the profile does not
        offer, or a file size that is not a multiple of the folio size.
        """
        p = self._profile
        shift = p.gmem_huge_shift
        log2 = (flags >> shift) & 0x3F if p.gmem_hugetlb_flag else 0
        if not p.gmem_hugetlb_flag or not flags & p.gmem_hugetlb_flag:
            if log2:
                raise oserror(errno.EINVAL, f"guest_memfd flags {flags:#x}: folio size without the HugeTLB flag")
            return PAGE_SIZE
        if (1 << log2) not in p.gmem_huge_sizes:
            raise oserror(errno.EINVAL, f"guest_memfd flags {flags:#x}: folio size 2**{log2} not one of "
                                        f"{[hex(n) for n in p.gmem_huge_sizes]}")
        if size % (1 << log2):
            raise oserror(errno.EINVAL, f"guest_memfd size {size:#x} is not a multiple of its {1 << log2:#x} folios")
        return 1 << log2

    # --- memslots -----------------------------------------------------------------------------

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int = 0, guest_memfd: Any = None, guest_memfd_offset: int = 0,
                                pad1: int = 0, pad2: Any = None) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (api.rst 4.140): create, move, modify or delete a memslot.

        pad1/pad2 are never checked. Errors in kernel order (spec 2.3): EBADF closed fd;
        EINVAL id >= 32764; EINVAL invalid flags for this VM; EINVAL size/gpa/userspace_addr
        unaligned or userspace_addr + size beyond the user address space; EINVAL gmem
        offset unaligned or offset + size wraps; EINVAL as_id or id out of range; EINVAL gpa
        wrap; EINVAL too many pages; EINVAL deleting a missing slot; EINVAL total pages
        overflow; EINVAL modifying a gmem slot, toggling GUEST_MEMFD or READONLY, changing
        userspace_addr or size; EEXIST GPA overlap; then the bind: EBADF fd not open,
        EINVAL not a guest_memfd, another VM's, offset out of the file or file range
        already bound; EINVAL GFN beyond the maximum. Mirrors kvm_set_memory_region.
        """
        self._check()
        # Encoded in struct order, as the kvm backend fills kvm_userspace_memory_region2.
        slot, flags = encode_unsigned(slot, 32, "slot"), encode_unsigned(flags, 32, "flags")
        gpa = encode_unsigned(guest_phys_addr, 64, "guest_phys_addr")
        size = encode_unsigned(memory_size, 64, "memory_size")
        uaddr = encode_unsigned(userspace_addr, 64, "userspace_addr")
        offset = encode_unsigned(guest_memfd_offset, 64, "guest_memfd_offset")
        fd = encode_fd(guest_memfd, "guest_memfd")
        encode_unsigned(pad1, 32, "pad1")  # pad1/pad2 are never checked, but must fit the struct
        encode_array(pad2, 14, 64, "pad2")
        self._set_memory_region(slot, flags, gpa, size, uaddr, fd, offset, v2=True)

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (api.rst 4.35): as v2 without the gmem fields.

        Errors: EBADF closed fd; EINVAL any flag besides LOG_DIRTY_PAGES|READONLY; then as
        ``set_user_memory_region2``. Mirrors kvm_vm_ioctl_set_memory_region (v1 path).
        """
        self._check()
        self._set_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr, 0, 0, v2=False)

    def _check_memory_region_flags(self, flags: int) -> None:
        valid = int(MemFlag.LOG_DIRTY_PAGES)  # int: ~ on IntFlag keeps only known bits
        if self._profile.can_bind(self._private_mem):
            valid |= int(MemFlag.GUEST_MEMFD)
        if flags & MemFlag.GUEST_MEMFD:
            valid &= ~int(MemFlag.LOG_DIRTY_PAGES)  # no dirty logging for gmem slots
        else:
            valid |= int(MemFlag.READONLY)  # no VM type here has protected state
        if flags & ~valid:
            raise oserror(errno.EINVAL, f"memslot flags {flags:#x} outside valid {int(valid):#x}")

    def _set_memory_region(self, slot: int, flags: int, gpa: int, size: int, uaddr: int, fd: int,
                           offset: int, *, v2: bool) -> None:
        """kvm_set_memory_region: check the arguments against the rules and the old slot, decide
        the change, then hand it to ``_set_memslot`` (deletion to ``_delete_memslot``)."""
        with self._lock:
            self._check()
            slot, flags = encode_unsigned(slot, 32, "slot"), encode_unsigned(flags, 32, "flags")
            gpa = encode_unsigned(gpa, 64, "guest_phys_addr")
            size = encode_unsigned(size, 64, "memory_size")
            uaddr = encode_unsigned(uaddr, 64, "userspace_addr")
            as_id, id_ = self._check_memory_region(slot, flags, gpa, size, uaddr, offset, v2)
            old = self._slots.get((as_id, id_))
            if size == 0:
                if old is None:
                    raise oserror(errno.EINVAL, f"slot {as_id}:{id_} does not exist")
                self._delete_memslot(old)
                return
            base_gfn, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
            if npages > KVM_MEM_MAX_NR_PAGES:
                raise oserror(errno.EINVAL, f"{npages} pages exceed {KVM_MEM_MAX_NR_PAGES}")
            change = self._memslot_change(old, id_, flags, uaddr, base_gfn, npages)
            if change is None:
                return  # nothing changes
            if change in ("create", "move"):
                for s, e, other in self._gfn_maps[as_id].stored(base_gfn, base_gfn + npages):
                    if other.id != id_:
                        raise oserror(errno.EEXIST, f"[{gpa:#x}, +{size:#x}) overlaps slot {other.id}")
            gmem = self._gmem_bind_check(fd, offset, npages) if flags & MemFlag.GUEST_MEMFD else None
            new = Memslot(id=id_, as_id=as_id, base_gfn=base_gfn, npages=npages, flags=flags, userspace_addr=uaddr)
            self._set_memslot(old, new, change, gmem, offset >> PAGE_SHIFT)

    def _check_memory_region(self, slot: int, flags: int, gpa: int, size: int, uaddr: int, offset: int,
                             v2: bool) -> tuple[int, int]:
        """The argument checks of kvm_set_memory_region that need no old slot, in its order;
        returns (address space, slot id)."""
        if not v2 and flags & ~_V1_FLAGS:
            raise oserror(errno.EINVAL, f"KVM_SET_USER_MEMORY_REGION flags {flags:#x}: use v2 for GUEST_MEMFD")
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if id_ >= KVM_USER_MEM_SLOTS:
            raise oserror(errno.EINVAL, f"slot id {id_} >= {KVM_USER_MEM_SLOTS}")
        self._check_memory_region_flags(flags)
        if size % PAGE_SIZE:
            raise oserror(errno.EINVAL, f"memory_size {size:#x} is not page aligned")
        if gpa % PAGE_SIZE:
            raise oserror(errno.EINVAL, f"guest_phys_addr {gpa:#x} is not page aligned")
        if uaddr % PAGE_SIZE or uaddr + size > TASK_SIZE_MAX:
            raise oserror(errno.EINVAL, f"userspace_addr range [{uaddr:#x}, +{size:#x}) is not user memory")
        if flags & MemFlag.GUEST_MEMFD and (offset % PAGE_SIZE or offset + size > _U64):
            raise oserror(errno.EINVAL, f"guest_memfd_offset {offset:#x} unaligned or wraps with size")
        if as_id >= self._nr_as or id_ >= KVM_MEM_SLOTS_NUM:
            raise oserror(errno.EINVAL, f"address space {as_id} >= {self._nr_as}")
        if gpa + size > _U64:
            raise oserror(errno.EINVAL, f"guest_phys_addr {gpa:#x} + {size:#x} wraps")
        return as_id, id_

    def _memslot_change(self, old: Memslot | None, id_: int, flags: int, uaddr: int, base_gfn: int,
                        npages: int) -> str | None:
        """What a non-empty region does to slot ``old`` ("create", "move", "flags" or None for no
        change), after kvm_set_memory_region's checks against the old slot."""
        if old is None:
            if self._nr_memslot_pages + npages > _U64:
                raise oserror(errno.EINVAL, "total memslot pages overflow")
            return "create"
        if flags & MemFlag.GUEST_MEMFD:
            raise oserror(errno.EINVAL, f"slot {id_}: guest_memfd memslots are immutable, delete only")
        if old.is_gmem:
            raise oserror(errno.EINVAL, f"slot {id_}: GUEST_MEMFD cannot be cleared")
        if uaddr != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & MemFlag.READONLY:
            raise oserror(errno.EINVAL, f"slot {id_}: userspace_addr, size and READONLY are fixed")
        if base_gfn != old.base_gfn:
            return "move"
        if flags != old.flags:
            return "flags"
        return None

    def _set_memslot(self, old: Memslot | None, new: Memslot, change: str, gmem: GuestMemfd | None,
                     pgoff: int) -> None:
        """kvm_set_memslot for a create, move or flags change of a checked region: the arch's
        last check (kvm_arch_prepare_memory_region: the GFN limit), then the commit."""
        if change in ("create", "move") and new.end_gfn > 1 << (self._profile.max_gpa_bits - PAGE_SHIFT):
            raise oserror(errno.EINVAL, f"[{new.base_gfn << PAGE_SHIFT:#x}, +{new.npages << PAGE_SHIFT:#x}) "
                                        "is beyond the maximum guest physical address")
        # -- validated: commit ----------------------------------------------------------------
        if change == "create":
            if gmem is not None:
                self._gmem_bind(gmem, new, pgoff)
            self._install(new)
            self._nr_memslot_pages += new.npages
            if self._private_mem:
                new._init_mixed(self._attributes)
        elif change == "move":
            assert old is not None
            self._remove(old)
            self._install(new)
            if self._private_mem:
                new._init_mixed(self._attributes)
            self._invalidate_range(old.base_gfn, old.end_gfn)
        else:  # flags only: same range, same mixed state
            assert old is not None
            new._mixed = old._mixed
            self._remove(old)
            self._install(new)
        self._dirty_log_commit(old, new)

    def _gmem_bind_check(self, fd: int, offset: int, npages: int) -> GuestMemfd:
        """The checks of kvm_gmem_bind, in order; returns the file to bind."""
        gmem = fdtable.fdget_typed(fd, GuestMemfd, errno.EINVAL, "guest_memfd")
        if gmem.vm is not self:
            raise oserror(errno.EINVAL, f"guest_memfd fd {fd} belongs to another VM")
        if not self._gmem_range_in_file(offset, npages << PAGE_SHIFT, gmem.size):
            raise oserror(errno.EINVAL, f"guest_memfd range [{offset:#x}, +{npages << PAGE_SHIFT:#x}) "
                                        f"outside the {gmem.size:#x}-byte file")
        start = offset >> PAGE_SHIFT
        if gmem._bindings.stored(start, start + npages):
            raise oserror(self._profile.bind_overlap_errno,
                          f"guest_memfd range at {offset:#x} is already bound to another memslot")
        return gmem

    def _gmem_range_in_file(self, offset: int, size: int, file_size: int) -> bool:
        """kvm_gmem_bind's range check, in the profile's arithmetic (``bind_offset_signed``).

        ``offset`` and ``size`` arrive as u64 and ``offset + size`` does not wrap u64 (checked
        earlier). In loff_t the offset must be >= 0, and the sum wraps negative once it passes
        2**63 - 1, which the end-of-file comparison then accepts (docs/kernel-findings.md).
        """
        if offset % PAGE_SIZE:
            return False
        end = offset + size
        if self._profile.bind_offset_signed:
            if offset >= 1 << 63:
                return False
            if end >= 1 << 63:
                end -= 1 << 64  # s64 wrap: negative, so never beyond i_size
        return end <= file_size

    def _gmem_bind(self, gmem: GuestMemfd, slot: Memslot, pgoff: int) -> None:
        """Record a validated binding (kvm_gmem_bind's commit); takes no file reference."""
        slot.gmem, slot.pgoff = gmem, pgoff
        # 6.18+: GMEM_ONLY with GUEST_MEMFD_FLAG_MMAP; in-place conversion: every binding.
        slot.gmem_only = self._profile.gmem_mmap and (bool(gmem.flags & GuestMemfdFlag.MMAP) or self._in_place)
        gmem._bindings.set(pgoff, pgoff + slot.npages, slot)

    def _unbind(self, slot: Memslot) -> None:
        """kvm_gmem_unbind: forget the file range; a released file has nothing to forget."""
        if slot.gmem is not None:
            slot.gmem._bindings.set(slot.pgoff, slot.pgoff + slot.npages, None)

    def _install(self, slot: Memslot) -> None:
        self._had_memslot = True
        self._slots[(slot.as_id, slot.id)] = slot
        self._gfn_maps[slot.as_id].set(slot.base_gfn, slot.end_gfn, slot)

    def _remove(self, slot: Memslot) -> None:
        del self._slots[(slot.as_id, slot.id)]
        self._gfn_maps[slot.as_id].set(slot.base_gfn, slot.end_gfn, None)

    def _delete_memslot(self, slot: Memslot) -> None:
        """KVM_MR_DELETE: remove, unbind, then invalidate the slot's GFNs."""
        self._remove(slot)
        self._unbind(slot)
        self._nr_memslot_pages -= slot.npages
        self._dirty_log_commit(slot, None)
        self._invalidate_range(slot.base_gfn, slot.end_gfn)

    def _slot_for_gfn(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """The memslot containing ``gfn`` in address space ``as_id`` (O(log n)), or None."""
        if as_id >= self._nr_as:
            return None
        return self._gfn_maps[as_id].get(gfn)

    def memslots(self) -> list[MemoryRegion]:
        """guestmem extension: frozen snapshots of the memslots, sorted by (as_id, id).

        The same shape as the kvm backend's shadow; ``guest_memfd`` is the bound file's fd
        (0 once the file is closed or released), where kvm reports the fd the call passed.
        :raises OSError: EBADF if the VM fd is closed.
        """
        with self._lock:
            self._check_fd()  # no ioctl (the kvm backend answers from its shadow): no mm check
            return [self._slots[k]._region() for k in sorted(self._slots)]

    # --- memory attributes ----------------------------------------------------------------------

    def _supported_attributes(self) -> int:
        """VM-level attributes: PRIVATE for private-memory VMs, none once they live in the files."""
        p = self._profile
        return int(MemoryAttribute.PRIVATE) if self._private_mem and p.memory_attributes and not self._in_place else 0

    def _check_attribute_range(self, address: int, size: int) -> None:
        if size == 0 or address + size > _U64:
            raise oserror(errno.EINVAL, f"attribute range [{address:#x}, +{size:#x}) is empty or wraps")
        if address % PAGE_SIZE or size % PAGE_SIZE:
            raise oserror(errno.EINVAL, f"attribute range [{address:#x}, +{size:#x}) is not page aligned")

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (api.rst 4.141): set the attributes of [address, address+size).

        Errors, in order (spec 2.4): EBADF closed fd; ENOTTY without memory-attribute
        support (profile "6.18-host"); EINVAL flags != 0; EINVAL attributes outside the VM's
        supported set (PRIVATE needs private memory); EINVAL size 0 or range wraps; EINVAL
        not page aligned. A range that already holds the value is a no-op (no invalidation).
        Mirrors kvm_vm_ioctl_set_mem_attributes / kvm_vm_set_mem_attributes.
        """
        with self._lock:
            self._check()
            address, size = encode_unsigned(address, 64, "address"), encode_unsigned(size, 64, "size")
            attributes, flags = encode_unsigned(attributes, 64, "attributes"), encode_unsigned(flags, 64, "flags")
            if not self._profile.memory_attributes:
                raise oserror(errno.ENOTTY, "this kernel has no KVM_SET_MEMORY_ATTRIBUTES")
            if flags:
                raise oserror(errno.EINVAL, f"memory attributes flags {flags:#x} must be 0")
            supported = self._supported_attributes()
            if attributes & ~supported:
                raise oserror(errno.EINVAL, f"attributes {attributes:#x} outside supported {supported:#x}")
            self._check_attribute_range(address, size)
            start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
            if self._attributes.uniform(start, end) == attributes:
                return
            self._attributes.set(start, end, attributes)
            self._post_set_memory_attributes(start, end)

    def _post_set_memory_attributes(self, start: int, end: int) -> None:
        """Recompute mixed huge blocks, then invalidate widened ranges (kvm_arch_post_set_memory_attributes)."""
        ranges: set[tuple[int, int]] = set()
        for as_id in range(self._nr_as):
            gfn_map = self._gfn_maps[as_id]
            if not len(gfn_map):  # an address space without memslots (SMM, usually)
                continue
            for _, _, slot in gfn_map.stored(start, end):
                slot._update_mixed(self._attributes, start, end)
                ranges.add(self._widen(slot, max(start, slot.base_gfn), min(end, slot.end_gfn)))
        for lo, hi in sorted(ranges):
            self._invalidate_range(lo, hi)

    @staticmethod
    def _widen(slot: Memslot, lo: int, hi: int) -> tuple[int, int]:
        """Extend [lo, hi) to the largest huge blocks at its edges that a huge mapping could cover."""
        for n in (LEVEL_PAGES[2], LEVEL_PAGES[1]):
            b_lo = lo - lo % n
            if b_lo >= slot.base_gfn and b_lo + n <= slot.end_gfn:
                lo = b_lo
                break
        for n in (LEVEL_PAGES[2], LEVEL_PAGES[1]):
            b_hi = -(-hi // n) * n
            if b_hi - n >= slot.base_gfn and b_hi <= slot.end_gfn:
                hi = b_hi
                break
        return lo, hi

    def get_memory_attributes(self, address: int, size: int) -> list[tuple[int, int, int]]:
        """guestmem extension (no kernel ioctl): attributes over [address, address+size).

        Returns byte ranges (start, end, attributes) tiling the range, gaps as 0. Errors as
        ``set_memory_attributes`` for the fd, support and range checks.
        """
        with self._lock:
            self._check_fd()  # no ioctl (the kvm backend answers from its shadow): no mm check
            address, size = encode_unsigned(address, 64, "address"), encode_unsigned(size, 64, "size")
            if not self._profile.memory_attributes:
                raise oserror(errno.ENOTTY, "this kernel has no memory attributes")
            self._check_attribute_range(address, size)
            return [(s << PAGE_SHIFT, e << PAGE_SHIFT, v)
                    for s, e, v in self._attributes.ranges(address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT)]

    def _attribute_at(self, gfn: int) -> int:
        """The attributes of ``gfn`` (O(log n)): the VM's, or with in-place conversion those of
        the file page bound at ``gfn`` (no slot, no file or a released file: shared)."""
        if not self._in_place:
            return self._attributes.get(gfn)
        slot = self._gfn_maps[0].get(gfn)
        gmem = slot.gmem if slot is not None else None
        if gmem is None:
            return 0
        return gmem._state.attributes.get(slot.pgoff + gfn - slot.base_gfn)

    def _attribute_ranges(self, gfn_start: int, gfn_end: int) -> list[tuple[int, int, int]]:
        """(start, end, attributes) GFN runs tiling [gfn_start, gfn_end), gaps as 0."""
        return self._attributes.ranges(gfn_start, gfn_end)

    # --- invalidation ---------------------------------------------------------------------------

    def _add_invalidation_listener(self, cb: InvalidationListener) -> None:
        with self._lock:
            self._listeners.append(cb)

    def _remove_invalidation_listener(self, cb: InvalidationListener) -> None:
        with self._lock:
            if cb in self._listeners:
                self._listeners.remove(cb)

    def _invalidate_range(self, gfn_start: int, gfn_end: int) -> None:
        """Tell every listener to forget mappings of [gfn_start, gfn_end) (kvm_mmu_invalidate_*)."""
        assert gfn_start < gfn_end, f"empty invalidation [{gfn_start:#x}, {gfn_end:#x})"
        self._invalidations += 1
        for cb in list(self._listeners):
            cb(gfn_start, gfn_end)

    # --- vCPUs ----------------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Any:
        """KVM_CREATE_VCPU (api.rst 4.7): a model vCPU (guestmem.model.vcpu; needs Unicorn).

        Errors, in order (kvm_vm_ioctl_create_vcpu): EBADF if the VM fd is closed; EINVAL for
        an id (an unsigned long) >= KVM_MAX_VCPU_IDS or once KVM_MAX_VCPUS vCPUs exist; EEXIST
        for an id already used by a vCPU of this VM (closing a vCPU fd does not free its id).
        """
        self._check()
        from .vcpu import Vcpu

        with self._lock:
            vcpu_id = check_vcpu_id(vcpu_id, self._created_vcpus)
            if vcpu_id in self._vcpu_ids:
                raise oserror(errno.EEXIST, f"vcpu_id {vcpu_id} is already in use")
            vcpu = Vcpu(self, vcpu_id)
            self._created_vcpus += 1
            self._vcpu_ids.add(vcpu_id)
        return vcpu

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (api.rst 4.24): create the in-kernel interrupt controllers.

        The model records that the VM has them (for the checks below and KVM_CAP_IRQCHIP
        users); it emulates no PIC, IOAPIC or LAPIC, so HLT still exits to userspace.
        Errors, in order: EBADF closed fd; EEXIST already created; EINVAL after
        KVM_CREATE_VCPU. Mirrors kvm_arch_vm_ioctl(KVM_CREATE_IRQCHIP).
        """
        with self._lock:
            self._check()
            if self._irqchip:
                raise oserror(errno.EEXIST, "the VM already has an in-kernel irqchip")
            if self._created_vcpus:
                raise oserror(errno.EINVAL, "KVM_CREATE_IRQCHIP after KVM_CREATE_VCPU")
            self._irqchip = True

    def set_nr_mmu_pages(self, nr_mmu_pages: int) -> None:
        """KVM_SET_NR_MMU_PAGES (api.rst 4.29): cap the shadow MMU's page count (a hint here).

        Errors: EBADF closed fd; EINVAL below KVM_MIN_ALLOC_MMU_PAGES (64). Mirrors
        kvm_vm_ioctl_set_nr_mmu_pages.
        """
        with self._lock:
            self._check()
            n = encode_unsigned(nr_mmu_pages, 64, "nr_mmu_pages")
            if n < 64:
                raise oserror(errno.EINVAL, f"nr_mmu_pages {n} < KVM_MIN_ALLOC_MMU_PAGES (64)")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the VM (api.rst 4.56): the default guest TSC frequency in kHz.

        :raises OSError: EBADF if the VM fd is closed.
        """
        self._check()
        from .vcpu_state import host_tsc_khz

        return host_tsc_khz()

    # --- introspection --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """guestmem extension: counters of the model VM's state (plus the vCPUs' providers).

        :raises OSError: EBADF if the VM fd is closed.
        """
        with self._lock:
            self._check()
            out: dict[str, Any] = {
                "memslots": len(self._slots),
                "memslot_pages": self._nr_memslot_pages,
                "attribute_ranges": len(self._attributes),
                "invalidations": self._invalidations,
                "guest_memfds": len(self._gmems),
                "mixed_blocks": {f"{s.as_id}:{s.id}": {"2M": s.mixed_count(1), "1G": s.mixed_count(2)}
                                 for s in self._slots.values()},
                "gmem": self._gmem_totals(),
            }
            for provider in self._stats_providers:
                out.update(provider())
            return out

    def _gmem_totals(self) -> dict[str, Any]:
        """Pages and folios of the VM's open guest_memfds, summed (GuestMemfd.stats per file)."""
        total: dict[str, Any] = {"pages_private": 0, "pages_shared": 0, "pages_allocated": 0,
                                 "folios": {}, "splits": 0, "merges": 0, "pins": 0}
        for g in list(self._gmems):
            if g._released:
                continue
            for k, v in g._stats().items():
                if k == "folios":
                    for size, n in v.items():
                        total["folios"][size] = total["folios"].get(size, 0) + n
                elif k in total:
                    total[k] += v
        return total

    def _snapshot(self) -> tuple:
        """A comparable image of all VM state (slots, lookup maps, attributes, bindings)."""
        with self._lock:
            return (
                tuple(self._slots[k]._snapshot() for k in sorted(self._slots)),
                tuple(tuple((s, e, v.id) for s, e, v in m) for m in self._gfn_maps),
                self._attributes.snapshot(),
                self._nr_memslot_pages,
                tuple(sorted((g._ino, tuple((s, e, v.id) for s, e, v in g._bindings), g._state.attributes.snapshot())
                             for g in self._gmems)),
                self._exit_hypercall_mask,
                self._users,
            )

    def _check_invariants(self) -> None:
        """Assert the module's invariants (tests)."""
        with self._lock:
            self._attributes.check()
            total = 0
            for (as_id, id_), slot in self._slots.items():
                total += slot.npages
                assert self._gfn_maps[as_id].uniform(slot.base_gfn, slot.end_gfn) is slot
                if slot.gmem is not None:
                    assert slot.gmem._bindings.uniform(slot.pgoff, slot.pgoff + slot.npages) is slot
                if self._private_mem:
                    slot._check_mixed(self._attributes)
            assert total == self._nr_memslot_pages
            for m in self._gfn_maps:
                m.check()
            if not self._private_mem:
                assert len(self._attributes) == 0


__all__ = ["Vm", "KVM_API_VERSION"]
