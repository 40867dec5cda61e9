/* test_inbound.c — inbound events in the domain: payment-provider webhooks
 * (order_apply_payment_event: every kind, amount and reference checks, late payments on
 * ended orders, replays) and inventory replies (order_apply_stock_reply: rejected,
 * reserved, duplicates, malformed, too late). */
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

#define MISSING_ID "3f2c8a4e-1b7d-4c55-9a0e-2f6b8d1c7e90"
#define HOUR_US    (3600LL * 1000000)

/* ---- fixture and helpers ---- */

static int notices;
static char last_notice[128];

static void on_notice(const char *what, const order_t *o, const order_error *e)
{
    (void)o;
    (void)e;
    notices++;
    snprintf(last_notice, sizeof last_notice, "%s", what);
}

static int setup(void **state)
{
    fake_env *env = fake_env_create();
    fake_store_put_product(env->store, "apple", "Apple", 1000, "EUR", true);
    fake_env_stripe(env);
    env->svc.notice = on_notice;
    notices = 0;
    last_notice[0] = '\0';
    *state = env;
    return 0;
}

static int teardown(void **state)
{
    fake_env_destroy(*state);
    return 0;
}

static int64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static const order_t *stored(fake_env *env, const char *id)
{
    const order_t *o = fake_store_order(env->store, id);
    assert_non_null(o);
    return o;
}

/* Places an order of two apples through Stripe as alice (PENDING, payment pending). */
static void place(fake_env *env, char *id_out)
{
    static int seq;
    char rid[32];
    snprintf(rid, sizeof rid, "in-%d", ++seq);
    order_line_cmd line = {"apple", 2};
    order_place_cmd cmd = {rid, "", &line, 1, ORDER_PROVIDER_STRIPE, NULL, NULL};
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_int_equal(o.pay_status, ORDER_PAY_PENDING);
    snprintf(id_out, ORDER_ID_LEN + 1, "%s", o.id);
    order_clear(&o);
    fake_env_as(env, "webhooks", ORDER_ROLE_SERVICE);
}

/* A verified Stripe event about order `id`, for its payment and exact total. */
static order_payment_event event(fake_env *env, const char *evid, order_pay_event_kind kind,
                                 const char *id)
{
    const order_t *o = stored(env, id);
    order_payment_event ev = {.provider = ORDER_PROVIDER_STRIPE,
                              .kind = kind,
                              .amount_minor = o->total_minor,
                              .occurred_at_us = 1700001234000000LL};
    snprintf(ev.id, sizeof ev.id, "%s", evid);
    snprintf(ev.type, sizeof ev.type, "test.event");
    snprintf(ev.order_id, sizeof ev.order_id, "%s", id);
    snprintf(ev.reference, sizeof ev.reference, "%s", o->pay_reference);
    snprintf(ev.charge_id, sizeof ev.charge_id, "ch_evt_%s", evid);
    snprintf(ev.receipt_url, sizeof ev.receipt_url, "https://pay.example/r/%s", evid);
    snprintf(ev.currency, sizeof ev.currency, "%s", o->currency);
    return ev;
}

static int apply(fake_env *env, const order_payment_event *ev, order_t *out)
{
    fake_env_again(env);
    return order_apply_payment_event(&env->svc, &env->ctx, ev, out, NULL);
}

/* apply(), as a caller with a deadline this far off. */
static int apply_within(fake_env *env, const order_payment_event *ev, int64_t within_us)
{
    fake_env_again(env);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    env->ctx.deadline_mono_us = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000 + within_us;
    return order_apply_payment_event(&env->svc, &env->ctx, ev, NULL, NULL);
}

/* Applies a SUCCEEDED event: the order is PAID. */
static void pay_by_event(fake_env *env, const char *id, const char *evid)
{
    order_payment_event ev = event(env, evid, ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
}

static int total_store_calls(const fake_env *env)
{
    int n = 0;
    for (int op = 0; op < FAKE_STORE_NOPS; op++)
        n += env->store->calls[op];
    return n;
}

static int total_provider_calls(const fake_payments *fp)
{
    int n = 0;
    for (int op = 0; op < FAKE_PAY_NOPS; op++)
        n += fp->calls[op];
    return n;
}

/* ---- payment events: SUCCEEDED ---- */

static void test_succeeded_pays_a_pending_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    int64_t version = stored(env, id)->version;
    order_payment_event ev = event(env, "evt_paid_1", ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);

    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_PAID);
    assert_int_equal(s->pay_status, ORDER_PAY_SUCCEEDED);
    assert_string_equal(s->pay_charge_id, "ch_evt_evt_paid_1");
    assert_string_equal(s->pay_receipt_url, "https://pay.example/r/evt_paid_1");
    assert_int_equal(s->paid_at_us, ev.occurred_at_us);
    assert_int_equal(s->version, version + 1);
    const fake_history *h = fake_store_history_last(env->store, id);
    assert_int_equal(h->from, ORDER_STATUS_PENDING);
    assert_int_equal(h->to, ORDER_STATUS_PAID);
    assert_string_equal(h->actor, "webhooks");
    assert_true(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, "evt_paid_1"));
    /* The provider is not asked again: the event is the provider's word. */
    assert_int_equal(env->stripe->calls[FAKE_PAY_VERIFY], 0);
}

