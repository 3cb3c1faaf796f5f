/*
 * kvm_exit: the C reference for guestmem's exit round-trip benchmark.
 *
 * A 64-bit guest runs "1: out 0x10, al; jmp 1b" and this program answers each KVM_EXIT_IO
 * with nothing but the KVM_RUN ioctl and a check of exit_reason and io.port, which is the
 * least any VMM can do per exit. guestmem's Python run loop is timed against it in the same
 * benchmark run.
 *
 * usage: kvm_exit cpl0|cpl3 anon|gmem EXITS SAMPLES
 * output: "ns_per_exit N" once per sample (after one warm-up sample that is not printed).
 * Exit status 2 on bad usage, 1 on any failed syscall (with the call named on stderr).
 *
 * Guest layout (one 2 MiB slot at GPA 0): PML4 0x1000, PDPT 0x2000, PD 0x3000 (one 2 MiB
 * page, user-accessible so CPL3 works), GDT 0x4000, TSS 0x5000, code 0x10000, stack below
 * 0x1ff000. At CPL3, RFLAGS.IOPL=3 lets the guest execute OUT. The guest_memfd backing uses
 * GUEST_MEMFD_FLAG_MMAP|INIT_SHARED and registers the gmem mapping as userspace_addr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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

#define MEM_SIZE (2ul << 20)
#define CODE_GPA 0x10000ul
#define PORT 0x10

static struct kvm_segment seg(uint16_t sel, int code, int dpl)
{
	struct kvm_segment s = {
		.base = 0, .limit = 0xffffffff, .selector = sel, .present = 1, .dpl = dpl,
		.s = 1, .g = 1, .type = code ? 11 : 3, .l = code, .db = !code,
	};
	return s;
}

static void setup_long_mode(int kvm, int vcpu, uint8_t *mem, int cpl)
{
	uint64_t *pml4 = (uint64_t *)(mem + 0x1000), *pdpt = (uint64_t *)(mem + 0x2000);
	uint64_t *pd = (uint64_t *)(mem + 0x3000), *gdt = (uint64_t *)(mem + 0x4000);
	pml4[0] = 0x2000 | 7;
	pdpt[0] = 0x3000 | 7;
	pd[0] = 0x0 | 0x87; /* 2 MiB page, present, writable, user */
	gdt[1] = 0x00af9a000000ffffull; /* 0x08 code64 DPL0 */
	gdt[2] = 0x00cf92000000ffffull; /* 0x10 data DPL0 */
	gdt[3] = 0x00affa000000ffffull; /* 0x18 code64 DPL3 */
	gdt[4] = 0x00cff2000000ffffull; /* 0x20 data DPL3 */
	gdt[5] = 0x00008b0050000067ull; /* 0x28 TSS at 0x5000 (busy) */
	gdt[6] = 0;

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cr0 = 0x80050033; /* PG WP AM NE ET MP PE */
	sregs.cr3 = 0x1000;
	sregs.cr4 = 0x620; /* PAE OSFXSR OSXMMEXCPT */
	sregs.efer = 0x500; /* LME LMA */
	sregs.gdt.base = 0x4000;
	sregs.gdt.limit = 7 * 8 - 1;
	sregs.cs = cpl ? seg(0x18 | 3, 1, 3) : seg(0x08, 1, 0);
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = cpl ? seg(0x20 | 3, 0, 3) : seg(0x10, 0, 0);
	sregs.tr = (struct kvm_segment){ .base = 0x5000, .limit = 0x67, .selector = 0x28,
					 .type = 11, .present = 1 };
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");

	struct kvm_regs regs = { .rip = CODE_GPA, .rsp = MEM_SIZE - 0x1000,
				 .rflags = 0x2 | (cpl ? 0x3000 : 0) /* IOPL=3 at CPL3 */ };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	int nent = 256;
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = nent;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	free(cpuid);
}

static void run_exits(int vcpu, struct kvm_run *run, long n)
{
	for (long i = 0; i < n; i++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN");
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != PORT) {
			fprintf(stderr, "kvm_exit: unexpected exit %u (port %u)\n", run->exit_reason,
				run->io.port);
			exit(1);
		}
	}
}

int main(int argc, char **argv)
{
	if (argc != 5 || (strcmp(argv[1], "cpl0") && strcmp(argv[1], "cpl3")) ||
	    (strcmp(argv[2], "anon") && strcmp(argv[2], "gmem"))) {
		fprintf(stderr, "usage: kvm_exit cpl0|cpl3 anon|gmem EXITS SAMPLES\n");
		return 2;
	}
	int cpl = !strcmp(argv[1], "cpl3"), gmem = !strcmp(argv[2], "gmem");
	long exits = atol(argv[3]), samples = atol(argv[4]);

	int kvm;
	int vm = open_vm(&kvm);

	uint8_t *mem;
	struct kvm_userspace_memory_region2 region = { .slot = 0, .guest_phys_addr = 0,
						       .memory_size = MEM_SIZE };
	if (gmem) {
		struct kvm_create_guest_memfd cg = { .size = MEM_SIZE,
						     .flags = GMEM_FLAG_MMAP | GMEM_FLAG_INIT_SHARED };
		int gfd = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &cg);
		if (gfd < 0)
			die("KVM_CREATE_GUEST_MEMFD");
		mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, 0);
		region.flags = KVM_MEM_GUEST_MEMFD;
		region.guest_memfd = gfd;
	} else {
		mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	}
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	region.userspace_addr = (uint64_t)mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION2");

	static const uint8_t code[] = { 0xe6, PORT, 0xeb, 0xfc }; /* 1: out 0x10, al; jmp 1b */
	memcpy(mem + CODE_GPA, code, sizeof(code));

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	setup_long_mode(kvm, vcpu, mem, cpl);

	run_exits(vcpu, run, exits < 1000 ? exits : 1000); /* warm-up: first entries are slow */
	for (long s = 0; s < samples; s++) {
		uint64_t t0 = now_ns();
		run_exits(vcpu, run, exits);
		printf("ns_per_exit %.1f\n", (double)(now_ns() - t0) / (double)exits);
		fflush(stdout);
	}
	return 0;
}
