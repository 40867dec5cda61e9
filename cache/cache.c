/* cache.c — the Redis connection of a cache: options, lazy reconnection with back-off, the
 * connect handshake, and the pipelined command runner every other file goes through.
 *
 * DESIGN
 * hiredis is used synchronously, in blocking mode, with the socket's send and receive
 * timeouts (SO_SNDTIMEO / SO_RCVTIMEO via redisSetTimeout) set to the configured per-call
 * timeout, so a read from a hung Redis gives up after about that long (the kernel rounds
 * it up to its tick). A connect attempt is one redisConnectWithTimeout plus one pipelined
 * round trip (AUTH, SELECT, the epoch bump if owed, SCRIPT LOAD of every script), so it
 * too costs at most a few timeouts. Any I/O or protocol error drops the connection and
 * arms the back-off: no new attempt before backoff_us has passed, doubling from
 * backoff_min_us to backoff_max_us while attempts keep failing, reset by a success. In
 * between, every call answers "down" after one clock read.
 *
 * With tls, the TCP connect is replaced by cache__tls_connect (tls.c): TCP connect and
 * TLS handshake, each bounded by the timeout, then hiredis gets one end of a socketpair
 * (redisConnectFd) whose other end a thread pumps to and from the TLS connection. The
 * socket timeouts are set on hiredis's end as usual, so calls stay bounded; dropping the
 * connection closes the tunnel too.
 *
 * hiredis writes with write(2): the process must ignore SIGPIPE (server/main.c does), or
 * a write to a Redis that just died kills it.
 */
#include "cache/internal.h"

#include <assert.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"

/* Epoch bumps owed by this process. A lost cache write on any worker leaves a possibly
 * stale entry that every worker of the process could serve, including workers whose own
 * connection never broke; so the debt is process-wide: whichever cache next reaches
 * Redis pays it (INCR epoch) before doing anything else. Generation counters rather than
 * a flag, so that a failure recorded while a bump is in flight is never lost. */
static atomic_uint_fast64_t bumps_owed;
static atomic_uint_fast64_t bumps_paid;

void cache__owe_bump(void)
{
    atomic_fetch_add(&bumps_owed, 1);
}

static bool bump_owed(uint64_t *gen)
{
    *gen = atomic_load(&bumps_owed);
    return atomic_load(&bumps_paid) < *gen;
}

static void bump_paid(uint64_t gen)
{
    uint_fast64_t cur = atomic_load(&bumps_paid);
    while (cur < gen && !atomic_compare_exchange_weak(&bumps_paid, &cur, gen))
        ;
}

#define PREFIX_MAX         128       /* key_prefix length bound (keys are built in buffers) */
#define ERROR_LOG_EVERY_US 1000000LL /* at most one "unexpected reply" line a second */

static const char *const script_text[CACHE__NSCRIPTS] = {
    [CACHE__LUA_GET] = cache__lua_get,
    [CACHE__LUA_SET] = cache__lua_set,
    [CACHE__LUA_DROP] = cache__lua_drop,
    [CACHE__LUA_GCRA] = cache__lua_gcra,
};

/* ---- commands ---- */

void cache__cmd_script(cache__cmd *cmd, int script, int numkeys)
{
    assert(script >= 0 && script < CACHE__NSCRIPTS);
    memset(cmd, 0, sizeof *cmd);
    cmd->script = script;
    cmd->argc = 2; /* EVALSHA and the SHA, filled in by cache__run */
    cache__arg_int(cmd, numkeys);
}

void cache__cmd_plain(cache__cmd *cmd, const char *name)
{
    memset(cmd, 0, sizeof *cmd);
    cmd->script = -1;
    cache__arg_str(cmd, name);
}

void cache__arg(cache__cmd *cmd, const void *s, size_t len)
{
    assert(cmd->argc < CACHE__MAX_ARGS);
    cmd->argv[cmd->argc] = s;
    cmd->len[cmd->argc] = len;
    cmd->argc++;
}

