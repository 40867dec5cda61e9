/* test_sweeps.c — the background work of the domain: order_expire_due (only PENDING orders
 * older than the TTL, their payments voided, a provider failure left for later) and
 * order_settle_due (voids or refunds what a failure left unsettled, once, and records the
 * refund on the order). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "unit/fakes.h"

#define MINUTE_US (60LL * 1000000)
#define HOUR_US   (60 * MINUTE_US)

/* ---- fixture and helpers ---- */

static int notices;

static void on_notice(const char *what, const order_t *o, const order_error *e)
{
    (void)what;
    (void)o;
    (void)e;
    notices++;
}

static int64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int setup(void **state)
{
    fake_env *env = fake_env_create();
    fake_store_put_product(env->store, "apple", "Apple", 1000, "EUR", true);
    env->svc.notice = on_notice;
    notices = 0;
    /* The store's clock starts two hours ago: what is placed now is "old". */
    env->store->now_us = wall_us() - 2 * HOUR_US;
    *state = env;
    return 0;
}

static int teardown(void **state)
{
    fake_env_destroy(*state);
    return 0;
}

static const order_t *stored(fake_env *env, const char *id)
{
    const order_t *o = fake_store_order(env->store, id);
    assert_non_null(o);
    return o;
}

static void place(fake_env *env, char *id_out)
{
    static int seq;
    char rid[32];
    snprintf(rid, sizeof rid, "sw-%d", ++seq);
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = {rid, "", &line, 1, ORDER_PROVIDER_LOCAL, NULL, NULL};
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    snprintf(id_out, ORDER_ID_LEN + 1, "%s", o.id);
    order_clear(&o);
}

static void pay(fake_env *env, const char *id)
{
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL,
                                           stored(env, id)->pay_reference, &o),
                     ORDER_OK);
    order_clear(&o);
}

static int cancel(fake_env *env, const char *id)
{
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    int rc = order_cancel(&env->svc, &env->ctx, id, "", &o);
    order_clear(&o);
    return rc;
}

static int expire(fake_env *env, int64_t ttl_us, size_t max, size_t *expired)
{
    fake_env_as(env, "sweeper", ORDER_ROLE_SERVICE);
    return order_expire_due(&env->svc, &env->ctx, ttl_us, max, expired);
}

static int settle(fake_env *env, int64_t min_age_us, size_t *settled)
{
    fake_env_as(env, "sweeper", ORDER_ROLE_SERVICE);
    return order_settle_due(&env->svc, &env->ctx, min_age_us, 100, settled);
}

/* ---- expire_due ---- */

static void test_expire_only_old_pending_orders(void **state)
{
    fake_env *env = *state;
    char old_pending[ORDER_ID_LEN + 1], old_paid[ORDER_ID_LEN + 1], old_cancelled[ORDER_ID_LEN + 1],
        fresh[ORDER_ID_LEN + 1];
    place(env, old_pending);
    place(env, old_paid);
    pay(env, old_paid);
    place(env, old_cancelled);
    assert_int_equal(cancel(env, old_cancelled), ORDER_OK);
    env->store->now_us = wall_us() - 10 * MINUTE_US;
    place(env, fresh);
    int64_t paid_v = stored(env, old_paid)->version;
    int64_t cancelled_v = stored(env, old_cancelled)->version;
    int64_t fresh_v = stored(env, fresh)->version;

    size_t expired = 99;
    assert_int_equal(expire(env, HOUR_US, 10, &expired), ORDER_OK);
    assert_int_equal(expired, 1);

    const order_t *s = stored(env, old_pending);
    assert_int_equal(s->status, ORDER_STATUS_EXPIRED);
    assert_string_equal(s->cancel_reason, "expired: unpaid for 3600 s");
    assert_int_equal(s->pay_status, ORDER_PAY_VOIDED);
    assert_int_equal(fake_payments_find(env->local, old_pending)->status, ORDER_PAY_VOIDED);
    const fake_history *h = fake_store_history_last(env->store, old_pending);
    assert_int_equal(h->from, ORDER_STATUS_PENDING);
    assert_int_equal(h->to, ORDER_STATUS_EXPIRED);
    assert_string_equal(h->actor, "sweeper");
    assert_string_equal(h->reason, "expired: unpaid for 3600 s");

    /* Paid, cancelled and young orders are left alone. */
    assert_int_equal(stored(env, old_paid)->status, ORDER_STATUS_PAID);
    assert_int_equal(stored(env, old_paid)->version, paid_v);
    assert_int_equal(stored(env, old_cancelled)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, old_cancelled)->version, cancelled_v);
    assert_int_equal(stored(env, fresh)->status, ORDER_STATUS_PENDING);
    assert_int_equal(stored(env, fresh)->version, fresh_v);
    assert_int_equal(env->local->voided, 2); /* the cancel's and the expiry's */
    assert_int_equal(env->local->refunded, 0);

    /* Nothing more to do. */
    assert_int_equal(expire(env, HOUR_US, 10, &expired), ORDER_OK);
    assert_int_equal(expired, 0);
}

