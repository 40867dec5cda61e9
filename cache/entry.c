/* entry.c — cached orders in Redis: the Lua scripts that read, set-if-newer and drop an
 * entry, each in one round trip, under the current epoch.
 *
 * DESIGN
 * An entry is the string "<version>:<bytes>" under "<prefix>o:<epoch>:<order id>", where
 * <epoch> is the value of "<prefix>epoch" (absent = 0). Every script reads the epoch and
 * builds the key itself, so a lookup and the epoch it ran under are one atomic step, and
 * a bump (INCR, see cache.c) moves every later read and write to fresh keys at once.
 * (The scripts touch keys they do not declare in KEYS: fine on one Redis, not on a
 * cluster, which we do not run.)
 *
 * Set-if-newer: the SET script stores only if there is no entry or the stored version is
 * older, so a slow reader's fill of an old version loses to a writer's newer one whatever
 * the order they arrive in. A fill also names the epoch its miss was seen under and is
 * refused if the epoch moved since: the read from PostgreSQL that it carries may predate
 * the write whose loss caused the bump.
 *
 * The fill lease "<prefix>lease:<epoch>:<order id>" (SET NX PX) is taken by the GET script
 * itself on a miss (READ_LEASE), so a miss costs no extra round trip to decide who reads
 * PostgreSQL.
 */
#include "cache/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* KEYS[1] epoch key; ARGV: prefix, order id, mode (0 plain, 1 take lease, 2 see lease),
 * lease ms. Returns {epoch, found, "version:bytes" or "", lease flag}. */
const char cache__lua_get[] =
    "local es = redis.call('GET', KEYS[1]) or '0'\n"
    "local tail = es .. ':' .. ARGV[2]\n"
    "local v = redis.call('GET', ARGV[1] .. 'o:' .. tail)\n"
    "if v then return {tonumber(es), 1, v, 0} end\n"
    "local flag = 0\n"
    "if ARGV[3] == '1' then\n"
    "  if redis.call('SET', ARGV[1] .. 'lease:' .. tail, '1', 'NX', 'PX', ARGV[4]) then\n"
    "    flag = 1\n"
    "  end\n"
    "elseif ARGV[3] == '2' then\n"
    "  flag = redis.call('EXISTS', ARGV[1] .. 'lease:' .. tail)\n"
    "end\n"
    "return {tonumber(es), 0, '', flag}\n";

/* KEYS[1] epoch key; ARGV: prefix, order id, version, bytes, ttl ms, expected epoch or ''.
 * Returns 1 stored, 0 refused (same or newer version there), -1 refused (epoch moved).
 * Either way an entry is there afterwards, so the key's fill lease has served its purpose
 * and is deleted: left behind, it would make the next miss (after an expiry or a drop)
 * wait for a fill that nobody is doing. */
const char cache__lua_set[] = "local es = redis.call('GET', KEYS[1]) or '0'\n"
                              "if ARGV[6] ~= '' and ARGV[6] ~= es then return -1 end\n"
                              "local tail = es .. ':' .. ARGV[2]\n"
                              "local k = ARGV[1] .. 'o:' .. tail\n"
                              "redis.call('DEL', ARGV[1] .. 'lease:' .. tail)\n"
                              "local cur = redis.call('GET', k)\n"
                              "if cur then\n"
                              "  local cv = tonumber(string.match(cur, '^(%d+):'))\n"
                              "  if cv and cv >= tonumber(ARGV[3]) then return 0 end\n"
                              "end\n"
                              "redis.call('SET', k, ARGV[3] .. ':' .. ARGV[4], 'PX', ARGV[5])\n"
                              "return 1\n";

/* KEYS[1] epoch key; ARGV: prefix, order id. Returns the number of keys deleted. */
const char cache__lua_drop[] =
    "local es = redis.call('GET', KEYS[1]) or '0'\n"
    "return redis.call('DEL', ARGV[1] .. 'o:' .. es .. ':' .. ARGV[2])\n";

void cache__entry_cmd(struct cache *c, cache__cmd *cmd, const char *order_id,
                      enum cache__read_mode mode)
{
    cache__cmd_script(cmd, CACHE__LUA_GET, 1);
    cache__arg_str(cmd, c->epoch_key);
    cache__arg_str(cmd, c->prefix);
    cache__arg_str(cmd, order_id);
    cache__arg_int(cmd, (int64_t)mode);
    cache__arg_int(cmd, CACHE__LEASE_MS);
}

