"""vmm.memory: layout validation, slot planning, backings, the attribute map, snapshots."""

from __future__ import annotations

import errno

import pytest
from bounded import run_bounded

from guestmem.uapi import PAGE_SIZE, Cap, MemFlag, VmType
from guestmem.vmm.layout import MAX_SLOT_SIZE, Region, plan_slots
from guestmem.vmm.memory import Conversion, GuestMemory

GiB, MiB = 1 << 30, 1 << 20
DATA = 4 * GiB


def test_slot_plan_splits_regions_above_the_memslot_page_limit():
    big = Region("big", 0, 3 * MAX_SLOT_SIZE + 2 * MiB)
    plan = plan_slots([big, Region("small", 64 << 40, 2 * MiB)], nr_memslots=32764, first_slot=5)
    assert [(slot, r.name, off, size) for slot, r, off, size in plan] == [
        (5, "big", 0, MAX_SLOT_SIZE), (6, "big", MAX_SLOT_SIZE, MAX_SLOT_SIZE),
        (7, "big", 2 * MAX_SLOT_SIZE, MAX_SLOT_SIZE), (8, "big", 3 * MAX_SLOT_SIZE, 2 * MiB),
        (9, "small", 0, 2 * MiB)]
    assert MAX_SLOT_SIZE // PAGE_SIZE <= (1 << 31) - 1


def test_slot_plan_beyond_the_slot_limit_is_enospc():
    regions = [Region(f"r{i}", i * 2 * MiB, 2 * MiB) for i in range(5)]
    with pytest.raises(OSError) as exc:
        plan_slots(regions, nr_memslots=4)
    assert exc.value.errno == errno.ENOSPC


@pytest.mark.parametrize("regions, err", [
    ([Region("a", 0, 2 * MiB), Region("b", MiB, 2 * MiB)], errno.EEXIST),
    ([Region("a", 0x800, 2 * MiB)], errno.EINVAL),
    ([Region("a", 0, 0)], errno.EINVAL),
    ([Region("a", 0, MiB), Region("a", 2 * MiB, MiB)], errno.EINVAL),
    ([Region("a", 0, MiB, backing="tmpfs")], errno.EINVAL),
    ([], errno.EINVAL),
])
def test_invalid_layouts_are_refused_before_any_vm_call(regions, err):
    class NoVm:  # any call would fail the test
        pass

    with pytest.raises(OSError) as exc:
        GuestMemory(NoVm(), regions)  # type: ignore[arg-type]
    assert exc.value.errno == err


def test_shared_only_region_uses_an_in_place_guest_memfd_when_the_vm_offers_it(system):
    vm = system.create_vm(0)
    mem = GuestMemory(vm, [Region("boot", 0, 2 * MiB), Region("data", DATA, 4 * MiB)])
    try:
        snap = mem.snapshot()
        assert snap.backings == ("gmem", "gmem")
        assert all(s.flags == MemFlag.GUEST_MEMFD for s in snap.slots)
        assert snap.slots[1].userspace_addr == mem.shared_mapping("data").address
        mem.write(DATA + 5 * PAGE_SIZE, b"guest-first")
        assert mem.read(DATA + 5 * PAGE_SIZE, 11) == b"guest-first"
        assert mem.populated("data") == [(DATA + 5 * PAGE_SIZE, DATA + 6 * PAGE_SIZE)]
    finally:
        mem.close()
        vm.close()


def test_memfd_backing_on_request(system):
    vm = system.create_vm(0)
    mem = GuestMemory(vm, [Region("boot", 0, 2 * MiB, backing="memfd")])
    try:
        assert mem.snapshot().backings == ("memfd",)
        assert mem.snapshot().slots[0].flags == 0
    finally:
        mem.close()
        vm.close()


def test_private_capable_region_without_private_memory_is_eopnotsupp(system):
    vm = system.create_vm(0)
    try:
        with pytest.raises(OSError) as exc:
            GuestMemory(vm, [Region("data", DATA, 4 * MiB, private=True)])
        assert exc.value.errno == errno.EOPNOTSUPP
        assert "private memory" in str(exc.value)
    finally:
        vm.close()


