/* internal.h — what the files of cache/ share: the cache handle, the connection with its
 * pipelined command runner, and the order-entry operations. Nothing outside cache/
 * includes it (hiredis's types stay in here). */
#ifndef ORDERD_CACHE_INTERNAL_H
#define ORDERD_CACHE_INTERNAL_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache/cache.h"
#include "orders/orders.h"

/* The Lua scripts. Loaded with SCRIPT LOAD on every connect and run with EVALSHA. */
enum cache__script {
    CACHE__LUA_GET,  /* entry.c: epoch + entry (+ fill lease) in one round trip */
    CACHE__LUA_SET,  /* entry.c: set-if-newer (and, for fills, if the epoch has not moved) */
    CACHE__LUA_DROP, /* entry.c: delete the entry of the current epoch */
    CACHE__LUA_GCRA, /* ratelimit.c: one request from a GCRA budget, on Redis's clock */
    CACHE__NSCRIPTS
};
extern const char cache__lua_get[];
extern const char cache__lua_set[];
extern const char cache__lua_drop[];
extern const char cache__lua_gcra[];

#define CACHE__LEASE_MS 200 /* fill lease: longer than a PostgreSQL read, short if lost */
#define CACHE__ID_MAX   64  /* longer order ids bypass the cache (real ones are UUIDs) */
#define CACHE__KEY_MAX  512 /* prefix (<= 128) + "lease:" + epoch + ":" + id fits */

/* One command of a pipeline. A script command has argv[0] = "EVALSHA" and argv[1] = the
 * SHA, both filled in by cache__run; the caller appends from argv[2] on. */
#define CACHE__MAX_ARGS 10
typedef struct cache__cmd {
    int script; /* CACHE__LUA_* or -1 for a plain command */
    int argc;
    const char *argv[CACHE__MAX_ARGS];
    size_t len[CACHE__MAX_ARGS];
    int nnum;
    char num[6][32]; /* scratch for numbers formatted by cache__arg_int / _dbl */
} cache__cmd;

/** Starts a script command (EVALSHA sha numkeys). */
void cache__cmd_script(cache__cmd *cmd, int script, int numkeys);
/** Starts a plain command. */
void cache__cmd_plain(cache__cmd *cmd, const char *name);
/** Appends an argument (not copied: it must live until cache__run returns). */
void cache__arg(cache__cmd *cmd, const void *s, size_t len);
void cache__arg_str(cache__cmd *cmd, const char *s);
/** Appends a number, formatted into the command's own scratch. */
void cache__arg_int(cache__cmd *cmd, int64_t v);
void cache__arg_dbl(cache__cmd *cmd, double v);

/** What the GET script found. */
typedef struct cache__entry {
    int64_t epoch;        /* the epoch the lookup ran under */
    bool found;           /* an entry exists */
    int64_t version;      /* its order version */
    const uint8_t *bytes; /* its encoded order (points into reply) */
    size_t len;
    bool flag;         /* READ_LEASE: this caller took the fill lease; READ_POLL: one exists */
    redisReply *reply; /* owned */
} cache__entry;

enum cache__read_mode {
    CACHE__READ_PLAIN = 0,
    CACHE__READ_LEASE = 1, /* on a miss, try to take the fill lease */
    CACHE__READ_POLL = 2,  /* on a miss, report whether someone holds the fill lease */
};

/* Per-cache state of the decorator (store_wrap.c). It lives inside struct cache because
 * cache_store_wrap fills an order_store by value whose `self` must outlive the call:
 * one wrapper per cache; wrapping again replaces the inner store and codec. */
struct cache__wrap {
    struct cache *c;
    order_store inner;
    cache_codec codec;
};

/* An entry fetched ahead by cache_rate_limit_prefetch for the next order_get. */
struct cache__prefetch {
    bool valid;
    char id[ORDER_ID_LEN + 1];
    int64_t at_us;  /* monotonic time of the fetch */
    cache__entry e; /* what the GET script found (owns its reply) */
};

/* ---- TLS (tls.c): an in-process tunnel, hiredis 0.14 having no TLS of its own ---- */

typedef struct cache_tls_options {
    const char *ca_file;     /* PEM CA bundle the server certificate must chain to (required) */
    const char *cert_file;   /* client certificate chain (PEM) for mutual TLS; NULL = none */
    const char *key_file;    /* its private key (PEM); NULL = in cert_file */
    const char *server_name; /* SNI and the name checked; NULL or "" = the host */
    bool verify;             /* check the certificate's name (the chain is always checked) */
} cache_tls_options;

typedef struct cache__tls cache__tls;

/**
 * Connects to host:port over TCP (bounded by timeout_us), runs the TLS handshake (bounded
 * by timeout_us again) verifying the server against o->ca_file, and starts a pump thread
 * between an SSL connection and one end of a socketpair. On success returns 0 with
 * *app_fd the other end (blocking; for redisConnectFd, which then owns it) and *out the
 * tunnel; on failure -1 with a reason in why and nothing left open.
 */
