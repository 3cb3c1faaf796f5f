#!/usr/bin/env python3
"""Mutation testing of the model's rule modules with mutmut (issue 15; docs/testing.md).

    nice -n 15 python benchmarks/mutate.py [MODULE...] [--rev REV] [--sample N] [--workdir DIR]

Each MODULE (a key of MODULES; all by default) is mutated on its own, in a copy of the
checkout's ``guestmem/`` and ``tests/`` (the working tree, or ``git archive REV`` with
``--rev``), against a fast subset of the deterministic suite: model-only (``/dev/kvm`` is
hidden through ``GUESTMEM_KVM_DEVICE``, so the model is judged as on a host without KVM) and
Hypothesis with a fixed seed. mutmut runs, for each mutant, only the tests of the subset that
call the mutated function, fastest first, stopping at the first failure.

Reports per module: mutants, killed (a test failed, or the mutant hung past mutmut's
timeout), survived, not covered by the subset ("no tests", counted as survivors) and the
kill rate killed / (killed + survived + no tests); writes them, with every survivor's name,
to ``DIR/<label>/summary.json``. ``mutmut show NAME`` in ``DIR/<label>/<module>`` prints a
survivor's diff. A run can be interrupted and rerun: mutmut keeps the verdicts it has.

``--sample N`` checks N mutants per module picked with a fixed seed (for a shared machine
where the full set is too slow); say so wherever the numbers are quoted.

Needs the ``dev`` extra (``pip install -e '.[dev]'``). Not run by CI: a full run is ~2,700
mutants, tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> (source path, test subset). Subsets are model-only, deterministic and fast:
# the tests that exercise the module's rules directly, not every test that reaches it.
MODULES: dict[str, tuple[str, list[str]]] = {
    "guest_memfd": ("guestmem/model/guest_memfd.py", [
        "tests/test_guest_memfd.py", "tests/test_lifetimes.py", "tests/test_model_fdtable.py",
        "tests/test_model_profile_68.py", "tests/test_model_private.py", "tests/test_model_hwpoison.py",
        "tests/test_inplace_conversion.py", "tests/test_inplace_hugetlb.py", "tests/test_profiles.py",
        "tests/test_input_contract.py",
    ]),
    "vm": ("guestmem/model/vm.py", [
        "tests/test_memslots.py", "tests/test_model_private.py", "tests/test_lifetimes.py",
        "tests/test_model_profile_68.py", "tests/test_guest_memfd.py", "tests/test_model_fdtable.py",
        "tests/test_guest_memfd_guest.py", "tests/test_model_mixed_blocks.py",
        "tests/test_inplace_conversion.py", "tests/test_profiles.py", "tests/test_parity_vm.py",
        "tests/test_vcpu_conformance.py", "tests/test_input_contract.py", "tests/test_fork.py",
    ]),
    "memslot": ("guestmem/model/memslot.py", [
        "tests/test_model_mixed_blocks.py", "tests/test_model_private.py", "tests/test_memslots.py",
        "tests/test_parity_vm.py",
    ]),
    "rangemap": ("guestmem/rangemap.py", ["tests/test_rangemap.py"]),
    # test_private_mem_conversions' multi-vCPU flows outlive their join timeout under mutmut.
    "conversion": ("guestmem/vmm/conversion.py", ["tests/test_vmm_conversion.py", "tests/test_vmm_inplace.py"]),
}

ENV = {"GUESTMEM_KVM_DEVICE": "/dev/nonexistent-kvm"}
PYTEST_ARGS = ["-p", "no:cacheprovider", "--hypothesis-seed=0"]
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
SURVIVED = {"survived", "no tests", "suspicious"}


def checkout(rev: str | None, dest: Path) -> None:
    """The package (src/guestmem/) and tests/ of the working tree, or of git revision ``rev``,
    into ``dest`` as guestmem/ and tests/."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis")
    if rev is None:
        shutil.copytree(ROOT / "src" / "guestmem", dest / "guestmem", ignore=ignore)
        shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
        return
    # The package moved to src/ (src layout); older revisions have it at the top.
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "src/guestmem"],
                            check=True, capture_output=True, text=True).stdout.strip()
    package = "src/guestmem" if listed else "guestmem"
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, package, "tests"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    if listed:
        (dest / "src" / "guestmem").rename(dest / "guestmem")
        (dest / "src").rmdir()


