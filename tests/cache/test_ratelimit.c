/* test_ratelimit.c — the shared GCRA budget against a real Redis: a burst, then a refusal
 * whose retry_after is honoured; two connections (two replicas) share one budget; the
 * limiter and the cache lookup in one round trip (prefetch); NOSCRIPT after SCRIPT FLUSH;
 * AUTH and SELECT. */
#include <math.h>
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
static int next_key = 1;

static int setup(void **state)
{
    return rt_setup_with_store(&fs);
}

static int teardown(void **state)
{
    fake_destroy(&fs);
    return 0;
}

static void new_key(char *buf, size_t cap)
{
    snprintf(buf, cap, "caller-%d:read", next_key++);
}

static void test_burst_then_retry_after(void **state)
{
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    char key[64];
    new_key(key, sizeof key);
    cache_limit lim = {.rate_per_s = 10, .burst = 5}; /* one every 100 ms, 5 at once */
    cache_limit_result r;
    int64_t t0 = clock_mono_us();
    for (int i = 0; i < 5; i++) {
        assert_int_equal(cache_rate_limit(c, key, &lim, &r), 0);
        assert_true(r.allowed);
        assert_int_equal(r.remaining, 4 - i);
        assert_int_equal(r.retry_after_us, 0);
    }
    assert_int_equal(cache_rate_limit(c, key, &lim, &r), 0);
    int64_t spent = clock_mono_us() - t0;
    assert_false(r.allowed);
    assert_int_equal(r.remaining, 0);
    /* 1/rate: the first request's slot frees 100 ms after it was taken, less the time the
     * six calls took (a few hundred µs, unless the machine is loaded). */
    assert_in_range(r.retry_after_us, spent < 99 * MS ? 100 * MS - spent : 1, 100 * MS);
    /* Refusals do not use up the budget: the wait stays the same, less the time gone. */
    cache_limit_result r2;
    assert_int_equal(cache_rate_limit(c, key, &lim, &r2), 0);
    assert_false(r2.allowed);
    assert_true(r2.retry_after_us <= r.retry_after_us);

    rt_sleep_us(r2.retry_after_us);
    assert_int_equal(cache_rate_limit(c, key, &lim, &r), 0);
    assert_true(r.allowed);
    assert_int_equal(r.remaining, 0);
    assert_int_equal(cache_rate_limit(c, key, &lim, &r), 0);
    assert_false(r.allowed);
    assert_in_range(r.retry_after_us, 1, 100 * MS);

    /* The budget expires with its TAT: no key left behind for ever. */
    long long pttl = rt_int("PTTL t:rl:%s", key);
    assert_in_range(pttl, 1, 1000);

    cache_stats st;
    cache_stats_get(c, &st);
    assert_int_equal(st.errors, 0);
    cache_close(c);
}

static void test_two_replicas_share_one_budget(void **state)
{
    cache_options o = rt_options();
    struct cache *c[2] = {rt_cache(&o), rt_cache(&o)};
    char key[64];
    new_key(key, sizeof key);
    cache_limit lim = {.rate_per_s = 1, .burst = 6};
    cache_limit_result r;
    for (int i = 0; i < 6; i++) {
        assert_int_equal(cache_rate_limit(c[i % 2], key, &lim, &r), 0);
        assert_true(r.allowed);
    }
    for (int i = 0; i < 2; i++) {
        assert_int_equal(cache_rate_limit(c[i], key, &lim, &r), 0);
        assert_false(r.allowed);
        assert_in_range(r.retry_after_us, 500 * MS, 1000 * MS);
    }
    /* Another key has its own budget. */
    char other[64];
    new_key(other, sizeof other);
    assert_int_equal(cache_rate_limit(c[0], other, &lim, &r), 0);
    assert_true(r.allowed);
    assert_int_equal(r.remaining, 5);
    cache_close(c[0]);
    cache_close(c[1]);
}

static void test_bad_limits(void **state)
{
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    cache_limit_result r;
    cache_limit zero = {.rate_per_s = 0, .burst = 5}, nan_rate = {.rate_per_s = NAN, .burst = 5},
                neg = {.rate_per_s = -1, .burst = 1};
    assert_int_equal(cache_rate_limit(c, "k", &zero, &r), -1);
    assert_int_equal(cache_rate_limit(c, "k", &nan_rate, &r), -1);
    assert_int_equal(cache_rate_limit(c, "k", &neg, &r), -1);
    /* A burst below one is one request at a time. */
    cache_limit one = {.rate_per_s = 1, .burst = 0};
    assert_int_equal(cache_rate_limit(c, "burst0", &one, &r), 0);
    assert_true(r.allowed);
    assert_int_equal(cache_rate_limit(c, "burst0", &one, &r), 0);
    assert_false(r.allowed);
    /* An absurd key length is refused, not truncated into someone else's budget. */
    char long_key[600];
    memset(long_key, 'k', sizeof long_key - 1);
    long_key[sizeof long_key - 1] = '\0';
    assert_int_equal(cache_rate_limit(c, long_key, &one, &r), -1);
    assert_true(cache_up(c));
    cache_close(c);
}

static int64_t get_version(order_store *s, const char *id)
{
    order_error e;
    order_ctx ctx = rt_ctx(&e, 0);
    order_t o = {0};
    assert_int_equal(s->order_get(s->self, &ctx, id, &o), ORDER_OK);
    int64_t v = o.version;
    order_clear(&o);
    return v;
}

