/* redistest.h — what the cache tests share: a private redis-server child (start, kill,
 * freeze, restart on the same port), an admin connection to it, an in-memory order store
 * that counts its calls, and a test codec. */
#ifndef ORDERD_TESTS_CACHE_REDISTEST_H
#define ORDERD_TESTS_CACHE_REDISTEST_H

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/types.h>
#include <stdint.h>

#include "cache/cache.h"
#include "orders/orders.h"

#define MS 1000LL

/* ---- the redis-server child ---- */

/** Starts redis-server on a free port in a fresh temporary directory (with --requirepass
 *  if password is not NULL). 0, or -1 with a message on stderr. Ignores SIGPIPE. */
int rt_start(const char *password);
/** Kills it (SIGKILL; it keeps nothing) and removes the directory. */
void rt_stop(void);
/** SIGKILL without cleanup: Redis is gone, the port free. */
void rt_kill(void);
/** Starts it again on the same port (after rt_kill). 0 or -1. */
int rt_restart(void);
/** SIGSTOP / SIGCONT: a hung Redis that keeps its data and its connections. */
void rt_pause(void);
void rt_resume(void);
int rt_port(void);
bool rt_running(void);

/** Runs a command on a fresh admin connection (AUTH with the password, SELECT db_admin).
 *  The reply is the caller's (freeReplyObject); NULL if Redis did not answer. */
redisReply *rt_cmd(const char *fmt, ...);
/** Integer reply of a command (-1 on anything else). */
long long rt_int(const char *fmt, ...);
/** The database rt_cmd selects (default 0). */
extern int rt_admin_db;
/** calls= of "cmdstat_<name>" in INFO commandstats (0 if absent). */
long long rt_cmdstat(const char *name);

/** Options for a cache on the test Redis: prefix "t:", timeout 100 ms, back-off 20..200 ms,
 *  TTL 60 s. */
cache_options rt_options(void);
/** Opens a cache with o, asserting success. */
struct cache *rt_cache(const cache_options *o);

/** Multiplier for time bounds (ORDERD_TEST_SLOW, default 1; e.g. 5 under valgrind). */
int64_t rt_slow(void);
void rt_sleep_us(int64_t us);
/** Starts a server process (argv[0] looked up in PATH) with stdout and stderr appended to
 *  logpath, killed if the test process dies. Returns its pid, or -1. */
pid_t rt_spawn_server(const char *const *argv, const char *logpath);

/* ---- the fake order store ---- */

#define FAKE_MAX_ORDERS 8

typedef struct fake_store {
    pthread_mutex_t mu;
    order_t orders[FAKE_MAX_ORDERS]; /* id "" = free slot */
    int next_id;
    atomic_int gets, inserts, transitions;
    atomic_int amends, finds, expiries, unsettled;
    int64_t get_delay_us; /* each order_get sleeps this long (a PostgreSQL read) */
    /* Called once, by the next order_get, after it read the order and before it returns:
     * what another replica does while this read is on its way back. */
    void (*get_hook)(void *arg);
    void *hook_arg;
    int fail_transition; /* if not 0: the next transitions return it, writing nothing */
} fake_store;

void fake_init(fake_store *f);
void fake_destroy(fake_store *f);
/** The per-test setup of the cache tests: the private Redis answering again (resumed, or
 *  restarted if a test killed it) and *fs reset. 0, or -1 if Redis cannot be restarted. */
int rt_setup_with_store(fake_store *fs);
/** An order_store over f. */
order_store fake_port(fake_store *f);
/** Adds (or replaces) an order with this id and version, status PENDING, two items. */
void fake_put(fake_store *f, const char *id, const char *customer, int64_t version);
/** A canonical UUID made from n. */
void fake_id(char out[ORDER_ID_LEN + 1], int n);

/** The test codec: a magic, the order's fixed part and its items. */
extern const cache_codec test_codec;

/** A context with no deadline (or one deadline_us from now if > 0). */
order_ctx rt_ctx(order_error *e, int64_t deadline_us);

/** A transition to `to` from any status. */
order_transition rt_transition(const char *id, order_status to);

#endif
