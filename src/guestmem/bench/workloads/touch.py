"""First touch: the guest writes one byte per 4 KiB page across a fresh 1 GiB test slot.

The guest (64-bit, CPL3 so kvm_pvm runs it natively, 2 MiB guest pages) runs
``1: mov byte [rdi], 1; add rdi, 4096; cmp rdi, rsi; jb 1b; out 0x11, al`` over the test
slot at GPA 1 GiB; one ``run()`` covers the pass, and every sample uses a fresh VM so the
memory is really fresh. Cases: kvm with guest_memfd MMAP|INIT_SHARED; the model with the
same shared memory, and with private memory (a SW_PROTECTED VM whose test range is set
PRIVATE first). Goal: the model reaches at least 0.5x the kvm backend's rate, measured
with the samples interleaved.
"""

from __future__ import annotations

import statistics
import time

from ... import uapi
from ...types import IoExit
from ..backends import system, unavailable
from ..harness import FAIL, Context, Row, Skip, Stats, at_least, check, failure_note, fmt_stats
from . import guests

PORT = 0x11
PAGE = uapi.PAGE_SIZE
ASM = f"again: mov byte ptr [rdi], 1; add rdi, {PAGE}; cmp rdi, rsi; jb again; out {PORT:#x}, al; hang: jmp hang"
GOAL = at_least(0.5, "≥ 0.5x kvm")
CASES = (("kvm", "gmem shared"), ("model", "gmem shared"), ("model", "private"))


def _one(backend: str, kind: str, size: int) -> float:
    """Seconds for one first-touch pass over ``size`` bytes on a fresh VM."""
    with system(backend) as sys_:
        private = kind == "private"
        vm_type = int(uapi.VmType.SW_PROTECTED) if private else 0
        g = guests.build(sys_, ASM, cpl=3, vm_type=vm_type, test="private" if private else "gmem-shared",
                         test_size=size)
        try:
            if private:
                g.vm.set_memory_attributes(guests.TEST_GPA, size, int(uapi.MemoryAttribute.PRIVATE))
            end = guests.TEST_GPA + size
            g.restart(rdi=guests.TEST_GPA, rsi=end)
            t0 = time.perf_counter()
            ex = g.vcpu.run()
            dt = time.perf_counter() - t0
            check(isinstance(ex, IoExit) and ex.port == PORT, f"{backend} {kind}: touch loop ended with {ex}")
            check(g.vcpu.get_regs().rdi == end, f"{backend} {kind}: the guest stopped before the end")
            if g.test_map is not None:
                for off in (0, size // 2, size - PAGE):
                    check(g.test_map.read(off, 2) == b"\x01\x00", f"{backend} {kind}: byte at {off:#x} not written")
        finally:
            g.close()
    return dt


def run(ctx: Context) -> None:
    size = ctx.pick(64 << 20, 1 << 30)
    repeat = ctx.pick(1, 5)
    pages = size // PAGE
    samples: dict[tuple[str, str], list[float]] = {c: [] for c in CASES}
    reasons: dict[tuple[str, str], str] = {}
    failed: dict[tuple[str, str], str] = {}
    for c in CASES:
        r = unavailable(c[0])
        if r:
            reasons[c] = r
    for rep in range(1 + repeat):  # rep 0 warms up (fresh host memory is slower at first)
        for case in CASES:
            if case in reasons:
                continue
            ctx.status(f"{case[0]} {case[1]}, repetition {rep}/{repeat}")
            try:
                dt = _one(*case, size)
            except Skip as exc:
                reasons[case] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - this case fails, the others go on
                failed[case] = reasons[case] = failure_note(exc)
                continue
            if rep:
                samples[case].append(dt)
    label = f"{size >> 20} MiB, 4 KiB stride"
    for case in CASES:
        backend, kind = case
        if case in failed:
            ctx.rows.append(Row(ctx.workload, f"{label}, {kind}", backend, None, "", status=FAIL, note=failed[case]))
            continue
        if not samples[case]:
            ctx.skip(f"{label}, {kind}", backend, reasons.get(case, "not run"))
            continue
        st = Stats(tuple(samples[case]))
        ctx.add(f"{label}, {kind}", backend, size / st.median / 2**30, "GiB/s",
                detail=fmt_stats(st, 1e9 / pages, " ns/page"), samples=st.samples)
    kvm = samples[("kvm", "gmem shared")]
    for kind in ("gmem shared", "private"):
        m = samples[("model", kind)]
        case = f"{label}, model {kind}"
        if kvm and m:
            ratios = [k / x for k, x in zip(kvm, m)]
            ctx.add(case, "model/kvm", statistics.median(kvm) / statistics.median(m), "x",
                    detail="first-touch rate ratio", goal=GOAL, kind="ratio", samples=ratios,
                    label=f"touch {size >> 20} MiB\nmodel {kind} / kvm")
        else:
            ctx.skip(case, "model/kvm", reasons.get(("kvm", "gmem shared")) or reasons.get(("model", kind)) or "missing",
                     GOAL)
