"""pre_fault_memory PF-01..PF-04 (spec 7.5, 2.5) on the model with real x86 guest code.

Model-only: this host's KVM has no TDP (KVM_CAP_PRE_FAULT_MEMORY = 0, the "6.18-host"
profile), so KVM_PRE_FAULT_MEMORY is EOPNOTSUPP there; the model's default profile (7.2)
has TDP. Configurations as in the selftest: (default VM, shared), (SW_PROTECTED, shared),
(SW_PROTECTED, private: a GUEST_MEMFD slot with PRIVATE attributes).

The guest-physical top: the selftest places slot 10 just below the VM's max_gfn. The
model's vCPUs reach 39 bits of guest-physical address space (Unicorn's 40-bit MMU, bit 39
reserved for the TDX-like shared bit, ``fault.PHYS_LIMIT``), so max_gfn is taken
from that limit, not from the 52-bit memslot limit.
"""

from __future__ import annotations

import errno
import threading

import pytest

from model_guests import GMEM, MB2, PAGE, PRIVATE, SW, Machine, anon

from guestmem.guest import PORT_DONE
from guestmem.model.fault import PHYS_LIMIT
from guestmem.types import IoExit

TEST_SIZE = MB2 + PAGE
TEST_NPAGES = TEST_SIZE // PAGE
TEST_SLOT = 10
MAX_GFN = PHYS_LIMIT // PAGE - 1
GPA = ((MAX_GFN - TEST_NPAGES) * PAGE) & ~(MB2 - 1)
JOIN_TIMEOUT = 10

CONFIGS = [pytest.param(0, False, id="default-shared"), pytest.param(SW, False, id="sw-shared"),
           pytest.param(SW, True, id="sw-private")]


class PrefaultVm:
    """One vCPU whose guest reads every page of slot 10 (mapped in its page tables)."""

    def __init__(self, system, vm_type: int, private: bool) -> None:
        self.m = Machine(system, vm_type, hypercalls=False)
        self.private = private
        self.flags = GMEM if private else 0
        self.gmems: list = []
        self.add_slot()
        code = (f"mov rdi, {GPA:#x}\nmov rcx, {TEST_NPAGES}\n"
                f"touch: mov rax, [rdi]\nadd rdi, {PAGE}\ndec rcx\njnz touch\n"
                f"mov eax, 0\nout {PORT_DONE}, eax")
        self.vcpu, = self.m.load(code, identity_map=[(GPA, TEST_SIZE)])
        if private:
            self.m.vm.set_memory_attributes(GPA, TEST_SIZE, PRIVATE)

    def add_slot(self) -> None:
        """vm_userspace_mem_region_add: fresh anonymous memory and, for GUEST_MEMFD, a fresh gmem."""
        shared = anon(TEST_SIZE)
        self.m.keep.append(shared)
        gmem = None
        if self.private:
            gmem = self.m.vm.create_guest_memfd(TEST_SIZE)
            self.gmems.append(gmem)
        self.m.vm.set_user_memory_region2(TEST_SLOT, self.flags, GPA, TEST_SIZE, shared.address, gmem, 0)

    def delete_slot(self) -> None:
        self.m.vm.set_user_memory_region2(TEST_SLOT, self.flags, GPA, 0, 0)

    def pre_fault_memory(self, offset: int, size: int, expected_left: int) -> None:
        """The selftest's loop: each call shrinks size and succeeds, or fails and leaves it."""
        worker_ready, prefault_ready, recreate = threading.Event(), threading.Event(), threading.Event()
        worker_error: list[BaseException] = []

        def worker() -> None:
            try:
                worker_ready.set()
                prefault_ready.wait()
                self.delete_slot()
                recreate.wait()
                self.add_slot()
            except BaseException as exc:
                worker_error.append(exc)

        t = threading.Thread(target=worker, daemon=True)
        t.start()
        worker_ready.wait()
        prefault_ready.set()
        gpa, left = GPA + offset, size
        recreated = False
        err = None
        while True:
            prev = left
            try:
                gpa, left = self.vcpu.pre_fault_memory(gpa, left)
                err = None
            except OSError as exc:
                err = exc.errno
            assert (left < prev) != (err is not None), \
                f"size {prev:#x} -> {left:#x} with {'error ' + errno.errorcode[err] if err else 'success'}"
            if err == errno.EINTR:
                continue
            if not recreated:
                recreate.set()
                t.join(timeout=JOIN_TIMEOUT)
                assert not t.is_alive(), "slot worker did not finish"
                assert not worker_error, worker_error
                recreated = True
                if left:
                    continue
            if not left or err is not None:
                break
        assert left == expected_left, f"completed with {left:#x} bytes left, expected {expected_left:#x}"
        if expected_left:
            assert err == errno.ENOENT, f"expected ENOENT, got {err and errno.errorcode[err]}"
        else:
            assert err is None

    def close(self) -> None:
        self.m.close()
        for g in self.gmems:
            g.close()


