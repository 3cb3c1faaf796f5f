"""The Unicorn engine under a model vCPU: lazy import, register access, CPU state transfer.

Data model. One ``Uc`` instance per vCPU (owned by ``vcpu.Vcpu``); this module holds what is
about the engine rather than about KVM: the register ids of a CPU mode, reading and writing
registers, loading a ``Regs``/``Sregs`` pair into an engine and reading ``Sregs`` back, and
reading guest memory through the engine's own physical map. Nothing here takes a lock: every
function expects the caller to hold the vCPU's ``uc_lock`` (or to run inside a hook).

Why ctypes on the binding's handle. Unicorn's Python binding spends ~2 us per ``reg_read``
and ~80 us per 18-register ``reg_read_batch`` in its own Python layers (register-class
selection, tuple conversion); an exit needs a handful of registers, so that overhead was most
of an exit's cost. ``RegAccess`` calls ``uc_reg_read_batch``/``uc_reg_write_batch``/
``uc_mem_read`` of the binding's loaded library (``unicorn.unicorn_py3.unicorn.uclib``, whose
prototypes the binding already set) on the engine handle ``Uc._uch`` with preallocated
buffers: ~0.6 us for one register, ~1.5 us for all 18 general registers. Unicorn writes only
the register's own width into the buffer (2 bytes for a selector), so buffers are zeroed
before each read. Registers wider than 64 bits (GDTR/IDTR) still go through the binding.
"""

from __future__ import annotations

import ctypes
import threading

from ..types import DTable, Regs, Sregs

_uc = None
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")
MASK = {"16": 0xFFFF_FFFF, "32": 0xFFFF_FFFF, "64": 2**64 - 1}
EFER, FS_BASE, GS_BASE = 0xC0000080, 0xC0000100, 0xC0000101
_IO_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65))
_SEGS = ("cs", "ds", "es", "ss", "fs", "gs")


def unicorn():
    """Import Unicorn on first use: ``import guestmem`` never needs it."""
    global _uc
    if _uc is None:
        try:
            import unicorn as uc_mod
            import unicorn.x86_const  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("model vCPUs run guest code on Unicorn: pip install unicorn") from exc
        _uc = uc_mod
    return _uc


def mode_of(sregs: Sregs) -> str:
    """The engine mode a vCPU needs for ``sregs``: "64", "32" or "16"."""
    if sregs.efer & (1 << 10) and sregs.cs.l:
        return "64"
    return "32" if sregs.cr0 & 1 else "16"


def reg_id(mode: str, name: str) -> int:
    """Unicorn's id of register ``name`` (kvm_regs spelling) in ``mode``."""
    x = unicorn().x86_const
    if mode != "64" and name in ("rip",) + REGS[:8]:
        name = "e" + name[1:]
    if name == "rflags" and mode != "64":
        name = "eflags"
    return getattr(x, "UC_X86_REG_" + name.upper())


def decode_io(code: bytes) -> tuple[int, bool, bool] | None:
    """(length, is_string, has_rep) of the IN/OUT/INS/OUTS at the start of ``code``, or None."""
    n, rep = 0, False
    while n < len(code) and (code[n] in _IO_PREFIXES or 0x40 <= code[n] <= 0x4F):
        rep |= code[n] in (0xF2, 0xF3)
        n += 1
    if n >= len(code):
        return None
    op = code[n]
    if 0xE4 <= op <= 0xE7:
        return n + 2, False, False
    if 0xEC <= op <= 0xEF:
        return n + 1, False, False
    if 0x6C <= op <= 0x6F:
        return n + 1, True, rep
    return None


