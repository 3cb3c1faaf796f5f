"""The VMM layer: guest memory layout, conversions, vCPU run loops and the Machine.

Built only on the backend interface (``guestmem.interface``), so everything here runs
unchanged on the real kernel and on the model. ``run_workload`` is ``guestmem run``.
"""

from __future__ import annotations

from .conversion import ConversionManager, ConversionStats
from .job import RunResult, run_workload
from .machine import Machine, boot_region
from .layout import Region, Slot, Snapshot
from .memory import Conversion, GuestMemory
from .runloop import GuestError, Outcome, RunLoop

__all__ = ["Conversion", "ConversionManager", "ConversionStats", "GuestError", "GuestMemory", "Machine",
           "Outcome", "Region", "RunLoop", "RunResult", "Slot", "Snapshot", "boot_region", "run_workload"]
