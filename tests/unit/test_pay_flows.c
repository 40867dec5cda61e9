/* test_pay_flows.c — real payments in the domain: PlaceOrder with a saved payment method
 * (charged at once: PAID, or declined: FAILED and FAILED_PRECONDITION PAYMENT_DECLINED, the
 * same answer on a replay), a payment that succeeds after its order was cancelled (recorded
 * and refunded once), and ConfirmPayment racing CancelOrder at every step of either: the
 * order always ends paid (and not refunded) or cancelled (refunded or voided), never both,
 * never neither. */
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

/* ---- fixture and helpers ---- */

static int setup(void **state)
{
    fake_env *env = fake_env_create();
    fake_store_put_product(env->store, "apple", "Apple", 1000, "EUR", true);
    fake_env_stripe(env);
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

/* The value of an ErrorInfo metadata key, or NULL. */
static const char *meta(const order_error *e, const char *key)
{
    for (size_t i = 0; i < e->nmeta; i++)
        if (strcmp(e->meta_key[i], key) == 0)
            return e->meta_value[i];
    return NULL;
}

static order_place_cmd stripe_cmd(const char *request_id, const order_line_cmd *line,
                                  const char *payment_method)
{
    return (order_place_cmd){
        .request_id = request_id,
        .customer_id = "",
        .lines = line,
        .nlines = 1,
        .provider = ORDER_PROVIDER_STRIPE,
        .payment_method = payment_method,
    };
}

/* Places an order of one apple through LOCAL as alice; its id goes to id_out. */
static void place_local(fake_env *env, char *id_out)
{
    static int seq;
    char rid[32];
    snprintf(rid, sizeof rid, "flow-%d", ++seq);
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = {rid, "", &line, 1, ORDER_PROVIDER_LOCAL, NULL, NULL};
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    snprintf(id_out, ORDER_ID_LEN + 1, "%s", o.id);
    order_clear(&o);
    fake_env_again(env);
}

/* ---- PlaceOrder with a saved payment method ---- */

static void test_place_charges_a_saved_payment_method(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 2};
    order_place_cmd cmd = stripe_cmd("pm-ok-1", &line, "pm_ok");
    order_t o = {0};
    order_payment_action a;
    bool replayed = true;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_false(replayed);

    /* Paid at once, with what the provider said about the charge. */
    const fake_payment *p = fake_payments_find(env->stripe, o.id);
    assert_non_null(p);
    assert_int_equal(o.status, ORDER_STATUS_PAID);
    assert_int_equal(o.pay_provider, ORDER_PROVIDER_STRIPE);
    assert_int_equal(o.pay_status, ORDER_PAY_SUCCEEDED);
    assert_string_equal(o.pay_reference, p->reference);
    assert_string_equal(o.pay_charge_id, p->charge_id);
    assert_true(strncmp(o.pay_charge_id, "ch_", 3) == 0);
    assert_string_equal(o.pay_receipt_url, p->receipt_url);
    assert_int_equal(o.paid_at_us, p->paid_at_us);
    assert_int_equal(p->charges, 1);
    assert_int_equal(a.provider, ORDER_PROVIDER_STRIPE);
    assert_string_equal(a.reference, p->reference);

    /* Stored so, with the move to PAID in the history. */
    const order_t *s = stored(env, o.id);
    assert_int_equal(s->status, ORDER_STATUS_PAID);
    assert_int_equal(s->version, o.version);
    assert_string_equal(s->pay_charge_id, p->charge_id);
    assert_int_equal(fake_store_history_count(env->store, o.id), 2);
    const fake_history *h = fake_store_history_last(env->store, o.id);
    assert_int_equal(h->from, ORDER_STATUS_PENDING);
    assert_int_equal(h->to, ORDER_STATUS_PAID);
    assert_int_equal(env->local->calls[FAKE_PAY_CREATE], 0);

    /* A replay reports the paid order: no second charge, nothing written but the key. */
    int creates = env->stripe->calls[FAKE_PAY_CREATE];
    int writes = fake_store_writes(env->store);
    order_t again = {0};
    fake_env_again(env);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &again, &a, &replayed), ORDER_OK);
    assert_true(replayed);
    assert_string_equal(again.id, o.id);
    assert_int_equal(again.status, ORDER_STATUS_PAID);
    assert_int_equal(again.version, o.version);
    assert_string_equal(a.reference, p->reference);
    assert_int_equal(env->stripe->calls[FAKE_PAY_CREATE], creates);
    assert_int_equal(p->charges, 1);
    assert_int_equal(fake_store_writes(env->store), writes + 1); /* the insert that replayed */
    order_clear(&again);
    order_clear(&o);
}

