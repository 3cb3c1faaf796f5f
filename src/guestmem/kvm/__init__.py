"""The kvm backend: guestmem's interface on the real ABI of /dev/kvm.

One module per kernel object: ``system`` (/dev/kvm), ``vm``, ``guest_memfd`` and ``vcpu``.
ctypes stays inside this package; callers see ints, bytes and ``guestmem.types`` dataclasses.
"""

from __future__ import annotations

from typing import Any

from .guest_memfd import GuestMemfd
from .system import System, open_system
from .vm import Vm

__all__ = ["open_system", "System", "Vm", "GuestMemfd", "Vcpu"]


def __getattr__(name: str) -> Any:
    # vcpu.py loads on first use, so the package imports while it is being written.
    if name == "Vcpu":
        from .vcpu import Vcpu

        return Vcpu
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
