/*
 * vfu_loadgen: a vfio-user client that drives one workload against a server
 * and prints one line of JSON with the results.
 *
 * Workloads (--mode):
 *   read      REGION_READ of --size bytes at --region/--offset, one at a time.
 *   pipeline  the same reads with --depth requests kept in flight.
 *   posted    --batch REGION_WRITEs with No_reply set, then one REGION_READ
 *             that is waited for; one "round trip" is one whole batch.
 *   bypass    --batch pairs of one No_reply REGION_WRITE to --region/--offset
 *             and one REGION_READ of --read-region/--read-offset, then one
 *             REGION_READ of --region/--offset (which the spec, and any policy
 *             keeping a region's order, answers after the writes), all sent
 *             before any reply is awaited; one round trip is one batch, and
 *             the --read-region reads' latencies are reported on their own
 *             (read_*).
 *   queues    REGION_WRITEs (with a reply) of --size bytes spread round-robin
 *             over --queues doorbell registers, --stride bytes apart from
 *             --offset in --region, --depth in flight; a round trip is one
 *             doorbell.
 *
 * Replies are matched to requests by message ID: a table holds every request
 * outstanding. A reply may come in any order; a reply to an ID that is not
 * outstanding (unknown, or answered already) is a protocol error. Every reply
 * is checked (type bit, no Error flag, command, exact size, echoed
 * offset/region/count). Exit status: 0 ok, 2 usage, 3 protocol error, 4 I/O
 * error; the reason goes to stderr.
 *
 * Latencies are taken with CLOCK_MONOTONIC into preallocated arrays and the
 * percentiles are computed after the run, so the measured loop does no
 * allocation and no sorting.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BENCH_PROG "vfu_loadgen"
#include "bench_common.h"

#define MAX_DEPTH 4096u

static void send_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
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

/* Buffered reader: one recv() may bring part of a reply or several replies. */
struct reader {
    int fd;
    uint8_t *buf;
    size_t cap;
    size_t start; /* first unconsumed byte */
    size_t end;   /* one past the last received byte */
};

static void reader_init(struct reader *r, int fd, size_t cap)
{
    r->fd = fd;
    r->cap = cap;
    r->start = r->end = 0;
    r->buf = malloc(cap);
    if (r->buf == NULL)
        die(EXIT_IO, "out of memory");
}

/* Make at least `need` unconsumed bytes available, compacting or growing as needed. */
static void reader_fill(struct reader *r, size_t need)
{
    if (r->end - r->start >= need)
        return;
    if (r->cap - r->start < need) {
        memmove(r->buf, r->buf + r->start, r->end - r->start);
        r->end -= r->start;
        r->start = 0;
        if (r->cap < need) {
            uint8_t *grown = realloc(r->buf, need);
            if (grown == NULL)
                die(EXIT_IO, "out of memory");
            r->buf = grown;
            r->cap = need;
        }
    }
    while (r->end - r->start < need) {
        ssize_t n = recv(r->fd, r->buf + r->end, r->cap - r->end, 0);
        if (n == 0)
            die(EXIT_PROTOCOL, "server closed the connection");
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(EXIT_IO, "recv: %s", strerror(errno));
        }
        r->end += (size_t)n;
    }
}

/* Next whole message; the returned pointer is valid until the next call. */
static const uint8_t *read_message(struct reader *r, struct header *h)
{
    reader_fill(r, HDR_SIZE);
    memcpy(h, r->buf + r->start, HDR_SIZE);
    if (h->msg_size < HDR_SIZE)
        die(EXIT_PROTOCOL, "reply msg_size %" PRIu32 " is below the header size", h->msg_size);
    if (h->msg_size > HDR_SIZE + RW_HEAD_SIZE + MAX_XFER + 4096u)
        die(EXIT_PROTOCOL, "reply msg_size %" PRIu32 " is larger than anything we asked for",
            h->msg_size);
    reader_fill(r, h->msg_size);
    const uint8_t *msg = r->buf + r->start;
    r->start += h->msg_size;
    if (r->start == r->end)
        r->start = r->end = 0;
    return msg;
}

