"""vCPU ioctls behave alike on both backends: creation, reset state, register checks, completions.

Each test runs on the kernel (this host's /dev/kvm) and on the model; the expected values come
from the kernel (KVM's vCPU reset, kvm_vm_ioctl_create_vcpu, kvm_arch_vcpu_ioctl_set_sregs).
"""

from __future__ import annotations

import dataclasses
import errno
import threading
import time

import pytest

from guestmem import guest
from guestmem.types import HltExit, IoExit, MmioExit
from conftest import GUEST_RAM_SIZE as RAM_SIZE, add_ram, vcpu_of
from guestmem.uapi import GuestMemfdFlag, MemFlag

SHARED = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
MMIO_GPA = 0x4000_0000  # no memslot there
PORT = 0x11


def boot(vm, code: str, **kwargs):
    ram = add_ram(vm, 0, 0, RAM_SIZE)
    image = guest.long_mode_guest(code, identity_map=[(MMIO_GPA, RAM_SIZE)], **kwargs)
    guest.load(image, {0: ram})
    vcpu = vcpu_of(vm)
    guest.setup_vcpu(vcpu, image)
    return vcpu


# --- completing exits (issue 11 item 4) ----------------------------------------------------------


def test_complete_io_none_after_an_out(vm):
    vcpu = boot(vm, f"mov al, 3\nout {PORT}, al\nhlt")
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit) and exit_.data == b"\x03"
    vcpu.complete_io(None)
    assert isinstance(vcpu.run(), HltExit)


def test_complete_mmio_none_after_a_write(vm):
    vcpu = boot(vm, f"mov rbx, {MMIO_GPA:#x}\nmov byte ptr [rbx], 7\nhlt")
    exit_ = vcpu.run()
    assert isinstance(exit_, MmioExit) and exit_.is_write and exit_.data == b"\x07"
    vcpu.complete_mmio(None)
    assert isinstance(vcpu.run(), HltExit)


def test_completions_need_data_after_a_read(vm):
    vcpu = boot(vm, f"in al, {PORT}\nmov rbx, {MMIO_GPA:#x}\nmov al, [rbx]\nhlt")
    assert isinstance(vcpu.run(), IoExit)
    with pytest.raises(TypeError):
        vcpu.complete_io(None)
    vcpu.complete_io(b"\x01")
    exit_ = vcpu.run()
    assert isinstance(exit_, MmioExit) and not exit_.is_write
    with pytest.raises(TypeError):
        vcpu.complete_mmio(None)
    vcpu.complete_mmio(b"\x02")
    assert isinstance(vcpu.run(), HltExit)
    assert vcpu.get_regs().rax & 0xFF == 2


def test_completion_none_without_matching_exit_is_einval(vm):
    vcpu = boot(vm, f"out {PORT}, al\nhlt")
    assert isinstance(vcpu.run(), IoExit)
    with pytest.raises(OSError) as exc:
        vcpu.complete_mmio(None)
    assert exc.value.errno == errno.EINVAL


# --- creation (issue 11 item 3) -----------------------------------------------------------------


@pytest.mark.parametrize("vcpu_id", [-1, 4096, 5000, 2**32, 2**40])
def test_create_vcpu_refuses_ids_from_kvm_max_vcpu_ids(system, vcpu_id):
    with system.create_vm() as vm:
        with pytest.raises(OSError) as exc:
            vm.create_vcpu(vcpu_id)
        assert exc.value.errno == errno.EINVAL
        vm.create_vcpu(4095).close()  # the last id KVM_CAP_MAX_VCPU_ID allows


def test_duplicate_vcpu_id_is_eexist_even_after_close(system):
    with system.create_vm() as vm:
        vcpu = vm.create_vcpu(3)
        with pytest.raises(OSError) as exc:
            vm.create_vcpu(3)
        assert exc.value.errno == errno.EEXIST
        vcpu.close()  # the vCPU lives until its VM is destroyed
        with pytest.raises(OSError) as exc:
            vm.create_vcpu(3)
        assert exc.value.errno == errno.EEXIST
        vm.create_vcpu(4).close()


