/* test_orders.c — the order_store port against a real PostgreSQL: products, insert and
 * read back, idempotency (replay, reuse, racing duplicates), transitions and their history,
 * refusals, list pagination and filters. */
#include <pthread.h>
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

/* Inserts a fresh order for `customer` under a fresh key; returns it in *o. */
static void place(order_t *o, const char *customer, int nitems, int64_t price)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, customer, 0);
    char key[64];
    pgt_name(key, sizeof key, "req");
    pgt_order(o, customer, nitems, price);
    bool replayed = true;
    int rc = P.order_insert(P.self, &ctx, key, key, o, &replayed);
    assert_int_equal(rc, ORDER_OK);
    assert_false(replayed);
}

static int64_t history_count(const char *order_id)
{
    return pgt_scalar("SELECT count(*) FROM order_history WHERE order_id = $1", order_id, NULL,
                      NULL);
}

/* ---- products ---- */

static void test_product_upsert_get(void **state)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "admin", 0);
    order_product p = {.id = "sku,{odd} \"id\"",
                       .name = "Widget \"deluxe\" \\ 2000",
                       .unit_price_minor = 1999,
                       .currency = "EUR",
                       .active = true};
    order_product out;
    assert_int_equal(P.product_upsert(P.self, &ctx, &p, &out), ORDER_OK);
    assert_string_equal(out.id, p.id);
    assert_string_equal(out.name, p.name);
    assert_int_equal(out.unit_price_minor, 1999);
    assert_string_equal(out.currency, "EUR");
    assert_true(out.active);

    /* Replace: new price, inactive. */
    p.unit_price_minor = 9223372036854775807LL;
    p.active = false;
    assert_int_equal(P.product_upsert(P.self, &ctx, &p, &out), ORDER_OK);
    assert_int_equal(out.unit_price_minor, 9223372036854775807LL);
    assert_false(out.active);

    const char *ids[3] = {p.id, "no-such-product", p.id};
    order_product got[3];
    bool found[3];
    memset(got, 0, sizeof got);
    assert_int_equal(P.products_get(P.self, &ctx, ids, 3, got, found), ORDER_OK);
    assert_true(found[0]);
    assert_false(found[1]);
    assert_true(found[2]);
    assert_string_equal(got[0].name, p.name);
    assert_int_equal(got[2].unit_price_minor, 9223372036854775807LL);
    assert_false(got[0].active);

    /* Bad data the domain should have caught is refused by the schema, not a crash. */
    order_product bad = {.id = "sku-bad", .name = "x", .unit_price_minor = -1, .currency = "EUR"};
    assert_int_equal(P.product_upsert(P.self, &ctx, &bad, &out), ORDER_EINVAL);
}

/* ---- insert / get ---- */

