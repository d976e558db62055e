/* Block device micro-benchmark for the NVMe guest test: sequential and 4 KiB random
 * reads and writes with O_DIRECT, one request at a time. Prints key=value lines.
 *
 *   nvbench DEVICE SEQ_MIB RANDOM_OPS
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t state = 88172645463325252ULL;

static uint64_t next(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: nvbench DEVICE SEQ_MIB RANDOM_OPS\n");
        return 2;
    }
    const size_t big = 128 << 10, small = 4096;
    long seq_mib = atol(argv[2]), ops = atol(argv[3]);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    off_t size = lseek(fd, 0, SEEK_END);
    void *buf;
    if (posix_memalign(&buf, 4096, big)) {
        return 1;
    }
    memset(buf, 0x5a, big);
    long chunks = seq_mib * (1 << 20) / big;
    if ((off_t)(chunks * big) > size) {
        chunks = size / big;
    }
    const char *names[2] = {"write", "read"};
    for (int r = 0; r < 2; r++) {
        double t0 = now();
        for (long i = 0; i < chunks; i++) {
            ssize_t n = r ? pread(fd, buf, big, i * big) : pwrite(fd, buf, big, i * big);
            if (n != (ssize_t)big) {
                perror("sequential");
                return 1;
            }
        }
        if (!r) {
            fdatasync(fd);
        }
        double t = now() - t0;
        printf("seq_%s_mbps=%.2f\n", names[r], chunks * big / t / 1e6);
    }
    long blocks = size / small;
    for (int r = 1; r >= 0; r--) {
        double t0 = now();
        for (long i = 0; i < ops; i++) {
            off_t at = (off_t)(next() % blocks) * small;
            ssize_t n = r ? pread(fd, buf, small, at) : pwrite(fd, buf, small, at);
            if (n != (ssize_t)small) {
                perror("random");
                return 1;
            }
        }
        double t = now() - t0;
        printf("rand_%s_iops=%.1f\n", names[r], ops / t);
    }
    close(fd);
    return 0;
}
