/* test_changes.c — the order_store functions of real payments and inbound events against a
 * real PostgreSQL: order_amend (conditional on the payment status, NULL keeps, version
 * bump, no history), inbound-event dedupe with amendments and transitions (recorded only
 * with a change that happened; a recorded id is ORDER_EDUPLICATE), order_find_by_payment,
 * orders_expire_due (only old PENDING orders, history rows, two replicas sweeping at once
 * never expire one order twice) and orders_unsettled. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "pgtest.h"

#define YEAR_US (365LL * 24 * 3600 * 1000000)

static struct store *S;
static order_store P;

static int group_setup(void **state)
{
    S = pgt_store(5 * 1000000);
    store_order_port(S, &P);
    return 0;
}

static int group_teardown(void **state)
{
    store_close(S);
    return 0;
}

/* ---- helpers ---- */

/* Inserts a fresh PENDING order (LOCAL, no payment yet) for `customer`. */
static void place(order_t *o, const char *customer)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, customer, 0);
    char key[64];
    pgt_name(key, sizeof key, "chg");
    pgt_order(o, customer, 2, 500);
    bool replayed = true;
    assert_int_equal(P.order_insert(P.self, &ctx, key, key, o, &replayed), ORDER_OK);
    assert_false(replayed);
}

static int64_t history_count(const char *order_id)
{
    return pgt_scalar("SELECT count(*) FROM order_history WHERE order_id = $1", order_id, NULL,
                      NULL);
}

static int64_t version_of(const char *order_id)
{
    return pgt_scalar("SELECT version FROM orders WHERE id = $1", order_id, NULL, NULL);
}

static int64_t seen(const char *table, const char *id)
{
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s WHERE id = $1", table);
    return pgt_scalar(sql, id, NULL, NULL);
}

static int amend(const order_amendment *a, order_t *out, order_error *e)
{
    order_ctx ctx = pgt_ctx(e, "svc", 0);
    order_clear(out);
    return P.order_amend(P.self, &ctx, a, out);
}

static int transition(const order_transition *t, order_t *out, order_error *e)
{
    order_ctx ctx = pgt_ctx(e, "svc", 0);
    order_clear(out);
    return P.order_transition(P.self, &ctx, t, out);
}

/* Moves an order to `to` from wherever it is (a legal move). */
static void move(const char *id, order_status from, order_status to)
{
    order_transition t = {.order_id = id,
                          .from_set = ORDER_STATUS_BIT(from),
                          .to = to,
                          .expected_version = -1,
                          .reason = "test"};
    order_t out = {0};
    order_error e;
    assert_int_equal(transition(&t, &out, &e), ORDER_OK);
    order_clear(&out);
}

/* Sets the payment status directly through an unconditional amendment. */
static void set_pay(const char *id, order_pay_status st)
{
    order_amendment a = {.order_id = id, .reference = "pi_set", .pay_status = st};
    order_t out = {0};
    order_error e;
    assert_int_equal(amend(&a, &out, &e), ORDER_OK);
    order_clear(&out);
}

/* Backdates an order's creation (no status change: the outbox trigger does not fire). */
static void backdate(const char *id, const char *interval)
{
    char sql[160];
    snprintf(sql, sizeof sql,
             "UPDATE orders SET created_at = created_at - interval '%s' WHERE id = '%s'", interval,
             id);
    pgt_exec(pgt_conn(), sql);
}

/* ---- order_amend ---- */

