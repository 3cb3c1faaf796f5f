"""File operations: guest_memfd create, fallocate, punch-hole, bind/unbind, model against kernel.

Each operation is timed from Python on both backends through the same public API, and
the C program ``gmem_ops`` gives the kernel's raw-syscall floor. The three sides take
turns inside each repetition so that machine noise hits them alike; the row's figure is
the model's median latency over the kernel backend's (goal: at most 2x).
"""

from __future__ import annotations

import statistics
import time

from ... import uapi
from ..backends import BACKENDS, system, unavailable
from ..cbuild import build, run_lines
from ..harness import Context, Skip, at_most, check

GIB = 1 << 30
MIB2 = 2 << 20
PAGE = uapi.PAGE_SIZE
OPS = ("create", "falloc_4k", "punch_4k", "falloc_1g", "punch_1g", "bind_unbind")
WHAT = {
    "create": "KVM_CREATE_GUEST_MEMFD 1 GiB + close",
    "falloc_4k": "fallocate 4 KiB (allocates)",
    "punch_4k": "punch hole 4 KiB (frees)",
    "falloc_1g": "fallocate 1 GiB",
    "punch_1g": "punch hole 1 GiB",
    "bind_unbind": "memslot add + delete, 2 MiB gmem",
}
GOAL = at_most(2.0, "≤ 2x kvm")


class _Side:
    """One backend's VM and files, kept for the whole workload."""

    def __init__(self, sys_) -> None:
        self.vm = sys_.create_vm(0)
        self.file = self.vm.create_guest_memfd(GIB, 0)
        flags = uapi.GuestMemfdFlag.MMAP | uapi.GuestMemfdFlag.INIT_SHARED
        self.slot_file = self.vm.create_guest_memfd(MIB2, int(flags))
        self.slot_map = self.slot_file.mmap(MIB2)

    def close(self) -> None:
        self.slot_map.close()
        for obj in (self.slot_file, self.file, self.vm):
            obj.close()

    def sample(self, n: int, nbind: int) -> dict[str, float]:
        """ns per operation for each op, one pass (mirrors gmem_ops.c)."""
        out: dict[str, float] = {}
        vm, f, clock = self.vm, self.file, time.perf_counter_ns
        create = vm.create_guest_memfd
        t0 = clock()
        for _ in range(n):
            create(GIB, 0).close()
        out["create"] = (clock() - t0) / n
        alloc, punch = f.allocate, f.punch_hole
        t0 = clock()
        for i in range(n):
            alloc(i * PAGE, PAGE)
        out["falloc_4k"] = (clock() - t0) / n
        t0 = clock()
        for i in range(n):
            punch(i * PAGE, PAGE)
        out["punch_4k"] = (clock() - t0) / n
        t0 = clock()
        alloc(0, GIB)
        out["falloc_1g"] = float(clock() - t0)
        t0 = clock()
        punch(0, GIB)
        out["punch_1g"] = float(clock() - t0)
        setr = vm.set_user_memory_region2
        flag, addr, g = int(uapi.MemFlag.GUEST_MEMFD), self.slot_map.address, self.slot_file
        t0 = clock()
        for _ in range(nbind):
            setr(1, flag, GIB, MIB2, userspace_addr=addr, guest_memfd=g, guest_memfd_offset=0)
            setr(1, flag, GIB, 0, userspace_addr=addr, guest_memfd=g, guest_memfd_offset=0)
        out["bind_unbind"] = (clock() - t0) / nbind
        return out


def run(ctx: Context) -> None:
    n = ctx.pick(500, 20_000)
    nbind = min(n, ctx.pick(200, 2000))
    repeat = ctx.pick(3, 7)
    c_reason = None
    try:
        prog = build("gmem_ops")
        if unavailable("kvm"):
            raise Skip(f"gmem_ops needs /dev/kvm: {unavailable('kvm')}")
    except Skip as exc:
        prog, c_reason = None, str(exc)

    sides: dict[str, _Side] = {}
    reasons: dict[str, str] = {}
    stack = []
    try:
        for b in BACKENDS:
            try:
                cm = system(b)
                sys_ = cm.__enter__()
                stack.append(cm)
                sides[b] = _Side(sys_)
            except Skip as exc:
                reasons[b] = str(exc)
        if not sides:
            raise Skip("; ".join(f"{b}: {r}" for b, r in reasons.items()))
        samples: dict[str, dict[str, list[float]]] = {s: {op: [] for op in OPS} for s in (*sides, "C")}
        for rep in range(1 + repeat):  # rep 0 is the warm-up
            ctx.status(f"repetition {rep}/{repeat}")
            sample = {}
            if prog is not None:
                lines = run_lines(prog, n, 1)
                sample["C"] = {f[0]: float(f[2]) for f in lines if len(f) == 3}
                check(set(sample["C"]) == set(OPS), f"gmem_ops printed {sorted(sample['C'])}")
            for b, side in sides.items():
                sample[b] = side.sample(n, nbind)
            if rep:
                for s, figures in sample.items():
                    for op, v in figures.items():
                        samples[s][op].append(v)
    finally:
        for side in sides.values():
            side.close()
        for cm in reversed(stack):
            cm.__exit__(None, None, None)

    def med(side: str, op: str) -> float | None:
        v = samples.get(side, {}).get(op)
        return statistics.median(v) if v else None

    for op in OPS:
        k, m, c = med("kvm", op), med("model", op), med("C", op)
        unit_scale = 1e-6 if op.endswith("_1g") else 1e-3  # ms for the 1 GiB ops, else µs
        unit = "ms" if op.endswith("_1g") else "µs"
        parts = [f"{s} {v * unit_scale:.3g} {unit}" for s, v in (("model", m), ("kvm", k), ("C", c)) if v is not None]
        if c is None and c_reason and k is not None:
            parts.append(f"C skipped: {c_reason}")
        detail = ", ".join(parts) + f" (medians, n={repeat})"
        if k is not None and m is not None:
            ratios = [a / b for a, b in zip(samples["model"][op], samples["kvm"][op])]
            ctx.add(WHAT[op], "model/kvm", m / k, "x", detail=detail, goal=GOAL, kind="ratio", samples=ratios,
                    label=f"{op}\nmodel / kvm")
        elif m is not None:
            ctx.add(WHAT[op], "model", m * unit_scale, unit, detail=detail)
            ctx.skip(WHAT[op], "model/kvm", reasons.get("kvm", "kvm missing"), GOAL)
        else:
            ctx.add(WHAT[op], "kvm", k * unit_scale if k is not None else None, unit, detail=detail)
            ctx.skip(WHAT[op], "model/kvm", reasons.get("model", "model missing"), GOAL)
