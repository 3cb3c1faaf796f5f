"""KVM_RUN's exit handling for model vCPUs: faults, hypercalls, exceptions, MMIO, pre-faulting.

Data model. These functions are the vCPU's half of the kernel's fault and exit paths
(``kvm_mmu_page_fault``/``kvm_mmu_faultin_pfn``, ``kvm_emulate_hypercall``,
``kvm_arch_vcpu_pre_fault_memory``); they work on one ``vcpu.Vcpu`` through the members its
class docstring lists and follow its lock order (``Vm._lock`` -> ``uc_lock``). Resolution
rules live in ``fault`` (what backs a GFN) and ``regions`` (how a block is mapped in the
engine); this module decides which exit an event becomes.

The records: a hook of the engine leaves one ``HookEvent`` per ``emu_start`` (the first event
wins; ``Vcpu._run_once`` dispatches on its type), and an exit that leaves an instruction half
done leaves one ``PendingCompletion``, finished at the start of the next KVM_RUN
(``Vcpu._complete_pending``). Both are slots dataclasses, made once per exit.

Instruction bytes are read through the engine's own mapped memory with the last code
translation cached (``unicorn_cpu.Engine.read_linear``), falling back to a page walk over the
backing (``read_linear``).
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from ..errors import oserror
from ..types import Exit, HltExit, HypercallExit, InternalErrorExit, IoExit, MmioExit, ShutdownExit
from ..uapi import PAGE_SIZE as PAGE, Hypercall, HypercallExitFlag, KvmHypercallError, MemFlag
from . import fault
from .paging import page_walk
from .guest_phys import read_guest_phys
from . import interrupts
from .unicorn_cpu import unicorn as _unicorn

if TYPE_CHECKING:
    from .vcpu import Vcpu

HYPERCALL_INSNS = (b"\x0f\x01\xc1", b"\x0f\x01\xd9")  # VMCALL, VMMCALL
# plain ints: enum operators cost microseconds on the hypercall exit path
_MAP_GPA_RANGE, _LONG_MODE = int(Hypercall.MAP_GPA_RANGE), int(HypercallExitFlag.LONG_MODE)
_HC_EPERM, _HC_ENOSYS, _HC_EINVAL = (int(KvmHypercallError.EPERM), int(KvmHypercallError.ENOSYS),
                                     int(KvmHypercallError.EINVAL))


# --- what a stop leaves behind -------------------------------------------------------------
# A hook records the first event of an ``emu_start`` (``Vcpu._hook_event``): an IN/OUT is
# recorded as the ``IoExit`` it becomes (the OUT loop of ``guestmem bench exits`` makes
# ~100,000 exits/s on the model, and an intermediate record would cost ~0.35 us of each),
# anything else as one of the records below, which ``Vcpu._run_once`` hands to this module.

@dataclass(slots=True)
class MemoryEvent:
    """UC_HOOK_MEM_UNMAPPED: an access to a guest-physical address the engine has not mapped
    (a fault to resolve, or MMIO). ``access`` is Unicorn's UC_MEM_* kind; ``value`` the data
    of a write."""

    access: int
    addr: int
    size: int
    value: int


@dataclass(slots=True)
class WriteProtEvent(MemoryEvent):
    """UC_HOOK_MEM_WRITE_PROT: a write to a page mapped read-only (a READONLY slot, or a page
    of a dirty-logged slot not yet written since the log was last read)."""


@dataclass(slots=True)
class FetchProtEvent(MemoryEvent):
    """UC_HOOK_MEM_FETCH_PROT: a fetch from a window region not yet marked as code (``regions``)."""


@dataclass(slots=True)
class ExceptionEvent:
    """UC_HOOK_INTR: an exception or INT n. ``info`` is (error code, software interrupt?, next
    RIP) from ``hidden_state`` (None if uncalibrated) and ``cr2`` the engine's CR2, both read
    in the hook: after the stop Unicorn 2.1.4 leaves error code 0 and CR2 = -2 (measured)."""

    vector: int
    info: tuple[int, bool, int] | None
    cr2: int


HookEvent = Union[IoExit, MemoryEvent, ExceptionEvent]


# What the next KVM_RUN completes before it enters the guest (complete_userspace_io,
# complete_hypercall_exit, complete_emulated_mmio): ``Vcpu._pending_completion``.

@dataclass(slots=True)
class PendingIn:
    """An IN of ``size`` bytes: RAX takes the data userspace left (``Vcpu.complete_io``)."""

    size: int


@dataclass(slots=True)
class PendingHypercall:
    """A VMCALL/VMMCALL at ``rip``: RAX takes kvm_run.hypercall.ret (64 or 32 bits), RIP moves on."""

    long_mode: bool
    rip: int


@dataclass(slots=True)
class PendingMmio:
    """An access to MMIO at ``addr``: re-executed against the data userspace left (``step_mmio``)."""

    addr: int
    size: int
    is_write: bool


PendingCompletion = Union[PendingIn, PendingHypercall, PendingMmio]


def read_linear(v: Vcpu, la: int, n: int) -> bytes | None:
    """Guest memory at a linear address: Unicorn's view first, else our walk over the backing."""
    with v.uc_lock:
        data = v._engine.read_linear(la, n)
    return data if data is not None else _read_linear_backing(v, la, n)


