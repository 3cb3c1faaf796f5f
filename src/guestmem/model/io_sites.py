"""Exact IN/OUT exits for a model vCPU without counting instructions.

Data model. Unicorn (QEMU TCG) checks a stop request only at the start of a translation block,
or before an instruction that carries a ``UC_HOOK_CODE`` hook; a stop requested from the IN/OUT
hook would let the rest of the block run, and writing RIP from that hook does not end the block
either (measured, 2.1.4). So each IN/OUT *site* (linear address of an IN/OUT instruction) gets a
one-instruction code hook on the instruction after it, which makes the stop exact from then on.
The first time a site is seen, ``first_seen`` saves the CPU context and makes every region
read-only (``RegionMap.protect``), so what the rest of the block executes writes no memory (the
next write ends emulation); ``settle``, after the stop, restores the context and the
protections, sets RIP past the IN/OUT, hooks the new site and flushes the translation cache.
Counting instructions (an earlier design) made every instruction pay for a hook call: ~2.7x
slower.

Invariants: ``sites`` grows until ``clear``, which the vCPU calls when the code they were
decoded from may have changed (``code_cache``); a site stays hooked while it is known (and is
re-hooked on a rebuilt engine by ``install``); at most one site is pending between a stop and
``settle``.
All methods run with the vCPU's uc_lock held (inside a hook or around ``emu_start``).
"""

from __future__ import annotations

from .unicorn_cpu import IoInsn, decode_io, unicorn


def _stop_check(uc, address, size, _) -> None:
    """Code hook after an IN/OUT: exists so that Unicorn checks the stop request here."""


class IoSites:
    """The IN/OUT sites of one vCPU: linear address -> its instruction."""

    def __init__(self) -> None:
        self.sites: dict[int, IoInsn] = {}
        self._hooks: dict[int, int] = {}  # site -> handle of its code hook
        self._new: tuple[int, IoInsn] | None = None  # (site, its instruction) first seen in this run
        self._discard = None  # (CPU context at the first-seen site, RIP after it)

    def __len__(self) -> int:
        return len(self.sites)

    def _hook(self, uc, la: int, n: int) -> None:
        self._hooks[la] = uc.hook_add(unicorn().unicorn_const.UC_HOOK_CODE, _stop_check, None, la + n, la + n)

    def install(self, uc) -> None:
        """Hook every known site on a freshly built engine."""
        self._hooks.clear()
        for la, insn in self.sites.items():
            self._hook(uc, la, insn.length)

    def clear(self, uc) -> None:
        """Forget every site and remove its hook (the code they were decoded from changed)."""
        for handle in self._hooks.values():
            uc.hook_del(handle)
        self._hooks.clear()
        self.sites.clear()

    def first_seen(self, uc, la: int, code: bytes | None, regions) -> None:
        """In the IN/OUT hook, for a site not in ``sites``: decode it and fence the rest of its block."""
        if la in self.sites:
            return
        site = decode_io(code) if code else None
        if site is None:
            site = IoInsn(1, False, False)  # cannot happen for a fetched IN/OUT; stay safe
        self._new = (la, site)
        if not site.rep:  # a REP string op ends its block after each iteration anyway
            c = unicorn().unicorn_const
            self._discard = (uc.context_save(), la + site.length)
            regions.protect(uc, c.UC_PROT_READ | c.UC_PROT_EXEC)

    def settle(self, uc, regions, rip_id: int, cs_base) -> bool:
        """After ``emu_start``: undo the rest of a first-seen site's block and hook the site.

        ``cs_base()`` gives the code segment base (real mode) to turn the linear RIP back into
        an offset. Returns True if a block was undone (its engine error, if any, is void).
        """
        undone = False
        if self._discard is not None:
            ctx, after = self._discard
            self._discard = None
            uc.context_restore(ctx)
            regions.protect(uc, unicorn().unicorn_const.UC_PROT_ALL)
            uc.reg_write(rip_id, after - cs_base())
            undone = True
        if self._new is not None:
            la, site = self._new
            self._new = None
            self.sites[la] = site
            self._hook(uc, la, site.length)
            uc.ctl_flush_tb()  # retranslate with the stop check after the site
        return undone
