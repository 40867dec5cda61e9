/* store_wrap.c — the read-through order cache as an order_store decorator.
 *
 * DESIGN
 * order_get: one round trip reads the epoch and the entry (or uses the entry prefetched
 * by cache_rate_limit_prefetch for this id) and, on a miss, tries to take the key's fill
 * lease in the same script. The lease holder reads the inner store (PostgreSQL) and fills
 * the cache with set-if-newer, naming the epoch its miss was seen under. Everyone else
 * polls the cache for at most LEASE_WAIT_US (and never more than half of what is left of
 * the caller's deadline), first after LEASE_POLL_US and then at doubling intervals (1, 3,
 * 7, 15, 20 ms: a hot key's waiters must not turn into a stampede on Redis instead), and
 * reads the inner store itself if the entry does not show up, or if the holder gave the
 * lease back without filling.
 *
 * Writes: after the inner store committed, the new order replaces the entry
 * (set-if-newer). When that cannot reach Redis, the cache is marked dirty and its next
 * (re)connect bumps the epoch before anything else (cache.c). What remains open:
 *  - until then (at least the back-off, and the reconnect is lazy: it happens on this
 *    cache's next call), another replica may still serve the entry written before the
 *    outage; a long-idle worker delays the bump (calling cache_up() now and then from an
 *    idle worker closes that);
 *  - a Redis restart loses everything anyway (no persistence in our setup), so the bump
 *    only matters when Redis survived (a network cut, a stall);
 *  - an inner write whose outcome is unknown (UNAVAILABLE or INTERNAL: the commit may
 *    have happened) drops the entry, but a reader that read the old version before that
 *    commit may fill it again afterwards: it stays until its TTL.
 *
 * The domain checks ownership after order_get, so the decorator does not. Redis being
 * down makes the decorator exactly the inner store.
 */
#include "cache/internal.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"

#define LEASE_POLL_US       1000  /* a waiter's first look for the entry, then doubling... */
#define LEASE_WAIT_US       20000 /* ...for at most this long */
#define PREFETCH_MAX_AGE_US 50000 /* an older prefetch belongs to another request: ignored */

