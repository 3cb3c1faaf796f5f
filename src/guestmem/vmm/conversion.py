"""Shared <-> private conversions: one code path for explicit and implicit requests.

A guest asks for a conversion explicitly with KVM_HC_MAP_GPA_RANGE (spec 5.5: RBX = gpa,
RCX = npages, RDX = attrs, ENCRYPTED = to private), which reaches us as a
``HypercallExit``; or implicitly, by touching memory whose attribute does not match the
access, which reaches us as a ``MemoryFaultExit`` (spec 5.3: flags PRIVATE = make it
private). Both end in ``ConversionManager.convert``:

1. validate the range (inside one private-capable region, page aligned, no wrap);
2. KVM_SET_MEMORY_ATTRIBUTES through ``GuestMemory.set_attributes`` (map + listeners); with
   in-place conversion, KVM_SET_MEMORY_ATTRIBUTES2 on the region's guest_memfd, where an
   EAGAIN caused by the VMM's own pins releases them and retries once (counted in
   ``eagain_retries``), and one caused by anyone else fails the request (reported);
3. discard the backing the range no longer uses: punch the guest_memfd when it went
   shared, punch the shared memfd when it went private (so stale shared data cannot
   reappear and memory is not held twice); in place there is one backing and nothing to free;
4. pre-fault the new state with KVM_PRE_FAULT_MEMORY when asked and supported.

Failures never kill the VM: an explicit request gets ``-KVM_E*`` in RAX (the guest decides),
an implicit one that cannot be served is reported to the run loop, which stops.
"""

from __future__ import annotations

import dataclasses
import errno
import threading
import time
from collections import Counter

from ..interface import Vcpu
from ..types import HypercallExit, MemoryFaultExit
from ..uapi import (
    PAGE_SHIFT, PAGE_SIZE, Cap, Hypercall, KvmHypercallError, MapGpaRangeAttr, MemoryExitFlag,
)
from ..units import format_size
from .memory import GuestMemory

__all__ = ["ConversionManager", "ConversionStats"]

_U64 = (1 << 64) - 1
_KNOWN_ATTRS = int(MapGpaRangeAttr.ENCRYPTED | MapGpaRangeAttr.PAGE_SZ_2M | MapGpaRangeAttr.PAGE_SZ_1G)
_KVM_ERRNO = {
    errno.EINVAL: KvmHypercallError.EINVAL,
    errno.EPERM: KvmHypercallError.EPERM,
    errno.EFAULT: KvmHypercallError.EFAULT,
    errno.EOPNOTSUPP: KvmHypercallError.EOPNOTSUPP,
    errno.ENOTTY: KvmHypercallError.EOPNOTSUPP,
    errno.EAGAIN: KvmHypercallError.EFAULT,  # a page stays referenced: the guest cannot have it
}


@dataclasses.dataclass
class ConversionStats:
    """Counters of one ConversionManager (read them under no lock: ints and Counters)."""

    conversions: int = 0
    bytes_converted: int = 0
    explicit: int = 0
    implicit: int = 0
    failed: int = 0
    by_direction: Counter = dataclasses.field(default_factory=Counter)  # "to_private"/"to_shared"
    by_size: Counter = dataclasses.field(default_factory=Counter)  # (direction, size) -> count
    errors: Counter = dataclasses.field(default_factory=Counter)  # "KVM_EINVAL" -> count
    discarded_bytes: int = 0
    prefaulted_bytes: int = 0
    seconds: float = 0.0  # time spent converting
    eagain_retries: int = 0  # in place: conversions retried after releasing the VMM's pins
    pins_released: int = 0

    def as_dict(self) -> dict:
        return {
            "conversions": self.conversions, "bytes_converted": self.bytes_converted,
            "explicit": self.explicit, "implicit": self.implicit, "failed": self.failed,
            "by_direction": dict(self.by_direction),
            "by_size": [{"direction": d, "size": s, "label": format_size(s), "count": n}
                        for (d, s), n in sorted(self.by_size.items())],
            "errors": dict(self.errors), "discarded_bytes": self.discarded_bytes,
            "prefaulted_bytes": self.prefaulted_bytes, "seconds": self.seconds,
            "eagain_retries": self.eagain_retries, "pins_released": self.pins_released,
        }


