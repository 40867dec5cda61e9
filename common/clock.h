/* clock.h — the two clocks orderd uses: monotonic for deadlines and durations, wall
 * (Unix time) for timestamps shown to people. Microseconds everywhere. */
#ifndef ORDERD_COMMON_CLOCK_H
#define ORDERD_COMMON_CLOCK_H
#include <stdint.h>

/** CLOCK_MONOTONIC in microseconds. */
int64_t clock_mono_us(void);
/** CLOCK_REALTIME in microseconds since the Unix epoch. */
int64_t clock_wall_us(void);
/** Parses a duration such as "250ms", "30s", "15m", "1h", "2d" (or a bare number of
 *  seconds) into microseconds. Returns 0 on success, -1 on a malformed value. */
int clock_parse_duration(const char *s, int64_t *out_us);

#endif