def _read_linear_backing(v: Vcpu, la: int, n: int) -> bytes | None:
    """Guest memory at a linear address through our own page walk over the backing."""
    vm = v._vm
    with vm._lock:
        s = v._read_sregs()

        def read(a: int, w: int) -> bytes | None:
            return read_guest_phys(vm, a, w)

        pa, _ = page_walk(read, s.cr0, s.cr3, s.cr4, s.efer, la)
        return None if pa is None else read_guest_phys(vm, pa, n)


def step_mmio(v: Vcpu, pending: PendingMmio, read_data: bytes | None) -> None:
    """Re-execute the faulting instruction once against a one-page MMIO shim that answers a
    read with ``read_data`` (kvm_run.mmio.data; zeros if userspace left none)."""
    addr, size = pending.addr, pending.size
    data = read_data or bytes(size)
    page = addr & ~(PAGE - 1)
    with v._vm._lock:
        v._lock_uc()
        try:
            uc = v._engine.uc
            v._regions.unmap(uc, v._regions.overlapping(page, page + PAGE))

            def rd(uc_, off, sz, _):
                rel = page + off - addr  # Unicorn may split the access
                d = data[rel:rel + sz] if 0 <= rel < len(data) else b""
                return int.from_bytes(d.ljust(sz, b"\0"), "little")

            uc.mmio_map(page, PAGE, rd, None, lambda *a: None, None)
            try:
                v._step_instruction()
            finally:
                uc.mem_unmap(page, PAGE)
        finally:
            v.uc_lock.release()


def handle_fault(v: Vcpu, ev: MemoryEvent) -> Exit | None:
    """An access the engine could not complete: map what backs it, or an exit (MMIO, memory fault)."""
    access, addr, size, value = ev.access, ev.addr, ev.size, ev.value
    c = _unicorn().unicorn_const
    tdx = v._tdx()
    fault_private = None
    if tdx:
        fault_private = not addr & fault.TDX_SHARED_BIT
    gpa = addr % fault.PHYS_LIMIT if tdx else addr
    gfn = gpa // PAGE
    is_write = access in (c.UC_MEM_WRITE_UNMAPPED, c.UC_MEM_WRITE_PROT)
    with v._vm._lock:
        if ev.__class__ is WriteProtEvent:  # a write to a READONLY slot is emulated as MMIO
            b, ex = fault.lookup(v._vm, gfn, fault_private)
            if ex is None and b is not None and b.gmem is None and v._vm._log_dirty(b.slot, gfn):
                map_backing(v, gfn, b, 0)  # a write-protected page of a dirty-logged slot: now dirty
                return None
            b, ex = None, None
        else:
            b, ex = fault.lookup(v._vm, gfn, fault_private)
        if ex is not None:
            return ex
        if b is not None:
            map_backing(v, gfn, b, addr & fault.TDX_SHARED_BIT if tdx else 0)
            return None
    if access == c.UC_MEM_FETCH_UNMAPPED:
        return InternalErrorExit(suberror=1, data=(gpa,))  # KVM_INTERNAL_ERROR_EMULATION
    v._pending_completion = PendingMmio(addr, size, is_write)
    data = (value & (2 ** (8 * size) - 1)).to_bytes(size, "little") if is_write else b""
    return MmioExit(phys_addr=gpa, data=data, len=size, is_write=is_write)