/* The use case hands back the order as the event left it. */
static void test_succeeded_returns_the_paid_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    order_payment_event ev = event(env, "evt_paid_out", ORDER_PAY_EVENT_SUCCEEDED, id);
    order_t out = {0};
    assert_int_equal(apply(env, &ev, &out), ORDER_OK);
    assert_string_equal(out.id, id);
    assert_int_equal(out.status, ORDER_STATUS_PAID);
    assert_int_equal(out.pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(out.version, stored(env, id)->version);
    order_clear(&out);
}

/* A found order that no longer waits for this event: a replay changes nothing and says
 * it is a duplicate (orders.h: ORDER_EDUPLICATE when the event was already applied). */
/* The webhook's metrics tell an event that changed an order from one that found it
 * already so (ConfirmPayment got there first), or no longer applicable. */
static void test_changed_says_whether_the_event_did_anything(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    bool changed = false;
    order_payment_event ev = event(env, "evt_chg_1", ORDER_PAY_EVENT_SUCCEEDED, id);
    fake_env_again(env);
    assert_int_equal(order_apply_payment_event(&env->svc, &env->ctx, &ev, NULL, &changed),
                     ORDER_OK);
    assert_true(changed);

    /* Another event saying the same of the PAID order: nothing to do. */
    order_payment_event again = event(env, "evt_chg_2", ORDER_PAY_EVENT_SUCCEEDED, id);
    fake_env_again(env);
    changed = true;
    assert_int_equal(order_apply_payment_event(&env->svc, &env->ctx, &again, NULL, &changed),
                     ORDER_OK);
    assert_false(changed);

    /* A denial of a PAID order no longer applies. */
    order_payment_event denied = event(env, "evt_chg_3", ORDER_PAY_EVENT_DENIED, id);
    fake_env_again(env);
    changed = true;
    assert_int_equal(order_apply_payment_event(&env->svc, &env->ctx, &denied, NULL, &changed),
                     ORDER_OK);
    assert_false(changed);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
}

static void test_succeeded_replayed_is_a_duplicate(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    order_payment_event ev = event(env, "evt_twice", ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    int64_t version = stored(env, id)->version;
    size_t history = fake_store_history_count(env->store, id);

    int rc = apply(env, &ev, NULL);
    assert_int_equal(stored(env, id)->version, version); /* nothing written */
    assert_int_equal(fake_store_history_count(env->store, id), history);
    assert_int_equal(env->stripe->refunded, 0);
    assert_int_equal(rc, ORDER_EDUPLICATE);
}

/* The payment was created but recording its reference failed; the provider's webhook of a
 * payment made on it comes first. The paid order must know its payment, or it can never be
 * refunded. (A saved method is not charged before the reference is recorded.) */
static void test_succeeded_records_the_reference_the_order_missed(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = {"in-missed-ref", "", &line, 1, ORDER_PROVIDER_STRIPE, "pm_ok", NULL};
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    env->store->fail[FAKE_ORDER_AMEND] = 1;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed),
                     ORDER_EUNAVAILABLE);
    const order_t *s = &env->store->orders[0];
    char id[ORDER_ID_LEN + 1];
    snprintf(id, sizeof id, "%s", s->id);
    assert_string_equal(s->pay_reference, "");
    const fake_payment *p = fake_payments_find(env->stripe, id);
    assert_int_equal(p->charges, 0); /* not charged while the order does not know it */
    assert_int_equal(env->stripe->calls[FAKE_PAY_CHARGE], 0);
    fake_payments_mark_paid(env->stripe, id); /* ...but paid anyway, as far as Stripe says */

    fake_env_as(env, "webhooks", ORDER_ROLE_SERVICE);
    order_payment_event ev = event(env, "evt_missed_ref", ORDER_PAY_EVENT_SUCCEEDED, id);
    snprintf(ev.reference, sizeof ev.reference, "%s", p->reference);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
    assert_string_equal(stored(env, id)->pay_reference, p->reference);
}