static void test_insert_get_round_trip(void **state)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "alice", 0);
    order_t o;
    pgt_order(&o, "alice", 3, 0);
    /* Exact money beyond double precision: 2^53 + 1. */
    o.items[0].unit_price_minor = 9007199254740993LL;
    o.items[0].line_total_minor = 9007199254740993LL;
    o.items[1].unit_price_minor = 0;
    o.items[1].line_total_minor = 0;
    o.items[2].unit_price_minor = 1;
    o.items[2].line_total_minor = 3;
    o.subtotal_minor = 9007199254740996LL;
    o.tax_minor = 7;
    o.total_minor = 9007199254741003LL;
    bool replayed = true;
    int64_t before = clock_wall_us();
    assert_int_equal(P.order_insert(P.self, &ctx, "rt-1", "fp-rt-1", &o, &replayed), ORDER_OK);
    assert_false(replayed);
    assert_true(order_id_valid(o.id));
    assert_int_equal(o.version, 1);
    assert_int_equal(o.status, ORDER_STATUS_PENDING);
    assert_true(o.created_at_us >= before - 5000000 &&
                o.created_at_us <= clock_wall_us() + 5000000);
    assert_int_equal(o.created_at_us, o.updated_at_us);

    order_t g = {0};
    assert_int_equal(P.order_get(P.self, &ctx, o.id, &g), ORDER_OK);
    assert_string_equal(g.id, o.id);
    assert_string_equal(g.customer_id, "alice");
    assert_int_equal(g.status, ORDER_STATUS_PENDING);
    assert_string_equal(g.currency, "EUR");
    assert_int_equal(g.subtotal_minor, 9007199254740996LL);
    assert_int_equal(g.tax_minor, 7);
    assert_int_equal(g.total_minor, 9007199254741003LL);
    assert_int_equal(g.pay_provider, ORDER_PROVIDER_LOCAL);
    assert_int_equal(g.pay_status, ORDER_PAY_UNSPECIFIED);
    assert_string_equal(g.pay_reference, "");
    assert_int_equal(g.paid_at_us, 0);
    assert_string_equal(g.cancel_reason, "");
    assert_int_equal(g.created_at_us, o.created_at_us);
    assert_int_equal(g.updated_at_us, o.updated_at_us);
    assert_int_equal(g.version, 1);
    assert_int_equal(g.nitems, 3);
    for (size_t i = 0; i < 3; i++) {
        assert_string_equal(g.items[i].product_id, o.items[i].product_id);
        assert_string_equal(g.items[i].name, o.items[i].name);
        assert_int_equal(g.items[i].quantity, o.items[i].quantity);
        assert_int_equal(g.items[i].unit_price_minor, o.items[i].unit_price_minor);
        assert_int_equal(g.items[i].line_total_minor, o.items[i].line_total_minor);
    }

    /* One history row (creation), and the key points at the order with a sha256. */
    assert_int_equal(history_count(o.id), 1);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM order_history WHERE order_id = $1 AND "
                                "from_status IS NULL AND to_status = 'pending' AND actor = "
                                "'alice' AND reason = 'placed'",
                                o.id, NULL, NULL),
                     1);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM idempotency_keys WHERE caller = 'alice' AND "
                                "request_id = 'rt-1' AND order_id = $1 AND fingerprint = "
                                "sha256(convert_to('fp-rt-1', 'UTF8'))",
                                o.id, NULL, NULL),
                     1);
    order_clear(&g);
    order_clear(&o);
}

static void test_get_missing_and_malformed(void **state)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "alice", 0);
    order_t g = {0};
    assert_int_equal(P.order_get(P.self, &ctx, "00000000-0000-4000-8000-000000000000", &g),
                     ORDER_ENOTFOUND);
    assert_int_equal(P.order_get(P.self, &ctx, "not-a-uuid", &g), ORDER_ENOTFOUND);
    assert_int_equal(e.code, ORDER_ENOTFOUND);
    /* The connection is still good after the refused cast. */
    order_t o;
    place(&o, "alice", 1, 5);
    assert_int_equal(P.order_get(P.self, &ctx, o.id, &g), ORDER_OK);
    order_clear(&g);
    order_clear(&o);
}

/* ---- idempotency ---- */

static void test_replay_same_request(void **state)
{
    char cust[64], key[64];
    pgt_name(cust, sizeof cust, "cust");
    pgt_name(key, sizeof key, "key");
    order_error e;
    order_ctx ctx = pgt_ctx(&e, cust, 0);
    order_t first, again;
    bool replayed;
    pgt_order(&first, cust, 2, 100);
    assert_int_equal(P.order_insert(P.self, &ctx, key, "fingerprint-A", &first, &replayed),
                     ORDER_OK);
    assert_false(replayed);

    /* The retry carries the same fingerprint; whatever else *o holds is replaced. */
    pgt_order(&again, cust, 5, 7);
    assert_int_equal(P.order_insert(P.self, &ctx, key, "fingerprint-A", &again, &replayed),
                     ORDER_OK);
    assert_true(replayed);
    assert_string_equal(again.id, first.id);
    assert_int_equal(again.nitems, 2);
    assert_int_equal(again.total_minor, first.total_minor);
    assert_int_equal(again.created_at_us, first.created_at_us);
    assert_int_equal(
        pgt_scalar("SELECT count(*) FROM orders WHERE customer_id = $1", cust, NULL, NULL), 1);
    order_clear(&first);
    order_clear(&again);
}

