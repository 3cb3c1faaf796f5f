"""Presenting a benchmark Report: the rich table, JSON, and the plot.

The plot has two panels: attribute-update cost against range size on log-log axes (with
the 1 TiB goal marked), and one bar per ratio row with its goal drawn across the bar.
matplotlib is imported only when a plot is asked for, with the Agg backend (no display).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.table import Table

from .harness import FAIL, MISS, PASS, SKIP, Report, Row

_STYLE = {PASS: "green", MISS: "red", FAIL: "bold red", SKIP: "yellow"}


def fmt_value(row: Row) -> str:
    if row.value is None:
        return "-"
    v = row.value
    if v == 0 or 0.01 <= abs(v) < 1e6:
        text = f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    else:
        text = f"{v:.3g}"
    return f"{text} {row.unit}".strip()


COMPACT_BELOW = 120
"""Terminals narrower than this get the compact table (no "how" column; it is in --json)."""


def table(report: Report, width: int = 200) -> Table:
    """The results table for a terminal ``width`` columns wide.

    Below ``COMPACT_BELOW`` columns the "how" column (sample counts, spreads, notes) is left out
    and long cells wrap, so the table fits an 80-column terminal; ``--json`` keeps every detail.
    """
    compact = width < COMPACT_BELOW
    title = f"guestmem bench{' --quick' if report.quick else ''}"
    if not compact:
        title += (f" — {report.machine.get('cpu', '')}, {report.machine.get('nproc')} CPUs, "
                  f"{report.machine.get('kernel')}")
    t = Table(title=title, show_lines=False, expand=False, box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
              pad_edge=not compact)
    # Compact: the workload is a bold row above its cases instead of a column of its own.
    columns: list[tuple[str, dict]] = [] if compact else [("workload", {})]
    columns += [("case", {"overflow": "fold"}), ("backend", {"overflow": "fold"}),
                ("result", {"justify": "right", "no_wrap": True})]
    if not compact:
        columns.append(("how", {"overflow": "fold"}))
    columns += [("goal", {"overflow": "fold"}), ("status", {"no_wrap": True})]
    for col, kw in columns:
        t.add_column(col, **kw)
    last = None
    for r in report.rows:
        style = _STYLE.get(r.status, "")
        status = f"[{style}]{r.status}[/]" if style else r.status
        if compact:
            if r.workload != last:
                t.add_row(f"[bold]{r.workload}[/]", "", "", "", "")
            t.add_row("  " + r.case, r.backend, fmt_value(r), r.goal or "none", status)
        else:
            how = r.note if r.status in (SKIP, FAIL) else (r.detail + (f"; {r.note}" if r.note else ""))
            t.add_row(r.workload if r.workload != last else "", r.case, r.backend, fmt_value(r), how,
                      r.goal or "none", status)
        last = r.workload
    return t


def summary(report: Report) -> str:
    counts: dict[str, int] = {}
    for r in report.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{len(report.rows)} rows ({parts}) in {report.duration_s:.1f} s"


def markdown(report: Report) -> str:
    """The machine description and the results table as Markdown (for docs/benchmarks.md)."""
    lines = [f"Command: `{report.command}` — started {report.started}, {report.duration_s:.0f} s.", "",
             "| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in report.machine.items()]
    lines += ["", "| workload | case | backend | result | how | goal | status |",
              "| --- | --- | --- | ---: | --- | --- | --- |"]
    for r in report.rows:
        how = r.note if r.status in (SKIP, FAIL) else r.detail + (f"; {r.note}" if r.note else "")
        cells = [r.workload, r.case, r.backend, fmt_value(r), how, r.goal or "none", f"**{r.status}**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.as_dict(), indent=1) + "\n", encoding="utf-8")


def load(path: str | Path) -> Report:
    """A Report read back from ``write_json`` output."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = [Row(**r) for r in data["rows"]]
    return Report(data["command"], data["quick"], data["machine"], data["started"], data["duration_s"], rows,
                  data.get("workload_seconds", {}))


def plot(report: Report, path: str | Path) -> None:
    """Write the two-panel figure (attribute scaling; ratios against goals) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = [r for r in report.rows if r.kind == "scaling" and r.value is not None and r.x]
    ratios = [r for r in report.rows if r.kind == "ratio" and r.value is not None and _goal_threshold(r.goal or "")]
    higher = [r for r in ratios if "≥" in r.goal]
    lower = [r for r in ratios if "≤" in r.goal]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.6), gridspec_kw={"width_ratios": [1, 1, 1.2]})

    if scaling:
        def series(r: Row) -> str:
            return f"{r.backend}, over {r.case.split(' over ', 1)[-1]}"

        for name in sorted({series(r) for r in scaling}):
            pts = sorted((r.x, r.value) for r in scaling if series(r) == name)
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax1.axhline(1000.0, color="red", linestyle="--", linewidth=1, label="goal: 1 TiB in ≤ 1 ms")
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")
        ticks = [4 << 10, 64 << 10, 2 << 20, 64 << 20, 1 << 30, 64 << 30, 1 << 40]
        ax1.set_xticks(ticks, ["4K", "64K", "2M", "64M", "1G", "64G", "1T"])
        ax1.set_xlabel("size of the range made private")
        ax1.set_ylabel("µs per set_memory_attributes call (median; lower is better)")
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "attribute scaling: no data", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_title("model: cost of one attribute update\nagainst the size of the range", fontsize=10)
    _ratio_panel(ax2, higher, "higher is better: speed against the reference\n(bar ≥ dashed goal passes)",
                 "speed ratio (×reference)")
    _ratio_panel(ax3, lower, "lower is better: time against the reference\n(bar ≤ dashed goal passes)",
                 "time ratio (×reference)")
    fig.suptitle(f"guestmem bench{' --quick' if report.quick else ''}: {report.machine.get('cpu', '')}, "
                 f"{report.machine.get('kernel', '')} ({report.started})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio_label(r: Row) -> str:
    """A bar's name: what was measured, then which backend against which reference."""
    import textwrap

    case = textwrap.shorten(r.case, 44, placeholder="…")
    top = "\n".join(textwrap.wrap(f"{r.workload}: {case}", 24)[:3])
    return f"{top}\n{r.backend.replace('/', ' vs ')}"


def _ratio_panel(ax, rows: list[Row], title: str, ylabel: str) -> None:  # noqa: ANN001 - a matplotlib Axes
    """One bar per ratio row of one goal direction, with each row's goal drawn across its bar."""
    ax.set_title(title, fontsize=10)
    if not rows:
        ax.text(0.5, 0.5, "no ratios with this goal direction", ha="center", va="center", transform=ax.transAxes)
        return
    xs = range(len(rows))
    colors = ["tab:green" if r.status == PASS else "tab:red" if r.status == MISS else "tab:gray" for r in rows]
    ax.bar(xs, [r.value for r in rows], color=colors)
    for x, r in zip(xs, rows):
        goal = _goal_threshold(r.goal)
        if goal is not None:
            ax.hlines(goal, x - 0.4, x + 0.4, colors="black", linestyles="--", linewidth=1.2)
        ax.text(x, r.value, f"{r.value:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [_ratio_label(r) for r in rows], fontsize=6.5, rotation=40, ha="right")
    ax.set_ylabel(ylabel + "; green PASS, red MISS")


def _goal_threshold(goal: str) -> float | None:
    """The number in a ratio goal text such as '≥ 0.9x C' or '≤ 2x kvm'."""
    for token in goal.replace("≥", " ").replace("≤", " ").split():
        token = token.rstrip("x")
        try:
            return float(token)
        except ValueError:
            continue
    return None