static void sleep_us(int64_t us)
{
    struct timespec ts = {.tv_sec = (time_t)(us / 1000000), .tv_nsec = (long)(us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Decodes an entry into *out. false (with *out empty) if it does not decode or is not
 * the order asked for. */
static bool serve(struct cache__wrap *w, const cache__entry *e, const char *order_id, order_t *out)
{
    if (!e->bytes)
        return false;
    if (!w->codec.decode(e->bytes, e->len, out) || strcmp(out->id, order_id) != 0 ||
        out->version != e->version) {
        order_clear(out);
        return false;
    }
    return true;
}

/* Takes the prefetched entry if it is for order_id and fresh; the prefetch is one-shot
 * either way. 0 with *e filled, or -1. */
static int take_prefetch(struct cache *c, const char *order_id, cache__entry *e)
{
    struct cache__prefetch *p = &c->pf;
    if (!p->valid)
        return -1;
    bool usable = strcmp(p->id, order_id) == 0 && clock_mono_us() - p->at_us <= PREFETCH_MAX_AGE_US;
    if (!usable) {
        cache__prefetch_clear(c);
        return -1;
    }
    *e = p->e;
    memset(&p->e, 0, sizeof p->e);
    p->valid = false;
    return 0;
}

/* A write could not update Redis: the entry there may be older than PostgreSQL now. If
 * the connection is still up (Redis answered with an error), it is dropped so that the
 * reconnect, after the back-off, bumps the epoch. */
static void mark_dirty(struct cache *c, const char *op)
{
    c->dirty = true;
    cache__owe_bump(); /* every worker of the process must stop trusting old entries */
    if (c->rc)
        cache__drop(c, op, "a write was refused: reconnecting to bump the epoch");
}

/* After a commit: replaces the entry with o (set-if-newer), or drops it if o cannot be
 * encoded. */
static void store_after_write(struct cache__wrap *w, const order_t *o, const char *op)
{
    struct cache *c = w->c;
    if (strlen(o->id) > CACHE__ID_MAX)
        return;
    size_t len = 0;
    uint8_t *b = w->codec.encode(o, &len);
    int rc;
    if (b)
        rc = cache__entry_set(c, o->id, o->version, b, len, -1);
    else
        rc = cache__entry_drop(c, o->id) == 0 ? CACHE__SET_STORED : CACHE__SET_FAILED;
    free(b);
    if (rc == CACHE__SET_FAILED)
        mark_dirty(c, op);
    else
        CACHE__COUNT(c, invalidations);
}

/* After an inner write failed in a way that may still have committed. */
static void drop_after_unknown(struct cache__wrap *w, const char *order_id, int code,
                               const char *op)
{
    if (code != ORDER_EUNAVAILABLE && code != ORDER_EINTERNAL)
        return; /* nothing was written */
    if (strlen(order_id) > CACHE__ID_MAX)
        return;
    if (cache__entry_drop(w->c, order_id) != 0)
        mark_dirty(w->c, op);
    else
        CACHE__COUNT(w->c, invalidations);
}

/* Waits for the lease holder's fill. true with *out served from the cache; false to read
 * the inner store, with *epoch the latest epoch seen (for the fill). */
static bool wait_for_fill(struct cache__wrap *w, order_ctx *ctx, const char *order_id,
                          int64_t *epoch, order_t *out)
{
    struct cache *c = w->c;
    int64_t start = clock_mono_us();
    int64_t limit = start + LEASE_WAIT_US;
    int64_t left = order_ctx_remaining_us(ctx);
    if (left != INT64_MAX && start + left / 2 < limit)
        limit = start + left / 2;
    CACHE__COUNT(c, lease_waits);
    int64_t pause = LEASE_POLL_US;
    for (;;) {
        int64_t now = clock_mono_us();
        if (now >= limit)
            return false;
        sleep_us(now + pause < limit ? pause : limit - now);
        pause *= 2;
        cache__entry e;
        if (cache__entry_read(c, order_id, CACHE__READ_POLL, &e) != 0)
            return false;
        *epoch = e.epoch;
        if (e.found) {
            bool ok = serve(w, &e, order_id, out);
            cache__entry_free(&e);
            if (ok)
                CACHE__COUNT(c, hits);
            return ok;
        }
        bool held = e.flag;
        cache__entry_free(&e);
        if (!held)
            return false; /* the holder gave up (or its fill was refused) */
    }
}

static int w_order_get(void *self, order_ctx *ctx, const char *order_id, order_t *out)
{
    struct cache__wrap *w = self;
    struct cache *c = w->c;
    const order_store *in = &w->inner;
    if (strlen(order_id) > CACHE__ID_MAX) {
        cache__prefetch_clear(c);
        return in->order_get(in->self, ctx, order_id, out);
    }

    cache__entry e = {0};
    bool have = take_prefetch(c, order_id, &e) == 0 && e.found;
    if (!have) {
        /* A prefetched miss is looked up again, this time taking the lease. */
        cache__entry_free(&e);
        if (cache__entry_read(c, order_id, CACHE__READ_LEASE, &e) != 0)
            return in->order_get(in->self, ctx, order_id, out); /* Redis down */
    }

    int64_t epoch = e.epoch;
    bool leased = false;
    if (e.found) {
        bool ok = serve(w, &e, order_id, out);
        cache__entry_free(&e);
        if (ok) {
            CACHE__COUNT(c, hits);
            return ORDER_OK;
        }
        /* Not decodable (a codec change, a corrupt value): gone, and read as a miss. */
        CACHE__COUNT(c, misses);
        (void)cache__entry_drop(c, order_id);
    } else {
        CACHE__COUNT(c, misses);
        leased = e.flag;
        cache__entry_free(&e);
        if (!leased && wait_for_fill(w, ctx, order_id, &epoch, out))
            return ORDER_OK;
    }

    int rc = in->order_get(in->self, ctx, order_id, out);
    int set = CACHE__SET_FAILED;
    if (rc == ORDER_OK) {
        size_t len = 0;
        uint8_t *b = w->codec.encode(out, &len);
        if (b)
            set = cache__entry_set(c, order_id, out->version, b, len, epoch);
        free(b);
        if (set == CACHE__SET_STORED)
            CACHE__COUNT(c, fills);
        else if (set == CACHE__SET_REFUSED)
            CACHE__COUNT(c, fill_refused_older);
    }
    /* Waiters look for the entry while the lease exists: if nothing reached the SET
     * script (which deletes the lease), let them go. */
    if (leased && set == CACHE__SET_FAILED)
        cache__lease_release(c, order_id, epoch);
    return rc;
}

static int w_order_insert(void *self, order_ctx *ctx, const char *request_id,
                          const char *fingerprint, order_t *o, bool *replayed)
{
    struct cache__wrap *w = self;
    int rc = w->inner.order_insert(w->inner.self, ctx, request_id, fingerprint, o, replayed);
    if (rc == ORDER_OK && !*replayed)
        store_after_write(w, o, "order insert");
    return rc;
}

static int w_order_transition(void *self, order_ctx *ctx, const order_transition *t, order_t *out)
{
    struct cache__wrap *w = self;
    int rc = w->inner.order_transition(w->inner.self, ctx, t, out);
    if (rc == ORDER_OK)
        store_after_write(w, out, "order transition");
    else
        drop_after_unknown(w, t->order_id, rc, "order transition");
    return rc;
}

static int w_order_amend(void *self, order_ctx *ctx, const order_amendment *a, order_t *out)
{
    struct cache__wrap *w = self;
    int rc = w->inner.order_amend(w->inner.self, ctx, a, out);
    if (rc == ORDER_OK)
        store_after_write(w, out, "order amend");
    else
        drop_after_unknown(w, a->order_id, rc, "order amend");
    return rc;
}

static int w_inbound_seen(void *self, order_ctx *ctx, const order_inbound *in, bool *seen)
{
    struct cache__wrap *w = self;
    return w->inner.inbound_seen(w->inner.self, ctx, in, seen);
}

static int w_order_find_by_payment(void *self, order_ctx *ctx, order_provider p, const char *ref,
                                   order_t *out)
{
    struct cache__wrap *w = self;
    return w->inner.order_find_by_payment(w->inner.self, ctx, p, ref, out);
}

static int w_orders_expire_due(void *self, order_ctx *ctx, int64_t created_before_us,
                               const char *reason, size_t max, order_t **out, size_t *n)
{
    struct cache__wrap *w = self;
    int rc = w->inner.orders_expire_due(w->inner.self, ctx, created_before_us, reason, max, out, n);
    if (rc == ORDER_OK)
        for (size_t i = 0; i < *n; i++)
            store_after_write(w, &(*out)[i], "order expiry");
    /* On a failure after the commit (reading the items), the expired orders' entries stay
     * until their TTL: the store's answer does not say which orders moved. */
    return rc;
}

static int w_orders_unsettled(void *self, order_ctx *ctx, int64_t changed_before_us, size_t max,
                              order_t **out, size_t *n)
{
    struct cache__wrap *w = self;
    return w->inner.orders_unsettled(w->inner.self, ctx, changed_before_us, max, out, n);
}

static int w_order_list(void *self, order_ctx *ctx, const order_list_query *q, order_t **out,
                        size_t *n)
{
    struct cache__wrap *w = self;
    return w->inner.order_list(w->inner.self, ctx, q, out, n);
}

static int w_products_get(void *self, order_ctx *ctx, const char *const *ids, size_t n,
                          order_product *out, bool *found)
{
    struct cache__wrap *w = self;
    return w->inner.products_get(w->inner.self, ctx, ids, n, out, found);
}

static int w_product_upsert(void *self, order_ctx *ctx, const order_product *p, order_product *out)
{
    struct cache__wrap *w = self;
    return w->inner.product_upsert(w->inner.self, ctx, p, out);
}

void cache_store_wrap(struct cache *c, const order_store *inner, const cache_codec *codec,
                      order_store *out)
{
    assert(c && inner && codec && codec->encode && codec->decode && out);
    c->wrap.c = c;
    c->wrap.inner = *inner;
    c->wrap.codec = *codec;
    memset(out, 0, sizeof *out);
    out->self = &c->wrap;
    out->products_get = w_products_get;
    out->product_upsert = w_product_upsert;
    out->order_insert = w_order_insert;
    out->order_get = w_order_get;
    out->order_list = w_order_list;
    out->order_transition = w_order_transition;
    out->order_amend = w_order_amend;
    out->inbound_seen = w_inbound_seen;
    out->order_find_by_payment = w_order_find_by_payment;
    out->orders_expire_due = w_orders_expire_due;
    out->orders_unsettled = w_orders_unsettled;
}
