/* test_pay_local.c — the LOCAL payment provider on a real PostgreSQL: it refuses to load
 * in production; create is keyed by the order and refuses saved payment methods; verify
 * accepts only the order's own reference and describes the payment; refund and cancel are
 * idempotent (one refund id) and refuse what makes no sense. Last, one place -> confirm ->
 * cancel flow through the domain with the real store and provider. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/clock.h"
#include "payments/payments.h"
#include "pgtest.h"

static struct store *S;
static order_store P;
static order_payments *PAY;

static int group_setup(void **state)
{
    S = pgt_store(5 * 1000000);
    store_order_port(S, &P);
    char err[256];
    PAY = pay_local_create(S, "development", err, sizeof err);
    return PAY ? 0 : -1;
}

static int group_teardown(void **state)
{
    pay_local_destroy(PAY);
    store_close(S);
    return 0;
}

static void place(order_t *o)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "payer", 0);
    char key[64];
    pgt_name(key, sizeof key, "pay");
    pgt_order(o, "payer", 2, 1250);
    bool replayed;
    assert_int_equal(P.order_insert(P.self, &ctx, key, key, o, &replayed), ORDER_OK);
}

static const char *ledger_status(const char *order_id)
{
    static char buf[32];
    PGresult *r = PQexecParams(pgt_conn(), "SELECT status FROM local_payments WHERE order_id = $1",
                               1, NULL, &order_id, NULL, NULL, 0);
    snprintf(buf, sizeof buf, "%s",
             PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 ? PQgetvalue(r, 0, 0)
                                                                       : "none");
    PQclear(r);
    return buf;
}

static void create_payment(const order_t *o, order_payment_action *a)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "payer", 0);
    order_payment_info paid;
    memset(&paid, 0xff, sizeof paid);
    assert_int_equal(PAY->create(PAY->self, &ctx, o, NULL, a, &paid), ORDER_OK);
    assert_int_equal(paid.paid_at_us, 0); /* LOCAL never charges at once */
    assert_string_equal(paid.charge_id, "");
}

static void test_refuses_production(void **state)
{
    char err[256] = "";
    assert_null(pay_local_create(S, "production", err, sizeof err));
    assert_string_equal(err, "the LOCAL payment provider is for development and refuses to load "
                             "when environment is production");
    assert_null(pay_local_create(S, "Production", err, sizeof err));
    order_payments *p = pay_local_create(S, "staging", err, sizeof err);
    assert_non_null(p);
    pay_local_destroy(p);
    pay_local_destroy(NULL);
}

static void test_create_is_keyed_by_order(void **state)
{
    order_t o;
    place(&o);
    order_payment_action a, b;
    create_payment(&o, &a);
    assert_int_equal(a.provider, ORDER_PROVIDER_LOCAL);
    assert_int_equal(strlen(a.reference), 27);
    assert_memory_equal(a.reference, "lp_", 3);
    assert_int_equal(strspn(a.reference + 3, "0123456789abcdef"), 24);
    assert_string_equal(a.client_secret, "");
    assert_string_equal(a.approval_url, "");
    create_payment(&o, &b);
    assert_string_equal(b.reference, a.reference);
    assert_string_equal(ledger_status(o.id), "pending");
    assert_int_equal(
        pgt_scalar("SELECT amount_minor FROM local_payments WHERE order_id = $1", o.id, NULL, NULL),
        o.total_minor);

    /* Another order gets another reference. */
    order_t o2;
    place(&o2);
    create_payment(&o2, &b);
    assert_string_not_equal(b.reference, a.reference);

    /* A saved payment method is a Stripe thing: refused, nothing charged or created. */
    order_t o3;
    place(&o3);
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "payer", 0);
    order_payment_info paid;
    order_saved_method saved = {"pm_card_visa", NULL};
    assert_int_equal(PAY->create(PAY->self, &ctx, &o3, &saved, &b, &paid), ORDER_EINVAL);
    assert_int_equal(e.nviolations, 1);
    assert_string_equal(e.violations[0].field, "payment_method");
    assert_int_equal(paid.paid_at_us, 0);
    assert_string_equal(ledger_status(o3.id), "none");
    order_clear(&o);
    order_clear(&o2);
    order_clear(&o3);
}

