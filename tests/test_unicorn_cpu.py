"""The engine plumbing under model vCPUs (guestmem.model.unicorn_cpu)."""

import pytest

pytest.importorskip("unicorn")

from guestmem.model import unicorn_cpu  # noqa: E402


def test_each_page_fault_reaches_the_hook_once_the_exception_in_flight_is_cleared():
    """Unicorn leaves a hooked #PF "in flight"; a second #PF would be a silent triple fault.

    The calibrated clear must make every later #PF reach UC_HOOK_INTR again.
    """
    assert unicorn_cpu._old_exception_offset() is not None, "context layout not calibrated"
    uc, fault = unicorn_cpu._page_fault_engine()
    access = unicorn_cpu.RegAccess(uc)
    assert fault() == 1
    assert fault() == 0  # the engine's own behaviour: the second #PF never reaches the hook
    for _ in range(3):
        assert access.clear_exception_in_flight()
        assert fault() == 1
