"""private_mem_conversions PC-00..PC-06 (spec 7.2) on the model with real x86 guest code.

Model-only: this host's KVM has no private memory (KVM_SET_MEMORY_ATTRIBUTES is ENOTTY).

Each vCPU runs the selftest's guest flow at CPL0 (MAP_GPA_RANGE needs CPL0) over its own
2 MiB + 4 KiB at 4 GiB + i * 4 MiB. The guest program is generated from the Python flow
below: ``rep stosb`` fills, ``repe scasb`` checks that report a mismatch on PORT_FAIL with
a check id, VMCALL for MAP_GPA_RANGE and ``out PORT_SYNC`` for the SYNC_SHARED and
SYNC_PRIVATE ucalls (arguments in RDI, RSI, RDX, RCX, the guest.py convention).
"""

from __future__ import annotations

import threading

import pytest

from model_guests import GMEM, MB2, PAGE, PRIVATE, SW, Machine

from guestmem import hostmem
from guestmem.guest import PORT_DONE, PORT_FAIL, PORT_SYNC
from guestmem.types import HypercallExit, IoExit
from guestmem.uapi import Hypercall

BASE_GPA = 1 << 32
BASE_SLOT = 10
PER_CPU_DATA = MB2 + PAGE
PER_CPU = 2 * MB2  # align_up(2 MiB + 4 KiB, 2 MiB)
# The selftest's own MAP_GPA_RANGE attribute bits (KVM does not interpret them).
SET_ATTRIBUTES, MAP_SHARED, DO_FALLOCATE = 1, 2, 4
SYNC_SHARED, SYNC_PRIVATE = 0, 1
FAIL_CHECK, FAIL_HYPERCALL = 0x100, 0x200
TEST_RANGES = ((0, PAGE), (0, MB2), (PAGE, PAGE), (PAGE, MB2), (MB2, PAGE))
INIT, DEF, P1, P2, P3, P4 = 0xCC, 0xAA, 0x11, 0x22, 0x33, 0x44
JOIN_TIMEOUT = 60


class GuestProgram:
    """Guest code for one flow; R15 holds the vCPU's base GPA, offsets are relative to it."""

    def __init__(self) -> None:
        self.lines = ["mov r15, rdi"]
        self.checks: list[str] = []  # check id -> what the guest expected

    def memset(self, off: int, size: int, pattern: int) -> None:
        self.lines += [f"lea rdi, [r15 + {off:#x}]", f"mov eax, {pattern:#x}", f"mov rcx, {size:#x}",
                       "call g_memset"]

    def memcmp(self, off: int, size: int, pattern: int) -> None:
        if size == 0:
            return
        self.checks.append(f"guest expected {pattern:#x} in [base+{off:#x}, +{size:#x})")
        self.lines += [f"mov r14d, {FAIL_CHECK | (len(self.checks) - 1):#x}", f"lea rdi, [r15 + {off:#x}]",
                       f"mov eax, {pattern:#x}", f"mov rcx, {size:#x}", "call g_memcmp"]

    def map_gpa(self, off: int, size: int, flags: int) -> None:
        self.lines += [f"mov eax, {int(Hypercall.MAP_GPA_RANGE)}", f"lea rbx, [r15 + {off:#x}]",
                       f"mov rcx, {size // PAGE:#x}", f"mov rdx, {flags:#x}", "call g_hypercall"]

    def map_shared(self, off: int, size: int, fallocate: bool) -> None:
        self.map_gpa(off, size, SET_ATTRIBUTES | MAP_SHARED | (DO_FALLOCATE if fallocate else 0))

    def map_private(self, off: int, size: int, fallocate: bool) -> None:
        self.map_gpa(off, size, SET_ATTRIBUTES | (DO_FALLOCATE if fallocate else 0))

    def punch_hole(self, off: int, size: int) -> None:
        self.map_gpa(off, size, MAP_SHARED | DO_FALLOCATE)  # a punch without a conversion

    def sync(self, kind: int, off: int, size: int, cur: int, new: int = 0) -> None:
        self.lines += [f"lea rdi, [r15 + {off:#x}]", f"mov rsi, {size:#x}", f"mov edx, {cur:#x}",
                       f"mov ecx, {new:#x}", f"mov eax, {kind}", f"out {PORT_SYNC}, eax"]

    def source(self) -> str:
        return "\n".join(self.lines + [
            f"mov eax, 0\nout {PORT_DONE}, eax\ng_end: jmp g_end",
            "g_memset: rep stosb\nret",
            "g_memcmp: repe scasb\njne g_cmp_fail\nret",
            # RDI: the first mismatching address, RSI: the byte found there.
            f"g_cmp_fail: dec rdi\nmovzx esi, byte ptr [rdi]\nmov eax, r14d\ng_cf: out {PORT_FAIL}, eax\njmp g_cf",
            "g_hypercall: vmcall\ntest rax, rax\njnz g_hc_fail\nret",
            f"g_hc_fail: mov rdi, rax\nmov eax, {FAIL_HYPERCALL}\ng_hf: out {PORT_FAIL}, eax\njmp g_hf",
        ])


