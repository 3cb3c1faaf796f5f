"""Presenting a ``RunResult``: rich summary, terminal memory map, PNG map, JSON."""

from __future__ import annotations

import json
from typing import Any

from ..units import format_size
from .job import RunResult

__all__ = ["summary", "map_bar", "plot_map", "to_json", "to_json_many", "layouts"]

COLORS = {"private": "magenta", "allocated": "green", "shared": "grey50"}
GLYPHS = {"private": "█", "allocated": "▓", "shared": "░"}
HEX = {"private": "#b0309a", "allocated": "#3a9a3a", "shared": "#d0d0d0"}
MEANING = {
    "private": "private: only the guest can use it (the host's mappings cannot see it)",
    "allocated": "allocated: shared and populated (host memory in use, host-visible)",
    "shared": "shared, unpopulated: host-visible but no memory allocated yet",
}
MIN_FRACTION = 0.004
"""In the PNG, a private or allocated range is drawn at least this fraction of its region wide,
so a 4 KiB private page in a 1 TiB region is still visible."""


_bytes = format_size


def summary(result: RunResult) -> Any:
    """A rich renderable: run facts, exits, conversions and the workload's checks."""
    from rich.console import Group
    from rich.table import Table

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    status = "[green]OK[/]" if result.ok else ("[yellow]interrupted[/]" if result.interrupted else "[red]FAILED[/]")
    c = result.conversions
    facts.add_row("workload", f"{result.workload}  {status}")
    facts.add_row("backend", f"{result.backend} ({result.backend_reason})")
    facts.add_row("vCPUs / memory", f"{result.vcpus} / {_bytes(result.memory)}")
    facts.add_row("wall time", f"{result.wall_time:.3f} s")
    facts.add_row("exits", ", ".join(f"{k} {v}" for k, v in sorted(result.exits.items())) or "none")
    facts.add_row("conversions", f"{c['conversions']} ({c['explicit']} explicit, {c['implicit']} implicit, "
                                 f"{c['failed']} failed)  {result.conversions_per_second:.1f}/s")
    facts.add_row("bytes converted", _bytes(c["bytes_converted"]))
    if result.conversion:
        facts.add_row("conversion layout", result.conversion)
    if result.host_memory:
        h = result.host_memory
        facts.add_row("host memory", f"{_mib(h['total'])} = RSS anon {_mib(h['rss_anon'])} + memfd {_mib(h['memfd'])} "
                                     f"+ guest_memfd {_mib(h['guest_memfd'])}; peak {_mib(result.host_memory_peak)}")
    if c.get("eagain_retries"):
        facts.add_row("EAGAIN retries", f"{c['eagain_retries']} ({c['pins_released']} VMM pins released)")
    parts: list[Any] = [facts]
    if c["by_size"]:
        t = Table(title="conversions by direction and size", title_justify="left")
        t.add_column("direction")
        t.add_column("size")
        t.add_column("count", justify="right")
        for row in c["by_size"]:
            t.add_row(row["direction"].replace("_", " "), row["label"], str(row["count"]))
        parts.append(t)
    w = dict(result.workload_results)
    probes = w.pop("probes", None)
    checks = Table.grid(padding=(0, 2))
    checks.add_column(style="bold")
    checks.add_column()
    for k, v in w.items():
        is_size = (k.endswith("bytes") or k.startswith("bytes_")) and isinstance(v, int) and not isinstance(v, bool)
        checks.add_row(k.replace("_", " "), _bytes(v) if is_size else str(v))
    parts.append(checks)
    if probes:
        t = Table(title="host access paths to the guest's private secret", title_justify="left")
        t.add_column("path")
        t.add_column("outcome")
        t.add_column("covers", justify="right")
        t.add_column("examined", justify="right")
        t.add_column("refused", justify="right")
        t.add_column("revealed", justify="center")
        for p in probes:
            covers = p.get("covers", 0)
            short = not p.get("complete", True)
            t.add_row(p["path"], p["outcome"], _bytes(covers) if covers else "-",
                      ("[red]" + _bytes(p["examined"]) + " SHORT[/]") if short else _bytes(p.get("examined", 0)),
                      _bytes(p.get("refused", 0)), "[red]YES[/]" if p["revealed"] else "[green]no[/]")
        parts.append(t)
    return Group(*parts)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def layouts(results: list[RunResult]) -> Any:
    """The host memory of the same workload in each conversion layout, side by side."""
    from rich.table import Table

    t = Table(title="host memory by conversion layout", title_justify="left",
              caption="guest memory = memfd + guest_memfd bytes allocated; total adds the process's anonymous "
                      "RSS, which the runs share (a later run inherits the earlier one's heap; "
                      "`guestmem bench footprint` measures each layout in a fresh process)", caption_justify="left")
    for col in ("layout", "guest memory", "vs first", "memfd", "guest_memfd", "RSS anon", "total", "peak",
                "conversions/s"):
        t.add_column(col, justify="left" if col == "layout" else "right")
    h0 = results[0].host_memory
    base = (h0.get("memfd", 0) + h0.get("guest_memfd", 0)) or 1
    for r in results:
        h = r.host_memory
        guest = h["memfd"] + h["guest_memfd"]
        t.add_row(r.conversion, _mib(guest), f"{guest / base:.2f}x", _mib(h["memfd"]), _mib(h["guest_memfd"]),
                  _mib(h["rss_anon"]), _mib(h["total"]), _mib(r.host_memory_peak), f"{r.conversions_per_second:.1f}")
    return t