/* Two deliveries of one event at once: the second finds it recorded by the first. */
struct redeliver {
    fake_env *env;
    order_payment_event ev;
    int rc;
};

static void redeliver_run(void *arg)
{
    struct redeliver *r = arg;
    order_error *err = calloc(1, sizeof *err);
    assert_non_null(err);
    order_ctx ctx = {.deadline_mono_us = INT64_MAX, .err = err};
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "webhooks-2");
    ctx.caller.roles = ORDER_ROLE_SERVICE;
    r->rc = order_apply_payment_event(&r->env->svc, &ctx, &r->ev, NULL, NULL);
    free(err);
}

static void test_succeeded_delivered_twice_at_once(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    struct redeliver r = {env, event(env, "evt_race", ORDER_PAY_EVENT_SUCCEEDED, id), -100};
    env->store->hook = redeliver_run;
    env->store->hook_arg = &r;
    env->store->hook_op = FAKE_ORDER_TRANSITION;
    assert_int_equal(apply(env, &r.ev, NULL), ORDER_EDUPLICATE);
    assert_int_equal(r.rc, ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
    assert_int_equal(fake_store_history_count(env->store, id), 2); /* placed, paid: once */
}

static void test_succeeded_with_another_amount_or_currency(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    int64_t version = stored(env, id)->version;

    order_payment_event ev = event(env, "evt_short", ORDER_PAY_EVENT_SUCCEEDED, id);
    ev.amount_minor -= 1;
    assert_int_equal(apply(env, &ev, NULL), ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_MISMATCH");
    assert_int_equal(notices, 1);

    ev = event(env, "evt_usd", ORDER_PAY_EVENT_SUCCEEDED, id);
    snprintf(ev.currency, sizeof ev.currency, "USD");
    assert_int_equal(apply(env, &ev, NULL), ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_MISMATCH");

    /* An amount the adapter could not read (a currency it does not know) is no match. */
    ev = event(env, "evt_unread", ORDER_PAY_EVENT_SUCCEEDED, id);
    ev.amount_minor = -1;
    ev.currency[0] = '\0';
    assert_int_equal(apply(env, &ev, NULL), ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_MISMATCH");

    /* Not paid, not recorded: the order is as it was. */
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_PENDING);
    assert_int_equal(s->pay_status, ORDER_PAY_PENDING);
    assert_int_equal(s->version, version);
    assert_int_equal(env->store->calls[FAKE_ORDER_TRANSITION], 0);
    assert_false(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, "evt_short"));
    assert_false(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, "evt_usd"));

    /* The right amount still pays it. */
    ev = event(env, "evt_right", ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
}

/* A cancel whose void failed left the payment PENDING; the payer paid meanwhile. */
static void cancel_leaving_payment_pending(fake_env *env, const char *id)
{
    order_t o = {0};
    env->stripe->fail[FAKE_PAY_CANCEL] = 1;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_EUNAVAILABLE);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_PENDING);
    fake_env_as(env, "webhooks", ORDER_ROLE_SERVICE);
}

static void assert_late_payment_refunded(fake_env *env, const char *id, order_status status,
                                         const char *evid)
{
    const order_t *s = stored(env, id);
    const fake_payment *p = fake_payments_find(env->stripe, id);
    assert_int_equal(s->status, status);
    assert_int_equal(s->pay_status, ORDER_PAY_REFUNDED);
    char charge[ORDER_REFERENCE_MAX + 1];
    snprintf(charge, sizeof charge, "ch_evt_%s", evid);
    assert_string_equal(s->pay_charge_id, charge);
    assert_true(s->paid_at_us > 0);
    assert_string_equal(s->refund_id, p->refund_id);
    assert_true(s->refund_id[0] != '\0');
    assert_true(s->refunded_at_us > 0);
    assert_int_equal(p->status, ORDER_PAY_REFUNDED);
    assert_int_equal(p->refunds, 1);
    assert_int_equal(fake_store_history_last(env->store, id)->to, status); /* no move */
    assert_true(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, evid));
}

