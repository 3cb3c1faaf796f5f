"""A model vCPU's register cache: KVM_GET/SET_REGS and KVM_GET/SET_SREGS over the engine.

Data model
----------
``VcpuRegisters`` is a mixin of ``vcpu.Vcpu``. While the vCPU runs, its engine
(``unicorn_cpu.Engine``) holds the truth; the vCPU keeps:

* ``_regs`` / ``_sregs``: the last registers read or set, and ``_regs_stale`` /
  ``_sregs_stale``, set after every ``emu_start``: the engine is newer, read it on demand
  (``_read_regs``, ``_read_sregs``). An exit therefore costs a RIP read, not a register
  round trip.
* ``_queued_regs``: register writes (``set_regs``, exit completions, interrupt delivery) by
  name, written in one batch before the next ``emu_start``; ``_read_regs`` lays them over the
  engine's values. ``_next_pc`` is the linear address the next ``emu_start`` begins at.
* ``_sregs_dirty``: ``set_sregs`` happened, so everything is loaded into the engine (rebuilt
  if the CPU mode changed) before the next run (``Vcpu._sync_out``).
* ``_guest_cr2``: CR2 as the guest last saw it; Unicorn clobbers CR2 when it reports an
  exception (``exits.handle_exception``).

``exits`` and ``interrupts`` change registers only through these methods. Everything here
runs under the vCPU's ioctl lock; engine access takes ``uc_lock``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..types import Regs, Sregs
from .unicorn_cpu import MASK, REGS
from .vcpu_checks import check_sregs, encode_regs, encode_sregs

if TYPE_CHECKING:
    import threading

    from .unicorn_cpu import Engine

_REG_FIELDS = REGS + ("rip", "rflags")  # Regs' field order


class VcpuRegisters:
    """The register cache and register ioctls of a model vCPU (mixed into ``vcpu.Vcpu``)."""

    if TYPE_CHECKING:  # provided by vcpu.Vcpu
        uc_lock: threading.Lock
        _ioctl_lock: threading.Lock
        _engine: Engine | None
        _regs: Regs
        _sregs: Sregs
        _mode: str
        _regs_stale: bool
        _sregs_stale: bool
        _sregs_dirty: bool
        _queued_regs: dict[str, int]
        _next_pc: int
        _guest_cr2: int

        def _check(self) -> int: ...

    def _read_regs(self) -> Regs:
        """The registers: Unicorn's if it is newer, with queued writes on top (caller holds _ioctl_lock)."""
        if self._regs_stale:
            with self.uc_lock:
                vals = self._engine.read(self._engine.regs_ids)
            if len(vals) == 18:
                r = Regs(*vals)
            else:
                r = self._regs.replace(**dict(zip(REGS[:8] + ("rip", "rflags"), vals)))
            self._regs = r.replace(**self._queued_regs) if self._queued_regs else r
            self._regs_stale = False
        return self._regs

    def _read_sregs(self) -> Sregs:
        """The special registers, read from Unicorn if it is newer (caller holds _ioctl_lock)."""
        if not self._sregs_stale:
            return self._sregs
        with self.uc_lock:
            self._sregs = self._engine.read_sregs(self._sregs)
        self._sregs_stale = False
        return self._sregs

    def _queue(self, **regs: int) -> None:
        """Change registers for the next run (caller holds _ioctl_lock).

        The writes wait in ``_queued_regs`` until the next ``emu_start``; while the cache is stale
        (Unicorn is newer) they are not read back, ``_read_regs`` lays them over Unicorn's.
        """
        m = MASK[self._mode]
        for name, value in regs.items():
            self._queued_regs[name] = value & m
        if not self._regs_stale:
            r = self._regs  # Regs(*...) rather than dataclasses.replace: ~5x cheaper on this hot path
            self._regs = Regs(*[regs.get(f, getattr(r, f)) for f in _REG_FIELDS])
        if "rip" in regs:
            self._next_pc = self._linear(regs["rip"])

    def _restore_cr2(self) -> None:
        """Give CR2 back the value the guest last saw (an exception the guest never sees
        clobbered it in the engine: ``exits.handle_exception``)."""
        self._set_cr2(self._guest_cr2)

    def _load_selectors(self, loads: list[tuple[str, int]], cpl: int | None = None) -> None:
        """Load segment selectors (("cs", selector), ...) in order, as a far transfer does
        (``interrupts``), and make ``cpl`` the engine's CPL (``hidden_state``: the API's loads
        keep CPL 0). UcError if the engine refuses one; those before it stay loaded."""
        with self.uc_lock:
            eng = self._engine
            for seg, selector in loads:
                eng.load_segment(seg, selector)
            if cpl is not None:
                eng.hidden.set_cpl(cpl)
        self._sregs_stale = True

    def _linear(self, rip: int) -> int:
        return (self._sregs.cs.selector << 4) + (rip & 0xFFFF) if self._mode == "16" else rip

    def _set_cr2(self, value: int) -> None:
        """Write CR2 into the engine and remember it as the guest's (caller holds no uc_lock)."""
        with self.uc_lock:
            self._engine.write_cr2(value)
        self._guest_cr2 = value
        self._sregs_stale = True

    # Every ioctl checks for close() under _ioctl_lock: close() takes that lock before it drops
    # the engine, so a call racing it either completes or fails with EBADF.

    def get_regs(self) -> Regs:
        """KVM_GET_REGS (api.rst 4.11). Errors: EBADF (closed)."""
        with self._ioctl_lock:
            self._check()
            return self._read_regs()

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS (api.rst 4.12); mirrors __set_regs. Only changed registers are written.

        Errors: EBADF (closed); EINVAL for a value that does not fit in a u64 (``vcpu_checks``).
        """
        with self._ioctl_lock:
            self._check()
            regs = encode_regs(regs)
            old = self._read_regs()
            self._queue(**{n: getattr(regs, n) for n in REGS + ("rip", "rflags")
                           if getattr(regs, n) != getattr(old, n)})
            self._regs = regs

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS (api.rst 4.13). Errors: EBADF (closed)."""
        with self._ioctl_lock:
            self._check()
            return self._read_sregs()

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS (api.rst 4.14); mirrors __set_sregs_common's checks (``vcpu_checks``).

        Errors: EBADF (closed); EINVAL for a field too wide for struct kvm_sregs or a state
        KVM refuses (kvm_is_valid_sregs, kvm_set_apic_base). The model takes CR0/CR3/CR4/EFER,
        GDT/IDT bases and selectors from ``sregs``; hidden segment state is Unicorn's flat
        state for the mode (real, 32-bit, 64-bit).
        """
        with self._ioctl_lock:
            self._check()
            sregs = encode_sregs(sregs)
            check_sregs(sregs)
            self._read_regs()
            self._sregs = sregs
            self._sregs_stale = False
            self._sregs_dirty = True
