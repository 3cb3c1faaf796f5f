"""``run_workload``: the library side of ``guestmem run``.

Picks the backend (the kernel when it can do everything the workload needs, else the
model), builds a Machine with the workload's layout, runs it, and returns a ``RunResult``
with everything the report shows: exits by reason, conversions by direction and size,
the workload's own checks and the final memory map.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import guestmem

from ..choose import kernel_private_memory
from ..errors import oserror
from ..rangemap import RangeMap
from ..uapi import Cap, MemoryAttribute
from ..units import format_size
from .machine import Machine, boot_region
from .layout import LAYOUTS, MAX_GPA

__all__ = ["RunResult", "choose_backend", "run_workload", "parse_size", "memory_map"]

BACKENDS = ("auto", "model", "kvm")


def parse_size(text: str) -> int:
    """``64M``, ``1.5G``, ``4096``, ``2MiB`` -> bytes (exact decimal arithmetic, rounded down).

    :raises ValueError: unparsable text, a value that is not finite, or a size below one byte.
    """
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in units:
            value = Decimal(t[:-1]) * units[t[-1]]
        else:
            value = Decimal(int(t, 0))
    except (ValueError, ArithmeticError):
        raise ValueError(f"cannot parse size {text!r} (use e.g. 64M, 1G, 4096)") from None
    if not value.is_finite():
        raise ValueError(f"size {text!r} is not a finite number of bytes")
    if value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def _size_text(size: int) -> str:
    return format_size(size) if size < 1 << 60 else f"{Decimal(size):.3e} bytes"


def choose_backend(requested: str, workload: Any) -> tuple[str, str]:
    """``(backend, reason)`` for ``requested`` ("auto", "model" or "kvm") and ``workload``.

    :raises OSError: ENODEV (no usable /dev/kvm) or EOPNOTSUPP (the kernel lacks what the
        workload needs) when "kvm" was requested; the message is one line.
    :raises ValueError: an unknown backend name.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "model":
        return "model", "requested with --backend model"
    ok, why = guestmem.kvm_available()
    if not ok:
        if requested == "kvm":
            raise oserror(errno.ENODEV, f"the kvm backend is unavailable: {why}")
        return "model", f"no usable KVM ({why})"
    if not workload.needs_private:
        return "kvm", ("requested with --backend kvm" if requested == "kvm"
                       else f"the kernel can run {workload.name!r} (it needs no private memory)")
    with guestmem.open_system("kvm") as system:
        ok, why = kernel_private_memory(system)
    if ok:
        return "kvm", why
    if requested == "kvm":
        raise oserror(errno.EOPNOTSUPP, f"workload {workload.name!r} needs private memory, but {why}; "
                                        "use --backend model")
    return "model", f"{workload.name!r} needs private memory, but {why}"


@dataclasses.dataclass
class RunResult:
    """Everything ``guestmem run`` reports (``as_dict`` is the --json output)."""

    workload: str
    backend: str
    backend_reason: str
    vcpus: int
    memory: int
    ok: bool
    wall_time: float
    exits: dict[str, int]
    conversions: dict[str, Any]
    workload_results: dict[str, Any]
    memory_map: list[dict[str, Any]]
    console: str = ""
    interrupted: bool = False
    conversion: str = ""
    """Layout of private-capable memory: "in-place" or "two-backings"."""
    host_memory: dict[str, int] = dataclasses.field(default_factory=dict)
    """At the end of the run: rss_anon + memfd + guest_memfd bytes = total (GuestMemory.host_memory)."""
    host_memory_peak: int = 0
    """The largest ``total`` sampled while the guest ran (every poll interval, and at the end)."""

    @property
    def conversions_per_second(self) -> float:
        return self.conversions["conversions"] / self.wall_time if self.wall_time else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conversions_per_second"] = self.conversions_per_second
        return d


def memory_map(machine: Machine) -> list[dict[str, Any]]:
    """Per region: ``{name, gpa, size, backing, segments: [(gpa, end, kind)]}``.

    kind is "private" (attribute PRIVATE), "allocated" (shared, resident in the host's
    view) or "shared" (shared, not populated).
    """
    mem = machine.memory
    assert mem is not None
    snap = mem.snapshot()
    out = []
    for region, backing in zip(snap.regions, snap.backings):
        kinds: RangeMap[str] = RangeMap(default="shared")
        for s, e in mem.populated(region.name):
            kinds.set(s, e, "allocated")
        for s, e in snap.private_ranges(region.gpa, region.end):
            kinds.set(s, e, "private")
        out.append({"name": region.name, "gpa": region.gpa, "size": region.size, "backing": backing,
                    "private_capable": region.private,
                    "segments": [[s, e, k] for s, e, k in kinds.ranges(region.gpa, region.end)]})
    return out


def _open_system(backend: str, conversion: str) -> Any:
    """The backend's System; in-place conversion on the model is the "next" profile."""
    if backend == "model" and conversion == "in-place":
        return guestmem.open_system("model", profile="next")
    return guestmem.open_system(backend)


def _kernel_in_place() -> tuple[bool, str]:
    with guestmem.open_system("kvm") as system:
        if system.check_extension(Cap.GUEST_MEMFD_MEMORY_ATTRIBUTES) & MemoryAttribute.PRIVATE:
            return True, "the kernel has in-place conversion"
    return False, "the kernel has no in-place conversion (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES is 0)"


