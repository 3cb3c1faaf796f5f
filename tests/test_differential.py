"""Differential state machine: the kernel and the model get the same random operations.

Hypothesis drives one VM on /dev/kvm and one model VM with the ``6.18-host`` profile (this
host's kernel exactly) through create, fallocate, mmap, touch, read/write through mappings,
bind, delete, re-bind and close in any order, and asserts that every result -- the return
value or errno, the fstat fields guest_memfd defines, and every byte read -- is identical.
Touches run in a forked child so an expected SIGBUS is a result, not a crash.

CI runs a bounded budget. Run longer by hand, e.g. ten minutes:
    GUESTMEM_DIFF_EXAMPLES=100000 GUESTMEM_DIFF_SECONDS=600 python -m pytest tests/test_differential.py -s
"""

from __future__ import annotations

import errno
import os
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle, RuleBasedStateMachine, consumes, precondition, rule, run_state_machine_as_test,
)

import guestmem
from guestmem.hostmem import MAP_PRIVATE, MAP_SHARED
from guestmem.uapi import PAGE_SIZE, Falloc, MemFlag

from conftest import backend_skip_reason
from probe import touch

P = PAGE_SIZE
EXAMPLES = int(os.environ.get("GUESTMEM_DIFF_EXAMPLES", "25"))
SECONDS = float(os.environ.get("GUESTMEM_DIFF_SECONDS", "0"))  # 0: no time budget
DEADLINE = time.monotonic() + SECONDS if SECONDS else None
OPERATIONS = {"count": 0}

pytestmark = pytest.mark.skipif(
    backend_skip_reason("kvm") is not None or backend_skip_reason("model") is not None,
    reason=f"differential test needs both backends ({backend_skip_reason('kvm') or backend_skip_reason('model')})",
)


def outcome(fn, *args, **kwargs):
    """("ok", value) or ("err", errno): the comparable result of one call."""
    try:
        return ("ok", fn(*args, **kwargs))
    except OSError as exc:
        return ("err", exc.errno)


FALLOC_MODES = [
    0, Falloc.KEEP_SIZE, Falloc.PUNCH_HOLE, Falloc.PUNCH_HOLE | Falloc.KEEP_SIZE, Falloc.ZERO_RANGE,
    Falloc.ZERO_RANGE | Falloc.KEEP_SIZE, Falloc.COLLAPSE_RANGE, Falloc.COLLAPSE_RANGE | Falloc.KEEP_SIZE,
    Falloc.INSERT_RANGE, Falloc.UNSHARE_RANGE | Falloc.KEEP_SIZE, Falloc.WRITE_ZEROES, 0x100,
]
offsets = st.one_of(st.integers(0, 10).map(lambda n: n * P), st.integers(-2, 12 * P), st.just(2**62))
lengths = st.one_of(st.integers(0, 10).map(lambda n: n * P), st.integers(-1, 12 * P), st.just(2**63 - P))
gpas = st.integers(0, 15).map(lambda n: 0x1_0000_0000 + n * P)


class Pair:
    """The same object on both backends."""

    def __init__(self, kvm, model, **info):
        self.kvm, self.model, self.info = kvm, model, info

    def __repr__(self) -> str:
        return f"Pair({self.info})"


