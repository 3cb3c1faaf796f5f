"""Guest compute: a tight ``dec rcx; jnz`` loop, in MIPS, on each backend.

One ``run()`` covers the whole loop (it ends with an OUT), so the figure is instruction
throughput, two instructions per iteration. On this host's kvm_pvm, CPL3 code runs
natively and CPL0 code is emulated (about 1 µs per instruction), so kvm gets a row for
each; the model (Unicorn) runs both the same way. Goal: the model reaches 100 MIPS.
"""

from __future__ import annotations

import time

from ...types import IoExit
from ..backends import BACKENDS, system
from ..harness import Context, Stats, at_least, check, fmt_stats
from . import guests

PORT = 0x11
ASM = f"again: dec rcx; jnz again; out {PORT:#x}, al; hang: jmp hang"
GOAL = at_least(100.0, "≥ 100 MIPS")


def _mips(guest: guests.Guest, iterations: int) -> float:
    guest.restart(rcx=iterations)
    t0 = time.perf_counter_ns()
    ex = guest.vcpu.run()
    dt = time.perf_counter_ns() - t0
    check(isinstance(ex, IoExit) and ex.port == PORT, f"compute loop ended with {ex}")
    check(guest.vcpu.get_regs().rcx == 0, "compute loop did not count rcx down to 0")
    return 2 * iterations / dt * 1e3  # instructions per µs = MIPS


def run(ctx: Context) -> None:
    repeat = ctx.pick(3, 7)
    iterations = {
        ("kvm", 3): ctx.pick(200_000_000, 2_000_000_000),
        ("kvm", 0): ctx.pick(20_000, 200_000),
        ("model", 0): ctx.pick(10_000_000, 50_000_000),
        ("model", 3): ctx.pick(10_000_000, 50_000_000),
    }
    for backend in BACKENDS:
        for cpl in (3, 0):
            case = f"dec/jnz loop, CPL{cpl}" + (" (native)" if (backend, cpl) == ("kvm", 3) else
                                                 " (emulated)" if backend == "kvm" else "")
            goal = GOAL if backend == "model" else None
            with ctx.guard(case, backend, goal):
                with system(backend) as sys_:
                    guest = guests.build(sys_, ASM, cpl=cpl)
                    try:
                        n = iterations[(backend, cpl)]
                        ctx.status(f"{backend} CPL{cpl}: {n:,} iterations")
                        _mips(guest, min(n, 10_000))  # warm-up: first entry and translation
                        st = Stats(tuple(_mips(guest, n) for _ in range(repeat)))
                    finally:
                        guest.close()
                ctx.add(case, backend, st.median, "MIPS", detail=fmt_stats(st, unit=" MIPS") + f", {n:,} iterations",
                        goal=goal, samples=st.samples)
