"""guest builder: assembly, page tables, descriptor tables and loading. No backend needed."""

from __future__ import annotations

import struct

import pytest

from guestmem import guest

P, PS, US = 1, 1 << 7, 1 << 2
GIB = 1 << 30


class Memory:
    """A sparse guest-physical memory that reads the image's chunks back (zero elsewhere)."""

    def __init__(self, image: guest.GuestImage) -> None:
        self.chunks = image.chunks

    def read(self, gpa: int, size: int) -> bytes:
        for base, data in self.chunks:
            if base <= gpa and gpa + size <= base + len(data):
                return data[gpa - base:gpa - base + size]
        return bytes(size)

    def u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]


def walk(image: guest.GuestImage, va: int) -> tuple[int, int] | None:
    """Translate ``va`` through the image's page tables: (pa, leaf size) or None if unmapped."""
    mem, table = Memory(image), image.sregs.cr3
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = mem.u64(table + 8 * ((va >> shift) & 511))
        if not entry & P:
            return None
        assert entry & US, "every level carries U/S so CPL3 can use every mapped page"
        if shift == 30:
            assert not entry & PS, "no 1 GiB leaves: this host's CPUID lacks PDPE1GB"
        if shift == 21 and entry & PS:
            return (entry & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF), 1 << 21
        if shift == 12:
            return (entry & ~0xFFF & ((1 << 52) - 1)) | (va & 0xFFF), 1 << 12
        table = entry & ~0xFFF & ((1 << 52) - 1)
    raise AssertionError("unreachable")


def test_assemble_64_bit():
    assert guest.assemble("mov eax, 1; out 0xf4, eax", 0x1000) == bytes.fromhex("b801000000e7f4")


def test_assemble_16_bit_uses_address_for_labels():
    assert guest.assemble("here: jmp here", 0x7C00, bits=16) == bytes.fromhex("ebfe")


def test_assemble_error_is_value_error_with_message():
    with pytest.raises(ValueError, match="Invalid operand"):
        guest.assemble("mov rax, rbx, rcx", 0)


def test_assemble_refuses_what_keystone_silently_drops():
    """Keystone returns no bytes and no error for NASM's ``byte [m]`` (it wants ``byte ptr``),
    dropping the whole source: the guest would run zeros. That is a ValueError."""
    with pytest.raises(ValueError, match="ptr"):
        guest.assemble("nop\nmov byte [0x3000], 1\nnop", 0x1000, 16)
    assert guest.assemble("mov byte ptr [0x3000], 1", 0x1000, 16) == bytes.fromhex("c606003001")
    assert guest.assemble("", 0x1000) == b"" and guest.assemble("only_a_label:", 0x1000) == b""


def test_assemble_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        guest.assemble("nop", 0, bits=8)


def test_long_mode_layout_and_registers():
    image = guest.long_mode_guest("nop", memory_base=0x100000, memory_size=0x200000)
    assert image.gdt_gpa == 0x100000 and image.entry == image.code_gpa == image.regs.rip
    assert image.stack_top == image.regs.rsp == 0x300000
    assert image.sregs.cs.l == 1 and image.sregs.cs.dpl == 0 and image.sregs.cs.selector == guest.SEL_KERNEL_CODE
    assert image.sregs.efer & 0x500 == 0x500 and image.sregs.cr0 & (1 << 31) and image.sregs.cr4 & (1 << 5)
    assert image.sregs.cr3 == image.page_table_gpa
    # the code ends in the PORT_DONE epilogue
    code = dict(image.chunks)[image.code_gpa]
    assert code.startswith(b"\x90") and bytes([0xE7, guest.PORT_DONE]) in code


def test_cpl3_uses_ring3_selectors_iopl3_and_tss_io_bitmap():
    image = guest.long_mode_guest("nop", cpl=3)
    s = image.sregs
    assert (s.cs.selector, s.cs.dpl, s.ss.selector, s.ss.dpl) == (guest.SEL_USER_CODE, 3, guest.SEL_USER_DATA, 3)
    assert image.regs.rflags & 0x3000 == 0x3000
    mem = Memory(image)
    tss = mem.read(image.tss_gpa, 104)
    iomap_base = struct.unpack_from("<H", tss, 102)[0]
    assert s.tr.limit == iomap_base + 0x2000  # bitmap for every port, then the 0xFF byte
    assert mem.read(image.tss_gpa + iomap_base, 0x2000) == bytes(0x2000)
    assert mem.read(image.tss_gpa + iomap_base + 0x2000, 1) == b"\xff"
    rsp0 = struct.unpack_from("<Q", tss, 4)[0]
    assert image.memory_base < rsp0 < image.regs.rsp


