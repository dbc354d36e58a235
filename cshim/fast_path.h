/*
 * fast_path.h: the tables the C fast path executes and the loop that executes them.
 *
 * Python compiles every table from the device's plan (mediator/virt/fast_tables.py)
 * and owns every buffer; this code decides nothing the tables do not say. It
 * answers REGION_READ and REGION_WRITE of config space and of plain BAR ranges
 * by itself and hands everything else back to Python, in order (see fast_path.c).
 */
#ifndef VFIO_MEDIATOR_FAST_PATH_H
#define VFIO_MEDIATOR_FAST_PATH_H

#include <stdint.h>

#define FP_HEADER_SIZE 16
#define FP_BARS 7          /* BAR0-5 and the expansion ROM (vfio-pci region 6) */
#define FP_CONFIG_REGION 7
#define FP_MAX_FDS 64      /* the most fds a session's limit may allow per message */
#define FP_MAX_BOUNDS 16   /* latency histogram buckets, the overflow one aside */

/* Per config byte (fp_config.flags) */
#define FP_SEGMENT_START 0x1 /* a segment (one rule) starts here: writes go segment by segment */
#define FP_READ_PYTHON 0x2   /* a read touching it goes to Python */
#define FP_WRITE_PYTHON 0x4  /* a write touching it goes to Python */

/* What fp_serve returns */
#define FP_HANDOVER 0     /* Python takes the unparsed input (and fds) from a message boundary */
#define FP_CLOSED 1       /* the client closed its end */
#define FP_SOCKET_ERROR 2 /* errno in fp_session.error */
#define FP_YIELD 3        /* nothing buffered: Python may publish the counters and call again */

struct fp_physical {   /* where a region's bytes are */
    int fd;            /* >= 0: pread/pwrite at file_offset + offset (a VFIO device fd) */
    uint64_t file_offset;
    uint8_t *memory;   /* else these bytes, in this process (the simulator's) */
};

struct fp_bar {
    uint64_t virtual_size;  /* 0: Python answers every access */
    uint64_t physical_size; /* past it, up to virtual_size: padding (reads 0xFF, writes dropped) */
    int writable;           /* 0: writes go to Python (the ROM) */
    struct fp_physical physical;
    uint32_t n_special;     /* [start, end) pairs only Python may answer: trap windows, registers */
    const uint64_t *special;
};

struct fp_config {
    uint32_t size;
    const uint8_t *virtual_bits;  /* per byte: bits served from the shadow */
    const uint8_t *writable_bits; /* per byte: bits a guest may write */
    const uint8_t *reset_bits;    /* per byte: bits whose write of 1 asks for a reset (Python's) */
    const uint8_t *flags;         /* per byte: FP_SEGMENT_START, FP_READ_PYTHON, FP_WRITE_PYTHON */
    uint8_t *shadow;              /* Python's own shadow, shared */
    struct fp_physical physical;
};

struct fp_device {
    struct fp_config config;
    struct fp_bar bars[FP_BARS];
    volatile int refused;         /* nonzero: every request goes to Python */
    uint64_t padding_accesses;    /* since Python last took them */
};

struct fp_session {
    int socket;
    uint32_t max_fds;             /* ancillary room per read, as Python's recvmsg has */
    uint32_t max_count;           /* the most data bytes one access may carry here */
    uint8_t *input;               /* unparsed bytes: input[input_start:input_end] */
    uint32_t input_size, input_start, input_end;
    uint8_t *output;              /* replies not sent yet: output[0:output_end] */
    uint32_t output_size, output_end;
    int fds[FP_MAX_FDS];          /* fds of the last read, handed over with the input */
    uint32_t n_fds;
    int fds_truncated;
    int error;
    uint64_t yield_after_ns;      /* serving this long with counters to publish: yield when idle */
    uint32_t n_bounds;            /* the latency histogram's bucket bounds, in ns, increasing */
    uint64_t bounds_ns[FP_MAX_BOUNDS];
    /* since Python last took them; [0] REGION_READ, [1] REGION_WRITE */
    uint64_t answered[2];
    uint64_t buckets[2][FP_MAX_BOUNDS + 1];
    uint64_t nanoseconds[2];
};

int fp_serve(struct fp_device *device, struct fp_session *session);

#endif
