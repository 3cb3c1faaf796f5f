"""The drop-in's ioctl handlers that decode a struct argument and call one model method.

Each takes the program's open file (``server._File``: the model object, its kind, for a vCPU
the signal mask) and the address the program passed, and returns the ioctl's result or
raises ``OSError``; ``server.Server`` dispatches to them. ``load_sync_regs`` and
``store_sync_regs`` are KVM_RUN's handling of the kvm_run sync area (KVM_CAP_SYNC_REGS).
"""

from __future__ import annotations

import ctypes
import errno
import signal
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..errors import oserror
from ..types import VcpuEvents
from .structs import get_regs, get_sregs, get_value, get_xcrs, msr_entries, put_regs, put_sregs, put_value, s32, struct_at

if TYPE_CHECKING:
    from .server import _File

def get_msrs(f: _File, addr: int) -> int:
    entries = msr_entries(addr)
    got = f.obj.get_msrs([e.index for e in entries])
    for e, (_, value) in zip(entries, got):
        e.data = value
    return len(got)


def set_msrs(f: _File, addr: int) -> int:
    return f.obj.set_msrs([(e.index, e.data) for e in msr_entries(addr)])


def set_user_memory_region(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_userspace_memory_region, addr)
    f.obj.set_user_memory_region(s.slot, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr)
    return 0


def set_memory_attributes(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_memory_attributes, addr)
    f.obj.set_memory_attributes(s.address, s.size, s.attributes, s.flags)
    return 0


def enable_cap(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_enable_cap, addr)
    f.obj.enable_cap(s.cap, *s.args, flags=s.flags)
    return 0


def get_dirty_log(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_dirty_log, addr)
    log = f.obj.get_dirty_log(s.slot)
    if not s.dirty_bitmap:
        raise oserror(errno.EFAULT, "kvm_dirty_log.dirty_bitmap is NULL")
    ctypes.memmove(s.dirty_bitmap, log.bitmap, len(log.bitmap))
    return 0


def clear_dirty_log(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_clear_dirty_log, addr)
    if not s.dirty_bitmap:
        raise oserror(errno.EFAULT, "kvm_clear_dirty_log.dirty_bitmap is NULL")
    bitmap = ctypes.string_at(s.dirty_bitmap, (s.num_pages + 63) // 64 * 8)
    f.obj.clear_dirty_log(s.slot, s.first_page, s.num_pages, bitmap)
    return 0


KERNEL_SIGSET_BYTES = 8


def set_signal_mask(f: _File, addr: int) -> int:
    """KVM_SET_SIGNAL_MASK (api.rst 4.15): the signals blocked while KVM_RUN runs; NULL clears.

    A served ioctl of the drop-in itself: the mask is the program thread's, applied around
    each KVM_RUN (kvm_sigset_activate). EINVAL unless len is the kernel's sigset size (8).
    """
    if not addr:
        f.sigmask = None
        return 0
    n = struct_at(ctypes.c_uint32, addr).value
    if n != KERNEL_SIGSET_BYTES:
        raise oserror(errno.EINVAL, f"kvm_signal_mask.len {n} != {KERNEL_SIGSET_BYTES}")
    bits = int.from_bytes(ctypes.string_at(addr + 4, n), "little")
    f.sigmask = {sig for sig in range(1, 65) if bits >> (sig - 1) & 1 and sig in signal.valid_signals()}
    return 0


SYNC_OFFSET = uapi.kvm_run.s.offset  # kvm_run.s.regs: struct kvm_sync_regs
XSAVE_BYTES = ctypes.sizeof(uapi.kvm_xsave)  # the model's KVM_CAP_XSAVE2: the legacy 4 KiB area


def set_xcrs(f: _File, addr: int) -> int:
    xcrs, flags = get_xcrs(addr)
    f.obj.set_xcrs(xcrs, flags)
    return 0


def irq_line(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_irq_level, addr)
    f.obj.irq_line(s.irq, s.level)
    return 0


def irqfd(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_irqfd, addr)
    f.obj.irqfd(s32(s.fd), s.gsi, s.flags, s32(s.resamplefd))
    return 0


def ioeventfd(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_ioeventfd, addr)
    f.obj.ioeventfd(s.fd, s.addr, s.len, s.datamatch, s.flags)
    return 0


def load_sync_regs(vcpu: Any, run: Any) -> None:
    """kvm_run.s.regs -> the vCPU for each ``kvm_dirty_regs`` bit (regs, sregs, events, in
    that order), clearing each bit once loaded (sync_regs)."""
    sync = struct_at(uapi.kvm_sync_regs, ctypes.addressof(run) + SYNC_OFFSET)
    if run.kvm_dirty_regs & uapi.SyncRegs.REGS:
        vcpu.set_regs(get_regs(ctypes.addressof(sync.regs)))
        run.kvm_dirty_regs &= ~int(uapi.SyncRegs.REGS)
    if run.kvm_dirty_regs & uapi.SyncRegs.SREGS:
        vcpu.set_sregs(get_sregs(ctypes.addressof(sync.sregs)))
        run.kvm_dirty_regs &= ~int(uapi.SyncRegs.SREGS)
    if run.kvm_dirty_regs & uapi.SyncRegs.EVENTS:
        vcpu.set_vcpu_events(get_value(ctypes.addressof(sync.events), uapi.kvm_vcpu_events, VcpuEvents))
        run.kvm_dirty_regs &= ~int(uapi.SyncRegs.EVENTS)


def store_sync_regs(vcpu: Any, run: Any) -> None:
    """The vCPU -> kvm_run.s.regs for each ``kvm_valid_regs`` bit (store_regs)."""
    sync = struct_at(uapi.kvm_sync_regs, ctypes.addressof(run) + SYNC_OFFSET)
    if run.kvm_valid_regs & uapi.SyncRegs.REGS:
        put_regs(ctypes.addressof(sync.regs), vcpu.get_regs())
    if run.kvm_valid_regs & uapi.SyncRegs.SREGS:
        put_sregs(ctypes.addressof(sync.sregs), vcpu.get_sregs())
    if run.kvm_valid_regs & uapi.SyncRegs.EVENTS:
        put_value(ctypes.addressof(sync.events), uapi.kvm_vcpu_events, vcpu.get_vcpu_events())


def pre_fault_memory(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_pre_fault_memory, addr)
    s.gpa, s.size = f.obj.pre_fault_memory(s.gpa, s.size, s.flags)
    return 0