int cache__tls_connect(const char *host, int port, const cache_tls_options *o, int64_t timeout_us,
                       int *app_fd, cache__tls **out, char *why, size_t cap);
/** Stops the pump (which also ends by itself when either side closes), joins it and
 *  frees. Call after redisFree of the context on *app_fd, or before: either works. NULL
 *  does nothing. */
void cache__tls_close(cache__tls *t);

struct cache {
    /* options (strings owned; the password is wiped on close and never logged) */
    char *host;
    char *password;
    bool tls;
    char *tls_ca_file, *tls_cert_file, *tls_key_file, *tls_server_name; /* NULL = none */
    char *prefix;
    char *epoch_key; /* prefix + "epoch" */
    int port;
    int database;
    int64_t timeout_us;
    int64_t backoff_min_us;
    int64_t backoff_max_us;
    int64_t ttl_us;

    /* the connection */
    redisContext *rc;        /* NULL while down */
    cache__tls *tunnel;      /* with tls: the tunnel under rc (NULL while down) */
    int64_t backoff_us;      /* current pause; 0 after a successful connect */
    int64_t next_attempt_us; /* monotonic; no connect attempt before this */
    bool was_down;           /* a failure was logged: log the recovery */
    bool dirty;              /* a write could not reach Redis: bump the epoch on reconnect */
    char sha[CACHE__NSCRIPTS][41];
    int64_t last_error_log_us; /* throttles the log of error replies */

    uint64_t rng; /* xorshift state for the TTL jitter */
    cache_stats st;
    struct cache__prefetch pf;
    struct cache__wrap wrap;
};

/* Counters have one writer (the cache's thread) and may be read by another (metrics):
 * relaxed atomic loads and stores, no read-modify-write needed. */
#define CACHE__COUNT(c, field)                                                                     \
    __atomic_store_n(&(c)->st.field, __atomic_load_n(&(c)->st.field, __ATOMIC_RELAXED) + 1,        \
                     __ATOMIC_RELAXED)

/** Ensures a connection (back-off permitting). 0 if connected, -1 if down. */
int cache__ensure(struct cache *c);
/** Records that an epoch bump is owed by this process (a cache write was lost); the next
 *  cache of the process to reach Redis pays it before anything else. */
void cache__owe_bump(void);

/**
 * Sends cmds[0..n) as one pipeline (one round trip) and reads their replies into
 * replies[0..n) (freed by the caller with freeReplyObject). A script that Redis does not
 * know (NOSCRIPT: it restarted or was flushed) is loaded again and its command re-sent,
 * once. Returns 0 when every reply is in (each may still be an error reply), -1 when
 * Redis is down or the connection broke (then no reply is kept, the connection is dropped
 * and the back-off armed). `op` names the call in logs.
 */
int cache__run(struct cache *c, cache__cmd *cmds, int n, redisReply **replies, const char *op);

/** Counts and (throttled) logs an unexpected reply; `r` may be an error reply. */
void cache__bad_reply(struct cache *c, const redisReply *r, const char *op);

/** Drops the connection and arms the back-off, logging why. */
void cache__drop(struct cache *c, const char *op, const char *why);

/** The TTL of a new entry in milliseconds, with +-10% jitter. */
int64_t cache__ttl_ms(struct cache *c);

/* ---- order entries (entry.c) ---- */

/** Builds the GET script's command for order_id (for a pipeline of the caller's). */
void cache__entry_cmd(struct cache *c, cache__cmd *cmd, const char *order_id,
                      enum cache__read_mode mode);
/** Parses a reply of that command, taking ownership of r. 0, or -1 if it is not one. */
int cache__entry_parse(struct cache *c, redisReply *r, cache__entry *e);
/** Reads an entry in one round trip. 0 with *e filled, or -1 (Redis down or erring). */
int cache__entry_read(struct cache *c, const char *order_id, enum cache__read_mode mode,
                      cache__entry *e);
/** Frees the reply behind an entry; safe on a zeroed one. */
void cache__entry_free(cache__entry *e);

/** Result of cache__entry_set. */
enum { CACHE__SET_FAILED = -1, CACHE__SET_REFUSED = 0, CACHE__SET_STORED = 1 };
/**
 * Stores (version, bytes) as the entry of order_id unless Redis holds the same or a
 * newer version. With expected_epoch >= 0 (a fill after a miss seen under that epoch),
 * stores only if the epoch has not moved since. */
int cache__entry_set(struct cache *c, const char *order_id, int64_t version, const uint8_t *bytes,
                     size_t len, int64_t expected_epoch);
/** Deletes the entry of order_id in the current epoch. 0 or -1. */
int cache__entry_drop(struct cache *c, const char *order_id);

/** Deletes the fill lease of order_id under epoch (best effort: it expires anyway). */
void cache__lease_release(struct cache *c, const char *order_id, int64_t epoch);

/** Frees the prefetched entry, if any. */
void cache__prefetch_clear(struct cache *c);

#endif
