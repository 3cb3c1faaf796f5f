"""Host half of ``guestmem run --guest FILE``: a user's own 64-bit guest in the Machine's layout.

Three kinds of FILE:

- assembly (``.S``/``.s``/``.asm``): assembled with keystone into the boot region by
  ``Machine.load_assembly``; the guest starts at its first instruction at CPL ``cpl``.
- ELF (``\\x7fELF`` magic): a 64-bit x86 executable; every PT_LOAD segment is copied to its
  physical address (zero-filled up to p_memsz) and the guest starts at e_entry.
- anything else: a flat binary loaded at ``load_address`` (default ``DATA_GPA``), started at
  ``entry`` (default: the load address).

The guest gets the boot region's GDT, IDT (exceptions report to PORT_FAIL), identity page
tables over every region, and a data region at ``DATA_GPA`` of ``--memory`` bytes that also
holds loaded ELF/binary images (it grows to cover them). Registers at entry: RDI = vCPU index,
RSI = DATA_GPA, RDX = the data region's size, RSP = a per-vCPU stack. The guest ends with
``out 0xf4, eax`` (its result) or ``hlt``; text written with ``out 0xe9, al`` is the console.
The check passes when every vCPU ended one of those two ways.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

from ..vmm.layout import Region

DATA_GPA = 1 << 30
ALIGN = 2 << 20
ASSEMBLY_SUFFIXES = (".s", ".asm")
_PT_LOAD = 1


def _align_up(value: int) -> int:
    return -(-value // ALIGN) * ALIGN


def elf_segments(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """``(entry, [(gpa, bytes)])`` of a 64-bit little-endian x86-64 ELF executable.

    :raises ValueError: not such an ELF, or a segment outside the file.
    """
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ValueError("only 64-bit little-endian ELF guests are supported")
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != 62:
        raise ValueError(f"ELF machine {machine} is not x86-64 (62)")
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    segments = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(data):
            raise ValueError(f"ELF program header {i} lies outside the file")
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", data, off)
        if p_type != _PT_LOAD or p_memsz == 0:
            continue
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise ValueError(f"ELF segment {i} ({p_filesz:#x} bytes at file offset {p_offset:#x}) is malformed")
        segments.append((p_paddr, data[p_offset:p_offset + p_filesz] + bytes(p_memsz - p_filesz)))
    if not segments:
        raise ValueError("the ELF file has no PT_LOAD segment")
    return entry, segments


class UserGuest:
    name = "guest"
    summary = "your own guest (--guest FILE: assembly, flat binary or ELF)"
    needs_private = False
    default_memory = 2 << 20

    def __init__(self, path: str, *, entry: int | None = None, load_address: int | None = None, cpl: int = 0) -> None:
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ValueError(f"--guest {path}: {exc.strerror}") from None
        self.cpl = cpl
        self.source: str | None = None
        self.segments: list[tuple[int, bytes]] = []
        if self.path.suffix.lower() in ASSEMBLY_SUFFIXES:
            if entry is not None or load_address is not None:
                raise ValueError("--entry/--load-address apply to flat binaries, not assembly (it starts at its first "
                                 "instruction)")
            self.source = data.decode(errors="replace")
            self.kind = "assembly"
            self.entry = None
        elif data[:4] == b"\x7fELF":
            if entry is not None or load_address is not None:
                raise ValueError("--entry/--load-address apply to flat binaries; an ELF names its own")
            self.entry, self.segments = elf_segments(data)
            self.kind = "elf"
        else:
            if not data:
                raise ValueError(f"--guest {path}: the file is empty")
            base = DATA_GPA if load_address is None else load_address
            self.segments = [(base, data)]
            self.entry = base if entry is None else entry
            self.kind = "binary"
        self.vcpus = 0
        self.loops: list[Any] = []
        self.done = 0
        self.total = 0

    def regions(self, vcpus: int, memory: int) -> list[Region]:
        self.vcpus = vcpus
        self.total = vcpus
        lo = min([DATA_GPA, *(gpa for gpa, _ in self.segments)])
        hi = max([DATA_GPA + memory, *(gpa + len(d) for gpa, d in self.segments)])
        start = lo // ALIGN * ALIGN
        if start < ALIGN:
            raise ValueError(f"the guest loads at {lo:#x}, inside the boot region [0, {ALIGN:#x}); link or load it at "
                             f"{ALIGN:#x} or above")
        self.data = Region("data", start, _align_up(hi) - start)
        if self.entry is not None and not start <= self.entry < self.data.end:
            raise ValueError(f"entry {self.entry:#x} is outside the loaded image [{start:#x}, {self.data.end:#x})")
        return [self.data]

    def setup(self, machine: Any) -> None:
        self.machine = machine
        regs = [{"rsi": DATA_GPA, "rdx": self.data.end - DATA_GPA}] * self.vcpus
        if self.source is not None:
            self.entry = machine.load_assembly(self.source, cpl=self.cpl, regs=regs).entry
            return
        probe = machine.load_assembly("", cpl=self.cpl, regs=regs)
        image = dataclasses.replace(probe, chunks=probe.chunks + tuple(self.segments), entry=self.entry,
                                    regs=probe.regs.replace(rip=self.entry))
        machine.load_image(image, regs)

    def finish(self) -> None:
        self.loops = list(self.machine.loops)
        self.done = sum(1 for loop in self.loops if loop.result is not None or loop.halted)

    @property
    def ok(self) -> bool:
        return self.vcpus > 0 and self.done == self.vcpus

    def results(self) -> dict:
        console = self.machine.console.decode(errors="replace")
        return {"file": str(self.path), "kind": self.kind,
                "entry": None if self.entry is None else f"{self.entry:#x}",
                "results": [loop.result for loop in self.loops], "halted": [loop.halted for loop in self.loops],
                "console": console if len(console) <= 200 else console[:200] + "..."}
