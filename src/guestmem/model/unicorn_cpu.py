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
        self._emu_start = lib.uc_emu_start

    def emu_start(self, uc, begin: int, until: int) -> int:
        """``uc.emu_start`` returning Unicorn's error code instead of raising it (0: none).

        A stop with an error (e.g. #UD) is an ordinary exit here, and raising and catching
        UcError costs microseconds. An exception raised inside a Python hook is re-raised, as
        the binding does.
        """
        uc._hook_exception = None
        status = self._emu_start(self._h, begin, until, 0, 0)
        if uc._hook_exception is not None:
            raise uc._hook_exception
        return status

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

    def write(self, ids: tuple[int, ...], values) -> None:
        """Write registers ``ids`` (each at most 64 bits wide) from ``values`` in one call."""
        idarr, ptrs, vals, n = self._batch(ids)
        vals[:] = list(values)
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
    uc.reg_write(x.UC_X86_REG_CR2, s.cr2 & (2**bits - 1))
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
    # 32-bit protected mode: selectors are loaded from the guest GDT once the fault path has
    # mapped it (``Vcpu._load_segments``); until then Unicorn's flat segments.
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

