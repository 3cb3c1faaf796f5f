"""The KVM userspace ABI as data: constants, flags, struct layouts and ioctl numbers.

Everything here mirrors ``include/uapi/linux/kvm.h`` (x86-64) and the values listed in
section 1 of the guest_memfd spec. This module holds data only: no logic beyond the
``_IOC`` arithmetic and no I/O. Struct layouts are pinned by ``tests/test_uapi.py``.
"""

from __future__ import annotations

import ctypes
import enum

PAGE_SIZE = 4096
PAGE_SHIFT = 12
KVM_API_VERSION = 12

# ---------------------------------------------------------------------------------------------
# Enumerations and flags


class Cap(enum.IntEnum):
    """KVM_CAP_* numbers relevant to guest-first memory."""

    USER_MEMORY = 3
    NR_MEMSLOTS = 10
    READONLY_MEM = 81
    MULTI_ADDRESS_SPACE = 118
    EXIT_HYPERCALL = 201
    USER_MEMORY2 = 231
    MEMORY_FAULT_INFO = 232
    MEMORY_ATTRIBUTES = 233
    GUEST_MEMFD = 234
    VM_TYPES = 235
    PRE_FAULT_MEMORY = 236
    GUEST_MEMFD_FLAGS = 244
    IRQCHIP = 0
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    MAX_VCPUS = 66
    MAX_VCPU_ID = 128
    MP_STATE = 14
    IMMEDIATE_EXIT = 136
    GET_TSC_KHZ = 61
    TSC_CONTROL = 60
    XSAVE = 55
    XCRS = 56
    GET_MSR_FEATURES = 153
    DISABLE_QUIRKS2 = 213
    GUEST_MEMFD_MEMORY_ATTRIBUTES = 250
    """In-place conversion series (not merged): 250 as posted in v8; earlier revisions used
    245/246/249. The model reads its number from ``Profile.gmem_attributes_cap``."""
    IRQ_ROUTING = 25
    IRQ_INJECT_STATUS = 26
    IRQFD = 32
    IOEVENTFD = 36
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    IRQFD_RESAMPLE = 82
    EXT_EMUL_CPUID = 95
    IOEVENTFD_ANY_LENGTH = 122
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    DIRTY_LOG_RING = 192
    BINARY_STATS_FD = 203
    XSAVE2 = 208
    DIRTY_LOG_RING_ACQ_REL = 223
    COALESCED_MMIO = 15
    SET_GUEST_DEBUG = 23
    SET_BOOT_CPU_ID = 34
    ADJUST_CLOCK = 39
    SYNC_REGS = 74
    COALESCED_PIO = 162
    X86_DISABLE_EXITS = 143
    ENFORCE_PV_FEATURE_CPUID = 190
    EXIT_ON_EMULATION_FAILURE = 204
    X86_APIC_BUS_CYCLES_NS = 237


class VmType(enum.IntEnum):
    """KVM_X86_*_VM types accepted by KVM_CREATE_VM."""

    DEFAULT = 0
    SW_PROTECTED = 1
    SEV = 2
    SEV_ES = 3
    SNP = 4
    TDX = 5


class MemFlag(enum.IntFlag):
    """kvm_userspace_memory_region{,2}.flags (KVM_MEM_*)."""

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1
    GUEST_MEMFD = 1 << 2


class GuestMemfdFlag(enum.IntFlag):
    """kvm_create_guest_memfd.flags (GUEST_MEMFD_FLAG_*, 6.18+)."""

    MMAP = 1 << 0
    INIT_SHARED = 1 << 1


class MemoryAttribute(enum.IntFlag):
    """KVM_MEMORY_ATTRIBUTE_*; only PRIVATE exists, bits 0..2 are reserved for RWX."""

    PRIVATE = 1 << 3


class MemoryExitFlag(enum.IntFlag):
    """kvm_run.memory_fault.flags (KVM_MEMORY_EXIT_FLAG_*)."""

    PRIVATE = 1 << 3


