"""``StatsFd``: the model's binary statistics fd (KVM_GET_STATS_FD).

Data model: a StatsFd reserves an fd (``fdtable``) and holds a callable returning the
owner's counters. Each ``read()`` turns the integer counters into ``types.Stats`` with one
instant, unit-less, size-1 descriptor per counter, in a stable (sorted) order. The names
are the model's own counters (``Vm.stats()``), not the kernel's MMU and halt-polling
statistics, which describe machinery the model does not have; the id strings follow the
kernel's ``kvm-<pid>`` and ``kvm-<pid>/vcpu-<id>``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..types import Stats, StatsDesc
from ..uapi import StatsType
from . import fdtable


class StatsFd(fdtable.FdObject):
    """An open model stats fd."""

    def __init__(self, stats_id: str, source: Callable[[], dict[str, Any]]) -> None:
        self._id = stats_id
        self._source = source
        self._fd: int | None = fdtable.fd_install(self)

    def __repr__(self) -> str:
        return f"<model StatsFd {self._id} fd={self._fd}>"

    def _what(self) -> str:
        return f"stats fd of {self._id}"

    def read(self) -> Stats:
        """The current counters. :raises OSError: EBADF once closed."""
        self._check()
        counters = sorted((k, v) for k, v in self._source().items()
                          if isinstance(v, int) and not isinstance(v, bool))
        descs = tuple(StatsDesc(name=k, flags=int(StatsType.INSTANT), exponent=0, size=1, offset=8 * i,
                                bucket_size=0) for i, (k, _) in enumerate(counters))
        return Stats(id=self._id, descriptors=descs, values=tuple((v,) for _, v in counters))
