/*
 * vfu_echo: the smallest useful vfio-user server, the C baseline the Python
 * servers are compared against.
 *
 * Listens on a UNIX socket path (or serves an inherited connected fd), accepts
 * clients one after another (--clients N, 0 = until killed) and answers each
 * in a plain blocking loop: recv the header, recv the payload, send the reply
 * with a single sendmsg. It answers VERSION (major 0, minor 0, our
 * capabilities), REGION_READ (16 + count bytes, data from a backing buffer
 * shared by all regions), REGION_WRITE (data stored, 16-byte echo), honours
 * No_reply, and rejects everything else with EINVAL (header-only error reply).
 *
 * Once listening it prints {"listening":true} on stdout so a parent can wait
 * for readiness without polling. SIGTERM/SIGINT remove the socket file and
 * exit 0. Exit status: 0 ok, 2 usage, 3 protocol error from a client, 4 I/O.
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
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define BENCH_PROG "vfu_echo"
#include "bench_common.h"

/* Largest message we accept: a maximal REGION_WRITE (VERSION JSON is far smaller). */
#define MAX_MSG (HDR_SIZE + RW_HEAD_SIZE + MAX_XFER)
#define NUM_REGIONS 9u /* the fixed vfio PCI region indexes */

static const char *socket_path; /* unlinked on exit, also from the signal handler */

static void remove_socket(void)
{
    if (socket_path != NULL)
        unlink(socket_path);
}

static void on_signal(int sig)
{
    (void)sig;
    if (socket_path != NULL)
        unlink(socket_path);
    _exit(0);
}

/* Receives exactly len bytes; false on a clean EOF before the first byte. */
static bool recv_exact(int fd, void *buf, size_t len, bool eof_ok)
{
    uint8_t *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(fd, p + got, len - got, MSG_WAITALL);
        if (n == 0) {
            if (got == 0 && eof_ok)
                return false;
            die(EXIT_PROTOCOL, "client closed the connection inside a message");
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

/* One sendmsg per reply: header plus up to two payload pieces. */
static void send_reply(int fd, const struct header *req, uint32_t error, const void *a,
                       size_t alen, const void *b, size_t blen)
{
    struct header h = {
        .msg_id = req->msg_id,
        .command = req->command,
        .msg_size = error != 0 ? HDR_SIZE : (uint32_t)(HDR_SIZE + alen + blen),
        .flags = FLAG_TYPE_REPLY | (error != 0 ? FLAG_ERROR : 0u),
        .error = error,
    };
    struct iovec iov[3] = {
        {.iov_base = &h, .iov_len = HDR_SIZE},
        {.iov_base = (void *)a, .iov_len = error != 0 ? 0 : alen},
        {.iov_base = (void *)b, .iov_len = error != 0 ? 0 : blen},
    };
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 3};
    size_t left = h.msg_size;
    while (left > 0) {
        ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die(EXIT_IO, "sendmsg: %s", strerror(errno));
        }
        left -= (size_t)n;
        /* A short send on a blocking stream socket is rare; skip what went out. */
        size_t sent = (size_t)n;
        while (sent > 0 && mh.msg_iovlen > 0) {
            if (sent >= mh.msg_iov->iov_len) {
                sent -= mh.msg_iov->iov_len;
                mh.msg_iov++;
                mh.msg_iovlen--;
            } else {
                mh.msg_iov->iov_base = (uint8_t *)mh.msg_iov->iov_base + sent;
                mh.msg_iov->iov_len -= sent;
                sent = 0;
            }
        }
    }
}

struct device {
    uint8_t *backing; /* every region maps onto this buffer */
    uint64_t region_size;
    uint8_t *payload; /* receive buffer, MAX_MSG bytes */
};

/* EINVAL unless the access lies in a known region (overflow-safe). */
static uint32_t check_access(const struct device *dev, const struct rw_head *rw)
{
    if (rw->region >= NUM_REGIONS || rw->count > MAX_XFER)
        return EINVAL;
    if (rw->offset > dev->region_size || rw->count > dev->region_size - rw->offset)
        return EINVAL;
    return 0;
}

static uint32_t check_version(const uint8_t *p, size_t len)
{
    if (len < 4)
        return EINVAL;
    uint16_t major;
    memcpy(&major, p, 2);
    if (major != 0)
        return EINVAL;
    if (len > 4 && p[len - 1] != '\0')
        return EINVAL;
    return 0;
}

