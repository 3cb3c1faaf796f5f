#!/usr/bin/env python3
"""Run guestmem's benchmarks and save the results beside this script.

    python benchmarks/run.py [NAMES...] [--quick]

is ``guestmem bench`` with ``--json benchmarks/results/<stamp>.json`` and
``--plot benchmarks/results/<stamp>.png`` filled in (``latest.json``/``latest.png`` are
copies of the newest run, and ``latest.md`` its table in Markdown for docs/benchmarks.md). Everything else lives in ``guestmem.bench``.
"""

from __future__ import annotations

import datetime
import shutil
import sys
from pathlib import Path

from guestmem.bench.report import load, markdown
from guestmem.cli import main

RESULTS = Path(__file__).resolve().parent / "results"


def run(argv: list[str]) -> int:
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if "--quick" in argv else "")
    out_json, out_png = RESULTS / f"{stamp}.json", RESULTS / f"{stamp}.png"
    code = main(["bench", *argv, "--json", str(out_json), "--plot", str(out_png)])
    if out_json.exists():
        shutil.copyfile(out_json, RESULTS / "latest.json")
        (RESULTS / "latest.md").write_text(markdown(load(out_json)), encoding="utf-8")
    if out_png.exists():
        shutil.copyfile(out_png, RESULTS / "latest.png")
    print(f"results: {out_json}\nplot: {out_png}")
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