def map_backing(v: Vcpu, gfn: int, b: fault.Backing, alias: int) -> None:
    """Map the block holding gfn (caller holds Vm._lock); see ``regions`` for the two kinds."""
    start, n, level = fault.choose_block(v._vm, gfn, b)
    prot = _unicorn().unicorn_const.UC_PROT_ALL
    if b.gmem is None and b.slot.flags & MemFlag.READONLY:
        prot &= ~_unicorn().unicorn_const.UC_PROT_WRITE
    if b.gmem is None and v._vm._dirty_logged(b.slot):
        # Dirty logging (vm_state): 4 KiB pages, write-protected until the write that logs them.
        start, n, level = gfn, 1, 0
        if not v._vm._is_dirty(b.slot, gfn):
            prot &= ~_unicorn().unicorn_const.UC_PROT_WRITE
    window = not v._tdx() and v._regions.can_window(b)
    if not window and level == 2 and v._vm._private_mem:
        # A direct region cannot switch backing, so a conversion unmaps it, and Unicorn
        # unmaps at ~13 us per MiB: keep direct regions of convertible VMs at 2 MiB.
        start, n, level = (gfn & ~511, 512, 1) if fault.block_ok(v._vm, b, 1, gfn & ~511) else (gfn, 1, 0)
    v._lock_uc()
    try:
        v._regions.map(v._engine.uc, (start * PAGE) | alias, n * PAGE, level, b, start, prot, window)
    finally:
        v.uc_lock.release()


