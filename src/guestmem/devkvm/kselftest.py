"""The kernel's KVM selftests as the model's judge: build them from a kernel source tree or
tarball, run each on the host kernel and on the model, and report both side by side.

Sources: ``--source`` (a ``linux-source-*.tar.*`` tarball or an unpacked tree), else the
newest ``/usr/src/linux-source-*.tar.*`` (Debian: ``apt-get install linux-source-6.12
rsync``). Only what the selftests' build needs is unpacked, into a cache directory
(``$GUESTMEM_KSELFTEST_CACHE``, else ``$XDG_CACHE_HOME/guestmem/kselftest``), never into
this repository; ``make headers_install`` and the selftests' own Makefile build the tests
there with the system compiler. A test's result is its kselftest exit status: 0 pass,
4 skip, anything else fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .. import buildcache
from .native import Unavailable

# The selftests that judge guest_memfd (spec section 7), and the drop-in's kvm_run ABI, with
# the argument sets to run.
DEFAULT_TESTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("guest_memfd_test", ()),
    ("set_memory_region_test", ()),
    ("pre_fault_memory_test", ()),
    ("x86/private_mem_conversions_test", ()),
    ("x86/private_mem_conversions_test", ("-n", "4")),
    ("x86/private_mem_conversions_test", ("-n", "4", "-m", "2")),
    ("x86/private_mem_kvm_exits_test", ()),
    # Not guest_memfd's, but the kvm_run ABI every KVM program relies on and the model claims
    # (KVM_CAP_SYNC_REGS): the drop-in serves it, so the kernel's own test judges that.
    ("x86/sync_regs_test", ()),
)

# What the selftests' build reads from a kernel tree (unpacking the rest takes minutes).
_MEMBERS = ("Makefile", "tools", "include", "scripts", "usr", "arch/x86/include", "arch/x86/entry/syscalls",
            "arch/x86/tools", "arch/x86/Makefile")

KSFT_PASS, KSFT_SKIP = 0, 4


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One run of one test: ``result`` is pass, skip, fail, timeout or "-" (not run), and why."""

    result: str
    seconds: float = 0.0
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Result:
    test: str
    args: tuple[str, ...]
    host: Outcome
    model: Outcome

    def to_dict(self) -> dict:
        return {"test": self.test, "args": list(self.args), "host": dataclasses.asdict(self.host),
                "model": dataclasses.asdict(self.model)}


def cache_dir() -> Path:
    """``$GUESTMEM_KSELFTEST_CACHE``, else ``$XDG_CACHE_HOME/guestmem/kselftest``."""
    return buildcache.cache_dir("kselftest", "GUESTMEM_KSELFTEST_CACHE")


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def find_source(source: str | None = None) -> Path:
    """The kernel source to build from. :raises Unavailable: none given and none installed."""
    if source:
        path = Path(source)
        if not path.exists():
            raise Unavailable(f"kernel source {source} does not exist")
        return path
    found = sorted(glob.glob("/usr/src/linux-source-*.tar.*"), key=_version_key)
    if not found:
        raise Unavailable("no kernel source: apt-get install linux-source-6.12 rsync (or pass --source)")
    return Path(found[-1])


def _version_key(path: str) -> tuple[int, ...]:
    m = re.search(r"linux-source-(\d+(?:\.\d+)*)", path)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def kernel_version(source: Path) -> str | None:
    """"6.12" for linux-source-6.12.tar.xz or a tree of that name (None if unknown)."""
    m = re.search(r"linux-source-(\d+\.\d+)", source.name)
    if m:
        return m.group(1)
    makefile = source / "Makefile"
    if makefile.is_file():
        text = makefile.read_text(errors="replace")[:400]
        v = re.search(r"^VERSION = (\d+)", text, re.M)
        p = re.search(r"^PATCHLEVEL = (\d+)", text, re.M)
        if v and p:
            return f"{v.group(1)}.{p.group(1)}"
    return None


def _run(cmd: list[str], what: str, **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"{what} failed ({' '.join(cmd[:3])} ...): {' | '.join(tail)}")


def prepare(source: Path) -> tuple[Path, Path]:
    """Unpack (if a tarball) and install the uapi headers; returns (tree, headers include dir)."""
    for tool in ("make", "rsync"):
        if shutil.which(tool) is None:
            raise Unavailable(f"building the selftests needs {tool} (apt-get install {tool})")
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = cache_dir() / f"{source.name.split('.tar')[0]}-{key}"
    hdr = root / "hdr"
    stamp = root / ".prepared"
    if source.is_dir():
        tree = source
    else:
        tree = root / "src"
    if stamp.exists():
        return tree, hdr / "include"
    root.mkdir(parents=True, exist_ok=True)
    if not source.is_dir():
        top = _top_dir(source)
        if not top:
            raise Unavailable(f"{source} is not a kernel source tarball")
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        members = [f"{top}/{m}" for m in _MEMBERS]
        _run(["tar", "-xf", str(source), "-C", str(tree), "--strip-components=1", "--wildcards",
              *members], f"unpacking {source.name}", timeout=1200)
    _run(["make", "-C", str(tree), f"INSTALL_HDR_PATH={hdr}", "headers_install"], "make headers_install",
         timeout=1200)
    stamp.touch()
    return tree, hdr / "include"