static void test_place_declined_fails_the_order(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = stripe_cmd("pm-declined-1", &line, "pm_declined:insufficient_funds");
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed),
                     ORDER_EPRECONDITION);
    assert_null(o.items); /* nothing returned on a failure */

    /* What the caller hears: the decline, machine-readable, and the order's status. */
    assert_int_equal(env->err.code, ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_DECLINED");
    assert_non_null(meta(&env->err, "decline_code"));
    assert_string_equal(meta(&env->err, "decline_code"), "insufficient_funds");
    assert_int_equal(env->err.current_status, ORDER_STATUS_FAILED);
    assert_int_equal(env->err.nviolations, 0);

    /* The order exists and ended FAILED, with the reason and the failed payment. */
    assert_int_equal(env->store->norders, 1);
    const order_t *s = &env->store->orders[0];
    const fake_payment *p = fake_payments_find(env->stripe, s->id);
    assert_non_null(p);
    assert_int_equal(p->charges, 1);
    assert_int_equal(s->status, ORDER_STATUS_FAILED);
    assert_int_equal(s->pay_status, ORDER_PAY_FAILED);
    assert_string_equal(s->pay_reference, p->reference);
    assert_string_equal(s->cancel_reason, "payment declined: insufficient_funds");
    assert_int_equal(s->paid_at_us, 0);
    assert_string_equal(s->pay_charge_id, "");
    const fake_history *h = fake_store_history_last(env->store, s->id);
    assert_int_equal(h->from, ORDER_STATUS_PENDING);
    assert_int_equal(h->to, ORDER_STATUS_FAILED);
    assert_string_equal(h->reason, "payment declined: insufficient_funds");
    int64_t version = s->version;
    /* The declined intent is closed at the provider, so nothing pays for it later. */
    assert_int_equal(env->stripe->calls[FAKE_PAY_CANCEL], 1);

    /* A replay answers the same and charges nothing again. */
    int creates = env->stripe->calls[FAKE_PAY_CREATE];
    int writes = fake_store_writes(env->store);
    fake_env_again(env);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed),
                     ORDER_EPRECONDITION);
    assert_null(o.items);
    assert_string_equal(env->err.reason, "PAYMENT_DECLINED");
    assert_non_null(meta(&env->err, "decline_code"));
    assert_string_equal(meta(&env->err, "decline_code"), "insufficient_funds");
    assert_int_equal(env->err.current_status, ORDER_STATUS_FAILED);
    assert_int_equal(env->stripe->calls[FAKE_PAY_CREATE], creates);
    assert_int_equal(p->charges, 1);
    assert_int_equal(fake_store_writes(env->store), writes + 1); /* the insert that replayed */
    assert_int_equal(env->store->norders, 1);
    assert_int_equal(env->store->orders[0].version, version);
    assert_int_equal(env->stripe->calls[FAKE_PAY_CANCEL], 1);
}

/* Closing the declined intent is best effort: when the provider cannot be reached for
 * it, the caller still hears the decline, with its code, and the order is FAILED. */
