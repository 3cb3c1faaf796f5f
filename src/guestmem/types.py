"""Value types shared by both backends: registers, exits, file status.

Both ``guestmem.kvm`` and ``guestmem.model`` take and return these frozen, slotted
dataclasses; ctypes never crosses this line (the kvm backend converts each struct in one
place, at its ioctl call). Field names keep the uapi names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, dataclass_transform

from .uapi import PAGE_SHIFT, PAGE_SIZE, MemFlag

_T = TypeVar("_T")


def page_aligned(value: int) -> bool:
    """True if ``value`` is a multiple of the 4 KiB page size."""
    return value & (PAGE_SIZE - 1) == 0


@dataclass_transform(frozen_default=True)
def _frozen(cls: type[_T]) -> type[_T]:
    """``@dataclass(frozen=True, slots=True)``, spelled so that type checkers see a dataclass."""
    return dataclasses.dataclass(frozen=True, slots=True)(cls)

_HEX_FIELDS = frozenset({"port", "phys_addr", "gpa", "args", "ret", "flags"})


def _hex_repr(self: object) -> str:
    """A dataclass repr with addresses, ports, sizes and hypercall values in hex."""
    def fmt(name: str, value: object) -> str:
        if name in _HEX_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            return hex(value)
        if name in _HEX_FIELDS and isinstance(value, tuple):
            return "(" + ", ".join(hex(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        return repr(value)

    fields = ", ".join(f"{f.name}={fmt(f.name, getattr(self, f.name))}" for f in dataclasses.fields(self))  # type: ignore[arg-type]
    return f"{type(self).__name__}({fields})"

# --- registers ---------------------------------------------------------------------------------


@_frozen
class Regs:
    """struct kvm_regs."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    def replace(self, **changes: int) -> "Regs":
        return dataclasses.replace(self, **changes)


@_frozen
class Segment:
    """struct kvm_segment."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the uapi field name
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def replace(self, **changes: int) -> "Segment":
        return dataclasses.replace(self, **changes)


@_frozen
class DTable:
    """struct kvm_dtable."""

    base: int = 0
    limit: int = 0xFFFF


@_frozen
class Sregs:
    """struct kvm_sregs (interrupt_bitmap as a 4-tuple of u64)."""

    cs: Segment = Segment(type=11)
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment(type=11, s=0)
    ldt: Segment = Segment(type=2, s=0)
    gdt: DTable = DTable()
    idt: DTable = DTable()
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    def replace(self, **changes: Any) -> "Sregs":
        return dataclasses.replace(self, **changes)


# --- CPUID and MSRs ---------------------------------------------------------------------------


@_frozen
class CpuidEntry:
    """struct kvm_cpuid_entry2 (``flags``: uapi.CpuidFlag)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


# --- FPU, XSAVE, XCRs, debug registers, events, LAPIC -------------------------------------------


@_frozen
class Fpu:
    """struct kvm_fpu: ``fpr`` 8 x87 registers and ``xmm`` 16 SSE registers, 16 bytes each."""

    fpr: tuple[bytes, ...] = (bytes(16),) * 8
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: tuple[bytes, ...] = (bytes(16),) * 16
    mxcsr: int = 0x1F80

    def replace(self, **changes: object) -> "Fpu":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@_frozen
class Xsave:
    """struct kvm_xsave: the XSAVE area (4096 bytes, more from KVM_GET_XSAVE2 with dynamic features)."""

    region: bytes

    @property
    def xstate_bv(self) -> int:
        """XSTATE_BV of the XSAVE header (bytes 512..519): which components hold state."""
        return int.from_bytes(self.region[512:520], "little")


@_frozen
class Xcr:
    """struct kvm_xcr: extended control register ``xcr`` (0 = XCR0) and its ``value``."""

    xcr: int
    value: int


@_frozen
class DebugRegs:
    """struct kvm_debugregs (``db`` is DR0-DR3)."""

    db: tuple[int, int, int, int] = (0, 0, 0, 0)
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400
    flags: int = 0


@_frozen
class ExceptionEvent:
    """kvm_vcpu_events.exception."""

    injected: int = 0
    nr: int = 0
    has_error_code: int = 0
    pending: int = 0
    error_code: int = 0


