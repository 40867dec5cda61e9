/* test_outbox.c — the events the orders trigger (migration 0002) writes to the outbox in
 * the same transaction as the change: placing an order writes stock.reserve then
 * order.placed; PAID writes stock.commit + order.paid; CANCELLED / EXPIRED / FAILED write
 * stock.restore + order.<status>; SHIPPED / DELIVERED write order.<status>; a change that
 * moves nothing (a refused transition, an amendment, a duplicate event) writes nothing.
 * Each payload is the whole message body: event_id (= the row's id), type, schema_version,
 * occurred_at (RFC 3339, UTC), order_id, customer_id, and lines (stock events) or the
 * status and money (order events). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/clock.h"
#include "pgtest.h"

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

static void place(order_t *o, const char *customer, int nitems)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, customer, 0);
    char key[64];
    pgt_name(key, sizeof key, "obx");
    pgt_order(o, customer, nitems, 1250);
    bool replayed = true;
    assert_int_equal(P.order_insert(P.self, &ctx, key, key, o, &replayed), ORDER_OK);
}

static int move(const char *id, order_status from, order_status to, const char *reason)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    order_transition t = {.order_id = id,
                          .from_set = ORDER_STATUS_BIT(from),
                          .to = to,
                          .expected_version = -1,
                          .reason = reason};
    order_t out = {0};
    int rc = P.order_transition(P.self, &ctx, &t, &out);
    order_clear(&out);
    return rc;
}

/* Text of row 0, column 0 of a query with up to 2 parameters ("" if none or NULL). */
static const char *text(const char *sql, const char *p1, const char *p2)
{
    static char buf[2048];
    const char *params[2] = {p1, p2};
    PGresult *r = PQexecParams(pgt_conn(), sql, p2 ? 2 : p1 ? 1 : 0, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
        PQclear(r);
        fail_msg("query failed: %s: %s", sql, msg);
    }
    snprintf(buf, sizeof buf, "%s", PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
    return buf;
}

/* The routing keys of an order's events in outbox order (seq), space-separated. */
static const char *events_of(const char *order_id)
{
    return text("SELECT coalesce(string_agg(routing_key, ' ' ORDER BY seq), '') FROM outbox "
                "WHERE order_id = $1",
                order_id, NULL);
}

/* The id of an order's latest event with this routing key. */
static const char *event_id(const char *order_id, const char *rk)
{
    return text("SELECT id::text FROM outbox WHERE order_id = $1 AND routing_key = $2 ORDER BY "
                "seq DESC LIMIT 1",
                order_id, rk);
}

/* A payload field as text (payload->>field) of the event with this id. */
static const char *field(const char *eid, const char *name)
{
    return text("SELECT coalesce(payload->>$2, '<absent>') FROM outbox WHERE id = $1::uuid", eid,
                name);
}

/* The JSON type of a payload field ("string", "number", "array", or "" if absent). */
static const char *type_of(const char *eid, const char *name)
{
    return text("SELECT coalesce(jsonb_typeof(payload->$2), '') FROM outbox WHERE id = $1::uuid",
                eid, name);
}

static void assert_envelope(const char *eid, const char *rk, const order_t *o)
{
    char id[64];
    snprintf(id, sizeof id, "%s", eid);
    assert_string_equal(field(id, "event_id"), id);
    assert_string_equal(field(id, "type"), rk);
    assert_string_equal(type_of(id, "schema_version"), "number");
    assert_string_equal(field(id, "schema_version"), "1");
    assert_string_equal(field(id, "order_id"), o->id);
    assert_string_equal(field(id, "customer_id"), o->customer_id);
    /* RFC 3339 in UTC with microseconds, the row's own creation time. */
    assert_string_equal(
        text("SELECT (payload->>'occurred_at' ~ "
             "'^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z$')::text "
             "FROM outbox WHERE id = $1::uuid",
             id, NULL),
        "true");
    assert_string_equal(
        text("SELECT (abs(extract(epoch FROM (payload->>'occurred_at')::timestamptz "
             "- created_at)) < 0.000002)::text FROM outbox WHERE id = $1::uuid",
             id, NULL),
        "true");
}

static void assert_stock_event(const order_t *o, const char *rk)
{
    char id[64];
    snprintf(id, sizeof id, "%s", event_id(o->id, rk));
    assert_true(id[0] != '\0');
    assert_envelope(id, rk, o);
    /* The lines, in order: what inventory reserves, commits or restores. */
    char want[1024] = "[";
    size_t off = 1;
    for (size_t i = 0; i < o->nitems; i++)
        off += (size_t)snprintf(want + off, sizeof want - off,
                                "%s{\"product_id\": \"%s\", \"quantity\": %d}", i ? ", " : "",
                                o->items[i].product_id, (int)o->items[i].quantity);
    snprintf(want + off, sizeof want - off, "]");
    const char *same = text("SELECT (payload->'lines' = $2::jsonb)::text FROM outbox WHERE id = "
                            "$1::uuid",
                            id, want);
    if (strcmp(same, "true") != 0)
        fail_msg("%s lines: %s, want %s", rk,
                 text("SELECT (payload->'lines')::text FROM outbox WHERE id = $1::uuid", id, NULL),
                 want);
    assert_string_equal(type_of(id, "status"), "");
    assert_string_equal(type_of(id, "total_minor"), "");
}

static void assert_order_event(const order_t *o, const char *rk, const char *status)
{
    char id[64], num[32];
    snprintf(id, sizeof id, "%s", event_id(o->id, rk));
    assert_true(id[0] != '\0');
    assert_envelope(id, rk, o);
    assert_string_equal(field(id, "status"), status);
    assert_string_equal(field(id, "currency"), o->currency);
    assert_string_equal(type_of(id, "subtotal_minor"), "number");
    snprintf(num, sizeof num, "%lld", (long long)o->subtotal_minor);
    assert_string_equal(field(id, "subtotal_minor"), num);
    snprintf(num, sizeof num, "%lld", (long long)o->tax_minor);
    assert_string_equal(field(id, "tax_minor"), num);
    snprintf(num, sizeof num, "%lld", (long long)o->total_minor);
    assert_string_equal(field(id, "total_minor"), num);
    assert_string_equal(type_of(id, "lines"), "");
}

/* ---- tests ---- */

static void test_placing_writes_reserve_then_placed(void **state)
{
    order_t o;
    place(&o, "olga", 3);
    assert_string_equal(events_of(o.id), "stock.reserve order.placed");
    assert_stock_event(&o, "stock.reserve");
    assert_order_event(&o, "order.placed", "pending");
    assert_string_equal(field(event_id(o.id, "order.placed"), "version"), "1");
    /* Unpublished, ready for the relay. */
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE order_id = $1 AND published_at "
                                "IS NULL AND attempts = 0",
                                o.id, NULL, NULL),
                     2);

    /* A replayed insert is not a new order: no new events. */
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "olga", 0);
    order_t again;
    pgt_order(&again, "olga", 3, 1250);
    bool replayed = false;
    assert_int_equal(P.order_insert(P.self, &ctx, "obx-replay", "fp", &again, &replayed), ORDER_OK);
    order_t third;
    pgt_order(&third, "olga", 3, 1250);
    assert_int_equal(P.order_insert(P.self, &ctx, "obx-replay", "fp", &third, &replayed), ORDER_OK);
    assert_true(replayed);
    assert_string_equal(events_of(again.id), "stock.reserve order.placed");
    order_clear(&o);
    order_clear(&again);
    order_clear(&third);
}