@pytest.fixture
def sw_memory(model_system):
    """Model only: a SW_PROTECTED VM (private memory) with a boot region and a 64 MiB data region."""
    vm = model_system.create_vm(VmType.SW_PROTECTED)
    mem = GuestMemory(vm, [Region("boot", 0, 2 * MiB), Region("data", DATA, 64 * MiB, private=True)])
    yield mem
    mem.close()
    vm.close()


def test_private_capable_region_binds_a_guest_memfd_and_a_shared_memfd(sw_memory):
    snap = sw_memory.snapshot()
    assert snap.backings == ("memfd", "gmem+memfd")
    data_slot = snap.slots[1]
    assert data_slot.flags == MemFlag.GUEST_MEMFD and data_slot.guest_memfd_offset == 0
    assert data_slot.userspace_addr == sw_memory.shared_mapping("data").address
    assert sw_memory.gmem("data") is not None and sw_memory.gmem("boot") is None


def test_region_at_names_the_region_holding_an_address(sw_memory):
    boot, data = sw_memory.regions
    assert sw_memory.region_at(0) == boot and sw_memory.region_at(2 * MiB - 1) == boot
    assert sw_memory.region_at(2 * MiB) is None  # the hole between the regions
    assert sw_memory.region_at(DATA - 1) is None
    assert sw_memory.region_at(DATA) == data and sw_memory.region_at(DATA + 64 * MiB - 1) == data
    assert sw_memory.region_at(DATA + 64 * MiB) is None


def test_attribute_map_queries_ranges(sw_memory):
    mem = sw_memory
    mem.set_attributes(DATA + 2 * MiB, 2 * MiB + PAGE_SIZE, True)
    mem.set_attributes(DATA + 3 * MiB, PAGE_SIZE, False)
    assert mem.private_ranges(DATA, DATA + 64 * MiB) == [
        (DATA + 2 * MiB, DATA + 3 * MiB), (DATA + 3 * MiB + PAGE_SIZE, DATA + 4 * MiB + PAGE_SIZE)]
    assert mem.private_ranges(DATA + 2 * MiB + PAGE_SIZE, DATA + 2 * MiB + 3 * PAGE_SIZE) == [
        (DATA + 2 * MiB + PAGE_SIZE, DATA + 2 * MiB + 3 * PAGE_SIZE)]
    assert mem.is_private(DATA + 2 * MiB) is True
    assert mem.is_private(DATA) is False
    assert mem.is_private(DATA + 2 * MiB, 2 * MiB) is None  # mixed
    assert mem.vm.get_memory_attributes(DATA + 2 * MiB, PAGE_SIZE)[0][2] == 8  # the kernel agrees (model)


