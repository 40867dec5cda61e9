/* test_consumer.c — the consumer of inventory replies against a real RabbitMQ: valid
 * stock.reserved / stock.rejected replies reach the reply function and are acknowledged;
 * a transient failure is redelivered after a back-off; duplicates and replies that can never
 * apply are acknowledged; malformed replies of every kind are dead-lettered while the
 * consumer keeps going; a quorum reply queue; a broker that cannot be reached. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "amqptest.h"
#include "common/clock.h"
#include "common/clock.h"

/* ---- a fake reply function ---- */

#define FAKE_MAX 64
struct call {
    char id[256];
    bool rejected;
    char order_id[80];
    bool has_reason;
    char reason[600];
    int rc;
};

static struct fake {
    pthread_mutex_t mu;
    struct call calls[FAKE_MAX];
    int n;
    char fail_once[64]; /* this id gets ORDER_EUNAVAILABLE the first time */
    bool failed;
    char code_id[64]; /* this id gets `code` */
    int code;
} F = {.mu = PTHREAD_MUTEX_INITIALIZER};

static int fake_fn(void *arg, const order_stock_reply *r)
{
    assert_ptr_equal(arg, &F);
    pthread_mutex_lock(&F.mu);
    int rc = ORDER_OK;
    if (F.fail_once[0] && strcmp(r->id, F.fail_once) == 0 && !F.failed) {
        F.failed = true;
        rc = ORDER_EUNAVAILABLE;
    } else if (F.code_id[0] && strcmp(r->id, F.code_id) == 0) {
        rc = F.code;
    }
    if (F.n < FAKE_MAX) {
        struct call *c = &F.calls[F.n++];
        snprintf(c->id, sizeof c->id, "%s", r->id);
        c->rejected = r->rejected;
        snprintf(c->order_id, sizeof c->order_id, "%s", r->order_id);
        c->has_reason = r->reason != NULL;
        snprintf(c->reason, sizeof c->reason, "%s", r->reason ? r->reason : "");
        c->rc = rc;
    }
    pthread_mutex_unlock(&F.mu);
    return rc;
}

static int calls(void)
{
    pthread_mutex_lock(&F.mu);
    int n = F.n;
    pthread_mutex_unlock(&F.mu);
    return n;
}

static bool calls_at_least(void *arg)
{
    return calls() >= *(int *)arg;
}

/* ---- per test ---- */

static char EX[128], RQ[128], DLX[128], DLQ[128];
static amqp_settings SET;
static amqp_connection_state_t RAW;

static int setup(void **state)
{
    pthread_mutex_lock(&F.mu);
    F.n = 0;
    F.fail_once[0] = F.code_id[0] = '\0';
    F.failed = false;
    pthread_mutex_unlock(&F.mu);
    amqpt_name(EX, sizeof EX, "events");
    amqpt_name(RQ, sizeof RQ, "replies");
    amqpt_name(DLX, sizeof DLX, "dlx");
    amqpt_name(DLQ, sizeof DLQ, "dlq");
    amqpt_settings(&SET);
    SET.exchange = EX;
    SET.reply_queue = RQ;
    SET.dead_letter_exchange = DLX;
    SET.dead_letter_queue = DLQ;
    RAW = amqpt_connect();
    return 0;
}

static int teardown(void **state)
{
    amqpt_delete_queue(RAW, RQ);
    amqpt_delete_queue(RAW, DLQ);
    amqpt_delete_exchange(RAW, DLX);
    amqpt_delete_exchange(RAW, EX);
    amqpt_close(RAW);
    RAW = NULL;
    return 0;
}

static amqp_consumer_stats stats_of(amqp_consumer *k)
{
    amqp_consumer_stats st;
    amqp_consumer_stats_get(k, &st);
    return st;
}

static bool is_connected(void *arg)
{
    return stats_of(arg).connected;
}

static amqp_consumer *start(const amqp_settings *s)
{
    amqp_consumer *k = NULL;
    char err[256] = "";
    if (amqp_consumer_start(s, fake_fn, &F, &k, err, sizeof err) != 0)
        fail_msg("amqp_consumer_start: %s", err);
    return k;
}

static amqp_consumer *start_connected(const amqp_settings *s)
{
    amqp_consumer *k = start(s);
    assert_true(amqpt_wait(is_connected, k, 10 * 1000000));
    return k;
}

static const char *ORDER1 = "3f1c2a9e-8b7d-4c65-9e21-5a0b6d4f7c10";

