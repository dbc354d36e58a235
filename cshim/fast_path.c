/*
 * fast_path.c: a device's vfio-user loop for the requests its tables answer.
 *
 * Theory of operation. fp_serve owns the client's blocking socket while the
 * GIL is released (cffi releases it around every call). It reads into the
 * session's input buffer, splits messages by their headers, and answers by
 * itself each REGION_READ and REGION_WRITE whose answer the tables fully
 * determine: config space (rule per byte: virtual bits from the shadow,
 * writable bits to the shadow or, read-modify-written one segment piece at a
 * time, to the device, as mediator/virt/config_view.py does) and BAR or ROM
 * ranges without a special range (the device's bytes, and 0xFF padding past
 * the real size). Replies to the requests of one read go out in one send.
 *
 * Everything else returns FP_HANDOVER: any other command or message type, a
 * payload that is not exact, a byte Python must see (reset triggers, the
 * Command and BAR registers, trap windows, simulator registers), a refused
 * device, a physical access that failed (Python does it again and reports the
 * error), a message larger than the buffer, and any read that brought fds.
 * The replies already made are sent first, and Python takes the input from
 * the first message not answered: replies stay in request order. There are
 * no callbacks into Python (MemoryDenyWriteExecute forbids the trampolines).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fast_path.h"

#define REGION_READ 9
#define REGION_WRITE 10
#define TYPE_MASK 0xF
#define TYPE_COMMAND 0x0
#define TYPE_REPLY 0x1
#define FLAG_NO_REPLY 0x10
#define ACCESS_SIZE 16 /* offset u64, region u32, count u32 */
#define MAX_CONFIG 4096

enum { PYTHON = 0, ANSWERED = 1, SEND_FAILED = -1 };

struct header {
    uint16_t msg_id;
    uint16_t command;
    uint32_t size;
    uint32_t flags;
    uint32_t error;
};

static uint64_t
now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int
physical_read(const struct fp_physical *where, uint64_t offset, uint8_t *into, uint32_t length)
{
    ssize_t done;

    if (where->fd < 0) {
        memcpy(into, where->memory + offset, length);
        return 0;
    }
    do
        done = pread(where->fd, into, length, (off_t)(where->file_offset + offset));
    while (done < 0 && errno == EINTR);
    return done == (ssize_t)length ? 0 : -1;
}

static int
physical_write(const struct fp_physical *where, uint64_t offset, const uint8_t *data, uint32_t length)
{
    ssize_t done;

    if (where->fd < 0) {
        memcpy(where->memory + offset, data, length);
        return 0;
    }
    do
        done = pwrite(where->fd, data, length, (off_t)(where->file_offset + offset));
    while (done < 0 && errno == EINTR);
    return done == (ssize_t)length ? 0 : -1;
}

static int
config_in_bounds(const struct fp_config *config, uint64_t offset, uint32_t count)
{
    return count && offset <= config->size && count <= config->size - offset;
}

static int
config_read(const struct fp_config *config, uint32_t offset, uint32_t count, uint8_t *into)
{
    uint32_t i, run;

    for (i = 0; i < count; i++)
        if (config->flags[offset + i] & FP_READ_PYTHON)
            return PYTHON;
    /* The device supplies each run of bytes that are not wholly virtual, in one read each. */
    for (i = 0; i < count; i = run) {
        if (config->virtual_bits[offset + i] == 0xFF) {
            into[i] = 0;
            run = i + 1;
            continue;
        }
        for (run = i; run < count && config->virtual_bits[offset + run] != 0xFF; run++)
            ;
        if (physical_read(&config->physical, offset + i, into + i, run - i))
            return PYTHON;
    }
    for (i = 0; i < count; i++) {
        uint8_t v = config->virtual_bits[offset + i];

        into[i] = (uint8_t)((into[i] & ~v) | (config->shadow[offset + i] & v));
    }
    return ANSWERED;
}