int cache__entry_parse(struct cache *c, redisReply *r, cache__entry *e)
{
    memset(e, 0, sizeof *e);
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 4 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[1]->type != REDIS_REPLY_INTEGER ||
        r->element[2]->type != REDIS_REPLY_STRING || r->element[3]->type != REDIS_REPLY_INTEGER) {
        cache__bad_reply(c, r, "order read");
        if (r)
            freeReplyObject(r);
        return -1;
    }
    e->reply = r;
    e->epoch = r->element[0]->integer;
    e->found = r->element[1]->integer == 1;
    e->flag = r->element[3]->integer == 1;
    e->version = -1;
    if (!e->found)
        return 0;
    /* "<version>:<bytes>"; anything else stays found with no bytes: the caller treats it
     * as an entry that does not decode and drops it. */
    const char *s = r->element[2]->str;
    size_t len = r->element[2]->len, i = 0;
    int64_t v = 0;
    while (i < len && i < 19 && s[i] >= '0' && s[i] <= '9')
        v = v * 10 + (s[i++] - '0');
    if (i == 0 || i >= len || s[i] != ':')
        return 0;
    e->version = v;
    e->bytes = (const uint8_t *)s + i + 1;
    e->len = len - i - 1;
    return 0;
}

void cache__entry_free(cache__entry *e)
{
    if (e->reply)
        freeReplyObject(e->reply);
    memset(e, 0, sizeof *e);
}

int cache__entry_read(struct cache *c, const char *order_id, enum cache__read_mode mode,
                      cache__entry *e)
{
    cache__cmd cmd;
    redisReply *r;
    memset(e, 0, sizeof *e);
    cache__entry_cmd(c, &cmd, order_id, mode);
    if (cache__run(c, &cmd, 1, &r, "order read") != 0)
        return -1;
    return cache__entry_parse(c, r, e);
}

int cache__entry_set(struct cache *c, const char *order_id, int64_t version, const uint8_t *bytes,
                     size_t len, int64_t expected_epoch)
{
    cache__cmd cmd;
    redisReply *r;
    cache__cmd_script(&cmd, CACHE__LUA_SET, 1);
    cache__arg_str(&cmd, c->epoch_key);
    cache__arg_str(&cmd, c->prefix);
    cache__arg_str(&cmd, order_id);
    cache__arg_int(&cmd, version);
    cache__arg(&cmd, bytes, len);
    cache__arg_int(&cmd, cache__ttl_ms(c));
    if (expected_epoch >= 0)
        cache__arg_int(&cmd, expected_epoch);
    else
        cache__arg(&cmd, "", 0);
    if (cache__run(c, &cmd, 1, &r, "order set") != 0)
        return CACHE__SET_FAILED;
    int rc;
    if (r->type != REDIS_REPLY_INTEGER) {
        cache__bad_reply(c, r, "order set");
        rc = CACHE__SET_FAILED;
    } else {
        rc = r->integer == 1 ? CACHE__SET_STORED : CACHE__SET_REFUSED;
    }
    freeReplyObject(r);
    return rc;
}

int cache__entry_drop(struct cache *c, const char *order_id)
{
    cache__cmd cmd;
    redisReply *r;
    cache__cmd_script(&cmd, CACHE__LUA_DROP, 1);
    cache__arg_str(&cmd, c->epoch_key);
    cache__arg_str(&cmd, c->prefix);
    cache__arg_str(&cmd, order_id);
    if (cache__run(c, &cmd, 1, &r, "order drop") != 0)
        return -1;
    int rc = 0;
    if (r->type != REDIS_REPLY_INTEGER) {
        cache__bad_reply(c, r, "order drop");
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}

void cache__lease_release(struct cache *c, const char *order_id, int64_t epoch)
{
    char key[CACHE__KEY_MAX];
    int n = snprintf(key, sizeof key, "%slease:%lld:%s", c->prefix, (long long)epoch, order_id);
    if (n < 0 || (size_t)n >= sizeof key)
        return;
    cache__cmd cmd;
    redisReply *r;
    cache__cmd_plain(&cmd, "DEL");
    cache__arg(&cmd, key, (size_t)n);
    if (cache__run(c, &cmd, 1, &r, "lease release") != 0)
        return; /* the lease expires by itself */
    if (r->type != REDIS_REPLY_INTEGER)
        cache__bad_reply(c, r, "lease release");
    freeReplyObject(r);
}

void cache__prefetch_clear(struct cache *c)
{
    cache__entry_free(&c->pf.e);
    c->pf.valid = false;
}
