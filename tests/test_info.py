"""``guestmem info``: the report agrees with direct KVM_CHECK_EXTENSION calls, and without
KVM it still reports (KVM absent, everything on the model) with exit code 0."""

from __future__ import annotations

import json
import os

from guestmem.cli import main
from guestmem.info import HostReport, decode_bits, host_report
from guestmem.uapi import Cap, GuestMemfdFlag, VmType


def run_info_json(capsys, *extra: str) -> dict:
    assert main(["info", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_matches_check_extension(capsys, kvm_system):
    data = run_info_json(capsys)
    assert data["kvm_accessible"] is True
    assert data["api_version"] == kvm_system.api_version() == 12
    assert data["vcpu_mmap_size"] == kvm_system.vcpu_mmap_size()
    for cap in Cap:
        assert data["caps"][cap.name] == kvm_system.check_extension(cap), cap.name
    vm = kvm_system.create_vm()
    for cap in Cap:
        assert data["vm_caps"][cap.name] == vm.check_extension(cap), cap.name
    vm.close()
    assert data["guest_memfd_flags"] == decode_bits(kvm_system.check_extension(Cap.GUEST_MEMFD_FLAGS),
                                                    GuestMemfdFlag)
    assert "DEFAULT" in data["vm_types"]
    verdict = {f["name"]: f["backend"] for f in data["features"]}
    assert set(verdict.values()) <= {"kernel", "model"}
    private = "private memory (KVM_SET_MEMORY_ATTRIBUTES)"
    if kvm_system.check_extension(Cap.MEMORY_ATTRIBUTES) == 0:
        assert verdict[private] == "model"
        reason = next(f["reason"] for f in data["features"] if f["name"] == private)
        assert "MEMORY_ATTRIBUTES=0x0" in reason
    if kvm_system.check_extension(Cap.GUEST_MEMFD):
        assert verdict["guest_memfd"] == "kernel"


def test_info_table_prints(capsys, kvm_system):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GUEST_MEMFD_FLAGS" in out and "Features" in out


def test_info_without_kvm(capsys, monkeypatch):
    monkeypatch.setenv("GUESTMEM_KVM_DEVICE", "/nonexistent/kvm")
    data = run_info_json(capsys)
    assert data["device"] == "/nonexistent/kvm"
    assert data["kvm_present"] is False and data["kvm_accessible"] is False
    assert "No such file or directory" in data["kvm_reason"]
    assert data["caps"] == {} and data["api_version"] is None
    assert data["features"] and all(f["backend"] == "model" for f in data["features"])
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ABSENT" in out and "model" in out


def test_report_is_a_dataclass_with_plain_dict():
    report = host_report("/nonexistent/kvm")
    assert isinstance(report, HostReport)
    json.dumps(report.to_dict())


def test_decode_bits():
    assert decode_bits(3, GuestMemfdFlag) == ["MMAP", "INIT_SHARED"]
    assert decode_bits(0x13, GuestMemfdFlag) == ["MMAP", "INIT_SHARED", "0x10"]
    assert decode_bits(0b11, VmType) == ["DEFAULT", "SW_PROTECTED"]
    assert decode_bits(0, GuestMemfdFlag) == []


def test_info_names_the_host_model_profile(capsys, monkeypatch):
    """``guestmem info`` says which profile ``profile="host"`` picks here and why."""
    from guestmem.model.profile import host_profile

    monkeypatch.setenv("GUESTMEM_KVM_DEVICE", "/nonexistent/kvm")  # the choice does not need KVM
    name, why = host_profile()
    data = run_info_json(capsys)
    assert (data["model_profile"], data["model_profile_reason"]) == (name, why)
    assert os.uname().release in why
    assert main(["info"]) == 0
    assert f"{name}:" in capsys.readouterr().out