def explicit_conversion(g: GuestProgram, do_fallocate: bool) -> None:
    """PC-01 (do_fallocate False) / PC-02 (True): guest_test_explicit_conversion's steps."""
    g.memset(0, PER_CPU_DATA, DEF)
    g.memcmp(0, PER_CPU_DATA, DEF)
    g.sync(SYNC_SHARED, 0, PER_CPU_DATA, DEF, INIT)
    g.memcmp(0, PER_CPU_DATA, INIT)
    for off, size in TEST_RANGES:
        g.memset(off, size, P1)
        g.map_private(off, size, do_fallocate)
        if size > PAGE:
            g.memset(off, PAGE, P2)
        else:
            g.memset(off, size, P2)
            g.sync(SYNC_PRIVATE, off, size, P1)  # the host still sees the shared P1
            g.memcmp(off, size, P2)
            g.memcmp(0, off, INIT)
            g.memcmp(off + size, PER_CPU_DATA - off - size, INIT)
            for j in range(0, size, PAGE):  # odd pages back to shared, even ones stay private
                if (j // PAGE) & 1:
                    g.map_shared(off + j, PAGE, do_fallocate)
                    g.sync(SYNC_SHARED, off + j, PAGE, P1, P3)
                    g.memcmp(off + j, PAGE, P3)
                else:
                    g.sync(SYNC_PRIVATE, off + j, PAGE, P1)
        g.map_shared(off, size, do_fallocate)
        g.memset(off, size, P3)
        g.sync(SYNC_SHARED, off, size, P3, P4)
        g.memcmp(off, size, P4)
        g.memset(off, size, INIT)
        g.map_shared(0, PER_CPU_DATA, True)  # free all private memory before the next range


def punch_hole(g: GuestProgram, precise: bool) -> None:
    """PC-03 (imprecise) / PC-04 (precise): guest_test_punch_hole's steps."""
    g.map_private(0, PER_CPU_DATA, False)
    for off, size in TEST_RANGES:
        g.punch_hole(0, PER_CPU_DATA)
        if precise:
            g.memset(off, size, INIT)
            g.memcmp(off, size, INIT)
        else:
            g.memset(0, PER_CPU_DATA, INIT)
            g.memcmp(0, PER_CPU_DATA, INIT)
        g.punch_hole(off, size)
        g.memcmp(off, size, 0)  # a fresh zero page, no exit


def memfd_mapping(size: int) -> hostmem.Mapping:
    """Shared memory from a memfd, as the selftest's shared backing (its userspace_addr)."""
    return hostmem.map_memfd("pc-shared", size)


class ConversionsVm:
    """PC-00: the SW VM, one gmem of PER_CPU * nr_vcpus split over ``nr_memslots`` slots."""

    def __init__(self, system, nr_vcpus: int, nr_memslots: int, source: str) -> None:
        self.m = Machine(system, SW, hypercalls=True)  # enables EXIT_HYPERCALL with 1 << 12
        self.size = PER_CPU * nr_vcpus
        assert self.size % nr_memslots == 0
        self.slot_size = self.size // nr_memslots
        self.gmem = self.m.vm.create_guest_memfd(self.size, 0)
        self.shared = []
        for k in range(nr_memslots):
            mapping = memfd_mapping(self.slot_size)
            self.shared.append(mapping)
            self.m.vm.set_user_memory_region2(BASE_SLOT + k, GMEM, BASE_GPA + k * self.slot_size, self.slot_size,
                                              mapping.address, self.gmem, k * self.slot_size)
        bases = [BASE_GPA + i * PER_CPU for i in range(nr_vcpus)]
        self.vcpus = self.m.load(source, identity_map=[(b, PER_CPU_DATA) for b in bases], vcpus=nr_vcpus)
        for v, b in zip(self.vcpus, bases):
            v.set_regs(v.get_regs().replace(rdi=b))

    def host_chunks(self, gpa: int, size: int):
        """(shared mapping, offset, length) pieces of [gpa, gpa+size), split at memslot edges."""
        while size:
            k, off = divmod(gpa - BASE_GPA, self.slot_size)
            n = min(size, self.slot_size - off)
            yield self.shared[k], off, n
            gpa, size = gpa + n, size - n

    def handle_hypercall(self, v, ex: HypercallExit) -> None:
        assert ex.nr == Hypercall.MAP_GPA_RANGE, ex
        gpa, npages, flags = ex.args[:3]
        size = npages * PAGE
        if flags & DO_FALLOCATE:
            # The slots are bound back to back, so the gmem offset is gpa - BASE_GPA for any
            # gpa of the data area (vm_guest_mem_fallocate splits the same way per slot).
            if flags & MAP_SHARED:
                self.gmem.punch_hole(gpa - BASE_GPA, size)
            else:
                self.gmem.allocate(gpa - BASE_GPA, size)
        if flags & SET_ATTRIBUTES:
            self.m.vm.set_memory_attributes(gpa, size, 0 if flags & MAP_SHARED else PRIVATE)
        v.set_hypercall_ret(0)

    def handle_sync(self, v) -> None:
        r = v.get_regs()
        kind, gpa, size, cur, new = r.rax & 0xFFFFFFFF, r.rdi, r.rsi, r.rdx & 0xFF, r.rcx & 0xFF
        assert kind in (SYNC_SHARED, SYNC_PRIVATE), kind
        for mapping, off, n in self.host_chunks(gpa, size):
            data = mapping.read(off, n)
            if data != bytes([cur]) * n:  # private writes never show in the shared backing
                bad = next(i for i, b in enumerate(data) if b != cur)
                raise AssertionError(f"host expected {cur:#x} at gpa {gpa + bad:#x}, got {data[bad]:#x}")
            if kind == SYNC_SHARED:
                mapping.fill(off, n, new)
            gpa += n

    def vcpu_loop(self, v, checks: list[str]) -> None:
        """Run one vCPU to DONE; every exit is a hypercall or a port I/O (PC-05)."""
        while True:
            ex = v.run()
            if isinstance(ex, HypercallExit):
                self.handle_hypercall(v, ex)
                continue
            if not isinstance(ex, IoExit):
                raise UnexpectedExit(f"vcpu {v.vcpu_id}: unexpected exit {ex!r}")
            if ex.port == PORT_SYNC:
                self.handle_sync(v)
            elif ex.port == PORT_DONE:
                return
            elif ex.port == PORT_FAIL:
                code, r = int.from_bytes(ex.data, "little"), v.get_regs()
                if code & FAIL_CHECK:
                    raise AssertionError(f"vcpu {v.vcpu_id}: {checks[code & 0xFF]}: "
                                         f"got {r.rsi:#x} at gpa {r.rdi:#x}")
                raise AssertionError(f"vcpu {v.vcpu_id}: guest failure {code:#x} rdi={r.rdi:#x}")
            else:
                raise AssertionError(f"vcpu {v.vcpu_id}: unexpected I/O {ex!r}")

    def run(self, checks: list[str]) -> None:
        errors: list[BaseException] = []

        def thread(v) -> None:
            try:
                self.vcpu_loop(v, checks)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=thread, args=(v,), daemon=True) for v in self.vcpus]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=JOIN_TIMEOUT)
        if any(t.is_alive() for t in threads):
            for v in self.vcpus:
                v.kick()
            pytest.fail(f"vCPU threads still running after {JOIN_TIMEOUT} s")
        if errors:
            raise errors[0]

    def free_vm(self) -> None:
        """kvm_vm_free: close every vCPU and the VM fd; the gmem stays open."""
        self.m.close()


