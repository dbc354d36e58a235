/* From the project's shared benchmark sources (this line added). */
/* vfu-rtt: measure vfio-user REGION_READ round trips against any vfio-user server.
 * usage: vfu-rtt SOCKET [N] [REGION] [OFFSET] [COUNT]
 * Prints p50/p99/mean latency in microseconds and requests per second. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

struct hdr { uint16_t id, cmd; uint32_t size, flags, err; } __attribute__((packed));
struct rr { uint64_t off; uint32_t region, count; } __attribute__((packed));

static void rd(int fd, void *b, size_t n) {
    size_t g = 0;
    while (g < n) { ssize_t r = read(fd, (char *)b + g, n - g); if (r <= 0) { perror("read"); exit(2); } g += r; }
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s SOCKET [N] [REGION] [OFFSET] [COUNT]\n", argv[0]); return 2; }
    int n = argc > 2 ? atoi(argv[2]) : 20000;
    uint32_t region = argc > 3 ? atoi(argv[3]) : 7;
    uint64_t off = argc > 4 ? strtoull(argv[4], 0, 0) : 0;
    uint32_t count = argc > 5 ? atoi(argv[5]) : 4;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (connect(fd, (void *)&a, sizeof a)) { perror("connect"); return 2; }
    const char *caps = "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576}}";
    char buf[4096];
    struct hdr h = { 0, 1, sizeof h + 4 + strlen(caps) + 1, 0, 0 };
    memcpy(buf, &h, sizeof h); uint16_t v[2] = { 0, 0 }; memcpy(buf + 16, v, 4);
    memcpy(buf + 20, caps, strlen(caps) + 1);
    if (write(fd, buf, h.size) != (ssize_t)h.size) { perror("write"); return 2; }
    struct hdr rh; rd(fd, &rh, sizeof rh); rd(fd, buf, rh.size - 16);
    if (rh.flags & 0x20) { fprintf(stderr, "VERSION error %u\n", rh.err); return 2; }
    double *lat = malloc(sizeof(double) * n);
    char msg[16 + sizeof(struct rr)];
    double t0 = now();
    for (int i = 0; i < n; i++) {
        struct hdr q = { (uint16_t)(i + 1), 9, sizeof msg, 0, 0 };
        struct rr r = { off, region, count };
        memcpy(msg, &q, 16); memcpy(msg + 16, &r, sizeof r);
        double s = now();
        if (write(fd, msg, sizeof msg) != (ssize_t)sizeof msg) { perror("write"); return 2; }
        rd(fd, &rh, sizeof rh); rd(fd, buf, rh.size - 16);
        lat[i] = now() - s;
        if (rh.flags & 0x20) { fprintf(stderr, "REGION_READ error %u\n", rh.err); return 2; }
    }
    double total = now() - t0;
    qsort(lat, n, sizeof(double), cmp);
    printf("n=%d p50_us=%.2f p99_us=%.2f mean_us=%.2f rps=%.0f\n", n, lat[n / 2], lat[n * 99 / 100], total / n, n / total * 1e6);
    return 0;
}
