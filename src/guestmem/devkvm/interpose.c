/* guestmem drop-in /dev/kvm: the libc entry points a KVM program uses, interposed.
 *
 * Kept in a translation unit of its own, without Python.h, so that open, mmap, fstat...
 * are defined under their own names (Python.h turns on _FILE_OFFSET_BITS=64, which would
 * rename them to their *64 twins). Every wrapper does one cheap test (is the path the KVM
 * device? is the fd one the model handed out?) and otherwise calls the next definition of
 * the symbol (the C library's). A model fd's call goes to gm_open/gm_call, defined by the
 * embedded interpreter (guestmem/devkvm/server.py); they return the result or -errno.
 *
 * The interpreter itself calls these functions while it serves a call (os.open, os.close,
 * ...): a thread-local flag sends those straight to the C library.
 */
#pragma GCC diagnostic ignored "-Wnonnull-compare" /* open(NULL) must reach the C library (EFAULT) */
#undef _FILE_OFFSET_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <signal.h>
#include <unistd.h>

extern long gm_open(const char *path, int flags);
extern long gm_call(int op, int fd, unsigned long a, unsigned long b, unsigned long c,
                    unsigned long d, unsigned long e);

/* Operation numbers shared with server.py (OPS there). */
enum { GM_IOCTL = 1, GM_MMAP, GM_MUNMAP, GM_FALLOCATE, GM_FSTAT, GM_READ, GM_WRITE, GM_PREAD,
       GM_PWRITE, GM_LSEEK, GM_FTRUNCATE, GM_CLOSE, GM_DUP, GM_DUP3 };

#define GM_MAXFD 65536
static unsigned char owned[GM_MAXFD]; /* 1: the fd is served by the model */
static int nmaps;                      /* model mappings that munmap must report */
static __thread int inside;            /* this thread is inside the interpreter */
static __thread int serving_fd = -1;   /* the model fd this thread has a call in progress on */
static int kick_fd = -1;               /* server.py's pipe: a vCPU fd to kick (a signal arrived) */

static int ready;                      /* the interpreter started and attached the server */

void gm_set_ready(void) { ready = 1; }
void gm_set_owned(int fd, int value) { if (fd >= 0 && fd < GM_MAXFD) owned[fd] = (unsigned char)value; }
void gm_set_kick_fd(int fd) { kick_fd = fd; }
void gm_add_maps(int delta) { __atomic_add_fetch(&nmaps, delta, __ATOMIC_SEQ_CST); }

static const char *device(void)
{
	static const char *path;
	if (!path) {
		const char *p = getenv("GUESTMEM_DEVKVM_DEVICE");
		path = p && *p ? p : "/dev/kvm";
	}
	return path;
}

static inline int mine(int fd) { return !inside && fd >= 0 && fd < GM_MAXFD && owned[fd]; }

static long result(long r)
{
	if (r < 0 && r >= -4095) {
		errno = (int)-r;
		return -1;
	}
	return r;
}

static long call(int op, int fd, unsigned long a, unsigned long b, unsigned long c,
                 unsigned long d, unsigned long e)
{
	int saved = errno;
	inside = 1;
	serving_fd = fd;
	long r = gm_call(op, fd, a, b, c, d, e);
	serving_fd = -1;
	inside = 0;
	errno = saved;
	return r;
}

#define NEXT(ret, name, ...) \
	static ret (*next)(__VA_ARGS__); \
	if (!next) next = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, name)

static int open_device(const char *path, int flags, int *fd)
{
	if (inside || !path || strcmp(path, device()) != 0)
		return 0;
	int saved = errno;
	inside = 1;
	long r = gm_open(path, flags);
	inside = 0;
	errno = saved;
	if (!ready) /* the interpreter could not start (it printed why): no device */
		r = -ENXIO;
	*fd = (int)result(r);
	return 1;
}