static void test_key_reused_with_other_request(void **state)
{
    char cust[64], key[64];
    pgt_name(cust, sizeof cust, "cust");
    pgt_name(key, sizeof key, "key");
    order_error e;
    order_ctx ctx = pgt_ctx(&e, cust, 0);
    order_t o, other;
    bool replayed;
    pgt_order(&o, cust, 1, 100);
    assert_int_equal(P.order_insert(P.self, &ctx, key, "fp-1", &o, &replayed), ORDER_OK);
    pgt_order(&other, cust, 1, 100);
    assert_int_equal(P.order_insert(P.self, &ctx, key, "fp-2", &other, &replayed),
                     ORDER_EIDEMPOTENCY);
    assert_int_equal(e.code, ORDER_EIDEMPOTENCY);
    assert_string_equal(e.reason, "IDEMPOTENCY_KEY_REUSED");
    assert_int_equal(
        pgt_scalar("SELECT count(*) FROM orders WHERE customer_id = $1", cust, NULL, NULL), 1);

    /* Keys belong to their caller: another caller may use the same request_id. */
    order_error e2;
    order_ctx ctx2 = pgt_ctx(&e2, "someone-else", 0);
    order_t third;
    pgt_order(&third, cust, 1, 100);
    assert_int_equal(P.order_insert(P.self, &ctx2, key, "fp-2", &third, &replayed), ORDER_OK);
    assert_false(replayed);
    assert_string_not_equal(third.id, o.id);
    order_clear(&o);
    order_clear(&other);
    order_clear(&third);
}

#define RACERS 8
struct racer {
    pthread_barrier_t *go;
    const char *customer, *key;
    int rc;
    bool replayed;
    char id[ORDER_ID_LEN + 1];
};

static void *race_insert(void *arg)
{
    struct racer *r = arg;
    char err[256];
    struct store *s = store_open(pgt_dsn(), 5000000, err, sizeof err);
    order_store port;
    store_order_port(s, &port);
    order_error *e = calloc(1, sizeof *e);
    order_ctx ctx = pgt_ctx(e, r->customer, 0);
    order_t o;
    pgt_order(&o, r->customer, 3, 250);
    pthread_barrier_wait(r->go);
    r->rc = port.order_insert(port.self, &ctx, r->key, "same-fingerprint", &o, &r->replayed);
    snprintf(r->id, sizeof r->id, "%s", o.id);
    order_clear(&o);
    free(e);
    store_close(s);
    return NULL;
}

static void test_racing_duplicates_make_one_order(void **state)
{
    char cust[64], key[64];
    pgt_name(cust, sizeof cust, "racer");
    pgt_name(key, sizeof key, "race-key");
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, RACERS);
    pthread_t th[RACERS];
    struct racer r[RACERS];
    for (int i = 0; i < RACERS; i++) {
        r[i] = (struct racer){.go = &go, .customer = cust, .key = key};
        pthread_create(&th[i], NULL, race_insert, &r[i]);
    }
    int fresh = 0;
    for (int i = 0; i < RACERS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(r[i].rc, ORDER_OK);
        assert_string_equal(r[i].id, r[0].id);
        fresh += !r[i].replayed;
    }
    pthread_barrier_destroy(&go);
    assert_int_equal(fresh, 1);
    assert_int_equal(
        pgt_scalar("SELECT count(*) FROM orders WHERE customer_id = $1", cust, NULL, NULL), 1);
    assert_int_equal(
        pgt_scalar("SELECT count(*) FROM order_items WHERE order_id = $1", r[0].id, NULL, NULL), 3);
    assert_int_equal(history_count(r[0].id), 1);
}

/* ---- transitions ---- */

