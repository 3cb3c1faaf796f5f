"""The VMM layer: guest memory layout, conversions, vCPU run loops and the Machine.

Built only on the backend interface (``guestmem.interface``), so everything here runs
unchanged on the real kernel and on the model.
"""

from __future__ import annotations

from .memory import Conversion, GuestMemory, Region, Slot, Snapshot

__all__ = ["Conversion", "GuestMemory", "Region", "Slot", "Snapshot"]
