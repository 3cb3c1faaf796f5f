"""Fuzzing the public API with arbitrary Python values, on both backends (issue 10).

Hypothesis draws short call sequences over every public method of System, Vm, GuestMemfd,
Vcpu (creation and registers; no ``run``) and Mapping, with arguments that are ints at every
width boundary, floats, strings, bytes, None and wrong objects (the other backend's, a
closed file, another VM's file). Each example runs once per backend, each in its own forked
child of a worker process (reused across examples), so a crash or hang is a failed example,
not a dead test run. For every call:

* only TypeError or OSError escape;
* both backends give the same outcome (success, or the same exception type and errno) when
  /dev/kvm is usable (the model runs profile "6.18-host", which matches this host);
* a call that fails leaves the model's state unchanged (snapshot before and after).

Default budget: a few seconds. ``GUESTMEM_FUZZ_SECONDS=N`` keeps drawing examples for N
seconds and prints how many calls ran.
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
P = 4096
FILE_SIZE = 16 * P
MMAP_SHARED_FLAGS = 3  # GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
EXAMPLE_TIMEOUT = 60.0
DEFAULT_SECONDS = 8.0

# --- values -----------------------------------------------------------------------------------------

BOUNDARY_INTS = sorted({0, 1, 2, 3, 8, 4095, 4096, 4097, 8192, FILE_SIZE, FILE_SIZE + P, 1 << 20,
                        2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1,
                        2**47 - P, 2**47, 2**52, 2**63 - 1, 2**64 - 1, -1, -2, -P, -(2**31), -(2**32),
                        -(2**63), -(2**63) - 1, 2**100, -(2**100)}
                       | {2**63 + k * P for k in (-2, -1, 0, 1, 2)} | {2**64 + k * P for k in (-2, -1, 0, 1, 2)})
TOKENS = ("vm", "gmem", "gmem2", "closed_gmem", "other_vm_gmem", "other_backend_gmem", "system", "mapping",
          "vcpu", "object")
WEIRD = (0.0, 4096.0, 4096.7, -1.5, float("nan"), float("inf"), "4096", "", b"4096", b"", bytearray(b"x"),
         None, True, False, [4096], (0,), {})


def tok(name: str) -> tuple[str, str]:
    """A placeholder resolved in the child to an object of its world (plans must pickle)."""
    return ("@tok", name)


# --- what each method takes ------------------------------------------------------------------------

# kind of each positional parameter: int, data, fd, array, regs, sregs, cap, len (int or None)
METHODS: dict[str, dict[str, tuple[str, ...]]] = {
    "System": {"api_version": (), "check_extension": ("int",), "vcpu_mmap_size": (), "create_vm": ("int",),
               "fileno": (), "get_supported_cpuid": ()},
    "Vm": {"check_extension": ("int",), "enable_cap": ("cap", "int", "int"), "create_guest_memfd": ("int", "int", "array"),
           "set_user_memory_region2": ("int", "int", "int", "int", "uaddr", "fd", "int", "int", "array"),
           "set_user_memory_region": ("int", "int", "int", "int", "uaddr"),
           "set_memory_attributes": ("int", "int", "int", "int"), "create_vcpu": ("int",), "fileno": (),
           "set_nr_mmu_pages": ("int",), "get_tsc_khz": ()},
    "GuestMemfd": {"fallocate": ("int", "int", "int"), "allocate": ("int", "int"), "punch_hole": ("int", "int"),
                   "fstat": (), "mmap": ("len", "int", "int", "int"), "read": ("int",), "write": ("data",),
                   "pread": ("int", "int"), "pwrite": ("data", "int"), "lseek": ("int", "int"),
                   "truncate": ("int",), "fileno": ()},
    "Vcpu": {"get_regs": (), "set_regs": ("regs",), "get_sregs": (), "set_sregs": ("sregs",),
             "set_hypercall_ret": ("int",), "pre_fault_memory": ("int", "int", "int"), "kick": ()},
    "Mapping": {"read": ("int", "int"), "write": ("int", "data"), "fill": ("int", "int", "int"), "buffer": ()},
}
MODEL_ONLY = {"Vm": {"memslots": (), "stats": (), "get_memory_attributes": ("int", "int")},
              "GuestMemfd": {"stats": (), "pin": ("int", "int"), "set_memory_attributes": ("int", "int", "int", "int")}}
TARGETS = ("System", "Vm", "GuestMemfd", "GuestMemfd2", "Vcpu", "Mapping")
# Calls whose errno this host's kernel decides differently from the kernel the model follows
# (measured; both must still raise OSError, or both succeed or raise TypeError):
HOST_DIFFERS = {
    ("Vcpu", "pre_fault_memory"): "kvm_pvm answers ENOSPC for every aligned range, where a kernel "
                                  "without TDP says EOPNOTSUPP (the model's 6.18-host profile)",
}


# --- the worker: runs plans in forked children ------------------------------------------------------

def _resolve(value: Any, world: dict) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "@tok":
        return world["token"](value[1])
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "@regs":
        from guestmem.types import Regs, Sregs

        cls = Regs if value[1] == "regs" else Sregs
        field, v = value[2]
        obj = world["vcpu_obj"]().get_regs() if cls is Regs else world["vcpu_obj"]().get_sregs()
        import dataclasses

        return dataclasses.replace(obj, **{field: _resolve(v, world)})
    if isinstance(value, list):
        return [_resolve(v, world) for v in value]
    return value


def _summary(method: str, value: Any) -> Any:
    """What of a return value both backends must agree on."""
    if method in ("check_extension", "api_version", "vcpu_mmap_size", "read", "lseek"):
        return value if isinstance(value, (int, bytes)) else type(value).__name__
    if method == "fstat":
        return (value.st_size, value.st_mode, value.st_blksize, value.st_blocks)
    return None


def _model_state(world: dict) -> Any:
    vm, g, g2, m = world["vm"], world["gmem"], world["gmem2"], world["mapping"]
    if vm is None:
        return None
    return (vm._snapshot(), vm._fd, world["system"]._fd, g._fd, g._refs, g2._fd, g2._refs, m.closed,
            sorted(g._poisoned))


def _build_world(backend: str) -> dict:
    import guestmem

    world: dict[str, Any] = {}
    system = guestmem.open_system(backend, **({"profile": "6.18-host"} if backend == "model" else {}))
    vm = system.create_vm(0)
    gmem = vm.create_guest_memfd(FILE_SIZE, MMAP_SHARED_FLAGS)
    gmem2 = vm.create_guest_memfd(FILE_SIZE, 0)
    mapping = gmem.mmap()
    closed = vm.create_guest_memfd(P)
    closed.close()
    cache: dict[str, Any] = {}

    def vcpu_obj() -> Any:
        if "vcpu" not in cache:
            cache["vcpu"] = vm.create_vcpu(0)
        return cache["vcpu"]

    def token(name: str) -> Any:
        if name == "object":
            return object()
        if name == "mapping_address":
            return mapping.address
        if name == "vcpu":
            return vcpu_obj()
        if name == "other_vm_gmem":
            if name not in cache:
                cache["other_vm"] = system.create_vm(0)
                cache[name] = cache["other_vm"].create_guest_memfd(P)
            return cache[name]
        if name == "other_backend_gmem":
            if name not in cache:
                other = "model" if backend == "kvm" else "kvm"
                try:
                    s2 = guestmem.open_system(other)
                except OSError:
                    s2 = guestmem.open_system("model")
                cache[name] = s2.create_vm(0).create_guest_memfd(P)
            return cache[name]
        return {"vm": vm, "gmem": gmem, "gmem2": gmem2, "closed_gmem": closed, "system": system,
                "mapping": mapping}[name]

    world.update(system=system, vm=vm, gmem=gmem, gmem2=gmem2, mapping=mapping, token=token, vcpu_obj=vcpu_obj)
    return world


def _target(world: dict, kind: str) -> Any:
    return {"System": world["system"], "Vm": world["vm"], "GuestMemfd": world["gmem"],
            "GuestMemfd2": world["gmem2"], "Mapping": world["mapping"]}.get(kind) or world["vcpu_obj"]()


def _run_plan(backend: str, plan: list) -> list:
    """Run ``plan`` (a list of (target, method, args, kwargs)) on a fresh world; one outcome per call."""
    world = _build_world(backend)
    model = backend == "model"
    out = []
    for kind, method, args, kwargs in plan:
        try:
            obj = _target(world, kind)
            a = [_resolve(v, world) for v in args]
            kw = {k: _resolve(v, world) for k, v in kwargs.items()}
        except OSError as exc:  # building the target (e.g. a vCPU) failed: record and go on
            out.append(("setup", type(exc).__name__, exc.errno, str(exc)))
            continue
        if not hasattr(obj, method):  # a model extension, on kvm
            out.append(("skip",))
            continue
        before = _model_state(world) if model else None
        try:
            ret = getattr(obj, method)(*a, **kw)
        except (TypeError, OSError) as exc:
            after = _model_state(world) if model else None
            changed = model and before != after
            out.append(("exc", "OSError" if isinstance(exc, OSError) else "TypeError",
                        getattr(exc, "errno", None), str(exc)[:300], changed))
            continue
        except BaseException as exc:  # noqa: BLE001 - any other escape is a finding
            out.append(("bad", type(exc).__name__, None, repr(exc)[:300], False))
            continue
        summary = _summary(method, ret)
        for attr in ("close", "release"):  # new objects and buffers: let go at once
            if hasattr(ret, attr) and method in ("create_vm", "create_guest_memfd", "mmap", "create_vcpu", "buffer",
                                                 "pin"):
                try:
                    getattr(ret, attr)()
                except Exception:  # noqa: BLE001
                    pass
        out.append(("ok", summary))
    return out


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<Q", len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int, timeout: float | None = None) -> Any:
    def read_exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            if timeout is not None:
                ready, _, _ = select.select([fd], [], [], timeout)
                if not ready:
                    raise TimeoutError
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    (n,) = struct.unpack("<Q", read_exact(8))
    return pickle.loads(read_exact(n))


def _run_forked(backend: str, plan: list) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            result = ("done", _run_plan(backend, plan))
        except BaseException as exc:  # noqa: BLE001
            result = ("error", f"{type(exc).__name__}: {exc}")
        try:
            _send(w, result)
        finally:
            os._exit(0)
    os.close(w)
    try:
        result = _recv(r, EXAMPLE_TIMEOUT)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        result = ("hang", EXAMPLE_TIMEOUT)
    except EOFError:
        result = None
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("crash", signal.Signals(os.WTERMSIG(status)).name)
    return result if result is not None else ("crash", f"exit status {status}")


def worker_main() -> None:
    """Serve plans from stdin: reply, per backend, ("done", outcomes) | ("crash", sig) | ("hang", s)."""
    import importlib

    for name in ("guestmem.kvm", "guestmem.model", "guestmem.model.vcpu"):  # once, before the forks
        importlib.import_module(name)

    inp, out = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the replies
    while True:
        try:
            backends, plan = _recv(inp)
        except EOFError:
            return
        _send(out, {b: _run_forked(b, plan) for b in backends})


# --- the test side ----------------------------------------------------------------------------------

class Worker:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def run(self, backends: tuple[str, ...], plan: list) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
            self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], cwd=ROOT, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        _send(self.proc.stdin.fileno(), (backends, plan))
        try:
            return _recv(self.proc.stdout.fileno(), EXAMPLE_TIMEOUT * 3)
        except (EOFError, TimeoutError):
            self.close()
            raise AssertionError("fuzz worker died or hung") from None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
    sys.exit(0)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from guestmem.types import Regs, Sregs  # noqa: E402
from guestmem.uapi import Cap  # noqa: E402

import guestmem  # noqa: E402

_pages = st.integers(0, 20).map(lambda k: k * P)  # valid offsets and sizes for the 16-page files
_boundary = st.sampled_from(BOUNDARY_INTS)
_ints = (_pages, _pages, st.integers(0, 8), _boundary, _boundary, st.integers(0, 69).map(lambda n: 1 << n),
         st.integers(-(2**70), 2**70))
ints = st.integers(0, len(_ints) - 1).flatmap(lambda i: _ints[i])
anything = st.one_of(ints, st.sampled_from(WEIRD), st.sampled_from(TOKENS).map(tok))
_good = {
    "int": ints,
    "len": st.none() | ints,
    "data": st.binary(max_size=64) | st.just(bytearray(b"abc")),
    "fd": st.none() | st.sampled_from(["gmem", "gmem2", "closed_gmem", "other_vm_gmem", "other_backend_gmem",
                                        "vm", "system"]).map(tok) | ints,
    "array": st.none() | st.lists(ints, max_size=16),
    "cap": st.sampled_from([int(Cap.EXIT_HYPERCALL), -1, 2**32, 2**64, -(2**40)]),
    "uaddr": ints | st.just(tok("mapping_address")),
    "regs": st.tuples(st.sampled_from([f.name for f in Regs.__dataclass_fields__.values()]), anything)
              .map(lambda fv: ("@regs", "regs", fv)),
    "sregs": st.tuples(st.sampled_from([f.name for f in Sregs.__dataclass_fields__.values()]), anything)
               .map(lambda fv: ("@regs", "sregs", fv)),
}


def _param(kind: str) -> st.SearchStrategy:
    good = _good[kind]
    # mostly the right kind, one time in eight anything (one_of would weigh the two equally)
    return st.integers(0, 7).flatmap(lambda k: anything if k == 0 else good)


_CALLS = [(t, m, params) for t in TARGETS for m, params in
          {**METHODS[t.rstrip("2")], **MODEL_ONLY.get(t.rstrip("2"), {}), "close": ()}.items()]


def _required(kind: str, method: str) -> int:
    """How many leading parameters ``method`` requires (the model's signature; kvm's is the same)."""
    import inspect

    from guestmem import hostmem
    from guestmem.model import guest_memfd, system, vcpu, vm

    cls = {"System": system.System, "Vm": vm.Vm, "GuestMemfd": guest_memfd.GuestMemfd, "Vcpu": vcpu.Vcpu,
           "Mapping": hostmem.Mapping}[kind.rstrip("2")]
    params = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]
    return sum(1 for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD)


def _arity(c: tuple) -> st.SearchStrategy:
    """Usually the required parameters and any optional prefix; one time in ten fewer."""
    low = min(_required(c[0], c[1]), len(c[2]))
    return st.integers(0, 9).flatmap(lambda k: st.integers(0, len(c[2])) if k == 0 else st.integers(low, len(c[2])))


# A call: a target's method, a prefix of its parameters (defaults for the rest) and its arguments.
calls = st.sampled_from(_CALLS).flatmap(lambda c: st.tuples(
    st.just(c[0]), st.just(c[1]), _arity(c).flatmap(
        lambda n: st.tuples(*[_param(k) for k in c[2][:n]]) if n else st.just(())), st.just({})))
plans = st.lists(calls, min_size=1, max_size=4)

_stats: dict[str, Any] = {"examples": 0, "calls": 0, "outcomes": {}}


def _same(a: tuple, b: tuple, errno_too: bool = True) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "ok":
        return a[1] == b[1]
    return a[1:3] == b[1:3] if errno_too else a[1] == b[1]  # exception type (and errno)


def check_plan(worker: Worker, backends: tuple[str, ...], plan: list) -> None:
    results = worker.run(backends, plan)
    _stats["examples"] += 1
    _stats["calls"] += len(plan) * len(backends)
    for b, res in results.items():
        assert res[0] == "done", f"{b}: {res} for {plan}"
        for o in res[1]:
            key = o[0] if o[0] != "exc" else (errno.errorcode.get(o[2], o[1]) if o[2] else o[1])
            _stats["outcomes"][key] = _stats["outcomes"].get(key, 0) + 1
        for (kind, method, *_), o in zip(plan, res[1]):
            assert o[0] != "bad", f"{b} {kind}.{method} raised {o[1]}: {o[3]}"
            assert not (o[0] == "exc" and o[4]), f"{b} {kind}.{method} failed ({o[3]}) but changed the model's state"
    if len(results) == 2:
        for call, k, m in zip(plan, results["kvm"][1], results["model"][1]):
            if "skip" in (k[0], m[0]):
                continue
            assert _same(k, m, (call[0], call[1]) not in HOST_DIFFERS), \
                f"{call[0]}.{call[1]}{call[2]}: kvm {k} != model {m} in {plan}"


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def test_fuzz_public_api(worker):
    """Default: about 8 s of examples (at most 40). GUESTMEM_FUZZ_SECONDS=N: N seconds."""
    backends = ("kvm", "model") if guestmem.kvm_available()[0] else ("model",)
    seconds = float(os.environ.get("GUESTMEM_FUZZ_SECONDS", "0"))
    end = time.monotonic() + (seconds or DEFAULT_SECONDS)
    failed: list = []

    @settings(max_examples=40 if not seconds else 200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(plans)
    def fuzz(plan: list) -> None:
        # Past the budget examples pass at once, unless one failed: then every example runs, so
        # Hypothesis can shrink the failure.
        if time.monotonic() < end or failed:
            try:
                check_plan(worker, backends, plan)
            except BaseException:
                failed.append(plan)
                raise

    fuzz()
    while seconds and time.monotonic() < end:
        fuzz()
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(_stats["outcomes"].items(), key=lambda kv: -kv[1]))
    print(f"\nfuzz: {_stats['examples']} examples, {_stats['calls']} calls on {'+'.join(backends)} ({outcomes})")


# --- findings: each was a failed example of the fuzzer (or, the last, of reading its code) ------------

from guestmem.types import CpuidEntry, DebugRegs, Fpu, NmiEvent  # noqa: E402
from guestmem.uapi import MpState  # noqa: E402


def _errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_set_cpuid2_fields_are_u32_ints(system):
    """The model stored CpuidEntry fields as given; kvm encodes each as the u32 the struct holds."""
    vcpu = system.create_vm().create_vcpu(0)
    assert _errno_of(vcpu.set_cpuid2, [CpuidEntry(1, eax=1 << 32)]) == errno.EINVAL
    with pytest.raises(TypeError):
        vcpu.set_cpuid2([CpuidEntry(1, eax="1")])
    vcpu.set_cpuid2([CpuidEntry(1, eax=-1)])  # wraps, as C would pass it
    assert [e.eax for e in vcpu.get_cpuid2() if e.function == 1] == [0xFFFFFFFF]


def test_msr_lists_of_256_or_more_are_e2big(system):
    """msr_io refuses nmsrs >= MAX_IO_MSRS (256) with E2BIG; the model read and wrote them all."""
    vcpu = system.create_vm().create_vcpu(0)
    assert len(vcpu.get_msrs([0x174] * 255)) == 255
    assert _errno_of(vcpu.get_msrs, [0x174] * 256) == errno.E2BIG
    assert _errno_of(vcpu.set_msrs, [(0x174, 0)] * 256) == errno.E2BIG


def test_set_msrs_checks_every_entry_before_setting_any(system):
    """A bad entry after a good one: kvm let ValueError escape for a non-pair, the model set the
    good entry first (a failed call that changed state) or stopped quietly at a value too wide."""
    vcpu = system.create_vm().create_vcpu(0)
    with pytest.raises(TypeError):
        vcpu.set_msrs([(0x174, 5), "abc"])
    assert _errno_of(vcpu.set_msrs, [(0x174, 5), (0x174, 1 << 64)]) == errno.EINVAL
    assert vcpu.get_msrs([0x174]) == [(0x174, 0)]
    with pytest.raises(TypeError):
        vcpu.get_msrs([float(0x174)])


def test_set_mp_state_needs_an_in_kernel_irqchip_for_all_but_runnable(system):
    """kvm_arch_vcpu_ioctl_set_mpstate: without a LAPIC in the kernel only RUNNABLE (the model
    took all five x86 states); with one also AP_RESET_HOLD (9), and SIPI_RECEIVED delivers the
    SIPI at the next KVM_GET_MP_STATE: RUNNABLE at vector:0000 (measured on the host)."""
    vcpu = system.create_vm().create_vcpu(0)
    for state in (1, 2, 3, 4, 9):
        assert _errno_of(vcpu.set_mp_state, state) == errno.EINVAL
    vcpu.set_mp_state(MpState.RUNNABLE)
    vm = system.create_vm()
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    for state in (1, 2, 3, 9):
        vcpu.set_mp_state(state)
        assert vcpu.get_mp_state() == state
    for state in (5, 6, 7, 8, 10, 1 << 31):
        assert _errno_of(vcpu.set_mp_state, state) == errno.EINVAL
    vcpu.set_mp_state(MpState.INIT_RECEIVED)
    vcpu.set_mp_state(MpState.SIPI_RECEIVED)
    assert vcpu.get_mp_state() == MpState.RUNNABLE
    cs = vcpu.get_sregs().cs
    assert (cs.selector, cs.base, vcpu.get_regs().rip) == (0, 0, 0)


def test_set_mp_state_on_a_closed_vcpu_is_ebadf_before_the_argument(system):
    """kvm encoded the argument first (EINVAL) where every closed object says EBADF first."""
    vcpu = system.create_vm().create_vcpu(0)
    vcpu.close()
    assert _errno_of(vcpu.set_mp_state, 1 << 40) == errno.EBADF


def test_set_tsc_khz_without_tsc_scaling(system):
    """KVM_SET_TSC_KHZ without KVM_CAP_TSC_CONTROL (this host, and the model): 0 means the host
    rate, a rate within 250 ppm or above the host's is taken, one below is EINVAL yet recorded
    (kvm_set_tsc_khz). The model took only the host rate exactly."""
    if system.check_extension(60):  # KVM_CAP_TSC_CONTROL: the kernel would scale
        pytest.skip("this kernel scales the guest TSC")
    vcpu = system.create_vm().create_vcpu(0)
    khz = vcpu.get_tsc_khz()
    vcpu.set_tsc_khz(khz + 1)
    assert vcpu.get_tsc_khz() == khz + 1
    vcpu.set_tsc_khz(0)
    assert vcpu.get_tsc_khz() == khz
    vcpu.set_tsc_khz(2 * khz)
    assert _errno_of(vcpu.set_tsc_khz, khz // 2) == errno.EINVAL
    assert vcpu.get_tsc_khz() == khz // 2


def test_get_tsc_khz_reads_rates_above_int_max(system):
    """The kernel returns the u32 rate through the ioctl's int: kvm raised OSError(errno 0) for
    2**31 (fcntl.ioctl saw a negative return); a rate within 4095 of 2**32 reads as -errno."""
    if system.check_extension(60):
        pytest.skip("this kernel scales the guest TSC and refuses such rates")
    vcpu = system.create_vm().create_vcpu(0)
    vcpu.set_tsc_khz(1 << 31)
    assert vcpu.get_tsc_khz() == 1 << 31
    vcpu.set_tsc_khz((1 << 32) - 1)
    assert _errno_of(vcpu.get_tsc_khz) == errno.EPERM


def test_set_fpu_and_set_debugregs_check_fields_in_struct_order(system):
    """kvm fills the struct field by field (a tuple's length before its elements); the model
    checked all scalars, then all register types: another exception for the same argument."""
    vcpu = system.create_vm().create_vcpu(0)
    fpr = list(Fpu().fpr)
    fpr[2], fpr[4] = bytes(1024), object()
    assert _errno_of(vcpu.set_fpu, Fpu(fpr=tuple(fpr), fcw="x")) == errno.EINVAL
    assert _errno_of(vcpu.set_debugregs, DebugRegs(db=(object(),))) == errno.EINVAL
    with pytest.raises(TypeError):
        vcpu.set_debugregs(DebugRegs(db=[0, 0, 0, 0]))


def test_set_vcpu_events_nested_fields_take_their_dataclass(system):
    """An int or another event in place of a nested event: the model took the int (or raised
    AttributeError), kvm raised KeyError for another event."""
    vcpu = system.create_vm().create_vcpu(0)
    events = vcpu.get_vcpu_events()
    for bad in (events.replace(interrupt=1), events.replace(exception=NmiEvent())):
        with pytest.raises(TypeError):
            vcpu.set_vcpu_events(bad)
    assert vcpu.get_vcpu_events() == events


def test_vm_eventfd_and_dirty_log_calls_on_a_closed_vm_are_ebadf_first(system):
    """The model encoded the arguments first (TypeError, EINVAL, EFAULT)."""
    vm = system.create_vm()
    vm.close()
    assert _errno_of(vm.irq_line, 1 << 40, 0) == errno.EBADF
    assert _errno_of(vm.irqfd, None, 1 << 40) == errno.EBADF
    assert _errno_of(vm.ioeventfd, None, 1 << 64, 0) == errno.EBADF
    assert _errno_of(vm.get_dirty_log, 1 << 40) == errno.EBADF
    assert _errno_of(vm.clear_dirty_log, 0, 0, 64, b"") == errno.EBADF


def test_vm_ioctl_arguments_are_encoded_in_struct_order_and_take_bools(system):
    """KVM_IOEVENTFD's datamatch comes first in its struct (the model checked fd, addr, len
    first); get_dirty_log's npages is encoded before the kernel looks at the slot (the model
    said ENOENT); bool is an int (the model's VM ioctls said TypeError)."""
    vm = system.create_vm()
    efd = os.eventfd(0)
    try:
        assert _errno_of(vm.ioeventfd, efd, "x", 0, 1 << 64) == errno.EINVAL
    finally:
        os.close(efd)
    with pytest.raises(TypeError):
        vm.get_dirty_log(0, "x")
    vm.create_irqchip()
    vm.irq_line(True, True)


def test_manual_dirty_log_initially_set_needs_manual_protect(system):
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 takes INITIALLY_SET only with MANUAL_PROTECT_ENABLE."""
    vm = system.create_vm()
    assert _errno_of(vm.enable_cap, Cap.MANUAL_DIRTY_LOG_PROTECT2, 2) == errno.EINVAL
    vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, 3)


_OVERFLOW = """
import ctypes, mmap, guestmem
from guestmem.uapi import Cap
vm = guestmem.open_system("kvm").create_vm(0)
vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, 3)  # the log starts all set: the kernel writes 0xff
size = 64 << 20
backing = mmap.mmap(-1, size)
vm.set_user_memory_region(0, 1, 0, size, ctypes.addressof(ctypes.c_char.from_buffer(backing)))
for _ in range(2000):
    log = vm.get_dirty_log(0, 1)
    junk = [bytes(100) for _ in range(100)]
