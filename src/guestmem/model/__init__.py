"""guestmem.model: guest_memfd, memslots, memory attributes and vCPUs in software.

Same interface as ``guestmem.kvm`` (guestmem.interface), same checks in the same order and
the same errnos, plus what the host kernel lacks: private memory, software-protected VMs,
hwpoison injection. ``open_system(profile=...)`` picks the kernel to reproduce (see
guestmem.model.profile). ``Vcpu`` loads lazily, so importing the package never imports
Unicorn.
"""

from __future__ import annotations

from typing import Any

from .guest_memfd import GuestMemfd
from .memslot import Memslot
from .profile import GUESTMEM_TDX_LIKE_VM, PROFILES, Profile
from .system import System, open_system
from .vm import Vm

__all__ = ["open_system", "System", "Vm", "GuestMemfd", "Vcpu", "Memslot", "Profile", "PROFILES",
           "GUESTMEM_TDX_LIKE_VM"]


def __getattr__(name: str) -> Any:
    if name == "Vcpu":
        from .vcpu import Vcpu

        return Vcpu
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
