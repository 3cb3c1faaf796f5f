"""vmm with in-place conversion: one guest_memfd per private-capable region, conversions through
the file, EAGAIN from the VMM's own pins released and retried, host memory reported.

Model-only (profile "next"): no kernel has the in-place series; on this host's kernel the
layout is refused with EOPNOTSUPP (tested on the kvm backend when /dev/kvm exists).
"""

from __future__ import annotations

import errno
import json

import pytest

import guestmem
from guestmem.cli import main
from guestmem.uapi import KvmHypercallError, MapGpaRangeAttr, VmType
from guestmem import workloads
from guestmem.vmm import job
from guestmem.vmm.conversion import ConversionManager
from guestmem.vmm.machine import boot_region
from guestmem.vmm.layout import Region
from guestmem.vmm.memory import GuestMemory

from probe import touch

MiB = 1 << 20
DATA = 1 << 32
P = 4096
ENC = int(MapGpaRangeAttr.ENCRYPTED)


class RecordingVcpu:
    vcpu_id = 0
    ret: int | None = None

    def set_hypercall_ret(self, value: int) -> None:
        self.ret = value


def hc(gpa: int, npages: int, attrs: int):
    from guestmem.types import HypercallExit

    return HypercallExit(nr=12, args=(gpa, npages, attrs, 0, 0, 0), ret=0, flags=1)


@pytest.fixture
def nxt():
    with guestmem.open_system("model", profile="next") as s:
        yield s


@pytest.fixture
def inplace(nxt):
    vm = nxt.create_vm(VmType.SW_PROTECTED)
    mem = GuestMemory(vm, [boot_region(), Region("data", DATA, 8 * MiB, private=True)])
    yield mem
    mem.close()
    vm.close()


def test_auto_picks_in_place_with_one_guest_memfd_as_the_host_view(inplace):
    mem = inplace
    assert mem.conversion == "in-place" and mem.snapshot().backings == ("gmem", "gmem-inplace")
    gmem = mem.gmem("data")
    slot = next(s for s in mem.slots if s.region == "data")
    assert slot.userspace_addr == mem.shared_mapping("data").address  # the guest_memfd's own mapping
    mem.write(DATA + P, b"shared")
    assert gmem.stats()["pages_allocated"] == 1 and mem.host_memory()["memfd"] == 0


def test_conversion_goes_through_the_file_and_keeps_one_backing(inplace):
    mem, vcpu = inplace, RecordingVcpu()
    cm = ConversionManager(mem)
    mem.write(DATA, b"x" * P)
    assert cm.handle_hypercall(vcpu, hc(DATA, 512, ENC)) == 0
    gmem = mem.gmem("data")
    assert gmem.stats()["pages_private"] == 512 and cm.stats.discarded_bytes == 0
    assert mem.host_memory()["guest_memfd"] == P  # nothing punched, nothing allocated twice
    with pytest.raises(OSError) as info:
        mem.read(DATA, P)  # the host view of a private page would SIGBUS: refused instead
    assert info.value.errno == errno.EFAULT
    assert touch(mem.shared_mapping("data"), 0) == "SIGBUS"
    assert cm.handle_hypercall(vcpu, hc(DATA, 512, 0)) == 0
    assert mem.read(DATA, 1) == b"x"  # in place: the data is still there


def test_eagain_from_a_vmm_pin_releases_it_and_retries(inplace):
    mem, vcpu = inplace, RecordingVcpu()
    cm = ConversionManager(mem)
    released = []
    pin = mem.pin(DATA + 3 * P, 2 * P, on_release=lambda: released.append(True))
    assert cm.handle_hypercall(vcpu, hc(DATA, 16, ENC)) == 0
    assert released == [True] and mem.is_private(DATA, 16 * P)
    assert (cm.stats.eagain_retries, cm.stats.pins_released) == (1, 1)
    pin.release()  # already dropped: idempotent
    assert mem.gmem("data").stats()["pins"] == 0
    assert cm.handle_hypercall(vcpu, hc(DATA, 16, 0)) == 0
    mem.pin(DATA + 8 * P, P), mem.pin(DATA + 10 * P, P)
    assert cm.handle_hypercall(vcpu, hc(DATA, 16, ENC)) == 0
    assert (cm.stats.eagain_retries, cm.stats.pins_released) == (2, 3)  # counted over conversions


