"""RangeMap: a sorted map from half-open integer intervals to values.

Data model
----------
A RangeMap assigns a value to every integer point; points nobody set carry ``default``
(0 unless chosen otherwise). Only non-default values are stored, as maximal runs:

* ``_starts`` — a ``SortedList`` of run starts (O(log n) bisect, insert and delete);
* ``_spans``  — a dict ``start -> (end, value)`` for each run ``[start, end)``.

Invariants (checked by ``check()``, which the tests call after every operation):

1. runs are non-empty and sorted: ``start < end <= next.start``;
2. no run stores the default value (a gap *is* the default);
3. touching runs (``end == next.start``) have different values: equal neighbours merge.

So the representation of a given point->value function is unique, equality is a cheap
comparison of snapshots, and memory is proportional to the number of runs, never to the
length they cover: setting 2^40 pages costs the same as setting one.

Both the model (memory attributes, memslot lookup, gmem bindings) and the vmm use it;
it imports nothing from guestmem.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from sortedcontainers import SortedList

V = TypeVar("V")

__all__ = ["RangeMap"]


class RangeMap(Generic[V]):
    """Sorted, non-overlapping, merged intervals ``[start, end) -> value``; gaps read ``default``."""

    __slots__ = ("_starts", "_spans", "default")

    def __init__(self, default: Any = 0, items: Any = ()) -> None:
        self._starts: SortedList = SortedList()
        self._spans: dict[int, tuple[int, V]] = {}
        self.default = default
        for start, end, value in items:
            self.set(start, end, value)

    # --- queries ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of stored (non-default) runs."""
        return len(self._spans)

    def _floor(self, point: int) -> int | None:
        """The greatest run start <= ``point``, or None.

        Positional ``SortedList[i]`` costs a tree walk (~3 us at 500k runs), so this bisects
        the list's sublists directly (``_maxes``/``_lists``, stable across sortedcontainers
        2.x): two C bisects, ~0.5 us. Hot path of every point query and attribute lookup.
        """
        starts = self._starts
        maxes = starts._maxes
        if not maxes:
            return None
        pos = bisect_right(maxes, point)
        if pos == len(maxes):
            return maxes[-1]
        sub = starts._lists[pos]
        idx = bisect_right(sub, point)
        if idx:
            return sub[idx - 1]
        return maxes[pos - 1] if pos else None

    def _successor(self, point: int) -> int | None:
        """The least run start > ``point``, or None (same sublist bisect as ``_floor``)."""
        starts = self._starts
        maxes = starts._maxes
        pos = bisect_right(maxes, point)
        if pos == len(maxes):
            return None
        sub = starts._lists[pos]
        return sub[bisect_right(sub, point)]

    def _run_at(self, point: int) -> tuple[int, int, V] | None:
        """The stored run containing ``point``, as (start, end, value), or None."""
        s = self._floor(point)
        if s is None:
            return None
        e, v = self._spans[s]
        return (s, e, v) if point < e else None

    def get(self, point: int) -> V:
        """The value at ``point``."""
        run = self._run_at(point)
        return self.default if run is None else run[2]

    __getitem__ = get

    def uniform(self, start: int, end: int) -> V | None:
        """The single value covering all of ``[start, end)``, or None if it holds several.

        O(log n). An empty range has no value (None).
        """
        if start >= end:
            return None
        run = self._run_at(start)
        if run is not None:
            return run[2] if run[1] >= end else None
        # start lies in a gap: uniform iff no run begins before end
        nxt = self._successor(start)
        return self.default if nxt is None or nxt >= end else None

    def ranges(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Runs covering ``[start, end)`` clipped to it, gaps included as default-valued runs.

        The result tiles ``[start, end)`` exactly: consecutive, non-empty, and neighbours
        have different values.
        """
        out: list[tuple[int, int, V]] = []
        if start >= end:
            return out
        pos = start
        for s, e, v in self.stored(start, end):
            if s > pos:
                out.append((pos, s, self.default))
            out.append((s, e, v))
            pos = e
        if pos < end:
            out.append((pos, end, self.default))
        return out

    def stored(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Only the stored (non-default) runs meeting ``[start, end)``, clipped to it."""
        out: list[tuple[int, int, V]] = []
        if start >= end:
            return out
        spans = self._spans
        run = self._run_at(start)
        if run is not None:
            out.append((start, min(run[1], end), run[2]))
        for s in self._starts.irange(start, end, inclusive=(run is None, False)):
            e, v = spans[s]
            out.append((s, min(e, end), v))
        return out

    def __iter__(self) -> Iterator[tuple[int, int, V]]:
        """All stored runs in order, as (start, end, value)."""
        spans = self._spans
        for s in self._starts:
            e, v = spans[s]
            yield (s, e, v)

    def snapshot(self) -> tuple[tuple[int, int, V], ...]:
        """An immutable, comparable copy of the stored runs."""
        return tuple(self)

    def copy(self) -> "RangeMap[V]":
        other: RangeMap[V] = RangeMap(self.default)
        other._starts = self._starts.copy()
        other._spans = dict(self._spans)
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeMap):
            return NotImplemented
        return self.default == other.default and self._spans == other._spans

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        runs = ", ".join(f"[{s:#x}, {e:#x})={v!r}" for s, e, v in self)
        return f"RangeMap(default={self.default!r}, {{{runs}}})"

    # --- update -------------------------------------------------------------------------------

    def set(self, start: int, end: int, value: V) -> None:
        """Give every point of ``[start, end)`` the value ``value``. O((k + 1) log n) for k runs replaced."""
        if start > end:
            raise ValueError(f"empty range [{start:#x}, {end:#x})")
        if start == end:
            return
        starts, spans = self._starts, self._spans
        new_start, new_end = start, end
        victims: list[int] = []
        pieces: list[tuple[int, int, V]] = []

        # A run starting before `start` may overlap or touch the range from the left.
        s_left = self._floor(start - 1)
        if s_left is not None:
            s = s_left
            e, v = spans[s]
            if e >= start:
                if v == value:
                    victims.append(s)
                    new_start = s
                    new_end = max(new_end, e)
                elif e > start:
                    victims.append(s)
                    pieces.append((s, start, v))
                    if e > end:
                        pieces.append((end, e, v))
        # Runs starting inside [start, end], the last one possibly touching/overhanging the right.
        for s in starts.irange(start, end):
            e, v = spans[s]
            if v == value:
                victims.append(s)
                new_end = max(new_end, e)
            elif s < end:
                victims.append(s)
                if e > end:
                    pieces.append((end, e, v))
            # else: a different-valued run starting exactly at `end` stays untouched

        for s in victims:
            del spans[s]
            starts.remove(s)
        for s, e, v in pieces:
            spans[s] = (e, v)
            starts.add(s)
        if value != self.default:
            spans[new_start] = (new_end, value)
            starts.add(new_start)

    def clear(self, start: int | None = None, end: int | None = None) -> None:
        """Reset ``[start, end)`` (everything if no bounds) to the default."""
        if start is None and end is None:
            self._starts.clear()
            self._spans.clear()
            return
        assert start is not None and end is not None
        self.set(start, end, self.default)

    # --- invariants ---------------------------------------------------------------------------

    def check(self) -> None:
        """Assert the invariants in the module docstring (the model's WARN_ON)."""
        assert len(self._starts) == len(self._spans), "index and spans disagree"
        prev_end: int | None = None
        prev_value: Any = None
        for s, e, v in self:
            assert s < e, f"empty run [{s:#x}, {e:#x})"
            assert v != self.default, f"run [{s:#x}, {e:#x}) stores the default"
            if prev_end is not None:
                assert prev_end <= s, f"runs overlap at {s:#x}"
                assert not (prev_end == s and prev_value == v), f"unmerged neighbours at {s:#x}"
            prev_end, prev_value = e, v