static void test_succeeded_on_a_cancelled_order_is_refunded(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    cancel_leaving_payment_pending(env, id);
    fake_payments_mark_paid(env->stripe, id);

    order_payment_event ev = event(env, "evt_late", ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_late_payment_refunded(env, id, ORDER_STATUS_CANCELLED, "evt_late");

    /* Delivered again: no second refund. */
    int64_t version = stored(env, id)->version;
    int rc = apply(env, &ev, NULL);
    assert_true(rc == ORDER_OK || rc == ORDER_EDUPLICATE);
    assert_int_equal(fake_payments_refunds(env->stripe, id), 1);
    assert_int_equal(stored(env, id)->version, version);
}

/* The webhook's sender waits for its answer: the refund of a late payment gets a share of
 * the call (half of what is left, at most 3 s), the sweeper whatever it does not finish. */
static void test_succeeded_late_refund_takes_a_share_of_the_webhook_time(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    cancel_leaving_payment_pending(env, id);
    fake_payments_mark_paid(env->stripe, id);
    order_payment_event ev = event(env, "evt_late_share", ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply_within(env, &ev, 10 * 1000000), ORDER_OK);
    assert_late_payment_refunded(env, id, ORDER_STATUS_CANCELLED, "evt_late_share");
    int64_t share = env->stripe->remaining_us[FAKE_PAY_REFUND];
    assert_true(share > 0 && share <= 3 * 1000000);

    /* With almost nothing left, it is not tried: recorded, and left to the sweeper. */
    char other[ORDER_ID_LEN + 1];
    place(env, other);
    cancel_leaving_payment_pending(env, other);
    fake_payments_mark_paid(env->stripe, other);
    int refunds = env->stripe->calls[FAKE_PAY_REFUND];
    ev = event(env, "evt_late_short", ORDER_PAY_EVENT_SUCCEEDED, other);
    assert_int_equal(apply_within(env, &ev, 300 * 1000), ORDER_OK);
    assert_int_equal(env->stripe->calls[FAKE_PAY_REFUND], refunds);
    assert_int_equal(stored(env, other)->pay_status, ORDER_PAY_SUCCEEDED);
    size_t settled = 0;
    fake_env_as(env, "sweeper", ORDER_ROLE_SERVICE);
    assert_int_equal(order_settle_due(&env->svc, &env->ctx, 0, 10, &settled), ORDER_OK);
    assert_int_equal(stored(env, other)->pay_status, ORDER_PAY_REFUNDED);
}

static void test_succeeded_on_an_expired_order_is_refunded(void **state)
{
    fake_env *env = *state;
    /* An order placed two hours ago, expired with a provider that failed to void it. */
    env->store->now_us = wall_us() - 2 * HOUR_US;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    env->stripe->fail[FAKE_PAY_CANCEL] = 1;
    size_t expired = 0;
    fake_env_as(env, "sweeper", ORDER_ROLE_SERVICE);
    assert_int_equal(order_expire_due(&env->svc, &env->ctx, HOUR_US, 10, &expired), ORDER_OK);
    assert_int_equal(expired, 1);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_EXPIRED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_PENDING);
    fake_payments_mark_paid(env->stripe, id);

    fake_env_as(env, "webhooks", ORDER_ROLE_SERVICE);
    order_payment_event ev = event(env, "evt_late_exp", ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_late_payment_refunded(env, id, ORDER_STATUS_EXPIRED, "evt_late_exp");
}

/* The refund of a late payment fails now: the money is recorded and left for settle_due. */
static void test_succeeded_late_refund_fails_now(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    cancel_leaving_payment_pending(env, id);
    fake_payments_mark_paid(env->stripe, id);
    env->stripe->fail[FAKE_PAY_REFUND] = 1;
    order_payment_event ev = event(env, "evt_late_fail", ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_SUCCEEDED);
    assert_true(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, "evt_late_fail"));
    assert_true(notices >= 1);

    size_t settled = 0;
    fake_env_as(env, "sweeper", ORDER_ROLE_SERVICE);
    assert_int_equal(order_settle_due(&env->svc, &env->ctx, 0, 10, &settled), ORDER_OK);
    assert_int_equal(settled, 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(fake_payments_refunds(env->stripe, id), 1);
}

/* ---- payment events: DENIED, CANCELED, FAILED ---- */

static void test_denied_fails_a_pending_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    order_payment_event ev = event(env, "evt_denied", ORDER_PAY_EVENT_DENIED, id);
    snprintf(ev.failure_code, sizeof ev.failure_code, "do_not_honor");
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_FAILED);
    assert_int_equal(s->pay_status, ORDER_PAY_FAILED);
    assert_string_equal(s->cancel_reason, "payment declined: do_not_honor");
    assert_int_equal(fake_store_history_last(env->store, id)->from, ORDER_STATUS_PENDING);
    assert_true(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, "evt_denied"));
    assert_int_equal(total_provider_calls(env->stripe), 1); /* only the create of place() */
}

