/* metrics.c — what GET /metrics reports: the RPC counters and latency histograms that the
 * access log feeds, the webhook outcomes, and the statistics the adapters keep themselves
 * (cache, rate limits, outbox relay, reply consumer), rendered in the Prometheus text
 * format 0.0.4.
 *
 * DESIGN
 * RPC instruments are one fixed table: a row per method of the server's method table plus
 * an "other" row for every unknown path (so a client inventing paths cannot grow the
 * table or the label set), each row a counter per gRPC code (0..16) and a histogram.
 * A method path finds its row through a small open-addressing hash built once; updates
 * are relaxed atomic adds, so any worker records a call without a lock. The adapters'
 * statistics are pulled when the page is rendered, from their own thread-safe getters.
 */
#include <pthread.h>
#include <string.h>

#include "amqp/amqp.h"
#include "cache/cache.h"
#include "common/metrics.h"
#include "common/rpc_status.h"
#include "server/internal.h"

/* ---- RPCs ---- */

/* Rows: the methods of server.c's table (srv_method_path), then "other". */
#define MAX_METHODS 31
static size_t nmethods;   /* set once by slots_build */
#define OTHER MAX_METHODS /* the row of unknown methods */
#define NROWS (MAX_METHODS + 1)

/* Codes 0..RPC_STATUS_MAX; their canonical names (rpc_status_name) are the label values. */
#define NCODES (RPC_STATUS_MAX + 1)

/* Latency buckets in microseconds: 1 ms .. 10 s. */
static const int64_t rpc_bounds[] = {1000,   2500,   5000,    10000,   25000,   50000,   100000,
                                     250000, 500000, 1000000, 2500000, 5000000, 10000000};
#define NBOUNDS (sizeof rpc_bounds / sizeof *rpc_bounds)
_Static_assert(NBOUNDS <= METRICS_HIST_MAX, "too many latency buckets");

static struct {
    atomic_uint_fast64_t calls[NCODES];
    metrics_hist latency;
} rpc[NROWS];

/* method path -> row: open addressing over a power-of-two table, filled once. */
#define NSLOTS 64
_Static_assert(NSLOTS >= 2 * MAX_METHODS, "keep the method hash sparse");
static signed char slots[NSLOTS]; /* row + 1; 0 = empty */
static pthread_once_t slots_once = PTHREAD_ONCE_INIT;

static uint32_t hash_path(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 16777619u;
    }
    return h;
}

static void slots_build(void)
{
    nmethods = srv_method_count();
    if (nmethods > MAX_METHODS)
        nmethods = MAX_METHODS; /* the rest count as "other" */
    for (size_t m = 0; m < nmethods; m++) {
        uint32_t i = hash_path(srv_method_path(m)) & (NSLOTS - 1);
        while (slots[i])
            i = (i + 1) & (NSLOTS - 1);
        slots[i] = (signed char)(m + 1);
    }
}

static size_t method_row(const char *method)
{
    if (!method)
        return OTHER;
    pthread_once(&slots_once, slots_build);
    for (uint32_t i = hash_path(method) & (NSLOTS - 1);; i = (i + 1) & (NSLOTS - 1)) {
        if (!slots[i])
            return OTHER;
        size_t row = (size_t)(slots[i] - 1);
        if (strcmp(srv_method_path(row), method) == 0)
            return row;
    }
}

void srv_metrics_rpc(const char *method, grpc_status_code code, int64_t duration_us)
{
    size_t row = method_row(method);
    size_t c = (int)code >= 0 && (size_t)code < NCODES ? (size_t)code : GRPC_STATUS_UNKNOWN;
    metrics_add(&rpc[row].calls[c], 1);
    metrics_hist_observe(&rpc[row].latency, rpc_bounds, NBOUNDS, duration_us);
}

/* ---- webhooks ---- */

static const char *const wh_providers[] = {"stripe", "paypal"};
static const char *const wh_results[] = {"applied",   "duplicate",   "ignored", "bad_signature",
                                         "malformed", "unavailable", "error"};
#define NPROVIDERS (sizeof wh_providers / sizeof *wh_providers)
#define NRESULTS   (sizeof wh_results / sizeof *wh_results)
static atomic_uint_fast64_t webhooks[NPROVIDERS][NRESULTS];

static int index_of(const char *const *names, size_t n, const char *s)
{
    for (size_t i = 0; s && i < n; i++)
        if (strcmp(names[i], s) == 0)
            return (int)i;
    return -1;
}

/* Counts one webhook: provider "stripe" | "paypal", result one of wh_results. Anything
 * else is a programmer error and is not counted. */
