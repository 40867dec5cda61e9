/* cache.h — the Redis adapter (hiredis): a read-through order cache in front of the
 * order store, and the shared rate-limit budget.
 *
 * DESIGN
 * One `struct cache` is one Redis connection owned by one thread (a worker), like the
 * PostgreSQL store. Redis only holds what can be lost: every call is bounded by a short
 * timeout (a few milliseconds), and when Redis is down, slow or restarting, every call
 * answers "down" quickly and the caller goes on without it (orders from PostgreSQL, rate
 * limits from the in-process fallback). The connection is re-opened lazily with back-off:
 * at most one connect attempt (itself bounded by the timeout) per back-off period, so a
 * dead Redis costs the request path nothing but a clock read.
 *
 * Orders are cached as opaque bytes (the server's protobuf encoding, via cache_codec)
 * under "<prefix>o:<epoch>:<order_id>", stored together with the order's version by an
 * atomic Lua script that refuses to replace a newer version (set-if-newer): a reader that
 * missed, was slow, and writes an old version back after a newer commit never wins.
 * Writers replace the entry with the new version after their commit.
 *
 * Outages: a write that could not update Redis leaves a possibly stale entry behind. The
 * cache remembers that, and when Redis answers again it first bumps the shared epoch
 * ("<prefix>epoch", INCR), which orphans every entry written before (they expire by TTL);
 * reads and writes always use the current epoch, read in the same round trip.
 *
 * Stampedes: on a miss, one caller per key takes a short fill lease (SET NX PX); others
 * wait a few milliseconds for the entry to appear before reading PostgreSQL themselves,
 * so an expiring hot key costs a couple of PostgreSQL reads, not one per request.
 *
 * Rate limits: GCRA in one Lua script using Redis's TIME, so every replica shares one
 * budget per key. The limiter check and a GetOrder cache lookup can go in one round trip
 * (cache_rate_limit_prefetch): the fetched entry is kept for the next order_get of that id.
 *
 * hiredis writes with write(2): the process must ignore SIGPIPE (server/main.c does), or a
 * write to a Redis that just died kills it. Not thread-safe: one cache per thread.
 */
#ifndef ORDERD_CACHE_CACHE_H
#define ORDERD_CACHE_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "orders/orders.h"

struct cache;

typedef struct cache_options {
    const char *host; /* "127.0.0.1" */
    int port;
    int database;           /* SELECT n after connecting; 0 = default */
    const char *password;   /* AUTH after connecting; NULL or "" = none */
    int64_t timeout_us;     /* per call (connect included), e.g. 5 ms */
    int64_t backoff_min_us; /* first wait after a failure, e.g. 100 ms */
    int64_t backoff_max_us; /* cap, e.g. 2 s */
    const char *key_prefix; /* e.g. "orderd:" */
    int64_t order_ttl_us;   /* TTL of cached orders; each entry gets +-10% jitter */
    /* TLS, done in-process with OpenSSL (hiredis 0.14 has none): hiredis talks through a
     * socketpair whose other end a thread per connection pumps to and from an SSL
     * connection (cache/tls.c). The TCP connect and the handshake are each bounded by
     * timeout_us. The server certificate is always verified against tls_ca_file, and its
     * name against tls_server_name (or host). */
    bool tls;
    const char *tls_ca_file;     /* PEM CA bundle; required when tls is set */
    const char *tls_cert_file;   /* client certificate (mutual TLS); NULL or "" = none */
    const char *tls_key_file;    /* its private key; NULL or "" = inside tls_cert_file */
    const char *tls_server_name; /* SNI and the name verified; NULL or "" = host */
} cache_options;

/** Opens a cache (connecting at once if Redis answers; never failing because it does
 *  not). NULL only on bad options or out of memory, with a reason in err. Bad options:
 *  no host, port outside 1..65535, database < 0, timeout <= 0, back-off min <= 0 or
 *  max < min, empty or over-long (> 128) prefix, TTL < 1 ms, tls without a CA file.
 *  The options are copied. */
struct cache *cache_open(const cache_options *opt, char *err, size_t errlen);
/** Closes the connection and frees. NULL does nothing. */
void cache_close(struct cache *c);
/** True if the last call reached Redis (or a connect now succeeds, back-off permitting).
 *  Calling it now and then from an idle worker also settles an epoch bump owed after a
 *  lost write (see store_wrap.c) without waiting for that worker's next request. */
bool cache_up(struct cache *c);

/* ---- orders ---- */

/** Encodes / decodes an order for the cache (the server supplies protobuf). */
typedef struct cache_codec {
    /** Returns malloc'd bytes and their length, or NULL. */
    uint8_t *(*encode)(const order_t *o, size_t *len);
    /** Fills *out (empty on entry) from bytes; false if they do not decode. */
    bool (*decode)(const uint8_t *bytes, size_t len, order_t *out);
} cache_codec;

/** Counters, read by the metrics endpoint to come and by tests. Per cache (per thread);
 *  cache_stats_get may be called from another thread.
 *  hits: order_get answered from Redis (prefetched, looked up, or after a lease wait);
 *  misses: lookups that found no usable entry; fills: entries stored after a miss;
 *  fill_refused_older: fills refused because Redis held the same or a newer version, or
 *  the epoch moved since the miss; invalidations: entries replaced or dropped after a
 *  write; errors: I/O failures, failed connect attempts and unexpected replies;
 *  epoch_bumps: epochs moved after a lost write; lease_waits: misses that waited for
 *  another caller's fill. */
typedef struct cache_stats {
    uint64_t hits, misses, fills, fill_refused_older, invalidations, errors, epoch_bumps,
        lease_waits;
} cache_stats;
void cache_stats_get(const struct cache *c, cache_stats *out);

/**
 * Wraps an order store: order_get reads the cache first and fills it on a miss (with the
 * fill lease against stampedes); order_insert, order_transition, order_amend and orders_expire_due
 * call the inner store and then store the new version in the cache (set-if-newer);
 * order_list and the product calls go straight to the inner store. When Redis is down the
 * wrapper behaves exactly like the inner store. *inner is copied, but what inner->self
 * points at must outlive *out. out->self points into *c: one wrapper per cache (wrapping
 * again replaces the inner store and codec), valid until cache_close(c).
 */
void cache_store_wrap(struct cache *c, const order_store *inner, const cache_codec *codec,
                      order_store *out);

/* ---- rate limits ---- */

typedef struct cache_limit {
    double rate_per_s; /* sustained requests per second */
    int burst;         /* requests allowed at once */
} cache_limit;

typedef struct cache_limit_result {
    bool allowed;
    int64_t retry_after_us; /* when refused: wait this long, then one request fits */
    int64_t remaining;      /* requests that would still fit now */
} cache_limit_result;

/** Takes one request from the budget `key` (GCRA, Redis TIME). Returns 0 with *out set,
 *  or -1 if Redis is down (the caller falls back to its local limiter); -1 too, logged,
 *  for a limit that is not a positive finite rate or a key over ~380 bytes. A burst
 *  below 1 counts as 1. */
int cache_rate_limit(struct cache *c, const char *key, const cache_limit *limit,
                     cache_limit_result *out);

/** The same, and in the same round trip fetches the cached entry of order_id for the next
 *  order_get of that id through cache_store_wrap (no second round trip on a hit). The
 *  prefetch is one-shot and belongs to the current request: the next order_get (of any
 *  id) or rate-limit call discards it, and it is ignored once older than 50 ms. */
int cache_rate_limit_prefetch(struct cache *c, const char *key, const cache_limit *limit,
                              cache_limit_result *out, const char *order_id);

#endif