def test_vcpu_count_limit_comes_before_the_duplicate_check(system):
    """KVM_CAP_MAX_VCPUS vCPUs exist: one more is EINVAL, even for an id in use (EEXIST
    would be checked only after the count)."""
    limit = system.check_extension(66)  # KVM_CAP_MAX_VCPUS
    with system.create_vm() as vm:
        vcpus = [vm.create_vcpu(i) for i in range(limit)]
        try:
            for vcpu_id in (limit, 0):
                with pytest.raises(OSError) as exc:
                    vm.create_vcpu(vcpu_id)
                assert exc.value.errno == errno.EINVAL, vcpu_id
        finally:
            for vcpu in vcpus:
                vcpu.close()


# --- reset state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpu_id", [0, 1])
def test_new_vcpu_is_at_the_reset_vector(system, vcpu_id):
    with system.create_vm() as vm:
        with vm.create_vcpu(vcpu_id) as vcpu:
            r, s = vcpu.get_regs(), vcpu.get_sregs()
    assert (r.rip, r.rflags, r.rdx) == (0xFFF0, 0x2, 0x600)
    assert (s.cs.selector, s.cs.base, s.cs.limit) == (0xF000, 0xFFFF_0000, 0xFFFF)
    assert (s.cr0, s.cr4, s.efer) == (0x6000_0010, 0, 0)
    assert s.apic_base == 0xFEE0_0800 | (0x100 if vcpu_id == 0 else 0)  # BSP flag on vCPU 0 only


RESET_GETTERS = ("get_regs", "get_sregs", "get_fpu", "get_debugregs", "get_xcrs", "get_vcpu_events", "get_mp_state")


@pytest.mark.parametrize("irqchip", [False, True])
def test_new_vcpu_state_equals_kvm_field_by_field(kvm_system, model_system, irqchip):
    """Every field KVM reports for fresh vCPUs 0 and 1 (registers, special registers, FPU,
    debug registers, XCRs, events, MP state), with and without an in-kernel irqchip."""
    seen = {}
    for name, system in (("kvm", kvm_system), ("model", model_system)):
        with system.create_vm() as vm:
            if irqchip:
                vm.create_irqchip()
            for vcpu_id in (0, 1):
                with vm.create_vcpu(vcpu_id) as vcpu:
                    seen[name, vcpu_id] = {g: getattr(vcpu, g)() for g in RESET_GETTERS}
    for vcpu_id in (0, 1):
        for getter in RESET_GETTERS:
            k, m = seen["kvm", vcpu_id][getter], seen["model", vcpu_id][getter]
            if dataclasses.is_dataclass(k):
                k, m = dataclasses.asdict(k), dataclasses.asdict(m)
            assert m == k, (vcpu_id, getter)


# --- KVM_SET_REGS / KVM_SET_SREGS checks ---------------------------------------------------------


@pytest.fixture
def vcpu(vm):
    vcpu = vm.create_vcpu(0)
    vm.test_objects.append(vcpu)
    return vcpu


@pytest.mark.parametrize("field", ["rax", "r15", "rip", "rflags"])
def test_set_regs_with_a_value_beyond_u64_is_einval(vcpu, field):
    before = vcpu.get_regs()
    with pytest.raises(OSError) as exc:
        vcpu.set_regs(before.replace(**{field: 2**64}))
    assert exc.value.errno == errno.EINVAL
    assert vcpu.get_regs() == before


def test_set_regs_keeps_rflags_bit_1_set(vcpu):
    vcpu.set_regs(vcpu.get_regs().replace(rflags=0, rax=-1))
    r = vcpu.get_regs()
    assert (r.rflags, r.rax) == (0x2, 2**64 - 1)


PE, NW, CD, PG = 1 << 0, 1 << 29, 1 << 30, 1 << 31
PAE, LME, LMA = 1 << 5, 1 << 8, 1 << 10


def _long_mode(s, **changes):
    return s.replace(**{"cr0": s.cr0 | PE | PG, "cr4": PAE, "efer": LME | LMA, **changes})


