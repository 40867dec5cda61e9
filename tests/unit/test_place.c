/* test_place.c — PlaceOrder in the domain: validation (every violation at once, exact field
 * paths, nothing written), who may order for whom, prices and tax from the catalogue,
 * limits and overflow, idempotent replays, deadlines, and failures of the store and of
 * the payment provider with their retries. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "unit/fakes.h"

/* ---- fixture ---- */

static int setup(void **state)
{
    fake_env *env = fake_env_create();
    fake_store *fs = env->store;
    fake_store_put_product(fs, "apple", "Apple", 1000, "EUR", true);
    fake_store_put_product(fs, "pear", "Pear", 250, "EUR", true);
    fake_store_put_product(fs, "melon", "Melon", 6061, "EUR", true);
    fake_store_put_product(fs, "old", "Discontinued", 500, "EUR", false);
    fake_store_put_product(fs, "sushi", "Sushi", 1200, "JPY", true);
    fake_store_put_product(fs, "big", "Big", 50000000, "EUR", true);
    /* 922337203685478 * 10000 does not fit in int64. */
    fake_store_put_product(fs, "gold", "Gold", 922337203685478LL, "EUR", true);
    *state = env;
    return 0;
}

static int teardown(void **state)
{
    fake_env_destroy(*state);
    return 0;
}

static order_place_cmd cmd_of(const char *request_id, const order_line_cmd *lines, size_t n)
{
    return (order_place_cmd){
        .request_id = request_id,
        .customer_id = "",
        .lines = lines,
        .nlines = n,
        .provider = ORDER_PROVIDER_LOCAL,
    };
}

/* Runs order_place and frees what it returned; returns the code. */
static int place(fake_env *env, const order_place_cmd *cmd)
{
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    int rc = order_place(&env->svc, &env->ctx, cmd, &o, &a, &replayed);
    order_clear(&o);
    return rc;
}

/* The field paths reported, in order, joined by ' ' (for one readable assertion). */
static const char *fields(const order_error *e)
{
    static char buf[4096];
    size_t off = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < e->nviolations && off < sizeof buf; i++)
        off += (size_t)snprintf(buf + off, sizeof buf - off, "%s%s", i ? " " : "",
                                e->violations[i].field);
    return buf;
}

static void assert_nothing_written(fake_env *env)
{
    assert_int_equal(env->store->calls[FAKE_ORDER_INSERT], 0);
    assert_int_equal(fake_store_writes(env->store), 0);
    assert_int_equal(env->store->norders, 0);
    assert_int_equal(env->local->calls[FAKE_PAY_CREATE], 0);
}

/* ---- happy path: the catalogue decides the prices ---- */