def _top_dir(tarball: Path) -> str:
    """The directory every member of the tarball lives in, from its first entry only."""
    with subprocess.Popen(["tar", "-tf", str(tarball)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as proc:
        first = proc.stdout.readline() if proc.stdout else ""
        proc.kill()
    return first.strip().split("/")[0]


def _test_path(tree: Path, name: str) -> str:
    """The test's path under tools/testing/selftests/kvm: x86/ was called x86_64/ before 6.13."""
    kvm = tree / "tools/testing/selftests/kvm"
    if name.startswith(("x86/", "x86_64/")):
        base = name.split("/", 1)[1]
        for d in ("x86", "x86_64"):
            if (kvm / d / f"{base}.c").exists():
                return f"{d}/{base}"
    return name


def build(tree: Path, include: Path, names: Iterable[str]) -> dict[str, Path]:
    """Build ``names`` with the selftests' Makefile; returns name -> binary."""
    if shutil.which(os.environ.get("CC") or "gcc") is None and shutil.which("cc") is None:
        raise Unavailable("no C compiler (install gcc or set CC)")
    out = tree.parent / "out" if tree.name == "src" else cache_dir() / "out-tree"
    paths = {n: _test_path(tree, n) for n in names}
    for n, p in paths.items():
        if not (tree / "tools/testing/selftests/kvm" / f"{p}.c").exists():
            raise Unavailable(f"{n}: no such selftest in {tree}")
    targets = [str(out / p) for p in dict.fromkeys(paths.values())]
    _run(["make", "-C", str(tree / "tools/testing/selftests/kvm"), f"-j{os.cpu_count() or 1}",
          f"LINUX_HDR_PATH={include}", f"OUTPUT={out}", *targets], "building the KVM selftests", timeout=1800)
    return {n: out / p for n, p in paths.items()}


def _outcome(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> Outcome:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Outcome("timeout", time.perf_counter() - t0, f"no result after {timeout:.0f} s")
    dt = time.perf_counter() - t0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode == KSFT_PASS:
        return Outcome("pass", dt)
    if proc.returncode == KSFT_SKIP:
        why = next((line.split("SKIP", 1)[1].strip(" -") for line in lines if "SKIP" in line), "")
        return Outcome("skip", dt, why)
    why = next((line.strip() for line in lines if "Assertion" in line or "failed" in line.lower()), "")
    assertion = next((line.strip() for line in lines if re.match(r"\s*\S+\.c:\d+:", line)), "")
    last = lines[-1].strip() if lines else ""
    said = " -- ".join(dict.fromkeys(x for x in (assertion or why, last) if x))
    return Outcome("fail", dt, f"exit {proc.returncode}: {said}")


def run(source: str | None = None, profile: str | None = None, keyword: str | None = None,
        tests: Iterable[tuple[str, tuple[str, ...]]] = DEFAULT_TESTS, timeout: float = 600,
        host: bool = True, on_result: Callable[[Result], None] | None = None) -> tuple[str, list[Result]]:
    """Build and run the selftests on the host kernel and on the model; returns (profile, results).

    ``keyword`` keeps the tests whose name (with arguments) contains it; ``profile``
    defaults to the source's kernel version when the model has that profile, else the
    model's default. The host run is skipped (result "-") when /dev/kvm is unusable.

    :raises Unavailable: no source, no compiler, no make/rsync, or the build failed.
    """
    import guestmem
    from ..model.profile import DEFAULT_PROFILE, PROFILES
    from . import program_env

    src = find_source(source)
    if profile is None:
        version = kernel_version(src)
        profile = version if version in PROFILES else DEFAULT_PROFILE
    chosen = [(t, tuple(a)) for t, a in tests if not keyword or keyword in " ".join((t, *a))]
    if not chosen:
        return profile, []
    with _cache_lock():  # another run (a parallel test session) may be building the same tree
        tree, include = prepare(src)
        binaries = build(tree, include, [t for t, _ in chosen])
    host_ok, host_why = guestmem.kvm_available() if host else (False, "not requested")
    env = program_env(profile)
    results = []
    for test, args in chosen:
        cmd = [str(binaries[test]), *args]
        h = _outcome(cmd, timeout) if host_ok else Outcome("-", 0.0, host_why)
        m = _outcome(cmd, timeout, env)
        r = Result(test, args, h, m)
        results.append(r)
        if on_result:
            on_result(r)
    return profile, results