INVALID_SREGS = {
    "PG without PE": lambda s: s.replace(cr0=s.cr0 | PG),
    "CR0 bit 32": lambda s: s.replace(cr0=s.cr0 | 1 << 32),
    "CR0 bit 63": lambda s: s.replace(cr0=s.cr0 | 1 << 63),
    "NW without CD": lambda s: s.replace(cr0=(s.cr0 & ~CD) | NW),
    "LME and PG without PAE": lambda s: _long_mode(s, cr4=0),
    "LME and PG without LMA": lambda s: _long_mode(s, efer=LME),
    "LMA without PG": lambda s: s.replace(cr0=s.cr0 | PE, cr4=PAE, efer=LME | LMA),
    "LMA alone": lambda s: s.replace(efer=LMA),
    "CS.L in real mode": lambda s: s.replace(cs=s.cs.replace(l=1)),
    "CS.L in protected mode": lambda s: s.replace(cr0=s.cr0 | PE, cs=s.cs.replace(l=1)),
    "long mode CR3 beyond MAXPHYADDR": lambda s: _long_mode(s, cr3=1 << 52),
    "CR4 reserved bit 15": lambda s: s.replace(cr4=1 << 15),
    "CR4.VMXE": lambda s: s.replace(cr4=1 << 13),
    "CR4.LA57": lambda s: s.replace(cr4=1 << 12),
    "CR4 bit 63": lambda s: s.replace(cr4=1 << 63),
    "APIC base reserved bit 0": lambda s: s.replace(apic_base=s.apic_base | 1),
    "APIC base reserved bit 9": lambda s: s.replace(apic_base=s.apic_base | 1 << 9),
    "APIC base bit 63": lambda s: s.replace(apic_base=s.apic_base | 1 << 63),
    "x2APIC without xAPIC enabled": lambda s: s.replace(apic_base=(s.apic_base & ~(1 << 11)) | 1 << 10),
    "selector beyond u16": lambda s: s.replace(ds=s.ds.replace(selector=1 << 16)),
    "cr3 beyond u64": lambda s: s.replace(cr3=2**64),
}


@pytest.mark.parametrize("case", sorted(INVALID_SREGS))
def test_set_sregs_refuses_what_kvm_refuses(vcpu, case):
    before = vcpu.get_sregs()
    with pytest.raises(OSError) as exc:
        vcpu.set_sregs(INVALID_SREGS[case](before))
    assert exc.value.errno == errno.EINVAL
    assert vcpu.get_sregs() == before


VALID_SREGS = {
    "protected mode": lambda s: s.replace(cr0=s.cr0 | PE),
    "long mode": lambda s: _long_mode(s),
    "long mode with 64-bit CS": lambda s: _long_mode(s, cs=s.cs.replace(l=1)),
    "EFER.LME without PG": lambda s: s.replace(efer=LME),
    "CD and NW clear": lambda s: s.replace(cr0=s.cr0 & ~(CD | NW)),
    "CR4 OSFXSR|OSXMMEXCPT|PAE|PSE": lambda s: s.replace(cr4=1 << 9 | 1 << 10 | PAE | 1 << 4),
    "CR4 SMEP|SMAP": lambda s: s.replace(cr4=1 << 20 | 1 << 21),
    "APIC disabled": lambda s: s.replace(apic_base=s.apic_base & ~(1 << 11)),
    "x2APIC": lambda s: s.replace(apic_base=s.apic_base | 1 << 10),
}


@pytest.mark.kvm_pvm_differs("kvm_pvm accepts CR0.PG outside long mode but reads it back clear (measured)")
def test_set_sregs_keeps_32_bit_paging(vcpu):
    want = vcpu.get_sregs()
    want = want.replace(cr0=want.cr0 | PE | PG)
    vcpu.set_sregs(want)
    assert vcpu.get_sregs().cr0 == want.cr0


@pytest.mark.parametrize("case", sorted(VALID_SREGS))
def test_set_sregs_accepts_what_kvm_accepts(vcpu, case):
    want = VALID_SREGS[case](vcpu.get_sregs())
    vcpu.set_sregs(want)
    got = vcpu.get_sregs()
    assert (got.cr0, got.cr4, got.efer, got.apic_base, got.cs.l) == (want.cr0, want.cr4, want.efer, want.apic_base, want.cs.l)


# --- races with close() (issue 10 item 4) --------------------------------------------------------


def _spinning_vcpu(vm):
    """A vCPU whose guest loops forever without exiting, after one run (its engine is built)."""
    vcpu = boot(vm, f"out {PORT}, al\nspin:\njmp spin")
    assert isinstance(vcpu.run(), IoExit)
    vm.test_objects.remove(vcpu)
    return vcpu


