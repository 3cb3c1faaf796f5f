"""One size formatter for everything guestmem prints (CLI summaries, maps, benchmarks, errors)."""

from __future__ import annotations

__all__ = ["format_size"]

_UNITS = ((1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def format_size(size: int) -> str:
    """Bytes in plain binary units: ``0 B``, ``4 KiB``, ``2047 MiB``, ``256 MiB``, ``1.53 GiB``.

    The largest unit that divides ``size`` exactly is used when that gives at most four
    digits (``2 MiB + 4 KiB`` is ``2052 KiB``); otherwise three significant digits in the
    largest unit not above ``size``. Negative sizes keep their sign.
    """
    if size < 0:
        return "-" + format_size(-size)
    for unit, name in _UNITS:
        if size >= unit and size % unit == 0 and size // unit < 10_000:
            return f"{size // unit} {name}"
    if size < 10_000:
        return f"{size} B"
    for unit, name in _UNITS:
        if size >= unit * 0.9995:  # 1 TiB - 12 KiB reads "1 TiB", not "1024 GiB"
            value = size / unit
            return f"{value:.3g} {name}" if value < 1000 else f"{value:.0f} {name}"
    return f"{size} B"  # not reached: size >= 10,000 is at least 1 KiB
