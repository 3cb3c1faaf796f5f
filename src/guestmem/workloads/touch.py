"""Host half of the ``touch`` workload (guest code: touch.S).

Layout: the boot region and one shared-only ``data`` region at 4 GiB (a guest_memfd with
MMAP|INIT_SHARED where the VM supports it, else a memfd), one slice per vCPU. Needs no
private memory, so it runs on the real kernel too; the guest runs at CPL3, which this
host executes natively. Afterwards the host checks, through its shared view, that every
page was populated (mincore) and holds the address the guest wrote.
"""

from __future__ import annotations

from array import array
import threading

from ..guest import PORT_SYNC
from ..uapi import PAGE_SIZE, IoDirection
from ..vmm.layout import Region
from ..vmm.runloop import Outcome
from . import source

DATA_GPA = 1 << 32
CHUNK = 2 << 20


class Touch:
    name = "touch"
    summary = "first-touch population of all guest memory (CPL3; runs on the real kernel)"
    needs_private = False
    default_memory = 256 << 20

    def __init__(self) -> None:
        self.vcpus = 0
        self.slice = 0
        self.done = 0
        self.total = 0
        self.populated = 0
        self.mismatches = 0
        self._lock = threading.Lock()

    def regions(self, vcpus: int, memory: int) -> list[Region]:
        self.vcpus = vcpus
        self.slice = (memory // vcpus) // PAGE_SIZE * PAGE_SIZE
        if self.slice < PAGE_SIZE:
            raise ValueError(f"touch needs at least one page per vCPU; {memory} bytes for {vcpus} vCPUs is too little")
        self.total = vcpus * -(-self.slice // CHUNK)
        return [Region("data", DATA_GPA, self.slice * vcpus)]

    def setup(self, machine) -> None:  # noqa: ANN001 - a vmm Machine
        self.memory = machine.memory
        regs = [{"rsi": DATA_GPA + i * self.slice, "rdx": self.slice} for i in range(self.vcpus)]
        machine.load_assembly(source(self.name), cpl=3, regs=regs)
        machine.io_handlers[PORT_SYNC] = self.on_sync

    def on_sync(self, vcpu, exit) -> Outcome:  # noqa: ANN001
        if exit.direction == IoDirection.OUT:
            with self._lock:
                self.done += 1
        else:
            vcpu.complete_io(bytes(exit.size))
        return Outcome.HANDLED

    def finish(self) -> None:
        """Check every page: resident in the host's view and holding its own guest address."""
        runs = self.memory.populated("data")
        self.populated = sum(e - s for s, e in runs)
        size = self.slice * self.vcpus
        view = self.memory.shared_mapping("data").buffer()
        # Page p's first qword must be DATA_GPA + p * 4096: compare a strided view of the
        # heads with the expected array per 2 MiB chunk (C loops; Python only on a mismatch).
        bad = 0
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off) // PAGE_SIZE
            got = view[off:off + n * PAGE_SIZE].cast("Q")[::PAGE_SIZE // 8]
            expect = array("Q", range(DATA_GPA + off, DATA_GPA + off + n * PAGE_SIZE, PAGE_SIZE))
            if got.tobytes() != expect.tobytes():
                bad += sum(1 for a, b in zip(got, expect) if a != b)
            got.release()
        view.release()
        self.mismatches = bad

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.done == self.total and self.populated >= self.slice * self.vcpus

    def results(self) -> dict:
        return {"bytes_touched": self.slice * self.vcpus, "bytes_populated": self.populated,
                "chunks_done": self.done, "mismatches": self.mismatches}
