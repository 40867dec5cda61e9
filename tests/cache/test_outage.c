/* test_outage.c — Redis killed, hung (SIGSTOP) and restarted: every call returns within
 * its timeout, the decorator keeps answering from the inner store, the cache reconnects
 * after the back-off, and a write lost during the outage bumps the epoch so that the
 * entry written before it is never served again. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/clock.h"
#include "redistest.h"

#define CALL_BOUND_US (50 * MS * rt_slow()) /* what one call may cost with Redis gone */

static fake_store fs;
static int next_n = 1;

static int setup(void **state)
{
    return rt_setup_with_store(&fs);
}

static int teardown(void **state)
{
    fake_destroy(&fs);
    return 0;
}

/* A cache with a short back-off and the given timeout: 10 ms as in production where a
 * stalled Redis is the point, longer where the test's own set-up steps must not time out
 * on a loaded machine (a dead Redis answers at once: refused or closed). */
static struct cache *open_cache(int64_t timeout_us)
{
    cache_options o = rt_options();
    o.timeout_us = timeout_us;
    o.backoff_min_us = 20 * MS;
    o.backoff_max_us = 100 * MS;
    return rt_cache(&o);
}

/* order_get through s, asserting it succeeds within the bound; returns the version. */
static int64_t timed_get(order_store *s, const char *id)
{
    order_error e;
    order_ctx ctx = rt_ctx(&e, 0);
    order_t o = {0};
    int64_t t0 = clock_mono_us();
    int rc = s->order_get(s->self, &ctx, id, &o);
    int64_t took = clock_mono_us() - t0;
    assert_int_equal(rc, ORDER_OK);
    if (took > CALL_BOUND_US)
        fail_msg("order_get took %lld us", (long long)took);
    int64_t v = o.version;
    order_clear(&o);
    return v;
}

static void timed_limit_down(struct cache *c)
{
    cache_limit lim = {.rate_per_s = 100, .burst = 10};
    cache_limit_result r;
    int64_t t0 = clock_mono_us();
    assert_int_equal(cache_rate_limit(c, "outage", &lim, &r), -1);
    int64_t took = clock_mono_us() - t0;
    if (took > CALL_BOUND_US)
        fail_msg("cache_rate_limit took %lld us", (long long)took);
}

static void timed_transition(order_store *s, const char *id, int64_t want_version)
{
    order_error e;
    order_ctx ctx = rt_ctx(&e, 0);
    order_t out = {0};
    order_transition t = rt_transition(id, ORDER_STATUS_PAID);
    int64_t t0 = clock_mono_us();
    assert_int_equal(s->order_transition(s->self, &ctx, &t, &out), ORDER_OK);
    int64_t took = clock_mono_us() - t0;
    if (took > CALL_BOUND_US)
        fail_msg("order_transition took %lld us", (long long)took);
    assert_int_equal(out.version, want_version);
    order_clear(&out);
}

/* Polls cache_up until it reconnects (each poll is one clock read during the back-off). */
static void wait_up(struct cache *c)
{
    int64_t until = clock_mono_us() + 2000 * MS * rt_slow();
    while (!cache_up(c)) {
        if (clock_mono_us() > until)
            fail_msg("the cache did not reconnect");
        rt_sleep_us(5 * MS);
    }
}

static void test_killed_then_restarted(void **state)
{
    struct cache *c = open_cache(100 * MS);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    char id[ORDER_ID_LEN + 1];
    fake_id(id, next_n++);
    fake_put(&fs, id, "alice", 1);
    assert_int_equal(timed_get(&s, id), 1);
    assert_int_equal(timed_get(&s, id), 1);
    assert_int_equal(atomic_load(&fs.gets), 1);

    rt_kill();
    for (int i = 0; i < 30; i++) {
        assert_int_equal(timed_get(&s, id), 1);
        timed_limit_down(c);
        rt_sleep_us(2 * MS); /* spans a few back-off periods */
    }
    assert_int_equal(atomic_load(&fs.gets), 31); /* every read answered by the store */
    assert_false(cache_up(c));

    assert_int_equal(rt_restart(), 0);
    wait_up(c);
    assert_int_equal(timed_get(&s, id), 1); /* the restart lost the entry: a miss... */
    assert_int_equal(timed_get(&s, id), 1); /* ...and a fill: a hit */
    assert_int_equal(atomic_load(&fs.gets), 32);
    cache_stats st;
    cache_stats_get(c, &st);
    assert_true(st.errors > 0);
    assert_int_equal(st.epoch_bumps, 0); /* no write was lost */
    cache_close(c);
}

static void test_open_while_down(void **state)
{
    rt_kill();
    int64_t t0 = clock_mono_us();
    struct cache *c = open_cache(100 * MS);
    assert_true(clock_mono_us() - t0 < CALL_BOUND_US);
    assert_false(cache_up(c));
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    char id[ORDER_ID_LEN + 1];
    fake_id(id, next_n++);
    fake_put(&fs, id, "alice", 1);
    assert_int_equal(timed_get(&s, id), 1);
    assert_int_equal(rt_restart(), 0);
    wait_up(c);
    assert_int_equal(timed_get(&s, id), 1);
    assert_int_equal(timed_get(&s, id), 1);
    assert_int_equal(atomic_load(&fs.gets), 2);
    cache_close(c);
}

