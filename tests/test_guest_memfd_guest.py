"""Guests running on guest_memfd memory, on every backend: GT-16 and host <-> guest data exchange.

Guest RAM is a guest_memfd created with MMAP|INIT_SHARED and bound as a memslot; the host
reads and writes the same bytes through the gmem mmap while the guest runs.

Host quirk (kvm_pvm, DEVELOPERS.md): its emulator (real-mode and CPL0 code) reaches guest
memory through the memslot's userspace_addr even for guest_memfd slots (native CPL3 code
reads the file), so these tests set userspace_addr to the gmem mapping. The spec's GT-16
uses userspace_addr = 0, which only works on hardware KVM.
"""

from __future__ import annotations

import struct

import pytest

from guestmem import guest, hostmem
from guestmem.types import HltExit, IoExit, MmioExit
from guestmem.uapi import Cap, GuestMemfdFlag, IoDirection, MemFlag

RAM_SIZE = 0x200000
SHARED = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED


def need_mmap_gmem(vm) -> None:
    flags = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    if flags & SHARED != SHARED:
        pytest.skip(f"KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}: no MMAP|INIT_SHARED guest_memfd")


def gmem_slot(vm, slot: int, gpa: int, size: int):
    """A MMAP|INIT_SHARED guest_memfd of ``size`` bound at ``gpa``; returns (gmem, mapping)."""
    gmem = vm.create_guest_memfd(size, SHARED)
    mapping = gmem.mmap()
    vm.set_user_memory_region2(slot, MemFlag.GUEST_MEMFD, gpa, size, userspace_addr=mapping.address,
                               guest_memfd=gmem, guest_memfd_offset=0)
    return gmem, mapping


def boot(vm, image):
    """RAM at GPA 0 from guest_memfd, ``image`` loaded, one vCPU set up; returns (vcpu, ram)."""
    _, ram = gmem_slot(vm, 0, 0, RAM_SIZE)
    guest.load(image, {0: ram})
    vcpu = vm.create_vcpu(0)
    guest.setup_vcpu(vcpu, image)
    return vcpu, ram


def run_to_port(vcpu, port: int) -> IoExit:
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit), exit_
    if exit_.port == guest.PORT_FAIL:
        r = vcpu.get_regs()
        pytest.fail(f"guest exception {r.rdi} error {r.rsi:#x} at rip {r.rdx:#x} cr2 {r.rcx:#x}")
    assert exit_.port == port, exit_
    return exit_


def test_gt16_guest_memfd_guest(system):
    """GT-16: host writes 0xaa through the gmem mmap, the guest checks it and writes 0xff, the
    host sees 0xff after re-mapping. The gmem is slot 1 at GPA 4 GiB, identity mapped."""
    vm = system.create_vm()
    need_mmap_gmem(vm)
    size, gpa = 0x1000, 1 << 32
    gmem = vm.create_guest_memfd(size, SHARED)
    mapping = gmem.mmap()
    mapping.fill(0, size, 0xAA)
    vm.set_user_memory_region2(1, MemFlag.GUEST_MEMFD, gpa, size, userspace_addr=mapping.address,
                               guest_memfd=gmem)
    code = f"""
        mov rdi, {gpa:#x}
        mov rcx, {size:#x}
        mov al, 0xaa
        cld
        repe scasb
        jne bad
        mov rdi, {gpa:#x}
        mov rcx, {size:#x}
        mov al, 0xff
        rep stosb
        mov eax, 0
        out {guest.PORT_DONE}, eax
    bad:
        mov eax, 1
        out {guest.PORT_FAIL}, eax
    """
    image = guest.long_mode_guest(code, identity_map=[(gpa, size)])
    vcpu, _ = boot(vm, image)
    exit_ = run_to_port(vcpu, guest.PORT_DONE)
    assert exit_.data == bytes(4)
    mapping.close()
    again = gmem.mmap()
    assert again.read(0, size) == b"\xff" * size
    again.close()


@pytest.mark.parametrize("cpl", [0, 3])
def test_long_mode_guest_exchanges_data_with_host(system, cpl):
    """OUT carries data out; IN is answered by complete_io; bytes the host writes through the
    mmap are read by the guest, and bytes the guest writes are seen by the host."""
    vm = system.create_vm()
    need_mmap_gmem(vm)
    mailbox = 0x100000
    code = f"""
        mov eax, 0x11223344
        out {guest.PORT_SYNC}, eax
        in eax, {guest.PORT_SYNC}
        mov rbx, {mailbox:#x}
        mov [rbx + 8], eax
        out {guest.PORT_SYNC}, eax
        mov rdi, [rbx]
        mov rsi, 0x5566778899aabbcc
        mov [rbx + 16], rsi
        mov eax, 7
    """
    image = guest.long_mode_guest(code, cpl=cpl)
    vcpu, ram = boot(vm, image)

    exit_ = run_to_port(vcpu, guest.PORT_SYNC)
    assert (exit_.direction, exit_.size, exit_.count, exit_.data) == (IoDirection.OUT, 4, 1, b"\x44\x33\x22\x11")

    exit_ = run_to_port(vcpu, guest.PORT_SYNC)
    # IoExit.data of an IN is not pinned: kvm gives b"", the model size*count zero bytes.
    assert (exit_.direction, exit_.size, exit_.count) == (IoDirection.IN, 4, 1)
    vcpu.complete_io(struct.pack("<I", 0xCAFEF00D))

    exit_ = run_to_port(vcpu, guest.PORT_SYNC)
    assert exit_.data == struct.pack("<I", 0xCAFEF00D)
    assert ram.read(mailbox + 8, 4) == struct.pack("<I", 0xCAFEF00D)
    ram.write(mailbox, struct.pack("<Q", 0x0123456789ABCDEF))

    exit_ = run_to_port(vcpu, guest.PORT_DONE)
    assert exit_.data == struct.pack("<I", 7)
    assert vcpu.get_regs().rdi == 0x0123456789ABCDEF
    assert ram.read(mailbox + 16, 8) == struct.pack("<Q", 0x5566778899AABBCC)


