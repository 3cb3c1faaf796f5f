"""Model vCPU: real x86 guest code on Unicorn, with KVM's fault path and exits.

Data model. A ``Vcpu`` belongs to one model ``Vm`` (it holds a VM reference, like
kvm_vm_ioctl_create_vcpu's kvm_get_kvm, and a reserved fd from ``fdtable``) and owns one
Unicorn instance; every vCPU of a VM maps the same host memory (gmem or userspace_addr), so
they share guest memory like hardware vCPUs share RAM. Unicorn's physical address space
stands for the TDP tables: ``regions.RegionMap`` holds what is mapped (through host windows
whose backing an invalidation switches without touching the engine), the fault path in
``fault`` decides what may be (spec section 5), ``exits`` turns engine events into
KVM exits and ``unicorn_cpu`` holds the engine plumbing (registers through libunicorn).

Locks (order: ``Vm._lock`` -> ``uc_lock``):

- ``_ioctl_lock``: vcpu->mutex; every vCPU ioctl holds it, so they serialise like in KVM.
- ``uc_lock``: held while inside ``emu_start`` and while touching the Unicorn instance. The
  vCPU thread never waits for ``Vm._lock`` while holding it.
- Faults are resolved *outside* emulation with ``Vm._lock`` held, and mapped with both locks
  held. An invalidation (punch, attribute change, memslot delete, gmem release, hwpoison)
  runs our listener in the invalidating thread with ``Vm._lock`` held: it stops emulation
  (``emu_stop``, repeated until ``uc_lock`` is free, since a stop that lands just before
  ``emu_start`` is lost), unmaps the affected regions and returns. A fault can therefore never
  map a translation that an invalidation already removed: the resolve+map step and the
  invalidation exclude each other on ``Vm._lock``, which is what KVM's mmu_invalidate_seq
  retry achieves without a global lock.

Registers. Unicorn holds the truth while the vCPU runs; ``vcpu_regs`` keeps the cache over
it (read lazily, writes queued and written in one batch before the next ``emu_start``), so an
exit costs a RIP read, not a full register round trip.

Exact IN/OUT exits: ``io_sites`` hooks the instruction after each IN/OUT the guest executes.

Code follows memory: ``code_cache`` records the bytes every translation block was made from
and, before each ``emu_start``, compares them with memory; after a write by the host, another
vCPU or another process, the engine's translations and the IN/OUT sites are dropped.

Instruction bytes (hypercall check, HLT, IN/OUT length) are read through a page walk over
Unicorn's own mapped memory (the CPU just fetched them, so the page-table and code pages are
mapped), with the last translation cached until an invalidation touches it or CR3 changes.
The Python page walk in ``paging`` is the fallback.

Exceptions. Unicorn does not deliver exceptions through the guest IDT. #UD at VMCALL/VMMCALL
is the hypercall path; a #PF whose page-table pages are not yet mapped is resolved by our own
page walk and retried; every other exception (and INT n) is delivered through the guest's IDT
by ``interrupts``, and a guest without working handlers ends in ``ShutdownExit`` (triple fault),
as under KVM.

Physical address width: Unicorn's CPU has 40 physical address bits, so the TDX-like shared
bit is bit 39 (``fault.TDX_SHARED_BIT``), not TDX's bit 51 or 47.
"""

from __future__ import annotations

import errno as _errno
import threading
import time
from typing import TYPE_CHECKING

from ..encoding import encode_unsigned
from ..errors import oserror
from ..types import Exit, HypercallExit, IntrExit, IoExit, MmioExit, ShutdownExit
from ..uapi import PAGE_SIZE as PAGE, IoDirection
from . import fdtable
from . import exits
from .exits import (ExceptionEvent, FetchProtEvent, HookEvent, MemoryEvent, PendingCompletion, PendingHypercall,
                    PendingIn, PendingMmio, WriteProtEvent)
