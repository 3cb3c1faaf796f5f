"""Where guestmem builds native code at first use, and with which compiler.

Three parts build C with the system compiler into a per-user cache: the benchmark's reference
programs (``bench``), the drop-in's preloaded library (``devkvm``) and the kernel's selftests
(``kselftest``). They share the two rules here so a user sets ``CC`` or a cache location once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["cache_dir", "c_compiler"]


def cache_dir(part: str, env: str) -> Path:
    """``$<env>`` if set, else ``$XDG_CACHE_HOME/guestmem/<part>`` (``~/.cache`` by default)."""
    explicit = os.environ.get(env)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "guestmem" / part


def c_compiler() -> str | None:
    """``$CC`` if set (and found), else the first of cc, gcc, clang on PATH; None if none."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or None
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)
