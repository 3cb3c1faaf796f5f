"""Guest builder: turn a few lines of assembly into a runnable x86 guest image.

This module uses only the public backend interface (``Vcpu.set_regs``/``set_sregs`` and a
writer with ``write(offset, data)`` such as ``hostmem.Mapping``), so one image runs on the
kvm backend and on the model. Keystone is imported on first use.

Building blocks:

- ``assemble(source, address, bits)``: keystone, errors as ValueError.
- ``long_mode_guest(code, ...)``: a 64-bit guest at CPL0 or CPL3 with a GDT (ring 0 and ring 3
  code/data, a 64-bit TSS), an IDT whose exception handlers report to ``PORT_FAIL``, 4-level
  identity page tables (2 MiB leaves, 4 KiB leaves only where a range needs them; never
  1 GiB leaves, which this host's CPUID does not offer), and a stack.
- ``real_mode_guest(code, load_address)``: a 16-bit guest at reset-like state.
- ``load(image, memory)`` writes the image into guest memory; ``setup_vcpu(vcpu, image)``
  loads its registers.

Host <-> guest convention (for tests and workloads; the backends know nothing about it):

- ``out PORT_DONE, eax``: the guest finished; EAX (the 4 data bytes) is its result.
- ``out PORT_SYNC, eax`` / ``in eax, PORT_SYNC``: a rendezvous; the host answers an IN with
  ``vcpu.complete_io(data)``.
- ``rep outsb`` to ``PORT_CONSOLE`` (0xE9, the debugcon port): text for the log.
- ``PORT_FAIL``: the guest reports a failure; EAX is the reason. The builder's exception
  handlers use it with EAX = vector, and RDI = vector, RSI = error code, RDX = faulting RIP,
  RCX = CR2.
- Arguments beyond EAX travel in RDI, RSI, RDX, RCX, R8, R9 (System V order); the host reads
  them with ``vcpu.get_regs()`` on the IoExit.
- Code that falls off its end reaches an epilogue that loops on ``out PORT_DONE, eax``.

CPL3 guests run with RFLAGS.IOPL = 3 and a TSS I/O bitmap allowing every port, so IN/OUT
work (kvm_pvm ignores IOPL at CPL3 and honours only the bitmap). HLT and VMCALL raise #GP at
CPL3, so a CPL3 guest ends with an OUT (the epilogue does that). On this host CPL3 code runs natively and
CPL0 code is emulated (~1 µs per instruction): put loops over much memory at CPL3.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Iterable, Protocol

from .types import DTable, Regs, Segment, Sregs

PORT_CONSOLE = 0xE9
PORT_DONE = 0xF4
PORT_SYNC = 0xF5
PORT_FAIL = 0xF6

PAGE_4K = 0x1000
PAGE_2M = 0x200000

# GDT selectors. User data sits below user code, the order SYSRET expects.
SEL_KERNEL_CODE = 0x08
SEL_KERNEL_DATA = 0x10
SEL_USER_DATA = 0x18 | 3
SEL_USER_CODE = 0x20 | 3
SEL_TSS = 0x28

_CR0_PE, _CR0_MP, _CR0_ET, _CR0_NE, _CR0_WP, _CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
_CR4_PAE, _CR4_OSFXSR, _CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10
_RFLAGS_FIXED, _RFLAGS_IOPL3 = 0x2, 0x3000
_PTE_P, _PTE_RW, _PTE_US, _PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
_EXCEPTIONS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_STACK_SIZE = 0x4000  # per stack; CPL3 guests get a user stack and, below it, a kernel one
_MAXPHYADDR_LIMIT = 1 << 52


class Writer(Protocol):
    def write(self, offset: int, data: bytes) -> Any: ...
    def __len__(self) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class GuestImage:
    """A guest ready to load: bytes to write at GPAs, and the vCPU state to start from.

    ``chunks`` are (gpa, bytes) pairs; everything else in guest memory is expected to be
    zero. Layout fields are None where the mode has no such structure (real mode).
    """

    chunks: tuple[tuple[int, bytes], ...]
    regs: Regs
    sregs: Sregs
    entry: int
    cpl: int
    memory_base: int
    memory_size: int
    code_gpa: int
    stack_top: int
    identity_map: tuple[tuple[int, int], ...] = ()
    gdt_gpa: int | None = None
    tss_gpa: int | None = None
    idt_gpa: int | None = None
    page_table_gpa: int | None = None
    page_table_size: int = 0


# --- assembling ---------------------------------------------------------------------------------

_ks_cache: dict[int, Any] = {}


def _keystone(bits: int) -> Any:
    if bits not in (16, 32, 64):
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    if bits not in _ks_cache:
        try:
            import keystone
        except ImportError as exc:
            raise ImportError("guestmem.guest needs the keystone assembler: pip install keystone-engine") from exc
        mode = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}[bits]
        _ks_cache[bits] = (keystone, keystone.Ks(keystone.KS_ARCH_X86, mode))
    return _ks_cache[bits]


def assemble(source: str, address: int, bits: int = 64) -> bytes:
    """Assemble Intel-syntax ``source`` as if loaded at ``address``.

    Statements are separated by newlines or ';'. Keystone does not support numeric local
    labels (``1:``/``1b``); use names.

    :raises ValueError: the assembler's message, or an invalid ``bits``.
    :raises ImportError: keystone-engine is not installed.
    """
    keystone, ks = _keystone(bits)
    try:
        encoding, count = ks.asm(source, address)
    except keystone.KsError as exc:
        raise ValueError(f"cannot assemble ({exc}) at statement {exc.get_asm_count() + 1}:\n{source}") from None
    if not count and source.strip():
        # Keystone gives up without an error on some statements (NASM's "byte [m]") and then
        # returns nothing for the whole source (measured with keystone-engine 0.9.2).
        raise ValueError(f"keystone assembled nothing (no error given); memory operands need a "
                         f"size like 'byte ptr [..]', not NASM's 'byte [..]':\n{source}")
    return bytes(encoding or b"")


# --- page tables --------------------------------------------------------------------------------


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Page-aligned, sorted, disjoint [start, end) ranges covering ``ranges`` ((gpa, size) pairs)."""
    spans = []
    for gpa, size in ranges:
        if gpa < 0 or size <= 0:
            raise ValueError(f"identity_map range ({gpa:#x}, {size:#x}) must have gpa >= 0 and size > 0")
        start, end = gpa & ~(PAGE_4K - 1), (gpa + size + PAGE_4K - 1) & ~(PAGE_4K - 1)
        if end > _MAXPHYADDR_LIMIT:
            raise ValueError(f"identity_map range ({gpa:#x}, {size:#x}) ends above 2**52")
        spans.append((start, end))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _page_tables(ranges: list[tuple[int, int]], page_size: int, table_gpa: int) -> bytes:
    """4-level identity tables for ``ranges`` placed at ``table_gpa``; the PML4 comes first.

    A 2 MiB block fully inside a range gets a 2 MiB leaf (when ``page_size`` allows), other
    pages get 4 KiB leaves. Every level has U/S set so CPL3 code can use every mapped page.
    """
    flags = _PTE_P | _PTE_RW | _PTE_US
    tables: dict[tuple[int, ...], dict[int, int]] = {(): {}}  # table key -> {index: entry}
    order: list[tuple[int, ...]] = [()]

    def table(key: tuple[int, ...]) -> dict[int, int]:
        if key not in tables:
            tables[key] = {}
            order.append(key)
        return tables[key]

    leaves: list[tuple[int, bool]] = []  # (gpa, is_2m)
    for start, end in ranges:
        addr = start
        while addr < end:
            if page_size == PAGE_2M and addr % PAGE_2M == 0 and addr + PAGE_2M <= end:
                leaves.append((addr, True))
                addr += PAGE_2M
            else:
                leaves.append((addr, False))
                addr += PAGE_4K
    for addr, huge in leaves:
        i4, i3, i2, i1 = (addr >> 39) & 511, (addr >> 30) & 511, (addr >> 21) & 511, (addr >> 12) & 511
        table(())
        table((i4,))
        pd = table((i4, i3))
        if huge:
            pd[i2] = addr | flags | _PTE_PS
        else:
            table((i4, i3, i2))[i1] = addr | flags
    index = {key: n for n, key in enumerate(order)}
    blob = bytearray(len(order) * PAGE_4K)
    for key, entries in tables.items():
        base = index[key] * PAGE_4K
        for i, entry in entries.items():
            struct.pack_into("<Q", blob, base + 8 * i, entry)
        # Link each table into its parent.
        if key:
            parent_base = index[key[:-1]] * PAGE_4K
            struct.pack_into("<Q", blob, parent_base + 8 * key[-1], (table_gpa + base) | flags)
    return bytes(blob)


