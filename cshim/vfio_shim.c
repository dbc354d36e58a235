/* vfio_shim.c: ioctl entry points that report errno as a negative result, and prctl. */
#include <errno.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>

#include "vfio_shim.h"

long
shim_ioctl(int fd, unsigned long request, void *arg)
{
    long result = ioctl(fd, request, arg);

    return result < 0 ? -errno : result;
}

long
shim_ioctl_value(int fd, unsigned long request, unsigned long value)
{
    long result = ioctl(fd, request, value);

    return result < 0 ? -errno : result;
}

long
shim_forbid_core_dumps(void)
{
    return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0 ? -errno : 0;
}
