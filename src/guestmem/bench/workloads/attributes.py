"""Attribute scaling: set_memory_attributes cost from 4 KiB to 1 TiB, and random conversions.

A SW_PROTECTED VM with one 1 TiB memslot bound to a 1 TiB guest_memfd (the userspace
range is a PROT_NONE reservation, never touched). Two measurements:

* **scaling**: alternate PRIVATE and shared over [0, size) for each size; µs per call.
  Goal: 1 TiB in at most 1 ms.
* **random conversions**: 1,000,000 conversions (quick: 20,000) of log-uniform 4 KiB..1 GiB
  ranges at random page-aligned GPAs, PRIVATE or shared at random. µs per call (goal
  <= 20 µs), then a separate pass under tracemalloc for memory per stored range (goal
  O(ranges): a bounded number of bytes per range whether there are few ranges or many).

Runs on every backend whose VMs have KVM_CAP_MEMORY_ATTRIBUTES; this host's kernel has none.
"""

from __future__ import annotations

import gc
import math
import random
import time
import tracemalloc

import guestmem

from ... import hostmem, uapi
from ...units import format_size
from ..backends import BACKENDS, system
from ..harness import Context, Skip, Stats, at_most, check, fmt_stats

TIB = 1 << 40
PAGE = uapi.PAGE_SIZE
PRIVATE = int(uapi.MemoryAttribute.PRIVATE)
SIZES = [4 << 10, 64 << 10, 2 << 20, 64 << 20, 1 << 30, 64 << 30, 1 << 40]
GOAL_1T = at_most(1000.0, "1 TiB ≤ 1 ms")
GOAL_RANDOM = at_most(20.0, "≤ 20 µs")
BYTES_PER_RANGE = 1024
FRAGMENTS = 10_000
GOAL_MEMORY = at_most(BYTES_PER_RANGE, f"O(ranges): ≤ {BYTES_PER_RANGE} B/range")


class _TiBVm:
    """A SW_PROTECTED VM with a 1 TiB gmem memslot at GPA 0."""

    def __init__(self, sys_) -> None:
        self.vm = sys_.create_vm(int(uapi.VmType.SW_PROTECTED))
        self.reservation = hostmem.mmap(TIB, 0, hostmem.MAP_PRIVATE | hostmem.MAP_ANONYMOUS | hostmem.MAP_NORESERVE, -1, 0)
        self.gmem = self.vm.create_guest_memfd(TIB, 0)
        self.vm.set_user_memory_region2(0, int(uapi.MemFlag.GUEST_MEMFD), 0, TIB, userspace_addr=self.reservation,
                                        guest_memfd=self.gmem, guest_memfd_offset=0)

    def close(self) -> None:
        self.vm.set_user_memory_region2(0, int(uapi.MemFlag.GUEST_MEMFD), 0, 0, userspace_addr=self.reservation,
                                        guest_memfd=self.gmem, guest_memfd_offset=0)
        self.gmem.close()
        self.vm.close()
        hostmem.munmap(self.reservation, TIB)

    def ranges(self) -> list[tuple[int, int, int]] | None:
        get = getattr(self.vm, "get_memory_attributes", None)
        return list(get(0, TIB)) if get else None


