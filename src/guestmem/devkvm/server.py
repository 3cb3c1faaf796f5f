"""The drop-in's Python half: raw KVM calls on structs in, calls on the model's public API out.

This module runs inside the KVM program (embedded by the native library, ``native.py``).
It is the mirror image of ``guestmem.kvm``: where ``kvm`` encodes a Python call into an
ioctl on a uapi struct, this decodes the ioctl's struct (``guestmem.uapi`` layouts, read
and written in place at the program's pointer) into the same call on a ``guestmem.model``
object, and encodes the result back (the struct codecs are ``devkvm.structs``). It uses only
the model's public methods.

Data model
----------
* ``_files``: program fd -> ``_File`` (the model object and its kind: system, vm, vcpu,
  gmem). The fd is the model object's own descriptor (a real fd of the process, see
  ``model.fdtable``); ``dup`` adds more fds for the same ``_File``, which counts them and
  closes the model object when the last goes, as the kernel drops the file's last reference.
* Each vCPU gets a ``_RunPage``: a memfd of KVM_GET_VCPU_MMAP_SIZE bytes that the program's
  ``mmap`` of the vCPU fd maps, and that KVM_RUN fills with the exit (``kvm_run``; the PIO
  data page follows it, as in the kernel).
* ``_maps``: address -> model ``Mapping`` for the program's mmaps of guest_memfds; munmap
  closes them (dropping the file reference the mapping holds).
* The native side only forwards calls on fds marked owned (``lib.gm_set_owned``); an fd is
  marked when handed to the program and unmarked before its descriptor closes.

Every handler returns an int (the syscall's result) or raises ``OSError``; ``serve`` turns
that into ``-errno`` for the native side. An ioctl the model does not serve answers the
errno the kernel gives an unknown ioctl on that kind of fd (ENOTTY; EINVAL on a vCPU fd).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
import time
import traceback
from typing import Any, Callable

from .. import hostmem, uapi
from ..errors import oserror
from ..hostmem import MAP_SHARED, PROT_READ, PROT_WRITE
from ..types import DebugRegs, Fpu, HypercallExit, IntrExit, IoExit, LapicState, MmioExit, VcpuEvents, Xsave
from . import handlers
from .structs import (get_bytes, get_cpuid, get_regs, get_sregs, get_value, put_bytes,
                      put_cpuid, put_exit, put_msr_list, put_regs, put_sregs, put_u32, put_value, put_xcrs, s32, s64,
                      struct_at)

# Operation numbers of interpose.c
IOCTL, MMAP, MUNMAP, FALLOCATE, FSTAT, READ, WRITE, PREAD, PWRITE, LSEEK, FTRUNCATE, CLOSE, DUP, DUP3 = range(1, 15)
OP_NAMES = {v: k.lower() for k, v in dict(IOCTL=IOCTL, MMAP=MMAP, MUNMAP=MUNMAP, FALLOCATE=FALLOCATE, FSTAT=FSTAT,
                                           READ=READ, WRITE=WRITE, PREAD=PREAD, PWRITE=PWRITE, LSEEK=LSEEK,
                                           FTRUNCATE=FTRUNCATE, CLOSE=CLOSE, DUP=DUP, DUP3=DUP3).items()}
PASS = 1  # munmap/fstat: not the model's, let the C library do it

# What the kernel answers an ioctl it does not know (kvm_arch_dev_ioctl, kvm_arch_vm_ioctl and
# kvm_arch_vcpu_ioctl defaults; measured on the host by tests/c/gmem_vm.c). guest_memfd files
# have no ioctls: the VFS answers ENOTTY.
_UNKNOWN_IOCTL_ERRNO = {"system": errno.EINVAL, "vm": errno.ENOTTY, "vcpu": errno.EINVAL, "gmem": errno.ENOTTY}
_IOCTL_NAMES = {getattr(uapi, n): n for n in dir(uapi) if n.startswith("KVM_") and isinstance(getattr(uapi, n), int)
                and (getattr(uapi, n) >> 8) & 0xFF == uapi.KVMIO}


class _File:
    __slots__ = ("obj", "kind", "fds", "run", "sigmask")

    def __init__(self, obj: Any, kind: str) -> None:
        self.obj = obj
        self.kind = kind
        self.fds: set[int] = set()
        self.run: _RunPage | None = None
        self.sigmask: set[int] | None = None  # KVM_SET_SIGNAL_MASK: the thread's mask during KVM_RUN


class _RunPage:
    """The vCPU's kvm_run area: a memfd the program maps, and our own view of it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.memfd = hostmem.memfd("guestmem-kvm-run", size)
        self.address = hostmem.mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, self.memfd, 0)
        self.run = uapi.kvm_run.from_address(self.address)
        self.pending: Any = None  # the exit whose answer the next KVM_RUN reads from the page

    def close(self) -> None:
        hostmem.munmap(self.address, self.size)
        os.close(self.memfd)