def test_listeners_get_each_whole_range_once(sw_memory):
    seen = []
    sw_memory.add_listener(seen.append)
    sw_memory.set_attributes(DATA, 512 * MiB // 8, True)
    sw_memory.set_attributes(DATA + MiB, PAGE_SIZE, False)
    sw_memory.remove_listener(seen.append)
    sw_memory.set_attributes(DATA, PAGE_SIZE, False)
    assert seen == [Conversion(DATA, 64 * MiB, True), Conversion(DATA + MiB, PAGE_SIZE, False)]


def test_failed_attribute_change_leaves_map_and_listeners_untouched(sw_memory):
    seen = []
    sw_memory.add_listener(seen.append)
    before = sw_memory.snapshot()
    with pytest.raises(OSError) as exc:
        sw_memory.set_attributes(DATA + 1, PAGE_SIZE, True)
    assert exc.value.errno == errno.EINVAL
    assert seen == [] and sw_memory.snapshot() is before


def test_snapshots_are_immutable_and_copy_on_write(sw_memory):
    a = sw_memory.snapshot()
    assert sw_memory.snapshot() is a  # nothing changed: the same object
    sw_memory.set_attributes(DATA, 2 * MiB, True)
    b = sw_memory.snapshot()
    assert b is not a and b.generation == a.generation + 1
    assert a.private == () and b.private == ((DATA, DATA + 2 * MiB),)
    assert b.is_private(DATA + MiB) and not b.is_private(DATA + 2 * MiB) and not a.is_private(DATA)
    assert b.private_ranges(DATA + MiB, DATA + 8 * MiB) == [(DATA + MiB, DATA + 2 * MiB)]
    with pytest.raises(AttributeError):
        b.private = ()  # type: ignore[misc]


def test_discard_punches_the_backing_the_new_state_does_not_use(sw_memory):
    mem = sw_memory
    mem.fill(DATA, 4 * MiB, 0xAA)
    steps = mem.discard(DATA + MiB, 2 * MiB, private=True)
    assert steps == [("memfd", MiB, 2 * MiB)]
    assert mem.read(DATA + MiB, 2 * MiB) == bytes(2 * MiB)
    assert mem.read(DATA, 16) == b"\xaa" * 16
    assert mem.discard(DATA, PAGE_SIZE, private=False) == [("gmem", 0, PAGE_SIZE)]
    assert mem.discard(0, PAGE_SIZE, private=True) == []  # shared-only memory has one backing


def test_a_one_tib_guest_is_range_based(model_system):
    """Model only (private memory): attribute changes over 1 TiB cost one range, not 2**28 pages."""
    vm = model_system.create_vm(VmType.SW_PROTECTED)
    mem = GuestMemory(vm, [Region("boot", 0, 2 * MiB), Region("huge", 1 << 40, 1 << 40, private=True)])
    try:
        mem.set_attributes(1 << 40, 1 << 40, True)
        mem.set_attributes((1 << 40) + GiB, PAGE_SIZE, False)
        assert len(mem.snapshot().private) == 2
        assert vm.check_extension(Cap.NR_MEMSLOTS) >= len(mem.slots)
    finally:
        mem.close()
        vm.close()


def test_gmem_only_region_host_view_is_the_guest_memfd_the_guest_uses(model_system):
    """Model only (private memory). A private-capable region whose guest_memfd has MMAP is
    bound GMEM_ONLY (spec 2.3 step 17.6): the guest's *shared* accesses go to the guest_memfd
    too, so the host's view of the region must be that guest_memfd's mapping, never a second
    memfd the guest does not use. On 6.18 a VM with private memory cannot create INIT_SHARED
    guest_memfds, so every host touch of that mapping faults (spec 3.3, 11.9): the layer's
    read/write refuse with EFAULT instead of returning the zeros of an unrelated memfd, and a
    touch of ``shared_mapping`` SIGBUSes like the kernel's mapping."""
    from guestmem.vmm.machine import Machine, boot_region
    from guestmem.workloads.secret import probe_mapping_in_child

    with Machine(model_system, [boot_region(), Region("data", DATA, 4 * MiB, private=True, gmem_mmap=True)]) as m:
        m.load_assembly(f"mov rax, 0x1122334455667788; mov rbx, {DATA:#x}; mov [rbx], rax; "
                        "mov rcx, [rbx]; cmp rcx, rax; jne bad; xor eax, eax; out 0xf4, eax; bad: hlt")
        (loop,) = m.run(timeout=20)
        assert loop.result == 0  # the guest wrote and read back its value through a shared access
        mem = m.memory
        snap = mem.snapshot()
        assert snap.backings[1] == "gmem-mmap"
        assert mem.host_accessible("boot") and not mem.host_accessible("data")
        view = mem.shared_mapping("data")
        assert snap.slots[1].userspace_addr == view.address
        assert probe_mapping_in_child(view, 0, 8) == ("SIGBUS", b"")  # the guest_memfd's mapping, not a memfd
        with pytest.raises(OSError) as exc:
            mem.read(DATA, 8)  # was: 8 zero bytes from a memfd the guest never touches
        assert exc.value.errno == errno.EFAULT and "INIT_SHARED" in str(exc.value)
        with pytest.raises(OSError) as exc:
            mem.write(DATA, b"\0" * 8)  # was: silently written where the guest never looks
        assert exc.value.errno == errno.EFAULT
        assert mem.read(0, 8) is not None  # the boot region stays readable



def _returns_quickly(code: str) -> str:
    proc = run_bounded(code)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("max_slot_size", [0, -PAGE_SIZE, -1, PAGE_SIZE + 1])
def test_slot_plan_refuses_a_max_slot_size_that_is_not_a_positive_page_multiple(max_slot_size):
    out = _returns_quickly(
        "from guestmem.vmm.layout import Region, plan_slots\n"
        "try:\n"
        f"    plan_slots([Region('a', 0, 2 << 20)], 32764, max_slot_size={max_slot_size})\n"
        "except OSError as exc:\n"
        "    print(exc.errno, exc)\n")
    assert out.startswith(f"{errno.EINVAL} ") and "max_slot_size" in out


def test_slot_plan_of_a_huge_region_is_enospc_at_once():
    """2**80 bytes would need ~2**37 memslots: counted, not enumerated."""
    out = _returns_quickly(
        "from guestmem.vmm.layout import Region, plan_slots\n"
        "try:\n"
        "    plan_slots([Region('huge', 0, 2**80)], 32764)\n"
        "except OSError as exc:\n"
        "    print(exc.errno, exc)\n")
    assert out.startswith(f"{errno.ENOSPC} ") and "32764" in out


@pytest.mark.parametrize("gpa, size", [(DATA, 2**80), (DATA, 1 << 52), ((1 << 52) - 2 * MiB, 4 * MiB), (2**64, 2 * MiB)])
def test_regions_past_the_52_bit_guest_physical_space_are_refused_before_any_vm_call(gpa, size):
    """x86-64 guest physical addresses have at most 52 bits (MAXPHYADDR; the model's
    max_gpa_bits), so no backend can map such a region: EINVAL naming it, at once."""
    out = _returns_quickly(
        "from guestmem.vmm.layout import Region\nfrom guestmem.vmm.memory import GuestMemory\n"
        "class NoVm: pass\n"  # any VM call would raise AttributeError
        "try:\n"
        f"    GuestMemory(NoVm(), [Region('boot', 0, 2 << 20), Region('huge', {gpa}, {size})])\n"
        "except OSError as exc:\n"
        "    print(exc.errno, exc)\n")
    assert out.startswith(f"{errno.EINVAL} ") and "'huge'" in out and "52" in out


def _vm_and_layer(mem):
    """What a failed call must leave unchanged: the VM's attributes and the layer's own view."""
    return mem.vm.get_memory_attributes(0, 1 << 52), mem.private_ranges(0, 1 << 52), mem.snapshot()


@pytest.mark.parametrize("gpa, size, private, err", [
    (DATA + 0.0, PAGE_SIZE, True, TypeError),  # the VM took int(gpa) while the map raised: they disagreed
    (DATA, float(PAGE_SIZE), True, TypeError),
    (DATA, PAGE_SIZE, "no", TypeError),  # was: a truthy string made the range private
    (DATA, PAGE_SIZE, None, TypeError),
    (0, PAGE_SIZE, True, errno.EINVAL),  # the shared-only boot region: was accepted
    (1 << 40, PAGE_SIZE, True, errno.EINVAL),  # no region at all: was accepted
    (DATA + 64 * MiB - PAGE_SIZE, 2 * PAGE_SIZE, True, errno.EINVAL),  # runs past the region's end
    (DATA + 1, PAGE_SIZE, True, errno.EINVAL),
    (DATA, 0, True, errno.EINVAL),
    (DATA, -PAGE_SIZE, True, errno.EINVAL),
])
def test_a_failed_set_attributes_changes_neither_the_vm_nor_the_layer(sw_memory, gpa, size, private, err):
    """Model only (private memory). Everything is validated before the VM is touched, and
    only private-capable memory takes attributes: afterwards the VM and the layer agree."""
    mem = sw_memory
    mem.set_attributes(DATA + MiB, 2 * MiB, True)
    seen = []
    mem.add_listener(seen.append)
    before = _vm_and_layer(mem)
    with pytest.raises(TypeError if err is TypeError else OSError) as exc:
        mem.set_attributes(gpa, size, private)
    if err is not TypeError:
        assert exc.value.errno == err
    assert _vm_and_layer(mem) == before and seen == []
    assert mem.vm.get_memory_attributes(0, 1 << 52) == [  # and both still say what was set
        (0, DATA + MiB, 0), (DATA + MiB, DATA + 3 * MiB, 8), (DATA + 3 * MiB, 1 << 52, 0)]
