"""Host half of the ``secret`` workload (guest code: secret.S).

vCPU 0 converts the first pages of the private-capable ``data`` region to private and
writes a secret there (a xorshift64 stream from a seed only the guest's registers hold).
When it says so, the host tries every access path it has and records, per path, what
happened, whether any of the secret came back, and how many bytes of guest memory the path
covers, examined (read and searched) and had refused (an errno or SIGBUS from the kernel).
A path passes only if it revealed nothing and examined + refused equals what it covers: a
path that silently looked at less (a short read) is a failed check. Large ranges are read
in bounded chunks (``CHUNK``), never as one allocation the size of guest memory.
Afterwards the guest checks that it still reads its secret, so the probes are known to have
run against live private data.

The guest_memfd is created with MMAP when the VM allows it, so the mmap path yields a real
mapping that is probed for SIGBUS in a forked child. That also makes the data region
GMEM_ONLY (the guest's shared pages live in the guest_memfd too), so the host's shared view
of it is that mapping, which the host cannot touch without INIT_SHARED.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import faulthandler
import os
import random
import signal
import struct
import threading
from collections.abc import Callable
from typing import Any

from ..guest import PORT_SYNC
from ..hostmem import Mapping
from ..units import format_size
from ..vmm.layout import Region
from ..vmm.runloop import Outcome
from . import source, sync_op

DATA_GPA = 1 << 32
SECRET_SIZE = 2 * 4096
CHUNK = 64 << 20
"""Large ranges are read and searched in pieces of this size (bounded memory at any guest size)."""
_U64 = (1 << 64) - 1


def secret_bytes(seed: int, size: int) -> bytes:
    """The guest's secret: the xorshift64 (13, 7, 17) stream from ``seed``."""
    x, out = seed, []
    for _ in range(size // 8):
        x ^= (x << 13) & _U64
        x ^= x >> 7
        x ^= (x << 17) & _U64
        out.append(x)
    return struct.pack(f"<{len(out)}Q", *out)


@dataclasses.dataclass(frozen=True, slots=True)
class Probe:
    """One host access path and its outcome.

    ``covers``: bytes of guest memory the path claims to look at (0 for metadata queries);
    ``examined``: bytes it read and searched; ``refused``: bytes the kernel did not hand out
    (an errno, SIGBUS, or a file read ending early). ``complete`` means every covered byte
    was examined or refused.
    """

    path: str
    outcome: str
    revealed: bool
    covers: int = 0
    examined: int = 0
    refused: int = 0

    @property
    def complete(self) -> bool:
        return self.examined + self.refused == self.covers

    @property
    def ok(self) -> bool:
        return not self.revealed and self.complete

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "complete": self.complete}


def scan(read: Callable[[int, int], bytes], size: int, needle: bytes) -> tuple[int, int, bool, list[str]]:
    """Search ``[0, size)`` for ``needle``, reading ``read(offset, n)`` in CHUNK pieces.

    Returns ``(examined, refused, found, errors)``: a chunk whose read raises OSError counts
    as refused; a short read counts only what came back (so the caller sees it is short).
    Needles straddling two chunks are found (the previous chunk's tail is kept).
    """
    examined = refused = 0
    found = False
    errors: list[str] = []
    tail = b""
    keep = len(needle) - 1
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        try:
            data = read(off, n)
        except OSError as exc:
            refused += n
            tail = b""
            text = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            if text not in errors:
                errors.append(text)
            continue
        got = min(len(data), n)
        examined += got
        if needle in data or (tail and needle in tail + bytes(data[:keep])):
            found = True
        tail = bytes(data[max(got - keep, 0):got]) if got == n else b""
    return examined, refused, found, errors


def _scan_outcome(covers: int, examined: int, refused: int, found: bool, errors: list[str]) -> str:
    parts = [f"read {format_size(examined)}"]
    if refused:
        parts.append(f"refused {format_size(refused)} ({', '.join(errors)})")
    if examined + refused < covers:
        parts.append(f"{format_size(covers - examined - refused)} NOT EXAMINED")
    parts.append("SECRET FOUND" if found else "no secret")
    return ", ".join(parts)


def _contains(data: Any, needle: bytes) -> bool:
    return needle in bytes(data)


