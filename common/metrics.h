/* metrics.h — the small metrics kit: lock-free histograms over fixed buckets, and a writer
 * for the Prometheus text exposition format 0.0.4 (what GET /metrics answers).
 *
 * Instruments are plain structs of C11 atomics that the code owning them declares
 * (usually static, zero-initialised): updating one is a relaxed atomic add, with no lock
 * and no allocation, so it is safe on any request path. Rendering reads them one by one,
 * so a page may catch a histogram halfway through an update (a bucket counted, the sum not
 * yet): Prometheus tolerates that, and the next scrape is consistent again.
 *
 * Values are integers in a unit of the caller's choice (microseconds, bytes) and printed
 * as exact decimals with a fixed number of decimals (6 for microseconds -> seconds): no
 * floating point anywhere, and no "0.0050000000000000001" in a bucket label.
 */
#ifndef ORDERD_COMMON_METRICS_H
#define ORDERD_COMMON_METRICS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- instruments ---- */

/** Most finite buckets a histogram may have (+Inf comes on top). */
#define METRICS_HIST_MAX 16

/** A histogram: counts per bucket (not cumulative) and the sum of observed values.
 *  Zero-initialise it; the bounds live with the caller (one array for many histograms). */
typedef struct metrics_hist {
    atomic_uint_fast64_t bucket[METRICS_HIST_MAX + 1]; /* [nbounds] = above every bound */
    atomic_uint_fast64_t sum;                          /* of observed values, in their unit */
} metrics_hist;

/** Counts v (negative counts as 0) into the first bucket whose upper bound is >= v.
 *  bounds: nbounds (<= METRICS_HIST_MAX) strictly increasing upper bounds. */
void metrics_hist_observe(metrics_hist *h, const int64_t *bounds, size_t nbounds, int64_t v);

/** Adds n to a counter (relaxed: counters order nothing). */
static inline void metrics_add(atomic_uint_fast64_t *c, uint64_t n)
{
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

/* ---- the text format ---- */

/** A growing text buffer. On allocation failure it stops growing and remembers it
 *  (metrics_buf_failed); writing to a failed buffer does nothing. */
typedef struct metrics_buf {
    char *data; /* NUL-terminated when len > 0; owned */
    size_t len, cap;
    bool failed;
} metrics_buf;

/** An empty buffer (no allocation yet). */
void metrics_buf_init(metrics_buf *b);
/** Frees the text. Safe on an initialised or disposed buffer. */
void metrics_buf_dispose(metrics_buf *b);
/** Hands the text over to the caller (free() it; NULL if empty or failed), *len set;
 *  the buffer is left empty. */
char *metrics_buf_take(metrics_buf *b, size_t *len);
bool metrics_buf_failed(const metrics_buf *b);
/** Appends printf-style text. */
void metrics_buf_printf(metrics_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/** "# HELP name help" and "# TYPE name type" (type: "counter", "gauge", "histogram").
 *  Write it once per family, before its samples. help is escaped as the format asks. */
void metrics_family(metrics_buf *b, const char *name, const char *type, const char *help);

/**
 * One sample line: name{k1="v1",k2="v2"} value. labels: NULL (no labels) or an array of
 * key, value, key, value, ..., NULL. Values are escaped (backslash, quote, newline); keys
 * must be valid label names (the caller's constants).
 * _fixed prints v / 10^decimals exactly (decimals 0..18), trailing zeros dropped:
 * metrics_sample_fixed(b, "x_seconds", NULL, 1500, 6) writes "x_seconds 0.0015".
 */
void metrics_sample_u64(metrics_buf *b, const char *name, const char *const *labels, uint64_t v);
void metrics_sample_i64(metrics_buf *b, const char *name, const char *const *labels, int64_t v);
void metrics_sample_fixed(metrics_buf *b, const char *name, const char *const *labels, int64_t v,
                          int decimals);

/**
 * A histogram's samples (no HELP/TYPE): name_bucket{labels...,le="..."} (cumulative, the
 * bounds printed with metrics_sample_fixed's rule, then le="+Inf"), name_sum and
 * name_count (which equals the +Inf bucket). labels as for metrics_sample_u64.
 */
void metrics_hist_write(metrics_buf *b, const char *name, const char *const *labels,
                        const metrics_hist *h, const int64_t *bounds, size_t nbounds, int decimals);

/** Total of a histogram's buckets (how many observations). */
uint64_t metrics_hist_count(const metrics_hist *h, size_t nbounds);

#endif
