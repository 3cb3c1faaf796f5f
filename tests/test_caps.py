"""KVM_CHECK_EXTENSION: the cap argument's width, and the model's host data against /dev/kvm.

``HOST_CAPS``/``HOST_VM_CAPS`` in guestmem/model/profile.py are a dump of this project's host
(kvm_pvm, 6.18); the tests here compare them, and the "6.18-host" profile built on them, with
the real device so they cannot silently rot.
"""

from __future__ import annotations

import errno
import os

import pytest

import guestmem
from guestmem.model.profile import HOST_CAPS, HOST_VM_CAPS, UNCLAIMED_CAPS

CAPS = range(512)


def _require_dumped_host() -> None:
    release = os.uname().release
    if not (os.path.exists("/sys/module/kvm_pvm") and release.startswith("6.18.")):
        pytest.skip(f"HOST_CAPS describes the project host (kvm_pvm, 6.18); this host runs {release}")


@pytest.mark.parametrize("cap", [1 << 32, (1 << 32) + 4, 1 << 63, (1 << 64) - 1, -1])
def test_cap_number_is_an_unsigned_long(system, cap):
    """The kernel reads all 64 bits: 1 << 32 is an unknown cap (0), not cap 0 or an error;
    (1 << 32) + 4 does not alias cap 4 (USER_MEMORY). Measured on this host."""
    vm = system.create_vm()
    assert system.check_extension(cap) == 0
    assert vm.check_extension(cap) == 0
    assert system.check_extension(4) == 1  # the low bits alone name a real cap


def test_cap_wider_than_64_bits_is_einval(system):
    with pytest.raises(OSError) as info:
        system.check_extension(1 << 64)
    assert info.value.errno == errno.EINVAL


def test_host_caps_match_dev_kvm(kvm_system):
    _require_dumped_host()
    vm = kvm_system.create_vm()
    got = {c: v for c in CAPS if (v := kvm_system.check_extension(c))}
    got_vm = {c: v for c in CAPS if (v := vm.check_extension(c)) != got.get(c, 0)}
    assert got == HOST_CAPS
    assert got_vm == HOST_VM_CAPS


NOT_CLAIMED = UNCLAIMED_CAPS  # answered 0 on purpose: the model does not implement them


def test_host_profile_answers_every_cap_as_dev_kvm(kvm_system):
    _require_dumped_host()
    with guestmem.open_system("model", profile="6.18-host") as model:
        kvm_vm, model_vm = kvm_system.create_vm(), model.create_vm()
        for c in CAPS:
            if c in NOT_CLAIMED:
                assert model.check_extension(c) == model_vm.check_extension(c) == 0, c
                continue
            assert model.check_extension(c) == kvm_system.check_extension(c), c
            assert model_vm.check_extension(c) == kvm_vm.check_extension(c), c


def _prefault_sequence(system) -> list[int]:
    """Errnos of KVM_PRE_FAULT_MEMORY on a fresh VM, after a memslot came and went, on a new vCPU."""
    out = []

    def call(v) -> None:
        try:
            v.pre_fault_memory(0x200000, 4096)
            out.append(0)
        except OSError as exc:
            out.append(exc.errno)

    vm = system.create_vm()
    v0 = vm.create_vcpu(0)
    call(v0)
    call(v0)
    vm.set_user_memory_region(0, 0, 0x100000, 4096, 0)
    vm.set_user_memory_region(0, 0, 0x100000, 0, 0)
    call(v0)
    call(vm.create_vcpu(1))
    return out


def test_pre_fault_memory_on_a_vm_that_never_had_a_memslot(kvm_system):
    """kvm_pvm: ENOSPC until the VM has had a memslot, then the no-TDP EOPNOTSUPP (measured);
    the "6.18-host" profile answers the same sequence (issue 15: the model said EOPNOTSUPP)."""
    _require_dumped_host()
    expected = [errno.ENOSPC, errno.ENOSPC, errno.EOPNOTSUPP, errno.EOPNOTSUPP]
    assert _prefault_sequence(kvm_system) == expected
    with guestmem.open_system("model", profile="6.18-host") as model:
        assert _prefault_sequence(model) == expected


def test_unclaimed_caps_are_zero_on_every_profile():
    """The model never claims a feature it does not implement, whatever the host reports."""
    from guestmem.model.profile import PROFILES

    for name in PROFILES:
        with guestmem.open_system("model", profile=name) as model:
            vm = model.create_vm()
            assert all(model.check_extension(c) == vm.check_extension(c) == 0 for c in UNCLAIMED_CAPS), name