class RegAccess:
    """Register and memory reads of one engine through libunicorn directly (see module doc)."""

    def __init__(self, uc) -> None:
        from unicorn.unicorn_py3 import unicorn as binding

        lib = binding.uclib
        self._h = uc._uch
        self._read_batch, self._write_batch, self._mem_read = lib.uc_reg_read_batch, lib.uc_reg_write_batch, lib.uc_mem_read
        self._error = unicorn().UcError
        self._batches: dict[tuple[int, ...], tuple] = {}
        self._mem = ctypes.create_string_buffer(4096)
        self._lib = lib
        self._ctx = ctypes.c_void_p()  # a uc_context for clear_exception_in_flight, made on first use

    def __del__(self) -> None:
        if self._ctx.value:
            self._lib.uc_context_free(self._ctx)

    def clear_exception_in_flight(self) -> bool:
        """Forget the exception the engine believes it is delivering (see the section below).

        Call after every emulation stop that came from a memory or exception event. ~2.3 us
        (one context save and restore). False if this Unicorn build could not be calibrated.
        """
        offset = _old_exception_offset()
        if offset is None:
            return False
        if not self._ctx.value and self._lib.uc_context_alloc(self._h, ctypes.byref(self._ctx)):
            return False
        self._lib.uc_context_save(self._h, self._ctx)
        ctypes.c_int32.from_address(self._ctx.value + offset).value = -1
        self._lib.uc_context_restore(self._h, self._ctx)
        return True

    def _batch(self, ids: tuple[int, ...]):
        b = self._batches.get(ids)
        if b is None:
            n = len(ids)
            vals = (ctypes.c_uint64 * n)()
            ptrs = (ctypes.c_void_p * n)(*(ctypes.addressof(vals) + 8 * i for i in range(n)))
            b = self._batches[ids] = ((ctypes.c_int * n)(*ids), ptrs, vals, n)
        return b

    def read(self, ids: tuple[int, ...]) -> list[int]:
        """The values of registers ``ids`` (each at most 64 bits wide)."""
        idarr, ptrs, vals, n = self._batch(ids)
        ctypes.memset(vals, 0, 8 * n)
        err = self._read_batch(self._h, idarr, ptrs, n)
        if err:
            raise self._error(err)
        return vals[:]

    def write(self, pairs: list[tuple[int, int]]) -> None:
        """Write (register id, value) pairs in one call."""
        idarr, ptrs, vals, n = self._batch(tuple(i for i, _ in pairs))
        for k, (_, v) in enumerate(pairs):
            vals[k] = v
        err = self._write_batch(self._h, idarr, ptrs, n)
        if err:
            raise self._error(err)

    def mem_read(self, address: int, n: int) -> bytes | None:
        """``n`` (<= 4096) bytes of the engine's physical memory, or None if not all mapped."""
        if self._mem_read(self._h, address, self._mem, n):
            return None
        return self._mem.raw[:n]


def load_state(uc, mode: str, regs: Regs, sregs: Sregs, gpr_ids: list[int], rip_id: int, flags_id: int) -> None:
    """Write every register and special register into a freshly synchronised engine."""
    x = unicorn().x86_const
    bits = 64 if mode == "64" else 32
    s = sregs
    if mode != "16":
        uc.msr_write(EFER, s.efer)
        uc.reg_write(x.UC_X86_REG_CR4, s.cr4 & (2**bits - 1))
        uc.reg_write(x.UC_X86_REG_CR3, s.cr3 & (2**bits - 1))
    uc.reg_write(x.UC_X86_REG_CR0, s.cr0 & 0xFFFF_FFFF)
    uc.reg_write(x.UC_X86_REG_GDTR, (0, s.gdt.base, s.gdt.limit, 0))
    uc.reg_write(x.UC_X86_REG_IDTR, (0, s.idt.base, s.idt.limit, 0))
    if mode == "16":
        for seg in _SEGS:
            uc.reg_write(getattr(x, "UC_X86_REG_" + seg.upper()), getattr(s, seg).selector)
    elif mode == "64":
        for seg in ("cs", "ds", "es", "ss"):
            uc.reg_write(getattr(x, "UC_X86_REG_" + seg.upper()), getattr(s, seg).selector)
        uc.msr_write(FS_BASE, s.fs.base)
        uc.msr_write(GS_BASE, s.gs.base)
    # 32-bit protected mode keeps Unicorn's flat segments: loading a selector would read
    # the guest GDT before the fault path has mapped it.
    m = MASK[mode]
    names = REGS[:len(gpr_ids)]
    uc.reg_write_batch([(i, getattr(regs, n) & m) for i, n in zip(gpr_ids, names)]
                       + [(rip_id, regs.rip & m), (flags_id, regs.rflags)])