static void test_place_declined_when_the_void_fails(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = stripe_cmd("pm-declined-2", &line, "pm_declined:lost_card");
    env->stripe->fail[FAKE_PAY_CANCEL] = 1;
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed),
                     ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_DECLINED");
    assert_non_null(meta(&env->err, "decline_code"));
    assert_string_equal(meta(&env->err, "decline_code"), "lost_card");
    assert_int_equal(env->err.current_status, ORDER_STATUS_FAILED);
    assert_int_equal(env->stripe->calls[FAKE_PAY_CANCEL], 1);
    assert_int_equal(env->store->orders[0].status, ORDER_STATUS_FAILED);
    assert_string_equal(env->store->orders[0].cancel_reason, "payment declined: lost_card");
}

/* With little of the call's time left, closing the declined intent is not even tried: the
 * caller gets the decline in time (the intent stays open; a late payment is refunded). */
static void test_place_declined_with_little_time_left_skips_the_void(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = stripe_cmd("pm-declined-3", &line, "pm_declined:card_declined");
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    env->ctx.deadline_mono_us = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000 + 300 * 1000;
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed),
                     ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_DECLINED");
    assert_string_equal(meta(&env->err, "decline_code"), "card_declined");
    assert_int_equal(env->stripe->calls[FAKE_PAY_CANCEL], 0);
    assert_int_equal(env->store->orders[0].status, ORDER_STATUS_FAILED);
}

/* A saved method goes to the provider with the customer it is saved to; the customer is
 * part of what the request means, so reusing its key with another one is refused. */
static void test_place_passes_the_customer_of_a_saved_method(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = stripe_cmd("pm-cus-1", &line, "pm_ok_saved");
    cmd.payment_customer = "cus_Alice";
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_PAID);
    assert_string_equal(env->stripe->last_customer, "cus_Alice");
    order_clear(&o);

    fake_env_again(env);
    cmd.payment_customer = "cus_Bob";
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed),
                     ORDER_EIDEMPOTENCY);
    assert_int_equal(env->stripe->calls[FAKE_PAY_CREATE], 1);
    assert_int_equal(env->store->norders, 1);
}

static void test_place_customer_needs_a_payment_method(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = stripe_cmd("pm-cus-2", &line, "");
    cmd.payment_customer = "cus_Alice";
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 1);
    assert_string_equal(env->err.violations[0].field, "payment_customer");
    assert_int_equal(env->store->norders, 0);
    assert_int_equal(env->stripe->calls[FAKE_PAY_CREATE], 0);
}

static void test_place_while_the_charge_is_processing(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = stripe_cmd("pm-processing-1", &line, "pm_processing");
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    /* A webhook will tell: the order waits with its payment pending. */
    assert_int_equal(o.status, ORDER_STATUS_PENDING);
    assert_int_equal(o.pay_status, ORDER_PAY_PENDING);
    assert_string_equal(o.pay_reference, a.reference);
    assert_int_equal(o.paid_at_us, 0);
    assert_int_equal(fake_store_history_count(env->store, o.id), 1);
    order_clear(&o);
}

/* The card is charged but the answer is lost (a timeout): the order already keeps its
 * payment, so the caller's retry finds it paid, and a cancel instead gives the money back. */
static void test_place_charge_answer_lost_then_retry_or_cancel(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = stripe_cmd("pm-lost-1", &line, "pm_lost");
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed),
                     ORDER_EUNAVAILABLE);
    const order_t *s = &env->store->orders[0];
    char id[ORDER_ID_LEN + 1];
    snprintf(id, sizeof id, "%s", s->id);
    const fake_payment *p = fake_payments_find(env->stripe, id);
    assert_int_equal(p->status, ORDER_PAY_SUCCEEDED); /* charged at the provider */
    assert_int_equal(s->status, ORDER_STATUS_PENDING);
    assert_int_equal(s->pay_status, ORDER_PAY_PENDING);
    assert_string_equal(s->pay_reference, p->reference); /* known before the charge */

    /* The retry: the same charge (keyed by the order) reports it paid; nothing charged twice. */
    fake_env_again(env);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_true(replayed);
    assert_int_equal(o.status, ORDER_STATUS_PAID);
    assert_int_equal(p->charges, 1);
    order_clear(&o);

    /* Another order, cancelled instead of retried: refunded, not kept. */
    cmd.request_id = "pm-lost-2";
    fake_env_again(env);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed),
                     ORDER_EUNAVAILABLE);
    snprintf(id, sizeof id, "%s", env->store->orders[1].id);
    fake_env_again(env);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "changed my mind", &o), ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(o.pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(fake_payments_refunds(env->stripe, id), 1);
    order_clear(&o);
}

