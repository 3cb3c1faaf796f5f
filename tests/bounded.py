"""Run a snippet in a fresh interpreter with a time and address-space bound.

For calls that used to loop for minutes or forever (and grow memory while they do): a
regression then fails its test with TimeoutExpired or MemoryError instead of hanging the
run or exhausting the shared machine.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def run_bounded(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``python -c code`` from the repository root (this checkout's guestmem); its result."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_cap_address_space, cwd=ROOT)