static void test_prices_come_from_the_catalogue(void **state)
{
    fake_env *env = *state;
    order_line_cmd lines[] = {{"apple", 3}, {"pear", 2}};
    order_place_cmd cmd = cmd_of("r-1", lines, 2);
    order_t o = {0};
    order_payment_action a;
    bool replayed = true;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);

    assert_false(replayed);
    assert_true(order_id_valid(o.id));
    assert_string_equal(o.customer_id, "alice");
    assert_int_equal(o.status, ORDER_STATUS_PENDING);
    assert_string_equal(o.currency, "EUR");
    assert_int_equal(o.nitems, 2);
    assert_string_equal(o.items[0].product_id, "apple");
    assert_string_equal(o.items[0].name, "Apple");
    assert_int_equal(o.items[0].quantity, 3);
    assert_int_equal(o.items[0].unit_price_minor, 1000);
    assert_int_equal(o.items[0].line_total_minor, 3000);
    assert_string_equal(o.items[1].product_id, "pear");
    assert_int_equal(o.items[1].unit_price_minor, 250);
    assert_int_equal(o.items[1].line_total_minor, 500);
    assert_int_equal(o.subtotal_minor, 3500);
    assert_int_equal(o.tax_minor, 289); /* 3500 * 8.25 % = 288.75 */
    assert_int_equal(o.total_minor, 3789);

    /* The payment was created once, for this order's total, and its reference is both in
     * the order and in what the client is told to pay. */
    assert_int_equal(env->local->created, 1);
    const fake_payment *p = fake_payments_find(env->local, o.id);
    assert_non_null(p);
    assert_int_equal(p->amount_minor, 3789);
    assert_string_equal(p->currency, "EUR");
    assert_int_equal(o.pay_provider, ORDER_PROVIDER_LOCAL);
    assert_int_equal(o.pay_status, ORDER_PAY_PENDING);
    assert_string_equal(o.pay_reference, p->reference);
    assert_int_equal(a.provider, ORDER_PROVIDER_LOCAL);
    assert_string_equal(a.reference, p->reference);

    /* What was returned is what was stored, with one history row. */
    const order_t *s = fake_store_order(env->store, o.id);
    assert_non_null(s);
    assert_int_equal(s->version, o.version);
    assert_string_equal(s->pay_reference, o.pay_reference);
    assert_int_equal(s->total_minor, 3789);
    assert_int_equal(env->store->norders, 1);
    assert_int_equal(fake_store_history_count(env->store, o.id), 1);

    /* The order keeps the prices it was placed at when the catalogue changes. */
    char id[ORDER_ID_LEN + 1];
    snprintf(id, sizeof id, "%s", o.id);
    order_clear(&o);
    fake_store_put_product(env->store, "apple", "Apple", 9999, "EUR", true);
    fake_env_again(env);
    assert_int_equal(order_get(&env->svc, &env->ctx, id, &o), ORDER_OK);
    assert_int_equal(o.items[0].unit_price_minor, 1000);
    assert_int_equal(o.total_minor, 3789);
    order_clear(&o);
}

static void test_tax_is_rounded_half_up(void **state)
{
    fake_env *env = *state;
    static const struct {
        const char *product;
        int32_t qty;
        int64_t subtotal, tax;
    } cases[] = {
        {"apple", 1, 1000, 83},  /* 82.5 -> 83 */
        {"apple", 2, 2000, 165}, /* exact */
        {"melon", 1, 6061, 500}, /* 500.0325 -> 500 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char rid[16];
        snprintf(rid, sizeof rid, "tax-%zu", i);
        order_line_cmd line = {cases[i].product, cases[i].qty};
        order_place_cmd cmd = cmd_of(rid, &line, 1);
        order_t o = {0};
        order_payment_action a;
        bool replayed;
        fake_env_again(env);
        assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
        assert_int_equal(o.subtotal_minor, cases[i].subtotal);
        assert_int_equal(o.tax_minor, cases[i].tax);
        assert_int_equal(o.total_minor, cases[i].subtotal + cases[i].tax);
        order_clear(&o);
    }
}

/* ---- validation: every violation at once, nothing written ---- */

static void test_all_field_violations_at_once(void **state)
{
    fake_env *env = *state;
    order_line_cmd lines[] = {{"apple", 0}, {"pear", 10001}, {"", 1}, {"melon", -3}};
    order_place_cmd cmd = cmd_of("", lines, 4);
    cmd.provider = ORDER_PROVIDER_UNSPECIFIED;
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_int_equal(env->err.code, ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "request_id items[0].quantity items[1].quantity "
                                           "items[2].product_id items[3].quantity "
                                           "payment_provider");
    assert_false(env->err.violations_truncated);
    assert_nothing_written(env);
}

static void test_request_id_length(void **state)
{
    fake_env *env = *state;
    char rid[ORDER_REQUEST_ID_MAX + 2];
    memset(rid, 'r', sizeof rid - 1);
    rid[sizeof rid - 1] = '\0'; /* 129 characters */
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of(rid, &line, 1);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "request_id");
    assert_nothing_written(env);

    cmd.request_id = NULL; /* absent is empty */
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "request_id");
    assert_nothing_written(env);

    rid[ORDER_REQUEST_ID_MAX] = '\0'; /* 128: the longest accepted */
    cmd.request_id = rid;
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_OK);
    assert_int_equal(env->store->norders, 1);
}

static void test_no_items(void **state)
{
    fake_env *env = *state;
    order_place_cmd cmd = cmd_of("r-empty", NULL, 0);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "items");
    assert_nothing_written(env);
}