void cache__arg_str(cache__cmd *cmd, const char *s)
{
    cache__arg(cmd, s, strlen(s));
}

void cache__arg_int(cache__cmd *cmd, int64_t v)
{
    assert(cmd->nnum < (int)(sizeof cmd->num / sizeof cmd->num[0]));
    char *b = cmd->num[cmd->nnum++];
    int n = snprintf(b, sizeof cmd->num[0], "%lld", (long long)v);
    cache__arg(cmd, b, (size_t)n);
}

void cache__arg_dbl(cache__cmd *cmd, double v)
{
    assert(cmd->nnum < (int)(sizeof cmd->num / sizeof cmd->num[0]));
    char *b = cmd->num[cmd->nnum++];
    int n = snprintf(b, sizeof cmd->num[0], "%.17g", v);
    cache__arg(cmd, b, (size_t)n);
}

/* Sends cmds as one pipeline on rc and reads the n replies. -1 on an I/O or protocol error
 * (rc->err says which; replies already read are freed). */
static int pipeline(redisContext *rc, const char *const *shas, cache__cmd *cmds, int n,
                    redisReply **replies)
{
    for (int i = 0; i < n; i++) {
        replies[i] = NULL;
        if (cmds[i].script >= 0) {
            cmds[i].argv[0] = "EVALSHA";
            cmds[i].len[0] = 7;
            cmds[i].argv[1] = shas[cmds[i].script];
            cmds[i].len[1] = strlen(shas[cmds[i].script]);
        }
        if (redisAppendCommandArgv(rc, cmds[i].argc, cmds[i].argv, cmds[i].len) != REDIS_OK)
            return -1; /* out of memory: rc->err is set */
    }
    for (int i = 0; i < n; i++) {
        void *r = NULL;
        if (redisGetReply(rc, &r) != REDIS_OK || !r) {
            for (int j = 0; j < i; j++) {
                freeReplyObject(replies[j]);
                replies[j] = NULL;
            }
            return -1;
        }
        replies[i] = r;
    }
    return 0;
}

static bool is_noscript(const redisReply *r)
{
    return r && r->type == REDIS_REPLY_ERROR && r->str && strncmp(r->str, "NOSCRIPT", 8) == 0;
}

/* ---- the connection ---- */

static struct timeval to_tv(int64_t us)
{
    struct timeval tv = {.tv_sec = (time_t)(us / 1000000), .tv_usec = (suseconds_t)(us % 1000000)};
    return tv;
}

static void arm_backoff(struct cache *c)
{
    c->backoff_us = c->backoff_us ? c->backoff_us * 2 : c->backoff_min_us;
    if (c->backoff_us > c->backoff_max_us)
        c->backoff_us = c->backoff_max_us;
    c->next_attempt_us = clock_mono_us() + c->backoff_us;
}

void cache__drop(struct cache *c, const char *op, const char *why)
{
    char msg[256];
    snprintf(msg, sizeof msg, "%s", why ? why : "unknown error");
    if (c->rc) {
        redisFree(c->rc);
        c->rc = NULL;
    }
    cache__tls_close(c->tunnel);
    c->tunnel = NULL;
    CACHE__COUNT(c, errors);
    arm_backoff(c);
    c->was_down = true;
    log_kv(LOG_WARN, "redis connection dropped", LOG_F_STR, "op", op, LOG_F_STR, "error", msg,
           LOG_F_STR, "host", c->host, LOG_F_INT, "port", (int64_t)c->port, LOG_F_INT,
           "retry_in_ms", (int64_t)(c->backoff_us / 1000), LOG_F_END);
}

void cache__bad_reply(struct cache *c, const redisReply *r, const char *op)
{
    CACHE__COUNT(c, errors);
    int64_t now = clock_mono_us();
    if (c->last_error_log_us && now - c->last_error_log_us < ERROR_LOG_EVERY_US)
        return;
    c->last_error_log_us = now;
    char msg[256];
    if (r && r->type == REDIS_REPLY_ERROR && r->str)
        snprintf(msg, sizeof msg, "%s", r->str);
    else if (r)
        snprintf(msg, sizeof msg, "unexpected reply type %d", r->type);
    else
        snprintf(msg, sizeof msg, "not sent: invalid request");
    log_kv(LOG_WARN, "redis call failed", LOG_F_STR, "op", op, LOG_F_STR, "error", msg, LOG_F_END);
}

