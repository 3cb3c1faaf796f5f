"""``guestmem run`` end to end through ``guestmem.cli.main`` (no subprocess)."""

from __future__ import annotations

import json

import pytest
from bounded import run_bounded

import guestmem
from guestmem.cli import main


def run_json(capsys, *args: str) -> dict:
    rc = main(["run", *args, "--json"])
    out = capsys.readouterr().out
    result = json.loads(out)  # --json prints the results and nothing else
    assert rc == (0 if result["ok"] else 1)
    return result


def test_default_run_is_conversions_on_two_vcpus_with_zero_mismatches(capsys):
    result = run_json(capsys)
    assert (result["workload"], result["vcpus"], result["ok"]) == ("conversions", 2, True)
    assert result["backend"] == "model"  # this host has no private memory in the kernel
    w = result["workload_results"]
    assert w["mismatches"] == 0 and w["map_failures"] == 0
    assert w["iterations_done"] == 2 * w["iterations_per_vcpu"]
    c = result["conversions"]
    sizes = {(row["direction"], row["label"]) for row in c["by_size"]}
    assert sizes == {(d, s) for d in ("to_private", "to_shared") for s in ("4 KiB", "2 MiB", "2052 KiB")}
    assert c["conversions"] == 6 * w["iterations_done"] and c["failed"] == 0
    assert result["conversions_per_second"] > 0 and result["exits"]["hypercall"] == c["conversions"]


