"""The Unicorn engine under a model vCPU: lazy import, and ``Engine``, one engine as a vCPU drives it.

Data model. A ``vcpu.Vcpu`` owns one ``Engine`` at a time (rebuilt when the CPU mode changes).
The engine holds what is about Unicorn rather than about KVM: the ``Uc`` instance and the
register ids of its mode, register and memory access, loading a ``Regs``/``Sregs`` pair and
reading ``Sregs`` back, the state its API does not reach (``hidden``, ``hidden_state``) and
the last code translation through the guest's page tables (``physical``; the vCPU drops it
when an invalidation touches one of its pages). Nothing here takes a lock: every method
expects the caller to hold the vCPU's ``uc_lock`` (or to run inside a hook).

Why ctypes on the binding's handle. Unicorn's Python binding spends ~2 us per ``reg_read``
and ~80 us per 18-register ``reg_read_batch`` in its own Python layers (register-class
selection, tuple conversion); an exit needs a handful of registers, so that overhead was most
of an exit's cost. ``Engine.read``/``write``/``mem_read``/``emu_start`` call
``uc_reg_read_batch``/``uc_reg_write_batch``/``uc_mem_read``/``uc_emu_start`` of the binding's
loaded library (``unicorn.unicorn_py3.unicorn.uclib``, whose prototypes the binding already
set) on the engine handle ``Uc._uch`` with preallocated buffers: ~0.6 us for one register,
~1.5 us for all 18 general registers. Unicorn writes only the register's own width into the
buffer (2 bytes for a selector), so buffers are zeroed before each read. Registers wider than
64 bits (GDTR/IDTR) still go through the binding.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import NamedTuple

from ..types import DTable, Regs, Sregs
from ..uapi import PAGE_SIZE as _PAGE
from .paging import page_walk

_uc = None
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")
MASK = {"16": 0xFFFF_FFFF, "32": 0xFFFF_FFFF, "64": 2**64 - 1}
EFER, FS_BASE, GS_BASE = 0xC0000080, 0xC0000100, 0xC0000101
_IO_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65))
_SEGS = ("cs", "ds", "es", "ss", "fs", "gs")
_END = 0xFFFF_FFFF_FFFF_FFFF


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


class IoInsn(NamedTuple):
    """An IN/OUT/INS/OUTS instruction as ``io_sites`` needs it."""

    length: int
    string: bool  # INS/OUTS
    rep: bool  # with a REP prefix


def decode_io(code: bytes) -> IoInsn | None:
    """The IN/OUT/INS/OUTS at the start of ``code``, or None."""
    n, rep = 0, False
    while n < len(code) and (code[n] in _IO_PREFIXES or 0x40 <= code[n] <= 0x4F):
        rep |= code[n] in (0xF2, 0xF3)
        n += 1
    if n >= len(code):
        return None
    op = code[n]
    if 0xE4 <= op <= 0xE7:
        return IoInsn(n + 2, False, False)
    if 0xEC <= op <= 0xEF:
        return IoInsn(n + 1, False, False)
    if 0x6C <= op <= 0x6F:
        return IoInsn(n + 1, True, rep)
    return None


@dataclass(slots=True)
class Translation:
    """The engine's last code translation (``Engine.physical``): ``linear_page`` maps to
    ``physical_page`` under ``cr3``; ``tables`` are the page-table pages the walk read, so an
    invalidation of any of them drops it."""

    cr3: int
    linear_page: int
    physical_page: int
    tables: tuple[int, ...]


def _prime_edge_hook(uc) -> None:
    """Run one scratch translation block on a new engine, before any hook exists.

    QEMU calls UC_HOOK_EDGE_GENERATED only once a translation block has completed on the
    engine (Unicorn 2.1.4 ``tb_find``: ``uc->last_tb``), so without this the first block the
    guest runs would not be recorded (``code_cache``). The block is ``jmp $+2``, then the stop;
    the page is unmapped and the translation flushed afterwards.
    """
    uc.mem_map(0, _PAGE)
    try:
        uc.mem_write(0, b"\xeb\x00\x90")
        uc.emu_start(0, 3)
    finally:
        uc.mem_unmap(0, _PAGE)
    uc.ctl_flush_tb()


class Engine:
    """One Unicorn instance in one CPU mode, as a model vCPU drives it (see the module doc).

    Attributes: ``uc`` (the binding's ``Uc``, for memory regions and hooks), ``mode`` ("16",
    "32" or "64"), ``hidden`` (``hidden_state.HiddenState``), the register ids of the mode
    (``gpr_ids``, ``rip_id``, ``flags_id``, ``regs_ids`` in ``Regs`` order) and
    ``translation``, the last code translation of ``physical``. Every method expects the
    vCPU's ``uc_lock`` held (or to run inside a hook).
    """

    def __init__(self, mode: str) -> None:
        from unicorn.unicorn_py3 import unicorn as binding

        from .hidden_state import HiddenState  # it imports this module

        u = unicorn()
        c, x = u.unicorn_const, u.x86_const
        uc = u.Uc(c.UC_ARCH_X86, {"16": c.UC_MODE_16, "32": c.UC_MODE_32, "64": c.UC_MODE_64}[mode])
        _prime_edge_hook(uc)
        # No exit addresses: emu_start's ``until`` is ignored. With one, Unicorn 2.1.4 drops the
        # translation at until-1 after every run, and translating that address through the
        # guest's page tables raises a #PF inside the engine that leaves CR2 = -2 (measured).
        uc.ctl_exits_enabled(True)
        self.uc = uc
        self.mode = mode
        self.hidden = HiddenState(uc)
        self.translation: Translation | None = None
        # libunicorn's functions, looked up once: read/write/emu_start run about three times per
        # exit, and each lookup through the library object costs ~80 ns more than this attribute
        # (timeit), ~2.5% of a model exit in the OUT loop of ``guestmem bench exits`` (~9 us).
        lib = binding.uclib
        self._h = uc._uch
        self._read_batch, self._write_batch, self._mem_read = lib.uc_reg_read_batch, lib.uc_reg_write_batch, lib.uc_mem_read
        self._emu_start = lib.uc_emu_start
        self._error = u.UcError
        self._batches: dict[tuple[int, ...], tuple] = {}
        self._mem = ctypes.create_string_buffer(4096)
        self.gpr_ids = tuple(reg_id(mode, n) for n in REGS[:16 if mode == "64" else 8])
        self.rip_id = reg_id(mode, "rip")
        self.flags_id = reg_id(mode, "rflags")
        self.regs_ids = self.gpr_ids + (self.rip_id, self.flags_id)
        self._ids = {n: reg_id(mode, n) for n in REGS + ("rip", "rflags")}
        # RIP, plus CS in real mode (linear = CS << 4 + IP)
        self._pc_ids = (self.rip_id, x.UC_X86_REG_CS) if mode == "16" else (self.rip_id,)
        self._control_ids = (x.UC_X86_REG_CR0, x.UC_X86_REG_CR3, x.UC_X86_REG_CR4)
        self._hypercall_ids = (*self.gpr_ids[:4], self.rip_id, x.UC_X86_REG_CS, *self._control_ids)
        self._cr2_ids = (x.UC_X86_REG_CR2,)
        self._cs_ids = (x.UC_X86_REG_CS,)

    # --- running ---------------------------------------------------------------------------

    def emu_start(self, begin: int) -> int:
        """Run from linear ``begin`` until a hook stops the engine; Unicorn's error code (0: none).

        A stop with an error (e.g. #UD) is an ordinary exit here, and raising and catching
        UcError costs microseconds. An exception raised inside a Python hook is re-raised, as
        the binding does.
        """
        uc = self.uc
        uc._hook_exception = None
        status = self._emu_start(self._h, begin, _END, 0, 0)
        if uc._hook_exception is not None:
            raise uc._hook_exception
        return status

    def stop(self) -> None:
        """Ask a running ``emu_start`` to return (from a hook, or another thread: ``Vcpu.kick``)."""
        self.uc.emu_stop()

    def flush_tb(self) -> None:
        """Drop every translation block."""
        self.uc.ctl_flush_tb()

    def step(self, begin: int) -> None:
        """Run one instruction from linear ``begin`` through the binding (UcError on an engine error)."""
        self.uc.emu_start(begin, _END, count=1)

    # --- registers -------------------------------------------------------------------------

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

    def write_named(self, values: dict[str, int]) -> None:
        """Write registers by their ``Regs`` field name (``rax`` .. ``rflags``) in one call."""
        self.write(tuple(map(self._ids.__getitem__, values)), values.values())

    def read_pc(self) -> int:
        """The linear address of the next instruction."""
        v = self.read(self._pc_ids)
        return v[0] + (v[1] << 4) if len(v) == 2 else v[0]

    def cs_base(self) -> int:
        """The code segment base: CS << 4 in real mode, else 0 (the model's segments are flat)."""
        return self.read(self._cs_ids)[0] << 4 if self.mode == "16" else 0

    def read_cr2(self) -> int:
        return self.read(self._cr2_ids)[0]

    def write_cr2(self, value: int) -> None:
        self.write(self._cr2_ids, (value,))

    def read_control(self) -> list[int]:
        """[CR0, CR3, CR4]."""
        return self.read(self._control_ids)

    def read_hypercall_state(self) -> list[int]:
        """[RAX, RBX, RCX, RDX, RIP, CS, CR0, CR3, CR4] in one call: what a hypercall and the
        instruction check before it need (``exits.handle_ud``)."""
        return self.read(self._hypercall_ids)

    def load_segment(self, seg: str, selector: int) -> None:
        """Load segment register ``seg`` ("cs", "ss", ...) with ``selector`` as Unicorn does
        (in protected mode it reads the descriptor); UcError if the engine refuses it."""
        self.uc.reg_write(getattr(unicorn().x86_const, "UC_X86_REG_" + seg.upper()), selector)

    def load(self, regs: Regs, sregs: Sregs) -> None:
        """Write every register and special register into the engine."""
        x = unicorn().x86_const
        uc, mode = self.uc, self.mode
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
        names = REGS[:len(self.gpr_ids)]
        uc.reg_write_batch([(i, getattr(regs, n) & m) for i, n in zip(self.gpr_ids, names)]
                           + [(self.rip_id, regs.rip & m), (self.flags_id, regs.rflags)])
        if mode == "64":
            self.hidden.set_cpl(s.cs.selector & 3)  # loading CS/SS leaves Unicorn at CPL 0
        self.translation = None

    def read_sregs(self, old: Sregs) -> Sregs:
        """``old`` updated with the engine's selectors, control registers, EFER and table registers."""
        x = unicorn().x86_const
        uc = self.uc
        ids = tuple(getattr(x, "UC_X86_REG_" + n.upper()) for n in _SEGS) + (
            x.UC_X86_REG_CR0, x.UC_X86_REG_CR2, x.UC_X86_REG_CR3, x.UC_X86_REG_CR4)
        vals = self.read(ids)
        gdt, idt = uc.reg_read(x.UC_X86_REG_GDTR), uc.reg_read(x.UC_X86_REG_IDTR)
        efer = uc.msr_read(EFER) if self.mode != "16" else old.efer
        new = {n: getattr(old, n).replace(selector=v & 0xFFFF) for n, v in zip(_SEGS, vals)}
        if self.mode == "16":
            new = {n: v.replace(base=v.selector << 4) for n, v in new.items()}
        return old.replace(cr0=vals[6], cr2=vals[7], cr3=vals[8], cr4=vals[9], efer=efer,
                           gdt=DTable(base=gdt[1], limit=gdt[2]), idt=DTable(base=idt[1], limit=idt[2]), **new)

    # --- memory ----------------------------------------------------------------------------

    def mem_read(self, address: int, n: int) -> bytes | None:
        """``n`` (<= 4096) bytes of the engine's physical memory, or None if not all mapped."""
        if self._mem_read(self._h, address, self._mem, n):
            return None
        return self._mem.raw[:n]

    def physical(self, la: int, crs: list[int] | tuple[int, int, int] | None = None) -> int | None:
        """The engine-physical address of linear ``la``, walking the page tables in the engine's
        mapped memory; the last translation is kept in ``translation``.

        ``crs`` is [CR0, CR3, CR4] if the caller just read them. None if a page on the way is
        not mapped or not present.
        """
        cr0, cr3, cr4 = crs or self.read(self._control_ids)
        page, off = la & ~(_PAGE - 1), la % _PAGE
        t = self.translation
        if t is not None and t.cr3 == cr3 and t.linear_page == page:
            return t.physical_page + off
        efer = (1 << 10) if self.mode == "64" else 0
        pa, tables = page_walk(self.mem_read, cr0, cr3, cr4, efer, page)
        if pa is None:
            return None
        pa &= ~(_PAGE - 1)
        self.translation = Translation(cr3, page, pa, tuple(tables))
        return pa + off

    def read_linear(self, la: int, n: int, crs: list[int] | tuple[int, int, int] | None = None) -> bytes | None:
        """Read ``n`` bytes (not crossing a page) at linear ``la`` through the engine's mapped
        memory. ``crs`` as for ``physical``. None if a page on the way is not mapped."""
        pa = self.physical(la, crs)
        return None if pa is None else self.mem_read(pa, min(n, _PAGE - la % _PAGE))

    def forget_translation(self, lo: int, hi: int) -> None:
        """Drop the last code translation if it read or led to a page in [lo, hi) (an invalidation)."""
        t = self.translation
        if t is not None and any(lo <= p < hi for p in (t.physical_page, *t.tables)):
            self.translation = None
