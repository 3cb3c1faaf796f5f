"""Model vCPU: real x86 guest code on Unicorn, with KVM's fault path and exits.

Data model. A ``Vcpu`` belongs to one model ``Vm`` and owns one Unicorn instance; every vCPU
of a VM maps the same host memory (gmem or userspace_addr), so they share guest memory like
hardware vCPUs share RAM. Unicorn's physical address space stands for the TDP tables:
``guest_mapping.RegionMap`` holds what is mapped, and the fault path in ``guest_mapping``
decides what may be (spec section 5).

Locks (order: ``Vm._lock`` -> ``uc_lock``):
- ``_ioctl_lock``: vcpu->mutex; every vCPU ioctl holds it, so they serialise like in KVM.
- ``uc_lock``: held while inside ``emu_start`` and while mapping or unmapping. The vCPU thread
  never waits for ``Vm._lock`` while holding it.
- Faults are resolved *outside* emulation with ``Vm._lock`` held, and mapped with both locks
  held. An invalidation (punch, attribute change, memslot delete, gmem release, hwpoison)
  runs our listener in the invalidating thread with ``Vm._lock`` held: it stops emulation
  (``emu_stop``, repeated until ``uc_lock`` is free, since a stop that lands just before
  ``emu_start`` is lost), unmaps the affected regions and returns. A fault can therefore never
  map a translation that an invalidation already removed: the resolve+map step and the
  invalidation exclude each other on ``Vm._lock``, which is what KVM's mmu_invalidate_seq
  retry achieves without a global lock.

Precision: emulation runs with an instruction count limit, which makes Unicorn check for a
stop request after every instruction, so an IN/OUT exit happens right after that instruction
(without it Unicorn finishes the translation block first).

Exceptions. Unicorn does not deliver exceptions through the guest IDT. #UD at VMCALL/VMMCALL
is the hypercall path; a #PF whose page-table pages are not yet mapped is resolved by our own
page walk and retried; any other exception ends in ``ShutdownExit``, which is what KVM reports
for a guest without working exception handlers (triple fault).
"""

from __future__ import annotations

import errno as _errno
import threading
import time

from ..errors import oserror
from ..types import (
    DTable, HltExit, HypercallExit, InternalErrorExit, IntrExit, IoExit, MmioExit, Regs, Segment,
    Sregs, ShutdownExit,
)
from ..uapi import Hypercall, HypercallExitFlag, IoDirection, KvmHypercallError, MemFlag
from . import guest_mapping as gm

_uc = None
_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15")
_COUNT = 1 << 62
_END = 0xFFFF_FFFF_FFFF_FFFF
_HYPERCALL_INSNS = (b"\x0f\x01\xc1", b"\x0f\x01\xd9")  # VMCALL, VMMCALL
EFER, FS_BASE, GS_BASE = 0xC0000080, 0xC0000100, 0xC0000101


def _unicorn():
    """Import Unicorn on first use: ``import guestmem`` never needs it."""
    global _uc
    if _uc is None:
        try:
            import unicorn
            import unicorn.x86_const
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("model vCPUs run guest code on Unicorn: pip install unicorn") from exc
        _uc = unicorn
    return _uc


def _mode_of(sregs: Sregs) -> str:
    if sregs.efer & (1 << 10) and sregs.cs.l:
        return "64"
    return "32" if sregs.cr0 & 1 else "16"


