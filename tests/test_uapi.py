"""Pin the ABI: struct sizes, field offsets and ioctl numbers against include/uapi/linux/kvm.h.

These tests need no /dev/kvm; every expected value is the literal from the header or spec §1.
"""

from __future__ import annotations

import ctypes

import pytest

from guestmem import uapi

SIZES = {
    "kvm_create_guest_memfd": 64,
    "kvm_userspace_memory_region": 32,
    "kvm_userspace_memory_region2": 160,
    "kvm_memory_attributes": 32,
    "kvm_pre_fault_memory": 64,
    "kvm_enable_cap": 104,
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_cpuid2": 8,
    "kvm_cpuid_entry2": 40,
    "kvm_run_exit": 256,
    "kvm_run": 2352,
    "kvm_msr_entry": 16,
    "kvm_msrs": 8,
    "kvm_msr_list": 4,
    "kvm_mp_state": 4,
    "kvm_xcrs": 392,
    "kvm_fpu": 416,
    "kvm_xcr": 16,
    "stat": 144,
    "kvm_lapic_state": 1024,
    "kvm_xsave": 4096,
    "kvm_debugregs": 128,
    "kvm_vcpu_events": 64,
    "kvm_irq_level": 8,
    "kvm_irqfd": 32,
    "kvm_ioeventfd": 64,
    "kvm_dirty_log": 16,
    "kvm_clear_dirty_log": 24,
    "kvm_dirty_gfn": 16,
    "kvm_stats_header": 24,
    "kvm_stats_desc": 16,
    "kvm_sync_regs": 520,
}


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_struct_size(name: str, size: int) -> None:
    assert ctypes.sizeof(getattr(uapi, name)) == size