static void test_place_payment_method_needs_stripe(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = stripe_cmd("pm-local-1", &line, "pm_ok");
    cmd.provider = ORDER_PROVIDER_LOCAL;
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 1);
    assert_string_equal(env->err.violations[0].field, "payment_method");
    assert_int_equal(env->store->norders, 0);
    assert_int_equal(env->local->calls[FAKE_PAY_CREATE], 0);
    assert_int_equal(env->stripe->calls[FAKE_PAY_CREATE], 0);
}

/* ---- a payment that succeeds after its order was cancelled ---- */

/* Alice places a LOCAL order (id) and cancels it while its void fails: CANCELLED, payment
 * PENDING; ref gets the payment's reference. */
static void cancel_leaving_payment_pending(fake_env *env, char *id, char *ref)
{
    place_local(env, id);
    snprintf(ref, ORDER_REFERENCE_MAX + 1, "%s", stored(env, id)->pay_reference);
    order_t o = {0};
    env->local->fail[FAKE_PAY_CANCEL] = 1;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_EUNAVAILABLE);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_PENDING);
}

/* Cancelled, but voiding the payment failed: the payer paid meanwhile. Confirming finds
 * the money, records it and gives it back at once; the order stays cancelled. */
static void test_confirm_on_a_cancelled_order_refunds_the_payment(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    char ref[ORDER_REFERENCE_MAX + 1];
    order_t o = {0};
    cancel_leaving_payment_pending(env, id, ref);
    fake_payments_mark_paid(env->local, id);

    fake_env_again(env);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, ref, &o),
                     ORDER_EPRECONDITION);
    assert_null(o.items);
    assert_string_equal(env->err.reason, "PAYMENT_REFUNDED");
    assert_int_equal(env->err.current_status, ORDER_STATUS_CANCELLED);
    assert_string_equal(env->err.precondition_type, "ORDER_STATUS");

    const fake_payment *p = fake_payments_find(env->local, id);
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(s->pay_status, ORDER_PAY_REFUNDED);
    assert_string_equal(s->pay_charge_id, p->charge_id);
    assert_int_equal(s->paid_at_us, p->paid_at_us);
    assert_string_equal(s->refund_id, p->refund_id);
    assert_true(strncmp(s->refund_id, "re_", 3) == 0);
    assert_true(s->refunded_at_us > 0);
    assert_int_equal(p->status, ORDER_PAY_REFUNDED);
    assert_int_equal(p->refunds, 1);
    /* No status change: the cancel is the last history row. */
    assert_int_equal(fake_store_history_last(env->store, id)->to, ORDER_STATUS_CANCELLED);
    assert_int_equal(fake_store_history_count(env->store, id), 2);

    /* Confirming again: still refused, never a second refund. */
    fake_env_again(env);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, ref, &o),
                     ORDER_EPRECONDITION);
    assert_int_equal(env->err.current_status, ORDER_STATUS_CANCELLED);
    assert_int_equal(p->refunds, 1);
    assert_int_equal(env->local->refunded, 1);
}

/* The refund of the late payment fails now: the payment is recorded SUCCEEDED, so that
 * order_settle_due (or the next confirmation) gives it back. */
