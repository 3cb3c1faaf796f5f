"""guestmem: the Linux KVM guest-first memory subsystem (guest_memfd) from Python.

``open_system(backend=...)`` returns a System on the real kernel (``"kvm"``), on the
software implementation (``"model"``), or on whichever fits (``"auto"``: the kernel when
/dev/kvm is usable, else the model).
"""

from __future__ import annotations

import os
from typing import Any

from .interface import GuestMemfd, System, Vcpu, Vm

__all__ = ["open_system", "kvm_available", "System", "Vm", "Vcpu", "GuestMemfd", "DEFAULT_KVM_DEVICE"]

DEFAULT_KVM_DEVICE = "/dev/kvm"


def kvm_device() -> str:
    """The KVM device path: ``$GUESTMEM_KVM_DEVICE`` (for hiding KVM in tests) or /dev/kvm."""
    return os.environ.get("GUESTMEM_KVM_DEVICE", DEFAULT_KVM_DEVICE)


def kvm_available(device: str | None = None) -> tuple[bool, str]:
    """Whether the KVM device can be opened read-write, and why not."""
    path = device or kvm_device()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{path}: {exc.strerror}"
    os.close(fd)
    return True, f"{path} is accessible"


def open_system(backend: str = "auto", **options: Any) -> System:
    """Open a System on ``backend`` ("kvm", "model" or "auto").

    kvm options: ``device`` (default ``$GUESTMEM_KVM_DEVICE`` or /dev/kvm).
    model options: ``profile`` ("6.18", the default, or "6.8").
    """
    if backend == "auto":
        backend = "kvm" if kvm_available(options.get("device"))[0] else "model"
    if backend == "kvm":
        from .kvm import open_system as open_kvm

        return open_kvm(**options)
    if backend == "model":
        from .model import open_system as open_model

        return open_model(**options)
    raise ValueError(f"unknown backend {backend!r}: expected 'kvm', 'model' or 'auto'")