static void test_line_count_limit(void **state)
{
    fake_env *env = *state;
    order_line_cmd lines[ORDER_MAX_LINES + 1];
    for (size_t i = 0; i < ORDER_MAX_LINES + 1; i++)
        lines[i] = (order_line_cmd){"pear", 1};
    order_place_cmd cmd = cmd_of("r-lines", lines, ORDER_MAX_LINES + 1);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "items");
    assert_nothing_written(env);

    cmd.nlines = ORDER_MAX_LINES; /* 100 lines are fine */
    fake_env_again(env);
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_int_equal(o.nitems, ORDER_MAX_LINES);
    assert_int_equal(o.subtotal_minor, 250 * ORDER_MAX_LINES);
    order_clear(&o);
}

static void test_quantity_bounds(void **state)
{
    fake_env *env = *state;
    order_line_cmd lines[] = {{"pear", ORDER_MIN_QUANTITY}, {"pear", ORDER_MAX_QUANTITY}};
    order_place_cmd cmd = cmd_of("r-q", lines, 2);
    assert_int_equal(place(env, &cmd), ORDER_OK);

    lines[0].quantity = ORDER_MIN_QUANTITY - 1;
    lines[1].quantity = ORDER_MAX_QUANTITY + 1;
    cmd.request_id = "r-q2";
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "items[0].quantity items[1].quantity");
    assert_int_equal(env->store->norders, 1);
}

static void test_catalogue_violations_at_once(void **state)
{
    fake_env *env = *state;
    /* unknown, inactive, fine, other currency */
    order_line_cmd lines[] = {{"nope", 1}, {"old", 1}, {"apple", 1}, {"sushi", 1}};
    order_place_cmd cmd = cmd_of("r-cat", lines, 4);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err),
                        "items[0].product_id items[1].product_id items[3].product_id");
    assert_nothing_written(env);

    /* A one-line order in another currency is fine: it is the mix that is refused. */
    order_line_cmd yen = {"sushi", 2};
    cmd = cmd_of("r-yen", &yen, 1);
    fake_env_again(env);
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_string_equal(o.currency, "JPY");
    assert_int_equal(o.subtotal_minor, 2400);
    assert_int_equal(o.tax_minor, 198); /* 198.0 */
    order_clear(&o);
}

/* Field checks and catalogue checks are one report: a client fixing a quantity must not
 * learn only on its next try that a product does not exist. */
static void test_field_and_catalogue_violations_together(void **state)
{
    fake_env *env = *state;
    order_line_cmd lines[] = {{"apple", 0}, {"nope", 1}, {"", 2}, {"old", 1}};
    order_place_cmd cmd = cmd_of("", lines, 4);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "request_id items[0].quantity items[2].product_id "
                                           "items[1].product_id items[3].product_id");
    assert_nothing_written(env);

    /* Even when the catalogue cannot be read, the field violations are the answer. */
    env->store->down = true;
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "request_id items[0].quantity items[2].product_id");
    assert_nothing_written(env);
}

static void test_payment_provider(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of("r-pp", &line, 1);
    cmd.provider = ORDER_PROVIDER_UNSPECIFIED;
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "payment_provider");

    cmd.provider = ORDER_PROVIDER_STRIPE; /* a real provider, not configured here */
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "payment_provider");

    cmd.provider = (order_provider)42; /* not even a provider */
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "payment_provider");
    assert_nothing_written(env);
}

/* ---- who orders for whom ---- */

static void test_privileged_callers_name_the_customer(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of("r-svc", &line, 1);
    fake_env_as(env, "checkout", ORDER_ROLE_SERVICE);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "customer_id");
    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "customer_id");
    assert_nothing_written(env);

    cmd.customer_id = "bob";
    fake_env_as(env, "checkout", ORDER_ROLE_SERVICE);
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_string_equal(o.customer_id, "bob");
    order_clear(&o);
}