static void test_paid_shipped_delivered(void **state)
{
    order_t o;
    place(&o, "pete", 2);
    assert_int_equal(move(o.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, "paid"), ORDER_OK);
    assert_string_equal(events_of(o.id), "stock.reserve order.placed stock.commit order.paid");
    assert_stock_event(&o, "stock.commit");
    assert_order_event(&o, "order.paid", "paid");
    assert_string_equal(field(event_id(o.id, "order.paid"), "version"), "2");

    assert_int_equal(move(o.id, ORDER_STATUS_PAID, ORDER_STATUS_SHIPPED, "shipped"), ORDER_OK);
    assert_int_equal(move(o.id, ORDER_STATUS_SHIPPED, ORDER_STATUS_DELIVERED, "delivered"),
                     ORDER_OK);
    assert_string_equal(events_of(o.id), "stock.reserve order.placed stock.commit order.paid "
                                         "order.shipped order.delivered");
    assert_order_event(&o, "order.shipped", "shipped");
    assert_order_event(&o, "order.delivered", "delivered");
    order_clear(&o);
}

static void test_cancelled_expired_failed_restore_stock(void **state)
{
    static const struct {
        order_status to;
        const char *events, *status;
    } cases[] = {
        {ORDER_STATUS_CANCELLED, "stock.restore order.cancelled", "cancelled"},
        {ORDER_STATUS_EXPIRED, "stock.restore order.expired", "expired"},
        {ORDER_STATUS_FAILED, "stock.restore order.failed", "failed"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        order_t o;
        place(&o, "quin", 2);
        assert_int_equal(move(o.id, ORDER_STATUS_PENDING, cases[i].to, "why not"), ORDER_OK);
        char want[128];
        snprintf(want, sizeof want, "stock.reserve order.placed %s", cases[i].events);
        assert_string_equal(events_of(o.id), want);
        char rk[32];
        snprintf(rk, sizeof rk, "order.%s", cases[i].status);
        assert_stock_event(&o, "stock.restore");
        assert_order_event(&o, rk, cases[i].status);
        assert_string_equal(field(event_id(o.id, rk), "reason"), "why not");
        order_clear(&o);
    }

    /* A paid order cancelled: the committed stock is restored. */
    order_t p;
    place(&p, "quin", 1);
    assert_int_equal(move(p.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, "paid"), ORDER_OK);
    assert_int_equal(move(p.id, ORDER_STATUS_PAID, ORDER_STATUS_CANCELLED, "refund me"), ORDER_OK);
    assert_string_equal(events_of(p.id), "stock.reserve order.placed stock.commit order.paid "
                                         "stock.restore order.cancelled");
    order_clear(&p);
}

static void test_expiry_sweep_writes_events(void **state)
{
    order_t o;
    place(&o, "rita", 1);
    char sql[160];
    snprintf(sql, sizeof sql,
             "UPDATE orders SET created_at = created_at - interval '30 years' WHERE id = '%s'",
             o.id);
    pgt_exec(pgt_conn(), sql);
    assert_string_equal(events_of(o.id), "stock.reserve order.placed"); /* backdating: none */
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "sweeper", 0);
    order_t *rows = NULL;
    size_t n = 0;
    assert_int_equal(P.orders_expire_due(P.self, &ctx, clock_wall_us() - 29LL * 365 * 86400000000LL,
                                         "expired: unpaid", 100, &rows, &n),
                     ORDER_OK);
    assert_int_equal(n, 1);
    order_list_free(rows, n);
    assert_string_equal(events_of(o.id), "stock.reserve order.placed stock.restore order.expired");
    assert_string_equal(field(event_id(o.id, "order.expired"), "reason"), "expired: unpaid");
    order_clear(&o);
}