def test_eagain_from_a_reference_outside_the_vmm_fails_and_is_reported(inplace):
    mem, vcpu = inplace, RecordingVcpu()
    cm = ConversionManager(mem)
    foreign = mem.gmem("data").pin(5 * P, P)  # not taken through GuestMemory: the VMM cannot drop it
    assert cm.handle_hypercall(vcpu, hc(DATA, 16, ENC)) == -KvmHypercallError.EFAULT
    assert cm.stats.failed == 1 and cm.stats.errors == {"KVM_EFAULT": 1}
    assert mem.is_private(DATA, 16 * P) is False  # map unchanged, like the file
    with pytest.raises(BlockingIOError) as info:
        mem.set_attributes(DATA, 16 * P, True)
    assert info.value.error_offset == 5 * P and any("outside this VMM" in n for n in info.value.__notes__)
    foreign.release()
    assert cm.handle_hypercall(vcpu, hc(DATA, 16, ENC)) == 0


def test_two_backings_stays_available_on_a_vm_level_profile(model_system):
    vm = model_system.create_vm(VmType.SW_PROTECTED)
    mem = GuestMemory(vm, [Region("data", DATA, 4 * MiB, private=True)])
    assert mem.conversion == "two-backings" and mem.snapshot().backings == ("gmem+memfd",)
    with pytest.raises(OSError) as info:
        GuestMemory(vm, [Region("d2", 2 * DATA, 4 * MiB, private=True)], conversion="in-place")
    assert info.value.errno == errno.EOPNOTSUPP
    with pytest.raises(ValueError):
        GuestMemory(vm, [Region("d3", 3 * DATA, 4 * MiB, private=True)], conversion="sideways")
    mem.close()


def test_in_place_layout_is_refused_on_this_kernel(kvm_system):
    vm = kvm_system.create_vm(0)
    with pytest.raises(OSError) as info:
        GuestMemory(vm, [Region("data", DATA, 4 * MiB, private=True)], conversion="in-place")
    assert info.value.errno == errno.EOPNOTSUPP
    vm.close()


@pytest.mark.parametrize("vcpus", [1, 3])
def test_conversions_workload_in_place_loses_no_data(vcpus):
    r = job.run_workload(workloads.get("conversions", iterations=3), backend="model", vcpus=vcpus,
                         conversion="in-place")
    w = r.workload_results
    assert r.ok and r.conversion == "in-place" and "profile next" in r.backend_reason
    assert w["mismatches"] == 0 and w["iterations_done"] == 3 * vcpus
    assert w["private_refused"] == 3 * 3 * vcpus  # every private check met a refusing host view
    assert r.host_memory["memfd"] == 0 and r.host_memory["guest_memfd"] > 0
    assert r.host_memory["total"] == sum(r.host_memory[k] for k in ("rss_anon", "memfd", "guest_memfd"))


def test_cli_both_layouts_side_by_side(capsys):
    assert main(["run", "--conversion", "both", "--iterations", "2", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["conversion"] for r in runs] == ["in-place", "two-backings"]
    assert runs[0]["host_memory"]["memfd"] == 0 and runs[1]["host_memory"]["memfd"] > 0
    assert main(["run", "--conversion", "both", "--iterations", "1"]) == 0
    out = capsys.readouterr().out
    assert "host memory by conversion layout" in out and "guest memory" in out
    assert "inherits the earlier one's heap" in " ".join(out.split())  # the shared-process caveat is stated
