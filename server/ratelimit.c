/* ratelimit.c — the rate-limit interceptor: per caller and per method class, shared by
 * every replica through Redis, with a local fallback when Redis is unreachable.
 *
 * DESIGN
 * A budget is (caller, class): classes are read (GetOrder, ListOrders, GetProduct), write
 * (PlaceOrder, CancelOrder, ConfirmPayment, UpdateOrderStatus) and admin (UpsertProduct),
 * or the method itself when ratelimit.overrides names it. The caller's highest role picks
 * the rate and burst. The decision is GCRA in Redis (cache_rate_limit), so N replicas
 * share one budget. When Redis cannot be reached the request is never failed for it: a
 * process-wide token bucket per budget takes over at rate / ratelimit.replicas, logged
 * once per outage and counted.
 *
 * The local table is a fixed array of buckets indexed by a hash of the key, guarded by
 * one mutex (held for a few instructions). A collision resets the other key's bucket,
 * which errs on the side of letting requests through; it is a fallback for outages.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache.h"
#include "common/clock.h"
#include "common/log.h"
#include "server/internal.h"

#define MAX_OVERRIDES 32
#define LOCAL_BUCKETS 4096
/* An outage is over after this long without a local decision (see srv_ratelimit_check). */
#define OUTAGE_QUIET_US (10 * 1000000LL)

typedef struct override {
    char method[48]; /* "PlaceOrder" */
    unsigned role;   /* ORDER_ROLE_* or 0 = any role */
    cache_limit limit;
} override;

typedef struct bucket {
    uint64_t key_hash;
    double tokens;
    int64_t last_us;
} bucket;

struct srv_limits {
    bool enabled;
    int replicas;
    cache_limit by_role[3]; /* customer, service, admin */
    override overrides[MAX_OVERRIDES];
    size_t noverrides;
    pthread_mutex_t mu; /* guards local[] */
    bucket local[LOCAL_BUCKETS];
    atomic_bool fallback_active; /* an outage is being reported */
    atomic_int_fast64_t last_fallback_us;
    atomic_uint_fast64_t fallback_decisions;
    atomic_uint_fast64_t refused;
};

static int role_index(unsigned role)
{
    return role == ORDER_ROLE_ADMIN ? 2 : role == ORDER_ROLE_SERVICE ? 1 : 0;
}

static unsigned highest_role(unsigned roles)
{
    if (roles & ORDER_ROLE_ADMIN)
        return ORDER_ROLE_ADMIN;
    if (roles & ORDER_ROLE_SERVICE)
        return ORDER_ROLE_SERVICE;
    return ORDER_ROLE_CUSTOMER;
}

/* "20/40" -> rate 20/s, burst 40. */
static bool parse_limit(const char *s, cache_limit *out)
{
    char *end;
    double rate = strtod(s, &end);
    if (end == s || *end != '/' || !(rate > 0) || !isfinite(rate))
        return false;
    const char *b = end + 1;
    long burst = strtol(b, &end, 10);
    if (end == b || *end != '\0' || burst < 1 || burst > 1000000)
        return false;
    out->rate_per_s = rate;
    out->burst = (int)burst;
    return true;
}

/* "PlaceOrder:customer=2/5,ListOrders=10/20" */
static int parse_overrides(srv_limits *l, const char *spec, char *err, size_t errlen)
{
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", spec);
    char *save = NULL;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        while (*item == ' ')
            item++;
        if (!*item)
            continue;
        char *eq = strchr(item, '=');
        if (!eq || l->noverrides == MAX_OVERRIDES) {
            snprintf(err, errlen, "ratelimit.overrides: \"%s\" is not Method[:role]=rate/burst",
                     item);
            return -1;
        }
        *eq = '\0';
        override *o = &l->overrides[l->noverrides];
        char *colon = strchr(item, ':');
        if (colon) {
            *colon = '\0';
            o->role = srv_roles_parse(colon + 1);
            if (!o->role || (o->role & (o->role - 1))) {
                snprintf(err, errlen, "ratelimit.overrides: unknown role \"%s\"", colon + 1);
                return -1;
            }
        }
        if (!parse_limit(eq + 1, &o->limit) || strlen(item) >= sizeof o->method || !*item) {
            snprintf(err, errlen, "ratelimit.overrides: \"%s=%s\" is not Method[:role]=rate/burst",
                     item, eq + 1);
            return -1;
        }
        snprintf(o->method, sizeof o->method, "%s", item);
        l->noverrides++;
    }
    return 0;
}

int srv_limits_create(const srv_config *cfg, srv_limits **out, char *err, size_t errlen)
{
    srv_limits *l = calloc(1, sizeof *l);
    if (!l) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    l->enabled = cfg->ratelimit_enabled;
    l->replicas = cfg->ratelimit_replicas;
    const char *specs[3] = {cfg->ratelimit_customer, cfg->ratelimit_service, cfg->ratelimit_admin};
    const char *names[3] = {"ratelimit.customer", "ratelimit.service", "ratelimit.admin"};
    for (int i = 0; i < 3; i++) {
        if (!parse_limit(specs[i], &l->by_role[i])) {
            snprintf(err, errlen, "%s: \"%s\" is not rate/burst (e.g. 20/40)", names[i], specs[i]);
            free(l);
            return -1;
        }
    }
    if (parse_overrides(l, cfg->ratelimit_overrides, err, errlen) != 0) {
        free(l);
        return -1;
    }
    pthread_mutex_init(&l->mu, NULL);
    atomic_init(&l->fallback_active, false);
    atomic_init(&l->last_fallback_us, 0);
    atomic_init(&l->fallback_decisions, 0);
    atomic_init(&l->refused, 0);
    *out = l;
    return 0;
}

