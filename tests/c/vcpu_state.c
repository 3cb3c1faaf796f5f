/* vCPU state through the kernel's uapi header only: runs on /dev/kvm and under `guestmem exec`.
 * Prints one "ok <step>" line per step; exits non-zero at the first failure, naming it.
 *
 * Steps: KVM_CAP_SYNC_REGS and the kvm_run sync area (bits outside the valid fields are
 * EINVAL, dirty registers are loaded before the guest runs and their bits cleared, valid
 * ones are stored on the way out and agree with KVM_GET_REGS/KVM_GET_SREGS); round trips of
 * KVM_GET/SET_VCPU_EVENTS, _DEBUGREGS, _FPU, _XCRS, _XSAVE; KVM_GET_LAPIC (EINVAL) and KVM_IRQ_LINE (ENXIO)
 * are ENXIO without an in-kernel irqchip and work with one.
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
#include <unistd.h>

#define CHECK(cond, what) do { if (!(cond)) { printf("FAIL %s (errno %d %s)\n", what, errno, strerror(errno)); exit(1); } \
                               printf("ok %s\n", what); } while (0)

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	CHECK(kvm >= 0, "open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	CHECK(vm >= 0, "KVM_CREATE_VM");
	CHECK(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) == KVM_SYNC_X86_VALID_FIELDS,
	      "KVM_CAP_SYNC_REGS: regs, sregs and events");

	/* 16-bit guest at 0: out 0x10, al; out 0x10, al; hlt */
	uint8_t *mem = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(mem != MAP_FAILED, "guest memory");
	const uint8_t code[] = { 0xe6, 0x10, 0xe6, 0x10, 0xf4 };
	memcpy(mem, code, sizeof(code));
	struct kvm_userspace_memory_region r0 = { .slot = 0, .memory_size = 0x10000, .userspace_addr = (uintptr_t)mem };
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r0) == 0, "memslot 0");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	CHECK(vcpu >= 0, "KVM_CREATE_VCPU");
	int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	CHECK(run != MAP_FAILED, "mmap kvm_run");
	struct kvm_sregs sregs;
	CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs) == 0, "KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	CHECK(ioctl(vcpu, KVM_SET_SREGS, &sregs) == 0, "KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = 0, .rflags = 2, .rax = 0x11 };
	CHECK(ioctl(vcpu, KVM_SET_REGS, &regs) == 0, "KVM_SET_REGS");

	/* The sync area. */
	run->kvm_valid_regs = 1u << 3;
	CHECK(ioctl(vcpu, KVM_RUN, 0) < 0 && errno == EINVAL, "kvm_valid_regs outside the valid fields is EINVAL");
	run->kvm_valid_regs = 0;
	run->kvm_dirty_regs = 1u << 4;
	CHECK(ioctl(vcpu, KVM_RUN, 0) < 0 && errno == EINVAL, "kvm_dirty_regs outside the valid fields is EINVAL");
	run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
	run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
	run->s.regs.regs = regs;
	run->s.regs.regs.rax = 0x5a;
	CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_IO, "KVM_RUN with dirty regs: IO exit");
	CHECK(((uint8_t *)run)[run->io.data_offset] == 0x5a, "the guest ran with the dirty RAX");
	CHECK(run->kvm_dirty_regs == 0, "KVM_RUN clears the dirty bit it loaded");
	CHECK(ioctl(vcpu, KVM_GET_REGS, &regs) == 0 && run->s.regs.regs.rip == regs.rip &&
	      run->s.regs.regs.rax == regs.rax, "the stored regs are KVM_GET_REGS's");
	CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs) == 0 && run->s.regs.sregs.cs.selector == sregs.cs.selector &&
	      run->s.regs.sregs.cr0 == sregs.cr0 && run->s.regs.sregs.efer == sregs.efer,
	      "the stored sregs are KVM_GET_SREGS's");
	run->s.regs.regs.rax = 0x77;
	run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
	run->kvm_valid_regs = 0;
	CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_IO &&
	      ((uint8_t *)run)[run->io.data_offset] == 0x77, "dirty regs loaded at the next KVM_RUN");
	CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_HLT, "KVM_RUN: HLT exit");

	/* State round trips: what GET returns, SET takes back, and GET then returns again. */
	struct kvm_vcpu_events ev, ev2;
	CHECK(ioctl(vcpu, KVM_GET_VCPU_EVENTS, &ev) == 0, "KVM_GET_VCPU_EVENTS");
	CHECK(ioctl(vcpu, KVM_SET_VCPU_EVENTS, &ev) == 0, "KVM_SET_VCPU_EVENTS of what GET returned");
	CHECK(ioctl(vcpu, KVM_GET_VCPU_EVENTS, &ev2) == 0 && ev2.exception.nr == ev.exception.nr &&
	      ev2.interrupt.injected == ev.interrupt.injected && ev2.nmi.masked == ev.nmi.masked, "vcpu events round trip");
	ev.exception.nr = 32;
	ev.exception.injected = 1;
	CHECK(ioctl(vcpu, KVM_SET_VCPU_EVENTS, &ev) < 0 && errno == EINVAL, "an exception vector above 31 is EINVAL");

	struct kvm_debugregs dr;
	CHECK(ioctl(vcpu, KVM_GET_DEBUGREGS, &dr) == 0, "KVM_GET_DEBUGREGS");
	dr.db[0] = 0x1000;
	CHECK(ioctl(vcpu, KVM_SET_DEBUGREGS, &dr) == 0, "KVM_SET_DEBUGREGS");
	memset(&dr, 0, sizeof(dr));
	CHECK(ioctl(vcpu, KVM_GET_DEBUGREGS, &dr) == 0 && dr.db[0] == 0x1000, "DR0 reads back");

	struct kvm_fpu fpu;
	CHECK(ioctl(vcpu, KVM_GET_FPU, &fpu) == 0, "KVM_GET_FPU");
	fpu.fcw = 0x27f;
	CHECK(ioctl(vcpu, KVM_SET_FPU, &fpu) == 0, "KVM_SET_FPU");
	memset(&fpu, 0, sizeof(fpu));
	CHECK(ioctl(vcpu, KVM_GET_FPU, &fpu) == 0 && fpu.fcw == 0x27f, "FCW reads back");

	struct kvm_xcrs xcrs;
	CHECK(ioctl(vcpu, KVM_GET_XCRS, &xcrs) == 0 && xcrs.nr_xcrs >= 1 && xcrs.xcrs[0].xcr == 0 &&
	      (xcrs.xcrs[0].value & 1), "KVM_GET_XCRS: XCR0 with x87");
	CHECK(ioctl(vcpu, KVM_SET_XCRS, &xcrs) == 0, "KVM_SET_XCRS of what GET returned");
	xcrs.nr_xcrs = KVM_MAX_XCRS + 1;
	CHECK(ioctl(vcpu, KVM_SET_XCRS, &xcrs) < 0 && errno == EINVAL, "more than KVM_MAX_XCRS is EINVAL");

	static struct kvm_xsave xs;
	CHECK(ioctl(vcpu, KVM_GET_XSAVE, &xs) == 0, "KVM_GET_XSAVE");
	CHECK(ioctl(vcpu, KVM_SET_XSAVE, &xs) == 0, "KVM_SET_XSAVE of what GET returned");

	static struct kvm_lapic_state lapic;
	CHECK(ioctl(vcpu, KVM_GET_LAPIC, &lapic) < 0 && errno == EINVAL, "KVM_GET_LAPIC without an irqchip is EINVAL");
	struct kvm_irq_level irq = { .irq = 4, .level = 1 };
	CHECK(ioctl(vm, KVM_IRQ_LINE, &irq) < 0 && errno == ENXIO, "KVM_IRQ_LINE without an irqchip is ENXIO");

	/* A second VM with an in-kernel irqchip (its vCPU does not run: there HLT stays in the kernel). */
	int vm2 = ioctl(kvm, KVM_CREATE_VM, 0);
	CHECK(vm2 >= 0 && ioctl(vm2, KVM_CREATE_IRQCHIP, 0) == 0, "KVM_CREATE_IRQCHIP");
	int vcpu2 = ioctl(vm2, KVM_CREATE_VCPU, 0);
	CHECK(vcpu2 >= 0, "KVM_CREATE_VCPU with an irqchip");
	CHECK(ioctl(vcpu2, KVM_GET_LAPIC, &lapic) == 0 && (lapic.regs[0x30] & 0xff) != 0, "KVM_GET_LAPIC: a version");
	CHECK(ioctl(vcpu2, KVM_SET_LAPIC, &lapic) == 0, "KVM_SET_LAPIC of what GET returned");
	CHECK(ioctl(vm2, KVM_IRQ_LINE, &irq) == 0, "KVM_IRQ_LINE");

	CHECK(close(vcpu2) == 0 && close(vm2) == 0, "close the irqchip VM");
	CHECK(close(vcpu) == 0 && close(vm) == 0 && close(kvm) == 0, "close");
	printf("done\n");
	return 0;
}