class ConversionManager:
    """Serves MAP_GPA_RANGE and MEMORY_FAULT exits for one ``GuestMemory``.

    :param prefault: pre-fault converted ranges on the requesting vCPU
        (KVM_PRE_FAULT_MEMORY), if the VM supports it.
    :param discard: free the backing a conversion leaves unused (default True).
    """

    def __init__(self, memory: GuestMemory, *, prefault: bool = False, discard: bool = True) -> None:
        self.memory = memory
        self.discard = discard
        self.prefault = prefault and bool(memory.vm.check_extension(Cap.PRE_FAULT_MEMORY))
        self.stats = ConversionStats()
        self._stats_lock = threading.Lock()

    # --- the one code path --------------------------------------------------------------------

    def convert(self, gpa: int, size: int, private: bool, *, vcpu: Vcpu | None = None,
                explicit: bool = True) -> int:
        """Make [gpa, gpa+size) private or shared; returns 0 or a negative KVM_E* code.

        Nothing changes unless it returns 0 (a failed discard only keeps memory).

        :raises TypeError: ``gpa``/``size`` not ints, ``private`` not a bool, or (with
            prefault) a ``vcpu`` without ``pre_fault_memory``; raised before any change.
        """
        for name, value in (("gpa", gpa), ("size", size)):
            if not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not isinstance(private, bool):
            raise TypeError(f"private must be a bool, not {type(private).__name__}")
        if self.prefault and vcpu is not None and not callable(getattr(vcpu, "pre_fault_memory", None)):
            raise TypeError(f"vcpu must be a Vcpu, not {type(vcpu).__name__}")
        t0 = time.perf_counter()
        ret = self._convert(gpa, size, private, vcpu)
        with self._stats_lock:
            st = self.stats
            st.seconds += time.perf_counter() - t0
            if ret:
                st.failed += 1
                st.errors[f"KVM_{KvmHypercallError(-ret).name}"] += 1
            else:
                direction = "to_private" if private else "to_shared"
                st.conversions += 1
                st.bytes_converted += size
                st.by_direction[direction] += 1
                st.by_size[(direction, size)] += 1
                if explicit:
                    st.explicit += 1
                else:
                    st.implicit += 1
        return ret

    def _convert(self, gpa: int, size: int, private: bool, vcpu: Vcpu | None) -> int:
        mem = self.memory
        if gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE or gpa + size > _U64:
            return -KvmHypercallError.EINVAL
        if not mem.within_private_capable(gpa, size):
            return -KvmHypercallError.EINVAL
        with mem.lock:
            retries, released = mem.eagain, mem.pins_released
            try:
                mem.set_attributes(gpa, size, private)
            except OSError as exc:
                return -_KVM_ERRNO.get(exc.errno or 0, KvmHypercallError.EFAULT)
            finally:
                if mem.eagain != retries or mem.pins_released != released:
                    with self._stats_lock:
                        self.stats.eagain_retries += mem.eagain - retries
                        self.stats.pins_released += mem.pins_released - released
            if self.discard:
                # The attribute change already happened; a failed discard only keeps memory.
                try:
                    steps = mem.discard(gpa, size, private)
                except OSError:
                    steps = []
                with self._stats_lock:
                    self.stats.discarded_bytes += sum(n for _, _, n in steps)
        if self.prefault and vcpu is not None:
            self._prefault(vcpu, gpa, size)
        return 0

    def _prefault(self, vcpu: Vcpu, gpa: int, size: int) -> None:
        # Each call either makes progress or fails without any (spec 7.5); EINTR retries.
        start, end = gpa, gpa + size
        while gpa < end:
            try:
                gpa, _ = vcpu.pre_fault_memory(gpa, end - gpa)
            except InterruptedError:
                continue
            except OSError:
                break  # optional: the guest faults the rest in itself
        with self._stats_lock:
            self.stats.prefaulted_bytes += gpa - start

    # --- exits ----------------------------------------------------------------------------------

    def handle_hypercall(self, vcpu: Vcpu, exit: HypercallExit) -> int:
        """Serve a KVM_EXIT_HYPERCALL; the result goes to the guest's RAX. Returns it."""
        if exit.nr != Hypercall.MAP_GPA_RANGE:
            ret = -KvmHypercallError.ENOSYS
        else:
            gpa, npages, attrs = exit.args[0], exit.args[1], exit.args[2]
            if attrs & ~_KNOWN_ATTRS or npages == 0 or npages > (_U64 >> PAGE_SHIFT):
                ret = -KvmHypercallError.EINVAL
            else:
                ret = self.convert(gpa, npages << PAGE_SHIFT, bool(attrs & MapGpaRangeAttr.ENCRYPTED),
                                   vcpu=vcpu, explicit=True)
        vcpu.set_hypercall_ret(ret & _U64)
        return ret

    def handle_memory_fault(self, vcpu: Vcpu, exit: MemoryFaultExit) -> bool:
        """Serve a KVM_EXIT_MEMORY_FAULT by converting to the faulting access's kind.

        Returns False when it cannot be served (hwpoison, or memory that is not
        private-capable): the run loop then stops with an error.
        """
        if exit.errno != errno.EFAULT:
            return False
        private = bool(exit.flags & MemoryExitFlag.PRIVATE)
        return self.convert(exit.gpa, exit.size, private, vcpu=vcpu, explicit=False) == 0
