"""Exit round trip: a guest loop of OUT instructions, answered by the Python run loop.

The guest is ``1: out 0x10, al; jmp 1b`` in 64-bit mode at CPL0 and at CPL3. The Python
side is the loop a VMM writes on guestmem (``vcpu.run()`` and a check of the exit's type
and port); the C side (``kvm_exit.c``) is the same loop with raw ioctls and the same
check. Their samples alternate. Goal: the kvm backend reaches at least 0.9x the C exit
rate. The model's rate is reported alongside (no goal: each model exit restarts Unicorn).
"""

from __future__ import annotations

import fcntl
import mmap
import statistics
import struct
import time

from ... import uapi
from ...types import IoExit
from ..backends import system, unavailable
from ..cbuild import build, run_lines
from ..harness import CheckFailed, Context, Skip, Stats, at_least, fmt_stats
from . import guests

PORT = 0x10
ASM = f"again: out {PORT:#x}, al; jmp again"
GOAL = at_least(0.9, "≥ 0.9x C")


def _py_loop(vcpu, n: int) -> float:
    """ns per exit over n exits of the OUT loop."""
    run = vcpu.run
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(n):
        ex = run()
        if ex.__class__ is not IoExit or ex.port != PORT:
            raise CheckFailed(f"expected an OUT to port {PORT:#x}, got {ex}")
    return (clock() - t0) / n


# The Python floor: the reference's bare loop (fcntl.ioctl with no argument, exit_reason and
# io.port read from our own mapping of kvm_run), to tell Python's cost from guestmem's.
_OFF_REASON = uapi.kvm_run.exit_reason.offset
_OFF_PORT = uapi.kvm_run.exit.offset + uapi.kvm_run_exit.io.offset + uapi.kvm_run_io.port.offset
_EXIT_IO = int(uapi.ExitReason.IO)


def _floor_loop(fd: int, page: mmap.mmap, n: int) -> float:
    """ns per exit with nothing but fcntl.ioctl(fd, KVM_RUN) and two field reads."""
    ioctl, req, u32, u16 = fcntl.ioctl, uapi.KVM_RUN, struct.Struct("<I").unpack_from, struct.Struct("<H").unpack_from
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(n):
        ioctl(fd, req)
        if u32(page, _OFF_REASON)[0] != _EXIT_IO or u16(page, _OFF_PORT)[0] != PORT:
            raise CheckFailed("bare loop: unexpected exit")
    return (clock() - t0) / n


def run(ctx: Context) -> None:
    repeat = ctx.pick(3, 7)
    exits = {0: ctx.pick(5_000, 100_000), 3: ctx.pick(2_000, 40_000)}
    model_exits = ctx.pick(5_000, 50_000)
    kvm_reason = unavailable("kvm")
    prog, c_reason = _c_program(kvm_reason)
    for cpl in (0, 3):
        case = f"CPL{cpl} OUT loop"
        c_ns: list[float] = []
        py_ns: list[float] = []
        floor_ns: list[float] = []
        if not kvm_reason:
            with ctx.guard(case, "kvm"):
                _measure_kvm(ctx, cpl, exits[cpl], repeat, prog, c_ns, py_ns, floor_ns)
        _report_kvm(ctx, cpl, case, c_ns, py_ns, floor_ns, c_reason, kvm_reason)
        model_reason = unavailable("model")
        if model_reason:
            ctx.skip(case, "model", model_reason)
            continue
        with ctx.guard(case, "model"):
            _measure_model(ctx, case, cpl, repeat, model_exits)


def _c_program(kvm_reason: str | None):
    """The C reference program, or None and the reason it cannot run."""
    try:
        prog = build("kvm_exit")
        if kvm_reason:
            raise Skip(f"kvm_exit needs /dev/kvm: {kvm_reason}")
    except Skip as exc:
        return None, str(exc)
    return prog, None


