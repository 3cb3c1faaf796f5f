"""The drop-in's struct codecs: KVM's uapi structs at a program's pointers <-> guestmem values.

``devkvm.server`` decodes an ioctl's argument struct with these (read and written in place,
at the address the program passed) and encodes results and exits back. A NULL pointer is
EFAULT; array headers whose count the kernel bounds give E2BIG as the kernel does.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any

from .. import uapi
from ..errors import oserror
from ..structcodec import (regs_from_struct, regs_to_struct, sregs_from_struct, sregs_to_struct, struct_to_value,
                           value_to_struct)
from ..types import (CpuidEntry, FailEntryExit, HltExit, HypercallExit, InternalErrorExit, IntrExit, IoExit,
                     MemoryFaultExit, MmioExit, Regs, Sregs, ShutdownExit, UnknownExit, Xcr)

PIO_OFFSET = uapi.PAGE_SIZE  # KVM_PIO_PAGE_OFFSET * PAGE_SIZE: the PIO data follows kvm_run


def user_pointer(addr: int, what: str) -> int:
    """``addr``, a pointer the program passed; EFAULT for NULL (copy_from_user/copy_to_user)."""
    if not addr:
        raise oserror(errno.EFAULT, f"NULL {what} pointer")
    return addr


def struct_at(cls: type, addr: int) -> Any:
    """The ``cls`` struct at ``addr``, in place; EFAULT for NULL."""
    return cls.from_address(user_pointer(addr, cls.__name__))


def s32(v: int) -> int:
    """A C int argument as the callee sees it (the low 32 bits, signed)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def s64(v: int) -> int:
    """A C long argument as the callee sees it (the low 64 bits, signed)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def put_u32(addr: int, value: int) -> int:
    struct_at(ctypes.c_uint32, addr).value = value
    return 0


def get_regs(addr: int) -> Regs:
    return regs_from_struct(struct_at(uapi.kvm_regs, addr))


def put_regs(addr: int, regs: Regs) -> int:
    regs_to_struct(regs, struct_at(uapi.kvm_regs, addr), validate=False)  # the model's own values
    return 0


def get_sregs(addr: int) -> Sregs:
    return sregs_from_struct(struct_at(uapi.kvm_sregs, addr))


def put_sregs(addr: int, sr: Sregs) -> int:
    s = struct_at(uapi.kvm_sregs, addr)
    ctypes.memset(addr, 0, ctypes.sizeof(uapi.kvm_sregs))
    sregs_to_struct(sr, s)
    return 0


def get_value(addr: int, struct: type, cls: type) -> Any:
    """The ``types`` dataclass ``cls`` decoded from the ``struct`` at ``addr``."""
    return struct_to_value(cls, struct_at(struct, addr))


def put_value(addr: int, struct: type, value: Any) -> int:
    """Encode dataclass ``value`` into the ``struct`` at ``addr`` (zeroed first: reserved bytes are 0)."""
    s = struct_at(struct, addr)
    ctypes.memset(addr, 0, ctypes.sizeof(struct))
    value_to_struct(value, s, struct.__name__)
    return 0


def get_bytes(addr: int, size: int) -> bytes:
    return ctypes.string_at(user_pointer(addr, "buffer"), size)


def put_bytes(addr: int, data: bytes) -> int:
    ctypes.memmove(user_pointer(addr, "buffer"), bytes(data), len(data))
    return 0


def get_xcrs(addr: int) -> tuple[list[Xcr], int]:
    """kvm_xcrs: the entries (at most KVM_MAX_XCRS are read; the model checks nr_xcrs) and flags."""
    s = struct_at(uapi.kvm_xcrs, addr)
    if s.nr_xcrs > uapi.KVM_MAX_XCRS:
        raise oserror(errno.EINVAL, f"kvm_xcrs.nr_xcrs {s.nr_xcrs} > KVM_MAX_XCRS ({uapi.KVM_MAX_XCRS})")
    return [Xcr(x.xcr, x.value) for x in s.xcrs[:s.nr_xcrs]], s.flags


def put_xcrs(addr: int, xcrs: tuple[Xcr, ...]) -> int:
    s = struct_at(uapi.kvm_xcrs, addr)
    ctypes.memset(addr, 0, ctypes.sizeof(uapi.kvm_xcrs))
    s.nr_xcrs = len(xcrs)
    for dst, x in zip(s.xcrs, xcrs):
        dst.xcr, dst.value = x.xcr, x.value
    return 0


_ENTRY = ctypes.sizeof(uapi.kvm_cpuid_entry2)
_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def get_cpuid(addr: int) -> list[CpuidEntry]:
    hdr = struct_at(uapi.kvm_cpuid2, addr)
    if hdr.nent > 256:
        raise oserror(errno.E2BIG, f"kvm_cpuid2.nent {hdr.nent} > 256")
    entries = (uapi.kvm_cpuid_entry2 * hdr.nent).from_address(addr + ctypes.sizeof(uapi.kvm_cpuid2))
    return [CpuidEntry(*[getattr(e, n) for n in _CPUID_FIELDS]) for e in entries]


def put_cpuid(addr: int, table: tuple[CpuidEntry, ...]) -> int:
    """Write ``table`` after the header; E2BIG (nent unchanged) if nent is too small."""
    hdr = struct_at(uapi.kvm_cpuid2, addr)
    if hdr.nent < len(table):
        raise oserror(errno.E2BIG, f"kvm_cpuid2.nent {hdr.nent} < {len(table)} entries")
    entries = (uapi.kvm_cpuid_entry2 * len(table)).from_address(addr + ctypes.sizeof(uapi.kvm_cpuid2))
    ctypes.memset(ctypes.addressof(entries), 0, ctypes.sizeof(entries))
    for e, src in zip(entries, table):
        for n in _CPUID_FIELDS:
            setattr(e, n, getattr(src, n))
    hdr.nent = len(table)
    return 0


def put_msr_list(addr: int, indices: tuple[int, ...]) -> int:
    """kvm_msr_list: E2BIG with nmsrs set to the count if the buffer is too small."""
    hdr = struct_at(uapi.kvm_msr_list, addr)
    n, hdr.nmsrs = hdr.nmsrs, len(indices)
    if n < len(indices):
        raise oserror(errno.E2BIG, f"kvm_msr_list.nmsrs {n} < {len(indices)}")
    arr = (ctypes.c_uint32 * len(indices)).from_address(addr + ctypes.sizeof(uapi.kvm_msr_list))
    arr[:] = indices
    return 0


def msr_entries(addr: int) -> Any:
    hdr = struct_at(uapi.kvm_msrs, addr)
    if hdr.nmsrs >= 0x4000:  # MAX_IO_MSRS
        raise oserror(errno.E2BIG, f"kvm_msrs.nmsrs {hdr.nmsrs} too large")
    return (uapi.kvm_msr_entry * hdr.nmsrs).from_address(addr + ctypes.sizeof(uapi.kvm_msrs))


def put_exit(page: Any, ex: Any) -> int:
    """Fill the vCPU's kvm_run page (``page.run``, ``page.address``; ``page.pending`` gets the exit
    userspace must answer) for ``ex``; returns KVM_RUN's result (0, or -errno for EINTR/EFAULT exits)."""
    run = page.run
    x = run.exit
    R = uapi.ExitReason
    if isinstance(ex, IoExit):
        run.exit_reason = R.IO
        x.io.direction, x.io.size, x.io.port, x.io.count = ex.direction, ex.size, ex.port, ex.count
        x.io.data_offset = PIO_OFFSET
        if ex.data:
            ctypes.memmove(page.address + PIO_OFFSET, ex.data, len(ex.data))
        page.pending = ex
        return 0
    if isinstance(ex, MmioExit):
        run.exit_reason = R.MMIO
        x.mmio.phys_addr, x.mmio.len, x.mmio.is_write = ex.phys_addr, ex.len, int(ex.is_write)
        ctypes.memmove(ctypes.addressof(x.mmio.data), ex.data.ljust(8, b"\0")[:8], 8)
        page.pending = ex
        return 0
    if isinstance(ex, HypercallExit):
        run.exit_reason = R.HYPERCALL
        h = x.hypercall
        h.nr, h.ret, h.flags = ex.nr, ex.ret, ex.flags
        for i, v in enumerate(ex.args[:6]):
            h.args[i] = v
        page.pending = ex
        return 0
    if isinstance(ex, MemoryFaultExit):
        run.exit_reason = R.MEMORY_FAULT
        x.memory_fault.flags, x.memory_fault.gpa, x.memory_fault.size = ex.flags, ex.gpa, ex.size
        return -ex.errno
    if isinstance(ex, HltExit):
        run.exit_reason = R.HLT
        return 0
    if isinstance(ex, IntrExit):
        run.exit_reason = R.INTR
        return -errno.EINTR
    if isinstance(ex, ShutdownExit):
        run.exit_reason = R.SHUTDOWN
        return 0
    if isinstance(ex, InternalErrorExit):
        run.exit_reason = R.INTERNAL_ERROR
        x.internal.suberror, x.internal.ndata = ex.suberror, min(len(ex.data), 16)
        for i, v in enumerate(ex.data[:16]):
            x.internal.data[i] = v
        return 0
    if isinstance(ex, FailEntryExit):
        run.exit_reason = R.FAIL_ENTRY
        x.fail_entry.hardware_entry_failure_reason, x.fail_entry.cpu = ex.hardware_entry_failure_reason, ex.cpu
        return 0
    if isinstance(ex, UnknownExit):
        run.exit_reason = ex.reason
        return 0
    raise AssertionError(f"unexpected exit {ex!r}")