class Server:
    """All model objects of one program, and the handlers of its calls."""

    def __init__(self, lib: Any, profile: str, trace: str | None) -> None:
        self.lib = lib
        self.profile = profile
        self._files: dict[int, _File] = {}
        self._maps: dict[int, Any] = {}
        self._lock = threading.RLock()
        self._trace = open(trace, "a", buffering=1) if trace else None
        self._ioctls: dict[str, dict[int, Callable[[_File, int], int]]] = {
            "system": {
                uapi.KVM_GET_API_VERSION: lambda f, arg: f.obj.api_version(),
                uapi.KVM_CREATE_VM: self._create_vm,
                uapi.KVM_CHECK_EXTENSION: lambda f, arg: f.obj.check_extension(arg),
                uapi.KVM_GET_VCPU_MMAP_SIZE: lambda f, arg: f.obj.vcpu_mmap_size(),
                uapi.KVM_GET_SUPPORTED_CPUID: lambda f, arg: put_cpuid(arg, f.obj.get_supported_cpuid()),
                uapi.KVM_GET_MSR_INDEX_LIST: lambda f, arg: put_msr_list(arg, f.obj.get_msr_index_list()),
                uapi.KVM_GET_MSR_FEATURE_INDEX_LIST: lambda f, arg: put_msr_list(arg, f.obj.get_msr_feature_index_list()),
            },
            "vm": {
                uapi.KVM_CHECK_EXTENSION: lambda f, arg: f.obj.check_extension(arg),
                uapi.KVM_CREATE_VCPU: self._create_vcpu,
                uapi.KVM_SET_USER_MEMORY_REGION: handlers.set_user_memory_region,
                uapi.KVM_SET_USER_MEMORY_REGION2: _set_user_memory_region2,
                uapi.KVM_CREATE_GUEST_MEMFD: self._create_guest_memfd,
                uapi.KVM_SET_MEMORY_ATTRIBUTES: handlers.set_memory_attributes,
                uapi.KVM_ENABLE_CAP: handlers.enable_cap,
                uapi.KVM_CREATE_IRQCHIP: lambda f, arg: f.obj.create_irqchip() or 0,
                uapi.KVM_SET_NR_MMU_PAGES: lambda f, arg: f.obj.set_nr_mmu_pages(arg) or 0,
                uapi.KVM_GET_TSC_KHZ: lambda f, arg: f.obj.get_tsc_khz(),
                uapi.KVM_GET_DIRTY_LOG: handlers.get_dirty_log,
                uapi.KVM_CLEAR_DIRTY_LOG: handlers.clear_dirty_log,
                uapi.KVM_IRQ_LINE: handlers.irq_line,
                uapi.KVM_IRQFD: handlers.irqfd,
                uapi.KVM_IOEVENTFD: handlers.ioeventfd,
            },
            "gmem": {},
            "vcpu": {
                uapi.KVM_RUN: self._run,
                uapi.KVM_GET_REGS: lambda f, arg: put_regs(arg, f.obj.get_regs()),
                uapi.KVM_SET_REGS: lambda f, arg: f.obj.set_regs(get_regs(arg)) or 0,
                uapi.KVM_GET_SREGS: lambda f, arg: put_sregs(arg, f.obj.get_sregs()),
                uapi.KVM_SET_SREGS: lambda f, arg: f.obj.set_sregs(get_sregs(arg)) or 0,
                uapi.KVM_GET_CPUID2: lambda f, arg: put_cpuid(arg, f.obj.get_cpuid2()),
                uapi.KVM_SET_CPUID2: lambda f, arg: f.obj.set_cpuid2(get_cpuid(arg)) or 0,
                uapi.KVM_GET_MSRS: handlers.get_msrs,
                uapi.KVM_SET_MSRS: handlers.set_msrs,
                uapi.KVM_GET_MP_STATE: lambda f, arg: put_u32(arg, f.obj.get_mp_state()),
                uapi.KVM_SET_MP_STATE: lambda f, arg: f.obj.set_mp_state(struct_at(uapi.kvm_mp_state, arg).mp_state) or 0,
                uapi.KVM_GET_TSC_KHZ: lambda f, arg: f.obj.get_tsc_khz(),
                uapi.KVM_SET_TSC_KHZ: lambda f, arg: f.obj.set_tsc_khz(arg) or 0,
                uapi.KVM_PRE_FAULT_MEMORY: handlers.pre_fault_memory,
                uapi.KVM_SET_SIGNAL_MASK: handlers.set_signal_mask,
                uapi.KVM_GET_FPU: lambda f, arg: put_value(arg, uapi.kvm_fpu, f.obj.get_fpu()),
                uapi.KVM_SET_FPU: lambda f, arg: f.obj.set_fpu(get_value(arg, uapi.kvm_fpu, Fpu)) or 0,
                uapi.KVM_GET_VCPU_EVENTS: lambda f, arg: put_value(arg, uapi.kvm_vcpu_events, f.obj.get_vcpu_events()),
                uapi.KVM_SET_VCPU_EVENTS:
                    lambda f, arg: f.obj.set_vcpu_events(get_value(arg, uapi.kvm_vcpu_events, VcpuEvents)) or 0,
                uapi.KVM_GET_DEBUGREGS: lambda f, arg: put_value(arg, uapi.kvm_debugregs, f.obj.get_debugregs()),
                uapi.KVM_SET_DEBUGREGS:
                    lambda f, arg: f.obj.set_debugregs(get_value(arg, uapi.kvm_debugregs, DebugRegs)) or 0,
                uapi.KVM_GET_LAPIC: lambda f, arg: put_bytes(arg, f.obj.get_lapic().regs),
                uapi.KVM_SET_LAPIC: lambda f, arg: f.obj.set_lapic(LapicState(get_bytes(arg, uapi.KVM_APIC_REG_SIZE))) or 0,
                uapi.KVM_GET_XSAVE: lambda f, arg: put_bytes(arg, f.obj.get_xsave().region),
                uapi.KVM_GET_XSAVE2: lambda f, arg: put_bytes(arg, f.obj.get_xsave2().region),
                uapi.KVM_SET_XSAVE: lambda f, arg: f.obj.set_xsave(Xsave(get_bytes(arg, handlers.XSAVE_BYTES))) or 0,
                uapi.KVM_GET_XCRS: lambda f, arg: put_xcrs(arg, f.obj.get_xcrs()),
                uapi.KVM_SET_XCRS: handlers.set_xcrs,
            },
        }

    # --- signals -------------------------------------------------------------------------------

    def start_kicker(self) -> None:
        """A thread that kicks the vCPU whose fd a signal handler wrote to the pipe (interpose.c)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self.lib.gm_set_kick_fd(w)
        threading.Thread(target=self._kicker, args=(r,), name="guestmem-devkvm-kicker", daemon=True).start()

    def _kicker(self, r: int) -> None:
        while True:
            data = os.read(r, 4)
            if len(data) < 4:
                return
            f = self._files.get(int.from_bytes(data, "little"))
            if f is not None and f.kind == "vcpu":
                try:
                    f.obj.kick()  # a running KVM_RUN returns EINTR (KVM_EXIT_INTR), as after a signal
                except OSError:
                    pass  # closed meanwhile

    # --- fds ---------------------------------------------------------------------------------

    def _install(self, obj: Any, kind: str) -> int:
        fd = obj.fileno()
        f = _File(obj, kind)
        with self._lock:
            f.fds.add(fd)
            self._files[fd] = f
        self.lib.gm_set_owned(fd, 1)
        return fd

    def _file(self, fd: int) -> _File:
        f = self._files.get(fd)
        if f is None:
            raise oserror(errno.EBADF, f"fd {fd} is not a model fd")
        return f

    def open(self, path: str, flags: int) -> int:
        from .. import model

        if flags & os.O_ACCMODE not in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY):
            raise oserror(errno.EINVAL, f"open({path}) flags {flags:#x}")
        return self._install(model.open_system(self.profile), "system")

    def close(self, fd: int) -> int:
        """close(2). The last fd of a file closes the model object; an earlier close of a
        dup closes that descriptor. An earlier close of the object's own fd only hides the
        number from the program (the model object keeps its descriptor until the last close)."""
        with self._lock:
            f = self._file(fd)
            self.lib.gm_set_owned(fd, 0)
            del self._files[fd]
            f.fds.discard(fd)
            last = not f.fds
        own = _obj_fd(f.obj)
        if fd != own:
            os.close(fd)
        if last:
            f.obj.close()
            if f.run is not None:
                f.run.close()
        return 0

    def dup(self, fd: int, newfd: int = -1, flags: int = 0) -> int:
        f = self._file(fd)
        if newfd >= 0 and newfd in self._files:
            self.close(newfd)
        if newfd < 0:
            new = os.dup(fd)
        else:
            new = os.dup2(fd, newfd, inheritable=not flags & os.O_CLOEXEC)
        with self._lock:
            f.fds.add(new)
            self._files[new] = f
        self.lib.gm_set_owned(new, 1)
        return new

    # --- ioctls that create fds ----------------------------------------------------------------

    def _create_vm(self, f: _File, arg: int) -> int:
        return self._install(f.obj.create_vm(arg), "vm")

    def _create_vcpu(self, f: _File, arg: int) -> int:
        vcpu = f.obj.create_vcpu(arg)
        fd = self._install(vcpu, "vcpu")
        self._files[fd].run = _RunPage(uapi.KVM_VCPU_MMAP_PAGES * uapi.PAGE_SIZE)  # KVM_GET_VCPU_MMAP_SIZE
        return fd

    def _create_guest_memfd(self, f: _File, arg: int) -> int:
        s = struct_at(uapi.kvm_create_guest_memfd, arg)
        gmem = f.obj.create_guest_memfd(s.size, s.flags, list(s.reserved))
        return self._install(gmem, "gmem")

    # --- KVM_RUN -------------------------------------------------------------------------------

    def _run(self, f: _File, arg: int) -> int:
        """KVM_RUN: the sync-regs area in, the pending exit's answer in, run, the exit out.

        As kvm_arch_vcpu_ioctl_run: EINVAL for kvm_valid_regs/kvm_dirty_regs bits outside
        KVM_SYNC_X86_VALID_FIELDS; the dirty parts of ``kvm_run.s.regs`` are loaded (each bit
        cleared once loaded) before the pending I/O completes; on the way out, success or
        not, the parts ``kvm_valid_regs`` asks for are stored."""
        vcpu, run = f.obj, f.run.run
        try:
            if (run.kvm_valid_regs | run.kvm_dirty_regs) & ~uapi.KVM_SYNC_X86_VALID_FIELDS:
                raise oserror(errno.EINVAL, f"kvm_run sync regs: valid {run.kvm_valid_regs:#x} dirty "
                                            f"{run.kvm_dirty_regs:#x} outside {uapi.KVM_SYNC_X86_VALID_FIELDS:#x}")
            if run.kvm_dirty_regs:
                handlers.load_sync_regs(vcpu, run)
            return self._complete_and_run(f)
        finally:
            if run.kvm_valid_regs:
                handlers.store_sync_regs(vcpu, run)

    def _complete_and_run(self, f: _File) -> int:
        vcpu, page = f.obj, f.run
        run = page.run
        p, page.pending = page.pending, None
        if isinstance(p, IoExit) and p.direction == uapi.IoDirection.IN:
            vcpu.complete_io(ctypes.string_at(page.address + run.exit.io.data_offset, p.size * p.count))
        elif isinstance(p, MmioExit) and not p.is_write:
            vcpu.complete_mmio(bytes(run.exit.mmio.data)[:p.len])
        elif isinstance(p, HypercallExit):
            vcpu.set_hypercall_ret(run.exit.hypercall.ret)
        if f.sigmask is not None:
            old = signal.pthread_sigmask(signal.SIG_SETMASK, f.sigmask)
            try:
                return self._run_masked(vcpu, page, run)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return self._run_masked(vcpu, page, run)

    def _run_masked(self, vcpu: Any, page: "_RunPage", run: Any) -> int:
        if run.immediate_exit:
            # The pending exit completes, then KVM_RUN fails with EINTR and leaves
            # exit_reason alone (kvm_arch_vcpu_ioctl_run, measured on the host).
            vcpu.kick()
            ex = vcpu.run()
            if isinstance(ex, IntrExit):
                return -errno.EINTR
        else:
            ex = vcpu.run()
        return put_exit(page, ex)

    # --- other file operations ------------------------------------------------------------------

    def mmap(self, f: _File, addr: int, length: int, prot: int, flags: int, offset: int) -> int:
        if f.kind == "vcpu":
            if offset % uapi.PAGE_SIZE or length == 0:
                raise oserror(errno.EINVAL, f"mmap of a vCPU fd: offset {offset:#x} length {length:#x}")
            return hostmem.mmap(length, prot, flags, f.run.memfd, offset, addr)
        if f.kind != "gmem":
            raise oserror(errno.ENODEV, f"mmap of a KVM {f.kind} fd")
        m = f.obj.mmap(length, offset, prot, flags)
        if addr and flags & hostmem.MAP_FIXED:
            moved = _mremap_fixed(m.address, length, addr)
            m.address = moved
        with self._lock:
            self._maps[m.address] = m
        self.lib.gm_add_maps(1)
        return m.address

    def munmap(self, addr: int, length: int) -> int:
        with self._lock:
            m = self._maps.get(addr)
            if m is None or length < m.length:
                return PASS
            del self._maps[addr]
        self.lib.gm_add_maps(-1)
        m.close()
        return 0

    def fstat(self, f: _File, buf: int) -> int:
        if f.kind != "gmem":
            return PASS
        st = f.obj.fstat()
        s = struct_at(uapi.stat, buf)
        ctypes.memset(buf, 0, ctypes.sizeof(uapi.stat))
        for name in ("st_mode", "st_ino", "st_size", "st_blksize", "st_blocks", "st_nlink", "st_uid", "st_gid"):
            setattr(s, name, getattr(st, name))
        s.st_mtime, s.st_mtime_nsec = divmod(st.st_mtime_ns, 10**9)
        s.st_ctime, s.st_ctime_nsec = divmod(st.st_ctime_ns, 10**9)
        s.st_atime, s.st_atime_nsec = s.st_mtime, s.st_mtime_nsec
        return 0

    def fileop(self, op: int, f: _File, a: int, b: int, c: int) -> int:
        if f.kind != "gmem":
            # /dev/kvm, VM and vCPU files have no read/write/llseek-able contents
            if op in (LSEEK,):
                return 0
            raise oserror(errno.EINVAL, f"{OP_NAMES[op]} on a KVM {f.kind} fd")
        g = f.obj
        if op == FALLOCATE:
            g.fallocate(s32(a), s64(b), s64(c))
            return 0
        if op == READ:
            return len(g.read(b))
        if op == WRITE:
            return g.write(ctypes.string_at(a, b))
        if op == PREAD:
            return len(g.pread(b, s64(c)))
        if op == PWRITE:
            return g.pwrite(ctypes.string_at(a, b), s64(c))
        if op == LSEEK:
            return g.lseek(s64(a), s32(b))
        if op == FTRUNCATE:
            g.truncate(s64(a))
            return 0
        raise oserror(errno.EINVAL, f"operation {op}")

    # --- dispatch ------------------------------------------------------------------------------

    def call(self, op: int, fd: int, a: int, b: int, c: int, d: int, e: int) -> int:
        if op == MUNMAP:
            return self.munmap(a, b)
        f = self._file(fd)
        if op == IOCTL:
            handler = self._ioctls[f.kind].get(a)
            if handler is None:
                raise oserror(_UNKNOWN_IOCTL_ERRNO[f.kind], f"ioctl {a:#x} on a model {f.kind} fd")
            return handler(f, b)
        if op == MMAP:
            return self.mmap(f, a, b, c, d, e)
        if op == FSTAT:
            return self.fstat(f, a)
        if op == CLOSE:
            return self.close(fd)
        if op == DUP:
            return self.dup(fd)
        if op == DUP3:
            return self.dup(fd, s32(a), b)
        return self.fileop(op, f, a, b, c)

    def trace(self, op: int, fd: int, args: tuple[int, ...], result: int, t0: float, detail: str = "") -> None:
        if op == IOCTL:
            what = f"ioctl({fd}, {_IOCTL_NAMES.get(args[0], hex(args[0]))}, {args[1]:#x})"
        elif op == 0:
            what = f"open({detail!r})"
        else:
            what = f"{OP_NAMES[op]}({fd}, {', '.join(hex(a) for a in args[:3])})"
        res = f"-1 {errno.errorcode.get(-result, -result)}" if -4096 < result < 0 else str(result)
        self._trace.write(f"{time.time():.6f} tid={threading.get_native_id()} {what} = {res} "
                          f"({(time.perf_counter() - t0) * 1e6:.1f} us)\n")


# --- fds inside structs --------------------------------------------------------------------------


def _obj_fd(obj: Any) -> int | None:
    try:
        return obj.fileno()
    except OSError:
        return None


def _set_user_memory_region2(f: _File, addr: int) -> int:
    s = struct_at(uapi.kvm_userspace_memory_region2, addr)
    f.obj.set_user_memory_region2(s.slot, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr,
                                  _model_fd(s.guest_memfd), s.guest_memfd_offset, s.pad1, list(s.pad2))
    return 0


def _model_fd(fd: int) -> int:
    """The fd by which the model knows the file the program's ``fd`` refers to.

    A dup of a model fd is another number for the same file; the model names each file by
    its own descriptor, so a struct field holding a dup is translated (any other value,
    including fds that are not the model's, reaches the model unchanged)."""
    f = _server._files.get(fd) if _server is not None else None
    if f is None:
        return fd
    own = _obj_fd(f.obj)
    return fd if own is None else own


def _mremap_fixed(old: int, length: int, new: int) -> int:
    r = hostmem.libc.mremap(old, length, length, hostmem.MREMAP_MAYMOVE | hostmem.MREMAP_FIXED, new)
    if r in (None, hostmem.MAP_FAILED):
        raise oserror(ctypes.get_errno(), f"mremap to {new:#x}")
    return r


# --- entry points (called by the native library's embedded interpreter) ----------------------

_server: Server | None = None


def attach(lib: Any) -> None:
    """Create the process's server; the native library calls this once, at start-up."""
    global _server
    from ..model.profile import DEFAULT_PROFILE

    _server = Server(lib, os.environ.get("GUESTMEM_DEVKVM_PROFILE") or DEFAULT_PROFILE,
                     os.environ.get("GUESTMEM_DEVKVM_TRACE") or None)
    _server.start_kicker()
    lib.gm_set_ready()


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    traceback.print_exc()  # a bug in the model or here: say so, and fail the call loudly
    return errno.EIO


def serve_open(path: str, flags: int) -> int:
    s = _server
    t0 = time.perf_counter()
    try:
        r = s.open(path, flags)
    except BaseException as exc:  # noqa: BLE001 - every failure must become an errno
        r = -_errno_of(exc)
    if s._trace:
        s.trace(0, -1, (), r, t0, path)
    return r


def serve(op: int, fd: int, a: int, b: int, c: int, d: int, e: int) -> int:
    s = _server
    t0 = time.perf_counter()
    try:
        r = s.call(op, fd, a, b, c, d, e)
    except BaseException as exc:  # noqa: BLE001 - every failure must become an errno
        r = -_errno_of(exc)
    if s._trace:
        s.trace(op, fd, (a, b, c), r, t0)
    return r