static void test_customer_orders_only_for_themselves(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of("r-cust", &line, 1);
    cmd.customer_id = "bob";
    assert_int_equal(place(env, &cmd), ORDER_EPERM);
    assert_int_equal(env->err.code, ORDER_EPERM);
    assert_nothing_written(env);

    cmd.customer_id = "alice"; /* naming themselves is fine */
    fake_env_again(env);
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_string_equal(o.customer_id, "alice");
    order_clear(&o);
}

/* ---- limits ---- */

static void test_total_above_the_provider_limit(void **state)
{
    fake_env *env = *state;
    /* 2 x 500,000.00 + 8.25 % tax > 1,000,000.00 */
    order_line_cmd line = {"big", 2};
    order_place_cmd cmd = cmd_of("r-big", &line, 1);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "items");
    assert_nothing_written(env);

    /* Exactly the limit is accepted, one minor unit more is not (no tax, to hit it). */
    env->svc.cfg.tax_rate_bps = 0;
    fake_store_put_product(env->store, "edge", "Edge", FAKE_MAX_TOTAL, "EUR", true);
    order_line_cmd edge = {"edge", 1};
    cmd = cmd_of("r-edge", &edge, 1);
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_OK);
    fake_store_put_product(env->store, "edge", "Edge", FAKE_MAX_TOTAL + 1, "EUR", true);
    cmd.request_id = "r-edge2";
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "items");
    assert_int_equal(env->store->norders, 1);
}

static void test_overflow_is_refused_not_wrapped(void **state)
{
    fake_env *env = *state;
    /* With no provider limit, only int64 itself stands in the way. */
    env->svc.cfg.max_total_minor = INT64_MAX;

    order_line_cmd line = {"gold", 10000}; /* quantity * price overflows */
    order_place_cmd cmd = cmd_of("r-gold", &line, 1);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "items");

    /* Each line fits, their sum does not. */
    fake_store_put_product(env->store, "half", "Half", INT64_MAX / 2 + 1, "EUR", true);
    order_line_cmd two[] = {{"half", 1}, {"half", 1}};
    cmd = cmd_of("r-half", two, 2);
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "items");

    /* The subtotal fits, subtotal + 100 % tax does not. */
    env->svc.cfg.tax_rate_bps = 10000;
    cmd = cmd_of("r-half1", two, 1);
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EINVAL);
    assert_string_equal(fields(&env->err), "items");
    assert_nothing_written(env);

    /* Just below: INT64_MAX/2 at 100 % is INT64_MAX - 1, which fits. */
    fake_store_put_product(env->store, "half", "Half", INT64_MAX / 2, "EUR", true);
    fake_env_again(env);
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_true(o.total_minor == INT64_MAX - 1);
    order_clear(&o);
}

/* ---- idempotency ---- */

static void test_replay_returns_the_same_order(void **state)
{
    fake_env *env = *state;
    order_line_cmd lines[] = {{"apple", 1}, {"pear", 4}};
    order_place_cmd cmd = cmd_of("r-replay", lines, 2);
    order_t first = {0}, again = {0};
    order_payment_action a1, a2;
    bool replayed = true;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &first, &a1, &replayed), ORDER_OK);
    assert_false(replayed);

    fake_env_again(env);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &again, &a2, &replayed), ORDER_OK);
    assert_true(replayed);
    assert_string_equal(again.id, first.id);
    assert_int_equal(again.version, first.version);
    assert_int_equal(again.total_minor, first.total_minor);
    assert_int_equal(again.nitems, 2);
    assert_string_equal(again.pay_reference, first.pay_reference);
    assert_string_equal(a2.reference, a1.reference);
    assert_int_equal(a2.provider, ORDER_PROVIDER_LOCAL);

    assert_int_equal(env->store->norders, 1);
    assert_int_equal(env->local->created, 1); /* one payment, however often it is asked */
    assert_int_equal(fake_store_history_count(env->store, first.id), 1);
    order_clear(&first);
    order_clear(&again);
}

static void test_request_ids_belong_to_their_caller(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of("r-shared", &line, 1);
    order_t a = {0}, b = {0};
    order_payment_action pa;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &a, &pa, &replayed), ORDER_OK);
    fake_env_as(env, "bob", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &b, &pa, &replayed), ORDER_OK);
    assert_false(replayed);
    assert_string_not_equal(a.id, b.id);
    assert_string_equal(b.customer_id, "bob");
    assert_int_equal(env->store->norders, 2);
    order_clear(&a);
    order_clear(&b);
}

