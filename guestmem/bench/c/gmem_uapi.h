/*
 * The guest_memfd UAPI (Linux 6.8+, flags from 6.18) for guestmem's C reference programs,
 * defined here because distro kernel headers may predate it. Included after <linux/kvm.h>.
 */
#ifndef GUESTMEM_GMEM_UAPI_H
#define GUESTMEM_GMEM_UAPI_H
#include <stdint.h>
#include <linux/kvm.h>

#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd { uint64_t size, flags, reserved[6]; };
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif
#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
	uint32_t slot, flags;
	uint64_t guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset;
	uint32_t guest_memfd, pad1;
	uint64_t pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1u << 2)
#endif
#define GMEM_FLAG_MMAP (1ull << 0)
#define GMEM_FLAG_INIT_SHARED (1ull << 1)

#endif