static int
config_write(const struct fp_config *config, uint32_t offset, uint32_t count, const uint8_t *data)
{
    uint8_t current[MAX_CONFIG];
    uint32_t i, start, stop, end = offset + count;

    for (i = 0; i < count; i++)
        if (config->flags[offset + i] & FP_WRITE_PYTHON || data[i] & config->reset_bits[offset + i])
            return PYTHON;
    for (start = offset; start < end; start = stop) {
        int any_writable = 0, to_device = 0, whole = 1;

        for (stop = start + 1; stop < end && !(config->flags[stop] & FP_SEGMENT_START); stop++)
            ;
        for (i = start; i < stop; i++) {
            uint8_t w = config->writable_bits[i], device_bits = w & ~config->virtual_bits[i];

            any_writable |= w != 0;
            to_device |= device_bits != 0;
            whole &= device_bits == 0xFF;
        }
        if (!any_writable)
            continue;
        for (i = start; i < stop; i++) {
            uint8_t mine = config->writable_bits[i] & config->virtual_bits[i];

            config->shadow[i] = (uint8_t)((config->shadow[i] & ~mine) | (data[i - offset] & mine));
        }
        if (!to_device)
            continue;
        if (whole) {
            if (physical_write(&config->physical, start, data + (start - offset), stop - start))
                return PYTHON;
            continue;
        }
        if (physical_read(&config->physical, start, current, stop - start))
            return PYTHON;
        for (i = start; i < stop; i++) {
            uint8_t device_bits = config->writable_bits[i] & ~config->virtual_bits[i];

            current[i - start] =
                (uint8_t)((current[i - start] & ~device_bits) | (data[i - offset] & device_bits));
        }
        if (physical_write(&config->physical, start, current, stop - start))
            return PYTHON;
    }
    return ANSWERED;
}

static int
bar_plain(const struct fp_bar *bar, uint64_t offset, uint32_t count)
{
    uint32_t i;

    if (!bar->virtual_size || !count || offset > bar->virtual_size || count > bar->virtual_size - offset)
        return 0;
    for (i = 0; i < bar->n_special; i++)
        if (offset < bar->special[2 * i + 1] && bar->special[2 * i] < offset + count)
            return 0;
    return 1;
}

/* The part of an access on the device, [offset, device_end); the rest is padding. */
static uint64_t
device_end(const struct fp_bar *bar, uint64_t offset, uint32_t count)
{
    uint64_t end = offset + count;

    return end < bar->physical_size ? end : (offset > bar->physical_size ? offset : bar->physical_size);
}

static int
bar_read(struct fp_device *device, const struct fp_bar *bar, uint64_t offset, uint32_t count, uint8_t *into)
{
    uint64_t on_device = device_end(bar, offset, count);

    if (!bar_plain(bar, offset, count))
        return PYTHON;
    if (on_device > offset && physical_read(&bar->physical, offset, into, (uint32_t)(on_device - offset)))
        return PYTHON;
    if (on_device < offset + count) {
        memset(into + (on_device - offset), 0xFF, (size_t)(offset + count - on_device));
        device->padding_accesses++;
    }
    return ANSWERED;
}

static int
bar_write(struct fp_device *device, const struct fp_bar *bar, uint64_t offset, uint32_t count,
          const uint8_t *data)
{
    uint64_t on_device = device_end(bar, offset, count);

    if (!bar->writable || !bar_plain(bar, offset, count))
        return PYTHON;
    if (on_device > offset && physical_write(&bar->physical, offset, data, (uint32_t)(on_device - offset)))
        return PYTHON;
    if (on_device < offset + count)
        device->padding_accesses++;
    return ANSWERED;
}

static int
flush(struct fp_session *session)
{
    uint32_t sent = 0;

    while (sent < session->output_end) {
        ssize_t done = send(session->socket, session->output + sent, session->output_end - sent, MSG_NOSIGNAL);

        if (done < 0) {
            if (errno == EINTR)
                continue;
            session->error = errno;
            return -1;
        }
        sent += (uint32_t)done;
    }
    session->output_end = 0;
    return 0;
}

static void
count_answer(struct fp_session *session, int which, uint64_t nanoseconds)
{
    uint32_t bucket = 0;

    while (bucket < session->n_bounds && nanoseconds > session->bounds_ns[bucket])
        bucket++;
    session->answered[which]++;
    session->buckets[which][bucket]++;
    session->nanoseconds[which] += nanoseconds;
}