static void test_transition_writes_history(void **state)
{
    order_t o;
    place(&o, "bob", 2, 300);
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "payments-svc", 0);
    int64_t paid_at = 1700000000123456LL;
    order_transition t = {.order_id = o.id,
                          .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                          .to = ORDER_STATUS_PAID,
                          .expected_version = -1,
                          .reason = "payment confirmed",
                          .pay_status = ORDER_PAY_SUCCEEDED,
                          .paid_at_us = paid_at};
    order_t out = {0};
    assert_int_equal(P.order_transition(P.self, &ctx, &t, &out), ORDER_OK);
    assert_int_equal(out.status, ORDER_STATUS_PAID);
    assert_int_equal(out.version, 2);
    assert_int_equal(out.pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(out.paid_at_us, paid_at);
    assert_true(out.updated_at_us > o.updated_at_us);
    assert_int_equal(out.created_at_us, o.created_at_us);
    assert_int_equal(out.nitems, 2);
    assert_string_equal(out.cancel_reason, "");
    order_clear(&out);

    order_ctx ctx2 = pgt_ctx(&e, "warehouse", 0);
    order_transition ship = {.order_id = o.id,
                             .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PAID),
                             .to = ORDER_STATUS_SHIPPED,
                             .expected_version = 2,
                             .reason = "shipped"};
    assert_int_equal(P.order_transition(P.self, &ctx2, &ship, &out), ORDER_OK);
    assert_int_equal(out.status, ORDER_STATUS_SHIPPED);
    assert_int_equal(out.version, 3);
    assert_int_equal(out.pay_status, ORDER_PAY_SUCCEEDED); /* unchanged */
    assert_int_equal(out.paid_at_us, paid_at);
    order_clear(&out);

    assert_int_equal(history_count(o.id), 3);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM order_history WHERE order_id = $1 AND "
                                "from_status = 'pending' AND to_status = 'paid' AND actor = "
                                "'payments-svc' AND reason = 'payment confirmed'",
                                o.id, NULL, NULL),
                     1);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM order_history WHERE order_id = $1 AND "
                                "from_status = 'paid' AND to_status = 'shipped' AND actor = "
                                "'warehouse' AND reason = 'shipped'",
                                o.id, NULL, NULL),
                     1);

    /* Cancelling records the reason on the order too. */
    order_t c;
    place(&c, "bob", 1, 10);
    order_transition cancel = {.order_id = c.id,
                               .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING) |
                                           ORDER_STATUS_BIT(ORDER_STATUS_PAID),
                               .to = ORDER_STATUS_CANCELLED,
                               .expected_version = -1,
                               .reason = "changed my mind"};
    assert_int_equal(P.order_transition(P.self, &ctx, &cancel, &out), ORDER_OK);
    assert_int_equal(out.status, ORDER_STATUS_CANCELLED);
    assert_string_equal(out.cancel_reason, "changed my mind");
    assert_int_equal(out.pay_status, ORDER_PAY_UNSPECIFIED);
    order_clear(&out);
    order_clear(&c);
    order_clear(&o);
}

static void test_illegal_transition_changes_nothing(void **state)
{
    order_t o;
    place(&o, "carol", 1, 10);
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    order_t out = {0};
    order_transition pay = {.order_id = o.id,
                            .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                            .to = ORDER_STATUS_PAID,
                            .expected_version = -1,
                            .reason = "paid"};
    assert_int_equal(P.order_transition(P.self, &ctx, &pay, &out), ORDER_OK);
    order_clear(&out);

    /* Only a PENDING order expires; this one is PAID. */
    order_transition bad = {.order_id = o.id,
                            .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                            .to = ORDER_STATUS_EXPIRED,
                            .expected_version = -1,
                            .reason = "expired"};
    ctx = pgt_ctx(&e, "svc", 0);
    assert_int_equal(P.order_transition(P.self, &ctx, &bad, &out), ORDER_EPRECONDITION);
    assert_int_equal(e.code, ORDER_EPRECONDITION);
    assert_int_equal(e.current_status, ORDER_STATUS_PAID);
    assert_string_equal(e.precondition_type, "ORDER_STATUS");
    assert_string_equal(e.precondition_subject, o.id);
    assert_string_equal(e.message, "order is paid; expected pending");
    assert_int_equal(out.status, ORDER_STATUS_PAID);
    assert_int_equal(out.version, 2);
    assert_int_equal(out.nitems, 1);
    order_clear(&out);

    order_t g = {0};
    assert_int_equal(P.order_get(P.self, &ctx, o.id, &g), ORDER_OK);
    assert_int_equal(g.status, ORDER_STATUS_PAID);
    assert_int_equal(g.version, 2);
    order_clear(&g);
    assert_int_equal(history_count(o.id), 2);
    order_clear(&o);
}

static void test_expected_version_mismatch(void **state)
{
    order_t o;
    place(&o, "dave", 1, 10);
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    order_t out = {0};
    order_transition t = {.order_id = o.id,
                          .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                          .to = ORDER_STATUS_PAID,
                          .expected_version = 5,
                          .reason = "paid"};
    assert_int_equal(P.order_transition(P.self, &ctx, &t, &out), ORDER_EPRECONDITION);
    assert_string_equal(e.precondition_type, "ORDER_VERSION");
    assert_int_equal(e.current_status, ORDER_STATUS_PENDING);
    assert_int_equal(out.version, 1);
    assert_int_equal(out.status, ORDER_STATUS_PENDING);
    order_clear(&out);
    assert_int_equal(history_count(o.id), 1);

    t.expected_version = 1;
    ctx = pgt_ctx(&e, "svc", 0);
    assert_int_equal(P.order_transition(P.self, &ctx, &t, &out), ORDER_OK);
    assert_int_equal(out.version, 2);
    order_clear(&out);
    order_clear(&o);
}

