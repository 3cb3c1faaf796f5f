"""Differential state machine: the kernel and the model get the same random operations.

Hypothesis drives VMs on /dev/kvm and model VMs with the ``6.18-host`` profile (this host's
kernel exactly) through VM/vCPU/guest_memfd creation, capabilities, fallocate, mmap, touch,
read/write through mappings, the refused file syscalls, memslots (v1 and v2: bind, delete,
re-bind, move), memory attributes, pre-fault and close, in any order and across several VMs
and files at once, and asserts that every result -- the return value or errno, the fstat and
fstatfs fields, and every byte read -- is identical. Integer arguments come from the whole
u64/s64 range weighted to the edges (0, 1, page +- 1, 2**31, 2**32, 2**63 +- pages, 2**64 -
pages); the guest_memfd fd of a memslot is of every kind (this VM's file, another VM's, never
open, -1, a VM, /dev/kvm, a vCPU, a memfd, a pipe, /dev/null). Touches run in a forked child
so an expected SIGBUS is a result, not a crash. Sizes that would make either side allocate
real memory (large fallocate, memslots of more than 8 GiB) are left out.

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
    Bundle, RuleBasedStateMachine, consumes, initialize, multiple, precondition, rule, run_state_machine_as_test,
)

import guestmem
from guestmem.hostmem import MAP_PRIVATE, MAP_SHARED
from guestmem.model.profile import UNCLAIMED_CAPS
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

# Values from the whole u64 / s64 range, weighted to the edges where kernel arithmetic lives:
# 0, 1, page - 1, page, 2**31, 2**32, 2**63 +- a few pages, 2**64 - a few pages.
EDGES = sorted({0, 1, P - 1, P, P + 1, 2 * P, 2**31 - P, 2**31, 2**32 - P, 2**32, 2**32 + P,
                *(2**63 + k * P for k in range(-3, 3)), 2**63 - 1, *(2**64 - k * P for k in (1, 2, 3)), 2**64 - 1})


def u64s(small):
    return st.one_of(small, small, st.sampled_from(EDGES), st.integers(0, 2**64 - 1))


def s64(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


def s64s(small):
    """Signed 64-bit values: the same edges seen as loff_t (2**63 and up are negative)."""
    return st.one_of(small, small, u64s(small).map(s64), st.sampled_from([-1, -P, -(2**63)]))


pages = st.integers(0, 10).map(lambda n: n * P)
offsets = s64s(st.one_of(pages, st.integers(-2, 12 * P)))
lengths = s64s(st.one_of(pages, st.integers(-1, 12 * P)))
gpas = u64s(st.integers(0, 15).map(lambda n: 0x1_0000_0000 + n * P))
TASK_SIZE_MAX = (1 << 47) - P
uaddrs = st.one_of(st.just(0), st.just(0), st.sampled_from([TASK_SIZE_MAX - P, TASK_SIZE_MAX, 1 << 47, 5]),
                   u64s(st.just(0)))
# Memslot sizes: small, rejected (unaligned, > KVM_MEM_MAX_NR_PAGES, wrapping) or at most 8 GiB:
# a valid slot of 2**31 - 1 pages would make this host allocate 16 GiB of rmaps.
slot_sizes = u64s(st.integers(0, 6).map(lambda n: n * P)).filter(lambda v: v % P or v <= 2**33 or v >= 2**43)
# Bind offsets: the edges themselves often (the loff_t wrap of docs/kernel-findings.md lives at
# 2**63 - a few pages), small page offsets, and anything.
bind_offsets = st.one_of(st.integers(0, 5).map(lambda n: n * P), st.sampled_from(EDGES), st.sampled_from(EDGES),
                         st.integers(0, 2**64 - 1))
slots = st.one_of(st.integers(0, 3), st.sampled_from([32763, 32764, 0xFFFF, 1 << 16, (1 << 16) | 2, 2**32 - 1]))
mem_flags = st.one_of(st.sampled_from([MemFlag.GUEST_MEMFD] * 6 + [0, 1, 2, 6]), st.sampled_from([MemFlag.GUEST_MEMFD]),
                      st.integers(0, 2**32 - 1))
caps = st.one_of(st.integers(0, 260), st.sampled_from(EDGES))
FD_KINDS = ["own", "own", "own", "other-vm", "closed", "never-open", "minus-one", "vm", "system", "vcpu",
            "memfd", "pipe", "devnull"]
NEVER_OPEN_FD = 1_000_000  # above any RLIMIT_NOFILE here: EBADF on both sides


def allocates(mode: int, offset: int, length: int, size: int) -> bool:
    """Whether fallocate would really allocate [offset, offset + length) of a ``size`` file."""
    return (mode & 0xFFFFFFFF == Falloc.KEEP_SIZE and 0 <= offset and 0 < length and not (offset | length) % P
            and offset + length <= size)


class Pair:
    """The same object on both backends."""

    def __init__(self, kvm, model, **info):
        self.kvm, self.model, self.info = kvm, model, info

    def __repr__(self) -> str:
        return f"Pair({self.info})"


class KernelVsModel(RuleBasedStateMachine):
    gmems = Bundle("gmems")
    maps = Bundle("maps")
    vms = Bundle("vms")

    def __init__(self) -> None:
        super().__init__()
        self.sys_kvm = guestmem.open_system("kvm")
        self.sys_model = guestmem.open_system("model", profile="6.18-host")
        self.system = Pair(self.sys_kvm, self.sys_model)
        self.vm = Pair(self.sys_kvm.create_vm(0), self.sys_model.create_vm(0), n=0)
        self.all_vms: list[Pair] = [self.vm]
        self.all_gmems: list[Pair] = []
        self.all_maps: list[Pair] = []
        self.vcpus: dict[int, Pair] = {}  # id(vm pair) -> vCPU pair
        self.memfd = os.memfd_create("diff-memfd")
        self.pipe = os.pipe()
        self.devnull = os.open("/dev/null", os.O_RDWR)

    def both(self, name: str, pair: Pair, *args, **kwargs):
        """Call ``name`` on both sides of ``pair``; assert identical outcomes; return them."""
        OPERATIONS["count"] += 1
        k = outcome(getattr(pair.kvm, name), *args, **kwargs)
        m = outcome(getattr(pair.model, name), *args, **kwargs)
        assert k[0] == m[0] and (k[0] == "ok" or k == m), f"{name}{args}: kernel {k} model {m}"
        return k, m

    @initialize(target=gmems, pages=st.integers(1, 16), flags=st.sampled_from([0, 1, 3]))
    def first_file(self, pages, flags):
        """Every run starts with a file of the first VM, so memslot rules bind from the first step."""
        k, m = self.both("create_guest_memfd", self.vm, pages * P, flags)
        pair = Pair(k[1], m[1], size=pages * P, flags=flags, vm=0)
        self.all_gmems.append(pair)
        return pair

    @rule(target=vms, vm_type=st.one_of(st.just(0), st.just(0), st.sampled_from([1, 2, 0x100]), u64s(st.just(0))))
    def create_vm(self, vm_type):
        if len(self.all_vms) >= 4:
            return self.vm
        k, m = self.both("create_vm", self.system, vm_type)
        if k[0] == "err":
            return self.vm
        pair = Pair(k[1], m[1], n=len(self.all_vms))
        self.all_vms.append(pair)
        return pair

    @rule(vm=st.none() | vms, cap=caps)
    def check_extension(self, vm, cap):
        k, m = self.both("check_extension", self.system if vm is None else vm, cap)
        if cap in UNCLAIMED_CAPS and k[0] == "ok":
            assert m == ("ok", 0)  # a feature the model does not implement is not claimed
            return
        assert k == m

    @rule(target=gmems, vm=st.none() | vms, pages=st.integers(0, 8), extra=st.sampled_from([0, 0, 0, 1, P - 1]),
          flags=st.sampled_from([0, 1, 2, 3, 3, 3, 4, 1 << 63]), big=st.none() | u64s(st.just(P)))
    def create(self, vm, pages, extra, flags, big):
        vm = vm or self.vm
        size = pages * P + extra if big is None else big
        k, m = self.both("create_guest_memfd", vm, size, flags)
        if k[0] == "err":
            return multiple()  # nothing for the bundle: rules taking a file then draw real ones
        pair = Pair(k[1], m[1], size=size, flags=flags, vm=vm.info["n"])
        self.all_gmems.append(pair)
        return pair

    @rule(g=gmems, mode=st.sampled_from(FALLOC_MODES), offset=offsets, length=lengths)
    def fallocate(self, g, mode, offset, length):
        if g is None:
            return
        if allocates(int(mode), offset, length, g.info["size"]) and length > 16 * P:
            return  # a real allocation of more than 64 KiB: never on a shared machine
        self.both("fallocate", g, mode, offset, length)

    @rule(g=gmems)
    def fstat(self, g):
        if g is None:
            return
        k, m = self.both("fstat", g)
        if k[0] == "ok":
            fields = ("st_mode", "st_size", "st_blksize", "st_blocks", "st_nlink", "st_uid", "st_gid")
            assert {f: getattr(k[1], f) for f in fields} == {f: getattr(m[1], f) for f in fields}
        k, m = self.both("fstatfs", g)
        assert k == m

    @rule(g=gmems, op=st.sampled_from(["read", "write", "pread", "pwrite", "lseek", "truncate"]),
          offset=s64s(st.integers(-2, 2 * P)), whence=st.one_of(st.integers(-1, 8), st.just(2**31 - 1)))
    def refused_syscall(self, g, op, offset, whence):
        if g is None:
            return
        args = {"read": (8,), "write": (b"x" * 8,), "pread": (8, offset), "pwrite": (b"x" * 8, offset),
                "lseek": (offset, whence), "truncate": (P,)}[op]
        self.both(op, g, *args)

    @rule(target=maps, g=gmems, pages=st.integers(1, 8), prot=st.sampled_from([3, 3, 1, 7]),
          map_flags=st.sampled_from([MAP_SHARED] * 4 + [MAP_PRIVATE, 0, 3, 0xF, 3 | 0x200000, 1 | 0x200000]))
    def mmap(self, g, pages, prot, map_flags):
        if g is None:
            return multiple()
        k, m = self.both("mmap", g, pages * P, 0, prot, flags=map_flags)
        if k[0] == "err":
            return multiple()
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

    def _fds(self, kind: str, vm: Pair, g: Pair | None) -> tuple[int, int] | None:
        """The guest_memfd field on each side for an fd of ``kind`` (None: not available now)."""
        if kind in ("own", "other-vm", "closed"):
            if g is None or (kind == "closed") != g.kvm.closed:
                return None
            if kind == "closed":
                return None  # a closed fd's number may be reused by now: "never-open" covers EBADF
            if (kind == "own") != (g.info["vm"] == vm.info["n"]):
                return None
            return g.kvm.fileno(), g.model.fileno()
        if kind == "vcpu":
            v = self.vcpus.get(id(vm))
            return None if v is None else (v.kvm.fileno(), v.model.fileno())
        return {"never-open": (NEVER_OPEN_FD, NEVER_OPEN_FD), "minus-one": (-1, -1),
                "vm": (vm.kvm.fileno(), vm.model.fileno()), "system": (self.sys_kvm.fileno(), self.sys_model.fileno()),
                "memfd": (self.memfd, self.memfd), "pipe": (self.pipe[0], self.pipe[0]),
                "devnull": (self.devnull, self.devnull)}[kind]

    @rule(vm=vms, slot=slots, g=gmems, fd_kind=st.sampled_from(FD_KINDS), gpa=gpas, size=slot_sizes,
          uaddr=uaddrs, offset=bind_offsets, flags=mem_flags, v1=st.booleans())
    def set_region(self, vm, slot, g, fd_kind, gpa, size, uaddr, offset, flags, v1):
        """Bind, re-bind, move or delete (size 0) a memslot, with a guest_memfd fd of any kind."""
        if fd_kind == "own" and g is not None:
            vm = self.all_vms[g.info["vm"]]  # bind the file to its own VM: the path where ranges matter
        fds = self._fds(fd_kind, vm, g)
        if fds is None:
            return
        OPERATIONS["count"] += 1
        if v1:
            k = outcome(vm.kvm.set_user_memory_region, slot, flags, gpa, size, uaddr)
            m = outcome(vm.model.set_user_memory_region, slot, flags, gpa, size, uaddr)
        else:
            k = outcome(vm.kvm.set_user_memory_region2, slot, flags, gpa, size, uaddr, fds[0], offset)
            m = outcome(vm.model.set_user_memory_region2, slot, flags, gpa, size, uaddr, fds[1], offset)
        assert k == m, (f"set_user_memory_region{'' if v1 else '2'}(slot={slot:#x}, flags={flags:#x}, "
                        f"gpa={gpa:#x}, size={size:#x}, uaddr={uaddr:#x}, fd={fd_kind}, off={offset:#x}): "
                        f"kernel {k} model {m}")

    @rule(g=gmems, offset=st.sampled_from(EDGES), pages=st.integers(1, 6), slot=st.integers(4, 7), gpa=gpas,
          delete=st.booleans())
    def bind_at_edge(self, g, offset, pages, slot, gpa, delete):
        """A guest_memfd memslot of the file's own VM at an edge offset (where bind's range
        arithmetic lives), then optionally deleted again."""
        if g.kvm.closed:
            return
        vm = self.all_vms[g.info["vm"]]
        OPERATIONS["count"] += 1
        args = (slot, MemFlag.GUEST_MEMFD, gpa, pages * P, 0)
        k = outcome(vm.kvm.set_user_memory_region2, *args, g.kvm.fileno(), offset)
        m = outcome(vm.model.set_user_memory_region2, *args, g.model.fileno(), offset)
        assert k == m, f"bind(slot={slot}, gpa={gpa:#x}, size={pages * P:#x}, off={offset:#x}): kernel {k} model {m}"
        if delete and k[0] == "ok":
            self.both("set_user_memory_region2", vm, slot, 0, 0, 0, 0)

    @rule(vm=vms, address=u64s(st.integers(0, 4).map(lambda n: n * P)), size=u64s(pages),
          attributes=st.sampled_from([0, 8, 1 << 63]), flags=st.sampled_from([0, 0, 1]))
    def set_memory_attributes(self, vm, address, size, attributes, flags):
        self.both("set_memory_attributes", vm, address, size, attributes, flags)

    @rule(vm=vms, vcpu_id=st.one_of(st.just(0), st.sampled_from([1, 4095, 4096, -1, 2**32]), u64s(st.just(0))))
    def create_vcpu(self, vm, vcpu_id):
        k, m = self.both("create_vcpu", vm, vcpu_id)
        if k[0] == "ok":
            self.vcpus.setdefault(id(vm), Pair(k[1], m[1]))

    @rule(vm=vms, gpa=gpas, size=u64s(pages), flags=st.sampled_from([0, 0, 0, 1, 1 << 63]))
    def pre_fault_memory(self, vm, gpa, size, flags):
        v = self.vcpus.get(id(vm))
        if v is not None:
            self.both("pre_fault_memory", v, gpa, size, flags)

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
        for v in self.vcpus.values():
            v.kvm.close()
            v.model.close()
        for vm in self.all_vms:
            vm.kvm.close()
            vm.model.close()
        self.sys_kvm.close()
        self.sys_model.close()
        for fd in (self.memfd, *self.pipe, self.devnull):
            os.close(fd)


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