void srv__metrics_webhook(const char *provider, const char *result)
{
    int p = index_of(wh_providers, NPROVIDERS, provider);
    int r = index_of(wh_results, NRESULTS, result);
    if (p >= 0 && r >= 0)
        metrics_add(&webhooks[p][r], 1);
}

/* ---- rendering ---- */

static uint64_t load(const atomic_uint_fast64_t *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

static void render_rpc(metrics_buf *b)
{
    /* Only series that happened: 13 rows x 17 codes of zeros would drown the page. A
     * series appears with its first call, which rate() and increase() handle. */
    metrics_family(b, "orderd_rpc_requests_total", "counter",
                   "gRPC calls finished, by method (full path; \"other\" for unknown ones) and "
                   "status code.");
    for (size_t m = 0; m < NROWS; m++) {
        if (m >= nmethods && m != OTHER)
            continue;
        const char *name = m == OTHER ? "other" : srv_method_path(m);
        for (size_t c = 0; c < NCODES; c++) {
            uint64_t n = load(&rpc[m].calls[c]);
            if (n) {
                const char *labels[] = {"method", name, "code", rpc_status_name((int)c), NULL};
                metrics_sample_u64(b, "orderd_rpc_requests_total", labels, n);
            }
        }
    }
    metrics_family(b, "orderd_rpc_duration_seconds", "histogram",
                   "gRPC call latency from the call's arrival to its status, by method.");
    for (size_t m = 0; m < NROWS; m++) {
        if (metrics_hist_count(&rpc[m].latency, NBOUNDS) == 0)
            continue;
        const char *labels[] = {"method", m == OTHER ? "other" : srv_method_path(m), NULL};
        metrics_hist_write(b, "orderd_rpc_duration_seconds", labels, &rpc[m].latency, rpc_bounds,
                           NBOUNDS, 6);
    }
}

static void render_webhooks(metrics_buf *b)
{
    /* Every combination, zeros included: an alert on rate(...{result="bad_signature"})
     * works before the first bad one. */
    metrics_family(
        b, "orderd_webhooks_total", "counter",
        "Payment provider webhooks received, by provider and result (applied: changed an order; "
        "duplicate; ignored: changed nothing; bad_signature, malformed, unavailable, error).");
    for (size_t p = 0; p < NPROVIDERS; p++)
        for (size_t r = 0; r < NRESULTS; r++) {
            const char *labels[] = {"provider", wh_providers[p], "result", wh_results[r], NULL};
            metrics_sample_u64(b, "orderd_webhooks_total", labels, load(&webhooks[p][r]));
        }
}

static void counter(metrics_buf *b, const char *name, const char *help, uint64_t v)
{
    metrics_family(b, name, "counter", help);
    metrics_sample_u64(b, name, NULL, v);
}

static void render_cache(metrics_buf *b, const srv_server *srv)
{
    cache_stats sum = {0};
    bool any = false;
    for (int i = 0; srv->workers && i < srv->nworkers; i++) {
        const struct cache *c = srv->workers[i].cache;
        if (!c)
            continue;
        cache_stats st;
        cache_stats_get(c, &st);
        sum.hits += st.hits;
        sum.misses += st.misses;
        sum.fills += st.fills;
        sum.fill_refused_older += st.fill_refused_older;
        sum.invalidations += st.invalidations;
        sum.errors += st.errors;
        sum.epoch_bumps += st.epoch_bumps;
        sum.lease_waits += st.lease_waits;
        any = true;
    }
    if (!any) /* no Redis configured: no cache series at all */
        return;
    counter(b, "orderd_cache_hits_total", "GetOrder reads answered from Redis.", sum.hits);
    counter(b, "orderd_cache_misses_total", "Cache lookups that found no usable entry.",
            sum.misses);
    counter(b, "orderd_cache_fills_total", "Entries stored after a miss.", sum.fills);
    counter(b, "orderd_cache_fill_refused_older_total",
            "Fills refused because Redis held the same or a newer version, or the epoch moved.",
            sum.fill_refused_older);
    counter(b, "orderd_cache_invalidations_total", "Entries replaced or dropped after a write.",
            sum.invalidations);
    counter(b, "orderd_cache_errors_total",
            "Redis I/O failures, failed connect attempts and unexpected replies.", sum.errors);
    counter(b, "orderd_cache_epoch_bumps_total", "Cache epochs moved after a lost write.",
            sum.epoch_bumps);
    counter(b, "orderd_cache_lease_waits_total", "Misses that waited for another caller's fill.",
            sum.lease_waits);
}

static void render_ratelimit(metrics_buf *b, const srv_server *srv)
{
    if (!srv->limits)
        return;
    uint64_t fallback = 0, refused = 0;
    srv_limits_stats(srv->limits, &fallback, &refused);
    counter(b, "orderd_ratelimit_fallback_decisions_total",
            "Rate-limit decisions taken by the in-process fallback because Redis was down.",
            fallback);
    counter(b, "orderd_ratelimit_refused_total", "Calls refused with RESOURCE_EXHAUSTED.", refused);
}

static void render_amqp(metrics_buf *b, const srv_server *srv)
{
    amqp_relay_stats rs = {.connected = true};
    amqp_consumer_stats cs = {0};
    /* Counters add up over the process's relays; the gauges are the worst of them. */
    for (int i = 0; i < srv->nrelays; i++) {
        amqp_relay_stats one = {0};
        amqp_relay_stats_get(srv->relays[i], &one);
        rs.published += one.published;
        rs.nacked += one.nacked;
        rs.unroutable += one.unroutable;
        rs.timeouts += one.timeouts;
        rs.reconnects += one.reconnects;
        rs.pruned += one.pruned;
        if (one.backlog > rs.backlog)
            rs.backlog = one.backlog;
        if (one.oldest_unsent_age_us > rs.oldest_unsent_age_us)
            rs.oldest_unsent_age_us = one.oldest_unsent_age_us;
        rs.connected = rs.connected && one.connected;
    }
    if (srv->consumer)
        amqp_consumer_stats_get(srv->consumer, &cs);

    if (srv->relay) {
        counter(b, "orderd_outbox_published_total",
                "Outbox rows published, acknowledged by the broker and marked sent.", rs.published);
        counter(b, "orderd_outbox_nacked_total", "Publishes the broker refused (basic.nack).",
                rs.nacked);
        counter(b, "orderd_outbox_unroutable_total",
                "Publishes returned as unroutable (basic.return).", rs.unroutable);
        counter(b, "orderd_outbox_confirm_timeouts_total",
                "Publishes with no broker confirm in time.", rs.timeouts);
        counter(b, "orderd_outbox_pruned_total", "Published outbox rows deleted after retention.",
                rs.pruned);
        metrics_family(b, "orderd_outbox_backlog", "gauge",
                       "Unsent outbox rows, at the relay's last refresh.");
        metrics_sample_i64(b, "orderd_outbox_backlog", NULL, rs.backlog);
        metrics_family(b, "orderd_outbox_oldest_unsent_age_seconds", "gauge",
                       "Age of the oldest unsent outbox row (0 if none), at the last refresh.");
        metrics_sample_fixed(b, "orderd_outbox_oldest_unsent_age_seconds", NULL,
                             rs.oldest_unsent_age_us, 6);
    }
    if (srv->consumer) {
        metrics_family(b, "orderd_inventory_replies_total", "counter",
                       "Inventory replies consumed, by outcome.");
        struct {
            const char *result;
            uint64_t n;
        } rows[] = {{"applied", cs.applied},
                    {"duplicate", cs.duplicates},
                    {"dead_lettered", cs.dead_lettered},
                    {"requeued", cs.requeued}};
        for (size_t i = 0; i < sizeof rows / sizeof *rows; i++) {
            const char *labels[] = {"result", rows[i].result, NULL};
            metrics_sample_u64(b, "orderd_inventory_replies_total", labels, rows[i].n);
        }
    }
    if (!srv->relay && !srv->consumer)
        return;
    const char *relay[] = {"connection", "relay", NULL};
    const char *consumer[] = {"connection", "consumer", NULL};
    metrics_family(b, "orderd_amqp_reconnects_total", "counter",
                   "RabbitMQ connections re-opened, by connection (relay, consumer).");
    if (srv->relay)
        metrics_sample_u64(b, "orderd_amqp_reconnects_total", relay, rs.reconnects);
    if (srv->consumer)
        metrics_sample_u64(b, "orderd_amqp_reconnects_total", consumer, cs.reconnects);
    metrics_family(b, "orderd_amqp_connected", "gauge",
                   "1 while the connection to RabbitMQ is up, by connection (relay, consumer).");
    if (srv->relay)
        metrics_sample_u64(b, "orderd_amqp_connected", relay, rs.connected ? 1 : 0);
    if (srv->consumer)
        metrics_sample_u64(b, "orderd_amqp_connected", consumer, cs.connected ? 1 : 0);
}

/* Renders the whole /metrics page into b. Returns 0, or -1 if memory ran out. */
int srv__metrics_render(srv_server *srv, metrics_buf *b)
{
    metrics_family(b, "orderd_up", "gauge", "1 while this orderd process serves.");
    metrics_sample_u64(b, "orderd_up", NULL, 1);
    render_rpc(b);
    render_webhooks(b);
    if (srv) {
        render_cache(b, srv);
        render_ratelimit(b, srv);
        render_amqp(b, srv);
    }
    return metrics_buf_failed(b) ? -1 : 0;
}