def probe_mapping_in_child(mapping: Mapping, offset: int, size: int) -> tuple[str, bytes]:
    """Read ``mapping[offset:offset+size]`` in a forked child: ("SIGBUS", b"") or ("read", data)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            faulthandler.disable()  # the SIGBUS is the expected answer, not a crash to report
            os.close(r)
            os.write(w, ctypes.string_at(mapping.address + offset, size))
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name, b""
    return "read", b"".join(chunks)


class Secret:
    name = "secret"
    summary = "the guest writes a secret into private memory; the host tries every path to read it"
    needs_private = True
    default_memory = 4 << 20

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed if seed is not None else random.SystemRandom().getrandbits(64) | 1
        self.secret = secret_bytes(self.seed, SECRET_SIZE)
        self.probes: list[Probe] = []
        self.guest_kept_secret: bool | None = None
        self.map_failed = False
        self.done = 0
        self.total = 1
        self._lock = threading.Lock()

    def regions(self, vcpus: int, memory: int) -> list[Region]:
        self.vcpus = vcpus
        size = max(memory // 4096 * 4096, SECRET_SIZE)
        return [Region("data", DATA_GPA, size, private=True, gmem_mmap=True)]

    def setup(self, machine) -> None:  # noqa: ANN001 - a vmm Machine
        self.machine = machine
        regs = [{"rsi": DATA_GPA, "rdx": self.seed, "rcx": SECRET_SIZE}]
        machine.load_assembly(source(self.name), cpl=0, regs=regs)
        machine.io_handlers[PORT_SYNC] = self.on_sync

    def on_sync(self, vcpu, exit) -> Outcome:  # noqa: ANN001
        op = sync_op(vcpu, exit)
        if op is None:
            return Outcome.HANDLED
        if op == 1:
            self.probes = self.probe_all()
        elif op == 2:
            self.guest_kept_secret = True
            self.done = 1
        elif op == 3:
            self.guest_kept_secret = False
            self.done = 1
        elif op == 4:
            self.map_failed = True
        return Outcome.HANDLED

    # --- the probes -------------------------------------------------------------------------------

    def probe_all(self) -> list[Probe]:
        m = self.machine
        mem = m.memory
        gmem = mem.gmem("data")
        needle = self.secret[:64]  # any 64 bytes of it would be a leak
        out: list[Probe] = []

        def attempt(path: str, read: Any) -> None:
            try:
                data = read()
            except OSError as exc:
                out.append(Probe(path, f"refused: {exc.strerror or exc} (errno {exc.errno})", False,
                                 SECRET_SIZE, 0, SECRET_SIZE))
                return
            # A file read may return less than asked (end of file): the kernel withheld the
            # rest, which counts as refused. Reads of the host's own mappings (attempt_scan)
            # get no such allowance: there a short read means memory went unexamined.
            hit = _contains(data, needle)
            got = min(len(data), SECRET_SIZE)
            eof = " (end of file)" if got < SECRET_SIZE else ""
            out.append(Probe(path, f"returned {len(data)} of {SECRET_SIZE} bytes{eof}"
                             + (", SECRET FOUND" if hit else ", no secret"), hit, SECRET_SIZE, got, SECRET_SIZE - got))

        def attempt_scan(path: str, ranges: list[tuple[int, int]]) -> None:
            covers = examined = refused = 0
            found = False
            errors: list[str] = []
            for gpa, size in ranges:
                e, r, f, errs = scan(lambda off, n, gpa=gpa: mem.read(gpa + off, n), size, needle)
                covers, examined, refused, found = covers + size, examined + e, refused + r, found or f
                errors += [x for x in errs if x not in errors]
            out.append(Probe(path, _scan_outcome(covers, examined, refused, found, errors), found,
                             covers, examined, refused))

        fd = gmem.fileno()
        attempt("guest_memfd read(2)", lambda: gmem.read(SECRET_SIZE))
        attempt("guest_memfd pread(2)", lambda: gmem.pread(SECRET_SIZE, 0))
        attempt("read(2) on the raw fd", lambda: os.read(fd, SECRET_SIZE))
        attempt("pread(2) on the raw fd", lambda: os.pread(fd, SECRET_SIZE, 0))
        attempt("open /proc/self/fd/N and read", lambda: _read_proc_fd(fd))
        try:
            gm = gmem.mmap(SECRET_SIZE)
        except OSError as exc:
            out.append(Probe("guest_memfd mmap(2)", f"refused: {exc.strerror} (errno {exc.errno})", False,
                             SECRET_SIZE, 0, SECRET_SIZE))
        else:
            try:
                how, data = probe_mapping_in_child(gm, 0, SECRET_SIZE)
            finally:
                gm.close()
            hit = _contains(data, needle)
            got = min(len(data), SECRET_SIZE)
            out.append(Probe("guest_memfd mmap(2) + touch (forked child)",
                             "killed by " + how if how != "read" else
                             f"read {len(data)} bytes" + (", SECRET FOUND" if hit else ", no secret"), hit,
                             SECRET_SIZE, got, SECRET_SIZE if how != "read" else 0))
        attempt_scan("host shared mapping of the range", [(DATA_GPA, SECRET_SIZE)])
        attempt_scan("host shared mappings of all guest memory", [(r.gpa, r.size) for r in mem.regions])
        out.extend(self._probe_objects(needle))
        return out

    def _probe_objects(self, needle: bytes) -> list[Probe]:
        """The backend's public objects and query methods (the model has a few extra)."""
        m = self.machine
        gmem = m.memory.gmem("data")
        out = []
        queries = {
            "vm.get_memory_attributes()": lambda: m.vm.get_memory_attributes(DATA_GPA, SECRET_SIZE),
            "vm.stats()": lambda: m.vm.stats(),
            "vm.memslots()": lambda: m.vm.memslots(),
            "guest_memfd.fstat()": gmem.fstat,
            "vcpu.get_regs()/get_sregs()": lambda: (m.vcpus[0].get_regs(), m.vcpus[0].get_sregs()),
        }
        for path, query in queries.items():
            try:
                value = query()
            except AttributeError:
                continue  # not offered by this backend
            except OSError as exc:
                out.append(Probe(path, f"refused: {exc.strerror} (errno {exc.errno})", False))
                continue
            hit = _reveals(value, needle)
            out.append(Probe(path, "metadata only, no secret" if not hit else "SECRET FOUND", hit))
        seen, found, count = set(), [], 0
        for root_name, root in (("system", m.system), ("vm", m.vm), ("guest_memfd", gmem),
                                *((f"vcpu{v.vcpu_id}", v) for v in m.vcpus)):
            for name, value in _public_values(root, root_name, seen):
                count += 1
                if _reveals(value, needle):
                    found.append(name)
        out.append(Probe(f"public attributes of the backend objects ({count} values)",
                         "SECRET FOUND in " + ", ".join(found) if found else "no secret in any", bool(found)))
        return out

    @property
    def revealed(self) -> list[Probe]:
        return [p for p in self.probes if p.revealed]

    @property
    def incomplete(self) -> list[Probe]:
        """Paths that examined (or had refused) less guest memory than they claim to cover."""
        return [p for p in self.probes if not p.complete]

    @property
    def ok(self) -> bool:
        return (bool(self.probes) and all(p.ok for p in self.probes) and self.guest_kept_secret is True
                and not self.map_failed)

    def results(self) -> dict:
        return {
            "secret_bytes": SECRET_SIZE, "guest_kept_secret": self.guest_kept_secret,
            "paths_tried": len(self.probes), "paths_revealing": len(self.revealed),
            "paths_incomplete": len(self.incomplete),
            "probes": [p.as_dict() for p in self.probes],
        }