static void test_verify_only_the_orders_own_reference(void **state)
{
    order_t o, other;
    place(&o);
    place(&other);
    order_payment_action a, b;
    create_payment(&o, &a);
    create_payment(&other, &b);

    const char *wrong[] = {"lp_000000000000000000000000", b.reference, "", "' OR 1=1 --"};
    for (size_t i = 0; i < sizeof wrong / sizeof *wrong; i++) {
        order_error e;
        order_ctx ctx = pgt_ctx(&e, "payer", 0);
        order_payment_info info = {.paid_at_us = -1};
        assert_int_equal(PAY->verify(PAY->self, &ctx, &o, wrong[i], &info), ORDER_EPRECONDITION);
        assert_string_equal(e.reason, "PAYMENT_NOT_FOUND");
        assert_int_equal(info.paid_at_us, -1);
    }
    assert_string_equal(ledger_status(o.id), "pending");
    assert_string_equal(ledger_status(other.id), "pending");

    /* The order's total must match the payment's. */
    order_t changed = o;
    changed.total_minor += 1;
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "payer", 0);
    order_payment_info info = {0};
    assert_int_equal(PAY->verify(PAY->self, &ctx, &changed, a.reference, &info),
                     ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_AMOUNT_MISMATCH");
    assert_int_equal(info.paid_at_us, 0);
    assert_string_equal(ledger_status(o.id), "pending");

    int64_t before = clock_wall_us();
    ctx = pgt_ctx(&e, "payer", 0);
    assert_int_equal(PAY->verify(PAY->self, &ctx, &o, a.reference, &info), ORDER_OK);
    int64_t paid_at = info.paid_at_us;
    assert_true(paid_at >= before - 5000000 && paid_at <= clock_wall_us() + 5000000);
    assert_string_equal(info.charge_id, a.reference); /* LOCAL: the payment is its own charge */
    assert_string_equal(info.receipt_url, "");
    assert_string_equal(info.provider_status, "succeeded");
    assert_string_equal(ledger_status(o.id), "succeeded");

    /* Again: same answer, same time. */
    order_payment_info again = {0};
    assert_int_equal(PAY->verify(PAY->self, &ctx, &o, a.reference, &again), ORDER_OK);
    assert_int_equal(again.paid_at_us, paid_at);
    assert_string_equal(again.charge_id, a.reference);
    order_clear(&o);
    order_clear(&other);
}

