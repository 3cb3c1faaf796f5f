"""Opening the backends for benchmarks, with a stated reason when one cannot run here.

Benchmarks run every workload on every backend that can run it; a backend that is missing
(no /dev/kvm, a package not built yet, Unicorn absent) becomes a "skipped: <reason>" row
instead of an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import guestmem

from .harness import Skip

BACKENDS = ("kvm", "model")


def unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot be opened here, or None if it can."""
    if backend == "kvm":
        ok, why = guestmem.kvm_available()
        if not ok:
            return f"no usable KVM device ({why})"
    try:
        with guestmem.open_system(backend):
            pass
    except ImportError as exc:
        return f"guestmem.{backend} is not available ({exc})"
    except OSError as exc:
        return f"opening the {backend} backend failed: {exc}"
    return None


@contextlib.contextmanager
def system(backend: str) -> Iterator[guestmem.System]:
    """An open System on ``backend``; raises Skip with the reason if there is none."""
    reason = unavailable(backend)
    if reason:
        raise Skip(reason)
    with guestmem.open_system(backend) as sys_:
        yield sys_
