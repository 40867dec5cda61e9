/* test_orders.c — the read-through order cache against a real Redis: miss, fill and hit;
 * writes replace the entry; the stale-set race (a slow reader's old version never wins);
 * fills refused after an epoch bump; undecodable entries; the ownership check on cached
 * reads; TTL jitter; a stampede on one expired hot key; bad options. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/clock.h"
#include "redistest.h"

static fake_store fs;
static int next_n = 1;

/* A fresh order id per test, so tests never see each other's entries. */
static void new_id(char id[ORDER_ID_LEN + 1])
{
    fake_id(id, next_n++);
}

static int setup(void **state)
{
    return rt_setup_with_store(&fs);
}

static int teardown(void **state)
{
    fake_destroy(&fs);
    return 0;
}

static int get(order_store *s, const char *id, order_t *out)
{
    order_error e;
    order_ctx ctx = rt_ctx(&e, 0);
    memset(out, 0, sizeof *out);
    return s->order_get(s->self, &ctx, id, out);
}

static int64_t get_version(order_store *s, const char *id)
{
    order_t o;
    int rc = get(s, id, &o);
    assert_int_equal(rc, ORDER_OK);
    assert_string_equal(o.id, id);
    assert_int_equal(o.nitems, 2);
    assert_string_equal(o.items[1].product_id, "p-1");
    int64_t v = o.version;
    order_clear(&o);
    return v;
}

static long long entry_exists(const char *id, long long epoch)
{
    return rt_int("EXISTS t:o:%lld:%s", epoch, id);
}

static void test_bad_options(void **state)
{
    cache_options good = rt_options();
    struct {
        const char *what;
        cache_options o;
    } bad[8];
    for (int i = 0; i < 8; i++)
        bad[i].o = good;
    bad[0].what = "no host", bad[0].o.host = NULL;
    bad[1].what = "port 0", bad[1].o.port = 0;
    bad[2].what = "port 65536", bad[2].o.port = 65536;
    bad[3].what = "timeout 0", bad[3].o.timeout_us = 0;
    bad[4].what = "empty prefix", bad[4].o.key_prefix = "";
    bad[5].what = "no prefix", bad[5].o.key_prefix = NULL;
    bad[6].what = "negative timeout", bad[6].o.timeout_us = -5;
    bad[7].what = "back-off max < min", bad[7].o.backoff_max_us = 1;
    for (int i = 0; i < 8; i++) {
        char err[128] = "";
        struct cache *c = cache_open(&bad[i].o, err, sizeof err);
        if (c)
            fail_msg("cache_open accepted %s", bad[i].what);
        assert_true(err[0] != '\0');
    }
    char err[128] = "";
    assert_null(cache_open(NULL, err, sizeof err));
    cache_close(NULL); /* does nothing */

    struct cache *c = cache_open(&good, err, sizeof err);
    assert_non_null(c);
    assert_true(cache_up(c));
    cache_close(c);
}

static void test_miss_fill_hit(void **state)
{
    char id[ORDER_ID_LEN + 1];
    new_id(id);
    fake_put(&fs, id, "alice", 1);
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);

    assert_int_equal(get_version(&s, id), 1);
    assert_int_equal(atomic_load(&fs.gets), 1);
    assert_int_equal(entry_exists(id, 0), 1);
    for (int i = 0; i < 3; i++)
        assert_int_equal(get_version(&s, id), 1);
    assert_int_equal(atomic_load(&fs.gets), 1); /* served from Redis */

    cache_stats st;
    cache_stats_get(c, &st);
    assert_int_equal(st.misses, 1);
    assert_int_equal(st.fills, 1);
    assert_int_equal(st.hits, 3);
    assert_int_equal(st.errors, 0);

    /* An order that does not exist: NOT_FOUND from the inner store, nothing cached, and
     * the fill lease handed back so nobody waits for a fill that will not come. */
    char none[ORDER_ID_LEN + 1];
    new_id(none);
    order_t out;
    assert_int_equal(get(&s, none, &out), ORDER_ENOTFOUND);
    assert_int_equal(entry_exists(none, 0), 0);
    assert_int_equal(rt_int("EXISTS t:lease:0:%s", none), 0);
    cache_close(c);
}