static void test_refund_and_cancel(void **state)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "payer", 0);
    order_payment_info info;
    char refund_id[ORDER_REFERENCE_MAX + 1] = "";

    /* Paid, then refunded (twice: one refund id), and a refunded payment cannot be voided. */
    order_t o;
    place(&o);
    order_payment_action a;
    create_payment(&o, &a);
    assert_int_equal(PAY->refund(PAY->self, &ctx, &o, refund_id),
                     ORDER_EPRECONDITION); /* not paid yet */
    assert_string_equal(refund_id, "");
    assert_string_equal(ledger_status(o.id), "pending");
    ctx = pgt_ctx(&e, "payer", 0);
    assert_int_equal(PAY->verify(PAY->self, &ctx, &o, a.reference, &info), ORDER_OK);
    assert_int_equal(PAY->cancel(PAY->self, &ctx, &o), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_ALREADY_SUCCEEDED");
    assert_string_equal(ledger_status(o.id), "succeeded");
    ctx = pgt_ctx(&e, "payer", 0);
    assert_int_equal(PAY->refund(PAY->self, &ctx, &o, refund_id), ORDER_OK);
    assert_string_equal(ledger_status(o.id), "refunded");
    char expected[ORDER_REFERENCE_MAX + 1];
    snprintf(expected, sizeof expected, "lr_%.24s", a.reference + 3);
    assert_string_equal(refund_id, expected);
    char again[ORDER_REFERENCE_MAX + 1] = "";
    assert_int_equal(PAY->refund(PAY->self, &ctx, &o, again), ORDER_OK);
    assert_string_equal(again, refund_id);
    assert_string_equal(ledger_status(o.id), "refunded");
    assert_int_equal(PAY->cancel(PAY->self, &ctx, &o), ORDER_EPRECONDITION);

    /* Pending, then voided (twice); a voided payment cannot be confirmed or refunded. */
    order_t v;
    place(&v);
    create_payment(&v, &a);
    ctx = pgt_ctx(&e, "payer", 0);
    assert_int_equal(PAY->cancel(PAY->self, &ctx, &v), ORDER_OK);
    assert_string_equal(ledger_status(v.id), "voided");
    assert_int_equal(PAY->cancel(PAY->self, &ctx, &v), ORDER_OK);
    assert_int_equal(PAY->verify(PAY->self, &ctx, &v, a.reference, &info), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_SUCCEEDED");
    ctx = pgt_ctx(&e, "payer", 0);
    assert_int_equal(PAY->refund(PAY->self, &ctx, &v, refund_id), ORDER_EPRECONDITION);
    assert_string_equal(ledger_status(v.id), "voided");

    /* No payment at all: nothing to void; nothing to refund. */
    order_t none;
    place(&none);
    ctx = pgt_ctx(&e, "payer", 0);
    assert_int_equal(PAY->cancel(PAY->self, &ctx, &none), ORDER_OK);
    assert_int_equal(PAY->refund(PAY->self, &ctx, &none, refund_id), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_FOUND");
    assert_string_equal(ledger_status(none.id), "none");
    order_clear(&o);
    order_clear(&v);
    order_clear(&none);
}

/* The domain with the real adapters: place (LOCAL), confirm with a wrong then the right
 * reference, cancel the paid order (refund). */
static void test_domain_flow_with_real_adapters(void **state)
{
    order_service svc = {.cfg = {.tax_rate_bps = 825, .max_total_minor = 100000000}};
    svc.store = P;
    svc.providers[ORDER_PROVIDER_LOCAL] = PAY;
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "admin", 0);
    order_product prod = {.id = "flow-sku",
                          .name = "Flow widget",
                          .unit_price_minor = 1999,
                          .currency = "USD",
                          .active = true};
    order_product stored;
    assert_int_equal(order_product_upsert(&svc, &ctx, &prod, &stored), ORDER_OK);

    ctx = pgt_ctx(&e, "flow-customer", 0);
    ctx.caller.roles = ORDER_ROLE_CUSTOMER;
    order_line_cmd lines[1] = {{.product_id = "flow-sku", .quantity = 3}};
    order_place_cmd cmd = {.request_id = "flow-1",
                           .customer_id = "",
                           .lines = lines,
                           .nlines = 1,
                           .provider = ORDER_PROVIDER_LOCAL};
    order_t o = {0};
    order_payment_action act = {0};
    bool replayed;
    int rc = order_place(&svc, &ctx, &cmd, &o, &act, &replayed);
    if (rc != ORDER_OK)
        fail_msg("order_place: %s", e.message);
    assert_int_equal(o.status, ORDER_STATUS_PENDING);
    assert_int_equal(o.subtotal_minor, 5997);
    assert_int_equal(o.tax_minor, 495); /* 5997 * 8.25% = 494.75 -> 495 */
    assert_int_equal(o.total_minor, 6492);
    assert_int_equal(act.provider, ORDER_PROVIDER_LOCAL);
    assert_string_equal(o.pay_reference, act.reference);
    assert_int_equal(o.pay_status, ORDER_PAY_PENDING);

    /* A retry returns the same order and payment. */
    order_t again = {0};
    order_payment_action act2 = {0};
    ctx = pgt_ctx(&e, "flow-customer", 0);
    ctx.caller.roles = ORDER_ROLE_CUSTOMER;
    assert_int_equal(order_place(&svc, &ctx, &cmd, &again, &act2, &replayed), ORDER_OK);
    assert_true(replayed);
    assert_string_equal(again.id, o.id);
    assert_string_equal(act2.reference, act.reference);
    order_clear(&again);

    order_t paid = {0};
    ctx = pgt_ctx(&e, "flow-customer", 0);
    ctx.caller.roles = ORDER_ROLE_CUSTOMER;
    assert_int_equal(order_confirm_payment(&svc, &ctx, o.id, ORDER_PROVIDER_LOCAL,
                                           "lp_ffffffffffffffffffffffff", &paid),
                     ORDER_EPRECONDITION);
    assert_string_equal(ledger_status(o.id), "pending");
    ctx = pgt_ctx(&e, "flow-customer", 0);
    ctx.caller.roles = ORDER_ROLE_CUSTOMER;
    rc = order_confirm_payment(&svc, &ctx, o.id, ORDER_PROVIDER_LOCAL, act.reference, &paid);
    if (rc != ORDER_OK)
        fail_msg("confirm: %s", e.message);
    assert_int_equal(paid.status, ORDER_STATUS_PAID);
    assert_int_equal(paid.pay_status, ORDER_PAY_SUCCEEDED);
    assert_true(paid.paid_at_us > 0);
    assert_string_equal(paid.pay_charge_id, act.reference);

    order_t cancelled = {0};
    ctx = pgt_ctx(&e, "flow-customer", 0);
    ctx.caller.roles = ORDER_ROLE_CUSTOMER;
    rc = order_cancel(&svc, &ctx, o.id, "no longer needed", &cancelled);
    if (rc != ORDER_OK)
        fail_msg("cancel: %s", e.message);
    assert_int_equal(cancelled.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(cancelled.pay_status, ORDER_PAY_REFUNDED);
    assert_true(strncmp(cancelled.refund_id, "lr_", 3) == 0);
    assert_true(cancelled.refunded_at_us >= paid.paid_at_us);
    assert_string_equal(cancelled.cancel_reason, "no longer needed");
    assert_string_equal(ledger_status(o.id), "refunded");
    assert_int_equal(
        pgt_scalar("SELECT count(*) FROM order_history WHERE order_id = $1", o.id, NULL, NULL), 3);
    order_clear(&o);
    order_clear(&paid);
    order_clear(&cancelled);
}

int main(void)
{
    if (pgt_setup("pay_local", true) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_refuses_production),
        cmocka_unit_test(test_create_is_keyed_by_order),
        cmocka_unit_test(test_verify_only_the_orders_own_reference),
        cmocka_unit_test(test_refund_and_cancel),
        cmocka_unit_test(test_domain_flow_with_real_adapters),
    };
    int failed =
        cmocka_run_group_tests_name("storage_pay_local", tests, group_setup, group_teardown);
    if (failed == 0)
        pgt_teardown();
    return failed ? 1 : 0;
}
