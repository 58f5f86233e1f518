"""C sources for the RTP benchmark, kept as strings (no committed .c files).

``bench_rtp`` writes them to a temp dir and builds them with ``gcc -O2``.

- ``LOADGEN``: the G.711 call simulator. One thread, a few UDP sockets per
  side, ``sendmmsg`` with a per-packet destination, ``recvmmsg`` to receive,
  the send time (CLOCK_MONOTONIC ns) in the payload, latency histogram in us.
- ``CRELAY``: the physical limit: epoll + recvmmsg/sendmmsg, fixed
  destinations, no latching, no counters.
"""

LOADGEN = r'''
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* usage: loadgen N pps_per_stream seconds gA gB k  < "portA portB" lines (N of them)
   Stream s = 2*call + side; side 0 sends from genA[call%k] to portA, side 1 from genB[call%k] to portB. */
#define BATCH 64
#define HIST 200000            /* 1 us bins up to 200 ms */
#define PKT 172
#define TICK 200000LL           /* pacing tick, ns */

static int64_t now_ns(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}
/* Stamp the send time into each packet right before the sendmmsg that sends it. */
static void stamp(struct iovec *v, int n) {
    int64_t t = now_ns(); for (int i = 0; i < n; i++) memcpy((unsigned char *)v[i].iov_base + 12, &t, 8);
}

int main(int argc, char **argv) {
    if (argc < 7) { fprintf(stderr, "usage\n"); return 2; }
    int n = atoi(argv[1]); double pps = atof(argv[2]); double secs = atof(argv[3]);
    int ga = atoi(argv[4]), gb = atoi(argv[5]), k = atoi(argv[6]);
    int nst = 2 * n, nsock = 2 * k;
    struct sockaddr_in *dst = calloc(nst, sizeof *dst);
    for (int i = 0; i < n; i++) {
        int pa, pb;
        if (scanf("%d %d", &pa, &pb) != 2) { fprintf(stderr, "short port list\n"); return 2; }
        for (int side = 0; side < 2; side++) {
            struct sockaddr_in *d = &dst[2 * i + side];
            d->sin_family = AF_INET; d->sin_addr.s_addr = htonl(0x7f000001);
            d->sin_port = htons(side ? pb : pa);
        }
    }
    int *fd = calloc(nsock, sizeof *fd);
    for (int j = 0; j < nsock; j++) {
        fd[j] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        int sz = 16 << 20;
        setsockopt(fd[j], SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz);
        setsockopt(fd[j], SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz);
        struct sockaddr_in a = {0}; a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(0x7f000001);
        a.sin_port = htons((j < k ? ga : gb) + (j % k));
        if (bind(fd[j], (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    }
    uint32_t *seq = calloc(nst, sizeof *seq);
    uint64_t *hist = calloc(HIST + 1, sizeof *hist);
    /* per-socket send batches */
    struct mmsghdr (*sm)[BATCH] = calloc(nsock, sizeof *sm);
    struct iovec (*sv)[BATCH] = calloc(nsock, sizeof *sv);
    unsigned char (*sb)[BATCH][PKT] = calloc(nsock, sizeof *sb);
    int *sn = calloc(nsock, sizeof *sn);
    struct mmsghdr rm[BATCH]; struct iovec rv[BATCH]; static unsigned char rb[BATCH][2048];
    for (int i = 0; i < BATCH; i++) {
        rv[i].iov_base = rb[i]; rv[i].iov_len = 2048; memset(&rm[i], 0, sizeof rm[i]);
        rm[i].msg_hdr.msg_iov = &rv[i]; rm[i].msg_hdr.msg_iovlen = 1;
    }
    uint64_t sent = 0, send_fail = 0, recvd = 0, bad = 0;
    double rate = pps * nst;                         /* packets per second, all streams */
    int64_t t0 = now_ns(), tend = t0 + (int64_t)(secs * 1e9), drain_end = tend + 300000000LL;
    uint64_t idx = 0;                                /* packets due so far */
    struct pollfd *pf = calloc(nsock, sizeof *pf);
    for (int j = 0; j < nsock; j++) { pf[j].fd = fd[j]; pf[j].events = POLLIN; }
    for (;;) {
        int64_t t = now_ns();
        if (t >= drain_end) break;
        if (t < tend) {
            uint64_t due = (uint64_t)((double)((t - t0) / TICK + 1) * TICK * rate / 1e9);
            while (idx < due) {
                int s = (int)(idx % (uint64_t)nst), call = s >> 1, side = s & 1;
                int j = side * k + call % k, b = sn[j];
                unsigned char *p = sb[j][b];
                uint32_t q = seq[s]++;
                p[0] = 0x80; p[1] = 0; p[2] = q >> 8; p[3] = q;
                uint32_t ts = q * 160; p[4] = ts >> 24; p[5] = ts >> 16; p[6] = ts >> 8; p[7] = ts;
                p[8] = s >> 24; p[9] = s >> 16; p[10] = s >> 8; p[11] = s;
                memcpy(p + 20, &s, 4);
                sv[j][b].iov_base = p; sv[j][b].iov_len = PKT;
                memset(&sm[j][b], 0, sizeof sm[j][b]);
                sm[j][b].msg_hdr.msg_name = &dst[s]; sm[j][b].msg_hdr.msg_namelen = sizeof dst[s];
                sm[j][b].msg_hdr.msg_iov = &sv[j][b]; sm[j][b].msg_hdr.msg_iovlen = 1;
                idx++;
                if (++sn[j] == BATCH) {
                    stamp(sv[j], BATCH);
                    int r = sendmmsg(fd[j], sm[j], BATCH, 0);
                    if (r < 0) r = 0;
                    sent += r; send_fail += BATCH - r; sn[j] = 0;
                }
            }
            for (int j = 0; j < nsock; j++) if (sn[j]) {
                stamp(sv[j], sn[j]);
                int r = sendmmsg(fd[j], sm[j], sn[j], 0);
                if (r < 0) r = 0;
                sent += r; send_fail += sn[j] - r; sn[j] = 0;
            }
        }
        int got_any = 0;
        for (int j = 0; j < nsock; j++) {
            for (int rounds = 0; rounds < 64; rounds++) {
                int r = recvmmsg(fd[j], rm, BATCH, MSG_DONTWAIT, NULL);
                if (r <= 0) break;
                got_any = 1;
                int64_t now = now_ns();
                for (int i = 0; i < r; i++) {
                    if (rm[i].msg_len != PKT) { bad++; continue; }
                    int64_t st; memcpy(&st, rb[i] + 12, 8);
                    int64_t us = (now - st) / 1000; if (us < 0) us = 0; if (us > HIST) us = HIST;
                    hist[us]++; recvd++;
                }
                if (r < BATCH) break;
            }
        }
        if (!got_any) {
            /* Pace in 200 us ticks (a sendmmsg batch per tick) and sleep in between,
               waking on input so receive timestamps stay accurate. */
            int64_t t2 = now_ns();
            int64_t wait = TICK - (t2 - t0) % TICK;
            struct timespec ts = {0, (long)wait};
            ppoll(pf, nsock, &ts, NULL);
        }
    }
    uint64_t c = 0, p50 = 0, p99 = 0, p999 = 0, mx = 0;
    for (int i = 0; i <= HIST; i++) {
        if (!hist[i]) continue;
        c += hist[i]; mx = i;
        if (!p50 && c * 2 >= recvd) p50 = i;
        if (!p99 && c * 100 >= recvd * 99) p99 = i;
        if (!p999 && c * 1000 >= recvd * 999) p999 = i;
    }
    struct rusage ru; getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    printf("{\"offered\": %llu, \"sent\": %llu, \"send_fail\": %llu, \"received\": %llu, \"bad\": %llu, "
           "\"p50_us\": %llu, \"p99_us\": %llu, \"p999_us\": %llu, \"max_us\": %llu, "
           "\"seconds\": %.3f, \"cpu_s\": %.3f}\n",
           (unsigned long long)idx, (unsigned long long)sent, (unsigned long long)send_fail,
           (unsigned long long)recvd, (unsigned long long)bad, (unsigned long long)p50,
           (unsigned long long)p99, (unsigned long long)p999, (unsigned long long)mx, secs, cpu);
    return 0;
}
'''

