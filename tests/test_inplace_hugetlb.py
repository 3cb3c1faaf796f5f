"""HugeTLB guest_memfd on profile "next": 2 MiB / 1 GiB folios, split on conversion to shared,
merged when all private again, merged then freed by punch-hole (spec 13.3).

Model-only: no kernel has it. The create flag and folio-size encoding are profile fields
(``gmem_hugetlb_flag``, ``gmem_huge_shift``). A Hypothesis run compares the model's folio
accounting with a page-by-page reference around 2 MiB and 1 GiB boundaries.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guestmem
from guestmem.model.profile import PROFILES
from guestmem.uapi import GuestMemfdFlag, VmType

P = 4096
M2, G1 = 2 << 20, 1 << 30
PRIVATE = 8
SW = int(VmType.SW_PROTECTED)
MMAP = int(GuestMemfdFlag.MMAP)
INIT_SHARED = int(GuestMemfdFlag.INIT_SHARED)
NEXT = PROFILES["next"]


def huge_flags(size: int) -> int:
    return NEXT.gmem_hugetlb_flag | (size.bit_length() - 1) << NEXT.gmem_huge_shift


def raises(err, fn, *args, **kwargs):
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    return info.value


@pytest.fixture(scope="module")
def sw_vm():
    with guestmem.open_system("model", profile="next") as s:
        vm = s.create_vm(SW)
        yield vm
        vm.close()


def test_create_rules(sw_vm):
    assert sw_vm.check_extension(244) & NEXT.gmem_hugetlb_flag
    g = sw_vm.create_guest_memfd(2 * M2, MMAP | huge_flags(M2))
    assert g.stats()["folio_size"] == M2
    assert sw_vm.create_guest_memfd(G1, huge_flags(G1)).stats()["folio_size"] == G1
    raises(errno.EINVAL, sw_vm.create_guest_memfd, M2 + P, huge_flags(M2))         # not whole folios
    raises(errno.EINVAL, sw_vm.create_guest_memfd, M2, huge_flags(1 << 16))        # 64 KiB not offered
    raises(errno.EINVAL, sw_vm.create_guest_memfd, M2, huge_flags(M2) & ~NEXT.gmem_hugetlb_flag)  # size bits alone
    with guestmem.open_system("model", profile="6.18") as s:  # no HugeTLB in released kernels
        raises(errno.EINVAL, s.create_vm(SW).create_guest_memfd, M2, huge_flags(M2))


def test_fallocate_must_cover_whole_folios(sw_vm):
    g = sw_vm.create_guest_memfd(4 * M2, huge_flags(M2))
    raises(errno.EINVAL, g.allocate, 0, P)
    raises(errno.EINVAL, g.allocate, P, M2)
    raises(errno.EINVAL, g.punch_hole, 0, M2 - P)
    g.allocate(M2, 2 * M2)
    st = g.stats()
    assert st["folios"] == {"4K": 0, "2M": 2} and st["pages_allocated"] == 1024


def test_split_on_shared_merge_when_private_again(sw_vm):
    g = sw_vm.create_guest_memfd(2 * M2, huge_flags(M2))
    g.allocate(0, 2 * M2)
    g.set_memory_attributes(M2 - P, 2 * P, 0)  # one page on each side of the boundary
    st = g.stats()
    assert (st["folios"], st["splits"], st["merges"]) == ({"4K": 1024, "2M": 0}, 2, 0)
    g.set_memory_attributes(M2 - P, P, PRIVATE)
    assert (g.stats()["folios"], g.stats()["merges"]) == ({"4K": 512, "2M": 1}, 1)
    g.set_memory_attributes(M2, P, PRIVATE)
    assert (g.stats()["folios"], g.stats()["merges"]) == ({"4K": 0, "2M": 2}, 2)


def test_allocate_charges_whole_folios_before_any_touch(sw_vm):
    """A HugeTLB guest_memfd allocates whole folios at fallocate: the file holds them (and
    counts their pages) before anything touches them, and a punch gives them back."""
    g = sw_vm.create_guest_memfd(2 * M2, huge_flags(M2))
    assert g.stats()["pages_allocated"] == 0
    g.allocate(M2, M2)
    st = g.stats()
    assert (st["pages_allocated"], st["folios"]) == (512, {"4K": 0, "2M": 1})
    g.punch_hole(M2, M2)
    assert g.stats()["pages_allocated"] == 0


def test_punch_merges_then_frees_and_is_eagain_while_pinned(sw_vm):
    g = sw_vm.create_guest_memfd(2 * M2, MMAP | huge_flags(M2))
    g.allocate(0, 2 * M2)
    g.set_memory_attributes(P, P, 0)
    pin = g.pin(P, P)
    err = raises(errno.EAGAIN, g.punch_hole, 0, M2)
    assert f"page {P:#x}" in str(err)  # the message names the page in use
    assert g.stats()["folios"] == {"4K": 512, "2M": 1}
    g.punch_hole(M2, M2)  # the other folio is not in use
    pin.release()
    g.punch_hole(0, M2)
    st = g.stats()
    assert (st["folios"], st["merges"], st["pages_allocated"], st["pages_shared"]) == ({"4K": 0, "2M": 0}, 1, 0, 1)


def test_punch_is_eagain_only_for_the_folio_holding_the_pin(sw_vm):
    """The same rule with the pin in the second folio: punching the first folio (pin after it)
    frees it, punching the second (offset past 0) is EAGAIN at the pinned page."""
    g = sw_vm.create_guest_memfd(2 * M2, MMAP | huge_flags(M2))
    g.allocate(0, 2 * M2)
    g.set_memory_attributes(M2 + P, P, 0)
    pin = g.pin(M2 + P, P)
    g.punch_hole(0, M2)
    err = raises(errno.EAGAIN, g.punch_hole, M2, M2)
    assert f"page {M2 + P:#x}" in str(err)
    assert g.stats()["folios"] == {"4K": 512, "2M": 0}
    pin.release()
    g.close()


def test_conversion_of_unallocated_folios_counts_no_split(sw_vm):
    g = sw_vm.create_guest_memfd(G1, huge_flags(G1))
    g.set_memory_attributes(0, P, 0)
    assert g.stats()["splits"] == 0
    g.allocate(0, G1)  # allocated with a shared page inside: split from the start
    assert g.stats()["folios"] == {"4K": G1 // P, "1G": 0}


class Reference:
    """Page-by-page reference: bytearray of attributes (1 = private), a set of allocated folios."""

    def __init__(self, npages: int, n: int, shared: bool) -> None:
        self.attr = bytearray([0 if shared else 1]) * npages
        self.n = n
        self.alloc: set[int] = set()
        self.splits = self.merges = 0

    def has_shared(self, b: int) -> bool:
        return 0 in self.attr[b * self.n:(b + 1) * self.n]

    def convert(self, s: int, e: int, private: bool) -> None:
        blocks = range(s // self.n, -(-e // self.n))
        before = {b: self.has_shared(b) for b in blocks}
        self.attr[s:e] = bytes([int(private)]) * (e - s)
        for b in blocks:
            if b in self.alloc:
                after = self.has_shared(b)
                self.splits += after and not before[b]
                self.merges += before[b] and not after

    def allocate(self, bs: int, be: int) -> None:
        self.alloc |= set(range(bs, be))

    def punch(self, bs: int, be: int) -> None:
        for b in range(bs, be):
            if b in self.alloc:
                self.merges += self.has_shared(b)
                self.alloc.discard(b)

    def stats(self, label: str) -> dict:
        split = sum(1 for b in self.alloc if self.has_shared(b))
        shared = self.attr.count(0)
        return {"pages_shared": shared, "pages_private": len(self.attr) - shared, "splits": self.splits,
                "merges": self.merges, "folios": {"4K": split * self.n, label: len(self.alloc) - split},
                "pages_allocated": len(self.alloc) * self.n}


def _ops(nblocks: int, n: int):
    # Page indices at and around every folio boundary, plus anywhere.
    edge = st.builds(lambda b, d: min(max(b * n + d, 0), nblocks * n),
                     st.integers(0, nblocks), st.sampled_from([-2, -1, 0, 1, 2, n // 2]))
    page = st.one_of(edge, st.integers(0, nblocks * n))
    conv = st.tuples(st.just("convert"), page, page, st.booleans())
    blocks = st.tuples(st.sampled_from(["allocate", "punch"]), st.integers(0, nblocks), st.integers(0, nblocks),
                       st.booleans())
    return st.lists(st.one_of(conv, conv, blocks), max_size=40)


def _run(sw_vm, folio: int, label: str, nblocks: int, shared: bool, ops) -> None:
    n = folio // P
    g = sw_vm.create_guest_memfd(nblocks * folio, huge_flags(folio) | (INIT_SHARED if shared else 0))
    ref = Reference(nblocks * n, n, shared)
    try:
        for op, a, b, private in ops:
            lo, hi = min(a, b), max(a, b)
            if lo == hi:
                continue
            if op == "convert":
                g.set_memory_attributes(lo * P, (hi - lo) * P, PRIVATE if private else 0)
                ref.convert(lo, hi, private)
            elif op == "allocate":
                g.allocate(lo * folio, (hi - lo) * folio)
                ref.allocate(lo, hi)
            else:
                g.punch_hole(lo * folio, (hi - lo) * folio)
                ref.punch(lo, hi)
            got = g.stats()
            assert {k: got[k] for k in ref.stats(label)} == ref.stats(label), (op, lo, hi, private)
        g._state.check()
    finally:
        g.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shared=st.booleans(), ops=_ops(4, M2 // P))
def test_2m_folio_accounting_matches_reference(sw_vm, shared, ops):
    _run(sw_vm, M2, "2M", 4, shared, ops)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shared=st.booleans(), ops=_ops(2, G1 // P))
def test_1g_folio_accounting_matches_reference(sw_vm, shared, ops):
    _run(sw_vm, G1, "1G", 2, shared, ops)


def test_no_direct_map_flag_is_offered_except_for_protected_vms():
    """NO_DIRECT_MAP (profile field) is a valid create flag, reported in GUEST_MEMFD_FLAGS, and
    refused for the TDX-like VM type; released profiles do not know it."""
    from guestmem.model import GUESTMEM_TDX_LIKE_VM

    ndm = NEXT.gmem_no_direct_map_flag
    with guestmem.open_system("model", profile="next") as s:
        for vm_type in (0, SW):
            vm = s.create_vm(vm_type)
            assert vm.check_extension(244) & ndm
            vm.create_guest_memfd(P, MMAP | ndm)
        tdx = s.create_vm(GUESTMEM_TDX_LIKE_VM)
        assert not tdx.check_extension(244) & ndm
        raises(errno.EINVAL, tdx.create_guest_memfd, P, ndm)
    with guestmem.open_system("model", profile="6.18") as s:
        raises(errno.EINVAL, s.create_vm(0).create_guest_memfd, P, ndm)