static void test_writes_replace_the_entry(void **state)
{
    char id[ORDER_ID_LEN + 1];
    new_id(id);
    fake_put(&fs, id, "alice", 1);
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    assert_int_equal(get_version(&s, id), 1);
    int reads = atomic_load(&fs.gets);

    order_error e;
    order_ctx ctx = rt_ctx(&e, 0);
    order_t out = {0};
    order_transition t = rt_transition(id, ORDER_STATUS_PAID);
    assert_int_equal(s.order_transition(s.self, &ctx, &t, &out), ORDER_OK);
    assert_int_equal(out.version, 2);
    order_clear(&out);
    assert_int_equal(get_version(&s, id), 2);

    order_amendment a = {.order_id = id,
                         .provider = ORDER_PROVIDER_LOCAL,
                         .reference = "ref-1",
                         .pay_status = ORDER_PAY_SUCCEEDED};
    assert_int_equal(s.order_amend(s.self, &ctx, &a, &out), ORDER_OK);
    order_clear(&out);
    order_t g;
    assert_int_equal(get(&s, id, &g), ORDER_OK);
    assert_int_equal(g.version, 3);
    assert_string_equal(g.pay_reference, "ref-1");
    order_clear(&g);
    assert_int_equal(atomic_load(&fs.gets), reads); /* no inner read after either write */

    /* A refused transition changes nothing in the cache. */
    t.from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING);
    assert_int_equal(s.order_transition(s.self, &ctx, &t, &out), ORDER_EPRECONDITION);
    order_clear(&out);
    assert_int_equal(get_version(&s, id), 3);

    /* A new order is cached by its insert. */
    order_t placed = {0};
    snprintf(placed.customer_id, sizeof placed.customer_id, "bob");
    bool replayed;
    ctx = rt_ctx(&e, 0);
    assert_int_equal(s.order_insert(s.self, &ctx, "r1", "f1", &placed, &replayed), ORDER_OK);
    order_t g2;
    assert_int_equal(get(&s, placed.id, &g2), ORDER_OK);
    assert_int_equal(g2.version, 1);
    assert_string_equal(g2.customer_id, "bob");
    order_clear(&g2);
    assert_int_equal(atomic_load(&fs.gets), reads);
    order_clear(&placed);

    /* A write whose outcome is unknown (the database went away mid-commit) drops the
     * entry: the next read goes to the inner store. */
    fs.fail_transition = ORDER_EUNAVAILABLE;
    ctx = rt_ctx(&e, 0);
    t.from_set = 0;
    assert_int_equal(s.order_transition(s.self, &ctx, &t, &out), ORDER_EUNAVAILABLE);
    fs.fail_transition = 0;
    assert_int_equal(entry_exists(id, 0), 0);
    assert_int_equal(get_version(&s, id), 3);
    assert_int_equal(atomic_load(&fs.gets), reads + 1);

    cache_stats st;
    cache_stats_get(c, &st);
    assert_int_equal(st.invalidations, 4);
    assert_int_equal(st.errors, 0);
    cache_close(c);
}

/* The stale-set race: a reader misses, reads v1 from the store; before its fill reaches
 * Redis another replica commits v2 and stores it. The reader's fill must lose. */
struct race {
    order_store writer;
    const char *id;
};

static void writer_commits(void *arg)
{
    struct race *r = arg;
    order_error e;
    order_ctx ctx = rt_ctx(&e, 0);
    order_t out = {0};
    order_transition t = rt_transition(r->id, ORDER_STATUS_PAID);
    assert_int_equal(r->writer.order_transition(r->writer.self, &ctx, &t, &out), ORDER_OK);
    order_clear(&out);
}

static void test_stale_set_race(void **state)
{
    cache_options o = rt_options();
    struct cache *rc = rt_cache(&o), *wc = rt_cache(&o);
    order_store inner = fake_port(&fs), reader;
    struct race race;
    cache_store_wrap(rc, &inner, &test_codec, &reader);
    cache_store_wrap(wc, &inner, &test_codec, &race.writer);
    char id[ORDER_ID_LEN + 1];
    race.id = id;
    for (int i = 0; i < 200; i++) {
        new_id(id);
        fake_put(&fs, id, "alice", 1);
        fs.hook_arg = &race;
        fs.get_hook = writer_commits;
        assert_int_equal(get_version(&reader, id), 1); /* read before the commit: fine */
        int reads = atomic_load(&fs.gets);
        assert_int_equal(get_version(&reader, id), 2); /* ...but it did not cache v1 */
        assert_int_equal(atomic_load(&fs.gets), reads);
    }
    cache_stats st;
    cache_stats_get(rc, &st);
    assert_int_equal(st.fill_refused_older, 200);
    assert_int_equal(st.fills, 0);
    assert_int_equal(st.hits, 200);
    cache_close(rc);
    cache_close(wc);
}