static void test_changes_that_move_nothing_write_nothing(void **state)
{
    order_t o;
    place(&o, "sam", 1);
    assert_int_equal(move(o.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, "paid"), ORDER_OK);
    int64_t before = pgt_scalar("SELECT count(*) FROM outbox", NULL, NULL, NULL);

    /* A refused transition. */
    assert_int_equal(move(o.id, ORDER_STATUS_PENDING, ORDER_STATUS_EXPIRED, "late"),
                     ORDER_EPRECONDITION);
    /* An amendment of the payment facts. */
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    order_amendment a = {.order_id = o.id,
                         .pay_status = ORDER_PAY_REFUNDED,
                         .refund_id = "re_sam",
                         .refunded_at_us = clock_wall_us(),
                         .stock_reserved_at_us = clock_wall_us()};
    order_t out = {0};
    assert_int_equal(P.order_amend(P.self, &ctx, &a, &out), ORDER_OK);
    order_clear(&out);
    /* A transition with an event already applied. */
    order_inbound in = {ORDER_INBOUND_PROVIDER, "evt_sam_ship"};
    order_transition ship = {.order_id = o.id,
                             .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PAID),
                             .to = ORDER_STATUS_SHIPPED,
                             .expected_version = -1,
                             .reason = "shipped",
                             .inbound = &in};
    ctx = pgt_ctx(&e, "svc", 0);
    assert_int_equal(P.order_transition(P.self, &ctx, &ship, &out), ORDER_OK);
    order_clear(&out);
    int64_t after_ship = pgt_scalar("SELECT count(*) FROM outbox", NULL, NULL, NULL);
    assert_int_equal(after_ship, before + 1); /* order.shipped */
    /* The same event on a move that would otherwise apply: a duplicate, no events. */
    ship.from_set = ORDER_STATUS_BIT(ORDER_STATUS_SHIPPED);
    ship.to = ORDER_STATUS_DELIVERED;
    ctx = pgt_ctx(&e, "svc", 0);
    assert_int_equal(P.order_transition(P.self, &ctx, &ship, &out), ORDER_EDUPLICATE);
    order_clear(&out);

    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox", NULL, NULL, NULL), after_ship);
    assert_string_equal(events_of(o.id),
                        "stock.reserve order.placed stock.commit order.paid order.shipped");
    order_clear(&o);
}

int main(void)
{
    if (pgt_setup("outbox", true) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_placing_writes_reserve_then_placed),
        cmocka_unit_test(test_paid_shipped_delivered),
        cmocka_unit_test(test_cancelled_expired_failed_restore_stock),
        cmocka_unit_test(test_expiry_sweep_writes_events),
        cmocka_unit_test(test_changes_that_move_nothing_write_nothing),
    };
    int failed = cmocka_run_group_tests_name("storage_outbox", tests, group_setup, group_teardown);
    if (failed == 0)
        pgt_teardown(); /* keep the schema of a failed run to look at */
    return failed ? 1 : 0;
}