from . import fault
from . import interrupts
from .code_cache import CodeCache
from .io_sites import IoSites
from .regions import RegionMap
from .unicorn_cpu import Engine, mode_of
from .unicorn_cpu import unicorn as _unicorn
from .vcpu_checks import reset_regs, reset_sregs
from .vcpu_regs import VcpuRegisters
from .vcpu_state import VcpuState

if TYPE_CHECKING:
    from .vm import Vm

_IN, _OUT = int(IoDirection.IN), int(IoDirection.OUT)


class Vcpu(VcpuRegisters, VcpuState, fdtable.FdObject):
    """A model vCPU (KVM_CREATE_VCPU); methods mirror the vCPU ioctls.

    What ``exits`` and ``interrupts`` use (model-internal, not the KVM API): the VM
    (``_vm``), the engine (``_engine``, a ``unicorn_cpu.Engine``) and what it maps
    (``_regions``), the register cache (``_read_regs``, ``_read_sregs``, ``_queue``,
    ``_set_cr2``, ``_restore_cr2``, ``_load_selectors``), ``_step_instruction``, the typed
    records of ``exits`` (``_hook_event``, ``_pending_completion``) and kvm_run's
    hypercall.ret (``_hypercall_ret``).
    """

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vcpu_id = vcpu_id
        self._vm: Vm = vm
        self._closed = False
        self._ioctl_lock = threading.Lock()
        self.uc_lock = threading.Lock()
        self._regions = RegionMap()  # what the engine maps: Unicorn's physical space stands for the TDP tables
        self._regs = reset_regs()
        self._sregs = reset_sregs(vcpu_id)
        self._mode = mode_of(self._sregs)
        self._engine: Engine | None = None  # built on first run, rebuilt when the CPU mode changes
        self._sregs_dirty = True  # set_sregs happened: write everything before running
        self._regs_stale = False  # Unicorn's registers are newer than self._regs
        self._sregs_stale = False  # Unicorn's special registers are newer than self._sregs
        self._queued_regs: dict[str, int] = {}  # register writes queued for the next emu_start
        self._next_pc = 0  # linear address the next emu_start begins at
        self._hook_event: HookEvent | None = None  # what a hook saw in the current emu_start (exits)
        # an exception or memory event since the engine's exception in flight was last cleared (hidden_state)
        self._exception_maybe_in_flight = False
        self._io_sites = IoSites()  # exact IN/OUT stops
        self._code_cache = CodeCache()  # the code bytes the engine translated, checked on every entry
        self._in_emu = False  # inside emu_start: a stop must go through the engine
        self._kick = False  # kick() or close() asked the running (or next) KVM_RUN to return
        self._invalidation_gen = 0  # bumped by every invalidation that stopped and unmapped this vCPU
        self._pending_completion: PendingCompletion | None = None  # what the next run() completes first
        self._last_exit: Exit | None = None  # what complete_io/complete_mmio/set_hypercall_ret answer
        # the kvm_run fields userspace fills before the next KVM_RUN
        self._io_in_data: bytes | None = None  # io data for an IN
        self._mmio_read_data: bytes | None = None  # mmio.data for a read
        self._hypercall_ret = 0  # hypercall.ret
        self._guest_cr2 = 0  # CR2 as the guest last saw it (Unicorn clobbers it: exits.handle_exception)
        self._is_tdx: bool | None = None  # a GUESTMEM_TDX_LIKE_VM (the shared bit aliases each GFN); set on first use
        self._mm = vm._mm  # vcpu->kvm->mm: ioctls from another process get EIO
        self._init_state(vcpu_id)  # CPUID, MSRs, MP state, TSC (vcpu_state)
        vm._get_kvm()  # the vCPU pins the VM (kvm_vm_ioctl_create_vcpu)
        self._fd: int | None = fdtable.fd_install(self)
        fdtable.at_fork_in_child(self)
        vm._add_invalidation_listener(self._invalidate_range)
        vm._stats_providers.append(self._stats)

    def __repr__(self) -> str:
        return f"<model Vcpu id={self.vcpu_id} fd={self._fd}>"

    @property
    def closed(self) -> bool:
        return self._closed

    # --- plumbing --------------------------------------------------------------------------

    def _check_fd(self) -> int:
        """EBADF closed; returns the fd (for what is not an ioctl: no mm check)."""
        if self._closed:
            raise oserror(_errno.EBADF, f"vcpu {self.vcpu_id} is closed")
        return self._fd  # type: ignore[return-value]

    def _check(self) -> int:
        """The checks every vCPU ioctl makes first (kvm_vcpu_ioctl): EBADF closed, EIO from another mm;
        returns the fd."""
        if self._closed:
            raise oserror(_errno.EBADF, f"vcpu {self.vcpu_id} is closed")
        if self._mm is not fdtable.mm:
            raise oserror(_errno.EIO, f"vcpu {self.vcpu_id}'s VM belongs to another process (used after fork)")
        return self._fd  # type: ignore[return-value]

    def _after_fork_in_child(self) -> None:
        # Threads that held these (a run(), an ioctl) do not exist in the child.
        self._ioctl_lock = threading.Lock()
        self.uc_lock = threading.Lock()
        self._in_emu = False
        self._kick = False

    def _stats(self) -> dict:
        c = self._regions.counts()
        p = f"vcpu{self.vcpu_id}_mappings"
        return {f"{p}_4k": c[0], f"{p}_2m": c[1], f"{p}_1g": c[2], f"vcpu{self.vcpu_id}_io_sites": len(self._io_sites)}

    def _build(self) -> Engine:
        """(Re)create the engine for the current CPU mode (caller holds both locks)."""
        u = _unicorn()
        c = u.unicorn_const
        x = u.x86_const
        if self._engine is not None:
            self._regions.clear(self._engine.uc)
        eng = Engine(self._mode)
        uc = eng.uc
        uc.hook_add(c.UC_HOOK_EDGE_GENERATED, self._hook_tb)
        self._code_cache = CodeCache()
        uc.hook_add(c.UC_HOOK_MEM_UNMAPPED, self._hook_unmapped)
        uc.hook_add(c.UC_HOOK_MEM_WRITE_PROT, self._hook_wprot)
        uc.hook_add(c.UC_HOOK_MEM_FETCH_PROT, self._hook_xprot)
        uc.hook_add(c.UC_HOOK_INTR, self._hook_intr)
        uc.hook_add(c.UC_HOOK_INSN, self._hook_in, None, 1, 0, x.UC_X86_INS_IN)
        uc.hook_add(c.UC_HOOK_INSN, self._hook_out, None, 1, 0, x.UC_X86_INS_OUT)
        self._io_sites.install(uc)
        self._engine = eng
        return eng

    def _lock_uc(self) -> None:
        """Take uc_lock, stopping a running emulation; a stop racing emu_start is retried."""
        if self.uc_lock.acquire(False):
            return
        while not self.uc_lock.acquire(timeout=0.0002):
            if self._in_emu:
                self._engine.stop()

    def _invalidate_range(self, gfn_start: int, gfn_end: int) -> None:
        """Invalidation listener (kvm_mmu_invalidate_range / kvm_unmap_gfn_range), under Vm._lock."""
        eng = self._engine
        if self._closed or eng is None:
            return
        lo, hi = gfn_start * PAGE, gfn_end * PAGE
        eng.forget_translation(lo, hi)
        hit = self._regions.overlapping(lo, hi)
        if self._tdx():
            hit += self._regions.overlapping(lo | fault.TDX_SHARED_BIT, hi | fault.TDX_SHARED_BIT)
        if not hit:
            return
        self._lock_uc()
        try:
            uc = eng.uc
            if len(hit) > 1:
                hit = sorted(set(hit))
            if self._tdx():
                drop, flush = hit, False  # both views of a GFN: always fault again
            else:
                drop, flush = self._regions.refresh(uc, self._vm, hit)
            self._regions.unmap(uc, drop)
            if flush:
                uc.ctl_flush_tb()
            self._invalidation_gen += 1
        finally:
            self.uc_lock.release()

    # --- hooks (inside emu_start, uc_lock held; they never take Vm._lock) --------------------

    def _hook_unmapped(self, uc, access, addr, size, value, _):
        if self._hook_event is None:
            self._hook_event = MemoryEvent(access, addr, size, value)
        return False

    def _hook_wprot(self, uc, access, addr, size, value, _):
        if self._hook_event is None:
            self._hook_event = WriteProtEvent(access, addr, size, value)
        return False

    def _hook_xprot(self, uc, access, addr, size, value, _):
        if self._hook_event is None:
            self._hook_event = FetchProtEvent(access, addr, size, value)
        return False

    def _hook_intr(self, uc, intno, _):
        if self._hook_event is None:
            # The error code and CR2 are only right here: after emu_stop, Unicorn 2.1.4 leaves
            # error code 0 and CR2 = -2 behind (measured).
            eng = self._engine
            self._hook_event = ExceptionEvent(intno, eng.hidden.exception_info(), eng.read_cr2())
        uc.emu_stop()

    def _hook_tb(self, uc, tb, _prev, _):
        """A translation block was generated: record the guest-physical bytes it came from."""
        la, n = tb.pc, tb.size
        while n > 0:
            k = min(n, PAGE - la % PAGE)
            pa = self._engine.physical(la)
            if pa is not None:
                self._code_cache.record(pa, k, self._regions)
            la, n = la + k, n - k

    def _flush_code(self, uc) -> None:
        """Drop everything derived from code bytes: translations and IN/OUT sites (uc_lock held)."""
        uc.ctl_flush_tb()
        self._code_cache.clear()
        self._io_sites.clear(uc)

    def _stop_at_io(self, uc, ex: IoExit) -> None:
        """An IN/OUT: record the exit it becomes and stop (``io_sites`` makes the stop exact)."""
        self._hook_event = ex
        eng = self._engine
        la = eng.read_pc()
        if la not in self._io_sites.sites:
            self._io_sites.first_seen(uc, la, eng.read_linear(la, 15), self._regions)
        uc.emu_stop()

    # An IN/OUT after the first one of an emu_start is the rest of a block after a first-seen
    # site, which ``io_sites`` discards: only the first makes an exit.

    def _hook_in(self, uc, port, size, _):
        if self._hook_event is None:
            self._stop_at_io(uc, IoExit(_IN, size, port, 1, b""))
        return 0

    def _hook_out(self, uc, port, size, value, _):
        if self._hook_event is None:
            self._stop_at_io(uc, IoExit(_OUT, size, port, 1, (value & (2 ** (8 * size) - 1)).to_bytes(size, "little")))

    # --- entering the engine ------------------------------------------------------------

    def _sync_out(self) -> None:
        """Write all cached regs/sregs into Unicorn (caller holds uc_lock and Vm._lock)."""
        eng = self._engine
        if eng is None or mode_of(self._sregs) != self._mode:
            self._mode = mode_of(self._sregs)
            eng = self._build()
        r = self._regs
        eng.load(r, self._sregs)
        self._next_pc = self._linear(r.rip)
        self._queued_regs.clear()
        self._guest_cr2 = self._sregs.cr2
        self._sregs_dirty = False

    def _load_segments(self) -> None:
        """32-bit protected mode: load the selectors from the guest GDT, as a far jump would
        (Unicorn reads the descriptors), so that exception frames and IRET see the guest's CS.

        Caller holds Vm._lock, not uc_lock. A selector whose descriptor cannot be read keeps
        Unicorn's flat segment, as before.
        """
        s = self._sregs
        mem = interrupts.GuestMemory(self._vm, s, False)
        for index in {sel & ~7 for sel in (s.cs.selector, s.ss.selector, s.ds.selector)}:
            pa = mem.physical(s.gdt.base + index)
            if pa is not None:
                exits.map_physical(self, pa)
        error = _unicorn().UcError
        with self.uc_lock:
            eng = self._engine
            for seg in ("ss", "cs", "ds", "es", "fs", "gs"):
                selector = getattr(s, seg).selector
                if selector & ~3 or seg in ("cs", "ss"):
                    try:
                        eng.load_segment(seg, selector)
                    except error:
                        pass

    # --- completions -----------------------------------------------------------------------

    def complete_io(self, data: bytes | None) -> None:
        """Fill kvm_run.io data for the pending IN before the next KVM_RUN.

        ``data`` may be None after an OUT, which needs no answer.
        Errors: EBADF (closed); EINVAL if the last exit was not KVM_EXIT_IO or ``data`` is
        longer than size*count (the kvm backend's checks on the kvm_run page); TypeError for
        None after an IN.
        """
        self._check_fd()  # kvm_run page writes, not ioctls: no mm check
        ex = self._last_exit
        if not isinstance(ex, IoExit):
            raise oserror(_errno.EINVAL, "complete_io: the last exit was not KVM_EXIT_IO")
        if data is None:
            if ex.direction == IoDirection.OUT:
                return
            raise TypeError("complete_io: data must be bytes-like after an IN, not None")
        if len(data) > ex.size * ex.count:
            raise oserror(_errno.EINVAL, f"complete_io: {len(data)} bytes for a {ex.size}x{ex.count}-byte IN")
        self._io_in_data = bytes(data)

    def complete_mmio(self, data: bytes | None) -> None:
        """Fill kvm_run.mmio.data for the pending MMIO read.

        ``data`` may be None after a write, which needs no answer.
        Errors: EBADF (closed); EINVAL if the last exit was not KVM_EXIT_MMIO or ``data`` is
        longer than mmio.len; TypeError for None after a read.
        """
        self._check_fd()  # kvm_run page writes, not ioctls: no mm check
        ex = self._last_exit
        if not isinstance(ex, MmioExit):
            raise oserror(_errno.EINVAL, "complete_mmio: the last exit was not KVM_EXIT_MMIO")
        if data is None:
            if ex.is_write:
                return
            raise TypeError("complete_mmio: data must be bytes-like after a read, not None")
        if len(data) > ex.len:
            raise oserror(_errno.EINVAL, f"complete_mmio: {len(data)} bytes for a {ex.len}-byte access")
        self._mmio_read_data = bytes(data)

    def set_hypercall_ret(self, value: int) -> None:
        """Set kvm_run.hypercall.ret, written to RAX by the next KVM_RUN.

        Errors: EBADF (closed); EINVAL if the last exit was not KVM_EXIT_HYPERCALL or ``value``
        does not fit in a u64 (negative values wrap).
        """
        self._check_fd()  # kvm_run page writes, not ioctls: no mm check
        if not isinstance(self._last_exit, HypercallExit):
            raise oserror(_errno.EINVAL, "set_hypercall_ret: the last exit was not KVM_EXIT_HYPERCALL")
        if not -(2**63) <= value < 2**64:
            raise oserror(_errno.EINVAL, f"ret {value:#x} does not fit in a u64")
        self._hypercall_ret = value & (2**64 - 1)

    def kick(self) -> None:
        """Make a running (or the next) KVM_RUN return KVM_EXIT_INTR, like a signal. Errors: EBADF."""
        self._check_fd()  # a signal, not an ioctl
        self._kick = True
        while self._in_emu and self._kick:
            eng = self._engine  # None once a racing close() has dropped the engine
            if eng is not None:
                eng.stop()
            time.sleep(0.0002)

    def close(self) -> None:
        """Close the vCPU fd and drop its VM reference; later calls fail with EBADF. Idempotent."""
        if self._closed:
            return
        self._kick = True  # a run() in another thread returns IntrExit, then we take its lock
        while not self._ioctl_lock.acquire(timeout=0.001):
            if self._in_emu:
                self._engine.stop()
        try:
            with self._vm._lock:
                if self._closed:
                    return
                self._closed = True
                self._vm._remove_invalidation_listener(self._invalidate_range)
                if self._stats in self._vm._stats_providers:
                    self._vm._stats_providers.remove(self._stats)
                with self.uc_lock:
                    if self._engine is not None:
                        self._regions.clear(self._engine.uc)
                    self._engine = None
                fd, self._fd = self._fd, None
                if fd is not None:
                    fdtable.fd_close(fd)
        finally:
            self._ioctl_lock.release()
        self._vm._put_kvm()

    # --- guest memory reads ------------------------------------------------------------------

    def _tdx(self) -> bool:
        if self._is_tdx is None:
            from .profile import GUESTMEM_TDX_LIKE_VM

            self._is_tdx = self._vm.type == GUESTMEM_TDX_LIKE_VM
        return self._is_tdx

    # --- KVM_RUN ---------------------------------------------------------------------------

    def _flush_queued_regs(self) -> None:
        """Write the queued registers in one batch (caller holds uc_lock)."""
        wr = self._queued_regs
        self._engine.write_named(wr)
        wr.clear()

    def _step_instruction(self) -> None:
        """Execute the next instruction alone (complete_emulated_mmio re-executes the one that
        faulted; ``exits.step_mmio``). Caller holds uc_lock."""
        eng = self._engine
        if self._queued_regs:
            self._flush_queued_regs()
        try:
            self._hook_event = None
            eng.flush_tb()  # blocks translated without the count hook would run past it
            eng.step(self._next_pc)
        finally:
            self._hook_event = None
        self._regs_stale = self._sregs_stale = True
        self._next_pc = eng.read_pc()

    def _complete_pending(self) -> None:
        """Finish the instruction the last exit left half done (complete_userspace_io & co)."""
        p, self._pending_completion = self._pending_completion, None
        if p is None:
            return
        if type(p) is PendingIn:
            size = p.size
            data = (self._io_in_data or b"").ljust(size, b"\0")[:size]
            r = self._read_regs()
            keep = {1: ~0xFF, 2: ~0xFFFF, 4: 0}[size]
            self._queue(rax=(r.rax & keep) | int.from_bytes(data, "little"))
        elif type(p) is PendingHypercall:
            self._queue(rax=self._hypercall_ret & (2**64 - 1 if p.long_mode else 0xFFFF_FFFF), rip=p.rip + 3)
        elif type(p) is PendingMmio:
            data, self._mmio_read_data = self._mmio_read_data, None
            exits.step_mmio(self, p, data)
        self._io_in_data = None

    def run(self) -> Exit:
        """KVM_RUN (api.rst 4.10): run until an exit; mirrors vcpu_run/vcpu_enter_guest.

        Returns an exit dataclass. ``MemoryFaultExit`` stands for KVM_RUN failing with EFAULT or
        EHWPOISON and a valid memory_fault exit. Errors: EBADF (closed); EFAULT without an exit
        when a shared page's userspace_addr is not mapped in this process.
        """
        self._check()
        with self._ioctl_lock:
            self._check()
            self._last_exit = None
            self._complete_pending()
            while True:
                ex = self._run_once()
                if ex is not None:
                    if self._vm._ioeventfds and self._vm._ioeventfd_signal(ex):
                        self._complete_pending()  # an ioeventfd took the write: no exit (vm_state)
                        continue
                    self._last_exit = ex
                    return ex

    def _run_once(self) -> Exit | None:
        u = _unicorn()
        if self._engine is None or self._sregs_dirty:
            self._read_regs()
            with self._vm._lock:
                with self.uc_lock:
                    self._sync_out()
                if self._mode == "32":
                    self._load_segments()
        err = None
        with self.uc_lock:
            if self._kick:
                self._kick = False
                return IntrExit()
            eng = self._engine
            uc = eng.uc
            if self._queued_regs:
                self._flush_queued_regs()
            if self._code_cache.pages and self._code_cache.stale(self._regions):
                self._flush_code(uc)
            gen = self._invalidation_gen
            self._hook_event = None
            if self._exception_maybe_in_flight or self._regions.unmapped:  # else a later #PF is a silent triple fault
                self._exception_maybe_in_flight = self._regions.unmapped = not eng.hidden.clear_exception_in_flight()
            self._in_emu = True
            try:
                err = eng.emu_start(self._next_pc) or None
            finally:
                self._in_emu = False
            self._regs_stale = self._sregs_stale = True
            ev, self._hook_event = self._hook_event, None
            if ev is not None and ev.__class__ is not IoExit:
                self._exception_maybe_in_flight = True
            if self._io_sites.settle(uc, self._regions, eng.rip_id, eng.cs_base):
                err = None
            quiet = ev is None and err is None and self._mode == "64"
            if not quiet:  # a quiet stop in long mode: exits.handle_ud reads RIP with the rest
                self._next_pc = eng.read_pc()
        c = u.unicorn_const
        if ev is not None:
            cls = type(ev)
            if cls is IoExit:
                if ev.direction == _IN:
                    self._pending_completion = PendingIn(ev.size)
                return ev
            if cls is ExceptionEvent:
                return exits.handle_exception(self, ev)
            if cls is FetchProtEvent:
                return exits.handle_xprot(self, ev)
            return exits.handle_fault(self, ev)  # MemoryEvent, WriteProtEvent
        if err == c.UC_ERR_INSN_INVALID:
            return exits.handle_ud(self)
        if err is not None:
            return ShutdownExit()
        with self._vm._lock:  # an invalidation that stopped us has finished once we hold it
            stopped = self._invalidation_gen != gen
        if self._kick or stopped:
            if quiet:
                with self.uc_lock:
                    self._next_pc = self._engine.read_pc()
            if self._kick:
                self._kick = False
                return IntrExit()
            return None  # an invalidation stopped us: resume transparently
        return exits.handle_ud(self, quiet=True)  # HLT, or a #UD Unicorn no longer reports

    # --- KVM_PRE_FAULT_MEMORY --------------------------------------------------------------

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY (api.rst 4.143); mirrors kvm_vcpu_pre_fault_memory.

        Maps [gpa, gpa+size) one page or block per step and returns the (gpa, size) left.
        Errors, in order: EBADF (closed); ENOTTY (6.8: no such ioctl); EINVAL (flags != 0);
        EINVAL (gpa or size unaligned, or gpa+size <= gpa); EOPNOTSUPP (no TDP,
        kvm_arch_vcpu_pre_fault_memory); then, only if no step succeeded: ENOENT (no memslot),
        EFAULT (private without gmem, gmem released), EHWPOISON (poisoned gmem page).
        """
        self._check()
        # struct kvm_pre_fault_memory's u64 fields, encoded before any check (as the kvm backend does)
        gpa, size = encode_unsigned(gpa, 64, "gpa"), encode_unsigned(size, 64, "size")
        flags = encode_unsigned(flags, 64, "flags")
        profile = self._vm._profile
        if not profile.pre_fault_memory:
            raise oserror(_errno.ENOTTY, "KVM_PRE_FAULT_MEMORY does not exist before Linux 6.10")
        if flags:
            raise oserror(_errno.EINVAL, f"flags {flags:#x} must be 0")
        if gpa % PAGE or size % PAGE or (gpa + size) % 2**64 <= gpa:
            raise oserror(_errno.EINVAL, f"range gpa={gpa:#x} size={size:#x} is unaligned or empty")
        if profile.pre_fault_slotless_errno and not self._vm._had_memslot:
            raise oserror(profile.pre_fault_slotless_errno, "this VM never had a memslot (MMU root allocation)")
        if not profile.tdp:
            raise oserror(_errno.EOPNOTSUPP, "pre-faulting needs the TDP MMU")
        with self._ioctl_lock:
            self._check()
            if self._engine is None or self._sregs_dirty:
                self._read_regs()
                with self._vm._lock:
                    with self.uc_lock:
                        self._sync_out()
            return exits.pre_fault(self, gpa, size)
