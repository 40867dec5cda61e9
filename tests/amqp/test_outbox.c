/* test_outbox.c — the outbox's SQL (storage/outbox.h) against a real PostgreSQL: the trigger
 * writes the events, a claim takes only the heads of the (order, family) chains and leases
 * them, marking sent moves a chain on, a failure backs off one family without holding up
 * the other, leases run out, two claimers never share a row, pruning and gauges, and the
 * NOTIFY that wakes the relay. */
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "fixture.h"
#include "storage/outbox.h"
#include "storage/pgtest.h"

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

static int reset(void **state)
{
    fx_reset();
    return 0;
}

static order_ctx ctx_of(order_error *e)
{
    return pgt_ctx(e, "relay", 10 * 1000000);
}

static size_t claim(struct store *s, int max, int64_t lease_us, store_outbox_row **rows)
{
    order_error e;
    order_ctx ctx = ctx_of(&e);
    size_t n = 99;
    int rc = store_outbox_claim(s, &ctx, max, lease_us, rows, &n);
    if (rc != ORDER_OK)
        fail_msg("claim: %s", e.message);
    return n;
}

static void mark_sent(store_outbox_row *rows, size_t n)
{
    const char *ids[64];
    assert_true(n <= 64);
    for (size_t i = 0; i < n; i++)
        ids[i] = rows[i].id;
    order_error e;
    order_ctx ctx = ctx_of(&e);
    assert_int_equal(store_outbox_mark_sent(S, &ctx, ids, n), ORDER_OK);
}

static void test_trigger_writes_complete_events(void **state)
{
    order_t o;
    fx_place(&P, &o, "ann", 2);
    fx_move(&P, o.id, ORDER_STATUS_PENDING, ORDER_STATUS_CANCELLED, "changed my mind");
    assert_int_equal(fx_rows(), 4);
    /* Every body is complete: event_id = row id, type = routing key, the order's id. */
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE payload->>'event_id' = id::text"
                                " AND payload->>'type' = routing_key"
                                " AND payload->>'order_id' = order_id::text"
                                " AND (payload->>'schema_version')::int = 1",
                                NULL, NULL, NULL),
                     4);
    assert_int_equal(pgt_scalar("SELECT jsonb_array_length(payload->'lines') FROM outbox"
                                " WHERE routing_key = 'stock.reserve'",
                                NULL, NULL, NULL),
                     2);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE routing_key = "
                                "'order.cancelled' AND payload->>'reason' = 'changed my mind'",
                                NULL, NULL, NULL),
                     1);
    order_clear(&o);
}

static void test_claim_takes_chain_heads_in_order(void **state)
{
    order_t a, b;
    fx_place(&P, &a, "ann", 1);
    fx_place(&P, &b, "bob", 1);
    fx_move(&P, a.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, NULL);
    fx_move(&P, a.id, ORDER_STATUS_PAID, ORDER_STATUS_SHIPPED, NULL);
    /* a: stock.reserve, order.placed, stock.commit, order.paid, order.shipped; b: 2. */
    assert_int_equal(fx_rows(), 7);

    store_outbox_row *rows;
    size_t n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 4); /* the heads: a's and b's reserve and placed */
    for (size_t i = 0; i < n; i++) {
        if (i)
            assert_true(rows[i].seq > rows[i - 1].seq);
        assert_int_equal(rows[i].attempts, 1);
        assert_true(strcmp(rows[i].routing_key, "stock.reserve") == 0 ||
                    strcmp(rows[i].routing_key, "order.placed") == 0);
        assert_non_null(strstr(rows[i].payload, rows[i].id));
        assert_int_equal(strlen(rows[i].payload), rows[i].payload_len);
        assert_true(rows[i].created_at_s > 1600000000);
    }
    /* Leased: nothing more is due until they are marked. */
    store_outbox_row *more;
    assert_int_equal(claim(S, 100, 60 * 1000000LL, &more), 0);
    assert_null(more);

    mark_sent(rows, n);
    store_outbox_rows_free(rows, n);
    n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 2); /* a's commit and paid */
    assert_string_equal(rows[0].routing_key, "stock.commit");
    assert_string_equal(rows[1].routing_key, "order.paid");
    mark_sent(rows, n);
    store_outbox_rows_free(rows, n);
    n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].routing_key, "order.shipped");
    assert_string_equal(rows[0].order_id, a.id);
    mark_sent(rows, n);
    store_outbox_rows_free(rows, n);
    assert_int_equal(fx_unsent(), 0);
    order_clear(&a);
    order_clear(&b);
}