OFFSETS = {
    "kvm_create_guest_memfd": {"size": 0, "flags": 8, "reserved": 16},
    "kvm_userspace_memory_region": {"slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16, "userspace_addr": 24},
    "kvm_userspace_memory_region2": {
        "slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16, "userspace_addr": 24,
        "guest_memfd_offset": 32, "guest_memfd": 40, "pad1": 44, "pad2": 48,
    },
    "kvm_memory_attributes": {"address": 0, "size": 8, "attributes": 16, "flags": 24},
    "kvm_pre_fault_memory": {"gpa": 0, "size": 8, "flags": 16, "padding": 24},
    "kvm_enable_cap": {"cap": 0, "flags": 4, "args": 8, "pad": 40},
    "kvm_regs": {"rax": 0, "rbx": 8, "rsp": 48, "r8": 64, "r15": 120, "rip": 128, "rflags": 136},
    "kvm_segment": {"base": 0, "limit": 8, "selector": 12, "type": 14, "present": 15, "dpl": 16, "db": 17,
                    "s": 18, "l": 19, "g": 20, "avl": 21, "unusable": 22, "padding": 23},
    "kvm_dtable": {"base": 0, "limit": 8, "padding": 10},
    "kvm_sregs": {"cs": 0, "ds": 24, "ss": 120, "tr": 144, "ldt": 168, "gdt": 192, "idt": 208, "cr0": 224,
                  "cr2": 232, "cr3": 240, "cr4": 248, "cr8": 256, "efer": 264, "apic_base": 272,
                  "interrupt_bitmap": 280},
    "kvm_cpuid_entry2": {"function": 0, "index": 4, "flags": 8, "eax": 12, "ebx": 16, "ecx": 20, "edx": 24, "padding": 28},
    "stat": {"st_ino": 8, "st_mode": 24, "st_size": 48, "st_blksize": 56, "st_mtime": 88},
    "kvm_msr_entry": {"index": 0, "reserved": 4, "data": 8},
    "kvm_xcr": {"xcr": 0, "reserved": 4, "value": 8},
    "kvm_xcrs": {"nr_xcrs": 0, "flags": 4, "xcrs": 8, "padding": 264},
    "kvm_fpu": {"fpr": 0, "fcw": 128, "fsw": 130, "ftwx": 132, "pad1": 133, "last_opcode": 134,
                "last_ip": 136, "last_dp": 144, "xmm": 152, "mxcsr": 408, "pad2": 412},
    "kvm_debugregs": {"db": 0, "dr6": 32, "dr7": 40, "flags": 48, "reserved": 56},
    "kvm_vcpu_events": {"exception": 0, "interrupt": 8, "nmi": 12, "sipi_vector": 16, "flags": 20, "smi": 24,
                        "triple_fault": 28, "reserved": 29, "exception_has_payload": 55, "exception_payload": 56},
    "kvm_vcpu_events_exception": {"injected": 0, "nr": 1, "has_error_code": 2, "pending": 3, "error_code": 4},
    "kvm_vcpu_events_interrupt": {"injected": 0, "nr": 1, "soft": 2, "shadow": 3},
    "kvm_vcpu_events_nmi": {"injected": 0, "pending": 1, "masked": 2, "pad": 3},
    "kvm_vcpu_events_smi": {"smm": 0, "pending": 1, "smm_inside_nmi": 2, "latched_init": 3},
    "kvm_irq_level": {"irq": 0, "level": 4},
    "kvm_irqfd": {"fd": 0, "gsi": 4, "flags": 8, "resamplefd": 12, "pad": 16},
    "kvm_ioeventfd": {"datamatch": 0, "addr": 8, "len": 16, "fd": 20, "flags": 24, "pad": 28},
    "kvm_dirty_log": {"slot": 0, "padding1": 4, "dirty_bitmap": 8},
    "kvm_clear_dirty_log": {"slot": 0, "num_pages": 4, "first_page": 8, "dirty_bitmap": 16},
    "kvm_dirty_gfn": {"flags": 0, "slot": 4, "offset": 8},
    "kvm_stats_header": {"flags": 0, "name_size": 4, "num_desc": 8, "id_offset": 12, "desc_offset": 16,
                         "data_offset": 20},
    "kvm_stats_desc": {"flags": 0, "exponent": 4, "size": 6, "offset": 8, "bucket_size": 12},
    "kvm_sync_regs": {"regs": 0, "sregs": 144, "events": 456},
    "kvm_run": {"request_interrupt_window": 0, "immediate_exit": 1, "padding1": 2, "exit_reason": 8,
                "ready_for_interrupt_injection": 12, "if_flag": 13, "flags": 14, "cr8": 16, "apic_base": 24,
                "exit": 32, "kvm_valid_regs": 288, "kvm_dirty_regs": 296, "s": 304},
}


@pytest.mark.parametrize("name", sorted(OFFSETS))
def test_field_offsets(name: str) -> None:
    struct = getattr(uapi, name)
    assert {f: getattr(struct, f).offset for f in OFFSETS[name]} == OFFSETS[name]


# Offsets inside kvm_run of the exit-union members (spec §1.4), i.e. 32 + member offset.
RUN_EXIT_OFFSETS = {
    ("io", "direction"): 32, ("io", "size"): 33, ("io", "port"): 34, ("io", "count"): 36, ("io", "data_offset"): 40,
    ("mmio", "phys_addr"): 32, ("mmio", "data"): 40, ("mmio", "len"): 48, ("mmio", "is_write"): 52,
    ("hypercall", "nr"): 32, ("hypercall", "args"): 40, ("hypercall", "ret"): 88, ("hypercall", "flags"): 96,
    ("hypercall", "longmode"): 96,
    ("memory_fault", "flags"): 32, ("memory_fault", "gpa"): 40, ("memory_fault", "size"): 48,
    ("internal", "suberror"): 32, ("internal", "ndata"): 36, ("internal", "data"): 40,
    ("fail_entry", "hardware_entry_failure_reason"): 32, ("fail_entry", "cpu"): 40,
}


@pytest.mark.parametrize("member,field", sorted(RUN_EXIT_OFFSETS))
def test_run_exit_member_offsets(member: str, field: str) -> None:
    run = uapi.kvm_run()
    base = ctypes.addressof(run)
    member_obj = getattr(run.exit, member)
    field_addr = ctypes.addressof(member_obj) + getattr(type(member_obj), field).offset
    assert field_addr - base == RUN_EXIT_OFFSETS[(member, field)]


IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_GET_MSR_FEATURE_INDEX_LIST": 0xC004AE0A,
    "KVM_SET_NR_MMU_PAGES": 0xAE44,
    "KVM_GET_NR_MMU_PAGES": 0xAE45,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_SET_TSC_KHZ": 0xAEA2,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_SET_SIGNAL_MASK": 0x4004AE8B,
    "KVM_GET_EMULATED_CPUID": 0xC008AE09,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_IRQ_LINE_STATUS": 0xC008AE67,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_RESET_DIRTY_RINGS": 0xAEC7,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_GET_XSAVE2": 0x9000AECF,
}


