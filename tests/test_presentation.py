"""What people look at: one size formatter, a memory map whose every private range is visible at
any guest size with a legend that says what the kinds mean, and a bench table that fits 80 columns."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from guestmem.bench import report as bench_report
from guestmem.units import format_size
from guestmem.vmm import report
from guestmem.vmm.job import RunResult

TiB = 1 << 40
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "latest.json"


@pytest.mark.parametrize("size, text", [
    (0, "0 B"), (512, "512 B"), (4096, "4 KiB"), (2047 << 20, "2047 MiB"), (268435456, "256 MiB"),
    ((2 << 20) + 4096, "2052 KiB"), (1 << 30, "1 GiB"), (TiB, "1 TiB"), (12345, "12.1 KiB"),
    (TiB - 12288, "1 TiB"), (1500 << 30, "1500 GiB"), (-4096, "-4 KiB"),
])
def test_format_size_uses_one_plain_unit(size, text):
    assert format_size(size) == text


def tib_result() -> RunResult:
    base = 1 << 32
    segments = [[base, base + 4096, "private"], [base + 4096, base + (1 << 39), "shared"],
                [base + (1 << 39), base + (1 << 39) + 8192, "allocated"], [base + (1 << 39) + 8192, base + TiB, "shared"]]
    return RunResult(workload="x", backend="model", backend_reason="r", vcpus=1, memory=TiB, ok=True, wall_time=1.0,
                     exits={}, conversions={"conversions": 0, "explicit": 0, "implicit": 0, "failed": 0,
                                            "bytes_converted": 0, "by_size": []},
                     workload_results={"bytes_touched": 268435456},
                     memory_map=[{"name": "data", "gpa": base, "size": TiB, "backing": "gmem",
                                  "private_capable": True, "segments": segments}])


def render(renderable, width: int) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def test_terminal_map_shows_a_4k_private_page_of_a_1tib_region_and_explains_the_kinds():
    text = render(report.map_bar(tib_result()), 100)
    bar = [line for line in text.splitlines() if line.strip()][-1]
    assert bar[0] == report.GLYPHS["private"] and bar.count(report.GLYPHS["allocated"]) == 1
    for meaning in report.MEANING.values():
        assert meaning in text


def test_summary_formats_byte_counts():
    assert "256 MiB" in render(report.summary(tib_result()), 100)
    assert "268435456" not in render(report.summary(tib_result()), 100)


def test_png_map_draws_small_private_ranges_at_a_visible_width(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.broken_barh

    def spy(self, xranges, yrange, **kw):
        drawn.append((kw.get("facecolors"), list(xranges), self.get_xlim()))
        return real(self, xranges, yrange, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "broken_barh", spy)
    report.plot_map(tib_result(), str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").stat().st_size > 0
    (private,) = [spans for color, spans, _ in drawn if color == report.HEX["private"]]
    axis = 1024  # the 1 TiB region is drawn in GiB
    assert private[0][1] >= report.MIN_FRACTION * axis * 0.999


def test_bench_table_fits_80_columns_and_keeps_details_at_200():
    if not RESULTS.exists():
        pytest.skip(f"no saved benchmark results at {RESULTS}")
    saved = bench_report.load(RESULTS)
    narrow = render(bench_report.table(saved, width=80), 80)
    assert max(len(line.rstrip()) for line in narrow.splitlines()) <= 80
    statuses = [tok for line in narrow.splitlines() for tok in line.split()[-1:] if tok in {r.status for r in saved.rows}]
    assert len(statuses) == len(saved.rows)  # every row is there, none cropped
    wide = render(bench_report.table(saved, width=200), 200)
    header = [line for line in narrow.splitlines() if "status" in line][0].split()
    assert "how" not in header and "how" in [line for line in wide.splitlines() if "status" in line][0].split()


def test_exit_reprs_show_addresses_and_ports_in_hex():
    from guestmem.types import HypercallExit, IoExit, MemoryFaultExit, MmioExit

    assert repr(IoExit(direction=1, size=1, port=0x10, count=1, data=b"U")) == (
        "IoExit(direction=1, size=1, port=0x10, count=1, data=b'U')")
    assert "phys_addr=0xfee00000" in repr(MmioExit(phys_addr=0xFEE00000, data=b"", len=4, is_write=False))
    assert "args=(0x1000, 0x1, 0x10, 0x0, 0x0, 0x0)" in repr(
        HypercallExit(nr=12, args=(0x1000, 1, 0x10, 0, 0, 0), ret=0, flags=1))
    assert "gpa=0x100000000" in repr(MemoryFaultExit(flags=8, gpa=1 << 32, size=4096, errno=14))
