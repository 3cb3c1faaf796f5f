"""An example test suite using guestmem's pytest plugin (the README shows this file).

Run it with ``python -m pytest examples/test_my_guest.py``: every test that takes a
``guestmem_*`` fixture runs once per backend this host can run.
"""

import errno

import pytest

from guestmem.pytest_plugin import DATA_GPA, assert_exit, run_until
from guestmem.types import IoExit
from guestmem.uapi import VmType


def test_guest_memfd_size_must_be_page_aligned(guestmem_vm):
    with pytest.raises(OSError) as exc:
        guestmem_vm.create_guest_memfd(4097)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.requires_private_memory
@pytest.mark.vm_type(VmType.SW_PROTECTED)
def test_private_memory_vm_has_the_private_attribute(guestmem_vm):
    from guestmem.uapi import Cap, MemoryAttribute

    assert guestmem_vm.check_extension(Cap.MEMORY_ATTRIBUTES) & MemoryAttribute.PRIVATE


def test_guest_reports_through_a_port(guestmem_machine):
    machine = guestmem_machine(f"mov qword ptr [{DATA_GPA:#x}], 0x1234; mov eax, 0x55; out 0x10, al")
    exit = run_until(machine.vcpus[0], IoExit)
    assert_exit(exit, IoExit, port=0x10, data=b"\x55")
    assert machine.memory.read(DATA_GPA, 8) == (0x1234).to_bytes(8, "little")