/* A fill carries the epoch its miss was seen under: if the epoch moved meanwhile (a
 * replica that lost a write bumped it), the fill is refused, whatever its version. */
static void bump_epoch(void *arg)
{
    assert_true(rt_int("INCR t:epoch") > 0);
}

static void test_fill_refused_after_epoch_bump(void **state)
{
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    char id[ORDER_ID_LEN + 1];
    new_id(id);
    fake_put(&fs, id, "alice", 1);
    long long before = rt_int("INCR t:epoch");
    fs.get_hook = bump_epoch;
    assert_int_equal(get_version(&s, id), 1);
    assert_int_equal(entry_exists(id, before), 0);
    assert_int_equal(entry_exists(id, before + 1), 0);
    cache_stats st;
    cache_stats_get(c, &st);
    assert_int_equal(st.fill_refused_older, 1);
    /* The next miss fills under the new epoch. */
    assert_int_equal(get_version(&s, id), 1);
    assert_int_equal(entry_exists(id, before + 1), 1);
    cache_close(c);
}

static void test_undecodable_entry_is_a_miss(void **state)
{
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    long long epoch = rt_int("INCRBY t:epoch 0");
    const char *junk[] = {"7:not an order", "no version", "3:"};
    for (int i = 0; i < 3; i++) {
        char id[ORDER_ID_LEN + 1];
        new_id(id);
        fake_put(&fs, id, "alice", 3);
        redisReply *r = rt_cmd("SET t:o:%lld:%s %s", epoch, id, junk[i]);
        assert_non_null(r);
        freeReplyObject(r);
        int reads = atomic_load(&fs.gets);
        assert_int_equal(get_version(&s, id), 3);
        assert_int_equal(atomic_load(&fs.gets), reads + 1);
        assert_int_equal(get_version(&s, id), 3); /* replaced by a good entry */
        assert_int_equal(atomic_load(&fs.gets), reads + 1);
    }
    cache_close(c);
}

/* The domain checks ownership after the store's order_get, cached or not. */
static void test_ownership_on_cached_reads(void **state)
{
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    order_store inner = fake_port(&fs);
    order_service svc = {.cfg = {.tax_rate_bps = 0, .max_total_minor = 1000000}};
    cache_store_wrap(c, &inner, &test_codec, &svc.store);
    char id[ORDER_ID_LEN + 1];
    new_id(id);
    fake_put(&fs, id, "alice", 1);
    for (int i = 0; i < 2; i++) { /* a miss, then a hit */
        order_error e;
        order_ctx ctx = rt_ctx(&e, 0);
        ctx.caller.roles = ORDER_ROLE_CUSTOMER;
        snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "alice");
        order_t out = {0};
        assert_int_equal(order_get(&svc, &ctx, id, &out), ORDER_OK);
        order_clear(&out);
        snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "mallory");
        assert_int_equal(order_get(&svc, &ctx, id, &out), ORDER_ENOTFOUND);
    }
    cache_stats st;
    cache_stats_get(c, &st);
    assert_int_equal(st.hits, 3);
    cache_close(c);
}

static void test_ttl_has_jitter(void **state)
{
    cache_options o = rt_options();
    o.order_ttl_us = 100 * 1000 * MS; /* 100 s: entries live 90..110 s */
    struct cache *c = rt_cache(&o);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    long long epoch = rt_int("INCRBY t:epoch 0");
    long long lo = INT64_MAX, hi = 0;
    for (int i = 0; i < 20; i++) {
        char id[ORDER_ID_LEN + 1];
        new_id(id);
        fake_put(&fs, id, "alice", 1);
        assert_int_equal(get_version(&s, id), 1);
        long long ttl = rt_int("PTTL t:o:%lld:%s", epoch, id);
        assert_in_range(ttl, 89000, 110000);
        lo = ttl < lo ? ttl : lo;
        hi = ttl > hi ? ttl : hi;
    }
    assert_true(hi - lo > 1000); /* spread, not one expiry for all */
    cache_close(c);
}

