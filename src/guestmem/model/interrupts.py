"""Exception and software-interrupt delivery through the guest's own IDT (SDM vol. 3, 6.12-6.15).

Data model. Unicorn reports an exception to ``UC_HOOK_INTR`` (or stops with "invalid
instruction" for #UD) instead of delivering it; under KVM the CPU delivers it through the
guest's IDT (or KVM injects it), and only a fault while delivering a double fault ends the
run (triple fault: ``KVM_EXIT_SHUTDOWN``). ``deliver`` does the CPU's part for a model vCPU so
one guest binary behaves alike on both backends:

- 64-bit long mode: 16-byte interrupt/trap gates, the target code segment's DPL as the new
  CPL, the stack from the 64-bit TSS (IST slot, else RSPn on a privilege change, else the
  current one) aligned to 16 bytes, SS:RSP, RFLAGS, CS:RIP and the error code pushed, TF/NT/RF
  (and IF for an interrupt gate) cleared, SS null on a privilege change;
- 32-bit protected mode: 8-byte 32-bit interrupt/trap gates, the target code segment's DPL
  as the new CPL, the stack from the 32-bit TSS (SSn:ESPn) on a privilege change, else the
  current one, [SS, ESP,] EFLAGS, CS, EIP and the error code pushed as dwords, TF/NT/RF/VM
  (and IF for an interrupt gate) cleared; task gates and 16-bit gates are not delivered
  (#GP, then the double-fault rules);
- real mode: the IVT at IDTR.base, FLAGS, CS, IP pushed, IF/TF/AC cleared.

A fault while delivering (IDT limit, non-present or wrong gate, bad code segment, unmapped
stack) is combined with the first by the SDM's double-fault table (benign / contributory /
page fault): delivered as it is, as #DF, or -- a fault while delivering #DF -- a triple fault.
CR2: Unicorn leaves garbage in CR2 after it reports an exception; ``deliver`` writes back the
value the exception gave it (the faulting address for a #PF).
All guest memory is reached through the guest's page tables and the memslots' backings with
``Vm._lock`` held; registers through the vCPU's register cache and engine.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..types import ShutdownExit
from ..uapi import PAGE_SIZE as PAGE
from .paging import page_walk
from .guest_phys import read_guest_phys, write_guest_phys
from .unicorn_cpu import unicorn

if TYPE_CHECKING:
    from ..types import Sregs
    from .vcpu import Vcpu
    from .vm import Vm

DE, DF, TS, NP, SS, GP, PF = 0, 8, 10, 11, 12, 13, 14
_WITH_ERROR_CODE = frozenset({DF, TS, NP, SS, GP, PF, 17, 21, 29, 30})
_CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP})
_TRAPS = frozenset({1, 3, 4})  # #DB (as delivered here), #BP, #OF: RF is not set in the saved flags
_TF, _IF, _NT, _RF, _VM, _AC = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17, 1 << 18
_PF_WRITE = 2


class _Fault(Exception):
    """A fault raised while delivering: (vector, error code, CR2 for #PF)."""

    def __init__(self, vector: int, error_code: int = 0, cr2: int | None = None) -> None:
        super().__init__(vector)
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


def _combine(first: int, second: int) -> int | None:
    """The exception to deliver when ``second`` happens while delivering ``first`` (SDM table 6-5).

    None: triple fault.
    """
    if first == DF:
        return None
    if (first in _CONTRIBUTORY and second in _CONTRIBUTORY) or (first == PF and (second in _CONTRIBUTORY or second == PF)):
        return DF
    return second


class GuestMemory:
    """Linear-address reads and writes with the vCPU's current paging state (vm._lock held)."""

    def __init__(self, vm: Vm, sregs: Sregs, long_mode: bool) -> None:
        self.vm, self.s = vm, sregs
        self.efer = sregs.efer | ((1 << 10) if long_mode else 0)

    def physical(self, la: int) -> int | None:
        """The guest-physical address of linear ``la``, or None if not present."""
        s = self.s
        return page_walk(lambda a, w: read_guest_phys(self.vm, a, w), s.cr0, s.cr3, s.cr4, self.efer, la)[0]

    def _pages(self, la: int, n: int):
        """(physical address or None, offset into the access, length) per page of [la, la+n)."""
        s, done = self.s, 0
        while done < n:
            chunk = min(n - done, PAGE - (la + done) % PAGE)
            pa, _ = page_walk(lambda a, w: read_guest_phys(self.vm, a, w),
                                 s.cr0, s.cr3, s.cr4, self.efer, la + done)
            yield pa, done, chunk
            done += chunk

    def read(self, la: int, n: int) -> bytes | None:
        out = b""
        for pa, _, chunk in self._pages(la, n):
            data = read_guest_phys(self.vm, pa, chunk) if pa is not None else None
            if data is None or len(data) < chunk:
                return None
            out += data
        return out

    def write(self, la: int, data: bytes) -> bool:
        return all(pa is not None and write_guest_phys(self.vm, pa, data[at:at + chunk])
                   for pa, at, chunk in self._pages(la, len(data)))


def deliver(v: Vcpu, vector: int, error_code: int | None = None, return_rip: int | None = None,
            software: bool = False, cr2: int | None = None) -> ShutdownExit | None:
    """Deliver ``vector`` to the guest of vCPU ``v``; returns None (resume) or ``ShutdownExit``.

    ``error_code`` is pushed for the vectors that have one; ``return_rip`` is the RIP to return
    to (default: the current one, i.e. the faulting instruction); ``software`` marks INT n /
    INT3 / INTO, whose gate DPL must allow the current CPL; ``cr2`` is CR2 as the exception
    left it (the faulting address of a #PF), written back to the engine; None leaves the
    engine's CR2 (an exception Unicorn did not report through its hook). Caller holds the
    vCPU ioctl lock.
    """
    mode = v._mode
    current = vector
    code = error_code or 0
    for _ in range(3):
        try:
            with v._vm._lock:
                if mode == "64":
                    _deliver_long(v, current, code, return_rip, software)
                elif mode == "32":
                    _deliver_protected(v, current, code, return_rip, software)
                else:
                    _deliver_real(v, current, return_rip, software)
            if cr2 is not None:
                v._set_cr2(cr2)
            return None
        except _Fault as fault:
            nxt = _combine(current, fault.vector)
            if nxt is None:
                if cr2 is not None:
                    v._set_cr2(cr2)
                return ShutdownExit()
            # the new fault returns to the instruction that was being delivered for
            current, code, software, return_rip = nxt, (0 if nxt == DF else fault.error_code), False, None
            if nxt == PF:
                cr2 = fault.cr2
    return ShutdownExit()


def _saved_flags(rflags: int, vector: int, software: bool) -> int:
    """The flags image pushed for ``vector``: a fault saves it with RF set, so that IRET does not
    take an instruction breakpoint again (SDM vol. 3, 6.12.1, measured on this host's KVM)."""
    return rflags if software or vector in _TRAPS else rflags | _RF


def _target_cpl(mem: GuestMemory, gdt_base: int, gdt_limit: int, selector: int, cpl: int,
                long_mode: bool = True) -> int:
    """The CPL the handler runs at: its code segment's DPL (conforming: unchanged), or raise.

    The segment must be 64-bit code in long mode, 32-bit code (D set, L clear) otherwise."""
    index = selector & ~7
    if selector & 4 or not index or index + 7 > gdt_limit:  # LDT, null or beyond the GDT
        raise _Fault(GP, index)
    raw = mem.read(gdt_base + index, 8)
    if raw is None:
        raise _Fault(GP, index)
    desc = struct.unpack("<Q", raw)[0]
    access, flags = (desc >> 40) & 0xFF, (desc >> 52) & 0xF
    if not access & 0x80:
        raise _Fault(NP, index)
    dpl = (access >> 5) & 3
    width_ok = flags & 0x2 if long_mode else flags & 0x6 == 0x4
    if access & 0x18 != 0x18 or not width_ok or dpl > cpl:  # code of the mode's width, DPL <= CPL
        raise _Fault(GP, index)
    return cpl if access & 0x4 else dpl


def _read_gate(mem: GuestMemory, s: Sregs, vector: int, size: int, type_mask: int, cpl: int,
               software: bool) -> tuple[int, int, int]:
    """The IDT gate of ``vector`` (``size`` 16 in long mode, 8 in 32-bit mode) as (low qword,
    high qword or 0, gate type under ``type_mask``), with the checks every delivery makes in
    the SDM's order: #GP(IDT) beyond the limit, unreadable, not an interrupt/trap gate, or a
    software interrupt through a gate of lower DPL; then #NP(IDT) if not present."""
    idt_error = vector * 8 + 2
    if vector * size + size - 1 > s.idt.limit:
        raise _Fault(GP, idt_error)
    raw = mem.read(s.idt.base + vector * size, size)
    if raw is None:
        raise _Fault(GP, idt_error)
    lo, hi = struct.unpack("<QQ", raw) if size == 16 else (struct.unpack("<Q", raw)[0], 0)
    gate_type, gate_dpl, present = (lo >> 40) & type_mask, (lo >> 45) & 3, (lo >> 47) & 1
    if gate_type not in (0xE, 0xF) or (software and gate_dpl < cpl):
        raise _Fault(GP, idt_error)
    if not present:
        raise _Fault(NP, idt_error)
    return lo, hi, gate_type


def _deliver_long(v: Vcpu, vector: int, error_code: int, return_rip: int | None, software: bool) -> None:
    r, s = v._read_regs(), v._read_sregs()
    mem = GuestMemory(v._vm, s, True)
    cpl = s.cs.selector & 3
    lo, hi, gate_type = _read_gate(mem, s, vector, 16, 0xF, cpl, software)
    target = ((lo >> 16) & 0xFFFF)
    handler = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | ((hi & 0xFFFF_FFFF) << 32)
    new_cpl = _target_cpl(mem, s.gdt.base, s.gdt.limit, target, cpl)
    ist = (lo >> 32) & 7
    rsp = r.rsp
    if ist or new_cpl != cpl:
        slot = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl  # IST1..7 / RSP0..2 in the TSS
        raw = mem.read(s.tr.base + slot, 8) if s.tr.limit >= slot + 7 else None
        if raw is None:
            raise _Fault(TS, s.tr.selector & ~3)
        rsp = struct.unpack("<Q", raw)[0]
    rsp &= ~0xF
    frame = [s.ss.selector, r.rsp, _saved_flags(r.rflags, vector, software), s.cs.selector,
             r.rip if return_rip is None else return_rip]
    if vector in _WITH_ERROR_CODE and not software:
        frame.append(error_code)
    rsp -= 8 * len(frame)
    if not mem.write(rsp, struct.pack(f"<{len(frame)}Q", *reversed(frame))):
        raise _Fault(PF, _PF_WRITE, cr2=rsp)
    flags = r.rflags & ~(_TF | _NT | _RF | _VM | (_IF if gate_type == 0xE else 0))
    if new_cpl != cpl:  # a null SS carrying the new CPL
        v._load_selectors([("cs", (target & ~3) | new_cpl), ("ss", new_cpl)], cpl=new_cpl)
    else:
        v._load_selectors([("cs", (target & ~3) | new_cpl)])
    v._queue(rip=handler, rsp=rsp, rflags=flags)


def _deliver_protected(v: Vcpu, vector: int, error_code: int, return_rip: int | None, software: bool) -> None:
    r, s = v._read_regs(), v._read_sregs()
    mem = GuestMemory(v._vm, s, False)
    cpl = s.cs.selector & 3
    gate, _, gate_type = _read_gate(mem, s, vector, 8, 0x1F, cpl, software)  # 32-bit gates, S = 0
    target = (gate >> 16) & 0xFFFF
    handler = (gate & 0xFFFF) | ((gate >> 32) & 0xFFFF_0000)
    new_cpl = _target_cpl(mem, s.gdt.base, s.gdt.limit, target, cpl, long_mode=False)
    eip, esp, ss, ss_base = r.rip & 0xFFFF_FFFF, r.rsp & 0xFFFF_FFFF, s.ss.selector, s.ss.base
    frame = [_saved_flags(r.rflags, vector, software) & 0xFFFF_FFFF, s.cs.selector,
             eip if return_rip is None else return_rip & 0xFFFF_FFFF]
    if new_cpl != cpl:
        slot = 4 + 8 * new_cpl  # ESPn, then SSn, in the 32-bit TSS
        raw = mem.read(s.tr.base + slot, 8) if s.tr.limit >= slot + 7 else None
        if raw is None:
            raise _Fault(TS, s.tr.selector & ~3)
        new_esp, new_ss = struct.unpack("<II", raw)
        frame = [ss, esp] + frame
        esp, ss, ss_base = new_esp, new_ss & 0xFFFF, 0  # flat: the model keeps SS bases at 0
    if vector in _WITH_ERROR_CODE and not software:
        frame.append(error_code & 0xFFFF_FFFF)
    esp = (esp - 4 * len(frame)) & 0xFFFF_FFFF
    if not mem.write(ss_base + esp, struct.pack(f"<{len(frame)}I", *reversed(frame))):
        raise _Fault(PF, _PF_WRITE, cr2=ss_base + esp)
    flags = r.rflags & ~(_TF | _NT | _RF | _VM | (_IF if gate_type == 0xE else 0))
    gdt_page = mem.physical(s.gdt.base + (target & ~7))
    if gdt_page is None or not exits_map(v, gdt_page):
        raise _Fault(GP, target & ~7)
    loads = [("ss", (ss & ~3) | new_cpl)] if new_cpl != cpl else []
    try:
        v._load_selectors(loads + [("cs", (target & ~3) | new_cpl)])
    except unicorn().UcError:
        raise _Fault(GP, target & ~7) from None
    v._queue(rip=handler, rsp=(r.rsp & ~0xFFFF_FFFF) | esp, rflags=flags)


def exits_map(v: Vcpu, pa: int) -> bool:
    """Map guest-physical ``pa`` in the engine (``exits.map_physical``; imported late: exits
    imports this module)."""
    from .exits import map_physical

    return map_physical(v, pa)


def _deliver_real(v: Vcpu, vector: int, return_rip: int | None, software: bool) -> None:
    r, s = v._read_regs(), v._read_sregs()
    mem = GuestMemory(v._vm, s, False)
    if vector * 4 + 3 > s.idt.limit:
        raise _Fault(GP, 0)
    raw = mem.read(s.idt.base + vector * 4, 4)
    if raw is None:
        raise _Fault(GP, 0)
    ip, cs = struct.unpack("<HH", raw)
    sp = (r.rsp - 6) & 0xFFFF
    ret_ip = (r.rip if return_rip is None else return_rip) & 0xFFFF
    if not mem.write((s.ss.selector << 4) + sp, struct.pack("<HHH", ret_ip, s.cs.selector, r.rflags & 0xFFFF)):
        raise _Fault(SS, 0)
    v._load_selectors([("cs", cs)])
    v._read_sregs()  # the new CS base, before RIP is queued as a linear address
    v._queue(rip=ip, rsp=(r.rsp & ~0xFFFF) | sp, rflags=r.rflags & ~(_TF | _IF | _AC))
