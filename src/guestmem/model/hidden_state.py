"""CPU state of a Unicorn engine that its API does not reach: the exception in flight, the
error code of the last exception, and the current privilege level.

Data model. Unicorn's saved CPU context (``uc_context_save``) is a byte copy of QEMU's
``CPUX86State``; ``HiddenState`` keeps one preallocated context per engine and patches fields
of that copy, then restores it (~2.3 us for a save and a restore). Field offsets are found once
per process by calibration on scratch engines, each confirmed by the behaviour it must change;
if a calibration fails (another Unicorn build), the matching method returns False/None and the
vCPU falls back to what Unicorn does on its own (documented at each method).

Why each field:

- ``old_exception`` (the exception being delivered). QEMU turns a #PF raised while delivering
  a #PF into a #DF, and a fault during a #DF into a triple fault. Delivery through the IDT
  resets the field; Unicorn's UC_HOOK_INTR path skips delivery and never resets it (2.1.4:
  cpu_handle_exception only clears exception_index), and a stop from a memory hook or unmapping
  the region that holds the current code leaves it set too (measured). The next #PF of the
  engine is then a silent triple fault: emu_start returns with no hook call and no error. The
  vCPU clears it before resuming after any of those. Found as the only int that is -1 before
  a hooked #PF and not after; confirmed by a second #PF that reaches the hook again.
- ``error_code``, ``exception_is_int``, ``exception_next_eip`` sit just before
  ``old_exception`` (QEMU's layout; checked by a test with a known #PF error code). Needed to
  deliver an exception to the guest's IDT (``interrupts``).
- ``hflags`` CPL bits. Writing CS and SS with RPL/DPL 3 through the API leaves Unicorn at
  CPL 0 (measured: ``cli``, ``mov rax, cr3`` and ``hlt`` then run without #GP), so a "CPL3"
  guest would run privileged. ``set_cpl`` writes the CPL into hflags the way loading SS does.
  Found from the general registers at the start of the copy (RAX is the first field; hflags
  follows regs[16], eip, eflags, cc_dst/src/src2, cc_op and df); confirmed by ``cli`` raising
  #GP at CPL 3 with IOPL 0.

Versions. The offsets between fields (``_OLD_EXCEPTION_TO_ERROR_CODE``, ``_REGS_TO_HFLAGS``)
and the behaviour the calibration relies on were verified on the libunicorn versions in
``VERIFIED_UNICORN``, and pyproject.toml pins the same range. On another version a wrong
offset would make the vCPU write into QEMU's CPU state at random, which can crash the process,
so ``HiddenState`` refuses to start (ImportError naming both versions); widen the range only
after ``tests/test_hidden_state.py`` and the vCPU tests pass on the new version.
"""

from __future__ import annotations

import ctypes
import os
import threading

from .unicorn_cpu import EFER, unicorn

_UNKNOWN = -2
# Inclusive range of libunicorn versions (major, minor, patch) the layout above was verified on.
VERIFIED_UNICORN = ((2, 1, 4), (2, 1, 4))
_offsets: dict[str, int | None] = {}
_lock = threading.Lock()


def _new_lock_in_child() -> None:  # a fork taken while another thread held _lock
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)
# CPUX86State: int error_code; int exception_is_int; target_ulong exception_next_eip;
# target_ulong dr[8]; four breakpoint/watchpoint pointers; int old_exception.
_OLD_EXCEPTION_TO_ERROR_CODE = 4 + 4 + 8 + 8 * 8 + 4 * 8
# CPUX86State: target_ulong regs[16], eip, eflags, cc_dst, cc_src, cc_src2; uint32_t cc_op; int32_t df; uint32_t hflags
_REGS_TO_HFLAGS = 16 * 8 + 8 + 8 + 3 * 8 + 4 + 4
_HF_CPL_MASK = 3
_RAX_MARK, _RBX_MARK = 0x6775_6573_746D_656D, 0x1357_9BDF_2468_ACE0