@_frozen
class InterruptEvent:
    """kvm_vcpu_events.interrupt."""

    injected: int = 0
    nr: int = 0
    soft: int = 0
    shadow: int = 0


@_frozen
class NmiEvent:
    """kvm_vcpu_events.nmi."""

    injected: int = 0
    pending: int = 0
    masked: int = 0
    pad: int = 0


@_frozen
class SmiEvent:
    """kvm_vcpu_events.smi."""

    smm: int = 0
    pending: int = 0
    smm_inside_nmi: int = 0
    latched_init: int = 0


@_frozen
class TripleFaultEvent:
    """kvm_vcpu_events.triple_fault."""

    pending: int = 0


@_frozen
class VcpuEvents:
    """struct kvm_vcpu_events (``flags``: uapi.VcpuEventValid; ``reserved`` is not carried)."""

    exception: ExceptionEvent = ExceptionEvent()
    interrupt: InterruptEvent = InterruptEvent()
    nmi: NmiEvent = NmiEvent()
    sipi_vector: int = 0
    flags: int = 0
    smi: SmiEvent = SmiEvent()
    triple_fault: TripleFaultEvent = TripleFaultEvent()
    exception_has_payload: int = 0
    exception_payload: int = 0

    def replace(self, **changes: object) -> "VcpuEvents":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@_frozen
class LapicState:
    """struct kvm_lapic_state: the 1 KiB local APIC register page (register n at byte n*16)."""

    regs: bytes

    def register(self, offset: int) -> int:
        """The 32-bit register at byte ``offset`` (e.g. 0x20 = APIC ID, 0x30 = version)."""
        return int.from_bytes(self.regs[offset:offset + 4], "little")


# --- memslots, dirty log, binary stats ------------------------------------------------------------


@_frozen
class MemoryRegion:
    """A memslot as the last successful KVM_SET_USER_MEMORY_REGION{,2} left it.

    The kernel has no GET for memslots: both backends keep this shadow (``Vm.memslots()``),
    as a VMM does. ``slot`` is ``as_id << 16 | id``; ``guest_memfd`` is the fd number the call
    passed (0 without KVM_MEM_GUEST_MEMFD); ``gmem_only`` says the slot's shared faults are
    served by its guest_memfd too (a file created with GUEST_MEMFD_FLAG_MMAP, 6.18).
    """

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int = 0
    gmem_only: bool = False

    @property
    def id(self) -> int:
        return self.slot & 0xFFFF

    @property
    def as_id(self) -> int:
        return self.slot >> 16

    @property
    def base_gfn(self) -> int:
        return self.guest_phys_addr >> PAGE_SHIFT

    @property
    def npages(self) -> int:
        return self.memory_size >> PAGE_SHIFT

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def pgoff(self) -> int:
        """The first guest_memfd page of a gmem slot."""
        return self.guest_memfd_offset >> PAGE_SHIFT

    @property
    def is_gmem(self) -> bool:
        return bool(self.flags & MemFlag.GUEST_MEMFD)



def bitmap_runs(bitmap: bytes, nbits: int) -> list[tuple[int, int]]:
    """Runs ``(first, end)`` of set bits among the first ``nbits`` of a little-endian bitmap
    (KVM's dirty-log layout), found a run at a time, not a bit at a time."""
    n = int.from_bytes(bitmap, "little") & ((1 << nbits) - 1)
    out = []
    while n:
        lo = (n & -n).bit_length() - 1
        m = n >> lo
        length = ((m ^ (m + 1)) >> 1).bit_length()
        out.append((lo, lo + length))
        n &= ~(((1 << length) - 1) << lo)
    return out


@_frozen
class DirtyLog:
    """KVM_GET_DIRTY_LOG's bitmap of memslot ``slot``: bit n (little-endian u64 words, as the
    kernel writes them) is page n of the slot, set if the guest wrote it since the last call."""

    slot: int
    npages: int
    bitmap: bytes

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """Runs ``(first_page, end_page)`` of dirty pages, in slot page numbers."""
        return tuple(bitmap_runs(self.bitmap, self.npages))

    def pages(self) -> int:
        """How many pages are dirty."""
        return (int.from_bytes(self.bitmap, "little") & ((1 << self.npages) - 1)).bit_count()


