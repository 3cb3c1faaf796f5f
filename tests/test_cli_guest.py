"""``guestmem run --guest FILE``: a user's own guest (assembly, flat binary, ELF) in the Machine's
layout, on both backends, with the run's exit codes (0 when every vCPU finished, 1 otherwise)."""

from __future__ import annotations

import json
import struct

import pytest

from guestmem.cli import main
from guestmem.guest import assemble
from guestmem.workloads.user import DATA_GPA, elf_segments

HELLO = """
    mov al, 'h'
    out 0xe9, al
    mov qword ptr [rsi], 0x77
    lea eax, [rdi + 40]
    out 0xf4, eax
"""


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["run", *argv, "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip().startswith("{") else {})


def make_elf(entry: int, code: bytes, bss: int = 0x100) -> bytes:
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    load = entry & ~0xFFF
    prefix = entry - load - 120
    assert prefix >= 0
    body = bytes(prefix) + code
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, load, load, 120 + len(body), 120 + len(body) + bss, 0x1000)
    return header + phdr + body


def test_assembly_guest_runs_on_every_vcpu_with_console_and_results(backend, tmp_path, capsys):
    src = tmp_path / "hello.S"
    src.write_text(HELLO)
    code, out = run_json(capsys, "--guest", str(src), "--backend", backend, "--vcpus", "2", "--cpl", "3")
    assert code == 0, out
    res = out["workload_results"]
    assert res["kind"] == "assembly" and res["results"] == [40, 41] and res["console"] == "hh"
    assert out["ok"] is True and out["backend"] == backend


def test_flat_binary_loads_at_the_load_address_and_starts_at_entry(backend, tmp_path, capsys):
    base = DATA_GPA + 0x1000
    path = tmp_path / "guest.bin"  # two programs: the entry decides which one runs
    path.write_bytes(assemble("mov eax, 1; out 0xf4, eax", base).ljust(16, b"\x90")
                     + assemble("mov eax, 0x99; out 0xf4, eax", base + 16))
    code, out = run_json(capsys, "--guest", str(path), "--backend", backend, "--vcpus", "1",
                         "--load-address", hex(base), "--entry", hex(base + 16))
    assert code == 0, out
    assert out["workload_results"]["results"] == [0x99]


def test_elf_guest_segments_land_at_their_physical_addresses(backend, tmp_path, capsys):
    entry = 0x400078
    code_bytes = assemble("mov al, 'e'; out 0xe9, al; mov eax, 0x42; out 0xf4, eax", entry)
    path = tmp_path / "guest.elf"
    path.write_bytes(make_elf(entry, code_bytes))
    code, out = run_json(capsys, "--guest", str(path), "--backend", backend, "--vcpus", "1")
    assert code == 0, out
    assert out["workload_results"]["results"] == [0x42] and out["workload_results"]["entry"] == "0x400078"


def test_a_failing_guest_exits_1_with_one_line(backend, tmp_path, capsys):
    src = tmp_path / "bad.S"
    src.write_text("ud2\n")
    assert main(["run", "--guest", str(src), "--backend", backend, "--vcpus", "1", "--cpl", "3"]) == 1
    err = capsys.readouterr().err
    assert "guest failure 6" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--guest", "/nonexistent/guest.S"], "No such file"),
    (["touch", "--guest", "x.S"], "either a WORKLOAD"),
    (["--entry", "0x1000"], "--entry applies only to --guest"),
    (["--guest", "g.S", "--cpl", "1"], "CPL 0 or 3"),
    (["--guest", "g.S", "--entry", "0x1000"], "apply to flat binaries, not assembly"),
    (["--guest", "g.bin", "--load-address", "0x1000"], "inside the boot region"),
    (["--guest", "g.bin", "--entry", "zz"], "is not an address"),
])
def test_guest_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.S").write_text("hlt\n")
    (tmp_path / "g.bin").write_bytes(b"\xf4")
    assert main(["run", *argv, "--backend", "model"]) in (1, 2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_elf_parser_refuses_what_it_cannot_load():
    with pytest.raises(ValueError, match="not an ELF"):
        elf_segments(b"MZ" + bytes(100))
    elf32 = bytearray(make_elf(0x400078, b"\xf4"))
    elf32[4] = 1
    with pytest.raises(ValueError, match="64-bit"):
        elf_segments(bytes(elf32))
    short = make_elf(0x400078, b"\xf4")[:100]
    with pytest.raises(ValueError, match="malformed|outside"):
        elf_segments(short)