CRELAY = r'''
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* usage: crelay base N gA gB k ; call i: port base+4i (A side) <-> base+4i+2 (B side).
   A-side packets go out of the B socket to genB[i%k], and back. Runs until SIGTERM. */
#define BATCH 64
static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }

int main(int argc, char **argv) {
    if (argc < 6) return 2;
    int base = atoi(argv[1]), n = atoi(argv[2]), ga = atoi(argv[3]), gb = atoi(argv[4]), k = atoi(argv[5]);
    signal(SIGTERM, on_term);
    int *fd = calloc(2 * n, sizeof *fd);
    struct sockaddr_in *to = calloc(2 * n, sizeof *to);   /* destination for packets received on fd[x] */
    int ep = epoll_create1(0);
    for (int x = 0; x < 2 * n; x++) {
        int call = x >> 1, side = x & 1;
        fd[x] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        struct sockaddr_in a = {0}; a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(0x7f000001);
        a.sin_port = htons(base + 4 * call + 2 * side);
        if (bind(fd[x], (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
        int rb = 1 << 20;                                        /* same receive buffer as sipedge */
        setsockopt(fd[x], SOL_SOCKET, SO_RCVBUF, &rb, sizeof rb);
        to[x].sin_family = AF_INET; to[x].sin_addr.s_addr = htonl(0x7f000001);
        to[x].sin_port = htons((side ? ga : gb) + call % k);   /* from A goes to genB, from B to genA */
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = (uint32_t)x };
        epoll_ctl(ep, EPOLL_CTL_ADD, fd[x], &ev);
    }
    printf("ready\n"); fflush(stdout);
    struct mmsghdr m[BATCH]; struct iovec v[BATCH]; static char buf[BATCH][2048];
    struct epoll_event evs[256];
    while (!stop) {
        int ne = epoll_wait(ep, evs, 256, 100);
        for (int e = 0; e < ne; e++) {
            int x = (int)evs[e].data.u32;
            for (int i = 0; i < BATCH; i++) {
                v[i].iov_base = buf[i]; v[i].iov_len = 2048; memset(&m[i], 0, sizeof m[i]);
                m[i].msg_hdr.msg_iov = &v[i]; m[i].msg_hdr.msg_iovlen = 1;
            }
            int r = recvmmsg(fd[x], m, BATCH, MSG_DONTWAIT, NULL);
            if (r <= 0) continue;
            for (int i = 0; i < r; i++) {
                v[i].iov_len = m[i].msg_len; m[i].msg_hdr.msg_name = &to[x]; m[i].msg_hdr.msg_namelen = sizeof to[x];
            }
            sendmmsg(fd[x ^ 1], m, r, MSG_DONTWAIT);
        }
    }
    return 0;
}
'''