static void test_failed_family_does_not_block_the_other(void **state)
{
    order_t a;
    fx_place(&P, &a, "ann", 1);
    fx_move(&P, a.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, NULL);
    store_outbox_row *rows;
    size_t n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 2);
    const char *stock = NULL, *order = NULL;
    for (size_t i = 0; i < n; i++)
        if (strncmp(rows[i].routing_key, "stock.", 6) == 0)
            stock = rows[i].id;
        else
            order = rows[i].id;
    assert_non_null(stock);
    assert_non_null(order);
    order_error e;
    order_ctx ctx = ctx_of(&e);
    assert_int_equal(store_outbox_mark_failed(S, &ctx, &stock, 1, "unroutable: test", 2 * 1000000LL,
                                              10 * 1000000LL),
                     ORDER_OK);
    ctx = ctx_of(&e);
    assert_int_equal(store_outbox_mark_sent(S, &ctx, &order, 1), ORDER_OK);
    /* Back-off: due in [1 s, 2 s] (base 2 s at attempt 1, jitter 0.5..1). */
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE id = $1::uuid"
                                " AND last_error = 'unroutable: test' AND claimed_until IS NULL"
                                " AND next_attempt_at > clock_timestamp() + interval '900 ms'"
                                " AND next_attempt_at < clock_timestamp() + interval '2 s'",
                                stock, NULL, NULL),
                     1);
    store_outbox_rows_free(rows, n);

    /* The order family moves on (order.paid) while stock waits out its back-off. */
    n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].routing_key, "order.paid");
    mark_sent(rows, n);
    store_outbox_rows_free(rows, n);

    /* Once due, the stock head comes back (attempt 2), and only then its successor. */
    pgt_exec(pgt_conn(), "UPDATE outbox SET next_attempt_at = clock_timestamp()"
                         " WHERE published_at IS NULL");
    n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].routing_key, "stock.reserve");
    assert_int_equal(rows[0].attempts, 2);
    mark_sent(rows, n);
    store_outbox_rows_free(rows, n);
    n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].routing_key, "stock.commit");
    store_outbox_rows_free(rows, n);
    order_clear(&a);
}

static void test_back_off_is_capped(void **state)
{
    order_t a;
    fx_place(&P, &a, "ann", 1);
    pgt_exec(pgt_conn(), "UPDATE outbox SET attempts = 1000");
    store_outbox_row *rows;
    size_t n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 2);
    const char *ids[2] = {rows[0].id, rows[1].id};
    order_error e;
    order_ctx ctx = ctx_of(&e);
    assert_int_equal(store_outbox_mark_failed(S, &ctx, ids, 2, "x", 500 * 1000LL, 3 * 1000000LL),
                     ORDER_OK);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox"
                                " WHERE next_attempt_at BETWEEN clock_timestamp() + interval "
                                "'1.4 s' AND clock_timestamp() + interval '3 s'",
                                NULL, NULL, NULL),
                     2);
    store_outbox_rows_free(rows, n);
    order_clear(&a);
}

static void test_lease_runs_out(void **state)
{
    order_t a;
    fx_place(&P, &a, "ann", 1);
    store_outbox_row *rows;
    size_t n = claim(S, 100, 100 * 1000LL, &rows); /* 100 ms */
    assert_int_equal(n, 2);
    store_outbox_rows_free(rows, n);
    usleep(250 * 1000);
    n = claim(S, 100, 60 * 1000000LL, &rows);
    assert_int_equal(n, 2); /* a relay that died: its rows go again */
    assert_int_equal(rows[0].attempts, 2);
    store_outbox_rows_free(rows, n);
    order_clear(&a);
}

/* Two claimers at once, each with its own connection, until nothing is left. */
struct claimer {
    char ids[400][ORDER_ID_LEN + 1];
    size_t n;
};

static void *claim_loop(void *arg)
{
    struct claimer *c = arg;
    struct store *s = pgt_store(5 * 1000000);
    for (int idle = 0; idle < 3;) {
        store_outbox_row *rows;
        size_t n = claim(s, 7, 60 * 1000000LL, &rows);
        if (n == 0) {
            idle++;
            usleep(20 * 1000);
            continue;
        }
        idle = 0;
        const char *ids[7];
        for (size_t i = 0; i < n; i++) {
            ids[i] = rows[i].id;
            snprintf(c->ids[c->n++], ORDER_ID_LEN + 1, "%s", rows[i].id);
        }
        order_error e;
        order_ctx ctx = pgt_ctx(&e, "relay", 10 * 1000000);
        assert_int_equal(store_outbox_mark_sent(s, &ctx, ids, n), ORDER_OK);
        store_outbox_rows_free(rows, n);
    }
    store_close(s);
    return NULL;
}

