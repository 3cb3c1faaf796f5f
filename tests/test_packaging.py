"""Packaging conventions: the version in three places, ``python -m guestmem``, and
``open_system("auto", needs=...)`` choosing by the same rule the CLI uses."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import guestmem
from guestmem.cli import main


def test_version_attribute_is_the_installed_distribution_version():
    assert guestmem.__version__ == metadata.version("guestmem")


def test_cli_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"guestmem {guestmem.__version__}"


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "guestmem", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"guestmem {guestmem.__version__}"


def test_needs_picks_the_model_without_kvm(monkeypatch):
    monkeypatch.setenv("GUESTMEM_KVM_DEVICE", "/dev/nonexistent-kvm")
    choice = guestmem.choose_backend(["private_memory"])
    assert choice.backend == "model" and "/dev/nonexistent-kvm" in choice.reason
    with guestmem.open_system("auto", needs={"private_memory"}) as system:
        assert type(system).__module__.startswith("guestmem.model")


def test_needs_private_memory_follows_the_kernels_caps():
    ok, why = guestmem.kvm_available()
    if not ok:
        pytest.skip(f"needs /dev/kvm: {why}")
    from guestmem.uapi import Cap, VmType

    with guestmem.open_system("kvm") as kvm:
        has_private = bool(kvm.check_extension(Cap.VM_TYPES) & (1 << VmType.SW_PROTECTED))
    choice = guestmem.choose_backend(["private_memory"])
    assert choice.backend == ("kvm" if has_private else "model")
    with guestmem.open_system("auto", needs=["private_memory"]) as system:
        assert type(system).__module__.startswith(f"guestmem.{choice.backend}")
    assert guestmem.choose_backend([]).backend == "kvm"  # plain needs: the kernel when usable


def test_unknown_need_and_needs_with_a_named_backend_are_errors():
    with pytest.raises(ValueError, match="unknown need"):
        guestmem.choose_backend(["teleport"])
    with pytest.raises(ValueError, match="needs= chooses a backend"):
        guestmem.open_system("model", needs=["mmap"])
