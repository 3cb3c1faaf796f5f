"""The benchmark harness: samples, goals, result rows, the machine description and the runner.

A workload is a function ``run(ctx) -> None`` that adds ``Row``s to ``ctx``. It repeats
each measurement (``Stats``: median and min, warm-up samples discarded), states every goal
with ``Goal``, runs each case under ``ctx.guard``, and raises
``Skip`` for a whole workload or adds a ``ctx.skip`` row for one backend it cannot run on.
A failed correctness check raises ``CheckFailed``; the runner records it as a FAIL row and
goes on with the next workload, so one broken backend never hides the other rows.

Ratios are measured inside one run, with the two sides' samples interleaved, because this
machine is shared and its absolute figures drift by tens of percent between runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class Skip(Exception):
    """The workload (or one backend of it) cannot run here; the message says why."""


class CheckFailed(AssertionError):
    """A workload's correctness check failed: the benchmark measured the wrong thing."""


def check(condition: object, message: str) -> None:
    """Raise CheckFailed with ``message`` unless ``condition`` holds (not stripped by -O)."""
    if not condition:
        raise CheckFailed(message)


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """Samples of one measurement, in its unit; ``median`` is what rows report."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


@dataclasses.dataclass(frozen=True, slots=True)
class Goal:
    """A target a row is held to: ``value OP threshold`` (OP is ">=" or "<=")."""

    op: str
    threshold: float
    text: str

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


def at_least(threshold: float, text: str) -> Goal:
    return Goal(">=", threshold, text)


def at_most(threshold: float, text: str) -> Goal:
    return Goal("<=", threshold, text)


PASS, MISS, INFO, SKIP, FAIL = "PASS", "MISS", "INFO", "SKIP", "FAIL"


@dataclasses.dataclass(slots=True)
class Row:
    """One line of the results table.

    ``value`` is the headline figure in ``unit``; ``detail`` says how it was obtained
    (median, min, sample count, ...); ``kind`` tells the plot what the row is ("ratio",
    "scaling", or "" for plain figures); ``x`` is the scaling row's x value.
    """

    workload: str
    case: str
    backend: str
    value: float | None
    unit: str
    detail: str = ""
    goal: str = ""
    status: str = INFO
    note: str = ""
    kind: str = ""
    x: float | None = None
    samples: list[float] = dataclasses.field(default_factory=list)
    label: str = ""  # short name for the plot

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class Report:
    """A whole benchmark run: what was run, where, and every row."""

    command: str
    quick: bool
    machine: dict[str, str]
    started: str
    duration_s: float = 0.0
    rows: list[Row] = dataclasses.field(default_factory=list)
    workload_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "quick": self.quick,
            "machine": self.machine,
            "started": self.started,
            "duration_s": round(self.duration_s, 2),
            "workload_seconds": {k: round(v, 2) for k, v in self.workload_seconds.items()},
            "rows": [r.as_dict() for r in self.rows],
        }

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == FAIL]


class Context:
    """What a workload gets: the mode, the row sink, sampling and progress reporting."""

    def __init__(self, workload: str, quick: bool, rows: list[Row],
                 progress: Callable[[str], None] | None = None) -> None:
        self.workload = workload
        self.quick = quick
        self.rows = rows
        self._progress = progress or (lambda _msg: None)

    def pick(self, quick: Any, full: Any) -> Any:
        """The quick-mode or full-mode parameter."""
        return quick if self.quick else full

    def status(self, message: str) -> None:
        """Tell the progress display what is running now."""
        self._progress(message)

    def add(self, case: str, backend: str, value: float | None, unit: str, *, detail: str = "",
            goal: Goal | None = None, note: str = "", kind: str = "", x: float | None = None,
            samples: Iterable[float] = (), label: str = "") -> Row:
        status = INFO
        if goal is not None and value is not None:
            status = PASS if goal.met(value) else MISS
        row = Row(self.workload, case, backend, value, unit, detail, goal.text if goal else "",
                  status, note, kind, x, [round(s, 6) for s in samples], label)
        self.rows.append(row)
        return row

    @contextlib.contextmanager
    def guard(self, case: str, backend: str, goal: Goal | None = None) -> Iterator[None]:
        """Run one case on one backend: a Skip becomes a SKIP row and any other exception a
        FAIL row for this case only, so the workload goes on with the next one."""
        try:
            yield
        except Skip as exc:
            self.skip(case, backend, str(exc), goal)
        except Exception as exc:  # noqa: BLE001 - reported as a FAIL row
            self.rows.append(Row(self.workload, case, backend, None, "", "", goal.text if goal else "", FAIL,
                                 failure_note(exc)))

    def skip(self, case: str, backend: str, reason: str, goal: Goal | None = None) -> Row:
        row = Row(self.workload, case, backend, None, "", "", goal.text if goal else "", SKIP,
                  f"skipped: {reason}")
        self.rows.append(row)
        return row


def failure_note(exc: BaseException) -> str:
    """'Type: message (file:line)' for the innermost frame of ``exc``."""
    tb = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({os.path.basename(tb.filename)}:{tb.lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def fmt_stats(stats: Stats, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    """'median X (min Y) over n' with values multiplied by ``scale``."""
    def g(v: float) -> str:
        return f"{v * scale:.{digits}g}"
    return f"median {g(stats.median)}{unit} (min {g(stats.min)}{unit}, n={len(stats.samples)})"


# --- the machine ---------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def machine() -> dict[str, str]:
    """Where the run happened: CPU, cores, memory, kernel, KVM flavour, Python, engines."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    virt = "vmx" if "vmx" in flags else "svm" if "svm" in flags else "none"
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    kvm_modules = sorted(m for m in os.listdir("/sys/module")
                         if m.startswith("kvm")) if os.path.isdir("/sys/module") else []
    uname = os.uname()
    info = {
        "cpu": model,
        "nproc": str(os.cpu_count() or 0),
        "memory": f"{mem_kb / 2**20:.1f} GiB",
        "hw_virt": virt,
        "kernel": f"{uname.sysname} {uname.release} {uname.machine}",
        "kvm_modules": " ".join(kvm_modules) or "none",
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled").strip(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg": " ".join(_read("/proc/loadavg").split()[:3]),
    }
    info["guestmem"] = _source_version()
    for mod in ("unicorn", "keystone"):
        try:
            from importlib.metadata import version
            info[mod] = version("keystone-engine" if mod == "keystone" else mod)
        except Exception:  # noqa: BLE001 - absent engine: say so
            info[mod] = "not installed"
    return info