static void test_concurrent_claims_never_share(void **state)
{
    for (int i = 0; i < 30; i++) {
        order_t o;
        fx_place(&P, &o, "ann", 1);
        fx_move(&P, o.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, NULL);
        order_clear(&o);
    }
    assert_int_equal(fx_rows(), 120);
    struct claimer *a = calloc(1, sizeof *a), *b = calloc(1, sizeof *b);
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, claim_loop, a), 0);
    assert_int_equal(pthread_create(&tb, NULL, claim_loop, b), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    assert_int_equal(a->n + b->n, 120);
    for (size_t i = 0; i < a->n; i++)
        for (size_t j = 0; j < b->n; j++)
            assert_string_not_equal(a->ids[i], b->ids[j]);
    assert_int_equal(fx_unsent(), 0);
    free(a);
    free(b);
}

static void test_stats_and_prune(void **state)
{
    order_error e;
    order_ctx ctx = ctx_of(&e);
    int64_t backlog = -1, age = -1;
    assert_int_equal(store_outbox_stats(S, &ctx, &backlog, &age), ORDER_OK);
    assert_int_equal(backlog, 0);
    assert_int_equal(age, 0);

    order_t a, b;
    fx_place(&P, &a, "ann", 1);
    fx_place(&P, &b, "bob", 1);
    usleep(50 * 1000);
    ctx = ctx_of(&e);
    assert_int_equal(store_outbox_stats(S, &ctx, &backlog, &age), ORDER_OK);
    assert_int_equal(backlog, 4);
    assert_true(age >= 50 * 1000 && age < 10 * 1000000);

    /* Publish a's two rows, age them; b's stay unsent and are never pruned. */
    char sql[256];
    snprintf(sql, sizeof sql,
             "UPDATE outbox SET published_at = clock_timestamp() - interval '2 h'"
             " WHERE order_id = '%s'",
             a.id);
    pgt_exec(pgt_conn(), sql);
    int64_t deleted = -1;
    ctx = ctx_of(&e);
    assert_int_equal(store_outbox_prune(S, &ctx, 3 * 3600 * 1000000LL, 10, &deleted), ORDER_OK);
    assert_int_equal(deleted, 0); /* not old enough */
    ctx = ctx_of(&e);
    assert_int_equal(store_outbox_prune(S, &ctx, 3600 * 1000000LL, 1, &deleted), ORDER_OK);
    assert_int_equal(deleted, 1); /* bounded batch */
    ctx = ctx_of(&e);
    assert_int_equal(store_outbox_prune(S, &ctx, 3600 * 1000000LL, 10, &deleted), ORDER_OK);
    assert_int_equal(deleted, 1);
    assert_int_equal(fx_rows(), 2);
    ctx = ctx_of(&e);
    assert_int_equal(store_outbox_stats(S, &ctx, &backlog, &age), ORDER_OK);
    assert_int_equal(backlog, 2);
    order_clear(&a);
    order_clear(&b);
}

static void test_listen_wakes_on_new_events(void **state)
{
    struct store *s = pgt_store(5 * 1000000);
    uint64_t tag = 0;
    order_error e;
    order_ctx ctx = ctx_of(&e);
    assert_int_equal(store_outbox_listen(s, &ctx, &tag), ORDER_OK);
    assert_true(tag != 0);
    uint64_t first = tag;
    ctx = ctx_of(&e);
    assert_int_equal(store_outbox_listen(s, &ctx, &tag), ORDER_OK); /* no-op */
    assert_true(tag == first);
    int fd = store_outbox_listen_fd(s);
    assert_true(fd >= 0);
    assert_int_equal(store_outbox_notified(s), 0);

    order_t a;
    fx_place(&P, &a, "ann", 1); /* another connection commits: NOTIFY */
    struct pollfd p = {.fd = fd, .events = POLLIN};
    assert_int_equal(poll(&p, 1, 5000), 1);
    assert_true(store_outbox_notified(s) >= 1);
    assert_int_equal(store_outbox_notified(s), 0);

    /* A notification that arrives while a statement runs is kept for the next drain. */
    order_clear(&a);
    fx_place(&P, &a, "ann", 1);
    usleep(100 * 1000);
    int64_t backlog, age;
    ctx = ctx_of(&e);
    assert_int_equal(store_outbox_stats(s, &ctx, &backlog, &age), ORDER_OK);
    assert_true(store_outbox_notified(s) >= 1);
    store_close(s);
    order_clear(&a);
}

int main(void)
{
    if (pgt_setup("amqp_outbox", true) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_trigger_writes_complete_events, reset),
        cmocka_unit_test_setup(test_claim_takes_chain_heads_in_order, reset),
        cmocka_unit_test_setup(test_failed_family_does_not_block_the_other, reset),
        cmocka_unit_test_setup(test_back_off_is_capped, reset),
        cmocka_unit_test_setup(test_lease_runs_out, reset),
        cmocka_unit_test_setup(test_concurrent_claims_never_share, reset),
        cmocka_unit_test_setup(test_stats_and_prune, reset),
        cmocka_unit_test_setup(test_listen_wakes_on_new_events, reset),
    };
    int rc = cmocka_run_group_tests(tests, group_setup, group_teardown);
    pgt_teardown();
    return rc;
}