/* Reply check of the handshake: writes why and returns false if r is not what the command
 * should answer. */
static bool handshake_ok(const redisReply *r, int want_type, const char *cmd, char *why, size_t cap)
{
    if (r->type == want_type)
        return true;
    if (r->type == REDIS_REPLY_ERROR)
        snprintf(why, cap, "%s: %s", cmd, r->str ? r->str : "error");
    else
        snprintf(why, cap, "%s: unexpected reply type %d", cmd, r->type);
    return false;
}

/* One connect attempt: TCP connect bounded by the timeout, then AUTH, SELECT, the epoch
 * bump (when a write was lost) and the scripts, in one round trip. */
static int connect_now(struct cache *c, const char *op)
{
    char why[256] = "";
    redisReply *rep[3 + CACHE__NSCRIPTS] = {0};
    int n = 0, bump_at = -1;
    struct timeval tv = to_tv(c->timeout_us);
    redisContext *rc = NULL;
    cache__tls *tunnel = NULL;
    if (c->tls) {
        cache_tls_options to = {.ca_file = c->tls_ca_file,
                                .cert_file = c->tls_cert_file,
                                .key_file = c->tls_key_file,
                                .server_name = c->tls_server_name,
                                .verify = true};
        int fd = -1;
        if (cache__tls_connect(c->host, c->port, &to, c->timeout_us, &fd, &tunnel, why,
                               sizeof why) != 0)
            goto fail;
        rc = redisConnectFd(fd);
        if (!rc)
            close(fd);
    } else {
        rc = redisConnectWithTimeout(c->host, c->port, tv);
    }
    if (!rc) {
        snprintf(why, sizeof why, "out of memory");
        goto fail;
    }
    if (rc->err || redisSetTimeout(rc, tv) != REDIS_OK) {
        snprintf(why, sizeof why, "%s", rc->errstr);
        goto fail;
    }

    cache__cmd cmds[3 + CACHE__NSCRIPTS];
    if (c->password) {
        cache__cmd_plain(&cmds[n], "AUTH");
        cache__arg_str(&cmds[n++], c->password);
    }
    if (c->database) {
        cache__cmd_plain(&cmds[n], "SELECT");
        cache__arg_int(&cmds[n++], c->database);
    }
    uint64_t owed_gen = 0;
    bool owed = bump_owed(&owed_gen);
    if (c->dirty || owed) {
        /* Before anything else on this connection: a write of ours was lost while Redis
         * was out of reach, so an entry older than PostgreSQL may be there. Moving the
         * epoch orphans every entry (they expire by TTL) and refuses fills in flight. */
        bump_at = n;
        cache__cmd_plain(&cmds[n], "INCR");
        cache__arg_str(&cmds[n++], c->epoch_key);
    }
    int first_script = n;
    for (int i = 0; i < CACHE__NSCRIPTS; i++) {
        cache__cmd_plain(&cmds[n], "SCRIPT");
        cache__arg_str(&cmds[n], "LOAD");
        cache__arg_str(&cmds[n++], script_text[i]);
    }
    if (pipeline(rc, NULL, cmds, n, rep) != 0) {
        snprintf(why, sizeof why, "%s", rc->errstr[0] ? rc->errstr : "connection lost");
        goto fail;
    }
    for (int i = 0; i < n; i++) {
        const char *name = cmds[i].argv[0];
        if (i == bump_at) {
            if (!handshake_ok(rep[i], REDIS_REPLY_INTEGER, name, why, sizeof why))
                goto fail;
            continue;
        }
        if (i < first_script) {
            if (!handshake_ok(rep[i], REDIS_REPLY_STATUS, name, why, sizeof why))
                goto fail;
            continue;
        }
        if (!handshake_ok(rep[i], REDIS_REPLY_STRING, "SCRIPT LOAD", why, sizeof why))
            goto fail;
        if (rep[i]->len != 40) {
            snprintf(why, sizeof why, "SCRIPT LOAD: not a SHA1");
            goto fail;
        }
        memcpy(c->sha[i - first_script], rep[i]->str, 40);
        c->sha[i - first_script][40] = '\0';
    }
    if (bump_at >= 0) {
        c->dirty = false;
        bump_paid(owed_gen);
        CACHE__COUNT(c, epoch_bumps);
        log_kv(LOG_INFO, "redis cache epoch bumped after a lost write", LOG_F_INT, "epoch",
               (int64_t)rep[bump_at]->integer, LOG_F_END);
    }
    for (int i = 0; i < n; i++)
        freeReplyObject(rep[i]);
    c->rc = rc;
    c->tunnel = tunnel;
    c->backoff_us = 0;
    c->next_attempt_us = 0;
    if (c->was_down)
        log_kv(LOG_INFO, "redis reconnected", LOG_F_STR, "host", c->host, LOG_F_INT, "port",
               (int64_t)c->port, LOG_F_END);
    c->was_down = false;
    return 0;

fail:
    for (int i = 0; i < n; i++)
        if (rep[i])
            freeReplyObject(rep[i]);
    if (rc)
        redisFree(rc);
    cache__tls_close(tunnel);
    CACHE__COUNT(c, errors);
    arm_backoff(c);
    c->was_down = true;
    log_kv(LOG_WARN, "redis connect failed", LOG_F_STR, "op", op, LOG_F_STR, "error", why,
           LOG_F_STR, "host", c->host, LOG_F_INT, "port", (int64_t)c->port, LOG_F_INT,
           "retry_in_ms", (int64_t)(c->backoff_us / 1000), LOG_F_END);
    return -1;
}