static void test_hung_redis_times_out(void **state)
{
    struct cache *c = open_cache(10 * MS);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    char id[ORDER_ID_LEN + 1];
    fake_id(id, next_n++);
    fake_put(&fs, id, "alice", 1);
    assert_int_equal(timed_get(&s, id), 1);

    rt_pause();
    int64_t t0 = clock_mono_us();
    for (int i = 0; i < 20; i++) {
        assert_int_equal(timed_get(&s, id), 1);
        timed_limit_down(c);
        rt_sleep_us(3 * MS);
    }
    /* Connect attempts during the stall went through (the kernel accepts for a stopped
     * process) and then timed out: the back-off kept them to a few. */
    assert_true(clock_mono_us() - t0 < 1000 * MS * rt_slow());
    assert_int_equal(atomic_load(&fs.gets), 21);
    rt_resume();
    wait_up(c);
    assert_int_equal(timed_get(&s, id), 1);
    cache_stats st;
    cache_stats_get(c, &st);
    assert_true(st.errors > 0);
    cache_close(c);
}

/* The point of the epoch: v1 is in Redis, Redis stalls, a writer commits v2 but cannot
 * tell Redis. When Redis answers again v1 is still there; the writer's cache must bump
 * the epoch before anything else, so neither it nor any other replica serves v1 again. */
static void test_lost_write_bumps_epoch(void **state)
{
    struct cache *a = open_cache(10 * MS), *b = open_cache(100 * MS);
    order_store inner = fake_port(&fs), sa, sb;
    cache_store_wrap(a, &inner, &test_codec, &sa);
    cache_store_wrap(b, &inner, &test_codec, &sb);
    char id[ORDER_ID_LEN + 1];
    fake_id(id, next_n++);
    fake_put(&fs, id, "alice", 1);
    assert_int_equal(timed_get(&sb, id), 1);
    assert_int_equal(timed_get(&sb, id), 1); /* b: a miss, then a hit */
    assert_int_equal(atomic_load(&fs.gets), 1);
    wait_up(a);
    long long epoch = rt_int("INCRBY t:epoch 0");

    rt_pause();                              /* SIGSTOP: the data survives */
    assert_int_equal(timed_get(&sa, id), 1); /* times out: a is down, in back-off */
    timed_transition(&sa, id, 2);            /* committed; the cache write fails */
    rt_resume();
    assert_int_equal(rt_int("EXISTS t:o:%lld:%s", epoch, id), 1); /* v1 survived */

    wait_up(a); /* the reconnect bumps the epoch before anything else */
    cache_stats st;
    cache_stats_get(a, &st);
    assert_int_equal(st.epoch_bumps, 1);
    assert_int_equal(rt_int("INCRBY t:epoch 0"), epoch + 1);
    /* b never saw the outage: without the bump it would serve v1 from Redis now. */
    assert_int_equal(timed_get(&sb, id), 2);
    assert_int_equal(timed_get(&sa, id), 2);

    /* Nothing owed any more: another reconnect does not bump again. */
    rt_kill();
    assert_int_equal(rt_restart(), 0);
    rt_sleep_us(1 * MS);
    (void)timed_get(&sa, id); /* finds the connection broken */
    wait_up(a);
    cache_stats_get(a, &st);
    assert_int_equal(st.epoch_bumps, 1);
    cache_close(a);
    cache_close(b);
}

/* The cache write itself times out on a stalled Redis (it was sent, so Redis may apply
 * it when it wakes): the cache is dirty all the same, and bumps on reconnect. */
static void test_write_timing_out_marks_dirty(void **state)
{
    struct cache *c = open_cache(10 * MS);
    order_store inner = fake_port(&fs), s;
    cache_store_wrap(c, &inner, &test_codec, &s);
    char id[ORDER_ID_LEN + 1];
    fake_id(id, next_n++);
    fake_put(&fs, id, "alice", 1);
    assert_int_equal(timed_get(&s, id), 1);
    long long epoch = rt_int("INCRBY t:epoch 0");
    rt_pause();
    timed_transition(&s, id, 2);
    rt_resume();
    wait_up(c);
    cache_stats st;
    cache_stats_get(c, &st);
    assert_int_equal(st.epoch_bumps, 1);
    assert_int_equal(rt_int("INCRBY t:epoch 0"), epoch + 1);
    assert_int_equal(timed_get(&s, id), 2);
    cache_close(c);
}

int main(void)
{
    if (rt_start(NULL) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_killed_then_restarted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_while_down, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hung_redis_times_out, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lost_write_bumps_epoch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_timing_out_marks_dirty, setup, teardown),
    };
    int failed = cmocka_run_group_tests_name("cache_outage", tests, NULL, NULL);
    rt_stop();
    return failed;
}
