/*
 * pingpong: the round-trip floors the vfio-user figures are compared with.
 *
 *   --mode unix     two processes (fork) over an AF_UNIX stream socketpair; the
 *                   parent sends --request-size bytes (default 32, a 4-byte
 *                   REGION_READ request), the child answers --reply-size bytes
 *                   (default 36, its reply). No protocol work at all.
 *   --mode eventfd  two processes, one eventfd each way: the parent signals the
 *                   child's eventfd and blocks in read() on its own; the child
 *                   does the mirror image. The interrupt-delivery floor.
 *
 * Prints one line of JSON: round trips, seconds, rate, median and p99 in µs.
 * Exit status: 0 ok, 2 usage, 4 I/O or child failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BENCH_PROG "pingpong"
#include "bench_common.h"

#define MAX_MSG 65536u
#define EVENT_PING 1u
#define EVENT_STOP 2u /* eventfd counters add up, but the two sides strictly alternate */

static void send_all(int fd, const uint8_t *p, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(EXIT_IO, "send: %s", strerror(errno));
        }
        p += n;
        len -= (size_t)n;
    }
}

/* Receives exactly len bytes; false on EOF before the first byte. */
static bool recv_exact(int fd, uint8_t *p, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(fd, p + got, len - got, MSG_WAITALL);
        if (n == 0) {
            if (got == 0)
                return false;
            die(EXIT_IO, "peer closed the socket inside a message");
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(EXIT_IO, "recv: %s", strerror(errno));
        }
        got += (size_t)n;
    }
    return true;
}

static uint64_t event_wait(int fd)
{
    uint64_t v;
    for (;;) {
        ssize_t n = read(fd, &v, sizeof(v));
        if (n == (ssize_t)sizeof(v))
            return v;
        if (n < 0 && errno == EINTR)
            continue;
        die(EXIT_IO, "eventfd read: %s", n < 0 ? strerror(errno) : "short read");
    }
}

static void event_signal(int fd, uint64_t v)
{
    while (write(fd, &v, sizeof(v)) != (ssize_t)sizeof(v)) {
        if (errno != EINTR)
            die(EXIT_IO, "eventfd write: %s", strerror(errno));
    }
}

struct options {
    bool eventfd;
    uint64_t count;
    double seconds;
    uint64_t warmup;
    uint64_t max_samples;
    size_t request_size;
    size_t reply_size;
};

/* The measuring side's half of one round trip. */
struct link {
    int sock;        /* unix mode */
    int to_child;    /* eventfd mode */
    int from_child;  /* eventfd mode */
    uint8_t request[MAX_MSG];
    uint8_t reply[MAX_MSG];
};

static void round_trip(const struct options *o, struct link *l)
{
    if (o->eventfd) {
        event_signal(l->to_child, EVENT_PING);
        if (event_wait(l->from_child) != EVENT_PING)
            die(EXIT_IO, "unexpected eventfd value from the child");
    } else {
        send_all(l->sock, l->request, o->request_size);
        if (!recv_exact(l->sock, l->reply, o->reply_size))
            die(EXIT_IO, "child closed the socket");
    }
}

static void child_loop(const struct options *o, int sock, int from_parent, int to_parent)
{
    static uint8_t buf[MAX_MSG];
    if (o->eventfd) {
        while (event_wait(from_parent) == EVENT_PING)
            event_signal(to_parent, EVENT_PING);
    } else {
        memset(buf, 0x5a, sizeof(buf));
        while (recv_exact(sock, buf, o->request_size))
            send_all(sock, buf, o->reply_size);
    }
    _exit(0);
}