def unicorn_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the libunicorn the binding loaded (``uc_version``'s combined word)."""
    combined = unicorn().uc_version()[2]
    return (combined >> 24) & 0xFF, (combined >> 16) & 0xFF, (combined >> 8) & 0xFF


def check_unicorn_version() -> None:
    """ImportError unless the loaded libunicorn is in ``VERIFIED_UNICORN`` (module doc)."""
    version = unicorn_version()
    lo, hi = VERIFIED_UNICORN
    if not lo <= version <= hi:
        found, want = ".".join(map(str, version)), "-".join(".".join(map(str, v)) for v in dict.fromkeys((lo, hi)))
        raise ImportError(f"model vCPUs patch Unicorn's private CPU layout, verified on Unicorn {want}; "
                          f"the loaded libunicorn is {found}: pip install 'unicorn=={'.'.join(map(str, hi))}'")


def _context_bytes(ctx) -> bytes:
    return ctypes.string_at(ctx.context.value, ctx.size)


def _patch(uc, offset: int, value: int) -> None:
    ctx = uc.context_save()
    ctypes.c_int32.from_address(ctx.context.value + offset).value = value
    uc.context_restore(ctx)


def _paged_engine(code: bytes = b""):
    """A 64-bit engine with 2 MiB identity paging over [0, 2 MiB) and ``code`` at 0x1000.

    Returns (engine, run) where run() executes one instruction and returns the vectors hooked.
    """
    import struct

    u = unicorn()
    x = u.x86_const
    uc = u.Uc(u.UC_ARCH_X86, u.UC_MODE_64)
    uc.mem_map(0, 0x20_0000)
    uc.mem_write(0x10_0000, struct.pack("<Q", 0x10_1000 | 7))  # present, RW, user
    uc.mem_write(0x10_1000, struct.pack("<Q", 0x10_2000 | 7))
    uc.mem_write(0x10_2000, struct.pack("<Q", 0x87))  # 2 MiB page at 0: present, RW, user
    uc.mem_write(0x1000, code)
    seen: list[int] = []
    uc.hook_add(u.UC_HOOK_INTR, lambda uc_, intno, _: (seen.append(intno), uc_.emu_stop()))
    uc.hook_add(u.UC_HOOK_MEM_UNMAPPED, lambda *a: False)
    uc.reg_write(x.UC_X86_REG_CR3, 0x10_0000)
    uc.reg_write(x.UC_X86_REG_CR4, 1 << 5)  # PAE
    uc.msr_write(EFER, 1 << 8)  # LME
    uc.reg_write(x.UC_X86_REG_CR0, 0x8000_0011)  # PG | ET | PE

    def run(pc: int = 0x1000) -> list[int]:
        before = len(seen)
        try:
            uc.emu_start(pc, pc + 16, count=1)
        except u.UcError:
            pass
        return seen[before:]

    return uc, run


def _calibrate_old_exception() -> int | None:
    uc, run = _paged_engine()
    fault_at = 0x4000_0000  # outside the identity map: every fetch there raises #PF
    before = _context_bytes(uc.context_save())
    if run(fault_at) != [14]:
        return None
    after = _context_bytes(uc.context_save())
    minus_one = (-1).to_bytes(4, "little", signed=True)
    candidates = [off for off in range(0, min(len(before), len(after)) - 3, 4)
                  if before[off:off + 4] == minus_one and after[off:off + 4] != minus_one]
    if len(candidates) != 1:
        return None
    _patch(uc, candidates[0], -1)
    return candidates[0] if run(fault_at) == [14] else None  # a second hooked #PF: it was the field


def _calibrate_hflags() -> int | None:
    x = unicorn().x86_const
    uc, run = _paged_engine(b"\xfa")  # cli
    uc.reg_write(x.UC_X86_REG_RAX, _RAX_MARK)
    uc.reg_write(x.UC_X86_REG_RBX, _RBX_MARK)
    blob = _context_bytes(uc.context_save())
    rax = blob.find(_RAX_MARK.to_bytes(8, "little"))
    if rax < 0 or blob[rax + 24:rax + 32] != _RBX_MARK.to_bytes(8, "little"):  # regs: rax, rcx, rdx, rbx
        return None
    offset = rax + _REGS_TO_HFLAGS
    uc.reg_write(x.UC_X86_REG_RFLAGS, 0x2)  # IOPL 0
    if run() != []:  # CLI at CPL 0 is allowed
        return None
    hflags = int.from_bytes(blob[offset:offset + 4], "little")
    uc.reg_write(x.UC_X86_REG_RIP, 0x1000)
    _patch(uc, offset, (hflags & ~_HF_CPL_MASK) | 3)
    return offset if run() == [13] else None  # ...and #GP at CPL 3


def _offset(name: str) -> int | None:
    with _lock:
        if name not in _offsets:
            _offsets[name] = {"old_exception": _calibrate_old_exception, "hflags": _calibrate_hflags}[name]()
        return _offsets[name]


class HiddenState:
    """The patchable hidden state of one engine (caller holds the vCPU's uc_lock)."""

    def __init__(self, uc) -> None:
        from unicorn.unicorn_py3 import unicorn as binding

        self._ctx = ctypes.c_void_p()
        check_unicorn_version()
        self._lib = binding.uclib
        self._h = uc._uch

    def __del__(self) -> None:
        if self._ctx.value:
            self._lib.uc_context_free(self._ctx)

    def _saved_field(self, name: str) -> int | None:
        """Save the engine's context and return the address of field ``name`` in the copy, or
        None if the field is uncalibrated or no context could be allocated."""
        offset = _offset(name)
        if offset is None:
            return None
        if not self._ctx.value and self._lib.uc_context_alloc(self._h, ctypes.byref(self._ctx)):
            return None
        self._lib.uc_context_save(self._h, self._ctx)
        return self._ctx.value + offset

    def clear_exception_in_flight(self) -> bool:
        """Forget the exception the engine believes it is delivering (module doc).

        False if uncalibrated: the next #PF of the engine may then end the run as a triple fault.
        """
        at = self._saved_field("old_exception")
        if at is None:
            return False
        ctypes.c_int32.from_address(at).value = -1
        self._lib.uc_context_restore(self._h, self._ctx)
        return True

    def exception_info(self) -> tuple[int, bool, int] | None:
        """(error code, software interrupt?, next RIP) of the exception just raised, or None."""
        at = self._saved_field("old_exception")
        if at is None:
            return None
        at -= _OLD_EXCEPTION_TO_ERROR_CODE
        return (ctypes.c_int32.from_address(at).value & 0xFFFF_FFFF,
                bool(ctypes.c_int32.from_address(at + 4).value),
                ctypes.c_uint64.from_address(at + 8).value)

    def set_cpl(self, cpl: int) -> bool:
        """Make ``cpl`` the engine's current privilege level (module doc).

        False if uncalibrated: the engine then stays at the CPL its API left (0).
        """
        at = self._saved_field("hflags")
        if at is None:
            return False
        field = ctypes.c_uint32.from_address(at)
        if field.value & _HF_CPL_MASK != cpl:
            field.value = (field.value & ~_HF_CPL_MASK) | cpl
            self._lib.uc_context_restore(self._h, self._ctx)
        return True