static void test_amend_sets_payment_facts(void **state)
{
    order_t o, out = {0};
    place(&o, "amy");
    order_error e;

    /* The payment is created: only from "no payment yet" or PENDING. */
    order_amendment created = {.order_id = o.id,
                               .pay_from_set = ORDER_PAY_BIT(ORDER_PAY_UNSPECIFIED) |
                                               ORDER_PAY_BIT(ORDER_PAY_PENDING),
                               .provider = ORDER_PROVIDER_STRIPE,
                               .reference = "pi_amend_1",
                               .pay_status = ORDER_PAY_PENDING};
    assert_int_equal(amend(&created, &out, &e), ORDER_OK);
    assert_int_equal(out.version, 2);
    assert_int_equal(out.status, ORDER_STATUS_PENDING);
    assert_int_equal(out.pay_provider, ORDER_PROVIDER_STRIPE);
    assert_string_equal(out.pay_reference, "pi_amend_1");
    assert_int_equal(out.pay_status, ORDER_PAY_PENDING);
    assert_int_equal(out.nitems, 2);
    assert_true(out.updated_at_us > o.updated_at_us);

    /* It succeeds: time, charge and receipt; the rest stays. */
    order_amendment paid = {.order_id = o.id,
                            .pay_from_set = ORDER_PAY_BIT(ORDER_PAY_PENDING),
                            .pay_status = ORDER_PAY_SUCCEEDED,
                            .paid_at_us = 1700000000123456LL,
                            .charge_id = "ch_amend_1",
                            .receipt_url = "https://pay.example/receipts/1"};
    assert_int_equal(amend(&paid, &out, &e), ORDER_OK);
    assert_int_equal(out.version, 3);
    assert_int_equal(out.pay_provider, ORDER_PROVIDER_STRIPE);
    assert_string_equal(out.pay_reference, "pi_amend_1");
    assert_int_equal(out.pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(out.paid_at_us, 1700000000123456LL);
    assert_string_equal(out.pay_charge_id, "ch_amend_1");
    assert_string_equal(out.pay_receipt_url, "https://pay.example/receipts/1");
    assert_string_equal(out.refund_id, "");
    assert_int_equal(out.refunded_at_us, 0);

    /* Refunded. */
    order_amendment refunded = {.order_id = o.id,
                                .pay_from_set = ORDER_PAY_BIT(ORDER_PAY_SUCCEEDED),
                                .pay_status = ORDER_PAY_REFUNDED,
                                .refund_id = "re_amend_1",
                                .refunded_at_us = 1700000100654321LL};
    assert_int_equal(amend(&refunded, &out, &e), ORDER_OK);
    assert_int_equal(out.version, 4);
    assert_int_equal(out.pay_status, ORDER_PAY_REFUNDED);
    assert_string_equal(out.refund_id, "re_amend_1");
    assert_int_equal(out.refunded_at_us, 1700000100654321LL);
    assert_string_equal(out.pay_charge_id, "ch_amend_1");

    /* Stock reserved: any payment status (pay_from_set 0). */
    order_amendment reserved = {.order_id = o.id, .stock_reserved_at_us = 1700000200000001LL};
    assert_int_equal(amend(&reserved, &out, &e), ORDER_OK);
    assert_int_equal(out.version, 5);
    assert_int_equal(out.stock_reserved_at_us, 1700000200000001LL);
    assert_int_equal(out.pay_status, ORDER_PAY_REFUNDED);

    /* What a reader sees is the same; no status changed, so no history rows. */
    order_t g = {0};
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    assert_int_equal(P.order_get(P.self, &ctx, o.id, &g), ORDER_OK);
    assert_int_equal(g.version, 5);
    assert_string_equal(g.refund_id, "re_amend_1");
    assert_int_equal(g.stock_reserved_at_us, 1700000200000001LL);
    assert_int_equal(g.paid_at_us, 1700000000123456LL);
    assert_int_equal(g.status, ORDER_STATUS_PENDING);
    assert_int_equal(history_count(o.id), 1);
    order_clear(&g);
    order_clear(&out);
    order_clear(&o);
}

static void test_amend_is_conditional_on_the_payment_status(void **state)
{
    order_t o, out = {0};
    place(&o, "ben");
    order_error e;

    /* No payment yet: a set without "none" refuses. */
    order_amendment a = {.order_id = o.id,
                         .pay_from_set = ORDER_PAY_BIT(ORDER_PAY_PENDING),
                         .pay_status = ORDER_PAY_VOIDED};
    assert_int_equal(amend(&a, &out, &e), ORDER_EPRECONDITION);
    assert_int_equal(e.code, ORDER_EPRECONDITION);
    assert_string_equal(e.precondition_type, "PAYMENT_STATUS");
    assert_string_equal(e.precondition_subject, o.id);
    assert_int_equal(e.current_status, ORDER_STATUS_PENDING);
    assert_int_equal(out.version, 1); /* the current order */
    assert_int_equal(out.pay_status, ORDER_PAY_UNSPECIFIED);
    assert_int_equal(out.nitems, 2);
    assert_int_equal(version_of(o.id), 1);

    set_pay(o.id, ORDER_PAY_SUCCEEDED); /* version 2 */
    a.pay_from_set = ORDER_PAY_BIT(ORDER_PAY_PENDING) | ORDER_PAY_BIT(ORDER_PAY_UNSPECIFIED);
    assert_int_equal(amend(&a, &out, &e), ORDER_EPRECONDITION);
    assert_int_equal(out.pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(version_of(o.id), 2);

    a.pay_from_set |= ORDER_PAY_BIT(ORDER_PAY_SUCCEEDED);
    assert_int_equal(amend(&a, &out, &e), ORDER_OK);
    assert_int_equal(out.pay_status, ORDER_PAY_VOIDED);
    assert_int_equal(out.version, 3);
    order_clear(&out);
    order_clear(&o);
}

static void test_amend_missing_order(void **state)
{
    order_error e;
    order_t out = {0};
    order_amendment a = {.order_id = "00000000-0000-4000-8000-00000000dead",
                         .pay_status = ORDER_PAY_VOIDED};
    assert_int_equal(amend(&a, &out, &e), ORDER_ENOTFOUND);
    a.order_id = "garbage";
    assert_int_equal(amend(&a, &out, &e), ORDER_ENOTFOUND);
    assert_null(out.items);
}

/* ---- inbound events ---- */

static void test_amend_inbound_dedupe(void **state)
{
    order_t o, other, out = {0};
    place(&o, "cid");
    place(&other, "cid");
    order_error e;
    char id[64];
    pgt_name(id, sizeof id, "stock.reserved");
    order_inbound in = {ORDER_INBOUND_INVENTORY, id};
    order_amendment a = {
        .order_id = o.id, .stock_reserved_at_us = 1700000000000001LL, .inbound = &in};
    assert_int_equal(amend(&a, &out, &e), ORDER_OK);
    assert_int_equal(out.version, 2);
    assert_int_equal(seen("processed_inventory_replies", id), 1);

    /* The same reply again, even about another order: a duplicate that changes nothing. */
    a.stock_reserved_at_us = 1700000000000002LL;
    assert_int_equal(amend(&a, &out, &e), ORDER_EDUPLICATE);
    assert_int_equal(e.code, ORDER_EDUPLICATE);
    assert_int_equal(out.version, 2); /* the current order */
    assert_int_equal(out.stock_reserved_at_us, 1700000000000001LL);
    a.order_id = other.id;
    assert_int_equal(amend(&a, &out, &e), ORDER_EDUPLICATE);
    assert_int_equal(version_of(o.id), 2);
    assert_int_equal(version_of(other.id), 1);

    /* Provider events and inventory replies are kept apart. */
    order_inbound as_provider = {ORDER_INBOUND_PROVIDER, id};
    a.inbound = &as_provider;
    assert_int_equal(amend(&a, &out, &e), ORDER_OK);
    assert_int_equal(seen("processed_provider_events", id), 1);
    order_clear(&out);
    order_clear(&o);
    order_clear(&other);
}

/* An amendment refused by its condition does not record the event: the same event, once
 * it applies, still does. */
static void test_amend_refused_does_not_record_the_event(void **state)
{
    order_t o, out = {0};
    place(&o, "dora");
    set_pay(o.id, ORDER_PAY_PENDING); /* version 2 */
    order_error e;
    char id[64];
    pgt_name(id, sizeof id, "evt_refund");
    order_inbound in = {ORDER_INBOUND_PROVIDER, id};
    order_amendment a = {.order_id = o.id,
                         .pay_from_set = ORDER_PAY_BIT(ORDER_PAY_SUCCEEDED),
                         .pay_status = ORDER_PAY_REFUNDED,
                         .refund_id = "re_dora",
                         .inbound = &in};
    assert_int_equal(amend(&a, &out, &e), ORDER_EPRECONDITION);
    assert_int_equal(seen("processed_provider_events", id), 0);
    assert_int_equal(version_of(o.id), 2);

    set_pay(o.id, ORDER_PAY_SUCCEEDED); /* version 3 */
    assert_int_equal(amend(&a, &out, &e), ORDER_OK);
    assert_int_equal(out.pay_status, ORDER_PAY_REFUNDED);
    assert_string_equal(out.refund_id, "re_dora");
    assert_int_equal(out.version, 4);
    assert_int_equal(seen("processed_provider_events", id), 1);

    assert_int_equal(amend(&a, &out, &e), ORDER_EDUPLICATE);
    assert_int_equal(version_of(o.id), 4);
    order_clear(&out);
    order_clear(&o);
}

static void test_transition_inbound_dedupe(void **state)
{
    order_t o, out = {0};
    place(&o, "eve");
    order_error e;
    char evt[64], late[64];
    pgt_name(evt, sizeof evt, "evt_paid");
    pgt_name(late, sizeof late, "evt_later");
    order_inbound in = {ORDER_INBOUND_PROVIDER, evt};
    order_transition pay = {.order_id = o.id,
                            .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                            .to = ORDER_STATUS_PAID,
                            .expected_version = -1,
                            .reason = "payment succeeded (provider webhook)",
                            .pay_status = ORDER_PAY_SUCCEEDED,
                            .paid_at_us = 1700000000000042LL,
                            .charge_id = "ch_eve",
                            .receipt_url = "https://pay.example/r/eve",
                            .inbound = &in};
    assert_int_equal(transition(&pay, &out, &e), ORDER_OK);
    assert_int_equal(out.status, ORDER_STATUS_PAID);
    assert_string_equal(out.pay_charge_id, "ch_eve");
    assert_string_equal(out.pay_receipt_url, "https://pay.example/r/eve");
    assert_int_equal(out.paid_at_us, 1700000000000042LL);
    assert_int_equal(seen("processed_provider_events", evt), 1);
    int64_t outbox =
        pgt_scalar("SELECT count(*) FROM outbox WHERE order_id = $1", o.id, NULL, NULL);

    /* The same event id on any transition: a duplicate, before any status check. */
    order_transition ship = {.order_id = o.id,
                             .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PAID),
                             .to = ORDER_STATUS_SHIPPED,
                             .expected_version = -1,
                             .reason = "shipped",
                             .inbound = &in};
    assert_int_equal(transition(&ship, &out, &e), ORDER_EDUPLICATE);
    assert_int_equal(out.status, ORDER_STATUS_PAID);
    assert_int_equal(out.version, 2);
    assert_int_equal(transition(&pay, &out, &e), ORDER_EDUPLICATE);
    assert_int_equal(history_count(o.id), 2);
    assert_int_equal(version_of(o.id), 2);
    assert_int_equal(
        pgt_scalar("SELECT count(*) FROM outbox WHERE order_id = $1", o.id, NULL, NULL), outbox);

    /* A refused transition does not record its event; applied later, it counts. */
    order_inbound in2 = {ORDER_INBOUND_PROVIDER, late};
    order_transition expire = {.order_id = o.id,
                               .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                               .to = ORDER_STATUS_EXPIRED,
                               .expected_version = -1,
                               .reason = "x",
                               .inbound = &in2};
    assert_int_equal(transition(&expire, &out, &e), ORDER_EPRECONDITION);
    assert_int_equal(e.current_status, ORDER_STATUS_PAID);
    assert_int_equal(seen("processed_provider_events", late), 0);
    ship.inbound = &in2;
    assert_int_equal(transition(&ship, &out, &e), ORDER_OK);
    assert_int_equal(out.status, ORDER_STATUS_SHIPPED);
    assert_int_equal(seen("processed_provider_events", late), 1);
    order_clear(&out);
    order_clear(&o);
}

/* Two deliveries of the same inbound event at once, both reaching the order's row lock:
 * the change is made once. */
struct deliverer {
    pthread_barrier_t *go;
    order_amendment a;
    order_inbound in;
    int rc;
    int64_t version;
};

static void *deliver(void *arg)
{
    struct deliverer *d = arg;
    char err[256];
    struct store *s = store_open(pgt_dsn(), 10 * 1000000, err, sizeof err);
    assert_non_null(s);
    order_store port;
    store_order_port(s, &port);
    order_error *e = calloc(1, sizeof *e);
    order_ctx ctx = pgt_ctx(e, "inventory", 0);
    order_t out = {0};
    store_ping(s); /* connected before the race starts */
    pthread_barrier_wait(d->go);
    d->rc = port.order_amend(port.self, &ctx, &d->a, &out);
    d->version = out.version;
    order_clear(&out);
    free(e);
    store_close(s);
    return NULL;
}

static int64_t waiting_on_locks(void)
{
    return pgt_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND "
                      "wait_event_type = 'Lock'",
                      pgt_appname(), NULL, NULL);
}

