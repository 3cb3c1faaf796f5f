"""Conversion round trip: the guest asks for a range to become private and then shared again.

The guest (64-bit, CPL0: KVM accepts hypercalls only from CPL0) loops over
``MAP_GPA_RANGE(gpa, npages, ENCRYPTED)``, a write to the first and last page of the range,
``MAP_GPA_RANGE(gpa, npages, DECRYPTED)``, the same writes, and checks each hypercall's
return value. The host answers each ``HypercallExit`` the way a VMM must at minimum: it
sets the memory attributes and the return value, then resumes. One conversion is one
hypercall exit plus the attribute update; a round trip is two. Sizes: 4 KiB, 2 MiB, 1 GiB.
Goal: at least 20,000 conversions per second (4 KiB and 2 MiB).

Needs SW_PROTECTED VMs and KVM_CAP_EXIT_HYPERCALL; this host's kernel has neither, so the
kvm row says so and the model runs alone.

The "in-place" rows do the same on the model's "next" profile (the in-place conversion
series): the test slot is one guest_memfd (MMAP|INIT_SHARED, GMEM_ONLY) and the host converts
with KVM_SET_MEMORY_ATTRIBUTES2 on that file; no second backing exists.
"""

from __future__ import annotations

import time

import guestmem

from ... import uapi
from ...types import HypercallExit, IoExit
from ..backends import BACKENDS, system
from ..harness import CheckFailed, Context, Stats, at_least, fmt_stats
from . import guests

PAGE = uapi.PAGE_SIZE
DONE_PORT, FAIL_PORT = 0x11, 0x12
PRIVATE = int(uapi.MemoryAttribute.PRIVATE)
ENCRYPTED = int(uapi.MapGpaRangeAttr.ENCRYPTED)
SIZES = ((4 << 10, int(uapi.MapGpaRangeAttr.PAGE_SZ_4K), "4 KiB"),
         (2 << 20, int(uapi.MapGpaRangeAttr.PAGE_SZ_2M), "2 MiB"),
         (1 << 30, int(uapi.MapGpaRangeAttr.PAGE_SZ_1G), "1 GiB"))
GOAL = at_least(20_000.0, "≥ 20,000/s")


def _asm(size: int, page_attr: int) -> str:
    """r12 = round trips to do; the range is the test slot's first ``size`` bytes."""
    gpa, last = guests.TEST_GPA, guests.TEST_GPA + size - PAGE
    call = ("mov eax, {nr}; mov rbx, {gpa:#x}; mov rcx, {n}; mov edx, {attr:#x}; vmcall; "
            "test rax, rax; jnz failed; ")
    touch = "mov byte ptr [r8], {v}; mov byte ptr [r9], {v}; "
    nr = int(uapi.Hypercall.MAP_GPA_RANGE)
    return (f"mov r8, {gpa:#x}; mov r9, {last:#x}; "
            "again: "
            + call.format(nr=nr, gpa=gpa, n=size // PAGE, attr=page_attr | ENCRYPTED) + touch.format(v=1)
            + call.format(nr=nr, gpa=gpa, n=size // PAGE, attr=page_attr) + touch.format(v=2)
            + f"dec r12; jnz again; out {DONE_PORT:#x}, al; hang: jmp hang; "
            f"failed: out {FAIL_PORT:#x}, al; jmp failed")


def _round_trips(g: guests.Guest, trips: int, in_place: bool = False) -> tuple[float, int]:
    """Run ``trips`` round trips; returns (seconds, conversions)."""
    vm, vcpu = g.vm, g.vcpu
    g.restart(r12=trips)
    ret, run = vcpu.set_hypercall_ret, vcpu.run
    if in_place:
        file_set, base = g.test_gmem.set_memory_attributes, guests.TEST_GPA

        def setattrs(gpa: int, size: int, attributes: int) -> None:
            file_set(gpa - base, size, attributes)
    else:
        setattrs = vm.set_memory_attributes
    conversions = 0
    t0 = time.perf_counter()
    while True:
        ex = run()
        if ex.__class__ is HypercallExit:
            gpa, npages, attrs = ex.args[0], ex.args[1], ex.args[2]
            setattrs(gpa, npages * PAGE, PRIVATE if attrs & ENCRYPTED else 0)
            ret(0)
            conversions += 1
            continue
        if isinstance(ex, IoExit) and ex.port == DONE_PORT:
            break
        raise CheckFailed(f"conversion loop: unexpected exit {ex} (port {FAIL_PORT:#x} = hypercall error)")
    dt = time.perf_counter() - t0
    if conversions != 2 * trips:
        raise CheckFailed(f"expected {2 * trips} conversions, saw {conversions}")
    return dt, conversions


def run(ctx: Context) -> None:
    repeat = ctx.pick(3, 7)
    trips = {"4 KiB": ctx.pick(500, 10_000), "2 MiB": ctx.pick(500, 10_000), "1 GiB": ctx.pick(100, 2000)}
    budget = ctx.pick(0.5, 3.0)  # seconds per sample
    cases = [(backend, False) for backend in BACKENDS] + [("model", True)]
    for backend, in_place in cases:
        for size, page_attr, name in SIZES:
            case = f"{name} private↔shared" + (" in-place" if in_place else "")
            goal = GOAL if size < (1 << 30) else None
            with ctx.guard(case, backend, goal):
                opened = guestmem.open_system("model", profile="next") if in_place else system(backend)
                with opened as sys_:
                    g = guests.build(sys_, _asm(size, page_attr), cpl=0, vm_type=int(uapi.VmType.SW_PROTECTED),
                                     test="gmem-shared" if in_place else "private", test_size=1 << 30,
                                     hypercalls=True)
                    try:
                        ctx.status(f"{backend} {name}: up to {trips[name]:,} round trips x {repeat}")
                        dt, _ = _round_trips(g, 10, in_place)  # warm-up: translation, first faults
                        # as many trips as fit the time budget per sample, at most the nominal count
                        n = max(10, min(trips[name], int(budget * 10 / dt)))
                        rates = []
                        for _ in range(repeat):
                            dt, conv = _round_trips(g, n, in_place)
                            rates.append(conv / dt)
                    finally:
                        g.close()
                st = Stats(tuple(rates))
                ctx.add(case, backend, st.median, "conv/s",
                        detail=f"{1e6 / st.median:.1f} µs/conversion; " + fmt_stats(st, unit="/s") + f", {n:,} round trips",
                        goal=goal, samples=rates)
