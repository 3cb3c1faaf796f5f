"""Bundled guest workloads for ``guestmem run``: real x86 guest code plus its host side.

A workload is the guest program (assembly text in ``<name>.S``, assembled by
``guestmem.guest``) and the host half that answers its PORT_SYNC requests and checks what
it sees. Each one declares what it needs from the host (``needs_private``), the memory
layout it wants and the numbers it reports.

- ``conversions`` (default): private <-> shared conversions of 4 KiB, 2 MiB and 2 MiB + 4 KiB
  on every vCPU, with host-side checks that shared data arrives and private data never
  shows in the host's view.
- ``secret``: the guest writes a secret into private memory; the host tries every access
  path it has and reports each one.
- ``touch``: first-touch population of all guest memory (no private memory needed).
- ``guest``: the user's own guest file (``guestmem run --guest FILE``; see ``user.py``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ..uapi import IoDirection

__all__ = ["WORKLOADS", "DEFAULT", "get", "source", "sync_op"]

DEFAULT = "conversions"
WORKLOADS = ("conversions", "secret", "touch")


def source(name: str) -> str:
    """The assembly text of workload ``name`` with its ``#`` comment lines removed."""
    text = resources.files(__name__).joinpath(f"{name}.S").read_text()
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def sync_op(vcpu: Any, exit: Any) -> int | None:
    """The op code of a PORT_SYNC OUT (its first 4 data bytes); an IN is answered with zeros (None)."""
    if exit.direction != IoDirection.OUT:
        vcpu.complete_io(bytes(exit.size))
        return None
    return int.from_bytes(exit.data[:4], "little")


def get(name: str, **options: Any) -> Any:
    """A fresh instance of workload ``name``.

    :raises ValueError: unknown name.
    """
    if name == "conversions":
        from .conversions import Conversions

        return Conversions(**options)
    if name == "secret":
        from .secret import Secret

        return Secret(**options)
    if name == "touch":
        from .touch import Touch

        return Touch(**options)
    if name == "guest":
        from .user import UserGuest

        return UserGuest(**options)
    raise ValueError(f"unknown workload {name!r}: choose one of {', '.join(WORKLOADS)}")
