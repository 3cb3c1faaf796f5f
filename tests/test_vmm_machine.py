"""vmm.machine and vmm.runloop: loading guests, vCPU threads, the exit dispatcher, stopping."""

from __future__ import annotations

import threading

import pytest

from guestmem.guest import assemble
from guestmem.types import HltExit, IntrExit, ShutdownExit
from guestmem.vmm.machine import Machine, boot_region
from guestmem.vmm.layout import Region
from guestmem.vmm.runloop import GuestError, Outcome, RunLoop

MiB = 1 << 20
DATA = 1 << 32

HELLO = """
    mov rsi, message
    mov ecx, 3
    mov dx, 0xe9
    rep outsb
    mov rax, 0x100000000
    mov [rax + rdi*8], rdi
    lea eax, [rdi + 40]
    out 0xf4, eax
message:
    .ascii "hi\\n"
"""


@pytest.fixture
def cpl(backend):
    return 3 if backend == "kvm" else 0  # the kernel here emulates CPL0 slowly; CPL3 runs natively


def test_each_vcpu_runs_on_its_own_thread_with_console_and_result(system, cpl):
    with Machine(system, [boot_region(), Region("data", DATA, 2 * MiB)], vcpus=3) as m:
        m.load_assembly(HELLO, cpl=cpl)
        loops = m.run(timeout=20)
        assert [loop.result for loop in loops] == [40, 41, 42]
        assert bytes(m.console).count(b"hi\n") == 3 or sorted(bytes(m.console)) == sorted(b"hi\n" * 3)
        assert [int.from_bytes(m.memory.read(DATA + 8 * i, 8), "little") for i in range(3)] == [0, 1, 2]
        assert m.exits["io"] == 3 * 4


def test_flat_binary_guest(system, cpl):
    with Machine(system, [boot_region()], vcpus=1) as m:
        m.load_binary(assemble("mov eax, 7; imul eax, eax", 0), cpl=cpl)  # position independent
        (loop,) = m.run(timeout=20)
        assert loop.result == 49


def test_hlt_stops_the_vcpu_cleanly(model_system):
    with Machine(model_system, [boot_region()], vcpus=2) as m:
        m.load_assembly("hlt")
        loops = m.run(timeout=20)
        assert all(loop.halted and loop.error is None for loop in loops)
        assert m.exits["hlt"] == 2


def test_guest_exception_is_raised_in_the_caller(system, cpl):
    with Machine(system, [boot_region()], vcpus=2) as m:
        m.load_assembly("ud2", cpl=cpl)
        # Both backends deliver #UD (vector 6) through the builder's IDT, whose handler reports it
        # on PORT_FAIL with EAX = RDI = vector.
        with pytest.raises(GuestError, match=r"^vcpu \d: guest failure 6 \(rdi=0x6 "):
            m.run(timeout=20)
        assert m.exits["io"] >= 1 and "shutdown" not in m.exits


def test_stop_kicks_every_spinning_vcpu(system, cpl):
    with Machine(system, [boot_region()], vcpus=2) as m:
        m.load_assembly("spin: jmp spin", cpl=cpl)
        threading.Timer(0.3, m.stop).start()
        loops = m.run(timeout=20)
        assert all(loop.result is None and loop.error is None for loop in loops)
        assert m.exits["intr"] >= 2


def test_timeout_stops_the_guest_and_raises(model_system):
    with Machine(model_system, [boot_region()], vcpus=1) as m:
        m.load_assembly("spin: jmp spin")
        with pytest.raises(TimeoutError):
            m.run(timeout=0.3)


def test_ctrl_c_stops_every_vcpu_then_propagates(model_system):
    with Machine(model_system, [boot_region()], vcpus=2) as m:
        m.load_assembly("spin: jmp spin")
        calls = []

        def poll():
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            m.run(poll=poll, interval=0.05)
        assert m.stopping and all(not loop.error for loop in m.loops)


def test_dispatcher_outcomes(model_system):
    with Machine(model_system, [boot_region()], vcpus=1) as m:
        loop = RunLoop(m, m.vcpus[0])
        assert loop.handle_exit(IntrExit()) is Outcome.HANDLED  # spurious signal: run again
        m.stopping = True
        assert loop.handle_exit(IntrExit()) is Outcome.STOPPED
        assert loop.handle_exit(HltExit()) is Outcome.STOPPED
        with pytest.raises(GuestError, match=r"^vcpu 0: ShutdownExit"):
            loop.handle_exit(ShutdownExit())
        assert m.exits == {"intr": 2, "hlt": 1, "shutdown": 1}


def test_ctrl_c_while_the_vcpu_threads_start_still_stops_every_vcpu(model_system, monkeypatch):
    """A SIGINT can arrive while run() is still starting threads (the first vCPU already
    runs). It must stop the vCPUs that started before propagating, not leave them running
    while the caller closes the machine."""
    real_start = threading.Thread.start

    def start_then_interrupt(self):
        real_start(self)
        if self.name == "vcpu0":
            raise KeyboardInterrupt  # as if Ctrl-C came right after the first vCPU thread started

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    with Machine(model_system, [boot_region()], vcpus=2) as m:
        m.load_assembly("spin: jmp spin")
        with pytest.raises(KeyboardInterrupt):
            m.run(interval=0.05)
        assert m.stopping
        assert [t.name for t in threading.enumerate() if t.name.startswith("vcpu")] == []