static void test_amend_same_event_delivered_twice_at_once(void **state)
{
    order_t o;
    place(&o, "fay");
    char id[64];
    pgt_name(id, sizeof id, "stock.reserved.twice");

    /* Hold the order's row so that both deliveries queue behind it. */
    PGconn *holder = PQconnectdb(pgt_dsn());
    assert_int_equal(PQstatus(holder), CONNECTION_OK);
    pgt_exec(holder, "BEGIN");
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT 1 FROM orders WHERE id = '%s' FOR UPDATE", o.id);
    pgt_exec(holder, sql);

    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, 3);
    struct deliverer d[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        d[i] = (struct deliverer){.go = &go, .rc = -100};
        d[i].in = (order_inbound){ORDER_INBOUND_INVENTORY, id};
        d[i].a = (order_amendment){
            .order_id = o.id, .stock_reserved_at_us = 1700000000000000LL + i, .inbound = &d[i].in};
        pthread_create(&th[i], NULL, deliver, &d[i]);
    }
    pthread_barrier_wait(&go);
    for (int i = 0; i < 500 && waiting_on_locks() < 2; i++)
        usleep(10000);
    int64_t waiting = waiting_on_locks();
    pgt_exec(holder, "COMMIT");
    PQfinish(holder);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&go);
    assert_int_equal(waiting, 2); /* the race really happened */

    int ok = (d[0].rc == ORDER_OK) + (d[1].rc == ORDER_OK);
    int dup = (d[0].rc == ORDER_EDUPLICATE) + (d[1].rc == ORDER_EDUPLICATE);
    if (ok != 1 || dup != 1 || version_of(o.id) != 2)
        fail_msg("the same reply, delivered twice at once: answers %s and %s, version %lld "
                 "(want one OK, one ALREADY_APPLIED, version 2)",
                 order_code_name(d[0].rc), order_code_name(d[1].rc), (long long)version_of(o.id));
    order_clear(&o);
}