class _InPlaceFile:
    """The same 1 TiB memslot on profile "next": attributes set on its guest_memfd
    (KVM_SET_MEMORY_ATTRIBUTES2; file offset = GPA here). ``vm`` is the file's converter, so the
    timing loops below run unchanged."""

    def __init__(self, sys_) -> None:
        self.real_vm = sys_.create_vm(int(uapi.VmType.SW_PROTECTED))
        flags = int(uapi.GuestMemfdFlag.MMAP | uapi.GuestMemfdFlag.INIT_SHARED)  # starts shared, like a VM
        self.gmem = self.real_vm.create_guest_memfd(TIB, flags)
        self.real_vm.set_user_memory_region2(0, int(uapi.MemFlag.GUEST_MEMFD), 0, TIB, guest_memfd=self.gmem,
                                             guest_memfd_offset=0)
        self.vm = self.gmem

    def close(self) -> None:
        self.gmem.close()
        self.real_vm.close()

    def ranges(self) -> list[tuple[int, int, int]]:
        return [(s * PAGE, e * PAGE, v) for s, e, v in self.gmem._state.attributes.ranges(0, TIB // PAGE)]


def _random_ops(rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    """n conversions: log-uniform 1..2^18 pages at a random page, PRIVATE or shared."""
    top = math.log(1 << 18)
    out = []
    for _ in range(n):
        pages = int(math.exp(rng.random() * top))
        gfn = rng.randrange(0, (TIB // PAGE) - pages)
        out.append((gfn * PAGE, pages * PAGE, PRIVATE if rng.random() < 0.5 else 0))
    return out


def _check_ranges(ranges: list[tuple[int, int, int]] | None, what: str) -> int:
    """Ranges are sorted, non-empty, non-overlapping, page aligned and merged; returns the
    number of stored non-default ranges (the model's ``get_memory_attributes`` extension)."""
    if ranges is None:
        return -1
    prev_end, prev_attr = None, None
    for start, end, attr in ranges:
        check(start < end and start % PAGE == 0 and end % PAGE == 0, f"{what}: bad range {start:#x}..{end:#x}")
        if prev_end is not None:
            check(start >= prev_end, f"{what}: ranges overlap at {start:#x}")
            check(not (start == prev_end and attr == prev_attr), f"{what}: unmerged neighbours at {start:#x}")
        prev_end, prev_attr = end, attr
    return sum(1 for r in ranges if r[2])


def _scaling(ctx: Context, backend: str, tvm: _TiBVm | _InPlaceFile, suffix: str = "") -> None:
    """µs per call for each size, over an empty map and over one holding FRAGMENTS ranges
    spread evenly across the 1 TiB (so a big update has to drop thousands of them)."""
    setattrs = tvm.vm.set_memory_attributes
    clock = time.perf_counter_ns
    stride = (TIB // PAGE) // FRAGMENTS * PAGE

    def fragment(end: int) -> None:
        setattrs(0, end, 0)
        for gpa in range(stride // 2 // PAGE * PAGE, end, stride):
            setattrs(gpa, PAGE, PRIVATE)

    for series, calls in (("empty map", ctx.pick(20, 200)), (f"{FRAGMENTS:,} ranges", ctx.pick(3, 9))):
        fragmented = series != "empty map"
        if fragmented:
            fragment(TIB)
        for size in SIZES:
            ctx.status(f"{backend}: set_memory_attributes {format_size(size)} over {series}")
            times = []
            for i in range(calls + 2):
                attr = PRIVATE if (i % 2 == 0 or fragmented) else 0
                t0 = clock()
                setattrs(0, size, attr)
                dt = clock() - t0
                if fragmented:
                    fragment(size)
                if i >= 2:
                    times.append(dt / 1000)
            st = Stats(tuple(times))
            ctx.add(f"set {format_size(size)} over {series}{suffix}", backend, st.median, "µs",
                    detail=fmt_stats(st, unit=" µs"), goal=GOAL_1T if size == TIB else None,
                    kind="scaling" if not suffix else "", x=size, samples=times)
        if fragmented:
            stored = _check_ranges(tvm.ranges(), "fragmented map")
            check(stored in (-1, FRAGMENTS), f"expected {FRAGMENTS} private ranges, found {stored}")
        setattrs(0, TIB, 0)
        check(_check_ranges(tvm.ranges(), "after scaling") in (0, -1), "attributes left behind after clearing 1 TiB")


def _random(ctx: Context, backend: str, tvm: _TiBVm | _InPlaceFile, suffix: str = "") -> None:
    n = ctx.pick(20_000, 1_000_000)
    chunk = 10_000
    rng = random.Random(6)
    setattrs = tvm.vm.set_memory_attributes
    clock = time.perf_counter_ns
    total, per_chunk, done = 0, [], 0
    while done < n:
        ops = _random_ops(rng, min(chunk, n - done))  # generated outside the timed loop
        ctx.status(f"{backend}: random conversions {done:,}/{n:,}")
        t0 = clock()
        for gpa, size, attr in ops:
            setattrs(gpa, size, attr)
        dt = clock() - t0
        total += dt
        per_chunk.append(dt / len(ops) / 1000)
        done += len(ops)
    ranges = tvm.ranges()
    stored = _check_ranges(ranges, "after random conversions")
    st = Stats(tuple(per_chunk))
    ctx.add(f"{n:,} random 4K–1G conversions, 1 TiB VM{suffix}", backend, total / n / 1000, "µs",
            detail=f"mean over all; per-{chunk:,} batch {fmt_stats(st, unit=' µs')}; "
                   f"{stored if stored >= 0 else '?'} private ranges at the end",
            goal=GOAL_RANDOM, samples=per_chunk)
    tvm.vm.set_memory_attributes(0, TIB, 0)


def _memory(ctx: Context, backend: str, sys_, label: str, n: int, single_pages: bool) -> None:
    """Memory held by the attribute store after n conversions, per stored range."""
    ctx.status(f"{backend}: memory, {label}")
    rng = random.Random(7)
    if single_pages:
        ops = [(rng.randrange(0, TIB // PAGE) * PAGE, PAGE, PRIVATE if rng.random() < 0.5 else 0) for _ in range(n)]
    else:
        ops = _random_ops(rng, n)
    gc.collect()
    tracemalloc.start()
    try:
        tvm = _TiBVm(sys_)
        try:
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            setattrs = tvm.vm.set_memory_attributes
            for gpa, size, attr in ops:
                setattrs(gpa, size, attr)
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        ranges = tvm.ranges()
        stored = len(ranges) if ranges is not None else -1
        _check_ranges(ranges, f"memory pass {label}")
        tvm.close()
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    if stored <= 0:
        ctx.add(f"memory after {n:,} {label}", backend, used / 2**20, "MiB",
                detail="range count unknown (no get_memory_attributes)")
        return
    ctx.add(f"memory after {n:,} {label}", backend, used / stored, "B/range",
            detail=f"{used / 2**20:.2f} MiB for {stored:,} ranges", goal=GOAL_MEMORY)


def _unsupported(sys_) -> str | None:
    """Why this backend cannot run the workload (no SW_PROTECTED VMs or no PRIVATE attribute)."""
    types = sys_.check_extension(int(uapi.Cap.VM_TYPES))
    if not types & (1 << uapi.VmType.SW_PROTECTED):
        return f"no KVM_X86_SW_PROTECTED_VM (KVM_CAP_VM_TYPES = {types:#x}), so no private memory"
    vm = sys_.create_vm(int(uapi.VmType.SW_PROTECTED))
    try:
        if not vm.check_extension(int(uapi.Cap.MEMORY_ATTRIBUTES)) & PRIVATE:
            return "KVM_CAP_MEMORY_ATTRIBUTES lacks PRIVATE"
    finally:
        vm.close()
    return None


def run(ctx: Context) -> None:
    ran = False
    for backend in BACKENDS:
        try:
            with system(backend) as sys_:
                reason = _unsupported(sys_)
                if reason:
                    ctx.skip("all", backend, reason)
                    continue
                tvm = _TiBVm(sys_)
                try:
                    _scaling(ctx, backend, tvm)
                    _random(ctx, backend, tvm)
                finally:
                    tvm.close()
                _memory(ctx, backend, sys_, "random 4K–1G conversions", ctx.pick(20_000, 200_000), False)
                _memory(ctx, backend, sys_, "random 4 KiB conversions", ctx.pick(20_000, 200_000), True)
                ran = True
        except Skip as exc:
            ctx.skip("all", backend, str(exc))
    with ctx.guard("in-place (all)", "model"):
        with guestmem.open_system("model", profile="next") as sys_:
            f = _InPlaceFile(sys_)
            try:
                _scaling(ctx, "model", f, " (in-place, guest_memfd)")
                _random(ctx, "model", f, " (in-place, guest_memfd)")
            finally:
                f.close()
    if not ran and not ctx.rows:
        raise Skip("no backend with memory attributes")
