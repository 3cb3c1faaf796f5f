"""guestmem: the Linux KVM guest-first memory subsystem (guest_memfd) from Python.

``open_system(backend=...)`` returns a System on the real kernel (``"kvm"``), on the
software implementation (``"model"``), or on whichever fits (``"auto"``: the kernel when
/dev/kvm is usable, else the model).
"""

from __future__ import annotations

import os
from typing import Any

from .interface import GuestMemfd, System, Vcpu, Vm

__all__ = ["open_system", "kvm_available", "choose_backend", "System", "Vm", "Vcpu", "GuestMemfd",
           "DEFAULT_KVM_DEVICE", "__version__"]


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("guestmem")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__version__ = _version()

DEFAULT_KVM_DEVICE = "/dev/kvm"


def kvm_device() -> str:
    """The KVM device path: ``$GUESTMEM_KVM_DEVICE`` (for hiding KVM in tests) or /dev/kvm."""
    return os.environ.get("GUESTMEM_KVM_DEVICE", DEFAULT_KVM_DEVICE)


def kvm_available(device: str | None = None) -> tuple[bool, str]:
    """Whether the KVM device can be opened read-write, and why not."""
    import fcntl

    from .uapi import KVM_API_VERSION, KVM_GET_API_VERSION

    path = device or kvm_device()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{path}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"{path} is not a KVM device (KVM_GET_API_VERSION: {exc.strerror})"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"{path}: KVM API version {version}, guestmem speaks {KVM_API_VERSION}"
    return True, f"{path} is accessible"


def choose_backend(needs: Any = (), *, device: str | None = None) -> Any:
    """The backend ``open_system("auto", needs=needs)`` picks, with a one-line reason.

    ``needs`` is a subset of ``{"private_memory", "vcpus", "mmap"}``; the result is a
    ``guestmem.choose.Choice`` (``.backend``, ``.reason``). The kernel wins when it can do
    every need, else the model.
    """
    from .choose import choose_backend as _choose

    return _choose(needs, device=device)


def open_system(backend: str = "auto", *, needs: Any = None, **options: Any) -> System:
    """Open a System on ``backend`` ("kvm", "model" or "auto").

    ``"auto"`` picks the kernel when /dev/kvm is usable, else the model; with ``needs`` (e.g.
    ``needs={"private_memory"}``) it picks the kernel only when the kernel can do all of them
    (``choose_backend`` tells why). ``needs`` is only meaningful with "auto".
    kvm options: ``device`` (default ``$GUESTMEM_KVM_DEVICE`` or /dev/kvm).
    model options: ``profile`` (see ``guestmem.model.profile``).
    """
    if needs is not None and backend != "auto":
        raise ValueError(f"needs= chooses a backend; it cannot be combined with backend={backend!r}")
    if backend == "auto":
        if needs is not None:
            backend = choose_backend(needs, device=options.get("device")).backend
            if backend == "model":
                options.pop("device", None)
        else:
            backend = "kvm" if kvm_available(options.get("device"))[0] else "model"
    if backend == "kvm":
        from .kvm import open_system as open_kvm

        return open_kvm(**options)
    if backend == "model":
        from .model import open_system as open_model

        return open_model(**options)
    raise ValueError(f"unknown backend {backend!r}: expected 'kvm', 'model' or 'auto'")
