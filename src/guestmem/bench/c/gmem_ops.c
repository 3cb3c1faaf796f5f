/*
 * gmem_ops: the C reference for guestmem's file-operation benchmark.
 *
 * Times the guest_memfd file operations with raw syscalls, so the Python figures of both
 * guestmem backends can be read against the kernel's own floor:
 *   create        KVM_CREATE_GUEST_MEMFD (1 GiB, flags 0) + close
 *   falloc_4k     fallocate(KEEP_SIZE) of one 4 KiB page that is not yet allocated
 *   punch_4k      PUNCH_HOLE of one allocated 4 KiB page
 *   falloc_1g     fallocate(KEEP_SIZE) of a whole empty 1 GiB file
 *   punch_1g      PUNCH_HOLE of a whole allocated 1 GiB file
 *   bind_unbind   KVM_SET_USER_MEMORY_REGION2 add + delete of a 2 MiB guest_memfd slot
 *                 (MMAP|INIT_SHARED gmem, userspace_addr = the gmem mapping)
 *
 * usage: gmem_ops OPS_PER_SAMPLE SAMPLES
 * output: "OP ns_per_op N" per sample, after one warm-up sample of each op that is not printed
 * (the first touch of fresh host memory on this machine is several times slower).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define GIB (1ul << 30)
#define MIB2 (2ul << 20)
#define PAGE 4096ul

static int gmem_create(int vm, uint64_t size, uint64_t flags)
{
	struct kvm_create_guest_memfd cg = { .size = size, .flags = flags };
	int fd = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &cg);
	if (fd < 0)
		die("KVM_CREATE_GUEST_MEMFD");
	return fd;
}

static void falloc(int fd, int mode, uint64_t off, uint64_t len)
{
	if (fallocate(fd, mode, off, len) < 0)
		die("fallocate");
}

static void report(const char *op, uint64_t t0, long n, int print)
{
	if (print)
		printf("%s ns_per_op %.1f\n", op, (double)(now_ns() - t0) / (double)n);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: gmem_ops OPS_PER_SAMPLE SAMPLES\n");
		return 2;
	}
	long n = atol(argv[1]), samples = atol(argv[2]);
	if (n < 1 || (uint64_t)n * PAGE > GIB) {
		fprintf(stderr, "gmem_ops: OPS_PER_SAMPLE must be in 1..262144\n");
		return 2;
	}
	int kvm;
	int vm = open_vm(&kvm);
	int file = gmem_create(vm, GIB, 0);
	int slotfd = gmem_create(vm, MIB2, GMEM_FLAG_MMAP | GMEM_FLAG_INIT_SHARED);
	void *slotmem = mmap(NULL, MIB2, PROT_READ | PROT_WRITE, MAP_SHARED, slotfd, 0);
	if (slotmem == MAP_FAILED)
		die("mmap gmem");

	for (long s = -1; s < samples; s++) {
		int print = s >= 0;
		uint64_t t0 = now_ns();
		for (long i = 0; i < n; i++)
			close(gmem_create(vm, GIB, 0));
		report("create", t0, n, print);

		t0 = now_ns();
		for (long i = 0; i < n; i++)
			falloc(file, FALLOC_FL_KEEP_SIZE, i * PAGE, PAGE);
		report("falloc_4k", t0, n, print);

		t0 = now_ns();
		for (long i = 0; i < n; i++)
			falloc(file, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, i * PAGE, PAGE);
		report("punch_4k", t0, n, print);

		t0 = now_ns();
		falloc(file, FALLOC_FL_KEEP_SIZE, 0, GIB);
		report("falloc_1g", t0, 1, print);

		t0 = now_ns();
		falloc(file, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, GIB);
		report("punch_1g", t0, 1, print);

		struct kvm_userspace_memory_region2 r = {
			.slot = 1, .flags = KVM_MEM_GUEST_MEMFD, .guest_phys_addr = GIB,
			.userspace_addr = (uint64_t)slotmem, .guest_memfd = slotfd,
		};
		long nb = n < 2000 ? n : 2000; /* memslot updates cost ~100 µs each */
		t0 = now_ns();
		for (long i = 0; i < nb; i++) {
			r.memory_size = MIB2;
			if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r) < 0)
				die("KVM_SET_USER_MEMORY_REGION2 add");
			r.memory_size = 0;
			if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r) < 0)
				die("KVM_SET_USER_MEMORY_REGION2 delete");
		}
		report("bind_unbind", t0, nb, print);
		fflush(stdout);
	}
	return 0;
}