void srv_limits_destroy(srv_limits *l)
{
    if (!l)
        return;
    pthread_mutex_destroy(&l->mu);
    free(l);
}

void srv_limits_stats(const srv_limits *l, uint64_t *fallback_decisions, uint64_t *refused)
{
    *fallback_decisions = atomic_load(&l->fallback_decisions);
    *refused = atomic_load(&l->refused);
}

/* FNV-1a, for the local table. */
static uint64_t hash_key(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

/* Token bucket at rate / replicas, burst / replicas (at least 1). */
static void local_decide(srv_limits *l, const char *key, const cache_limit *lim,
                         cache_limit_result *res)
{
    double rate = lim->rate_per_s / l->replicas;
    double burst = (double)lim->burst / l->replicas;
    if (burst < 1)
        burst = 1;
    uint64_t h = hash_key(key);
    int64_t now = clock_mono_us();
    pthread_mutex_lock(&l->mu);
    bucket *b = &l->local[h % LOCAL_BUCKETS];
    if (b->key_hash != h) {
        b->key_hash = h;
        b->tokens = burst;
        b->last_us = now;
    }
    b->tokens += (double)(now - b->last_us) / 1e6 * rate;
    if (b->tokens > burst)
        b->tokens = burst;
    b->last_us = now;
    if (b->tokens >= 1) {
        b->tokens -= 1;
        res->allowed = true;
        res->remaining = (int64_t)b->tokens;
        res->retry_after_us = 0;
    } else {
        res->allowed = false;
        res->remaining = 0;
        res->retry_after_us = (int64_t)ceil((1 - b->tokens) / rate * 1e6);
    }
    pthread_mutex_unlock(&l->mu);
}

bool srv_ratelimit_check(srv_call *c, srv_reply *r, const char *prefetch_order_id)
{
    srv_limits *l = c->w->srv->limits;
    if (!l || !l->enabled || !c->method->rl_class)
        return true;
    unsigned role = highest_role(c->ctx.caller.roles);
    const char *short_name = strrchr(c->method->path, '/');
    short_name = short_name ? short_name + 1 : c->method->path;
    cache_limit lim = l->by_role[role_index(role)];
    const char *budget = c->method->rl_class;
    const override *best = NULL;
    for (size_t i = 0; i < l->noverrides; i++) {
        const override *o = &l->overrides[i];
        if (strcmp(o->method, short_name) != 0 || (o->role && o->role != role))
            continue;
        if (!best || (o->role && !best->role))
            best = o;
    }
    if (best) {
        lim = best->limit;
        budget = short_name;
    }
    char key[ORDER_CUSTOMER_MAX + 64];
    snprintf(key, sizeof key, "%s:%s", budget, c->ctx.caller.subject);

    cache_limit_result res = {.allowed = true};
    int rc = -1;
    if (c->w->cache)
        rc = prefetch_order_id
                 ? cache_rate_limit_prefetch(c->w->cache, key, &lim, &res, prefetch_order_id)
                 : cache_rate_limit(c->w->cache, key, &lim, &res);
    if (rc != 0) {
        /* Never fail a request because the limiter's store is down. */
        atomic_store(&l->last_fallback_us, clock_mono_us());
        if (!atomic_exchange(&l->fallback_active, true))
            log_kv(LOG_WARN, "rate limits: Redis unreachable, limiting locally", LOG_F_INT,
                   "replicas", (int64_t)l->replicas, LOG_F_END);
        atomic_fetch_add(&l->fallback_decisions, 1);
        local_decide(l, key, &lim, &res);
    } else if (atomic_load(&l->fallback_active) &&
               clock_mono_us() - atomic_load(&l->last_fallback_us) > OUTAGE_QUIET_US &&
               atomic_exchange(&l->fallback_active, false)) {
        /* Workers lose their connections one by one and reconnect after their own
         * back-off; the outage is over once no worker has had to limit locally for a
         * while, not when the first healthy worker answers. One line each way. */
        log_kv(LOG_INFO, "rate limits: Redis reachable again, limits shared again", LOG_F_INT,
               "local_decisions_total", (int64_t)atomic_load(&l->fallback_decisions), LOG_F_END);
    }
    if (res.allowed)
        return true;
    atomic_fetch_add(&l->refused, 1);
    srv_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED,
                    "rate limit exceeded for %s (%g requests/s, burst %d): retry in %lld ms",
                    budget, lim.rate_per_s, lim.burst,
                    (long long)((res.retry_after_us + 999) / 1000));
    r->retry_after_us = res.retry_after_us > 0 ? res.retry_after_us : 1000;
    snprintf(r->quota_subject, sizeof r->quota_subject, "caller:%s", c->ctx.caller.subject);
    snprintf(r->quota_description, sizeof r->quota_description,
             "%s: %g requests/s, burst %d, shared by all replicas", budget, lim.rate_per_s,
             lim.burst);
    return false;
}
