"""The benchmarks' correctness, never their timings: each quick workload completes, its
checks pass, and every row either states a figure or says why it was skipped."""

from __future__ import annotations

import json

import pytest

from guestmem import bench
from guestmem.bench import cbuild, harness, report
from guestmem.cli import main


@pytest.mark.parametrize("name", list(bench.WORKLOADS))
def test_quick_workload_completes_and_checks_pass(name: str) -> None:
    result = bench.run([name], quick=True, command=f"test {name}")
    assert result.rows, f"{name} produced no rows"
    assert not result.failed, "\n".join(f"{r.case} {r.backend}: {r.note}" for r in result.failed)
    for row in result.rows:
        assert row.status in (bench.PASS, bench.MISS, bench.SKIP, harness.INFO), row
        if row.status == bench.SKIP:
            assert row.note.startswith("skipped: ") and len(row.note) > len("skipped: "), row
        else:
            assert row.value is not None and row.value >= 0, row
        if row.status in (bench.PASS, bench.MISS):
            assert row.goal, f"a PASS/MISS row must state its goal: {row}"


def test_unknown_benchmark_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no-such-benchmark"]) == 2
    assert "no-such-benchmark" in capsys.readouterr().err


def test_cli_writes_json_and_plot(tmp_path) -> None:
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", "fileops", "--quick", "--json", str(out_json), "--plot", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert data["quick"] is True and data["command"].startswith("guestmem bench fileops --quick")
    assert {"cpu", "nproc", "kernel", "kvm_modules"} <= set(data["machine"])
    assert data["rows"] and all("status" in r for r in data["rows"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = report.load(out_json)
    assert [r.as_dict() for r in again.rows] == data["rows"]
    md = report.markdown(again)
    assert md.count("\n| file operations |") == len(data["rows"])


def test_plot_without_data_still_draws(tmp_path) -> None:
    empty = harness.Report("x", True, harness.machine(), "now")
    report.plot(empty, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_goal_and_row_status() -> None:
    ctx = harness.Context("w", True, [])
    assert ctx.add("c", "b", 0.95, "x", goal=harness.at_least(0.9, "≥ 0.9x")).status == bench.PASS
    assert ctx.add("c", "b", 0.85, "x", goal=harness.at_least(0.9, "≥ 0.9x")).status == bench.MISS
    assert ctx.add("c", "b", 3.0, "x", goal=harness.at_most(2.0, "≤ 2x")).status == bench.MISS
    assert ctx.add("c", "b", 3.0, "x").status == harness.INFO
    assert ctx.skip("c", "b", "why").note == "skipped: why"


def test_failing_workload_becomes_a_fail_row() -> None:
    def broken(ctx: harness.Context) -> None:
        harness.check(False, "the figure is wrong")

    result = harness.run({"b": ("broken", broken)}, ["b"], True, "test")
    assert [r.status for r in result.rows] == [bench.FAIL]
    assert "the figure is wrong" in result.rows[0].note


def test_guard_turns_one_case_failure_into_a_fail_row_and_goes_on() -> None:
    ctx = harness.Context("w", True, [])
    with ctx.guard("case 1", "model"):
        raise RuntimeError("model broke")
    with ctx.guard("case 2", "kvm"):
        raise harness.Skip("no kvm here")
    with ctx.guard("case 3", "model"):
        ctx.add("case 3", "model", 1.0, "x")
    assert [(r.case, r.status) for r in ctx.rows] == [("case 1", bench.FAIL), ("case 2", bench.SKIP),
                                                     ("case 3", harness.INFO)]
    assert "RuntimeError: model broke" in ctx.rows[0].note


@pytest.mark.skipif(cbuild.compiler() is None, reason="no C compiler on this machine")
def test_c_reference_programs_build(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTMEM_BENCH_CACHE", str(tmp_path))
    for name in ("kvm_exit", "gmem_ops"):
        path = cbuild.build(name)
        assert path.exists() and path == cbuild.build(name)  # cached the second time
    with pytest.raises(RuntimeError, match="usage"):
        cbuild.run_lines(cbuild.build("kvm_exit"))  # no arguments: usage, exit status 2

def test_missing_compiler_is_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(harness.Skip, match="no C compiler"):
        cbuild.build("kvm_exit")