def test_real_mode_guest_exchanges_data_with_host(system):
    vm = system.create_vm()
    need_mmap_gmem(vm)
    code = f"""
        mov al, 0x5a
        out {guest.PORT_SYNC}, al
        in al, {guest.PORT_SYNC}
        mov [0x3000], al
        mov al, [0x3001]
        out {guest.PORT_SYNC}, al
        hlt
    """
    image = guest.real_mode_guest(code)
    vcpu, ram = boot(vm, image)
    assert run_to_port(vcpu, guest.PORT_SYNC).data == b"\x5a"
    run_to_port(vcpu, guest.PORT_SYNC)
    vcpu.complete_io(b"\xa5")
    ram.write(0x3001, b"\x3c")
    assert run_to_port(vcpu, guest.PORT_SYNC).data == b"\x3c"
    assert ram.read(0x3000, 1) == b"\xa5"
    assert isinstance(vcpu.run(), HltExit)



def test_moved_memslot_leaves_an_mmio_hole_at_its_old_gpa(system):
    """Spec 6.3: a MOVE zaps the slot's old mappings, so after the move a read the guest makes
    of the old GPA (already read once, so mapped) finds no memslot: an MMIO exit. The new GPA,
    an MMIO hole before the move, now reads the same host memory."""
    vm = system.create_vm()
    need_mmap_gmem(vm)
    old, new = 0x4000_0000, 0x4020_0000
    data = hostmem.map_memfd("guestmem-test-move", 0x1000)
    data.write(0, struct.pack("<I", 0x5A5A1234))
    vm.set_user_memory_region2(1, 0, old, 0x1000, userspace_addr=data.address)
    code = f"""
        mov rbx, {old:#x}
        mov rcx, {new:#x}
        mov eax, [rbx]
        out {guest.PORT_SYNC}, eax
        mov eax, [rcx]
        out {guest.PORT_SYNC}, eax
        mov eax, [rbx]
        out {guest.PORT_SYNC}, eax
        mov eax, [rcx]
        out {guest.PORT_DONE}, eax
    """
    vcpu, _ = boot(vm, guest.long_mode_guest(code, cpl=3, identity_map=[(old, 0x1000), (new, 0x1000)]))
    assert run_to_port(vcpu, guest.PORT_SYNC).data == struct.pack("<I", 0x5A5A1234)
    assert vcpu.run() == MmioExit(phys_addr=new, data=b"", len=4, is_write=False)
    vcpu.complete_mmio(struct.pack("<I", 0xBEEF))
    assert run_to_port(vcpu, guest.PORT_SYNC).data == struct.pack("<I", 0xBEEF)
    vm.set_user_memory_region2(1, 0, new, 0x1000, userspace_addr=data.address)  # KVM_MR_MOVE
    assert vcpu.run() == MmioExit(phys_addr=old, data=b"", len=4, is_write=False)
    vcpu.complete_mmio(struct.pack("<I", 0xF00D))
    assert run_to_port(vcpu, guest.PORT_SYNC).data == struct.pack("<I", 0xF00D)
    assert run_to_port(vcpu, guest.PORT_DONE).data == struct.pack("<I", 0x5A5A1234)
    vcpu.close()
    vm.close()
    data.close()


@pytest.mark.parametrize("cpl", [3, pytest.param(0, marks=pytest.mark.kvm_pvm_differs(
    "kvm_pvm's emulator (CPL0 code) reads guest memory through userspace_addr even for guest_memfd "
    "slots: the guest reads the decoy (measured; native CPL3 code reads the file)"))])
def test_guest_reads_an_mmap_guest_memfd_slot_from_the_file_not_userspace_addr(system, cpl):
    """6.18: a slot bound to a guest_memfd with GUEST_MEMFD_FLAG_MMAP takes every fault from
    the file (spec 2.3, GMEM_ONLY), even one without INIT_SHARED; userspace_addr is unused."""
    vm = system.create_vm()
    if not vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & GuestMemfdFlag.MMAP:
        pytest.skip("no GUEST_MEMFD_FLAG_MMAP on this kernel")
    gpa = 0x4000_0000
    decoy = hostmem.map_memfd("guestmem-test-decoy", 0x1000)
    decoy.fill(0, 0x1000, 0x77)
    gmem = vm.create_guest_memfd(0x1000, GuestMemfdFlag.MMAP)
    vm.set_user_memory_region2(1, MemFlag.GUEST_MEMFD, gpa, 0x1000, userspace_addr=decoy.address,
                               guest_memfd=gmem)
    code = f"mov rbx, {gpa:#x}\nmov eax, [rbx]\nout {guest.PORT_DONE}, eax"
    vcpu, _ = boot(vm, guest.long_mode_guest(code, cpl=cpl, identity_map=[(gpa, 0x1000)]))
    assert run_to_port(vcpu, guest.PORT_DONE).data == bytes(4)  # a fresh gmem page, not 0x77
    vcpu.close()
    vm.close()
    gmem.close()
    decoy.close()
