"""What the host holds for a guest: this process's resident memory and a mapping's resident
pages (``GuestMemory.host_memory``, ``GuestMemory.populated``, the footprint benchmark)."""

from __future__ import annotations

import ctypes
import re

from .. import hostmem
from ..errors import oserror
from ..uapi import PAGE_SHIFT, PAGE_SIZE

__all__ = ["process_memory", "resident_runs"]


def process_memory() -> dict[str, int]:
    """This process's resident anonymous and shared memory (/proc/self/status RssAnon, RssShmem)."""
    out = {"rss_anon": 0, "rss_shmem": 0}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                out["rss_anon" if key == "RssAnon" else "rss_shmem"] = int(value.split()[0]) * 1024
    return out


def resident_runs(address: int, length: int) -> list[tuple[int, int]]:
    """The resident pages of ``[address, address+length)`` as ``(first, end)`` page-index runs
    relative to ``address`` (mincore(2)).

    :raises OSError: mincore's errno (ENOMEM: part of the range is not mapped).
    """
    libc = hostmem.libc
    npages = (length + PAGE_SIZE - 1) >> PAGE_SHIFT
    vec = ctypes.create_string_buffer(npages)
    if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) != 0:
        err = ctypes.get_errno()
        raise oserror(err, f"mincore({address:#x}, {length:#x})")
    return [(m.start(), m.end()) for m in _RESIDENT.finditer(vec.raw.translate(_LOWBIT))]


_LOWBIT = bytes(i & 1 for i in range(256))  # mincore's vector: bit 0 of each byte is residency
_RESIDENT = re.compile(rb"[\x01-\xff]+")