static void test_confirm_late_payment_refund_fails_now(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    char ref[ORDER_REFERENCE_MAX + 1];
    order_t o = {0};
    cancel_leaving_payment_pending(env, id, ref);
    fake_payments_mark_paid(env->local, id);

    env->local->fail[FAKE_PAY_REFUND] = 1;
    fake_env_again(env);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, ref, &o),
                     ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_REFUNDED");
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(fake_payments_refunds(env->local, id), 0);

    size_t settled = 0;
    fake_env_as(env, "sweeper", ORDER_ROLE_SERVICE);
    assert_int_equal(order_settle_due(&env->svc, &env->ctx, 0, 10, &settled), ORDER_OK);
    assert_int_equal(settled, 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(fake_payments_refunds(env->local, id), 1);
}

/* ConfirmPayment on a cancelled order whose payment was never paid (its void failed):
 * the payment is voided, never verified (for PayPal, verifying is capturing). */
static void test_confirm_on_a_cancelled_unpaid_order_voids_without_verifying(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    char ref[ORDER_REFERENCE_MAX + 1];
    order_t o = {0};
    cancel_leaving_payment_pending(env, id, ref);

    fake_env_again(env);
    int verifies = env->local->calls[FAKE_PAY_VERIFY];
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, ref, &o),
                     ORDER_EPRECONDITION);
    assert_int_equal(env->err.current_status, ORDER_STATUS_CANCELLED);
    assert_int_equal(env->local->calls[FAKE_PAY_VERIFY], verifies);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_VOIDED);
    assert_int_equal(fake_payments_find(env->local, id)->status, ORDER_PAY_VOIDED);
    assert_int_equal(env->local->refunded, 0);
}

/* A payment the provider can neither void nor refund yet (Stripe: processing) leaves the
 * cancelled order's payment PENDING, with CancelOrder answered; the sweeper settles it. */
static void test_cancel_while_the_payment_is_processing_settles_later(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_local(env, id);
    order_t o = {0};
    env->local->fail[FAKE_PAY_CANCEL] = 1;
    env->local->fail_code = ORDER_EPRECONDITION; /* refused, but not "already succeeded" */
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(o.pay_status, ORDER_PAY_PENDING);
    order_clear(&o);
    assert_int_equal(env->local->calls[FAKE_PAY_REFUND], 0);

    size_t settled = 0;
    fake_env_as(env, "sweeper", ORDER_ROLE_SERVICE);
    assert_int_equal(order_settle_due(&env->svc, &env->ctx, 0, 10, &settled), ORDER_OK);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_VOIDED);
    assert_int_equal(env->local->refunded, 0);
}

/* ---- ConfirmPayment racing CancelOrder ---- */

enum who { CONFIRM, CANCEL };

struct race {
    fake_env *env;
    const char *id;
    char ref[ORDER_REFERENCE_MAX + 1];
    enum who inner;
    bool ran;
    int rc;
    char reason[48];
};

static int run(fake_env *env, order_ctx *ctx, enum who what, const char *id, const char *ref)
{
    order_t o = {0};
    int rc = what == CONFIRM
                 ? order_confirm_payment(&env->svc, ctx, id, ORDER_PROVIDER_LOCAL, ref, &o)
                 : order_cancel(&env->svc, ctx, id, "raced", &o);
    order_clear(&o);
    return rc;
}

/* The other request: its own caller, context and error. */
static void race_run(void *arg)
{
    struct race *r = arg;
    order_error *err = calloc(1, sizeof *err);
    assert_non_null(err);
    order_ctx ctx = {.deadline_mono_us = INT64_MAX, .err = err};
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "alice");
    ctx.caller.roles = ORDER_ROLE_CUSTOMER;
    r->ran = true;
    r->rc = run(r->env, &ctx, r->inner, r->id, r->ref);
    snprintf(r->reason, sizeof r->reason, "%s", err->reason);
    free(err);
}

