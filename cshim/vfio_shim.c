/* vfio_shim.c: ioctl entry points that report errno as a negative result. */
#include <errno.h>
#include <sys/ioctl.h>

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
