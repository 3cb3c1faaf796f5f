"""Concurrency on the model with real x86 guest code: conversions, guest writes and host punches.

Model-only: private memory (KVM_SET_MEMORY_ATTRIBUTES) does not exist on this host's KVM.

Four vCPU threads each own 16 pages of one SW_PROTECTED VM's gmem slot. Every iteration a
vCPU converts its range to private (MAP_GPA_RANGE; the host sets the attribute, no
fallocate), checks it, fills it with a fresh pattern and checks again; then converts it to
shared, checks the shared backing still holds its previous shared pattern, fills and
checks, and asks the host to verify its view of the shared backing. Meanwhile the host
thread punches random page ranges of the whole gmem, whatever their state.

What must hold (spec 3.2, 4, 6.1, 6.2):
- private pages read the vCPU's last private pattern or zero (a punch gives a fresh zero
  page), never anything else: no stale page after a punch, no other vCPU's data;
- shared pages are never touched by gmem punches: the shared backing holds exactly what was
  last written, for guest and host;
- no memory-fault exit (every GPA's attribute matches its access), no deadlock: every
  thread finishes within the join timeout.
Guest-side mismatches are reported on PORT_FAIL with a check id, the address and the value.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from model_guests import PAGE, PRIVATE, SW, Machine

from guestmem.guest import PORT_DONE, PORT_FAIL, PORT_SYNC
from guestmem.types import HypercallExit, IoExit
from guestmem.uapi import Hypercall

GPA = 1 << 32
NR_VCPUS = 4
NPAGES = 16
REGION = NPAGES * PAGE
NQWORDS = REGION // 8
ITERATIONS = 25
TO_PRIVATE, TO_SHARED = 1, 2  # this test's own MAP_GPA_RANGE attribute values
JOIN_TIMEOUT = 30
CHECKS = {
    1: "private range holds neither the last private pattern nor zero",
    2: "private range, after the fill, holds neither the new pattern nor zero",
    3: "shared range lost the last shared pattern",
    4: "shared range does not hold the new pattern after the fill",
    5: "MAP_GPA_RANGE returned an error",
}

# RDI = base GPA, RSI = vCPU index. RBP = this iteration's pattern (index << 32 | iteration),
# R12 = last private pattern, R9 = last shared pattern (both memories start zero).
GUEST = f"""
    mov r15, rdi
    mov r14, rsi
    shl r14, 32
    xor r13, r13
    xor r12, r12
    xor r9, r9
iter:
    inc r13
    mov rbp, r14
    or rbp, r13
    mov edx, {TO_PRIVATE}
    call convert
    mov r10, r12
    xor r11, r11
    mov r8d, 1
    call check
    mov rax, rbp
    call fill
    mov r10, rbp
    mov r8d, 2
    call check
    mov r12, rbp
    mov edx, {TO_SHARED}
    call convert
    mov r10, r9
    mov r11, r9
    mov r8d, 3
    call check
    mov rax, rbp
    call fill
    mov r10, rbp
    mov r11, rbp
    mov r8d, 4
    call check
    mov r9, rbp
    mov rdi, rbp
    mov eax, {PORT_SYNC}
    out {PORT_SYNC}, eax
    cmp r13, {ITERATIONS}
    jne iter
    mov eax, 0
    out {PORT_DONE}, eax
done: jmp done

convert:
    mov eax, {int(Hypercall.MAP_GPA_RANGE)}
    mov rbx, r15
    mov ecx, {NPAGES}
    vmcall
    test rax, rax
    jnz convert_fail
    ret
convert_fail:
    mov rsi, rax
    mov r8d, 5
    jmp report

fill:
    mov rdi, r15
    mov ecx, {NQWORDS}
    rep stosq
    ret

check:
    mov rdi, r15
    mov ecx, {NQWORDS}
check_next:
    mov rax, [rdi]
    cmp rax, r10
    je check_ok
    cmp rax, r11
    je check_ok
    mov rsi, rax
    jmp report
check_ok:
    add rdi, 8
    dec ecx
    jnz check_next
    ret

report:
    mov eax, r8d
report_loop:
    out {PORT_FAIL}, eax
    jmp report_loop
"""


def test_four_vcpus_convert_write_verify_while_host_punches(model_system):
    m = Machine(model_system, SW)
    gmem = m.vm.create_guest_memfd(NR_VCPUS * REGION)
    shared = m.add_slot(10, GPA, NR_VCPUS * REGION, gmem)
    vcpus = m.load(GUEST, identity_map=[(GPA, NR_VCPUS * REGION)], vcpus=NR_VCPUS)
    for i, v in enumerate(vcpus):
        v.set_regs(v.get_regs().replace(rdi=GPA + i * REGION, rsi=i))
    errors: list[str] = []
    stop = threading.Event()
    punches = [0]

    def vcpu_thread(i: int, v) -> None:
        try:
            while True:
                ex = v.run()
                if isinstance(ex, HypercallExit):
                    gpa, npages, to = ex.args[:3]
                    assert ex.nr == Hypercall.MAP_GPA_RANGE and (gpa, npages) == (GPA + i * REGION, NPAGES), ex
                    m.vm.set_memory_attributes(gpa, npages * PAGE, PRIVATE if to == TO_PRIVATE else 0)
                    v.set_hypercall_ret(0)
                    continue
                assert isinstance(ex, IoExit), f"vcpu {i}: unexpected exit {ex!r}"
                r = v.get_regs()
                if ex.port == PORT_SYNC:
                    want = r.rdi.to_bytes(8, "little") * NQWORDS
                    assert shared.read(i * REGION, REGION) == want, f"vcpu {i}: host view of shared range"
                elif ex.port == PORT_DONE:
                    return
                else:
                    code = int.from_bytes(ex.data, "little")
                    raise AssertionError(f"vcpu {i}: {CHECKS.get(code, code)}: {r.rsi:#x} at {r.rdi:#x} "
                                         f"(iteration {r.r13}, pattern {r.rbp:#x})")
        except BaseException as exc:  # reported by the main thread
            errors.append(f"{type(exc).__name__}: {exc}")

    def puncher() -> None:
        rng = random.Random(4)
        try:
            while not stop.is_set():
                first = rng.randrange(NR_VCPUS * NPAGES)
                n = rng.randint(1, min(4, NR_VCPUS * NPAGES - first))
                gmem.punch_hole(first * PAGE, n * PAGE)
                punches[0] += 1
                time.sleep(0.0005)
        except BaseException as exc:
            errors.append(f"puncher: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=vcpu_thread, args=(i, v), daemon=True) for i, v in enumerate(vcpus)]
    host = threading.Thread(target=puncher, daemon=True)
    start = time.monotonic()
    host.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, JOIN_TIMEOUT - (time.monotonic() - start)))
    stop.set()
    host.join(timeout=5)
    hung = [i for i, t in enumerate(threads) if t.is_alive()] + (["puncher"] if host.is_alive() else [])
    if hung:
        for v in vcpus:
            v.kick()
        pytest.fail(f"deadlock or runaway: {hung} still running after {JOIN_TIMEOUT} s")
    assert not errors, errors
    assert punches[0] > 0
    m.close()
    gmem.close()