static void test_transition_and_payment_of_missing_order(void **state)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    order_t out = {0};
    order_transition t = {.order_id = "00000000-0000-4000-8000-00000000abcd",
                          .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                          .to = ORDER_STATUS_PAID,
                          .expected_version = -1};
    assert_int_equal(P.order_transition(P.self, &ctx, &t, &out), ORDER_ENOTFOUND);
    t.order_id = "garbage";
    assert_int_equal(P.order_transition(P.self, &ctx, &t, &out), ORDER_ENOTFOUND);
    order_amendment a = {.order_id = "00000000-0000-4000-8000-00000000abcd",
                         .provider = ORDER_PROVIDER_LOCAL,
                         .reference = "lp_x",
                         .pay_status = ORDER_PAY_PENDING};
    assert_int_equal(P.order_amend(P.self, &ctx, &a, &out), ORDER_ENOTFOUND);
}

static void test_set_payment(void **state)
{
    order_t o;
    place(&o, "erin", 1, 10);
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    order_t out = {0};
    order_amendment a = {.order_id = o.id,
                         .provider = ORDER_PROVIDER_LOCAL,
                         .reference = "lp_0123456789abcdef01234567",
                         .pay_status = ORDER_PAY_PENDING};
    assert_int_equal(P.order_amend(P.self, &ctx, &a, &out), ORDER_OK);
    assert_int_equal(out.pay_provider, ORDER_PROVIDER_LOCAL);
    assert_string_equal(out.pay_reference, "lp_0123456789abcdef01234567");
    assert_int_equal(out.pay_status, ORDER_PAY_PENDING);
    assert_int_equal(out.version, 2);
    assert_int_equal(out.status, ORDER_STATUS_PENDING);
    assert_int_equal(history_count(o.id), 1); /* not a status change */
    order_clear(&out);
    order_clear(&o);
}

/* Racing transitions on one order: each history row starts where the previous one ended,
 * and the version counts exactly the changes that happened. */
struct mover {
    pthread_barrier_t *go;
    const char *id;
    order_transition t;
    int rc;
};

static void *race_transition(void *arg)
{
    struct mover *m = arg;
    char err[256];
    struct store *s = store_open(pgt_dsn(), 5000000, err, sizeof err);
    order_store port;
    store_order_port(s, &port);
    order_error *e = calloc(1, sizeof *e);
    order_ctx ctx = pgt_ctx(e, "racer", 0);
    order_t out = {0};
    pthread_barrier_wait(m->go);
    m->rc = port.order_transition(port.self, &ctx, &m->t, &out);
    order_clear(&out);
    free(e);
    store_close(s);
    return NULL;
}

