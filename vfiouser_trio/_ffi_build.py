"""cffi (API mode) builder for ``vfiouser_trio._native``.

Only what the standard library cannot do well lives in C:

* ``mmap``/``munmap``/``madvise``/``msync`` at a chosen address (Python's ``mmap``
  module cannot place a mapping, nor advise or sync an arbitrary range);
* ordered atomic loads, stores and read-modify-writes on u32/u64 words, and fences
  (GCC ``__atomic`` builtins);
* dirty-bitmap operations on caller-owned u64 word arrays.
* a memcpy that survives SIGBUS (``vfu_guarded_copy``), for memory a peer can
  truncate under us.
* eventfd writes and reads that never block on a description a peer shares
  (``vfu_eventfd_signal``, ``vfu_eventfd_read_nowait``).

``memfd_create``, file seals and creating an ``eventfd`` are covered by ``os`` and
``fcntl`` and are deliberately not duplicated here.

The extension is built by setuptools through ``cffi_modules`` in ``setup.py``
(``pip install .`` / ``pip install -e .``). For development, compile it in place
with ``python vfiouser_trio/_ffi_build.py``.

Calling conventions (the Python wrappers rely on them and bounds-check first):

* functions that can fail return ``-errno``; ``vfu_mmap`` returns the address, or
  ``-errno`` (user-space addresses never have bit 63 set on Linux);
* memory orders are the GCC ``__ATOMIC_*`` values; a runtime order is dispatched to
  a constant one, so each operation really uses the order asked for;
* bitmaps are arrays of u64 words, bit ``i`` is bit ``i % 64`` of word ``i // 64``.
"""

from __future__ import annotations

import pathlib

import cffi

CDEF = """
#define PROT_NONE ...
#define PROT_READ ...
#define PROT_WRITE ...
#define PROT_EXEC ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_FIXED ...
#define MAP_FIXED_NOREPLACE ...
#define MAP_ANONYMOUS ...
#define MAP_NORESERVE ...
#define MAP_POPULATE ...
#define MS_ASYNC ...
#define MS_SYNC ...
#define MS_INVALIDATE ...

#define VFU_ORDER_RELAXED ...
#define VFU_ORDER_ACQUIRE ...
#define VFU_ORDER_RELEASE ...
#define VFU_ORDER_ACQ_REL ...
#define VFU_ORDER_SEQ_CST ...
#define VFU_OP_ADD ...
#define VFU_OP_SUB ...
#define VFU_OP_AND ...
#define VFU_OP_OR ...
#define VFU_OP_XOR ...
#define VFU_OP_XCHG ...

int64_t vfu_mmap(uint64_t addr, uint64_t length, int prot, int flags, int fd, int64_t offset);
int vfu_munmap(uint64_t addr, uint64_t length);
int vfu_madvise(uint64_t addr, uint64_t length, int advice);
int vfu_msync(uint64_t addr, uint64_t length, int flags);

int vfu_guard_install(void);
int vfu_guarded_copy(void *dst, const void *src, size_t n);

uint32_t vfu_load_u32(const char *base, size_t offset, int order);
uint64_t vfu_load_u64(const char *base, size_t offset, int order);
void vfu_store_u32(char *base, size_t offset, uint32_t value, int order);
void vfu_store_u64(char *base, size_t offset, uint64_t value, int order);
uint32_t vfu_rmw_u32(char *base, size_t offset, int op, uint32_t value, int order);
uint64_t vfu_rmw_u64(char *base, size_t offset, int op, uint64_t value, int order);
uint32_t vfu_cas_u32(char *base, size_t offset, uint32_t expected, uint32_t desired,
                     int success, int failure);
uint64_t vfu_cas_u64(char *base, size_t offset, uint64_t expected, uint64_t desired,
                     int success, int failure);
void vfu_fence(int order);

void vfu_bits_set(uint64_t *words, uint64_t first, uint64_t count);
void vfu_bits_clear(uint64_t *words, uint64_t first, uint64_t count);
int vfu_bits_test(const uint64_t *words, uint64_t bit);
uint64_t vfu_bits_count(const uint64_t *words, uint64_t first, uint64_t count);
int64_t vfu_bits_next(const uint64_t *words, uint64_t start, uint64_t end, int value);
void vfu_bits_mark(uint64_t *words, uint64_t offset, uint64_t length, unsigned page_shift);
void vfu_bits_extract(uint64_t *src, uint64_t first, uint64_t count, uint64_t *out,
                      int shift, int clear);

/* eventfd signalling that never blocks (see the C block of that name) */
int vfu_eventfd_signal(int fd, uint64_t n);
int vfu_eventfd_write_guarded(int fd, uint64_t n);
int vfu_eventfd_guard_signo(void);
uint64_t vfu_eventfd_read_nowait(int fd);
"""