static void reply(const char *key, const char *message_id, const char *event_id, const char *type,
                  const char *reason)
{
    char body[512];
    if (reason)
        snprintf(body, sizeof body,
                 "{\"event_id\":\"%s\",\"type\":\"%s\",\"order_id\":\"%s\",\"reason\":\"%s\"}",
                 event_id, type, ORDER1, reason);
    else
        snprintf(body, sizeof body, "{\"event_id\":\"%s\",\"type\":\"%s\",\"order_id\":\"%s\"}",
                 event_id, type, ORDER1);
    amqpt_publish(RAW, EX, key, message_id, body);
}

struct queue_wait {
    const char *q;
    int64_t want;
};

static bool queue_has(void *arg)
{
    struct queue_wait *w = arg;
    return amqpt_count(RAW, w->q) == w->want;
}

/* ---- the tests ---- */

static void test_valid_replies_are_applied_and_acked(void **state)
{
    amqp_consumer *k = start_connected(&SET);
    reply("stock.reserved", "r-1", "r-1", "stock.reserved", NULL);
    reply("stock.rejected", NULL, "r-2", "stock.rejected", "sku-4 out of stock");
    int want = 2;
    assert_true(amqpt_wait(calls_at_least, &want, 5 * 1000000));
    usleep(100 * 1000);    /* let the acks go out */
    amqp_consumer_stop(k); /* unacknowledged deliveries would go back to the queue */

    assert_int_equal(calls(), 2);
    struct call *a = &F.calls[0], *b = &F.calls[1];
    assert_string_equal(a->id, "r-1");
    assert_false(a->rejected);
    assert_string_equal(a->order_id, ORDER1);
    assert_false(a->has_reason);
    assert_string_equal(b->id, "r-2"); /* no message_id: the event_id */
    assert_true(b->rejected);
    assert_true(b->has_reason);
    assert_string_equal(b->reason, "sku-4 out of stock");
    assert_int_equal(amqpt_count(RAW, RQ), 0);
    assert_int_equal(amqpt_count(RAW, DLQ), 0);
}

static void test_transient_failure_is_redelivered(void **state)
{
    snprintf(F.fail_once, sizeof F.fail_once, "t-1");
    amqp_consumer *k = start_connected(&SET);
    reply("stock.reserved", "t-1", "t-1", "stock.reserved", NULL);
    int want = 2;
    assert_true(amqpt_wait(calls_at_least, &want, 10 * 1000000));
    usleep(100 * 1000);
    amqp_consumer_stats st = stats_of(k);
    assert_int_equal(st.requeued, 1);
    assert_int_equal(st.applied, 1);
    amqp_consumer_stop(k);
    assert_int_equal(calls(), 2);
    assert_string_equal(F.calls[0].id, "t-1");
    assert_int_equal(F.calls[0].rc, ORDER_EUNAVAILABLE);
    assert_string_equal(F.calls[1].id, "t-1");
    assert_int_equal(F.calls[1].rc, ORDER_OK);
    assert_int_equal(amqpt_count(RAW, RQ), 0);
    assert_int_equal(amqpt_count(RAW, DLQ), 0);
}

/* A reply that loses its race every time (or always runs out of time) is dead-lettered
 * after reply_max_attempts, and the replies around it are applied meanwhile. */
static void test_a_reply_failing_every_time_is_dead_lettered(void **state)
{
    amqp_settings s = SET;
    s.reply_max_attempts = 3;
    pthread_mutex_lock(&F.mu);
    snprintf(F.code_id, sizeof F.code_id, "p-1");
    F.code = ORDER_EABORTED;
    pthread_mutex_unlock(&F.mu);
    amqp_consumer *k = start_connected(&s);
    reply("stock.reserved", "p-1", "p-1", "stock.reserved", NULL);
    reply("stock.reserved", "ok-1", "ok-1", "stock.reserved", NULL);
    struct queue_wait w = {DLQ, 1};
    assert_true(amqpt_wait(queue_has, &w, 15 * 1000000));
    usleep(100 * 1000);
    amqp_consumer_stats st = stats_of(k);
    amqp_consumer_stop(k);
    assert_int_equal(st.dead_lettered, 1);
    assert_int_equal(st.requeued, 2);
    assert_int_equal(st.applied, 1);
    int poison = 0, ok = 0;
    pthread_mutex_lock(&F.mu);
    for (int i = 0; i < F.n; i++) {
        poison += strcmp(F.calls[i].id, "p-1") == 0;
        ok += strcmp(F.calls[i].id, "ok-1") == 0;
    }
    pthread_mutex_unlock(&F.mu);
    assert_int_equal(poison, 3);
    assert_int_equal(ok, 1);
    assert_int_equal(amqpt_count(RAW, RQ), 0);
}