/* Paid and kept, or cancelled with the money back (or never taken): one or the other. */
static void assert_consistent(fake_env *env, const char *id, const char *label)
{
    const order_t *o = stored(env, id);
    const fake_payment *p = fake_payments_find(env->local, id);
    assert_non_null(p);
    if (o->status == ORDER_STATUS_PAID) {
        if (o->pay_status != ORDER_PAY_SUCCEEDED || p->status != ORDER_PAY_SUCCEEDED ||
            p->refunds != 0)
            fail_msg("%s: PAID but payment %d at the provider %d, %d refunds", label, o->pay_status,
                     p->status, p->refunds);
        return;
    }
    if (o->status != ORDER_STATUS_CANCELLED)
        fail_msg("%s: ended %s", label, order_status_name(o->status));
    if (o->pay_status == ORDER_PAY_REFUNDED) {
        if (p->status != ORDER_PAY_REFUNDED || p->refunds != 1 || !o->refund_id[0])
            fail_msg("%s: CANCELLED, REFUNDED, but the provider's payment is %d with %d refunds",
                     label, p->status, p->refunds);
    } else if (o->pay_status == ORDER_PAY_VOIDED) {
        if (p->status != ORDER_PAY_VOIDED || p->refunds != 0)
            fail_msg("%s: CANCELLED, VOIDED, but the provider's payment is %d", label, p->status);
    } else {
        fail_msg("%s: CANCELLED with the payment %d (provider %d): neither kept nor settled", label,
                 o->pay_status, p->status);
    }
}

/* Runs `outer` with `inner` staged inside its call of a store or provider operation. */
static void race_case(fake_env *env, enum who outer, bool at_provider, int op)
{
    char id[ORDER_ID_LEN + 1];
    place_local(env, id);
    struct race r = {
        .env = env, .id = id, .inner = outer == CONFIRM ? CANCEL : CONFIRM, .rc = -100};
    snprintf(r.ref, sizeof r.ref, "%s", stored(env, id)->pay_reference);
    if (at_provider) {
        env->local->hook = race_run;
        env->local->hook_arg = &r;
        env->local->hook_op = (enum fake_pay_op)op;
    } else {
        env->store->hook = race_run;
        env->store->hook_arg = &r;
        env->store->hook_op = (enum fake_store_op)op;
    }
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    int rc = run(env, &env->ctx, outer, id, r.ref);
    env->local->hook = NULL;
    env->store->hook = NULL;

    char label[96];
    snprintf(label, sizeof label, "%s with %s inside its %s op %d",
             outer == CONFIRM ? "confirm" : "cancel", outer == CONFIRM ? "cancel" : "confirm",
             at_provider ? "provider" : "store", op);
    if (!r.ran)
        fail_msg("%s: the other request never ran", label);
    /* No failures were injected: the cancel always succeeds, the confirmation either
     * succeeds or is refused for the order's status. */
    int confirm_rc = outer == CONFIRM ? rc : r.rc;
    int cancel_rc = outer == CANCEL ? rc : r.rc;
    if (cancel_rc != ORDER_OK)
        fail_msg("%s: the cancel answered %s", label, order_code_name(cancel_rc));
    if (confirm_rc != ORDER_OK && confirm_rc != ORDER_EPRECONDITION)
        fail_msg("%s: the confirmation answered %s", label, order_code_name(confirm_rc));
    assert_consistent(env, id, label);
    /* A payer whose money went back is told so. */
    const order_t *o = stored(env, id);
    if (o->pay_status == ORDER_PAY_REFUNDED && confirm_rc == ORDER_EPRECONDITION) {
        const char *reason = outer == CONFIRM ? env->err.reason : r.reason;
        if (strcmp(reason, "PAYMENT_REFUNDED") != 0)
            fail_msg("%s: the payer was refunded but the confirmation said %s", label, reason);
    }
}

/* Every point where one request can get in between the other's steps: the other runs
 * whole inside a store or provider call of the first. */
