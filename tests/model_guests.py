"""Helpers for the model vCPU tests: model VMs running guest code built by ``guestmem.guest``.

Layout: slot 0 is 2 MiB of anonymous memory at GPA 0 holding the guest image (GDT, IDT,
page tables, code, stack); test memory lives in further slots, identity mapped.
"""

from __future__ import annotations

from guestmem import guest, hostmem
from guestmem.uapi import Cap, MemFlag, MemoryAttribute

PAGE = 4096
MB2 = 2 << 20
LOW_SIZE = MB2
SW = 1
PRIVATE = int(MemoryAttribute.PRIVATE)
GMEM = int(MemFlag.GUEST_MEMFD)
# Hypercall attrs as the selftest uses them: its own flag bits, not KVM's.
MAP_GPA_RANGE = 12


def anon(size: int) -> hostmem.Mapping:
    """Shared anonymous host memory (a memslot's userspace_addr)."""
    return hostmem.map_anonymous(size)


class Machine:
    """A model VM with slot 0 (the guest image) and helpers to add memory and vCPUs."""

    def __init__(self, system, vm_type: int = SW, hypercalls: bool = True) -> None:
        self.vm = system.create_vm(vm_type)
        if hypercalls:
            self.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << MAP_GPA_RANGE)
        self.low = anon(LOW_SIZE)
        self.vm.set_user_memory_region2(0, 0, 0, LOW_SIZE, self.low.address)
        self.keep: list = []
        self.vcpus: list = []

    def add_slot(self, slot: int, gpa: int, size: int, gmem=None, offset: int = 0) -> hostmem.Mapping:
        """A memslot with shared anonymous memory and, if ``gmem`` is given, its gmem binding."""
        shared = anon(size)
        self.keep.append(shared)
        if gmem is None:
            self.vm.set_user_memory_region2(slot, 0, gpa, size, shared.address)
        else:
            self.vm.set_user_memory_region2(slot, GMEM, gpa, size, shared.address, gmem, offset)
        return shared

    def load(self, code: str, identity_map=(), vcpus: int = 1, cpl: int = 0):
        """Build the guest, load it into slot 0 and create ``vcpus`` vCPUs at its entry."""
        image = guest.long_mode_guest(code, memory_base=0, memory_size=LOW_SIZE, cpl=cpl,
                                      identity_map=identity_map)
        guest.load(image, {0: self.low})
        for i in range(vcpus):
            v = self.vm.create_vcpu(i)
            guest.setup_vcpu(v, image)
            v.set_regs(image.regs.replace(rsp=image.stack_top - i * 0x1000))
            self.vcpus.append(v)
        self.image = image
        return self.vcpus

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vm.close()
