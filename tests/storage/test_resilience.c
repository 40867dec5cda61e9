/* test_resilience.c — deadlines, timeouts and lost connections: a passed deadline touches
 * nothing; a deadline that passes mid-transaction rolls it back; the configured statement
 * timeout is UNAVAILABLE; an unreachable PostgreSQL fails fast and is reconnected to; a
 * killed connection costs one call. */
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

#define MS 1000

static void place(order_store *p, order_t *o, const char *customer)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, customer, 0);
    char key[64];
    pgt_name(key, sizeof key, "req");
    pgt_order(o, customer, 2, 100);
    bool replayed;
    assert_int_equal(p->order_insert(p->self, &ctx, key, key, o, &replayed), ORDER_OK);
}

static int64_t count_for(const char *customer)
{
    return pgt_scalar("SELECT count(*) FROM orders WHERE customer_id = $1", customer, NULL, NULL);
}

static void test_deadline_already_passed(void **state)
{
    /* A store on a closed port: had it tried the database, the answer would be UNAVAILABLE. */
    char err[256];
    struct store *dead = store_open("host=127.0.0.1 port=1 dbname=x user=x", 0, err, sizeof err);
    assert_non_null(dead);
    struct store *live = pgt_store(0);
    struct store *stores[2] = {dead, live};
    char cust[64];
    pgt_name(cust, sizeof cust, "late");
    for (int i = 0; i < 2; i++) {
        order_store p;
        store_order_port(stores[i], &p);
        order_error e;
        order_ctx ctx = pgt_ctx(&e, cust, 0);
        ctx.deadline_mono_us = clock_mono_us() - 1;
        order_t o;
        pgt_order(&o, cust, 1, 10);
        bool replayed;
        assert_int_equal(p.order_insert(p.self, &ctx, "late-1", "late-1", &o, &replayed),
                         ORDER_EDEADLINE);
        assert_int_equal(e.code, ORDER_EDEADLINE);
        order_t g = {0};
        assert_int_equal(p.order_get(p.self, &ctx, "00000000-0000-4000-8000-000000000001", &g),
                         ORDER_EDEADLINE);
        order_clear(&o);
    }
    assert_int_equal(count_for(cust), 0);
    store_close(dead);
    store_close(live);
}

static void test_deadline_expires_while_row_is_locked(void **state)
{
    struct store *s = pgt_store(10 * 1000000);
    order_store p;
    store_order_port(s, &p);
    order_t o;
    place(&p, &o, "locked");

    /* Another transaction holds the row: the UPDATE waits, the 200 ms deadline passes. */
    PGconn *other = pgt_conn();
    pgt_exec(other, "BEGIN");
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT 1 FROM orders WHERE id = '%s' FOR UPDATE", o.id);
    pgt_exec(other, sql);

    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 200 * MS);
    order_transition t = {.order_id = o.id,
                          .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                          .to = ORDER_STATUS_CANCELLED,
                          .expected_version = -1,
                          .reason = "too late"};
    order_t out = {0};
    int64_t t0 = clock_mono_us();
    assert_int_equal(p.order_transition(p.self, &ctx, &t, &out), ORDER_EDEADLINE);
    int64_t took = clock_mono_us() - t0;
    assert_true(took >= 150 * MS);
    assert_true(took < 1500 * MS);
    pgt_exec(other, "ROLLBACK");

    /* Nothing changed, and the same store serves the next call. */
    ctx = pgt_ctx(&e, "svc", 0);
    order_t g = {0};
    assert_int_equal(p.order_get(p.self, &ctx, o.id, &g), ORDER_OK);
    assert_int_equal(g.status, ORDER_STATUS_PENDING);
    assert_int_equal(g.version, 1);
    assert_string_equal(g.cancel_reason, "");
    assert_int_equal(
        pgt_scalar("SELECT count(*) FROM order_history WHERE order_id = $1", o.id, NULL, NULL), 1);
    order_clear(&g);
    order_clear(&o);
    store_close(s);
}

static void test_deadline_expires_while_key_is_taken(void **state)
{
    struct store *s = pgt_store(10 * 1000000);
    order_store p;
    store_order_port(s, &p);
    char cust[64];
    pgt_name(cust, sizeof cust, "keywait");

    /* An uncommitted insert of the same key: ours waits on the unique index. */
    PGconn *other = pgt_conn();
    pgt_exec(other, "BEGIN");
    char sql[512];
    snprintf(sql, sizeof sql,
             "WITH o AS (INSERT INTO orders (customer_id, status, currency, subtotal_minor, "
             "tax_minor, total_minor) VALUES ('%s', 'pending', 'EUR', 0, 0, 0) RETURNING id) "
             "INSERT INTO idempotency_keys (caller, request_id, fingerprint, order_id) SELECT "
             "'%s', 'kw-1', sha256('x'), id FROM o",
             cust, cust);
    pgt_exec(other, sql);

    order_error e;
    order_ctx ctx = pgt_ctx(&e, cust, 200 * MS);
    order_t o;
    pgt_order(&o, cust, 3, 10);
    bool replayed;
    int64_t t0 = clock_mono_us();
    assert_int_equal(p.order_insert(p.self, &ctx, "kw-1", "fp", &o, &replayed), ORDER_EDEADLINE);
    assert_true(clock_mono_us() - t0 < 1500 * MS);
    pgt_exec(other, "ROLLBACK");
    assert_int_equal(count_for(cust), 0);

    /* The key is free again: the retry places exactly one order. */
    ctx = pgt_ctx(&e, cust, 0);
    assert_int_equal(p.order_insert(p.self, &ctx, "kw-1", "fp", &o, &replayed), ORDER_OK);
    assert_false(replayed);
    assert_int_equal(count_for(cust), 1);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM order_items i JOIN orders o ON o.id = "
                                "i.order_id WHERE o.customer_id = $1",
                                cust, NULL, NULL),
                     3);
    order_clear(&o);
    store_close(s);
}

