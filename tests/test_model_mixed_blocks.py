"""Model-only: memory attributes and mixed hugepage blocks against a reference (spec section 4).

The host kernel has no KVM_SET_MEMORY_ATTRIBUTES, and the kernel exposes no mixed bits
anyway, so the model's range-based bookkeeping is checked against the obvious definitions:
the attribute runs against a plain list of runs, and a 2 MiB / 1 GiB block fully inside a
memslot is mixed exactly when an attribute boundary falls strictly inside it.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import guestmem
from guestmem.model.memslot import LEVEL_PAGES
from guestmem.uapi import VmType

from reference_runs import reference_set

P = 4096
L1, L2 = LEVEL_PAGES[1], LEVEL_PAGES[2]  # pages per 2 MiB and per 1 GiB block
PRIVATE = 8
SW = int(VmType.SW_PROTECTED)
SPACE = 6 * L2  # gfns the operations touch

# Slot 0 starts 3 blocks of 2 MiB below a 1 GiB boundary and ends 700 pages into a 2 MiB
# block; slot 1 is 1 GiB aligned and 1 GiB + 2 MiB long. Both leave partial blocks at edges.
SLOTS = [(0, L2 - 3 * L1, 2 * L2 + 3 * L1 + 700), (1, 4 * L2, L2 + L1)]  # (id, base_gfn, npages)


def reference_mixed(runs, base, npages, n):
    """Blocks of n pages fully inside [base, base + npages) holding a boundary strictly inside."""
    first, end = -(-base // n), (base + npages) // n
    return sorted({g // n for s, e, _ in runs for g in (s, e) if g % n and first <= g // n < end})


def mixed_blocks(slot, level):
    return sorted(b for s, e, _ in slot._mixed[level] for b in range(s, e))


def make_vm(sys_):
    vm = sys_.create_vm(SW)
    for id_, base, npages in SLOTS:
        vm.set_user_memory_region(id_, 0, base * P, npages * P)
    return vm


def assert_matches(vm, runs):
    vm._check_invariants()
    tiles = vm.get_memory_attributes(0, SPACE * P)
    assert [(s // P, e // P, v) for s, e, v in tiles if v] == runs
    stats = vm.stats()["mixed_blocks"]
    for id_, base, npages in SLOTS:
        slot = vm._slot_for_gfn(base)
        for level, n in LEVEL_PAGES.items():
            expected = reference_mixed(runs, base, npages, n)
            assert mixed_blocks(slot, level) == expected, (id_, level)
            assert stats[f"0:{id_}"]["2M" if level == 1 else "1G"] == len(expected)
            for b in expected[:3] + expected[-3:]:
                assert slot.is_mixed(level, b * n) and slot.is_mixed(level, b * n + n - 1)


# gfns near 2 MiB and 1 GiB boundaries (and the slots' own edges), where off-by-ones live
near_boundary = st.builds(
    lambda unit, k, delta: min(SPACE, max(0, unit * k + delta)),
    st.sampled_from([L1, L2, L1, 1]), st.integers(0, SPACE // L1), st.sampled_from([-1, 0, 0, 1, 7]),
).map(lambda g: g if g <= SPACE else SPACE)
slot_edges = st.sampled_from(sorted({g + d for _, b, n in SLOTS for g in (b, b + n) for d in (-1, 0, 1)}))
points = st.one_of(near_boundary, slot_edges, st.integers(0, SPACE))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(points, points, st.sampled_from([0, PRIVATE])), min_size=1, max_size=30))
def test_attributes_and_mixed_blocks_match_reference(operations):
    with guestmem.open_system("model") as sys_:
        vm = make_vm(sys_)
        runs: list[tuple[int, int, int]] = []
        for a, b, value in operations:
            lo, hi = min(a, b), max(a, b)
            if lo == hi:
                continue
            vm.set_memory_attributes(lo * P, (hi - lo) * P, value)
            runs = reference_set(runs, lo, hi, value)
            assert_matches(vm, runs)
        vm.close()


@pytest.fixture
def vm():
    with guestmem.open_system("model") as sys_:
        v = make_vm(sys_)
        yield v
        v.close()


def fragment(vm, every: int, count: int, start: int = 0):
    """One private page in the middle of each of ``count`` strides of ``every`` pages."""
    runs = []
    for i in range(count):
        g = start + i * every + every // 2
        vm.set_memory_attributes(g * P, P, PRIVATE)
        runs = reference_set(runs, g, g + 1, PRIVATE)
    return runs


def test_set_spanning_many_mixed_blocks_clears_inner_and_keeps_edges(vm):
    """Slot 0 gets a private page in every 2 MiB block; a set over whole blocks in the middle
    unmixes exactly those, and one whose ends fall inside blocks keeps those two mixed."""
    base, npages = SLOTS[0][1], SLOTS[0][2]
    runs = fragment(vm, L1, npages // L1, base)
    assert_matches(vm, runs)
    assert vm._slot_for_gfn(base).mixed_count(1) == npages // L1 and vm._slot_for_gfn(base).mixed_count(2) == 2

    lo, hi = base + 10 * L1, base + 700 * L1  # whole 2 MiB blocks, crossing a 1 GiB boundary
    vm.set_memory_attributes(lo * P, (hi - lo) * P, 0)
    runs = reference_set(runs, lo, hi, 0)
    assert_matches(vm, runs)

    lo, hi = base + 800 * L1 + 3, base + 900 * L1 + 300  # ends inside blocks that keep a private page
    vm.set_memory_attributes(lo * P, (hi - lo) * P, PRIVATE)
    runs = reference_set(runs, lo, hi, PRIVATE)
    assert_matches(vm, runs)
    slot = vm._slot_for_gfn(base)
    assert slot.is_mixed(1, lo) and slot.is_mixed(1, hi - 1) and not slot.is_mixed(1, lo + L1)


def test_whole_one_gib_block_becomes_uniform_at_both_levels(vm):
    runs = fragment(vm, L1, 2 * L1, 4 * L2 - L1)  # across slot 1's first 1 GiB block and beyond
    assert_matches(vm, runs)
    vm.set_memory_attributes(4 * L2 * P, L2 * P, PRIVATE)  # exactly 1 GiB block 4
    runs = reference_set(runs, 4 * L2, 5 * L2, PRIVATE)
    assert_matches(vm, runs)
    slot = vm._slot_for_gfn(4 * L2)
    assert not slot.is_mixed(2, 4 * L2) and slot.mixed_count(2) == 0
    assert not any(slot.is_mixed(1, 4 * L2 + i * L1) for i in range(512))


def test_slot_created_over_fragmented_attributes_gets_runs_of_mixed_blocks(model_system):
    """Memslot creation computes the mixed blocks in one pass; consecutive mixed blocks are one run."""
    vm = model_system.create_vm(SW)
    runs = fragment(vm, L1, 64, L2)  # blocks L2/L1 .. +63 each hold one private page
    vm.set_user_memory_region(0, 0, 0, 4 * L2 * P)
    slot = vm._slot_for_gfn(0)
    assert slot._mixed[1].snapshot() == ((L2 // L1, L2 // L1 + 64, True),)
    assert mixed_blocks(slot, 2) == [1] and slot.mixed_count(1) == 64
    vm._check_invariants()
    # a move recomputes, a flags-only change keeps the same mixed state
    vm.set_user_memory_region(0, 0, L1 * P, 4 * L2 * P)
    moved = vm._slot_for_gfn(L1)
    assert moved.mixed_count(1) == 64 and moved.mixed_count(2) == 1  # block 1 still holds them; block 4 partial
    vm._check_invariants()
    vm.set_user_memory_region(0, 1, L1 * P, 4 * L2 * P)  # LOG_DIRTY_PAGES
    assert vm._slot_for_gfn(L1)._mixed[1].snapshot() == moved._mixed[1].snapshot()
    vm._check_invariants()
    del runs
    vm.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(points, points, st.sampled_from([0, PRIVATE])), min_size=1, max_size=12))
def test_slots_created_over_attributes_match_reference(operations):
    """Slot creation computes the mixed blocks of attributes set before it (the init path)."""
    with guestmem.open_system("model") as sys_:
        vm = sys_.create_vm(SW)
        runs: list[tuple[int, int, int]] = []
        for a, b, value in operations:
            lo, hi = min(a, b), max(a, b)
            if lo != hi:
                vm.set_memory_attributes(lo * P, (hi - lo) * P, value)
                runs = reference_set(runs, lo, hi, value)
        for id_, base, npages in SLOTS:
            vm.set_user_memory_region(id_, 0, base * P, npages * P)
        assert_matches(vm, runs)
        vm.close()


@pytest.mark.parametrize("lo_off, hi_off", [(-3, 1), (1, L1 + 1), (-1, 2 * L1 + 1), (5, 6)],
                         ids=["end-one-page-in", "inside-to-next-block", "two-blocks-plus-one", "one-page"])
def test_set_ending_one_page_into_a_block_mixes_it(vm, lo_off, hi_off):
    """The block holding the set's last page is re-examined even when that page is its first."""
    base = SLOTS[0][1] + 5 * L1
    lo, hi = base + lo_off, base + hi_off
    vm.set_memory_attributes(lo * P, (hi - lo) * P, PRIVATE)
    assert_matches(vm, reference_set([], lo, hi, PRIVATE))
    assert vm._slot_for_gfn(base).is_mixed(1, hi - 1)


def test_slot_created_over_block_aligned_attributes_has_no_mixed_block(model_system):
    """Attribute boundaries on block boundaries mix nothing; one inside a partial edge block
    is not tracked (the block is never huge-mapped)."""
    vm = model_system.create_vm(SW)
    vm.set_memory_attributes(10 * L1 * P, 2 * L1 * P, PRIVATE)  # blocks 10 and 11, exactly
    vm.set_memory_attributes((20 * L1 + 100) * P, P, PRIVATE)    # inside block 20
    vm.set_user_memory_region(0, 0, 0, (20 * L1 + 300) * P)       # ends 300 pages into block 20
    slot = vm._slot_for_gfn(0)
    assert slot.mixed_count(1) == 0 and slot.mixed_count(2) == 0
    assert not slot.is_mixed(1, 10 * L1) and not slot.is_mixed(1, 20 * L1 + 100)
    vm._check_invariants()
    vm.close()