/* ---- order_find_by_payment ---- */

static void test_find_by_payment(void **state)
{
    order_t o, other, out = {0};
    place(&o, "gil");
    place(&other, "gil");
    char ref[64], charge[64];
    pgt_name(ref, sizeof ref, "pi_find");
    pgt_name(charge, sizeof charge, "ch_find");
    order_error e;
    order_amendment a = {.order_id = o.id,
                         .provider = ORDER_PROVIDER_STRIPE,
                         .reference = ref,
                         .pay_status = ORDER_PAY_SUCCEEDED,
                         .charge_id = charge};
    assert_int_equal(amend(&a, &out, &e), ORDER_OK);
    order_ctx ctx = pgt_ctx(&e, "webhooks", 0);

    order_clear(&out);
    assert_int_equal(P.order_find_by_payment(P.self, &ctx, ORDER_PROVIDER_STRIPE, ref, &out),
                     ORDER_OK);
    assert_string_equal(out.id, o.id);
    assert_int_equal(out.nitems, 2);
    assert_string_equal(out.pay_charge_id, charge);
    order_clear(&out);
    assert_int_equal(P.order_find_by_payment(P.self, &ctx, ORDER_PROVIDER_STRIPE, charge, &out),
                     ORDER_OK);
    assert_string_equal(out.id, o.id);
    assert_int_equal(out.nitems, 2);
    order_clear(&out);

    /* Another provider's, unknown, or empty: none. */
    assert_int_equal(P.order_find_by_payment(P.self, &ctx, ORDER_PROVIDER_PAYPAL, ref, &out),
                     ORDER_ENOTFOUND);
    assert_int_equal(
        P.order_find_by_payment(P.self, &ctx, ORDER_PROVIDER_STRIPE, "pi_nobody", &out),
        ORDER_ENOTFOUND);
    assert_int_equal(P.order_find_by_payment(P.self, &ctx, ORDER_PROVIDER_STRIPE, "", &out),
                     ORDER_ENOTFOUND);
    assert_int_equal(
        P.order_find_by_payment(P.self, &ctx, ORDER_PROVIDER_STRIPE, "' OR true --", &out),
        ORDER_ENOTFOUND);
    assert_null(out.items);
    order_clear(&o);
    order_clear(&other);
}

