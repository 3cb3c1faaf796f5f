"""Reference interval assignment for tests: the obvious O(n) algorithm the range maps must match."""

from __future__ import annotations


def reference_set(runs: list[tuple[int, int, int]], start: int, end: int, value: int) -> list[tuple[int, int, int]]:
    """The obvious O(n) interval assignment over a plain list of stored runs (default 0)."""
    out = []
    for s, e, v in runs:
        if s < start:
            out.append((s, min(e, start), v))
        if e > end:
            out.append((max(s, end), e, v))
    if value != 0 and start < end:
        out.append((start, end, value))
    out.sort()
    merged: list[tuple[int, int, int]] = []
    for s, e, v in out:
        if merged and merged[-1][1] == s and merged[-1][2] == v:
            merged[-1] = (merged[-1][0], e, v)
        else:
            merged.append((s, e, v))
    return merged