/* Pays an epoch bump owed by another worker of this process on a live connection. */
static int pay_bump(struct cache *c, uint64_t gen)
{
    cache__cmd cmd;
    redisReply *rep = NULL;
    cache__cmd_plain(&cmd, "INCR");
    cache__arg_str(&cmd, c->epoch_key);
    if (pipeline(c->rc, NULL, &cmd, 1, &rep) != 0 || rep->type != REDIS_REPLY_INTEGER) {
        if (rep)
            freeReplyObject(rep);
        cache__drop(c, "epoch bump", c->rc->errstr[0] ? c->rc->errstr : "bad reply");
        return -1;
    }
    bump_paid(gen);
    CACHE__COUNT(c, epoch_bumps);
    log_kv(LOG_INFO, "redis cache epoch bumped after a lost write", LOG_F_INT, "epoch",
           (int64_t)rep->integer, LOG_F_END);
    freeReplyObject(rep);
    return 0;
}

int cache__ensure(struct cache *c)
{
    uint64_t gen;
    if (c->rc && bump_owed(&gen))
        return pay_bump(c, gen);
    if (c->rc)
        return 0;
    if (clock_mono_us() < c->next_attempt_us)
        return -1;
    return connect_now(c, "reconnect");
}

/* Loads every script again (after NOSCRIPT). -1 with the connection dropped on failure. */
static int reload_scripts(struct cache *c, const char *op)
{
    cache__cmd cmds[CACHE__NSCRIPTS];
    redisReply *rep[CACHE__NSCRIPTS];
    for (int i = 0; i < CACHE__NSCRIPTS; i++) {
        cache__cmd_plain(&cmds[i], "SCRIPT");
        cache__arg_str(&cmds[i], "LOAD");
        cache__arg_str(&cmds[i], script_text[i]);
    }
    if (pipeline(c->rc, NULL, cmds, CACHE__NSCRIPTS, rep) != 0) {
        cache__drop(c, op, c->rc->errstr);
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < CACHE__NSCRIPTS; i++) {
        if (rep[i]->type == REDIS_REPLY_STRING && rep[i]->len == 40) {
            memcpy(c->sha[i], rep[i]->str, 40);
            c->sha[i][40] = '\0';
        } else if (rc == 0) {
            cache__bad_reply(c, rep[i], "script load");
            rc = -1;
        }
        freeReplyObject(rep[i]);
    }
    if (rc != 0)
        cache__drop(c, op, "SCRIPT LOAD failed");
    else
        log_kv(LOG_INFO, "redis scripts reloaded (NOSCRIPT)", LOG_F_STR, "op", op, LOG_F_END);
    return rc;
}