static void test_canceled_fails_a_pending_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    order_payment_event ev = event(env, "evt_canceled", ORDER_PAY_EVENT_CANCELED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_FAILED);
    assert_int_equal(s->pay_status, ORDER_PAY_VOIDED);
    assert_string_equal(s->cancel_reason, "payment canceled at the provider");
    assert_int_equal(total_provider_calls(env->stripe), 1);

    /* On an order that ended another way first, it changes nothing. */
    char paid[ORDER_ID_LEN + 1];
    place(env, paid);
    pay_by_event(env, paid, "evt_paid_first");
    int64_t version = stored(env, paid)->version;
    ev = event(env, "evt_canceled_late", ORDER_PAY_EVENT_CANCELED, paid);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, paid)->status, ORDER_STATUS_PAID);
    assert_int_equal(stored(env, paid)->version, version);
}

static void test_failed_attempt_changes_nothing(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    int64_t version = stored(env, id)->version;
    int writes = fake_store_writes(env->store);
    order_payment_event ev = event(env, "evt_attempt", ORDER_PAY_EVENT_FAILED, id);
    snprintf(ev.failure_code, sizeof ev.failure_code, "card_declined");
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);
    assert_int_equal(stored(env, id)->version, version);
    assert_int_equal(fake_store_writes(env->store), writes);
    assert_int_equal(notices, 1); /* the operator's log hears of it */
}

/* ---- payment events: REFUNDED ---- */

static void test_refunded_in_full_records_the_refund(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    pay_by_event(env, id, "evt_pay");
    int64_t version = stored(env, id)->version;
    size_t history = fake_store_history_count(env->store, id);

    /* A partial refund is the provider's business: nothing changes. */
    order_payment_event ev = event(env, "evt_partial", ORDER_PAY_EVENT_REFUNDED, id);
    snprintf(ev.refund_id, sizeof ev.refund_id, "re_partial");
    ev.full_refund = false;
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(stored(env, id)->version, version);

    /* In full (say, from the provider's dashboard), found by the charge id alone. */
    ev = event(env, "evt_refund", ORDER_PAY_EVENT_REFUNDED, id);
    ev.order_id[0] = '\0';
    ev.reference[0] = '\0';
    snprintf(ev.charge_id, sizeof ev.charge_id, "%s", stored(env, id)->pay_charge_id);
    snprintf(ev.refund_id, sizeof ev.refund_id, "re_dashboard_1");
    ev.full_refund = true;
    ev.occurred_at_us = 1700009999000000LL;
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    const order_t *s = stored(env, id);
    /* Not shipped yet: no longer paid, so the order is cancelled with it (stock goes back). */
    assert_int_equal(s->status, ORDER_STATUS_CANCELLED);
    assert_string_equal(s->cancel_reason, "refunded at the payment provider");
    assert_int_equal(s->pay_status, ORDER_PAY_REFUNDED);
    assert_string_equal(s->refund_id, "re_dashboard_1");
    assert_int_equal(s->refunded_at_us, 1700009999000000LL);
    assert_int_equal(s->version, version + 2); /* the transition, then the refund's facts */
    assert_int_equal(fake_store_history_count(env->store, id), history + 1);
    assert_int_equal(env->stripe->calls[FAKE_PAY_REFUND], 0); /* the provider did it */
    assert_true(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, "evt_refund"));

    /* Again: no second write. */
    int writes = fake_store_writes(env->store);
    int rc = apply(env, &ev, NULL);
    assert_true(rc == ORDER_OK || rc == ORDER_EDUPLICATE);
    assert_int_equal(fake_store_writes(env->store), writes);
    assert_int_equal(stored(env, id)->version, version + 2);
}

/* ---- payment events: which order ---- */

/* Refunded overtakes succeeded: the order ends cancelled and refunded, never PAID. */
static void test_refunded_before_succeeded_ends_cancelled(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    order_payment_event refunded = event(env, "evt_refund_first", ORDER_PAY_EVENT_REFUNDED, id);
    refunded.full_refund = true;
    snprintf(refunded.refund_id, sizeof refunded.refund_id, "re_first");
    order_payment_event succeeded = event(env, "evt_paid_late", ORDER_PAY_EVENT_SUCCEEDED, id);
    assert_int_equal(apply(env, &refunded, NULL), ORDER_OK);
    assert_int_equal(apply(env, &succeeded, NULL), ORDER_OK);
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(s->pay_status, ORDER_PAY_REFUNDED);
    assert_string_equal(s->refund_id, "re_first");
    assert_int_equal(env->stripe->calls[FAKE_PAY_REFUND], 0); /* the provider already did */
}

