"""guestmem's pytest plugin: run your own KVM tests on every backend this host can run.

Installed with guestmem (entry point ``pytest11``), so a test suite that has guestmem installed
gets, with no conftest:

Fixtures:

- ``guestmem_backend``: the backend name; a test using it runs once per backend ("kvm",
  "model"), and a backend this host cannot run shows as a skip with the reason.
  ``GUESTMEM_BACKENDS=model`` (a comma list) selects backends.
- ``guestmem_system``: an open ``System`` on that backend, closed after the test.
- ``guestmem_vm``: a ``Vm`` on that system; its type is ``@pytest.mark.vm_type(T)`` (default 0).
- ``guestmem_machine``: a factory, ``guestmem_machine(code, vcpus=1, memory=2 MiB,
  private=False, cpl=0)``, that builds a ``guestmem.vmm.Machine`` with a 64-bit guest assembled
  from ``code`` loaded; every machine is closed after the test.

Markers:

- ``requires_kvm``: skip unless /dev/kvm is usable (with the reason).
- ``requires_private_memory``: on the kvm backend, skip unless the kernel has private memory
  (a VM type with KVM_MEMORY_ATTRIBUTE_PRIVATE); the model always has it.
- ``vm_type(T)``: the VM type ``guestmem_vm`` creates.

Helpers: ``assert_exit(exit, kind, **fields)`` asserts an exit's type and fields and returns it;
``run_until(vcpu, kind, limit=...)`` runs a vCPU until an exit of ``kind``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import guestmem

__all__ = ["assert_exit", "run_until", "backend_skip_reason"]

BACKENDS = ("kvm", "model")
DATA_GPA = 1 << 30
"""Where ``guestmem_machine`` puts its data region (identity mapped in the guest)."""


def backend_skip_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run tests here (None when it can)."""
    wanted = os.environ.get("GUESTMEM_BACKENDS")
    if wanted and name not in wanted.split(","):
        return f"backend {name} not selected by GUESTMEM_BACKENDS={wanted}"
    if name == "kvm":
        ok, why = guestmem.kvm_available()
        return None if ok else f"kvm backend unavailable: {why}"
    return None


def _private_memory_skip_reason(backend: str) -> str | None:
    if backend != "kvm":
        return None
    choice = guestmem.choose_backend(["private_memory"])
    return None if choice.backend == "kvm" else f"requires private memory: {choice.reason}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_kvm: skip unless /dev/kvm is usable")
    config.addinivalue_line("markers", "requires_private_memory: on the kvm backend, skip unless the kernel "
                                       "has private memory (the model always has it)")
    config.addinivalue_line("markers", "vm_type(type): the KVM_CREATE_VM type of the guestmem_vm fixture")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_kvm") is not None:
        reason = backend_skip_reason("kvm")
        if reason:
            pytest.skip(f"requires_kvm: {reason}")


@pytest.fixture(params=BACKENDS)
def guestmem_backend(request: pytest.FixtureRequest) -> str:
    """The backend name; the test runs once per backend, skipping (with the reason) where it cannot."""
    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    if request.node.get_closest_marker("requires_private_memory") is not None:
        reason = _private_memory_skip_reason(request.param)
        if reason:
            pytest.skip(reason)
    return str(request.param)


@pytest.fixture
def guestmem_system(guestmem_backend: str) -> Iterator[Any]:
    """An open System on the backend under test."""
    with guestmem.open_system(guestmem_backend) as system:
        yield system


@pytest.fixture
def guestmem_vm(request: pytest.FixtureRequest, guestmem_system: Any) -> Iterator[Any]:
    """A VM on ``guestmem_system`` of the type named by ``@pytest.mark.vm_type`` (default 0)."""
    marker = request.node.get_closest_marker("vm_type")
    vm_type = marker.args[0] if marker is not None and marker.args else 0
    vm = guestmem_system.create_vm(vm_type)
    try:
        yield vm
    finally:
        vm.close()


@pytest.fixture
def guestmem_machine(guestmem_system: Any) -> Iterator[Callable[..., Any]]:
    """A factory for Machines with a 64-bit guest loaded from assembly; all closed after the test.

    ``guestmem_machine(code, *, vcpus=1, memory=2 MiB, private=False, cpl=0)``: the data region
    of ``memory`` bytes sits at ``DATA_GPA`` (private-capable when ``private``), identity mapped.
    """
    from .vmm.machine import Machine, boot_region
    from .vmm.layout import Region

    machines: list[Any] = []

    def build(code: str, *, vcpus: int = 1, memory: int = 2 << 20, private: bool = False, cpl: int = 0) -> Any:
        regions = [boot_region()]
        if memory:
            regions.append(Region("data", DATA_GPA, memory, private=private))
        machine = Machine(guestmem_system, regions, vcpus=vcpus)
        machines.append(machine)
        machine.load_assembly(code, cpl=cpl)
        return machine

    try:
        yield build
    finally:
        for machine in machines:
            machine.close()


def assert_exit(exit: Any, kind: type, **fields: Any) -> Any:
    """Assert ``exit`` is a ``kind`` (e.g. ``guestmem.types.IoExit``) whose ``fields`` are equal; return it."""
    __tracebackhide__ = True
    if not isinstance(exit, kind):
        raise AssertionError(f"expected a {kind.__name__}, the vCPU exited with {exit!r}")
    wrong = {name: (getattr(exit, name), want) for name, want in fields.items() if getattr(exit, name) != want}
    if wrong:
        detail = ", ".join(f"{name}={got!r} (expected {want!r})" for name, (got, want) in wrong.items())
        raise AssertionError(f"{kind.__name__}: {detail}")
    return exit


def run_until(vcpu: Any, kind: type, *, limit: int = 1000) -> Any:
    """Run ``vcpu`` until it exits with a ``kind``; other exits are answered as a VMM would not
    (IN and MMIO reads see zeros). :raises AssertionError: no such exit within ``limit`` runs."""
    __tracebackhide__ = True
    from .types import IoExit, MmioExit
    from .uapi import IoDirection

    seen = []
    for _ in range(limit):
        exit = vcpu.run()
        if isinstance(exit, kind):
            return exit
        seen.append(type(exit).__name__)
        if isinstance(exit, IoExit) and exit.direction == IoDirection.IN:
            vcpu.complete_io(bytes(exit.size * exit.count))
        elif isinstance(exit, MmioExit) and not exit.is_write:
            vcpu.complete_mmio(bytes(exit.len))
    raise AssertionError(f"no {kind.__name__} within {limit} runs (last exits: {seen[-5:]})")