# --- descriptor tables ----------------------------------------------------------------------------


def _segment_descriptor(access: int, flags: int) -> bytes:
    """A flat (base 0, limit 4 GiB) code/data descriptor; ``flags`` is the G/DB/L nibble."""
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, (flags << 4) | 0xF, 0)


def _tss_descriptor(base: int, limit: int) -> bytes:
    return struct.pack("<HHBBBBII", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, 0x8B,
                       (limit >> 16) & 0xF, (base >> 24) & 0xFF, base >> 32, 0)


def _interrupt_gate(handler: int) -> bytes:
    return struct.pack("<HHBBHII", handler & 0xFFFF, SEL_KERNEL_CODE, 0, 0x8E, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


# The system area at memory_base: GDT at 0, IDT at 0x100, exception stubs at 0x400 (32 of 16
# bytes, then the common handler), and from 0x1000 a 64-bit TSS followed by an all-zero I/O
# permission bitmap covering every port. The bitmap, not just RFLAGS.IOPL=3, is what lets CPL3
# code use IN/OUT on kvm_pvm: that host drops IOPL from a CPL3 guest's RFLAGS (measured).
_STUBS_OFFSET = 0x400
_TSS_OFFSET = 0x1000
_TSS_LIMIT = 0x68 + 0x2000  # 104-byte TSS + 65536-bit bitmap; the limit covers the 0xFF byte after it
_SYSTEM_SIZE = 0x4000
_STUB_STRIDE = 16


def _exception_handlers(base: int) -> bytes:
    """Exception entry stubs at ``base`` (vector v at base + 16*v) and their common tail.

    Each stub pushes a zero error code when the CPU pushes none, then its vector, and jumps
    to the tail, which reports to PORT_FAIL in a loop (convention in the module docstring).
    """
    common = base + 32 * _STUB_STRIDE
    blob = bytearray()
    for vector in range(32):
        push_error = "" if vector in _EXCEPTIONS_WITH_ERROR_CODE else "push 0; "
        stub = assemble(f"{push_error}push {vector}; jmp {common:#x}", base + len(blob))
        assert len(stub) <= _STUB_STRIDE
        blob += stub.ljust(_STUB_STRIDE, b"\xcc")
    blob += assemble(
        "mov rdi, [rsp]; mov rsi, [rsp + 8]; mov rdx, [rsp + 16]; mov rcx, cr2; mov eax, edi\n"
        f"__gm_exc_report: out {PORT_FAIL}, eax; jmp __gm_exc_report", common)
    return bytes(blob)


def _system_area(memory_base: int, tss_gpa: int, kernel_stack_top: int) -> tuple[bytes, int]:
    """The system area at ``memory_base`` (GDT, IDT, exception stubs, TSS and its I/O bitmap,
    laid out as above) and the GDT's limit."""
    system = bytearray(_SYSTEM_SIZE)
    gdt = b"".join([
        bytes(8),
        _segment_descriptor(0x9A, 0b1010),  # ring 0 code, L
        _segment_descriptor(0x92, 0b1100),  # ring 0 data
        _segment_descriptor(0xF2, 0b1100),  # ring 3 data
        _segment_descriptor(0xFA, 0b1010),  # ring 3 code, L
        _tss_descriptor(tss_gpa, _TSS_LIMIT),
    ])
    system[0:len(gdt)] = gdt
    struct.pack_into("<Q", system, _TSS_OFFSET + 4, kernel_stack_top)  # TSS.rsp0
    struct.pack_into("<H", system, _TSS_OFFSET + 102, 0x68)           # TSS.iomap_base
    system[_TSS_OFFSET + _TSS_LIMIT] = 0xFF  # the byte after the all-zero (all-allowed) I/O bitmap
    handlers = _exception_handlers(memory_base + _STUBS_OFFSET)
    system[_STUBS_OFFSET:_STUBS_OFFSET + len(handlers)] = handlers
    for vector in range(32):
        gate = _interrupt_gate(memory_base + _STUBS_OFFSET + _STUB_STRIDE * vector)
        system[0x100 + 16 * vector:0x110 + 16 * vector] = gate
    return bytes(system), len(gdt) - 1


def _long_mode_sregs(cpl: int, tss_gpa: int, gdt: DTable, idt_gpa: int, table_gpa: int) -> Sregs:
    """Paging, long mode and flat segments of ring ``cpl``, with the system area's tables."""
    flat = dict(base=0, limit=0xFFFFFFFF, present=1, s=1, g=1)
    kcode = Segment(selector=SEL_KERNEL_CODE, type=11, dpl=0, l=1, db=0, **flat)
    kdata = Segment(selector=SEL_KERNEL_DATA, type=3, dpl=0, db=1, **flat)
    ucode = Segment(selector=SEL_USER_CODE, type=11, dpl=3, l=1, db=0, **flat)
    udata = Segment(selector=SEL_USER_DATA, type=3, dpl=3, db=1, **flat)
    cs, ds = (ucode, udata) if cpl == 3 else (kcode, kdata)
    return Sregs(
        cs=cs, ds=ds, es=ds, fs=ds, gs=ds, ss=ds,
        tr=Segment(base=tss_gpa, limit=_TSS_LIMIT, selector=SEL_TSS, type=11, present=1, s=0),
        gdt=gdt,
        idt=DTable(base=idt_gpa, limit=32 * 16 - 1),
        cr0=_CR0_PE | _CR0_MP | _CR0_ET | _CR0_NE | _CR0_WP | _CR0_PG,
        cr3=table_gpa,
        cr4=_CR4_PAE | _CR4_OSFXSR | _CR4_OSXMMEXCPT,
        efer=_EFER_LME | _EFER_LMA,
    )


_EPILOGUE = f"\n__gm_done:\nout {PORT_DONE}, eax\njmp __gm_done\n"


# --- guests ---------------------------------------------------------------------------------------


def long_mode_guest(code: str, *, memory_base: int = 0, memory_size: int = PAGE_2M, cpl: int = 0,
                    identity_map: Iterable[tuple[int, int]] = (), page_size: int = PAGE_2M) -> GuestImage:
    """A 64-bit guest that starts at the first instruction of ``code`` at CPL ``cpl`` (0 or 3).

    The builder lays its own structures out in [memory_base, memory_base + memory_size), which
    must be guest RAM: 16 KiB of GDT/IDT/TSS (with an I/O bitmap), the page tables, then the code, with the
    stack(s) at the top. That range is always identity mapped; ``identity_map`` adds more
    (gpa, size) ranges, anywhere below 2**52 (above 4 GiB included). ``page_size`` is the
    largest leaf: 2 MiB (default) or 4 KiB.

    :raises ValueError: bad cpl/page_size/ranges, code that does not assemble, or a layout
        that does not fit in ``memory_size``.
    """
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, not {cpl}")
    if page_size not in (PAGE_4K, PAGE_2M):
        raise ValueError(f"page_size must be 4 KiB or 2 MiB, not {page_size:#x}")
    if memory_base % PAGE_4K or memory_size % PAGE_4K or memory_size <= 0:
        raise ValueError(f"memory_base {memory_base:#x} and memory_size {memory_size:#x} must be page aligned")
    ranges = _merge_ranges([(memory_base, memory_size), *identity_map])

    gdt_gpa = memory_base
    tss_gpa = memory_base + _TSS_OFFSET
    idt_gpa = memory_base + 0x100
    table_gpa = memory_base + _SYSTEM_SIZE
    tables = _page_tables(ranges, page_size, table_gpa)
    code_gpa = table_gpa + len(tables)
    stack_top = memory_base + memory_size
    kernel_stack_top = stack_top - (_STACK_SIZE if cpl == 3 else 0)

    text = assemble(f"{code}\n{_EPILOGUE}", code_gpa)
    stacks_bottom = stack_top - (2 if cpl == 3 else 1) * _STACK_SIZE
    if code_gpa + len(text) > stacks_bottom:
        raise ValueError(f"guest layout needs {code_gpa + len(text) - memory_base + stack_top - stacks_bottom:#x} "
                         f"bytes; memory_size is {memory_size:#x}")

    system, gdt_limit = _system_area(memory_base, tss_gpa, kernel_stack_top)
    sregs = _long_mode_sregs(cpl, tss_gpa, DTable(base=gdt_gpa, limit=gdt_limit), idt_gpa, table_gpa)
    rflags = _RFLAGS_FIXED | (_RFLAGS_IOPL3 if cpl == 3 else 0)
    regs = Regs(rip=code_gpa, rsp=stack_top, rflags=rflags)
    return GuestImage(
        chunks=((memory_base, system), (table_gpa, tables), (code_gpa, text)),
        regs=regs, sregs=sregs, entry=code_gpa, cpl=cpl, memory_base=memory_base, memory_size=memory_size,
        code_gpa=code_gpa, stack_top=stack_top, identity_map=tuple((s, e - s) for s, e in ranges),
        gdt_gpa=gdt_gpa, tss_gpa=tss_gpa, idt_gpa=idt_gpa, page_table_gpa=table_gpa,
        page_table_size=len(tables),
    )


def real_mode_guest(code: str, *, load_address: int = 0x1000) -> GuestImage:
    """A 16-bit real-mode guest: ``code`` at ``load_address`` with all segment bases 0.

    The stack grows down from ``load_address``. No IDT is set up: a fault is a shutdown.
    Memory needed: [0, load_address + code length).

    :raises ValueError: code that does not assemble, or that does not fit below 64 KiB.
    """
    text = assemble(f"{code}\n{_EPILOGUE.replace('eax', 'al')}", load_address, 16)
    if not 0 < load_address or load_address + len(text) > 0x10000:
        raise ValueError(f"real-mode code must lie in (0, 64 KiB); it spans "
                         f"[{load_address:#x}, {load_address + len(text):#x})")
    real = Segment(base=0, limit=0xFFFF, selector=0, type=3, present=1, s=1)
    sregs = Sregs(cs=real.replace(type=11), ds=real, es=real, fs=real, gs=real, ss=real)
    regs = Regs(rip=load_address, rsp=load_address, rflags=_RFLAGS_FIXED)
    return GuestImage(chunks=((load_address, text),), regs=regs, sregs=sregs, entry=load_address, cpl=0,
                      memory_base=0, memory_size=load_address + len(text), code_gpa=load_address,
                      stack_top=load_address)


# --- loading ----------------------------------------------------------------------------------------


def load(image: GuestImage, memory: dict[int, Writer] | Iterable[tuple[int, Writer]]) -> None:
    """Write ``image.chunks`` into guest memory.

    ``memory`` maps the GPA at which each writer's offset 0 sits to the writer
    (``{gpa: hostmem.Mapping}``, or an iterable of (gpa, writer) pairs); a writer is anything
    with ``write(offset, data)`` and ``len()``.

    :raises ValueError: a chunk that lies in no single writer.
    """
    regions = list(memory.items() if isinstance(memory, dict) else memory)
    for gpa, data in image.chunks:
        for base, writer in regions:
            if base <= gpa and gpa + len(data) <= base + len(writer):
                writer.write(gpa - base, data)
                break
        else:
            raise ValueError(f"no memory given for guest bytes [{gpa:#x}, {gpa + len(data):#x})")


def setup_vcpu(vcpu: Any, image: GuestImage) -> None:
    """Load ``image``'s special and general registers into ``vcpu``.

    The vCPU's own APIC base is kept (it differs between the boot vCPU and the others).

    :raises OSError: the KVM_SET_SREGS / KVM_SET_REGS errno.
    """
    vcpu.set_sregs(image.sregs.replace(apic_base=vcpu.get_sregs().apic_base))
    vcpu.set_regs(image.regs)
