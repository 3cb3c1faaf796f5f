"""RangeMap: a sorted map from half-open integer intervals to values.

Data model
----------
A RangeMap assigns a value to every integer point; points nobody set carry ``default``
(0 unless chosen otherwise). Points are signed 64-bit integers (page numbers, file pages,
guest-physical addresses); queries may use any int. Only non-default values are stored, as
maximal runs, in three parallel chunked sequences (a B+ tree's leaf level, as in
sortedcontainers, but with the run's end and value beside its start so no per-run dict or
tuple is needed):

* ``_s``, ``_e``, ``_v`` — lists of chunks; chunk ``c`` holds the starts, ends and values
  of consecutive runs, ``_s[c][i]``, ``_e[c][i]``, ``_v[c][i]`` describing run ``[s, e)``.
  Starts and ends are ``array('q')``: no int object per bound, so dropping thousands of
  runs is a memmove rather than thousands of deallocations, and a run costs 16 bytes
  plus its value's list slot;
* ``_firsts`` — ``_firsts[c] == _s[c][0]``, bisected to find a point's chunk;
* ``_len`` — the number of stored runs.

Every lookup is two C bisects. ``set`` replaces all runs it covers with at most three
(the left remainder, the new run, the right remainder) by slice assignment inside the
two edge chunks and one slice deletion of the whole chunks between them, so covering
thousands of runs costs a few memmoves, not a Python step per run.

Invariants (checked by ``check()``, which the tests call after every operation):

1. runs are non-empty and sorted: ``start < end <= next.start``;
2. no run stores the default value (a gap *is* the default);
3. touching runs (``end == next.start``) have different values: equal neighbours merge;
4. chunks are non-empty, hold at most ``2 * _LOAD`` runs, the three lists of a chunk have
   equal lengths and ``_firsts`` holds each chunk's first start.

So the representation of a given point->value function is unique up to chunking,
equality compares the runs, and memory is proportional to the number of runs, never to
the length they cover: setting 2^40 pages costs the same as setting one.

Both the model (memory attributes, mixed hugepage blocks, memslot lookup, gmem bindings)
and the vmm use it; it imports nothing from guestmem.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

V = TypeVar("V")

__all__ = ["RangeMap"]

_LOAD = 512
"""Target runs per chunk: a chunk splits above 2 * _LOAD and joins a neighbour below _LOAD // 4,
so inserting into a chunk is a short memmove and there are at most ~4n/_LOAD chunks."""


class RangeMap(Generic[V]):
    """Sorted, non-overlapping, merged intervals ``[start, end) -> value``; gaps read ``default``."""

    __slots__ = ("_firsts", "_s", "_e", "_v", "_len", "default")

    def __init__(self, default: Any = 0, items: Iterable[tuple[int, int, V]] = ()) -> None:
        self._firsts: list[int] = []
        self._s: list[array[int]] = []
        self._e: list[array[int]] = []
        self._v: list[list[V]] = []
        self._len = 0
        self.default = default
        for start, end, value in items:
            self.set(start, end, value)

    @classmethod
    def from_sorted(cls, runs: Iterable[tuple[int, int, V]], default: Any = 0) -> "RangeMap[V]":
        """A map holding exactly ``runs``, which must already be sorted, disjoint, merged and
        non-default (asserted). O(n), against O(n log n) for n ``set`` calls."""
        m: RangeMap[V] = cls(default)
        s: list[int] = []
        e: list[int] = []
        v: list[V] = []
        prev_end, prev_value = None, None
        for start, end, value in runs:
            assert start < end and value != default, f"bad run [{start:#x}, {end:#x})={value!r}"
            assert prev_end is None or prev_end < start or (prev_end == start and prev_value != value), \
                f"run at {start:#x} overlaps or should merge with its predecessor"
            s.append(start)
            e.append(end)
            v.append(value)
            prev_end, prev_value = end, value
        for i in range(0, len(s), _LOAD):
            m._s.append(array("q", s[i:i + _LOAD]))
            m._e.append(array("q", e[i:i + _LOAD]))
            m._v.append(v[i:i + _LOAD])
            m._firsts.append(s[i])
        m._len = len(s)
        return m

    # --- queries ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of stored (non-default) runs."""
        return self._len

    def get(self, point: int) -> V:
        """The value at ``point``. Hot path of every attribute and memslot lookup: two bisects."""
        c = bisect_right(self._firsts, point) - 1
        if c >= 0:
            i = bisect_right(self._s[c], point) - 1  # >= 0: the chunk's first start is <= point
            if point < self._e[c][i]:
                return self._v[c][i]
        return self.default

    __getitem__ = get

    def __contains__(self, point: object) -> bool:
        """Whether a stored (non-default) run covers ``point``: the map as a set of points."""
        if not isinstance(point, int):
            return False
        c = bisect_right(self._firsts, point) - 1
        if c < 0:
            return False
        return point < self._e[c][bisect_right(self._s[c], point) - 1]

    def uniform(self, start: int, end: int) -> V | None:
        """The single value covering all of ``[start, end)``, or None if it holds several.

        O(log n). An empty range has no value (None).
        """
        if start >= end:
            return None
        firsts = self._firsts
        c = bisect_right(firsts, start) - 1
        if c < 0:
            nxt = firsts[0] if firsts else end
        else:
            starts = self._s[c]
            i = bisect_right(starts, start) - 1
            e = self._e[c][i]
            if start < e:
                return self._v[c][i] if e >= end else None
            # start lies in a gap: uniform iff no run begins before end
            if i + 1 < len(starts):
                nxt = starts[i + 1]
            else:
                nxt = firsts[c + 1] if c + 1 < len(firsts) else end
        return self.default if nxt >= end else None

    def ranges(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Runs covering ``[start, end)`` clipped to it, gaps included as default-valued runs.

        The result tiles ``[start, end)`` exactly: consecutive, non-empty, and neighbours
        have different values.
        """
        out: list[tuple[int, int, V]] = []
        if start >= end:
            return out
        pos = start
        default = self.default
        for s, e, v in self.stored(start, end):
            if s > pos:
                out.append((pos, s, default))
            out.append((s, e, v))
            pos = e
        if pos < end:
            out.append((pos, end, default))
        return out

    def stored(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Only the stored (non-default) runs meeting ``[start, end)``, clipped to it."""
        out: list[tuple[int, int, V]] = []
        if start >= end:
            return out
        firsts = self._firsts
        c = bisect_right(firsts, start) - 1
        if c < 0:
            c, i = 0, 0
        else:
            i = bisect_right(self._s[c], start) - 1
            if self._e[c][i] <= start:
                i += 1
        nchunks = len(firsts)
        while c < nchunks:
            starts = self._s[c]
            j = bisect_left(starts, end, i)  # runs [i, j) of this chunk start before end
            out.extend(zip(starts[i:j], self._e[c][i:j], self._v[c][i:j]))
            if j < len(starts):
                break
            c, i = c + 1, 0
        if out:
            # only the first run can begin before start, only the last can end after end
            s, e, v = out[0]
            if s < start:
                out[0] = (start, e, v)
            s, e, v = out[-1]
            if e > end:
                out[-1] = (s, end, v)
        return out

    def __iter__(self) -> Iterator[tuple[int, int, V]]:
        """All stored runs in order, as (start, end, value)."""
        for starts, ends, values in zip(self._s, self._e, self._v):
            yield from zip(starts, ends, values)

    def snapshot(self) -> tuple[tuple[int, int, V], ...]:
        """An immutable, comparable copy of the stored runs."""
        return tuple(self)

    def copy(self) -> "RangeMap[V]":
        other: RangeMap[V] = RangeMap(self.default)
        other._firsts = self._firsts[:]
        other._s = [chunk[:] for chunk in self._s]
        other._e = [chunk[:] for chunk in self._e]
        other._v = [chunk[:] for chunk in self._v]
        other._len = self._len
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeMap):
            return NotImplemented
        # chunk boundaries depend on history, so compare the runs themselves
        return self.default == other.default and self._len == other._len and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        runs = ", ".join(f"[{s:#x}, {e:#x})={v!r}" for s, e, v in self)
        return f"RangeMap(default={self.default!r}, {{{runs}}})"

    # --- update -------------------------------------------------------------------------------

    def set(self, start: int, end: int, value: V) -> None:
        """Give every point of ``[start, end)`` the value ``value``.

        O(log n + k / _LOAD) Python steps for k runs replaced: the covered runs go in slice
        operations. Raises OverflowError, changing nothing, for a bound outside 64 bits.
        """
        if start > end:
            raise ValueError(f"empty range [{start:#x}, {end:#x})")
        if start == end:
            return
        firsts, S, E, Vs = self._firsts, self._s, self._e, self._v
        default = self.default
        if not firsts:
            if value != default:
                s, e = array("q", (start,)), array("q", (end,))  # OverflowError before any change
                firsts.append(start)
                S.append(s)
                E.append(e)
                Vs.append([value])
                self._len = 1
            return

        # The runs to replace are those overlapping or touching [start, end]: from L, the
        # first run with end >= start, through R, the last run with start <= end. They are
        # [(cl, il), (cr, jr)) in (chunk, index) positions; (cr, jr) is exclusive.
        left_s = None
        left_v: Any = None
        cl = bisect_right(firsts, start - 1) - 1
        if cl < 0:
            cl = il = 0
        else:
            il = bisect_right(S[cl], start - 1) - 1  # the last run starting before `start`
            if E[cl][il] >= start:
                left_s, left_v = S[cl][il], Vs[cl][il]
            else:
                il += 1
        cr = bisect_right(firsts, end) - 1
        if cr < 0:
            cr = jr = 0
        else:
            jr = bisect_right(S[cr], end)
        # cl < cr implies chunk cr's first run starts in [start, end], so the set is non-empty
        # and jr >= 1; so is a non-empty set inside one chunk (jr > il >= 0).
        covered = cl != cr or il != jr
        ns, ne, nv = self._replacement(start, end, value, left_s, left_v, S[cr], E[cr], Vs[cr], jr if covered else 0)
        self._splice(cl, il, cr, jr, ns, ne, nv)

    def _replacement(self, start: int, end: int, value: V, left_s: int | None, left_v: Any,
                     rs: array, re: array, rv: list[Any], jr: int) -> tuple[array, array, list[Any]]:
        """The (at most three) runs that replace the covered ones when ``[start, end)`` gets
        ``value``: what is left of the first covered run (``left_s``, ``left_v``; None if it
        starts at or after ``start``) before ``start``, the new run merged with equal
        neighbours, and what is left after ``end`` of the last covered run, ``jr - 1`` in the
        chunk ``rs``/``re``/``rv`` (``jr`` 0: nothing is covered). As (starts, ends, values)."""
        new_start, new_end = start, end
        ns = array("q")
        ne = array("q")
        nv: list[Any] = []
        tail = False
        if left_s is not None:
            if left_v == value:
                new_start = left_s
            else:  # keep the part before `start` (the whole run if it only touches)
                ns.append(left_s)
                ne.append(start)
                nv.append(left_v)
        if jr:
            right_e, right_v = re[jr - 1], rv[jr - 1]
            if right_v == value:
                new_end = max(end, right_e)
            elif right_e > end:  # keep the part after `end` (the whole run if it only touches)
                tail = True
        if value != self.default:
            ns.append(new_start)
            ne.append(new_end)
            nv.append(value)
        if tail:
            ns.append(max(rs[jr - 1], end))
            ne.append(right_e)
            nv.append(right_v)
        return ns, ne, nv

    def _splice(self, cl: int, il: int, cr: int, jr: int, ns: array, ne: array, nv: list[Any]) -> None:
        """Replace the runs at [(cl, il), (cr, jr)) with ``ns``/``ne``/``nv``: slice operations
        inside the two edge chunks and one deletion of the whole chunks between them."""
        S, E, Vs = self._s, self._e, self._v
        if cl == cr:
            self._len += len(ns) - (jr - il)
            S[cl][il:jr] = ns
            E[cl][il:jr] = ne
            Vs[cl][il:jr] = nv
            self._fix(cl)
        else:
            removed = len(S[cl]) - il + jr
            for c in range(cl + 1, cr):
                removed += len(S[c])
            self._len += len(ns) - removed
            S[cl][il:] = ns
            E[cl][il:] = ne
            Vs[cl][il:] = nv
            del S[cr][:jr], E[cr][:jr], Vs[cr][:jr]
            del S[cl + 1:cr], E[cl + 1:cr], Vs[cl + 1:cr], self._firsts[cl + 1:cr]
            self._fix(cl + 1)  # the old chunk cr; fixed first so that cl's index holds
            self._fix(cl)

    def _fix(self, c: int) -> None:
        """Restore invariant 4 for chunk ``c`` after an edit: drop it if empty, join it to a
        neighbour if small, split it if large, and refresh ``_firsts``. Only edited chunks
        can shrink, and each edit joins a small one, so chunks stay within a factor of the
        load and their number O(n / _LOAD)."""
        firsts, S, E, Vs = self._firsts, self._s, self._e, self._v
        if c >= len(S):
            return
        n = len(S[c])
        if n == 0:
            del S[c], E[c], Vs[c], firsts[c]
            return
        if n < _LOAD // 4 and len(S) > 1:
            if c == 0:
                c = 1  # join the successor instead
            S[c - 1] += S[c]
            E[c - 1] += E[c]
            Vs[c - 1] += Vs[c]
            del S[c], E[c], Vs[c], firsts[c]
            c -= 1
            n = len(S[c])
        if n > 2 * _LOAD:
            half = n // 2
            S.insert(c + 1, S[c][half:])
            E.insert(c + 1, E[c][half:])
            Vs.insert(c + 1, Vs[c][half:])
            firsts.insert(c + 1, S[c][half])
            del S[c][half:], E[c][half:], Vs[c][half:]
        firsts[c] = S[c][0]

    def clear(self, start: int | None = None, end: int | None = None) -> None:
        """Reset ``[start, end)`` (everything if no bounds) to the default."""
        if start is None and end is None:
            self._firsts, self._s, self._e, self._v, self._len = [], [], [], [], 0
            return
        assert start is not None and end is not None
        self.set(start, end, self.default)

    # --- invariants ---------------------------------------------------------------------------

    def check(self) -> None:
        """Assert the invariants in the module docstring (the model's WARN_ON)."""
        assert len(self._s) == len(self._e) == len(self._v) == len(self._firsts), "chunk lists disagree"
        for c, starts in enumerate(self._s):
            assert 0 < len(starts) <= 2 * _LOAD, f"chunk {c} holds {len(starts)} runs"
            assert len(starts) == len(self._e[c]) == len(self._v[c]), f"chunk {c} lists disagree"
            assert self._firsts[c] == starts[0], f"chunk {c} first start is stale"
        assert sum(map(len, self._s)) == self._len, "run count is stale"
        prev_end: int | None = None
        prev_value: Any = None
        for s, e, v in self:
            assert s < e, f"empty run [{s:#x}, {e:#x})"
            assert v != self.default, f"run [{s:#x}, {e:#x}) stores the default"
            if prev_end is not None:
                assert prev_end <= s, f"runs overlap at {s:#x}"
                assert not (prev_end == s and prev_value == v), f"unmerged neighbours at {s:#x}"
            prev_end, prev_value = e, v
