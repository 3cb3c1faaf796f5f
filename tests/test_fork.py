"""fork(): the child's objects behave like the kernel's, and nothing deadlocks.

The kernel ties a VM to the mm that created it: every VM and vCPU ioctl from another mm
(a forked child) fails with EIO before it does anything (spec 2, "Any ioctl on a VM fd
first checks the calling process"). /dev/kvm ioctls and guest_memfd syscalls have no such
check, so the child can create VMs of its own and use guest_memfds it inherited. Measured
on this host's /dev/kvm by the kvm run of the test below.

The model must also survive a fork taken while another thread is inside one of its calls:
the child gets copies of locks held by threads that do not exist there, and must not wait
on them (``os.register_at_fork`` gives the child fresh locks).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time

import pytest

from guestmem.uapi import Cap
from guestmem.vmm.machine import Machine, boot_region

CHILD_TIMEOUT = 20.0


def _in_child(check) -> dict:
    """Fork; run ``check()`` (returning a JSON-able dict) in the child; return its result.

    The parent kills a child that has not answered within CHILD_TIMEOUT (a deadlock) and
    fails the test instead of hanging.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            os.write(w, json.dumps(check()).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"child error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        pytest.fail(f"the forked child did not finish within {CHILD_TIMEOUT} s (deadlocked)")
    with os.fdopen(r, "rb") as f:
        return json.loads(f.read() or b"{}")


def _outcome(call) -> str:
    try:
        call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def test_a_forked_child_gets_eio_from_the_vm_and_vcpus_while_a_vcpu_runs_in_the_parent(system, backend):
    """A vCPU thread is inside KVM_RUN (a spinning guest) when the process forks. In the
    child: VM and vCPU ioctls fail with EIO at once; /dev/kvm and the inherited
    guest_memfd still work, a VM the child creates works, and closing everything returns."""
    cpl = 3 if backend == "kvm" else 0  # kvm_pvm emulates CPL0 slowly; CPL3 runs natively
    with Machine(system, [boot_region()], vcpus=1) as m:
        m.load_assembly("spin: jmp spin", cpl=cpl)
        vcpu, vm = m.vcpus[0], m.vm
        gmem = m.memory.gmem("boot")  # a shared guest_memfd where the VM offers one (both, here)
        exits = []
        runner = threading.Thread(target=lambda: exits.append(vcpu.run()), daemon=True)
        runner.start()
        time.sleep(0.2)  # let it enter the run
        assert runner.is_alive()

        def check() -> dict:
            out = {
                "vm.check_extension": _outcome(lambda: vm.check_extension(Cap.USER_MEMORY)),
                "vm.create_guest_memfd": _outcome(lambda: vm.create_guest_memfd(1 << 20)),
                "vm.set_user_memory_region": _outcome(lambda: vm.set_user_memory_region(9, 0, 1 << 40, 4096, 0)),
                "vm.create_vcpu": _outcome(lambda: vm.create_vcpu(1)),
                "vcpu.get_regs": _outcome(vcpu.get_regs),
                "vcpu.set_regs": _outcome(lambda: vcpu.set_regs(m.image.regs)),
                "vcpu.run": _outcome(vcpu.run),
                "system.check_extension": _outcome(lambda: system.check_extension(Cap.USER_MEMORY)),
            }
            if gmem is not None:
                out["guest_memfd.punch_hole"] = _outcome(lambda: gmem.punch_hole(1 << 20, 4096))
            child_vm = system.create_vm(0)
            out["child's own vm.check_extension"] = _outcome(lambda: child_vm.check_extension(Cap.USER_MEMORY))
            out["child's own vm.create_guest_memfd"] = _outcome(lambda: child_vm.create_guest_memfd(1 << 20).close())
            child_vm.close()
            out["vcpu.close"] = _outcome(vcpu.close)
            out["vm.close"] = _outcome(vm.close)
            return out

        try:
            seen = _in_child(check)
        finally:
            m.stop()
            runner.join(10)
        assert seen == {
            "vm.check_extension": "EIO", "vm.create_guest_memfd": "EIO", "vm.set_user_memory_region": "EIO",
            "vm.create_vcpu": "EIO", "vcpu.get_regs": "EIO", "vcpu.set_regs": "EIO", "vcpu.run": "EIO",
            "system.check_extension": "ok",
            **({"guest_memfd.punch_hole": "ok"} if gmem is not None else {}),
            "child's own vm.check_extension": "ok", "child's own vm.create_guest_memfd": "ok",
            "vcpu.close": "ok", "vm.close": "ok",
        }
        assert not runner.is_alive() and len(exits) == 1  # the parent's vCPU is unaffected and stops
        assert vm.check_extension(Cap.USER_MEMORY) == 1  # and the parent's VM still works


def test_a_fork_while_another_thread_holds_the_vm_lock_does_not_deadlock_the_child(system, backend):
    """Another thread is inside a VM call when the process forks: it holds the VM's lock (the
    model's, which every VM call and guest_memfd operation takes; the kvm backend's memslot
    shadow lock, taken after each memslot ioctl). The child's copy of that lock would be
    held forever; the child must not wait on it: guest_memfd syscalls, memslots() and
    close() return, VM ioctls answer EIO."""
    with Machine(system, [boot_region()], vcpus=1) as m:
        vm = m.vm
        gmem = m.memory.gmem("boot")
        assert gmem is not None
        lock = vm._lock if backend == "model" else vm._shadow_lock
        inside, leave = threading.Event(), threading.Event()

        def long_call() -> None:
            with lock:  # the state a VM call is in while it works
                inside.set()
                leave.wait(30)

        holder = threading.Thread(target=long_call, daemon=True)
        holder.start()
        assert inside.wait(10)
        try:
            seen = _in_child(lambda: {
                "vm.check_extension": _outcome(lambda: vm.check_extension(Cap.USER_MEMORY)),
                "vm.memslots": _outcome(vm.memslots),
                "guest_memfd.punch_hole": _outcome(lambda: gmem.punch_hole(0, 4096)),
                "guest_memfd.fallocate": _outcome(lambda: gmem.fallocate(1, 0, 4096)),
                "vcpu.close": _outcome(m.vcpus[0].close),
                "guest_memfd.close": _outcome(gmem.close),
                "vm.close": _outcome(vm.close),
            })
        finally:
            leave.set()
            holder.join(10)
        assert seen == {"vm.check_extension": "EIO", "vm.memslots": "ok", "guest_memfd.punch_hole": "ok",
                        "guest_memfd.fallocate": "ok", "vcpu.close": "ok", "guest_memfd.close": "ok",
                        "vm.close": "ok"}
