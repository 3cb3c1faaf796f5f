"""Test fixtures: the ``backend`` fixture runs a test on every backend.

The kvm parameter skips with a stated reason when /dev/kvm (or ``$GUESTMEM_KVM_DEVICE``)
cannot be opened (the rule of the shipped pytest plugin, guestmem.pytest_plugin).

``@pytest.mark.kvm_pvm_differs(reason)`` marks a test of kernel behaviour that this project
host's kvm_pvm (software KVM, DEVELOPERS.md) gets wrong. On kvm_pvm the test's kvm run is a
strict xfail: it still runs, and passing there fails the suite, so a changed host is noticed.
On hardware KVM, and on the model, the test runs as usual.
"""

from __future__ import annotations

import os

import pytest

import guestmem
from guestmem.pytest_plugin import backend_skip_reason  # the rule the shipped plugin applies

BACKENDS = ["kvm", "model"]

# The kvm_pvm module provides /dev/kvm on the project host (no VMX/SVM): its kernel module.
KVM_PVM = os.path.isdir("/sys/module/kvm_pvm")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm_pvm_differs(reason): kvm_pvm gets this kernel behaviour wrong "
                                       "(strict xfail of the kvm run there)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not KVM_PVM:
        return
    for item in items:
        mark = item.get_closest_marker("kvm_pvm_differs")
        if mark is None:
            continue
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec else None
        if backend in (None, "kvm"):  # None: a kvm-only test
            item.add_marker(pytest.mark.xfail(strict=True, reason=mark.args[0]))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name; a test using it runs once per backend."""
    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


CONFORMANCE_PROFILE = "6.18"
"""The model profile the conformance suite compares with this host's kernel line (6.18); other
kernel versions are checked profile by profile in test_profiles.py."""


@pytest.fixture
def system(backend: str):
    """An open System on the backend under test (the model at CONFORMANCE_PROFILE)."""
    options = {"profile": CONFORMANCE_PROFILE} if backend == "model" else {}
    with guestmem.open_system(backend, **options) as sys_:
        yield sys_


@pytest.fixture
def kvm_system():
    """An open System on the real kernel (skips without /dev/kvm)."""
    reason = backend_skip_reason("kvm")
    if reason:
        pytest.skip(reason)
    with guestmem.open_system("kvm") as sys_:
        yield sys_


@pytest.fixture
def model_system():
    """An open System on the model (default profile)."""
    reason = backend_skip_reason("model")
    if reason:
        pytest.skip(reason)
    with guestmem.open_system("model") as sys_:
        yield sys_


# --- a VM that owns what a test makes on it (vCPUs, guest_memfds, mappings) -------------------

GUEST_RAM_SIZE = 0x200000


@pytest.fixture
def vm(system):
    """A default VM on the backend under test; everything in ``vm.test_objects`` is closed after
    the test, newest first. Test modules with their own ``vm`` fixture override this one."""
    vm = system.create_vm()
    vm.test_objects = []
    yield vm
    for obj in reversed(vm.test_objects):
        obj.close()
    vm.close()


def add_ram(vm, slot: int, gpa: int, size: int = GUEST_RAM_SIZE):
    """A guest_memfd-backed shared (MMAP|INIT_SHARED) slot at ``gpa``; returns its host mapping,
    which the guest reaches on both backends. Owned by ``vm.test_objects``."""
    from guestmem.uapi import GuestMemfdFlag, MemFlag

    gmem = vm.create_guest_memfd(size, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    ram = gmem.mmap()
    vm.set_user_memory_region2(slot, MemFlag.GUEST_MEMFD, gpa, size, userspace_addr=ram.address, guest_memfd=gmem)
    vm.test_objects += [gmem, ram]
    return ram


def vcpu_of(vm, vcpu_id: int = 0):
    """vCPU ``vcpu_id`` of ``vm``, owned by ``vm.test_objects``."""
    vcpu = vm.create_vcpu(vcpu_id)
    vm.test_objects.append(vcpu)
    return vcpu