/* Serves one connection until the client hangs up. */
static void serve(struct device *dev, int fd)
{
    bool negotiated = false;
    struct header h;
    while (recv_exact(fd, &h, HDR_SIZE, true)) {
        if (h.msg_size < HDR_SIZE || h.msg_size > MAX_MSG)
            /* The stream cannot be resynchronised after a bad size. */
            die(EXIT_PROTOCOL, "message %u has msg_size %" PRIu32, h.msg_id, h.msg_size);
        size_t len = h.msg_size - HDR_SIZE;
        recv_exact(fd, dev->payload, len, false);
        bool reply = !(h.flags & FLAG_NO_REPLY);
        const uint8_t *p = dev->payload;
        struct rw_head rw = {0};

        if ((h.flags & FLAG_TYPE_MASK) != FLAG_TYPE_COMMAND) {
            if (reply)
                send_reply(fd, &h, EINVAL, NULL, 0, NULL, 0);
        } else if (h.command == CMD_VERSION) {
            uint32_t err = negotiated ? EINVAL : check_version(p, len);
            negotiated = negotiated || err == 0;
            if (reply) {
                const uint16_t version[2] = {0, 0};
                send_reply(fd, &h, err, version, 4, CAPABILITIES, sizeof(CAPABILITIES));
            }
        } else if (!negotiated) {
            if (reply)
                send_reply(fd, &h, EINVAL, NULL, 0, NULL, 0);
        } else if (h.command == CMD_REGION_READ) {
            uint32_t err = EINVAL;
            if (len >= RW_HEAD_SIZE) {
                memcpy(&rw, p, RW_HEAD_SIZE);
                err = check_access(dev, &rw);
            }
            if (reply)
                send_reply(fd, &h, err, &rw, RW_HEAD_SIZE, dev->backing + rw.offset, rw.count);
        } else if (h.command == CMD_REGION_WRITE) {
            uint32_t err = EINVAL;
            if (len >= RW_HEAD_SIZE) {
                memcpy(&rw, p, RW_HEAD_SIZE);
                err = check_access(dev, &rw);
                if (err == 0 && len - RW_HEAD_SIZE != rw.count)
                    err = EINVAL;
                if (err == 0)
                    memcpy(dev->backing + rw.offset, p + RW_HEAD_SIZE, rw.count);
            }
            if (reply)
                send_reply(fd, &h, err, &rw, RW_HEAD_SIZE, NULL, 0);
        } else if (reply) {
            send_reply(fd, &h, EINVAL, NULL, 0, NULL, 0);
        }
    }
}

static int listen_unix(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path))
        die(EXIT_USAGE, "socket path too long: %s", path);
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die(EXIT_IO, "socket: %s", strerror(errno));
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die(EXIT_IO, "bind %s: %s", path, strerror(errno));
    socket_path = path; /* ours now: remove it on every exit path */
    bench_on_exit = remove_socket;
    if (listen(fd, 8) < 0)
        die(EXIT_IO, "listen: %s", strerror(errno));
    return fd;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 'S'},
        {"fd", required_argument, NULL, 'f'},
        {"clients", required_argument, NULL, 'c'},
        {"region-size", required_argument, NULL, 'z'},
        {NULL, 0, NULL, 0},
    };
    const char *path = NULL;
    int conn_fd = -1;
    uint64_t clients = 1;
    struct device dev = {.region_size = MAX_XFER};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'S': path = optarg; break;
        case 'f': conn_fd = (int)parse_u64("fd", optarg); break;
        case 'c': clients = parse_u64("clients", optarg); break;
        case 'z': dev.region_size = parse_u64("region-size", optarg); break;
        default:
            fputs("usage: vfu_echo (--socket PATH | --fd N) [--clients N] [--region-size BYTES]\n",
                  stderr);
            return EXIT_USAGE;
        }
    }
    if (optind != argc || (path == NULL) == (conn_fd < 0))
        die(EXIT_USAGE, "give exactly one of --socket and --fd");
    if (dev.region_size < 1 || dev.region_size > (1ull << 30))
        die(EXIT_USAGE, "--region-size must be 1 byte .. 1 GiB");

    dev.backing = calloc(1, dev.region_size);
    dev.payload = malloc(MAX_MSG);
    if (dev.backing == NULL || dev.payload == NULL)
        die(EXIT_IO, "out of memory");

    if (conn_fd >= 0) {
        serve(&dev, conn_fd);
        close(conn_fd);
        return 0;
    }

    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int lfd = listen_unix(path);
    puts("{\"listening\":true}");
    fflush(stdout);

    uint64_t served = 0;
    while (clients == 0 || served < clients) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            die(EXIT_IO, "accept: %s", strerror(errno));
        }
        serve(&dev, fd);
        close(fd);
        served++;
    }
    close(lfd);
    unlink(path);
    free(dev.payload);
    free(dev.backing);
    return 0;
}
