"""``StatsFd``: a binary statistics fd of a VM or vCPU (KVM_GET_STATS_FD, api.rst 4.134).

The fd's file holds a ``kvm_stats_header``, the id string, ``num_desc`` descriptors of
``sizeof(kvm_stats_desc) + name_size`` bytes each, and the data block: descriptor i's
``size`` u64 values at ``data_offset + offset``. Header, id and descriptors never change for
the life of the fd, so they are parsed once; ``read()`` preads only the data block.
"""

from __future__ import annotations

import ctypes
import os
import struct

from .. import uapi
from ..errors import oserror
from ..types import Stats, StatsDesc
from ._fd import FdObject

_HEADER = ctypes.sizeof(uapi.kvm_stats_header)
_DESC = ctypes.sizeof(uapi.kvm_stats_desc)


class StatsFd(FdObject):
    """An open binary stats fd (owned: ``close()`` closes it)."""

    def __init__(self, fd: int, what: str) -> None:
        self._fd = fd
        self._owner = what
        try:
            h = uapi.kvm_stats_header.from_buffer_copy(self._pread(_HEADER, 0))
            self._id = self._pread(h.name_size, h.id_offset).split(b"\0", 1)[0].decode()
            step = _DESC + h.name_size
            raw = self._pread(step * h.num_desc, h.desc_offset)
            descs = []
            for i in range(h.num_desc):
                d = uapi.kvm_stats_desc.from_buffer_copy(raw, i * step)
                name = raw[i * step + _DESC:(i + 1) * step].split(b"\0", 1)[0].decode()
                descs.append(StatsDesc(name=name, flags=d.flags, exponent=d.exponent, size=d.size,
                                       offset=d.offset, bucket_size=d.bucket_size))
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        self._descs = tuple(descs)
        self._data_offset = h.data_offset
        self._data_size = max((d.offset + 8 * d.size for d in descs), default=0)

    def __repr__(self) -> str:
        return f"<kvm.StatsFd of {self._owner} fd={self._fd}>"

    def _what(self) -> str:
        return f"stats fd of {self._owner}"

    def _pread(self, n: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, n, offset)
        except OSError as exc:
            raise oserror(exc.errno or 5, f"pread({self._what()}, {n}, {offset:#x})") from None
        if len(data) != n:
            raise oserror(5, f"short read of {self._what()}: {len(data)} of {n} bytes at {offset:#x}")
        return data

    def read(self) -> Stats:
        """The current values of every statistic. :raises OSError: EBADF if closed."""
        self._check()
        data = self._pread(self._data_size, self._data_offset)
        values = tuple(struct.unpack_from(f"<{d.size}Q", data, d.offset) for d in self._descs)
        return Stats(id=self._id, descriptors=self._descs, values=values)