static mode_t mode_arg(int flags, va_list ap)
{
	return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

#define DEFINE_OPEN(name) \
int name(const char *path, int flags, ...) \
{ \
	va_list ap; va_start(ap, flags); mode_t mode = mode_arg(flags, ap); va_end(ap); \
	int fd; \
	if (open_device(path, flags, &fd)) return fd; \
	NEXT(int, #name, const char *, int, ...); \
	return next(path, flags, mode); \
}
DEFINE_OPEN(open)
DEFINE_OPEN(open64)

#define DEFINE_OPENAT(name) \
int name(int dirfd, const char *path, int flags, ...) \
{ \
	va_list ap; va_start(ap, flags); mode_t mode = mode_arg(flags, ap); va_end(ap); \
	int fd; \
	if ((dirfd == AT_FDCWD || (path && path[0] == '/')) && open_device(path, flags, &fd)) return fd; \
	NEXT(int, #name, int, const char *, int, ...); \
	return next(dirfd, path, flags, mode); \
}
DEFINE_OPENAT(openat)
DEFINE_OPENAT(openat64)

/* _FORTIFY_SOURCE variants */
int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open(path, flags); }
int __openat_2(int dirfd, const char *path, int flags) { return openat(dirfd, path, flags); }
int __openat64_2(int dirfd, const char *path, int flags) { return openat(dirfd, path, flags); }

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap; va_start(ap, request); unsigned long arg = va_arg(ap, unsigned long); va_end(ap);
	if (mine(fd))
		return (int)result(call(GM_IOCTL, fd, request, arg, 0, 0, 0));
	NEXT(int, "ioctl", int, unsigned long, ...);
	return next(fd, request, arg);
}

#define DEFINE_MMAP(name, off_t) \
void *name(void *addr, size_t len, int prot, int flags, int fd, off_t off) \
{ \
	if (!(flags & MAP_ANONYMOUS) && mine(fd)) { \
		long r = result(call(GM_MMAP, fd, (unsigned long)addr, len, (unsigned long)prot, \
		                     (unsigned long)flags, (unsigned long)off)); \
		return r == -1 ? MAP_FAILED : (void *)r; \
	} \
	NEXT(void *, #name, void *, size_t, int, int, int, off_t); \
	return next(addr, len, prot, flags, fd, off); \
}
DEFINE_MMAP(mmap, off_t)
DEFINE_MMAP(mmap64, off64_t)

int munmap(void *addr, size_t len)
{
	if (!inside && __atomic_load_n(&nmaps, __ATOMIC_RELAXED)) {
		long r = call(GM_MUNMAP, -1, (unsigned long)addr, len, 0, 0, 0);
		if (r != 1)
			return (int)result(r);
	}
	NEXT(int, "munmap", void *, size_t);
	return next(addr, len);
}

#define DEFINE_FALLOCATE(name, off_t) \
int name(int fd, int mode, off_t off, off_t len) \
{ \
	if (mine(fd)) \
		return (int)result(call(GM_FALLOCATE, fd, (unsigned long)mode, (unsigned long)off, \
		                        (unsigned long)len, 0, 0)); \
	NEXT(int, #name, int, int, off_t, off_t); \
	return next(fd, mode, off, len); \
}
DEFINE_FALLOCATE(fallocate, off_t)
DEFINE_FALLOCATE(fallocate64, off64_t)

#define DEFINE_FSTAT(name, stat) \
int name(int fd, struct stat *buf) \
{ \
	if (mine(fd)) { \
		long r = call(GM_FSTAT, fd, (unsigned long)buf, 0, 0, 0, 0); \
		if (r != 1) return (int)result(r); \
	} \
	NEXT(int, #name, int, struct stat *); \
	return next(fd, buf); \
}
DEFINE_FSTAT(fstat, stat)
DEFINE_FSTAT(fstat64, stat64)

ssize_t read(int fd, void *buf, size_t n)
{
	if (mine(fd)) return result(call(GM_READ, fd, (unsigned long)buf, n, 0, 0, 0));
	NEXT(ssize_t, "read", int, void *, size_t);
	return next(fd, buf, n);
}

ssize_t write(int fd, const void *buf, size_t n)
{
	if (mine(fd)) return result(call(GM_WRITE, fd, (unsigned long)buf, n, 0, 0, 0));
	NEXT(ssize_t, "write", int, const void *, size_t);
	return next(fd, buf, n);
}

#define DEFINE_PRW(name, op, ptr, off_t) \
ssize_t name(int fd, ptr buf, size_t n, off_t off) \
{ \
	if (mine(fd)) return result(call(op, fd, (unsigned long)buf, n, (unsigned long)off, 0, 0)); \
	NEXT(ssize_t, #name, int, ptr, size_t, off_t); \
	return next(fd, buf, n, off); \
}
DEFINE_PRW(pread, GM_PREAD, void *, off_t)
DEFINE_PRW(pread64, GM_PREAD, void *, off64_t)
DEFINE_PRW(pwrite, GM_PWRITE, const void *, off_t)
DEFINE_PRW(pwrite64, GM_PWRITE, const void *, off64_t)

#define DEFINE_LSEEK(name, off_t) \
off_t name(int fd, off_t off, int whence) \
{ \
	if (mine(fd)) return result(call(GM_LSEEK, fd, (unsigned long)off, (unsigned long)whence, 0, 0, 0)); \
	NEXT(off_t, #name, int, off_t, int); \
	return next(fd, off, whence); \
}
DEFINE_LSEEK(lseek, off_t)
DEFINE_LSEEK(lseek64, off64_t)

#define DEFINE_FTRUNCATE(name, off_t) \
int name(int fd, off_t len) \
{ \
	if (mine(fd)) return (int)result(call(GM_FTRUNCATE, fd, (unsigned long)len, 0, 0, 0, 0)); \
	NEXT(int, #name, int, off_t); \
	return next(fd, len); \
}
DEFINE_FTRUNCATE(ftruncate, off_t)
DEFINE_FTRUNCATE(ftruncate64, off64_t)

int close(int fd)
{
	if (mine(fd)) return (int)result(call(GM_CLOSE, fd, 0, 0, 0, 0, 0));
	NEXT(int, "close", int);
	return next(fd);
}

int dup(int fd)
{
	if (mine(fd)) return (int)result(call(GM_DUP, fd, 0, 0, 0, 0, 0));
	NEXT(int, "dup", int);
	return next(fd);
}

int dup3(int fd, int newfd, int flags)
{
	if (mine(fd) || mine(newfd))
		return (int)result(call(GM_DUP3, fd, (unsigned long)newfd, (unsigned long)flags, 0, 0, 0));
	NEXT(int, "dup3", int, int, int);
	return next(fd, newfd, flags);
}

int dup2(int fd, int newfd)
{
	if (fd == newfd || !(mine(fd) || mine(newfd))) {
		NEXT(int, "dup2", int, int);
		return next(fd, newfd);
	}
	return (int)result(call(GM_DUP3, fd, (unsigned long)newfd, 0, 0, 0, 0));
}

/* Signals. The kernel ends a KVM_RUN with EINTR when a signal with a handler arrives. The
 * model's vCPU runs in this thread, so the program's handlers are wrapped: after the
 * handler ran, a thread that was inside a call on a model fd (KVM_RUN) writes that fd to
 * server.py's kick pipe (write(2) is async-signal safe) and the server kicks the vCPU.
 * sigaction() reports the program's own handlers back to it, never the wrapper.
 */
static struct sigaction user_act[NSIG];
static unsigned char wrapped[NSIG];

static void trampoline(int sig, siginfo_t *info, void *uctx)
{
	int saved = errno;
	struct sigaction *a = &user_act[sig];
	if (a->sa_flags & SA_SIGINFO)
		a->sa_sigaction(sig, info, uctx);
	else if (a->sa_handler != SIG_DFL && a->sa_handler != SIG_IGN)
		a->sa_handler(sig);
	int fd = serving_fd;
	if (fd >= 0 && kick_fd >= 0)
		syscall(SYS_write, kick_fd, &fd, sizeof(fd));
	errno = saved;
}

static int handles(const struct sigaction *act)
{
	if (!act)
		return 0;
	if (act->sa_flags & SA_SIGINFO)
		return act->sa_sigaction != NULL;
	return act->sa_handler != SIG_DFL && act->sa_handler != SIG_IGN;
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
	NEXT(int, "sigaction", int, const struct sigaction *, struct sigaction *);
	if (sig <= 0 || sig >= NSIG || sig == SIGKILL || sig == SIGSTOP)
		return next(sig, act, old);
	struct sigaction prev = user_act[sig], kernel_old;
	int was_wrapped = wrapped[sig], r;
	if (handles(act)) {
		struct sigaction mine = *act;
		mine.sa_flags |= SA_SIGINFO;
		mine.sa_sigaction = trampoline;
		r = next(sig, &mine, &kernel_old);
	} else {
		r = next(sig, act, &kernel_old);
	}
	if (r != 0)
		return r;
	if (act) {
		user_act[sig] = *act;
		wrapped[sig] = (unsigned char)handles(act);
	}
	if (old)
		*old = was_wrapped ? prev : kernel_old;
	return 0;
}

sighandler_t signal(int sig, sighandler_t handler)
{
	struct sigaction act, old;
	memset(&act, 0, sizeof(act));
	act.sa_handler = handler;
	act.sa_flags = SA_RESTART; /* glibc's BSD semantics */
	sigemptyset(&act.sa_mask);
	sigaddset(&act.sa_mask, sig);
	if (sigaction(sig, &act, &old) < 0)
		return SIG_ERR;
	return old.sa_handler;
}