class UnexpectedExit(AssertionError):
    """The vCPU left with an exit the selftest forbids (anything but a hypercall or port I/O)."""


SLOW = pytest.mark.slow


def shape(n: int, m: int, *marks):
    return pytest.param(n, m, id=f"{n}vcpu-{m}slot", marks=marks)


FLOWS = {
    "pc01_explicit_no_fallocate": lambda g: explicit_conversion(g, False),
    "pc02_explicit_fallocate": lambda g: explicit_conversion(g, True),
    "pc03_punch_hole_imprecise": lambda g: punch_hole(g, False),
    "pc04_punch_hole_precise": lambda g: punch_hole(g, True),
}


def run_flows(system, nr_vcpus: int, nr_memslots: int, flows) -> ConversionsVm:
    g = GuestProgram()
    for flow in flows:
        FLOWS[flow](g)
    vm = ConversionsVm(system, nr_vcpus, nr_memslots, g.source())
    vm.run(g.checks)
    return vm


def pc06_fallocate_after_vm_freed(vm: ConversionsVm) -> None:
    """PC-06: with every VM and vCPU fd closed, punch and re-allocate the whole gmem (it pins the VM)."""
    vm.free_vm()
    assert vm.m.vm._users == 1  # the gmem's reference is the only one left
    vm.gmem.punch_hole(0, vm.size)
    vm.gmem.allocate(0, vm.size)
    vm.gmem.close()
    assert vm.m.vm._users == 0


