"""The drop-in /dev/kvm: an unmodified C program runs on the kernel and on the model.

``tests/c/gmem_vm.c`` (guest_memfd, memslots, exits, signals) and ``tests/c/vcpu_state.c``
(the kvm_run sync-regs area, vCPU state ioctls, the irqchip) use only the kernel's uapi
header. The same binary runs directly on /dev/kvm (skipped without it) and under
``guestmem exec``; both runs must pass every step, the same steps in the same order.
Skips say why when there is no C compiler, no cffi or no Python headers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import guestmem
from guestmem.cli import main

SOURCE = Path(__file__).parent / "c" / "gmem_vm.c"
VCPU_STATE = Path(__file__).parent / "c" / "vcpu_state.c"


def _compile(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (install gcc or set CC)")
    out = tmp_path_factory.mktemp("c") / source.stem
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(SOURCE, tmp_path_factory)


@pytest.fixture(scope="module")
def vcpu_state_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(VCPU_STATE, tmp_path_factory)


@pytest.fixture(scope="module")
def dropin() -> None:
    from guestmem.devkvm import Unavailable, library

    try:
        library()
    except Unavailable as exc:
        pytest.skip(f"drop-in library unavailable: {exc}")


def _steps(stdout: str) -> list[str]:
    return [line[3:] for line in stdout.splitlines() if line.startswith("ok ")]


def test_own_program_passes_on_the_kernel(program: Path) -> None:
    ok, why = guestmem.kvm_available()
    if not ok:
        pytest.skip(f"kvm backend unavailable: {why}")
    proc = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("done")


def test_own_program_passes_on_the_model(program: Path, dropin: None) -> None:
    from guestmem.devkvm import exec_program

    code = exec_program([str(program)], profile="6.18", timeout=60, capture_output=True, text=True)
    assert code == 0


def test_own_program_steps_match_between_kernel_and_model(program: Path, dropin: None) -> None:
    """Every step the kernel run reports, the model run reports too, in the same order."""
    from guestmem.devkvm import program_env

    model = subprocess.run([str(program)], capture_output=True, text=True, timeout=120, env=program_env("6.18"))
    assert model.returncode == 0, model.stdout + model.stderr
    ok, _ = guestmem.kvm_available()
    if ok:
        host = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
        assert _steps(model.stdout) == _steps(host.stdout)
    assert "KVM_RUN: HLT exit" in _steps(model.stdout)


def test_vcpu_state_program_steps_match_between_kernel_and_model(vcpu_state_program: Path, dropin: None) -> None:
    """Sync regs in kvm_run (KVM_CAP_SYNC_REGS is claimed, so KVM_RUN must serve the area),
    and the FPU, XSAVE, XCR, debug-register, event, LAPIC and IRQ-line ioctls, through the
    drop-in: every step passes, and each is a step the kernel run reports too."""
    from guestmem.devkvm import program_env

    model = subprocess.run([str(vcpu_state_program)], capture_output=True, text=True, timeout=120,
                           env=program_env("6.18"))
    assert model.returncode == 0, model.stdout + model.stderr
    assert model.stdout.rstrip().endswith("done")
    assert "the guest ran with the dirty RAX" in _steps(model.stdout)
    ok, _ = guestmem.kvm_available()
    if ok:
        host = subprocess.run([str(vcpu_state_program)], capture_output=True, text=True, timeout=60)
        assert host.returncode == 0, host.stdout + host.stderr
        assert _steps(model.stdout) == _steps(host.stdout)


def test_trace_records_every_served_call(program: Path, dropin: None, tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    assert main(["exec", "--trace", str(trace), "--", str(program)]) == 0
    lines = trace.read_text().splitlines()
    assert any("open('/dev/kvm')" in line and line.split(" = ")[1].split()[0].isdigit() for line in lines)
    assert any("KVM_CREATE_GUEST_MEMFD" in line for line in lines)
    assert any("ioctl(" in line and "= -1 EINVAL" in line for line in lines)  # the unknown ioctl
    assert sum("KVM_RUN" in line for line in lines) == 5
    assert any("KVM_RUN" in line and "= -1 EINTR" in line for line in lines)


def test_exec_returns_the_program_exit_status(dropin: None) -> None:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    assert main(["exec", "--", sh, "-c", "exit 3"]) == 3


def test_exec_refuses_an_unknown_profile(dropin: None) -> None:
    assert main(["exec", "--profile", "no-such-kernel", "--", "true"]) == 1