class HypercallExitFlag(enum.IntFlag):
    """kvm_run.hypercall.flags (KVM_EXIT_HYPERCALL_*)."""

    LONG_MODE = 1 << 0


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* values of kvm_run.exit_reason."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    MEMORY_FAULT = 39


class IoDirection(enum.IntEnum):
    """kvm_run.io.direction (KVM_EXIT_IO_*)."""

    IN = 0
    OUT = 1


class Hypercall(enum.IntEnum):
    """KVM_HC_* hypercall numbers (guest RAX)."""

    MAP_GPA_RANGE = 12


KVM_EXIT_HYPERCALL_VALID_MASK = 1 << Hypercall.MAP_GPA_RANGE
"""The hypercalls KVM_CAP_EXIT_HYPERCALL can turn into exits on x86 (the cap's value, and the
only bits KVM_ENABLE_CAP accepts)."""


class MapGpaRangeAttr(enum.IntFlag):
    """KVM_MAP_GPA_RANGE_* attribute bits of the MAP_GPA_RANGE hypercall (RDX)."""

    PAGE_SZ_4K = 0
    PAGE_SZ_2M = 1 << 0
    PAGE_SZ_1G = 1 << 1
    DECRYPTED = 0
    ENCRYPTED = 1 << 4


class KvmHypercallError(enum.IntEnum):
    """Guest-visible KVM_E* codes; the hypercall returns their negation in RAX."""

    EPERM = 1
    EFAULT = 14
    EINVAL = 22
    EOPNOTSUPP = 95
    ENOSYS = 1000


class Falloc(enum.IntFlag):
    """fallocate(2) mode bits (FALLOC_FL_*)."""

    ALLOCATE = 0
    KEEP_SIZE = 0x01
    PUNCH_HOLE = 0x02
    NO_HIDE_STALE = 0x04
    COLLAPSE_RANGE = 0x08
    ZERO_RANGE = 0x10
    INSERT_RANGE = 0x20
    UNSHARE_RANGE = 0x40
    WRITE_ZEROES = 0x80


class Errno(enum.IntEnum):
    """x86-64 errno values the guest_memfd ABI uses (spec section 1.3)."""

    EPERM = 1
    ENOENT = 2
    EINTR = 4
    EIO = 5
    EBADF = 9
    EAGAIN = 11
    ENOMEM = 12
    EFAULT = 14
    EEXIST = 17
    ENODEV = 19
    EINVAL = 22
    ENOTTY = 25
    EFBIG = 27
    ESPIPE = 29
    EOPNOTSUPP = 95
    EHWPOISON = 133


# Limits (x86-64)
KVM_MEM_SLOTS_NUM = 32767
KVM_INTERNAL_MEM_SLOTS = 3
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS  # 32764
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_ADDRESS_SPACE_NUM = 2  # x86 with SMM; VMs with private memory have 1
TASK_SIZE_MAX = 0x7FFF_FFFF_F000  # 4-level paging user address space limit
KVM_VCPU_MMAP_PAGES = 3

# Filesystem magic of the anon-inode fs hosting guest_memfd in 6.8..6.18 (inferred).
ANON_INODE_FS_MAGIC = 0x09041934
GUEST_MEMFD_MAGIC = 0x474D454D

# ---------------------------------------------------------------------------------------------
# Struct layouts


class kvm_create_guest_memfd(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("reserved", ctypes.c_uint64 * 6)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    ]


