"""The shipped pytest plugin (guestmem.pytest_plugin) and the README's example suite that uses it.

The example runs in a child pytest with plugin autoloading off and the plugin named with ``-p``,
so the result does not depend on whether this checkout's entry points are installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import guestmem
from guestmem.pytest_plugin import assert_exit, backend_skip_reason
from guestmem.types import HltExit, IoExit

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    child_env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "guestmem.pytest_plugin", "-p", "no:cacheprovider",
                           "-q", "-rs", *args], cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=300)


def test_entry_point_names_the_plugin_module():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["pytest11"] == {"guestmem": "guestmem.pytest_plugin"}


def test_readme_example_runs_on_every_backend_this_host_can_run():
    proc = run_pytest("examples/test_my_guest.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    backends = [b for b in ("kvm", "model") if backend_skip_reason(b) is None]
    # two backend-independent tests per backend, plus the private-memory test where it can run
    private = sum(1 for b in backends if b == "model" or guestmem.choose_backend(["private_memory"]).backend == "kvm")
    assert passed == 2 * len(backends) + private
    if "kvm" in backends and private < len(backends):
        assert "requires private memory:" in proc.stdout  # the skip states why


def test_backend_selection_shows_the_unselected_backend_as_a_skip():
    proc = run_pytest("examples/test_my_guest.py", "-k", "port", env={"GUESTMEM_BACKENDS": "model"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "not selected by GUESTMEM_BACKENDS=model" in proc.stdout


def test_requires_kvm_marker_skips_with_the_reason(tmp_path):
    (tmp_path / "test_k.py").write_text(
        "import pytest\n@pytest.mark.requires_kvm\ndef test_k():\n    pass\n")
    proc = run_pytest(str(tmp_path / "test_k.py"), env={"GUESTMEM_KVM_DEVICE": "/dev/nonexistent-kvm"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "requires_kvm: kvm backend unavailable: /dev/nonexistent-kvm" in proc.stdout


def test_assert_exit_checks_type_and_fields():
    io = IoExit(direction=1, size=1, port=0x10, count=1, data=b"\x55")
    assert assert_exit(io, IoExit, port=0x10) is io
    with pytest.raises(AssertionError, match="port=16 .expected 17"):
        assert_exit(io, IoExit, port=0x11)
    with pytest.raises(AssertionError, match="expected a HltExit"):
        assert_exit(io, HltExit)


def test_readme_shows_the_example_file_verbatim():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("CI runs it:\n\n```python\n", 1)[1].split("```", 1)[0]
    example = (ROOT / "examples" / "test_my_guest.py").read_text().split('"""\n\n', 1)[1]
    assert block == example