def test_summary_map_and_png(capsys, tmp_path):
    png = tmp_path / "map.png"
    rc = main(["run", "conversions", "--iterations", "2", "--vcpus", "1", "--memory", "8M", "--map", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("backend: model", "conversions by direction and size", "2052 KiB", "mismatches",
                 "memory map", "wall time", "bytes converted", "data [0x100000000, +8 MiB) gmem+memfd"):
        assert text in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_secret_every_host_path_is_refused(capsys):
    result = run_json(capsys, "secret")
    w = result["workload_results"]
    assert result["ok"] and w["guest_kept_secret"] is True
    assert w["paths_tried"] >= 10 and w["paths_revealing"] == 0
    paths = {p["path"]: p for p in w["probes"]}
    assert not any(p["revealed"] for p in paths.values())
    assert paths["guest_memfd read(2)"]["outcome"].startswith("refused")
    assert paths["guest_memfd mmap(2) + touch (forked child)"]["outcome"] == "killed by SIGBUS"
    # The data region is GMEM_ONLY (its guest_memfd has MMAP): the host's view of it is the
    # guest_memfd mapping, which a VM with private memory cannot make host-accessible.
    shared = paths["host shared mapping of the range"]
    assert (shared["covers"], shared["examined"], shared["refused"]) == (8192, 0, 8192)
    assert "EFAULT" in shared["outcome"]
    assert all(p["complete"] and p["examined"] + p["refused"] == p["covers"] for p in paths.values())
    assert w["paths_incomplete"] == 0
    rc = main(["run", "secret"])
    out = capsys.readouterr().out
    assert rc == 0 and "host access paths" in out and "YES" not in out


def test_touch_on_the_kernel(capsys):
    ok, why = guestmem.kvm_available()
    if not ok:
        pytest.skip(f"kvm backend unavailable: {why}")
    result = run_json(capsys, "touch", "--backend", "kvm", "--memory", "32M")
    assert result["backend"] == "kvm" and result["ok"]
    assert result["workload_results"]["bytes_populated"] == 32 << 20
    data = next(r for r in result["memory_map"] if r["name"] == "data")
    assert data["segments"] == [[1 << 32, (1 << 32) + (32 << 20), "allocated"]]


def test_kvm_backend_for_a_workload_the_kernel_cannot_run_fails_in_one_line(capsys):
    ok, why = guestmem.kvm_available()
    if not ok:
        pytest.skip(f"kvm backend unavailable: {why}")
    rc = main(["run", "conversions", "--backend", "kvm"])
    captured = capsys.readouterr()
    assert rc != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "private memory" in lines[0] and "Traceback" not in captured.err


def test_auto_without_kvm_runs_on_the_model_and_says_why(capsys, monkeypatch):
    monkeypatch.setenv("GUESTMEM_KVM_DEVICE", "/nonexistent/kvm")
    rc = main(["run", "touch", "--memory", "4M", "--vcpus", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "backend: model (no usable KVM" in out


def test_kvm_backend_without_kvm_fails_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("GUESTMEM_KVM_DEVICE", "/nonexistent/kvm")
    rc = main(["run", "touch", "--backend", "kvm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "/nonexistent/kvm" in err[0]


@pytest.mark.parametrize("args, text", [
    (["run", "nonesuch"], "unknown workload"),
    (["run", "--memory", "lots"], "cannot parse size"),
    (["run", "--memory", "2M"], "at least 4 MiB"),
])
def test_bad_arguments_are_one_line_errors(capsys, args, text):
    assert main(args) != 0
    assert text in capsys.readouterr().err


def test_a_failed_workload_check_exits_1(capsys, monkeypatch):
    """A check that fails (here: the host finds a page that does not hold what the guest
    wrote, because the test overwrote it after the guest ran) is exit code 1, not 0."""
    from guestmem.workloads import touch

    real_finish = touch.Touch.finish

    def finish_after_corruption(self):
        self.memory.write(touch.DATA_GPA, b"\xff" * 8)
        real_finish(self)

    monkeypatch.setattr(touch.Touch, "finish", finish_after_corruption)
    rc = main(["run", "touch", "--backend", "model", "--memory", "4M", "--vcpus", "1"])
    out = capsys.readouterr().out
    assert "FAILED" in out and "mismatches" in out
    assert rc == 1
    rc = main(["run", "touch", "--backend", "model", "--memory", "4M", "--vcpus", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["workload_results"]["mismatches"] == 1
    assert rc == 1


def test_sigint_during_a_run_exits_130(capsys, monkeypatch):
    """A real SIGINT while the guest runs: every vCPU stops, the report says interrupted,
    and the exit code is 130 (128 + SIGINT), as a shell expects."""
    import os
    import signal
    import time

    from guestmem.workloads import touch

    real_on_sync = touch.Touch.on_sync
    sent = []

    def on_sync(self, vcpu, exit):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 30
            while not machine_stopping() and time.monotonic() < deadline:  # the vCPU waits for the stop
                time.sleep(0.01)
        return real_on_sync(self, vcpu, exit)

    machines = []
    real_setup = touch.Touch.setup

    def setup(self, machine):
        machines.append(machine)
        real_setup(self, machine)

    def machine_stopping() -> bool:
        return bool(machines) and machines[0].stopping

    monkeypatch.setattr(touch.Touch, "on_sync", on_sync)
    monkeypatch.setattr(touch.Touch, "setup", setup)
    # Python's own handler, as in an interactive run (a background job inherits SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = main(["run", "touch", "--backend", "model", "--memory", "4M", "--vcpus", "1"])
    finally:
        signal.signal(signal.SIGINT, previous)
    out = capsys.readouterr().out
    assert sent and machine_stopping()
    assert "interrupted" in out
    assert rc == 130


def test_secret_at_8_gib_passes_and_states_the_bytes_each_path_examined(capsys, monkeypatch):
    """Every byte of the 8 GiB data region is accounted for by the all-memory path (read in
    bounded chunks), and the summary shows covered / examined / refused per path."""
    result = run_json(capsys, "secret", "--memory", "8G")
    assert result["ok"] and result["memory"] == 8 << 30
    paths = {p["path"]: p for p in result["workload_results"]["probes"]}
    everything = paths["host shared mappings of all guest memory"]
    assert everything["covers"] == (8 << 30) + (2 << 20)  # the data region and the 2 MiB boot region
    assert everything["examined"] == 2 << 20 and everything["refused"] == 8 << 30  # boot read; data: EFAULT
    assert all(p["complete"] for p in paths.values())
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    rc = main(["run", "secret", "--memory", "8G"])
    out = capsys.readouterr().out
    assert rc == 0 and "examined" in out and "refused" in out and "8194 MiB" in out


def test_secret_path_that_examined_less_than_it_covers_fails_the_run(capsys, monkeypatch):
    """A host path that reads back fewer bytes than it asked for (as hostmem.Mapping.read did
    when it truncated sizes to a C int) has not examined that memory: FAILED, exit 1, and the
    path says how much went unexamined. Simulated with reads truncated to size mod 1 MiB."""
    from guestmem.vmm.memory import GuestMemory

    real_read = GuestMemory.read
    monkeypatch.setattr(GuestMemory, "read", lambda self, gpa, size: real_read(self, gpa, size % (1 << 20)))
    rc = main(["run", "secret", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 1 and result["ok"] is False
    w = result["workload_results"]
    paths = {p["path"]: p for p in w["probes"]}
    everything = paths["host shared mappings of all guest memory"]
    assert not everything["complete"] and everything["examined"] == 0 and "NOT EXAMINED" in everything["outcome"]
    assert w["paths_incomplete"] == 1 and w["paths_revealing"] == 0
    rc = main(["run", "secret"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED" in out and "SHORT" in out.replace("\n", " ")



@pytest.mark.parametrize("memory", ["1000000000000T", "5000T", "1e400T", "inf", "nanG", "-4M", "0"])
def test_impossible_memory_sizes_fail_at_once_in_one_line(memory):
    """Sizes no backend can accept (past the 52-bit guest physical space, not finite, not
    positive) are one line naming --memory, before any VM exists (1000000000000T used to
    plan memslots for minutes). Through main(argv), in a bounded child process."""
    proc = run_bounded(f"import sys; from guestmem.cli import main; sys.exit(main(['run', 'touch', '--memory', {memory!r}]))")
    err = proc.stderr.strip().splitlines()
    unparsable = memory in ("inf", "nanG", "-4M", "0")  # usage errors (2); too large for any backend: 1
    assert proc.returncode == (2 if unparsable else 1) and len(err) == 1 and "--memory" in err[0], proc.stderr
    assert proc.stdout.strip() == ""  # nothing ran: not even the backend line
    if memory.endswith("T") and memory[0].isdigit():
        assert f"at most {(1 << 52) - (4 << 30)} bytes (2**52 - 4 GiB)" in err[0]  # the data region starts at 4 GiB