def run_workload(work: Any, *, backend: str = "auto", vcpus: int = 2,
                 memory: int | None = None, progress: Callable[[int, int], None] | None = None,
                 on_backend: Callable[[str, str], None] | None = None,
                 timeout: float | None = None,
                 conversion: str = "auto") -> RunResult:
    """Run workload ``work`` and return its result.

    ``work`` is a fresh workload object (``guestmem.workloads.get(name)`` for a bundled one):
    it declares ``name``, ``needs_private``, ``default_memory`` and ``regions()``, loads itself
    with ``setup(machine)`` and reports ``ok``/``results()``. The vmm layer runs it without
    knowing which workloads exist (they are built on top of it).

    :param conversion: "in-place" (one guest_memfd per private-capable region; on the model
        this selects profile "next"), "two-backings" (guest_memfd + shared memfd) or "auto"
        (in-place where the chosen system offers it: a kernel with the in-place series).

    :param progress: called as ``progress(done, total)`` while the guest runs.
    :param on_backend: called once with ``(backend, reason)`` before the VM starts.
    :raises OSError: the chosen backend cannot run the workload (see ``choose_backend``), or
        a backend error while building the VM.
    :raises ValueError: unknown workload/backend, or a memory size the workload cannot use.
    """
    if vcpus < 1:
        raise ValueError(f"--vcpus must be at least 1, not {vcpus}")
    if conversion not in LAYOUTS:
        raise ValueError(f"unknown conversion layout {conversion!r}: choose one of {', '.join(LAYOUTS)}")
    size, regions = _memory_regions(work, vcpus, memory)
    chosen, reason = _backend_for(backend, work, conversion)
    if on_backend is not None:
        on_backend(chosen, reason)
    with _open_system(chosen, conversion) as system:
        with Machine(system, regions, vcpus=vcpus, conversion=conversion) as machine:
            work.setup(machine)
            return _run_machine(machine, work, progress, timeout,
                                dict(workload=work.name, backend=chosen, backend_reason=reason, vcpus=vcpus,
                                     memory=size))


def _memory_regions(work: Any, vcpus: int, memory: int | None) -> tuple[int, list]:
    """The guest memory size and regions (boot region first) of ``work`` on ``vcpus`` vCPUs.

    :raises ValueError: a region would end past what any backend can map.
    """
    # Without --memory, the default grows with the vCPUs so that every vCPU gets its minimum.
    size = max(work.default_memory, vcpus * getattr(work, "memory_per_vcpu", 0)) if memory is None else memory
    regions = [boot_region(), *work.regions(vcpus, size)]
    for r in regions:  # before the backend is chosen: a size no backend can map fails at once
        if r.end > MAX_GPA:
            raise ValueError(f"--memory {_size_text(size)} is more than any backend can map: region {r.name!r} at "
                             f"{r.gpa:#x} would end past {MAX_GPA:#x} (x86-64 guest physical addresses have 52 "
                             f"bits); --memory can be at most {MAX_GPA - r.gpa} bytes (2**52 - {format_size(r.gpa)})")
    return size, regions


def _backend_for(backend: str, work: Any, conversion: str) -> tuple[str, str]:
    """``choose_backend``, then the conversion layout's say: in-place falls back to the model
    when the kernel lacks it (an error if kvm was asked for by name)."""
    chosen, reason = choose_backend(backend, work)
    if conversion == "in-place" and chosen == "kvm":
        ok, why = _kernel_in_place()
        if not ok:
            if backend == "kvm":
                raise oserror(errno.EOPNOTSUPP, f"--conversion in-place: {why}; use --backend model")
            chosen, reason = "model", f"--conversion in-place: {why}"
    if chosen == "model" and conversion == "in-place":
        reason += "; profile next (in-place conversion series v8)"
    return chosen, reason


def _run_machine(machine: Machine, work: Any, progress: Callable[[int, int], None] | None,
                 timeout: float | None, fields: dict) -> RunResult:
    """Run the loaded machine to the end (or Ctrl-C), tracking peak host memory; the result
    carries ``fields`` (what the run was asked for) and what the run measured."""
    interrupted = False
    mem = machine.memory
    assert mem is not None
    peak = [0]

    def poll() -> None:
        peak[0] = max(peak[0], mem.host_memory()["total"])
        if progress is not None:
            progress(work.done, work.total)

    t0 = time.perf_counter()
    try:
        machine.run(poll=poll, timeout=timeout)
    except KeyboardInterrupt:
        interrupted = True
    wall = time.perf_counter() - t0
    poll()
    used = mem.host_memory()
    if hasattr(work, "finish") and not interrupted:
        work.finish()
    return RunResult(
        **fields, ok=bool(work.ok) and not interrupted, wall_time=wall, exits=dict(machine.exits),
        conversions=machine.conversions.stats.as_dict(), workload_results=work.results(),
        memory_map=memory_map(machine), console=machine.console.decode(errors="replace"),
        interrupted=interrupted, conversion=mem.conversion, host_memory=used,
        host_memory_peak=max(peak[0], used["total"]),
    )
