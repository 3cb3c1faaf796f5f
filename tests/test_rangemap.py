"""RangeMap: the interval map under attributes, memslot lookup and gmem bindings (no backend)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem.rangemap import RangeMap

SPACE = 64


def naive_ranges(pages: dict[int, int], start: int, end: int) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for p in range(start, end):
        v = pages.get(p, 0)
        if out and out[-1][2] == v:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1, v])
    return [tuple(r) for r in out]  # type: ignore[misc]


ops = st.lists(
    st.tuples(st.integers(0, SPACE), st.integers(0, SPACE), st.sampled_from([0, 0, 8, 1, 2])),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, SPACE), st.integers(0, SPACE))
def test_matches_per_page_model(operations, qa, qb):
    m: RangeMap[int] = RangeMap()
    pages: dict[int, int] = {}
    for a, b, v in operations:
        lo, hi = min(a, b), max(a, b)
        m.set(lo, hi, v)
        for p in range(lo, hi):
            pages[p] = v
        m.check()
    for p in range(SPACE + 1):
        assert m.get(p) == pages.get(p, 0)
    lo, hi = min(qa, qb), max(qa, qb)
    expected = naive_ranges(pages, lo, hi)
    assert m.ranges(lo, hi) == expected
    assert m.uniform(lo, hi) == (expected[0][2] if len(expected) == 1 else None)
    assert m.stored(lo, hi) == [r for r in expected if r[2] != 0]
    # the stored runs are exactly the non-default maximal runs of the whole space
    assert list(m) == [r for r in naive_ranges(pages, 0, SPACE + 1) if r[2] != 0]
    assert len(m) == len(list(m))


def test_empty_map_reads_default_everywhere():
    m: RangeMap[int] = RangeMap()
    assert m.get(0) == 0 and m.get(1 << 60) == 0
    assert m.ranges(5, 10) == [(5, 10, 0)]
    assert m.uniform(0, 1 << 62) == 0
    assert m.uniform(3, 3) is None
    assert m.ranges(3, 3) == [] and len(m) == 0


def test_set_merges_equal_neighbours():
    m: RangeMap[int] = RangeMap()
    m.set(0, 10, 8)
    m.set(10, 20, 8)
    m.set(30, 40, 8)
    m.set(20, 30, 8)
    m.check()
    assert m.snapshot() == ((0, 40, 8),)


def test_setting_default_splits_and_erases():
    m: RangeMap[int] = RangeMap()
    m.set(0, 100, 8)
    m.set(40, 60, 0)
    m.check()
    assert m.snapshot() == ((0, 40, 8), (60, 100, 8))
    m.set(0, 100, 0)
    assert len(m) == 0


def test_different_values_touching_stay_separate():
    m: RangeMap[int] = RangeMap()
    m.set(0, 10, 1)
    m.set(10, 20, 2)
    m.set(5, 15, 3)
    m.check()
    assert m.snapshot() == ((0, 5, 1), (5, 15, 3), (15, 20, 2))


def test_object_values_and_none_default():
    a, b = object(), object()
    m: RangeMap[object] = RangeMap(default=None)
    m.set(0, 10, a)
    m.set(10, 20, b)
    assert m.get(9) is a and m.get(10) is b and m.get(20) is None
    assert len(m) == 2


def test_equality_and_copy_are_value_based():
    m: RangeMap[int] = RangeMap()
    m.set(0, 10, 8)
    c = m.copy()
    assert c == m
    c.set(3, 4, 0)
    assert c != m and m.snapshot() == ((0, 10, 8),)


def test_empty_and_inverted_ranges():
    m: RangeMap[int] = RangeMap()
    m.set(5, 5, 8)
    assert len(m) == 0
    with pytest.raises(ValueError):
        m.set(6, 5, 8)


def test_one_tib_set_is_a_single_run():
    m: RangeMap[int] = RangeMap()
    m.set(0, 1 << 28, 8)
    assert len(m) == 1 and m.uniform(0, 1 << 28) == 8
    m.set(1 << 27, (1 << 27) + 1, 0)
    assert len(m) == 2 and m.uniform(0, 1 << 28) is None


def test_many_random_sets_keep_invariants():
    rng = random.Random(1)
    m: RangeMap[int] = RangeMap()
    pages = bytearray(4096)
    for _ in range(3000):
        a = rng.randrange(4096)
        b = min(4096, a + rng.choice([1, 2, 7, 64, 900]))
        v = rng.choice([0, 8])
        m.set(a, b, v)
        pages[a:b] = bytes([v]) * (b - a)
    m.check()
    for s, e, v in m.ranges(0, 4096):
        assert set(pages[s:e]) == {v}
