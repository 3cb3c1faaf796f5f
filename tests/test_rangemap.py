"""RangeMap: the interval map under attributes, memslot lookup and gmem bindings (no backend)."""

from __future__ import annotations

import random
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem import rangemap
from guestmem.rangemap import RangeMap

from reference_runs import reference_set

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


def test_equality_needs_the_same_default_and_runs():
    assert RangeMap(default=None) != RangeMap(default=False)  # no runs, other default
    a, b = RangeMap(default=0), RangeMap(default=0)
    a.set(1, 3, 7)
    assert a != b
    b.set(1, 3, 7)
    assert a == b


def test_empty_query_ranges_are_empty():
    m = RangeMap(default=0)
    m.set(2, 6, 1)
    assert m.ranges(4, 4) == [] and m.ranges(0, 0) == [] and list(m.stored(4, 4)) == []
    assert "0x2" in repr(m) and "0x6" in repr(m)  # the runs, in hex


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


# --- chunked storage: sets spanning many runs and many chunks ------------------------------------


def reference_stored(runs: list[tuple[int, int, int]], start: int, end: int) -> list[tuple[int, int, int]]:
    return [(max(s, start), min(e, end), v) for s, e, v in runs if s < end and e > start and start < end]


ops_wide = st.lists(  # (start, length, value): mostly short sets to build many runs, some wide ones
    st.tuples(st.integers(0, 400), st.one_of(st.integers(0, 4), st.integers(0, 4), st.integers(0, 400)),
              st.sampled_from([0, 8, 8, 1, 2])),
    max_size=150,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0, 2, 3, 7]), ops_wide, st.integers(0, 400), st.integers(0, 400))
def test_tiny_chunks_match_reference(prefill_stride, operations, qa, qb):
    """With 4 runs per chunk, every set splits, joins or drops chunks; the runs must still
    be exactly the reference's. A prefill of one-point runs every ``prefill_stride``
    points (alternating values) starts from dozens of chunks."""
    with mock.patch.object(rangemap, "_LOAD", 4):
        m: RangeMap[int] = RangeMap()
        ref: list[tuple[int, int, int]] = []
        for i, p in enumerate(range(0, 400, prefill_stride or 400)):
            if prefill_stride:
                v = 1 + i % 2
                m.set(p, p + 1, v)
                ref = reference_set(ref, p, p + 1, v)
        m.check()
        assert list(m) == ref
        for a, length, v in operations:
            lo, hi = a, min(400, a + length)
            m.set(lo, hi, v)
            ref = reference_set(ref, lo, hi, v)
            m.check()
            assert list(m) == ref and len(m) == len(ref)
        lo, hi = min(qa, qb), max(qa, qb)
        assert m.stored(lo, hi) == reference_stored(ref, lo, hi)
        for p in (lo, hi, lo + 1, hi - 1):
            inside = [v for s, e, v in ref if s <= p < e]
            assert m.get(p) == (inside[0] if inside else 0)
            assert (p in m) == bool(inside)
        tiles = m.ranges(lo, hi)
        assert m.uniform(lo, hi) == (tiles[0][2] if len(tiles) == 1 else None)