/* The database being down is not the reply's fault: retried past reply_max_attempts. */
static void test_unavailable_is_retried_past_the_limit(void **state)
{
    amqp_settings s = SET;
    s.reply_max_attempts = 2;
    s.backoff_max_us = 300 * 1000;
    pthread_mutex_lock(&F.mu);
    snprintf(F.code_id, sizeof F.code_id, "u-1");
    F.code = ORDER_EUNAVAILABLE;
    pthread_mutex_unlock(&F.mu);
    amqp_consumer *k = start_connected(&s);
    reply("stock.reserved", "u-1", "u-1", "stock.reserved", NULL);
    int want = 4;
    assert_true(amqpt_wait(calls_at_least, &want, 15 * 1000000));
    pthread_mutex_lock(&F.mu);
    F.code = ORDER_OK; /* the database is back */
    pthread_mutex_unlock(&F.mu);
    amqp_consumer_stats st;
    int64_t until = clock_mono_us() + 10 * 1000000;
    do {
        usleep(50 * 1000);
        st = stats_of(k);
    } while (st.applied == 0 && clock_mono_us() < until);
    amqp_consumer_stop(k);
    assert_int_equal(st.applied, 1);
    assert_int_equal(st.dead_lettered, 0);
    assert_true(st.requeued >= 3);
    assert_int_equal(amqpt_count(RAW, DLQ), 0);
}

static void test_duplicates_and_hopeless_replies_are_acked(void **state)
{
    amqp_consumer *k = start_connected(&SET);
    snprintf(F.code_id, sizeof F.code_id, "d-1");
    F.code = ORDER_EDUPLICATE;
    reply("stock.reserved", "d-1", "d-1", "stock.reserved", NULL);
    int want = 1;
    assert_true(amqpt_wait(calls_at_least, &want, 5 * 1000000));
    pthread_mutex_lock(&F.mu);
    snprintf(F.code_id, sizeof F.code_id, "n-1");
    F.code = ORDER_ENOTFOUND;
    pthread_mutex_unlock(&F.mu);
    reply("stock.rejected", "n-1", "n-1", "stock.rejected", "gone");
    want = 2;
    assert_true(amqpt_wait(calls_at_least, &want, 5 * 1000000));
    pthread_mutex_lock(&F.mu);
    snprintf(F.code_id, sizeof F.code_id, "i-1");
    F.code = ORDER_EINTERNAL; /* can never succeed by retrying: dead-lettered */
    pthread_mutex_unlock(&F.mu);
    reply("stock.reserved", "i-1", "i-1", "stock.reserved", NULL);
    struct queue_wait w = {DLQ, 1};
    assert_true(amqpt_wait(queue_has, &w, 5 * 1000000));
    amqp_consumer_stats st = stats_of(k);
    assert_int_equal(st.duplicates, 1);
    assert_int_equal(st.applied, 0);
    assert_int_equal(st.dead_lettered, 1);
    amqp_consumer_stop(k);
    assert_int_equal(amqpt_count(RAW, RQ), 0);
}

static void test_malformed_replies_are_dead_lettered(void **state)
{
    amqp_consumer *k = start_connected(&SET);
    static char big[70 * 1024];
    memset(big, 'x', sizeof big - 1);
    big[0] = '"';
    big[sizeof big - 2] = '"';
    struct {
        const char *key, *message_id, *body;
    } bad[] = {
        {"stock.reserved", NULL, "not json"},
        {"stock.reserved", NULL, ""},
        {"stock.reserved", NULL, "[1, 2]"},
        {"stock.reserved", NULL, "{}"},
        {"stock.reserved", NULL, "\xff\xfe{\"event_id\":\"x\"}"},
        {"stock.reserved", NULL, "{\"event_id\":5,\"type\":\"stock.reserved\",\"order_id\":\"o\"}"},
        {"stock.reserved", NULL,
         "{\"event_id\":\"\",\"type\":\"stock.reserved\",\"order_id\":\"o\"}"},
        {"stock.reserved", NULL, "{\"event_id\":\"m-1\",\"order_id\":\"o\"}"},
        {"stock.reserved", NULL,
         "{\"event_id\":\"m-2\",\"type\":\"stock.shipped\",\"order_id\":\"o\"}"},
        {"stock.reserved", NULL,
         "{\"event_id\":\"m-3\",\"type\":\"stock.rejected\",\"order_id\":\"o\"}"},
        {"stock.reserved", NULL, "{\"event_id\":\"m-4\",\"type\":\"stock.reserved\"}"},
        {"stock.reserved", NULL,
         "{\"event_id\":\"m-5\",\"type\":\"stock.reserved\",\"order_id\":7}"},
        {"stock.rejected", NULL,
         "{\"event_id\":\"m-6\",\"type\":\"stock.rejected\",\"order_id\":\"o\",\"reason\":7}"},
        {"stock.reserved", "other",
         "{\"event_id\":\"m-7\",\"type\":\"stock.reserved\",\"order_id\":\"o\"}"},
        {"stock.reserved", NULL,
         "{\"event_id\":\"m-8\",\"event_id\":\"m-9\",\"type\":\"stock.reserved\",\"order_id\":"
         "\"o\"}"},
        {"stock.reserved", NULL,
         "{\"event_id\":\"m-10\",\"type\":\"stock.reserved\","
         "\"order_id\":\"o\",\"x\":\"\\u0000\"}"},
        {"stock.reserved", NULL, big},
    };
    size_t nbad = sizeof bad / sizeof bad[0];
    for (size_t i = 0; i < nbad; i++)
        amqpt_publish(RAW, EX, bad[i].key, bad[i].message_id, bad[i].body);
    reply("stock.reserved", "ok-1", "ok-1", "stock.reserved", NULL); /* still consuming */

    int want = 1;
    assert_true(amqpt_wait(calls_at_least, &want, 10 * 1000000));
    struct queue_wait w = {DLQ, (int64_t)nbad};
    assert_true(amqpt_wait(queue_has, &w, 10 * 1000000));
    amqp_consumer_stats st = stats_of(k);
    assert_int_equal(st.dead_lettered, nbad);
    assert_int_equal(st.applied, 1);
    assert_int_equal(st.reconnects, 0);
    assert_true(st.connected);
    amqp_consumer_stop(k);
    assert_int_equal(calls(), 1); /* nothing malformed reached the reply function */
    assert_string_equal(F.calls[0].id, "ok-1");
    assert_int_equal(amqpt_count(RAW, RQ), 0);
}