class Vcpu:
    """A model vCPU (KVM_CREATE_VCPU); methods mirror the vCPU ioctls."""

    def __init__(self, vm, vcpu_id: int) -> None:
        self.vcpu_id = vcpu_id
        self._vm = vm
        self._closed = False
        self._ioctl_lock = threading.Lock()
        self.uc_lock = threading.Lock()
        self._map = gm.RegionMap()
        self._regs = Regs()
        self._sregs = Sregs()
        self._mode = _mode_of(self._sregs)
        self._u = None  # the Unicorn instance, built on first use
        self._dirty = True  # cached regs/sregs must be written to Unicorn before running
        self._event = None
        self._in_emu = False
        self._kick = False
        self._stop_gen = 0  # bumped by every invalidation that stopped and unmapped this vCPU
        self._pending = None  # what the next run() completes first: ("io", size) / ("hc",) / ("mmio", ...)
        self._io_data = None
        self._mmio_data = None
        self._hc_ret = 0
        self._is_tdx: bool | None = None
        vm._add_invalidation_listener(self._invalidate_range)
        vm._stats_providers.append(self._stats)

    # --- plumbing --------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise oserror(_errno.EBADF, f"vcpu {self.vcpu_id} is closed")

    def _stats(self) -> dict:
        c = self._map.counts()
        p = f"vcpu{self.vcpu_id}_mappings"
        return {f"{p}_4k": c[0], f"{p}_2m": c[1], f"{p}_1g": c[2]}

    def _build(self):
        """(Re)create the Unicorn instance for the current CPU mode (caller holds both locks)."""
        u = _unicorn()
        c = u.unicorn_const
        x = u.x86_const
        mode = {"16": c.UC_MODE_16, "32": c.UC_MODE_32, "64": c.UC_MODE_64}[self._mode]
        if self._u is not None:
            self._map.clear(self._u)
        uc = u.Uc(c.UC_ARCH_X86, mode)
        uc.hook_add(c.UC_HOOK_MEM_UNMAPPED, self._hook_unmapped)
        uc.hook_add(c.UC_HOOK_MEM_WRITE_PROT, self._hook_wprot)
        uc.hook_add(c.UC_HOOK_INTR, self._hook_intr)
        uc.hook_add(c.UC_HOOK_INSN, self._hook_in, None, 1, 0, x.UC_X86_INS_IN)
        uc.hook_add(c.UC_HOOK_INSN, self._hook_out, None, 1, 0, x.UC_X86_INS_OUT)
        self._u = uc
        return uc

    def _lock_uc(self) -> None:
        """Take uc_lock, stopping a running emulation; a stop racing emu_start is retried."""
        while not self.uc_lock.acquire(timeout=0.0002):
            if self._in_emu:
                self._u.emu_stop()

    def _invalidate_range(self, gfn_start: int, gfn_end: int) -> None:
        """Invalidation listener (kvm_mmu_invalidate_range / kvm_unmap_gfn_range), under Vm._lock."""
        if self._closed or self._u is None:
            return
        lo, hi = gfn_start * gm.PAGE, gfn_end * gm.PAGE
        hit = self._map.overlapping(lo, hi) + self._map.overlapping(lo | gm.TDX_SHARED_BIT, hi | gm.TDX_SHARED_BIT)
        if not hit:
            return
        self._lock_uc()
        try:
            self._map.unmap(self._u, sorted(set(hit)))
            self._stop_gen += 1
        finally:
            self.uc_lock.release()

    # --- hooks (inside emu_start, uc_lock held; they never take Vm._lock) --------------------

    def _hook_unmapped(self, uc, access, addr, size, value, _):
        self._event = ("fault", access, addr, size, value)
        return False

    def _hook_wprot(self, uc, access, addr, size, value, _):
        self._event = ("wprot", access, addr, size, value)
        return False

    def _hook_intr(self, uc, intno, _):
        self._event = ("intr", intno)
        uc.emu_stop()

    def _hook_in(self, uc, port, size, _):
        self._event = ("in", port, size)
        uc.emu_stop()
        return 0

    def _hook_out(self, uc, port, size, value, _):
        self._event = ("out", port, size, value)
        uc.emu_stop()

    # --- registers -------------------------------------------------------------------------

    def _x(self, name: str) -> int:
        x = _unicorn().x86_const
        if self._mode != "64" and name in ("rip",) + _REGS[:8]:
            name = "e" + name[1:]
        return getattr(x, "UC_X86_REG_" + name.upper())

    def _sync_out(self) -> None:
        """Write cached regs/sregs into Unicorn (caller holds uc_lock and Vm._lock)."""
        x = _unicorn().x86_const
        if self._u is None or _mode_of(self._sregs) != self._mode:
            self._mode = _mode_of(self._sregs)
            self._build()
        uc, s, r = self._u, self._sregs, self._regs
        bits = 64 if self._mode == "64" else 32
        if self._mode != "16":
            uc.msr_write(EFER, s.efer)
            uc.reg_write(x.UC_X86_REG_CR4, s.cr4 & (2**bits - 1))
            uc.reg_write(x.UC_X86_REG_CR3, s.cr3 & (2**bits - 1))
        uc.reg_write(x.UC_X86_REG_CR0, s.cr0 & 0xFFFF_FFFF)
        uc.reg_write(x.UC_X86_REG_GDTR, (0, s.gdt.base, s.gdt.limit, 0))
        uc.reg_write(x.UC_X86_REG_IDTR, (0, s.idt.base, s.idt.limit, 0))
        if self._mode == "16":
            for seg in ("cs", "ds", "es", "ss", "fs", "gs"):
                uc.reg_write(getattr(x, "UC_X86_REG_" + seg.upper()), getattr(s, seg).selector)
        elif self._mode == "64":
            for seg in ("cs", "ds", "es", "ss"):
                uc.reg_write(getattr(x, "UC_X86_REG_" + seg.upper()), getattr(s, seg).selector)
            uc.msr_write(FS_BASE, s.fs.base)
            uc.msr_write(GS_BASE, s.gs.base)
        # 32-bit protected mode keeps Unicorn's flat segments: loading a selector would read
        # the guest GDT before the fault path has mapped it.
        for name in _REGS if self._mode == "64" else _REGS[:8]:
            uc.reg_write(self._x(name), getattr(r, name) & (2**bits - 1))
        uc.reg_write(x.UC_X86_REG_EFLAGS if bits == 32 else x.UC_X86_REG_RFLAGS, r.rflags)
        self._dirty = False

    def _sync_in(self) -> None:
        """Refresh the cached regs/sregs from Unicorn after emulation (caller holds uc_lock)."""
        x = _unicorn().x86_const
        uc = self._u
        if uc is None or self._dirty:
            return
        vals = {n: uc.reg_read(self._x(n)) for n in (_REGS if self._mode == "64" else _REGS[:8])}
        vals["rip"] = uc.reg_read(self._x("rip"))
        vals["rflags"] = uc.reg_read(x.UC_X86_REG_EFLAGS)
        self._regs = self._regs.replace(**vals)
        s = self._sregs
        sel = {n: uc.reg_read(getattr(x, "UC_X86_REG_" + n.upper())) for n in ("cs", "ds", "es", "ss", "fs", "gs")}
        segs = {n: getattr(s, n).replace(selector=v) for n, v in sel.items()}
        if self._mode == "16":
            segs = {n: v.replace(base=v.selector << 4) for n, v in segs.items()}
        gdt, idt = uc.reg_read(x.UC_X86_REG_GDTR), uc.reg_read(x.UC_X86_REG_IDTR)
        self._sregs = s.replace(
            cr0=uc.reg_read(x.UC_X86_REG_CR0), cr2=uc.reg_read(x.UC_X86_REG_CR2),
            cr3=uc.reg_read(x.UC_X86_REG_CR3), cr4=uc.reg_read(x.UC_X86_REG_CR4),
            efer=uc.msr_read(EFER) if self._mode != "16" else s.efer,
            gdt=DTable(base=gdt[1], limit=gdt[2]), idt=DTable(base=idt[1], limit=idt[2]), **segs)

    def get_regs(self) -> Regs:
        """KVM_GET_REGS (api.rst 4.11). Errors: EBADF (closed)."""
        self._check()
        with self._ioctl_lock:
            return self._regs

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS (api.rst 4.12). Errors: EBADF (closed)."""
        self._check()
        with self._ioctl_lock:
            self._regs = regs
            self._dirty = True

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS (api.rst 4.13). Errors: EBADF (closed)."""
        self._check()
        with self._ioctl_lock:
            return self._sregs

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS (api.rst 4.14). Errors: EBADF (closed).

        The model takes CR0/CR3/CR4/EFER, GDT/IDT bases and selectors from ``sregs``; hidden
        segment state is Unicorn's flat state for the mode (real, 32-bit, 64-bit).
        """
        self._check()
        with self._ioctl_lock:
            self._sregs = sregs
            self._dirty = True

    # --- completions -----------------------------------------------------------------------

    def complete_io(self, data: bytes) -> None:
        """Fill kvm_run.io data for the pending IN before the next KVM_RUN. Errors: EBADF."""
        self._check()
        self._io_data = bytes(data)

    def complete_mmio(self, data: bytes) -> None:
        """Fill kvm_run.mmio.data for the pending MMIO read. Errors: EBADF."""
        self._check()
        self._mmio_data = bytes(data)

    def set_hypercall_ret(self, value: int) -> None:
        """Set kvm_run.hypercall.ret, written to RAX by the next KVM_RUN. Errors: EBADF."""
        self._check()
        self._hc_ret = value

    def kick(self) -> None:
        """Make a running (or the next) KVM_RUN return KVM_EXIT_INTR, like a signal. Errors: EBADF."""
        self._check()
        self._kick = True
        while self._in_emu and self._kick:
            self._u.emu_stop()
            time.sleep(0.0002)

    def close(self) -> None:
        """Close the vCPU fd; later calls fail with EBADF."""
        if self._closed:
            return
        self._kick = True
        with self._ioctl_lock:
            with self._vm._lock:
                self._closed = True
                self._vm._remove_invalidation_listener(self._invalidate_range)
                if self._stats in self._vm._stats_providers:
                    self._vm._stats_providers.remove(self._stats)
                with self.uc_lock:
                    if self._u is not None:
                        self._map.clear(self._u)
                    self._u = None

    # --- KVM_RUN ---------------------------------------------------------------------------

    def _linear_rip(self) -> int:
        r = self._regs.rip
        return (self._sregs.cs.selector << 4) + (r & 0xFFFF) if self._mode == "16" else r

    def _read_linear(self, la: int, n: int) -> bytes | None:
        """Read guest memory at a linear address through our page walk (caller holds Vm._lock)."""
        s = self._sregs
        pa, _ = gm.page_walk(self._vm, s.cr0, s.cr3, s.cr4, s.efer, la)
        return None if pa is None else gm.read_guest_phys(self._vm, pa, n)

    def _long_mode(self) -> bool:
        return self._mode == "64" and bool(self._sregs.efer & (1 << 10))

    def _complete_pending(self) -> None:
        """Finish the instruction the last exit left half done (complete_userspace_io & co)."""
        p, self._pending = self._pending, None
        if p is None:
            return
        r = self._regs
        if p[0] == "io" and self._io_data is not None:
            size = p[1]
            val = int.from_bytes(self._io_data[:size].ljust(size, b"\0"), "little")
            keep = {1: ~0xFF, 2: ~0xFFFF, 4: 0}[size]
            self._regs = r.replace(rax=(r.rax & keep) | val)
        elif p[0] == "hc":
            ret = self._hc_ret & (2**64 - 1 if p[1] else 0xFFFF_FFFF)
            self._regs = r.replace(rax=ret, rip=r.rip + 3)
        elif p[0] == "mmio":
            self._step_mmio(p[1], p[2], p[3])
        self._io_data = None
        self._dirty = True

    def _step_mmio(self, addr: int, size: int, is_write: bool) -> None:
        """Re-execute the faulting instruction once against a one-page MMIO shim."""
        data = self._mmio_data or bytes(size)
        self._mmio_data = None
        page = addr & ~(gm.PAGE - 1)
        with self._vm._lock:
            self._lock_uc()
            try:
                self._sync_out()
                uc = self._u
                self._map.unmap(uc, self._map.overlapping(page, page + gm.PAGE))

                def rd(uc_, off, sz, _):
                    rel = page + off - addr  # Unicorn may split the access
                    d = data[rel:rel + sz] if 0 <= rel < len(data) else b""
                    return int.from_bytes(d.ljust(sz, b"\0"), "little")

                uc.mmio_map(page, gm.PAGE, rd, None, lambda *a: None, None)
                try:
                    self._event = None
                    uc.emu_start(self._linear_rip(), _END, count=1)
                finally:
                    uc.mem_unmap(page, gm.PAGE)
                self._sync_in()
            finally:
                self.uc_lock.release()

    def run(self):
        """KVM_RUN (api.rst 4.10): run until an exit; mirrors vcpu_run/vcpu_enter_guest.

        Returns an exit dataclass. ``MemoryFaultExit`` stands for KVM_RUN failing with EFAULT or
        EHWPOISON and a valid memory_fault exit. Errors: EBADF (closed); EFAULT without an exit
        when a shared page's userspace_addr is not mapped in this process.
        """
        self._check()
        with self._ioctl_lock:
            self._check()
            self._complete_pending()
            while True:
                ex = self._run_once()
                if ex is not None:
                    return ex

    def _run_once(self):
        uc_mod = _unicorn()
        err = None
        if self._dirty or self._u is None:
            with self._vm._lock:
                with self.uc_lock:
                    self._sync_out()
        with self.uc_lock:
            if self._kick:
                self._kick = False
                return IntrExit()
            gen = self._stop_gen
            self._event = None
            self._in_emu = True
            try:
                self._u.emu_start(self._linear_rip(), _END, count=_COUNT)
            except uc_mod.UcError as exc:
                err = exc.errno
            finally:
                self._in_emu = False
            self._sync_in()
            ev, self._event = self._event, None
        c = uc_mod.unicorn_const
        if ev is not None:
            kind = ev[0]
            if kind == "out":
                _, port, size, value = ev
                return IoExit(int(IoDirection.OUT), size, port, 1, (value & (2 ** (8 * size) - 1)).to_bytes(size, "little"))
            if kind == "in":
                self._pending = ("io", ev[2])
                return IoExit(int(IoDirection.IN), ev[2], ev[1], 1, bytes(ev[2]))
            if kind in ("fault", "wprot"):
                return self._handle_fault(ev)
            if kind == "intr":
                return self._handle_exception(ev[1])
        if err == c.UC_ERR_INSN_INVALID:
            return self._handle_ud()
        if err is not None:
            return ShutdownExit()
        if self._kick:
            self._kick = False
            return IntrExit()
        # A quiet stop: HLT, an invalidation's emu_stop, or (after Unicorn has delivered an
        # exception to a hook once) a #UD that Unicorn no longer reports as an error.
        with self._vm._lock:  # no invalidation runs while we hold it: any that stopped us is done
            stopped = self._stop_gen != gen
            la = self._linear_rip()
            here = self._read_linear(la, 3)
            before = self._read_linear(la - 1, 1) if la else None
        if here in _HYPERCALL_INSNS:
            return self._handle_ud()
        if stopped:
            return None  # an invalidation stopped us: resume transparently
        return HltExit() if before == b"\xf4" else ShutdownExit()

    def _handle_fault(self, ev):
        _, access, addr, size, value = ev
        c = _unicorn().unicorn_const
        tdx = self._tdx()
        fault_private = None
        if tdx:
            fault_private = not addr & gm.TDX_SHARED_BIT
        gpa = addr % gm.PHYS_LIMIT if tdx else addr
        gfn = gpa // gm.PAGE
        is_write = access in (c.UC_MEM_WRITE_UNMAPPED, c.UC_MEM_WRITE_PROT)
        with self._vm._lock:
            if ev[0] == "wprot":  # a write to a READONLY slot is emulated as MMIO
                b, ex = None, None
            else:
                b, ex = gm.lookup(self._vm, gfn, fault_private)
            if ex is not None:
                return ex
            if b is not None:
                self._map_backing(gfn, b, addr & gm.TDX_SHARED_BIT if tdx else 0)
                return None
        if access == c.UC_MEM_FETCH_UNMAPPED:
            return InternalErrorExit(suberror=1, data=(gpa,))  # KVM_INTERNAL_ERROR_EMULATION
        self._pending = ("mmio", addr, size, is_write)
        data = (value & (2 ** (8 * size) - 1)).to_bytes(size, "little") if is_write else bytes(size)
        return MmioExit(phys_addr=gpa, data=data, len=size, is_write=is_write)

    def _map_backing(self, gfn: int, b, alias: int) -> None:
        """Map the block holding gfn (caller holds Vm._lock)."""
        start, n, level = gm.choose_block(self._vm, gfn, b)
        prot = _unicorn().unicorn_const.UC_PROT_ALL
        if b.gmem is None and b.slot.flags & MemFlag.READONLY:
            prot &= ~_unicorn().unicorn_const.UC_PROT_WRITE
        self._lock_uc()
        try:
            self._map.map(self._u, (start * gm.PAGE) | alias, n * gm.PAGE, level, gm.host_address(b, start), prot)
        finally:
            self.uc_lock.release()

    def _tdx(self) -> bool:
        if self._is_tdx is None:
            from .. import model

            self._is_tdx = self._vm.type == getattr(model, "GUESTMEM_TDX_LIKE_VM", None)
        return self._is_tdx

    def _handle_exception(self, vector: int):
        """#PF from a walk through unmapped page tables: map them and retry; else shutdown."""
        if vector != 14:
            return ShutdownExit()
        s = self._sregs
        with self._vm._lock:
            pa, tables = gm.page_walk(self._vm, s.cr0, s.cr3, s.cr4, s.efer, s.cr2)
            missing = [t for t in tables if not self._map.overlapping(t, t + 1)]
            if not missing:
                return ShutdownExit()
            for t in missing:
                b, ex = gm.lookup(self._vm, t // gm.PAGE, None)
                if ex is not None:
                    return ex
                if b is None:
                    return ShutdownExit()
                self._map_backing(t // gm.PAGE, b, 0)
        return None

    def _handle_ud(self):
        """#UD: VMCALL/VMMCALL is a hypercall (kvm_emulate_hypercall), anything else shuts down."""
        with self._vm._lock:
            insn = self._read_linear(self._linear_rip(), 3)
        if insn not in _HYPERCALL_INSNS:
            return ShutdownExit()
        r, s = self._regs, self._sregs
        long_mode = self._long_mode()
        m = 2**64 - 1 if long_mode else 0xFFFF_FFFF
        nr, gpa, npages, attrs = r.rax & m, r.rbx & m, r.rcx & m, r.rdx & m
        cpl = s.cs.selector & 3 if s.cr0 & 1 else 0
        if cpl != 0:
            ret = -KvmHypercallError.EPERM
        elif nr != Hypercall.MAP_GPA_RANGE or not self._vm._exit_hypercall_mask & (1 << Hypercall.MAP_GPA_RANGE):
            ret = -KvmHypercallError.ENOSYS
        elif gpa % gm.PAGE or npages == 0 or (gpa >> 12) + npages > (2**64 - 1) >> 12:
            ret = -KvmHypercallError.EINVAL
        else:
            self._hc_ret = 0
            self._pending = ("hc", long_mode)
            return HypercallExit(nr=int(nr), args=(gpa, npages, attrs, 0, 0, 0), ret=0,
                                 flags=int(HypercallExitFlag.LONG_MODE) if long_mode else 0)
        self._regs = r.replace(rax=ret & m, rip=r.rip + 3)
        self._dirty = True
        return None

    # --- KVM_PRE_FAULT_MEMORY --------------------------------------------------------------

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY (api.rst 4.143); mirrors kvm_arch_vcpu_pre_fault_memory.

        Maps [gpa, gpa+size) one page or block per step and returns the (gpa, size) left.
        Errors, in order: EBADF (closed); EINVAL (flags != 0); EINVAL (gpa or size unaligned,
        or gpa+size <= gpa); then, only if no step succeeded: ENOENT (no memslot), EFAULT
        (private without gmem, gmem released), EHWPOISON (poisoned gmem page).
        """
        self._check()
        if flags:
            raise oserror(_errno.EINVAL, f"flags {flags:#x} must be 0")
        if gpa % gm.PAGE or size % gm.PAGE or (gpa + size) % 2**64 <= gpa:
            raise oserror(_errno.EINVAL, f"range gpa={gpa:#x} size={size:#x} is unaligned or empty")
        with self._ioctl_lock:
            done = False
            while size:
                gfn = gpa // gm.PAGE
                with self._vm._lock:
                    if self._u is None or self._dirty:
                        with self.uc_lock:
                            self._sync_out()
                    try:
                        b, ex = gm.lookup(self._vm, gfn, None)
                    except OSError:
                        if done:
                            break
                        raise
                    if b is None:
                        if done:
                            break
                        if ex is None:
                            raise oserror(_errno.ENOENT, f"gpa {gpa:#x} has no memslot")
                        raise oserror(ex.errno, f"gpa {gpa:#x} cannot be faulted in")
                    if b.gmem is not None:
                        gm.allocate_gmem_page(b)
                    start, n, _ = gm.choose_block(self._vm, gfn, b)
                    if b.private:
                        start, n = gfn, 1  # private memory advances 4 KiB per step (spec 5.4)
                    self._map_backing(gfn, b, 0)
                step = min((start + n) * gm.PAGE - gpa, size)
                gpa, size, done = gpa + step, size - step, True
            return gpa, size
