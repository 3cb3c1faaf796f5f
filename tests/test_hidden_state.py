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


# --- the versions the layout was verified on ------------------------------------------------

def test_the_installed_unicorn_is_a_verified_one():
    lo, hi = hidden_state.VERIFIED_UNICORN
    assert lo <= hidden_state.unicorn_version() <= hi


def test_pyproject_pins_unicorn_to_the_verified_range():
    """The dependency pin and the runtime fence name the same versions, so they cannot drift."""
    import pathlib
    import tomllib

    from packaging.requirements import Requirement

    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = [Requirement(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    (spec,) = [d.specifier for d in deps if d.name == "unicorn"]
    lo, hi = hidden_state.VERIFIED_UNICORN
    assert spec.contains(".".join(map(str, lo))) and spec.contains(".".join(map(str, hi)))
    below = ".".join(map(str, (*lo[:2], lo[2] - 1))) if lo[2] else f"{lo[0]}.{lo[1] - 1}.99"
    above = ".".join(map(str, (*hi[:2], hi[2] + 1)))
    assert not spec.contains(below) and not spec.contains(above), f"{spec} allows unverified versions"


@pytest.mark.parametrize("version", [(2, 1, 3), (2, 1, 5), (2, 2, 0), (3, 0, 0)])
def test_an_unverified_unicorn_is_refused_with_a_clear_error(monkeypatch, version):
    """Outside the verified range the patches could write into QEMU's CPU state at random (a
    crash); the engine is refused before any patch, with both versions in the message."""
    monkeypatch.setattr(hidden_state, "unicorn_version", lambda: version)
    uc, _ = hidden_state._paged_engine()
    with pytest.raises(ImportError, match=r"verified on Unicorn 2\.1\.4.*is " + r"\.".join(map(str, version))):
        hidden_state.HiddenState(uc)


def test_a_model_vcpu_on_an_unverified_unicorn_fails_its_run_with_the_error(monkeypatch):
    import guestmem

    monkeypatch.setattr(hidden_state, "unicorn_version", lambda: (2, 2, 0))
    with guestmem.open_system("model") as system, system.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with pytest.raises(ImportError, match="pip install 'unicorn==2.1.4'"):
            vcpu.run()
