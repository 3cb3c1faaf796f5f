"""The drop-in /dev/kvm: unmodified KVM programs run on ``guestmem.model``.

``exec_program(argv)`` runs a program with the native library (``native.library()``)
preloaded; the library embeds the interpreter, and ``server`` serves every call the program
makes on /dev/kvm and on the fds it hands out, through the model's public API. Everything
else the program does reaches the kernel untouched. ``kselftest`` builds and runs the
kernel's KVM selftests on the host and on the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from .native import Unavailable, library

__all__ = ["exec_program", "program_env", "library", "Unavailable"]


def program_env(profile: str | None = None, trace: str | None = None,
                env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that runs a program on the model (builds the library if needed).

    :raises Unavailable: the native library cannot be built here (the reason says why).
    """
    from ..model.profile import resolve_profile

    if profile is not None:
        resolve_profile(profile)  # ValueError for an unknown name, before the program starts
    env = dict(os.environ if env is None else env)
    lib = str(library())
    preload = env.get("LD_PRELOAD")
    env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    env["GUESTMEM_DEVKVM_SYSPATH"] = os.pathsep.join(os.path.abspath(p) if not p or os.path.exists(p) else p
                                                     for p in sys.path)
    if profile:
        env["GUESTMEM_DEVKVM_PROFILE"] = profile
    else:
        env.pop("GUESTMEM_DEVKVM_PROFILE", None)
    if trace:
        env["GUESTMEM_DEVKVM_TRACE"] = os.path.abspath(trace)
    else:
        env.pop("GUESTMEM_DEVKVM_TRACE", None)
    return env


def exec_program(argv: Sequence[str], profile: str | None = None, trace: str | None = None,
                 timeout: float | None = None, **kwargs) -> int:
    """Run ``argv`` with the model serving /dev/kvm to it; returns its exit status
    (128 + N if signal N ended it, as a shell reports).

    :raises Unavailable: the native library cannot be built here.
    :raises FileNotFoundError: the program does not exist.
    """
    proc = subprocess.run(list(argv), env=program_env(profile, trace), timeout=timeout, **kwargs)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
