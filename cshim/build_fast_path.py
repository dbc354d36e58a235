"""cffi build script (API mode) for mediator._fast_path, the C loop of cshim/fast_path.c.

The cdef repeats the structs of fast_path.h with ``...;`` so the compiler
fills in the layouts; Python fills every table and owns every buffer. The
extension is optional: when it cannot be built the daemon serves every
request in Python and says so at start (``mediator.vfio_user.fast_loop``).
"""

from cffi import FFI

HERE = "cshim"

CDEF = """
#define FP_BARS ...
#define FP_CONFIG_REGION ...
#define FP_MAX_FDS ...
#define FP_MAX_BOUNDS ...
#define FP_SEGMENT_START ...
#define FP_READ_PYTHON ...
#define FP_WRITE_PYTHON ...
#define FP_HANDOVER ...
#define FP_CLOSED ...
#define FP_SOCKET_ERROR ...
#define FP_YIELD ...

struct fp_physical { int fd; uint64_t file_offset; uint8_t *memory; ...; };
struct fp_bar {
    uint64_t virtual_size; uint64_t physical_size; int writable; struct fp_physical physical;
    uint32_t n_special; const uint64_t *special; ...;
};
struct fp_config {
    uint32_t size; const uint8_t *virtual_bits; const uint8_t *writable_bits; const uint8_t *reset_bits;
    const uint8_t *flags; uint8_t *shadow; struct fp_physical physical; ...;
};
struct fp_device {
    struct fp_config config; struct fp_bar bars[7]; int refused; uint64_t padding_accesses; ...;
};
struct fp_session {
    int socket; uint32_t max_fds; uint32_t max_count;
    uint8_t *input; uint32_t input_size; uint32_t input_start; uint32_t input_end;
    uint8_t *output; uint32_t output_size; uint32_t output_end;
    int fds[64]; uint32_t n_fds; int fds_truncated; int error;
    uint64_t yield_after_ns; uint32_t n_bounds; uint64_t bounds_ns[16];
    uint64_t answered[2]; uint64_t buckets[2][17]; uint64_t nanoseconds[2]; ...;
};

int fp_serve(struct fp_device *device, struct fp_session *session);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "mediator._fast_path",
    '#include "fast_path.h"',
    sources=[f"{HERE}/fast_path.c"],
    include_dirs=[HERE],
    extra_compile_args=["-Wall", "-Wextra", "-Werror", "-O2"],
    optional=True,  # setuptools skips it when it does not build; the daemon then serves in Python
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