/* A shipped order refunded at the provider keeps its status; the refund is recorded. */
static void test_refunded_after_shipping_keeps_the_status(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    pay_by_event(env, id, "evt_pay_ship");
    fake_env_again(env);
    order_t o = {0};
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, -1, &o),
                     ORDER_OK);
    order_clear(&o);
    order_payment_event ev = event(env, "evt_refund_shipped", ORDER_PAY_EVENT_REFUNDED, id);
    ev.full_refund = true;
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_SHIPPED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
}

static void test_ignored_event_touches_nothing(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    int calls = total_store_calls(env);
    order_payment_event ev = event(env, "evt_ignored", ORDER_PAY_EVENT_IGNORED, id);
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(total_store_calls(env), calls);
    assert_false(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, "evt_ignored"));
}

static void test_event_about_an_unknown_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    order_payment_event ev = event(env, "evt_stranger", ORDER_PAY_EVENT_SUCCEEDED, id);
    snprintf(ev.order_id, sizeof ev.order_id, MISSING_ID);
    snprintf(ev.reference, sizeof ev.reference, "pi_not_ours");
    snprintf(ev.charge_id, sizeof ev.charge_id, "ch_not_ours");
    assert_int_equal(apply(env, &ev, NULL), ORDER_ENOTFOUND);
    assert_int_equal(env->err.code, ORDER_ENOTFOUND);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);
    assert_int_equal(env->store->calls[FAKE_ORDER_TRANSITION], 0);

    /* Without our order id, the provider's reference finds it. */
    ev = event(env, "evt_by_ref", ORDER_PAY_EVENT_SUCCEEDED, id);
    ev.order_id[0] = '\0';
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
}