print(log.npages, log.bitmap.hex())
"""


def test_get_dirty_log_with_npages_below_the_slot_size_does_not_overflow(kvm_system):
    """kvm sized the bitmap buffer from ``npages`` alone, and the kernel writes the whole slot's
    bitmap: 2 KiB of 0xff over an 8-byte buffer, a segfault within 2000 calls (measured)."""
    proc = subprocess.run([sys.executable, "-c", _OVERFLOW], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "ff" * 8]


def test_ioeventfd_flags_outside_the_mask_are_refused_only_when_assigning(system):
    """kvm_ioeventfd takes the DEASSIGN path before any flag check (it ignores the others) and
    kvm_assign_ioeventfd checks len and wrap-around before flags; the model refused unknown
    flags first."""
    vm = system.create_vm()
    efd = os.eventfd(0)
    try:
        assert _errno_of(vm.ioeventfd, efd, 0x1000, 4, 0, 0xFFFFFFFE) == errno.ENOENT  # DEASSIGN | junk
        assert _errno_of(vm.ioeventfd, efd, 2**64 - 1, 4, 0, 1 << 31) == errno.EINVAL
        vm.ioeventfd(efd, 0x1000, 4)
        vm.ioeventfd(efd, 0x1000, 4, 0, 0xFFFFFFE4)  # DEASSIGN | junk removes it
        assert _errno_of(vm.ioeventfd, efd, 0x1000, 4, 0, 4) == errno.ENOENT
    finally:
        os.close(efd)
