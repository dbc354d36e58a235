/* vfu-echo: a vfio-user server that does nothing, the most any server can reach with vfu-rtt.c.
 * usage: vfu-echo FOLDER N; serves FOLDER/gpu0.sock .. gpu{N-1}.sock, one thread per socket,
 * one client at a time each, until killed. Every request gets a well-formed reply: a
 * REGION_READ its count of zero bytes, anything else a bare header. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

struct hdr { uint16_t id, cmd; uint32_t size, flags, err; } __attribute__((packed));

static const char *folder;

static void *serve(void *arg) {
    static __thread uint8_t in[1 << 17], out[1 << 18];
    char path[sizeof ((struct sockaddr_un *)0)->sun_path];
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    int listener = socket(AF_UNIX, SOCK_STREAM, 0);
    snprintf(path, sizeof path, "%s/gpu%ld.sock", folder, (long)arg);
    memcpy(a.sun_path, path, sizeof path);
    unlink(path);
    if (bind(listener, (void *)&a, sizeof a) || listen(listener, 4)) { perror(path); exit(2); }
    for (;;) {
        int client = accept(listener, 0, 0);
        size_t have = 0;
        for (;;) {
            ssize_t got = read(client, in + have, sizeof in - have);
            size_t at = 0, made = 0;
            if (got <= 0) break;
            have += got;
            while (have - at >= 16) {
                struct hdr h; uint32_t count = 0;
                memcpy(&h, in + at, 16);
                if (h.size < 16 || h.size > sizeof in) { have = 0; break; }
                if (have - at < h.size) break;
                if (h.cmd == 9 && h.size >= 32) memcpy(&count, in + at + 28, 4);
                if (count > sizeof out - 32 - made) count = 0;
                uint32_t size = count ? 32 + count : 16;
                struct hdr r = { h.id, h.cmd, size, 1, 0 };
                memcpy(out + made, &r, 16);
                if (count) { memcpy(out + made + 16, in + at + 16, 16); memset(out + made + 32, 0, count); }
                made += size;
                at += h.size;
            }
            memmove(in, in + at, have - at);
            have -= at;
            if (made && write(client, out, made) != (ssize_t)made) break;
        }
        close(client);
    }
    return 0;
}

int main(int argc, char **argv) {
    pthread_t thread;
    if (argc < 3) { fprintf(stderr, "usage: %s FOLDER N\n", argv[0]); return 2; }
    folder = argv[1];
    for (long i = 0; i < atol(argv[2]); i++) pthread_create(&thread, 0, serve, (void *)i);
    for (;;) pause();
}
