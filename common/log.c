/* log.c — one JSON object per line on stderr; see log.h. */
#include "common/log.h"
#include "common/utf8.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

log_level log__min_level = LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void log_set_level(log_level min)
{
    log__min_level = min;
}

bool log_level_parse(const char *name, log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            *out = (log_level)i;
            return true;
        }
    }
    if (strcmp(name, "warning") == 0) {
        *out = LOG_WARN;
        return true;
    }
    return false;
}

/* A bounded line buffer: anything past the end is dropped, and the line still closes. */
typedef struct line {
    char buf[8192];
    size_t len;
} line;

static void put(line *l, const char *s, size_t n)
{
    if (l->len + n > sizeof(l->buf) - 3) /* keep room for "}\n" */
        n = sizeof(l->buf) - 3 - l->len;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static void puts_raw(line *l, const char *s)
{
    put(l, s, strlen(s));
}

/* JSON string escaping; control bytes become \u00XX, and bytes that are not UTF-8 (a
 * request path, a peer's message) U+FFFD, so that every line stays valid JSON. */
static void put_json_str(line *l, const char *s)
{
    put(l, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        if (*p >= 0x80) {
            size_t n = utf8_seq_len(p, 4); /* stops at the NUL */
            if (n == 0) {
                put(l, "\\ufffd", 6);
            } else {
                put(l, (const char *)p, n);
                p += n - 1;
            }
            continue;
        }
        switch (*p) {
        case '"':
            put(l, "\\\"", 2);
            break;
        case '\\':
            put(l, "\\\\", 2);
            break;
        case '\n':
            put(l, "\\n", 2);
            break;
        case '\r':
            put(l, "\\r", 2);
            break;
        case '\t':
            put(l, "\\t", 2);
            break;
        default:
            if (*p < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", *p);
                put(l, esc, 6);
            } else {
                put(l, (const char *)p, 1);
            }
        }
    }
    put(l, "\"", 1);
}

static void begin(line *l, log_level lvl, const char *msg)
{
    struct timespec ts;
    struct tm tm;
    char tbuf[64];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(tbuf, sizeof tbuf, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(tbuf + n, sizeof tbuf - n, ".%03ldZ", ts.tv_nsec / 1000000);
    l->len = 0;
    puts_raw(l, "{\"ts\":\"");
    puts_raw(l, tbuf);
    puts_raw(l, "\",\"level\":\"");
    puts_raw(l, level_names[lvl]);
    puts_raw(l, "\",\"msg\":");
    put_json_str(l, msg ? msg : "");
}

static void finish(line *l)
{
    l->buf[l->len++] = '}';
    l->buf[l->len++] = '\n';
    /* One write per line: lines from different threads do not interleave. */
    ssize_t w = write(STDERR_FILENO, l->buf, l->len);
    (void)w;
}

void log_kv(log_level lvl, const char *msg, ...)
{
    if (!log_enabled(lvl))
        return;
    line l;
    begin(&l, lvl, msg);
    va_list ap;
    va_start(ap, msg);
    for (;;) {
        int kind = va_arg(ap, int);
        if (kind == LOG_F_END)
            break;
        const char *key = va_arg(ap, const char *);
        char num[64];
        switch (kind) {
        case LOG_F_STR: {
            const char *v = va_arg(ap, const char *);
            if (!v)
                continue;
            put(&l, ",", 1);
            put_json_str(&l, key);
            put(&l, ":", 1);
            put_json_str(&l, v);
            break;
        }
        case LOG_F_INT: {
            int64_t v = va_arg(ap, int64_t);
            snprintf(num, sizeof num, "%lld", (long long)v);
            put(&l, ",", 1);
            put_json_str(&l, key);
            put(&l, ":", 1);
            puts_raw(&l, num);
            break;
        }
        case LOG_F_DBL: {
            double v = va_arg(ap, double);
            if (isfinite(v))
                snprintf(num, sizeof num, "%.3f", v);
            else
                snprintf(num, sizeof num, "null");
            put(&l, ",", 1);
            put_json_str(&l, key);
            put(&l, ":", 1);
            puts_raw(&l, num);
            break;
        }
        default:
            goto done; /* a programming error in the call; end the line safely */
        }
    }
done:
    va_end(ap);
    finish(&l);
}

void log_fields(log_level lvl, const char *msg, const char *const *keys, const char *const *values,
                size_t n)
{
    if (!log_enabled(lvl))
        return;
    line l;
    begin(&l, lvl, msg);
    for (size_t i = 0; i < n; i++) {
        if (!values[i])
            continue;
        put(&l, ",", 1);
        put_json_str(&l, keys[i]);
        put(&l, ":", 1);
        put_json_str(&l, values[i]);
    }
    finish(&l);
}

void log_msgf(log_level lvl, const char *fmt, ...)
{
    if (!log_enabled(lvl))
        return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    line l;
    begin(&l, lvl, msg);
    finish(&l);
}