def read_sregs(uc, ra: RegAccess, mode: str, old: Sregs) -> Sregs:
    """``old`` updated with the engine's selectors, control registers, EFER and table registers."""
    x = unicorn().x86_const
    ids = tuple(getattr(x, "UC_X86_REG_" + n.upper()) for n in _SEGS) + (
        x.UC_X86_REG_CR0, x.UC_X86_REG_CR2, x.UC_X86_REG_CR3, x.UC_X86_REG_CR4)
    vals = ra.read(ids)
    gdt, idt = uc.reg_read(x.UC_X86_REG_GDTR), uc.reg_read(x.UC_X86_REG_IDTR)
    efer = uc.msr_read(EFER) if mode != "16" else old.efer
    new = {n: getattr(old, n).replace(selector=v & 0xFFFF) for n, v in zip(_SEGS, vals)}
    if mode == "16":
        new = {n: v.replace(base=v.selector << 4) for n, v in new.items()}
    return old.replace(cr0=vals[6], cr2=vals[7], cr3=vals[8], cr4=vals[9], efer=efer,
                       gdt=DTable(base=gdt[1], limit=gdt[2]), idt=DTable(base=idt[1], limit=idt[2]), **new)


# --- the exception in flight -----------------------------------------------------------------
#
# QEMU remembers the exception being delivered (CPUX86State.old_exception) so that a #PF raised
# while delivering a #PF becomes a #DF, and a fault during a #DF a triple fault. Delivery to
# the guest IDT resets it; Unicorn's UC_HOOK_INTR path skips delivery and never resets it
# (2.1.4: cpu_handle_exception only clears exception_index). After one hooked #PF, the next
# #PF of the same engine is therefore a silent triple fault: emu_start returns with no hook
# call and no error. A vCPU that resolves a #PF itself (page tables not yet mapped) must clear
# the field before it resumes. Measured on 2.1.4, a stop from a memory hook (unmapped or
# protected access) and unmapping the region that holds the current code leave it set too, so
# the vCPU clears it before an emu_start that follows either. Unicorn offers no call for that,
# but its CPU context is a byte copy of CPUX86State: ``_old_exception_offset`` finds the field
# in that copy once per process (the only int that is -1 before a hooked #PF and not after,
# confirmed by a second #PF that reaches the hook again) and
# ``RegAccess.clear_exception_in_flight`` writes -1 there.

_OLD_EXCEPTION_UNKNOWN = -2
_old_exception_at: int | None = _OLD_EXCEPTION_UNKNOWN
_calibration_lock = threading.Lock()


def _page_fault_engine():
    """A 64-bit engine whose every fetch raises #PF (CR3 points at unmapped memory)."""
    u = unicorn()
    x = u.x86_const
    uc = u.Uc(u.UC_ARCH_X86, u.UC_MODE_64)
    seen: list[int] = []
    uc.hook_add(u.UC_HOOK_INTR, lambda uc_, intno, _: (seen.append(intno), uc_.emu_stop()))
    uc.hook_add(u.UC_HOOK_MEM_UNMAPPED, lambda *a: False)
    uc.reg_write(x.UC_X86_REG_CR3, 0x100000)
    uc.reg_write(x.UC_X86_REG_CR4, 1 << 5)  # PAE
    uc.msr_write(EFER, 1 << 8)  # LME
    uc.reg_write(x.UC_X86_REG_CR0, 0x8000_0011)  # PG | ET | PE

    def fault() -> int:
        before = len(seen)
        try:
            uc.emu_start(0x40_0000, 0x50_0000)
        except u.UcError:
            pass
        return len(seen) - before

    return uc, fault


def _context_bytes(ctx) -> bytes:
    return ctypes.string_at(ctx.context.value, ctx.size)


def _old_exception_offset() -> int | None:
    """Offset of old_exception in a saved context of this Unicorn build, or None if not found."""
    global _old_exception_at
    with _calibration_lock:
        if _old_exception_at == _OLD_EXCEPTION_UNKNOWN:
            _old_exception_at = _calibrate()
    return _old_exception_at


def _calibrate() -> int | None:
    uc, fault = _page_fault_engine()
    before = _context_bytes(uc.context_save())
    if fault() != 1:
        return None
    after = _context_bytes(uc.context_save())
    minus_one = (-1).to_bytes(4, "little", signed=True)
    candidates = [off for off in range(0, min(len(before), len(after)) - 3, 4)
                  if before[off:off + 4] == minus_one and after[off:off + 4] != minus_one]
    if len(candidates) != 1:
        return None
    _clear_at(uc, candidates[0])
    return candidates[0] if fault() == 1 else None  # a second hooked #PF: it was the field


def _clear_at(uc, offset: int) -> None:
    ctx = uc.context_save()
    ctypes.c_int32.from_address(ctx.context.value + offset).value = -1
    uc.context_restore(ctx)