static void test_expire_at_most_max_oldest_first(void **state)
{
    fake_env *env = *state;
    char a[ORDER_ID_LEN + 1], b[ORDER_ID_LEN + 1], c[ORDER_ID_LEN + 1];
    place(env, a);
    place(env, b);
    place(env, c);
    size_t expired = 0;
    assert_int_equal(expire(env, HOUR_US, 2, &expired), ORDER_OK);
    assert_int_equal(expired, 2);
    assert_int_equal(stored(env, a)->status, ORDER_STATUS_EXPIRED);
    assert_int_equal(stored(env, b)->status, ORDER_STATUS_EXPIRED);
    assert_int_equal(stored(env, c)->status, ORDER_STATUS_PENDING);
    assert_int_equal(expire(env, HOUR_US, 2, &expired), ORDER_OK);
    assert_int_equal(expired, 1);
    assert_int_equal(stored(env, c)->status, ORDER_STATUS_EXPIRED);
}

/* The provider fails to void one payment: the expiry stands, the others are voided, and
 * order_settle_due voids the rest later. */
static void test_expire_provider_failure_left_for_settle_due(void **state)
{
    fake_env *env = *state;
    char a[ORDER_ID_LEN + 1], b[ORDER_ID_LEN + 1];
    place(env, a);
    place(env, b);
    env->local->fail[FAKE_PAY_CANCEL] = 1; /* the first void fails */
    size_t expired = 0;
    assert_int_equal(expire(env, HOUR_US, 10, &expired), ORDER_OK);
    assert_int_equal(expired, 2);
    assert_int_equal(notices, 1);
    assert_int_equal(stored(env, a)->status, ORDER_STATUS_EXPIRED);
    assert_int_equal(stored(env, a)->pay_status, ORDER_PAY_PENDING);
    assert_int_equal(fake_payments_find(env->local, a)->status, ORDER_PAY_PENDING);
    assert_int_equal(stored(env, b)->status, ORDER_STATUS_EXPIRED);
    assert_int_equal(stored(env, b)->pay_status, ORDER_PAY_VOIDED);

    size_t settled = 0;
    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 1);
    assert_int_equal(stored(env, a)->status, ORDER_STATUS_EXPIRED);
    assert_int_equal(stored(env, a)->pay_status, ORDER_PAY_VOIDED);
    assert_int_equal(fake_payments_find(env->local, a)->status, ORDER_PAY_VOIDED);
    assert_int_equal(env->local->voided, 2);

    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 0);
}

static void test_expire_store_down(void **state)
{
    fake_env *env = *state;
    char a[ORDER_ID_LEN + 1];
    place(env, a);
    env->store->fail[FAKE_ORDERS_EXPIRE_DUE] = 1;
    size_t expired = 99;
    assert_int_equal(expire(env, HOUR_US, 10, &expired), ORDER_EUNAVAILABLE);
    assert_int_equal(expired, 0);
    assert_int_equal(stored(env, a)->status, ORDER_STATUS_PENDING);
    assert_int_equal(env->local->calls[FAKE_PAY_CANCEL], 0);
}