static void test_statement_timeout_is_unavailable(void **state)
{
    /* The configured timeout (150 ms), not the caller's deadline, stops the statement. */
    struct store *s = pgt_store(150 * MS);
    order_store p;
    store_order_port(s, &p);
    order_t o;
    place(&p, &o, "slowdb");
    PGconn *other = pgt_conn();
    pgt_exec(other, "BEGIN");
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT 1 FROM orders WHERE id = '%s' FOR UPDATE", o.id);
    pgt_exec(other, sql);

    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 5000 * MS);
    order_t out = {0};
    order_transition t = {.order_id = o.id,
                          .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                          .to = ORDER_STATUS_PAID,
                          .expected_version = -1};
    int64_t t0 = clock_mono_us();
    assert_int_equal(p.order_transition(p.self, &ctx, &t, &out), ORDER_EUNAVAILABLE);
    assert_true(clock_mono_us() - t0 < 2000 * MS);
    pgt_exec(other, "ROLLBACK");
    assert_int_equal(pgt_scalar("SELECT version FROM orders WHERE id = $1", o.id, NULL, NULL), 1);

    /* And the timeout was LOCAL to that transaction: a fast call still works. */
    ctx = pgt_ctx(&e, "svc", 0);
    assert_int_equal(p.order_transition(p.self, &ctx, &t, &out), ORDER_OK);
    assert_int_equal(out.status, ORDER_STATUS_PAID);
    order_clear(&out);
    order_clear(&o);
    store_close(s);
}

static void test_unreachable_database(void **state)
{
    char err[256] = "";
    int64_t t0 = clock_mono_us();
    struct store *s = store_open("host=127.0.0.1 port=1 dbname=x user=x", 0, err, sizeof err);
    assert_non_null(s);
    assert_true(clock_mono_us() - t0 < 1000 * MS);
    order_store p;
    store_order_port(s, &p);
    for (int i = 0; i < 5; i++) {
        order_error e;
        order_ctx ctx = pgt_ctx(&e, "svc", 0);
        order_t g = {0};
        t0 = clock_mono_us();
        assert_int_equal(p.order_get(p.self, &ctx, "00000000-0000-4000-8000-000000000001", &g),
                         ORDER_EUNAVAILABLE);
        assert_true(clock_mono_us() - t0 < 200 * MS);
        assert_non_null(strstr(e.message, "database unavailable"));
        if (i == 2)
            usleep(600 * MS); /* past the first back-off: one more real attempt */
    }
    assert_false(store_ping(s));
    store_close(s);
}

static void test_killed_connection_costs_one_call(void **state)
{
    struct store *s = pgt_store(0);
    order_store p;
    store_order_port(s, &p);
    order_t o;
    place(&p, &o, "killed");
    assert_true(store_ping(s));

    /* Kill the store's backend (every other backend of this program but the raw one). */
    pgt_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
               "application_name = $1 AND pid <> pg_backend_pid()",
               pgt_appname(), NULL, NULL);
    for (int i = 0; i < 100 && pgt_scalar("SELECT count(*) FROM pg_stat_activity WHERE "
                                          "application_name = $1 AND pid <> pg_backend_pid()",
                                          pgt_appname(), NULL, NULL) > 0;
         i++)
        usleep(20 * MS);

    order_error e;
    order_ctx ctx = pgt_ctx(&e, "svc", 0);
    order_t g = {0};
    assert_int_equal(p.order_get(p.self, &ctx, o.id, &g), ORDER_EUNAVAILABLE);
    /* The next call reconnects at once. */
    ctx = pgt_ctx(&e, "svc", 0);
    assert_int_equal(p.order_get(p.self, &ctx, o.id, &g), ORDER_OK);
    assert_string_equal(g.id, o.id);
    order_clear(&g);
    order_clear(&o);
    store_close(s);
}

static void test_close_null_is_noop(void **state)
{
    store_close(NULL);
}

int main(void)
{
    if (pgt_setup("resilience", true) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deadline_already_passed),
        cmocka_unit_test(test_deadline_expires_while_row_is_locked),
        cmocka_unit_test(test_deadline_expires_while_key_is_taken),
        cmocka_unit_test(test_statement_timeout_is_unavailable),
        cmocka_unit_test(test_unreachable_database),
        cmocka_unit_test(test_killed_connection_costs_one_call),
        cmocka_unit_test(test_close_null_is_noop),
    };
    int failed = cmocka_run_group_tests_name("storage_resilience", tests, NULL, NULL);
    if (failed == 0)
        pgt_teardown();
    return failed ? 1 : 0;
}