def test_register_reads_racing_close_complete_or_fail_with_ebadf(vm):
    vcpu = boot(vm, f"out {PORT}, al\nhlt")
    assert isinstance(vcpu.run(), IoExit)  # the registers now live in the engine (model)
    vm.test_objects.remove(vcpu)
    unexpected = []
    start = threading.Barrier(3)

    def reader(read):
        start.wait()
        while True:
            try:
                read()
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    unexpected.append(exc)
                return
            except Exception as exc:  # noqa: BLE001 - anything but EBADF is the bug
                unexpected.append(exc)
                return

    threads = [threading.Thread(target=reader, args=(f,)) for f in (vcpu.get_regs, vcpu.get_sregs)]
    for t in threads:
        t.start()
    start.wait()
    vcpu.close()
    for t in threads:
        t.join(10)
    assert not unexpected, unexpected


def test_close_during_run_returns_an_exit_or_ebadf(vm):
    """close() while another thread spins in run(): that run() returns (an exit, or EBADF),
    never an error about kvm_run being unmapped under it, and later calls are EBADF."""
    vcpu = _spinning_vcpu(vm)
    outcome = []

    def runner():
        try:
            outcome.append(vcpu.run())
        except BaseException as exc:  # noqa: BLE001 - recorded and judged below
            outcome.append(exc)

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    time.sleep(0.1)
    assert not outcome, outcome  # still spinning
    vcpu.close()
    thread.join(5)
    if thread.is_alive():
        vcpu.kick()  # the fix's promise: a kick after close still reaches the run
        thread.join(5)
    assert not thread.is_alive(), "close() left the vCPU thread spinning in run()"
    result = outcome[0]
    assert not isinstance(result, BaseException) or (isinstance(result, OSError) and result.errno == errno.EBADF), result
    for call in (vcpu.run, vcpu.kick, vcpu.get_regs):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EBADF


def test_model_ioctl_entered_before_close_completes_fails_with_ebadf(model_system):
    """The deterministic form of the race above, on the model only (the interleaving is forced
    through its ioctl lock): close() runs to completion after get_sregs() was entered but
    before it holds the vCPU's lock. The closed check must come under the lock: EBADF, not an
    AttributeError from the engine close() dropped."""
    vm = model_system.create_vm()
    vm.test_objects = []
    try:
        vcpu = boot(vm, f"out {PORT}, al\nhlt")
        assert isinstance(vcpu.run(), IoExit)  # the special registers now live in the engine
        real = vcpu._ioctl_lock

        class CloseFirst:
            """The vCPU's lock, except that the first ``with`` lets a close() finish first."""

            armed = True

            def acquire(self, *args, **kwargs):
                return real.acquire(*args, **kwargs)

            def release(self):
                real.release()

            def __enter__(self):
                if CloseFirst.armed:
                    CloseFirst.armed = False
                    closer = threading.Thread(target=vcpu.close)
                    closer.start()
                    closer.join(10)
                real.acquire()

            def __exit__(self, *exc):
                real.release()

        vcpu._ioctl_lock = CloseFirst()
        with pytest.raises(OSError) as exc:
            vcpu.get_sregs()
        assert exc.value.errno == errno.EBADF
    finally:
        for obj in reversed(vm.test_objects):
            obj.close()
        vm.close()


def test_model_runs_from_reset_at_selector_times_16_plus_ip(model_system):
    """Documented deviation (README, "The model's vCPUs"): Unicorn's real mode takes the CS base
    from the selector, so a model vCPU run straight from reset fetches at 0xF000 * 16 + 0xFFF0
    = 0xFFFF0, where KVM fetches at the reset vector 0xFFFFFFF0. A HLT there shows it."""
    with model_system.create_vm() as vm:
        gmem = vm.create_guest_memfd(0x10000, SHARED)
        ram = gmem.mmap()
        try:
            vm.set_user_memory_region2(0, MemFlag.GUEST_MEMFD, 0xF0000, 0x10000, userspace_addr=ram.address,
                                       guest_memfd=gmem)
            ram.write(0xFFF0, b"\xf4")  # hlt at 0xFFFF0
            with vm.create_vcpu(0) as vcpu:
                assert vcpu.get_sregs().cs.base == 0xFFFF_0000  # what KVM reports
                assert isinstance(vcpu.run(), HltExit)
                assert vcpu.get_regs().rip == 0xFFF1
        finally:
            ram.close()
            gmem.close()