int cache__run(struct cache *c, cache__cmd *cmds, int n, redisReply **replies, const char *op)
{
    const char *shas[CACHE__NSCRIPTS];
    for (int i = 0; i < CACHE__NSCRIPTS; i++)
        shas[i] = c->sha[i];
    if (cache__ensure(c) != 0) {
        for (int i = 0; i < n; i++)
            replies[i] = NULL;
        return -1;
    }
    if (pipeline(c->rc, shas, cmds, n, replies) != 0) {
        cache__drop(c, op, c->rc->errstr);
        return -1;
    }
    int again[8], nagain = 0;
    assert(n <= (int)(sizeof again / sizeof again[0]));
    for (int i = 0; i < n; i++)
        if (is_noscript(replies[i]))
            again[nagain++] = i;
    if (!nagain)
        return 0;

    /* NOSCRIPT: Redis lost its script cache (restart, SCRIPT FLUSH) while this connection
     * stayed up. Those commands did not run, so sending them again is safe. */
    for (int k = 0; k < nagain; k++) {
        freeReplyObject(replies[again[k]]);
        replies[again[k]] = NULL;
    }
    cache__cmd retry[8];
    redisReply *rrep[8];
    for (int k = 0; k < nagain; k++)
        retry[k] = cmds[again[k]]; /* argv may point into cmds[]'s scratch: it is alive */
    if (reload_scripts(c, op) != 0 || pipeline(c->rc, shas, retry, nagain, rrep) != 0) {
        if (c->rc)
            cache__drop(c, op, c->rc->errstr);
        for (int i = 0; i < n; i++) {
            if (replies[i])
                freeReplyObject(replies[i]);
            replies[i] = NULL;
        }
        return -1;
    }
    for (int k = 0; k < nagain; k++)
        replies[again[k]] = rrep[k];
    return 0;
}

int64_t cache__ttl_ms(struct cache *c)
{
    /* xorshift64*: the jitter only needs to spread expiries, not to be unpredictable. */
    c->rng ^= c->rng >> 12;
    c->rng ^= c->rng << 25;
    c->rng ^= c->rng >> 27;
    uint64_t r = c->rng * 2685821657736338717ULL;
    int64_t permille = 900 + (int64_t)(r % 201); /* 90% .. 110% */
    int64_t ms = c->ttl_us / 1000 * permille / 1000;
    return ms > 0 ? ms : 1;
}

/* ---- the public part ---- */

static bool options_ok(const cache_options *o, char *err, size_t errlen)
{
    const char *why = NULL;
    if (!o)
        why = "no options";
    else if (!o->host || !*o->host)
        why = "host is required";
    else if (o->port < 1 || o->port > 65535)
        why = "port must be in 1..65535";
    else if (o->database < 0)
        why = "database must be >= 0";
    else if (o->timeout_us <= 0)
        why = "timeout must be > 0";
    else if (o->backoff_min_us <= 0 || o->backoff_max_us < o->backoff_min_us)
        why = "back-off must be > 0 with max >= min";
    else if (!o->key_prefix || !*o->key_prefix)
        why = "key prefix must not be empty";
    else if (strlen(o->key_prefix) > PREFIX_MAX)
        why = "key prefix too long";
    else if (o->order_ttl_us < 1000)
        why = "order TTL must be >= 1 ms";
    else if (o->tls && (!o->tls_ca_file || !*o->tls_ca_file))
        why = "tls needs a CA file (the server is always verified)";
    if (why) {
        snprintf(err, errlen, "cache: %s", why);
        return false;
    }
    return true;
}

