"""The engine state model vCPUs patch behind Unicorn's API (guestmem.model.hidden_state)."""

import struct

import pytest

from guestmem.model import hidden_state

FAULT_AT = 0x4000_0000  # outside the calibration engine's identity map


def test_each_page_fault_reaches_the_hook_once_the_exception_in_flight_is_cleared():
    """Unicorn leaves a hooked #PF "in flight": a second #PF is a silent triple fault."""
    uc, run = hidden_state._paged_engine()
    state = hidden_state.HiddenState(uc)
    assert run(FAULT_AT) == [14]
    assert run(FAULT_AT) == []  # the engine's own behaviour: the second #PF never reaches the hook
    for _ in range(3):
        assert state.clear_exception_in_flight()
        assert run(FAULT_AT) == [14]


def test_exception_info_reads_the_page_fault_error_code():
    """A write to a not-present page: error code 2 (W, not P), not a software interrupt."""
    code = b"\x48\xc7\xc0" + struct.pack("<I", FAULT_AT) + b"\xc6\x00\x01"  # mov rax, FAULT_AT; mov byte [rax], 1
    uc, run = hidden_state._paged_engine(code)
    state = hidden_state.HiddenState(uc)
    assert run() == []  # the mov
    assert run(0x1007) == [14]
    error_code, software, _ = state.exception_info()
    assert (error_code, software) == (2, False)


def test_int3_is_a_software_interrupt_with_the_next_rip():
    uc, run = hidden_state._paged_engine(b"\xcc")
    state = hidden_state.HiddenState(uc)
    assert run() == [3]
    assert state.exception_info()[1:] == (True, 0x1001)


@pytest.mark.parametrize("cpl,vectors", [(0, []), (3, [13])])
def test_set_cpl_makes_privileged_instructions_fault_at_cpl3(cpl, vectors):
    """CLI with IOPL 0: allowed at CPL 0, #GP at CPL 3 (the API alone leaves the engine at 0)."""
    uc, run = hidden_state._paged_engine(b"\xfa")
    uc.reg_write(hidden_state.unicorn().x86_const.UC_X86_REG_RFLAGS, 0x2)
    assert hidden_state.HiddenState(uc).set_cpl(cpl)
    assert run() == vectors
