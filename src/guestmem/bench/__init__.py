"""guestmem's benchmarks: guestmem against the kernel and a C reference, in one run.

``run(names, quick=...)`` runs workloads and returns a ``Report``; ``run_live`` does the
same with a rich progress bar and prints each workload's rows as it finishes. Every row
states its goal and whether it was met (PASS/MISS), or why it was skipped. Ratios are
measured in the same process with interleaved samples; see ``harness`` for why.

Workloads (the CLI names):

=============  ==================================================================
exits          exit round trip: Python ``Vcpu.run`` loop vs a C KVM_RUN loop
touch          guest first touch of 1 GiB (kvm gmem at CPL3; model private/shared)
conversion     guest MAP_GPA_RANGE round trips of 4 KiB, 2 MiB, 1 GiB (VM-level and in-place)
footprint      host memory of the conversions workload: in-place vs two backings
attributes     set_memory_attributes scaling 4 KiB..1 TiB; 1 M random conversions
fileops        guest_memfd create/fallocate/punch/bind: model vs kernel
compute        a tight guest loop: MIPS per backend
=============  ==================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .harness import FAIL, MISS, PASS, SKIP, Report, Row, command_line
from .harness import run as _run
from .workloads import attributes, compute, conversion, dropin, exits, fileops, footprint, touch

__all__ = ["WORKLOADS", "run", "run_live", "Report", "Row", "PASS", "MISS", "SKIP", "FAIL"]

WORKLOADS = {
    "exits": ("exit round trip", exits.run),
    "touch": ("first touch", touch.run),
    "conversion": ("conversion round trip", conversion.run),
    "footprint": ("host memory by conversion layout", footprint.run),
    "attributes": ("attribute scaling", attributes.run),
    "fileops": ("file operations", fileops.run),
    "compute": ("guest compute", compute.run),
    "dropin": ("drop-in /dev/kvm", dropin.run),
}


def resolve(names: Iterable[str]) -> list[str]:
    """The workload names to run (all when empty); ValueError names an unknown one."""
    names = list(names)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    return names or list(WORKLOADS)


def run(names: Sequence[str] = (), quick: bool = False, command: str | None = None) -> Report:
    """Run the named workloads (all by default) without any display."""
    return _run(WORKLOADS, resolve(names), quick, command or command_line())


def run_live(names: Sequence[str] = (), quick: bool = False, command: str | None = None, console=None) -> Report:
    """Run with a rich progress bar; each workload's rows are printed as it finishes."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console()
    todo = resolve(names)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[name]}[/]"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("", total=len(todo), name="starting")

        def progress(name: str, message: str) -> None:
            bar.update(task, name=name, description=message)

        def done(name: str, rows: list[Row]) -> None:
            bar.advance(task)
            counts = ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in (PASS, MISS, "INFO", SKIP, FAIL)
                               if any(r.status == s for r in rows))
            console.print(f"[bold]{name}[/]: {len(rows)} rows ({counts})")

        report = _run(WORKLOADS, todo, quick, command or command_line(), progress, done)
    return report
