/* metrics.c — lock-free histograms and the Prometheus text format writer; see metrics.h. */
#include "common/metrics.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- instruments ---- */

void metrics_hist_observe(metrics_hist *h, const int64_t *bounds, size_t nbounds, int64_t v)
{
    if (v < 0)
        v = 0;
    if (nbounds > METRICS_HIST_MAX)
        nbounds = METRICS_HIST_MAX;
    size_t i = 0;
    while (i < nbounds && v > bounds[i])
        i++;
    metrics_add(&h->bucket[i], 1);
    metrics_add(&h->sum, (uint64_t)v);
}

uint64_t metrics_hist_count(const metrics_hist *h, size_t nbounds)
{
    if (nbounds > METRICS_HIST_MAX)
        nbounds = METRICS_HIST_MAX;
    uint64_t n = 0;
    for (size_t i = 0; i <= nbounds; i++)
        n += atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
    return n;
}

/* ---- the buffer ---- */

void metrics_buf_init(metrics_buf *b)
{
    memset(b, 0, sizeof *b);
}

void metrics_buf_dispose(metrics_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

char *metrics_buf_take(metrics_buf *b, size_t *len)
{
    char *d = NULL;
    *len = 0;
    if (!b->failed && b->len > 0) {
        d = b->data;
        *len = b->len;
        b->data = NULL;
    }
    metrics_buf_dispose(b);
    return d;
}

bool metrics_buf_failed(const metrics_buf *b)
{
    return b->failed;
}

/* Makes room for n more bytes and the NUL; false (buffer failed) if it cannot. */
static bool reserve(metrics_buf *b, size_t n)
{
    if (b->failed)
        return false;
    if (b->len + n + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n + 1) {
        if (cap > SIZE_MAX / 2) {
            b->failed = true;
            return false;
        }
        cap *= 2;
    }
    char *d = realloc(b->data, cap);
    if (!d) {
        b->failed = true;
        return false;
    }
    b->data = d;
    b->cap = cap;
    return true;
}

static void put(metrics_buf *b, const char *s, size_t n)
{
    if (!reserve(b, n))
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void puts_(metrics_buf *b, const char *s)
{
    put(b, s, strlen(s));
}

void metrics_buf_printf(metrics_buf *b, const char *fmt, ...)
{
    if (b->failed)
        return;
    va_list ap;
    va_start(ap, fmt);
    char small[256];
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = true;
        return;
    }
    if ((size_t)n < sizeof small) {
        put(b, small, (size_t)n);
        return;
    }
    if (!reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* ---- the text format ---- */

/* Escapes as the format wants: in HELP, backslash and newline; in label values, also the
 * double quote. */
static void put_escaped(metrics_buf *b, const char *s, bool quote)
{
    for (; *s; s++) {
        if (*s == '\\')
            puts_(b, "\\\\");
        else if (*s == '\n')
            puts_(b, "\\n");
        else if (quote && *s == '"')
            puts_(b, "\\\"");
        else
            put(b, s, 1);
    }
}

void metrics_family(metrics_buf *b, const char *name, const char *type, const char *help)
{
    puts_(b, "# HELP ");
    puts_(b, name);
    puts_(b, " ");
    put_escaped(b, help, false);
    puts_(b, "\n# TYPE ");
    puts_(b, name);
    puts_(b, " ");
    puts_(b, type);
    puts_(b, "\n");
}

/* name{labels...[,extra_key="extra_val"]} followed by a space. */
static void put_series(metrics_buf *b, const char *name, const char *suffix,
                       const char *const *labels, const char *extra_key, const char *extra_val)
{
    puts_(b, name);
    if (suffix)
        puts_(b, suffix);
    bool any = false;
    for (size_t i = 0; labels && labels[i] && labels[i + 1]; i += 2) {
        puts_(b, any ? "," : "{");
        any = true;
        puts_(b, labels[i]);
        puts_(b, "=\"");
        put_escaped(b, labels[i + 1], true);
        puts_(b, "\"");
    }
    if (extra_key) {
        puts_(b, any ? "," : "{");
        any = true;
        puts_(b, extra_key);
        puts_(b, "=\"");
        put_escaped(b, extra_val, true);
        puts_(b, "\"");
    }
    puts_(b, any ? "} " : " ");
}

/* v / 10^decimals as an exact decimal, trailing zeros (and a bare point) dropped. */
static void format_fixed(char *out, size_t cap, int64_t v, int decimals)
{
    if (decimals < 0)
        decimals = 0;
    if (decimals > 18)
        decimals = 18;
    uint64_t scale = 1;
    for (int i = 0; i < decimals; i++)
        scale *= 10;
    /* The magnitude in unsigned arithmetic: -INT64_MIN does not fit in int64_t. */
    uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    uint64_t whole = mag / scale, frac = mag % scale;
    int n = snprintf(out, cap, "%s%" PRIu64, v < 0 ? "-" : "", whole);
    if (decimals == 0 || frac == 0 || n < 0 || (size_t)n >= cap)
        return;
    int m = snprintf(out + n, cap - (size_t)n, ".%0*" PRIu64, decimals, frac);
    if (m < 0 || (size_t)(n + m) >= cap)
        return;
    size_t end = (size_t)(n + m);
    while (out[end - 1] == '0')
        out[--end] = '\0';
}

void metrics_sample_u64(metrics_buf *b, const char *name, const char *const *labels, uint64_t v)
{
    put_series(b, name, NULL, labels, NULL, NULL);
    metrics_buf_printf(b, "%" PRIu64 "\n", v);
}

void metrics_sample_i64(metrics_buf *b, const char *name, const char *const *labels, int64_t v)
{
    put_series(b, name, NULL, labels, NULL, NULL);
    metrics_buf_printf(b, "%" PRId64 "\n", v);
}

void metrics_sample_fixed(metrics_buf *b, const char *name, const char *const *labels, int64_t v,
                          int decimals)
{
    char num[48];
    format_fixed(num, sizeof num, v, decimals);
    put_series(b, name, NULL, labels, NULL, NULL);
    puts_(b, num);
    puts_(b, "\n");
}

void metrics_hist_write(metrics_buf *b, const char *name, const char *const *labels,
                        const metrics_hist *h, const int64_t *bounds, size_t nbounds, int decimals)
{
    if (nbounds > METRICS_HIST_MAX)
        nbounds = METRICS_HIST_MAX;
    /* Read every bucket once, so that the cumulative series, _count and +Inf agree with
     * each other even while observations land. */
    uint64_t counts[METRICS_HIST_MAX + 1];
    for (size_t i = 0; i <= nbounds; i++)
        counts[i] = atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
    uint64_t sum = atomic_load_explicit(&h->sum, memory_order_relaxed);

    uint64_t cum = 0;
    char le[48];
    for (size_t i = 0; i < nbounds; i++) {
        cum += counts[i];
        format_fixed(le, sizeof le, bounds[i], decimals);
        put_series(b, name, "_bucket", labels, "le", le);
        metrics_buf_printf(b, "%" PRIu64 "\n", cum);
    }
    cum += counts[nbounds];
    put_series(b, name, "_bucket", labels, "le", "+Inf");
    metrics_buf_printf(b, "%" PRIu64 "\n", cum);

    char s[48];
    format_fixed(s, sizeof s, sum > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)sum, decimals);
    put_series(b, name, "_sum", labels, NULL, NULL);
    puts_(b, s);
    puts_(b, "\n");
    put_series(b, name, "_count", labels, NULL, NULL);
    metrics_buf_printf(b, "%" PRIu64 "\n", cum);
}