def map_bar(result: RunResult, width: int = 64) -> Any:
    """The final memory map, one bar per region: private / allocated (shared) / shared."""
    from rich.text import Text

    out = Text()
    out.append("memory map (one cell is 1/%d of a region; a cell shows the rarest kind in it, so no private "
               "page is hidden)\n" % width)
    for kind in ("private", "allocated", "shared"):
        out.append("  " + GLYPHS[kind] + " " + MEANING[kind] + "\n", style=COLORS[kind])
    for region in result.memory_map:
        size, base = region["size"], region["gpa"]
        cell = size / width
        totals = {k: 0 for k in COLORS}
        for s, e, k in region["segments"]:
            totals[k] += e - s
        out.append(f"{region['name']} [{base:#x}, +{_bytes(size)}) {region['backing']}: "
                   + ", ".join(f"{k} {_bytes(v)}" for k, v in totals.items() if v) + "\n")
        for i in range(width):
            lo, hi = base + i * cell, base + (i + 1) * cell
            cover = {k: 0.0 for k in COLORS}
            for s, e, k in region["segments"]:
                if e > lo and s < hi:
                    cover[k] += min(e, hi) - max(s, lo)
            # The rarest kind present wins the cell, so a 4 KiB private page stays visible.
            kind = next((k for k in ("private", "allocated") if cover[k] > 0), "shared")
            out.append(GLYPHS[kind], style=COLORS[kind])
        out.append("\n")
    return out


def plot_map(result: RunResult, path: str) -> None:
    """Write the memory map as a PNG (matplotlib, Agg): one horizontal bar per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    regions = result.memory_map
    fig, axes = plt.subplots(len(regions), 1, figsize=(10, 1.1 * len(regions) + 1.0), squeeze=False)
    for ax, region in zip(axes[:, 0], regions):
        base, size = region["gpa"], region["size"]
        scale = _axis_unit(size)
        for kind in ("shared", "allocated", "private"):  # the rarer kinds are drawn on top
            spans = [((s - base) / scale, _min_width(e - s, kind, size) / scale)
                     for s, e, k in region["segments"] if k == kind]
            if spans:
                ax.broken_barh(spans, (0, 1), facecolors=HEX[kind])
        ax.set_xlim(0, size / scale)
        ax.set_yticks([])
        ax.set_ylabel(region["name"], rotation=0, ha="right", va="center")
        ax.set_xlabel(f"{format_size(scale).split(' ', 1)[1]} from {base:#x} ({region['backing']}, "
                      f"{format_size(size)})")
    fig.legend(handles=[Patch(color=HEX[k], label=MEANING[k]) for k in HEX], loc="upper right", ncol=1,
               fontsize=8)
    fig.suptitle(f"guestmem run {result.workload} on {result.backend}: final memory map", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _axis_unit(size: int) -> int:
    """The binary unit (1 KiB ... 1 TiB) that puts a region of ``size`` bytes on a readable axis."""
    unit = 1 << 10
    while unit < 1 << 40 and size >= unit << 12:
        unit <<= 10
    return unit


def _min_width(width: int, kind: str, region_size: int) -> float:
    """A span's drawn width: private and allocated ranges never narrower than MIN_FRACTION."""
    return width if kind == "shared" else max(width, MIN_FRACTION * region_size)


def to_json(result: RunResult) -> str:
    return json.dumps(result.as_dict(), indent=2, sort_keys=True)


def to_json_many(results: list[RunResult]) -> str:
    """``{"runs": [...]}`` for ``--conversion both``."""
    return json.dumps({"runs": [r.as_dict() for r in results]}, indent=2, sort_keys=True)
