"""``Vcpu``: a KVM vCPU fd, its mmapped ``kvm_run`` page, and exit decoding.

A Vcpu owns two things: the fd from KVM_CREATE_VCPU and a MAP_SHARED mapping of the fd's
first ``KVM_GET_VCPU_MMAP_SIZE`` bytes, which is ``struct kvm_run``. ``run()`` issues
KVM_RUN and reads the exit out of that page; answers to IN, MMIO reads and hypercalls are
written back into the same page and consumed by the next KVM_RUN (api.rst 5, "The kvm_run
structure").

At creation the vCPU's CPUID is set to KVM_GET_SUPPORTED_CPUID of the system fd, as the
selftests' ``vm_vcpu_add`` does: without CPUID entries KVM refuses long mode (EFER.LME).

Kicks. ``kick()`` sets ``kvm_run.immediate_exit`` and sends SIGUSR1 to the thread inside
KVM_RUN (``run()`` records its thread: ~0.1 us of an exit, measured), so KVM_RUN returns EINTR
(``IntrExit``). ``close()`` during a ``run()`` in another thread kicks that thread and leaves
the kvm_run mapping and the fd to it: the run returns its exit (or EBADF), never touches
released memory, and a ``kick()`` after the close still reaches it. A signal only interrupts
KVM_RUN if it has a handler; CPython installs
handlers only from the main thread, so the first Vcpu created in the main thread installs a
no-op SIGUSR1 handler when SIGUSR1 is still SIG_DFL (a handler the application installed is
left alone). If no handler could be installed, ``kick()`` only
sets immediate_exit: a run in progress then returns at its next exit, and the run after it
returns ``IntrExit`` at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import struct
import threading
from typing import TYPE_CHECKING, Any

from .. import hostmem, uapi
from ..errors import oserror
from ..types import (
    Exit, FailEntryExit, HltExit, HypercallExit, InternalErrorExit, IntrExit, IoExit,
    MemoryFaultExit, MmioExit, Regs, ShutdownExit, Sregs, UnknownExit,
)
from ..encoding import encode_unsigned
from ..structcodec import regs_from_struct, regs_to_struct, sregs_from_struct, sregs_to_struct
from ._fd import FdObject
from ._ioctl import closed_error, int_arg, ioctl
from .vcpu_state import VcpuState

if TYPE_CHECKING:
    from .vm import Vm

KICK_SIGNAL = signal.SIGUSR1

# Offsets into the kvm_run page, taken from the uapi layout so it stays the one source.
_EXIT = uapi.kvm_run.exit.offset
_OFF_IMMEDIATE_EXIT = uapi.kvm_run.immediate_exit.offset
_OFF_REASON = uapi.kvm_run.exit_reason.offset
_OFF_IO = _EXIT + uapi.kvm_run_exit.io.offset
_OFF_MMIO = _EXIT + uapi.kvm_run_exit.mmio.offset
_OFF_MMIO_DATA = _OFF_MMIO + uapi.kvm_run_mmio.data.offset
_OFF_HC = _EXIT + uapi.kvm_run_exit.hypercall.offset
_OFF_HC_RET = _OFF_HC + uapi.kvm_run_hypercall.ret.offset
_OFF_MF = _EXIT + uapi.kvm_run_exit.memory_fault.offset
_OFF_INTERNAL = _EXIT + uapi.kvm_run_exit.internal.offset
_OFF_FAIL = _EXIT + uapi.kvm_run_exit.fail_entry.offset
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_IO = struct.Struct("<BBHIQ")        # direction, size, port, count, data_offset
_ioctl, _KVM_RUN = fcntl.ioctl, uapi.KVM_RUN
_MMIO = struct.Struct("<Q8sIB")      # phys_addr, data, len, is_write
_HC = struct.Struct("<Q6QQQ")        # nr, args[6], ret, flags (E1: u32 longmode + garbage)
_MF = struct.Struct("<QQQ")          # flags, gpa, size
_INTERNAL = struct.Struct("<II16Q")  # suberror, ndata, data[16]
_FAIL = struct.Struct("<QI")         # hardware_entry_failure_reason, cpu

# Module-level plain ints: reading ``uapi.ExitReason.IO`` and comparing costs ~0.16 us, a module int
# ~25 ns; run() makes several such tests per exit, and `guestmem bench exits` times a ~7.5 us exit.
_R = uapi.ExitReason
(_EXIT_IO, _EXIT_MMIO, _EXIT_HLT, _EXIT_HYPERCALL, _EXIT_SHUTDOWN, _EXIT_INTR, _EXIT_INTERNAL_ERROR,
 _EXIT_FAIL_ENTRY, _EXIT_MEMORY_FAULT) = (int(r) for r in (
    _R.IO, _R.MMIO, _R.HLT, _R.HYPERCALL, _R.SHUTDOWN, _R.INTR, _R.INTERNAL_ERROR, _R.FAIL_ENTRY,
    _R.MEMORY_FAULT))
_IO_OUT = int(uapi.IoDirection.OUT)
# Python's errno module has no EHWPOISON; the uapi table has the x86-64 value (133).
_MEMORY_FAULT_ERRNOS = (errno.EFAULT, int(uapi.Errno.EHWPOISON))

_HLT, _SHUTDOWN, _INTR = HltExit(), ShutdownExit(), IntrExit()

# IO exits are immutable values and a run loop repeats a few of them, so run() hands out one
# shared IoExit per distinct exit instead of building a frozen dataclass (~1 µs, as much as
# the rest of the exit path). The hot path is one unpack and one dict lookup: _RAW reads
# exit_reason, the io member (as bytes) and the first 8 bytes of the PIO data page (on x86
# io.data_offset is KVM_PIO_PAGE_OFFSET pages into the mapping, asm/kvm.h; as a u64, the
# cheapest key) into a tuple, and _raw_exits maps such tuples to their IoExit. A tuple is only
# entered when it determines the exit: reason IO and, for OUT, data_offset at the PIO page and
# size*count <= 8. Bytes past size*count are stale, so they can only cause a miss, which
# decodes and caches. _io_exits keeps the canonical instance per (direction, size, port,
# count, data). Each Vcpu also remembers its last hit (``_last_io``), so a loop repeating one
# exit compares one tuple instead of hashing it.
_PIO_DATA_OFFSET = 1 * 4096
_RAW_DATA = 8
_RAW = struct.Struct(f"<I{_OFF_IO - _OFF_REASON - 4}x{_IO.size}s"
                     f"{_PIO_DATA_OFFSET - _OFF_IO - _IO.size}xQ")
_RAW_END = _OFF_REASON + _RAW.size
_unpack_raw = _RAW.unpack_from
_IO_EXIT_CACHE = 256
_io_exits: dict[tuple[int, int, int, int, bytes], IoExit] = {}
_raw_exits: dict[tuple[int, bytes, int], IoExit] = {}

_kick_handler_lock = threading.Lock()


def _new_kick_lock_in_child() -> None:  # a fork taken while another thread installed the handler
    global _kick_handler_lock
    _kick_handler_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_kick_lock_in_child)


def _noop_signal_handler(signum: int, frame: Any) -> None:
    """SIGUSR1 handler whose only job is to exist, so the signal interrupts KVM_RUN."""


def _ensure_kick_handler() -> bool:
    """Install the no-op kick handler if SIGUSR1 is SIG_DFL and we are the main thread.

    Returns whether SIGUSR1 has a handler (ours or the application's), i.e. whether sending
    it interrupts a blocking ioctl instead of killing the process or being discarded.
    """
    with _kick_handler_lock:
        current = signal.getsignal(KICK_SIGNAL)
        if current in (signal.SIG_DFL, None) and threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, _noop_signal_handler)
            current = _noop_signal_handler
        return current not in (signal.SIG_DFL, signal.SIG_IGN, None)


def vcpu_setup(system: Any) -> tuple[int, ctypes.Array]:
    """(kvm_run mmap size, supported CPUID) of ``system``'s /dev/kvm, fetched once per System.

    Every VM keeps them from its creation, so its vCPUs can be created after the System is
    closed: the kernel needs only the VM fd for that.
    """
    cached = getattr(system, "_vcpu_setup_cache", None)
    if cached is None:
        cached = system._vcpu_setup_cache = (system.vcpu_mmap_size(), _supported_cpuid(system.fileno()))
    return cached


def _supported_cpuid(system_fd: int) -> ctypes.Array:
    """KVM_GET_SUPPORTED_CPUID on /dev/kvm as a kvm_cpuid2 buffer (header + entries).

    The entry count is unknown up front: the kernel fails with E2BIG when nent is too small,
    so grow and retry.
    """
    nent = 128
    while True:
        class _Cpuid(ctypes.Structure):
            _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                        ("entries", uapi.kvm_cpuid_entry2 * nent)]
        buf = _Cpuid(nent=nent)
        try:
            ioctl(system_fd, uapi.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID", buf, f"nent={nent}")
            return buf
        except OSError as exc:
            if exc.errno != errno.E2BIG or nent >= 4096:
                raise
            nent *= 2


def _decode_exit(page: memoryview, raw: tuple[int, bytes, int]) -> Exit:
    """Decode the exit in kvm_run after a successful KVM_RUN (``raw`` is ``_RAW`` of it)."""
    reason = raw[0]
    if reason == _EXIT_IO:
        direction, size, port, count, data_offset = _IO.unpack(raw[1])
        length = size * count
        out = direction == _IO_OUT
        data = bytes(page[data_offset:data_offset + length]) if out else b""
        key = (direction, size, port, count, data)
        exit_ = _io_exits.get(key)
        if exit_ is None:
            if len(_io_exits) >= _IO_EXIT_CACHE:
                _io_exits.clear()
            exit_ = _io_exits[key] = IoExit(direction=direction, size=size, port=port, count=count,
                                            data=data)
        if not out or (data_offset == _PIO_DATA_OFFSET and length <= _RAW_DATA):
            if len(_raw_exits) >= _IO_EXIT_CACHE:
                _raw_exits.clear()
            _raw_exits[raw] = exit_
        return exit_
    if reason == _EXIT_MMIO:
        phys_addr, data, length, is_write = _MMIO.unpack_from(page, _OFF_MMIO)
        return MmioExit(phys_addr=phys_addr, data=data[:length] if is_write else b"", len=length,
                        is_write=bool(is_write))
    if reason == _EXIT_HLT:
        return _HLT
    if reason == _EXIT_HYPERCALL:
        nr, *args, ret, flags = _HC.unpack_from(page, _OFF_HC)
        return HypercallExit(nr=nr, args=tuple(args), ret=ret, flags=flags)
    if reason == _EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == _EXIT_INTR:
        page[_OFF_IMMEDIATE_EXIT] = 0
        return _INTR
    if reason == _EXIT_INTERNAL_ERROR:
        suberror, ndata, *data = _INTERNAL.unpack_from(page, _OFF_INTERNAL)
        return InternalErrorExit(suberror=suberror, data=tuple(data[:min(ndata, 16)]))
    if reason == _EXIT_FAIL_ENTRY:
        hw_reason, cpu = _FAIL.unpack_from(page, _OFF_FAIL)
        return FailEntryExit(hardware_entry_failure_reason=hw_reason, cpu=cpu)
    return UnknownExit(reason=reason)


class Vcpu(VcpuState, FdObject):
    """An open KVM vCPU ``vcpu_id`` of ``vm``, with its kvm_run page mapped."""

    def __init__(self, vm: "Vm", vcpu_id: int) -> None:
        """KVM_CREATE_VCPU (api.rst 4.7), mmap of kvm_run, KVM_SET_CPUID2 with the supported CPUID.

        :raises OSError: EBADF if ``vm`` is closed; EINVAL for an id >= KVM_MAX_VCPU_IDS;
            EEXIST for a duplicate id; the mmap or KVM_SET_CPUID2 errno otherwise.
        """
        vm_fd = vm.fileno()
        fd = ioctl(vm_fd, uapi.KVM_CREATE_VCPU, "KVM_CREATE_VCPU", int_arg(vcpu_id, "vcpu_id"),
                   f"vcpu_id={vcpu_id}")
        try:
            size, cpuid = vm._vcpu_setup
            assert size >= _RAW_END, f"vCPU mapping of {size} bytes lacks the PIO data page"
            self._map = hostmem.map_file(size, hostmem.PROT_READ | hostmem.PROT_WRITE, hostmem.MAP_SHARED, fd, 0)
            ioctl(fd, uapi.KVM_SET_CPUID2, "KVM_SET_CPUID2", cpuid, f"nent={cpuid.nent}")
        except BaseException:
            if getattr(self, "_map", None) is not None:
                self._map.close()
            os.close(fd)
            raise
        self.vm = vm
        self.vcpu_id = vcpu_id
        self._fd = fd
        self._page = self._map.buffer()
        self._last_io: tuple[Any, Any] = (None, None)  # the last _raw_exits hit: (raw, IoExit)
        self._can_signal = _ensure_kick_handler()
        self._runner: int | None = None  # ident of the thread inside run()
        self._open_fd = fd  # the fd to close once no run() uses it (close() sets _fd = -1 first)
        self._released = False  # kvm_run unmapped and fd closed
        self._close_lock = threading.Lock()  # orders close(), kick() and the release

    def __repr__(self) -> str:
        return f"<kvm.Vcpu id={getattr(self, 'vcpu_id', '?')} fd={getattr(self, '_fd', -1)}>"

    def _what(self) -> str:
        return f"Vcpu {self.vcpu_id}"

    # --- registers ---------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        """KVM_GET_REGS (api.rst 4.11): the general-purpose registers.

        :raises OSError: EBADF if closed.
        """
        s = uapi.kvm_regs()
        ioctl(self._check(), uapi.KVM_GET_REGS, "KVM_GET_REGS", s)
        return regs_from_struct(s)

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS (api.rst 4.12).

        :raises OSError: EBADF if closed; EINVAL for a value that does not fit in a u64.
        """
        fd = self._check()
        ioctl(fd, uapi.KVM_SET_REGS, "KVM_SET_REGS", regs_to_struct(regs))

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS (api.rst 4.13): segments, descriptor tables, control registers, EFER.

        :raises OSError: EBADF if closed.
        """
        s = uapi.kvm_sregs()
        ioctl(self._check(), uapi.KVM_GET_SREGS, "KVM_GET_SREGS", s)
        return sregs_from_struct(s)

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS (api.rst 4.14).

        :raises OSError: EBADF if closed; EINVAL for an inconsistent state the kernel refuses
            (e.g. CR0.PG without PE, EFER.LME|CR0.PG without CR4.PAE, reserved bits) or a value
            that does not fit its field.
        """
        fd = self._check()
        ioctl(fd, uapi.KVM_SET_SREGS, "KVM_SET_SREGS", sregs_to_struct(sregs))

    # --- running -----------------------------------------------------------------------------

    def run(self) -> Exit:
        """KVM_RUN (api.rst 4.10): run the guest until it exits; return the decoded exit.

        KVM_RUN failing with EFAULT or EHWPOISON while exit_reason is KVM_EXIT_MEMORY_FAULT is
        an exit (``MemoryFaultExit`` carrying the errno), not an error. EINTR (a signal, a
        ``kick()`` or immediate_exit) is ``IntrExit``; immediate_exit is cleared afterwards.
        Unknown exit reasons are ``UnknownExit``.

        :raises OSError: EBADF if closed; any other KVM_RUN errno (EFAULT without a memory
            fault exit, ENOEXEC for a vCPU state KVM cannot run, EIO for a dead VM, ...).
        """
        # The thread is recorded until the page has been read; a close() meanwhile leaves the
        # release to the finally clause (module doc). Clearing _runner before testing _fd, while
        # close() sets _fd before reading _runner, makes one of the two see the other.
        self._runner = _get_ident()
        try:
            try:
                _ioctl(self._fd, _KVM_RUN)
            except OSError as exc:
                return self._run_failed(exc.errno)
            except ValueError:  # fcntl refuses fd -1: the vCPU is closed (no check on the hot path)
                raise closed_error(self._what()) from None
            raw = _unpack_raw(self._page, _OFF_REASON)
            last = self._last_io
            if raw == last[0]:
                return last[1]
            try:
                exit_ = _raw_exits[raw]
            except KeyError:
                return _decode_exit(self._page, raw)
            self._last_io = (raw, exit_)
            return exit_
        finally:
            self._runner = None
            if self._fd < 0:
                self._release()

    def _run_failed(self, err: int) -> Exit:
        """The exit or error for a KVM_RUN that failed with ``err`` (see ``run``)."""
        page = self._page
        if err == errno.EINTR:
            page[_OFF_IMMEDIATE_EXIT] = 0
            return _INTR
        if err in _MEMORY_FAULT_ERRNOS and _U32.unpack_from(page, _OFF_REASON)[0] == _EXIT_MEMORY_FAULT:
            flags, gpa, size = _MF.unpack_from(page, _OFF_MF)
            return MemoryFaultExit(flags=flags, gpa=gpa, size=size, errno=err)
        raise oserror(err, f"KVM_RUN(vcpu {self.vcpu_id})") from None

    def _pending(self, reason: int, what: str) -> None:
        if _U32.unpack_from(self._page, _OFF_REASON)[0] != reason:
            raise oserror(errno.EINVAL, f"{what}: the last exit was not KVM_EXIT_{_R(reason).name}")

    def complete_io(self, data: bytes | None) -> None:
        """Answer a KVM_EXIT_IO IN: write ``data`` at io.data_offset in kvm_run for the next KVM_RUN.

        ``data`` is ``size * count`` bytes (shorter data fills the front); None after an OUT,
        which needs no answer.

        :raises OSError: EBADF if closed; EINVAL if the last exit was not KVM_EXIT_IO or
            ``data`` is longer than size*count.
        :raises TypeError: None after an IN.
        """
        with self._close_lock:  # close() cannot unmap kvm_run meanwhile
            self._check()
            self._pending(_R.IO, "complete_io")
            direction, size, _, count, data_offset = _IO.unpack_from(self._page, _OFF_IO)
            if data is None:
                if direction == _IO_OUT:
                    return
                raise TypeError("complete_io: data must be bytes-like after an IN, not None")
            if len(data) > size * count:
                raise oserror(errno.EINVAL, f"complete_io: {len(data)} bytes for a {size}x{count}-byte IN")
            self._page[data_offset:data_offset + len(data)] = bytes(data)

    def complete_mmio(self, data: bytes | None) -> None:
        """Answer a KVM_EXIT_MMIO read: write ``data`` into mmio.data for the next KVM_RUN.

        ``data`` may be None after a write, which needs no answer.

        :raises OSError: EBADF if closed; EINVAL if the last exit was not KVM_EXIT_MMIO or
            ``data`` is longer than mmio.len.
        :raises TypeError: None after a read.
        """
        with self._close_lock:  # close() cannot unmap kvm_run meanwhile
            self._check()
            self._pending(_R.MMIO, "complete_mmio")
            _, _, length, is_write = _MMIO.unpack_from(self._page, _OFF_MMIO)
            if data is None:
                if is_write:
                    return
                raise TypeError("complete_mmio: data must be bytes-like after a read, not None")
            if len(data) > length:
                raise oserror(errno.EINVAL, f"complete_mmio: {len(data)} bytes for a {length}-byte access")
            self._page[_OFF_MMIO_DATA:_OFF_MMIO_DATA + len(data)] = bytes(data)

    def set_hypercall_ret(self, value: int) -> None:
        """Answer a KVM_EXIT_HYPERCALL: set hypercall.ret, which the next KVM_RUN puts in RAX.

        :raises OSError: EBADF if closed; EINVAL if the last exit was not KVM_EXIT_HYPERCALL or
            ``value`` does not fit in a u64 (negative values wrap, as -KVM_EINVAL does).
        """
        with self._close_lock:  # close() cannot unmap kvm_run meanwhile
            self._check()
            self._pending(_R.HYPERCALL, "set_hypercall_ret")
            _U64.pack_into(self._page, _OFF_HC_RET, encode_unsigned(value, 64, "ret"))

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY (api.rst 4.143): map [gpa, gpa+size) ahead of guest access.

        Returns the (gpa, size) the kernel wrote back: the unprocessed remainder, (gpa+size, 0)
        when everything was mapped. Success may be partial (spec §11.17).

        :raises OSError: EBADF if closed; ENOTTY if the kernel lacks the ioctl; EINVAL for
            flags != 0, unaligned gpa/size or an empty/overflowing range; EOPNOTSUPP without
            TDP or before a CoCo launch; ENOENT for a GPA with no memslot; EFAULT for a private
            GPA without gmem; EAGAIN while the memslot is being deleted; EINTR on a signal;
            EIO for a dead VM.
        """
        fd = self._check()
        s = uapi.kvm_pre_fault_memory()
        s.gpa = encode_unsigned(gpa, 64, "gpa")
        s.size = encode_unsigned(size, 64, "size")
        s.flags = encode_unsigned(flags, 64, "flags")
        ioctl(fd, uapi.KVM_PRE_FAULT_MEMORY, "KVM_PRE_FAULT_MEMORY", s,
              f"gpa={s.gpa:#x}, size={s.size:#x}, flags={s.flags:#x}")
        return s.gpa, s.size

    def kick(self) -> None:
        """Make the KVM_RUN in progress, or else the next one, return ``IntrExit``.

        Sets kvm_run.immediate_exit and sends SIGUSR1 to the thread inside KVM_RUN (see the
        module docstring for when a handler is available to make that signal harmless).

        :raises OSError: EBADF if closed -- after stopping a run() still in progress, which a
            close() from another thread leaves running until its next exit.
        """
        with self._close_lock:
            runner = self._interrupt()
            closed = self._fd < 0
        if runner is not None and runner != _get_ident():
            if not self._can_signal:
                self._can_signal = _ensure_kick_handler()
            if self._can_signal:
                try:
                    signal.pthread_kill(runner, KICK_SIGNAL)
                except ProcessLookupError:
                    pass
        if closed:
            raise closed_error(self._what())

    def _interrupt(self) -> int | None:
        """Set immediate_exit unless kvm_run is gone; the thread in run() (caller holds _close_lock).

        A thread just before or after its KVM_RUN gets a signal it ignores, and immediate_exit
        stops the KVM_RUN it starts next; one vCPU runs in one thread at a time (KVM holds
        vcpu->mutex), so one recorded thread is enough.
        """
        if self._released:
            return None
        self._page[_OFF_IMMEDIATE_EXIT] = 1
        return self._runner

    def close(self) -> None:
        """close(2) the fd; a second close is a no-op.

        A run() in another thread is kicked and keeps the fd and kvm_run until it returns.
        """
        with self._close_lock:
            if self._fd < 0:
                return
            self._fd = -1
            runner = self._interrupt()
        if runner is not None:
            if runner != _get_ident() and self._can_signal:
                try:
                    signal.pthread_kill(runner, KICK_SIGNAL)
                except ProcessLookupError:
                    pass
            if self._runner is not None:  # run()'s finally clause releases (or already did)
                return
        self._release()

    def _release(self) -> None:
        """Unmap kvm_run (and the dirty ring) and close the fd, once, after close() and
        outside any run()."""
        with self._close_lock:
            if self._released:
                return
            self._released = True
        self._page.release()
        self._map.close()
        self._release_dirty_ring()
        os.close(self._open_fd)


_get_ident = threading.get_ident