/* The checks every reply gets: a reply, not an error. */
static void check_reply_flags(const struct header *h)
{
    if ((h->flags & FLAG_TYPE_MASK) != FLAG_TYPE_REPLY)
        die(EXIT_PROTOCOL, "message %u (command %u) is not typed as a reply (flags 0x%" PRIx32 ")",
            h->msg_id, h->command, h->flags);
    if (h->flags & FLAG_ERROR)
        die(EXIT_PROTOCOL, "command %u (message %u) failed: errno %" PRIu32 " (%s)", h->command,
            h->msg_id, h->error, strerror((int)h->error));
}

static void check_reply_command(const struct header *h, uint16_t command)
{
    if (h->command != command)
        die(EXIT_PROTOCOL, "reply carries command %u, expected %u", h->command, command);
}

static void handshake(int fd, struct reader *r)
{
    const size_t json_len = sizeof(CAPABILITIES); /* includes the NUL */
    const size_t payload = 4 + json_len;
    uint8_t msg[HDR_SIZE + 4 + sizeof(CAPABILITIES)];
    struct header h = {
        .msg_id = 0,
        .command = CMD_VERSION,
        .msg_size = (uint32_t)(HDR_SIZE + payload),
        .flags = FLAG_TYPE_COMMAND,
        .error = 0,
    };
    const uint16_t version[2] = {0, 0}; /* major, minor */
    memcpy(msg, &h, HDR_SIZE);
    memcpy(msg + HDR_SIZE, version, 4);
    memcpy(msg + HDR_SIZE + 4, CAPABILITIES, json_len);
    send_all(fd, msg, sizeof(msg));

    struct header rh;
    const uint8_t *reply = read_message(r, &rh);
    check_reply_flags(&rh);
    check_reply_command(&rh, CMD_VERSION);
    if (rh.msg_id != 0)
        die(EXIT_PROTOCOL, "VERSION reply carries message ID %u, we sent 0", rh.msg_id);
    size_t rpayload = rh.msg_size - HDR_SIZE;
    if (rpayload < 4)
        die(EXIT_PROTOCOL, "VERSION reply payload is %zu bytes, below 4", rpayload);
    uint16_t rversion[2];
    memcpy(rversion, reply + HDR_SIZE, 4);
    if (rversion[0] != 0)
        die(EXIT_PROTOCOL, "VERSION reply has major %u, we proposed 0", rversion[0]);
    if (rversion[1] != 0)
        die(EXIT_PROTOCOL, "VERSION reply has minor %u, above the 0 we proposed", rversion[1]);
    if (rpayload > 4 && reply[rh.msg_size - 1] != '\0')
        die(EXIT_PROTOCOL, "VERSION reply JSON is not NUL-terminated");
}

enum mode { MODE_READ, MODE_PIPELINE, MODE_POSTED, MODE_BYPASS, MODE_QUEUES };
static const char *const MODE_NAMES[] = {"read", "pipeline", "posted", "bypass", "queues"};

struct options {
    const char *socket_path;
    int fd;
    enum mode mode;
    unsigned depth;
    unsigned batch;
    uint64_t count;   /* round trips to measure; 0 = run for `seconds` */
    double seconds;
    uint32_t region;
    uint64_t offset;
    uint32_t read_region; /* bypass: where the reads go */
    uint64_t read_offset;
    unsigned queues;      /* queues: doorbell registers ... */
    uint64_t stride;      /* ... this many bytes apart */
    uint32_t size;
    uint64_t warmup;
    uint64_t max_samples;
};

/* A request awaiting its reply, in the table indexed by message ID. */
struct slot {
    uint64_t sent_at;
    uint64_t offset;
    uint32_t region;
    uint16_t command;
    bool busy;
    bool timed; /* a read whose latency goes to the read samples */
};

#define ID_SPACE 65536u

struct client {
    int fd;
    struct reader rd;
    const struct options *opt;
    uint8_t read_req[HDR_SIZE + RW_HEAD_SIZE];
    uint8_t *write_req; /* header + head + data */
    size_t write_req_len;
    uint16_t next_id;
    unsigned in_flight;
    struct slot *slots; /* ID_SPACE entries */
    uint64_t *read_samples; /* read latencies (bypass), NULL while warming up */
    uint64_t read_count;
    uint64_t read_capacity;
    uint64_t next_queue;
};