static void test_prefetch_serves_the_next_get(void **state)
{
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    char id[ORDER_ID_LEN + 1], other[ORDER_ID_LEN + 1], key[64];
    fake_id(id, next_n++);
    fake_id(other, next_n++);
    fake_put(&fs, id, "alice", 5);
    fake_put(&fs, other, "alice", 1);
    new_key(key, sizeof key);
    cache_limit lim = {.rate_per_s = 1000, .burst = 100};
    cache_limit_result r;

    /* A prefetched miss: the get still takes the lease and fills. */
    assert_int_equal(cache_rate_limit_prefetch(c, key, &lim, &r, id), 0);
    assert_true(r.allowed);
    assert_int_equal(get_version(&s, id), 5);
    assert_int_equal(atomic_load(&fs.gets), 1);

    /* A prefetched hit: the get costs no Redis command at all. */
    long long evalsha = rt_cmdstat("evalsha");
    assert_int_equal(cache_rate_limit_prefetch(c, key, &lim, &r, id), 0);
    assert_true(r.allowed);
    assert_int_equal(get_version(&s, id), 5);
    assert_int_equal(rt_cmdstat("evalsha"), evalsha + 2); /* the limiter and the lookup */
    assert_int_equal(atomic_load(&fs.gets), 1);

    /* The prefetch is one-shot: the next get looks again. */
    assert_int_equal(get_version(&s, id), 5);
    assert_int_equal(rt_cmdstat("evalsha"), evalsha + 3);

    /* A prefetch for another id is not used (and not kept). */
    assert_int_equal(cache_rate_limit_prefetch(c, key, &lim, &r, id), 0);
    assert_int_equal(get_version(&s, other), 1);
    assert_int_equal(atomic_load(&fs.gets), 2);

    /* A prefetch belongs to its request: the next request's limiter call discards one
     * that was not used. */
    assert_int_equal(cache_rate_limit_prefetch(c, key, &lim, &r, id), 0);
    cache_limit_result r2;
    assert_int_equal(cache_rate_limit(c, key, &lim, &r2), 0); /* a new request: no prefetch */
    long long before = rt_cmdstat("evalsha");
    assert_int_equal(get_version(&s, id), 5);
    assert_int_equal(rt_cmdstat("evalsha"), before + 1);

    cache_stats st;
    cache_stats_get(c, &st);
    assert_int_equal(st.hits, 3);
    assert_int_equal(st.misses, 2);
    assert_int_equal(st.fills, 2);
    cache_close(c);
}

static void test_noscript_recovers(void **state)
{
    cache_options o = rt_options();
    struct cache *c = rt_cache(&o);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    char id[ORDER_ID_LEN + 1], key[64];
    fake_id(id, next_n++);
    fake_put(&fs, id, "alice", 2);
    new_key(key, sizeof key);
    cache_limit lim = {.rate_per_s = 100, .burst = 10};
    cache_limit_result r;
    assert_int_equal(cache_rate_limit(c, key, &lim, &r), 0);
    assert_int_equal(get_version(&s, id), 2);

    for (int round = 0; round < 2; round++) {
        redisReply *fl = rt_cmd("SCRIPT FLUSH");
        assert_non_null(fl);
        freeReplyObject(fl);
        assert_int_equal(cache_rate_limit(c, key, &lim, &r), 0);
        assert_true(r.allowed);
        fl = rt_cmd("SCRIPT FLUSH");
        freeReplyObject(fl);
        assert_int_equal(get_version(&s, id), 2); /* a hit, after reloading */
        fl = rt_cmd("SCRIPT FLUSH");
        freeReplyObject(fl);
        assert_int_equal(cache_rate_limit_prefetch(c, key, &lim, &r, id), 0);
        assert_int_equal(get_version(&s, id), 2);
    }
    assert_int_equal(atomic_load(&fs.gets), 1);
    cache_stats st;
    cache_stats_get(c, &st);
    assert_int_equal(st.errors, 0);
    assert_true(cache_up(c));
    cache_close(c);
}

static void test_auth_and_select(void **state)
{
    rt_stop();
    assert_int_equal(rt_start("s3cret-pass"), 0);
    rt_admin_db = 3;

    cache_options o = rt_options(); /* with the password */
    o.database = 3;
    struct cache *c = rt_cache(&o);
    assert_true(cache_up(c));
    cache_limit lim = {.rate_per_s = 10, .burst = 2};
    cache_limit_result r;
    assert_int_equal(cache_rate_limit(c, "db-check", &lim, &r), 0);
    assert_true(r.allowed);
    assert_int_equal(rt_int("EXISTS t:rl:db-check"), 1); /* in database 3 */
    rt_admin_db = 0;
    assert_int_equal(rt_int("EXISTS t:rl:db-check"), 0);
    cache_close(c);

    cache_options nopw = o, wrong = o;
    nopw.password = NULL;
    wrong.password = "not it";
    struct cache *c1 = rt_cache(&nopw), *c2 = rt_cache(&wrong);
    assert_false(cache_up(c1));
    assert_false(cache_up(c2));
    assert_int_equal(cache_rate_limit(c1, "db-check", &lim, &r), -1);
    assert_int_equal(cache_rate_limit(c2, "db-check", &lim, &r), -1);
    cache_close(c1);
    cache_close(c2);

    rt_stop();
    assert_int_equal(rt_start(NULL), 0);
}

int main(void)
{
    if (rt_start(NULL) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_burst_then_retry_after, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_replicas_share_one_budget, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_prefetch_serves_the_next_get, setup, teardown),
        cmocka_unit_test_setup_teardown(test_noscript_recovers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_auth_and_select, setup, teardown),
    };
    int failed = cmocka_run_group_tests_name("cache_ratelimit", tests, NULL, NULL);
    rt_stop();
    return failed;
}