static void test_event_about_another_payment(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    int64_t version = stored(env, id)->version;
    order_payment_event ev = event(env, "evt_other_pi", ORDER_PAY_EVENT_SUCCEEDED, id);
    snprintf(ev.reference, sizeof ev.reference, "pi_someone_elses");
    assert_int_equal(apply(env, &ev, NULL), ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_REFERENCE_MISMATCH");

    ev = event(env, "evt_other_provider", ORDER_PAY_EVENT_SUCCEEDED, id);
    ev.provider = ORDER_PROVIDER_PAYPAL;
    assert_int_equal(apply(env, &ev, NULL), ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_REFERENCE_MISMATCH");

    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);
    assert_int_equal(stored(env, id)->version, version);
    assert_int_equal(env->store->calls[FAKE_ORDER_TRANSITION], 0);
}

static void test_event_store_down(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    order_payment_event ev = event(env, "evt_down", ORDER_PAY_EVENT_SUCCEEDED, id);
    env->store->fail[FAKE_ORDER_TRANSITION] = 1;
    assert_int_equal(apply(env, &ev, NULL), ORDER_EUNAVAILABLE); /* the provider retries */
    assert_false(fake_store_seen(env->store, ORDER_INBOUND_PROVIDER, "evt_down"));
    assert_int_equal(apply(env, &ev, NULL), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
}

/* ---- inventory replies ---- */

static int reply(fake_env *env, const char *rid, bool rejected, const char *order_id,
                 const char *reason)
{
    order_stock_reply r = {.id = rid, .rejected = rejected, .order_id = order_id, .reason = reason};
    fake_env_as(env, "inventory", ORDER_ROLE_SERVICE);
    return order_apply_stock_reply(&env->svc, &env->ctx, &r);
}

static void test_stock_rejected_fails_the_order_and_voids(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    assert_int_equal(reply(env, "msg-rej-1", true, id, "out of apples"), ORDER_OK);
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_FAILED);
    assert_string_equal(s->cancel_reason, "stock rejected: out of apples");
    assert_int_equal(s->pay_status, ORDER_PAY_VOIDED);
    assert_int_equal(fake_payments_find(env->stripe, id)->status, ORDER_PAY_VOIDED);
    assert_int_equal(env->stripe->voided, 1);
    const fake_history *h = fake_store_history_last(env->store, id);
    assert_int_equal(h->from, ORDER_STATUS_PENDING);
    assert_int_equal(h->to, ORDER_STATUS_FAILED);
    assert_string_equal(h->actor, "inventory");
    assert_true(fake_store_seen(env->store, ORDER_INBOUND_INVENTORY, "msg-rej-1"));

    /* The same reply again: a duplicate, nothing voided twice. */
    int64_t version = s->version;
    assert_int_equal(reply(env, "msg-rej-1", true, id, "out of apples"), ORDER_EDUPLICATE);
    assert_int_equal(stored(env, id)->version, version);
    assert_int_equal(env->stripe->calls[FAKE_PAY_CANCEL], 1);

    /* Without a reason, the order still says why. */
    char other[ORDER_ID_LEN + 1];
    place(env, other);
    assert_int_equal(reply(env, "msg-rej-2", true, other, NULL), ORDER_OK);
    assert_string_equal(stored(env, other)->cancel_reason, "stock rejected: no reason given");
}

/* A long reason is cut to fit cancel_reason at a character boundary: PostgreSQL refuses
 * text that ends in half a UTF-8 sequence, which would lose the rejection. */
static void test_stock_rejected_long_reason_cut_between_characters(void **state)
{
    fake_env *env = *state;
    static const char *const chars[] = {"\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x8d\x8e"};
    for (size_t c = 0; c < sizeof chars / sizeof chars[0]; c++) {
        for (size_t lead = 0; lead < 4; lead++) { /* every alignment of the cut */
            char reason[ORDER_REASON_MAX + 1] = "";
            memset(reason, 'a', lead);
            while (strlen(reason) + strlen(chars[c]) <= ORDER_REASON_MAX)
                strcat(reason, chars[c]);
            char id[ORDER_ID_LEN + 1], rid[32];
            place(env, id);
            snprintf(rid, sizeof rid, "msg-cut-%zu-%zu", c, lead);
            assert_int_equal(reply(env, rid, true, id, reason), ORDER_OK);
            const char *got = stored(env, id)->cancel_reason;
            size_t n = strlen(got), tail = strlen(chars[c]);
            assert_true(n <= ORDER_REASON_MAX && n > 400);
            /* Ends with a whole character: the last bytes are one full sequence. */
            assert_memory_equal(got + n - tail, chars[c], tail);
        }
    }
}

static void test_stock_rejected_void_fails_left_for_settle_due(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    env->stripe->fail[FAKE_PAY_CANCEL] = 1;
    assert_int_equal(reply(env, "msg-rej-void", true, id, "gone"), ORDER_OK);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_FAILED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_PENDING);
    assert_int_equal(notices, 1);

    size_t settled = 0;
    fake_env_as(env, "sweeper", ORDER_ROLE_SERVICE);
    assert_int_equal(order_settle_due(&env->svc, &env->ctx, 0, 10, &settled), ORDER_OK);
    assert_int_equal(settled, 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_VOIDED);
}

static void test_stock_reserved_records_the_time(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    int64_t version = stored(env, id)->version;
    size_t history = fake_store_history_count(env->store, id);
    int64_t before = wall_us();
    assert_int_equal(reply(env, "msg-res-1", false, id, NULL), ORDER_OK);
    const order_t *s = stored(env, id);
    assert_true(s->stock_reserved_at_us >= before && s->stock_reserved_at_us <= wall_us());
    assert_int_equal(s->status, ORDER_STATUS_PENDING);
    assert_int_equal(s->pay_status, ORDER_PAY_PENDING);
    assert_int_equal(s->version, version + 1);
    assert_int_equal(fake_store_history_count(env->store, id), history); /* not a move */
    int64_t reserved = s->stock_reserved_at_us;

    assert_int_equal(reply(env, "msg-res-1", false, id, NULL), ORDER_EDUPLICATE);
    assert_int_equal(stored(env, id)->version, version + 1);
    assert_int_equal(stored(env, id)->stock_reserved_at_us, reserved);
}

static void test_stock_reply_malformed(void **state)
{
    fake_env *env = *state;
    assert_int_equal(reply(env, "msg-bad-1", true, "not-a-uuid", "x"), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 1);
    assert_string_equal(env->err.violations[0].field, "order_id");
    assert_int_equal(reply(env, "", false, NULL, NULL), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 2);
    assert_string_equal(env->err.violations[0].field, "event_id");
    assert_string_equal(env->err.violations[1].field, "order_id");
    assert_int_equal(total_store_calls(env), 0);

    assert_int_equal(reply(env, "msg-unknown", true, MISSING_ID, "x"), ORDER_ENOTFOUND);
    assert_int_equal(reply(env, "msg-unknown-2", false, MISSING_ID, NULL), ORDER_ENOTFOUND);
}