static void build_requests(struct client *c)
{
    const struct options *o = c->opt;
    struct header h = {
        .msg_id = 0,
        .command = CMD_REGION_READ,
        .msg_size = HDR_SIZE + RW_HEAD_SIZE,
        .flags = FLAG_TYPE_COMMAND,
        .error = 0,
    };
    memcpy(c->read_req, &h, HDR_SIZE);

    c->write_req_len = HDR_SIZE + RW_HEAD_SIZE + o->size;
    c->write_req = malloc(c->write_req_len);
    if (c->write_req == NULL)
        die(EXIT_IO, "out of memory");
    h.command = CMD_REGION_WRITE;
    h.msg_size = (uint32_t)c->write_req_len;
    h.flags = FLAG_TYPE_COMMAND;
    memcpy(c->write_req, &h, HDR_SIZE);
    memset(c->write_req + HDR_SIZE + RW_HEAD_SIZE, 0xa5, o->size);
}

static uint16_t take_id(struct client *c)
{
    uint16_t id = c->next_id++;
    if (c->slots[id].busy)
        die(EXIT_PROTOCOL, "message ID %u is still awaiting its reply after %u more requests",
            id, ID_SPACE);
    return id;
}

/* Send a request; one with a reply is entered in the table. */
static void send_access(struct client *c, uint16_t command, bool posted, uint32_t region,
                        uint64_t offset, bool timed)
{
    const struct options *o = c->opt;
    uint16_t id = take_id(c);
    struct rw_head rw = {.offset = offset, .region = region, .count = o->size};
    uint8_t *msg = command == CMD_REGION_READ ? c->read_req : c->write_req;
    size_t len = command == CMD_REGION_READ ? sizeof(c->read_req) : c->write_req_len;
    uint32_t flags = FLAG_TYPE_COMMAND | (posted ? FLAG_NO_REPLY : 0u);
    memcpy(msg, &id, sizeof(id)); /* msg_id is the first header field */
    memcpy(msg + 8, &flags, sizeof(flags));
    memcpy(msg + HDR_SIZE, &rw, RW_HEAD_SIZE);
    if (!posted) {
        c->slots[id] = (struct slot){.sent_at = now_ns(), .offset = offset, .region = region,
                                     .command = command, .busy = true, .timed = timed};
        c->in_flight++;
    }
    send_all(c->fd, msg, len);
}

/* Take the next reply, check it against the request with its ID; returns its latency. */
static uint64_t await_reply(struct client *c)
{
    const struct options *o = c->opt;
    struct header h;
    const uint8_t *msg = read_message(&c->rd, &h);
    check_reply_flags(&h);
    struct slot *slot = &c->slots[h.msg_id];
    if (!slot->busy)
        die(EXIT_PROTOCOL, "reply to message %u, which is not awaiting one (unknown or answered)",
            h.msg_id);
    uint64_t latency = now_ns() - slot->sent_at;
    slot->busy = false;
    c->in_flight--;
    check_reply_command(&h, slot->command);
    uint32_t expected = RW_HEAD_SIZE + (slot->command == CMD_REGION_READ ? o->size : 0u);
    if (h.msg_size != HDR_SIZE + expected)
        die(EXIT_PROTOCOL, "%s reply payload is %" PRIu32 " bytes, expected %" PRIu32,
            slot->command == CMD_REGION_READ ? "REGION_READ" : "REGION_WRITE",
            h.msg_size - HDR_SIZE, expected);
    struct rw_head rw;
    memcpy(&rw, msg + HDR_SIZE, RW_HEAD_SIZE);
    if (rw.offset != slot->offset || rw.region != slot->region || rw.count != o->size)
        die(EXIT_PROTOCOL,
            "reply to message %u echoes offset %" PRIu64 " region %" PRIu32 " count %" PRIu32
            ", asked for %" PRIu64 "/%" PRIu32 "/%" PRIu32,
            h.msg_id, rw.offset, rw.region, rw.count, slot->offset, slot->region, o->size);
    if (slot->timed && c->read_samples != NULL && c->read_count < c->read_capacity)
        c->read_samples[c->read_count++] = latency;
    return latency;
}

