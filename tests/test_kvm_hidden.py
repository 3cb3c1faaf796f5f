"""With KVM hidden (GUESTMEM_KVM_DEVICE points nowhere), kvm-backend tests skip with a
reason instead of failing: the conformance suite runs in a subprocess restricted to kvm."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_guest_memfd_suite_skips_without_kvm():
    env = dict(os.environ, GUESTMEM_KVM_DEVICE="/nonexistent/kvm", GUESTMEM_BACKENDS="kvm")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(TESTS / "test_guest_memfd.py")],
        env=env, capture_output=True, text=True, timeout=120, cwd=TESTS.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ skipped", summary), summary
    assert not re.search(r"failed|error|passed", summary), summary
    assert "kvm backend unavailable: /nonexistent/kvm" in out