/* ---- orders_expire_due ---- */

static int expire_due(int64_t before_us, size_t max, order_t **rows, size_t *n)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "sweeper", 0);
    return P.orders_expire_due(P.self, &ctx, before_us, "expired: unpaid for 900 s", max, rows, n);
}

static void test_expire_due_only_old_pending(void **state)
{
    order_t old, old_paid, old_cancelled, young;
    place(&old, "hal");
    place(&old_paid, "hal");
    place(&old_cancelled, "hal");
    place(&young, "hal");
    move(old_paid.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID);
    move(old_cancelled.id, ORDER_STATUS_PENDING, ORDER_STATUS_CANCELLED);
    backdate(old.id, "10 years");
    backdate(old_paid.id, "10 years");
    backdate(old_cancelled.id, "10 years");

    order_t *rows = NULL;
    size_t n = 99;
    int64_t cutoff = clock_wall_us() - 9 * YEAR_US;
    assert_int_equal(expire_due(cutoff, 100, &rows, &n), ORDER_OK);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].id, old.id);
    assert_int_equal(rows[0].status, ORDER_STATUS_EXPIRED);
    assert_string_equal(rows[0].cancel_reason, "expired: unpaid for 900 s");
    assert_int_equal(rows[0].version, 2);
    assert_int_equal(rows[0].nitems, 2);
    assert_string_equal(rows[0].items[1].product_id, "sku-2");
    order_list_free(rows, n);

    assert_int_equal(pgt_scalar("SELECT count(*) FROM order_history WHERE order_id = $1 AND "
                                "from_status = 'pending' AND to_status = 'expired' AND actor = "
                                "'sweeper' AND reason = 'expired: unpaid for 900 s'",
                                old.id, NULL, NULL),
                     1);
    assert_int_equal(version_of(old_paid.id), 2);
    assert_int_equal(version_of(old_cancelled.id), 2);
    assert_int_equal(version_of(young.id), 1);
    assert_int_equal(history_count(young.id), 1);

    /* Nothing left to expire. */
    rows = NULL;
    assert_int_equal(expire_due(cutoff, 100, &rows, &n), ORDER_OK);
    assert_int_equal(n, 0);
    assert_null(rows);
    order_clear(&old);
    order_clear(&old_paid);
    order_clear(&old_cancelled);
    order_clear(&young);
}

