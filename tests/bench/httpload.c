/* A keep-alive HTTP/1.1 load generator for the /probe benchmarks: the same driver for every
 * side, so neither is measured through a slower client. One thread, epoll, CONNS connections,
 * each sending the next GET as soon as the previous answer is complete (closed loop).
 *
 *   httpload HOST PORT PATH CONNS SECONDS [RATE]
 *
 * With RATE (requests per second, all connections together) it is a scraper instead: request k
 * is due at start + k / RATE and goes out on the first idle connection (open loop, as
 * Prometheus scrapes on its schedule whatever the answers do); a request's latency then counts
 * from its due time, so a server that falls behind shows as latency, not as fewer requests.
 *
 * Prints one line: requests answered, answers without "probe_success 1", then every request's
 * latency in microseconds is summarised as p50 and p99 (all samples kept); with RATE also the
 * most requests that were ever due while no connection was idle.
 * Build: cc -O2 -o httpload httpload.c */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536

struct conn { int fd; double sent; size_t have; char buf[BUF]; };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: httpload HOST PORT PATH CONNS SECONDS [RATE]\n");
        return 2;
    }
    int conns = atoi(argv[4]);
    double seconds = atof(argv[5]);
    double rate = argc == 7 ? atof(argv[6]) : 0.0;
    char req[2048];
    int reqlen = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%s\r\n\r\n",
                          argv[3], argv[1], argv[2]);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    int ep = epoll_create1(0);
    struct conn *cs = calloc(conns, sizeof *cs);
    size_t cap = 1 << 20, n = 0;
    double *lat = malloc(cap * sizeof *lat);
    long done = 0, failed = 0;
    double start = now(), end = start + seconds;
    int *idle = malloc(conns * sizeof *idle), idle_n = 0;
    long issued = 0, backlog = 0, max_backlog = 0;
    for (int i = 0; i < conns; i++) {
        cs[i].fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(cs[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(cs[i].fd, (struct sockaddr *)&addr, sizeof addr) != 0) { perror("connect"); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
        if (rate > 0) { idle[idle_n++] = i; continue; }
        cs[i].sent = now();
        if (write(cs[i].fd, req, reqlen) != reqlen) { perror("write"); return 1; }
    }
    struct epoll_event evs[256];
    int open = conns;
    while (open > 0) {
        int wait_ms = 1000;
        if (rate > 0) {
            double t = now(), due = start + issued / rate;
            while (due <= t && due < end && idle_n > 0) {
                struct conn *c = &cs[idle[--idle_n]];
                c->sent = due;
                if (write(c->fd, req, reqlen) != reqlen) { perror("write"); return 1; }
                issued++;
                due = start + issued / rate;
            }
            backlog = due <= t && due < end ? (long)((t - due) * rate) + 1 : 0;
            if (backlog > max_backlog) max_backlog = backlog;
            if (due >= end && idle_n == conns) break;
            if (due < end && idle_n > 0) wait_ms = (int)((due - t) * 1000) + 1;
        }
        int k = epoll_wait(ep, evs, 256, wait_ms);
        for (int e = 0; e < k; e++) {
            struct conn *c = &cs[evs[e].data.u32];
            ssize_t r = read(c->fd, c->buf + c->have, BUF - 1 - c->have);
            if (r <= 0) { fprintf(stderr, "connection closed\n"); return 1; }
            c->have += r;
            c->buf[c->have] = 0;
            char *head_end = strstr(c->buf, "\r\n\r\n");
            if (!head_end) continue;
            char *cl = strcasestr(c->buf, "content-length:");
            if (!cl || cl > head_end) { fprintf(stderr, "no content-length\n"); return 1; }
            size_t body = strtoul(cl + 15, NULL, 10);
            size_t total = (head_end + 4 - c->buf) + body;
            if (c->have < total) continue;
            double t = now();
            if (n == cap) { cap *= 2; lat = realloc(lat, cap * sizeof *lat); }
            lat[n++] = (t - c->sent) * 1e6;
            done++;
            if (!strstr(head_end, "probe_success 1")) failed++;
            memmove(c->buf, c->buf + total, c->have - total);
            c->have -= total;
            if (rate > 0) { idle[idle_n++] = evs[e].data.u32; continue; }
            if (t >= end) { close(c->fd); open--; continue; }
            c->sent = t;
            if (write(c->fd, req, reqlen) != reqlen) { perror("write"); return 1; }
        }
    }
    qsort(lat, n, sizeof *lat, cmp);
    printf("%ld %ld %.1f %.1f", done, failed, n ? lat[n / 2] : 0.0,
           n ? lat[(size_t)(n * 0.99)] : 0.0);
    if (rate > 0) printf(" %ld", max_backlog);
    printf("\n");
    return 0;
}