class kvm_memory_attributes(ctypes.Structure):
    _fields_ = [
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _kvm_memory_attributes2_where(ctypes.Union):
    _fields_ = [("offset", ctypes.c_uint64), ("address", ctypes.c_uint64)]


class kvm_memory_attributes2(ctypes.Structure):
    """KVM_SET_MEMORY_ATTRIBUTES2 argument (in-place conversion series, 128 bytes).

    ``offset`` (guest_memfd fd) and ``address`` (VM fd) share the first u64; ``error_offset``
    is written back on EAGAIN.
    """

    _anonymous_ = ("_where",)
    _fields_ = [
        ("_where", _kvm_memory_attributes2_where),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("error_offset", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 11),
    ]


class kvm_pre_fault_memory(ctypes.Structure):
    _fields_ = [
        ("gpa", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("padding", ctypes.c_uint64 * 5),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", ctypes.c_uint32), ("index", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32), ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32), ("padding", ctypes.c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header of the variable-length struct; entries follow it in memory."""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


class kvm_msrs(ctypes.Structure):
    """Header of the variable-length struct; ``nmsrs`` kvm_msr_entry follow it in memory."""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class kvm_msr_list(ctypes.Structure):
    """Header of the variable-length struct; ``nmsrs`` u32 indices follow it in memory."""

    _fields_ = [("nmsrs", ctypes.c_uint32)]


class kvm_signal_mask(ctypes.Structure):
    """Header of the variable-length struct; ``len`` bytes of sigset follow it."""

    _fields_ = [("len", ctypes.c_uint32)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", ctypes.c_uint32)]


class MpState(enum.IntEnum):
    """KVM_MP_STATE_* values of kvm_mp_state.mp_state (x86 uses 0..4)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class CpuidFlag(enum.IntFlag):
    """kvm_cpuid_entry2.flags (KVM_CPUID_FLAG_*)."""

    SIGNIFCANT_INDEX = 1 << 0  # sic: the uapi spelling


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", ctypes.c_uint64 * 16)]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (ctypes.c_uint8 * 16) * 8), ("fcw", ctypes.c_uint16), ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8), ("pad1", ctypes.c_uint8), ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64), ("last_dp", ctypes.c_uint64), ("xmm", (ctypes.c_uint8 * 16) * 16),
        ("mxcsr", ctypes.c_uint32), ("pad2", ctypes.c_uint32),
    ]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    """asm/kvm.h: the local APIC register page."""

    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class kvm_xsave(ctypes.Structure):
    """asm/kvm.h: 4096 bytes of XSAVE area; KVM_GET_XSAVE2 may write more (KVM_CAP_XSAVE2 bytes)."""

    _fields_ = [("region", ctypes.c_uint32 * 1024)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", ctypes.c_uint64 * 4), ("dr6", ctypes.c_uint64), ("dr7", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("reserved", ctypes.c_uint64 * 9)]


class kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [("injected", ctypes.c_uint8), ("nr", ctypes.c_uint8), ("has_error_code", ctypes.c_uint8),
                ("pending", ctypes.c_uint8), ("error_code", ctypes.c_uint32)]


class kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", ctypes.c_uint8), ("nr", ctypes.c_uint8), ("soft", ctypes.c_uint8),
                ("shadow", ctypes.c_uint8)]


class kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", ctypes.c_uint8), ("pending", ctypes.c_uint8), ("masked", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", ctypes.c_uint8), ("pending", ctypes.c_uint8), ("smm_inside_nmi", ctypes.c_uint8),
                ("latched_init", ctypes.c_uint8)]


class kvm_vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", ctypes.c_uint8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception), ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi), ("sipi_vector", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("smi", kvm_vcpu_events_smi), ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", ctypes.c_uint8 * 26), ("exception_has_payload", ctypes.c_uint8),
        ("exception_payload", ctypes.c_uint64),
    ]


class VcpuEventValid(enum.IntFlag):
    """kvm_vcpu_events.flags (KVM_VCPUEVENT_VALID_*)."""

    NMI_PENDING = 1 << 0
    SIPI_VECTOR = 1 << 1
    SHADOW = 1 << 2
    SMM = 1 << 3
    PAYLOAD = 1 << 4
    TRIPLE_FAULT = 1 << 5


class kvm_sync_regs(ctypes.Structure):
    """x86 ``kvm_run.s.regs`` (KVM_CAP_SYNC_REGS): registers KVM_RUN stores (``kvm_valid_regs``)
    and loads (``kvm_dirty_regs``) without a separate ioctl."""

    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class SyncRegs(enum.IntFlag):
    """``kvm_run.kvm_valid_regs`` / ``kvm_dirty_regs`` bits (KVM_SYNC_X86_*)."""

    REGS = 1 << 0
    SREGS = 1 << 1
    EVENTS = 1 << 2


KVM_SYNC_X86_VALID_FIELDS = int(SyncRegs.REGS | SyncRegs.SREGS | SyncRegs.EVENTS)


class kvm_irq_level(ctypes.Structure):
    """``irq`` shares its u32 with ``status`` (KVM_IRQ_LINE_STATUS writes the status back)."""

    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("gsi", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("resamplefd", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 16)]


class IrqfdFlag(enum.IntFlag):
    """kvm_irqfd.flags (KVM_IRQFD_FLAG_*)."""

    DEASSIGN = 1 << 0
    RESAMPLE = 1 << 1


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [("datamatch", ctypes.c_uint64), ("addr", ctypes.c_uint64), ("len", ctypes.c_uint32),
                ("fd", ctypes.c_int32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 36)]


class IoeventfdFlag(enum.IntFlag):
    """kvm_ioeventfd.flags (KVM_IOEVENTFD_FLAG_*; FAST_MMIO has no uapi name, only its bit)."""

    DATAMATCH = 1 << 0
    PIO = 1 << 1
    DEASSIGN = 1 << 2
    VIRTIO_CCW_NOTIFY = 1 << 3


KVM_IOEVENTFD_VALID_FLAG_MASK = (1 << 5) - 1


class kvm_dirty_log(ctypes.Structure):
    """``dirty_bitmap`` is a user pointer (a union with u64 padding2)."""

    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_uint64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("num_pages", ctypes.c_uint32), ("first_page", ctypes.c_uint64),
                ("dirty_bitmap", ctypes.c_uint64)]


KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # asm/kvm.h: the dirty ring's page offset in the vCPU mapping


class kvm_dirty_gfn(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("slot", ctypes.c_uint32), ("offset", ctypes.c_uint64)]


class DirtyGfnFlag(enum.IntFlag):
    """kvm_dirty_gfn.flags (KVM_DIRTY_GFN_F_*)."""

    DIRTY = 1 << 0
    RESET = 1 << 1


class kvm_stats_header(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("name_size", ctypes.c_uint32), ("num_desc", ctypes.c_uint32),
                ("id_offset", ctypes.c_uint32), ("desc_offset", ctypes.c_uint32), ("data_offset", ctypes.c_uint32)]


class kvm_stats_desc(ctypes.Structure):
    """Fixed part of a descriptor; ``name_size`` bytes of NUL-padded name follow it."""

    _fields_ = [("flags", ctypes.c_uint32), ("exponent", ctypes.c_int16), ("size", ctypes.c_uint16),
                ("offset", ctypes.c_uint32), ("bucket_size", ctypes.c_uint32)]


class StatsType(enum.IntEnum):
    """KVM_STATS_TYPE_* (flags & 0xF)."""

    CUMULATIVE = 0
    INSTANT = 1
    PEAK = 2
    LINEAR_HIST = 3
    LOG_HIST = 4


class StatsUnit(enum.IntEnum):
    """KVM_STATS_UNIT_* ((flags >> 4) & 0xF)."""

    NONE = 0
    BYTES = 1
    SECONDS = 2
    CYCLES = 3
    BOOLEAN = 4


class StatsBase(enum.IntEnum):
    """KVM_STATS_BASE_* ((flags >> 8) & 0xF)."""

    POW10 = 0
    POW2 = 1


class stat(ctypes.Structure):
    """x86-64 ``struct stat`` (asm/stat.h), what fstat(2) fills."""

    _fields_ = [
        ("st_dev", ctypes.c_uint64), ("st_ino", ctypes.c_uint64), ("st_nlink", ctypes.c_uint64),
        ("st_mode", ctypes.c_uint32), ("st_uid", ctypes.c_uint32), ("st_gid", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32), ("st_rdev", ctypes.c_uint64), ("st_size", ctypes.c_int64),
        ("st_blksize", ctypes.c_int64), ("st_blocks", ctypes.c_int64),
        ("st_atime", ctypes.c_uint64), ("st_atime_nsec", ctypes.c_uint64),
        ("st_mtime", ctypes.c_uint64), ("st_mtime_nsec", ctypes.c_uint64),
        ("st_ctime", ctypes.c_uint64), ("st_ctime_nsec", ctypes.c_uint64),
        ("unused", ctypes.c_int64 * 3),
    ]


# kvm_run and its exit union members ------------------------------------------------------------


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class kvm_run_hypercall_flags(ctypes.Union):
    _fields_ = [("longmode", ctypes.c_uint32), ("flags", ctypes.c_uint64)]


class kvm_run_hypercall(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("nr", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
        ("ret", ctypes.c_uint64),
        ("u", kvm_run_hypercall_flags),
    ]


class kvm_run_memory_fault(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("gpa", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32), ("data", ctypes.c_uint64 * 16)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("memory_fault", kvm_run_memory_fault),
        ("internal", kvm_run_internal),
        ("fail_entry", kvm_run_fail_entry),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", ctypes.c_uint64),
        ("kvm_dirty_regs", ctypes.c_uint64),
        ("s", ctypes.c_char * 2048),
    ]


# ---------------------------------------------------------------------------------------------
# ioctl numbers (asm-generic/ioctl.h encoding)

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOW(nr: int, struct: type) -> int:
    return _IOC(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _IOR(nr: int, struct: type) -> int:
    return _IOC(_IOC_READ, nr, ctypes.sizeof(struct))


def _IOWR(nr: int, struct: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(0x0A, kvm_msr_list)
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_EMULATED_CPUID = _IOWR(0x09, kvm_cpuid2)
KVM_GET_DIRTY_LOG = _IOW(0x42, kvm_dirty_log)
KVM_SET_NR_MMU_PAGES = _IO(0x44)
KVM_GET_NR_MMU_PAGES = _IO(0x45)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, ctypes.c_uint64)
KVM_SET_USER_MEMORY_REGION2 = _IOW(0x49, kvm_userspace_memory_region2)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, kvm_irq_level)
KVM_IRQ_LINE_STATUS = _IOWR(0x67, kvm_irq_level)
KVM_IRQFD = _IOW(0x76, kvm_irqfd)
KVM_IOEVENTFD = _IOW(0x79, kvm_ioeventfd)
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, kvm_regs)
KVM_SET_REGS = _IOW(0x82, kvm_regs)
KVM_GET_SREGS = _IOR(0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(0x89, kvm_msrs)
KVM_GET_FPU = _IOR(0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(0x8F, kvm_lapic_state)
KVM_SET_SIGNAL_MASK = _IOW(0x8B, kvm_signal_mask)
KVM_SET_CPUID2 = _IOW(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(0xA2, kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(0xA2)
KVM_GET_TSC_KHZ = _IO(0xA3)
KVM_ENABLE_CAP = _IOW(0xA3, kvm_enable_cap)
KVM_GET_XSAVE = _IOR(0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(0xA7, kvm_xcrs)
KVM_CLEAR_DIRTY_LOG = _IOWR(0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _IO(0xC7)
KVM_GET_STATS_FD = _IO(0xCE)
KVM_GET_XSAVE2 = _IOR(0xCF, kvm_xsave)
KVM_SET_MEMORY_ATTRIBUTES = _IOW(0xD2, kvm_memory_attributes)
KVM_SET_MEMORY_ATTRIBUTES2 = _IOWR(0xD2, kvm_memory_attributes2)  # in-place series; gmem fd
KVM_CREATE_GUEST_MEMFD = _IOWR(0xD4, kvm_create_guest_memfd)
KVM_PRE_FAULT_MEMORY = _IOWR(0xD5, kvm_pre_fault_memory)