/* Copies an optional string: NULL and "" stay NULL. False if out of memory. */
static bool dup_opt(char **dst, const char *src)
{
    *dst = NULL;
    if (!src || !*src)
        return true;
    *dst = strdup(src);
    return *dst != NULL;
}

struct cache *cache_open(const cache_options *opt, char *err, size_t errlen)
{
    if (!options_ok(opt, err, errlen))
        return NULL;
    struct cache *c = calloc(1, sizeof *c);
    if (!c)
        goto oom;
    c->host = strdup(opt->host);
    c->prefix = strdup(opt->key_prefix);
    c->epoch_key = malloc(strlen(opt->key_prefix) + sizeof "epoch");
    if (!c->host || !c->prefix || !c->epoch_key)
        goto oom;
    sprintf(c->epoch_key, "%sepoch", opt->key_prefix);
    if (opt->password && *opt->password) {
        c->password = strdup(opt->password);
        if (!c->password)
            goto oom;
    }
    c->tls = opt->tls;
    if (opt->tls && (!dup_opt(&c->tls_ca_file, opt->tls_ca_file) ||
                     !dup_opt(&c->tls_cert_file, opt->tls_cert_file) ||
                     !dup_opt(&c->tls_key_file, opt->tls_key_file) ||
                     !dup_opt(&c->tls_server_name, opt->tls_server_name)))
        goto oom;
    c->port = opt->port;
    c->database = opt->database;
    c->timeout_us = opt->timeout_us;
    c->backoff_min_us = opt->backoff_min_us;
    c->backoff_max_us = opt->backoff_max_us;
    c->ttl_us = opt->order_ttl_us;
    c->rng = (uint64_t)clock_mono_us() ^ ((uint64_t)(uintptr_t)c << 16) ^ 0x9E3779B97F4A7C15ULL;
    if (!c->rng)
        c->rng = 1;
    c->wrap.c = c;
    /* Not fatal: the cache stays down and tries again after the back-off. */
    (void)connect_now(c, "open");
    return c;
oom:
    cache_close(c);
    snprintf(err, errlen, "cache: out of memory");
    return NULL;
}

void cache_close(struct cache *c)
{
    if (!c)
        return;
    cache__prefetch_clear(c);
    if (c->rc)
        redisFree(c->rc);
    cache__tls_close(c->tunnel);
    if (c->password) {
        explicit_bzero(c->password, strlen(c->password));
        free(c->password);
    }
    free(c->host);
    free(c->tls_ca_file);
    free(c->tls_cert_file);
    free(c->tls_key_file);
    free(c->tls_server_name);
    free(c->prefix);
    free(c->epoch_key);
    free(c);
}

bool cache_up(struct cache *c)
{
    return cache__ensure(c) == 0;
}

void cache_stats_get(const struct cache *c, cache_stats *out)
{
    /* May run on another thread than the cache's (the metrics endpoint). */
    out->hits = __atomic_load_n(&c->st.hits, __ATOMIC_RELAXED);
    out->misses = __atomic_load_n(&c->st.misses, __ATOMIC_RELAXED);
    out->fills = __atomic_load_n(&c->st.fills, __ATOMIC_RELAXED);
    out->fill_refused_older = __atomic_load_n(&c->st.fill_refused_older, __ATOMIC_RELAXED);
    out->invalidations = __atomic_load_n(&c->st.invalidations, __ATOMIC_RELAXED);
    out->errors = __atomic_load_n(&c->st.errors, __ATOMIC_RELAXED);
    out->epoch_bumps = __atomic_load_n(&c->st.epoch_bumps, __ATOMIC_RELAXED);
    out->lease_waits = __atomic_load_n(&c->st.lease_waits, __ATOMIC_RELAXED);
}