static void test_expire_due_oldest_first_at_most_max(void **state)
{
    order_t a, b, c;
    place(&a, "ivy");
    place(&b, "ivy");
    place(&c, "ivy");
    backdate(a.id, "10 years 3 days");
    backdate(b.id, "10 years 2 days");
    backdate(c.id, "10 years 1 day");
    int64_t cutoff = clock_wall_us() - 9 * YEAR_US;
    order_t *rows = NULL;
    size_t n = 0;
    assert_int_equal(expire_due(cutoff, 2, &rows, &n), ORDER_OK);
    assert_int_equal(n, 2);
    assert_string_equal(rows[0].id, a.id);
    assert_string_equal(rows[1].id, b.id);
    order_list_free(rows, n);
    assert_int_equal(version_of(c.id), 1);
    assert_int_equal(expire_due(cutoff, 2, &rows, &n), ORDER_OK);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].id, c.id);
    order_list_free(rows, n);
    order_clear(&a);
    order_clear(&b);
    order_clear(&c);
}

/* Two replicas sweep at once, in batches: every old order expires exactly once. */
#define SWEEP_ORDERS 40

struct sweeper {
    pthread_barrier_t *go;
    int64_t cutoff;
    size_t expired;
    int failures;
};

static void *sweep(void *arg)
{
    struct sweeper *w = arg;
    char err[256];
    struct store *s = store_open(pgt_dsn(), 10 * 1000000, err, sizeof err);
    assert_non_null(s);
    order_store port;
    store_order_port(s, &port);
    order_error *e = calloc(1, sizeof *e);
    store_ping(s);
    pthread_barrier_wait(w->go);
    for (;;) {
        order_ctx ctx = pgt_ctx(e, "sweeper", 0);
        order_t *rows = NULL;
        size_t n = 0;
        int rc = port.orders_expire_due(port.self, &ctx, w->cutoff, "expired", 3, &rows, &n);
        order_list_free(rows, n);
        if (rc != ORDER_OK) {
            if (++w->failures > 20)
                break;
            continue;
        }
        if (n == 0)
            break;
        w->expired += n;
    }
    free(e);
    store_close(s);
    return NULL;
}

