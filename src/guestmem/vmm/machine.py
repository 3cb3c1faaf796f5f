"""``Machine``: a VM with its guest memory, conversion manager and N vCPU threads.

The machine composes the backend objects (it never wraps them): ``machine.vm`` and
``machine.vcpus`` are the backend's own ``Vm``/``Vcpu``. ``load_*`` put a guest into memory
and the vCPUs' registers; ``run()`` starts one thread per vCPU, each running a ``RunLoop``,
and waits. The first error in any thread stops every vCPU (``Vcpu.kick``) and is re-raised
in the caller; so is Ctrl-C (KeyboardInterrupt in the waiting thread), after every vCPU has
stopped.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from .. import guest as gguest
from ..interface import System, Vcpu
from ..types import Exit
from ..uapi import Cap, Hypercall, VmType
from .conversion import ConversionManager
from .layout import Region
from .memory import GuestMemory
from .runloop import Outcome, RunLoop, exit_name

__all__ = ["Machine", "boot_region"]

IoHandler = Callable[[Vcpu, Any], Outcome]
BOOT_SIZE = 2 << 20
STACK_SIZE = 0x4000


def boot_region(size: int = BOOT_SIZE) -> Region:
    """The shared-only region at GPA 0 holding descriptor tables, page tables, code and stacks."""
    return Region("boot", 0, size)


class Machine:
    """A VM built from ``regions`` on ``system`` with ``vcpus`` vCPUs.

    :param vm_type: KVM_CREATE_VM type; default SW_PROTECTED when a region is
        private-capable, else DEFAULT.
    :param prefault: pre-fault converted ranges (see ConversionManager).
    :param conversion: layout of private-capable regions: "in-place", "two-backings" or
        "auto" (see GuestMemory).
    """

    def __init__(self, system: System, regions: Iterable[Region], *, vcpus: int = 1,
                 vm_type: int | None = None, prefault: bool = False, conversion: str = "auto") -> None:
        regions = tuple(regions)
        if vcpus < 1:
            raise ValueError(f"a machine needs at least one vCPU, not {vcpus}")
        if vm_type is None:
            vm_type = VmType.SW_PROTECTED if any(r.private for r in regions) else VmType.DEFAULT
        self.system = system
        self.vm = system.create_vm(int(vm_type))
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        try:
            self.memory = GuestMemory(self.vm, regions, conversion=conversion)
            if self.memory.has_private and self.vm.check_extension(Cap.EXIT_HYPERCALL) & (1 << Hypercall.MAP_GPA_RANGE):
                self.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << Hypercall.MAP_GPA_RANGE)
            self.conversions = ConversionManager(self.memory, prefault=prefault)
            self.vcpus = [self.vm.create_vcpu(i) for i in range(vcpus)]
        except BaseException:
            self.close()
            raise
        self.io_handlers: dict[int, IoHandler] = {}
        self.exits: Counter = Counter()
        self._exits_lock = threading.Lock()
        self.console = bytearray()
        self.on_console: Callable[[bytes], None] | None = None
        self.loops: list[RunLoop] = []
        self.stopping = False
        self.error: BaseException | None = None
        self.wall_time = 0.0
        self.image: gguest.GuestImage | None = None

    # --- loading --------------------------------------------------------------------------------

    def load_image(self, image: gguest.GuestImage, regs: Iterable[dict[str, int]] = ()) -> None:
        """Write ``image`` into guest memory and start every vCPU at its entry.

        ``regs`` gives per-vCPU register overrides (``{"rdi": ..., "rsp": ...}``), in vCPU
        order; by default vCPU i gets its own 16 KiB stack below the image's.
        """
        assert self.memory is not None
        for gpa, data in image.chunks:
            self.memory.write(gpa, data)
        overrides = list(regs)
        for i, vcpu in enumerate(self.vcpus):
            gguest.setup_vcpu(vcpu, image)
            change = {"rsp": image.stack_top - i * STACK_SIZE, "rdi": i}
            if i < len(overrides):
                change.update(overrides[i])
            vcpu.set_regs(image.regs.replace(**change))
        self.image = image

    def load_assembly(self, code: str, *, cpl: int = 0, regs: Iterable[dict[str, int]] = (),
                      identity_map: Iterable[tuple[int, int]] | None = None) -> gguest.GuestImage:
        """Assemble 64-bit ``code`` (guestmem.guest.long_mode_guest) into the boot region.

        Every region is identity mapped; each vCPU gets its own stack and RDI = its index.
        """
        assert self.memory is not None
        boot = self.memory.regions[0]
        if identity_map is None:
            identity_map = [(r.gpa, r.size) for r in self.memory.regions[1:]]
        image = gguest.long_mode_guest(code, memory_base=boot.gpa, memory_size=boot.size, cpl=cpl,
                                       identity_map=identity_map)
        self._check_stacks(image)
        self.load_image(image, regs)
        return image

    def load_binary(self, data: bytes, *, cpl: int = 0, regs: Iterable[dict[str, int]] = ()) -> gguest.GuestImage:
        """Run flat 64-bit machine code ``data`` (position independent or linked at the entry)."""
        probe = gguest.long_mode_guest("", memory_base=self.memory.regions[0].gpa,  # type: ignore[union-attr]
                                       memory_size=self.memory.regions[0].size, cpl=cpl,  # type: ignore[union-attr]
                                       identity_map=[(r.gpa, r.size) for r in self.memory.regions[1:]])  # type: ignore[union-attr]
        tail = gguest.assemble(f"gm_end: out {gguest.PORT_DONE}, eax; jmp gm_end", probe.code_gpa + len(data))
        chunks = tuple(c for c in probe.chunks if c[0] != probe.code_gpa) + ((probe.code_gpa, data + tail),)
        image = dataclasses.replace(probe, chunks=chunks)
        self._check_stacks(image)
        self.load_image(image, regs)
        return image

    def _check_stacks(self, image: gguest.GuestImage) -> None:
        code_end = max(gpa + len(data) for gpa, data in image.chunks)
        lowest = image.stack_top - (len(self.vcpus) + 1) * STACK_SIZE
        if code_end > lowest:
            raise ValueError(f"the boot region is too small for the guest and {len(self.vcpus)} stacks")

    # --- running --------------------------------------------------------------------------------

    def count_exit(self, exit: Exit) -> None:
        name = exit_name(exit)
        with self._exits_lock:
            self.exits[name] += 1

    def console_write(self, data: bytes) -> None:
        self.console += data
        if self.on_console is not None:
            self.on_console(data)

    def fail(self, exc: BaseException) -> None:
        """Record a vCPU thread's error (the first one wins: later ones follow from the stop)."""
        with self._exits_lock:
            if self.error is None:
                self.error = exc
        self.stop()

    def stop(self) -> None:
        """Ask every vCPU to stop (kick): used on errors, Ctrl-C and by workloads."""
        self.stopping = True
        for vcpu in self.vcpus:
            try:
                vcpu.kick()
            except OSError:
                pass

    def run(self, *, poll: Callable[[], None] | None = None, interval: float = 0.1,
            timeout: float | None = None) -> list[RunLoop]:
        """Run every vCPU on its own thread until all stop; returns the run loops.

        ``poll`` is called every ``interval`` seconds from the calling thread (progress bars).

        :raises: the first vCPU thread's error; KeyboardInterrupt after stopping every vCPU;
            TimeoutError after ``timeout`` seconds.
        """
        self.stopping = False
        self.error = None
        self.loops = [RunLoop(self, v) for v in self.vcpus]
        threads = [threading.Thread(target=loop.run, name=f"vcpu{loop.vcpu.vcpu_id}", daemon=True)
                   for loop in self.loops]
        t0 = time.perf_counter()
        try:
            # Starting is inside the try: a Ctrl-C between two starts must stop the started ones.
            for t in threads:
                t.start()
            while True:
                alive = [t for t in threads if t.is_alive()]
                if not alive:
                    break
                alive[0].join(interval)
                if poll is not None:
                    poll()
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    self.stop()
                    for t in threads:
                        t.join()
                    raise TimeoutError(f"the guest did not finish within {timeout} s")
        except KeyboardInterrupt:
            self.stop()
            for t in threads:
                if t.ident is not None:  # started
                    t.join()
            raise
        finally:
            self.wall_time = time.perf_counter() - t0
        if self.error is not None:
            raise self.error
        return self.loops

    # --- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.memory is not None:
            self.memory.close()
        self.vm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
