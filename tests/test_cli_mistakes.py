"""Ordinary CLI mistakes end in one line, a non-zero exit and no traceback (through ``main(argv)``),
and are caught before any work starts; with ``--json`` the error is JSON too."""

from __future__ import annotations

import json
import os

import pytest

import guestmem
from guestmem.cli import main

MISTAKES = [
    (["info", "--device", "/dev/null"], 0, "not a KVM device"),  # info reports, it does not fail
    (["run", "touch", "--map", "/nonexistent/dir/map.png"], 2, "directory /nonexistent/dir does not exist"),
    (["run", "touch", "--map", "map.xyz"], 2, "cannot draw .xyz"),
    (["run", "touch", "--memory", "-5M"], 2, "--memory: '-5M' is not a positive size"),
    (["run", "touch", "--memory", "0"], 2, "is not a positive size"),
    (["run", "touch", "--memory", "lots"], 2, "cannot parse size"),
    (["run", "touch", "--iterations", "3"], 2, "only the conversions workload has iterations"),
    (["run", "secret", "--iterations", "3"], 2, "only the conversions workload has iterations"),
    (["run", "nosuch"], 1, "unknown workload 'nosuch'"),
    (["bench", "--plot", "/nonexistent/x.png", "exits"], 2, "directory /nonexistent does not exist"),
    (["bench", "--plot", "x.txt", "exits"], 2, "cannot draw .txt"),
    (["bench", "--json", "/nonexistent/r.json", "exits"], 2, "directory /nonexistent does not exist"),
    (["bench", "nosuch"], 2, "unknown benchmark nosuch"),
]


@pytest.mark.parametrize("argv, code, message", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_mistake_is_one_line_without_traceback(argv, code, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, *(["--backend", "model"] if argv[0] == "run" else [])]) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], err
        assert not os.listdir(tmp_path)  # nothing ran, nothing was written
    else:
        assert message in out


def test_json_run_errors_are_json(capsys):
    assert main(["run", "touch", "--memory", "-1", "--json", "--backend", "model"]) == 2
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert doc["exit_code"] == 2 and "--memory" in doc["error"]


def test_non_kvm_device_is_not_usable_kvm(monkeypatch):
    ok, why = guestmem.kvm_available("/dev/null")
    assert not ok and "not a KVM device" in why
    monkeypatch.setenv("GUESTMEM_KVM_DEVICE", "/dev/null")
    assert guestmem.choose_backend([]).backend == "model"


def test_many_vcpus_get_enough_default_memory(capsys):
    assert main(["run", "--vcpus", "20", "--iterations", "1", "--json", "--backend", "model"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["memory"] >= 20 * (4 << 20)