@pytest.mark.parametrize("name,value", sorted(IOCTLS.items()))
def test_ioctl_number(name: str, value: int) -> None:
    assert getattr(uapi, name) == value


def test_constants_match_spec() -> None:
    assert (uapi.Cap.USER_MEMORY2, uapi.Cap.MEMORY_FAULT_INFO, uapi.Cap.MEMORY_ATTRIBUTES) == (231, 232, 233)
    assert (uapi.Cap.GUEST_MEMFD, uapi.Cap.VM_TYPES, uapi.Cap.PRE_FAULT_MEMORY, uapi.Cap.GUEST_MEMFD_FLAGS) == (234, 235, 236, 244)
    assert (uapi.Cap.NR_MEMSLOTS, uapi.Cap.EXIT_HYPERCALL, uapi.Cap.MULTI_ADDRESS_SPACE) == (10, 201, 118)
    assert (int(uapi.SyncRegs.REGS), int(uapi.SyncRegs.SREGS), int(uapi.SyncRegs.EVENTS)) == (1, 2, 4)
    assert uapi.KVM_SYNC_X86_VALID_FIELDS == 7
    assert uapi.MemFlag.GUEST_MEMFD == 4 and uapi.MemFlag.READONLY == 2 and uapi.MemFlag.LOG_DIRTY_PAGES == 1
    assert uapi.GuestMemfdFlag.MMAP == 1 and uapi.GuestMemfdFlag.INIT_SHARED == 2
    assert uapi.MemoryAttribute.PRIVATE == 8 and uapi.MemoryExitFlag.PRIVATE == 8
    assert uapi.ExitReason.MEMORY_FAULT == 39 and uapi.ExitReason.HYPERCALL == 3 and uapi.ExitReason.SHUTDOWN == 8
    assert uapi.VmType.SW_PROTECTED == 1 and uapi.VmType.TDX == 5
    assert uapi.Hypercall.MAP_GPA_RANGE == 12 and uapi.KvmHypercallError.ENOSYS == 1000
    assert uapi.Falloc.PUNCH_HOLE | uapi.Falloc.KEEP_SIZE == 3 and uapi.Falloc.WRITE_ZEROES == 0x80
    assert uapi.Errno.EHWPOISON == 133 and uapi.Errno.ENOTTY == 25 and uapi.Errno.ESPIPE == 29
    assert uapi.KVM_USER_MEM_SLOTS == 32764 and uapi.KVM_MEM_MAX_NR_PAGES == 2**31 - 1
    assert uapi.KVM_EXIT_HYPERCALL_VALID_MASK == 0x1000 and uapi.KVM_ADDRESS_SPACE_NUM == 2
    assert (uapi.StatsType.LOG_HIST, uapi.StatsUnit.SECONDS, uapi.StatsUnit.BOOLEAN, uapi.StatsBase.POW2) == (4, 2, 4, 1)