static void test_racing_transitions_keep_history_exact(void **state)
{
    order_t o;
    place(&o, "frank", 1, 10);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, RACERS);
    pthread_t th[RACERS];
    struct mover m[RACERS];
    for (int i = 0; i < RACERS; i++) {
        m[i] = (struct mover){.go = &go, .id = o.id};
        m[i].t = (order_transition){.order_id = o.id, .expected_version = -1, .reason = "race"};
        if (i % 3 == 0) {
            m[i].t.from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING);
            m[i].t.to = ORDER_STATUS_PAID;
        } else if (i % 3 == 1) {
            m[i].t.from_set = ORDER_STATUS_BIT(ORDER_STATUS_PAID);
            m[i].t.to = ORDER_STATUS_SHIPPED;
        } else {
            m[i].t.from_set =
                ORDER_STATUS_BIT(ORDER_STATUS_PENDING) | ORDER_STATUS_BIT(ORDER_STATUS_PAID);
            m[i].t.to = ORDER_STATUS_CANCELLED;
        }
        pthread_create(&th[i], NULL, race_transition, &m[i]);
    }
    int ok = 0;
    for (int i = 0; i < RACERS; i++) {
        pthread_join(th[i], NULL);
        assert_true(m[i].rc == ORDER_OK || m[i].rc == ORDER_EPRECONDITION);
        ok += m[i].rc == ORDER_OK;
    }
    pthread_barrier_destroy(&go);
    assert_true(ok >= 1);
    assert_int_equal(history_count(o.id), 1 + ok);
    assert_int_equal(pgt_scalar("SELECT version FROM orders WHERE id = $1", o.id, NULL, NULL),
                     1 + ok);
    /* Chain check: every row's from_status is the previous row's to_status. */
    assert_int_equal(pgt_scalar("SELECT count(*) FROM (SELECT from_status, lag(to_status) OVER "
                                "(ORDER BY id) AS prev FROM order_history WHERE order_id = $1) h "
                                "WHERE from_status IS DISTINCT FROM prev",
                                o.id, NULL, NULL),
                     0);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM orders o JOIN LATERAL (SELECT to_status "
                                "FROM order_history WHERE order_id = o.id ORDER BY id DESC LIMIT "
                                "1) h ON true WHERE o.id = $1 AND h.to_status = o.status",
                                o.id, NULL, NULL),
                     1);
    order_clear(&o);
}

/* ---- list ---- */

static bool seen_before(char (*ids)[ORDER_ID_LEN + 1], size_t n, const char *id)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(ids[i], id) == 0)
            return true;
    return false;
}

static void test_list_pagination_stable_under_inserts(void **state)
{
    char cust[64];
    pgt_name(cust, sizeof cust, "pager");
    enum { N = 23, PAGE = 5 };
    char existing[N][ORDER_ID_LEN + 1];
    size_t nitems_of[N];
    for (int i = 0; i < N; i++) {
        order_t o;
        place(&o, cust, 1 + i % 3, 100 + i);
        snprintf(existing[i], sizeof existing[i], "%s", o.id);
        nitems_of[i] = o.nitems;
        order_clear(&o);
    }
    char seen[N + 64][ORDER_ID_LEN + 1];
    size_t nseen = 0;
    order_list_query q = {.customer_id = cust, .limit = PAGE};
    int64_t last_ts = INT64_MAX;
    char last_id[ORDER_ID_LEN + 1] = "";
    for (int page = 0; page < 20; page++) {
        order_error e;
        order_ctx ctx = pgt_ctx(&e, "svc", 0);
        order_t *rows = NULL;
        size_t n = 0;
        assert_int_equal(P.order_list(P.self, &ctx, &q, &rows, &n), ORDER_OK);
        for (size_t i = 0; i < n; i++) {
            /* Strictly descending (created_at, id), and never seen before. */
            assert_true(rows[i].created_at_us < last_ts ||
                        (rows[i].created_at_us == last_ts && strcmp(rows[i].id, last_id) < 0));
            last_ts = rows[i].created_at_us;
            snprintf(last_id, sizeof last_id, "%s", rows[i].id);
            assert_false(seen_before(seen, nseen, rows[i].id));
            assert_string_equal(rows[i].customer_id, cust);
            for (int k = 0; k < N; k++)
                if (strcmp(existing[k], rows[i].id) == 0)
                    assert_int_equal(rows[i].nitems, nitems_of[k]);
            snprintf(seen[nseen++], sizeof seen[0], "%s", rows[i].id);
        }
        size_t got = n;
        if (n) {
            q.has_cursor = true;
            q.cursor_created_at_us = rows[n - 1].created_at_us;
            snprintf(q.cursor_id, sizeof q.cursor_id, "%s", rows[n - 1].id);
        }
        order_list_free(rows, n);
        if (got < PAGE)
            break;
        /* New orders arrive between pages: they are newer than the cursor. */
        order_t fresh;
        place(&fresh, cust, 1, 1);
        assert_false(seen_before(seen, nseen, fresh.id));
        order_clear(&fresh);
    }
    assert_int_equal(nseen, N);
    for (int k = 0; k < N; k++)
        assert_true(seen_before(seen, nseen, existing[k]));
}