static void test_expire_due_two_replicas_at_once(void **state)
{
    char customer[64];
    pgt_name(customer, sizeof customer, "sweep");
    for (int i = 0; i < SWEEP_ORDERS; i++) {
        order_t o;
        place(&o, customer);
        backdate(o.id, "20 years");
        order_clear(&o);
    }
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, 2);
    struct sweeper w[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        w[i] = (struct sweeper){.go = &go, .cutoff = clock_wall_us() - 19 * YEAR_US};
        pthread_create(&th[i], NULL, sweep, &w[i]);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&go);

    assert_int_equal(w[0].failures + w[1].failures, 0);
    assert_int_equal(w[0].expired + w[1].expired, SWEEP_ORDERS);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM order_history h JOIN orders o ON o.id = "
                                "h.order_id WHERE o.customer_id = $1 AND h.to_status = 'expired'",
                                customer, NULL, NULL),
                     SWEEP_ORDERS);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM orders WHERE customer_id = $1 AND status = "
                                "'expired' AND version = 2",
                                customer, NULL, NULL),
                     SWEEP_ORDERS);
}

/* ---- orders_unsettled ---- */

static bool has(const order_t *rows, size_t n, const char *id)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(rows[i].id, id) == 0)
            return true;
    return false;
}

static void test_unsettled(void **state)
{
    static const struct {
        order_status status;
        order_pay_status pay;
        bool owed;
    } cases[] = {
        {ORDER_STATUS_CANCELLED, ORDER_PAY_PENDING, true},
        {ORDER_STATUS_CANCELLED, ORDER_PAY_SUCCEEDED, true},
        {ORDER_STATUS_EXPIRED, ORDER_PAY_PENDING, true},
        {ORDER_STATUS_FAILED, ORDER_PAY_SUCCEEDED, true},
        {ORDER_STATUS_CANCELLED, ORDER_PAY_REFUNDED, false},
        {ORDER_STATUS_CANCELLED, ORDER_PAY_VOIDED, false},
        {ORDER_STATUS_FAILED, ORDER_PAY_FAILED, false},
        {ORDER_STATUS_CANCELLED, ORDER_PAY_UNSPECIFIED, false},
        {ORDER_STATUS_PAID, ORDER_PAY_SUCCEEDED, false},
        {ORDER_STATUS_PENDING, ORDER_PAY_PENDING, false},
    };
    enum { N = sizeof cases / sizeof *cases };
    order_t o[N];
    int64_t before_changes = clock_wall_us();
    for (int i = 0; i < N; i++) {
        place(&o[i], "jon");
        if (cases[i].pay != ORDER_PAY_UNSPECIFIED)
            set_pay(o[i].id, cases[i].pay);
        if (cases[i].status != ORDER_STATUS_PENDING)
            move(o[i].id, ORDER_STATUS_PENDING, cases[i].status);
    }
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "sweeper", 0);
    order_t *rows = NULL;
    size_t n = 0;
    assert_int_equal(P.orders_unsettled(P.self, &ctx, clock_wall_us() + 1000000, 500, &rows, &n),
                     ORDER_OK);
    for (int i = 0; i < N; i++)
        if (has(rows, n, o[i].id) != cases[i].owed)
            fail_msg("case %d (%s, payment %s): %s", i, order_status_name(cases[i].status),
                     order_pay_status_name(cases[i].pay) ? order_pay_status_name(cases[i].pay)
                                                         : "none",
                     cases[i].owed ? "not listed" : "listed");
    for (size_t i = 0; i < n; i++)
        if (strcmp(rows[i].customer_id, "jon") == 0)
            assert_true(rows[i].nitems == 2);
    order_list_free(rows, n);

    /* Changed after the cutoff: not yet. */
    rows = NULL;
    assert_int_equal(P.orders_unsettled(P.self, &ctx, before_changes, 500, &rows, &n), ORDER_OK);
    for (int i = 0; i < N; i++)
        assert_false(has(rows, n, o[i].id));
    order_list_free(rows, n);

    /* At most max. */
    rows = NULL;
    assert_int_equal(P.orders_unsettled(P.self, &ctx, clock_wall_us() + 1000000, 1, &rows, &n),
                     ORDER_OK);
    assert_int_equal(n, 1);
    order_list_free(rows, n);
    for (int i = 0; i < N; i++)
        order_clear(&o[i]);
}

int main(void)
{
    if (pgt_setup("changes", true) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_amend_sets_payment_facts),
        cmocka_unit_test(test_amend_is_conditional_on_the_payment_status),
        cmocka_unit_test(test_amend_missing_order),
        cmocka_unit_test(test_amend_inbound_dedupe),
        cmocka_unit_test(test_amend_refused_does_not_record_the_event),
        cmocka_unit_test(test_transition_inbound_dedupe),
        cmocka_unit_test(test_amend_same_event_delivered_twice_at_once),
        cmocka_unit_test(test_find_by_payment),
        cmocka_unit_test(test_expire_due_only_old_pending),
        cmocka_unit_test(test_expire_due_oldest_first_at_most_max),
        cmocka_unit_test(test_expire_due_two_replicas_at_once),
        cmocka_unit_test(test_unsettled),
    };
    int failed = cmocka_run_group_tests_name("storage_changes", tests, group_setup, group_teardown);
    if (failed == 0)
        pgt_teardown(); /* keep the schema of a failed run to look at */
    return failed ? 1 : 0;
}
