/*
 * Shared by the benchmark tools: exit codes, error exit, a monotonic clock,
 * option parsing, and the few vfio-user wire definitions the tools speak.
 * Each tool defines BENCH_PROG (its name, for error messages) before including
 * this header; a tool that must clean up on exit sets bench_on_exit.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifndef BENCH_PROG
#error "define BENCH_PROG before including bench_common.h"
#endif

#define EXIT_USAGE 2
#define EXIT_PROTOCOL 3
#define EXIT_IO 4

/* vfio-user wire format (spec: Header; REGION_READ/WRITE; VERSION). */
#define HDR_SIZE 16u
#define RW_HEAD_SIZE 16u /* offset u64, region u32, count u32 */
#define CMD_VERSION 1u
#define CMD_REGION_READ 9u
#define CMD_REGION_WRITE 10u
#define FLAG_TYPE_MASK 0x0fu
#define FLAG_TYPE_COMMAND 0x0u
#define FLAG_TYPE_REPLY 0x1u
#define FLAG_NO_REPLY 0x10u
#define FLAG_ERROR 0x20u
#define MAX_XFER (1u << 20) /* the max_data_xfer_size the tools announce */

static const char CAPABILITIES[] =
    "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}";

struct header {
    uint16_t msg_id;
    uint16_t command;
    uint32_t msg_size;
    uint32_t flags;
    uint32_t error;
};
_Static_assert(sizeof(struct header) == HDR_SIZE, "header layout");

struct rw_head {
    uint64_t offset;
    uint32_t region;
    uint32_t count;
};
_Static_assert(sizeof(struct rw_head) == RW_HEAD_SIZE, "region access layout");

/* Called by die() before exiting, when set (e.g. to remove a socket file). */
static void (*bench_on_exit)(void);

__attribute__((format(printf, 2, 3), noreturn, unused))
static void die(int status, const char *fmt, ...)
{
    va_list ap;
    fputs(BENCH_PROG ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (bench_on_exit != NULL)
        bench_on_exit();
    exit(status);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t parse_u64(const char *name, const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno != 0 || *end != '\0' || *s == '-' || *s == '\0')
        die(EXIT_USAGE, "--%s: not a non-negative integer: %s", name, s);
    return (uint64_t)v;
}

/* For qsort of latency samples. */
static inline int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile (rank = ceil(n * pct / 100)) of sorted samples, in microseconds. */
static inline double percentile_us(const uint64_t *sorted, uint64_t n, unsigned pct)
{
    if (n == 0)
        return 0.0;
    uint64_t rank = (n * pct + 99u) / 100u;
    if (rank < 1)
        rank = 1;
    return (double)sorted[rank - 1] / 1000.0;
}

#endif
