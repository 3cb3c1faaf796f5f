"""Host half of the ``secret`` workload (guest code: secret.S).

vCPU 0 converts the first pages of the private-capable ``data`` region to private and
writes a secret there (a xorshift64 stream from a seed only the guest's registers hold).
When it says so, the host tries every access path it has and records, per path, what
happened and whether any of the secret came back. Afterwards the guest checks that it
still reads its secret, so the probes are known to have run against live private data.

The guest_memfd is created with MMAP when the VM allows it, so the mmap path yields a real
mapping that is probed for SIGBUS in a forked child.
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import os
import random
import signal
import struct
import threading
from typing import Any

from ..guest import PORT_SYNC
from ..hostmem import Mapping
from ..vmm.memory import Region
from ..vmm.runloop import Outcome
from . import source, sync_op

DATA_GPA = 1 << 32
SECRET_SIZE = 2 * 4096
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
    """One host access path and its outcome."""

    path: str
    outcome: str
    revealed: bool


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
                out.append(Probe(path, f"refused: {exc.strerror or exc} (errno {exc.errno})", False))
                return
            hit = _contains(data, needle)
            out.append(Probe(path, f"returned {len(data)} bytes" + (", SECRET FOUND" if hit else ", no secret"), hit))

        fd = gmem.fileno()
        attempt("guest_memfd read(2)", lambda: gmem.read(SECRET_SIZE))
        attempt("guest_memfd pread(2)", lambda: gmem.pread(SECRET_SIZE, 0))
        attempt("read(2) on the raw fd", lambda: os.read(fd, SECRET_SIZE))
        attempt("pread(2) on the raw fd", lambda: os.pread(fd, SECRET_SIZE, 0))
        attempt("open /proc/self/fd/N and read", lambda: _read_proc_fd(fd))
        try:
            gm = gmem.mmap(SECRET_SIZE)
        except OSError as exc:
            out.append(Probe("guest_memfd mmap(2)", f"refused: {exc.strerror} (errno {exc.errno})", False))
        else:
            try:
                how, data = probe_mapping_in_child(gm, 0, SECRET_SIZE)
            finally:
                gm.close()
            hit = _contains(data, needle)
            out.append(Probe("guest_memfd mmap(2) + touch (forked child)",
                             "killed by " + how if how != "read" else
                             f"read {len(data)} bytes" + (", SECRET FOUND" if hit else ", no secret"), hit))
        attempt("host shared mapping of the range", lambda: mem.read(DATA_GPA, SECRET_SIZE))
        attempt("host shared mappings of all guest memory",
                lambda: b"".join(mem.shared_mapping(r.name).read(0, r.size) for r in mem.regions))
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
    def ok(self) -> bool:
        return bool(self.probes) and not self.revealed and self.guest_kept_secret is True and not self.map_failed

    def results(self) -> dict:
        return {
            "secret_bytes": SECRET_SIZE, "guest_kept_secret": self.guest_kept_secret,
            "paths_tried": len(self.probes), "paths_revealing": len(self.revealed),
            "probes": [dataclasses.asdict(p) for p in self.probes],
        }


def _read_proc_fd(fd: int) -> bytes:
    with open(f"/proc/self/fd/{fd}", "rb", buffering=0) as f:
        return f.read(SECRET_SIZE)


def _reveals(value: Any, needle: bytes, depth: int = 0) -> bool:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return needle in bytes(value)
    if isinstance(value, Mapping):
        return False if value.closed else needle in value.read(0, value.length)
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