/* ---- stampede ---- */

#define NTHREADS 16

/* The workers live through all rounds (started once, warmed up once), so that a round
 * measures the cache and not thread start-up under a sanitizer. */
static pthread_barrier_t round_start, round_done;
static atomic_bool workers_stop;

struct worker {
    struct cache *c;
    order_store s;
    const char *id;
    int rc;
    int64_t version;
};

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    for (;;) {
        pthread_barrier_wait(&round_start);
        if (atomic_load(&workers_stop))
            return NULL;
        order_t o;
        w->rc = get(&w->s, w->id, &o);
        w->version = o.version;
        order_clear(&o);
        pthread_barrier_wait(&round_done);
    }
}

/* All workers call order_get(id) at once; returns how many reached the inner store. */
static int run_round(struct worker *w)
{
    atomic_store(&fs.gets, 0);
    pthread_barrier_wait(&round_start);
    pthread_barrier_wait(&round_done);
    for (int i = 0; i < NTHREADS; i++) {
        assert_int_equal(w[i].rc, ORDER_OK);
        assert_int_equal(w[i].version, 4);
    }
    return atomic_load(&fs.gets);
}

static void test_stampede_on_expired_hot_key(void **state)
{
    cache_options o = rt_options();
    o.order_ttl_us = 150 * MS;
    order_store inner = fake_port(&fs);
    struct worker w[NTHREADS];
    pthread_t th[NTHREADS];
    char id[ORDER_ID_LEN + 1];
    pthread_barrier_init(&round_start, NULL, NTHREADS + 1);
    pthread_barrier_init(&round_done, NULL, NTHREADS + 1);
    atomic_store(&workers_stop, false);
    for (int i = 0; i < NTHREADS; i++) {
        w[i].c = rt_cache(&o); /* one connection each: sixteen workers, or replicas */
        cache_store_wrap(w[i].c, &inner, &test_codec, &w[i].s);
        w[i].id = id;
        assert_int_equal(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
    }

    /* Warm-up: a warm key, all hits. */
    new_id(id);
    fake_put(&fs, id, "alice", 4);
    assert_int_equal(get_version(&w[0].s, id), 4);
    assert_int_equal(run_round(w), 0);

    fs.get_delay_us = 5 * MS; /* a PostgreSQL read */
    for (int round = 0; round < 3; round++) {
        new_id(id);
        fake_put(&fs, id, "alice", 4);
        /* Hot, then expired. */
        assert_int_equal(get_version(&w[0].s, id), 4);
        long long epoch = rt_int("INCRBY t:epoch 0");
        int64_t until = clock_mono_us() + 2000 * MS;
        while (entry_exists(id, epoch) == 1 && clock_mono_us() < until)
            rt_sleep_us(10 * MS);
        assert_int_equal(entry_exists(id, epoch), 0);

        int reads = run_round(w);
        print_message("stampede round %d: %d of %d reads reached the store\n", round, reads,
                      NTHREADS);
        assert_in_range(reads, 1, 3);
    }
    fs.get_delay_us = 0;
    atomic_store(&workers_stop, true);
    pthread_barrier_wait(&round_start);
    uint64_t waits = 0;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(th[i], NULL);
        cache_stats st;
        cache_stats_get(w[i].c, &st);
        waits += st.lease_waits;
        cache_close(w[i].c);
    }
    pthread_barrier_destroy(&round_start);
    pthread_barrier_destroy(&round_done);
    assert_true(waits > 0);
}

int main(void)
{
    if (rt_start(NULL) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_bad_options, setup, teardown),
        cmocka_unit_test_setup_teardown(test_miss_fill_hit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_writes_replace_the_entry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stale_set_race, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fill_refused_after_epoch_bump, setup, teardown),
        cmocka_unit_test_setup_teardown(test_undecodable_entry_is_a_miss, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ownership_on_cached_reads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ttl_has_jitter, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stampede_on_expired_hot_key, setup, teardown),
    };
    int failed = cmocka_run_group_tests_name("cache_orders", tests, NULL, NULL);
    rt_stop();
    return failed;
}
