/* A guest_memfd VM end to end through the kernel's uapi header only: runs on /dev/kvm and
 * under `guestmem exec`. Prints one "ok <step>" line per step; exits non-zero at the first
 * failure, naming it.
 *
 * Steps: API version and caps; a guest_memfd (fstat size, refused read, fallocate,
 * unaligned punch refused); a 16-bit guest in a plain memslot that reads a byte the host
 * wrote, reports it with OUT, reads a port with IN and stops with HLT; the guest_memfd bound
 * as a second memslot; the same file range refused for a third; close everything.
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
#include <signal.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

/* The guest_memfd uapi (Linux 6.8), for distro headers that predate it. */
#ifndef KVM_CREATE_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
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

#define CHECK(cond, what) do { if (!(cond)) { printf("FAIL %s (errno %d %s)\n", what, errno, strerror(errno)); exit(1); } \
                               printf("ok %s\n", what); } while (0)

static volatile sig_atomic_t alarms;

static void on_alarm(int sig)
{
	(void)sig;
	alarms++;
}

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	CHECK(kvm >= 0, "open /dev/kvm");
	CHECK(ioctl(kvm, KVM_GET_API_VERSION, 0) == KVM_API_VERSION, "KVM_GET_API_VERSION");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	CHECK(vm >= 0, "KVM_CREATE_VM");
	CHECK(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD");
	/* An ioctl no kernel defines: each kind of fd answers as its kvm_*_ioctl default does. */
	CHECK(ioctl(kvm, _IO(KVMIO, 0xff), 0) < 0 && errno == EINVAL, "unknown /dev/kvm ioctl is EINVAL");
	CHECK(ioctl(vm, _IO(KVMIO, 0xff), 0) < 0 && errno == ENOTTY, "unknown VM ioctl is ENOTTY");

	struct kvm_create_guest_memfd cg = { .size = 0x10000 };
	int gmem = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &cg);
	CHECK(gmem >= 0, "KVM_CREATE_GUEST_MEMFD");
	struct stat st;
	CHECK(fstat(gmem, &st) == 0 && st.st_size == 0x10000, "fstat size");
	char byte;
	CHECK(read(gmem, &byte, 1) < 0 && errno == EINVAL, "read refused");
	CHECK(fallocate(gmem, FALLOC_FL_KEEP_SIZE, 0, 0x2000) == 0, "fallocate allocate");
	CHECK(fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 0x1000) == 0, "fallocate punch");
	CHECK(fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 1, 0x1000) < 0 && errno == EINVAL,
	      "unaligned punch is EINVAL");

	/* 16-bit guest at 0: mov al,[0x1000]; out 0x10,al; in al,0x11; mov [0x1001],al; hlt */
	uint8_t *mem = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(mem != MAP_FAILED, "guest memory");
	const uint8_t code[] = { 0xa0, 0x00, 0x10, 0xe6, 0x10, 0xe4, 0x11, 0xa2, 0x01, 0x10, 0xf4 };
	memcpy(mem, code, sizeof(code));
	mem[0x1000] = 0x42;
	struct kvm_userspace_memory_region2 r0 = {
		.slot = 0, .flags = KVM_MEM_LOG_DIRTY_PAGES, .guest_phys_addr = 0, .memory_size = 0x10000,
		.userspace_addr = (uintptr_t)mem };
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r0) == 0, "memslot 0");

	/* Bound through a dup, as the selftests' vm_mem_add does: the same file. */
	int gmem2 = dup(gmem);
	CHECK(gmem2 >= 0 && gmem2 != gmem, "dup of the guest_memfd");
	CHECK(fstat(gmem2, &st) == 0 && st.st_size == 0x10000, "fstat of the dup");
	uint8_t *shared = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct kvm_userspace_memory_region2 r1 = {
		.slot = 1, .flags = KVM_MEM_GUEST_MEMFD, .guest_phys_addr = 0x100000, .memory_size = 0x10000,
		.userspace_addr = (uintptr_t)shared, .guest_memfd = gmem2, .guest_memfd_offset = 0 };
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r1) == 0, "guest_memfd memslot 1 (through the dup)");
	struct kvm_userspace_memory_region2 r2 = r1;
	r2.slot = 2;
	r2.guest_phys_addr = 0x200000;
	/* EINVAL up to Linux 7.1, EEXIST from 7.2 (kvm_gmem_bind) */
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r2) < 0 && (errno == EINVAL || errno == EEXIST),
	      "file range bound twice is refused");

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	CHECK(vcpu >= 0, "KVM_CREATE_VCPU");
	CHECK(ioctl(vcpu, _IO(KVMIO, 0xff), 0) < 0 && errno == EINVAL, "unknown vCPU ioctl is EINVAL");
	int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	CHECK(run != MAP_FAILED, "mmap kvm_run");
	struct kvm_sregs sregs;
	CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs) == 0, "KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.ds.base = 0;
	sregs.ds.selector = 0;
	CHECK(ioctl(vcpu, KVM_SET_SREGS, &sregs) == 0, "KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = 0, .rflags = 2 };
	CHECK(ioctl(vcpu, KVM_SET_REGS, &regs) == 0, "KVM_SET_REGS");

	CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_IO, "KVM_RUN: IO exit");
	CHECK(run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x10 && run->io.size == 1 &&
	      ((uint8_t *)run)[run->io.data_offset] == 0x42, "OUT 0x10 carries the byte the host wrote");
	CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_IO &&
	      run->io.direction == KVM_EXIT_IO_IN && run->io.port == 0x11, "KVM_RUN: IN 0x11");
	((uint8_t *)run)[run->io.data_offset] = 0x99;
	CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_HLT, "KVM_RUN: HLT exit");
	CHECK(mem[0x1001] == 0x99, "the guest stored the byte IN returned");
	CHECK(ioctl(vcpu, KVM_GET_REGS, &regs) == 0 && regs.rip == sizeof(code), "RIP after HLT");
	uint64_t dirty = 0;
	struct kvm_dirty_log log = { .slot = 0, .dirty_bitmap = &dirty };
	CHECK(ioctl(vm, KVM_GET_DIRTY_LOG, &log) == 0 && (dirty & 2), "KVM_GET_DIRTY_LOG: the page the guest wrote");
	CHECK(!(dirty & ~3ull), "KVM_GET_DIRTY_LOG: no page the guest did not write");

	run->immediate_exit = 1;
	run->exit_reason = 0x55;
	CHECK(ioctl(vcpu, KVM_RUN, 0) < 0 && errno == EINTR, "immediate_exit is EINTR");
	CHECK(run->exit_reason == 0x55, "immediate_exit leaves exit_reason alone");

	/* A signal with a handler ends a KVM_RUN that would otherwise never return. */
	run->immediate_exit = 0;
	mem[0x100] = 0xeb; /* jmp $ */
	mem[0x101] = 0xfe;
	regs.rip = 0x100;
	CHECK(ioctl(vcpu, KVM_SET_REGS, &regs) == 0, "KVM_SET_REGS to a spinning guest");
	struct sigaction sa = { .sa_handler = on_alarm };
	sigemptyset(&sa.sa_mask);
	CHECK(sigaction(SIGALRM, &sa, NULL) == 0, "SIGALRM handler");
	struct sigaction back;
	CHECK(sigaction(SIGALRM, NULL, &back) == 0 && back.sa_handler == on_alarm, "sigaction reports the handler");
	struct itimerval it = { .it_value = { .tv_usec = 100000 } };
	CHECK(setitimer(ITIMER_REAL, &it, NULL) == 0, "timer armed");
	CHECK(ioctl(vcpu, KVM_RUN, 0) < 0 && errno == EINTR && run->exit_reason == KVM_EXIT_INTR,
	      "a timer signal ends KVM_RUN with EINTR (KVM_EXIT_INTR)");
	CHECK(alarms == 1, "the program's handler ran once");

	CHECK(munmap(run, size) == 0, "munmap kvm_run");
	CHECK(close(gmem2) == 0 && fallocate(gmem, FALLOC_FL_KEEP_SIZE, 0, 0x1000) == 0, "the file outlives its dup");
	CHECK(close(vcpu) == 0 && close(gmem) == 0 && close(vm) == 0 && close(kvm) == 0, "close");
	printf("done\n");
	return 0;
}