def configure(workdir: Path, source: str, tests: list[str]) -> None:
    """The [tool.mutmut] table mutmut reads from the working directory's pyproject.toml."""
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    (workdir / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["guestmem"]\n'
        f"only_mutate = {toml_list([source])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        f"pytest_add_cli_args = {toml_list(PYTEST_ARGS)}\n"
        "use_git_change_detection = false\n"
        # The limit is CPU time, so a loaded machine does not turn slow mutants into timeouts;
        # mutmut's default (15x the tests' time, doubled) lets each looping mutant burn minutes.
        "timeout_multiplier = 4.0\n", encoding="utf-8")


def mutmut(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    exe = shutil.which("mutmut") or sys.exit("mutmut is not installed: pip install -e '.[dev]'")
    return subprocess.run([exe, *args], cwd=workdir, env=env, text=True, capture_output=True)


def verdicts(workdir: Path, source: str) -> dict[str, str]:
    """mutant name -> mutmut status, from the .meta file mutmut keeps beside the mutated copy."""
    from mutmut.stats import status_by_exit_code  # the dev extra; only needed here

    meta = json.loads((workdir / "mutants" / f"{source}.meta").read_text(encoding="utf-8"))
    return {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}


def run_module(name: str, workdir: Path, rev: str | None, sample: int | None, seed: int) -> dict:
    source, tests = MODULES[name]
    if not workdir.exists():
        checkout(rev, workdir)
        configure(workdir, source, tests)
    names: list[str] = []
    if sample is not None:
        # Generate the mutants and the test map without running any mutant (mutmut stops
        # when the filter matches nothing), then pick the sample: a prefix of one seeded
        # shuffle, so a smaller sample is part of a larger one.
        if not (workdir / "mutants" / f"{source}.meta").exists():
            mutmut(workdir, "run", "--max-children", "2", "no-such-mutant")
        every = sorted(verdicts(workdir, source))
        random.Random(seed).shuffle(every)
        names = every[:sample]
        status = verdicts(workdir, source)
        todo = [n for n in names if status[n] == "not checked"]  # mutmut reruns named mutants
    if sample is None or todo:
        done = mutmut(workdir, "run", "--max-children", "2", *(todo if sample is not None else []))
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"mutmut failed on {name} (exit {done.returncode}); workdir {workdir}")
    status = verdicts(workdir, source)
    if names:
        status = {n: status[n] for n in names}
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    killed = sum(n for s, n in counts.items() if s in KILLED)
    judged = killed + sum(n for s, n in counts.items() if s in SURVIVED)
    return {
        "module": source, "tests": tests, "mutants": len(status), "sampled": sample is not None,
        "counts": counts, "killed": killed, "judged": judged,
        "kill_rate": round(killed / judged, 4) if judged else None,
        "survivors": sorted(n for n, s in status.items() if s in SURVIVED),
        "unchecked": sorted(n for n, s in status.items() if s not in KILLED | SURVIVED),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", metavar="MODULE", help=f"of {', '.join(MODULES)} (default: all)")
    ap.add_argument("--rev", help="git revision to measure (default: the working tree)")
    ap.add_argument("--sample", type=int, help="mutants per module, picked with --seed")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/guestmem-mutate"))
    args = ap.parse_args(argv)
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        ap.error(f"unknown modules {sorted(unknown)}; choose from {', '.join(MODULES)}")
    label = args.rev or "worktree"
    base = args.workdir / label
    summary_path = base / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.modules or list(MODULES):
        result = run_module(name, base / name, args.rev, args.sample, args.seed)
        summary[name] = result
        base.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
        rate = f"{result['kill_rate']:.1%}" if result["kill_rate"] is not None else "-"
        print(f"{name:12} {result['killed']:5}/{result['judged']:<5} killed  {rate:>6}  "
              f"{' '.join(f'{k}={v}' for k, v in sorted(result['counts'].items()))}", flush=True)
    print(f"summary: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