static void test_list_filters(void **state)
{
    char a[64], b[64];
    pgt_name(a, sizeof a, "filter-a");
    pgt_name(b, sizeof b, "filter-b");
    char paid_id[ORDER_ID_LEN + 1], cancelled_id[ORDER_ID_LEN + 1];
    for (int i = 0; i < 4; i++) {
        order_t o;
        place(&o, a, 2, 10);
        order_error e;
        order_ctx ctx = pgt_ctx(&e, "svc", 0);
        order_t out = {0};
        if (i == 1 || i == 2) {
            order_transition t = {.order_id = o.id,
                                  .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                                  .to = i == 1 ? ORDER_STATUS_PAID : ORDER_STATUS_CANCELLED,
                                  .expected_version = -1,
                                  .reason = "x"};
            assert_int_equal(P.order_transition(P.self, &ctx, &t, &out), ORDER_OK);
            snprintf(i == 1 ? paid_id : cancelled_id, ORDER_ID_LEN + 1, "%s", o.id);
            order_clear(&out);
        }
        order_clear(&o);
        place(&o, b, 1, 10);
        order_clear(&o);
    }
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    order_t *rows;
    size_t n;

    order_list_query q = {.customer_id = a, .limit = 100};
    assert_int_equal(P.order_list(P.self, &ctx, &q, &rows, &n), ORDER_OK);
    assert_int_equal(n, 4);
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(rows[i].customer_id, a);
        assert_int_equal(rows[i].nitems, 2);
    }
    order_list_free(rows, n);

    q.status_set = ORDER_STATUS_BIT(ORDER_STATUS_PAID);
    assert_int_equal(P.order_list(P.self, &ctx, &q, &rows, &n), ORDER_OK);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].id, paid_id);
    order_list_free(rows, n);

    q.status_set = ORDER_STATUS_BIT(ORDER_STATUS_PAID) | ORDER_STATUS_BIT(ORDER_STATUS_CANCELLED);
    assert_int_equal(P.order_list(P.self, &ctx, &q, &rows, &n), ORDER_OK);
    assert_int_equal(n, 2);
    assert_true(strcmp(rows[0].id, cancelled_id) == 0 || strcmp(rows[1].id, cancelled_id) == 0);
    order_list_free(rows, n);

    q.status_set = ORDER_STATUS_BIT(ORDER_STATUS_DELIVERED);
    assert_int_equal(P.order_list(P.self, &ctx, &q, &rows, &n), ORDER_OK);
    assert_int_equal(n, 0);
    assert_null(rows);

    /* No customer filter: every customer, still filtered by status, limit honoured. */
    order_list_query all = {.status_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING), .limit = 3};
    assert_int_equal(P.order_list(P.self, &ctx, &all, &rows, &n), ORDER_OK);
    assert_int_equal(n, 3);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(rows[i].status, ORDER_STATUS_PENDING);
    order_list_free(rows, n);
    int64_t total = pgt_scalar("SELECT count(*) FROM orders", NULL, NULL, NULL);
    order_list_query every = {.limit = ORDER_PAGE_SIZE_MAX + 1};
    assert_int_equal(P.order_list(P.self, &ctx, &every, &rows, &n), ORDER_OK);
    assert_int_equal((int64_t)n, total < ORDER_PAGE_SIZE_MAX + 1 ? total : ORDER_PAGE_SIZE_MAX + 1);
    order_list_free(rows, n);
}

int main(void)
{
    if (pgt_setup("orders", true) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_product_upsert_get),
        cmocka_unit_test(test_insert_get_round_trip),
        cmocka_unit_test(test_get_missing_and_malformed),
        cmocka_unit_test(test_replay_same_request),
        cmocka_unit_test(test_key_reused_with_other_request),
        cmocka_unit_test(test_racing_duplicates_make_one_order),
        cmocka_unit_test(test_transition_writes_history),
        cmocka_unit_test(test_illegal_transition_changes_nothing),
        cmocka_unit_test(test_expected_version_mismatch),
        cmocka_unit_test(test_transition_and_payment_of_missing_order),
        cmocka_unit_test(test_set_payment),
        cmocka_unit_test(test_racing_transitions_keep_history_exact),
        cmocka_unit_test(test_list_pagination_stable_under_inserts),
        cmocka_unit_test(test_list_filters),
    };
    int failed = cmocka_run_group_tests_name("storage_orders", tests, group_setup, group_teardown);
    if (failed == 0)
        pgt_teardown(); /* keep the schema of a failed run to look at */
    return failed ? 1 : 0;
}
