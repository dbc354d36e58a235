/* From the project's shared benchmark sources (this line added).
 * pingpong: the floor for a request/reply over an AF_UNIX stream socket on this machine.
 * A forked child echoes 32-byte requests with 36-byte replies (the sizes of a 4-byte
 * vfio-user REGION_READ). usage: pingpong [N]; run under `taskset -c 0` for the
 * same-CPU floor, without it for the cross-CPU one. Prints the mean round trip in µs. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 20000, sv[2];
    char b[64] = { 0 };
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) { perror("socketpair"); return 2; }
    if (fork() == 0) {
        close(sv[0]);
        for (;;) { if (read(sv[1], b, 32) <= 0) _exit(0); if (write(sv[1], b, 36) != 36) _exit(1); }
    }
    close(sv[1]);
    double t0 = now();
    for (int i = 0; i < n; i++) {
        if (write(sv[0], b, 32) != 32) { perror("write"); return 2; }
        for (int got = 0; got < 36;) { ssize_t r = read(sv[0], b, 36 - got); if (r <= 0) { perror("read"); return 2; } got += r; }
    }
    printf("pingpong n=%d mean_us=%.2f\n", n, (now() - t0) / n);
    return 0;
}