static void test_key_reused_with_another_request(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of("r-reuse", &line, 1);
    assert_int_equal(place(env, &cmd), ORDER_OK);
    const order_t *stored = fake_store_order(env->store, env->store->orders[0].id);
    int64_t version = stored->version;

    order_line_cmd other = {"apple", 2};
    cmd.lines = &other;
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EIDEMPOTENCY);
    assert_int_equal(env->err.code, ORDER_EIDEMPOTENCY);
    assert_string_equal(env->err.reason, "IDEMPOTENCY_KEY_REUSED");
    assert_int_equal(env->store->norders, 1);
    assert_int_equal(env->store->orders[0].version, version);
    assert_int_equal(env->store->orders[0].items[0].quantity, 1);
    assert_int_equal(env->local->created, 1);
}

static void test_fingerprint(void **state)
{
    (void)state;
    order_line_cmd l1[] = {{"apple", 1}, {"pear", 2}};
    order_line_cmd l2[] = {{"apple", 1}, {"pear", 3}};
    order_place_cmd c1 = cmd_of("k", l1, 2), c2 = cmd_of("k", l2, 2);
    char f1[512], f2[512];
    assert_true(order_fingerprint(&c1, "alice", f1, sizeof f1));
    assert_true(order_fingerprint(&c1, "alice", f2, sizeof f2));
    assert_string_equal(f1, f2);
    assert_true(order_fingerprint(&c2, "alice", f2, sizeof f2));
    assert_string_not_equal(f1, f2); /* quantity */
    assert_true(order_fingerprint(&c1, "bob", f2, sizeof f2));
    assert_string_not_equal(f1, f2); /* customer */
    c2 = c1;
    c2.provider = ORDER_PROVIDER_STRIPE;
    assert_true(order_fingerprint(&c2, "alice", f2, sizeof f2));
    assert_string_not_equal(f1, f2); /* provider */
    c2 = c1;
    c2.request_id = "another key";
    assert_true(order_fingerprint(&c2, "alice", f2, sizeof f2));
    assert_string_equal(f1, f2); /* the key is not part of the request's content */
    assert_false(order_fingerprint(&c1, "alice", f2, 8)); /* too small: says so */
}

/* ---- deadlines and failures ---- */

static void test_deadline_already_passed(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of("r-late", &line, 1);
    env->ctx.deadline_mono_us = 1; /* long gone */
    assert_int_equal(place(env, &cmd), ORDER_EDEADLINE);
    assert_int_equal(env->err.code, ORDER_EDEADLINE);
    assert_nothing_written(env);
    /* The work stops before it starts: not even the catalogue is read. */
    for (int op = 0; op < FAKE_STORE_NOPS; op++)
        assert_int_equal(env->store->calls[op], 0);
}

static void test_store_down(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of("r-down", &line, 1);
    env->store->down = true;
    assert_int_equal(place(env, &cmd), ORDER_EUNAVAILABLE);
    assert_int_equal(env->err.code, ORDER_EUNAVAILABLE);
    assert_int_equal(env->store->norders, 0);
    assert_int_equal(env->local->calls[FAKE_PAY_CREATE], 0);

    /* Down only for the insert: still nothing written, no payment. */
    env->store->down = false;
    env->store->fail[FAKE_ORDER_INSERT] = 1;
    fake_env_again(env);
    assert_int_equal(place(env, &cmd), ORDER_EUNAVAILABLE);
    assert_int_equal(env->store->norders, 0);
    assert_int_equal(env->local->calls[FAKE_PAY_CREATE], 0);

    fake_env_again(env); /* and back up: the same request goes through */
    assert_int_equal(place(env, &cmd), ORDER_OK);
    assert_int_equal(env->store->norders, 1);
}

