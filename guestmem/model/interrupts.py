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
- real mode: the IVT at IDTR.base, FLAGS, CS, IP pushed, IF/TF/AC cleared.

A fault while delivering (IDT limit, non-present or wrong gate, bad code segment, unmapped
stack) is combined with the first by the SDM's double-fault table (benign / contributory /
page fault): delivered as it is, as #DF, or -- a fault while delivering #DF -- a triple fault.
32-bit protected mode is not delivered (the model's guests do not use it): ``ShutdownExit``.
All guest memory is reached through the guest's page tables and the memslots' backings with
``Vm._lock`` held; registers through the vCPU's register cache and engine.
"""

from __future__ import annotations

import struct

from ..types import ShutdownExit
from . import guest_mapping as gm
from .unicorn_cpu import unicorn

DE, DF, TS, NP, SS, GP, PF = 0, 8, 10, 11, 12, 13, 14
_WITH_ERROR_CODE = frozenset({DF, TS, NP, SS, GP, PF, 17, 21, 29, 30})
_CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP})
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


class _GuestMemory:
    """Linear-address reads and writes with the vCPU's current paging state (vm._lock held)."""

    def __init__(self, vm, sregs, long_mode: bool) -> None:
        self.vm, self.s = vm, sregs
        self.efer = sregs.efer | ((1 << 10) if long_mode else 0)

    def _pages(self, la: int, n: int):
        """(physical address or None, offset into the access, length) per page of [la, la+n)."""
        s, done = self.s, 0
        while done < n:
            chunk = min(n - done, gm.PAGE - (la + done) % gm.PAGE)
            pa, _ = gm.page_walk(lambda a, w: gm.read_guest_phys(self.vm, a, w),
                                 s.cr0, s.cr3, s.cr4, self.efer, la + done)
            yield pa, done, chunk
            done += chunk

    def read(self, la: int, n: int) -> bytes | None:
        out = b""
        for pa, _, chunk in self._pages(la, n):
            data = gm.read_guest_phys(self.vm, pa, chunk) if pa is not None else None
            if data is None or len(data) < chunk:
                return None
            out += data
        return out

    def write(self, la: int, data: bytes) -> bool:
        return all(pa is not None and gm.write_guest_phys(self.vm, pa, data[at:at + chunk])
                   for pa, at, chunk in self._pages(la, len(data)))


def deliver(v, vector: int, error_code: int | None = None, return_rip: int | None = None,
            software: bool = False, cr2: int | None = None):
    """Deliver ``vector`` to the guest of vCPU ``v``; returns None (resume) or ``ShutdownExit``.

    ``error_code`` is pushed for the vectors that have one; ``return_rip`` is the RIP to return
    to (default: the current one, i.e. the faulting instruction); ``software`` marks INT n /
    INT3 / INTO, whose gate DPL must allow the current CPL; ``cr2`` is written to CR2 when a
    #PF is delivered. Caller holds the vCPU ioctl lock.
    """
    mode = v._mode
    if mode == "32":
        return ShutdownExit()
    current = vector
    code = error_code or 0
    for _ in range(3):
        try:
            with v._vm._lock:
                if mode == "64":
                    _deliver_long(v, current, code, return_rip, software, cr2)
                else:
                    _deliver_real(v, current, return_rip, software)
            return None
        except _Fault as fault:
            nxt = _combine(current, fault.vector)
            if nxt is None:
                return ShutdownExit()
            # the new fault returns to the instruction that was being delivered for
            current, code, software, return_rip = nxt, (0 if nxt == DF else fault.error_code), False, None
            cr2 = None if nxt == DF else fault.cr2
    return ShutdownExit()


def _target_cpl(mem: _GuestMemory, gdt_base: int, gdt_limit: int, selector: int, cpl: int) -> int:
    """The CPL the handler runs at: its code segment's DPL (conforming: unchanged), or raise."""
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
    if access & 0x18 != 0x18 or not flags & 0x2 or dpl > cpl:  # a 64-bit code segment, DPL <= CPL
        raise _Fault(GP, index)
    return cpl if access & 0x4 else dpl


def _deliver_long(v, vector: int, error_code: int, return_rip: int | None, software: bool,
                  cr2: int | None) -> None:
    x = unicorn().x86_const
    r, s = v._read_regs(), v._read_sregs()
    mem = _GuestMemory(v._vm, s, True)
    idt_error = vector * 8 + 2
    if vector * 16 + 15 > s.idt.limit:
        raise _Fault(GP, idt_error)
    raw = mem.read(s.idt.base + vector * 16, 16)
    if raw is None:
        raise _Fault(GP, idt_error)
    lo, hi = struct.unpack("<QQ", raw)
    gate_type, gate_dpl, present = (lo >> 40) & 0xF, (lo >> 45) & 3, (lo >> 47) & 1
    cpl = s.cs.selector & 3
    if gate_type not in (0xE, 0xF) or (software and gate_dpl < cpl):
        raise _Fault(GP, idt_error)
    if not present:
        raise _Fault(NP, idt_error)
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
    frame = [s.ss.selector, r.rsp, r.rflags, s.cs.selector, r.rip if return_rip is None else return_rip]
    if vector in _WITH_ERROR_CODE and not software:
        frame.append(error_code)
    rsp -= 8 * len(frame)
    if not mem.write(rsp, struct.pack(f"<{len(frame)}Q", *reversed(frame))):
        raise _Fault(PF, _PF_WRITE, cr2=rsp)
    flags = r.rflags & ~(_TF | _NT | _RF | _VM | (_IF if gate_type == 0xE else 0))
    with v.uc_lock:
        uc = v._u
        if vector == PF and cr2 is not None:
            uc.reg_write(x.UC_X86_REG_CR2, cr2)
        uc.reg_write(x.UC_X86_REG_CS, (target & ~3) | new_cpl)
        if new_cpl != cpl:
            uc.reg_write(x.UC_X86_REG_SS, new_cpl)  # a null SS carrying the new CPL
            v._hidden.set_cpl(new_cpl)  # hidden_state: the API's segment loads keep CPL 0
    v._sregs_stale = True
    v._queue(rip=handler, rsp=rsp, rflags=flags)


def _deliver_real(v, vector: int, return_rip: int | None, software: bool) -> None:
    x = unicorn().x86_const
    r, s = v._read_regs(), v._read_sregs()
    mem = _GuestMemory(v._vm, s, False)
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
    with v.uc_lock:
        v._u.reg_write(x.UC_X86_REG_CS, cs)
    v._sregs_stale = True
    v._read_sregs()  # the new CS base, before RIP is queued as a linear address
    v._queue(rip=ip, rsp=(r.rsp & ~0xFFFF) | sp, rflags=r.rflags & ~(_TF | _IF | _AC))