/* One request of the pipelined workloads: a read, or a doorbell of the next queue. */
static void send_pipelined(struct client *c)
{
    const struct options *o = c->opt;
    if (o->mode == MODE_QUEUES) {
        uint64_t queue = c->next_queue++ % o->queues;
        send_access(c, CMD_REGION_WRITE, false, o->region, o->offset + queue * o->stride, false);
    } else {
        send_access(c, CMD_REGION_READ, false, o->region, o->offset, false);
    }
}

/*
 * Requests with `depth` in flight until `limit` round trips are done or, when
 * `deadline` is non-zero, no new request is issued after it. Replies may come
 * in any order; per-request latency goes to samples[i] when samples is not
 * NULL. Returns round trips.
 */
static uint64_t run_pipelined(struct client *c, unsigned depth, uint64_t limit,
                              uint64_t deadline, uint64_t *samples)
{
    uint64_t issued = 0, done = 0;
    while (issued < limit && issued < depth) {
        send_pipelined(c);
        issued++;
    }
    while (done < issued) {
        uint64_t latency = await_reply(c);
        if (samples != NULL)
            samples[done] = latency;
        done++;
        if (issued < limit && (deadline == 0 || now_ns() < deadline)) {
            send_pipelined(c);
            issued++;
        }
    }
    return done;
}

/* Batches of posted writes, each closed by a read that is waited for. */
static uint64_t run_posted(struct client *c, uint64_t limit, uint64_t deadline, uint64_t *samples)
{
    const struct options *o = c->opt;
    uint64_t done = 0;
    while (done < limit) {
        uint64_t t0 = now_ns();
        if (deadline != 0 && t0 >= deadline)
            break;
        for (unsigned k = 0; k < o->batch; k++)
            send_access(c, CMD_REGION_WRITE, true, o->region, o->offset, false);
        send_access(c, CMD_REGION_READ, false, o->region, o->offset, false);
        await_reply(c);
        if (samples != NULL)
            samples[done] = now_ns() - t0;
        done++;
    }
    return done;
}

/* Rounds of (posted write to region A, read of region B) x batch and a read of region A
 * (so a round ends once its writes are done: no backlog of writes builds up), then every
 * reply. */
static uint64_t run_bypass(struct client *c, uint64_t limit, uint64_t deadline, uint64_t *samples)
{
    const struct options *o = c->opt;
    uint64_t done = 0;
    while (done < limit) {
        uint64_t t0 = now_ns();
        if (deadline != 0 && t0 >= deadline)
            break;
        for (unsigned k = 0; k < o->batch; k++) {
            send_access(c, CMD_REGION_WRITE, true, o->region, o->offset, false);
            send_access(c, CMD_REGION_READ, false, o->read_region, o->read_offset, true);
        }
        send_access(c, CMD_REGION_READ, false, o->region, o->offset, false);
        while (c->in_flight > 0)
            await_reply(c);
        if (samples != NULL)
            samples[done] = now_ns() - t0;
        done++;
    }
    return done;
}

static uint64_t run_workload(struct client *c, uint64_t limit, uint64_t deadline,
                             uint64_t *samples)
{
    switch (c->opt->mode) {
    case MODE_READ:
        return run_pipelined(c, 1, limit, deadline, samples);
    case MODE_PIPELINE:
    case MODE_QUEUES:
        return run_pipelined(c, c->opt->depth, limit, deadline, samples);
    case MODE_POSTED:
        return run_posted(c, limit, deadline, samples);
    case MODE_BYPASS:
        return run_bypass(c, limit, deadline, samples);
    }
    return 0;
}

static int connect_unix(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path))
        die(EXIT_USAGE, "socket path too long: %s", path);
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die(EXIT_IO, "socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die(EXIT_IO, "connect %s: %s", path, strerror(errno));
    return fd;
}

static void usage(void)
{
    fputs("usage: vfu_loadgen (--socket PATH | --fd N)\n"
          "       [--mode read|pipeline|posted|bypass|queues] [--depth D] [--batch K]\n"
          "       [--count N | --seconds S] [--region R] [--offset O] [--size BYTES]\n"
          "       [--read-region R] [--read-offset O] [--queues N] [--stride BYTES]\n"
          "       [--warmup N] [--max-samples N]\n",
          stderr);
    exit(EXIT_USAGE);
}