def fragmented(n: int, stride: int, value: int = 8) -> tuple[RangeMap[int], list[tuple[int, int, int]]]:
    """n one-point runs, one every ``stride`` points starting at stride // 2."""
    runs = [(stride // 2 + i * stride, stride // 2 + i * stride + 1, value) for i in range(n)]
    m: RangeMap[int] = RangeMap()
    for s, e, v in runs:
        m.set(s, e, v)
    return m, runs


@pytest.mark.parametrize("start_off, end_off", [(0, 0), (-1, 1), (1, -1), (0, 1), (1, 0)])
@pytest.mark.parametrize("value", [0, 8, 2])
def test_set_spanning_thousands_of_runs_across_chunks(start_off, end_off, value):
    """A set covering runs 1000..8999 of 10,000 (many whole chunks plus two partial edge
    chunks), with its ends exactly on, just before and just after the edge runs."""
    stride = 1000
    m, runs = fragmented(10_000, stride)
    start = runs[1000][0] + start_off
    end = runs[8999][1] + end_off
    m.set(start, end, value)
    m.check()
    assert list(m) == reference_set(runs, start, end, value)


def test_set_covering_everything_then_fragmenting_again():
    m, runs = fragmented(5000, 64)
    m.set(0, 64 * 5000, 2)
    m.check()
    assert list(m) == [(0, 64 * 5000, 2)]
    m.set(0, 64 * 5000, 0)
    assert len(m) == 0 and list(m) == [] and m.uniform(0, 1 << 40) == 0
    m2, runs2 = fragmented(5000, 64)
    for s, e, v in runs2:
        m.set(s, e, v)
    m.check()
    assert m == m2


def test_stored_and_uniform_across_chunk_edges():
    m, runs = fragmented(3000, 10)
    lo, hi = runs[500][0] - 3, runs[2500][0] + 1
    assert m.stored(lo, hi) == reference_stored(runs, lo, hi)
    assert m.stored(runs[7][0], runs[7][0] + 1) == [runs[7]]
    assert m.uniform(runs[7][1], runs[8][0]) == 0  # the gap between two runs
    assert m.uniform(runs[7][1], runs[8][0] + 1) is None
    assert m.uniform(runs[-1][1], 1 << 40) == 0  # beyond the last run
    assert m.uniform(0, runs[0][0]) == 0  # before the first


def test_equality_ignores_chunking():
    m, runs = fragmented(3000, 10)
    built_backwards: RangeMap[int] = RangeMap()
    for s, e, v in reversed(runs):
        built_backwards.set(s, e, v)
    assert built_backwards == m and built_backwards.snapshot() == m.snapshot()
    built_backwards.set(runs[1500][0], runs[1500][1], 0)
    assert built_backwards != m


def test_from_sorted_equals_incremental_build():
    m, runs = fragmented(2000, 5)
    bulk = RangeMap.from_sorted(runs)
    bulk.check()
    assert bulk == m and len(bulk) == 2000
    bulk.set(0, 5 * 1000, 0)
    bulk.check()
    assert list(bulk) == runs[1000:]
    with pytest.raises(AssertionError):
        RangeMap.from_sorted([(0, 2, 8), (2, 4, 8)])  # should have been merged
    with pytest.raises(AssertionError):
        RangeMap.from_sorted([(0, 2, 0)])  # stores the default


def test_contains_means_a_stored_run_covers_the_point():
    m: RangeMap[bool] = RangeMap(default=False)
    m.set(10, 20, True)
    assert 10 in m and 19 in m and 20 not in m and 9 not in m and "x" not in m


def test_bounds_outside_64_bits_raise_and_change_nothing():
    m, _ = fragmented(3, 10)
    before = m.snapshot()
    for start, end in ((1 << 63, (1 << 63) + 5), (0, 1 << 63), (-(1 << 63) - 1, 0)):
        with pytest.raises(OverflowError):
            m.set(start, end, 2)
        assert m.snapshot() == before
        m.check()
    empty: RangeMap[int] = RangeMap()
    with pytest.raises(OverflowError):
        empty.set(0, 1 << 64, 8)
    empty.check()
    assert len(empty) == 0 and empty.get(1 << 70) == 0  # queries take any int


def test_uniform_over_every_gap_including_chunk_ends():
    """Every gap of a multi-chunk map reads the default, up to (not including) the next run;
    the gaps after the last run of a chunk look the next run up in the next chunk."""
    m, runs = fragmented(3000, 10)
    for (_, end, _), (nxt, _, _) in zip(runs, runs[1:]):
        assert m.uniform(end, nxt) == 0, end
        assert m.uniform(end, nxt + 1) is None, end


def test_constructor_items_are_set_in_order():
    m = RangeMap(default=0, items=[(0, 10, 5), (4, 6, 7), (20, 30, 5)])
    m.check()
    assert list(m) == [(0, 4, 5), (4, 6, 7), (6, 10, 5), (20, 30, 5)]


def test_clear_a_range_resets_it_to_the_default():
    m = RangeMap(default=1, items=[(0, 100, 2)])
    m.clear(10, 20)
    m.check()
    assert list(m) == [(0, 10, 2), (20, 100, 2)] and m.get(15) == 1
    m.clear()
    assert list(m) == [] and len(m) == 0 and m.get(50) == 1
