/* clock.c — monotonic and wall clocks in microseconds, and duration parsing. */
#include "common/clock.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int64_t clock_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t clock_wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int clock_parse_duration(const char *s, int64_t *out_us)
{
    if (!s || !*s)
        return -1;
    errno = 0;
    char *end;
    long long n = strtoll(s, &end, 10);
    if (errno || end == s || n < 0)
        return -1;
    int64_t mult;
    if (*end == '\0' || strcmp(end, "s") == 0)
        mult = 1000000;
    else if (strcmp(end, "ms") == 0)
        mult = 1000;
    else if (strcmp(end, "us") == 0)
        mult = 1;
    else if (strcmp(end, "m") == 0)
        mult = 60LL * 1000000;
    else if (strcmp(end, "h") == 0)
        mult = 3600LL * 1000000;
    else if (strcmp(end, "d") == 0)
        mult = 86400LL * 1000000;
    else
        return -1;
    if (n > INT64_MAX / mult)
        return -1;
    *out_us = (int64_t)n * mult;
    return 0;
}