static void parse_options(int argc, char **argv, struct options *o)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 'S'},  {"fd", required_argument, NULL, 'f'},
        {"mode", required_argument, NULL, 'm'},    {"depth", required_argument, NULL, 'd'},
        {"batch", required_argument, NULL, 'b'},   {"count", required_argument, NULL, 'n'},
        {"seconds", required_argument, NULL, 't'}, {"region", required_argument, NULL, 'r'},
        {"offset", required_argument, NULL, 'o'},  {"size", required_argument, NULL, 's'},
        {"warmup", required_argument, NULL, 'w'},  {"max-samples", required_argument, NULL, 'M'},
        {"read-region", required_argument, NULL, 'R'},
        {"read-offset", required_argument, NULL, 'O'},
        {"queues", required_argument, NULL, 'q'},  {"stride", required_argument, NULL, 'x'},
        {NULL, 0, NULL, 0},
    };
    *o = (struct options){
        .fd = -1, .mode = MODE_READ, .depth = 1, .batch = 16, .size = 4,
        .warmup = 100, .max_samples = 5000000, .read_region = 1, .queues = 4, .stride = 4,
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'S': o->socket_path = optarg; break;
        case 'f': o->fd = (int)parse_u64("fd", optarg); break;
        case 'm': {
            bool known = false;
            for (unsigned m = 0; m < sizeof(MODE_NAMES) / sizeof(MODE_NAMES[0]); m++) {
                if (strcmp(optarg, MODE_NAMES[m]) == 0) {
                    o->mode = (enum mode)m;
                    known = true;
                }
            }
            if (!known)
                die(EXIT_USAGE, "--mode: unknown workload %s", optarg);
            break;
        }
        case 'd': o->depth = (unsigned)parse_u64("depth", optarg); break;
        case 'b': o->batch = (unsigned)parse_u64("batch", optarg); break;
        case 'n': o->count = parse_u64("count", optarg); break;
        case 't': {
            char *end;
            o->seconds = strtod(optarg, &end);
            if (*end != '\0' || !(o->seconds > 0.0))
                die(EXIT_USAGE, "--seconds: not a positive number: %s", optarg);
            break;
        }
        case 'r': o->region = (uint32_t)parse_u64("region", optarg); break;
        case 'o': o->offset = parse_u64("offset", optarg); break;
        case 's': o->size = (uint32_t)parse_u64("size", optarg); break;
        case 'w': o->warmup = parse_u64("warmup", optarg); break;
        case 'M': o->max_samples = parse_u64("max-samples", optarg); break;
        case 'R': o->read_region = (uint32_t)parse_u64("read-region", optarg); break;
        case 'O': o->read_offset = parse_u64("read-offset", optarg); break;
        case 'q': o->queues = (unsigned)parse_u64("queues", optarg); break;
        case 'x': o->stride = parse_u64("stride", optarg); break;
        default: usage();
        }
    }
    if (optind != argc)
        usage();
    if ((o->socket_path == NULL) == (o->fd < 0))
        die(EXIT_USAGE, "give exactly one of --socket and --fd");
    if (o->count != 0 && o->seconds > 0.0)
        die(EXIT_USAGE, "give at most one of --count and --seconds");
    if (o->count == 0 && !(o->seconds > 0.0))
        o->seconds = 1.0;
    if (o->depth < 1 || o->depth > MAX_DEPTH)
        die(EXIT_USAGE, "--depth must be 1..%u", MAX_DEPTH);
    if (o->mode != MODE_PIPELINE && o->mode != MODE_QUEUES && o->depth != 1)
        die(EXIT_USAGE, "--depth applies to --mode pipeline and queues only");
    if ((o->mode == MODE_POSTED || o->mode == MODE_BYPASS) && o->batch < 1)
        die(EXIT_USAGE, "--batch must be at least 1");
    if (o->mode == MODE_BYPASS && o->batch > MAX_DEPTH)
        die(EXIT_USAGE, "--batch must be at most %u in --mode bypass (reads in flight)",
            MAX_DEPTH);
    if (o->mode == MODE_QUEUES && (o->queues < 1 || o->queues > MAX_DEPTH))
        die(EXIT_USAGE, "--queues must be 1..%u", MAX_DEPTH);
    if (o->size > MAX_XFER)
        die(EXIT_USAGE, "--size must not exceed %u (our max_data_xfer_size)", MAX_XFER);
    if (o->count == 0 && o->max_samples < 1)
        die(EXIT_USAGE, "--max-samples must be at least 1");
}