static void parse_options(int argc, char **argv, struct options *o)
{
    static const struct option longopts[] = {
        {"mode", required_argument, NULL, 'm'},         {"count", required_argument, NULL, 'n'},
        {"seconds", required_argument, NULL, 't'},      {"warmup", required_argument, NULL, 'w'},
        {"max-samples", required_argument, NULL, 'M'},  {"request-size", required_argument, NULL, 'q'},
        {"reply-size", required_argument, NULL, 'p'},   {NULL, 0, NULL, 0},
    };
    *o = (struct options){.warmup = 100, .max_samples = 5000000, .request_size = 32,
                          .reply_size = 36};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'm':
            if (strcmp(optarg, "unix") == 0)
                o->eventfd = false;
            else if (strcmp(optarg, "eventfd") == 0)
                o->eventfd = true;
            else
                die(EXIT_USAGE, "--mode: expected unix or eventfd, got %s", optarg);
            break;
        case 'n': o->count = parse_u64("count", optarg); break;
        case 't': {
            char *end;
            o->seconds = strtod(optarg, &end);
            if (*end != '\0' || !(o->seconds > 0.0))
                die(EXIT_USAGE, "--seconds: not a positive number: %s", optarg);
            break;
        }
        case 'w': o->warmup = parse_u64("warmup", optarg); break;
        case 'M': o->max_samples = parse_u64("max-samples", optarg); break;
        case 'q': o->request_size = (size_t)parse_u64("request-size", optarg); break;
        case 'p': o->reply_size = (size_t)parse_u64("reply-size", optarg); break;
        default:
            fputs("usage: pingpong [--mode unix|eventfd] [--count N | --seconds S] [--warmup N]\n"
                  "       [--max-samples N] [--request-size B] [--reply-size B]\n",
                  stderr);
            exit(EXIT_USAGE);
        }
    }
    if (optind != argc)
        die(EXIT_USAGE, "unexpected argument %s", argv[optind]);
    if (o->count != 0 && o->seconds > 0.0)
        die(EXIT_USAGE, "give at most one of --count and --seconds");
    if (o->count == 0 && !(o->seconds > 0.0))
        o->seconds = 1.0;
    if (o->request_size < 1 || o->request_size > MAX_MSG || o->reply_size < 1 ||
        o->reply_size > MAX_MSG)
        die(EXIT_USAGE, "message sizes must be 1..%u bytes", MAX_MSG);
    if (o->count == 0 && o->max_samples < 1)
        die(EXIT_USAGE, "--max-samples must be at least 1");
}

int main(int argc, char **argv)
{
    struct options opt;
    parse_options(argc, argv, &opt);

    static struct link l;
    int child_sock = -1, from_parent = -1, to_parent = -1;
    if (opt.eventfd) {
        from_parent = l.to_child = eventfd(0, EFD_CLOEXEC);
        to_parent = l.from_child = eventfd(0, EFD_CLOEXEC);
        if (l.to_child < 0 || l.from_child < 0)
            die(EXIT_IO, "eventfd: %s", strerror(errno));
    } else {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
            die(EXIT_IO, "socketpair: %s", strerror(errno));
        l.sock = sv[0];
        child_sock = sv[1];
        memset(l.request, 0xa5, sizeof(l.request));
    }

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        die(EXIT_IO, "fork: %s", strerror(errno));
    if (pid == 0) {
        /* Never outlive a parent that was killed (e.g. by a timeout). */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(0);
        if (!opt.eventfd)
            close(l.sock);
        child_loop(&opt, child_sock, from_parent, to_parent);
    }
    if (!opt.eventfd)
        close(child_sock);

    for (uint64_t i = 0; i < opt.warmup; i++)
        round_trip(&opt, &l);

    uint64_t capacity = opt.count != 0 ? opt.count : opt.max_samples;
    uint64_t *samples = malloc(capacity * sizeof(*samples));
    if (samples == NULL)
        die(EXIT_IO, "cannot allocate %" PRIu64 " latency samples", capacity);
    uint64_t t0 = now_ns();
    uint64_t deadline = opt.count != 0 ? 0 : t0 + (uint64_t)(opt.seconds * 1e9);
    uint64_t n = 0;
    while (n < capacity) {
        uint64_t start = now_ns();
        if (deadline != 0 && start >= deadline)
            break;
        round_trip(&opt, &l);
        samples[n++] = now_ns() - start;
    }
    double seconds = (double)(now_ns() - t0) / 1e9;

    if (opt.eventfd)
        event_signal(l.to_child, EVENT_STOP);
    else
        close(l.sock);
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            die(EXIT_IO, "waitpid: %s", strerror(errno));
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die(EXIT_IO, "child failed (status 0x%x)", status);

    qsort(samples, n, sizeof(*samples), cmp_u64);
    printf("{\"tool\":\"pingpong\",\"mode\":\"%s\",\"request_size\":%zu,\"reply_size\":%zu,"
           "\"messages\":%" PRIu64 ",\"round_trips\":%" PRIu64 ",\"seconds\":%.6f,"
           "\"round_trips_per_s\":%.1f,\"median_us\":%.3f,\"p99_us\":%.3f}\n",
           opt.eventfd ? "eventfd" : "unix", opt.eventfd ? (size_t)8 : opt.request_size,
           opt.eventfd ? (size_t)8 : opt.reply_size, n, n, seconds, (double)n / seconds,
           percentile_us(samples, n, 50), percentile_us(samples, n, 99));
    free(samples);
    return 0;
}