static void test_race_confirm_and_cancel_every_interleaving(void **state)
{
    fake_env *env = *state;
    static const struct {
        enum who outer;
        bool at_provider;
        int op;
    } cases[] = {
        {CONFIRM, false, FAKE_ORDER_GET},        /* cancelled before the confirmation reads */
        {CONFIRM, true, FAKE_PAY_VERIFY},        /* ... while the provider is asked */
        {CONFIRM, false, FAKE_ORDER_TRANSITION}, /* ... before PAID is written */
        {CANCEL, false, FAKE_ORDER_GET},         /* confirmed before the cancel reads */
        {CANCEL, false, FAKE_ORDER_TRANSITION},  /* ... before CANCELLED is written */
        {CANCEL, true, FAKE_PAY_CANCEL},         /* ... while the payment is being voided */
        {CANCEL, false, FAKE_ORDER_AMEND},       /* ... before VOIDED is written */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        race_case(env, cases[i].outer, cases[i].at_provider, cases[i].op);
    /* Never a second refund anywhere. */
    for (size_t i = 0; i < env->local->npays; i++)
        assert_true(env->local->pays[i].refunds <= 1);
}

/* The cancel wins the update: the order stays cancelled, the money goes back once, and the
 * confirming caller hears why. */
static void test_race_cancel_inside_the_confirmation(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_local(env, id);
    struct race r = {.env = env, .id = id, .inner = CANCEL, .rc = -100};
    snprintf(r.ref, sizeof r.ref, "%s", stored(env, id)->pay_reference);
    env->store->hook = race_run;
    env->store->hook_arg = &r;
    env->store->hook_op = FAKE_ORDER_TRANSITION;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(run(env, &env->ctx, CONFIRM, id, r.ref), ORDER_EPRECONDITION);
    assert_true(r.ran);
    assert_int_equal(r.rc, ORDER_OK);
    assert_string_equal(env->err.reason, "PAYMENT_REFUNDED");
    assert_int_equal(env->err.current_status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(fake_payments_refunds(env->local, id), 1);
    assert_consistent(env, id, "cancel inside confirm");
}

/* The confirmation wins the update: the cancel then cancels a PAID order and refunds it. */
static void test_race_confirm_inside_the_cancel(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_local(env, id);
    struct race r = {.env = env, .id = id, .inner = CONFIRM, .rc = -100};
    snprintf(r.ref, sizeof r.ref, "%s", stored(env, id)->pay_reference);
    env->store->hook = race_run;
    env->store->hook_arg = &r;
    env->store->hook_op = FAKE_ORDER_TRANSITION;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(run(env, &env->ctx, CANCEL, id, r.ref), ORDER_OK);
    assert_true(r.ran);
    assert_int_equal(r.rc, ORDER_OK);
    const fake_history *h = fake_store_history_last(env->store, id);
    assert_int_equal(h->from, ORDER_STATUS_PAID);
    assert_int_equal(h->to, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(fake_payments_refunds(env->local, id), 1);
    assert_consistent(env, id, "confirm inside cancel");
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_place_charges_a_saved_payment_method),
        T(test_place_declined_fails_the_order),
        T(test_place_while_the_charge_is_processing),
        T(test_place_charge_answer_lost_then_retry_or_cancel),
        T(test_place_payment_method_needs_stripe),
        T(test_place_declined_when_the_void_fails),
        T(test_place_declined_with_little_time_left_skips_the_void),
        T(test_place_passes_the_customer_of_a_saved_method),
        T(test_place_customer_needs_a_payment_method),
        T(test_confirm_on_a_cancelled_order_refunds_the_payment),
        T(test_confirm_late_payment_refund_fails_now),
        T(test_confirm_on_a_cancelled_unpaid_order_voids_without_verifying),
        T(test_cancel_while_the_payment_is_processing_settles_later),
        T(test_race_confirm_and_cancel_every_interleaving),
        T(test_race_cancel_inside_the_confirmation),
        T(test_race_confirm_inside_the_cancel),
    };
    return cmocka_run_group_tests_name("pay_flows", tests, NULL, NULL);
}
