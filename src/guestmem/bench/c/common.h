/*
 * What guestmem's C reference programs share: the guest_memfd UAPI (Linux 6.8+, flags from
 * 6.18), defined here because distro kernel headers may predate it, and three helpers.
 * The including program defines _GNU_SOURCE first (die() uses program_invocation_short_name).
 */
#ifndef GUESTMEM_BENCH_COMMON_H
#define GUESTMEM_BENCH_COMMON_H
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
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

/* Report the failed call with errno and exit 1. */
static void die(const char *what)
{
	fprintf(stderr, "%s: %s: %s\n", program_invocation_short_name, what, strerror(errno));
	exit(1);
}

/* A new default-type VM: open /dev/kvm (returned through *kvm) and KVM_CREATE_VM. */
static int open_vm(int *kvm)
{
	*kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (*kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(*kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	return vm;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif
