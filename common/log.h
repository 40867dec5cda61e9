/* log.h — structured logs: one JSON object per line on stderr.
 *
 * Every line has "ts" (RFC 3339 UTC, milliseconds), "level" and "msg"; callers add
 * fields as key/value pairs. The level is checked before anything is formatted, so a
 * disabled debug line costs one comparison. Thread-safe: a line is written with one
 * write(2), so lines from different threads never interleave.
 * Never pass secrets (tokens, passwords, keys) as fields.
 */
#ifndef ORDERD_COMMON_LOG_H
#define ORDERD_COMMON_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum log_level { LOG_DEBUG = 0, LOG_INFO = 1, LOG_WARN = 2, LOG_ERROR = 3 } log_level;

/** Field kinds for log_kv's variadic list. */
enum { LOG_F_END = 0, LOG_F_STR = 1, LOG_F_INT = 2, LOG_F_DBL = 3 };

/** Sets the lowest level written (default LOG_INFO). */
void log_set_level(log_level min);
/** Parses "debug", "info", "warn", "error"; returns false on anything else. */
bool log_level_parse(const char *name, log_level *out);
extern log_level log__min_level;
#define log_enabled(lvl) ((lvl) >= log__min_level)

/**
 * Writes one line. The variadic list is (kind, key, value) triples ended by LOG_F_END:
 *   log_kv(LOG_INFO, "call done", LOG_F_STR, "method", m, LOG_F_INT, "status", (int64_t)st,
 *          LOG_F_END);
 * LOG_F_INT takes an int64_t, LOG_F_DBL a double, LOG_F_STR a const char * (NULL skipped).
 */
void log_kv(log_level lvl, const char *msg, ...);

/** Writes one line with n string fields given as parallel arrays (for field lists built
 *  at run time, such as the configuration). NULL values are skipped. */
void log_fields(log_level lvl, const char *msg, const char *const *keys, const char *const *values,
                size_t n);

/** printf-style message with no extra fields. */
void log_msgf(log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define LOG_DEBUGF(...)                                                                            \
    do {                                                                                           \
        if (log_enabled(LOG_DEBUG))                                                                \
            log_msgf(LOG_DEBUG, __VA_ARGS__);                                                      \
    } while (0)
#define LOG_INFOF(...)                                                                             \
    do {                                                                                           \
        if (log_enabled(LOG_INFO))                                                                 \
            log_msgf(LOG_INFO, __VA_ARGS__);                                                       \
    } while (0)
#define LOG_WARNF(...)                                                                             \
    do {                                                                                           \
        if (log_enabled(LOG_WARN))                                                                 \
            log_msgf(LOG_WARN, __VA_ARGS__);                                                       \
    } while (0)
#define LOG_ERRORF(...)                                                                            \
    do {                                                                                           \
        if (log_enabled(LOG_ERROR))                                                                \
            log_msgf(LOG_ERROR, __VA_ARGS__);                                                      \
    } while (0)

#endif
