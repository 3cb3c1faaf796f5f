"""Host half of the ``conversions`` workload (guest code: conversions.S).

Layout: the boot region at 0 and one private-capable ``data`` region at 4 GiB, split into
one slice per vCPU (a multiple of 4 MiB). The host answers the guest's PORT_SYNC requests:

- check_private: the private pattern must not appear in the host's shared view
  (a hit is a ``private_leak``; with in-place conversion the view refuses private pages,
  counted as ``private_refused``);
- check_shared: the shared view must hold exactly the guest's shared pattern
  (otherwise ``shared_lost``); then the host writes the inverted pattern, which the guest
  verifies (a failure there is a ``guest_mismatch``);
- map_failed: a MAP_GPA_RANGE returned an error;
- progress: one iteration done.
"""

from __future__ import annotations

import errno
import threading

from ..guest import PORT_SYNC
from ..vmm.layout import Region
from ..vmm.runloop import Outcome
from . import source, sync_op

DATA_GPA = 1 << 32
WINDOW = 4 << 20
OP_CHECK_PRIVATE, OP_CHECK_SHARED, OP_GUEST_MISMATCH, OP_MAP_FAILED, OP_PROGRESS = 1, 2, 3, 4, 5


class Conversions:
    name = "conversions"
    summary = "private<->shared conversions of 4 KiB, 2 MiB, 2 MiB+4 KiB with host data checks"
    needs_private = True
    default_memory = 64 << 20
    memory_per_vcpu = WINDOW

    def __init__(self, iterations: int = 16) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, not {iterations}")
        self.iterations = iterations
        self.vcpus = 0
        self.slice = 0
        self.done = 0
        self.total = 0
        self.checks = 0
        self.private_leaks = 0
        self.shared_lost = 0
        self.guest_mismatches = 0
        self.map_failures = 0
        self.private_refused = 0
        self._lock = threading.Lock()

    def regions(self, vcpus: int, memory: int) -> list[Region]:
        self.vcpus = vcpus
        self.slice = (memory // vcpus) // WINDOW * WINDOW
        if self.slice < WINDOW:
            raise ValueError(f"conversions needs at least {WINDOW >> 20} MiB of memory per vCPU; "
                             f"{memory >> 20} MiB for {vcpus} vCPUs is too little")
        self.total = self.iterations * vcpus
        return [Region("data", DATA_GPA, self.slice * vcpus, private=True)]

    def setup(self, machine) -> None:  # noqa: ANN001 - a vmm Machine
        self.memory = machine.memory
        regs = [{"rsi": DATA_GPA + i * self.slice, "rdx": self.slice, "rcx": self.iterations}
                for i in range(self.vcpus)]
        machine.load_assembly(source(self.name), cpl=0, regs=regs)
        machine.io_handlers[PORT_SYNC] = self.on_sync

    def on_sync(self, vcpu, exit) -> Outcome:  # noqa: ANN001
        op = sync_op(vcpu, exit)
        if op is None:
            return Outcome.HANDLED
        if op == OP_PROGRESS:
            with self._lock:
                self.done += 1
            return Outcome.HANDLED
        r = vcpu.get_regs()
        gpa, size, pattern = r.rdi, r.rsi, r.rdx & 0xFF
        if op == OP_CHECK_PRIVATE:
            try:
                leaked = bytes([pattern]) * 16 in self.memory.read(gpa, size)
                refused = False
            except OSError as exc:  # in place: the host view of private pages cannot be touched
                if exc.errno != errno.EFAULT:
                    raise
                leaked, refused = False, True
            with self._lock:
                self.checks += 1
                self.private_leaks += leaked
                self.private_refused += refused
        elif op == OP_CHECK_SHARED:
            lost = self.memory.read(gpa, size) != bytes([pattern]) * size
            self.memory.fill(gpa, size, pattern ^ 0xFF)
            with self._lock:
                self.checks += 1
                self.shared_lost += lost
        elif op == OP_GUEST_MISMATCH:
            with self._lock:
                self.guest_mismatches += 1
        elif op == OP_MAP_FAILED:
            with self._lock:
                self.map_failures += 1
        return Outcome.HANDLED

    @property
    def mismatches(self) -> int:
        return self.private_leaks + self.shared_lost + self.guest_mismatches

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.map_failures == 0 and self.done == self.total

    def results(self) -> dict:
        return {
            "iterations_per_vcpu": self.iterations, "iterations_done": self.done, "slice_bytes": self.slice,
            "host_checks": self.checks, "mismatches": self.mismatches, "private_leaks": self.private_leaks,
            "private_refused": self.private_refused,
            "shared_lost": self.shared_lost, "guest_mismatches": self.guest_mismatches,
            "map_failures": self.map_failures,
        }
