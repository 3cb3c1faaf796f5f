"""The kernel's own KVM selftests judge the model (``guestmem kselftest``).

Runs only where the kernel source is installed (``apt-get install linux-source-6.12
rsync``; the test skips and says so otherwise). The selftests are built once into
~/.cache/guestmem/kselftest. By default the quick ones run (a few seconds each on the
model); ``GUESTMEM_KSELFTEST_ALL=1`` runs the whole table of spec section 7, which takes a
few minutes on a shared two-core machine.
"""

from __future__ import annotations

import os

import pytest

from guestmem.devkvm import Unavailable
from guestmem.devkvm import kselftest as ks

QUICK = {("guest_memfd_test", ()), ("pre_fault_memory_test", ()), ("x86/private_mem_kvm_exits_test", ()),
         ("x86/private_mem_conversions_test", ())}


def _tests() -> list[tuple[str, tuple[str, ...]]]:
    if os.environ.get("GUESTMEM_KSELFTEST_ALL"):
        return list(ks.DEFAULT_TESTS)
    return [t for t in ks.DEFAULT_TESTS if t in QUICK]


@pytest.fixture(scope="module")
def table() -> tuple[str, list[ks.Result]]:
    try:
        return ks.run(tests=_tests(), timeout=300)
    except Unavailable as exc:
        pytest.skip(f"KVM selftests unavailable: {exc}")


@pytest.mark.parametrize("test,args", _tests(), ids=[" ".join((t, *a)) for t, a in _tests()])
def test_selftest_passes_on_the_model(table, test: str, args: tuple[str, ...]) -> None:
    profile, results = table
    (r,) = [r for r in results if (r.test, r.args) == (test, args)]
    if test == "guest_memfd_test" and profile != "6.12":
        # The 6.12 test expects every create flag refused; 6.18 accepts MMAP (as this host does).
        assert r.model.result == "fail" and "should fail with EINVAL" in r.model.detail
        pytest.skip(f"guest_memfd_test of 6.12 needs the model's 6.12 profile (ran {profile})")
    assert r.model.result == "pass", r.model.detail


def test_unknown_source_is_unavailable(tmp_path) -> None:
    with pytest.raises(Unavailable, match="does not exist"):
        ks.find_source(str(tmp_path / "nope.tar.xz"))