class KernelVsModel(RuleBasedStateMachine):
    gmems = Bundle("gmems")
    maps = Bundle("maps")

    def __init__(self) -> None:
        super().__init__()
        self.sys_kvm = guestmem.open_system("kvm")
        self.sys_model = guestmem.open_system("model", profile="6.18-host")
        self.vm = Pair(self.sys_kvm.create_vm(0), self.sys_model.create_vm(0))
        self.all_gmems: list[Pair] = []
        self.all_maps: list[Pair] = []

    def both(self, name: str, pair: Pair, *args, **kwargs):
        """Call ``name`` on both sides of ``pair``; assert identical outcomes; return them."""
        OPERATIONS["count"] += 1
        k = outcome(getattr(pair.kvm, name), *args, **kwargs)
        m = outcome(getattr(pair.model, name), *args, **kwargs)
        assert k[0] == m[0] and (k[0] == "ok" or k == m), f"{name}{args}: kernel {k} model {m}"
        return k, m

    @rule(target=gmems, pages=st.integers(0, 8), extra=st.sampled_from([0, 0, 0, 1, P - 1]),
          flags=st.sampled_from([0, 1, 2, 3, 3, 3, 4, 1 << 63]))
    def create(self, pages, extra, flags):
        size = pages * P + extra
        k, m = self.both("create_guest_memfd", self.vm, size, flags)
        if k[0] == "err":
            return None
        pair = Pair(k[1], m[1], size=size, flags=flags)
        self.all_gmems.append(pair)
        return pair

    @rule(g=gmems, mode=st.sampled_from(FALLOC_MODES), offset=offsets, length=lengths)
    def fallocate(self, g, mode, offset, length):
        if g is not None:
            self.both("fallocate", g, mode, offset, length)

    @rule(g=gmems)
    def fstat(self, g):
        if g is None:
            return
        k, m = self.both("fstat", g)
        if k[0] == "ok":
            fields = ("st_mode", "st_size", "st_blksize", "st_blocks", "st_nlink", "st_uid", "st_gid")
            assert {f: getattr(k[1], f) for f in fields} == {f: getattr(m[1], f) for f in fields}

    @rule(g=gmems, op=st.sampled_from(["read", "write", "pread", "pwrite", "lseek", "truncate"]))
    def refused_syscall(self, g, op):
        if g is None:
            return
        args = {"read": (8,), "write": (b"x" * 8,), "pread": (8, 0), "pwrite": (b"x" * 8, 0),
                "lseek": (0, os.SEEK_SET), "truncate": (P,)}[op]
        self.both(op, g, *args)

    @rule(target=maps, g=gmems, pages=st.integers(1, 8), private=st.booleans())
    def mmap(self, g, pages, private):
        if g is None:
            return None
        k, m = self.both("mmap", g, pages * P, 0, flags=MAP_PRIVATE if private else MAP_SHARED)
        if k[0] == "err":
            return None
        pair = Pair(k[1], m[1], length=pages * P)
        self.all_maps.append(pair)
        return pair

    @rule(mp=maps, page=st.integers(0, 7), within=st.integers(0, P - 1), value=st.none() | st.integers(0, 255))
    def touch(self, mp, page, within, value):
        if mp is None or mp.kvm.closed:
            return
        offset = min(page * P + within, mp.info["length"] - 1)
        OPERATIONS["count"] += 1
        k, m = touch(mp.kvm, offset, value), touch(mp.model, offset, value)
        assert k == m, f"touch(+{offset:#x}, {value}): kernel {k} model {m}"

    @rule(mp=consumes(maps))
    def unmap(self, mp):
        if mp is not None:
            mp.kvm.close()
            mp.model.close()

    @rule(slot=st.integers(0, 3), g=st.none() | gmems, gpa=gpas, pages=st.integers(0, 4),
          offset=st.integers(0, 5).map(lambda n: n * P), flags=st.sampled_from([MemFlag.GUEST_MEMFD] * 4 + [0, 1, 2, 6]))
    def set_region(self, slot, g, gpa, pages, offset, flags):
        """Bind, re-bind, move or delete (pages == 0) a memslot."""
        OPERATIONS["count"] += 1
        fd_k = fd_m = 0xFFFFFFFF
        if g is not None:
            fd_k, fd_m = (outcome(g.kvm.fileno), outcome(g.model.fileno))
            if fd_k[0] == "err":  # closed: the fd number would be stale on the kernel side
                return
            fd_k, fd_m = fd_k[1], fd_m[1]
        k = outcome(self.vm.kvm.set_user_memory_region2, slot, flags, gpa, pages * P, 0, fd_k, offset)
        m = outcome(self.vm.model.set_user_memory_region2, slot, flags, gpa, pages * P, 0, fd_m, offset)
        assert k == m, f"set_user_memory_region2(slot={slot}, flags={flags}, gpa={gpa:#x}, size={pages * P:#x}, off={offset:#x}): kernel {k} model {m}"

    @rule(g=consumes(gmems))
    def close_gmem(self, g):
        if g is not None:
            g.kvm.close()
            g.model.close()

    @precondition(lambda self: self.all_gmems)
    @rule(data=st.data())
    def use_closed(self, data):
        """Every method of a closed gmem fails the same way on both sides (EBADF)."""
        g = data.draw(st.sampled_from(self.all_gmems))
        if g.kvm.closed:
            k, _ = self.both("fallocate", g, Falloc.KEEP_SIZE, 0, P)
            assert k == ("err", errno.EBADF)

    def teardown(self):
        for mp in self.all_maps:
            mp.kvm.close()
            mp.model.close()
        for g in self.all_gmems:
            g.kvm.close()
            g.model.close()
        self.vm.kvm.close()
        self.vm.model.close()
        self.sys_kvm.close()
        self.sys_model.close()


DIFF_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
BATCH_EXAMPLES = 200  # a time-budgeted run repeats whole Hypothesis runs of this many examples


def test_kernel_and_model_agree():
    """One Hypothesis run of EXAMPLES examples; with a time budget, whole runs until it is spent.

    The budget is checked between runs, never inside one: stopping a run part-way makes
    Hypothesis see a test that draws differently on replay. The number of paired operations
    is printed (``-s``) for the closing note, and must not be zero: a machine whose rules all
    returned early would compare nothing.
    """
    OPERATIONS["count"] = 0
    if DEADLINE is None:
        run_state_machine_as_test(KernelVsModel, settings=DIFF_SETTINGS)
    else:
        batch = settings(DIFF_SETTINGS, max_examples=min(EXAMPLES, BATCH_EXAMPLES))
        while True:  # at least one run, however small the budget
            run_state_machine_as_test(KernelVsModel, settings=batch)
            if time.monotonic() >= DEADLINE:
                break
    print(f"differential operations run: {OPERATIONS['count']}")
    assert OPERATIONS["count"] > 0, "the differential state machine compared no operation"