def test_identity_map_above_4gib_with_4k_leaves_for_partial_block():
    image = guest.long_mode_guest("nop", identity_map=[(4 * GIB, 0x1000)])
    assert walk(image, 4 * GIB) == (4 * GIB, 0x1000)
    assert walk(image, 4 * GIB + 0xFFF) == (4 * GIB + 0xFFF, 0x1000)
    assert walk(image, 4 * GIB + 0x1000) is None
    assert walk(image, 0x1234) == (0x1234, 1 << 21)  # the builder's own 2 MiB


def test_identity_map_of_1_gib_uses_2m_leaves():
    image = guest.long_mode_guest("nop", identity_map=[(GIB, GIB)])
    assert walk(image, GIB) == (GIB, 1 << 21)
    assert walk(image, 2 * GIB - 1) == (2 * GIB - 1, 1 << 21)
    assert walk(image, 2 * GIB) is None
    assert image.page_table_size == 4 * 0x1000  # PML4, PDPT, two PDs


def test_unaligned_range_mixes_leaf_sizes_and_merges_overlaps():
    ranges = [(0x1FF000, 0x202000), (0x300000, 0x200000)]  # overlapping; union [0x1FF000, 0x500000)
    image = guest.long_mode_guest("nop", memory_base=0x10000000, identity_map=ranges)
    assert walk(image, 0x1FF000)[1] == 0x1000
    assert walk(image, 0x200000)[1] == 1 << 21
    assert walk(image, 0x400000)[1] == 0x1000  # [0x400000, 0x500000) is half a block
    assert walk(image, 0x4FF000) == (0x4FF000, 0x1000)
    assert walk(image, 0x500000) is None
    assert walk(image, 0x1FE000) is None


def test_page_size_4k_maps_everything_with_4k_leaves():
    image = guest.long_mode_guest("nop", page_size=0x1000)
    assert walk(image, 0x1000) == (0x1000, 0x1000)


def test_exception_gates_point_at_stubs():
    image = guest.long_mode_guest("nop")
    mem = Memory(image)
    for vector in (0, 6, 13, 14, 31):
        lo, sel, _, attr, mid, hi, _ = struct.unpack("<HHBBHII", mem.read(image.idt_gpa + 16 * vector, 16))
        handler = lo | mid << 16 | hi << 32
        assert (sel, attr) == (guest.SEL_KERNEL_CODE, 0x8E)
        stub = mem.read(handler, 16)
        assert bytes([0x6A, vector]) in stub  # push imm8 vector


@pytest.mark.parametrize("kwargs, match", [
    ({"cpl": 1}, "cpl"),
    ({"page_size": 1 << 30}, "page_size"),
    ({"memory_base": 0x123}, "page aligned"),
    ({"memory_size": 0x8000}, "memory_size"),
    ({"identity_map": [(0, 0)]}, "size > 0"),
    ({"identity_map": [(1 << 52, 0x1000)]}, "2\\*\\*52"),
])
def test_long_mode_guest_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        guest.long_mode_guest("nop", **kwargs)


def test_real_mode_guest():
    image = guest.real_mode_guest("mov al, 1", load_address=0x2000)
    assert image.chunks[0][0] == 0x2000 and image.chunks[0][1].startswith(b"\xb0\x01")
    assert (image.regs.rip, image.sregs.cs.base, image.sregs.cs.selector, image.sregs.cr0 & 1) == (0x2000, 0, 0, 0)
    with pytest.raises(ValueError, match="64 KiB"):
        guest.real_mode_guest("nop", load_address=0xFFFF)


class Buffer:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    def __len__(self) -> int:
        return len(self.data)


def test_load_writes_chunks_into_the_covering_writer():
    image = guest.long_mode_guest("nop", memory_base=0x200000, memory_size=0x200000)
    low, ram = Buffer(0x1000), Buffer(0x200000)
    guest.load(image, {0: low, 0x200000: ram})
    for gpa, data in image.chunks:
        assert bytes(ram.data[gpa - 0x200000:gpa - 0x200000 + len(data)]) == data
    assert low.data == bytearray(0x1000)


def test_load_without_covering_memory_is_value_error():
    image = guest.long_mode_guest("nop")
    with pytest.raises(ValueError, match="no memory"):
        guest.load(image, [(0, Buffer(0x1000))])