@_frozen
class DirtyGfn:
    """One harvested entry of a vCPU's dirty ring (struct kvm_dirty_gfn): page ``offset`` of
    memslot ``slot`` (as_id << 16 | id) was written."""

    slot: int
    offset: int


@_frozen
class StatsDesc:
    """One descriptor of a binary stats fd (struct kvm_stats_desc and its name).

    ``flags`` packs type (``uapi.StatsType``), unit (``uapi.StatsUnit``) and base
    (``uapi.StatsBase``); the value is
    ``raw * base ** exponent`` in ``unit``.
    """

    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type(self) -> int:
        return self.flags & 0xF

    @property
    def unit(self) -> int:
        return (self.flags >> 4) & 0xF

    @property
    def base(self) -> int:
        return (self.flags >> 8) & 0xF


@_frozen
class Stats:
    """A read of a binary stats fd (KVM_GET_STATS_FD): the id string, the descriptors and,
    per descriptor, its ``size`` u64 values (histograms have more than one)."""

    id: str
    descriptors: tuple[StatsDesc, ...]
    values: tuple[tuple[int, ...], ...]

    def __getitem__(self, name: str) -> int | tuple[int, ...]:
        """The value of stat ``name`` (a tuple for histograms). :raises KeyError: no such stat."""
        for d, v in zip(self.descriptors, self.values):
            if d.name == name:
                return v[0] if d.size == 1 else v
        raise KeyError(name)

    def as_dict(self) -> dict[str, int | tuple[int, ...]]:
        return {d.name: (v[0] if d.size == 1 else v) for d, v in zip(self.descriptors, self.values)}


# --- file status --------------------------------------------------------------------------------


@_frozen
class FileStat:
    """The fstat(2) fields guest_memfd defines (spec section 2.1)."""

    st_mode: int
    st_ino: int
    st_size: int
    st_blksize: int
    st_blocks: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_mtime_ns: int
    st_ctime_ns: int


@_frozen
class StatFs:
    """The fstatfs(2) fields that tell guest_memfd's filesystem apart (spec 13.1)."""

    f_type: int
    f_bsize: int
    f_namelen: int


# --- vCPU exits ---------------------------------------------------------------------------------


@_frozen
class IoExit:
    """KVM_EXIT_IO. ``data`` holds size*count bytes written by OUT; answer IN with complete_io."""

    __repr__ = _hex_repr

    direction: int
    size: int
    port: int
    count: int
    data: bytes


@_frozen
class MmioExit:
    """KVM_EXIT_MMIO. Answer a read with complete_mmio(data)."""

    __repr__ = _hex_repr

    phys_addr: int
    data: bytes
    len: int
    is_write: bool


@_frozen
class HltExit:
    """KVM_EXIT_HLT."""


@_frozen
class HypercallExit:
    """KVM_EXIT_HYPERCALL. ``args`` are the six hypercall arguments; answer with set_hypercall_ret."""

    __repr__ = _hex_repr

    nr: int
    args: tuple[int, ...]
    ret: int
    flags: int


@_frozen
class MemoryFaultExit:
    """KVM_EXIT_MEMORY_FAULT; KVM_RUN failed with ``errno`` (EFAULT or EHWPOISON)."""

    __repr__ = _hex_repr

    flags: int
    gpa: int
    size: int
    errno: int


@_frozen
class ShutdownExit:
    """KVM_EXIT_SHUTDOWN (triple fault)."""


@_frozen
class InternalErrorExit:
    """KVM_EXIT_INTERNAL_ERROR."""

    suberror: int
    data: tuple[int, ...]


@_frozen
class FailEntryExit:
    """KVM_EXIT_FAIL_ENTRY."""

    hardware_entry_failure_reason: int
    cpu: int


@_frozen
class IntrExit:
    """KVM_RUN returned EINTR (a signal, a kick, or immediate_exit): KVM_EXIT_INTR."""


@_frozen
class UnknownExit:
    """Any exit reason guestmem does not decode."""

    reason: int


Exit = (
    IoExit | MmioExit | HltExit | HypercallExit | MemoryFaultExit | ShutdownExit
    | InternalErrorExit | FailEntryExit | IntrExit | UnknownExit
)
