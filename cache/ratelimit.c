/* ratelimit.c — shared rate-limit budgets: GCRA in one Lua script on Redis's clock, and
 * the same call pipelined with a GetOrder cache lookup.
 *
 * DESIGN
 * GCRA (the generic cell rate algorithm, as in redis-cell) keeps one number per budget:
 * the theoretical arrival time (TAT) of the next request. With the emission interval
 * T = 1/rate and the tolerance tau = T * burst, a request at `now` is allowed if
 * max(TAT, now) + T - now <= tau, and then TAT moves to max(TAT, now) + T; otherwise it
 * must wait for the excess. `now` is Redis's TIME, so every replica shares one clock and
 * one budget. All arithmetic is in whole microseconds (T is rounded to one): Lua numbers
 * are doubles, exact for integers up to 2^53, and a Unix time in microseconds is about
 * 2^51. The key expires when its TAT has passed: no key is the same as a full budget.
 */
#include "cache/internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"

/* KEYS[1] the budget; ARGV: T (µs, integer >= 1), burst (>= 1).
 * Returns {allowed (0/1), retry after µs, remaining}. */
const char cache__lua_gcra[] = "local T = tonumber(ARGV[1])\n"
                               "local tau = T * tonumber(ARGV[2])\n"
                               "local t = redis.call('TIME')\n"
                               "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
                               "local tat = tonumber(redis.call('GET', KEYS[1])) or now\n"
                               "if tat < now then tat = now end\n"
                               "local diff = tat + T - now\n"
                               "if diff > tau then return {0, diff - tau, 0} end\n"
                               "redis.call('SET', KEYS[1], string.format('%d', tat + T), 'PX',\n"
                               "           string.format('%d', math.ceil(diff / 1000) + 1))\n"
                               "return {1, 0, math.floor((tau - diff) / T)}\n";

/* The limit as the script's arguments; false if it is not a limit. */
static bool limit_args(const cache_limit *l, int64_t *t_us, int64_t *burst)
{
    if (!l || !isfinite(l->rate_per_s) || l->rate_per_s <= 0)
        return false;
    double t = 1e6 / l->rate_per_s;
    if (t > 1e15)
        return false; /* slower than one request in 30 years: a unit mistake */
    *t_us = t < 1 ? 1 : (int64_t)(t + 0.5);
    *burst = l->burst < 1 ? 1 : l->burst;
    return true;
}

static int parse_result(struct cache *c, redisReply *r, cache_limit_result *out)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[1]->type != REDIS_REPLY_INTEGER ||
        r->element[2]->type != REDIS_REPLY_INTEGER) {
        cache__bad_reply(c, r, "rate limit");
        return -1;
    }
    out->allowed = r->element[0]->integer == 1;
    out->retry_after_us = r->element[1]->integer;
    out->remaining = r->element[2]->integer;
    return 0;
}

static int run_limit(struct cache *c, const char *key, const cache_limit *limit,
                     cache_limit_result *out, const char *order_id)
{
    memset(out, 0, sizeof *out);
    /* A prefetch serves the request it was made for: a new request starts without one. */
    cache__prefetch_clear(c);
    int64_t t_us, burst;
    if (!limit_args(limit, &t_us, &burst)) {
        cache__bad_reply(c, NULL, "rate limit: the limit is not a positive rate");
        return -1;
    }
    char kbuf[CACHE__KEY_MAX];
    int kl = snprintf(kbuf, sizeof kbuf, "%srl:%s", c->prefix, key);
    if (kl < 0 || (size_t)kl >= sizeof kbuf) {
        cache__bad_reply(c, NULL, "rate limit: key too long");
        return -1;
    }

    cache__cmd cmds[2];
    int n = 1;
    cache__cmd_script(&cmds[0], CACHE__LUA_GCRA, 1);
    cache__arg(&cmds[0], kbuf, (size_t)kl);
    cache__arg_int(&cmds[0], t_us);
    cache__arg_int(&cmds[0], burst);
    bool prefetch = order_id && strlen(order_id) <= ORDER_ID_LEN;
    if (prefetch)
        cache__entry_cmd(c, &cmds[n++], order_id, CACHE__READ_PLAIN);

    redisReply *rep[2] = {NULL, NULL};
    if (cache__run(c, cmds, n, rep, "rate limit") != 0)
        return -1;
    int rc = parse_result(c, rep[0], out);
    freeReplyObject(rep[0]);
    if (prefetch) {
        struct cache__prefetch *p = &c->pf;
        if (cache__entry_parse(c, rep[1], &p->e) == 0) {
            p->valid = true;
            p->at_us = clock_mono_us();
            snprintf(p->id, sizeof p->id, "%s", order_id);
        }
    }
    return rc;
}

int cache_rate_limit(struct cache *c, const char *key, const cache_limit *limit,
                     cache_limit_result *out)
{
    return run_limit(c, key, limit, out, NULL);
}

int cache_rate_limit_prefetch(struct cache *c, const char *key, const cache_limit *limit,
                              cache_limit_result *out, const char *order_id)
{
    return run_limit(c, key, limit, out, order_id);
}
