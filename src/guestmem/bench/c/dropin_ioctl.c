/* Per-ioctl latency of KVM_CHECK_EXTENSION (VM fd) and KVM_GET_REGS (vCPU fd), each call
 * timed alone: usage dropin_ioctl N. Prints "<ioctl> <median ns> <min ns>" per ioctl. Run on
 * /dev/kvm it is the kernel's cost; under `guestmem exec` it is the drop-in's (the C call,
 * the hand-over to the embedded interpreter and the model's method).
 */
#define _GNU_SOURCE
#include "common.h"

static int cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void report(const char *name, uint64_t *t, int n)
{
	qsort(t, n, sizeof(*t), cmp);
	printf("%s %llu %llu\n", name, (unsigned long long)t[n / 2], (unsigned long long)t[0]);
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 10000, kvm;
	int vm = open_vm(&kvm);
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	uint64_t *t = calloc(n, sizeof(*t));
	struct kvm_regs regs;
	for (int i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		if (ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) <= 0)
			die("KVM_CHECK_EXTENSION");
		t[i] = now_ns() - t0;
	}
	report("check_extension", t, n);
	for (int i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
			die("KVM_GET_REGS");
		t[i] = now_ns() - t0;
	}
	report("get_regs", t, n);
	return 0;
}