C_SOURCE = r"""
/* Python.h (included first by cffi) normally defines both already. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64
#endif
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000 /* Linux 4.17+; older libc headers lack it */
#endif

/* ---- mappings ---------------------------------------------------------- */

static int64_t vfu_mmap(uint64_t addr, uint64_t length, int prot, int flags, int fd,
                        int64_t offset)
{
    void *p = mmap((void *)(uintptr_t)addr, (size_t)length, prot, flags, fd, (off_t)offset);
    if (p == MAP_FAILED)
        return -(int64_t)errno;
    return (int64_t)(uintptr_t)p;
}

static int vfu_munmap(uint64_t addr, uint64_t length)
{
    return munmap((void *)(uintptr_t)addr, (size_t)length) == 0 ? 0 : -errno;
}

static int vfu_madvise(uint64_t addr, uint64_t length, int advice)
{
    return madvise((void *)(uintptr_t)addr, (size_t)length, advice) == 0 ? 0 : -errno;
}

static int vfu_msync(uint64_t addr, uint64_t length, int flags)
{
    return msync((void *)(uintptr_t)addr, (size_t)length, flags) == 0 ? 0 : -errno;
}

/* ---- guarded copies ----------------------------------------------------
 * A shared mapping of a file the peer can still shrink raises SIGBUS when a
 * page past the new end of the file is touched. vfu_guarded_copy() is a
 * memcpy that turns such a fault into -EFAULT: the handler, installed once
 * by vfu_guard_install(), jumps back out of a copy in progress on this
 * thread when the faulting address lies in that copy's source or
 * destination. A SIGBUS anywhere else is passed on to the handler that was in
 * place before ours (Python's faulthandler, say), or given the default
 * action, so a real crash still crashes.
 *
 * SA_NODEFER keeps the signal mask unchanged while the handler runs, so the
 * jump does not need to restore it (sigsetjmp(..., 0): no syscall per copy).
 * SA_ONSTACK lets the handler run on an alternate stack where one is set.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

static __thread volatile sig_atomic_t vfu_guard_active;
static __thread sigjmp_buf vfu_guard_jump;
/* The copy in progress on this thread: [dst, dst + n) and [src, src + n). */
static __thread uintptr_t vfu_guard_dst, vfu_guard_src, vfu_guard_len;

/* Whether a SIGBUS on this thread, during its copy, belongs to the copy: a fault
 * inside its ranges, or a signal sent by raise() (how Python's faulthandler, if
 * enabled after us, hands the fault back once it has reported it). */
static int vfu_guard_covers(const siginfo_t *info)
{
    uintptr_t addr;
    if (info == NULL || info->si_code <= 0)
        return 1;
    addr = (uintptr_t)info->si_addr;
    return (addr - vfu_guard_dst < vfu_guard_len) || (addr - vfu_guard_src < vfu_guard_len);
}

static struct sigaction vfu_guard_previous;
static pthread_mutex_t vfu_guard_lock = PTHREAD_MUTEX_INITIALIZER;
static int vfu_guard_installed;

static void vfu_guard_handler(int sig, siginfo_t *info, void *context)
{
    if (vfu_guard_active && vfu_guard_covers(info)) {
        vfu_guard_active = 0;
        siglongjmp(vfu_guard_jump, 1);
    }
    if (vfu_guard_previous.sa_flags & SA_SIGINFO) {
        if (vfu_guard_previous.sa_sigaction != NULL) {
            vfu_guard_previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (vfu_guard_previous.sa_handler == SIG_IGN) {
        if (info != NULL && info->si_code <= 0)
            return; /* sent by kill() or the like: ignored, as before us */
        /* a fault cannot be ignored: fall through to the default action */
    } else if (vfu_guard_previous.sa_handler != SIG_DFL) {
        vfu_guard_previous.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig); /* not blocked (SA_NODEFER): the default action happens now */
}

/* Installs the SIGBUS handler once per process; 0 or -errno. */
static int vfu_guard_install(void)
{
    int result = 0;
    pthread_mutex_lock(&vfu_guard_lock);
    if (!vfu_guard_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = vfu_guard_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &vfu_guard_previous) == 0)
            vfu_guard_installed = 1;
        else
            result = -errno;
    }
    pthread_mutex_unlock(&vfu_guard_lock);
    return result;
}

/* memcpy(dst, src, n); 0, or -EFAULT if either side faulted with SIGBUS
 * (dst may then hold part of the data). vfu_guard_install() must have run. */
static int vfu_guarded_copy(void *dst, const void *src, size_t n)
{
    if (sigsetjmp(vfu_guard_jump, 0) != 0)
        return -EFAULT;
    vfu_guard_dst = (uintptr_t)dst;
    vfu_guard_src = (uintptr_t)src;
    vfu_guard_len = n;
    vfu_guard_active = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    memcpy(dst, src, n);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    vfu_guard_active = 0;
    return 0;
}

/* ---- atomics -----------------------------------------------------------
 * GCC treats a memory order that is not a compile-time constant as seq_cst,
 * so every runtime order is dispatched to a constant one. The Python side
 * rejects orders that are invalid for an operation; the defaults here are
 * only reached for values it never passes.
 */

#define VFU_ORDER_RELAXED __ATOMIC_RELAXED
#define VFU_ORDER_ACQUIRE __ATOMIC_ACQUIRE
#define VFU_ORDER_RELEASE __ATOMIC_RELEASE
#define VFU_ORDER_ACQ_REL __ATOMIC_ACQ_REL
#define VFU_ORDER_SEQ_CST __ATOMIC_SEQ_CST

/* Read-modify-write operations of vfu_rmw_*. */
#define VFU_OP_ADD 0
#define VFU_OP_SUB 1
#define VFU_OP_AND 2
#define VFU_OP_OR 3
#define VFU_OP_XOR 4
#define VFU_OP_XCHG 5

#define VFU_ORDER_SWITCH(order, DO)                 \
    switch (order) {                                \
    case __ATOMIC_RELAXED: DO(__ATOMIC_RELAXED);    \
    case __ATOMIC_CONSUME: DO(__ATOMIC_CONSUME);    \
    case __ATOMIC_ACQUIRE: DO(__ATOMIC_ACQUIRE);    \
    case __ATOMIC_RELEASE: DO(__ATOMIC_RELEASE);    \
    case __ATOMIC_ACQ_REL: DO(__ATOMIC_ACQ_REL);    \
    default: DO(__ATOMIC_SEQ_CST);                  \
    }

#define VFU_LOAD_ORDERS(order, DO)                  \
    switch (order) {                                \
    case __ATOMIC_RELAXED: DO(__ATOMIC_RELAXED);    \
    case __ATOMIC_ACQUIRE: DO(__ATOMIC_ACQUIRE);    \
    default: DO(__ATOMIC_SEQ_CST);                  \
    }

#define VFU_STORE_ORDERS(order, DO)                 \
    switch (order) {                                \
    case __ATOMIC_RELAXED: DO(__ATOMIC_RELAXED);    \
    case __ATOMIC_RELEASE: DO(__ATOMIC_RELEASE);    \
    default: DO(__ATOMIC_SEQ_CST);                  \
    }

#define VFU_RMW_BODY(MO)                                                  \
    switch (op) {                                                         \
    case VFU_OP_ADD: return __atomic_fetch_add(p, value, MO);             \
    case VFU_OP_SUB: return __atomic_fetch_sub(p, value, MO);             \
    case VFU_OP_AND: return __atomic_fetch_and(p, value, MO);             \
    case VFU_OP_OR: return __atomic_fetch_or(p, value, MO);               \
    case VFU_OP_XOR: return __atomic_fetch_xor(p, value, MO);             \
    default: return __atomic_exchange_n(p, value, MO);                    \
    }

/* Valid (success, failure) pairs: failure is relaxed, acquire or seq_cst and
 * no stronger than success. */
#define VFU_CAS_CASE(S, F)                                                          \
    case (S) * 8 + (F):                                                             \
        __atomic_compare_exchange_n(p, &expected, desired, 0, (S), (F));            \
        return expected;

#define VFU_CAS_SWITCH                                                              \
    switch (success * 8 + failure) {                                                \
    VFU_CAS_CASE(__ATOMIC_RELAXED, __ATOMIC_RELAXED)                                \
    VFU_CAS_CASE(__ATOMIC_ACQUIRE, __ATOMIC_RELAXED)                                \
    VFU_CAS_CASE(__ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE)                                \
    VFU_CAS_CASE(__ATOMIC_RELEASE, __ATOMIC_RELAXED)                                \
    VFU_CAS_CASE(__ATOMIC_ACQ_REL, __ATOMIC_RELAXED)                                \
    VFU_CAS_CASE(__ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)                                \
    VFU_CAS_CASE(__ATOMIC_SEQ_CST, __ATOMIC_RELAXED)                                \
    VFU_CAS_CASE(__ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)                                \
    default:                                                                        \
        __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST,     \
                                    __ATOMIC_SEQ_CST);                              \
        return expected;                                                            \
    }

#define VFU_DEFINE_ATOMICS(T, SUFFIX)                                               \
    static T vfu_load_##SUFFIX(const char *base, size_t offset, int order)          \
    {                                                                               \
        const T *p = (const T *)(base + offset);                                    \
        VFU_LOAD_ORDERS(order, VFU_LOAD_DO)                                         \
    }                                                                               \
    static void vfu_store_##SUFFIX(char *base, size_t offset, T value, int order)   \
    {                                                                               \
        T *p = (T *)(base + offset);                                                \
        VFU_STORE_ORDERS(order, VFU_STORE_DO)                                       \
    }                                                                               \
    static T vfu_rmw_##SUFFIX(char *base, size_t offset, int op, T value, int order) \
    {                                                                               \
        T *p = (T *)(base + offset);                                                \
        VFU_ORDER_SWITCH(order, VFU_RMW_BODY)                                       \
    }                                                                               \
    static T vfu_cas_##SUFFIX(char *base, size_t offset, T expected, T desired,     \
                              int success, int failure)                             \
    {                                                                               \
        T *p = (T *)(base + offset);                                                \
        VFU_CAS_SWITCH                                                              \
    }

#define VFU_LOAD_DO(MO) return __atomic_load_n(p, MO)
#define VFU_STORE_DO(MO) __atomic_store_n(p, value, MO); return

VFU_DEFINE_ATOMICS(uint32_t, u32)
VFU_DEFINE_ATOMICS(uint64_t, u64)

#define VFU_FENCE_DO(MO) __atomic_thread_fence(MO); return

static void vfu_fence(int order)
{
    VFU_ORDER_SWITCH(order, VFU_FENCE_DO)
}

/* ---- dirty bitmaps -----------------------------------------------------
 * Setters publish with release so that data written before a page is marked
 * is visible to whoever takes the bit with acquire. Every change to a word
 * that may hold other bits is one atomic read-modify-write, so a concurrent
 * setter on shared memory never loses a bit to a concurrent clear.
 */

/* Bits [lo, hi) of one word, 0 <= lo < hi <= 64. */
static inline uint64_t vfu_word_mask(uint64_t lo, uint64_t hi)
{
    uint64_t upper = hi >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << hi) - 1);
    return upper & (~(uint64_t)0 << lo);
}

/* Calls BODY once per word overlapping bits [first, first + count), with
 * `wi` the word index and `mask` the bits of the range in that word. */
#define VFU_FOR_EACH_WORD(first, count, BODY)                              \
    do {                                                                   \
        uint64_t end_ = (first) + (count);                                 \
        uint64_t bit_ = (first);                                           \
        while (bit_ < end_) {                                              \
            uint64_t wi = bit_ >> 6;                                       \
            uint64_t word_start_ = wi << 6;                                \
            uint64_t hi_ = end_ - word_start_ > 64 ? 64 : end_ - word_start_; \
            uint64_t mask = vfu_word_mask(bit_ - word_start_, hi_);        \
            BODY;                                                          \
            bit_ = word_start_ + 64;                                       \
        }                                                                  \
    } while (0)

static void vfu_bits_set(uint64_t *words, uint64_t first, uint64_t count)
{
    VFU_FOR_EACH_WORD(first, count, {
        if (mask == ~(uint64_t)0)
            __atomic_store_n(&words[wi], mask, __ATOMIC_RELEASE);
        else
            __atomic_fetch_or(&words[wi], mask, __ATOMIC_RELEASE);
    });
}

static void vfu_bits_clear(uint64_t *words, uint64_t first, uint64_t count)
{
    VFU_FOR_EACH_WORD(first, count, {
        if (mask == ~(uint64_t)0)
            __atomic_store_n(&words[wi], 0, __ATOMIC_RELEASE);
        else
            __atomic_fetch_and(&words[wi], ~mask, __ATOMIC_ACQ_REL);
    });
}

static int vfu_bits_test(const uint64_t *words, uint64_t bit)
{
    return (int)((__atomic_load_n(&words[bit >> 6], __ATOMIC_ACQUIRE) >> (bit & 63)) & 1);
}

static uint64_t vfu_bits_count(const uint64_t *words, uint64_t first, uint64_t count)
{
    uint64_t total = 0;
    VFU_FOR_EACH_WORD(first, count, {
        total += (uint64_t)__builtin_popcountll(
            __atomic_load_n(&words[wi], __ATOMIC_RELAXED) & mask);
    });
    return total;
}

/* Index of the first bit in [start, end) equal to `value`, or -1. */
static int64_t vfu_bits_next(const uint64_t *words, uint64_t start, uint64_t end, int value)
{
    VFU_FOR_EACH_WORD(start, end > start ? end - start : 0, {
        uint64_t w = __atomic_load_n(&words[wi], __ATOMIC_RELAXED);
        uint64_t hits = (value ? w : ~w) & mask;
        if (hits)
            return (int64_t)((wi << 6) + (uint64_t)__builtin_ctzll(hits));
    });
    return -1;
}

/* Marks the pages touched by bytes [offset, offset + length), length > 0. */
static void vfu_bits_mark(uint64_t *words, uint64_t offset, uint64_t length,
                          unsigned page_shift)
{
    uint64_t first = offset >> page_shift;
    uint64_t last = (offset + length - 1) >> page_shift;
    vfu_bits_set(words, first, last - first + 1);
}

/* Sets bits [first, first + count) of a private (non-shared) bitmap. */
static void vfu_bits_set_plain(uint64_t *words, uint64_t first, uint64_t count)
{
    VFU_FOR_EACH_WORD(first, count, { words[wi] |= mask; });
}

/* Copies bits [first, first + count) of `src` into the zeroed bitmap `out`,
 * re-granulated: for shift >= 0, out bit j is the OR of source bits
 * [first + j * 2^shift, first + (j + 1) * 2^shift) (a coarser page size); for
 * shift < 0 every source bit becomes 2^-shift out bits (a finer page size).
 * With `clear`, the source bits are fetched and cleared one word at a time
 * with a single atomic operation per word. */
static void vfu_bits_extract(uint64_t *src, uint64_t first, uint64_t count, uint64_t *out,
                             int shift, int clear)
{
    VFU_FOR_EACH_WORD(first, count, {
        uint64_t bits;
        if (!clear)
            bits = __atomic_load_n(&src[wi], __ATOMIC_ACQUIRE) & mask;
        else if (mask == ~(uint64_t)0)
            bits = __atomic_exchange_n(&src[wi], 0, __ATOMIC_ACQ_REL);
        else
            bits = __atomic_fetch_and(&src[wi], ~mask, __ATOMIC_ACQ_REL) & mask;
        while (bits) {
            uint64_t index = (wi << 6) + (uint64_t)__builtin_ctzll(bits) - first;
            bits &= bits - 1;
            if (shift >= 0) {
                uint64_t o = index >> shift;
                out[o >> 6] |= (uint64_t)1 << (o & 63);
            } else {
                vfu_bits_set_plain(out, index << -shift, (uint64_t)1 << -shift);
            }
        }
    });
}

/* ---- eventfd signalling that never blocks -------------------------------
 * An eventfd a peer also holds is one open file description: the peer can
 * clear O_NONBLOCK on it at any time, and can fill its counter, so a plain
 * write(2) of ours may sleep until the peer reads. RWF_NOWAIT does not help
 * (eventfd has no write_iter: pwritev2 says EOPNOTSUPP), and an anonymous
 * inode cannot be reopened as a description of our own (ENXIO). So:
 *
 * 1. a full counter means the notification is already pending: -EAGAIN. A
 *    description in O_NONBLOCK mode says so itself; for a blocking one,
 *    poll(POLLOUT, timeout 0) asks first (no room for one more count: full);
 * 2. the write itself is watched, whatever F_GETFL said (the peer can clear
 *    O_NONBLOCK, or fill the counter, between our check and our write): a
 *    watchdog thread ticks every VFU_EFD_TICK_NS while writes happen, and a
 *    thread it finds in the same write on two ticks in a row gets a real-time
 *    signal whose handler does nothing, installed without SA_RESTART: the
 *    sleeping write returns EINTR. It keeps doing so each tick, so a write
 *    entered late (a preempted thread) is caught too.
 *
 * F_GETFL alone would be a race the peer can win, so it only picks the cheap
 * path (fcntl is ~0.25 us here, poll ~0.6 us): a peer winning that race costs
 * us one write of at most ~2 ticks, never a hang. A per-thread POSIX timer
 * armed around each write would also work, but timer_settime twice per write
 * cost ~3.5 us here against ~0.45 us for the write itself; the watchdog costs
 * a few atomic stores per write, and sleeps (futex, no ticks) once no write
 * has happened for VFU_EFD_IDLE_TICKS ticks. The price:
 * a write that took longer than a tick for another reason (the thread was
 * preempted inside write) may get the signal just after it finished, so one
 * later syscall of that thread can see EINTR, which Python retries.
 */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#define VFU_EFD_TICK_NS 1000000L /* a blocked write lasts at most ~2 ticks */
#define VFU_EFD_IDLE_TICKS 100   /* then the watchdog sleeps until the next write */

/* One per thread that ever signalled; the watchdog reads it under vfu_efd_lock. */
struct vfu_efd_slot {
    pthread_t thread;
    uint64_t seq;      /* bumped as each write starts (atomic) */
    int in_write;      /* 1 while in write(2) (atomic) */
    uint64_t seen;     /* watchdog only: seq in write at the last tick, or 0 */
    uint64_t last;     /* watchdog only: seq at the last tick (activity) */
    struct vfu_efd_slot *next;
};

static pthread_once_t vfu_efd_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t vfu_efd_lock = PTHREAD_MUTEX_INITIALIZER;
static int vfu_efd_signo;       /* > 0 once the handler is installed */
static int vfu_efd_setup_error; /* -errno if it could not be */
static pthread_key_t vfu_efd_key;
static struct vfu_efd_slot *vfu_efd_slots;
static int vfu_efd_running;     /* the watchdog thread exists (under the lock) */
static int vfu_efd_sleeping;    /* futex word: 1 while the watchdog waits untimed */
static __thread struct vfu_efd_slot *vfu_efd_self;

static void vfu_efd_handler(int sig)
{
    (void)sig; /* the point is only to interrupt a sleeping write */
}

static void vfu_efd_futex(int *word, int op, int value, const struct timespec *timeout)
{
    syscall(SYS_futex, word, op, value, timeout, NULL, 0);
}

static void *vfu_efd_watchdog(void *unused)
{
    (void)unused;
    const struct timespec tick = {0, VFU_EFD_TICK_NS};
    int idle = 0;
    for (;;) {
        nanosleep(&tick, NULL);
        int busy = 0, active = 0;
        pthread_mutex_lock(&vfu_efd_lock);
        for (struct vfu_efd_slot *s = vfu_efd_slots; s != NULL; s = s->next) {
            uint64_t seq = __atomic_load_n(&s->seq, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&s->in_write, __ATOMIC_SEQ_CST)) {
                busy = 1;
                if (s->seen == seq)
                    pthread_kill(s->thread, vfu_efd_signo); /* same write, a tick later */
                s->seen = seq;
            } else {
                s->seen = 0; /* seq is >= 1 during a write: 0 never matches */
            }
            active |= seq != s->last;
            s->last = seq;
        }
        pthread_mutex_unlock(&vfu_efd_lock);
        idle = busy || active ? 0 : idle + 1;
        if (idle < VFU_EFD_IDLE_TICKS)
            continue;
        /* Sleep until a writer wakes us. Dekker with the writer: it stores
         * in_write then loads sleeping, we store sleeping then load in_write,
         * so one of us sees the other. */
        __atomic_store_n(&vfu_efd_sleeping, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_lock(&vfu_efd_lock);
        for (struct vfu_efd_slot *s = vfu_efd_slots; s != NULL; s = s->next)
            busy |= __atomic_load_n(&s->in_write, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&vfu_efd_lock);
        if (busy)
            __atomic_store_n(&vfu_efd_sleeping, 0, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&vfu_efd_sleeping, __ATOMIC_SEQ_CST))
            vfu_efd_futex(&vfu_efd_sleeping, FUTEX_WAIT_PRIVATE, 1, NULL);
        idle = 0;
    }
    return NULL;
}

/* Thread exit: forget that thread's slot before its pthread_t goes stale. */
static void vfu_efd_thread_exit(void *value)
{
    struct vfu_efd_slot *slot = value;
    pthread_mutex_lock(&vfu_efd_lock);
    for (struct vfu_efd_slot **p = &vfu_efd_slots; *p != NULL; p = &(*p)->next) {
        if (*p == slot) {
            *p = slot->next;
            break;
        }
    }
    pthread_mutex_unlock(&vfu_efd_lock);
    free(slot);
}

/* fork(): the child has only the forking thread and no watchdog. */
static void vfu_efd_before_fork(void) { pthread_mutex_lock(&vfu_efd_lock); }
static void vfu_efd_parent_after_fork(void) { pthread_mutex_unlock(&vfu_efd_lock); }
static void vfu_efd_child_after_fork(void)
{
    pthread_mutex_init(&vfu_efd_lock, NULL);
    vfu_efd_slots = NULL; /* the parent's slots (a small leak in the child) */
    vfu_efd_running = 0;
    vfu_efd_sleeping = 0;
    vfu_efd_self = NULL;
}

static void vfu_efd_setup(void)
{
    int err = pthread_key_create(&vfu_efd_key, vfu_efd_thread_exit);
    if (err != 0) {
        vfu_efd_setup_error = -err;
        return;
    }
    pthread_atfork(vfu_efd_before_fork, vfu_efd_parent_after_fork, vfu_efd_child_after_fork);
    for (int sig = SIGRTMAX; sig >= SIGRTMIN; sig--) {
        struct sigaction old;
        if (sigaction(sig, NULL, &old) != 0)
            continue;
        if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL)
            continue; /* someone else's signal */
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = vfu_efd_handler;
        sa.sa_flags = 0; /* no SA_RESTART: the interrupted write must fail */
        sigemptyset(&sa.sa_mask);
        if (sigaction(sig, &sa, NULL) == 0) {
            vfu_efd_signo = sig;
            return;
        }
    }
    vfu_efd_setup_error = -EAGAIN; /* every real-time signal is taken */
}

/* Registers the calling thread (and starts the watchdog); 0 or -errno. */
static int vfu_efd_thread_init(void)
{
    pthread_once(&vfu_efd_once, vfu_efd_setup);
    if (vfu_efd_signo <= 0)
        return vfu_efd_setup_error;
    struct vfu_efd_slot *slot = calloc(1, sizeof *slot);
    if (slot == NULL)
        return -ENOMEM;
    slot->thread = pthread_self();
    int err = 0;
    pthread_mutex_lock(&vfu_efd_lock);
    if (!vfu_efd_running) {
        /* The watchdog takes no signals: they are for the threads it watches. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        pthread_t watchdog;
        err = pthread_create(&watchdog, &attr, vfu_efd_watchdog, NULL);
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        vfu_efd_running = err == 0;
    }
    if (err == 0) {
        slot->next = vfu_efd_slots;
        vfu_efd_slots = slot;
    }
    pthread_mutex_unlock(&vfu_efd_lock);
    if (err != 0) {
        free(slot);
        return -err;
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, vfu_efd_signo);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL); /* a blocked signal would not interrupt */
    pthread_setspecific(vfu_efd_key, slot);
    vfu_efd_self = slot;
    return 0;
}

/* write(fd, &n, 8) that sleeps at most about two watchdog ticks; 0 or -errno
 * (-EINTR: it slept, the counter had no room for n). */
static int vfu_eventfd_write_guarded(int fd, uint64_t n)
{
    struct vfu_efd_slot *slot = vfu_efd_self;
    if (slot == NULL) {
        int err = vfu_efd_thread_init();
        if (err != 0)
            return err;
        slot = vfu_efd_self;
    }
    __atomic_add_fetch(&slot->seq, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&slot->in_write, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&vfu_efd_sleeping, __ATOMIC_SEQ_CST)) {
        int expected = 1;
        if (__atomic_compare_exchange_n(&vfu_efd_sleeping, &expected, 0, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            vfu_efd_futex(&vfu_efd_sleeping, FUTEX_WAKE_PRIVATE, 1, NULL);
    }
    ssize_t written = write(fd, &n, sizeof n);
    int result = written == (ssize_t)sizeof n ? 0 : written < 0 ? -errno : -EIO;
    __atomic_store_n(&slot->in_write, 0, __ATOMIC_SEQ_CST);
    return result;
}

/* Adds n to the eventfd's counter without ever sleeping for long; 0, or
 * -EAGAIN (counter full: already signalled), -EINTR (filled under us), or
 * another -errno (-EBADF, -EINVAL for n == 2^64 - 1, ...). */
static int vfu_eventfd_signal(int fd, uint64_t n)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -errno;
    if (!(flags & O_NONBLOCK)) {
        struct pollfd p = {.fd = fd, .events = POLLOUT, .revents = 0};
        if (poll(&p, 1, 0) < 0)
            return -errno;
        if (p.revents & POLLNVAL)
            return -EBADF;
        if (!(p.revents & POLLOUT))
            return -EAGAIN;
    }
    return vfu_eventfd_write_guarded(fd, n);
}

/* Reads (consumes) the counter with RWF_NOWAIT, which never sleeps whatever
 * O_NONBLOCK says: the value, 0 if the counter is zero (a read never returns
 * 0 otherwise), or UINT64_MAX with errno set (EOPNOTSUPP on kernels whose
 * eventfd ignores RWF_NOWAIT). One call, where os.preadv costs ~0.6 us more. */
static uint64_t vfu_eventfd_read_nowait(int fd)
{
    uint64_t value = 0;
    struct iovec io = {.iov_base = &value, .iov_len = sizeof value};
    ssize_t got = preadv2(fd, &io, 1, -1, RWF_NOWAIT);
    if (got == (ssize_t)sizeof value)
        return value;
    if (got < 0 && errno == EAGAIN)
        return 0;
    if (got >= 0)
        errno = EIO;
    return UINT64_MAX;
}

/* The guard's real-time signal (installing its handler if needed), or -errno. */
static int vfu_eventfd_guard_signo(void)
{
    pthread_once(&vfu_efd_once, vfu_efd_setup);
    return vfu_efd_signo > 0 ? vfu_efd_signo : vfu_efd_setup_error;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
# The limited API of CPython 3.11 (the stable ABI): one abi3 module, and so one wheel
# (tagged cp311-abi3 by setup.py), for every CPython from 3.11 on. cffi's setuptools hook
# marks the extension py_limited_api itself (hence ``_native.abi3.so``); passing it here as
# well would break compile() below (cffi 2.1 then names the module ``.abi3.so``).
LIMITED_API = ("Py_LIMITED_API", "0x030B0000")

ffibuilder.set_source(
    "vfiouser_trio._native",
    C_SOURCE,
    extra_compile_args=["-std=gnu11"],
    define_macros=[LIMITED_API],
)


if __name__ == "__main__":
    # Compile in place: writes vfiouser_trio/_native.c and the extension module
    # next to this file (the repository root is the build's tmpdir).
    ffibuilder.compile(
        tmpdir=str(pathlib.Path(__file__).resolve().parent.parent),
        target="_native.abi3.so",  # the name setuptools gives it: no stale twin can shadow it
        verbose=True,
    )