/* Paid before the inventory answered, then rejected: the goods cannot ship, so the order
 * is cancelled and the money goes back. */
static void test_stock_rejected_after_payment_cancels_and_refunds(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    fake_payments_mark_paid(env->stripe, id);
    pay_by_event(env, id, "evt_paid_before_stock");
    int64_t version = stored(env, id)->version;

    assert_int_equal(reply(env, "msg-rej-late", true, id, "out of apples"), ORDER_OK);
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_CANCELLED);
    assert_string_equal(s->cancel_reason, "stock rejected: out of apples");
    assert_int_equal(s->pay_status, ORDER_PAY_REFUNDED);
    assert_true(s->refund_id[0] != '\0');
    assert_true(s->version > version);
    assert_int_equal(env->stripe->refunded, 1);
    const fake_history *h = fake_store_history_last(env->store, id);
    assert_int_equal(h->from, ORDER_STATUS_PAID);
    assert_int_equal(h->to, ORDER_STATUS_CANCELLED);
    assert_string_equal(h->actor, "inventory");
    assert_true(fake_store_seen(env->store, ORDER_INBOUND_INVENTORY, "msg-rej-late"));
    assert_int_equal(notices, 1); /* the operator hears of it */

    /* Redelivered: a duplicate; refunded once. */
    assert_int_equal(reply(env, "msg-rej-late", true, id, "out of apples"), ORDER_EDUPLICATE);
    assert_int_equal(env->stripe->refunded, 1);
    assert_int_equal(env->stripe->calls[FAKE_PAY_REFUND], 1);
}

/* A rejection that contradicts a reservation already confirmed, or arrives after shipping,
 * changes nothing: the operator hears of it. */
static void test_stock_rejected_after_reserved_or_shipped_changes_nothing(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place(env, id);
    assert_int_equal(reply(env, "msg-res-ok", false, id, NULL), ORDER_OK);
    pay_by_event(env, id, "evt_paid_after_stock");
    order_t before = {0};
    assert_int_equal(order_copy(&before, stored(env, id)), ORDER_OK);
    int provider_calls = total_provider_calls(env->stripe);

    assert_int_equal(reply(env, "msg-rej-contra", true, id, "miscounted"), ORDER_OK);
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_PAID);
    assert_int_equal(s->pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(s->version, before.version);
    assert_string_equal(s->cancel_reason, "");
    assert_int_equal(total_provider_calls(env->stripe), provider_calls);
    assert_false(fake_store_seen(env->store, ORDER_INBOUND_INVENTORY, "msg-rej-contra"));
    assert_int_equal(notices, 1);
    order_clear(&before);
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_succeeded_pays_a_pending_order),
        T(test_succeeded_returns_the_paid_order),
        T(test_changed_says_whether_the_event_did_anything),
        T(test_succeeded_replayed_is_a_duplicate),
        T(test_succeeded_records_the_reference_the_order_missed),
        T(test_succeeded_delivered_twice_at_once),
        T(test_succeeded_with_another_amount_or_currency),
        T(test_succeeded_on_a_cancelled_order_is_refunded),
        T(test_succeeded_late_refund_takes_a_share_of_the_webhook_time),
        T(test_succeeded_on_an_expired_order_is_refunded),
        T(test_succeeded_late_refund_fails_now),
        T(test_denied_fails_a_pending_order),
        T(test_canceled_fails_a_pending_order),
        T(test_failed_attempt_changes_nothing),
        T(test_refunded_in_full_records_the_refund),
        T(test_refunded_before_succeeded_ends_cancelled),
        T(test_refunded_after_shipping_keeps_the_status),
        T(test_ignored_event_touches_nothing),
        T(test_event_about_an_unknown_order),
        T(test_event_about_another_payment),
        T(test_event_store_down),
        T(test_stock_rejected_fails_the_order_and_voids),
        T(test_stock_rejected_void_fails_left_for_settle_due),
        T(test_stock_reserved_records_the_time),
        T(test_stock_rejected_long_reason_cut_between_characters),
        T(test_stock_reply_malformed),
        T(test_stock_rejected_after_payment_cancels_and_refunds),
        T(test_stock_rejected_after_reserved_or_shipped_changes_nothing),
    };
    return cmocka_run_group_tests_name("inbound", tests, NULL, NULL);
}