FLOW_CASES = [
    pytest.param(flow, n, m, id=f"{flow}-{n}vcpu-{m}slot",
                 marks=[SLOW] if n == 4 else [])
    for flow in FLOWS for n in (1, 4) for m in (1, 2)
]


@pytest.mark.parametrize("flow,nr_vcpus,nr_memslots", FLOW_CASES)
def test_pc_flow_reaches_done_without_memory_fault_then_pc06(model_system, flow, nr_vcpus, nr_memslots):
    """One of PC-01..PC-04 per VM: the guest reaches DONE, every exit is a hypercall or a ucall
    (PC-05), host SYNC checks hold; then PC-06 on the same gmem. 4-vCPU shapes are ``slow``
    here; the default run covers 4 vCPUs with the full flow below."""
    vm = run_flows(model_system, nr_vcpus, nr_memslots, [flow])
    pc06_fallocate_after_vm_freed(vm)


@pytest.mark.parametrize("nr_vcpus,nr_memslots", [
    shape(1, 1), shape(1, 2), shape(4, 1, SLOW), shape(4, 2),
])
def test_pc05_full_selftest_guest_code_never_exits_with_memory_fault(model_system, nr_vcpus, nr_memslots):
    """PC-05: the selftest's whole guest_code (PC-01, PC-02, PC-03, PC-04 in one run per vCPU,
    vCPUs in parallel threads) reaches DONE with no KVM_EXIT_MEMORY_FAULT; then PC-06."""
    vm = run_flows(model_system, nr_vcpus, nr_memslots, list(FLOWS))
    pc06_fallocate_after_vm_freed(vm)