static void test_quorum_reply_queue(void **state)
{
    SET.quorum_queues = true;
    amqp_consumer *k = start_connected(&SET);
    reply("stock.rejected", "q-1", "q-1", "stock.rejected", NULL);
    int want = 1;
    assert_true(amqpt_wait(calls_at_least, &want, 5 * 1000000));
    amqp_consumer_stop(k);
    assert_int_equal(amqpt_count(RAW, RQ), 0);
    /* Quorum, with its dead-letter exchange: redeclaring it otherwise is refused. */
    assert_int_equal(amqpt_queue_try(RAW, RQ, false, DLX), 406);
    assert_int_equal(amqpt_queue_try(RAW, RQ, true, NULL), 406);
    assert_int_equal(amqpt_queue_try(RAW, RQ, true, DLX), 0);
}

static void test_unreachable_broker(void **state)
{
    SET.port = amqpt_closed_port();
    amqp_consumer *k = start(&SET);
    usleep(800 * 1000);
    assert_false(stats_of(k).connected);
    int64_t t0 = clock_mono_us();
    amqp_consumer_stop(k);
    assert_true(clock_mono_us() - t0 < 2 * 1000000);
    assert_int_equal(calls(), 0);
}

static bool is_disconnected(void *arg)
{
    return !stats_of(arg).connected;
}

static void test_silent_broker_is_noticed_and_reconnected(void **state)
{
    amqpt_proxy *px = amqpt_proxy_start(SET.host, SET.port);
    SET.port = amqpt_proxy_port(px);
    SET.heartbeat_s = 1;
    SET.timeout_us = 1000000;
    amqp_consumer *k = start_connected(&SET);
    amqpt_proxy_freeze(px, true); /* no byte either way, no close */
    /* Idle, it still expects the broker's heartbeats: gone after two silent intervals. */
    int64_t t0 = clock_mono_us();
    assert_true(amqpt_wait(is_disconnected, k, 6 * 1000000));
    assert_true(clock_mono_us() - t0 >= 1500 * 1000);
    amqpt_proxy_freeze(px, false);
    assert_true(amqpt_wait(is_connected, k, 10 * 1000000));
    reply("stock.reserved", "s-1", "s-1", "stock.reserved", NULL);
    int want = 1;
    assert_true(amqpt_wait(calls_at_least, &want, 5 * 1000000));
    amqp_consumer_stats st = stats_of(k);
    assert_true(st.reconnects >= 1);
    assert_int_equal(st.applied, 1);
    amqp_consumer_stop(k);
    amqpt_proxy_stop(px);
}

int main(void)
{
    if (amqpt_setup("consumer") != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_valid_replies_are_applied_and_acked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transient_failure_is_redelivered, setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_reply_failing_every_time_is_dead_lettered, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_unavailable_is_retried_past_the_limit, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_duplicates_and_hopeless_replies_are_acked, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_malformed_replies_are_dead_lettered, setup, teardown),
        cmocka_unit_test_setup_teardown(test_quorum_reply_queue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreachable_broker, setup, teardown),
        cmocka_unit_test_setup_teardown(test_silent_broker_is_noticed_and_reconnected, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