def _measure_kvm(ctx: Context, cpl: int, n: int, repeat: int, prog, c_ns: list[float], py_ns: list[float],
                 floor_ns: list[float]) -> None:
    """Alternate the C loop, guestmem's loop and the bare fcntl loop on one kvm vCPU, ``n`` exits
    each, ``repeat`` times after a warm-up round; append ns per exit to the three lists."""
    with system("kvm") as sys_:
        guest = guests.build(sys_, ASM, cpl=cpl)
        page = mmap.mmap(guest.vcpu.fileno(), sys_.vcpu_mmap_size())
        try:
            for rep in range(1 + repeat):  # rep 0 warms all sides up
                ctx.status(f"CPL{cpl} kvm vs C, repetition {rep}/{repeat}")
                if prog is not None:
                    lines = run_lines(prog, f"cpl{cpl}", "gmem", n, 1)
                    c = [float(f[1]) for f in lines if f[0] == "ns_per_exit"]
                    if rep:
                        c_ns.extend(c)
                p = _py_loop(guest.vcpu, n)
                f = _floor_loop(guest.vcpu.fileno(), page, n)
                if rep:
                    py_ns.append(p)
                    floor_ns.append(f)
        finally:
            page.close()
            guest.close()


def _report_kvm(ctx: Context, cpl: int, case: str, c_ns: list[float], py_ns: list[float], floor_ns: list[float],
                c_reason: str | None, kvm_reason: str | None) -> None:
    """The C, kvm, kvm/C (the goal) and Python-floor rows of one case, or their skips."""
    if c_ns:
        st = Stats(tuple(c_ns))
        ctx.add(case, "C", 1e9 / st.median, "exits/s", detail=fmt_stats(st, 1e-3, " µs/exit"), samples=c_ns)
    else:
        ctx.skip(case, "C", c_reason or kvm_reason or "not run")
    if py_ns:
        st = Stats(tuple(py_ns))
        ctx.add(case, "kvm", 1e9 / st.median, "exits/s", detail=fmt_stats(st, 1e-3, " µs/exit"), samples=py_ns)
    else:
        ctx.skip(case, "kvm", kvm_reason or "not run")
    if c_ns and py_ns:
        ratios = [c / p for c, p in zip(c_ns, py_ns)]
        ctx.add(case, "kvm/C", statistics.median(c_ns) / statistics.median(py_ns), "x",
                detail=f"exit rate ratio of medians; of minima {min(c_ns) / min(py_ns):.2f}; "
                       f"per-pair {min(ratios):.2f}..{max(ratios):.2f}",
                goal=GOAL, kind="ratio", samples=ratios, label=f"exits CPL{cpl}\nkvm / C")
    else:
        ctx.skip(case, "kvm/C", c_reason or kvm_reason or "one side missing", GOAL)
    if c_ns and floor_ns:
        ctx.add(case, "bare fcntl/C", statistics.median(c_ns) / statistics.median(floor_ns), "x",
                detail=f"Python floor, same vCPU: {statistics.median(floor_ns) / 1e3:.2f} µs/exit, "
                       f"ratio of minima {min(c_ns) / min(floor_ns):.2f} "
                       f"(guestmem adds {(statistics.median(py_ns) - statistics.median(floor_ns)) / 1e3:.2f} µs)",
                samples=[c / f for c, f in zip(c_ns, floor_ns)])


def _measure_model(ctx: Context, case: str, cpl: int, repeat: int, model_exits: int) -> None:
    """The model's exit rate: ``repeat`` runs of the loop, each sized to the time budget."""
    with system("model") as sys_:
        guest = guests.build(sys_, ASM, cpl=cpl)
        try:
            ctx.status(f"CPL{cpl} model")
            ns = _py_loop(guest.vcpu, 200)  # warm-up, and the time budget
            n = max(200, min(model_exits, int(ctx.pick(0.5, 3.0) * 1e9 / ns)))
            m = [_py_loop(guest.vcpu, n) for _ in range(repeat)]
        finally:
            guest.close()
    st = Stats(tuple(m))
    ctx.add(case, "model", 1e9 / st.median, "exits/s", detail=fmt_stats(st, 1e-3, " µs/exit") + f", {n:,} exits",
            samples=m)
