"""Build the C reference programs at bench time with the system C compiler.

The sources ship as package data (``guestmem/bench/c/*.c`` and the shared ``*.h``). Each is compiled once into a
cache directory keyed by a hash of the sources and the compiler, so a changed source or
compiler rebuilds and an unchanged one costs nothing. Without a compiler, or if the build
fails, the caller gets ``Skip`` with the reason, and the rows that need the C side say so.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import subprocess
from pathlib import Path

from .. import buildcache
from .harness import Skip

HEADERS = ("common.h",)  # shared by the programs in c/, copied next to each source it builds


def cache_dir() -> Path:
    """``$GUESTMEM_BENCH_CACHE``, else ``$XDG_CACHE_HOME/guestmem/bench`` (~/.cache by default)."""
    return buildcache.cache_dir("bench", "GUESTMEM_BENCH_CACHE")


compiler = buildcache.c_compiler


def build(name: str) -> Path:
    """The path of the built program ``name`` (``c/NAME.c``); raises Skip if it cannot be built."""
    cc = compiler()
    if cc is None:
        raise Skip("no C compiler found (install gcc or set CC)")
    sources = importlib.resources.files("guestmem.bench").joinpath("c")
    source = sources.joinpath(f"{name}.c").read_bytes()
    headers = {h: sources.joinpath(h).read_bytes() for h in HEADERS}
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise Skip(f"C compiler {cc} does not run: {exc}") from exc
    key = hashlib.sha256(b"\0".join([source, *headers.values(), cc.encode(), version])).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src_dir = out.parent / f"{name}-{key}.src"
    src_dir.mkdir(exist_ok=True)
    for header, text in headers.items():
        (src_dir / header).write_bytes(text)
    src = src_dir / f"{name}.c"
    src.write_bytes(source)
    tmp = out.parent / f".{name}-{key}.{os.getpid()}"
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(src)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise Skip(f"building {name}.c with {cc} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    os.replace(tmp, out)  # atomic: a concurrent run sees either no program or a whole one
    return out


def run_lines(program: Path, *args: object, timeout: float = 300) -> list[tuple[str, ...]]:
    """Run a built program and return its stdout split into whitespace-separated fields."""
    proc = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{program.name} {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr.strip()}")
    return [tuple(line.split()) for line in proc.stdout.splitlines() if line.strip()]
