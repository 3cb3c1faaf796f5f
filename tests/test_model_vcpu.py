"""Model vCPU (Unicorn) tests: exits, the fault path, invalidation, mapping levels, pre-fault.

Model-only: private memory, memory-fault exits and hwpoison cannot run on this host's KVM.
Until the model ``Vm`` lands these tests drive ``guestmem.model.vcpu.Vcpu`` through
``ContractVm``, a minimal VM honouring the internal contract the vCPU relies on (``_lock``,
``_slot_for_gfn``, ``_attribute_at``, invalidation listeners, ``_stats_providers``, and the
dirty-log and ioeventfd hooks of ``model.vm_state``, here with nothing logged or registered).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
import threading

import keystone
import pytest

from guestmem import hostmem
from guestmem.model import fdtable
from guestmem.model.gmem_inode import FileState
from guestmem.model.memslot import Memslot
from guestmem.model.vcpu import Vcpu
from guestmem.types import HltExit, HypercallExit, IntrExit, IoExit, MemoryFaultExit, MmioExit, Regs, Segment, Sregs
from guestmem.uapi import MemFlag, MemoryAttribute

PAGE = 4096
CODE = 0x10000
LONG = Sregs(cs=Segment(selector=8, type=11, l=1, limit=0xFFFFFFFF, g=1), cr0=0x80000011, cr3=0x1000,
             cr4=0x20, efer=0x500)
_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)


def asm(src: str) -> bytes:
    return bytes(_ks.asm(src, CODE)[0])


class Gmem:
    def __init__(self, size: int) -> None:
        self.size = size
        self._memfd = hostmem.memfd("test-gmem", size)
        self._host_address = hostmem.mmap(size, 3, hostmem.MAP_SHARED, self._memfd, 0)
        self._poisoned: set[int] = set()
        self._released = False
        self._state = FileState(size // PAGE, init_shared=False)  # allocation accounting (pre-fault)

    def punch(self, off: int, n: int, vm: "ContractVm", gfn: int) -> None:
        with vm._lock:
            hostmem.fallocate(self._memfd, 3, off, n)
            self._poisoned -= set(range(off, off + n, PAGE))
            vm.notify(gfn, gfn + n // PAGE)

    def read(self, off: int, n: int) -> bytes:
        return ctypes.string_at(self._host_address + off, n)


class ContractVm:
    def __init__(self, private: bool = True) -> None:
        self._lock = threading.RLock()
        self._mm = fdtable.mm  # the process the VM belongs to (vCPU ioctls check it)
        self.type = 1 if private else 0
        self._private_mem = private
        self._exit_hypercall_mask = 1 << 12
        self.slots: list[Memslot] = []
        self.attrs: dict[int, int] = {}
        self._listeners: list = []
        self._stats_providers: list = []
        self._ioeventfds: list = []
        self._users = 1

    def _get_kvm(self) -> None:
        self._users += 1

    def _put_kvm(self) -> None:
        self._users -= 1

    @property
    def _profile(self):
        from guestmem.model.profile import PROFILES

        return PROFILES["6.18"]

    def _slot_for_gfn(self, gfn: int, as_id: int = 0):
        return next((s for s in self.slots if s.base_gfn <= gfn < s.base_gfn + s.npages), None)

    def _attribute_at(self, gfn: int) -> int:
        return self.attrs.get(gfn, 0)

    def _dirty_logged(self, slot) -> bool:
        return False

    def _log_dirty(self, slot, gfn: int) -> bool:
        return False

    def _add_invalidation_listener(self, cb) -> None:
        self._listeners.append(cb)

    def _remove_invalidation_listener(self, cb) -> None:
        self._listeners.remove(cb)

    def notify(self, s: int, e: int) -> None:
        with self._lock:
            for cb in list(self._listeners):
                cb(s, e)

    def set_attr(self, gfn: int, n: int, value: int) -> None:
        with self._lock:
            for g in range(gfn, gfn + n):
                self.attrs[g] = value
            for s in self.slots:  # recompute mixed bits the simple way
                s._mixed = {1: set(), 2: set()}
                for g, v in self.attrs.items():
                    if v and s.base_gfn <= g < s.base_gfn + s.npages:
                        s._mixed[1].add(g // 512)
                        s._mixed[2].add(g // (1 << 18))
                for lvl, n_ in ((1, 512), (2, 1 << 18)):
                    s._mixed[lvl] = {b for b in s._mixed[lvl]
                                     if len({self.attrs.get(x, 0) for x in range(b * n_, b * n_ + min(n_, 1024))}) > 1
                                     or any(self.attrs.get(x, 0) != self.attrs.get(b * n_, 0) for x in range(b * n_, b * n_ + n_, 64))}
            self.notify(gfn, gfn + n)

    def stats(self) -> dict:
        out: dict = {}
        for p in self._stats_providers:
            out.update(p())
        return out


@pytest.fixture
def low():
    """A VM with a 4 MiB anonymous slot 0 at GPA 0 holding 1 GiB-page identity tables."""
    m = mmap.mmap(-1, 0x400000)
    addr = ctypes.addressof((ctypes.c_char * len(m)).from_buffer(m))
    m[0x1000:0x1008] = struct.pack("<Q", 0x2003)
    for i in range(512):
        m[0x2000 + 8 * i:0x2008 + 8 * i] = struct.pack("<Q", (i << 30) | 0x83)
    vm = ContractVm()
    vm.slots.append(Memslot(id=0, as_id=0, base_gfn=0, npages=0x400, flags=0, userspace_addr=addr))
    yield vm, m
    vm._listeners.clear()


def vcpu_with(vm, m, src: str) -> Vcpu:
    code = asm(src)
    m[CODE:CODE + len(code)] = code
    v = Vcpu(vm, len(vm._stats_providers))
    v.set_sregs(LONG)
    v.set_regs(Regs(rip=CODE, rsp=0x8000))
    return v


def add_gmem_slot(vm, gpa: int, size: int, slot_id: int = 10, flags=MemFlag.GUEST_MEMFD):
    g = Gmem(size) if flags & MemFlag.GUEST_MEMFD else None
    mem = mmap.mmap(-1, size)
    addr = ctypes.addressof((ctypes.c_char * size).from_buffer(mem))
    s = Memslot(id=slot_id, as_id=0, base_gfn=gpa // PAGE, npages=size // PAGE, flags=int(flags),
                userspace_addr=addr, gmem=g)
    s._mixed = {1: set(), 2: set()}
    vm.slots.append(s)
    return g, mem, s


def test_io_mmio_hlt_exits(low):
    vm, m = low
    v = vcpu_with(vm, m, """
        mov al, 7; out 0x10, al
        mov dx, 0x20; in eax, dx; mov ebx, eax
        mov rdi, 0x80000000; mov rsi, [rdi]
        mov qword ptr [rdi+8], 0x77
        hlt""")
    assert v.run() == IoExit(1, 1, 0x10, 1, b"\x07")
    assert v.run() == IoExit(0, 4, 0x20, 1, b"")
    v.complete_io(b"\x44\x33\x22\x11")
    assert v.run() == MmioExit(0x80000000, b"", 8, False)
    v.complete_mmio(b"\x99" * 8)
    assert v.run() == MmioExit(0x80000008, b"\x77" + bytes(7), 8, True)
    assert v.run() == HltExit()
    r = v.get_regs()
    assert r.rbx == 0x11223344 and r.rsi == 0x9999999999999999


def test_map_gpa_range_hypercall_and_checks(low):
    vm, m = low
    v = vcpu_with(vm, m, """
        mov rax, 12; mov rbx, 0x200000; mov rcx, 1; mov rdx, 0x10; vmcall; mov r8, rax
        mov rax, 12; mov rbx, 0x200001; mov rcx, 1; vmmcall; mov r9, rax
        mov rax, 12; mov rbx, 0x200000; mov rcx, 0; vmcall; mov r10, rax
        mov rax, 99; vmcall; mov r11, rax
        hlt""")
    assert v.run() == HypercallExit(nr=12, args=(0x200000, 1, 0x10, 0, 0, 0), ret=0, flags=1)
    v.set_hypercall_ret(5)
    assert v.run() == HltExit()
    r = v.get_regs()
    assert r.r8 == 5
    assert r.r9 == r.r10 == 2**64 - 22  # -KVM_EINVAL
    assert r.r11 == 2**64 - 1000  # -KVM_ENOSYS
    vm._exit_hypercall_mask = 0
    v.set_regs(Regs(rip=CODE, rsp=0x8000))
    assert v.run() == HltExit()
    assert v.get_regs().r8 == 2**64 - 1000


def test_private_access_without_slot_or_gmem(low):
    """PE-02: private access to a non-gmem slot → EFAULT memory fault with PRIVATE; no slot too."""
    vm, m = low
    _, keep, _ = add_gmem_slot(vm, 0xC000_0000, 2 * 1024 * 1024, flags=0)
    vm.set_attr(0xC0000, 1, MemoryAttribute.PRIVATE)
    vm.set_attr(0xD0000, 1, MemoryAttribute.PRIVATE)
    v = vcpu_with(vm, m, "mov rdi, 0xc0000000; mov rax, [rdi]; mov rdi, 0xd0000000; mov rax, [rdi]; hlt")
    assert v.run() == MemoryFaultExit(flags=8, gpa=0xC000_0000, size=4096, errno=errno.EFAULT)
    vm.set_attr(0xC0000, 1, 0)
    assert v.run() == MemoryFaultExit(flags=8, gpa=0xD000_0000, size=4096, errno=errno.EFAULT)


def test_punch_attribute_flip_delete_and_levels(low):
    vm, m = low
    g, shared, slot = add_gmem_slot(vm, 0x4000_0000, 4 * 1024 * 1024)
    vm.set_attr(0x40000, 1024, MemoryAttribute.PRIVATE)
    v = vcpu_with(vm, m, "mov rdi, 0x40000000; mov byte ptr [rdi], 0x5a; out 0x10, al; mov bl, [rdi]; out 0x11, al; hlt")
    assert v.run().port == 0x10
    assert g.read(0, 1) == b"\x5a"  # private write went to gmem, not the shared mapping
    assert shared[0] == 0
    assert vm.stats()[f"vcpu{v.vcpu_id}_mappings_2m"] == 2  # code block + uniform private block
    g.punch(0, PAGE, vm, 0x40000)  # invalidation must drop the mapping: fresh zero page
    assert v.run().port == 0x11
    assert v.get_regs().rbx & 0xFF == 0
    vm.set_attr(0x40001, 1, 0)  # mixed block now: 4 KiB mappings
    v.set_regs(Regs(rip=CODE, rsp=0x8000))
    assert v.run().port == 0x10
    assert vm.stats()[f"vcpu{v.vcpu_id}_mappings_4k"] >= 1
    vm.set_attr(0x40000, 1, 0)  # flip to shared: the guest now sees the slot's userspace memory
    shared[0] = 0x33
    v.set_regs(Regs(rip=CODE + 0x0C, rsp=0x8000, rdi=0x40000000))  # at "mov bl, [rdi]"
    assert v.run().port == 0x11
    assert v.get_regs().rbx & 0xFF == 0x33
    with vm._lock:  # memslot delete: shared accesses become MMIO
        vm.slots.remove(slot)
        vm.notify(0x40000, 0x40400)
    v.set_regs(Regs(rip=CODE + 0x0C, rsp=0x8000, rdi=0x40000000))
    assert v.run() == MmioExit(0x4000_0000, b"", 1, False)


def test_hwpoison_then_punch(low):
    vm, m = low
    g, _, _ = add_gmem_slot(vm, 0x4000_0000, 2 * 1024 * 1024)
    vm.set_attr(0x40000, 512, MemoryAttribute.PRIVATE)
    with vm._lock:
        g._poisoned.add(0)
        vm.notify(0x40000, 0x40001)
    v = vcpu_with(vm, m, "mov rdi, 0x40000000; mov al, [rdi]; hlt")
    assert v.run() == MemoryFaultExit(flags=8, gpa=0x4000_0000, size=4096, errno=133)
    g.punch(0, PAGE, vm, 0x40000)
    assert v.run() == HltExit()


def test_released_gmem_faults_efault(low):
    vm, m = low
    g, _, slot = add_gmem_slot(vm, 0x4000_0000, 2 * 1024 * 1024)
    vm.set_attr(0x40000, 512, MemoryAttribute.PRIVATE)
    with vm._lock:
        g._released = True
        slot.gmem = None
        vm.notify(0x40000, 0x40200)
    v = vcpu_with(vm, m, "mov rdi, 0x40000000; mov al, [rdi]; hlt")
    assert v.run() == MemoryFaultExit(flags=8, gpa=0x4000_0000, size=4096, errno=errno.EFAULT)


def test_kick_makes_run_return_intr(low):
    vm, m = low
    v = vcpu_with(vm, m, "l: jmp l")
    v.kick()
    assert v.run() == IntrExit()
    t = threading.Timer(0.2, v.kick)
    t.start()
    assert v.run() == IntrExit()
    t.join()


def test_pre_fault_memory_rules(low):
    vm, m = low
    g, _, _ = add_gmem_slot(vm, 0x4000_0000, 2 * 1024 * 1024 + PAGE)
    vm.set_attr(0x40000, 513, MemoryAttribute.PRIVATE)
    v = vcpu_with(vm, m, "hlt")
    for args in ((0x4000_0000, PAGE, 1), (0x4000_0001, PAGE, 0), (0x4000_0000, 0, 0), (2**64 - PAGE, 2 * PAGE, 0)):
        with pytest.raises(OSError) as exc:
            v.pre_fault_memory(*args)
        assert exc.value.errno == errno.EINVAL
    assert v.pre_fault_memory(0x4000_0000, 0x200000) == (0x4020_0000, 0)  # PF-01
    assert v.pre_fault_memory(0x4020_0000, 2 * PAGE) == (0x4020_1000, PAGE)  # PF-02: partial progress
    with pytest.raises(OSError) as exc:
        v.pre_fault_memory(0x4020_1000, PAGE)  # PF-03
    assert exc.value.errno == errno.ENOENT


def test_closed_vcpu_fails_every_method_with_ebadf(low):
    vm, m = low
    v = vcpu_with(vm, m, "hlt")
    v.close()
    for call in (v.get_regs, v.get_sregs, v.run, v.kick, lambda: v.set_regs(Regs()), lambda: v.set_sregs(Sregs()),
                 lambda: v.complete_io(b""), lambda: v.complete_mmio(b""), lambda: v.set_hypercall_ret(0),
                 lambda: v.pre_fault_memory(0, PAGE)):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EBADF


def test_concurrent_vcpus_with_host_punching(low):
    """4 vCPUs write and verify private pages while the host punches: no stale data, no deadlock."""
    vm, m = low
    g, _, _ = add_gmem_slot(vm, 0x4000_0000, 4 * 1024 * 1024)
    vm.set_attr(0x40000, 1024, MemoryAttribute.PRIVATE)
    src = """
        mov rdi, 0x40000000; add rdi, r12
        l: mov byte ptr [rdi], r13b; mov al, [rdi]; cmp al, r13b; jne bad; out 0x10, al; jmp l
        bad: mov bl, al; out 0x11, al; hlt"""
    vcpus = [vcpu_with(vm, m, src) for _ in range(4)]
    errors: list = []
    stop = threading.Event()

    def worker(i: int, v: Vcpu) -> None:
        v.set_regs(Regs(rip=CODE, rsp=0x8000, r12=i * 0x100000, r13=0x11 * (i + 1)))
        for _ in range(300):
            ex = v.run()
            if not (isinstance(ex, IoExit) and ex.port == 0x10):
                errors.append((i, ex))
                return

    def puncher() -> None:
        while not stop.is_set():
            for i in range(4):
                g.punch(i * 0x100000, PAGE, vm, 0x40000 + i * 256)

    threads = [threading.Thread(target=worker, args=(i, v)) for i, v in enumerate(vcpus)]
    p = threading.Thread(target=puncher)
    p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    stop.set()
    p.join(timeout=5)
    assert not any(t.is_alive() for t in threads) and not p.is_alive()
    assert not errors