def _source_version() -> str:
    """The git commit of the guestmem source tree, or the installed version."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            return f"git {head.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version
        return version("guestmem")
    except Exception:  # noqa: BLE001
        return "unknown"


# --- the runner ----------------------------------------------------------------------------------


Workload = Callable[[Context], None]


def run(workloads: dict[str, tuple[str, Workload]], names: Iterable[str], quick: bool, command: str,
        progress: Callable[[str, str], None] | None = None,
        done: Callable[[str, list[Row]], None] | None = None) -> Report:
    """Run the named workloads in order and collect their rows into a Report.

    ``progress(workload, message)`` is told what runs; ``done(workload, rows)`` gets each
    workload's rows as soon as it finishes. A Skip becomes a SKIP row; any other exception
    a FAIL row with its message, and the run goes on.
    """
    report = Report(command, quick, machine(), datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    t_run = time.perf_counter()
    for name in names:
        title, fn = workloads[name]
        rows: list[Row] = []
        ctx = Context(title, quick, rows, (lambda msg, _n=name: progress(_n, msg)) if progress else None)
        t0 = time.perf_counter()
        try:
            fn(ctx)
        except Skip as exc:
            ctx.skip("all", "-", str(exc))
        except Exception as exc:  # noqa: BLE001 - a broken workload is a FAIL row, not a crash
            rows.append(Row(title, "all", "-", None, "", status=FAIL, note=failure_note(exc)))
        report.workload_seconds[name] = time.perf_counter() - t0
        report.rows.extend(rows)
        if done:
            done(name, rows)
    report.duration_s = time.perf_counter() - t_run
    return report


def command_line() -> str:
    return " ".join(["guestmem" if sys.argv and sys.argv[0].endswith("guestmem") else os.path.basename(sys.argv[0] or "python"),
                     *sys.argv[1:]])