/* ---- settle_due ---- */

static void test_settle_refund_fails_once_then_succeeds(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    pay(env, id);
    env->local->fail[FAKE_PAY_REFUND] = 2; /* the cancel's refund and the first sweep's */
    assert_int_equal(cancel(env, id), ORDER_EUNAVAILABLE);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_SUCCEEDED);

    size_t settled = 99;
    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 0);
    assert_int_equal(notices, 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(fake_payments_refunds(env->local, id), 0);

    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 1);
    const order_t *s = stored(env, id);
    const fake_payment *p = fake_payments_find(env->local, id);
    assert_int_equal(s->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(s->pay_status, ORDER_PAY_REFUNDED);
    assert_string_equal(s->refund_id, p->refund_id);
    assert_true(strncmp(s->refund_id, "re_", 3) == 0);
    assert_true(s->refunded_at_us > 0);
    assert_int_equal(p->refunds, 1);

    /* Settled: later sweeps leave it alone. */
    int refund_calls = env->local->calls[FAKE_PAY_REFUND];
    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 0);
    assert_int_equal(env->local->calls[FAKE_PAY_REFUND], refund_calls);
    assert_int_equal(p->refunds, 1);
}

/* Refunded at the provider, but recording it failed: the next sweep records it without a
 * second refund. */
static void test_settle_refund_done_but_not_recorded(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    pay(env, id);
    env->local->fail[FAKE_PAY_REFUND] = 1;
    assert_int_equal(cancel(env, id), ORDER_EUNAVAILABLE);

    env->store->fail[FAKE_ORDER_AMEND] = 1;
    size_t settled = 99;
    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 0);
    assert_int_equal(fake_payments_refunds(env->local, id), 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_SUCCEEDED);

    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
    assert_string_equal(stored(env, id)->refund_id, fake_payments_find(env->local, id)->refund_id);
    assert_int_equal(fake_payments_refunds(env->local, id), 1);
}

/* Only orders left alone for min_age are settled: a cancel still at work is not raced. */
static void test_settle_waits_for_min_age(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    env->store->now_us = wall_us() - MINUTE_US; /* the cancel happens a minute ago */
    env->local->fail[FAKE_PAY_CANCEL] = 1;
    assert_int_equal(cancel(env, id), ORDER_EUNAVAILABLE);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_PENDING);

    size_t settled = 99;
    assert_int_equal(settle(env, 10 * MINUTE_US, &settled), ORDER_OK);
    assert_int_equal(settled, 0);
    assert_int_equal(env->local->calls[FAKE_PAY_CANCEL], 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_PENDING);

    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_VOIDED);
}

/* A payment that succeeded before the void reached the provider is refunded instead. */
static void test_settle_voids_or_refunds_what_the_provider_says(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    env->local->fail[FAKE_PAY_CANCEL] = 1;
    assert_int_equal(cancel(env, id), ORDER_EUNAVAILABLE);
    fake_payments_mark_paid(env->local, id); /* paid meanwhile */

    size_t settled = 0;
    assert_int_equal(settle(env, 0, &settled), ORDER_OK);
    assert_int_equal(settled, 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
    assert_true(stored(env, id)->refund_id[0] != '\0');
    assert_int_equal(fake_payments_refunds(env->local, id), 1);
    assert_int_equal(env->local->voided, 0);
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_expire_only_old_pending_orders),
        T(test_expire_at_most_max_oldest_first),
        T(test_expire_provider_failure_left_for_settle_due),
        T(test_expire_store_down),
        T(test_settle_refund_fails_once_then_succeeds),
        T(test_settle_refund_done_but_not_recorded),
        T(test_settle_waits_for_min_age),
        T(test_settle_voids_or_refunds_what_the_provider_says),
    };
    return cmocka_run_group_tests_name("sweeps", tests, NULL, NULL);
}