static int
answer(struct fp_device *device, struct fp_session *session, const uint8_t *message, uint32_t size,
       uint64_t *answered_at)
{
    struct header header;
    uint64_t offset, started = now_ns();
    uint32_t region, count, reply_size;
    const uint8_t *payload = message + FP_HEADER_SIZE;
    uint8_t *reply;
    int reading, done;

    memcpy(&header, message, sizeof header);
    if ((header.flags & TYPE_MASK) != TYPE_COMMAND || device->refused)
        return PYTHON;
    if (header.command != REGION_READ && header.command != REGION_WRITE)
        return PYTHON;
    if (size < FP_HEADER_SIZE + ACCESS_SIZE)
        return PYTHON;
    memcpy(&offset, payload, 8);
    memcpy(&region, payload + 8, 4);
    memcpy(&count, payload + 12, 4);
    reading = header.command == REGION_READ;
    if (!count || count > session->max_count || region > FP_CONFIG_REGION)
        return PYTHON;
    if (size != FP_HEADER_SIZE + ACCESS_SIZE + (reading ? 0 : count))
        return PYTHON;
    reply_size = FP_HEADER_SIZE + ACCESS_SIZE + (reading ? count : 0);
    if (session->output_end + reply_size > session->output_size && flush(session))
        return SEND_FAILED;
    reply = session->output + session->output_end;
    if (region == FP_CONFIG_REGION) {
        if (!config_in_bounds(&device->config, offset, count))
            return PYTHON;
        done = reading ? config_read(&device->config, (uint32_t)offset, count, reply + 32)
                       : config_write(&device->config, (uint32_t)offset, count, payload + ACCESS_SIZE);
    } else {
        const struct fp_bar *bar = &device->bars[region];

        done = reading ? bar_read(device, bar, offset, count, reply + 32)
                       : bar_write(device, bar, offset, count, payload + ACCESS_SIZE);
    }
    if (done != ANSWERED)
        return done;
    if (!(header.flags & FLAG_NO_REPLY)) {
        struct header out = {header.msg_id, header.command, reply_size, TYPE_REPLY, 0};

        memcpy(reply, &out, sizeof out);
        memcpy(reply + FP_HEADER_SIZE, payload, ACCESS_SIZE);
        session->output_end += reply_size;
    }
    *answered_at = now_ns();
    count_answer(session, !reading, *answered_at - started);
    return ANSWERED;
}

static void
take_fds(struct fp_session *session, struct msghdr *message)
{
    struct cmsghdr *control;

    for (control = CMSG_FIRSTHDR(message); control; control = CMSG_NXTHDR(message, control)) {
        uint32_t i, n;

        if (control->cmsg_level != SOL_SOCKET || control->cmsg_type != SCM_RIGHTS)
            continue;
        n = (uint32_t)((control->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (i = 0; i < n && session->n_fds < FP_MAX_FDS; i++)
            memcpy(&session->fds[session->n_fds++], CMSG_DATA(control) + i * sizeof(int), sizeof(int));
    }
    session->fds_truncated = (message->msg_flags & MSG_CTRUNC) != 0;
}

static int
counters_to_publish(const struct fp_session *session, const struct fp_device *device)
{
    return session->answered[0] || session->answered[1] || device->padding_accesses;
}

int
fp_serve(struct fp_device *device, struct fp_session *session)
{
    union {
        char buffer[CMSG_SPACE(FP_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    uint64_t entered = now_ns(), last_answer = entered; /* the loop's clock: answers read it */

    for (;;) {
        struct iovec vector;
        struct msghdr message;
        ssize_t got;

        while (session->input_end - session->input_start >= FP_HEADER_SIZE) {
            const uint8_t *next = session->input + session->input_start;
            uint32_t size;
            int done;

            memcpy(&size, next + 4, sizeof size);
            if (size < FP_HEADER_SIZE || size > session->input_size)
                goto handover;
            if (session->input_end - session->input_start < size)
                break;
            done = answer(device, session, next, size, &last_answer);
            if (done == SEND_FAILED)
                return FP_SOCKET_ERROR;
            if (done == PYTHON)
                goto handover;
            session->input_start += size;
        }
        if (flush(session))
            return FP_SOCKET_ERROR;
        if (session->input_start == session->input_end) {
            session->input_start = session->input_end = 0;
            if (counters_to_publish(session, device) && last_answer - entered >= session->yield_after_ns)
                return FP_YIELD;
        } else if (session->input_start) {
            memmove(session->input, session->input + session->input_start,
                    session->input_end - session->input_start);
            session->input_end -= session->input_start;
            session->input_start = 0;
        }
        vector.iov_base = session->input + session->input_end;
        vector.iov_len = session->input_size - session->input_end;
        memset(&message, 0, sizeof message);
        message.msg_iov = &vector;
        message.msg_iovlen = 1;
        message.msg_control = control.buffer;
        message.msg_controllen = CMSG_SPACE(session->max_fds * sizeof(int));
        got = recvmsg(session->socket, &message, MSG_CMSG_CLOEXEC);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) { /* the socket's receive timeout: idle */
                if (session->input_start == session->input_end && counters_to_publish(session, device))
                    return FP_YIELD;
                continue;
            }
            session->error = errno;
            return FP_SOCKET_ERROR;
        }
        session->input_end += (uint32_t)got;
        if (message.msg_controllen || message.msg_flags & MSG_CTRUNC) {
            take_fds(session, &message);
            goto handover;
        }
        if (!got)
            return FP_CLOSED;
    }
handover:
    if (flush(session))
        return FP_SOCKET_ERROR;
    return FP_HANDOVER;
}
