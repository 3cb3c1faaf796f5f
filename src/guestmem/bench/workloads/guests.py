"""Benchmark guests: a 64-bit guest from assembly text, with an optional 1 GiB test slot.

Built on ``guestmem.guest`` (the guest builder) and the public backend API only, so the
same guest runs on kvm and on the model. The test slot sits at GPA 1 GiB:

* ``"gmem-shared"``: a guest_memfd with MMAP|INIT_SHARED whose mapping is the slot's
  userspace_addr (what this host's kvm_pvm needs, and shared memory on the model);
* ``"private"``: a guest_memfd without flags plus a shared anonymous userspace range (what a
  VMM's memfd/shmem RAM backend gives), on a SW_PROTECTED VM, for private memory and
  conversions (model only on this host).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ... import hostmem, uapi
from ..harness import Skip

TEST_GPA = 1 << 30
TEST_SLOT = 1
LOW_SIZE = 2 << 20


@dataclasses.dataclass
class Guest:
    vm: Any
    vcpu: Any
    entry: int
    image: Any
    test_gmem: Any = None
    test_map: Any = None  # host view of the test slot's shared memory (a hostmem.Mapping)
    _anon: tuple[int, int] | None = None
    _closers: list = dataclasses.field(default_factory=list)

    def restart(self, **regs: int) -> None:
        """Point the vCPU at the entry again with the given registers (rip is the entry)."""
        self.vcpu.set_regs(self.vcpu.get_regs().replace(rip=self.entry, **regs))

    def close(self) -> None:
        for fn in reversed(self._closers):
            fn()
        self._closers.clear()


def _builder():
    try:
        from ... import guest as builder
    except ImportError as exc:
        raise Skip(f"the guest builder guestmem.guest is not available ({exc})") from exc
    return builder


def build(system: Any, asm: str, *, cpl: int, vm_type: int = 0, test: str | None = None,
          test_size: int = 0, hypercalls: bool = False) -> Guest:
    """A VM with one vCPU at the start of ``asm`` (64-bit, ``cpl``), optionally a test slot.

    Low memory (builder structures, code, stack) is a 2 MiB slot at GPA 0: a guest_memfd
    with MMAP|INIT_SHARED registered through its mapping on default VMs (as the C reference
    does), anonymous memory on VMs with private memory (INIT_SHARED is refused there).
    """
    builder = _builder()
    try:
        vm = system.create_vm(vm_type)
    except OSError as exc:
        raise Skip(f"VM type {vm_type} is not supported here ({exc.strerror})") from exc
    g = Guest(vm, None, 0, None)
    g._closers.append(vm.close)
    try:
        if hypercalls:
            try:
                vm.enable_cap(int(uapi.Cap.EXIT_HYPERCALL), 1 << int(uapi.Hypercall.MAP_GPA_RANGE))
            except OSError as exc:
                raise Skip(f"KVM_CAP_EXIT_HYPERCALL unavailable ({exc.strerror})") from exc
        image = builder.long_mode_guest(asm, cpl=cpl, memory_size=LOW_SIZE,
                                        identity_map=[(TEST_GPA, test_size)] if test else ())
        if vm_type == 0:
            gmem = vm.create_guest_memfd(LOW_SIZE, int(uapi.GuestMemfdFlag.MMAP | uapi.GuestMemfdFlag.INIT_SHARED))
            g._closers.append(gmem.close)
            low = gmem.mmap(LOW_SIZE)
            g._closers.append(low.close)
            vm.set_user_memory_region2(0, int(uapi.MemFlag.GUEST_MEMFD), 0, LOW_SIZE, userspace_addr=low.address,
                                       guest_memfd=gmem, guest_memfd_offset=0)
        else:
            low = hostmem.map_anonymous(LOW_SIZE)
            g._closers.append(low.close)
            vm.set_user_memory_region2(0, 0, 0, LOW_SIZE, userspace_addr=low.address)
        builder.load(image, {0: low})
        vcpu = vm.create_vcpu(0)
        g._closers.append(vcpu.close)
        builder.setup_vcpu(vcpu, image)
        g.image, g.vcpu, g.entry = image, vcpu, image.entry
        if test:
            _add_test_slot(g, test, test_size)
    except Exception:
        g.close()
        raise
    return g


def _add_test_slot(g: Guest, kind: str, size: int) -> None:
    flag = int(uapi.MemFlag.GUEST_MEMFD)
    if kind == "gmem-shared":
        gmem = g.vm.create_guest_memfd(size, int(uapi.GuestMemfdFlag.MMAP | uapi.GuestMemfdFlag.INIT_SHARED))
        g._closers.append(gmem.close)
        m = gmem.mmap(size)
        g._closers.append(m.close)
        addr = m.address
        g.test_map = m
    elif kind == "private":
        gmem = g.vm.create_guest_memfd(size, 0)
        g._closers.append(gmem.close)
        addr = hostmem.mmap(size, hostmem.PROT_READ | hostmem.PROT_WRITE,
                            hostmem.MAP_SHARED | hostmem.MAP_ANONYMOUS | hostmem.MAP_NORESERVE, -1, 0)
        g._closers.append(lambda: hostmem.munmap(addr, size))
    else:
        raise ValueError(f"unknown test slot kind {kind!r}")
    g.test_gmem = gmem
    g.vm.set_user_memory_region2(TEST_SLOT, flag, TEST_GPA, size, userspace_addr=addr, guest_memfd=gmem,
                                 guest_memfd_offset=0)
    g._closers.append(lambda: g.vm.set_user_memory_region2(TEST_SLOT, flag, TEST_GPA, 0, userspace_addr=addr,
                                                           guest_memfd=gmem, guest_memfd_offset=0))
