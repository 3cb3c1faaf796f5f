"""One vCPU's run loop: KVM_RUN, then ``handle_exit()``, until an exit stops it.

``handle_exit`` is the single dispatcher (Firecracker's vstate): every exit type maps to
HANDLED (run again) or STOPPED (this vCPU is done). The host <-> guest port convention is
``guestmem.guest``'s: PORT_CONSOLE text, PORT_DONE result, PORT_FAIL failure; every other
port goes to the machine's I/O handlers (workloads use PORT_SYNC).

EINTR: ``Vcpu.run`` reports a signal or ``kick()`` as ``IntrExit``. It stops the loop only
when the machine is stopping (Ctrl-C, another vCPU failed); otherwise it was spurious and the
vCPU runs again.
"""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING

from ..guest import PORT_CONSOLE, PORT_DONE, PORT_FAIL
from ..interface import Vcpu
from ..types import (
    Exit, FailEntryExit, HltExit, HypercallExit, InternalErrorExit, IntrExit, IoExit, MemoryFaultExit,
    MmioExit, ShutdownExit, UnknownExit,
)
from ..uapi import IoDirection

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["Outcome", "RunLoop", "GuestError", "exit_name"]


class Outcome(enum.Enum):
    HANDLED = "handled"
    STOPPED = "stopped"


class GuestError(RuntimeError):
    """The guest stopped in a way the VMM cannot continue from (fault, shutdown, bad exit)."""


_NAMES = {
    IoExit: "io", MmioExit: "mmio", HltExit: "hlt", HypercallExit: "hypercall",
    MemoryFaultExit: "memory_fault", ShutdownExit: "shutdown", InternalErrorExit: "internal_error",
    FailEntryExit: "fail_entry", IntrExit: "intr", UnknownExit: "unknown",
}


def exit_name(exit: Exit) -> str:
    return _NAMES.get(type(exit), type(exit).__name__)


class RunLoop:
    """Runs ``vcpu`` of ``machine`` until it stops; ``result``/``error`` say how it ended."""

    def __init__(self, machine: "Machine", vcpu: Vcpu) -> None:
        self.machine = machine
        self.vcpu = vcpu
        self.result: int | None = None  # PORT_DONE value
        self.error: BaseException | None = None
        self.halted = False

    def run(self) -> None:
        vcpu, handle = self.vcpu, self.handle_exit
        try:
            while handle(vcpu.run()) is Outcome.HANDLED:
                pass
        except BaseException as exc:  # reported to the caller of Machine.run
            self.error = exc
            self.machine.fail(exc)

    def handle_exit(self, exit: Exit) -> Outcome:
        m = self.machine
        m.count_exit(exit)
        if isinstance(exit, IoExit):
            return self._io(exit)
        if isinstance(exit, HypercallExit):
            m.conversions.handle_hypercall(self.vcpu, exit)
            return Outcome.HANDLED
        if isinstance(exit, MemoryFaultExit):
            if m.conversions.handle_memory_fault(self.vcpu, exit):
                return Outcome.HANDLED
            kind = "private" if exit.flags else "shared"
            raise GuestError(f"vcpu {self.vcpu.vcpu_id}: unserviceable {kind} memory fault at gpa {exit.gpa:#x} "
                             f"({errno.errorcode.get(exit.errno, exit.errno)})")
        if isinstance(exit, IntrExit):
            return Outcome.STOPPED if m.stopping else Outcome.HANDLED
        if isinstance(exit, HltExit):
            self.halted = True
            return Outcome.STOPPED
        if isinstance(exit, MmioExit):
            if not exit.is_write:
                self.vcpu.complete_mmio(b"\xff" * exit.len)  # no device: reads float high
            return Outcome.HANDLED
        raise GuestError(f"vcpu {self.vcpu.vcpu_id}: {exit}")

    def _io(self, exit: IoExit) -> Outcome:
        m = self.machine
        if exit.direction == IoDirection.OUT:
            if exit.port == PORT_CONSOLE:
                m.console_write(exit.data)
                return Outcome.HANDLED
            if exit.port == PORT_DONE:
                self.result = int.from_bytes(exit.data[:4], "little")
                return Outcome.STOPPED
            if exit.port == PORT_FAIL:
                r = self.vcpu.get_regs()
                raise GuestError(f"vcpu {self.vcpu.vcpu_id}: guest failure {int.from_bytes(exit.data[:4], 'little')} "
                                 f"(rdi={r.rdi:#x} rsi={r.rsi:#x} rdx={r.rdx:#x} rcx={r.rcx:#x})")
        handler = m.io_handlers.get(exit.port)
        if handler is not None:
            return handler(self.vcpu, exit)
        if exit.direction == IoDirection.IN:
            self.vcpu.complete_io(b"\xff" * (exit.size * exit.count))
        return Outcome.HANDLED