int main(int argc, char **argv)
{
    struct options opt;
    parse_options(argc, argv, &opt);

    struct client c = {.opt = &opt, .next_id = 1};
    c.fd = opt.socket_path != NULL ? connect_unix(opt.socket_path) : opt.fd;
    /* Room for several maximal replies so big pipelined reads rarely compact. */
    reader_init(&c.rd, c.fd, 2 * (HDR_SIZE + RW_HEAD_SIZE + (size_t)opt.size) + 65536);
    c.slots = calloc(ID_SPACE, sizeof(*c.slots));
    if (c.slots == NULL)
        die(EXIT_IO, "out of memory");
    build_requests(&c);
    handshake(c.fd, &c.rd);

    run_workload(&c, opt.warmup, 0, NULL);

    uint64_t capacity = opt.count != 0 ? opt.count : opt.max_samples;
    uint64_t *samples = malloc(capacity * sizeof(*samples));
    if (samples == NULL)
        die(EXIT_IO, "cannot allocate %" PRIu64 " latency samples", capacity);
    bool bypass = opt.mode == MODE_BYPASS;
    if (bypass) {
        c.read_capacity = capacity * opt.batch;
        c.read_samples = malloc(c.read_capacity * sizeof(*c.read_samples));
        if (c.read_samples == NULL)
            die(EXIT_IO, "cannot allocate %" PRIu64 " read latency samples", c.read_capacity);
    }
    uint64_t t0 = now_ns();
    uint64_t deadline = opt.count != 0 ? 0 : t0 + (uint64_t)(opt.seconds * 1e9);
    uint64_t round_trips = run_workload(&c, capacity, deadline, samples);
    double seconds = (double)(now_ns() - t0) / 1e9;
    close(c.fd);

    qsort(samples, round_trips, sizeof(*samples), cmp_u64);
    if (bypass)
        qsort(c.read_samples, c.read_count, sizeof(*c.read_samples), cmp_u64);
    bool posted = opt.mode == MODE_POSTED;
    bool batched = posted || bypass;
    uint64_t messages = posted ? round_trips * (opt.batch + 1u)
                        : bypass ? round_trips * (2u * opt.batch + 1u)
                                 : round_trips;
    uint64_t transfers = messages; /* every message moves --size bytes */
    bool deep = opt.mode == MODE_PIPELINE || opt.mode == MODE_QUEUES;
    printf("{\"tool\":\"vfu_loadgen\",\"mode\":\"%s\",\"depth\":%u,\"batch\":%u,"
           "\"queues\":%u,\"region\":%" PRIu32 ",\"offset\":%" PRIu64 ",\"size\":%" PRIu32 ","
           "\"messages\":%" PRIu64 ",\"round_trips\":%" PRIu64 ",\"seconds\":%.6f,"
           "\"round_trips_per_s\":%.1f,\"messages_per_s\":%.1f,\"mb_per_s\":%.3f,"
           "\"median_us\":%.3f,\"p99_us\":%.3f,\"reads\":%" PRIu64 ",\"read_median_us\":%.3f,"
           "\"read_p99_us\":%.3f,\"read_max_us\":%.3f}\n",
           MODE_NAMES[opt.mode], deep ? opt.depth : 1u, batched ? opt.batch : 0u,
           opt.mode == MODE_QUEUES ? opt.queues : 0u, opt.region, opt.offset, opt.size,
           messages, round_trips, seconds, (double)round_trips / seconds,
           (double)messages / seconds, (double)transfers * opt.size / seconds / 1e6,
           percentile_us(samples, round_trips, 50), percentile_us(samples, round_trips, 99),
           c.read_count, percentile_us(c.read_samples, c.read_count, 50),
           percentile_us(c.read_samples, c.read_count, 99),
           percentile_us(c.read_samples, c.read_count, 100));
    free(samples);
    free(c.read_samples);
    free(c.slots);
    free(c.write_req);
    free(c.rd.buf);
    return 0;
}