static void test_provider_fails_then_retry_completes(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 2};
    order_place_cmd cmd = cmd_of("r-payfail", &line, 1);
    env->local->fail[FAKE_PAY_CREATE] = 1;
    assert_int_equal(place(env, &cmd), ORDER_EUNAVAILABLE);
    assert_int_equal(env->err.code, ORDER_EUNAVAILABLE);

    /* The order is committed and waits, PENDING, with no payment reference. */
    assert_int_equal(env->store->norders, 1);
    const order_t *s = &env->store->orders[0];
    assert_int_equal(s->status, ORDER_STATUS_PENDING);
    assert_string_equal(s->pay_reference, "");
    assert_int_equal(s->pay_status, ORDER_PAY_UNSPECIFIED);
    assert_int_equal(env->local->created, 0);

    /* The same request again completes it: one order, one payment, reference stored. */
    fake_env_again(env);
    order_t o = {0};
    order_payment_action a;
    bool replayed = false;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_true(replayed);
    assert_int_equal(env->store->norders, 1);
    assert_int_equal(env->local->created, 1);
    assert_string_equal(o.id, env->store->orders[0].id);
    assert_string_not_equal(o.pay_reference, "");
    assert_string_equal(o.pay_reference, a.reference);
    assert_int_equal(o.pay_status, ORDER_PAY_PENDING);
    assert_string_equal(env->store->orders[0].pay_reference, a.reference);
    order_clear(&o);
}

static void test_reference_not_stored_then_retry(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"pear", 1};
    order_place_cmd cmd = cmd_of("r-setpay", &line, 1);
    env->store->fail[FAKE_ORDER_AMEND] = 1;
    assert_int_equal(place(env, &cmd), ORDER_EUNAVAILABLE);
    assert_int_equal(env->local->created, 1);
    assert_string_equal(env->store->orders[0].pay_reference, "");

    fake_env_again(env);
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_int_equal(env->local->created, 1); /* the provider gave the same payment back */
    assert_string_equal(o.pay_reference, fake_payments_find(env->local, o.id)->reference);
    assert_int_equal(env->store->norders, 1);
    order_clear(&o);
}

static void test_replay_of_a_paid_order_only_reports_it(void **state)
{
    fake_env *env = *state;
    order_line_cmd line = {"apple", 1};
    order_place_cmd cmd = cmd_of("r-paid", &line, 1);
    order_t o = {0}, p = {0};
    order_payment_action a;
    bool replayed;
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    fake_env_again(env);
    assert_int_equal(
        order_confirm_payment(&env->svc, &env->ctx, o.id, ORDER_PROVIDER_LOCAL, a.reference, &p),
        ORDER_OK);
    int creates = env->local->calls[FAKE_PAY_CREATE];
    int writes = fake_store_writes(env->store);

    order_clear(&o);
    fake_env_again(env);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    assert_true(replayed);
    assert_int_equal(o.status, ORDER_STATUS_PAID);
    assert_int_equal(o.version, p.version);
    assert_string_equal(a.reference, p.pay_reference);
    assert_int_equal(env->local->calls[FAKE_PAY_CREATE], creates);
    assert_int_equal(fake_store_writes(env->store), writes + 1); /* the insert that replayed */
    order_clear(&o);
    order_clear(&p);
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_prices_come_from_the_catalogue),
        T(test_tax_is_rounded_half_up),
        T(test_all_field_violations_at_once),
        T(test_request_id_length),
        T(test_no_items),
        T(test_line_count_limit),
        T(test_quantity_bounds),
        T(test_catalogue_violations_at_once),
        T(test_field_and_catalogue_violations_together),
        T(test_payment_provider),
        T(test_privileged_callers_name_the_customer),
        T(test_customer_orders_only_for_themselves),
        T(test_total_above_the_provider_limit),
        T(test_overflow_is_refused_not_wrapped),
        T(test_replay_returns_the_same_order),
        T(test_request_ids_belong_to_their_caller),
        T(test_key_reused_with_another_request),
        T(test_fingerprint),
        T(test_deadline_already_passed),
        T(test_store_down),
        T(test_provider_fails_then_retry_completes),
        T(test_reference_not_stored_then_retry),
        T(test_replay_of_a_paid_order_only_reports_it),
    };
    return cmocka_run_group_tests_name("place", tests, NULL, NULL);
}
