/*
 * memcpy_bw: memcpy bandwidth per copy size, the ceiling for DMA throughput
 * (a server moving guest memory through a shared mapping is a memcpy at best).
 *
 * For each size, copies between two page-aligned, pre-touched buffers for
 * --seconds-per-size, split into --slices timing slices, and reports the
 * median slice's rate in MB/s (10^6 bytes per second). Source and destination
 * stay the same, so small sizes run from cache, as a hot DMA buffer would.
 *
 * Prints one line of JSON: {"tool":"memcpy_bw","results":[{size, mb_per_s,
 * bytes, seconds}, ...]}. Exit status: 0 ok, 2 usage, 4 out of memory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BENCH_PROG "memcpy_bw"
#include "bench_common.h"

#define MAX_SIZES 64
#define MAX_SLICES 101
#define MAX_COPY (1ull << 30)

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

struct slice {
    double mb_per_s;
    uint64_t bytes;
    double seconds;
};

static int cmp_slice(const void *a, const void *b)
{
    return cmp_double(&((const struct slice *)a)->mb_per_s, &((const struct slice *)b)->mb_per_s);
}

/* Copies `size` bytes repeatedly for about `ns` nanoseconds. */
static struct slice time_slice(uint8_t *dst, const uint8_t *src, size_t size, uint64_t ns)
{
    /* Read the clock about once per MiB copied so timing overhead stays small. */
    uint64_t per_check = size >= (1u << 20) ? 1 : (1u << 20) / size;
    uint64_t copies = 0;
    uint64_t t0 = now_ns(), t;
    do {
        for (uint64_t i = 0; i < per_check; i++) {
            memcpy(dst, src, size);
            /* Tell the compiler dst is observed, so no copy can be elided or merged. */
            __asm__ __volatile__("" : : "r"(dst), "r"(src) : "memory");
        }
        copies += per_check;
        t = now_ns();
    } while (t - t0 < ns);
    struct slice s = {.bytes = copies * size, .seconds = (double)(t - t0) / 1e9};
    s.mb_per_s = (double)s.bytes / s.seconds / 1e6;
    return s;
}

/* Parses "4096,16384,..." into sizes; returns how many. */
static size_t parse_sizes(char *list, uint64_t *sizes)
{
    size_t n = 0;
    for (char *tok = strtok(list, ","); tok != NULL; tok = strtok(NULL, ",")) {
        if (n == MAX_SIZES)
            die(EXIT_USAGE, "--sizes: at most %d sizes", MAX_SIZES);
        sizes[n] = parse_u64("sizes", tok);
        if (sizes[n] < 1 || sizes[n] > MAX_COPY)
            die(EXIT_USAGE, "--sizes: each size must be 1 .. %llu", MAX_COPY);
        n++;
    }
    if (n == 0)
        die(EXIT_USAGE, "--sizes: empty list");
    return n;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"sizes", required_argument, NULL, 's'},
        {"seconds-per-size", required_argument, NULL, 't'},
        {"slices", required_argument, NULL, 'k'},
        {NULL, 0, NULL, 0},
    };
    uint64_t sizes[MAX_SIZES];
    size_t nsizes = 0;
    for (uint64_t size = 4096; size <= (1u << 20); size *= 2) /* 4 KiB .. 1 MiB */
        sizes[nsizes++] = size;
    double seconds = 0.1;
    unsigned slices = 5;
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 's': nsizes = parse_sizes(optarg, sizes); break;
        case 't': {
            char *end;
            seconds = strtod(optarg, &end);
            if (*end != '\0' || !(seconds > 0.0) || seconds > 60.0)
                die(EXIT_USAGE, "--seconds-per-size: expected 0 < S <= 60, got %s", optarg);
            break;
        }
        case 'k':
            slices = (unsigned)parse_u64("slices", optarg);
            if (slices < 1 || slices > MAX_SLICES)
                die(EXIT_USAGE, "--slices must be 1..%d", MAX_SLICES);
            break;
        default:
            fputs("usage: memcpy_bw [--sizes B,B,...] [--seconds-per-size S] [--slices K]\n",
                  stderr);
            return EXIT_USAGE;
        }
    }
    if (optind != argc)
        die(EXIT_USAGE, "unexpected argument %s", argv[optind]);

    uint64_t largest = 0;
    for (size_t i = 0; i < nsizes; i++)
        largest = sizes[i] > largest ? sizes[i] : largest;
    size_t alloc = (size_t)((largest + 4095u) & ~(uint64_t)4095u);
    uint8_t *src = aligned_alloc(4096, alloc);
    uint8_t *dst = aligned_alloc(4096, alloc);
    if (src == NULL || dst == NULL)
        die(EXIT_IO, "cannot allocate 2 x %zu bytes", alloc);
    /* Touch every page first: page faults are not part of the copy cost. */
    memset(src, 0xa5, alloc);
    memset(dst, 0x5a, alloc);

    uint64_t slice_ns = (uint64_t)(seconds * 1e9 / slices);
    if (slice_ns < 1)
        slice_ns = 1;
    fputs("{\"tool\":\"memcpy_bw\",\"results\":[", stdout);
    for (size_t i = 0; i < nsizes; i++) {
        struct slice s[MAX_SLICES];
        memcpy(dst, src, sizes[i]); /* warm the caches and TLB for this size */
        for (unsigned k = 0; k < slices; k++)
            s[k] = time_slice(dst, src, sizes[i], slice_ns);
        qsort(s, slices, sizeof(s[0]), cmp_slice);
        const struct slice *m = &s[slices / 2];
        printf("%s{\"size\":%" PRIu64 ",\"mb_per_s\":%.1f,\"bytes\":%" PRIu64
               ",\"seconds\":%.6f}",
               i == 0 ? "" : ",", sizes[i], m->mb_per_s, m->bytes, m->seconds);
    }
    puts("]}");
    if (dst[0] != 0xa5) /* the copies did happen */
        die(EXIT_IO, "memcpy produced wrong data");
    free(src);
    free(dst);
    return 0;
}
