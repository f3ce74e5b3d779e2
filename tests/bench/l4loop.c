/* The system calls of the agent's L4 probes and nothing else, paced like the full agent, for
 * the kernel's share of a probe (tests/bench/agent_kernel_trace.py prints the agent's).
 *
 *     cc -O2 -o l4loop l4loop.c && taskset -c 0 ./l4loop tcp|udp PORT RATE SECONDS [GRAIN_MS]
 *
 * tcp: socket (non-blocking), SO_LINGER {1,0}, connect, epoll_ctl (one-shot), close (an RST)
 * when writable. udp: socket, IP_RECVERR, SO_TIMESTAMPNS, connect, send of a DNS query,
 * epoll_ctl, recvmsg with ancillary data, close. Starts RATE probes a second from one epoll
 * loop (a timeout to the next due start, in whole ms: GRAIN_MS at least, default 1), and
 * prints probes started, done and failed, and user and system CPU and context switches per
 * probe (getrusage). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const unsigned char query[] = "\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
                                     "\x07" "example" "\x03" "com" "\x00\x00\x01\x00\x01";

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s tcp|udp PORT RATE SECONDS [GRAIN_MS]\n", argv[0]);
        return 2;
    }
    int udp = strcmp(argv[1], "udp") == 0;
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    double rate = atof(argv[3]), seconds = atof(argv[4]);
    int grain_ms = argc > 5 ? atoi(argv[5]) : 1;
    int ep = epoll_create1(0);
    struct linger rst = {1, 0};
    int one = 1;
    long done = 0, failed = 0, started = 0;
    double start = now(), next = start, end = start + seconds;
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    while (now() < end) {
        while (next <= now()) {
            next += 1.0 / rate;
            int s = socket(AF_INET, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK, 0);
            if (udp) {
                setsockopt(s, IPPROTO_IP, IP_RECVERR, &one, sizeof one);
                setsockopt(s, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
            } else {
                setsockopt(s, SOL_SOCKET, SO_LINGER, &rst, sizeof rst);
            }
            int err = connect(s, (struct sockaddr *)&to, sizeof to);
            if (udp && err == 0)
                send(s, query, sizeof query - 1, 0);
            else if (!udp && err != 0 && errno != EINPROGRESS) {
                close(s);
                failed++;
                continue;
            }
            struct epoll_event ev = {.events = (udp ? EPOLLIN : EPOLLOUT) | EPOLLONESHOT,
                                     .data.fd = s};
            epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
            started++;
        }
        struct epoll_event events[256];
        /* whole milliseconds, rounded up, as the agent's loop (uvloop) waits: two starts a
         * wake-up at 2,000/s; with a longer grain the due starts are made in bursts */
        int wait_ms = (int)((next - now()) * 1000) + 1;
        int n = epoll_wait(ep, events, 256, wait_ms > grain_ms ? wait_ms : grain_ms);
        for (int i = 0; i < n; i++) {
            int s = events[i].data.fd;
            if (udp) {
                char buf[2048], control[512];
                struct iovec iov = {buf, sizeof buf};
                struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                                     .msg_controllen = sizeof control};
                if (recvmsg(s, &msg, 0) < 0)
                    failed++;
            } else if (events[i].events & (EPOLLERR | EPOLLHUP)) {
                failed++;
            }
            close(s);
            done++;
        }
    }
    getrusage(RUSAGE_SELF, &r1);
    double user = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) +
                  (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) / 1e6;
    double sys = (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) +
                 (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) / 1e6;
    /* started done failed, then per probe: user us, system us, voluntary and involuntary
     * context switches (read by tests/bench/test_full_agent_bench.py) */
    printf("%ld %ld %ld %.2f %.2f %.4f %.4f\n", started, done, failed, user / done * 1e6,
           sys / done * 1e6, (double)(r1.ru_nvcsw - r0.ru_nvcsw) / done,
           (double)(r1.ru_nivcsw - r0.ru_nivcsw) / done);
    return 0;
}
