"""C source of the SRTP<->RTP load generator (``bench/bench_srtp.py``), kept as a string.

``SRTPGEN`` is ``csrc.LOADGEN`` with side A speaking SRTP (AES_CM_128_HMAC_SHA1_80 or, with a
7th argument ``gcm``, AEAD_AES_128_GCM; libsrtp2):
per call, one libsrtp session protects what A sends (with A's key, the one A "offered") and
one unprotects what the relay sends to A (with the relay's key, from its "answer"). Side B is
plain RTP. The send time is stamped before protection on side A (so the A->B latency includes
the generator's own protect, about a microsecond); packets coming back to A are identified
by the relay port they come from and unprotected before their send time is read. A packet
that fails to unprotect counts as ``bad``, not received.
"""

SRTPGEN = r'''
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <srtp2/srtp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* usage: srtpgen N pps_per_stream seconds gA gB k [gcm]  < "portA portB keyA keyR" lines
   (hex master key + salt: 30 bytes for AES_CM_128_HMAC_SHA1_80, 28 for AEAD_AES_128_GCM) */
#define BATCH 64
#define HIST 200000
#define PKT 172
#define BUF (PKT + SRTP_MAX_TRAILER_LEN)
#define TICK 200000LL

static int64_t now_ns(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}
static void stamp(struct iovec *v, int n) {
    int64_t t = now_ns(); for (int i = 0; i < n; i++) memcpy((unsigned char *)v[i].iov_base + 12, &t, 8);
}
static int unhex(const char *s, unsigned char *out, int n) {
    for (int i = 0; i < n; i++) { unsigned int b; if (sscanf(s + 2 * i, "%2x", &b) != 1) return -1; out[i] = b; }
    return 0;
}
static int gcm;
static srtp_t session(const unsigned char *key, int inbound) {
    srtp_policy_t p; srtp_t s = NULL;
    memset(&p, 0, sizeof p);
    if (gcm) {
        srtp_crypto_policy_set_aes_gcm_128_16_auth(&p.rtp); srtp_crypto_policy_set_aes_gcm_128_16_auth(&p.rtcp);
    } else {
        srtp_crypto_policy_set_rtp_default(&p.rtp); srtp_crypto_policy_set_rtcp_default(&p.rtcp);
    }
    p.ssrc.type = inbound ? ssrc_any_inbound : ssrc_any_outbound;
    p.key = (unsigned char *)key; p.window_size = 128; p.allow_repeat_tx = 0;
    if (srtp_create(&s, &p) != srtp_err_status_ok) { fprintf(stderr, "srtp_create\n"); exit(1); }
    return s;
}

int main(int argc, char **argv) {
    if (argc < 7) { fprintf(stderr, "usage\n"); return 2; }
    int n = atoi(argv[1]); double pps = atof(argv[2]); double secs = atof(argv[3]);
    int ga = atoi(argv[4]), gb = atoi(argv[5]), k = atoi(argv[6]);
    int nst = 2 * n, nsock = 2 * k;
    gcm = argc > 7 && strcmp(argv[7], "gcm") == 0;
    int klen = gcm ? 28 : 30;
    srtp_init();
    struct sockaddr_in *dst = calloc(nst, sizeof *dst);
    srtp_t *tx = calloc(n, sizeof *tx), *rx = calloc(n, sizeof *rx);
    int *call_of_port = calloc(65536, sizeof *call_of_port);     /* relay A port -> call + 1 */
    for (int i = 0; i < n; i++) {
        int pa, pb; char ka[128], kr[128]; unsigned char kab[30], krb[30];
        if (scanf("%d %d %127s %127s", &pa, &pb, ka, kr) != 4 || unhex(ka, kab, klen) || unhex(kr, krb, klen)) {
            fprintf(stderr, "short port/key list\n"); return 2;
        }
        tx[i] = session(kab, 0); rx[i] = session(krb, 1);
        call_of_port[pa] = i + 1;
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
    struct mmsghdr (*sm)[BATCH] = calloc(nsock, sizeof *sm);
    struct iovec (*sv)[BATCH] = calloc(nsock, sizeof *sv);
    unsigned char (*sb)[BATCH][BUF] = calloc(nsock, sizeof *sb);
    int *sn = calloc(nsock, sizeof *sn);
    struct mmsghdr rm[BATCH]; struct iovec rv[BATCH]; static unsigned char rb[BATCH][2048];
    struct sockaddr_in rsrc[BATCH];
    for (int i = 0; i < BATCH; i++) {
        rv[i].iov_base = rb[i]; rv[i].iov_len = 2048; memset(&rm[i], 0, sizeof rm[i]);
        rm[i].msg_hdr.msg_iov = &rv[i]; rm[i].msg_hdr.msg_iovlen = 1;
    }
    uint64_t sent = 0, send_fail = 0, recvd = 0, bad = 0;
    double rate = pps * nst;
    int64_t t0 = now_ns(), tend = t0 + (int64_t)(secs * 1e9), drain_end = tend + 300000000LL;
    uint64_t idx = 0;
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
                memset(p + 12, 0xd5, PKT - 12);
                memcpy(p + 20, &s, 4);
                int len = PKT;
                if (side == 0) {                      /* SRTP: stamp, then protect */
                    int64_t st = now_ns(); memcpy(p + 12, &st, 8);
                    if (srtp_protect(tx[call], p, &len) != srtp_err_status_ok) { send_fail++; idx++; continue; }
                }
                sv[j][b].iov_base = p; sv[j][b].iov_len = len;
                memset(&sm[j][b], 0, sizeof sm[j][b]);
                sm[j][b].msg_hdr.msg_name = &dst[s]; sm[j][b].msg_hdr.msg_namelen = sizeof dst[s];
                sm[j][b].msg_hdr.msg_iov = &sv[j][b]; sm[j][b].msg_hdr.msg_iovlen = 1;
                idx++;
                if (++sn[j] == BATCH) {
                    if (j >= k) stamp(sv[j], BATCH);
                    int r = sendmmsg(fd[j], sm[j], BATCH, 0);
                    if (r < 0) r = 0;
                    sent += r; send_fail += BATCH - r; sn[j] = 0;
                }
            }
            for (int j = 0; j < nsock; j++) if (sn[j]) {
                if (j >= k) stamp(sv[j], sn[j]);
                int r = sendmmsg(fd[j], sm[j], sn[j], 0);
                if (r < 0) r = 0;
                sent += r; send_fail += sn[j] - r; sn[j] = 0;
            }
        }
        int got_any = 0;
        for (int j = 0; j < nsock; j++) {
            for (int rounds = 0; rounds < 64; rounds++) {
                for (int i = 0; i < BATCH; i++) {
                    rm[i].msg_hdr.msg_name = &rsrc[i]; rm[i].msg_hdr.msg_namelen = sizeof rsrc[i];
                }
                int r = recvmmsg(fd[j], rm, BATCH, MSG_DONTWAIT, NULL);
                if (r <= 0) break;
                got_any = 1;
                int64_t now = now_ns();
                for (int i = 0; i < r; i++) {
                    int len = (int)rm[i].msg_len;
                    if (j < k) {                          /* to A: SRTP from the relay */
                        int c = call_of_port[ntohs(rsrc[i].sin_port)] - 1;
                        if (c < 0 || srtp_unprotect(rx[c], rb[i], &len) != srtp_err_status_ok) { bad++; continue; }
                    }
                    if (len != PKT) { bad++; continue; }
                    int64_t st; memcpy(&st, rb[i] + 12, 8);
                    int64_t us = (now - st) / 1000; if (us < 0) us = 0; if (us > HIST) us = HIST;
                    hist[us]++; recvd++;
                }
                if (r < BATCH) break;
            }
        }
        if (!got_any) {
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