def _read_proc_fd(fd: int) -> bytes:
    with open(f"/proc/self/fd/{fd}", "rb", buffering=0) as f:
        return f.read(SECRET_SIZE)


def _reveals(value: Any, needle: bytes, depth: int = 0) -> bool:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return needle in bytes(value)
    if isinstance(value, Mapping):
        return False if value.closed else scan(value.read, value.length, needle)[2]
    if isinstance(value, str):
        return needle.hex() in value
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        return any(_reveals(v, needle, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return any(_reveals(v, needle, depth + 1) for v in value.values())
    if depth < 3 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_reveals(getattr(value, f.name), needle, depth + 1) for f in dataclasses.fields(value))
    return False


def _public_values(obj: Any, prefix: str, seen: set[int], depth: int = 0) -> list[tuple[str, Any]]:
    """Public, non-callable attribute values reachable from ``obj`` (depth-limited)."""
    if id(obj) in seen or depth > 2:
        return []
    seen.add(id(obj))
    out = []
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except Exception:  # noqa: BLE001 - a property may refuse on a closed object
            continue
        if callable(value):
            continue
        out.append((f"{prefix}.{name}", value))
        if hasattr(value, "__dict__") or hasattr(value, "__slots__"):
            if not isinstance(value, (int, str, bytes, float, bool)):
                out.extend(_public_values(value, f"{prefix}.{name}", seen, depth + 1))
    return out