def pf01_to_pf03(vm: PrefaultVm) -> None:
    vm.pre_fault_memory(0, MB2, 0)                 # PF-01: the whole first 2 MiB
    vm.pre_fault_memory(MB2, 2 * PAGE, PAGE)       # PF-02: the 2nd page has no memslot
    vm.pre_fault_memory(TEST_SIZE, PAGE, PAGE)     # PF-03: only the page past the slot


@pytest.mark.parametrize("vm_type,private", CONFIGS)
def test_pf01_to_pf03_prefault_racing_slot_recreation(model_system, vm_type, private):
    """PF-01..PF-03 with the selftest's loop rule while a worker deletes and recreates slot 10."""
    vm = PrefaultVm(model_system, vm_type, private)
    pf01_to_pf03(vm)
    vm.close()


@pytest.mark.parametrize("vm_type,private", CONFIGS)
def test_pf04_guest_reads_every_page_after_prefaulting(model_system, vm_type, private):
    """PF-04: after PF-01..PF-03 the guest reads all 513 pages and reaches DONE."""
    vm = PrefaultVm(model_system, vm_type, private)
    pf01_to_pf03(vm)
    assert vm.vcpu.run() == IoExit(1, 4, PORT_DONE, 1, bytes(4))
    vm.close()


def test_pf04_guest_runs_after_a_block_was_prefaulted_twice(model_system):
    """Regression: pre-faulting one 2 MiB block twice unmaps it between the steps; the first
    run() must still fault in the page tables and reach DONE (it used to end in ShutdownExit:
    Unicorn kept a #PF "in flight" after the unmap, so the page walk's #PF became a triple fault)."""
    vm = PrefaultVm(model_system, SW, False)
    assert vm.vcpu.pre_fault_memory(GPA, MB2) == (GPA + MB2, 0)
    assert vm.vcpu.pre_fault_memory(GPA, MB2) == (GPA + MB2, 0)
    assert vm.vcpu.run() == IoExit(1, 4, PORT_DONE, 1, bytes(4))
    vm.close()


@pytest.mark.parametrize("vm_type,private", CONFIGS)
def test_pf_prefault_after_slot_deleted_fails_and_leaves_size(model_system, vm_type, private):
    """The ordering the race may not produce: the slot is gone before the first step, so the
    call fails and writes nothing back (ENOENT: no memslot is emulated MMIO; EFAULT when the
    GPA is still PRIVATE, spec 5.2 step 3); after recreation it completes."""
    vm = PrefaultVm(model_system, vm_type, private)
    vm.delete_slot()
    with pytest.raises(OSError) as exc:
        vm.vcpu.pre_fault_memory(GPA, MB2)
    assert exc.value.errno == (errno.EFAULT if private else errno.ENOENT)
    vm.add_slot()
    assert vm.vcpu.pre_fault_memory(GPA, MB2) == (GPA + MB2, 0)
    vm.close()