def map_physical(v: Vcpu, pa: int) -> bool:
    """Map the block holding guest-physical ``pa`` in the engine unless it is mapped (caller
    holds Vm._lock, not uc_lock). False if ``pa`` is not backed memory."""
    if v._regions.containing(pa) is not None:
        return True
    try:
        b, ex = fault.lookup(v._vm, pa // PAGE, None)
    except OSError:
        return False
    if b is None or ex is not None:
        return False
    map_backing(v, pa // PAGE, b, 0)
    return True


def handle_xprot(v: Vcpu, ev: FetchProtEvent) -> Exit | None:
    """A fetch from a window region not yet marked as code (``regions`` module doc)."""
    addr = ev.addr
    with v._vm._lock:
        v._lock_uc()
        try:
            base = v._regions.containing(addr)
            r = v._regions.regions.get(base) if base is not None else None
            if r is not None and r.window and not r.code:
                v._regions.mark_code(v._engine.uc, base)
                return None
        finally:
            v.uc_lock.release()
    return InternalErrorExit(suberror=1, data=(addr,))  # fetch from a non-executable mapping


def handle_exception(v: Vcpu, ev: ExceptionEvent) -> Exit | None:
    """An exception Unicorn raised: a #PF from a walk through page tables the model has not
    mapped yet is resolved (map them, retry); anything else goes to the guest's IDT
    (``interrupts``), as on a real CPU. ``ev.cr2`` is CR2 as the engine had it when it raised
    (the faulting address of a #PF). Unicorn leaves CR2 = -2 after the stop
    (``ExceptionEvent``), so CR2 is always written back: the value the exception gave it, or
    the one before a #PF the guest never sees.
    """
    vector, info, cr2 = ev.vector, ev.info, ev.cr2
    vm = v._vm
    if vector == 14:
        with vm._lock:
            s = v._read_sregs()
            pa, tables = page_walk(lambda a, w: read_guest_phys(vm, a, w), s.cr0, s.cr3, s.cr4, s.efer, cr2)
            missing = [t for t in tables if not v._regions.overlapping(t, t + 1)]
            for t in missing:
                b, ex = fault.lookup(vm, t // PAGE, None)
                if ex is not None:
                    return ex
                if b is None:
                    return ShutdownExit()
                map_backing(v, t // PAGE, b, 0)
            if missing:  # the guest never saw this #PF: give CR2 back its value
                v._restore_cr2()
                return None
    if info is None:  # Unicorn's context layout unknown: no error code to push
        return ShutdownExit()
    error_code, software, next_rip = info
    return interrupts.deliver(v, vector, error_code, next_rip if software else None, software, cr2)


def handle_ud(v: Vcpu, quiet: bool = False) -> Exit | None:
    """#UD: VMCALL/VMMCALL is a hypercall (kvm_emulate_hypercall); anything else goes to the
    guest's #UD handler. ``quiet``: emulation stopped with no event and no error, which is HLT
    or (once Unicorn has delivered an exception to a hook) a #UD it no longer reports; there a
    non-hypercall is HLT if the byte before RIP is F4, else a triple fault (ShutdownExit).
    """
    # Called right after a stop, so no register write is queued: read what the hypercall and
    # the instruction check need in one call, and leave the register cache stale.
    with v.uc_lock:
        eng = v._engine
        rax, rbx, rcx, rdx, rip, cs, cr0, cr3, cr4 = eng.read_hypercall_state()
        if quiet and v._mode == "64":
            v._next_pc = rip  # the vCPU left it to us (see Vcpu._run_once)
        pc = v._next_pc
        code = eng.read_linear(pc, 3, (cr0, cr3, cr4))
    if (code or _read_linear_backing(v, pc, 3)) not in HYPERCALL_INSNS:  # Unicorn's view was tried
        if not quiet:
            return interrupts.deliver(v, 6)  # #UD through the guest's IDT
        return HltExit() if pc and read_linear(v, pc - 1, 1) == b"\xf4" else ShutdownExit()
    long_mode = v._mode == "64"
    m = 2**64 - 1 if long_mode else 0xFFFF_FFFF
    nr, gpa, npages, attrs = rax & m, rbx & m, rcx & m, rdx & m
    cpl = cs & 3 if cr0 & 1 else 0
    if cpl != 0:
        ret = -_HC_EPERM
    elif nr != _MAP_GPA_RANGE or not v._vm._exit_hypercall_mask & (1 << _MAP_GPA_RANGE):
        ret = -_HC_ENOSYS
    elif gpa % PAGE or npages == 0 or (gpa >> 12) + npages > (2**64 - 1) >> 12:
        ret = -_HC_EINVAL
    else:
        if v._vm._profile.hypercall_ret_cleared:
            v._hypercall_ret = 0  # else kvm_run.hypercall.ret keeps what userspace last wrote
        v._pending_completion = PendingHypercall(long_mode, rip)
        return HypercallExit(nr=nr, args=(gpa, npages, attrs, 0, 0, 0), ret=v._hypercall_ret,
                             flags=_LONG_MODE if long_mode else 0)
    v._queue(rax=ret & m, rip=rip + 3)
    return None


def pre_fault(v: Vcpu, gpa: int, size: int) -> tuple[int, int]:
    """The steps of KVM_PRE_FAULT_MEMORY after its checks (caller holds the ioctl lock)."""
    done = False
    while size:
        gfn = gpa // PAGE
        with v._vm._lock:
            try:
                b, ex = fault.lookup(v._vm, gfn, None)
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
                fault.allocate_gmem_page(b)
            start, n, _ = fault.choose_block(v._vm, gfn, b)
            if b.private:
                start, n = gfn, 1  # private memory advances 4 KiB per step (spec 5.4)
            map_backing(v, gfn, b, 0)
        step = min((start + n) * PAGE - gpa, size)
        gpa, size, done = gpa + step, size - step, True
    return gpa, size
